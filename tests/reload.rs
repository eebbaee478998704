//! Live config reload: triggers (file on disk, `POST /reload`),
//! rejection of bad files, and what a new generation carries over (limiter
//! state, queued requests, removed upstreams). SIGHUP is in `reload_sighup.rs`,
//! its own process, because the signal reaches every pacegate in the process.
mod support;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::mock::{Behaviour, MockUpstream, max_in_any_window};
use support::{Pacegate, TEST_SERVER, client, upstream};
use tokio::time::Instant;

/// A whole config file: the harness's `[server]` followed by `rest`.
fn config_file(rest: &str) -> String {
    format!("{TEST_SERVER}\n{rest}")
}

/// Saves the way many editors do: a new file renamed over the old one.
fn replace_by_rename(path: &Path, text: &str) {
    let temp = path.with_file_name(".pacegate.toml.swp");
    std::fs::write(&temp, text).expect("write temp config");
    std::fs::rename(&temp, path).expect("rename over config");
}

/// Saves in place: truncate and write the same inode.
fn overwrite(path: &Path, text: &str) {
    std::fs::write(path, text).expect("overwrite config");
}

/// `POST /reload`: status and JSON body.
async fn post_reload(pg: &Pacegate) -> (u16, Value) {
    let response = client().post(pg.admin_url("/reload")).send().await.expect("POST /reload");
    let status = response.status().as_u16();
    (status, response.json().await.expect("reload answers JSON"))
}

fn generation(status: &Value) -> u64 {
    status["generation"].as_u64().expect("status has a generation")
}

/// The `/status` entry of upstream `name`, if that upstream exists.
fn upstream_of<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["upstreams"].as_array().expect("upstreams array").iter().find(|u| u["name"] == name)
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future).await.unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// Sends `n` GETs to `path` at once, each its own task; returns the handles.
fn send_concurrently(pg: &Pacegate, path: &str, n: usize) -> Vec<tokio::task::JoinHandle<u16>> {
    let http = client();
    (0..n)
        .map(|i| {
            let (http, url) = (http.clone(), pg.url(&format!("{path}{i}")));
            tokio::spawn(async move { http.get(url).send().await.expect("proxied answer").status().as_u16() })
        })
        .collect()
}

/// The statuses of `tasks`, bounded by `limit` overall.
async fn statuses(limit: Duration, tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    within(limit, "queued requests", async {
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.expect("request task"));
        }
        statuses
    })
    .await
}

