//! Observability: exact `/metrics` values after a scripted run,
//! `/status` during a cooldown, JSON logs of the real binary carrying the documented
//! events, no credentials in any log line, and pacegate's answer headers.
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::redis_server::RedisServer;
use support::{Pacegate, TEST_SERVER, client, upstream};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SECRET_BEARER: &str = "sk-secret-XYZ";
const SECRET_PROXY: &str = "c2VjcmV0";
const SECRET_KEY: &str = "key-secret-ABC";
const SECRET_BODY: &str = "body-secret-QQQ";

// === /metrics ===

/// One sample of the Prometheus text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `name{k="v",...} value` lines; comments and blank lines are skipped.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(_) => {
                let close = line.rfind('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                (&line[..close + 1], &line[close + 1..])
            }
            None => line.split_at(line.find(' ').unwrap_or_else(|| panic!("no value: {line}"))),
        };
        let (name, labels) = match series.find('{') {
            Some(open) => (&series[..open], parse_labels(&series[open + 1..series.len() - 1])),
            None => (series, BTreeMap::new()),
        };
        let value = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        assert_eq!(chars.next(), Some('"'), "label {key} is not quoted in {text}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {text}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {text}"),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// The value of the series with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut found = samples.iter().filter(|s| s.name == name && s.labels == want);
    let first = found.next().map(|s| s.value);
    assert!(found.next().is_none(), "{name}{want:?} appears twice");
    first
}

/// Like [`value`], for a series that must exist.
fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("missing series {name}{labels:?}"))
}

async fn scrape(pg: &Pacegate) -> (String, Vec<Sample>) {
    let response = client().get(pg.admin_url("/metrics")).send().await.expect("scrape");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("metrics text");
    let samples = parse_metrics(&text);
    (text, samples)
}

/// A GET through the reverse proxy: status, `x-pacegate-attempts`, `x-pacegate-error`.
fn get(url: String) -> JoinHandle<(u16, Option<String>, Option<String>)> {
    tokio::spawn(async move {
        let response = client().get(url).send().await.expect("proxied request");
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let answer = (response.status().as_u16(), header("x-pacegate-attempts"), header("x-pacegate-error"));
        response.bytes().await.expect("answer body");
        answer
    })
}

fn api(status: &Value) -> &Value {
    &status["upstreams"][0]
}

/// The script: request one meets 503 (retry, no cooldown), then 429 with
/// `retry-after-ms: 1500` (retry after a whole-upstream cooldown), then 200.
/// During that cooldown request two waits in the queue (`queue_size = 1`), so
/// request three is refused `queue_full`; two then gets its 200 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_scripted_run_have_exact_values() {
    let mock = MockUpstream::start(
        Behaviour::new()
            .script([Scripted::status(503), Scripted::status_with(429, &[("retry-after-ms", "1500")])]),
    )
    .await;
    let extra = r#"rate = "50/s"
