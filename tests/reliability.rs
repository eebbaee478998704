//! Reliability: pacegate attacked by hostile callers and broken
//! upstreams. Each test drives a real pacegate (or, for panics, the server
//! module) on loopback; raw TCP clients send what reqwest cannot. Every wait
//! is bounded, and each test fails if the protection it names is removed.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use pacegate::body::ProxyBody;
use pacegate::metrics::Metrics;
use pacegate::server::{self, ConnectionSettings};
use support::mock::{Behaviour, MockUpstream, Scripted};
use support::{
    Pacegate, assert_error_parts, assert_pacegate_error, attempts_of, builder, client, echo_server,
    queue_depth, upstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Bound on every wait that is not itself the point of a test.
const WAIT: Duration = Duration::from_secs(10);
/// How long "not answered" is watched for before the thing that unblocks it.
const NOT_YET: Duration = Duration::from_millis(300);

/// `[server]` on ephemeral ports, two worker threads, with `extra` keys.
fn server(extra: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\n{extra}\n")
}

/// The upstream `api` at `base_url`, reverse route `/api`, with `extra` keys.
fn api(base_url: &str, extra: &str) -> String {
    upstream("api", base_url, &format!("rate = \"1000/s\"\n{extra}"))
}

/// The upstream `api` at `base_url`, also claiming `host` in forward mode.
fn api_for(base_url: &str, host: &str) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nbase_url = \"{base_url}\"\nroute = \"/api\"\nhosts = [\"{host}\"]\nrate = \"1000/s\"\n"
    )
}

/// `[upstream.retry]` with short delays.
fn fast_retry(max_attempts: u32) -> String {
    format!("[upstream.retry]\nmax_attempts = {max_attempts}\nbase_delay = \"10ms\"\nmax_delay = \"50ms\"\n")
}

// === raw clients ===

async fn open(pg: &Pacegate) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(pg.proxy)).await.expect("connect in time").expect("connect")
}

/// Reads until the peer closes the connection (a reset counts as closed);
/// fails the test if that takes longer than `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            all.extend_from_slice(&buf[..n]);
        }
    };
    assert!(
        tokio::time::timeout(within, read).await.is_ok(),
        "the connection was not closed within {within:?}"
    );
    all
}

/// Sends `bytes` on a new connection; returns everything the proxy sent
/// until it closed the connection.
async fn send_raw(pg: &Pacegate, bytes: &[u8]) -> Vec<u8> {
    let mut stream = open(pg).await;
    stream.write_all(bytes).await.expect("send");
    read_until_closed(&mut stream, WAIT).await
}

/// One HTTP/1.1 answer read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Whether the whole body announced by `Content-Length` is there.
    complete: bool,
}

impl Raw {
    /// Asserts the documented error answer (no upstream named).
    fn assert_error(&self, status: u16, code: &str) {
        assert_error_parts(self.status, &self.headers, &self.body, status, code, None);
    }
}

/// The answers in `bytes`, in order, framed by `Content-Length`.
fn answers(mut bytes: &[u8]) -> Vec<Raw> {
    let mut found = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = response.parse(bytes) else { return found };
        let mut map = HeaderMap::new();
        for header in response.headers.iter() {
            let name = HeaderName::from_bytes(header.name.as_bytes()).expect("header name");
            map.append(name, HeaderValue::from_bytes(header.value).expect("header value"));
        }
        let length: usize = map.get("content-length").map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let end = (head + length).min(bytes.len());
        let body = bytes[head..end].to_vec();
        let complete = body.len() == length;
        found.push(Raw { status: response.code.expect("status"), headers: map, body, complete });
        bytes = &bytes[end..];
    }
}

/// Reads exactly one answer (framed by `Content-Length`) from a kept-alive connection.
async fn read_answer(stream: &mut TcpStream) -> Raw {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await.expect("read an answer");
            assert!(n > 0, "closed before a whole answer: {:?}", String::from_utf8_lossy(&bytes));
            bytes.extend_from_slice(&buf[..n]);
            if let Some(answer) = answers(&bytes).pop().filter(|a| a.complete) {
                return answer;
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("an answer in time")
}

/// A GET of `path` on a kept-alive connection.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: pacegate\r\n\r\n").into_bytes()
}

/// pacegate with `server_keys`: `api` in front of a mock (reverse mode at
/// `/api`), and `echo`, a TCP echo server it claims as `host:port`, with
/// interception off. What a CONNECT to it carries is not HTTP (which
/// pacegate would serve itself), so it is a plain tunnel.
async fn tunnel_setup(server_keys: &str) -> (MockUpstream, SocketAddr, Pacegate) {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let echo = echo_server().await;
    let echo_upstream = format!(
        "[[upstream]]\nname = \"echo\"\nbase_url = \"http://{echo}\"\nhosts = [\"{echo}\"]\nrate = \"1000/s\"\n"
    );
    let config =
        format!("{}[mitm]\nenabled = false\n{}{echo_upstream}", server(server_keys), api(&mock.url(), ""));
    let pg = Pacegate::start_config(&config).await;
    (mock, echo, pg)
}

/// A CONNECT tunnel to `echo` through `pg`, checked with one round trip of
/// bytes that are neither TLS nor HTTP.
async fn open_tunnel(pg: &Pacegate, echo: SocketAddr) -> TcpStream {
    const OPAQUE: &[u8] = b"\x00\x01ping";
    let mut tunnel = open(pg).await;
    let connect = format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n");
    tunnel.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut tunnel).await.status, 200);
    tunnel.write_all(OPAQUE).await.unwrap();
    let mut back = [0u8; OPAQUE.len()];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back)).await.expect("echoed in time").unwrap();
    assert_eq!(back, OPAQUE, "the tunnel reaches the echo server");
    tunnel
}

