//! What a client sends: HTTP/1 framing and request-target routing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pacegate::fuzz::request(data));
