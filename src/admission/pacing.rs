//! One partition's pacing: its quotas, cooldown, adaptive rate and
//! rate-limit hints.
//!
//! Real quotas are per credential, so with `partition_by` each distinct key
//! value gets its own `Pacing`: a 429 for key A cools down only A, and A's
//! adaptive rate and `X-RateLimit-*` hints never slow key B. Without
//! `partition_by` an upstream has exactly one.
//!
//! Like the rest of the core, nothing here reads a clock: every method takes
//! `now`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use super::Feedback;
use crate::config;
use crate::limit::pacer::{Floor, GUARD, Taken};
use crate::limit::{Adaptive, Pacer};
use crate::retry::HintPace;

/// Quotas a partition's pacer is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    pub rate: Vec<config::Rate>,
    pub burst: NonZeroU32,
    pub adaptive: bool,
    /// Costs are corrected after the fact (token quotas): the pacer keeps ledgers.
    pub settles: bool,
}

impl Quotas {
    pub fn of(upstream: &config::Upstream) -> Self {
        Self {
            rate: upstream.rate.clone(),
            burst: upstream.burst,
            adaptive: upstream.adaptive,
            settles: false,
        }
    }

    /// Window of the quota that paces (shortest interval), for measuring what
    /// the upstream accepted.
    fn pacing_window(&self) -> Duration {
        let interval = |r: &config::Rate| r.per / r.count.get();
        self.rate.iter().min_by_key(|r| interval(r)).map_or(Duration::from_secs(1), |r| r.per)
    }

    /// Longest quota window: a pacer untouched for longer holds no state.
    fn longest_window(&self) -> Duration {
        self.rate.iter().map(|r| r.per).max().unwrap_or(Duration::from_secs(1))
    }
}

/// Why a partition was paused, as the `cooldown` log line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// The upstream answered 429.
    RateLimited,
    /// A 503 with `Retry-After`.
    RetryAfter,
    /// `X-RateLimit-Remaining: 0` (or `RateLimit-Remaining: 0`) with a reset.
    RatelimitRemaining,
    /// Another replica's cooldown, read from the shared store.
    Shared,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::RetryAfter => "retry_after",
            Self::RatelimitRemaining => "ratelimit_remaining",
            Self::Shared => "shared",
        }
    }
}

/// One partition's quotas, cooldown, adaptive rate and rate-limit hints.
#[derive(Debug)]
pub struct Pacing {
    /// What `pacer` and `adaptive` were built from.
    quotas: Quotas,
    pacer: Pacer,
    /// Lowers the pace after 429s; `None` when `adaptive = false`.
    adaptive: Option<Adaptive>,
    /// Nothing leaves before this instant (429, Retry-After, Remaining: 0).
    cooldown_until: Option<Instant>,
    /// The shared (Redis) quotas admit nobody before this instant.
    shared_wait: Option<Instant>,
    /// Remaining quota spread until its reset: (requests per second, reset).
    hint_cap: Option<(f64, Instant)>,
    /// Recent grant instants, to measure what the upstream accepted.
    grants: VecDeque<Instant>,
    /// Window of the pacing quota: how far back `grants` reaches.
    window: Duration,
    /// After this long without a grant the pacer is back to full (evictable).
    idle_after: Duration,
    /// Last grant, for eviction.
    last_grant: Option<Instant>,
}

impl Pacing {
    pub fn new(quotas: &Quotas, now: Instant) -> Self {
        let mut pacer = Pacer::new(&quotas.rate, quotas.burst, now);
        if quotas.settles {
            pacer = pacer.settled();
        }
        Self {
            quotas: quotas.clone(),
            adaptive: quotas.adaptive.then(|| Adaptive::new(pacer.rate_per_second(), quotas.pacing_window())),
            pacer,
            cooldown_until: None,
            shared_wait: None,
            hint_cap: None,
            grants: VecDeque::new(),
            window: quotas.pacing_window(),
            idle_after: quotas.longest_window() + GUARD,
            last_grant: None,
        }
    }