/// Whether the proxy answers nothing on `stream` for [`NOT_YET`].
async fn silent(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(NOT_YET, stream.read(&mut byte)).await.is_err()
}

// === client side: hostile heads ===

/// Every malformed head gets the documented answer (hyper alone answers a bare
/// status, or follows the request) and closes its connection, and nothing
/// reaches the upstream: not the request sent after it either.
#[tokio::test]
async fn malformed_heads_get_spec_answers() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!("{}{}", server("max_header_bytes = 2048"), api_for(&mock.url(), "api.test"));
    let pg = Pacegate::start_config(&config).await;
    let huge = "a".repeat(16 * 1024);
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let cases: Vec<(String, u16, &str)> = vec![
        // Far over the limit: more than hyper's own buffer would take.
        (format!("GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: {huge}\r\n\r\n"), 431, "headers_too_large"),
        (format!("GET /api/{huge} HTTP/1.1\r\nHost: a\r\n\r\n"), 414, "uri_too_long"),
        (format!("GET /api/x HTTP/1.1\r\nHost: a\r\n{many}\r\n"), 431, "headers_too_large"),
        ("GET /api/x HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n".into(), 400, "bad_request"),
        ("GET /api/x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n".into(), 400, "bad_request"),
        ("GET /api/x HTTP/1.1\r\n\r\n".into(), 400, "bad_request"),
        (
            "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".into(),
            400,
            "bad_request",
        ),
        ("POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 400, "bad_request"),
        ("GET ftp://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("GET http://user:pw@api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("GET http://api.test:0/x HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("GET http://[::1/x HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("CONNECT api.test HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("CONNECT http://api.test:443/ HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("CONNECT user@api.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        ("CONNECT api.test:99999 HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
        // Dot segments would climb out of base_url's path: refused, not resolved.
        ("GET /api/../admin HTTP/1.1\r\nHost: a\r\n\r\n".into(), 400, "bad_request"),
        ("GET /api/%2e%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n".into(), 400, "bad_request"),
        ("GET /api/..%2fadmin/users HTTP/1.1\r\nHost: a\r\n\r\n".into(), 400, "bad_request"),
        (
            "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(),
            501,
            "not_implemented",
        ),
        ("GET http://api.test/x/./y HTTP/1.1\r\nHost: api.test\r\n\r\n".into(), 400, "bad_request"),
    ];
    for (request, status, code) in &cases {
        println!("{:?}", &request[..request.len().min(60)]);
        let got = send_raw(&pg, &[request.as_bytes(), &get("/api/next")].concat()).await;
        let found = answers(&got);
        assert_eq!(
            found.len(),
            1,
            "one answer, then the connection closes: {:?}",
            String::from_utf8_lossy(&got)
        );
        found[0].assert_error(*status, code);
    }
    assert_eq!(mock.count(), 0, "a malformed request reached the upstream");
}

/// `Content-Length` with `Transfer-Encoding` is refused: the request before
/// it is answered, the request hidden after it never reaches the upstream.
#[tokio::test]
async fn request_smuggling_is_refused() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&api(&mock.url(), "")).await;
    let stream = [
        get("/api/first"),
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
            .to_vec(),
    ]
    .concat();
    let found = answers(&send_raw(&pg, &stream).await);
    assert_eq!(found.len(), 2, "one answer per request: {found:?}");
    assert_eq!(found[0].status, 200);
    found[1].assert_error(400, "bad_request");
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert_eq!(paths, ["/first"]);
}

/// A bare LF after the last chunk starts a trailer line for hyper, so the
/// "head" it seems to start is part of the trailers, and the bytes after them
/// are the next head: checked, and this one refused (two `Host`s). Read the
/// other way, the trailer's `Content-Length` would hide that head from the
/// check while hyper served it.
#[tokio::test]
async fn a_bare_lf_after_the_last_chunk_hides_no_head() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&api(&mock.url(), "")).await;
    let smuggled: &[u8] = b"GET /api/smuggled HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
    let cover =
        format!("\nPOST /api/cover HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", smuggled.len());
    let stream = [
        b"POST /api/first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            .as_slice(),
        cover.as_bytes(),
        smuggled,
    ]
    .concat();
    let got = send_raw(&pg, &stream).await;
    let found = answers(&got);
    assert_eq!(found.len(), 2, "one answer per request: {:?}", String::from_utf8_lossy(&got));
    found[1].assert_error(400, "bad_request");
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert!(paths.iter().all(|p| p == "/first"), "{paths:?}");
}

