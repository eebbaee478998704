//! A scriptable mock upstream shared by pacegate's tests and benchmarks.
//!
//! [`MockUpstream`] serves HTTP/1.1 and cleartext HTTP/2 (h2c, detected from
//! the connection preface) on a loopback listener and records every request
//! that reaches it as an [`Arrival`]. Tests then ask what the upstream saw:
//! how many requests, when, with which headers, and what it answered.
//!
//! This file depends only on tokio, hyper, hyper-util, http, http-body-util,
//! bytes, futures-util, httpdate and serde_json, never on the pacegate library,
//! because `examples/mock_upstream.rs` compiles it in via `#[path]` too.
//!
//! # How a request is answered
//! The decision is taken the moment the request head arrives, under one lock,
//! so arrival order, `x-mock-seq` and the limiter agree. The first rule that
//! applies wins:
//! 1. the next [`Scripted`] step, if the script is not empty;
//! 2. `fail_first` / `fail_for`, while they last;
//! 3. `limit`: a strict sliding window over accepted requests answers 429
//!    with `Retry-After` once `n` were accepted within `window`; each
//!    [`Resource`] (a named limit on some methods, each request costing
//!    units) likewise, adding `x-ratelimit-resource: <name>` as GitHub does.
//!    A request refused by one window counts in none. `bucket` is OpenAI's
//!    kind of request quota instead: it refills continuously, and every
//!    answer says so in `x-ratelimit-{limit,remaining,reset}-requests`;
//! 4. the path: `/echo…` answers 200 JSON `{"method","path","query",
//!    "headers","body_len"}`; `/sse?n=5&interval_ms=50` streams `n` events
//!    `data: i\n\n` `interval_ms` apart; `/status/NNN` answers NNN;
//!    `/bytes?n=N` answers N bytes; `/cached…` answers a cacheable body
//!    `{"seq":N}` (its arrival index, padded with spaces to `size` bytes)
//!    with `Cache-Control: max-age=<max_age>` (`private, ` before it with
//!    `private=1`; `no-store` instead with `no_store=1`), `ETag: "<etag>"`
//!    (and 304, no body, to an `If-None-Match` naming it, with `max-age=
//!    <max_age_304>` and, with `cookie_on_304=1`, a `Set-Cookie` when
//!    given), `Vary: <vary>` and, with `cookie=1`, a `Set-Cookie`; anything
//!    else answers 200, empty.
//!
//! Only requests that pass step 3 count as accepted; special paths do pass
//! through steps 1-3, so a limited mock limits `/echo` too. The request body
//! is then read (counted, not buffered), `latency` is slept, and the answer
//! goes out carrying `x-mock-seq: <arrival index>` (plus the `X-RateLimit-*`
//! headers if enabled). [`Arrival::status`] is 0 for requests that get no
//! response head (`Reset`, `Stall`, `Garbage`). Echo's `query` is `null`
//! without a `?`. With [`Behaviour::never_read`], connections are accepted
//! (and counted by [`MockUpstream::connections`]) but never read from, so no
//! request arrives at all.
//!
//! # Time and shutdown
//! Times are `tokio::time::Instant`s, so under `tokio::time::pause()` windows,
//! latency and SSE intervals follow the paused clock (beware that auto-advance
//! may also fire client timeouts while real sockets are busy). `shutdown` and
//! drop are abrupt, not graceful: open connections are closed and in-flight
//! requests (stalled ones included) lose their answer.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Upper bounds on `/sse` parameters, so a typo cannot pin a connection for hours.
const MAX_SSE_EVENTS: u64 = 100_000;
const MAX_SSE_INTERVAL_MS: u64 = 60_000;
/// Upper bound on a `/cached` body.
const MAX_CACHED_BYTES: u64 = 16 << 20;

/// What [`Scripted::Garbage`] sends instead of a response.
pub const GARBAGE: &[u8] = b"this is not HTTP at all\r\n\r\n";

