//! Elasticsearch's `_bulk` API, and the calls clients make before they send, so Filebeat,
//! Fluent Bit, Vector, Logstash and the official Elasticsearch clients ship to the aggregator.
//!
//! `POST /_bulk` and `POST /{index}/_bulk` take NDJSON (gzip allowed) of `create` and `index`
//! actions, each followed by its document. A document becomes an entry:
//! - `@timestamp` / `timestamp` / `time` (RFC 3339 or epoch milliseconds), else the time it
//!   arrived;
//! - `message` / `msg` / `log` (Fluent Bit's raw line, parsed as the agent parses a container
//!   line: a JSON or logfmt line gives its fields), else the whole document as text;
//! - `log.level` / `level` / `severity` (flat or nested), else read from the message;
//! - `service.name` / `service`, else the container's name, else the index's name;
//! - Kubernetes fields as Filebeat (`kubernetes.namespace`, `.pod.name`, `.container.name`,
//!   `.node.name`) and Fluent Bit (`kubernetes.namespace_name`, `.pod_name`, `.container_name`,
//!   `.host`) write them into `context.kubernetes`; `trace.id`, `span.id`, `user.id` and the
//!   usual id spellings into their fields; everything else into `context`, with `_index`.
//!
//! Ids: with `_id`, the entry's id derives from (index, `_id`), so a re-sent `create` answers
//! `409` for that item as Elasticsearch does (and a re-sent `index` answers `200` with
//! `"result":"noop"`: entries are never overwritten); without one, from (index, document), so a
//! batch re-sent after a lost answer stores nothing twice.

use std::collections::BTreeMap;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logging_common::id::deterministic_log_id;
use logging_common::parse::{RawPairs, parse};
use logging_common::{LogLevel, Timestamp};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};

use super::push_json;
use super::{Body, SharedState, caller_from};
use crate::auth::Permission;
use crate::error::ApiError;
use crate::ingest::listener::AgentPeer;

/// The Elasticsearch version the aggregator answers as: what the clients check.
pub const VERSION: &str = "8.17.0";
const CLUSTER_NAME: &str = "logging-service";

/// Index templates and ILM policies clients install at start-up: kept (in memory) and given
/// back, so a client that checks for its template finds it; they do not change how entries
/// are stored.
#[derive(Default)]
pub struct ClientSetup {
    templates: Mutex<BTreeMap<String, Value>>,
    policies: Mutex<BTreeMap<String, Value>>,
}

/// A JSON answer with the header the official clients require of an Elasticsearch.
fn answer(status: StatusCode, body: &Value) -> Response {
    answer_text(status, body.to_string())
}

/// An answer from JSON text already written.
fn answer_text(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-elastic-product",
        HeaderValue::from_static("Elasticsearch"),
    );
    response
}

/// An error in Elasticsearch's shape.
fn error(status: StatusCode, kind: &str, reason: &str) -> Response {
    answer(
        status,
        &json!({
            "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
            "status": status.as_u16(),
        }),
    )
}

fn refused(e: ApiError) -> Response {
    let kind = match e.status {
        StatusCode::UNAUTHORIZED => "security_exception",
        StatusCode::FORBIDDEN => "security_exception",
        StatusCode::TOO_MANY_REQUESTS => "es_rejected_execution_exception",
        StatusCode::PAYLOAD_TOO_LARGE => "content_too_long_exception",
        _ => "illegal_argument_exception",
    };
    let mut response = error(e.status, kind, &e.detail);
    if let Some(secs) = e.retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Any valid token: writers probe the cluster before they send, readers look.
fn any_caller(state: &SharedState, headers: &HeaderMap) -> Result<(), ApiError> {
    caller_from(state, headers, Permission::Write)
        .or_else(|_| caller_from(state, headers, Permission::Read))
        .map(|_| ())
}

/// `GET /` and `HEAD /`: who answers.
pub async fn root(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(e) = any_caller(&state, &headers) {
        return refused(e);
    }
    answer(
        StatusCode::OK,
        &json!({
            "name": node_name(),
            "cluster_name": CLUSTER_NAME,
            "cluster_uuid": "logging-service",
            "version": {
                "number": VERSION,
                "build_flavor": "default",
                "build_type": "logging-service",
                "lucene_version": "9.12.0",
                "minimum_wire_compatibility_version": "7.17.0",
                "minimum_index_compatibility_version": "7.0.0",
            },
            "tagline": "You Know, for Search",
        }),
    )
}

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "logging-aggregator".into())
}

