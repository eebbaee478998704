//! The `pacegate` binary: `check` on the shipped and on broken configs, and a
//! real run that logs its bound addresses and exits 0 on SIGTERM.
//!
//! Every child process is killed when its guard drops, and every wait is bounded.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use support::process::{self, BIN, PATIENCE, Process};

/// Runs `pacegate ARGS` in `dir` to completion, without inheriting `$PACEGATE_CONFIG`.
fn pacegate(dir: &Path, args: &[&str]) -> Output {
    process::run(dir, args, None)
}

#[test]
fn check_prints_one_line_per_upstream_of_the_shipped_config() {
    let output = pacegate(Path::new(env!("CARGO_MANIFEST_DIR")), &["check"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}: {stderr}", output.status);
    print!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (line, name) in lines.iter().zip(["github", "openai", "anthropic", "stripe"]) {
        assert!(line.starts_with(name), "{line:?} should name {name}");
    }
    // Each line shows the quotas and where requests come from.
    assert!(lines[0].contains("5000/h") && lines[0].contains("/github"), "{}", lines[0]);
    assert!(lines[1].contains("500/min") && lines[1].contains("api.openai.com"), "{}", lines[1]);
    assert!(lines[2].contains("50/min") && lines[2].contains("/anthropic"), "{}", lines[2]);
    assert!(lines[3].contains("25/s") && lines[3].contains("/stripe"), "{}", lines[3]);
    // Token quotas and endpoint limits are quotas too.
    assert!(lines[0].contains(" limit.writes=80/min,500/h "), "{}", lines[0]);
    assert!(lines[1].contains(" tokens=30000/min "), "{}", lines[1]);
    assert!(lines[2].contains(" input_tokens=30000/min output_tokens=8000/min "), "{}", lines[2]);
}

#[test]
fn check_reports_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = |name: &str, port: u16, route: &str, rate: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:{port}\"\nroute = \"{route}\"\nhosts = []\nrate = \"{rate}\"\n"
        )
    };
    let cases = [
        // Line 3: the misspelt key itself.
        (
            "unknown_key.toml",
            "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n".to_string(),
            3,
            1,
            "lisen",
        ),
        // Line 6, the value after `rate = `.
        ("bad_rate.toml", upstream("a", 1, "/a", "10/fortnight"), 6, 8, "10/fortnight"),
        // Line 11: the second `route` value (`route = ` is 8 characters).
        (
            "duplicate_route.toml",
            format!("{}\n{}", upstream("a", 1, "/x", "1/s"), upstream("b", 2, "/x", "1/s")),
            11,
            9,
            "/x",
        ),
    ];
    for (file, text, line, col, mention) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, &text).unwrap();
        let output = pacegate(dir.path(), &["check", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(1), "{file}: {stderr}");
        assert!(output.stdout.is_empty(), "{file}: printed upstreams for a bad file");
        let prefix = format!("{}:{line}:{col}: ", path.display());
        assert!(stderr.starts_with(&prefix), "{file}: expected {prefix:?}, got {stderr:?}");
        assert!(stderr.contains(mention), "{file}: {stderr:?} should mention {mention:?}");
        assert_eq!(stderr.lines().count(), 1, "{file}: {stderr:?}");
    }
}

#[test]
fn the_config_is_pacegate_config_unless_config_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, name: &str| {
        let text = format!(
            "[mitm]\nenabled = false\n[[upstream]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:1\"\nroute = \"/{name}\"\nhosts = []\nrate = \"1/s\"\n"
        );
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (from_env, from_flag) = (write("env.toml", "from_env"), write("flag.toml", "from_flag"));
    let first_word = |output: Output| {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap_or_default().to_string()
    };
    let env_only = process::run(dir.path(), &["check"], Some(&from_env));
    assert_eq!(first_word(env_only), "from_env");
    let flag = ["check", "--config", from_flag.to_str().unwrap()];
    assert_eq!(first_word(process::run(dir.path(), &flag, Some(&from_env))), "from_flag");
    // Set but empty: the default, config/pacegate.toml.
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::copy(&from_flag, dir.path().join("config/pacegate.toml")).unwrap();
    assert_eq!(first_word(process::run(dir.path(), &["check"], Some(Path::new("")))), "from_flag");
}

