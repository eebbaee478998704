//! What a settled quota remembers of its last window, so that units given
//! back late are spent instead of lost.
//!
//! An LLM call reserves its `max_tokens` and learns what it used only when
//! its answer ends. By then even spacing has moved on: the next calls were
//! spaced as if the whole reservation had been used, and moving the
//! schedule back before now would let a burst out. Dropping what cannot go
//! back lost about 5 % of a token quota in a simulation of the tokens
//! benchmark's calls (the tests below). The ledger keeps it instead:
//!
//! * **Credit.** Schedule given back that the pacer could not take off (it
//!   would have gone before now) is kept as credit, and spent by the next
//!   grants while requests wait: each leaves as soon as the units before it
//!   *as settled* are paid for. Credit is dropped when the schedule runs
//!   idle (nobody waits, so nothing was held back by the units it stands
//!   for), so it never turns into a burst after a pause.
//! * **The window.** Credit spent late could still crowd one window, and a
//!   refund of a grant older than the window frees nothing in it. So every
//!   grant of a settled quota also needs room for its units in its window
//!   (the quota's own, margins included, counted on real instants), its
//!   earlier grants counted as settled so far (reserved until then). No
//!   window holds more than `N` units, where even spacing alone allows `N`
//!   plus one request's: against a strict sliding window (an LLM API's
//!   tokens per minute) the provider's own limit can be configured as it
//!   is. What an answer reports above its reservation is only known after
//!   the fact; it is counted from then on.
//!
//! Instants are nanoseconds from the pacer's origin; the pacer passes them in.

use std::collections::VecDeque;

/// Entries a ledger keeps at most (16 bytes each): a day-long token quota
/// sees more grants than that in its window.
const MAX_ENTRIES: usize = 4096;

/// The grants of one quota's last window, as settled so far.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Grants in the window, oldest first: (instant, units). Grants made at
    /// one instant share an entry, which is how they are found again.
    grants: VecDeque<(u64, u64)>,
    /// Sum of `grants`' units.
    sum: u64,
    /// Length of the window (ns).
    window: u64,
    /// Units a window may hold, the grant being admitted included.
    limit: u64,
    /// Schedule (ns) given back that could not move the schedule back.
    credit: u64,
}

impl Ledger {
    /// A ledger for `limit` units per `window` ns.
    pub fn new(limit: u64, window: u64) -> Self {
        Self { grants: VecDeque::new(), sum: 0, window, limit, credit: 0 }
    }

    /// `None` if a grant of `units` fits at `now`, else the first instant
    /// it would. A grant larger than the whole quota needs an empty window.
    pub fn next_fit(&mut self, now: u64, units: u64) -> Option<u64> {
        self.forget_before(now);
        let room = self.limit.saturating_sub(units.min(self.limit));
        let mut sum = self.sum;
        for &(at, held) in &self.grants {
            if sum <= room {
                break;
            }
            sum -= held;
            if sum <= room {
                return Some(at.saturating_add(self.window));
            }
        }
        None
    }

    /// Records a grant of `units` at `at`.
    pub fn record(&mut self, at: u64, units: u64) {
        match self.grants.back_mut() {
            Some((last, held)) if *last == at => *held += units,
            _ => self.grants.push_back((at, units)),
        }
        self.sum += units;
        // A long window of small grants: the two oldest become one, kept
        // as long as the later (counted longer, never shorter; a refund of
        // the earlier is then not found, and gives no credit).
        if self.grants.len() > MAX_ENTRIES
            && let Some((_, oldest)) = self.grants.pop_front()
            && let Some(next) = self.grants.front_mut()
        {
            next.1 += oldest;
        }
    }

    /// Corrects the grant made at `at` by `delta` units; false if it has
    /// left the window (or was never recorded), when nothing changes.
    pub fn correct(&mut self, at: u64, delta: i64) -> bool {
        let Some(entry) = self.grants.iter_mut().rev().find(|(when, _)| *when == at) else {
            return false;
        };
        let before = entry.1;
        entry.1 = before.saturating_add_signed(delta);
        self.sum = self.sum - before + entry.1;
        true
    }