#[tokio::test]
async fn raising_the_rate_by_rewriting_the_file_takes_effect() {
    const TOTAL: usize = 200;
    const CONCURRENCY: usize = 50;
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"10/s\"")).await;

    // A running load: 50 workers sending 200 requests between them.
    let next = Arc::new(AtomicUsize::new(0));
    let http = client();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, http, base) = (next.clone(), http.clone(), pg.url("/api/load"));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                    statuses.push(http.get(&base).send().await.expect("proxied answer").status().as_u16());
                }
                statuses
            })
        })
        .collect();

    // About a second at 10/s (the first leaves at once, then one per 100 ms).
    assert!(mock.wait_for_arrivals(10, Duration::from_secs(3)).await, "load did not start");
    let switched = Instant::now();
    replace_by_rename(&pg.config_path, &config_file(&upstream("api", &mock.url(), "rate = \"100/s\"")));

    // At 10/s the rest would need 19 s more; at 100/s about 2 s.
    let all_arrived = mock.wait_for_arrivals(TOTAL, Duration::from_secs(8)).await;
    let times: Vec<Instant> = mock.arrivals().iter().map(|a| a.at).collect();
    let before =
        times.iter().filter(|t| **t < switched && **t >= switched - Duration::from_millis(500)).count();
    let after: Vec<Instant> =
        times.iter().copied().filter(|t| *t >= switched && *t < switched + Duration::from_secs(3)).collect();
    let after = max_in_any_window(&after, Duration::from_millis(500));
    assert!(before <= 8, "10/s allows about 5 arrivals per 500 ms before the switch, saw {before}");
    assert!(
        after >= 25,
        "100/s should give about 50 arrivals per 500 ms within 3 s of the switch, best was {after}"
    );
    assert!(all_arrived, "only {} of {TOTAL} requests reached the mock", mock.count());

    let mut answered = Vec::new();
    for worker in workers {
        answered.extend(within(Duration::from_secs(5), "load", worker).await.expect("worker"));
    }
    assert_eq!(answered.len(), TOTAL);
    assert!(answered.iter().all(|s| *s == 200), "every request ends 200: {answered:?}");
    assert_eq!(mock.count_status(200), TOTAL, "each request reached the mock exactly once");
    let status = pg.status().await;
    assert_eq!(upstream_of(&status, "api").unwrap()["quotas"], serde_json::json!(["100/s"]));
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_file_is_rejected_and_old_config_keeps_serving() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"1000/s\"")).await;
    let before = pg.status().await;
    let path = pg.config_path.display().to_string();

    // Had it been applied, this file would remove the route `/api`.
    let unknown_key = config_file(&upstream("other", &mock.url(), "rate = \"1000/s\"\nbogus_key = 1"));
    let line = unknown_key.lines().position(|l| l.starts_with("bogus_key")).unwrap() + 1;
    overwrite(&pg.config_path, &unknown_key);
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().expect("error message");
    let location = error.strip_prefix(&format!("{path}:{line}:")).unwrap_or_else(|| {
        panic!("error should start with {path}:{line}:col, got {error}");
    });
    let (col, message) = location.split_once(": ").expect("path:line:col: message");
    assert!(col.parse::<u32>().is_ok_and(|c| c >= 1), "column in {error}");
    assert!(message.contains("bogus_key"), "message names the key: {error}");

    // Not TOML at all.
    overwrite(&pg.config_path, "[[upstream]\nname = ");
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().expect("error message");
    assert!(error.starts_with(&format!("{path}:")), "error names the file: {error}");

    let response = client().get(pg.url("/api/echo")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the old route keeps serving");
    let other = client().get(pg.url("/other/echo")).send().await.unwrap();
    assert_eq!(other.status(), 404, "nothing of the rejected file is applied");
    assert_eq!(mock.count(), 1);

    let errors = pg.metric("pacegate_config_reloads_total{result=\"error\"}").await;
    assert!(errors.is_some_and(|n| n >= 2.0), "both rejections are counted: {errors:?}");
    let after = pg.status().await;
    assert_eq!(after["version"], before["version"], "version unchanged after rejected reloads");
    assert_eq!(generation(&after), generation(&before));
    pg.stop().await.unwrap();
}

