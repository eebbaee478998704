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
//! With `[redis]`, a partition that its own limits admit is not served yet:
//! the task asks the shared limiter ([`Store`]) for the same slot, awaiting
//! one round trip, and either hands the ticket out, gives the local slot back
//! and waits as long as Redis says, or (Redis down) follows `on_error`. Only
//! this task asks, one attempt at a time, so each replica sends Redis one
//! request per attempt and never a herd of pollers.
//!
//! Partitions are created on the first waiter with a new key. At
//! `max_partitions` live ones, idle partitions (see [`Partition::idle`]) are
//! evicted first; if none is idle, the newcomer is refused
//! ([`Refusal::TooManyPartitions`]). Idle ones are also swept once a second,
//! so `/status` counts partitions in use, not keys ever seen.
//!
//! [`Schedule`]: super::schedule::Schedule
//! [`Store`]: crate::store::Store

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::dispatcher::{Command, Feedback, Refusal, Shape, Shared, Ticket, Tickets, Waiter};
use super::partition::{Partition, Quotas, SINGLE};
use crate::config::{self, RedisOnError};
use crate::limit::pacer::{Taken, paced_quotas};
use crate::store::{Keys, SharedQuotas, Store, Verdict};

/// Most attempts one Redis round trip asks slots for.
const MAX_BATCH: usize = 64;
/// How often idle partitions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often `/status`'s partition and caller counts are refreshed while busy.
const SHAPE_EVERY: Duration = Duration::from_millis(100);

