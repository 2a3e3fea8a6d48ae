//! `POST /loki/api/v1/push`: Loki's push API, so Promtail, Alloy, Fluent Bit and every client
//! with a Loki output ship to the aggregator unchanged.
//!
//! Bodies as Loki takes them: snappy-compressed protobuf `logproto.PushRequest` (with
//! structured metadata), or JSON (`{"streams":[{"stream":{…},"values":[[ts, line(, meta)]]}]}`,
//! gzip allowed). Each entry becomes a stored entry:
//! - `service` from the first label of [`SERVICE_LABELS`] present (else the line's own
//!   `service`, else `unknown_service`, as Loki names it);
//! - `level` from the label or metadata `level`, `detected_level` or `severity`, else from the
//!   line, read as the agent reads a container line (JSON, logfmt, the level detector);
//! - `namespace`, `pod`, `container`, `node` (or `host`) into `context.kubernetes`; the ids
//!   (`trace_id`, …) into their fields; every other label and metadata pair into `context`;
//!   the tenant (`X-Scope-OrgID`) into `context.tenant`;
//! - its id derived from (tenant, stream labels, timestamp, line), so a batch pushed again
//!   after a lost answer stores nothing twice — Loki's own rule for identical entries.
//!
//! Answers as Loki does: `204` once every stored entry is durable; `400` in plain text naming
//! the stream and entry of each refusal (the others are stored); `413`; `429` with
//! `Retry-After` while the store catches up.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logging_common::id::deterministic_log_id;
use logging_common::parse::parse;
use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::push_json;
use super::{Body, SharedState, Writer};
use crate::error::ApiError;
use crate::ingest::listener::AgentPeer;
use crate::sinks::loki::proto;

/// Labels that name the service, the first present winning.
pub const SERVICE_LABELS: [&str; 6] = [
    "service_name",
    "service",
    "app",
    "app_kubernetes_io_name",
    "job",
    "container",
];
/// Labels (or metadata) that name the level, the first present winning.
const LEVEL_LABELS: [&str; 3] = ["level", "detected_level", "severity"];
/// Labels that go to `context.kubernetes`, with the key they get there.
const KUBERNETES_LABELS: [(&str, &str); 5] = [
    ("namespace", "namespace"),
    ("pod", "pod"),
    ("container", "container"),
    ("node", "node"),
    ("host", "node"),
];
/// Labels (or metadata) that are the entry's own id fields.
const ID_LABELS: [&str; 5] = [
    "trace_id",
    "span_id",
    "request_id",
    "correlation_id",
    "user_id",
];

/// One stream of a push, in either encoding.
struct PushStream {
    /// The labels as the client sent them, for error messages.
    shown: String,
    labels: Vec<(String, String)>,
    entries: Vec<PushEntry>,
}

struct PushEntry {
    nanos: i64,
    line: String,
    metadata: Vec<(String, String)>,
}

/// `POST /loki/api/v1/push` on the operator port: a writer's token, as a bearer token or as
/// the password of basic auth.
pub async fn push(
    State(state): State<SharedState>,
    Writer(_): Writer,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    store(&state, &headers, &body, None)
        .await
        .unwrap_or_else(plain_error)
}

/// `POST /loki/api/v1/push` on the mTLS ingest port: the client certificate names the sender.
pub async fn push_mtls(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    store(&state, &headers, &body, peer.name.as_deref())
        .await
        .unwrap_or_else(plain_error)
}

/// Loki answers errors in plain text.
fn plain_error(error: ApiError) -> Response {
    let mut response = (error.status, error.detail).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(secs) = error.retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

async fn store(
    state: &SharedState,
    headers: &HeaderMap,
    body: &[u8],
    agent: Option<&str>,
) -> Result<Response, ApiError> {
    let limit = state.config.max_request_bytes;
    let streams = decode(headers, body, limit)?;
    let total: usize = streams.iter().map(|s| s.entries.len()).sum();
    let max = state.config.max_batch_entries;
    if total > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the push has {total} entries, more than {max} (MAX_BATCH_ENTRIES); send smaller batches"
            ),
        ));
    }
    let tenant = headers
        .get("x-scope-orgid")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let mut raws = Vec::with_capacity(total);
    let mut whose = Vec::with_capacity(total);
    for (s, stream) in streams.iter().enumerate() {
        let shared = StreamFacts::new(&stream.labels, tenant);
        for (e, entry) in stream.entries.iter().enumerate() {
            raws.push(shared.entry(entry));
            whose.push((s, e));
        }
    }
    let refs: Vec<&str> = raws.iter().map(String::as_str).collect();
    let outcome = state.ingest.ingest(&refs, agent).await?;
    metrics::counter!("logging_aggregator_ingest_entries_total", "protocol" => "loki")
        .increment((outcome.accepted + outcome.duplicates) as u64);
    if outcome.rejected.count == 0 {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut detail = format!(
        "{} of {total} entries were refused (the others are stored):",
        outcome.rejected.count
    );
    for rejection in &outcome.rejected.listed {
        let (s, e) = whose[rejection.index];
        let _ = write!(
            detail,
            "\nstream {} entry {e}: {}",
            streams[s].shown, rejection.error
        );
    }
    Err(ApiError::new(StatusCode::BAD_REQUEST, detail))
}

