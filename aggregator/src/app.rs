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
    /// The OTLP/gRPC listener (`OTLP_GRPC_PORT`), when on.
    pub otlp_grpc_addr: Option<SocketAddr>,
    /// The Fluent forward listener (`FORWARD_PORT`), when on.
    pub forward_addr: Option<SocketAddr>,
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

/// Why the aggregator did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting cannot be used; nothing was opened (the binary exits with code 2).
    #[error("{0}")]
    Config(String),
    /// Something failed while opening or binding.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

fn config_error(error: impl std::fmt::Display) -> StartError {
    StartError::Config(error.to_string())
}

/// Opens everything and starts serving: a table of contents of the start-up, each step owned
/// by the subsystem it names.
pub async fn start(config: Config) -> Result<Running, StartError> {
    logging_common::tls::install_crypto_provider();
    // 1. Every setting checked, every client built: a bad one stops the start here, before
    //    the WAL, the store or the database is touched.
    let plan = Plan::check(&config)?;
    let config = Arc::new(config);
    // 2. The stores, in recovery order: index → relational store → dedup → WAL.
    let stores = Stores::open(&config).await?;
    // 3. The WAL's consumers: indexer, alert evaluator (and its manager), sinks.
    let consumers = Consumers::start(&config, &stores, plan.channels, plan.sinks).await?;
    // 4. What handlers share, access control included.
    let state = api_state(&config, &stores, &consumers, plan.reads, plan.proxies).await?;
    // 5. The listeners: operator API, agents' ingest, metrics.
    let (shutdown, _) = watch::channel(false);
    let listening = Listening::bind(&config, &state, &shutdown).await?;
    // 6. Background tasks.
    let background = background_tasks(
        &config,
        &state,
        &stores,
        consumers.manager,
        plan.broker,
        &shutdown,
    )
    .await?;
    Ok(Running {
        state,
        api_addr: listening.api_addr,
        metrics_addr: listening.metrics_addr,
        otlp_grpc_addr: listening.otlp_grpc_addr,
        forward_addr: listening.forward_addr,
        ingest_addr: listening.ingest_addr,
        shutdown,
        servers: listening.servers,
        background,
        indexer_stop: consumers.indexer_stop,
        indexer: Some(consumers.indexer),
        evaluator_stop: consumers.evaluator_stop,
        evaluator: Some(consumers.evaluator),
        sinks_stop: consumers.sinks_stop,
        sinks: consumers.sinks,
    })
}

/// One external store fed from the WAL, built and ready to be started.
enum SinkPlan {
    Loki(crate::sinks::loki::LokiSink),
    Elasticsearch(crate::sinks::elasticsearch::ElasticsearchSink),
    Broker(crate::broker::BrokerSink),
}

impl SinkPlan {
    fn spawn(
        self,
        wal: &Wal,
        data_dir: &std::path::Path,
        statuses: crate::sinks::SinkStatuses,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        match self {
            SinkPlan::Loki(sink) => crate::sinks::spawn(sink, wal, data_dir, statuses, stop),
            SinkPlan::Elasticsearch(sink) => {
                crate::sinks::spawn(sink, wal, data_dir, statuses, stop)
            }
            SinkPlan::Broker(sink) => crate::sinks::spawn(sink, wal, data_dir, statuses, stop),
        }
    }
}

/// What the configuration asks for, checked and built before anything is opened.
struct Plan {
    broker: Option<Arc<crate::broker::Publisher>>,
    channels: Arc<Channels>,
    sinks: Vec<SinkPlan>,
    reads: crate::read::QueryBackend,
    proxies: crate::api::client::TrustedProxies,
}