adaptive = false
queue_size = 1
max_concurrency = 4
[upstream.retry]
max_attempts = 3
on_status = [429, 503]
base_delay = "20ms"
max_delay = "100ms"
jitter = "none"
budget = 100.0
"#;
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;

    let one = get(pg.url("/api/one"));
    assert!(mock.wait_for_arrivals(2, Duration::from_secs(5)).await, "503 then 429 upstream");
    let cooling = pg.wait_status(Duration::from_secs(5), |s| !api(s)["cooldown"].is_null()).await;
    assert!(cooling, "the 429 starts a cooldown");
    let two = get(pg.url("/api/two"));
    let queued = pg.wait_status(Duration::from_secs(5), |s| api(s)["queue"]["depth"] == 1).await;
    assert!(queued, "request two waits out the cooldown in the queue");
    let (status, _, error) = get(pg.url("/api/three")).await.unwrap();
    assert_eq!((status, error.as_deref()), (503, Some("queue_full")));
    assert_eq!(one.await.unwrap(), (200, Some("3".into()), None));
    assert_eq!(two.await.unwrap(), (200, Some("1".into()), None));
    let statuses: Vec<u16> = mock.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(statuses, [503, 429, 200, 200], "what the upstream saw");

    let reload = client().post(pg.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    // Answers are counted when their body ends; wait until nothing is held.
    let idle = |s: &Value| api(s)["inflight"]["now"] == 0 && api(s)["queue"]["depth"] == 0;
    assert!(pg.wait_status(Duration::from_secs(5), idle).await, "inflight back to 0");

    let (text, m) = scrape(&pg).await;
    let up = ("upstream", "api");
    let requests = |code| value(&m, "pacegate_requests_total", &[up, ("code", code)]);
    assert_eq!(requests("200"), Some(2.0), "{text}");
    assert_eq!(requests("503"), Some(1.0), "{text}");
    let all_requests: f64 = m
        .iter()
        .filter(|s| s.name == "pacegate_requests_total" && s.labels["upstream"] == "api")
        .map(|s| s.value)
        .sum();
    assert_eq!(all_requests, 3.0, "one series per answer code, nothing else: {text}");

    let attempts = |outcome| value(&m, "pacegate_upstream_attempts_total", &[up, ("outcome", outcome)]);
    assert_eq!(attempts("ok"), Some(2.0), "{text}");
    assert_eq!(attempts("server_error"), Some(1.0), "{text}");
    assert_eq!(attempts("rate_limited"), Some(1.0), "{text}");
    for other in ["client_error", "connect_error", "timeout", "broken"] {
        assert_eq!(attempts(other), Some(0.0), "no {other} attempt: {text}");
    }
    let retries = |reason| value(&m, "pacegate_retries_total", &[up, ("reason", reason)]);
    assert_eq!(retries("status_5xx"), Some(1.0), "{text}");
    assert_eq!(retries("status_429"), Some(1.0), "{text}");
    let rejected = |reason| value(&m, "pacegate_rejected_total", &[up, ("reason", reason)]);
    assert_eq!(rejected("queue_full"), Some(1.0), "{text}");
    assert_eq!(rejected("queue_timeout"), Some(0.0), "{text}");

    assert_eq!(must(&m, "pacegate_queue_depth", &[up]), 0.0, "{text}");
    assert_eq!(must(&m, "pacegate_inflight", &[up]), 0.0, "{text}");
    assert_eq!(must(&m, "pacegate_effective_rate", &[up]), 50.0, "{text}");
    let cooldown = must(&m, "pacegate_cooldown_seconds_total", &[up]);
    assert!((cooldown - 1.5).abs() < 1e-6, "one 1.5 s cooldown, got {cooldown}: {text}");
    assert_eq!(must(&m, "pacegate_config_reloads_total", &[("result", "ok")]), 1.0, "{text}");
    assert_eq!(value(&m, "pacegate_config_reloads_total", &[("result", "error")]), Some(0.0), "{text}");

    // Histograms: four tickets (three for request one, one for two), four answers.
    for histogram in ["pacegate_queue_wait_seconds", "pacegate_upstream_duration_seconds"] {
        let buckets: Vec<&Sample> = m
            .iter()
            .filter(|s| s.name == format!("{histogram}_bucket") && s.labels["upstream"] == "api")
            .collect();
        assert!(buckets.len() >= 6, "{histogram} has sensible buckets: {text}");
        let inf = buckets.iter().find(|s| s.labels["le"] == "+Inf").expect("+Inf bucket");
        assert_eq!(inf.value, 4.0, "{histogram}: {text}");
        assert_eq!(must(&m, &format!("{histogram}_count"), &[up]), 4.0, "{histogram}: {text}");
        let mut cumulative: Vec<(f64, f64)> =
            buckets.iter().map(|s| (s.labels["le"].parse::<f64>().unwrap(), s.value)).collect();
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(cumulative.windows(2).all(|w| w[0].1 <= w[1].1), "{histogram} buckets are cumulative");
    }
    // Request two waited out most of the 1.5 s cooldown in the queue.
    let waited = must(&m, "pacegate_queue_wait_seconds_sum", &[up]);
    assert!((1.0..10.0).contains(&waited), "queue wait sum {waited}: {text}");
    let below_half_second = m
        .iter()
        .find(|s| {
            s.name == "pacegate_queue_wait_seconds_bucket"
                && s.labels["upstream"] == "api"
                && s.labels["le"] == "0.5"
        })
        .map(|s| s.value);
    assert!(below_half_second.is_some_and(|v| v <= 3.0), "the long wait is not in le=0.5: {text}");
    pg.stop().await.unwrap();
}

/// Label values of the per-upstream series with a fixed label set.
const OUTCOMES: [&str; 7] =
    ["ok", "client_error", "rate_limited", "server_error", "connect_error", "timeout", "broken"];
const RETRY_REASONS: [&str; 6] = ["status_429", "status_5xx", "status_other", "connect", "timeout", "broken"];
const REFUSALS: [&str; 5] =
    ["queue_full", "queue_timeout", "rate_limit_store", "too_many_partitions", "shutting_down"];

/// Asserts that every series of upstream `name` with a fixed label set is there, at 0.
fn assert_fixed_series_at_zero(m: &[Sample], text: &str, name: &str) {
    let up = ("upstream", name);
    let families = [
        ("pacegate_upstream_attempts_total", "outcome", &OUTCOMES[..]),
        ("pacegate_retries_total", "reason", &RETRY_REASONS[..]),
        ("pacegate_rejected_total", "reason", &REFUSALS[..]),
    ];
    for (family, label, values) in families {
        for v in values {
            assert_eq!(value(m, family, &[up, (label, v)]), Some(0.0), "{family} {name} {v}: {text}");
        }
    }
    assert_eq!(value(m, "pacegate_cooldown_seconds_total", &[up]), Some(0.0), "{name}: {text}");
}

