//! Soak: steady load through pacegate with scripted upstream faults,
//! malformed requests and periodic reloads, for `PACEGATE_SOAK_SECS` seconds
//! (30 by default; `PACEGATE_SOAK_SECS=120 scripts/test.sh` is the long run).
//!
//! Asserts that every request got exactly one answer (callers never wait
//! forever, and pacegate counted one answer per request), that resident
//! memory and open file descriptors stay flat after the warm-up, and that
//! every queue drains to zero. Memory and descriptors are the whole test
//! process's (pacegate runs in it, with the mocks and the callers), so the
//! bounds are generous; a leak of one descriptor or a few kilobytes per
//! request still crosses them.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::{Pacegate, TEST_SERVER, client, queue_depth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Callers sending one request after another, all the time.
const CALLERS: usize = 16;
/// A caller's bound on one answer: a hang is a failure, not a wait.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// How often faults are scripted, malformed requests sent, and the config reloaded.
const FAULT_EVERY: Duration = Duration::from_millis(250);
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Growth allowed after the warm-up.
const FD_SLACK: usize = 16;
const RSS_SLACK_KB: u64 = 8 * 1024;

/// `PACEGATE_SOAK_SECS`, else 30 s.
fn soak_duration() -> Duration {
    let secs = std::env::var("PACEGATE_SOAK_SECS").ok().and_then(|secs| secs.parse().ok());
    Duration::from_secs(secs.unwrap_or(30))
}

/// The config of reload `generation`: the faulty upstream's rate alternates.
fn config(faulty: &MockUpstream, steady: &MockUpstream, generation: u32) -> String {
    let rate = if generation.is_multiple_of(2) { "400/s" } else { "300/s" };
    format!(
        "{TEST_SERVER}\
         [[upstream]]\nname = \"faulty\"\nbase_url = \"{}\"\nroute = \"/faulty\"\nhosts = []\n\
         rate = \"{rate}\"\ntimeout = \"2s\"\n\
         [upstream.retry]\nmax_attempts = 4\nbase_delay = \"10ms\"\nmax_delay = \"100ms\"\nbudget = 1.0\n\
         [[upstream]]\nname = \"steady\"\nbase_url = \"{}\"\nroute = \"/steady\"\nhosts = []\nrate = \"300/s\"\n",
        faulty.url(),
        steady.url(),
    )
}

/// What the callers got.
#[derive(Default)]
struct Tally {
    /// Answers (a status line), by status class.
    ok: AtomicU64,
    other: AtomicU64,
    /// Answers whose body was cut (the upstream died mid-body).
    cut: AtomicU64,
    /// Requests without an answer: must stay zero.
    unanswered: AtomicU64,
    /// Malformed requests answered with the documented 400.
    refused: AtomicU64,
}