/// A chunk-size line longer than 4 096 bytes cannot be followed, so what
/// comes after it could not be checked: the request is answered 400 and its
/// connection closed, nothing reaches the upstream, and the smuggling head
/// hidden after it is never served.
#[tokio::test]
async fn chunked_bodies_that_cannot_be_followed_are_refused() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&api(&mock.url(), "")).await;
    let request = [
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;".as_slice(),
        &[b'e'; 5000],
        b"\r\nhello\r\n0\r\n\r\n",
        b"POST /api/smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    .concat();
    let got = send_raw(&pg, &request).await;
    let found = answers(&got);
    assert_eq!(found.len(), 1, "{:?}", String::from_utf8_lossy(&got));
    found[0].assert_error(400, "bad_request");
    assert_eq!(mock.count(), 0, "a request reached the upstream");

    // A body too large to buffer is already streaming upstream when the
    // line comes: its attempt is cut, and the caller hears why.
    let config = format!("{}{}", server("max_body_bytes = 1024"), api(&mock.url(), ""));
    let pg = Pacegate::start_config(&config).await;
    let streamed = [
        b"PUT /api/large HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n".as_slice(),
        &[b'x'; 0x800],
        b"\r\n5;",
        &[b'e'; 5000],
        b"\r\nhello\r\n0\r\n\r\n",
    ]
    .concat();
    let got = send_raw(&pg, &streamed).await;
    let found = answers(&got);
    assert_eq!(found.len(), 1, "{:?}", String::from_utf8_lossy(&got));
    found[0].assert_error(400, "bad_request");
    assert!(mock.arrivals().iter().all(|a| a.body_len <= 0x800), "bytes after the line went upstream");
}

// === client side: slow, idle and too many connections ===

/// Connections that send their head too slowly are closed at
/// `header_read_timeout`, trickling or not, new or kept alive (where the
/// head starts after an answer, not at the connection's start), while others
/// are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_without_slowing_others() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!("{}{}", server("header_read_timeout = \"300ms\""), api(&mock.url(), ""));
    let pg = Pacegate::start_config(&config).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..10 {
        let mut stream = open(&pg).await;
        if i >= 5 {
            stream.write_all(&get("/api/first")).await.unwrap();
            assert_eq!(read_answer(&mut stream).await.status, 200);
        }
        stream.write_all(b"GET /api/slow HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        slow.push(tokio::spawn(async move {
            if i % 2 == 0 {
                // Trickles a byte every 50 ms: activity alone does not keep it open.
                for _ in 0..200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if stream.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
            read_until_closed(&mut stream, WAIT).await;
            started.elapsed()
        }));
    }
    let http = client();
    for _ in 0..5 {
        let sent = Instant::now();
        let response = http.get(pg.url("/api/fast")).timeout(WAIT).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(sent.elapsed() < Duration::from_secs(1), "a normal request took {:?}", sent.elapsed());
    }
    for task in slow {
        let closed_after = task.await.unwrap();
        assert!(closed_after >= Duration::from_millis(250), "closed early: {closed_after:?}");
        assert!(closed_after < Duration::from_secs(3), "closed late: {closed_after:?}");
    }
    assert_eq!(mock.count(), 10, "only the complete requests reached the upstream");
}