/// A scrape before anything happened shows every series with a fixed label
/// set at 0, and so does one after a reload added an upstream; the Redis
/// series come and go with `[redis]`.
#[tokio::test]
async fn fixed_label_series_are_exported_at_zero_from_start_up() {
    // Nothing is sent: the upstreams' hosts and Redis are never reached.
    let first = upstream("first", "http://first.test", "rate = \"10/s\"");
    let pg = Pacegate::start(&first).await;
    let (text, m) = scrape(&pg).await;
    for result in ["ok", "error"] {
        assert_eq!(value(&m, "pacegate_config_reloads_total", &[("result", result)]), Some(0.0), "{text}");
    }
    assert_fixed_series_at_zero(&m, &text, "first");
    assert!(!text.contains("pacegate_redis_"), "no [redis], no Redis series: {text}");

    let second = upstream("second", "http://second.test", "rate = \"10/s\"");
    let redis = format!("[redis]\nurl = \"{}\"\n", RedisServer::unreachable_url());
    pg.reload_with(&format!("{TEST_SERVER}\n{redis}\n{first}\n{second}")).await;
    let (text, m) = scrape(&pg).await;
    assert_fixed_series_at_zero(&m, &text, "second");
    for series in ["pacegate_redis_up", "pacegate_redis_errors_total", "pacegate_redis_fallbacks_total"] {
        assert!(value(&m, series, &[]).is_some(), "{series}: {text}");
    }
    // A Redis never reached shows down without a request having to find
    // out: its first connection failed once, and pacing fell back once.
    let down = pg.wait_status(Duration::from_secs(10), |status| status["redis"]["up"] == false).await;
    assert!(down, "{}", pg.status().await);
    let (text, m) = scrape(&pg).await;
    assert_eq!(value(&m, "pacegate_redis_up", &[]), Some(0.0), "{text}");
    assert_eq!(value(&m, "pacegate_redis_errors_total", &[]), Some(1.0), "{text}");
    assert_eq!(value(&m, "pacegate_redis_fallbacks_total", &[]), Some(1.0), "{text}");

    pg.reload_with(&format!("{TEST_SERVER}\n{first}")).await;
    let (text, _) = scrape(&pg).await;
    assert!(!text.contains("pacegate_redis_"), "[redis] removed, its series gone: {text}");
    pg.stop().await.unwrap();
}

/// A scraper that asks for OpenMetrics (Prometheus does) gets it; any other
/// gets the Prometheus text format, with the same samples: a counter's
/// `# TYPE` names its samples, and there is no `# EOF`.
#[tokio::test]
async fn metrics_come_in_the_format_the_scraper_asks_for() {
    let pg = Pacegate::start(&upstream("api", "http://api.test", "rate = \"10/s\"")).await;
    let scrape = |accept: &'static str| {
        let request = client().get(pg.admin_url("/metrics")).header("accept", accept);
        async move {
            let response = request.send().await.expect("scrape");
            let content_type = response.headers()["content-type"].to_str().expect("text").to_owned();
            (content_type, response.text().await.expect("metrics text"))
        }
    };
    let prometheus =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
    let (content_type, openmetrics) = scrape(prometheus).await;
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE pacegate_config_reloads counter\n"), "{openmetrics}");

    let (content_type, text) = scrape("*/*").await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(text.contains("# TYPE pacegate_config_reloads_total counter\n"), "{text}");
    assert!(text.contains("# TYPE pacegate_queue_depth gauge\n"), "{text}");
    let samples = |text: &str| -> Vec<String> {
        text.lines().filter(|line| !line.starts_with('#')).map(str::to_owned).collect()
    };
    assert_eq!(samples(&text), samples(&openmetrics), "the same samples in both");
    pg.stop().await.unwrap();
}

