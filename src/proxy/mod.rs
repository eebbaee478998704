//! The proxy service: the life of one request from a caller.
//!
//! Phases, in order: authenticate the caller, check the request head, route
//! it, read (or start streaming) its body, then exchange it with the
//! upstream ([`crate::route`] decides which). Every phase that fails
//! returns a [`ProxyError`], which becomes the one answer the caller gets.
//! CONNECT leaves this path for [`connect`]; requests inside an intercepted
//! tunnel come back to it.

pub mod auth;
#[cfg(test)]
mod budget;
mod cached;
pub mod connect;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Request, Response, Uri, header};
use hyper::body::Incoming;

use crate::body::{self, BodyError, BodyLimits, BufferBudget, Failure, ProxyBody};
use crate::cache::{CACHE_HEADER, Cache};
use crate::config;
use crate::error::ProxyError;
use crate::headers::{self, Way};
use crate::metrics::{ClientTimeout, Metrics, NO_UPSTREAM};
use crate::route::Target;
use crate::runtime::Runtime;
use crate::upstream::guard::{self, GuardError};
use crate::upstream::{
    self, ATTEMPTS_HEADER, Place, Priority, Upstream, UpstreamClient, inbound_response, outbound_request,
};
use crate::workers;

/// Request header with which a caller shortens its own queue wait.
pub const MAX_WAIT_HEADER: HeaderName = HeaderName::from_static("x-pacegate-max-wait");

/// Timeout of one pass-through request (unknown hosts have no config).
const PASS_THROUGH_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared by every connection of the proxy listener.
#[derive(Debug)]
pub struct Proxy {
    /// The config generation new requests use; swapped whole on reload.
    pub runtime: ArcSwap<Runtime>,
    /// Configured upstreams without a `ca_file`.
    client: UpstreamClient,
    /// Pass-through when `allow_private = false`: its DNS drops guarded addresses.
    guarded_client: UpstreamClient,
    metrics: Arc<Metrics>,
    /// Set when shutdown starts: when its grace ends, and the margin at its
    /// end kept for answering. Kept so that upstreams a reload brings in
    /// meanwhile close too.
    closing: OnceLock<(tokio::time::Instant, Duration)>,
    /// Request bodies buffered now, against `max_buffered_bytes`.
    buffers: Arc<BufferBudget>,
    /// Upstreams a reload removed, while requests they hold still run:
    /// shutdown closes them too, so that those get their answer in time.
    retired: Mutex<Vec<Weak<Upstream>>>,
}

impl Proxy {
    pub fn new(runtime: Arc<Runtime>, metrics: Arc<Metrics>) -> Self {
        let workers = workers::count(runtime.config.server.workers);
        Self {
            runtime: ArcSwap::new(runtime),
            client: UpstreamClient::new(workers),
            guarded_client: UpstreamClient::guarded(workers),
            metrics,
            closing: OnceLock::new(),
            buffers: Arc::default(),
            retired: Mutex::default(),
        }
    }

    /// Puts a new config generation in force (a reload).
    pub fn install(&self, runtime: Arc<Runtime>) {
        let previous = self.runtime.swap(runtime.clone());
        {
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            // One that came back carries on in the new generation (see `retired`).
            retired
                .retain(|upstream| upstream.upgrade().is_some_and(|u| !runtime.has_upstream(&u.config.name)));
            for removed in previous.upstreams.iter().filter(|u| !runtime.has_upstream(&u.config.name)) {
                self.metrics.forget_gauges(&removed.config.name);
                retired.push(Arc::downgrade(removed));
            }
        }
        self.close_upstreams();
    }

    /// Shutdown started; connections close at `ends`. Every request that
    /// cannot be answered by `ends - margin` is answered 503
    /// `shutting_down` instead (see `Dispatcher::close`).
    pub fn close(&self, ends: tokio::time::Instant, margin: Duration) {
        let _ = self.closing.set((ends, margin));
        self.close_upstreams();
    }

    /// The upstreams a reload removed that still finish what they hold: a
    /// reload that brings one back by name takes it over, queue and pacing
    /// state included, rather than start a second one beside it.
    pub fn retired(&self) -> Vec<Arc<Upstream>> {
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.iter().filter_map(Weak::upgrade).collect()
    }

