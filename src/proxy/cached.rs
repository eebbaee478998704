//! The request path of an upstream with `[upstream.cache]`.
//!
//! A GET the cache may answer is served from a fresh entry without being
//! sent; otherwise it joins the fetch under way for the same request, or
//! starts one (conditional when a stale entry has validators). The fetch
//! runs in a task of its own on this worker, through the upstream's queue
//! like any request, and every caller waiting for it streams its answer
//! (see [`crate::cache::flight`]). Other requests go the usual way, and a
//! write that succeeded forgets what the cache holds for its URI.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::{Prepared, Proxy, Queue};
use crate::admission::Refusal;
use crate::body::{self, ProxyBody, RequestBody};
use crate::cache::flight::{Flight, Head};
use crate::cache::key::Key;
use crate::cache::store::{self, Answer, Lookup, Seen, Store, Stored};
use crate::cache::writes::Mark;
use crate::cache::{Cache, Joined, Outcome, conditional};
use crate::error::ProxyError;
use crate::runtime::Runtime;
use crate::upstream::{ATTEMPTS_HEADER, QUEUED_HEADER};

/// What a follower refused for a full queue is told to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Proxy {
    /// Answers a request of an upstream with a cache, and says what the
    /// cache did for it.
    pub(super) async fn cached(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        prepared: &mut Prepared,
        queue: Queue,
        cache: Arc<Cache>,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Outcome) {
        let has_body = prepared.incoming.as_ref().is_some_and(|incoming| !incoming.is_end_stream());
        let head = &mut prepared.head;
        if !conditional::cacheable(&head.method, &head.headers, has_body) {
            let result = self.send(&runtime, prepared).await;
            // Keyed only when a write succeeded: most bypasses change nothing.
            if let Ok(response) = &result
                && conditional::invalidates(&prepared.head.method, response.status())
            {
                cache.invalidate(cache.keyer.entry(&prepared.head));
            }
            cache.count(Outcome::Bypass);
            return (result, Outcome::Bypass);
        }
        // Same as `send`: the target names the host.
        head.headers.remove(header::HOST);
        let conditionals = conditional::take_validators(&mut head.headers);
        let entry = cache.keyer.entry(head);
        let seen = cache.seen(head);
        let stale = match cache.store().lookup(&entry, &seen, SystemTime::now()) {
            Lookup::Fresh(stored, headers) => {
                cache.count(Outcome::Hit);
                let answer =
                    serve(&conditionals, stored.status, headers, |_| body::full(stored.body.clone()));
                return (Ok(answer), Outcome::Hit);
            }
            Lookup::Stale(stored, validators) => Some((stored, validators)),
            Lookup::Miss => None,
        };
        let upstream = &runtime.upstreams[queue.upstream as usize];
        let flight_key = cache.coalesces().then(|| cache.keyer.flight(entry, head));
        let Some(joined) = cache.join((flight_key, entry), upstream.config.queue_size) else {
            cache.count(Outcome::Coalesced);
            let refusal = Refusal::Full { retry_after: FULL_RETRY_AFTER };
            return (Err(upstream.refused(refusal, head)), Outcome::Coalesced);
        };
        let (waiter, following) = match joined {
            Joined::Follower(waiter, following) => (waiter, Some(following)),
            Joined::Leader(flight, waiter) => {
                let credentialed = cache.keyer.has_credential(&head.headers);
                let (stale, validators) = stale.unzip();
                let fetch = Fetch {
                    mark: cache.mark(),
                    proxy: self.clone(),
                    runtime: runtime.clone(),
                    queue,
                    head: copy(head, validators),
                    cache: cache.clone(),
                    flight,
                    flight_key,
                    entry,
                    seen,
                    stale,
                    credentialed,
                };
                tokio::spawn(fetch.run());
                (waiter, None)
            }
        };
        let waited_from = tokio::time::Instant::now();
        // A caller's own bound on its wait holds for the shared answer too:
        // its queue wait and one attempt. Without one, the fetch's own
        // bounds (queue_timeout, timeout) end every wait.
        let shared = match queue.max_wait {
            Some(wait) => {
                let bound = wait.min(upstream.config.queue_timeout) + upstream.config.timeout;
                tokio::time::timeout(bound, waiter.head()).await.ok()
            }
            None => Some(waiter.head().await),
        };
        let outcome = match (&following, &shared) {
            (Some(_), _) => Outcome::Coalesced,
            (None, Some(shared)) if shared.source == Outcome::Revalidated.as_str() => Outcome::Revalidated,
            (None, _) => Outcome::Miss,
        };
        cache.count(outcome);
        let Some(mut shared) = shared else {
            let waited = waited_from.elapsed();
            let refusal = Refusal::Timeout { waited, retry_after: FULL_RETRY_AFTER };
            return (Err(upstream.refused(refusal, head)), outcome);
        };
        if following.is_some() {
            // A cookie is set for the caller whose request drew it, never
            // for the callers who shared its answer.
            shared.headers.remove(header::SET_COOKIE);
        }
        drop(following);
        (Ok(serve(&conditionals, shared.status, shared.headers, |_| waiter.body())), outcome)
    }
}

