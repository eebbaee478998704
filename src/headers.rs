//! Hop-by-hop header handling (RFC 9110 §7.6.1).
//!
//! A proxy must not forward headers that describe only the connection it
//! received them on: the fixed list below, plus every name the `Connection`
//! header lists. Our own `x-pacegate-*` request headers are instructions to
//! pacegate and are removed too; in an upstream's answer, they would pass for
//! pacegate's word, and are removed as well.
//!
//! A module of its own, below both users: [`crate::proxy`] cleans requests
//! with it and [`crate::upstream`] cleans answers.

use http::header::{self, Entry, HeaderName};
use http::{HeaderMap, HeaderValue, Version};

/// Headers that are always connection-specific, with the non-standard
/// `Proxy-Connection` that clients configured for a proxy send. Not
/// `Trailer`: it announces the trailer fields of this message end to end,
/// and an HTTP/1.1 answer sends only the trailers it announces. Matched as
/// strings: one length check and a compare, where comparing `HeaderName`s
/// of a `const` array cost a thousand instructions per request once the
/// compiler stopped inlining it (callgrind, see BENCHMARKS.md). `name` is
/// in lower case.
fn is_fixed(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Prefix of the request headers that steer pacegate itself.
const OWN_PREFIX: &str = "x-pacegate-";

/// Adds pacegate to the request's `Via`, after any proxies before it (RFC
/// 9110 §7.6.3 asks it of proxies): the protocol `version` it received the
/// request with, and its name.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    // Constants: `from_static` checks its bytes where it runs, and this runs
    // on every request.
    const VIA_09: HeaderValue = HeaderValue::from_static("0.9 pacegate");
    const VIA_10: HeaderValue = HeaderValue::from_static("1.0 pacegate");
    const VIA_11: HeaderValue = HeaderValue::from_static("1.1 pacegate");
    const VIA_2: HeaderValue = HeaderValue::from_static("2 pacegate");
    const VIA_3: HeaderValue = HeaderValue::from_static("3 pacegate");
    let via = match version {
        Version::HTTP_09 => VIA_09,
        Version::HTTP_10 => VIA_10,
        Version::HTTP_2 => VIA_2,
        Version::HTTP_3 => VIA_3,
        _ => VIA_11,
    };
    headers.append(header::VIA, via);
}

/// Which way a head goes, for what is hop-by-hop on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// To the upstream: its `Trailer` goes too, since pacegate forwards no
    /// request trailer fields.
    Request,
    /// To the caller: its trailers pass, `Trailer` announcing them.
    Answer,
}

/// Whether `name` goes on no head going `way`: hop-by-hop, or `x-pacegate-*`
/// (instructions to pacegate on a request, on an answer a claim to be its word).
fn goes_not(name: &HeaderName, way: Way) -> bool {
    // The name's text once: for a standard name, `as_str` is a table lookup.
    let name = name.as_str();
    is_fixed(name) || name.starts_with(OWN_PREFIX) || (way == Way::Request && name == "trailer")
}

/// Removes hop-by-hop headers, including those named by `Connection`, and
/// `x-pacegate-*` ones ([`goes_not`]).
///
/// Runs on every request and every answer, so it looks before it removes:
/// one pass over the few names a head carries, where removing each of the
/// nine names blindly is a hash lookup apiece; most heads carry none of
/// them, or only `Connection`, and then nothing else is looked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, way: Way) {
    let (mut connection, mut others) = (false, false);
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if goes_not(name, way) {
            others = true;
        }
    }
    if connection && let Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
        let (_, mut values) = connection.remove_entry_mult();
        // Nearly every head has one `Connection`: that one needs no Vec.
        let first = values.next();
        let rest: Vec<HeaderValue> = values.collect();
        for value in first.iter().chain(&rest) {
            // Nearly always `keep-alive`, a fixed name (see below): nothing to split.
            if value.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            // Read as bytes: one byte that is not text must not keep the
            // other names the line lists (such a name matches no header).
            for name in value.as_bytes().split(|b| *b == b',') {
                // "keep-alive" and the like go below with the other fixed
                // names anyway: removing each here too cost a parse and a
                // hash (a name in upper case is still removed here). A name
                // that is not a valid header name matches nothing.
                if let Ok(name) = std::str::from_utf8(name.trim_ascii())
                    && !is_fixed(name)
                {
                    headers.remove(name);
                }
            }
        }
    }
    if !others {
        return;
    }
    while let Some(name) = headers.keys().find(|name| goes_not(name, way)).cloned() {
        headers.remove(name);
    }
}

/// Joins several `Cookie` fields into one, with `; ` (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    // Looked up before the entry: `entry` may grow the map.
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let Entry::Occupied(cookies) = headers.entry(header::COOKIE) else { return };
    let mut joined = Vec::new();
    for value in cookies.iter() {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Parts of valid values, joined by "; ": valid too.
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, joined);
    }
}

