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
//!   such as `6m0s`), Anthropic's `anthropic-ratelimit-requests-*` (RFC 3339
//!   times). The draft's newer single structured `RateLimit:` field is not
//!   read yet.
//!
//! The families do not mean the same by "reset" ([`Refill`]), so a hint
//! says what it asks of pacing itself ([`RateLimitHint::pace`]).
//!
//! Time is passed in (`now`) so date arithmetic is testable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::AsHeaderName;
use http::{HeaderMap, HeaderName};

use super::parse::{parse_decimal, parse_go_duration, parse_rfc3339, parse_u64};

/// `X-RateLimit-Reset` values above this many seconds are epoch timestamps
/// (this is September 2001); below, delta seconds. No API announces a reset
/// 31 years ahead, and no epoch timestamp in use is that small.
pub const EPOCH_THRESHOLD_SECS: u64 = 1_000_000_000;

/// An upstream's report of its own quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHint {
    /// The quota size, when reported.
    pub limit: Option<u64>,
    /// Units left now.
    pub remaining: u64,
    /// Time from `now` until the reset (zero if already past).
    pub reset_after: Duration,
    /// What the reset is.
    pub refill: Refill,
}

/// How a quota comes back, which decides what its reset means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// A fixed window (GitHub, the IETF draft): nothing comes back before
    /// the reset, everything at it.
    AtReset,
    /// A bucket that refills as it is used (OpenAI, Anthropic): the reset is
    /// the time until it is *full* again, so the quota comes back at
    /// `(limit - remaining) / reset` all along.
    Continuous,
}

/// What a hint asks of pacing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HintPace {
    /// Send nothing for this long.
    pub pause: Option<Duration>,
    /// Send no faster than this many requests a second, for this long.
    pub cap: Option<(f64, Duration)>,
}

impl RateLimitHint {
    /// The pause and pace that spend the quota evenly until the reset.
    ///
    /// - A fixed window spreads what remains, `remaining / reset`; with
    ///   nothing left it pauses until the reset.
    /// - A refilling bucket has `remaining` now and gets `limit - remaining`
    ///   back by the reset: `limit / reset` spends both by then. With
    ///   nothing left it pauses until one unit is back, `reset / limit`,
    ///   then keeps that pace. Without `limit` only "nothing left" is read
    ///   (a pause until the reset): `remaining / reset` would pace far below
    ///   the quota.
    ///
    /// A reset that is already past asks nothing. Nothing is asked for
    /// longer than `longest` (`max_retry_after`): one hostile or broken
    /// header must not pause an upstream for years. The pace is worked out
    /// from the real reset, so a long one is not read as a short one: 200
    /// a day, none left, pauses 432 s (or `longest`), not `longest` / 200.
    pub fn pace(&self, longest: Duration) -> HintPace {
        if self.reset_after.is_zero() {
            return HintPace::default();
        }
        let lasts = self.reset_after.min(longest);
        let per_second = |units: u64| Some((units as f64 / self.reset_after.as_secs_f64(), lasts));
        let spent = self.remaining == 0;
        let (pause, cap) = match (self.refill, self.limit.filter(|limit| *limit > 0)) {
            (Refill::AtReset, _) if spent => (Some(self.reset_after), None),
            (Refill::AtReset, _) => (None, per_second(self.remaining)),
            (Refill::Continuous, Some(limit)) => {
                let limit = limit.max(self.remaining);
                let one_unit = Duration::try_from_secs_f64(self.reset_after.as_secs_f64() / limit as f64)
                    .unwrap_or(self.reset_after);
                (spent.then_some(one_unit), per_second(limit))
            }
            (Refill::Continuous, None) => (spent.then_some(self.reset_after), None),
        };
        HintPace { pause: pause.map(|pause| pause.min(longest)), cap }
    }
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
    // few names is cheaper than hashing the names each family needs, and a
    // first byte that starts no family's prefix settles most names at once.
    if !headers.keys().any(|name| names_a_quota(name.as_str())) {
        return None;
    }
    github(headers, now)
        .or_else(|| ietf_draft(headers))
        .or_else(|| openai(headers, "requests"))
        .or_else(|| anthropic(headers, "requests", now))
}

