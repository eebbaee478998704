//! The order in which one partition's waiters are served: round-robin between
//! callers (`fair_by`), priority lanes inside each caller.
//!
//! Why this shape:
//! * **Round-robin over callers, FIFO inside a caller.** Each active caller
//!   has its own sub-queue; the ring of active callers is served one grant per
//!   turn. A caller with 10 000 waiters and one with a single waiter then
//!   alternate, so the single request waits at most one pacing slot per
//!   active caller, and every caller still sees its own requests in order.
//!   Each decision is O(1): pop the caller at the ring's front, rotate it.
//! * **Priority lanes inside a caller** (high, normal, low): the highest
//!   non-empty lane goes first, except that a lane passed over
//!   [`STARVE_AFTER`] times in a row is served next. Under a flood of highs,
//!   low still gets one grant in `STARVE_AFTER + 1`: never starved, and the
//!   bound is a count, not a clock, so it holds at any pace.
//! * **Retries keep their place**: [`Schedule::push_front`] puts a retry at
//!   the head of its lane, and a caller that had left the ring re-enters it at
//!   the front (it already waited its turn once).
//!
//! Without `fair_by` every waiter has the same caller key, so this is one
//! FIFO per priority: the common path stays a couple of deque operations.

use std::collections::{HashMap, VecDeque};

/// A lane passed over this many times in a row is served next.
pub const STARVE_AFTER: u32 = 4;

/// Order within a caller (`x-pacegate-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Parses the header value; `None` for anything but `high|normal|low`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Self::High),
            "normal" => Some(Self::Normal),
            "low" => Some(Self::Low),
            _ => None,
        }
    }

    fn lane(self) -> usize {
        match self {
            Self::High => 0,
            Self::Normal => 1,
            Self::Low => 2,
        }
    }

    fn of_lane(lane: usize) -> Self {
        match lane {
            0 => Self::High,
            1 => Self::Normal,
            _ => Self::Low,
        }
    }
}

/// One caller's waiters, one FIFO per priority.
#[derive(Debug)]
struct Lanes<T> {
    lanes: [VecDeque<T>; 3],
    /// Grants in a row that went to a higher lane while this one waited.
    passed_over: [u32; 3],
}

impl<T> Lanes<T> {
    fn new() -> Self {
        Self { lanes: Default::default(), passed_over: [0; 3] }
    }

    fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    /// The lane served next: the highest non-empty one, unless a lower one
    /// was passed over too often.
    fn chosen(&self) -> Option<usize> {
        let waiting = |lane: usize| !self.lanes[lane].is_empty();
        let starved = (0..3).rev().find(|&l| waiting(l) && self.passed_over[l] >= STARVE_AFTER);
        starved.or_else(|| (0..3).find(|&l| waiting(l)))
    }

    fn peek(&self) -> Option<&T> {
        self.lanes[self.chosen()?].front()
    }

    /// The next waiter and the lane it was in.
    fn pop(&mut self) -> Option<(usize, T)> {
        let waiting = |lane: usize| !self.lanes[lane].is_empty();
        let chosen = self.chosen()?;
        for lane in chosen + 1..3 {
            if waiting(lane) {
                self.passed_over[lane] += 1;
            }
        }
        self.passed_over[chosen] = 0;
        self.lanes[chosen].pop_front().map(|waiter| (chosen, waiter))
    }
}

/// Waiters of one partition, in serving order.
#[derive(Debug)]
pub struct Schedule<T> {
    /// Sub-queues of callers with at least one waiter, by hashed caller key.
    callers: HashMap<u64, Lanes<T>>,
    /// Active callers in round-robin order; the front is served next.
    ring: VecDeque<u64>,
    /// Waiters held, gone ones included until they are reached.
    len: usize,
}

impl<T> Default for Schedule<T> {
    fn default() -> Self {
        Self { callers: HashMap::new(), ring: VecDeque::new(), len: 0 }
    }
}

