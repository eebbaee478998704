//! An LLM call's tokens on the request path: priced once from its buffered
//! body, reserved by every attempt (as its [`Needs`](crate::admission::Needs)
//! in the token quotas), settled from what the answer reports.
//!
//! - [`Upstream::price`]: the estimate, made once per request and kept in
//!   the head's extensions ([`Priced`]), so that no queued request's future
//!   grows by it and every attempt reserves the same.
//! - [`Reserved`]: one attempt's reservation; settled exactly once, by the
//!   attempt (a 429 or connect failure gives it all back), by the answer's
//!   body, or when dropped (the reservation stands).
//! - [`settling`]: the answer's body streamed through unchanged while the
//!   usage it reports is read from the bytes passing by (server-sent events
//!   or a JSON body); at its end the reservation is settled.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::dispatcher::Dispatcher;
use super::shared::Ticket;
use super::{Upstream, clean_head};
use crate::admission::{Needs, Reservation, Settlement, TokenQuotas};
use crate::body::{BoxError, Guarded, ProxyBody, RequestBody};
use crate::config::{self, TokenKind};
use crate::llm::{self, Basis, UsageScanner};
use crate::retry::{RateLimitHint, Refill};

/// A JSON answer is kept whole up to this size to read its usage; past it,
/// only its last [`JSON_TAIL_BYTES`] (where `usage` is) are kept.
const JSON_KEEP_BYTES: usize = 1024 * 1024;
const JSON_TAIL_BYTES: usize = 64 * 1024;

/// What an LLM call costs, worked out once and kept in its head's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    /// What every attempt reserves: calibrated input, output cap.
    pub reservation: Reservation,
    /// The uncalibrated input, when a tokenizer counted it: what calibration learns from.
    pub counted_input: Option<u64>,
}

impl Priced {
    /// The price of the request `head` belongs to, if it is an LLM call.
    pub fn of(head: &http::request::Parts) -> Option<Priced> {
        head.extensions.get::<Priced>().copied()
    }
}

impl Upstream {
    /// Prices an LLM call once, from its head and buffered body, when this
    /// upstream has token quotas; other requests are left as they are.
    pub fn price(&self, head: &mut http::request::Parts, body: &RequestBody) {
        let Some(tokens) = &self.config.tokens else { return };
        let Some(endpoint) = llm::classify(&head.method, head.uri.path(), &head.headers) else { return };
        let mut estimate = match body {
            RequestBody::Buffered(bytes) => llm::estimate(endpoint, bytes, tokens.default_max_tokens),
            RequestBody::Streaming(..) => {
                // Too large to buffer: priced by its announced size, or as the
                // largest body the estimate would parse, a cost that is never free.
                let length = head.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
                let bytes = length.unwrap_or(llm::request::MAX_PARSE_BYTES as u64);
                let mut estimate = llm::estimate(endpoint, b"", tokens.default_max_tokens);
                estimate.input = bytes.div_ceil(llm::request::FALLBACK_BYTES_PER_TOKEN);
                estimate.basis = Basis::Fallback;
                estimate
            }
        };
        let counted = matches!(estimate.basis, Basis::Counted(_) | Basis::Partial(_));
        // A guess from the size (an image in a data URL is megabytes and a
        // thousand tokens) must not refuse the call 413: it is held to what
        // the input quotas can ever hold.
        if !counted {
            estimate.input = estimate.input.min(input_room(tokens, estimate.output));
        }
        let input = if counted { self.dispatcher.calibrated(estimate.input) } else { estimate.input };
        // Only a whole count teaches calibration: input the estimate could
        // not see (a PDF, a previous response) is no error of the count.
        let whole = matches!(estimate.basis, Basis::Counted(_));
        head.extensions.insert(Priced {
            reservation: Reservation { input, output: estimate.output },
            counted_input: whole.then_some(estimate.input),
        });
        // The usage is read from the answer's bytes as they pass: a
        // compressed answer would hide it, and the call would keep its whole
        // reservation. Every client takes identity.
        head.headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }

