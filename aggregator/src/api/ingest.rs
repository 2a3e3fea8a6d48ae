//! `POST /v1/ingest`: the agents' batches (DESIGN §5), on the mTLS ingest listener only.
//!
//! The body is NDJSON of entries, usually zstd-compressed (`Content-Encoding: zstd`). Each
//! line is read on its own, so a malformed line is rejected with its index and costs nothing
//! else. The answer: `{"accepted":N,"duplicates":N,"rejected":[{"index":i,"error":"…"}]}`.

use std::io::Read;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::value::RawValue;

use super::{Body, SharedState, json};
use crate::error::ApiError;
use crate::ingest::Rejection;
use crate::ingest::listener::AgentPeer;

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
pub async fn ingest(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ndjson = decompress(&headers, &body, state.config.max_request_bytes)?;
    let mut raws: Vec<&RawValue> = Vec::new();
    let mut positions = Vec::new();
    let mut rejected = Vec::new();
    let lines = ndjson
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace));
    for (index, line) in lines.enumerate() {
        match serde_json::from_slice::<&RawValue>(line) {
            Ok(raw) => {
                raws.push(raw);
                positions.push(index);
            }
            Err(error) => rejected.push(Rejection {
                index,
                error: format!("entry: not JSON ({error})"),
                errors: Vec::new(),
                too_large: false,
            }),
        }
    }
    let outcome = state.ingest.ingest(&raws, peer.name.as_deref()).await?;
    rejected.extend(outcome.rejected.into_iter().map(|r| Rejection {
        index: positions[r.index],
        ..r
    }));
    rejected.sort_by_key(|r| r.index);
    if let Some(batch) = headers.get("x-batch-id").and_then(|v| v.to_str().ok()) {
        tracing::debug!(batch, agent = ?peer.name, accepted = outcome.accepted, "ingested a batch");
    }
    metrics::counter!("logging_aggregator_ingest_batches_total").increment(1);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "accepted": outcome.accepted,
            "duplicates": outcome.duplicates,
            "rejected": rejected,
        }),
    ))
}