/// The dispatcher task's own state.
pub(super) struct Task {
    receiver: mpsc::UnboundedReceiver<Command>,
    /// False once every handle is gone: serve what is queued, then stop.
    open: bool,
    shared: Arc<Shared>,
    /// Quotas every partition's pacer is built from.
    quotas: Quotas,
    /// With `[redis]`: the shared limiter every attempt also needs.
    store: Option<Arc<Store>>,
    /// `quotas` as the shared limiter's script takes them.
    shared_quotas: SharedQuotas,
    /// `max_partitions` in force.
    max_partitions: usize,
    partitions: HashMap<u64, Partition<Tickets>>,
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
        store: Option<Arc<Store>>,
    ) -> Self {
        let now = Instant::now();
        let quotas = Quotas::of(upstream);
        // Without `partition_by` the single partition is there from the start:
        // callers that never queue are paced by it too.
        let mut partitions = HashMap::new();
        if upstream.partition_by.is_none() {
            partitions.insert(SINGLE, new_partition(SINGLE, &quotas, &shared));
        }
        Self {
            receiver,
            open: true,
            shared,
            shared_quotas: SharedQuotas::new(&paced_quotas(&quotas.rate, quotas.burst)),
            quotas,
            store,
            max_partitions: upstream.max_partitions.get(),
            partitions,
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
                // Callers may take slots themselves while nobody waits.
                permit = None;
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
            if self.store.as_ref().is_some_and(|s| !s.is_up() && s.on_error() == RedisOnError::Deny) {
                self.refuse_all(Refusal::StoreDown);
                permit = Some(held);
                continue;
            }
            let (unused, earliest) = match self.serve_one(held) {
                Decision::Served => continue,
                Decision::Ask { key, taken, permit: held } => {
                    permit = self.ask_store(key, taken, held).await;
                    continue;
                }
                Decision::Later(unused, earliest) => (unused, earliest),
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
            Command::Feedback(feedback) => {
                self.learn(feedback);
                self.shared.unlearned.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            Command::Reconfigure(upstream, store) => return self.reconfigure(&upstream, store),
        }
        // Callers that gave up stay queued until reached; bound that leftover.
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        if self.queued > 2 * capacity + 64 {
            for partition in self.partitions.values_mut() {
                partition.waiters.retain(|tickets| !tickets.is_closed());
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
            tracing::warn!(upstream = %self.shared.name, max = self.max_partitions, "too_many_partitions");
            if waiter.tickets.send(Err(Refusal::TooManyPartitions)).is_ok() {
                self.shared.depth.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        };
        let was_empty = partition.waiters.is_empty();
        let (caller, priority) = (waiter.place.caller, waiter.place.priority);
        if retry {
            partition.waiters.push_front(caller, priority, waiter.tickets);
        } else {
            partition.waiters.push_back(caller, priority, waiter.tickets);
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
    fn partition(&mut self, key: u64) -> Option<&mut Partition<Tickets>> {
        if !self.partitions.contains_key(&key) {
            if self.partitions.len() >= self.max_partitions {
                self.evict_idle(Instant::now());
            }
            if self.partitions.len() >= self.max_partitions {
                return None;
            }
            self.partitions.insert(key, new_partition(key, &self.quotas, &self.shared));
        }
        self.partitions.get_mut(&key)
    }

    fn learn(&mut self, feedback: Feedback) {
        let (max, quotas) = (self.max_partitions, &self.quotas);
        let live = self.partitions.len();
        // A partition evicted meanwhile comes back if the bound allows: a
        // 429 must still cool its key down.
        let partition = match self.partitions.entry(feedback.partition) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if live >= max => return,
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(new_partition(feedback.partition, quotas, &self.shared))
            }
        };
        let shared = self.store.as_ref().is_some_and(|store| store.is_up());
        let pause = partition.pacing().learn(&self.shared, feedback, shared);
        if let (Some(pause), Some(store)) = (pause, &self.store) {
            store.cool_down(Keys::new(&self.shared.name, feedback.partition), pause);
        }
    }

    /// Takes a reloaded config; pacers are rebuilt only if quotas changed.
    fn reconfigure(&mut self, upstream: &config::Upstream, store: Option<Arc<Store>>) {
        self.max_partitions = upstream.max_partitions.get();
        self.store = store;
        let quotas = Quotas::of(upstream);
        if quotas != self.quotas {
            for partition in self.partitions.values() {
                partition.pacing().requota(&quotas);
            }
            self.shared_quotas = SharedQuotas::new(&paced_quotas(&quotas.rate, quotas.burst));
            self.quotas = quotas;
            tracing::info!(upstream = %self.shared.name, "new quotas take effect");
        }
        let now = Instant::now();
        for partition in self.partitions.values() {
            partition.pacing().refresh_cap(&self.shared, now);
        }
    }

    /// Hands one ticket to the first partition, in round-robin order, that
    /// can go now, or names the partition the shared limiter must decide on.
    /// Otherwise gives the permit back with the earliest instant a partition
    /// can go.
    fn serve_one(&mut self, permit: OwnedSemaphorePermit) -> Decision {
        let now = Instant::now();
        let shared = self.store.as_ref().is_some_and(|store| store.is_up());
        let mut permit = permit;
        let mut earliest: Option<Instant> = None;
        let mut later = |at: Instant| earliest = Some(earliest.map_or(at, |e: Instant| e.min(at)));
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(partition) = self.partitions.get_mut(&key).filter(|p| !p.waiters.is_empty()) else {
                continue;
            };
            let admitted = {
                let mut pacing = partition.pacing();
                match pacing.admit(&self.shared, now) {
                    Ok(first) if shared => {
                        // One round trip may serve every caller a slot is free for.
                        let room =
                            (1 + self.shared.inflight.available_permits()).min(partition.waiters.len());
                        let mut taken = vec![first];
                        while taken.len() < room.min(MAX_BATCH) {
                            let Ok(next) = pacing.pacer.try_acquire(now) else { break };
                            taken.push(next);
                        }
                        return Decision::Ask { key, taken, permit };
                    }
                    admitted => admitted,
                }
            };
            match admitted {
                Ok(taken) => {
                    let handed = self.hand_to_next(key, permit, now);
                    self.requeue(key);
                    match handed {
                        Ok(()) => return Decision::Served,
                        Err(unused) => {
                            self.give_back(key, vec![taken]);
                            permit = unused;
                        }
                    }
                }
                Err(at) => {
                    later(at);
                    self.ready.push_back(key);
                }
            }
        }
        Decision::Later(permit, earliest)
    }

    /// Hands a ticket to partition `key`'s next caller still waiting. When
    /// everyone there had gone, the permit comes back.
    fn hand_to_next(
        &mut self,
        key: u64,
        permit: OwnedSemaphorePermit,
        now: Instant,
    ) -> Result<(), OwnedSemaphorePermit> {
        let Some(partition) = self.partitions.get_mut(&key) else { return Err(permit) };
        hand_out(partition, permit, &mut self.queued, &self.shared)?;
        partition.pacing().record_grant(now);
        Ok(())
    }

    /// Puts partition `key` back in the ring if callers still wait there; an
    /// empty one leaves it until a new waiter brings it back.
    fn requeue(&mut self, key: u64) {
        if self.partitions.get(&key).is_some_and(|p| !p.waiters.is_empty()) {
            self.ready.push_back(key);
        }
    }

    /// Gives unused pacer slots back to partition `key`, latest first.
    fn give_back(&mut self, key: u64, taken: Vec<Taken>) {
        if let Some(partition) = self.partitions.get(&key) {
            let mut pacing = partition.pacing();
            for slot in taken.into_iter().rev() {
                pacing.pacer.undo(slot);
            }
        }
    }

    /// Asks the shared limiter for the slots partition `key`'s own pacer just
    /// gave, and acts on the answer: hands out as many tickets as Redis
    /// allowed, or waits as long as it said. Returns the permit if it was
    /// not used.
    async fn ask_store(
        &mut self,
        key: u64,
        mut taken: Vec<Taken>,
        permit: OwnedSemaphorePermit,
    ) -> Option<OwnedSemaphorePermit> {
        let wanted = taken.len();
        let verdict = match &self.store {
            Some(store) => {
                store.acquire(&Keys::new(&self.shared.name, key), &self.shared_quotas, wanted).await
            }
            None => Ok(Verdict::Go(wanted)), // reloaded away meanwhile
        };
        let deny = self.store.as_ref().is_some_and(|store| store.on_error() == RedisOnError::Deny);
        let now = Instant::now();
        let granted = match verdict {
            Ok(Verdict::Go(granted)) => granted,
            Err(_) if !deny => wanted,
            Err(_) => {
                self.give_back(key, taken);
                self.refuse_all(Refusal::StoreDown);
                return Some(permit);
            }
            Ok(Verdict::Wait(wait) | Verdict::Cooling(wait)) => {
                self.give_back(key, taken);
                if let Some(partition) = self.partitions.get(&key) {
                    let mut pacing = partition.pacing();
                    if matches!(verdict, Ok(Verdict::Cooling(_))) {
                        pacing.cool_down(&self.shared, now, wait, "shared");
                    } else {
                        pacing.shared_wait = Some(now + wait);
                    }
                }
                self.requeue(key);
                return Some(permit);
            }
        };
        let mut permit = Some(permit);
        let mut used = 0;
        while used < granted {
            let free = permit.take().or_else(|| self.shared.inflight.clone().try_acquire_owned().ok());
            let Some(free) = free else { break };
            match self.hand_to_next(key, free, now) {
                Ok(()) => used += 1,
                Err(unused) => {
                    permit = Some(unused);
                    break;
                }
            }
        }
        self.give_back(key, taken.split_off(used));
        self.requeue(key);
        permit
    }

    /// Answers every waiter with `refusal` (Redis down with `on_error = "deny"`).
    fn refuse_all(&mut self, refusal: Refusal) {
        for partition in self.partitions.values_mut() {
            while let Some(tickets) = partition.waiters.pop() {
                if tickets.send(Err(refusal)).is_ok() {
                    self.shared.depth.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        self.ready.clear();
        self.queued = 0;
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
            tracing::debug!(upstream = %self.shared.name, evicted = before - self.partitions.len(), "idle partitions");
        }
    }
}

/// What one scheduling round decided.
enum Decision {
    /// A ticket went out.
    Served,
    /// Partition `key`'s own limits admit its next callers with the slots
    /// `taken` (one per caller); the shared limiter has the last word.
    Ask { key: u64, taken: Vec<Taken>, permit: OwnedSemaphorePermit },
    /// Nobody can go now: the permit comes back, with the earliest instant a
    /// partition can go (`None`: every waiter reached had gone).
    Later(OwnedSemaphorePermit, Option<Instant>),
}

/// A partition for `key`: the single one is paced by the state callers share.
fn new_partition(key: u64, quotas: &Quotas, shared: &Shared) -> Partition<Tickets> {
    if key == SINGLE { Partition::sharing(shared.single.clone()) } else { Partition::new(quotas) }
}

/// Hands a ticket to the partition's next caller still waiting; gives the
/// permit back when nobody was left to take it.
fn hand_out(
    partition: &mut Partition<Tickets>,
    permit: OwnedSemaphorePermit,
    queued: &mut usize,
    shared: &Arc<Shared>,
) -> Result<(), OwnedSemaphorePermit> {
    let mut permit = permit;
    while let Some(tickets) = partition.waiters.pop() {
        *queued -= 1;
        match tickets.send(Ok(Ticket::new(permit, shared))) {
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
