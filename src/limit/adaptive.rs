//! Adaptive pacing: follow the upstream's real limit, not the configured one.
//!
//! A quota set too high (or shared with someone else) makes the upstream
//! answer 429. Pausing alone then oscillates: a burst at the configured rate,
//! a 429, a cooldown, again. Instead, on a 429 we lower the rate to a little
//! less than the upstream's limit as far as we can tell it (at most half the
//! rate in force per 429), and after each quiet [`PROBE_INTERVAL`] we raise
//! it by [`PROBE_STEP`] until the configured rate is back.
//!
//! The limit is told by what the upstream accepted over the quota window
//! before the refused attempt left. At low rates that count is noisy (at
//! 10/s one request more or less in the window is 10 %, and network jitter
//! moves requests across the window's edge), so a measure within one
//! request of the limit already known does not lower it: the limit is then
//! taken to be just below the pace that drew the 429. Probes stop just below
//! that limit for [`CEILING_MEMORY`], so a steady real limit is not hit again
//! every few seconds (each hit costs a whole cooldown); after that they go
//! past it, in case the limit rose, and the next 429 finds it again.

use std::time::Duration;

use tokio::time::Instant;

/// Share of the upstream's limit we settle on after a 429.
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
/// Probes stay just below the limit that drew the last 429...
const CEILING_SHARE: f64 = 0.98;
/// ...until the upstream has been quiet this long, when the limit may have risen.
pub const CEILING_MEMORY: Duration = Duration::from_secs(60);

/// The rate an upstream is paced at, below its configured quotas after 429s.
#[derive(Debug, Clone)]
pub struct Adaptive {
    /// Long-run rate of the configured quotas (requests per second).
    configured: f64,
    /// One request per quota window, as a rate: the counting noise of a
    /// measured accepted rate.
    one_request: f64,
    /// Lowered rate in force, or `None` for the configured one.
    current: Option<f64>,
    /// When the rate last changed: 429s from attempts sent before are stale.
    changed_at: Option<Instant>,
    /// The upstream's limit as the last 429 told it, and when.
    ceiling: Option<(f64, Instant)>,
}

impl Adaptive {
    /// Adaptive pacing for quotas of `configured` requests per second, whose
    /// pacing quota's window is `window`.
    pub fn new(configured: f64, window: Duration) -> Self {
        let one_request = 1.0 / window.as_secs_f64().max(f64::MIN_POSITIVE);
        Self { configured, one_request, current: None, changed_at: None, ceiling: None }
    }

    /// The lowered rate in force, if any.
    pub fn current(&self) -> Option<f64> {
        self.current
    }

    /// The upstream answered 429 to an attempt sent at `sent_at`, after it
    /// accepted `accepted_rate` requests per second over the quota window
    /// before it. Returns the new rate when it changed.
    pub fn on_rate_limited(&mut self, now: Instant, sent_at: Instant, accepted_rate: f64) -> Option<f64> {
        // Attempts sent before the last change were paced at the old rate.
        if self.changed_at.is_some_and(|at| sent_at < at) {
            return None;
        }
        let floor = self.configured * FLOOR_SHARE;
        let current = self.current.unwrap_or(self.configured);
        // Too little traffic to measure says nothing about where the limit is.
        let measured = (accepted_rate >= current * MAX_DECREASE).then_some(accepted_rate);
        let limit = measured.map(|measured| match self.ceiling {
            // Within counting noise of the limit known: it holds, and the
            // pace that drew this 429 was just above it.
            Some((known, _)) if measured + self.one_request >= known => known.min(current),
            _ => measured.min(current),
        });
        if let Some(limit) = limit {
            self.ceiling = Some((limit, now));
        }
        let lowered = limit.map_or(0.0, |limit| limit * DECREASE_MARGIN);
        let next = lowered.max(current * MAX_DECREASE).clamp(floor, current);
        self.current = Some(next);
        self.changed_at = Some(now);
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
        let mut next = current * PROBE_STEP;
        if let Some((ceiling, at)) = self.ceiling
            && now.saturating_duration_since(at) < CEILING_MEMORY
        {
            next = next.min(ceiling * CEILING_SHARE);
            if next <= current {
                return None;
            }
        }
        self.changed_at = Some(now);
        self.current = (next < self.configured).then_some(next);
        Some(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settles_below_the_accepted_rate_and_probes_back() {
        let start = Instant::now();
        let mut adaptive = Adaptive::new(150.0, Duration::from_secs(1));
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
    async fn a_measure_within_one_request_keeps_the_known_limit() {
        let start = Instant::now();
        let mut adaptive = Adaptive::new(15.0, Duration::from_secs(1));
        assert_eq!(adaptive.on_rate_limited(start, start, 10.0), Some(9.5));
        let probe = start + PROBE_INTERVAL;
        assert_eq!(adaptive.on_tick(probe), Some(Some(9.8)), "up to just below the limit");
        // Jitter moved one request out of the window: 9 counted. The limit
        // is still about 10, and 9.8 was just above it.
        let now = probe + Duration::from_secs(1);
        let rate = adaptive.on_rate_limited(now, now, 9.0).unwrap();
        assert!((rate - 9.8 * 0.95).abs() < 1e-9, "{rate}");
        // A limit that really dropped (someone else shares the key) is believed.
        let now = now + Duration::from_secs(1);
        assert_eq!(adaptive.on_rate_limited(now, now, 5.0), Some(4.75));
    }

    #[tokio::test(start_paused = true)]
    async fn never_below_the_floor_nor_above_the_current_rate() {
        let start = Instant::now();
        let mut adaptive = Adaptive::new(100.0, Duration::from_secs(1));
        // Nothing accepted: halve per 429, down to the floor.
        let mut now = start;
        for want in [50.0, 25.0, 12.5, 6.25, 5.0, 5.0] {
            assert_eq!(adaptive.on_rate_limited(now, now, 0.0), Some(want));
            now += Duration::from_secs(1);
        }
        assert_eq!(adaptive.on_rate_limited(now, now, 1000.0), Some(5.0));
    }
}
