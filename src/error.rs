//! The errors pacegate answers itself, and their one mapping to HTTP.
//!
//! The error table (docs/http.md) lives here and only here: every other module returns a
//! [`ProxyError`] and lets [`ProxyError::into_response`] pick the status, the
//! `x-pacegate-error` code and the JSON body. Four rows go beyond the table users see documented first:
//! 408 `body_timeout` (a body that stopped arriving, nginx's answer to its
//! `client_body_timeout`), 414 `uri_too_long` (RFC 9112 §3 requires 414 for
//! a request target longer than we parse), 501 `not_implemented` (RFC 9112
//! §6.1: a transfer coding other than chunked) and 500 `internal_error` (a
//! request task panicked).

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};

/// Header naming the error code on every answer pacegate makes itself.
pub const ERROR_HEADER: &str = "x-pacegate-error";

/// Why pacegate refused to queue or send a request, one name for every place
/// that shows it: the `x-pacegate-error` code of the 503 (see
/// [`ProxyError::code`]), the `reason` label of `pacegate_rejected_total`, the
/// keys of `/status` `rejections` and the `reason` field of the log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The upstream's queue holds `queue_size` requests already.
    QueueFull,
    /// The request waited `queue_timeout` (or its own `x-pacegate-max-wait`).
    QueueTimeout,
    /// Redis is unreachable and `on_error = "deny"`.
    RateLimitStore,
    /// The upstream keeps `max_partitions` partitions already.
    TooManyPartitions,
    /// The request alone costs more than an endpoint limit can ever hold (413).
    CostExceedsQuota,
    /// pacegate is stopping and cannot serve the request within `shutdown_grace`.
    ShuttingDown,
    /// The upstream's breaker is open and the request cannot wait for it.
    CircuitOpen,
}

