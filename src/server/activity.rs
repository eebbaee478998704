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
//! - something in flight: no deadline for the request itself (queueing and
//!   long streams are bounded elsewhere), but an answer the caller takes
//!   nothing of for `send_timeout` closes the connection (nginx's
//!   `send_timeout`): an answer is *waiting for the caller* from when it is
//!   handed to hyper, and again after each frame hyper took, until hyper
//!   asks for the next frame (see [`Answering`]). An answer waiting for its
//!   upstream (a quiet event stream) is not.

use std::sync::atomic::{AtomicU64, Ordering};
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
    send_timeout: Duration,
    /// Origin of the instants [`Answering`] keeps as numbers.
    epoch: Instant,
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
    /// Answers being sent: since when each waits for the caller (see
    /// [`Answering`]). A slot no answer holds any more reads 0 (no
    /// deadline) and serves the next answer: a keep-alive connection
    /// allocates one for its first answer only.
    answers: Vec<Arc<AtomicU64>>,
    /// When the timer of [`Activity::expired`] fires, if it is set: a change
    /// that leaves the deadline at or after it need not wake anyone, the
    /// timer will (then the deadline is computed again).
    armed: Option<Instant>,
    /// An answer asked for the connection to close ([`Activity::close`]).
    close: bool,
}

/// A request in flight; dropping it (answer sent, or abandoned) ends it.
pub(super) struct Busy(Arc<Activity>);

/// A request whose answer is being sent. Holds: 0 while the answer waits
/// for its upstream, else 1 + nanoseconds from the epoch to when it started
/// waiting for the caller to take what it has. One atomic store per frame,
/// no lock: the connection reads them when it computes its deadline.
pub(super) struct Answering {
    waiting: Arc<AtomicU64>,
    busy: Busy,
}

/// Why a connection is past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// A head took too long, or the connection idled: close it gracefully.
    HeadOrIdle,
    /// The caller took nothing of an answer for `send_timeout`: drop it.
    Send,
    /// An answer asked for it: close gracefully, no other request after it.
    Close,
}

impl Activity {
    pub(super) fn new(header_read_timeout: Duration, idle_timeout: Duration, send_timeout: Duration) -> Self {
        let now = Instant::now();
        let state = State {
            inflight: 0,
            idle_since: now,
            head_since: None,
            served: false,
            answers: Vec::new(),
            armed: None,
            close: false,
        };
        Self {
            header_read_timeout,
            idle_timeout,
            send_timeout,
            epoch: now,
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
        self.changed(state);
        Busy(self.clone())
    }

    /// Closes the connection gracefully from now: the answers under way
    /// are sent, then it ends (an HTTP/2 connection says so with GOAWAY,
    /// which no `Connection: close` can).
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.close = true;
        self.changed(state);
    }

    /// Whether part of a request head is held (reported by the guard).
    pub(super) fn collecting(&self, collecting: bool) {
        let mut state = self.lock();
        match (state.head_since, collecting) {
            (None, true) => state.head_since = Some(Instant::now()),
            (Some(_), false) => state.head_since = None,
            _ => return,
        }
        self.changed(state);
    }

    /// Wakes [`Activity::expired`] after a change, unless its timer fires
    /// no later than the new deadline anyway. Most changes move the
    /// deadline later (an answer ends, the next request begins), so a busy
    /// keep-alive connection is not woken for each, and its timer is not
    /// moved on every request.
    fn changed(&self, state: MutexGuard<'_, State>) {
        let wake = match (self.deadline(&state), state.armed) {
            (Some((at, _)), Some(armed)) => at < armed,
            (Some(_), None) => true,
            // No deadline any more: a timer still set only fires early.
            (None, _) => false,
        };
        drop(state);
        if wake {
            self.changed.notify_waiters();
        }
    }

    /// True when nothing is in flight; otherwise `waker` is woken when that
    /// changes.
    pub(super) fn idle_or_wake(&self, waker: &Waker) -> bool {
        self.reader.register(waker);
        self.lock().inflight == 0
    }

    /// When the connection should be closed, if nothing happens until then.
    fn deadline(&self, state: &State) -> Option<(Instant, Expired)> {
        if state.close {
            return Some((self.epoch, Expired::Close));
        }
        if state.inflight > 0 {
            let waiting = state.answers.iter().map(|since| since.load(Ordering::Acquire));
            let oldest = waiting.filter(|since| *since != 0).min()?;
            let since = self.epoch + Duration::from_nanos(oldest - 1);
            return Some((since + self.send_timeout, Expired::Send));
        }
        // A head collected while an answer was still going out started
        // counting when that answer ended.
        let head_since = state.head_since.map(|at| at.max(state.idle_since));
        let at = match head_since.or((!state.served).then_some(state.idle_since)) {
            Some(since) => since + self.header_read_timeout,
            None => state.idle_since + self.idle_timeout,
        };
        Some((at, Expired::HeadOrIdle))
    }