/// One request that reached the mock, in arrival order.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// When the request head was received, before the body and any latency.
    pub at: Instant,
    pub method: String,
    pub path_and_query: String,
    /// Lets tests check whether the proxy spoke HTTP/1.1 or h2c upstream.
    pub version: Version,
    pub headers: HeaderMap,
    /// Bytes of request body; final once the response has been sent.
    pub body_len: usize,
    /// Status answered, decided on arrival; 0 when no response head is sent.
    pub status: u16,
}

/// What the mock does; `Behaviour::default()` answers 200 immediately.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// `(n, window)`: at most `n` accepted requests in any sliding `window`.
    limit: Option<(usize, Duration)>,
    /// `(n, status)`: the first `n` unscripted requests get `status`.
    fail_first: Option<(usize, u16)>,
    /// `(duration, status)`: unscripted requests get `status` for this long.
    fail_for: Option<(Duration, u16)>,
    /// Steps consumed one per request before any other rule.
    script: VecDeque<Scripted>,
    /// Delay before every answer, to model a slow upstream.
    latency: Duration,
    /// `(limit, window)` of a GitHub-style fixed-window counter reported in headers.
    rate_limit_headers: Option<(u64, Duration)>,
    /// Accept connections but never read from them (an upstream that hangs).
    never_read: bool,
    /// Named limits on some requests, checked after `limit`.
    resources: Vec<Resource>,
    /// `(limit, window)` of an OpenAI-style request quota: a bucket of
    /// `limit` requests refilled at `limit / window`.
    bucket: Option<(u64, Duration)>,
}

/// A named limit over some requests, as APIs with several limits have
/// (GitHub's points, where a write costs 5; its content-creation limit):
/// a strict sliding window of `units` per `window`. Refused requests get
/// 429, `Retry-After` and `x-ratelimit-resource: <name>`.
#[derive(Clone, Debug)]
pub struct Resource {
    name: String,
    /// Methods it counts, upper case; empty: every method.
    methods: Vec<String>,
    units: u64,
    window: Duration,
    /// Units a request of this method takes; 1 for other methods.
    costs: Vec<(String, u64)>,
}

/// One scripted reaction, consumed by exactly one request.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Answer `status` with these headers (they replace computed ones of the
    /// same name; invalid names or values are skipped) and an empty body.
    Status { status: u16, headers: Vec<(String, String)> },
    /// No response: HTTP/1.1 closes the connection, HTTP/2 resets the stream.
    Reset,
    /// No response until the mock shuts down, then as `Reset`.
    Stall,
    /// A 200 head promising 10 bytes, 5 bytes of body, then an abort.
    Truncated,
    /// [`GARBAGE`] instead of a response, then the connection closes
    /// (HTTP/1.1; on h2 it breaks the whole connection).
    Garbage,
}

/// A running mock; dropping it stops it as `shutdown` does, without waiting.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Set to `true` to stop the accept loop and release stalled requests.
    shutdown: watch::Sender<bool>,
    /// The accept loop; it owns every connection task, so ending it ends them.
    server: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Number of arrivals recorded, so waiters wake on change instead of polling.
    arrived: watch::Sender<usize>,
    /// TCP connections accepted so far.
    connections: AtomicUsize,
}

struct State {
    arrivals: Vec<Arrival>,
    /// Arrivals dropped by `forget_arrivals`, all before `arrivals[0]`.
    forgotten: usize,
    /// The current behaviour; its script is consumed in place.
    behaviour: Behaviour,
    /// When `behaviour` was applied: origin of `fail_for` and of the fixed window.
    since: Instant,
    /// `since` on the wall clock, to express `X-RateLimit-Reset` as epoch seconds.
    since_wall: SystemTime,
    /// How many requests `fail_first` has failed so far.
    failed: usize,
    /// Accept times still inside the limit window, oldest first.
    accepted: VecDeque<Instant>,
    /// Per resource (as in `behaviour.resources`): `(accept time, units)`
    /// still inside its window, oldest first.
    spent: Vec<VecDeque<(Instant, u64)>>,
    /// `(window index, requests counted)` for `rate_limit_headers`.
    fixed_window: (u64, u64),
    /// When `bucket` is full again (GCRA's theoretical arrival time).
    bucket_full_at: Instant,
}

