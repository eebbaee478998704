//! The dispatcher task: one per upstream, the only owner of its partitions.
//!
//! Each decision hands out at most one ticket. With a concurrency slot in
//! hand, the task walks the partitions that have waiters in round-robin
//! order and serves the first one that is neither cooling down nor out of
//! pacer slots; the others are skipped, not waited for, so a partition in a
//! 429 cooldown never blocks another partition's waiters (no head-of-line
//! blocking across keys). Inside the chosen partition, [`Schedule`] decides
//! who goes (callers round-robin, priority lanes). A decision therefore costs
//! O(partitions with waiters), bounded by `max_partitions`, and O(1) with
//! one partition. When nobody can go, the task sleeps until the earliest
//! partition can, or until a command arrives.
//!
//! Partitions are created on the first waiter with a new key. At
//! `max_partitions` live ones, idle partitions (see [`Partition::idle`]) are
//! evicted first; if none is idle, the newcomer is refused
//! ([`Refusal::TooManyPartitions`]). Idle ones are also swept once a second,
//! so `/status` counts partitions in use, not keys ever seen.
//!
//! [`Schedule`]: super::schedule::Schedule

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::dispatcher::{Command, Feedback, Refusal, Shape, Shared, Ticket, Waiter};
use super::partition::{Context, Partition, Quotas, SINGLE};
use crate::config;
use crate::metrics::Metrics;

/// How often idle partitions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often `/status`'s partition and caller counts are refreshed while busy.
const SHAPE_EVERY: Duration = Duration::from_millis(100);

/// The dispatcher task's own state.
pub(super) struct Task {
    /// Upstream name, for logs.
    name: String,
    receiver: mpsc::UnboundedReceiver<Command>,
    /// False once every handle is gone: serve what is queued, then stop.
    open: bool,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// Quotas every partition's pacer is built from.
    quotas: Quotas,
    /// `max_partitions` in force.
    max_partitions: usize,
    partitions: HashMap<u64, Partition<Waiter>>,
    /// Partitions with waiters, in round-robin order; each at most once.
    ready: VecDeque<u64>,
    /// Waiters held over all partitions, gone ones included until reached.
    queued: usize,
    next_sweep: Instant,
    next_shape: Instant,
}

impl Task {
    pub fn new(
        upstream: &config::Upstream,
        receiver: mpsc::UnboundedReceiver<Command>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        Self {
            name: upstream.name.clone(),
            receiver,
            open: true,
            shared,
            metrics,
            quotas: Quotas::of(upstream),
            max_partitions: upstream.max_partitions.get(),
            partitions: HashMap::new(),
            ready: VecDeque::new(),
            queued: 0,
            next_sweep: now + SWEEP_EVERY,
            next_shape: now,
        }
    }

