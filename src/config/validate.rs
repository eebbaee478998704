//! Raw config -> runtime types: every rule that serde alone cannot express.
//!
//! Checks run in file order and stop at the first problem, which is reported
//! at the line and column of the value at fault. Rules between upstreams
//! (names, routes, hosts) live in `claims`.
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderName, StatusCode};
use toml::Spanned;

use super::authority::{HostPort, parse_base_url, parse_host_port};
use super::claims::{Claims, HostClaim};
use super::error::Cx;
use super::raw::{Dur, RawBreaker, RawConfig, RawRedis, RawRetry, RawServer, RawUpstream};
use super::units::format_duration;
use super::{
    Breaker, CaLocations, Config, ConfigError, Forward, KeySource, MasterAuth, Mitm, Redis, RedisNodes,
    Retry, Server, Upstream,
};

/// Smallest `max_header_bytes` that still fits ordinary API requests.
const MIN_HEADER_BYTES: usize = 1024;

/// Most worker threads: each is a runtime with its own upstream pools, so a
/// typo like 10000 would mostly cost memory and connections.
const MAX_WORKERS: usize = 1024;

/// Validates `raw`, read from `text` (needed to turn spans into line:col).
pub fn validate(path: &Path, text: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let cx = Cx::new(path, text);
    let server = server(&cx, raw.server)?;
    let forward =
        Forward { unknown_hosts: raw.forward.unknown_hosts.into(), allow_private: raw.forward.allow_private };
    let written_at = CaLocations {
        ca_cert: cx.location(raw.mitm.ca_cert.span()),
        ca_key: cx.location(raw.mitm.ca_key.span()),
    };
    if raw.mitm.ca_cert.get_ref() == raw.mitm.ca_key.get_ref() {
        let span =
            if raw.mitm.ca_key.span().is_empty() { raw.mitm.ca_cert.span() } else { raw.mitm.ca_key.span() };
        return Err(cx.err(span, "ca_cert and ca_key must be different files"));
    }
    let mitm = Mitm {
        enabled: raw.mitm.enabled,
        ca_cert: cx.beside(raw.mitm.ca_cert.into_inner()),
        ca_key: cx.beside(raw.mitm.ca_key.into_inner()),
        written_at,
    };
    let redis = raw.redis.map(|r| redis(&cx, r)).transpose()?;

    let mut claims = Claims::default();
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for raw in raw.upstreams {
        upstreams.push(upstream(&cx, &mut claims, raw)?);
    }
    Ok(Config { server, forward, mitm, redis, upstreams })
}

// === [server], [redis] ===

fn server(cx: &Cx<'_>, raw: RawServer) -> Result<Server, ConfigError> {
    let listen = socket_addr(cx, "listen", &raw.listen)?;
    let admin_listen = socket_addr(cx, "admin_listen", &raw.admin_listen)?;
    if !admin_listen.ip().is_loopback() && !raw.admin_allow_remote {
        return Err(cx.err(
            raw.admin_listen.span(),
            "admin listener must stay on loopback; \
             set server.admin_allow_remote = true to expose it",
        ));
    }
    // A wildcard address takes its port on every address (and `[::]` the
    // IPv4 ones too): on the same port, the second bind would fail.
    let wildcard = listen.ip().is_unspecified() || admin_listen.ip().is_unspecified();
    if (admin_listen == listen || wildcard) && admin_listen.port() == listen.port() && listen.port() != 0 {
        // Point at whichever of the two is actually written in the file.
        let span =
            if raw.admin_listen.span().is_empty() { raw.listen.span() } else { raw.admin_listen.span() };
        return Err(cx.err(
            span,
            "admin_listen must differ from listen (a wildcard address takes the port on every address)",
        ));
    }
    if let Some(bad) = raw.proxy_auth.iter().find(|e| !e.get_ref().contains(':')) {
        // The entry is a secret: point at it, never echo it.
        return Err(cx.err(bad.span(), "proxy_auth entries must be \"user:password\""));
    }
    let max_connections = NonZeroUsize::new(*raw.max_connections.get_ref())
        .ok_or_else(|| cx.err(raw.max_connections.span(), "max_connections must be at least 1"))?;
    let max_header_bytes = *raw.max_header_bytes.get_ref();
    if max_header_bytes < MIN_HEADER_BYTES {
        return Err(cx.err(
            raw.max_header_bytes.span(),
            format!("max_header_bytes must be at least {MIN_HEADER_BYTES}"),
        ));
    }
    let workers = *raw.workers.get_ref();
    if workers > MAX_WORKERS {
        return Err(cx.err(raw.workers.span(), format!("workers must be at most {MAX_WORKERS}")));
    }
    Ok(Server {
        listen,
        admin_listen,
        admin_allow_remote: raw.admin_allow_remote,
        max_body_bytes: raw.max_body_bytes,
        max_request_bytes: (raw.max_request_bytes > 0).then_some(raw.max_request_bytes),
        shutdown_grace: raw.shutdown_grace.0,
        proxy_auth: raw.proxy_auth.into_iter().map(Spanned::into_inner).collect(),
        max_connections,
        max_header_bytes,
        header_read_timeout: positive(cx, "header_read_timeout", &raw.header_read_timeout)?,
        idle_timeout: positive(cx, "idle_timeout", &raw.idle_timeout)?,
        body_read_timeout: positive(cx, "body_read_timeout", &raw.body_read_timeout)?,
        send_timeout: positive(cx, "send_timeout", &raw.send_timeout)?,
        max_buffered_bytes: raw.max_buffered_bytes,
        workers: NonZeroUsize::new(workers),
    })
}

