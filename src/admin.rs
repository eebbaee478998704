//! The admin listener: the dashboard at `/`, `/healthz`, `/metrics`,
//! `/status`, `/status/history`, `POST /reload`; and [`keep_history`], the
//! task that samples what `/status/history` serves.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::admission::breaker::State as BreakerState;
use crate::body::{self, ProxyBody};
use crate::error::RefusalReason;
use crate::history::{History, Totals};
use crate::metrics::{AttemptOutcome, CodeLabels, Metrics};
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::retry::RetryReason;
use crate::upstream::Upstream;

/// The live dashboard: one self-contained page polling `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the admin endpoints need, and nothing of the app that wires them.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Whose config generation `/status` and `/metrics` report.
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    /// What `POST /reload` runs, like the other reload triggers.
    reloader: Arc<Reloader>,
    /// Start of `uptime_seconds`.
    started: tokio::time::Instant,
    /// What `/status/history` serves, filled by [`keep_history`].
    history: Arc<Mutex<History>>,
}

impl Admin {
    pub fn new(
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        reloader: Arc<Reloader>,
        started: tokio::time::Instant,
    ) -> Self {
        Self { proxy, metrics, reloader, started, history: Arc::default() }
    }
}

/// How often [`keep_history`] samples.
const HISTORY_INTERVAL: Duration = Duration::from_secs(1);

/// Samples every upstream once a second into the history `/status/history`
/// serves, until `stop` resolves. Runs on the main runtime: it reads every
/// worker's counts, and belongs to none.
pub async fn keep_history(admin: Admin, stop: impl Future<Output = ()>) {
    let mut ticks = tokio::time::interval(HISTORY_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stop => return,
        }
        let runtime = admin.proxy.runtime.load();
        let readings: Vec<_> = runtime
            .upstreams
            .iter()
            .map(|u| (u.config.name.clone(), totals(&admin.metrics, u), u.dispatcher.status().depth as u64))
            .collect();
        let now = unix_ms(SystemTime::now());
        admin.history.lock().unwrap_or_else(PoisonError::into_inner).record(now, readings);
    }
}

/// An upstream's counters as the history reads them.
fn totals(metrics: &Metrics, upstream: &Upstream) -> Totals {
    let name = upstream.config.name.as_str();
    let attempt = |outcome| Metrics::read(&metrics.attempts, &Metrics::outcome(name, outcome));
    let rejected =
        |reason: RefusalReason| Metrics::read(&metrics.rejected, &Metrics::reason(name, reason.as_str()));
    let answered = |code: &str| {
        Metrics::read(&metrics.requests, &CodeLabels { upstream: name.into(), code: code.to_owned() })
    };
    Totals {
        requests: Metrics::read(&metrics.answered, &Metrics::upstream(name)),
        attempts: AttemptOutcome::ALL.into_iter().map(attempt).sum(),
        rate_limited: attempt(AttemptOutcome::RateLimited),
        retries: RetryReason::ALL
            .into_iter()
            .map(|reason| Metrics::read(&metrics.retries, &Metrics::reason(name, reason.as_str())))
            .sum(),
        queue_full: rejected(RefusalReason::QueueFull),
        queue_timeout: rejected(RefusalReason::QueueTimeout),
        bad_gateway: answered("502"),
        gateway_timeout: answered("504"),
        waits: upstream.metrics.queue_waits(),
    }
}

/// `/status/history`: per upstream its route and hosts, a sample a second
/// for the last five minutes, and the last minute's sums.
fn history(admin: &Admin) -> Value {
    let runtime = admin.proxy.runtime.load();
    let now = unix_ms(SystemTime::now());
    let history = admin.history.lock().unwrap_or_else(PoisonError::into_inner);
    let upstreams: Vec<Value> = runtime
        .upstreams
        .iter()
        .map(|u| {
            let config = &u.config;
            let mut value = history.upstream(&config.name, now).unwrap_or_else(|| json!({ "samples": [] }));
            value["name"] = json!(config.name);
            value["route"] = json!(config.route);
            value["hosts"] = json!(config.hosts);
            value
        })
        .collect();
    json!({ "interval_ms": HISTORY_INTERVAL.as_millis() as u64, "upstreams": upstreams })
}

