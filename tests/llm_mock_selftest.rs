//! Proves the shared mock LLM API itself (shapes, streaming frame by frame,
//! the token window and its headers), so tests and benchmarks that use it
//! can trust what it reports.
//!
//! Real sockets and the real clock; windows are short and margins generous.

#[path = "support/llm_mock.rs"]
mod llm_mock;

use std::time::{Duration, SystemTime};

use llm_mock::{LlmBehaviour, LlmMock, go_duration, prompt_tokens, rfc3339_ceil};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Bounds every wait in this file; nothing here should come near it.
const PATIENCE: Duration = Duration::from_secs(5);

/// reqwest 0.13 builds its rustls config even for plain http, so it needs a
/// crypto provider installed first; ring is the one pacegate already links.
fn client() -> reqwest::Client {
    // Err only means another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().expect("client with a crypto provider")
}

async fn post(mock: &LlmMock, path: &str, body: &Value) -> reqwest::Response {
    client().post(format!("{}{path}", mock.url())).json(body).send().await.expect("the mock answers")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers().get(name).map_or("", |v| v.to_str().unwrap_or(""))
}

/// The `data:` payloads of a body of server-sent events, with their `event:` names.
fn events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n").filter(|b| !b.is_empty()) {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v.to_string();
            }
        }
        out.push((name, data));
    }
    out
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    body
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let mock = LlmMock::start(LlmBehaviour::new().output_len(30)).await;
    // "user" + 16 characters = 20 characters: 5 prompt tokens.
    let body = chat("sixteen chars!!!", json!({"max_tokens": 12}));
    assert_eq!(prompt_tokens(&body), 5);
    let resp = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), "", "no window, no headers");
    let answer: Value = resp.json().await.expect("JSON");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["choices"][0]["message"]["content"].as_str().map(|t| t.split(' ').count()), Some(12));
    assert_eq!(answer["usage"], json!({"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}));

    let resp = post(&mock, "/v1/chat/completions", &chat("x", json!({"n": 2}))).await;
    let answer: Value = resp.json().await.expect("JSON");
    assert_eq!(answer["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(answer["choices"][1]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["completion_tokens"], 60);
    let arrivals = mock.arrivals();
    assert_eq!(
        (arrivals[0].model.as_str(), arrivals[0].prompt_tokens, arrivals[0].completion_tokens),
        ("gpt-4o-mini", 5, 12)
    );
}

#[tokio::test]
async fn embeddings_and_messages_shapes() {
    let mock = LlmMock::start(LlmBehaviour::new().output_len(7)).await;
    let resp =
        post(&mock, "/v1/embeddings", &json!({"model": "text-embedding-3-small", "input": ["abcd", "efgh"]}))
            .await;
    let answer: Value = resp.json().await.expect("JSON");
    assert_eq!(answer["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(answer["usage"], json!({"prompt_tokens": 2, "total_tokens": 2}));

    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 100, "system": "abcd",
        "messages": [{"role": "user", "content": "abcd"}]});
    let answer: Value = post(&mock, "/v1/messages", &body).await.json().await.expect("JSON");
    assert_eq!(
        (answer["type"].as_str(), answer["stop_reason"].as_str()),
        (Some("message"), Some("end_turn"))
    );
    assert_eq!(answer["content"][0]["type"], "text");
    assert_eq!(answer["usage"], json!({"input_tokens": 3, "output_tokens": 7}));
}

#[tokio::test]
async fn bad_requests_answer_in_the_providers_shapes() {
    let mock = LlmMock::start(LlmBehaviour::new()).await;
    let resp = post(&mock, "/v1/messages", &json!({"model": "claude", "messages": []})).await;
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.expect("JSON");
    assert_eq!(answer["error"]["type"], "invalid_request_error");
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .body("{nope")
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 400);
    assert_eq!(post(&mock, "/v1/models", &json!({})).await.status(), 404);
    let resp = client().get(format!("{}/v1/chat/completions", mock.url())).send().await.expect("answer");
    assert_eq!(resp.status(), 405);
    assert_eq!(mock.count(), 0, "refused before the window, so not recorded");
}

#[tokio::test]
async fn openai_stream_arrives_frame_by_frame_with_the_usage_chunk() {
    let interval = Duration::from_millis(60);
    let mock = LlmMock::start(LlmBehaviour::new().output_len(10).stream_chunks(4, interval)).await;
    let body = chat("abcdefghijkl", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let mut resp = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    let (start, mut frames) = (Instant::now(), Vec::new());
    while let Some(chunk) = resp.chunk().await.expect("a frame") {
        frames.push((start.elapsed(), String::from_utf8(chunk.to_vec()).expect("UTF-8")));
    }
    // Role, 3 deltas (4 + 4 + 2 tokens), finish, usage, [DONE].
    assert_eq!(frames.len(), 7, "{frames:?}");
    // Spaced by the interval as sent; counted from the first frame, which
    // a busy machine may hand over late (with the head): up to an interval
    // of that is allowed. A buffered stream would bring them all at once.
    let first = frames[0].0;
    for (i, (at, frame)) in frames.iter().enumerate() {
        assert_eq!(events(frame).len(), 1, "one event per frame: {frame:?}");
        let spaced = interval * (i as u32).saturating_sub(1);
        assert!(*at - first >= spaced, "frame {i} at {at:?}, the first at {first:?}");
    }
    let all: String = frames.iter().map(|(_, f)| f.as_str()).collect();
    let payloads: Vec<String> = events(&all).into_iter().map(|(_, d)| d).collect();
    let chunks: Vec<Value> = payloads[..6].iter().map(|d| serde_json::from_str(d).expect("JSON")).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.split(' ').count(), 10);
    assert!(chunks[..5].iter().all(|c| c["usage"].is_null() && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"], json!({"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}));
    assert_eq!(payloads[6], "[DONE]");

    let body = chat("abcdefghijkl", json!({"stream": true}));
    let text = post(&mock, "/v1/chat/completions", &body).await.text().await.expect("body");
    assert!(!text.contains("usage"), "no usage without include_usage: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn anthropic_stream_events_in_order() {
    let mock = LlmMock::start(LlmBehaviour::new().output_len(50).stream_chunks(8, Duration::ZERO)).await;
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "abcdefgh"}]});
    let text = post(&mock, "/v1/messages", &body).await.text().await.expect("body");
    let events = events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let want = [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ];
    assert_eq!(names, want);
    let data: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).expect("JSON")).collect();
    for ((name, _), value) in events.iter().zip(&data) {
        assert_eq!(value["type"].as_str(), Some(name.as_str()));
    }
    assert_eq!(data[0]["message"]["usage"], json!({"input_tokens": 3, "output_tokens": 1}));
    assert_eq!(data[6]["usage"], json!({"output_tokens": 20}));
    assert_eq!(data[6]["delta"]["stop_reason"], "max_tokens");
}

