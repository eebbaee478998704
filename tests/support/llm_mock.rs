//! A mock LLM API with a strict token window, shared by pacegate's tests and
//! benchmarks (issue 17).
//!
//! [`LlmMock`] answers three APIs in the providers' shapes, on a loopback
//! listener, and records every request as an [`LlmArrival`]:
//! - `POST …/chat/completions` (OpenAI): a `chat.completion`, or with
//!   `stream: true` `chat.completion.chunk` events, a final usage chunk
//!   (`choices: []`) when `stream_options.include_usage` is true, then
//!   `data: [DONE]`.
//! - `POST …/embeddings` (OpenAI): one 8-dimension embedding per input.
//! - `POST …/messages` (Anthropic; `max_tokens` required, as there): a
//!   `message`, or with `stream: true` the events `message_start`,
//!   `content_block_start`, `content_block_delta`…, `content_block_stop`,
//!   `message_delta` (cumulative usage), `message_stop`.
//!
//! Each event is one body frame, `stream_chunks` apart. Other paths answer
//! 404, other methods 405, a body that is not a JSON object 400, all in the
//! provider's error shape.
//!
//! # Deterministic usage
//! `prompt_tokens` is [`prompt_tokens`]: the characters of every string the
//! model would read (messages, system, input, tools; not `model`) / 4,
//! rounded up, at least 1. `completion_tokens` is the request's cap
//! (`max_completion_tokens`, `max_tokens`) or `output_len` if smaller or no
//! cap, times `n` (1..=16; a stream carries the first choice only);
//! embeddings have none. The answer's text is one word `tok` per
//! completion token.
//!
//! # The token window
//! With [`LlmBehaviour::token_limit`]`(limit, window)`, a request is charged
//! prompt + completion tokens the moment its body has arrived, if the tokens
//! charged within the last `window` plus its own stay within `limit`; else it
//! gets 429 (and is not charged), with `retry-after` (whole seconds until it
//! would fit, at least 1) and the provider's error body. Every answer of a
//! limited mock carries the provider's headers: OpenAI
//! `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens`,
//! `x-ratelimit-reset-tokens` (a Go duration, to the millisecond);
//! Anthropic `anthropic-ratelimit-tokens-limit`, `-remaining`, `-reset` (RFC
//! 3339, rounded up to the second). The reset is when the window is fully
//! replenished, as the providers document it.
//!
//! With [`LlmBehaviour::bare_429s`], a 429 carries none of those headers
//! (nor `retry-after`): only its body says why, as the providers word it
//! (OpenAI: `"type": "tokens"`, "... on tokens per min (TPM): Limit L, Used
//! U, Requested C. Please try again in Nms."; Anthropic: "This request would
//! exceed your organization's rate limit of L tokens per minute.").
//!
//! Like `mock.rs`, this file depends only on tokio, hyper, hyper-util, http,
//! http-body-util, bytes, futures-util and serde_json, never on pacegate,
//! so benchmarks and examples can include it with `#[path]`. Times are
//! `tokio::time::Instant`s (pausable); `shutdown` and drop are abrupt.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Request bodies larger than this answer 413.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 16;

/// Which API a path speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Embeddings,
    Messages,
}

impl Api {
    fn of(path: &str) -> Option<Api> {
        let path = path.strip_suffix('/').unwrap_or(path);
        if path.ends_with("/chat/completions") {
            Some(Api::Chat)
        } else if path.ends_with("/embeddings") {
            Some(Api::Embeddings)
        } else if path.ends_with("/messages") {
            Some(Api::Messages)
        } else {
            None
        }
    }

    fn anthropic(self) -> bool {
        self == Api::Messages
    }
}

/// One request that reached the mock, in the order they were decided.
#[derive(Clone, Debug)]
pub struct LlmArrival {
    /// When the body had arrived and the window decided.
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub model: String,
    pub stream: bool,
    /// Usage the answer reports (also for a 429, which is not charged).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub status: u16,
}

