//! Proves the shared mock upstream itself, so other tests can trust what it reports.
//!
//! Real sockets and the real clock: windows are a few hundred milliseconds and
//! assertions leave generous margins, so the suite is fast and not flaky.

#[path = "support/mock.rs"]
mod mock;

use std::time::Duration;

use mock::{Behaviour, MockUpstream, Resource, Scripted, max_in_any_window};
use tokio::time::Instant;

/// Bounds every wait in this file; nothing here should come near it.
const PATIENCE: Duration = Duration::from_secs(5);

/// reqwest 0.13 builds its rustls config even for plain http, so it needs a
/// crypto provider installed first; ring is the one pacegate already links.
fn client_builder() -> reqwest::ClientBuilder {
    // Err only means another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}

fn client() -> reqwest::Client {
    let builder = client_builder().timeout(PATIENCE);
    builder.build().expect("client with a crypto provider")
}

async fn get(client: &reqwest::Client, url: String) -> reqwest::Response {
    client.get(url).send().await.expect("the mock answers")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    let value = resp.headers().get(name);
    value.map_or("", |v| v.to_str().unwrap_or(""))
}

#[tokio::test]
async fn default_answers_200_with_sequence_numbers() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let client = client();
    for seq in 0..3 {
        let resp = get(&client, format!("{}/any?x={seq}", mock.url())).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-mock-seq"), seq.to_string());
    }
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 3);
    assert_eq!(arrivals[2].path_and_query, "/any?x=2");
    assert_eq!(arrivals[2].method, "GET");
    assert_eq!(mock.count_status(200), 3);
    mock.shutdown().await;
}

#[tokio::test]
async fn sliding_window_rejects_exactly_the_request_over_the_limit() {
    let window = Duration::from_millis(300);
    let mock = MockUpstream::start(Behaviour::new().limit(2, window)).await;
    let client = client();
    let url = mock.url();

    assert_eq!(get(&client, url.clone()).await.status(), 200);
    assert_eq!(get(&client, url.clone()).await.status(), 200);
    let rejected = get(&client, url.clone()).await;
    assert_eq!(rejected.status(), 429);
    assert_eq!(header(&rejected, "retry-after"), "1", "under a second rounds up to 1");

    // Once the first accepted request has left the window, one slot is free again.
    let first = mock.arrivals()[0].at;
    tokio::time::sleep_until(first + window + Duration::from_millis(20)).await;
    assert_eq!(get(&client, url.clone()).await.status(), 200);

    assert_eq!(mock.count_status(200), 3);
    assert_eq!(mock.count_status(429), 1);
    mock.shutdown().await;
}

#[tokio::test]
async fn retry_after_rounds_up_to_when_the_oldest_leaves() {
    let mock = MockUpstream::start(Behaviour::new().limit(1, Duration::from_millis(2500))).await;
    let client = client();
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    let rejected = get(&client, mock.url()).await;
    assert_eq!(rejected.status(), 429);
    assert_eq!(header(&rejected, "retry-after"), "3");
    mock.shutdown().await;
}

#[tokio::test]
async fn fail_first_then_succeed() {
    let mock = MockUpstream::start(Behaviour::new().fail_first(2, 503)).await;
    let client = client();
    let statuses = [
        get(&client, mock.url()).await.status(),
        get(&client, mock.url()).await.status(),
        get(&client, mock.url()).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [503, 503, 200]);
    assert_eq!(mock.count_status(503), 2);
    mock.shutdown().await;
}

#[tokio::test]
async fn fail_for_ends_after_its_duration() {
    let duration = Duration::from_millis(200);
    let mock = MockUpstream::start(Behaviour::new().fail_for(duration, 503)).await;
    let client = client();
    assert_eq!(get(&client, mock.url()).await.status(), 503);
    // The behaviour was applied before the first arrival, so this is past its end.
    tokio::time::sleep_until(mock.arrivals()[0].at + duration).await;
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    mock.shutdown().await;
}