    /// The token quota hints an answer carries that pacing must obey, as
    /// `(limit index, hint)`: a quota the upstream says is exhausted pauses
    /// until its reset. A quota with tokens left is not a pace: providers
    /// give the time until the quota is *fully* replenished, and it refills
    /// as it is used, so `remaining / reset` would pace far below the quota.
    /// Nor is a refilling bucket's own reading ([`RateLimitHint::pace`]):
    /// its unit is one token and the next call needs many, so an exhausted
    /// quota is read as a window that resets (docs/tokens.md).
    pub fn exhausted_token_quotas(&self, headers: &http::HeaderMap) -> Vec<(usize, RateLimitHint)> {
        // Asked of every answer: most upstreams have no token quota.
        if self.config.tokens.is_none() {
            return Vec::new();
        }
        let quotas = TokenQuotas::of(&self.dispatcher.config());
        let hints = llm::token_hints(headers, std::time::SystemTime::now());
        let by_kind = [
            (TokenKind::Total, hints.tokens),
            (TokenKind::Input, hints.input),
            (TokenKind::Output, hints.output),
        ];
        by_kind
            .into_iter()
            .filter_map(|(kind, hint)| Some((quotas.index(kind)?, hint?)))
            .filter(|(_, hint)| hint.remaining == 0 && !hint.reset_after.is_zero())
            .map(|(index, hint)| (index, RateLimitHint { refill: Refill::AtReset, ..hint }))
            .collect()
    }
}

impl Upstream {
    /// The token quotas a 429 is about, by limit index: those the answer
    /// says have fewer tokens left than this call needs (OpenAI's
    /// `x-ratelimit-remaining-tokens`, Anthropic's
    /// `anthropic-ratelimit-{tokens,input-tokens,output-tokens}-remaining`),
    /// unless it also says the request quota is spent. Empty when the 429
    /// is not known to be about tokens: then it cools the whole partition.
    pub fn short_token_quotas(&self, headers: &http::HeaderMap, needs: &Needs) -> Vec<usize> {
        let quotas = TokenQuotas::of(&self.dispatcher.config());
        if quotas.is_empty() {
            return Vec::new();
        }
        let now = std::time::SystemTime::now();
        if request_quota_spent(headers, now) {
            return Vec::new();
        }
        let hints = llm::token_hints(headers, now);
        let by_kind = [
            (TokenKind::Total, hints.tokens),
            (TokenKind::Input, hints.input),
            (TokenKind::Output, hints.output),
        ];
        let mut short: Vec<usize> = by_kind
            .into_iter()
            .filter_map(|(kind, hint)| Some((quotas.index(kind)?, hint?)))
            .filter(|(index, hint)| hint.remaining < needs.units_of(*index))
            .map(|(index, _)| index)
            .collect();
        short.dedup();
        short
    }
}

impl Upstream {
    /// A 429 to an LLM call whose headers say nothing of the token quotas
    /// (nor that the request quota is spent) has a small error body worth
    /// reading: it may name the quota ([`llm::refusal`]).
    pub(super) fn reads_refusal(&self, response: &Response<Incoming>, needs: &Needs) -> bool {
        // Cheapest first: nearly every answer is not a 429.
        if response.status() != http::StatusCode::TOO_MANY_REQUESTS {
            return false;
        }
        let quotas = TokenQuotas::of(&self.dispatcher.config());
        let needs_tokens = [TokenKind::Total, TokenKind::Input, TokenKind::Output]
            .into_iter()
            .filter_map(|kind| quotas.index(kind))
            .any(|index| needs.iter().any(|(i, _)| i == index));
        let headers = response.headers();
        let now = std::time::SystemTime::now();
        let small = response.body().size_hint().upper().is_none_or(|n| n <= llm::REFUSAL_BODY_BYTES as u64);
        needs_tokens
            && small
            && llm::token_hints(headers, now).is_empty()
            && !request_quota_spent(headers, now)
    }