#[tokio::test]
async fn the_token_window_answers_429_with_the_providers_headers() {
    let window = Duration::from_millis(600);
    let mock = LlmMock::start(LlmBehaviour::new().output_len(20).token_limit(100, window)).await;
    // 80 characters of "user" + content: 20 prompt tokens, 20 completion: 40 a request.
    let body = chat(&"x".repeat(76), json!({}));
    let first = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "100");
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "60");
    let reset = header(&first, "x-ratelimit-reset-tokens");
    assert!(reset.ends_with("ms") && reset != "0s", "{reset}");
    assert_eq!(post(&mock, "/v1/chat/completions", &body).await.status(), 200);
    let refused = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-remaining-tokens"), "20");
    assert_eq!(header(&refused, "retry-after"), "1");
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");

    // Anthropic's headers share the window; the reset is a date within it.
    let claude =
        json!({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "abcd"}]});
    let resp = post(&mock, "/v1/messages", &claude).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "anthropic-ratelimit-tokens-remaining"), "13");
    let reset = header(&resp, "anthropic-ratelimit-tokens-reset");
    let now = rfc3339_ceil(SystemTime::now());
    let later = rfc3339_ceil(SystemTime::now() + window + Duration::from_secs(1));
    assert!(reset.len() == 20 && *reset >= *now.as_str() && *reset <= *later.as_str(), "{reset}");
    let error: Value = post(
        &mock,
        "/v1/messages",
        &json!({"model": "claude", "max_tokens": 90,
        "messages": [{"role": "user", "content": "abcd"}]}),
    )
    .await
    .json()
    .await
    .expect("JSON");
    assert_eq!(error["error"]["type"], "rate_limit_error");

    // Once the window has passed, the quota is whole again.
    tokio::time::sleep(window).await;
    let resp = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!((resp.status().as_u16(), header(&resp, "x-ratelimit-remaining-tokens")), (200, "60"));
    assert_eq!(mock.count_status(429), 2);
    assert_eq!(mock.tokens_charged(), 40 + 40 + 7 + 40);
    assert_eq!(mock.max_tokens_in_window(window), 87);
}