#[test]
fn ca_init_writes_into_config_by_default_with_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let init = pacegate(dir.path(), &["ca", "init"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let (cert, key) = (dir.path().join("config/ca.pem"), dir.path().join("config/ca-key.pem"));
    assert!(std::fs::read_to_string(&cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let again = pacegate(dir.path(), &["ca", "init"]);
    assert_eq!(again.status.code(), Some(1), "a second init must not overwrite the CA");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let version = pacegate(dir.path(), &["--version"]);
    assert!(version.status.success());
    let version = String::from_utf8(version.stdout).unwrap();
    assert_eq!(version.trim(), format!("pacegate {}", env!("CARGO_PKG_VERSION")));
    let help = pacegate(dir.path(), &["--help"]);
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    for word in ["check", "ca", "--config", "--log-format"] {
        assert!(help.contains(word), "--help should mention {word}: {help}");
    }
}

#[test]
fn check_finds_the_ca_beside_the_config_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    let init = pacegate(dir.path(), &["ca", "init", "--out", conf.to_str().unwrap()]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let config = conf.join("pacegate.toml");
    std::fs::write(&config, "[mitm]\nenabled = true\nca_cert = \"ca.pem\"\nca_key = \"ca-key.pem\"\n")
        .unwrap();
    // Started from the directory above, where there is no ca.pem.
    let output = pacegate(dir.path(), &["check", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "the CA beside the config is found and loads: {stderr}");
}

#[tokio::test]
async fn binary_logs_bound_addresses_and_exits_0_on_sigterm() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\n\
                [[upstream]]\nname = \"api\"\nbase_url = \"http://127.0.0.1:1\"\nroute = \"/api\"\nhosts = []\nrate = \"1/s\"\n";
    // Starting waits for the `listening proxy=ADDR admin=ADDR` line and parses it.
    let pacegate = Process::start(text);
    let (proxy, admin) = (pacegate.proxy, pacegate.admin);
    assert_ne!(proxy.port(), 0);
    assert_ne!(admin.port(), 0);
    assert_ne!(proxy, admin);

    let client = support::builder().timeout(PATIENCE).build().unwrap();
    let health = client.get(format!("http://{admin}/healthz")).send().await.expect("admin answers");
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    // The proxy listener is the other address: an unrouted path gets pacegate's 404.
    let missing = client.get(format!("http://{proxy}/nothing")).send().await.expect("proxy answers");
    assert_eq!(missing.status(), 404);

    let status = pacegate.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// The soft open-files limit of process `pid`, from /proc.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let soft = line.split_whitespace().nth(3).expect("soft limit column");
    soft.parse().unwrap_or(u64::MAX) // "unlimited"
}

/// Starts pacegate under `ulimit` `limits` with `max_connections = 1000`,
/// waits (bounded) for its `listening` line and returns its soft open-files
/// limit and everything it logged until then.
fn start_under_ulimit(limits: &str) -> (u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pacegate.toml");
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_connections = 1000\n";
    std::fs::write(&config, text).unwrap();
    let script = format!("ulimit {limits} && exec \"$0\" --config \"$1\" --log-format json");
    let mut child = Command::new("sh")
        .args(["-c", &script, BIN, config.to_str().unwrap()])
        .env("PACEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pacegate under sh");
    let stderr = child.stderr.take().unwrap();
    let (lines, logged) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut log = String::new();
    let started = loop {
        match logged.recv_timeout(PATIENCE) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("listening proxy=") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let soft = started.then(|| soft_open_files(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    (soft.unwrap_or_else(|| panic!("pacegate did not start:\n{log}")), log)
}

/// A soft open-files limit too low for `max_connections` is raised at start,
/// up to the hard limit, with a warning when the hard limit is lower.
#[test]
fn the_open_files_limit_is_raised_for_max_connections() {
    let hard = {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
        line.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap_or(u64::MAX)
    };
    let wanted = pacegate::fds::wanted(1000);
    let (soft, _) = start_under_ulimit("-Sn 512");
    assert_eq!(soft, wanted.min(hard), "the soft limit was not raised");
    let (soft, log) = start_under_ulimit("-Sn 512 && ulimit -Hn 600");
    assert_eq!(soft, 600.min(hard), "raised as far as the hard limit allows");
    assert!(log.contains("hard open-files limit is lower"), "no warning:\n{log}");
}

/// SIGTERM right after the `listening` line (a script that reads the
/// ports, then stops pacegate) is a graceful shutdown with exit 0, not the
/// signal's default action: the handlers are in place before it is logged.
/// Likewise SIGHUP reloads rather than kills.
#[tokio::test]
async fn signals_right_after_the_listening_line_are_handled() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    for _ in 0..5 {
        let status = Process::start(text).terminate().await;
        assert!(status.success(), "SIGTERM right after start: {status:?}");
    }
    let client = support::builder().timeout(PATIENCE).build().unwrap();
    for _ in 0..2 {
        let pacegate = Process::start(text);
        let hangup = Command::new("kill").args(["-HUP", &pacegate.pid().to_string()]).status();
        assert!(hangup.expect("run kill").success());
        let status_url = format!("http://{}/status", pacegate.admin);
        let mut generation = serde_json::Value::Null;
        for _ in 0..200 {
            let Ok(answer) = client.get(&status_url).send().await else { break };
            generation = answer.json::<serde_json::Value>().await.unwrap()["generation"].clone();
            if generation == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(generation, 2, "SIGHUP right after start did not reload");
        assert!(pacegate.terminate().await.success());
    }
}

/// With stderr a closed pipe (the log shipper went away), every request is
/// still answered, even one whose answer is logged, and SIGTERM still ends
/// in a graceful exit 0: a log line that cannot be written is dropped.
#[tokio::test]
async fn a_closed_stderr_costs_no_answer() {
    use std::io::BufRead;
    let mock = support::mock::MockUpstream::start(support::mock::Behaviour::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pacegate.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}",
        support::upstream("api", &mock.url(), "rate = \"1/min\"")
    );
    std::fs::write(&config, text).unwrap();
    let mut child = Killed(process::spawn(&config));
    let mut stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening proxy=") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "pacegate exited before listening");
    }
    let proxy =
        line.split("proxy=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().to_owned();
    drop(stderr);

    let client = support::builder().timeout(PATIENCE).build().unwrap();
    let url = format!("http://{proxy}/api/x");
    assert_eq!(client.get(&url).send().await.expect("an answer").status(), 200);
    // Refused at once (no turn within a second), and logged as such.
    let refused = client.get(&url).header("x-pacegate-max-wait", "1s").send().await.expect("an answer");
    assert_eq!(refused.status(), 503);
    let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    assert!(killed.expect("run kill").success());
    let mut exited = None;
    for _ in 0..500 {
        exited = child.0.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let exited = exited.expect("pacegate exits within 10 s of SIGTERM");
    assert!(exited.success(), "exit after SIGTERM with stderr closed: {exited:?}");
}

/// A child killed (and reaped) when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `check` with stdout a closed pipe fails (exit 1) instead of panicking.
#[test]
fn check_into_a_closed_pipe_fails_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pacegate.toml");
    let status = Command::new(BIN)
        .args(["check", "--config", shipped.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::null())
        .status()
        .expect("run pacegate check");
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// A listener that cannot be bound stops pacegate (exit 1) with an error
/// that names the key and the address.
#[test]
fn a_taken_port_is_named_in_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[server]\nlisten = \"{address}\"\nadmin_listen = \"127.0.0.1:0\"\n");
    std::fs::write(dir.path().join("pacegate.toml"), text).unwrap();
    let output = pacegate(dir.path(), &["--config", "pacegate.toml", "--log-format", "json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot bind listen {address}")), "{stderr}");
}

/// `check` tells a CA that a start would create from one it could not
/// (its directory missing, or not writable): the start would then turn
/// interception off, and `check` says so instead of promising the files.
#[test]
fn check_says_when_the_ca_could_not_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        |ca_dir: &str| format!("[mitm]\nca_cert = \"{ca_dir}/ca.pem\"\nca_key = \"{ca_dir}/ca-key.pem\"\n");
    std::fs::create_dir(dir.path().join("here")).unwrap();
    std::fs::write(dir.path().join("writable.toml"), text("here")).unwrap();
    std::fs::write(dir.path().join("missing.toml"), text("nowhere")).unwrap();
    let said = |config: &str| {
        let output = pacegate(dir.path(), &["check", "--config", config]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stderr).unwrap()
    };
    assert!(said("writable.toml").contains("pacegate creates"), "{}", said("writable.toml"));
    let missing = said("missing.toml");
    assert!(missing.contains("cannot be created there") && missing.contains("interception off"), "{missing}");
    assert!(!dir.path().join("nowhere").exists() && !dir.path().join("here/ca.pem").exists(), "check wrote");
}
