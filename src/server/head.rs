//! The checks an HTTP/1 request head passes before hyper parses it.
//!
//! hyper answers a head it cannot parse with a bare status and no body. We
//! parse each head first with the same parser (httparse), so that every
//! refusal is the documented answer, and we refuse what hyper would accept but a
//! proxy should not (RFC 9112 §6.1 and §3.2):
//! - `Content-Length` together with `Transfer-Encoding`, the classic request
//!   smuggling vector (hyper would follow `Transfer-Encoding`);
//! - `chunked` applied twice, `Transfer-Encoding` in HTTP/1.0, differing
//!   `Content-Length` values;
//! - a missing or repeated `Host` in HTTP/1.1;
//! - a body on CONNECT.

use std::mem::MaybeUninit;

use http::Uri;

use crate::error::ProxyError;

/// Header lines a head may have: hyper's default, enforced with a 431.
pub const MAX_HEADERS: usize = 100;
/// hyper refuses longer request targets (it keeps their length in a u16).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// How the message after a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body: the next byte starts the next head.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// CONNECT: what follows is the tunnel (or nothing: a refused CONNECT
    /// closes the connection).
    Tunnel,
}

/// Checks one complete head (ending with its empty line) and says how its
/// body is framed.
pub fn check(bytes: &[u8]) -> Result<Body, ProxyError> {
    // Uninitialised: httparse fills only the lines the head has, instead
    // of every request zeroing 100 slots (3.2 KiB) first.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(bytes, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::TooManyHeaders { limit: MAX_HEADERS });
        }
        Err(error) => return Err(bad(&format!("malformed request head: {}", describe(error)))),
    }
    let target = request.path.unwrap_or_default();
    if target.len() > MAX_TARGET {
        return Err(ProxyError::UriTooLong { limit: MAX_TARGET });
    }
    if !plainly_valid(target)
        && let Err(error) = Uri::try_from(target)
    {
        return Err(bad(&format!("invalid request target: {error}")));
    }
    let http_11 = request.version == Some(1);
    let hosts = request.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).count();
    if hosts > 1 || (http_11 && hosts == 0) {
        return Err(bad("an HTTP/1.1 request needs exactly one Host header"));
    }
    let body = framing(request.headers, http_11)?;
    if request.method == Some("CONNECT") {
        return match body {
            Body::Empty => Ok(Body::Tunnel),
            _ => Err(bad("CONNECT must not have a body")),
        };
    }
    Ok(body)
}

/// Whether `target` is an origin-form target made only of characters that
/// `Uri` accepts anywhere in a path or a query: nearly every target is,
/// and those skip `Uri`'s parse, a copy and an allocation per request
/// (hyper parses the target again anyway). Every other target is `Uri`'s
/// to judge.
fn plainly_valid(target: &str) -> bool {
    target.starts_with('/')
        && target.bytes().all(|b| {
            matches!(b,
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
                | b'-' | b'.' | b'_' | b'~' | b'/' | b'?' | b'=' | b'&' | b'%' | b'+'
                | b':' | b'@' | b',' | b';' | b'!' | b'$' | b'\'' | b'(' | b')' | b'*')
        })
}

/// The error for a head that is still incomplete at `limit` bytes: the
/// request line alone is too long (414) or the whole head is (431).
pub fn too_large(start: &[u8], limit: usize) -> ProxyError {
    let line_ends = start.iter().take(limit).any(|b| *b == b'\n');
    if line_ends { ProxyError::HeadersTooLarge { limit } } else { ProxyError::UriTooLong { limit } }
}

/// Body framing from `Content-Length` and `Transfer-Encoding` (RFC 9112 §6).
fn framing(headers: &[httparse::Header<'_>], http_11: bool) -> Result<Body, ProxyError> {
    let mut length = None;
    let mut transfer_encoding = false;
    let mut chunked = 0;
    let mut last_chunked = false;
    let mut other_coding = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = content_length(header.value).ok_or_else(|| bad("invalid Content-Length"))?;
            if length.is_some_and(|seen| seen != value) {
                return Err(bad("differing Content-Length values"));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            for coding in header.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                last_chunked = coding.eq_ignore_ascii_case(b"chunked");
                chunked += usize::from(last_chunked);
                other_coding |= !last_chunked;
            }
        }
    }
    if !transfer_encoding {
        return Ok(length.filter(|n| *n > 0).map_or(Body::Empty, Body::Length));
    }
    if !http_11 {
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding (refused: request smuggling)"));
    }
    if !last_chunked || chunked > 1 {
        return Err(bad("Transfer-Encoding must end with chunked, applied once"));
    }
    if other_coding {
        // hyper would undo the chunked coding only, and the body would go on
        // still coded, with nothing left to say so (RFC 9112 §6.1: 501).
        return Err(ProxyError::NotImplemented("no transfer coding but chunked is supported".into()));
    }
    Ok(Body::Chunked)
}

/// ASCII digits only, as hyper reads it; lengths hyper cannot represent
/// (the top two u64 values) are refused like overflow.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse::<u64>().ok().filter(|n| *n < u64::MAX - 1)
}

fn describe(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "invalid request line",
    }
}

fn bad(message: &str) -> ProxyError {
    ProxyError::BadRequest(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(head: &str) -> Result<Body, &'static str> {
        check(head.as_bytes()).map_err(|e| e.code())
    }

    #[test]
    fn framing_of_ordinary_heads() {
        assert_eq!(code("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Body::Empty));
        assert_eq!(code("GET / HTTP/1.0\r\n\r\n"), Ok(Body::Empty));
        assert_eq!(code("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"), Ok(Body::Empty));
        assert_eq!(code("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"), Ok(Body::Length(5)));
        assert_eq!(
            code("POST /x HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            code("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        for coding in ["gzip, chunked", "gzip\r\nTransfer-Encoding: chunked", "identity, chunked"] {
            let head = format!("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert_eq!(code(&head), Err("not_implemented"), "{coding}");
        }
        assert_eq!(code("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"), Ok(Body::Tunnel));
        assert_eq!(code("GET http://a/x HTTP/1.1\nHost: a\n\n"), Ok(Body::Empty));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for head in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert_eq!(code(head), Err("bad_request"), "{head:?}");
        }
    }

    #[test]
    fn malformed_heads_are_bad_requests() {
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://[::1/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\rHost: a\r\n\r\n",
        ] {
            assert_eq!(code(head), Err("bad_request"), "{head:?}");
        }
    }

    #[test]
    fn targets_uri_refuses_are_still_refused() {
        for target in ["/a<b", "/a`b", "/a^b?c<d"] {
            assert!(!plainly_valid(target), "{target}");
            assert_eq!(
                code(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n")),
                Err("bad_request"),
                "{target}"
            );
        }
        assert!(plainly_valid("/v1/chat/completions?model=gpt-4o&x=%20(1)"));
    }

    proptest::proptest! {
        #[test]
        fn a_plainly_valid_target_is_one_uri_accepts(target in "/[a-zA-Z0-9._~/?=&%+:@,;!$'()*-]{0,40}") {
            proptest::prop_assert!(plainly_valid(&target));
            proptest::prop_assert!(Uri::try_from(target.as_str()).is_ok(), "{}", target);
        }
    }

    #[test]
    fn limits() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(code(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err("headers_too_large"));
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_TARGET));
        assert_eq!(code(&long), Err("uri_too_long"));
        assert_eq!(too_large(b"GET /aaaa", 8).code(), "uri_too_long");
        assert_eq!(too_large(b"GET / HTTP/1.1\r\nX: aaaaaaa", 20).code(), "headers_too_large");
    }
}