/// A kept-alive connection stays open while requests keep coming (even
/// further apart than the header timeout), survives a stream longer than
/// the idle timeout, and closes once idle for `idle_timeout`.
#[tokio::test]
async fn idle_keep_alive_connections_close_after_idle_timeout() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let keys = "idle_timeout = \"500ms\"\nheader_read_timeout = \"200ms\"";
    let pg = Pacegate::start_config(&format!("{}{}", server(keys), api(&mock.url(), ""))).await;
    let mut stream = open(&pg).await;
    for i in 0..3 {
        stream.write_all(&get(&format!("/api/again{i}"))).await.unwrap();
        assert_eq!(read_answer(&mut stream).await.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Four events 250 ms apart: the answer outlasts the idle timeout.
    stream.write_all(&get("/api/sse?n=4&interval_ms=250")).await.unwrap();
    let mut events = Vec::new();
    let idle_since = loop {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("events in time").unwrap();
        assert!(n > 0, "closed during the stream: {:?}", String::from_utf8_lossy(&events));
        events.extend_from_slice(&buf[..n]);
        if events.windows(7).any(|w| w == b"data: 3") {
            break Instant::now();
        }
    };
    read_until_closed(&mut stream, WAIT).await;
    let idle = idle_since.elapsed();
    assert!(idle >= Duration::from_millis(400), "closed before the idle timeout: {idle:?}");
    assert!(idle < Duration::from_secs(3), "idle connection closed late: {idle:?}");
    assert_eq!(mock.count(), 4);
}

/// With `max_connections = 1`, a second connection waits in the backlog
/// until the first closes, and so does one behind an open CONNECT tunnel.
#[tokio::test]
async fn max_connections_caps_connections_and_tunnels() {
    let (_mock, echo, pg) = tunnel_setup("max_connections = 1").await;

    let mut first = open(&pg).await;
    first.write_all(&get("/api/a")).await.unwrap();
    assert_eq!(read_answer(&mut first).await.status, 200);
    let mut second = open(&pg).await;
    second.write_all(&get("/api/b")).await.unwrap();
    assert!(silent(&mut second).await, "a second connection was served beyond max_connections");
    drop(first);
    assert_eq!(read_answer(&mut second).await.status, 200);
    drop(second);

    let tunnel = open_tunnel(&pg, echo).await;
    let mut behind = open(&pg).await;
    behind.write_all(&get("/api/c")).await.unwrap();
    assert!(silent(&mut behind).await, "an open tunnel did not count against max_connections");
    drop(tunnel);
    assert_eq!(read_answer(&mut behind).await.status, 200);
}

/// `max_connections` bounds the listener, not each worker thread: with
/// connections spread over two workers, two are served at a time, and each
/// waiting one is served as soon as a slot frees up, on whichever worker.
#[tokio::test]
async fn max_connections_is_shared_by_the_worker_threads() {
    const CONNECTIONS: usize = 8;
    const SLOTS: usize = 2;
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!("{}{}", server("max_connections = 2"), api(&mock.url(), ""));
    let pg = Pacegate::start_config(&config).await;
    // Each connection reports its answer, then stays open until released.
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut releases = Vec::new();
    for index in 0..CONNECTIONS {
        let mut connection = open(&pg).await;
        connection.write_all(&get(&format!("/api/{index}"))).await.unwrap();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        releases.push(Some(release));
        let answered = answered.clone();
        tokio::spawn(async move {
            let answer = read_answer(&mut connection).await;
            let _ = answered.send((index, answer.status));
            let _ = released.await;
        });
    }
    for round in 0..CONNECTIONS / SLOTS {
        let mut served = Vec::new();
        for _ in 0..SLOTS {
            let (index, status) =
                tokio::time::timeout(WAIT, answers.recv()).await.expect("an answer").unwrap();
            assert_eq!(status, 200);
            served.push(index);
        }
        if round + 1 < CONNECTIONS / SLOTS {
            let extra = tokio::time::timeout(NOT_YET, answers.recv()).await;
            assert!(extra.is_err(), "round {round}: more than {SLOTS} connections served at once: {extra:?}");
        }
        for index in served {
            releases[index].take().expect("released once");
        }
    }
    assert_eq!(mock.count(), CONNECTIONS);
}

/// A CONNECT tunnel with no byte either way for `idle_timeout` is closed.
#[tokio::test]
async fn idle_tunnels_are_closed() {
    let (_mock, echo, pg) = tunnel_setup("idle_timeout = \"300ms\"").await;
    let mut tunnel = open_tunnel(&pg, echo).await;
    let quiet_since = Instant::now();
    read_until_closed(&mut tunnel, WAIT).await;
    let quiet = quiet_since.elapsed();
    assert!(quiet >= Duration::from_millis(250) && quiet < Duration::from_secs(3), "closed after {quiet:?}");
}

// === client side: callers that go away ===

/// A caller that disconnects mid-upload frees what it held: a buffered body
/// never queues, a streamed one gives its concurrency slot back.
#[tokio::test]
async fn disconnect_mid_upload_frees_everything() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "{}{}",
        server("max_body_bytes = 1024"),
        upstream("api", &mock.url(), "rate = \"100/s\"\nmax_concurrency = 1")
    );
    let pg = Pacegate::start_config(&config).await;

    // Small body (buffered): the caller leaves before it is complete.
    let mut small = open(&pg).await;
    small
        .write_all(b"POST /api/small HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n0123456789")
        .await
        .unwrap();
    // Large body (streamed once): it reaches the upstream, then the caller leaves.
    let mut large = open(&pg).await;
    large.write_all(b"POST /api/large HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    large.write_all(&[b'x'; 4096]).await.unwrap();
    assert!(mock.wait_for_arrivals(1, WAIT).await, "the streamed upload never reached the upstream");
    assert!(
        pg.wait_status(WAIT, |s| s["upstreams"][0]["inflight"]["now"] == 1).await,
        "the streamed upload is not in flight"
    );
    drop(small);
    drop(large);

    assert!(
        pg.wait_status(WAIT, |s| s["upstreams"][0]["inflight"]["now"] == 0
            && queue_depth(s, "api") == Some(0))
            .await,
        "the upload's slot or queue place was not freed"
    );
    // max_concurrency = 1: this is only answered if the slot came back.
    let next = client().get(pg.url("/api/next")).timeout(Duration::from_secs(5)).send().await.unwrap();
    assert_eq!(next.status(), 200);
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert_eq!(paths, ["/large", "/next"], "the cut buffered upload reached the upstream");
}

/// A caller that stops sending its body for `body_read_timeout` loses its
/// request: a buffered body is answered 408 `body_timeout` and never
/// reaches the upstream, a streamed one is cut there and answered 408 too;
/// each connection closes and its slots come back (`max_connections = 2`,
/// `max_concurrency = 1`), and both are counted.
#[tokio::test]
async fn stalled_request_bodies_lose_their_request() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "{}{}",
        server("body_read_timeout = \"500ms\"\nmax_body_bytes = 1024\nmax_connections = 2"),
        upstream("api", &mock.url(), "rate = \"100/s\"\nmax_concurrency = 1")
    );
    let pg = Pacegate::start_config(&config).await;

    let mut small = open(&pg).await;
    small
        .write_all(b"POST /api/small HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut large = open(&pg).await;
    large.write_all(b"PUT /api/large HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    large.write_all(&[b'x'; 4096]).await.unwrap();
    for stalled in [&mut small, &mut large] {
        let got = read_until_closed(stalled, WAIT).await;
        let found = answers(&got);
        assert_eq!(found.len(), 1, "{:?}", String::from_utf8_lossy(&got));
        assert_error_parts(
            found[0].status,
            &found[0].headers,
            &found[0].body,
            408,
            "body_timeout",
            Some("api"),
        );
    }
    // Both connection slots and the concurrency slot are free again.
    let next = client().get(pg.url("/api/next")).timeout(WAIT).send().await.unwrap();
    assert_eq!(next.status(), 200);
    let paths: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert_eq!(paths, ["/large", "/next"], "the stalled buffered body reached the upstream");
    let counted = pg.metric("pacegate_client_timeouts_total{timeout=\"body_read\"}").await;
    assert_eq!(counted, Some(2.0));
}

/// A caller that takes nothing of its answer for `send_timeout` loses its
/// connection and the request's concurrency slot (`max_concurrency = 1`),
/// and it is counted; an answer that waits for its upstream is not cut.
#[tokio::test]
async fn callers_that_read_nothing_lose_their_answer() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let config = format!(
        "{}{}",
        server("send_timeout = \"500ms\""),
        upstream("api", &mock.url(), "rate = \"100/s\"\nmax_concurrency = 1\nqueue_timeout = \"20s\"")
    );
    let pg = Pacegate::start_config(&config).await;
    // An event stream quieter than the send timeout is not cut.
    let events = client().get(pg.url("/api/sse?n=3&interval_ms=400")).timeout(WAIT).send().await.unwrap();
    assert_eq!(events.text().await.unwrap().matches("data:").count(), 3);

    // 256 MB cannot sit in socket buffers: the proxy soon cannot write.
    let mut reader = open(&pg).await;
    reader.write_all(&get("/api/bytes?n=268435456")).await.unwrap();
    assert!(mock.wait_for_arrivals(2, WAIT).await);
    let started = Instant::now();
    let next = client().get(pg.url("/api/next")).timeout(WAIT).send().await.unwrap();
    assert_eq!(next.status(), 200, "the stalled reader's slot never came back");
    assert!(started.elapsed() >= Duration::from_millis(400), "served before the send timeout");
    let got = read_until_closed(&mut reader, WAIT).await;
    assert!(got.len() < 268_435_456, "the whole answer went out");
    let counted = pg.metric("pacegate_client_timeouts_total{timeout=\"send\"}").await;
    assert_eq!(counted, Some(1.0));
}

