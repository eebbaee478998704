//! Client connections: the accept loop, what one connection may hold, and
//! graceful shutdown, shared by the proxy and admin listeners.
//!
//! Entry points take an already bound listener and a shutdown future, so
//! tests bind `127.0.0.1:0` and nothing in the library binds a fixed port.
//!
//! Every connection holds one of `max_connections` slots in a [`Scope`] for
//! as long as anything it started runs: a CONNECT tunnel or an intercepted
//! TLS session keeps the slot of the connection that opened it, so tunnels
//! count against the cap and shutdown waits for them like for any request.
//! Shutdown has two phases: *draining* (no new connections; each one
//! finishes what it is doing and closes) for at most `shutdown_grace`, then
//! *stopped* (whatever is left is closed).
//!
//! - [`connection`]: serving HTTP on one connection (timeouts, panics).
//! - [`guard`], [`framing`], [`head`]: HTTP/1 request heads are checked before
//!   hyper sees them, so every malformed head gets the documented answer.
//! - [`tunnel`]: byte relays for CONNECT, with an idle timeout, and the
//!   first byte of a tunnel, peeked at.
//!
//! [`serve`] hands each connection to [`Workers`] (the threads, one per
//! core, that serve the proxy listener), or serves it where it was accepted.

mod activity;
pub mod connection;
pub(crate) mod framing;
mod guard;
pub(crate) mod head;
mod tunnel;
mod woken;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::body::ProxyBody;
use crate::metrics::Metrics;
use crate::workers::Workers;
pub use connection::{CloseConnection, serve_connection};
pub use tunnel::{Peeked, relay};

/// Pause after a failed accept (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How connections of one listener are served.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Open connections (and the tunnels they became) at most; beyond, new
    /// ones wait in the accept backlog.
    pub max_connections: usize,
    /// Once its first byte arrived (or the connection opened), a request
    /// head must be complete within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// A connection with nothing in flight is closed after this time; a
    /// tunnel after this long without a byte either way.
    pub idle_timeout: Duration,
    /// A connection whose caller takes nothing of an answer for this long
    /// is closed, with every request on it.
    pub send_timeout: Duration,
    /// Request heads (request line and headers) larger than this are refused.
    pub max_header_bytes: usize,
    /// How long in-flight work may take to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

/// Where shutdown is; connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish what is in flight, then close.
    Draining,
    /// The grace is over: close now.
    Stopped,
}

/// What every connection of one listener shares.
struct Shared {
    settings: ConnectionSettings,
    /// hyper's HTTP/1 and h2 server, configured once per listener.
    builder: auto::Builder<CatchingExecutor>,
    /// Panics and refused heads are counted here.
    metrics: Arc<Metrics>,
}

/// One client connection's hold on the server: its connection slot and the
/// shutdown phase. Cloned into every request's extensions, so that a tunnel
/// opened by a request can keep it.
#[derive(Clone)]
pub struct Scope(Arc<ScopeInner>);

struct ScopeInner {
    /// One of `max_connections`, released when the last clone is dropped.
    _slot: OwnedSemaphorePermit,
    phase: watch::Receiver<Phase>,
    shared: Arc<Shared>,
}