/// `GET /_license`: a basic licence, which is what the aggregator's features amount to.
pub async fn license(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(e) = any_caller(&state, &headers) {
        return refused(e);
    }
    answer(
        StatusCode::OK,
        &json!({"license": {"status": "active", "uid": "logging-service", "type": "basic", "mode": "basic", "issued_to": CLUSTER_NAME, "issuer": "logging-service"}}),
    )
}

/// `GET /_cluster/health`: green while the store is healthy, red otherwise.
pub async fn cluster_health(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(e) = any_caller(&state, &headers) {
        return refused(e);
    }
    let healthy = state
        .indexer_healthy
        .load(std::sync::atomic::Ordering::Relaxed);
    answer(
        StatusCode::OK,
        &json!({
            "cluster_name": CLUSTER_NAME,
            "status": if healthy { "green" } else { "red" },
            "timed_out": false,
            "number_of_nodes": 1,
            "number_of_data_nodes": 1,
            "active_primary_shards": 0,
            "active_shards": 0,
            "relocating_shards": 0,
            "initializing_shards": 0,
            "unassigned_shards": 0,
        }),
    )
}

/// `GET /_nodes/http`: this one node and its HTTP address.
pub async fn nodes_http(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(e) = any_caller(&state, &headers) {
        return refused(e);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    answer(
        StatusCode::OK,
        &json!({
            "_nodes": {"total": 1, "successful": 1, "failed": 0},
            "cluster_name": CLUSTER_NAME,
            "nodes": {"logging-aggregator": {
                "name": node_name(),
                "version": VERSION,
                "roles": ["data", "ingest", "master"],
                "http": {"publish_address": host, "bound_address": [host]},
            }},
        }),
    )
}

/// `PUT /_index_template/{name}`: kept and acknowledged.
pub async fn put_template(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    put_setup(&state, &headers, &state.client_setup.templates, name, &body)
}

/// `GET /_index_template/{name}`.
pub async fn get_template(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    get_setup(
        &state,
        &headers,
        &state.client_setup.templates,
        &name,
        |template| json!({"index_templates": [{"name": name, "index_template": template}]}),
    )
    .unwrap_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "resource_not_found_exception",
            &format!("index template matching [{name}] not found"),
        )
    })
}

/// A kept template or policy in the shape its GET answers, `None` when there is none.
fn get_setup(
    state: &SharedState,
    headers: &HeaderMap,
    store: &Mutex<BTreeMap<String, Value>>,
    name: &str,
    shape: impl FnOnce(&Value) -> Value,
) -> Option<Response> {
    if let Err(e) = any_caller(state, headers) {
        return Some(refused(e));
    }
    let store = store.lock();
    Some(answer(StatusCode::OK, &shape(store.get(name)?)))
}

/// `PUT /_ilm/policy/{name}`: kept and acknowledged.
pub async fn put_policy(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    put_setup(&state, &headers, &state.client_setup.policies, name, &body)
}

/// `GET /_ilm/policy/{name}`.
pub async fn get_policy(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    get_setup(&state, &headers, &state.client_setup.policies, &name, |policy| {
        json!({ name.clone(): {"version": 1, "policy": policy.get("policy").cloned().unwrap_or(Value::Null)} })
    })
    .unwrap_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "resource_not_found_exception",
            &format!("Lifecycle policy not found: {name}"),
        )
    })
}

