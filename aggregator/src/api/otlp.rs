//! `POST /v1/logs`: OpenTelemetry's OTLP/HTTP logs export (protobuf or JSON, gzip), so
//! OpenTelemetry SDKs and Collectors (`otlphttp` exporter) ship to the aggregator unchanged.
//!
//! Each log record becomes a stored entry, per the OpenTelemetry semantic conventions:
//! - `level` from `severity_text`, else `severity_number` (1-4 trace … 21-24 fatal), else read
//!   from the body as the agent reads a line;
//! - the body: a string is read as the agent reads a container line (JSON, logfmt, plain text);
//!   a map's `message`/`msg` is the message and its other keys go to `context`; other values
//!   are the message as text;
//! - resource `service.name` → `service` (else `unknown_service`, as OpenTelemetry names it),
//!   `service.version` → `service_version`, `deployment.environment(.name)` → `environment`,
//!   `k8s.namespace.name`, `k8s.pod.name`, `k8s.container.name`, `k8s.node.name` →
//!   `context.kubernetes`; `trace_id`/`span_id` as hex; every other resource, scope and record
//!   attribute into `context` under its own (dotted) name, the record's winning;
//! - the time from `time_unix_nano`, else `observed_time_unix_nano`, else the arrival;
//! - its id derived from the resource's, the scope's and the record's encoded content, so an
//!   export sent again after a lost answer stores nothing twice.
//!
//! Answers as the specification says: `200` with an `ExportLogsServiceResponse` in the
//! request's encoding (`partial_success` naming how many records were refused and why, the
//! others stored); `400` with a `google.rpc.Status` for a body that is not an export; `429`
//! or `503` with `Retry-After` under backpressure, which exporters retry.

use std::collections::BTreeMap;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logging_common::id::deterministic_log_id;
use logging_common::parse::{parse, severity_number};
use logging_common::{LogLevel, Timestamp};
use prost::Message as _;
use serde_json::Value;

use super::push_json;
use super::{Body, SharedState, Writer};
use crate::error::ApiError;
use crate::ingest::listener::AgentPeer;

/// The OTLP logs messages (`opentelemetry/proto/{collector/logs,logs,common,resource}/v1`).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_logs: Vec<ResourceLogs>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceResponse {
        #[prost(message, optional, tag = "1")]
        pub partial_success: Option<ExportLogsPartialSuccess>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsPartialSuccess {
        #[prost(int64, tag = "1")]
        pub rejected_log_records: i64,
        #[prost(string, tag = "2")]
        pub error_message: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_logs: Vec<ScopeLogs>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "2")]
        pub dropped_attributes_count: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub log_records: Vec<LogRecord>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(message, repeated, tag = "3")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "4")]
        pub dropped_attributes_count: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogRecord {
        #[prost(fixed64, tag = "1")]
        pub time_unix_nano: u64,
        #[prost(fixed64, tag = "11")]
        pub observed_time_unix_nano: u64,
        #[prost(int32, tag = "2")]
        pub severity_number: i32,
        #[prost(string, tag = "3")]
        pub severity_text: String,
        #[prost(message, optional, tag = "5")]
        pub body: Option<AnyValue>,
        #[prost(message, repeated, tag = "6")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "7")]
        pub dropped_attributes_count: u32,
        #[prost(fixed32, tag = "8")]
        pub flags: u32,
        #[prost(bytes = "vec", tag = "9")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "10")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "12")]
        pub event_name: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6, 7")]
        pub value: Option<Kind>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(bool, tag = "2")]
        BoolValue(bool),
        #[prost(int64, tag = "3")]
        IntValue(i64),
        #[prost(double, tag = "4")]
        DoubleValue(f64),
        #[prost(message, tag = "5")]
        ArrayValue(ArrayValue),
        #[prost(message, tag = "6")]
        KvlistValue(KeyValueList),
        #[prost(bytes = "vec", tag = "7")]
        BytesValue(Vec<u8>),
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ArrayValue {
        #[prost(message, repeated, tag = "1")]
        pub values: Vec<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValueList {
        #[prost(message, repeated, tag = "1")]
        pub values: Vec<KeyValue>,
    }
    /// `google.rpc.Status`, the body of OTLP/HTTP errors.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }
}

use proto::{AnyValue, ExportLogsServiceRequest, KeyValue, Kind};

