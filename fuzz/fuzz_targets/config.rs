//! The config file: `pacegate::config::parse` on arbitrary text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pacegate::fuzz::config(data));
