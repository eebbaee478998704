//! The admission core: who may leave an upstream's queue, and when.
//!
//! [`Admission`] is one upstream's whole admission state: its waiters, its
//! partitions (`partition_by`, each with its own quotas and cooldown, see
//! [`pacing`]), the order inside a partition ([`schedule`]: `fair_by`
//! round-robin, priority lanes), the concurrency count (`max_concurrency`)
//! and the queue bound (`queue_size`). It is a plain synchronous type in the
//! manner of a sans-IO protocol state machine: no clock read, no timer, no
//! task, no channel, no atomic. Time is passed in (`now`), so every rule is
//! unit-tested on a manual clock in microseconds (`tests.rs`), and the
//! dispatcher that drives it (`upstream::driver`) only carries out its
//! answers: timers, Redis round trips, tickets out.
//!
//! The calls, in the order a request meets them:
//! * [`Admission::try_leave`]: a caller that finds nobody waiting, a free
//!   concurrency slot and a pacer slot leaves at once, without queueing. The
//!   caller's thread runs this under the dispatcher's lock; it is the same
//!   decision the driver makes, so a caller can never outrun the queue.
//! * [`Admission::enqueue`]: otherwise it waits: at the back, or at the head
//!   for a retry (it already waited its turn once). A full queue and a
//!   partition over `max_partitions` are answered at once.
//! * [`Admission::next`]: the driver's question. One grant per call: the
//!   partitions with waiters are walked round-robin and the first that is
//!   neither cooling down nor out of pacer slots is served; the others are
//!   skipped, not waited for, so a partition blocked on its own quota never
//!   holds up another (no head-of-line blocking across keys). Otherwise the
//!   answer says until when nobody can go ([`Next::At`]), that a concurrency
//!   slot must free up first ([`Next::Full`]), or that nobody waits.
//! * With shared quotas (`[redis]`), a partition that its own limits admit
//!   is not served yet: [`Next::Confirm`] names it with the slots taken for
//!   its next callers, and [`Admission::settle`] applies the shared
//!   limiter's verdict.
//! * [`Admission::release`] when an attempt ends, [`Admission::depart`] when
//!   a waiter gives up, [`Admission::feedback`] with what an answer said
//!   about the upstream's limits (cooldown, adaptive rate, remaining quota).
//!
//! What comes next builds on the same shape: a quota a request needs beyond
//! its partition's (token quotas, endpoint limits) is one more [`Pacing`]
//! that the request's queue must pass, and a queue is keyed by the set of
//! quotas its waiters need, so that waiters blocked on one quota never hold
//! up waiters that do not need it.
//!
//! Waiters are opaque to the core ([`Waiter`]): the dispatcher keeps a
//! channel there, tests keep a number.

mod closing;
pub mod pacing;
pub mod schedule;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::config;
use crate::limit::pacer::{Taken, long_run_rate};
use crate::retry::RateLimitHint;
pub use pacing::{Pacing, PauseReason, Quotas};
pub use schedule::{Priority, Schedule};

/// The one partition of an upstream without `partition_by`.
pub const SINGLE: u64 = 0;
/// Most callers one shared-limiter round trip asks slots for.
const MAX_BATCH: usize = 64;

/// A queued request as the core sees it.
pub trait Waiter {
    /// The caller stopped waiting: skip it, spend nothing on it.
    fn gone(&self) -> bool;
}

/// Where a waiter queues: which quotas pace it, who it is, how urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Hashed `partition_by` value; [`SINGLE`] without `partition_by`.
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
    /// pacegate is shutting down and the caller cannot leave before its
    /// grace is over; `retry_after`: until the grace is over.
    ShuttingDown { retry_after: Duration },
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

/// What the shared limiter (Redis) says about the next attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This many attempts may leave: a slot of every quota was taken for each.
    Go(usize),
    /// The quotas admit nobody before this much time has passed.
    Wait(Duration),
    /// The upstream (or partition) cools down for this much longer.
    Cooling(Duration),
}

/// An upstream's bounds, as the config states them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub quotas: Quotas,
    /// `queue_size`: new waiters are refused beyond it.
    pub queue_size: usize,
    /// `max_concurrency`: grants out at once.
    pub max_concurrency: usize,
    /// `max_partitions`: live partitions at once.
    pub max_partitions: usize,
}