/// `max_buffered_bytes` bounds the bodies buffered at once: while one 48 KiB
/// body is held (its request in flight), a second one does not fit in 64 KiB
/// and is streamed once, so the 503 it gets is not retried; once the first
/// is done, the same body is buffered and retried again.
#[tokio::test]
async fn buffered_bodies_share_one_bound() {
    let steps = [Scripted::status(200), Scripted::status(503), Scripted::status(503)];
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(500)).script(steps)).await;
    let config = format!(
        "{}{}{}",
        server("max_body_bytes = 1_048_576\nmax_buffered_bytes = 65_536"),
        upstream("api", &mock.url(), "rate = \"1000/s\""),
        fast_retry(2),
    );
    let pg = Pacegate::start_config(&config).await;
    let http = client();
    let body = vec![b'x'; 48 * 1024];
    let first = tokio::spawn(http.put(pg.url("/api/first")).body(body.clone()).timeout(WAIT).send());
    assert!(mock.wait_for_arrivals(1, WAIT).await, "the first upload never reached the upstream");
    let second = http.put(pg.url("/api/second")).body(body.clone()).timeout(WAIT).send().await.unwrap();
    assert_eq!((second.status().as_u16(), attempts_of(&second)), (503, 1), "a streamed body was retried");
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // Nothing is held any more: the same body is buffered, and retried.
    let third = http.put(pg.url("/api/third")).body(body).timeout(WAIT).send().await.unwrap();
    assert_eq!((third.status().as_u16(), attempts_of(&third)), (200, 2));
    let lengths: Vec<usize> = mock.arrivals().iter().map(|a| a.body_len).collect();
    assert_eq!(lengths, [48 * 1024; 4], "every attempt carried the whole body");
}

// === panics ===

/// A handler that panics on `/panic`, streams a body that panics on
/// `/panic-body`, and answers 200 otherwise.
async fn panicky(request: http::Request<hyper::body::Incoming>) -> http::Response<ProxyBody> {
    match request.uri().path() {
        "/panic" => panic!("handler panics on purpose"),
        "/panic-body" => {
            let frames =
                futures_util::stream::poll_fn(|_| -> std::task::Poll<Option<Result<_, Infallible>>> {
                    panic!("body panics on purpose")
                });
            let body = http_body_util::StreamBody::new(frames).map_err(|never| match never {}).boxed();
            http::Response::new(body)
        }
        _ => http::Response::new(pacegate::body::full(Bytes::from_static(b"ok"))),
    }
}

/// A panic in a request, in a streamed answer or in an HTTP/2 stream is
/// caught, answered 500 where an answer is still possible, counted in
/// `pacegate_panics_total`, and the server goes on serving.
#[tokio::test]
async fn panics_are_caught_counted_and_serving_goes_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics = Arc::new(Metrics::new());
    let settings = ConnectionSettings {
        max_connections: 100,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        send_timeout: Duration::from_secs(5),
        max_header_bytes: 8192,
        shutdown_grace: Duration::from_secs(1),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(
        listener,
        pacegate::workers::Workers::start(2).unwrap(),
        settings,
        metrics.clone(),
        |_peer, request| panicky(request),
        async {
            let _ = stopped.await;
        },
    ));

    let http1 = client();
    let answer = http1.get(format!("{url}/panic")).timeout(WAIT).send().await.unwrap();
    let body = assert_pacegate_error(answer, 500, "internal_error", None).await;
    println!("panic answer: {body}");
    let cut = http1.get(format!("{url}/panic-body")).timeout(WAIT).send().await;
    assert!(cut.is_err() || cut.unwrap().bytes().await.is_err(), "a panicking body looked complete");
    let h2 = builder().http2_prior_knowledge().build().unwrap();
    let cut = h2.get(format!("{url}/panic-body")).timeout(WAIT).send().await;
    assert!(cut.is_err() || cut.unwrap().bytes().await.is_err(), "a panicking h2 body looked complete");
    for http in [&http1, &h2] {
        let fine = http.get(format!("{url}/fine")).timeout(WAIT).send().await.unwrap();
        assert_eq!(fine.text().await.unwrap(), "ok");
    }
    assert_eq!(metrics.panics.get(), 3);
    assert!(metrics.encode(false).contains("pacegate_panics_total 3"), "{}", metrics.encode(false));
    let _ = stop.send(());
    tokio::time::timeout(WAIT, served).await.expect("server stopped").unwrap();
}

