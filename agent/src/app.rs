//! Start-up and shutdown of the agent: checkpoints, the TLS client, the file pipeline thread,
//! the shipper, inotify, the socket inputs, `/metrics` and `/health`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::discover::Discovery;
use crate::entry::Encoder;
use crate::parsers::Parsers;
use crate::redact::Redactor;
use crate::ship::{ShipState, Shipper};
use crate::sockets;
use crate::spool::Spool;
use crate::tailer::{Tailer, TailerOptions, Wake};

fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// How long SIGTERM waits for the last batches to be acknowledged. The DaemonSet's
/// termination grace period must be longer (a test holds it to that).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// A running agent.
pub struct Running {
    pub metrics_addr: SocketAddr,
    pub sockets: SocketAddrs,
    stop: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tailer: Option<std::thread::JoinHandle<()>>,
    shipper: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    checkpoints: Arc<Checkpoints>,
    _watcher: Option<notify::RecommendedWatcher>,
}

struct HealthState {
    started: Instant,
    ship: Arc<ShipState>,
    metrics: Option<PrometheusHandle>,
    node: String,
}

/// The HTTP client for the aggregator: mTLS when the URL is https.
fn client(config: &Config) -> anyhow::Result<reqwest::Client> {
    logging_common::tls::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        // Below the aggregator's HTTP_HEADER_TIMEOUT (10 s), which closes idle connections:
        // the agent drops an idle one first, instead of sending into one being closed.
        .pool_idle_timeout(Duration::from_secs(5));
    let builder = match (&config.tls_ca, &config.tls_cert, &config.tls_key) {
        (Some(ca), Some(cert), Some(key)) => {
            builder.tls_backend_preconfigured(logging_common::tls::client_config(ca, cert, key)?)
        }
        _ => builder,
    };
    Ok(builder.build()?)
}

/// Starts every part of the agent.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.validate()?;
    let metrics = metrics_handle();
    std::fs::create_dir_all(&config.agent_data_dir).with_context(|| {
        format!(
            "cannot create AGENT_DATA_DIR {}",
            config.agent_data_dir.display()
        )
    })?;
    let keyring = config.keyring()?;
    let checkpoints = Arc::new(Checkpoints::load(&config.agent_data_dir, keyring.clone())?);
    let ship_state = Arc::new(ShipState::default());
    let node = config.node();

    let shipper = Arc::new(Shipper {
        client: client(&config)?,
        url: format!("{}/v1/ingest", config.aggregator_url.trim_end_matches('/')),
        checkpoints: checkpoints.clone(),
        state: ship_state.clone(),
        dead_letter: config.agent_data_dir.join("dead-letter.ndjson"),
        keyring: keyring.clone(),
    });
    let (batches, batch_queue) = mpsc::channel(4);
    let shipper = tokio::spawn(shipper.run(batch_queue));

    // Socket input goes through the spool, which the file pipeline tails.
    let sockets_on = config.agent_syslog_udp.is_some()
        || config.agent_syslog_tcp.is_some()
        || config.agent_socket.is_some();
    let spool_dir = config.agent_data_dir.join("spool");
    let mut paths = config.agent_paths.clone();
    let spool = if sockets_on {
        paths.push(Spool::pattern(&spool_dir));
        Some(Arc::new(Spool::new(
            &spool_dir,
            config.agent_spool_max_bytes,
            checkpoints.clone(),
            keyring.clone(),
        )?))
    } else {
        None
    };
    let symlink_roots: Vec<PathBuf> = config
        .agent_symlink_roots
        .iter()
        .map(PathBuf::from)
        .collect();
    let discovery = Discovery::new(&paths, &config.agent_exclude, &symlink_roots);
    let (wake, woken) = std_mpsc::channel();
    let watcher = watch_roots(&discovery, wake);
    let tailer = Tailer::new(
        TailerOptions {
            node: node.clone(),
            batch_entries: config.log_batch_size,
            batch_bytes: config.agent_batch_bytes,
            batch_timeout: config.batch_timeout(),
            max_in_flight_bytes: config.agent_max_in_flight_bytes,
            max_line: config.max_log_size,
            rescan: Duration::from_millis(config.agent_rescan_interval_ms),
            spool_dir: spool.as_ref().map(|_| spool_dir.clone()),
            spool_keyring: keyring.clone(),
            parsers: Arc::new(Parsers::new(&config.agent_parsers)?),
        },
        discovery,
        Encoder::new(
            Redactor::new(&config.agent_redact_patterns)?,
            config.max_log_size,
        ),
        checkpoints.clone(),
        ship_state.clone(),
        batches,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tailer = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tailer".into())
            .spawn(move || tailer.run(woken, stop))?
    };

    let (shutdown, _) = watch::channel(false);
    let mut tasks = Vec::new();
    let health = Arc::new(HealthState {
        started: Instant::now(),
        ship: ship_state.clone(),
        metrics,
        node: node.clone(),
    });
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.agent_metrics_port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on port {} (AGENT_METRICS_PORT)",
                config.agent_metrics_port
            )
        })?;
    let metrics_addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/health", get(health_endpoint))
        .with_state(health);
    let mut stop_http = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_http.wait_for(|s| *s).await;
            })
            .await;
    }));
    tasks.push(tokio::spawn(persist_checkpoints(
        checkpoints.clone(),
        shutdown.subscribe(),
    )));
    let mut socket_addrs = SocketAddrs::default();
    let max_message = sockets::max_message(config.max_log_size);
    if let Some(spool) = &spool {
        if let Some(address) = &config.agent_syslog_udp {
            let (task, addr) =
                sockets::udp(address, spool.clone(), max_message, shutdown.subscribe())
                    .await
                    .with_context(|| format!("cannot listen on {address} (AGENT_SYSLOG_UDP)"))?;
            tasks.push(task);
            socket_addrs.syslog_udp = Some(addr);
        }
        if let Some(address) = &config.agent_syslog_tcp {
            let (task, addr) =
                sockets::tcp(address, spool.clone(), max_message, shutdown.subscribe())
                    .await
                    .with_context(|| format!("cannot listen on {address} (AGENT_SYSLOG_TCP)"))?;
            tasks.push(task);
            socket_addrs.syslog_tcp = Some(addr);
        }
        if let Some(path) = &config.agent_socket {
            tasks.push(
                sockets::unix(path, spool.clone(), max_message, shutdown.subscribe())
                    .await
                    .with_context(|| {
                        format!("cannot listen on {} (AGENT_SOCKET)", path.display())
                    })?,
            );
        }
        tasks.push(tokio::spawn(trim_spool(
            spool.clone(),
            shutdown.subscribe(),
        )));
    }
    tracing::info!(node = %node, aggregator = %config.aggregator_url, metrics = %metrics_addr,
        paths = ?config.agent_paths, "logging agent started");
    Ok(Running {
        metrics_addr,
        sockets: socket_addrs,
        stop,
        shutdown,
        tailer: Some(tailer),
        shipper: Some(shipper),
        tasks,
        checkpoints,
        _watcher: watcher,
    })
}

