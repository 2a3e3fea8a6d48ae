//! The indexer: the WAL consumer that feeds the embedded store.
//!
//! It runs on its own thread and reads durable records from its WAL cursor. Each entry goes
//! into the block being filled of its day's partition, and is searchable at once. A full block
//! is sealed (kept in memory, read as it is); a partition's blocks in memory are flushed to a
//! part when there are enough of them ([`IndexerOptions::flush_rows`], or as many bytes as
//! `INDEX_WRITER_MEMORY_MB`), when the partition has been idle for [`IDLE_FLUSH`], when its
//! oldest entry in memory is [`MAX_AGE`] old, and on stop.
//!
//! Exactly once without id lookups: a part carries the WAL range it covers; after a crash
//! the indexer replays from its cursor and each partition skips every record before the end
//! of its last part. The cursor it persists never passes the oldest entry that is only in
//! memory, so a crash loses nothing that the WAL does not still hold.
//!
//! Flushes of idle partitions leave small parts; when a partition holds [`MERGE_PARTS`] of
//! them, an idle indexer merges them into one (the merged part is written before the others
//! go, and one found inside another's range on opening is removed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use logging_common::Timestamp;

use super::block::{BLOCK_ROWS, BlockBuilder};
use super::part::{self, Part, WriteOptions};
use super::{IndexError, LogIndex, MemBlock, Partition, template};
use crate::wal::{Record, WalError, WalReader};

/// A partition with entries in memory is flushed once nothing has come for this long…
pub const IDLE_FLUSH: Duration = Duration::from_secs(5);
/// …or once its oldest entry in memory is this old.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Full blocks a partition keeps in memory before it is flushed to a part.
pub const FLUSH_BLOCKS: usize = 16;
/// Parts smaller than this are merged once there are [`MERGE_PARTS`] of them.
pub const SMALL_PART_ROWS: u64 = 4 * BLOCK_ROWS as u64;
pub const MERGE_PARTS: usize = 4;
const RETENTION_CHECK: Duration = Duration::from_secs(60);
const READ_BYTES: usize = 1024 * 1024;
/// Failures a stopping indexer retries before it gives up (see `Indexer::recover`).
const STOPPING_ATTEMPTS: u32 = 3;

/// How the indexer runs.
#[derive(Clone, Debug)]
pub struct IndexerOptions {
    pub refresh: Duration,
    /// Rows a partition keeps in memory before it is flushed.
    pub flush_rows: usize,
    /// Bytes of stored lines a partition keeps in memory before it is flushed.
    pub flush_bytes: u64,
    pub retention_days: u32,
    pub write: WriteOptions,
}