/// Polls `/metrics` (bounded) until `series` reaches `at_least`; its last value.
async fn metric_reaching(pg: &Pacegate, series: &str, at_least: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = pg.metric(series).await.unwrap_or(0.0);
        if value >= at_least || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_broken_file_is_rejected_once_per_content() {
    const ERRORS: &str = "pacegate_config_reloads_total{result=\"error\"}";
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"")).await;
    let broken = config_file(&upstream("api", &mock.url(), "rate = \"100/s\"\nbogus_key = 1"));
    // The admin answers once the file is watched.
    let start = generation(&pg.status().await);

    overwrite(&pg.config_path, &broken);
    let errors = metric_reaching(&pg, ERRORS, 1.0, Duration::from_secs(3)).await;
    assert_eq!(errors, 1.0, "the broken file is picked up and rejected");

    // The same broken text saved again and again, and a log written next
    // to the config: nothing new to judge. Each save would be looked at
    // within 200 ms; give it five times that to be counted again.
    let log = pg.config_path.with_file_name("pacegate.log");
    for line in 0..5 {
        overwrite(&pg.config_path, &broken);
        std::fs::write(&log, format!("line {line}\n")).expect("write log");
    }
    let errors = metric_reaching(&pg, ERRORS, 2.0, Duration::from_secs(1)).await;
    assert_eq!(errors, 1.0, "the same content is rejected once");

    // Another broken content is news, and so is the first one again once a
    // good file came in between.
    let other = config_file(&upstream("api", &mock.url(), "rate = \"100/s\"\nother_key = 1"));
    overwrite(&pg.config_path, &other);
    assert_eq!(metric_reaching(&pg, ERRORS, 2.0, Duration::from_secs(3)).await, 2.0);
    overwrite(&pg.config_path, &config_file(&upstream("api", &mock.url(), "rate = \"50/s\"")));
    assert!(pg.wait_status(Duration::from_secs(3), |s| generation(s) > start).await, "the fix is loaded");
    overwrite(&pg.config_path, &broken);
    assert_eq!(metric_reaching(&pg, ERRORS, 3.0, Duration::from_secs(3)).await, 3.0);

    // An explicit reload always reads the file, and says what is wrong.
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("bogus_key")), "{body}");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn post_reload_returns_the_new_version() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"1000/s\"\nqueue_size = 20")).await;
    let before = pg.status().await;
    assert_eq!(upstream_of(&before, "api").unwrap()["queue"]["capacity"], 20);

    overwrite(
        &pg.config_path,
        &config_file(&upstream("api", &mock.url(), "rate = \"1000/s\"\nqueue_size = 7")),
    );
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_str().expect("version string");
    let (reloaded_generation, hash) = version.split_once('-').expect("version is GENERATION-HASH");
    let reloaded_generation: u64 = reloaded_generation.parse().expect("generation number");

    let after = pg.status().await;
    assert!(reloaded_generation > generation(&before), "{version} after {}", before["version"]);
    // The file watcher may also have reloaded the same text, never an older one.
    assert!(generation(&after) >= reloaded_generation);
    let current = after["version"].as_str().unwrap();
    assert!(current.ends_with(&format!("-{hash}")), "/status shows {current}, reload said {version}");
    assert_ne!(after["version"], before["version"]);
    assert_eq!(upstream_of(&after, "api").unwrap()["queue"]["capacity"], 7);
    let ok = pg.metric("pacegate_config_reloads_total{result=\"ok\"}").await;
    assert!(ok.is_some_and(|n| n >= 1.0), "reload counted: {ok:?}");

    assert_eq!(client().get(pg.url("/api/x")).send().await.unwrap().status(), 200);
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn removed_upstream_finishes_what_it_holds() {
    let (fast, slow) =
        (MockUpstream::start(Behaviour::new()).await, MockUpstream::start(Behaviour::new()).await);
    let fast_block = upstream("fast", &fast.url(), "rate = \"1000/s\"");
    let pg =
        Pacegate::start(&format!("{fast_block}\n{}", upstream("slow", &slow.url(), "rate = \"5/s\""))).await;

    let queued = send_concurrently(&pg, "/slow/q", 10);
    let waiting = pg
        .wait_status(Duration::from_secs(3), |s| {
            upstream_of(s, "slow").is_some_and(|u| u["queue"]["depth"] == 9)
        })
        .await;
    assert!(waiting, "10 requests should be held by `slow`, one sent at once and 9 queued");

    let depth = r#"pacegate_queue_depth{upstream="slow"}"#;
    assert_eq!(pg.metric(depth).await, Some(9.0));
    replace_by_rename(&pg.config_path, &config_file(&fast_block));
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 200, "{body}");
    assert!(upstream_of(&pg.status().await, "slow").is_none(), "slow is gone from /status");
    // Its gauges go with it, rather than stay at their last value for good.
    assert_eq!(pg.metric(depth).await, None);
    assert_eq!(pg.metric(r#"pacegate_inflight{upstream="slow"}"#).await, None);

    // New requests no longer find the route, while the old ones are still queued.
    let refused = client().get(pg.url("/slow/new")).send().await.unwrap();
    assert_eq!(refused.status(), 404);
    assert_eq!(refused.headers()["x-pacegate-error"], "no_route");
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"], "no_route");
    assert!(slow.count() < 10, "the queued requests were not all sent yet ({})", slow.count());
    assert_eq!(client().get(pg.url("/fast/x")).send().await.unwrap().status(), 200);

    let answered = statuses(Duration::from_secs(6), queued).await;
    assert_eq!(answered, vec![200; 10], "every queued request of the removed upstream ends 200");
    assert_eq!(slow.count(), 10);
    assert!(slow.arrivals().iter().all(|a| a.path_and_query.starts_with("/q")));
    pg.stop().await.unwrap();
}

/// An upstream removed while it still holds a queue, then brought back by
/// name, carries on with that queue and its pace: not a second, fresh
/// limiter beside the one still draining (which sent twice the rate).
#[tokio::test]
async fn an_upstream_brought_back_takes_over_its_queue_and_pace() {
    let (fast, slow) =
        (MockUpstream::start(Behaviour::new()).await, MockUpstream::start(Behaviour::new()).await);
    let fast_block = upstream("fast", &fast.url(), "rate = \"1000/s\"");
    let slow_block = upstream("slow", &slow.url(), "rate = \"4/s\"\nqueue_timeout = \"30s\"");
    let pg = Pacegate::start(&format!("{fast_block}\n{slow_block}")).await;
    let first = send_concurrently(&pg, "/slow/a", 6);
    let queued = |s: &Value| upstream_of(s, "slow").is_some_and(|u| u["queue"]["depth"] == 5);
    assert!(pg.wait_status(Duration::from_secs(3), queued).await, "one sent, five queued");
    pg.reload_with(&config_file(&fast_block)).await;
    pg.reload_with(&config_file(&format!("{fast_block}\n{slow_block}"))).await;
    let second = send_concurrently(&pg, "/slow/b", 6);
    let answered = statuses(Duration::from_secs(10), first.into_iter().chain(second).collect()).await;
    assert_eq!(answered, vec![200; 12]);
    let times: Vec<Instant> = slow.arrivals().iter().map(|a| a.at).collect();
    let most = max_in_any_window(&times, Duration::from_secs(1));
    assert!(most <= 5, "{most} arrivals in one second at 4/s: two limiters paced side by side");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn unchanged_upstream_keeps_its_limiter() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let other = MockUpstream::start(Behaviour::new()).await;
    let api = upstream("api", &mock.url(), "rate = \"2/s\"\nburst = 1");
    let pg = Pacegate::start(&api).await;
    let before = generation(&pg.status().await);

    // Spends the only slot; the next one is 500 ms later.
    assert_eq!(client().get(pg.url("/api/first")).send().await.unwrap().status(), 200);
    let first = mock.arrivals()[0].at;

    // An unrelated change: another upstream is added.
    overwrite(
        &pg.config_path,
        &config_file(&format!("{api}\n{}", upstream("other", &other.url(), "rate = \"10/s\""))),
    );
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 200, "{body}");
    let sent = Instant::now();
    assert!(
        sent - first < Duration::from_millis(300),
        "inconclusive: the reload took until {:?} after the first arrival",
        sent - first
    );
    let second = within(Duration::from_secs(3), "second request", client().get(pg.url("/api/second")).send());
    assert_eq!(second.await.unwrap().status(), 200);

    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(gap >= Duration::from_millis(400), "a reload must not give a fresh burst: gap {gap:?}");
    let status = pg.status().await;
    assert!(generation(&status) > before);
    assert!(upstream_of(&status, "other").is_some(), "the reload was applied");
    pg.stop().await.unwrap();
}

