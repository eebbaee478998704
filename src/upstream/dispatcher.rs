//! The dispatcher: one task per upstream that owns its queue and its pacing.
//!
//! Connection tasks never pace themselves. They join the upstream's FIFO
//! queue and wait for a [`Ticket`]; the dispatcher task hands tickets out one
//! by one to the head of the queue, each only when a concurrency slot is free,
//! the upstream is not cooling down and the pacer has a slot. Keeping all of
//! that in one task makes FIFO order exact and means only one task ever sleeps
//! on an upstream's schedule (no herd of waiters polling the limiter).
//!
//! The queue bound is checked by callers on an atomic counter before they
//! join, so a full queue is answered at once. A caller that stops waiting
//! (timeout, disconnect) closes its ticket channel; the dispatcher skips such
//! entries without spending quota.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config;
use crate::limit::{Adaptive, Pacer};
use crate::metrics::Metrics;
use crate::retry::{RateLimitHint, RetryBudget};

/// Permission to send one attempt: holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Ticket {
    _inflight: OwnedSemaphorePermit,
    /// Counts this attempt in [`Dispatcher::inflight`] until dropped.
    _counted: InFlight,
    /// How long this attempt waited in the queue.
    pub waited: Duration,
}

/// One attempt counted as in flight; uncounted when dropped.
#[derive(Debug)]
struct InFlight(Arc<Shared>);

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
}

enum Command {
    /// A new caller, at the back of the queue.
    Join(Waiter),
    /// A retry, back at the head: it already waited its turn once.
    Rejoin(Waiter),
    /// What an answer said about the upstream's limits.
    Feedback(Feedback),
    /// A reloaded config for this upstream.
    Reconfigure(Box<config::Upstream>),
}

/// What one attempt's answer says about the upstream's limits.
#[derive(Debug, Clone, Copy)]
pub struct Feedback {
    /// When the attempt left (its ticket was handed out).
    pub sent_at: Instant,
    /// The upstream answered 429.
    pub rate_limited: bool,
    /// Pause the whole upstream this long (429, or 503 with Retry-After).
    pub cooldown: Option<Duration>,
    /// Remaining quota and reset time the upstream reported.
    pub hint: Option<RateLimitHint>,
}

struct Waiter {
    tickets: oneshot::Sender<Ticket>,
    since: Instant,
}

/// Counts shared between the dispatcher task and its callers.
#[derive(Debug)]
struct Shared {
    /// Callers waiting for a ticket (joined, not yet served or gone).
    depth: AtomicUsize,
    /// `queue_size`: new callers are refused when `depth` reaches it.
    capacity: AtomicUsize,
    /// Bounds attempts in flight; a ticket holds one permit.
    inflight: Arc<Semaphore>,
    /// `max_concurrency` in force (the semaphore is resized on reload).
    max_inflight: AtomicUsize,
    /// Tickets out: the attempts really in flight. Not read off the semaphore,
    /// whose permits the task also holds while the head waits for a slot.
    in_flight: AtomicUsize,
    /// What the task decided lately, for estimates, status and metrics.
    observed: Mutex<Observed>,
    /// Retries allowed as a share of first attempts (SPEC `budget`).
    budget: Mutex<RetryBudget>,
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

