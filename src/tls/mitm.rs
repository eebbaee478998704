//! Interception: a TLS server config per intercepted host, with a leaf
//! certificate for exactly that host, made on first use and cached.
//!
//! The leaf is only served when the client's SNI names the CONNECT host (or
//! sends no SNI, as clients do for IP addresses): a CONNECT to one host must
//! not yield a certificate valid for the session of another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    /// Lower-cased host -> its server config.
    configs: Mutex<HashMap<String, Arc<ServerConfig>>>,
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
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if let Some(config) = self.lock().get(&host) {
            return Ok(config.clone());
        }
        let key = Arc::new(self.leaf(&host)?);
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
        configs.insert(host, config.clone());
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerConfig>>> {
        // A panic while holding the lock leaves a valid map: keep using it.
        self.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh key and a certificate for `host` signed by the CA.
    fn leaf(&self, host: &str) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
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
