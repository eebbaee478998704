//! One worker's upstream connections: connect, keep idle, reuse.
//!
//! Built on `hyper::client::conn` rather than hyper-util's legacy pooled
//! client. A worker's pool is used from its own thread only (see
//! [`crate::workers`]), so it needs none of the legacy pool's shared
//! machinery: no waiters, no connecting locks, no SipHash of a
//! `(Scheme, Authority)` key on checkout and again on return; that
//! machinery and its boxed futures cost about 13 % of a proxied request's
//! instructions (BENCHMARKS.md, issue 23). What the legacy client did, and
//! callers rely on, is kept:
//!
//! - HTTP/1.1: one request at a time per connection; a connection goes back
//!   to the idle list once its answer's body is done and hyper says it is
//!   ready for another, not when the head arrives.
//! - h2 (when ALPN picks it): one connection per origin, shared by all.
//! - A pooled connection found closed before the request was written hands
//!   the request back (`try_send_request`), and it goes again on another
//!   connection: an upstream that closes idle connections is no 502.
//! - `Host` is set from the URI when missing and the URI sent in origin
//!   form on HTTP/1.1; h2 carries both in its pseudo-headers.
//! - Idle connections are closed after [`POOL_IDLE_TIMEOUT`], and at most
//!   [`MAX_IDLE_PER_ORIGIN`] are kept per origin.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::Either;
use http::header::{HOST, TRANSFER_ENCODING};
use http::uri::{Authority, Parts, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use super::guard::Resolver;
use crate::body::ProxyBody;

/// How long an idle pooled connection is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle HTTP/1.1 connections kept per origin and worker. A burst of
/// `max_concurrency` requests opens that many connections; keeping 256 of
/// them idle serves the next burst of that size without new handshakes,
/// while an upstream that answered 10 000 at once does not leave 10 000
/// sockets open for 90 s.
pub const MAX_IDLE_PER_ORIGIN: usize = 256;

/// Why one attempt got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: DNS, TCP connect or TLS handshake failed.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response head within the attempt's timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection broke after (part of) the request may have been sent.
    #[error("connection broken: {0}")]
    Broken(String),
    /// An answer that cannot be passed on, the same again on a retry, so
    /// never retried: its head is larger than the client reads (more than
    /// 100 header fields, or 400 KiB), or its body has a transfer coding
    /// other than `chunked`.
    #[error("the answer cannot be passed on: {0}")]
    Unreadable(String),
}

/// Why an answer's transfer coding is other than `chunked` alone (`gzip,
/// chunked`, or `chunked` twice, which RFC 9112 forbids), if it is. hyper
/// takes one chunking off and leaves the rest, and `Transfer-Encoding` is
/// hop-by-hop: the caller would get a coded body with nothing saying so.
/// nginx answers such an upstream 502 too.
fn foreign_coding(headers: &HeaderMap) -> Option<String> {
    let values = headers.get_all(TRANSFER_ENCODING);
    let mut codings = values.iter().flat_map(|value| value.as_bytes().split(|b| *b == b','));
    let chunked = |coding: &[u8]| coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
    // None at all: a body read to the connection's end, as HTTP/1.0 sends.
    match codings.next() {
        None => return None,
        Some(first) if chunked(first) && codings.next().is_none() => return None,
        Some(_) => {}
    }
    let named: Vec<&str> = values.iter().filter_map(|value| value.to_str().ok()).collect();
    Some(format!("its Transfer-Encoding is {:?}: no coding but chunked, once, is decoded", named.join(", ")))
}

/// DNS, TCP (nodelay, 10 s connect timeout) and rustls, as before the pool.
pub type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// One worker's connector and idle connections.
pub struct Pool {
    /// Owned by this worker: cloned per connection, never shared across cores.
    connector: Connector,
    /// One buffer, one write per request, as on the server side (see
    /// `server::Shared::new`).
    http1: http1::Builder,
    /// hyper's defaults, with a timer for its keep-alive pings.
    http2: http2::Builder<TokioExecutor>,
    /// Locked only by this worker's thread (and by others only when code
    /// outside the workers sends), so never contended.
    idle: Mutex<Idle>,
}