/// What every entry of a stream shares: its service, level, Kubernetes metadata, other
/// labels, and the identity its entries' ids derive from.
struct StreamFacts<'a> {
    labels: &'a [(String, String)],
    tenant: Option<&'a str>,
    /// `tenant \0 name=value \xff …` over the labels sorted by name.
    identity: Vec<u8>,
}

impl<'a> StreamFacts<'a> {
    fn new(labels: &'a [(String, String)], tenant: Option<&'a str>) -> StreamFacts<'a> {
        let sorted: BTreeMap<&str, &str> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut identity = Vec::with_capacity(128);
        identity.extend_from_slice(b"loki\0");
        identity.extend_from_slice(tenant.unwrap_or("").as_bytes());
        identity.push(0);
        for (name, value) in sorted {
            identity.extend_from_slice(name.as_bytes());
            identity.push(b'=');
            identity.extend_from_slice(value.as_bytes());
            identity.push(0xff);
        }
        StreamFacts {
            labels,
            tenant,
            identity,
        }
    }

    fn label(&self, name: &str) -> Option<&'a str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The entry as the JSON the ingest path validates.
    fn entry(&self, entry: &PushEntry) -> String {
        let timestamp = Timestamp::from_nanos(entry.nanos);
        let mut identity = self.identity.clone();
        identity.extend_from_slice(entry.line.as_bytes());
        let id = deterministic_log_id(timestamp, &identity, entry.nanos as u64);
        let parsed = parse(&entry.line);
        let metadata = |name: &str| {
            entry
                .metadata
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let service = SERVICE_LABELS
            .iter()
            .find_map(|name| self.label(name))
            .or(parsed.service.as_deref())
            .unwrap_or("unknown_service");
        let level = LEVEL_LABELS
            .iter()
            .find_map(|name| self.label(name).or_else(|| metadata(name)))
            .and_then(logging_common::detect::level_name)
            .or(parsed.level)
            .unwrap_or(LogLevel::Info);

        let mut out = String::with_capacity(entry.line.len() + 256);
        super::push_entry_head(
            &mut out,
            id,
            timestamp,
            level,
            service,
            parsed.message.as_deref().unwrap_or(&entry.line),
        );
        let mut ids: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, value) in [
            ("trace_id", &parsed.trace_id),
            ("span_id", &parsed.span_id),
            ("request_id", &parsed.request_id),
            ("correlation_id", &parsed.correlation_id),
            ("user_id", &parsed.user_id),
        ] {
            if let Some(value) = value {
                ids.insert(name, value);
            }
        }

        // The context: the line's own fields, then labels and metadata (which win).
        let mut context: BTreeMap<&str, Field<'_>> = BTreeMap::new();
        for (key, json) in &parsed.context {
            context.insert(key, Field::Json(json));
        }
        let mut kubernetes: BTreeMap<&str, &str> = BTreeMap::new();
        let pairs = self
            .labels
            .iter()
            .chain(&entry.metadata)
            .filter(|(_, v)| !v.is_empty());
        for (name, value) in pairs {
            let name = name.as_str();
            if let Some((_, key)) = KUBERNETES_LABELS.iter().find(|(label, _)| *label == name) {
                kubernetes.entry(key).or_insert(value);
            } else if ID_LABELS.contains(&name) {
                ids.insert(name, value);
            } else if LEVEL_LABELS.contains(&name)
                || (SERVICE_LABELS.contains(&name) && value == service)
            {
                // Already the entry's level or service.
            } else {
                context.insert(name, Field::Text(value));
            }
        }
        if let Some(tenant) = self.tenant {
            context.insert("tenant", Field::Text(tenant));
        }
        for (name, value) in &ids {
            out.push(',');
            push_json(&mut out, name);
            out.push(':');
            push_json(&mut out, value);
        }
        out.push_str(",\"context\":{");
        let mut first = true;
        let mut separate = |out: &mut String, key: &str| {
            if !std::mem::take(&mut first) {
                out.push(',');
            }
            push_json(out, key);
            out.push(':');
        };
        for (key, field) in &context {
            separate(&mut out, key);
            match field {
                Field::Json(json) => out.push_str(json),
                Field::Text(text) => push_json(&mut out, text),
            }
        }
        if !kubernetes.is_empty() {
            separate(&mut out, "kubernetes");
            out.push_str(&serde_json::to_string(&kubernetes).unwrap_or_default());
        }
        out.push_str("}}");
        out
    }
}

