//! The dispatcher: an upstream's admission core, shared by its callers and
//! the one task that drives it.
//!
//! Every decision is the [`Admission`] core's, taken under one lock: a caller
//! joins with [`Dispatcher::join`], which either leaves at once (nobody
//! waits, a concurrency slot and a pacer slot are free) or queues and waits
//! for a [`Ticket`]. The driver task (`driver.rs`) hands tickets out to
//! queued callers as the core allows, sleeping until the core's next instant
//! or until something changes (a caller queued, an attempt ended, a reload).
//! Only that task ever sleeps on an upstream's schedule, so there is no herd
//! of waiters polling the limiter.
//!
//! A ticket counts its attempt in flight until dropped. A caller that stops
//! waiting (timeout, disconnect) closes its channel and is counted out under
//! the lock, so the queue depth stays exact; the core skips its entry
//! without spending quota.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::{self, Either, Ready};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::shared::{InForce, Limiter, Shared, Ticket};
use crate::admission::{
    Admission, Feedback, Limits, Needs, Place, Refusal, Reservation, SINGLE, Settlement, Status, Transition,
};
use crate::config;
use crate::limit::pacer::paced_quotas;
use crate::metrics::Metrics;
use crate::retry::RetryBudget;
use crate::store::{SharedQuotas, Store};

/// Handle to an upstream's dispatcher; cheap to share.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    handle: Arc<Handle>,
}

