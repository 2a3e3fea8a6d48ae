//! The indexer: the WAL consumer that feeds the embedded store.
//!
//! It runs on its own thread, reads durable records from its WAL cursor, adds each entry to
//! the partition of its day, and every refresh interval commits the partitions it touched,
//! reloads their readers, publishes the new searchable position and persists its cursor.
//!
//! Exactly-once application without id lookups: each partition's commit carries, as its
//! payload, the WAL position it covers. After a crash the indexer replays from its cursor and
//! skips, per partition, every record before that partition's own committed position.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::borrow::Cow;

use logging_common::model::numeric_fields;
use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::value::RawValue;
use tantivy::schema::OwnedValue;
use tantivy::{IndexWriter, TantivyDocument};
use uuid::Uuid;

use super::patterns::pattern_hash;
use super::schema::{KeyKind, id_hash, key_hash};
use super::{IndexError, LogIndex, Partition};
use crate::wal::{Record, WalError, WalReader};

/// A writer is closed when its partition has not been written for this long.
const IDLE_WRITER: Duration = Duration::from_secs(300);
const RETENTION_CHECK: Duration = Duration::from_secs(60);
const READ_BYTES: usize = 1024 * 1024;

/// How the indexer runs.
#[derive(Clone, Debug)]
pub struct IndexerOptions {
    pub refresh: Duration,
    pub threads: usize,
    pub memory_bytes: usize,
    pub retention_days: u32,
}

struct PartitionWriter {
    partition: Arc<Partition>,
    writer: IndexWriter,
    /// WAL position covered by this partition's last commit.
    committed: u64,
    dirty: bool,
    last_write: Instant,
}

#[derive(Debug, thiserror::Error)]
enum IndexerError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Tantivy(#[from] tantivy::TantivyError),
    #[error(transparent)]
    Wal(#[from] WalError),
}

pub struct Indexer {
    index: Arc<LogIndex>,
    wal: WalReader,
    options: IndexerOptions,
    writers: BTreeMap<i64, PartitionWriter>,
    /// Position the cursor was last persisted at.
    persisted: u64,
    healthy: Arc<AtomicBool>,
}

impl Indexer {
    pub fn new(
        index: Arc<LogIndex>,
        wal: WalReader,
        options: IndexerOptions,
        healthy: Arc<AtomicBool>,
    ) -> Indexer {
        let persisted = wal.position();
        Indexer {
            index,
            wal,
            options,
            writers: BTreeMap::new(),
            persisted,
            healthy,
        }
    }

    /// Runs until `stop` is set and everything durable has been indexed and committed.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut next_refresh = Instant::now() + self.options.refresh;
        let mut next_retention = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            // At most 200 ms: a stop requested while idle is seen promptly, not after a whole
            // refresh interval (SIGTERM took INDEX_REFRESH_INTERVAL_MS to take effect).
            let wait = if stopping {
                Duration::ZERO
            } else {
                next_refresh
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200))
            };
            let waited = Instant::now();
            let step = self
                .wal
                .next_records(READ_BYTES, wait)
                .map_err(IndexerError::from)
                .and_then(|records| {
                    let applied = Instant::now();
                    metrics::histogram!("logging_aggregator_indexer_phase_seconds", "phase" => "wait")
                        .record((applied - waited).as_secs_f64());
                    let caught_up = records.is_empty();
                    for record in &records {
                        self.apply(record)?;
                    }
                    metrics::histogram!("logging_aggregator_indexer_phase_seconds", "phase" => "apply")
                        .record(applied.elapsed().as_secs_f64());
                    Ok(caught_up)
                });
            let caught_up = match step {
                Ok(caught_up) => caught_up,
                Err(error) => {
                    self.recover(&error);
                    continue;
                }
            };
            let now = Instant::now();
            if now >= next_refresh || (stopping && caught_up) {
                let refreshing = Instant::now();
                let refreshed = self.refresh();
                metrics::histogram!("logging_aggregator_indexer_phase_seconds", "phase" => "refresh")
                    .record(refreshing.elapsed().as_secs_f64());
                if let Err(error) = refreshed {
                    self.recover(&error);
                    continue;
                }
                next_refresh = now + self.options.refresh;
            }
            if now >= next_retention {
                self.enforce_retention();
                next_retention = now + RETENTION_CHECK;
            }
            if stopping && caught_up {
                tracing::info!(
                    position = self.persisted,
                    "indexer stopped with everything committed"
                );
                return;
            }
        }
    }

    fn writer(&mut self, day: i64) -> Result<&mut PartitionWriter, IndexerError> {
        if !self.writers.contains_key(&day) {
            let partition = self.index.partition_for_write(day)?;
            let threads = self
                .options
                .threads
                .clamp(1, (self.options.memory_bytes / (16 << 20)).max(1));
            let writer = partition
                .index
                .writer_with_num_threads(threads, self.options.memory_bytes)?;
            writer.set_merge_policy(Box::new(merge_policy()));
            let committed = partition.committed_lsn();
            self.writers.insert(
                day,
                PartitionWriter {
                    partition,
                    writer,
                    committed,
                    dirty: false,
                    last_write: Instant::now(),
                },
            );
        }
        self.writers.get_mut(&day).ok_or_else(|| {
            IndexerError::Index(IndexError::Io(std::io::Error::other("writer vanished")))
        })
    }

    fn apply(&mut self, record: &Record) -> Result<(), IndexerError> {
        let fields = self.index.fields().clone();
        let full_text = self.index.full_text();
        for (i, line) in record.lines().enumerate() {
            let entry: EntryView<'_> = match serde_json::from_slice(&line) {
                Ok(entry) => entry,
                Err(error) => {
                    // The WAL's checksum held, so this is a bug of ours, not a torn write:
                    // say so loudly and keep going with the rest.
                    tracing::error!(lsn = record.lsn, %error, "unreadable entry in the WAL");
                    metrics::counter!("logging_aggregator_index_errors_total").increment(1);
                    continue;
                }
            };
            let pw = self.writer(entry.timestamp.day())?;
            if record.lsn < pw.committed {
                continue;
            }
            let doc = document(&fields, full_text, &entry, &line, record.lsn + i as u64);
            pw.writer.add_document(doc)?;
            pw.dirty = true;
            pw.last_write = Instant::now();
        }
        metrics::counter!("logging_aggregator_indexed_entries_total")
            .increment(u64::from(record.count));
        Ok(())
    }

    /// Commits what changed, makes it searchable and persists the cursor.
    fn refresh(&mut self) -> Result<(), IndexerError> {
        let position = self.wal.position();
        let started = Instant::now();
        for pw in self.writers.values_mut().filter(|pw| pw.dirty) {
            let mut commit = pw.writer.prepare_commit()?;
            commit.set_payload(&position.to_string());
            commit.commit()?;
            pw.committed = position;
            pw.dirty = false;
            pw.partition.reader.reload()?;
        }
        if position != self.persisted {
            self.wal.commit(position)?;
            self.persisted = position;
            metrics::histogram!("logging_aggregator_index_refresh_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        self.index.publish_searchable(position);
        self.writers
            .retain(|_, pw| pw.dirty || pw.last_write.elapsed() < IDLE_WRITER);
        self.healthy.store(true, Ordering::Release);
        Ok(())
    }

    /// After a failure, throw away what was not committed and replay it from the WAL.
    fn recover(&mut self, error: &IndexerError) {
        tracing::error!(%error, position = self.persisted, "indexing failed; replaying from the last commit");
        metrics::counter!("logging_aggregator_index_errors_total").increment(1);
        self.healthy.store(false, Ordering::Release);
        self.writers.clear();
        self.wal.seek(self.persisted);
        std::thread::sleep(Duration::from_secs(1));
    }

    fn enforce_retention(&mut self) {
        let cutoff = Timestamp::now().saturating_add_nanos(
            -(i64::from(self.options.retention_days) * 86_400 * 1_000_000_000),
        );
        let oldest_kept = cutoff.day();
        for day in self.index.days().into_iter().filter(|d| *d < oldest_kept) {
            self.writers.remove(&day);
            match self.index.drop_partition(day) {
                Ok(()) => {
                    tracing::info!(day = %super::day_name(day), "partition dropped by retention")
                }
                Err(error) => {
                    tracing::error!(%error, day = %super::day_name(day), "cannot drop partition")
                }
            }
        }
    }
}

/// Segments merged at once. See [`merge_policy`].
const MERGE_FACTOR: usize = 32;

/// Merges for an append-only log store: a refresh every second writes a small segment per
/// indexing thread, and merging them eight at a time (tantivy's default) rewrites every entry
/// three or four times in a day. Merging 32 at once cut the aggregator's CPU per entry by a
/// quarter (BENCHMARKS.md); queries pay with a few more segments per partition, which cost
/// microseconds each.
fn merge_policy() -> tantivy::merge_policy::LogMergePolicy {
    let mut policy = tantivy::merge_policy::LogMergePolicy::default();
    policy.set_min_num_segments(MERGE_FACTOR);
    policy.set_min_layer_size(20_000);
    policy
}

/// What the indexer reads of a stored entry line, borrowing from it.
#[derive(Deserialize)]
pub struct EntryView<'a> {
    pub id: Uuid,
    pub timestamp: Timestamp,
    pub level: LogLevel,
    #[serde(borrow)]
    pub service: Cow<'a, str>,
    #[serde(borrow)]
    pub message: Cow<'a, str>,
    #[serde(default, borrow)]
    pub context: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub trace_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub request_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub correlation_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub tags: Vec<Cow<'a, str>>,
}