#[tokio::test]
async fn script_runs_before_other_rules_then_falls_through() {
    let behaviour = Behaviour::new()
        .respond_429_once("7")
        .script([Scripted::status_with(503, &[("x-why", "scripted")])])
        .fail_first(1, 500);
    let mock = MockUpstream::start(behaviour).await;
    let client = client();
    let first = get(&client, mock.url()).await;
    assert_eq!((first.status().as_u16(), header(&first, "retry-after")), (429, "7"));
    let second = get(&client, mock.url()).await;
    assert_eq!((second.status().as_u16(), header(&second, "x-why")), (503, "scripted"));
    assert_eq!(get(&client, mock.url()).await.status(), 500);
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    mock.shutdown().await;
}

#[tokio::test]
async fn reset_is_a_connection_error() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Reset])).await;
    let client = client();
    let err = client.get(mock.url()).send().await.expect_err("reset, no answer");
    assert!(!err.is_timeout(), "a reset, not a timeout: {err:?}");
    assert_eq!(mock.arrivals()[0].status, 0);
    assert_eq!(get(&client, mock.url()).await.status(), 200, "script consumed");

    // Over h2c the reset is a stream reset, still an error for the client.
    mock.set_behaviour(Behaviour::new().script([Scripted::Reset]));
    let builder = client_builder().http2_prior_knowledge().timeout(PATIENCE);
    let h2 = builder.build().expect("client with a crypto provider");
    let err = h2.get(mock.url()).send().await.expect_err("reset, no answer");
    assert!(!err.is_timeout(), "a reset, not a timeout: {err:?}");
    mock.shutdown().await;
}

#[tokio::test]
async fn truncated_body_fails_mid_body() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Truncated])).await;
    let resp = get(&client(), mock.url()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "the body is cut short");
    mock.shutdown().await;
}

#[tokio::test]
async fn stall_never_answers_and_shutdown_releases_it() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Stall])).await;
    let client = client();
    let request = client.get(mock.url()).timeout(Duration::from_millis(200)).send();
    let err = request.await.expect_err("a stalled request never answers");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(mock.count(), 1);

    // A second stall is still held when the mock shuts down; shutdown must not hang.
    mock.set_behaviour(Behaviour::new().script([Scripted::Stall]));
    let pending = tokio::spawn(client.get(mock.url()).send());
    assert!(mock.wait_for_arrivals(2, PATIENCE).await);
    tokio::time::timeout(PATIENCE, mock.shutdown()).await.expect("shutdown completes with a stalled request");
    let outcome = tokio::time::timeout(PATIENCE, pending).await;
    let outcome = outcome.expect("the stalled client is released");
    assert!(outcome.expect("client task").is_err());
}

#[tokio::test]
async fn sse_events_arrive_separately() {
    let (n, interval) = (5u32, Duration::from_millis(50));
    let mock = MockUpstream::start(Behaviour::default()).await;
    let url = format!("{}/sse?n={n}&interval_ms={}", mock.url(), interval.as_millis());
    let mut resp = get(&client(), url).await;
    assert_eq!(header(&resp, "content-type"), "text/event-stream");

    let (mut body, mut first, mut last) = (String::new(), None, None);
    // Bounded by the client timeout and by the mock ending the stream after n events.
    while let Some(chunk) = resp.chunk().await.expect("stream continues") {
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        body.push_str(std::str::from_utf8(&chunk).expect("utf-8 events"));
    }
    let expected: String = (0..n).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(body, expected);
    let spread = last.expect("events") - first.expect("events");
    assert!(spread >= interval.mul_f64(f64::from(n - 1) * 0.8), "{spread:?}");
    mock.shutdown().await;
}

