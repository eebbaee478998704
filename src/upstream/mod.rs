//! Upstreams at run time: a configured API, its dispatcher, and one exchange.
//!
//! An exchange is the life of one proxied request against one upstream:
//! wait for a ticket (queue, quotas, concurrency), send the attempt, and hand
//! the answer back while it streams.

pub mod client;
pub mod dispatcher;

use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use tokio::time::Instant;

use crate::body::{self, ProxyBody, RequestBody};
use crate::config;
use crate::error::ProxyError;
use crate::proxy::headers;
pub use client::{SendError, UpstreamClient};
pub use dispatcher::{Dispatcher, Refusal, Ticket};

/// Header telling the caller how many attempts its answer took.
pub const ATTEMPTS_HEADER: &str = "x-pacegate-attempts";
/// Header telling the caller how long it waited in pacegate's queue.
pub const QUEUED_HEADER: &str = "x-pacegate-queued-ms";

/// A configured upstream with its running dispatcher.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    pub dispatcher: Dispatcher,
}

impl Upstream {
    /// Starts the dispatcher of a configured upstream.
    pub fn start(config: config::Upstream) -> Self {
        let dispatcher = Dispatcher::spawn(&config);
        Self { config, dispatcher }
    }

    /// Sends one request through this upstream's queue and pacing.
    pub async fn exchange(
        &self,
        client: &UpstreamClient,
        head: http::request::Parts,
        uri: Uri,
        mut body: RequestBody,
        max_wait: Option<Duration>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let name = &self.config.name;
        let wait = max_wait.map_or(self.config.queue_timeout, |w| w.min(self.config.queue_timeout));
        let ticket = self.dispatcher.join(Instant::now() + wait).await.map_err(|refusal| match refusal {
            Refusal::Full { retry_after } => {
                tracing::warn!(upstream = %name, reason = "queue_full", "queue_full");
                ProxyError::QueueFull { upstream: name.clone(), retry_after }
            }
            Refusal::Timeout { waited, retry_after } => {
                tracing::warn!(upstream = %name, reason = "queue_timeout", waited_ms = waited.as_millis() as u64, "queue_timeout");
                ProxyError::QueueTimeout { upstream: name.clone(), waited, retry_after }
            }
        })?;
        let attempt_body = body.for_attempt().unwrap_or_else(body::empty);
        let request = outbound_request(&head, uri, attempt_body);
        let waited = ticket.waited;
        let response = client.send(request, self.config.timeout).await.map_err(|e| match e {
            SendError::Timeout(timeout) => {
                ProxyError::UpstreamTimeout { upstream: Some(name.clone()), timeout }
            }
            SendError::Connect(reason) | SendError::Broken(reason) => {
                ProxyError::UpstreamUnreachable { upstream: Some(name.clone()), reason }
            }
        })?;
        let mut response = inbound_response(response, ticket);
        response.headers_mut().insert(ATTEMPTS_HEADER, HeaderValue::from(1u32));
        response.headers_mut().insert(QUEUED_HEADER, HeaderValue::from(waited.as_millis() as u64));
        Ok(response)
    }
}

/// The request one attempt sends: the caller's head, cleaned, at `uri`.
pub fn outbound_request(head: &http::request::Parts, uri: Uri, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = uri;
    // The pooled client negotiates h2 itself; it refuses HTTP/2-versioned
    // requests on HTTP/1 connections.
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = head.headers.clone();
    request
}

/// The answer for the caller: hop-by-hop headers removed, body streamed while
/// `guard` (the attempt's concurrency slot) stays held.
pub fn inbound_response<G: Send + Sync + 'static>(
    response: Response<hyper::body::Incoming>,
    guard: G,
) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // The caller's connection decides the version it is answered in.
    parts.version = http::Version::default();
    Response::from_parts(parts, body::guarded(body::stream(incoming), guard))
}
