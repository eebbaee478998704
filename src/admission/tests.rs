//! The admission rules on a manual clock: every instant is `t0` plus a
//! number of milliseconds, and nothing sleeps.

use std::cell::Cell;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::parse_rate;
use crate::retry::{RateLimitHint, Refill};

/// A queued caller: a number, and whether it went away.
#[derive(Debug)]
struct Caller {
    id: u32,
    gone: Rc<Cell<bool>>,
}

impl Waiter for Caller {
    fn gone(&self) -> bool {
        self.gone.get()
    }
}

fn caller(id: u32) -> Caller {
    Caller { id, gone: Rc::new(Cell::new(false)) }
}

fn limits(rate: &str, burst: u32) -> Limits {
    Limits {
        quotas: Quotas {
            rate: vec![parse_rate(rate).expect("rate")],
            burst: NonZeroU32::new(burst).expect("burst"),
            adaptive: false,
            settles: false,
        },
        endpoints: Vec::new(),
        breaker: None,
        queue_size: 100,
        max_concurrency: 100,
        max_partitions: 100,
        tokens: TokenQuotas::default(),
    }
}

/// A core and its clock.
struct Bench {
    core: Admission<Caller>,
    t0: Instant,
}

impl Bench {
    fn new(limits: Limits) -> Self {
        Self::with(limits, false, false)
    }

    fn with(limits: Limits, partitioned: bool, shared: bool) -> Self {
        let t0 = Instant::now();
        Self { core: Admission::new("test", limits, partitioned, shared, t0), t0 }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ms(&self, at: Instant) -> u64 {
        at.duration_since(self.t0).as_millis() as u64
    }

    /// A core deciding with the shared limiter, `n` callers queued, and the
    /// confirmation it asks for first.
    fn shared_confirming(limits: Limits, n: u32) -> (Self, Confirm) {
        let mut b = Self::with(limits, false, true);
        for id in 0..n {
            b.join(id, Place::default());
        }
        let Next::Confirm(confirm) = b.core.next(b.t0, true) else { panic!("the shared limiter decides") };
        (b, confirm)
    }

    fn join(&mut self, id: u32, place: Place) {
        self.core.enqueue(caller(id), place, Needs::default(), (false, None), self.t0).expect("queued");
    }

    /// Serves everyone from `start`, each attempt ending at once, sleeping
    /// to each instant the core names: (caller, ms it left).
    fn serve(&mut self, start: u64, until: u64) -> Vec<(u32, u64)> {
        let mut now = self.at(start);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            match self.core.next(now, false) {
                Next::Grant(caller) => {
                    out.push((caller.id, self.ms(now)));
                    self.core.release(now);
                }
                Next::At(at) if self.ms(at) <= until => now = at,
                _ => break,
            }
        }
        out
    }
}

/// A 429 for partition `partition`, sent at `sent_at`, that pauses it for `pause`.
fn a_429(sent_at: Instant, partition: u64, pause: Duration) -> Feedback {
    Feedback { limit: None, partition, sent_at, rate_limited: true, cooldown: Some(pause), hint: None }
}

fn ids(served: &[(u32, u64)]) -> Vec<u32> {
    served.iter().map(|(id, _)| *id).collect()
}

fn place(partition: u64, caller: u64, priority: Priority) -> Place {
    Place { partition, caller, priority }
}

#[test]
fn waiters_leave_in_order_one_interval_apart() {
    let mut b = Bench::new(limits("10/s", 1));
    for id in 0..5 {
        b.join(id, Place::default());
    }
    let served = b.serve(0, 10_000);
    assert_eq!(ids(&served), [0, 1, 2, 3, 4]);
    for pair in served.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!((100..=101).contains(&gap), "10/s leaves 100 ms apart (margins included): {served:?}");
    }
}

#[test]
fn a_retry_rejoins_at_the_head() {
    let mut b = Bench::new(limits("10/s", 1));
    for id in 0..3 {
        b.join(id, Place::default());
    }
    assert_eq!(ids(&b.serve(0, 0)), [0]);
    b.core
        .enqueue(caller(9), Place::default(), Needs::default(), (true, None), b.at(1))
        .expect("a retry is queued");
    assert_eq!(ids(&b.serve(1, 10_000)), [9, 1, 2]);
}