impl<T> Schedule<T> {
    /// A new waiter, at the back of its caller's lane.
    pub fn push_back(&mut self, caller: u64, priority: Priority, waiter: T) {
        let lanes = self.callers.entry(caller).or_insert_with(|| {
            self.ring.push_back(caller);
            Lanes::new()
        });
        lanes.lanes[priority.lane()].push_back(waiter);
        self.len += 1;
    }

    /// A retry, at the head of its caller's lane; a caller that had no
    /// waiters left is served first.
    pub fn push_front(&mut self, caller: u64, priority: Priority, waiter: T) {
        let lanes = self.callers.entry(caller).or_insert_with(|| {
            self.ring.push_front(caller);
            Lanes::new()
        });
        lanes.lanes[priority.lane()].push_front(waiter);
        self.len += 1;
    }

    /// The next waiter: the front caller's best lane; that caller then goes
    /// to the back of the ring.
    pub fn pop(&mut self) -> Option<T> {
        self.pop_placed().map(|(_, _, waiter)| waiter)
    }

    /// [`Self::pop`], with the caller and priority the waiter was queued
    /// under, so that it can be queued again in the same place.
    pub fn pop_placed(&mut self) -> Option<(u64, Priority, T)> {
        while let Some(caller) = self.ring.pop_front() {
            let Some(lanes) = self.callers.get_mut(&caller) else { continue };
            let popped = lanes.pop();
            if lanes.len() == 0 {
                self.callers.remove(&caller);
            } else {
                self.ring.push_back(caller);
            }
            if let Some((lane, waiter)) = popped {
                self.len -= 1;
                return Some((caller, Priority::of_lane(lane), waiter));
            }
        }
        None
    }

    /// The waiter [`Self::pop`] would return.
    pub fn peek(&self) -> Option<&T> {
        let mut callers = self.ring.iter().filter_map(|caller| self.callers.get(caller));
        callers.find_map(Lanes::peek)
    }

    /// Every waiter with its caller and priority: each caller's lanes in
    /// order, callers in ring order.
    pub fn into_entries(mut self) -> impl Iterator<Item = (u64, Priority, T)> {
        let ring = std::mem::take(&mut self.ring);
        ring.into_iter()
            .filter_map(move |caller| self.callers.remove(&caller).map(|lanes| (caller, lanes)))
            .flat_map(|(caller, lanes)| {
                let [high, normal, low] = lanes.lanes;
                let lane = |priority: Priority, lane: VecDeque<T>| {
                    lane.into_iter().map(move |t| (caller, priority, t))
                };
                lane(Priority::High, high)
                    .chain(lane(Priority::Normal, normal))
                    .chain(lane(Priority::Low, low))
            })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the waiters for which `keep` holds (drops gone callers).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for lanes in self.callers.values_mut() {
            for lane in &mut lanes.lanes {
                lane.retain(&mut keep);
            }
        }
        self.callers.retain(|_, lanes| lanes.len() > 0);
        let callers = &self.callers;
        self.ring.retain(|caller| callers.contains_key(caller));
        self.len = self.callers.values().map(Lanes::len).sum();
    }

    /// Waiters for which `matches` holds.
    pub fn count(&self, mut matches: impl FnMut(&T) -> bool) -> usize {
        let lanes = self.callers.values().flat_map(|lanes| lanes.lanes.iter());
        lanes.flat_map(|lane| lane.iter()).filter(|waiter| matches(waiter)).count()
    }

    /// The waiters a new one of `caller` at `priority` would queue behind
    /// in its own FIFO: served before it whatever else happens.
    pub fn ahead(&self, caller: u64, priority: Priority) -> impl Iterator<Item = &T> {
        let lanes = self.callers.get(&caller);
        lanes.into_iter().flat_map(move |lanes| lanes.lanes[priority.lane()].iter())
    }

