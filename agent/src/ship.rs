//! Shipping batches: zstd NDJSON over HTTPS with the agent's client certificate
//! (`POST /v1/ingest`, docs/design.md §5), retried with exponential backoff and jitter, honouring
//! `Retry-After` on 429/503, never giving up on an aggregator that is down.
//!
//! Several batches may be in flight, but checkpoints advance in batch order: a batch's
//! positions are recorded only when it and every batch before it were acknowledged.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::checkpoint::{Checkpoints, Mark};

/// Batches sent at the same time.
const CONCURRENCY: usize = 4;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A batch ready to send.
pub struct Batch {
    pub sequence: u64,
    /// zstd-compressed NDJSON.
    pub body: Vec<u8>,
    pub entries: usize,
    /// Uncompressed size, counted against the in-flight limit.
    pub raw_bytes: usize,
    /// Positions to checkpoint once acknowledged.
    pub marks: Vec<Mark>,
    /// The batch's trace span: from the cut to the checkpoint (see [`Batch::span`]).
    pub span: tracing::Span,
}

/// At most this many positions are named on a batch's span (a batch can cover every file).
const SPAN_MARKS: usize = 16;

impl Batch {
    /// The span of one shipped batch (cut → compress → send → acknowledge), with the files
    /// and offsets (or socket sequences) it covers. A `debug` span: it exists only when
    /// traces are exported (see `logging_common::telemetry`).
    pub fn span(sequence: u64, entries: usize, raw_bytes: usize, marks: &[Mark]) -> tracing::Span {
        let span = tracing::debug_span!(
            "ship batch",
            batch = sequence,
            entries,
            bytes.uncompressed = raw_bytes,
            log.positions = tracing::field::Empty,
            log.positions.count = marks.len(),
        );
        if !span.is_disabled() && !marks.is_empty() {
            let mut positions = String::new();
            for mark in marks.iter().take(SPAN_MARKS) {
                if !positions.is_empty() {
                    positions.push_str(", ");
                }
                match mark {
                    Mark::File(file) => {
                        positions.push_str(&format!("{}@{}", file.path.display(), file.offset))
                    }
                    Mark::Socket { name, sequence } => {
                        positions.push_str(&format!("{name}#{sequence}"))
                    }
                }
            }
            if marks.len() > SPAN_MARKS {
                positions.push_str(&format!(", … {} more", marks.len() - SPAN_MARKS));
            }
            span.record("log.positions", positions);
        }
        span
    }
}

/// Compresses NDJSON for the wire.
pub fn compress(ndjson: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(ndjson, 1)
        .or_else(|_| zstd::stream::encode_all(ndjson, 1))
        .unwrap_or_default()
}

fn decompress(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(mut decoder) = zstd::stream::read::Decoder::new(body) {
        let _ = decoder.read_to_end(&mut out);
    }
    out
}

/// Shared counters the tailer and `/metrics` read.
#[derive(Default)]
pub struct ShipState {
    /// Uncompressed bytes of batches built and not yet acknowledged.
    pub in_flight_bytes: AtomicUsize,
    /// Unix seconds of the last acknowledged batch.
    pub last_ack: AtomicU64,
}

/// What sends batches.
pub struct Shipper {
    pub client: reqwest::Client,
    pub url: String,
    pub checkpoints: Arc<Checkpoints>,
    pub state: Arc<ShipState>,
    pub dead_letter: std::path::PathBuf,
    /// Seals each append to the dead-letter file (`AGENT_ENCRYPTION_KEY_FILE`).
    pub keyring: Option<Arc<logging_common::crypto::Keyring>>,
}

enum Outcome {
    Delivered {
        accepted: u64,
        duplicates: u64,
        rejected: u64,
    },
    /// The aggregator refused it for good (400): kept in the dead-letter file.
    DeadLettered,
}

impl Shipper {
    /// Sends batches as they come, until the channel closes and all are acknowledged.
    pub async fn run(self: Arc<Self>, mut batches: mpsc::Receiver<Batch>) {
        let mut sending = JoinSet::new();
        let mut done: BTreeMap<u64, (Vec<Mark>, usize, tracing::Span)> = BTreeMap::new();
        let mut next_to_record = None::<u64>;
        let mut open = true;
        while open || !sending.is_empty() {
            tokio::select! {
                batch = batches.recv(), if open && sending.len() < CONCURRENCY => match batch {
                    Some(batch) => {
                        next_to_record.get_or_insert(batch.sequence);
                        let this = self.clone();
                        let span = batch.span.clone();
                        sending.spawn(async move {
                            let sequence = batch.sequence;
                            let marks = batch.marks.clone();
                            let raw = batch.raw_bytes;
                            let span = batch.span.clone();
                            this.deliver(batch).await;
                            (sequence, marks, raw, span)
                        }.instrument(span));
                    }
                    None => open = false,
                },
                Some(finished) = sending.join_next(), if !sending.is_empty() => {
                    let Ok((sequence, marks, raw, span)) = finished else { continue };
                    done.insert(sequence, (marks, raw, span));
                    // Record positions in order: only a prefix of acknowledged batches.
                    while let Some(next) = next_to_record {
                        let Some((marks, raw, span)) = done.remove(&next) else { break };
                        span.in_scope(|| {
                            let _acknowledge = tracing::debug_span!("acknowledge", positions = marks.len()).entered();
                            self.checkpoints.acknowledge(&marks);
                        });
                        // The batch span ends here, with its last clone.
                        drop(span);
                        self.state.in_flight_bytes.fetch_sub(raw, Ordering::AcqRel);
                        next_to_record = Some(next + 1);
                    }
                    metrics::gauge!("logging_agent_in_flight_bytes")
                        .set(self.state.in_flight_bytes.load(Ordering::Acquire) as f64);
                }
            }
        }
    }