#[test]
fn callers_are_served_round_robin() {
    let mut b = Bench::new(limits("1000/s", 1));
    for id in 0..6 {
        b.join(id, place(SINGLE, 1, Priority::Normal));
    }
    for id in 10..12 {
        b.join(id, place(SINGLE, 2, Priority::Normal));
    }
    assert_eq!(ids(&b.serve(0, 1_000)), [0, 10, 1, 11, 2, 3, 4, 5]);
}

#[test]
fn high_priority_goes_first_and_low_is_never_starved() {
    let mut b = Bench::new(limits("1000/s", 1));
    for id in 100..103 {
        b.join(id, place(SINGLE, 0, Priority::Low));
    }
    for id in 0..20 {
        b.join(id, place(SINGLE, 0, Priority::High));
    }
    let order = ids(&b.serve(0, 1_000));
    assert_eq!(order[0], 0, "high jumps ahead of earlier lows");
    for window in order[..15].chunks(5) {
        assert_eq!(window.iter().filter(|id| **id >= 100).count(), 1, "one grant in five is low: {order:?}");
    }
}

#[test]
fn a_partition_in_cooldown_is_skipped_without_holding_others() {
    let mut b = Bench::with(limits("10/s", 1), true, false);
    let feedback = a_429(b.t0, 1, Duration::from_secs(5));
    assert_eq!(b.core.feedback(&feedback, false, b.t0), Some(Duration::from_secs(5)), "shared with replicas");
    assert_eq!(b.core.take_cooled(), Duration::from_secs(5), "counted for the cooldown metric");
    for id in 0..3 {
        b.join(id, place(1, 0, Priority::Normal));
        b.join(10 + id, place(2, 0, Priority::Normal));
    }
    let served = b.serve(0, 1_000);
    assert_eq!(ids(&served), [10, 11, 12], "partition 2 goes at its own pace: {served:?}");
    let served = b.serve(1_000, 10_000);
    assert_eq!(ids(&served), [0, 1, 2]);
    assert_eq!(served[0].1, 5_000, "partition 1 leaves when its cooldown ends");
    assert!(b.core.status(b.t0).last_rate_limited.is_some());
}

#[test]
fn concurrency_is_bounded() {
    let mut b = Bench::new(Limits { max_concurrency: 2, ..limits("1000/s", 10) });
    for id in 0..4 {
        b.join(id, Place::default());
    }
    let now = b.t0;
    assert!(matches!(b.core.next(now, false), Next::Grant(Caller { id: 0, .. })));
    assert!(matches!(b.core.next(now, false), Next::Grant(Caller { id: 1, .. })));
    assert!(matches!(b.core.next(now, false), Next::Full), "two in flight");
    assert!(b.core.release(b.t0), "waiters wait: the driver must look again");
    assert!(matches!(b.core.next(now, false), Next::Grant(Caller { id: 2, .. })));
    assert_eq!(b.core.status(b.t0).in_flight, 2);
}

#[test]
fn the_queue_is_bounded_and_retries_keep_their_place() {
    let mut b = Bench::new(Limits { queue_size: 3, ..limits("10/s", 1) });
    for id in 0..3 {
        b.join(id, Place::default());
    }
    let refused = b.core.enqueue(caller(3), Place::default(), Needs::default(), (false, None), b.t0);
    assert!(matches!(refused, Err(Refusal::Full { .. })), "{refused:?}");
    b.core
        .enqueue(caller(4), Place::default(), Needs::default(), (true, None), b.t0)
        .expect("a retry is not refused");
    assert_eq!(b.core.depth(), 4);
}

#[test]
fn a_caller_that_left_is_skipped_and_spends_nothing() {
    let mut b = Bench::new(limits("10/s", 1));
    let leaving = caller(0);
    let gone = leaving.gone.clone();
    b.core.enqueue(leaving, Place::default(), Needs::default(), (false, None), b.t0).expect("queued");
    b.join(1, Place::default());
    gone.set(true);
    b.core.depart();
    assert_eq!(b.core.depth(), 1, "counted out at once");
    assert_eq!(b.serve(0, 0), [(1, 0)], "the slot goes to the next caller, now");
    assert_eq!(b.core.depth(), 0);
    assert!(matches!(b.core.next(b.t0, false), Next::Idle));
}