    /// The token quotas `kind` stands for, among those this call needs: a
    /// kind not configured falls on the quota that counts it (input or
    /// output tokens on `tokens`, tokens on `input_tokens` and `output_tokens`).
    pub(super) fn named_token_quotas(&self, kind: Option<TokenKind>, needs: &Needs) -> Vec<usize> {
        let quotas = TokenQuotas::of(&self.dispatcher.config());
        let Some(kind) = kind else { return Vec::new() };
        let named: Vec<usize> = match (kind, quotas.index(kind)) {
            (_, Some(index)) => vec![index],
            (TokenKind::Total, None) => {
                [TokenKind::Input, TokenKind::Output].into_iter().filter_map(|k| quotas.index(k)).collect()
            }
            (_, None) => quotas.index(TokenKind::Total).into_iter().collect(),
        };
        named.into_iter().filter(|index| needs.iter().any(|(i, _)| i == *index)).collect()
    }
}

/// One attempt's token reservation, settled once.
#[derive(Debug)]
pub struct Reserved {
    dispatcher: Dispatcher,
    partition: u64,
    priced: Priced,
    /// When its ticket was granted (see `Ticket::granted`).
    granted: Instant,
    /// Settled already: dropping it does nothing more.
    settled: bool,
}

impl Reserved {
    pub fn new(dispatcher: &Dispatcher, partition: u64, priced: Priced, granted: Instant) -> Self {
        Self { dispatcher: dispatcher.clone(), partition, priced, granted, settled: false }
    }

    pub fn settle(mut self, settlement: Settlement) {
        self.settle_once(settlement);
    }

    fn settle_once(&mut self, settlement: Settlement) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let Priced { reservation, counted_input } = self.priced;
        self.dispatcher.settle_tokens(self.partition, reservation, settlement, counted_input, self.granted);
    }
}

impl Drop for Reserved {
    /// Nothing said what was used (an attempt abandoned, a timeout, a body
    /// cut short): the reservation stands.
    fn drop(&mut self) {
        self.settle_once(Settlement::Unknown);
    }
}

/// Whether an answer says the request quota, not a token quota, is spent:
/// a rate-limit family with nothing left, or a provider's spent request
/// quota ([`llm::requests_spent`]). Then a 429 cools the whole partition.
fn request_quota_spent(headers: &http::HeaderMap, now: std::time::SystemTime) -> bool {
    llm::requests_spent(headers)
        || crate::retry::rate_limit(headers, now).is_some_and(|hint| hint.remaining == 0)
}

/// The most input tokens a call reserving `output` can take of the token
/// quotas that count input (`tokens`, with the output, and `input_tokens`):
/// their smallest count. Unlimited without such a quota.
fn input_room(tokens: &config::Tokens, output: u64) -> u64 {
    let count =
        |rates: &[config::Rate]| rates.iter().map(|r| u64::from(r.count.get())).min().unwrap_or(u64::MAX);
    let room = |(kind, rates): &(TokenKind, Vec<config::Rate>)| match kind {
        TokenKind::Total => Some(count(rates).saturating_sub(output).max(1)),
        TokenKind::Input => Some(count(rates)),
        TokenKind::Output => None,
    };
    tokens.quotas.iter().filter_map(room).min().unwrap_or(u64::MAX)
}

/// The caller's answer: hop-by-hop headers removed, the body streamed as it
/// comes while its usage is read, the attempt's `ticket` held until it ends
/// and `reserved` settled then.
pub fn settling(response: Response<Incoming>, ticket: Ticket, reserved: Reserved) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    clean_head(&mut parts);
    let events = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    let scan = if events { Scan::Events(UsageScanner::new()) } else { Scan::Json(JsonTail::default()) };
    let inner = super::CleanTrailers { inner: incoming };
    let body = Settling { inner, scan, reserved: Some(reserved) };
    Response::from_parts(parts, http_body_util::BodyExt::boxed(Guarded::new(body, ticket)))
}