/// Every clone of a [`Dispatcher`] holds this; when the last goes, the
/// driver is told to finish.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Dispatcher {
    /// Starts the driver of one upstream on the current runtime.
    pub fn spawn(upstream: &config::Upstream, metrics: Arc<Metrics>, store: Option<Arc<Store>>) -> Self {
        let core = Admission::new(
            &upstream.name,
            Limits::of(upstream),
            upstream.partition_by.is_some(),
            store.is_some(),
            Instant::now(),
        );
        let shared = Arc::new(Shared {
            name: upstream.name.clone(),
            config: InForce::new(upstream),
            metrics,
            core: Mutex::new(core),
            wake: Notify::new(),
            limiter: ArcSwapOption::new(limiter(upstream, store)),
            closed: AtomicBool::new(false),
            closing: OnceLock::new(),
            closing_started: Notify::new(),
            budget: Mutex::new(RetryBudget::from_config(&upstream.retry)),
            owed: Mutex::new(Vec::new()),
        });
        tokio::spawn(super::driver::supervise(shared.clone()));
        export_token_series(&shared.metrics, upstream);
        Self { handle: Arc::new(Handle { shared }) }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The config in force: what limit indices mean now.
    pub fn config(&self) -> arc_swap::Guard<Arc<config::Upstream>> {
        self.shared().config.load()
    }

    /// What `needs` says a request needs of the config in force (nothing,
    /// at no cost, when it has no endpoint limits or token quotas).
    pub fn needs(&self, needs: impl Fn(&config::Upstream) -> Needs) -> Needs {
        self.shared().config.needs(needs)
    }

    /// An honest `Retry-After` for a caller at `place` that needs `needs`
    /// and cannot wait now ([`Admission::retry_after`]).
    pub fn retry_after(&self, place: Place, needs: &Needs) -> Duration {
        self.shared().lock().retry_after(place, needs, Instant::now())
    }

    /// The admission state now, as `/status` and `/metrics` show it.
    pub fn status(&self) -> Status {
        self.shared().lock().status(Instant::now())
    }

    /// An LLM call's input estimate, corrected by this upstream's calibration.
    pub fn calibrated(&self, input: u64) -> u64 {
        self.shared().lock().calibrated(input)
    }

    /// Settles the token reservation of an attempt granted at `granted`
    /// (see `admission::tokens`): the token quotas of `partition` are
    /// corrected to what it is charged, which is counted, and an
    /// `estimated` input (uncalibrated, counted by a tokenizer) learns from
    /// the usage reported. With `[redis]` the shared schedule is corrected
    /// alike, for every replica. Tokens given back may let a waiter leave
    /// sooner, so the driver looks again.
    pub fn settle_tokens(
        &self,
        partition: u64,
        reserved: Reservation,
        settlement: Settlement,
        estimated: Option<u64>,
        granted: Instant,
    ) {
        let shared = self.shared();
        let (charged, quotas) = shared.change(|core| {
            if let (Settlement::Used(usage), Some(estimated)) = (settlement, estimated) {
                core.calibrate(estimated, usage.input);
            }
            let charged = core.settle_tokens(partition, reserved, settlement, granted, Instant::now());
            (charged, core.limits().tokens)
        });
        // With `[redis]` the driver corrects the shared schedule before it asks again.
        if shared.limiter.load().is_some() {
            shared.owe(partition, quotas.corrections(reserved, charged));
        }
        shared.wake.notify_one();
        shared.metrics.count_tokens(&shared.name, charged.input, charged.output);
    }

    /// Tells the core what an answer said about the upstream's limits; a
    /// pause is shared with the other replicas through Redis.
    pub fn report(&self, feedback: Feedback) {
        let shared = self.shared();
        let limiter = shared.limiter.load();
        let up = limiter.as_ref().is_some_and(|l| l.store.is_up());
        let pause = shared.change(|core| core.feedback(&feedback, up, Instant::now()));
        if let (Some(pause), Some(limiter)) = (pause, limiter.as_ref()) {
            let limit =
                feedback.limit.and_then(|index| limiter.limits.get(index)).and_then(SharedQuotas::name);
            limiter.store.cool_down(limiter.store.keys(&shared.name, feedback.partition), limit, pause);
        }
    }

    /// Tells the breaker how an attempt sent at `sent_at` ended. When that
    /// opens it, the callers that cannot wait for the break are answered
    /// `circuit_open` now; the transition is logged and counted.
    pub fn record_outcome(&self, sent_at: Instant, failed: bool) {
        let shared = self.shared();
        let jitter = rand::random::<f64>();
        let (transition, refused) = shared.change(|core| {
            let now = Instant::now();
            let (transition, refused) = core.record_outcome(now, sent_at, failed, jitter);
            let retry_after = core.break_left(now).unwrap_or_default();
            let count = refused.len();
            for tickets in refused {
                let _ = tickets.send(Err(Refusal::CircuitOpen { retry_after }));
            }
            (transition, count)
        });
        let label = Metrics::upstream(&shared.name);
        match transition {
            Some(Transition::Opened { open_for, failures, attempts }) => {
                shared.metrics.breaker_opened.get_or_create(&label).inc();
                // The other replicas hold their queues too, through Redis.
                if let Some(limiter) = shared.limiter.load().as_ref() {
                    limiter.store.open_breaker(limiter.store.keys(&shared.name, SINGLE), open_for);
                }
                tracing::warn!(
                    upstream = %shared.name,
                    failures,
                    attempts,
                    open_for_ms = open_for.as_millis() as u64,
                    refused,
                    "breaker_opened"
                );
            }
            Some(Transition::Closed) => {
                if let Some(limiter) = shared.limiter.load().as_ref() {
                    limiter.store.close_breaker(limiter.store.keys(&shared.name, SINGLE));
                }
                tracing::info!(upstream = %shared.name, "breaker_closed");
            }
            None => {}
        }
        // An answer may end a half-open wait, or open the breaker: the
        // driver must look again either way.
        shared.wake.notify_one();
    }

    /// Counts a first attempt towards the retry budget.
    pub fn record_first_attempt(&self, granted: Instant) {
        self.budget().record_request(granted);
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn withdraw_retry(&self) -> bool {
        self.budget().try_withdraw(Instant::now())
    }

    fn budget(&self) -> MutexGuard<'_, RetryBudget> {
        self.shared().budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a reloaded config: bounds at once, new quotas from the next
    /// grant; unchanged quotas keep their state.
    pub fn reconfigure(&self, upstream: &config::Upstream, store: Option<Arc<Store>>) {
        let shared = self.shared();
        *self.budget() = RetryBudget::from_config(&upstream.retry);
        let limits = Limits::of(upstream);
        shared.change(|core| {
            core.reconfigure(limits, store.is_some(), Instant::now());
            shared.config.store(upstream);
        });
        shared.limiter.store(limiter(upstream, store));
        shared.wake.notify_one();
        export_token_series(&shared.metrics, upstream);
    }

    /// Shutdown started; its grace `ends` then, and the last `margin` of it
    /// is for answering. Nobody leaves the queue after `ends - margin`:
    /// waiters that cannot leave before are refused now, the others then
    /// if still waiting (`admission::closing`). Attempts with no answer
    /// yet at `ends - margin / 2` give up ([`Self::last_call`]), so that
    /// every caller still has time to get its 503 before its connection is
    /// closed.
    pub fn close(&self, ends: Instant, margin: Duration) {
        let shared = self.shared();
        let cutoff = ends.checked_sub(margin).unwrap_or(ends);
        let last_call = ends.checked_sub(margin / 2).unwrap_or(ends);
        // The first close counts: a later one (a reload while closing) is the same.
        let _ = shared.closing.set((last_call, ends));
        shared.closing_started.notify_waiters();
        shared.change(|core| {
            let now = Instant::now();
            let refused = core.close(cutoff, ends, now);
            let refusal = core.shutting_down(now);
            for tickets in refused {
                let _ = tickets.send(Err(refusal));
            }
        });
        shared.wake.notify_one();
    }

    /// Resolves once shutdown started and an attempt without an answer
    /// must give up (see [`Self::close`]), with the grace's end.
    pub async fn last_call(&self) -> Instant {
        let shared = self.shared();
        let (last_call, ends) = loop {
            // A plain `Notify`: every attempt waits on this, and a `watch`
            // subscription cost more (callgrind, BENCHMARKS.md). Made
            // before the look, it is woken by a close in between.
            let started = shared.closing_started.notified();
            if let Some(at) = shared.closing.get() {
                break *at;
            }
            started.await;
        };
        tokio::time::sleep_until(last_call).await;
        ends
    }

    /// Waits for a ticket as a new caller at `place`, until `deadline`.
    /// `needs` says what the caller takes from the endpoint limits of a
    /// config (their indices are that config's).
    ///
    /// Admission is decided before the future is made, so that what the
    /// future keeps while it waits is only the wait itself; a caller that
    /// can leave at once gets its ticket here.
    pub fn join(
        &self,
        place: Place,
        needs: impl Fn(&config::Upstream) -> Needs,
        deadline: Instant,
    ) -> Either<Ready<Result<Ticket, Refusal>>, impl Future<Output = Result<Ticket, Refusal>> + Send + '_>
    {
        self.enter(place, needs, deadline, false)
    }

    /// Waits for a ticket for a retry, at the head of its caller's queue in
    /// `place`, until `deadline`; `needs` as for [`Self::join`].
    pub fn rejoin(
        &self,
        place: Place,
        needs: impl Fn(&config::Upstream) -> Needs,
        deadline: Instant,
    ) -> Either<Ready<Result<Ticket, Refusal>>, impl Future<Output = Result<Ticket, Refusal>> + Send + '_>
    {
        self.enter(place, needs, deadline, true)
    }

    /// Leaves at once, or queues (a `retry` at the head) and waits.
    ///
    /// `needs` is worked out against the config in force before the lock
    /// is taken (matching paths there would hold up every other caller),
    /// and again under it in the rare case that a reload, which swaps the
    /// config under the same lock, came in between: the indices would
    /// otherwise name another limit.
    fn enter(
        &self,
        place: Place,
        needs: impl Fn(&config::Upstream) -> Needs,
        deadline: Instant,
        retry: bool,
    ) -> Either<Ready<Result<Ticket, Refusal>>, impl Future<Output = Result<Ticket, Refusal>> + Send + '_>
    {
        let shared = self.shared();
        let seen = shared.config.generation();
        let mut wanted = shared.config.needs(&needs);
        let mut core = shared.lock();
        if shared.config.generation() != seen {
            wanted = shared.config.needs(&needs);
        }
        let needs = wanted;
        // Read under the lock: the pacer counts on decisions being presented
        // in order and on time, not as late as the wait for the lock.
        let now = Instant::now();
        if core.try_leave(place, &needs, now) {
            drop(core);
            return Either::Left(future::ready(Ok(Ticket::new(shared, now))));
        }
        let (tickets, receiver) = oneshot::channel();
        let queued = core.enqueue(tickets, place, needs, (retry, Some(deadline)), now);
        let since = now;
        drop(core);
        if let Err(refusal) = queued {
            return Either::Left(future::ready(Err(refusal)));
        }
        shared.wake.notify_one();
        // Made before any await, so that a future dropped unpolled still
        // counts its caller out.
        let mut slot = QueueSlot { receiver, shared, settled: false };
        Either::Right(async move {
            match tokio::time::timeout_at(deadline, &mut slot.receiver).await {
                Ok(Ok(answer)) => {
                    slot.served();
                    answer.map(|ticket| ticket.waited_since(since))
                }
                Ok(Err(_)) | Err(_) => match slot.leave() {
                    Some(ticket) => Ok(ticket.waited_since(since)), // served at the very last moment
                    // Its Retry-After is the caller's to work out: it
                    // knows what it needs of the limits, this wait does not
                    // (`Upstream::honest`), and a retry's is not used.
                    None => Err(Refusal::Timeout { waited: since.elapsed(), retry_after: Duration::ZERO }),
                },
            }
        })
    }
}

/// `pacegate_tokens_total` at 0 for an upstream with token quotas, from the start.
fn export_token_series(metrics: &Metrics, upstream: &config::Upstream) {
    if upstream.tokens.is_some() {
        metrics.count_tokens(&upstream.name, 0, 0);
    }
}

/// The shared limiter for `upstream`'s quotas, with `[redis]`: its own,
/// then each endpoint limit's, then the token quotas, as `Limits` numbers them.
fn limiter(upstream: &config::Upstream, store: Option<Arc<Store>>) -> Option<Arc<Limiter>> {
    let quotas = SharedQuotas::new(&paced_quotas(&upstream.rate, upstream.burst));
    let limits =
        upstream.limits.iter().map(|l| SharedQuotas::limit(&l.name, &paced_quotas(&l.rate, l.burst)));
    let tokens = upstream.tokens.iter().flat_map(|t| &t.quotas);
    let tokens =
        tokens.map(|(kind, rate)| SharedQuotas::limit(kind.name(), &paced_quotas(rate, NonZeroU32::MIN)));
    let limits = limits.chain(tokens).collect();
    // A probe answers within one attempt's timeout, or counts as failed.
    let probes = upstream.breaker.as_ref().map(|b| (b.probes.get(), upstream.timeout));
    store.map(|store| Arc::new(Limiter { store, quotas, limits, probes }))
}

/// A caller's place in the queue; leaving it (even by being dropped when the
/// client disconnects) counts the caller out exactly once.
struct QueueSlot<'a> {
    receiver: oneshot::Receiver<Result<Ticket, Refusal>>,
    shared: &'a Arc<Shared>,
    /// The caller got its answer: nothing to count out.
    settled: bool,
}

