//! `[upstream.cache]`: defaults, sizes, and errors at their line and column.

use super::*;

fn cache_of(block: &str) -> Option<crate::config::Cache> {
    let config = parse_str(&format!("{MINIMAL}[upstream.cache]\n{block}")).unwrap_or_else(|e| panic!("{e}"));
    config.upstreams.into_iter().next().expect("one upstream").cache
}

#[test]
fn the_table_enables_the_cache_with_defaults() {
    let cache = cache_of("").expect("enabled by the table");
    assert_eq!((cache.max_size, cache.max_object, cache.coalesce), (64 << 20, 1 << 20, true));
    assert_eq!(parse_str(MINIMAL).unwrap().upstreams[0].cache, None, "no table, no cache");
    assert_eq!(cache_of("enabled = false"), None);
}

#[test]
fn sizes_take_units_or_bytes() {
    let cache = cache_of("max_size = \"2MB\"\nmax_object = 4096\ncoalesce = false").expect("enabled");
    assert_eq!((cache.max_size, cache.max_object, cache.coalesce), (2_000_000, 4096, false));
    assert_eq!(cache_of("max_size = \"1.5 KiB\"\nmax_object = \"1KiB\"").map(|c| c.max_size), Some(1536));
}

#[test]
fn bad_sizes_are_pointed_at() {
    let line = MINIMAL.lines().count() + 2;
    let text = |block: &str| format!("{MINIMAL}[upstream.cache]\n{block}");
    assert_error(&text("max_size = \"64 parsecs\""), line, 12, &["invalid size", "64 parsecs"]);
    assert_error(&text("max_size = -1"), line, 12, &["negative"]);
    assert_error(&text("max_size = 0"), line, 12, &["max_size", "more than 0"]);
    assert_error(&text("max_object = \"128MiB\""), line, 14, &["max_object", "must not exceed max_size"]);
    assert_error(&text("max_size = \"1KiB\""), line, 12, &["max_object", "must not exceed max_size"]);
    assert_error(&text("coalesced = true"), line, 1, &["unknown field", "coalesced"]);
}
