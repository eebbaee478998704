//! CONNECT (`HTTPS_PROXY`): intercept, tunnel, or refuse.
//!
//! A tunnel to a host of a configured upstream is looked into: its first
//! byte tells a TLS ClientHello from plain HTTP, which clients that tunnel
//! `http://` URLs too (Node's undici) send. Plain HTTP needs no CA, so with
//! interception on or off its requests take the same path as a forward
//! request to `http://host/...`: paced, queued and retried. A ClientHello,
//! with `[mitm]` enabled, is answered with our leaf for that host, and each
//! request inside takes the path of `https://host/...`. Either way the
//! upstream's base_url decides the scheme and port they are sent to, as in
//! forward mode, whatever port the CONNECT named.
//!
//! With interception off, what is not plain HTTP goes through a plain byte
//! tunnel, which pacing cannot see into, as it comes (the peeked byte
//! first): only when the CONNECT named the host and port the upstream
//! claims, and only to the address of its base_url; counted under that
//! upstream, and warned about once per host as `unpaced_tunnel`. On another
//! port it is closed. A tunnel to an unknown host is a plain byte tunnel
//! when `unknown_hosts = "pass"` (then through the private-address guard),
//! never looked into.
//!
//! The target is connected to (or the leaf made) before the 200 goes out, so
//! every refusal is a proper error answer; the upgrade resolves after it.
//! The tunnel or intercepted session then runs in the [`Scope`] of the client
//! connection that opened it: it holds that connection's slot, has its idle
//! timeout, and is drained by shutdown like any connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::Proxy;
use crate::body::{self, ProxyBody};
use crate::config::UnknownHosts;
use crate::error::ProxyError;
use crate::route;
use crate::runtime::Runtime;
use crate::server::{self, Peeked, Scope};
use crate::upstream::Upstream;
use crate::upstream::guard::{self, GuardError};

/// Connecting to a tunnel's target must succeed within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte inside a tunnel to an upstream, and the client's TLS
/// handshake when it is intercepted. (Where a plain tunnel may follow, the
/// first byte may take as long as the tunnel may idle.)
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a CONNECT goes, known before anything is connected.
#[derive(Debug)]
pub struct Tunnel {
    authority: Authority,
    port: u16,
    /// The configured upstream that claims the host: the answer to the
    /// CONNECT is counted under it, intercepted or not.
    pub upstream: Option<usize>,
    /// Whether the port named is the one the upstream claims, the only one
    /// a plain tunnel is for ([`route::Router::tunnel_upstream`]).
    claimed: bool,
}

impl Tunnel {
    /// The target of a CONNECT request (`host:port`) and its upstream.
    /// Requests inside go to the upstream's base_url whatever port was
    /// named, so any port of its host is the upstream's.
    pub fn of(runtime: &Runtime, uri: &Uri) -> Result<Self, ProxyError> {
        let (authority, port) = route::tunnel_target(uri)?;
        let router = &runtime.router;
        let upstream = router.upstream_for_host(&authority, None);
        let claimed = upstream.is_some() && router.tunnel_upstream(&authority, port) == upstream;
        Ok(Self { authority, port, upstream, claimed })
    }
}

/// What the requests inside a tunnel keep of its CONNECT.
pub struct Opened {
    /// The host and port the CONNECT named.
    pub authority: Authority,
    /// Its `Proxy-Authorization` (marked sensitive, never logged), which
    /// each request inside must still pass: a reload may have set or
    /// changed `proxy_auth` since.
    pub credentials: Option<HeaderValue>,
}

/// What a tunnel to a configured upstream does with what is not plain HTTP.
enum Otherwise {
    /// Interception is on: a ClientHello is answered with this config (our
    /// leaf for the host); anything else closes the tunnel.
    Intercept(Arc<rustls::ServerConfig>),
    /// Interception is off and the port is the upstream's: relayed as it
    /// comes, to this connection to the upstream's base_url address.
    Relay { target: TcpStream, upstream: Arc<Upstream> },
    /// Interception is off and the port is another: closed.
    Close { upstream: Arc<Upstream>, port: u16 },
}

