//! One exchange: a caller's request against one upstream, retries included.
//!
//! Steps, each for a reason:
//! 1. join the upstream's queue: quotas and `max_concurrency` gate every attempt;
//! 2. send the attempt, its body replayed from the buffer;
//! 3. tell the dispatcher what the answer says about the upstream's limits
//!    (cooldown, adaptive rate, remaining quota); a 429 to an LLM call whose
//!    headers do not say which quota it is about is read first (a few KiB),
//!    since its error body may;
//! 4. decide: classify the outcome (the documented method rules), then attempts left,
//!    `max_retry_after`, a replayable body, and the retry budget;
//! 5. to retry: keep the answer (so it can still go back as it came), give
//!    the concurrency slot back, sleep the backoff, rejoin at the head.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::clean_head;
use super::shared::Ticket;
use super::tokens::{Priced, Reserved, settling};
use super::{
    ATTEMPTS_HEADER, QUEUED_HEADER, SendError, Upstream, UpstreamClient, inbound_response, outbound_request,
};
use crate::admission::{Feedback, Needs, Place, Refusal, Settlement};
use crate::body::{self, ProxyBody, RequestBody};
use crate::config;
use crate::error::{ProxyError, RefusalReason};
use crate::llm;
use crate::metrics::{AttemptOutcome, Metrics};
use crate::retry::{self, Decision, Outcome};

/// Answers kept across a retry are buffered up to this size (they are error
/// pages and JSON errors; a larger one is cut).
const KEPT_ANSWER_BYTES: usize = 64 * 1024;

/// The result of one attempt.
type Attempt = Result<Response<Incoming>, SendError>;

/// What the last attempt produced, kept while a retry waits for its turn.
enum Last {
    Answer(Response<Bytes>),
    Failed(SendError),
}

/// One attempt's answer as the exchange holds it: streaming as it came, or
/// a 429 already read whole to learn from its error body.
enum Answered {
    Live(Attempt),
    Read(Last),
}

impl Answered {
    /// Status and headers of an answer, if there was one.
    fn head(&self) -> Option<(StatusCode, &http::HeaderMap)> {
        match self {
            Self::Live(Ok(response)) => Some((response.status(), response.headers())),
            Self::Read(Last::Answer(response)) => Some((response.status(), response.headers())),
            Self::Live(Err(_)) | Self::Read(Last::Failed(_)) => None,
        }
    }

    /// The body, when it was read.
    fn body(&self) -> Option<&Bytes> {
        match self {
            Self::Read(Last::Answer(response)) => Some(response.body()),
            _ => None,
        }
    }

    /// The upstream did not process the attempt: a 429, or nothing was sent.
    fn not_processed(&self) -> bool {
        match self {
            Self::Live(Err(error)) | Self::Read(Last::Failed(error)) => {
                matches!(error, SendError::Connect(_))
            }
            _ => self.head().is_some_and(|(status, _)| status == StatusCode::TOO_MANY_REQUESTS),
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Self::Live(Err(error)) | Self::Read(Last::Failed(error)) => match error {
                SendError::Connect(_) => Outcome::ConnectFailed,
                SendError::Timeout(_) => Outcome::TimedOut,
                SendError::Broken(_) => Outcome::BrokenAfterSend,
                SendError::Unreadable(_) => Outcome::Unreadable,
            },
            Self::Live(Ok(response)) => Outcome::Status(response.status()),
            Self::Read(Last::Answer(response)) => Outcome::Status(response.status()),
        }
    }

    /// Reads a retryable answer into memory (bounded), releasing its connection.
    async fn keep(self) -> Last {
        match self {
            Self::Live(result) => keep(result).await,
            Self::Read(last) => last,
        }
    }
}

