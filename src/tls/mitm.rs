//! Interception: a TLS server config per intercepted host, with a leaf
//! certificate for exactly that host, made on first use and cached.
//!
//! The leaf is only served when the client's SNI names the CONNECT host (or
//! sends no SNI, as clients do for IP addresses): a CONNECT to one host must
//! not yield a certificate valid for the session of another. A cached leaf
//! is made anew [`RENEW_BEFORE`] its end, so that a pacegate that runs for
//! more than a year goes on intercepting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ca::Source;
use super::{Ca, TlsError};

/// Leaf certificates stay within what browsers accept (398 days).
const LEAF_VALIDITY: time::Duration = time::Duration::days(397);
/// A cached leaf this close to its end is made anew.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// Bound on cached hosts; only configured hosts are intercepted, so this is
/// a safety net, not a working limit.
const MAX_CACHED: usize = 4096;

/// Makes and caches the TLS server side of intercepted tunnels. One per
/// CA: a CA that changes is a new interceptor, so the leaves the old one
/// signed go with it.
#[derive(Debug)]
pub struct Interceptor {
    ca: Ca,
    provider: Arc<CryptoProvider>,
    /// Host (lower case; an IP address as Rust writes it) -> its server
    /// config, and when its leaf is to be made anew.
    configs: Mutex<HashMap<String, (Arc<ServerConfig>, SystemTime)>>,
}

impl Interceptor {
    /// An interceptor signing with the CA at these paths.
    pub fn load(mitm: &crate::config::Mitm) -> Result<Self, TlsError> {
        Ok(Self::new(Ca::load(&mitm.ca_cert, &mitm.ca_key)?))
    }

    /// An interceptor signing with `ca`, with no leaf made yet.
    pub fn new(ca: Ca) -> Self {
        Self {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// The files its CA was loaded from, and what they held.
    pub fn source(&self) -> &Source {
        &self.ca.source
    }

    /// The server config for `host` (ALPN h2 and http/1.1), made on first use.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_at(host, SystemTime::now())
    }

    /// [`Self::server_config`] at `now`: a leaf near its end is made anew.
    fn server_config_at(&self, host: &str, now: SystemTime) -> Result<Arc<ServerConfig>, TlsError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        // A client sends no final dot in its SNI (RFC 6066 §3).
        let host = host.strip_suffix('.').filter(|name| !name.is_empty()).unwrap_or(host);
        // One leaf for every spelling of an address (`2001:DB8:0::5`, `2001:db8::5`).
        let host = host.parse::<IpAddr>().map_or_else(|_| host.to_ascii_lowercase(), |ip| ip.to_string());
        if let Some((config, renew_at)) = self.lock().get(&host)
            && now < *renew_at
        {
            return Ok(config.clone());
        }
        let now = time::OffsetDateTime::from(now);
        let key = Arc::new(self.leaf(&host, now)?);
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(HostCert { host: host.clone(), key }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut configs = self.lock();
        if configs.len() >= MAX_CACHED {
            configs.clear();
        }
        let renew_at = SystemTime::from(now + LEAF_VALIDITY - RENEW_BEFORE);
        configs.insert(host, (config.clone(), renew_at));
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<ServerConfig>, SystemTime)>> {
        // A panic while holding the lock leaves a valid map: keep using it.
        self.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh key and a certificate for `host` signed by the CA, valid from
    /// a day before `now` (clocks differ) for [`LEAF_VALIDITY`].
    fn leaf(&self, host: &str, now: time::OffsetDateTime) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        // An ECDSA key signs; it enciphers no key (RFC 5480 §3).
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + LEAF_VALIDITY;
        let cert = params.signed_by(&key, &self.ca.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self.provider.key_provider.load_private_key(der)?;
        Ok(CertifiedKey::new(vec![cert.der().clone(), self.ca.cert.clone()], signer))
    }
}

/// Serves one host's leaf, and nothing for any other SNI (handshake fails).
#[derive(Debug)]
struct HostCert {
    host: String,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for HostCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) if !name.eq_ignore_ascii_case(&self.host) => {
                tracing::debug!(sni = name, host = %self.host, "SNI does not match the CONNECT host");
                None
            }
            _ => Some(self.key.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn interceptor() -> Interceptor {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (cert, key) = super::super::write_new_ca(dir.path()).expect("a new CA");
        Interceptor::new(Ca::load(&cert, &key).expect("the CA loads"))
    }

    /// A leaf is kept until 30 days before its end (397 days), then made
    /// anew: a pacegate up for more than a year still intercepts.
    #[test]
    fn a_leaf_near_its_end_is_made_anew() {
        let mitm = interceptor();
        let day = Duration::from_secs(86_400);
        let t0 = SystemTime::now();
        let first = mitm.server_config_at("api.test", t0).expect("a leaf");
        let later = mitm.server_config_at("API.test", t0 + 366 * day).expect("the same leaf");
        assert!(Arc::ptr_eq(&first, &later), "renewed too soon");
        let renewed = mitm.server_config_at("api.test", t0 + 368 * day).expect("a new leaf");
        assert!(!Arc::ptr_eq(&first, &renewed), "a leaf 29 days from its end was served");
    }

    #[test]
    fn every_spelling_of_an_address_shares_one_leaf() {
        let mitm = interceptor();
        let one = mitm.server_config("[2001:db8::5]").expect("a leaf");
        let other = mitm.server_config("2001:DB8:0:0::5").expect("a leaf");
        assert!(Arc::ptr_eq(&one, &other));
    }
}
