//! Test harness shared by every integration test: the mock upstream, the
//! mock LLM API ([`llm_mock`], with a strict token window), a real
//! pacegate started in-process on `127.0.0.1:0` (or as a child [`process`]),
//! and a real [`redis_server`].
#![allow(dead_code)]

pub mod llm_mock;
pub mod mock;
pub mod process;
pub mod redis_server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// `[server]` for tests: ephemeral ports, short grace, and two worker
/// threads whatever the machine's core count.
pub const TEST_SERVER: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"
workers = 2
"#;

/// No test waits this long for one answer, nor for pacegate to stop (the
/// longest `queue_timeout` in the tests is 2 min, the longest grace 30 s): a
/// hang fails the test instead of stalling the suite.
pub const HANG: Duration = Duration::from_secs(300);

/// A pacegate running inside the test process.
pub struct Pacegate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The config file; tests may rewrite it to exercise reloads.
    pub config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Pacegate {
    /// Starts pacegate with [`TEST_SERVER`] followed by `rest` (upstreams, …).
    pub async fn start(rest: &str) -> Self {
        Self::start_config(&format!("{TEST_SERVER}\n{rest}")).await
    }

    /// Starts pacegate with a complete config file.
    pub async fn start_config(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("pacegate.toml");
        std::fs::write(&config_path, toml).expect("write config");
        Self::start_file(dir, config_path).await
    }

    /// Starts pacegate on the config file at `config_path`, kept in `dir`.
    pub async fn start_file(dir: tempfile::TempDir, config_path: PathBuf) -> Self {
        init_tracing();
        let config = pacegate::config::load(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
        let proxy = TcpListener::bind(config.server.listen).await.expect("bind proxy");
        let admin = TcpListener::bind(config.server.admin_listen).await.expect("bind admin");
        let (proxy_addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = pacegate::app::Listeners { proxy, admin };
        let app =
            pacegate::app::App::new(config, config_path.clone()).unwrap_or_else(|e| panic!("start: {e}"));
        let task = tokio::spawn(app.run(listeners, async move {
            let _ = stopped.await;
        }));
        Self {
            proxy: proxy_addr,
            admin: admin_addr,
            config_path,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Writes `toml` as the config file and reloads it through the admin API.
    pub async fn reload_with(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).expect("write config");
        let reload = client().post(self.admin_url("/reload")).send().await.expect("reload");
        assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap_or_default());
    }

    /// URL of `path` on the proxy listener (reverse mode).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// URL of `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// A client that uses this pacegate as its `HTTP_PROXY`.
    pub fn forward_client(&self) -> reqwest::Client {
        builder().proxy(reqwest::Proxy::http(self.url("")).expect("proxy url")).build().expect("client")
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/status"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status json")
    }

    /// Value of the `/metrics` sample whose series (name and labels) is
    /// exactly `series`, e.g. `pacegate_redis_up`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text =
            client().get(self.admin_url("/metrics")).send().await.expect("metrics").text().await.unwrap();
        text.lines()
            .filter_map(|line| line.strip_prefix(series))
            .find_map(|rest| rest.strip_prefix(' '))
            .map(|value| value.trim().parse().expect("metric value is a number"))
    }

    /// Polls `/status` (bounded) until `ready` holds; false on timeout.
    pub async fn wait_status(&self, timeout: Duration, ready: impl Fn(&serde_json::Value) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let Ok(status) = tokio::time::timeout_at(deadline, self.status()).await else { break };
            if ready(&status) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Starts graceful shutdown and waits for pacegate to finish.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(HANG, task)
                .await
                .unwrap_or_else(|_| panic!("pacegate did not stop within {HANG:?}"))
                .expect("pacegate task panicked"),
            None => Ok(()),
        }
    }

    /// Sends the shutdown signal without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running")
    }
}

impl Drop for Pacegate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A plain client (no proxy), for reverse mode, admin and the mock.
pub fn client() -> reqwest::Client {
    builder().build().expect("client")
}

/// Client builder with the crypto provider installed and no system proxy.
pub fn builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).timeout(HANG)
}

/// Logs to the test output when `PACEGATE_LOG` is set.
fn init_tracing() {
    if let Ok(filter) = std::env::var("PACEGATE_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// An upstream block for `mock`, with extra keys appended.
pub fn upstream(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\nroute = \"/{name}\"\nhosts = []\n{extra}\n"
    )
}

/// Asserts an answer pacegate made itself, per the error table, and
/// returns its JSON body.
pub async fn assert_pacegate_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    upstream: Option<&str>,
) -> Value {
    let (got, headers) = (response.status().as_u16(), response.headers().clone());
    let body = response.bytes().await.expect("error body");
    assert_error_parts(got, &headers, &body, status, code, upstream)
}

/// [`assert_pacegate_error`] on an answer already taken apart.
pub fn assert_error_parts(
    got: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    status: u16,
    code: &str,
    upstream: Option<&str>,
) -> Value {
    assert_eq!(got, status, "status of a {code} answer");
    assert_eq!(headers["x-pacegate-error"], code);
    let content_type = headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("application/json"), "content-type {content_type}");
    let body: Value = serde_json::from_slice(body).expect("error body is JSON");
    assert_eq!(body["error"], code, "{body}");
    match upstream {
        Some(name) => assert_eq!(body["upstream"], name, "{body}"),
        None => assert!(body["upstream"].is_null(), "{body}"),
    }
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

/// `x-pacegate-attempts` of a proxied answer.
pub fn attempts_of(response: &reqwest::Response) -> u32 {
    let value =
        response.headers().get("x-pacegate-attempts").expect("every proxied answer has x-pacegate-attempts");
    value.to_str().unwrap().parse().expect("x-pacegate-attempts is a number")
}

/// Queue depth of upstream `name` in `/status`.
pub fn queue_depth(status: &Value, name: &str) -> Option<u64> {
    let upstreams = status["upstreams"].as_array()?;
    let upstream = upstreams.iter().find(|u| u["name"] == name)?;
    upstream["queue"]["depth"].as_u64()
}

/// A TCP echo server on loopback (the far end of plain tunnels).
pub async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An upstream that answers every request with these exact bytes, whatever
/// hyper would refuse to write itself (trailers nobody asked for, a
/// transfer coding it does not speak); its URL. Each connection is read up
/// to the end of the request head, answered, then held until the peer
/// closes it.
pub async fn raw_upstream(answer: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a raw upstream");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") {
                    match socket.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if socket.write_all(answer.as_bytes()).await.is_ok() {
                    let _ = socket.read(&mut byte).await;
                }
            });
        }
    });
    url
}
