//! `base_url` and `hosts` entries: splitting them into scheme, host, port and
//! path, and deciding when two host entries claim the same requests.
//!
//! Hosts are compared in one canonical form: lower-cased, IPv6 literals in
//! brackets (as in a `Host` header), and an optional port. An entry without a
//! port matches that host on any port, which is why `"api.example.com"` and
//! `"api.example.com:443"` in two upstreams are a conflict.
use std::borrow::Cow;
use std::net::Ipv6Addr;

use http::Uri;
use http::uri::{Authority, Scheme};

use super::BaseUrl;

/// A host entry split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Lower-cased host name or IP, IPv6 without brackets.
    pub host: String,
    /// Whether `host` is an IPv6 literal (written in brackets).
    pub ipv6: bool,
    /// Explicit port, if any.
    pub port: Option<u16>,
}

impl HostPort {
    /// `host` or `host:port`, IPv6 in brackets: the form stored in `Upstream::hosts`.
    pub fn canonical(&self) -> String {
        let host = if self.ipv6 { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    /// Whether some request would match both entries.
    pub fn overlaps(&self, other: &HostPort) -> bool {
        self.host == other.host
            && match (self.port, other.port) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// A request's host (as `Authority::host` gives it) in the canonical form of
/// [`HostPort::canonical`], so that it can be looked up among the entries.
/// A fully qualified name (`api.test.`) is the same host as without its
/// final dot.
pub fn canonical_host(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').filter(|name| !name.is_empty()).unwrap_or(host);
    if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match literal.parse::<Ipv6Addr>() {
            Ok(address) => Cow::Owned(format!("[{address}]")),
            Err(_) => Cow::Borrowed(host),
        };
    }
    match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(host.to_ascii_lowercase()),
        false => Cow::Borrowed(host),
    }
}

/// Parses `host`, `host:port`, `[v6]` or `[v6]:port` (as in a `hosts` entry).
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, ipv6, port) = if let Some(bracketed) = s.strip_prefix('[') {
        let (v6, after) =
            bracketed.split_once(']').ok_or_else(|| "unclosed '[' in IPv6 address".to_owned())?;
        let addr: Ipv6Addr = v6.parse().map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
        let port =
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("unexpected {after:?} after the IPv6 address; expected \":PORT\"")
                })?),
            };
        (addr.to_string(), true, port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err("IPv6 addresses must be written in brackets, like [::1]:8080".to_owned());
        }
        check_host_name(host)?;
        (host.to_ascii_lowercase(), false, port)
    };
    let port = port.map(parse_port).transpose()?;
    Ok(HostPort { host, ipv6, port })
}

/// Parses and splits a `base_url`: `http(s)://host[:port][/path]`, nothing else.
pub fn parse_base_url(s: &str) -> Result<BaseUrl, String> {
    // The `http` crate drops fragments silently, so look for them first.
    if s.contains('#') {
        return Err("a base_url cannot have a #fragment".to_owned());
    }
    if s.contains('?') {
        return Err("a base_url cannot have a ?query".to_owned());
    }
    let uri: Uri =
        s.parse().map_err(|e| format!("not a valid URL ({e}); expected http(s)://host[:port][/path]"))?;
    let scheme = match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP || *scheme == Scheme::HTTPS => scheme.clone(),
        _ => return Err("a base_url must start with http:// or https://".to_owned()),
    };
    let authority: Authority =
        uri.authority().cloned().ok_or_else(|| "a base_url needs a host".to_owned())?;
    if authority.as_str().contains('@') {
        return Err("a base_url cannot carry user credentials (user@host)".to_owned());
    }
    let host_port = parse_host_port(authority.as_str())?;
    let port = host_port.port.unwrap_or(default_port(&scheme));
    Ok(BaseUrl {
        scheme,
        authority,
        host: host_port.host,
        port,
        path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// A host name: non-empty dot-separated labels of letters, digits, `-` and `_`.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    let label_ok = |label: &str| {
        !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !host.split('.').all(label_ok) {
        return Err(format!("{host:?} is not a host name (letters, digits, '-', '_' and dots)"));
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(port) if port > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// The port a URL of `scheme` means when it names none: 443 for `https`,
/// 80 for `http`.
pub fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS { 443 } else { 80 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_split_with_default_ports_and_prefix() {
        let url = parse_base_url("https://API.GitHub.com").unwrap();
        assert_eq!(url.scheme, Scheme::HTTPS);
        assert_eq!(url.authority.as_str(), "API.GitHub.com");
        assert_eq!(url.host, "api.github.com");
        assert_eq!((url.port, url.path.as_str()), (443, ""));

        let url = parse_base_url("http://example.com/").unwrap();
        assert_eq!((url.port, url.path.as_str()), (80, ""));

        let url = parse_base_url("http://example.com:8081/api/v1/").unwrap();
        assert_eq!(url.authority.as_str(), "example.com:8081");
        assert_eq!((url.port, url.path.as_str()), (8081, "/api/v1"));
    }

    #[test]
    fn a_final_dot_names_the_same_host() {
        assert_eq!(canonical_host("api.test."), "api.test");
        assert_eq!(canonical_host("API.Test."), "api.test");
        assert_eq!(canonical_host("[::1]"), "[::1]");
        assert_eq!(canonical_host("."), ".", "no host left to name");
    }

    #[test]
    fn base_url_with_ipv6_literal() {
        let url = parse_base_url("http://[::1]:8080/v1/").unwrap();
        assert_eq!(url.scheme, Scheme::HTTP);
        assert_eq!(url.authority.as_str(), "[::1]:8080");
        assert_eq!(url.host, "::1");
        assert_eq!((url.port, url.path.as_str()), (8080, "/v1"));
        let url = parse_base_url("https://[2001:DB8::1]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("2001:db8::1", 443));
    }

    #[test]
    fn base_url_rejects_what_cannot_be_a_prefix() {
        let cases = [
            ("ftp://example.com", "http:// or https://"),
            ("example.com", "http:// or https://"),
            ("/just/a/path", "http:// or https://"),
            ("https://example.com/?a=1", "query"),
            ("https://example.com/#top", "fragment"),
            ("https://user:pw@example.com", "credentials"),
            ("https://example.com:0", "port"),
            ("https://example.com:99999", "port"),
            ("https://exa mple.com", "not a valid URL"),
            ("https://*.example.com", "host name"),
            ("http://[::1", "not a valid URL"),
        ];
        for (input, expected) in cases {
            let err = parse_base_url(input).unwrap_err();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn host_entries_are_canonical() {
        let canon = |s: &str| parse_host_port(s).map(|h| h.canonical());
        assert_eq!(canon("API.example.com"), Ok("api.example.com".to_owned()));
        assert_eq!(canon("localhost:8081"), Ok("localhost:8081".to_owned()));
        assert_eq!(canon("[::1]:8080"), Ok("[::1]:8080".to_owned()));
        assert_eq!(canon("[0:0::1]"), Ok("[::1]".to_owned()));
        for bad in ["", ":80", "a..b", "a:b", "a:0", "::1", "[::1]x", "a/b", "a b", "*.x.com"] {
            assert!(parse_host_port(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn overlap_ignores_missing_ports() {
        let hp = |s: &str| parse_host_port(s).unwrap();
        assert!(hp("a.com").overlaps(&hp("a.com:443")));
        assert!(hp("a.com:443").overlaps(&hp("A.com:443")));
        assert!(!hp("a.com:80").overlaps(&hp("a.com:443")));
        assert!(!hp("a.com").overlaps(&hp("b.com")));
    }
}
