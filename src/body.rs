//! Body types: what we answer with, and how request bodies are kept for replay.
//!
//! A retry must send the same body again, so bodies up to `max_body_bytes` are
//! buffered once and replayed from memory. A larger body cannot be replayed
//! without unbounded memory, so it is streamed to the upstream exactly once and
//! such a request is never retried. Response bodies are never buffered: they
//! are streamed to the caller frame by frame (server-sent events included).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::{self, Either};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

/// Error type of every body we pass around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every answer and of every request we send upstream.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body made of one buffer.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Largest piece a buffered body is sent in. The upstream client copies
/// each piece into its write buffer (one buffer, one write per message: see
/// `upstream::client`), and only takes the next once that buffer has room:
/// sent whole, a 9 MiB body would be held twice while it goes out.
const SLICE: usize = 64 * 1024;

/// A buffered body sent in [`SLICE`]s of its one buffer (no copy), its
/// length known, so it still goes out with its `Content-Length`.
struct Sliced {
    rest: Bytes,
}

impl Body for Sliced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let len = self.rest.len().min(SLICE);
        let piece = self.rest.split_to(len);
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A request body, ready to be sent one or more times.
pub enum RequestBody {
    /// Fully read; every attempt sends a cheap clone.
    Buffered(Bytes),
    /// Too large to keep: can be sent once, so the request is not retryable.
    /// The flag says whether the caller's side of it failed ([`Failure`]).
    Streaming(Option<ProxyBody>, Arc<AtomicU8>),
}

/// Why a streamed body broke its attempt on the caller's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing arrived for `body_read_timeout`.
    Stalled,
    /// What arrived could not be read (framing refused, connection lost).
    Unreadable,
}

const STALLED: u8 = 1;
const UNREADABLE: u8 = 2;

impl RequestBody {
    /// Whether another attempt can send this body again.
    pub fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for the next attempt; `None` once a streaming body was sent.
    pub fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            Self::Buffered(bytes) if bytes.is_empty() => Some(empty()),
            Self::Buffered(bytes) if bytes.len() <= SLICE => Some(full(bytes.clone())),
            Self::Buffered(bytes) => Some(Sliced { rest: bytes.clone() }.boxed()),
            Self::Streaming(body, _) => body.take(),
        }
    }

    /// Whether this (streamed) body failed on the caller's side, so that
    /// its attempt failed for that reason rather than the upstream's.
    pub fn failure(&self) -> Option<Failure> {
        let Self::Streaming(_, failed) = self else { return None };
        match failed.load(Ordering::Relaxed) {
            STALLED => Some(Failure::Stalled),
            UNREADABLE => Some(Failure::Unreadable),
            _ => None,
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body failed: {0}")]
    Read(#[from] hyper::Error),
    #[error("no byte of the request body arrived for {0:?}")]
    Stalled(Duration),
}

/// What bounds the reading of one request body (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `max_body_bytes`: bodies up to this size are buffered for replay.
    pub buffer: usize,
    /// `max_request_bytes`: larger bodies are refused (413).
    pub hard: Option<u64>,
    /// `body_read_timeout`: a body that sends nothing this long fails.
    pub stall: Duration,
    /// `max_buffered_bytes`: bodies buffered at once, all requests together.
    pub total: usize,
}

/// Reads a body into memory when it fits both `max_body_bytes` and what
/// `budget` has left of `max_buffered_bytes`; otherwise streams it (once,
/// so its request is not retried), keeping what was read.
///
/// `limits.hard` (`max_request_bytes`) is enforced here for buffered bodies
/// and by [`CappedBody`] for streamed ones. A body that sends nothing for
/// `limits.stall` (`body_read_timeout`) fails with [`BodyError::Stalled`]
/// here, or, once streaming, ends its attempt with an error and marks the
/// body [`RequestBody::failure`].
pub fn read(
    body: Incoming,
    limits: BodyLimits,
    budget: &Arc<BufferBudget>,
) -> impl Future<Output = Result<RequestBody, BodyError>> + Send + use<> {
    // A queued request's future is as large as its largest step, so the
    // reading is boxed, and only requests that have a body pay for it.
    if body.is_end_stream() {
        return Either::Left(future::ready(Ok(RequestBody::Buffered(Bytes::new()))));
    }
    Either::Right(Box::pin(read_timed(Timed::new(body, limits.stall), limits, Reservation::new(budget))))
}

async fn read_timed(
    mut body: Timed<Incoming>,
    limits: BodyLimits,
    mut reservation: Reservation,
) -> Result<RequestBody, BodyError> {
    let hint = body.size_hint();
    if let Some(limit) = limits.hard
        && hint.lower() > limit
    {
        return Err(BodyError::TooLarge(limit));
    }
    if hint.lower() > limits.buffer as u64 {
        return Ok(streaming(BytesMut::new(), reservation, body, limits.hard));
    }
    // A known length is reserved at once (at most max_body_bytes, as just checked).
    let exact = hint.exact().map(|len| len as usize);
    if let Some(len) = exact
        && !reservation.grow(len, limits.total)
    {
        return Ok(streaming(BytesMut::new(), reservation, body, limits.hard));
    }
    let mut buffered = BytesMut::with_capacity(exact.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not replayed
        };
        if let Some(limit) = limits.hard
            && (buffered.len() + data.len()) as u64 > limit
        {
            return Err(BodyError::TooLarge(limit));
        }
        // What a growing buffer costs is its capacity, which doubles, not
        // its length: an unknown length is accounted by capacity.
        let capacity = buffered.capacity();
        buffered.reserve(data.len());
        let grown = buffered.capacity() - capacity;
        let fits = exact.is_some() || reservation.grow(grown, limits.total);
        buffered.extend_from_slice(&data);
        if !fits || buffered.len() > limits.buffer {
            return Ok(streaming(buffered, reservation, body, limits.hard));
        }
    }
    Ok(RequestBody::Buffered(reservation.hold(buffered)))
}