    /// New quotas: the pacer keeps its schedule (the next slot follows the
    /// last grant at the new rate, never a fresh burst), cooldown is kept
    /// (the upstream asked for it, whatever our quotas say). The adaptive
    /// rate and the upstream's hints start over when the long-run rate
    /// changed; a respelling (10/s as 600/min) keeps them too. The same
    /// quotas again change nothing.
    pub fn requota(&mut self, quotas: &Quotas) {
        if *quotas == self.quotas {
            return;
        }
        let rate = self.pacer.rate_per_second();
        self.pacer.requota(&quotas.rate, quotas.burst);
        if self.pacer.rate_per_second() != rate || quotas.adaptive != self.quotas.adaptive {
            self.adaptive =
                quotas.adaptive.then(|| Adaptive::new(self.pacer.rate_per_second(), quotas.pacing_window()));
            self.hint_cap = None;
        }
        self.window = quotas.pacing_window();
        self.idle_after = quotas.longest_window() + GUARD;
        self.quotas = quotas.clone();
    }

    /// Nothing cools down or caps the pace, and the pacer forgot every
    /// slot: dropping it loses no state.
    pub fn idle(&self, now: Instant) -> bool {
        self.cooldown_until.is_none_or(|until| until <= now)
            && self.hint_cap.is_none_or(|(_, until)| until <= now)
            && self.adaptive.as_ref().and_then(Adaptive::current).is_none()
            && self.last_grant.is_none_or(|at| now.duration_since(at) > self.idle_after)
    }

    /// When this partition may try again, if it must wait: a cooldown, or
    /// the shared quotas' answer.
    fn blocked_until(&self, now: Instant) -> Option<Instant> {
        [self.cooldown_until, self.shared_wait].into_iter().flatten().filter(|at| *at > now).max()
    }

    /// When a request may leave at the earliest, once others have taken
    /// their units of these quotas: after any cooldown or shared wait, at
    /// the pace the quotas keep (see [`Floor`]), an adaptive rate and a
    /// hint's cap included, the hint's only until the reset it named.
    pub fn floor(&self, now: Instant) -> Floor {
        self.pacer.floor(self.blocked_until(now).unwrap_or(now), self.hint_cap.map(|(_, until)| until))
    }

    /// Takes `units` for an attempt leaving now, if the quotas are neither
    /// paused nor owed; otherwise says when it may try again.
    pub fn admit(&mut self, name: &str, now: Instant, units: NonZeroU32) -> Result<Taken, Instant> {
        self.refresh_cap(name, now);
        match self.blocked_until(now) {
            Some(until) => Err(until),
            None => self.pacer.try_acquire(now, units),
        }
    }

    /// One more slot at `now`, for a batch the shared limiter decides on;
    /// unlike [`Self::admit`], the partition is known not to be blocked.
    pub fn take_another(&mut self, now: Instant) -> Option<Taken> {
        self.pacer.try_acquire(now, NonZeroU32::MIN).ok()
    }

    /// Gives back slots that were taken but not used, latest first.
    pub fn give_back(&mut self, taken: Vec<Taken>) {
        for slot in taken.into_iter().rev() {
            self.pacer.undo(slot);
        }
    }

    /// Corrects the units the grant made at `granted` took by `delta`:
    /// positive takes more, negative gives back (settling an LLM call's tokens).
    pub fn adjust(&mut self, now: Instant, delta: i64, granted: Instant) {
        self.pacer.adjust(now, delta, granted);
    }

    pub fn record_grant(&mut self, now: Instant) {
        self.last_grant = Some(now);
        if self.adaptive.is_none() {
            return;
        }
        self.grants.push_back(now);
        // A 429 speaks of the window before its attempt left, which may be
        // up to an attempt's whole life ago.
        let kept = self.window + self.window.min(ANSWER_HORIZON);
        while self.grants.front().is_some_and(|at| now.duration_since(*at) > kept) {
            self.grants.pop_front();
        }
    }