/// One recursive inotify watch per glob root. Growth wakes the tailer to read; files
/// appearing, moving or vanishing (or a lost-events overflow) make it rescan. Opens and reads
/// are ignored: the rescan itself opens the watched directories, and waking on that would
/// spin.
fn watch_roots(
    discovery: &Discovery,
    wake: std_mpsc::Sender<Wake>,
) -> Option<notify::RecommendedWatcher> {
    use notify::EventKind;
    use notify::event::ModifyKind;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let reason = match event.map(|e| e.kind) {
            Ok(EventKind::Access(_)) => return,
            Ok(EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_))) => Wake::Data,
            Ok(_) | Err(_) => Wake::Layout,
        };
        let _ = wake.send(reason);
    })
    .map_err(|error| tracing::warn!(%error, "no inotify; relying on rescans"))
    .ok()?;
    for root in discovery.roots() {
        if let Err(error) = watcher.watch(&root, RecursiveMode::Recursive) {
            tracing::warn!(dir = %root.display(), %error, "cannot watch; relying on rescans");
        }
    }
    Some(watcher)
}

/// Deletes acknowledged spool files and keeps the spool under its cap.
async fn trim_spool(spool: Arc<Spool>, mut stop: watch::Receiver<bool>) {
    loop {
        let stopping = tokio::time::timeout(Duration::from_secs(2), stop.wait_for(|s| *s))
            .await
            .is_ok();
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.trim()).await;
        if stopping {
            return;
        }
    }
}

/// Where the socket inputs listen (useful when configured with port 0).
#[derive(Clone, Debug, Default)]
pub struct SocketAddrs {
    pub syslog_udp: Option<SocketAddr>,
    pub syslog_tcp: Option<SocketAddr>,
}

/// Writes acknowledged positions to disk at most once a second.
async fn persist_checkpoints(checkpoints: Arc<Checkpoints>, mut stop: watch::Receiver<bool>) {
    loop {
        let stopping = tokio::time::timeout(Duration::from_secs(1), stop.wait_for(|s| *s))
            .await
            .is_ok();
        let store = checkpoints.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || store.persist()).await {
            tracing::error!(%error, "cannot write checkpoints");
        }
        if stopping {
            return;
        }
    }
}

async fn metrics_endpoint(State(state): State<Arc<HealthState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn health_endpoint(State(state): State<Arc<HealthState>>) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "node": state.node,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "in_flight_bytes": state.ship.in_flight_bytes.load(Ordering::Acquire),
        "last_acknowledged_at": state.ship.last_ack.load(Ordering::Acquire),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl Running {
    /// Stops reading, sends what is whole, waits (up to `grace`) for acknowledgements, and
    /// writes the checkpoints.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.store(true, Ordering::Release);
        if let Some(tailer) = self.tailer.take() {
            let _ = tokio::task::spawn_blocking(move || tailer.join()).await;
        }
        if let Some(shipper) = self.shipper.take()
            && tokio::time::timeout(grace, shipper).await.is_err()
        {
            tracing::warn!(
                "the aggregator did not acknowledge everything within the grace period; the rest is re-sent on the next start"
            );
        }
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Err(error) = self.checkpoints.persist() {
            tracing::error!(%error, "cannot write checkpoints");
        }
        tracing::info!("logging agent stopped");
    }
}