impl Plan {
    fn check(config: &Config) -> Result<Plan, StartError> {
        config.validate().map_err(config_error)?;
        // The broker: one connection (made on first use) for the audit trail's and the
        // alerts' events; the `log.ingested` sink has its own, on its own thread.
        let broker = match &config.broker_url {
            Some(url) => {
                let settings = config.broker_settings(url).map_err(config_error)?;
                tracing::info!(kind = ?settings.kind, topic = %settings.topic, "broker events enabled");
                Some(Arc::new(crate::broker::Publisher::new(settings)))
            }
            None => None,
        };
        let channels =
            Arc::new(Channels::from_config(config, broker.clone()).map_err(config_error)?);
        let mut sinks = Vec::new();
        if let Some(url) = &config.loki_url {
            let settings = config.loki_settings(url).map_err(config_error)?;
            tracing::info!(url = %settings.push_url, "Loki sink enabled");
            sinks.push(SinkPlan::Loki(
                crate::sinks::loki::LokiSink::new(settings).map_err(config_error)?,
            ));
        }
        if let Some(url) = &config.elasticsearch_url {
            let settings = config.elasticsearch_settings(url).map_err(config_error)?;
            tracing::info!(url = %settings.base, index = %settings.index, "Elasticsearch sink enabled");
            sinks.push(SinkPlan::Elasticsearch(
                crate::sinks::elasticsearch::ElasticsearchSink::new(settings)
                    .map_err(config_error)?,
            ));
        }
        if let Some(publisher) = &broker {
            sinks.push(SinkPlan::Broker(crate::broker::BrokerSink::new(
                publisher.settings().clone(),
            )));
        }
        let reads = query_backend(config).map_err(config_error)?;
        let proxies = crate::api::client::TrustedProxies::parse(&config.trusted_proxies)
            .map_err(|e| config_error(format!("TRUSTED_PROXIES: {e}")))?;
        if let (Some(cert), Some(key), Some(ca)) =
            (&config.tls_cert, &config.tls_key, &config.tls_client_ca)
        {
            logging_common::tls::server_config(cert, key, ca)
                .map_err(|e| config_error(format!("TLS_CERT, TLS_KEY, TLS_CLIENT_CA: {e}")))?;
        }
        Ok(Plan {
            broker,
            channels,
            sinks,
            reads,
            proxies,
        })
    }
}

/// The stores, opened in the order recovery needs: the index first (it knows what it has
/// applied), then the relational store (soft deletes), then the WAL, whose unapplied tail is
/// handed to dedup and replayed by the indexer.
struct Stores {
    index: Arc<LogIndex>,
    /// `ARCHIVE_URL`'s archive, when set.
    archive: Option<Arc<crate::archive::Archive>>,
    db: Arc<Database>,
    dedup: Arc<parking_lot::Mutex<Dedup>>,
    wal: Arc<Wal>,
}

impl Stores {
    async fn open(config: &Config) -> anyhow::Result<Stores> {
        restrict_file_modes();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create DATA_DIR {}", config.data_dir.display()))?;
        restrict_dir(&config.data_dir);
        let keyring = config.keyring()?;
        let index = Arc::new(
            LogIndex::open(
                &config.data_dir.join("index"),
                IndexOptions {
                    full_text: config.log_indexing_enabled,
                    compression: config.log_compression_enabled,
                    keyring: keyring.clone(),
                },
            )
            .context("cannot open the embedded index")?,
        );
        // Before the indexer runs: retention must know that archiving is on.
        let archive = match &config.archive_url {
            Some(_) => {
                let archive = crate::archive::Archive::new(config, index.clone())
                    .context("cannot set up the archive (ARCHIVE_URL)")?;
                // What it holds, so retention and the first answers know; an archive that
                // does not answer soon is read again by the first round instead.
                match tokio::time::timeout(Duration::from_secs(5), archive.load()).await {
                    Ok(Ok(days)) => tracing::info!(days, "archive listed"),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cannot list the archive yet; retrying in the background")
                    }
                    Err(_) => tracing::warn!(
                        "the archive did not answer within 5 s; retrying in the background"
                    ),
                }
                Some(Arc::new(archive))
            }
            None => None,
        };
        let db = Arc::new(
            Database::connect(
                &config.database_url(),
                config.database_pool_size,
                config.database_max_overflow,
            )
            .await
            .context("cannot open the relational store (DATABASE_URL)")?
            .with_keyring(keyring.clone()),
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
            keyring.clone(),
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
        Ok(Stores {
            index,
            archive,
            db,
            dedup,
            wal: Arc::new(wal),
        })
    }
}

/// The WAL's consumers, each on its own thread with its own cursor.
struct Consumers {
    indexer_healthy: Arc<AtomicBool>,
    indexer_stop: Arc<AtomicBool>,
    indexer: std::thread::JoinHandle<()>,
    alerting: Arc<Alerting>,
    manager: ManagerTasks,
    evaluator_stop: Arc<AtomicBool>,
    evaluator: std::thread::JoinHandle<()>,
    sink_statuses: crate::sinks::SinkStatuses,
    sinks_stop: Arc<AtomicBool>,
    sinks: Vec<std::thread::JoinHandle<()>>,
}

/// The alert lifecycle manager and the notification dispatcher, started with the
/// background tasks.
struct ManagerTasks {
    manager: Manager,
    dispatcher: Dispatcher,
    evaluations: tokio::sync::mpsc::Receiver<crate::alerts::evaluator::Evaluation>,
    commands: tokio::sync::mpsc::Receiver<crate::alerts::manager::Command>,
}