    fn observe(&self, update: impl FnOnce(&mut Observed)) {
        update(&mut self.observed.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner)
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
    pub fn spawn(upstream: &config::Upstream, metrics: Arc<Metrics>) -> Self {
        let pacer = Pacer::new(&upstream.rate, upstream.burst);
        let max_inflight = upstream.max_concurrency.get() as usize;
        let observed = Observed {
            effective_rate: pacer.effective_rate(),
            cooldown_until: None,
            last_rate_limited: None,
        };
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            capacity: AtomicUsize::new(upstream.queue_size),
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight: AtomicUsize::new(max_inflight),
            in_flight: AtomicUsize::new(0),
            observed: Mutex::new(observed),
            budget: Mutex::new(RetryBudget::from_config(&upstream.retry)),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = Task {
            name: upstream.name.clone(),
            receiver,
            open: true,
            queue: VecDeque::new(),
            adaptive: upstream.adaptive.then(|| Adaptive::new(pacer.rate_per_second())),
            pacer,
            shared: shared.clone(),
            cooldown_until: None,
            hint_cap: None,
            grants: VecDeque::new(),
            window: pacing_window(upstream),
            metrics,
            rates: pacing_key(upstream),
        };
        tokio::spawn(task.run());
        Self { commands, shared }
    }

    /// The pacing state now.
    pub fn observed(&self) -> Observed {
        self.shared.observed()
    }

    /// Tells the dispatcher what an answer said about the upstream's limits.
    pub fn report(&self, feedback: Feedback) {
        // Only fails once the task is gone, when nothing is left to pace.
        let _ = self.commands.send(Command::Feedback(feedback));
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
    pub fn reconfigure(&self, upstream: &config::Upstream) {
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
        let _ = self.commands.send(Command::Reconfigure(Box::new(upstream.clone())));
    }

    /// Attempts in flight now.
    pub fn inflight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Waits for a ticket as a new caller, until `deadline`.
    pub async fn join(&self, deadline: Instant) -> Result<Ticket, Refusal> {
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        let admitted = self
            .shared
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < capacity).then_some(d + 1));
        if admitted.is_err() {
            return Err(Refusal::Full { retry_after: self.estimate_wait() });
        }
        self.wait(Command::Join, deadline).await
    }

    /// Waits for a ticket for a retry, at the head of the queue, until `deadline`.
    pub async fn rejoin(&self, deadline: Instant) -> Result<Ticket, Refusal> {
        self.shared.depth.fetch_add(1, Ordering::AcqRel);
        self.wait(Command::Rejoin, deadline).await
    }

