//! `logging-aggregator`: reads the configuration and runs the service until SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Parser;
use logging_aggregator::app;
use logging_aggregator::config::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Write development certificates for the agent ↔ aggregator mTLS link: ca.pem,
    /// server.pem, server-key.pem, agent.pem, agent-key.pem (and ca-key.pem).
    Certs {
        /// Directory to write them into.
        #[arg(long)]
        out: PathBuf,
        /// Names the server certificate is valid for (repeat the flag).
        #[arg(long = "server-name", default_values_t = logging_aggregator::certs::SERVER_NAMES.map(String::from))]
        server_names: Vec<String>,
        /// The agent certificate's common name (the agent's identity).
        #[arg(long, default_value = "logging-agent")]
        agent_name: String,
    },
    /// Print the admin token the aggregator generated in DATA_DIR on its first start (when
    /// API_TOKENS is unset), for containers without a shell:
    /// `kubectl exec logging-aggregator-0 -- logging-aggregator admin-token`.
    AdminToken,
    /// Print the plaintext of a file the aggregator sealed (encryption at rest): a sink's
    /// dead-letter file or the alert windows, with the keys of LOG_ENCRYPTION_KEY_FILE.
    Decrypt {
        /// The file.
        file: PathBuf,
    },
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

/// Writes the plaintext of `file` to stdout: one sealed whole, or records appended.
fn decrypt(config: &Config, file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use logging_common::crypto;
    use std::io::Write;
    let keyring = config.keyring()?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let plain = match crypto::open(keyring.as_deref(), &bytes) {
        Ok(plain) => plain.into_owned(),
        Err(_) => crypto::open_appended(keyring.as_deref(), &bytes)
            .with_context(|| format!("cannot decrypt {}", file.display()))?,
    };
    std::io::stdout().write_all(&plain)?;
    Ok(())
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
    if let Some(Command::Certs {
        out,
        server_names,
        agent_name,
    }) = &cli.command
    {
        let paths = logging_aggregator::certs::generate(out, server_names, agent_name)?;
        for path in [
            &paths.ca,
            &paths.server,
            &paths.server_key,
            &paths.agent,
            &paths.agent_key,
        ] {
            println!("{}", path.display());
        }
        return Ok(());
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("logging-aggregator: configuration error: {error}");
            std::process::exit(2);
        }
    };
    if let Some(Command::AdminToken) = cli.command {
        let path = config.data_dir.join("admin-token");
        match std::fs::read_to_string(&path) {
            Ok(token) => println!("{}", token.trim()),
            Err(error) => {
                eprintln!(
                    "logging-aggregator: no generated admin token at {} ({error}); it is written on the first start without API_TOKENS",
                    path.display()
                );
                std::process::exit(1);
            }
        }
        return Ok(());
    }
    if let Some(Command::Decrypt { file }) = &cli.command {
        return decrypt(&config, file);
    }
    let _telemetry = match logging_common::telemetry::init(
        "logging-aggregator",
        &config.log_level,
        &config.log_format,
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("logging-aggregator: configuration error: {error}");
            std::process::exit(2);
        }
    };
    let running = match app::start(config).await {
        Ok(running) => running,
        Err(app::StartError::Config(error)) => {
            eprintln!("logging-aggregator: configuration error: {error}");
            std::process::exit(2);
        }
        Err(app::StartError::Failed(error)) => return Err(error),
    };
    wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}
