//! One partition of an upstream: its own quotas, cooldown, adaptive rate and
//! rate-limit hints, and its own waiters.
//!
//! Real quotas are per credential, so with `partition_by` each distinct key
//! value gets a `Partition`: a 429 for key A cools down only A's partition,
//! and A's adaptive rate and `X-RateLimit-*` hints never slow key B. Without
//! `partition_by` an upstream has exactly one partition, and this is the
//! state the dispatcher always had.
//!
//! Keys are 64-bit hashes: the credential itself is never stored, logged or
//! shown. Partition keys hash the same on every replica ([`partition_key`],
//! SHA-256), because with `[redis]` they name the shared buckets; caller keys
//! only order one process's queue and use a per-process seed ([`caller_key`]),
//! so callers cannot craft collisions across restarts.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::dispatcher::{Feedback, Shared};
use super::schedule::Schedule;
use crate::config;
use crate::limit::pacer::{GUARD, Taken};
use crate::limit::{Adaptive, Pacer};
use crate::metrics::Metrics;

/// The one partition of an upstream without `partition_by`.
pub const SINGLE: u64 = 0;

/// Hashes a partition key the same way on every replica; the value itself
/// is not kept.
pub fn partition_key(bytes: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut first = [0; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    // 0 is reserved for SINGLE; a collision there only merges two buckets.
    u64::from_be_bytes(first).max(1)
}

/// Hashes a caller key under a per-process seed; the value itself is not kept.
pub fn caller_key(bytes: &[u8]) -> u64 {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    SEED.get_or_init(RandomState::new).hash_one(bytes)
}

/// Quotas a partition's pacer is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    pub rate: Vec<config::Rate>,
    pub burst: std::num::NonZeroU32,
    pub adaptive: bool,
}

