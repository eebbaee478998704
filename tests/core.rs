//! The core proxy, against real sockets and the shared mock upstream:
//! pacing, independent upstreams, backpressure answers, caller disconnects,
//! forward and reverse routing, header hygiene, streaming, body limits, h2c
//! and graceful shutdown.
//!
//! Real clock: rates are scaled so each test takes about a second (the pacing
//! test keeps the issue's figures, 1000 requests at 100/s), and every timing
//! assertion leaves a margin for a loaded 2-core machine.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::{Pacegate, TEST_SERVER, assert_pacegate_error, builder, client, queue_depth, upstream};
use tokio::time::Instant;

/// Bounds every wait that is not itself the point of a test.
const PATIENCE: Duration = Duration::from_secs(10);

/// `Retry-After` in whole seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    let value = response.headers().get("retry-after").expect("Retry-After present");
    value.to_str().unwrap().parse().expect("Retry-After in seconds")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

// === pacing ===

/// The issue's figures: 1000 requests at concurrency 100 through "100/s"
/// against a mock that allows 100 per strict 1 s window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_100_per_second_against_a_strict_window() {
    let mock = MockUpstream::start(Behaviour::new().limit(100, Duration::from_secs(1))).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"\nqueue_size = 1000")).await;
    let client = builder().timeout(Duration::from_secs(60)).build().unwrap();

    let statuses: Vec<StatusCode> = futures_util::stream::iter(0..1000)
        .map(|i| {
            let (client, url) = (client.clone(), pg.url(&format!("/api/r{i}")));
            async move { client.get(url).send().await.expect("answer").status() }
        })
        .buffer_unordered(100)
        .collect()
        .await;

    let not_ok: Vec<_> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(not_ok.is_empty(), "{} callers did not get 200: {not_ok:?}", not_ok.len());
    let rejected = mock.count_status(429);
    let arrivals = mock.arrivals();
    // Where 429s fell helps tell start-up lateness from drift.
    for (i, rejected) in arrivals.iter().enumerate().filter(|(_, a)| a.status == 429) {
        println!("429 for arrival {i}, {:?} after the first", rejected.at - arrivals[0].at);
    }
    let accepted: Vec<Instant> = arrivals.iter().filter(|a| a.status == 200).map(|a| a.at).collect();
    assert_eq!(accepted.len(), 1000, "each request accepted exactly once");
    let makespan = accepted[999] - accepted[0];
    let gaps: Vec<Duration> = accepted.windows(2).map(|w| w[1] - w[0]).collect();
    let median_gap = median(gaps);
    println!("makespan {makespan:?} (ideal 9.99 s), median gap {median_gap:?}, 429s at the mock {rejected}");
    assert!(rejected <= 10, "the mock answered {rejected} 429s");
    assert!(
        (Duration::from_millis(9)..=Duration::from_millis(11)).contains(&median_gap),
        "median gap {median_gap:?}"
    );
    // A 429 (a request held up on its way to the mock on a loaded machine)
    // pauses the upstream for the mock's Retry-After, 1 s: a pause the
    // upstream asked for, not drift.
    let paused = Duration::from_secs(rejected as u64);
    assert!(
        (Duration::from_millis(9500)..=Duration::from_millis(11500) + paused).contains(&makespan),
        "makespan {makespan:?} with {rejected} 429s"
    );
}

