//! The dispatcher: one task per upstream that owns its queue and its pacing.
//!
//! Connection tasks never pace themselves. They join the upstream's queue
//! and wait for a [`Ticket`]; the dispatcher task (`task.rs`) hands
//! tickets out one by one, each only when a concurrency slot is free, the
//! waiter's partition is not cooling down and its pacer has a slot. Keeping
//! all of that in one task makes the serving order exact and means only one
//! task ever sleeps on an upstream's schedule (no herd of waiters polling the
//! limiter).
//!
//! A waiter joins with a [`Place`]: its partition (`partition_by`, its own
//! quotas and cooldown, see `partition.rs`), its caller (`fair_by`,
//! served round-robin, see [`super::schedule`]) and its priority. Without
//! those keys every place is the same and the queue is the FIFO it always was.
//!
//! When nobody waits, a caller does not queue at all: it takes a concurrency
//! slot and a slot of the upstream's single partition itself and leaves at
//! once ([`Dispatcher::join`]). That is the common case below the quota, and
//! it spares every such request two task hand-offs. With `partition_by` or
//! `[redis]` every caller queues, so that the task alone decides.
//!
//! The queue bound is checked by callers on an atomic counter before they
//! join, so a full queue is answered at once. A caller that stops waiting
//! (timeout, disconnect) closes its ticket channel; the dispatcher skips such
//! entries without spending quota.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::{self, Either, Ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::partition::{Pacing, Quotas, SINGLE};
use super::schedule::Priority;
use super::task::Task;
use crate::config;
use crate::limit::Pacer;
use crate::metrics::Metrics;
use crate::retry::{RateLimitHint, RetryBudget};
use crate::store::Store;

/// Permission to send one attempt: holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Ticket {
    _inflight: OwnedSemaphorePermit,
    /// Counts this attempt in `Dispatcher::inflight` while it lives.
    _counted: InFlight,
    /// How long this attempt waited in the queue.
    pub waited: Duration,
}

impl Ticket {
    /// A ticket as the task hands it out; the waiter stamps its wait on it.
    pub(super) fn new(inflight: OwnedSemaphorePermit, shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Self { _inflight: inflight, _counted: InFlight(shared.clone()), waited: Duration::ZERO }
    }

    fn waited_since(mut self, since: Instant) -> Self {
        self.waited = since.elapsed();
        self
    }

    /// The concurrency slot of a ticket nobody took.
    pub(super) fn into_permit(self) -> OwnedSemaphorePermit {
        self._inflight
    }
}

/// One attempt counted as in flight; uncounted when dropped.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a caller got no ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue already holds `queue_size` callers.
    Full { retry_after: Duration },
    /// The caller's deadline passed while it waited.
    Timeout { waited: Duration, retry_after: Duration },
    /// Its partition would be new and `max_partitions` are live.
    TooManyPartitions,
    /// Redis is unreachable and `on_error = "deny"`.
    StoreDown,
}

/// Where a waiter queues: which bucket paces it, who it is, how urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Hashed `partition_by` value; `SINGLE` (0) without `partition_by`.
    pub partition: u64,
    /// Hashed `fair_by` value; one caller (0) without `fair_by`.
    pub caller: u64,
    pub priority: Priority,
}

impl Default for Place {
    fn default() -> Self {
        Self { partition: SINGLE, caller: 0, priority: Priority::Normal }
    }
}

pub(super) enum Command {
    /// A new caller, at the back of the queue.
    Join(Waiter),
    /// A retry, back at the head: it already waited its turn once.
    Rejoin(Waiter),
    /// What an answer said about the upstream's limits.
    Feedback(Feedback),
    /// A reloaded config for this upstream, and the shared store in force.
    Reconfigure(Box<config::Upstream>, Option<Arc<Store>>),
}