#[tokio::test]
async fn echo_reports_what_it_received() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let resp = client()
        .post(format!("{}/echo/a/b?x=1&y=two", mock.url()))
        .header("x-test", "hi")
        .body("hello")
        .send()
        .await
        .expect("the mock answers");
    let body = resp.bytes().await.expect("full body");
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo is JSON");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/a/b");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["headers"]["x-test"], "hi");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(mock.arrivals()[0].body_len, 5);
    mock.shutdown().await;
}

#[tokio::test]
async fn status_and_bytes_paths() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let client = client();
    let teapot = get(&client, format!("{}/status/418", mock.url())).await;
    assert_eq!(teapot.status(), 418);
    let bytes = get(&client, format!("{}/bytes?n=100000", mock.url())).await;
    assert_eq!(bytes.bytes().await.expect("full body").len(), 100_000);
    let bad = get(&client, format!("{}/bytes?n=lots", mock.url())).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(mock.count_status(418), 1);
    mock.shutdown().await;
}

#[tokio::test]
async fn rate_limit_headers_count_down_in_a_fixed_window() {
    let behaviour = Behaviour::new().rate_limit_headers(3, Duration::from_secs(60));
    let mock = MockUpstream::start(behaviour).await;
    let client = client();
    let now_epoch =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    for remaining in ["2", "1", "0", "0"] {
        let resp = get(&client, mock.url()).await;
        assert_eq!(header(&resp, "x-ratelimit-limit"), "3");
        assert_eq!(header(&resp, "x-ratelimit-remaining"), remaining);
        let reset: u64 = header(&resp, "x-ratelimit-reset").parse().expect("epoch secs");
        assert!((now_epoch..=now_epoch + 61).contains(&reset), "{reset}");
    }
    mock.shutdown().await;
}

/// OpenAI's request quota: a bucket of 3 refilled one every 100 s. Three
/// pass, each answer saying how much is left and when the bucket is full;
/// the fourth waits for the first to come back.
#[tokio::test]
async fn a_bucket_refills_continuously_and_says_so_as_openai_does() {
    let mock = MockUpstream::start(Behaviour::new().bucket(3, Duration::from_secs(300))).await;
    let client = client();
    let ms = |resp: &reqwest::Response, name: &str| -> u64 {
        let value = header(resp, name);
        value.strip_suffix("ms").unwrap_or(value).parse().expect("milliseconds")
    };
    for (remaining, full_in) in [("2", 100_000), ("1", 200_000), ("0", 300_000)] {
        let resp = get(&client, mock.url()).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), remaining);
        let reset = ms(&resp, "x-ratelimit-reset-requests");
        assert!((full_in - 1_000..=full_in).contains(&reset), "full again in {reset} ms, not ~{full_in}");
    }
    let resp = get(&client, mock.url()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
    let wait = ms(&resp, "retry-after-ms");
    assert!((99_000..=100_001).contains(&wait), "retry-after-ms {wait}");
    assert_eq!(header(&resp, "retry-after"), "100");
    assert_eq!(mock.count_status(200), 3, "the refused request took nothing");
    mock.shutdown().await;
}

/// GitHub-shaped limits: points where a POST costs 5, and a write limit on
/// POSTs only. A refusal names its resource and counts in no window.
#[tokio::test]
async fn resources_weigh_methods_and_name_the_limit_that_refused() {
    let minute = Duration::from_secs(60);
    let points = Resource::new("points", 10, minute).cost("POST", 5);
    let writes = Resource::new("writes", 2, minute).methods(&["post"]);
    let mock = MockUpstream::start(Behaviour::new().resource(points).resource(writes)).await;
    let client = client();
    let post = async |path: &str| client.post(format!("{}{path}", mock.url())).send().await.expect("answer");

    assert_eq!(post("/w1").await.status(), 200, "5 points, 1 write");
    assert_eq!(get(&client, mock.url()).await.status(), 200, "6 points; a GET is no write");
    let refused = post("/w2").await;
    assert_eq!(refused.status(), 429, "11 points would be over 10");
    assert_eq!(header(&refused, "x-ratelimit-resource"), "points");
    assert_eq!(header(&refused, "retry-after"), "60", "until the first POST leaves the window");
    for _ in 0..4 {
        assert_eq!(get(&client, mock.url()).await.status(), 200, "the refused POST took nothing");
    }
    let refused = get(&client, mock.url()).await;
    assert_eq!(refused.status(), 429, "11 points");
    assert_eq!(header(&refused, "x-ratelimit-resource"), "points");

    let writes = Resource::new("writes", 1, minute).methods(&["POST"]);
    mock.set_behaviour(Behaviour::new().resource(writes));
    assert_eq!(post("/w3").await.status(), 200);
    let refused = post("/w4").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-resource"), "writes");
    assert_eq!(get(&client, mock.url()).await.status(), 200, "writes does not count GETs");
    assert_eq!(mock.count_status(429), 3);
    mock.shutdown().await;
}

