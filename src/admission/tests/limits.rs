//! Endpoint limits and costs in the core, on a manual clock.

use super::*;

/// An upstream at 100/s with endpoint limits `(name, rate)`, burst 1.
fn with_endpoints(endpoints: &[(&str, &str)]) -> Limits {
    let mut limits = limits("100/s", 1);
    limits.endpoints = endpoints
        .iter()
        .map(|(name, rate)| {
            let rate = parse_rate(rate).expect("rate");
            Endpoint {
                name: (*name).to_string(),
                capacity: rate.count.get(),
                quotas: Quotas { rate: vec![rate], burst: NonZeroU32::MIN, adaptive: false, settles: false },
            }
        })
        .collect();
    limits
}

fn units(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("positive")
}

/// Needs `units` of limit `index`.
fn needs(index: usize, n: u32) -> Needs {
    Needs::new([(index, units(n))])
}

impl Bench {
    fn join_needing(&mut self, id: u32, needs: Needs) {
        self.core.enqueue(caller(id), Place::default(), needs, (false, None), self.t0).expect("queued");
    }
}

#[test]
fn a_request_waiting_for_a_limit_never_holds_up_those_that_do_not_need_it() {
    let mut b = Bench::new(with_endpoints(&[("writes", "2/s")]));
    for id in 0..6 {
        b.join_needing(id, needs(0, 1));
    }
    for id in 10..13 {
        b.join(id, Place::default());
    }
    let served = b.serve(0, 2_600);
    let left = |id| served.iter().find(|(i, _)| *i == id).map(|(_, at)| *at);
    for read in 10..13 {
        assert!(
            left(read).is_some_and(|at| at <= 60),
            "read {read} waits only for the 100/s quota: {served:?}"
        );
    }
    let writes: Vec<u64> = served.iter().filter(|(id, _)| *id < 10).map(|(_, at)| *at).collect();
    assert_eq!(ids(&served).iter().filter(|id| **id < 10).copied().collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
    for pair in writes.windows(2) {
        assert!(pair[1] - pair[0] >= 500, "writes keep to 2/s: {writes:?}");
    }
}

#[test]
fn costs_space_requests_by_their_units() {
    let mut b = Bench::new(with_endpoints(&[("points", "10/s")]));
    b.join_needing(0, needs(0, 5));
    b.join_needing(1, needs(0, 1));
    b.join_needing(2, needs(0, 1));
    let served = b.serve(0, 2_000);
    let at: Vec<u64> = served.iter().map(|(_, at)| *at).collect();
    assert_eq!(ids(&served), [0, 1, 2], "FIFO among requests that need the same limits");
    assert_eq!(at[0], 0);
    assert!((500..=515).contains(&at[1]), "five units at 10/s before the next: {at:?}");
    assert!((600..=620).contains(&at[2]), "then one unit: {at:?}");
}

#[test]
fn a_cost_no_limit_can_hold_is_refused_at_once() {
    let mut b = Bench::new(with_endpoints(&[("small", "3/s"), ("points", "10/s")]));
    let too_big = Needs::new([(0, units(1)), (1, units(11))]);
    assert!(!b.core.try_leave(Place::default(), &too_big, b.t0), "never sent");
    let refused = b.core.enqueue(caller(0), Place::default(), too_big, (false, None), b.t0);
    assert_eq!(refused, Err(Refusal::CostExceedsQuota { limit: 1 }));
    assert_eq!(b.core.depth(), 0);
    assert!(b.core.try_leave(Place::default(), &needs(1, 10), b.t0), "a cost of the whole count fits");
}

#[test]
fn a_429_about_a_limit_pauses_that_limit_only() {
    let mut b = Bench::new(with_endpoints(&[("search", "10/s")]));
    let feedback = Feedback {
        partition: SINGLE,
        limit: Some(0),
        sent_at: b.t0,
        rate_limited: true,
        cooldown: Some(Duration::from_secs(2)),
        hint: None,
    };
    b.core.feedback(&feedback, false, b.t0);
    b.join_needing(0, needs(0, 1));
    b.join(1, Place::default());
    let served = b.serve(0, 3_000);
    assert_eq!(served[0], (1, 0), "the upstream's own quota is not paused: {served:?}");
    assert_eq!(served[1], (0, 2_000), "the search limit is, until its cooldown ends: {served:?}");
    let status = b.core.status(b.t0);
    assert!(status.cooldown_until.is_none(), "the upstream itself does not cool down");
    assert_eq!(status.limits[0].name, "search");
}

#[test]
fn a_retry_rejoins_at_the_head_of_its_limits_queue() {
    let mut b = Bench::new(with_endpoints(&[("writes", "1/s")]));
    for id in 0..3 {
        b.join_needing(id, needs(0, 1));
    }
    assert_eq!(ids(&b.serve(0, 500)), [0]);
    b.core
        .enqueue(caller(9), Place::default(), needs(0, 1), (true, None), b.at(500))
        .expect("a retry is queued");
    assert_eq!(ids(&b.serve(500, 3_100)), [9, 1, 2]);
}

#[test]
fn a_reload_keeps_a_limits_state_by_name_and_queued_needs_follow_it() {
    let mut b = Bench::new(with_endpoints(&[("writes", "1/s"), ("search", "1/s")]));
    assert!(b.core.try_leave(Place::default(), &needs(0, 1), b.t0), "a write spends the writes limit");
    b.join_needing(1, needs(1, 1));
    b.join_needing(2, needs(0, 1));
    // The limits swap places and a new one comes: "writes" is now index 1.
    let reloaded = with_endpoints(&[("search", "1/s"), ("writes", "1/s"), ("new", "5/s")]);
    b.core.reconfigure(reloaded, false, b.at(10));
    b.core.release(b.t0);
    let served = b.serve(10, 2_000);
    assert_eq!(served[0], (1, 10), "the search request kept needing search only: {served:?}");
    assert!(served[1].0 == 2 && served[1].1 >= 1_000, "writes remembered its grant at 0: {served:?}");
    assert_eq!(
        b.core.status(b.t0).limits.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["search", "writes", "new"]
    );
}

#[test]
fn shared_quotas_confirm_a_limits_queue_one_at_a_time_and_its_wait_holds_only_it() {
    let mut b = Bench::with(with_endpoints(&[("writes", "10/s")]), false, true);
    for id in 0..3 {
        b.join_needing(id, needs(0, 2));
    }
    b.join(10, Place::default());
    let Next::Confirm(confirm) = b.core.next(b.t0, true) else { panic!("the writes queue asks first") };
    assert_eq!(confirm.wanted(), 1, "each write's cost is confirmed on its own");
    assert_eq!(confirm.needs(), &needs(0, 2));
    let held = b.core.settle(confirm, Verdict::Wait(Duration::from_secs(1), Some(0)), b.t0);
    assert!(held.is_empty());
    let Next::Confirm(confirm) = b.core.next(b.t0, true) else {
        panic!("the read is not held by the writes")
    };
    assert!(confirm.needs().is_empty());
    assert_eq!(b.core.settle(confirm, Verdict::Go(1), b.t0).len(), 1);
    assert!(
        matches!(b.core.next(b.at(50), true), Next::At(at) if b.ms(at) == 1_000),
        "writes wait for Redis's word"
    );
}

/// With the shared limiter, the head's cost taken for the verdict that is
/// out is not counted again for the head, which still queues.
#[test]
fn a_cost_awaiting_the_shared_limiter_is_not_counted_twice() {
    let mut b = Bench::with(with_endpoints(&[("writes", "10/s")]), false, true);
    for id in 0..3 {
        b.join_needing(id, needs(0, 1));
    }
    let Next::Confirm(confirm) = b.core.next(b.t0, true) else { panic!("the shared limiter decides") };
    let wait = b.core.queued_wait(Place::default(), &needs(0, 1), b.t0);
    assert!((Duration::from_millis(300)..=Duration::from_millis(303)).contains(&wait), "{wait:?}");
    assert_eq!(b.core.settle(confirm, Verdict::Go(1), b.t0).len(), 1);
    b.join_needing(3, needs(0, 1));
    let served = b.serve(0, 2_000);
    assert_eq!(served.last(), Some(&(3, wait.as_millis() as u64)), "{served:?}");
}

/// An hourly cap beside a per-second quota is a volume cap, not a pace:
/// the honest wait counts the per-second pace while the cap has room.
/// (Paid at the cap's long-run rate, five writes ahead once cost 18 s.)
#[test]
fn a_volume_cap_beside_a_pace_does_not_stretch_the_honest_wait() {
    let mut limits = with_endpoints(&[("writes", "10/s")]);
    limits.endpoints[0].quotas.rate.push(parse_rate("1000/h").expect("rate"));
    let mut b = Bench::new(limits);
    for id in 0..5 {
        b.join_needing(id, needs(0, 1));
    }
    let wait = b.core.queued_wait(Place::default(), &needs(0, 1), b.t0);
    assert!((Duration::from_millis(500)..=Duration::from_millis(505)).contains(&wait), "{wait:?}");
    assert_eq!(b.core.hopeless(Place::default(), &needs(0, 1), b.at(1_000), b.t0), None);
    b.join_needing(5, needs(0, 1));
    let served = b.serve(0, 2_000);
    assert_eq!(served.last(), Some(&(5, wait.as_millis() as u64)), "{served:?}");
}

/// A full queue's `Retry-After` counts the limits the refused caller needs:
/// three writes ahead of it at 1 per 20 s take a minute, not the 40 ms the
/// upstream's own 100/s would drain four requests in.
#[test]
fn a_full_queue_s_retry_after_counts_the_limits_the_caller_needs() {
    let mut b = Bench::new(Limits { queue_size: 3, ..with_endpoints(&[("writes", "1/20s")]) });
    let write = || needs(0, 1);
    for id in 0..3 {
        b.join_needing(id, write());
    }
    let refused = b.core.enqueue(caller(3), Place::default(), write(), (false, None), b.t0);
    let Err(Refusal::Full { retry_after }) = refused else { panic!("{refused:?}") };
    assert!(retry_after >= Duration::from_secs(40), "{retry_after:?}");
    let read = b.core.enqueue(caller(4), Place::default(), Needs::default(), (false, None), b.t0);
    let Err(Refusal::Full { retry_after }) = read else { panic!("{read:?}") };
    assert!(retry_after < Duration::from_secs(1), "a read needs no write slot: {retry_after:?}");
}
