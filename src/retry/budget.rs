//! The retry budget: retries may add at most `budget` × first attempts.
//!
//! A bare retry count (`max_attempts`) bounds the work for *one* request but
//! not for the upstream: when it is really failing, every request retries to
//! the limit and five attempts each means five times the load on an upstream
//! that is already in trouble — a retry storm, the self-inflicted outage
//! tower's `retry::budget` warns about. A budget bounds the *extra* load
//! instead: over a sliding window, retries may be at most `ratio` times the
//! first attempts (`budget`, over 10 s), so a 20 % budget caps an outage's
//! load at 1.2× normal while single transient errors are still retried.
//! A small floor of `min_retries_per_sec` keeps retries possible for an
//! upstream that sees too little traffic to earn any from the ratio.
//!
//! The window is a ring of ten buckets of `window / 10`, so memory is fixed
//! and every call is O(1); an event stops counting between 9/10 of the window
//! and the whole window after it happened. The budget is `&mut` and
//! synchronous: one per upstream behind a mutex, held only for the call.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Retry;

/// The sliding window of the retry budget.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Retries per second always allowed, whatever the ratio: ten per 10 s window
/// lets a quiet upstream's rare transient error be retried.
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 1;

const BUCKETS: usize = 10;

/// Counts of one slice of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    firsts: u64,
    retries: u64,
}

/// A sliding-window retry budget; see the module doc.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Retries earned per first attempt in the window; NaN/negative read as 0.
    ratio: f64,
    /// Retries allowed per window even with no first attempts.
    floor: u64,
    /// Width of one bucket: window / 10.
    bucket_width: Duration,
    /// Where bucket 0 starts: the first instant seen, so no clock is read here.
    origin: Option<Instant>,
    /// Absolute number of the newest bucket since `origin`.
    head: u64,
    buckets: [Bucket; BUCKETS],
    /// Sums over `buckets`, kept so each call is O(1).
    firsts: u64,
    retries: u64,
}

impl RetryBudget {
    /// A budget of `ratio` retries per first attempt over `window`, plus
    /// `min_retries_per_sec` × `window` retries always allowed.
    pub fn new(ratio: f64, window: Duration, min_retries_per_sec: u32) -> Self {
        let ratio = if ratio >= 0.0 { ratio } else { 0.0 };
        // Float-to-int `as` saturates; a non-integer window rounds down.
        let floor = (f64::from(min_retries_per_sec) * window.as_secs_f64()) as u64;
        RetryBudget {
            ratio,
            floor,
            // A zero window would divide by zero below; one nanosecond
            // buckets make it "remember (almost) nothing", as asked.
            bucket_width: (window / BUCKETS as u32).max(Duration::from_nanos(1)),
            origin: None,
            head: 0,
            buckets: [Bucket::default(); BUCKETS],
            firsts: 0,
            retries: 0,
        }
    }

    /// The budget configured for an upstream's `[retry]`.
    pub fn from_config(cfg: &Retry) -> Self {
        Self::new(cfg.budget, DEFAULT_WINDOW, DEFAULT_MIN_RETRIES_PER_SEC)
    }

    /// Counts a first attempt (never a retry), which earns retry budget.
    pub fn record_request(&mut self, now: Instant) {
        let slot = self.advance(now);
        self.buckets[slot].firsts += 1;
        self.firsts += 1;
    }

    /// Takes one retry from the budget; `false` means the answer goes back as
    /// it came. A `true` is counted, so call it only when the retry happens.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let slot = self.advance(now);
        if self.retries >= self.allowed() {
            return false;
        }
        self.buckets[slot].retries += 1;
        self.retries += 1;
        true
    }

    /// Retries still available in the window at `now` (for `/status`).
    pub fn available(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.allowed().saturating_sub(self.retries)
    }

    fn allowed(&self) -> u64 {
        // `as` saturates on huge products and maps an `inf * 0` NaN to 0.
        let earned = (self.ratio * self.firsts as f64) as u64;
        earned.saturating_add(self.floor)
    }

    /// Moves the window to `now`, emptying buckets that fell out of it, and
    /// returns the slot of `now`'s bucket. An instant older than the newest
    /// bucket counts in the newest: callers on other tasks may race slightly.
    fn advance(&mut self, now: Instant) -> usize {
        let origin = *self.origin.get_or_insert(now);
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        let bucket = u64::try_from(elapsed / self.bucket_width.as_nanos()).unwrap_or(u64::MAX);
        if bucket > self.head {
            let expired = (bucket - self.head).min(BUCKETS as u64);
            for step in 1..=expired {
                let slot = slot_of(self.head, step);
                let old = std::mem::take(&mut self.buckets[slot]);
                self.firsts -= old.firsts;
                self.retries -= old.retries;
            }
            self.head = bucket;
        }
        slot_of(self.head, 0)
    }
}