    async fn wait(&self, command: fn(Waiter) -> Command, deadline: Instant) -> Result<Ticket, Refusal> {
        let since = Instant::now();
        let (tickets, receiver) = oneshot::channel();
        let mut slot = QueueSlot { receiver, shared: &self.shared, settled: false };
        if self.commands.send(command(Waiter { tickets, since })).is_err() {
            return Err(self.timeout(since)); // the task is gone: nothing will be served
        }
        match tokio::time::timeout_at(deadline, &mut slot.receiver).await {
            Ok(Ok(ticket)) => {
                slot.settled = true;
                Ok(ticket)
            }
            Ok(Err(_)) | Err(_) => match slot.leave() {
                Some(ticket) => Ok(ticket), // served at the very last moment
                None => Err(self.timeout(since)),
            },
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
    receiver: oneshot::Receiver<Ticket>,
    shared: &'a Shared,
    /// The dispatcher already counted this caller out by serving it.
    settled: bool,
}

impl QueueSlot<'_> {
    /// Stops waiting; returns a ticket that was sent before the channel closed.
    fn leave(&mut self) -> Option<Ticket> {
        if self.settled {
            return None;
        }
        self.settled = true;
        self.receiver.close();
        match self.receiver.try_recv() {
            Ok(ticket) => Some(ticket),
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

/// The dispatcher task's own state.
struct Task {
    /// Upstream name, for logs.
    name: String,
    receiver: mpsc::UnboundedReceiver<Command>,
    /// False once every handle is gone: serve what is queued, then stop.
    open: bool,
    queue: VecDeque<Waiter>,
    pacer: Pacer,
    shared: Arc<Shared>,
    /// Lowers the pace after 429s; `None` when `adaptive = false`.
    adaptive: Option<Adaptive>,
    /// Nothing leaves before this instant (429, Retry-After, Remaining: 0).
    cooldown_until: Option<Instant>,
    /// Remaining quota spread until its reset: (requests per second, reset).
    hint_cap: Option<(f64, Instant)>,
    /// Recent ticket instants, to measure what the upstream accepted.
    grants: VecDeque<Instant>,
    /// Window of the pacing quota: how far back `grants` reaches.
    window: Duration,
    metrics: Arc<Metrics>,
    /// Quotas the pacer was built from, to tell whether a reload changed them.
    rates: (Vec<config::Rate>, std::num::NonZeroU32, bool),
}

impl Task {
    async fn run(mut self) {
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            while let Ok(command) = self.receiver.try_recv() {
                self.apply(command);
            }
            self.drop_gone_heads();
            if self.queue.is_empty() {
                if !self.next_command().await {
                    return;
                }
                continue;
            }
            let Some(held) = permit.take() else {
                let inflight = self.shared.inflight.clone();
                tokio::select! {
                    acquired = inflight.acquire_owned() => {
                        permit = acquired.ok();
                    }
                    open = self.next_command(), if self.open => { let _ = open; }
                }
                continue;
            };
            let now = Instant::now();
            self.refresh_cap(now);
            if let Some(until) = self.cooldown_until.filter(|until| *until > now) {
                permit = Some(held);
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    open = self.next_command(), if self.open => { let _ = open; }
                }
                continue;
            }
            match self.pacer.try_acquire(now) {
                Ok(taken) => match self.serve_head(held) {
                    Ok(()) => self.record_grant(now),
                    Err(unused) => {
                        self.pacer.undo(taken);
                        permit = Some(unused);
                    }
                },
                Err(at) => {
                    permit = Some(held);
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        open = self.next_command(), if self.open => { let _ = open; }
                    }
                }
            }
        }
    }

    /// Waits for and applies one command; false when no command can come.
    async fn next_command(&mut self) -> bool {
        match self.receiver.recv().await {
            Some(command) => {
                self.apply(command);
                true
            }
            None => {
                self.open = false;
                false
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Join(waiter) => self.queue.push_back(waiter),
            Command::Rejoin(waiter) => self.queue.push_front(waiter),
            Command::Feedback(feedback) => return self.learn(feedback),
            Command::Reconfigure(upstream) => return self.reconfigure(&upstream),
        }
        // Callers that gave up stay queued until reached; bound that leftover.
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        if self.queue.len() > 2 * capacity + 64 {
            self.queue.retain(|w| !w.tickets.is_closed());
        }
    }

    /// Takes a reloaded config; the pacer is rebuilt only if quotas changed.
    fn reconfigure(&mut self, upstream: &config::Upstream) {
        let key = pacing_key(upstream);
        if key != self.rates {
            self.pacer = Pacer::new(&upstream.rate, upstream.burst);
            self.adaptive = upstream.adaptive.then(|| Adaptive::new(self.pacer.rate_per_second()));
            self.window = pacing_window(upstream);
            self.rates = key;
            tracing::info!(upstream = %self.name, "new quotas take effect");
        }
        self.refresh_cap(Instant::now());
    }

    /// Applies what an answer said: cooldown, adaptive rate, quota hints.
    fn learn(&mut self, feedback: Feedback) {
        let now = Instant::now();
        if feedback.rate_limited {
            let at = std::time::SystemTime::now();
            self.shared.observe(|o| o.last_rate_limited = Some((at, feedback.cooldown)));
        }
        if let Some(pause) = feedback.cooldown {
            self.cool_down(now, pause, if feedback.rate_limited { "rate_limited" } else { "retry_after" });
        }
        if feedback.rate_limited
            && let Some(adaptive) = &mut self.adaptive
        {
            let accepted = self.grants.iter().filter(|at| now.duration_since(**at) <= self.window).count();
            let accepted_rate = accepted as f64 / self.window.as_secs_f64();
            if let Some(rate) = adaptive.on_rate_limited(now, feedback.sent_at, accepted_rate) {
                tracing::info!(upstream = %self.name, rate, reason = "rate_limited", "adaptive rate lowered");
            }
        }
        if let Some(hint) = feedback.hint {
            if hint.remaining == 0 && !hint.reset_after.is_zero() {
                self.cool_down(now, hint.reset_after, "ratelimit_remaining");
                self.hint_cap = None;
            } else if !hint.reset_after.is_zero() {
                let rate = hint.remaining as f64 / hint.reset_after.as_secs_f64();
                self.hint_cap = Some((rate, now + hint.reset_after));
            }
        }
        self.refresh_cap(now);
    }

    fn cool_down(&mut self, now: Instant, pause: Duration, reason: &'static str) {
        let until = now + pause;
        let paused_from = self.cooldown_until.map_or(now, |current| current.max(now));
        if paused_from >= until {
            return;
        }
        let added = (until - paused_from).as_secs_f64();
        self.metrics.cooldown_seconds.get_or_create(&Metrics::upstream(&self.name)).inc_by(added);
        tracing::warn!(upstream = %self.name, delay_ms = pause.as_millis() as u64, reason, "cooldown");
        self.cooldown_until = Some(until);
        self.shared.observe(|o| o.cooldown_until = Some(until));
    }

    /// Recomputes the pace below the quotas: adaptive rate and quota hints.
    fn refresh_cap(&mut self, now: Instant) {
        if self.hint_cap.is_some_and(|(_, until)| until <= now) {
            self.hint_cap = None;
        }
        if let Some(adaptive) = &mut self.adaptive
            && let Some(rate) = adaptive.on_tick(now)
        {
            tracing::info!(upstream = %self.name, rate = rate.unwrap_or(f64::NAN), "adaptive rate probed up");
        }
        let adaptive = self.adaptive.as_ref().and_then(Adaptive::current);
        let hint = self.hint_cap.map(|(rate, _)| rate);
        let cap = match (adaptive, hint) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        };
        self.pacer.set_cap(cap);
        let effective_rate = self.pacer.effective_rate();
        let cooldown_until = self.cooldown_until.filter(|until| *until > now);
        self.shared.observe(|o| {
            o.effective_rate = effective_rate;
            o.cooldown_until = cooldown_until;
        });
    }

    fn record_grant(&mut self, now: Instant) {
        self.grants.push_back(now);
        while self.grants.front().is_some_and(|at| now.duration_since(*at) > self.window) {
            self.grants.pop_front();
        }
    }

    fn drop_gone_heads(&mut self) {
        while self.queue.front().is_some_and(|w| w.tickets.is_closed()) {
            self.queue.pop_front();
        }
    }

    /// Hands a ticket to the first caller still waiting; gives the permit back
    /// when nobody was left to take it.
    fn serve_head(&mut self, permit: OwnedSemaphorePermit) -> Result<(), OwnedSemaphorePermit> {
        let mut permit = permit;
        while let Some(waiter) = self.queue.pop_front() {
            self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
            let counted = InFlight(self.shared.clone());
            let ticket = Ticket { _inflight: permit, _counted: counted, waited: waiter.since.elapsed() };
            match waiter.tickets.send(ticket) {
                Ok(()) => {
                    self.shared.depth.fetch_sub(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err(unsent) => permit = unsent._inflight,
            }
        }
        Err(permit)
    }
}

/// What the pacer is built from: a reload that keeps it keeps the pacer's state.
fn pacing_key(upstream: &config::Upstream) -> (Vec<config::Rate>, std::num::NonZeroU32, bool) {
    (upstream.rate.clone(), upstream.burst, upstream.adaptive)
}

/// Window of the quota that paces (shortest interval), for measuring what the
/// upstream accepted.
fn pacing_window(upstream: &config::Upstream) -> Duration {
    let interval = |r: &config::Rate| r.per / r.count.get();
    upstream.rate.iter().min_by_key(|r| interval(r)).map_or(Duration::from_secs(1), |r| r.per)
}