/// A caller that finds nobody waiting takes its slot without queueing; such
/// callers, racing each other and queued ones, are paced all the same.
///
/// The upstream's view is judged with the margins a busy machine needs. The
/// pacer keeps 0.5 % of each window (5 ms a second) for the way to the
/// upstream; when both cores are busy one request can be held up for tens
/// of ms between leaving the pacer and reaching the mock, so 21 arrivals
/// fall inside the mock's strict 1 s window. The mock then refuses one
/// attempt with 429 and pacegate retries it, as it must: one request arrives
/// twice, once refused and once accepted; nothing accepted is sent again.
/// Arrivals also bunch up behind such a hold-up, so spacing is judged by the
/// median gap and by 21 arrivals at a time, not by the closest pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_find_the_queue_empty_are_paced_like_queued_ones() {
    const INTERVAL: Duration = Duration::from_millis(50);
    let mock = MockUpstream::start(Behaviour::new().limit(20, Duration::from_secs(1))).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"20/s\"")).await;
    // Three callers, each sending its next request once the last is answered.
    let callers: Vec<_> = (0..3)
        .map(|caller| {
            let (client, url) = (client(), pg.url(&format!("/api/c{caller}")));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..8 {
                    let response = client.get(&url).send().await.expect("answer");
                    let attempts = response.headers().get("x-pacegate-attempts").expect("attempts header");
                    let attempts: usize = attempts.to_str().unwrap().parse().expect("attempts count");
                    answers.push((response.status(), attempts));
                }
                answers
            })
        })
        .collect();
    let mut retries = 0;
    for caller in callers {
        let answers = caller.await.expect("caller");
        assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK), "{answers:?}");
        retries += answers.iter().map(|(_, attempts)| attempts - 1).sum::<usize>();
    }

    let arrivals = mock.arrivals();
    let refused = mock.count_status(429);
    let accepted: Vec<_> = arrivals.iter().filter(|a| a.status == 200).collect();
    for caller in 0..3 {
        let path = format!("/c{caller}");
        let count = accepted.iter().filter(|a| a.path_and_query == path).count();
        assert_eq!(count, 8, "caller {caller}'s requests accepted upstream");
    }
    assert_eq!(accepted.len(), 24, "each request accepted once");
    assert_eq!(arrivals.len(), 24 + refused, "every other arrival is a refused attempt");
    assert_eq!(retries, refused, "refused attempts, and only those, were sent again");

    let times: Vec<Instant> = arrivals.iter().map(|a| a.at).collect();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let closest = *gaps.iter().min().expect("gaps");
    let median_gap = median(gaps);
    // 21 arrivals at 20/s span 20 intervals; one held up on its way may cost one.
    let tightest = times.windows(21).map(|w| w[20] - w[0]).min().expect("21 arrivals");
    println!(
        "median gap {median_gap:?}, closest {closest:?}, tightest 21 in {tightest:?}, {refused} refused"
    );
    assert!(median_gap >= INTERVAL * 9 / 10, "median gap {median_gap:?} at 20/s");
    assert!(tightest >= INTERVAL * 19, "21 arrivals within {tightest:?} at 20/s");
}

/// `max_concurrency` holds for callers that do not queue, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_bounds_callers_that_leave_at_once() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(300))).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"1000/s\"\nmax_concurrency = 2")).await;
    let client = client();
    let requests = (0..4).map(|i| client.get(pg.url(&format!("/api/r{i}"))).send());
    for answer in futures_util::future::join_all(requests).await {
        assert_eq!(answer.expect("answer").status(), StatusCode::OK);
    }
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 4);
    let third = arrivals[2].at - arrivals[0].at;
    assert!(
        third >= Duration::from_millis(250),
        "a third attempt left {third:?} after the first, before a slot was free"
    );
}

#[tokio::test]
async fn upstreams_do_not_slow_each_other() {
    let slow_mock = MockUpstream::start(Behaviour::new()).await;
    let fast_mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "{}{}",
        upstream("slow", &slow_mock.url(), "rate = \"2/s\""),
        upstream("fast", &fast_mock.url(), "rate = \"50/s\""),
    );
    let pg = Pacegate::start(&config).await;
    let client = client();

    let started = Instant::now();
    let slow: Vec<_> = (0..6)
        .map(|i| tokio::spawn(client.get(pg.url(&format!("/slow/s{i}"))).timeout(PATIENCE).send()))
        .collect();
    let fast = futures_util::future::join_all(
        (0..20).map(|i| client.get(pg.url(&format!("/fast/f{i}"))).timeout(PATIENCE).send()),
    )
    .await;
    let fast_done = started.elapsed();
    let slow_seen = slow_mock.count();

    for response in fast {
        assert_eq!(response.expect("fast answer").status(), 200);
    }
    println!("fast upstream done after {fast_done:?}; slow upstream had sent {slow_seen} of 6");
    // 20 at 50/s take ~0.4 s alone; behind the slow upstream they would take 10 s.
    assert!(fast_done < Duration::from_millis(1500), "fast upstream took {fast_done:?}");
    // The slow one really was pacing (2/s: 6 take 2.5 s) while the fast one finished.
    assert!(slow_seen < 6, "slow upstream already sent all 6 after {fast_done:?}");
    for response in slow {
        assert_eq!(response.await.unwrap().expect("slow answer").status(), 200);
    }
    let slow_span = {
        let arrivals = slow_mock.arrivals();
        arrivals[5].at - arrivals[0].at
    };
    assert!(slow_span >= Duration::from_millis(2200), "slow upstream not paced: {slow_span:?}");
}

