//! Counting the tokens of prompt text, by the model's own tokenizer where
//! it is public, else by characters.
//!
//! OpenAI publishes its BPE vocabularies and `tiktoken-rs` ships them:
//! `o200k_base` (GPT-4o, GPT-4.1, GPT-5, the `o` series) and `cl100k_base`
//! (GPT-3.5, GPT-4, the `text-embedding-*` models). Anthropic publishes no
//! tokenizer, so `claude-*` text is counted as characters / 3.5 (Anthropic's
//! own rule of thumb for English, rounded to the cautious side); the
//! per-upstream [`Calibration`](super::Calibration) corrects the rest.
//! Unknown models (vLLM, Ollama, Groq, Mistral behind an OpenAI-compatible
//! path) get `cl100k_base`: a real BPE follows code, numbers and non-Latin
//! scripts far better than a character ratio, and the open models' vocabularies
//! are of its size and kind.
//!
//! Cost is bounded: BPE is superlinear in the length of one regex piece, and
//! tiktoken's regex crate is known to fail (and `tiktoken-rs` to panic) on a
//! megabyte without spaces (openai/tiktoken#15, #245). So text is fed to the
//! tokenizer in chunks of at most [`CHUNK_BYTES`], cut before whitespace when
//! it can be (a cut costs at most a token), and only the first
//! [`TOKENIZE_BUDGET`] bytes of one request are tokenized; the rest is
//! extrapolated at the ratio measured so far.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tiktoken_rs::CoreBPE;

/// The longest text handed to the BPE at once.
pub const CHUNK_BYTES: usize = 4 * 1024;

/// Bytes of one request's text that are really tokenized; beyond, extrapolated.
pub const TOKENIZE_BUDGET: usize = 512 * 1024;

/// Characters per token where no tokenizer is public (see the module doc).
pub const CHARS_PER_TOKEN: f64 = 3.5;

/// How a model's text is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// OpenAI's `o200k_base`.
    O200k,
    /// OpenAI's `cl100k_base`.
    Cl100k,
    /// No public tokenizer: characters / [`CHARS_PER_TOKEN`].
    Chars,
}

impl Encoding {
    /// The encoding for a `model` name as the request spells it.
    pub fn for_model(model: &str) -> Encoding {
        let model = model.trim().to_ascii_lowercase();
        // Azure and gateways prefix deployments ("openai/gpt-4o", "azure/…").
        let model = model.rsplit('/').next().unwrap_or(&model);
        const O200K: [&str; 9] =
            ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "gpt-oss", "o1", "o3", "o4"];
        if O200K.iter().any(|p| model.starts_with(p)) || model.starts_with("codex") {
            Encoding::O200k
        } else if model.starts_with("claude") {
            Encoding::Chars
        } else {
            Encoding::Cl100k
        }
    }

    /// The shared tokenizer, built on first use: building one parses a few
    /// megabytes of vocabulary, far too slow to do per request.
    fn bpe(self) -> Option<&'static CoreBPE> {
        match self {
            Encoding::O200k => Some(tiktoken_rs::o200k_base_singleton()),
            Encoding::Cl100k => Some(tiktoken_rs::cl100k_base_singleton()),
            Encoding::Chars => None,
        }
    }
}

/// Tokens counted for one request, with the budget it has used.
#[derive(Debug)]
pub struct Counter {
    encoding: Encoding,
    /// Tokens counted so far, extrapolated ones included.
    tokens: u64,
    /// Bytes really tokenized, and the tokens they gave: the ratio used past the budget.
    measured: (u64, u64),
}

impl Counter {
    pub fn new(encoding: Encoding) -> Counter {
        Counter { encoding, tokens: 0, measured: (0, 0) }
    }

