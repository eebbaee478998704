//! Configuration: the validated, runtime view of `pacegate.toml`.
//!
//! Loading happens in two stages, in the spirit of sozu's config: `raw` holds
//! the serde structs (unknown keys rejected, spans kept), `validate` turns them
//! into the types below. The rest of the crate only ever sees these types:
//! durations are `Duration`, rates are parsed, URLs are split, counts are
//! non-zero where zero would make no sense.

mod authority;
mod cache;
mod claims;
mod error;
mod limits;
mod raw;
mod units;
mod validate;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use http::uri::{Authority, Scheme};

pub use authority::{canonical_host, default_port};
pub use cache::Cache;
pub use error::{ConfigError, Location};
pub use limits::{Cost, DEFAULT_MAX_TOKENS, Limit, MAX_LIMITS, PathGlobs, matching_path};
pub use units::{MAX_DURATION, format_duration, parse_duration, parse_rate};
pub use validate::{DEFAULT_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT};

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
    parse(path, &text)
}

/// Parses and validates config text; `path` only names the source in errors.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw = raw::from_str(path, text)?;
    validate::validate(path, text, raw)
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listener addresses and client-side limits.
    pub server: Server,
    /// What happens to requests for hosts no upstream claims.
    pub forward: Forward,
    /// HTTPS interception of CONNECT tunnels.
    pub mitm: Mitm,
    /// Shared limiter state; `None` keeps every limiter in-process.
    pub redis: Option<Redis>,
    /// Configured upstreams, in file order.
    pub upstreams: Vec<Upstream>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Proxy listener (HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// Admin listener; loopback unless `admin_allow_remote`.
    pub admin_listen: SocketAddr,
    /// Explicit opt-in to bind the admin listener to a non-loopback address.
    pub admin_allow_remote: bool,
    /// Bodies up to this size are buffered so attempts can be replayed.
    pub max_body_bytes: usize,
    /// Hard cap on request bodies (413 above it); `None` means no cap.
    pub max_request_bytes: Option<u64>,
    /// How long shutdown waits for queued and in-flight work.
    pub shutdown_grace: Duration,
    /// Accepted `user:password` pairs for `Proxy-Authorization: Basic`.
    pub proxy_auth: Vec<String>,
    /// Open client connections; beyond, new ones wait in the accept backlog.
    pub max_connections: NonZeroUsize,
    /// Request heads larger than this are answered 431.
    pub max_header_bytes: usize,
    /// A client must send its whole request head within this time.
    pub header_read_timeout: Duration,
    /// Idle keep-alive client connections are closed after this time.
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long loses its request (408).
    pub body_read_timeout: Duration,
    /// A connection whose caller takes nothing of an answer for this long is closed.
    pub send_timeout: Duration,
    /// Request bodies buffered at once, all requests together; a body that
    /// does not fit is streamed once, without retries.
    pub max_buffered_bytes: usize,
    /// Threads serving the proxy listener; `None` means one per CPU core.
    pub workers: Option<NonZeroUsize>,
}

/// `forward.unknown_hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownHosts {
    /// Answer 403 `unknown_host`.
    Deny,
    /// Forward without pacing.
    Pass,
}

/// `[forward]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Whether requests for hosts no upstream claims are refused or passed on.
    pub unknown_hosts: UnknownHosts,
    /// Let pass-through traffic reach loopback/private/link-local addresses.
    pub allow_private: bool,
}

/// `[mitm]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mitm {
    /// On by default, so `HTTPS_PROXY` traffic is paced; off when the CA
    /// could neither be found nor created ([`crate::tls::provision`]).
    pub enabled: bool,
    /// PEM certificate of the CA that signs per-host certificates (a
    /// relative path in the file is taken from the file's directory).
    pub ca_cert: PathBuf,
    /// PEM private key of that CA, found the same way.
    pub ca_key: PathBuf,
    /// Where the file names `ca_cert` and `ca_key`, for a CA that will not
    /// load, which only the TLS layer can tell.
    pub written_at: CaLocations,
}

/// Where `[mitm]`'s two paths are written ([`Location::START`] when defaulted).
#[derive(Debug, Clone, Copy)]
pub struct CaLocations {
    pub ca_cert: Location,
    pub ca_key: Location,
}

