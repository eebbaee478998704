//! LLM API calls: what a request will cost in tokens, what the answer says
//! it cost, and what the provider says is left (SPEC: "Costs: LLM tokens").
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
//!
//! What to do with the numbers (quotas, settling, `token_accounting`) is
//! the admission core's business, not this module's.

pub mod endpoint;
pub mod headers;
pub mod image;
pub mod request;
pub mod sse;
pub mod tokenizer;
pub mod usage;

pub use endpoint::{Endpoint, classify};
pub use headers::{TokenHints, token_hints};
pub use request::{Basis, Estimate, estimate};
pub use sse::UsageScanner;
pub use tokenizer::Encoding;
pub use usage::{Usage, from_json as usage_from_json};
