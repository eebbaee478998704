//! A real `redis-server` on a free loopback port, owned by one test, and
//! the two highly available topologies made of them: a Redis Cluster
//! ([`RedisCluster`]) and a master with a replica watched by three
//! `redis-sentinel`s ([`RedisSentinels`]).
//!
//! `scripts/test.sh` installs redis-server and redis-sentinel; each test
//! starts its own (no persistence, its own temp dir) and every process is
//! killed when its guard drops, whether the test passed or not. The
//! topologies are `None` when a program they need is missing: the test
//! then says it is skipped and passes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds the wait for a started server to answer PING.
const START_PATIENCE: Duration = Duration::from_secs(10);

/// Bounds the wait for a cluster or Sentinel set-up to settle.
const SETTLE_PATIENCE: Duration = Duration::from_secs(30);

pub struct RedisServer {
    port: u16,
    /// `redis-server`, or `redis-sentinel`.
    program: &'static str,
    /// Options after the common ones (cluster mode, replicaof, sentinel lines).
    options: Vec<String>,
    /// `requirepass` (and `masterauth`, for a replica), when set.
    password: Option<String>,
    /// TLS only (`tls-port`, no plain port), with this certificate.
    tls: Option<std::sync::Arc<Tls>>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::spawn("redis-server", Vec::new()).await
    }

    async fn spawn(program: &'static str, options: Vec<String>) -> Self {
        Self::spawn_with(program, options, None, None).await
    }

    async fn spawn_with(
        program: &'static str,
        options: Vec<String>,
        password: Option<&str>,
        tls: Option<std::sync::Arc<Tls>>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let password = password.map(str::to_owned);
        let mut server = Self { port: free_port(), program, options, password, tls, child: None, dir };
        server.launch().await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as Redis names its nodes.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`, with `:PASSWORD@` when the server wants
    /// one; over TLS `rediss://…/#insecure` (a self-signed certificate).
    pub fn url(&self) -> String {
        let auth = self.password.as_ref().map(|password| format!(":{password}@")).unwrap_or_default();
        match self.tls {
            Some(_) => format!("rediss://{auth}127.0.0.1:{}/#insecure", self.port),
            None => format!("redis://{auth}127.0.0.1:{}", self.port),
        }
    }

    /// A URL on a port where no Redis listens (bound, then released).
    pub fn unreachable_url() -> String {
        format!("redis://127.0.0.1:{}", free_port())
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// A synchronous connection for inspecting keys.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("connect to test redis")
    }

    /// Keys matching `pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> =
            redis::cmd("KEYS").arg(pattern).query(&mut self.connection()).expect("KEYS");
        keys.sort();
        keys
    }

    /// `INFO section` as `field:value` lines.
    pub fn info(&self, section: &str) -> String {
        redis::cmd("INFO").arg(section).query(&mut self.connection()).unwrap_or_default()
    }

    async fn launch(&mut self) {
        let mut command = Command::new(self.program);
        if self.program == "redis-sentinel" {
            // A sentinel needs a config file it may rewrite.
            let config = self.dir.path().join("sentinel.conf");
            std::fs::write(&config, "").expect("write sentinel.conf");
            command.arg(config);
        } else {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        let port = self.port.to_string();
        match &self.tls {
            Some(tls) => {
                let (cert, key) =
                    (tls.cert.to_str().expect("utf-8 path"), tls.key.to_str().expect("utf-8 path"));
                command.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-cert-file",
                    cert,
                    "--tls-key-file",
                    key,
                ]);
                command.args([
                    "--tls-ca-cert-file",
                    cert,
                    "--tls-auth-clients",
                    "no",
                    "--tls-replication",
                    "yes",
                ]);
            }
            None => {
                command.args(["--port", &port]);
            }
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--loglevel", "warning", "--dir"])
            .arg(self.dir.path())
            .args(&self.options)
            .args(self.password.iter().flat_map(|p| ["--requirepass", p, "--masterauth", p]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} ({e}): run scripts/test.sh, which installs it", self.program));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if self.pong().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} on port {} did not answer PING within {START_PATIENCE:?}", self.program, self.port);
    }

    async fn pong(&self) -> bool {
        if self.tls.is_some() {
            let mut cli = tokio::process::Command::new("redis-cli");
            cli.args(["--tls", "--insecure", "-p", &self.port.to_string()]);
            cli.args(self.password.iter().flat_map(|p| ["--no-auth-warning", "-a", p]));
            let out = cli.arg("PING").stdin(Stdio::null()).stderr(Stdio::null()).output().await;
            return out.is_ok_and(|out| out.stdout.starts_with(b"PONG"));
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        let (auth, expected): (String, &[u8]) = match &self.password {
            Some(password) => (format!("AUTH {password}\r\n"), b"+OK\r\n+PONG\r\n"),
            None => (String::new(), b"+PONG\r\n"),
        };
        let mut reply = vec![0; expected.len()];
        stream.write_all(format!("{auth}PING\r\n").as_bytes()).await.is_ok()
            && stream.read_exact(&mut reply).await.is_ok()
            && reply == expected
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A self-signed certificate for 127.0.0.1, in files a server can read.
pub struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tls {
    pub fn new() -> std::sync::Arc<Self> {
        // The test's own connections take rustls' process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("temp dir");
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write cert.pem");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key.pem");
        std::sync::Arc::new(Self { cert, key, _dir: dir })
    }
}

/// A port that was free a moment ago (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// True, after saying why, when one of `programs` cannot be run.
fn require(programs: &[&str]) {
    let absent = programs.iter().find(|program| Command::new(program).arg("--version").output().is_err());
    if let Some(program) = absent {
        panic!("{program} is not installed: scripts/test.sh installs it");
    }
}

/// Polls (bounded by [`SETTLE_PATIENCE`]) until `ready` holds; panics
/// naming `what` otherwise.
async fn settle(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE_PATIENCE;
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "{what} not within {SETTLE_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === impl RedisCluster ===

/// A Redis Cluster on free loopback ports (each node's cluster bus on
/// another free port), made by `redis-cli --cluster create`: masters only,
/// or each master with a replica.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes, joins them and waits until every node says
    /// the cluster is ok; panics without redis-server or redis-cli.
    pub async fn start(masters: usize) -> Self {
        Self::start_with_replicas(masters, 0).await
    }

    /// The same with `replicas` replicas per master (`--cluster-replicas`),
    /// which take over a master's slots when it fails.
    pub async fn start_with_replicas(masters: usize, replicas: usize) -> Self {
        require(&["redis-server", "redis-cli"]);
        let mut nodes = Vec::with_capacity(masters * (1 + replicas));
        for _ in 0..masters * (1 + replicas) {
            let options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                .into_iter()
                .map(str::to_owned)
                .chain(["--cluster-port".to_owned(), free_port().to_string()])
                .chain(["--cluster-node-timeout".to_owned(), "2000".to_owned()])
                .collect();
            nodes.push(RedisServer::spawn("redis-server", options).await);
        }
        let create = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(RedisServer::address))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let created =
            tokio::time::timeout(SETTLE_PATIENCE, create).await.expect("redis-cli --cluster create");
        let created = created.expect("run redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes };
        settle("cluster_state:ok on every node", || {
            cluster.nodes.iter().all(|node| node.info_cluster().contains("cluster_state:ok"))
        })
        .await;
        if replicas > 0 {
            settle("every replica in sync", || {
                let links = cluster.nodes.iter().map(|node| node.info("replication"));
                links.filter(|info| info.contains("master_link_status:up")).count() == masters * replicas
            })
            .await;
        }
        cluster
    }

    /// A node that still runs, to ask about the cluster.
    fn alive(&self) -> &RedisServer {
        self.nodes.iter().find(|node| node.child.is_some()).expect("a live node")
    }

    /// The addresses of the masters that serve slots now, sorted.
    pub fn masters(&self) -> Vec<String> {
        let nodes: String =
            redis::cmd("CLUSTER").arg("NODES").query(&mut self.alive().connection()).expect("CLUSTER NODES");
        let mut masters: Vec<String> = nodes
            .lines()
            .filter(|line| {
                line.contains("master") && !line.contains("fail") && line.split_whitespace().count() > 8
            })
            .map(|line| {
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .split('@')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        masters.sort();
        masters
    }

    /// Every node's `redis://` URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Moves `key`'s slot and its keys from the node that serves it to
    /// `to`, as `redis-cli --cluster reshard` moves each slot: IMPORTING on
    /// the target, MIGRATING on the source, the keys sent over in batches,
    /// then every node told the new owner. `pause` holds the slot half
    /// moved (some keys on each side) before the last keys go, so that
    /// calls meanwhile meet `ASK` and `TRYAGAIN`.
    pub async fn migrate(&self, key: &str, to: &RedisServer, pause: Duration) {
        let from = self.owner(key);
        let slot = self.slot(key);
        let id = |node: &RedisServer| -> String {
            redis::cmd("CLUSTER").arg("MYID").query(&mut node.connection()).expect("CLUSTER MYID")
        };
        let (from_id, to_id) = (id(from), id(to));
        let setslot = |node: &RedisServer, state: &str, owner: &str| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(owner)
                .query(&mut node.connection())
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state}: {e}"));
        };
        setslot(to, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &to_id);
        let mut first = true;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(if first { 1 } else { 100 })
                .query(&mut from.connection())
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to.port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut from.connection())
                .expect("MIGRATE");
            if first {
                tokio::time::sleep(pause).await;
                first = false;
            }
        }
        for node in [to, from].into_iter().chain(&self.nodes) {
            setslot(node, "NODE", &to_id);
        }
    }

    fn slot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut self.alive().connection()).expect("KEYSLOT")
    }

    /// The node that serves `key`'s slot now.
    pub fn owner(&self, key: &str) -> &RedisServer {
        let owner = self.serving(key).unwrap_or_else(|| panic!("no live node serves {key}'s slot"));
        self.nodes.iter().find(|node| node.address() == owner).expect("the owner is one of ours")
    }

    /// The address of the node that serves `key`'s slot and is not known
    /// to fail; `None` while nobody does (a master died, no replica took
    /// over yet).
    pub fn serving(&self, key: &str) -> Option<String> {
        let slot = self.slot(key);
        let nodes: String =
            redis::cmd("CLUSTER").arg("NODES").query(&mut self.alive().connection()).expect("CLUSTER NODES");
        nodes.lines().filter(|line| !line.contains("fail")).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let serves = fields.iter().skip(8).any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if (low..=high).contains(&slot))
            });
            serves.then(|| fields[1].split('@').next().unwrap_or_default().to_owned())
        })
    }
}

