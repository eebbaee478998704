//! Prometheus metrics, with the names users rely on (docs/operations.md).
//!
//! One [`Metrics`] lives for the whole process (across reloads) and is shared
//! by every upstream. Counters are incremented where things happen; gauges
//! that mirror dispatcher state (queue depth, in flight, effective rate) are
//! refreshed when `/metrics` is scraped, so the hot path never writes them.
//! The request path counts through [`UpstreamMetrics`], which keeps each
//! upstream's series once looked up.
//!
//! Series whose labels take a fixed set of values (reload results, and for
//! each upstream its attempt outcomes, retry and refusal reasons and its
//! cooldown counter) are exported at 0 from start-up, so that a scrape sees
//! them before the first event and `rate()` does not miss it. The reload
//! results are created with the process; an upstream's are created by the
//! first scrape that sees the upstream ([`UpstreamMetrics::export_fixed`]),
//! which keeps the 19 series per upstream off the start-up of a config
//! with thousands of upstreams. The Redis series exist only with `[redis]`
//! (see [`Metrics::encode`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::error::RefusalReason;
use crate::retry::RetryReason;

// The `upstream` label is an `Arc<str>` that an upstream's series share:
// with `[[upstream]]` by the thousand, one name per series adds up.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub upstream: Arc<str>,
    /// HTTP status of the answer the caller got.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub upstream: Arc<str>,
    /// An [`AttemptOutcome::as_str`].
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub upstream: Arc<str>,
    /// What the cache did: `hit`, `miss`, `revalidated`, `coalesced` or `bypass`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub upstream: Arc<str>,
    /// A [`RetryReason::as_str`] or a [`RefusalReason::as_str`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub upstream: Arc<str>,
    /// `input` or `output`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabel {
    /// A [`ClientTimeout::as_str`].
    pub timeout: &'static str,
}

/// A client-side timeout that cost a caller its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeout {
    /// No byte of a request body for `body_read_timeout`.
    BodyRead,
    /// An answer the caller took nothing of for `send_timeout`.
    Send,
}