/// Longest one Redis call may take when `[redis]` says nothing.
pub const DEFAULT_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// Where `[redis]` finds its servers when it names none.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

fn redis(cx: &Cx<'_>, raw: RawRedis) -> Result<Redis, ConfigError> {
    let on_error = raw.on_error.into();
    if let Some(master) = raw.master.as_ref().filter(|_| raw.sentinels.is_none()) {
        return Err(cx.err(master.span(), "master names a Sentinel master: it needs sentinels = [...]"));
    }
    let auth = [("master_username", &raw.master_username), ("master_password", &raw.master_password)];
    let stray = auth.iter().filter(|_| raw.sentinels.is_none()).find_map(|(k, v)| v.as_ref().map(|v| (k, v)));
    if let Some((key, value)) = stray {
        return Err(
            cx.err(value.span(), format!("{key} is the Sentinel master's: it needs sentinels = [...]"))
        );
    }
    let auth = (raw.master_username.is_some() || raw.master_password.is_some()).then(|| MasterAuth {
        username: raw.master_username.map(Spanned::into_inner),
        password: raw.master_password.map(Spanned::into_inner).filter(|p| !p.is_empty()),
    });
    // Exactly one form: point at the second one written.
    let mut forms = [raw.url.as_ref().map(Spanned::span), span(&raw.cluster), span(&raw.sentinels)]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    forms.sort_by_key(|span| span.start);
    if let Some(second) = forms.get(1) {
        return Err(cx.err(second.clone(), "[redis] takes one of url, cluster or sentinels"));
    }
    let nodes = match (raw.url, raw.cluster, raw.sentinels) {
        (Some(url), _, _) => RedisNodes::Server(redis_url(cx, url)?),
        (_, Some(seeds), _) => {
            let span = seeds.span();
            let seeds = redis_urls(cx, "cluster", seeds)?;
            // The client refuses seeds that disagree on credentials or database.
            if let Err(error) = redis::cluster::ClusterClient::new(seeds.clone()) {
                return Err(cx.err(span, format!("bad redis cluster: {error}")));
            }
            RedisNodes::Cluster(seeds)
        }
        (_, _, Some(sentinels)) => {
            let span = sentinels.span();
            let sentinels = redis_urls(cx, "sentinels", sentinels)?;
            let master = raw.master.map(Spanned::into_inner).filter(|m| !m.is_empty());
            let master = master.ok_or_else(|| {
                cx.err(span, "sentinels need master = \"NAME\", the name the sentinels monitor")
            })?;
            RedisNodes::Sentinel { sentinels, master, auth }
        }
        _ => RedisNodes::Server(DEFAULT_REDIS_URL.to_owned()),
    };
    let timeout = raw.timeout.map_or(Ok(DEFAULT_REDIS_TIMEOUT), |t| positive(cx, "timeout", &t))?;
    let key_prefix = match raw.key_prefix {
        None => DEFAULT_KEY_PREFIX.to_owned(),
        Some(prefix) => key_prefix(cx, prefix)?,
    };
    Ok(Redis { nodes, on_error, timeout, key_prefix })
}

/// What Redis keys start with when `[redis]` says nothing.
pub const DEFAULT_KEY_PREFIX: &str = "pacegate";

/// A key prefix: 1 to 64 letters, digits and `_ - . :`. No braces, which
/// would move keys out of their upstream's hash tag (one cluster slot per
/// upstream), and nothing a glob in `KEYS`/`SCAN` reads specially.
fn key_prefix(cx: &Cx<'_>, raw: Spanned<String>) -> Result<String, ConfigError> {
    let prefix = raw.get_ref();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:".contains(c);
    if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(allowed) {
        let message = format!("key_prefix {prefix:?}: use 1 to 64 letters, digits, '_', '-', '.' or ':'");
        return Err(cx.err(raw.span(), message));
    }
    Ok(raw.into_inner())
}