/// Spends the only slot of `from` (a rate of 1/s) with one request, reloads
/// `to`, then sends two more, one after the other: returns the gaps between
/// the three arrivals at the upstream.
async fn gaps_around_a_rate_change(from: &str, to: &str) -> [Duration; 2] {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let api = |rate: &str| upstream("api", &mock.url(), &format!("rate = \"{rate}\"\nburst = 1"));
    let pg = Pacegate::start(&api(from)).await;
    assert_eq!(client().get(pg.url("/api/first")).send().await.unwrap().status(), 200);
    let first = mock.arrivals()[0].at;

    overwrite(&pg.config_path, &config_file(&api(to)));
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 200, "{body}");
    let reloaded = Instant::now() - first;
    assert!(reloaded < Duration::from_millis(600), "inconclusive: the reload took until {reloaded:?}");
    for path in ["/api/second", "/api/third"] {
        let answer = within(Duration::from_secs(5), path, client().get(pg.url(path)).send()).await;
        assert_eq!(answer.unwrap().status(), 200);
    }
    assert_eq!(upstream_of(&pg.status().await, "api").unwrap()["quotas"], serde_json::json!([to]));
    pg.stop().await.unwrap();
    let at: Vec<Instant> = mock.arrivals().iter().map(|a| a.at).collect();
    assert_eq!(at.len(), 3);
    [at[1] - at[0], at[2] - at[1]]
}

#[tokio::test]
async fn a_lower_rate_continues_from_the_last_grant() {
    // After the reload, 30/min spaces 2 s from the last grant; a fresh
    // pacer would let the next request out at once.
    for gap in gaps_around_a_rate_change("1/s", "30/min").await {
        let ms = gap.as_millis();
        assert!((1700..2700).contains(&ms), "30/min spaces about 2010 ms, gap was {ms} ms");
    }
}

