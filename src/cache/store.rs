//! Stored answers, bounded by bytes, with the HTTP caching rules of
//! RFC 9111 from `http-cache-semantics`.
//!
//! One entry per [`Key`] (URI and credentials) holds the variants the
//! answers `Vary` on, newest first. The bound is `moka`'s: entries are
//! weighed in bytes and the least valuable (TinyLFU) go first.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};

use super::key::Key;

/// Most variants of one URI kept for one credential.
const MAX_VARIANTS: usize = 8;

/// What an entry costs beyond its headers and body (the policy, the key, the map).
const OVERHEAD_BYTES: u32 = 512;

/// A request as the cache sees it: no body, no credentials, no conditionals
/// of the caller's (see `without_credentials` and `conditional`).
pub type Seen = Request<()>;

/// An answer's head as the cache keeps it: pacegate's own headers taken off.
pub type Answer = http::Response<()>;

/// One stored answer.
#[derive(Debug)]
pub struct Stored {
    policy: CachePolicy,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Stored {
    /// Bytes this answer holds: its body, and its headers twice (the policy keeps a copy).
    fn weight(&self) -> u32 {
        let headers: usize = self.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        let bytes = self.body.len().saturating_add(2 * headers);
        u32::try_from(bytes).unwrap_or(u32::MAX).saturating_add(OVERHEAD_BYTES)
    }

    /// The validators a conditional request for this answer sends, if it has any.
    pub fn validators(&self, seen: &Seen, now: SystemTime) -> Option<HeaderMap> {
        let BeforeRequest::Stale { request, .. } = self.policy.before_request(seen, now) else {
            return None;
        };
        let mut validators = HeaderMap::new();
        for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
            if let Some(value) = request.headers.get(&name) {
                validators.insert(name, value.clone());
            }
        }
        (!validators.is_empty()).then_some(validators)
    }

    /// This answer refreshed by a 304 to its revalidation, and whether it
    /// may be stored again: the 304's headers replace or join the stored
    /// ones (all but those describing a body it does not have), the body
    /// stays. A 304 that says `no-store`, or that names no validator of
    /// ours (no ETag in it while we stored one), refreshes nothing: the
    /// upstream still said our validator matched, so the stored answer is
    /// served, and not stored again.
    pub fn refreshed(
        &self,
        seen: &Seen,
        not_modified: &http::response::Parts,
        now: SystemTime,
    ) -> (Stored, bool) {
        let (policy, storable) = match self.policy.after_response(seen, not_modified, now) {
            AfterResponse::NotModified(policy, _) => {
                let storable = policy.is_storable();
                (policy, storable)
            }
            AfterResponse::Modified(..) => (self.policy.clone(), false),
        };
        let mut headers = self.headers.clone();
        if storable {
            for name in not_modified.headers.keys() {
                if !NOT_FROM_A_304.contains(name) {
                    headers.remove(name);
                    for value in not_modified.headers.get_all(name) {
                        headers.append(name, value.clone());
                    }
                }
            }
        }
        (Stored { policy, status: self.status, headers, body: self.body.clone() }, storable)
    }

    /// The stored headers, multiple values kept, with `Age` brought up to date.
    fn served_headers(&self, now: SystemTime) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(self.policy.age(now).as_secs()));
        headers
    }
}

/// Headers a 304 does not update: they describe a body it does not carry
/// (RFC 9111 §3.2), or the hop it came over.
static NOT_FROM_A_304: [HeaderName; 4] =
    [header::CONTENT_LENGTH, header::CONTENT_ENCODING, header::TRANSFER_ENCODING, header::CONTENT_RANGE];

/// What the cache holds for a request.
pub enum Lookup {
    /// Fresh: served as is; headers with `Age` brought up to date.
    Fresh(Arc<Stored>, HeaderMap),
    /// Stale with validators: revalidate with these conditional headers.
    Stale(Arc<Stored>, HeaderMap),
    /// Nothing usable.
    Miss,
}

/// The stored answers of one upstream.
pub struct Store {
    entries: moka::sync::Cache<Key, Arc<[Arc<Stored>]>>,
    max_object: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("entries", &self.entries.entry_count()).finish()
    }
}

