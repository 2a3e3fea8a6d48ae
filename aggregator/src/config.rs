//! The aggregator's configuration: one typed struct, loaded once from defaults, an optional
//! YAML file and the environment (environment wins), and validated at start-up.
//!
//! Each field's YAML key is its name; its environment variable is the name in upper case.
//! The README's configuration table is checked against this struct by a test.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alerts::rules::{RuleSpec, default_rules};
use crate::auth::TokenTable;

/// Every setting of the aggregator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // --- the seed's variables ---
    /// Name reported by `/health` and in the aggregator's own logs.
    pub service_name: String,
    /// Port of the operator API (REST, `/health`, `/metrics`).
    pub service_port: u16,
    /// The aggregator's own log level (`trace` … `error`, or a tracing filter directive).
    pub log_level: String,
    /// Written into `environment` of entries that do not name one.
    pub environment: Option<String>,
    /// Relational store: `sqlite://…` or `postgres://…`; SQLite in `DATA_DIR` when unset.
    pub database_url: Option<String>,
    /// Connections the pool keeps open.
    pub database_pool_size: u32,
    /// Extra connections the pool may open under load.
    pub database_max_overflow: u32,
    /// Entries older than this many days are dropped, a whole day partition at a time.
    pub log_retention_days: u32,
    /// Where day partitions are archived: `s3://bucket/prefix` (AWS_* variables) or
    /// `file:///path`; unset = no archive.
    pub archive_url: Option<String>,
    /// Days after which a day partition is archived (and then dropped locally).
    pub archive_after_days: u32,
    /// Days the archive keeps a day; 0 = for ever.
    pub archive_retention_days: u32,
    /// Seconds between archive rounds.
    pub archive_interval: u64,
    /// Memory for cached analytics answers over past days; 0 = no cache.
    pub query_cache_bytes: usize,
    /// Largest accepted entry, in bytes of its JSON.
    pub max_log_size: usize,
    /// Compress the embedded store's documents (zstd).
    pub log_compression_enabled: bool,
    /// Index messages for full-text search; without it `q` is refused.
    pub log_indexing_enabled: bool,
    /// Require bearer tokens on the API.
    pub log_access_control_enabled: bool,
    /// Serve the audit trail and record operator actions (deletes) in it.
    pub audit_log_enabled: bool,
    /// Serve Prometheus metrics.
    pub prometheus_enabled: bool,
    /// A second listener serving only `/metrics`; 0 = none (metrics stay on `SERVICE_PORT`).
    pub prometheus_port: u16,
    /// Seconds between background dependency checks (`logging_aggregator_dependency_up`).
    pub health_check_interval: u64,
    /// Seconds between refreshes of the gauges (store size, WAL size, lag).
    pub metrics_update_interval: u64,
    /// Processing threads of the embedded index writer; 0 = one per core.
    pub log_processing_workers: usize,
    /// Encryption at rest of everything under `DATA_DIR` that holds log or audit content.
    pub log_encryption_enabled: bool,
    /// The encryption keys (base64, one a line; the first encrypts, all decrypt).
    pub log_encryption_key_file: Option<PathBuf>,
    /// The same keys inline (comma-separated), when no file is given.
    pub log_encryption_key: Option<String>,
    /// Loki sink: Loki's base URL (`/loki/api/v1/push` is appended); unset = no Loki sink.
    pub loki_url: Option<String>,
    /// Loki tenant (`X-Scope-OrgID`), for the Loki sink.
    pub loki_tenant_id: Option<String>,
    /// Static labels added to every Loki stream, `name=value,…` (e.g. `cluster=prod`; at most 10).
    pub loki_labels: Vec<String>,
    /// Loki push encoding: `protobuf` (snappy, as Promtail sends) or `json`.
    pub loki_format: String,
    /// Elasticsearch sink: the cluster's base URL; unset = no Elasticsearch sink.
    pub elasticsearch_url: Option<String>,
    /// Daily indices are `<index>-YYYY.MM.DD`; with `ELASTICSEARCH_DATA_STREAM`, the data stream.
    pub elasticsearch_index: String,
    /// Write to the data stream `ELASTICSEARCH_INDEX` instead of daily indices.
    pub elasticsearch_data_stream: bool,
    /// Basic authentication for Elasticsearch (with `ELASTICSEARCH_PASSWORD`).
    pub elasticsearch_username: Option<String>,
    pub elasticsearch_password: Option<String>,
    /// An Elasticsearch API key, encoded as Elasticsearch returns it (`base64(id:key)`).
    pub elasticsearch_api_key: Option<String>,
    /// A CA (PEM) to trust for Elasticsearch, besides the system's.
    pub elasticsearch_ca_cert: Option<PathBuf>,
    /// On shutdown, seconds to wait (ingest closed) for every sink to deliver what the WAL
    /// holds before stopping; 0 = stop at once (the WAL keeps the rest for the next start).
    pub shutdown_drain_seconds: u64,
    /// Which engine answers `/api/logs`, `/api/logs/{id}`, `/api/search` and `/api/analytics`:
    /// `embedded`, `elasticsearch` (needs `ELASTICSEARCH_URL`) or `loki` (needs `LOKI_URL`).
    pub log_query_backend: String,
    /// Message broker: `nats://host:4222` (JetStream) or `amqp://user:pass@host:5672/%2f`
    /// (RabbitMQ); unset = no events published.
    pub broker_url: Option<String>,
    /// NATS subject prefix (`<topic>.log.ingested`…) or RabbitMQ topic exchange.
    pub broker_topic: String,
    /// Tries per publish before the event waits for a later round (it is never dropped).
    pub broker_retry_attempts: u32,
    /// Milliseconds between those tries.
    pub broker_retry_delay: u64,
    /// Seconds between evaluations of the alert rules (at least 1).
    pub alert_check_interval: u64,
    /// Seconds after an alert resolves before the same rule and group may fire again.
    pub alert_cooldown: u64,
    /// Where alerts are sent: webhook, slack, alertmanager, email, sms (comma-separated).
    pub alert_notification_channels: Vec<String>,

    // --- docs/design.md §8 ---
    /// Data directory: WAL, embedded index, SQLite database, generated admin token.
    pub data_dir: PathBuf,
    /// API tokens, `role:token,…` with role reader, writer or admin.
    pub api_tokens: Option<String>,
    /// Port of the agents' mTLS ingest listener (`POST /v1/ingest`).
    pub ingest_port: u16,
    /// Port of the OTLP/gRPC logs listener (`LogsService/Export`, HTTP/2 cleartext); 0 = off.
    pub otlp_grpc_port: u16,
    /// Port of the Fluent forward listener (Fluent Bit, Fluentd, Docker's fluentd driver);
    /// 0 = off.
    pub forward_port: u16,
    /// The forward protocol's `shared_key`: when set, clients must pass its handshake.
    pub forward_shared_key: Option<String>,
    /// The ingest listener's certificate (PEM); development certificates when unset.
    pub tls_cert: Option<PathBuf>,
    /// The ingest listener's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA that agents' client certificates must chain to (PEM).
    pub tls_client_ca: Option<PathBuf>,

    // --- this implementation ---
    /// Address the listeners bind to.
    pub bind_address: String,
    /// Milliseconds between index refreshes (how soon an entry becomes searchable).
    pub index_refresh_interval_ms: u64,
    /// Memory budget of the index writer, in MiB.
    pub index_writer_memory_mb: usize,
    /// A WAL segment is closed and a new one started past this size.
    pub wal_segment_bytes: u64,
    /// Most bytes the WAL keeps for sinks that fall behind (0 = no cap); past it a sink skips
    /// its oldest undelivered entries (counted). The index and alerts are never skipped.
    pub wal_max_bytes: u64,
    /// When the index lags the WAL by more than this many bytes, writes wait, then get 429.
    pub ingest_max_lag_bytes: u64,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// Most entries one request may carry (`POST /api/logs` arrays, `/v1/ingest` lines); a
    /// larger request is refused with 413 before its entries are read.
    pub max_batch_entries: usize,
    /// Most connections each listener keeps open at once; past it a new connection is
    /// answered 503 and closed, so one listener cannot starve the others of descriptors.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and the longest an idle keep-alive
    /// connection stays open.
    pub http_header_timeout: u64,
    /// Seconds a client has to send a request's whole body.
    pub http_body_timeout: u64,
    /// Proxies whose `X-Forwarded-For` is believed (CIDRs, comma-separated); from anyone else
    /// the header is ignored and the connection's own address is recorded.
    pub trusted_proxies: Vec<String>,
    /// Services that get their own series in `/metrics`; entries of further services are
    /// counted under `service="other"`.
    pub metrics_max_services: usize,
    /// The aggregator's own log format: `json`, `text`, or `auto` (text on a terminal).
    pub log_format: String,

    // --- alerting (beyond the seed's three variables) ---
    /// Rules from the configuration (YAML list; as an environment variable, a JSON array).
    /// The default is the seed's four patterns; `[]` turns them off.
    pub alert_rules: Vec<RuleSpec>,
    /// `webhook` channel: where the JSON body is POSTed.
    pub alert_webhook_url: Option<String>,
    /// `slack` channel: a Slack (or Mattermost, Rocket.Chat…) incoming-webhook URL.
    pub alert_slack_webhook_url: Option<String>,
    /// `alertmanager` channel: Alertmanager's base URL (`/api/v2/alerts` is appended).
    pub alertmanager_url: Option<String>,
    /// `email` channel: `smtp://user:password@host:587` (STARTTLS required) or `smtps://…`.
    pub alert_smtp_url: Option<String>,
    /// Extra CA (PEM) to trust for the SMTP server, besides the system's.
    pub alert_smtp_ca: Option<PathBuf>,
    pub alert_email_from: Option<String>,
    /// Recipients, comma-separated.
    pub alert_email_to: Vec<String>,
    /// `sms` channel: the provider's HTTP endpoint (POST; basic auth in the URL if needed).
    pub alert_sms_url: Option<String>,
    /// Phone numbers, comma-separated; one request each.
    pub alert_sms_to: Vec<String>,
    /// Bearer token for the SMS provider, if it takes one.
    pub alert_sms_token: Option<String>,
    /// The request body, with `{to}` and `{message}`: JSON if it starts with `{`, otherwise
    /// form-encoded (e.g. `To={to}&From=+15550100&Body={message}`).
    pub alert_sms_body: String,
    /// This aggregator's address as operators reach it, for links in notifications.
    pub alert_external_url: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            service_name: "logging-service".into(),
            service_port: 8000,
            log_level: "info".into(),
            environment: None,
            database_url: None,
            database_pool_size: 10,
            database_max_overflow: 20,
            log_retention_days: 30,
            archive_url: None,
            archive_after_days: 7,
            archive_retention_days: 0,
            archive_interval: 3600,
            query_cache_bytes: 64 << 20,
            max_log_size: 1_048_576,
            log_compression_enabled: true,
            log_indexing_enabled: true,
            log_access_control_enabled: true,
            audit_log_enabled: true,
            prometheus_enabled: true,
            prometheus_port: 9090,
            health_check_interval: 30,
            metrics_update_interval: 10,
            log_processing_workers: 0,
            log_encryption_enabled: false,
            log_encryption_key_file: None,
            log_encryption_key: None,
            loki_url: None,
            loki_tenant_id: None,
            loki_labels: Vec::new(),
            loki_format: "protobuf".into(),
            elasticsearch_url: None,
            log_query_backend: "embedded".into(),
            shutdown_drain_seconds: 0,
            elasticsearch_index: "logs".into(),
            elasticsearch_data_stream: false,
            elasticsearch_username: None,
            elasticsearch_password: None,
            elasticsearch_api_key: None,
            elasticsearch_ca_cert: None,
            broker_url: None,
            broker_topic: "logs".into(),
            broker_retry_attempts: 3,
            broker_retry_delay: 1000,
            alert_check_interval: 60,
            alert_cooldown: 300,
            alert_notification_channels: Vec::new(),
            data_dir: PathBuf::from("./data"),
            api_tokens: None,
            ingest_port: 8443,
            otlp_grpc_port: 4317,
            forward_port: 24224,
            forward_shared_key: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            bind_address: "0.0.0.0".into(),
            index_refresh_interval_ms: 1000,
            index_writer_memory_mb: 128,
            wal_segment_bytes: 64 * 1024 * 1024,
            wal_max_bytes: 8 * 1024 * 1024 * 1024,
            ingest_max_lag_bytes: 32 * 1024 * 1024,
            max_request_bytes: 64 * 1024 * 1024,
            max_batch_entries: 10_000,
            max_connections: 1024,
            http_header_timeout: 10,
            http_body_timeout: 60,
            trusted_proxies: Vec::new(),
            metrics_max_services: 200,
            log_format: "auto".into(),
            alert_rules: default_rules(),
            alert_webhook_url: None,
            alert_slack_webhook_url: None,
            alertmanager_url: None,
            alert_smtp_url: None,
            alert_smtp_ca: None,
            alert_email_from: None,
            alert_email_to: Vec::new(),
            alert_sms_url: None,
            alert_sms_to: Vec::new(),
            alert_sms_token: None,
            alert_sms_body: r#"{"to":"{to}","message":"{message}"}"#.into(),
            alert_external_url: None,
        }
    }
}

