//! The agent's configuration: one typed struct, loaded from defaults, an optional YAML file
//! and the environment (environment wins), validated at start-up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::parsers::{ParserConfig, Parsers};

/// Every setting of the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where batches go: the aggregator's mTLS ingest listener.
    pub aggregator_url: String,
    /// Globs of files to tail (comma-separated in the environment).
    pub agent_paths: Vec<String>,
    /// Globs of files never to tail.
    pub agent_exclude: Vec<String>,
    /// Directories outside the globs' roots where a symlink found by a glob may lead (Docker's
    /// json-file logs, which dockershim's pod logs link to); nothing else outside is followed.
    pub agent_symlink_roots: Vec<String>,
    /// Checkpoints and the socket spool.
    pub agent_data_dir: PathBuf,
    /// The CA that signed the aggregator's certificate (PEM).
    pub tls_ca: Option<PathBuf>,
    /// The agent's own certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// This node's name (Kubernetes downward API); the host name when unset.
    pub node_name: Option<String>,
    /// Syslog over UDP: listen address, e.g. `0.0.0.0:5514`; unset = off.
    pub agent_syslog_udp: Option<String>,
    /// Syslog over TCP (octet-counted or newline framing): listen address; unset = off.
    pub agent_syslog_tcp: Option<String>,
    /// Unix stream socket taking NDJSON entries or raw lines: its path; unset = off.
    pub agent_socket: Option<PathBuf>,
    /// Port of the agent's `/metrics` and `/health`.
    pub agent_metrics_port: u16,
    /// Entries per batch.
    pub log_batch_size: usize,
    /// Seconds a batch may wait for more entries before it is sent.
    pub log_batch_timeout: f64,
    /// Bytes of JSON per batch, before compression.
    pub agent_batch_bytes: usize,
    /// Batches built but not yet acknowledged, in bytes: past this the agent stops reading.
    pub agent_max_in_flight_bytes: usize,
    /// Longest entry; longer lines are truncated and marked `context.truncated`.
    pub max_log_size: usize,
    /// Extra redaction rules: regular expressions whose matches become `[REDACTED]`.
    pub agent_redact_patterns: Vec<String>,
    /// Most bytes the socket spool keeps on disk while the aggregator is unreachable.
    pub agent_spool_max_bytes: u64,
    /// Encryption at rest of the spool, checkpoints and dead letters: a file of keys (32
    /// random bytes in base64, one a line; the first encrypts, all decrypt). Unset = off.
    pub agent_encryption_key_file: Option<PathBuf>,
    /// Milliseconds between rescans of the globs (new files are also seen through inotify).
    pub agent_rescan_interval_ms: u64,
    /// Parsers for formats no built-in rule knows, tried first on the files they select
    /// (`AGENT_PARSERS` as a JSON array); see [`crate::parsers::ParserConfig`].
    pub agent_parsers: Vec<ParserConfig>,
    /// The agent's own log level.
    pub log_level: String,
    /// The agent's own log format: `json`, `text` or `auto`.
    pub log_format: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            aggregator_url: "https://localhost:8443".into(),
            agent_paths: vec!["/var/log/pods/*/*/*.log".into()],
            agent_exclude: Vec::new(),
            agent_symlink_roots: vec!["/var/lib/docker/containers".into()],
            agent_data_dir: PathBuf::from("/var/lib/logging-agent"),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            node_name: None,
            agent_syslog_udp: None,
            agent_syslog_tcp: None,
            agent_socket: None,
            agent_metrics_port: 9091,
            log_batch_size: 1000,
            log_batch_timeout: 1.0,
            agent_batch_bytes: 1024 * 1024,
            agent_max_in_flight_bytes: 8 * 1024 * 1024,
            max_log_size: 1_048_576,
            agent_redact_patterns: Vec::new(),
            agent_spool_max_bytes: 256 * 1024 * 1024,
            agent_encryption_key_file: None,
            agent_rescan_interval_ms: 1000,
            agent_parsers: Vec::new(),
            log_level: "info".into(),
            log_format: "auto".into(),
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

impl Config {
    /// Loads from an optional YAML file and the process environment, and validates.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let config: Config = logging_common::config::load(file, std::env::vars())?;
        config.validate()?;
        Ok(config)
    }

    /// The encryption keys, when `AGENT_ENCRYPTION_KEY_FILE` is set.
    pub fn keyring(&self) -> Result<Option<Arc<logging_common::crypto::Keyring>>, InvalidSetting> {
        let Some(path) = &self.agent_encryption_key_file else {
            return Ok(None);
        };
        logging_common::crypto::Keyring::read(path)
            .map(|keyring| Some(Arc::new(keyring)))
            .map_err(|reason| InvalidSetting {
                name: "AGENT_ENCRYPTION_KEY_FILE",
                reason,
            })
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |name, reason: &str| InvalidSetting {
            name,
            reason: reason.to_string(),
        };
        self.keyring()?;
        if !self.aggregator_url.starts_with("https://")
            && !self.aggregator_url.starts_with("http://")
        {
            return Err(invalid("AGGREGATOR_URL", "expected an https:// URL"));
        }
        let tls = [&self.tls_ca, &self.tls_cert, &self.tls_key];
        let set = tls.iter().filter(|p| p.is_some()).count();
        if self.aggregator_url.starts_with("https://") && set != 3 {
            return Err(invalid(
                "TLS_CA",
                "TLS_CA, TLS_CERT and TLS_KEY are all needed for an https:// AGGREGATOR_URL",
            ));
        }
        if self.log_batch_size == 0 {
            return Err(invalid("LOG_BATCH_SIZE", "must be at least 1"));
        }
        if self.log_batch_timeout.is_nan() || self.log_batch_timeout <= 0.0 {
            return Err(invalid("LOG_BATCH_TIMEOUT", "must be more than 0 seconds"));
        }
        if self.max_log_size < 64 {
            return Err(invalid("MAX_LOG_SIZE", "must be at least 64 bytes"));
        }
        if self.agent_batch_bytes < self.max_log_size.min(64 * 1024) {
            return Err(invalid("AGENT_BATCH_BYTES", "must hold at least one entry"));
        }
        if self.agent_max_in_flight_bytes < self.agent_batch_bytes {
            return Err(invalid(
                "AGENT_MAX_IN_FLIGHT_BYTES",
                "must be at least AGENT_BATCH_BYTES",
            ));
        }
        for pattern in self.agent_paths.iter().chain(&self.agent_exclude) {
            if glob::Pattern::new(pattern).is_err() {
                return Err(InvalidSetting {
                    name: "AGENT_PATHS",
                    reason: format!("{pattern:?} is not a valid glob"),
                });
            }
        }
        for pattern in &self.agent_redact_patterns {
            if let Err(error) = regex::Regex::new(pattern) {
                return Err(InvalidSetting {
                    name: "AGENT_REDACT_PATTERNS",
                    reason: format!("{pattern:?}: {error}"),
                });
            }
        }
        Parsers::new(&self.agent_parsers)?;
        if !matches!(self.log_format.as_str(), "auto" | "json" | "text") {
            return Err(invalid("LOG_FORMAT", "expected auto, json or text"));
        }
        Ok(())
    }

    pub fn batch_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.log_batch_timeout)
    }

    /// The node name: `NODE_NAME`, else the host name.
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown-node".into())
        })
    }
}
