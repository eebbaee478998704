//! `[[upstream.limit]]`: endpoint limits, validated.
//!
//! An endpoint limit is an extra quota that only matching requests take, on
//! top of the upstream's own: GitHub's "80 content-creating requests a
//! minute", or its points where a write costs 5. Matching is by method and
//! by path glob, on the path the caller sent after the route (the path the
//! upstream sees, less the base_url's own path). Globs follow `globset` with
//! `/` as a separator that only `**` crosses:
//! * `/repos/*/issues` matches `/repos/a/issues`, not `/repos/a/b/issues`;
//! * `/repos/**` matches `/repos/a` and `/repos/a/b/c`, not `/repos`;
//! * `/search/{code,issues}` matches either; `?` is one character but `/`;
//! * the query string is never part of the match.

use std::borrow::Cow;
use std::collections::HashSet;
use std::num::NonZeroU32;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use http::Method;
use toml::Spanned;

use super::error::Cx;
use super::raw::{Rates, RawLimit, RawUpstream};
use super::{ConfigError, Rate, TokenAccounting, TokenKind, Tokens};

/// Output reserved for an LLM call that names no `max_tokens` (docs/tokens.md).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Most endpoint limits per upstream: a request's set of limits is a bit set.
pub const MAX_LIMITS: usize = 32;

/// One `[[upstream.limit]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// `[a-z0-9_-]+`, unique within the upstream: the label in `/status`,
    /// metrics and the shared (Redis) key.
    pub name: String,
    /// Methods it applies to; empty: every method.
    pub methods: Vec<Method>,
    /// Paths it applies to; `None`: every path.
    pub paths: Option<PathGlobs>,
    /// Every quota is enforced, in units; at least one.
    pub rate: Vec<Rate>,
    /// Units one matching request takes.
    pub cost: Cost,
    /// Units that may leave back to back; 1 spaces requests evenly by cost.
    pub burst: NonZeroU32,
}

impl Limit {
    /// Units a request with this method and path takes from this limit, or
    /// `None` when the limit does not apply to it.
    pub fn cost_of(&self, method: &Method, path: &str) -> Option<NonZeroU32> {
        let method_matches = self.methods.is_empty() || self.methods.contains(method);
        let path_matches = self.paths.as_ref().is_none_or(|globs| globs.set.is_match(path));
        (method_matches && path_matches).then(|| self.cost.of(method))
    }
}

