//! What upstreams say about their limits, read from response headers.
//!
//! Two kinds of hint, both tolerant: a header that does not parse is treated
//! as absent, never as an error, because it comes from a third party and the
//! request must go on either way.
//!
//! - [`retry_after`]: when to come back. `retry-after-ms` (milliseconds,
//!   possibly fractional, as OpenAI sends it) wins over `Retry-After`, which
//!   is delta-seconds (RFC 9110 §10.2.3; a decimal is accepted too) or an
//!   HTTP date (a past date means "now").
//! - [`rate_limit`]: how much quota is left and when it resets, from the first
//!   complete family among, in order: GitHub's `X-RateLimit-*`, the IETF
//!   draft's `RateLimit-*`, OpenAI's `x-ratelimit-*-requests` (Go durations
//!   such as `6m0s`). The draft's newer single structured `RateLimit:`
//!   field is not read yet.
//!
//! Time is passed in (`now`) so date arithmetic is testable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

use super::parse::{parse_decimal, parse_go_duration, parse_u64};

/// `X-RateLimit-Reset` values above this many seconds are epoch timestamps
/// (this is September 2001); below, delta seconds. No API announces a reset
/// 31 years ahead, and no epoch timestamp in use is that small.
pub const EPOCH_THRESHOLD_SECS: u64 = 1_000_000_000;

/// An upstream's report of its own quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHint {
    /// The quota size, when reported; informational.
    pub limit: Option<u64>,
    /// Requests left before the reset.
    pub remaining: u64,
    /// Time from `now` until the quota resets (zero if already past).
    pub reset_after: Duration,
}

// The names read on every answer, built once: looking a header up by a
// `&str` parses and lower-cases the name on each call.
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const X_REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const X_RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const X_LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");

/// How long the upstream asks us to wait, if it says so in a form we read.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let millis =
        header_str(headers, &RETRY_AFTER_MS).and_then(|v| parse_decimal(v, Duration::from_millis(1)));
    millis.or_else(|| {
        let v = header_str(headers, &RETRY_AFTER)?;
        parse_decimal(v, Duration::from_secs(1)).or_else(|| {
            let at = httpdate::parse_http_date(v).ok()?;
            Some(until(at, now))
        })
    })
}

/// The upstream's remaining quota and reset time, when it reports both.
pub fn rate_limit(headers: &HeaderMap, now: SystemTime) -> Option<RateLimitHint> {
    // Every answer is asked, and most report no quota: one pass over their
    // few names is cheaper than hashing the three that each scheme needs.
    if !headers.keys().any(|name| name.as_str().contains("ratelimit-remaining")) {
        return None;
    }
    github(headers, now).or_else(|| ietf_draft(headers)).or_else(|| openai(headers))
}

/// `X-RateLimit-*`; `Reset` is epoch seconds or delta (see [`EPOCH_THRESHOLD_SECS`]).
fn github(headers: &HeaderMap, now: SystemTime) -> Option<RateLimitHint> {
    let remaining = parse_u64(header_str(headers, &X_REMAINING)?)?;
    let reset = parse_decimal(header_str(headers, &X_RESET)?, Duration::from_secs(1))?;
    let reset_after = if reset.as_secs() > EPOCH_THRESHOLD_SECS {
        UNIX_EPOCH.checked_add(reset).map_or(Duration::MAX, |at| until(at, now))
    } else {
        reset
    };
    Some(RateLimitHint { limit: header_str(headers, &X_LIMIT).and_then(parse_u64), remaining, reset_after })
}

/// `RateLimit-*` of draft-ietf-httpapi-ratelimit-headers; `Reset` is delta seconds.
fn ietf_draft(headers: &HeaderMap) -> Option<RateLimitHint> {
    Some(RateLimitHint {
        remaining: parse_u64(header_str(headers, &REMAINING)?)?,
        reset_after: parse_decimal(header_str(headers, &RESET)?, Duration::from_secs(1))?,
        limit: header_str(headers, &LIMIT).and_then(parse_u64),
    })
}

/// OpenAI's request quota; its token quota is not what we pace.
fn openai(headers: &HeaderMap) -> Option<RateLimitHint> {
    Some(RateLimitHint {
        remaining: parse_u64(header_str(headers, &X_REMAINING_REQUESTS)?)?,
        reset_after: parse_go_duration(header_str(headers, &X_RESET_REQUESTS)?)?,
        limit: header_str(headers, &X_LIMIT_REQUESTS).and_then(parse_u64),
    })
}

