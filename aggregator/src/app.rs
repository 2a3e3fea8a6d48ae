//! Start-up and shutdown: opens the stores in the right order, starts the indexer thread,
//! the listeners and the background tasks, and stops them all gracefully.
//!
//! Order matters for recovery: the index is opened first (it knows what it has applied), then
//! the relational store (soft deletes), then the WAL, whose unapplied tail is handed to dedup
//! and replayed by the indexer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alerts::evaluator::{ALERTS_CONSUMER, Evaluator, ForgetList};
use crate::alerts::manager::Manager;
use crate::alerts::notify::{Channels, Dispatcher};
use crate::alerts::{self, Alerting, RuleRegistry};
use crate::api::{self, AppState, SharedState};
use crate::auth::{TokenTable, load_or_create_admin_token};
use crate::config::Config;
use crate::db::Database;
use crate::index::indexer::{Indexer, IndexerOptions};
use crate::index::{IndexOptions, LogIndex};
use crate::ingest::dedup::{Dedup, SharedDedup};
use crate::ingest::listener::TlsHandshake;
use crate::ingest::{INDEX_CONSUMER, Ingest, IngestOptions};
use crate::listeners::{self, Limits, Plain};
use crate::wal::Wal;

/// Waits, ingest already closed, until every sink has delivered all the WAL holds, or until
/// `limit`: a replica whose disk goes with it (a Deployment's emptyDir) hands its entries to
/// the engines before it exits.
async fn drain_sinks(state: &SharedState, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let wal = state.ingest.wal().stats();
        let names: Vec<String> = state.sinks.lock().iter().map(|s| s.name.clone()).collect();
        let behind: u64 = wal
            .consumers
            .iter()
            .filter(|c| names.contains(&c.name))
            .map(|c| c.lag_entries)
            .sum();
        if behind == 0 {
            tracing::info!(
                sinks = names.len(),
                "every sink has delivered what the WAL holds"
            );
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                behind,
                "SHUTDOWN_DRAIN_SECONDS passed with entries not yet delivered: they are sent \
                 when this data directory starts again"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The engine `LOG_QUERY_BACKEND` names (the settings were checked at load).
fn query_backend(config: &Config) -> anyhow::Result<crate::read::QueryBackend> {
    use crate::read::QueryBackend;
    Ok(
        match (
            config.log_query_backend.as_str(),
            &config.loki_url,
            &config.elasticsearch_url,
        ) {
            ("loki", Some(url), _) => QueryBackend::Loki(
                crate::read::loki::LokiReader::new(config.loki_settings(url)?)
                    .context("the Loki query backend")?,
            ),
            ("elasticsearch", _, Some(url)) => QueryBackend::Elasticsearch(
                crate::read::elasticsearch::EsReader::new(config.elasticsearch_settings(url)?)
                    .context("the Elasticsearch query backend")?,
            ),
            _ => QueryBackend::Embedded,
        },
    )
}

/// The process-wide Prometheus recorder (one per process, however many apps a test starts).
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Everything the aggregator writes (WAL, store, SQLite, cursors, dead letters, snapshots)
/// holds log or audit content: readable and writable by its own user only, like the token.
fn restrict_file_modes() {
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// `DATA_DIR` itself closed to others, which also covers files an older version created 0644.
fn restrict_dir(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(error) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), %error, "cannot restrict DATA_DIR to its owner");
    }
}

/// A running aggregator.
pub struct Running {
    pub state: SharedState,
    /// Where the operator API listens.
    pub api_addr: SocketAddr,
    /// Where the separate metrics listener listens, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the agents' mTLS ingest listener listens.
    pub ingest_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    indexer_stop: Arc<AtomicBool>,
    indexer: Option<std::thread::JoinHandle<()>>,
    evaluator_stop: Arc<AtomicBool>,
    evaluator: Option<std::thread::JoinHandle<()>>,
    sinks_stop: Arc<AtomicBool>,
    sinks: Vec<std::thread::JoinHandle<()>>,
}

