//! Per-key quotas and fair queuing between callers.
//!
//! Each test drives a real pacegate in front of the mock upstream and tells
//! callers apart at the mock by a header they carry (`authorization`,
//! `x-api-key`, `x-caller` or `x-kind`; pacegate's own `x-pacegate-*` headers
//! never reach the mock). Rates are scaled up and counts down, except where
//! the issue names figures; every wait is bounded.

mod support;

use std::time::Duration;

use support::mock::{Arrival, Behaviour, MockUpstream, Scripted};
use support::{Pacegate, client, upstream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The upstream named `api` in `/status`.
fn api_status(status: &serde_json::Value) -> &serde_json::Value {
    let upstreams = status["upstreams"].as_array().expect("upstreams array");
    upstreams.iter().find(|u| u["name"] == "api").expect("upstream api in /status")
}

/// Value of `name` in an arrival's headers, or "".
fn header<'a>(arrival: &'a Arrival, name: &str) -> &'a str {
    arrival.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Starts `n` GETs to `url` carrying `headers`; each task yields (status, finished at).
fn spawn_requests(url: &str, n: usize, headers: &[(&str, &str)]) -> Vec<JoinHandle<(u16, Instant)>> {
    let http = client();
    (0..n)
        .map(|_| {
            let mut request = http.get(url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            tokio::spawn(async move {
                let status = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                (status, Instant::now())
            })
        })
        .collect()
}

/// Polls `/status` until the queue of `api` holds at least `depth` waiters.
async fn wait_depth(pg: &Pacegate, depth: u64) {
    let queued = pg
        .wait_status(Duration::from_secs(10), |s| {
            api_status(s)["queue"]["depth"].as_u64().is_some_and(|d| d >= depth)
        })
        .await;
    assert!(queued, "queue of api reached {depth} waiters");
}

fn abort(tasks: Vec<JoinHandle<(u16, Instant)>>) {
    for task in tasks {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_get_two_quotas_concurrently() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let extra = "rate = \"10/s\"\npartition_by = \"header:authorization\"\nmax_concurrency = 64";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let url = pg.url("/api/x");
    let started = Instant::now();
    let a = spawn_requests(&url, 30, &[("authorization", "Bearer A")]);
    let b = spawn_requests(&url, 30, &[("authorization", "Bearer B")]);
    tokio::time::sleep_until(started + Duration::from_millis(2050)).await;
    let arrivals = mock.arrivals();
    let per_key = |key: &str| arrivals.iter().filter(|a| header(a, "authorization") == key).count();
    let (from_a, from_b) = (per_key("Bearer A"), per_key("Bearer B"));
    // One shared 10/s bucket would allow about 21 in total over ~2 s.
    assert!((17..=22).contains(&from_a), "key A got its own ~10/s: {from_a} in 2 s");
    assert!((17..=22).contains(&from_b), "key B got its own ~10/s: {from_b} in 2 s");
    // Each key keeps its own quota (one more allowed for arrival jitter on a
    // loaded test machine: the first request pays the connection set-up).
    for key in ["Bearer A", "Bearer B"] {
        let times: Vec<Instant> =
            arrivals.iter().filter(|a| header(a, "authorization") == key).map(|a| a.at).collect();
        let most = support::mock::max_in_any_window(&times, Duration::from_secs(1));
        assert!(most <= 11, "{key}: about 10 in any second, saw {most}");
    }
    let status = pg.status().await;
    assert_eq!(api_status(&status)["partitions"], 2, "/status counts two partitions: {status}");
    assert!(!status.to_string().contains("Bearer"), "no key value in /status");
    abort(a);
    abort(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_key_a_does_not_pause_key_b() {
    let retry_after_2s = Scripted::status_with(429, &[("retry-after", "2")]);
    let mock = MockUpstream::start(Behaviour::new().script([retry_after_2s])).await;
    let extra = "rate = \"10/s\"\npartition_by = \"header:authorization\"\nmax_concurrency = 64";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let url = pg.url("/api/x");
    // The first request carries key A and gets the scripted 429.
    let first = spawn_requests(&url, 1, &[("authorization", "Bearer A")]);
    assert!(mock.wait_for_arrivals(1, Duration::from_secs(5)).await, "first request arrives");
    let limited_at = mock.arrivals()[0].at;
    assert_eq!(mock.arrivals()[0].status, 429);
    let a = spawn_requests(&url, 10, &[("authorization", "Bearer A")]);
    let b = spawn_requests(&url, 12, &[("authorization", "Bearer B")]);
    tokio::time::sleep_until(limited_at + Duration::from_millis(1800)).await;
    let during: Vec<Arrival> = mock
        .arrivals()
        .into_iter()
        .skip(1)
        .filter(|a| a.at < limited_at + Duration::from_millis(1800))
        .collect();
    let from_a = during.iter().filter(|a| header(a, "authorization") == "Bearer A").count();
    let from_b = during.iter().filter(|a| header(a, "authorization") == "Bearer B").count();
    assert_eq!(from_a, 0, "key A waits out its 2 s cooldown");
    assert!(from_b >= 12, "key B kept its pace during A's cooldown: {from_b} of 12 in 1.8 s");
    // After the cooldown, A's retry and requests go through.
    let (status, _) = first.into_iter().next().expect("one task").await.expect("task");
    assert_eq!(status, 200, "the 429 was retried after A's cooldown");
    abort(a);
    abort(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_caller_is_not_stuck_behind_a_batch() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    // 50/s: one pacing slot is 20 ms.
    let extra = "rate = \"50/s\"\nfair_by = \"header:x-caller\"\nqueue_size = 2000\nqueue_timeout = \"120s\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let url = pg.url("/api/x");
    let batch = spawn_requests(&url, 1000, &[("x-caller", "batch")]);
    wait_depth(&pg, 900).await;
    let asked = Instant::now();
    let interactive = spawn_requests(&url, 5, &[("x-caller", "interactive")]);
    let mut slowest = Duration::ZERO;
    for task in interactive {
        let (status, done) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("interactive caller answered within 10 s")
            .expect("task");
        assert_eq!(status, 200);
        slowest = slowest.max(done - asked);
    }
    // Round-robin: 5 requests x 2 active callers = 10 slots = 200 ms; FIFO
    // would have put them behind ~900 batch requests (18 s).
    assert!(slowest < Duration::from_millis(700), "5 requests done in {slowest:?}, about 10 slots");
    // /status refreshes its caller counts every 100 ms.
    let only_batch = pg
        .wait_status(Duration::from_secs(2), |s| {
            let callers = api_status(s)["callers"].as_array().cloned().unwrap_or_default();
            callers.len() == 1 && callers[0].as_u64() > Some(500)
        })
        .await;
    assert!(only_batch, "only the batch still waits: {}", api_status(&pg.status().await)["callers"]);
    abort(batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jumps_the_queue_and_low_still_progresses() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    // 5/s: one slot is 200 ms, so the queue hardly drains while 50 callers
    // connect and queue, even on a loaded machine.
    let extra = "rate = \"5/s\"\nqueue_timeout = \"60s\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let url = pg.url("/api/x");
    let low = spawn_requests(&url, 10, &[("x-pacegate-priority", "low"), ("x-kind", "low")]);
    wait_depth(&pg, 8).await;
    let high = spawn_requests(&url, 40, &[("x-pacegate-priority", "high"), ("x-kind", "high")]);
    // Most of the 48 or so still queued: a grant or two may go while they connect.
    wait_depth(&pg, 42).await;
    let queued_at = Instant::now();
    let seen_before = mock.count();
    assert!(mock.wait_for_arrivals(seen_before + 20, Duration::from_secs(10)).await, "20 more arrivals");
    let after: Vec<String> = mock
        .arrivals()
        .into_iter()
        .filter(|a| a.at > queued_at)
        .take(20)
        .map(|a| header(&a, "x-kind").to_string())
        .collect();
    assert!(after.iter().all(|kind| kind == "high" || kind == "low"), "kinds seen: {after:?}");
    let highs_first = after.iter().take(4).filter(|k| *k == "high").count();
    assert!(highs_first >= 3, "highs go ahead of lows queued earlier: {after:?}");
    let lows = after.iter().filter(|k| *k == "low").count();
    assert!((3..=8).contains(&lows), "low is not starved by a stream of highs (1 in 5): {after:?}");
    let no_mock_priority = mock.arrivals().iter().all(|a| a.headers.get("x-pacegate-priority").is_none());
    assert!(no_mock_priority, "x-pacegate-priority is never forwarded");
    // An unknown priority is the caller's mistake, said clearly.
    let response = client().get(&url).header("x-pacegate-priority", "urgent").send().await.unwrap();
    assert_eq!(response.status(), 400);
    abort(low);
    abort(high);
}

/// pacegate with `max_partitions = 2` keyed by `x-api-key` and `quotas`;
/// one request per key in `keys`, each answered 200.
async fn two_partitions_for(keys: &[&str], quotas: &str) -> (MockUpstream, Pacegate) {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let extra = format!("{quotas}\npartition_by = \"header:x-api-key\"\nmax_partitions = 2");
    let pg = Pacegate::start(&upstream("api", &mock.url(), &extra)).await;
    let (url, http) = (pg.url("/api/x"), client());
    for key in keys {
        let response = http.get(&url).header("x-api-key", *key).send().await.expect("answer");
        assert_eq!(response.status(), 200, "key {key} gets a partition");
    }
    (mock, pg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_bound_answers_503_too_many_partitions() {
    // 1/min: each key's second request waits a minute (within its
    // queue_timeout), keeping its partition busy.
    let quotas = "rate = \"1/min\"\nqueue_timeout = \"2m\"";
    let (mock, pg) = two_partitions_for(&["one", "two"], quotas).await;
    let (url, http) = (pg.url("/api/x"), client());
    let waiting = spawn_requests(&url, 1, &[("x-api-key", "one")])
        .into_iter()
        .chain(spawn_requests(&url, 1, &[("x-api-key", "two")]))
        .collect();
    wait_depth(&pg, 2).await;
    let response = http.get(&url).header("x-api-key", "three").send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "too_many_partitions", "{body}");
    assert_eq!(body["upstream"], "api");
    assert!(!body.to_string().contains("three"), "the key value is not echoed: {body}");
    assert_eq!(mock.count(), 2, "the refused request never reached the upstream");
    let metrics = http.get(pg.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("pacegate_rejected_total{") && l.contains("too_many_partitions"))
        .unwrap_or_default();
    assert!(rejected.ends_with(" 1"), "rejection counted: {rejected:?}");
    let status = pg.status().await;
    assert_eq!(api_status(&status)["partitions"], 2);
    assert_eq!(api_status(&status)["rejections"]["too_many_partitions"], 1);
    abort(waiting);
}

/// Keys seen once cannot lock new keys out for a quota window: a partition
/// nobody waits in makes room, least recently used first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keys_make_room_for_new_ones() {
    // 10/min, burst 5: each partition remembers its grants for a minute.
    let keys = ["one", "two", "three", "four"];
    let (mock, pg) = two_partitions_for(&keys, "rate = \"10/min\"\nburst = 5").await;
    assert_eq!(mock.count(), 4);
    assert_eq!(api_status(&pg.status().await)["partitions"], 2, "never more than max_partitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_keeps_its_callers_place() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::status(503)])).await;
    // 20/s: one slot is 50 ms; the retry sleeps a fixed 300 ms backoff.
    let extra = "rate = \"20/s\"\nfair_by = \"header:x-caller\"\n\
                 [upstream.retry]\nbase_delay = \"300ms\"\nmax_delay = \"300ms\"\njitter = \"none\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let url = pg.url("/api/x");
    let alice = spawn_requests(&url, 1, &[("x-caller", "alice")]);
    assert!(mock.wait_for_arrivals(1, Duration::from_secs(5)).await, "alice's first attempt arrives");
    assert_eq!(mock.arrivals()[0].status, 503);
    // While alice sleeps her backoff, a batch fills the queue.
    let batch = spawn_requests(&url, 100, &[("x-caller", "batch")]);
    let (status, _) = alice.into_iter().next().expect("one task").await.expect("task");
    assert_eq!(status, 200, "alice's retry succeeded");
    let tries: Vec<Instant> =
        mock.arrivals().iter().filter(|a| header(a, "x-caller") == "alice").map(|a| a.at).collect();
    assert_eq!(tries.len(), 2);
    let gap = tries[1] - tries[0];
    // Backoff plus about one slot per active caller, not a place behind the
    // batch (which would be ~90 slots, 4.5 s).
    assert!(gap < Duration::from_millis(800), "retry went out {gap:?} after the first attempt");
    abort(batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_each_partitions_cooldown() {
    let retry_after_3s = Scripted::status_with(429, &[("retry-after", "3")]);
    let mock = MockUpstream::start(Behaviour::new().script([retry_after_3s])).await;
    let keys = "rate = \"10/s\"\npartition_by = \"header:authorization\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), keys)).await;
    let url = pg.url("/api/x");
    let first = spawn_requests(&url, 1, &[("authorization", "Bearer A")]);
    assert!(mock.wait_for_arrivals(1, Duration::from_secs(5)).await, "first request arrives");
    let limited_at = mock.arrivals()[0].at;
    // Same quotas, other queue bound: partitions keep their state.
    let reloaded = format!(
        "{}\n{}",
        support::TEST_SERVER,
        upstream("api", &mock.url(), &format!("{keys}\nqueue_size = 500"))
    );
    pg.reload_with(&reloaded).await;
    let b = spawn_requests(&url, 1, &[("authorization", "Bearer B")]);
    let a = spawn_requests(&url, 1, &[("authorization", "Bearer A")]);
    let (status, b_done) = b.into_iter().next().expect("one task").await.expect("task");
    assert_eq!(status, 200);
    assert!(b_done - limited_at < Duration::from_secs(2), "key B is not cooling down");
    let (status, _) = a.into_iter().next().expect("one task").await.expect("task");
    assert_eq!(status, 200);
    let from_a: Vec<Instant> =
        mock.arrivals().iter().filter(|x| header(x, "authorization") == "Bearer A").map(|x| x.at).collect();
    assert!(
        from_a.iter().skip(1).all(|at| *at - limited_at >= Duration::from_millis(2900)),
        "key A stayed in its cooldown across the reload"
    );
    abort(first);
}
