//! Sinks: external stores fed from the WAL (docs/design.md §2, §3, §7). Each sink is a WAL consumer
//! of its own, on its own thread, with its own durable cursor, so a sink that is down or slow
//! never blocks ingest, the index or another sink; its cursor advances only past entries the
//! engine accepted or that were written to its dead-letter file, so after an outage or a
//! restart it catches up with nothing lost.

pub mod elasticsearch;
pub mod loki;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tracing::Instrument;

use crate::wal::{Wal, WalReader};

/// Most entries sent in one request.
pub const BATCH_ENTRIES: usize = 5_000;
/// Most bytes of stored JSON read into one request.
pub const BATCH_BYTES: usize = 4 << 20;
/// First wait after a failed delivery; doubled each time up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What an engine said about a request.
#[derive(Debug)]
pub enum Outcome {
    /// Every entry is stored (or was already: a duplicate counts as stored).
    Delivered,
    /// Nothing is known to be stored; worth trying again (down, 429, 5xx, timeout).
    Retry(String),
    /// The engine refused the request for good (a 400): no retry can succeed as is.
    Rejected(String),
    /// Per-entry answers (Elasticsearch's `_bulk`): indices into the batch to send again,
    /// and those refused for good with why.
    Partial {
        retry: Vec<usize>,
        rejected: Vec<(usize, String)>,
    },
}

/// An external store, fed batches of stored entry lines (NDJSON as in the WAL).
pub trait Sink: Send + 'static {
    /// The WAL consumer name, the metrics label and the dead-letter directory.
    fn name(&self) -> &'static str;
    /// Sends one batch. Must not panic on any entry: an entry it cannot encode is reported
    /// in `Outcome::Partial` or `Outcome::Rejected`.
    fn send(&mut self, lines: &[Bytes]) -> impl std::future::Future<Output = Outcome> + Send;
}

/// What `/api/logs/stats` and `/health/ready` say about a sink.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SinkStatus {
    pub name: String,
    /// `up` after a delivery, `failing` while deliveries fail.
    pub status: &'static str,
    pub delivered: u64,
    pub dead_letters: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub dead_letter_file: String,
}

pub type SinkStatuses = Arc<Mutex<Vec<SinkStatus>>>;

/// Runs `sink` on its own thread, reading the WAL as the optional consumer named after it,
/// until `stop` is set.
pub fn spawn<S: Sink>(
    sink: S,
    wal: &Wal,
    data_dir: &Path,
    statuses: SinkStatuses,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let name = sink.name();
    let reader = wal.optional_reader(name)?;
    let dir = data_dir.join("sinks").join(name);
    std::fs::create_dir_all(&dir)?;
    let dead_letter = dir.join("dead-letter.ndjson");
    let slot = {
        let mut all = statuses.lock();
        all.push(SinkStatus {
            name: name.to_string(),
            status: "up",
            dead_letter_file: dead_letter.display().to_string(),
            ..SinkStatus::default()
        });
        all.len() - 1
    };
    let mut runner = Runner {
        sink,
        keyring: reader.keyring(),
        reader,
        dead_letter,
        statuses,
        slot,
        stop,
    };
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(sink = name, %error, "cannot start the sink's runtime");
                    return;
                }
            };
            runtime.block_on(runner.run());
        })?;
    Ok(thread)
}

struct Runner<S: Sink> {
    sink: S,
    reader: WalReader,
    dead_letter: PathBuf,
    /// Seals each append to the dead-letter file (encryption at rest).
    keyring: Option<Arc<logging_common::crypto::Keyring>>,
    statuses: SinkStatuses,
    slot: usize,
    stop: Arc<AtomicBool>,
}

impl<S: Sink> Runner<S> {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn status(&self, update: impl FnOnce(&mut SinkStatus)) {
        if let Some(status) = self.statuses.lock().get_mut(self.slot) {
            update(status);
        }
    }

