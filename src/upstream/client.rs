//! The pooled upstream client: keep-alive HTTP/1.1 and h2 over rustls.
//!
//! Each worker thread ([`crate::workers`]) has its own pool, so a
//! request and the upstream connection it uses stay on one thread; the
//! pool itself (`super::pool`) is built on `hyper::client::conn`.
//!
//! TLS verification is always on (webpki roots, plus an upstream's own
//! `ca_file` for private APIs). Pass-through traffic gets a client whose DNS
//! drops guarded addresses ([`super::guard`]).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::guard::Resolver;
use super::pool::Pool;
pub use super::pool::SendError;
use crate::body::ProxyBody;
use crate::workers;

/// Sends requests upstream over pooled connections.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    /// One per worker thread, by [`workers::current`].
    pools: Arc<[Arc<Pool>]>,
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
        // Each worker's pool gets its own connector and TLS config: it
        // clones them for each connection, and reference counts shared by
        // two threads bounce a cache line between their cores.
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
            Arc::new(Pool::new(https))
        };
        Self { pools: (0..workers.max(1)).map(pool).collect() }
    }

    /// Sends one attempt; `timeout` covers connect to the last byte of the head.
    ///
    /// Not an `async fn`, which would keep `request` in its state next to
    /// the pool's future that took it (see [`Pool::send`]).
    pub fn send(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + '_ {
        // A reload may change `workers` before a restart applies it.
        let pool = &self.pools[workers::current() % self.pools.len()];
        tokio::time::timeout(timeout, pool.send(request))
            .map(move |answer| answer.unwrap_or(Err(SendError::Timeout(timeout))))
    }
}

/// The Mozilla roots shipped with webpki-roots.
fn webpki_roots() -> RootCertStore {
    RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::mpsc;

    use http_body_util::BodyExt;

    use super::*;

    /// Answers one request per connection, keep-alive, then closes the
    /// first connection when told to; counts the connections.
    fn closing_upstream() -> (SocketAddr, mpsc::Sender<()>, mpsc::Receiver<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (close, closes) = mpsc::channel::<()>();
        let (closed, accepted) = mpsc::channel();
        std::thread::spawn(move || {
            for (count, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let mut head = Vec::new();
                let mut byte = [0; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok";
                let _ = stream.write_all(answer.as_bytes());
                // Held until told, or until the test ends.
                let _ = closes.recv();
                drop(stream);
                let _ = closed.send(count + 1);
            }
        });
        (addr, close, accepted)
    }

    fn get(addr: SocketAddr) -> Request<ProxyBody> {
        let mut request = Request::new(crate::body::empty());
        *request.uri_mut() = format!("http://{addr}/").parse().expect("uri");
        request
    }

    /// The keep-alive race: the upstream closes an idle connection just as
    /// a request is handed to it. The closing is noticed before the request
    /// is written, hyper hands the request back, and it goes on a new
    /// connection instead of failing (the legacy client's
    /// `retry_canceled_requests`).
    #[tokio::test]
    async fn a_request_handed_back_by_a_closed_pooled_connection_goes_on_a_new_one() {
        let (addr, close, closed) = closing_upstream();
        let client = UpstreamClient::new(1);
        let first = client.send(get(addr), Duration::from_secs(5)).await.expect("first answer");
        assert_eq!(first.into_body().collect().await.expect("body").to_bytes(), "ok");
        // Lets the connection go back to the pool, ready for the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;

        // While this runtime's thread is blocked, nothing runs: the trigger
        // becomes readable, then the upstream's FIN arrives. One poll of the
        // driver sees both; this test's future runs first and hands its
        // request to the pooled connection, whose task then reads the FIN
        // before it writes anything.
        let (trigger, mut pull) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        trigger.set_nonblocking(true).expect("non-blocking");
        let trigger = tokio::net::UnixStream::from_std(trigger).expect("trigger");
        pull.write_all(b"x").expect("trigger");
        close.send(()).expect("upstream alive");
        assert_eq!(closed.recv_timeout(Duration::from_secs(5)), Ok(1), "the first connection closed");
        std::thread::sleep(Duration::from_millis(20));
        trigger.readable().await.expect("readable");

        let second = client.send(get(addr), Duration::from_secs(5)).await.expect("second answer");
        assert_eq!(second.status(), 200);
        drop(close);
        assert_eq!(closed.recv_timeout(Duration::from_secs(5)), Ok(2), "a second connection");
    }
}
