//! The circuit breaker: stop sending to an upstream that is failing, and
//! hold the queue instead of failing it.
//!
//! Closed, it counts attempt outcomes over a sliding window; once at least
//! `min_attempts` were made and `failure_ratio` of them failed, it opens.
//! Open, no attempt leaves (no quota, no retry budget is spent) until the
//! break ends; the core keeps the waiters that can wait that long and
//! refuses the others (`circuit_open`). Half-open, exactly `probes` attempts
//! leave; one success closes it and the queue then drains at the paced rate
//! (the pacer, not the breaker, decides when each leaves: no stampede); a
//! failure reopens it with the break doubled, jittered, up to `max_open_for`.
//!
//! One breaker per upstream, not per partition: an API that is down is down
//! for every key. With `[redis]`, an opening is shared: another replica's
//! break reaches this one as [`Breaker::force_open`]. Like the rest of the
//! core it reads no clock: `now` and the jitter are passed in.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::pacing::later;
use super::{Admission, Waiter};
use crate::config;

/// Share of a reopened break that jitter may take off, so that replicas and
/// upstreams that failed together do not all probe at the same instant.
const JITTER: f64 = 0.2;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// No attempt leaves before `until`.
    Open {
        until: Instant,
    },
    /// `left` probes may still leave; the break to use if one fails.
    HalfOpen {
        left: u32,
        since: Instant,
    },
}

impl State {
    /// `pacegate_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen { .. } => "half_open",
            Self::Open { .. } => "open",
        }
    }
}

/// What an outcome changed, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened (or reopened) for this long, after `failures` of `attempts` failed.
    Opened { open_for: Duration, failures: usize, attempts: usize },
    /// A probe succeeded.
    Closed,
}

/// A breaker as `/status` shows it.
#[derive(Debug, Clone, Copy)]
pub struct BreakerStatus {
    pub state: State,
    /// Failed attempts and attempts in the window now (closed only).
    pub failures: usize,
    pub attempts: usize,
}

/// One upstream's breaker. See the module doc.
#[derive(Debug)]
pub struct Breaker {
    config: config::Breaker,
    state: State,
    /// Outcomes in the window: (when the answer came, failed).
    outcomes: VecDeque<(Instant, bool)>,
    /// The break the last opening used; a reopening doubles it.
    last_break: Duration,
    /// Half-open, another replica's probe is out: no probe of ours leaves
    /// before this instant ([`Self::hold`]).
    held_until: Option<Instant>,
}

impl Breaker {
    pub fn new(config: config::Breaker) -> Self {
        Self {
            last_break: config.open_for,
            config,
            state: State::Closed,
            outcomes: VecDeque::new(),
            held_until: None,
        }
    }

    /// New settings; the state is kept (a reload with the same settings
    /// does not get here).
    pub fn reconfigure(&mut self, config: config::Breaker) {
        self.last_break = self.last_break.clamp(config.open_for, config.max_open_for);
        self.config = config;
    }

    pub fn config(&self) -> &config::Breaker {
        &self.config
    }

    /// The state at `now` (an ended break becomes half-open).
    pub fn state(&mut self, now: Instant) -> State {
        if let State::Open { until } = self.state
            && until <= now
        {
            self.state = State::HalfOpen { left: self.config.probes.get(), since: now };
        }
        self.state
    }

    /// May an attempt leave at `now`? Otherwise, until when nothing leaves
    /// (`None`: until a probe's answer comes back).
    pub fn admits(&mut self, now: Instant) -> Result<(), Option<Instant>> {
        match self.state(now) {
            State::Closed => Ok(()),
            State::Open { until } => Err(Some(until)),
            State::HalfOpen { left: 0, .. } => Err(None),
            State::HalfOpen { .. } => match self.held_until.filter(|until| *until > now) {
                Some(until) => Err(Some(until)),
                None => Ok(()),
            },
        }
    }

