//! What one connection is doing, for its two timeouts.
//!
//! hyper's own header timeout starts whenever it waits for a head, idle
//! keep-alive time included, so it cannot tell a slow head from a quiet
//! connection. Here the two are told apart: the [`super::guard`] reports
//! when the first byte of a head arrives, the service reports requests in
//! flight, and [`Activity::expired`] resolves when either bound is over.
//!
//! - nothing in flight, part of a head received (or nothing yet on a new
//!   connection): the head must be complete `header_read_timeout` after it
//!   started (slowloris guard);
//! - nothing in flight, no head started: the connection is idle and closes
//!   `idle_timeout` after its last answer;
//! - something in flight: no deadline (queueing and long streams are bounded
//!   elsewhere).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The timeouts and state of one connection.
pub(super) struct Activity {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<State>,
    /// Wakes [`Activity::expired`] when the state changes.
    changed: Notify,
    /// The guard's reader, waiting for the connection to be idle.
    reader: AtomicWaker,
}

struct State {
    /// Requests whose answer has not been fully sent.
    inflight: usize,
    /// When the connection opened or its last answer ended.
    idle_since: Instant,
    /// When the first byte of the head being collected arrived.
    head_since: Option<Instant>,
    /// Whether a request has been received (a new connection owes one).
    served: bool,
}

/// A request in flight; dropping it (answer sent, or abandoned) ends it.
pub(super) struct Busy(Arc<Activity>);

impl Activity {
    pub(super) fn new(header_read_timeout: Duration, idle_timeout: Duration) -> Self {
        let state = State { inflight: 0, idle_since: Instant::now(), head_since: None, served: false };
        Self {
            header_read_timeout,
            idle_timeout,
            state: Mutex::new(state),
            changed: Notify::new(),
            reader: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request arrived; it is in flight until the returned guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        let mut state = self.lock();
        state.inflight += 1;
        state.served = true;
        drop(state);
        self.changed.notify_waiters();
        Busy(self.clone())
    }

    /// Whether part of a request head is held (reported by the guard).
    pub(super) fn collecting(&self, collecting: bool) {
        let mut state = self.lock();
        match (state.head_since, collecting) {
            (None, true) => state.head_since = Some(Instant::now()),
            (Some(_), false) => state.head_since = None,
            _ => return,
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// True when nothing is in flight; otherwise `waker` is woken when that
    /// changes.
    pub(super) fn idle_or_wake(&self, waker: &Waker) -> bool {
        self.reader.register(waker);
        self.lock().inflight == 0
    }

    /// When the connection should be closed, if nothing happens until then.
    fn deadline(&self) -> Option<Instant> {
        let state = self.lock();
        if state.inflight > 0 {
            return None;
        }
        // A head collected while an answer was still going out started
        // counting when that answer ended.
        let head_since = state.head_since.map(|at| at.max(state.idle_since));
        match head_since.or((!state.served).then_some(state.idle_since)) {
            Some(since) => Some(since + self.header_read_timeout),
            None => Some(state.idle_since + self.idle_timeout),
        }
    }

    /// Resolves once the connection is past its deadline.
    pub(super) async fn expired(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change is missed.
            changed.as_mut().enable();
            match self.deadline() {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = changed => {}
                },
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut state = activity.lock();
        state.inflight -= 1;
        if state.inflight == 0 {
            state.idle_since = Instant::now();
        }
        drop(state);
        activity.changed.notify_waiters();
        activity.reader.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(2);
    const IDLE: Duration = Duration::from_secs(10);

    async fn expires_after(activity: &Activity) -> Duration {
        let start = Instant::now();
        activity.expired().await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_owes_a_head_then_idles() {
        let activity = Arc::new(Activity::new(HEAD, IDLE));
        assert_eq!(expires_after(&activity).await, HEAD);
        let busy = activity.begin();
        let waited = tokio::time::timeout(IDLE * 3, activity.expired()).await;
        assert!(waited.is_err(), "no deadline while a request is in flight");
        drop(busy);
        assert_eq!(expires_after(&activity).await, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_has_the_header_timeout() {
        let activity = Arc::new(Activity::new(HEAD, IDLE));
        drop(activity.begin());
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.collecting(true);
        assert_eq!(expires_after(&activity).await, HEAD);
    }
}
