//! Figures for the core proxy and retries (run with `cargo bench --bench pacing`).
//!
//! `benches/` is what `cargo bench` runs, in-process with nothing to install;
//! the end-to-end suite against real processes and nginx is `bench/run.sh`.
//!
//! Prints, for one in-process pacegate against the shared mock upstream:
//! 1. added latency of a request that does not wait: p50/p99 over 10k
//!    sequential requests through pacegate vs direct to the mock;
//! 2. makespan of 1000 requests at 100/s against a mock enforcing 100 per
//!    1 s window, vs the ideal (K-1)/rate = 9.99 s, and the mock's 429s;
//! 3. the same with pacegate misconfigured at 150/s (adaptive pacing).
//!
//! Speed is measured here, never asserted in tests. Under `cargo test` this
//! target only prints that it was skipped.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::mock::{Behaviour, MockUpstream};
use support::{Pacegate, client, upstream};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("pacing benchmark skipped (run it with `cargo bench --bench pacing`)");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        overhead().await;
        makespan("100/s", 100).await;
        makespan("150/s", 100).await;
    });
}

/// p50/p99 of `n` sequential GETs to `url`.
async fn latencies(url: &str, n: usize) -> (Duration, Duration) {
    let http = client();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = http.get(url).send().await.expect("request");
        let _ = response.bytes().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

async fn overhead() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"1000000/s\"\nburst = 1000")).await;
    // Warm both paths (connections, pools) before measuring.
    latencies(&format!("{}/x", mock.url()), 200).await;
    latencies(&pg.url("/api/x"), 200).await;
    let n = 10_000;
    let (direct50, direct99) = latencies(&format!("{}/x", mock.url()), n).await;
    let (proxy50, proxy99) = latencies(&pg.url("/api/x"), n).await;
    println!("overhead over {n} sequential requests:");
    println!("  direct  p50 {direct50:?}  p99 {direct99:?}");
    println!("  proxied p50 {proxy50:?}  p99 {proxy99:?}");
    println!(
        "  added   p50 {:?}  p99 {:?}",
        proxy50.saturating_sub(direct50),
        proxy99.saturating_sub(direct99)
    );
}

async fn makespan(configured: &str, real_limit: usize) {
    let mock = MockUpstream::start(Behaviour::new().limit(real_limit, Duration::from_secs(1))).await;
    let pg = Pacegate::start(&upstream(
        "api",
        &mock.url(),
        &format!("rate = \"{configured}\"\nqueue_size = 2000"),
    ))
    .await;
    let http = client();
    let k = 1000;
    let statuses: Vec<u16> = futures_util::stream::iter(0..k)
        .map(|i| {
            let http = http.clone();
            let url = pg.url(&format!("/api/r{i}"));
            async move { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let accepted: Vec<_> = mock.arrivals().into_iter().filter(|a| a.status == 200).collect();
    let span = accepted.last().map(|l| l.at - accepted[0].at).unwrap_or_default();
    let ideal = (k - 1) as f64 / real_limit as f64;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    println!("{k} requests, pacegate at {configured}, upstream allows {real_limit} per 1 s window:");
    println!(
        "  makespan {:.3} s vs ideal {ideal:.2} s ({:+.1} %), callers 200: {ok}/{k}, 429s at the mock: {}, max in any 1 s window: {}",
        span.as_secs_f64(),
        (span.as_secs_f64() / ideal - 1.0) * 100.0,
        mock.count_status(429),
        mock.max_in_window(Duration::from_secs(1)),
    );
    pg.stop().await.expect("stop");
}
