//! Upstreams at run time: a configured API, its dispatcher, and one exchange.
//!
//! An exchange is the life of one proxied request against one upstream:
//! wait for a ticket (queue, quotas, concurrency), send the attempt, and hand
//! the answer back while it streams.

pub mod client;
pub mod dispatcher;
mod driver;
mod exchange;
pub mod guard;
mod pool;
mod shared;
mod tokens;

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use hyper::body::{Body, Frame, SizeHint};

use crate::admission::{Needs, SINGLE, TokenQuotas};
pub use crate::admission::{Place, Priority, Refusal};
use crate::body::{self, ProxyBody};
use crate::cache::Cache;
use crate::config::{self, KeySource};
use crate::error::ProxyError;
use crate::headers::{self, Way};
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::store::Store;
pub use client::{CaFileError, SendError, UpstreamClient};
pub use dispatcher::Dispatcher;
pub use shared::Ticket;

// Header names are `HeaderName`s rather than `&str`s: a `&str` name is
// parsed and checked again on every lookup, on every request.

/// Request header choosing a request's priority inside its caller's queue.
pub const PRIORITY_HEADER: HeaderName = HeaderName::from_static("x-pacegate-priority");
/// Header telling the caller how many attempts its answer took.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-pacegate-attempts");
/// Answer header naming the rate limit an answer is about (GitHub).
pub const RESOURCE_HEADER: HeaderName = HeaderName::from_static("x-ratelimit-resource");
/// Header telling the caller how long it waited in pacegate's queue.
pub const QUEUED_HEADER: HeaderName = HeaderName::from_static("x-pacegate-queued-ms");

/// A configured upstream with its running dispatcher.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    pub dispatcher: Dispatcher,
    /// This upstream's series, kept across reloads like the dispatcher.
    pub metrics: Arc<UpstreamMetrics>,
    /// `[upstream.cache]`: kept across reloads while the table stays.
    pub cache: Option<Arc<Cache>>,
    /// The `Host` of every request to a plain `http` base_url, built once
    /// (see [`host_header`]).
    pub host: Option<HeaderValue>,
}

impl Upstream {
    /// Starts the dispatcher of a configured upstream.
    pub fn start(config: config::Upstream, metrics: Arc<Metrics>, store: Option<Arc<Store>>) -> Self {
        let dispatcher = Dispatcher::spawn(&config, metrics.clone(), store);
        let metrics = Arc::new(UpstreamMetrics::new(metrics, &config.name));
        let cache = config.cache.map(|settings| Arc::new(Cache::new(&config, settings, metrics.clone())));
        let host = host_header(&config.base_url);
        Self { config, dispatcher, metrics, cache, host }
    }

    /// Where a request with `priority` queues: its partition
    /// (`partition_by`) and its caller (`fair_by`).
    pub fn place(&self, headers: &HeaderMap, peer: IpAddr, priority: Priority) -> Place {
        let key = |source: &KeySource, hash: fn(&[u8]) -> u64| match source {
            // Tagged so that a missing header and an empty one differ.
            KeySource::Header(name) => match headers.get(name) {
                Some(value) => hash(&[b"h:", value.as_bytes()].concat()),
                None => hash(b"-"),
            },
            KeySource::ClientIp => hash(peer.to_string().as_bytes()),
        };
        Place {
            partition: (self.config.partition_by.as_ref())
                .map_or(SINGLE, |source| key(source, partition_key)),
            caller: self.config.fair_by.as_ref().map_or(0, |source| key(source, caller_key)),
            priority,
        }
    }

    /// What a request takes from the endpoint limits it matches, by method
    /// and by the path the caller sent after the route (the upstream path
    /// without base_url's own prefix).
    ///
    /// An LLM call priced by [`Upstream::price`] also takes its token
    /// reservation from the token quotas, numbered after the limits.
    ///
    /// Against `config`, the one the dispatcher numbers limits by (a
    /// reload since this request began may have added or reordered them);
    /// the path is the one this request goes to, under its own base_url.
    pub fn needs(&self, config: &config::Upstream, head: &http::request::Parts) -> Needs {
        let priced = tokens::Priced::of(head);
        if config.limits.is_empty() && priced.is_none() {
            return Needs::default();
        }
        let path = head.uri.path();
        let path = path.strip_prefix(self.config.base_url.path.as_str()).unwrap_or(path);
        let path = if path.is_empty() { "/" } else { path };
        // As sent, or as an upstream serves it: a limit counts either.
        let served = config::matching_path(path);
        let cost = |limit: &config::Limit| {
            let as_sent = limit.cost_of(&head.method, path);
            as_sent.or_else(|| if served == path { None } else { limit.cost_of(&head.method, &served) })
        };
        let limits = config.limits.iter().enumerate();
        let limits = limits.filter_map(|(index, limit)| Some((index, cost(limit)?)));
        let tokens = priced.map(|p| TokenQuotas::of(config).needs(p.reservation));
        Needs::new(limits.chain(tokens.into_iter().flatten()))
    }

