//! Runs the tests' mock upstream (`tests/support/mock.rs`) as a process, so
//! benchmarks measure against exactly the upstream the tests use.
//!
//! ```text
//! cargo run --example mock_upstream -- --listen 127.0.0.1:0 --limit 10/1000 --latency-ms 5
//! ```
//! Prints `listening ADDR` once bound. On SIGINT, SIGTERM or stdin EOF it
//! prints one JSON line `{"addr","count","arrivals_ms","statuses","status_counts"}`
//! (`arrivals_ms`: arrival times in ms since start, `statuses[i]` answers
//! arrival `i`) and exits. Started with stdin at `/dev/null` (e.g. backgrounded
//! by a script), it would stop at once: pass `--ignore-stdin` then.

#[path = "../tests/support/mock.rs"]
mod mock;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mock::{Behaviour, MockUpstream};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "pacegate's mock upstream as a process")]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_loopback)]
    listen: SocketAddr,
    /// Sliding-window quota as N/WINDOW_MS, answered with 429 + Retry-After beyond it.
    #[arg(long, value_parser = parse_limit)]
    limit: Option<Limit>,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Do not stop when stdin reaches EOF (only on SIGINT/SIGTERM).
    #[arg(long)]
    ignore_stdin: bool,
}

#[derive(Clone, Copy)]
struct Limit {
    n: usize,
    window: Duration,
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{e}"))?;
    // The mock is a test fixture; it has no business on a real interface.
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

fn parse_limit(s: &str) -> Result<Limit, String> {
    let (n, ms) = s.split_once('/').ok_or("expected N/WINDOW_MS, e.g. 10/1000")?;
    let n: usize = n.parse().map_err(|e| format!("N: {e}"))?;
    let ms: u64 = ms.parse().map_err(|e| format!("WINDOW_MS: {e}"))?;
    if n == 0 || ms == 0 {
        return Err("N and WINDOW_MS must both be positive".into());
    }
    let window = Duration::from_millis(ms);
    Ok(Limit { n, window })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut behaviour = Behaviour::new().latency(Duration::from_millis(args.latency_ms));
    if let Some(Limit { n, window }) = args.limit {
        behaviour = behaviour.limit(n, window);
    }

    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let mock = MockUpstream::start_on(listener, behaviour).await;
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening {}", mock.addr());
    let _ = stdout.flush();

    wait_for_stop(args.ignore_stdin).await;

    let arrivals = mock.arrivals();
    let mut status_counts: BTreeMap<String, usize> = BTreeMap::new();
    for arrival in &arrivals {
        *status_counts.entry(arrival.status.to_string()).or_default() += 1;
    }
    let summary = serde_json::json!({
        "addr": mock.addr().to_string(),
        "count": arrivals.len(),
        "arrivals_ms": arrivals
            .iter()
            .map(|a| a.at.duration_since(started).as_micros() as f64 / 1000.0)
            .collect::<Vec<_>>(),
        "statuses": arrivals.iter().map(|a| a.status).collect::<Vec<_>>(),
        "status_counts": status_counts,
    });
    let _ = writeln!(stdout, "{summary}");
    let _ = stdout.flush();
    mock.shutdown().await;
    // tokio's stdin reader blocks a thread the runtime would otherwise wait for.
    std::process::exit(0);
}

/// Resolves on SIGINT, SIGTERM or (unless ignored) EOF on stdin.
async fn wait_for_stop(ignore_stdin: bool) {
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