impl Quotas {
    pub fn of(upstream: &config::Upstream) -> Self {
        Self { rate: upstream.rate.clone(), burst: upstream.burst, adaptive: upstream.adaptive }
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

/// One partition: its waiters, and its pacing state.
///
/// The pacing state sits behind a lock because callers share the single
/// partition of an upstream without `partition_by`: when nobody waits, a
/// caller takes its slot there itself instead of queueing (see
/// `Dispatcher::join`). The task holds the lock only for one decision.
pub struct Partition<W> {
    pub waiters: Schedule<W>,
    pacing: Arc<Mutex<Pacing>>,
}

impl<W> Partition<W> {
    pub fn new(quotas: &Quotas) -> Self {
        Self::sharing(Arc::new(Mutex::new(Pacing::new(quotas))))
    }

    /// A partition paced by `pacing`, which callers may also take slots from.
    pub fn sharing(pacing: Arc<Mutex<Pacing>>) -> Self {
        Self { waiters: Schedule::default(), pacing }
    }

    pub fn pacing(&self) -> MutexGuard<'_, Pacing> {
        self.pacing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nothing waits and the pacing state is idle: dropping it loses nothing.
    pub fn idle(&self, now: Instant) -> bool {
        self.waiters.is_empty() && self.pacing().idle(now)
    }
}

/// One partition's quotas, cooldown, adaptive rate and rate-limit hints.
#[derive(Debug)]
pub struct Pacing {
    /// What `pacer` and `adaptive` were built from.
    quotas: Quotas,
    pub pacer: Pacer,
    /// Lowers the pace after 429s; `None` when `adaptive = false`.
    adaptive: Option<Adaptive>,
    /// Nothing leaves before this instant (429, Retry-After, Remaining: 0).
    pub cooldown_until: Option<Instant>,
    /// The shared (Redis) quotas admit nobody before this instant.
    pub shared_wait: Option<Instant>,
    /// Remaining quota spread until its reset: (requests per second, reset).
    hint_cap: Option<(f64, Instant)>,
    /// Recent ticket instants, to measure what the upstream accepted.
    grants: VecDeque<Instant>,
    /// Window of the pacing quota: how far back `grants` reaches.
    window: Duration,
    /// After this long without a grant the pacer is back to full (evictable).
    idle_after: Duration,
    /// Last ticket handed out, for eviction.
    last_grant: Option<Instant>,
}

impl Pacing {
    pub fn new(quotas: &Quotas) -> Self {
        let pacer = Pacer::new(&quotas.rate, quotas.burst);
        Self {
            quotas: quotas.clone(),
            adaptive: quotas.adaptive.then(|| Adaptive::new(pacer.rate_per_second())),
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

    /// New quotas: a fresh pacer and adaptive state; cooldown is kept (the
    /// upstream asked for it, whatever our quotas say). The same quotas
    /// again change nothing.
    pub fn requota(&mut self, quotas: &Quotas) {
        if *quotas == self.quotas {
            return;
        }
        let fresh = Self::new(quotas);
        self.quotas = fresh.quotas;
        self.pacer = fresh.pacer;
        self.adaptive = fresh.adaptive;
        self.window = fresh.window;
        self.idle_after = fresh.idle_after;
        self.hint_cap = None;
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
    pub fn blocked_until(&self, now: Instant) -> Option<Instant> {
        [self.cooldown_until, self.shared_wait].into_iter().flatten().filter(|at| *at > now).max()
    }

    /// Takes a slot for an attempt leaving now, if the partition is neither
    /// paused nor out of pacer slots; otherwise says when it may try again.
    pub fn admit(&mut self, shared: &Shared, now: Instant) -> Result<Taken, Instant> {
        self.refresh_cap(shared, now);
        match self.blocked_until(now) {
            Some(until) => Err(until),
            None => self.pacer.try_acquire(now),
        }
    }

    pub fn record_grant(&mut self, now: Instant) {
        self.last_grant = Some(now);
        self.grants.push_back(now);
        while self.grants.front().is_some_and(|at| now.duration_since(*at) > self.window) {
            self.grants.pop_front();
        }
    }

    /// Applies what an answer said: cooldown, adaptive rate, quota hints.
    /// `shared`: the quotas are shared with other replicas (Redis). Returns
    /// the pause the upstream asked for, for the other replicas.
    pub fn learn(&mut self, cx: &Shared, feedback: Feedback, shared: bool) -> Option<Duration> {
        let now = Instant::now();
        if feedback.rate_limited {
            let at = std::time::SystemTime::now();
            cx.observe(|o| o.last_rate_limited = Some((at, feedback.cooldown)));
        }
        if let Some(pause) = feedback.cooldown {
            let reason = if feedback.rate_limited { "rate_limited" } else { "retry_after" };
            self.cool_down(cx, now, pause, reason);
        }
        let mut pause = feedback.cooldown;
        if feedback.rate_limited
            && let Some(adaptive) = &mut self.adaptive
        {
            // With shared quotas, this replica's grants are only its share of
            // what the upstream accepted; the shared pace is the better measure.
            let accepted = self.grants.iter().filter(|at| now.duration_since(**at) <= self.window).count();
            let own_rate = accepted as f64 / self.window.as_secs_f64();
            let accepted_rate = if shared { self.pacer.effective_rate() } else { own_rate };
            if let Some(rate) = adaptive.on_rate_limited(now, feedback.sent_at, accepted_rate) {
                tracing::info!(upstream = %cx.name, rate, reason = "rate_limited", "adaptive rate lowered");
            }
        }
        if let Some(hint) = feedback.hint {
            if hint.remaining == 0 && !hint.reset_after.is_zero() {
                self.cool_down(cx, now, hint.reset_after, "ratelimit_remaining");
                self.hint_cap = None;
                pause = pause.max(Some(hint.reset_after));
            } else if !hint.reset_after.is_zero() {
                let rate = hint.remaining as f64 / hint.reset_after.as_secs_f64();
                self.hint_cap = Some((rate, now + hint.reset_after));
            }
        }
        self.refresh_cap(cx, now);
        pause
    }

    /// Pauses the partition until `now + pause` (never shortens a pause).
    pub fn cool_down(&mut self, cx: &Shared, now: Instant, pause: Duration, reason: &'static str) {
        let until = now + pause;
        let paused_from = self.cooldown_until.map_or(now, |current| current.max(now));
        if paused_from >= until {
            return;
        }
        let added = (until - paused_from).as_secs_f64();
        cx.metrics.cooldown_seconds.get_or_create(&Metrics::upstream(&cx.name)).inc_by(added);
        tracing::warn!(upstream = %cx.name, delay_ms = pause.as_millis() as u64, reason, "cooldown");
        self.cooldown_until = Some(until);
        cx.observe(|o| o.cooldown_until = Some(until));
    }

    /// Recomputes the pace below the quotas: adaptive rate and quota hints.
    /// `/status` shows the partition that moved last.
    pub fn refresh_cap(&mut self, cx: &Shared, now: Instant) {
        if self.hint_cap.is_some_and(|(_, until)| until <= now) {
            self.hint_cap = None;
        }
        if self.cooldown_until.is_some_and(|until| until <= now) {
            self.cooldown_until = None;
        }
        if let Some(adaptive) = &mut self.adaptive
            && let Some(rate) = adaptive.on_tick(now)
        {
            tracing::info!(upstream = %cx.name, rate = rate.unwrap_or(f64::NAN), "adaptive rate probed up");
        }
        let adaptive = self.adaptive.as_ref().and_then(Adaptive::current);
        let hint = self.hint_cap.map(|(rate, _)| rate);
        let cap = match (adaptive, hint) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        };
        self.pacer.set_cap(cap);
        let effective_rate = self.pacer.effective_rate();
        let cooldown_until = self.cooldown_until;
        cx.observe(|o| {
            o.effective_rate = effective_rate;
            o.cooldown_until = cooldown_until;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;
    use crate::upstream::schedule::Priority;

    fn quotas(rates: &[&str]) -> Quotas {
        let rate = rates.iter().map(|r| parse_rate(r).expect("rate")).collect();
        Quotas { rate, burst: std::num::NonZeroU32::MIN, adaptive: false }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_once_the_longest_window_has_passed() {
        let mut partition: Partition<()> = Partition::new(&quotas(&["10/s", "100/min"]));
        assert!(partition.idle(Instant::now()), "never used: nothing to lose");
        partition.pacing().record_grant(Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!partition.idle(Instant::now()), "the per-minute quota still remembers the grant");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(partition.idle(Instant::now()));
        partition.waiters.push_back(0, Priority::Normal, ());
        assert!(!partition.idle(Instant::now()), "a waiter keeps its partition");
    }

    #[test]
    fn keys_are_hashed_and_distinct() {
        for hash in [partition_key, caller_key] {
            assert_eq!(hash(b"h:Bearer A"), hash(b"h:Bearer A"));
            assert_ne!(hash(b"h:Bearer A"), hash(b"h:Bearer B"));
            assert_ne!(hash(b"h:"), hash(b"-"), "an empty header is not a missing one");
        }
        assert_ne!(partition_key(b"anything"), SINGLE);
        // Every replica must name the same shared bucket.
        assert_eq!(partition_key(b"h:Bearer A"), 0xeca4_ed44_c3dc_68e0, "stable across processes");
    }
}