// === backpressure ===

#[tokio::test]
async fn queue_full_answers_503_at_once() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"1/s\"\nqueue_size = 2")).await;
    let client = client();

    let first = client.get(pg.url("/api/a")).timeout(PATIENCE).send().await.unwrap();
    assert_eq!(first.status(), 200);
    // The next slot is a second away: two callers fill the queue, one
    // after the other (sent at once, either could arrive first).
    let mut queued = Vec::new();
    for (path, depth) in [("/api/b", 1), ("/api/c", 2)] {
        queued.push(tokio::spawn(client.get(pg.url(path)).timeout(PATIENCE).send()));
        let reached = pg.wait_status(PATIENCE, |s| queue_depth(s, "api") == Some(depth)).await;
        assert!(reached, "queue never reached {depth}");
    }

    let started = Instant::now();
    let full = client.get(pg.url("/api/d")).timeout(PATIENCE).send().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(200), "queue_full took {took:?}");
    // Two callers ahead at 1/s: an honest estimate is at least 2 s.
    let wait = retry_after(&full);
    assert!((2..=10).contains(&wait), "Retry-After {wait}");
    assert_pacegate_error(full, 503, "queue_full", Some("api")).await;

    // The queued callers are unaffected and the refused one never left.
    for response in queued {
        assert_eq!(response.await.unwrap().unwrap().status(), 200);
    }
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
}

/// A request that waits its whole `queue_timeout` (or `x-pacegate-max-wait`)
/// without being served gets 503: here the one attempt allowed in flight
/// holds the queue, which no quota can foresee.
#[tokio::test]
async fn queue_timeout_answers_503() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_secs(2))).await;
    let extra = "rate = \"100/s\"\nmax_concurrency = 1\nqueue_timeout = \"300ms\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let client = client();

    // The first request takes the one attempt in flight for 2 s (and shows
    // x-pacegate-max-wait is not forwarded).
    let first = client.get(pg.url("/api/echo")).header("x-pacegate-max-wait", "5s").send();
    let first = tokio::spawn(first);
    assert!(mock.wait_for_arrivals(1, PATIENCE).await, "the first request reaches the upstream");

    let timed = |request: reqwest::RequestBuilder| async move {
        let started = Instant::now();
        let response = request.timeout(PATIENCE).send().await.unwrap();
        (started.elapsed(), response)
    };
    let short = timed(client.get(pg.url("/api/short")).header("x-pacegate-max-wait", "100ms"));
    let full = timed(client.get(pg.url("/api/full")));
    let ((short_took, short), (full_took, full)) = tokio::join!(short, full);
    println!("max-wait 100ms answered after {short_took:?}, queue_timeout 300ms after {full_took:?}");

    assert!(
        (Duration::from_millis(90)..Duration::from_millis(250)).contains(&short_took),
        "x-pacegate-max-wait: 100ms answered after {short_took:?}"
    );
    assert!(
        (Duration::from_millis(290)..Duration::from_millis(800)).contains(&full_took),
        "queue_timeout 300ms answered after {full_took:?}"
    );
    for response in [short, full] {
        assert!(retry_after(&response) >= 1);
        assert_pacegate_error(response, 503, "queue_timeout", Some("api")).await;
    }
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200);
    let echo: Value = first.json().await.unwrap();
    assert!(echo["headers"].get("x-pacegate-max-wait").is_none(), "forwarded: {echo}");
    assert_eq!(mock.count(), 1, "timed-out callers reached the upstream");
}