/// Where a value is written is not what the config says: two files that
/// say the same (one with a comment more) are equal configs.
impl PartialEq for CaLocations {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Default for CaLocations {
    fn default() -> Self {
        Self { ca_cert: Location::START, ca_key: Location::START }
    }
}

/// `redis.on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOnError {
    /// Fall back to the in-process limiter.
    Local,
    /// Answer 503 `rate_limit_store`.
    Deny,
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    /// Where the shared store lives: one server, a cluster, or a master
    /// found through Sentinel.
    pub nodes: RedisNodes,
    /// What pacing does while Redis cannot be reached.
    pub on_error: RedisOnError,
    /// Longest one call may take before the store counts Redis as unreachable.
    pub timeout: std::time::Duration,
    /// What every key starts with: deployments that share one Redis but
    /// not their quotas set different ones.
    pub key_prefix: String,
}

/// The three forms of `[redis]`; every URL is `redis://` or `rediss://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisNodes {
    /// `url`: one server.
    Server(String),
    /// `cluster`: seed nodes of a Redis Cluster, which tell the rest.
    Cluster(Vec<String>),
    /// `sentinels` and `master`: the sentinels that know which server is the
    /// master named `master` now. `auth`: the master's own credentials
    /// (`master_username`, `master_password`); `None` takes the first
    /// sentinel URL's.
    Sentinel { sentinels: Vec<String>, master: String, auth: Option<MasterAuth> },
}

/// What the master (and, after a failover, the promoted replica) is
/// told in `AUTH`, apart from the sentinels' own credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterAuth {
    /// An ACL user; `None` for the default user.
    pub username: Option<String>,
    /// `None`: no password (an ACL user without one, or `nopass`).
    pub password: Option<String>,
}

/// The password never reaches a log or an error message.
impl std::fmt::Debug for MasterAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let password = self.password.as_ref().map(|_| "<redacted>");
        f.debug_struct("MasterAuth").field("username", &self.username).field("password", &password).finish()
    }
}

impl RedisNodes {
    /// The form's name, as `/status` shows it.
    pub fn form(&self) -> &'static str {
        match self {
            Self::Server(_) => "server",
            Self::Cluster(_) => "cluster",
            Self::Sentinel { .. } => "sentinel",
        }
    }

    /// Every URL the form names.
    pub fn urls(&self) -> &[String] {
        match self {
            Self::Server(url) => std::slice::from_ref(url),
            Self::Cluster(seeds) => seeds,
            Self::Sentinel { sentinels, .. } => sentinels,
        }
    }
}

/// One quota: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests allowed per window; at least one.
    pub count: NonZeroU32,
    /// Length of the window; longer than zero, and at least `count` nanoseconds.
    pub per: Duration,
}

impl Rate {
    /// Requests per second this quota allows on average.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count.get()) / self.per.as_secs_f64()
    }
}

/// Where a real request goes: scheme, authority and path prefix of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseUrl {
    /// `http` or `https`, nothing else.
    pub scheme: Scheme,
    /// Host and explicit port as written (used for the `Host` header).
    pub authority: Authority,
    /// Lower-cased host without port or brackets.
    pub host: String,
    /// Port, explicit or the scheme's default.
    pub port: u16,
    /// Path prefix without a trailing slash; empty for `/`.
    pub path: String,
}

/// `retry.jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    Full,
    Equal,
    None,
}

/// `[upstream.retry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts in all, the first one included.
    pub max_attempts: NonZeroU32,
    /// Statuses worth another attempt (100..=599, no duplicates, file order).
    pub on_status: Vec<StatusCode>,
    /// First backoff; later ones double. Never longer than `max_delay`.
    pub base_delay: Duration,
    /// Cap of one backoff.
    pub max_delay: Duration,
    /// How backoffs are randomised so callers do not retry in lockstep.
    pub jitter: Jitter,
    /// Wait at least what the upstream's `Retry-After` asks for.
    pub respect_retry_after: bool,
    /// A longer `Retry-After` is not waited: the answer goes back as is.
    pub max_retry_after: Duration,
    /// Retries may add at most this share on top of first attempts.
    pub budget: f64,
}

