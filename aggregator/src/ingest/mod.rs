//! The ingest path: validate → enrich → (dedup + WAL, in the writer thread) → acknowledge.
//!
//! Whatever the entry's way in (`POST /api/logs` now, the agents' `/v1/ingest` later), it goes
//! through [`Ingest::ingest`], which answers only once the accepted entries are durable.

pub mod dedup;
pub mod listener;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logging_common::validate::{EntryError, EntryLimits, FieldError, validate_log_entry};
use logging_common::{Context, LogEntry, LogLevel, Timestamp};
use parking_lot::Mutex;
use serde::Serialize;
use tracing::Instrument;
use uuid::Uuid;

use crate::index::LogIndex;
use crate::wal::{Batch, Wal, WalError};
use dedup::Dedup;

/// The WAL consumer name of the embedded index.
pub const INDEX_CONSUMER: &str = "index";

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;
/// How long a write may wait for the store to catch up before it is refused with 429.
const BACKPRESSURE_WAIT: Duration = Duration::from_secs(2);

/// Rejections itemised in an answer, the first by index; the rest are only counted, so an
/// answer stays small however many entries a request holds (`rejected_count` has them all).
pub const MAX_LISTED_REJECTIONS: usize = 100;

/// The refused entries of a request: the first [`MAX_LISTED_REJECTIONS`] by index, and how
/// many there were in all.
#[derive(Debug, Default)]
pub struct Rejections {
    pub listed: Vec<Rejection>,
    pub count: usize,
}

impl Rejections {
    /// Records one; entries must come in index order.
    pub fn push(&mut self, rejection: Rejection) {
        self.count += 1;
        if self.listed.len() < MAX_LISTED_REJECTIONS {
            self.listed.push(rejection);
        }
    }

    /// Both sets together, still the first by index.
    pub fn merge(mut self, other: Rejections) -> Rejections {
        self.count += other.count;
        self.listed.extend(other.listed);
        self.listed.sort_by_key(|r| r.index);
        self.listed.truncate(MAX_LISTED_REJECTIONS);
        self
    }
}

/// One refused entry of a batch.
#[derive(Debug, Serialize)]
pub struct Rejection {
    pub index: usize,
    pub error: String,
    #[serde(skip)]
    pub errors: Vec<FieldError>,
    #[serde(skip)]
    pub too_large: bool,
}

/// What happened to a batch.
#[derive(Debug)]
pub struct IngestOutcome {
    /// Per input entry: its id if stored (or already stored), `None` if rejected.
    pub ids: Vec<Option<Uuid>>,
    /// Per input entry: it was stored before (its id was already there).
    pub already_stored: Vec<bool>,
    pub rejected: Rejections,
    pub accepted: usize,
    pub duplicates: usize,
    /// WAL position after which every accepted entry is searchable.
    pub visible_after: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the store is {lag_bytes} bytes behind the write-ahead log; retry shortly")]
    Backpressure { lag_bytes: u64 },
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// `context` with `"agent"` set by the aggregator alone: the sending agent's certificate
/// name (`/v1/ingest`), or nothing (`/api/logs`). A client-sent `agent` is not believed: it is
/// kept as `claimed_agent`, so nothing the client sent is lost and nobody can pose as another
/// node. Returns `None` when the context has no `agent` key: then the name (if any) is
/// written into the stored line by [`crate::wal::Batch::build`], with no new context built.
fn restamp_agent(context: &Context, agent: Option<&str>) -> Option<Context> {
    if !context.as_json().contains("\"agent\"") {
        return None;
    }
    let mut map = context.to_map();
    let claimed = map.remove("agent")?;
    map.insert("claimed_agent".into(), claimed);
    if let Some(agent) = agent {
        map.insert("agent".into(), serde_json::Value::String(agent.into()));
    }
    Some(Context::from_map(&map))
}

/// Entries accepted per second over the last minute.
#[derive(Default)]
pub struct RateMeter {
    seconds: Mutex<VecDeque<(i64, u64)>>,
}

impl RateMeter {
    pub fn record(&self, n: u64) {
        let now = Timestamp::now().as_nanos() / 1_000_000_000;
        let mut seconds = self.seconds.lock();
        match seconds.back_mut() {
            Some((second, count)) if *second == now => *count += n,
            _ => seconds.push_back((now, n)),
        }
        while seconds.front().is_some_and(|(s, _)| *s <= now - 60) {
            seconds.pop_front();
        }
    }