/// Honest waits: a request the quota cannot serve within its wait, counting
/// the requests queued ahead of it, is told so at once, with a
/// `Retry-After` that covers the wait, instead of holding a place in the
/// queue it cannot use.
#[tokio::test]
async fn a_request_the_quota_cannot_serve_in_time_is_answered_at_once() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let extra = "rate = \"1/4s\"\nqueue_timeout = \"10s\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let client = client();
    assert_eq!(client.get(pg.url("/api/first")).send().await.unwrap().status(), 200);

    let at_once = |request: reqwest::RequestBuilder| async move {
        let started = Instant::now();
        let response = request.timeout(PATIENCE).send().await.unwrap();
        let took = started.elapsed();
        println!("answered after {took:?}, Retry-After {}", retry_after(&response));
        assert!(took < Duration::from_millis(1500), "answered at once, not at its deadline: {took:?}");
        response
    };
    // The next slot is 4 s away: beyond a 3 s wait.
    let hasty = at_once(client.get(pg.url("/api/hasty")).header("x-pacegate-max-wait", "3s")).await;
    assert!(retry_after(&hasty) >= 4, "Retry-After covers the 4 s: {:?}", hasty.headers());
    assert_pacegate_error(hasty, 503, "queue_timeout", Some("api")).await;

    // Two callers fit in 10 s (slots at 4 s and 8 s) and queue; a third
    // would leave at 12 s.
    // One after the other, so that they reach the upstream in this order.
    let mut queued = Vec::new();
    for (depth, path) in [(1, "/api/two"), (2, "/api/three")] {
        queued.push(tokio::spawn(client.get(pg.url(path)).timeout(3 * PATIENCE).send()));
        let waiting = pg.wait_status(PATIENCE, |s| queue_depth(s, "api") == Some(depth)).await;
        assert!(waiting, "{path} queues");
    }
    let late = at_once(client.get(pg.url("/api/four"))).await;
    assert!(retry_after(&late) >= 11, "Retry-After covers the 12 s: {:?}", late.headers());
    assert_pacegate_error(late, 503, "queue_timeout", Some("api")).await;
    for response in queued {
        assert_eq!(response.await.unwrap().unwrap().status(), 200, "served in their slots");
    }
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert_eq!(
        paths,
        ["/api/first", "/api/two", "/api/three"].map(|p| p.trim_start_matches("/api")),
        "refused callers never reached the upstream"
    );
}

// === disconnects ===

#[tokio::test]
async fn caller_disconnect_leaves_queue_without_spending_quota() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"2/s\"")).await;
    let client = client();

    let a = client.get(pg.url("/api/a")).timeout(PATIENCE).send().await.unwrap();
    assert_eq!(a.status(), 200);
    // B queues for the slot 0.5 s after A, but its client gives up first.
    let b = client.get(pg.url("/api/b")).timeout(Duration::from_millis(150)).send().await;
    assert!(b.is_err_and(|e| e.is_timeout()), "B should time out client-side");
    assert!(
        pg.wait_status(PATIENCE, |s| queue_depth(s, "api") == Some(0)).await,
        "B stayed in the queue after its caller left"
    );

    let c = client.get(pg.url("/api/c")).timeout(PATIENCE).send().await.unwrap();
    assert_eq!(c.status(), 200);
    let arrivals = mock.arrivals();
    let paths: Vec<&str> = arrivals.iter().map(|a| a.path_and_query.as_str()).collect();
    assert_eq!(paths, ["/a", "/c"], "the mock saw B");
    // C takes the slot B left: 0.5 s after A, not 1 s.
    let gap = arrivals[1].at - arrivals[0].at;
    println!("C arrived {gap:?} after A");
    assert!((Duration::from_millis(400)..Duration::from_millis(800)).contains(&gap), "A to C: {gap:?}");
}

