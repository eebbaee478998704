//! Whole-file tests: text in, `Config` or a located `ConfigError` out.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;

use super::*;

/// Parses `text` as if it were `t.toml`.
fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("t.toml"), text)
}

/// The error for `text`, as `(line, col, message)`.
fn error(text: &str) -> (usize, usize, String) {
    let err = parse_str(text).expect_err("config should be rejected");
    assert_eq!(err.path, Path::new("t.toml"));
    assert!(!err.message.contains('\n'), "multi-line: {}", err.message);
    (err.line, err.col, err.message)
}

/// Asserts the error is at `line:col` and mentions every piece of `parts`.
#[track_caller]
fn assert_error(text: &str, line: usize, col: usize, parts: &[&str]) {
    let (l, c, message) = error(text);
    assert_eq!((l, c), (line, col), "{message}");
    for part in parts {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

const MINIMAL: &str = r#"
[[upstream]]
name = "api"
base_url = "https://api.example.com"
rate = "10/s"
"#;

/// The directory of the config files the repository ships.
fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// A shipped config file, loaded as `pacegate --config` would.
fn shipped(name: &str) -> Config {
    load(&shipped_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `config/*.toml` loads, so a file added there is checked as well.
#[test]
fn every_shipped_config_loads() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(shipped_dir()).expect("read config/") {
        let name = entry.expect("config/ entry").file_name().into_string().expect("UTF-8 file name");
        if name.ends_with(".toml") {
            shipped(&name);
            names.push(name);
        }
    }
    for expected in ["docker.toml", "pacegate.toml"] {
        assert!(names.iter().any(|name| name == expected), "{expected} not found in {names:?}");
    }
}

/// The container image's config says it is the example with listeners that
/// can be published: anything else that differs is drift.
#[test]
fn docker_config_is_the_example_with_public_listeners() {
    let mut expected = shipped("pacegate.toml");
    expected.server.listen = "0.0.0.0:8080".parse().unwrap();
    expected.server.admin_listen = "0.0.0.0:9090".parse().unwrap();
    expected.server.admin_allow_remote = true;
    assert_eq!(shipped("docker.toml"), expected);
}

#[test]
fn shipped_example_is_valid() {
    let config = shipped("pacegate.toml");
    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["github", "openai", "anthropic", "stripe"]);
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(config.server.admin_listen, "127.0.0.1:9090".parse::<SocketAddr>().unwrap());
    assert_eq!(config.forward.unknown_hosts, UnknownHosts::Deny);
    let github = &config.upstreams[0];
    assert_eq!(github.route.as_deref(), Some("/github"));
    assert_eq!(github.hosts, ["api.github.com"]);
    assert_eq!(github.rate[0].to_string(), "5000/h");
    assert!(github.cache.is_some_and(|cache| cache.coalesce), "GitHub's answers are cached");
    assert_eq!(config.upstreams[1].hosts, ["api.openai.com"]);
    let token_quotas =
        |u: &Upstream| u.tokens.as_ref().map(|t| t.quotas.iter().map(|(k, _)| k.name()).collect::<Vec<_>>());
    assert_eq!(token_quotas(&config.upstreams[1]), Some(vec!["tokens"]));
    assert_eq!(token_quotas(&config.upstreams[2]), Some(vec!["input_tokens", "output_tokens"]));
}

#[test]
fn defaults_match_the_documentation() {
    let config = parse_str(MINIMAL).unwrap();
    let server = &config.server;
    assert_eq!(server.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(server.admin_listen, "127.0.0.1:9090".parse::<SocketAddr>().unwrap());
    assert!(!server.admin_allow_remote);
    assert_eq!(server.max_body_bytes, 10_485_760);
    assert_eq!(server.max_request_bytes, None);
    assert_eq!(server.shutdown_grace, Duration::from_secs(30));
    assert!(server.proxy_auth.is_empty());
    assert_eq!(server.max_connections.get(), 10_000);
    assert_eq!(server.max_header_bytes, 65_536);
    assert_eq!(server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(server.idle_timeout, Duration::from_secs(60));
    assert_eq!(server.body_read_timeout, Duration::from_secs(30));
    assert_eq!(server.send_timeout, Duration::from_secs(60));
    assert_eq!(server.max_buffered_bytes, 268_435_456);
    assert_eq!(server.workers, None);
    assert_eq!(config.forward.unknown_hosts, UnknownHosts::Deny);
    assert!(!config.forward.allow_private);
    assert!(config.mitm.enabled);
    assert_eq!(config.mitm.ca_cert, Path::new("ca.pem"));
    assert_eq!(config.mitm.ca_key, Path::new("ca-key.pem"));
    assert_eq!(config.redis, None);

    let up = &config.upstreams[0];
    assert_eq!(up.route, None);
    assert_eq!(up.hosts, ["api.example.com"]);
    assert_eq!(up.burst.get(), 1);
    assert!(up.adaptive);
    assert_eq!(up.max_concurrency.get(), 32);
    assert_eq!(up.queue_size, 1_000);
    assert_eq!(up.queue_timeout, Duration::from_secs(60));
    assert_eq!(up.timeout, Duration::from_secs(30));
    assert_eq!(up.partition_by, None);
    assert_eq!(up.max_partitions.get(), 10_000);
    assert_eq!(up.fair_by, None);
    assert_eq!(up.ca_file, None);

    let retry = &up.retry;
    assert_eq!(retry.max_attempts.get(), 5);
    let statuses: Vec<u16> = retry.on_status.iter().map(StatusCode::as_u16).collect();
    assert_eq!(statuses, [429, 502, 503, 504]);
    assert_eq!(retry.base_delay, Duration::from_millis(250));
    assert_eq!(retry.max_delay, Duration::from_secs(30));
    assert_eq!(retry.jitter, Jitter::Full);
    assert!(retry.respect_retry_after);
    assert_eq!(retry.max_retry_after, Duration::from_secs(120));
    assert_eq!(retry.budget, 0.2);
}

#[test]
fn empty_file_is_a_proxy_with_no_upstreams() {
    let config = parse_str("").unwrap();
    assert!(config.upstreams.is_empty());
}

#[test]
fn relative_paths_are_taken_from_the_config_files_directory() {
    let text = MINIMAL.replace("rate =", "ca_file = \"certs/private.pem\"\nrate =");
    let text = format!("[mitm]\nca_key = \"/abs/key.pem\"\n{text}");
    for (file, dir) in
        [("/etc/pacegate/p.toml", "/etc/pacegate"), ("config/p.toml", "config"), ("p.toml", "")]
    {
        let config = parse(Path::new(file), &text).unwrap_or_else(|e| panic!("{e}"));
        let dir = Path::new(dir);
        assert_eq!(config.mitm.ca_cert, dir.join("ca.pem"), "the default, beside {file}");
        assert_eq!(config.mitm.ca_key, Path::new("/abs/key.pem"), "an absolute path stays");
        assert_eq!(config.upstreams[0].ca_file.as_deref(), Some(&*dir.join("certs/private.pem")));
    }
}

#[test]
fn every_key_can_be_set() {
    let config = parse_str(
        r#"
[server]
listen = "0.0.0.0:0"
admin_listen = "10.0.0.1:9999"
admin_allow_remote = true
max_body_bytes = 1
max_request_bytes = 2048
shutdown_grace = "0s"
proxy_auth = ["u:p"]
max_connections = 7
max_header_bytes = 1024
header_read_timeout = "1s"
idle_timeout = "2m"
body_read_timeout = "3s"
send_timeout = "4s"
max_buffered_bytes = 5
workers = 3

[forward]
unknown_hosts = "pass"
allow_private = true

[mitm]
enabled = true
ca_cert = "a.pem"
ca_key = "b.pem"

[redis]
on_error = "deny"
timeout = "2s"

[[upstream]]
name = "x_1-a"
base_url = "https://h.example:8443/p"
route = "/x/"
hosts = ["H.example", "other.example:8080"]
rate = ["10/s", "5_000/h"]
burst = 3
adaptive = false
max_concurrency = 2
queue_size = 0
queue_timeout = "1.5s"
timeout = "1m30s"
partition_by = "header:Authorization"
max_partitions = 5
fair_by = "client_ip"
ca_file = "extra-ca.pem"

[upstream.retry]
max_attempts = 1
on_status = [500, 429, 500]
base_delay = "1s"
max_delay = "1s"
jitter = "equal"
respect_retry_after = false
max_retry_after = "5m"
budget = 0
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.max_request_bytes, Some(2048));
    assert_eq!(config.server.proxy_auth, ["u:p"]);
    assert_eq!(config.server.workers.map(NonZeroUsize::get), Some(3));
    assert_eq!(config.server.body_read_timeout, Duration::from_secs(3));
    assert_eq!(config.server.send_timeout, Duration::from_secs(4));
    assert_eq!(config.server.max_buffered_bytes, 5);
    assert_eq!(config.forward.unknown_hosts, UnknownHosts::Pass);
    let redis = config.redis.unwrap();
    assert_eq!(redis.nodes, RedisNodes::Server("redis://127.0.0.1:6379".to_owned()));
    assert_eq!(redis.on_error, RedisOnError::Deny);
    assert_eq!(redis.timeout, Duration::from_secs(2));
    let up = &config.upstreams[0];
    assert_eq!(up.route.as_deref(), Some("/x"));
    assert_eq!(up.hosts, ["h.example", "other.example:8080"]);
    assert_eq!(up.rate.len(), 2);
    assert_eq!(up.rate[1].per, Duration::from_secs(3_600));
    assert_eq!(up.rate[1].count.get(), 5_000);
    assert_eq!(up.timeout, Duration::from_secs(90));
    let authorization = http::header::AUTHORIZATION;
    assert_eq!(up.partition_by, Some(KeySource::Header(authorization)));
    assert_eq!(up.fair_by, Some(KeySource::ClientIp));
    assert_eq!(up.ca_file.as_deref(), Some(Path::new("extra-ca.pem")));
    assert_eq!(up.retry.on_status, [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(up.retry.jitter, Jitter::Equal);
    assert_eq!(up.retry.budget, 0.0);
}

#[test]
fn rate_is_a_string_or_an_array() {
    let one = parse_str(MINIMAL).unwrap();
    assert_eq!(one.upstreams[0].rate, [parse_rate("10/s").unwrap()]);
    let many = parse_str(&MINIMAL.replace(r#""10/s""#, r#"["10/s", "5000/h", "3/250ms"]"#)).unwrap();
    let shown: Vec<String> = many.upstreams[0].rate.iter().map(Rate::to_string).collect();
    assert_eq!(shown, ["10/s", "5000/h", "3/250ms"]);
}

#[test]
fn unknown_key_is_located() {
    assert_error("[server]\nlisten = \"127.0.0.1:1\"\n  lisen = 3\n", 3, 3, &["lisen"]);
    assert_error(&format!("{MINIMAL}burts = 2\n"), 6, 1, &["burts"]);
    assert_error(&format!("{MINIMAL}[upstream.retry]\nbudgett = 1\n"), 7, 1, &["budgett"]);
    assert_error("[sever]\n", 1, 2, &["sever"]);
}

#[test]
fn bad_duration_is_located_at_its_value() {
    let text = "[server]\nshutdown_grace = \"5x\"\n";
    assert_error(text, 2, 18, &[r#"invalid duration "5x": expected a number"#]);
    let text = format!("{MINIMAL}[upstream.retry]\nmax_delay = 30\n");
    assert_error(&text, 7, 13, &["duration"]);
}

#[test]
fn bad_rate_is_located_at_its_value() {
    let text = MINIMAL.replace(r#""10/s""#, r#""10/fortnight""#);
    assert_error(&text, 5, 8, &["invalid rate \"10/fortnight\""]);
    // Inside an array, at the element itself.
    let text = MINIMAL.replace(r#""10/s""#, r#"["10/s", "0/h"]"#);
    assert_error(&text, 5, 17, &["invalid rate \"0/h\"", "at least 1"]);
    let text = MINIMAL.replace(r#""10/s""#, "[]");
    assert_error(&text, 5, 8, &["at least one"]);
}

#[test]
fn type_errors_and_missing_keys_are_located() {
    assert_error("[server]\nmax_connections = -1\n", 2, 19, &[]);
    assert_error("[forward]\nunknown_hosts = \"allow\"\n", 2, 17, &["allow", "deny", "pass"]);
    let (line, _, message) = error("[[upstream]]\nname = \"a\"\nrate = \"1/s\"\n");
    assert_eq!(line, 1);
    assert!(message.contains("base_url"), "{message}");
    assert_error("[server\n", 1, 8, &[]);
}

const TWO: &str = r#"[[upstream]]
name = "a"
base_url = "https://a.example"
route = "/a"
rate = "1/s"

[[upstream]]
name = "b"
base_url = "https://b.example"
route = "/b"
rate = "1/s"
"#;

#[test]
fn two_distinct_upstreams_are_fine() {
    let config = parse_str(TWO).unwrap();
    assert_eq!(config.upstreams.len(), 2);
}

#[test]
fn duplicate_names_point_at_both() {
    let text = TWO.replace(r#"name = "b""#, r#"name = "a""#);
    assert_error(&text, 8, 8, &[r#"duplicate upstream name "a""#, "line 2"]);
}

#[test]
fn invalid_names() {
    for name in ["", "GitHub", "a b", "a.b", "ü"] {
        let text = TWO.replace(r#"name = "b""#, &format!("name = {name:?}"));
        assert_error(&text, 8, 8, &["invalid upstream name"]);
    }
}

#[test]
fn duplicate_routes_point_at_both() {
    let text = TWO.replace(r#"route = "/b""#, r#"route = "/a/""#);
    assert_error(&text, 10, 9, &[r#"route "/a" is already used by upstream "a" (line 4)"#]);
}

#[test]
fn shadowing_routes_name_both_upstreams() {
    let text = TWO
        .replace(r#"route = "/a""#, r#"route = "/api""#)
        .replace(r#"route = "/b""#, r#"route = "/api/v2""#);
    assert_error(&text, 10, 9, &["\"/api/v2\"", "\"b\"", "shadowed", "\"/api\"", "\"a\"", "line 4"]);
    // The other way round, the later, shorter route is the culprit.
    let text = TWO
        .replace(r#"route = "/a""#, r#"route = "/api/v2""#)
        .replace(r#"route = "/b""#, r#"route = "/api""#);
    assert_error(&text, 10, 9, &["shadows", "\"/api/v2\"", "\"a\""]);
    // Segment boundaries: "/api" does not shadow "/apix".
    let text =
        TWO.replace(r#"route = "/a""#, r#"route = "/api""#).replace(r#"route = "/b""#, r#"route = "/apix""#);
    assert!(parse_str(&text).is_ok());
}

#[test]
fn root_route_only_alone() {
    let text = TWO.replace(r#"route = "/b""#, r#"route = "/""#);
    assert_error(&text, 10, 9, &["catches every path", "\"a\""]);
    let alone = MINIMAL.replace("rate =", "route = \"/\"\nrate =");
    let config = parse_str(&alone).unwrap();
    assert_eq!(config.upstreams[0].route.as_deref(), Some("/"));
}

#[test]
fn bad_routes() {
    for route in ["a", "/a?x=1", "/a//b", "/a/../b", "/a b"] {
        let text = TWO.replace(r#"route = "/b""#, &format!("route = {route:?}"));
        assert_error(&text, 10, 9, &["invalid route"]);
    }
}

#[test]
fn host_conflicts_name_both_upstreams() {
    // Explicit host against the other upstream's base_url default.
    let text = TWO.replace(r#"route = "/b""#, "route = \"/b\"\nhosts = [\"x.example\", \"A.example:443\"]");
    assert_error(
        &text,
        11,
        23,
        &["\"a.example:443\"", "upstream \"a\" (line 3) through its base_url", "upstream \"b\""],
    );
    // Two base_url defaults.
    let text = TWO.replace("https://b.example", "http://a.example:8080");
    assert_error(&text, 9, 12, &["\"a.example\"", "upstream \"a\"", "upstream \"b\""]);
    // Different explicit ports do not conflict.
    let text = TWO
        .replace(r#"route = "/a""#, "route = \"/a\"\nhosts = [\"h.example:80\"]")
        .replace(r#"route = "/b""#, "route = \"/b\"\nhosts = [\"h.example:8080\"]");
    assert!(parse_str(&text).is_ok());
}

#[test]
fn unreachable_upstream_is_an_error() {
    let text = MINIMAL.replace("rate =", "hosts = []\nrate =");
    assert_error(&text, 5, 9, &["unreachable", "\"api\""]);
    // hosts = [] with a route is a reverse-only upstream.
    let text = MINIMAL.replace("rate =", "hosts = []\nroute = \"/api\"\nrate =");
    assert!(parse_str(&text).unwrap().upstreams[0].hosts.is_empty());
}

#[test]
fn admin_listener_stays_on_loopback() {
    let text = "[server]\nadmin_listen = \"0.0.0.0:9090\"\n";
    assert_error(
        text,
        2,
        16,
        &["admin listener must stay on loopback; set server.admin_allow_remote = true to expose it"],
    );
    let text = "[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_allow_remote = true\n";
    assert!(parse_str(text).is_ok());
    assert!(parse_str("[server]\nadmin_listen = \"[::1]:9090\"\n").is_ok());
    assert_error("[server]\nlisten = \"localhost:80\"\n", 2, 10, &["invalid listen"]);
    assert_error("[server]\nadmin_listen = \"127.0.0.1:8080\"\n", 2, 16, &["differ"]);
    assert_error("[server]\nlisten = \"127.0.0.1:9090\"\n", 2, 10, &["differ"]);
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    assert!(parse_str(text).is_ok());
}

#[test]
fn base_url_is_split() {
    let text = MINIMAL.replace("https://api.example.com", "http://[::1]:8080/v1/");
    let config = parse_str(&text).unwrap();
    let url = &config.upstreams[0].base_url;
    assert_eq!(url.scheme, http::uri::Scheme::HTTP);
    assert_eq!(url.authority.as_str(), "[::1]:8080");
    assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("::1", 8080, "/v1"));
    assert_eq!(config.upstreams[0].hosts, ["[::1]"]);

    let text = MINIMAL.replace("https://api.example.com", "https://api.example.com/base/");
    let url = &parse_str(&text).unwrap().upstreams[0].base_url;
    assert_eq!((url.port, url.path.as_str()), (443, "/base"));

    let text = MINIMAL.replace("https://api.example.com", "ftp://api.example.com");
    assert_error(&text, 4, 12, &["invalid base_url", "http:// or https://"]);
}

#[test]
fn numeric_limits() {
    let up = |key: &str| MINIMAL.replace("rate =", &format!("{key}\nrate ="));
    assert_error(&up("burst = 0"), 5, 9, &["burst must be at least 1"]);
    let mitm = format!("[mitm]\nca_cert = \"same.pem\"\nca_key = \"same.pem\"\n{MINIMAL}");
    assert_error(&mitm, 3, 10, &["ca_cert and ca_key must be different files"]);
    let wildcard =
        format!("[server]\nlisten = \"0.0.0.0:18090\"\nadmin_listen = \"127.0.0.1:18090\"\n{MINIMAL}");
    assert_error(&wildcard, 3, 16, &["admin_listen must differ from listen"]);
    // More than a window holds: the first burst would break the quota (and a
    // long window's burst would outgrow what pacing time can count).
    assert_error(&up("burst = 11"), 5, 9, &["burst 11", "more than the 10"]);
    let long = MINIMAL.replace("rate = \"10/s\"", "rate = [\"10/s\", \"1/365d\"]\nburst = 2");
    assert_error(&long, 6, 9, &["burst 2", "more than the 1"]);
    assert_error(&up("max_concurrency = 0"), 5, 19, &["max_concurrency"]);
    assert_error(&up("max_partitions = 0"), 5, 18, &["max_partitions"]);
    assert_error(&up("timeout = \"0s\""), 5, 11, &["timeout must be longer than 0s"]);
    let retry = |body: &str| format!("{MINIMAL}[upstream.retry]\n{body}\n");
    assert_error(&retry("max_attempts = 0"), 7, 16, &["max_attempts"]);
    assert_error(&retry("on_status = [429, 600]"), 7, 19, &["600", "status"]);
    assert_error(&retry("on_status = [99]"), 7, 14, &["99"]);
    assert_error(&retry("budget = -0.1"), 7, 10, &["budget"]);
    assert_error(&retry("budget = nan"), 7, 10, &["budget"]);
    assert_error(&retry("base_delay = \"1m\""), 7, 14, &["base_delay (1m)", "max_delay (30s)"]);
    assert_error(&retry("base_delay = \"2s\"\nmax_delay = \"1s\""), 8, 13, &["base_delay"]);
    assert_error("[server]\nmax_connections = 0\n", 2, 19, &["max_connections"]);
    assert_error("[server]\nmax_header_bytes = 1023\n", 2, 20, &["1024"]);
    assert_error("[server]\nidle_timeout = \"0ms\"\n", 2, 16, &["idle_timeout"]);
    assert_error("[server]\nsend_timeout = \"0s\"\n", 2, 16, &["send_timeout"]);
    assert_error("[server]\nworkers = 1025\n", 2, 11, &["workers", "1024"]);
}

#[test]
fn key_sources() {
    let up = |key: &str| MINIMAL.replace("rate =", &format!("{key}\nrate ="));
    assert_error(&up("partition_by = \"cookie\""), 5, 16, &["partition_by", "header:NAME"]);
    assert_error(&up("fair_by = \"header:bad name\""), 5, 11, &["fair_by"]);
    assert_error(&up("fair_by = \"header:\""), 5, 11, &["fair_by"]);
    let config = parse_str(&up("fair_by = \"header:X-Caller\"")).unwrap();
    let expected = http::HeaderName::from_static("x-caller");
    assert_eq!(config.upstreams[0].fair_by, Some(KeySource::Header(expected)));
}

#[test]
fn misc_rules() {
    let (line, col, message) = error("[server]\nproxy_auth = [\"a:b\", \"secret\"]\n");
    assert_eq!((line, col), (2, 22));
    assert!(!message.contains("secret"), "proxy_auth leaked: {message}");
    assert_error("[redis]\nurl = \"http://x\"\n", 2, 7, &["redis://"]);
    assert!(parse_str("[redis]\nurl = \"rediss://x:6380\"\n").is_ok());
    assert_error("[redis]\nurl = \"redis://x:port\"\n", 2, 7, &["bad redis url"]);
    let text = MINIMAL.replace("https://", "http://").replace("rate =", "ca_file = \"x.pem\"\nrate =");
    assert_error(&text, 5, 11, &["ca_file"]);
    let text = MINIMAL.replace("rate =", "hosts = [\"a b\"]\nrate =");
    assert_error(&text, 5, 10, &["invalid host"]);
}

#[test]
fn redis_takes_one_of_three_forms() {
    let nodes = |text: &str| parse_str(text).unwrap_or_else(|e| panic!("{e}")).redis.map(|r| r.nodes);
    let urls = |urls: &[&str]| urls.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        nodes("[redis]\ncluster = [\"redis://a:7000\", \"redis://b:7001\"]\n"),
        Some(RedisNodes::Cluster(urls(&["redis://a:7000", "redis://b:7001"])))
    );
    assert_eq!(
        nodes("[redis]\nsentinels = [\"rediss://:pw@a:26379\"]\nmaster = \"mymaster\"\n"),
        Some(RedisNodes::Sentinel {
            sentinels: urls(&["rediss://:pw@a:26379"]),
            master: "mymaster".into(),
            auth: None
        })
    );
    // The master's own credentials, apart from the sentinels'.
    let own = "[redis]\nsentinels = [\"redis://a:26379\"]\nmaster = \"m\"\nmaster_password = \"s3cret\"\n";
    let Some(RedisNodes::Sentinel { auth, .. }) = nodes(own) else { panic!("sentinel form") };
    let auth = auth.expect("master_password given");
    assert_eq!((auth.username, auth.password.as_deref()), (None, Some("s3cret")));
    let user = "[redis]\nsentinels = [\"redis://a\"]\nmaster = \"m\"\nmaster_username = \"pg\"\n";
    let Some(RedisNodes::Sentinel { auth: Some(auth), .. }) = nodes(user) else { panic!("auth") };
    assert_eq!((auth.username.as_deref(), auth.password), (Some("pg"), None));
    assert!(!format!("{:?}", nodes(own)).contains("s3cret"), "the password stays out of Debug");
    assert_error("[redis]\nurl = \"redis://a\"\nmaster_password = \"x\"\n", 3, 19, &["sentinels"]);
    let both = "[redis]\nurl = \"redis://a\"\ncluster = [\"redis://b\"]\n";
    assert_error(both, 3, 11, &["one of url, cluster or sentinels"]);
    let both = "[redis]\nsentinels = [\"redis://b\"]\nmaster = \"m\"\nurl = \"redis://a\"\n";
    assert_error(both, 4, 7, &["one of url, cluster or sentinels"]);
    assert_error("[redis]\nsentinels = [\"redis://a:26379\"]\n", 2, 13, &["master = "]);
    assert_error("[redis]\nmaster = \"m\"\n", 2, 10, &["sentinels"]);
    assert_error("[redis]\ncluster = []\n", 2, 11, &["at least one"]);
    assert_error("[redis]\ncluster = [\"redis://a\", \"http://b\"]\n", 2, 25, &["redis://"]);
    assert_error("[redis]\ntimeout = \"0s\"\n", 2, 11, &["timeout must be longer than 0s"]);
    assert_error(
        "[redis]\nsentinels = [\"redis://a\", \"rediss://b\"]\nmaster = \"m\"\n",
        2,
        13,
        &["rediss://"],
    );
    let passwords = "[redis]\ncluster = [\"redis://:one@a\", \"redis://:two@b\"]\n";
    let (line, col, message) = error(passwords);
    assert_eq!((line, col), (2, 11), "{message}");
    assert!(message.contains("different password") && !message.contains("one@"), "{message}");
}

#[test]
fn redis_keys_start_with_their_prefix() {
    let prefix = |text: &str| parse_str(text).unwrap_or_else(|e| panic!("{e}")).redis.map(|r| r.key_prefix);
    assert_eq!(prefix("[redis]\n").as_deref(), Some("pacegate"));
    assert_eq!(prefix("[redis]\nkey_prefix = \"prod:eu-1.pg_a\"\n").as_deref(), Some("prod:eu-1.pg_a"));
    for (bad, col) in [("\"\"", 14), ("\"a{b}\"", 14), ("\"a b\"", 14), ("\"a*\"", 14)] {
        assert_error(&format!("[redis]\nkey_prefix = {bad}\n"), 2, col, &["key_prefix", "1 to 64 letters"]);
    }
    assert_error(&format!("[redis]\nkey_prefix = \"{}\"\n", "a".repeat(65)), 2, 14, &["key_prefix"]);
}

#[test]
fn error_display_is_one_line() {
    let err = parse_str("[server]\nlisen = 1\n").unwrap_err();
    let shown = err.to_string();
    assert!(shown.starts_with("t.toml:2:1: "), "{shown}");
    assert_eq!(shown.lines().count(), 1);
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed() {
    for text in [
        "[server]\nproxy_auth = \"alice:s3cret\"\n",
        "[server]\nproxy_auth = \"al\\\"ice:s3cret\"\n",
        "[redis]\nurl = [\"redis://:s3cret@host\"]\n",
        "[redis]\nmaster_password = 98765432\n",
        "[redis]\nmaster_password = 9876.5432\n",
    ] {
        let error = parse_str(text).expect_err("wrong type").to_string();
        assert!(!error.contains("s3cret") && !error.contains("9876"), "{error}");
        assert!(error.contains(":2:") && error.contains("invalid type"), "{error}");
    }
    let error =
        parse_str("[server]\nproxy_auth = \"al\\\"ice:s3cret\"\nworkers = \"x\"\n").expect_err("type");
    assert!(error.to_string().ends_with("invalid type: a string, expected a sequence"), "{error}");
}

mod cache;
mod limits;
mod tokens;