fn streaming(
    head: BytesMut,
    reservation: Reservation,
    rest: Timed<Incoming>,
    hard_limit: Option<u64>,
) -> RequestBody {
    let sent = head.len() as u64;
    let head = (!head.is_empty()).then(|| reservation.hold(head));
    let failed = rest.failed.clone();
    let capped = CappedBody { head, rest, sent, limit: hard_limit };
    RequestBody::Streaming(Some(capped.boxed()), failed)
}

/// Request body bytes buffered now, all requests together, so that
/// `max_buffered_bytes` bounds them (150 connections sending just under
/// `max_body_bytes` each would otherwise hold 1.5 GB).
#[derive(Debug, Default)]
pub struct BufferBudget {
    used: AtomicUsize,
}

impl BufferBudget {
    /// Bytes buffered now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes one body took from its [`BufferBudget`], given back when dropped:
/// by then the buffer they account for is gone (see [`Reservation::hold`]).
#[derive(Debug)]
struct Reservation {
    budget: Arc<BufferBudget>,
    bytes: usize,
}

impl Reservation {
    fn new(budget: &Arc<BufferBudget>) -> Self {
        Self { budget: budget.clone(), bytes: 0 }
    }

    /// Takes `more` bytes if the budget stays within `limit`.
    fn grow(&mut self, more: usize, limit: usize) -> bool {
        let taken = self.budget.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(more).filter(|after| *after <= limit)
        });
        if taken.is_ok() {
            self.bytes += more;
        }
        taken.is_ok()
    }

    /// The buffer as `Bytes` that keep this reservation until their last
    /// clone is gone (an attempt's body still being written included).
    fn hold(self, buffer: BytesMut) -> Bytes {
        if self.bytes == 0 {
            return buffer.freeze();
        }
        Bytes::from_owner(Held { buffer, _reservation: self })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A buffer and the reservation that accounts for it.
struct Held {
    buffer: BytesMut,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyError::Stalled`] once no frame
    /// arrived for `timeout` while one was awaited (nginx's
    /// `client_body_timeout`): a caller that stops sending mid-body must not
    /// hold its connection, its queue place or a concurrency slot for ever.
    struct Timed<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // Armed when a frame is awaited; boxed, and made only then, so a
        // body that arrives with its head costs no timer.
        deadline: Option<Pin<Box<Sleep>>>,
        // Set when the caller's side failed: read by whoever sent the body on.
        failed: Arc<AtomicU8>,
    }
}

impl<B> Timed<B> {
    fn new(inner: B, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: None, failed: Arc::default() }
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // The next wait starts afresh.
                *this.deadline = None;
                if let Some(Err(_)) = &frame {
                    this.failed.store(UNREADABLE, Ordering::Relaxed);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.failed.store(STALLED, Ordering::Relaxed);
                Poll::Ready(Some(Err(BodyError::Stalled(timeout).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Timed<Incoming> {
    /// One frame, with [`BodyError`]s as they are (not boxed).
    async fn frame(&mut self) -> Option<Result<Frame<Bytes>, BodyError>> {
        let frame = BodyExt::frame(self).await?;
        Some(frame.map_err(|error| match error.downcast::<hyper::Error>() {
            Ok(error) => BodyError::Read(*error),
            Err(_) => BodyError::Stalled(self.timeout),
        }))
    }
}

pin_project_lite::pin_project! {
    /// The already-read head of a large body followed by the rest, failing with
    /// [`BodyError::TooLarge`] once more than `limit` bytes went through.
    struct CappedBody<B> {
        head: Option<Bytes>,
        #[pin]
        rest: B,
        sent: u64,
        limit: Option<u64>,
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for CappedBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        loop {
            return match ready!(this.rest.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // No request trailer fields go on, streamed or buffered
                    // alike (a buffered body replays its data only).
                    let Ok(data) = frame.into_data() else { continue };
                    *this.sent += data.len() as u64;
                    if let Some(limit) = *this.limit
                        && *this.sent > limit
                    {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(limit).into())));
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                other => Poll::Ready(other),
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + head);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

pin_project_lite::pin_project! {
    /// A body streamed through unchanged, keeping `guard` alive until the
    /// body is finished or dropped: an attempt holds its concurrency slot for
    /// as long as its answer streams (one box for both jobs, since every
    /// answer pays for it), and a client connection counts a request as
    /// active until its answer is sent.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

/// Streams an upstream's body to the caller; `guard` is released when the
/// body ends.
pub fn guarded<B, G>(inner: B, guard: G) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
    G: Send + Sync + 'static,
{
    Guarded::new(inner, guard).boxed()
}

impl<B, G> Guarded<B, G> {
    /// `inner`, holding `guard` until it ends; unboxed, for a caller that
    /// can name the type (hyper's service answers do).
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, guard: Some(guard) }
    }
}

impl<B, G> Body for Guarded<B, G>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streamed body passes its data, and no trailer field.
    #[tokio::test]
    async fn a_streamed_body_forwards_no_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"rest"))), Ok(Frame::trailers(trailers))];
        let rest = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let capped = CappedBody { head: Some(Bytes::from_static(b"head ")), rest, sent: 5, limit: None };
        let collected = capped.collect().await.expect("a body");
        assert!(collected.trailers().is_none(), "a trailer went on");
        assert_eq!(collected.to_bytes(), "head rest");
    }

    #[test]
    fn the_budget_is_shared_and_given_back_with_the_last_buffer() {
        let budget = Arc::new(BufferBudget::default());
        let mut first = Reservation::new(&budget);
        assert!(first.grow(10, 16));
        let mut second = Reservation::new(&budget);
        assert!(!second.grow(10, 16), "two reservations together stay within the limit");
        assert!(second.grow(6, 16));
        drop(second);
        let bytes = first.hold(BytesMut::from(&b"0123456789"[..]));
        let attempt = bytes.clone();
        drop(bytes);
        assert_eq!(budget.used(), 10, "a clone still being sent keeps its bytes counted");
        drop(attempt);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_large_buffered_body_goes_out_in_slices_of_known_length() {
        let bytes = Bytes::from(vec![7u8; 3 * SLICE + 5]);
        let mut body = RequestBody::Buffered(bytes.clone());
        for _ in 0..2 {
            let mut attempt = body.for_attempt().expect("replayable");
            assert_eq!(attempt.size_hint().exact(), Some(bytes.len() as u64));
            let mut pieces = Vec::new();
            while let Some(frame) = attempt.frame().await {
                pieces.push(frame.expect("a slice").into_data().expect("data"));
            }
            assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), [SLICE, SLICE, SLICE, 5]);
            assert_eq!(pieces.concat(), bytes, "every attempt sends the same bytes");
        }
    }
}
