//! One partition: its queues (one per set of endpoint limits, see
//! [`super::needs`]) and the pacing of each quota its requests take from.
//!
//! Its own quotas ([`Pacing`]) pace every request; each endpoint limit has a
//! [`Pacing`] of its own (its quotas, cooldown and hints), so that a 429 for
//! one limit pauses that limit only. A request leaves only when its
//! partition's quotas and every limit it needs admit it now; units taken
//! from some are given back when another refuses.

use std::num::NonZeroU32;

use tokio::time::Instant;

use super::needs::{LimitSet, Needs};
use super::schedule::{Priority, Schedule};
use super::{Limits, Pacing, Waiter};
use crate::limit::pacer::Taken;

/// A queued request: the caller's waiter and what it needs.
#[derive(Debug)]
pub struct Entry<W> {
    pub waiter: W,
    pub needs: Needs,
    /// When its caller stops waiting, in ms since the core's epoch;
    /// `u64::MAX`: never. (A u32 would save nothing, the entry being padded
    /// to 8 bytes, and would run out after 49 days of uptime.)
    pub deadline: u64,
}

/// Units taken for one attempt: one of the partition's own quotas, and its
/// cost from each endpoint limit it needs.
#[derive(Debug)]
#[must_use = "taken units are either used or given back"]
pub struct Slots {
    own: Taken,
    limits: Vec<(usize, Taken)>,
}

impl Slots {
    /// Slots of the partition's own quotas only.
    pub fn own(own: Taken) -> Self {
        Self { own, limits: Vec::new() }
    }
}

/// A partition's queues and pacing. See the module doc.
pub struct Partition<W> {
    /// Waiters by the set of limits they need, each in serving order. An
    /// upstream has few sets in use: a short list beats a map.
    queues: Vec<(LimitSet, Schedule<Entry<W>>)>,
    /// The partition's own quotas.
    pub pacing: Pacing,
    /// Each endpoint limit's quotas, by index.
    pub limits: Vec<Pacing>,
}

impl<W: Waiter> Partition<W> {
    pub fn new(limits: &Limits, now: Instant) -> Self {
        Self {
            queues: Vec::new(),
            pacing: Pacing::new(&limits.quotas, now),
            limits: limits.endpoints.iter().map(|e| Pacing::new(&e.quotas, now)).collect(),
        }
    }

    /// Waiters held, gone ones included until reached.
    pub fn len(&self) -> usize {
        self.queues.iter().map(|(_, queue)| queue.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(|(_, queue)| queue.is_empty())
    }

    /// Nothing waits and no quota holds state: dropping it loses nothing.
    pub fn idle(&self, now: Instant) -> bool {
        self.is_empty() && self.pacing.idle(now) && self.limits.iter().all(|l| l.idle(now))
    }

    /// Something pauses this partition or one of its limits: its state must stay.
    pub fn cooling(&self, now: Instant) -> bool {
        self.pacing.cooling(now) || self.limits.iter().any(|l| l.cooling(now))
    }

    /// Queues a waiter (a `retry` at the head of its caller's lane); true
    /// when its queue was empty, so the queue must join the ring.
    pub fn push(&mut self, (caller, priority): (u64, Priority), entry: Entry<W>, retry: bool) -> bool {
        let Entry { waiter, needs, deadline } = entry;
        let set = needs.set();
        let index = match self.queues.iter().position(|(s, _)| *s == set) {
            Some(index) => index,
            None => {
                self.queues.push((set, Schedule::default()));
                self.queues.len() - 1
            }
        };
        let queue = &mut self.queues[index].1;
        let was_empty = queue.is_empty();
        let entry = Entry { waiter, needs, deadline };
        if retry {
            queue.push_front(caller, priority, entry);
        } else {
            queue.push_back(caller, priority, entry);
        }
        was_empty
    }

    fn queue(&mut self, set: LimitSet) -> Option<&mut Schedule<Entry<W>>> {
        self.queues.iter_mut().find(|(s, _)| *s == set).map(|(_, queue)| queue)
    }

    /// The live waiters among the first `at_most` that a new one at
    /// (`caller`, `priority`) in queue `set` would certainly follow: its
    /// own FIFO, served before it whatever else happens.
    pub fn ahead(
        &self,
        set: LimitSet,
        (caller, priority): (u64, Priority),
        at_most: usize,
    ) -> impl Iterator<Item = &Entry<W>> {
        let queue = self.queues.iter().find(|(s, _)| *s == set).map(|(_, queue)| queue);
        let ahead = queue.into_iter().flat_map(move |queue| queue.ahead(caller, priority));
        ahead.take(at_most).filter(|entry| !entry.waiter.gone())
    }

    /// Waiters in queue `set`.
    pub fn waiting_in(&self, set: LimitSet) -> usize {
        self.queues.iter().find(|(s, _)| *s == set).map_or(0, |(_, queue)| queue.len())
    }

    /// What the next waiter of queue `set` still waiting needs, after
    /// dropping the gone ones before it (their number is returned too).
    pub fn head(&mut self, set: LimitSet) -> (Option<Needs>, usize) {
        let Some(queue) = self.queue(set) else { return (None, 0) };
        let mut dropped = 0;
        while let Some(entry) = queue.peek() {
            if !entry.waiter.gone() {
                return (Some(entry.needs.clone()), dropped);
            }
            drop(queue.pop());
            dropped += 1;
        }
        (None, dropped)
    }

    /// The next entry of queue `set` (gone or not).
    pub fn pop(&mut self, set: LimitSet) -> Option<Entry<W>> {
        self.queue(set)?.pop()
    }

    /// Queue `set` still holds waiters.
    pub fn has_waiters(&self, set: LimitSet) -> bool {
        self.waiting_in(set) > 0
    }

    /// Sets of the queues holding waiters.
    pub fn waiting_sets(&self) -> impl Iterator<Item = LimitSet> + '_ {
        self.queues.iter().filter(|(_, queue)| !queue.is_empty()).map(|(set, _)| *set)
    }

