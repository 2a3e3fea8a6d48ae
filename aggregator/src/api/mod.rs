//! The operator API (docs/design.md §6): routes, shared state, access control and the helpers every
//! handler uses. Handlers are thin: they parse, call the store, and shape the answer.

mod alerts;
mod analytics;
mod archive;
mod audit;
pub mod cache;
pub mod client;
pub mod elastic;
pub mod health;
mod ingest;
mod logs;
mod loki;
mod loki_read;
pub mod otlp;
mod params;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use tracing::Instrument;

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{Caller, Permission, TokenTable};
use crate::config::Config;
use crate::db::Database;
use crate::error::ApiError;
use crate::index::LogIndex;
use crate::ingest::Ingest;

pub use health::openapi_document;
pub use otlp::grpc_router as otlp_grpc_router;

/// Everything a handler may need.
pub struct AppState {
    pub config: Arc<Config>,
    pub ingest: Arc<Ingest>,
    pub index: Arc<LogIndex>,
    /// The engine reads go to (`LOG_QUERY_BACKEND`).
    pub reads: Arc<crate::read::QueryBackend>,
    pub db: Arc<Database>,
    /// `None` when access control is off.
    pub tokens: Option<TokenTable>,
    pub metrics: Option<PrometheusHandle>,
    pub started: Instant,
    pub indexer_healthy: Arc<AtomicBool>,
    pub alerts: Arc<crate::alerts::Alerting>,
    pub sinks: crate::sinks::SinkStatuses,
    /// Whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`).
    pub proxies: client::TrustedProxies,
    /// What Elasticsearch clients install before they send (templates, ILM policies).
    pub client_setup: elastic::ClientSetup,
    /// The archive (`ARCHIVE_URL`), when set.
    pub archive: Option<Arc<crate::archive::Archive>>,
    /// Answers over past days (`QUERY_CACHE_BYTES`).
    pub query_cache: Arc<cache::QueryCache>,
}

pub type SharedState = Arc<AppState>;