impl RefusalReason {
    /// Every reason, so that each has its series and `/status` key from the start.
    pub const ALL: [Self; 7] = [
        Self::QueueFull,
        Self::QueueTimeout,
        Self::RateLimitStore,
        Self::TooManyPartitions,
        Self::CostExceedsQuota,
        Self::ShuttingDown,
        Self::CircuitOpen,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
            Self::RateLimitStore => "rate_limit_store",
            Self::TooManyPartitions => "too_many_partitions",
            Self::CostExceedsQuota => "cost_exceeds_quota",
            Self::ShuttingDown => "shutting_down",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

/// A request pacegate answers itself instead of with an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("host {host} is not configured as an upstream")]
    UnknownHost { host: String },
    #[error("{host} resolves to a guarded address")]
    ForbiddenAddress { host: String },
    #[error("no upstream route matches {path}")]
    NoRoute { path: String },
    #[error("proxy authentication required")]
    ProxyAuthRequired,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { upstream: Option<String>, limit: u64 },
    #[error("no byte of the request body arrived for {timeout:?}")]
    BodyTimeout { upstream: Option<String>, timeout: Duration },
    #[error("request headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("more than {limit} request header lines")]
    TooManyHeaders { limit: usize },
    #[error("the request line is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("cannot reach the upstream: {reason}")]
    UpstreamUnreachable { upstream: Option<String>, reason: String },
    #[error("the queue of this upstream is full")]
    QueueFull { upstream: String, retry_after: Duration },
    #[error("waited {waited:?} in the queue")]
    QueueTimeout { upstream: String, waited: Duration, retry_after: Duration },
    #[error("the shared rate-limit store is unreachable")]
    RateLimitStore { upstream: String },
    #[error("too many partitions for this upstream")]
    TooManyPartitions { upstream: String },
    #[error("the request costs {cost} units of limit {limit}, which holds at most {capacity}")]
    CostExceedsQuota { upstream: String, limit: String, cost: u32, capacity: u32 },
    #[error("pacegate is shutting down and cannot serve this request in time")]
    ShuttingDown { upstream: String, retry_after: Duration },
    #[error("the upstream's circuit breaker is open and the request cannot wait for it")]
    CircuitOpen { upstream: String, retry_after: Duration },
    #[error("the upstream did not answer within {timeout:?}")]
    UpstreamTimeout { upstream: Option<String>, timeout: Duration },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// Whether the answer must close an HTTP/1 connection: the request was
    /// refused before it was read whole (bad target or headers, 413, 431,
    /// a body that stopped), so what follows it on the wire cannot be told
    /// apart from the next request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::BadRequest(_)
                | Self::NotImplemented(_)
                | Self::BodyTooLarge { .. }
                | Self::BodyTimeout { .. }
                | Self::HeadersTooLarge { .. }
                | Self::TooManyHeaders { .. }
                | Self::UriTooLong { .. }
        )
    }

    /// The HTTP status of the error table.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownHost { .. } | Self::ForbiddenAddress { .. } => StatusCode::FORBIDDEN,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::BodyTooLarge { .. } | Self::CostExceedsQuota { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::QueueFull { .. }
            | Self::QueueTimeout { .. }
            | Self::RateLimitStore { .. }
            | Self::TooManyPartitions { .. }
            | Self::ShuttingDown { .. }
            | Self::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `x-pacegate-error` code of the error table.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::UnknownHost { .. } => "unknown_host",
            Self::ForbiddenAddress { .. } => "forbidden_address",
            Self::NoRoute { .. } => "no_route",
            Self::ProxyAuthRequired => "proxy_auth_required",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders { .. } => "headers_too_large",
            Self::UriTooLong { .. } => "uri_too_long",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::QueueFull { .. } => RefusalReason::QueueFull.as_str(),
            Self::QueueTimeout { .. } => RefusalReason::QueueTimeout.as_str(),
            Self::RateLimitStore { .. } => RefusalReason::RateLimitStore.as_str(),
            Self::TooManyPartitions { .. } => RefusalReason::TooManyPartitions.as_str(),
            Self::CostExceedsQuota { .. } => RefusalReason::CostExceedsQuota.as_str(),
            Self::ShuttingDown { .. } => RefusalReason::ShuttingDown.as_str(),
            Self::CircuitOpen { .. } => RefusalReason::CircuitOpen.as_str(),
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::NotImplemented(_) => "not_implemented",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The upstream the error is about, when there is one.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Self::QueueFull { upstream, .. }
            | Self::QueueTimeout { upstream, .. }
            | Self::RateLimitStore { upstream }
            | Self::TooManyPartitions { upstream }
            | Self::CostExceedsQuota { upstream, .. }
            | Self::ShuttingDown { upstream, .. }
            | Self::CircuitOpen { upstream, .. } => Some(upstream),
            Self::BodyTooLarge { upstream, .. }
            | Self::BodyTimeout { upstream, .. }
            | Self::UpstreamUnreachable { upstream, .. }
            | Self::UpstreamTimeout { upstream, .. } => upstream.as_deref(),
            _ => None,
        }
    }

    /// How long the caller should wait before trying again, when we know.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QueueFull { retry_after, .. }
            | Self::QueueTimeout { retry_after, .. }
            | Self::ShuttingDown { retry_after, .. }
            | Self::CircuitOpen { retry_after, .. } => Some(*retry_after),
            Self::RateLimitStore { .. } | Self::TooManyPartitions { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The JSON body: `{"error", "upstream", "message"}`.
    fn body(&self) -> String {
        let body = serde_json::json!({
            "error": self.code(),
            "upstream": self.upstream(),
            "message": self.to_string(),
        });
        body.to_string()
    }

    /// The one place an error becomes an answer: status, code header, JSON body.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(body::full(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up: an honest "not before".
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, Self::ProxyAuthRequired) {
            headers.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"pacegate\""));
        }
        response
    }

    /// The same answer as raw HTTP/1.1 bytes, closing the connection: for
    /// request heads refused before hyper parses them (see `server::guard`).
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{ERROR_HEADER}: {}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.code(),
            body.len(),
        );
        [head.into_bytes(), body.into_bytes()].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn queue_full_answer_matches_spec() {
        let err =
            ProxyError::QueueFull { upstream: "github".into(), retry_after: Duration::from_millis(1500) };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[ERROR_HEADER], "queue_full");
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"], "queue_full");
        assert_eq!(json["upstream"], "github");
        assert!(json["message"].is_string());
    }

    #[test]
    fn raw_answer_matches_the_response() {
        let err = ProxyError::BadRequest("invalid header value".into());
        let raw = String::from_utf8(err.to_http1_bytes()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\nx-pacegate-error: bad_request\r\n"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "bad_request");
        assert!(json["upstream"].is_null());
    }

    #[test]
    fn refusals_answer_503_with_their_reason_as_code() {
        let (upstream, wait) = (|| "api".to_string(), Duration::from_secs(1));
        let refusals = [
            (ProxyError::QueueFull { upstream: upstream(), retry_after: wait }, RefusalReason::QueueFull),
            (
                ProxyError::QueueTimeout { upstream: upstream(), waited: wait, retry_after: wait },
                RefusalReason::QueueTimeout,
            ),
            (ProxyError::RateLimitStore { upstream: upstream() }, RefusalReason::RateLimitStore),
            (ProxyError::TooManyPartitions { upstream: upstream() }, RefusalReason::TooManyPartitions),
            (ProxyError::CircuitOpen { upstream: upstream(), retry_after: wait }, RefusalReason::CircuitOpen),
            (
                ProxyError::ShuttingDown { upstream: upstream(), retry_after: wait },
                RefusalReason::ShuttingDown,
            ),
        ];
        for (error, reason) in refusals {
            assert_eq!((error.status(), error.code()), (StatusCode::SERVICE_UNAVAILABLE, reason.as_str()));
        }
        let names = RefusalReason::ALL.map(RefusalReason::as_str);
        assert_eq!(
            names,
            [
                "queue_full",
                "queue_timeout",
                "rate_limit_store",
                "too_many_partitions",
                "cost_exceeds_quota",
                "shutting_down",
                "circuit_open"
            ]
        );
        let cost =
            ProxyError::CostExceedsQuota { upstream: upstream(), limit: "w".into(), cost: 9, capacity: 5 };
        assert_eq!((cost.status(), cost.code()), (StatusCode::PAYLOAD_TOO_LARGE, "cost_exceeds_quota"));
    }

    #[test]
    fn unknown_host_has_null_upstream_and_403() {
        let err = ProxyError::UnknownHost { host: "example.com".into() };
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(err.upstream(), None);
    }
}