/// The answer chosen on arrival; the body is produced after latency.
enum Plan {
    Answer { status: StatusCode, headers: HeaderMap, body: Kind },
    Reset,
    Stall,
    Truncated,
    Garbage,
}

enum Kind {
    Empty,
    Echo,
    Sse {
        n: u64,
        interval: Duration,
    },
    Bytes(u64),
    /// `/cached`: `{"seq":N}` padded to this many bytes.
    Cached(u64),
}

// === impl Behaviour ===

impl Behaviour {
    pub fn new() -> Self {
        Self::default()
    }

    /// Strict sliding-window limiter: 429 + `Retry-After` once `n` requests
    /// were accepted in the last `window`; a 429 does not count as accepted.
    /// `Retry-After` is whole seconds until the oldest accepted request leaves
    /// the window, rounded up, at least 1.
    pub fn limit(mut self, n: usize, window: Duration) -> Self {
        assert!(n > 0 && !window.is_zero(), "limit needs n > 0 and a window");
        self.limit = Some((n, window));
        self
    }

    /// Answer `status` to the first `n` requests that the script leaves alone.
    pub fn fail_first(mut self, n: usize, status: u16) -> Self {
        self.fail_first = Some((n, status));
        self
    }

    /// Answer `status` for `duration` after this behaviour is applied.
    pub fn fail_for(mut self, duration: Duration, status: u16) -> Self {
        self.fail_for = Some((duration, status));
        self
    }

    /// Append steps to the script, consumed one per request before other rules.
    pub fn script(mut self, steps: impl IntoIterator<Item = Scripted>) -> Self {
        self.script.extend(steps);
        self
    }

    /// Script one 429 carrying this `Retry-After` value (seconds or HTTP date).
    pub fn respond_429_once(self, retry_after: &str) -> Self {
        self.script([Scripted::status_with(429, &[("retry-after", retry_after)])])
    }

    /// Sleep this long before every answer (after the arrival is recorded).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Accept connections but never read from them or answer; each is held
    /// open until the mock shuts down.
    pub fn never_read(mut self) -> Self {
        self.never_read = true;
        self
    }

    /// Add a named limit (see [`Resource`]), checked after `limit`.
    pub fn resource(mut self, resource: Resource) -> Self {
        self.resources.push(resource);
        self
    }

    /// An OpenAI-style request quota, checked after `limit`: a bucket of
    /// `limit` requests refilled continuously at `limit / window`. A request
    /// takes one request's worth or gets 429 with `retry-after-ms` (and
    /// `Retry-After`, whole seconds, at least 1) until one is back. Every
    /// answer carries `x-ratelimit-limit-requests`, `-remaining-requests`
    /// (whole requests left) and `-reset-requests` (the time until the
    /// bucket is full, in milliseconds rounded up, as OpenAI documents it).
    pub fn bucket(mut self, limit: u64, window: Duration) -> Self {
        assert!(limit > 0 && !window.is_zero(), "bucket needs a limit and a window");
        self.bucket = Some((limit, window));
        self
    }

    /// Add `X-RateLimit-Limit/-Remaining/-Reset` from a fixed-window counter of
    /// every arrival; headers only, combine with `limit` to enforce.
    pub fn rate_limit_headers(mut self, limit: u64, window: Duration) -> Self {
        assert!(!window.is_zero(), "rate_limit_headers needs a window");
        self.rate_limit_headers = Some((limit, window));
        self
    }
}

// === impl Resource ===

impl Resource {
    /// At most `units` per sliding `window` over every method, each costing 1.
    pub fn new(name: &str, units: u64, window: Duration) -> Self {
        assert!(units > 0 && !window.is_zero(), "a resource needs units > 0 and a window");
        Self { name: name.into(), methods: Vec::new(), units, window, costs: Vec::new() }
    }

