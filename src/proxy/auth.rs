//! `proxy_auth`: the proxy's own Basic authentication.
//!
//! Checked before anything else of a request (CONNECT included), so an
//! unauthenticated caller learns nothing about routes or upstreams. Every
//! configured entry is compared in constant time and all of them are always
//! compared, so timing tells nothing about which part matched. The header
//! is hop-by-hop: it is stripped before forwarding and never logged.

use base64::Engine;
use http::{HeaderMap, HeaderValue, header};
use subtle::ConstantTimeEq;

use crate::error::ProxyError;

/// Accepts the request when `accepted` is empty or its
/// `Proxy-Authorization: Basic` credentials match one entry.
pub fn check(headers: &HeaderMap, accepted: &[String]) -> Result<(), ProxyError> {
    if accepted.is_empty() {
        return Ok(());
    }
    check_offered(headers.get(header::PROXY_AUTHORIZATION), accepted)
}

/// [`check`] for the `Proxy-Authorization` value `offered`: a tunnel's
/// requests are checked again with its CONNECT's.
pub fn check_offered(offered: Option<&HeaderValue>, accepted: &[String]) -> Result<(), ProxyError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let offered = offered.and_then(|v| decode(v.as_bytes()));
    let Some(offered) = offered else {
        return Err(ProxyError::ProxyAuthRequired);
    };
    let mut matched = subtle::Choice::from(0);
    for entry in accepted {
        matched |= entry.as_bytes().ct_eq(&offered);
    }
    if bool::from(matched) { Ok(()) } else { Err(ProxyError::ProxyAuthRequired) }
}

/// `Basic <base64(user:password)>` -> the decoded `user:password` bytes.
fn decode(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, credentials) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(credentials.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::PROXY_AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn basic_credentials() {
        let accepted = vec!["alice:s3cret".to_string(), "bob:pw".to_string()];
        // base64("bob:pw") = "Ym9iOnB3"
        assert!(check(&headers("Basic Ym9iOnB3"), &accepted).is_ok());
        assert!(check(&headers("basic Ym9iOnB3"), &accepted).is_ok());
        assert!(check(&headers("Basic Ym9iOnB4"), &accepted).is_err());
        assert!(check(&headers("Bearer Ym9iOnB3"), &accepted).is_err());
        assert!(check(&headers("Basic !!!"), &accepted).is_err());
        assert!(check(&HeaderMap::new(), &accepted).is_err());
        assert!(check(&HeaderMap::new(), &[]).is_ok());
    }
}