fn put_setup(
    state: &SharedState,
    headers: &HeaderMap,
    store: &Mutex<BTreeMap<String, Value>>,
    name: String,
    body: &[u8],
) -> Response {
    if let Err(e) = caller_from(state, headers, Permission::Write) {
        return refused(e);
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "parse_exception",
                "the body must be a JSON object",
            );
        }
    };
    let mut store = store.lock();
    // A client's few set-up documents, not a place to keep data.
    if store.len() >= 256 && !store.contains_key(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            "illegal_argument_exception",
            "at most 256 templates or policies are kept",
        );
    }
    store.insert(name, value);
    answer(StatusCode::OK, &json!({"acknowledged": true}))
}

/// `POST /_bulk` on the operator port.
pub async fn bulk(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    if let Err(e) = caller_from(&state, &headers, Permission::Write) {
        return refused(e);
    }
    run_bulk(&state, &headers, None, &body, None).await
}

/// `POST /{index}/_bulk` on the operator port.
pub async fn bulk_index(
    State(state): State<SharedState>,
    Path(index): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    if let Err(e) = caller_from(&state, &headers, Permission::Write) {
        return refused(e);
    }
    run_bulk(&state, &headers, Some(&index), &body, None).await
}

/// `POST /_bulk` on the mTLS port: the certificate names the sender.
pub async fn bulk_mtls(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    run_bulk(&state, &headers, None, &body, peer.name.as_deref()).await
}

/// `POST /{index}/_bulk` on the mTLS port.
pub async fn bulk_index_mtls(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    Path(index): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    run_bulk(&state, &headers, Some(&index), &body, peer.name.as_deref()).await
}

/// One action of a bulk request, with its document made into an entry (or why not).
struct Item {
    op: &'static str,
    index: String,
    /// The `_id` the client gave, or the entry's id.
    id: Option<String>,
    entry: Result<String, String>,
}

async fn run_bulk(
    state: &SharedState,
    headers: &HeaderMap,
    default_index: Option<&str>,
    body: &[u8],
    agent: Option<&str>,
) -> Response {
    let limit = state.config.max_request_bytes;
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let text = if gzip {
        match super::gunzip(body, limit, "request") {
            Ok(out) => std::borrow::Cow::Owned(out),
            Err(e) if e.status == StatusCode::BAD_REQUEST => {
                return error(StatusCode::BAD_REQUEST, "parse_exception", &e.detail);
            }
            Err(e) => return refused(e),
        }
    } else {
        std::borrow::Cow::Borrowed(body)
    };
    let items = match read_actions(&text, default_index, state.config.max_batch_entries) {
        Ok(items) => items,
        Err(e) => return refused(e),
    };
    let started = std::time::Instant::now();
    let raws: Vec<&str> = items
        .iter()
        .filter_map(|item| item.entry.as_deref().ok())
        .collect();
    let outcome = match state.ingest.ingest(&raws, agent).await {
        Ok(outcome) => outcome,
        Err(e) => return refused(e.into()),
    };
    metrics::counter!("logging_aggregator_ingest_entries_total", "protocol" => "elasticsearch")
        .increment((outcome.accepted + outcome.duplicates) as u64);
    // The answer, written out directly: a value tree per item cost as much as the mapping.
    let mut errors = false;
    let mut next = 0;
    let mut out = String::with_capacity(items.len() * 160 + 64);
    for (n, item) in items.into_iter().enumerate() {
        let mut error: Option<(&str, String)> = None;
        let mut id = item.id.clone();
        let mut result = None;
        let status = match &item.entry {
            Err(reason) => {
                error = Some(("mapper_parsing_exception", reason.clone()));
                400
            }
            Ok(_) => {
                let i = next;
                next += 1;
                match (&outcome.ids[i], outcome.already_stored[i]) {
                    (None, _) => {
                        let reason = outcome
                            .rejected
                            .listed
                            .iter()
                            .find(|r| r.index == i)
                            .map_or("the entry was refused".to_string(), |r| r.error.clone());
                        error = Some(("mapper_parsing_exception", reason));
                        400
                    }
                    (Some(stored), true) if item.op == "create" => {
                        let shown = id.get_or_insert_with(|| stored.to_string()).clone();
                        error = Some((
                            "version_conflict_engine_exception",
                            format!("[{shown}]: version conflict, document already exists"),
                        ));
                        409
                    }
                    (Some(stored), stored_before) => {
                        id.get_or_insert_with(|| stored.to_string());
                        result = Some(if stored_before { "noop" } else { "created" });
                        if stored_before { 200 } else { 201 }
                    }
                }
            }
        };
        errors |= status >= 300;
        if n > 0 {
            out.push(',');
        }
        out.push_str("{\"");
        out.push_str(item.op);
        out.push_str("\":{\"_index\":");
        push_json(&mut out, &item.index);
        if let Some(id) = &id {
            out.push_str(",\"_id\":");
            push_json(&mut out, id);
        }
        out.push_str(",\"_version\":1,\"_primary_term\":1,\"_seq_no\":0");
        if let Some(result) = result {
            out.push_str(",\"result\":\"");
            out.push_str(result);
            out.push_str("\",\"_shards\":{\"total\":1,\"successful\":1,\"failed\":0}");
        }
        if let Some((kind, reason)) = error {
            out.push_str(",\"error\":{\"type\":\"");
            out.push_str(kind);
            out.push_str("\",\"reason\":");
            push_json(&mut out, &reason);
            out.push('}');
        }
        out.push_str(",\"status\":");
        out.push_str(&status.to_string());
        out.push_str("}}");
    }
    let body = format!(
        "{{\"took\":{},\"errors\":{errors},\"items\":[{out}]}}",
        started.elapsed().as_millis()
    );
    answer_text(StatusCode::OK, body)
}

