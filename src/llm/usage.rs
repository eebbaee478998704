//! What an answer says it cost: the `usage` object of a JSON answer.
//!
//! The shapes, all read by [`from_usage`]:
//! - OpenAI chat, completions, embeddings: `prompt_tokens`,
//!   `completion_tokens` (absent for embeddings), cached tokens in
//!   `prompt_tokens_details.cached_tokens` (part of `prompt_tokens`).
//! - OpenAI Responses: `input_tokens`, `output_tokens`, cached tokens in
//!   `input_tokens_details.cached_tokens` (part of `input_tokens`).
//! - Anthropic: `input_tokens`, `output_tokens`, and beside them (not part
//!   of `input_tokens`) `cache_creation_input_tokens` and
//!   `cache_read_input_tokens`.
//!
//! [`Usage::input`] is always every prompt token the model read, cached or
//! not, so it compares with an estimate of the whole prompt; how much of
//! the cached part a quota charges is the provider's rule (Anthropic does
//! not count cache reads against ITPM), left to the caller.

use serde_json::Value;

/// JSON answers larger than this are not parsed for their usage.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Tokens an answer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens read, cached ones included.
    pub input: u64,
    /// Of `input`, tokens read from the provider's prompt cache.
    pub cached_input: u64,
    /// Tokens written (reasoning included).
    pub output: u64,
}

/// The usage a whole JSON answer body reports, if it reports one.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    if body.len() > MAX_ANSWER_BYTES {
        return None;
    }
    let answer: Value = serde_json::from_slice(body).ok()?;
    // Responses API answers may nest it as `response.usage` (background polling).
    let usage = answer.get("usage").filter(|u| u.is_object());
    from_usage(usage.or_else(|| answer.get("response")?.get("usage"))?)
}

/// Reads a `usage` object in any of the shapes of the module doc.
pub fn from_usage(usage: &Value) -> Option<Usage> {
    let number = |name: &str| usage.get(name).and_then(Value::as_u64);
    let nested = |outer: &str, name: &str| usage.get(outer).and_then(|o| o.get(name)).and_then(Value::as_u64);
    if let Some(prompt) = number("prompt_tokens") {
        let output = number("completion_tokens").unwrap_or(0);
        let cached = nested("prompt_tokens_details", "cached_tokens").unwrap_or(0);
        return Some(Usage { input: prompt, cached_input: cached.min(prompt), output });
    }
    let input = number("input_tokens");
    let output = number("output_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    let created = number("cache_creation_input_tokens").unwrap_or(0);
    let read = number("cache_read_input_tokens").unwrap_or(0);
    if usage.get("cache_creation_input_tokens").is_some() || usage.get("cache_read_input_tokens").is_some() {
        let total = input.saturating_add(created).saturating_add(read);
        return Some(Usage { input: total, cached_input: read, output });
    }
    let cached = nested("input_tokens_details", "cached_tokens").unwrap_or(0);
    Some(Usage { input, cached_input: cached.min(input), output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached_input: u64, output: u64) -> Option<Usage> {
        Some(Usage { input, cached_input, output })
    }

    #[test]
    fn openai_chat_and_embeddings() {
        let chat = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,
            "total_tokens":29,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0}}}"#;
        assert_eq!(from_json(chat), usage(19, 8, 10));
        let embeddings = br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(from_json(embeddings), usage(8, 0, 0));
    }

    #[test]
    fn openai_responses() {
        let answer = br#"{"object":"response","usage":{"input_tokens":36,"input_tokens_details":
            {"cached_tokens":4},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":123}}"#;
        assert_eq!(from_json(answer), usage(36, 4, 87));
    }

    #[test]
    fn anthropic_counts_cache_tokens_as_input() {
        let answer = br#"{"type":"message","usage":{"input_tokens":100,"output_tokens":5,
            "cache_creation_input_tokens":20,"cache_read_input_tokens":10}}"#;
        assert_eq!(from_json(answer), usage(130, 10, 5));
        let plain = br#"{"type":"message","usage":{"input_tokens":12,"output_tokens":6}}"#;
        assert_eq!(from_json(plain), usage(12, 0, 6));
    }

    #[test]
    fn no_usage_is_none() {
        for body in [&br#"{"usage":null}"#[..], b"{}", b"[]", b"not json", br#"{"usage":{"total":3}}"#] {
            assert_eq!(from_json(body), None, "{}", String::from_utf8_lossy(body));
        }
        let negative = br#"{"usage":{"prompt_tokens":-1}}"#;
        assert_eq!(from_json(negative), None);
    }
}