    /// Takes what `needs` asks for at `now` from every quota, or from none,
    /// saying when all of them could admit it.
    pub fn take(&mut self, name: &str, needs: &Needs, now: Instant) -> Result<Slots, Instant> {
        let own = self.pacing.admit(name, now, NonZeroU32::MIN)?;
        let mut slots = Slots::own(own);
        let mut refused: Option<Instant> = None;
        for (index, units) in needs.iter() {
            let Some(limit) = self.limits.get_mut(index) else { continue };
            match limit.admit(name, now, units) {
                Ok(taken) => slots.limits.push((index, taken)),
                Err(at) => refused = Some(refused.map_or(at, |r| r.max(at))),
            }
        }
        match refused {
            None => Ok(slots),
            Some(at) => {
                self.give_back(vec![slots]);
                Err(at)
            }
        }
    }

    /// Gives back units that were taken but not used, latest first.
    pub fn give_back(&mut self, slots: Vec<Slots>) {
        for slot in slots.into_iter().rev() {
            for (index, taken) in slot.limits.into_iter().rev() {
                if let Some(limit) = self.limits.get_mut(index) {
                    limit.give_back(vec![taken]);
                }
            }
            self.pacing.give_back(vec![slot.own]);
        }
    }

    /// Records a grant for a request with `needs`.
    pub fn record_grant(&mut self, needs: &Needs, now: Instant) {
        self.pacing.record_grant(now);
        for (index, _) in needs.iter() {
            if let Some(limit) = self.limits.get_mut(index) {
                limit.record_grant(now);
            }
        }
    }

    /// Keeps the first `keep` live waiters (each queue in its serving
    /// order, one queue after another) and returns the others, with the
    /// number of departed entries dropped on the way.
    pub fn keep_first(&mut self, keep: usize) -> (Vec<W>, usize) {
        let mut kept = 0;
        self.sift(|_| {
            kept += 1;
            kept <= keep
        })
    }

    /// Returns the live waiters whose deadline is before `deadline` (ms
    /// since the core's epoch), with the number of departed entries dropped.
    pub fn due_before(&mut self, deadline: u64) -> (Vec<W>, usize) {
        self.sift(|entry| entry.deadline >= deadline)
    }

    /// Keeps the live waiters for which `keep` holds (asked in each queue's
    /// serving order, one queue after another), returns the others and the
    /// number of departed entries dropped.
    fn sift(&mut self, mut keep: impl FnMut(&Entry<W>) -> bool) -> (Vec<W>, usize) {
        let (mut refused, mut gone) = (Vec::new(), 0);
        for (_, queue) in &mut self.queues {
            let mut kept = Vec::new();
            while let Some((caller, priority, entry)) = queue.pop_placed() {
                if entry.waiter.gone() {
                    gone += 1;
                } else if keep(&entry) {
                    kept.push((caller, priority, entry));
                } else {
                    refused.push(entry.waiter);
                }
            }
            // Queued again in the order they would have been served.
            for (caller, priority, entry) in kept {
                queue.push_back(caller, priority, entry);
            }
        }
        (refused, gone)
    }

    /// Keeps only the waiters for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&W) -> bool) {
        for (_, queue) in &mut self.queues {
            queue.retain(|entry| keep(&entry.waiter));
        }
        self.queues.retain(|(_, queue)| !queue.is_empty());
    }

    /// Waiters for which `matches` holds.
    pub fn count(&self, mut matches: impl FnMut(&W) -> bool) -> usize {
        self.queues.iter().map(|(_, queue)| queue.count(|entry| matches(&entry.waiter))).sum()
    }

    /// Every waiter, in no particular order; the queues are left empty.
    pub fn drain(&mut self) -> impl Iterator<Item = W> + '_ {
        self.queues.drain(..).flat_map(|(_, queue)| queue.into_entries().map(|(_, _, e)| e.waiter))
    }

    /// Waiters per active caller, over every queue (a caller in several
    /// queues counts in each).
    pub fn caller_depths(&self) -> impl Iterator<Item = usize> + '_ {
        self.queues.iter().flat_map(|(_, queue)| queue.caller_depths())
    }

    /// Takes reloaded limits: a limit that kept its name keeps its pacing
    /// (and its state, if its quotas are the same); queued requests keep
    /// what they need of the limits that remain. `from` is the old limits'
    /// names, by index.
    pub fn relimit(&mut self, from: &[String], limits: &Limits, now: Instant) {
        let mut old: Vec<Option<Pacing>> = self.limits.drain(..).map(Some).collect();
        for endpoint in &limits.endpoints {
            let kept = from.iter().position(|name| *name == endpoint.name).and_then(|i| old[i].take());
            let mut pacing = kept.unwrap_or_else(|| Pacing::new(&endpoint.quotas, now));
            pacing.requota(&endpoint.quotas);
            self.limits.push(pacing);
        }
        let to = |old: usize| {
            let name = from.get(old)?;
            limits.endpoints.iter().position(|e| e.name == *name)
        };
        let queues = std::mem::take(&mut self.queues);
        for (_, queue) in queues {
            for (caller, priority, entry) in queue.into_entries() {
                let needs = entry.needs.renumbered(to);
                self.push((caller, priority), Entry { needs, ..entry }, false);
            }
        }
    }
}