/// The connections of one origin that a request may take.
#[derive(Default)]
struct Origin {
    /// Idle HTTP/1.1 connections, the one used last at the back.
    http1: VecDeque<(http1::SendRequest<ProxyBody>, Instant)>,
    /// The h2 connection every request to this origin shares, and when it
    /// was last used.
    http2: Option<(http2::SendRequest<ProxyBody>, Instant)>,
}

/// Origins by authority, hashed with foldhash. Its seed is random per map,
/// as SipHash's is: pass-through hosts are chosen by callers.
type Origins = HashMap<Key, Origin, foldhash::fast::RandomState>;

/// An origin's authority as the map's key, hashed and compared as the
/// bytes it came with. `Authority`'s own `Hash` and `Eq` ignore ASCII case
/// one byte at a time: about 1 200 instructions a request for a checkout
/// and a return (callgrind, BENCHMARKS.md). A host spelled in two cases
/// only gets two idle lists.
#[derive(Clone)]
struct Key(Authority);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

/// The idle connections, by scheme then authority.
#[derive(Default)]
struct Idle {
    http: Origins,
    https: Origins,
    /// Whether a task is closing expired connections (see [`Pool::reap`]).
    reaping: bool,
}

/// A connection to send one request on.
enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

/// Where a request goes: the key of its connections.
struct Target {
    https: bool,
    authority: Key,
}

impl Pool {
    pub fn new(connector: Connector) -> Self {
        let mut http1 = http1::Builder::new();
        http1.writev(false);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Self { connector, http1, http2, idle: Mutex::default() }
    }

    /// Sends `request` on an idle connection to its origin, or a new one.
    ///
    /// Not an `async fn`: one keeps its arguments where they came in for as
    /// long as it lives, and the request (240 bytes) would be there twice,
    /// in every attempt's future (BENCHMARKS.md, issue 23).
    #[allow(clippy::manual_async_fn)] // see above
    pub fn send(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + '_ {
        async move {
            let target = Target::of(request.uri())?;
            loop {
                let (mut sender, reused) = match self.checkout(&target) {
                    Some(sender) => (sender, true),
                    // Boxed: connecting (TLS, an h2 handshake) holds kilobytes
                    // that every request's future would otherwise carry and copy.
                    None => (Box::pin(self.connect(&target)).await?, false),
                };
                if let Sender::Http1(_) = sender {
                    for_http1(&mut request)?;
                }
                match sender.try_send(request).await {
                    Ok(response) => {
                        self.release(target, sender);
                        // A body of known length has no transfer coding:
                        // most answers are read without a lookup.
                        let sized = response.body().size_hint().exact().is_some();
                        let coded = if sized { None } else { foreign_coding(response.headers()) };
                        return match coded {
                            None => Ok(response),
                            Some(coding) => Err(SendError::Unreadable(coding)),
                        };
                    }
                    // Closed before the request was written: legacy's
                    // `retry_canceled_requests`, on the next connection. Each
                    // turn drops the connection it tried (an h2 one from the
                    // pool too), so this ends at the latest on a new connection.
                    Err(mut error) => match error.take_message() {
                        Some(unsent) if reused => {
                            if let Sender::Http2(_) = sender {
                                self.forget_http2(&target);
                            }
                            request = target.restore(unsent);
                        }
                        _ => {
                            let error = error.into_error();
                            let reason = error_chain(&error);
                            let too_large = error.is_parse_too_large();
                            return Err(if too_large {
                                SendError::Unreadable(format!("its head is too large: {reason}"))
                            } else {
                                SendError::Broken(reason)
                            });
                        }
                    },
                }
            }
        }
    }

    /// An open idle connection to `target`'s origin, dropping closed and
    /// expired ones on the way.
    fn checkout(&self, target: &Target) -> Option<Sender> {
        let mut idle = self.lock();
        let origin = idle.origins(target.https).get_mut(&target.authority)?;
        if let Some((shared, used)) = &mut origin.http2 {
            if !shared.is_closed() {
                *used = Instant::now();
                return Some(Sender::Http2(shared.clone()));
            }
            origin.http2 = None;
        }
        let now = Instant::now();
        while let Some((sender, since)) = origin.http1.pop_back() {
            if now.duration_since(since) >= POOL_IDLE_TIMEOUT {
                // The rest are older still.
                origin.http1.clear();
                break;
            }
            if sender.is_ready() {
                return Some(Sender::Http1(sender));
            }
        }
        None
    }