/// A setting that cannot be used as given.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct InvalidSetting {
    pub name: &'static str,
    pub reason: String,
}

fn invalid(name: &'static str, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        name,
        reason: reason.into(),
    }
}

impl Config {
    /// The Loki sink's settings, checked.
    pub fn loki_settings(
        &self,
        url: &str,
    ) -> Result<crate::sinks::loki::LokiSettings, InvalidSetting> {
        crate::sinks::loki::LokiSettings::new(
            url,
            self.loki_tenant_id.as_deref(),
            &self.loki_labels,
            &self.loki_format,
        )
        .map_err(|(name, reason)| invalid(name, reason))
    }

    /// The Elasticsearch sink's settings, checked.
    pub fn elasticsearch_settings(
        &self,
        url: &str,
    ) -> Result<crate::sinks::elasticsearch::ElasticsearchSettings, InvalidSetting> {
        crate::sinks::elasticsearch::ElasticsearchSettings::new(
            url,
            &self.elasticsearch_index,
            self.elasticsearch_data_stream,
            self.elasticsearch_username.as_deref(),
            self.elasticsearch_password.as_deref(),
            self.elasticsearch_api_key.as_deref(),
            self.elasticsearch_ca_cert.as_deref(),
        )
        .map_err(|(name, reason)| invalid(name, reason))
    }