    /// Schedule (ns) held as credit for the next grants.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Keeps `ns` of schedule as credit, at most one window's worth.
    pub fn keep_credit(&mut self, ns: u64) {
        self.credit = self.credit.saturating_add(ns).min(self.window);
    }

    /// Spends credit on a schedule at `tat` (ns) for a grant presented at
    /// `now`: returns the schedule moved back as far as credit and `now`
    /// allow. A schedule already behind `now` ran idle: its credit is
    /// dropped. (Time a grant waits for room in the window is not credited:
    /// the calls after it would leave back to back, filling each window to
    /// the brim, where even spacing leaves room for arrival jitter.)
    pub fn spend_credit(&mut self, tat: u64, now: u64) -> u64 {
        if tat < now {
            self.credit = 0;
            return tat;
        }
        let back = self.credit.min(tat - now);
        self.credit -= back;
        tat - back
    }

    /// Drops the grants that have left the window ending at `now`.
    fn forget_before(&mut self, now: u64) {
        while let Some(&(at, units)) = self.grants.front() {
            if at.saturating_add(self.window) > now {
                break;
            }
            self.grants.pop_front();
            self.sum -= units;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::config::Rate;
    use crate::limit::Pacer;

    const ONE: NonZeroU32 = NonZeroU32::MIN;

    fn rate(count: u32, per_ms: u64) -> Rate {
        Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_millis(per_ms) }
    }

    #[test]
    fn a_full_window_says_when_its_oldest_grants_leave_it() {
        let mut ledger = Ledger::new(10, 1000);
        ledger.record(0, 6);
        ledger.record(100, 4);
        assert_eq!(ledger.next_fit(200, 1), Some(1000), "10 of 10 held until the first 6 leave");
        assert_eq!(ledger.next_fit(1000, 6), None);
        assert_eq!(ledger.next_fit(1000, 7), Some(1100), "4 held: room for 6");
        assert_eq!(ledger.next_fit(1000, 50), Some(1100), "more than the quota: an empty window");
        // Settled to fewer units, the same grants leave room at once.
        ledger.record(1000, 6);
        assert!(ledger.correct(1000, -3));
        assert_eq!(ledger.next_fit(1000, 3), None, "4 + 3 held");
        assert!(!ledger.correct(0, -1), "a grant that left the window is not found");
    }

    /// Drives `pacer` (for `quota`) with a queue of 240 chat calls shaped
    /// like the tokens benchmark's: prompts of 25 to 2 000 tokens (log-
    /// uniform), `max_tokens` 64 to 512 of which at most 200 are used, an
    /// answer 100 ms after the call left, a third of them streamed for
    /// another 20 ms per 16 tokens. Each gives back what it did not use when
    /// its answer ends. Returns the share of the quota used: tokens used /
    /// the quota's rate / first to last grant.
    fn utilisation(mut pacer: Pacer, quota: Rate) -> f64 {
        let start = Instant::now();
        let mut now = start;
        // (due, granted, units given back), by due
        let mut refunds: VecDeque<(Instant, Instant, i64)> = VecDeque::new();
        let mut used = 0;
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for call in 0..240 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let share = (seed % 10_000) as f64 / 10_000.0;
            let prompt = (25.0 * 80f64.powf(share)) as u64;
            let max_tokens = [64, 128, 256, 512][(seed >> 20) as usize % 4];
            let output = max_tokens.min(200);
            let reserved = NonZeroU32::new(u32::try_from(prompt + max_tokens).unwrap()).unwrap();
            for _ in 0..10_000 {
                while let Some(&(due, granted, back)) = refunds.front().filter(|r| r.0 <= now) {
                    refunds.pop_front();
                    pacer.adjust(due, back, granted);
                }
                match pacer.try_acquire(now, reserved) {
                    Ok(_) => break,
                    Err(next) => now = refunds.front().map_or(next, |r| r.0.min(next)).max(now),
                }
            }
            used += prompt + output;
            let streamed = if call % 3 == 0 { output.div_ceil(16) * 20 } else { 0 };
            let due = now + Duration::from_millis(100 + streamed);
            let at = refunds.iter().position(|r| r.0 > due).unwrap_or(refunds.len());
            refunds.insert(at, (due, now, -i64::try_from(max_tokens - output).unwrap()));
        }
        used as f64 / quota.per_second() / (now - start).as_secs_f64()
    }