/// The NDJSON of a bulk request as items, each action with its document. A malformed action
/// line refuses the whole request (Elasticsearch's behaviour: it cannot tell where the next
/// action starts); a malformed document costs only its item.
fn read_actions(
    text: &[u8],
    default_index: Option<&str>,
    max_items: usize,
) -> Result<Vec<Item>, ApiError> {
    let mut lines = text
        .split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace));
    let mut items = Vec::new();
    let bad = |reason: String| ApiError::new(StatusCode::BAD_REQUEST, reason);
    let now = Timestamp::now();
    while let Some(action_line) = lines.next() {
        if items.len() >= max_items {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request has more than {max_items} actions (MAX_BATCH_ENTRIES); send smaller batches"
                ),
            ));
        }
        let RawPairs(action) = serde_json::from_slice(action_line)
            .map_err(|e| bad(format!("action {}: not a JSON object: {e}", items.len())))?;
        let [(op, meta)] = &action[..] else {
            return Err(bad(format!(
                "action {}: expected one of create, index, update, delete",
                items.len()
            )));
        };
        let op: &'static str = match op.as_ref() {
            "create" => "create",
            "index" => "index",
            "update" | "delete" => {
                return Err(bad(format!(
                    "action {}: {op} is not supported: log entries are append-only (use create or index)",
                    items.len()
                )));
            }
            other => {
                return Err(bad(format!(
                    "action {}: unknown action {other:?}",
                    items.len()
                )));
            }
        };
        let RawPairs(meta) = serde_json::from_str(meta.get()).map_err(|e| {
            bad(format!(
                "action {}: {op}: not a JSON object: {e}",
                items.len()
            ))
        })?;
        let field = |name: &str| {
            meta.iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, raw)| text_of(raw.get()))
        };
        let index = field("_index")
            .or(default_index.map(String::from))
            .ok_or_else(|| {
                bad(format!(
                    "action {}: no _index, and none in the path",
                    items.len()
                ))
            })?;
        let id = field("_id");
        let Some(document) = lines.next() else {
            return Err(bad(format!(
                "action {}: the document line is missing",
                items.len()
            )));
        };
        let entry = document_entry(document, Origin::index(&index), id.as_deref(), now);
        items.push(Item {
            op,
            index,
            id,
            entry,
        });
    }
    Ok(items)
}

