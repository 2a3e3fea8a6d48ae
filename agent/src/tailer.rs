//! The file pipeline's loop, on its own thread: discover files, read them in turn, turn whole
//! messages into entry lines, cut batches, hand them to the shipper, and retire rotated or
//! deleted files once they are read to the end.
//!
//! Backpressure: while the batches built but not yet acknowledged exceed
//! `AGENT_MAX_IN_FLIGHT_BYTES`, nothing more is read. The files themselves are the buffer, so
//! memory stays flat however long the aggregator is away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoints, FileCheckpoint, Mark};
use crate::discover::Discovery;
use crate::entry::{Encoder, Message, SourceMeta};
use crate::kubernetes::{pod_info, service_from_path, workload_name};
use crate::parsers::Parsers;
use crate::ship::{Batch, ShipState, compress};
use crate::tail::{FileId, FileKey, Tailed};

/// How long a held message waits for a continuation line.
const MULTILINE_WAIT: Duration = Duration::from_millis(500);
/// How long a renamed or deleted file is still read after its last new data.
const GONE_GRACE: Duration = Duration::from_secs(5);
/// Bytes read from one file before the next gets its turn.
const READ_BUDGET: usize = 512 * 1024;
const TICK: Duration = Duration::from_millis(100);
/// The longest sleep between polls when nothing is being written.
const IDLE_TICK_MAX: Duration = Duration::from_secs(1);
/// How often checkpoints of files that no longer exist are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The settings the loop needs.
/// Why inotify woke the tailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A watched file grew: read now rather than at the next tick.
    Data,
    /// A file appeared, was renamed or deleted: rescan the globs now.
    Layout,
}

pub struct TailerOptions {
    pub node: String,
    pub batch_entries: usize,
    pub batch_bytes: usize,
    pub batch_timeout: Duration,
    pub max_in_flight_bytes: usize,
    pub max_line: usize,
    pub rescan: Duration,
    /// Where socket input is spooled (its files are not "files" in the entries' context).
    pub spool_dir: Option<PathBuf>,
    /// The keys the spool's lines are sealed with (`AGENT_ENCRYPTION_KEY_FILE`).
    pub spool_keyring: Option<Arc<logging_common::crypto::Keyring>>,
    /// The operator's parsers (`AGENT_PARSERS`).
    pub parsers: Arc<Parsers>,
}

pub struct Tailer {
    options: TailerOptions,
    discovery: Discovery,
    encoder: Encoder,
    checkpoints: Arc<Checkpoints>,
    ship_state: Arc<ShipState>,
    batches: mpsc::Sender<Batch>,
    files: HashMap<FileKey, Tailed>,
    batch: Vec<u8>,
    batch_entries: usize,
    batch_started: Option<Instant>,
    next_sequence: u64,
    /// Safe offsets already sent, to mark only what moved.
    marked: HashMap<FileId, u64>,
    /// Final positions of retired files, for the next batch.
    final_marks: Vec<Mark>,
}

/// Builds the metadata of a file source.
fn source_meta(
    node: &str,
    spool_dir: Option<&Path>,
    spool_keyring: Option<&Arc<logging_common::crypto::Keyring>>,
    parsers: &Parsers,
    path: &Path,
    id: FileId,
) -> SourceMeta {
    let source_id = format!("{node}\0file\0{}:{}:{:016x}", id.dev, id.ino, id.head).into_bytes();
    if spool_dir.is_some_and(|dir| path.parent() == Some(dir)) {
        // Socket input: its lines name their own service and source.
        return SourceMeta {
            source_id,
            service: "socket".into(),
            kubernetes: None,
            extra: Some(format!(
                "\"node\":{}",
                serde_json::Value::String(node.to_string())
            )),
            parser: None,
            sealed: spool_keyring.cloned(),
        };
    }
    let pod = pod_info(path);
    let parser = parsers.select(path, pod.as_ref());
    match pod {
        Some(pod) => {
            let kubernetes = serde_json::json!({
                "namespace": pod.namespace,
                "pod": pod.pod,
                "pod_uid": pod.pod_uid,
                "container": pod.container,
                "restart_count": pod.restart_count,
                "node": node,
            });
            SourceMeta {
                source_id,
                service: workload_name(&pod.pod).to_string(),
                kubernetes: Some(kubernetes.to_string()),
                extra: None,
                parser,
                sealed: None,
            }
        }
        None => SourceMeta {
            source_id,
            service: service_from_path(path),
            kubernetes: None,
            extra: Some(format!(
                "\"file\":{},\"node\":{}",
                serde_json::Value::String(path.display().to_string()),
                serde_json::Value::String(node.to_string())
            )),
            parser,
            sealed: None,
        },
    }
}