/// Opens everything and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.validate()?;
    logging_common::tls::install_crypto_provider();
    let config = Arc::new(config);
    restrict_file_modes();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create DATA_DIR {}", config.data_dir.display()))?;
    restrict_dir(&config.data_dir);
    let metrics = metrics_handle();

    let index = Arc::new(
        LogIndex::open(
            &config.data_dir.join("index"),
            IndexOptions {
                full_text: config.log_indexing_enabled,
                compression: config.log_compression_enabled,
            },
        )
        .context("cannot open the embedded index")?,
    );
    let db = Arc::new(
        Database::connect(
            &config.database_url(),
            config.database_pool_size,
            config.database_max_overflow,
        )
        .await
        .context("cannot open the relational store (DATABASE_URL)")?,
    );
    index.merge_hidden(db.deletions().await?);

    let dedup = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || Dedup::new(index)).await??
    };
    let dedup = Arc::new(parking_lot::Mutex::new(dedup));
    let (wal, recovered) = Wal::open(
        &config.data_dir.join("wal"),
        config.wal_segment_bytes,
        index.committed_lsn(),
        Box::new(SharedDedup(dedup.clone())),
    )
    .context("cannot open the write-ahead log")?;
    wal.set_disk_cap(config.wal_max_bytes);
    if recovered.truncated_bytes > 0 || !recovered.unapplied.is_empty() {
        tracing::info!(
            records = recovered.records,
            unapplied = recovered.unapplied.len(),
            truncated_bytes = recovered.truncated_bytes,
            "recovering from the write-ahead log"
        );
    }
    dedup.lock().add_unapplied(&recovered.unapplied);
    let wal = Arc::new(wal);

    let reader = wal.reader(INDEX_CONSUMER)?;
    index.publish_searchable(reader.position());
    let indexer_healthy = Arc::new(AtomicBool::new(true));
    let indexer_stop = Arc::new(AtomicBool::new(false));
    let indexer = Indexer::new(
        index.clone(),
        reader,
        IndexerOptions {
            refresh: config.refresh_interval(),
            threads: config.index_threads(),
            memory_bytes: config.index_writer_memory_mb << 20,
            retention_days: config.log_retention_days,
        },
        indexer_healthy.clone(),
    );
    let indexer = {
        let stop = indexer_stop.clone();
        std::thread::Builder::new()
            .name("indexer".into())
            .spawn(move || indexer.run(stop))?
    };

    // Alerting: its own WAL consumer, the lifecycle manager and the notification outbox.
    let registry = Arc::new(RuleRegistry::default());
    registry.replace(
        alerts::load_rules(&db, &config.alert_rules)
            .await
            .context("cannot load the alert rules")?,
    );
    // The broker: one connection for the audit trail's and the alerts' events here; the
    // `log.ingested` sink has its own, on its own thread.
    let broker = match &config.broker_url {
        Some(url) => {
            let settings = config.broker_settings(url)?;
            tracing::info!(kind = ?settings.kind, topic = %settings.topic, "broker events enabled");
            Some(Arc::new(crate::broker::Publisher::new(settings)))
        }
        None => None,
    };
    let channels = Arc::new(Channels::from_config(&config, broker.clone())?);
    let (evaluations, evaluations_rx) = tokio::sync::mpsc::channel(16);
    let (commands, commands_rx) = tokio::sync::mpsc::channel(64);
    let wake_dispatcher = Arc::new(tokio::sync::Notify::new());
    let forget = ForgetList::default();
    let manager = Manager::load(
        db.clone(),
        registry.clone(),
        config.alert_cooldown,
        channels.names(),
        wake_dispatcher.clone(),
        forget.clone(),
    )
    .await
    .context("cannot read the open alerts")?;
    let alerts_dir = config.data_dir.join("alerts");
    std::fs::create_dir_all(&alerts_dir)?;
    let evaluator = Evaluator::new(
        wal.reader(ALERTS_CONSUMER)?,
        registry.clone(),
        evaluations,
        Duration::from_secs(config.alert_check_interval),
        &alerts_dir,
        forget,
    );
    let evaluator_stop = Arc::new(AtomicBool::new(false));
    let evaluator = {
        let stop = evaluator_stop.clone();
        std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || evaluator.run(stop))?
    };
    // Sinks: each reads the WAL on its own thread, from its own cursor.
    let sink_statuses = crate::sinks::SinkStatuses::default();
    let sinks_stop = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    if let Some(url) = &config.loki_url {
        let settings = config.loki_settings(url)?;
        tracing::info!(url = %settings.push_url, "Loki sink enabled");
        let sink = crate::sinks::loki::LokiSink::new(settings).context("the Loki sink")?;
        sinks.push(crate::sinks::spawn(
            sink,
            &wal,
            &config.data_dir,
            sink_statuses.clone(),
            sinks_stop.clone(),
        )?);
    }
    if let Some(url) = &config.elasticsearch_url {
        let settings = config.elasticsearch_settings(url)?;
        tracing::info!(url = %settings.base, index = %settings.index, "Elasticsearch sink enabled");
        let sink = crate::sinks::elasticsearch::ElasticsearchSink::new(settings)
            .context("the Elasticsearch sink")?;
        sinks.push(crate::sinks::spawn(
            sink,
            &wal,
            &config.data_dir,
            sink_statuses.clone(),
            sinks_stop.clone(),
        )?);
    }
    if let Some(publisher) = &broker {
        sinks.push(crate::sinks::spawn(
            crate::broker::BrokerSink::new(publisher.settings().clone()),
            &wal,
            &config.data_dir,
            sink_statuses.clone(),
            sinks_stop.clone(),
        )?);
    }
    let alerting = Arc::new(Alerting {
        registry,
        commands: commands.clone(),
        channels: channels.names(),
    });

    let ingest = Arc::new(Ingest::new(
        wal.clone(),
        dedup,
        index.clone(),
        IngestOptions {
            max_entry_bytes: config.max_log_size,
            environment: config.environment.clone(),
            retention_days: config.log_retention_days,
            max_lag_bytes: config.ingest_max_lag_bytes,
            metrics_max_services: config.metrics_max_services,
        },
    ));

    let tokens = if config.log_access_control_enabled {
        let id_key = db
            .token_id_key()
            .await
            .context("cannot read the token id key from the relational store")?;
        Some(match &config.api_tokens {
            Some(spec) => {
                TokenTable::parse(spec, &id_key).map_err(|e| anyhow::anyhow!("API_TOKENS: {e}"))?
            }
            None => {
                let (token, created) = load_or_create_admin_token(&config.data_dir)?;
                let path = config.data_dir.join("admin-token");
                if created {
                    tracing::warn!(path = %path.display(),
                        "no API_TOKENS given: generated an admin token");
                } else {
                    tracing::info!(path = %path.display(), "using the generated admin token");
                }
                TokenTable::parse(&format!("admin:{token}"), &id_key)
                    .map_err(|e| anyhow::anyhow!(e))?
            }
        })
    } else {
        tracing::warn!(
            "LOG_ACCESS_CONTROL_ENABLED=false: the API is open to anyone who can reach it"
        );
        None
    };

    let reads = Arc::new(query_backend(&config)?);
    tracing::info!(backend = reads.name(), "reads answered by");
    let state: SharedState = Arc::new(AppState {
        reads,
        config: config.clone(),
        ingest,
        index: index.clone(),
        db: db.clone(),
        tokens,
        metrics,
        started: Instant::now(),
        indexer_healthy,
        alerts: alerting,
        sinks: sink_statuses,
        proxies: crate::api::client::TrustedProxies::parse(&config.trusted_proxies)
            .map_err(|e| anyhow::anyhow!("TRUSTED_PROXIES: {e}"))?,
    });

    // Certificates first: once the API answers, everything an agent needs exists.
    let tls = ingest_tls(&config)?;
    let (shutdown, _) = watch::channel(false);
    let mut servers = Vec::new();
    let api_listener =
        tokio::net::TcpListener::bind((config.bind_address.as_str(), config.service_port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} (SERVICE_PORT)",
                    config.bind_address, config.service_port
                )
            })?;
    let api_addr = api_listener.local_addr()?;
    let limits = connection_limits(&config);
    servers.push(listeners::serve(
        "api",
        api_listener,
        Plain,
        api::router(state.clone()),
        limits,
        shutdown.subscribe(),
    ));
    let ingest_tcp =
        tokio::net::TcpListener::bind((config.bind_address.as_str(), config.ingest_port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} (INGEST_PORT)",
                    config.bind_address, config.ingest_port
                )
            })?;
    let ingest_addr = ingest_tcp.local_addr()?;
    servers.push(listeners::serve(
        "ingest",
        ingest_tcp,
        TlsHandshake::new(Arc::new(tls)),
        api::ingest_router(state.clone()),
        limits,
        shutdown.subscribe(),
    ));
    let mut metrics_addr = None;
    if config.prometheus_enabled
        && config.prometheus_port != 0
        && config.prometheus_port != config.service_port
    {
        let listener =
            tokio::net::TcpListener::bind((config.bind_address.as_str(), config.prometheus_port))
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {}:{} (PROMETHEUS_PORT)",
                        config.bind_address, config.prometheus_port
                    )
                })?;
        metrics_addr = Some(listener.local_addr()?);
        servers.push(listeners::serve(
            "metrics",
            listener,
            Plain,
            api::metrics_router(state.clone()),
            limits,
            shutdown.subscribe(),
        ));
    }
    let metrics_listener = metrics_addr.map_or("none".to_string(), |a| a.to_string());
    tracing::info!(api = %api_addr, ingest = %ingest_addr, metrics = %metrics_listener, data_dir = %config.data_dir.display(),
        database = db.engine().name(), "logging aggregator started");

    let mut background = vec![
        tokio::spawn(manager.run(evaluations_rx, commands_rx, shutdown.subscribe())),
        tokio::spawn(
            Dispatcher {
                db: db.clone(),
                channels,
                wake: wake_dispatcher,
                commands,
            }
            .run(shutdown.subscribe()),
        ),
        tokio::spawn(update_gauges(state.clone(), shutdown.subscribe())),
        tokio::spawn(check_dependencies(state.clone(), shutdown.subscribe())),
        tokio::spawn(sync_deletions(state.clone(), shutdown.subscribe())),
        tokio::spawn(purge_expired_deletions(state.clone(), shutdown.subscribe())),
    ];
    if let Some(publisher) = broker
        && config.audit_log_enabled
    {
        let audit = crate::broker::AuditPublisher::new(db.clone(), publisher, &config.data_dir);
        let cursor = audit
            .start()
            .await
            .context("the broker's audit event cursor")?;
        background.push(tokio::spawn(audit.run(cursor, shutdown.subscribe())));
    }

    Ok(Running {
        state,
        api_addr,
        metrics_addr,
        ingest_addr,
        shutdown,
        servers,
        background,
        indexer_stop,
        indexer: Some(indexer),
        evaluator_stop,
        evaluator: Some(evaluator),
        sinks_stop,
        sinks,
    })
}

