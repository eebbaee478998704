//! HTTPS through `HTTPS_PROXY`: interception with our own CA,
//! plain tunnels, the private-address guard, `proxy_auth` and `ca init`.
//! Only loopback is ever connected to; every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::mock::{Behaviour, MockUpstream};
use support::{Pacegate, TEST_SERVER, builder, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every single network wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A fresh CA in a temp dir: (dir, certificate PEM).
fn new_ca() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, _key) = pacegate::tls::write_new_ca(dir.path()).expect("write CA");
    let pem = std::fs::read_to_string(cert).expect("read CA");
    (dir, pem)
}

/// Config with interception on and `api.test` served by `mock_url`.
fn mitm_config(ca_dir: &Path, mock_url: &str, extra_upstream: &str) -> String {
    format!(
        "{TEST_SERVER}\n[mitm]\nenabled = true\nca_cert = \"{cert}\"\nca_key = \"{key}\"\n\n\
         [[upstream]]\nname = \"api\"\nbase_url = \"{mock_url}\"\nhosts = [\"api.test\"]\n{extra_upstream}\n",
        cert = ca_dir.join("ca.pem").display(),
        key = ca_dir.join("ca-key.pem").display(),
    )
}

/// A reqwest client using `pg` as HTTPS_PROXY and trusting only `ca_pem`.
fn https_client(pg: &Pacegate, ca_pem: Option<&str>) -> reqwest::Client {
    let mut b = builder().proxy(reqwest::Proxy::https(pg.url("")).expect("proxy url")).timeout(WAIT);
    if let Some(pem) = ca_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA pem"));
    }
    b.build().expect("client")
}

/// Sends `CONNECT authority` (with extra header lines) and reads the answer
/// head; returns the stream (the tunnel, when 200) and the head.
async fn connect(proxy: SocketAddr, authority: &str, extra: &str) -> (TcpStream, String) {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(proxy)).await.unwrap().unwrap();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte)).await.expect("answer in time").unwrap();
        assert!(n == 1, "connection closed inside the answer head: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap().to_ascii_lowercase())
}

