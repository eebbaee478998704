//! The read side of a client connection, between the socket and hyper.
//!
//! Bytes pass through [`Framing`], which holds each HTTP/1 request head back
//! until it is complete and checked. A refused head is answered here with
//! the documented error answer (hyper would answer a bare status, or accept a smuggling
//! shape): hyper is shown the end of the stream once everything before the
//! bad head has been answered, and when it then closes the connection, the
//! error answer is written before the socket is shut down. Nothing after
//! the bad head is read, so nothing after it is served.
//!
//! A body that cannot be followed (see [`Framing`]) belongs to a request
//! hyper is already serving, so it is not answered here: once the bytes
//! before it are read, reading fails. hyper hands that error to the
//! request's body, whose reader answers 400, and stops reading, so the
//! connection closes after that answer. Holding the refusal until the
//! connection is idle, as for a head, would wait for ever: the request
//! stays in flight until its body ends.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::activity::Activity;
use super::framing::Framing;
use crate::metrics::{Metrics, NO_UPSTREAM};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A client connection's socket with its heads checked.
pub(super) struct Guard<T> {
    inner: T,
    framing: Framing,
    /// Bytes passed by `framing`, not yet read by hyper.
    ready: BytesMut,
    /// The socket reached its end.
    eof: bool,
    refusal: Refusal,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
}

/// The answer to a refused head, on its way out.
enum Refusal {
    None,
    /// Waiting for the answers to earlier requests to be sent.
    Held(Vec<u8>),
    /// hyper saw the end of the stream; written once it shuts the socket down.
    Due {
        answer: Vec<u8>,
        written: usize,
    },
    Sent,
    /// A body could not be followed: reading fails with this, after the
    /// bytes before it.
    Broken(String),
}

impl<T> Guard<T> {
    pub(super) fn new(inner: T, limit: usize, activity: Arc<Activity>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            framing: Framing::new(limit),
            ready: BytesMut::new(),
            eof: false,
            refusal: Refusal::None,
            activity,
            metrics,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guard<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            match &mut this.refusal {
                Refusal::Held(answer) => {
                    if !this.activity.idle_or_wake(cx.waker()) {
                        return Poll::Pending;
                    }
                    this.refusal = Refusal::Due { answer: std::mem::take(answer), written: 0 };
                    return Poll::Ready(Ok(()));
                }
                Refusal::Due { .. } | Refusal::Sent => return Poll::Ready(Ok(())),
                Refusal::Broken(why) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
                }
                Refusal::None if this.eof => return Poll::Ready(Ok(())),
                Refusal::None => {}
            }
            // Left uninitialised: zeroing 8 KiB on every read, most of which
            // find nothing (a keep-alive connection between requests), cost
            // more than anything else on the path.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            if let Err(error) = this.framing.push(read.filled(), &mut this.ready) {
                if this.framing.broken() {
                    // Its request's reader answers (and counts) it.
                    tracing::debug!(code = error.code(), "request body refused: {error}");
                    this.refusal = Refusal::Broken(error.to_string());
                } else {
                    tracing::debug!(code = error.code(), "request head refused: {error}");
                    this.metrics.count_request(NO_UPSTREAM, error.status());
                    this.refusal = Refusal::Held(error.to_http1_bytes());
                }
            }
            this.activity.collecting(this.framing.collecting());
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guard<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Refusal::Due { answer, written } = &mut this.refusal {
            while *written < answer.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            this.refusal = Refusal::Sent;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