/// The ingest listener's TLS: the configured files, or development certificates generated
/// into `DATA_DIR/certs` on first start.
fn ingest_tls(config: &Config) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key, ca) = match (&config.tls_cert, &config.tls_key, &config.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => (cert.clone(), key.clone(), ca.clone()),
        _ => {
            let dir = config.data_dir.join("certs");
            let (paths, created) = crate::certs::development(&dir)
                .context("cannot generate development certificates")?;
            if created {
                tracing::warn!(dir = %dir.display(), ca = %paths.ca.display(), agent_cert = %paths.agent.display(),
                    agent_key = %paths.agent_key.display(),
                    "no TLS_* given: generated development certificates for the ingest listener");
            }
            (paths.server, paths.server_key, paths.ca)
        }
    };
    Ok(logging_common::tls::server_config(&cert, &key, &ca)?)
}

/// Each listener's limits, within what the process may open: three listeners at their
/// connection limit, plus files and outgoing connections, must fit under `RLIMIT_NOFILE`.
fn connection_limits(config: &Config) -> Limits {
    listeners::raise_open_files_limit();
    let mut limits = Limits::of(config);
    if let Some(open_files) = listeners::open_files_limit() {
        let reserve = 256;
        let fits = usize::try_from(open_files.saturating_sub(reserve) / 3).unwrap_or(usize::MAX);
        if limits.max_connections > fits {
            tracing::warn!(
                max_connections = limits.max_connections,
                open_files,
                using = fits.max(16),
                "MAX_CONNECTIONS is more than the open-files limit allows for three listeners"
            );
            limits.max_connections = fits.max(16);
        }
    }
    limits
}

