//! pacegate as a real child process: the binary cargo built, for tests that
//! need separate processes (replicas sharing Redis, signals, exit codes).
//!
//! The child is killed when its guard drops, and every wait is bounded.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pacegate");

/// Bounds every wait on the child process.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Runs `pacegate ARGS` in `dir` to completion (bounded by [`PATIENCE`]),
/// with `$PACEGATE_CONFIG` set to `config_env`, or unset.
pub fn run(dir: &Path, args: &[&str], config_env: Option<&Path>) -> Output {
    let mut command = Command::new(BIN);
    match config_env {
        Some(config) => command.env("PACEGATE_CONFIG", config),
        None => command.env_remove("PACEGATE_CONFIG"),
    };
    let child = command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pacegate");
    let id = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let Ok(output) = finished.recv_timeout(PATIENCE) else {
        let _ = Command::new("kill").args(["-KILL", &id.to_string()]).status();
        panic!("pacegate {args:?} did not finish within {PATIENCE:?}");
    };
    output.expect("pacegate output")
}

/// Starts `pacegate --config FILE --log-format json` at `info`, its stderr
/// piped (read it, or close it), nothing else.
pub fn spawn(config: &Path) -> Child {
    Command::new(BIN)
        .args(["--config", config.to_str().expect("utf-8 path"), "--log-format", "json"])
        .env("PACEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pacegate")
}

/// A running `pacegate --config FILE --log-format json`.
pub struct Process {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Writes `toml` to a temp file, starts pacegate on it and waits (bounded)
    /// for the `listening proxy=ADDR admin=ADDR` log line.
    pub fn start(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("pacegate.toml");
        std::fs::write(&config, toml).expect("write config");
        let mut child = spawn(&config);
        // Read stderr on a thread, and keep draining it so the child never blocks.
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines, logged) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + PATIENCE;
        let message = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = logged.recv_timeout(left) else {
                let _ = child.kill();
                panic!("no `listening proxy=` log line within {PATIENCE:?}");
            };
            let event: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if let Some(message) = event["message"].as_str().filter(|m| m.contains("listening proxy=")) {
                break message.to_string();
            }
        };
        let address = |key: &str| -> SocketAddr {
            let start = message.find(key).unwrap_or_else(|| panic!("{key} missing: {message}")) + key.len();
            let value = message[start..].split_whitespace().next().unwrap_or_default();
            value.parse().unwrap_or_else(|e| panic!("{key}{value}: {e}"))
        };
        Self { proxy: address("proxy="), admin: address("admin="), child, _dir: dir }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// URL of `path` on the proxy listener (reverse mode).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(killed.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for pacegate") {
                return status;
            }
            assert!(Instant::now() < deadline, "pacegate still running {PATIENCE:?} after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