/// Deepest nesting of a body or attribute value that is kept (deeper is refused with the
/// record); the decoders bound it too (prost: 100 levels; JSON: `MAX_JSON_DEPTH`).
const MAX_VALUE_DEPTH: usize = 32;
const MAX_JSON_DEPTH: usize = 64;

/// How the request was encoded, which the answer follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// `POST /v1/logs` on the operator port (a writer's token).
pub async fn export(
    State(state): State<SharedState>,
    Writer(_): Writer,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    answer(&state, &headers, &body, None).await
}

/// `POST /v1/logs` on the mTLS ingest port.
pub async fn export_mtls(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    answer(&state, &headers, &body, peer.name.as_deref()).await
}

async fn answer(
    state: &SharedState,
    headers: &HeaderMap,
    body: &[u8],
    agent: Option<&str>,
) -> Response {
    let encoding = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
    {
        Some(t) if t.starts_with("application/json") => Encoding::Json,
        _ => Encoding::Protobuf,
    };
    match store(state, headers, body, encoding, agent).await {
        Ok(response) => encode(encoding, StatusCode::OK, &response, None),
        Err(error) => {
            let status = proto::Status {
                code: grpc_code(error.status),
                message: error.detail.clone(),
            };
            encode(encoding, error.status, &status, error.retry_after_secs)
        }
    }
}

/// The gRPC status code OTLP's `Status` carries for an HTTP status.
fn grpc_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 | 413 | 415 => 3, // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        429 | 503 => 14,      // UNAVAILABLE: retry
        _ => 13,              // INTERNAL
    }
}

/// A message in the request's encoding.
fn encode<M: prost::Message + ToJson>(
    encoding: Encoding,
    status: StatusCode,
    message: &M,
    retry_after: Option<u64>,
) -> Response {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => ("application/x-protobuf", message.encode_to_vec()),
        Encoding::Json => (
            "application/json",
            message.to_json().to_string().into_bytes(),
        ),
    };
    let mut response = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// OTLP/JSON's form of an answer.
trait ToJson {
    fn to_json(&self) -> Value;
}

impl ToJson for proto::ExportLogsServiceResponse {
    fn to_json(&self) -> Value {
        match &self.partial_success {
            None => serde_json::json!({}),
            Some(p) => serde_json::json!({"partialSuccess": {
                "rejectedLogRecords": p.rejected_log_records.to_string(),
                "errorMessage": p.error_message,
            }}),
        }
    }
}

impl ToJson for proto::Status {
    fn to_json(&self) -> Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

/// Decodes, maps and stores an export; the answer names the refused records.
async fn store(
    state: &SharedState,
    headers: &HeaderMap,
    body: &[u8],
    encoding: Encoding,
    agent: Option<&str>,
) -> Result<proto::ExportLogsServiceResponse, ApiError> {
    let limit = state.config.max_request_bytes;
    let body = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("identity") => std::borrow::Cow::Borrowed(body),
        Some("gzip") => std::borrow::Cow::Owned(super::gunzip(body, limit, "export")?),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} is not supported; use gzip or none"),
            ));
        }
    };
    let request = match encoding {
        Encoding::Protobuf => ExportLogsServiceRequest::decode(&body[..]).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body: not an OTLP ExportLogsServiceRequest (protobuf): {e}"),
            )
        })?,
        Encoding::Json => from_json(&body)?,
    };
    ingest(state, &request, agent).await
}

