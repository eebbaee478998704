//! What an LLM API says about its token quotas, read from answer headers
//! (docs/tokens.md: "The server's word wins").
//!
//! - OpenAI: `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens`,
//!   a Go duration (`6m0s`, `1.5s`, `20ms`, `1h2m3.5s`, `500us`), with
//!   `x-ratelimit-limit-tokens` beside them. One quota, input and output.
//! - Anthropic: `anthropic-ratelimit-{tokens,input-tokens,output-tokens}-
//!   {limit,remaining,reset}`, the reset an RFC 3339 time. `tokens` is the
//!   most restrictive of the token limits in force.
//!
//! As the providers document them, a reset is the time until the quota is
//! fully replenished. Each quota is reported as a [`RateLimitHint`], the
//! type `retry::hints` uses for request quotas, so the admission core reads
//! both alike. A quota whose remaining or reset does not parse is absent,
//! never an error: the headers come from a third party.

use std::time::SystemTime;

use http::HeaderMap;

use crate::retry::RateLimitHint;
use crate::retry::hints::{anthropic, header_str, openai};
use crate::retry::parse::parse_u64;

/// The token quotas an answer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenHints {
    /// Input and output together (OpenAI's TPM; Anthropic's tightest token limit).
    pub tokens: Option<RateLimitHint>,
    /// Input tokens (Anthropic ITPM).
    pub input: Option<RateLimitHint>,
    /// Output tokens (Anthropic OTPM).
    pub output: Option<RateLimitHint>,
}

impl TokenHints {
    pub fn is_empty(&self) -> bool {
        self.tokens.is_none() && self.input.is_none() && self.output.is_none()
    }
}

/// The token quotas `headers` report, their resets measured from `now`.
pub fn token_hints(headers: &HeaderMap, now: SystemTime) -> TokenHints {
    TokenHints {
        tokens: openai(headers, "tokens").or_else(|| anthropic(headers, "tokens", now)),
        input: anthropic(headers, "input-tokens", now),
        output: anthropic(headers, "output-tokens", now),
    }
}

