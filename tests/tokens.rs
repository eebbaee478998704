//! Token quotas end to end (issue 17): LLM calls through a real pacegate to
//! the mock LLM API with its strict token window.
//!
//! Real sockets and the real clock: windows are short (a second), counts
//! are scaled down from the issue's so the file runs in seconds, and every
//! timing assertion leaves a wide margin on the side that does not matter.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::llm_mock::{LlmBehaviour, LlmMock, prompt_tokens};
use support::redis_server::RedisServer;
use support::{Pacegate, TEST_SERVER, assert_pacegate_error, client, upstream};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bounds every single wait in this file.
const PATIENCE: Duration = Duration::from_secs(20);

/// An upstream `llm` for `mock`, its request rate out of the way.
async fn pacegate(mock: &LlmMock, keys: &str) -> Pacegate {
    Pacegate::start(&upstream("llm", &mock.url(), &format!("rate = \"1000/s\"\n{keys}"))).await
}

/// English-like text of about `tokens` tokens (four characters each).
fn prose(tokens: usize) -> String {
    const WORDS: [&str; 8] = ["quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs ", "again "];
    let mut text = String::new();
    for word in WORDS.iter().cycle() {
        if text.len() >= tokens * 4 {
            break;
        }
        text.push_str(word);
    }
    text
}