    /// Sends one batch until the aggregator has it.
    async fn deliver(&self, batch: Batch) {
        match self.send_until_accepted(&batch.body, batch.sequence).await {
            Outcome::Delivered {
                accepted,
                duplicates,
                rejected,
            } => {
                metrics::counter!("logging_agent_batches_sent_total").increment(1);
                metrics::counter!("logging_agent_sent_bytes_total")
                    .increment(batch.body.len() as u64);
                metrics::counter!("logging_agent_sent_uncompressed_bytes_total")
                    .increment(batch.raw_bytes as u64);
                metrics::counter!("logging_agent_entries_sent_total").increment(accepted);
                metrics::counter!("logging_agent_entries_duplicate_total").increment(duplicates);
                if rejected > 0 {
                    metrics::counter!("logging_agent_entries_rejected_total").increment(rejected);
                }
                tracing::debug!(
                    batch = batch.sequence,
                    accepted,
                    duplicates,
                    "the aggregator acknowledged a batch"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.state.last_ack.store(now, Ordering::Release);
            }
            Outcome::DeadLettered => {
                metrics::counter!("logging_agent_batches_dead_lettered_total").increment(1);
            }
        }
    }

    fn send_until_accepted<'a>(
        &'a self,
        body: &'a [u8],
        sequence: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            let mut backoff = BACKOFF_START;
            let mut attempt = 0u32;
            loop {
                let started = Instant::now();
                let sending = tracing::debug_span!(
                    "send",
                    otel.kind = "client",
                    http.request.method = "POST",
                    url.full = %self.url,
                    bytes.compressed = body.len(),
                    retry = attempt,
                    http.response.status_code = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                );
                let mut request = self
                    .client
                    .post(&self.url)
                    .header("content-type", "application/x-ndjson")
                    .header("content-encoding", "zstd")
                    .header("x-batch-id", sequence.to_string());
                // W3C Trace Context: the aggregator's ingest span joins this trace.
                for (name, value) in logging_common::telemetry::trace_headers(&sending) {
                    request = request.header(name, value);
                }
                attempt += 1;
                let sent = request
                    .body(body.to_vec())
                    .send()
                    .instrument(sending.clone())
                    .await;
                match &sent {
                    Ok(response) => {
                        sending.record("http.response.status_code", response.status().as_u16());
                    }
                    Err(error) => {
                        sending.record("error.type", tracing::field::display(error));
                    }
                }
                drop(sending);
                let wait = match sent {
                    Ok(response) if response.status() == StatusCode::OK => {
                        metrics::histogram!("logging_agent_batch_seconds")
                            .record(started.elapsed().as_secs_f64());
                        let answer: serde_json::Value = response.json().await.unwrap_or_default();
                        let count = |k: &str| answer[k].as_u64().unwrap_or(0);
                        let listed = answer["rejected"].as_array().cloned().unwrap_or_default();
                        let rejected = count("rejected_count").max(listed.len() as u64);
                        if rejected > 0 {
                            tracing::warn!(
                                batch = sequence,
                                rejected,
                                "the aggregator rejected entries; they are kept in the dead-letter file"
                            );
                            self.dead_letter_rejected(body, &listed, rejected);
                        }
                        return Outcome::Delivered {
                            accepted: count("accepted"),
                            duplicates: count("duplicates"),
                            rejected,
                        };
                    }
                    Ok(response) if response.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        return self.split_and_send(body, sequence).await;
                    }
                    Ok(response) if response.status() == StatusCode::BAD_REQUEST => {
                        // Nothing of the batch was stored: every entry goes to the dead-letter
                        // file, with its own reasons where the answer names them (`[i].field`).
                        let problem: serde_json::Value = response.json().await.unwrap_or_default();
                        let detail = problem["detail"]
                            .as_str()
                            .unwrap_or("refused (400)")
                            .to_string();
                        let mut reasons: BTreeMap<usize, Vec<String>> = BTreeMap::new();
                        for error in problem["errors"].as_array().into_iter().flatten() {
                            let field = error["field"].as_str().unwrap_or("");
                            let index = field
                                .strip_prefix('[')
                                .and_then(|f| f.split_once(']'))
                                .and_then(|(i, _)| i.parse::<usize>().ok());
                            if let Some(index) = index {
                                let reason = error["reason"].as_str().unwrap_or("");
                                reasons
                                    .entry(index)
                                    .or_default()
                                    .push(format!("{field}: {reason}"));
                            }
                        }
                        self.dead_letter(body, |i| {
                            reasons
                                .get(&i)
                                .map(|r| r.join("; "))
                                .unwrap_or_else(|| detail.clone())
                        });
                        return Outcome::DeadLettered;
                    }
                    Ok(response) => {
                        let retry_after = response
                            .headers()
                            .get(reqwest::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(Duration::from_secs);
                        tracing::warn!(batch = sequence, status = %response.status(), "the aggregator did not take the batch; retrying");
                        retry_after.unwrap_or(backoff)
                    }
                    Err(error) => {
                        tracing::warn!(batch = sequence, %error, "cannot reach the aggregator; retrying");
                        backoff
                    }
                };
                metrics::counter!("logging_agent_batch_retries_total").increment(1);
                tokio::time::sleep(jitter(wait)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        })
    }