impl QueueSlot<'_> {
    /// The driver answered: it counted this caller out itself.
    fn served(&mut self) {
        self.settled = true;
    }

    /// Stops waiting; returns a ticket that was sent before the channel
    /// closed. Closing under the lock orders it against the driver's
    /// hand-outs, which also happen under the lock.
    fn leave(&mut self) -> Option<Ticket> {
        if std::mem::replace(&mut self.settled, true) {
            return None;
        }
        let mut core = self.shared.lock();
        self.receiver.close();
        match self.receiver.try_recv() {
            Ok(Ok(ticket)) => Some(ticket),
            // Refused: the core counted this caller out when it answered.
            Ok(Err(_)) => None,
            Err(_) => {
                core.depart();
                None
            }
        }
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        drop(self.leave());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An upstream whose limits are `names`, in that order: `slow` takes
    /// one request a minute, `fast` a thousand a second.
    fn upstream(names: [&str; 2]) -> config::Upstream {
        let limit = |name: &str| {
            let rate = if name == "slow" { "1/min" } else { "1000/s" };
            format!("[[upstream.limit]]\nname = \"{name}\"\npaths = [\"/{name}/**\"]\nrate = \"{rate}\"\n")
        };
        let text = format!(
            "[[upstream]]\nname = \"api\"\nbase_url = \"http://127.0.0.1:1\"\nroute = \"/api\"\nrate = \"1000/s\"\n{}{}",
            limit(names[0]),
            limit(names[1])
        );
        let mut config = config::parse(std::path::Path::new("t.toml"), &text).expect("a valid config");
        config.upstreams.remove(0)
    }

    /// One unit of the limit `name`, numbered as in `config`.
    fn one_of(name: &str, config: &config::Upstream) -> Needs {
        let index = config.limits.iter().position(|limit| limit.name == name).expect("the limit");
        Needs::new([(index, NonZeroU32::MIN)])
    }

    /// A reload between working out a request's needs and taking the lock
    /// renumbers the limits: the request still takes the limit it matched
    /// (`fast`, free), not the one its old index names now (`slow`, spent
    /// for a minute).
    #[tokio::test]
    async fn needs_follow_a_reload_that_comes_before_the_lock() {
        let dispatcher = Dispatcher::spawn(&upstream(["slow", "fast"]), Arc::new(Metrics::new()), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let spent = dispatcher.join(Place::default(), |config| one_of("slow", config), deadline).await;
        assert!(spent.is_ok(), "the slow limit's one request of the minute");

        let reloaded = AtomicBool::new(false);
        let fast_after_a_reload = |config: &config::Upstream| {
            if !reloaded.swap(true, Ordering::Relaxed) {
                dispatcher.reconfigure(&upstream(["fast", "slow"]), None);
            }
            one_of("fast", config)
        };
        let deadline = Instant::now() + Duration::from_millis(500);
        let joined = dispatcher.join(Place::default(), fast_after_a_reload, deadline).await;
        assert!(reloaded.load(Ordering::Relaxed), "the reload came between");
        assert!(joined.is_ok(), "waited for the slow limit: {:?}", joined.err());
    }
}
