//! `/api/audit…`: record and read the audit trail, and verify its hash chain. There is no
//! route that changes or deletes an entry (and the database refuses it too).

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use logging_common::validate::{normalize_identifier, validate_audit_event};
use serde_json::json;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::params::{Params, decode_audit_cursor, encode_audit_cursor};
use super::{Body, Reader, SharedState, Writer, json as json_reply};
use crate::db::AuditFilter;
use crate::error::ApiError;

fn enabled(state: &SharedState) -> Result<(), ApiError> {
    if state.config.audit_log_enabled {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "the audit trail is disabled (AUDIT_LOG_ENABLED=false)",
        ))
    }
}

fn db_error(error: crate::db::DbError) -> ApiError {
    ApiError::internal("the relational store failed", error)
}

/// `POST /api/audit`: appends an event; the same `id` again returns the stored entry.
pub async fn create(
    State(state): State<SharedState>,
    Writer(_caller): Writer,
    Body(body): Body,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let raw: &RawValue = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
    let event = validate_audit_event(raw)
        .map_err(|e| ApiError::fields(StatusCode::BAD_REQUEST, e.errors))?;
    let (entry, _created) = state.db.record_audit(event).await.map_err(db_error)?;
    metrics::counter!("logging_aggregator_audit_entries_total").increment(1);
    Ok(json_reply(StatusCode::CREATED, &entry))
}

/// `GET /api/audit`: newest first by default; filters by actor, action, entity and time.
pub async fn list(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let mut params = Params::parse(query.as_deref());
    let actor = params.take("actor").or_else(|| params.take("user"));
    let ascending =
        params.take_order(crate::index::query::Order::Desc)? == crate::index::query::Order::Asc;
    let mut filter = AuditFilter {
        actor,
        action: params.take("action"),
        entity_type: params.take("entity_type"),
        entity_id: params.take("entity_id").map(normalize_identifier),
        trace_id: params.take("trace_id"),
        start: params.take_timestamp("start")?,
        end: params.take_timestamp("end")?,
        after_seq: None,
        ascending,
        limit: params.take_limit()?,
    };
    if let Some(cursor) = params.take("cursor") {
        filter.after_seq = Some(decode_audit_cursor(&cursor, ascending)?);
    }
    params.finish("")?;
    if let (Some(start), Some(end)) = (filter.start, filter.end)
        && start >= end
    {
        return Err(ApiError::field("start", "must be before end"));
    }
    let page = state.db.audit_entries(&filter).await.map_err(db_error)?;
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "items": page.entries,
            "next_cursor": page.next_seq.map(|s| encode_audit_cursor(ascending, s)),
        }),
    ))
}

/// `GET /api/audit/{id}`.
pub async fn get_one(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let id =
        Uuid::try_parse(&id).map_err(|_| ApiError::field("id", format!("{id:?} is not a UUID")))?;
    match state.db.audit_entry(id).await.map_err(db_error)? {
        Some(entry) => Ok(json_reply(StatusCode::OK, &entry)),
        None => Err(ApiError::not_found(format!("no audit entry with id {id}"))),
    }
}

/// `GET /api/audit/verify`: recomputes the hash chain.
pub async fn verify(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let report = state.db.verify_audit_chain().await.map_err(db_error)?;
    Ok(json_reply(StatusCode::OK, &report))
}
