//! Routing: which upstream a request belongs to, and the URI it is sent to.
//!
//! Forward mode (absolute-form target, `HTTP_PROXY`) matches the target's host
//! against every upstream's `hosts`; reverse mode (origin-form target) matches
//! the path against `route` prefixes on segment boundaries. Either way the
//! upstream's `base_url` decides scheme, host and port, and the caller's path
//! and query are appended to base_url's path.
//!
//! Targets with an authority are checked first: a proxy must not follow
//! another scheme than http(s), userinfo (RFC 9110 §4.2.4), an empty host or
//! a port that is not one; CONNECT takes `host:port` only (RFC 9110 §9.3.6).
//!
//! The routing table is built from the config alone, so each config
//! generation ([`crate::runtime`]) builds its own and [`crate::proxy`] looks
//! requests up in it: below both, it needs neither.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Uri, Version};

use crate::config::{self, BaseUrl, Config, UnknownHosts};
use crate::error::ProxyError;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// To the upstream at this index of the config, at this URI.
    Upstream { index: usize, uri: Uri },
    /// Forwarded unpaced to a host no upstream claims (`unknown_hosts = "pass"`).
    PassThrough { uri: Uri },
}

/// Lookup tables built once per config.
#[derive(Debug)]
pub struct Router {
    /// Each upstream's base_url, by config index.
    bases: Vec<BaseUrl>,
    /// `host` and `host:port` (lower case) -> upstream index.
    hosts: HashMap<String, usize>,
    /// Whether any of `hosts` names a port: only then is a target without
    /// one looked up again at its default port.
    ported: bool,
    /// Route prefixes, longest first, with their upstream index.
    routes: Vec<(String, usize)>,
    unknown_hosts: UnknownHosts,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let mut hosts = HashMap::new();
        let mut routes = Vec::new();
        for (index, upstream) in config.upstreams.iter().enumerate() {
            for host in &upstream.hosts {
                hosts.insert(host.clone(), index);
            }
            if let Some(route) = &upstream.route {
                routes.push((route.clone(), index));
            }
        }
        routes.sort_by_key(|(route, _)| std::cmp::Reverse(route.len()));
        let ported = hosts.keys().any(|host| names_a_port(host));
        Self {
            bases: config.upstreams.iter().map(|u| u.base_url.clone()).collect(),
            hosts,
            ported,
            routes,
            unknown_hosts: config.forward.unknown_hosts,
        }
    }

    /// Decides where a request with this target goes.
    pub fn route(&self, uri: &Uri, version: Version) -> Result<Target, ProxyError> {
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        if path_and_query == "*" {
            // OPTIONS * asks about this server, not about an upstream's path.
            return Err(bad_target("`*` (OPTIONS of the whole server) is not forwarded"));
        }
        if has_dot_segment(path_and_query) {
            return Err(bad_target("`.` and `..` path segments are refused"));
        }
        if let Some(authority) = uri.authority() {
            check_absolute(uri, authority)?;
            let default_port = uri.scheme().map_or(80, config::default_port);
            if let Some(index) = self.upstream_for_host(authority, Some(default_port)) {
                return self.upstream(index, path_and_query);
            }
            // HTTP/2 always carries an authority: there it may name the proxy itself.
            if version != Version::HTTP_2 {
                return self.unknown_host(uri, authority);
            }
        }
        self.reverse(path_and_query)
    }

    /// The upstream claiming a host, as `host:port` first, then as `host`.
    /// An authority without a port is at `default_port` (its scheme's), so
    /// that `hosts = ["api.example.com:80"]` claims `http://api.example.com/`.
    pub fn upstream_for_host(&self, authority: &Authority, default_port: Option<u16>) -> Option<usize> {
        let host = config::canonical_host(authority.host());
        if let Some(port) = authority.port() {
            // Every forwarded request asks: an authority written as its key
            // is (no user info, no leading zeros) is looked up as it is,
            // without building the key.
            let written = authority.as_str();
            let key = match &host {
                Cow::Borrowed(host)
                    if written.len() == host.len() + 1 + port.as_str().len()
                        && !port.as_str().starts_with('0') =>
                {
                    Cow::Borrowed(written)
                }
                _ => Cow::Owned(format!("{host}:{}", port.as_u16())),
            };
            if let Some(index) = self.hosts.get(key.as_ref()) {
                return Some(*index);
            }
        }
        let bare = self.hosts.get(host.as_ref()).copied();
        match (bare, authority.port(), default_port) {
            (None, None, Some(port)) if self.ported => self.hosts.get(&format!("{host}:{port}")).copied(),
            _ => bare,
        }
    }

    /// The upstream a plain CONNECT tunnel to `authority` (port `port`)
    /// belongs to. An upstream claims a host *and port*: the port `hosts`
    /// names with it, or else its base_url's port. Any other port of the host
    /// is not the upstream's, so a tunnel cannot reach, say, the admin
    /// listener or another service on an upstream's machine.
    pub fn tunnel_upstream(&self, authority: &Authority, port: u16) -> Option<usize> {
        let host = config::canonical_host(authority.host());
        if let Some(index) = self.hosts.get(&format!("{host}:{port}")) {
            return Some(*index);
        }
        let index = *self.hosts.get(host.as_ref())?;
        (self.bases[index].port == port).then_some(index)
    }

    fn unknown_host(&self, uri: &Uri, authority: &Authority) -> Result<Target, ProxyError> {
        match self.unknown_hosts {
            UnknownHosts::Pass if uri.scheme() == Some(&Scheme::HTTP) => {
                Ok(Target::PassThrough { uri: uri.clone() })
            }
            _ => Err(ProxyError::UnknownHost { host: authority.host().to_string() }),
        }
    }

    fn upstream(&self, index: usize, rest: &str) -> Result<Target, ProxyError> {
        Ok(Target::Upstream { index, uri: join(&self.bases[index], rest)? })
    }

    fn reverse(&self, path_and_query: &str) -> Result<Target, ProxyError> {
        for (route, index) in &self.routes {
            if let Some(rest) = strip_route(path_and_query, route) {
                return self.upstream(*index, rest);
            }
        }
        Err(ProxyError::NoRoute { path: path_of(path_and_query).to_string() })
    }
}

