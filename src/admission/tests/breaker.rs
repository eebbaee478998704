//! The breaker in the core: an open breaker holds the queue, refuses who
//! cannot wait, lets exactly the probes through, and a success drains the
//! queue at the paced rate. On a manual clock.

use std::num::NonZeroU32;

use http::StatusCode;

use super::*;
use crate::config;

/// 10/s with a breaker: 4 attempts, half failed, open 1 s (up to 4 s), one probe.
fn with_breaker() -> Limits {
    let mut limits = limits("10/s", 1);
    limits.breaker = Some(config::Breaker {
        failure_ratio: 0.5,
        min_attempts: NonZeroU32::new(4).expect("4"),
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(1),
        max_open_for: Duration::from_secs(4),
        probes: NonZeroU32::MIN,
        on_status: vec![StatusCode::INTERNAL_SERVER_ERROR],
    });
    limits
}

impl Bench {
    fn join_until(&mut self, id: u32, deadline_ms: u64) -> Result<(), Refusal> {
        let deadline = Some(self.at(deadline_ms));
        self.core.enqueue(caller(id), Place::default(), Needs::default(), (false, deadline), self.t0)
    }

    /// Four failed attempts at `ms`: the breaker opens.
    fn fail_four(&mut self, ms: u64) -> Vec<u32> {
        let mut refused = Vec::new();
        for _ in 0..4 {
            let (_, hopeless) = self.core.record_outcome(self.at(ms), self.at(ms), true, 0.0);
            refused.extend(hopeless.iter().map(|c| c.id));
        }
        refused
    }
}

#[test]
fn an_open_breaker_holds_who_can_wait_and_refuses_who_cannot() {
    let mut b = Bench::new(with_breaker());
    b.join_until(1, 60_000).expect("queued");
    b.join_until(2, 500).expect("queued");
    b.join_until(3, 60_000).expect("queued");
    assert_eq!(b.fail_four(0), [2], "its deadline comes before the break ends");
    assert_eq!(b.core.depth(), 2);
    assert!(
        matches!(b.core.next(b.at(10), false), Next::At(at) if b.ms(at) == 1_000),
        "nobody leaves while open"
    );
    let late = b.join_until(4, 900);
    assert_eq!(late, Err(Refusal::CircuitOpen { retry_after: Duration::from_secs(1) }));
    assert!(!b.core.try_leave(Place::default(), &Needs::default(), b.at(20)), "no fast path either");
    let status = b.core.status(b.at(20)).breaker.expect("a breaker");
    assert_eq!(status.state.gauge(), 2);
}

#[test]
fn half_open_lets_one_probe_through_and_a_success_drains_at_the_pace() {
    let mut b = Bench::new(with_breaker());
    for id in 0..5 {
        b.join_until(id, 60_000).expect("queued");
    }
    b.fail_four(0);
    let Next::Grant(probe) = b.core.next(b.at(1_000), false) else {
        panic!("the probe goes when the break ends")
    };
    assert_eq!(probe.id, 0, "from the head of the queue");
    assert!(matches!(b.core.next(b.at(1_001), false), Next::Full), "one probe only, until it answers");
    b.core.release(b.t0);
    let (closed, _) = b.core.record_outcome(b.at(1_050), b.at(1_000), false, 0.0);
    assert_eq!(closed, Some(Transition::Closed));
    let served = b.serve(1_050, 3_000);
    assert_eq!(ids(&served), [1, 2, 3, 4]);
    for pair in served.windows(2) {
        assert!(pair[1].1 - pair[0].1 >= 100, "drained at 10/s, not in a burst: {served:?}");
    }
}

/// A probe that ends without a verdict (a 429, its caller gone) gives its
/// place back: the next waiter probes, or the breaker would stay half-open
/// for good. An attempt granted before the break is no probe.
#[test]
fn a_probe_without_a_verdict_is_given_back() {
    let mut b = Bench::new(with_breaker());
    for id in 0..3 {
        b.join_until(id, 60_000).expect("queued");
    }
    b.fail_four(0);
    let Next::Grant(first) = b.core.next(b.at(1_000), false) else { panic!("a probe") };
    assert!(matches!(b.core.next(b.at(1_001), false), Next::Full), "one probe out");
    b.core.release(b.at(0));
    assert!(matches!(b.core.next(b.at(1_002), false), Next::Full), "granted before the break: no probe");
    b.core.release(b.at(1_000));
    let next = b.core.next(b.at(1_200), false);
    let Next::Grant(second) = next else { panic!("the next waiter probes, paced: {next:?}") };
    assert_eq!((first.id, second.id), (0, 1));
    let (closed, _) = b.core.record_outcome(b.at(1_250), b.at(1_200), false, 0.0);
    assert_eq!(closed, Some(Transition::Closed));
    b.core.release(b.at(1_200));
    let state = b.core.status(b.at(1_250)).breaker.map(|s| s.state);
    assert_eq!(state, Some(super::super::breaker::State::Closed), "a verdict ends it");
}

#[test]
fn a_failed_probe_reopens_for_longer() {
    let mut b = Bench::new(with_breaker());
    b.join_until(0, 60_000).expect("queued");
    b.join_until(1, 60_000).expect("queued");
    b.fail_four(0);
    let Next::Grant(_) = b.core.next(b.at(1_000), false) else { panic!("a probe") };
    b.core.release(b.t0);
    let (reopened, _) = b.core.record_outcome(b.at(1_100), b.at(1_000), true, 0.0);
    assert_eq!(
        reopened,
        Some(Transition::Opened { open_for: Duration::from_secs(2), failures: 1, attempts: 1 })
    );
    assert!(matches!(b.core.next(b.at(1_200), false), Next::At(at) if b.ms(at) == 3_100), "doubled");
}
