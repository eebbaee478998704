//! What an LLM request will cost: its input estimate and output reservation.
//!
//! The buffered body is parsed with serde_json once, bounded: a body over
//! [`MAX_PARSE_BYTES`], nested deeper than [`MAX_DEPTH`], or not JSON at
//! all is not walked but gets the fallback estimate (body bytes / 4 for the
//! input, the usual output reservation), a cautious guess that settling
//! corrects, never a panic and never "free".
//!
//! The input counts what the model reads, whatever the shape: every string
//! in the messages (text and content parts, tool calls and tool results),
//! the system prompt or instructions, the tool definitions (their JSON
//! schemas as text) and a structured-output schema; images by
//! [`image`](super::image)'s formulas; audio, files and documents given as
//! data cost [`ATTACHMENT_TOKENS`] each. Ids, `type` tags and base64
//! payloads are not text the model reads and are skipped. Chat messages add
//! OpenAI's documented framing (3 tokens a message, 3 for the reply);
//! Anthropic's tool use adds its documented hidden system prompt.

use serde_json::Value;

use super::endpoint::Endpoint;
use super::image::{self, Provider};
use super::tokenizer::{Counter, Encoding};

/// Bodies larger than this are not parsed (see the module doc).
pub const MAX_PARSE_BYTES: usize = 16 * 1024 * 1024;
/// Deepest nesting of arrays and objects that is parsed and walked.
pub const MAX_DEPTH: usize = 64;
/// Body bytes per token in the fallback estimate.
pub const FALLBACK_BYTES_PER_TOKEN: u64 = 4;
/// An audio clip, file or document whose size in tokens cannot be known here.
pub const ATTACHMENT_TOKENS: u64 = 1000;
/// OpenAI chat framing: tokens per message, and priming the reply.
pub const TOKENS_PER_MESSAGE: u64 = 3;
pub const REPLY_PRIMING: u64 = 3;
/// Anthropic's tool-use system prompt (`tool_choice` auto or none), as documented.
pub const ANTHROPIC_TOOLS_PROMPT: u64 = 346;
/// The most completions one request can ask for (`n`, `best_of`): OpenAI's own limit.
pub const MAX_CHOICES: u64 = 128;

/// A request's cost in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens the model reads (uncalibrated).
    pub input: u64,
    /// Tokens reserved for what it writes: its cap, times the completions asked for.
    pub output: u64,
    /// How `input` was counted, so only like is calibrated with like.
    pub basis: Basis,
}

impl Estimate {
    /// Input and output together: what a single `tokens` quota takes.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// How an input estimate was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// By the model's tokenizer (or a character ratio, [`Encoding::Chars`]).
    Counted(Encoding),
    /// Counted, but some of the input could not be: an attachment, an
    /// image of unknown size (each priced at a default), or context the
    /// provider keeps (`previous_response_id`, `conversation`, a stored
    /// `prompt`). Calibrated like a count, but what the answer reports
    /// says nothing of the count's own error, so calibration does not
    /// learn from it.
    Partial(Encoding),
    /// The body could not be walked: bytes / [`FALLBACK_BYTES_PER_TOKEN`].
    Fallback,
}

/// The cost of a request to `endpoint` with this buffered `body`;
/// `default_max_tokens` is the output reserved when the request names no cap.
pub fn estimate(endpoint: Endpoint, body: &[u8], default_max_tokens: u64) -> Estimate {
    let parsed = (body.len() <= MAX_PARSE_BYTES && depth_within(body, MAX_DEPTH))
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten();
    let Some(Value::Object(request)) = parsed else {
        let input = (body.len() as u64).div_ceil(FALLBACK_BYTES_PER_TOKEN);
        let output = if endpoint == Endpoint::Embeddings { 0 } else { default_max_tokens };
        return Estimate { input, output, basis: Basis::Fallback };
    };
    let model = request.get("model").and_then(Value::as_str).unwrap_or("");
    let encoding = Encoding::for_model(model);
    let mut walk = Walk {
        counter: Counter::new(encoding),
        provider: if endpoint == Endpoint::Messages { Provider::Anthropic } else { Provider::OpenAi },
        ints_are_tokens: false,
        guessed: false,
    };
    let field = |name: &str| request.get(name);
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = field("messages").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
            for message in messages {
                walk.counter.add(TOKENS_PER_MESSAGE);
                walk.value(message, 0);
            }
            walk.counter.add(REPLY_PRIMING);
            walk.all(&[field("tools"), field("functions"), field("response_format")]);
        }
        Endpoint::Completions | Endpoint::Embeddings => {
            walk.ints_are_tokens = true;
            walk.all(&[field("prompt"), field("suffix"), field("input")]);
        }
        Endpoint::Responses => {
            walk.all(&[field("instructions"), field("input"), field("tools"), field("text")]);
            walk.guessed |= ["previous_response_id", "conversation", "prompt"]
                .into_iter()
                .any(|name| field(name).is_some_and(|value| !value.is_null()));
        }
        Endpoint::Messages => {
            walk.all(&[field("system"), field("messages"), field("tools")]);
            if field("tools").and_then(Value::as_array).is_some_and(|tools| !tools.is_empty()) {
                walk.counter.add(ANTHROPIC_TOOLS_PROMPT);
            }
        }
    }
    Estimate {
        input: walk.counter.tokens(),
        output: output(endpoint, &request, default_max_tokens),
        basis: if walk.guessed { Basis::Partial(encoding) } else { Basis::Counted(encoding) },
    }
}

