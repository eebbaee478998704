//! What the mock binaries share as processes: a loopback-only listen
//! address, binding it, and waiting for the signal to stop. Compiled into
//! each example through `#[path]` (this folder has no `main.rs`, so cargo
//! does not take it for an example of its own).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// A `--listen` value: a socket address on loopback only.
pub fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{e}"))?;
    // The mock is a test fixture; it has no business on a real interface.
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

/// Binds `addr`, or says why and exits 1.
pub async fn bind(addr: SocketAddr) -> TcpListener {
    match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}

/// Resolves on SIGINT, SIGTERM or (unless ignored) EOF on stdin.
pub async fn wait_for_stop(ignore_stdin: bool) {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("cannot watch SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = stdin_eof(), if !ignore_stdin => {}
    }
}

/// Reads and discards stdin until EOF (or a read error, treated the same).
async fn stdin_eof() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    while let Ok(1..) = stdin.read(&mut buf).await {}
}

/// Times as milliseconds since `started`, for the summary line (`arrivals_ms`).
pub fn millis_since(
    started: tokio::time::Instant,
    times: impl Iterator<Item = tokio::time::Instant>,
) -> Vec<f64> {
    times.map(|at| at.duration_since(started).as_micros() as f64 / 1000.0).collect()
}