fn span<T>(value: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
    value.as_ref().map(Spanned::span)
}

/// A non-empty list of Redis URLs, all with the same scheme.
fn redis_urls(
    cx: &Cx<'_>,
    key: &str,
    raw: Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<String>, ConfigError> {
    let span = raw.span();
    let urls = raw.into_inner().into_iter().map(|url| redis_url(cx, url)).collect::<Result<Vec<_>, _>>()?;
    let Some(first) = urls.first() else {
        return Err(cx.err(span, format!("{key} needs at least one redis:// or rediss:// URL")));
    };
    let tls = |url: &str| url.starts_with("rediss://");
    if urls.iter().any(|url| tls(url) != tls(first)) {
        return Err(cx.err(span, format!("{key}: use redis:// for every URL or rediss:// for every URL")));
    }
    Ok(urls)
}

fn redis_url(cx: &Cx<'_>, raw: Spanned<String>) -> Result<String, ConfigError> {
    let url = raw.get_ref();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(cx.err(raw.span(), "redis url must start with redis:// or rediss://"));
    }
    if let Err(error) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        return Err(cx.err(raw.span(), format!("bad redis url: {error}")));
    }
    Ok(raw.into_inner())
}

fn socket_addr(cx: &Cx<'_>, key: &str, raw: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    raw.get_ref().parse().map_err(|_| {
        cx.err(
            raw.span(),
            format!("invalid {key} {:?}: expected IP:PORT like 127.0.0.1:8080 or [::1]:8080", raw.get_ref()),
        )
    })
}

/// A duration that must be longer than zero.
fn positive(cx: &Cx<'_>, key: &str, raw: &Spanned<Dur>) -> Result<Duration, ConfigError> {
    let d = raw.get_ref().0;
    if d.is_zero() {
        return Err(cx.err(raw.span(), format!("{key} must be longer than 0s")));
    }
    Ok(d)
}

// === [[upstream]] ===

fn upstream(cx: &Cx<'_>, claims: &mut Claims, raw: RawUpstream) -> Result<Upstream, ConfigError> {
    let name = claims.name(cx, &raw.name)?;
    let base_url = parse_base_url(raw.base_url.get_ref())
        .map_err(|msg| cx.err(raw.base_url.span(), format!("invalid base_url: {msg}")))?;
    let route = match &raw.route {
        Some(route) => Some(claims.route(cx, &name, route)?),
        None => None,
    };

    // Explicit hosts, or the base_url's host when the key is absent.
    let host_claims: Vec<HostClaim> = match &raw.hosts {
        Some(hosts) => {
            if hosts.get_ref().is_empty() && route.is_none() {
                return Err(cx.err(
                    hosts.span(),
                    format!(
                        "upstream {name:?} is unreachable: it has no route and hosts = []; \
                         give it a route or some hosts"
                    ),
                ));
            }
            let mut host_claims = Vec::new();
            for entry in hosts.get_ref() {
                let host = parse_host_port(entry.get_ref()).map_err(|msg| {
                    cx.err(entry.span(), format!("invalid host {:?}: {msg}", entry.get_ref()))
                })?;
                host_claims.push(HostClaim {
                    host,
                    upstream: name.clone(),
                    span: entry.span(),
                    from_base_url: false,
                });
            }
            host_claims
        }
        None => vec![HostClaim {
            host: HostPort { host: base_url.host.clone(), ipv6: base_url.host.contains(':'), port: None },
            upstream: name.clone(),
            span: raw.base_url.span(),
            from_base_url: true,
        }],
    };
    let hosts = claims.hosts(cx, host_claims)?;

    let rates = raw.rate.get_ref().0.clone();
    if rates.is_empty() {
        return Err(cx.err(raw.rate.span(), "rate needs at least one quota, like \"10/s\""));
    }
    if let Some(ca_file) = &raw.ca_file
        && base_url.scheme != Scheme::HTTPS
    {
        return Err(cx.err(ca_file.span(), "ca_file is only used with an https base_url"));
    }

    let tokens = super::limits::tokens(cx, &raw)?;
    let burst = super::limits::burst(cx, &raw.burst, &rates)?;
    Ok(Upstream {
        base_url,
        route,
        hosts,
        rate: rates,
        burst,
        adaptive: raw.adaptive,
        max_concurrency: at_least_one(cx, "max_concurrency", &raw.max_concurrency)?,
        queue_size: raw.queue_size,
        queue_timeout: positive(cx, "queue_timeout", &raw.queue_timeout)?,
        timeout: positive(cx, "timeout", &raw.timeout)?,
        retry: retry(cx, raw.retry)?,
        partition_by: raw.partition_by.as_ref().map(|s| key_source(cx, "partition_by", s)).transpose()?,
        max_partitions: NonZeroUsize::new(*raw.max_partitions.get_ref())
            .ok_or_else(|| cx.err(raw.max_partitions.span(), "max_partitions must be at least 1"))?,
        fair_by: raw.fair_by.as_ref().map(|s| key_source(cx, "fair_by", s)).transpose()?,
        ca_file: raw.ca_file.map(|file| cx.beside(file.into_inner())),
        limits: super::limits::limits(cx, raw.limits)?,
        tokens,
        breaker: raw.breaker.map(|b| breaker(cx, b)).transpose()?,
        cache: super::cache::cache(cx, raw.cache)?,
        name,
    })
}

