//! The response cache of an upstream: answers kept under RFC 9111's rules,
//! revalidated when stale, and identical GETs in flight coalesced.
//!
//! Every repeated GET it answers costs no quota; a revalidation costs one
//! request that APIs such as GitHub do not count when it draws a 304; and
//! coalescing turns a crowd of identical requests into one queue place.
//! It keeps one private cache per credential ([`key`]), bounded in bytes
//! ([`store`]); the fetch that callers share is a [`flight`]; the writes
//! that invalidated entries are remembered for the fetches under way
//! ([`writes`]). The request path that uses them is `proxy::cached`.

pub mod conditional;
pub mod flight;
pub mod key;
pub mod store;
pub mod writes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};

use crate::config::{self, KeySource};
use crate::metrics::UpstreamMetrics;
use flight::{Flight, Waiter};
use key::{Key, Keyer};
use store::{Seen, Store};
use writes::{Mark, Writes};

/// Answer header saying what the cache did: `hit`, `miss`, `revalidated`,
/// `coalesced` or `bypass`.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-pacegate-cache");

/// What the cache did for one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from a fresh entry: nothing sent.
    Hit,
    /// Fetched (and stored when allowed).
    Miss,
    /// A stale entry confirmed by a 304 and served.
    Revalidated,
    /// Shared the answer of an identical request in flight.
    Coalesced,
    /// Not a request the cache answers (not a GET, or the caller said so).
    Bypass,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [Self::Hit, Self::Miss, Self::Revalidated, Self::Coalesced, Self::Bypass];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Revalidated => "revalidated",
            Self::Coalesced => "coalesced",
            Self::Bypass => "bypass",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// A caller's part in a fetch.
pub enum Joined {
    /// It starts the fetch, which it must run for the flight.
    Leader(Arc<Flight>, Waiter),
    /// It waits for a fetch already under way, counted while it follows.
    Follower(Waiter, Following),
}

/// Counts a caller waiting for someone else's fetch, until dropped.
pub struct Following(Arc<AtomicUsize>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cache of one upstream; kept across reloads like its dispatcher.
#[derive(Debug)]
pub struct Cache {
    pub keyer: Keyer,
    store: ArcSwap<Store>,
    settings: ArcSwap<config::Cache>,
    /// Fetches under way that more callers may join, by flight key, with
    /// the entry each is for.
    flights: Mutex<HashMap<Key, (Arc<Flight>, Key)>>,
    /// Callers waiting for someone else's fetch, bounded like the queue.
    followers: Arc<AtomicUsize>,
    counts: [AtomicU64; 5],
    metrics: Arc<UpstreamMetrics>,
    /// Writes that invalidated entries, for the fetches under way.
    writes: Writes,
}

/// `/status` of a cache.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CacheStatus {
    pub entries: u64,
    pub bytes: u64,
    pub max_size: u64,
    pub hits: u64,
    pub misses: u64,
    pub revalidated: u64,
    pub coalesced: u64,
    pub bypass: u64,
    /// Share of cacheable requests answered without a full fetch.
    pub hit_ratio: f64,
    /// Requests that took no quota: hits and coalesced waiters.
    pub quota_saved: u64,
}

impl Cache {
    pub fn new(upstream: &config::Upstream, settings: config::Cache, metrics: Arc<UpstreamMetrics>) -> Self {
        let partition_header = match &upstream.partition_by {
            Some(KeySource::Header(name)) => Some(name.clone()),
            _ => None,
        };
        for outcome in Outcome::ALL {
            metrics.cache_series(outcome.as_str());
        }
        Self {
            keyer: Keyer::new(partition_header),
            store: ArcSwap::from_pointee(Store::new(settings.max_size, settings.max_object)),
            settings: ArcSwap::from_pointee(settings),
            flights: Mutex::default(),
            followers: Arc::default(),
            counts: Default::default(),
            metrics,
            writes: Writes::default(),
        }
    }