impl Tailer {
    pub fn new(
        options: TailerOptions,
        discovery: Discovery,
        encoder: Encoder,
        checkpoints: Arc<Checkpoints>,
        ship_state: Arc<ShipState>,
        batches: mpsc::Sender<Batch>,
    ) -> Tailer {
        Tailer {
            options,
            discovery,
            encoder,
            checkpoints,
            ship_state,
            batches,
            files: HashMap::new(),
            batch: Vec::new(),
            batch_entries: 0,
            batch_started: None,
            next_sequence: 0,
            marked: HashMap::new(),
            final_marks: Vec::new(),
        }
    }

    /// Runs until `stop` is set, then sends what is whole and returns.
    pub fn run(mut self, wake: std_mpsc::Receiver<Wake>, stop: Arc<AtomicBool>) {
        self.resume_rotated();
        let mut last_scan = Instant::now() - self.options.rescan;
        let mut last_prune = Instant::now();
        let mut idle_wait = TICK;
        loop {
            if stop.load(Ordering::Acquire) {
                self.shutdown();
                return;
            }
            if last_scan.elapsed() >= self.options.rescan {
                self.rescan();
                self.report_lag();
                last_scan = Instant::now();
            }
            let read = self.read_round();
            metrics::counter!("logging_agent_polls_total").increment(1);
            self.retire_gone();
            if last_prune.elapsed() >= PRUNE_EVERY {
                self.prune_checkpoints();
                last_prune = Instant::now();
            }
            if self
                .batch_started
                .is_some_and(|started| started.elapsed() >= self.options.batch_timeout)
            {
                self.cut();
            }
            metrics::gauge!("logging_agent_files_watched").set(self.files.len() as f64);
            if read > 0 {
                idle_wait = TICK;
            } else {
                // Nothing new anywhere: sleep until inotify says something changed (a new
                // file triggers a rescan at once) or the next tick. Ticks stretch while
                // nothing happens, so that idle polling costs next to nothing; inotify still
                // wakes at once, and the tick only matters where inotify is missing.
                let waiting = self.batch_started.is_some()
                    || self.ship_state.in_flight_bytes.load(Ordering::Acquire) > 0
                    || self.files.values().any(Tailed::holds);
                let wait = if waiting { TICK } else { idle_wait };
                idle_wait = (idle_wait * 2).min(IDLE_TICK_MAX);
                if let Ok(first) = wake.recv_timeout(wait) {
                    idle_wait = TICK;
                    // Drain every queued wake-up, noting whether any asks for a rescan.
                    let mut layout = first == Wake::Layout;
                    for reason in wake.try_iter() {
                        layout |= reason == Wake::Layout;
                    }
                    if layout {
                        last_scan = Instant::now() - self.options.rescan;
                    }
                }
            }
        }
    }

    fn in_flight_full(&self) -> bool {
        self.ship_state.in_flight_bytes.load(Ordering::Acquire) + self.batch.len()
            >= self.options.max_in_flight_bytes
    }