/// Whether the answer says the request quota (not a token quota) is spent:
/// OpenAI's `x-ratelimit-remaining-requests: 0` or Anthropic's
/// `anthropic-ratelimit-requests-remaining: 0`. Then a 429 is about
/// requests, and cools the whole partition. (The pace these quotas keep is
/// read with every request quota's, by `retry::rate_limit`.)
pub fn requests_spent(headers: &HeaderMap) -> bool {
    ["x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"]
        .into_iter()
        .any(|name| header_str(headers, name).and_then(parse_u64) == Some(0))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    use super::*;
    use crate::retry::Refill;

    /// 2025-08-21T12:40:00.250Z.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_755_780_000, 250_000_000)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            let (Ok(name), Ok(value)) = (HeaderName::try_from(*name), HeaderValue::try_from(*value)) else {
                continue;
            };
            h.insert(name, value);
        }
        h
    }

    fn hint(limit: Option<u64>, remaining: u64, reset_after: Duration) -> Option<RateLimitHint> {
        Some(RateLimitHint { limit, remaining, reset_after, refill: Refill::Continuous })
    }

    #[test]
    fn a_spent_request_quota_of_either_provider() {
        let spent = |name: &'static str, value: &'static str| {
            requests_spent(
                &std::iter::once((
                    http::HeaderName::from_static(name),
                    http::HeaderValue::from_static(value),
                ))
                .collect(),
            )
        };
        assert!(spent("anthropic-ratelimit-requests-remaining", "0"));
        assert!(spent("x-ratelimit-remaining-requests", "0"));
        assert!(!spent("anthropic-ratelimit-requests-remaining", "12"));
        assert!(!spent("anthropic-ratelimit-input-tokens-remaining", "0"));
    }

    #[test]
    fn openai_token_quota() {
        let h = headers(&[
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-remaining-requests", "59"),
        ]);
        let want = TokenHints {
            tokens: hint(Some(150_000), 149_984, Duration::from_secs(360)),
            ..TokenHints::default()
        };
        assert_eq!(token_hints(&h, now()), want);
    }

    #[test]
    fn openai_durations() {
        for (text, want) in [
            ("1.5s", Duration::from_millis(1500)),
            ("20ms", Duration::from_millis(20)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("500us", Duration::from_micros(500)),
            ("500µs", Duration::from_micros(500)),
            ("0s", Duration::ZERO),
        ] {
            let h = headers(&[("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", text)]);
            assert_eq!(token_hints(&h, now()).tokens, hint(None, 0, want), "{text}");
        }
    }

    #[test]
    fn anthropic_quotas() {
        let h = headers(&[
            ("anthropic-ratelimit-tokens-limit", "96000"),
            ("anthropic-ratelimit-tokens-remaining", "95000"),
            ("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:59Z"),
            ("anthropic-ratelimit-input-tokens-limit", "80000"),
            ("anthropic-ratelimit-input-tokens-remaining", "79000"),
            ("anthropic-ratelimit-input-tokens-reset", "2025-08-21T12:40:00.750Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "16000"),
            ("anthropic-ratelimit-output-tokens-reset", "2025-08-21T14:41:00+02:00"),
        ]);
        let want = TokenHints {
            tokens: hint(Some(96_000), 95_000, Duration::from_millis(58_750)),
            input: hint(Some(80_000), 79_000, Duration::from_millis(500)),
            output: hint(None, 16_000, Duration::from_millis(59_750)),
        };
        assert_eq!(token_hints(&h, now()), want);
    }

    #[test]
    fn past_resets_are_now_and_garbage_is_absent() {
        let h = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "-5"),
            ("anthropic-ratelimit-input-tokens-reset", "2025-08-21T12:41:00Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "5"),
            ("anthropic-ratelimit-output-tokens-reset", "tomorrow"),
        ]);
        let got = token_hints(&h, now());
        assert_eq!(got, TokenHints { tokens: hint(None, 0, Duration::ZERO), input: None, output: None });
        assert!(token_hints(&HeaderMap::new(), now()).is_empty());
    }

    /// `d` as Go's `Duration.String` writes it.
    fn go_format(d: Duration) -> String {
        let nanos = d.as_nanos();
        if nanos == 0 {
            return "0s".into();
        }
        let frac = |value: u128, unit: u128| {
            let fraction = format!("{:09}", value % unit * (1_000_000_000 / unit));
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                format!("{}", value / unit)
            } else {
                format!("{}.{fraction}", value / unit)
            }
        };
        if nanos < 1_000 {
            return format!("{nanos}ns");
        }
        if nanos < 1_000_000 {
            return format!("{}µs", frac(nanos, 1_000));
        }
        if nanos < 1_000_000_000 {
            return format!("{}ms", frac(nanos, 1_000_000));
        }
        let (h, m) = (nanos / 3_600_000_000_000, nanos / 60_000_000_000 % 60);
        let s = frac(nanos % 60_000_000_000, 1_000_000_000);
        match (h, m) {
            (0, 0) => format!("{s}s"),
            (0, m) => format!("{m}m{s}s"),
            (h, m) => format!("{h}h{m}m{s}s"),
        }
    }

    proptest! {
        /// Every duration Go can print reads back exactly, through the header.
        #[test]
        fn go_durations_round_trip(nanos in prop_oneof![0u64..1_000_000, 0u64..100_000_000_000, 0u64..u64::MAX / 4]) {
            let d = Duration::from_nanos(nanos);
            let text = go_format(d);
            let h = headers(&[("x-ratelimit-remaining-tokens", "1"), ("x-ratelimit-reset-tokens", &text)]);
            prop_assert_eq!(token_hints(&h, now()).tokens.map(|t| t.reset_after), Some(d), "{}", text);
        }

        #[test]
        fn arbitrary_values_never_panic(value in "[0-9a-zA-Zµ.:+-]{0,40}", remaining in "\\PC{0,12}") {
            let h = headers(&[
                ("x-ratelimit-remaining-tokens", &remaining),
                ("x-ratelimit-reset-tokens", &value),
                ("anthropic-ratelimit-tokens-remaining", &remaining),
                ("anthropic-ratelimit-tokens-reset", &value),
            ]);
            let _ = token_hints(&h, now());
        }
    }
}