impl Upstream {
    /// Sends one request through this upstream's queue at `place` (its
    /// partition, caller and priority), pacing and retries.
    ///
    /// A queue may hold many thousands of requests, each holding this
    /// future's state while it waits: hence the request borrowed from the
    /// caller's step that owns it, and the attempt loop boxed once a ticket
    /// is in hand: a queued request does not carry what its attempts will
    /// hold (the client's future, answers kept for a retry, timers).
    pub fn exchange<'a>(
        &'a self,
        client: &'a UpstreamClient,
        head: &'a mut http::request::Parts,
        body: &'a mut RequestBody,
        max_wait: Option<Duration>,
        place: Place,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
        // An LLM call is priced once, before it queues; the price is kept
        // in its head, where every attempt finds it.
        self.price(head, body);
        let wait = max_wait.map_or(self.config.queue_timeout, |w| w.min(self.config.queue_timeout));
        let deadline = Instant::now() + wait;
        async move {
            // What the request needs of endpoint limits is worked out again
            // where it is used rather than kept: it would grow every queued
            // request's future (see proxy::budget).
            let needs = |config: &config::Upstream| self.needs(config, head);
            let joined = self.dispatcher.join(place, needs, deadline).await;
            let ticket = joined.map_err(|refusal| self.refused(self.honest(refusal, place, head), head))?;
            self.dispatcher.record_first_attempt(ticket.granted);
            Box::pin(self.attempts(client, head, body, place, deadline, ticket)).await
        }
    }

    /// Steps 2 to 5 for a request that holds its first ticket.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        client: &UpstreamClient,
        head: &mut http::request::Parts,
        body: &mut RequestBody,
        place: Place,
        mut deadline: Instant,
        mut ticket: Ticket,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let priced = Priced::of(head);
        let retry = &self.config.retry;
        // Asked only where it matters: an idempotent method may be replayed anyway.
        let idempotency_key = !head.method.is_idempotent() && retry::has_idempotency_key(&head.headers);
        self.observe_wait(&ticket);
        let mut queued = ticket.waited;
        let mut attempt: u32 = 1;
        loop {
            let sent_at = Instant::now();
            // Worked out for each attempt: a reload since the last may have
            // reordered the limits it counts in.
            let needs = &self.dispatcher.needs(|config| self.needs(config, head));
            // Every attempt holds its own token reservation, taken with its ticket.
            let granted = ticket.granted;
            let mut reserved = priced.map(|p| Reserved::new(&self.dispatcher, place.partition, p, granted));
            // Scoped: a local once borrowed stays in this future until its
            // scope ends, and the attempt's answer is not to be kept there
            // across the waits for a retry below.
            let (result, reason, retry_after) = {
                let attempt_body = body.for_attempt().unwrap_or_else(body::empty);
                // Boxed on its own, as is every wait on the way to a retry below:
                // held inline, they made this future 1.9 KB, more than glibc's
                // per-thread cache serves (1 KB), and both boxes now fit in it.
                let send = Box::pin(client.send(outbound_request(head, attempt_body), self.config.timeout));
                // Shutting down, an attempt still without an answer near the end
                // of the grace gives up, so that the caller hears why.
                let result = tokio::select! {
                    biased;
                    result = send => result,
                    ends = self.dispatcher.last_call() => return Err(self.refused(shutting_down(ends), head)),
                };
                self.observe_attempt(&result, sent_at);
                if let Some(failed) = self.config.breaker.as_ref().and_then(|b| breaker_outcome(b, &result)) {
                    self.dispatcher.record_outcome(sent_at, failed);
                }
                // A 429 whose headers do not say which token quota it is about:
                // its small error body may, so it is read now (bounded) and
                // replayed to the caller unchanged.
                let result = match result {
                    Ok(response) if self.reads_refusal(&response, needs) => {
                        Answered::Read(Box::pin(self.read_refusal(response)).await)
                    }
                    result => Answered::Live(result),
                };
                let retry_after = self.learn(&result, sent_at, attempt, (place.partition, needs));
                if result.not_processed()
                    && let Some(reserved) = reserved.take()
                {
                    reserved.settle(Settlement::NotProcessed);
                }
                let outcome = result.outcome();
                let Decision::Retry(reason) = retry::classify(retry, &head.method, idempotency_key, &outcome)
                else {
                    return Ok(self.answer(result, ticket, reserved, attempt, queued));
                };
                let give_up = attempt >= retry.max_attempts.get()
                    || retry::retry_after_too_long(retry, retry_after)
                    || !body.replayable()
                    || !self.dispatcher.withdraw_retry();
                if give_up {
                    return Ok(self.answer(result, ticket, reserved, attempt, queued));
                }
                (result, reason, retry_after)
            };
            // Keep the answer and free the upstream connection and the slot;
            // a kept answer is not read for usage: its reservation stands.
            let last = Box::pin(result.keep()).await;
            drop(reserved);
            drop(ticket);
            let delay = retry::delay(retry, attempt, retry_after, &mut rand::rng());
            tracing::info!(
                upstream = %self.config.name,
                attempt,
                status = status_of(&last),
                delay_ms = delay.as_millis() as u64,
                reason = reason.as_str(),
                "retry"
            );
            // Waiting out a backoff is not waiting in the queue.
            deadline += delay;
            ticket = match Box::pin(self.backoff(delay, place, head, deadline)).await {
                // Counted once it may go: one that finds no turn in time is
                // no retry, and attempts stay first attempts plus retries.
                Ok(ticket) => {
                    let labels = Metrics::reason(&self.config.name, reason.as_str());
                    self.metrics.all().retries.get_or_create(&labels).inc();
                    ticket
                }
                // The breaker opened meanwhile and this retry cannot wait for it.
                Err(refusal @ Refusal::CircuitOpen { .. }) => return Err(self.refused(refusal, head)),
                // Shutting down (no time for another attempt), or no turn in time.
                Err(_) => return Ok(self.kept_answer(last, attempt, queued)),
            };
            self.observe_wait(&ticket);
            queued += ticket.waited;
            attempt += 1;
        }
    }

    /// Sleeps a retry's `delay`, then queues again at the head of `place`
    /// until `deadline`, needing what `head` needs of the limits then in
    /// force; shutdown's last call cuts the sleep short.
    async fn backoff(
        &self,
        delay: Duration,
        place: Place,
        head: &http::request::Parts,
        deadline: Instant,
    ) -> Result<Ticket, Refusal> {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            ends = self.dispatcher.last_call() => return Err(shutting_down(ends)),
        }
        self.dispatcher.rejoin(place, |config: &config::Upstream| self.needs(config, head), deadline).await
    }

    /// Reads a 429's body whole, at most [`llm::REFUSAL_BODY_BYTES`] within
    /// one attempt's `timeout`; the caller gets these bytes as they came
    /// (a body cut or longer than announced is dropped, as a kept answer's is).
    async fn read_refusal(&self, response: Response<Incoming>) -> Last {
        let (mut parts, incoming) = response.into_parts();
        clean_head(&mut parts);
        // Replayed whole: its length is recomputed.
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let read = Limited::new(incoming, llm::REFUSAL_BODY_BYTES).collect();
        let bytes = match tokio::time::timeout(self.config.timeout, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) | Err(_) => Bytes::new(),
        };
        Last::Answer(Response::from_parts(parts, bytes))
    }

    fn observe_wait(&self, ticket: &Ticket) {
        self.metrics.observe_queue_wait(ticket.waited);
    }

    fn observe_attempt(&self, result: &Attempt, sent_at: Instant) {
        let outcome = match result {
            Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => AttemptOutcome::RateLimited,
            Ok(response) if response.status().is_server_error() => AttemptOutcome::ServerError,
            Ok(response) if response.status().is_client_error() => AttemptOutcome::ClientError,
            Ok(_) => AttemptOutcome::Ok,
            Err(SendError::Connect(_)) => AttemptOutcome::ConnectError,
            Err(SendError::Timeout(_)) => AttemptOutcome::Timeout,
            Err(SendError::Broken(_) | SendError::Unreadable(_)) => AttemptOutcome::Broken,
        };
        self.metrics.count_attempt(outcome);
        if result.is_ok() {
            self.metrics.observe_upstream_duration(sent_at.elapsed());
        }
    }

    /// Tells the dispatcher what an answer says about the upstream's limits;
    /// returns the answer's Retry-After.
    fn learn(
        &self,
        result: &Answered,
        sent_at: Instant,
        attempt: u32,
        (partition, needs): (u64, &Needs),
    ) -> Option<Duration> {
        let (status, headers) = result.head()?;
        let now = SystemTime::now();
        // The error body read, when the headers did not say enough.
        let said = result.body().and_then(|body| llm::refusal(body));
        // A success is never retried and never starts a cooldown: its
        // Retry-After would change nothing, so it is not even looked for.
        // Without one, a 429 body's "Please try again in 600ms" serves.
        let retry_after = if status.is_success() {
            None
        } else {
            retry::retry_after(headers, now).or(said.and_then(|said| said.retry_in))
        };
        let retry = &self.config.retry;
        // Nothing a reset asks lasts longer than max_retry_after: one hostile
        // or broken header must not pause the upstream for years.
        let hint = retry::rate_limit(headers, now).map(|hint| hint.pace(retry.max_retry_after));
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
        // An upstream asking for more than max_retry_after is not waited
        // for, whether or not retries respect its hint: a cooldown is never
        // longer than max_retry_after.
        let honoured = retry_after.filter(|hint| *hint <= retry.max_retry_after);
        let cooldown = match status {
            StatusCode::TOO_MANY_REQUESTS => Some(honoured.unwrap_or(retry.base_delay)),
            StatusCode::SERVICE_UNAVAILABLE => honoured,
            _ => None,
        };
        if rate_limited {
            tracing::warn!(
                upstream = %self.config.name,
                attempt,
                status = status.as_u16(),
                delay_ms = retry_after.map(|d| d.as_millis() as u64),
                reason = retry::RetryReason::Status429.as_str(),
                "rate_limited"
            );
        }
        // A 429 an LLM call drew for its tokens pauses only the token quotas
        // its headers (or else its body) name: calls that need no tokens (or
        // other quotas) keep going.
        let short = match (rate_limited, said) {
            (false, _) => Vec::new(),
            (true, Some(said)) => self.named_token_quotas(said.tokens, needs),
            (true, None) => self.short_token_quotas(headers, needs),
        };
        for &index in &short {
            let limit = Some(index);
            self.dispatcher.report(Feedback {
                partition,
                limit,
                sent_at,
                rate_limited,
                cooldown,
                hint: None,
            });
        }
        if !short.is_empty() {
            if hint.is_some() {
                let (limit, rate_limited, cooldown) = (None, false, None);
                self.dispatcher.report(Feedback { partition, limit, sent_at, rate_limited, cooldown, hint });
            }
        } else if rate_limited || cooldown.is_some() || hint.is_some() {
            let limit = self.limit_named(headers, needs);
            self.dispatcher.report(Feedback { partition, limit, sent_at, rate_limited, cooldown, hint });
        }
        // The server's word on token quotas: one that is spent pauses until its reset.
        for (index, hint) in self.exhausted_token_quotas(headers) {
            let hint = hint.pace(retry.max_retry_after);
            let feedback = Feedback {
                partition,
                limit: Some(index),
                sent_at,
                rate_limited: false,
                cooldown: None,
                hint: Some(hint),
            };
            self.dispatcher.report(feedback);
        }
        retry_after
    }

    /// The caller's answer from the last attempt, as it came; an LLM call's
    /// reservation is settled from the usage its body reports.
    fn answer(
        &self,
        result: Answered,
        ticket: Ticket,
        reserved: Option<Reserved>,
        attempt: u32,
        queued: Duration,
    ) -> Response<ProxyBody> {
        let response = match (result, reserved) {
            (Answered::Live(Ok(response)), Some(reserved)) => settling(response, ticket, reserved),
            (Answered::Live(Ok(response)), None) => inbound_response(response, ticket),
            (Answered::Live(Err(error)), _) => self.failure(error).into_response(),
            (Answered::Read(last), _) => return self.kept_answer(last, attempt, queued),
        };
        stamp(response, attempt, queued)
    }

    /// The kept answer of the last attempt, when a retry could not get a turn.
    fn kept_answer(&self, last: Last, attempt: u32, queued: Duration) -> Response<ProxyBody> {
        let response = match last {
            Last::Answer(response) => response.map(body::full),
            Last::Failed(error) => self.failure(error).into_response(),
        };
        stamp(response, attempt, queued)
    }

    fn failure(&self, error: SendError) -> ProxyError {
        let upstream = Some(self.config.name.clone());
        match error {
            SendError::Timeout(timeout) => ProxyError::UpstreamTimeout { upstream, timeout },
            SendError::Connect(reason) | SendError::Broken(reason) | SendError::Unreadable(reason) => {
                ProxyError::UpstreamUnreachable { upstream, reason }
            }
        }
    }

    /// A queue_timeout's `Retry-After`, with what the request needs of the
    /// limits: the wait that ran out keeps no more than the wait, and
    /// leaves it to this (a refusal at once already has its own).
    fn honest(&self, refusal: Refusal, place: Place, head: &http::request::Parts) -> Refusal {
        let Refusal::Timeout { waited, retry_after } = refusal else { return refusal };
        let needs = self.dispatcher.needs(|config| self.needs(config, head));
        Refusal::Timeout { waited, retry_after: retry_after.max(self.dispatcher.retry_after(place, &needs)) }
    }

    /// Logs, counts and maps a refusal to queue.
    pub fn refused(&self, refusal: Refusal, head: &http::request::Parts) -> ProxyError {
        let upstream = self.config.name.clone();
        let reason = match refusal {
            Refusal::Full { .. } => RefusalReason::QueueFull,
            Refusal::Timeout { .. } => RefusalReason::QueueTimeout,
            Refusal::TooManyPartitions => RefusalReason::TooManyPartitions,
            Refusal::StoreDown => RefusalReason::RateLimitStore,
            Refusal::CostExceedsQuota { .. } => RefusalReason::CostExceedsQuota,
            Refusal::ShuttingDown { .. } => RefusalReason::ShuttingDown,
            Refusal::CircuitOpen { .. } => RefusalReason::CircuitOpen,
        };
        self.metrics.all().rejected.get_or_create(&Metrics::reason(&upstream, reason.as_str())).inc();
        match refusal {
            Refusal::Full { retry_after } => {
                tracing::warn!(upstream = %upstream, reason = reason.as_str(), "queue_full");
                ProxyError::QueueFull { upstream, retry_after }
            }
            Refusal::Timeout { waited, retry_after } => {
                tracing::warn!(upstream = %upstream, reason = reason.as_str(), waited_ms = waited.as_millis() as u64, "queue_timeout");
                ProxyError::QueueTimeout { upstream, waited, retry_after }
            }
            Refusal::TooManyPartitions => ProxyError::TooManyPartitions { upstream },
            Refusal::StoreDown => ProxyError::RateLimitStore { upstream },
            Refusal::CostExceedsQuota { limit } => {
                let cost = self
                    .dispatcher
                    .needs(|config| self.needs(config, head))
                    .iter()
                    .find(|(index, _)| *index == limit)
                    .map_or(0, |(_, units)| units.get());
                let (limit, capacity) = self.limit_capacity(limit).unwrap_or_default();
                tracing::warn!(upstream = %upstream, limit = %limit, cost, capacity, reason = reason.as_str(), "cost_exceeds_quota");
                ProxyError::CostExceedsQuota { upstream, limit, cost, capacity }
            }
            Refusal::CircuitOpen { retry_after } => {
                tracing::warn!(upstream = %upstream, reason = reason.as_str(), retry_after_ms = retry_after.as_millis() as u64, "circuit_open");
                ProxyError::CircuitOpen { upstream, retry_after }
            }
            Refusal::ShuttingDown { retry_after } => {
                tracing::info!(upstream = %upstream, reason = reason.as_str(), "shutting_down");
                ProxyError::ShuttingDown { upstream, retry_after }
            }
        }
    }
}

