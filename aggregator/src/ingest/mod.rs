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
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::index::LogIndex;
use crate::wal::{Batch, Wal, WalError};
use dedup::Dedup;

/// The WAL consumer name of the embedded index.
pub const INDEX_CONSUMER: &str = "index";

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;
/// How long a write may wait for the store to catch up before it is refused with 429.
const BACKPRESSURE_WAIT: Duration = Duration::from_secs(2);

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
    pub rejected: Vec<Rejection>,
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

/// `context` with `"agent": name` added, unless the entry names an agent itself. Spliced into
/// the JSON text rather than parsing the object, which is the rare path.
fn with_agent(context: &Context, agent: &str) -> Context {
    let text = context.as_json();
    if text.contains("\"agent\"") {
        let mut map = context.to_map();
        if !map.contains_key("agent") {
            map.insert("agent".into(), serde_json::Value::String(agent.into()));
        }
        return Context::from_map(&map);
    }
    let name = serde_json::to_string(agent).unwrap_or_else(|_| "\"\"".into());
    let spliced = if context.is_empty() {
        format!("{{\"agent\":{name}}}")
    } else {
        let inner = text.trim_start().strip_prefix('{').unwrap_or("}");
        format!("{{\"agent\":{name},{inner}")
    };
    RawValue::from_string(spliced)
        .ok()
        .and_then(|raw| Context::from_object_json(raw).ok())
        .unwrap_or_else(|| context.clone())
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
}

pub struct Ingest {
    wal: Arc<Wal>,
    dedup: Arc<Mutex<Dedup>>,
    index: Arc<LogIndex>,
    options: IngestOptions,
    pub rate: RateMeter,
}

impl Ingest {
    pub fn new(
        wal: Arc<Wal>,
        dedup: Arc<Mutex<Dedup>>,
        index: Arc<LogIndex>,
        options: IngestOptions,
    ) -> Ingest {
        Ingest {
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
            let lag_bytes = self.wal.unread_bytes(INDEX_CONSUMER);
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
    pub fn prepare(
        &self,
        raw: &RawValue,
        now: Timestamp,
        agent: Option<&str>,
    ) -> Result<LogEntry, EntryError> {
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
        if let Some(agent) = agent {
            entry.context = with_agent(&entry.context, agent);
        }
        Ok(entry)
    }

    /// Validates and stores a batch; returns once every accepted entry is durable.
    ///
    /// `agent` is the sending agent's certificate name, recorded as `context.agent`.
    pub async fn ingest(
        &self,
        raws: &[&RawValue],
        agent: Option<&str>,
    ) -> Result<IngestOutcome, IngestError> {
        self.check_backpressure().await?;
        let now = Timestamp::now();
        let mut ids = vec![None; raws.len()];
        let mut rejected = Vec::new();
        let mut entries = Vec::with_capacity(raws.len());
        let mut positions = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            match self.prepare(raw, now, agent) {
                Ok(entry) => {
                    positions.push(i);
                    entries.push(entry);
                }
                Err(error) => rejected.push(Rejection {
                    index: i,
                    error: error.to_string(),
                    errors: error.errors,
                    too_large: error.too_large,
                }),
            }
        }
        if !rejected.is_empty() {
            metrics::counter!("logging_aggregator_rejected_entries_total")
                .increment(rejected.len() as u64);
        }
        if entries.is_empty() {
            return Ok(IngestOutcome {
                ids,
                rejected,
                accepted: 0,
                duplicates: 0,
                visible_after: None,
            });
        }
        let batch = Batch::new(&entries);
        let volume = VolumeCounts::of(&entries);
        drop(entries);
        let entry_ids = batch.ids.clone();
        let appended = self.wal.append(batch).await?;
        let duplicates = appended.duplicates.iter().filter(|d| d.is_some()).count();
        let accepted = entry_ids.len() - duplicates;
        for (position, id) in positions.into_iter().zip(entry_ids) {
            ids[position] = Some(id);
        }
        volume.record(&appended.duplicates);
        metrics::counter!("logging_aggregator_duplicate_entries_total")
            .increment(duplicates as u64);
        self.rate.record(accepted as u64);
        Ok(IngestOutcome {
            ids,
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
        let mut members = Vec::with_capacity(entries.len());
        for entry in entries {
            let found = groups
                .iter()
                .position(|(service, level)| *level == entry.level && *service == entry.service);
            let group = found.unwrap_or_else(|| {
                groups.push((entry.service.clone(), entry.level));
                groups.len() - 1
            });
            members.push(group);
        }
        VolumeCounts { groups, members }
    }

    /// Counts every entry that was not a duplicate.
    fn record<T>(self, duplicates: &[Option<T>]) {
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
                    "service" => service,
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
    fn the_agent_name_joins_the_context_without_overwriting_one_the_entry_has() {
        assert_eq!(
            with_agent(&context("{}"), "node-1").as_json(),
            r#"{"agent":"node-1"}"#
        );
        let spliced = with_agent(&context(r#"{ "a": 1 }"#), "node-\"1");
        assert_eq!(spliced.to_map()["agent"], "node-\"1");
        assert_eq!(spliced.to_map()["a"], 1);
        let own = with_agent(&context(r#"{"agent":"mine"}"#), "node-1");
        assert_eq!(own.to_map()["agent"], "mine");
        let nested = with_agent(&context(r#"{"x":{"agent":"deep"}}"#), "node-1");
        assert_eq!(nested.to_map()["agent"], "node-1");
    }
}
