//! `logging-aggregator`: reads the configuration and runs the service until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use logging_aggregator::app;
use logging_aggregator::config::Config;
use tracing_subscriber::EnvFilter;

/// The central logging service: durable ingest, embedded log store, audit trail, operator API.
///
/// Every setting comes from the environment (or the YAML file); see the README's
/// configuration table.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// YAML configuration file; environment variables override it.
    #[arg(long, short, env = "CONFIG_FILE")]
    config: Option<PathBuf>,
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.log_format.as_str() {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aggregator-api")
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("logging-aggregator: configuration error: {error}");
            std::process::exit(2);
        }
    };
    init_logging(&config);
    let running = app::start(config).await?;
    wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}
