//! Byte relays for CONNECT tunnels, and a look at a tunnel's first byte.
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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
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

/// A tunnel whose first byte has been read, to tell what it carries (a TLS
/// ClientHello, plain HTTP), and is read again first: as if only peeked at.
pub struct Peeked<T> {
    /// The byte read ahead, until it is read again.
    first: Option<u8>,
    inner: T,
}

impl<T> Peeked<T> {
    /// `inner`, whose byte `first` (if any) was read already.
    pub fn new(first: Option<u8>, inner: T) -> Self {
        Self { first, inner }
    }

    /// The first byte, or `None` when the tunnel closed before sending one.
    pub fn first(&self) -> Option<u8> {
        self.first
    }
}

impl<T: AsyncRead + Unpin> Peeked<T> {
    /// Waits for the first byte of `inner`.
    pub async fn first_byte_of(mut inner: T) -> io::Result<Self> {
        let mut byte = [0u8; 1];
        let read = inner.read(&mut byte).await?;
        Ok(Self::new((read == 1).then_some(byte[0]), inner))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Peeked<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0
            && let Some(byte) = this.first.take()
        {
            buf.put_slice(&[byte]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Peeked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Peeked;

    #[tokio::test]
    async fn a_peeked_byte_is_read_again_first() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut peeked = Peeked::first_byte_of(far).await.unwrap();
        assert_eq!(peeked.first(), Some(b'G'));
        drop(near);
        let mut all = Vec::new();
        peeked.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_tunnel_closed_at_once_has_no_first_byte() {
        let (near, far) = tokio::io::duplex(64);
        drop(near);
        assert_eq!(Peeked::first_byte_of(far).await.unwrap().first(), None);
    }
}