/// Serves `listener` until `shutdown` resolves, then drains connections for
/// at most `shutdown_grace`. Connections are served on `workers` (on the
/// calling runtime if there are none); they end when this returns.
pub async fn serve<H, F>(
    listener: TcpListener,
    mut workers: Workers,
    settings: ConnectionSettings,
    metrics: Arc<Metrics>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let shared = Arc::new(Shared::new(settings, metrics));
    // A semaphore holds at most u32::MAX permits at once for `acquire_many`.
    let capacity = shared.settings.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(capacity));
    let (phase, phases) = watch::channel(Phase::Serving);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
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
        let scope =
            Scope(Arc::new(ScopeInner { _slot: slot, phase: phases.clone(), shared: shared.clone() }));
        let handler = handler.clone();
        workers.hand_over(stream, move |stream| {
            scope.spawn(serve_connection(stream, scope.clone(), move |request| handler(peer, request)));
        });
    }
    drop(listener);
    let _ = phase.send(Phase::Draining);
    // Every slot back means every connection and tunnel has ended.
    let all = slots.acquire_many(capacity as u32);
    if tokio::time::timeout(shared.settings.shutdown_grace, all).await.is_err() {
        let grace_ms = shared.settings.shutdown_grace.as_millis() as u64;
        tracing::warn!(grace_ms, "shutdown grace expired with connections still open: closing them");
    }
    let _ = phase.send(Phase::Stopped);
    workers.join().await;
}

// === impl Shared ===

impl Shared {
    fn new(settings: ConnectionSettings, metrics: Arc<Metrics>) -> Self {
        let mut builder = auto::Builder::new(CatchingExecutor { metrics: metrics.clone() });
        // Heads are checked and timed by `guard` before hyper parses them, so
        // hyper's own header timeout (which also cuts idle keep-alive
        // connections) is off; its buffer only has to fit what passed.
        let max_buf = settings.max_header_bytes.saturating_mul(2).saturating_add(8192);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            // No `max_headers`: `guard` refuses more than `head::MAX_HEADERS`
            // (hyper's default, 100) first, and setting it makes hyper fill
            // two 100-slot arrays per request instead of leaving them
            // uninitialised (about 1 700 instructions, BENCHMARKS.md).
            .max_buf_size(max_buf)
            // One buffer and one plain write per message: most answers
            // through a proxy are small, and a queue of buffers for writev
            // cost more than the copy (bench: +5 % requests/s).
            .writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_buf).unwrap_or(u32::MAX));
        Self { settings, builder, metrics }
    }
}

// === impl Scope ===

impl Scope {
    pub fn settings(&self) -> &ConnectionSettings {
        &self.0.shared.settings
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.0.shared
    }

    /// Resolves once shutdown has started.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await;
    }

    /// Resolves once the shutdown grace is over: close everything now.
    pub async fn stopped(&self) {
        self.reached(Phase::Stopped).await;
    }

    /// Resolves with the phase once it is past `seen`: one watch for a
    /// connection that reacts to both phases, instead of two polled on
    /// every wake of its task.
    async fn past(&self, seen: Phase) -> Phase {
        let mut phases = self.0.phase.clone();
        // An error means the server is gone: as good as stopped.
        phases.wait_for(|now| *now > seen).await.map_or(Phase::Stopped, |now| *now)
    }

    async fn reached(&self, phase: Phase) {
        let mut phases = self.0.phase.clone();
        // An error means the server is gone: as good as stopped.
        let _ = phases.wait_for(|now| *now >= phase).await;
    }

    /// Runs `task` (a connection, a tunnel) on its own tokio task, holding
    /// this scope until it ends; a panic in it is logged and counted, and
    /// only that task ends.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let scope = self.clone();
        tokio::spawn(async move {
            if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
                scope.shared().metrics.panicked(panic.as_ref(), "connection");
            }
            drop(scope);
        });
    }
}

/// hyper's executor for the tasks it spawns (HTTP/2 streams): tokio, with
/// panics caught and counted like those of request tasks.
#[derive(Clone)]
struct CatchingExecutor {
    metrics: Arc<Metrics>,
}

impl<F> hyper::rt::Executor<F> for CatchingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        let metrics = self.metrics.clone();
        // `map`, not an async block awaiting the task: such a block keeps
        // the task twice (as captured and as awaited), and every queued h2
        // request would pay for that.
        tokio::spawn(AssertUnwindSafe(task).catch_unwind().map(move |ended| {
            if let Err(panic) = ended {
                metrics.panicked(panic.as_ref(), "stream");
            }
        }));
    }
}