    /// The name and capacity (smallest count) of endpoint limit `index`,
    /// a token quota included.
    pub fn limit_capacity(&self, index: usize) -> Option<(String, u32)> {
        let capacity = |rate: &[config::Rate]| rate.iter().map(|r| r.count.get()).min().unwrap_or(0);
        let config = self.dispatcher.config();
        if let Some(limit) = config.limits.get(index) {
            return Some((limit.name.clone(), capacity(&limit.rate)));
        }
        let tokens = config.tokens.as_ref()?;
        let (kind, rate) = tokens.quotas.get(index - config.limits.len())?;
        Some((kind.name().to_owned(), capacity(rate)))
    }

    /// The endpoint limit an answer says it is about (GitHub's
    /// `x-ratelimit-resource`), when the request needed that limit.
    pub fn limit_named(&self, headers: &HeaderMap, needs: &Needs) -> Option<usize> {
        let resource = headers.get(RESOURCE_HEADER)?.to_str().ok()?.trim();
        let limits = &self.dispatcher.config().limits;
        let index = limits.iter().position(|limit| limit.name.eq_ignore_ascii_case(resource))?;
        needs.iter().any(|(needed, _)| needed == index).then_some(index)
    }

    /// The same running upstream under a reloaded config.
    pub fn reconfigured(&self, config: config::Upstream, store: Option<Arc<Store>>) -> Self {
        self.dispatcher.reconfigure(&config, store);
        let cache = match (&self.cache, config.cache) {
            // Keys name the partition header as a credential: a new one
            // starts a new cache rather than share entries across it.
            (Some(cache), Some(settings)) if config.partition_by == self.config.partition_by => {
                cache.reconfigure(settings);
                Some(cache.clone())
            }
            (_, Some(settings)) => Some(Arc::new(Cache::new(&config, settings, self.metrics.clone()))),
            (_, None) => None,
        };
        let host = host_header(&config.base_url);
        Self { config, dispatcher: self.dispatcher.clone(), metrics: self.metrics.clone(), cache, host }
    }
}

/// The `Host` the pool would derive from base_url on an HTTP/1 connection,
/// built once instead of formatted on every request. Only for `http`: a
/// plain connection is always HTTP/1, where an `https` one may negotiate h2,
/// which carries the authority in `:authority` and gets no `Host` from the
/// pool; those keep the pool's own.
fn host_header(base: &config::BaseUrl) -> Option<HeaderValue> {
    (base.scheme == http::uri::Scheme::HTTP)
        .then(|| pool::host_header(&base.scheme, &base.authority))
        .flatten()
}

