//! Rate limiting: turning an upstream's quotas into "go now" or "not before".
//!
//! [`pacer`] is the in-process limiter built on governor; the dispatcher asks
//! it for one slot per attempt.

pub mod pacer;

pub use pacer::Pacer;