    /// Resolves once the connection is past its deadline, saying which.
    ///
    /// One timer for as long as this is polled, set only when the deadline
    /// comes before it (or it has fired): when it fires before the
    /// deadline, the deadline is computed again.
    pub(super) async fn expired(&self) -> Expired {
        let timer = tokio::time::sleep_until(self.epoch);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change is missed.
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                let now = Instant::now();
                armed = armed.filter(|at| *at > now);
                match self.deadline(&state) {
                    Some((at, why)) if at <= now => return why,
                    Some((at, _)) if armed.is_none_or(|armed| at < armed) => {
                        timer.as_mut().reset(at);
                        armed = Some(at);
                    }
                    _ => {}
                }
                // Read by `changed`, under the same lock as the state.
                state.armed = armed;
            }
            match armed {
                None => changed.await,
                Some(_) => tokio::select! {
                    biased;
                    () = changed => {}
                    () = timer.as_mut() => {}
                },
            }
        }
    }
}

impl Busy {
    /// The connection this request came on.
    pub(super) fn activity(&self) -> &Activity {
        &self.0
    }

    /// The request's answer is handed to hyper: from now on it waits for
    /// the caller to take it.
    pub(super) fn answering(self) -> Answering {
        let activity = &self.0;
        let since = activity.since_epoch();
        let mut state = activity.lock();
        // A slot only the state holds is free (`get_mut` also orders this
        // after its last holder's stores).
        let waiting = match state.answers.iter_mut().position(|slot| Arc::get_mut(slot).is_some()) {
            Some(free) => Arc::clone(&state.answers[free]),
            None => {
                let slot = Arc::<AtomicU64>::default();
                state.answers.push(Arc::clone(&slot));
                slot
            }
        };
        waiting.store(since, Ordering::Release);
        // A deadline may start where there was none.
        activity.changed(state);
        Answering { waiting, busy: self }
    }
}

impl Activity {
    /// Now, as [`Answering`] keeps it (never 0).
    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1).saturating_add(1)
    }
}

impl Answering {
    /// hyper took a frame: what comes next waits for the caller.
    pub(super) fn wait_for_caller(&self) {
        let was = self.waiting.swap(self.busy.0.since_epoch(), Ordering::AcqRel);
        if was == 0 {
            // A deadline may start where there was none.
            self.busy.0.changed.notify_waiters();
        }
    }

    /// hyper asked for more and the answer has nothing yet: the wait is
    /// the upstream's, not the caller's.
    pub(super) fn wait_for_upstream(&self) {
        self.waiting.store(0, Ordering::Release);
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        // Its slot no longer counts, and is free once `waiting` drops. `busy`
        // drops next: the request is no longer in flight.
        self.waiting.store(0, Ordering::Release);
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
        activity.changed(state);
        activity.reader.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(2);
    const IDLE: Duration = Duration::from_secs(10);
    const SEND: Duration = Duration::from_secs(4);

    async fn expires_after(activity: &Activity) -> Duration {
        let start = Instant::now();
        assert_eq!(activity.expired().await, Expired::HeadOrIdle);
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_owes_a_head_then_idles() {
        let activity = Arc::new(Activity::new(HEAD, IDLE, SEND));
        assert_eq!(expires_after(&activity).await, HEAD);
        let busy = activity.begin();
        let waited = tokio::time::timeout(IDLE * 3, activity.expired()).await;
        assert!(waited.is_err(), "no deadline while a request is in flight");
        drop(busy);
        assert_eq!(expires_after(&activity).await, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_has_the_header_timeout() {
        let activity = Arc::new(Activity::new(HEAD, IDLE, SEND));
        drop(activity.begin());
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.collecting(true);
        assert_eq!(expires_after(&activity).await, HEAD);
    }
}

#[cfg(test)]
mod send_tests {
    use super::*;

    const SEND: Duration = Duration::from_secs(4);

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_caller_takes_nothing_of_expires_after_the_send_timeout() {
        let activity = Arc::new(Activity::new(Duration::from_secs(2), Duration::from_secs(10), SEND));
        let answering = activity.begin().answering();
        // Waiting for its upstream (a quiet stream): no deadline.
        answering.wait_for_upstream();
        let waited = tokio::time::timeout(SEND * 3, activity.expired()).await;
        assert!(waited.is_err(), "an answer waiting for its upstream never times out");
        // A frame taken, then nothing for a while, then another.
        answering.wait_for_caller();
        tokio::time::sleep(SEND / 2).await;
        answering.wait_for_caller();
        let start = Instant::now();
        assert_eq!(activity.expired().await, Expired::Send);
        assert_eq!(start.elapsed(), SEND, "counted from the last frame taken");
        // A finished answer no longer counts, though another is in flight.
        let other = activity.begin();
        drop(answering);
        let waited = tokio::time::timeout(SEND * 3, activity.expired()).await;
        assert!(waited.is_err(), "a finished answer is no longer watched");
        drop(other);
        // The next answer takes its slot, and starts waiting afresh.
        let next = activity.begin().answering();
        tokio::time::sleep(SEND / 2).await;
        let start = Instant::now();
        assert_eq!(activity.expired().await, Expired::Send);
        assert_eq!(start.elapsed(), SEND / 2, "counted from when the next answer started");
        assert_eq!(activity.lock().answers.len(), 1, "one slot serves answer after answer");
        drop(next);
    }
}
