//! Configuration: the validated, runtime view of `pacegate.toml`.
//!
//! Loading happens in two stages, in the spirit of sozu's config: `raw` holds
//! the serde structs (unknown keys rejected, spans kept), `validate` turns them
//! into the types below. The rest of the crate only ever sees these types:
//! durations are `Duration`, rates are parsed, URLs are split, counts are
//! non-zero where zero would make no sense.

mod error;
mod raw;
mod units;
mod validate;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use http::uri::{Authority, Scheme};

pub use error::ConfigError;
pub use units::{parse_duration, parse_rate};

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
    pub unknown_hosts: UnknownHosts,
    /// Let pass-through traffic reach loopback/private/link-local addresses.
    pub allow_private: bool,
}

/// `[mitm]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mitm {
    pub enabled: bool,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
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
    pub url: String,
    pub on_error: RedisOnError,
}

/// One quota: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: NonZeroU32,
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
    pub on_status: Vec<StatusCode>,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub jitter: Jitter,
    pub respect_retry_after: bool,
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
    pub name: String,
    pub base_url: BaseUrl,
    /// Reverse-mode path prefix (starts with `/`, no trailing slash).
    pub route: Option<String>,
    /// Forward-mode hosts: lower-cased `host` or `host:port` (default: base_url's host).
    pub hosts: Vec<String>,
    /// Every quota is enforced; at least one.
    pub rate: Vec<Rate>,
    pub burst: NonZeroU32,
    pub adaptive: bool,
    pub max_concurrency: NonZeroU32,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    /// One attempt, connect to the last byte of the response head.
    pub timeout: Duration,
    pub retry: Retry,
    pub partition_by: Option<KeySource>,
    pub max_partitions: NonZeroUsize,
    pub fair_by: Option<KeySource>,
    /// Extra PEM root certificates trusted for this upstream only.
    pub ca_file: Option<PathBuf>,
}