    /// Count only these methods.
    pub fn methods(mut self, methods: &[&str]) -> Self {
        self.methods = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        self
    }

    /// A request of `method` takes `units`.
    pub fn cost(mut self, method: &str, units: u64) -> Self {
        assert!(units > 0, "a cost is at least one unit");
        self.costs.push((method.to_ascii_uppercase(), units));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Units a request of `method` takes, or `None` when not counted.
    fn cost_of(&self, method: &str) -> Option<u64> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return None;
        }
        Some(self.costs.iter().find(|(m, _)| m == method).map_or(1, |(_, units)| *units))
    }
}

// === impl Scripted ===

impl Scripted {
    /// Answer `status` with no extra headers.
    pub fn status(status: u16) -> Self {
        Self::status_with(status, &[])
    }

    /// Answer `status` with these extra headers.
    pub fn status_with(status: u16, headers: &[(&str, &str)]) -> Self {
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        Scripted::Status { status, headers }
    }
}

// === impl MockUpstream ===

impl MockUpstream {
    /// Start on `127.0.0.1:0`.
    pub async fn start(behaviour: Behaviour) -> MockUpstream {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.expect("binding 127.0.0.1:0 for the mock upstream");
        Self::start_on(listener, behaviour).await
    }

    /// Start on a listener the caller bound (e.g. to reuse a known port).
    pub async fn start_on(listener: TcpListener, behaviour: Behaviour) -> MockUpstream {
        let addr = listener.local_addr().expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(behaviour)),
            arrived: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
        });
        let (shutdown, stop) = watch::channel(false);
        let server = tokio::spawn(serve(listener, shared.clone(), stop));
        MockUpstream { addr, shared, shutdown, server: Some(server) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request that reached the mock so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.lock().arrivals.clone()
    }

    /// Requests arrived so far, forgotten ones included.
    pub fn count(&self) -> usize {
        let state = self.shared.lock();
        state.forgotten + state.arrivals.len()
    }

    /// Drops the arrivals recorded so far (they still count in `count`), so a
    /// long run does not grow the mock's memory.
    pub fn forget_arrivals(&self) {
        let mut state = self.shared.lock();
        state.forgotten += state.arrivals.len();
        state.arrivals = Vec::new();
    }

    /// TCP connections accepted so far (including `never_read` ones).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// How many arrivals were (or are being) answered with `status`
    /// (forgotten ones not included).
    pub fn count_status(&self, status: u16) -> usize {
        let state = self.shared.lock();
        state.arrivals.iter().filter(|a| a.status == status).count()
    }

    /// Wait until at least `n` requests arrived; `false` if `timeout` passed first.
    /// Wakes on each arrival (a watch channel), never polls. An arrival's status
    /// is already set then, but its `body_len` may not be yet.
    pub async fn wait_for_arrivals(&self, n: usize, timeout: Duration) -> bool {
        let mut arrived = self.shared.arrived.subscribe();
        let reached = tokio::time::timeout(timeout, arrived.wait_for(|count| *count >= n));
        matches!(reached.await, Ok(Ok(_)))
    }

    /// Replace the behaviour; its script, counters, limiter and windows restart now.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        let mut state = self.shared.lock();
        let (arrivals, forgotten) = (std::mem::take(&mut state.arrivals), state.forgotten);
        *state = State::new(behaviour);
        (state.arrivals, state.forgotten) = (arrivals, forgotten);
    }

    /// Most arrivals (any status) within any sliding `window`.
    pub fn max_in_window(&self, window: Duration) -> usize {
        let state = self.shared.lock();
        let times: Vec<Instant> = state.arrivals.iter().map(|a| a.at).collect();
        max_in_any_window(&times, window)
    }

    /// Stop accepting, close every connection and wait for the server task.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Most of the sorted `times` that fit in a window: two `times` share a