    /// Opens `path` to tail it, if it resolves inside the allowed roots (checked by path, then
    /// again on the opened descriptor).
    fn open(&self, path: &std::path::Path) -> Option<Tailed> {
        if let Err(refusal) = self.discovery.resolve(path) {
            self.discovery.report(path, &refusal);
            return None;
        }
        let checkpoints = self.checkpoints.clone();
        // Spool lines are entries the agent wrote itself, their message already cut to fit
        // an entry; JSON escaping may make the line longer than that, so read them whole.
        let in_spool = self
            .options
            .spool_dir
            .as_deref()
            .is_some_and(|dir| path.parent() == Some(dir));
        let max_line = if in_spool {
            self.options.max_line.saturating_mul(8)
        } else {
            self.options.max_line
        };
        match Tailed::open(path, max_line, &move |id| checkpoints.file_offset(id)) {
            Ok(tailed) => match self.discovery.admits_opened(tailed.file()) {
                Ok(()) => Some(tailed),
                Err(refusal) => {
                    self.discovery.report(path, &refusal);
                    None
                }
            },
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot open");
                None
            }
        }
    }

    /// Opens new files and notices renamed, deleted and truncated ones.
    fn rescan(&mut self) {
        metrics::counter!("logging_agent_rescans_total").increment(1);
        let mut found = self.discovery.scan();
        // One file can be matched twice: kubelet's /var/log/containers/*.log are symlinks
        // into /var/log/pods. Files are keyed by device and inode, so each is tailed once;
        // the kubelet path goes first, so that it is the one whose metadata the entries carry.
        found.sort_by_key(|path| pod_info(path).is_none());
        let mut current: HashMap<PathBuf, FileKey> = HashMap::new();
        for path in found {
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            let key = FileKey::of(&metadata);
            current.insert(path.clone(), key);
            if self.files.contains_key(&key) {
                continue;
            }
            if let Some(tailed) = self.open(&path) {
                tracing::info!(file = %path.display(), offset = tailed.offset, "tailing");
                self.files.insert(key, tailed);
            }
        }
        for tailed in self.files.values_mut() {
            let still_there = current.get(&tailed.path) == Some(&tailed.key)
                || current.values().any(|key| *key == tailed.key);
            if !still_there && tailed.gone_since.is_none() {
                tracing::info!(file = %tailed.path.display(), "renamed away or deleted; reading it to the end");
                metrics::counter!("logging_agent_rotations_total").increment(1);
                tailed.gone_since = Some(Instant::now());
            }
            if tailed.gone_since.is_none() {
                match tailed.check_truncation() {
                    Ok(true) => {
                        metrics::counter!("logging_agent_truncations_total").increment(1);
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(file = %tailed.path.display(), %error, "cannot stat")
                    }
                }
            }
        }
    }

    /// Bytes read but not yet acknowledged, over all files: what a crash now would re-send.
    fn report_lag(&self) {
        let lag: u64 = self
            .files
            .values()
            .filter_map(|t| {
                let id = t.id?;
                Some(
                    t.offset
                        .saturating_sub(self.checkpoints.file_offset(id).unwrap_or(0)),
                )
            })
            .sum();
        metrics::gauge!("logging_agent_checkpoint_lag_bytes").set(lag as f64);
    }

    /// After a restart: finish what was rotated while the agent was down. That is every file
    /// with a checkpoint that no glob matches any more (found again by its fingerprint next to
    /// where it was), and every rotated sibling of a matched file (`0.log.<timestamp>`, never
    /// `.gz`) that has no checkpoint or was not read to its end. A sibling without a checkpoint
    /// is read from the start: what was sent of it before carries the same ids and is dropped
    /// by the aggregator.
    fn resume_rotated(&mut self) {
        let found: Vec<PathBuf> = self.discovery.scan();
        let mut found_keys = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        for path in &found {
            if let Ok(metadata) = std::fs::metadata(path) {
                found_keys.push(FileKey::of(&metadata));
            }
            candidates.extend(rotated_siblings(path));
        }
        for checkpoint in self.checkpoints.files() {
            let key = FileKey {
                dev: checkpoint.id.dev,
                ino: checkpoint.id.ino,
            };
            if found_keys.contains(&key) {
                continue;
            }
            match find_by_id(&checkpoint) {
                Some(path) => candidates.push(path),
                None => {
                    // Deleted before it could be finished: what was left unread is lost, and
                    // counted.
                    metrics::counter!("logging_agent_files_lost_total").increment(1);
                    tracing::warn!(file = %checkpoint.path.display(), "a checkpointed file is gone; its unread rest is lost");
                    self.checkpoints.forget(checkpoint.id);
                }
            }
        }
        candidates.sort();
        candidates.dedup();
        for path in candidates {
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            let key = FileKey::of(&metadata);
            if found_keys.contains(&key) || self.files.contains_key(&key) {
                continue;
            }
            let Some(mut tailed) = self.open(&path) else {
                continue;
            };
            if tailed.offset >= metadata.len() && tailed.offset > 0 {
                continue;
            }
            tracing::info!(file = %path.display(), offset = tailed.offset, "finishing a file rotated while the agent was down");
            tailed.gone_since = Some(Instant::now());
            self.files.insert(key, tailed);
        }
    }

    /// What the entries of a file are told about their source, owning what it needs.
    fn meta_for(&self) -> impl Fn(&Path, FileId) -> SourceMeta + 'static {
        let node = self.options.node.clone();
        let spool_dir = self.options.spool_dir.clone();
        let parsers = self.options.parsers.clone();
        let keyring = self.options.spool_keyring.clone();
        move |path: &Path, id: FileId| {
            source_meta(
                &node,
                spool_dir.as_deref(),
                keyring.as_ref(),
                &parsers,
                path,
                id,
            )
        }
    }

    /// Reads every file once, as far as the in-flight limit allows. Returns bytes read.
    fn read_round(&mut self) -> usize {
        let mut total = 0;
        let keys: Vec<FileKey> = self.files.keys().copied().collect();
        for key in keys {
            if self.in_flight_full() {
                break;
            }
            let Some(mut tailed) = self.files.remove(&key) else {
                continue;
            };
            let meta_for = self.meta_for();
            let mut lines = 0u64;
            let result = {
                let encoder = &self.encoder;
                let batch = &mut self.batch;
                let entries = &mut self.batch_entries;
                let mut sink = |meta: &SourceMeta, message: Message| {
                    encoder.encode(meta, &message, batch);
                    *entries += 1;
                    lines += 1;
                };
                let read = tailed.read(READ_BUDGET, &meta_for, &mut sink);
                tailed.flush_held(MULTILINE_WAIT, &mut sink);
                read
            };
            match result {
                Ok(n) => {
                    if n > 0 {
                        let path = tailed.path.display().to_string();
                        metrics::counter!("logging_agent_read_bytes_total", "path" => path.clone())
                            .increment(n as u64);
                        metrics::counter!("logging_agent_read_lines_total", "path" => path)
                            .increment(lines);
                    }
                    total += n;
                }
                Err(error) => tracing::warn!(file = %tailed.path.display(), %error, "read failed"),
            }
            self.files.insert(key, tailed);
            if self.batch_entries > 0 && self.batch_started.is_none() {
                self.batch_started = Some(Instant::now());
            }
            if self.batch_entries >= self.options.batch_entries
                || self.batch.len() >= self.options.batch_bytes
            {
                self.cut();
            }
        }
        total
    }

    /// Retires files that are gone and read to the end.
    fn retire_gone(&mut self) {
        let finished: Vec<FileKey> = self
            .files
            .iter()
            .filter(|(_, t)| t.gone_since.is_some() && t.last_data.elapsed() >= GONE_GRACE)
            .map(|(k, _)| *k)
            .collect();
        for key in finished {
            let Some(mut tailed) = self.files.remove(&key) else {
                continue;
            };
            let meta_for = self.meta_for();
            {
                let encoder = &self.encoder;
                let batch = &mut self.batch;
                let entries = &mut self.batch_entries;
                let mut sink = |meta: &SourceMeta, message: Message| {
                    encoder.encode(meta, &message, batch);
                    *entries += 1;
                };
                // Whatever was written after the last read, then whatever is left over.
                while matches!(tailed.read(READ_BUDGET, &meta_for, &mut sink), Ok(n) if n > 0) {}
                tailed.finish(&mut sink);
            }
            if let Some(id) = tailed.id {
                self.final_marks.push(Mark::File(FileCheckpoint {
                    id,
                    path: tailed.path.clone(),
                    offset: tailed.offset,
                }));
                self.marked.remove(&id);
            }
            tracing::info!(file = %tailed.path.display(), offset = tailed.offset, "finished");
            self.cut();
        }
    }

    /// Forgets the checkpoints of files that no longer exist (kubelet compressed or deleted
    /// them). A finished file keeps its checkpoint while it exists, so a restart does not
    /// read it again.
    fn prune_checkpoints(&mut self) {
        for checkpoint in self.checkpoints.files() {
            let key = FileKey {
                dev: checkpoint.id.dev,
                ino: checkpoint.id.ino,
            };
            if self.files.contains_key(&key) {
                continue;
            }
            if find_by_id(&checkpoint).is_none() {
                self.checkpoints.forget(checkpoint.id);
            }
        }
    }

    /// Closes the current batch and hands it to the shipper (waiting while its queue is full).
    fn cut(&mut self) {
        let mut marks = Vec::new();
        for tailed in self.files.values() {
            let Some(id) = tailed.id else { continue };
            let safe = tailed.safe_offset();
            if self.marked.get(&id) != Some(&safe) {
                self.marked.insert(id, safe);
                marks.push(Mark::File(FileCheckpoint {
                    id,
                    path: tailed.path.clone(),
                    offset: safe,
                }));
            }
        }
        marks.append(&mut self.final_marks);
        if self.batch_entries == 0 && marks.is_empty() {
            self.batch_started = None;
            return;
        }
        let ndjson = std::mem::take(&mut self.batch);
        let span = Batch::span(self.next_sequence, self.batch_entries, ndjson.len(), &marks);
        let body = span.in_scope(|| {
            let compressing = tracing::debug_span!(
                "compress",
                bytes.uncompressed = ndjson.len(),
                bytes.compressed = tracing::field::Empty
            );
            let _entered = compressing.enter();
            let body = compress(&ndjson);
            compressing.record("bytes.compressed", body.len());
            body
        });
        let batch = Batch {
            sequence: self.next_sequence,
            body,
            entries: self.batch_entries,
            raw_bytes: ndjson.len(),
            marks,
            span,
        };
        self.next_sequence += 1;
        self.batch_entries = 0;
        self.batch_started = None;
        self.ship_state
            .in_flight_bytes
            .fetch_add(batch.raw_bytes, Ordering::AcqRel);
        if self.batches.blocking_send(batch).is_err() {
            tracing::error!(
                "the shipper has stopped; the batch stays unacknowledged and will be re-read"
            );
        }
    }

    fn shutdown(&mut self) {
        // Only whole messages leave; anything half-assembled stays behind the checkpoint and
        // is read again on the next start.
        for tailed in self.files.values_mut() {
            let encoder = &self.encoder;
            let batch = &mut self.batch;
            let entries = &mut self.batch_entries;
            let mut sink = |meta: &SourceMeta, message: Message| {
                encoder.encode(meta, &message, batch);
                *entries += 1;
            };
            tailed.flush_held(MULTILINE_WAIT, &mut sink);
        }
        self.cut();
    }
}

/// `0.log.20261127-100000` next to kubelet's `0.log`: the pod log it renamed away, except
/// once compressed. Only for kubelet's files, which are rotated by renaming: a logrotate
/// `copytruncate` copy has the content of the file it was copied from, already sent.
fn rotated_siblings(path: &Path) -> Vec<PathBuf> {
    if pod_info(path).is_none() {
        return Vec::new();
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && !n.ends_with(".gz") && !n.ends_with(".tmp")
            })
        })
        .collect()
}

/// A file with this fingerprint in the directory where it was last seen.
fn find_by_id(checkpoint: &FileCheckpoint) -> Option<PathBuf> {
    let dir = checkpoint.path.parent()?;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = path.file_name()?.to_str().unwrap_or("");
        if name.ends_with(".gz") || name.ends_with(".tmp") {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(metadata) = file.metadata() else {
            continue;
        };
        let key = FileKey::of(&metadata);
        if key.dev != checkpoint.id.dev || key.ino != checkpoint.id.ino {
            continue;
        }
        if crate::tail::head_hash(&file).ok().flatten() == Some(checkpoint.id.head) {
            return Some(path);
        }
    }
    None
}