    /// Average entries per second over the last 60 seconds.
    pub fn per_second(&self) -> f64 {
        let now = Timestamp::now().as_nanos() / 1_000_000_000;
        let seconds = self.seconds.lock();
        let total: u64 = seconds
            .iter()
            .filter(|(s, _)| *s > now - 60)
            .map(|(_, n)| n)
            .sum();
        total as f64 / 60.0
    }
}

/// How entries are accepted.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    pub max_entry_bytes: usize,
    pub environment: Option<String>,
    pub retention_days: u32,
    pub max_lag_bytes: u64,
    /// Services with their own series in `/metrics` (`METRICS_MAX_SERVICES`).
    pub metrics_max_services: usize,
    /// Whether the indexer's last round succeeded (what readiness reports).
    pub store_healthy: Arc<std::sync::atomic::AtomicBool>,
}

/// The `service` label values of `/metrics`: the first `max` services seen get their own,
/// every later one is `other`. Services are chosen by clients, and `/metrics` needs no
/// token: without a bound, a client could grow it (and the process) without end.
pub struct ServiceLabels {
    max: usize,
    known: Mutex<std::collections::HashSet<String>>,
}

impl ServiceLabels {
    pub fn new(max: usize) -> ServiceLabels {
        ServiceLabels {
            max,
            known: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The label for `service`.
    pub fn label(&self, service: &str) -> String {
        let mut known = self.known.lock();
        if known.contains(service) {
            return service.to_string();
        }
        if known.len() < self.max {
            known.insert(service.to_string());
            return service.to_string();
        }
        "other".to_string()
    }
}

pub struct Ingest {
    wal: Arc<Wal>,
    dedup: Arc<Mutex<Dedup>>,
    index: Arc<LogIndex>,
    options: IngestOptions,
    pub rate: RateMeter,
    labels: ServiceLabels,
}

impl Ingest {
    pub fn new(
        wal: Arc<Wal>,
        dedup: Arc<Mutex<Dedup>>,
        index: Arc<LogIndex>,
        options: IngestOptions,
    ) -> Ingest {
        Ingest {
            labels: ServiceLabels::new(options.metrics_max_services),
            wal,
            dedup,
            index,
            options,
            rate: RateMeter::default(),
        }
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Where an id is durable but not yet searchable, if it is.
    pub fn pending_lsn(&self, id: &Uuid) -> Option<u64> {
        self.dedup.lock().pending_lsn(id)
    }

    /// Holds a write back while the store is too far behind the WAL: first by waiting (a
    /// slower answer is the gentlest backpressure), then, if it stays behind, with a 429.
    pub async fn check_backpressure(&self) -> Result<(), IngestError> {
        let deadline = Instant::now() + BACKPRESSURE_WAIT;
        loop {
            // While the store fails, what the indexer has read is not stored: the lag is
            // counted from what it has committed, so a failing store holds writes back
            // whatever moment of its retry it is in.
            let healthy = self
                .options
                .store_healthy
                .load(std::sync::atomic::Ordering::Acquire);
            let lag_bytes = match healthy {
                true => self.wal.unread_bytes(INDEX_CONSUMER),
                false => self.wal.uncommitted_bytes(INDEX_CONSUMER),
            };
            if lag_bytes <= self.options.max_lag_bytes {
                return Ok(());
            }
            if Instant::now() >= deadline {
                metrics::counter!("logging_aggregator_backpressure_total").increment(1);
                return Err(IngestError::Backpressure { lag_bytes });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Validates one entry and applies the aggregator's enrichment and time bounds.
    /// Returns the entry, and whether the agent's name is still to be written into its
    /// context (see [`restamp_agent`]).
    pub fn prepare(
        &self,
        raw: &str,
        now: Timestamp,
        agent: Option<&str>,
    ) -> Result<(LogEntry, bool), EntryError> {
        let mut entry = validate_log_entry(
            raw,
            EntryLimits {
                max_entry_bytes: self.options.max_entry_bytes,
            },
            now,
        )?;
        let retention = i64::from(self.options.retention_days) * NANOS_PER_DAY;
        if entry.timestamp.as_nanos() < now.as_nanos().saturating_sub(retention) {
            return Err(EntryError::field(
                "timestamp",
                format!(
                    "{} is older than the retention period (LOG_RETENTION_DAYS = {})",
                    entry.timestamp, self.options.retention_days
                ),
            ));
        }
        if entry.timestamp.as_nanos() > now.as_nanos().saturating_add(NANOS_PER_DAY) {
            return Err(EntryError::field(
                "timestamp",
                format!("{} is more than a day in the future", entry.timestamp),
            ));
        }
        if entry.environment.is_none() {
            entry.environment = self.options.environment.clone();
        }
        let splice = match restamp_agent(&entry.context, agent) {
            Some(context) => {
                entry.context = context;
                false
            }
            None => agent.is_some(),
        };
        Ok((entry, splice))
    }

    /// Validates and stores a batch; returns once every accepted entry is durable.
    ///
    /// `agent` is the sending agent's certificate name, recorded as `context.agent`.
    pub async fn ingest(
        &self,
        raws: &[&str],
        agent: Option<&str>,
    ) -> Result<IngestOutcome, IngestError> {
        self.check_backpressure().await?;
        let now = Timestamp::now();
        let mut ids = vec![None; raws.len()];
        let mut rejected = Rejections::default();
        let mut entries = Vec::with_capacity(raws.len());
        let mut splice = Vec::with_capacity(raws.len());
        let mut positions = Vec::with_capacity(raws.len());
        let validating = tracing::debug_span!(
            "validate",
            entries = raws.len(),
            rejected = tracing::field::Empty
        );
        validating.in_scope(|| {
            for (i, raw) in raws.iter().enumerate() {
                match self.prepare(raw, now, agent) {
                    Ok((entry, needs_agent)) => {
                        positions.push(i);
                        entries.push(entry);
                        splice.push(needs_agent);
                    }
                    Err(error) => rejected.push(Rejection {
                        index: i,
                        error: error.to_string(),
                        errors: error.errors,
                        too_large: error.too_large,
                    }),
                }
            }
        });
        validating.record("rejected", rejected.count);
        drop(validating);
        if rejected.count > 0 {
            metrics::counter!("logging_aggregator_rejected_entries_total")
                .increment(rejected.count as u64);
        }
        if entries.is_empty() {
            return Ok(IngestOutcome {
                already_stored: vec![false; raws.len()],
                ids,
                rejected,
                accepted: 0,
                duplicates: 0,
                visible_after: None,
            });
        }
        let batch = Batch::build(&entries, |i| agent.filter(|_| splice[i]));
        let volume = VolumeCounts::of(&entries);
        drop(entries);
        let entry_ids = batch.ids.clone();
        let appending = tracing::debug_span!(
            "wal append",
            entries = entry_ids.len(),
            bytes = batch.json.len(),
            duplicates = tracing::field::Empty,
            wal.group.requests = tracing::field::Empty,
            wal.group.bytes = tracing::field::Empty,
            wal.group.seconds = tracing::field::Empty,
        );
        let appended = self.wal.append(batch).instrument(appending.clone()).await?;
        let duplicates = appended.duplicates.iter().filter(|d| d.is_some()).count();
        appending.record("duplicates", duplicates);
        appending.record("wal.group.requests", appended.group.requests);
        appending.record("wal.group.bytes", appended.group.bytes);
        appending.record("wal.group.seconds", appended.group.seconds);
        drop(appending);
        let accepted = entry_ids.len() - duplicates;
        let mut already_stored = vec![false; raws.len()];
        for ((position, id), duplicate) in positions
            .into_iter()
            .zip(entry_ids)
            .zip(&appended.duplicates)
        {
            ids[position] = Some(id);
            already_stored[position] = duplicate.is_some();
        }
        volume.record(&appended.duplicates, &self.labels);
        metrics::counter!("logging_aggregator_duplicate_entries_total")
            .increment(duplicates as u64);
        self.rate.record(accepted as u64);
        Ok(IngestOutcome {
            ids,
            already_stored,
            rejected,
            accepted,
            duplicates,
            visible_after: Some(appended.visible_after),
        })
    }

    /// Waits until the entries of an outcome are searchable (`?refresh=wait_for`).
    pub async fn wait_visible(&self, outcome: &IngestOutcome) {
        if let Some(lsn) = outcome.visible_after {
            self.index.wait_searchable(lsn).await;
        }
    }
}

/// Accepted entries per (service, level) of one batch, for
/// `logging_aggregator_ingested_entries_total{service,level}`: counted per batch so the hot
/// path touches the metrics registry once per group, not once per entry.
struct VolumeCounts {
    groups: Vec<(String, LogLevel)>,
    /// The group of each entry, in batch order.
    members: Vec<usize>,
}

impl VolumeCounts {
    fn of(entries: &[LogEntry]) -> VolumeCounts {
        let mut groups: Vec<(String, LogLevel)> = Vec::new();
        // A batch has few groups, but a client may send one per entry: look them up by hash.
        let mut index: std::collections::HashMap<(&str, LogLevel), usize> =
            std::collections::HashMap::new();
        let mut members = Vec::with_capacity(entries.len());
        for entry in entries {
            let group = *index
                .entry((entry.service.as_str(), entry.level))
                .or_insert_with(|| {
                    groups.push((entry.service.clone(), entry.level));
                    groups.len() - 1
                });
            members.push(group);
        }
        VolumeCounts { groups, members }
    }

    /// Counts every entry that was not a duplicate.
    fn record<T>(self, duplicates: &[Option<T>], labels: &ServiceLabels) {
        let mut counts = vec![0u64; self.groups.len()];
        for (i, group) in self.members.iter().enumerate() {
            if duplicates.get(i).is_none_or(Option::is_none) {
                counts[*group] += 1;
            }
        }
        for ((service, level), count) in self.groups.into_iter().zip(counts) {
            if count > 0 {
                metrics::counter!(
                    "logging_aggregator_ingested_entries_total",
                    "service" => labels.label(&service),
                    "level" => level.as_str()
                )
                .increment(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(json: &str) -> Context {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_certificate_names_the_agent_and_a_claimed_name_is_kept_aside() {
        // No `agent` key: nothing to move; the name is written with the line.
        assert!(restamp_agent(&context(r#"{"a":1}"#), Some("node-1")).is_none());
        let nested = context(r#"{"x":{"agent":"deep"}}"#);
        assert!(restamp_agent(&nested, Some("node-1")).is_none());
        let spoofed = restamp_agent(&context(r#"{"agent":"other-node"}"#), Some("node-1")).unwrap();
        assert_eq!(spoofed.to_map()["agent"], "node-1");
        assert_eq!(spoofed.to_map()["claimed_agent"], "other-node");
        let api = restamp_agent(&context(r#"{"agent":"node-9","b":2}"#), None).unwrap();
        assert!(api.to_map().get("agent").is_none());
        assert_eq!(api.to_map()["claimed_agent"], "node-9");
        assert_eq!(api.to_map()["b"], 2);
    }
}