    /// Waiters per active caller, without the caller keys.
    pub fn caller_depths(&self) -> impl Iterator<Item = usize> + '_ {
        self.callers.values().map(Lanes::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_between_callers_fifo_within() {
        let mut s = Schedule::default();
        for i in 0..1000 {
            s.push_back(1, Priority::Normal, (1, i));
        }
        for i in 0..5 {
            s.push_back(2, Priority::Normal, (2, i));
        }
        let first: Vec<_> = (0..10).map(|_| s.pop().unwrap()).collect();
        let second: Vec<_> = first.iter().filter(|(c, _)| *c == 2).map(|(_, i)| *i).collect();
        assert_eq!(second, vec![0, 1, 2, 3, 4], "caller 2 served every other grant, in order: {first:?}");
        let heavy: Vec<_> = first.iter().filter(|(c, _)| *c == 1).map(|(_, i)| *i).collect();
        assert_eq!(heavy, vec![0, 1, 2, 3, 4]);
        assert_eq!(s.len(), 995);
        assert_eq!(s.caller_depths().collect::<Vec<_>>(), vec![995]);
    }

    #[test]
    fn high_first_but_low_never_starved() {
        let mut s = Schedule::default();
        for i in 0..3 {
            s.push_back(0, Priority::Low, ('l', i));
        }
        for i in 0..20 {
            s.push_back(0, Priority::High, ('h', i));
        }
        s.push_back(0, Priority::Normal, ('n', 0));
        let order: Vec<char> = (0..24).map(|_| s.pop().unwrap().0).collect();
        assert_eq!(order[0], 'h', "high jumps ahead of earlier lows");
        let first_low = order.iter().position(|c| *c == 'l').unwrap();
        assert!(first_low <= STARVE_AFTER as usize + 1, "low served within a bounded number: {order:?}");
        let lows_in_15 = order[..15].iter().filter(|c| **c == 'l').count();
        assert!(lows_in_15 >= 2, "low keeps progressing under a stream of highs: {order:?}");
        assert!(s.is_empty());
    }

    #[test]
    fn retry_goes_back_to_the_head_of_its_caller() {
        let mut s = Schedule::default();
        s.push_back(1, Priority::Normal, 'a');
        s.push_back(1, Priority::Normal, 'b');
        s.push_back(2, Priority::Normal, 'x');
        assert_eq!(s.pop(), Some('a'));
        s.push_front(1, Priority::Normal, 'r');
        // Caller 2's turn, then caller 1's retry before its later request.
        assert_eq!(s.pop(), Some('x'));
        assert_eq!(s.pop(), Some('r'));
        assert_eq!(s.pop(), Some('b'));
        assert_eq!(s.pop(), None);
        s.push_back(3, Priority::Normal, 'y');
        s.push_front(4, Priority::Low, 'z');
        assert_eq!(s.pop(), Some('z'), "a returning retry is served before new callers");
    }

    #[test]
    fn peek_shows_what_pop_returns() {
        let mut s = Schedule::default();
        for i in 0..6 {
            s.push_back(i % 2, Priority::Normal, i);
        }
        s.push_back(0, Priority::High, 10);
        s.push_back(1, Priority::Low, 11);
        for _ in 0..8 {
            let peeked = s.peek().copied();
            assert_eq!(peeked, s.pop());
        }
        assert_eq!(s.peek(), None);
    }

    #[test]
    fn into_entries_keeps_callers_and_priorities() {
        let mut s = Schedule::default();
        s.push_back(1, Priority::Low, 'a');
        s.push_back(2, Priority::Normal, 'b');
        s.push_back(1, Priority::High, 'c');
        let entries: Vec<_> = s.into_entries().collect();
        assert_eq!(
            entries,
            vec![(1, Priority::High, 'c'), (1, Priority::Low, 'a'), (2, Priority::Normal, 'b')]
        );
    }

    #[test]
    fn retain_drops_gone_waiters_and_idle_callers() {
        let mut s = Schedule::default();
        s.push_back(1, Priority::Normal, 1);
        s.push_back(2, Priority::Normal, 2);
        s.push_back(2, Priority::High, 3);
        s.retain(|w| *w != 1 && *w != 3);
        assert_eq!(s.len(), 1);
        assert_eq!(s.pop(), Some(2));
        assert!(s.is_empty());
    }
}
