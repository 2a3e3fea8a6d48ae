//! `/api/logs…` and `/api/search`: write, list, fetch, delete and search log entries.

use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use logging_common::validate::{AuditEvent, FieldError};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::params::{Params, log_filter};
use super::{Admin, Body, Reader, SharedState, Writer, json as json_reply, json_response};
use crate::db::deletion_actor;
use crate::error::ApiError;
use crate::index::IndexError;
use crate::index::query::Order;
use crate::ingest::{IngestError, IngestOutcome};
use crate::read::{Cursor, ListRequest, Listing, ReadError};
use crate::wal::WalError;

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> ApiError {
        match error {
            IngestError::Backpressure { .. } => ApiError::backpressure(error.to_string(), 1),
            // Nothing was stored and nothing acknowledged: a client that retries later loses
            // nothing, so say so with 503 and Retry-After (agents and SDKs retry those; a 500
            // or a 507 is given up on by most).
            IngestError::Wal(WalError::Io(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
                tracing::error!(error = %e, "the write-ahead log's disk is full");
                ApiError {
                    retry_after_secs: Some(5),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the aggregator's disk (DATA_DIR) is full: nothing of this request was \
                         stored; retry later",
                    )
                }
            }
            IngestError::Wal(e) => {
                tracing::error!(error = %e, "the write-ahead log refused a write");
                ApiError {
                    retry_after_secs: Some(5),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the write-ahead log cannot write now: nothing of this request was \
                         stored; retry later (the cause is in the aggregator's log)",
                    )
                }
            }
        }
    }
}

impl From<IndexError> for ApiError {
    fn from(error: IndexError) -> ApiError {
        ApiError::internal("the embedded index failed", error)
    }
}

/// Splits a body into its entries: one object, or an array of at most `max_entries`.
///
/// The array is read element by element and reading stops at the first element past the
/// limit, so a body of a million tiny elements costs no more than one of `max_entries`.
fn entries_of(body: &[u8], max_entries: usize) -> Result<(Vec<&RawValue>, bool), ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let mut deserializer = serde_json::Deserializer::from_slice(body);
            let entries = serde::Deserializer::deserialize_seq(
                &mut deserializer,
                BoundedEntries { max: max_entries },
            )
            .map_err(|e| {
                if e.to_string().starts_with(TOO_MANY) {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the array has more than {max_entries} entries (MAX_BATCH_ENTRIES); send smaller batches"
                        ),
                    )
                } else {
                    ApiError::field("body", format!("invalid JSON: {e}"))
                }
            })?;
            deserializer
                .end()
                .map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
            if entries.is_empty() {
                return Err(ApiError::field("body", "the array has no entries"));
            }
            Ok((entries, true))
        }
        Some(b'{') => {
            let entry: &RawValue = serde_json::from_slice(body)
                .map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
            Ok((vec![entry], false))
        }
        _ => Err(ApiError::field(
            "body",
            "expected a JSON object or an array of objects",
        )),
    }
}

const TOO_MANY: &str = "too many entries";

/// Reads a JSON array's elements as raw values, failing at the first past `max`.
struct BoundedEntries {
    max: usize,
}

