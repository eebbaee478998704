//! LLM API calls: what a request will cost in tokens, what the answer says
//! it cost, and what the provider says is left (docs/tokens.md).
//!
//! Pure functions and plain structs: no I/O, no clock reads, no locks, so
//! the request path decides where each step runs and every rule is tested
//! alone. One job per file:
//!
//! - [`endpoint`]: which requests are LLM calls, from the head alone.
//! - [`request`]: the [`Estimate`] of a buffered body: input tokens and the
//!   output reservation. Text is counted by [`tokenizer`], images by [`image`].
//! - [`usage`]: the [`Usage`] a JSON answer reports.
//! - [`sse`]: [`UsageScanner`], the same for a streamed answer, fed the
//!   body's chunks as they pass through; it only looks at them.
//! - [`headers`]: the token quotas an answer's headers report.
//! - [`refusal`]: which quota a 429's error body names, and its wait.
//! - [`calibration`]: a per-upstream moving ratio of reported to estimated input.
//!
//! # Use, one request at a time
//!
//! ```
//! use std::time::SystemTime;
//! use http::{HeaderMap, Method};
//! use pacegate::llm::{self, Calibration, UsageScanner};
//!
//! let mut calibration = Calibration::new(); // one per upstream, kept across requests
//! let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}],"max_tokens":50}"#;
//! // 1. The head: is it an LLM call at all?
//! let Some(endpoint) = llm::classify(&Method::POST, "/v1/chat/completions", &HeaderMap::new()) else {
//!     return;
//! };
//! // 2. The buffered body: reserve calibrated input plus the output cap.
//! let estimate = llm::estimate(endpoint, body, 4096);
//! let reserved_input = calibration.reserve(estimate.input);
//! assert_eq!(estimate.output, 50);
//! // 3. The answer's head: resynchronise the token quotas.
//! let hints = llm::token_hints(&HeaderMap::new(), SystemTime::now());
//! assert!(hints.is_empty());
//! // 4. The answer's body: a JSON answer at once, or a stream chunk by chunk.
//! let mut scanner = UsageScanner::new();
//! scanner.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5}}\n\n");
//! scanner.finish();
//! // 5. Settle: the reservation becomes what was used; calibrate on counted estimates.
//! let used = scanner.usage().expect("the final usage chunk");
//! if let llm::Basis::Counted(_) = estimate.basis {
//!     calibration.observe(estimate.input, used.input);
//! }
//! # let _ = reserved_input;
//! ```
//!
//! What to do with the numbers (quotas, settling, `token_accounting`) is
//! the admission core's business, not this module's.

pub mod calibration;
pub mod endpoint;
pub mod headers;
pub mod image;
pub mod refusal;
pub mod request;
pub mod sse;
pub mod tokenizer;
pub mod usage;

pub use calibration::Calibration;
pub use endpoint::{Endpoint, classify};
pub use headers::{TokenHints, requests_spent, token_hints};
pub use refusal::{REFUSAL_BODY_BYTES, Refusal, refusal};
pub use request::{Basis, Estimate, estimate};
pub use sse::UsageScanner;
pub use tokenizer::Encoding;
pub use usage::{Usage, from_json as usage_from_json};
