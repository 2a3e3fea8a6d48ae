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

/// A batch's lines: the entries to validate, where each was, and those that are not text.
struct Lines<'a> {
    raws: Vec<&'a str>,
    /// The line number of each of `raws`.
    positions: Vec<usize>,
    unreadable: Rejections,
}

/// The non-blank lines of NDJSON (found with `memchr`), each without its newline.
fn entry_lines(ndjson: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', ndjson).chain(std::iter::once(ndjson.len()));
    ends.filter_map(move |end| {
        let line = ndjson.get(start..end)?;
        start = end + 1;
        (!line.iter().all(u8::is_ascii_whitespace)).then_some(line)
    })
}

/// Splits NDJSON into its entries (blank lines skipped); `None` past `max` entries, which is
/// found by counting lines before any is read. Each entry is parsed once, when validated.
fn read_lines(ndjson: &[u8], max: usize) -> Option<Lines<'_>> {
    if entry_lines(ndjson).nth(max).is_some() {
        return None;
    }
    let mut lines = Lines {
        raws: Vec::new(),
        positions: Vec::new(),
        unreadable: Rejections::default(),
    };
    for (index, line) in entry_lines(ndjson).enumerate() {
        match std::str::from_utf8(line) {
            Ok(text) => {
                lines.raws.push(text);
                lines.positions.push(index);
            }
            Err(error) => {
                let reason = format!("not UTF-8 text ({error})");
                lines.unreadable.push(Rejection {
                    index,
                    error: format!("entry: {reason}"),
                    errors: vec![FieldError::new("entry", reason)],
                    too_large: false,
                })
            }
        }
    }
    Some(lines)
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
    let max = state.config.max_batch_entries;
    let Some(Lines {
        raws,
        positions,
        unreadable,
    }) = read_lines(&ndjson, max)
    else {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch has more than {max} entries (MAX_BATCH_ENTRIES); send smaller batches"
            ),
        ));
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zstd_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        headers
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any body: decoded within the limit, or refused; never more than the limit.
        #[test]
        fn any_body_decompresses_within_the_limit_or_is_refused(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(out) = decompress(&zstd_headers(), &body, 4096) {
                prop_assert!(out.len() <= 4096);
            }
            let plain = decompress(&HeaderMap::new(), &body, 4096).unwrap();
            prop_assert_eq!(plain, body);
        }

        #[test]
        fn zstd_round_trips_and_bombs_stop_at_the_limit(text in proptest::collection::vec(any::<u8>(), 0..2048), copies in 1usize..64) {
            let body = zstd::bulk::compress(&text.repeat(copies), 3).unwrap();
            match decompress(&zstd_headers(), &body, 4096) {
                Ok(out) => prop_assert_eq!(out, text.repeat(copies)),
                Err(e) => {
                    prop_assert!(text.len() * copies > 4096);
                    prop_assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
                }
            }
        }

        /// Every non-blank line is accounted for: an entry to validate, or unreadable.
        #[test]
        fn every_line_is_read_or_rejected_by_its_index(lines in proptest::collection::vec(".{0,40}", 0..50)) {
            let ndjson = lines.join("\n");
            let entries = lines.iter().filter(|l| !l.bytes().all(|b| b.is_ascii_whitespace())).count();
            let read = read_lines(ndjson.as_bytes(), 100).unwrap();
            prop_assert_eq!(read.raws.len() + read.unreadable.count, entries);
            prop_assert!(read.positions.iter().all(|p| *p < entries));
            prop_assert!(read_lines(ndjson.as_bytes(), entries.saturating_sub(1)).is_none() || entries == 0);
        }
    }
}
