//! What a 429's error body says it is about, when its headers do not.
//!
//! - OpenAI: `{"error": {"type": "tokens", "code": "rate_limit_exceeded",
//!   "message": "Rate limit reached for gpt-4o in organization org-x on
//!   tokens per min (TPM): Limit 30000, Used 29800, Requested 500. Please
//!   try again in 600ms. ..."}}`. The type names the quota: `tokens`,
//!   `input_tokens`, `output_tokens` or `requests` (older answers say
//!   "on tokens per min" in the message alone); the wait is a Go duration.
//! - Anthropic: `{"type": "error", "error": {"type": "rate_limit_error",
//!   "message": "This request would exceed your organization's rate limit
//!   of 50,000 input tokens per minute ..."}}`: the message names the quota.
//!
//! The body comes from a third party: anything that is not one of these
//! shapes says nothing, never an error.

use std::time::Duration;

use serde_json::Value;

use crate::config::TokenKind;
use crate::retry::parse::parse_go_duration;

/// Most of a 429's body read to learn what it is about; the providers' are
/// a few hundred bytes.
pub const REFUSAL_BODY_BYTES: usize = 8 * 1024;

/// What a 429's error body says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusal {
    /// The token quota it names; `None`: requests, or not said.
    pub tokens: Option<TokenKind>,
    /// "Please try again in 600ms".
    pub retry_in: Option<Duration>,
}

/// Reads a 429's error body; `None` when it is not a provider's rate-limit error.
pub fn refusal(body: &[u8]) -> Option<Refusal> {
    // serde_json bounds its own recursion: a deep body is an error, not a crash.
    let value: Value = serde_json::from_slice(body.get(..REFUSAL_BODY_BYTES).unwrap_or(body)).ok()?;
    let error = value.get("error")?;
    let message = error.get("message").and_then(Value::as_str).unwrap_or_default();
    let kind = match error.get("type").and_then(Value::as_str) {
        Some("tokens") => Some(TokenKind::Total),
        Some("input_tokens") => Some(TokenKind::Input),
        Some("output_tokens") => Some(TokenKind::Output),
        Some("requests") => None,
        _ => named_in(message),
    };
    Some(Refusal { tokens: kind, retry_in: retry_in(message) })
}

/// The token quota a message names: "input tokens per minute", "tokens per min".
fn named_in(message: &str) -> Option<TokenKind> {
    let message = message.to_ascii_lowercase();
    if message.contains("input tokens") || message.contains("input_tokens") {
        Some(TokenKind::Input)
    } else if message.contains("output tokens") || message.contains("output_tokens") {
        Some(TokenKind::Output)
    } else if message.contains("tokens per") {
        Some(TokenKind::Total)
    } else {
        None
    }
}

/// "Please try again in 600ms." / "in 1.054s" / "in 7m12s".
fn retry_in(message: &str) -> Option<Duration> {
    const SAID: &str = "try again in ";
    let at = message.to_ascii_lowercase().find(SAID)? + SAID.len();
    let rest = message.get(at..)?;
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == 'µ')).unwrap_or(rest.len());
    let word = rest[..end].trim_end_matches('.');
    parse_go_duration(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn openai_names_the_quota_in_its_type_and_the_wait_in_its_message() {
        let body = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29800, Requested 500. Please try again in 600ms. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        let said = refusal(body).expect("a rate-limit error");
        assert_eq!(
            said,
            Refusal { tokens: Some(TokenKind::Total), retry_in: Some(Duration::from_millis(600)) }
        );
        let requests = br#"{"error":{"message":"Rate limit reached for gpt-4o on requests per min (RPM): Limit 500. Please try again in 1.054s.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let said = refusal(requests).expect("a rate-limit error");
        assert_eq!(said, Refusal { tokens: None, retry_in: Some(Duration::from_millis(1054)) });
        let input = br#"{"error":{"type":"input_tokens","message":"Please try again in 7m12s"}}"#;
        assert_eq!(refusal(input).and_then(|r| r.tokens), Some(TokenKind::Input));
        assert_eq!(refusal(input).and_then(|r| r.retry_in), Some(Duration::from_secs(432)));
    }

    #[test]
    fn anthropic_names_the_quota_in_its_message() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your organization's rate limit of 50,000 input tokens per minute. For details, refer to: https://docs.anthropic.com/en/api/rate-limits."}}"#;
        assert_eq!(refusal(body), Some(Refusal { tokens: Some(TokenKind::Input), retry_in: None }));
        let output = br#"{"type":"error","error":{"type":"rate_limit_error","message":"... of 8,000 output tokens per minute ..."}}"#;
        assert_eq!(refusal(output).and_then(|r| r.tokens), Some(TokenKind::Output));
        let requests = br#"{"type":"error","error":{"type":"rate_limit_error","message":"... of 50 requests per minute ..."}}"#;
        assert_eq!(refusal(requests), Some(Refusal::default()));
    }

    #[test]
    fn anything_else_says_nothing() {
        for body in
            [&b""[..], b"Too Many Requests", b"{}", b"[1,2]", b"{\"error\":\"slow down\"}", b"\xff\xfe"]
        {
            assert_eq!(refusal(body).and_then(|r| r.tokens), None, "{body:?}");
        }
        let deep = "[".repeat(100_000);
        assert_eq!(refusal(deep.as_bytes()), None);
        // An absurd wait saturates; the exchange never waits past max_retry_after.
        let odd = br#"{"error":{"type":7,"message":"try again in 99999999999999999999h"}}"#;
        assert!(refusal(odd).and_then(|r| r.retry_in) >= Some(Duration::from_secs(3600 * 24 * 365)));
    }

    proptest! {
        #[test]
        fn hostile_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = refusal(&body);
        }

        #[test]
        fn hostile_messages_never_panic(kind in "[a-z_]{0,14}", message in "\\PC{0,120}") {
            let body = serde_json::json!({"error": {"type": kind, "message": message}}).to_string();
            let _ = refusal(body.as_bytes());
        }
    }
}