#[tokio::test]
async fn disconnect_in_flight_frees_the_concurrency_slot() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Stall])).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"\nmax_concurrency = 1")).await;
    let client = client();

    let stalled = client.get(pg.url("/api/stall")).timeout(Duration::from_millis(300)).send().await;
    assert!(stalled.is_err_and(|e| e.is_timeout()), "the stalled request should time out client-side");
    assert_eq!(mock.count(), 1);

    // With the slot still held this would wait for the 30 s attempt timeout.
    let second = client.get(pg.url("/api/next")).timeout(Duration::from_secs(5)).send().await;
    assert_eq!(second.expect("second request answered").status(), 200);
    assert!(
        pg.wait_status(PATIENCE, |s| s["upstreams"][0]["inflight"]["now"] == 0).await,
        "in-flight count did not return to 0"
    );
}

// === routing ===

#[tokio::test]
async fn forward_mode_through_http_proxy() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "[[upstream]]\nname = \"api\"\nbase_url = \"{}/v1\"\nhosts = [\"api.test\"]\nrate = \"100/s\"\n",
        mock.url()
    );
    let pg = Pacegate::start(&config).await;

    let response = pg.forward_client().get("http://api.test/echo/a?b=1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-pacegate-attempts"], "1");
    // A fully qualified name is the same host: paced as it, not unknown.
    let qualified = pg.forward_client().get("http://API.test./echo/c").send().await.unwrap();
    assert_eq!(qualified.status(), 200);
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 2);
    assert_eq!(arrivals[0].path_and_query, "/v1/echo/a?b=1");
    assert_eq!(arrivals[0].headers["host"], mock.addr().to_string().as_str());
    assert_eq!(arrivals[1].path_and_query, "/v1/echo/c");
}

#[tokio::test]
async fn reverse_mode_joins_prefix_path_and_query() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &format!("{}/v1", mock.url()), "rate = \"100/s\"")).await;

    let response = client().get(pg.url("/api/x/y?q=1&r=a%20b")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-pacegate-attempts"], "1");
    assert!(response.headers().contains_key("x-pacegate-queued-ms"));
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].path_and_query, "/v1/x/y?q=1&r=a%20b");
    assert_eq!(arrivals[0].headers["host"], mock.addr().to_string().as_str());
}