/// Stores the records of an export; shared by OTLP/HTTP and OTLP/gRPC.
pub async fn ingest(
    state: &SharedState,
    request: &ExportLogsServiceRequest,
    agent: Option<&str>,
) -> Result<proto::ExportLogsServiceResponse, ApiError> {
    let total: usize = request
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum();
    let max = state.config.max_batch_entries;
    if total > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the export has {total} log records, more than {max} (MAX_BATCH_ENTRIES); send smaller batches"
            ),
        ));
    }
    let now = Timestamp::now();
    let mut raws = Vec::with_capacity(total);
    let mut refused: Vec<String> = Vec::new();
    let mut positions = Vec::with_capacity(total);
    for (r, resource_logs) in request.resource_logs.iter().enumerate() {
        let resource = Shared::resource(resource_logs);
        for (s, scope_logs) in resource_logs.scope_logs.iter().enumerate() {
            let scope = resource.with_scope(scope_logs);
            for (l, record) in scope_logs.log_records.iter().enumerate() {
                match scope.entry(record, now) {
                    Ok(raw) => {
                        raws.push(raw);
                        positions.push((r, s, l));
                    }
                    Err(reason) => refused.push(format!(
                        "resource_logs[{r}].scope_logs[{s}].log_records[{l}]: {reason}"
                    )),
                }
            }
        }
    }
    let mut stored = 0usize;
    if !raws.is_empty() {
        let refs: Vec<&str> = raws.iter().map(String::as_str).collect();
        let outcome = state.ingest.ingest(&refs, agent).await?;
        stored = outcome.accepted + outcome.duplicates;
        for rejection in &outcome.rejected.listed {
            let (r, s, l) = positions[rejection.index];
            refused.push(format!(
                "resource_logs[{r}].scope_logs[{s}].log_records[{l}]: {}",
                rejection.error
            ));
        }
        let unlisted = outcome
            .rejected
            .count
            .saturating_sub(outcome.rejected.listed.len());
        if unlisted > 0 {
            refused.push(format!("and {unlisted} more"));
        }
    }
    metrics::counter!("logging_aggregator_ingest_entries_total", "protocol" => "otlp")
        .increment(stored as u64);
    let rejected = total - stored;
    Ok(proto::ExportLogsServiceResponse {
        partial_success: (rejected > 0).then(|| proto::ExportLogsPartialSuccess {
            rejected_log_records: rejected as i64,
            error_message: refused.join("; "),
        }),
    })
}

/// What the records of one resource and scope share.
struct Shared {
    service: Option<String>,
    service_version: Option<String>,
    environment: Option<String>,
    /// `context.kubernetes`, as JSON text.
    kubernetes: Option<String>,
    /// Other attributes, as JSON text by name (the scope's over the resource's).
    attributes: BTreeMap<String, String>,
    /// The encoded resource (and scope), what an id derives from.
    identity: Vec<u8>,
}

impl Shared {
    fn resource(resource_logs: &proto::ResourceLogs) -> Shared {
        let mut shared = Shared {
            service: None,
            service_version: None,
            environment: None,
            kubernetes: None,
            attributes: BTreeMap::new(),
            identity: b"otlp\0".to_vec(),
        };
        let mut kubernetes: BTreeMap<&'static str, String> = BTreeMap::new();
        if let Some(resource) = &resource_logs.resource {
            resource.encode(&mut shared.identity).ok();
            for kv in &resource.attributes {
                let text = kv.value.as_ref().and_then(text_of);
                match (kv.key.as_str(), text) {
                    ("service.name", Some(t)) => shared.service = Some(t),
                    ("service.version", Some(t)) => shared.service_version = Some(t),
                    ("deployment.environment.name" | "deployment.environment", Some(t)) => {
                        shared.environment = Some(t)
                    }
                    ("k8s.namespace.name", Some(t)) => {
                        kubernetes.insert("namespace", t);
                    }
                    ("k8s.pod.name", Some(t)) => {
                        kubernetes.insert("pod", t);
                    }
                    ("k8s.container.name", Some(t)) => {
                        kubernetes.insert("container", t);
                    }
                    ("k8s.node.name", Some(t)) => {
                        kubernetes.insert("node", t);
                    }
                    _ => {
                        shared
                            .attributes
                            .insert(kv.key.clone(), json_of(kv.value.as_ref(), 0).to_string());
                    }
                }
            }
        }
        if !kubernetes.is_empty() {
            shared.kubernetes = serde_json::to_string(&kubernetes).ok();
        }
        shared
    }

    fn with_scope(&self, scope_logs: &proto::ScopeLogs) -> Shared {
        let mut shared = Shared {
            service: self.service.clone(),
            service_version: self.service_version.clone(),
            environment: self.environment.clone(),
            kubernetes: self.kubernetes.clone(),
            attributes: self.attributes.clone(),
            identity: self.identity.clone(),
        };
        shared.identity.push(0xff);
        if let Some(scope) = &scope_logs.scope {
            scope.encode(&mut shared.identity).ok();
            if !scope.name.is_empty() {
                shared.attributes.insert(
                    "otel.scope.name".into(),
                    Value::String(scope.name.clone()).to_string(),
                );
            }
            if !scope.version.is_empty() {
                shared.attributes.insert(
                    "otel.scope.version".into(),
                    Value::String(scope.version.clone()).to_string(),
                );
            }
            for kv in &scope.attributes {
                shared
                    .attributes
                    .insert(kv.key.clone(), json_of(kv.value.as_ref(), 0).to_string());
            }
        }
        shared
    }

