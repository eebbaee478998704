//! The response cache (`[upstream.cache]`) end to end, against real sockets
//! and the shared mock's `/cached` path (Cache-Control, ETag, 304, Vary,
//! latency): coalescing, fresh hits, revalidation, the caller's own
//! conditionals, credentials and `Vary` kept apart, what is never stored,
//! errors and disconnects while coalescing, the memory bound, writes that
//! invalidate, purge, reload and what `/status` and `/metrics` show.
//!
//! What the upstream saw is judged at the mock; what callers saw by status,
//! body and `x-pacegate-cache`.

mod support;

use std::time::Duration;

use reqwest::Method;
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::{Pacegate, TEST_SERVER, client, upstream};
use tokio::task::JoinHandle;

/// Bounds every wait that is not itself the point of a test.
const PATIENCE: Duration = Duration::from_secs(20);

/// An answer as a test looks at it.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    cache: String,
    age: Option<u64>,
    etag: Option<String>,
    body: String,
}

/// A pacegate with one cached upstream `api` in front of `mock`.
async fn cached_pacegate(mock: &MockUpstream, cache: &str) -> Pacegate {
    let extra = format!("rate = \"100/s\"\nburst = 100\n[upstream.cache]\n{cache}");
    Pacegate::start_config(&format!("{TEST_SERVER}\n{}", upstream("api", &mock.url(), &extra))).await
}

async fn get(http: &reqwest::Client, url: String, headers: &[(&str, &str)]) -> Seen {
    let mut request = http.get(url).timeout(PATIENCE);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("an answer");
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().expect("text").to_owned());
    let (status, cache) = (response.status().as_u16(), header("x-pacegate-cache").unwrap_or_default());
    let (age, etag) = (header("age").and_then(|a| a.parse().ok()), header("etag"));
    let body = response.text().await.expect("a body");
    Seen { status, cache, age, etag, body }
}

fn spawn_get(http: &reqwest::Client, url: String) -> JoinHandle<Seen> {
    let http = http.clone();
    tokio::spawn(async move { get(&http, url, &[]).await })
}

async fn all(tasks: Vec<JoinHandle<Seen>>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.expect("request task"));
    }
    seen
}

fn count(seen: &[Seen], cache: &str) -> usize {
    seen.iter().filter(|s| s.cache == cache).count()
}

/// The cache block of `api` in `/status`.
async fn cache_status(pacegate: &Pacegate) -> serde_json::Value {
    let status = pacegate.status().await;
    status["upstreams"][0]["cache"].clone()
}