#[tokio::test]
async fn unknown_host_is_403_and_no_route_is_404() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "[forward]\nunknown_hosts = \"deny\"\n\n{}",
        upstream("api", &mock.url(), "rate = \"100/s\""),
    );
    let pg = Pacegate::start(&config).await;

    let denied = pg.forward_client().get("http://elsewhere.test/x").send().await.unwrap();
    assert_pacegate_error(denied, 403, "unknown_host", None).await;
    let missing = client().get(pg.url("/nothing/x")).send().await.unwrap();
    assert_pacegate_error(missing, 404, "no_route", None).await;
    // A route must match whole path segments.
    let near = client().get(pg.url("/apix/y")).send().await.unwrap();
    assert_pacegate_error(near, 404, "no_route", None).await;
    assert_eq!(mock.count(), 0, "a refused request reached the upstream");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped() {
    let response_headers = [("connection", "x-resp-secret"), ("x-resp-secret", "1"), ("x-resp-kept", "1")];
    let scripted = Scripted::status_with(200, &response_headers);
    let mock = MockUpstream::start(Behaviour::new().script([scripted.clone(), scripted])).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"")).await;
    let client = client();

    // Control: straight from the mock, the listed header does arrive.
    let direct = client.get(format!("{}/direct", mock.url())).send().await.unwrap();
    assert_eq!(direct.headers()["x-resp-secret"], "1");
    // Through pacegate, Connection and what it lists stay on the upstream's hop.
    let response = client.get(pg.url("/api/first")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-resp-kept"], "1");
    assert!(!response.headers().contains_key("x-resp-secret"), "{:?}", response.headers());

    let response = client
        .get(pg.url("/api/echo"))
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("x-pacegate-priority", "high")
        .header("x-kept", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    let seen = echo["headers"].as_object().unwrap();
    for name in ["connection", "x-secret", "keep-alive", "proxy-connection", "x-pacegate-priority"] {
        assert!(!seen.contains_key(name), "{name} was forwarded: {echo}");
    }
    assert_eq!(seen["x-kept"], "yes", "{echo}");
    assert_eq!(seen["via"], "1.1 pacegate", "a proxy says so in Via: {echo}");
}

// === bodies and streams ===

/// An answer's trailer fields reach a caller that accepts them, cleaned as
/// the head is: hop-by-hop names and an upstream's own `x-pacegate-*` stay
/// behind. The upstream is raw bytes, to send trailers it was not asked
/// for; it announces them all in `Trailer`, since hyper sends an HTTP/1.1
/// caller only the fields announced.
#[tokio::test]
async fn answer_trailers_pass_without_hop_by_hop_or_pacegate_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream_url = support::raw_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum, x-pacegate-error, keep-alive\r\n\r\n\
         2\r\nok\r\n0\r\nx-checksum: abc\r\nx-pacegate-error: forged\r\nkeep-alive: timeout=5\r\n\r\n",
    )
    .await;
    // An LLM call's answer is read for its usage on the way: the same holds.
    let llm = upstream("llm", &upstream_url, "rate = \"100/s\"\ntokens = \"100000/min\"");
    let pg = Pacegate::start(&format!("{}{llm}", upstream("api", &upstream_url, "rate = \"100/s\""))).await;
    let call = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let requests = [
        "GET /api/t HTTP/1.1\r\nHost: pacegate\r\nTE: trailers\r\nConnection: close\r\n\r\n".to_owned(),
        format!(
            "POST /llm/v1/chat/completions HTTP/1.1\r\nHost: pacegate\r\nTE: trailers\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{call}",
            call.len()
        ),
    ];
    for request in requests {
        let address = pg.url("").trim_start_matches("http://").to_owned();
        let mut caller = tokio::net::TcpStream::connect(address).await.expect("connect to pacegate");
        caller.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, caller.read_to_end(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        let trailers =
            answer.split_once("\r\n0\r\n").map(|(_, rest)| rest).unwrap_or_else(|| panic!("{answer}"));
        assert!(trailers.contains("x-checksum: abc\r\n"), "the trailer field was lost: {answer}");
        assert!(!trailers.contains("forged"), "an upstream's x-pacegate-* passed in trailers: {answer}");
        assert!(!trailers.contains("keep-alive"), "a hop-by-hop trailer field passed: {answer}");
    }
}

#[tokio::test]
async fn server_sent_events_stream_through() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"")).await;

    let response = client().get(pg.url("/api/sse?n=5&interval_ms=100")).timeout(PATIENCE).send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut chunks = response.bytes_stream();
    let (mut text, mut times) = (String::new(), Vec::new());
    while let Some(chunk) = chunks.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("stream chunk")).unwrap());
        times.push(Instant::now());
        if times.len() == 1 {
            assert_eq!(text, "data: 0\n\n", "the first event must arrive alone");
        }
    }
    let expected: String = (0..5).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(text, expected);
    let spread = *times.last().unwrap() - times[0];
    assert!(spread >= Duration::from_millis(300), "events arrived together ({spread:?}): buffered");
}

