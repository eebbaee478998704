//! What is retryable: one attempt's outcome in, a decision out.
//!
//! The question is never "did it fail?" but "can sending it again do harm?".
//! Two outcomes are safe for every method because the upstream did not act on
//! the request: a connect/TLS failure (nothing was sent) and a 429 (the server
//! says it refused the work). Everything else that went wrong after the
//! request left — a 5xx, a timeout, a connection broken mid-answer — may have
//! had its effect already, so it is only replayed when replaying is harmless:
//! an idempotent method (RFC 9110 §9.2.2) or an `Idempotency-Key` the upstream
//! uses to deduplicate. A status is only ever retried when the operator listed
//! it in `on_status`; a success never is, whatever the list says.
//!
//! Counting attempts (`max_attempts`), the budget and `max_retry_after` are the
//! caller's business: this module answers one question and stays pure.

use http::{HeaderMap, HeaderName, Method, StatusCode};

use crate::config::Retry;

/// Request header that makes a non-idempotent request safe to replay.
/// A `HeaderName`, not a `&str`: a lookup by `&str` parses the name first.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status (the head was received).
    Status(StatusCode),
    /// Connect or TLS handshake failed: the request never left.
    ConnectFailed,
    /// The attempt timed out after the request may have been sent.
    TimedOut,
    /// The connection broke after the request was (partly) sent.
    BrokenAfterSend,
    /// An answer came that cannot be read (its head too large): it would be
    /// the same again.
    Unreadable,
}

/// Why an attempt is retried; its [`RetryReason::as_str`] is the `reason`
/// label of `pacegate_retries_total` and the `reason` field of the `retry` log.
///
/// Statuses are grouped rather than labelled one by one so the label set stays
/// fixed and small whatever `on_status` holds; the exact status goes in the
/// log's separate `status` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// `429 Too Many Requests`.
    Status429,
    /// Any 5xx listed in `on_status`.
    Status5xx,
    /// Any other listed status (e.g. 408, 425).
    StatusOther,
    /// Connect or TLS failure.
    Connect,
    /// The attempt timed out.
    Timeout,
    /// The connection broke after sending.
    Broken,
}

impl RetryReason {
    /// Every reason, for pre-registering metric label values.
    pub const ALL: [RetryReason; 6] = [
        RetryReason::Status429,
        RetryReason::Status5xx,
        RetryReason::StatusOther,
        RetryReason::Connect,
        RetryReason::Timeout,
        RetryReason::Broken,
    ];

    /// Stable snake_case name (metrics label, log field).
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Status429 => "status_429",
            RetryReason::Status5xx => "status_5xx",
            RetryReason::StatusOther => "status_other",
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::Broken => "broken",
        }
    }
}

impl std::fmt::Display for RetryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Replaying is allowed; the caller still checks attempts and budget.
    Retry(RetryReason),
    /// The answer (or error) goes back to the caller as it is.
    GiveUp,
}

/// Whether the request carries `Idempotency-Key` (any value, even empty: the
/// caller asked for deduplication and the upstream decides what it accepts).
pub fn has_idempotency_key(headers: &HeaderMap) -> bool {
    headers.contains_key(IDEMPOTENCY_KEY)
}

/// Decides whether an attempt that ended in `outcome` may be retried.
///
/// `has_idempotency_key` is [`has_idempotency_key`] of the original request
/// (it need not be asked of an idempotent method: that is replay-safe anyway).
/// Attempts left, budget and `max_retry_after` are checked by the caller.
pub fn classify(cfg: &Retry, method: &Method, has_idempotency_key: bool, outcome: &Outcome) -> Decision {
    // Replaying is harmless when the method says so or the upstream dedupes.
    let replay_safe = method.is_idempotent() || has_idempotency_key;
    match *outcome {
        Outcome::ConnectFailed => Decision::Retry(RetryReason::Connect),
        Outcome::TimedOut if replay_safe => Decision::Retry(RetryReason::Timeout),
        Outcome::BrokenAfterSend if replay_safe => Decision::Retry(RetryReason::Broken),
        Outcome::TimedOut | Outcome::BrokenAfterSend | Outcome::Unreadable => Decision::GiveUp,
        Outcome::Status(status) => classify_status(cfg, replay_safe, status),
    }
}