#[tokio::test]
async fn fifty_identical_gets_reach_the_upstream_once() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(2000))).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let tasks: Vec<_> = (0..50).map(|_| spawn_get(&http, url.clone())).collect();
    let seen = all(tasks).await;
    assert_eq!(mock.count(), 1, "one fetch for fifty callers");
    assert!(seen.iter().all(|s| s.status == 200 && s.body == r#"{"seq":0}"#), "{seen:?}");
    assert_eq!(count(&seen, "miss"), 1, "{seen:?}");
    assert_eq!(count(&seen, "coalesced") + count(&seen, "hit"), 49, "{seen:?}");
    assert!(count(&seen, "coalesced") >= 25, "most joined the fetch in flight: {seen:?}");

    let again = get(&http, url, &[]).await;
    assert_eq!((again.status, again.cache.as_str()), (200, "hit"));
    assert!(again.age.is_some(), "a hit carries Age");
    assert_eq!(mock.count(), 1, "a fresh hit sends nothing");
    let status = cache_status(&pacegate).await;
    assert_eq!(status["entries"], 1, "{status}");
    assert!(status["quota_saved"].as_u64() >= Some(50), "{status}");
    let misses = pacegate.metric(r#"pacegate_cache_total{upstream="api",result="miss"}"#).await;
    assert_eq!(misses, Some(1.0));
}

#[tokio::test]
async fn stale_entries_revalidate_with_one_conditional_request() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=1&etag=v1");
    let first = get(&http, url.clone(), &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
    // Freshness is a matter of time: wait it out (Date and max-age count
    // whole seconds, so 2 s are past the 1 s of freshness whatever the rounding).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let revalidated = get(&http, url, &[]).await;
    assert_eq!((revalidated.status, revalidated.cache.as_str()), (200, "revalidated"));
    assert_eq!(revalidated.body, first.body, "the stored body, confirmed by a 304");
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 2, "{arrivals:?}");
    assert_eq!(arrivals[1].headers["if-none-match"], "\"v1\"");
    assert_eq!(arrivals[1].status, 304);
}

/// A 304 refreshes the stored answer with what it says, judged as a new
/// answer would be: a cookie it sets goes to the caller who drew it and is
/// never served from the store; and a hit carries no attempts header of
/// the fetch that refreshed it.
#[tokio::test]
async fn a_304_is_judged_before_it_refreshes_the_store() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    // Stale at once (max-age=0), so the next request revalidates.
    for (path, cookie) in [
        ("/api/cached?max_age=0&etag=v1&max_age_304=60", false),
        ("/api/cached?max_age=0&etag=v2&max_age_304=60&cookie_on_304=1", true),
    ] {
        let url = pacegate.url(path);
        assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss");
        let drawn = http.get(&url).timeout(PATIENCE).send().await.expect("an answer");
        assert_eq!(drawn.headers()["x-pacegate-cache"], "revalidated", "{path}");
        assert_eq!(drawn.headers().contains_key("set-cookie"), cookie, "{path}: the caller who drew it");
        let next = http.get(&url).timeout(PATIENCE).send().await.expect("an answer");
        let source = next.headers()["x-pacegate-cache"].to_str().unwrap().to_owned();
        if cookie {
            assert_eq!(source, "revalidated", "a cookie's 304 was not stored: {:?}", next.headers());
        } else {
            assert_eq!(source, "hit", "refreshed for 60 s: {:?}", next.headers());
            assert!(
                !next.headers().contains_key("x-pacegate-attempts"),
                "a hit made no attempt: {:?}",
                next.headers()
            );
        }
    }
    assert_eq!(mock.count(), 5, "2 + 3 upstream requests");
}