/// Refuses absolute-form targets (and h2 authorities) pacegate must not follow.
fn check_absolute(uri: &Uri, authority: &Authority) -> Result<(), ProxyError> {
    let scheme = uri.scheme_str().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad_target(&format!("unsupported scheme {scheme:?}")));
    }
    port_of(authority).map(drop)
}

/// The target of a CONNECT: authority-form `host:port`, nothing else.
pub fn tunnel_target(uri: &Uri) -> Result<(Authority, u16), ProxyError> {
    let refuse = || bad_target("CONNECT needs host:port");
    let authority = match uri.authority() {
        Some(authority) if uri.scheme().is_none() && uri.path_and_query().is_none() => authority,
        _ => return Err(refuse()),
    };
    let port = port_of(authority)?.ok_or_else(refuse)?;
    Ok((authority.clone(), port))
}

/// The port an authority names, if any; refuses userinfo, an empty host and
/// anything after the host that is not a port from 1 to 65535.
fn port_of(authority: &Authority) -> Result<Option<u16>, ProxyError> {
    let text = authority.as_str();
    if text.contains('@') {
        return Err(bad_target("credentials in the request target are refused"));
    }
    let host = authority.host();
    if host.is_empty() || host == "[]" {
        return Err(bad_target("empty host"));
    }
    // Without userinfo, the authority is the host, then maybe ":port".
    match text.get(host.len()..) {
        Some("") => Ok(None),
        Some(rest) => {
            let digits =
                rest.strip_prefix(':').filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            match digits.and_then(|p| p.parse::<u16>().ok()) {
                Some(port) if port > 0 => Ok(Some(port)),
                _ => Err(bad_target(&format!("invalid port in {text:?}"))),
            }
        }
        None => Err(bad_target("malformed authority")),
    }
}

