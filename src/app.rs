//! Wiring: listeners, the proxy runtime, the admin listener, reloads and
//! shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Admin};
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload;
use crate::runtime::{Runtime, Version};
use crate::server::{self, ConnectionSettings};
use crate::workers::{self, Workers};

/// The two bound listeners pacegate serves.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names (port 0 binds an ephemeral port).
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let proxy = TcpListener::bind(config.server.listen).await?;
        let admin = TcpListener::bind(config.server.admin_listen).await?;
        Ok(Self { proxy, admin })
    }
}

/// A configured pacegate, ready to run.
#[derive(Debug, Clone)]
pub struct App {
    state: Arc<State>,
}

/// What the proxy, the admin listener and reloads share.
#[derive(Debug)]
pub struct State {
    /// The config file, read again on every reload.
    pub path: PathBuf,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub started: tokio::time::Instant,
    /// Last generation number handed out.
    generation: AtomicU64,
    /// One reload at a time, so generations follow each other.
    reloading: tokio::sync::Mutex<()>,
}

impl App {
    /// Builds the first config generation (dispatchers start here).
    pub fn new(config: Config, path: PathBuf) -> Self {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let metrics = Arc::new(Metrics::new());
        let runtime = Runtime::start(config, Version::new(1, &text), &metrics);
        let state = State {
            path,
            proxy: Arc::new(Proxy::new(Arc::new(runtime), metrics.clone())),
            metrics,
            started: tokio::time::Instant::now(),
            generation: AtomicU64::new(1),
            reloading: tokio::sync::Mutex::new(()),
        };
        Self { state: Arc::new(state) }
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Runs pacegate on bound listeners until `shutdown` resolves, then drains.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let proxy_addr = listeners.proxy.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let config = self.state.proxy.runtime.load_full().config.clone();
        let settings = connection_settings(&config);
        let worker_count = workers::count(config.server.workers);
        let workers = Workers::start(worker_count)?;
        let (stop, stopped) = watch::channel(false);

        tracing::info!("listening proxy={proxy_addr} admin={admin_addr} workers={worker_count}");
        let watcher = reload::watch(self.clone(), wait_for(stopped.clone()));
        let admin = Admin::new(self.clone());
        let metrics = self.state.metrics.clone();
        let admin_task = tokio::spawn(server::serve(
            listeners.admin,
            Workers::none(),
            settings.clone(),
            metrics.clone(),
            move |_peer, request| admin::handle(admin.clone(), request),
            wait_for(stopped.clone()),
        ));
        let proxy = self.state.proxy.clone();
        let handler = move |peer, request| proxy.clone().handle(peer, request);
        let proxy_task = tokio::spawn(server::serve(
            listeners.proxy,
            workers,
            settings,
            metrics,
            handler,
            wait_for(stopped),
        ));

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing queued and in-flight requests");
        let _ = stop.send(true);
        let _ = proxy_task.await;
        let _ = admin_task.await;
        drop(watcher);
        tracing::info!("stopped");
        Ok(())
    }

    /// Reloads the config file; on error the old config keeps serving.
    pub async fn reload(&self, trigger: &'static str) -> Result<Version, config::ConfigError> {
        let state = &self.state;
        let _one_at_a_time = state.reloading.lock().await;
        let loaded = std::fs::read_to_string(&state.path)
            .map_err(|e| config::ConfigError::io(&state.path, &e))
            .and_then(|text| config::parse(&state.path, &text).map(|config| (config, text)));
        let (config, text) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                state.metrics.count_reload(false);
                tracing::error!(trigger, error = %error, "config_rejected");
                return Err(error);
            }
        };
        let current = state.proxy.runtime.load_full();
        let (old, new) = (&current.config.server, &config.server);
        if old.listen != new.listen || old.admin_listen != new.admin_listen || old.workers != new.workers {
            tracing::warn!(trigger, "listener addresses or workers changed: restart pacegate to apply them");
        }
        let version = Version::new(state.generation.fetch_add(1, Ordering::AcqRel) + 1, &text);
        let next = current.reload(config, version.clone(), &state.metrics);
        state.proxy.runtime.store(Arc::new(next));
        state.metrics.count_reload(true);
        tracing::info!(trigger, version = %version, "config_reloaded");
        Ok(version)
    }
}

fn connection_settings(config: &Config) -> ConnectionSettings {
    let server = &config.server;
    ConnectionSettings {
        max_connections: server.max_connections.get(),
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        max_header_bytes: server.max_header_bytes,
        shutdown_grace: server.shutdown_grace,
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