/// The operator API's routes.
pub fn router(state: SharedState) -> Router {
    let max_body = state.config.max_request_bytes;
    Router::new()
        .route("/api/logs", get(logs::list).post(logs::create))
        .route("/api/logs/stats", get(logs::stats))
        .route("/api/logs/{id}", get(logs::get_one).delete(logs::delete))
        .route("/api/search", get(logs::search))
        .route("/api/analytics", get(analytics::analytics))
        .route("/api/archive", get(archive::list))
        .route(
            "/api/archive/{day}/restore",
            post(archive::restore).delete(archive::unrestore),
        )
        .route("/api/audit", get(audit::list).post(audit::create))
        .route("/api/audit/verify", get(audit::verify))
        .route("/api/audit/{id}", get(audit::get_one))
        .route("/api/alerts", get(alerts::list))
        .route(
            "/api/alerts/rules",
            get(alerts::list_rules).post(alerts::create_rule),
        )
        .route(
            "/api/alerts/rules/{id}",
            get(alerts::get_rule)
                .put(alerts::update_rule)
                .delete(alerts::delete_rule),
        )
        .route("/api/alerts/{id}", get(alerts::get_one))
        .route("/api/alerts/{id}/ack", post(alerts::acknowledge))
        .route("/api/alerts/{id}/resolve", post(alerts::resolve))
        .route("/loki/api/v1/push", post(loki::push))
        .route("/v1/logs", post(otlp::export))
        .route(
            "/loki/api/v1/query_range",
            get(loki_read::query_range).post(loki_read::query_range),
        )
        .route(
            "/loki/api/v1/query",
            get(loki_read::query_instant).post(loki_read::query_instant),
        )
        .route(
            "/loki/api/v1/labels",
            get(loki_read::labels).post(loki_read::labels),
        )
        .route(
            "/loki/api/v1/label",
            get(loki_read::labels).post(loki_read::labels),
        )
        .route(
            "/loki/api/v1/label/{name}/values",
            get(loki_read::label_values),
        )
        .route(
            "/loki/api/v1/series",
            get(loki_read::series).post(loki_read::series),
        )
        .route(
            "/loki/api/v1/index/stats",
            get(loki_read::index_stats).post(loki_read::index_stats),
        )
        .route(
            "/loki/api/v1/index/volume",
            get(loki_read::volume).post(loki_read::volume),
        )
        .route(
            "/loki/api/v1/index/volume_range",
            get(loki_read::volume_range).post(loki_read::volume_range),
        )
        .route("/loki/api/v1/tail", get(loki_read::tail))
        .route("/loki/api/v1/status/buildinfo", get(loki_read::buildinfo))
        .route("/ready", get(loki_read::ready))
        .route("/", get(elastic::root))
        .route("/_bulk", post(elastic::bulk).put(elastic::bulk))
        .route(
            "/{index}/_bulk",
            post(elastic::bulk_index).put(elastic::bulk_index),
        )
        .route("/_license", get(elastic::license))
        .route("/_cluster/health", get(elastic::cluster_health))
        .route("/_nodes/http", get(elastic::nodes_http))
        .route(
            "/_index_template/{name}",
            get(elastic::get_template).put(elastic::put_template),
        )
        .route(
            "/_ilm/policy/{name}",
            get(elastic::get_policy).put(elastic::put_policy),
        )
        .route("/health", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/api/openapi.json", get(health::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track_requests))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The agents' ingest routes, served on the mTLS listener (`INGEST_PORT`) only.
pub fn ingest_router(state: SharedState) -> Router {
    let max_body = state.config.max_request_bytes;
    Router::new()
        .route("/v1/ingest", axum::routing::post(ingest::ingest))
        .route("/loki/api/v1/push", axum::routing::post(loki::push_mtls))
        .route("/v1/logs", axum::routing::post(otlp::export_mtls))
        .route(
            "/_bulk",
            axum::routing::post(elastic::bulk_mtls).put(elastic::bulk_mtls),
        )
        .route(
            "/{index}/_bulk",
            axum::routing::post(elastic::bulk_index_mtls).put(elastic::bulk_index_mtls),
        )
        .route("/health", get(health::live))
        .fallback(not_found)
        .layer(middleware::from_fn(track_requests))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// A listener that serves only `/metrics` (`PROMETHEUS_PORT`).
pub fn metrics_router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /api/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this method is not allowed here; see /api/openapi.json",
    )
}

/// The matched route (`/api/logs/{id}`, or `unmatched`) and the method of a request.
fn route_and_method(request: &Request) -> (String, String) {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    (route, request.method().as_str().to_string())
}

/// Runs the request inside its trace span (see [`request_span`]).
async fn traced(request: Request, next: Next, method: &str, route: &str) -> Response {
    let span = request_span(&request, method, route);
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// Traces requests without counting them (OTLP/gRPC, whose outcome is in the trailers and
/// which the HTTP metrics have never covered).
pub(crate) async fn trace_requests(request: Request, next: Next) -> Response {
    let (route, method) = route_and_method(&request);
    traced(request, next, &method, &route).await
}

/// Counts requests and their latency per route, method and status, and traces them.
async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let (route, method) = route_and_method(&request);
    let response = traced(request, next, &method, &route).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("logging_aggregator_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("logging_aggregator_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(started.elapsed().as_secs_f64());
    response
}

/// The trace span of one API request (a `debug` span: only when traces are exported). A
/// caller's W3C `traceparent` makes it a child of the caller's span. Handlers record
/// `query.kind` on it (`tracing::Span::current()`).
fn request_span(request: &Request, method: &str, route: &str) -> tracing::Span {
    let span = tracing::debug_span!(
        "request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        query.kind = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    span.record("otel.name", format!("{method} {route}"));
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(traceparent) = header("traceparent") {
        logging_common::telemetry::continue_trace(&span, traceparent, header("tracestate"));
    }
    span
}

fn caller_from(
    state: &AppState,
    headers: &HeaderMap,
    needed: Permission,
) -> Result<Caller, ApiError> {
    let Some(tokens) = &state.tokens else {
        return Ok(Caller::anonymous());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(presented_token)
        .ok_or_else(ApiError::unauthorized)?;
    let caller = tokens
        .caller(&token)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the bearer token is not valid"))?;
    if !caller.role.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "the {} role may not do this; it needs {}",
            caller.role.as_str(),
            match needed {
                Permission::Read => "reader or admin",
                Permission::Write => "writer or admin",
                Permission::Admin => "admin",
            }
        )));
    }
    Ok(caller)
}

/// The token of an `Authorization` header: `Bearer <token>`, or `Basic` with the token as the
/// password (what Promtail, Alloy, Fluent Bit and Grafana's Loki data source offer).
fn presented_token(value: &str) -> Option<String> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.trim().to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_user, password) = text.split_once(':')?;
    Some(password.to_string())
}

macro_rules! permission_extractor {
    ($name:ident, $permission:expr, $doc:literal) => {
        #[doc = $doc]
        pub struct $name(pub Caller);

        impl FromRequestParts<SharedState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &SharedState,
            ) -> Result<Self, Self::Rejection> {
                caller_from(state, &parts.headers, $permission).map($name)
            }
        }
    };
}

permission_extractor!(Reader, Permission::Read, "A caller allowed to read.");
permission_extractor!(
    Writer,
    Permission::Write,
    "A caller allowed to send logs and audit events."
);
permission_extractor!(
    Admin,
    Permission::Admin,
    "A caller allowed to delete, and to manage alerts and rules."
);