fn at_least_one(cx: &Cx<'_>, key: &str, raw: &Spanned<u32>) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(*raw.get_ref()).ok_or_else(|| cx.err(raw.span(), format!("{key} must be at least 1")))
}

/// `"header:NAME"` or `"client_ip"`.
fn key_source(cx: &Cx<'_>, key: &str, raw: &Spanned<String>) -> Result<KeySource, ConfigError> {
    let value = raw.get_ref();
    if value == "client_ip" {
        return Ok(KeySource::ClientIp);
    }
    let header = value
        .strip_prefix("header:")
        .and_then(|name| HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok());
    header.map(KeySource::Header).ok_or_else(|| {
        cx.err(raw.span(), format!("invalid {key} {value:?}: expected \"header:NAME\" or \"client_ip\""))
    })
}

/// An `on_status` list: HTTP status codes, duplicates dropped.
fn statuses(cx: &Cx<'_>, raw: &[Spanned<u16>]) -> Result<Vec<StatusCode>, ConfigError> {
    let mut on_status = Vec::with_capacity(raw.len());
    for code in raw {
        let status = Some(*code.get_ref())
            .filter(|c| (100..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                cx.err(code.span(), format!("{} is not an HTTP status code (100-599)", code.get_ref()))
            })?;
        if !on_status.contains(&status) {
            on_status.push(status);
        }
    }
    Ok(on_status)
}

fn breaker(cx: &Cx<'_>, raw: RawBreaker) -> Result<Breaker, ConfigError> {
    let failure_ratio = *raw.failure_ratio.get_ref();
    if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
        return Err(cx.err(raw.failure_ratio.span(), "failure_ratio must be above 0 and at most 1"));
    }
    let (open_for, max_open_for) =
        (positive(cx, "open_for", &raw.open_for)?, positive(cx, "max_open_for", &raw.max_open_for)?);
    if open_for > max_open_for {
        let span =
            if raw.max_open_for.span().is_empty() { raw.open_for.span() } else { raw.max_open_for.span() };
        return Err(cx.err(
            span,
            format!(
                "open_for ({}) must not be longer than max_open_for ({})",
                format_duration(open_for),
                format_duration(max_open_for)
            ),
        ));
    }
    let on_status = statuses(cx, &raw.on_status)?;
    if let Some(code) = raw.on_status.iter().find(|c| *c.get_ref() == 429) {
        return Err(
            cx.err(code.span(), "429 is never a failure for the breaker: it is the cooldown's business")
        );
    }
    Ok(Breaker {
        failure_ratio,
        min_attempts: at_least_one(cx, "min_attempts", &raw.min_attempts)?,
        window: positive(cx, "window", &raw.window)?,
        open_for,
        max_open_for,
        probes: at_least_one(cx, "probes", &raw.probes)?,
        on_status,
    })
}

fn retry(cx: &Cx<'_>, raw: RawRetry) -> Result<Retry, ConfigError> {
    let max_attempts = at_least_one(cx, "max_attempts", &raw.max_attempts)?;
    let on_status = statuses(cx, &raw.on_status)?;
    let (base_delay, max_delay) = (raw.base_delay.get_ref().0, raw.max_delay.get_ref().0);
    if base_delay > max_delay {
        // Point at whichever of the two is actually written in the file.
        let span = if raw.max_delay.span().is_empty() { raw.base_delay.span() } else { raw.max_delay.span() };
        return Err(cx.err(
            span,
            format!(
                "base_delay ({}) must not be longer than max_delay ({})",
                format_duration(base_delay),
                format_duration(max_delay)
            ),
        ));
    }
    let budget = *raw.budget.get_ref();
    if !(budget.is_finite() && budget >= 0.0) {
        return Err(cx.err(raw.budget.span(), "budget must be a number >= 0"));
    }
    Ok(Retry {
        max_attempts,
        on_status,
        base_delay,
        max_delay,
        jitter: raw.jitter.into(),
        respect_retry_after: raw.respect_retry_after,
        max_retry_after: raw.max_retry_after.0,
        budget,
    })
}