#[tokio::test]
async fn a_callers_conditional_request_is_answered_from_the_cache() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60&etag=v1");
    // On a miss the cache fetches the full answer (the caller's validator
    // is not sent on), stores it, and answers the caller 304.
    let first = get(&http, url.clone(), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((first.status, first.cache.as_str()), (304, "miss"));
    assert!(!mock.arrivals()[0].headers.contains_key("if-none-match"));
    let matching = get(&http, url.clone(), &[("if-none-match", "W/\"v1\"")]).await;
    assert_eq!((matching.status, matching.cache.as_str(), matching.body.as_str()), (304, "hit", ""));
    assert_eq!(matching.etag.as_deref(), Some("\"v1\""));
    let other = get(&http, url, &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((other.status, other.cache.as_str(), other.body.as_str()), (200, "hit", r#"{"seq":0}"#));
    assert_eq!(mock.count(), 1);
}

#[tokio::test]
async fn credentials_and_vary_keep_entries_apart() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    // Private answers: kept per credential, never shared.
    let private = pacegate.url("/api/cached?max_age=60&private=1");
    let alice = get(&http, private.clone(), &[("authorization", "Bearer alice")]).await;
    let bob = get(&http, private.clone(), &[("authorization", "Bearer bob")]).await;
    assert_eq!((alice.cache.as_str(), bob.cache.as_str()), ("miss", "miss"));
    assert_ne!(alice.body, bob.body, "bob never gets alice's answer");
    let alice_again = get(&http, private.clone(), &[("authorization", "Bearer alice")]).await;
    assert_eq!((alice_again.cache.as_str(), alice_again.body.as_str()), ("hit", alice.body.as_str()));
    assert_eq!(mock.count(), 2);
    // Without a credential, a private answer is not stored at all.
    for _ in 0..2 {
        assert_eq!(get(&http, private.clone(), &[]).await.cache, "miss");
    }
    assert_eq!(mock.count(), 4);

    let vary = pacegate.url("/api/cached?max_age=60&vary=accept");
    let json = get(&http, vary.clone(), &[("accept", "application/json")]).await;
    let html = get(&http, vary.clone(), &[("accept", "text/html")]).await;
    assert_ne!(json.body, html.body, "Vary: Accept separates the two");
    let json_again = get(&http, vary, &[("accept", "application/json")]).await;
    assert_eq!((json_again.cache.as_str(), json_again.body.as_str()), ("hit", json.body.as_str()));
    assert_eq!(mock.count(), 6);
}

#[tokio::test]
async fn what_is_never_stored_and_who_bypasses() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    for query in ["no_store=1", "max_age=60&cookie=1", "max_age=0"] {
        let url = pacegate.url(&format!("/api/cached?{query}"));
        let before = mock.count();
        for _ in 0..2 {
            assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss", "{query}");
        }
        assert_eq!(mock.count(), before + 2, "{query} is not stored");
    }
    let url = pacegate.url("/api/cached?max_age=60");
    assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss");
    let bypass = get(&http, url.clone(), &[("cache-control", "no-cache")]).await;
    assert_eq!((bypass.status, bypass.cache.as_str()), (200, "bypass"));
    assert_eq!(mock.count(), 8, "the caller's no-cache went to the upstream");
    let post = http.post(pacegate.url("/api/echo")).send().await.expect("an answer");
    assert_eq!(post.headers()["x-pacegate-cache"], "bypass", "every answer says what the cache did");
}

#[tokio::test]
async fn an_upstream_error_while_coalescing_reaches_every_waiter_once() {
    let behaviour = Behaviour::new().latency(Duration::from_millis(2000)).fail_first(1, 500);
    let mock = MockUpstream::start(behaviour).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let seen = all((0..10).map(|_| spawn_get(&http, url.clone())).collect()).await;
    assert_eq!(mock.count(), 1, "one attempt for the group, no hidden attempt per waiter");
    assert!(seen.iter().all(|s| s.status == 500), "{seen:?}");
    assert_eq!((count(&seen, "miss"), count(&seen, "coalesced")), (1, 9), "{seen:?}");
    // The error was not stored: the next caller fetches anew.
    assert_eq!(get(&http, url, &[]).await.status, 200);
    assert_eq!(mock.count(), 2);
}

#[tokio::test]
async fn a_retry_happens_once_for_the_group() {
    let behaviour = Behaviour::new()
        .latency(Duration::from_millis(600))
        .script([Scripted::Status { status: 503, headers: vec![("retry-after".into(), "0".into())] }]);
    let mock = MockUpstream::start(behaviour).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let seen = all((0..10).map(|_| spawn_get(&http, url.clone())).collect()).await;
    assert!(seen.iter().all(|s| s.status == 200 && s.body == r#"{"seq":1}"#), "{seen:?}");
    assert_eq!(mock.count(), 2, "one failed attempt and one retry, for all ten");
}

#[tokio::test]
async fn a_waiter_that_goes_away_does_not_disturb_the_rest() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(3000))).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    // The first caller starts the fetch, then gives up long before its answer.
    let impatient = http.get(url.clone()).timeout(Duration::from_millis(1500)).send();
    let impatient = tokio::spawn(impatient);
    assert!(mock.wait_for_arrivals(1, PATIENCE).await, "the fetch started");
    let patient: Vec<_> = (0..5).map(|_| spawn_get(&http, url.clone())).collect();
    assert!(impatient.await.expect("request task").is_err(), "the impatient caller timed out");
    let seen = all(patient).await;
    assert!(seen.iter().all(|s| s.status == 200 && s.body == r#"{"seq":0}"#), "{seen:?}");
    assert_eq!(mock.count(), 1, "the fetch the first caller started served the rest");
}

#[tokio::test]
async fn memory_stays_within_max_size_and_purge_empties() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "max_size = \"64KiB\"\nmax_object = \"8KiB\"").await;
    let http = client();
    for n in 0..60 {
        let url = pacegate.url(&format!("/api/cached?max_age=60&size=4096&n={n}"));
        assert_eq!(get(&http, url, &[]).await.status, 200);
    }
    let large = pacegate.url("/api/cached?max_age=60&size=10000");
    for _ in 0..2 {
        assert_eq!(get(&http, large.clone(), &[]).await.body.len(), 10_000);
    }
    assert_eq!(mock.count(), 62, "over max_object: passed through, not stored");
    let status = cache_status(&pacegate).await;
    let (entries, bytes) = (status["entries"].as_u64().unwrap(), status["bytes"].as_u64().unwrap());
    assert!(bytes <= 64 * 1024, "{bytes} bytes held: {status}");
    assert!(entries > 0 && entries < 60, "{status}");

    let purge = client().post(pacegate.admin_url("/cache/purge?upstream=api")).send().await.expect("purge");
    assert_eq!(purge.status(), 200);
    let purged: serde_json::Value = purge.json().await.expect("json");
    assert_eq!(purged["purged"]["api"].as_u64(), Some(entries));
    assert_eq!(cache_status(&pacegate).await["entries"], 0);
    let unknown =
        client().post(pacegate.admin_url("/cache/purge?upstream=nope")).send().await.expect("purge");
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn a_write_that_succeeded_invalidates_its_uri() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss");
    assert_eq!(get(&http, url.clone(), &[]).await.cache, "hit");
    let put = http.request(Method::PUT, url.clone()).body("x").send().await.expect("an answer");
    assert_eq!(put.status(), 200);
    assert_eq!(get(&http, url, &[]).await.cache, "miss", "the write made the entry go");
}