/// The request body, with an oversize body answered as 413 and one that does not arrive
/// within `HTTP_BODY_TIMEOUT` as 408, both problem+json.
pub struct Body(pub Bytes);

impl FromRequest<SharedState> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, Self::Rejection> {
        let limit = std::time::Duration::from_secs(state.config.http_body_timeout);
        let Ok(read) = tokio::time::timeout(limit, Bytes::from_request(request, state)).await
        else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within HTTP_BODY_TIMEOUT",
            ));
        };
        match read {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) => {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    Err(ApiError::new(
                        status,
                        "the request body is larger than MAX_REQUEST_BYTES; send smaller batches",
                    ))
                } else {
                    Err(ApiError::new(status, rejection.body_text()))
                }
            }
        }
    }
}

/// A gzip body decompressed, refused with 413 past `limit` bytes (read no further than one
/// byte past it, so a bomb costs nothing) and with 400 when it is not gzip; `what` names the
/// request in the 413.
pub(super) fn gunzip(body: &[u8], limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    use std::io::Read as _;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    flate2::read::GzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body: not valid gzip: {e}"),
            )
        })?;
    if out.len() > limit {
        return Err(decompressed_too_large(what));
    }
    Ok(out)
}

/// 413 for a body over `MAX_REQUEST_BYTES` once decompressed.
pub(super) fn decompressed_too_large(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the {what} is larger than MAX_REQUEST_BYTES once decompressed; send smaller batches"
        ),
    )
}

/// Appends `text` as a JSON string (quoted and escaped): how the handlers that write JSON out
/// directly (the Loki, OTLP and Elasticsearch wire forms) put text into it.
pub(crate) fn push_json(out: &mut String, text: &str) {
    // SAFETY: serde_json writes a `str` as a JSON string: the input's own UTF-8, quotes and
    // ASCII escapes, so the bytes appended keep `out` valid UTF-8 (and writing into a `Vec`
    // cannot fail midway). Written in place: this runs for several fields of every entry.
    let _ = serde_json::to_writer(unsafe { out.as_mut_vec() }, text);
}

/// Starts an entry's JSON as the protocol handlers write it: `{"id","timestamp","level",
/// "service","message"`, to be followed by the entry's other fields and the closing brace.
pub(crate) fn push_entry_head(
    out: &mut String,
    id: uuid::Uuid,
    timestamp: logging_common::Timestamp,
    level: logging_common::LogLevel,
    service: &str,
    message: &str,
) {
    out.push_str("{\"id\":\"");
    out.push_str(
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    out.push_str("\",\"timestamp\":\"");
    timestamp.write_rfc3339(out);
    out.push_str("\",\"level\":\"");
    out.push_str(level.as_str());
    out.push_str("\",\"service\":");
    push_json(out, service);
    out.push_str(",\"message\":");
    push_json(out, message);
}

/// A JSON response from bytes we already hold as JSON.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A JSON response from a serialisable value.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(status, body),
        Err(error) => ApiError::internal("cannot encode the response", error).into_response(),
    }
}

/// The state, for handlers that need no caller (health, metrics).
pub type AppStateExtractor = State<SharedState>;

/// Who asked for an action, for the audit trail.
pub(crate) struct Who<'a> {
    pub caller: &'a Caller,
    pub headers: &'a axum::http::HeaderMap,
    pub peer: std::net::SocketAddr,
}

/// Records an operator action in the audit trail (when it is enabled).
pub(crate) async fn audit(
    state: &SharedState,
    who: Who<'_>,
    action: &str,
    entity_type: &str,
    entity_id: String,
    old_values: Option<serde_json::Value>,
    new_values: Option<serde_json::Value>,
) -> Result<(), ApiError> {
    if !state.config.audit_log_enabled {
        return Ok(());
    }
    let object = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::Object(map)) => Some(map),
        _ => None,
    };
    let (ip, user_agent) = client::client_details(&state.proxies, who.peer.ip(), who.headers);
    let event = logging_common::validate::AuditEvent {
        id: None,
        timestamp: None,
        actor: crate::db::deletion_actor(who.caller),
        action: action.into(),
        entity_type: entity_type.into(),
        entity_id,
        old_values: object(old_values),
        new_values: object(new_values),
        metadata: serde_json::Map::new(),
        ip_address: Some(ip),
        user_agent,
        trace_id: None,
    };
    state
        .db
        .record_audit(event)
        .await
        .map_err(|e| ApiError::internal("cannot record the action in the audit trail", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// Written in place, a string is the JSON string serde_json makes of it, after
        /// whatever was already there.
        #[test]
        fn push_json_appends_the_json_string(before in ".{0,8}", text in any::<String>()) {
            let mut out = before.clone();
            super::push_json(&mut out, &text);
            prop_assert_eq!(out, before + &serde_json::to_string(&text).unwrap());
        }
    }
}
