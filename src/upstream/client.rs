//! The pooled upstream client: keep-alive HTTP/1.1 and h2 over rustls.
//!
//! Each worker thread ([`crate::workers`]) has its own pool, so a
//! request and the upstream connection it uses stay on one thread.
//!
//! TLS verification is always on (webpki roots, plus an upstream's own
//! `ca_file` for private APIs). Pass-through traffic gets a client whose DNS
//! drops guarded addresses ([`super::guard`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::guard::Resolver;
use crate::body::ProxyBody;
use crate::workers;

/// How long an idle pooled connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why one attempt got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: DNS, TCP connect or TLS handshake failed.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response head within the attempt's timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection broke after (part of) the request may have been sent.
    #[error("connection broken: {0}")]
    Broken(String),
}

/// Sends requests upstream over pooled connections.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    /// One per worker thread, by [`workers::current`].
    pools: Arc<[Client<HttpsConnector<HttpConnector<Resolver>>, ProxyBody>]>,
}

/// Why an upstream's `ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("ca_file {path}: {reason}")]
pub struct CaFileError {
    path: String,
    reason: String,
}

impl UpstreamClient {
    /// A client trusting the webpki roots, speaking h2 where ALPN offers it,
    /// with a pool for each of `workers` threads.
    pub fn new(workers: usize) -> Self {
        Self::build(webpki_roots(), Resolver { guard: false }, workers)
    }

    /// Like [`Self::new`], but never connecting to guarded addresses.
    pub fn guarded(workers: usize) -> Self {
        Self::build(webpki_roots(), Resolver { guard: true }, workers)
    }

    /// A client trusting the webpki roots and the PEM certificates of `ca_file`.
    pub fn with_ca_file(ca_file: &Path, workers: usize) -> Result<Self, CaFileError> {
        let error = |reason: String| CaFileError { path: ca_file.display().to_string(), reason };
        let mut roots = webpki_roots();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| error(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| error(e.to_string()))?;
        if certs.is_empty() {
            return Err(error("no PEM certificate in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| error(e.to_string()))?;
        }
        Ok(Self::build(roots, Resolver { guard: false }, workers))
    }

    fn build(roots: RootCertStore, resolver: Resolver, workers: usize) -> Self {
        let tls =
            Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
        // Each worker's pool gets its own connector, TLS config and builder
        // (timers, executor): the client clones them on every request, and
        // reference counts shared by two threads bounce a cache line between
        // their cores on each of those clones.
        let pool = |_| {
            let mut http = HttpConnector::new_with_resolver(resolver);
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(rustls::ClientConfig::clone(&tls))
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                // One buffer, one write per request, as on the server side
                // (see `server::Shared::new`).
                .http1_writev(false)
                .build(https)
        };
        Self { pools: (0..workers.max(1)).map(pool).collect() }
    }

    /// Sends one attempt; `timeout` covers connect to the last byte of the head.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        // A reload may change `workers` before a restart applies it.
        let pool = &self.pools[workers::current() % self.pools.len()];
        match tokio::time::timeout(timeout, pool.request(request)).await {
            Err(_) => Err(SendError::Timeout(timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(SendError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(SendError::Broken(error_chain(&e))),
        }
    }
}

/// The Mozilla roots shipped with webpki-roots.
fn webpki_roots() -> RootCertStore {
    RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

/// The error and its causes on one line, for logs and error bodies.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
