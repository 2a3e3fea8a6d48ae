//! Liveness, readiness, Prometheus metrics and the OpenAPI document. No token needed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{SharedState, json as json_reply, json_response};
use crate::error::ApiError;
use crate::ingest::INDEX_CONSUMER;

/// `GET /health`: the process is up and serving.
pub async fn live(State(state): State<SharedState>) -> Response {
    json_reply(
        StatusCode::OK,
        &json!({
            "status": "ok",
            "service": state.config.service_name,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": state.started.elapsed().as_secs(),
        }),
    )
}

/// Each sink's status with its WAL lag (entries and bytes not yet delivered).
pub fn sink_reports(state: &SharedState, wal: &crate::wal::WalStats) -> Vec<serde_json::Value> {
    state
        .sinks
        .lock()
        .iter()
        .map(|sink| {
            let lag = wal.consumers.iter().find(|c| c.name == sink.name);
            let mut report = serde_json::to_value(sink).unwrap_or_default();
            report["lag_entries"] = lag.map_or(0, |l| l.lag_entries).into();
            report["lag_bytes"] = lag.map_or(0, |l| l.lag_bytes).into();
            report["overrun_entries"] = lag.map_or(0, |l| l.overrun_entries).into();
            report
        })
        .collect()
}

/// The state of every dependency, as `/health/ready` reports it.
pub async fn dependency_checks(state: &SharedState) -> (bool, serde_json::Value) {
    let wal_ok = state.ingest.wal().is_healthy();
    let lag_bytes = state.ingest.wal().unread_bytes(INDEX_CONSUMER);
    let index_ok = state.indexer_healthy.load(Ordering::Acquire);
    let db = tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await;
    let (db_ok, db_error) = match db {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => (false, Some(e.to_string())),
        Err(_) => (false, Some("no answer within 2 s".to_string())),
    };
    let status = |ok: bool| if ok { "up" } else { "down" };
    let mut checks = json!({
        "wal": { "status": status(wal_ok), "end_lsn": state.ingest.wal().end_lsn() },
        "index": {
            "status": status(index_ok),
            "lag_bytes": lag_bytes,
            "searchable_lsn": state.index.searchable_lsn(),
        },
        "database": {
            "status": status(db_ok),
            "engine": state.db.engine().name(),
            "error": db_error,
        },
    });
    // Sinks are optional: one that fails makes the aggregator degraded, not unready (ingest
    // and queries go on; the sink catches up when its engine returns).
    let sinks = sink_reports(state, &state.ingest.wal().stats());
    for sink in &sinks {
        let up = sink["status"] == "up";
        if let Some(name) = sink["name"].as_str() {
            metrics::gauge!("logging_aggregator_dependency_up", "dependency" => format!("sink:{name}"))
                .set(if up { 1.0 } else { 0.0 });
        }
    }
    checks["sinks"] = sinks.into();
    for (name, ok) in [("wal", wal_ok), ("index", index_ok), ("database", db_ok)] {
        metrics::gauge!("logging_aggregator_dependency_up", "dependency" => name).set(if ok {
            1.0
        } else {
            0.0
        });
    }
    (wal_ok && index_ok && db_ok, checks)
}

/// `GET /health/ready`: 200 when every dependency is up, 503 (with which one) otherwise.
pub async fn ready(State(state): State<SharedState>) -> Response {
    let (ok, checks) = dependency_checks(&state).await;
    let degraded = checks["sinks"]
        .as_array()
        .is_some_and(|sinks| sinks.iter().any(|s| s["status"] != "up"));
    let status = match (ok, degraded) {
        (false, _) => "not_ready",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    json_reply(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({ "status": status, "checks": checks }),
    )
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    match (&state.metrics, state.config.prometheus_enabled) {
        (Some(handle), true) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        _ => ApiError::not_found("metrics are disabled (PROMETHEUS_ENABLED=false)").into_response(),
    }
}

const OPENAPI: &str = include_str!("openapi.json");

/// The OpenAPI document describing this API.
pub fn openapi_document() -> &'static str {
    OPENAPI
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> Response {
    json_response(StatusCode::OK, OPENAPI.as_bytes().to_vec())
}