/// window when they are less than `window` apart, as in the mock's limiter.
pub fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, &t) in times.iter().enumerate() {
        while t.duration_since(times[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

// === impl Shared / State ===

impl Shared {
    /// A panicking test must not poison the mock for the assertions after it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn new(behaviour: Behaviour) -> Self {
        State {
            arrivals: Vec::new(),
            forgotten: 0,
            since: Instant::now(),
            since_wall: SystemTime::now(),
            failed: 0,
            accepted: VecDeque::new(),
            spent: vec![VecDeque::new(); behaviour.resources.len()],
            fixed_window: (0, 0),
            bucket_full_at: Instant::now(),
            behaviour,
        }
    }

    /// Choose the answer for a request arriving `now` (see the module doc).
    fn decide(&mut self, now: Instant, method: &str, uri: &Uri, request: &HeaderMap) -> Plan {
        let mut headers = self.rate_limit_headers(now);
        if let Some(step) = self.behaviour.script.pop_front() {
            return match step {
                Scripted::Status { status, headers: extra } => {
                    for (name, value) in extra {
                        if let (Ok(n), Ok(v)) = (name.parse::<HeaderName>(), value.parse()) {
                            headers.insert(n, v);
                        }
                    }
                    answer(status, headers, Kind::Empty)
                }
                Scripted::Reset => Plan::Reset,
                Scripted::Stall => Plan::Stall,
                Scripted::Truncated => Plan::Truncated,
                Scripted::Garbage => Plan::Garbage,
            };
        }
        if let Some((n, status)) = self.behaviour.fail_first
            && self.failed < n
        {
            self.failed += 1;
            return answer(status, headers, Kind::Empty);
        }
        if let Some((duration, status)) = self.behaviour.fail_for
            && now.duration_since(self.since) < duration
        {
            return answer(status, headers, Kind::Empty);
        }
        // Every window admits the request before any counts it.
        if let Some((wait, resource)) = self.refusal(now, method) {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
            if self.behaviour.bucket.is_some() {
                headers.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64 + 1));
                self.bucket_headers(now, &mut headers);
            }
            if let Some(name) = resource.and_then(|name| HeaderValue::from_str(&name).ok()) {
                headers.insert("x-ratelimit-resource", name);
            }
            return answer(429, headers, Kind::Empty);
        }
        if self.behaviour.limit.is_some() {
            self.accepted.push_back(now);
        }
        if let Some((limit, window)) = self.behaviour.bucket {
            self.bucket_full_at = self.bucket_full_at.max(now) + window / limit as u32;
            self.bucket_headers(now, &mut headers);
        }
        for (resource, spent) in self.behaviour.resources.iter().zip(&mut self.spent) {
            if let Some(units) = resource.cost_of(method) {
                spent.push_back((now, units));
            }
        }
        let (status, body) = route(uri, request, &mut headers);
        answer(status, headers, body)
    }

    /// Why a request of `method` arriving `now` is refused, if it is: how
    /// long until the window that refuses it has room, and the resource's
    /// name (`None`: `limit`). Expired entries are dropped on the way.
    fn refusal(&mut self, now: Instant, method: &str) -> Option<(Duration, Option<String>)> {
        if let Some((n, window)) = self.behaviour.limit {
            while self.accepted.front().is_some_and(|t| now.duration_since(*t) >= window) {
                self.accepted.pop_front();
            }
            if let Some(&oldest) = self.accepted.front()
                && self.accepted.len() >= n
            {
                return Some(((oldest + window).duration_since(now), None));
            }
        }
        if let Some((limit, window)) = self.behaviour.bucket {
            let per_request = window / limit as u32;
            let owed = self.bucket_full_at.saturating_duration_since(now);
            if owed + per_request > window {
                return Some((owed + per_request - window, None));
            }
        }
        for (resource, spent) in self.behaviour.resources.iter().zip(&mut self.spent) {
            let Some(cost) = resource.cost_of(method) else { continue };
            while spent.front().is_some_and(|(t, _)| now.duration_since(*t) >= resource.window) {
                spent.pop_front();
            }
            let mut used: u64 = spent.iter().map(|(_, units)| units).sum();
            if used + cost <= resource.units {
                continue;
            }
            // Room comes when enough of the oldest units leave the window
            // (never, for a cost above the whole count: say one window).
            let mut wait = resource.window;
            for (at, units) in spent.iter() {
                used -= units;
                if used + cost <= resource.units {
                    wait = (*at + resource.window).duration_since(now);
                    break;
                }
            }
            return Some((wait, Some(resource.name.clone())));
        }
        None
    }

    /// The bucket's state at `now`, OpenAI-style.
    fn bucket_headers(&self, now: Instant, headers: &mut HeaderMap) {
        let Some((limit, window)) = self.behaviour.bucket else { return };
        let owed = self.bucket_full_at.saturating_duration_since(now);
        let per_request = window / limit as u32;
        let remaining = (window - owed.min(window)).as_nanos() / per_request.as_nanos();
        let reset_ms = owed.as_nanos().div_ceil(1_000_000);
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from(remaining as u64));
        let reset =
            HeaderValue::from_str(&format!("{reset_ms}ms")).expect("digits and `ms` are a header value");
        headers.insert("x-ratelimit-reset-requests", reset);
    }

    /// Count this arrival in the fixed window and report it GitHub-style.
    fn rate_limit_headers(&mut self, now: Instant) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let Some((limit, window)) = self.behaviour.rate_limit_headers else {
            return headers;
        };
        let index = (now.duration_since(self.since).as_nanos() / window.as_nanos()) as u64;
        if self.fixed_window.0 != index {
            self.fixed_window = (index, 0);
        }
        self.fixed_window.1 += 1;
        let window_end = window.as_nanos() * u128::from(index + 1);
        let reset = self.since_wall + Duration::from_nanos(window_end as u64);
        let reset = reset.duration_since(UNIX_EPOCH).unwrap_or_default();
        let reset_secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let remaining = limit.saturating_sub(self.fixed_window.1);
        headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset_secs));
        headers
    }
}