impl LlmArrival {
    /// Tokens the window charged: prompt + completion if answered 200, else 0.
    pub fn charged(&self) -> u64 {
        if self.status == 200 { self.prompt_tokens + self.completion_tokens } else { 0 }
    }
}

/// How the mock answers; the default has no limit and 20 output tokens.
#[derive(Clone, Debug)]
pub struct LlmBehaviour {
    /// `(limit, window)`: the strict sliding token window.
    token_limit: Option<(u64, Duration)>,
    /// Completion tokens when the request's cap allows.
    output_len: u64,
    /// Delay before every answer head.
    latency: Duration,
    /// Completion tokens per streamed content delta, and the time between events.
    stream_chunks: (u64, Duration),
    /// A 429 says why in its body only (see the module doc).
    bare_429s: bool,
}

impl Default for LlmBehaviour {
    fn default() -> Self {
        LlmBehaviour {
            token_limit: None,
            output_len: 20,
            latency: Duration::ZERO,
            stream_chunks: (8, Duration::ZERO),
            bare_429s: false,
        }
    }
}

impl LlmBehaviour {
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `limit` tokens charged in any sliding `window` (see the module doc).
    pub fn token_limit(mut self, limit: u64, window: Duration) -> Self {
        assert!(limit > 0 && !window.is_zero(), "token_limit needs a limit and a window");
        self.token_limit = Some((limit, window));
        self
    }

    /// Completion tokens an answer has, unless the request caps it lower.
    pub fn output_len(mut self, tokens: u64) -> Self {
        self.output_len = tokens;
        self
    }

    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// A 429 carries no rate-limit headers, only the provider's error body.
    pub fn bare_429s(mut self) -> Self {
        self.bare_429s = true;
        self
    }

    /// Streamed answers: `tokens` per content delta, `interval` between events.
    pub fn stream_chunks(mut self, tokens: u64, interval: Duration) -> Self {
        assert!(tokens > 0, "stream_chunks needs at least one token per delta");
        self.stream_chunks = (tokens, interval);
        self
    }
}

/// A running mock; dropping it stops it as `shutdown` does.
pub struct LlmMock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Arrivals recorded so far, so waiters wake on change.
    arrived: watch::Sender<usize>,
}

struct State {
    arrivals: Vec<LlmArrival>,
    behaviour: LlmBehaviour,
    /// Charges still inside the window, oldest first.
    window: VecDeque<(Instant, u64)>,
    /// `Instant` and wall clock read together, to write resets as dates.
    origin: (Instant, SystemTime),
}

// === impl LlmMock ===