// === /status ===

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_during_a_cooldown() {
    let mock = MockUpstream::start(Behaviour::new().respond_429_once("2")).await;
    let extra = r#"rate = "20/s"
burst = 2
max_concurrency = 3
queue_size = 5
[upstream.retry]
jitter = "none"
budget = 100.0
"#;
    let started_ms = unix_ms_now();
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let one = get(pg.url("/api/one"));
    assert!(mock.wait_for_arrivals(1, Duration::from_secs(5)).await);
    assert!(
        pg.wait_status(Duration::from_secs(5), |s| !api(s)["cooldown"].is_null()).await,
        "cooldown starts"
    );
    let two = get(pg.url("/api/two"));

    // The first snapshot that shows request two waiting (bounded: 2 s of cooldown).
    let mut snapshot = None;
    for _ in 0..150 {
        let status = pg.status().await;
        if api(&status)["queue"]["depth"] == 1 {
            snapshot = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = snapshot.expect("request two shows in queue.depth during the cooldown");
    let now_ms = unix_ms_now();
    assert!(s["version"].as_str().is_some_and(|v| !v.is_empty()), "{s:#}");
    assert_eq!(s["generation"], 1, "{s:#}");
    let uptime = s["uptime_seconds"].as_f64().expect("uptime_seconds");
    assert!(uptime > 0.0 && uptime < 60.0, "{s:#}");

    let u = api(&s);
    assert_eq!(u["name"], "api");
    assert_eq!(u["quotas"], serde_json::json!(["20/s"]), "{s:#}");
    assert_eq!(u["burst"], 2, "{s:#}");
    assert_eq!(u["adaptive"], true, "{s:#}");
    let rate = u["effective_rate"].as_f64().expect("effective_rate");
    assert!(rate > 0.0 && rate <= 20.0, "{s:#}");
    assert_eq!(u["queue"], serde_json::json!({"depth": 1, "capacity": 5}), "{s:#}");
    // Request one sleeps its backoff without a ticket; two has none yet.
    assert_eq!(u["inflight"], serde_json::json!({"now": 0, "max": 3}), "{s:#}");
    let remaining = u["cooldown"]["remaining_ms"].as_u64().expect("cooldown.remaining_ms");
    assert!(remaining > 0 && remaining <= 2000, "{s:#}");
    let until = u["cooldown"]["until_unix_ms"].as_u64().expect("cooldown.until_unix_ms");
    assert!(until.abs_diff(now_ms + remaining) < 1000, "until {until} vs now {now_ms} + {remaining}");
    assert_eq!(u["last_rate_limited"]["retry_after_ms"], 2000, "{s:#}");
    let at = u["last_rate_limited"]["at_unix_ms"].as_u64().expect("last_rate_limited.at_unix_ms");
    assert!(at >= started_ms && at <= now_ms, "429 seen at {at}, test ran {started_ms}..{now_ms}");
    assert_eq!(u["requests"], 0, "nobody answered yet: {s:#}");
    assert_eq!(u["attempts"]["rate_limited"], 1, "{s:#}");
    assert_eq!(u["attempts"]["ok"], 0, "{s:#}");
    // Decided, not sent yet: counted once it leaves.
    assert_eq!(u["retries"]["status_429"], 0, "{s:#}");
    let rejections = u["rejections"].as_object().expect("rejections");
    assert!(rejections.values().all(|v| v == 0) && rejections.len() == 7, "{s:#}");
    assert_eq!(u["limits"], serde_json::json!([]), "no endpoint limits configured: {s:#}");

    assert_eq!(one.await.unwrap(), (200, Some("2".into()), None));
    assert_eq!(two.await.unwrap(), (200, Some("1".into()), None));
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 3);
    for later in &arrivals[1..] {
        let after = later.at.duration_since(arrivals[0].at);
        assert!(after >= Duration::from_millis(1900), "left during the cooldown: {after:?}");
    }
    let settled = |s: &Value| {
        let u = api(s);
        u["cooldown"].is_null()
            && u["requests"] == 2
            && u["attempts"]["ok"] == 2
            && u["queue"]["depth"] == 0
            && u["retries"]["status_429"] == 1
    };
    assert!(pg.wait_status(Duration::from_secs(5), settled).await, "{:#}", pg.status().await);
    pg.stop().await.unwrap();
}

/// Each endpoint limit in `/status`: its quotas, pace, waiters and its own
/// cooldown, while the upstream itself does not cool down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_endpoint_limit() {
    let answer = Scripted::status_with(429, &[("retry-after", "2"), ("x-ratelimit-resource", "writes")]);
    let mock = MockUpstream::start(Behaviour::new().script([answer])).await;
    let extra = r#"rate = "50/s"
[upstream.retry]
jitter = "none"
budget = 100.0

[[upstream.limit]]
name = "writes"
methods = ["POST"]
rate = "5/s"
"#;
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let post = |path: &'static str| {
        let url = pg.url(path);
        tokio::spawn(async move { client().post(url).send().await.expect("proxied POST").status().as_u16() })
    };
    let first = post("/api/first");
    let writes_cool = |s: &Value| !api(s)["limits"][0]["cooldown"].is_null();
    assert!(pg.wait_status(Duration::from_secs(5), writes_cool).await, "{:#}", pg.status().await);
    let second = post("/api/second");
    // The first POST sleeps its backoff; the second waits for the limit.
    let waiting = |s: &Value| api(s)["limits"][0]["waiting"] == 1;
    assert!(pg.wait_status(Duration::from_secs(2), waiting).await, "{:#}", pg.status().await);
    let s = pg.status().await;
    let limit = &api(&s)["limits"][0];
    assert_eq!(limit["name"], "writes", "{s:#}");
    assert_eq!(limit["quotas"], serde_json::json!(["5/s"]), "{s:#}");
    assert_eq!(limit["rate"], 5.0, "{s:#}");
    let remaining = limit["cooldown"]["remaining_ms"].as_u64().expect("cooldown.remaining_ms");
    assert!(remaining > 0 && remaining <= 2000, "{s:#}");
    assert!(api(&s)["cooldown"].is_null(), "the upstream itself does not cool down: {s:#}");
    let (status, _, _) = get(pg.url("/api/read")).await.unwrap();
    assert_eq!(status, 200, "a GET does not wait for the writes limit");
    assert_eq!(mock.arrivals().last().map(|a| a.method.clone()), Some("GET".into()), "the GET went first");
    assert_eq!((first.await.unwrap(), second.await.unwrap()), (200, 200));
    pg.stop().await.unwrap();
}

