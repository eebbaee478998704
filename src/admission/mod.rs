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
//! Endpoint limits (`[[upstream.limit]]`) are quotas a request needs beyond
//! its partition's: each is one more [`Pacing`] in the partition, and a
//! request says what it takes of each ([`Needs`], a cost in units). A queue
//! is keyed by its partition and the set of limits its waiters need
//! ([`QueueKey`]), and the ring walks queues, not partitions, so waiters
//! blocked on one limit never hold up waiters that do not need it. A cost is
//! paced evenly by units (see `limit::pacer`); a cost above what a limit can
//! ever hold is refused at once ([`Refusal::CostExceedsQuota`]).
//!
//! Waiters are opaque to the core ([`Waiter`]): the dispatcher keeps a
//! channel there, tests keep a number.

#[cfg(test)]
mod adaptive_sim;
pub mod breaker;
mod closing;
pub mod needs;
pub mod pacing;
mod partition;
pub mod schedule;
mod terms;
#[cfg(test)]
mod tests;
pub mod tokens;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use crate::retry::HintPace;

use crate::limit::pacer::{Floor, long_run_rate};
pub use breaker::{Breaker, BreakerStatus, Transition};
pub use needs::{LimitSet, Needs, QueueKey};
pub use pacing::{Pacing, PauseReason, Quotas};
use partition::{Partition, Slots};
pub use schedule::{Priority, Schedule};
pub use terms::{Endpoint, Limits, Place, Refusal, Verdict, Waiter};
use tokens::TokenBook;
pub use tokens::{Reservation, Settlement, TokenQuotas, TokenStatus};

/// The one partition of an upstream without `partition_by`.
pub const SINGLE: u64 = 0;
/// Most callers one shared-limiter round trip asks slots for.
const MAX_BATCH: usize = 64;

/// What one attempt's answer says about the upstream's limits.
#[derive(Debug, Clone, Copy)]
pub struct Feedback {
    /// The partition whose limits the answer speaks for.
    pub partition: u64,
    /// The endpoint limit (by index) the answer names, if the request
    /// needed it: a cooldown or hint then applies to that limit only.
    pub limit: Option<usize>,
    /// When the attempt left (its ticket was handed out).
    pub sent_at: Instant,
    /// The upstream answered 429.
    pub rate_limited: bool,
    /// Pause the partition this long (429, or 503 with Retry-After).
    pub cooldown: Option<Duration>,
    /// What the remaining quota and reset time the upstream reported ask.
    pub hint: Option<HintPace>,
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
    key: QueueKey,
    /// What each caller needs of the endpoint limits (all alike: a queue
    /// with limits confirms one caller at a time).
    needs: Needs,
    slots: Vec<Slots>,
    /// [`Admission::quota_changes`] when the slots were taken: slots of a
    /// pacer that a reload replaced meanwhile are not given back to the new one.
    quotas: u64,
    /// The breaker is half-open: this is a probe, which replicas share.
    probing: bool,
}

impl Confirm {
    pub fn partition(&self) -> u64 {
        self.key.partition
    }

    /// Units each caller takes from endpoint limits.
    pub fn needs(&self) -> &Needs {
        &self.needs
    }

    /// Callers the slots are for.
    pub fn wanted(&self) -> usize {
        self.slots.len()
    }