    /// Attempts that left in the quota window before the one sent at
    /// `sent_at`: what the upstream had accepted when it refused that one.
    /// The refused attempt is not counted (at 10/s counting it makes 11, a
    /// limit 10 % too high), nor those sent after it (refused too, or saying
    /// nothing about the limit). `sent_at` is read when the attempt starts,
    /// a little after its grant: the last grant up to it is its own.
    fn accepted_before(&self, sent_at: Instant) -> usize {
        let since = sent_at.checked_sub(self.window);
        let granted =
            self.grants.iter().filter(|at| **at <= sent_at && since.is_none_or(|since| **at > since));
        granted.count().saturating_sub(1)
    }

    /// The shared quotas admit nobody before `until`.
    pub fn wait_shared(&mut self, until: Instant) {
        self.shared_wait = Some(until);
    }

    /// Applies what an answer said: cooldown, adaptive rate, quota hints.
    /// `shared`: the quotas are shared with other replicas (Redis). Returns
    /// the pause the upstream asked for (for the other replicas) and the
    /// cooldown it added.
    pub fn learn(&mut self, name: &str, feedback: &Feedback, shared: bool, now: Instant) -> Learned {
        let mut learned = Learned::default();
        if let Some(pause) = feedback.cooldown {
            let reason =
                if feedback.rate_limited { PauseReason::RateLimited } else { PauseReason::RetryAfter };
            learned.cooled += self.cool_down(name, now, pause, reason);
        }
        learned.pause = feedback.cooldown;
        if feedback.rate_limited && self.adaptive.is_some() {
            // With shared quotas, this replica's grants are only its share of
            // what the upstream accepted; the shared pace is the better measure.
            let accepted_rate = if shared {
                self.pacer.effective_rate()
            } else {
                self.accepted_before(feedback.sent_at) as f64 / self.window.as_secs_f64()
            };
            if let Some(adaptive) = &mut self.adaptive
                && let Some(rate) = adaptive.on_rate_limited(now, feedback.sent_at, accepted_rate)
            {
                tracing::info!(upstream = %name, rate, reason = PauseReason::RateLimited.as_str(), "adaptive rate lowered");
            }
        }
        // A hint that asks nothing (its reset is past) leaves the pace as it is.
        if let Some(pace) = feedback.hint.filter(|pace| *pace != HintPace::default()) {
            if let Some(pause) = pace.pause {
                learned.cooled += self.cool_down(name, now, pause, PauseReason::RatelimitRemaining);
                learned.pause = learned.pause.max(Some(pause));
            }
            self.hint_cap = pace.cap.map(|(rate, lasts)| (rate, later(now, lasts)));
        }
        self.refresh_cap(name, now);
        learned
    }

    /// Pauses the partition until `now + pause` (never shortens a pause);
    /// returns how much pause it added.
    pub fn cool_down(&mut self, name: &str, now: Instant, pause: Duration, reason: PauseReason) -> Duration {
        let until = later(now, pause);
        let paused_from = self.cooldown_until.map_or(now, |current| current.max(now));
        if paused_from >= until {
            return Duration::ZERO;
        }
        tracing::warn!(upstream = %name, delay_ms = pause.as_millis() as u64, reason = reason.as_str(), "cooldown");
        self.cooldown_until = Some(until);
        until - paused_from
    }

