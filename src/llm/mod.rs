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
//!
//! What to do with the numbers (quotas, settling, `token_accounting`) is
//! the admission core's business, not this module's.

pub mod endpoint;
pub mod image;
pub mod request;
pub mod tokenizer;

pub use endpoint::{Endpoint, classify};
pub use request::{Basis, Estimate, estimate};
pub use tokenizer::Encoding;
