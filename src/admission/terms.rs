//! The terms of the admission core's calls: what a waiter is ([`Waiter`]),
//! where it queues ([`Place`]), why it is refused ([`Refusal`]), what the
//! shared limiter says ([`Verdict`]), and the bounds the config sets
//! ([`Limits`]). Kept apart from the rules in `mod.rs` so that those read
//! on their own.

use std::time::Duration;

use super::{Priority, Quotas, SINGLE, TokenQuotas};
use crate::config;

/// A queued request as the core sees it.
pub trait Waiter {
    /// The caller stopped waiting: skip it, spend nothing on it.
    fn gone(&self) -> bool;
}

/// Where a waiter queues: which quotas pace it, who it is, how urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Hashed `partition_by` value; [`SINGLE`] without `partition_by`.
    pub partition: u64,
    /// Hashed `fair_by` value; one caller (0) without `fair_by`.
    pub caller: u64,
    pub priority: Priority,
}

impl Default for Place {
    fn default() -> Self {
        Self { partition: SINGLE, caller: 0, priority: Priority::Normal }
    }
}

/// Why a caller got no ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue already holds `queue_size` callers.
    Full { retry_after: Duration },
    /// The caller's deadline passed while it waited.
    Timeout { waited: Duration, retry_after: Duration },
    /// Its partition would be new and `max_partitions` are live.
    TooManyPartitions,
    /// Redis is unreachable and `on_error = "deny"`.
    StoreDown,
    /// The request alone costs more units than endpoint limit `limit` (by
    /// index) can ever hold.
    CostExceedsQuota { limit: usize },
    /// The breaker is open and the caller cannot wait for the break to end;
    /// `retry_after`: what remains of the break.
    CircuitOpen { retry_after: Duration },
    /// pacegate is shutting down and the caller cannot leave before its
    /// grace is over; `retry_after`: until the grace is over.
    ShuttingDown { retry_after: Duration },
}

/// What the shared limiter (Redis) says about the next attempts. A wait or
/// cooldown names what it is about: an endpoint limit (by index), or the
/// partition's own quotas (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This many attempts may leave: their units of every quota were taken for each.
    Go(usize),
    /// The quotas admit nobody before this much time has passed.
    Wait(Duration, Option<usize>),
    /// The partition (or one of its limits) cools down for this much longer.
    Cooling(Duration, Option<usize>),
    /// Another replica opened the upstream's breaker for this much longer.
    Open(Duration),
    /// The replicas' half-open probes are out: ask again after this long
    /// (at most a second: a probe that succeeds clears the count).
    ProbeOut(Duration),
}

/// An upstream's bounds, as the config states them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub quotas: Quotas,
    /// `[[upstream.limit]]`, by index.
    pub endpoints: Vec<Endpoint>,
    /// `queue_size`: new waiters are refused beyond it.
    pub queue_size: usize,
    /// `max_concurrency`: grants out at once.
    pub max_concurrency: usize,
    /// `max_partitions`: live partitions at once.
    pub max_partitions: usize,
    /// Which of `endpoints` are token quotas (the last ones).
    pub tokens: TokenQuotas,
    /// `[upstream.breaker]`, if any.
    pub breaker: Option<config::Breaker>,
}

/// One endpoint limit's quotas, in units.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub quotas: Quotas,
    /// Most units one request may cost: the smallest count of its quotas.
    pub capacity: u32,
}

impl Endpoint {
    pub fn of(limit: &config::Limit) -> Self {
        Self {
            name: limit.name.clone(),
            quotas: Quotas { rate: limit.rate.clone(), burst: limit.burst, adaptive: false, settles: false },
            capacity: capacity(&limit.rate),
        }
    }

    /// A token quota: paced evenly by tokens (burst 1), never adaptive,
    /// settled once answers say what was used.
    pub fn tokens(kind: config::TokenKind, rate: &[config::Rate]) -> Self {
        let burst = std::num::NonZeroU32::MIN;
        Self {
            name: kind.name().to_string(),
            quotas: Quotas { rate: rate.to_vec(), burst, adaptive: false, settles: true },
            capacity: capacity(rate),
        }
    }
}

/// Most units one request may cost: the smallest count of the quotas.
fn capacity(rate: &[config::Rate]) -> u32 {
    rate.iter().map(|r| r.count.get()).min().unwrap_or(u32::MAX)
}

impl Limits {
    pub fn of(upstream: &config::Upstream) -> Self {
        Self {
            quotas: Quotas::of(upstream),
            endpoints: upstream
                .limits
                .iter()
                .map(Endpoint::of)
                .chain(
                    upstream
                        .tokens
                        .iter()
                        .flat_map(|t| &t.quotas)
                        .map(|(kind, rate)| Endpoint::tokens(*kind, rate)),
                )
                .collect(),
            breaker: upstream.breaker.clone(),
            queue_size: upstream.queue_size,
            max_concurrency: upstream.max_concurrency.get() as usize,
            max_partitions: upstream.max_partitions.get(),
            tokens: TokenQuotas::of(upstream),
        }
    }
}
