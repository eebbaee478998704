//! serde structs mirroring `pacegate.toml`, defaults included.
//!
//! Every table denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. Durations and rates are parsed while
//! deserializing (see [`Dur`] and [`Rates`]), which lets toml point at the bad
//! value itself. Values that cross-field checks in `validate` must point at
//! are kept as `toml::Spanned`; a default value carries an empty span at the
//! start of the file. What each key means is documented once, on the runtime
//! types in `config` and in the shipped `config/pacegate.toml`; the comments
//! here only say why a field has the shape it has.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

use super::cache::RawCache;
use super::units::{parse_duration, parse_rate};
use super::{ConfigError, Jitter, Rate, RedisOnError, TokenAccounting, UnknownHosts};

/// Parses config text into the raw structs; `path` only names the file in errors.
pub fn from_str(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let message = without_values(&one_line(err.message()));
        ConfigError::at(path, text, err.span().unwrap_or(0..0), message)
    })
}

/// serde's type errors quote the value they found (`invalid type: string
/// "alice:s3cret", expected a sequence`, `invalid type: integer `98765432`,
/// expected a string`); that value may be a password or a Redis URL with
/// one, and the error is logged and shown. The position already says which
/// value is meant, so every quoted value is dropped. Field names, which serde
/// also quotes (`unknown field `lisen``), stay.
fn without_values(message: &str) -> String {
    /// How serde names a value it found, what stands in for it, and the
    /// quote that ends it.
    const QUOTED: [(&str, &str, char); 4] = [
        ("string \"", "a string", '"'),
        ("integer `", "an integer", '`'),
        ("floating point `", "a number", '`'),
        ("character `", "a character", '`'),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let found =
            QUOTED.iter().filter_map(|&(open, name, close)| Some((rest.find(open)?, open, name, close)));
        let Some((start, open, name, close)) = found.min_by_key(|&(start, ..)| start) else { break };
        out.push_str(&rest[..start]);
        out.push_str(name);
        let value = &rest[start + open.len()..];
        // A string is Debug-escaped: it ends at the first quote not escaped.
        let mut escaped = false;
        let end = value.char_indices().find_map(|(i, c)| match c {
            '\\' if !escaped => {
                escaped = true;
                None
            }
            c if c == close && !escaped => Some(i + 1),
            _ => {
                escaped = false;
                None
            }
        });
        rest = end.map_or("", |end| &value[end..]);
    }
    out.push_str(rest);
    out
}

/// toml messages are single sentences, but keep the promise of one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub forward: RawForward,
    #[serde(default)]
    pub mitm: RawMitm,
    /// Present only when the `[redis]` table is.
    pub redis: Option<RawRedis>,
    /// `[[upstream]]` tables, in file order.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Spanned: a bad socket address is reported where it is written.
    pub listen: Spanned<String>,
    /// Spanned: also the target of the loopback rule.
    pub admin_listen: Spanned<String>,
    pub admin_allow_remote: bool,
    pub max_body_bytes: usize,
    /// 0 means no cap.
    pub max_request_bytes: u64,
    pub shutdown_grace: Dur,
    /// Spanned entries: a malformed one is pointed at without echoing it.
    pub proxy_auth: Vec<Spanned<String>>,
    pub max_connections: Spanned<usize>,
    pub max_header_bytes: Spanned<usize>,
    pub header_read_timeout: Spanned<Dur>,
    pub idle_timeout: Spanned<Dur>,
    pub body_read_timeout: Spanned<Dur>,
    pub send_timeout: Spanned<Dur>,
    pub max_buffered_bytes: usize,
    /// 0 means one per CPU core.
    pub workers: Spanned<usize>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: unspanned("127.0.0.1:8080".to_owned()),
            admin_listen: unspanned("127.0.0.1:9090".to_owned()),
            admin_allow_remote: false,
            max_body_bytes: 10_485_760,
            max_request_bytes: 0,
            shutdown_grace: Dur::secs(30),
            proxy_auth: Vec::new(),
            max_connections: unspanned(10_000),
            max_header_bytes: unspanned(65_536),
            header_read_timeout: unspanned(Dur::secs(10)),
            idle_timeout: unspanned(Dur::secs(60)),
            body_read_timeout: unspanned(Dur::secs(30)),
            send_timeout: unspanned(Dur::secs(60)),
            max_buffered_bytes: 268_435_456,
            workers: unspanned(0),
        }
    }
}

/// `[forward]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawForward {
    pub unknown_hosts: RawUnknownHosts,
    pub allow_private: bool,
}

