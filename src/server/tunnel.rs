//! Byte relays for CONNECT tunnels.
//!
//! A tunnel is opaque: pacegate cannot tell a request boundary inside it, so
//! it cannot drain one gracefully. It ends when either side closes, when no
//! byte has moved either way for `idle_timeout`, or when the shutdown grace
//! is over; until then it holds its client connection's slot.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::Scope;

/// Copies bytes both ways between the client and the tunnel's target.
pub async fn relay<A, B>(scope: &Scope, mut client: A, mut target: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let idle = scope.settings().idle_timeout;
    let clock = Clock { start: Instant::now(), last_ms: AtomicU64::new(0) };
    let mut client = Touching { inner: &mut client, clock: &clock };
    let mut target = Touching { inner: &mut target, clock: &clock };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut target);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            result = &mut copy => {
                if let Err(error) = result {
                    tracing::debug!(%error, "tunnel ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(clock.last() + idle) => {
                if clock.last() + idle <= Instant::now() {
                    return tracing::debug!(idle_ms = idle.as_millis() as u64, "closing an idle tunnel");
                }
            }
            () = scope.stopped() => return,
        }
    }
}

/// When a byte last moved, as milliseconds since the relay started.
struct Clock {
    start: Instant,
    last_ms: AtomicU64,
}

impl Clock {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// One side of a tunnel, touching the clock whenever bytes come in.
struct Touching<'a, T> {
    inner: &'a mut T,
    clock: &'a Clock,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touching<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touching<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