// === shutdown ===

/// Requests inside an intercepted TLS session are drained by graceful
/// shutdown like any other: pacegate stops only once they are answered.
#[tokio::test]
async fn shutdown_drains_intercepted_sessions() {
    let ca = tempfile::tempdir().unwrap();
    let (cert, key) = pacegate::tls::write_new_ca(ca.path()).unwrap();
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(500))).await;
    let config = format!(
        "{}[mitm]\nenabled = true\nca_cert = \"{}\"\nca_key = \"{}\"\n\n{}",
        server("shutdown_grace = \"5s\""),
        cert.display(),
        key.display(),
        api_for(&mock.url(), "api.test"),
    );
    let mut pg = Pacegate::start_config(&config).await;
    let pem = std::fs::read(&cert).unwrap();
    let https = builder()
        .proxy(reqwest::Proxy::https(pg.url("")).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(WAIT)
        .build()
        .unwrap();
    let request = tokio::spawn(https.get("https://api.test/slow").send());
    assert!(mock.wait_for_arrivals(1, WAIT).await);
    let arrived = Instant::now();
    let run = pg.begin_shutdown();
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
    // The answer leaves the mock 500 ms after the arrival: stopping earlier cut it.
    let stopped_after = arrived.elapsed();
    assert!(stopped_after >= Duration::from_millis(400), "stopped {stopped_after:?} after the arrival");
    assert_eq!(request.await.unwrap().expect("answered during shutdown").status(), 200);
}

/// An upstream a reload removed finishes what it holds; if shutdown comes
/// first, what it cannot serve in time is answered `shutting_down` like any
/// other upstream's (it used to be left to the connection's close: no answer).
#[tokio::test]
async fn shutdown_answers_the_queue_of_an_upstream_a_reload_removed() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let removed = upstream("gone", &mock.url(), "rate = \"1/10s\"\nqueue_timeout = \"60s\"");
    let kept = upstream("kept", &mock.url(), "rate = \"10/s\"");
    let server = server("shutdown_grace = \"2s\"");
    let mut pg = Pacegate::start_config(&format!("{server}{removed}{kept}")).await;
    let http = builder().timeout(WAIT).build().unwrap();
    let requests: Vec<_> =
        (0..3).map(|i| tokio::spawn(http.get(pg.url(&format!("/gone/{i}"))).send())).collect();
    assert!(pg.wait_status(WAIT, |s| queue_depth(s, "gone") == Some(2)).await, "two never queued");
    pg.reload_with(&format!("{server}{kept}")).await;
    let run = pg.begin_shutdown();
    let mut statuses = Vec::new();
    for request in requests {
        let response = request.await.unwrap().expect("every request is answered");
        statuses.push(response.status().as_u16());
        if response.status() != 200 {
            assert_pacegate_error(response, 503, "shutting_down", Some("gone")).await;
        }
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503, 503]);
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
}

/// SIGTERM with requests in flight and many queued: every request gets
/// exactly one answer. Those in flight complete; the queued ones are served
/// (200) or answered 503 `shutting_down` with `Retry-After`, at once for
/// those the upstream's pace cannot reach before the grace ends (10/s over
/// 4 s), the others before their connection closes.
#[tokio::test]
async fn shutdown_answers_every_queued_request() {
    const REQUESTS: usize = 80;
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_millis(300))).await;
    let config = format!(
        "{}{}",
        server("shutdown_grace = \"4s\""),
        upstream("api", &mock.url(), "rate = \"10/s\"\nmax_concurrency = 4\nqueue_timeout = \"60s\"")
    );
    let mut pg = Pacegate::start_config(&config).await;
    let http = builder().timeout(WAIT * 2).build().unwrap();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let request = http.get(pg.url(&format!("/api/r{i}"))).send();
            tokio::spawn(async move {
                let response = request.await;
                (i, response, Instant::now())
            })
        })
        .collect();
    assert!(pg.wait_status(WAIT, |s| queue_depth(s, "api") >= Some(60)).await, "the requests never queued");
    let started = Instant::now();
    let run = pg.begin_shutdown();
    let reached: Vec<String> = mock.arrivals().into_iter().map(|a| a.path_and_query).collect();
    assert!(!reached.is_empty(), "nothing in flight when shutdown started");

    let (mut served, mut refused_early) = (0, 0);
    for request in requests {
        let (i, response, at) = request.await.unwrap();
        let response = response.unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
        if reached.contains(&format!("/r{i}")) {
            assert_eq!(response.status(), 200, "request {i} was in flight at shutdown");
        }
        if response.status() == 200 {
            served += 1;
            continue;
        }
        let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        let secs: u64 = retry_after.expect("a shutting_down answer has Retry-After").parse().unwrap();
        assert!((1..=4).contains(&secs), "Retry-After {secs}: the rest of the grace");
        assert_pacegate_error(response, 503, "shutting_down", Some("api")).await;
        // The cutoff comes 3.6 s in: well before it, only the estimate answers.
        if at.duration_since(started) < Duration::from_millis(1500) {
            refused_early += 1;
        }
    }
    assert!(served >= reached.len(), "fewer served ({served}) than were in flight");
    assert!(refused_early > 0, "nobody was told at once that they would not be served");
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(6), "shutdown took {:?}", started.elapsed());
}

