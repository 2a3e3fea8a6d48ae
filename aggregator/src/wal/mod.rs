//! The write-ahead log: what makes an acknowledged entry survive a SIGKILL.
//!
//! Writes go to one writer thread, which takes every request that is waiting, decides for each
//! entry whether it is new (the [`Admission`] hook: dedup by id), appends one record per
//! request, and makes the whole group durable with a single `fdatasync` before it answers any
//! of them (group commit). Under load one fsync serves many requests.
//!
//! Each consumer of the log (the embedded index now; sinks and the alert evaluator later)
//! reads through a [`WalReader`] with its own cursor, persisted atomically when the consumer
//! says what it has applied. On start a consumer resumes from its cursor, so whatever it had
//! not applied when the process died is replayed. Segments are deleted once every consumer has
//! passed them. Recent records are also kept decoded in memory, so a consumer that keeps up
//! never reads back from disk or parses an entry twice.

mod segment;

pub use segment::sync_dir;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use logging_common::LogEntry;
use logging_common::crypto::Keyring;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use segment::{
    HEADER_LEN, RawRecord, ReadOutcome, SegmentFile, SegmentReader, encode_record, list_segments,
    record_len, segment_file_name,
};

/// Recent records kept in memory, so a consumer that keeps up (or falls behind by less than
/// this) never reads back from disk. Larger than the ingest lag limit on purpose.
const RECENT_BYTES: usize = 48 * 1024 * 1024;
/// A group commit takes at most this many bytes of requests before it syncs.
const GROUP_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the write-ahead log is closed")]
    Closed,
    #[error("the write-ahead log failed earlier and refuses writes until restarted: {0}")]
    Failed(String),
}

/// A durable record, as consumers see it: the entries exactly as stored, one JSON line each.
/// Each consumer parses what it needs (the indexer borrows a few fields; a sink may forward
/// the bytes untouched), so nothing is kept decoded in memory twice.
#[derive(Debug)]
pub struct Record {
    /// Position of the record's first byte.
    pub lsn: u64,
    /// Position just past the record: where the next one starts.
    pub end: u64,
    /// How many entries it holds.
    pub count: u32,
    /// The entries as stored: NDJSON, one line per entry.
    pub payload: Bytes,
}

impl Record {
    /// Each entry's stored JSON.
    pub fn lines(&self) -> impl Iterator<Item = Bytes> + '_ {
        let mut rest = self.payload.clone();
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let cut = memchr::memchr(b'\n', &rest).unwrap_or(rest.len());
            let line = rest.slice(..cut);
            rest = rest.slice((cut + 1).min(rest.len())..);
            Some(line)
        })
    }

    fn from_raw(raw: RawRecord) -> Record {
        Record {
            lsn: raw.lsn,
            end: raw.end(),
            count: raw.count,
            payload: Bytes::from(raw.payload),
        }
    }
}

/// The id of a stored entry line, read without parsing the rest.
pub fn id_of_line(line: &[u8]) -> Option<Uuid> {
    #[derive(Deserialize)]
    struct Id {
        id: Uuid,
    }
    serde_json::from_slice::<Id>(line).ok().map(|i| i.id)
}

/// The dedup decision, made in the writer thread so that it is ordered with the writes.
pub trait Admission: Send + 'static {
    /// For each entry: `None` if it is new (and is now remembered as pending at
    /// `record_lsn`), or `Some(lsn)` if it duplicates an entry stored at or before `lsn`
    /// (0 when that entry is already searchable).
    fn admit(&mut self, ids: &[Uuid], record_lsn: u64) -> Vec<Option<u64>>;
    /// The write of these ids failed: forget them.
    fn forget(&mut self, ids: &[Uuid]);
}

/// Entries to append, with their JSON already written (by the request's own task, so the
/// serialisation runs in parallel rather than in the writer thread).
pub struct Batch {
    pub ids: Vec<Uuid>,
    /// NDJSON: the entries' JSON, each followed by `\n`.
    pub json: Vec<u8>,
    /// End offset in `json` (after the newline) of each entry.
    pub ends: Vec<usize>,
}

