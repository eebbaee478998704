//! What an upstream's callers, their tickets and its driver share: the
//! admission core behind its lock, the driver's wake-up, the shared limiter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::admission::{Admission, Confirm, Needs, Refusal, Waiter};
use crate::config;
use crate::metrics::Metrics;
use crate::retry::RetryBudget;
use crate::store::{SharedQuotas, Store};

/// Permission to send one attempt: counts it in flight until dropped.
#[derive(Debug)]
pub struct Ticket {
    /// The dispatcher to tell when the attempt ends; `None` once told.
    shared: Option<Arc<Shared>>,
    /// How long this attempt waited in the queue.
    pub waited: Duration,
    /// When it was granted: its token reservation's place in the quotas' ledgers.
    pub granted: Instant,
}

impl Ticket {
    pub(super) fn new(shared: &Arc<Shared>, granted: Instant) -> Self {
        Self { shared: Some(shared.clone()), waited: Duration::ZERO, granted }
    }

    pub(super) fn waited_since(mut self, since: Instant) -> Self {
        self.waited = since.elapsed();
        self
    }

    /// A ticket nobody took, under the lock: its slot is released there.
    fn unused(mut self, core: &mut Core) {
        self.shared = None;
        core.release(self.granted);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else { return };
        let waiting = shared.lock().release(self.granted);
        if waiting {
            shared.wake.notify_one();
        }
    }
}

/// Where the driver sends one waiter's answer: all the core keeps of a
/// waiter (its queue is its place), since a queue may hold many thousands.
pub(super) type Tickets = oneshot::Sender<Result<Ticket, Refusal>>;

impl Waiter for Tickets {
    fn gone(&self) -> bool {
        self.is_closed()
    }
}

pub(super) type Core = Admission<Tickets>;

/// The shared limiter in force, with `[redis]`.
#[derive(Debug)]
pub(super) struct Limiter {
    pub store: Arc<Store>,
    /// The upstream's quotas as the shared script takes them.
    pub quotas: SharedQuotas,
    /// Each endpoint limit's quotas, by index.
    pub limits: Vec<SharedQuotas>,
    /// With a breaker: the probes the replicas share when half-open, and
    /// how long one may take.
    pub probes: Option<(u32, Duration)>,
}

impl Limiter {
    /// What each attempt of `confirm` takes, for the shared script.
    pub fn demand(&self, confirm: &Confirm) -> Vec<(Option<usize>, &SharedQuotas, u32)> {
        let limits = confirm
            .needs()
            .iter()
            .filter_map(|(index, units)| Some((Some(index), self.limits.get(index)?, units.get())));
        std::iter::once((None, &self.quotas, 1)).chain(limits).collect()
    }
}

/// What the callers, the tickets and the driver share.
#[derive(Debug)]
pub(super) struct Shared {
    /// Upstream name, for logs, metrics and Redis keys.
    pub name: String,
    /// The config in force, whose endpoint limits and token quotas the
    /// core's limit indices number: a request that began under an earlier
    /// config works out its needs from this one (a reload may reorder them).
    pub config: InForce,
    pub metrics: Arc<Metrics>,
    pub core: Mutex<Core>,
    /// Wakes the driver: a caller queued, an attempt ended, a reload.
    pub wake: Notify,
    /// With `[redis]`: the shared limiter every grant also needs.
    pub limiter: ArcSwapOption<Limiter>,
    /// Every handle is gone: the driver serves what is queued, then stops.
    pub closed: AtomicBool,
    /// Retries allowed as a share of first attempts (`budget`).
    pub budget: Mutex<RetryBudget>,
    /// Set when shutdown starts: (when attempts still without an answer
    /// give up, when the grace ends).
    pub closing: OnceLock<(Instant, Instant)>,
    /// Wakes the attempts waiting for `closing`.
    pub closing_started: Notify,
    /// With `[redis]`: settled token corrections the shared schedule still
    /// owes, as (partition, limit index, units), one entry per pair.
    pub owed: Mutex<Vec<(u64, usize, i64)>>,
}

/// An upstream's config in force, and what a request's needs take of it
/// at little cost: most upstreams have no endpoint limits or token quotas,
/// and their requests need nothing of any config.
#[derive(Debug)]
pub(super) struct InForce {
    config: ArcSwap<config::Upstream>,
    /// Changes so far: a reload between two looks is seen without loading
    /// the config.
    generation: AtomicU64,
    /// Whether the config has endpoint limits or token quotas.
    limited: AtomicBool,
}

impl InForce {
    pub fn new(upstream: &config::Upstream) -> Self {
        Self {
            config: ArcSwap::from_pointee(upstream.clone()),
            generation: AtomicU64::new(0),
            limited: AtomicBool::new(Self::limits(upstream)),
        }
    }

    fn limits(upstream: &config::Upstream) -> bool {
        !upstream.limits.is_empty() || upstream.tokens.is_some()
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<config::Upstream>> {
        self.config.load()
    }

    /// Puts `upstream` in force; under the core's lock, so that a decision
    /// taken under it sees [`Self::generation`] and the config agree.
    pub fn store(&self, upstream: &config::Upstream) {
        self.config.store(Arc::new(upstream.clone()));
        self.limited.store(Self::limits(upstream), Ordering::Relaxed);
        // Released after the config: whoever reads this count reads that
        // config or a later one.
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What `needs` says a request needs of the config in force: nothing
    /// when it has no limits, without a look at it.
    pub fn needs(&self, needs: impl Fn(&config::Upstream) -> Needs) -> Needs {
        if self.limited.load(Ordering::Relaxed) { needs(&self.config.load()) } else { Needs::default() }
    }
}

impl Shared {
    /// The core, for one decision. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on the core, then counts the cooldown it added.
    pub fn change<R>(&self, change: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = self.lock();
        let result = change(&mut core);
        let cooled = core.take_cooled();
        drop(core);
        if !cooled.is_zero() {
            let label = Metrics::upstream(&self.name);
            self.metrics.cooldown_seconds.get_or_create(&label).inc_by(cooled.as_secs_f64());
        }
        result
    }

    /// Adds settled corrections for the driver to send to Redis; summed per
    /// partition and quota, so the list is bounded by those pairs.
    pub fn owe(&self, partition: u64, corrections: Vec<(usize, i64)>) {
        let mut owed = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        for (index, units) in corrections {
            match owed.iter_mut().find(|(p, i, _)| *p == partition && *i == index) {
                Some((_, _, sum)) => *sum = sum.saturating_add(units),
                None => owed.push((partition, index, units)),
            }
        }
    }

    /// The corrections owed so far, taken.
    pub fn take_owed(&self) -> Vec<(u64, usize, i64)> {
        std::mem::take(&mut *self.owed.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Hands a ticket to `tickets`, under the lock so that a caller leaving
    /// at the same moment is counted out exactly once.
    /// `now` is the instant the core granted it at.
    pub fn hand(self: &Arc<Self>, core: &mut Core, tickets: Tickets, now: Instant) {
        if let Err(Ok(ticket)) = tickets.send(Ok(Ticket::new(self, now))) {
            ticket.unused(core);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued request also holds its ticket channel (the answer inside
    /// it) and its entry in the queue: both part of its memory budget.
    #[test]
    fn a_queued_request_s_channel_and_entry_stay_within_their_budget() {
        assert_eq!(std::mem::size_of::<Tickets>(), 8, "the queue keeps one pointer per waiter");
        let answer = std::mem::size_of::<Result<Ticket, Refusal>>();
        assert!(answer <= 40, "the channel's answer grew to {answer} bytes");
    }
}
