//! Entry points for fuzzing: input that a config file, a client or an
//! upstream controls, fed to the code that parses it.
//!
//! `fuzz/` (cargo-fuzz, run by `scripts/fuzz.sh`) calls these with
//! libFuzzer's input; `tests/fuzz_smoke.rs` calls them with random and
//! near-valid input for a bounded run in every test pass. They must never
//! panic except where they check an invariant on purpose.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Uri, Version};
use tokio::time::Instant;

use crate::admission::{Feedback, Pacing, Quotas};
use crate::config;
use crate::llm;
use crate::retry;
use crate::route::{self, Router};
use crate::server::framing::Framing;

/// Head limit of the framing under test: small, so fuzzing reaches it.
const MAX_HEADER_BYTES: usize = 1024;

/// Upstreams that request targets are routed against.
const ROUTES: &str = r#"
[[upstream]]
name = "github"
base_url = "https://api.github.com"
route = "/github"
rate = "10/s"

[[upstream]]
name = "openai"
base_url = "https://api.openai.com/v1"
route = "/openai"
hosts = ["api.openai.com", "openai.test:8443"]
rate = "10/s"
"#;

/// Parses `data` as a config file (errors are fine, panics are not).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config::parse(Path::new("fuzz.toml"), text);
    }
}

/// Feeds `data` to a client connection's HTTP/1 framing, cut in two where
/// its first byte says, then routes `data` as a request target (forward,
/// reverse, h2 and CONNECT).
pub fn request(data: &[u8]) {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut framing = Framing::new(MAX_HEADER_BYTES);
    let mut passed = BytesMut::new();
    let _ = framing.push(&data[..cut], &mut passed).and_then(|()| framing.push(&data[cut..], &mut passed));
    assert!(data.starts_with(&passed), "framing changed or reordered the bytes it passed");

    if let Ok(uri) = Uri::try_from(data) {
        let router = router();
        let _ = router.route(&uri, Version::HTTP_11);
        let _ = router.route(&uri, Version::HTTP_2);
        let _ = route::tunnel_target(&uri);
    }
}

/// Reads `data` as an upstream answer's header lines (`name: value`) with
/// the rate-limit and `Retry-After` parsers, at a `now` that `data` also
/// picks, then feeds what they found to a partition's pacing as it is,
/// without the `max_retry_after` cap the exchange applies: resets and
/// waits of any size must be parsed and learned without a panic.
pub fn upstream_answer(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let seconds = data.iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(*b)));
    let wall = UNIX_EPOCH.checked_add(Duration::from_secs(seconds % (1 << 40))).unwrap_or(UNIX_EPOCH);
    // The same bytes as a 429's error body.
    let _ = llm::refusal(data);
    let cooldown = retry::retry_after(&headers, wall);
    // Unbounded: the fuzzer looks for what the largest waits do.
    let hint = retry::rate_limit(&headers, wall).map(|hint| hint.pace(Duration::MAX));
    let now = Instant::now();
    let mut pacing = Pacing::new(quotas(), now);
    let feedback = Feedback { partition: 0, limit: None, sent_at: now, rate_limited: true, cooldown, hint };
    pacing.learn("fuzz", &feedback, false, now);
    let _ = pacing.admit("fuzz", now + Duration::from_secs(1), std::num::NonZeroU32::MIN);
}

fn quotas() -> &'static Quotas {
    static QUOTAS: OnceLock<Quotas> = OnceLock::new();
    QUOTAS.get_or_init(|| Quotas {
        rate: vec![config::parse_rate("10/s").expect("a valid rate")],
        burst: std::num::NonZeroU32::MIN,
        adaptive: true,
        settles: false,
    })
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let config = config::parse(Path::new("routes.toml"), ROUTES).expect("the fuzz routes are valid");
        Router::new(&config)
    })
}