/// The index document of one entry; `json` is its stored line.
pub fn document(
    fields: &super::schema::Fields,
    full_text: bool,
    entry: &EntryView<'_>,
    json: &[u8],
    seq: u64,
) -> TantivyDocument {
    let mut doc = TantivyDocument::new();
    doc.add_u64(fields.id_key, id_hash(&entry.id));
    doc.add_i64(fields.ts, entry.timestamp.as_nanos());
    doc.add_u64(fields.seq, seq);
    doc.add_u64(fields.level, u64::from(entry.level.rank()));
    doc.add_text(fields.service, &entry.service);
    for (kind, value) in [
        (KeyKind::TraceId, &entry.trace_id),
        (KeyKind::RequestId, &entry.request_id),
        (KeyKind::CorrelationId, &entry.correlation_id),
        (KeyKind::UserId, &entry.user_id),
    ] {
        if let Some(value) = value {
            doc.add_u64(fields.keys, key_hash(kind, value));
        }
    }
    for tag in &entry.tags {
        doc.add_text(fields.tags, tag);
    }
    if full_text {
        doc.add_text(fields.message, &entry.message);
    }
    doc.add_u64(fields.pattern, pattern_hash(&entry.message));
    if let Some(context) = entry.context {
        let numbers = numeric_fields(context.get());
        if !numbers.is_empty() {
            let object: BTreeMap<String, OwnedValue> = numbers
                .into_iter()
                .map(|(k, v)| (k, OwnedValue::F64(v)))
                .collect();
            doc.add_object(fields.num, object);
        }
    }
    doc.add_u64(fields.raw_len, json.len() as u64);
    doc.add_bytes(fields.src, json);
    doc
}
