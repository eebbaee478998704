//! Runs the tests' mock LLM API (`tests/support/llm_mock.rs`) as a process,
//! so the token benchmarks measure against exactly the window the tests use.
//!
//! ```text
//! cargo run --example llm_mock -- --listen 127.0.0.1:0 --token-limit 48000/10000 \
//!     --output-len 200 --latency-ms 50 --stream-chunks 16/10
//! ```
//! Prints `listening ADDR` once bound. On SIGINT or SIGTERM it prints one
//! JSON line `{"addr","count","arrivals_ms","statuses","charged","requested","streams",
//! "tokens_charged","max_tokens_in_window"}` (`charged[i]`: the tokens
//! arrival `i` was charged, 0 for a 429; `max_tokens_in_window`: over the
//! `--token-limit` window, null without one) and exits.

#[path = "../tests/support/llm_mock.rs"]
mod llm_mock;
#[path = "process/mod.rs"]
mod process;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use llm_mock::{LlmArrival, LlmBehaviour, LlmMock};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "pacegate's mock LLM API as a process")]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = process::parse_loopback)]
    listen: SocketAddr,
    /// Strict sliding token window as TOKENS/WINDOW_MS, 429 beyond it.
    #[arg(long, value_parser = parse_pair)]
    token_limit: Option<(u64, u64)>,
    /// Completion tokens of an answer the request's cap does not cut.
    #[arg(long, default_value_t = 20)]
    output_len: u64,
    /// Delay before every answer head, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Streamed answers: TOKENS per content delta / MS between events.
    #[arg(long, value_parser = parse_pair)]
    stream_chunks: Option<(u64, u64)>,
}

/// `A/B`, both positive.
fn parse_pair(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('/').ok_or("expected A/B, e.g. 48000/10000")?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || b == 0 {
        return Err("both numbers must be positive".into());
    }
    Ok((a, b))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut behaviour =
        LlmBehaviour::new().output_len(args.output_len).latency(Duration::from_millis(args.latency_ms));
    if let Some((tokens, ms)) = args.token_limit {
        behaviour = behaviour.token_limit(tokens, Duration::from_millis(ms));
    }
    if let Some((tokens, ms)) = args.stream_chunks {
        behaviour = behaviour.stream_chunks(tokens, Duration::from_millis(ms));
    }

    let listener = process::bind(args.listen).await;
    let started = Instant::now();
    let mock = LlmMock::start_on(listener, behaviour).await;
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening {}", mock.addr());
    let _ = stdout.flush();

    process::wait_for_stop(true).await;

    let arrivals = mock.arrivals();
    let window = args.token_limit.map(|(_, ms)| Duration::from_millis(ms));
    let summary = serde_json::json!({
        "addr": mock.addr().to_string(),
        "count": arrivals.len(),
        "arrivals_ms": process::millis_since(started, arrivals.iter().map(|a| a.at)),
        "statuses": arrivals.iter().map(|a| a.status).collect::<Vec<_>>(),
        "charged": arrivals.iter().map(LlmArrival::charged).collect::<Vec<_>>(),
        "requested": arrivals.iter().map(|a| a.prompt_tokens + a.completion_tokens).collect::<Vec<_>>(),
        "streams": arrivals.iter().map(|a| a.stream).collect::<Vec<_>>(),
        "tokens_charged": mock.tokens_charged(),
        "max_tokens_in_window": window.map(|w| mock.max_tokens_in_window(w)),
    });
    let _ = writeln!(stdout, "{summary}");
    let _ = stdout.flush();
    mock.shutdown().await;
}
