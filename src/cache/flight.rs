//! One answer shared by every caller waiting for it (request coalescing).
//!
//! The attempt that fetches it runs in a task of its own, not in any
//! caller's request, so that a caller who goes away cancels nothing but its
//! own wait; the task stops early only when no caller is left and nothing
//! is to be stored. The answer's head is published once, its body chunk by
//! chunk.
//!
//! While the whole body may still be stored (it fits `max_object`), every
//! chunk is kept, so a caller who joins late still reads it from its first
//! byte. Past that the flight is *closed*: nobody joins any more, a chunk
//! goes once every waiter has read it, and the fetch waits while its
//! waiters are more than [`STREAM_BUFFER`] behind, so an answer of any size
//! streams through a bounded buffer at the pace of its slowest reader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use crate::body::{BoxError, ProxyBody};

/// Bytes a closed flight holds ahead of its slowest waiter before the fetch waits.
pub const STREAM_BUFFER: usize = 256 * 1024;

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
    /// Chunks kept, the first being chunk number `dropped`.
    chunks: VecDeque<Bytes>,
    dropped: usize,
    /// Bytes in `chunks`.
    buffered: usize,
    /// `Some(true)` once the body is complete, `Some(false)` if it broke.
    ended: Option<bool>,
    /// Set once nobody may join: chunks read by every waiter may go.
    closed: bool,
    /// The next chunk of each waiter, by waiter id.
    positions: Vec<(u64, usize)>,
    next_id: u64,
}

impl State {
    /// Drops the chunks every waiter has read (a closed flight only).
    fn trim(&mut self) {
        if !self.closed {
            return;
        }
        let slowest = self.positions.iter().map(|(_, next)| *next).min().unwrap_or(usize::MAX);
        while self.dropped < slowest
            && let Some(chunk) = self.chunks.pop_front()
        {
            self.buffered -= chunk.len();
            self.dropped += 1;
        }
    }
}

/// One fetch and its waiters.
pub struct Flight {
    state: Mutex<State>,
    /// Bumped on every change, for waiters and for the fetching task.
    changed: watch::Sender<()>,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").field("waiters", &self.waiters()).finish()
    }
}