    fn close_upstreams(&self) {
        let Some((ends, margin)) = self.closing.get() else { return };
        for upstream in &self.runtime.load().upstreams {
            upstream.dispatcher.close(*ends, *margin);
        }
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        for upstream in retired.iter().filter_map(Weak::upgrade) {
            upstream.dispatcher.close(*ends, *margin);
        }
    }

    /// Answers one request; never fails: errors become pacegate's own error answers.
    ///
    /// Neither this nor the steps a queued request goes through (`routed`,
    /// `forward`, `Upstream::exchange`, `Dispatcher::join`) is an `async fn`:
    /// an async fn or block keeps every value it captured for as long as it
    /// lives, even once that value has moved on to the next step, and a
    /// queued request keeps its state for as long as it waits. So each step
    /// does what needs no waiting first, the request's data is owned once
    /// (by `forward`), and the steps after it borrow.
    pub fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let runtime = self.runtime.load_full();
        if let Err(error) = auth::check(request.headers(), &runtime.config.server.proxy_auth) {
            return Either::Left(self.refused(error));
        }
        if request.method() == http::Method::CONNECT {
            if let Err(error) = check_header_size(request.headers(), runtime.config.server.max_header_bytes) {
                return Either::Left(self.refused(error));
            }
            let tunnel = match connect::Tunnel::of(&runtime, request.uri()) {
                Ok(tunnel) => tunnel,
                Err(error) => return Either::Left(self.refused(error)),
            };
            // Boxed: rare, and its state would otherwise size every request's.
            return Either::Left(Box::pin(async move {
                let upstream = tunnel.upstream;
                let result = connect::connect(&self, &runtime, peer, tunnel, request).await;
                self.answer(result, upstream.map(|index| &*runtime.upstreams[index]))
            }));
        }
        self.routed(runtime, peer, request, None)
    }

    /// Answers one request from inside a CONNECT tunnel to `authority` that
    /// pacegate serves itself, as if it were a forward request to
    /// `scheme://authority/...` (`https` when the tunnel carried TLS it
    /// intercepts, `http` when it carried plain HTTP, interception on or
    /// off). The CONNECT's credentials must still pass `proxy_auth` as it
    /// is now (a reload may have set or changed it): otherwise the answer
    /// is 407 and the tunnel closes after it, so that the client opens a
    /// new one and is asked for them. A CONNECT in it is refused (400, and
    /// its connection closed): the tunnel already reaches its host, and
    /// the upstream is no proxy.
    pub fn handle_intercepted(
        self: Arc<Self>,
        peer: SocketAddr,
        scheme: Scheme,
        opened: Arc<connect::Opened>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let runtime = self.runtime.load_full();
        if let Err(error) =
            auth::check_offered(opened.credentials.as_ref(), &runtime.config.server.proxy_auth)
        {
            let mut response = self.answer(Err(error), None);
            response.extensions_mut().insert(crate::server::CloseConnection);
            let answer: Answering = Box::pin(std::future::ready(response));
            return Either::Left(answer);
        }
        if request.method() == http::Method::CONNECT {
            let error =
                ProxyError::BadRequest("CONNECT inside a tunnel: the tunnel already reaches its host".into());
            return Either::Left(self.refused(error));
        }
        self.routed(runtime, peer, request, Some((&scheme, &opened.authority)))
    }

    fn answer(
        &self,
        result: Result<Response<ProxyBody>, ProxyError>,
        upstream: Option<&Upstream>,
    ) -> Response<ProxyBody> {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(code = error.code(), upstream = error.upstream(), "{error}");
                error.into_response()
            }
        };
        match upstream {
            Some(upstream) => upstream.metrics.count_request(response.status()),
            None => self.metrics.count_request(NO_UPSTREAM, response.status()),
        }
        response
    }

    /// An error answer known before any waiting, in the shape of the
    /// waiting answers.
    fn refused(&self, error: ProxyError) -> Answering {
        Box::pin(std::future::ready(self.answer(Err(error), None)))
    }

    /// Routes and forwards one request. `tunnel` is the scheme and authority
    /// of the intercepted CONNECT it came through.
    fn routed(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        peer: SocketAddr,
        request: Request<Incoming>,
        tunnel: Option<(&Scheme, &Authority)>,
    ) -> Either<Answering, impl Future<Output = Response<ProxyBody>> + Send + use<>> {
        let version = request.version();
        match prepare(&runtime, peer, request, tunnel) {
            Err(error) => {
                let response = self.answer_closing(Err(error), None, version);
                Either::Left(Box::pin(std::future::ready(response)))
            }
            Ok(prepared) => match prepared.cache(&runtime) {
                Some(cache) => Either::Left(self.forward_cached(runtime, prepared, cache)),
                None => Either::Right(self.forward(runtime, prepared)),
            },
        }
    }

    /// Sends the request and answers.
    ///
    /// The one step that owns the request while it waits: the steps after
    /// it borrow `prepared`.
    #[allow(clippy::manual_async_fn)] // its arguments are kept once, see `handle`
    fn forward(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        mut prepared: Prepared,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        async move {
            let result = self.send(&runtime, &mut prepared).await;
            self.finish(&runtime, &prepared, result)
        }
    }

    /// [`Self::forward`] for an upstream with a cache; boxed, so that the
    /// cache's state does not size every request's future.
    fn forward_cached(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        mut prepared: Prepared,
        (queue, cache): (Queue, Arc<Cache>),
    ) -> Answering {
        Box::pin(async move {
            let (result, outcome) = self.clone().cached(runtime.clone(), &mut prepared, queue, cache).await;
            let mut response = self.finish(&runtime, &prepared, result);
            response.headers_mut().insert(CACHE_HEADER, outcome.header());
            response
        })
    }

    /// The caller's answer to a forwarded request.
    fn finish(
        &self,
        runtime: &Runtime,
        prepared: &Prepared,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        self.answer_closing(result, prepared.upstream(runtime), prepared.head.version)
    }

    /// [`Self::answer`], closing an HTTP/1 connection that cannot carry
    /// another request after this refusal ([`ProxyError::closes_connection`]).
    fn answer_closing(
        &self,
        result: Result<Response<ProxyBody>, ProxyError>,
        upstream: Option<&Upstream>,
        version: http::Version,
    ) -> Response<ProxyBody> {
        let close =
            version < http::Version::HTTP_2 && result.as_ref().is_err_and(ProxyError::closes_connection);
        let mut response = self.answer(result, upstream);
        if close {
            response.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        response
    }

    /// Reads the body, then exchanges the request with its upstream, or
    /// passes it through when no upstream claims its host.
    #[allow(clippy::manual_async_fn)] // its arguments are kept once, see `handle`
    fn send<'a>(
        &'a self,
        runtime: &'a Runtime,
        prepared: &'a mut Prepared,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
        async move {
            let server = &runtime.config.server;
            let incoming =
                prepared.incoming.take().ok_or_else(|| ProxyError::Internal("request sent twice".into()))?;
            let limits = BodyLimits {
                buffer: server.max_body_bytes,
                hard: server.max_request_bytes,
                stall: server.body_read_timeout,
                total: server.max_buffered_bytes,
            };
            let read = body::read(incoming, limits, &self.buffers);
            let mut body = read.await.map_err(|e| match e {
                BodyError::TooLarge(limit) => {
                    ProxyError::BodyTooLarge { upstream: upstream_name(runtime, prepared.queue), limit }
                }
                BodyError::Read(e) => ProxyError::BadRequest(format!("reading the request body failed: {e}")),
                BodyError::Stalled(_) => self.body_timeout(runtime, prepared.queue),
            })?;
            let head = &mut prepared.head;
            set_host(runtime, prepared.queue, &mut head.headers);
            let answer = match prepared.queue {
                Some(queue) => {
                    let index = queue.upstream as usize;
                    let client = runtime.client_for(index, &self.client);
                    runtime.upstreams[index]
                        .exchange(client, head, &mut body, queue.max_wait, queue.place())
                        .await
                }
                None => {
                    let client = if runtime.config.forward.allow_private {
                        &self.client
                    } else {
                        check_pass_through(&head.uri).await?;
                        &self.guarded_client
                    };
                    // Boxed like CONNECT: only unknown hosts take this path.
                    Box::pin(self.pass_through(client, head, &mut body)).await
                }
            };
            // A streamed body that the caller stopped sending, or that could
            // not be read, broke its attempt: that, not the upstream, is why.
            match body.failure() {
                Some(Failure::Stalled) => Err(self.body_timeout(runtime, prepared.queue)),
                Some(Failure::Unreadable) => {
                    Err(ProxyError::BadRequest("reading the request body failed".to_string()))
                }
                None => answer,
            }
        }
    }

    /// Counts a body that stopped arriving, and says so.
    fn body_timeout(&self, runtime: &Runtime, queue: Option<Queue>) -> ProxyError {
        self.metrics.timed_out(ClientTimeout::BodyRead);
        let timeout = runtime.config.server.body_read_timeout;
        ProxyError::BodyTimeout { upstream: upstream_name(runtime, queue), timeout }
    }

    /// Forwards a request for a host no upstream claims, once, without pacing.
    async fn pass_through(
        &self,
        client: &UpstreamClient,
        head: &mut http::request::Parts,
        body: &mut body::RequestBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let request = outbound_request(head, body.for_attempt().unwrap_or_else(body::empty));
        let response = client.send(request, PASS_THROUGH_TIMEOUT).await.map_err(|e| match e {
            crate::upstream::SendError::Timeout(timeout) => {
                ProxyError::UpstreamTimeout { upstream: None, timeout }
            }
            other => ProxyError::UpstreamUnreachable { upstream: None, reason: other.to_string() },
        })?;
        let mut response = inbound_response(response, ());
        response.headers_mut().insert(ATTEMPTS_HEADER, http::HeaderValue::from_static("1"));
        Ok(response)
    }
}