impl Limits {
    pub fn of(upstream: &config::Upstream) -> Self {
        Self {
            quotas: Quotas::of(upstream),
            queue_size: upstream.queue_size,
            max_concurrency: upstream.max_concurrency.get() as usize,
            max_partitions: upstream.max_partitions.get(),
        }
    }
}

/// The driver's next step.
#[derive(Debug)]
pub enum Next<W> {
    /// Hand this waiter its ticket: its slots are taken, it counts in flight.
    Grant(W),
    /// The partition's own limits admit its next callers; the shared limiter
    /// has the last word ([`Admission::settle`]).
    Confirm(Confirm),
    /// Nobody can go before this instant, unless something changes.
    At(Instant),
    /// Waiters wait for a concurrency slot: the next [`Admission::release`].
    Full,
    /// Nobody waits.
    Idle,
}

/// Slots a partition's own limits gave its next callers, awaiting the
/// shared limiter's verdict.
#[derive(Debug)]
#[must_use = "a confirmation is settled, or its slots are lost"]
pub struct Confirm {
    partition: u64,
    slots: Vec<Taken>,
    /// [`Admission::quota_changes`] when the slots were taken: slots of a
    /// pacer that a reload replaced meanwhile are not given back to the new one.
    quotas: u64,
}

impl Confirm {
    pub fn partition(&self) -> u64 {
        self.partition
    }

    /// Callers the slots are for.
    pub fn wanted(&self) -> usize {
        self.slots.len()
    }
}

/// The admission state as `/status` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Callers waiting (joined, not yet served or gone).
    pub depth: usize,
    /// `queue_size` in force.
    pub queue_size: usize,
    /// Grants out: attempts in flight.
    pub in_flight: usize,
    /// `max_concurrency` in force.
    pub max_concurrency: usize,
    /// Partitions held (active or not yet evicted).
    pub partitions: usize,
    /// Waiters per active caller, largest first (never the keys).
    pub callers: Vec<usize>,
    /// Requests per second the pacer uses now, of the partition that moved last.
    pub effective_rate: f64,
    /// No attempt of the partition that moved last leaves before this instant.
    pub cooldown_until: Option<Instant>,
    /// When the upstream last answered 429, and the pause it asked for.
    pub last_rate_limited: Option<(Instant, Option<Duration>)>,
}

/// One partition: its waiters in serving order, and its pacing.
struct Partition<W> {
    waiters: Schedule<W>,
    pacing: Pacing,
}

impl<W> Partition<W> {
    fn new(quotas: &Quotas, now: Instant) -> Self {
        Self { waiters: Schedule::default(), pacing: Pacing::new(quotas, now) }
    }

    /// Nothing waits and the pacing state is idle: dropping it loses nothing.
    fn idle(&self, now: Instant) -> bool {
        self.waiters.is_empty() && self.pacing.idle(now)
    }
}

/// One upstream's admission state. See the module doc.
pub struct Admission<W> {
    /// Upstream name, for logs.
    name: String,
    limits: Limits,
    partitions: HashMap<u64, Partition<W>>,
    /// Partitions with waiters, in round-robin order; each at most once.
    ready: VecDeque<u64>,
    /// Waiters held over all partitions, departed ones included until reached.
    held: usize,
    /// Held waiters whose caller left ([`Admission::depart`]), not yet reached.
    departed: usize,
    /// Grants out (attempts in flight).
    in_flight: usize,
    /// Shared quotas are configured: every grant goes through the driver,
    /// so callers never leave on their own.
    shared: bool,
    /// Pacing as the partition that moved last left it, for `/status`.
    effective_rate: f64,
    cooldown_until: Option<Instant>,
    last_rate_limited: Option<(Instant, Option<Duration>)>,
    /// Cooldown added since [`Admission::take_cooled`] last looked.
    cooled: Duration,
    /// Reloads that changed the quotas (and so replaced every pacer).
    quota_changes: u64,
    /// The partition whose [`Confirm`] is out: out of the ring until
    /// settled, and never evicted meanwhile (its slots go back to its pacer).
    confirming: Option<u64>,
    /// Shutdown started: nobody leaves after its cutoff ([`closing`]).
    closing: Option<closing::Closing>,
}