    /// A record as the JSON the ingest path validates, or why it cannot be one. Written out
    /// directly (the shared attributes are JSON text already), as the Loki push does.
    fn entry(&self, record: &proto::LogRecord, now: Timestamp) -> Result<String, String> {
        let nanos = [record.time_unix_nano, record.observed_time_unix_nano]
            .into_iter()
            .find(|n| *n > 0)
            .map_or(Ok(now.as_nanos()), |n| {
                i64::try_from(n).map_err(|_| format!("time_unix_nano {n} is past the year 2262"))
            })?;
        let timestamp = Timestamp::from_nanos(nanos);
        let mut identity = self.identity.clone();
        identity.push(0xff);
        record.encode(&mut identity).ok();
        let id = deterministic_log_id(timestamp, &identity, 0);

        // The body: a text read like a container line, a map read as a JSON object.
        let body = record.body.as_ref();
        if depth_of(body, 0) > MAX_VALUE_DEPTH {
            return Err(format!("body: nested deeper than {MAX_VALUE_DEPTH} levels"));
        }
        let body_text = match body.and_then(|b| b.value.as_ref()) {
            None => String::new(),
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::KvlistValue(_)) => json_of(body, 0).to_string(),
            Some(_) => body.and_then(text_of).unwrap_or_default(),
        };
        let parsed = parse(&body_text);
        let level = Some(record.severity_text.trim())
            .filter(|t| !t.is_empty())
            .and_then(logging_common::detect::level_name)
            .or_else(|| severity_number(f64::from(record.severity_number)))
            .or(parsed.level)
            .unwrap_or(LogLevel::Info);
        let service = self
            .service
            .as_deref()
            .or(parsed.service.as_deref())
            .unwrap_or("unknown_service");

        let mut out = String::with_capacity(body_text.len() * 2 + 256);
        super::push_entry_head(
            &mut out,
            id,
            timestamp,
            level,
            service,
            parsed.message.as_deref().unwrap_or(&body_text),
        );
        let (trace_id, span_id) = (hex(&record.trace_id), hex(&record.span_id));
        for (name, value) in [
            (
                "trace_id",
                trace_id.as_deref().or(parsed.trace_id.as_deref()),
            ),
            ("span_id", span_id.as_deref().or(parsed.span_id.as_deref())),
            ("request_id", parsed.request_id.as_deref()),
            ("correlation_id", parsed.correlation_id.as_deref()),
            ("user_id", parsed.user_id.as_deref()),
            ("environment", self.environment.as_deref()),
            ("service_version", self.service_version.as_deref()),
        ] {
            if let Some(value) = value {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_json(&mut out, value);
            }
        }
        // The context: the body's own fields, then resource and scope attributes, then the
        // record's (each later one wins), as JSON text by key.
        let mut context: BTreeMap<&str, std::borrow::Cow<'_, str>> = BTreeMap::new();
        for (key, json) in &parsed.context {
            context.insert(key, json.as_str().into());
        }
        for (key, json) in &self.attributes {
            context.insert(key, json.as_str().into());
        }
        for kv in &record.attributes {
            if depth_of(kv.value.as_ref(), 0) > MAX_VALUE_DEPTH {
                return Err(format!(
                    "attribute {:?}: nested deeper than {MAX_VALUE_DEPTH} levels",
                    kv.key
                ));
            }
            context.insert(&kv.key, json_of(kv.value.as_ref(), 0).to_string().into());
        }
        let event_name;
        if !record.event_name.is_empty() {
            event_name = Value::String(record.event_name.clone()).to_string();
            context.insert("event.name", event_name.as_str().into());
        }
        if let Some(kubernetes) = &self.kubernetes {
            context.insert("kubernetes", kubernetes.as_str().into());
        }
        if !context.is_empty() {
            out.push_str(",\"context\":{");
            for (i, (key, json)) in context.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json(&mut out, key);
                out.push(':');
                out.push_str(json);
            }
            out.push('}');
        }
        out.push('}');
        Ok(out)
    }
}

