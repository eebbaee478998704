//! The circuit breaker against the shared mock: a failing upstream sees at
//! most `min_attempts` and the probes, what can wait is served after the
//! recovery at the paced rate, what cannot is answered `circuit_open` at
//! once, and 429s never open it.
mod support;

use std::time::Duration;

use serde_json::Value;
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::{Pacegate, assert_pacegate_error, client, upstream};
use tokio::time::Instant;

/// 20/s, no retries (so that each request is one attempt), and a breaker
/// that opens after 4 attempts of which half failed, for 1 s at first.
const BREAKER: &str = r#"rate = "20/s"
queue_timeout = "30s"
[upstream.retry]
max_attempts = 1
[upstream.breaker]
failure_ratio = 0.5
min_attempts = 4
window = "10s"
open_for = "1s"
max_open_for = "4s"
probes = 1
"#;

fn breaker(status: &Value) -> &Value {
    &status["upstreams"][0]["breaker"]
}

/// A GET with its own bound on the queue wait. One client for all: making
/// one per request costs a debug build about a second of CPU.
async fn get(http: reqwest::Client, url: String, max_wait: &'static str) -> reqwest::Response {
    http.get(url).header("x-pacegate-max-wait", max_wait).send().await.expect("proxied request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_is_spared_and_the_queue_is_held_until_it_recovers() {
    let failing = Duration::from_millis(1_500);
    let mock = MockUpstream::start(Behaviour::new().fail_for(failing, 500)).await;
    let started = Instant::now();
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let http = client();

    // Four failures open the breaker.
    for i in 0..4 {
        let response = get(http.clone(), pg.url(&format!("/api/fail{i}")), "30s").await;
        assert_eq!(response.status(), 500, "the upstream's own answer");
    }
    let open = |s: &Value| breaker(s)["state"] == "open";
    assert!(pg.wait_status(Duration::from_secs(2), open).await, "{:#}", pg.status().await);

    // Callers that can wait are held; one that cannot is told at once.
    let waiting: Vec<_> =
        (0..8).map(|i| tokio::spawn(get(http.clone(), pg.url(&format!("/api/held{i}")), "30s"))).collect();
    let asked = Instant::now();
    let hurried = get(http.clone(), pg.url("/api/hurried"), "200ms").await;
    assert!(asked.elapsed() < Duration::from_millis(150), "answered at once, not after its wait");
    let retry_after: u64 = hurried.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "what remains of the break: {retry_after}");
    assert_pacegate_error(hurried, 503, "circuit_open", Some("api")).await;

    let mut statuses = Vec::new();
    for held in waiting {
        statuses.push(held.await.unwrap().status().as_u16());
    }
    // The head of the queue is the probe: while the upstream still fails,
    // that probe's caller gets the failure (no retries here); the others
    // are held through the outage and served.
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(served >= 7 && statuses.iter().all(|s| [200, 500].contains(s)), "{statuses:?}");
    let arrivals = mock.arrivals();
    let during: Vec<_> = arrivals.iter().filter(|a| a.at.duration_since(started) < failing).collect();
    assert!(
        during.len() <= 4 + 1,
        "4 failures and at most one probe reached the failing upstream: {}",
        during.len()
    );
    assert_eq!(arrivals.iter().filter(|a| a.path_and_query.contains("hurried")).count(), 0, "never sent");
    // After the outage the queue drains at 20/s, not in a burst.
    let drained: Vec<Instant> = arrivals.iter().filter(|a| a.status == 200).map(|a| a.at).collect();
    assert_eq!(drained.len(), served);
    let span = drained[served - 1].duration_since(drained[0]);
    let paced = Duration::from_millis(50 * (served as u64 - 1));
    assert!(span >= paced.mul_f64(0.9), "paced at 20/s, not a burst: {span:?} for {served}");

    let s = pg.status().await;
    assert_eq!(breaker(&s)["state"], "closed", "{s:#}");
    let opened = breaker(&s)["opened"].as_u64().filter(|n| *n >= 1);
    assert!(opened.is_some(), "{s:#}");
    assert_eq!(pg.metric("pacegate_breaker_state{upstream=\"api\"}").await, Some(0.0));
    // The metric counts the same openings as /status.
    let opened_total = pg.metric("pacegate_breaker_opened_total{upstream=\"api\"}").await;
    assert_eq!(opened_total, opened.map(|n| n as f64));
    pg.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_answers_never_open_the_breaker() {
    let too_many = || Scripted::status_with(429, &[("retry-after-ms", "10")]);
    let mock = MockUpstream::start(Behaviour::new().script((0..6).map(|_| too_many()))).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let http = client();
    for i in 0..6 {
        let response = get(http.clone(), pg.url(&format!("/api/{i}")), "30s").await;
        assert_eq!(response.status(), 429);
    }
    let s = pg.status().await;
    assert_eq!(breaker(&s)["state"], "closed", "{s:#}");
    assert_eq!(breaker(&s)["attempts"], 0, "a 429 is not counted at all: {s:#}");
    assert_eq!(get(http.clone(), pg.url("/api/ok"), "30s").await.status(), 200);
    pg.stop().await.unwrap();
}

/// A probe answered 429 says nothing about the failure: its place goes back,
/// and the next request probes and closes the breaker. (It used to stay
/// half-open for good, every request answered `queue_timeout`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_429_leaves_the_next_request_to_probe() {
    let mut script: Vec<Scripted> = (0..4).map(|_| Scripted::status(500)).collect();
    script.push(Scripted::status_with(429, &[("retry-after-ms", "10")]));
    let mock = MockUpstream::start(Behaviour::new().script(script)).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let http = client();
    for i in 0..4 {
        assert_eq!(get(http.clone(), pg.url(&format!("/api/{i}")), "30s").await.status(), 500);
    }
    // Held until the break ends, then the probe: the 429 goes back as it came.
    assert_eq!(get(http.clone(), pg.url("/api/probe"), "30s").await.status(), 429);
    let after = get(http.clone(), pg.url("/api/after"), "5s").await;
    assert_eq!(after.status(), 200, "{:?}", after.headers());
    let s = pg.status().await;
    assert_eq!(breaker(&s)["state"], "closed", "{s:#}");
    pg.stop().await.unwrap();
}