impl<'de> serde::de::Visitor<'de> for BoundedEntries {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = seq.next_element::<&RawValue>()? {
            if entries.len() == self.max {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

#[derive(Serialize)]
struct BatchCreated<'a> {
    ids: &'a [Option<Uuid>],
    accepted: usize,
    duplicates: usize,
    /// The first [`crate::ingest::MAX_LISTED_REJECTIONS`], by index.
    rejected: &'a [crate::ingest::Rejection],
    /// Every rejection, listed or not.
    rejected_count: usize,
}

fn wants_wait_for(params: &mut Params) -> Result<bool, ApiError> {
    Ok(params
        .take_parsed("refresh", |t| match t {
            "wait_for" | "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("expected wait_for or false, got {t:?}")),
        })?
        .unwrap_or(false))
}

/// `POST /api/logs`: one entry or an array; answers once they are durable.
pub async fn create(
    State(state): State<SharedState>,
    Writer(_caller): Writer,
    RawQuery(query): RawQuery,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let mut params = Params::parse(query.as_deref());
    let wait = wants_wait_for(&mut params)?;
    params.finish("; POST /api/logs takes only `refresh`")?;
    let (raws, is_array) = entries_of(&body, state.config.max_batch_entries)?;
    let texts: Vec<&str> = raws.iter().map(|r| r.get()).collect();
    let outcome: IngestOutcome = state.ingest.ingest(&texts, None).await?;
    if wait {
        // Bounded: the entries are durable whatever happens; a store that cannot catch up
        // (a full disk) must not hold the request forever.
        let limit = state.config.refresh_interval() * 10 + Duration::from_secs(10);
        let _ = tokio::time::timeout(limit, state.ingest.wait_visible(&outcome)).await;
    }
    if !is_array {
        if let Some(rejection) = outcome.rejected.listed.into_iter().next() {
            let status = if rejection.too_large {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Err(ApiError::fields(status, rejection.errors));
        }
        return Ok(json_reply(
            StatusCode::CREATED,
            &json!({ "id": outcome.ids[0] }),
        ));
    }
    if outcome.ids.iter().all(Option::is_none) {
        return Err(nothing_stored(&outcome.rejected));
    }
    Ok(json_reply(
        StatusCode::CREATED,
        &BatchCreated {
            ids: &outcome.ids,
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected: &outcome.rejected.listed,
            rejected_count: outcome.rejected.count,
        },
    ))
}

/// The answer when no entry of a batch could be stored, on `/api/logs` and `/v1/ingest`
/// alike: 400 with the listed entries' problems by index (`[i].field`) and the full count.
pub(super) fn nothing_stored(rejected: &crate::ingest::Rejections) -> ApiError {
    let errors = rejected
        .listed
        .iter()
        .flat_map(|r| {
            r.errors.iter().map(move |e| {
                FieldError::new(format!("[{}].{}", r.index, e.field), e.reason.clone())
            })
        })
        .collect();
    let mut error = ApiError::fields(StatusCode::BAD_REQUEST, errors);
    if rejected.count > rejected.listed.len() {
        error.detail = format!(
            "no entry was stored: {} were rejected, the first {} are listed",
            rejected.count,
            rejected.listed.len()
        );
    }
    error
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> ApiError {
        match error {
            ReadError::Invalid { field, reason } => ApiError::field(field, reason),
            ReadError::Engine { engine, detail } => {
                tracing::warn!(engine, %detail, "the query backend failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the query backend ({engine}) failed: {detail}"),
                )
            }
            ReadError::Index(e) => ApiError::internal("the embedded index failed", e),
            ReadError::Task(e) => ApiError::internal("the read task failed", e),
        }
    }
}

/// Writes `{"items":[…],"next_cursor":…}` around stored JSON without re-encoding it; adds
/// `caveats` when the engine could not answer exactly.
fn page_response(listing: Listing, order: Order, with_total: bool, took: Duration) -> Response {
    let mut body = Vec::with_capacity(
        listing
            .entries
            .iter()
            .map(|e| e.json.len() + 64)
            .sum::<usize>()
            + 64,
    );
    body.extend_from_slice(b"{\"items\":[");
    for (i, entry) in listing.entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        match &entry.highlight {
            Some(highlight) if entry.json.ends_with(b"}") => {
                body.extend_from_slice(&entry.json[..entry.json.len() - 1]);
                body.extend_from_slice(b",\"highlight\":");
                body.extend_from_slice(
                    &serde_json::to_vec(highlight).unwrap_or_else(|_| b"null".to_vec()),
                );
                body.push(b'}');
            }
            _ => body.extend_from_slice(&entry.json),
        }
    }
    body.extend_from_slice(b"],\"next_cursor\":");
    match listing.next {
        Some(cursor) => {
            body.push(b'"');
            body.extend_from_slice(cursor.encode(order).as_bytes());
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
    if with_total {
        body.extend_from_slice(format!(",\"total\":{}", listing.total.unwrap_or(0)).as_bytes());
    }
    if !listing.caveats.is_empty() {
        body.extend_from_slice(b",\"caveats\":");
        body.extend_from_slice(&serde_json::to_vec(&listing.caveats).unwrap_or_default());
    }
    body.extend_from_slice(format!(",\"took_ms\":{}}}", took.as_millis()).as_bytes());
    json_response(StatusCode::OK, body)
}

async fn run_search(
    state: &SharedState,
    query: Option<String>,
    with_text: bool,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    tracing::Span::current().record("query.kind", if with_text { "search" } else { "list" });
    let mut params = Params::parse(query.as_deref());
    let filter = log_filter(&mut params, with_text)?;
    let limit = params.take_limit()?;
    let order = params.take_order(Order::Desc)?;
    let after = match params.take("cursor") {
        Some(cursor) => {
            Some(Cursor::decode(&cursor, order).map_err(|e| ApiError::field("cursor", e))?)
        }
        None => None,
    };
    let highlight = if with_text {
        params.take_bool("highlight", true)?
    } else {
        false
    };
    params.finish(if with_text {
        ""
    } else {
        "; full-text `q` is served by /api/search"
    })?;
    let caveats = archive_caveats(state, filter.start, filter.end);
    let request = ListRequest {
        filter,
        limit,
        order,
        after,
        with_total: with_text,
        highlight,
    };
    let mut listing = state.reads.list(&state.index, request).await?;
    listing.caveats.extend(caveats);
    metrics::histogram!("logging_aggregator_query_duration_seconds",
        "kind" => if with_text { "search" } else { "list" })
    .record(started.elapsed().as_secs_f64());
    Ok(page_response(listing, order, with_text, started.elapsed()))
}

/// What an answer over `[start, end)` lacks because the archive holds it (archived days that
/// are not restored).
pub(super) fn archive_caveats(
    state: &SharedState,
    start: Option<logging_common::Timestamp>,
    end: Option<logging_common::Timestamp>,
) -> Vec<crate::read::Caveat> {
    let Some(archive) = &state.archive else {
        return Vec::new();
    };
    archive
        .caveats(start.map(|s| s.as_nanos()), end.map(|e| e.as_nanos()))
        .into_iter()
        .map(|reason| crate::read::Caveat::new("archive", reason))
        .collect()
}

/// `GET /api/logs`: filtered listing, newest first by default, with a cursor.
pub async fn list(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    run_search(&state, query, false).await
}

/// `GET /api/search`: full text plus every filter, with an exact total and highlights.
pub async fn search(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    run_search(&state, query, true).await
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| ApiError::field("id", format!("{text:?} is not a UUID")))
}

/// Looks an entry up, waiting for it if it is durable but not yet searchable (so a read right
/// after a write finds it, as Elasticsearch's realtime GET does). An entry that is durable but
/// that the store cannot catch up with (its disk full, say) is a 503 naming the store, never
/// a 404: it exists.
async fn lookup(state: &SharedState, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, ApiError> {
    if let Some(lsn) = state.ingest.pending_lsn(&id) {
        let wait = state.config.refresh_interval() * 5 + Duration::from_secs(1);
        if tokio::time::timeout(wait, state.index.wait_searchable(lsn))
            .await
            .is_err()
        {
            return Err(ApiError::unavailable(format!(
                "log entry {id} is stored in the write-ahead log, but the embedded index has \
                 not caught up with it (it is {} bytes behind; the cause is in the \
                 aggregator's log)",
                state
                    .ingest
                    .wal()
                    .unread_bytes(crate::ingest::INDEX_CONSUMER)
            )));
        }
    }
    Ok(state.reads.get(&state.index, id).await?)
}

/// `GET /api/logs/{id}`.
pub async fn get_one(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match lookup(&state, id).await? {
        Some((_, json)) => Ok(json_response(StatusCode::OK, json)),
        None => Err(ApiError::not_found(format!("no log entry with id {id}"))),
    }
}

/// `DELETE /api/logs/{id}`: hides the entry at once, and records who did it.
pub async fn delete(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let Some((day, json)) = lookup(&state, id).await? else {
        return Err(ApiError::not_found(format!("no log entry with id {id}")));
    };
    let (ip, user_agent) = super::client::client_details(&state.proxies, peer.ip(), &headers);
    let entry: Map<String, Value> = serde_json::from_slice(&json).unwrap_or_default();
    let mut metadata = Map::new();
    for key in ["service", "level", "timestamp"] {
        if let Some(value) = entry.get(key) {
            metadata.insert(key.into(), value.clone());
        }
    }
    metadata.insert("soft_delete".into(), Value::Bool(true));
    let event = AuditEvent {
        id: None,
        timestamp: None,
        actor: deletion_actor(&caller),
        action: "log.deleted".into(),
        entity_type: "log_entry".into(),
        entity_id: id.to_string(),
        old_values: None,
        new_values: None,
        metadata,
        ip_address: Some(ip),
        user_agent,
        trace_id: None,
    };
    let audit = state
        .db
        .delete_log_entry(id, day, &caller, event)
        .await
        .map_err(|e| ApiError::internal("cannot record the deletion", e))?;
    state.index.hide(id, day);
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "id": id, "deleted": true, "audit_id": audit.id }),
    ))
}

/// `GET /api/logs/stats`.
pub async fn stats(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
) -> Result<Response, ApiError> {
    let index = state.index.clone();
    let stats = tokio::task::spawn_blocking(move || index.stats())
        .await
        .map_err(|e| ApiError::internal("the stats task failed", e))??;
    let wal = state.ingest.wal().stats();
    let mut services: Vec<(String, u64)> = stats.totals.by_service.into_iter().collect();
    services.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let services: Map<String, Value> = services.into_iter().map(|(k, v)| (k, v.into())).collect();
    let ratio = if stats.stored_bytes > 0 {
        stats.totals.raw_bytes as f64 / stats.stored_bytes as f64
    } else {
        0.0
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "entries": stats.totals.entries,
            "raw_bytes": stats.totals.raw_bytes,
            "stored_bytes": stats.stored_bytes,
            "compression_ratio": ratio,
            "ingest_rate_per_second": state.ingest.rate.per_second(),
            "services": services,
            "partitions": stats.partitions,
            "sinks": super::health::sink_reports(&state, &wal),
            "wal": wal,
            "searchable_lsn": state.index.searchable_lsn(),
        }),
    ))
}
