use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::llm::tokenizer::CHARS_PER_TOKEN;

const DEFAULT: u64 = 4096;

fn cost(endpoint: Endpoint, body: &Value) -> Estimate {
    estimate(endpoint, body.to_string().as_bytes(), DEFAULT)
}

fn tokens(encoding: Encoding, texts: &[&str]) -> u64 {
    let mut counter = Counter::new(encoding);
    texts.iter().for_each(|t| counter.text(t));
    counter.tokens()
}

#[test]
fn chat_counts_messages_with_framing() {
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How many tokens is this?"},
        ],
    });
    let text = tokens(
        Encoding::O200k,
        &["system", "You are a helpful assistant.", "user", "How many tokens is this?"],
    );
    let want = Estimate {
        input: text + 2 * TOKENS_PER_MESSAGE + REPLY_PRIMING,
        output: DEFAULT,
        basis: Basis::Counted(Encoding::O200k),
    };
    assert_eq!(cost(Endpoint::ChatCompletions, &body), want);
}

#[test]
fn content_parts_tools_and_tool_results_count() {
    let plain = json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]});
    let base = cost(Endpoint::ChatCompletions, &plain).input;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let body = json!({
        "model": "gpt-4",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}},
            ]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": schema}}],
    });
    let extra = image::OPENAI_BASE
        + 2 * TOKENS_PER_MESSAGE
        + tokens(
            Encoding::Cl100k,
            &[
                "assistant",
                "weather",
                "{\"city\":\"Paris\"}",
                "tool",
                "sunny",
                "weather",
                "Weather now",
                &schema.to_string(),
            ],
        );
    assert_eq!(cost(Endpoint::ChatCompletions, &body).input, base + extra);
}

#[test]
fn inline_images_cost_their_tiles_not_their_bytes() {
    use base64::Engine;
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\x04\0\0\0\x04\0".to_vec();
    png.extend(vec![0u8; 100_000]);
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]});
    let framing = TOKENS_PER_MESSAGE + REPLY_PRIMING + tokens(Encoding::O200k, &["user"]);
    assert_eq!(cost(Endpoint::ChatCompletions, &body).input, framing + 765);
}

#[test]
fn anthropic_counts_characters_system_and_tools() {
    let system = "You are terse.";
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "done"}]},
        ],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
    });
    let chars = |s: &str| (s.chars().count() as f64 / CHARS_PER_TOKEN).ceil() as u64;
    let want = [
        system,
        "user",
        "Hello there",
        "assistant",
        "f",
        "{\"a\":1}",
        "user",
        "done",
        "f",
        "d",
        "{\"type\":\"object\"}",
    ]
    .iter()
    .map(|s| chars(s))
    .sum::<u64>()
        + ANTHROPIC_TOOLS_PROMPT;
    let got = cost(Endpoint::Messages, &body);
    assert_eq!((got.input, got.output, got.basis), (want, 300, Basis::Counted(Encoding::Chars)));
}

#[test]
fn responses_and_embeddings() {
    let body =
        json!({"model": "gpt-5", "instructions": "Be brief.", "input": "Hello", "max_output_tokens": 50});
    let got = cost(Endpoint::Responses, &body);
    assert_eq!((got.input, got.output), (tokens(Encoding::O200k, &["Be brief.", "Hello"]), 50));
    let body = json!({"model": "text-embedding-3-small", "input": ["one two", "three"]});
    let got = cost(Endpoint::Embeddings, &body);
    assert_eq!((got.input, got.output), (tokens(Encoding::Cl100k, &["one two", "three"]), 0));
    let ids = json!({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]});
    assert_eq!(cost(Endpoint::Embeddings, &ids).input, 5);
}