    /// Whether the slot is a half-open breaker's probe (then one at a time).
    pub fn probing(&self) -> bool {
        self.probing
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
    /// Each endpoint limit, by index (token quotas last).
    pub limits: Vec<LimitStatus>,
    /// With token quotas: tokens sent, reserved and the calibration.
    pub tokens: Option<TokenStatus>,
    /// With a breaker: its state.
    pub breaker: Option<BreakerStatus>,
}

/// One endpoint limit as `/status` shows it.
#[derive(Debug, Clone)]
pub struct LimitStatus {
    pub name: String,
    /// Units per second its quotas allow in the long run.
    pub rate: f64,
    /// Units per second it paces at now (hints included), in the partition that moved last.
    pub effective_rate: f64,
    /// Callers waiting that need it.
    pub waiting: usize,
    /// No request needing it leaves before this instant.
    pub cooldown_until: Option<Instant>,
}

/// One upstream's admission state. See the module doc.
pub struct Admission<W> {
    /// Upstream name, for logs.
    name: String,
    limits: Limits,
    /// foldhash, randomly seeded: every request looks its partition up
    /// twice, and SipHash of a `u64` cost more than the rest of the lookup.
    partitions: HashMap<u64, Partition<W>, foldhash::fast::RandomState>,
    /// Queues with waiters, in round-robin order; each at most once.
    ready: VecDeque<QueueKey>,
    /// Waiters held over all partitions, departed ones included until reached.
    held: usize,
    /// Held waiters whose caller left ([`Admission::depart`]), not yet reached.
    departed: usize,
    /// Grants out (attempts in flight).
    in_flight: usize,
    /// Shared quotas are configured: every grant goes through the driver,
    /// so callers never leave on their own.
    shared: bool,
    /// The partition that moved last, which `/status` shows.
    observed: u64,
    last_rate_limited: Option<(Instant, Option<Duration>)>,
    /// Cooldown added since [`Admission::take_cooled`] last looked.
    cooled: Duration,
    /// Reloads that changed the quotas (and so replaced every pacer).
    quota_changes: u64,
    /// The [`Confirm`] that is out: its queue is out of the ring until
    /// settled, and its partition never evicted meanwhile (its slots go
    /// back there).
    confirming: Option<Out>,
    /// Tokens in flight and sent, and the input calibration.
    tokens: TokenBook,
    /// Shutdown started: nobody leaves after its cutoff ([`closing`]).
    closing: Option<closing::Closing>,
    /// `[upstream.breaker]`: when open, nobody leaves ([`breaker`]).
    breaker: Option<Breaker>,
    /// What waiters' deadlines are counted from (see `partition::Entry`).
    epoch: Instant,
}

impl<W: Waiter> Admission<W> {
    /// The admission state of an upstream that starts at `now`. Without
    /// `partition_by` its single partition is there from the start.
    pub fn new(name: &str, limits: Limits, partitioned: bool, shared: bool, now: Instant) -> Self {
        let breaker = limits.breaker.clone().map(Breaker::new);
        let mut partitions = HashMap::default();
        if !partitioned {
            partitions.insert(SINGLE, Partition::new(&limits, now));
        }
        Self {
            name: name.to_string(),
            limits,
            partitions,
            ready: VecDeque::new(),
            held: 0,
            departed: 0,
            in_flight: 0,
            shared,
            observed: SINGLE,
            last_rate_limited: None,
            cooled: Duration::ZERO,
            quota_changes: 0,
            confirming: None,
            tokens: TokenBook::default(),
            closing: None,
            breaker,
            epoch: now,
        }
    }