/// What identifies a partition or a caller (`partition_by`, `fair_by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The value of this (lower-cased) request header.
    Header(http::HeaderName),
    /// The client's IP address.
    ClientIp,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `[a-z0-9_-]+`, unique: the label in metrics, logs and errors.
    pub name: String,
    /// Where attempts go, whichever way the request came in.
    pub base_url: BaseUrl,
    /// Reverse-mode path prefix (starts with `/`, no trailing slash; `"/"`
    /// alone is a catch-all and then the only route). Matches whole segments.
    pub route: Option<String>,
    /// Forward-mode hosts: lower-cased `host` or `host:port`, IPv6 in brackets
    /// (default: base_url's host, without port). An entry without a port
    /// matches the host on any port. Empty: reverse mode only.
    pub hosts: Vec<String>,
    /// Every quota is enforced; at least one.
    pub rate: Vec<Rate>,
    /// Requests that may leave back to back; 1 spaces them evenly.
    pub burst: NonZeroU32,
    /// Lower the effective rate after upstream 429s, then probe back up.
    pub adaptive: bool,
    /// In-flight attempts to this upstream.
    pub max_concurrency: NonZeroU32,
    /// Waiting requests; beyond, 503 `queue_full` at once (0: no waiting).
    pub queue_size: usize,
    /// Longest wait in the queue before 503 `queue_timeout`; longer than zero.
    pub queue_timeout: Duration,
    /// One attempt, connect to the last byte of the response head.
    pub timeout: Duration,
    /// When and how attempts are repeated.
    pub retry: Retry,
    /// Separate quotas and cooldown per distinct key (e.g. per API token).
    pub partition_by: Option<KeySource>,
    /// Bound on distinct partitions kept; beyond, 503 `too_many_partitions`.
    pub max_partitions: NonZeroUsize,
    /// Round-robin between callers with distinct keys inside the queue.
    pub fair_by: Option<KeySource>,
    /// Extra PEM root certificates trusted for this upstream only.
    pub ca_file: Option<PathBuf>,
    /// `[[upstream.limit]]`: extra quotas that only matching requests take.
    pub limits: Vec<Limit>,
    /// `[upstream.breaker]`: stop sending while the upstream fails.
    pub breaker: Option<Breaker>,
    /// `[upstream.cache]`: answers kept and shared, when enabled.
    pub cache: Option<Cache>,
    /// Token quotas of LLM calls; `None` when no token quota is set.
    pub tokens: Option<Tokens>,
}

/// The token quotas of an upstream (`tokens`, `input_tokens`,
/// `output_tokens`) and how LLM calls are charged against them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// Each configured quota, in [`TokenKind`] order; at least one.
    pub quotas: Vec<(TokenKind, Vec<Rate>)>,
    /// Output reserved for a request that names no `max_tokens`.
    pub default_max_tokens: u64,
    pub accounting: TokenAccounting,
}

/// Which tokens a token quota counts; its name is reserved for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `tokens`: input and output together (OpenAI TPM).
    Total,
    /// `input_tokens` (Anthropic ITPM).
    Input,
    /// `output_tokens` (Anthropic OTPM).
    Output,
}

impl TokenKind {
    pub const ALL: [TokenKind; 3] = [TokenKind::Total, TokenKind::Input, TokenKind::Output];

    /// The config key, and the quota's name in `/status` and Redis keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Total => "tokens",
            Self::Input => "input_tokens",
            Self::Output => "output_tokens",
        }
    }
}

/// `token_accounting`: what an answer's reported usage corrects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAccounting {
    /// The whole reservation is corrected to the usage reported.
    Usage,
    /// Only the input is; the output reservation stands (APIs that charge `max_tokens`).
    Reserved,
}

/// `[upstream.breaker]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    /// Open when this share of the window's attempts failed (0 < r <= 1)...
    pub failure_ratio: f64,
    /// ...out of at least this many.
    pub min_attempts: NonZeroU32,
    /// The sliding window outcomes are counted over.
    pub window: Duration,
    /// The first break; each reopening doubles it (with jitter)...
    pub open_for: Duration,
    /// ...up to this; never shorter than `open_for`.
    pub max_open_for: Duration,
    /// Attempts let through when half-open.
    pub probes: NonZeroU32,
    /// Statuses that count as failures (connect errors, timeouts and broken
    /// connections always do; 429 never does).
    pub on_status: Vec<StatusCode>,
}