#[tokio::test]
async fn a_request_that_never_fits_waits_a_whole_window() {
    let mock = LlmMock::start(LlmBehaviour::new().token_limit(10, Duration::from_secs(3))).await;
    let resp = post(&mock, "/v1/chat/completions", &chat(&"x".repeat(100), json!({}))).await;
    assert_eq!((resp.status().as_u16(), header(&resp, "retry-after")), (429, "3"));
    assert_eq!(header(&resp, "x-ratelimit-reset-tokens"), "0s");
}

#[test]
fn header_formats() {
    assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
    assert_eq!(go_duration(Duration::from_millis(3_723_500)), "1h2m3.5s");
    assert_eq!(go_duration(Duration::from_micros(500)), "500µs");
    assert_eq!(go_duration(Duration::ZERO), "0s");
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_755_780_059_001);
    assert_eq!(rfc3339_ceil(at), "2025-08-21T12:41:00Z");
    assert_eq!(
        rfc3339_ceil(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
        "2000-02-29T00:00:00Z"
    );
}

/// pacegate's own readers agree with the mock: the usage scanner on its
/// streams, the header parser on its window's headers.
#[tokio::test]
async fn pacegate_reads_what_the_mock_writes() {
    use pacegate::llm::{UsageScanner, token_hints, usage_from_json};

    let mock =
        LlmMock::start(LlmBehaviour::new().output_len(9).token_limit(1000, Duration::from_secs(60))).await;
    let openai = chat("abcdefghijkl", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let claude = json!({"model": "claude", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "abcd"}]});
    for (path, body, input) in [("/v1/chat/completions", openai, 4), ("/v1/messages", claude, 2)] {
        let mut resp = post(&mock, path, &body).await;
        let hints = token_hints(resp.headers(), SystemTime::now());
        let tokens = hints.tokens.expect("the window's headers parse");
        assert_eq!(tokens.limit, Some(1000));
        assert!(tokens.reset_after <= Duration::from_secs(61), "{path}: {tokens:?}");
        let mut scanner = UsageScanner::new();
        while let Some(chunk) = resp.chunk().await.expect("a frame") {
            scanner.feed(&chunk);
        }
        scanner.finish();
        let usage = scanner.usage().expect("the stream reports usage");
        assert_eq!((usage.input, usage.output, scanner.is_complete()), (input, 9, true), "{path}");
    }
    let body = chat("abcd", json!({}));
    let answer = post(&mock, "/v1/chat/completions", &body).await.bytes().await.expect("body");
    assert_eq!(usage_from_json(&answer).map(|u| (u.input, u.output)), Some((2, 9)));
}
