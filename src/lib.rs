//! pacegate: an HTTP proxy that keeps callers inside third-party API quotas.
#![forbid(unsafe_code)]

pub mod config;
pub mod retry;