fn classify_status(cfg: &Retry, replay_safe: bool, status: StatusCode) -> Decision {
    if status.is_success() || !cfg.on_status.contains(&status) {
        return Decision::GiveUp;
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Decision::Retry(RetryReason::Status429);
    }
    if !replay_safe {
        return Decision::GiveUp;
    }
    if status.is_server_error() {
        Decision::Retry(RetryReason::Status5xx)
    } else {
        Decision::Retry(RetryReason::StatusOther)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Jitter;
    use crate::retry::test_support::retry_config;

    fn cfg(on_status: &[u16]) -> Retry {
        let mut cfg = retry_config(Duration::from_millis(250), Duration::from_secs(30), Jitter::Full);
        cfg.on_status =
            on_status.iter().map(|&s| StatusCode::from_u16(s).expect("valid test status")).collect();
        cfg
    }

    fn status(s: u16) -> Outcome {
        Outcome::Status(StatusCode::from_u16(s).expect("valid test status"))
    }

    const DEFAULT: &[u16] = &[429, 502, 503, 504];

    #[test]
    fn status_429_is_retried_for_any_method() {
        let c = cfg(DEFAULT);
        for m in [Method::POST, Method::PATCH, Method::GET] {
            assert_eq!(classify(&c, &m, false, &status(429)), Decision::Retry(RetryReason::Status429));
        }
    }

    #[test]
    fn status_429_not_listed_is_not_retried() {
        let c = cfg(&[503]);
        assert_eq!(classify(&c, &Method::GET, false, &status(429)), Decision::GiveUp);
    }

    #[test]
    fn connect_failure_is_retried_for_any_method() {
        let c = cfg(&[]);
        assert_eq!(
            classify(&c, &Method::POST, false, &Outcome::ConnectFailed),
            Decision::Retry(RetryReason::Connect)
        );
    }

    #[test]
    fn listed_5xx_needs_idempotency() {
        let c = cfg(DEFAULT);
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE] {
            assert_eq!(classify(&c, &m, false, &status(503)), Decision::Retry(RetryReason::Status5xx), "{m}");
        }
        assert_eq!(classify(&c, &Method::POST, false, &status(503)), Decision::GiveUp);
        assert_eq!(classify(&c, &Method::PATCH, false, &status(502)), Decision::GiveUp);
        assert_eq!(classify(&c, &Method::POST, true, &status(503)), Decision::Retry(RetryReason::Status5xx));
    }

    #[test]
    fn unlisted_status_is_never_retried() {
        let c = cfg(DEFAULT);
        for s in [500, 501, 400, 404, 408] {
            assert_eq!(classify(&c, &Method::GET, true, &status(s)), Decision::GiveUp, "{s}");
        }
    }

    #[test]
    fn listed_non_5xx_is_status_other() {
        let c = cfg(&[408]);
        assert_eq!(
            classify(&c, &Method::GET, false, &status(408)),
            Decision::Retry(RetryReason::StatusOther)
        );
        assert_eq!(classify(&c, &Method::POST, false, &status(408)), Decision::GiveUp);
    }

    #[test]
    fn success_is_never_retried_even_if_listed() {
        let c = cfg(&[200, 204]);
        assert_eq!(classify(&c, &Method::GET, true, &status(200)), Decision::GiveUp);
        assert_eq!(classify(&c, &Method::GET, true, &status(204)), Decision::GiveUp);
    }

    #[test]
    fn timeout_and_broken_need_idempotency() {
        let c = cfg(DEFAULT);
        let cases =
            [(Outcome::TimedOut, RetryReason::Timeout), (Outcome::BrokenAfterSend, RetryReason::Broken)];
        for (outcome, reason) in cases {
            assert_eq!(classify(&c, &Method::GET, false, &outcome), Decision::Retry(reason));
            assert_eq!(classify(&c, &Method::POST, true, &outcome), Decision::Retry(reason));
            assert_eq!(classify(&c, &Method::POST, false, &outcome), Decision::GiveUp);
        }
    }

    #[test]
    fn idempotency_key_header_is_detected() {
        let mut h = HeaderMap::new();
        assert!(!has_idempotency_key(&h));
        h.insert("Idempotency-Key", http::HeaderValue::from_static("abc"));
        assert!(has_idempotency_key(&h));
    }

    #[test]
    fn labels_are_stable_and_distinct() {
        let labels: Vec<_> = RetryReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, ["status_429", "status_5xx", "status_other", "connect", "timeout", "broken"]);
        assert_eq!(RetryReason::Connect.to_string(), "connect");
    }
}