/// The future of an answer that is not on the paced path: known at once, or
/// a CONNECT. Boxed, so that it does not size every request's future.
type Answering = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// A request once checked, routed and cleaned: what forwarding it needs.
struct Prepared {
    /// The caller's head, pacegate's own and hop-by-hop headers removed, its
    /// URI the one it is sent to.
    head: http::request::Parts,
    /// Taken when the body is read.
    incoming: Option<Incoming>,
    /// Where it waits for its upstream, or `None` to pass it through.
    queue: Option<Queue>,
}

impl Prepared {
    fn upstream<'r>(&self, runtime: &'r Runtime) -> Option<&'r Upstream> {
        self.queue.map(|queue| &*runtime.upstreams[queue.upstream as usize])
    }

    /// Its queue and its upstream's cache, when that upstream has one.
    fn cache(&self, runtime: &Runtime) -> Option<(Queue, Arc<Cache>)> {
        let queue = self.queue?;
        Some((queue, self.upstream(runtime)?.cache.clone()?))
    }
}

/// The upstream that paces a request and its place in that queue. Flat (no
/// `Place` inside, no `usize` index) because every queued request keeps it:
/// 16 bytes less here keep hyper's task for a queued h2 stream at 896 bytes
/// instead of 1024.
#[derive(Clone, Copy)]
struct Queue {
    upstream: u32,
    priority: Priority,
    partition: u64,
    caller: u64,
    /// The caller's own bound on its queue wait.
    max_wait: Option<Duration>,
}