    /// Takes a reloaded config: bounds at once, new quotas from the next
    /// grant (pacers whose quotas changed continue from their last grant at
    /// the new rate; cooldowns stay; an endpoint limit that kept its name
    /// keeps its state).
    pub fn reconfigure(&mut self, limits: Limits, shared: bool, now: Instant) {
        if limits.quotas != self.limits.quotas || limits.endpoints != self.limits.endpoints {
            let from: Vec<String> = self.limits.endpoints.iter().map(|e| e.name.clone()).collect();
            for partition in self.partitions.values_mut() {
                partition.pacing.requota(&limits.quotas);
                partition.relimit(&from, &limits, now);
            }
            self.quota_changes += 1;
            // Queues may have merged or been renamed: every one with waiters
            // takes its turn again, and a pending confirmation is let go.
            self.confirming = None;
            self.rebuild_ring();
            tracing::info!(upstream = %self.name, "new quotas take effect");
        }
        for partition in self.partitions.values_mut() {
            partition.pacing.refresh_cap(&self.name, now);
        }
        // A breaker keeps its state through a reload that keeps it at all.
        self.breaker = match (self.breaker.take(), &limits.breaker) {
            (Some(mut breaker), Some(config)) => {
                breaker.reconfigure(config.clone());
                Some(breaker)
            }
            (None, Some(config)) => Some(Breaker::new(config.clone())),
            (_, None) => None,
        };
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

    /// The first endpoint limit `needs` asks more of than it can ever hold.
    fn never_fits(&self, needs: &Needs) -> Option<usize> {
        needs.iter().find_map(|(index, units)| {
            let capacity = self.limits.endpoints.get(index)?.capacity;
            (units.get() > capacity).then_some(index)
        })
    }

    /// A grant without queueing, when nobody waits, a concurrency slot is
    /// free and every quota the caller needs admits it now. True: the
    /// caller counts in flight and leaves.
    pub fn try_leave(&mut self, place: Place, needs: &Needs, now: Instant) -> bool {
        if self.shared
            || self.depth() != 0
            || !self.has_room()
            || self.never_fits(needs).is_some()
            || self.closed(now)
            || self.breaker.as_mut().is_some_and(|b| b.admits(now).is_err())
        {
            return false;
        }
        if !self.make_room_for(place.partition, now) {
            return false;
        }
        let Some(partition) = self.partitions.get_mut(&place.partition) else { return false };
        let admitted = partition.take(&self.name, needs, now);
        if admitted.is_ok() {
            partition.record_grant(needs, now);
            self.tokens.granted(&self.limits.tokens, needs, now);
            self.in_flight += 1;
            if let Some(breaker) = &mut self.breaker {
                breaker.granted();
            }
        }
        self.observed = place.partition;
        admitted.is_ok()
    }

    /// Queues a waiter: at the back, or at the head of its caller's lane for
    /// a `retry`. New waiters are refused when `queue_size` wait already,
    /// or when the queue ahead already outlasts their `deadline` (see
    /// [`Self::hopeless`]); a retry is not (it held its place once). A cost
    /// no limit can hold is refused either way, and so is a caller whose
    /// `deadline` (`None`: it waits as long as it takes) comes before an
    /// open breaker's end.
    pub fn enqueue(
        &mut self,
        waiter: W,
        place: Place,
        needs: Needs,
        (retry, deadline): (bool, Option<Instant>),
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some(limit) = self.never_fits(&needs) {
            return Err(Refusal::CostExceedsQuota { limit });
        }
        if let Some(until) = self.breaker.as_ref().and_then(Breaker::open_until)
            && deadline.is_some_and(|deadline| deadline < until)
        {
            return Err(Refusal::CircuitOpen { retry_after: until.saturating_duration_since(now) });
        }
        if !retry && self.depth() >= self.limits.queue_size {
            return Err(Refusal::Full { retry_after: self.retry_after(place, &needs, now) });
        }
        let key = QueueKey { partition: place.partition, set: needs.set() };
        if self.closed(now) {
            return Err(self.shutting_down(now));
        }
        if !self.make_room_for(key.partition, now) {
            tracing::warn!(upstream = %self.name, max = self.limits.max_partitions, "too_many_partitions");
            return Err(Refusal::TooManyPartitions);
        }
        if let (Some(closing), Some(partition)) = (&self.closing, self.partitions.get(&key.partition))
            && partition.len() >= closing.servable(&partition.pacing, &self.limits, now)
        {
            return Err(self.shutting_down(now));
        }
        if let Some(refusal) =
            deadline.filter(|_| !retry).and_then(|at| self.hopeless(place, &needs, at, now))
        {
            return Err(refusal);
        }
        let Some(partition) = self.partitions.get_mut(&key.partition) else {
            return Err(Refusal::TooManyPartitions);
        };
        let deadline = deadline.map_or(u64::MAX, |at| since(self.epoch, at));
        let entry = partition::Entry { waiter, needs, deadline };
        let was_empty = partition.push((place.caller, place.priority), entry, retry);
        self.held += 1;
        if was_empty && self.confirming.as_ref().map(|out| out.key) != Some(key) {
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

    /// An attempt granted at `granted` ended: its concurrency slot is free,
    /// its tokens no longer count in flight (settled or not), and a breaker's probe that ended without a verdict is given back
    /// ([`Breaker::released`]). True when entries are held (waiters, or
    /// departed ones still to clear), so the driver should look again.
    pub fn release(&mut self, granted: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.tokens.released(granted);
        if let Some(breaker) = &mut self.breaker {
            breaker.released(granted);
        }
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
            match self.breaker.as_mut().map(|b| b.admits(now)) {
                Some(Err(Some(until))) => return Next::At(until),
                // Half-open, every probe out: the next answer decides.
                Some(Err(None)) => return Next::Full,
                _ => {}
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
            // Everyone reached had gone: make sure every queue still
            // holding waiters takes turns.
            self.held = self.partitions.values().map(Partition::len).sum();
            self.rebuild_ring();
        }
        Next::Idle
    }

    /// Serves queue `key` if its next waiter can go now.
    fn serve(&mut self, key: QueueKey, now: Instant, confirm: bool) -> Served<W> {
        let free = self.limits.max_concurrency.saturating_sub(self.in_flight);
        let Some(partition) = self.partitions.get_mut(&key.partition) else { return Served::Nobody };
        let (needs, dropped) = partition.head(key.set);
        self.held -= dropped;
        self.departed = self.departed.saturating_sub(dropped);
        let Some(needs) = needs else { return Served::Nobody };
        self.observed = key.partition;
        match partition.take(&self.name, &needs, now) {
            Err(at) => Served::Later(at),
            Ok(first) if confirm => {
                // One round trip may serve every caller a slot is free for;
                // callers that need endpoint limits go one at a time.
                let probing = self.breaker.as_mut().is_some_and(|b| b.probing(now));
                let room = if needs.is_empty() && !probing {
                    free.min(partition.waiting_in(key.set)).min(MAX_BATCH)
                } else {
                    1
                };
                let mut slots = vec![first];
                while slots.len() < room {
                    let Some(next) = partition.pacing.take_another(now) else { break };
                    slots.push(Slots::own(next));
                }
                self.confirming = Some(Out { key, slots: slots.len() as u64, needs: needs.clone() });
                Served::Confirm(Confirm { key, needs, slots, quotas: self.quota_changes, probing })
            }
            Ok(_taken) => {
                // The head is known to be waiting: it is the one served.
                let waiter = self.hand_out(key, now);
                self.requeue(key);
                waiter.map_or(Served::Nobody, Served::Grant)
            }
        }
    }

    /// Applies the shared limiter's verdict on `confirm`: the callers it
    /// allowed (as many as concurrency still allows) get their grants, the
    /// other slots go back; a wait or cooldown holds the queue.
    pub fn settle(&mut self, confirm: Confirm, verdict: Verdict, now: Instant) -> Vec<W> {
        let Confirm { key, needs: _, slots, quotas, probing: _ } = confirm;
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
                self.give_back(key.partition, slots.split_off(used));
            }
            Verdict::Wait(wait, on) | Verdict::Cooling(wait, on) => {
                self.give_back(key.partition, slots);
                if let Some(partition) = self.partitions.get_mut(&key.partition) {
                    // A limit's wait holds only the queues that need it.
                    let pacing = match on.and_then(|index| partition.limits.get_mut(index)) {
                        Some(limit) => limit,
                        None => &mut partition.pacing,
                    };
                    if matches!(verdict, Verdict::Cooling(..)) {
                        self.cooled += pacing.cool_down(&self.name, now, wait, PauseReason::Shared);
                    } else {
                        pacing.wait_shared(pacing::later(now, wait));
                    }
                }
                self.observed = key.partition;
            }
            Verdict::Open(open_for) => {
                self.give_back(key.partition, slots);
                match &mut self.breaker {
                    Some(breaker) => breaker.force_open(now, open_for),
                    // Opened by a replica that has a breaker this one has
                    // not (yet): held all the same.
                    None => {
                        if let Some(partition) = self.partitions.get_mut(&key.partition) {
                            partition.pacing.wait_shared(pacing::later(now, open_for));
                        }
                    }
                }
            }
            // The whole upstream waits, as for a break, so that only one
            // of its partitions asks again.
            Verdict::ProbeOut(wait) => {
                self.give_back(key.partition, slots);
                if let Some(breaker) = &mut self.breaker {
                    breaker.hold(now, wait);
                }
            }
        }
        self.requeue(key);
        granted
    }

    /// Every live waiter, to be refused (Redis down with `on_error = "deny"`).
    pub fn refuse_all(&mut self) -> Vec<W> {
        let mut refused = Vec::new();
        for partition in self.partitions.values_mut() {
            refused.extend(partition.drain().filter(|waiter| !waiter.gone()));
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
        // A partition evicted while its attempt was out comes back, in the
        // place of another if the bound is reached: a 429 must still cool
        // its key down.
        // Only for what pauses: a success's quota hint for a dropped key is
        // not worth another key's pacing state.
        let pauses = feedback.rate_limited
            || feedback.cooldown.is_some()
            || feedback.hint.is_some_and(|hint| hint.pause.is_some());
        if !self.partitions.contains_key(&feedback.partition)
            && self.partitions.len() >= self.limits.max_partitions
            && !(pauses && self.evict_least_recent(now))
        {
            return None;
        }
        let partition =
            self.partitions.entry(feedback.partition).or_insert_with(|| Partition::new(&self.limits, now));
        let pacing = match feedback.limit.and_then(|index| partition.limits.get_mut(index)) {
            Some(limit) => limit,
            None => &mut partition.pacing,
        };
        let learned = pacing.learn(&self.name, feedback, shared, now);
        self.cooled += learned.cooled;
        self.observed = feedback.partition;
        learned.pause
    }

    /// An input estimate corrected by what this upstream's answers reported.
    pub fn calibrated(&self, input: u64) -> u64 {
        self.tokens.calibration.reserve(input)
    }

    /// Learns from one answer: an uncalibrated input estimate and the input reported.
    pub fn calibrate(&mut self, estimated: u64, reported: u64) {
        self.tokens.calibration.observe(estimated, reported);
    }

    /// Settles an attempt of `partition` granted at `granted` that
    /// `reserved` tokens: the token quotas are corrected to what it is
    /// charged (given back as the pacer allows, or taken on top). Returns
    /// what it is charged.
    pub fn settle_tokens(
        &mut self,
        partition: u64,
        reserved: Reservation,
        settlement: Settlement,
        granted: Instant,
        now: Instant,
    ) -> Reservation {
        let quotas = self.limits.tokens;
        let charged = quotas.charged(reserved, settlement);
        self.tokens.settled(&quotas, (reserved, granted), charged, now);
        // A partition evicted meanwhile has nothing left to correct.
        if let Some(partition) = self.partitions.get_mut(&partition) {
            for (index, delta) in quotas.corrections(reserved, charged) {
                if let Some(limit) = partition.limits.get_mut(index) {
                    limit.adjust(now, delta, granted);
                }
            }
        }
        charged
    }

    /// Drops idle partitions (nothing waits, nothing to remember); the single
    /// partition of an upstream without `partition_by` stays.
    pub fn sweep(&mut self, now: Instant) {
        let before = self.partitions.len();
        let confirming = self.confirming.as_ref().map(|out| out.key.partition);
        self.partitions
            .retain(|key, partition| *key == SINGLE || Some(*key) == confirming || !partition.idle(now));
        if self.partitions.len() < before {
            let partitions = &self.partitions;
            self.ready.retain(|key| partitions.contains_key(&key.partition));
            tracing::debug!(upstream = %self.name, evicted = before - self.partitions.len(), "idle partitions");
        }
    }

    /// Makes the bookkeeping whole again after a driver panicked in the
    /// middle of a round: counts recomputed from the queues, every queue
    /// with waiters back in the ring, a pending confirmation forgotten.
    pub fn recover(&mut self) {
        self.held = self.partitions.values().map(Partition::len).sum();
        self.departed = self.partitions.values().map(|p| p.count(|w| w.gone())).sum();
        self.rebuild_ring();
        self.confirming = None;
    }

    /// Every queue holding waiters, in the ring once.
    fn rebuild_ring(&mut self) {
        let waiting = self.partitions.iter().flat_map(|(partition, p)| {
            p.waiting_sets().map(move |set| QueueKey { partition: *partition, set })
        });
        self.ready = waiting.collect();
    }

    /// Partitions held now.
    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    /// Cooldown added since the last call, for `pacegate_cooldown_seconds_total`.
    pub fn take_cooled(&mut self) -> Duration {
        std::mem::take(&mut self.cooled)
    }

    /// The state as `/status` shows it at `now`.
    pub fn status(&self, now: Instant) -> Status {
        let mut callers: Vec<usize> = if self.held == 0 {
            Vec::new()
        } else {
            self.partitions.values().flat_map(Partition::caller_depths).collect()
        };
        callers.sort_unstable_by(|a, b| b.cmp(a));
        let observed = self.partitions.get(&self.observed);
        let limits = self.limits.endpoints.iter().enumerate().map(|(index, endpoint)| {
            let pacing = observed.and_then(|p| p.limits.get(index));
            let rate = long_run_rate(&endpoint.quotas.rate);
            let needing = |p: &Partition<W>| {
                p.waiting_sets()
                    .filter(|set| set & 1 << index != 0)
                    .map(|set| p.waiting_in(set))
                    .sum::<usize>()
            };
            LimitStatus {
                name: endpoint.name.clone(),
                rate,
                effective_rate: pacing.map_or(rate, Pacing::effective_rate),
                waiting: self.partitions.values().map(needing).sum(),
                cooldown_until: pacing.and_then(Pacing::cooldown_until),
            }
        });
        Status {
            depth: self.depth(),
            queue_size: self.limits.queue_size,
            in_flight: self.in_flight,
            max_concurrency: self.limits.max_concurrency,
            partitions: self.partitions.len(),
            callers,
            effective_rate: self.effective_rate(),
            cooldown_until: observed.and_then(|p| p.pacing.cooldown_until()),
            last_rate_limited: self.last_rate_limited,
            limits: limits.collect(),
            tokens: (!self.limits.tokens.is_empty()).then(|| self.tokens.status(now)),
            breaker: self.breaker.as_ref().map(|b| b.status(now)),
        }
    }

    /// Requests per second the partition that moved last is paced at.
    fn effective_rate(&self) -> f64 {
        let observed = self.partitions.get(&self.observed);
        observed.map_or_else(|| long_run_rate(&self.limits.quotas.rate), |p| p.pacing.effective_rate())
    }

    /// An honest `Retry-After`: how long the queue as it stands takes to
    /// drain at the current pace, after any cooldown.
    pub fn estimate_wait(&self, now: Instant) -> Duration {
        let ahead = self.depth() as f64 + 1.0;
        let drain = Duration::try_from_secs_f64(ahead / self.effective_rate()).unwrap_or(Duration::MAX);
        let cooldown_until = self.partitions.get(&self.observed).and_then(|p| p.pacing.cooldown_until());
        let cooldown = cooldown_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        drain.saturating_add(cooldown)
    }

    /// An honest `Retry-After` for a caller at `place` needing `needs` that
    /// cannot wait now (the queue is full, or its wait ran out): the whole
    /// queue's drain, or its own queue and the limits it needs
    /// ([`Self::queued_wait`]), whichever is longer. Without limits its own
    /// partition's cooldown is enough: no walk of a full queue.
    pub fn retry_after(&self, place: Place, needs: &Needs, now: Instant) -> Duration {
        let drain = self.estimate_wait(now);
        if !needs.is_empty() {
            return drain.max(self.queued_wait(place, needs, now));
        }
        let cooldown = self.partitions.get(&place.partition).and_then(|p| p.pacing.cooldown_until());
        drain.max(cooldown.map_or(Duration::ZERO, |until| until.saturating_duration_since(now)))
    }

    /// The least a new caller at `place` needing `needs` will wait, at the
    /// pace of the moment: the callers certainly served before it (its own
    /// FIFO) leave in turn, each taking a unit of the partition's own
    /// quotas and its costs of the endpoint limits and token quotas, on
    /// each quota's schedule as it stands ([`Pacing::floor`]); one whose
    /// deadline comes before its turn would time out and takes nothing.
    /// Slots out for the shared limiter's verdict may come back: not
    /// counted. Reservations count as reserved: what settling gives back
    /// later is not known yet. What no quota counts (the concurrency bound,
    /// other FIFOs, answers not in yet) is not counted either, nor are
    /// callers beyond the first [`WALK_LIMIT`] ahead.
    fn queued_wait(&self, place: Place, needs: &Needs, now: Instant) -> Duration {
        let Some(partition) = self.partitions.get(&place.partition) else { return Duration::ZERO };
        let (slots, taken) = match &self.confirming {
            Some(out) if out.key.partition == place.partition => (out.slots, &out.needs),
            _ => (0, &Needs::default()),
        };
        // Every time in ns since the core's epoch, as deadlines are kept.
        let own = partition.pacing.floor(now).without(slots).rebased(self.epoch);
        let limits = needs.iter().filter_map(|(index, _)| {
            let floor = partition.limits.get(index)?.floor(now).without(taken.units_of(index));
            Some((index, floor.rebased(self.epoch), 0))
        });
        let mut limits: SmallVec<[(usize, Floor, u64); 2]> = limits.collect();
        let leaves = |count: u64, limits: &[(usize, Floor, u64)]| {
            limits.iter().map(|(_, floor, units)| floor.ns(*units)).fold(own.ns(count), i128::max)
        };
        let mut count = 0;
        for entry in partition.ahead(needs.set(), (place.caller, place.priority), WALK_LIMIT) {
            if leaves(count, &limits).saturating_add(SKIP_MARGIN) > i128::from(entry.deadline) * 1_000_000 {
                continue;
            }
            count += 1;
            for (index, _, units) in &mut limits {
                *units += entry.needs.units_of(*index);
            }
        }
        let at = limits.iter().map(|(_, floor, units)| floor.at(*units)).fold(own.at(count), Instant::max);
        at.saturating_duration_since(now)
    }

    /// A new caller whose [`Self::queued_wait`] already exceeds what it may
    /// wait (until `deadline`) is answered at once, with that wait as its
    /// `Retry-After`, instead of holding a place it cannot use.
    fn hopeless(&self, place: Place, needs: &Needs, deadline: Instant, now: Instant) -> Option<Refusal> {
        let wait = self.queued_wait(place, needs, now);
        (wait > deadline.saturating_duration_since(now))
            .then_some(Refusal::Timeout { waited: Duration::ZERO, retry_after: wait })
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
        self.partitions.insert(key, Partition::new(&self.limits, now));
        true
    }

    /// Drops the least recently used partition that nobody waits in and
    /// that is not cooling down, so that keys seen once (a client making up
    /// `partition_by` values, say) cannot lock new keys out for a whole
    /// quota window. The price: the dropped key's pacer forgets its recent
    /// grants, so if it comes back it may use its burst again. False when
    /// every partition has waiters or cools down.
    fn evict_least_recent(&mut self, now: Instant) -> bool {
        let confirming = self.confirming.as_ref().map(|out| out.key.partition);
        let evictable = self.partitions.iter().filter(|(key, partition)| {
            **key != SINGLE && Some(**key) != confirming && partition.is_empty() && !partition.cooling(now)
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

    /// Queue `key`'s next waiter still waiting, granted: it counts in
    /// flight and its partition records the grant. `None`: all had gone.
    fn hand_out(&mut self, key: QueueKey, now: Instant) -> Option<W> {
        let partition = self.partitions.get_mut(&key.partition)?;
        while let Some(entry) = partition.pop(key.set) {
            self.held -= 1;
            if entry.waiter.gone() {
                self.departed = self.departed.saturating_sub(1);
                continue;
            }
            partition.record_grant(&entry.needs, now);
            self.tokens.granted(&self.limits.tokens, &entry.needs, now);
            self.in_flight += 1;
            if let Some(breaker) = &mut self.breaker {
                breaker.granted();
            }
            return Some(entry.waiter);
        }
        None
    }

    /// Puts queue `key` back in the ring if callers still wait there; an
    /// empty one leaves it until a new waiter brings it back.
    fn requeue(&mut self, key: QueueKey) {
        if self.partitions.get(&key.partition).is_some_and(|p| p.has_waiters(key.set)) {
            self.ready.push_back(key);
        }
    }

    fn give_back(&mut self, key: u64, slots: Vec<Slots>) {
        if let Some(partition) = self.partitions.get_mut(&key) {
            partition.give_back(slots);
        }
    }

    /// Departed callers stay queued until reached; bound that leftover by
    /// dropping them once they outnumber the queue bound.
    fn purge_departed(&mut self) {
        if self.held <= self.limits.queue_size.saturating_mul(2).saturating_add(64) {
            return;
        }
        for partition in self.partitions.values_mut() {
            partition.retain(|waiter| !waiter.gone());
        }
        let partitions = &self.partitions;
        self.ready.retain(|key| partitions.get(&key.partition).is_some_and(|p| p.has_waiters(key.set)));
        let held = self.partitions.values().map(Partition::len).sum();
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

/// A [`Confirm`] that is out, and what it took that may yet go back: slots
/// of its partition's own quotas, and the needs of its head.
#[derive(Debug)]
struct Out {
    key: QueueKey,
    slots: u64,
    needs: Needs,
}

/// The most callers ahead that a new caller's honest wait looks at: the
/// walk runs under the core's lock, a few ns a caller (about 8 µs for a
/// full walk, where 10 000 took 80 µs). A caller behind more only counts
/// these, so it may queue and learn at its deadline, as before honest waits.
const WALK_LIMIT: usize = 2_048;

/// How close to its deadline a caller ahead's turn may come and still
/// count as given up, in ns: a turn may be presented up to
/// [`crate::limit::pacer::GUARD`] (2 ms) early and timers wake about 1 ms
/// late, and skipping a caller who makes it after all only shortens the
/// newcomer's honest wait, never lengthens it.
const SKIP_MARGIN: i128 = 3_000_000;

/// `at` in ms since `epoch`, saturating.
fn since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

/// What serving one queue came to.
enum Served<W> {
    Grant(W),
    Confirm(Confirm),
    /// It cannot go before this instant.
    Later(Instant),
    /// Nobody there was still waiting.
    Nobody,
}