/// `shutdown_grace = "0s"` serves nothing more, yet answers everything it
/// holds before the connections close: the attempt out and the queued
/// requests each get 503 `shutting_down`, none a cut connection.
#[tokio::test]
async fn a_zero_grace_still_answers_every_request() {
    let mock = MockUpstream::start(Behaviour::new().latency(Duration::from_secs(3))).await;
    let config = format!(
        "{}{}",
        server("shutdown_grace = \"0s\""),
        upstream("api", &mock.url(), "rate = \"100/s\"\nmax_concurrency = 1\nqueue_timeout = \"60s\"")
    );
    let mut pg = Pacegate::start_config(&config).await;
    let http = builder().timeout(WAIT).build().unwrap();
    let requests: Vec<_> =
        (0..20).map(|i| tokio::spawn(http.get(pg.url(&format!("/api/r{i}"))).send())).collect();
    assert!(pg.wait_status(WAIT, |s| queue_depth(s, "api") == Some(19)).await, "the requests never queued");
    assert!(mock.wait_for_arrivals(1, WAIT).await, "nothing in flight");
    let run = pg.begin_shutdown();
    for (i, request) in requests.into_iter().enumerate() {
        let response = request.await.unwrap().unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
        assert_pacegate_error(response, 503, "shutting_down", Some("api")).await;
    }
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
}

/// An attempt still without an answer near the end of the grace gives up:
/// its caller hears 503 `shutting_down` before its connection closes,
/// instead of a cut connection after the attempt's own 60 s timeout.
#[tokio::test]
async fn shutdown_answers_an_attempt_the_upstream_never_answers() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Stall])).await;
    let (response, answered) = shut_down_with_one_request_out(&mock, "timeout = \"60s\"").await;
    // The grace's last tenth is for answering; attempts give up half-way
    // through it, 1.9 s in.
    assert!(answered >= Duration::from_millis(1500), "gave up {answered:?} into a 2 s grace");
    assert_pacegate_error(response, 503, "shutting_down", Some("api")).await;
}

/// Shutting down while a retry waits out its backoff: the caller gets the
/// answer that retry was for, as it came, before the grace ends; it is
/// neither held for the rest of the backoff nor cut.
#[tokio::test]
async fn shutdown_answers_a_retry_in_its_backoff_with_the_answer_kept() {
    let busy = Scripted::Status { status: 503, headers: vec![("retry-after".into(), "30".into())] };
    let mock = MockUpstream::start(Behaviour::new().script([busy])).await;
    let retry = "[upstream.retry]\nmax_attempts = 3\nmax_retry_after = \"60s\"\n";
    let (response, answered) = shut_down_with_one_request_out(&mock, retry).await;
    // Its backoff would last 30 s; the grace's last call comes 1.9 s in.
    assert!(answered < Duration::from_secs(5), "answered {answered:?} into a 2 s grace");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-pacegate-attempts"], "1");
    assert_eq!(response.headers()["retry-after"], "30", "the upstream's answer, not pacegate's");
    assert!(response.headers().get("x-pacegate-error").is_none(), "{:?}", response.headers());
    assert_eq!(mock.arrivals().len(), 1, "no second attempt");
}

/// Sends one request to `api` (with `extra` config) in front of `mock`,
/// shuts down with a 2 s grace once it reached the mock, and returns its
/// answer and how long after the start of shutdown it came; shutdown must
/// then finish.
async fn shut_down_with_one_request_out(mock: &MockUpstream, extra: &str) -> (reqwest::Response, Duration) {
    let config = format!("{}{}", server("shutdown_grace = \"2s\""), api(&mock.url(), extra));
    let mut pg = Pacegate::start_config(&config).await;
    let request = tokio::spawn(builder().timeout(WAIT).build().unwrap().get(pg.url("/api/out")).send());
    assert!(mock.wait_for_arrivals(1, WAIT).await, "the request never reached the upstream");
    let started = Instant::now();
    let run = pg.begin_shutdown();
    let response = request.await.unwrap().expect("answered before the connection closed");
    let answered = started.elapsed();
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
    (response, answered)
}

/// A plain tunnel cannot be drained: shutdown waits for it up to
/// `shutdown_grace`, then closes it.
#[tokio::test]
async fn shutdown_closes_tunnels_after_the_grace() {
    let (_mock, echo, mut pg) = tunnel_setup("shutdown_grace = \"500ms\"").await;
    let mut tunnel = open_tunnel(&pg, echo).await;
    let started = Instant::now();
    let run = pg.begin_shutdown();
    tokio::time::timeout(WAIT, run).await.expect("shutdown finished").unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450), "shutdown did not wait for the open tunnel: {took:?}");
    read_until_closed(&mut tunnel, Duration::from_secs(2)).await;
}

// === upstream side ===

