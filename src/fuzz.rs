//! Entry points for fuzzing: input that a config file or a client controls,
//! fed to the code that parses it.
//!
//! `fuzz/` (cargo-fuzz, run by `scripts/fuzz.sh`) calls these with
//! libFuzzer's input; `tests/fuzz_smoke.rs` calls them with random and
//! near-valid input for a bounded run in every test pass. They must never
//! panic except where they check an invariant on purpose.

use std::path::Path;
use std::sync::OnceLock;

use bytes::BytesMut;
use http::{Uri, Version};

use crate::config;
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

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let config = config::parse(Path::new("routes.toml"), ROUTES).expect("the fuzz routes are valid");
        Router::new(&config)
    })
}