/// Where a document came from: its protocol (part of its id), the `context` key that keeps
/// its container's name, and that name (the service when the document names none).
#[derive(Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub protocol: &'static str,
    pub key: &'static str,
    pub name: &'a str,
}

impl Origin<'_> {
    /// An Elasticsearch index.
    fn index(name: &str) -> Origin<'_> {
        Origin {
            protocol: "elasticsearch",
            key: "_index",
            name,
        }
    }
}

/// A document as the JSON of an entry, or why it cannot be one.
///
/// The document is read as keys and raw values: only the fields the entry is made of are
/// parsed (and the objects they nest in); every other value goes into `context` as it came.
/// `now` is the time of a document that carries none.
pub(crate) fn document_entry(
    document: &[u8],
    origin: Origin<'_>,
    id: Option<&str>,
    now: Timestamp,
) -> Result<String, String> {
    let index = origin.name;
    let RawPairs(pairs) = serde_json::from_slice(document)
        .map_err(|e| format!("failed to parse the document: {e}"))?;
    let present = |keys: &[&str]| {
        keys.iter().find_map(|key| {
            pairs
                .iter()
                .position(|(k, v)| k == key && v.get() != "null")
        })
    };
    let mut used = vec![false; pairs.len()];
    let mut take = |i: Option<usize>| {
        i.map(|i| {
            used[i] = true;
            pairs[i].1.get()
        })
    };
    let timestamp = match take(present(&["@timestamp", "timestamp", "time"])) {
        None => now,
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(text)) => Timestamp::parse(&text)
                .map_err(|e| format!("failed to parse field [@timestamp]: {e}"))?,
            Ok(Value::Number(n)) => n
                .as_i64()
                .map(|ms| Timestamp::from_nanos(ms.saturating_mul(1_000_000)))
                .ok_or_else(|| {
                    format!("failed to parse field [@timestamp]: {n} is not epoch milliseconds")
                })?,
            _ => {
                return Err(format!(
                    "failed to parse field [@timestamp]: {raw} is not a date"
                ));
            }
        },
    };
    // The message is text: ECS's `log` object (file, origin) is not one.
    let message_at = ["message", "msg", "log"].iter().find_map(|key| {
        pairs
            .iter()
            .position(|(k, v)| k == key && v.get().starts_with('"'))
    });
    let message = match take(message_at) {
        Some(raw) => serde_json::from_str::<String>(raw).map_err(|e| e.to_string())?,
        None => String::from_utf8_lossy(document).into_owned(),
    };
    let mut level = take(present(&["log.level", "level", "severity"])).and_then(level_of);
    let mut service = take(present(&["service.name"])).and_then(text_of);
    if service.is_none()
        && let Some(i) = present(&["service"]).filter(|i| pairs[*i].1.get().starts_with('"'))
    {
        service = take(Some(i)).and_then(text_of);
    }
    let mut ids: BTreeMap<&str, String> = BTreeMap::new();
    for (field, keys) in ID_KEYS {
        if let Some(value) = take(present(keys)).and_then(text_of) {
            ids.insert(field, value);
        }
    }
    let kubernetes = take(present(&["kubernetes"])).and_then(kubernetes_context);
    // ECS's nesting: `{"log": {"level"}}`, `{"service": {"name"}}`, `{"trace": {"id"}}`…;
    // what is left of such an object stays in the context.
    let mut nested: Vec<(&str, Map<String, Value>)> = Vec::new();
    for (head, inner, role) in NESTED {
        let Some(i) = pairs
            .iter()
            .position(|(k, v)| k == head && v.get().starts_with('{'))
            .filter(|i| !used[*i])
        else {
            continue;
        };
        let Ok(mut object) = serde_json::from_str::<Map<String, Value>>(pairs[i].1.get()) else {
            continue;
        };
        let value = object.remove(inner);
        match (role, value) {
            (Role::Level, Some(value)) if level.is_none() => level = level_of_value(&value),
            (Role::Service, Some(Value::String(name))) if service.is_none() => service = Some(name),
            (Role::Id(field), Some(Value::String(value))) => {
                ids.entry(field).or_insert(value);
            }
            (_, Some(value)) => {
                object.insert(inner.to_string(), value);
            }
            (_, None) => {}
        }
        used[i] = true;
        if !object.is_empty() {
            nested.push((head, object));
        }
    }

    // A raw line (Fluent Bit's `log`) says more: its own JSON or logfmt fields and level.
    let parsed = parse(&message);
    let level = level.or(parsed.level).unwrap_or(LogLevel::Info);
    let service = service
        .or(parsed.service.clone())
        .or_else(|| kubernetes.as_ref().and_then(|k| k.container.clone()))
        .unwrap_or_else(|| index.to_string());
    for (field, value) in [
        ("trace_id", parsed.trace_id),
        ("span_id", parsed.span_id),
        ("request_id", parsed.request_id),
        ("correlation_id", parsed.correlation_id),
        ("user_id", parsed.user_id),
    ] {
        if let Some(value) = value {
            ids.entry(field).or_insert(value);
        }
    }
    let mut identity = Vec::with_capacity(index.len() + document.len() + 24);
    identity.extend_from_slice(origin.protocol.as_bytes());
    identity.push(0);
    identity.extend_from_slice(index.as_bytes());
    match id {
        Some(id) => {
            identity.extend_from_slice(b"\0id\0");
            identity.extend_from_slice(id.as_bytes());
        }
        None => {
            identity.extend_from_slice(b"\0doc\0");
            identity.extend_from_slice(document);
        }
    }
    let entry_id = deterministic_log_id(timestamp, &identity, 0);

    // Written directly: the line's own fields (unless the document has the same key), the
    // document's other fields as they came, the Kubernetes facts and the index.
    let mut out = String::with_capacity(document.len() + 256);
    super::push_entry_head(
        &mut out,
        entry_id,
        timestamp,
        level,
        &service,
        parsed.message.as_deref().unwrap_or(&message),
    );
    for (field, value) in &ids {
        out.push_str(",\"");
        out.push_str(field);
        out.push_str("\":");
        push_json(&mut out, value);
    }
    out.push_str(",\"context\":{");
    let mut first = true;
    let mut key = |out: &mut String, key: &str| {
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        push_json(out, key);
        out.push(':');
    };
    let reserved = |name: &str| name == "kubernetes" || name == origin.key;
    for (name, json) in &parsed.context {
        let in_document = pairs.iter().any(|(k, _)| k == name);
        if !in_document && !reserved(name) {
            key(&mut out, name);
            out.push_str(json);
        }
    }
    for (i, (name, raw)) in pairs.iter().enumerate() {
        if !used[i] && !reserved(name) {
            key(&mut out, name);
            out.push_str(raw.get());
        }
    }
    for (name, object) in nested {
        key(&mut out, name);
        out.push_str(&serde_json::to_string(&object).unwrap_or_default());
    }
    if let Some(kubernetes) = kubernetes.filter(|k| k.json.len() > 2) {
        key(&mut out, "kubernetes");
        out.push_str(&kubernetes.json);
    }
    key(&mut out, origin.key);
    push_json(&mut out, index);
    out.push_str("}}");
    Ok(out)
}