/// A reload that takes the breaker away takes its state gauge too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_without_the_breaker_stops_its_gauge() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let gauge = r#"pacegate_breaker_state{upstream="api"}"#;
    assert_eq!(pg.metric(gauge).await, Some(0.0));
    let without =
        upstream("api", &mock.url(), BREAKER.split("[upstream.breaker]").next().unwrap_or_default());
    pg.reload_with(&format!("{}\n{without}", support::TEST_SERVER)).await;
    assert_eq!(pg.metric(gauge).await, None);
    pg.stop().await.unwrap();
}

/// A reload that keeps the breaker keeps its state: an open breaker stays
/// open (and keeps refusing who cannot wait) across `POST /reload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_an_open_breaker_open() {
    let mock = MockUpstream::start(Behaviour::new().fail_for(Duration::from_secs(30), 500)).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let http = client();
    for i in 0..4 {
        assert_eq!(get(http.clone(), pg.url(&format!("/api/{i}")), "30s").await.status(), 500);
    }
    let open = |s: &Value| breaker(s)["state"] == "open";
    assert!(pg.wait_status(Duration::from_secs(2), open).await, "{:#}", pg.status().await);
    // Another setting changes (the queue size); the breaker's do not.
    let config = std::fs::read_to_string(&pg.config_path).unwrap();
    pg.reload_with(&config.replace("queue_timeout = \"30s\"", "queue_timeout = \"30s\"\nqueue_size = 50"))
        .await;
    let s = pg.status().await;
    assert_eq!(breaker(&s)["state"], "open", "kept across the reload: {s:#}");
    let hurried = get(http.clone(), pg.url("/api/hurried"), "100ms").await;
    assert_pacegate_error(hurried, 503, "circuit_open", Some("api")).await;
    assert_eq!(mock.count(), 4, "nothing more reached the failing upstream");
    pg.stop().await.unwrap();
}

/// A failed probe reopens the breaker for twice as long (less at most a
/// fifth of jitter): the probes reach a still-failing upstream further and
/// further apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_doubles_the_break() {
    let mock = MockUpstream::start(Behaviour::new().fail_for(Duration::from_secs(60), 500)).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), BREAKER)).await;
    let http = client();
    for i in 0..4 {
        assert_eq!(get(http.clone(), pg.url(&format!("/api/fail{i}")), "30s").await.status(), 500);
    }
    let opened = Instant::now();
    // Callers that wait: each probe is one of them.
    let waiting: Vec<_> =
        (0..4).map(|i| tokio::spawn(get(http.clone(), pg.url(&format!("/api/held{i}")), "30s"))).collect();
    assert!(mock.wait_for_arrivals(6, Duration::from_secs(10)).await, "two probes");
    let arrivals = mock.arrivals();
    let (first, second) = (arrivals[4].at, arrivals[5].at);
    // 1 s, then 2 s (each up to a fifth shorter); generous on the late side
    // for a busy machine, strict on the early side, which is the point.
    let first_break = first.duration_since(opened);
    assert!(first_break >= Duration::from_millis(750), "first break {first_break:?}");
    let second_break = second.duration_since(first);
    assert!(second_break >= Duration::from_millis(1550), "the break doubled: {second_break:?}");
    assert!(second_break > first_break, "{first_break:?} then {second_break:?}");
    for request in waiting {
        request.abort();
    }
}
