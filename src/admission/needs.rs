//! What one request takes from endpoint limits, and the queues that follow
//! from it.
//!
//! Every request takes one unit of its partition's own quotas; a request
//! that matches endpoint limits (`[[upstream.limit]]`) also takes `cost`
//! units of each. Requests that need the same set of limits queue together,
//! in FIFO order; requests that need different sets queue apart, so a write
//! waiting for a write limit never holds up a read that needs only the
//! upstream's quota (no head-of-line blocking across limits).

use std::num::NonZeroU32;

/// A set of endpoint limits, by index: bit `i` is limit `i`
/// (`config::MAX_LIMITS` fit, and the token quotas after them).
pub type LimitSet = u64;

/// The units a request takes from each endpoint limit it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs(Box<[(u8, NonZeroU32)]>);

impl Needs {
    /// Needs from `(limit index, units)` pairs; an index is kept once (the
    /// first), and indices beyond a [`LimitSet`] are dropped.
    pub fn new(costs: impl IntoIterator<Item = (usize, NonZeroU32)>) -> Self {
        let mut costs: Vec<(u8, NonZeroU32)> = costs
            .into_iter()
            .filter(|(index, _)| *index < LimitSet::BITS as usize)
            .filter_map(|(index, units)| Some((u8::try_from(index).ok()?, units)))
            .collect();
        costs.sort_by_key(|(index, _)| *index);
        costs.dedup_by_key(|(index, _)| *index);
        Self(costs.into_boxed_slice())
    }

    /// The limits needed, as the key of the queue the request waits in.
    pub fn set(&self) -> LimitSet {
        self.0.iter().fold(0, |set, (index, _)| set | 1 << index)
    }

    /// `(limit index, units)`, by index.
    pub fn iter(&self) -> impl Iterator<Item = (usize, NonZeroU32)> + '_ {
        self.0.iter().map(|(index, units)| (usize::from(*index), *units))
    }

    /// Units needed of limit `index` (0 when it is not needed).
    pub fn units_of(&self, index: usize) -> u64 {
        self.iter().find(|(i, _)| *i == index).map_or(0, |(_, units)| u64::from(units.get()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same needs under renumbered limits (a reload): `to(old index)`
    /// is the new index, or `None` for a limit that is gone.
    pub fn renumbered(&self, to: impl Fn(usize) -> Option<usize>) -> Self {
        Self::new(self.iter().filter_map(|(index, units)| Some((to(index)?, units))))
    }
}

/// Which queue a waiter is in: its partition and the limits it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueKey {
    pub partition: u64,
    pub set: LimitSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("test costs are positive")
    }

    #[test]
    fn needs_are_kept_by_index_once() {
        let needs = Needs::new([(3, units(5)), (0, units(1)), (3, units(7)), (70, units(1))]);
        assert_eq!(needs.iter().collect::<Vec<_>>(), vec![(0, units(1)), (3, units(5))]);
        assert_eq!(needs.set(), 0b1001);
        assert_eq!(Needs::default().set(), 0);
        let moved = needs.renumbered(|old| (old == 3).then_some(1));
        assert_eq!(moved.iter().collect::<Vec<_>>(), vec![(1, units(5))]);
    }
}