// === the binary's logs ===

/// The `pacegate` binary running as a child, its stderr read line by line.
struct Binary {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    /// Lines read before the addresses were found.
    early: Vec<String>,
    /// Reads stderr to the end (always, so a verbose child never blocks on it).
    reader: JoinHandle<Vec<String>>,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts `pacegate --log-format json` with `PACEGATE_LOG=filter` and waits
    /// (bounded) for the `listening proxy=… admin=…` line.
    async fn start(rest: &str, filter: &str) -> Binary {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("pacegate.toml");
        std::fs::write(&config_path, format!("{}\n{rest}", support::TEST_SERVER)).expect("write config");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pacegate"))
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json"])
            .env("PACEGATE_LOG", filter)
            .env_remove("PACEGATE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pacegate");
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = lines_tx.send(line.clone());
                all.push(line);
            }
            all
        });
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let (proxy, admin) = loop {
            let line = tokio::time::timeout_at(deadline, lines_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no `listening` line within 20 s: {early:#?}"))
                .unwrap_or_else(|| panic!("pacegate exited before listening: {early:#?}"));
            early.push(line.clone());
            let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
            let Some(message) = event["message"].as_str() else { continue };
            if let Some(addrs) = message.strip_prefix("listening proxy=") {
                // Exactly `listening proxy=ADDR admin=ADDR`: scripts parse it;
                // the worker count is a field of its own.
                let (proxy, admin) = addrs.split_once(" admin=").expect("`proxy=ADDR admin=ADDR`");
                assert!(event["workers"].is_u64(), "{line}");
                break (
                    proxy.parse().expect("proxy address"),
                    admin.parse().expect("admin address, nothing after"),
                );
            }
        };
        Binary { child, proxy, admin, config_path, early, reader, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Polls `/status` (bounded) until `ready` holds.
    async fn wait_status(&self, ready: impl Fn(&Value) -> bool) -> bool {
        for _ in 0..500 {
            let status: Value =
                client().get(self.admin_url("/status")).send().await.unwrap().json().await.unwrap();
            if ready(&status) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// SIGTERM, wait (bounded) for a clean exit, and return every stderr line.
    async fn terminate(mut self) -> Vec<String> {
        let pid = self.child.id().expect("child still running");
        let kill = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        assert!(kill.expect("run kill").success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        let exit = exit.expect("pacegate exits within 15 s of SIGTERM").expect("wait");
        let rest = tokio::time::timeout(Duration::from_secs(5), self.reader).await;
        let rest = rest.expect("stderr closes after exit").expect("reader task");
        assert!(exit.success(), "exit after SIGTERM: {exit:?}");
        rest
    }
}

/// Every line as JSON; panics naming the first line that is not one object.
fn parse_json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => value,
            _ => panic!("not a JSON object: {line}"),
        })
        .collect()
}

fn with_message<'a>(events: &'a [Value], message: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["message"] == message).collect()
}

