//! Runs the tests' mock upstream (`tests/support/mock.rs`) as a process, so
//! benchmarks measure against exactly the upstream the tests use.
//!
//! ```text
//! cargo run --example mock_upstream -- --listen 127.0.0.1:0 --limit 10/1000 --latency-ms 5
//! cargo run --example mock_upstream -- \
//!     --resource name=points,limit=100/1000,cost.POST=5 \
//!     --resource name=writes,limit=10/1000,methods=POST+PATCH
//! ```
//! `--resource` adds a named limit (`Resource`: GitHub-shaped points and
//! write limits): `name` and `limit=N/WINDOW_MS` are required, `methods` is
//! a `+`-separated list (default: every method), each `cost.METHOD=UNITS`
//! weighs a method (default 1). `--outage START_MS/DURATION_MS` answers 500
//! to everything for DURATION_MS, from START_MS after start (an upstream
//! that goes down in the middle of a load).
//!
//! Prints `listening ADDR` once bound. On SIGINT, SIGTERM or stdin EOF it
//! prints one JSON line `{"addr","count","arrivals_ms","statuses","methods","status_counts"}`
//! (`arrivals_ms`: arrival times in ms since start, `statuses[i]` and
//! `methods[i]` belong to arrival `i`) and exits. Started with stdin at `/dev/null` (e.g. backgrounded
//! by a script), it would stop at once: pass `--ignore-stdin` then.

#[path = "../tests/support/mock.rs"]
mod mock;
#[path = "process/mod.rs"]
mod process;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mock::{Behaviour, MockUpstream, Resource};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "pacegate's mock upstream as a process")]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = process::parse_loopback)]
    listen: SocketAddr,
    /// Sliding-window quota as N/WINDOW_MS, answered with 429 + Retry-After beyond it.
    #[arg(long, value_parser = parse_limit)]
    limit: Option<Limit>,
    /// A named limit, repeatable: `name=NAME,limit=N/WINDOW_MS[,methods=A+B][,cost.METHOD=UNITS]...`.
    #[arg(long = "resource", value_parser = parse_resource)]
    resources: Vec<Resource>,
    /// An outage: 500 to everything from START_MS after start, for DURATION_MS.
    #[arg(long, value_parser = parse_outage)]
    outage: Option<(Duration, Duration)>,
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

fn parse_outage(s: &str) -> Result<(Duration, Duration), String> {
    let (start, length) = s.split_once('/').ok_or("expected START_MS/DURATION_MS, e.g. 5000/10000")?;
    let start: u64 = start.parse().map_err(|e| format!("START_MS: {e}"))?;
    let length: u64 = length.parse().map_err(|e| format!("DURATION_MS: {e}"))?;
    Ok((Duration::from_millis(start), Duration::from_millis(length)))
}

fn parse_resource(s: &str) -> Result<Resource, String> {
    let (mut name, mut limit, mut methods, mut costs) = (None, None, Vec::new(), Vec::new());
    for field in s.split(',') {
        let (key, value) = field.split_once('=').ok_or_else(|| format!("{field:?}: expected KEY=VALUE"))?;
        match key {
            "name" if !value.is_empty() => name = Some(value),
            "limit" => limit = Some(parse_limit(value)?),
            "methods" => methods.extend(value.split('+').filter(|m| !m.is_empty())),
            _ => {
                let method = key.strip_prefix("cost.").filter(|m| !m.is_empty());
                let method =
                    method.ok_or_else(|| format!("{key:?}: expected name, limit, methods or cost.METHOD"))?;
                let units: u64 = value.parse().map_err(|e| format!("cost.{method}: {e}"))?;
                if units == 0 {
                    return Err(format!("cost.{method}: at least one unit"));
                }
                costs.push((method, units));
            }
        }
    }
    let name = name.ok_or("a resource needs name=NAME")?;
    let Limit { n, window } = limit.ok_or("a resource needs limit=N/WINDOW_MS")?;
    let mut resource = Resource::new(name, n as u64, window);
    if !methods.is_empty() {
        resource = resource.methods(&methods);
    }
    for (method, units) in costs {
        resource = resource.cost(method, units);
    }
    Ok(resource)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut behaviour = Behaviour::new().latency(Duration::from_millis(args.latency_ms));
    if let Some(Limit { n, window }) = args.limit {
        behaviour = behaviour.limit(n, window);
    }
    for resource in args.resources {
        behaviour = behaviour.resource(resource);
    }

    let listener = process::bind(args.listen).await;
    let started = Instant::now();
    let mock = std::sync::Arc::new(MockUpstream::start_on(listener, behaviour.clone()).await);
    if let Some((start, length)) = args.outage {
        let mock = mock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(start).await;
            mock.set_behaviour(behaviour.fail_for(length, 500));
        });
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening {}", mock.addr());
    let _ = stdout.flush();

    process::wait_for_stop(args.ignore_stdin).await;

    let arrivals = mock.arrivals();
    let mut status_counts: BTreeMap<String, usize> = BTreeMap::new();
    for arrival in &arrivals {
        *status_counts.entry(arrival.status.to_string()).or_default() += 1;
    }
    let summary = serde_json::json!({
        "addr": mock.addr().to_string(),
        "count": arrivals.len(),
        "arrivals_ms": process::millis_since(started, arrivals.iter().map(|a| a.at)),
        "statuses": arrivals.iter().map(|a| a.status).collect::<Vec<_>>(),
        "methods": arrivals.iter().map(|a| a.method.as_str()).collect::<Vec<_>>(),
        "status_counts": status_counts,
    });
    let _ = writeln!(stdout, "{summary}");
    let _ = stdout.flush();
    // tokio's stdin reader blocks a thread the runtime would otherwise wait for.
    std::process::exit(0);
}