/// What one attempt's answer says about the upstream's limits.
#[derive(Debug, Clone, Copy)]
pub struct Feedback {
    /// The partition whose limits the answer speaks for.
    pub partition: u64,
    /// When the attempt left (its ticket was handed out).
    pub sent_at: Instant,
    /// The upstream answered 429.
    pub rate_limited: bool,
    /// Pause the partition this long (429, or 503 with Retry-After).
    pub cooldown: Option<Duration>,
    /// Remaining quota and reset time the upstream reported.
    pub hint: Option<RateLimitHint>,
}

/// The task answers a ticket, or a refusal it alone can decide.
pub(super) type Answer = Result<Ticket, Refusal>;

/// Where the task sends one waiter's answer: all it keeps of a waiter once
/// queued (the queue it sits in is its place), since a queue may hold many
/// thousands.
pub(super) type Tickets = oneshot::Sender<Answer>;

pub(super) struct Waiter {
    pub tickets: Tickets,
    pub place: Place,
}

/// Counts shared between the dispatcher task and its callers.
#[derive(Debug)]
pub(super) struct Shared {
    /// Upstream name, for logs and metrics.
    pub name: String,
    pub metrics: Arc<Metrics>,
    /// Pacing of the single partition (no `partition_by`), which callers
    /// take slots from directly when nobody waits.
    pub single: Arc<Mutex<Pacing>>,
    /// `[redis]` is configured: every attempt must go through the task.
    pub store_in_use: AtomicBool,
    /// Feedback sent to the task and not applied yet: until it is (a 429's
    /// cooldown, say), callers do not take slots themselves.
    pub unlearned: AtomicUsize,
    /// Callers waiting for a ticket (joined, not yet served or gone).
    pub depth: AtomicUsize,
    /// `queue_size`: new callers are refused when `depth` reaches it.
    pub capacity: AtomicUsize,
    /// Bounds attempts in flight; a ticket holds one permit.
    pub inflight: Arc<Semaphore>,
    /// `max_concurrency` in force (the semaphore is resized on reload).
    max_inflight: AtomicUsize,
    /// Tickets out: the attempts really in flight. Not read off the semaphore,
    /// whose permits the task also holds while the head waits for a slot.
    in_flight: AtomicUsize,
    /// What the task decided lately, for estimates, status and metrics.
    observed: Mutex<Observed>,
    /// Retries allowed as a share of first attempts (SPEC `budget`).
    budget: Mutex<RetryBudget>,
    /// Partitions and callers as the task last counted them, for `/status`.
    shape: Mutex<Shape>,
}

/// Live partitions and per-caller queue depths, never the keys.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Partitions held (active or not yet evicted).
    pub partitions: usize,
    /// Waiters per active caller, largest first.
    pub callers: Vec<usize>,
}

/// The dispatcher's pacing state as callers and the admin side see it.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    /// Requests per second the pacer uses now (adaptive rate and hints included).
    pub effective_rate: f64,
    /// No attempt leaves before this instant.
    pub cooldown_until: Option<Instant>,
    /// When the upstream last answered 429, and the pause it asked for.
    pub last_rate_limited: Option<(std::time::SystemTime, Option<Duration>)>,
}