/// Whether a head carries any of pacegate's own request headers.
pub fn has_own(headers: &HeaderMap) -> bool {
    headers.keys().any(is_own)
}

fn is_own(name: &HeaderName) -> bool {
    name.as_str().starts_with(OWN_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A head with these (distinct) names and values.
    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(name, value)| (HeaderName::from_static(name), HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn strips_fixed_and_connection_listed_names() {
        let mut headers = head(&[
            ("connection", "keep-alive, X-Trace"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("authorization", "token"),
        ]);
        strip_hop_by_hop(&mut headers, Way::Answer);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn listed_names_go_in_any_case_even_when_fixed_too() {
        let mut headers = head(&[
            ("connection", "Keep-Alive, close, upgrade, X-Trace"),
            ("keep-alive", "timeout=5"),
            ("close", "a header named as the option"),
            ("upgrade", "websocket"),
            ("x-trace", "1"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut headers, Way::Answer);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::CONTENT_LENGTH]);
    }

    #[test]
    fn a_connection_line_of_keep_alive_alone_leaves_the_others_listed() {
        let mut headers = head(&[("keep-alive", "timeout=5"), ("x-trace", "1"), ("x-kept", "1")]);
        headers.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-trace"));
        strip_hop_by_hop(&mut headers, Way::Answer);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn a_name_that_is_not_text_does_not_keep_the_others_listed() {
        let mut headers = head(&[("x-secret", "hop"), ("x-kept", "1")]);
        headers.insert(header::CONNECTION, HeaderValue::from_bytes(b"X-Secret, x\xe9").unwrap());
        strip_hop_by_hop(&mut headers, Way::Answer);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn trailer_is_end_to_end_and_via_names_the_version() {
        let mut headers = head(&[("trailer", "x-checksum"), ("te", "trailers")]);
        strip_hop_by_hop(&mut headers, Way::Answer);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["trailer"]);
        // Request trailer fields are not forwarded: nor is their announcement.
        strip_hop_by_hop(&mut headers, Way::Request);
        assert!(headers.is_empty());
        for (version, via) in [
            (Version::HTTP_10, "1.0 pacegate"),
            (Version::HTTP_11, "1.1 pacegate"),
            (Version::HTTP_2, "2 pacegate"),
        ] {
            let mut headers = head(&[("via", "1.1 earlier")]);
            add_via(&mut headers, version);
            assert_eq!(headers.get_all(header::VIA).iter().collect::<Vec<_>>(), ["1.1 earlier", via]);
        }
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut headers = head(&[("cookie", "a=1")]);
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut one = head(&[("cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(one.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1"]);
    }

    #[test]
    fn strips_own_headers_only() {
        let mut headers =
            head(&[("x-pacegate-max-wait", "5s"), ("x-pacegate-priority", "high"), ("x-other", "1")]);
        assert!(has_own(&headers));
        strip_hop_by_hop(&mut headers, Way::Request);
        assert_eq!(headers.len(), 1);
        assert!(!has_own(&headers));
    }

    proptest! {
        #[test]
        fn never_panics_and_removes_every_listed_name(names in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 0..6)) {
            let mut headers = HeaderMap::new();
            for name in &names {
                headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("v"));
            }
            let listed = names.join(" , ");
            if let Ok(value) = HeaderValue::from_str(&listed) {
                headers.insert(header::CONNECTION, value);
            }
            strip_hop_by_hop(&mut headers, Way::Answer);
            for name in &names {
                prop_assert!(!headers.contains_key(name.as_str()));
            }
        }

        #[test]
        fn end_to_end_headers_pass_untouched(
            names in proptest::collection::btree_set("x-[a-z]{1,8}", 0..6),
            listed in proptest::collection::btree_set("x-[a-z]{1,8}", 0..3),
            value in "[ -~]{0,16}",
        ) {
            let value = HeaderValue::from_str(value.trim()).unwrap();
            let mut headers = HeaderMap::new();
            for name in &names {
                headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.clone());
                headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("2"));
            }
            let connection = listed.iter().cloned().collect::<Vec<_>>().join(",");
            headers.insert(header::CONNECTION, HeaderValue::from_str(&connection).unwrap());
            strip_hop_by_hop(&mut headers, Way::Answer);
            for name in &names {
                let kept: Vec<_> = headers.get_all(name.as_str()).iter().cloned().collect();
                if listed.contains(name) {
                    prop_assert!(kept.is_empty(), "{name} is listed in Connection");
                } else {
                    prop_assert_eq!(kept, vec![value.clone(), HeaderValue::from_static("2")]);
                }
            }
            prop_assert_eq!(headers.keys_len(), headers.keys().filter(|n| names.contains(n.as_str())).count());
        }
    }
}
