//! What an upstream answers: rate-limit and Retry-After headers, and what
//! pacing learns from them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pacegate::fuzz::upstream_answer(data));
