//! Accept loop, connection builder and graceful shutdown, shared by the proxy
//! and admin listeners.
//!
//! Entry points take an already bound listener and a shutdown future, so
//! tests bind `127.0.0.1:0` and nothing in the library binds a fixed port.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::ProxyBody;

/// Pause after a failed accept (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A handler's answer as the `Result` hyper's services return.
fn infallible(response: Response<ProxyBody>) -> Result<Response<ProxyBody>, Infallible> {
    Ok(response)
}

/// How connections of one listener are served.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Open connections at most; beyond, new ones wait in the accept backlog.
    pub max_connections: usize,
    /// A request head must arrive within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// Read buffer bound; hyper answers a bare 431 above it.
    pub max_buf_size: usize,
    /// How long in-flight work may take to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

/// Serves `listener` until `shutdown` resolves, then drains connections for
/// at most `shutdown_grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ConnectionSettings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // `writev(false)`: heads and bodies are copied into one buffer and sent
    // with one plain write. Most answers through a proxy are small, and
    // keeping a queue of buffers for writev cost more than the copy
    // (bench: +5 % requests/s, -1 % instructions). Large bodies still
    // stream: the buffer is bounded by `max_buf_size`.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_buf_size.max(8192))
        .writev(false);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        // `map`, not an async block awaiting the handler's future: such a
        // block keeps that future twice in its state, and every request
        // (a queued one too) pays for the handler future's size.
        let service = service_fn(move |request| handler(peer, request).map(infallible));
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(grace_ms = settings.shutdown_grace.as_millis() as u64, "shutdown grace expired with connections still open");
        }
    }
}