/// A final answer; a status that cannot be one (not 200..=599) becomes 500.
fn answer(status: u16, headers: HeaderMap, body: Kind) -> Plan {
    let status = match StatusCode::from_u16(status) {
        Ok(status) if (200..=599).contains(&status.as_u16()) => status,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Plan::Answer { status, headers, body }
}

/// The special paths; malformed parameters answer 400. `/cached` adds its
/// caching headers to `headers`.
fn route(uri: &Uri, request: &HeaderMap, headers: &mut HeaderMap) -> (u16, Kind) {
    let path = uri.path();
    let param = |name: &str| {
        let query = uri.query().unwrap_or("");
        let mut pairs = query.split('&').filter_map(|p| p.split_once('='));
        pairs.find(|(k, _)| *k == name).map(|(_, v)| v.parse::<u64>())
    };
    if path.starts_with("/echo") {
        (200, Kind::Echo)
    } else if path == "/sse" {
        match (param("n").unwrap_or(Ok(5)), param("interval_ms").unwrap_or(Ok(50))) {
            (Ok(n), Ok(ms)) if n <= MAX_SSE_EVENTS && ms <= MAX_SSE_INTERVAL_MS => {
                let interval = Duration::from_millis(ms);
                (200, Kind::Sse { n, interval })
            }
            _ => (400, Kind::Empty),
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code @ 200..=599) => (code, Kind::Empty),
            _ => (400, Kind::Empty),
        }
    } else if path == "/bytes" {
        match param("n") {
            Some(Ok(n)) => (200, Kind::Bytes(n)),
            _ => (400, Kind::Empty),
        }
    } else if path.starts_with("/cached") {
        cached(uri, request, headers)
    } else {
        (200, Kind::Empty)
    }
}