/// Refreshes the gauges that describe sizes and lag.
/// How often a replica reading from a shared engine picks up deletions made on the others.
const DELETION_SYNC: Duration = Duration::from_secs(5);

/// With an external query backend, replicas share the engine and the relational store: a
/// deletion recorded by one is hidden by the others within [`DELETION_SYNC`].
async fn sync_deletions(state: SharedState, mut stop: watch::Receiver<bool>) {
    if matches!(*state.reads, crate::read::QueryBackend::Embedded) {
        return;
    }
    loop {
        if tokio::time::timeout(DELETION_SYNC, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
        match state.db.deletions().await {
            Ok(deleted) => {
                let added = state.index.merge_hidden(deleted);
                if added > 0 {
                    tracing::info!(added, "deletions made on other replicas are now hidden");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the deletions of other replicas"),
        }
    }
}

async fn update_gauges(state: SharedState, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(state.config.metrics_update_interval);
    loop {
        let wal = state.ingest.wal().stats();
        metrics::gauge!("logging_aggregator_wal_segments").set(wal.segments as f64);
        metrics::gauge!("logging_aggregator_wal_bytes").set(wal.bytes_on_disk as f64);
        for consumer in &wal.consumers {
            metrics::gauge!("logging_aggregator_consumer_lag_bytes", "consumer" => consumer.name.clone())
                .set(consumer.lag_bytes as f64);
            metrics::gauge!("logging_aggregator_consumer_lag_entries", "consumer" => consumer.name.clone())
                .set(consumer.lag_entries as f64);
        }
        let index = state.index.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || index.disk_bytes()).await {
            metrics::gauge!("logging_aggregator_index_bytes").set(bytes as f64);
        }
        metrics::gauge!("logging_aggregator_index_partitions").set(state.index.days().len() as f64);
        metrics::gauge!("logging_aggregator_ingest_rate_entries_per_second")
            .set(state.ingest.rate.per_second());
        if let Some(handle) = &state.metrics {
            handle.run_upkeep();
        }
        if tokio::time::timeout(period, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// Probes the dependencies in the background so their state is in `/metrics` even when
/// nobody calls `/health/ready`.
async fn check_dependencies(state: SharedState, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(state.config.health_check_interval);
    loop {
        let (ok, checks) = api::health::dependency_checks(&state).await;
        if !ok {
            tracing::warn!(%checks, "a dependency is down");
        }
        if tokio::time::timeout(period, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// Forgets soft deletes whose partitions retention has removed.
async fn purge_expired_deletions(state: SharedState, mut stop: watch::Receiver<bool>) {
    loop {
        if let Some(&oldest) = state.index.days().first()
            && let Err(error) = state.db.purge_deletions_before(oldest).await
        {
            tracing::warn!(%error, "cannot purge expired soft deletes");
        }
        if tokio::time::timeout(Duration::from_secs(3600), stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

impl Running {
    /// Stops accepting requests, lets in-flight ones finish, indexes and commits everything
    /// durable, and closes the stores.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for server in self.servers.drain(..) {
            let _ = server.await;
        }
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        let drain = Duration::from_secs(self.state.config.shutdown_drain_seconds);
        if !drain.is_zero() {
            drain_sinks(&self.state, drain).await;
        }
        // The evaluator writes its windows once more, so a restart resumes them exactly.
        self.evaluator_stop.store(true, Ordering::Release);
        if let Some(evaluator) = self.evaluator.take() {
            let _ = tokio::task::spawn_blocking(move || evaluator.join()).await;
        }
        self.sinks_stop.store(true, Ordering::Release);
        for sink in self.sinks.drain(..) {
            let _ = tokio::task::spawn_blocking(move || sink.join()).await;
        }
        self.indexer_stop.store(true, Ordering::Release);
        if let Some(indexer) = self.indexer.take() {
            let _ = tokio::task::spawn_blocking(move || indexer.join()).await;
        }
        self.state.db.close().await;
        tracing::info!("logging aggregator stopped");
    }
}