    /// 413: the aggregator's limit is below ours. Send the halves.
    async fn split_and_send(&self, body: &[u8], sequence: u64) -> Outcome {
        let ndjson = decompress(body);
        let lines: Vec<&[u8]> = ndjson
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if lines.len() <= 1 {
            self.dead_letter(body, |_| {
                "a single entry is larger than the aggregator accepts (413)".to_string()
            });
            return Outcome::DeadLettered;
        }
        let (first, second) = lines.split_at(lines.len() / 2);
        let mut total = (0, 0, 0);
        for half in [first, second] {
            let mut part = half.join(&b'\n');
            part.push(b'\n');
            match self.send_until_accepted(&compress(&part), sequence).await {
                Outcome::Delivered {
                    accepted,
                    duplicates,
                    rejected,
                } => {
                    total.0 += accepted;
                    total.1 += duplicates;
                    total.2 += rejected;
                }
                Outcome::DeadLettered => {}
            }
        }
        Outcome::Delivered {
            accepted: total.0,
            duplicates: total.1,
            rejected: total.2,
        }
    }

    /// Entries of a stored batch that the aggregator rejected: the listed ones with their
    /// reasons; when it rejected more than it lists, every other entry too, said so (it may
    /// also have been stored), so that no rejected entry is lost.
    fn dead_letter_rejected(&self, body: &[u8], listed: &[serde_json::Value], count: u64) {
        let reasons: BTreeMap<usize, String> = listed
            .iter()
            .filter_map(|r| {
                let index = usize::try_from(r["index"].as_u64()?).ok()?;
                Some((index, r["error"].as_str().unwrap_or("rejected").to_string()))
            })
            .collect();
        let unlisted = count > reasons.len() as u64;
        let lines = decompress(body);
        let mut out = Vec::new();
        for (i, line) in entry_lines(&lines).enumerate() {
            let reason = match reasons.get(&i) {
                Some(reason) => reason.clone(),
                None if unlisted => format!(
                    "the aggregator rejected {count} entries of this batch and listed {}; this one may be among the others, or stored",
                    reasons.len()
                ),
                None => continue,
            };
            dead_letter_record(&mut out, line, &reason);
        }
        self.append_dead_letters(&out);
    }

    /// Every entry of a batch the aggregator refused as a whole, with `reason_of(index)`.
    fn dead_letter(&self, body: &[u8], reason_of: impl Fn(usize) -> String) {
        let lines = decompress(body);
        let mut out = Vec::new();
        for (i, line) in entry_lines(&lines).enumerate() {
            dead_letter_record(&mut out, line, &reason_of(i));
        }
        tracing::error!(file = %self.dead_letter.display(), "the aggregator refused a batch; kept in the dead-letter file");
        self.append_dead_letters(&out);
    }

    fn append_dead_letters(&self, records: &[u8]) {
        if records.is_empty() {
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .and_then(|mut f| {
                match &self.keyring {
                    Some(keyring) => f.write_all(&keyring.seal_record(records))?,
                    None => f.write_all(records)?,
                }
                f.sync_all()
            });
        match written {
            Ok(()) => {
                let n = records.iter().filter(|&&b| b == b'\n').count();
                metrics::counter!("logging_agent_dead_letter_entries_total").increment(n as u64);
            }
            Err(error) => tracing::error!(%error, "cannot write the dead-letter file"),
        }
    }
}

/// The non-empty lines of an NDJSON batch.
fn entry_lines(ndjson: &[u8]) -> impl Iterator<Item = &[u8]> {
    ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
}

/// One line of the dead-letter file: `{"at","reason","entry"}`, the entry as sent (or as
/// text, if it is not JSON).
fn dead_letter_record(out: &mut Vec<u8>, line: &[u8], reason: &str) {
    let entry = match serde_json::from_slice::<&serde_json::value::RawValue>(line) {
        Ok(raw) => serde_json::json!(raw),
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(line).into_owned()),
    };
    let record = serde_json::json!({
        "at": logging_common::Timestamp::now().to_rfc3339(),
        "reason": reason,
        "entry": entry,
    });
    if serde_json::to_writer(&mut *out, &record).is_ok() {
        out.push(b'\n');
    }
}

/// ±50% of `wait`, so many agents do not retry in step.
fn jitter(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
    wait.mul_f64(factor)
}