/// `/cached`: see the module doc.
fn cached(uri: &Uri, request: &HeaderMap, headers: &mut HeaderMap) -> (u16, Kind) {
    let query = uri.query().unwrap_or("");
    let text = |name: &str| {
        let mut pairs = query.split('&').filter_map(|p| p.split_once('='));
        pairs.find(|(k, _)| *k == name).map(|(_, v)| v.to_owned())
    };
    let flag = |name: &str| text(name).as_deref() == Some("1");
    let (Ok(max_age), Ok(size)) = (
        text("max_age").unwrap_or_default().parse::<u64>(),
        text("size").map_or(Ok(0), |s| s.parse::<u64>()),
    ) else {
        return (400, Kind::Empty);
    };
    let cache_control = match (flag("no_store"), flag("private")) {
        (true, _) => "no-store".to_owned(),
        (false, true) => format!("private, max-age={max_age}"),
        (false, false) => format!("max-age={max_age}"),
    };
    let mut add = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    add("cache-control", cache_control);
    add("date", httpdate::fmt_http_date(SystemTime::now()));
    if let Some(vary) = text("vary") {
        add("vary", vary);
    }
    if flag("cookie") {
        add("set-cookie", "session=1".to_owned());
    }
    if let Some(etag) = text("etag") {
        let tag = format!("\"{etag}\"");
        let matched =
            request.get_all("if-none-match").iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains(&tag));
        add("etag", tag);
        if matched {
            // What a 304 may say that its 200 did not.
            if let Some(max_age) = text("max_age_304") {
                add("cache-control", format!("max-age={max_age}"));
            }
            if flag("cookie_on_304") {
                add("set-cookie", "session=from-the-304".to_owned());
            }
            return (304, Kind::Empty);
        }
    }
    (200, Kind::Cached(size.min(MAX_CACHED_BYTES)))
}

// === serving ===

/// Accept loop: one task per connection, all owned here so ending this ends them.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let stop_for_requests = stop.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            // Reap finished connections so a long benchmark does not accumulate them.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Transient (e.g. out of descriptors): back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let mut stop = stop_for_requests.clone();
                if shared.lock().behaviour.never_read {
                    connections.spawn(async move {
                        stopped(&mut stop).await;
                        drop(stream);
                    });
                    continue;
                }
                // Events and small answers must leave at once, not after Nagle's delay.
                let _ = stream.set_nodelay(true);
                let garbage = Arc::new(AtomicBool::new(false));
                let io = Hijackable { stream, garbage: garbage.clone(), sent: 0 };
                let shared = shared.clone();
                let service = service_fn(move |req| handle(shared.clone(), stop.clone(), garbage.clone(), req));
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(io), service).await;
                });
            }
        }
    }
    connections.shutdown().await;
}