    /// An attempt left (after [`Self::admits`] said yes): a probe, if half-open.
    pub fn granted(&mut self) {
        if let State::HalfOpen { left, .. } = &mut self.state {
            *left = left.saturating_sub(1);
        }
    }

    /// An attempt granted at `granted` ended. If it was a probe of the
    /// half-open phase still running, its answer gave no verdict (a 429, a
    /// caller gone, shutdown's last call): its probe goes back, for the next
    /// waiter to make, or no answer could ever close or reopen the breaker.
    /// After a verdict the phase is over, and this changes nothing.
    pub fn released(&mut self, granted: Instant) {
        if let State::HalfOpen { left, since } = &mut self.state
            && granted >= *since
            && *left < self.config.probes.get()
        {
            *left += 1;
        }
    }

    /// Half-open at `now`: attempts are probes.
    pub fn probing(&mut self, now: Instant) -> bool {
        matches!(self.state(now), State::HalfOpen { .. })
    }

    /// The state at `now`, as `/status` shows it.
    pub fn status(&self, now: Instant) -> BreakerStatus {
        let state = match self.state {
            State::Open { until } if until <= now => {
                State::HalfOpen { left: self.config.probes.get(), since: now }
            }
            state => state,
        };
        let recent =
            self.outcomes.iter().filter(|(at, _)| now.saturating_duration_since(*at) <= self.config.window);
        let (failures, attempts) =
            recent.fold((0, 0), |(f, a), (_, failed)| (f + usize::from(*failed), a + 1));
        BreakerStatus { state, failures, attempts }
    }

    /// When the current break ends, if the breaker is open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Failures and attempts in the window ending at `now`.
    pub fn counts(&mut self, now: Instant) -> (usize, usize) {
        self.forget_before(now);
        (self.outcomes.iter().filter(|(_, failed)| *failed).count(), self.outcomes.len())
    }

    /// An attempt sent at `sent_at` ended at `now`, `failed` or not.
    /// `jitter` in `[0, 1)` shortens a reopened break by up to a fifth.
    pub fn record(
        &mut self,
        now: Instant,
        sent_at: Instant,
        failed: bool,
        jitter: f64,
    ) -> Option<Transition> {
        match self.state(now) {
            // An answer to an attempt sent before the break says nothing new.
            State::Open { .. } => None,
            State::HalfOpen { since, .. } if sent_at < since => None,
            State::HalfOpen { .. } if failed => {
                let doubled = self.last_break.saturating_mul(2).min(self.config.max_open_for);
                let jittered = doubled.mul_f64(1.0 - JITTER * jitter.clamp(0.0, 1.0));
                Some(self.open(now, jittered.max(self.config.open_for), (1, 1)))
            }
            State::HalfOpen { .. } => {
                self.state = State::Closed;
                self.outcomes.clear();
                self.last_break = self.config.open_for;
                Some(Transition::Closed)
            }
            State::Closed => {
                self.outcomes.push_back((now, failed));
                let (failures, attempts) = self.counts(now);
                let tripped = attempts >= self.config.min_attempts.get() as usize
                    && failures as f64 >= self.config.failure_ratio * attempts as f64;
                tripped.then(|| self.open(now, self.config.open_for, (failures, attempts)))
            }
        }
    }

    /// Half-open, and another replica's probe is out: no probe of ours
    /// leaves for `wait`, then this breaker asks anew. The half-open phase
    /// goes on (the answers of probes of ours still out still count) and
    /// no break is made. In any other state, nothing changes.
    pub fn hold(&mut self, now: Instant, wait: Duration) {
        if let State::HalfOpen { .. } = self.state {
            self.held_until = Some(later(now, wait));
        }
    }

    /// Another replica opened the upstream's breaker for `open_for` more:
    /// open here too, until then (never shortening a break of its own).
    pub fn force_open(&mut self, now: Instant, open_for: Duration) {
        let until = later(now, open_for);
        if self.open_until().is_some_and(|current| current >= until) {
            return;
        }
        self.state = State::Open { until };
        self.last_break = open_for.clamp(self.config.open_for, self.config.max_open_for);
        self.outcomes.clear();
    }