/// Answers a CONNECT: 200 and a tunnel or interception, or an error.
pub async fn connect(
    proxy: &Arc<Proxy>,
    runtime: &Runtime,
    peer: SocketAddr,
    Tunnel { authority, port, upstream, claimed }: Tunnel,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let scope = request
        .extensions()
        .get::<Scope>()
        .cloned()
        .ok_or_else(|| ProxyError::Internal("CONNECT outside a client connection".into()))?;
    let host = authority.host().to_string();
    let credentials = request.headers().get(header::PROXY_AUTHORIZATION).cloned().map(|mut value| {
        value.set_sensitive(true);
        value
    });
    let upgrade = hyper::upgrade::on(&mut request);
    match upstream {
        Some(index) => {
            let upstream = &runtime.upstreams[index];
            // A failure to reach a configured upstream names it, as a request's would.
            let named = |error: ProxyError| match error {
                ProxyError::UpstreamUnreachable { upstream: None, reason } => {
                    ProxyError::UpstreamUnreachable { upstream: Some(upstream.config.name.clone()), reason }
                }
                other => other,
            };
            let otherwise = match &runtime.interceptor {
                Some(interceptor) => Otherwise::Intercept(interceptor.server_config(&host).map_err(|e| {
                    let reason = format!("interception: {e}");
                    named(ProxyError::UpstreamUnreachable { upstream: None, reason })
                })?),
                // Connected before the 200 as any plain tunnel, though plain
                // HTTP inside will not use it. The address is the upstream's
                // own, from its base_url: configured upstreams may point
                // anywhere (loopback included), so that is what the tunnel
                // may reach, no more.
                None if claimed => {
                    let base = &upstream.config.base_url;
                    let addrs =
                        guard::resolve(&base.host, base.port).await.map_err(|e| named(unreachable(e)))?;
                    let target = open(&base.host, &addrs).await.map_err(named)?;
                    Otherwise::Relay { target, upstream: upstream.clone() }
                }
                None => Otherwise::Close { upstream: upstream.clone(), port },
            };
            let opened = Arc::new(Opened { authority, credentials });
            scope.spawn(inside(proxy.clone(), peer, opened, otherwise, upgrade, scope.clone()));
        }
        None if runtime.config.forward.unknown_hosts == UnknownHosts::Pass => {
            let addrs = if runtime.config.forward.allow_private {
                guard::resolve(&host, port).await
            } else {
                guard::resolve_allowed(&host, port).await
            };
            tunnel(&scope, upgrade, open(&host, &addrs.map_err(unreachable)?).await?);
        }
        None => return Err(ProxyError::UnknownHost { host }),
    }
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

/// A guard refusal is 403, a resolution failure 502.
fn unreachable(error: GuardError) -> ProxyError {
    match error {
        GuardError::Forbidden { host } => ProxyError::ForbiddenAddress { host },
        GuardError::Resolve { .. } => {
            ProxyError::UpstreamUnreachable { upstream: None, reason: error.to_string() }
        }
    }
}

/// Connects to the first of `addrs` (already checked) that answers.
async fn open(host: &str, addrs: &[SocketAddr]) -> Result<TcpStream, ProxyError> {
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) => last = Some(error.to_string()),
            Err(_) => last = Some(format!("no connection within {CONNECT_TIMEOUT:?}")),
        }
    }
    let reason = format!("connecting to {host} failed: {}", last.unwrap_or_default());
    Err(ProxyError::UpstreamUnreachable { upstream: None, reason })
}

/// Copies bytes both ways once the 200 has been sent.
fn tunnel(scope: &Scope, upgrade: OnUpgrade, target: TcpStream) {
    let relay_scope = scope.clone();
    scope.spawn(async move {
        match upgrade.await {
            Ok(upgraded) => server::relay(&relay_scope, TokioIo::new(upgraded), target).await,
            Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
        }
    });
}

/// What a tunnel to an upstream carries, told by its first byte.
#[derive(Debug, PartialEq, Eq)]
enum Inside {
    /// A TLS record of type handshake: the ClientHello.
    Tls,
    /// A letter: the method of a plain HTTP request (`http://` URLs tunnelled
    /// by clients such as Node's undici).
    Http,
    /// Anything else, or nothing (the target of a plain tunnel spoke first).
    Other,
}

impl Inside {
    fn of(first: Option<u8>) -> Self {
        match first {
            Some(0x16) => Self::Tls,
            Some(byte) if byte.is_ascii_alphabetic() => Self::Http,
            _ => Self::Other,
        }
    }
}