/// One 429 (`retry-after-ms: 1500`) and its retry; during the cooldown a
/// request with a short `x-pacegate-max-wait` times out in the queue, one
/// waits and one is refused (`queue_size = 1`); then a good and a bad reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_the_events() {
    let mock = MockUpstream::start(
        Behaviour::new().script([Scripted::status_with(429, &[("retry-after-ms", "1500")])]),
    )
    .await;
    let extra = "rate = \"50/s\"\nqueue_size = 1\n[upstream.retry]\njitter = \"none\"\nbudget = 100.0\n";
    let bin = Binary::start(&upstream("api", &mock.url(), extra), "info").await;

    let one = get(bin.url("/api/one"));
    assert!(mock.wait_for_arrivals(1, Duration::from_secs(5)).await);
    assert!(bin.wait_status(|s| !api(s)["cooldown"].is_null()).await, "cooldown starts");
    let short =
        client().get(bin.url("/api/short")).header("x-pacegate-max-wait", "100ms").send().await.unwrap();
    assert_eq!(short.headers()["x-pacegate-error"], "queue_timeout");
    let two = get(bin.url("/api/two"));
    assert!(bin.wait_status(|s| api(s)["queue"]["depth"] == 1).await, "request two queued");
    let (status, _, error) = get(bin.url("/api/three")).await.unwrap();
    assert_eq!((status, error.as_deref()), (503, Some("queue_full")));
    assert_eq!(one.await.unwrap(), (200, Some("2".into()), None));
    assert_eq!(two.await.unwrap().0, 200);
    let reload = client().post(bin.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    std::fs::write(&bin.config_path, "[server\n").unwrap();
    let reload = client().post(bin.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 400);

    let early = bin.early.len();
    let lines = bin.terminate().await;
    assert!(lines.len() > early, "the reader saw at least the startup lines");
    let events = parse_json_lines(&lines);
    for event in &events {
        assert!(event["level"].is_string() && event["timestamp"].is_string(), "level, timestamp: {event}");
    }

    let rate_limited = with_message(&events, "rate_limited");
    assert_eq!(rate_limited.len(), 1, "{lines:#?}");
    let e = rate_limited[0];
    assert_eq!((&e["upstream"], &e["attempt"], &e["status"]), (&"api".into(), &1.into(), &429.into()), "{e}");
    assert_eq!((&e["delay_ms"], &e["reason"]), (&1500.into(), &"status_429".into()), "{e}");

    let retry = with_message(&events, "retry");
    assert_eq!(retry.len(), 1, "{lines:#?}");
    let e = retry[0];
    assert_eq!((&e["upstream"], &e["attempt"], &e["status"]), (&"api".into(), &1.into(), &429.into()), "{e}");
    assert_eq!(e["reason"], "status_429", "{e}");
    let delay = e["delay_ms"].as_u64().expect("retry delay_ms");
    assert!((1500..=2500).contains(&delay), "retry waits at least Retry-After: {e}");

    let cooldown = with_message(&events, "cooldown");
    assert_eq!(cooldown.len(), 1, "{lines:#?}");
    let e = cooldown[0];
    assert_eq!((&e["upstream"], &e["delay_ms"]), (&"api".into(), &1500.into()), "{e}");
    assert!(e["reason"].is_string(), "cooldown says why: {e}");

    for (message, reason) in [("queue_full", "queue_full"), ("queue_timeout", "queue_timeout")] {
        let found = with_message(&events, message);
        assert_eq!(found.len(), 1, "{message}: {lines:#?}");
        assert_eq!(
            (&found[0]["upstream"], &found[0]["reason"]),
            (&"api".into(), &reason.into()),
            "{}",
            found[0]
        );
    }
    assert_eq!(with_message(&events, "config_reloaded").len(), 1, "{lines:#?}");
    // The watcher may also see the broken file: at least the POST is logged.
    assert!(!with_message(&events, "config_rejected").is_empty(), "{lines:#?}");
}

/// Credentials sent through the proxy, on every path (reverse with a 429 and a
/// retry, h2c, forward, pacegate's own errors), never appear at `trace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_never_reaches_the_logs() {
    let mock = MockUpstream::start(
        Behaviour::new().script([Scripted::status_with(429, &[("retry-after-ms", "50")])]),
    )
    .await;
    let rest = format!(
        "[[upstream]]\nname = \"api\"\nbase_url = \"{}\"\nroute = \"/api\"\nhosts = [\"api.test\"]\nrate = \"100/s\"\n\
         [upstream.retry]\nbase_delay = \"10ms\"\nbudget = 100.0\n",
        mock.url()
    );
    let bin = Binary::start(&rest, "trace").await;
    let secret = |request: reqwest::RequestBuilder| {
        request
            .header("authorization", format!("Bearer {SECRET_BEARER}"))
            .header("proxy-authorization", format!("Basic {SECRET_PROXY}"))
            .header("x-api-key", SECRET_KEY)
    };

    // Reverse, meeting the scripted 429 and retried.
    let response = secret(client().get(bin.url("/api/echo/retried"))).send().await.unwrap();
    assert_eq!(
        (response.status().as_u16(), &response.headers()["x-pacegate-attempts"]),
        (200, &"2".parse().unwrap())
    );
    response.bytes().await.unwrap();
    // h2c to the proxy, with a body.
    let h2 = support::builder().http2_prior_knowledge().build().unwrap();
    let response = secret(h2.post(bin.url("/api/echo/h2"))).body(SECRET_BODY).send().await.unwrap();
    assert_eq!((response.status().as_u16(), response.version()), (200, reqwest::Version::HTTP_2));
    response.bytes().await.unwrap();
    // Forward mode.
    let forward = support::builder().proxy(reqwest::Proxy::http(bin.url("")).unwrap()).build().unwrap();
    let response = secret(forward.get("http://api.test/echo/forward")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // Errors pacegate makes itself: no route, bad request, unknown host.
    let response = secret(client().get(bin.url("/nowhere"))).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let response = secret(client().get(bin.url("/api/echo/bad")))
        .header("x-pacegate-max-wait", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = secret(forward.get("http://unknown.test/x")).send().await.unwrap();
    assert_eq!(response.status(), 403);

    // The credentials did go through pacegate: the upstream received them.
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 4, "429, its retry, h2c, forward");
    for arrival in &arrivals {
        assert_eq!(arrival.headers["authorization"], format!("Bearer {SECRET_BEARER}").as_str());
        assert_eq!(arrival.headers["x-api-key"], SECRET_KEY);
    }

    let lines = bin.terminate().await;
    let events = parse_json_lines(&lines);
    assert_eq!(with_message(&events, "retry").len(), 1, "trace logging works and saw the retry");
    assert!(lines.len() > 20, "trace is verbose: {} lines", lines.len());
    for secret in [SECRET_BEARER, SECRET_PROXY, SECRET_KEY, SECRET_BODY] {
        let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} leaked into the logs: {leaks:#?}");
    }
}

