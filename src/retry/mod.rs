//! Retries: what may be retried, how long to wait, how many the upstream can
//! take, and what the upstream says about its limits.
//!
//! Everything here is pure and synchronous — no I/O, no clock reads, no
//! global randomness — so the dispatcher owns the side effects (sleeping,
//! re-queueing at the head, metrics, logs) and each rule is tested alone:
//!
//! - [`policy`]: whether an outcome may be replayed (the documented method rules),
//!   with the `reason` label of `pacegate_retries_total`.
//! - [`backoff`]: exponential delay with jitter, floored by `Retry-After`.
//! - [`hints`]: `Retry-After`, `retry-after-ms` and rate-limit headers.
//! - [`budget`]: retries as a share of first attempts over a sliding window.
//!
//! The caller's loop, per attempt: [`classify`]; if `Retry`, check attempts
//! left (`max_attempts`), then [`retry_after_too_long`] on the hint, then
//! [`RetryBudget::try_withdraw`]; any "no" returns the answer as it came.
//! Otherwise wait [`delay`] and re-queue.

pub mod backoff;
pub mod budget;
pub mod hints;
pub(crate) mod parse;
pub mod policy;

#[cfg(test)]
mod test_support;

pub use backoff::{HINT_SPREAD_CAP, delay, exponential, retry_after_too_long};
pub use budget::{DEFAULT_MIN_RETRIES_PER_SEC, DEFAULT_WINDOW, RetryBudget};
pub use hints::{HintPace, RateLimitHint, Refill, rate_limit, retry_after};
pub use policy::{Decision, IDEMPOTENCY_KEY, Outcome, RetryReason, classify, has_idempotency_key};
