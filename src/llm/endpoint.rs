//! Which requests are LLM calls (docs/tokens.md: "Which calls take tokens").
//!
//! Decided from the head alone, before the body is read, so the proxy knows
//! whether to buffer and estimate at all.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method};

/// The API an LLM request speaks, by the last segments of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/chat/completions`: OpenAI and every OpenAI-compatible server.
    ChatCompletions,
    /// `/completions`: the legacy text completions API.
    Completions,
    /// `/responses`: OpenAI's Responses API.
    Responses,
    /// `/embeddings`: input only, no output tokens.
    Embeddings,
    /// `/messages`: Anthropic's Messages API.
    Messages,
}

/// The endpoint of a `POST` whose path ends in one of the LLM paths and
/// whose body is JSON; `None` for every other request.
///
/// A missing `Content-Type` counts as JSON: SDKs always send one, and a
/// hand-written `curl` that forgets it still reaches the API as JSON. A
/// type that says something else (a form, multipart) does not.
pub fn classify(method: &Method, path: &str, headers: &HeaderMap) -> Option<Endpoint> {
    if method != Method::POST || !is_json(headers) {
        return None;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    // `/chat/completions` before `/completions`, which it also ends with.
    const PATHS: [(&str, Endpoint); 5] = [
        ("/chat/completions", Endpoint::ChatCompletions),
        ("/completions", Endpoint::Completions),
        ("/responses", Endpoint::Responses),
        ("/embeddings", Endpoint::Embeddings),
        ("/messages", Endpoint::Messages),
    ];
    PATHS.iter().find(|(suffix, _)| path.ends_with(suffix)).map(|(_, endpoint)| *endpoint)
}

/// `application/json`, any `+json` type, or no type at all.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else { return true };
    let Ok(value) = value.to_str() else { return false };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn json() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        h
    }

    #[test]
    fn llm_paths_are_recognised() {
        let cases = [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/openai/v1/chat/completions/", Endpoint::ChatCompletions),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/responses", Endpoint::Responses),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/anthropic/v1/messages", Endpoint::Messages),
        ];
        for (path, want) in cases {
            assert_eq!(classify(&Method::POST, path, &json()), Some(want), "{path}");
        }
    }

    #[test]
    fn other_requests_take_no_tokens() {
        assert_eq!(classify(&Method::GET, "/v1/chat/completions", &json()), None);
        assert_eq!(classify(&Method::POST, "/v1/models", &json()), None);
        assert_eq!(classify(&Method::POST, "/v1/messages/count_tokens", &json()), None);
        assert_eq!(classify(&Method::POST, "/v1/responses/abc/cancel", &json()), None);
        let mut form = HeaderMap::new();
        form.insert(CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=x"));
        assert_eq!(classify(&Method::POST, "/v1/chat/completions", &form), None);
    }

    #[test]
    fn json_types() {
        assert_eq!(classify(&Method::POST, "/v1/messages", &HeaderMap::new()), Some(Endpoint::Messages));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("Application/Vnd.Api+JSON"));
        assert_eq!(classify(&Method::POST, "/v1/embeddings", &h), Some(Endpoint::Embeddings));
    }
}