#[test]
fn partitions_make_room_for_new_keys_least_recently_used_first() {
    let mut b = Bench::with(Limits { max_partitions: 2, ..limits("10/s", 1) }, true, false);
    for (partition, at) in [(1, 0), (2, 10)] {
        assert!(b.core.try_leave(place(partition, 0, Priority::Normal), &Needs::default(), b.at(at)));
        b.core.release(b.t0);
    }
    b.core
        .enqueue(caller(3), place(3, 0, Priority::Normal), Needs::default(), (false, None), b.at(50))
        .expect("room made");
    assert_eq!(b.core.partitions(), 2);
    assert!(
        !b.core.try_leave(place(2, 0, Priority::Normal), &Needs::default(), b.at(60)),
        "key 2 kept its pacing"
    );
    // 1 was dropped, not 2: it comes back as new and leaves at once.
    b.core.sweep(b.at(60));
    assert_eq!(b.core.partitions(), 2, "a partition with a waiter stays");
}

/// A key's partition evicted while its attempt was out (two other keys
/// came meanwhile) still cools down when that attempt draws a 429: it
/// comes back in the place of an idle one.
#[test]
fn a_429_for_an_evicted_key_still_cools_it_down() {
    let mut b = Bench::with(Limits { max_partitions: 2, ..limits("10/s", 1) }, true, false);
    let key = |partition| place(partition, 0, Priority::Normal);
    assert!(b.core.try_leave(key(1), &Needs::default(), b.t0), "key 1's attempt goes out");
    for (partition, at) in [(2, 10), (3, 20)] {
        assert!(b.core.try_leave(key(partition), &Needs::default(), b.at(at)));
    }
    let feedback = a_429(b.at(30), 1, Duration::from_secs(5));
    b.core.feedback(&feedback, false, b.at(30));
    assert_eq!(b.core.partitions(), 2);
    assert!(!b.core.try_leave(key(1), &Needs::default(), b.at(1_000)), "key 1 cools down after its 429");
}

/// A full queue's `Retry-After` for a key that cools down counts that
/// cooldown, whichever key the queue's drain was last measured on.
#[test]
fn a_full_queue_s_retry_after_counts_the_caller_s_own_cooldown() {
    let mut b = Bench::with(Limits { queue_size: 1, ..limits("100/s", 1) }, true, false);
    let key = |partition| place(partition, 0, Priority::Normal);
    b.core.feedback(&a_429(b.t0, 2, Duration::from_secs(5)), false, b.t0);
    assert!(b.core.try_leave(key(1), &Needs::default(), b.t0), "key 1 is measured last");
    b.join(1, key(1));
    let refused = b.core.enqueue(caller(3), key(2), Needs::default(), (false, None), b.t0);
    let Err(Refusal::Full { retry_after }) = refused else { panic!("{refused:?}") };
    assert!(retry_after >= Duration::from_millis(4_900), "key 2 cools down 5 s: {retry_after:?}");
}

/// A success's quota hint for a dropped key pauses nothing: it is not
/// worth another key's pacing state.
#[test]
fn a_hint_that_pauses_nothing_does_not_make_room_for_a_dropped_key() {
    let mut b = Bench::with(Limits { max_partitions: 2, ..limits("1/s", 1) }, true, false);
    let key = |partition| place(partition, 0, Priority::Normal);
    for (partition, at) in [(1, 0), (2, 10), (3, 20)] {
        assert!(b.core.try_leave(key(partition), &Needs::default(), b.at(at)));
    }
    let hint = crate::retry::HintPace { pause: None, cap: Some((100.0, Duration::from_secs(60))) };
    let feedback = Feedback {
        hint: Some(hint),
        rate_limited: false,
        cooldown: None,
        ..a_429(b.at(30), 1, Duration::ZERO)
    };
    b.core.feedback(&feedback, false, b.at(30));
    assert!(!b.core.try_leave(key(2), &Needs::default(), b.at(40)), "key 2 kept its pacing: 1/s");
}

