//! Adaptive pacing: follow the upstream's real limit, not the configured one.
//!
//! A quota set too high (or shared with someone else) makes the upstream
//! answer 429. Pausing alone then oscillates: a burst at the configured rate,
//! a 429, a cooldown, again. Instead, on a 429 we lower the rate to what the
//! upstream demonstrably accepted over the last quota window (a little less,
//! and at most half the rate in force per 429),
//! and after each quiet [`PROBE_INTERVAL`] we raise it by [`PROBE_STEP`]
//! until the configured rate is back. Measuring beats a blind halving: one
//! 429 is usually enough to find a rate that holds. Probes stop just below
//! the rate that drew the 429 for [`CEILING_MEMORY`], so a steady real limit
//! is not hit again every few seconds (each hit costs a whole cooldown).

use std::time::Duration;

use tokio::time::Instant;

/// Share of the observed accepted rate we settle on after a 429.
const DECREASE_MARGIN: f64 = 0.95;
/// Never pace below this share of the configured rate.
const FLOOR_SHARE: f64 = 0.05;
/// One 429 lowers the rate at most to this share of the current rate. The
/// accepted rate says little when little was sent (a 429 on an idle upstream
/// measures about 1/s), and climbing back takes [`PROBE_INTERVAL`] per
/// [`PROBE_STEP`]: from the floor that would be minutes.
const MAX_DECREASE: f64 = 0.5;
/// Quiet time without a 429 before each step back up.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Factor of each step back up.
const PROBE_STEP: f64 = 1.05;
/// Probes stay just below the rate that last drew a 429...
const CEILING_SHARE: f64 = 0.98;
/// ...until the upstream has been quiet this long, when the limit may have risen.
pub const CEILING_MEMORY: Duration = Duration::from_secs(60);

/// The rate an upstream is paced at, below its configured quotas after 429s.
#[derive(Debug, Clone)]
pub struct Adaptive {
    /// Long-run rate of the configured quotas (requests per second).
    configured: f64,
    /// Lowered rate in force, or `None` for the configured one.
    current: Option<f64>,
    /// When the rate last changed: 429s from attempts sent before are stale.
    changed_at: Option<Instant>,
    /// The accepted rate at the last 429, and when it was seen.
    ceiling: Option<(f64, Instant)>,
}

impl Adaptive {
    pub fn new(configured: f64) -> Self {
        Self { configured, current: None, changed_at: None, ceiling: None }
    }

    /// The lowered rate in force, if any.
    pub fn current(&self) -> Option<f64> {
        self.current
    }

    /// The upstream answered 429 to an attempt sent at `sent_at`, after it
    /// accepted `accepted_rate` requests per second lately. Returns the new
    /// rate when it changed.
    pub fn on_rate_limited(&mut self, now: Instant, sent_at: Instant, accepted_rate: f64) -> Option<f64> {
        // Attempts sent before the last change were paced at the old rate.
        if self.changed_at.is_some_and(|at| sent_at < at) {
            return None;
        }
        let floor = self.configured * FLOOR_SHARE;
        let current = self.current.unwrap_or(self.configured);
        let measured = accepted_rate * DECREASE_MARGIN;
        let next = measured.max(current * MAX_DECREASE).clamp(floor, current);
        self.current = Some(next);
        self.changed_at = Some(now);
        // Too little traffic to measure says nothing about where the limit is.
        if measured >= current * MAX_DECREASE {
            self.ceiling = Some((accepted_rate, now));
        }
        Some(next)
    }

    /// Probes back up after quiet periods. Returns the new rate when it changed
    /// (`None` inside means "back to the configured rate").
    pub fn on_tick(&mut self, now: Instant) -> Option<Option<f64>> {
        let current = self.current?;
        let since = self.changed_at.map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        if since < PROBE_INTERVAL {
            return None;
        }
        if self.ceiling.is_some_and(|(_, at)| now.saturating_duration_since(at) >= CEILING_MEMORY) {
            self.ceiling = None;
        }
        let mut next = current * PROBE_STEP;
        if let Some((ceiling, _)) = self.ceiling {
            next = next.min(ceiling * CEILING_SHARE);
            if next <= current {
                return None;
            }
        }
        self.changed_at = Some(now);
        self.current = (next < self.configured).then_some(next);
        Some(self.current)
    }

    /// When the next probe is due, if one is.
    pub fn next_probe(&self) -> Option<Instant> {
        self.current?;
        self.changed_at.map(|at| at + PROBE_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settles_below_the_accepted_rate_and_probes_back() {
        let start = Instant::now();
        let mut adaptive = Adaptive::new(150.0);
        let rate = adaptive.on_rate_limited(start, start, 100.0).unwrap();
        assert!((94.0..=95.1).contains(&rate), "{rate}");
        // A second 429 from an attempt sent before the change is ignored.
        assert_eq!(adaptive.on_rate_limited(start, start - Duration::from_millis(5), 50.0), None);
        assert_eq!(adaptive.on_tick(start + Duration::from_secs(1)), None);
        let probed = adaptive.on_tick(start + PROBE_INTERVAL).unwrap().unwrap();
        assert!(probed > rate && probed <= 98.0, "{probed}");
        // Probes stay below the rate that drew the 429 while it is remembered...
        let mut now = start + PROBE_INTERVAL;
        for _ in 0..5 {
            now += PROBE_INTERVAL;
            adaptive.on_tick(now);
        }
        assert!(adaptive.current().is_some_and(|r| r <= 98.0));
        // ...then enough quiet periods bring the configured rate back.
        for _ in 0..30 {
            now += PROBE_INTERVAL;
            adaptive.on_tick(now);
        }
        assert_eq!(adaptive.current(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn never_below_the_floor_nor_above_the_current_rate() {
        let start = Instant::now();
        let mut adaptive = Adaptive::new(100.0);
        // Nothing accepted: halve per 429, down to the floor.
        let mut now = start;
        for want in [50.0, 25.0, 12.5, 6.25, 5.0, 5.0] {
            assert_eq!(adaptive.on_rate_limited(now, now, 0.0), Some(want));
            now += Duration::from_secs(1);
        }
        assert_eq!(adaptive.on_rate_limited(now, now, 1000.0), Some(5.0));
    }
}