#[tokio::test]
async fn large_bodies_stream_once_and_max_request_bytes_gives_413() {
    let mock = MockUpstream::start(Behaviour::new().script([
        Scripted::status(503),
        Scripted::status(503),
        Scripted::status(503),
    ]))
    .await;
    let retry = "[upstream.retry]\nbase_delay = \"10ms\"\nmax_delay = \"50ms\"\n";
    let config = format!(
        "{TEST_SERVER}max_body_bytes = 1024\n\n{}{retry}",
        upstream("api", &mock.url(), "rate = \"100/s\""),
    );
    let pg = Pacegate::start_config(&config).await;
    let client = client();

    // Over max_body_bytes: streamed once, so a 503 goes back as is (a PUT is idempotent).
    let big = client.put(pg.url("/api/echo")).body(vec![b'x'; 100_000]).send().await.unwrap();
    assert_eq!(big.status(), 503, "a streamed body must not be retried");
    assert_eq!(big.headers()["x-pacegate-attempts"], "1");
    assert_eq!(mock.count(), 1, "sent once");
    // A small (buffered) body is retried past the remaining 503s.
    let small = client.put(pg.url("/api/echo")).body(vec![b'x'; 500]).send().await.unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(small.headers()["x-pacegate-attempts"], "3");
    assert_eq!(small.json::<Value>().await.unwrap()["body_len"], 500);
    // A large body that succeeds arrives whole.
    let big = client.post(pg.url("/api/echo")).body(vec![b'x'; 100_000]).send().await.unwrap();
    assert_eq!(big.status(), 200);
    assert_eq!(big.json::<Value>().await.unwrap()["body_len"], 100_000);
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 5);
    assert_eq!(arrivals[0].body_len, 100_000, "the first big body did not arrive whole");
    pg.stop().await.unwrap();

    let capped = format!(
        "{TEST_SERVER}max_request_bytes = 1000\n\n{}",
        upstream("api", &mock.url(), "rate = \"100/s\""),
    );
    let pg = Pacegate::start_config(&capped).await;
    let too_big = client.post(pg.url("/api/echo")).body(vec![b'x'; 5000]).send().await.unwrap();
    assert_pacegate_error(too_big, 413, "body_too_large", Some("api")).await;
    let fits = client.post(pg.url("/api/echo")).body(vec![b'x'; 1000]).send().await.unwrap();
    assert_eq!(fits.status(), 200);
    assert_eq!(mock.count(), 6, "the oversized body reached the upstream");
}

#[tokio::test]
async fn headers_too_large_is_431() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "{TEST_SERVER}max_header_bytes = 2048\n\n{}",
        upstream("api", &mock.url(), "rate = \"100/s\""),
    );
    let pg = Pacegate::start_config(&config).await;
    let client = client();

    let big = client.get(pg.url("/api/x")).header("x-big", "a".repeat(4096)).send().await.unwrap();
    assert_pacegate_error(big, 431, "headers_too_large", None).await;
    let small = client.get(pg.url("/api/x")).header("x-small", "a".repeat(1024)).send().await.unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(mock.count(), 1, "the oversized request reached the upstream");
}

// === protocol and lifecycle ===

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"")).await;
    let h2 = builder().http2_prior_knowledge().build().unwrap();

    let response = h2.get(pg.url("/api/echo?h2=1")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["query"], "h2=1");
    assert_eq!(mock.count(), 1);
}

#[tokio::test]
async fn graceful_shutdown_answers_queued_requests() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let mut pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"5/s\"")).await;
    let client = client();

    let requests: Vec<_> = (0..5)
        .map(|i| tokio::spawn(client.get(pg.url(&format!("/api/q{i}"))).timeout(PATIENCE).send()))
        .collect();
    assert!(mock.wait_for_arrivals(1, PATIENCE).await);
    // One sent, four waiting for their slots (200 ms apart) when shutdown starts.
    assert!(
        pg.wait_status(PATIENCE, |s| queue_depth(s, "api") == Some(4)).await,
        "four requests never queued together"
    );
    let run = pg.begin_shutdown();
    for request in requests {
        assert_eq!(request.await.unwrap().expect("answered during shutdown").status(), 200);
    }
    let result = tokio::time::timeout(PATIENCE, run).await.expect("shutdown finished");
    result.unwrap().expect("run returned Ok");
    assert_eq!(mock.count(), 5);
    // Stopped: no new connections are accepted.
    let after = client.get(pg.url("/api/late")).timeout(Duration::from_secs(2)).send().await;
    assert!(after.is_err(), "pacegate still answering after shutdown: {after:?}");
}