/// A GET under way when a write to its URI goes through may bring back
/// what was there before the write: it is served to its caller, and not
/// stored, so the next GET asks the upstream again.
#[tokio::test]
async fn a_get_under_way_during_a_write_is_not_stored() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(600))).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let before = spawn_get(&http, url.clone());
    assert!(mock.wait_for_arrivals(1, PATIENCE).await, "the GET reached the upstream");
    mock.set_behaviour(Behaviour::new());
    let put = http.request(Method::PUT, url.clone()).body("x").timeout(PATIENCE).send().await;
    assert_eq!(put.expect("an answer").status(), 200, "the write went through first");
    // A GET sent after the write does not share the fetch sent before it.
    let after_write = get(&http, url.clone(), &[]).await;
    assert_eq!(after_write.cache, "miss", "a GET after the write joined the fetch before it");
    let before = before.await.expect("request task");
    assert_eq!((before.status, before.cache.as_str()), (200, "miss"));
    assert_eq!(mock.count(), 3, "the first GET was still under way after the write");
    let after = get(&http, url, &[]).await;
    assert_eq!(after.cache, "hit", "the answer fetched after the write is stored");
    assert_eq!(mock.count(), 3);
}

#[tokio::test]
async fn reload_keeps_entries_that_still_fit() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = |cache: &str| {
        let extra = format!("rate = \"100/s\"\nburst = 100\n[upstream.cache]\n{cache}");
        format!("{TEST_SERVER}\n{}", upstream("api", &mock.url(), &extra))
    };
    let pacegate = Pacegate::start_config(&config("max_object = \"8KiB\"")).await;
    let http = client();
    let small = pacegate.url("/api/cached?max_age=60&size=100");
    let large = pacegate.url("/api/cached?max_age=60&size=4000");
    for url in [&small, &large] {
        assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss");
    }
    pacegate.reload_with(&config("max_object = \"1KiB\"")).await;
    assert_eq!(get(&http, small, &[]).await.cache, "hit", "still fits");
    assert_eq!(get(&http, large, &[]).await.cache, "miss", "over the new max_object");
    pacegate.reload_with(&config("enabled = false")).await;
    let off = http.get(pacegate.url("/api/cached?max_age=60")).send().await.expect("an answer");
    assert!(off.headers().get("x-pacegate-cache").is_none(), "no cache, no header");
}

#[tokio::test]
async fn the_queue_bound_holds_for_waiters_and_a_fetch_nobody_waits_for_is_dropped() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(2500))).await;
    let extra = "rate = \"1/4s\"\nqueue_size = 2\n[upstream.cache]\n";
    let pacegate =
        Pacegate::start_config(&format!("{TEST_SERVER}\n{}", upstream("api", &mock.url(), extra))).await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let seen = all((0..6).map(|_| spawn_get(&http, url.clone())).collect()).await;
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 3, "the fetch and two waiters: {seen:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 3, "beyond queue_size waiters: {seen:?}");
    assert_eq!(mock.count(), 1);

    // The quota is spent for four seconds: a new fetch queues, and its only
    // caller gives up. Nobody waits for it any more, so it leaves the
    // queue without being sent.
    let other = pacegate.url("/api/cached?max_age=60&n=2");
    let gave_up = http.get(other).timeout(Duration::from_millis(300)).send().await;
    assert!(gave_up.is_err(), "the caller gave up while its fetch was queued");
    // An absence can only be waited for: past the next slot of the quota.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(mock.count(), 1, "{:?}", mock.arrivals());
    assert_eq!(pacegate.status().await["upstreams"][0]["queue"]["depth"], 0);
}