#[test]
fn a_new_key_is_refused_while_every_partition_is_busy() {
    let mut b = Bench::with(Limits { max_partitions: 2, ..limits("10/s", 1) }, true, false);
    b.join(1, place(1, 0, Priority::Normal));
    let feedback = a_429(b.t0, 2, Duration::from_secs(5));
    b.core.feedback(&feedback, false, b.t0);
    let refused =
        b.core.enqueue(caller(3), place(3, 0, Priority::Normal), Needs::default(), (false, None), b.t0);
    assert_eq!(refused, Err(Refusal::TooManyPartitions), "one has a waiter, the other cools down");
    // A 10/s quota forgets its grants after its window; the cooldown ends.
    assert_eq!(b.serve(0, 0), [(1, 0)]);
    b.core
        .enqueue(caller(3), place(3, 0, Priority::Normal), Needs::default(), (false, None), b.at(5_000))
        .expect("room once idle");
}

#[test]
fn a_caller_leaves_at_once_only_when_nobody_waits() {
    let mut b = Bench::new(limits("10/s", 1));
    assert!(b.core.try_leave(Place::default(), &Needs::default(), b.t0));
    assert!(!b.core.try_leave(Place::default(), &Needs::default(), b.at(50)), "paced like everyone else");
    b.join(0, Place::default());
    assert!(!b.core.try_leave(Place::default(), &Needs::default(), b.at(500)), "never ahead of a waiter");
    let mut shared = Bench::with(limits("10/s", 1), false, true);
    assert!(
        !shared.core.try_leave(Place::default(), &Needs::default(), shared.t0),
        "shared quotas: the driver asks Redis"
    );
}

#[test]
fn retry_after_is_the_time_the_queue_takes_to_drain() {
    let mut b = Bench::new(limits("10/s", 1));
    assert!(b.core.try_leave(Place::default(), &Needs::default(), b.t0));
    for id in 0..9 {
        b.join(id, Place::default());
    }
    let estimate = b.core.estimate_wait(b.t0).as_secs_f64();
    assert!((estimate - 1.0).abs() < 1e-9, "9 waiting and the caller itself, at 10/s: {estimate}");
    let feedback = Feedback {
        limit: None,
        partition: SINGLE,
        sent_at: b.t0,
        rate_limited: false,
        cooldown: None,
        hint: Some(
            RateLimitHint {
                limit: None,
                remaining: 0,
                reset_after: Duration::from_secs(3),
                refill: Refill::AtReset,
            }
            .pace(Duration::MAX),
        ),
    };
    b.core.feedback(&feedback, false, b.t0);
    let estimate = b.core.estimate_wait(b.at(1_000)).as_secs_f64();
    assert!((estimate - 3.0).abs() < 1e-9, "2 s of cooldown left, then 1 s to drain: {estimate}");
}

/// The honest wait of a new caller: each request served before it in its
/// own FIFO takes a slot, and the pacer's schedule and a cooldown count.
#[test]
fn a_caller_whose_queue_ahead_outlasts_its_deadline_is_answered_at_once() {
    let mut b = Bench::new(limits("10/s", 1));
    assert!(b.core.try_leave(Place::default(), &Needs::default(), b.t0), "the first leaves");
    b.core.release(b.t0);
    // Its slot is taken: the next one is 100 ms away, with nobody queued.
    let next = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(100)..=Duration::from_millis(101)).contains(&next), "{next:?}");
    for id in 1..=4 {
        b.join(id, Place::default());
    }
    // Four ahead: the fifth slot after the first's, 500 ms (margins included).
    let wait = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(500)..=Duration::from_millis(505)).contains(&wait), "{wait:?}");
    assert_eq!(b.core.hopeless(Place::default(), &Needs::default(), b.at(600), b.t0), None, "it fits");
    let refused = b.core.hopeless(Place::default(), &Needs::default(), b.at(400), b.t0);
    assert_eq!(refused, Some(Refusal::Timeout { waited: Duration::ZERO, retry_after: wait }));
    // A caller who left is not ahead.
    let leaver = caller(9);
    let gone = leaver.gone.clone();
    b.core.enqueue(leaver, Place::default(), Needs::default(), (false, None), b.t0).expect("queued");
    assert!(b.core.queued_wait(Place::default(), &Needs::default(), b.t0) > wait + Duration::from_millis(99));
    gone.set(true);
    b.core.depart();
    assert_eq!(b.core.queued_wait(Place::default(), &Needs::default(), b.t0), wait);
    // Another caller's FIFO (fair_by) may go first.
    b.core.enqueue(caller(5), Place::default(), Needs::default(), (false, None), b.t0).expect("queued");
    let other = Place { caller: 7, ..Place::default() };
    assert!(b.core.queued_wait(other, &Needs::default(), b.t0) < Duration::from_millis(102));
    // The estimate is what happens: the fifth left when it said.
    let served = b.serve(0, 2_000);
    assert_eq!(served.get(4), Some(&(5, wait.as_millis() as u64)), "{served:?}");
}

