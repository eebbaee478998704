//! The `pacegate` command: CLI, logging and runtime; the work is in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pacegate::{app, config};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "An HTTP proxy that keeps callers inside third-party API quotas")]
struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "PACEGATE_CONFIG", default_value = "config/pacegate.toml")]
    config: PathBuf,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        None => {
            init_logging(cli.log_format);
            run(&cli.config)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            for upstream in &config.upstreams {
                println!("{}", describe(upstream));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = app::Listeners::bind(&config).await?;
        app::App::new(config, path.to_path_buf()).run(listeners, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "pacegate failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_env("PACEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format =
        format.unwrap_or(if std::io::stderr().is_terminal() { LogFormat::Pretty } else { LogFormat::Json });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

/// One line for `pacegate check`: name, where requests come from, quotas.
fn describe(upstream: &config::Upstream) -> String {
    let route = upstream.route.as_deref().unwrap_or("-");
    let hosts = if upstream.hosts.is_empty() { "-".to_string() } else { upstream.hosts.join(",") };
    let rates: Vec<String> = upstream.rate.iter().map(ToString::to_string).collect();
    format!(
        "{} route={route} hosts={hosts} rate={} burst={} max_concurrency={} queue_size={} -> {}://{}{}",
        upstream.name,
        rates.join(","),
        upstream.burst,
        upstream.max_concurrency,
        upstream.queue_size,
        upstream.base_url.scheme,
        upstream.base_url.authority,
        upstream.base_url.path,
    )
}