/// A chat completion; `stream` asks for the final usage chunk too.
fn chat(prompt: &str, max_tokens: Option<u64>, stream: bool) -> Value {
    let mut body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]});
    if let Some(max) = max_tokens {
        body["max_tokens"] = json!(max);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// An Anthropic message (its `max_tokens` is required).
fn message(prompt: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": prompt}]})
}

async fn post(pacegate: &Pacegate, path: &str, body: &Value) -> reqwest::Response {
    let request = client().post(pacegate.url(&format!("/llm{path}"))).json(body).timeout(PATIENCE);
    request.send().await.expect("pacegate answers")
}

/// Milliseconds the answer says its request waited in pacegate's queue.
fn queued_ms(response: &reqwest::Response) -> u64 {
    let value = response.headers().get("x-pacegate-queued-ms").expect("x-pacegate-queued-ms");
    value.to_str().unwrap().parse().expect("a number")
}

fn tokens_status(status: &Value) -> Value {
    status["upstreams"][0]["tokens"].clone()
}

/// Waits (bounded) until every reservation is settled.
async fn settled(pacegate: &Pacegate) -> Value {
    let done = |s: &Value| tokens_status(s)["reserved_in_flight"] == 0;
    assert!(pacegate.wait_status(PATIENCE, done).await, "reservations still in flight");
    tokens_status(&pacegate.status().await)
}

/// The mock with a strict sliding second of `limit` tokens, answers of 40
/// tokens, streamed in events of 8 tokens 5 ms apart.
async fn strict_second(limit: u64) -> LlmMock {
    let second = Duration::from_secs(1);
    let behaviour = LlmBehaviour::new()
        .token_limit(limit, second)
        .output_len(40)
        .stream_chunks(8, Duration::from_millis(5));
    LlmMock::start(behaviour).await
}

/// Sends every `(path, body)` through `pacegate` at once; each answer's
/// status and whole body, in the order of `calls`.
async fn send_all(
    pacegate: &Pacegate,
    calls: impl Iterator<Item = (&'static str, Value)>,
) -> Vec<(u16, String)> {
    let mut sent = JoinSet::new();
    for (i, (path, body)) in calls.enumerate() {
        let url = pacegate.url(&format!("/llm{path}"));
        sent.spawn(async move {
            let response = client().post(url).json(&body).timeout(PATIENCE).send().await.expect("answer");
            (i, response.status().as_u16(), response.text().await.expect("whole body"))
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = sent.join_next().await {
        answers.push(answer.expect("call"));
    }
    answers.sort_by_key(|(i, _, _)| *i);
    answers.into_iter().map(|(_, status, text)| (status, text)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_calls_keep_inside_a_strict_token_window() {
    // pacegate paces at 2000 tokens/s; the mock allows 2300 in any sliding
    // second: a post-paid quota lets one request's cost past N in a window.
    let window = Duration::from_secs(1);
    let mock = strict_second(2300).await;
    let pacegate = pacegate(&mock, "tokens = \"2000/s\"\ndefault_max_tokens = 256\n").await;

    let started = Instant::now();
    let calls = (0..60usize).map(|i| {
        let prompt = prose(10 + i * 37 % 150);
        let max_tokens = [Some(16), Some(64), Some(200), None][i % 4];
        let stream = i % 2 == 0;
        if i % 3 == 0 {
            ("/v1/messages", message(&prompt, max_tokens.unwrap_or(100), stream))
        } else {
            ("/v1/chat/completions", chat(&prompt, max_tokens, stream))
        }
    });
    for (i, (status, text)) in send_all(&pacegate, calls).await.into_iter().enumerate() {
        assert_eq!(status, 200, "{text}");
        if i % 2 == 0 {
            assert!(
                text.ends_with("data: [DONE]\n\n") || text.contains("message_stop"),
                "whole stream: {text}"
            );
        }
    }
    let elapsed = started.elapsed();
    let rate_limited = mock.count_status(429);
    assert!(rate_limited <= 3, "{rate_limited} calls met the mock's 429");
    assert!(mock.max_tokens_in_window(window) <= 2300);
    // No stall: the whole mix within three times what its tokens take at
    // 2000 a second, plus 3 s. Unloaded it takes 1.9 times; with two other
    // processes busy on both cores and another test beside it, up to 2.8
    // (2x + 2 s failed there, with and without the window's ledger). That
    // settled usage paces, not reservations, `follow_up_wait` measures.
    let charged = mock.tokens_charged();
    let ideal = charged as f64 / 2000.0;
    assert!(elapsed.as_secs_f64() < 3.0 * ideal + 3.0, "{charged} tokens took {elapsed:?}");

    let tokens = settled(&pacegate).await;
    assert!(tokens["calibration"]["samples"].as_u64().is_some_and(|n| n > 0), "{tokens}");
    let sent = tokens["sent_last_minute"].as_u64().expect("sent");
    assert!(sent >= charged, "settled {sent} of the {charged} the mock charged (429s count nothing)");
    let input = pacegate.metric("pacegate_tokens_total{upstream=\"llm\",kind=\"input\"}").await;
    let output = pacegate.metric("pacegate_tokens_total{upstream=\"llm\",kind=\"output\"}").await;
    let completion: u64 =
        mock.arrivals().iter().filter(|a| a.status == 200).map(|a| a.completion_tokens).sum();
    assert_eq!(output, Some(completion as f64), "output as the answers reported it");
    assert!(input.is_some_and(|i| i > 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_reaches_the_caller_frame_by_frame_and_settles_at_its_end() {
    let behaviour = LlmBehaviour::new().output_len(40).stream_chunks(8, Duration::from_millis(100));
    let mock = LlmMock::start(behaviour).await;
    let pacegate = pacegate(&mock, "tokens = \"100000/min\"\n").await;
    let body = chat(&prose(30), Some(1000), true);
    let mut response = post(&pacegate, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let sent = Instant::now();
    let mut arrivals = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("a frame") {
        arrivals.push((sent.elapsed(), chunk.len()));
    }
    // 9 events 100 ms apart: each must be seen as it comes, not all at the end.
    let spread = arrivals.last().map(|(at, _)| *at).unwrap_or_default() - arrivals[0].0;
    assert!(arrivals.len() >= 5, "{arrivals:?}");
    assert!(spread >= Duration::from_millis(500), "frames held back: {arrivals:?}");
    let first_half = arrivals.iter().filter(|(at, _)| *at < spread / 2).count();
    assert!(first_half >= 2, "frames arrive as they are sent: {arrivals:?}");

    let tokens = settled(&pacegate).await;
    let arrival = &mock.arrivals()[0];
    let used = arrival.prompt_tokens + arrival.completion_tokens;
    assert_eq!(tokens["sent_last_minute"], used, "settled to the final usage chunk: {tokens}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_at_the_providers_exact_limit_draws_no_429() {
    // Even spacing alone lets a window hold 2000 tokens plus one call's:
    // against a strict sliding second of 2000 that is a 429 in many
    // windows. The quota's ledger keeps every window within 2000.
    let mock = strict_second(2000).await;
    let pacegate = pacegate(&mock, "tokens = \"2000/s\"\n").await;
    let started = Instant::now();
    // Anthropic calls: their character estimate is never below the mock's
    // count, so no answer reports more than was reserved.
    let calls = (0..40usize)
        .map(|i| ("/v1/messages", message(&prose(20 + i * 53 % 250), [16, 64, 128][i % 3], i % 2 == 0)));
    for (status, text) in send_all(&pacegate, calls).await {
        assert_eq!(status, 200, "{text}");
    }
    let elapsed = started.elapsed();
    // One arrival held up on its way for more than the window's margin
    // (5 ms) may still meet a full window on a loaded machine.
    let rate_limited = mock.count_status(429);
    assert!(rate_limited <= 1, "{rate_limited} calls met the mock's 429");
    let ideal = mock.tokens_charged() as f64 / 2000.0;
    assert!(elapsed.as_secs_f64() < 2.0 * ideal + 2.0, "{ideal:.1} s of tokens took {elapsed:?}");
}

/// Sends a call that reserves ~500 output tokens but uses 10, then a small
/// one right after its answer ended: how long the second one queued (ms).
async fn follow_up_wait(accounting: &str, stream: bool) -> u64 {
    let mock = LlmMock::start(LlmBehaviour::new().output_len(10)).await;
    let keys = format!("tokens = \"600/s\"\ntoken_accounting = \"{accounting}\"\n");
    let pacegate = pacegate(&mock, &keys).await;
    let first = post(&pacegate, "/v1/chat/completions", &chat(&prose(10), Some(500), stream)).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("whole first answer");
    let second = post(&pacegate, "/v1/chat/completions", &chat(&prose(10), Some(10), false)).await;
    assert_eq!(second.status(), 200);
    queued_ms(&second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_gives_unused_tokens_back_and_reserved_accounting_keeps_them() {
    // 510+ tokens at 600/s owe ~850 ms; 30 used owe ~50 ms.
    for stream in [false, true] {
        let waited = follow_up_wait("usage", stream).await;
        assert!(waited < 300, "stream {stream}: the follow-up waited {waited} ms for unused tokens");
    }
    let waited = follow_up_wait("reserved", false).await;
    assert!(waited >= 600, "the output reservation stands: the follow-up waited only {waited} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_larger_than_a_token_quota_is_refused_and_never_sent() {
    let mock = LlmMock::start(LlmBehaviour::new()).await;
    let pacegate = pacegate(&mock, "tokens = \"1000/min\"\n").await;
    let response = post(&pacegate, "/v1/chat/completions", &chat(&prose(10), Some(5000), false)).await;
    let body = assert_pacegate_error(response, 413, "cost_exceeds_quota", Some("llm")).await;
    let message = body["message"].as_str().unwrap_or("");
    assert!(message.contains("tokens"), "names the quota: {message}");
    // Without max_tokens the default (4096) is reserved: too much as well.
    let response = post(&pacegate, "/v1/chat/completions", &chat(&prose(10), None, false)).await;
    assert_eq!(response.status(), 413);
    let small = post(&pacegate, "/v1/chat/completions", &chat(&prose(10), Some(50), false)).await;
    assert_eq!(small.status(), 200);
    assert_eq!(mock.count(), 1, "only the call that fits was sent");
}

/// Usage is read from the answer as it passes: an LLM call asks for an
/// uncompressed answer whatever its caller accepts. A body too large to
/// buffer (an image in a data URL) is priced from its size, but never
/// above what the quota can hold: it waits, it is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_calls_ask_for_identity_and_a_large_body_is_not_refused_on_a_guess() {
    let mock = LlmMock::start(LlmBehaviour::new()).await;
    let server = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\nmax_body_bytes = 4096\n";
    let llm = upstream("llm", &mock.url(), "rate = \"1000/s\"\ntokens = \"100000/min\"");
    let pacegate = Pacegate::start_config(&format!("{server}{llm}")).await;
    // 1 MB of text to a 4 KiB buffer: streamed, and 262 144 tokens by size alone.
    let large = chat(&"a".repeat(1 << 20), Some(50), false);
    let request =
        client().post(pacegate.url("/llm/v1/chat/completions")).header("accept-encoding", "gzip, br");
    let answer = request.json(&large).timeout(PATIENCE).send().await.expect("an answer");
    assert_eq!(answer.status(), 200, "{:?}", answer.headers());
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].headers["accept-encoding"], "identity");
}

/// The mock counts an image by URL as text (its prompt rule), far from the
/// default the estimate gives it: that answer must not move calibration,
/// which is about the count's error. A plain call's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_learns_from_whole_counts_only() {
    let mock = LlmMock::start(LlmBehaviour::new().output_len(5)).await;
    let pacegate = pacegate(&mock, "tokens = \"100000/min\"\n").await;
    let image = json!({"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}});
    let with_image = json!({"model": "gpt-4o-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prose(20)}, image]}]});
    let answer = post(&pacegate, "/v1/chat/completions", &with_image).await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("whole answer");
    let tokens = settled(&pacegate).await;
    assert_eq!(tokens["calibration"]["samples"], 0, "an estimate with an image of unknown size: {tokens}");
    let answer = post(&pacegate, "/v1/chat/completions", &chat(&prose(20), Some(5), false)).await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("whole answer");
    let tokens = settled(&pacegate).await;
    assert_eq!(tokens["calibration"]["samples"], 1, "a whole count: {tokens}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_quota_pauses_sending_until_its_reset() {
    // The first call takes the mock's whole window: its answer says 0 remain.
    let first = chat(&prose(40), Some(20), false);
    let cost = prompt_tokens(&first) + 20;
    let window = Duration::from_secs(1);
    let mock = LlmMock::start(LlmBehaviour::new().token_limit(cost, window).output_len(20)).await;
    let pacegate = pacegate(&mock, "tokens = \"100000/s\"\n").await;
    let answer = post(&pacegate, "/v1/chat/completions", &first).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-ratelimit-remaining-tokens"], "0");
    answer.bytes().await.expect("whole answer");
    // Requests that take no tokens are not held up by it.
    let other = client().get(pacegate.url("/llm/v1/models")).timeout(PATIENCE).send().await.expect("answer");
    assert_eq!(other.status(), 404, "the mock's own answer");
    assert!(queued_ms(&other) < 200, "a request without tokens waited {} ms", queued_ms(&other));
    let second = post(&pacegate, "/v1/chat/completions", &chat(&prose(5), Some(5), false)).await;
    assert_eq!(second.status(), 200);
    assert_eq!(mock.count_status(429), 0, "the second call waited for the reset instead of a 429");
    assert_eq!(support::attempts_of(&second), 1);
    let calls: Vec<Instant> =
        mock.arrivals().iter().filter(|a| a.path.ends_with("/completions")).map(|a| a.at).collect();
    let [first_at, second_at] = calls[..] else { panic!("two calls reached the mock: {calls:?}") };
    let apart = second_at - first_at;
    assert!(apart >= window - Duration::from_millis(50), "sent before the reset: {apart:?} after the first");
}

/// Two replicas of an upstream `llm` for `mock`, sharing `redis`. A Redis
/// call may take 2 s, not 250 ms: a loaded machine answers late, and a
/// replica that fell back to its own pacer would not share the quota.
async fn replicas(redis: &RedisServer, mock: &LlmMock, keys: &str) -> [Pacegate; 2] {
    let llm = upstream("llm", &mock.url(), &format!("rate = \"1000/s\"\n{keys}"));
    let redis = format!("[redis]\nurl = \"{}\"\non_error = \"local\"\ntimeout = \"2s\"\n", redis.url());
    let text = format!("{TEST_SERVER}\n{redis}\n{llm}");
    [Pacegate::start_config(&text).await, Pacegate::start_config(&text).await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_through_redis_share_one_token_quota() {
    // Each replica alone would pace at 1000 tokens/s, so together they
    // would send twice that: only the shared schedule keeps the tokens
    // arriving in any second within 1000 plus one call and some jitter.
    let window = Duration::from_secs(1);
    let mock = LlmMock::start(LlmBehaviour::new().output_len(40)).await;
    let redis = RedisServer::start().await;
    let replicas = replicas(&redis, &mock, "tokens = \"1000/s\"\n").await;
    // One small call each first, so that each replica's connections are
    // open. Anthropic calls: their character estimate is cheap, where a
    // debug build's tokenizer would load the machine.
    for replica in &replicas {
        let warm_up = post(replica, "/v1/messages", &message("hello", 5, false)).await;
        assert_eq!(warm_up.status(), 200);
        warm_up.bytes().await.expect("whole warm-up answer");
    }

    // 30 calls of ~100 tokens each, half streamed, all at once: 3 s shared.
    let mut calls = JoinSet::new();
    for i in 0..30usize {
        let body = message(&prose(50 + i % 20), 40, i % 2 == 0);
        let url = replicas[i % 2].url("/llm/v1/messages");
        calls.spawn(async move {
            let response = client().post(url).json(&body).timeout(PATIENCE).send().await.expect("answer");
            (response.status().as_u16(), response.text().await.expect("whole body"))
        });
    }
    while let Some(call) = calls.join_next().await {
        let (status, text) = call.expect("call");
        assert_eq!(status, 200, "{text}");
    }
    // Every decision was shared: no replica fell back to its own pacer.
    for replica in &replicas {
        assert_eq!(replica.metric("pacegate_redis_fallbacks_total").await, Some(0.0), "a replica fell back");
        let sent = &replica.status().await["upstreams"][0]["attempts"]["ok"];
        assert_eq!(sent.as_u64(), Some(16), "each replica sent its warm-up and its 15 calls: {sent}");
    }
    assert_eq!(mock.count(), 32, "each call sent once");
    // 1000 tokens a second plus one call (at most ~115 tokens), and 135
    // more for arrivals up to ~0.13 s later than their grant on a loaded
    // machine. Unshared, the two replicas would send ~2000 in a second.
    let busiest = mock.max_tokens_in_window(window);
    assert!(busiest <= 1250, "{busiest} tokens reached the mock in one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_through_one_replica_lets_the_other_send_earlier() {
    // 100 tokens/s: a call reserving ~510 tokens owes 5 s of the shared
    // schedule; settled to the ~21 it used, it owes 0.2 s.
    let mock = LlmMock::start(LlmBehaviour::new().output_len(10)).await;
    let redis = RedisServer::start().await;
    let [a, b] = replicas(&redis, &mock, "tokens = \"6000/min\"\n").await;
    let server_time = || -> u64 {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut redis.connection()).expect("TIME");
        secs * 1_000_000 + micros
    };
    let shared_schedule = || -> Option<u64> {
        redis::cmd("HGET")
            .arg("pacegate:{llm}:0000000000000000:quotas")
            .arg("limit:tokens:1")
            .query(&mut redis.connection())
            .expect("HGET")
    };

    let first = post(&a, "/v1/chat/completions", &chat(&prose(10), Some(500), false)).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("whole first answer");
    let answered = server_time();
    // Replica A corrects the shared schedule in the background once its
    // answer ended: wait (bounded) for it to come back from ~5 s ahead
    // (less the time the answer took) to about now.
    let deadline = Instant::now() + PATIENCE / 4;
    let mut settled = false;
    while !settled && Instant::now() < deadline {
        settled = shared_schedule().is_some_and(|tat| tat < answered + 2_500_000);
        if !settled {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(settled, "the shared schedule still holds the reservation: {:?}", shared_schedule());

    let second = post(&b, "/v1/chat/completions", &chat(&prose(10), Some(10), false)).await;
    assert_eq!(second.status(), 200);
    let waited = queued_ms(&second);
    assert!(waited < 2000, "replica B waited {waited} ms for tokens A gave back");
    assert_eq!(mock.count(), 2);
}

/// A call's answer to come.
type Pending = tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>;

/// One call that the mock's token window holds with 10 tokens to spare,
/// then a second that it refuses (429). Returns once pacegate saw the 429:
/// the mock, pacegate, the upstream's status then, and the second call.
async fn a_second_call_refused(behaviour: LlmBehaviour, keys: &str) -> (LlmMock, Pacegate, Value, Pending) {
    let first = chat(&prose(40), Some(20), false);
    let cost = prompt_tokens(&first) + 20;
    let mock = LlmMock::start(behaviour.token_limit(cost + 10, Duration::from_secs(2)).output_len(20)).await;
    let pacegate = pacegate(&mock, keys).await;
    let answer = post(&pacegate, "/v1/chat/completions", &first).await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("whole answer");

    let url = pacegate.url("/llm/v1/chat/completions");
    let second = tokio::spawn(client().post(url).json(&first).timeout(PATIENCE).send());
    let rate_limited = |s: &Value| !s["upstreams"][0]["last_rate_limited"].is_null();
    assert!(pacegate.wait_status(PATIENCE, rate_limited).await, "the mock's 429 was not seen");
    let upstream = pacegate.status().await["upstreams"][0].clone();
    assert!(upstream["cooldown"].is_null(), "the whole upstream cools down: {upstream}");
    assert!(!upstream["tokens"]["quotas"][0]["cooldown"].is_null(), "the token quota does not: {upstream}");
    (mock, pacegate, upstream, second)
}

/// Requests that take no tokens are not held up by a token quota's
/// cooldown, and the refused call is retried once it ends.
async fn only_the_token_quota_waited(pacegate: &Pacegate, second: Pending) {
    let other = client().get(pacegate.url("/llm/v1/models")).timeout(PATIENCE).send().await.expect("answer");
    assert_eq!(other.status(), 404, "the mock's own answer");
    assert!(queued_ms(&other) < 500, "a request without tokens waited {} ms", queued_ms(&other));
    let second = second.await.expect("task").expect("answer");
    assert_eq!(second.status(), 200, "retried once the token quota cooled down");
    assert_eq!(support::attempts_of(&second), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_for_tokens_pauses_only_the_token_quota() {
    // The mock's 429 says only 10 tokens remain, in its rate-limit headers.
    let (_mock, pacegate, _, second) =
        a_second_call_refused(LlmBehaviour::new(), "tokens = \"100000/s\"\n").await;
    only_the_token_quota_waited(&pacegate, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_whose_body_alone_names_tokens_pauses_only_the_token_quota() {
    // As above, but the mock's 429 has no rate-limit header at all: only its
    // OpenAI error body says `"type": "tokens"` and "Please try again in
    // Nms". A 429 not known to be about tokens would cool the whole
    // upstream for base_delay (2 s here).
    let keys = "tokens = \"100000/s\"\n[upstream.retry]\nbase_delay = \"2s\"\n";
    let (_mock, pacegate, upstream, second) =
        a_second_call_refused(LlmBehaviour::new().bare_429s(), keys).await;
    let token_cooldown = &upstream["tokens"]["quotas"][0]["cooldown"];
    assert!(token_cooldown["remaining_ms"].as_u64() > Some(500), "the body's wait: {token_cooldown}");
    only_the_token_quota_waited(&pacegate, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_read_for_its_body_reaches_the_caller_as_it_came() {
    let first = chat(&prose(40), Some(20), false);
    let cost = prompt_tokens(&first) + 20;
    // Room for the first call and 10 tokens: the second is refused.
    let behaviour = LlmBehaviour::new().token_limit(cost + 10, Duration::from_secs(5)).bare_429s();
    let mock = LlmMock::start(behaviour).await;
    let keys = "tokens = \"100000/s\"\n[upstream.retry]\nmax_attempts = 1\n";
    let pacegate = pacegate(&mock, keys).await;
    assert_eq!(post(&pacegate, "/v1/chat/completions", &first).await.status(), 200);
    let refused = post(&pacegate, "/v1/chat/completions", &first).await;
    assert_eq!(refused.status(), 429);
    let length = refused.content_length();
    let body: Value = serde_json::from_slice(&refused.bytes().await.expect("whole body")).expect("JSON");
    assert_eq!(body["error"]["type"], "tokens", "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(message.contains("Please try again in"), "{message}");
    assert_eq!(length, Some(body.to_string().len() as u64), "its length, recomputed");
    assert_eq!(mock.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_queued_tokens_ahead_outlast_its_max_wait_is_answered_at_once() {
    // 10 tokens a second: the first call leaves at once and owes ~50 s, the
    // second queues behind it, the third would queue ~50 s behind the second.
    let mock = LlmMock::start(LlmBehaviour::new().output_len(10)).await;
    let pacegate = pacegate(&mock, "tokens = \"600/min\"\nqueue_timeout = \"120s\"\n").await;
    let big = chat(&prose(10), Some(500), false);
    assert_eq!(post(&pacegate, "/v1/chat/completions", &big).await.status(), 200);
    let url = pacegate.url("/llm/v1/chat/completions");
    let _second = tokio::spawn(client().post(url.clone()).json(&big).send());
    let queued = |s: &Value| s["upstreams"][0]["queue"]["depth"] == 1;
    assert!(pacegate.wait_status(PATIENCE, queued).await, "the second call did not queue");

    let asked = Instant::now();
    let third = client().post(url).json(&big).header("x-pacegate-max-wait", "5s").timeout(PATIENCE);
    let third = third.send().await.expect("an answer");
    let answered = asked.elapsed();
    let retry_after = third.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert_pacegate_error(third, 503, "queue_timeout", Some("llm")).await;
    assert!(answered < Duration::from_millis(2500), "answered after {answered:?}, not at once");
    assert!(retry_after >= Some(40), "Retry-After {retry_after:?}: the ~50 s of tokens ahead");
    assert_eq!(mock.count(), 1);
}