/// A request path as an upstream such as nginx serves it, which limits
/// match besides the path as sent. Repeated slashes are one, `/./` is
/// nothing, and an escaped unreserved character or slash (`%73`, `%2F`) is
/// itself, so that `/search/x` cannot skip a `/search/**` limit as
/// `//search/x`, `/%73earch/x` or `/search%2Fx`. Matching more is the safe
/// way to be wrong: a request counted in a limit it does not need waits,
/// one not counted draws the upstream's 429; matching the path as sent
/// too keeps a glob written for it (`/projects/*/issues` for
/// `/projects/g%2Fp/issues`). Paths without any of these are kept as they
/// are, with no copy.
pub fn matching_path(path: &str) -> Cow<'_, str> {
    if !path.contains("//") && !path.contains("/./") && !path.ends_with("/.") && !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(b));
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    // Only ASCII was decoded into valid UTF-8 text: still text.
    let text = String::from_utf8_lossy(&decoded);
    for segment in text.split('/') {
        if segment.is_empty() || segment == "." {
            continue;
        }
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || text.ends_with('/') || text.ends_with("/.") {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `cost`: one number, or a number per method with a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    pub default: NonZeroU32,
    pub per_method: Vec<(Method, NonZeroU32)>,
}

impl Cost {
    pub fn of(&self, method: &Method) -> NonZeroU32 {
        self.per_method.iter().find(|(m, _)| m == method).map_or(self.default, |(_, cost)| *cost)
    }
}

/// Path globs, compiled once; equal when written the same.
#[derive(Debug, Clone)]
pub struct PathGlobs {
    patterns: Vec<String>,
    set: GlobSet,
}

impl PartialEq for PathGlobs {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

/// Validates an upstream's `[[upstream.limit]]` tables.
pub fn limits(cx: &Cx<'_>, raw: Vec<RawLimit>) -> Result<Vec<Limit>, ConfigError> {
    if let Some(extra) = raw.get(MAX_LIMITS) {
        return Err(cx.err(extra.name.span(), format!("at most {MAX_LIMITS} limits per upstream")));
    }
    let mut names = HashSet::new();
    raw.into_iter().map(|raw| limit(cx, &mut names, raw)).collect()
}

fn limit(cx: &Cx<'_>, names: &mut HashSet<String>, raw: RawLimit) -> Result<Limit, ConfigError> {
    let name = raw.name.get_ref().clone();
    let valid = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(cx.err(raw.name.span(), "a limit name must match [a-z0-9_-]+"));
    }
    if let Some(kind) = TokenKind::ALL.into_iter().find(|kind| kind.name() == name) {
        return Err(cx.err(
            raw.name.span(),
            format!("{name:?} is the name of a token quota; set `{}` on the upstream instead", kind.name()),
        ));
    }
    if !names.insert(name.clone()) {
        return Err(cx.err(raw.name.span(), format!("duplicate limit name {name:?}")));
    }
    let methods = match &raw.methods {
        None => Vec::new(),
        Some(list) if list.get_ref().is_empty() => {
            return Err(cx.err(list.span(), "methods is empty: the limit would match nothing"));
        }
        Some(list) => list.get_ref().iter().map(|m| method(cx, m)).collect::<Result<_, _>>()?,
    };
    let paths = match &raw.paths {
        None => None,
        Some(list) if list.get_ref().is_empty() => {
            return Err(cx.err(list.span(), "paths is empty: the limit would match nothing"));
        }
        Some(list) => Some(globs(cx, list.get_ref())?),
    };
    let rate = raw.rate.get_ref().0.clone();
    if rate.is_empty() {
        return Err(cx.err(raw.rate.span(), "rate needs at least one quota, like \"80/min\""));
    }
    let burst = burst(cx, &raw.burst, &rate)?;
    let cost = match &raw.cost {
        None => Cost { default: NonZeroU32::MIN, per_method: Vec::new() },
        Some(value) => cost(cx, value)?,
    };
    Ok(Limit { name, methods, paths, rate, cost, burst })
}

/// Validates an upstream's token quotas and their settings.
pub fn tokens(cx: &Cx<'_>, raw: &RawUpstream) -> Result<Option<Tokens>, ConfigError> {
    let keys: [(TokenKind, &Option<Spanned<Rates>>); 3] = [
        (TokenKind::Total, &raw.tokens),
        (TokenKind::Input, &raw.input_tokens),
        (TokenKind::Output, &raw.output_tokens),
    ];
    let mut quotas = Vec::new();
    for (kind, rates) in keys {
        let Some(rates) = rates else { continue };
        if rates.get_ref().0.is_empty() {
            return Err(
                cx.err(rates.span(), format!("{} needs at least one quota, like \"30000/min\"", kind.name()))
            );
        }
        quotas.push((kind, rates.get_ref().0.clone()));
    }
    if quotas.is_empty() {
        // Settings for quotas that are not there would silently do nothing.
        if let Some(span) = raw.default_max_tokens.as_ref().map(Spanned::span) {
            return Err(cx.err(span, "default_max_tokens needs tokens, input_tokens or output_tokens"));
        }
        if let Some(span) = raw.token_accounting.as_ref().map(Spanned::span) {
            return Err(cx.err(span, "token_accounting needs tokens, input_tokens or output_tokens"));
        }
        return Ok(None);
    }
    let default_max_tokens = match &raw.default_max_tokens {
        None => DEFAULT_MAX_TOKENS,
        Some(value) if *value.get_ref() == 0 => {
            return Err(cx.err(value.span(), "default_max_tokens must be at least 1"));
        }
        Some(value) => *value.get_ref(),
    };
    let accounting = raw.token_accounting.as_ref().map_or(TokenAccounting::Usage, |a| (*a.get_ref()).into());
    Ok(Some(Tokens { quotas, default_max_tokens, accounting }))
}

/// `burst`: at least 1, and no more than the smallest count of `rates`. A
/// larger burst would put more into the quota's first window than it holds
/// (and, over a long window, more than pacing time can count). Even within
/// it, a window may hold up to count + burst − 1: the burst, then the
/// quota refilling as it is paced (docs/configuration.md says so).
pub(super) fn burst(cx: &Cx<'_>, raw: &Spanned<u32>, rates: &[Rate]) -> Result<NonZeroU32, ConfigError> {
    let burst =
        NonZeroU32::new(*raw.get_ref()).ok_or_else(|| cx.err(raw.span(), "burst must be at least 1"))?;
    match rates.iter().map(|rate| rate.count).min() {
        Some(count) if burst > count => Err(cx.err(
            raw.span(),
            format!("burst {burst} is more than the {count} a window of `rate` holds: the first burst would break it"),
        )),
        _ => Ok(burst),
    }
}

fn method(cx: &Cx<'_>, raw: &Spanned<String>) -> Result<Method, ConfigError> {
    let upper = raw.get_ref().to_ascii_uppercase();
    Method::from_bytes(upper.as_bytes())
        .map_err(|_| cx.err(raw.span(), format!("invalid method {:?}", raw.get_ref())))
}

fn globs(cx: &Cx<'_>, raw: &[Spanned<String>]) -> Result<PathGlobs, ConfigError> {
    let mut set = GlobSetBuilder::new();
    for pattern in raw {
        let text = pattern.get_ref();
        if !text.starts_with('/') && !text.starts_with("**") {
            return Err(cx.err(pattern.span(), format!("path glob {text:?} must start with /")));
        }
        let glob = GlobBuilder::new(text)
            .literal_separator(true)
            .build()
            .map_err(|e| cx.err(pattern.span(), format!("invalid path glob {text:?}: {}", e.kind())))?;
        set.add(glob);
    }
    let set = set.build().map_err(|e| cx.err(raw[0].span(), format!("invalid path globs: {e}")))?;
    Ok(PathGlobs { patterns: raw.iter().map(|p| p.get_ref().clone()).collect(), set })
}

/// `cost = 5` or `cost = { default = 1, POST = 5 }`.
fn cost(cx: &Cx<'_>, raw: &Spanned<toml::Value>) -> Result<Cost, ConfigError> {
    let units =
        |value: &toml::Value, what: &str| {
            value.as_integer().and_then(|n| u32::try_from(n).ok()).and_then(NonZeroU32::new).ok_or_else(
                || cx.err(raw.span(), format!("{what} must be a whole number of units, at least 1")),
            )
        };
    match raw.get_ref() {
        toml::Value::Table(table) => {
            let mut default = NonZeroU32::MIN;
            let mut per_method = Vec::new();
            for (key, value) in table {
                if key == "default" {
                    default = units(value, "cost.default")?;
                    continue;
                }
                let method = Method::from_bytes(key.as_bytes())
                    .ok()
                    .filter(|_| key.bytes().all(|b| b.is_ascii_uppercase()))
                    .ok_or_else(|| {
                        cx.err(
                            raw.span(),
                            format!("cost: {key:?} is neither default nor a method in capitals"),
                        )
                    })?;
                per_method.push((method, units(value, &format!("cost.{key}"))?));
            }
            Ok(Cost { default, per_method })
        }
        value => Ok(Cost { default: units(value, "cost")?, per_method: Vec::new() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_matched_as_an_upstream_serves_them() {
        for (path, want) in [
            ("/search/code", "/search/code"),
            ("//search/code", "/search/code"),
            ("/search//code/", "/search/code/"),
            ("/./search/./code", "/search/code"),
            ("/%73earch/code", "/search/code"),
            ("/search%2Fcode", "/search/code"),
            ("/search%2fcode", "/search/code"),
            ("/search/%E2%82%AC", "/search/%E2%82%AC"),
            ("/search/%zz", "/search/%zz"),
            ("/search/%", "/search/%"),
            ("/a/.", "/a/"),
            ("//", "/"),
        ] {
            assert_eq!(matching_path(path), want, "{path:?}");
        }
        assert!(matches!(matching_path("/search/code"), Cow::Borrowed(_)), "no copy when nothing changes");
    }
}