/// Reads the usage of an answer from its bytes.
enum Scan {
    Events(UsageScanner),
    Json(JsonTail),
}

impl Scan {
    fn feed(&mut self, chunk: &[u8]) {
        match self {
            Self::Events(scanner) => scanner.feed(chunk),
            Self::Json(json) => json.feed(chunk),
        }
    }

    /// The body ended: what it reported, if anything final.
    fn finish(&mut self) -> Settlement {
        let usage = match self {
            Self::Events(scanner) => {
                scanner.finish();
                scanner.usage().filter(|_| scanner.is_complete())
            }
            Self::Json(json) => json.usage(),
        };
        usage.map_or(Settlement::Unknown, Settlement::Used)
    }
}

/// A JSON answer's bytes: all of them up to [`JSON_KEEP_BYTES`], then only the tail.
#[derive(Default)]
struct JsonTail {
    kept: Vec<u8>,
    truncated: bool,
}

impl JsonTail {
    fn feed(&mut self, chunk: &[u8]) {
        self.kept.extend_from_slice(chunk);
        let bound = if self.truncated { 2 * JSON_TAIL_BYTES } else { JSON_KEEP_BYTES };
        if self.kept.len() > bound {
            self.truncated = true;
            self.kept.drain(..self.kept.len() - JSON_TAIL_BYTES);
        }
    }

    fn usage(&self) -> Option<llm::Usage> {
        if !self.truncated {
            return llm::usage_from_json(&self.kept);
        }
        // A raw `"usage":` can only be a key: quotes inside strings are escaped.
        let key = b"\"usage\":";
        let at = self.kept.windows(key.len()).rposition(|w| w == key)?;
        let object = self.kept[at + key.len()..].trim_ascii_start();
        let usage =
            serde_json::Deserializer::from_slice(object).into_iter::<serde_json::Value>().next()?.ok()?;
        llm::usage::from_usage(&usage)
    }
}

pin_project_lite::pin_project! {
    /// A body passed through unchanged, frame by frame, while [`Scan`] looks
    /// at its bytes; its end settles the reservation.
    struct Settling<B> {
        #[pin]
        inner: B,
        scan: Scan,
        reserved: Option<Reserved>,
    }
}

impl<B> Body for Settling<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scan.feed(data);
                }
                // A body of known length ends with its last frame: hyper
                // then stops polling and never sees the end below.
                if this.inner.is_end_stream()
                    && let Some(reserved) = this.reserved.take()
                {
                    reserved.settle(this.scan.finish());
                }
            }
            Poll::Ready(None) => {
                if let Some(reserved) = this.reserved.take() {
                    reserved.settle(this.scan.finish());
                }
            }
            // Broken off: what it reported is not known to be final; the reservation stands.
            Poll::Ready(Some(Err(_))) => drop(this.reserved.take()),
            Poll::Pending => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_answer_s_usage_is_read_whole_or_from_its_tail() {
        let answer = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let mut json = JsonTail::default();
        for chunk in answer.chunks(7) {
            json.feed(chunk);
        }
        assert_eq!(json.usage().map(|u| (u.input, u.output)), Some((12, 3)));

        let mut long = JsonTail::default();
        long.feed(b"{\"data\":[\"");
        for _ in 0..(3 * JSON_KEEP_BYTES / 1000) {
            long.feed(&[b'x'; 1000]);
        }
        long.feed(br#""],"usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        assert!(long.truncated && long.kept.len() <= 2 * JSON_TAIL_BYTES);
        assert_eq!(long.usage().map(|u| (u.input, u.output)), Some((8, 0)));
        assert_eq!(JsonTail::default().usage(), None);
    }
}