/// The output reservation: the request's own cap, else the default, times
/// the completions it asks for; embeddings write nothing.
fn output(endpoint: Endpoint, request: &serde_json::Map<String, Value>, default_max_tokens: u64) -> u64 {
    let number = |name: &str| request.get(name).and_then(Value::as_u64);
    let cap = match endpoint {
        Endpoint::Embeddings => return 0,
        Endpoint::ChatCompletions => number("max_completion_tokens").or_else(|| number("max_tokens")),
        Endpoint::Completions | Endpoint::Messages => number("max_tokens"),
        Endpoint::Responses => number("max_output_tokens"),
    };
    // `best_of` completions are generated server-side even when only `n` return.
    let choices = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => {
            number("n").unwrap_or(1).max(number("best_of").unwrap_or(1)).clamp(1, MAX_CHOICES)
        }
        _ => 1,
    };
    cap.unwrap_or(default_max_tokens).saturating_mul(choices)
}

/// Counting what the model reads, recursively, within [`MAX_DEPTH`].
struct Walk {
    counter: Counter,
    provider: Provider,
    /// Completions and embeddings take prompts as token ids: one number, one token.
    ints_are_tokens: bool,
    /// Some input was priced at a default rather than counted.
    guessed: bool,
}

impl Walk {
    fn all(&mut self, values: &[Option<&Value>]) {
        for value in values.iter().flatten() {
            self.value(value, 0);
        }
    }

    fn value(&mut self, value: &Value, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        match value {
            Value::String(text) => self.counter.text(text),
            Value::Number(_) if self.ints_are_tokens => self.counter.add(1),
            Value::Array(items) => items.iter().for_each(|item| self.value(item, depth + 1)),
            Value::Object(object) => self.object(object, depth),
            _ => {}
        }
    }

    fn object(&mut self, object: &serde_json::Map<String, Value>, depth: usize) {
        let kind = object.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "image_url" | "input_image" | "image" => return self.image(object),
            "input_audio" | "input_file" | "file" | "audio" => return self.attachment(),
            // A document given as text is text; as data, an attachment.
            "document" if source_kind(object) != Some("text") => return self.attachment(),
            _ => {}
        }
        for (key, value) in object {
            match key.as_str() {
                // Labels, ids and settings: not text the model reads.
                "type" | "id" | "call_id" | "tool_call_id" | "tool_use_id" | "media_type" | "detail"
                | "cache_control" | "strict" | "status" | "signature" | "encrypted_content" => {}
                // Schemas and tool inputs reach the model as JSON text.
                "parameters" | "input_schema" | "schema" | "input" if value.is_object() => {
                    self.counter.text(&value.to_string())
                }
                _ => self.value(value, depth + 1),
            }
        }
    }

    /// An image part in any of the providers' shapes.
    fn image(&mut self, part: &serde_json::Map<String, Value>) {
        // OpenAI chat: {"image_url": {"url", "detail"}}; Responses: {"image_url": "…", "detail"};
        // Anthropic: {"source": {"type": "base64", "data"}} or {"source": {"type": "url", "url"}}.
        let url = part.get("image_url");
        let nested = url.and_then(Value::as_object);
        let data = nested
            .and_then(|u| u.get("url"))
            .or(url)
            .or_else(|| part.get("source").and_then(|s| s.get("data").or_else(|| s.get("url"))))
            .and_then(Value::as_str);
        let detail =
            nested.and_then(|u| u.get("detail")).or_else(|| part.get("detail")).and_then(Value::as_str);
        let (tokens, known) = image::tokens(self.provider, data, detail == Some("low"));
        self.counter.add(tokens);
        self.guessed |= !known;
    }

    /// Audio, a file or a document given as data: its size in tokens is
    /// not known here.
    fn attachment(&mut self) {
        self.counter.add(ATTACHMENT_TOKENS);
        self.guessed = true;
    }
}

fn source_kind(object: &serde_json::Map<String, Value>) -> Option<&str> {
    object.get("source")?.get("type")?.as_str()
}

/// Whether arrays and objects in `body` nest at most `max` deep: a cheap scan
/// before parsing, so a hostile body cannot make the parse or the walk deep.
fn depth_within(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests;