/// Whether a header name (lower case) belongs to a family [`rate_limit`] reads.
fn names_a_quota(name: &str) -> bool {
    match name.as_bytes().first() {
        Some(b'x') => name.starts_with("x-ratelimit-"),
        Some(b'r') => name.starts_with("ratelimit-"),
        Some(b'a') => name.starts_with("anthropic-ratelimit-requests-"),
        _ => false,
    }
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
    let limit = header_str(headers, &X_LIMIT).and_then(parse_u64);
    Some(RateLimitHint { limit, remaining, reset_after, refill: Refill::AtReset })
}

/// `RateLimit-*` of draft-ietf-httpapi-ratelimit-headers; `Reset` is delta seconds.
fn ietf_draft(headers: &HeaderMap) -> Option<RateLimitHint> {
    Some(RateLimitHint {
        remaining: parse_u64(header_str(headers, &REMAINING)?)?,
        reset_after: parse_decimal(header_str(headers, &RESET)?, Duration::from_secs(1))?,
        limit: header_str(headers, &LIMIT).and_then(parse_u64),
        refill: Refill::AtReset,
    })
}

/// One of OpenAI's quotas, `x-ratelimit-{remaining,reset,limit}-{kind}`
/// (`requests` here, `tokens` for `llm::token_hints`); the reset is a Go
/// duration until the quota is full again.
pub(crate) fn openai(headers: &HeaderMap, kind: &str) -> Option<RateLimitHint> {
    let field = |name: &str| header_str(headers, format!("x-ratelimit-{name}-{kind}"));
    Some(RateLimitHint {
        remaining: parse_u64(field("remaining")?)?,
        reset_after: parse_go_duration(field("reset")?)?,
        limit: field("limit").and_then(parse_u64),
        refill: Refill::Continuous,
    })
}

/// One of Anthropic's quotas, `anthropic-ratelimit-{kind}-*` (`requests`
/// here; `tokens`, `input-tokens`, `output-tokens` for `llm::token_hints`);
/// the reset is the RFC 3339 time at which it is full again. Measured on
/// our clock and often in whole seconds, a nearly full quota's reset may
/// read as past: that asks nothing, the lenient way to be wrong.
pub(crate) fn anthropic(headers: &HeaderMap, kind: &str, now: SystemTime) -> Option<RateLimitHint> {
    let field = |name: &str| header_str(headers, format!("anthropic-ratelimit-{kind}-{name}"));
    Some(RateLimitHint {
        remaining: parse_u64(field("remaining")?)?,
        reset_after: until(parse_rfc3339(field("reset")?)?, now),
        limit: field("limit").and_then(parse_u64),
        refill: Refill::Continuous,
    })
}