#[tokio::test]
async fn respelling_a_rate_changes_no_spacing() {
    for gap in gaps_around_a_rate_change("1/s", "60/min").await {
        let ms = gap.as_millis();
        assert!((800..1500).contains(&ms), "60/min spaces about 1005 ms, gap was {ms} ms");
    }
}

#[tokio::test]
async fn file_watch_picks_up_changes_within_2s() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"\nqueue_size = 10")).await;
    let start = generation(&pg.status().await);
    let capacity_is = |status: &Value, n: u64| upstream_of(status, "api").unwrap()["queue"]["capacity"] == n;

    replace_by_rename(
        &pg.config_path,
        &config_file(&upstream("api", &mock.url(), "rate = \"100/s\"\nqueue_size = 11")),
    );
    let renamed = pg.wait_status(Duration::from_secs(3), |s| generation(s) > start).await;
    assert!(renamed, "a file renamed over the config is picked up");
    let status = pg.status().await;
    assert!(capacity_is(&status, 11), "{status}");
    let renamed = generation(&status);

    overwrite(
        &pg.config_path,
        &config_file(&upstream("api", &mock.url(), "rate = \"100/s\"\nqueue_size = 12")),
    );
    let overwritten = pg.wait_status(Duration::from_secs(3), |s| generation(s) > renamed).await;
    assert!(overwritten, "a config overwritten in place is picked up");
    assert!(capacity_is(&pg.status().await, 12));
    pg.stop().await.unwrap();
}

/// A config behind symlinks is watched through them, every link of the
/// way: mounted as Kubernetes mounts a ConfigMap, behind one more link
/// (`pacegate.toml -> current.toml -> ./..data/pacegate.toml`, `..data ->
/// ..v1`), it is reloaded each time `..data` is swapped to a new version
/// the way kubelet does (the old version then removed); a link to a file
/// elsewhere is reloaded when that file is edited in place, and after the
/// link is re-pointed, when the new file is.
#[tokio::test]
async fn a_config_behind_symlinks_is_reloaded() {
    use std::os::unix::fs::symlink;
    let mock = MockUpstream::start(Behaviour::new()).await;
    let text = |queue: u32| {
        config_file(&upstream("api", &mock.url(), &format!("queue_size = {queue}\nrate = \"10/s\"")))
    };
    let capacity = |queue: u32| move |s: &Value| upstream_of(s, "api").unwrap()["queue"]["capacity"] == queue;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let version = |name: &str, queue: u32| {
        std::fs::create_dir(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("pacegate.toml"), text(queue)).unwrap();
    };
    version("..v10", 10);
    symlink("..v10", root.join("..data")).unwrap();
    symlink("./..data/pacegate.toml", root.join("current.toml")).unwrap();
    symlink("current.toml", root.join("pacegate.toml")).unwrap();
    let pg = Pacegate::start_file(dir, root.join("pacegate.toml")).await;
    // The admin answers once the file is watched.
    assert!(capacity(10)(&pg.status().await));
    for queue in [11, 12] {
        version(&format!("..v{queue}"), queue);
        symlink(format!("..v{queue}"), root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join(format!("..v{}", queue - 1))).unwrap();
        let swapped = pg.wait_status(Duration::from_secs(5), capacity(queue)).await;
        assert!(swapped, "the swap to {queue} was not picked up");
    }
    pg.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (elsewhere, root) = (dir.path().join("elsewhere"), dir.path().join("etc"));
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::create_dir(&root).unwrap();
    std::fs::write(elsewhere.join("one.toml"), text(20)).unwrap();
    std::fs::write(elsewhere.join("two.toml"), text(30)).unwrap();
    symlink(elsewhere.join("one.toml"), root.join("pacegate.toml")).unwrap();
    let pg = Pacegate::start_file(dir, root.join("pacegate.toml")).await;
    assert!(capacity(20)(&pg.status().await));
    overwrite(&elsewhere.join("one.toml"), &text(21));
    assert!(pg.wait_status(Duration::from_secs(5), capacity(21)).await, "the edit was not picked up");
    // Re-pointed the way `ln -sfn` does it: a new link renamed over the old.
    symlink(elsewhere.join("two.toml"), root.join("pacegate.toml.new")).unwrap();
    std::fs::rename(root.join("pacegate.toml.new"), root.join("pacegate.toml")).unwrap();
    assert!(pg.wait_status(Duration::from_secs(5), capacity(30)).await, "the new link was not picked up");
    overwrite(&elsewhere.join("two.toml"), &text(31));
    assert!(
        pg.wait_status(Duration::from_secs(5), capacity(31)).await,
        "the new file's edit was not picked up"
    );
    pg.stop().await.unwrap();

    // A release directory on the way: `pacegate.toml -> /srv/current/pacegate.toml`,
    // `current -> releases/v1`, re-pointed to v2, then v2 edited in place.
    let dir = tempfile::tempdir().unwrap();
    let (srv, root) = (dir.path().join("srv"), dir.path().join("etc"));
    for (release, queue) in [("v1", 40), ("v2", 41)] {
        std::fs::create_dir_all(srv.join("releases").join(release)).unwrap();
        std::fs::write(srv.join("releases").join(release).join("pacegate.toml"), text(queue)).unwrap();
    }
    std::fs::create_dir(&root).unwrap();
    symlink("releases/v1", srv.join("current")).unwrap();
    symlink(srv.join("current/pacegate.toml"), root.join("pacegate.toml")).unwrap();
    let pg = Pacegate::start_file(dir, root.join("pacegate.toml")).await;
    assert!(capacity(40)(&pg.status().await));
    symlink("releases/v2", srv.join("current.new")).unwrap();
    std::fs::rename(srv.join("current.new"), srv.join("current")).unwrap();
    assert!(pg.wait_status(Duration::from_secs(5), capacity(41)).await, "the new release was not picked up");
    overwrite(&srv.join("releases/v2/pacegate.toml"), &text(42));
    assert!(pg.wait_status(Duration::from_secs(5), capacity(42)).await, "its edit was not picked up");
    pg.stop().await.unwrap();
}