/// The caller's answer: the full one, or a 304 when its own conditionals
/// say it already has it (then `body` is never made, and a flight's waiter
/// is let go at once).
fn serve(
    conditionals: &HeaderMap,
    status: StatusCode,
    headers: HeaderMap,
    body: impl FnOnce(()) -> ProxyBody,
) -> Response<ProxyBody> {
    let (status, headers, body) = if conditional::not_modified(conditionals, status, &headers) {
        (StatusCode::NOT_MODIFIED, conditional::not_modified_headers(headers), body::empty())
    } else {
        (status, headers, body(()))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A copy of the caller's head for the fetch, with the stale entry's
/// validators when it has some.
fn copy(head: &http::request::Parts, validators: Option<HeaderMap>) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request.headers_mut().extend(validators.unwrap_or_default());
    request.into_parts().0
}

/// One fetch that callers share, run in its own task.
struct Fetch {
    proxy: Arc<Proxy>,
    runtime: Arc<Runtime>,
    queue: Queue,
    head: http::request::Parts,
    cache: Arc<Cache>,
    flight: Arc<Flight>,
    /// Under which the flight is registered, when coalescing.
    flight_key: Option<Key>,
    entry: Key,
    seen: Seen,
    stale: Option<Arc<Stored>>,
    credentialed: bool,
    /// The cache's writes before the fetch was sent.
    mark: Mark,
}

impl Fetch {
    async fn run(mut self) {
        let index = self.queue.upstream as usize;
        let upstream = &self.runtime.upstreams[index];
        let client = self.runtime.client_for(index, &self.proxy.client);
        let mut empty = RequestBody::Buffered(Bytes::new());
        // The fetch serves whoever waits: the upstream's own queue_timeout bounds it.
        let exchange = upstream.exchange(client, &mut self.head, &mut empty, None, self.queue.place());
        let result = tokio::select! {
            result = exchange => result,
            () = self.flight.abandoned() => return,
        };
        let (parts, mut incoming) = result.unwrap_or_else(ProxyError::into_response).into_parts();
        let store = self.cache.store();
        let now = SystemTime::now();
        if let Some(stale) = self.stale.as_ref().filter(|_| parts.status == StatusCode::NOT_MODIFIED) {
            let not_modified = kept_answer(&parts);
            let (refreshed, storable) = stale.refreshed(&self.seen, &not_modified, self.credentialed, now);
            let mut headers = refreshed.headers.clone();
            stamp_from(&mut headers, &parts.headers);
            let source = Outcome::Revalidated.as_str();
            self.flight.publish_head(Head { status: refreshed.status, headers, source });
            self.flight.push(refreshed.body.clone()).await;
            self.flight.end(true);
            if storable {
                self.keep(&store, refreshed, now);
            }
            return;
        }
        let kept = kept_answer(&parts);
        let mut policy = store.admit(&self.seen, &kept, self.credentialed, now);
        if policy.is_none() {
            self.close();
        }
        let source = Outcome::Miss.as_str();
        self.flight.publish_head(Head { status: parts.status, headers: parts.headers, source });
        // The client's timeout ends at the answer's head; a body that stops
        // must not hold the flight, and whoever joins it, for ever.
        let stall = upstream.config.timeout;
        let mut len = 0u64;
        loop {
            if policy.is_none() && self.flight.waiters() == 0 {
                return;
            }
            let frame = match tokio::time::timeout(stall, incoming.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => return self.flight.end(false),
            };
            let Ok(data) = frame.into_data() else { continue };
            len += data.len() as u64;
            if policy.is_some() && !store.fits(len) {
                policy = None;
                self.close();
            }
            self.flight.push(data).await;
        }
        self.flight.end(true);
        if let (Some(policy), Some(body)) = (policy, self.flight.body()) {
            self.keep(&store, Store::stored(policy, kept, body), now);
        }
    }

    /// Stores the answer, unless a write to its entry went through since
    /// the fetch was sent. A write on another worker between the check and
    /// the insert would miss what is inserted: checked again after.
    fn keep(&self, store: &Store, stored: Stored, now: SystemTime) {
        if self.cache.may_store(&self.entry, self.mark) {
            store.insert(self.entry, &self.seen, stored, now);
            if !self.cache.may_store(&self.entry, self.mark) {
                store.invalidate(&self.entry);
            }
        }
    }

    /// Nobody joins any more (the answer will not be stored): the flight
    /// streams through a bounded buffer from now on.
    fn close(&self) {
        self.land();
        self.flight.close();
    }

    /// Takes the flight off the map: new callers find the store, or fetch anew.
    fn land(&self) {
        if let Some(key) = self.flight_key {
            self.cache.land(key, &self.flight);
        }
    }
}

impl Drop for Fetch {
    /// However the fetch ends, new callers no longer join it; and should it
    /// end without an answer (a panic), its waiters get pacegate's 500
    /// rather than wait on.
    fn drop(&mut self) {
        self.land();
        let (parts, _) = ProxyError::Internal("the shared fetch stopped".into()).into_response().into_parts();
        let source = Outcome::Miss.as_str();
        self.flight.fail_unanswered(Head { status: parts.status, headers: parts.headers, source });
    }
}

/// An answer's head as stored: pacegate's own headers about this fetch
/// (attempts, queue wait) are not the stored answer's, and an absurd
/// `Age` is brought within what the cache believes.
fn kept_answer(parts: &http::response::Parts) -> Answer {
    let mut answer = Response::new(());
    *answer.status_mut() = parts.status;
    *answer.headers_mut() = parts.headers.clone();
    answer.headers_mut().remove(ATTEMPTS_HEADER);
    answer.headers_mut().remove(QUEUED_HEADER);
    store::clamp_age(answer.headers_mut());
    answer
}

/// Copies what the fetch says about itself (attempts, queue wait) from the
/// 304 onto the stored answer served for it.
fn stamp_from(headers: &mut HeaderMap, fetched: &HeaderMap) {
    for name in [ATTEMPTS_HEADER, QUEUED_HEADER] {
        if let Some(value) = fetched.get(&name) {
            headers.insert(name, value.clone());
        }
    }
}