/// The first value of `name` as trimmed text; non-ASCII values count as absent.
fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    /// A fixed `now` with a sub-second part, as real clocks have.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn retry_after_seconds_and_decimals() {
        let h = headers(&[("retry-after", "120")]);
        assert_eq!(retry_after(&h, now()), Some(Duration::from_secs(120)));
        let h = headers(&[("retry-after", " 1.5 ")]);
        assert_eq!(retry_after(&h, now()), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn retry_after_ms_wins() {
        let h = headers(&[("retry-after", "2"), ("retry-after-ms", "20.5")]);
        assert_eq!(retry_after(&h, now()), Some(Duration::from_micros(20_500)));
    }

    #[test]
    fn bad_retry_after_ms_falls_back() {
        let h = headers(&[("retry-after", "2"), ("retry-after-ms", "soon")]);
        assert_eq!(retry_after(&h, now()), Some(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_http_date() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_030);
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_str(&httpdate::fmt_http_date(at)).expect("dates are ASCII");
        h.insert("retry-after", v);
        assert_eq!(retry_after(&h, now()), Some(Duration::from_millis(29_750)));
    }

    #[test]
    fn retry_after_past_date_is_zero() {
        let h = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after(&h, now()), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage_is_none() {
        for bad in ["-1", "soon", "", "1e3", "Wed, 99 Oct 2015 07:28:00 GMT"] {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_static(bad));
            assert_eq!(retry_after(&h, now()), None, "{bad:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now()), None);
    }

    #[test]
    fn github_epoch_reset() {
        let h = headers(&[
            ("x-ratelimit-limit", "5000"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000060"),
        ]);
        let want =
            RateLimitHint { limit: Some(5000), remaining: 0, reset_after: Duration::from_millis(59_750) };
        assert_eq!(rate_limit(&h, now()), Some(want));
    }

    #[test]
    fn github_past_epoch_is_zero_and_small_value_is_delta() {
        let h = headers(&[("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "1600000000")]);
        let hint = rate_limit(&h, now()).expect("complete hint");
        assert_eq!(hint.reset_after, Duration::ZERO);
        assert_eq!(hint.limit, None);
        let h = headers(&[("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "42")]);
        let hint = rate_limit(&h, now()).expect("complete hint");
        assert_eq!(hint.reset_after, Duration::from_secs(42));
    }

    #[test]
    fn ietf_draft_headers() {
        let h =
            headers(&[("ratelimit-limit", "100"), ("ratelimit-remaining", "7"), ("ratelimit-reset", "30")]);
        let want = RateLimitHint { limit: Some(100), remaining: 7, reset_after: Duration::from_secs(30) };
        assert_eq!(rate_limit(&h, now()), Some(want));
    }

    #[test]
    fn openai_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let want = RateLimitHint { limit: Some(60), remaining: 59, reset_after: Duration::from_secs(1) };
        assert_eq!(rate_limit(&h, now()), Some(want));
    }

    #[test]
    fn incomplete_family_is_skipped() {
        // GitHub family lacks a reset, so the complete IETF family is used.
        let h = headers(&[
            ("x-ratelimit-remaining", "1"),
            ("ratelimit-remaining", "2"),
            ("ratelimit-reset", "3"),
        ]);
        assert_eq!(rate_limit(&h, now()).map(|r| r.remaining), Some(2));
        let h = headers(&[("x-ratelimit-remaining", "x"), ("x-ratelimit-reset", "3")]);
        assert_eq!(rate_limit(&h, now()), None);
    }

    const NAMES: [&str; 11] = [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 11),
            secs in any::<u64>(),
        ) {
            let mut h = HeaderMap::new();
            for (name, bytes) in NAMES.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_bytes(bytes) {
                    h.insert(*name, v);
                }
            }
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(secs)).unwrap_or(UNIX_EPOCH);
            let _ = retry_after(&h, now);
            let _ = rate_limit(&h, now);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[0-9a-zA-Z .:,µ-]{0,40}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&text) {
                for name in NAMES {
                    h.insert(name, v.clone());
                }
            }
            let _ = retry_after(&h, now());
            let _ = rate_limit(&h, now());
        }

        #[test]
        fn retry_after_delta_seconds_round_trip(secs in any::<u64>()) {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from(secs));
            prop_assert_eq!(retry_after(&h, now()), Some(Duration::from_secs(secs)));
        }

        #[test]
        fn rate_limit_reset_is_delta_or_epoch(
            remaining in any::<u64>(),
            reset in 0u64..4_000_000_000,
            now_secs in 1_500_000_000u64..2_500_000_000,
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            let mut github = HeaderMap::new();
            github.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
            github.insert("x-ratelimit-reset", HeaderValue::from(reset));
            let hint = rate_limit(&github, now).expect("a complete GitHub family");
            prop_assert_eq!(hint.remaining, remaining);
            let after = if reset > EPOCH_THRESHOLD_SECS { reset.saturating_sub(now_secs) } else { reset };
            prop_assert_eq!(hint.reset_after, Duration::from_secs(after));
            // The IETF draft's reset is always a delta, however large.
            let mut ietf = HeaderMap::new();
            ietf.insert("ratelimit-remaining", HeaderValue::from(remaining));
            ietf.insert("ratelimit-reset", HeaderValue::from(reset));
            let hint = rate_limit(&ietf, now).expect("a complete IETF family");
            prop_assert_eq!((hint.remaining, hint.reset_after), (remaining, Duration::from_secs(reset)));
        }

        #[test]
        fn http_date_round_trip(
            base in 0u64..4_000_000_000,
            nanos in 0u32..1_000_000_000,
            n in 0u64..10_000_000,
        ) {
            let now = UNIX_EPOCH + Duration::new(base, nanos);
            let text = httpdate::fmt_http_date(now + Duration::from_secs(n));
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_str(&text).expect("dates are ASCII"));
            let got = retry_after(&h, now).expect("a formatted date parses");
            // The date drops the sub-second part of `now + n`.
            prop_assert!(got <= Duration::from_secs(n));
            prop_assert!(got + Duration::from_secs(1) > Duration::from_secs(n));
        }
    }
}
