//! What upstreams claim (names, routes, hosts) and the conflicts between them.
//!
//! Upstreams are checked in file order against those before them, so the
//! later of two conflicting entries is the one reported; the message names
//! the earlier upstream and its line so that both halves can be found.
//! Routes match on whole path segments (`/api` covers `/api/v2`, not
//! `/apix`), hence no route may be a segment prefix of another. A host entry
//! without a port matches every port of that host, hence `"a.example"` and
//! `"a.example:443"` in two upstreams conflict.
use std::ops::Range;

use toml::Spanned;

use super::ConfigError;
use super::authority::HostPort;
use super::validate::Cx;

/// Names, routes and hosts of the upstreams checked so far, with where they are.
#[derive(Default)]
pub struct Claims {
    /// Upstream names and the span of each.
    names: Vec<(String, Range<usize>)>,
    /// Normalised routes: (route, upstream name, span of the route).
    routes: Vec<(String, String, Range<usize>)>,
    /// Every host claim so far, explicit or through a base_url.
    hosts: Vec<HostClaim>,
}

/// One upstream's claim on a host, explicit or through its base_url.
pub struct HostClaim {
    pub host: HostPort,
    /// Name of the claiming upstream.
    pub upstream: String,
    /// Where the claim is written: the `hosts` entry, or the base_url.
    pub span: Range<usize>,
    /// Said in errors, since the user never wrote this host in `hosts`.
    pub from_base_url: bool,
}

impl Claims {
    /// Checks an upstream name: `[a-z0-9_-]+`, not used by an earlier upstream.
    pub fn name(&mut self, cx: &Cx<'_>, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let name = raw.get_ref();
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            let message =
                format!("invalid upstream name {name:?}: use lower-case letters, digits, '_' and '-'");
            return Err(cx.err(raw.span(), message));
        }
        if let Some((_, first)) = self.names.iter().find(|(n, _)| n == name) {
            let line = cx.line(first);
            let message = format!("duplicate upstream name {name:?} (first defined at line {line})");
            return Err(cx.err(raw.span(), message));
        }
        self.names.push((name.clone(), raw.span()));
        Ok(name.clone())
    }

    /// Normalises the route of upstream `name` and checks it against the earlier ones.
    pub fn route(&mut self, cx: &Cx<'_>, name: &str, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let route = normalise_route(raw.get_ref())
            .map_err(|msg| cx.err(raw.span(), format!("invalid route {:?}: {msg}", raw.get_ref())))?;
        for (other, other_name, other_span) in &self.routes {
            // Reading the line scans the file: only for a conflict, never per pair.
            let line = || cx.line(other_span);
            let message = if *other == route {
                format!("route {route:?} is already used by upstream {other_name:?} (line {})", line())
            } else if other == "/" || route == "/" {
                format!(
                    "route \"/\" catches every path, so it must be the only route; \
                     upstream {other_name:?} (line {}) has route {other:?}",
                    line()
                )
            } else if segment_prefix(other, &route) {
                format!(
                    "route {route:?} of upstream {name:?} is shadowed by route {other:?} \
                     of upstream {other_name:?} (line {})",
                    line()
                )
            } else if segment_prefix(&route, other) {
                format!(
                    "route {route:?} of upstream {name:?} shadows route {other:?} \
                     of upstream {other_name:?} (line {})",
                    line()
                )
            } else {
                continue;
            };
            return Err(cx.err(raw.span(), message));
        }
        self.routes.push((route.clone(), name.to_owned(), raw.span()));
        Ok(route)
    }

    /// Records one upstream's host claims, refusing a host that another
    /// upstream already claims; returns the canonical entries, deduplicated.
    pub fn hosts(&mut self, cx: &Cx<'_>, claims: Vec<HostClaim>) -> Result<Vec<String>, ConfigError> {
        let mut hosts: Vec<String> = Vec::with_capacity(claims.len());
        for claim in &claims {
            let other =
                self.hosts.iter().find(|o| o.upstream != claim.upstream && o.host.overlaps(&claim.host));
            if let Some(other) = other {
                let message = format!(
                    "host {:?} is claimed by {} and by {}; a host belongs to at most one upstream",
                    claim.host.canonical(),
                    other.describe(cx),
                    claim.describe(cx),
                );
                return Err(cx.err(claim.span.clone(), message));
            }
            let canonical = claim.host.canonical();
            if !hosts.contains(&canonical) {
                hosts.push(canonical);
            }
        }
        self.hosts.extend(claims);
        Ok(hosts)
    }
}

impl HostClaim {
    /// `upstream "a" (line 3) through its base_url`.
    fn describe(&self, cx: &Cx<'_>) -> String {
        let how = if self.from_base_url { " through its base_url" } else { "" };
        let line = cx.line(&self.span);
        format!("upstream {:?} (line {line}){how}", self.upstream)
    }
}

/// `/x/y/` -> `/x/y`; `/` stays `/` (the catch-all).
fn normalise_route(route: &str) -> Result<String, String> {
    if !route.starts_with('/') {
        return Err("a route must start with '/'".to_owned());
    }
    let trimmed = route.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    if trimmed.contains(['?', '#']) {
        return Err("a route is a path prefix, without ?query or #fragment".to_owned());
    }
    if trimmed.parse::<http::uri::PathAndQuery>().is_err() {
        return Err("not a valid URL path".to_owned());
    }
    let bad_segment = |seg: &str| seg.is_empty() || seg == "." || seg == "..";
    if trimmed[1..].split('/').any(bad_segment) {
        return Err("empty, '.' and '..' path segments are not allowed".to_owned());
    }
    Ok(trimmed.to_owned())
}

/// Whether every path matched by route `long` is also matched by `short`.
fn segment_prefix(short: &str, long: &str) -> bool {
    short == "/" || long.strip_prefix(short).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_normalised() {
        assert_eq!(normalise_route("/github/"), Ok("/github".to_owned()));
        assert_eq!(normalise_route("/a/b"), Ok("/a/b".to_owned()));
        assert_eq!(normalise_route("//"), Ok("/".to_owned()));
        assert!(normalise_route("github").is_err());
    }

    #[test]
    fn prefixes_respect_segment_boundaries() {
        assert!(segment_prefix("/api", "/api/v2"));
        assert!(segment_prefix("/", "/anything"));
        assert!(!segment_prefix("/api", "/apix"));
        assert!(!segment_prefix("/api", "/api"));
        assert!(!segment_prefix("/api/v2", "/api"));
    }
}