#[tokio::test]
async fn intercepted_https_reaches_the_upstream_and_is_paced() {
    let (ca_dir, ca_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start_config(&mitm_config(
        ca_dir.path(),
        &mock.url(),
        "rate = \"20/s\"\nburst = 1\nqueue_size = 100\nqueue_timeout = \"30s\"",
    ))
    .await;
    let client = https_client(&pg, Some(&ca_pem));
    let started = Instant::now();
    let requests = (0..40).map(|i| {
        let client = client.clone();
        async move { client.get(format!("https://api.test/items?i={i}")).send().await }
    });
    let responses = futures_util::future::join_all(requests).await;
    let elapsed = started.elapsed();
    for response in responses {
        let response = response.expect("request through the interception");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN offers h2 inside the tunnel");
    }
    assert!(elapsed >= Duration::from_millis(1900), "40 requests at 20/s took only {elapsed:?}");
    assert_eq!(mock.count(), 40);
    let arrival = &mock.arrivals()[0];
    assert!(arrival.path_and_query.starts_with("/items?i="), "{}", arrival.path_and_query);
    assert!(arrival.headers.get("proxy-authorization").is_none());

    // HTTP/1.1 inside the tunnel works as well as h2.
    let h1 = builder()
        .proxy(reqwest::Proxy::https(pg.url("")).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .http1_only()
        .timeout(WAIT)
        .build()
        .unwrap();
    let response = h1.post("https://api.test/h1").body("hello").send().await.expect("h1 request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    // The CONNECTs were answers for `api` as much as the requests inside.
    assert_eq!(pg.metric(NONE_200).await, None, "a CONNECT to api.test counted under no upstream");
    // 41 requests and at least one CONNECT for each client.
    let api_200 = pg.metric(r#"pacegate_requests_total{upstream="api",code="200"}"#).await;
    assert!(api_200.is_some_and(|n| n >= 43.0), "{api_200:?}");
}

/// Sends one plain HTTP/1.1 request (`Connection: close`) on `tunnel` and
/// reads the whole answer, lowercased.
async fn plain_request(mut tunnel: TcpStream, path: &str, host: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tunnel.read_to_end(&mut answer)).await.expect("answer in time").unwrap();
    String::from_utf8_lossy(&answer).to_ascii_lowercase()
}

/// `[mitm]` of [`mitm_config`] turned on or off.
fn with_mitm(config: &str, on: bool) -> String {
    config.replace("[mitm]\nenabled = true\n", &format!("[mitm]\nenabled = {on}\n"))
}

/// Plain HTTP needs no CA: it is served the same with interception off.
#[tokio::test]
async fn plain_http_inside_a_tunnel_is_paced_and_retried() {
    for mitm in [true, false] {
        let (ca_dir, _ca_pem) = new_ca();
        let mock = MockUpstream::start(Behaviour::new().fail_first(1, 503)).await;
        let authority = mock.addr().to_string();
        // `hosts` left out: the upstream claims its base_url's host, 127.0.0.1.
        let config = mitm_config(
            ca_dir.path(),
            &mock.url(),
            "rate = \"50/s\"\n[upstream.retry]\nbase_delay = \"10ms\"",
        )
        .replace("hosts = [\"api.test\"]\n", "");
        let pg = Pacegate::start_config(&with_mitm(&config, mitm)).await;
        // What undici's EnvHttpProxyAgent does for an http:// URL.
        let (tunnel, head) = connect(pg.proxy, &authority, "").await;
        assert!(head.starts_with("http/1.1 200"), "mitm {mitm}: {head}");
        let answer = plain_request(tunnel, "/x?q=1", &authority).await;
        assert!(answer.starts_with("http/1.1 200"), "mitm {mitm}: {answer}");
        assert!(answer.contains("x-pacegate-attempts: 2\r\n"), "mitm {mitm}: the 503 was retried: {answer}");
        assert_eq!(mock.count(), 2, "mitm {mitm}");
        assert_eq!(mock.arrivals()[1].path_and_query, "/x?q=1");
        assert_eq!(unpaced_tunnels(&pg).await, 0, "mitm {mitm}: the tunnel was paced");
    }
}

/// A CONNECT inside a tunnel is refused and its connection closed: the
/// upstream is no proxy, and nothing pipelined behind it goes unanswered.
#[tokio::test]
async fn a_connect_inside_a_tunnel_is_refused() {
    let (ca_dir, _ca_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let authority = mock.addr().to_string();
    let config =
        mitm_config(ca_dir.path(), &mock.url(), "rate = \"50/s\"").replace("hosts = [\"api.test\"]\n", "");
    let pg = Pacegate::start_config(&config).await;
    let (mut tunnel, head) = connect(pg.proxy, &authority, "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let inner = format!(
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\nGET /x HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    );
    tunnel.write_all(inner.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tunnel.read_to_end(&mut answer)).await.expect("closed in time").unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(answer.contains("x-pacegate-error: bad_request"), "{answer}");
    assert_eq!(answer.matches("http/1.1 ").count(), 1, "one answer, then the connection closes: {answer}");
    assert_eq!(mock.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn plain_http_tunnelled_to_port_80_goes_to_an_https_base_url() {
    for mitm in [true, false] {
        let (ca_dir, _pem) = new_ca();
        let server = private_tls_server(ca_dir.path()).await;
        let base = format!("https://localhost:{}", server.port());
        let ca_file = format!("rate = \"50/s\"\nca_file = \"{}\"", ca_dir.path().join("ca.pem").display());
        let pg = Pacegate::start_config(&with_mitm(&mitm_config(ca_dir.path(), &base, &ca_file), mitm)).await;
        let (tunnel, head) = connect(pg.proxy, "api.test:80", "").await;
        assert!(head.starts_with("http/1.1 200"), "mitm {mitm}: {head}");
        let answer = plain_request(tunnel, "/x", "api.test").await;
        assert!(
            answer.starts_with("http/1.1 200"),
            "mitm {mitm}: base_url's scheme and port decide: {answer}"
        );
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    }
}

/// With interception off, TLS to the port an upstream claims is relayed as
/// it comes to the upstream's base_url: the client's handshake is with the
/// upstream's own certificate.
#[tokio::test]
async fn tls_in_a_tunnel_without_mitm_reaches_the_upstream_untouched() {
    let (ca_dir, ca_pem) = new_ca();
    let server = private_tls_server(ca_dir.path()).await;
    let config = format!(
        "{NO_MITM}[[upstream]]\nname = \"api\"\nbase_url = \"https://localhost:{port}\"\n\
         hosts = [\"api.test\"]\nrate = \"10/s\"\n",
        port = server.port()
    );
    let pg = Pacegate::start(&config).await;
    let (stream, head) = connect(pg.proxy, &format!("api.test:{}", server.port()), "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut session = tokio::time::timeout(WAIT, rustls_client(&ca_pem).connect(name, stream))
        .await
        .unwrap()
        .expect("a handshake with the upstream itself");
    session.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, session.read_to_end(&mut answer)).await.unwrap().ok();
    assert!(answer.ends_with(b"\r\n\r\nok"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(unpaced_tunnels(&pg).await, 1, "counted as an unpaced tunnel");
}

#[tokio::test]
async fn a_tunnel_that_carries_neither_tls_nor_http_is_closed() {
    let (ca_dir, _ca_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start_config(&mitm_config(ca_dir.path(), &mock.url(), "rate = \"50/s\"")).await;
    let (mut tunnel, head) = connect(pg.proxy, "api.test:443", "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    tunnel.write_all(b"\x00\x01 not a protocol\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, tunnel.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(read.is_err() || rest.is_empty(), "nothing comes back: {rest:?}");
    assert_eq!(mock.count(), 0);
}

/// What a plain tunnel carries in these tests: neither TLS nor HTTP to
/// pacegate (HTTP would be served, not relayed), relayed as it is.
const OPAQUE: &[u8] = b"\x00\x01ping";

/// CONNECTs to the echo server at `echo` through `pg`: answered 200, and
/// bytes sent come back through the tunnel.
async fn assert_tunnel_reaches(pg: &Pacegate, echo: SocketAddr) {
    let (mut stream, head) = connect(pg.proxy, &echo.to_string(), "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    stream.write_all(OPAQUE).await.unwrap();
    let mut buf = [0u8; OPAQUE.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, OPAQUE, "the tunnel reaches {echo}");
}

/// `pacegate_requests_total` of 200s answered for no configured upstream.
const NONE_200: &str = r#"pacegate_requests_total{upstream="none",code="200"}"#;

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    let (ca_dir, _ca_pem) = new_ca();
    let (_other_dir, other_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start_config(&mitm_config(ca_dir.path(), &mock.url(), "rate = \"100/s\"")).await;
    let error = https_client(&pg, Some(&other_pem)).get("https://api.test/x").send().await.unwrap_err();
    assert!(error.is_connect() || error.is_request(), "unexpected error: {error:?}");
    assert_eq!(mock.count(), 0);
}

/// rustls client config trusting only `ca_pem`.
fn rustls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn the_leaf_is_valid_for_the_connect_host_only() {
    let (ca_dir, ca_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start_config(&mitm_config(ca_dir.path(), &mock.url(), "rate = \"100/s\"")).await;
    let tls = rustls_client(&ca_pem);

    // Right SNI: the handshake succeeds and verifies against our CA.
    let (stream, head) = connect(pg.proxy, "api.test:443", "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let mut session =
        tokio::time::timeout(WAIT, tls.connect(name, stream)).await.unwrap().expect("handshake");
    session.write_all(b"GET /leaf HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, session.read_to_end(&mut answer)).await.unwrap().ok();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(mock.count(), 1);

    // SNI of another host in a tunnel opened for api.test: cleanly refused.
    let (stream, head) = connect(pg.proxy, "api.test:443", "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let other = rustls::pki_types::ServerName::try_from("other.test").unwrap();
    let result = tokio::time::timeout(WAIT, tls.connect(other, stream)).await.expect("bounded handshake");
    assert!(result.is_err(), "a leaf for other.test must not be served");
    assert_eq!(mock.count(), 1);
}

#[tokio::test]
async fn tunnels_to_unknown_hosts_when_pass_and_private_allowed() {
    let echo = echo_server().await;
    let pg = Pacegate::start("[forward]\nunknown_hosts = \"pass\"\nallow_private = true\n").await;
    assert_tunnel_reaches(&pg, echo).await;
}

/// `[mitm]` turned off.
const NO_MITM: &str = "[mitm]\nenabled = false\n";

/// `unpaced_tunnels` of upstream `api` in `/status`.
async fn unpaced_tunnels(pg: &Pacegate) -> u64 {
    let status = pg.status().await;
    let api = status["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == "api").cloned();
    api.expect("upstream api")["unpaced_tunnels"].as_u64().expect("unpaced_tunnels")
}

#[tokio::test]
async fn tunnels_to_configured_hosts_without_mitm() {
    let echo = echo_server().await;
    let config = format!(
        "{NO_MITM}[[upstream]]\nname = \"api\"\nbase_url = \"http://{echo}\"\nhosts = [\"{ip}:{port}\"]\nrate = \"10/s\"\n",
        ip = echo.ip(),
        port = echo.port()
    );
    // Configured upstreams may point at loopback even with allow_private = false.
    let pg = Pacegate::start(&config).await;
    assert_eq!(unpaced_tunnels(&pg).await, 0);
    assert_tunnel_reaches(&pg, echo).await;
    let api_200 = r#"pacegate_requests_total{upstream="api",code="200"}"#;
    assert_eq!(pg.metric(api_200).await, Some(1.0), "the unpaced tunnel is counted under its upstream");
    assert_eq!(pg.metric(NONE_200).await, None);
    assert_tunnel_reaches(&pg, echo).await;
    assert_eq!(unpaced_tunnels(&pg).await, 2, "/status shows the unpaced tunnels");
}

#[tokio::test]
async fn interception_is_on_by_default_with_a_ca_created_beside_the_config() {
    use std::os::unix::fs::PermissionsExt;
    let mock = MockUpstream::start(Behaviour::new()).await;
    let upstream =
        format!("[[upstream]]\nname = \"api\"\nbase_url = \"{}\"\nhosts = [\"api.test\"]\n", mock.url());
    let pg = Pacegate::start(&format!("{upstream}rate = \"100/s\"\n")).await;
    let dir = pg.config_path.parent().expect("config dir");
    let key = dir.join("ca-key.pem");
    assert_eq!(std::fs::metadata(&key).expect("ca-key.pem").permissions().mode() & 0o777, 0o600);
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem beside the config");

    let response = https_client(&pg, Some(&ca_pem)).get("https://api.test/zen").send().await;
    assert_eq!(response.expect("intercepted with the new CA").status(), 200);
    assert_eq!(mock.count(), 1, "the request inside the tunnel reached the upstream");
    assert_eq!(unpaced_tunnels(&pg).await, 0);
}

/// GET https://api.test/x through `pg`, trusting only `ca_pem`.
async fn get_trusting(pg: &Pacegate, ca_pem: &str) -> reqwest::Result<reqwest::Response> {
    https_client(pg, Some(ca_pem)).get("https://api.test/x").send().await
}

#[tokio::test]
async fn a_reload_intercepts_with_a_changed_ca_and_refuses_an_unusable_one() {
    let (ca_dir, first_pem) = new_ca();
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = mitm_config(ca_dir.path(), &mock.url(), "rate = \"100/s\"");
    let pg = Pacegate::start_config(&config).await;
    assert_eq!(get_trusting(&pg, &first_pem).await.expect("the first CA").status(), 200);

    // The CA files deleted, then a reload of the same config: a new CA is
    // created there, and new tunnels get certificates from it at once.
    std::fs::remove_file(ca_dir.path().join("ca.pem")).unwrap();
    std::fs::remove_file(ca_dir.path().join("ca-key.pem")).unwrap();
    pg.reload_with(&config).await;
    let created_pem = std::fs::read_to_string(ca_dir.path().join("ca.pem")).expect("a new ca.pem");
    assert_ne!(created_pem, first_pem);
    let response = get_trusting(&pg, &created_pem).await;
    assert_eq!(response.expect("a client trusting only the new CA").status(), 200);
    assert!(get_trusting(&pg, &first_pem).await.is_err(), "the old CA still signs");

    // [mitm] pointed at another CA.
    let (other_dir, other_pem) = new_ca();
    pg.reload_with(&mitm_config(other_dir.path(), &mock.url(), "rate = \"100/s\"")).await;
    assert_eq!(get_trusting(&pg, &other_pem).await.expect("the other CA").status(), 200);
    assert!(get_trusting(&pg, &created_pem).await.is_err(), "the replaced CA still signs");

    // A CA that cannot be loaded: the reload is refused, saying why, and
    // the running CA stays.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("ca.pem"), "not a certificate").unwrap();
    std::fs::write(broken.path().join("ca-key.pem"), "not a key").unwrap();
    std::fs::write(&pg.config_path, mitm_config(broken.path(), &mock.url(), "rate = \"100/s\"")).unwrap();
    let reload = support::client().post(pg.admin_url("/reload")).send().await.expect("POST /reload");
    assert_eq!(reload.status(), 400);
    let error = reload.text().await.unwrap();
    assert!(error.contains("ca-key.pem") && error.contains("[mitm]"), "{error}");
    assert_eq!(get_trusting(&pg, &other_pem).await.expect("the running CA, kept").status(), 200);
}

#[tokio::test]
async fn a_ca_that_cannot_be_written_leaves_interception_off() {
    let echo = echo_server().await;
    // A file where the CA's directory should be: not writable, even as root.
    let blocker = tempfile::NamedTempFile::new().expect("temp file");
    let config = format!(
        "[mitm]\nca_cert = \"{0}/ca.pem\"\nca_key = \"{0}/ca-key.pem\"\n\n\
         [[upstream]]\nname = \"api\"\nbase_url = \"http://{echo}\"\nrate = \"10/s\"\n",
        blocker.path().display()
    );
    let pg = Pacegate::start(&config).await;
    assert_tunnel_reaches(&pg, echo).await;
    assert_eq!(unpaced_tunnels(&pg).await, 1, "a plain tunnel, counted as unpaced");
}

/// An upstream claims a host and a port: a plain tunnel cannot reach the
/// admin listener, or any other port, of an upstream's host. A CONNECT to
/// another port of it is the upstream's (plain HTTP inside goes to its
/// base_url, as in forward mode), but anything else inside is closed.
#[tokio::test]
async fn a_plain_tunnel_is_only_for_the_port_its_upstream_claims() {
    let echo = echo_server().await;
    // `hosts` left at its default: the upstream claims 127.0.0.1, at its base_url's port.
    let config =
        format!("{NO_MITM}[[upstream]]\nname = \"api\"\nbase_url = \"http://{echo}\"\nrate = \"10/s\"\n");
    let pg = Pacegate::start(&config).await;
    assert_tunnel_reaches(&pg, echo).await;
    for other in [pg.admin, pg.proxy] {
        let (mut stream, head) = connect(pg.proxy, &format!("127.0.0.1:{}", other.port()), "").await;
        assert!(head.starts_with("http/1.1 200"), "CONNECT to port {}: {head}", other.port());
        stream.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.expect("closed in time");
        assert!(read.is_err() || rest.is_empty(), "port {}: nothing comes back: {rest:?}", other.port());
    }
    assert_eq!(unpaced_tunnels(&pg).await, 1, "only the tunnel to the claimed port was relayed");
}

/// A CONNECT to a configured upstream that cannot be reached is 502 naming
/// the upstream, as a request to it would be.
#[tokio::test]
async fn a_connect_to_an_unreachable_upstream_names_it() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let config =
        format!("{NO_MITM}[[upstream]]\nname = \"down\"\nbase_url = \"http://{closed}\"\nrate = \"10/s\"\n");
    let pg = Pacegate::start(&config).await;
    let (mut stream, head) = connect(pg.proxy, &closed.to_string(), "").await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("x-pacegate-error: upstream_unreachable"), "{head}");
    let mut body = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut body)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(r#""upstream":"down""#), "{body}");
}

#[tokio::test]
async fn connect_to_unknown_host_is_refused_by_default() {
    let echo = echo_server().await;
    let pg = Pacegate::start("").await;
    let (_stream, head) = connect(pg.proxy, &echo.to_string(), "").await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-pacegate-error: unknown_host"), "{head}");
}

#[tokio::test]
async fn private_addresses_are_refused_for_pass_through() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let port = mock.addr().port();
    let pg = Pacegate::start("[forward]\nunknown_hosts = \"pass\"\nallow_private = false\n").await;
    // Loopback in every spelling is refused before any connection is
    // attempted (the other guarded ranges: `upstream::guard`'s unit test).
    let targets = [
        format!("127.0.0.1:{port}"),
        format!("127.1:{port}"),
        format!("2130706433:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("localhost:{port}"),
    ];
    for target in &targets {
        let (_stream, head) = connect(pg.proxy, target, "").await;
        assert!(head.starts_with("http/1.1 403"), "CONNECT {target}: {head}");
        assert!(head.contains("x-pacegate-error: forbidden_address"), "CONNECT {target}: {head}");
    }
    let client = pg.forward_client();
    for target in &targets {
        let response = client.get(format!("http://{target}/latest")).timeout(WAIT).send().await.unwrap();
        assert_eq!(response.status(), 403, "GET http://{target}/");
        assert_eq!(response.headers()["x-pacegate-error"], "forbidden_address", "GET http://{target}/");
    }
    assert_eq!(mock.count(), 0);
}

#[tokio::test]
async fn proxy_auth_is_required_everywhere() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let echo = echo_server().await;
    let config = format!(
        "{TEST_SERVER}proxy_auth = [\"alice:s3cret\"]\n[forward]\nunknown_hosts = \"pass\"\nallow_private = true\n\n{}",
        support::upstream("api", &mock.url(), "rate = \"100/s\"")
    );
    let pg = Pacegate::start_config(&config).await;
    let plain = support::client();

    // Reverse mode: missing and wrong credentials, then right ones.
    let response = plain.get(pg.url("/api/x")).send().await.unwrap();
    assert_eq!(response.status(), 407);
    assert_eq!(response.headers()["x-pacegate-error"], "proxy_auth_required");
    assert_eq!(response.headers()["proxy-authenticate"], "Basic realm=\"pacegate\"");
    // base64("alice:wrong") and base64("alice:s3cret")
    let wrong = "Basic YWxpY2U6d3Jvbmc=";
    let right = "Basic YWxpY2U6czNjcmV0";
    let response = plain.get(pg.url("/api/x")).header("proxy-authorization", wrong).send().await.unwrap();
    assert_eq!(response.status(), 407);
    let response = plain.get(pg.url("/api/x")).header("proxy-authorization", right).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.count(), 1);
    assert!(mock.arrivals()[0].headers.get("proxy-authorization").is_none(), "credentials forwarded");

    // Forward mode through reqwest's proxy credentials.
    let forward = |proxy: reqwest::Proxy| builder().proxy(proxy).timeout(WAIT).build().unwrap();
    let anonymous = forward(reqwest::Proxy::http(pg.url("")).unwrap());
    let response = anonymous.get(format!("{}/y", mock.url())).send().await.unwrap();
    assert_eq!(response.status(), 407);
    let authed = forward(reqwest::Proxy::http(pg.url("")).unwrap().basic_auth("alice", "s3cret"));
    let response = authed.get(format!("{}/y", mock.url())).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(mock.arrivals().iter().all(|a| a.headers.get("proxy-authorization").is_none()));

    // CONNECT.
    let (_stream, head) = connect(pg.proxy, &echo.to_string(), "").await;
    assert!(head.starts_with("http/1.1 407"), "{head}");
    assert!(head.contains("proxy-authenticate: basic realm=\"pacegate\""), "{head}");
    let (_stream, head) =
        connect(pg.proxy, &echo.to_string(), &format!("Proxy-Authorization: {wrong}\r\n")).await;
    assert!(head.starts_with("http/1.1 407"), "{head}");
    let (mut stream, head) =
        connect(pg.proxy, &echo.to_string(), &format!("Proxy-Authorization: {right}\r\n")).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    stream.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ok");
}

/// A tunnel keeps the credentials of its CONNECT, and its requests must
/// still pass `proxy_auth` as a reload leaves it: one opened before a
/// reload that sets it is answered 407 at its next request and closed
/// (the client then opens a new one and is asked), one whose CONNECT
/// carried the credentials now required goes on.
#[tokio::test]
async fn a_tunnel_opened_before_proxy_auth_was_set_must_pass_it() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let authority = mock.addr().to_string();
    // No `hosts`: the upstream claims its base_url's host, 127.0.0.1.
    let upstream = format!("[[upstream]]\nname = \"api\"\nbase_url = \"{}\"\nrate = \"100/s\"\n", mock.url());
    let pg = Pacegate::start_config(&format!("{TEST_SERVER}\n{upstream}")).await;
    let right = "Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"; // alice:s3cret
    let (mut anonymous, head) = connect(pg.proxy, &authority, "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (authed, head) = connect(pg.proxy, &authority, right).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (h2, head) = connect(pg.proxy, &authority, "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");

    pg.reload_with(&format!("{TEST_SERVER}proxy_auth = [\"alice:s3cret\"]\n\n{upstream}")).await;
    // Kept alive by the client: closed by pacegate after its answer.
    let request = format!("GET /after HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    anonymous.write_all(request.as_bytes()).await.unwrap();
    // HTTP/2 has no `Connection: close`: the tunnel says GOAWAY and ends.
    let io = hyper_util::rt::TokioIo::new(h2);
    let handshake = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io);
    let (mut sender, connection) = handshake.await.expect("HTTP/2 inside the tunnel");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{authority}/h2")).body(String::new()).unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), 407);
    assert_eq!(response.headers()["x-pacegate-error"], "proxy_auth_required");
    let ended = tokio::time::timeout(WAIT, connection).await;
    assert!(ended.is_ok(), "the HTTP/2 tunnel stayed open after its 407");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, anonymous.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(read.is_ok(), "the tunnel stayed open after: {answer}");
    assert!(answer.starts_with("http/1.1 407"), "{answer}");
    assert!(answer.contains("x-pacegate-error: proxy_auth_required\r\n"), "{answer}");
    assert_eq!(mock.count(), 0, "a request went out");
    let answer = plain_request(authed, "/authed", &authority).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert_eq!(mock.count(), 1);
    assert!(mock.arrivals()[0].headers.get("proxy-authorization").is_none(), "credentials forwarded");
}

/// A TLS acceptor for `localhost`, its certificate signed by the CA in
/// `ca_dir` (not a public root), offering one ALPN protocol.
fn localhost_acceptor(ca_dir: &Path, alpn: &[u8]) -> tokio_rustls::TlsAcceptor {
    let mitm = pacegate::config::Mitm {
        enabled: true,
        ca_cert: ca_dir.join("ca.pem"),
        ca_key: ca_dir.join("ca-key.pem"),
        written_at: Default::default(),
    };
    let interceptor = pacegate::tls::Interceptor::load(&mitm).unwrap();
    let mut config = (*interceptor.server_config("localhost").unwrap()).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A one-answer-per-connection HTTPS server on loopback whose certificate for
/// `localhost` is signed by the CA in `ca_dir` (not a public root).
async fn private_tls_server(ca_dir: &Path) -> SocketAddr {
    let acceptor = localhost_acceptor(ca_dir, b"http/1.1");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                let _ = tls.write_all(answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn ca_file_is_trusted_for_its_upstream_only() {
    let (ca_dir, _pem) = new_ca();
    let server = private_tls_server(ca_dir.path()).await;
    let base = format!("https://localhost:{}", server.port());
    let ca_file = ca_dir.path().join("ca.pem");
    let config = format!(
        "{}{}",
        support::upstream(
            "private",
            &base,
            &format!("rate = \"100/s\"\nca_file = \"{}\"", ca_file.display())
        ),
        support::upstream("public", &base, "rate = \"100/s\"\n[upstream.retry]\nmax_attempts = 1"),
    );
    let pg = Pacegate::start(&config).await;
    let client = support::client();
    let response = client.get(pg.url("/private/x")).timeout(WAIT).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    // The same server is not trusted for an upstream without that ca_file.
    let response = client.get(pg.url("/public/x")).timeout(WAIT).send().await.unwrap();
    assert_eq!(response.status(), 502);
}

/// An h2 server for `localhost` signed by the CA in `ca_dir`: answers each
/// request with its version, its `:authority` and its `host` header, and
/// counts the connections it accepted.
async fn private_h2_server(ca_dir: &Path) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let acceptor = localhost_acceptor(ca_dir, b"h2");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let text = format!(
                        "{:?} {} {:?}",
                        request.version(),
                        request.uri().authority().map_or("-", |a| a.as_str()),
                        request.headers().get("host"),
                    );
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(text),
                    )))
                });
                let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    (addr, connections)
}

/// An https upstream that offers h2: its requests share one connection,
/// carry the authority in `:authority` and get no `Host` header.
#[tokio::test]
async fn h2_upstreams_share_one_connection_without_host() {
    let (ca_dir, _pem) = new_ca();
    let (server, connections) = private_h2_server(ca_dir.path()).await;
    let ca_file = ca_dir.path().join("ca.pem");
    let config = support::upstream(
        "h2",
        &format!("https://localhost:{}", server.port()),
        &format!("rate = \"1000/s\"\nca_file = \"{}\"", ca_file.display()),
    );
    // One worker, one pool: every request below uses the same one.
    let pg =
        Pacegate::start_config(&format!("{}\n{config}", TEST_SERVER.replace("workers = 2", "workers = 1")))
            .await;
    let client = support::client();
    // One request opens the connection; the next ones, some at once, share it.
    let first = client.get(pg.url("/h2/x")).timeout(WAIT).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let expected = format!("HTTP/2.0 localhost:{} None", server.port());
    assert_eq!(first.text().await.unwrap(), expected);
    let answers = futures_util::future::join_all(
        (0..8)
            .map(|_| async { client.get(pg.url("/h2/y")).timeout(WAIT).send().await.unwrap().text().await }),
    )
    .await;
    for answer in answers {
        assert_eq!(answer.unwrap(), expected);
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one shared h2 connection");
}

/// Runs the pacegate binary with `args`; bounded.
fn run_binary(args: &[&str]) -> std::process::Output {
    support::process::run(Path::new(env!("CARGO_MANIFEST_DIR")), args, None)
}

#[test]
fn ca_init_writes_a_private_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    let out_arg = out.to_str().unwrap();
    let first = run_binary(&["ca", "init", "--out", out_arg]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stdout = String::from_utf8_lossy(&first.stdout);
    for hint in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "--cacert"] {
        assert!(stdout.contains(hint), "missing {hint} in: {stdout}");
    }
    let key = out.join("ca-key.pem");
    let cert = out.join("ca.pem");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let (key_before, cert_before) = (std::fs::read(&key).unwrap(), std::fs::read(&cert).unwrap());
    assert!(String::from_utf8_lossy(&cert_before).contains("BEGIN CERTIFICATE"));

    let second = run_binary(&["ca", "init", "--out", out_arg]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&key).unwrap(), key_before);
    assert_eq!(std::fs::read(&cert).unwrap(), cert_before);

    // Only the key left: still refused, nothing written.
    std::fs::remove_file(&cert).unwrap();
    assert!(!run_binary(&["ca", "init", "--out", out_arg]).status.success());
    assert!(!cert.exists());
}

#[test]
fn mitm_with_half_a_ca_is_a_startup_and_check_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pacegate.toml");
    // The key's path is written on the config's last line.
    let text = format!("{TEST_SERVER}\n[mitm]\nenabled = true\nca_key = \"ca-key.pem\"\n");
    let key_line = text.lines().count();
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    // Neither file: a start creates them, so the check passes and says so.
    let check = run_binary(&["check", "--config", config]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stderr).contains("creates"));

    // Only the certificate: neither a start nor the check can use it.
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    for args in [vec!["--config", config], vec!["check", "--config", config]] {
        let output = run_binary(&args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("pacegate ca init") && stderr.contains("ca-key.pem"), "{args:?}: {stderr}");
        // Pointed at where the config names the missing key.
        assert!(stderr.contains(&format!("pacegate.toml:{key_line}:10: [mitm]")), "{args:?}: {stderr}");
    }
}