impl ClientTimeout {
    pub const ALL: [Self; 2] = [Self::BodyRead, Self::Send];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BodyRead => "body_read",
            Self::Send => "send",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Label value for requests that matched no upstream.
pub const NO_UPSTREAM: &str = "none";

/// Every metric pacegate exports.
pub struct Metrics {
    registry: Registry,
    /// The `pacegate_redis_*` series, exported only while `[redis]` is configured.
    redis: Registry,
    pub requests: Family<CodeLabels, Counter>,
    pub attempts: Family<OutcomeLabels, Counter>,
    pub retries: Family<ReasonLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub queue_depth: Family<UpstreamLabel, Gauge>,
    pub inflight: Family<UpstreamLabel, Gauge>,
    pub queue_wait: HistogramFamily<UpstreamLabel>,
    pub upstream_duration: HistogramFamily<UpstreamLabel>,
    pub cooldown_seconds: Family<UpstreamLabel, Counter<f64, AtomicU64>>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub effective_rate: Family<UpstreamLabel, Gauge<f64, AtomicU64>>,
    /// LLM tokens charged against token quotas, as settled.
    pub tokens: Family<KindLabels, Counter>,
    /// Upstreams with a breaker only: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<UpstreamLabel, Gauge>,
    /// Upstreams with a breaker only: times it opened (reopenings included).
    pub breaker_opened: Family<UpstreamLabel, Counter>,
    /// Upstreams with a cache only: answers by what the cache did.
    pub cache: Family<CacheLabels, Counter>,
    /// Answers per upstream, all codes together, for `/status` (not exported).
    pub answered: Family<UpstreamLabel, Counter>,
    /// 1 while the shared limiter's Redis is reachable.
    pub redis_up: Gauge,
    /// Redis calls that failed or timed out.
    pub redis_errors: Counter,
    /// Times pacing fell back from Redis to `on_error`.
    pub redis_fallbacks: Counter,
    /// Panics caught in request, stream and connection tasks.
    pub panics: Counter,
    /// Requests lost to a client-side timeout, by [`ClientTimeout`].
    pub client_timeouts: Family<TimeoutLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Queue waits: from "went straight out" to a minute.
fn queue_wait_histogram() -> Histogram {
    Histogram::new(QUEUE_WAIT_BOUNDS)
}

/// Bucket bounds of queue waits, in seconds: the histogram's and the
/// dashboard history's.
pub const QUEUE_WAIT_BOUNDS: [f64; 13] =
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Upstream answer times, connect to response head.
fn duration_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let attempts = Family::default();
        let retries = Family::default();
        let rejected = Family::default();
        let queue_depth = Family::default();
        let inflight = Family::default();
        let queue_wait: HistogramFamily<UpstreamLabel> = Family::new_with_constructor(queue_wait_histogram);
        let upstream_duration: HistogramFamily<UpstreamLabel> =
            Family::new_with_constructor(duration_histogram);
        let cooldown_seconds = Family::default();
        let config_reloads = Family::default();
        let effective_rate = Family::default();
        let tokens = Family::default();
        let panics = Counter::default();
        registry.register("pacegate_panics", "Panics caught; the task that panicked ended", panics.clone());
        registry.register("pacegate_requests", "Answers to callers, by HTTP status", requests.clone());
        registry.register(
            "pacegate_upstream_attempts",
            "Attempts sent upstream, by outcome",
            attempts.clone(),
        );
        registry.register("pacegate_retries", "Retries, by reason", retries.clone());
        registry.register(
            "pacegate_rejected",
            "Requests pacegate refused itself, by reason",
            rejected.clone(),
        );
        registry.register(
            "pacegate_queue_depth",
            "Requests waiting in the upstream's queue",
            queue_depth.clone(),
        );
        registry.register("pacegate_inflight", "Attempts in flight to the upstream", inflight.clone());
        let (breaker_state, breaker_opened) = (Family::default(), Family::default());
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "pacegate_cache",
            "Answers of upstreams with a cache, by what the cache did",
            cache.clone(),
        );
        registry.register(
            "pacegate_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            Family::clone(&breaker_state),
        );
        registry.register(
            "pacegate_breaker_opened",
            "Times the circuit breaker opened",
            Family::clone(&breaker_opened),
        );
        registry.register(
            "pacegate_queue_wait_seconds",
            "Time an attempt waited for its turn",
            queue_wait.clone(),
        );
        registry.register(
            "pacegate_upstream_duration_seconds",
            "Time from sending an attempt to its response head",
            upstream_duration.clone(),
        );
        registry.register(
            "pacegate_cooldown_seconds",
            "Seconds the upstream was paused by cooldowns",
            cooldown_seconds.clone(),
        );
        registry.register("pacegate_config_reloads", "Config reloads, by result", config_reloads.clone());
        registry.register(
            "pacegate_effective_rate",
            "Requests per second the pacer uses now",
            effective_rate.clone(),
        );
        registry.register(
            "pacegate_tokens",
            "LLM tokens charged against token quotas, as settled, by kind (input, output)",
            tokens.clone(),
        );
        for ok in [true, false] {
            let _ = config_reloads.get_or_create(&Self::reload_result(ok));
        }
        let client_timeouts = Family::<TimeoutLabel, Counter>::default();
        registry.register(
            "pacegate_client_timeouts",
            "Requests lost because the caller stopped sending its body or reading its answer",
            client_timeouts.clone(),
        );
        for timeout in ClientTimeout::ALL {
            let _ = client_timeouts.get_or_create(&TimeoutLabel { timeout: timeout.as_str() });
        }
        let mut redis = Registry::default();
        let (redis_up, redis_errors, redis_fallbacks): (Gauge, Counter, Counter) = Default::default();
        redis.register(
            "pacegate_redis_up",
            "1 while the shared limiter's Redis is reachable",
            redis_up.clone(),
        );
        redis.register("pacegate_redis_errors", "Redis calls that failed or timed out", redis_errors.clone());
        redis.register(
            "pacegate_redis_fallbacks",
            "Times pacing fell back from Redis to on_error (local or deny)",
            redis_fallbacks.clone(),
        );
        Self {
            registry,
            redis,
            requests,
            attempts,
            retries,
            rejected,
            queue_depth,
            inflight,
            queue_wait,
            upstream_duration,
            cooldown_seconds,
            config_reloads,
            effective_rate,
            tokens,
            breaker_state,
            breaker_opened,
            cache,
            answered: Family::default(),
            redis_up,
            redis_errors,
            redis_fallbacks,
            panics,
            client_timeouts,
        }
    }

    /// Counts a request lost to a client-side timeout.
    pub fn timed_out(&self, timeout: ClientTimeout) {
        self.client_timeouts.get_or_create(&TimeoutLabel { timeout: timeout.as_str() }).inc();
    }

    /// Logs and counts a caught panic; `what` says what it ended (a request,
    /// a stream, a connection) or what was restarted (an upstream's driver).
    pub fn panicked(&self, panic: &(dyn std::any::Any + Send), what: &'static str) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-text panic payload".into());
        self.panics.inc();
        tracing::error!(panic = %message, ended = what, "panic caught");
    }

    /// The Prometheus text exposition of every metric; the Redis series
    /// only when `redis` (the live config has `[redis]`).
    ///
    /// Decided at each scrape rather than at start-up, so that a reload that
    /// adds or removes `[redis]` shows or hides them. Their values live as
    /// long as the process: a `[redis]` that comes back continues its
    /// counters, as Prometheus expects of a counter that reappears.
    pub fn encode(&self, redis: bool) -> String {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.registry);
        if redis {
            let _ = text::encode_registry(&mut out, &self.redis);
        }
        let _ = text::encode_eof(&mut out);
        out
    }

    /// [`Self::encode`] in the Prometheus text format (0.0.4), for a
    /// scraper that does not ask for OpenMetrics: `# HELP` and `# TYPE` of
    /// a counter name its samples (`_total`), and the `# EOF` and `# UNIT`
    /// lines, which that format does not have, are left out. Samples are
    /// the same in both.
    pub fn prometheus_text(openmetrics: &str) -> String {
        let counters: std::collections::HashSet<&str> = openmetrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(openmetrics.len());
        for line in openmetrics.lines() {
            let meta =
                ["# HELP ", "# TYPE "].into_iter().find_map(|tag| Some((tag, line.strip_prefix(tag)?)));
            match meta {
                Some((tag, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    let total = if counters.contains(name) { "_total" } else { "" };
                    out.push_str(&format!("{tag}{name}{total} {tail}\n"));
                }
                None if line == "# EOF" || line.starts_with("# UNIT ") => {}
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    pub fn upstream(name: &str) -> UpstreamLabel {
        UpstreamLabel { upstream: name.into() }
    }

    /// A reload removed upstream `name`: its gauges (queue, in flight, rate,
    /// breaker) stop being exported, rather than stay at their last value;
    /// its counters stay, as counters do.
    pub fn forget_gauges(&self, name: &str) {
        let label = Self::upstream(name);
        self.queue_depth.remove(&label);
        self.inflight.remove(&label);
        self.effective_rate.remove(&label);
        self.breaker_state.remove(&label);
    }

    pub fn reason(upstream: &str, reason: &'static str) -> ReasonLabels {
        ReasonLabels { upstream: upstream.into(), reason }
    }

    pub fn outcome(upstream: &str, outcome: AttemptOutcome) -> OutcomeLabels {
        OutcomeLabels { upstream: upstream.into(), outcome: outcome.as_str() }
    }

    fn reload_result(ok: bool) -> ResultLabel {
        ResultLabel { result: if ok { "ok" } else { "error" } }
    }

    /// Counts one answer to a caller.
    pub fn count_request(&self, upstream: &str, status: http::StatusCode) {
        let labels = CodeLabels { upstream: upstream.into(), code: status.as_u16().to_string() };
        self.requests.get_or_create(&labels).inc();
        self.answered.get_or_create(&Self::upstream(upstream)).inc();
    }

    /// Current value of a counter, zero when it was never touched.
    pub fn read<L>(family: &Family<L, Counter>, labels: &L) -> u64
    where
        L: Clone + std::hash::Hash + Eq,
    {
        family.get(labels).map_or(0, |counter| counter.get())
    }

    /// Counts tokens an LLM call was charged; `0, 0` exports both series.
    pub fn count_tokens(&self, upstream: &str, input: u64, output: u64) {
        for (kind, tokens) in [("input", input), ("output", output)] {
            self.tokens.get_or_create(&KindLabels { upstream: upstream.into(), kind }).inc_by(tokens);
        }
    }

    /// Counts one reload by result (`ok` or `error`).
    pub fn count_reload(&self, ok: bool) {
        self.config_reloads.get_or_create(&Self::reload_result(ok)).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How one attempt ended: the `outcome` label of
/// `pacegate_upstream_attempts_total` and the keys of `/status` `attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Ok,
    ClientError,
    RateLimited,
    ServerError,
    ConnectError,
    Timeout,
    Broken,
}

impl AttemptOutcome {
    /// Every outcome, in declaration order: `outcome as usize` indexes it.
    pub const ALL: [Self; 7] = [
        Self::Ok,
        Self::ClientError,
        Self::RateLimited,
        Self::ServerError,
        Self::ConnectError,
        Self::Timeout,
        Self::Broken,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::ConnectError => "connect_error",
            Self::Timeout => "timeout",
            Self::Broken => "broken",
        }
    }
}

/// Answer codes whose series an upstream keeps at hand; any other code is
/// looked up in the family each time (rare by nature).
const KEPT_CODES: [u16; 19] =
    [200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 504];

/// One upstream's series, each looked up in its family once and then kept.
/// `Family::get_or_create` builds label strings, hashes them and takes the
/// family's lock; per request that was a large share of pacegate's own
/// work, where incrementing a kept series is one atomic add. Series with a
/// fixed label set are created by the first scrape; the others (answer
/// codes, histograms) appear once used.
#[derive(Debug)]
pub struct UpstreamMetrics {
    all: Arc<Metrics>,
    /// The `upstream` label value, shared by this upstream's series.
    name: Arc<str>,
    queue_wait: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    answered: OnceLock<Counter>,
    /// By [`AttemptOutcome`], in the order of [`AttemptOutcome::ALL`].
    attempts: [OnceLock<Counter>; AttemptOutcome::ALL.len()],
    /// `pacegate_requests_total` for each of [`KEPT_CODES`].
    codes: [OnceLock<Counter>; KEPT_CODES.len()],
    /// Queue waits by bucket of [`QUEUE_WAIT_BOUNDS`] (the last one above),
    /// which the histogram does not let us read, for the dashboard history.
    waits: [AtomicU64; QUEUE_WAIT_BOUNDS.len() + 1],
    /// Set once [`Self::export_fixed`] has created the fixed-label series.
    exported: OnceLock<()>,
    /// Plain CONNECT tunnels to this upstream's hosts, which pacing cannot
    /// see into: how many (for `/status`), and the hosts warned about.
    unpaced: Mutex<Unpaced>,
}

#[derive(Debug, Default)]
struct Unpaced {
    tunnels: u64,
    /// Hosts the upstream claims, so bounded by the config.
    hosts: HashSet<String>,
}

impl UpstreamMetrics {
    /// This upstream's series; those with a fixed label set start at 0 (or
    /// continue, for an upstream that was configured before).
    pub fn new(all: Arc<Metrics>, name: &str) -> Self {
        Self {
            all,
            name: name.into(),
            queue_wait: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            answered: OnceLock::new(),
            attempts: Default::default(),
            codes: Default::default(),
            waits: Default::default(),
            exported: OnceLock::new(),
            unpaced: Mutex::default(),
        }
    }

    /// Counts a plain tunnel to `host`; true the first time for that host,
    /// which deserves a warning.
    pub fn unpaced_tunnel(&self, host: &str) -> bool {
        let mut unpaced = self.unpaced.lock().unwrap_or_else(PoisonError::into_inner);
        unpaced.tunnels += 1;
        unpaced.hosts.insert(host.to_ascii_lowercase())
    }

    /// Plain tunnels opened to this upstream's hosts so far.
    pub fn unpaced_tunnels(&self) -> u64 {
        self.unpaced.lock().unwrap_or_else(PoisonError::into_inner).tunnels
    }

    /// Creates this upstream's fixed-label series (at 0, or as they are),
    /// once; `/metrics` calls it for every upstream before it encodes.
    pub fn export_fixed(&self) {
        self.exported.get_or_init(|| {
            for outcome in AttemptOutcome::ALL {
                self.attempt(outcome);
            }
            let retries = RetryReason::ALL.map(|reason| (&self.all.retries, reason.as_str()));
            let refusals = RefusalReason::ALL.map(|reason| (&self.all.rejected, reason.as_str()));
            for (family, reason) in retries.into_iter().chain(refusals) {
                let _ = family.get_or_create(&ReasonLabels { upstream: self.name.clone(), reason });
            }
            let _ = self.all.cooldown_seconds.get_or_create(&self.label());
        });
    }

    fn attempt(&self, outcome: AttemptOutcome) -> &Counter {
        self.attempts[outcome as usize].get_or_init(|| {
            let labels = OutcomeLabels { upstream: self.name.clone(), outcome: outcome.as_str() };
            self.all.attempts.get_or_create(&labels).clone()
        })
    }

    /// Every metric, for the series kept nowhere else (retries, rejections).
    pub fn all(&self) -> &Metrics {
        &self.all
    }

    fn label(&self) -> UpstreamLabel {
        UpstreamLabel { upstream: self.name.clone() }
    }

    /// Counts one answer to a caller, as [`Metrics::count_request`] does.
    pub fn count_request(&self, status: http::StatusCode) {
        let code = status.as_u16();
        let labels = || CodeLabels { upstream: self.name.clone(), code: code.to_string() };
        match KEPT_CODES.iter().position(|&kept| kept == code) {
            Some(slot) => {
                self.codes[slot].get_or_init(|| self.all.requests.get_or_create(&labels()).clone()).inc()
            }
            None => self.all.requests.get_or_create(&labels()).inc(),
        };
        self.answered.get_or_init(|| self.all.answered.get_or_create(&self.label()).clone()).inc();
    }

    /// Counts one attempt by its outcome.
    pub fn count_attempt(&self, outcome: AttemptOutcome) {
        self.attempt(outcome).inc();
    }

    /// Counts one answer of a cache-enabled upstream by what the cache did.
    pub fn count_cache(&self, result: &'static str) {
        self.cache_series(result).inc();
    }

    /// The cache series for `result`, created at 0 when new.
    pub fn cache_series(&self, result: &'static str) -> Counter {
        self.all.cache.get_or_create(&CacheLabels { upstream: self.name.clone(), result }).clone()
    }

    /// Records how long an attempt waited for its ticket.
    pub fn observe_queue_wait(&self, waited: std::time::Duration) {
        let series = self.queue_wait.get_or_init(|| self.all.queue_wait.get_or_create(&self.label()).clone());
        let seconds = waited.as_secs_f64();
        series.observe(seconds);
        let bucket = QUEUE_WAIT_BOUNDS.iter().position(|&bound| seconds <= bound);
        self.waits[bucket.unwrap_or(QUEUE_WAIT_BOUNDS.len())].fetch_add(1, Ordering::Relaxed);
    }

    /// Queue waits so far by bucket of [`QUEUE_WAIT_BOUNDS`], the last one above.
    pub fn queue_waits(&self) -> [u64; QUEUE_WAIT_BOUNDS.len() + 1] {
        std::array::from_fn(|bucket| self.waits[bucket].load(Ordering::Relaxed))
    }

    /// Records the time from sending an attempt to its response head.
    pub fn observe_upstream_duration(&self, took: std::time::Duration) {
        let series = self
            .upstream_duration
            .get_or_init(|| self.all.upstream_duration.get_or_create(&self.label()).clone());
        series.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_has_no_eof() {
        let openmetrics = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                           a_requests_total{u=\"x\"} 3\n# HELP a_depth Depth.\n# TYPE a_depth gauge\n\
                           # UNIT a_depth items\na_depth 1\n# EOF\n";
        let want = "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
                    a_requests_total{u=\"x\"} 3\n# HELP a_depth Depth.\n# TYPE a_depth gauge\na_depth 1\n";
        assert_eq!(Metrics::prometheus_text(openmetrics), want);
    }

    #[test]
    fn outcomes_are_listed_in_declaration_order() {
        for (index, outcome) in AttemptOutcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, index, "{outcome:?}");
        }
    }

    #[test]
    fn fixed_label_series_start_at_zero() {
        let metrics = Arc::new(Metrics::new());
        let api = UpstreamMetrics::new(metrics.clone(), "api");
        assert!(!metrics.encode(false).contains("upstream=\"api\""), "created by the first scrape only");
        api.export_fixed();
        let text = metrics.encode(false);
        let mut expected = vec![
            r#"pacegate_config_reloads_total{result="ok"} 0"#.to_owned(),
            r#"pacegate_config_reloads_total{result="error"} 0"#.to_owned(),
            r#"pacegate_client_timeouts_total{timeout="body_read"} 0"#.to_owned(),
            r#"pacegate_client_timeouts_total{timeout="send"} 0"#.to_owned(),
            r#"pacegate_cooldown_seconds_total{upstream="api"} 0.0"#.to_owned(),
        ];
        let series = |name: &str, label: &str, value: &str| {
            format!("{name}{{upstream=\"api\",{label}=\"{value}\"}} 0")
        };
        let outcomes = AttemptOutcome::ALL.map(AttemptOutcome::as_str);
        expected.extend(outcomes.map(|o| series("pacegate_upstream_attempts_total", "outcome", o)));
        expected.extend(RetryReason::ALL.map(|r| series("pacegate_retries_total", "reason", r.as_str())));
        expected.extend(RefusalReason::ALL.map(|r| series("pacegate_rejected_total", "reason", r.as_str())));
        for line in expected {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn an_unpaced_host_is_warned_about_once_and_every_tunnel_counted() {
        let api = UpstreamMetrics::new(Arc::new(Metrics::new()), "api");
        assert!(api.unpaced_tunnel("api.example.com"));
        assert!(!api.unpaced_tunnel("API.example.com"), "host names are case-insensitive");
        assert!(api.unpaced_tunnel("uploads.example.com"));
        assert_eq!(api.unpaced_tunnels(), 3);
    }

    #[test]
    fn redis_series_only_when_asked_for() {
        let metrics = Metrics::new();
        assert!(!metrics.encode(false).contains("pacegate_redis"), "{}", metrics.encode(false));
        let with_redis = metrics.encode(true);
        for name in
            ["pacegate_redis_up 0", "pacegate_redis_errors_total 0", "pacegate_redis_fallbacks_total 0"]
        {
            assert!(with_redis.lines().any(|l| l == name), "{name} missing from:\n{with_redis}");
        }
        assert!(with_redis.ends_with("# EOF\n"), "one end marker, at the end:\n{with_redis}");
        assert_eq!(with_redis.matches("# EOF").count(), 1, "{with_redis}");
    }
}