/// Hashes a partition key the same way on every replica, because with
/// `[redis]` it names the shared buckets; the value itself (a credential,
/// say) is never kept, logged or shown.
fn partition_key(bytes: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut first = [0; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    // 0 is reserved for SINGLE; a collision there only merges two buckets.
    u64::from_be_bytes(first).max(1)
}

/// Hashes a caller key under a per-process seed, so that callers cannot
/// craft collisions across restarts; the value itself is not kept.
fn caller_key(bytes: &[u8]) -> u64 {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    SEED.get_or_init(RandomState::new).hash_one(bytes)
}

/// The priority a request asks for with [`PRIORITY_HEADER`]. An invalid one
/// is a 400, not silently normal, so a caller's typo does not go unnoticed.
pub fn priority(headers: &HeaderMap) -> Result<Priority, ProxyError> {
    match headers.get(PRIORITY_HEADER) {
        None => Ok(Priority::Normal),
        Some(value) => {
            value.to_str().ok().and_then(Priority::parse).ok_or_else(|| {
                ProxyError::BadRequest(format!("{PRIORITY_HEADER} must be high, normal or low"))
            })
        }
    }
}

/// The request one attempt sends: the caller's head, cleaned and already
/// aimed at its upstream's URI.
///
/// The attempt takes the caller's header map and leaves a copy in `head`
/// for the next one: hyper parses the answer's head into the map its
/// request's head leaves behind, and the caller's map has room for it (its
/// connection parsed the request into the map of the answer before), where
/// a copy has none and would grow twice for every answer.
pub fn outbound_request(head: &mut http::request::Parts, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    // The pooled client negotiates h2 itself; it refuses HTTP/2-versioned
    // requests on HTTP/1 connections.
    *request.version_mut() = http::Version::HTTP_11;
    let copy = head.headers.clone();
    *request.headers_mut() = std::mem::replace(&mut head.headers, copy);
    request
}

/// The answer for the caller: hop-by-hop headers removed, body streamed while
/// `guard` (the attempt's concurrency slot) stays held.
pub fn inbound_response<G: Send + Sync + 'static>(
    response: Response<hyper::body::Incoming>,
    guard: G,
) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    clean_head(&mut parts);
    Response::from_parts(parts, body::guarded(CleanTrailers { inner: incoming }, guard))
}

pin_project_lite::pin_project! {
    /// An upstream's answer body with its trailer fields cleaned as its
    /// head is: hop-by-hop names and `x-pacegate-*` do not pass in
    /// trailers either. Its size and end pass through as they are, so that
    /// hyper sends the answer's length as it came (`map_frame` hides both).
    pub(crate) struct CleanTrailers<B> {
        #[pin]
        pub(crate) inner: B,
    }
}

impl<B: Body<Data = Bytes>> Body for CleanTrailers<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut polled = self.project().inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            headers::strip_hop_by_hop(trailers, Way::Answer);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream answer's head as the caller may see it: hop-by-hop headers
/// removed, and any `x-pacegate-*` of the upstream's own (only pacegate
/// says what it did: `x-pacegate-error` marks the answers it makes), version
/// left to the caller's own connection.
pub(crate) fn clean_head(parts: &mut http::response::Parts) {
    headers::strip_hop_by_hop(&mut parts.headers, Way::Answer);
    parts.version = http::Version::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_what_the_client_would_derive_for_http_only() {
        let host = |url: &str| {
            let text =
                format!("[[upstream]]\nname = \"a\"\nbase_url = \"{url}\"\nroute = \"/a\"\nrate = \"1/s\"\n");
            let config = config::parse(std::path::Path::new("t.toml"), &text).unwrap();
            host_header(&config.upstreams[0].base_url)
        };
        assert_eq!(host("http://127.0.0.1:8080/v1").unwrap(), "127.0.0.1:8080");
        assert_eq!(host("http://api.example.com").unwrap(), "api.example.com");
        assert_eq!(host("http://api.example.com:80").unwrap(), "api.example.com", "default port left out");
        assert_eq!(host("http://[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(host("https://api.example.com"), None, "h2 may carry it in :authority instead");
    }

    #[test]
    fn every_attempt_sends_the_callers_head_and_leaves_it_for_the_next() {
        let (mut head, ()) = Request::post("http://127.0.0.1:1/v1/x")
            .header("authorization", "Bearer A")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .unwrap()
            .into_parts();
        let original = head.headers.clone();
        for _ in 0..2 {
            let request = outbound_request(&mut head, crate::body::empty());
            assert_eq!(request.headers(), &original);
            assert_eq!((request.method(), request.uri()), (&head.method, &head.uri));
            assert_eq!(head.headers, original, "kept for the next attempt");
        }
    }

    #[test]
    fn keys_are_hashed_and_distinct() {
        for hash in [partition_key, caller_key] {
            assert_eq!(hash(b"h:Bearer A"), hash(b"h:Bearer A"));
            assert_ne!(hash(b"h:Bearer A"), hash(b"h:Bearer B"));
            assert_ne!(hash(b"h:"), hash(b"-"), "an empty header is not a missing one");
        }
        assert_ne!(partition_key(b"anything"), SINGLE);
        // Every replica must name the same shared bucket.
        assert_eq!(partition_key(b"h:Bearer A"), 0xeca4_ed44_c3dc_68e0, "stable across processes");
    }
}