/// Lower-case hex of an id, unless it is empty or all zeros (unset).
fn hex(bytes: &[u8]) -> Option<String> {
    if bytes.iter().all(|b| *b == 0) {
        return None;
    }
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A scalar value as text (`None` for arrays and maps).
fn text_of(value: &AnyValue) -> Option<String> {
    Some(match value.value.as_ref()? {
        Kind::StringValue(s) => s.clone(),
        Kind::BoolValue(b) => b.to_string(),
        Kind::IntValue(i) => i.to_string(),
        Kind::DoubleValue(d) => d.to_string(),
        Kind::BytesValue(b) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(b)
        }
        Kind::ArrayValue(_) | Kind::KvlistValue(_) => return None,
    })
}

/// How deep a value nests.
fn depth_of(value: Option<&AnyValue>, depth: usize) -> usize {
    if depth > MAX_VALUE_DEPTH {
        return depth;
    }
    match value.and_then(|v| v.value.as_ref()) {
        Some(Kind::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| depth_of(Some(v), depth + 1))
            .max()
            .unwrap_or(depth + 1),
        Some(Kind::KvlistValue(l)) => l
            .values
            .iter()
            .map(|kv| depth_of(kv.value.as_ref(), depth + 1))
            .max()
            .unwrap_or(depth + 1),
        _ => depth,
    }
}

/// A value as JSON: maps as objects, arrays as arrays, bytes as base64.
fn json_of(value: Option<&AnyValue>, depth: usize) -> Value {
    let Some(kind) = value.and_then(|v| v.value.as_ref()) else {
        return Value::Null;
    };
    if depth > MAX_VALUE_DEPTH {
        return Value::Null;
    }
    match kind {
        Kind::StringValue(s) => Value::String(s.clone()),
        Kind::BoolValue(b) => Value::Bool(*b),
        Kind::IntValue(i) => Value::from(*i),
        Kind::DoubleValue(d) => serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number),
        Kind::BytesValue(_) => value.and_then(text_of).map_or(Value::Null, Value::String),
        Kind::ArrayValue(a) => Value::Array(
            a.values
                .iter()
                .map(|v| json_of(Some(v), depth + 1))
                .collect(),
        ),
        Kind::KvlistValue(l) => Value::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), json_of(kv.value.as_ref(), depth + 1)))
                .collect(),
        ),
    }
}

