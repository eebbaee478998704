//! The caller's side of caching: which requests the cache may answer, and
//! the caller's own conditional requests, answered from what the cache has.
//!
//! The cache fetches with its own validators, never the caller's: a 304
//! meant for one caller must not be shared with, or stored for, another.
//! So the caller's `If-None-Match` / `If-Modified-Since` are taken off the
//! request and evaluated here against the full answer (RFC 9110 §13.1).

use std::time::SystemTime;

use http::header::{self, HeaderName};
use http::{HeaderMap, Method, StatusCode};

/// Conditionals the cache answers itself.
const VALIDATING: [HeaderName; 2] = [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE];

/// Headers that make a request one the cache does not answer: ranges, and
/// conditionals that guard a change rather than validate a copy.
const UNCACHED: [HeaderName; 4] =
    [header::RANGE, header::IF_MATCH, header::IF_UNMODIFIED_SINCE, header::IF_RANGE];

/// Whether the cache may answer this request: a GET without a body, whose
/// caller did not ask to bypass caches (`Cache-Control: no-cache` or
/// `no-store`, `Pragma: no-cache`) and asks for no range.
pub fn cacheable(method: &Method, headers: &HeaderMap, has_body: bool) -> bool {
    let directive = |name: HeaderName, wanted: &[&str]| {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|d| {
            let name = d.split('=').next().unwrap_or_default().trim();
            wanted.iter().any(|w| name.eq_ignore_ascii_case(w))
        })
    };
    method == Method::GET
        && !has_body
        && !UNCACHED.iter().any(|name| headers.contains_key(name))
        && !directive(header::CACHE_CONTROL, &["no-cache", "no-store"])
        && !directive(header::PRAGMA, &["no-cache"])
}

/// Whether an answer to `method` changes what the cache holds for its URI
/// (RFC 9111 §4.4): an unsafe method that succeeded.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    let unsafe_method = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
    unsafe_method && (status.is_success() || status.is_redirection())
}

/// Takes the caller's validating conditionals off `headers`, returning them.
pub fn take_validators(headers: &mut HeaderMap) -> HeaderMap {
    let mut taken = HeaderMap::new();
    for name in VALIDATING {
        for value in headers.get_all(&name) {
            taken.append(name.clone(), value.clone());
        }
        headers.remove(&name);
    }
    taken
}

/// Whether the caller's `conditionals` make this full answer a 304 for it:
/// `If-None-Match` naming its entity tag (weak comparison) or `*`; without
/// one, `If-Modified-Since` no earlier than its `Last-Modified`.
pub fn not_modified(conditionals: &HeaderMap, status: StatusCode, answer: &HeaderMap) -> bool {
    if status != StatusCode::OK {
        return false;
    }
    if conditionals.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = answer.get(header::ETAG).and_then(|v| v.to_str().ok()) else { return false };
        let tags = conditionals.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok());
        return tags.flat_map(|v| v.split(',')).any(|tag| tag.trim() == "*" || weak(tag) == weak(etag));
    }
    let date = |headers: &HeaderMap, name| -> Option<SystemTime> {
        httpdate::parse_http_date(headers.get(name)?.to_str().ok()?.trim()).ok()
    };
    match (date(conditionals, header::IF_MODIFIED_SINCE), date(answer, header::LAST_MODIFIED)) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// An entity tag without its weakness mark.
fn weak(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The head of a 304 made from a full answer's: what describes the
/// representation stays, what describes the body that is not sent goes.
pub fn not_modified_headers(mut headers: HeaderMap) -> HeaderMap {
    for name in
        [header::CONTENT_LENGTH, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::TRANSFER_ENCODING]
    {
        headers.remove(name);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
        }
        map
    }

    #[test]
    fn only_plain_gets_are_answered_from_the_cache() {
        assert!(cacheable(&Method::GET, &headers(&[("accept", "*/*")]), false));
        assert!(cacheable(&Method::GET, &headers(&[("cache-control", "max-age=0")]), false));
        assert!(!cacheable(&Method::POST, &headers(&[]), false));
        assert!(!cacheable(&Method::GET, &headers(&[]), true));
        assert!(!cacheable(&Method::GET, &headers(&[("cache-control", "No-Cache")]), false));
        assert!(!cacheable(&Method::GET, &headers(&[("cache-control", "max-age=5, no-store")]), false));
        assert!(!cacheable(&Method::GET, &headers(&[("pragma", "no-cache")]), false));
        assert!(!cacheable(&Method::GET, &headers(&[("range", "bytes=0-9")]), false));
    }

    #[test]
    fn writes_that_succeeded_invalidate() {
        assert!(invalidates(&Method::POST, StatusCode::CREATED));
        assert!(invalidates(&Method::DELETE, StatusCode::NO_CONTENT));
        assert!(!invalidates(&Method::POST, StatusCode::UNPROCESSABLE_ENTITY));
        assert!(!invalidates(&Method::GET, StatusCode::OK));
    }

    #[test]
    fn if_none_match_compares_weakly_and_wins_over_if_modified_since() {
        let answer = headers(&[("etag", "\"v1\""), ("last-modified", "Sun, 01 Nov 2026 00:00:00 GMT")]);
        let ok = StatusCode::OK;
        assert!(not_modified(&headers(&[("if-none-match", "\"v0\", W/\"v1\"")]), ok, &answer));
        assert!(not_modified(&headers(&[("if-none-match", "*")]), ok, &answer));
        assert!(!not_modified(&headers(&[("if-none-match", "\"v2\"")]), ok, &answer));
        let later = "Mon, 02 Nov 2026 00:00:00 GMT";
        assert!(not_modified(&headers(&[("if-modified-since", later)]), ok, &answer));
        assert!(
            !not_modified(
                &headers(&[("if-none-match", "\"v2\""), ("if-modified-since", later)]),
                ok,
                &answer
            ),
            "If-None-Match decides when present"
        );
        assert!(!not_modified(
            &headers(&[("if-modified-since", "Sat, 31 Oct 2026 00:00:00 GMT")]),
            ok,
            &answer
        ));
        assert!(!not_modified(&headers(&[("if-none-match", "\"v1\"")]), StatusCode::NOT_FOUND, &answer));
        assert!(!not_modified(&HeaderMap::new(), ok, &answer));
    }

    #[test]
    fn validators_are_taken_off_the_request() {
        let mut request = headers(&[("if-none-match", "\"v1\""), ("accept", "*/*")]);
        let taken = take_validators(&mut request);
        assert_eq!(taken.len(), 1);
        assert_eq!(request.len(), 1);
    }
}