    async fn run(&mut self) {
        let name = self.sink.name();
        let mut lines: Vec<Bytes> = Vec::new();
        let mut bytes = 0;
        let mut end = self.reader.position();
        let mut first_read = Instant::now();
        loop {
            if self.stopping() {
                return;
            }
            // Reading blocks the thread (the WAL waits on a condition variable); this runtime
            // has nothing else to do meanwhile.
            let wait = if lines.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(20)
            };
            let records = match self
                .reader
                .next_records(BATCH_BYTES - bytes.min(BATCH_BYTES), wait)
            {
                Ok(records) => records,
                Err(error) => {
                    tracing::error!(sink = name, %error, "cannot read the WAL");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if lines.is_empty() {
                first_read = Instant::now();
            }
            let idle = records.is_empty();
            for record in records {
                bytes += record.payload.len();
                lines.extend(record.lines());
                end = record.end;
            }
            let full = lines.len() >= BATCH_ENTRIES || bytes >= BATCH_BYTES;
            let lingered = first_read.elapsed() >= Duration::from_millis(200);
            if lines.is_empty() || !(full || idle || lingered) {
                continue;
            }
            // A record is never split: a batch may exceed BATCH_ENTRIES by one record's worth.
            let delivery =
                tracing::debug_span!("sink delivery", sink = name, entries = lines.len(), bytes,);
            if !self.deliver(&lines).instrument(delivery).await {
                return; // stopping: the cursor stays before this batch
            }
            if let Err(error) = self.reader.commit(end) {
                tracing::error!(sink = name, %error, "cannot save the sink's WAL cursor");
            }
            lines.clear();
            bytes = 0;
        }
    }

    /// Delivers `lines` until each is stored or dead-lettered; false if stopped first.
    async fn deliver(&mut self, lines: &[Bytes]) -> bool {
        let name = self.sink.name();
        let mut pending: Vec<usize> = (0..lines.len()).collect();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let batch: Vec<Bytes> = pending.iter().map(|&i| lines[i].clone()).collect();
            let sending = tracing::debug_span!(
                "sink send",
                otel.kind = "client",
                sink = name,
                entries = batch.len(),
                retry = attempt,
                outcome = tracing::field::Empty,
            );
            attempt += 1;
            // A stop does not wait out a slow engine: the request is dropped, the cursor
            // stays before the batch, and it is sent again after the restart.
            let outcome = tokio::select! {
                outcome = self.sink.send(&batch).instrument(sending.clone()) => outcome,
                () = stopped(self.stop.clone()) => return false,
            };
            sending.record(
                "outcome",
                match &outcome {
                    Outcome::Delivered => "delivered",
                    Outcome::Retry(_) => "retry",
                    Outcome::Rejected(_) => "rejected",
                    Outcome::Partial { .. } => "partial",
                },
            );
            drop(sending);
            let error = match outcome {
                Outcome::Delivered => {
                    self.delivered(batch.len());
                    return true;
                }
                Outcome::Rejected(reason) if batch.len() == 1 => {
                    self.dead_letter(&batch, &[(0, reason)]);
                    return true;
                }
                Outcome::Rejected(reason) => {
                    // One bad entry must not cost its neighbours: halve until it stands alone.
                    tracing::warn!(sink = name, %reason, entries = batch.len(),
                        "the engine refused a batch; splitting it to find the entries it refuses");
                    let (left, right) = pending.split_at(pending.len() / 2);
                    let (left, right) = (left.to_vec(), right.to_vec());
                    for half in [left, right] {
                        let sub: Vec<Bytes> = half.iter().map(|&i| lines[i].clone()).collect();
                        if !Box::pin(self.deliver(&sub)).await {
                            return false;
                        }
                    }
                    return true;
                }
                Outcome::Partial { retry, rejected } => {
                    self.dead_letter(&batch, &rejected);
                    let stored = batch.len() - retry.len() - rejected.len();
                    self.delivered(stored);
                    pending = retry
                        .iter()
                        .filter_map(|&i| pending.get(i).copied())
                        .collect();
                    if pending.is_empty() {
                        return true;
                    }
                    format!("{} entries to send again", pending.len())
                }
                Outcome::Retry(reason) => reason,
            };
            metrics::counter!("logging_aggregator_sink_errors_total", "sink" => name).increment(1);
            tracing::warn!(sink = name, %error, retry_in_ms = backoff.as_millis() as u64,
                "delivery failed; retrying");
            self.status(|s| {
                s.status = "failing";
                s.errors += 1;
                s.last_error = Some(error);
            });
            metrics::gauge!("logging_aggregator_sink_up", "sink" => name).set(0.0);
            tokio::select! {
                () = tokio::time::sleep(jitter(backoff)) => {}
                () = stopped(self.stop.clone()) => return false,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        true
    }

    fn delivered(&self, count: usize) {
        let name = self.sink.name();
        metrics::counter!("logging_aggregator_sink_entries_total", "sink" => name)
            .increment(count as u64);
        metrics::gauge!("logging_aggregator_sink_up", "sink" => name).set(1.0);
        self.status(|s| {
            s.status = "up";
            s.delivered += count as u64;
        });
    }

    /// Appends the refused entries, with why, to the dead-letter file, durably (the cursor
    /// moves past them right after).
    fn dead_letter(&self, batch: &[Bytes], rejected: &[(usize, String)]) {
        if rejected.is_empty() {
            return;
        }
        let name = self.sink.name();
        let _dead_letters = tracing::debug_span!(
            "dead letter",
            sink = name,
            entries = rejected.len(),
            file = %self.dead_letter.display(),
        )
        .entered();
        let mut out = Vec::new();
        for (i, reason) in rejected {
            let Some(line) = batch.get(*i) else { continue };
            let entry: &serde_json::value::RawValue = match serde_json::from_slice(line) {
                Ok(raw) => raw,
                Err(_) => continue,
            };
            let record = serde_json::json!({
                "at": logging_common::Timestamp::now().to_rfc3339(),
                "sink": name,
                "reason": reason,
                "entry": entry,
            });
            if serde_json::to_writer(&mut out, &record).is_ok() {
                out.push(b'\n');
            }
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .and_then(|mut file| {
                match &self.keyring {
                    Some(keyring) => file.write_all(&keyring.seal_record(&out))?,
                    None => file.write_all(&out)?,
                }
                file.sync_data()
            });
        if let Err(error) = written {
            tracing::error!(sink = name, file = %self.dead_letter.display(), %error,
                "cannot write the dead-letter file");
        }
        tracing::warn!(sink = name, entries = rejected.len(), reason = %rejected[0].1,
            "entries refused for good; written to the dead-letter file");
        metrics::counter!("logging_aggregator_sink_dead_letters_total", "sink" => name)
            .increment(rejected.len() as u64);
        self.status(|s| s.dead_letters += rejected.len() as u64);
    }
}

/// Resolves once `stop` is set (checked every 50 ms: the flag is a plain atomic).
async fn stopped(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wait` ± 20 %, so that many senders retrying do not arrive in lockstep.
pub fn jitter(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    wait.mul_f64(0.8 + 0.4 * (byte[0] as f64 / 255.0))
}