/// Ring slot of bucket `head + step`, without overflowing near `u64::MAX`.
fn slot_of(head: u64, step: u64) -> usize {
    let ring = BUCKETS as u64;
    // Both terms are below BUCKETS, so the sum cannot overflow.
    ((head % ring + step % ring) % ring) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, millis: u64) -> Instant {
        base + Duration::from_millis(millis)
    }

    fn withdraw_all(b: &mut RetryBudget, now: Instant) -> u64 {
        let mut n = 0;
        while b.try_withdraw(now) {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn ratio_caps_retries_plus_floor() {
        let base = Instant::now();
        let mut b = RetryBudget::new(0.2, DEFAULT_WINDOW, 1);
        for i in 0..100 {
            b.record_request(at(base, i));
        }
        assert_eq!(b.available(at(base, 100)), 20 + 10);
        assert_eq!(withdraw_all(&mut b, at(base, 100)), 30);
        assert!(!b.try_withdraw(at(base, 200)));
    }

    #[test]
    fn ratio_zero_allows_only_the_floor() {
        let base = Instant::now();
        let mut b = RetryBudget::new(0.0, DEFAULT_WINDOW, 2);
        for i in 0..1000 {
            b.record_request(at(base, i));
        }
        assert_eq!(withdraw_all(&mut b, at(base, 1000)), 20);
        let mut none = RetryBudget::new(0.0, DEFAULT_WINDOW, 0);
        none.record_request(base);
        assert!(!none.try_withdraw(base));
    }

    #[test]
    fn old_firsts_expire() {
        let base = Instant::now();
        let mut b = RetryBudget::new(0.5, DEFAULT_WINDOW, 0);
        for _ in 0..10 {
            b.record_request(base);
        }
        assert_eq!(b.available(at(base, 9_999)), 5);
        assert_eq!(b.available(at(base, 10_000)), 0);
        assert!(!b.try_withdraw(at(base, 10_000)));
    }

    #[test]
    fn old_retries_expire() {
        let base = Instant::now();
        let mut b = RetryBudget::new(0.0, DEFAULT_WINDOW, 1);
        assert_eq!(withdraw_all(&mut b, base), 10);
        // Half the window later the spent retries still count...
        assert!(!b.try_withdraw(at(base, 5_000)));
        // ...a whole window later they are gone.
        assert_eq!(withdraw_all(&mut b, at(base, 10_000)), 10);
    }

    #[test]
    fn window_slides_bucket_by_bucket() {
        let base = Instant::now();
        let mut b = RetryBudget::new(1.0, DEFAULT_WINDOW, 0);
        // One first attempt per second for 10 s.
        for s in 0..10 {
            b.record_request(at(base, s * 1000));
        }
        assert_eq!(b.available(at(base, 9_500)), 10);
        assert_eq!(b.available(at(base, 10_500)), 9);
        assert_eq!(b.available(at(base, 14_500)), 5);
        assert_eq!(b.available(at(base, 60_000)), 0);
    }

    #[test]
    fn earlier_instant_counts_in_newest_bucket() {
        let base = Instant::now();
        let mut b = RetryBudget::new(1.0, DEFAULT_WINDOW, 0);
        b.record_request(at(base, 5_000));
        b.record_request(at(base, 1_000));
        assert_eq!(b.available(at(base, 5_000)), 2);
    }

    #[test]
    fn degenerate_parameters_do_not_panic() {
        let base = Instant::now();
        let mut nan = RetryBudget::new(f64::NAN, DEFAULT_WINDOW, 0);
        nan.record_request(base);
        assert!(!nan.try_withdraw(base));
        let mut zero_window = RetryBudget::new(1.0, Duration::ZERO, 0);
        zero_window.record_request(base);
        assert!(zero_window.try_withdraw(base));
        assert!(!zero_window.try_withdraw(at(base, 1)));
        let mut inf = RetryBudget::new(f64::INFINITY, DEFAULT_WINDOW, 0);
        assert!(!inf.try_withdraw(base));
        inf.record_request(base);
        assert!(inf.try_withdraw(base));
    }

    #[test]
    fn from_config_uses_spec_window() {
        let cfg = crate::retry::test_support::retry_config(
            Duration::from_millis(250),
            Duration::from_secs(30),
            crate::config::Jitter::Full,
        );
        let base = Instant::now();
        let mut b = RetryBudget::from_config(&cfg);
        for _ in 0..50 {
            b.record_request(base);
        }
        assert_eq!(b.available(base), 10 + DEFAULT_MIN_RETRIES_PER_SEC as u64 * 10);
    }
}