/// Resident memory of this process, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()).expect("VmRSS in kB")
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// One caller: GETs to the faulty upstream or POSTs to the steady one until `until`.
async fn caller(pg: Arc<Pacegate>, tally: Arc<Tally>, id: usize, until: Instant) {
    let http = client();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let request = if id % 4 == 3 {
            http.post(pg.url(&format!("/steady/echo?c={id}&n={n}"))).body(vec![b'p'; 2048])
        } else {
            http.get(pg.url(&format!("/faulty/echo?c={id}&n={n}")))
        };
        let response = match request.timeout(ANSWER_WITHIN).send().await {
            Ok(response) => response,
            Err(error) => {
                eprintln!("caller {id}: no answer: {error}");
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let class = if response.status() == 200 { &tally.ok } else { &tally.other };
        class.fetch_add(1, Ordering::Relaxed);
        if response.bytes().await.is_err() {
            tally.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends a malformed head on a new connection; expects one 400 and a close.
async fn malformed(pg: &Pacegate, tally: &Tally) {
    let mut stream = TcpStream::connect(pg.proxy).await.expect("connect");
    stream.write_all(b"GET /faulty/x HTTP/1.1\r\nHost: a\r\nX-Bad: \x7f\r\n\r\n").await.expect("send");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(ANSWER_WITHIN, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a malformed request's connection stayed open");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 ") && text.contains("x-pacegate-error: bad_request"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    tally.refused.fetch_add(1, Ordering::Relaxed);
}

/// Sum of `pacegate_requests_total` over every label set.
async fn answers_counted(pg: &Pacegate) -> u64 {
    let text = client().get(pg.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let lines = text.lines().filter(|l| l.starts_with("pacegate_requests_total{"));
    lines.map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let duration = soak_duration();
    let faulty = MockUpstream::start(Behaviour::new()).await;
    let steady = MockUpstream::start(Behaviour::new()).await;
    let pg = Arc::new(Pacegate::start_config(&config(&faulty, &steady, 0)).await);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let until = started + duration;
    let callers: Vec<_> =
        (0..CALLERS).map(|id| tokio::spawn(caller(pg.clone(), tally.clone(), id, until))).collect();

    let warm_at = started + (duration / 4).max(Duration::from_secs(3)).min(duration);
    let mut warm = None;
    let mut faults = tokio::time::interval(FAULT_EVERY);
    let mut reloads = tokio::time::interval(RELOAD_EVERY);
    let mut generation = 0;
    while Instant::now() < until {
        tokio::select! {
            _ = faults.tick() => {
                // The mocks' arrival logs would grow with the run: keep only counts.
                faulty.forget_arrivals();
                steady.forget_arrivals();
                faulty.set_behaviour(Behaviour::new().script([
                    Scripted::status(503),
                    Scripted::Reset,
                    Scripted::status(429),
                    Scripted::Truncated,
                    Scripted::Garbage,
                ]));
                malformed(&pg, &tally).await;
            }
            _ = reloads.tick() => {
                generation += 1;
                std::fs::write(&pg.config_path, config(&faulty, &steady, generation)).unwrap();
                let reload = client().post(pg.admin_url("/reload")).send().await.unwrap();
                assert_eq!(reload.status(), 200, "reload {generation}: {}", reload.text().await.unwrap());
            }
            () = tokio::time::sleep_until(warm_at), if warm.is_none() => {
                warm = Some((rss_kb(), open_fds()));
            }
        }
    }
    for caller in join_all(callers).await {
        caller.expect("a caller panicked");
    }
    assert!(
        pg.wait_status(Duration::from_secs(10), |s| {
            ["faulty", "steady"].iter().all(|name| queue_depth(s, name) == Some(0))
                && s["upstreams"].as_array().is_some_and(|u| u.iter().all(|u| u["inflight"]["now"] == 0))
        })
        .await,
        "queues or in-flight counts did not drain to zero: {}",
        pg.status().await
    );
    let (rss_end, fds_end) = (rss_kb(), open_fds());
    let (rss_warm, fds_warm) = warm.expect("warm-up sample taken");

    let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let (ok, other, cut, unanswered, refused) = (
        count(&tally.ok),
        count(&tally.other),
        count(&tally.cut),
        count(&tally.unanswered),
        count(&tally.refused),
    );
    println!(
        "soak {duration:?}: {ok} ok, {other} other, {cut} cut, {unanswered} unanswered, {refused} refused; \
         upstream arrivals {} + {}; rss {rss_warm} -> {rss_end} kB; fds {fds_warm} -> {fds_end}",
        faulty.count(),
        steady.count(),
    );
    assert_eq!(unanswered, 0, "requests without an answer");
    assert_eq!(
        answers_counted(&pg).await,
        ok + other + refused,
        "answers counted by pacegate != requests sent"
    );
    assert!(ok >= (ok + other) * 9 / 10, "too few successes: {ok} ok, {other} other");
    assert!(fds_end <= fds_warm + FD_SLACK, "open descriptors grew from {fds_warm} to {fds_end}");
    assert!(rss_end <= rss_warm + RSS_SLACK_KB, "resident memory grew from {rss_warm} to {rss_end} kB");
}
