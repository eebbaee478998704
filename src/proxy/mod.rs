//! The proxy service: the life of one request from a caller.
//!
//! Phases, in order: authenticate the caller, check the request head, route
//! it, read (or start streaming) its body, then exchange it with the
//! upstream. Every phase that fails returns a [`ProxyError`], which becomes
//! the one answer the caller gets. CONNECT leaves this path for
//! [`connect`]; requests inside an intercepted tunnel come back to it.

pub mod auth;
pub mod connect;
pub mod headers;
pub mod route;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Request, Response, Uri, header};
use hyper::body::Incoming;

use crate::body::{self, BodyError, ProxyBody};
use crate::config;
use crate::error::ProxyError;
use crate::metrics::{Metrics, NO_UPSTREAM};
use crate::runtime::Runtime;
use crate::tls::{Interceptor, TlsError};
use crate::upstream::guard::{self, GuardError};
use crate::upstream::{ATTEMPTS_HEADER, Place, Upstream, UpstreamClient, inbound_response, outbound_request};
use route::Target;

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
    /// The CA interception signs with, loaded for the `[mitm]` paths it names.
    interceptor: Mutex<Option<(config::Mitm, Arc<Interceptor>)>>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(runtime: Arc<Runtime>, metrics: Arc<Metrics>) -> Self {
        Self {
            runtime: ArcSwap::new(runtime),
            client: UpstreamClient::new(),
            guarded_client: UpstreamClient::guarded(),
            interceptor: Mutex::new(None),
            metrics,
        }
    }

    /// Answers one request; never fails: errors become SPEC's error answers.
    ///
    /// Neither this nor the steps a queued request goes through (`proxy`,
    /// `forward`, `Upstream::exchange`) is an `async fn`: an async fn keeps
    /// every argument twice in its state (as passed and as bound), and a
    /// queued request keeps its state for as long as it waits. Each step
    /// does what needs no waiting first, and what it keeps for later is
    /// stored once.
    #[allow(clippy::manual_async_fn)] // on purpose, see above
    pub fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        async move {
            let runtime = self.runtime.load_full();
            let mut upstream = None;
            let result = match auth::check(request.headers(), &runtime.config.server.proxy_auth) {
                Err(error) => Err(error),
                Ok(()) if request.method() == http::Method::CONNECT => {
                    match check_header_size(request.headers(), runtime.config.server.max_header_bytes) {
                        // Boxed: rare, and its state would otherwise size every request's.
                        Ok(()) => Box::pin(connect::connect(&self, &runtime, peer, request)).await,
                        Err(error) => Err(error),
                    }
                }
                Ok(()) => self.proxy(&runtime, peer, request, None, &mut upstream).await,
            };
            self.answer(result, upstream.as_deref())
        }
    }

    /// Answers one request from inside an intercepted CONNECT tunnel to
    /// `authority`, as if it were a forward request to `https://authority/...`.
    /// The tunnel was authenticated when it was opened.
    pub async fn handle_intercepted(
        self: Arc<Self>,
        peer: SocketAddr,
        authority: Authority,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let runtime = self.runtime.load_full();
        let mut upstream = None;
        let result = self.proxy(&runtime, peer, request, Some(&authority), &mut upstream).await;
        self.answer(result, upstream.as_deref())
    }

    /// The interceptor for these `[mitm]` paths, loading the CA on first use.
    pub fn interceptor(&self, mitm: &config::Mitm) -> Result<Arc<Interceptor>, TlsError> {
        let mut slot = self.interceptor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((loaded_for, interceptor)) = slot.as_ref()
            && loaded_for == mitm
        {
            return Ok(interceptor.clone());
        }
        let interceptor = Arc::new(Interceptor::load(mitm)?);
        *slot = Some((mitm.clone(), interceptor.clone()));
        Ok(interceptor)
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

    /// Proxies one request; names its upstream in `upstream` once routed.
    /// `tunnel` is the authority of the intercepted CONNECT it came through.
    fn proxy<'a>(
        &'a self,
        runtime: &'a Runtime,
        peer: SocketAddr,
        request: Request<Incoming>,
        tunnel: Option<&Authority>,
        upstream: &mut Option<Arc<Upstream>>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
        match prepare(runtime, peer, request, tunnel) {
            Err(error) => Either::Left(std::future::ready(Err(error))),
            Ok(prepared) => {
                if let Target::Upstream { index, .. } = &prepared.target {
                    *upstream = Some(runtime.upstreams[*index].clone());
                }
                Either::Right(self.forward(runtime, prepared))
            }
        }
    }

    /// Reads the body, then exchanges the request with its upstream, or
    /// passes it through when no upstream claims its host.
    fn forward<'a>(
        &'a self,
        runtime: &'a Runtime,
        mut request: Prepared,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
        let server = &runtime.config.server;
        async move {
            let upstream_name = |target: &Target| match target {
                Target::Upstream { index, .. } => Some(runtime.upstreams[*index].config.name.clone()),
                Target::PassThrough { .. } => None,
            };
            let body = body::read(request.incoming, server.max_body_bytes, server.max_request_bytes)
                .await
                .map_err(|e| match e {
                    BodyError::TooLarge(limit) => {
                        ProxyError::BodyTooLarge { upstream: upstream_name(&request.target), limit }
                    }
                    BodyError::Read(e) => {
                        ProxyError::BadRequest(format!("reading the request body failed: {e}"))
                    }
                })?;
            match request.target {
                Target::Upstream { index, uri } => {
                    // base_url decides the host: the client derives Host from the URI.
                    request.head.headers.remove(header::HOST);
                    let client = runtime.client_for(index, &self.client);
                    let upstream = &runtime.upstreams[index];
                    upstream.exchange(client, request.head, uri, body, request.max_wait, request.place).await
                }
                Target::PassThrough { uri } => {
                    let client = if runtime.config.forward.allow_private {
                        &self.client
                    } else {
                        check_pass_through(&uri).await?;
                        &self.guarded_client
                    };
                    // Boxed like CONNECT: only unknown hosts take this path.
                    Box::pin(self.pass_through(client, request.head, uri, body)).await
                }
            }
        }
    }

    /// Forwards a request for a host no upstream claims, once, without pacing.
    async fn pass_through(
        &self,
        client: &UpstreamClient,
        head: http::request::Parts,
        uri: http::Uri,
        mut body: body::RequestBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let request = outbound_request(&head, uri, body.for_attempt().unwrap_or_else(body::empty));
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

/// A request once checked, routed and cleaned: what forwarding it needs.
struct Prepared {
    target: Target,
    /// The caller's head, pacegate's own and hop-by-hop headers removed.
    head: http::request::Parts,
    incoming: Incoming,
    /// The caller's own bound on its queue wait.
    max_wait: Option<Duration>,
    place: Place,
}

/// Everything about a request that needs no waiting: its size bound, its
/// route, its place in the queue and its cleaned head.
fn prepare(
    runtime: &Runtime,
    peer: SocketAddr,
    request: Request<Incoming>,
    tunnel: Option<&Authority>,
) -> Result<Prepared, ProxyError> {
    // Bound what we keep per request before doing any work for it.
    check_header_size(request.headers(), runtime.config.server.max_header_bytes)?;
    let target = match tunnel {
        // Whatever the inner request names, the tunnel decides the host.
        Some(authority) => {
            let uri = intercepted_uri(authority, request.uri())?;
            runtime.router.route(&uri, http::Version::HTTP_11)?
        }
        None => runtime.router.route(request.uri(), request.version())?,
    };
    let (mut head, incoming) = request.into_parts();
    let max_wait = max_wait(&head.headers)?;
    let place = match &target {
        Target::Upstream { index, .. } => runtime.upstreams[*index].place(&head.headers, peer.ip())?,
        Target::PassThrough { .. } => Place::default(),
    };
    // Our own headers and connection-level ones never travel on.
    headers::strip_own(&mut head.headers);
    headers::strip_hop_by_hop(&mut head.headers);
    Ok(Prepared { target, head, incoming, max_wait, place })
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

/// `https://authority/path?query` for a request inside an intercepted tunnel.
fn intercepted_uri(authority: &Authority, inner: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = inner.path_and_query().map_or("/", PathAndQuery::as_str);
    Uri::builder()
        .scheme(Scheme::HTTPS)
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
