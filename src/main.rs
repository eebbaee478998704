//! The `pacegate` command: CLI, logging and runtime; the work is in the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pacegate::{app, config, tls};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

#[derive(Parser)]
#[command(version, about = "An HTTP proxy that keeps callers inside third-party API quotas")]
struct Cli {
    /// Config file [default: $PACEGATE_CONFIG when set and not empty, else
    /// config/pacegate.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format (default: pretty on a terminal, json otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and print one line per upstream.
    Check,
    /// The local CA that signs certificates for HTTPS interception.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new CA as DIR/ca.pem and DIR/ca-key.pem (never overwrites).
    Init {
        /// Directory for the two files.
        #[arg(long, default_value = "config")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Not clap's `env`: it takes a variable set but empty for a missing
    // `--config` value and refuses to start.
    let config = cli.config.unwrap_or_else(|| {
        let from_env = std::env::var_os("PACEGATE_CONFIG").filter(|path| !path.is_empty());
        from_env.map_or_else(|| PathBuf::from("config/pacegate.toml"), PathBuf::from)
    });
    match cli.command {
        Some(Command::Check) => check(&config),
        Some(Command::Ca { command: CaCommand::Init { out } }) => ca_init(&out),
        None => {
            init_logging(cli.log_format);
            run(&config)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    if config.mitm.enabled && tls::ca_missing(&config.mitm) {
        let (cert, key) = (config.mitm.ca_cert.display(), config.mitm.ca_key.display());
        match tls::can_create(&config.mitm) {
            Ok(()) => warn(&format!("[mitm]: no CA yet; pacegate creates {cert} and {key} when it starts")),
            Err(error) => warn(&format!(
                "[mitm]: no CA yet, and it cannot be created there ({error}): pacegate would start with \
                 interception off; create one with `pacegate ca init --out DIR` in a writable DIR and set \
                 [mitm] ca_cert and ca_key to its files, or set [mitm] enabled = false"
            )),
        }
    } else if let Err(error) = interception_ready(path, &config.mitm) {
        return fail(&error);
    }
    let described: String = config.upstreams.iter().map(|upstream| describe(upstream) + "\n").collect();
    print(&described)
}

fn ca_init(out: &Path) -> ExitCode {
    let (cert, key) = match tls::write_new_ca(out) {
        Ok(written) => written,
        Err(error) => return fail(&error),
    };
    let (cert, key) = (cert.display(), key.display());
    print(&format!(
        "wrote {cert} and {key} (keep the key private)

Trust the CA in the programs that use pacegate as HTTPS_PROXY, e.g.:
  export SSL_CERT_FILE={cert}        # OpenSSL-based tools, Go, Ruby
  export REQUESTS_CA_BUNDLE={cert}   # Python requests
  export NODE_EXTRA_CA_CERTS={cert}  # Node.js
  curl --cacert {cert} --proxy http://127.0.0.1:8080 https://api.github.com/zen
SSL_CERT_FILE replaces the system bundle: concatenate both if other hosts are needed.
Interception is on by default and uses ca.pem and ca-key.pem next to the
config file; for a CA elsewhere, set [mitm] ca_cert and ca_key.
"
    ))
}

/// Writes `text` to stdout: success, or failure when it cannot be written
/// (a closed pipe, where `println!` would panic).
fn print(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// A line on stderr, if it can be written.
fn warn(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Says what went wrong, and fails.
fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    warn(&error.to_string());
    ExitCode::FAILURE
}

/// Interception, when on, has a CA it can load; if not, the error points at
/// the key in the config file (`path`) that names the file at fault.
fn interception_ready(path: &Path, mitm: &config::Mitm) -> Result<(), config::ConfigError> {
    if !mitm.enabled {
        return Ok(());
    }
    tls::Interceptor::load(mitm).map(drop).map_err(|error| {
        let written_at = mitm.written_at;
        let location =
            if error.path() == Some(mitm.ca_key.as_path()) { written_at.ca_key } else { written_at.ca_cert };
        config::ConfigError::located(
            path,
            location,
            format!("[mitm] is enabled but its CA cannot be loaded: {error}"),
        )
    })
}

fn run(path: &Path) -> ExitCode {
    let mut config = match config::load(path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    // Before any socket is open: accepts past the soft limit would fail.
    if let Err(error) = pacegate::fds::raise_for(config.server.max_connections.get()) {
        tracing::warn!(%error, "cannot raise the open-files limit");
    }
    // Creates the CA on first start (or turns interception off), so that
    // a CA that exists but cannot be used stops pacegate here.
    tls::provision(&mut config.mitm);
    if let Err(error) = interception_ready(path, &config.mitm) {
        tracing::error!("{error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Before anything listens: a signal right after the `listening`
        // line (a script that reads it, then stops pacegate) is a graceful
        // shutdown, not the default action that kills it. SIGHUP's handler
        // too (tokio keeps a handler for the process once made): one that
        // comes before the watcher listens for it is dropped, not fatal.
        let shutdown = shutdown_signal();
        drop(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()));
        let listeners = app::Listeners::bind(&config).await?;
        let app = app::App::new(config, path.to_path_buf()).map_err(std::io::Error::other)?;
        app.run(listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "pacegate failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT; the handlers are in place once this
/// returns (inside the runtime), before the future is first polled.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// What the file watcher's crate logs unless `PACEGATE_LOG` names it.
const QUIET_WATCHER: &str = "notify=info";

fn init_logging(format: Option<LogFormat>) {
    let filter = log_filter(&std::env::var("PACEGATE_LOG").unwrap_or_default());
    let format =
        format.unwrap_or(if std::io::stderr().is_terminal() { LogFormat::Pretty } else { LogFormat::Json });
    // A log line that cannot be written (stderr a closed pipe: the log
    // shipper went away) is dropped: reporting it would panic, and take
    // the request or shutdown that logged it along.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

/// The filter `PACEGATE_LOG` asks for (`info` when empty or unreadable).
///
/// The config watcher's crate traces every change in the config's
/// directory: with a log file there, each line would trace the next. It is
/// held to info when the filter lets more through, unless the filter names
/// it; a filter that lets less through is left as it is.
fn log_filter(asked: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(asked).ok().filter(|_| !asked.trim().is_empty());
    let filter = filter.unwrap_or_else(|| EnvFilter::new("info"));
    let verbose = filter.max_level_hint().is_none_or(|max| max > LevelFilter::INFO);
    let names_watcher = asked.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or_default().trim();
        target == "notify" || target.starts_with("notify::")
    });
    if verbose && !names_watcher {
        return filter.add_directive(QUIET_WATCHER.parse().expect("a valid directive"));
    }
    filter
}

/// One line for `pacegate check`: name, where requests come from, every
/// quota (requests, tokens, endpoint limits), concurrency and queue, target.
fn describe(upstream: &config::Upstream) -> String {
    let route = upstream.route.as_deref().unwrap_or("-");
    let hosts = if upstream.hosts.is_empty() { "-".to_string() } else { upstream.hosts.join(",") };
    let rates = |rates: &[config::Rate]| rates.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut quotas = format!("rate={} burst={}", rates(&upstream.rate), upstream.burst);
    for (kind, quota) in upstream.tokens.iter().flat_map(|tokens| &tokens.quotas) {
        quotas += &format!(" {}={}", kind.name(), rates(quota));
    }
    for limit in &upstream.limits {
        quotas += &format!(" limit.{}={}", limit.name, rates(&limit.rate));
    }
    format!(
        "{} route={route} hosts={hosts} {quotas} max_concurrency={} queue_size={} -> {}://{}{}",
        upstream.name,
        upstream.max_concurrency,
        upstream.queue_size,
        upstream.base_url.scheme,
        upstream.base_url.authority,
        upstream.base_url.path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watcher_is_held_to_info_only_where_the_filter_lets_more_through() {
        let held = |asked: &str| log_filter(asked).to_string().contains(QUIET_WATCHER);
        for verbose in ["trace", "debug", "info,pacegate=trace", "trace,foo_notify=debug"] {
            assert!(held(verbose), "{verbose}");
        }
        for quiet in
            ["", "info", "warn", "off", "not a filter[", "trace,notify=trace", "debug,notify::inotify=off"]
        {
            assert!(!held(quiet), "{quiet:?}");
        }
        assert_eq!(log_filter("").to_string(), "info");
    }
}
