//! CONNECT (`HTTPS_PROXY`): intercept, tunnel, or refuse.
//!
//! A host of a configured upstream with `[mitm]` enabled is intercepted: the
//! TLS session is terminated with our leaf for that host and each request
//! inside goes through the same path as a forward request to
//! `https://host/...`, so it is paced, queued and retried. Clients that
//! tunnel `http://` URLs too (Node's undici) send plain HTTP instead of a
//! ClientHello: the first byte tells which, and those requests take the same
//! path as `http://host/...`. Either way the upstream's base_url decides the
//! scheme and port they are sent to, as in forward mode. Anything else is a
//! plain byte tunnel, which pacing cannot see into: to a configured upstream
//! when interception is off (only for the host and port it claims, and to
//! the address of its base_url; counted under that upstream, and warned
//! about once per host as `unpaced_tunnel`), or to an unknown host when
//! `unknown_hosts = "pass"` (then through the private-address guard).
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
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Proxy;
use crate::body::{self, ProxyBody};
use crate::config::UnknownHosts;
use crate::error::ProxyError;
use crate::route;
use crate::runtime::Runtime;
use crate::server::{self, Peeked, Scope};
use crate::upstream::guard::{self, GuardError};

/// Connecting to a tunnel's target must succeed within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte inside an intercepted tunnel, and the client's TLS
/// handshake when it is one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a CONNECT goes, known before anything is connected.
#[derive(Debug)]
pub struct Tunnel {
    authority: Authority,
    port: u16,
    /// The configured upstream that claims the host: the answer to the
    /// CONNECT is counted under it, intercepted or not.
    pub upstream: Option<usize>,
}

impl Tunnel {
    /// The target of a CONNECT request (`host:port`) and its upstream.
    /// Intercepted, the requests inside go to the upstream's base_url
    /// whatever port was named; a plain tunnel is only for the host and port
    /// the upstream claims ([`route::Router::tunnel_upstream`]).
    pub fn of(runtime: &Runtime, uri: &Uri) -> Result<Self, ProxyError> {
        let (authority, port) = route::tunnel_target(uri)?;
        let router = &runtime.router;
        let upstream = if runtime.config.mitm.enabled {
            router.upstream_for_host(&authority)
        } else {
            router.tunnel_upstream(&authority, port)
        };
        Ok(Self { authority, port, upstream })
    }
}

/// Answers a CONNECT: 200 and a tunnel or interception, or an error.
pub async fn connect(
    proxy: &Arc<Proxy>,
    runtime: &Runtime,
    peer: SocketAddr,
    Tunnel { authority, port, upstream }: Tunnel,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let scope = request
        .extensions()
        .get::<Scope>()
        .cloned()
        .ok_or_else(|| ProxyError::Internal("CONNECT outside a client connection".into()))?;
    let host = authority.host().to_string();
    let upgrade = hyper::upgrade::on(&mut request);
    match upstream {
        Some(_) if runtime.config.mitm.enabled => {
            // The generation's CA: loaded with it, replaced by a reload.
            let interceptor = runtime
                .interceptor
                .as_ref()
                .ok_or_else(|| ProxyError::Internal("interception is on without an interceptor".into()))?;
            let tls = interceptor.server_config(&host).map_err(|e| ProxyError::UpstreamUnreachable {
                upstream: None,
                reason: format!("interception: {e}"),
            })?;
            scope.spawn(intercept(proxy.clone(), peer, authority, tls, upgrade, scope.clone()));
        }
        Some(index) => {
            let upstream = &runtime.upstreams[index];
            if upstream.metrics.unpaced_tunnel(&host) {
                let hint = "[mitm] interception is off: requests in this tunnel are not paced";
                tracing::warn!(upstream = %upstream.config.name, host, hint, "unpaced_tunnel");
            }
            // The address connected to is the upstream's own, from its
            // base_url: configured upstreams may point anywhere (loopback
            // included), so that is what the tunnel may reach, no more.
            let base = &upstream.config.base_url;
            let addrs = guard::resolve(&base.host, base.port).await.map_err(unreachable)?;
            tunnel(&scope, upgrade, open(&base.host, &addrs).await?);
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

/// What an intercepted tunnel carries, told by its first byte.
#[derive(Debug, PartialEq, Eq)]
enum Inside {
    /// A TLS record of type handshake: the ClientHello.
    Tls,
    /// A letter: the method of a plain HTTP request (`http://` URLs tunnelled
    /// by clients such as Node's undici).
    Http,
    /// Anything else, or nothing: the tunnel is closed.
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

/// Serves the requests inside an intercepted tunnel (h1 or h2) as a
/// connection of the client connection's `scope`: TLS terminated with our
/// leaf, or plain HTTP as it comes; anything else closes the tunnel.
async fn intercept(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
    upgrade: OnUpgrade,
    scope: Scope,
) {
    let io = match upgrade.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => return tracing::debug!(%error, "CONNECT upgrade failed"),
    };
    let host = authority.host().to_string();
    // The first byte and the handshake after it share one timeout.
    let started = tokio::time::Instant::now();
    let peeked = tokio::select! {
        peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, Peeked::first_byte_of(io)) => match peeked {
            Ok(Ok(peeked)) => peeked,
            Ok(Err(error)) => return tracing::debug!(%error, host, "intercepted tunnel failed"),
            Err(_) => return tracing::debug!(host, "intercepted tunnel sent nothing in time"),
        },
        () = scope.draining() => return,
    };
    let inside = Inside::of(peeked.first());
    let scheme = match inside {
        Inside::Tls => Scheme::HTTPS,
        Inside::Http => Scheme::HTTP,
        Inside::Other => {
            return tracing::debug!(host, first = ?peeked.first(), "closing a tunnel that is neither TLS nor HTTP");
        }
    };
    let handler =
        move |request| proxy.clone().handle_intercepted(peer, scheme.clone(), authority.clone(), request);
    if inside == Inside::Http {
        return server::serve_connection(peeked, scope, handler).await;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout_at(started + HANDSHAKE_TIMEOUT, acceptor.accept(peeked));
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return tracing::debug!(%error, host, "intercepted handshake failed"),
            Err(_) => return tracing::debug!(host, "intercepted handshake timed out"),
        },
        () = scope.draining() => return,
    };
    server::serve_connection(stream, scope, handler).await;
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
