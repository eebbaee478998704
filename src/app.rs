//! Wiring: listeners, the proxy runtime, the admin listener, reloads and
//! shutdown.
//!
//! The top layer: admin and reloads get handles with what they need (the
//! proxy, metrics, the [`Reloader`]), never the `App`, so nothing below
//! imports this module.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{self, Reloader};
use crate::runtime::{Runtime, Version};
use crate::server::{self, ConnectionSettings};
use crate::tls::TlsError;
use crate::workers::{self, Workers};

/// The two bound listeners pacegate serves.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names (port 0 binds an ephemeral port).
    /// Binds both listeners; an error names the key and the address.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let bind = async |key: &str, address: std::net::SocketAddr| {
            let bound = TcpListener::bind(address).await;
            bound.map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {key} {address}: {e}")))
        };
        let proxy = bind("listen", config.server.listen).await?;
        let admin = bind("admin_listen", config.server.admin_listen).await?;
        Ok(Self { proxy, admin })
    }
}

/// A configured pacegate, ready to run.
#[derive(Debug)]
pub struct App {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    /// Shared by the three reload triggers: SIGHUP, the file, `POST /reload`.
    reloader: Arc<Reloader>,
    /// When this pacegate started, for the admin's uptime.
    started: tokio::time::Instant,
}

impl App {
    /// Builds the first config generation (dispatchers start here); fails
    /// when `[mitm]` names a CA that cannot be loaded.
    pub fn new(config: Config, path: PathBuf) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let metrics = Arc::new(Metrics::new());
        let runtime = Runtime::start(config, Version::new(1, &text), &metrics)?;
        let proxy = Arc::new(Proxy::new(Arc::new(runtime), metrics.clone()));
        let reloader = Arc::new(Reloader::new(path, proxy.clone(), metrics.clone()));
        Ok(Self { proxy, metrics, reloader, started: tokio::time::Instant::now() })
    }

    /// Runs pacegate on bound listeners until `shutdown` resolves, then drains.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let proxy_addr = listeners.proxy.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let config = self.proxy.runtime.load_full().config.clone();
        let settings = connection_settings(&config);
        let grace = settings.shutdown_grace;
        let worker_count = workers::count(config.server.workers);
        let workers = Workers::start(worker_count)?;
        let (stop, stopped) = watch::channel(false);

        let watcher = reload::watch(self.reloader.clone(), wait_for(stopped.clone()));
        tracing::info!(workers = worker_count, "listening proxy={proxy_addr} admin={admin_addr}");
        let admin = Admin::new(self.proxy.clone(), self.metrics.clone(), self.reloader, self.started);
        let history_task = tokio::spawn(admin::keep_history(admin.clone(), wait_for(stopped.clone())));
        let admin_task = tokio::spawn(server::serve(
            listeners.admin,
            Workers::none(),
            settings.clone(),
            self.metrics.clone(),
            move |_peer, request| admin::handle(admin.clone(), request),
            wait_for(stopped.clone()),
        ));
        let proxy = self.proxy.clone();
        let handler = move |peer, request| proxy.clone().handle(peer, request);
        let proxy_task = tokio::spawn(server::serve(
            listeners.proxy,
            workers,
            settings,
            self.metrics,
            handler,
            wait_for(stopped),
        ));

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing queued and in-flight requests");
        let _ = stop.send(true);
        // The config bounds durations to 100 years: no overflow.
        self.proxy.close(Instant::now() + grace, answer_margin(grace));
        let _ = proxy_task.await;
        let _ = admin_task.await;
        let _ = history_task.await;
        drop(watcher);
        tracing::info!("stopped");
        Ok(())
    }
}

fn connection_settings(config: &Config) -> ConnectionSettings {
    let server = &config.server;
    ConnectionSettings {
        max_connections: server.max_connections.get(),
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        send_timeout: server.send_timeout,
        max_header_bytes: server.max_header_bytes,
        shutdown_grace: server.shutdown_grace.max(MIN_ANSWER_MARGIN),
    }
}

/// The end of the shutdown grace kept for answering what cannot be served
/// (503 `shutting_down`) before connections are closed: a tenth of it,
/// between [`MIN_ANSWER_MARGIN`] and [`MAX_ANSWER_MARGIN`] (the grace as
/// applied is never shorter than the least of them).
fn answer_margin(grace: Duration) -> Duration {
    (grace / 10).clamp(MIN_ANSWER_MARGIN, MAX_ANSWER_MARGIN)
}

/// Writing a few thousand short answers takes far less.
const MAX_ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// The least time kept for those answers, so that even `shutdown_grace =
/// "0s"` (serve nothing more) answers every request before its connection
/// closes.
const MIN_ANSWER_MARGIN: Duration = Duration::from_millis(100);

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