/// Whether the path has a `.` or `..` segment, plain or percent-encoded
/// (`%2e`). Refused rather than normalised: behind a route, `..` would climb
/// out of base_url's path prefix, and upstreams disagree on how to resolve
/// them, so no request pacegate forwards carries one. Segments end at `/`
/// and at what an upstream may decode or read as one: `\`, `%2F`, `%5C`
/// (`/api/..%2fadmin` climbs out of `/api` on a server that decodes first).
#[inline]
fn has_dot_segment(path_and_query: &str) -> bool {
    // Most paths have neither a dot nor a `%` before the query: one scan on
    // every request, kept inline; the walk of the segments is not.
    for &byte in path_and_query.as_bytes() {
        match byte {
            b'?' => break,
            b'.' | b'%' => return walk_finds_dot_segment(path_of(path_and_query).as_bytes()),
            _ => {}
        }
    }
    false
}

#[cold]
#[inline(never)]
fn walk_finds_dot_segment(path: &[u8]) -> bool {
    segments(path).any(is_dot_segment)
}

/// The path of a path-and-query.
fn path_of(path_and_query: &str) -> &str {
    path_and_query.split_once('?').map_or(path_and_query, |(path, _)| path)
}

/// `path` split at `/`, `\`, `%2F` and `%5C` (either case).
fn segments(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(path);
    std::iter::from_fn(move || {
        let path = rest?;
        let separator = (0..path.len()).find_map(|i| match path[i..] {
            [b'/' | b'\\', ..] => Some((i, 1)),
            [b'%', b'2', f, ..] if f.eq_ignore_ascii_case(&b'f') => Some((i, 3)),
            [b'%', b'5', c, ..] if c.eq_ignore_ascii_case(&b'c') => Some((i, 3)),
            _ => None,
        });
        match separator {
            Some((at, len)) => {
                rest = Some(&path[at + len..]);
                Some(&path[..at])
            }
            None => {
                rest = None;
                Some(path)
            }
        }
    })
}

/// `.` or `..`, each dot written as `.` or `%2e` (either case), with or
/// without path parameters after a `;` (`%3B`), which servlet containers
/// drop before they resolve the dots (`/..;/admin`).
fn is_dot_segment(segment: &[u8]) -> bool {
    let params = (0..segment.len()).find(|&i| match segment[i..] {
        [b';', ..] => true,
        [b'%', b'3', b, ..] => b.eq_ignore_ascii_case(&b'b'),
        _ => false,
    });
    let segment = &segment[..params.unwrap_or(segment.len())];
    let (mut rest, mut dots) = (segment, 0);
    while !rest.is_empty() && dots < 3 {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    rest.is_empty() && (1..=2).contains(&dots)
}

/// Whether a `hosts` key (`host`, `host:port`, `[v6]`, `[v6]:port`) names a port.
fn names_a_port(host: &str) -> bool {
    host.rsplit_once(':').is_some_and(|(name, port)| {
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && (!name.starts_with('[') || name.ends_with(']'))
    })
}

fn bad_target(reason: &str) -> ProxyError {
    ProxyError::BadRequest(format!("invalid request target: {reason}"))
}

/// The rest of `path_and_query` after `route`, when the route matches whole
/// path segments ("/github" matches "/github/x" and "/github?q", not "/githubx").
fn strip_route<'a>(path_and_query: &'a str, route: &str) -> Option<&'a str> {
    if route == "/" {
        return Some(path_and_query);
    }
    let rest = path_and_query.strip_prefix(route)?;
    match rest.as_bytes().first() {
        None | Some(b'/') | Some(b'?') => Some(rest),
        Some(_) => None,
    }
}