impl Queue {
    fn new(upstream: usize, place: Place, max_wait: Option<Duration>) -> Result<Self, ProxyError> {
        let upstream = u32::try_from(upstream).map_err(|_| ProxyError::Internal("upstream index".into()))?;
        let Place { partition, caller, priority } = place;
        Ok(Self { upstream, priority, partition, caller, max_wait })
    }

    fn place(self) -> Place {
        Place { partition: self.partition, caller: self.caller, priority: self.priority }
    }
}

/// Everything about a request that needs no waiting: its size bound, its
/// route, its place in the queue and its cleaned head.
fn prepare(
    runtime: &Runtime,
    peer: SocketAddr,
    request: Request<Incoming>,
    tunnel: Option<(&Scheme, &Authority)>,
) -> Result<Prepared, ProxyError> {
    // Bound what we keep per request before doing any work for it.
    check_header_size(request.headers(), runtime.config.server.max_header_bytes)?;
    let target = match tunnel {
        // Whatever the inner request names, the tunnel decides the host.
        Some((scheme, authority)) => {
            let uri = intercepted_uri(scheme, authority, request.uri())?;
            runtime.router.route(&uri, http::Version::HTTP_11)?
        }
        None => runtime.router.route(request.uri(), request.version())?,
    };
    let (mut head, incoming) = request.into_parts();
    // pacegate's own headers are read, then stripped; one pass over the
    // names says whether there are any (nearly no request has one).
    let own = headers::has_own(&head.headers);
    let max_wait = if own { max_wait(&head.headers)? } else { None };
    let (upstream, uri) = match target {
        Target::Upstream { index, uri } => (Some(index), uri),
        Target::PassThrough { uri } => (None, uri),
    };
    head.uri = uri;
    let queue = match upstream {
        Some(index) => {
            let priority = if own { upstream::priority(&head.headers)? } else { Priority::Normal };
            let place = runtime.upstreams[index].place(&head.headers, peer.ip(), priority);
            Some(Queue::new(index, place, max_wait)?)
        }
        None => None,
    };
    // Our own headers and connection-level ones never travel on.
    headers::strip_hop_by_hop(&mut head.headers, Way::Request);
    headers::add_via(&mut head.headers, head.version);
    if head.version == http::Version::HTTP_2 {
        // HTTP/2 may split `Cookie` into several fields; they are one again
        // before an HTTP/1.1 upstream sees them (RFC 9113 §8.2.3).
        headers::join_cookies(&mut head.headers);
    }
    Ok(Prepared { head, incoming: Some(incoming), queue })
}

