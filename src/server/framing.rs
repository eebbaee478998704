//! Follows the HTTP/1 messages a client sends on one connection, so that each
//! request head is checked ([`super::head`]) before hyper sees it.
//!
//! Bytes go on unchanged and in order; only a head is held back until it is
//! complete and checked. Bodies are followed by their framing
//! (`Content-Length` or chunked) to find where the next head starts. What
//! is not HTTP/1 is passed on unchecked ("opaque"): an HTTP/2 connection, a
//! CONNECT tunnel. A chunked body we cannot follow (a chunk-size line over
//! 4 096 bytes, which hyper would still accept, a trailer section over the
//! head limit, a malformed size or line end) is refused instead: passing it
//! on would leave every later head on the connection unchecked. Its request
//! is already with hyper, so the refusal is the body's ([`Framing::broken`]):
//! its reader fails, the request is answered 400 and the connection closed.

use bytes::BytesMut;

use super::head::{self, Body};
use crate::error::ProxyError;

/// How an HTTP/2 connection with prior knowledge starts.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A chunk-size line (extensions included) longer than this is not followed.
const MAX_CHUNK_LINE: usize = 4096;

/// Where one client connection's byte stream is.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// The head being collected (or the first bytes, while sniffing).
    held: BytesMut,
    /// Request heads (request line and headers) larger than this are refused.
    limit: usize,
    /// A CR before a request line went on; the next byte must be its LF.
    cr_pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// First bytes: the HTTP/2 preface or an HTTP/1 head.
    Sniff,
    /// Collecting a head in `held`.
    Head,
    /// This many body bytes left.
    Body(u64),
    /// Hex digits of a chunk size.
    ChunkSize {
        digits: u8,
        size: u64,
    },
    /// Spaces or tabs after the size, or a chunk extension after `;`, up to
    /// the CR that ends the size line; `len` bytes of it so far.
    ChunkExt {
        len: usize,
        size: u64,
        /// After a `;`: anything but CR or LF; before it, only spaces and tabs.
        extension: bool,
    },
    /// The LF after the size line's CR.
    SizeLf {
        size: u64,
    },
    ChunkData(u64),
    /// The line end after a chunk's data; `cr` once its CR was seen.
    ChunkEnd {
        cr: bool,
    },
    /// The trailer section after the last chunk: lines ending in CRLF, up
    /// to an empty one. `fresh` at the start of a line, `cr` once a CR was
    /// seen (the next byte must be LF), `total` bytes in all.
    Trailer {
        fresh: bool,
        cr: bool,
        total: usize,
    },
    /// No more checks (see the module doc).
    Opaque,
    /// A head was refused; nothing more goes on.
    Refused,
    /// A chunked body could not be followed; nothing more goes on.
    Broken,
}

impl Framing {
    pub fn new(limit: usize) -> Self {
        Self { state: State::Sniff, held: BytesMut::new(), limit, cr_pending: false }
    }

    /// Whether the last refusal was of a body whose head hyper already has
    /// (rather than of a head).
    pub fn broken(&self) -> bool {
        self.state == State::Broken
    }

    /// Whether part of a head has been received but not passed on yet.
    pub fn collecting(&self) -> bool {
        matches!(self.state, State::Sniff | State::Head) && !self.held.is_empty()
    }

    /// Takes `input` and appends to `out` what may go to hyper now. On a
    /// refused head, everything before it is in `out` and nothing after it
    /// ever will be.
    pub fn push(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), ProxyError> {
        while !input.is_empty() {
            let used = match self.state {
                State::Sniff => self.sniff(input, out)?,
                State::Head => self.head(input, out)?,
                State::Body(left) => {
                    let n = left.min(input.len() as u64);
                    self.state = if n == left { State::Head } else { State::Body(left - n) };
                    out.extend_from_slice(&input[..n as usize]);
                    n as usize
                }
                State::Opaque => {
                    out.extend_from_slice(input);
                    input.len()
                }
                State::Refused | State::Broken => input.len(),
                _ => {
                    let (n, broken) = self.chunked(input);
                    out.extend_from_slice(&input[..n]);
                    if let Some(error) = broken {
                        return Err(error);
                    }
                    n
                }
            };
            input = &input[used..];
        }
        Ok(())
    }