impl Store {
    pub fn new(max_size: u64, max_object: u64) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|_, variants: &Arc<[Arc<Stored>]>| {
                variants.iter().fold(0u32, |sum, stored| sum.saturating_add(stored.weight()))
            })
            .build();
        Self { entries, max_object }
    }

    /// A store of another size holding what fits of this one's entries.
    pub fn resized(&self, max_size: u64, max_object: u64) -> Self {
        let store = Self::new(max_size, max_object);
        for (key, variants) in &self.entries {
            let kept: Vec<_> =
                variants.iter().filter(|s| s.body.len() as u64 <= max_object).cloned().collect();
            if !kept.is_empty() {
                store.entries.insert(*key, kept.into());
            }
        }
        store.entries.run_pending_tasks();
        store
    }

    /// The freshest usable answer for `seen` under `key`.
    pub fn lookup(&self, key: &Key, seen: &Seen, now: SystemTime) -> Lookup {
        let Some(variants) = self.entries.get(key) else { return Lookup::Miss };
        for stored in variants.iter() {
            match stored.policy.before_request(seen, now) {
                BeforeRequest::Fresh(_) => return Lookup::Fresh(stored.clone(), stored.served_headers(now)),
                BeforeRequest::Stale { matches: true, .. } => {
                    return match stored.validators(seen, now) {
                        Some(validators) => Lookup::Stale(stored.clone(), validators),
                        None => Lookup::Miss,
                    };
                }
                BeforeRequest::Stale { matches: false, .. } => {}
            }
        }
        Lookup::Miss
    }

    /// The policy of an answer to `seen`, if the answer may be stored at all.
    ///
    /// A request with a credential is answered for that credential alone
    /// (its key holds it), so its answers are judged as a private cache
    /// would: `private` may be kept. Without one, as a shared cache: not.
    /// No heuristic freshness: only what the upstream states is trusted.
    /// Answers setting a cookie are never kept.
    pub fn admit(
        &self,
        seen: &Seen,
        head: &Answer,
        credentialed: bool,
        now: SystemTime,
    ) -> Option<CachePolicy> {
        // A cookie is someone's; `Vary: *` never matches another request.
        let vary_all = head.headers().get_all(header::VARY).iter().any(|v| v.as_bytes().trim_ascii() == b"*");
        if head.headers().contains_key(header::SET_COOKIE) || vary_all {
            return None;
        }
        let options = CacheOptions {
            shared: !credentialed,
            cache_heuristic: 0.0,
            immutable_min_time_to_live: Duration::ZERO,
            ignore_cargo_cult: false,
        };
        let policy = CachePolicy::new_options(seen, head, now, options);
        // Stored only while it stays useful: fresh for a while, or revalidatable.
        let useful = !policy.is_stale(now) || has_validator(head.headers());
        (policy.is_storable() && useful).then_some(policy)
    }

    /// Whether a body of `len` bytes may be stored.
    pub fn fits(&self, len: u64) -> bool {
        len <= self.max_object
    }

    /// Keeps an answer, replacing the variant `seen` had.
    pub fn insert(&self, key: Key, seen: &Seen, stored: Stored, now: SystemTime) {
        let others = self.entries.get(&key).into_iter().flat_map(|variants| variants.to_vec());
        let others = others.filter(|old| {
            // The same variant when its request matches ours.
            !matches!(
                old.policy.before_request(seen, now),
                BeforeRequest::Fresh(_) | BeforeRequest::Stale { matches: true, .. }
            )
        });
        let variants: Vec<_> = std::iter::once(Arc::new(stored)).chain(others).take(MAX_VARIANTS).collect();
        self.entries.insert(key, variants.into());
    }

    /// A stored answer made from its policy and what was received.
    pub fn stored(policy: CachePolicy, head: Answer, body: Bytes) -> Stored {
        let (head, ()) = head.into_parts();
        Stored { policy, status: head.status, headers: head.headers, body }
    }

    /// Forgets what `key` holds (an unsafe method went through).
    pub fn invalidate(&self, key: &Key) {
        self.entries.invalidate(key);
    }

    /// Forgets everything; returns how many entries there were.
    pub fn purge(&self) -> u64 {
        let entries = self.entry_count();
        self.entries.invalidate_all();
        self.entries.run_pending_tasks();
        entries
    }

    /// Entries and bytes held, after pending evictions.
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(T0 * 1000 + ms)
    }

    fn seen(headers: &[(&str, &str)]) -> Seen {
        let mut request = Request::get("https://api.test/x");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("a valid request")
    }

    fn answer(headers: &[(&str, &str)]) -> Answer {
        let mut response =
            http::Response::builder().status(200).header("date", httpdate::fmt_http_date(at(0)));
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        response.body(()).expect("a valid answer")
    }

    /// The key of the same URI for credential `n`.
    fn key(n: u32) -> Key {
        super::super::key::Keyer::new(None).entry(&seen(&[("authorization", &n.to_string())]).into_parts().0)
    }

    fn store_one(store: &Store, key: Key, seen: &Seen, head: Answer, credentialed: bool) -> bool {
        match store.admit(seen, &head, credentialed, at(0)) {
            Some(policy) => {
                store.insert(key, seen, Store::stored(policy, head, Bytes::from_static(b"body")), at(0));
                true
            }
            None => false,
        }
    }

    #[test]
    fn fresh_for_max_age_then_stale_with_validators() {
        let store = Store::new(1 << 20, 1 << 16);
        let request = seen(&[]);
        let head = answer(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
        assert!(store_one(&store, key(1), &request, head, false));
        match store.lookup(&key(1), &request, at(30_000)) {
            Lookup::Fresh(stored, headers) => {
                assert_eq!(stored.body, "body");
                assert_eq!(headers.get("age").map(|v| v.as_bytes()), Some(&b"30"[..]));
            }
            _ => panic!("fresh at 30 s"),
        }
        match store.lookup(&key(1), &request, at(61_000)) {
            Lookup::Stale(_, validators) => {
                assert_eq!(validators.get("if-none-match").map(|v| v.as_bytes()), Some(&b"\"v1\""[..]));
            }
            _ => panic!("stale with a validator at 61 s"),
        }
        assert!(matches!(store.lookup(&key(2), &request, at(0)), Lookup::Miss));
    }

    #[test]
    fn what_is_never_stored() {
        let store = Store::new(1 << 20, 1 << 16);
        let request = seen(&[]);
        for headers in [
            &[("cache-control", "no-store")][..],
            &[("cache-control", "private, max-age=60")],
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            &[("cache-control", "max-age=60"), ("vary", "*")],
            // No freshness stated and nothing to revalidate with: no heuristics.
            &[("last-modified", "x")][..0],
        ] {
            assert!(!store_one(&store, key(1), &request, answer(headers), false), "{headers:?}");
        }
        // A private answer to a credential's request is kept, under its key.
        let private = answer(&[("cache-control", "private, max-age=60")]);
        assert!(store_one(&store, key(1), &request, private, true));
    }

    #[test]
    fn vary_keeps_variants_apart() {
        let store = Store::new(1 << 20, 1 << 16);
        let json = seen(&[("accept", "application/json")]);
        let html = seen(&[("accept", "text/html")]);
        assert!(store_one(
            &store,
            key(1),
            &json,
            answer(&[("cache-control", "max-age=60"), ("vary", "Accept")]),
            false
        ));
        assert!(matches!(store.lookup(&key(1), &json, at(1)), Lookup::Fresh(..)));
        assert!(matches!(store.lookup(&key(1), &html, at(1)), Lookup::Miss));
        assert!(store_one(
            &store,
            key(1),
            &html,
            answer(&[("cache-control", "max-age=60"), ("vary", "Accept")]),
            false
        ));
        assert!(matches!(store.lookup(&key(1), &json, at(1)), Lookup::Fresh(..)), "both variants kept");
        assert!(matches!(store.lookup(&key(1), &html, at(1)), Lookup::Fresh(..)));
    }

    #[test]
    fn a_304_refreshes_the_entry() {
        let store = Store::new(1 << 20, 1 << 16);
        let request = seen(&[]);
        let head = answer(&[("cache-control", "max-age=10"), ("etag", "\"v1\"")]);
        assert!(store_one(&store, key(1), &request, head, false));
        let Lookup::Stale(stored, _) = store.lookup(&key(1), &request, at(20_000)) else { panic!("stale") };
        let (mut not_modified, ()) =
            answer(&[("cache-control", "max-age=10"), ("etag", "\"v1\"")]).into_parts();
        not_modified.status = StatusCode::NOT_MODIFIED;
        not_modified.headers.insert("date", httpdate::fmt_http_date(at(20_000)).parse().expect("a date"));
        let (refreshed, storable) = stored.refreshed(&request, &not_modified, at(20_000));
        assert!(storable);
        assert_eq!(refreshed.status, StatusCode::OK);
        assert_eq!(refreshed.body, "body");
        store.insert(key(1), &request, refreshed, at(20_000));
        assert!(matches!(store.lookup(&key(1), &request, at(25_000)), Lookup::Fresh(..)));
    }

    #[test]
    fn bytes_stay_within_max_size() {
        let max_size = 64 * 1024;
        let store = Store::new(max_size, 8 * 1024);
        let request = seen(&[]);
        for n in 0..200u32 {
            let head = answer(&[("cache-control", "max-age=60")]);
            let policy = store.admit(&request, &head, false, at(0)).expect("storable");
            let body = Bytes::from(vec![b'x'; 4 * 1024]);
            store.insert(key(n), &request, Store::stored(policy, head, body), at(0));
        }
        let (entries, bytes) = store.usage();
        assert!(bytes <= max_size, "{bytes} bytes held over {max_size}");
        assert!(entries > 0 && entries < 200, "{entries} entries");
    }
}
