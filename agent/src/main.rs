//! `logging-agent`: reads the configuration and runs the agent until SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Parser;
use logging_agent::app;
use logging_agent::config::Config;

/// The node agent: tails container logs, ships them to the aggregator over mTLS.
///
/// Every setting comes from the environment (or the YAML file); see the README.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// YAML configuration file; environment variables override it.
    #[arg(long, short, env = "CONFIG_FILE")]
    config: Option<PathBuf>,
}

async fn wait_for_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: flushing and stopping"),
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("logging-agent: configuration error: {error}");
            std::process::exit(2);
        }
    };
    let _telemetry = match logging_common::telemetry::init(
        "logging-agent",
        &config.log_level,
        &config.log_format,
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("logging-agent: configuration error: {error}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent")
        .build()?;
    runtime.block_on(async {
        let running = app::start(config).await?;
        wait_for_signal().await;
        running.shutdown(app::SHUTDOWN_GRACE).await;
        Ok(())
    })
}
