//! pacegate: an HTTP proxy that keeps callers inside third-party API quotas.
//!
//! # Layout
//! - [`config`]: the TOML file, parsed then validated into runtime types.
//! - [`app`]: wires listeners, the proxy runtime, admin, reloads and shutdown.
//! - [`runtime`]: a config generation, and what a reload carries over.
//! - [`reload`]: reload triggers (SIGHUP, the file on disk).
//! - [`server`]: client connections: accept loop, slots, request heads checked
//!   before hyper, header and idle timeouts, panics caught, graceful shutdown,
//!   CONNECT relays.
//! - [`proxy`]: the life of one request: check, route, read body, exchange;
//!   [`route`] decides the upstream.
//! - [`headers`]: hop-by-hop and pacegate's own headers, stripped both ways.
//! - [`upstream`]: an upstream at run time: its [`upstream::dispatcher`] (queue,
//!   pacing, concurrency; per-key partitions with their own quotas and
//!   cooldown), [`upstream::schedule`] (round-robin between callers, priority
//!   lanes) and the pooled rustls [`upstream::client`].
//! - [`limit`]: the governor-based pacer.
//! - [`store`]: quotas and cooldowns shared by replicas through Redis.
//! - [`retry`]: what is retryable, backoff, Retry-After and rate-limit hints, budget.
//! - [`admin`]: health, metrics, status and reload endpoints; [`metrics`] the
//!   Prometheus series SPEC names.
//! - [`error`]: SPEC's error table, the one mapping from errors to answers.
//! - [`body`]: buffered (replayable) and streamed bodies.
//! - [`tls`]: the local CA and interception of CONNECT tunnels;
//!   [`proxy::connect`] decides intercept, tunnel or refuse, [`upstream::guard`]
//!   keeps pass-through traffic off private addresses.
//! - [`fuzz`]: entry points for `fuzz/` (cargo-fuzz) and its smoke test.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod fuzz;
pub mod headers;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod workers;