    fn sniff(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, ProxyError> {
        let take = (PREFACE.len() - self.held.len()).min(input.len());
        self.held.extend_from_slice(&input[..take]);
        if !PREFACE.starts_with(&self.held) {
            // HTTP/1: the sniffed bytes start a head.
            self.state = State::Head;
            let sniffed = std::mem::take(&mut self.held);
            if sniffed.len() == take {
                // All of them are in `input`: read it again, as a head.
                return Ok(0);
            }
            // The state is no longer Sniff, so this recursion is one level deep.
            self.push(&sniffed, out)?;
        } else if self.held.len() == PREFACE.len() {
            out.extend_from_slice(&self.held.split());
            self.state = State::Opaque;
        }
        Ok(take)
    }

    fn head(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, ProxyError> {
        let mut start = 0;
        if self.held.is_empty() {
            let skipped = self.empty_lines(input);
            // Whatever was skipped goes on, as it would have in a read of its own.
            out.extend_from_slice(&input[..skipped.unwrap_or_else(|at| at)]);
            let Ok(skipped) = skipped else {
                let error = ProxyError::BadRequest("a CR without its LF before the request line".into());
                return Err(self.refuse(error));
            };
            start = skipped;
        }
        let rest = &input[start..];
        let room = self.limit.saturating_sub(self.held.len());
        // The head ends at its first empty line: it starts with a non-empty
        // request line, so "\n\n" or "\n\r\n" can only be that. Only the
        // line ends are looked at, found many bytes at a time.
        let held = &self.held;
        // The byte `back` places before `rest[i]`, held bytes included.
        let before = |i: usize, back: usize| match i.checked_sub(back) {
            Some(j) => Some(rest[j]),
            None => (held.len() + i).checked_sub(back).map(|j| held[j]),
        };
        let end = memchr::memchr_iter(b'\n', rest).find(|&i| match before(i, 1) {
            Some(b'\n') => true,
            Some(b'\r') => before(i, 2) == Some(b'\n'),
            _ => false,
        });
        let Some(end) = end.map(|i| i + 1) else {
            if rest.len() > room {
                return Err(self.refuse_too_large(&rest[..room]));
            }
            self.held.extend_from_slice(rest);
            return Ok(input.len());
        };
        if end > room {
            return Err(self.refuse_too_large(&rest[..room]));
        }
        let checked = if self.held.is_empty() {
            // The whole head came in one read, as nearly every head does:
            // checked where it is, copied once.
            let head = &rest[..end];
            head::check(head).inspect(|_| out.extend_from_slice(head))
        } else {
            self.held.extend_from_slice(&rest[..end]);
            let head = std::mem::take(&mut self.held);
            head::check(&head).inspect(|_| out.extend_from_slice(&head))
        };
        match checked {
            Ok(body) => {
                self.state = match body {
                    Body::Empty => State::Head,
                    Body::Length(n) => State::Body(n),
                    Body::Chunked => State::ChunkSize { digits: 0, size: 0 },
                    Body::Tunnel => State::Opaque,
                };
                Ok(start + end)
            }
            Err(error) => Err(self.refuse(error)),
        }
    }

    /// How many bytes at the start of `input` are empty lines, which hyper
    /// skips before a request line (RFC 9112 §2.2) as httparse does: CRLF or
    /// a bare LF. `Err` for a CR followed by anything but LF, which hyper
    /// would answer with a bare 400 of its own, with how many bytes came
    /// before that byte.
    fn empty_lines(&mut self, input: &[u8]) -> Result<usize, usize> {
        let mut skipped = 0;
        for &byte in input {
            match (self.cr_pending, byte) {
                (true, b'\n') => self.cr_pending = false,
                (true, _) => return Err(skipped),
                (false, b'\r') => self.cr_pending = true,
                (false, b'\n') => {}
                (false, _) => break,
            }
            skipped += 1;
        }
        Ok(skipped)
    }

    fn refuse_too_large(&mut self, more: &[u8]) -> ProxyError {
        self.held.extend_from_slice(more);
        let error = head::too_large(&self.held, self.limit);
        self.refuse(error)
    }

    fn refuse(&mut self, error: ProxyError) -> ProxyError {
        self.state = State::Refused;
        self.held = BytesMut::new();
        error
    }

    /// Follows a chunked body; returns how many bytes of `input` belong to
    /// it and may go on, and the refusal when it cannot be followed (the
    /// byte that broke it does not go on).
    fn chunked(&mut self, input: &[u8]) -> (usize, Option<ProxyError>) {
        let mut used = 0;
        while used < input.len() {
            if let State::ChunkData(left) = self.state {
                let n = left.min((input.len() - used) as u64);
                used += n as usize;
                self.state =
                    if n == left { State::ChunkEnd { cr: false } } else { State::ChunkData(left - n) };
                continue;
            }
            let next = self.chunk_byte(input[used]);
            if next == State::Broken {
                let error = ProxyError::BadRequest(self.why_broken());
                self.state = State::Broken;
                self.held = BytesMut::new();
                return (used, Some(error));
            }
            self.state = next;
            used += 1;
            if self.state == State::Head {
                break;
            }
        }
        (used, None)
    }

    /// Why the chunked framing cannot be followed in the current state.
    fn why_broken(&self) -> String {
        match self.state {
            State::ChunkExt { len, .. } if len >= MAX_CHUNK_LINE => {
                format!("a chunk-size line is longer than {MAX_CHUNK_LINE} bytes")
            }
            State::Trailer { total, .. } if total >= self.limit => {
                format!("the chunked trailer section is larger than {} bytes", self.limit)
            }
            _ => "malformed chunked framing".to_string(),
        }
    }

    /// The state after one byte of chunked framing (outside chunk data);
    /// [`State::Broken`] when it cannot be followed.
    ///
    /// The grammar is hyper's own, byte for byte (its `ChunkedState`): every
    /// line ends in CRLF, a bare LF is refused, and the trailer section ends
    /// only at CRLF CRLF. Whatever hyper would take as body, this takes as
    /// body too, so the two can never disagree on where the next head starts;
    /// where this is stricter (a line over 4 096 bytes), it refuses.
    fn chunk_byte(&self, byte: u8) -> State {
        let size_line = |len: usize, size: u64, extension: bool| match byte {
            b'\r' => State::SizeLf { size },
            b'\t' | b' ' if !extension => State::ChunkExt { len: len + 1, size, extension },
            b';' if !extension => State::ChunkExt { len: len + 1, size, extension: true },
            b'\n' => State::Broken,
            _ if extension => State::ChunkExt { len: len + 1, size, extension },
            _ => State::Broken,
        };
        match self.state {
            State::ChunkSize { digits, size } => match char::from(byte).to_digit(16) {
                // 16 hex digits fill a u64: more would overflow.
                Some(digit) if digits < 16 => {
                    State::ChunkSize { digits: digits + 1, size: (size << 4) | u64::from(digit) }
                }
                _ if digits == 0 => State::Broken,
                None => size_line(usize::from(digits), size, false),
                Some(_) => State::Broken,
            },
            State::ChunkExt { len, .. } if len >= MAX_CHUNK_LINE => State::Broken,
            State::ChunkExt { len, size, extension } => size_line(len, size, extension),
            State::SizeLf { size: 0 } if byte == b'\n' => State::Trailer { fresh: true, cr: false, total: 0 },
            State::SizeLf { size } if byte == b'\n' => State::ChunkData(size),
            State::ChunkEnd { cr: false } if byte == b'\r' => State::ChunkEnd { cr: true },
            State::ChunkEnd { cr: true } if byte == b'\n' => State::ChunkSize { digits: 0, size: 0 },
            State::Trailer { total, .. } if total >= self.limit => State::Broken,
            State::Trailer { fresh: true, cr: true, .. } if byte == b'\n' => State::Head,
            State::Trailer { cr: true, total, .. } if byte == b'\n' => {
                State::Trailer { fresh: true, cr: false, total: total + 1 }
            }
            State::Trailer { fresh, cr: false, total } if byte == b'\r' => {
                State::Trailer { fresh, cr: true, total: total + 1 }
            }
            // Even a bare LF: hyper takes it as part of a trailer line.
            State::Trailer { cr: false, total, .. } => {
                State::Trailer { fresh: false, cr: false, total: total + 1 }
            }
            _ => State::Broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 4096;

    /// Feeds `input` in pieces cut at `cuts`; returns what went on and the
    /// refusal's code, if any.
    fn feed(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<&'static str>) {
        let mut framing = Framing::new(LIMIT);
        let mut out = BytesMut::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts.into_iter().chain([input.len()]) {
            if let Err(error) = framing.push(&input[at..cut.max(at)], &mut out) {
                return (out.to_vec(), Some(error.code()));
            }
            at = cut.max(at);
        }
        (out.to_vec(), None)
    }

    #[test]
    fn pipelined_requests_pass_and_a_bad_head_stops_the_stream() {
        let good = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(feed(good, &[]), (good.to_vec(), None));
        let bad =
            [&good[..], b"GET /c HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\nGET /d HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(feed(&bad, &[3, 60]), (good.to_vec(), Some("bad_request")));
    }

    #[test]
    fn chunked_bodies_are_followed_to_the_next_head() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n\
                      GET /next HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let (out, refused) = feed(input, &[70, 71, 90]);
        assert_eq!(refused, Some("bad_request"), "the smuggling head after the body was seen");
        assert!(input.starts_with(&out) && out.ends_with(b"X-Trailer: t\r\n\r\n"));
    }

    #[test]
    fn a_chunked_body_that_cannot_be_followed_is_refused_not_passed_on() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let rest: &[u8] = b"\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        let long_line = [head, b"5;", &vec![b'e'; 5000], rest].concat();
        let bad_size = [head, b"5x\r\nhello", rest].concat();
        for (input, why) in [(&long_line, "a chunk-size line is longer"), (&bad_size, "malformed chunked")] {
            let mut framing = Framing::new(LIMIT);
            let mut out = BytesMut::new();
            let error = framing.push(input, &mut out).expect_err("refused");
            assert_eq!(error.code(), "bad_request");
            assert!(error.to_string().starts_with(why), "{error}");
            assert!(framing.broken(), "the refusal is the body's");
            assert!(out.len() <= head.len() + MAX_CHUNK_LINE + 1, "{} bytes went on", out.len());
            assert!(input.starts_with(&out));
            assert_eq!(framing.push(b"GET / HTTP/1.1\r\n\r\n", &mut out).map_err(|e| e.code()), Ok(()));
            assert!(input.starts_with(&out), "nothing goes on after the refusal");
        }
        let (_, refused) = feed(&long_line, &[100, 3000, 5000]);
        assert_eq!(refused, Some("bad_request"), "however the bytes arrive");
    }

    /// hyper ends a chunked body only where every line ends in CRLF and the
    /// trailers end at CRLF CRLF; following a bare LF as a line end would let
    /// a head hyper reads as trailers (or body) hide one hyper serves.
    #[test]
    fn chunked_line_ends_are_hypers() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let smuggled: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        let cover =
            format!("\nPOST /cover HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", smuggled.len());
        // A bare LF after the last chunk starts a trailer line, as for hyper:
        // the cover head is trailers, the smuggled head after them is checked.
        let trailer_lf = [head, b"5\r\nhello\r\n0\r\n", cover.as_bytes(), smuggled].concat();
        let (out, refused) = feed(&trailer_lf, &[]);
        assert_eq!(refused, Some("bad_request"), "the head after the trailers was checked");
        assert_eq!(out.len(), trailer_lf.len() - smuggled.len(), "everything up to it went on");
        for cuts in [&[70, 71, 72][..], &[head.len() + 13, head.len() + 14]] {
            assert_eq!(feed(&trailer_lf, cuts), (out.clone(), refused), "cut at {cuts:?}");
        }
        // Bare LFs that hyper refuses are refused as the body's.
        for body in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5;x\nhello\r\n0\r\n\r\n",
            b"5 \nhello\r\n0\r\n\r\n",
            b"0\n\r\n",
            b"0\r\n\r\r",
            b"0\r\nX: 1\r\r\n\r\n",
            b"5\rx",
        ] {
            let input = [head, body].concat();
            let mut framing = Framing::new(LIMIT);
            let mut out = BytesMut::new();
            let error = framing.push(&input, &mut out).expect_err(&String::from_utf8_lossy(body));
            assert_eq!(error.code(), "bad_request");
            assert!(framing.broken(), "the refusal is the body's");
        }
        // CRLF everywhere, spaces and an extension after the size: followed.
        let good =
            [head, b"5 \t;a=b c\r\nhello\r\n0\r\nX: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
        assert_eq!(feed(&good, &[]), (good.clone(), None));
    }

    #[test]
    fn empty_lines_before_a_head_are_skipped_as_hyper_does() {
        let get: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let crlf_and_lf = [b"\r\n\n\r\n".as_slice(), get].concat();
        assert_eq!(feed(&crlf_and_lf, &[]), (crlf_and_lf.clone(), None));
        assert_eq!(feed(&crlf_and_lf, &[1, 3]), (crlf_and_lf.clone(), None), "a CRLF split between reads");
        // A CR alone: hyper would answer it with a bare 400; this is pacegate's.
        let lone_cr = [b"\r".as_slice(), get].concat();
        assert_eq!(feed(&lone_cr, &[]).1, Some("bad_request"));
        assert_eq!(feed(&lone_cr, &[1]).1, Some("bad_request"), "the CR in a read of its own");
    }

    #[test]
    fn heads_over_the_limit_are_refused_early() {
        let long_line = [b"GET /".as_slice(), &vec![b'a'; LIMIT]].concat();
        assert_eq!(feed(&long_line, &[10]).1, Some("uri_too_long"));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; LIMIT]].concat();
        assert_eq!(feed(&big, &[]).1, Some("headers_too_large"));
    }