impl LlmMock {
    /// Start on `127.0.0.1:0`.
    pub async fn start(behaviour: LlmBehaviour) -> LlmMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding 127.0.0.1:0 for the LLM mock");
        Self::start_on(listener, behaviour).await
    }

    /// Start on a listener the caller bound.
    pub async fn start_on(listener: TcpListener, behaviour: LlmBehaviour) -> LlmMock {
        let addr = listener.local_addr().expect("a bound listener has an address");
        let state = State {
            arrivals: Vec::new(),
            behaviour,
            window: VecDeque::new(),
            origin: (Instant::now(), SystemTime::now()),
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), arrived: watch::Sender::new(0) });
        let (shutdown, stop) = watch::channel(false);
        let server = tokio::spawn(serve(listener, shared.clone(), stop));
        LlmMock { addr, shared, shutdown, server: Some(server) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn arrivals(&self) -> Vec<LlmArrival> {
        self.shared.lock().arrivals.clone()
    }

    pub fn count(&self) -> usize {
        self.shared.lock().arrivals.len()
    }

    pub fn count_status(&self, status: u16) -> usize {
        self.shared.lock().arrivals.iter().filter(|a| a.status == status).count()
    }

    /// Tokens charged so far, over the whole run.
    pub fn tokens_charged(&self) -> u64 {
        self.shared.lock().arrivals.iter().map(LlmArrival::charged).sum()
    }

    /// Most tokens charged within any sliding `window`: at most the limit.
    pub fn max_tokens_in_window(&self, window: Duration) -> u64 {
        let state = self.shared.lock();
        let charges: Vec<(Instant, u64)> =
            state.arrivals.iter().filter(|a| a.charged() > 0).map(|a| (a.at, a.charged())).collect();
        let (mut best, mut sum, mut start) = (0, 0, 0);
        for &(at, tokens) in &charges {
            sum += tokens;
            while at.duration_since(charges[start].0) >= window {
                sum -= charges[start].1;
                start += 1;
            }
            best = best.max(sum);
        }
        best
    }

    /// Wait until at least `n` requests were decided; `false` on timeout.
    pub async fn wait_for_arrivals(&self, n: usize, timeout: Duration) -> bool {
        let mut arrived = self.shared.arrived.subscribe();
        matches!(tokio::time::timeout(timeout, arrived.wait_for(|count| *count >= n)).await, Ok(Ok(_)))
    }

    /// Replace the behaviour; the window starts empty, arrivals are kept.
    pub fn set_behaviour(&self, behaviour: LlmBehaviour) {
        let mut state = self.shared.lock();
        state.behaviour = behaviour;
        state.window.clear();
    }

    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for LlmMock {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Shared {
    /// A panicking test must not poison the mock for the assertions after it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === the deterministic count ===

/// Prompt tokens the mock reports for a request body (see the module doc).
pub fn prompt_tokens(request: &Value) -> u64 {
    fn chars(value: &Value) -> u64 {
        match value {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(items) => items.iter().map(chars).sum(),
            Value::Object(o) => o.values().map(chars).sum(),
            _ => 0,
        }
    }
    let read = ["messages", "system", "input", "tools"];
    let total: u64 = read.iter().filter_map(|k| request.get(k)).map(chars).sum();
    total.div_ceil(4).max(1)
}

/// Completion tokens the mock reports: the cap or `output_len`, times `n`.
pub fn completion_tokens(api: Api, request: &Value, output_len: u64) -> u64 {
    if api == Api::Embeddings {
        return 0;
    }
    cap(api, request).map_or(output_len, |cap| cap.min(output_len)) * choices(api, request)
}

/// The request's own cap on completion tokens (per choice).
fn cap(api: Api, request: &Value) -> Option<u64> {
    let number = |k: &str| request.get(k).and_then(Value::as_u64);
    match api {
        Api::Embeddings => None,
        Api::Chat => number("max_completion_tokens").or_else(|| number("max_tokens")),
        Api::Messages => number("max_tokens"),
    }
}

/// Completions asked for: `n` for chat, else one.
fn choices(api: Api, request: &Value) -> u64 {
    let n = request.get("n").and_then(Value::as_u64).unwrap_or(1);
    if api == Api::Chat { n.clamp(1, MAX_CHOICES) } else { 1 }
}

// === deciding ===

/// What the window says about one request.
struct Verdict {
    allowed: bool,
    headers: HeaderMap,
    /// A bare 429's error message.
    said: Option<String>,
}

impl State {
    /// Charges `cost` if it fits the window at `now`; the rate-limit headers either way.
    fn admit(&mut self, api: Api, now: Instant, cost: u64) -> Verdict {
        let mut headers = HeaderMap::new();
        let Some((limit, window)) = self.behaviour.token_limit else {
            return Verdict { allowed: true, headers, said: None };
        };
        while self.window.front().is_some_and(|(at, _)| now.duration_since(*at) >= window) {
            self.window.pop_front();
        }
        let used: u64 = self.window.iter().map(|(_, t)| t).sum();
        let allowed = used + cost <= limit;
        if !allowed && self.behaviour.bare_429s {
            let wait = round_up_ms(self.wait(now, window, limit, used, cost)).as_millis();
            let said = if api.anthropic() {
                format!(
                    "This request would exceed your organization's rate limit of {limit} tokens per minute."
                )
            } else {
                format!(
                    "Rate limit reached for gpt-4o in organization org-mock on tokens per min (TPM): \
                     Limit {limit}, Used {used}, Requested {cost}. Please try again in {wait}ms. \
                     Visit https://platform.openai.com/account/rate-limits to learn more."
                )
            };
            return Verdict { allowed, headers, said: Some(said) };
        }
        if allowed {
            self.window.push_back((now, cost));
        } else {
            headers.insert(RETRY_AFTER, HeaderValue::from(self.retry_after(now, window, limit, used, cost)));
        }
        let remaining = limit.saturating_sub(used + if allowed { cost } else { 0 });
        // Fully replenished when the newest charge leaves the window.
        let reset = self.window.back().map_or(Duration::ZERO, |(at, _)| (*at + window).duration_since(now));
        if api.anthropic() {
            let at = self.origin.1 + (now + reset).duration_since(self.origin.0);
            headers.insert("anthropic-ratelimit-tokens-limit", HeaderValue::from(limit));
            headers.insert("anthropic-ratelimit-tokens-remaining", HeaderValue::from(remaining));
            headers.insert("anthropic-ratelimit-tokens-reset", header(&rfc3339_ceil(at)));
        } else {
            headers.insert("x-ratelimit-limit-tokens", HeaderValue::from(limit));
            headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from(remaining));
            headers.insert("x-ratelimit-reset-tokens", header(&go_duration(round_up_ms(reset))));
        }
        Verdict { allowed, headers, said: None }
    }

    /// Whole seconds until `cost` would fit (the window, if it never will).
    fn retry_after(&self, now: Instant, window: Duration, limit: u64, used: u64, cost: u64) -> u64 {
        let wait = self.wait(now, window, limit, used, cost);
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    }

    /// How long until `cost` would fit (the window, if it never will).
    fn wait(&self, now: Instant, window: Duration, limit: u64, used: u64, cost: u64) -> Duration {
        let mut left = used;
        let mut wait = window;
        if cost <= limit {
            for (at, tokens) in &self.window {
                left -= tokens;
                if left + cost <= limit {
                    wait = (*at + window).duration_since(now);
                    break;
                }
            }
        }
        wait
    }
}

fn header(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("the mock writes ASCII header values")
}

fn round_up_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

/// `d` as Go's `time.Duration.String` writes it (`6m0s`, `1.5s`, `20ms`).
pub fn go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    let decimal = |value: u128, unit: u128| {
        let fraction = format!("{:09}", value % unit * (1_000_000_000 / unit));
        let fraction = fraction.trim_end_matches('0');
        if fraction.is_empty() { format!("{}", value / unit) } else { format!("{}.{fraction}", value / unit) }
    };
    match nanos {
        0 => "0s".into(),
        1..=999 => format!("{nanos}ns"),
        1_000..=999_999 => format!("{}µs", decimal(nanos, 1_000)),
        1_000_000..=999_999_999 => format!("{}ms", decimal(nanos, 1_000_000)),
        _ => {
            let (h, m) = (nanos / 3_600_000_000_000, nanos / 60_000_000_000 % 60);
            let s = decimal(nanos % 60_000_000_000, 1_000_000_000);
            match (h, m) {
                (0, 0) => format!("{s}s"),
                (0, m) => format!("{m}m{s}s"),
                (h, m) => format!("{h}h{m}m{s}s"),
            }
        }
    }
}

/// `at` as RFC 3339 UTC, rounded up to the second: `2025-08-21T12:40:59Z`.
pub fn rfc3339_ceil(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

// === serving ===

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                // Events must leave at once, not after Nagle's delay.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = service_fn(move |req| handle(shared.clone(), req));
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
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

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let Some(api) = Api::of(&path) else {
        return Ok(error(Api::Chat, 404, "not_found_error", "no such endpoint", HeaderMap::new()));
    };
    if parts.method != Method::POST {
        return Ok(error(api, 405, "invalid_request_error", "use POST", HeaderMap::new()));
    }
    let Ok(body) = Limited::new(body, MAX_BODY_BYTES).collect().await.map(|b| b.to_bytes()) else {
        return Ok(error(api, 413, "invalid_request_error", "body too large", HeaderMap::new()));
    };
    let request = match serde_json::from_slice::<Value>(&body) {
        Ok(request @ Value::Object(_)) => request,
        _ => {
            return Ok(error(
                api,
                400,
                "invalid_request_error",
                "body is not a JSON object",
                HeaderMap::new(),
            ));
        }
    };
    if api == Api::Messages && request.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Ok(error(api, 400, "invalid_request_error", "max_tokens: Field required", HeaderMap::new()));
    }

    let (verdict, behaviour, seq, reply) = {
        let mut state = shared.lock();
        let behaviour = state.behaviour.clone();
        let reply = Reply {
            api,
            seq: state.arrivals.len(),
            model: request.get("model").and_then(Value::as_str).unwrap_or("mock").to_string(),
            prompt: prompt_tokens(&request),
            completion: completion_tokens(api, &request, behaviour.output_len),
            capped: cap(api, &request).is_some_and(|cap| cap <= behaviour.output_len),
            choices: choices(api, &request),
            inputs: request.get("input").and_then(Value::as_array).map_or(1, Vec::len),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true) && api != Api::Embeddings,
            include_usage: request.pointer("/stream_options/include_usage").and_then(Value::as_bool)
                == Some(true),
        };
        // Taken under the lock so arrival times are sorted like the arrivals.
        let now = Instant::now();
        let verdict = state.admit(api, now, reply.prompt + reply.completion);
        let seq = reply.seq;
        state.arrivals.push(LlmArrival {
            at: now,
            path,
            headers: parts.headers,
            model: reply.model.clone(),
            stream: reply.stream,
            prompt_tokens: reply.prompt,
            completion_tokens: reply.completion,
            status: if verdict.allowed { 200 } else { 429 },
        });
        shared.arrived.send_replace(seq + 1);
        (verdict, behaviour, seq, reply)
    };
    if !behaviour.latency.is_zero() {
        tokio::time::sleep(behaviour.latency).await;
    }
    let mut headers = verdict.headers;
    headers.insert("x-mock-seq", HeaderValue::from(seq));
    match verdict.said {
        _ if verdict.allowed => {}
        Some(said) if api.anthropic() => return Ok(error(api, 429, "rate_limit_error", &said, headers)),
        Some(said) => return Ok(error(api, 429, "tokens", &said, headers)),
        None => return Ok(error(api, 429, "rate_limit_error", "token rate limit reached", headers)),
    }
    if reply.stream {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert("cache-control", HeaderValue::from_static("no-cache"));
        let events = if api.anthropic() {
            reply.anthropic_events(&behaviour)
        } else {
            reply.openai_events(&behaviour)
        };
        return Ok(respond(200, headers, sse_body(events, behaviour.stream_chunks.1)));
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(respond(200, headers, Full::new(Bytes::from(reply.json().to_string())).map_err(Into::into).boxed()))
}