/// At `trace`, the config watcher's crate stays quiet: with the log file
/// in the config's directory, each line it traced for a change there was
/// a change there, and the log grew by itself without end. Reloads still
/// come: the watcher sees the other file's writes before the config's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_do_not_trace_the_config_directory() {
    let bin = Binary::start("", "trace").await;
    let dir = bin.config_path.parent().expect("the config's directory").to_owned();
    for line in 0..20 {
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("pacegate.log")).unwrap();
        std::io::Write::write_all(&mut log, format!("line {line}\n").as_bytes()).unwrap();
    }
    let config = std::fs::read_to_string(&bin.config_path).unwrap();
    std::fs::write(&bin.config_path, format!("{config}\n# touched\n")).unwrap();
    assert!(bin.wait_status(|s| s["generation"] == 2).await, "the edit was reloaded");

    let lines = bin.terminate().await;
    let watcher: Vec<&String> = lines.iter().filter(|l| l.contains("\"notify::")).collect();
    assert!(
        watcher.is_empty(),
        "{} lines from the watcher's crate: {:#?}",
        watcher.len(),
        &watcher[..3.min(watcher.len())]
    );
    assert!(lines.iter().any(|l| l.contains("\"level\":\"TRACE\"")), "trace logging is on");
}

/// "Restart to apply" is said of a reload whose listeners or workers
/// differ from those pacegate runs with, each time, and not of one that
/// brings back what it runs with: the comparison is with the start, not
/// with the last file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_warnings_compare_with_what_runs() {
    let bin = Binary::start("", "info").await;
    let running = std::fs::read_to_string(&bin.config_path).unwrap();
    let moved = running.replace("listen = \"127.0.0.1:0\"\nadmin", "listen = \"127.0.0.1:1\"\nadmin");
    assert_ne!(moved, running, "the proxy listener moved");
    for (generation, text) in [(2, moved.clone()), (3, format!("{moved}\n# edited\n")), (4, running.clone())]
    {
        std::fs::write(&bin.config_path, text).unwrap();
        assert!(bin.wait_status(|s| s["generation"] == generation).await, "reload {generation}");
    }
    let lines = bin.terminate().await;
    let events: String = parse_json_lines(&lines)
        .iter()
        .filter_map(|event| match event["message"].as_str()? {
            m if m.contains("restart pacegate to apply") => Some('W'),
            "config_reloaded" => Some('R'),
            _ => None,
        })
        .collect();
    assert_eq!(events, "WRWRR", "W: restart warning, R: reload");
}

// === answer headers ===

/// A request that waits for the next pacing slot reports that wait in
/// `x-pacegate-queued-ms`, consistent with when the upstream saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_answers_carry_attempts_and_queue_time() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let extra =
        "rate = \"4/s\"\nadaptive = false\n[upstream.retry]\njitter = \"none\"\nbase_delay = \"10ms\"\n";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    let c = client();
    let header = |response: &reqwest::Response, name: &str| -> u64 {
        let value = response.headers().get(name).unwrap_or_else(|| panic!("{name} missing"));
        value.to_str().unwrap().parse().unwrap_or_else(|_| panic!("{name} is a number: {value:?}"))
    };

    // The first request finds a free slot; the next one waits ~250 ms for its own.
    let first = c.get(pg.url("/api/first")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-pacegate-attempts"), 1);
    assert!(header(&first, "x-pacegate-queued-ms") < 100, "a free slot is not a wait");
    first.bytes().await.unwrap();

    let sent = tokio::time::Instant::now();
    let second = c.get(pg.url("/api/second")).send().await.unwrap();
    let elapsed = sent.elapsed();
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-pacegate-attempts"), 1);
    let queued = header(&second, "x-pacegate-queued-ms");
    let arrivals = mock.arrivals();
    let spacing = arrivals[1].at.duration_since(arrivals[0].at);
    assert!(spacing >= Duration::from_millis(240), "paced at 4/s: {spacing:?}");
    // From sending to reaching the upstream, nearly all the time was queueing.
    let to_upstream = arrivals[1].at.duration_since(sent).as_millis() as u64;
    assert!(queued >= 100, "queued {queued} ms for a 250 ms slot");
    assert!(queued <= to_upstream, "queued {queued} ms > {to_upstream} ms from send to upstream");
    assert!(queued + 60 >= to_upstream, "queued {queued} ms of {to_upstream} ms before the upstream");
    assert!(Duration::from_millis(queued) <= elapsed);
    second.bytes().await.unwrap();

    // A retried request counts both attempts.
    mock.set_behaviour(Behaviour::new().script([Scripted::status(503)]));
    let retried = c.get(pg.url("/api/retried")).send().await.unwrap();
    assert_eq!(retried.status(), 200);
    assert_eq!(header(&retried, "x-pacegate-attempts"), 2);
    assert!(header(&retried, "x-pacegate-queued-ms") <= 2000);
    pg.stop().await.unwrap();
}

