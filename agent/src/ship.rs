//! Shipping batches: zstd NDJSON over HTTPS with the agent's client certificate
//! (`POST /v1/ingest`, DESIGN §5), retried with exponential backoff and jitter, honouring
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
        let mut done: BTreeMap<u64, (Vec<Mark>, usize)> = BTreeMap::new();
        let mut next_to_record = None::<u64>;
        let mut open = true;
        while open || !sending.is_empty() {
            tokio::select! {
                batch = batches.recv(), if open && sending.len() < CONCURRENCY => match batch {
                    Some(batch) => {
                        next_to_record.get_or_insert(batch.sequence);
                        let this = self.clone();
                        sending.spawn(async move {
                            let sequence = batch.sequence;
                            let marks = batch.marks.clone();
                            let raw = batch.raw_bytes;
                            this.deliver(batch).await;
                            (sequence, marks, raw)
                        });
                    }
                    None => open = false,
                },
                Some(finished) = sending.join_next(), if !sending.is_empty() => {
                    let Ok((sequence, marks, raw)) = finished else { continue };
                    done.insert(sequence, (marks, raw));
                    // Record positions in order: only a prefix of acknowledged batches.
                    while let Some(next) = next_to_record {
                        let Some((marks, raw)) = done.remove(&next) else { break };
                        self.checkpoints.acknowledge(&marks);
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
            loop {
                let started = Instant::now();
                let sent = self
                    .client
                    .post(&self.url)
                    .header("content-type", "application/x-ndjson")
                    .header("content-encoding", "zstd")
                    .header("x-batch-id", sequence.to_string())
                    .body(body.to_vec())
                    .send()
                    .await;
                let wait = match sent {
                    Ok(response) if response.status() == StatusCode::OK => {
                        metrics::histogram!("logging_agent_batch_seconds")
                            .record(started.elapsed().as_secs_f64());
                        let answer: serde_json::Value = response.json().await.unwrap_or_default();
                        let count = |k: &str| answer[k].as_u64().unwrap_or(0);
                        let rejected = answer["rejected"].as_array().map_or(0, |r| r.len() as u64);
                        if rejected > 0 {
                            tracing::warn!(batch = sequence, rejected = %answer["rejected"], "the aggregator rejected entries");
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
                        let reason = response.text().await.unwrap_or_default();
                        self.dead_letter(body, &reason);
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
            self.dead_letter(body, "a single entry is larger than the aggregator accepts");
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

    fn dead_letter(&self, body: &[u8], reason: &str) {
        tracing::error!(reason, file = %self.dead_letter.display(), "the aggregator refused a batch; kept in the dead-letter file");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .and_then(|mut f| {
                f.write_all(&decompress(body))?;
                f.sync_all()
            });
        if let Err(error) = written {
            tracing::error!(%error, "cannot write the dead-letter file");
        }
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