/// Resolves once shutdown is signalled (or the mock is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it before returning.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Record the arrival, read the body, wait out the latency, then answer;
/// `garbage` is set to make the connection send [`GARBAGE`] instead.
async fn handle(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    garbage: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let (parts, body) = req.into_parts();
    let (seq, plan, latency) = {
        let mut state = shared.lock();
        // Taken under the lock so arrival times are sorted like the arrivals.
        let now = Instant::now();
        let plan = state.decide(now, parts.method.as_str(), &parts.uri, &parts.headers);
        let status = match &plan {
            Plan::Answer { status, .. } => status.as_u16(),
            Plan::Truncated => 200,
            Plan::Reset | Plan::Stall | Plan::Garbage => 0,
        };
        let seq = state.forgotten + state.arrivals.len();
        state.arrivals.push(Arrival {
            at: now,
            method: parts.method.to_string(),
            path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()).into(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_len: 0,
            status,
        });
        shared.arrived.send_replace(seq + 1);
        (seq, plan, state.behaviour.latency)
    };

    let body_len = count_body(body).await?;
    {
        let mut state = shared.lock();
        if let Some(arrival) = seq.checked_sub(state.forgotten).and_then(|i| state.arrivals.get_mut(i)) {
            arrival.body_len = body_len;
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let (status, mut headers, kind) = match plan {
        Plan::Answer { status, headers, body } => (status, headers, body),
        Plan::Reset => return Err("scripted reset".into()),
        Plan::Stall => {
            stopped(&mut stop).await;
            return Err("stalled request released by shutdown".into());
        }
        Plan::Truncated => return Ok(truncated(seq)),
        Plan::Garbage => {
            // Whatever hyper writes for this answer becomes the garbage.
            garbage.store(true, Ordering::Relaxed);
            return Ok(Response::new(Empty::new().map_err(Into::into).boxed()));
        }
    };
    headers.insert("x-mock-seq", HeaderValue::from(seq));
    let body = match kind {
        Kind::Empty => Empty::new().map_err(Into::into).boxed(),
        Kind::Echo => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let echo = echo_json(&parts, body_len).to_string();
            Full::new(Bytes::from(echo)).map_err(Into::into).boxed()
        }
        Kind::Sse { n, interval } => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert("cache-control", HeaderValue::from_static("no-cache"));
            sse_body(n, interval)
        }
        Kind::Bytes(n) => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            bytes_body(n)
        }
        Kind::Cached(size) => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let mut body = format!("{{\"seq\":{seq}}}");
            let padding = (size as usize).saturating_sub(body.len());
            body.extend(std::iter::repeat_n(' ', padding));
            Full::new(Bytes::from(body)).map_err(Into::into).boxed()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Count body bytes without buffering them, so upload size needs no bound.
async fn count_body(mut body: Incoming) -> Result<usize, hyper::Error> {
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len();
        }
    }
    Ok(len)
}

fn echo_json(parts: &http::request::Parts, body_len: usize) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<String> = (parts.headers.get_all(name).iter())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.to_string(), values.join(", ").into());
    }
    serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body_len,
    })
}

/// `n` events, the first at once and the rest `interval` apart, one frame each
/// so hyper flushes every event on its own.
fn sse_body(n: u64, interval: Duration) -> Body {
    let events = stream::unfold(0, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let event = Frame::data(Bytes::from(format!("data: {i}\n\n")));
        Some((Ok::<_, BoxError>(event), i + 1))
    });
    BodyExt::boxed(StreamBody::new(events))
}

/// `n` bytes of `x` streamed from one static chunk, so size needs no bound.
fn bytes_body(n: u64) -> Body {
    static CHUNK: [u8; 16 * 1024] = [b'x'; 16 * 1024];
    let chunks = stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let take = left.min(CHUNK.len() as u64);
        let chunk = Frame::data(Bytes::from_static(&CHUNK[..take as usize]));
        Some((Ok::<_, BoxError>(chunk), left - take))
    });
    BodyExt::boxed(StreamBody::new(chunks))
}

/// A 200 promising 10 bytes that fails after 5: the upstream dies mid-body.
fn truncated(seq: usize) -> Response<Body> {
    let frames = stream::unfold(true, |first| async move {
        if first {
            let data = Frame::data(Bytes::from_static(b"trunc"));
            return Some((Ok::<_, BoxError>(data), false));
        }
        // Pending once so hyper flushes head and data before the abort drops them.
        tokio::task::yield_now().await;
        Some((Err("scripted truncation".into()), false))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(10));
    headers.insert("x-mock-seq", HeaderValue::from(seq));
    response
}

/// A connection's socket that sends [`GARBAGE`] instead of what hyper writes
/// once `garbage` is set, then fails every write so hyper closes it.
struct Hijackable {
    stream: TcpStream,
    garbage: Arc<AtomicBool>,
    /// Bytes of [`GARBAGE`] written so far.
    sent: usize,
}

impl AsyncRead for Hijackable {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Hijackable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.garbage.load(Ordering::Relaxed) {
            return Pin::new(&mut this.stream).poll_write(cx, buf);
        }
        while this.sent < GARBAGE.len() {
            let n = ready!(Pin::new(&mut this.stream).poll_write(cx, &GARBAGE[this.sent..]))?;
            if n == 0 {
                break;
            }
            this.sent += n;
        }
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
