//! The proxy service: the life of one request from a caller.
//!
//! Phases, in order: check the request head, route it, read (or start
//! streaming) its body, then exchange it with the upstream. Every phase that
//! fails returns a [`ProxyError`], which becomes the one answer the caller
//! gets.

pub mod headers;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, Request, Response, header};
use hyper::body::Incoming;

use crate::body::{self, BodyError, ProxyBody};
use crate::config;
use crate::error::ProxyError;
use crate::metrics::{Metrics, NO_UPSTREAM};
use crate::runtime::Runtime;
use crate::upstream::{ATTEMPTS_HEADER, Place, UpstreamClient, inbound_response, outbound_request};
use route::Target;

/// Request header with which a caller shortens its own queue wait.
pub const MAX_WAIT_HEADER: &str = "x-pacegate-max-wait";

/// Timeout of one pass-through request (unknown hosts have no config).
const PASS_THROUGH_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared by every connection of the proxy listener.
#[derive(Debug)]
pub struct Proxy {
    /// The config generation new requests use; swapped whole on reload.
    pub runtime: ArcSwap<Runtime>,
    client: UpstreamClient,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(runtime: Arc<Runtime>, metrics: Arc<Metrics>) -> Self {
        Self { runtime: ArcSwap::new(runtime), client: UpstreamClient::new(), metrics }
    }

    /// Answers one request; never fails: errors become SPEC's error answers.
    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let runtime = self.runtime.load_full();
        let mut upstream = None;
        let response = match self.proxy(&runtime, peer, request, &mut upstream).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(code = error.code(), upstream = error.upstream(), "{error}");
                error.into_response()
            }
        };
        self.metrics.count_request(upstream.as_deref().unwrap_or(NO_UPSTREAM), response.status());
        response
    }

    /// Proxies one request; names its upstream in `upstream` once routed.
    async fn proxy(
        &self,
        runtime: &Runtime,
        peer: SocketAddr,
        request: Request<Incoming>,
        upstream: &mut Option<String>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let server = &runtime.config.server;
        // Bound what we keep per request before doing any work for it.
        check_header_size(request.headers(), server.max_header_bytes)?;
        if request.method() == http::Method::CONNECT {
            let host = request.uri().authority().map_or_else(String::new, |a| a.host().to_string());
            return Err(ProxyError::UnknownHost { host });
        }
        let target = runtime.router.route(request.uri(), request.version())?;
        let (mut head, incoming) = request.into_parts();
        let max_wait = max_wait(&head.headers)?;
        let place = match &target {
            Target::Upstream { index, .. } => runtime.upstreams[*index].place(&head.headers, peer.ip())?,
            Target::PassThrough { .. } => Place::default(),
        };
        // Our own headers and connection-level ones never travel on.
        headers::strip_own(&mut head.headers);
        headers::strip_hop_by_hop(&mut head.headers);
        let upstream_name = match &target {
            Target::Upstream { index, .. } => Some(runtime.upstreams[*index].config.name.clone()),
            Target::PassThrough { .. } => None,
        };
        upstream.clone_from(&upstream_name);
        let body = body::read(incoming, server.max_body_bytes, server.max_request_bytes).await.map_err(
            |e| match e {
                BodyError::TooLarge(limit) => ProxyError::BodyTooLarge { upstream: upstream_name, limit },
                BodyError::Read(e) => ProxyError::BadRequest(format!("reading the request body failed: {e}")),
            },
        )?;
        match target {
            Target::Upstream { index, uri } => {
                // base_url decides the host: the client derives Host from the URI.
                head.headers.remove(header::HOST);
                runtime.upstreams[index].exchange(&self.client, head, uri, body, max_wait, place).await
            }
            Target::PassThrough { uri } => self.pass_through(head, uri, body).await,
        }
    }

    /// Forwards a request for a host no upstream claims, once, without pacing.
    async fn pass_through(
        &self,
        head: http::request::Parts,
        uri: http::Uri,
        mut body: body::RequestBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let request = outbound_request(&head, uri, body.for_attempt().unwrap_or_else(body::empty));
        let response = self.client.send(request, PASS_THROUGH_TIMEOUT).await.map_err(|e| match e {
            crate::upstream::SendError::Timeout(timeout) => {
                ProxyError::UpstreamTimeout { upstream: None, timeout }
            }
            other => ProxyError::UpstreamUnreachable { upstream: None, reason: other.to_string() },
        })?;
        let mut response = inbound_response(response, ());
        response.headers_mut().insert(ATTEMPTS_HEADER, http::HeaderValue::from(1u32));
        Ok(response)
    }
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