#[test]
fn enqueue_refuses_a_hopeless_caller_but_never_a_retry() {
    let mut b = Bench::new(limits("10/s", 1));
    for id in 0..5 {
        b.join(id, Place::default());
    }
    let (hasty, patient) = (Some(b.at(400)), Some(b.at(600)));
    let refused = b.core.enqueue(caller(5), Place::default(), Needs::default(), (false, hasty), b.t0);
    assert!(matches!(refused, Err(Refusal::Timeout { .. })), "{refused:?}");
    assert_eq!(b.core.enqueue(caller(6), Place::default(), Needs::default(), (false, patient), b.t0), Ok(()));
    assert_eq!(b.core.enqueue(caller(7), Place::default(), Needs::default(), (true, hasty), b.t0), Ok(()));
    assert_eq!(ids(&b.serve(0, 2_000)), [7, 0, 1, 2, 3, 4, 6], "the retry kept its place at the head");
}

/// Callers ahead whose deadline comes before their turn time out and take
/// nothing: they do not make a newcomer's wait look longer than it is.
#[test]
fn callers_ahead_who_will_time_out_are_not_counted() {
    let mut b = Bench::new(limits("10/s", 1));
    for id in 0..5 {
        let deadline = Some(b.at(500));
        b.core
            .enqueue(caller(id), Place::default(), Needs::default(), (false, deadline), b.t0)
            .expect("fits");
    }
    b.core.feedback(&a_429(b.t0, SINGLE, Duration::from_secs(2)), false, b.t0);
    // All five give up at 500 ms, during the cooldown: the sixth leaves at 2 s.
    let wait = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(1_998)..=Duration::from_secs(2)).contains(&wait), "{wait:?}");
    let patient = (false, Some(b.at(2_300)));
    assert_eq!(b.core.enqueue(caller(5), Place::default(), Needs::default(), patient, b.t0), Ok(()));
}

/// Slots taken for the shared limiter's verdict are not counted twice:
/// their callers still queue until the verdict comes.
#[test]
fn slots_awaiting_the_shared_limiter_are_not_counted_twice() {
    let (mut b, confirm) = Bench::shared_confirming(limits("10/s", 1), 3);
    // The head's slot is taken and the head still queues: the fourth caller
    // follows three, the first of them at once.
    let wait = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(300)..=Duration::from_millis(303)).contains(&wait), "{wait:?}");
    assert_eq!(b.core.settle(confirm, Verdict::Go(1), b.t0).len(), 1);
    b.join(3, Place::default());
    let served = b.serve(0, 2_000);
    assert_eq!(served.last(), Some(&(3, wait.as_millis() as u64)), "{served:?}");
}

/// The walk is bounded: beyond the first callers ahead, the honest wait
/// counts nobody (a floor still: it can only be too short).
#[test]
fn the_honest_wait_looks_at_a_bounded_number_of_callers_ahead() {
    let mut b = Bench::new(Limits { queue_size: WALK_LIMIT + 100, ..limits("1000/s", 1) });
    let queued = WALK_LIMIT as u32 + 100;
    for id in 0..queued {
        b.join(id, Place::default());
    }
    let wait = b.core.queued_wait(Place::default(), &Needs::default(), b.t0).as_secs_f64();
    let interval = 1.007e-3;
    let walked = WALK_LIMIT as f64 * interval;
    assert!((walked - 1e-3..=walked + 1e-3).contains(&wait), "{wait} s for {queued} ahead");
}

