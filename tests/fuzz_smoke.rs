//! A bounded run of the fuzz entry points in every test pass (the real
//! fuzzer is `scripts/fuzz.sh`): random bytes, and input made of pieces of
//! valid config files, requests and upstream answers, which finds deep paths
//! faster than random bytes. A panic is a failure.

use proptest::prelude::*;

/// Pieces of config files, valid and not.
const CONFIG_PIECES: &[&str] = &[
    "[server]",
    "listen = \"127.0.0.1:0\"",
    "max_header_bytes = 1",
    "idle_timeout = \"0s\"",
    "[[upstream]]",
    "name = \"api\"",
    "name = \"API!\"",
    "base_url = \"https://api.example.com/v1\"",
    "base_url = \"ftp://x\"",
    "route = \"/api\"",
    "route = \"api\"",
    "hosts = [\"api.example.com\", \"a:99999\"]",
    "rate = \"10/s\"",
    "rate = [\"5/250ms\", \"1/d\", \"0/s\"]",
    "rate = \"18446744073709551616/s\"",
    "timeout = \"1e9h\"",
    "[upstream.retry]",
    "on_status = [429, 999]",
    "budget = -1.0",
    "partition_by = \"header:\"",
    "[[upstream.limit]]",
    "name = \"writes\"",
    "methods = [\"POST\", \"\"]",
    "paths = [\"/repos/**\", \"/a/[\", \"**/{x,\", \"/\\\\\"]",
    "cost = { default = 0, POST = 4294967296, get = 1 }",
    "cost = 5",
    "burst = 0",
    "=",
    "\"",
    "[",
];

/// Pieces of what clients send, valid and not.
const REQUEST_PIECES: &[&str] = &[
    "GET ",
    "CONNECT ",
    "POST ",
    "http://",
    "https://",
    "user:pw@",
    "api.openai.com",
    "openai.test:8443",
    "[::1]",
    ":443",
    ":99999",
    "/openai/v1/chat",
    "/github?x=1",
    "*",
    " HTTP/1.1\r\n",
    " HTTP/1.0\r\n",
    "Host: a\r\n",
    "Content-Length: 3\r\n",
    "Content-Length: 99999999999999999999\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Transfer-Encoding: gzip\r\n",
    "\r\n",
    "\n",
    "abc",
    "5;x=y\r\nhello\r\n",
    "0\r\n\r\n",
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "\u{1}",
];

/// Header names an upstream's answer may carry about its limits.
const ANSWER_NAMES: &[&str] = &[
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "retry-after",
    "retry-after-ms",
];

/// Their values, from ordinary to absurd.
const ANSWER_VALUES: &[&str] = &[
    "0",
    "5",
    "1.5",
    "999999999",
    "1700000000",
    "99999999999999999999999",
    "18446744073709551615",
    "9223372036854775807",
    "1e308",
    "-1",
    "6m0s",
    "99999999h",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
];

/// Up to 6 header lines of an answer, `name: value`.
fn answer_lines() -> impl Strategy<Value = Vec<u8>> {
    let line = (prop::sample::select(ANSWER_NAMES), prop::sample::select(ANSWER_VALUES));
    proptest::collection::vec(line, 0..6).prop_map(|lines| {
        lines.iter().map(|(name, value)| format!("{name}: {value}\n")).collect::<String>().into_bytes()
    })
}

/// Up to 24 of `from` (or a few random bytes) joined by `separator`.
fn pieces(from: &'static [&'static str], separator: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => prop::sample::select(from).prop_map(|p| p.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(move |parts| parts.join(separator))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn config_text_never_panics(text in pieces(CONFIG_PIECES, b"\n")) {
        pacegate::fuzz::config(&text);
    }

    #[test]
    fn client_input_never_panics(data in pieces(REQUEST_PIECES, b"")) {
        pacegate::fuzz::request(&data);
    }

    #[test]
    fn upstream_answers_never_panic(data in answer_lines()) {
        pacegate::fuzz::upstream_answer(&data);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        pacegate::fuzz::config(&data);
        pacegate::fuzz::request(&data);
        pacegate::fuzz::upstream_answer(&data);
    }
}