/// OTLP/JSON into the protobuf messages: camelCase names (snake_case accepted too), 64-bit
/// integers as strings or numbers, ids in hex, enums as numbers.
fn from_json(body: &[u8]) -> Result<ExportLogsServiceRequest, ApiError> {
    let bad = |reason: String| ApiError::new(StatusCode::BAD_REQUEST, format!("body: {reason}"));
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: Value = serde::Deserialize::deserialize(&mut deserializer)
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    if json_depth(&value, 0) > MAX_JSON_DEPTH {
        return Err(bad(format!("nested deeper than {MAX_JSON_DEPTH} levels")));
    }
    let field = |object: &Value, camel: &str, snake: &str| -> Option<Value> {
        object.get(camel).or_else(|| object.get(snake)).cloned()
    };
    let list = |object: &Value, camel: &str, snake: &str| -> Vec<Value> {
        match field(object, camel, snake) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        }
    };
    let mut request = ExportLogsServiceRequest::default();
    for (r, resource_logs) in list(&value, "resourceLogs", "resource_logs")
        .iter()
        .enumerate()
    {
        let at = |what: &str| format!("resourceLogs[{r}]{what}");
        let resource = field(resource_logs, "resource", "resource").map(|res| proto::Resource {
            attributes: attributes_json(&res),
            dropped_attributes_count: 0,
        });
        let mut scope_logs = Vec::new();
        for (s, scope_json) in list(resource_logs, "scopeLogs", "scope_logs")
            .iter()
            .enumerate()
        {
            let scope =
                field(scope_json, "scope", "scope").map(|scope| proto::InstrumentationScope {
                    name: str_of(scope.get("name")),
                    version: str_of(scope.get("version")),
                    attributes: attributes_json(&scope),
                    dropped_attributes_count: 0,
                });
            let mut records = Vec::new();
            for (l, record) in list(scope_json, "logRecords", "log_records")
                .iter()
                .enumerate()
            {
                let here = |what: &str| at(&format!(".scopeLogs[{s}].logRecords[{l}].{what}"));
                let number = |camel: &str, snake: &str| -> Result<u64, ApiError> {
                    match field(record, camel, snake) {
                        None | Some(Value::Null) => Ok(0),
                        Some(Value::String(t)) => t.parse().map_err(|_| {
                            bad(format!("{}: {t:?} is not a whole number", here(camel)))
                        }),
                        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                            bad(format!("{}: {n} is not a whole number", here(camel)))
                        }),
                        Some(other) => Err(bad(format!(
                            "{}: {other} is not a whole number",
                            here(camel)
                        ))),
                    }
                };
                let id = |camel: &str, snake: &str| -> Result<Vec<u8>, ApiError> {
                    let text = str_of(field(record, camel, snake).as_ref());
                    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(bad(format!("{}: {text:?} is not hex", here(camel))));
                    }
                    Ok((0..text.len())
                        .step_by(2)
                        .filter_map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
                        .collect())
                };
                records.push(proto::LogRecord {
                    time_unix_nano: number("timeUnixNano", "time_unix_nano")?,
                    observed_time_unix_nano: number(
                        "observedTimeUnixNano",
                        "observed_time_unix_nano",
                    )?,
                    severity_number: i32::try_from(number("severityNumber", "severity_number")?)
                        .map_err(|_| bad(here("severityNumber: out of range")))?,
                    severity_text: str_of(field(record, "severityText", "severity_text").as_ref()),
                    body: field(record, "body", "body").map(|b| any_json(&b, 0)),
                    attributes: attributes_json(record),
                    dropped_attributes_count: 0,
                    flags: 0,
                    trace_id: id("traceId", "trace_id")?,
                    span_id: id("spanId", "span_id")?,
                    event_name: str_of(field(record, "eventName", "event_name").as_ref()),
                });
            }
            scope_logs.push(proto::ScopeLogs {
                scope,
                log_records: records,
                schema_url: String::new(),
            });
        }
        request.resource_logs.push(proto::ResourceLogs {
            resource,
            scope_logs,
            schema_url: String::new(),
        });
    }
    Ok(request)
}

fn json_depth(value: &Value, depth: usize) -> usize {
    if depth > MAX_JSON_DEPTH {
        return depth;
    }
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| json_depth(v, depth + 1))
            .max()
            .unwrap_or(depth),
        Value::Object(map) => map
            .values()
            .map(|v| json_depth(v, depth + 1))
            .max()
            .unwrap_or(depth),
        _ => depth,
    }
}