    pub async fn run(mut self) {
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            while let Ok(command) = self.receiver.try_recv() {
                self.apply(command);
            }
            self.maintain(Instant::now());
            if self.queued == 0 {
                if self.partitions.len() > 1 && self.open {
                    let sweep = self.next_sweep;
                    tokio::select! {
                        () = tokio::time::sleep_until(sweep) => {}
                        open = self.next_command() => { let _ = open; }
                    }
                } else if !self.next_command().await {
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
            let (unused, earliest) = match self.serve_one(held) {
                Ok(()) => continue,
                Err(refused) => refused,
            };
            permit = Some(unused);
            let Some(at) = earliest else {
                // Everyone reached had gone; recount what is left, and make
                // sure every partition still holding waiters takes turns.
                self.queued = self.partitions.values().map(|p| p.waiters.len()).sum();
                if self.ready.is_empty() {
                    let waiting = self.partitions.iter().filter(|(_, p)| !p.waiters.is_empty());
                    self.ready.extend(waiting.map(|(key, _)| *key));
                }
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                open = self.next_command(), if self.open => { let _ = open; }
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
            Command::Join(waiter) => self.enqueue(waiter, false),
            Command::Rejoin(waiter) => self.enqueue(waiter, true),
            Command::Feedback(feedback) => return self.learn(feedback),
            Command::Reconfigure(upstream) => return self.reconfigure(&upstream),
        }
        // Callers that gave up stay queued until reached; bound that leftover.
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        if self.queued > 2 * capacity + 64 {
            for partition in self.partitions.values_mut() {
                partition.waiters.retain(|w| !w.tickets.is_closed());
            }
            let partitions = &self.partitions;
            self.ready.retain(|key| partitions.get(key).is_some_and(|p| !p.waiters.is_empty()));
            self.queued = self.partitions.values().map(|p| p.waiters.len()).sum();
        }
    }

    /// Queues a waiter in its partition, creating the partition if the bound
    /// allows; a retry goes to the head of its caller's queue.
    fn enqueue(&mut self, waiter: Waiter, retry: bool) {
        let key = waiter.place.partition;
        let Some(partition) = self.partition(key) else {
            tracing::warn!(upstream = %self.name, max = self.max_partitions, "too_many_partitions");
            if waiter.tickets.send(Err(Refusal::TooManyPartitions)).is_ok() {
                self.shared.depth.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        };
        let was_empty = partition.waiters.is_empty();
        let (caller, priority) = (waiter.place.caller, waiter.place.priority);
        if retry {
            partition.waiters.push_front(caller, priority, waiter);
        } else {
            partition.waiters.push_back(caller, priority, waiter);
        }
        self.queued += 1;
        if was_empty {
            if retry {
                self.ready.push_front(key);
            } else {
                self.ready.push_back(key);
            }
        }
    }

    /// The partition for `key`, new if the bound allows (after evicting idle
    /// ones); `None` when `max_partitions` busy ones are live.
    fn partition(&mut self, key: u64) -> Option<&mut Partition<Waiter>> {
        if !self.partitions.contains_key(&key) {
            if self.partitions.len() >= self.max_partitions {
                self.evict_idle(Instant::now());
            }
            if self.partitions.len() >= self.max_partitions {
                return None;
            }
            self.partitions.insert(key, Partition::new(&self.quotas));
        }
        self.partitions.get_mut(&key)
    }

    fn learn(&mut self, feedback: Feedback) {
        let cx = Context { name: &self.name, metrics: &self.metrics, shared: &self.shared };
        let (max, quotas) = (self.max_partitions, &self.quotas);
        let live = self.partitions.len();
        // A partition evicted meanwhile comes back if the bound allows: a
        // 429 must still cool its key down.
        let partition = match self.partitions.entry(feedback.partition) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if live >= max => return,
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(Partition::new(quotas)),
        };
        partition.learn(&cx, feedback);
    }

    /// Takes a reloaded config; pacers are rebuilt only if quotas changed.
    fn reconfigure(&mut self, upstream: &config::Upstream) {
        self.max_partitions = upstream.max_partitions.get();
        let quotas = Quotas::of(upstream);
        if quotas != self.quotas {
            for partition in self.partitions.values_mut() {
                partition.requota(&quotas);
            }
            self.quotas = quotas;
            tracing::info!(upstream = %self.name, "new quotas take effect");
        }
        let cx = Context { name: &self.name, metrics: &self.metrics, shared: &self.shared };
        let now = Instant::now();
        for partition in self.partitions.values_mut() {
            partition.refresh_cap(&cx, now);
        }
    }

    /// Hands one ticket to the first partition, in round-robin order, that
    /// can go now. Otherwise gives the permit back with the earliest instant
    /// a partition can go (`None`: every waiter reached had gone).
    fn serve_one(
        &mut self,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), (OwnedSemaphorePermit, Option<Instant>)> {
        let now = Instant::now();
        let cx = Context { name: &self.name, metrics: &self.metrics, shared: &self.shared };
        let mut permit = permit;
        let mut earliest: Option<Instant> = None;
        let mut later = |at: Instant| earliest = Some(earliest.map_or(at, |e: Instant| e.min(at)));
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(partition) = self.partitions.get_mut(&key).filter(|p| !p.waiters.is_empty()) else {
                continue;
            };
            partition.refresh_cap(&cx, now);
            if let Some(until) = partition.cooldown_until {
                later(until);
                self.ready.push_back(key);
                continue;
            }
            match partition.pacer.try_acquire(now) {
                Ok(taken) => match hand_out(partition, permit, &mut self.queued, &self.shared) {
                    Ok(()) => {
                        partition.record_grant(now);
                        if !partition.waiters.is_empty() {
                            self.ready.push_back(key);
                        }
                        return Ok(());
                    }
                    // Everyone in this partition had gone: it leaves the ring.
                    Err(unused) => {
                        partition.pacer.undo(taken);
                        permit = unused;
                    }
                },
                Err(at) => {
                    later(at);
                    self.ready.push_back(key);
                }
            }
        }
        Err((permit, earliest))
    }

    /// Sweeps idle partitions and refreshes `/status` counts, when due.
    fn maintain(&mut self, now: Instant) {
        if now >= self.next_sweep {
            self.evict_idle(now);
            self.next_sweep = now + SWEEP_EVERY;
        }
        if self.queued == 0 || now >= self.next_shape {
            let mut callers: Vec<usize> = if self.queued == 0 {
                Vec::new()
            } else {
                self.partitions.values().flat_map(|p| p.waiters.caller_depths()).collect()
            };
            callers.sort_unstable_by(|a, b| b.cmp(a));
            self.shared.set_shape(Shape { partitions: self.partitions.len(), callers });
            self.next_shape = now + SHAPE_EVERY;
        }
    }

    fn evict_idle(&mut self, now: Instant) {
        let before = self.partitions.len();
        // The single partition of an upstream without partition_by stays.
        self.partitions.retain(|key, partition| *key == SINGLE || !partition.idle(now));
        if self.partitions.len() < before {
            let partitions = &self.partitions;
            self.ready.retain(|key| partitions.contains_key(key));
            tracing::debug!(upstream = %self.name, evicted = before - self.partitions.len(), "idle partitions");
        }
    }
}

/// Hands a ticket to the partition's next caller still waiting; gives the
/// permit back when nobody was left to take it.
fn hand_out(
    partition: &mut Partition<Waiter>,
    permit: OwnedSemaphorePermit,
    queued: &mut usize,
    shared: &Arc<Shared>,
) -> Result<(), OwnedSemaphorePermit> {
    let mut permit = permit;
    while let Some(waiter) = partition.waiters.pop() {
        *queued -= 1;
        let ticket = Ticket::new(permit, waiter.since.elapsed(), shared);
        match waiter.tickets.send(Ok(ticket)) {
            Ok(()) => {
                shared.depth.fetch_sub(1, Ordering::AcqRel);
                return Ok(());
            }
            Err(Ok(ticket)) => permit = ticket.into_permit(),
            Err(Err(_)) => unreachable!("a ticket was sent, a ticket comes back"),
        }
    }
    Err(permit)
}
