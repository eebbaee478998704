//! Token quotas in the core: reserve with the grant, settle after.

use super::*;
use crate::config::{TokenAccounting, TokenKind};
use crate::llm::Usage;

/// An upstream at 100/s with one `tokens` quota of 1000 a second.
fn with_tokens(accounting: TokenAccounting) -> Limits {
    let rate = parse_rate("1000/s").expect("rate");
    let mut limits = limits("100/s", 1);
    limits.endpoints = vec![Endpoint::tokens(TokenKind::Total, &[rate])];
    limits.tokens = TokenQuotas::numbered(0, [TokenKind::Total], accounting);
    limits
}

/// When the next caller, needing 100 tokens, may leave after a first one
/// that reserved 100 + 500 tokens left at t0 and was settled by `settlement`.
fn next_after(accounting: TokenAccounting, settlement: Settlement) -> u64 {
    let mut b = Bench::new(with_tokens(accounting));
    let reserved = Reservation { input: 100, output: 500 };
    let needs = Needs::new(b.core.limits().tokens.needs(reserved));
    assert!(b.core.try_leave(Place::default(), &needs, b.t0), "nothing owed yet");
    assert_eq!(b.core.status(b.t0).tokens.map(|t| t.reserved_in_flight), Some(600));
    b.core.release(b.t0);
    let small = Needs::new(b.core.limits().tokens.needs(Reservation { input: 100, output: 0 }));
    b.core.enqueue(caller(1), Place::default(), small, (false, None), b.t0).expect("queued");
    b.core.settle_tokens(SINGLE, reserved, settlement, b.t0, b.t0);
    let mut now = b.t0;
    for _ in 0..10 {
        match b.core.next(now, false) {
            Next::Grant(_) => return b.ms(now),
            Next::At(at) => now = at,
            other => panic!("{other:?}"),
        }
    }
    panic!("never served");
}

/// An attempt whose caller left before it used its ticket ends without
/// settling: its tokens no longer show in flight in `/status`.
#[test]
fn tokens_of_an_unused_ticket_leave_the_count_in_flight() {
    let mut b = Bench::new(with_tokens(TokenAccounting::Usage));
    let in_flight = |b: &Bench| b.core.status(b.t0).tokens.map(|t| t.reserved_in_flight);
    let needs = Needs::new(b.core.limits().tokens.needs(Reservation { input: 100, output: 200 }));
    assert!(b.core.try_leave(Place::default(), &needs, b.t0), "nothing owed yet");
    assert_eq!(in_flight(&b), Some(300));
    b.core.release(b.t0);
    assert_eq!(in_flight(&b), Some(0));
}

#[test]
fn settling_gives_unused_tokens_back() {
    let used = Settlement::Used(Usage { input: 100, cached_input: 0, output: 50 });
    let stands = next_after(TokenAccounting::Usage, Settlement::Unknown);
    assert!((600..=610).contains(&stands), "600 tokens at 1000/s: {stands} ms");
    let settled = next_after(TokenAccounting::Usage, used);
    assert!((150..=155).contains(&settled), "150 tokens used: {settled} ms");
    let reserved = next_after(TokenAccounting::Reserved, used);
    assert_eq!(reserved, stands, "\"reserved\" keeps the output reservation");
    let back = next_after(TokenAccounting::Usage, Settlement::NotProcessed);
    assert!(back <= 10, "a 429 gives it all back: only the 100/s request quota is left: {back} ms");
}

#[test]
fn usage_above_the_reservation_is_taken_on_top() {
    let used = Settlement::Used(Usage { input: 900, cached_input: 0, output: 500 });
    let later = next_after(TokenAccounting::Usage, used);
    assert!((1400..=1420).contains(&later), "1400 tokens used: {later} ms");
}

#[test]
fn a_request_larger_than_a_token_quota_is_refused_at_once() {
    let mut b = Bench::new(with_tokens(TokenAccounting::Usage));
    let needs = Needs::new(b.core.limits().tokens.needs(Reservation { input: 900, output: 200 }));
    let refused = b.core.enqueue(caller(0), Place::default(), needs, (false, None), b.t0);
    assert_eq!(refused, Err(Refusal::CostExceedsQuota { limit: 0 }));
}

#[test]
fn calibration_scales_input_estimates() {
    let mut b = Bench::new(with_tokens(TokenAccounting::Usage));
    assert_eq!(b.core.calibrated(100), 100);
    b.core.calibrate(100, 150);
    assert_eq!(b.core.calibrated(100), 150);
    assert_eq!(b.core.status(b.t0).tokens.map(|t| t.calibration_samples), Some(1));
}

#[test]
fn a_caller_whose_queued_tokens_ahead_outlast_its_deadline_is_answered_at_once() {
    let mut b = Bench::new(with_tokens(TokenAccounting::Usage));
    let needs = |tokens| Needs::new(b.core.limits().tokens.needs(Reservation { input: tokens, output: 0 }));
    let (big, small) = (needs(400), needs(100));
    // Two callers queue 800 tokens at 1000/s: 0.8 s before a third may leave.
    for id in 0..2 {
        b.core.enqueue(caller(id), Place::default(), big.clone(), (false, None), b.t0).expect("queued");
    }
    let wait = b.core.queued_wait(Place::default(), &small, b.t0);
    assert!((Duration::from_millis(800)..=Duration::from_millis(810)).contains(&wait), "{wait:?}");
    assert_eq!(b.core.hopeless(Place::default(), &small, b.at(1_000), b.t0), None, "it can make it");
    let refused = b.core.hopeless(Place::default(), &small, b.at(500), b.t0);
    assert_eq!(refused, Some(Refusal::Timeout { waited: Duration::ZERO, retry_after: wait }));
    // A request that needs no tokens is not behind them.
    let plain = Needs::default();
    assert_eq!(b.core.queued_wait(Place::default(), &plain, b.t0), Duration::ZERO);
    // Nor is a caller in another FIFO (fair_by), who may be served first.
    let other = Place { caller: 7, ..Place::default() };
    assert_eq!(b.core.hopeless(other, &small, b.at(500), b.t0), None);
    // And the estimate is what happens: the third leaves when it said.
    b.core.enqueue(caller(2), Place::default(), small, (false, None), b.t0).expect("queued");
    let served = b.serve(0, 2_000);
    let third = served.iter().find(|(id, _)| *id == 2).map(|(_, at)| *at);
    assert_eq!(third, Some(wait.as_millis() as u64), "{served:?}");
}
