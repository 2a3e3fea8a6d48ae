//! `POST /v1/ingest`: the agents' batches (docs/design.md §5), on the mTLS ingest listener only.
//!
//! The body is NDJSON of entries, usually zstd-compressed (`Content-Encoding: zstd`). Each
//! line is read on its own, so a malformed line is rejected with its index and costs nothing
//! else. The answer: `{"accepted":N,"duplicates":N,"rejected":[{"index":i,"error":"…"}],
//! "rejected_count":N}`.

use std::io::Read;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::value::RawValue;

use super::{Body, SharedState, json};
use crate::error::ApiError;
use crate::ingest::listener::AgentPeer;
use crate::ingest::{Rejection, Rejections};
use logging_common::validate::FieldError;

fn decompress(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "identity" | "" => Ok(body.to_vec()),
        "zstd" => {
            let decoder = zstd::stream::read::Decoder::new(body)
                .map_err(|e| ApiError::field("body", format!("not zstd: {e}")))?;
            let mut out = Vec::with_capacity(body.len() * 6);
            // One byte past the limit tells an oversize body from one that fits exactly.
            decoder
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ApiError::field("body", format!("not valid zstd: {e}")))?;
            if out.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the batch is larger than MAX_REQUEST_BYTES once decompressed; send smaller batches",
                ));
            }
            Ok(out)
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported; use zstd or none"),
        )),
    }
}

/// `POST /v1/ingest`.
///
/// At most `MAX_BATCH_ENTRIES` lines (413 past it, counted before any line is read); the
/// answer lists the first rejections and counts them all. A batch of which nothing could be
/// stored is a 400, as on `/api/logs`; duplicates count as stored.
pub async fn ingest(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ndjson = decompress(&headers, &body, state.config.max_request_bytes)?;
    drop(body);
    let is_entry = |line: &&[u8]| !line.iter().all(u8::is_ascii_whitespace);
    let max = state.config.max_batch_entries;
    if ndjson
        .split(|&b| b == b'\n')
        .filter(is_entry)
        .nth(max)
        .is_some()
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch has more than {max} entries (MAX_BATCH_ENTRIES); send smaller batches"
            ),
        ));
    }
    let mut raws: Vec<&RawValue> = Vec::new();
    let mut positions = Vec::new();
    let mut unreadable = Rejections::default();
    for (index, line) in ndjson.split(|&b| b == b'\n').filter(is_entry).enumerate() {
        match serde_json::from_slice::<&RawValue>(line) {
            Ok(raw) => {
                raws.push(raw);
                positions.push(index);
            }
            Err(error) => {
                let reason = format!("not JSON ({error})");
                unreadable.push(Rejection {
                    index,
                    error: format!("entry: {reason}"),
                    errors: vec![FieldError::new("entry", reason)],
                    too_large: false,
                })
            }
        }
    }
    let outcome = state.ingest.ingest(&raws, peer.name.as_deref()).await?;
    let mut validated = outcome.rejected;
    for rejection in &mut validated.listed {
        rejection.index = positions[rejection.index];
    }
    let rejected = unreadable.merge(validated);
    metrics::counter!("logging_aggregator_ingest_batches_total").increment(1);
    if outcome.accepted + outcome.duplicates == 0 && rejected.count > 0 {
        return Err(super::logs::nothing_stored(&rejected));
    }
    if let Some(batch) = headers.get("x-batch-id").and_then(|v| v.to_str().ok()) {
        tracing::debug!(batch, agent = ?peer.name, accepted = outcome.accepted, "ingested a batch");
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "accepted": outcome.accepted,
            "duplicates": outcome.duplicates,
            "rejected": rejected.listed,
            "rejected_count": rejected.count,
        }),
    ))
}