impl Consumers {
    async fn start(
        config: &Config,
        stores: &Stores,
        channels: Arc<Channels>,
        sinks: Vec<SinkPlan>,
    ) -> anyhow::Result<Consumers> {
        // The embedded index.
        let reader = stores.wal.applying_reader(INDEX_CONSUMER)?;
        stores.index.publish_searchable(reader.position());
        let indexer_healthy = Arc::new(AtomicBool::new(true));
        let indexer_stop = Arc::new(AtomicBool::new(false));
        let indexer = Indexer::new(
            stores.index.clone(),
            reader,
            IndexerOptions {
                refresh: config.refresh_interval(),
                flush_rows: crate::index::indexer::FLUSH_BLOCKS * crate::index::block::BLOCK_ROWS,
                flush_bytes: (config.index_writer_memory_mb as u64) << 20,
                retention_days: config.log_retention_days,
                write: crate::index::part::WriteOptions {
                    level: if config.log_compression_enabled {
                        crate::index::part::ZSTD_LEVEL
                    } else {
                        0
                    },
                    bloom: config.log_indexing_enabled,
                    threads: config.index_threads(),
                },
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
            alerts::load_rules(&stores.db, &config.alert_rules)
                .await
                .context("cannot load the alert rules")?,
        );
        let (evaluations, evaluations_rx) = tokio::sync::mpsc::channel(16);
        let (commands, commands_rx) = tokio::sync::mpsc::channel(64);
        let wake_dispatcher = Arc::new(tokio::sync::Notify::new());
        let forget = ForgetList::default();
        let manager = Manager::load(
            stores.db.clone(),
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
            stores.wal.reader(ALERTS_CONSUMER)?,
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
        let alerting = Arc::new(Alerting {
            registry,
            commands: commands.clone(),
            channels: channels.names(),
        });
        let dispatcher = Dispatcher {
            db: stores.db.clone(),
            channels,
            wake: wake_dispatcher,
            commands,
        };

        // Sinks: each reads the WAL on its own thread, from its own cursor.
        let sink_statuses = crate::sinks::SinkStatuses::default();
        let sinks_stop = Arc::new(AtomicBool::new(false));
        let sinks = sinks
            .into_iter()
            .map(|sink| {
                sink.spawn(
                    &stores.wal,
                    &config.data_dir,
                    sink_statuses.clone(),
                    sinks_stop.clone(),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Consumers {
            indexer_healthy,
            indexer_stop,
            indexer,
            alerting,
            manager: ManagerTasks {
                manager,
                dispatcher,
                evaluations: evaluations_rx,
                commands: commands_rx,
            },
            evaluator_stop,
            evaluator,
            sink_statuses,
            sinks_stop,
            sinks,
        })
    }
}

/// The tokens (`API_TOKENS`, or the generated admin token), or none when access control is
/// off.
async fn access_tokens(config: &Config, db: &Database) -> anyhow::Result<Option<TokenTable>> {
    if !config.log_access_control_enabled {
        tracing::warn!(
            "LOG_ACCESS_CONTROL_ENABLED=false: the API is open to anyone who can reach it"
        );
        return Ok(None);
    }
    let id_key = db
        .token_id_key()
        .await
        .context("cannot read the token id key from the relational store")?;
    Ok(Some(match &config.api_tokens {
        Some(spec) => {
            TokenTable::parse(spec, &id_key).map_err(|e| anyhow::anyhow!("API_TOKENS: {e}"))?
        }
        None => {
            let (token, created) = load_or_create_admin_token(&config.data_dir)?;
            let path = config.data_dir.join("admin-token");
            if created {
                tracing::warn!(path = %path.display(), "no API_TOKENS given: generated an admin token");
            } else {
                tracing::info!(path = %path.display(), "using the generated admin token");
            }
            TokenTable::parse(&format!("admin:{token}"), &id_key).map_err(|e| anyhow::anyhow!(e))?
        }
    }))
}

async fn api_state(
    config: &Arc<Config>,
    stores: &Stores,
    consumers: &Consumers,
    reads: crate::read::QueryBackend,
    proxies: crate::api::client::TrustedProxies,
) -> anyhow::Result<SharedState> {
    let ingest = Arc::new(Ingest::new(
        stores.wal.clone(),
        stores.dedup.clone(),
        stores.index.clone(),
        IngestOptions {
            max_entry_bytes: config.max_log_size,
            environment: config.environment.clone(),
            retention_days: config.log_retention_days,
            max_lag_bytes: config.ingest_max_lag_bytes,
            metrics_max_services: config.metrics_max_services,
            store_healthy: consumers.indexer_healthy.clone(),
        },
    ));
    tracing::info!(backend = reads.name(), "reads answered by");
    Ok(Arc::new(AppState {
        reads: Arc::new(reads),
        config: config.clone(),
        ingest,
        index: stores.index.clone(),
        db: stores.db.clone(),
        tokens: access_tokens(config, &stores.db).await?,
        metrics: metrics_handle(),
        started: Instant::now(),
        indexer_healthy: consumers.indexer_healthy.clone(),
        alerts: consumers.alerting.clone(),
        sinks: consumers.sink_statuses.clone(),
        proxies,
        client_setup: Default::default(),
        archive: stores.archive.clone(),
        query_cache: Arc::new(crate::api::cache::QueryCache::new(config.query_cache_bytes)),
    }))
}

/// The three listeners, bound and serving.
struct Listening {
    api_addr: SocketAddr,
    ingest_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    otlp_grpc_addr: Option<SocketAddr>,
    forward_addr: Option<SocketAddr>,
    servers: Vec<JoinHandle<()>>,
}

impl Listening {
    async fn bind(
        config: &Config,
        state: &SharedState,
        shutdown: &watch::Sender<bool>,
    ) -> anyhow::Result<Listening> {
        // Certificates first: once the API answers, everything an agent needs exists.
        let tls = ingest_tls(config)?;
        let limits = connection_limits(config);
        let bind = |port: u16, name: &'static str| async move {
            tokio::net::TcpListener::bind((config.bind_address.as_str(), port))
                .await
                .with_context(|| {
                    format!("cannot listen on {}:{port} ({name})", config.bind_address)
                })
        };
        let api = bind(config.service_port, "SERVICE_PORT").await?;
        let api_addr = api.local_addr()?;
        let ingest = bind(config.ingest_port, "INGEST_PORT").await?;
        let ingest_addr = ingest.local_addr()?;
        let mut servers = vec![
            listeners::serve(
                "api",
                api,
                Plain,
                api::router(state.clone()),
                limits,
                shutdown.subscribe(),
            ),
            listeners::serve(
                "ingest",
                ingest,
                TlsHandshake::new(Arc::new(tls)),
                api::ingest_router(state.clone()),
                limits,
                shutdown.subscribe(),
            ),
        ];
        let mut metrics_addr = None;
        if config.prometheus_enabled
            && config.prometheus_port != 0
            && config.prometheus_port != config.service_port
        {
            let listener = bind(config.prometheus_port, "PROMETHEUS_PORT").await?;
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
        let mut otlp_grpc_addr = None;
        if config.otlp_grpc_port != 0 {
            let listener = bind(config.otlp_grpc_port, "OTLP_GRPC_PORT").await?;
            otlp_grpc_addr = Some(listener.local_addr()?);
            servers.push(listeners::serve(
                "otlp_grpc",
                listener,
                Plain,
                api::otlp_grpc_router(state.clone()),
                Limits {
                    http2: true,
                    ..limits
                },
                shutdown.subscribe(),
            ));
        }
        let mut forward_addr = None;
        if config.forward_port != 0 {
            let listener = bind(config.forward_port, "FORWARD_PORT").await?;
            forward_addr = Some(listener.local_addr()?);
            servers.push(crate::forward::serve(
                listener,
                state.clone(),
                shutdown.subscribe(),
            ));
        }
        let metrics = metrics_addr.map_or("none".to_string(), |a| a.to_string());
        tracing::info!(api = %api_addr, ingest = %ingest_addr, metrics = %metrics,
            data_dir = %config.data_dir.display(), database = state.db.engine().name(),
            "logging aggregator started");
        Ok(Listening {
            api_addr,
            ingest_addr,
            metrics_addr,
            otlp_grpc_addr,
            forward_addr,
            servers,
        })
    }
}

async fn background_tasks(
    config: &Config,
    state: &SharedState,
    stores: &Stores,
    alerting: ManagerTasks,
    broker: Option<Arc<crate::broker::Publisher>>,
    shutdown: &watch::Sender<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut background = vec![
        tokio::spawn(alerting.manager.run(
            alerting.evaluations,
            alerting.commands,
            shutdown.subscribe(),
        )),
        tokio::spawn(alerting.dispatcher.run(shutdown.subscribe())),
        tokio::spawn(update_gauges(state.clone(), shutdown.subscribe())),
        tokio::spawn(check_dependencies(state.clone(), shutdown.subscribe())),
        tokio::spawn(sync_deletions(state.clone(), shutdown.subscribe())),
        tokio::spawn(purge_expired_deletions(state.clone(), shutdown.subscribe())),
    ];
    if let Some(archive) = &stores.archive {
        background.push(tokio::spawn(archive.clone().run(shutdown.subscribe())));
    }
    if let Some(publisher) = broker
        && config.audit_log_enabled
    {
        let audit =
            crate::broker::AuditPublisher::new(stores.db.clone(), publisher, &config.data_dir);
        let cursor = audit
            .start()
            .await
            .context("the broker's audit event cursor")?;
        background.push(tokio::spawn(audit.run(cursor, shutdown.subscribe())));
    }
    Ok(background)
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