enum Field<'a> {
    /// JSON text, as the line parser keeps values.
    Json(&'a str),
    Text(&'a str),
}

/// The streams of a push body: protobuf (snappy) or JSON (optionally gzip).
fn decode(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Vec<PushStream>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if content_type.starts_with("application/json") {
        let json = match encoding.as_str() {
            "" | "identity" => std::borrow::Cow::Borrowed(body),
            "gzip" => std::borrow::Cow::Owned(super::gunzip(body, limit, "push")?),
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Encoding {other:?} is not supported for JSON; use gzip or none"
                    ),
                ));
            }
        };
        return decode_json(&json);
    }
    if content_type.is_empty() || content_type.starts_with("application/x-protobuf") {
        let bytes = unsnap(body, limit)?;
        return decode_protobuf(&bytes);
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "Content-Type {content_type:?} is not supported; use application/x-protobuf (snappy) or application/json"
        ),
    ))
}

fn too_large() -> ApiError {
    super::decompressed_too_large("push")
}

fn unsnap(body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let invalid = |e: snap::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body: not valid snappy: {e}"),
        )
    };
    // The block format states its length first: refuse a bomb before decoding it.
    let length = snap::raw::decompress_len(body).map_err(invalid)?;
    if length > limit {
        return Err(too_large());
    }
    snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(invalid)
}

fn decode_protobuf(bytes: &[u8]) -> Result<Vec<PushStream>, ApiError> {
    let request: proto::PushRequest = prost::Message::decode(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body: not a valid PushRequest: {e}"),
        )
    })?;
    request
        .streams
        .into_iter()
        .enumerate()
        .map(|(s, stream)| {
            let labels = parse_labels(&stream.labels).map_err(|reason| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("stream {s}: labels {:?}: {reason}", stream.labels),
                )
            })?;
            let entries = stream
                .entries
                .into_iter()
                .map(|entry| {
                    let nanos = entry
                        .timestamp
                        .map(|t| {
                            t.seconds
                                .saturating_mul(1_000_000_000)
                                .saturating_add(i64::from(t.nanos))
                        })
                        .unwrap_or(0);
                    PushEntry {
                        nanos,
                        line: entry.line,
                        metadata: entry
                            .structured_metadata
                            .into_iter()
                            .map(|p| (p.name, p.value))
                            .collect(),
                    }
                })
                .collect();
            Ok(PushStream {
                shown: stream.labels,
                labels,
                entries,
            })
        })
        .collect()
}

/// `{name="value", other="with \"quotes\""}`: Prometheus' label syntax.
fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or("expected {name=\"value\", …}")?;
    let mut labels = Vec::new();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("invalid label name at {rest:?}"));
        }
        rest = rest[name_end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or_else(|| format!("expected = after {name}"))?
            .trim_start();
        rest = rest
            .strip_prefix('"')
            .ok_or_else(|| format!("expected a quoted value for {name}"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value of {name}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value of {name}")),
            }
        };
        labels.push((name.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.is_empty() {
            return Err(format!("expected , or }} after the value of {name}"));
        }
    }
    Ok(labels)
}

/// `{"streams":[{"stream":{…},"values":[["<ns>","<line>"(,{metadata})]]}]}`.
#[derive(Deserialize)]
struct JsonPush {
    streams: Vec<JsonStream>,
}

#[derive(Deserialize)]
struct JsonStream {
    #[serde(default)]
    stream: BTreeMap<String, String>,
    values: Vec<JsonValue>,
}

/// One `[ts, line]` or `[ts, line, {metadata}]`.
struct JsonValue(PushEntry);

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Row;
        impl<'de> Visitor<'de> for Row {
            type Value = JsonValue;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "[\"<unix nanoseconds>\", \"<line>\"] or with a third {metadata} element",
                )
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonValue, A::Error> {
                let ts: Nanos = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let line: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let metadata: Option<BTreeMap<String, String>> = seq.next_element()?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(4, &self));
                }
                Ok(JsonValue(PushEntry {
                    nanos: ts.0,
                    line,
                    metadata: metadata.unwrap_or_default().into_iter().collect(),
                }))
            }
        }
        deserializer.deserialize_seq(Row)
    }
}

/// A timestamp in nanoseconds: a string of digits, as Loki documents it, or a number.
struct Nanos(i64);

impl<'de> Deserialize<'de> for Nanos {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Nanos;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a timestamp in unix nanoseconds")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Nanos, E> {
                v.parse()
                    .map(Nanos)
                    .map_err(|_| E::custom(format!("timestamp {v:?} is not unix nanoseconds")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Nanos, E> {
                Ok(Nanos(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Nanos, E> {
                i64::try_from(v)
                    .map(Nanos)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn decode_json(body: &[u8]) -> Result<Vec<PushStream>, ApiError> {
    let push: JsonPush = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body: not a valid push request: {e}"),
        )
    })?;
    Ok(push
        .streams
        .into_iter()
        .map(|stream| {
            let labels: Vec<(String, String)> = stream.stream.into_iter().collect();
            let mut shown = String::from("{");
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    shown.push_str(", ");
                }
                let _ = write!(shown, "{name}={value:?}");
            }
            shown.push('}');
            PushStream {
                shown,
                labels,
                entries: stream.values.into_iter().map(|v| v.0).collect(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests;