#[test]
fn a_cooldown_and_a_burst_count_in_the_honest_wait() {
    let mut b = Bench::new(limits("10/s", 3));
    for id in 0..4 {
        b.join(id, Place::default());
    }
    // Three leave back to back, the fourth 100 ms on; a fifth 100 ms later.
    let wait = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(200)..=Duration::from_millis(203)).contains(&wait), "{wait:?}");
    let paused = a_429(b.t0, SINGLE, Duration::from_secs(2));
    b.core.feedback(&paused, false, b.t0);
    // From the cooldown's end; a slot with room may be presented up to 2 ms early.
    let cooled = b.core.queued_wait(Place::default(), &Needs::default(), b.t0);
    assert!((Duration::from_millis(2_198)..=Duration::from_millis(2_203)).contains(&cooled), "{cooled:?}");
    b.join(4, Place::default());
    let served = b.serve(0, 5_000);
    let fifth = served.iter().find(|(id, _)| *id == 4).map(|(_, at)| *at).expect("served");
    assert!((cooled.as_millis() as u64..=cooled.as_millis() as u64 + 2).contains(&fifth), "{served:?}");
}

#[test]
fn the_shared_limiter_confirms_a_batch_and_unused_slots_go_back() {
    let (mut b, confirm) = Bench::shared_confirming(limits("10/s", 5), 3);
    assert_eq!(confirm.wanted(), 3, "one round trip for every caller a slot is free for");
    let granted = b.core.settle(confirm, Verdict::Go(2), b.t0);
    assert_eq!(granted.iter().map(|c| c.id).collect::<Vec<_>>(), [0, 1]);
    // The third slot went back: the burst still has three.
    let Next::Confirm(confirm) = b.core.next(b.t0, true) else { panic!("caller 2 still waits") };
    assert_eq!(confirm.wanted(), 1);
    assert!(b.core.settle(confirm, Verdict::Wait(Duration::from_millis(500), None), b.t0).is_empty());
    assert!(matches!(b.core.next(b.at(10), true), Next::At(at) if at == b.at(500)), "held as Redis said");
    let Next::Confirm(confirm) = b.core.next(b.at(500), true) else { panic!("asked again") };
    assert_eq!(b.core.settle(confirm, Verdict::Go(1), b.at(500)).len(), 1);
}

#[test]
fn a_reload_changes_bounds_at_once_and_keeps_a_cooldown() {
    let mut b = Bench::new(limits("10/s", 1));
    let feedback = a_429(b.t0, SINGLE, Duration::from_secs(2));
    b.core.feedback(&feedback, false, b.t0);
    b.core.reconfigure(Limits { max_concurrency: 1, ..limits("100/s", 1) }, false, b.at(10));
    assert_eq!(b.core.limits().max_concurrency, 1);
    for id in 0..3 {
        b.join(id, Place::default());
    }
    let served = b.serve(10, 10_000);
    assert_eq!(served[0].1, 2_000, "the upstream's pause outlives new quotas");
    assert!(served[2].1 - served[0].1 <= 25, "then 100/s: {served:?}");
}

#[test]
fn slots_of_a_pacer_replaced_by_a_reload_are_not_given_to_the_new_one() {
    let mut b = Bench::with(limits("1/min", 2), false, true);
    for id in 0..2 {
        b.join(id, Place::default());
    }
    let Next::Confirm(confirm) = b.core.next(b.t0, true) else { panic!("the shared limiter decides") };
    assert_eq!(confirm.wanted(), 2);
    // A reload while Redis is asked: new quotas, a new pacer started later.
    b.core.reconfigure(limits("10/s", 1), true, b.at(60_000));
    assert_eq!(b.core.settle(confirm, Verdict::Go(1), b.at(60_001)).len(), 1, "Redis's word still counts");
    let next = b.core.next(b.at(60_001), true);
    assert!(
        matches!(next, Next::Confirm(_)),
        "the new pacer is not set back by the old one's slots: {next:?}"
    );
}

