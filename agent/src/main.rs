//! `logging-agent`: reads the configuration and runs the agent until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use logging_agent::app;
use logging_agent::config::Config;
use tracing_subscriber::EnvFilter;

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
    init_logging(&config);
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