/// The status line the admin listener answers `head` (a raw HTTP/1.1
/// request head) with.
async fn admin_status_line(admin: SocketAddr, head: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("admin listener");
    stream.write_all(head.as_bytes()).await.expect("send");
    let (mut line, mut reader) = (String::new(), BufReader::new(stream));
    let read = reader.read_line(&mut line);
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("an answer").expect("read");
    line.trim_end().to_owned()
}

/// A web page cannot drive the admin listener: not by posting to it from
/// another origin, nor by rebinding its own name to loopback.
#[tokio::test]
async fn the_admin_listener_refuses_requests_from_foreign_pages() {
    let pg = Pacegate::start("").await;
    let port = pg.admin.port();
    let ok = |host: &str, extra: &str| {
        format!("GET /status HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
        assert_eq!(admin_status_line(pg.admin, &ok(&host, "")).await, "HTTP/1.1 200 OK", "Host: {host}");
    }
    let same_origin = ok(&format!("127.0.0.1:{port}"), &format!("Origin: http://127.0.0.1:{port}\r\n"));
    assert_eq!(
        admin_status_line(pg.admin, &same_origin).await,
        "HTTP/1.1 200 OK",
        "the dashboard's own origin"
    );
    let rebound =
        ok(&format!("attacker.example:{port}"), &format!("Origin: http://attacker.example:{port}\r\n"));
    assert_eq!(admin_status_line(pg.admin, &rebound).await, "HTTP/1.1 403 Forbidden", "DNS rebinding");
    let cross = format!(
        "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://attacker.example\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(admin_status_line(pg.admin, &cross).await, "HTTP/1.1 403 Forbidden", "a cross-origin form");
    let reloads = pg.metric(r#"pacegate_config_reloads_total{result="ok"}"#).await;
    assert_eq!(reloads, Some(0.0), "the refused reload did not run");
}

/// `GET /status/history` as JSON.
async fn history(pg: &Pacegate) -> Value {
    let response = client().get(pg.admin_url("/status/history")).send().await.expect("history");
    assert_eq!(response.status(), 200);
    response.json().await.expect("history json")
}

#[tokio::test]
async fn status_history_has_samples_after_traffic() {
    let mock = MockUpstream::start(Behaviour::new().fail_first(1, 429)).await;
    let extra = "rate = \"100/s\"\n[upstream.retry]\nbase_delay = \"10ms\"";
    let pg = Pacegate::start(&upstream("api", &mock.url(), extra)).await;
    // The sampler takes a sample a second: the first one after the start
    // (bounded wait), so that the traffic falls into samples.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while history(&pg).await["upstreams"][0]["samples"].as_array().is_none_or(Vec::is_empty) {
        assert!(tokio::time::Instant::now() < deadline, "no sample within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        let response = client().get(pg.url("/api/x")).send().await.expect("request");
        assert_eq!(response.status(), 200);
    }
    // Bounded wait for the sample after the traffic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let api = loop {
        let history = history(&pg).await;
        assert_eq!(history["interval_ms"], 1000);
        let api = history["upstreams"][0].clone();
        if api["last_minute"]["requests"] == 3 || tokio::time::Instant::now() >= deadline {
            break api;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(api["name"], "api");
    assert_eq!(api["route"], "/api");
    let minute = &api["last_minute"];
    assert_eq!(minute["requests"], 3, "{api}");
    assert_eq!(minute["attempts"], 4, "{api}");
    assert_eq!(minute["rate_limited"], 1, "{api}");
    assert_eq!(minute["retries"], 1, "{api}");
    assert_eq!(minute["rejected"], serde_json::json!({ "queue_full": 0, "queue_timeout": 0 }));
    assert_eq!(minute["errors"], serde_json::json!({ "502": 0, "504": 0 }));
    assert!(minute["queue_wait_ms"]["p50"].is_number(), "{api}");
    assert!(minute["queue_wait_ms"]["p99"].is_number(), "{api}");
    let samples = api["samples"].as_array().expect("samples");
    let requests: u64 = samples.iter().map(|s| s["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 3, "the samples add up to the traffic: {api}");
    let times: Vec<u64> = samples.iter().map(|s| s["at_unix_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {times:?}");
}