    #[test]
    fn tokens_given_back_late_still_pay_for_later_calls() {
        let quota = rate(55_271, 10_000);
        let plain = utilisation(Pacer::new(&[quota], ONE, Instant::now()), quota);
        let settled = utilisation(Pacer::new(&[quota], ONE, Instant::now()).settled(), quota);
        assert!(settled >= 0.95, "{:.1} % of the quota with credit", settled * 100.0);
        assert!(
            settled - plain >= 0.02,
            "{:.1} % without credit, {:.1} with",
            plain * 100.0,
            settled * 100.0
        );
    }

    #[test]
    fn a_long_window_keeps_a_bounded_ledger_and_counts_every_unit() {
        let mut ledger = Ledger::new(u64::MAX, u64::MAX / 2);
        for at in 0..(MAX_ENTRIES as u64 * 3) {
            ledger.record(at, 1);
        }
        assert_eq!(ledger.grants.len(), MAX_ENTRIES);
        assert_eq!(ledger.grants.iter().map(|(_, units)| units).sum::<u64>(), MAX_ENTRIES as u64 * 3);
        assert!(!ledger.correct(0, -1), "merged away: no credit");
    }

    #[test]
    fn credit_goes_as_far_as_now_and_is_dropped_by_an_idle_schedule() {
        let mut ledger = Ledger::new(10, 1000);
        ledger.keep_credit(300);
        assert_eq!(ledger.spend_credit(500, 400), 400, "back to now, no further");
        assert_eq!(ledger.spend_credit(900, 400), 700, "the 200 left");
        ledger.keep_credit(5000);
        assert_eq!(ledger.spend_credit(2000, 0), 1000, "at most one window's worth");
        ledger.keep_credit(300);
        assert_eq!(ledger.spend_credit(100, 400), 100, "nobody waited: nothing held back");
        assert_eq!(ledger.spend_credit(900, 400), 900, "and the credit is gone");
    }

    /// A settled pacer for `rate`, as token quotas build theirs.
    fn settled(rate: Rate) -> Pacer {
        Pacer::new(&[rate], ONE, Instant::now()).settled()
    }

    #[test]
    fn tokens_given_back_after_the_schedule_moved_on_are_not_lost() {
        // 1000 units a second: a call reserving 500 owes 500 ms; it used 100,
        // and says so 450 ms later, when 50 ms of its schedule are left.
        let mut pacer = settled(rate(1000, 1000));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let ms = |t: Instant| (t - start).as_millis();
        let granted = at(0);
        assert!(pacer.try_acquire(granted, NonZeroU32::new(500).unwrap()).is_ok());
        pacer.adjust(at(450), -400, granted);
        // The 350 units the schedule could not take back pay for the next call's.
        assert!(pacer.try_acquire(at(450), NonZeroU32::new(400).unwrap()).is_ok());
        let next = pacer.try_acquire(at(450), ONE).unwrap_err();
        assert!((500..=510).contains(&ms(next)), "100 + 400 units in all: {} ms", ms(next));
        // A pacer that is not settled keeps the old rule: back to now, no further.
        let mut plain = Pacer::new(&[rate(1000, 1000)], ONE, start);
        assert!(plain.try_acquire(granted, NonZeroU32::new(500).unwrap()).is_ok());
        plain.adjust(at(450), -400, granted);
        assert!(plain.try_acquire(at(450), NonZeroU32::new(400).unwrap()).is_ok());
        let next = plain.try_acquire(at(450), ONE).unwrap_err();
        assert!(ms(next) >= 850, "{} ms", ms(next));
    }