#[tokio::test]
async fn set_behaviour_applies_to_the_next_request() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let client = client();
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    mock.set_behaviour(Behaviour::new().limit(1, Duration::from_secs(10)));
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    assert_eq!(get(&client, mock.url()).await.status(), 429);
    assert_eq!(mock.count(), 3, "arrivals survive a behaviour change");
    mock.shutdown().await;
}

#[tokio::test]
async fn h2c_is_served_and_recorded() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let builder = client_builder().http2_prior_knowledge();
    let client = builder.build().expect("client with a crypto provider");
    let resp = get(&client, mock.url()).await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(mock.arrivals()[0].version, http::Version::HTTP_2);
    mock.shutdown().await;
}

#[tokio::test]
async fn wait_for_arrivals_wakes_on_arrival_and_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mock = MockUpstream::start_on(listener, Behaviour::default()).await;
    assert!(!mock.wait_for_arrivals(1, Duration::from_millis(50)).await);

    let request = tokio::spawn(client().get(mock.url()).send());
    assert!(mock.wait_for_arrivals(1, PATIENCE).await);
    let resp = request.await.expect("client task").expect("answered");
    assert_eq!(resp.status(), 200);
    mock.shutdown().await;
}

#[test]
fn max_in_any_window_uses_half_open_windows() {
    let base = Instant::now();
    let at = |ms: u64| base + Duration::from_millis(ms);
    let window = Duration::from_millis(100);
    assert_eq!(max_in_any_window(&[], window), 0);
    assert_eq!(max_in_any_window(&[at(0)], window), 1);
    // 0 and 100 are exactly one window apart: never in the same window.
    let times = [at(0), at(50), at(99), at(100), at(150), at(180), at(199)];
    assert_eq!(max_in_any_window(&times, window), 4, "100..=199");
    let burst = [at(0), at(10), at(20), at(30), at(500)];
    assert_eq!(max_in_any_window(&burst, window), 4);
    let spread = [at(0), at(100), at(200), at(300)];
    assert_eq!(max_in_any_window(&spread, window), 1);
}

#[tokio::test]
async fn max_in_window_over_real_arrivals() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let client = client();
    for _ in 0..4 {
        get(&client, mock.url()).await;
    }
    assert_eq!(mock.max_in_window(PATIENCE), 4);
    assert_eq!(mock.max_in_window(Duration::from_nanos(1)), 1);
    mock.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn latency_follows_paused_time() {
    let latency = Duration::from_secs(30);
    let mock = MockUpstream::start(Behaviour::new().latency(latency)).await;
    // The client's timeout must outlast the latency, as auto-advance reaches both.
    let client = client_builder().timeout(latency * 2).build().expect("client");
    let started = Instant::now();
    assert_eq!(get(&client, mock.url()).await.status(), 200);
    assert!(started.elapsed() >= latency, "answered after the latency");
    assert!(mock.arrivals()[0].at - started < latency, "recorded before it");
    mock.shutdown().await;
}