impl Batch {
    pub fn new(entries: &[LogEntry]) -> Batch {
        Batch::build(entries, |_| None)
    }

    /// The batch, with `agent(i)` (if any) written first into entry `i`'s context.
    pub fn build<'a>(entries: &[LogEntry], agent: impl Fn(usize) -> Option<&'a str>) -> Batch {
        let mut json = Vec::with_capacity(entries.len() * 512);
        let mut ends = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            entry.write_stored(agent(i), &mut json);
            json.push(b'\n');
            ends.push(json.len());
        }
        Batch {
            ids: entries.iter().map(|e| e.id).collect(),
            json,
            ends,
        }
    }
}

/// What happened to a batch.
#[derive(Debug)]
pub struct Appended {
    /// Per entry: `None` if stored now, `Some(lsn)` if it was a duplicate (see [`Admission`]).
    pub duplicates: Vec<Option<u64>>,
    /// The highest LSN a reader must pass to see every entry of the batch (new or duplicate).
    pub visible_after: u64,
    /// The group commit that made it durable.
    pub group: GroupCommit,
}

/// One group commit, as a request that waited for it sees it (for its trace span).
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupCommit {
    /// Requests that shared the write and its fsync.
    pub requests: usize,
    /// Bytes written.
    pub bytes: usize,
    /// From the group's start to its replies (write and fsync).
    pub seconds: f64,
}

enum Job {
    Append(Appending),
    /// Start a new segment if every consumer has read and committed all of the active one,
    /// so that an idle WAL keeps nothing it has delivered on disk.
    RetireConsumed,
}