impl RedisServer {
    fn info_cluster(&self) -> String {
        redis::cmd("CLUSTER").arg("INFO").query(&mut self.connection()).unwrap_or_default()
    }
}

// === impl RedisSentinels ===

/// One master, one replica of it, and three sentinels that watch it as
/// [`RedisSentinels::MASTER`] (quorum 2, down after 1 s).
pub struct RedisSentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

impl RedisSentinels {
    pub const MASTER: &str = "pacegate-test";

    /// Starts the five processes and waits until the replica is in sync
    /// and every sentinel knows the replica and the two other sentinels;
    /// panics without redis-server or redis-sentinel.
    pub async fn start() -> Self {
        Self::start_with_password(None).await
    }

    /// The same, with the master and the replica wanting `password` (the
    /// sentinels themselves want none, and know it as `auth-pass`).
    pub async fn start_with_password(password: Option<&str>) -> Self {
        Self::start_with(password, None).await
    }

    /// The same, every process over TLS only (`rediss://`) with `tls`'s
    /// certificate, sentinels included.
    pub async fn start_with(password: Option<&str>, tls: Option<std::sync::Arc<Tls>>) -> Self {
        require(&["redis-server", "redis-sentinel"]);
        let master = RedisServer::spawn_with("redis-server", Vec::new(), password, tls.clone()).await;
        let replicaof = vec!["--replicaof".to_owned(), "127.0.0.1".to_owned(), master.port().to_string()];
        let replica = RedisServer::spawn_with("redis-server", replicaof, password, tls.clone()).await;
        let name = Self::MASTER;
        let mut lines = vec![
            format!("monitor {name} 127.0.0.1 {} 2", master.port()),
            format!("down-after-milliseconds {name} 1000"),
            format!("failover-timeout {name} 10000"),
        ];
        lines.extend(password.map(|password| format!("auth-pass {name} {password}")));
        // Each line as `--sentinel WORD...`, one argument per word.
        let options: Vec<String> = lines
            .iter()
            .flat_map(|line| std::iter::once("--sentinel").chain(line.split_whitespace()).map(str::to_owned))
            .collect();
        let mut sentinels = Vec::with_capacity(3);
        for _ in 0..3 {
            sentinels
                .push(RedisServer::spawn_with("redis-sentinel", options.clone(), None, tls.clone()).await);
        }
        let set = Self { master, replica, sentinels };
        settle("replica in sync", || set.replica.info("replication").contains("master_link_status:up")).await;
        settle("sentinels know the replica and each other", || {
            set.sentinels.iter().all(|sentinel| {
                let master: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(name)
                    .query(&mut sentinel.connection())
                    .unwrap_or_default();
                master.get("num-slaves").is_some_and(|n| n == "1")
                    && master.get("num-other-sentinels").is_some_and(|n| n == "2")
            })
        })
        .await;
        set
    }

    /// Every sentinel's `redis://` URL.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The master's address as the first sentinel names it now.
    pub fn named_master(&self) -> String {
        let address: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(Self::MASTER)
            .query(&mut self.sentinels[0].connection())
            .unwrap_or_default();
        address.join(":")
    }
}