/// The first value of `name` as trimmed text. UTF-8, not only ASCII: Go
/// writes microseconds as `µs`.
pub(crate) fn header_str(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    std::str::from_utf8(headers.get(name)?.as_bytes()).ok().map(str::trim)
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
        let want = RateLimitHint {
            limit: Some(5000),
            remaining: 0,
            reset_after: Duration::from_millis(59_750),
            refill: Refill::AtReset,
        };
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
        let want = RateLimitHint {
            limit: Some(100),
            remaining: 7,
            reset_after: Duration::from_secs(30),
            refill: Refill::AtReset,
        };
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
        let want = RateLimitHint {
            limit: Some(60),
            remaining: 59,
            reset_after: Duration::from_secs(1),
            refill: Refill::Continuous,
        };
        assert_eq!(rate_limit(&h, now()), Some(want));
    }

    #[test]
    fn anthropic_request_headers() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:50.25Z"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
        ]);
        // `now` is 2023-11-14T22:13:20.25Z.
        let want = RateLimitHint {
            limit: Some(50),
            remaining: 0,
            reset_after: Duration::from_secs(30),
            refill: Refill::Continuous,
        };
        assert_eq!(rate_limit(&h, now()), Some(want));
        // An OpenAI family, complete, comes first.
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:50Z"),
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "1s"),
        ]);
        assert_eq!(rate_limit(&h, now()).map(|hint| hint.remaining), Some(3));
    }

    fn hint(refill: Refill, limit: Option<u64>, remaining: u64, reset_secs: u64) -> RateLimitHint {
        RateLimitHint { limit, remaining, reset_after: Duration::from_secs(reset_secs), refill }
    }

    /// Longer than any reset below.
    const LONGEST: Duration = Duration::from_secs(3600);

    /// What a hint with a reset in `reset_secs` asks, when no cap on waits bites.
    fn paced(reset_secs: u64, pause_ms: Option<u64>, cap: Option<f64>) -> HintPace {
        let cap = cap.map(|rate| (rate, Duration::from_secs(reset_secs)));
        HintPace { pause: pause_ms.map(Duration::from_millis), cap }
    }

    /// A fixed window spreads what remains until the reset, and with
    /// nothing left waits for the reset, whatever the limit.
    #[test]
    fn a_fixed_window_spreads_what_remains() {
        assert_eq!(hint(Refill::AtReset, Some(5000), 10, 20).pace(LONGEST), paced(20, None, Some(0.5)));
        assert_eq!(hint(Refill::AtReset, None, 10, 20).pace(LONGEST), paced(20, None, Some(0.5)));
        assert_eq!(hint(Refill::AtReset, Some(5000), 0, 20).pace(LONGEST), paced(20, Some(20_000), None));
    }

    /// OpenAI at 500 requests a minute, 10 left, full again in 58.8 s: the
    /// quota comes back at 490 / 58.8 s = 8.3/s, so 500 / 58.8 s spends
    /// what is left and what comes back by the reset (10 / 58.8 s, the
    /// fixed window's reading, would be 0.17/s). Nothing left: the next
    /// unit is back in 58.8 s / 500.
    #[test]
    fn a_refilling_bucket_paces_at_its_limit_over_the_reset() {
        let refill = Refill::Continuous;
        let pace = hint(refill, Some(500), 10, 60).pace(LONGEST);
        assert_eq!(pace, paced(60, None, Some(500.0 / 60.0)));
        assert_eq!(hint(refill, Some(500), 0, 60).pace(LONGEST), paced(60, Some(120), Some(500.0 / 60.0)));
        // A limit below what remains (a quota raised meanwhile) is not believed.
        assert_eq!(hint(refill, Some(5), 30, 60).pace(LONGEST), paced(60, None, Some(0.5)));
        // Without a limit, only "nothing left" is read, as a pause until full.
        assert_eq!(hint(refill, None, 10, 60).pace(LONGEST), paced(60, None, None));
        assert_eq!(hint(refill, None, 0, 60).pace(LONGEST), paced(60, Some(60_000), None));
        assert_eq!(hint(refill, Some(0), 0, 60).pace(LONGEST), paced(60, Some(60_000), None));
    }

    /// 200 a day, none left: the next request is back in 432 s, and the
    /// pace is 200 a day. A cap on waits of 120 s shortens the pause and how
    /// long the pace is kept, never the reset they are worked out from
    /// (that would read "0.6 s, then 1.7/s").
    #[test]
    fn a_long_reset_is_capped_after_the_pace_is_worked_out() {
        let day = 86_400;
        let longest = Duration::from_secs(120);
        let want = HintPace { pause: Some(longest), cap: Some((200.0 / day as f64, longest)) };
        assert_eq!(hint(Refill::Continuous, Some(200), 0, day).pace(longest), want);
        let want =
            HintPace { pause: Some(Duration::from_secs(432)), cap: Some((200.0 / day as f64, LONGEST)) };
        assert_eq!(hint(Refill::Continuous, Some(200), 0, day).pace(LONGEST), want);
        let window = hint(Refill::AtReset, Some(5000), 0, day).pace(longest);
        assert_eq!(window, HintPace { pause: Some(longest), cap: None });
    }

    #[test]
    fn a_past_reset_asks_nothing() {
        for refill in [Refill::AtReset, Refill::Continuous] {
            assert_eq!(hint(refill, Some(500), 0, 0).pace(LONGEST), HintPace::default());
        }
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

    const NAMES: [&str; 14] = [
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
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ];

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 14),
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
        fn any_hint_paces_without_panicking(
            limit in proptest::option::of(any::<u64>()),
            remaining in any::<u64>(),
            secs in any::<u64>(),
            nanos in 0u32..1_000_000_000,
            continuous in any::<bool>(),
        ) {
            let refill = if continuous { Refill::Continuous } else { Refill::AtReset };
            let reset_after = Duration::new(secs, nanos);
            let longest = Duration::from_secs(120);
            let pace = RateLimitHint { limit, remaining, reset_after, refill }.pace(longest);
            prop_assert!(pace.pause.is_none_or(|pause| pause <= reset_after.min(longest)));
            prop_assert!(pace.cap.is_none_or(|(rate, lasts)| rate >= 0.0 && !rate.is_nan() && lasts <= longest));
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
