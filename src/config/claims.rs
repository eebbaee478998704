//! What upstreams claim (names, routes, hosts) and the conflicts between them.
//!
//! Upstreams are checked in file order against those before them, so the
//! later of two conflicting entries is the one reported; the message names
//! the earlier upstream and its line so that both halves can be found.
//! Routes match on whole path segments (`/api` covers `/api/v2`, not
//! `/apix`), hence no route may be a segment prefix of another. A host entry
//! without a port matches every port of that host, hence `"a.example"` and
//! `"a.example:443"` in two upstreams conflict.
use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;

use super::ConfigError;
use super::authority::HostPort;
use super::error::Cx;

/// Names, routes and hosts of the upstreams checked so far, with where they are.
///
/// Everything is indexed so that checking one upstream costs the same with
/// ten thousand before it as with one: comparing each new entry with every
/// earlier one made a config of 10k upstreams take over a second to load.
#[derive(Default)]
pub struct Claims {
    /// Upstream names and the span of each.
    names: HashMap<String, Range<usize>>,
    /// Normalised routes and who claims them.
    routes: HashMap<String, RouteClaim>,
    /// The first route claimed: the one a later `"/"` is reported against.
    first_route: Option<String>,
    /// Every proper segment prefix of a claimed route (`"/a"` and `"/a/b"`
    /// for `"/a/b/c"`), with the earliest route under it: a new route equal
    /// to one of them would shadow that route.
    covered: HashMap<String, String>,
    /// Every host claim so far, explicit or through a base_url, by host
    /// (two claims can only overlap on the same host), in file order.
    hosts: HashMap<String, Vec<HostClaim>>,
}

/// Who claims a route, and where.
struct RouteClaim {
    upstream: String,
    span: Range<usize>,
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

/// How a new route conflicts with an earlier one.
enum RouteConflict {
    Same,
    CatchAll,
    ShadowedBy,
    Shadows,
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
        if let Some(first) = self.names.get(name) {
            let line = cx.line(first);
            let message = format!("duplicate upstream name {name:?} (first defined at line {line})");
            return Err(cx.err(raw.span(), message));
        }
        self.names.insert(name.clone(), raw.span());
        Ok(name.clone())
    }

    /// Normalises the route of upstream `name` and checks it against the earlier ones.
    pub fn route(&mut self, cx: &Cx<'_>, name: &str, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let route = normalise_route(raw.get_ref())
            .map_err(|msg| cx.err(raw.span(), format!("invalid route {:?}: {msg}", raw.get_ref())))?;
        if let Some((conflict, other)) = self.conflict(&route) {
            let claim = &self.routes[other];
            let other_name = &claim.upstream;
            // Reading the line scans the file: only for a conflict.
            let line = cx.line(&claim.span);
            let message = match conflict {
                RouteConflict::Same => {
                    format!("route {route:?} is already used by upstream {other_name:?} (line {line})")
                }
                RouteConflict::CatchAll => format!(
                    "route \"/\" catches every path, so it must be the only route; \
                     upstream {other_name:?} (line {line}) has route {other:?}"
                ),
                RouteConflict::ShadowedBy => format!(
                    "route {route:?} of upstream {name:?} is shadowed by route {other:?} \
                     of upstream {other_name:?} (line {line})"
                ),
                RouteConflict::Shadows => format!(
                    "route {route:?} of upstream {name:?} shadows route {other:?} \
                     of upstream {other_name:?} (line {line})"
                ),
            };
            return Err(cx.err(raw.span(), message));
        }
        for prefix in segment_prefixes(&route) {
            self.covered.entry(prefix.to_owned()).or_insert_with(|| route.clone());
        }
        self.first_route.get_or_insert_with(|| route.clone());
        let claim = RouteClaim { upstream: name.to_owned(), span: raw.span() };
        self.routes.insert(route.clone(), claim);
        Ok(route)
    }

    /// The earlier route a new one conflicts with, if any. Earlier routes
    /// never conflict with each other, so at most one of them equals or
    /// covers the new route; when it covers several, the earliest is named.
    fn conflict(&self, route: &str) -> Option<(RouteConflict, &str)> {
        let first = self.first_route.as_deref()?;
        if let Some((other, _)) = self.routes.get_key_value(route) {
            return Some((RouteConflict::Same, other));
        }
        if route == "/" || first == "/" {
            return Some((RouteConflict::CatchAll, first));
        }
        if let Some(other) = segment_prefixes(route).find_map(|p| self.routes.get_key_value(p)) {
            return Some((RouteConflict::ShadowedBy, other.0));
        }
        self.covered.get(route).map(|other| (RouteConflict::Shadows, other.as_str()))
    }

    /// Records one upstream's host claims, refusing a host that another
    /// upstream already claims; returns the canonical entries, deduplicated.
    pub fn hosts(&mut self, cx: &Cx<'_>, claims: Vec<HostClaim>) -> Result<Vec<String>, ConfigError> {
        let mut hosts: Vec<String> = Vec::with_capacity(claims.len());
        for claim in &claims {
            let same_host = self.hosts.get(&claim.host.host).map_or(&[][..], Vec::as_slice);
            let other =
                same_host.iter().find(|o| o.upstream != claim.upstream && o.host.overlaps(&claim.host));
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
        for claim in claims {
            self.hosts.entry(claim.host.host.clone()).or_default().push(claim);
        }
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

/// The proper prefixes of a normalised route that end at a segment
/// boundary: `"/a"` and `"/a/b"` for `"/a/b/c"`; none for `"/a"` or `"/"`.
/// Each of them, as a route, would match every path `route` matches.
fn segment_prefixes(route: &str) -> impl Iterator<Item = &str> {
    route.match_indices('/').filter(|&(i, _)| i > 0).map(|(i, _)| &route[..i])
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
        let prefixes = |route| segment_prefixes(route).collect::<Vec<_>>();
        assert_eq!(prefixes("/api/v2/x"), ["/api", "/api/v2"]);
        assert_eq!(prefixes("/apix"), Vec::<&str>::new());
        assert_eq!(prefixes("/"), Vec::<&str>::new());
    }
}