    /// Tokens counted so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Adds `n` tokens counted some other way (images, per-message overhead).
    pub fn add(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n);
    }

    /// Counts `text`.
    pub fn text(&mut self, text: &str) {
        let Some(bpe) = self.encoding.bpe() else {
            let n = (text.chars().count() as f64 / CHARS_PER_TOKEN).ceil() as u64;
            return self.add(n);
        };
        let mut rest = text;
        while !rest.is_empty() {
            if self.measured.0 >= TOKENIZE_BUDGET as u64 {
                return self.extrapolate(rest.len());
            }
            let (chunk, after) = rest.split_at(cut(rest));
            let n = encode_len(bpe, chunk).unwrap_or_else(|| chars_estimate(chunk));
            self.measured = (self.measured.0 + chunk.len() as u64, self.measured.1 + n);
            self.add(n);
            rest = after;
        }
    }

    /// Tokens for `bytes` more bytes at the measured tokens per byte.
    fn extrapolate(&mut self, bytes: usize) {
        let (seen, tokens) = self.measured;
        let n = (bytes as f64 * tokens as f64 / seen.max(1) as f64).ceil() as u64;
        self.add(n);
    }
}

/// Where to end the next chunk of `text`: all of it when short, else before
/// the last whitespace in the first [`CHUNK_BYTES`] (or at a char boundary).
fn cut(text: &str) -> usize {
    if text.len() <= CHUNK_BYTES {
        return text.len();
    }
    let mut end = CHUNK_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        // A cut at 0 would make no progress.
        Some(at) if at > 0 => at,
        _ => end,
    }
}

/// The token count of a bounded chunk. tiktoken-rs unwraps its regex's
/// result; chunking keeps that from failing, and a panic that slips
/// through anyway costs this chunk its exact count, not the request.
fn encode_len(bpe: &CoreBPE, chunk: &str) -> Option<u64> {
    catch_unwind(AssertUnwindSafe(|| bpe.encode_ordinary(chunk).len() as u64)).ok()
}

fn chars_estimate(text: &str) -> u64 {
    (text.chars().count() as f64 / CHARS_PER_TOKEN).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(encoding: Encoding, text: &str) -> u64 {
        let mut counter = Counter::new(encoding);
        counter.text(text);
        counter.tokens()
    }

    #[test]
    fn models_pick_their_encoding() {
        for model in ["gpt-4o-mini", "gpt-4.1", "gpt-5-nano", "o3-mini", "o1", "openai/gpt-4o", "GPT-4O"] {
            assert_eq!(Encoding::for_model(model), Encoding::O200k, "{model}");
        }
        for model in ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "text-embedding-3-small", "llama3", ""] {
            assert_eq!(Encoding::for_model(model), Encoding::Cl100k, "{model}");
        }
        assert_eq!(Encoding::for_model("claude-sonnet-4-5"), Encoding::Chars);
    }

    #[test]
    fn known_counts() {
        // Counts as tiktoken gives them.
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, ""), 0);
        // 7 characters / 3.5.
        assert_eq!(count(Encoding::Chars, "abcdefg"), 2);
        assert_eq!(count(Encoding::Chars, "abcdefgh"), 3);
    }

    #[test]
    fn chunking_costs_little() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(400);
        let whole = tiktoken_rs::cl100k_base_singleton().encode_ordinary(&text).len() as u64;
        let chunked = count(Encoding::Cl100k, &text);
        assert!(
            chunked.abs_diff(whole) <= text.len() as u64 / CHUNK_BYTES as u64 + 1,
            "{chunked} vs {whole}"
        );
    }

    #[test]
    fn hostile_text_is_cheap_and_safe() {
        // A megabyte without a space once overflowed tiktoken's regex.
        let n = count(Encoding::O200k, &"A".repeat(1 << 20));
        assert!(n > 1000, "{n}");
        let n = count(Encoding::Cl100k, &" ".repeat(1 << 20));
        assert!(n > 0);
        let n = count(Encoding::Cl100k, &"日本語".repeat(100_000));
        assert!(n > 100_000, "{n}");
    }

    #[test]
    fn past_the_budget_the_ratio_extrapolates() {
        let text = "word ".repeat(TOKENIZE_BUDGET / 5 * 3);
        let n = count(Encoding::Cl100k, &text);
        let want = (text.len() / 5) as u64;
        assert!(n.abs_diff(want) < want / 50, "{n} vs {want}");
    }

    #[test]
    fn cuts_fall_on_boundaries() {
        let text = "é".repeat(CHUNK_BYTES);
        let at = cut(&text);
        assert!(text.is_char_boundary(at) && at > 0 && at <= CHUNK_BYTES);
        let text = format!("{} tail", "x".repeat(CHUNK_BYTES * 2));
        assert_eq!(cut(&text), CHUNK_BYTES);
    }
}