/// The target decides the host (RFC 9112 §3.2.2): the client derives Host
/// from the URI, whatever Host (or Hosts) the caller sent. An upstream's own
/// is built once (`Upstream::host`): `insert` replaces the caller's and the
/// client keeps it. A plain function, not inline in `send`'s async block,
/// whose state would keep room for the value in every queued request.
fn set_host(runtime: &Runtime, queue: Option<Queue>, headers: &mut HeaderMap) {
    match queue.and_then(|queue| runtime.upstreams[queue.upstream as usize].host.clone()) {
        Some(host) => headers.insert(header::HOST, host),
        None => headers.remove(header::HOST),
    };
}

/// The name of the upstream that paces `queue`, for error answers.
fn upstream_name(runtime: &Runtime, queue: Option<Queue>) -> Option<String> {
    queue.map(|queue| runtime.upstreams[queue.upstream as usize].config.name.clone())
}

/// 403 when a pass-through target resolves to a guarded address. The guarded
/// client checks again on what it connects to; this check gives the answer.
async fn check_pass_through(uri: &Uri) -> Result<(), ProxyError> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    match guard::resolve_allowed(host, port).await {
        Ok(_) => Ok(()),
        Err(GuardError::Forbidden { host }) => Err(ProxyError::ForbiddenAddress { host }),
        Err(error) => Err(ProxyError::UpstreamUnreachable { upstream: None, reason: error.to_string() }),
    }
}

/// `scheme://authority/path?query` for a request inside an intercepted tunnel.
fn intercepted_uri(scheme: &Scheme, authority: &Authority, inner: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = inner.path_and_query().map_or("/", PathAndQuery::as_str);
    Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))
}

/// Rejects request heads over `max_header_bytes` (names, values and framing).
fn check_header_size(headers: &HeaderMap, limit: usize) -> Result<(), ProxyError> {
    let size: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { limit });
    }
    Ok(())
}

/// The caller's own wait bound (`x-pacegate-max-wait: 5s`), if it sent one.
fn max_wait(headers: &HeaderMap) -> Result<Option<Duration>, ProxyError> {
    let Some(value) = headers.get(MAX_WAIT_HEADER) else {
        return Ok(None);
    };
    let text =
        value.to_str().map_err(|_| ProxyError::BadRequest(format!("{MAX_WAIT_HEADER} is not text")))?;
    config::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| ProxyError::BadRequest(format!("{MAX_WAIT_HEADER}: {e}")))
}