/// The indexer's state for one day partition.
struct DayWriter {
    partition: Arc<Partition>,
    /// The WAL position the partition's parts cover up to.
    committed: u64,
    /// Where its oldest entry in memory is in the WAL.
    memory_from: Option<u64>,
    first_append: Instant,
    last_append: Instant,
    rows: usize,
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
enum IndexerError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Wal(#[from] WalError),
}

pub struct Indexer {
    index: Arc<LogIndex>,
    wal: WalReader,
    options: IndexerOptions,
    writers: BTreeMap<i64, DayWriter>,
    /// Position the cursor was last persisted at.
    persisted: u64,
    healthy: Arc<AtomicBool>,
    /// Lines of the record being applied, by day.
    pending: BTreeMap<i64, Vec<(bytes::Bytes, u64)>>,
    failures_while_stopping: u32,
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
            pending: BTreeMap::new(),
            failures_while_stopping: 0,
        }
    }

    /// Runs until `stop` is set and everything durable has been indexed and flushed.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut next_retention = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            // At most 200 ms: a stop requested while idle is seen promptly.
            let wait = if stopping {
                Duration::ZERO
            } else {
                self.options.refresh.min(Duration::from_millis(200))
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
                    self.index.publish_searchable(self.wal.position());
                    metrics::histogram!("logging_aggregator_indexer_phase_seconds", "phase" => "apply")
                        .record(applied.elapsed().as_secs_f64());
                    Ok(caught_up)
                });
            let caught_up = match step {
                Ok(caught_up) => caught_up,
                Err(error) => {
                    if self.recover(&error, stopping) {
                        return;
                    }
                    continue;
                }
            };
            let flushing = Instant::now();
            if let Err(error) = self.flush_due(stopping) {
                if self.recover(&error, stopping) {
                    return;
                }
                continue;
            }
            metrics::histogram!("logging_aggregator_indexer_phase_seconds", "phase" => "flush")
                .record(flushing.elapsed().as_secs_f64());
            if let Err(error) = self.persist_cursor() {
                if self.recover(&error, stopping) {
                    return;
                }
                continue;
            }
            self.healthy.store(true, Ordering::Release);
            if caught_up && !stopping {
                self.merge_small_parts();
                if self.writers.values().all(|w| w.rows == 0) {
                    self.wal.retire_consumed();
                }
            }
            self.apply_archive_changes();
            let now = Instant::now();
            if now >= next_retention {
                self.enforce_retention();
                next_retention = now + RETENTION_CHECK;
            }
            if stopping && caught_up && self.writers.values().all(|w| w.rows == 0) {
                tracing::info!(
                    position = self.persisted,
                    "indexer stopped with everything flushed"
                );
                return;
            }
        }
    }

    fn writer(&mut self, day: i64) -> Result<&mut DayWriter, IndexerError> {
        if !self.writers.contains_key(&day) {
            let partition = self.index.partition_for_write(day)?;
            let committed = partition.committed_lsn();
            let now = Instant::now();
            self.writers.insert(
                day,
                DayWriter {
                    partition,
                    committed,
                    memory_from: None,
                    first_append: now,
                    last_append: now,
                    rows: 0,
                    bytes: 0,
                },
            );
        }
        self.writers.get_mut(&day).ok_or_else(|| {
            IndexerError::Index(IndexError::Io(std::io::Error::other("writer vanished")))
        })
    }

    /// Adds a record's entries to their partitions' blocks being filled.
    fn apply(&mut self, record: &Record) -> Result<(), IndexerError> {
        let mut pending = std::mem::take(&mut self.pending);
        for (i, line) in record.lines().enumerate() {
            let Some(ts) = timestamp_of(&line) else {
                // The WAL's checksum held, so this is a bug of ours, not a torn write: say so
                // loudly and keep going with the rest.
                tracing::error!(lsn = record.lsn, "unreadable entry in the WAL");
                metrics::counter!("logging_aggregator_index_errors_total").increment(1);
                continue;
            };
            pending
                .entry(ts.day())
                .or_default()
                .push((line, record.lsn + i as u64));
        }
        for (day, lines) in &mut pending {
            if lines.is_empty() {
                continue;
            }
            let writer = self.writer(*day)?;
            if record.lsn < writer.committed {
                lines.clear();
                continue;
            }
            let partition = writer.partition.clone();
            let mut added = 0;
            let mut bytes = 0;
            {
                let state = partition.state.read();
                let mut open = state.open.write();
                for (line, seq) in lines.drain(..) {
                    match open.push(&line, seq) {
                        Ok(()) => {
                            added += 1;
                            bytes += line.len() as u64;
                        }
                        Err(error) => {
                            tracing::error!(lsn = record.lsn, %error, "unreadable entry in the WAL");
                            metrics::counter!("logging_aggregator_index_errors_total").increment(1);
                        }
                    }
                }
                drop(open);
                drop(state);
            }
            partition
                .changes
                .fetch_add(added as u64, std::sync::atomic::Ordering::AcqRel);
            let writer = self.writer(*day)?;
            if added > 0 {
                let now = Instant::now();
                if writer.memory_from.is_none() {
                    writer.memory_from = Some(record.lsn);
                    writer.first_append = now;
                }
                writer.last_append = now;
                writer.rows += added;
                writer.bytes += bytes;
            }
            seal_if_full(&writer.partition);
        }
        self.pending = pending;
        metrics::counter!("logging_aggregator_indexed_entries_total")
            .increment(u64::from(record.count));
        Ok(())
    }

    /// Flushes the partitions that are due (all of them when stopping).
    fn flush_due(&mut self, stopping: bool) -> Result<(), IndexerError> {
        let position = self.wal.position();
        let days: Vec<i64> = self
            .writers
            .iter()
            .filter(|(_, w)| {
                w.rows > 0
                    && (stopping
                        || w.rows >= self.options.flush_rows
                        || w.bytes >= self.options.flush_bytes
                        || w.last_append.elapsed() >= IDLE_FLUSH
                        || w.first_append.elapsed() >= MAX_AGE)
            })
            .map(|(d, _)| *d)
            .collect();
        for day in days {
            let writer = self.writer(day)?;
            let from = writer.memory_from.unwrap_or(writer.committed);
            let partition = writer.partition.clone();
            let refreshing = tracing::debug_span!(
                "index refresh",
                day = %super::day_name(day),
                entries = writer.rows,
                bytes = writer.bytes,
                wal.from = from,
                wal.to = position,
            );
            let started = Instant::now();
            refreshing.in_scope(|| flush(&partition, from, position, self.options.write))?;
            drop(refreshing);
            let writer = self.writer(day)?;
            tracing::debug!(day = %super::day_name(day), rows = writer.rows, seconds = started.elapsed().as_secs_f64(), "flushed a part");
            metrics::histogram!("logging_aggregator_index_refresh_seconds")
                .record(started.elapsed().as_secs_f64());
            writer.committed = position;
            writer.memory_from = None;
            writer.rows = 0;
            writer.bytes = 0;
        }
        Ok(())
    }

    /// Persists the cursor: up to what is read, but never past an entry only in memory.
    fn persist_cursor(&mut self) -> Result<(), IndexerError> {
        let position = self.wal.position();
        let cursor = self
            .writers
            .values()
            .filter_map(|w| w.memory_from)
            .min()
            .unwrap_or(position)
            .min(position);
        if cursor > self.persisted {
            self.wal.commit(cursor)?;
            self.persisted = cursor;
        }
        Ok(())
    }

    /// After a failure, throw away what is only in memory and replay it from the WAL. Says
    /// whether to give up instead: when stopping, after [`STOPPING_ATTEMPTS`] failures, so a
    /// store that keeps failing (a full or removed disk) cannot hold the process up; what was
    /// not flushed is still in the WAL and is indexed on the next start.
    fn recover(&mut self, error: &IndexerError, stopping: bool) -> bool {
        tracing::error!(%error, position = self.persisted, "indexing failed; replaying from the last flush");
        if stopping {
            self.failures_while_stopping += 1;
            if self.failures_while_stopping >= STOPPING_ATTEMPTS {
                tracing::error!(
                    position = self.persisted,
                    "indexer stopped without indexing everything; the rest is replayed from the WAL on the next start"
                );
                return true;
            }
        }
        metrics::counter!("logging_aggregator_index_errors_total").increment(1);
        self.healthy.store(false, Ordering::Release);
        for writer in self.writers.values() {
            let mut state = writer.partition.state.write();
            state.sealed.clear();
            *state.open.write() = BlockBuilder::default();
        }
        self.writers.clear();
        self.pending.clear();
        self.wal.seek(self.persisted);
        std::thread::sleep(Duration::from_secs(1));
        false
    }

    /// Merges a partition's small parts, one partition a call, when there are enough.
    fn merge_small_parts(&mut self) {
        for day in self.index.days() {
            let Some(partition) = self.index.partition(day) else {
                continue;
            };
            let parts = partition.parts();
            // Parts restored from the archive stay as they are: dropping the restore removes
            // exactly them.
            let small: Vec<Arc<Part>> = parts
                .iter()
                .filter(|p| p.rows() < SMALL_PART_ROWS && !p.archived)
                .cloned()
                .collect();
            if small.len() < MERGE_PARTS {
                continue;
            }
            // Consecutive in WAL order, so the merged range covers exactly them.
            let run: Vec<Arc<Part>> = consecutive_run(&parts, &small);
            if run.len() < 2 {
                continue;
            }
            let started = Instant::now();
            match merge(&partition, &run, self.options.write) {
                Ok(rows) => tracing::info!(day = %super::day_name(day), parts = run.len(), rows,
                    seconds = started.elapsed().as_secs_f64(), "merged small parts"),
                Err(error) => {
                    tracing::error!(day = %super::day_name(day), %error, "cannot merge parts")
                }
            }
            return;
        }
    }

    /// Applies what the archive asked for (see [`super::archived`]).
    fn apply_archive_changes(&mut self) {
        use super::archived::ArchiveChange;
        for request in self.index.take_archive_changes() {
            let result = match &request.change {
                ArchiveChange::Archived { day, parts } => {
                    let writing = self.writers.get(day).is_some_and(|w| w.rows > 0);
                    let removed = self.index.remove_archived(*day, parts, writing);
                    if self.index.partition(*day).is_none() {
                        self.writers.remove(day);
                    }
                    removed
                }
                ArchiveChange::Restored { day, parts } => self.index.add_restored(*day, parts),
                ArchiveChange::Unrestored { day } => {
                    let removed = self.index.remove_restored(*day);
                    if self.index.partition(*day).is_none() {
                        self.writers.remove(day);
                    }
                    removed
                }
            };
            if let Err(error) = &result {
                tracing::error!(change = ?request.change, %error, "cannot apply an archive change");
            }
            let _ = request.reply.send(result);
        }
    }

    fn enforce_retention(&mut self) {
        let cutoff = Timestamp::now().saturating_add_nanos(
            -(i64::from(self.options.retention_days) * 86_400 * 1_000_000_000),
        );
        let oldest_kept = cutoff.day();
        for day in self.index.days().into_iter().filter(|d| *d < oldest_kept) {
            if !self.index.may_expire(day) {
                tracing::warn!(day = %super::day_name(day),
                    "past LOG_RETENTION_DAYS but not yet in the archive; kept until it is");
                continue;
            }
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

#[cfg(test)]
impl Indexer {
    /// Reads and applies what the WAL holds, flushing nothing; returns the records read.
    pub fn read_for_test(&mut self) -> usize {
        let records = self.wal.next_records(usize::MAX, Duration::ZERO).unwrap();
        for record in &records {
            self.apply(record).unwrap();
        }
        self.index.publish_searchable(self.wal.position());
        records.len()
    }

    /// Flushes everything in memory and persists the cursor, as a stop does.
    pub fn finish_for_test(&mut self) {
        self.flush_due(true).unwrap();
        self.persist_cursor().unwrap();
    }

    /// Runs one round of merging.
    pub fn merge_for_test(&mut self) {
        self.merge_small_parts();
    }
}

/// The entry's timestamp, read from the head of its stored line (or, for a line not in the
/// canonical form, from its JSON).
fn timestamp_of(line: &[u8]) -> Option<Timestamp> {
    // The canonical head: `{"id":"<36>","timestamp":"…"`; the block checks the rest.
    if let Some(rest) = line
        .get(43..)
        .filter(|_| line.starts_with(b"{\"id\":\""))
        .and_then(|r| r.strip_prefix(b"\",\"timestamp\":\""))
        && let Some(end) = memchr::memchr(b'"', rest)
        && let Some(ts) = std::str::from_utf8(&rest[..end])
            .ok()
            .and_then(|t| Timestamp::parse_rfc3339(t).ok())
    {
        return Some(ts);
    }
    let _ = template::split_line;
    #[derive(serde::Deserialize)]
    struct Ts {
        timestamp: Timestamp,
    }
    serde_json::from_slice::<Ts>(line).ok().map(|t| t.timestamp)
}

/// Moves a full block being filled to the sealed blocks.
fn seal_if_full(partition: &Partition) {
    if partition.state.read().open.read().rows() < super::block::BLOCK_ROWS {
        return;
    }
    let mut state = partition.state.write();
    let open = state.open.clone();
    let mut builder = open.write();
    let slots = builder.slots().to_vec();
    let block = builder.take();
    drop(builder);
    let summary = block.summary();
    state.sealed.push(Arc::new(MemBlock {
        block,
        slots,
        summary,
    }));
}

/// Writes the partition's blocks in memory as the part covering `[from, to)`, then makes it
/// what readers see in their place.
fn flush(
    partition: &Partition,
    from: u64,
    to: u64,
    options: WriteOptions,
) -> Result<(), IndexError> {
    let (sealed, open) = {
        let state = partition.state.read();
        (state.sealed.clone(), state.open.clone())
    };
    let path = {
        let open = open.read();
        let mut blocks: Vec<&super::block::Block> = sealed.iter().map(|m| &m.block).collect();
        if open.rows() > 0 {
            blocks.push(&open.block);
        }
        part::write(
            &partition.dir,
            partition.day,
            from,
            to,
            &blocks,
            options,
            partition.keyring.as_deref(),
        )?
    };
    let part = Arc::new(Part::open(&path, partition.keyring.as_deref())?);
    let mut state = partition.state.write();
    state.parts.push(part);
    state.parts.sort_by_key(|p| p.lsn_from);
    state.sealed.clear();
    *state.open.write() = BlockBuilder::default();
    Ok(())
}

/// The longest run of `small` parts that follow each other in `parts` (WAL order).
fn consecutive_run(parts: &[Arc<Part>], small: &[Arc<Part>]) -> Vec<Arc<Part>> {
    let mut best: Vec<Arc<Part>> = Vec::new();
    let mut run: Vec<Arc<Part>> = Vec::new();
    for part in parts {
        if small.iter().any(|s| Arc::ptr_eq(s, part)) {
            run.push(part.clone());
            if run.len() > best.len() {
                best = run.clone();
            }
        } else {
            run.clear();
        }
    }
    best
}

/// The rows of `parts`, in order, as full blocks for a new part, and how many there are.
pub(super) fn rebuild(parts: &[Arc<Part>]) -> Result<(Vec<super::block::Block>, u64), IndexError> {
    let mut builder = BlockBuilder::default();
    let mut blocks = Vec::new();
    let mut rows = 0u64;
    for part in parts {
        for b in 0..part.blocks.len() {
            let view = super::scan::View::disk(part, b);
            let all: Vec<usize> = (0..view.rows()).collect();
            let seq = view.seq()?.to_vec();
            for (row, line) in all.iter().zip(view.lines(&all)?) {
                if builder.push(&line, seq[*row]).is_ok() {
                    rows += 1;
                }
                if builder.rows() >= BLOCK_ROWS {
                    blocks.push(builder.take());
                }
            }
        }
    }
    if builder.rows() > 0 {
        blocks.push(builder.take());
    }
    Ok((blocks, rows))
}

/// Merges `run` (consecutive parts of `partition`) into one part; returns its rows.
fn merge(
    partition: &Partition,
    run: &[Arc<Part>],
    options: WriteOptions,
) -> Result<u64, IndexError> {
    let from = run.iter().map(|p| p.lsn_from).min().unwrap_or(0);
    let to = run.iter().map(|p| p.lsn_to).max().unwrap_or(0);
    let (blocks, rows) = rebuild(run)?;
    let refs: Vec<&super::block::Block> = blocks.iter().collect();
    let path = part::write(
        &partition.dir,
        partition.day,
        from,
        to,
        &refs,
        options,
        partition.keyring.as_deref(),
    )?;
    let merged = Arc::new(Part::open(&path, partition.keyring.as_deref())?);
    {
        let mut state = partition.state.write();
        state
            .parts
            .retain(|p| !run.iter().any(|r| Arc::ptr_eq(r, p)));
        state.parts.push(merged);
        state.parts.sort_by_key(|p| p.lsn_from);
    }
    for old in run {
        // Readers still holding it keep the file open; it goes when they finish.
        let _ = std::fs::remove_file(&old.path);
    }
    crate::wal::sync_dir(&partition.dir)?;
    Ok(rows)
}