fn str_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn attributes_json(object: &Value) -> Vec<KeyValue> {
    match object.get("attributes") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|kv| KeyValue {
                key: str_of(kv.get("key")),
                value: kv.get("value").map(|v| any_json(v, 0)),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An OTLP/JSON `AnyValue` (`{"stringValue": …}`, `{"intValue": "5"}`, …).
fn any_json(value: &Value, depth: usize) -> AnyValue {
    let get = |camel: &str, snake: &str| value.get(camel).or_else(|| value.get(snake));
    let kind = if depth > MAX_JSON_DEPTH {
        None
    } else if let Some(s) = get("stringValue", "string_value") {
        Some(Kind::StringValue(
            s.as_str().unwrap_or_default().to_string(),
        ))
    } else if let Some(b) = get("boolValue", "bool_value") {
        Some(Kind::BoolValue(b.as_bool().unwrap_or_default()))
    } else if let Some(i) = get("intValue", "int_value") {
        let n = match i {
            Value::String(t) => t.parse().unwrap_or_default(),
            other => other.as_i64().unwrap_or_default(),
        };
        Some(Kind::IntValue(n))
    } else if let Some(d) = get("doubleValue", "double_value") {
        Some(Kind::DoubleValue(d.as_f64().unwrap_or_default()))
    } else if let Some(a) = get("arrayValue", "array_value") {
        Some(Kind::ArrayValue(proto::ArrayValue {
            values: match a.get("values") {
                Some(Value::Array(items)) => items.iter().map(|v| any_json(v, depth + 1)).collect(),
                _ => Vec::new(),
            },
        }))
    } else if let Some(l) = get("kvlistValue", "kvlist_value") {
        Some(Kind::KvlistValue(proto::KeyValueList {
            values: attributes_json(
                &serde_json::json!({"attributes": l.get("values").cloned().unwrap_or(Value::Null)}),
            ),
        }))
    } else {
        get("bytesValue", "bytes_value").map(|b| {
            use base64::Engine as _;
            Kind::BytesValue(
                base64::engine::general_purpose::STANDARD
                    .decode(b.as_str().unwrap_or_default())
                    .unwrap_or_default(),
            )
        })
    };
    AnyValue { value: kind }
}

/// The gRPC method OTLP exporters call.
pub const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// The OTLP/gRPC listener's routes (`OTLP_GRPC_PORT`): the logs service's one method. (Not
/// the operator API: the OpenAPI document does not describe it.)
pub fn grpc_router(state: SharedState) -> axum::Router {
    let max_body = state.config.max_request_bytes;
    axum::Router::new()
        .route(GRPC_EXPORT, axum::routing::post(export_grpc))
        .layer(axum::middleware::from_fn(super::trace_requests))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// `LogsService/Export` over gRPC (`OTLP_GRPC_PORT`): the writer's token in the
/// `authorization` metadata; answers with a length-prefixed `ExportLogsServiceResponse` and
/// `grpc-status` 0, or a trailers-only error (`UNAVAILABLE` under backpressure, which
/// exporters retry; `INVALID_ARGUMENT`, `UNAUTHENTICATED`, `PERMISSION_DENIED`).
pub async fn export_grpc(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    if let Err(error) = super::caller_from(&state, &headers, crate::auth::Permission::Write) {
        return grpc_error(grpc_code(error.status), &error.detail);
    }
    let message = match grpc_message(&headers, &body, state.config.max_request_bytes) {
        Ok(message) => message,
        Err((code, reason)) => return grpc_error(code, &reason),
    };
    let request = match ExportLogsServiceRequest::decode(&message[..]) {
        Ok(request) => request,
        Err(e) => {
            return grpc_error(3, &format!("not an OTLP ExportLogsServiceRequest: {e}"));
        }
    };
    match ingest(&state, &request, None).await {
        Ok(response) => {
            let encoded = response.encode_to_vec();
            let mut framed = Vec::with_capacity(encoded.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            framed.extend_from_slice(&encoded);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let body = GrpcBody {
                data: Some(bytes::Bytes::from(framed)),
                trailers: Some(trailers),
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/grpc")],
                axum::body::Body::new(body),
            )
                .into_response()
        }
        Err(error) => grpc_error(grpc_code(error.status), &error.detail),
    }
}

/// The one message of a unary call: the 5-byte prefix (compressed flag, length) read, a
/// gzip message (`grpc-encoding: gzip`) inflated within `limit`.
fn grpc_message(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Vec<u8>, (i32, String)> {
    let Some((prefix, rest)) = body.split_first_chunk::<5>() else {
        return Err((
            3,
            "the request is not a gRPC message (no 5-byte prefix)".into(),
        ));
    };
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if rest.len() != length {
        return Err((
            3,
            format!(
                "the gRPC message says {length} bytes and {} came (one message per call)",
                rest.len()
            ),
        ));
    }
    match prefix[0] {
        0 => Ok(rest.to_vec()),
        1 => match headers.get("grpc-encoding").and_then(|v| v.to_str().ok()) {
            Some("gzip") => super::gunzip(rest, limit, "export").map_err(|e| (8, e.detail)),
            other => Err((
                12,
                format!("grpc-encoding {other:?} is not supported; use gzip or none"),
            )),
        },
        flag => Err((3, format!("gRPC compressed flag {flag} is not 0 or 1"))),
    }
}

/// A trailers-only gRPC error.
fn grpc_error(code: i32, message: &str) -> Response {
    let encoded: String = message
        .bytes()
        .flat_map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                vec![b as char]
            } else {
                format!("%{b:02X}").chars().collect()
            }
        })
        .collect();
    let mut response =
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/grpc")]).into_response();
    let headers = response.headers_mut();
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
    response
}

/// A response body of one data frame, then trailers.
struct GrpcBody {
    data: Option<bytes::Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for GrpcBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