impl Default for RawForward {
    fn default() -> Self {
        Self { unknown_hosts: RawUnknownHosts::Deny, allow_private: false }
    }
}

/// `[mitm]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMitm {
    pub enabled: bool,
    /// Spanned, both: a CA that will not load is reported where it is named.
    pub ca_cert: Spanned<PathBuf>,
    pub ca_key: Spanned<PathBuf>,
}

impl Default for RawMitm {
    fn default() -> Self {
        Self {
            enabled: true,
            ca_cert: Spanned::new(0..0, PathBuf::from("ca.pem")),
            ca_key: Spanned::new(0..0, PathBuf::from("ca-key.pem")),
        }
    }
}

/// `[redis]`. The three ways to name the servers stay optional here, so
/// that `validate` can require exactly one and point at the one too many.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// Spanned: the scheme is checked in `validate`.
    pub url: Option<Spanned<String>>,
    /// Spanned, each seed too: `validate` points at the list or at one URL.
    pub cluster: Option<Spanned<Vec<Spanned<String>>>>,
    pub sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    /// Spanned: it is an error without `sentinels`.
    pub master: Option<Spanned<String>>,
    /// The master's own `AUTH` (Spanned: an error without `sentinels`).
    pub master_username: Option<Spanned<String>>,
    pub master_password: Option<Spanned<String>>,
    pub on_error: RawRedisOnError,
    /// Spanned: `validate` refuses 0s there.
    pub timeout: Option<Spanned<Dur>>,
    /// Spanned: `validate` checks its characters.
    pub key_prefix: Option<Spanned<String>>,
}

/// One `[[upstream]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Spanned<String>,
    pub base_url: Spanned<String>,
    pub route: Option<Spanned<String>>,
    /// `None`: the base_url's host; `Some([])`: reverse mode only.
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub rate: Spanned<Rates>,
    #[serde(default = "one")]
    pub burst: Spanned<u32>,
    #[serde(default = "yes")]
    pub adaptive: bool,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: Spanned<u32>,
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: Spanned<Dur>,
    #[serde(default = "default_timeout")]
    pub timeout: Spanned<Dur>,
    #[serde(default)]
    pub retry: RawRetry,
    pub partition_by: Option<Spanned<String>>,
    #[serde(default = "default_max_partitions")]
    pub max_partitions: Spanned<usize>,
    pub fair_by: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    /// `[[upstream.limit]]` tables.
    #[serde(default, rename = "limit")]
    pub limits: Vec<RawLimit>,
    /// Token quotas: spanned, so that an empty list is pointed at.
    pub tokens: Option<Spanned<Rates>>,
    pub input_tokens: Option<Spanned<Rates>>,
    pub output_tokens: Option<Spanned<Rates>>,
    /// Optional rather than defaulted: setting it without a token quota is an error.
    pub default_max_tokens: Option<Spanned<u64>>,
    pub token_accounting: Option<Spanned<RawTokenAccounting>>,
    pub breaker: Option<RawBreaker>,
    pub cache: Option<RawCache>,
}

/// `[upstream.breaker]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreaker {
    pub failure_ratio: Spanned<f64>,
    pub min_attempts: Spanned<u32>,
    pub window: Spanned<Dur>,
    /// Spanned, like `max_open_for`: the two are compared.
    pub open_for: Spanned<Dur>,
    pub max_open_for: Spanned<Dur>,
    pub probes: Spanned<u32>,
    pub on_status: Vec<Spanned<u16>>,
}

impl Default for RawBreaker {
    fn default() -> Self {
        Self {
            failure_ratio: unspanned(0.5),
            min_attempts: unspanned(20),
            window: unspanned(Dur::secs(10)),
            open_for: unspanned(Dur::secs(5)),
            max_open_for: unspanned(Dur::secs(60)),
            probes: unspanned(1),
            on_status: [500, 502, 503, 504].into_iter().map(unspanned).collect(),
        }
    }
}

/// One `[[upstream.limit]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub name: Spanned<String>,
    /// Spanned: an empty list is refused where it is.
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub paths: Option<Spanned<Vec<Spanned<String>>>>,
    pub rate: Spanned<Rates>,
    /// A number or a table by method: read as a value, checked in `limits`.
    pub cost: Option<Spanned<toml::Value>>,
    #[serde(default = "one")]
    pub burst: Spanned<u32>,
}