    /// Recomputes the pace below the quotas: adaptive rate and quota hints.
    pub fn refresh_cap(&mut self, name: &str, now: Instant) {
        if self.hint_cap.is_some_and(|(_, until)| until <= now) {
            self.hint_cap = None;
        }
        if self.cooldown_until.is_some_and(|until| until <= now) {
            self.cooldown_until = None;
        }
        if let Some(adaptive) = &mut self.adaptive
            && let Some(rate) = adaptive.on_tick(now)
        {
            tracing::info!(upstream = %name, rate = rate.unwrap_or(f64::NAN), "adaptive rate probed up");
        }
        let adaptive = self.adaptive.as_ref().and_then(Adaptive::current);
        let hint = self.hint_cap.map(|(rate, _)| rate);
        let cap = match (adaptive, hint) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        };
        self.pacer.set_cap(cap);
    }

    /// Requests per second the pacer uses now (adaptive rate and hints included).
    pub fn effective_rate(&self) -> f64 {
        self.pacer.effective_rate()
    }

    /// A cooldown is running at `now`.
    pub fn cooling(&self, now: Instant) -> bool {
        self.cooldown_until.is_some_and(|until| until > now)
    }

    /// The last grant, if any: how recently this partition was used.
    pub fn last_grant(&self) -> Option<Instant> {
        self.last_grant
    }

    /// No attempt leaves before this instant, if set.
    pub fn cooldown_until(&self) -> Option<Instant> {
        self.cooldown_until
    }
}

/// `now + wait`, saturating: a wait from the network may be absurdly long,
/// and an `Instant` that overflows panics.
pub fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or_else(|| now + FAR_FUTURE)
}

/// How long after leaving an attempt's 429 may still come back (an
/// attempt's life is bounded by the upstream's `timeout`): grants are kept
/// this much longer than the quota window.
const ANSWER_HORIZON: Duration = Duration::from_secs(30);

