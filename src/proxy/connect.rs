//! CONNECT (`HTTPS_PROXY`): intercept, tunnel, or refuse.
//!
//! A host of a configured upstream with `[mitm]` enabled is intercepted: the
//! TLS session is terminated with our leaf for that host and each request
//! inside goes through the same path as a forward request to
//! `https://host/...`, so it is paced, queued and retried. Anything else is a
//! plain byte tunnel, which pacing cannot see into: to a configured upstream
//! host when interception is off, or to an unknown host when
//! `unknown_hosts = "pass"` (then through the private-address guard).
//!
//! The target is connected to (or the leaf made) before the 200 goes out, so
//! every refusal is a proper error answer; the upgrade resolves after it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use super::Proxy;
use crate::body::{self, ProxyBody};
use crate::config::UnknownHosts;
use crate::error::ProxyError;
use crate::runtime::Runtime;
use crate::upstream::guard::{self, GuardError};

/// Connecting to a tunnel's target must succeed within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's TLS handshake inside an intercepted tunnel.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers a CONNECT: 200 and a tunnel or interception, or an error.
pub async fn connect(
    proxy: &Arc<Proxy>,
    runtime: &Runtime,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(443);
    let upgrade = hyper::upgrade::on(&mut request);
    match runtime.router.upstream_for_host(&authority) {
        Some(_) if runtime.config.mitm.enabled => {
            let interceptor = proxy.interceptor(&runtime.config.mitm).map_err(|e| {
                ProxyError::UpstreamUnreachable { upstream: None, reason: format!("interception: {e}") }
            })?;
            let tls = interceptor.server_config(&host).map_err(|e| ProxyError::UpstreamUnreachable {
                upstream: None,
                reason: format!("interception: {e}"),
            })?;
            let proxy = proxy.clone();
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(upgraded) => intercept(proxy, peer, authority, tls, TokioIo::new(upgraded)).await,
                    Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
                }
            });
        }
        Some(_) => {
            // Configured upstreams may point anywhere: no guard.
            let addrs = guard::resolve(&host, port).await.map_err(unreachable)?;
            tunnel(upgrade, open(&host, &addrs).await?);
        }
        None if runtime.config.forward.unknown_hosts == UnknownHosts::Pass => {
            let addrs = if runtime.config.forward.allow_private {
                guard::resolve(&host, port).await
            } else {
                guard::resolve_allowed(&host, port).await
            };
            tunnel(upgrade, open(&host, &addrs.map_err(unreachable)?).await?);
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
fn tunnel(upgrade: hyper::upgrade::OnUpgrade, mut target: TcpStream) {
    tokio::spawn(async move {
        let mut client = match upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => return tracing::debug!(%error, "CONNECT upgrade failed"),
        };
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut target).await {
            tracing::debug!(%error, "tunnel ended with an error");
        }
    });
}

/// Terminates TLS with our leaf and serves the requests inside (h1 or h2).
async fn intercept(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
    io: TokioIo<hyper::upgrade::Upgraded>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return tracing::debug!(%error, host = authority.host(), "intercepted handshake failed");
        }
        Err(_) => return tracing::debug!(host = authority.host(), "intercepted handshake timed out"),
    };
    let service = service_fn(move |request| {
        let response = proxy.clone().handle_intercepted(peer, authority.clone(), request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(%error, "intercepted connection ended with an error");
    }
}