impl Flight {
    /// A flight and the waiter who starts it.
    pub fn start() -> (Arc<Self>, Waiter) {
        let flight = Arc::new(Self { state: Mutex::default(), changed: watch::channel(()).0 });
        let waiter = flight.state().join(&flight);
        (flight, waiter)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new waiter, unless the flight is closed or every waiter already
    /// left (its fetch is then being abandoned).
    pub fn try_wait(self: &Arc<Self>) -> Option<Waiter> {
        let mut state = self.state();
        (!state.closed && !state.positions.is_empty()).then(|| state.join(self))
    }

    /// Waiters left.
    pub fn waiters(&self) -> usize {
        self.state().positions.len()
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

    /// Nobody joins from now on, and chunks every waiter has read go.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.trim();
    }

    /// Adds a chunk, then waits while a closed flight's waiters are more
    /// than [`STREAM_BUFFER`] behind (or until none is left).
    pub async fn push(&self, chunk: Bytes) {
        {
            let mut state = self.state();
            state.buffered += chunk.len();
            state.chunks.push_back(chunk);
        }
        self.changed.send_replace(());
        let mut changes = self.changed.subscribe();
        loop {
            {
                let state = self.state();
                if !state.closed || state.buffered <= STREAM_BUFFER || state.positions.is_empty() {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
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

    /// The whole body, once it is complete and was never trimmed.
    pub fn body(&self) -> Option<Bytes> {
        let state = self.state();
        let whole = state.ended == Some(true) && state.dropped == 0;
        whole.then(|| {
            // One chunk (most small answers) is stored as it is, uncopied.
            if let [only] = state.chunks.as_slices().0
                && state.chunks.len() == 1
            {
                return only.clone();
            }
            let mut body = Vec::with_capacity(state.buffered);
            state.chunks.iter().for_each(|chunk| body.extend_from_slice(chunk));
            body.into()
        })
    }
}

impl State {
    fn join(&mut self, flight: &Arc<Flight>) -> Waiter {
        let id = self.next_id;
        self.next_id += 1;
        self.positions.push((id, self.dropped));
        Waiter { flight: flight.clone(), id }
    }
}

/// A caller waiting for a flight's answer.
pub struct Waiter {
    flight: Arc<Flight>,
    id: u64,
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

    /// The next chunk, `Ok(None)` at the end, `Err` if the body broke.
    fn next_chunk(&self) -> Result<Option<Bytes>, Option<()>> {
        let mut state = self.flight.state();
        let Some(slot) = state.positions.iter().position(|(id, _)| *id == self.id) else {
            return Err(Some(()));
        };
        // Never below `dropped`: chunks go only once every waiter read them.
        let index = state.positions[slot].1 - state.dropped;
        if let Some(chunk) = state.chunks.get(index).cloned() {
            state.positions[slot].1 += 1;
            state.trim();
            return Ok(Some(chunk));
        }
        match state.ended {
            Some(true) => Ok(None),
            Some(false) => Err(Some(())),
            None => Err(None),
        }
    }

    /// The answer's body from its first byte, streamed as it arrives. The
    /// waiter is counted until this body is dropped.
    pub fn body(self) -> ProxyBody {
        let changes = self.flight.changed.subscribe();
        let chunks = stream::unfold(Some((self, changes)), |held| async move {
            let (waiter, mut changes) = held?;
            loop {
                match waiter.next_chunk() {
                    Ok(Some(chunk)) => {
                        // A closed flight's fetch may wait for this read.
                        waiter.flight.changed.send_replace(());
                        return Some((Ok(Frame::data(chunk)), Some((waiter, changes))));
                    }
                    Ok(None) => return None,
                    Err(Some(())) => {
                        let broken: BoxError = Box::new(BrokenOff);
                        return Some((Err(broken), None));
                    }
                    Err(None) => {
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
        let mut state = self.flight.state();
        state.positions.retain(|(id, _)| *id != self.id);
        state.trim();
        drop(state);
        self.flight.changed.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    fn head() -> Head {
        Head { status: StatusCode::OK, headers: HeaderMap::new(), source: "miss" }
    }

    #[tokio::test]
    async fn every_waiter_reads_the_whole_body_whenever_it_joined() {
        let (flight, early) = Flight::start();
        flight.publish_head(head());
        flight.push(Bytes::from_static(b"ab")).await;
        let late = flight.try_wait().expect("an open flight takes waiters");
        flight.push(Bytes::from_static(b"cd")).await;
        flight.end(true);
        for waiter in [early, late] {
            assert_eq!(waiter.head().await.status, StatusCode::OK);
            let body = waiter.body().collect().await.expect("complete").to_bytes();
            assert_eq!(body, "abcd");
        }
        assert_eq!(flight.body().as_deref(), Some(&b"abcd"[..]));
        assert_eq!(flight.waiters(), 0, "a body read to its end lets its waiter go");
        assert!(flight.try_wait().is_none(), "a flight every waiter left takes no new one");
    }

    #[tokio::test]
    async fn a_broken_body_fails_every_waiter() {
        let (flight, waiter) = Flight::start();
        flight.publish_head(head());
        flight.push(Bytes::from_static(b"ab")).await;
        flight.end(false);
        assert!(waiter.body().collect().await.is_err());
        assert_eq!(flight.body(), None, "nothing complete to store");
    }

    #[tokio::test]
    async fn abandoned_once_the_last_waiter_leaves() {
        let (flight, a) = Flight::start();
        let b = flight.try_wait().expect("open");
        let abandoned = tokio::spawn({
            let flight = flight.clone();
            async move { flight.abandoned().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!abandoned.is_finished(), "one waiter is left");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), abandoned)
            .await
            .expect("abandoned in time")
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_closed_flight_streams_through_a_bounded_buffer() {
        let (flight, waiter) = Flight::start();
        flight.publish_head(head());
        flight.close();
        assert!(flight.try_wait().is_none(), "nobody joins a closed flight");
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let fetch = tokio::spawn({
            let flight = flight.clone();
            async move {
                for _ in 0..64 {
                    flight.push(chunk.clone()).await;
                    let buffered = flight.state().buffered;
                    assert!(buffered <= STREAM_BUFFER + chunk.len(), "{buffered} bytes held");
                }
                flight.end(true);
            }
        });
        let mut body = waiter.body();
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            read += frame.expect("a chunk").into_data().map_or(0, |d| d.len());
        }
        fetch.await.expect("the fetch ran to its end");
        assert_eq!(read, 64 * 64 * 1024, "every byte reached the reader");
        assert_eq!(flight.body(), None, "a trimmed body is not one to store");
    }

    #[tokio::test]
    async fn a_reader_gone_releases_the_fetch() {
        let (flight, waiter) = Flight::start();
        flight.publish_head(head());
        flight.close();
        let big = Bytes::from(vec![b'x'; 2 * STREAM_BUFFER]);
        let push = tokio::spawn({
            let flight = flight.clone();
            async move { flight.push(big).await }
        });
        tokio::task::yield_now().await;
        assert!(!push.is_finished(), "the fetch waits for its reader");
        drop(waiter);
        tokio::time::timeout(Duration::from_secs(5), push).await.expect("released").expect("no panic");
    }
}