/// Far enough to mean "not in this process's life", near enough to add to any `now`.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What one answer's feedback changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Learned {
    /// The pause the upstream asked for, to share with other replicas.
    pub pause: Option<Duration>,
    /// Cooldown added to the partition (for `pacegate_cooldown_seconds_total`).
    pub cooled: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;
    use crate::retry::{RateLimitHint, Refill};

    fn quotas(rates: &[&str]) -> Quotas {
        let rate = rates.iter().map(|r| parse_rate(r).expect("rate")).collect();
        Quotas { rate, burst: NonZeroU32::MIN, adaptive: false, settles: false }
    }

    #[test]
    fn idle_only_once_the_longest_window_has_passed() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut pacing = Pacing::new(&quotas(&["10/s", "100/min"]), t0);
        assert!(pacing.idle(t0), "never used: nothing to lose");
        pacing.record_grant(t0);
        assert!(!pacing.idle(at(30)), "the per-minute quota still remembers the grant");
        assert!(pacing.idle(at(61)));
    }

    #[test]
    fn a_cooldown_is_never_shortened() {
        let t0 = Instant::now();
        let mut pacing = Pacing::new(&quotas(&["10/s"]), t0);
        let added = pacing.cool_down("u", t0, Duration::from_secs(2), PauseReason::RateLimited);
        assert_eq!(added, Duration::from_secs(2));
        assert_eq!(
            pacing.cool_down("u", t0, Duration::from_secs(1), PauseReason::RateLimited),
            Duration::ZERO
        );
        assert_eq!(
            pacing.admit("u", t0 + Duration::from_millis(1999), NonZeroU32::MIN).err(),
            Some(t0 + Duration::from_secs(2))
        );
        assert!(pacing.admit("u", t0 + Duration::from_secs(2), NonZeroU32::MIN).is_ok());
    }

    #[test]
    fn a_respelt_rate_keeps_the_adaptive_rate_and_a_new_one_resets_it() {
        let t0 = Instant::now();
        let adaptive = |rates: &[&str]| Quotas { adaptive: true, ..quotas(rates) };
        let mut pacing = Pacing::new(&adaptive(&["10/s"]), t0);
        for ms in 0..10 {
            pacing.record_grant(t0 + Duration::from_millis(ms * 100));
        }
        let now = t0 + Duration::from_secs(1);
        let feedback = Feedback {
            partition: 0,
            limit: None,
            sent_at: now,
            rate_limited: true,
            cooldown: None,
            hint: None,
        };
        pacing.learn("u", &feedback, false, now);
        let lowered = pacing.effective_rate();
        assert!(lowered < 10.0, "a 429 lowers the rate: {lowered}");

        pacing.requota(&adaptive(&["600/min"]));
        pacing.refresh_cap("u", now);
        assert_eq!(pacing.effective_rate(), lowered, "600/min is 10/s: what was learnt stays");
        pacing.requota(&adaptive(&["5/s"]));
        pacing.refresh_cap("u", now);
        assert_eq!(pacing.effective_rate(), 5.0, "a new rate starts from its own quota");
    }

    /// An answer at `t0` carrying `hint`, no cap on what it asks.
    fn hinted(hint: RateLimitHint, t0: Instant) -> Feedback {
        let hint = Some(hint.pace(Duration::MAX));
        Feedback { partition: 0, limit: None, sent_at: t0, rate_limited: false, cooldown: None, hint }
    }

    /// A hint spreads what remains until its reset; past the reset only
    /// the quotas pace, and the honest wait says so.
    #[test]
    fn a_hints_cap_counts_in_the_honest_wait_only_until_its_reset() {
        let t0 = Instant::now();
        let ms = |at: Instant| at.duration_since(t0).as_millis();
        let mut pacing = Pacing::new(&quotas(&["10/s"]), t0);
        let hint = RateLimitHint {
            limit: None,
            remaining: 2,
            reset_after: Duration::from_secs(2),
            refill: Refill::AtReset,
        };
        let feedback = hinted(hint, t0);
        pacing.learn("u", &feedback, false, t0);
        let floor = pacing.floor(t0);
        assert_eq!(ms(floor.at(1)), 1_000, "two left in 2 s: one a second");
        // Five ahead would take 5 s at the hint's pace, which ends at 2 s:
        // no sooner than then, nor than 10/s allows (thirty take 3 s).
        assert_eq!(ms(floor.at(5)), 2_000);
        let thirty = ms(floor.at(30));
        assert!((3_000..=3_030).contains(&thirty), "{thirty}");
    }

    /// A refilling bucket with nothing left (OpenAI: 600 a minute, full in
    /// 60 s) pauses until one unit is back, then paces at its refill rate.
    #[test]
    fn a_spent_refilling_bucket_waits_one_unit_then_keeps_its_pace() {
        let t0 = Instant::now();
        let ms = |at: Instant| at.duration_since(t0).as_millis();
        let mut pacing = Pacing::new(&quotas(&["100/s"]), t0);
        let reset_after = Duration::from_secs(60);
        let hint = RateLimitHint { limit: Some(600), remaining: 0, reset_after, refill: Refill::Continuous };
        let feedback = hinted(hint, t0);
        let learned = pacing.learn("u", &feedback, false, t0);
        assert_eq!(learned.pause, Some(Duration::from_millis(100)), "the pause other replicas are told");
        let floor = pacing.floor(t0);
        assert_eq!(ms(floor.at(0)), 100, "the next unit is back in 100 ms, not 60 s");
        let fourth = ms(floor.at(3));
        assert!((390..=400).contains(&fourth), "then about one every 100 ms, not 100/s: {fourth}");
    }

    #[test]
    fn absurd_waits_from_the_network_do_not_overflow() {
        let t0 = Instant::now();
        let mut pacing = Pacing::new(&quotas(&["10/s"]), t0);
        for remaining in [0, 5] {
            let hint =
                RateLimitHint { limit: None, remaining, reset_after: Duration::MAX, refill: Refill::AtReset };
            let feedback = Feedback {
                partition: 0,
                limit: None,
                sent_at: t0,
                rate_limited: true,
                cooldown: Some(Duration::MAX),
                hint: Some(hint.pace(Duration::MAX)),
            };
            pacing.learn("u", &feedback, false, t0);
        }
        assert!(
            pacing.admit("u", t0 + Duration::from_secs(3600), NonZeroU32::MIN).is_err(),
            "paused, as far as it can tell"
        );
    }
}