fn respond(status: u16, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).expect("the mock answers valid statuses");
    *response.headers_mut() = headers;
    response
}

/// An error in the provider's shape.
fn error(api: Api, status: u16, kind: &str, message: &str, mut headers: HeaderMap) -> Response<Body> {
    let body = if api.anthropic() {
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        let code = if status == 429 { Value::from("rate_limit_exceeded") } else { Value::Null };
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    respond(status, headers, Full::new(Bytes::from(body.to_string())).map_err(Into::into).boxed())
}

/// Each event its own frame, the first at once, the rest `interval` apart.
fn sse_body(events: Vec<String>, interval: Duration) -> Body {
    let events = stream::unfold((events.into_iter(), true), move |(mut events, first)| async move {
        let event = events.next()?;
        if !first && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Some((Ok::<_, BoxError>(Frame::data(Bytes::from(event))), (events, false)))
    });
    BodyExt::boxed(StreamBody::new(events))
}

// === answers ===

/// Everything an answer says, decided with the window.
struct Reply {
    api: Api,
    seq: usize,
    model: String,
    prompt: u64,
    /// Completion tokens over all choices.
    completion: u64,
    /// The request's cap, not `output_len`, ended the answer.
    capped: bool,
    choices: u64,
    /// Embedding inputs.
    inputs: usize,
    stream: bool,
    include_usage: bool,
}

impl Reply {
    fn text(&self, tokens: u64) -> String {
        vec!["tok"; tokens as usize].join(" ")
    }

    fn per_choice(&self) -> u64 {
        self.completion / self.choices
    }

    fn json(&self) -> Value {
        let (prompt, completion) = (self.prompt, self.completion);
        match self.api {
            Api::Chat => {
                let finish = if self.capped { "length" } else { "stop" };
                let choices: Vec<Value> = (0..self.choices)
                    .map(|i| json!({"index": i, "message": {"role": "assistant", "content": self.text(self.per_choice())}, "finish_reason": finish}))
                    .collect();
                json!({
                    "id": format!("chatcmpl-mock-{}", self.seq), "object": "chat.completion", "created": 0,
                    "model": self.model, "choices": choices,
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                })
            }
            Api::Embeddings => {
                let data: Vec<Value> = (0..self.inputs)
                    .map(|i| json!({"object": "embedding", "index": i, "embedding": vec![0.0; 8]}))
                    .collect();
                json!({"object": "list", "data": data, "model": self.model,
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
            }
            Api::Messages => json!({
                "id": format!("msg_mock_{}", self.seq), "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": self.text(completion)}],
                "stop_reason": if self.capped { "max_tokens" } else { "end_turn" }, "stop_sequence": null,
                "usage": {"input_tokens": prompt, "output_tokens": completion},
            }),
        }
    }

    /// Content deltas of at most `per` tokens, for one choice of `total` tokens.
    fn deltas(&self, total: u64, per: u64) -> Vec<String> {
        (0..total.div_ceil(per))
            .map(|i| format!("{}{}", if i > 0 { " " } else { "" }, self.text(per.min(total - i * per))))
            .collect()
    }

    fn openai_events(&self, behaviour: &LlmBehaviour) -> Vec<String> {
        let id = format!("chatcmpl-mock-{}", self.seq);
        let chunk = |choices: Value| {
            let mut chunk = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": self.model, "choices": choices});
            // With include_usage, every chunk but the last says `"usage": null`.
            if self.include_usage {
                chunk["usage"] = Value::Null;
            }
            format!("data: {chunk}\n\n")
        };
        let mut events = vec![chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        )];
        // Only the first choice is streamed; usage counts them all.
        for delta in self.deltas(self.per_choice(), behaviour.stream_chunks.0) {
            events.push(chunk(json!([{"index": 0, "delta": {"content": delta}, "finish_reason": null}])));
        }
        let finish = if self.capped { "length" } else { "stop" };
        events.push(chunk(json!([{"index": 0, "delta": {}, "finish_reason": finish}])));
        if self.include_usage {
            let usage = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": self.model, "choices": [],
                "usage": {"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion}});
            events.push(format!("data: {usage}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());
        events
    }

    fn anthropic_events(&self, behaviour: &LlmBehaviour) -> Vec<String> {
        let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {
                "id": format!("msg_mock_{}", self.seq), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.prompt, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        for delta in self.deltas(self.completion, behaviour.stream_chunks.0) {
            events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}})));
        }
        events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        let stop = if self.capped { "max_tokens" } else { "end_turn" };
        events.push(event("message_delta", json!({"type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": self.completion}})));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        events
    }
}