/// Input the estimate cannot see makes it partial: calibrated, but not
/// taught from. A low-detail image and an inline one of known size are
/// counted whole.
#[test]
fn unseen_input_makes_a_partial_count() {
    let basis = |endpoint, body: Value| cost(endpoint, &body).basis;
    let chat = |part: Value| json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [part]}]});
    let partial = Basis::Partial(Encoding::O200k);
    let url = json!({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}});
    assert_eq!(basis(Endpoint::ChatCompletions, chat(url)), partial, "an image of unknown size");
    let low = json!({"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}});
    assert_eq!(basis(Endpoint::ChatCompletions, chat(low)), Basis::Counted(Encoding::O200k));
    let file = json!({"type": "file", "file": {"file_id": "file-1"}});
    assert_eq!(basis(Endpoint::ChatCompletions, chat(file)), partial, "a file");
    for (name, value) in [
        ("previous_response_id", json!("resp_1")),
        ("conversation", json!("conv_1")),
        ("prompt", json!({"id": "pmpt_1"})),
    ] {
        let mut body = json!({"model": "gpt-4o", "input": "and then?"});
        body[name] = value;
        assert_eq!(basis(Endpoint::Responses, body), partial, "{name}");
    }
    let plain = json!({"model": "gpt-4o", "input": "and then?", "previous_response_id": null});
    assert_eq!(basis(Endpoint::Responses, plain), Basis::Counted(Encoding::O200k));
    let pdf = json!({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}});
    let messages = json!({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": [pdf]}]});
    assert_eq!(basis(Endpoint::Messages, messages), Basis::Partial(Encoding::Chars), "a PDF");
}

#[test]
fn output_reservation_rules() {
    let chat = |extra: Value| {
        let mut body = json!({"model": "gpt-4o", "messages": []});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        cost(Endpoint::ChatCompletions, &body).output
    };
    assert_eq!(chat(json!({})), DEFAULT);
    assert_eq!(chat(json!({"max_tokens": 100})), 100);
    assert_eq!(chat(json!({"max_tokens": 100, "max_completion_tokens": 200})), 200);
    assert_eq!(chat(json!({"max_tokens": 100, "n": 3})), 300);
    assert_eq!(chat(json!({"max_tokens": 100, "n": 0})), 100);
    assert_eq!(chat(json!({"max_tokens": 10, "n": 1_000_000})), 10 * MAX_CHOICES);
    assert_eq!(chat(json!({"max_tokens": u64::MAX, "n": 2})), u64::MAX);
    assert_eq!(chat(json!({"max_tokens": "lots", "n": -2})), DEFAULT);
    let legacy =
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "max_tokens": 7, "n": 2, "best_of": 5});
    assert_eq!(cost(Endpoint::Completions, &legacy).output, 35);
    let messages = json!({"model": "claude-haiku-4-5", "messages": []});
    assert_eq!(cost(Endpoint::Messages, &messages).output, DEFAULT);
}

#[test]
fn unreadable_bodies_get_the_fallback() {
    let fallback = |body: &[u8], endpoint| estimate(endpoint, body, DEFAULT);
    assert_eq!(
        fallback(b"not json at all", Endpoint::ChatCompletions),
        Estimate { input: 4, output: DEFAULT, basis: Basis::Fallback }
    );
    assert_eq!(
        fallback(b"[1, 2]", Endpoint::Embeddings),
        Estimate { input: 2, output: 0, basis: Basis::Fallback }
    );
    let deep = format!("{{\"model\":{}1{}}}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert_eq!(fallback(deep.as_bytes(), Endpoint::Messages).basis, Basis::Fallback);
    let brackets_in_strings = format!("{{\"prompt\":\"{}\"}}", "[{".repeat(1000));
    assert!(matches!(
        fallback(brackets_in_strings.as_bytes(), Endpoint::Completions).basis,
        Basis::Counted(_)
    ));
    let huge = vec![b' '; MAX_PARSE_BYTES + 1];
    assert_eq!(fallback(&huge, Endpoint::Responses).input, (MAX_PARSE_BYTES as u64 + 1).div_ceil(4));
}

/// JSON with the names the estimator looks for, nested at random.
fn hostile_json() -> impl Strategy<Value = Value> {
    const NAMES: [&str; 22] = [
        "messages",
        "content",
        "type",
        "image_url",
        "url",
        "detail",
        "source",
        "data",
        "input",
        "tools",
        "parameters",
        "input_schema",
        "n",
        "best_of",
        "max_tokens",
        "system",
        "prompt",
        "role",
        "text",
        "image",
        "document",
        "input_audio",
    ];
    let name = prop_oneof![prop::sample::select(&NAMES[..]).prop_map(String::from), "\\PC{0,8}"];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop::sample::select(&NAMES[..]).prop_map(Value::from),
        "data:image/png;base64,[A-Za-z0-9+/=]{0,40}".prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(8, 128, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((name.clone(), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

const ENDPOINTS: [Endpoint; 5] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Messages,
];

proptest! {
    #[test]
    fn hostile_json_never_panics(
        body in hostile_json(),
        model in prop::sample::select(&["gpt-4o", "gpt-4", "claude-3-opus", "llama", ""][..]),
    ) {
        let body = match body {
            Value::Object(mut o) => { o.insert("model".into(), model.into()); Value::Object(o) }
            other => other,
        };
        for endpoint in ENDPOINTS {
            let got = estimate(endpoint, body.to_string().as_bytes(), DEFAULT);
            prop_assert!(endpoint != Endpoint::Embeddings || got.output == 0);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        for endpoint in ENDPOINTS {
            let _ = estimate(endpoint, &body, DEFAULT);
        }
    }

    #[test]
    fn nesting_never_panics(depth in 0usize..10_000, open in prop::sample::select(&["[", "{\"a\":"][..])) {
        let body = format!("{{\"messages\":{}", open.repeat(depth));
        for endpoint in ENDPOINTS {
            let _ = estimate(endpoint, body.as_bytes(), DEFAULT);
        }
    }
}
