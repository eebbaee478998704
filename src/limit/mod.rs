//! Rate limiting: turning an upstream's quotas into "go now" or "not before".
//!
//! [`pacer`] is the in-process limiter built on governor; the dispatcher asks
//! it for one slot per attempt; [`adaptive`] lowers its rate after 429s;
//! [`ledger`] keeps what settled costs (LLM tokens) give back late.

pub mod adaptive;
pub mod ledger;
pub mod pacer;

pub use adaptive::Adaptive;
pub use pacer::Pacer;
