//! Body types: what we answer with, and how request bodies are kept for replay.
//!
//! A retry must send the same body again, so bodies up to `max_body_bytes` are
//! buffered once and replayed from memory. A larger body cannot be replayed
//! without unbounded memory, so it is streamed to the upstream exactly once and
//! such a request is never retried. Response bodies are never buffered: they
//! are streamed to the caller frame by frame (server-sent events included).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

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

/// A request body, ready to be sent one or more times.
pub enum RequestBody {
    /// Fully read; every attempt sends a cheap clone.
    Buffered(Bytes),
    /// Too large to keep: can be sent once, so the request is not retryable.
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    /// Whether another attempt can send this body again.
    pub fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for the next attempt; `None` once a streaming body was sent.
    pub fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            Self::Buffered(bytes) if bytes.is_empty() => Some(empty()),
            Self::Buffered(bytes) => Some(full(bytes.clone())),
            Self::Streaming(body) => body.take(),
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
}

/// Reads up to `buffer_limit` bytes into memory; beyond that, streams the rest.
///
/// `hard_limit` (`max_request_bytes`) is enforced here for buffered bodies
/// and by [`CappedBody`] for streamed ones.
pub async fn read(
    mut body: Incoming,
    buffer_limit: usize,
    hard_limit: Option<u64>,
) -> Result<RequestBody, BodyError> {
    if let Some(limit) = hard_limit
        && body.size_hint().lower() > limit
    {
        return Err(BodyError::TooLarge(limit));
    }
    if body.size_hint().lower() > buffer_limit as u64 {
        return Ok(streaming(BytesMut::new(), body, hard_limit));
    }
    let mut buffered = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not replayed
        };
        if let Some(limit) = hard_limit
            && (buffered.len() + data.len()) as u64 > limit
        {
            return Err(BodyError::TooLarge(limit));
        }
        buffered.extend_from_slice(&data);
        if buffered.len() > buffer_limit {
            return Ok(streaming(buffered, body, hard_limit));
        }
    }
    Ok(RequestBody::Buffered(buffered.freeze()))
}

fn streaming(head: BytesMut, rest: Incoming, hard_limit: Option<u64>) -> RequestBody {
    let sent = head.len() as u64;
    let head = (!head.is_empty()).then(|| head.freeze());
    let capped = CappedBody { head, rest, sent, limit: hard_limit };
    RequestBody::Streaming(Some(capped.boxed()))
}

pin_project_lite::pin_project! {
    /// The already-read head of a large body followed by the rest, failing with
    /// [`BodyError::TooLarge`] once more than `limit` bytes went through.
    struct CappedBody {
        head: Option<Bytes>,
        #[pin]
        rest: Incoming,
        sent: u64,
        limit: Option<u64>,
    }
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match this.rest.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.sent += data.len() as u64;
                    if let Some(limit) = *this.limit
                        && *this.sent > limit
                    {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(limit).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
pub fn guarded<G: Send + Sync + 'static>(inner: Incoming, guard: G) -> ProxyBody {
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