impl<W: Waiter> Admission<W> {
    /// The admission state of an upstream that starts at `now`. Without
    /// `partition_by` its single partition is there from the start.
    pub fn new(name: &str, limits: Limits, partitioned: bool, shared: bool, now: Instant) -> Self {
        let mut partitions = HashMap::new();
        if !partitioned {
            partitions.insert(SINGLE, Partition::new(&limits.quotas, now));
        }
        Self {
            name: name.to_string(),
            effective_rate: long_run_rate(&limits.quotas.rate),
            limits,
            partitions,
            ready: VecDeque::new(),
            held: 0,
            departed: 0,
            in_flight: 0,
            shared,
            cooldown_until: None,
            last_rate_limited: None,
            cooled: Duration::ZERO,
            quota_changes: 0,
            confirming: None,
            closing: None,
        }
    }

    /// Takes a reloaded config: bounds at once, new quotas from the next
    /// grant (pacers are rebuilt only where quotas changed; cooldowns stay).
    pub fn reconfigure(&mut self, limits: Limits, shared: bool, now: Instant) {
        if limits.quotas != self.limits.quotas {
            for partition in self.partitions.values_mut() {
                partition.pacing.requota(&limits.quotas, now);
            }
            self.quota_changes += 1;
            tracing::info!(upstream = %self.name, "new quotas take effect");
        }
        for partition in self.partitions.values_mut() {
            partition.pacing.refresh_cap(&self.name, now);
        }
        self.limits = limits;
        self.shared = shared;
    }

    /// Callers waiting now.
    pub fn depth(&self) -> usize {
        // Saturating: a driver that panicked between taking a waiter and
        // answering it leaves one departure without its entry.
        self.held.saturating_sub(self.departed)
    }

