//! The errors pacegate answers itself, and their one mapping to HTTP.
//!
//! SPEC's error table lives here and only here: every other module returns a
//! [`ProxyError`] and lets [`ProxyError::into_response`] pick the status, the
//! `x-pacegate-error` code and the JSON body.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};

/// Header naming the error code on every answer pacegate makes itself.
pub const ERROR_HEADER: &str = "x-pacegate-error";

/// A request pacegate answers itself instead of with an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
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
    #[error("request headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
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
    #[error("the upstream did not answer within {timeout:?}")]
    UpstreamTimeout { upstream: Option<String>, timeout: Duration },
}

impl ProxyError {
    /// The HTTP status of SPEC's error table.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownHost { .. } | Self::ForbiddenAddress { .. } => StatusCode::FORBIDDEN,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::QueueFull { .. }
            | Self::QueueTimeout { .. }
            | Self::RateLimitStore { .. }
            | Self::TooManyPartitions { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable `x-pacegate-error` code of SPEC's error table.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::UnknownHost { .. } => "unknown_host",
            Self::ForbiddenAddress { .. } => "forbidden_address",
            Self::NoRoute { .. } => "no_route",
            Self::ProxyAuthRequired => "proxy_auth_required",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::QueueFull { .. } => "queue_full",
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::RateLimitStore { .. } => "rate_limit_store",
            Self::TooManyPartitions { .. } => "too_many_partitions",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }

    /// The upstream the error is about, when there is one.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Self::QueueFull { upstream, .. }
            | Self::QueueTimeout { upstream, .. }
            | Self::RateLimitStore { upstream }
            | Self::TooManyPartitions { upstream } => Some(upstream),
            Self::BodyTooLarge { upstream, .. }
            | Self::UpstreamUnreachable { upstream, .. }
            | Self::UpstreamTimeout { upstream, .. } => upstream.as_deref(),
            _ => None,
        }
    }

    /// How long the caller should wait before trying again, when we know.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QueueFull { retry_after, .. } | Self::QueueTimeout { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::RateLimitStore { .. } | Self::TooManyPartitions { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The one place an error becomes an answer: status, code header, JSON body.
    pub fn into_response(self) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "upstream": self.upstream(),
            "message": self.to_string(),
        });
        let mut response = Response::new(body::full(body.to_string()));
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
    fn unknown_host_has_null_upstream_and_403() {
        let err = ProxyError::UnknownHost { host: "example.com".into() };
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(err.upstream(), None);
    }
}
