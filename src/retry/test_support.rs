//! Config builders shared by this module's tests.

use std::num::NonZeroU32;
use std::time::Duration;

use http::StatusCode;

use crate::config::{Jitter, Retry};

/// The documented example `[upstream.retry]` with the delays and jitter given.
pub(crate) fn retry_config(base_delay: Duration, max_delay: Duration, jitter: Jitter) -> Retry {
    Retry {
        max_attempts: NonZeroU32::new(5).expect("5 is not zero"),
        on_status: vec![
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ],
        base_delay,
        max_delay,
        jitter,
        respect_retry_after: true,
        max_retry_after: Duration::from_secs(120),
        budget: 0.2,
    }
}