    /// The bounds in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn has_room(&self) -> bool {
        self.in_flight < self.limits.max_concurrency
    }

    /// A grant without queueing, when nobody waits, a concurrency slot is
    /// free and the caller's partition has a pacer slot now. True: the
    /// caller counts in flight and leaves.
    pub fn try_leave(&mut self, place: Place, now: Instant) -> bool {
        if self.shared || self.depth() != 0 || !self.has_room() || self.closed(now) {
            return false;
        }
        if !self.make_room_for(place.partition, now) {
            return false;
        }
        let Some(partition) = self.partitions.get_mut(&place.partition) else { return false };
        let admitted = partition.pacing.admit(&self.name, now);
        if admitted.is_ok() {
            partition.pacing.record_grant(now);
            self.in_flight += 1;
        }
        self.observe(place.partition);
        admitted.is_ok()
    }

    /// Queues a waiter: at the back, or at the head of its caller's lane for
    /// a `retry`. New waiters are refused when `queue_size` wait already;
    /// a retry is not (it held its place once).
    pub fn enqueue(&mut self, waiter: W, place: Place, retry: bool, now: Instant) -> Result<(), Refusal> {
        if !retry && self.depth() >= self.limits.queue_size {
            return Err(Refusal::Full { retry_after: self.estimate_wait(now) });
        }
        let key = place.partition;
        if self.closed(now) {
            return Err(self.shutting_down(now));
        }
        let partition = if self.make_room_for(key, now) { self.partitions.get_mut(&key) } else { None };
        let Some(partition) = partition else {
            tracing::warn!(upstream = %self.name, max = self.limits.max_partitions, "too_many_partitions");
            return Err(Refusal::TooManyPartitions);
        };
        if let Some(closing) = &self.closing
            && partition.waiters.len() >= closing.servable(&partition.pacing, &self.limits, now)
        {
            return Err(self.shutting_down(now));
        }
        let was_empty = partition.waiters.is_empty();
        if retry {
            partition.waiters.push_front(place.caller, place.priority, waiter);
        } else {
            partition.waiters.push_back(place.caller, place.priority, waiter);
        }
        self.held += 1;
        if was_empty && self.confirming != Some(key) {
            if retry {
                self.ready.push_front(key);
            } else {
                self.ready.push_back(key);
            }
        }
        self.purge_departed();
        Ok(())
    }

    /// A waiter's caller stopped waiting before it was served; its entry
    /// stays until reached (finding it would cost a walk of the queue).
    pub fn depart(&mut self) {
        self.departed += 1;
    }

    /// An attempt ended: its concurrency slot is free. True when entries
    /// are held (waiters, or departed ones still to clear), so the driver
    /// should look again.
    pub fn release(&mut self) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.held > 0
    }

    /// The driver's next step; see [`Next`]. `confirm`: the shared limiter
    /// is reachable and must confirm every grant.
    pub fn next(&mut self, now: Instant, confirm: bool) -> Next<W> {
        // A second round only after every waiter reached had gone.
        for _ in 0..2 {
            if self.held == 0 {
                return Next::Idle;
            }
            if !self.has_room() {
                return Next::Full;
            }
            let mut earliest: Option<Instant> = None;
            for _ in 0..self.ready.len() {
                let Some(key) = self.ready.pop_front() else { break };
                match self.serve(key, now, confirm) {
                    Served::Grant(waiter) => return Next::Grant(waiter),
                    Served::Confirm(confirm) => return Next::Confirm(confirm),
                    Served::Later(at) => {
                        earliest = Some(earliest.map_or(at, |e| e.min(at)));
                        self.ready.push_back(key);
                    }
                    Served::Nobody => {}
                }
            }
            if let Some(at) = earliest {
                return Next::At(at);
            }
            // Everyone reached had gone: make sure every partition still
            // holding waiters takes turns.
            self.held = self.partitions.values().map(|p| p.waiters.len()).sum();
            let waiting = self.partitions.iter().filter(|(_, p)| !p.waiters.is_empty());
            self.ready = waiting.map(|(key, _)| *key).collect();
        }
        Next::Idle
    }

    /// Serves partition `key` if it can go now.
    fn serve(&mut self, key: u64, now: Instant, confirm: bool) -> Served<W> {
        let free = self.limits.max_concurrency.saturating_sub(self.in_flight);
        let Some(partition) = self.partitions.get_mut(&key).filter(|p| !p.waiters.is_empty()) else {
            return Served::Nobody;
        };
        let admitted = partition.pacing.admit(&self.name, now);
        let served = match admitted {
            Err(at) => Served::Later(at),
            Ok(first) if confirm => {
                // One round trip may serve every caller a slot is free for.
                let room = free.min(partition.waiters.len()).min(MAX_BATCH);
                let mut slots = vec![first];
                while slots.len() < room {
                    let Some(next) = partition.pacing.take_another(now) else { break };
                    slots.push(next);
                }
                self.confirming = Some(key);
                Served::Confirm(Confirm { partition: key, slots, quotas: self.quota_changes })
            }
            Ok(taken) => match self.hand_out(key, now) {
                Some(waiter) => {
                    self.requeue(key);
                    Served::Grant(waiter)
                }
                None => {
                    self.give_back(key, vec![taken]);
                    Served::Nobody
                }
            },
        };
        self.observe(key);
        served
    }

    /// Applies the shared limiter's verdict on `confirm`: the callers it
    /// allowed (as many as concurrency still allows) get their grants, the
    /// other slots go back; a wait or cooldown holds the partition.
    pub fn settle(&mut self, confirm: Confirm, verdict: Verdict, now: Instant) -> Vec<W> {
        let Confirm { partition: key, slots, quotas } = confirm;
        self.confirming = None;
        let wanted = slots.len();
        // Slots of a pacer that a reload replaced are not the new one's to take back.
        let mut slots = if quotas == self.quota_changes { slots } else { Vec::new() };
        let mut granted = Vec::new();
        match verdict {
            Verdict::Go(allowed) => {
                while granted.len() < allowed.min(wanted) && self.has_room() {
                    let Some(waiter) = self.hand_out(key, now) else { break };
                    granted.push(waiter);
                }
                let used = granted.len().min(slots.len());
                self.give_back(key, slots.split_off(used));
            }
            Verdict::Wait(wait) | Verdict::Cooling(wait) => {
                self.give_back(key, slots);
                if let Some(partition) = self.partitions.get_mut(&key) {
                    if matches!(verdict, Verdict::Cooling(_)) {
                        self.cooled += partition.pacing.cool_down(&self.name, now, wait, PauseReason::Shared);
                    } else {
                        partition.pacing.wait_shared(pacing::later(now, wait));
                    }
                }
                self.observe(key);
            }
        }
        self.requeue(key);
        granted
    }

    /// Every live waiter, to be refused (Redis down with `on_error = "deny"`).
    pub fn refuse_all(&mut self) -> Vec<W> {
        let mut refused = Vec::new();
        for partition in self.partitions.values_mut() {
            while let Some(waiter) = partition.waiters.pop() {
                if !waiter.gone() {
                    refused.push(waiter);
                }
            }
        }
        self.ready.clear();
        self.held = 0;
        self.departed = 0;
        refused
    }

    /// Applies what an answer said about the upstream's limits. `shared`:
    /// the quotas are shared with other replicas right now. Returns the pause
    /// the upstream asked for, for the other replicas.
    pub fn feedback(&mut self, feedback: &Feedback, shared: bool, now: Instant) -> Option<Duration> {
        if feedback.rate_limited {
            self.last_rate_limited = Some((now, feedback.cooldown));
        }
        let live = self.partitions.len();
        // A partition evicted meanwhile comes back if the bound allows: a
        // 429 must still cool its key down.
        let partition = match self.partitions.entry(feedback.partition) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if live >= self.limits.max_partitions => return None,
            Entry::Vacant(entry) => entry.insert(Partition::new(&self.limits.quotas, now)),
        };
        let learned = partition.pacing.learn(&self.name, feedback, shared, now);
        self.cooled += learned.cooled;
        self.observe(feedback.partition);
        learned.pause
    }

    /// Drops idle partitions (nothing waits, nothing to remember); the single
    /// partition of an upstream without `partition_by` stays.
    pub fn sweep(&mut self, now: Instant) {
        let before = self.partitions.len();
        let confirming = self.confirming;
        self.partitions
            .retain(|key, partition| *key == SINGLE || Some(*key) == confirming || !partition.idle(now));
        if self.partitions.len() < before {
            let partitions = &self.partitions;
            self.ready.retain(|key| partitions.contains_key(key));
            tracing::debug!(upstream = %self.name, evicted = before - self.partitions.len(), "idle partitions");
        }
    }

    /// Makes the bookkeeping whole again after a driver panicked in the
    /// middle of a round: counts recomputed from the queues, every partition
    /// with waiters back in the ring, a pending confirmation forgotten.
    pub fn recover(&mut self) {
        self.held = self.partitions.values().map(|p| p.waiters.len()).sum();
        self.departed = self.partitions.values().map(|p| p.waiters.count(|w| w.gone())).sum();
        let waiting = self.partitions.iter().filter(|(_, p)| !p.waiters.is_empty());
        self.ready = waiting.map(|(key, _)| *key).collect();
        self.confirming = None;
    }

    /// Partitions held now.
    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    /// Cooldown added since the last call, for `pacegate_cooldown_seconds_total`.
    pub fn take_cooled(&mut self) -> Duration {
        std::mem::take(&mut self.cooled)
    }

    /// The state as `/status` shows it.
    pub fn status(&self) -> Status {
        let mut callers: Vec<usize> = if self.held == 0 {
            Vec::new()
        } else {
            self.partitions.values().flat_map(|p| p.waiters.caller_depths()).collect()
        };
        callers.sort_unstable_by(|a, b| b.cmp(a));
        Status {
            depth: self.depth(),
            queue_size: self.limits.queue_size,
            in_flight: self.in_flight,
            max_concurrency: self.limits.max_concurrency,
            partitions: self.partitions.len(),
            callers,
            effective_rate: self.effective_rate,
            cooldown_until: self.cooldown_until,
            last_rate_limited: self.last_rate_limited,
        }
    }

    /// An honest `Retry-After`: how long the queue as it stands takes to
    /// drain at the current pace, after any cooldown.
    pub fn estimate_wait(&self, now: Instant) -> Duration {
        let ahead = self.depth() as f64 + 1.0;
        let drain = Duration::try_from_secs_f64(ahead / self.effective_rate).unwrap_or(Duration::MAX);
        let cooldown =
            self.cooldown_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        drain.saturating_add(cooldown)
    }

    /// Makes sure partition `key` exists, new if the bound allows (after
    /// evicting idle ones); false when `max_partitions` busy ones are live.
    fn make_room_for(&mut self, key: u64, now: Instant) -> bool {
        if self.partitions.contains_key(&key) {
            return true;
        }
        // One walk, under the lock a caller holds: the least recently used
        // partition is usually an idle one; the driver sweeps the rest.
        if self.partitions.len() >= self.limits.max_partitions && !self.evict_least_recent(now) {
            return false;
        }
        self.partitions.insert(key, Partition::new(&self.limits.quotas, now));
        true
    }

    /// Drops the least recently used partition that nobody waits in and
    /// that is not cooling down, so that keys seen once (a client making up
    /// `partition_by` values, say) cannot lock new keys out for a whole
    /// quota window. The price: the dropped key's pacer forgets its recent
    /// grants, so if it comes back it may use its burst again. False when
    /// every partition has waiters or cools down.
    fn evict_least_recent(&mut self, now: Instant) -> bool {
        let confirming = self.confirming;
        let evictable = self.partitions.iter().filter(|(key, partition)| {
            **key != SINGLE
                && Some(**key) != confirming
                && partition.waiters.is_empty()
                && !partition.pacing.cooling(now)
        });
        let Some(key) =
            evictable.min_by_key(|(_, partition)| partition.pacing.last_grant()).map(|(key, _)| *key)
        else {
            return false;
        };
        self.partitions.remove(&key);
        tracing::debug!(upstream = %self.name, "least recently used partition evicted");
        true
    }

    /// Partition `key`'s next waiter still waiting, granted: it counts in
    /// flight and its partition records the grant. `None`: all had gone.
    fn hand_out(&mut self, key: u64, now: Instant) -> Option<W> {
        let partition = self.partitions.get_mut(&key)?;
        while let Some(waiter) = partition.waiters.pop() {
            self.held -= 1;
            if waiter.gone() {
                self.departed = self.departed.saturating_sub(1);
                continue;
            }
            partition.pacing.record_grant(now);
            self.in_flight += 1;
            return Some(waiter);
        }
        None
    }

    /// Puts partition `key` back in the ring if callers still wait there; an
    /// empty one leaves it until a new waiter brings it back.
    fn requeue(&mut self, key: u64) {
        if self.partitions.get(&key).is_some_and(|p| !p.waiters.is_empty()) {
            self.ready.push_back(key);
        }
    }

    fn give_back(&mut self, key: u64, taken: Vec<Taken>) {
        if let Some(partition) = self.partitions.get_mut(&key) {
            partition.pacing.give_back(taken);
        }
    }

    /// `/status` shows the partition that moved last.
    fn observe(&mut self, key: u64) {
        if let Some(partition) = self.partitions.get(&key) {
            self.effective_rate = partition.pacing.effective_rate();
            self.cooldown_until = partition.pacing.cooldown_until();
        }
    }

    /// Departed callers stay queued until reached; bound that leftover by
    /// dropping them once they outnumber the queue bound.
    fn purge_departed(&mut self) {
        if self.held <= self.limits.queue_size.saturating_mul(2).saturating_add(64) {
            return;
        }
        for partition in self.partitions.values_mut() {
            partition.waiters.retain(|waiter| !waiter.gone());
        }
        let partitions = &self.partitions;
        self.ready.retain(|key| partitions.get(key).is_some_and(|p| !p.waiters.is_empty()));
        let held = self.partitions.values().map(|p| p.waiters.len()).sum();
        self.departed = self.departed.saturating_sub(self.held - held);
        self.held = held;
    }
}

impl<W> std::fmt::Debug for Admission<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("upstream", &self.name)
            .field("held", &self.held)
            .field("departed", &self.departed)
            .field("in_flight", &self.in_flight)
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

/// What serving one partition came to.
enum Served<W> {
    Grant(W),
    Confirm(Confirm),
    /// It cannot go before this instant.
    Later(Instant),
    /// Nobody there was still waiting.
    Nobody,
}
