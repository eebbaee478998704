//! Cache keys: which stored answers a request may see, and which requests
//! in flight it may share.
//!
//! A key is a keyed hash (HMAC-SHA256 under a key drawn at start) of the
//! request's URI and its credentials, so a credential is never kept in the
//! cache, not even as a plain hash someone could test guesses against, and
//! two credentials never share an entry. The per-process key changes on
//! restart, which only empties a cache that is in memory anyway.

use std::sync::OnceLock;

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName};
use ring::hmac;

/// Request headers that carry a caller's credential. They are hashed into
/// the key and removed from what the cache keeps of a request.
static CREDENTIALS: [HeaderName; 5] = [
    AUTHORIZATION,
    COOKIE,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// Request headers that tell identical requests apart without changing
/// the answer (tracing and request ids): left out of the coalescing key.
static NOISE: [HeaderName; 8] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("baggage"),
    HeaderName::from_static("sentry-trace"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-correlation-id"),
    HeaderName::from_static("x-amzn-trace-id"),
    http::header::VIA,
];

/// A keyed hash naming a set of stored answers, or a request in flight.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key(")?;
        self.0[..8].iter().try_for_each(|byte| write!(f, "{byte:02x}"))?;
        write!(f, "…)")
    }
}

/// Makes keys for one upstream, whose `partition_by` header (if any) also
/// counts as a credential.
#[derive(Debug, Clone)]
pub struct Keyer {
    partition_header: Option<HeaderName>,
}

impl Keyer {
    pub fn new(partition_header: Option<HeaderName>) -> Self {
        Self { partition_header }
    }

    /// The stored answers `head` may be served: its URI and credentials.
    pub fn entry(&self, head: &http::request::Parts) -> Key {
        let mut context = hmac::Context::with_key(secret());
        field(&mut context, head.uri.to_string().as_bytes());
        for name in self.credentials() {
            field(&mut context, name.as_str().as_bytes());
            head.headers.get_all(name).iter().for_each(|value| field(&mut context, value.as_bytes()));
        }
        finish(context)
    }

    /// The requests in flight `head` may share: its entry key, and every
    /// other header but tracing ones, so that the shared answer is one its
    /// own request could have drawn whatever the answer varies on.
    pub fn flight(&self, entry: Key, head: &http::request::Parts) -> Key {
        let mut context = hmac::Context::with_key(secret());
        field(&mut context, &entry.0);
        let mut names: Vec<&HeaderName> =
            head.headers.keys().filter(|name| !NOISE.contains(name) && !self.is_credential(name)).collect();
        names.sort_unstable_by_key(|name| name.as_str());
        for name in names {
            field(&mut context, name.as_str().as_bytes());
            head.headers.get_all(name).iter().for_each(|value| field(&mut context, value.as_bytes()));
        }
        finish(context)
    }

    /// `headers` without credentials: what the cache may keep of a request.
    pub fn without_credentials(&self, headers: &HeaderMap) -> HeaderMap {
        let mut kept = headers.clone();
        for name in self.credentials() {
            kept.remove(name);
        }
        kept
    }

    /// Whether `headers` carry a credential: answers to them are private
    /// to it, so a `private` answer may be kept for that credential only.
    pub fn has_credential(&self, headers: &HeaderMap) -> bool {
        self.credentials().any(|name| headers.contains_key(name))
    }

    fn credentials(&self) -> impl Iterator<Item = &HeaderName> {
        CREDENTIALS.iter().chain(self.partition_header.as_ref())
    }

    fn is_credential(&self, name: &HeaderName) -> bool {
        self.credentials().any(|credential| credential == name)
    }
}

/// The process's key, drawn once.
fn secret() -> &'static hmac::Key {
    static SECRET: OnceLock<hmac::Key> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        hmac::Key::new(hmac::HMAC_SHA256, &bytes)
    })
}

/// One length-prefixed field, so that no two lists of fields hash alike.
fn field(context: &mut hmac::Context, bytes: &[u8]) {
    context.update(&(bytes.len() as u64).to_be_bytes());
    context.update(bytes);
}

fn finish(context: hmac::Context) -> Key {
    let mut key = [0; 32];
    key.copy_from_slice(context.sign().as_ref());
    Key(key)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut request = http::Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).map(|r| r.into_parts().0).expect("a valid request")
    }

    #[test]
    fn credentials_and_uris_separate_entries() {
        let keyer = Keyer::new(None);
        let a = keyer.entry(&head("https://api/x", &[("authorization", "Bearer a")]));
        assert_eq!(
            a,
            keyer.entry(&head("https://api/x", &[("authorization", "Bearer a"), ("accept", "*/*")]))
        );
        assert_ne!(a, keyer.entry(&head("https://api/x", &[("authorization", "Bearer b")])));
        assert_ne!(a, keyer.entry(&head("https://api/x", &[])));
        assert_ne!(a, keyer.entry(&head("https://api/y", &[("authorization", "Bearer a")])));
        let anonymous = keyer.entry(&head("https://api/x", &[("x-api-key", "k")]));
        assert_ne!(anonymous, keyer.entry(&head("https://api/x", &[])), "x-api-key is a credential");
    }

    #[test]
    fn the_partition_header_is_a_credential() {
        let keyer = Keyer::new(Some(HeaderName::from_static("x-tenant")));
        let a = head("https://api/x", &[("x-tenant", "a")]);
        assert_ne!(keyer.entry(&a), keyer.entry(&head("https://api/x", &[("x-tenant", "b")])));
        assert!(keyer.has_credential(&a.headers));
        assert!(keyer.without_credentials(&a.headers).is_empty());
    }

    #[test]
    fn flights_ignore_tracing_but_not_other_headers() {
        let keyer = Keyer::new(None);
        let flight = |headers: &[(&str, &str)]| {
            let head = head("https://api/x", headers);
            keyer.flight(keyer.entry(&head), &head)
        };
        let plain = flight(&[("accept", "application/json")]);
        assert_eq!(plain, flight(&[("accept", "application/json"), ("traceparent", "00-1-2-01")]));
        assert_ne!(plain, flight(&[("accept", "text/html")]));
        assert_ne!(plain, flight(&[("accept", "application/json"), ("accept-language", "fr")]));
    }

    proptest! {
        /// Whatever two credentials are, they never share an entry or a
        /// flight, and what the cache keeps of a request holds neither.
        #[test]
        fn credentials_never_share_and_are_never_kept(
            a in "[A-Za-z0-9_.-]{12,64}",
            b in "[A-Za-z0-9_.-]{12,64}",
            which in 0usize..5,
        ) {
            prop_assume!(a != b);
            let keyer = Keyer::new(None);
            let name = CREDENTIALS[which].as_str();
            let head_a = head("https://api/x", &[(name, &format!("Bearer {a}")), ("accept", "*/*")]);
            let head_b = head("https://api/x", &[(name, &format!("Bearer {b}")), ("accept", "*/*")]);
            let (entry_a, entry_b) = (keyer.entry(&head_a), keyer.entry(&head_b));
            prop_assert_ne!(entry_a, entry_b);
            prop_assert_ne!(keyer.flight(entry_a, &head_a), keyer.flight(entry_b, &head_b));
            let kept = keyer.without_credentials(&head_a.headers);
            prop_assert_eq!(kept.len(), 1, "only accept is kept");
            prop_assert!(kept.values().all(|v| !v.as_bytes().windows(a.len()).any(|w| w == a.as_bytes())));
        }
    }
}
