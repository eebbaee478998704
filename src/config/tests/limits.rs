//! `[[upstream.limit]]` and `[upstream.breaker]`: parsing, validation and matching.

use http::Method;

use super::*;

fn with_limits(limits: &str) -> String {
    format!("{MINIMAL}{limits}")
}

fn only_upstream(text: &str) -> Upstream {
    let config = parse_str(text).unwrap_or_else(|e| panic!("{e}"));
    config.upstreams.into_iter().next().expect("one upstream")
}

#[test]
fn limits_parse_as_documented() {
    let upstream = only_upstream(&with_limits(
        r#"
[[upstream.limit]]
name = "writes"
methods = ["POST", "patch"]
paths = ["/repos/**"]
rate = ["80/min", "500/h"]
cost = { default = 1, POST = 5 }

[[upstream.limit]]
name = "search"
paths = ["/search/*"]
rate = "30/min"
burst = 3
"#,
    ));
    let [writes, search] = &upstream.limits[..] else { panic!("two limits: {:?}", upstream.limits) };
    assert_eq!(writes.name, "writes");
    assert_eq!(writes.methods, [Method::POST, Method::PATCH], "methods are upper-cased");
    assert_eq!(writes.rate.len(), 2);
    assert_eq!(writes.cost_of(&Method::POST, "/repos/a/b/issues").map(|c| c.get()), Some(5));
    assert_eq!(writes.cost_of(&Method::PATCH, "/repos/a").map(|c| c.get()), Some(1), "the default cost");
    assert_eq!(writes.cost_of(&Method::GET, "/repos/a"), None, "not a method it names");
    assert_eq!(writes.cost_of(&Method::POST, "/user"), None, "not a path it names");
    assert_eq!(search.burst.get(), 3);
    assert_eq!(search.cost_of(&Method::DELETE, "/search/code").map(|c| c.get()), Some(1), "every method");
    assert_eq!(only_upstream(MINIMAL).limits, [], "no limits by default");
}

#[test]
fn globs_cross_segments_only_with_a_double_star() {
    let upstream = only_upstream(&with_limits(
        r#"
[[upstream.limit]]
name = "one"
paths = ["/repos/*/issues", "/search/{code,issues}", "/gists/?"]
rate = "1/s"

[[upstream.limit]]
name = "deep"
paths = ["/repos/**"]
rate = "1/s"
"#,
    ));
    let matches = |limit: usize, path: &str| upstream.limits[limit].cost_of(&Method::GET, path).is_some();
    assert!(matches(0, "/repos/a/issues"));
    assert!(!matches(0, "/repos/a/b/issues"), "* stops at /");
    assert!(matches(0, "/search/code") && matches(0, "/search/issues") && !matches(0, "/search/users"));
    assert!(matches(0, "/gists/1") && !matches(0, "/gists/12"));
    assert!(matches(1, "/repos/a") && matches(1, "/repos/a/b/c"));
    assert!(!matches(1, "/repos") && !matches(1, "/reposx/a"));
}

#[test]
fn bad_limits_are_located() {
    let limit = |body: &str| with_limits(&format!("\n[[upstream.limit]]\n{body}"));
    // MINIMAL ends on line 5; the limit's keys start on line 8.
    assert_error(&limit("name = \"w\"\nrate = \"1/s\"\ncolour = 1\n"), 10, 1, &["unknown field", "colour"]);
    assert_error(&limit("name = \"W!\"\nrate = \"1/s\"\n"), 8, 8, &["[a-z0-9_-]+"]);
    assert_error(
        &limit("name = \"w\"\nrate = \"1/s\"\npaths = [\"/a/[\"]\n"),
        10,
        10,
        &["invalid path glob"],
    );
    assert_error(
        &limit("name = \"w\"\nrate = \"1/s\"\npaths = [\"repos/**\"]\n"),
        10,
        10,
        &["must start with /"],
    );
    assert_error(&limit("name = \"w\"\nrate = \"1/s\"\npaths = []\n"), 10, 9, &["match nothing"]);
    assert_error(&limit("name = \"w\"\nrate = \"1/s\"\nmethods = []\n"), 10, 11, &["match nothing"]);
    assert_error(&limit("name = \"w\"\nrate = \"1/s\"\ncost = 0\n"), 10, 8, &["at least 1"]);
    assert_error(
        &limit("name = \"w\"\nrate = \"1/s\"\ncost = { POST = 0 }\n"),
        10,
        8,
        &["cost.POST", "at least 1"],
    );
    assert_error(
        &limit("name = \"w\"\nrate = \"1/s\"\ncost = { post = 2 }\n"),
        10,
        8,
        &["\"post\"", "capitals"],
    );
    assert_error(&limit("name = \"w\"\nrate = \"1/s\"\nburst = 0\n"), 10, 9, &["burst"]);
    assert_error(&limit("name = \"w\"\nrate = \"3/s\"\nburst = 4\n"), 10, 9, &["burst 4", "more than the 3"]);
    assert_error(&limit("name = \"w\"\nrate = []\n"), 9, 8, &["at least one quota"]);
    assert_error(&limit("rate = \"1/s\"\n"), 7, 1, &["missing field", "name"]);
    let twice = limit("name = \"w\"\nrate = \"1/s\"\n\n[[upstream.limit]]\nname = \"w\"\nrate = \"2/s\"\n");
    assert_error(&twice, 12, 8, &["duplicate limit name \"w\""]);
}

#[test]
fn a_breaker_parses_with_its_defaults_and_bad_values_are_located() {
    let upstream = only_upstream(&with_limits("\n[upstream.breaker]\nmin_attempts = 5\n"));
    let breaker = upstream.breaker.expect("a breaker");
    assert_eq!((breaker.failure_ratio, breaker.min_attempts.get(), breaker.probes.get()), (0.5, 5, 1));
    assert_eq!(
        (breaker.window, breaker.open_for, breaker.max_open_for),
        (Duration::from_secs(10), Duration::from_secs(5), Duration::from_secs(60))
    );
    assert_eq!(breaker.on_status.len(), 4);
    assert_eq!(only_upstream(MINIMAL).breaker, None, "no breaker unless asked for");
    let bad = |body: &str| with_limits(&format!("\n[upstream.breaker]\n{body}"));
    assert_error(&bad("failure_ratio = 0.0\n"), 8, 17, &["failure_ratio"]);
    assert_error(&bad("failure_ratio = 1.5\n"), 8, 17, &["at most 1"]);
    assert_error(&bad("open_for = \"90s\"\n"), 8, 12, &["open_for (1m30s)", "max_open_for (1m)"]);
    assert_error(&bad("on_status = [500, 429]\n"), 8, 19, &["429", "cooldown"]);
    assert_error(&bad("probes = 0\n"), 8, 10, &["probes"]);
    assert_error(&bad("colour = 1\n"), 8, 1, &["unknown field"]);
}