    fn open(&mut self, now: Instant, open_for: Duration, (failures, attempts): (usize, usize)) -> Transition {
        self.state = State::Open { until: later(now, open_for) };
        self.last_break = open_for;
        self.outcomes.clear();
        Transition::Opened { open_for, failures, attempts }
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .outcomes
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.config.window)
        {
            self.outcomes.pop_front();
        }
    }
}

// === impl Admission ===

impl<W: Waiter> Admission<W> {
    /// An attempt sent at `sent_at` ended at `now`, `failed` or not (see
    /// [`Breaker::record`]). When that opens the breaker, the waiters whose
    /// deadline comes before the break ends are returned, to be answered
    /// `circuit_open` now; those that can wait stay queued.
    pub fn record_outcome(
        &mut self,
        now: Instant,
        sent_at: Instant,
        failed: bool,
        jitter: f64,
    ) -> (Option<Transition>, Vec<W>) {
        let Some(breaker) = &mut self.breaker else { return (None, Vec::new()) };
        let transition = breaker.record(now, sent_at, failed, jitter);
        if !matches!(transition, Some(Transition::Opened { .. })) {
            return (transition, Vec::new());
        }
        (transition, self.outwaited_by_break())
    }

    /// While the breaker is open, the waiters whose deadline comes before
    /// the break ends, taken out of the queue to be answered `circuit_open`.
    pub fn outwaited_by_break(&mut self) -> Vec<W> {
        let Some(until) = self.breaker.as_ref().and_then(Breaker::open_until) else { return Vec::new() };
        let bound = super::since(self.epoch, until);
        let mut hopeless = Vec::new();
        for partition in self.partitions.values_mut() {
            let (mut refused, gone) = partition.due_before(bound);
            self.held -= refused.len() + gone;
            self.departed = self.departed.saturating_sub(gone);
            hopeless.append(&mut refused);
        }
        let partitions = &self.partitions;
        self.ready.retain(|key| partitions.get(&key.partition).is_some_and(|p| p.has_waiters(key.set)));
        hopeless
    }

    /// What remains of an open break at `now`, for a `circuit_open` answer.
    pub fn break_left(&self, now: Instant) -> Option<Duration> {
        let until = self.breaker.as_ref()?.open_until()?;
        Some(until.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use http::StatusCode;

    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(config::Breaker {
            failure_ratio: 0.5,
            min_attempts: NonZeroU32::new(4).expect("4"),
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(12),
            probes: NonZeroU32::MIN,
            on_status: vec![StatusCode::INTERNAL_SERVER_ERROR],
        })
    }

    #[test]
    fn opens_on_the_failure_ratio_over_enough_attempts() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = breaker();
        assert_eq!(b.record(at(0), at(0), true, 0.0), None);
        assert_eq!(b.record(at(1), at(1), true, 0.0), None);
        assert_eq!(b.record(at(2), at(2), true, 0.0), None, "3 failures, but fewer than min_attempts");
        let opened = b.record(at(3), at(3), false, 0.0);
        assert_eq!(
            opened,
            Some(Transition::Opened { open_for: Duration::from_secs(5), failures: 3, attempts: 4 })
        );
        assert_eq!(b.admits(at(4)), Err(Some(at(5_003))));
        assert_eq!(b.state(at(4)).gauge(), 2);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = breaker();
        for s in 0..3 {
            b.record(at(s), at(s), true, 0.0);
        }
        assert_eq!(b.record(at(20), at(20), true, 0.0), None, "the first three are 20 s old");
        assert_eq!(b.counts(at(20)), (1, 1));
        for s in 21..24 {
            assert_eq!(b.record(at(s), at(s), false, 0.0), None, "1 failure in 4 is below the ratio");
        }
        assert_eq!(b.open_until(), None);
    }