/// `fault` instead of a response head is a broken attempt: a GET is retried
/// (and succeeds), a POST, which the upstream may have processed, gets 502
/// `upstream_unreachable` at once.
async fn broken_attempt_is_retried_when_idempotent(fault: Scripted) {
    let mock = MockUpstream::start(Behaviour::new().script([fault.clone()])).await;
    let pg = Pacegate::start(&format!("{}{}", api(&mock.url(), ""), fast_retry(3))).await;
    let http = client();
    let retried = http.get(pg.url("/api/get")).timeout(WAIT).send().await.unwrap();
    assert_eq!((retried.status().as_u16(), attempts_of(&retried)), (200, 2));
    mock.set_behaviour(Behaviour::new().script([fault]));
    let post = http.post(pg.url("/api/post")).body("x").timeout(WAIT).send().await.unwrap();
    assert_eq!(attempts_of(&post), 1);
    assert_pacegate_error(post, 502, "upstream_unreachable", Some("api")).await;
    assert_eq!(mock.count(), 3);
}

#[tokio::test]
async fn upstream_reset_before_headers() {
    broken_attempt_is_retried_when_idempotent(Scripted::Reset).await;
}

#[tokio::test]
async fn upstream_garbage_instead_of_http() {
    broken_attempt_is_retried_when_idempotent(Scripted::Garbage).await;
}

/// A connection reset mid-body: the caller gets the head, then its
/// connection is closed, so the truncation is visible and nothing hangs.
#[tokio::test]
async fn upstream_reset_mid_body_closes_the_callers_connection() {
    let mock = MockUpstream::start(Behaviour::new().script([Scripted::Truncated, Scripted::Truncated])).await;
    let pg = Pacegate::start(&api(&mock.url(), "")).await;
    let got = send_raw(&pg, &get("/api/cut")).await;
    let found = answers(&got);
    assert_eq!(found.len(), 1, "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(found[0].status, 200);
    assert_eq!(found[0].headers["content-length"], "10");
    assert!(!found[0].complete, "the body looked complete: {:?}", found[0].body);
    let response = client().get(pg.url("/api/cut")).timeout(WAIT).send().await.unwrap();
    assert!(response.bytes().await.is_err(), "reqwest saw a complete body");
}

/// An upstream that accepts and never reads: every attempt ends at the
/// attempt timeout (504), on a fresh connection, whatever the body size.
#[tokio::test]
async fn upstream_that_never_reads_times_out() {
    let mock = MockUpstream::start(Behaviour::new().never_read()).await;
    let config = format!("{}{}", api(&mock.url(), "timeout = \"300ms\""), fast_retry(2));
    let pg = Pacegate::start(&config).await;
    let http = client();
    let started = Instant::now();
    let get = http.get(pg.url("/api/get")).timeout(WAIT).send().await.unwrap();
    assert_eq!(attempts_of(&get), 2);
    assert_pacegate_error(get, 504, "upstream_timeout", Some("api")).await;
    // 4 MB cannot sit in socket buffers: the body write itself stalls.
    let post = http.post(pg.url("/api/post")).body(vec![b'x'; 4 << 20]).timeout(WAIT).send().await.unwrap();
    assert_eq!(attempts_of(&post), 1);
    assert_pacegate_error(post, 504, "upstream_timeout", Some("api")).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the attempt timeout did not bound the waits: {took:?}");
    assert_eq!(mock.connections(), 3, "a stuck connection was reused");
}

/// A name that does not resolve is a connect failure: retried, then 502.
#[tokio::test]
async fn dns_failure_is_502_after_the_attempts() {
    let pg = Pacegate::start(&format!("{}{}", api("http://pacegate-test.invalid", ""), fast_retry(3))).await;
    let response = client().get(pg.url("/api/x")).timeout(WAIT).send().await.unwrap();
    assert_eq!(attempts_of(&response), 3);
    assert_pacegate_error(response, 502, "upstream_unreachable", Some("api")).await;
}

/// A TLS handshake that fails (here: the upstream speaks plain HTTP) is a
/// connect failure: retried, then 502, and no request is ever sent.
#[tokio::test]
async fn tls_failure_is_502_after_the_attempts() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let base = format!("https://{}", mock.addr());
    let pg = Pacegate::start(&format!("{}{}", api(&base, ""), fast_retry(3))).await;
    let response = client().get(pg.url("/api/x")).timeout(WAIT).send().await.unwrap();
    assert_eq!(attempts_of(&response), 3);
    assert_pacegate_error(response, 502, "upstream_unreachable", Some("api")).await;
    assert_eq!(mock.count(), 0, "a request was sent over a failed handshake");
}

/// The target names the host (RFC 9112 §3.2.2): a Host that differs from an
/// absolute-form target, or two of them, never reach the upstream as sent.
#[tokio::test]
async fn the_target_decides_the_host_in_pass_through_too() {
    let mock = MockUpstream::start(Behaviour::new()).await;
    let target = mock.url().trim_start_matches("http://").to_owned();
    let forward = "[forward]\nunknown_hosts = \"pass\"\nallow_private = true\n";
    let pg = Pacegate::start_config(&format!("{}{forward}", server(""))).await;
    for hosts in ["Host: evil.example\r\n", "Host: evil.example\r\nHost: other.example\r\n"] {
        let mut stream = open(&pg).await;
        let request = format!("GET http://{target}/x HTTP/1.1\r\n{hosts}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await;
        if answer.status == 400 {
            continue; // two Hosts may be refused outright, which is as good
        }
        assert_eq!(answer.status, 200, "{hosts:?}");
    }
    assert!(mock.count() >= 1, "the first request reached the mock");
    for arrival in mock.arrivals() {
        let hosts: Vec<_> = arrival.headers.get_all("host").iter().collect();
        assert_eq!(hosts, [target.as_str()], "the upstream saw the target's host only");
    }
}
