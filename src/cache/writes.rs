//! The writes that invalidated stored answers, remembered so that a GET
//! fetched before one is not stored after it.
//!
//! A GET under way while a PUT to the same URL succeeds may bring back what
//! was there before the PUT; stored once the PUT has invalidated the entry,
//! it would be served, stale, for as long as it is fresh. A fetch takes a
//! [`Mark`] before it is sent and stores its answer only if no write to its
//! key came after the mark ([`Writes::since`]).
//!
//! Bounded: the last [`RECENT`] writes are kept. A fetch older than all of
//! them cannot tell which keys were written, and is told "written" (its
//! answer is served, not stored).

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use super::key::Key;

/// Writes remembered; a fetch that saw more than this many writes to any
/// key go by does not store its answer.
pub const RECENT: usize = 1024;

/// How many writes had been counted when a fetch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(u64);

/// The recent writes of one cache.
#[derive(Debug, Default)]
pub struct Writes {
    log: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    /// Writes counted so far; the next one is number `count + 1`.
    count: u64,
    /// The last [`RECENT`] writes and their numbers, oldest first.
    recent: VecDeque<(Key, u64)>,
}

impl Writes {
    /// Where the count stands: taken before a fetch is sent.
    pub fn mark(&self) -> Mark {
        Mark(self.lock().count)
    }

    /// A write to `key` went through.
    pub fn record(&self, key: Key) {
        let mut log = self.lock();
        log.count += 1;
        let number = log.count;
        if log.recent.len() == RECENT {
            log.recent.pop_front();
        }
        log.recent.push_back((key, number));
    }

    /// Whether `key` may have been written since `mark`: a write to it was
    /// recorded after the mark, or too many writes went by to tell.
    pub fn since(&self, key: &Key, mark: Mark) -> bool {
        let log = self.lock();
        if log.count == mark.0 {
            return false;
        }
        let forgotten = log.recent.front().is_some_and(|(_, first)| *first > mark.0 + 1);
        forgotten || log.recent.iter().rev().take_while(|(_, n)| *n > mark.0).any(|(k, _)| k == key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::Keyer;
    use super::*;

    /// Keys of one keyer, by number: `/1`, `/2`.
    fn keys() -> impl Fn(u8) -> Key {
        let keyer = Keyer::new(None);
        move |n| {
            let request = http::Request::get(format!("http://a/{n}")).body(()).expect("a request");
            keyer.entry(&request.into_parts().0)
        }
    }

    #[test]
    fn a_write_after_the_mark_counts_for_its_key_only() {
        let key = keys();
        let writes = Writes::default();
        writes.record(key(1));
        let mark = writes.mark();
        assert!(!writes.since(&key(1), mark), "the write before the mark does not count");
        writes.record(key(2));
        assert!(!writes.since(&key(1), mark), "another key's write does not count");
        assert!(writes.since(&key(2), mark));
        writes.record(key(1));
        assert!(writes.since(&key(1), mark));
    }

    #[test]
    fn a_mark_older_than_every_write_remembered_is_told_written() {
        let key = keys();
        let writes = Writes::default();
        let mark = writes.mark();
        for _ in 0..RECENT {
            writes.record(key(2));
        }
        assert!(!writes.since(&key(1), mark), "all writes since the mark are still known");
        writes.record(key(2));
        assert!(writes.since(&key(1), mark), "the first write since the mark is forgotten");
        let later = writes.mark();
        assert!(!writes.since(&key(1), later));
    }
}