#[test]
fn a_release_wakes_the_driver_while_departed_entries_are_held() {
    let mut b = Bench::new(Limits { max_concurrency: 1, ..limits("10/s", 1) });
    assert!(b.core.try_leave(Place::default(), &Needs::default(), b.t0));
    let leaving = caller(0);
    let gone = leaving.gone.clone();
    b.core.enqueue(leaving, Place::default(), Needs::default(), (false, None), b.t0).expect("queued");
    gone.set(true);
    b.core.depart();
    assert!(matches!(b.core.next(b.t0, false), Next::Full));
    assert!(b.core.release(b.t0), "the driver must clear the departed entry, or sleep forever");
    assert!(matches!(b.core.next(b.at(200), false), Next::Idle), "cleared without spending a slot");
    assert!(b.core.try_leave(Place::default(), &Needs::default(), b.at(200)));
}

#[test]
fn recover_makes_the_counts_whole_again() {
    let mut b = Bench::new(limits("10/s", 1));
    b.join(0, Place::default());
    b.join(1, Place::default());
    // As a driver that panicked between taking a waiter and answering it
    // may leave it: a departure without its entry.
    b.core.depart();
    assert_eq!(b.core.depth(), 1);
    b.core.recover();
    assert_eq!(b.core.depth(), 2, "counted from the queue itself");
    assert_eq!(ids(&b.serve(0, 1_000)), [0, 1]);
}

#[test]
fn shutdown_refuses_at_once_whoever_cannot_leave_before_the_cutoff() {
    // 10/s, burst 1: within 450 ms, at most 1 + 4 leave (t = 0, 100, .., 400).
    let mut b = Bench::new(limits("10/s", 1));
    for id in 0..8 {
        b.join(id, place(SINGLE, u64::from(id % 2), Priority::Normal));
    }
    let refused = b.core.close(b.at(450), b.at(1000), b.t0);
    let mut refused: Vec<u32> = refused.iter().map(|c| c.id).collect();
    refused.sort_unstable();
    assert_eq!(refused, [5, 6, 7], "the last in serving order are refused now");
    assert_eq!(b.core.depth(), 5);
    let late = b.core.enqueue(caller(9), Place::default(), Needs::default(), (false, None), b.at(10));
    assert!(matches!(late, Err(Refusal::ShuttingDown { .. })), "no room before the cutoff: {late:?}");
    assert_eq!(ids(&b.serve(0, 10_000)), [0, 1, 2, 3, 4], "the kept ones leave in their order");
    assert!(b.core.closed(b.at(450)));
    assert!(
        !b.core.try_leave(Place::default(), &Needs::default(), b.at(2000)),
        "nobody leaves after the cutoff"
    );
    let Err(Refusal::ShuttingDown { retry_after }) =
        b.core.enqueue(caller(10), Place::default(), Needs::default(), (false, None), b.at(900))
    else {
        panic!("refused after the cutoff");
    };
    assert_eq!(retry_after, Duration::from_secs(1), "until the grace ends, at least a second");
}

#[test]
fn shutdown_counts_a_cooldown_and_skips_departed_callers() {
    let mut b = Bench::new(limits("10/s", 1));
    let gone = caller(0);
    gone.gone.set(true);
    b.core.enqueue(gone, Place::default(), Needs::default(), (false, None), b.t0).expect("queued");
    b.core.depart();
    for id in 1..4 {
        b.join(id, Place::default());
    }
    let pause = Feedback {
        partition: SINGLE,
        limit: None,
        sent_at: b.t0,
        rate_limited: true,
        cooldown: Some(Duration::from_millis(300)),
        hint: None,
    };
    b.core.feedback(&pause, false, b.t0);
    // Cooling until 300 ms: only t = 300 and 400 remain before 450.
    let refused: Vec<u32> = b.core.close(b.at(450), b.at(500), b.t0).iter().map(|c| c.id).collect();
    assert_eq!(refused, [3]);
    assert_eq!(b.core.depth(), 2);
}

mod breaker;
mod limits;
mod tokens;