/// The entry's id fields and the document keys they come from.
const ID_KEYS: [(&str, &[&str]); 5] = [
    ("trace_id", &["trace.id", "trace_id", "traceId"]),
    ("span_id", &["span.id", "span_id", "spanId"]),
    ("user_id", &["user.id", "user_id", "userId"]),
    (
        "request_id",
        &["request_id", "requestId", "http.request.id"],
    ),
    ("correlation_id", &["correlation_id", "correlationId"]),
];

/// What a nested field is for.
#[derive(Clone, Copy)]
enum Role {
    Level,
    Service,
    Id(&'static str),
}

/// ECS's nested spellings: (object, field inside it, what it is).
const NESTED: [(&str, &str, Role); 5] = [
    ("log", "level", Role::Level),
    ("service", "name", Role::Service),
    ("trace", "id", Role::Id("trace_id")),
    ("span", "id", Role::Id("span_id")),
    ("user", "id", Role::Id("user_id")),
];

fn text_of(raw: &str) -> Option<String> {
    match serde_json::from_str::<Value>(raw).ok()? {
        Value::String(text) => Some(text),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn level_of(raw: &str) -> Option<LogLevel> {
    level_of_value(&serde_json::from_str(raw).ok()?)
}

fn level_of_value(value: &Value) -> Option<LogLevel> {
    match value {
        Value::String(text) => logging_common::detect::level_name(text),
        Value::Number(n) => n.as_u64().and_then(LogLevel::from_syslog_severity),
        _ => None,
    }
}

/// `context.kubernetes` as JSON text, and the container's name (which names the service
/// when nothing else does).
struct Kubernetes {
    json: String,
    container: Option<String>,
}

/// Filebeat's and Fluent Bit's Kubernetes fields as `context.kubernetes`: `namespace`, `pod`,
/// `container`, `node` from either spelling (Filebeat's `pod: {name, uid}` also gives
/// `pod_uid`), and their other fields (labels, annotations, ids) kept beside them as they came.
fn kubernetes_context(raw: &str) -> Option<Kubernetes> {
    let RawPairs(pairs) = serde_json::from_str(raw).ok()?;
    const NAMES: [(&str, &str, &str); 4] = [
        ("namespace", "namespace_name", "namespace"),
        ("pod", "pod_name", "pod"),
        ("container", "container_name", "container"),
        ("node", "host", "node"),
    ];
    let mut fields: Vec<(String, String)> = Vec::with_capacity(pairs.len() + 2);
    let mut used = vec![false; pairs.len()];
    let mut container = None;
    for (name, flat, nested) in NAMES {
        let found = [flat, nested].into_iter().find_map(|key| {
            pairs
                .iter()
                .position(|(k, v)| k == key && v.get().starts_with('"'))
        });
        if let Some(i) = found {
            used[i] = true;
            fields.push((name.to_string(), pairs[i].1.get().to_string()));
            if name == "container" {
                container = text_of(pairs[i].1.get());
            }
            continue;
        }
        // Filebeat: `pod: {name, uid}` → `pod`, `pod_uid`.
        let Some(i) = pairs
            .iter()
            .position(|(k, v)| k == nested && v.get().starts_with('{'))
        else {
            continue;
        };
        let Ok(RawPairs(inner)) = serde_json::from_str(pairs[i].1.get()) else {
            continue;
        };
        used[i] = true;
        for (field, value) in inner {
            if field == "name" {
                if name == "container" {
                    container = text_of(value.get());
                }
                fields.push((name.to_string(), value.get().to_string()));
            } else {
                fields.push((format!("{name}_{field}"), value.get().to_string()));
            }
        }
    }
    for (i, (key, value)) in pairs.iter().enumerate() {
        if !used[i] && !fields.iter().any(|(k, _)| k == key) {
            fields.push((key.to_string(), value.get().to_string()));
        }
    }
    let mut json = String::with_capacity(raw.len() + 16);
    json.push('{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        push_json(&mut json, key);
        json.push(':');
        json.push_str(value);
    }
    json.push('}');
    Some(Kubernetes { json, container })
}

#[cfg(test)]
mod tests;
