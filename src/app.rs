//! Wiring: listeners, the proxy runtime, the admin listener and shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::config::Config;
use crate::proxy::{Proxy, Runtime};
use crate::server::{self, ConnectionSettings};

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

/// Runs pacegate on bound listeners until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let settings = connection_settings(&config);
    let proxy = Arc::new(Proxy::new(Runtime::start(config)));
    let (stop, stopped) = watch::channel(false);

    tracing::info!("listening proxy={proxy_addr} admin={admin_addr}");
    let admin_task = tokio::spawn(server::serve(
        listeners.admin,
        settings.clone(),
        |_peer, request| admin::handle(request),
        wait_for(stopped.clone()),
    ));
    let handler = move |peer, request| proxy.clone().handle(peer, request);
    let proxy_task = tokio::spawn(server::serve(listeners.proxy, settings, handler, wait_for(stopped)));

    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing queued and in-flight requests");
    let _ = stop.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

fn connection_settings(config: &Config) -> ConnectionSettings {
    let server = &config.server;
    ConnectionSettings {
        max_connections: server.max_connections.get(),
        header_read_timeout: server.header_read_timeout,
        // Heads up to the limit must fit; larger ones get our 431 or hyper's.
        max_buf_size: server.max_header_bytes.saturating_mul(2).saturating_add(8192),
        shutdown_grace: server.shutdown_grace,
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