    /// The broker's settings, checked.
    pub fn broker_settings(
        &self,
        url: &str,
    ) -> Result<crate::broker::BrokerSettings, InvalidSetting> {
        crate::broker::BrokerSettings::new(
            url,
            &self.broker_topic,
            self.broker_retry_attempts,
            self.broker_retry_delay,
        )
        .map_err(|(name, reason)| invalid(name, reason))
    }

    /// Loads from an optional YAML file and the process environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, anyhow::Error> {
        let config: Config = logging_common::config::load(file, std::env::vars())?;
        config.validate()?;
        Ok(config)
    }

    /// The encryption keys when encryption at rest is on.
    pub fn keyring(
        &self,
    ) -> Result<Option<std::sync::Arc<logging_common::crypto::Keyring>>, InvalidSetting> {
        use logging_common::crypto::Keyring;
        if !self.log_encryption_enabled {
            return Ok(None);
        }
        let keyring = match (&self.log_encryption_key_file, &self.log_encryption_key) {
            (Some(path), _) => {
                Keyring::read(path).map_err(|e| invalid("LOG_ENCRYPTION_KEY_FILE", e))?
            }
            (None, Some(keys)) => {
                Keyring::parse(keys).map_err(|e| invalid("LOG_ENCRYPTION_KEY", e))?
            }
            (None, None) => {
                return Err(invalid(
                    "LOG_ENCRYPTION_KEY_FILE",
                    "LOG_ENCRYPTION_ENABLED=true needs a key: set LOG_ENCRYPTION_KEY_FILE (a file \
                     of 32 random bytes in base64, e.g. from head -c 32 /dev/urandom | base64) \
                     or LOG_ENCRYPTION_KEY",
                ));
            }
        };
        Ok(Some(std::sync::Arc::new(keyring)))
    }

    /// Checks what the types alone cannot, with a message naming the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.keyring()?;
        if let Some(url) = &self.broker_url {
            self.broker_settings(url)?;
        }
        if let Some(url) = &self.loki_url {
            self.loki_settings(url)?;
        }
        if let Some(url) = &self.elasticsearch_url {
            self.elasticsearch_settings(url)?;
        }
        match (
            self.log_query_backend.as_str(),
            &self.loki_url,
            &self.elasticsearch_url,
        ) {
            ("embedded", _, _) | ("loki", Some(_), _) | ("elasticsearch", _, Some(_)) => {}
            ("loki", None, _) => {
                return Err(invalid(
                    "LOG_QUERY_BACKEND",
                    "loki reads what the Loki sink writes: set LOKI_URL",
                ));
            }
            ("elasticsearch", _, None) => {
                return Err(invalid(
                    "LOG_QUERY_BACKEND",
                    "elasticsearch reads what the Elasticsearch sink writes: set ELASTICSEARCH_URL",
                ));
            }
            (other, _, _) => {
                return Err(invalid(
                    "LOG_QUERY_BACKEND",
                    format!("{other:?}: expected embedded, elasticsearch or loki"),
                ));
            }
        }
        if self.max_log_size < 64 {
            return Err(invalid("MAX_LOG_SIZE", "must be at least 64 bytes"));
        }
        if self.max_request_bytes < self.max_log_size {
            return Err(invalid(
                "MAX_REQUEST_BYTES",
                "must be at least MAX_LOG_SIZE",
            ));
        }
        if self.max_batch_entries == 0 {
            return Err(invalid("MAX_BATCH_ENTRIES", "must be at least 1"));
        }
        if self.max_connections < 16 {
            return Err(invalid("MAX_CONNECTIONS", "must be at least 16"));
        }
        if self.http_header_timeout == 0 || self.http_body_timeout == 0 {
            return Err(invalid(
                "HTTP_HEADER_TIMEOUT",
                "HTTP_HEADER_TIMEOUT and HTTP_BODY_TIMEOUT must be at least 1 second",
            ));
        }
        crate::api::client::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|reason| invalid("TRUSTED_PROXIES", reason))?;
        if self.log_retention_days == 0 {
            return Err(invalid("LOG_RETENTION_DAYS", "must be at least 1"));
        }
        if let Some(url) = &self.archive_url {
            crate::archive::Location::parse(url).map_err(|e| invalid("ARCHIVE_URL", e))?;
            if self.archive_after_days >= self.log_retention_days {
                return Err(invalid(
                    "ARCHIVE_AFTER_DAYS",
                    format!(
                        "must be less than LOG_RETENTION_DAYS ({}): a day is archived before \
                         retention would drop it",
                        self.log_retention_days
                    ),
                ));
            }
            if self.archive_after_days == 0 {
                return Err(invalid(
                    "ARCHIVE_AFTER_DAYS",
                    "must be at least 1 (today's partition still takes entries)",
                ));
            }
            if self.archive_retention_days != 0
                && self.archive_retention_days <= self.archive_after_days
            {
                return Err(invalid(
                    "ARCHIVE_RETENTION_DAYS",
                    format!(
                        "must be 0 (for ever) or more than ARCHIVE_AFTER_DAYS ({}): a day would \
                         leave the archive as soon as it arrives",
                        self.archive_after_days
                    ),
                ));
            }
            if self.archive_interval == 0 {
                return Err(invalid("ARCHIVE_INTERVAL", "must be at least 1 second"));
            }
        }
        if self.index_refresh_interval_ms == 0 {
            return Err(invalid("INDEX_REFRESH_INTERVAL_MS", "must be at least 1"));
        }
        if self.index_writer_memory_mb < 16 {
            return Err(invalid("INDEX_WRITER_MEMORY_MB", "must be at least 16"));
        }
        if self.wal_max_bytes != 0 && self.wal_max_bytes < 2 * self.wal_segment_bytes {
            return Err(invalid(
                "WAL_MAX_BYTES",
                "must be 0 (no cap) or at least two segments (2 × WAL_SEGMENT_BYTES)",
            ));
        }
        if self.wal_segment_bytes < 1024 * 1024 {
            return Err(invalid("WAL_SEGMENT_BYTES", "must be at least 1 MiB"));
        }
        if self.health_check_interval == 0 || self.metrics_update_interval == 0 {
            return Err(invalid(
                "HEALTH_CHECK_INTERVAL",
                "HEALTH_CHECK_INTERVAL and METRICS_UPDATE_INTERVAL must be at least 1 second",
            ));
        }
        if self.database_pool_size + self.database_max_overflow == 0 {
            return Err(invalid(
                "DATABASE_POOL_SIZE",
                "the pool needs at least one connection",
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "DATABASE_URL",
                "expected a sqlite: or postgres:// URL",
            ));
        }
        let tls_set = [&self.tls_cert, &self.tls_key, &self.tls_client_ca]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if tls_set != 0 && tls_set != 3 {
            return Err(invalid(
                "TLS_CERT",
                "set all of TLS_CERT, TLS_KEY and TLS_CLIENT_CA, or none (development certificates)",
            ));
        }
        if !matches!(self.log_format.as_str(), "auto" | "json" | "text") {
            return Err(invalid("LOG_FORMAT", "expected auto, json or text"));
        }
        if self.alert_check_interval == 0 {
            return Err(invalid("ALERT_CHECK_INTERVAL", "must be at least 1 second"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.alert_rules.iter().enumerate() {
            rule.validate().map_err(|e| {
                invalid(
                    "ALERT_RULES",
                    format!("rule {i} ({:?}): {}: {}", rule.name, e.field, e.reason),
                )
            })?;
            if !names.insert(rule.name.trim()) {
                return Err(invalid(
                    "ALERT_RULES",
                    format!("two rules are named {:?}", rule.name),
                ));
            }
        }
        if let Some(tokens) = &self.api_tokens {
            TokenTable::check(tokens).map_err(|reason| invalid("API_TOKENS", reason))?;
        }
        Ok(())
    }

    pub fn refresh_interval(&self) -> Duration {
        Duration::from_millis(self.index_refresh_interval_ms)
    }

    pub fn index_threads(&self) -> usize {
        if self.log_processing_workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.log_processing_workers
        }
    }

    /// The relational store's URL: the configured one, or SQLite in the data directory.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("logging.db").display()
            ),
        }
    }
}