/// Serves a tunnel to a configured upstream as a connection of the client
/// connection's `scope`: plain HTTP as it comes (h1 or h2), the rest as
/// `otherwise` says.
async fn inside(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    opened: Arc<Opened>,
    otherwise: Otherwise,
    upgrade: OnUpgrade,
    scope: Scope,
) {
    let mut io = match upgrade.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => return tracing::debug!(%error, "CONNECT upgrade failed"),
    };
    let host = opened.authority.host().to_string();
    // The first byte and the handshake after it share one timeout. The
    // target of a plain tunnel may speak first: its bytes are relayed then,
    // and the client's may take as long as the tunnel may idle.
    let started = tokio::time::Instant::now();
    let wait = match otherwise {
        Otherwise::Relay { .. } => scope.settings().idle_timeout,
        _ => HANDSHAKE_TIMEOUT,
    };
    let mut byte = [0u8; 1];
    let read = tokio::select! {
        // `read` is cancel safe: if the target speaks first, no byte is lost.
        read = tokio::time::timeout(wait, io.read(&mut byte)) => Some(read),
        () = target_speaks(&otherwise) => None,
        () = scope.draining() => return,
    };
    let first = match read {
        Some(Ok(Ok(0))) => return tracing::debug!(host, "tunnel closed before sending anything"),
        Some(Ok(Ok(_))) => Some(byte[0]),
        Some(Ok(Err(error))) => return tracing::debug!(%error, host, "tunnel failed"),
        Some(Err(_)) => return tracing::debug!(host, "tunnel sent nothing in time"),
        None => None,
    };
    let io = Peeked::new(first, io);
    let inside = Inside::of(first);
    let serve = |scheme: Scheme| {
        move |request| proxy.clone().handle_intercepted(peer, scheme.clone(), opened.clone(), request)
    };
    let tls = match (inside, otherwise) {
        (Inside::Http, otherwise) => {
            // Plain HTTP goes to the upstream by its own pool: a relay's
            // connection, made before the 200, is not kept open meanwhile.
            drop(otherwise);
            return server::serve_connection(io, scope, serve(Scheme::HTTP)).await;
        }
        (Inside::Tls, Otherwise::Intercept(tls)) => tls,
        (_, Otherwise::Relay { target, upstream }) => {
            if upstream.metrics.unpaced_tunnel(&host) {
                let hint = "[mitm] interception is off: HTTPS in this tunnel is not paced";
                tracing::warn!(upstream = %upstream.config.name, host, hint, "unpaced_tunnel");
            }
            return server::relay(&scope, io, target).await;
        }
        (_, Otherwise::Close { upstream, port }) => {
            return tracing::warn!(
                upstream = %upstream.config.name,
                host,
                port,
                "closing a tunnel that is not plain HTTP: with [mitm] interception off, such a \
                 tunnel is relayed only to the port the upstream claims (its base_url's, or \
                 one its hosts name)"
            );
        }
        (Inside::Other, Otherwise::Intercept(_)) => {
            return tracing::debug!(host, first = ?first, "closing a tunnel that is neither TLS nor HTTP");
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout_at(started + HANDSHAKE_TIMEOUT, acceptor.accept(io));
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return tracing::debug!(%error, host, "intercepted handshake failed"),
            Err(_) => return tracing::debug!(host, "intercepted handshake timed out"),
        },
        () = scope.draining() => return,
    };
    server::serve_connection(stream, scope, serve(Scheme::HTTPS)).await;
}

/// Resolves when the target of a plain tunnel has something to say (or
/// closed); never for the other tunnels, which the client speaks first in.
async fn target_speaks(otherwise: &Otherwise) {
    match otherwise {
        Otherwise::Relay { target, .. } => drop(target.readable().await),
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::Inside;

    #[test]
    fn the_first_byte_tells_tls_from_http() {
        assert_eq!(Inside::of(Some(0x16)), Inside::Tls);
        for method in ["GET", "POST", "PRI", "delete"] {
            assert_eq!(Inside::of(method.bytes().next()), Inside::Http, "{method}");
        }
        for other in [None, Some(0), Some(b' '), Some(b'\r'), Some(0x80), Some(0x17)] {
            assert_eq!(Inside::of(other), Inside::Other, "{other:?}");
        }
    }
}
