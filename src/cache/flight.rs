//! One answer shared by every caller waiting for it (request coalescing).
//!
//! The attempt that fetches it runs in a task of its own, not in any
//! caller's request, so that a caller who goes away cancels nothing but its
//! own wait; the task stops early only when no caller is left and nothing
//! is to be stored. The answer's head is published once, its body chunk by
//! chunk, each kept until the flight ends so that a caller who joins late
//! (or reads slowly) still reads it from its first byte.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use crate::body::{BoxError, ProxyBody};

/// An answer's head, as every waiter gets it.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// How the fetch went for the caller who started it: `miss` or `revalidated`.
    pub source: &'static str,
}

/// A body that broke while the flight read it: each waiter's body fails too.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's answer broke off")]
pub struct BrokenOff;

#[derive(Default)]
struct State {
    head: Option<Head>,
    chunks: Vec<Bytes>,
    /// `Some(true)` once the body is complete, `Some(false)` if it broke.
    ended: Option<bool>,
    waiters: usize,
}

/// One fetch and its waiters.
pub struct Flight {
    state: Mutex<State>,
    /// Bumped on every change, for waiters and for the fetching task.
    changed: watch::Sender<()>,
}

impl Flight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), changed: watch::channel(()).0 })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new waiter, counted until the [`Waiter`] is dropped.
    pub fn wait(self: &Arc<Self>) -> Waiter {
        self.state().waiters += 1;
        Waiter { flight: self.clone() }
    }

    /// Waiters left.
    pub fn waiters(&self) -> usize {
        self.state().waiters
    }

    /// Resolves once no waiter is left (at once if none is).
    pub async fn abandoned(&self) {
        let mut changes = self.changed.subscribe();
        while self.waiters() > 0 {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn publish_head(&self, head: Head) {
        self.state().head = Some(head);
        self.changed.send_replace(());
    }

    pub fn push(&self, chunk: Bytes) {
        self.state().chunks.push(chunk);
        self.changed.send_replace(());
    }

    /// The body is complete (`true`) or broke off (`false`).
    pub fn end(&self, complete: bool) {
        self.state().ended = Some(complete);
        self.changed.send_replace(());
    }

    /// Ends a flight that is still open with `head` (if none was published)
    /// and a broken body, so that no waiter waits on.
    pub fn fail_unanswered(&self, head: Head) {
        let mut state = self.state();
        state.head.get_or_insert(head);
        state.ended.get_or_insert(false);
        drop(state);
        self.changed.send_replace(());
    }

    /// The whole body, once it is complete.
    pub fn body(&self) -> Option<Bytes> {
        let state = self.state();
        (state.ended == Some(true)).then(|| state.chunks.concat().into())
    }
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").field("waiters", &self.waiters()).finish()
    }
}

/// A caller waiting for a flight's answer.
pub struct Waiter {
    flight: Arc<Flight>,
}

impl Waiter {
    /// The answer's head, once it is there.
    pub async fn head(&self) -> Head {
        let mut changes = self.flight.changed.subscribe();
        loop {
            if let Some(head) = self.flight.state().head.clone() {
                return head;
            }
            // The sender lives in the flight this waiter holds: never closed.
            let _ = changes.changed().await;
        }
    }

    /// The answer's body from its first byte, streamed as it arrives. The
    /// waiter is counted until this body is dropped.
    pub fn body(self) -> ProxyBody {
        let changes = self.flight.changed.subscribe();
        let chunks = stream::unfold((self, changes, 0usize), |(waiter, mut changes, next)| async move {
            loop {
                let (chunk, ended) = {
                    let state = waiter.flight.state();
                    (state.chunks.get(next).cloned(), state.ended)
                };
                match (chunk, ended) {
                    (Some(chunk), _) => {
                        return Some((Ok(Frame::data(chunk)), (waiter, changes, next + 1)));
                    }
                    (None, Some(true)) => return None,
                    (None, Some(false)) => {
                        let broken: BoxError = Box::new(BrokenOff);
                        return Some((Err(broken), (waiter, changes, usize::MAX)));
                    }
                    (None, None) => {
                        let _ = changes.changed().await;
                    }
                }
            }
        });
        BodyExt::boxed(StreamBody::new(chunks))
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.flight.state().waiters -= 1;
        self.flight.changed.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn head() -> Head {
        Head { status: StatusCode::OK, headers: HeaderMap::new(), source: "miss" }
    }

    #[tokio::test]
    async fn every_waiter_reads_the_whole_body_whenever_it_joined() {
        let flight = Flight::new();
        let early = flight.wait();
        flight.publish_head(head());
        flight.push(Bytes::from_static(b"ab"));
        let late = flight.wait();
        flight.push(Bytes::from_static(b"cd"));
        flight.end(true);
        for waiter in [early, late] {
            assert_eq!(waiter.head().await.status, StatusCode::OK);
            let body = waiter.body().collect().await.expect("complete").to_bytes();
            assert_eq!(body, "abcd");
        }
        assert_eq!(flight.body().as_deref(), Some(&b"abcd"[..]));
        assert_eq!(flight.waiters(), 0, "a body read to its end lets its waiter go");
    }

    #[tokio::test]
    async fn a_broken_body_fails_every_waiter() {
        let flight = Flight::new();
        let waiter = flight.wait();
        flight.publish_head(head());
        flight.push(Bytes::from_static(b"ab"));
        flight.end(false);
        assert!(waiter.body().collect().await.is_err());
        assert_eq!(flight.body(), None, "nothing complete to store");
    }

    #[tokio::test]
    async fn abandoned_once_the_last_waiter_leaves() {
        let flight = Flight::new();
        let (a, b) = (flight.wait(), flight.wait());
        let abandoned = tokio::spawn({
            let flight = flight.clone();
            async move { flight.abandoned().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!abandoned.is_finished(), "one waiter is left");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), abandoned)
            .await
            .expect("abandoned in time")
            .expect("no panic");
    }
}
