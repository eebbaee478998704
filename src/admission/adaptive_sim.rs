//! Adaptive pacing against a strict upstream, on a simulated clock.
//!
//! A partition configured above the upstream's real limit (a wrong `rate`)
//! is driven as the dispatcher drives it: every slot the pacer grants is
//! sent at once, arrives a few jittered milliseconds later at a strict
//! sliding-window limiter (the test mock's rules: a 429 does not count,
//! `Retry-After` is whole seconds until the oldest accepted request leaves
//! the window, at least 1), and the answer's feedback comes back after the
//! same latency. Callers are always waiting, so what the upstream accepts
//! over the run is what adaptive pacing delivers of the real quota.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use super::Feedback;
use super::pacing::{Pacing, Quotas};
use crate::config::parse_rate;

/// One way latency, before jitter.
const LATENCY: Duration = Duration::from_millis(5);
/// Arrivals are late by up to this much more, pseudo-randomly, as on a busy
/// machine: at 10/s this moves requests across the upstream's window edge.
const JITTER_MS: u64 = 30;

/// The upstream: at most `limit` accepted requests in any `window`.
struct Strict {
    limit: usize,
    window: Duration,
    accepted: VecDeque<Instant>,
}

impl Strict {
    /// Accepts the request arriving `at`, or says the `Retry-After` of its 429.
    fn answer(&mut self, at: Instant) -> Result<(), Duration> {
        while self.accepted.front().is_some_and(|oldest| *oldest + self.window <= at) {
            self.accepted.pop_front();
        }
        match self.accepted.front() {
            Some(oldest) if self.accepted.len() >= self.limit => {
                let frees_in = (*oldest + self.window - at).as_millis() as u64;
                Err(Duration::from_secs(frees_in.div_ceil(1000).max(1)))
            }
            _ => {
                self.accepted.push_back(at);
                Ok(())
            }
        }
    }
}

/// What the upstream saw over the run.
#[derive(Debug)]
struct Run {
    sent: u64,
    accepted: u64,
    rate_limited: u64,
}

/// Paces `configured` (a rate as the config spells it) with adaptive pacing
/// in front of an upstream that accepts `limit` per `window`, for `length`.
fn run(configured: &str, limit: usize, window: Duration, length: Duration) -> Run {
    let quotas = Quotas {
        rate: vec![parse_rate(configured).expect("rate")],
        burst: NonZeroU32::MIN,
        adaptive: true,
        settles: false,
    };
    let t0 = Instant::now();
    let end = t0 + length;
    let mut pacing = Pacing::new(&quotas, t0);
    let mut upstream = Strict { limit, window, accepted: VecDeque::new() };
    let mut answers: VecDeque<(Instant, Feedback)> = VecDeque::new();
    let mut run = Run { sent: 0, accepted: 0, rate_limited: 0 };
    let mut seed = 0x2545_f491_u64;
    let mut last_arrival = t0;
    let mut now = t0;
    // Each round grants a slot or moves the clock forward: bounded by the
    // slots the configured rate could ever grant, with room to spare.
    for _ in 0..10_000_000 {
        if now >= end {
            return run;
        }
        while let Some((_, feedback)) = answers.front().filter(|(at, _)| *at <= now) {
            pacing.learn("sim", feedback, false, now);
            answers.pop_front();
        }
        match pacing.admit("sim", now, NonZeroU32::MIN) {
            Ok(_slot) => {
                pacing.record_grant(now);
                run.sent += 1;
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let jitter = Duration::from_millis((seed >> 33) % (JITTER_MS + 1));
                let arrival = (now + LATENCY + jitter).max(last_arrival);
                last_arrival = arrival;
                match upstream.answer(arrival) {
                    Ok(()) => run.accepted += 1,
                    Err(retry_after) => {
                        run.rate_limited += 1;
                        let feedback = Feedback {
                            partition: 0,
                            limit: None,
                            // The exchange reads its clock just after the grant.
                            sent_at: now + Duration::from_micros(50),
                            rate_limited: true,
                            cooldown: Some(retry_after),
                            hint: None,
                        };
                        answers.push_back((arrival + LATENCY, feedback));
                    }
                }
            }
            Err(until) => {
                let answer = answers.front().map(|(at, _)| *at);
                now = answer.map_or(until, |at| at.min(until)).max(now + Duration::from_micros(1));
            }
        }
    }
    panic!("the simulation did not reach its end: {run:?}");
}

/// Asserts that adaptive pacing delivered at least 90 % of the real quota
/// with under 2 % of the attempts refused.
fn delivers_the_real_quota(configured: &str, limit: usize, window: Duration, length: Duration) {
    let run = run(configured, limit, window, length);
    let quota = limit as f64 * length.as_secs_f64() / window.as_secs_f64();
    let delivered = run.accepted as f64 / quota;
    let refused = run.rate_limited as f64 / run.sent as f64;
    assert!(
        delivered >= 0.9 && refused < 0.02,
        "{configured} against {limit} per {window:?}: delivered {:.1} % of the quota, {:.2} % of {} attempts refused",
        delivered * 100.0,
        refused * 100.0,
        run.sent
    );
}

#[test]
fn a_rate_half_again_too_high_delivers_the_real_quota_at_one_second() {
    delivers_the_real_quota("15/s", 10, Duration::from_secs(1), Duration::from_secs(300));
    delivers_the_real_quota("150/s", 100, Duration::from_secs(1), Duration::from_secs(300));
}

#[test]
fn a_rate_half_again_too_high_delivers_the_real_quota_at_one_minute() {
    delivers_the_real_quota("900/min", 600, Duration::from_secs(60), Duration::from_secs(900));
}
