//! pacegate: an HTTP proxy that keeps callers inside third-party API quotas.
//!
//! # Layout
//! - [`config`]: the TOML file, parsed then validated into runtime types.
//! - [`app`]: wires listeners, the proxy runtime, admin and shutdown.
//! - [`server`]: accept loop, connection builder, graceful shutdown.
//! - [`proxy`]: the life of one request: check, route, read body, exchange;
//!   [`proxy::route`] decides the upstream, [`proxy::headers`] strips hop-by-hop.
//! - [`upstream`]: an upstream at run time: its [`upstream::dispatcher`] (queue,
//!   pacing, concurrency) and the pooled rustls [`upstream::client`].
//! - [`limit`]: the governor-based pacer.
//! - [`retry`]: what is retryable, backoff, Retry-After and rate-limit hints, budget.
//! - [`admin`]: health, metrics, status and reload endpoints.
//! - [`error`]: SPEC's error table, the one mapping from errors to answers.
//! - [`body`]: buffered (replayable) and streamed bodies.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod limit;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod upstream;
