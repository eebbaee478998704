//! How long to wait before a retry.
//!
//! Exponential backoff (`base_delay * 2^(n-1)`, capped by `max_delay`) with
//! jitter, in the AWS "Exponential Backoff and Jitter" sense: `full` spreads
//! callers over the whole `[0, d]` and sheds load best, `equal` keeps at least
//! half the delay, `none` is deterministic.
//!
//! When the upstream says when to come back (`Retry-After`, `retry-after-ms`)
//! and `respect_retry_after` is on, its word beats our guess: the delay is the
//! hint plus a small *upward-only* spread, never less than the hint. Without
//! the spread every caller that got the same 429 would arrive at the reset
//! instant together and trip the limit again. The spread is jittered (per
//! `jitter`; `none` adds nothing) over `min(backoff(n), HINT_SPREAD_CAP)`:
//! one second covers the granularity of `Retry-After` itself (whole seconds,
//! so the real reset lies anywhere in the following second) without
//! noticeably delaying anyone, and tying it to `backoff(n)` keeps early
//! retries of fast upstreams (small `base_delay`) tight.
//!
//! Whether a hint is too long to wait (`max_retry_after`) is asked separately
//! with [`retry_after_too_long`]: then the answer goes back as it came.
//!
//! The random source is a parameter so tests are deterministic.

use std::time::Duration;

use rand::{Rng, RngExt};

use crate::config::{Jitter, Retry};

/// Largest upward spread added on top of a server's retry hint.
pub const HINT_SPREAD_CAP: Duration = Duration::from_secs(1);

/// The capped exponential delay for retry number `retry` (1 = first retry),
/// before jitter. Non-decreasing in `retry`, never above `max_delay`, no
/// overflow for any `retry`; 0 is treated as 1.
pub fn exponential(cfg: &Retry, retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1);
    // 2^doublings overflows u32 past 31 doublings: by then any non-zero base
    // is far above any sane cap, so saturate to the cap.
    let grown = 1u32.checked_shl(doublings).and_then(|factor| cfg.base_delay.checked_mul(factor));
    match grown {
        Some(d) => d.min(cfg.max_delay),
        None if cfg.base_delay.is_zero() => Duration::ZERO,
        None => cfg.max_delay,
    }
}

/// The delay before retry number `retry` (1 = first retry).
///
/// `retry_after` is the upstream's hint (see `hints::retry_after`); it is
/// used only when `respect_retry_after` is on, and the result is then never
/// below it and at most `HINT_SPREAD_CAP` above it. Without a hint the
/// result never exceeds `max_delay`.
pub fn delay(cfg: &Retry, retry: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
    let backoff = exponential(cfg, retry);
    match retry_after.filter(|_| cfg.respect_retry_after) {
        None => jitter(cfg.jitter, backoff, rng),
        Some(hint) => {
            let spread = match cfg.jitter {
                Jitter::None => Duration::ZERO,
                j => jitter(j, backoff.min(HINT_SPREAD_CAP), rng),
            };
            hint.saturating_add(spread)
        }
    }
}

/// True when the upstream asks for a longer wait than `max_retry_after`: the
/// answer then goes back to the caller without retry. A hint that is ignored
/// (`respect_retry_after` off) or absent is never too long.
pub fn retry_after_too_long(cfg: &Retry, retry_after: Option<Duration>) -> bool {
    cfg.respect_retry_after && retry_after.is_some_and(|hint| hint > cfg.max_retry_after)
}

fn jitter(mode: Jitter, d: Duration, rng: &mut impl Rng) -> Duration {
    match mode {
        Jitter::Full => uniform(d, rng),
        Jitter::Equal => {
            let half = d / 2;
            half + uniform(d - half, rng)
        }
        Jitter::None => d,
    }
}