/// A file written in steps (a script appending one upstream at a time,
/// 50 ms apart, 250 ms in all) is reloaded once, whole: the watcher waits
/// for 200 ms without a change, not 200 ms after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_steps_is_reloaded_once_whole() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let url = mock.url();
    let block = move |i: usize| upstream(&format!("api{i}"), &url, "rate = \"10/s\"");
    let pg = Pacegate::start(&block(0)).await;
    let start = generation(&pg.status().await);
    // On a thread of its own, as a script would: pacegate's work does
    // not space the steps out.
    let path = pg.config_path.clone();
    let writer = std::thread::spawn(move || {
        for i in 1..6 {
            let mut file = std::fs::OpenOptions::new().append(true).open(&path).expect("open config");
            std::io::Write::write_all(&mut file, format!("\n{}", block(i)).as_bytes()).expect("append");
            drop(file);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    tokio::task::spawn_blocking(move || writer.join()).await.unwrap().expect("the writer");
    let whole = |s: &Value| s["upstreams"].as_array().is_some_and(|u| u.len() == 6);
    assert!(pg.wait_status(Duration::from_secs(5), whole).await, "{}", pg.status().await);
    assert_eq!(generation(&pg.status().await), start + 1, "a reload of a half-written file came first");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn queue_size_change_applies_without_dropping_queued() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"5/s\"\nqueue_size = 20")).await;

    let queued = send_concurrently(&pg, "/api/q", 10);
    let depth = |s: &Value| upstream_of(s, "api").unwrap()["queue"]["depth"].as_u64().unwrap();
    assert!(pg.wait_status(Duration::from_secs(3), |s| depth(s) == 9).await, "9 queued behind the first");

    overwrite(&pg.config_path, &config_file(&upstream("api", &mock.url(), "rate = \"5/s\"\nqueue_size = 5")));
    let (status, body) = post_reload(&pg).await;
    assert_eq!(status, 200, "{body}");

    let status = pg.status().await;
    assert_eq!(upstream_of(&status, "api").unwrap()["queue"]["capacity"], 5);
    assert!(depth(&status) > 5, "the queue still holds more than the new capacity: {status}");
    let asked = Instant::now();
    let refused = client().get(pg.url("/api/new")).send().await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(1), "queue_full is answered at once");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["x-pacegate-error"], "queue_full");
    assert!(refused.headers().contains_key("retry-after"));

    let answered = statuses(Duration::from_secs(6), queued).await;
    assert_eq!(answered, vec![200; 10], "what was queued is not dropped");
    assert_eq!(mock.count(), 10, "the refused request never reached the mock");
    pg.stop().await.unwrap();
}