struct Appending {
    batch: Batch,
    reply: oneshot::Sender<Result<Appended, WalError>>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum CursorFile {
    #[serde(rename = "1")]
    V1 { lsn: u64 },
}

struct State {
    /// (first LSN, path) of every segment; the last is the one being written.
    segments: Vec<(u64, PathBuf)>,
    recent: VecDeque<Arc<Record>>,
    recent_bytes: usize,
    /// Persisted positions (what each consumer has applied for good).
    cursors: HashMap<String, u64>,
    /// Read positions (what each consumer has taken so far): lag is measured from these.
    positions: HashMap<String, u64>,
    /// (end LSN, entries up to and including the record) for records not yet passed by every
    /// consumer, to answer "how many entries behind".
    counts: VecDeque<(u64, u64)>,
    counted_before: u64,
    total_entries: u64,
    /// Consumers that may never be skipped (the index, the alert evaluator). The others (the
    /// sinks, and cursors left by consumers no longer configured) give way to the disk cap.
    required: HashSet<String>,
    /// Consumers for which what is read is applied (the index: read means searchable), so
    /// their lag is reported from their read position rather than their persisted cursor,
    /// which trails on purpose.
    applied_on_read: HashSet<String>,
    /// Entries each optional consumer lost to the disk cap.
    overrun: HashMap<String, u64>,
}

impl State {
    /// Entries appended before `lsn` (as far as the counts still reach).
    fn entries_at(&self, lsn: u64) -> u64 {
        let i = self.counts.partition_point(|(e, _)| *e <= lsn);
        if i == 0 {
            self.counted_before
        } else {
            self.counts[i - 1].1
        }
    }
}

struct Shared {
    dir: PathBuf,
    /// Seals every record's payload when encryption at rest is on.
    keyring: Option<Arc<Keyring>>,
    state: Mutex<State>,
    appended: Condvar,
    /// Everything before this LSN is durable.
    durable_end: AtomicU64,
    failed: AtomicBool,
    /// Most bytes the segments may hold for optional consumers; 0 = no cap.
    disk_cap: AtomicU64,
    /// The writer's queue, for consumers asking it to retire a consumed segment (weak: the
    /// writer stops when the [`Wal`] is dropped).
    jobs: mpsc::WeakSender<Job>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sizes and positions, for stats and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct WalStats {
    pub segments: usize,
    pub bytes_on_disk: u64,
    pub end_lsn: u64,
    pub consumers: Vec<ConsumerLag>,
}

/// Where one consumer is. `lag_*` count what it has not yet applied for good (up to its
/// persisted cursor); `read_position` is how far it has read, which moves ahead of that
/// between its commits.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumerLag {
    pub name: String,
    pub position: u64,
    pub read_position: u64,
    pub lag_bytes: u64,
    pub lag_entries: u64,
    /// Entries this consumer skipped because the WAL reached its disk cap.
    pub overrun_entries: u64,
}

/// What the WAL held for consumers when it was opened.
pub struct Recovered {
    /// Ids of the entries after the slowest consumer's cursor, with their record's LSN: not
    /// yet (known to be) applied everywhere, so dedup must treat them as pending.
    pub unapplied: Vec<(Uuid, u64)>,
    pub records: usize,
    pub truncated_bytes: u64,
}

/// The write-ahead log.
pub struct Wal {
    shared: Arc<Shared>,
    sender: mpsc::Sender<Job>,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`, recovering from a crash: a torn tail is cut off.
    ///
    /// `min_start` is the highest LSN any consumer's own store claims to have applied; a WAL
    /// that lost its files starts no lower, so no consumer ever skips a new record.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        min_start: u64,
        admission: Box<dyn Admission>,
        keyring: Option<Arc<Keyring>>,
    ) -> Result<(Wal, Recovered), WalError> {
        std::fs::create_dir_all(dir.join("cursors"))?;
        let cursors = read_cursors(&dir.join("cursors"))?;
        let slowest = cursors.values().copied().min().unwrap_or(0);

        let mut segments = list_segments(dir)?;
        let mut recovered = Recovered {
            unapplied: Vec::new(),
            records: 0,
            truncated_bytes: 0,
        };
        let mut counts = VecDeque::new();
        let mut total_entries = 0u64;
        let mut end = 0u64;
        let last = segments.len().saturating_sub(1);
        for (i, (start, path)) in segments.iter().enumerate() {
            let mut reader = SegmentReader::open(path, *start, *start, keyring.clone())?;
            loop {
                match reader.next_record()? {
                    ReadOutcome::Record(raw) => {
                        recovered.records += 1;
                        total_entries += u64::from(raw.count);
                        counts.push_back((raw.end(), total_entries));
                        if raw.end() > slowest {
                            let record = Record::from_raw(raw);
                            recovered.unapplied.extend(
                                record
                                    .lines()
                                    .filter_map(|l| id_of_line(&l))
                                    .map(|id| (id, record.lsn)),
                            );
                        }
                    }
                    ReadOutcome::End => break,
                    ReadOutcome::Invalid { at, reason } => {
                        let len = std::fs::metadata(path)?.len();
                        let cut = len - (at - start);
                        if i == last {
                            tracing::warn!(segment = %path.display(), at, reason, bytes = cut,
                                "cutting off the unacknowledged tail of the WAL");
                            OpenOptions::new()
                                .write(true)
                                .open(path)?
                                .set_len(at - start)?;
                        } else {
                            tracing::error!(segment = %path.display(), at, reason, bytes = cut,
                                "corrupt WAL segment; its remaining records are skipped");
                        }
                        recovered.truncated_bytes += cut;
                        break;
                    }
                }
            }
            end = reader.lsn();
        }
        if segments.is_empty() {
            let start = min_start.max(cursors.values().copied().max().unwrap_or(0));
            let path = dir.join(segment_file_name(start));
            File::create(&path)?.sync_all()?;
            sync_dir(dir)?;
            segments.push((start, path));
            end = start;
        }
        if end < min_start {
            tracing::warn!(
                end,
                min_start,
                "the WAL is behind the index; starting a new segment"
            );
            let path = dir.join(segment_file_name(min_start));
            File::create(&path)?.sync_all()?;
            sync_dir(dir)?;
            segments.push((min_start, path));
            end = min_start;
        }

        let active_path = segments.last().map(|(_, p)| p.clone()).unwrap_or_default();
        let active_start = segments.last().map_or(0, |(s, _)| *s);
        let active = SegmentFile::open(&active_path)?;

        let (sender, receiver) = mpsc::channel(1024);
        let weak = sender.downgrade();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            keyring,
            state: Mutex::new(State {
                segments,
                recent: VecDeque::new(),
                recent_bytes: 0,
                cursors: HashMap::new(),
                positions: HashMap::new(),
                counts,
                counted_before: 0,
                total_entries,
                required: HashSet::new(),
                applied_on_read: HashSet::new(),
                overrun: HashMap::new(),
            }),
            appended: Condvar::new(),
            durable_end: AtomicU64::new(end),
            failed: AtomicBool::new(false),
            disk_cap: AtomicU64::new(0),
            jobs: weak,
        });
        let writer = Writer {
            shared: shared.clone(),
            receiver,
            admission,
            segment_bytes,
            active,
            active_start,
            active_len: end - active_start,
        };
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run())?;
        Ok((Wal { shared, sender }, recovered))
    }

    /// Appends a batch; returns once it is durable (or was entirely duplicates).
    pub async fn append(&self, batch: Batch) -> Result<Appended, WalError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job::Append(Appending { batch, reply }))
            .await
            .map_err(|_| WalError::Closed)?;
        answer.await.map_err(|_| WalError::Closed)?
    }

    /// Caps the bytes kept on disk for optional consumers (0 = no cap). Past it, the oldest
    /// segments go once every required consumer has passed them, and an optional consumer
    /// still in them skips ahead: counted in `overrun_entries` and
    /// `logging_aggregator_wal_overrun_entries_total`.
    pub fn set_disk_cap(&self, bytes: u64) {
        self.shared.disk_cap.store(bytes, Ordering::Release);
    }

    /// Opens a reader for a consumer that may never be skipped (see `set_disk_cap`).
    pub fn reader(&self, name: &str) -> Result<WalReader, WalError> {
        self.shared.lock().required.insert(name.to_string());
        self.open_reader(name)
    }

    /// Opens a reader for a required consumer that applies what it reads at once (the
    /// index), so its lag is what it has not read, whatever its persisted cursor says.
    pub fn applying_reader(&self, name: &str) -> Result<WalReader, WalError> {
        self.shared.lock().applied_on_read.insert(name.to_string());
        self.reader(name)
    }

    /// Opens a reader for a consumer that gives way to the disk cap (a sink).
    pub fn optional_reader(&self, name: &str) -> Result<WalReader, WalError> {
        self.shared.lock().required.remove(name);
        self.open_reader(name)
    }

    /// Opens a reader for the consumer `name`, at its persisted cursor.
    fn open_reader(&self, name: &str) -> Result<WalReader, WalError> {
        let dir = self.shared.dir.join("cursors");
        let persisted = read_cursors(&dir)?.get(name).copied();
        let mut state = self.shared.lock();
        let oldest = state.segments.first().map_or(0, |(s, _)| *s);
        let durable = self.shared.durable_end.load(Ordering::Acquire);
        let position = persisted.unwrap_or(oldest).clamp(oldest, durable);
        state.cursors.insert(name.to_string(), position);
        state.positions.insert(name.to_string(), position);
        Ok(WalReader {
            shared: self.shared.clone(),
            name: name.to_string(),
            next: position,
            disk: None,
        })
    }

    pub fn end_lsn(&self) -> u64 {
        self.shared.durable_end.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        !self.shared.failed.load(Ordering::Acquire) && !self.sender.is_closed()
    }

    /// Bytes the named consumer has yet to read (what ingest backpressure is measured on).
    pub fn unread_bytes(&self, name: &str) -> u64 {
        self.bytes_past(name, |state| &state.positions)
    }

    /// Bytes durable in the WAL past what consumer `name` has committed (0 for a consumer
    /// it does not know).
    pub fn uncommitted_bytes(&self, name: &str) -> u64 {
        self.bytes_past(name, |state| &state.cursors)
    }

    fn bytes_past(&self, name: &str, of: impl Fn(&State) -> &HashMap<String, u64>) -> u64 {
        let state = self.shared.lock();
        let end = self.shared.durable_end.load(Ordering::Acquire);
        of(&state).get(name).map_or(0, |c| end.saturating_sub(*c))
    }

    pub fn stats(&self) -> WalStats {
        let state = self.shared.lock();
        let end = self.shared.durable_end.load(Ordering::Acquire);
        let bytes_on_disk = state
            .segments
            .first()
            .map_or(0, |(start, _)| end.saturating_sub(*start));
        let mut consumers: Vec<ConsumerLag> = state
            .cursors
            .iter()
            .map(|(name, &position)| {
                let read_position = state.positions.get(name).copied().unwrap_or(position);
                let done = if state.applied_on_read.contains(name) {
                    read_position.max(position)
                } else {
                    position
                };
                ConsumerLag {
                    name: name.clone(),
                    position,
                    read_position,
                    lag_bytes: end.saturating_sub(done),
                    lag_entries: state.total_entries.saturating_sub(state.entries_at(done)),
                    overrun_entries: state.overrun.get(name).copied().unwrap_or(0),
                }
            })
            .collect();
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        WalStats {
            segments: state.segments.len(),
            bytes_on_disk,
            end_lsn: end,
            consumers,
        }
    }
}

fn read_cursors(dir: &Path) -> io::Result<HashMap<String, u64>> {
    let mut cursors = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            continue;
        }
        let text = std::fs::read(entry.path())?;
        match serde_json::from_slice::<CursorFile>(&text) {
            Ok(CursorFile::V1 { lsn }) => {
                cursors.insert(name, lsn);
            }
            Err(error) => {
                tracing::error!(cursor = %name, %error, "unreadable WAL cursor; replaying from the start");
            }
        }
    }
    Ok(cursors)
}

/// Drops the in-memory records every consumer has already read: the buffer only has to hold
/// what someone still needs.
fn forget_read_records(state: &mut State) {
    let slowest = state.positions.values().copied().min().unwrap_or(0);
    while state.recent.front().is_some_and(|r| r.end <= slowest) {
        if let Some(record) = state.recent.pop_front() {
            state.recent_bytes -= record.payload.len();
        }
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    receiver: mpsc::Receiver<Job>,
    admission: Box<dyn Admission>,
    segment_bytes: u64,
    active: SegmentFile,
    active_start: u64,
    active_len: u64,
}

struct Prepared {
    reply: oneshot::Sender<Result<Appended, WalError>>,
    duplicates: Vec<Option<u64>>,
    record: Option<Record>,
    new_ids: Vec<Uuid>,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(GROUP_BYTES);
        while let Some(first) = self.receiver.blocking_recv() {
            let mut retire = false;
            let mut jobs = Vec::new();
            let mut group_bytes = 0;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(appending) => {
                        group_bytes += appending.batch.json.len();
                        jobs.push(appending);
                    }
                    Job::RetireConsumed => retire = true,
                }
                if group_bytes < GROUP_BYTES {
                    next = self.receiver.try_recv().ok();
                }
            }
            if !jobs.is_empty() {
                if self.shared.failed.load(Ordering::Acquire) {
                    for job in jobs {
                        let _ = job.reply.send(Err(WalError::Failed(
                            "an earlier write could not be undone".into(),
                        )));
                    }
                } else {
                    self.commit_group(jobs, &mut buf);
                }
            }
            if retire && let Err(error) = self.retire_consumed() {
                tracing::warn!(%error, "cannot retire a consumed WAL segment");
            }
        }
    }

    /// Replaces the active segment by an empty one when every consumer has committed all of
    /// it, and deletes it.
    fn retire_consumed(&mut self) -> io::Result<()> {
        let end = self.active_start + self.active_len;
        if self.active_len == 0 {
            return Ok(());
        }
        {
            let state = self.shared.lock();
            if state.cursors.is_empty() || state.cursors.values().any(|c| *c < end) {
                return Ok(());
            }
        }
        let path = self.shared.dir.join(segment_file_name(end));
        let file = SegmentFile::create(&path)?;
        sync_dir(&self.shared.dir)?;
        self.active = file;
        self.active_start = end;
        self.active_len = 0;
        let mut removable = Vec::new();
        {
            let mut state = self.shared.lock();
            state.segments.push((end, path));
            while state.segments.len() > 1 && state.segments[1].0 <= end {
                removable.push(state.segments.remove(0).1);
            }
        }
        for path in removable {
            std::fs::remove_file(&path)?;
        }
        tracing::debug!(at = end, "retired the consumed WAL segment");
        Ok(())
    }

    fn commit_group(&mut self, jobs: Vec<Appending>, buf: &mut Vec<u8>) {
        let started = Instant::now();
        if let Err(error) = self.roll_if_full() {
            tracing::error!(%error, "cannot start a new WAL segment");
            for job in jobs {
                let _ = job.reply.send(Err(WalError::Io(io::Error::new(
                    error.kind(),
                    error.to_string(),
                ))));
            }
            return;
        }
        buf.clear();
        let base = self.active_start + self.active_len;
        let mut prepared = Vec::with_capacity(jobs.len());
        for job in jobs {
            let lsn = base + buf.len() as u64;
            let duplicates = self.admission.admit(&job.batch.ids, lsn);
            let Batch { ids, json, ends } = job.batch;
            let mut payload = Vec::with_capacity(json.len());
            let mut new_ids = Vec::with_capacity(ids.len());
            let mut start = 0;
            for ((id, end), dup) in ids.into_iter().zip(ends).zip(&duplicates) {
                if dup.is_none() {
                    if !payload.is_empty() {
                        payload.push(b'\n');
                    }
                    // Without the trailing newline: lines are separated, not terminated.
                    payload.extend_from_slice(&json[start..end - 1]);
                    new_ids.push(id);
                }
                start = end;
            }
            let record = (!new_ids.is_empty()).then(|| {
                let stored = match &self.shared.keyring {
                    Some(keyring) => std::borrow::Cow::Owned(keyring.seal(&payload)),
                    None => std::borrow::Cow::Borrowed(&payload[..]),
                };
                encode_record(buf, lsn, new_ids.len() as u32, &stored);
                Record {
                    lsn,
                    end: lsn + record_len(stored.len()),
                    count: new_ids.len() as u32,
                    payload: Bytes::from(payload),
                }
            });
            prepared.push(Prepared {
                reply: job.reply,
                duplicates,
                record,
                new_ids,
            });
        }

        if !buf.is_empty() {
            let len = self.active_len + buf.len() as u64;
            // Durable before anyone is told: the replies below go out only after this.
            let written = self.active.append(buf).and_then(|()| self.active.sync(len));
            if let Err(error) = written {
                tracing::error!(%error, "WAL write failed; the group is refused");
                metrics::counter!("logging_aggregator_wal_write_errors_total").increment(1);
                // Undo the partial write so the log stays a clean sequence of records.
                if let Err(undo) = self.active.set_len(self.active_len) {
                    tracing::error!(error = %undo, "cannot undo a failed WAL write; refusing writes");
                    self.shared.failed.store(true, Ordering::Release);
                }
                for p in prepared {
                    self.admission.forget(&p.new_ids);
                    let _ = p.reply.send(Err(WalError::Io(io::Error::new(
                        error.kind(),
                        error.to_string(),
                    ))));
                }
                return;
            }
            self.active_len += buf.len() as u64;
            metrics::counter!("logging_aggregator_wal_bytes_total").increment(buf.len() as u64);
            metrics::histogram!("logging_aggregator_wal_group_commit_seconds")
                .record(started.elapsed().as_secs_f64());
        }

        let end = self.active_start + self.active_len;
        let group = GroupCommit {
            requests: prepared.len(),
            bytes: buf.len(),
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut replies = Vec::with_capacity(prepared.len());
        {
            let mut state = self.shared.lock();
            for p in prepared {
                let mut visible_after = p.duplicates.iter().flatten().copied().max().unwrap_or(0);
                if let Some(record) = p.record {
                    visible_after = visible_after.max(record.lsn);
                    state.total_entries += u64::from(record.count);
                    let total = state.total_entries;
                    state.counts.push_back((record.end, total));
                    state.recent_bytes += record.payload.len();
                    state.recent.push_back(Arc::new(record));
                }
                replies.push((
                    p.reply,
                    Appended {
                        duplicates: p.duplicates,
                        visible_after,
                        group,
                    },
                ));
            }
            while state.recent_bytes > RECENT_BYTES {
                match state.recent.pop_front() {
                    Some(r) => state.recent_bytes -= r.payload.len(),
                    None => break,
                }
            }
            self.shared.durable_end.store(end, Ordering::Release);
        }
        self.shared.appended.notify_all();
        for (reply, appended) in replies {
            let _ = reply.send(Ok(appended));
        }
    }

    fn roll_if_full(&mut self) -> io::Result<()> {
        if self.active_len < self.segment_bytes {
            return Ok(());
        }
        let start = self.active_start + self.active_len;
        let path = self.shared.dir.join(segment_file_name(start));
        let file = SegmentFile::create(&path)?;
        sync_dir(&self.shared.dir)?;
        self.active = file;
        self.active_start = start;
        self.active_len = 0;
        self.shared.lock().segments.push((start, path));
        Ok(())
    }
}

/// One consumer's view of the log.
pub struct WalReader {
    shared: Arc<Shared>,
    name: String,
    next: u64,
    disk: Option<(u64, SegmentReader)>,
}

impl WalReader {
    /// The keys the WAL seals with: what its consumers seal their own files with.
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.shared.keyring.clone()
    }

    /// The LSN of the next record this reader will return.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Moves the reader to `lsn` (a record boundary), e.g. back to the last commit after a
    /// failure.
    pub fn seek(&mut self, lsn: u64) {
        self.next = lsn;
        self.disk = None;
        self.shared.lock().positions.insert(self.name.clone(), lsn);
    }

    /// Returns the next durable records (about `max_bytes` of them), waiting up to `timeout`
    /// when there are none yet. An empty result means the timeout passed.
    pub fn next_records(
        &mut self,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<Arc<Record>>, WalError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        // Segments before this reader went (the disk cap): it goes on from the oldest kept,
        // even if the records are still in memory, so what it skipped is what was counted.
        let oldest = state.segments.first().map_or(0, |(s, _)| *s);
        if self.next < oldest {
            self.next = oldest;
            self.disk = None;
        }
        loop {
            let durable = self.shared.durable_end.load(Ordering::Acquire);
            if self.next < durable {
                let in_memory = state.recent.front().is_some_and(|r| r.lsn <= self.next);
                if in_memory {
                    let i = state.recent.partition_point(|r| r.lsn < self.next);
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for record in state.recent.range(i..) {
                        if bytes >= max_bytes {
                            break;
                        }
                        bytes += record.payload.len();
                        self.next = record.end;
                        out.push(record.clone());
                    }
                    if !out.is_empty() {
                        self.disk = None;
                        state.positions.insert(self.name.clone(), self.next);
                        forget_read_records(&mut state);
                        return Ok(out);
                    }
                }
                let segments = state.segments.clone();
                drop(state);
                let out = self.read_from_disk(&segments, durable, max_bytes)?;
                self.shared
                    .lock()
                    .positions
                    .insert(self.name.clone(), self.next);
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            state = self
                .shared
                .appended
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn read_from_disk(
        &mut self,
        segments: &[(u64, PathBuf)],
        durable: u64,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Record>>, WalError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while self.next < durable && bytes < max_bytes {
            let i = segments.partition_point(|(start, _)| *start <= self.next);
            let Some((start, path)) = i.checked_sub(1).map(|i| &segments[i]) else {
                // Before the oldest segment (it was trimmed): jump to what exists.
                self.next = segments.first().map_or(durable, |(s, _)| *s);
                continue;
            };
            let reusable =
                matches!(&self.disk, Some((s, r)) if *s == *start && r.lsn() == self.next);
            if !reusable {
                let keyring = self.shared.keyring.clone();
                self.disk = Some((
                    *start,
                    SegmentReader::open(path, *start, self.next, keyring)?,
                ));
            }
            let Some((_, reader)) = self.disk.as_mut() else {
                break;
            };
            match reader.next_record()? {
                ReadOutcome::Record(raw) => {
                    bytes += raw.payload.len() + HEADER_LEN;
                    self.next = raw.end();
                    out.push(Arc::new(Record::from_raw(raw)));
                }
                ReadOutcome::End | ReadOutcome::Invalid { .. } => {
                    // The rest of this segment is unusable (or it ended): go on with the next.
                    self.disk = None;
                    match segments.get(i) {
                        Some((next_start, _)) => self.next = *next_start,
                        None => break,
                    }
                }
            }
        }
        Ok(out)
    }

    /// Over the disk cap: drops the oldest segments every required consumer has passed,
    /// moving optional consumers still in them to the new oldest segment. Returns the files.
    fn enforce_disk_cap(&self, state: &mut State) -> Vec<PathBuf> {
        let cap = self.shared.disk_cap.load(Ordering::Acquire);
        let end = self.shared.durable_end.load(Ordering::Acquire);
        let mut removable = Vec::new();
        if cap == 0 {
            return removable;
        }
        let required_slowest = state
            .cursors
            .iter()
            .filter(|(name, _)| state.required.contains(*name))
            .map(|(_, c)| *c)
            .min()
            .unwrap_or(end);
        while state.segments.len() > 1
            && end.saturating_sub(state.segments[0].0) > cap
            && state.segments[1].0 <= required_slowest
        {
            let oldest = state.segments[1].0;
            let behind: Vec<(String, u64)> = state
                .cursors
                .iter()
                .filter(|(_, c)| **c < oldest)
                .map(|(n, c)| (n.clone(), *c))
                .collect();
            // What lies before the current oldest segment was counted when it went.
            let floor = state.segments[0].0;
            for (name, cursor) in behind {
                let skipped = state
                    .entries_at(oldest)
                    .saturating_sub(state.entries_at(cursor.max(floor)));
                tracing::warn!(consumer = %name, entries = skipped, cap_bytes = cap,
                    "the WAL reached its disk cap: this consumer skips entries it had not delivered");
                metrics::counter!("logging_aggregator_wal_overrun_entries_total", "consumer" => name.clone())
                    .increment(skipped);
                *state.overrun.entry(name.clone()).or_insert(0) += skipped;
                state.cursors.insert(name.clone(), oldest);
                if state.positions.get(&name).is_some_and(|p| *p < oldest) {
                    state.positions.insert(name, oldest);
                }
            }
            removable.push(state.segments.remove(0).1);
        }
        removable
    }

    /// Persists that everything before `lsn` has been applied by this consumer, and deletes
    /// segments every consumer has passed.
    /// Asks the writer to retire the active segment if every consumer has committed all of
    /// it (an idle WAL then holds no delivered bytes). Does nothing while anyone lags.
    pub fn retire_consumed(&self) {
        let end = self.shared.durable_end.load(Ordering::Acquire);
        let consumed = {
            let state = self.shared.lock();
            !state.cursors.is_empty()
                && state.cursors.values().all(|c| *c >= end)
                && state.segments.last().is_some_and(|(start, _)| *start < end)
        };
        if consumed && let Some(jobs) = self.shared.jobs.upgrade() {
            let _ = jobs.try_send(Job::RetireConsumed);
        }
    }

    pub fn commit(&self, lsn: u64) -> Result<(), WalError> {
        let dir = self.shared.dir.join("cursors");
        let tmp = dir.join(format!("{}.tmp", self.name));
        let path = dir.join(&self.name);
        // tmp → fsync → rename → fsync(dir): after a crash the cursor is either the old one or
        // the new one, never a torn mix, and the rename itself is durable.
        let mut file = File::create(&tmp)?;
        serde_json::to_writer(&mut file, &CursorFile::V1 { lsn }).map_err(io::Error::other)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&dir)?;

        let mut state = self.shared.lock();
        state.cursors.insert(self.name.clone(), lsn);
        let mut removable = self.enforce_disk_cap(&mut state);
        let slowest = state.cursors.values().copied().min().unwrap_or(0);
        while state.counts.front().is_some_and(|(end, _)| *end <= slowest) {
            if let Some((_, total)) = state.counts.pop_front() {
                state.counted_before = total;
            }
        }
        // A segment can go when the next one starts at or before the slowest cursor.
        while state.segments.len() > 1 && state.segments[1].0 <= slowest {
            removable.push(state.segments.remove(0).1);
        }
        drop(state);
        for path in removable {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), %error, "cannot delete a WAL segment");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