/// The refusal of an attempt cut short by shutdown, whose grace `ends` then.
fn shutting_down(ends: Instant) -> Refusal {
    Refusal::ShuttingDown {
        retry_after: ends.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)),
    }
}

/// What the breaker counts an attempt as: failed (a status it lists, or no
/// answer at all) or not; a 429 not at all, since it is the cooldown's
/// business and says the upstream is up.
fn breaker_outcome(breaker: &config::Breaker, result: &Attempt) -> Option<bool> {
    match result {
        Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => None,
        Ok(response) => Some(breaker.on_status.contains(&response.status())),
        Err(_) => Some(true),
    }
}

/// Reads a retryable answer into memory (bounded), releasing its connection.
async fn keep(result: Attempt) -> Last {
    match result {
        Ok(response) => {
            let (mut parts, incoming) = response.into_parts();
            clean_head(&mut parts);
            // The kept body is replayed whole: its length is recomputed.
            parts.headers.remove(http::header::CONTENT_LENGTH);
            // A cut or broken error body still leaves a usable status and headers.
            let bytes = match Limited::new(incoming, KEPT_ANSWER_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => Bytes::new(),
            };
            Last::Answer(Response::from_parts(parts, bytes))
        }
        Err(error) => Last::Failed(error),
    }
}

fn status_of(last: &Last) -> Option<u16> {
    match last {
        Last::Answer(response) => Some(response.status().as_u16()),
        Last::Failed(_) => None,
    }
}

/// Adds pacegate's own answer headers: attempts made, time queued.
fn stamp(mut response: Response<ProxyBody>, attempt: u32, queued: Duration) -> Response<ProxyBody> {
    let headers = response.headers_mut();
    headers.insert(ATTEMPTS_HEADER, count_value(u64::from(attempt)));
    headers.insert(QUEUED_HEADER, count_value(queued.as_millis() as u64));
    response
}

/// A number as a header value. Most answers carry "1" attempt and "0" ms
/// queued: those are static, where formatting a number allocates.
fn count_value(n: u64) -> HeaderValue {
    static DIGITS: [HeaderValue; 10] = [
        HeaderValue::from_static("0"),
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
        HeaderValue::from_static("5"),
        HeaderValue::from_static("6"),
        HeaderValue::from_static("7"),
        HeaderValue::from_static("8"),
        HeaderValue::from_static("9"),
    ];
    usize::try_from(n).ok().and_then(|i| DIGITS.get(i)).cloned().unwrap_or_else(|| HeaderValue::from(n))
}
