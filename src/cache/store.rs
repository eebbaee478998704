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
    /// may be stored again. The 304's headers replace or join the stored
    /// ones (all but those describing a body it does not have), the body
    /// stays, and the result is judged afresh, as a new answer would be
    /// ([`Store::admit`]): a 304 that sets a cookie, says `no-store` or
    /// `private` (to a request without credentials), or `Vary: *`, is served
    /// to the caller who drew it and not stored. A 304 that names no
    /// validator of ours (no ETag in it while we stored one) refreshes
    /// nothing: the upstream still said our validator matched, so the stored
    /// answer is served as it is, and not stored again.
    pub fn refreshed(
        &self,
        seen: &Seen,
        not_modified: &Answer,
        credentialed: bool,
        now: SystemTime,
    ) -> (Stored, bool) {
        let as_stored = || Stored {
            policy: self.policy.clone(),
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        };
        if let AfterResponse::Modified(..) = self.policy.after_response(seen, not_modified, now) {
            return (as_stored(), false);
        }
        let mut merged = Answer::new(());
        *merged.status_mut() = self.status;
        *merged.headers_mut() = self.headers.clone();
        for name in not_modified.headers().keys() {
            if !NOT_FROM_A_304.contains(name) {
                merged.headers_mut().remove(name);
                for value in not_modified.headers().get_all(name) {
                    merged.headers_mut().append(name, value.clone());
                }
            }
        }
        let judged = judge(seen, &merged, credentialed, now);
        let storable = judged.is_some();
        let (head, ()) = merged.into_parts();
        let policy = judged.unwrap_or_else(|| self.policy.clone());
        (Stored { policy, status: head.status, headers: head.headers, body: self.body.clone() }, storable)
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

/// The policy of an answer to `seen`, if the answer may be stored at all.
///
/// A request with a credential is answered for that credential alone (its
/// key holds it), so its answers are judged as a private cache would:
/// `private` may be kept. Without one, as a shared cache: not. No heuristic
/// freshness: only what the upstream states is trusted. Answers setting a
/// cookie are never kept.
fn judge(seen: &Seen, head: &Answer, credentialed: bool, now: SystemTime) -> Option<CachePolicy> {
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

/// The largest `Age` a cache has to believe (RFC 9111 §1.2.2: a larger one
/// counts as this). `http-cache-semantics` adds the time an answer spent
/// here to its `Age` without checking, so a larger one would overflow.
const MAX_AGE_HEADER: &str = "2147483648";

/// Brings an answer's `Age` within [`MAX_AGE_HEADER`] before it is judged
/// or stored; a number too large even to parse counts as that too.
pub fn clamp_age(headers: &mut HeaderMap) {
    let Some(age) = headers.get(header::AGE) else { return };
    // Read as the crate reads it: Rust's parser takes a leading `+`.
    let digits = age.as_bytes().strip_prefix(b"+").unwrap_or(age.as_bytes());
    let too_old = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_none_or(|secs| secs > 1 << 31);
    if too_old {
        headers.insert(header::AGE, HeaderValue::from_static(MAX_AGE_HEADER));
    }
}

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

    /// The policy of an answer to `seen`, if the answer may be stored at
    /// all (see [`judge`]).
    pub fn admit(
        &self,
        seen: &Seen,
        head: &Answer,
        credentialed: bool,
        now: SystemTime,
    ) -> Option<CachePolicy> {
        judge(seen, head, credentialed, now)
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
        let not_modified = not_modified_at(20_000, &[("cache-control", "max-age=10"), ("etag", "\"v1\"")]);
        let (refreshed, storable) = stored.refreshed(&request, &not_modified, false, at(20_000));
        assert!(storable);
        assert_eq!(refreshed.status, StatusCode::OK);
        assert_eq!(refreshed.body, "body");
        store.insert(key(1), &request, refreshed, at(20_000));
        assert!(matches!(store.lookup(&key(1), &request, at(25_000)), Lookup::Fresh(..)));
    }

    /// A 304 to a revalidation at `ms` with `headers`.
    fn not_modified_at(ms: u64, headers: &[(&str, &str)]) -> Answer {
        let mut response = http::Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("date", httpdate::fmt_http_date(at(ms)));
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        response.body(()).expect("a valid answer")
    }

    /// The refreshed answer is judged as a new one would be: what a 304
    /// adds (a cookie, `no-store`, `private` to an anonymous request, `Vary:
    /// *`) goes to the caller who drew it and is never stored, even where
    /// the stored answer had no `Cache-Control` for the 304 to update.
    #[test]
    fn what_a_304_adds_is_judged_before_it_is_stored() {
        let store = Store::new(1 << 20, 1 << 16);
        let request = seen(&[]);
        let expires = httpdate::fmt_http_date(at(1_000));
        for stored_headers in [
            &[("cache-control", "max-age=1"), ("etag", "\"v1\"")][..],
            &[("expires", expires.as_str()), ("etag", "\"v1\"")],
        ] {
            for added in [
                ("set-cookie", "session=someone-else"),
                ("cache-control", "private, no-store"),
                ("cache-control", "private, max-age=60"),
                ("vary", "*"),
            ] {
                assert!(store_one(&store, key(1), &request, answer(stored_headers), false));
                let Lookup::Stale(stored, _) = store.lookup(&key(1), &request, at(2_000)) else {
                    panic!("stale")
                };
                let not_modified = not_modified_at(2_000, &[("etag", "\"v1\""), added]);
                let (refreshed, storable) = stored.refreshed(&request, &not_modified, false, at(2_000));
                assert!(!storable, "{stored_headers:?} then {added:?}");
                assert_eq!(
                    refreshed.headers.get(added.0).map(|v| v.as_bytes()),
                    Some(added.1.as_bytes()),
                    "the caller who drew it sees it"
                );
            }
        }
        // Under a credential's own key, `private` may be kept; a cookie never.
        assert!(store_one(
            &store,
            key(1),
            &request,
            answer(&[("cache-control", "max-age=1"), ("etag", "\"v1\"")]),
            true
        ));
        let Lookup::Stale(stored, _) = store.lookup(&key(1), &request, at(2_000)) else { panic!("stale") };
        let private = not_modified_at(2_000, &[("etag", "\"v1\""), ("cache-control", "private, max-age=60")]);
        assert!(stored.refreshed(&request, &private, true, at(2_000)).1);
        let cookie = not_modified_at(2_000, &[("etag", "\"v1\""), ("set-cookie", "a=b")]);
        assert!(!stored.refreshed(&request, &cookie, true, at(2_000)).1);
    }

    /// An `Age` too large to add to (RFC 9111: believe at most 2^31 s) is
    /// clamped, so a stored answer can be looked up ever after.
    #[test]
    fn an_absurd_age_is_clamped() {
        for age in ["18446744073709551615", "99999999999999999999999", "2147483649", "+18446744073709551615"]
        {
            let mut head = answer(&[("cache-control", "max-age=60"), ("etag", "\"v1\""), ("age", age)]);
            clamp_age(head.headers_mut());
            assert_eq!(head.headers()["age"], "2147483648", "{age}");
            let store = Store::new(1 << 20, 1 << 16);
            let request = seen(&[]);
            assert!(store_one(&store, key(1), &request, head, false), "stale, but revalidatable");
            assert!(matches!(store.lookup(&key(1), &request, at(5_000)), Lookup::Stale(..)), "{age}");
        }
        let mut ordinary = answer(&[("age", "30")]);
        clamp_age(ordinary.headers_mut());
        assert_eq!(ordinary.headers()["age"], "30");
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