#[tokio::test]
async fn coalescing_keeps_credentials_and_cookies_apart() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(2000))).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60&private=1&cookie=1");
    let call = |token: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let response = http.get(url).header("authorization", token).timeout(PATIENCE).send().await;
            let response = response.expect("an answer");
            let cookie = response.headers().contains_key("set-cookie");
            let cache = response.headers()["x-pacegate-cache"].to_str().expect("text").to_owned();
            (cache, cookie, response.text().await.expect("a body"))
        })
    };
    let calls: Vec<_> = ["Bearer a", "Bearer a", "Bearer a", "Bearer b"].into_iter().map(call).collect();
    let mut seen = Vec::new();
    for call in calls {
        seen.push(call.await.expect("request task"));
    }
    assert_eq!(mock.count(), 2, "one fetch per credential: {seen:?}");
    let of_a = &seen[..3];
    assert!(of_a.iter().all(|(_, _, body)| *body == of_a[0].2), "{seen:?}");
    assert_ne!(seen[3].2, of_a[0].2, "b never shares a's answer");
    let cookies = of_a.iter().filter(|(_, cookie, _)| *cookie).count();
    assert_eq!(cookies, 1, "only the caller whose request drew the cookie gets it: {seen:?}");
}

#[tokio::test]
async fn a_broken_answer_breaks_every_waiter_and_is_not_stored() {
    let behaviour = Behaviour::new().latency(Duration::from_millis(2000)).script([Scripted::Truncated]);
    let mock = MockUpstream::start(behaviour).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(url).timeout(PATIENCE).send().await?.bytes().await })
        })
        .collect();
    for call in calls {
        assert!(call.await.expect("request task").is_err(), "the body broke off for every waiter");
    }
    assert_eq!(mock.count(), 1);
    let next = get(&http, url, &[]).await;
    assert_eq!((next.status, next.cache.as_str()), (200, "miss"), "nothing broken was stored");
}

#[tokio::test]
async fn head_and_range_requests_bypass() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pacegate = cached_pacegate(&mock, "").await;
    let http = client();
    let url = pacegate.url("/api/cached?max_age=60");
    assert_eq!(get(&http, url.clone(), &[]).await.cache, "miss");
    let head = http.head(url.clone()).send().await.expect("an answer");
    assert_eq!(head.headers()["x-pacegate-cache"], "bypass");
    let range = get(&http, url.clone(), &[("range", "bytes=0-3")]).await;
    assert_eq!(range.cache, "bypass");
    assert_eq!(mock.count(), 3);
    let modified = get(&http, url, &[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")]).await;
    assert_eq!((modified.status, modified.cache.as_str()), (200, "hit"), "no Last-Modified to compare with");
}

#[tokio::test]
async fn a_waiter_with_its_own_max_wait_gives_up_alone() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let extra = "rate = \"1/3s\"\ntimeout = \"500ms\"\n[upstream.cache]\n";
    let pacegate =
        Pacegate::start_config(&format!("{TEST_SERVER}\n{}", upstream("api", &mock.url(), extra))).await;
    let http = client();
    // The quota's one slot goes to another request: the fetch below queues.
    assert_eq!(get(&http, pacegate.url("/api/echo"), &[]).await.status, 200);
    let url = pacegate.url("/api/cached?max_age=60");
    let patient = spawn_get(&http, url.clone());
    let queued = pacegate.wait_status(PATIENCE, |s| support::queue_depth(s, "api") == Some(1)).await;
    assert!(queued, "the patient caller's fetch is queued");
    let start = tokio::time::Instant::now();
    let hasty = http.get(url).header("x-pacegate-max-wait", "200ms").timeout(PATIENCE).send().await;
    let hasty = hasty.expect("an answer");
    assert_eq!(hasty.headers()["x-pacegate-cache"], "coalesced");
    support::assert_pacegate_error(hasty, 503, "queue_timeout", Some("api")).await;
    assert!(start.elapsed() < Duration::from_millis(2500), "gave up after its own wait and one timeout");
    let patient = patient.await.expect("request task");
    assert_eq!((patient.status, patient.cache.as_str()), (200, "miss"), "the fetch went on for the patient");
    assert_eq!(mock.count(), 2);
}