    #[test]
    fn http2_and_tunnels_are_opaque() {
        let h2 = [PREFACE, b"\x00\x00\x00\x04garbage\r\n\r\n"].concat();
        assert_eq!(feed(&h2, &[5]), (h2.clone(), None));
        let tunnel = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01 not http\n\n".to_vec();
        assert_eq!(feed(&tunnel, &[]), (tunnel.clone(), None));
    }

    /// One well-formed request, with a body framed one way or another.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let body = proptest::collection::vec(any::<u8>(), 0..64);
        let chunks = proptest::collection::vec((1usize..40, any::<bool>()), 0..4);
        (
            prop::sample::select(vec!["GET", "POST", "PUT"]),
            "/[a-z0-9/?=&]{0,12}",
            "[ -~]{0,20}",
            body,
            chunks,
            0u8..3,
        )
            .prop_map(|(method, path, value, body, chunks, kind)| {
                let mut out =
                    format!("{method} {path} HTTP/1.1\r\nHost: a\r\nX-V: {}\r\n", value.trim()).into_bytes();
                match kind {
                    0 => out.extend_from_slice(b"\r\n"),
                    1 => {
                        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                        out.extend_from_slice(&body);
                    }
                    _ => {
                        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        for (len, ext) in chunks {
                            let ext = if ext { ";name=value" } else { "" };
                            out.extend_from_slice(format!("{len:x}{ext}\r\n").as_bytes());
                            out.extend(std::iter::repeat_n(b'z', len));
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"0\r\nX-T: 1\r\n\r\n");
                    }
                }
                out
            })
    }

    proptest! {
        #[test]
        fn valid_request_streams_pass_unchanged(
            requests in proptest::collection::vec(request(), 1..5),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let input = requests.concat();
            prop_assert_eq!(feed(&input, &cuts), (input.clone(), None));
        }

        #[test]
        fn how_bytes_arrive_does_not_matter(
            input in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let (whole, refused) = feed(&input, &[]);
            prop_assert!(input.starts_with(&whole), "bytes went on changed or out of order");
            let (pieces, refused_in_pieces) = feed(&input, &cuts);
            prop_assert_eq!(whole, pieces);
            prop_assert_eq!(refused, refused_in_pieces);
        }

        #[test]
        fn content_length_with_transfer_encoding_is_always_refused(
            before in proptest::collection::vec(request(), 0..3),
            length in 0u32..100,
        ) {
            let smuggler = format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            );
            let input = [before.concat(), smuggler.into_bytes()].concat();
            let (out, refused) = feed(&input, &[]);
            prop_assert_eq!(refused, Some("bad_request"));
            prop_assert_eq!(out, before.concat());
        }
    }
}