/// Uniform in `[0, max]` at nanosecond resolution.
fn uniform(max: Duration, rng: &mut impl Rng) -> Duration {
    // Durations beyond u64 nanoseconds (584 years) are clamped; still <= max.
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::retry::test_support::retry_config;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn exponential_doubles_then_caps() {
        let cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::None);
        let got: Vec<_> = (1..=9).map(|n| exponential(&cfg, n).as_millis()).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(exponential(&cfg, 0), ms(250));
        assert_eq!(exponential(&cfg, u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn zero_base_stays_zero() {
        let cfg = retry_config(Duration::ZERO, Duration::from_secs(30), Jitter::None);
        assert_eq!(exponential(&cfg, 1), Duration::ZERO);
        assert_eq!(exponential(&cfg, u32::MAX), Duration::ZERO);
    }

    #[test]
    fn no_jitter_is_the_exponential() {
        let cfg = retry_config(ms(100), Duration::from_secs(5), Jitter::None);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(delay(&cfg, 3, None, &mut rng), ms(400));
    }

    #[test]
    fn full_and_equal_stay_in_their_ranges() {
        let mut rng = StdRng::seed_from_u64(7);
        let full = retry_config(ms(1000), Duration::from_secs(30), Jitter::Full);
        let equal = retry_config(ms(1000), Duration::from_secs(30), Jitter::Equal);
        let (mut full_low, mut equal_low) = (false, false);
        for _ in 0..1000 {
            let f = delay(&full, 2, None, &mut rng);
            assert!(f <= ms(2000));
            full_low |= f < ms(500);
            let e = delay(&equal, 2, None, &mut rng);
            assert!(e >= ms(1000) && e <= ms(2000));
            equal_low |= e < ms(1100);
        }
        assert!(full_low && equal_low, "jitter should cover the low end");
    }

    #[test]
    fn hint_is_a_floor_with_small_upward_spread() {
        let cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::Full);
        let mut rng = StdRng::seed_from_u64(3);
        let hint = Duration::from_secs(10);
        for n in [1, 3, 10] {
            let d = delay(&cfg, n, Some(hint), &mut rng);
            assert!(d >= hint && d <= hint + exponential(&cfg, n).min(HINT_SPREAD_CAP));
        }
    }

    #[test]
    fn hint_with_no_jitter_is_exact() {
        let cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::None);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(delay(&cfg, 5, Some(ms(1500)), &mut rng), ms(1500));
    }

    #[test]
    fn hint_ignored_when_not_respected() {
        let mut cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::None);
        cfg.respect_retry_after = false;
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(delay(&cfg, 1, Some(Duration::from_secs(60)), &mut rng), ms(250));
        assert!(!retry_after_too_long(&cfg, Some(Duration::from_secs(1000))));
    }

    #[test]
    fn too_long_hint_is_reported() {
        let cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::Full);
        // retry_config sets max_retry_after = 120 s.
        assert!(!retry_after_too_long(&cfg, None));
        assert!(!retry_after_too_long(&cfg, Some(Duration::from_secs(120))));
        assert!(retry_after_too_long(&cfg, Some(Duration::from_secs(121))));
    }

    #[test]
    fn huge_hint_saturates() {
        let cfg = retry_config(ms(250), Duration::from_secs(30), Jitter::Full);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(delay(&cfg, 1, Some(Duration::MAX), &mut rng), Duration::MAX);
    }

    fn jitter_mode() -> impl Strategy<Value = Jitter> {
        prop_oneof![Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::None)]
    }

    proptest! {
        #[test]
        fn delay_bounds(
            base_ms in 0u64..10_000,
            max_ms in 0u64..120_000,
            mode in jitter_mode(),
            respect in any::<bool>(),
            n in any::<u32>(),
            hint_ms in proptest::option::of(0u64..300_000),
            seed in any::<u64>(),
        ) {
            let mut cfg = retry_config(ms(base_ms), ms(max_ms), mode);
            cfg.respect_retry_after = respect;
            let hint = hint_ms.map(ms);
            let d = delay(&cfg, n, hint, &mut StdRng::seed_from_u64(seed));
            match hint.filter(|_| respect) {
                Some(h) => {
                    prop_assert!(d >= h);
                    prop_assert!(d <= cfg.max_delay.max(h + HINT_SPREAD_CAP));
                }
                None => prop_assert!(d <= cfg.max_delay),
            }
        }

        #[test]
        fn exponential_is_monotone_and_capped(
            base_ms in 0u64..100_000,
            max_ms in 0u64..1_000_000,
            n in any::<u32>(),
        ) {
            let cfg = retry_config(ms(base_ms), ms(max_ms), Jitter::None);
            let a = exponential(&cfg, n);
            let b = exponential(&cfg, n.saturating_add(1));
            prop_assert!(a <= b);
            prop_assert!(b <= cfg.max_delay);
        }
    }
}