/// `[upstream.retry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    pub max_attempts: Spanned<u32>,
    pub on_status: Vec<Spanned<u16>>,
    /// Spanned, like `max_delay`: the two are compared.
    pub base_delay: Spanned<Dur>,
    pub max_delay: Spanned<Dur>,
    pub jitter: RawJitter,
    pub respect_retry_after: bool,
    pub max_retry_after: Dur,
    pub budget: Spanned<f64>,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: unspanned(5),
            on_status: [429, 502, 503, 504].into_iter().map(unspanned).collect(),
            base_delay: unspanned(Dur(Duration::from_millis(250))),
            max_delay: unspanned(Dur::secs(30)),
            jitter: RawJitter::Full,
            respect_retry_after: true,
            max_retry_after: Dur::secs(120),
            budget: unspanned(0.2),
        }
    }
}

/// A default value: it has no place in the file, so errors point at 1:1.
fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

fn one() -> Spanned<u32> {
    unspanned(1)
}

fn yes() -> bool {
    true
}

fn default_max_concurrency() -> Spanned<u32> {
    unspanned(32)
}

fn default_queue_size() -> usize {
    1_000
}

fn default_queue_timeout() -> Spanned<Dur> {
    unspanned(Dur::secs(60))
}

fn default_timeout() -> Spanned<Dur> {
    unspanned(Dur::secs(30))
}

fn default_max_partitions() -> Spanned<usize> {
    unspanned(10_000)
}

// === impl Dur ===

/// A duration string (`"250ms"`), parsed by [`parse_duration`] during
/// deserialization so that a bad one is reported at its own line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;

        impl Visitor<'_> for DurVisitor {
            type Value = Dur;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string like \"250ms\", \"30s\" or \"5m\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(DurVisitor)
    }
}

// === impl Rates ===

/// `rate = "10/s"` or `rate = ["10/s", "5000/h"]`; each string is parsed by
/// [`parse_rate`] while deserializing, so a bad one is reported where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates(pub Vec<Rate>);

/// One rate string; a separate type so that each array element gets its own span.
struct OneRate(Rate);

impl<'de> Deserialize<'de> for OneRate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;

        impl Visitor<'_> for RateVisitor {
            type Value = OneRate;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a rate string like \"10/s\" or \"5000/h\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<OneRate, E> {
                parse_rate(s).map(OneRate).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(RateVisitor)
    }
}

impl<'de> Deserialize<'de> for Rates {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RatesVisitor;

        impl<'de> Visitor<'de> for RatesVisitor {
            type Value = Rates;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a rate like \"10/s\" or an array of them like [\"10/s\", \"5000/h\"]")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Rates, E> {
                parse_rate(s).map(|rate| Rates(vec![rate])).map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rates, A::Error> {
                let mut rates = Vec::new();
                while let Some(OneRate(rate)) = seq.next_element()? {
                    rates.push(rate);
                }
                Ok(Rates(rates))
            }
        }

        deserializer.deserialize_any(RatesVisitor)
    }
}

// === keyword enums ===

// Mirrors of the runtime enums, so that serde stays in this module; serde's
// "unknown variant" message lists the accepted words.

/// `forward.unknown_hosts`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawUnknownHosts {
    Deny,
    Pass,
}

impl From<RawUnknownHosts> for UnknownHosts {
    fn from(raw: RawUnknownHosts) -> Self {
        match raw {
            RawUnknownHosts::Deny => Self::Deny,
            RawUnknownHosts::Pass => Self::Pass,
        }
    }
}

/// `redis.on_error`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawRedisOnError {
    #[default]
    Local,
    Deny,
}

impl From<RawRedisOnError> for RedisOnError {
    fn from(raw: RawRedisOnError) -> Self {
        match raw {
            RawRedisOnError::Local => Self::Local,
            RawRedisOnError::Deny => Self::Deny,
        }
    }
}

/// `token_accounting`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawTokenAccounting {
    Usage,
    Reserved,
}

impl From<RawTokenAccounting> for TokenAccounting {
    fn from(raw: RawTokenAccounting) -> Self {
        match raw {
            RawTokenAccounting::Usage => Self::Usage,
            RawTokenAccounting::Reserved => Self::Reserved,
        }
    }
}

/// `retry.jitter`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawJitter {
    Full,
    Equal,
    None,
}

impl From<RawJitter> for Jitter {
    fn from(raw: RawJitter) -> Self {
        match raw {
            RawJitter::Full => Self::Full,
            RawJitter::Equal => Self::Equal,
            RawJitter::None => Self::None,
        }
    }
}