/// Answers one admin request.
pub async fn handle(admin: Admin, request: Request<Incoming>) -> Response<ProxyBody> {
    let allow_remote = admin.proxy.runtime.load().config.server.admin_allow_remote;
    if let Some(reason) = from_a_foreign_page(&request, allow_remote) {
        return text(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", format!("{reason}\n"));
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => text(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD.into()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain; charset=utf-8", "ok".into()),
        (&Method::GET, "/metrics") => metrics(&admin, request.headers()),
        (&Method::GET, "/status") => json_answer(StatusCode::OK, &status(&admin)),
        (&Method::GET, "/status/history") => json_answer(StatusCode::OK, &history(&admin)),
        (&Method::POST, "/cache/purge") => purge(&admin, request.uri().query()),
        (&Method::POST, "/reload") => match admin.reloader.reload("admin").await {
            Ok(version) => json_answer(StatusCode::OK, &json!({ "version": version.to_string() })),
            Err(error) => json_answer(StatusCode::BAD_REQUEST, &json!({ "error": error.to_string() })),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n".into()),
    }
}

/// Why a request looks sent by a web page of another site, if it does.
///
/// A page can make a browser send requests to a loopback port: across
/// origins (a form posting to `/reload`), or, through DNS rebinding, under
/// its own name, which makes it same-origin and lets it read `/status`.
/// So a request whose `Origin` is not the admin's own is refused, and while
/// the listener is loopback-only (no `admin_allow_remote`) so is a `Host`
/// that is a name other than `localhost`: rebinding needs a name, and
/// loopback clients (curl, a local Prometheus, the dashboard) use
/// `127.0.0.1`, `[::1]` or `localhost`. Clients that send neither header
/// (curl, Prometheus) are not affected.
fn from_a_foreign_page(request: &Request<Incoming>, allow_remote: bool) -> Option<&'static str> {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
    let host = host.or_else(|| request.uri().authority().map(|a| a.to_string()));
    let authority = host.as_deref().and_then(|h| h.parse::<http::uri::Authority>().ok());
    if !allow_remote {
        let name = authority.as_ref().map(|a| a.host().trim_start_matches('[').trim_end_matches(']'));
        let loopback_name = name
            .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok() || n.eq_ignore_ascii_case("localhost"));
        if !loopback_name {
            return Some("the admin listener answers Host: an IP address or localhost");
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin_authority =
        origin.to_str().ok().and_then(|o| o.parse::<http::Uri>().ok()).and_then(|u| u.authority().cloned());
    match (origin_authority, authority) {
        (Some(origin), Some(host)) if origin.as_str().eq_ignore_ascii_case(host.as_str()) => None,
        _ => Some("cross-origin requests to the admin listener are refused"),
    }
}

/// Whether an `Accept` of the scrape names OpenMetrics (Prometheus's does).
fn asks_for_openmetrics(headers: &http::HeaderMap) -> bool {
    const OPENMETRICS: &[u8] = b"application/openmetrics-text";
    headers.get_all(header::ACCEPT).iter().any(|accept| {
        accept.as_bytes().windows(OPENMETRICS.len()).any(|type_| type_.eq_ignore_ascii_case(OPENMETRICS))
    })
}

/// `/metrics`, in the format the scraper asks for.
fn metrics(admin: &Admin, request_headers: &http::HeaderMap) -> Response<ProxyBody> {
    let runtime = admin.proxy.runtime.load();
    for upstream in &runtime.upstreams {
        let label = Metrics::upstream(&upstream.config.name);
        upstream.metrics.export_fixed();
        let state = upstream.dispatcher.status();
        admin.metrics.queue_depth.get_or_create(&label).set(state.depth as i64);
        admin.metrics.inflight.get_or_create(&label).set(state.in_flight as i64);
        admin.metrics.effective_rate.get_or_create(&label).set(state.effective_rate);
        match state.breaker {
            Some(breaker) => {
                admin.metrics.breaker_state.get_or_create(&label).set(breaker.state.gauge());
                // At 0 before the first opening, as every counter here.
                let _ = admin.metrics.breaker_opened.get_or_create(&label);
            }
            // A reload took the breaker away: no state to show.
            None => {
                admin.metrics.breaker_state.remove(&label);
            }
        }
    }
    // A reload that came meanwhile forgot the gauges of the upstreams it
    // removed: set again above from the generation before it, they go again.
    let now_in_force = admin.proxy.runtime.load();
    if !Arc::ptr_eq(&runtime, &now_in_force) {
        for upstream in runtime.upstreams.iter().filter(|u| !now_in_force.has_upstream(&u.config.name)) {
            admin.metrics.forget_gauges(&upstream.config.name);
        }
    }
    let exposition = admin.metrics.encode(runtime.config.redis.is_some());
    // Prometheus asks for OpenMetrics; curl and older agents get the
    // Prometheus text format, as exporters answer them.
    if asks_for_openmetrics(request_headers) {
        text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", exposition)
    } else {
        text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Metrics::prometheus_text(&exposition),
        )
    }
}

/// `/status`: per upstream its quotas, queue, in-flight, cooldown and counts.
fn status(admin: &Admin) -> Value {
    let runtime = admin.proxy.runtime.load();
    let upstreams: Vec<Value> =
        runtime.upstreams.iter().map(|u| upstream_status(&admin.metrics, u)).collect();
    json!({
        "version": runtime.version.to_string(),
        "generation": runtime.version.generation,
        "uptime_seconds": admin.started.elapsed().as_secs_f64(),
        // Shared quotas: where, and whether pacing uses them right now.
        "redis": runtime.store.as_ref().map(|store| json!({
            "form": store.form(),
            "address": store.address(),
            "master": store.master(),
            "up": store.is_up(),
            "on_error": format!("{:?}", store.on_error()).to_lowercase(),
        })),
        "upstreams": upstreams,
    })
}

fn upstream_status(metrics: &Metrics, upstream: &Upstream) -> Value {
    let config = &upstream.config;
    let name = config.name.as_str();
    let state = upstream.dispatcher.status();
    let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
    let cooldown = state.cooldown_until.map(|until| until.saturating_duration_since(now));
    let counts = |family, labels: &[&'static str]| -> Value {
        labels
            .iter()
            .map(|&l| (l.to_owned(), json!(Metrics::read(family, &Metrics::reason(name, l)))))
            .collect()
    };
    let attempts: Value = AttemptOutcome::ALL
        .into_iter()
        .map(|o| (o.as_str().to_owned(), json!(Metrics::read(&metrics.attempts, &Metrics::outcome(name, o)))))
        .collect();
    json!({
        "name": name,
        "quotas": config.rate.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "burst": config.burst.get(),
        "adaptive": config.adaptive,
        "effective_rate": state.effective_rate,
        "queue": { "depth": state.depth, "capacity": state.queue_size },
        // Counts only: partition and caller keys are never shown.
        "partitions": state.partitions,
        "callers": state.callers,
        "inflight": { "now": state.in_flight, "max": state.max_concurrency },
        "cooldown": cooldown.filter(|d| !d.is_zero()).map(|d| json!({
            "remaining_ms": d.as_millis() as u64,
            "until_unix_ms": unix_ms(wall + d),
        })),
        "requests": Metrics::read(&metrics.answered, &Metrics::upstream(name)),
        "unpaced_tunnels": upstream.metrics.unpaced_tunnels(),
        "attempts": attempts,
        "retries": counts(&metrics.retries, &RetryReason::ALL.map(RetryReason::as_str)),
        "rejections": counts(&metrics.rejected, &RefusalReason::ALL.map(RefusalReason::as_str)),
        "last_rate_limited": state.last_rate_limited.map(|(at, pause)| json!({
            "at_unix_ms": unix_ms(wall - now.saturating_duration_since(at)),
            "retry_after_ms": pause.map(|p| p.as_millis() as u64),
        })),
        "limits": config.limits.iter().zip(&state.limits).map(|(limit, state)| {
            let cooldown = state.cooldown_until.map(|until| until.saturating_duration_since(now));
            json!({
                "name": limit.name,
                "quotas": limit.rate.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "rate": state.rate,
                "effective_rate": state.effective_rate,
                "waiting": state.waiting,
                "cooldown": cooldown.filter(|d| !d.is_zero()).map(|d| json!({
                    "remaining_ms": d.as_millis() as u64,
                    "until_unix_ms": unix_ms(wall + d),
                })),
            })
        }).collect::<Vec<_>>(),
        "tokens": tokens_status(config, &state, (now, wall)),
        "breaker": state.breaker.map(|b| json!({
            "state": b.state.as_str(),
            "failures": b.failures,
            "attempts": b.attempts,
            "opened": Metrics::read(&metrics.breaker_opened, &Metrics::upstream(name)),
            "half_open_in_ms": match b.state {
                BreakerState::Open { until } => Some(until.saturating_duration_since(now).as_millis() as u64),
                _ => None,
            },
        })),
        "cache": upstream.cache.as_ref().map(|cache| cache.status()),
    })
}

/// `POST /cache/purge[?upstream=NAME]`: empties the caches, or one
/// upstream's; says how many entries each held.
fn purge(admin: &Admin, query: Option<&str>) -> Response<ProxyBody> {
    let runtime = admin.proxy.runtime.load();
    let wanted = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| pair.strip_prefix("upstream="));
    let chosen: Vec<_> =
        runtime.upstreams.iter().filter(|u| wanted.is_none_or(|name| u.config.name == name)).collect();
    if let Some(name) = wanted
        && chosen.is_empty()
    {
        return json_answer(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no upstream named {name:?}") }),
        );
    }
    let purged: serde_json::Map<String, Value> = chosen
        .iter()
        .filter_map(|u| Some((u.config.name.clone(), json!(u.cache.as_ref()?.purge()))))
        .collect();
    tracing::info!(upstreams = purged.len(), "cache_purged");
    json_answer(StatusCode::OK, &json!({ "purged": purged }))
}

/// An upstream's token quotas: what each allows a minute against what was
/// sent (settled) in the last one, what attempts in flight reserved, and the
/// calibration of input estimates. `null` without token quotas.
fn tokens_status(
    config: &crate::config::Upstream,
    state: &crate::admission::Status,
    (now, wall): (tokio::time::Instant, SystemTime),
) -> Value {
    let (Some(tokens), Some(book)) = (&config.tokens, state.tokens) else { return Value::Null };
    // Token quotas come after the endpoint limits in the admission state.
    let states = state.limits.iter().skip(config.limits.len());
    let quotas: Vec<Value> = (tokens.quotas.iter().zip(states))
        .map(|((kind, rate), state)| {
            let per_minute = rate.iter().map(|r| r.per_second() * 60.0).fold(f64::INFINITY, f64::min);
            let cooldown = state.cooldown_until.map(|until| until.saturating_duration_since(now));
            json!({
                "name": kind.name(),
                "quotas": rate.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "per_minute": per_minute.round() as u64,
                "cooldown": cooldown.filter(|d| !d.is_zero()).map(|d| json!({
                    "remaining_ms": d.as_millis() as u64,
                    "until_unix_ms": unix_ms(wall + d),
                })),
            })
        })
        .collect();
    json!({
        "quotas": quotas,
        "sent_last_minute": book.sent_last_minute,
        "reserved_in_flight": book.reserved_in_flight,
        "calibration": { "ratio": book.calibration, "samples": book.calibration_samples },
        "default_max_tokens": tokens.default_max_tokens,
        "accounting": match tokens.accounting {
            crate::config::TokenAccounting::Usage => "usage",
            crate::config::TokenAccounting::Reserved => "reserved",
        },
    })
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

fn json_answer(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    text(status, "application/json", value.to_string())
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