    /// Takes new settings on reload, keeping what still fits.
    pub fn reconfigure(&self, settings: config::Cache) {
        if **self.settings.load() != settings {
            let store = self.store.load().resized(settings.max_size, settings.max_object);
            self.store.store(Arc::new(store));
            self.settings.store(Arc::new(settings));
        }
    }

    /// A write to `key` went through: what is stored for it goes, a fetch
    /// under way for it will not be stored, and GETs from now on do not
    /// join such a fetch: they fetch anew.
    pub fn invalidate(&self, key: Key) {
        self.writes.record(key);
        self.store().invalidate(&key);
        self.flights().retain(|_, (_, entry)| *entry != key);
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Arc<Flight>, Key)>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Taken before a fetch is sent: see [`Self::may_store`].
    pub fn mark(&self) -> Mark {
        self.writes.mark()
    }

    /// Whether an answer to `key` fetched from `mark` on may be stored: no
    /// write to `key` went through meanwhile.
    pub fn may_store(&self, key: &Key, mark: Mark) -> bool {
        !self.writes.since(key, mark)
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.load_full()
    }

    pub fn coalesces(&self) -> bool {
        self.settings.load().coalesce
    }

    /// Joins the fetch under way for `flight` (a fetch of `entry`), or
    /// starts one (registered for others to join when coalescing). A
    /// follower beyond `bound` waiting at once gets `None`. A fetch that
    /// takes no more waiters (closed, or abandoned by all of its own) is
    /// replaced by a new one.
    pub fn join(&self, (flight, entry): (Option<Key>, Key), bound: usize) -> Option<Joined> {
        let Some(key) = flight else {
            let (flight, waiter) = Flight::start();
            return Some(Joined::Leader(flight, waiter));
        };
        let mut flights = self.flights();
        if let Some((under_way, _)) = flights.get(&key) {
            if self.followers.load(Ordering::Relaxed) >= bound {
                return None;
            }
            if let Some(waiter) = under_way.try_wait() {
                // Counted under the map's lock, so that `bound` holds.
                self.followers.fetch_add(1, Ordering::Relaxed);
                return Some(Joined::Follower(waiter, Following(self.followers.clone())));
            }
        }
        let (flight, waiter) = Flight::start();
        flights.insert(key, (flight.clone(), entry));
        Some(Joined::Leader(flight, waiter))
    }

    /// Takes `flight` off the map (it ended, or takes no more callers).
    pub fn land(&self, key: Key, flight: &Arc<Flight>) {
        let mut flights = self.flights();
        if flights.get(&key).is_some_and(|(registered, _)| Arc::ptr_eq(registered, flight)) {
            flights.remove(&key);
        }
    }

    pub fn count(&self, outcome: Outcome) {
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics.count_cache(outcome.as_str());
    }

    /// Empties the store; returns how many entries it held.
    pub fn purge(&self) -> u64 {
        self.store.load().purge()
    }

    pub fn status(&self) -> CacheStatus {
        let (entries, bytes) = self.store.load().usage();
        let count = |outcome: Outcome| self.counts[outcome as usize].load(Ordering::Relaxed);
        let (hits, misses, revalidated, coalesced, bypass) = (
            count(Outcome::Hit),
            count(Outcome::Miss),
            count(Outcome::Revalidated),
            count(Outcome::Coalesced),
            count(Outcome::Bypass),
        );
        let answered = hits + revalidated + coalesced;
        let cacheable = answered + misses;
        CacheStatus {
            entries,
            bytes,
            max_size: self.settings.load().max_size,
            hits,
            misses,
            revalidated,
            coalesced,
            bypass,
            hit_ratio: if cacheable == 0 { 0.0 } else { answered as f64 / cacheable as f64 },
            quota_saved: hits + coalesced,
        }
    }

    /// The request as the cache keeps and judges it: no credentials, no body.
    pub fn seen(&self, head: &http::request::Parts) -> Seen {
        let mut seen = http::Request::new(());
        *seen.method_mut() = head.method.clone();
        *seen.uri_mut() = head.uri.clone();
        *seen.headers_mut() = self.keyer.without_credentials(&head.headers);
        seen
    }
}