impl Shared {
    fn observed(&self) -> Observed {
        *self.observed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn observe(&self, update: impl FnOnce(&mut Observed)) {
        update(&mut self.observed.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_shape(&self, shape: Shape) {
        *self.shape.lock().unwrap_or_else(PoisonError::into_inner) = shape;
    }
}

/// Handle to an upstream's dispatcher task; cheap to share.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// Starts the dispatcher task of one upstream.
    pub fn spawn(upstream: &config::Upstream, metrics: Arc<Metrics>, store: Option<Arc<Store>>) -> Self {
        let pacer = Pacer::new(&upstream.rate, upstream.burst);
        let max_inflight = upstream.max_concurrency.get() as usize;
        let observed = Observed {
            effective_rate: pacer.effective_rate(),
            cooldown_until: None,
            last_rate_limited: None,
        };
        let shared = Arc::new(Shared {
            name: upstream.name.clone(),
            metrics,
            single: Arc::new(Mutex::new(Pacing::new(&Quotas::of(upstream)))),
            store_in_use: AtomicBool::new(store.is_some()),
            unlearned: AtomicUsize::new(0),
            depth: AtomicUsize::new(0),
            capacity: AtomicUsize::new(upstream.queue_size),
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight: AtomicUsize::new(max_inflight),
            in_flight: AtomicUsize::new(0),
            observed: Mutex::new(observed),
            budget: Mutex::new(RetryBudget::from_config(&upstream.retry)),
            shape: Mutex::new(Shape::default()),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Task::new(upstream, receiver, shared.clone(), store).run());
        Self { commands, shared }
    }

    /// The pacing state now.
    pub fn observed(&self) -> Observed {
        self.shared.observed()
    }

    /// Live partitions and per-caller depths, as last counted.
    pub fn shape(&self) -> Shape {
        self.shared.shape.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Tells the dispatcher what an answer said about the upstream's limits.
    pub fn report(&self, feedback: Feedback) {
        self.shared.unlearned.fetch_add(1, Ordering::AcqRel);
        if self.commands.send(Command::Feedback(feedback)).is_err() {
            // The task is gone: nothing is left to pace.
            self.shared.unlearned.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts a first attempt towards the retry budget.
    pub fn record_first_attempt(&self) {
        self.shared.budget().record_request(Instant::now());
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn withdraw_retry(&self) -> bool {
        self.shared.budget().try_withdraw(Instant::now())
    }

    /// Callers waiting in the queue now.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// `queue_size` in force.
    pub fn capacity(&self) -> usize {
        self.shared.capacity.load(Ordering::Relaxed)
    }

    /// `max_concurrency` in force.
    pub fn max_inflight(&self) -> usize {
        self.shared.max_inflight.load(Ordering::Relaxed)
    }

    /// Applies a reloaded config: queue and concurrency bounds at once, new
    /// quotas from the next attempt; unchanged quotas keep their state.
    pub fn reconfigure(&self, upstream: &config::Upstream, store: Option<Arc<Store>>) {
        self.shared.capacity.store(upstream.queue_size, Ordering::Relaxed);
        let wanted = upstream.max_concurrency.get() as usize;
        let before = self.shared.max_inflight.swap(wanted, Ordering::AcqRel);
        if wanted > before {
            self.shared.inflight.add_permits(wanted - before);
        } else if wanted < before {
            // Take the surplus permits as they come back, and forget them.
            let inflight = self.shared.inflight.clone();
            let surplus = u32::try_from(before - wanted).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(permits) = inflight.acquire_many_owned(surplus).await {
                    permits.forget();
                }
            });
        }
        *self.shared.budget() = RetryBudget::from_config(&upstream.retry);
        self.shared.store_in_use.store(store.is_some(), Ordering::Release);
        // Callers may take slots from the single partition before the task
        // has seen this config: its quotas change now.
        self.shared.single.lock().unwrap_or_else(PoisonError::into_inner).requota(&Quotas::of(upstream));
        let _ = self.commands.send(Command::Reconfigure(Box::new(upstream.clone()), store));
    }

    /// Attempts in flight now.
    pub fn inflight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Waits for a ticket as a new caller at `place`, until `deadline`.
    ///
    /// Admission is decided before the future is made, so that what the
    /// future keeps while it waits is only the wait itself; a caller that
    /// can leave at once gets its ticket here.
    pub fn join(
        &self,
        place: Place,
        deadline: Instant,
    ) -> Either<Ready<Result<Ticket, Refusal>>, impl Future<Output = Result<Ticket, Refusal>> + Send + '_>
    {
        if let Some(ticket) = self.leave_now(place) {
            return Either::Left(future::ready(Ok(ticket)));
        }
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        let admitted = self
            .shared
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < capacity).then_some(d + 1));
        match admitted {
            Err(_) => Either::Left(future::ready(Err(Refusal::Full { retry_after: self.estimate_wait() }))),
            Ok(_) => Either::Right(self.wait(Command::Join, place, deadline)),
        }
    }

    /// A ticket without queueing: when nobody waits, the task has applied
    /// every answer's feedback, the concurrency bound and the pacer have a
    /// slot now, and only the single partition paces.
    fn leave_now(&self, place: Place) -> Option<Ticket> {
        let shared = &self.shared;
        if place.partition != SINGLE
            || shared.store_in_use.load(Ordering::Acquire)
            || shared.depth.load(Ordering::Acquire) != 0
            || shared.unlearned.load(Ordering::Acquire) != 0
        {
            return None;
        }
        let permit = shared.inflight.clone().try_acquire_owned().ok()?;
        let mut pacing = shared.single.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let _used = pacing.admit(shared, now).ok()?;
        pacing.record_grant(now);
        Some(Ticket::new(permit, shared))
    }

    /// Waits for a ticket for a retry, at the head of its caller's queue in
    /// `place`, until `deadline`.
    pub fn rejoin(
        &self,
        place: Place,
        deadline: Instant,
    ) -> impl Future<Output = Result<Ticket, Refusal>> + Send + '_ {
        self.shared.depth.fetch_add(1, Ordering::AcqRel);
        self.wait(Command::Rejoin, place, deadline)
    }

    /// Queues a waiter at once (its slot settles the depth counted for it,
    /// even if the future is dropped unpolled), then waits for its ticket.
    fn wait(
        &self,
        command: fn(Waiter) -> Command,
        place: Place,
        deadline: Instant,
    ) -> impl Future<Output = Result<Ticket, Refusal>> + Send + '_ {
        let since = Instant::now();
        let (tickets, receiver) = oneshot::channel();
        let mut slot = QueueSlot { receiver, shared: &self.shared, settled: false };
        let queued = self.commands.send(command(Waiter { tickets, place })).is_ok();
        async move {
            if !queued {
                return Err(self.timeout(since)); // the task is gone: nothing will be served
            }
            match tokio::time::timeout_at(deadline, &mut slot.receiver).await {
                Ok(Ok(answer)) => {
                    slot.served();
                    answer.map(|ticket| ticket.waited_since(since))
                }
                Ok(Err(_)) | Err(_) => match slot.leave() {
                    Some(ticket) => Ok(ticket.waited_since(since)), // served at the very last moment
                    None => Err(self.timeout(since)),
                },
            }
        }
    }

    fn timeout(&self, since: Instant) -> Refusal {
        Refusal::Timeout { waited: since.elapsed(), retry_after: self.estimate_wait() }
    }

    /// How long the queue as it stands takes to drain at the current pace,
    /// after any cooldown.
    fn estimate_wait(&self) -> Duration {
        let observed = self.shared.observed();
        let ahead = self.depth() as f64 + 1.0;
        let drain = Duration::try_from_secs_f64(ahead / observed.effective_rate).unwrap_or(Duration::MAX);
        let cooldown = observed
            .cooldown_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()));
        drain.saturating_add(cooldown)
    }
}

/// A caller's place in the queue; leaving it (even by being dropped when the
/// client disconnects) settles the queue depth exactly once.
struct QueueSlot<'a> {
    receiver: oneshot::Receiver<Answer>,
    shared: &'a Shared,
    /// The dispatcher already counted this caller out by serving it.
    settled: bool,
}

impl QueueSlot<'_> {
    /// The dispatcher answered: it counted this caller out itself.
    fn served(&mut self) {
        self.settled = true;
    }

    /// Stops waiting; returns a ticket that was sent before the channel closed.
    fn leave(&mut self) -> Option<Ticket> {
        if self.settled {
            return None;
        }
        self.settled = true;
        self.receiver.close();
        match self.receiver.try_recv() {
            Ok(Ok(ticket)) => Some(ticket),
            // Refused: the task counted this caller out when it answered.
            Ok(Err(_)) => None,
            Err(_) => {
                self.shared.depth.fetch_sub(1, Ordering::AcqRel);
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