    #[test]
    fn credit_never_lets_a_window_hold_more_than_the_quota() {
        // 1000 a second: A (500 units) at 0, B (400) when A is paid; A's
        // answer gives 499 back just before B is paid, mostly as credit.
        let mut pacer = settled(rate(1000, 1000));
        let start = Instant::now();
        let units = |n: u32| NonZeroU32::new(n).unwrap();
        let ms = |t: Instant| (t - start).as_millis();
        assert!(pacer.try_acquire(start, units(500)).is_ok());
        let b = pacer.try_acquire(start, ONE).unwrap_err();
        assert!(pacer.try_acquire(b, units(400)).is_ok());
        let refund = start + Duration::from_millis(900);
        pacer.adjust(refund, -499, start);
        // C (500) leaves on credit: 1 + 400 + 500 units in its window.
        assert!(pacer.try_acquire(refund, units(500)).is_ok(), "credit pays for C");
        // The schedule, with what credit is left, would let D (200) go at
        // about 905 ms: its window would hold 1101 units. D waits for B to leave it.
        let d = pacer.try_acquire(refund, units(200)).unwrap_err();
        assert!(ms(d) >= ms(b) + 1000, "D at {} ms, B left at {} ms", ms(d), ms(b));
        assert!(pacer.try_acquire(d, units(200)).is_ok());
    }

    #[test]
    fn a_refund_of_a_grant_older_than_the_window_frees_nothing_in_it() {
        // The schedule alone would let this through: a grant before the
        // window gives back units the window's own grants then spend.
        let mut pacer = settled(rate(1000, 1000));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let units = |n: u32| NonZeroU32::new(n).unwrap();
        assert!(pacer.try_acquire(at(0), units(100)).is_ok());
        let q = pacer.try_acquire(at(0), ONE).unwrap_err();
        assert!(pacer.try_acquire(q, units(900)).is_ok());
        pacer.adjust(q + Duration::from_millis(50), -99, at(0));
        let mut now = q + Duration::from_millis(50);
        let mut sent = 900;
        // Bounded: each turn grants (at most 2 more fit) or moves `now` on.
        for _ in 0..100 {
            if now >= q + Duration::from_millis(1000) {
                break;
            }
            match pacer.try_acquire(now, units(50)) {
                Ok(_) => sent += 50,
                Err(next) => {
                    assert!(next > now, "a refusal names a later instant");
                    now = next;
                }
            }
            assert!(sent <= 1000, "{sent} units within a second of {q:?}");
        }
        assert!(now >= q + Duration::from_millis(1000), "the second was walked to its end");
    }

    proptest::proptest! {
        /// Random calls, reserving more than they use and settling after a
        /// random while, never put more than the quota into any window,
        /// counted as used.
        #[test]
        fn settling_never_lets_a_window_hold_more_than_the_quota(
            count in 50u32..2000,
            calls in proptest::collection::vec((1u32..400, 0u32..400, 0u64..1500, 0u64..30), 1..120),
        ) {
            let quota = rate(count, 1000);
            let mut pacer = settled(quota);
            let start = Instant::now();
            let mut now = start;
            // (granted, used) of every grant; (when, granted, given back) pending.
            let mut sent: Vec<(Instant, u64)> = Vec::new();
            let mut pending: Vec<(Instant, Instant, i64)> = Vec::new();
            for (used, unused, latency, gap) in calls {
                let used = used.min(count);
                let reserved = NonZeroU32::new(used + unused).unwrap();
                now += Duration::from_millis(gap);
                // Bounded: every turn settles a grant or moves `now` on.
                for turn in 0.. {
                    proptest::prop_assert!(turn < 10_000, "no grant at {:?}", now - start);
                    pending.sort_by_key(|(at, _, _)| *at);
                    while pending.first().is_some_and(|(at, _, _)| *at <= now) {
                        let (at, granted, back) = pending.remove(0);
                        pacer.adjust(at, back, granted);
                    }
                    match pacer.try_acquire(now, reserved) {
                        Ok(_) => break,
                        Err(next) => {
                            let settle = pending.first().map_or(next, |(at, _, _)| (*at).min(next));
                            now = settle.max(now);
                        }
                    }
                }
                sent.push((now, u64::from(used)));
                if unused > 0 {
                    pending.push((now + Duration::from_millis(latency), now, -i64::from(unused)));
                }
            }
            let window = quota.per;
            for (j, &(last, units)) in sent.iter().enumerate() {
                let held: u64 =
                    sent[..j].iter().filter(|(at, _)| last - *at < window).map(|(_, u)| u).sum();
                proptest::prop_assert!(
                    held + units <= u64::from(count),
                    "{held} units in the window before a grant of {units} at {:?}",
                    last - start
                );
            }
        }
    }
}