    #[test]
    fn half_open_lets_exactly_the_probes_through_and_a_success_closes() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = breaker();
        for ms in 0..4 {
            b.record(at(ms), at(ms), true, 0.0);
        }
        assert!(b.admits(at(4_999)).is_err());
        assert_eq!(b.admits(at(5_003)), Ok(()), "the break is over: a probe may go");
        b.granted();
        assert_eq!(b.admits(at(5_004)), Err(None), "one probe only, until it answers");
        assert_eq!(b.state(at(5_004)).gauge(), 1);
        assert_eq!(b.record(at(5_010), at(2), true, 0.0), None, "an answer to an older attempt is ignored");
        assert_eq!(b.record(at(5_050), at(5_004), false, 0.0), Some(Transition::Closed));
        assert_eq!(b.admits(at(5_051)), Ok(()));
        assert_eq!(b.counts(at(5_051)), (0, 0), "closed with a clean window");
    }

    /// Held while another replica's probe is out, the breaker asks again
    /// after the hold, half-open with its probes, and a failed probe then
    /// doubles the break it had, not a break the hold made.
    #[test]
    fn a_hold_while_another_probe_is_out_is_no_break() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..4 {
            b.record(t0, t0, true, 0.0);
        }
        let half_open = b.open_until().expect("open");
        assert_eq!(b.admits(half_open), Ok(()), "half-open");
        b.hold(half_open, Duration::from_secs(1));
        let after = half_open + Duration::from_secs(1);
        assert_eq!(b.admits(after - Duration::from_millis(1)), Err(Some(after)));
        assert_eq!(b.admits(after), Ok(()), "half-open again: it asks anew");
        b.granted();
        let Some(Transition::Opened { open_for, .. }) = b.record(after, after, true, 0.0) else {
            panic!("reopens")
        };
        assert_eq!(open_for, Duration::from_secs(10), "the 5 s break doubled, as without the hold");
    }

    /// A hold keeps a half-open breaker's next probe back, nothing more: a
    /// closed breaker is not held, and a probe of ours that was out still
    /// closes the breaker when it succeeds during the hold.
    #[test]
    fn a_hold_keeps_back_a_half_open_breaker_s_next_probe_only() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = breaker();
        b.hold(t0, Duration::from_secs(1));
        assert_eq!(b.admits(t0), Ok(()), "closed: nothing held");
        for _ in 0..4 {
            b.record(t0, t0, true, 0.0);
        }
        let half_open = b.open_until().expect("open");
        assert_eq!(b.admits(half_open), Ok(()));
        b.granted();
        b.hold(half_open, Duration::from_secs(1));
        let closed = b.record(half_open + ms(10), half_open, false, 0.0);
        assert!(matches!(closed, Some(Transition::Closed)), "{closed:?}");
        assert_eq!(b.admits(half_open + ms(20)), Ok(()));
    }

    #[test]
    fn a_failed_probe_doubles_the_break_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = breaker();
        for _ in 0..4 {
            b.record(now, now, true, 0.0);
        }
        let mut breaks = Vec::new();
        for _ in 0..4 {
            now = b.open_until().expect("open");
            assert_eq!(b.admits(now), Ok(()));
            b.granted();
            let Some(Transition::Opened { open_for, .. }) = b.record(now, now, true, 0.0) else {
                panic!("reopens")
            };
            breaks.push(open_for.as_secs());
        }
        assert_eq!(breaks, [10, 12, 12, 12], "5 s doubled, capped at max_open_for");
        now = b.open_until().expect("open");
        b.granted();
        let Some(Transition::Opened { open_for, .. }) = b.record(now, now, true, 0.99) else {
            panic!("reopens")
        };
        assert!(
            open_for < Duration::from_secs(12) && open_for >= Duration::from_millis(9_600),
            "{open_for:?}"
        );
    }
}