    /// Puts an HTTP/1.1 connection back once its answer is done with; an h2
    /// one never left.
    fn release(self: &Arc<Self>, target: Target, sender: Sender) {
        let Sender::Http1(mut sender) = sender else { return };
        if sender.is_ready() {
            return self.keep(target, sender);
        }
        // Ready again once the body is read to its end; closed if the body
        // is dropped before that. What the legacy client did, as a task.
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if std::future::poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                pool.keep(target, sender);
            }
        });
    }

    fn keep(self: &Arc<Self>, target: Target, sender: http1::SendRequest<ProxyBody>) {
        let mut idle = self.lock();
        let origin = idle.origins(target.https).entry(target.authority).or_default();
        origin.http1.push_back((sender, Instant::now()));
        if origin.http1.len() > MAX_IDLE_PER_ORIGIN {
            origin.http1.pop_front();
        }
        self.start_reaping(&mut idle);
    }

    /// The origin's shared h2 connection: `sender`, unless a request that
    /// connected at the same time already shares its own.
    fn share(
        self: &Arc<Self>,
        target: &Target,
        sender: http2::SendRequest<ProxyBody>,
    ) -> http2::SendRequest<ProxyBody> {
        let mut idle = self.lock();
        let origin = idle.origins(target.https).entry(target.authority.clone()).or_default();
        let shared = match &origin.http2 {
            Some((shared, _)) if !shared.is_closed() => shared.clone(),
            _ => {
                origin.http2 = Some((sender.clone(), Instant::now()));
                sender
            }
        };
        self.start_reaping(&mut idle);
        shared
    }

    /// Stops sharing an h2 connection that handed a request back: it is
    /// going away, even if hyper does not say it is closed yet.
    fn forget_http2(&self, target: &Target) {
        if let Some(origin) = self.lock().origins(target.https).get_mut(&target.authority) {
            origin.http2 = None;
        }
    }

    /// Opens a connection: DNS, TCP, TLS, then the handshake ALPN chose.
    async fn connect(self: &Arc<Self>, target: &Target) -> Result<Sender, SendError> {
        let mut connector = self.connector.clone();
        let connect_error =
            |e: Box<dyn std::error::Error + Send + Sync>| SendError::Connect(error_chain(&*e));
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(connect_error)?;
        let io = connector.call(target.uri()?).await.map_err(connect_error)?;
        // As with the legacy client, a connection that fails its HTTP
        // handshake counts as broken, not as never reached.
        let broken = |e: hyper::Error| SendError::Broken(error_chain(&e));
        if io.connected().is_negotiated_h2() {
            let (mut sender, connection) = self.http2.handshake(io).await.map_err(broken)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream h2 connection ended");
                }
            });
            sender.ready().await.map_err(broken)?;
            Ok(Sender::Http2(self.share(target, sender)))
        } else {
            let (mut sender, connection) = self.http1.handshake(io).await.map_err(broken)?;
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "upstream connection ended");
                }
            });
            sender.ready().await.map_err(broken)?;
            Ok(Sender::Http1(sender))
        }
    }

    /// A task that closes expired connections, unless one runs already. It
    /// ends with the pool, or once nothing is left idle.
    fn start_reaping(self: &Arc<Self>, idle: &mut Idle) {
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(Self::reap(Arc::downgrade(self)));
        }
    }

    async fn reap(pool: Weak<Self>) {
        loop {
            tokio::time::sleep(POOL_IDLE_TIMEOUT).await;
            let Some(pool) = pool.upgrade() else { return };
            let mut guard = pool.lock();
            let idle = &mut *guard;
            let now = Instant::now();
            for origins in [&mut idle.http, &mut idle.https] {
                origins.retain(|_, origin| origin.sweep(now));
            }
            if idle.http.is_empty() && idle.https.is_empty() {
                idle.reaping = false;
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // The lists stay consistent whatever panicked while holding them.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

// === impl Idle, Origin ===

impl Idle {
    fn origins(&mut self, https: bool) -> &mut Origins {
        if https { &mut self.https } else { &mut self.http }
    }
}

impl Origin {
    /// Drops closed and expired connections; whether any is left.
    fn sweep(&mut self, now: Instant) -> bool {
        let live = |since: Instant| now.duration_since(since) < POOL_IDLE_TIMEOUT;
        self.http1.retain(|(sender, since)| live(*since) && !sender.is_closed());
        if matches!(&self.http2, Some((shared, used)) if !live(*used) || shared.is_closed()) {
            self.http2 = None;
        }
        !self.http1.is_empty() || self.http2.is_some()
    }
}

// === impl Sender, Target ===

impl Sender {
    /// Hands `request` to the connection now; the future waits for the answer.
    fn try_send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>> + Send + use<>
    {
        match self {
            Self::Http1(sender) => Either::Left(sender.try_send_request(request)),
            Self::Http2(sender) => Either::Right(sender.try_send_request(request)),
        }
    }
}

impl Target {
    /// The origin of an absolute URI (the only kind the proxy sends).
    fn of(uri: &Uri) -> Result<Self, SendError> {
        let https = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            Some(scheme) if *scheme == Scheme::HTTP => false,
            Some(other) => return Err(SendError::Connect(format!("unsupported scheme {other}"))),
            None => return Err(SendError::Broken(format!("not an absolute URI: {uri}"))),
        };
        let authority = uri.authority().ok_or_else(|| SendError::Broken(format!("no authority in {uri}")))?;
        Ok(Self { https, authority: Key(authority.clone()) })
    }

    fn scheme(&self) -> Scheme {
        if self.https { Scheme::HTTPS } else { Scheme::HTTP }
    }

    /// The URI the connector dials.
    fn uri(&self) -> Result<Uri, SendError> {
        let uri =
            Uri::builder().scheme(self.scheme()).authority(self.authority.0.clone()).path_and_query("/");
        uri.build().map_err(|e| SendError::Connect(e.to_string()))
    }

    /// A request handed back unsent, its URI absolute again (HTTP/1.1 sent
    /// it in origin form), so that the next connection may be h2.
    fn restore(&self, mut request: Request<ProxyBody>) -> Request<ProxyBody> {
        let mut parts = Parts::default();
        parts.scheme = Some(self.scheme());
        parts.authority = Some(self.authority.0.clone());
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        request
    }
}

/// Aims a request at an HTTP/1.1 connection as the legacy client did: a
/// `Host` from the URI when the request has none, the URI in origin form.
fn for_http1(request: &mut Request<ProxyBody>) -> Result<(), SendError> {
    if request.version() == Version::HTTP_2 {
        return Err(SendError::Broken("an HTTP/2 request on an HTTP/1 connection".into()));
    }
    if !request.headers().contains_key(HOST)
        && let (Some(scheme), Some(authority)) = (request.uri().scheme(), request.uri().authority())
        && let Some(host) = host_header(scheme, authority)
    {
        request.headers_mut().insert(HOST, host);
    }
    let origin_form = match request.uri().path_and_query() {
        Some(path) if path.as_str() != "/" => {
            let mut parts = Parts::default();
            parts.path_and_query = Some(path.clone());
            Uri::from_parts(parts).ok()
        }
        _ => Some(Uri::default()),
    };
    if let Some(uri) = origin_form {
        *request.uri_mut() = uri;
    }
    Ok(())
}

/// The `Host` of an HTTP/1.1 request to `authority`: `host[:port]`, the
/// port left out when it is the scheme's default.
pub fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let host = authority.host();
    let default = crate::config::default_port(scheme);
    match authority.port_u16() {
        Some(port) if port != default => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

/// The error and its causes on one line, for logs and error bodies.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coded(values: &[&'static str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(TRANSFER_ENCODING, HeaderValue::from_static(value));
        }
        foreign_coding(&headers)
    }

    #[test]
    fn only_chunked_once_is_decoded() {
        assert_eq!(coded(&[]), None, "no coding: read to the end");
        assert_eq!(coded(&["chunked"]), None);
        assert_eq!(coded(&[" Chunked "]), None);
        for foreign in
            [&["gzip, chunked"][..], &["gzip", "chunked"], &["chunked, chunked"], &["chunked", "chunked"]]
        {
            let reason = coded(foreign).unwrap_or_else(|| panic!("{foreign:?} passed"));
            assert!(reason.contains(&foreign.join(", ")), "{reason}");
        }
        for foreign in [&["identity"][..], &["chunked,"], &[""], &["gzip"]] {
            assert!(coded(foreign).is_some(), "{foreign:?} passed");
        }
    }
}