/// base_url + the caller's path and query.
///
/// Built in one buffer that the URI then owns, since every request pays
/// for it (no formatting, no copy into the URI).
pub fn join(base: &BaseUrl, rest: &str) -> Result<Uri, ProxyError> {
    // "/github?q" keeps base_url's path as is: "/v1?q", not "/v1/?q".
    let path =
        if base.path.is_empty() && (rest.is_empty() || rest.starts_with('?')) { "/" } else { &base.path };
    // Exactly as long as it needs: `Bytes` takes a full buffer as it is,
    // where spare capacity costs it an allocation of its own.
    let mut path_and_query = String::with_capacity(path.len() + rest.len());
    path_and_query.push_str(path);
    path_and_query.push_str(rest);
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query = Some(
        PathAndQuery::from_maybe_shared(Bytes::from(path_and_query))
            .map_err(|e| bad_target(&e.to_string()))?,
    );
    Uri::from_parts(parts).map_err(|e| bad_target(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base(path: &str) -> BaseUrl {
        BaseUrl {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("api.example.com"),
            host: "api.example.com".into(),
            port: 443,
            path: path.into(),
        }
    }

    /// A config with one upstream per name, routed at `/name`.
    fn routes(names: &[String]) -> Config {
        let text: String = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                format!(
                    "[[upstream]]\nname = \"u{i}\"\nbase_url = \"https://api{i}.example.com/v{i}\"\n\
                     route = \"/{name}\"\nhosts = []\nrate = \"1/s\"\n"
                )
            })
            .collect();
        crate::config::parse(std::path::Path::new("routes.toml"), &text).unwrap()
    }

    /// A target without a port is at its scheme's default port.
    #[test]
    fn a_host_claimed_at_the_default_port_matches_a_target_without_one() {
        let text = "[[upstream]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1\"\nrate = \"1/s\"\n\
                    hosts = [\"plain.test:80\", \"secure.test:443\"]\n";
        let router = Router::new(&crate::config::parse(std::path::Path::new("hosts.toml"), text).unwrap());
        let routed = |uri: &str| {
            router
                .route(&uri.parse().unwrap(), Version::HTTP_11)
                .map(|t| matches!(t, Target::Upstream { .. }))
        };
        for uri in ["http://plain.test/x", "http://plain.test:80/x", "https://secure.test/x"] {
            assert_eq!(routed(uri).ok(), Some(true), "{uri}");
        }
        for uri in ["http://plain.test:8080/x", "http://secure.test/x"] {
            assert!(routed(uri).is_err(), "{uri} is not claimed");
        }
        for (host, ported) in [("a.test", false), ("a.test:80", true), ("[::1]", false), ("[::1]:9000", true)]
        {
            assert_eq!(names_a_port(host), ported, "{host}");
        }
    }

    #[test]
    fn hosts_match_in_any_spelling_of_their_canonical_form() {
        let text = "[[upstream]]\nname = \"a\"\nbase_url = \"https://api.example.com\"\nrate = \"1/s\"\n\
                    hosts = [\"Api.Example.com\", \"other.test:8443\", \"[::1]:9000\", \"[2001:db8::7]\"]\n";
        let router = Router::new(&crate::config::parse(std::path::Path::new("hosts.toml"), text).unwrap());
        let found =
            |authority: &str| router.upstream_for_host(&Authority::try_from(authority).unwrap(), None);
        for claimed in [
            "api.example.com",
            "API.example.com:443",
            "api.example.com:8080",
            "other.test:8443",
            "OTHER.test:8443",
            "other.test:08443",
            "user@other.test:8443",
            "[::1]:9000",
            "[0:0::1]:9000",
            "[2001:DB8::7]:443",
        ] {
            assert_eq!(found(claimed), Some(0), "{claimed}");
        }
        for unclaimed in ["other.test", "other.test:8444", "[::1]", "[::2]:9000", "example.com"] {
            assert_eq!(found(unclaimed), None, "{unclaimed}");
        }
        let tunnel =
            |authority: &str, port| router.tunnel_upstream(&Authority::try_from(authority).unwrap(), port);
        assert_eq!(tunnel("[::1]:9000", 9000), Some(0));
        assert_eq!(tunnel("[::1]:9001", 9001), None);
        assert_eq!(tunnel("API.example.com:443", 443), Some(0), "the base_url's port");
    }

    #[test]
    fn dot_segments_are_refused() {
        for path in [
            "/api/../admin",
            "/api/./x",
            "/api/%2e%2e/x",
            "/api/.%2E",
            "/..",
            "/api/x/..?q",
            "/api/..%2fadmin/users",
            "/api/%2e%2e%2Fadmin",
            "/api/x/..%2f..%2fadmin",
            "/api/..%5cadmin",
            "/api/..\\admin",
            "/api/x%2F..",
            "/api/..;/admin",
            "/api/%2e%2e;x/admin",
            "/api/..%3Bx/admin",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in
            ["/api/x", "/api/...", "/api/.hidden", "/api/x?q=/../", "/api/a..b", "/api/a%2Fb", "/api/%2f%2f"]
        {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn route_matches_whole_segments() {
        assert_eq!(strip_route("/github/x?y=1", "/github"), Some("/x?y=1"));
        assert_eq!(strip_route("/github", "/github"), Some(""));
        assert_eq!(strip_route("/github?y", "/github"), Some("?y"));
        assert_eq!(strip_route("/githubx", "/github"), None);
        assert_eq!(strip_route("/anything", "/"), Some("/anything"));
    }

    #[test]
    fn join_keeps_prefix_path_and_query() {
        assert_eq!(join(&base("/v1"), "/x?y=1").unwrap(), "https://api.example.com/v1/x?y=1");
        assert_eq!(join(&base("/v1"), "").unwrap(), "https://api.example.com/v1");
        assert_eq!(join(&base("/v1"), "?q=2").unwrap(), "https://api.example.com/v1?q=2");
        assert_eq!(join(&base(""), "").unwrap(), "https://api.example.com/");
        assert_eq!(join(&base(""), "/a/b").unwrap(), "https://api.example.com/a/b");
    }

    proptest! {
        #[test]
        fn join_appends_the_path_unchanged(segments in proptest::collection::vec("[a-zA-Z0-9_.~-]{1,8}", 0..5), query in proptest::option::of("[a-z0-9=&]{0,12}")) {
            let mut rest = String::new();
            for s in &segments { rest.push('/'); rest.push_str(s); }
            if let Some(q) = &query { rest.push('?'); rest.push_str(q); }
            let uri = join(&base("/v1"), &rest).unwrap();
            let path = uri.path();
            prop_assert!(path.starts_with("/v1"));
            prop_assert_eq!(&path[3..], rest.split('?').next().unwrap_or(""));
            prop_assert_eq!(uri.query(), query.as_deref());
        }

        #[test]
        fn a_route_matches_whole_segments_only(
            names in proptest::collection::btree_set("[a-z]{1,6}", 1..5),
            pick in any::<prop::sample::Index>(),
            rest in prop::sample::select(vec!["", "/", "/x/y", "?q=1", "/x?y=2"]),
            extra in "[a-z0-9]{1,4}",
        ) {
            let names: Vec<String> = names.into_iter().collect();
            let config = routes(&names);
            let router = Router::new(&config);
            let i = pick.index(names.len());
            let path: Uri = format!("/{}{rest}", names[i]).parse().unwrap();
            let want = Target::Upstream { index: i, uri: join(&config.upstreams[i].base_url, rest).unwrap() };
            prop_assert_eq!(router.route(&path, Version::HTTP_11).unwrap(), want);
            let longer = format!("{}{extra}", names[i]);
            match router.route(&format!("/{longer}").parse().unwrap(), Version::HTTP_11) {
                // Only a route named exactly like the longer segment may take it.
                Ok(Target::Upstream { index, .. }) => prop_assert_eq!(&names[index], &longer),
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(error) => prop_assert_eq!(error.code(), "no_route"),
            }
        }

        #[test]
        fn absolute_targets_with_credentials_or_bad_ports_are_refused(
            userinfo in proptest::option::of("[a-z]{1,5}(:[a-z]{0,5})?@"),
            port in proptest::option::of(0u32..100_000),
        ) {
            let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
            let bad_port = port.is_some_and(|p| p == 0 || p > 65_535);
            let absolute = format!("http://{}api.example.com{port_text}/x", userinfo.clone().unwrap_or_default());
            // Where the URI parser refuses first, the head check answers 400.
            if let Ok(uri) = absolute.parse::<Uri>() {
                let router = Router::new(&routes(&["api".to_string()]));
                let refused = matches!(router.route(&uri, Version::HTTP_11), Err(ProxyError::BadRequest(_)));
                prop_assert_eq!(refused, userinfo.is_some() || bad_port);
            }
            let connect = format!("api.example.com{port_text}").parse::<Uri>();
            let tunnel = connect.is_ok_and(|uri| tunnel_target(&uri).is_ok());
            prop_assert_eq!(tunnel, port.is_some() && !bad_port);
        }

        #[test]
        fn strip_route_never_panics(path in "[/a-z?=]{0,20}", route in "/[a-z]{0,6}") {
            if let Some(rest) = strip_route(&path, &route) {
                prop_assert!(path.ends_with(rest));
            }
        }
    }
}
