//! The Loki sink: Loki's push API (`POST /loki/api/v1/push`) in the format Promtail and
//! Alloy send — snappy-compressed protobuf (`logproto.PushRequest`) — or JSON.
//!
//! - Labels are the low-cardinality set: `service`, `level`, and from
//!   `context.kubernetes` `namespace`, `container`, `node`, plus the configured static labels
//!   (`LOKI_LABELS`, e.g. `cluster=prod`). Empty values are left out.
//! - The entry id, `trace_id`, `span_id`, `request_id`, `user_id` and the pod go to structured
//!   metadata (queryable without creating streams).
//! - The line is JSON: `{"message":…,"context":{…},"tags":[…]}` (`context` and `tags` only
//!   when present), so LogQL's `| json` reads every field. A line over Loki's default
//!   `max_line_size` (256 KiB) has its message cut to fit and `"truncated":true` added.
//! - Entries are sorted by time within each stream. Loki drops an entry identical to one it
//!   holds (same stream, time and line), so a batch sent twice after a lost answer stores once.
//! - 429, 5xx and network errors are retried; 400 (too old, out of order, invalid) is
//!   permanent and goes to the dead-letter file, one entry at a time (see `sinks::deliver`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Outcome, Sink};

/// Loki's default `max_line_size`.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// Loki's default `max_label_names_per_series`.
pub const MAX_LABELS: usize = 15;
/// Labels the sink sets from each entry.
pub const ENTRY_LABELS: [&str; 5] = ["service", "level", "namespace", "container", "node"];

/// `logproto.PushRequest` and what it holds (Loki's `pkg/push/push.proto`).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<StreamAdapter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamAdapter {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<EntryAdapter>,
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EntryAdapter {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<ProtoTimestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPairAdapter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPairAdapter {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProtoTimestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// How the push body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Protobuf,
    Json,
}

/// The sink's settings, checked at start-up.
#[derive(Clone, Debug)]
pub struct LokiSettings {
    /// `…/loki/api/v1/push`.
    pub push_url: reqwest::Url,
    pub tenant: Option<String>,
    pub static_labels: Vec<(String, String)>,
    pub format: Format,
}

impl LokiSettings {
    /// From `LOKI_URL` (the base URL), `LOKI_TENANT_ID`, `LOKI_LABELS` and `LOKI_FORMAT`;
    /// the error names the setting.
    pub fn new(
        url: &str,
        tenant: Option<&str>,
        labels: &[String],
        format: &str,
    ) -> Result<LokiSettings, (&'static str, String)> {
        let base = reqwest::Url::parse(url).map_err(|e| ("LOKI_URL", e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(("LOKI_URL", "expected an http:// or https:// URL".into()));
        }
        let push_url = reqwest::Url::parse(&format!(
            "{}/loki/api/v1/push",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| ("LOKI_URL", e.to_string()))?;
        let mut static_labels = Vec::new();
        for pair in labels {
            let (name, value) = pair
                .split_once('=')
                .ok_or(("LOKI_LABELS", format!("{pair:?} is not name=value")))?;
            let (name, value) = (name.trim(), value.trim());
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with("__");
            if !valid {
                return Err((
                    "LOKI_LABELS",
                    format!("{name:?} is not a Loki label name ([a-zA-Z_][a-zA-Z0-9_]*, not __…)"),
                ));
            }
            if ENTRY_LABELS.contains(&name) {
                return Err((
                    "LOKI_LABELS",
                    format!("{name:?} is set from each entry; choose another name"),
                ));
            }
            if value.is_empty() {
                return Err(("LOKI_LABELS", format!("{name:?} has an empty value")));
            }
            static_labels.push((name.to_string(), value.to_string()));
        }
        if static_labels.len() + ENTRY_LABELS.len() > MAX_LABELS {
            return Err((
                "LOKI_LABELS",
                format!(
                    "Loki accepts {MAX_LABELS} labels per stream and the sink sets {}; at most {} static labels",
                    ENTRY_LABELS.len(),
                    MAX_LABELS - ENTRY_LABELS.len()
                ),
            ));
        }
        let format = match format {
            "protobuf" => Format::Protobuf,
            "json" => Format::Json,
            other => {
                return Err((
                    "LOKI_FORMAT",
                    format!("{other:?}: expected protobuf or json"),
                ));
            }
        };
        Ok(LokiSettings {
            push_url,
            tenant: tenant.filter(|t| !t.is_empty()).map(str::to_string),
            static_labels,
            format,
        })
    }
}

/// What the sink reads of a stored entry.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    timestamp: Timestamp,
    level: LogLevel,
    #[serde(borrow)]
    service: Cow<'a, str>,
    /// The message as written in the stored line (a JSON string, escapes and all): the Loki
    /// line splices it in as is.
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
    #[serde(default, borrow)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    span_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tags: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Kubernetes<'a> {
    #[serde(default, borrow)]
    namespace: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pod: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    container: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    node: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ContextView<'a> {
    #[serde(default, borrow)]
    kubernetes: Option<Kubernetes<'a>>,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

/// The entry's tags, unless there are none.
fn tags_of<'a>(view: &View<'a>) -> Option<&'a RawValue> {
    view.tags
        .filter(|t| !matches!(t.get().trim(), "[]" | "null"))
}

/// The line Loki stores for an entry, within `MAX_LINE_BYTES`: the stored JSON of the
/// message, context and tags spliced together as written (nothing is escaped again).
fn line_of(view: &View) -> String {
    let tags = tags_of(view);
    let context = view.context.filter(|c| c.get().trim() != "null");
    let mut line =
        String::with_capacity(view.message.get().len() + context.map_or(0, |c| c.get().len()) + 64);
    line.push_str("{\"message\":");
    line.push_str(view.message.get());
    if let Some(context) = context {
        line.push_str(",\"context\":");
        line.push_str(context.get());
    }
    if let Some(tags) = tags {
        line.push_str(",\"tags\":");
        line.push_str(tags.get());
    }
    line.push('}');
    if line.len() <= MAX_LINE_BYTES {
        return line;
    }
    truncated_line(view, context, tags)
}

/// A line over `MAX_LINE_BYTES`: the message cut to fit and `"truncated":true` added.
fn truncated_line(view: &View, context: Option<&RawValue>, tags: Option<&RawValue>) -> String {
    let message: String = serde_json::from_str(view.message.get()).unwrap_or_default();
    let mut line = Line {
        message: &message,
        context,
        tags,
        truncated: true,
    };
    let text = serde_json::to_string(&line).unwrap_or_default();
    // The message is cut by what is over, plus room for escapes it may lose.
    let over = text.len().saturating_sub(MAX_LINE_BYTES) + 64;
    let mut keep = message.len().saturating_sub(over);
    loop {
        while !message.is_char_boundary(keep) {
            keep -= 1;
        }
        line.message = &message[..keep];
        let text = serde_json::to_string(&line).unwrap_or_default();
        if text.len() <= MAX_LINE_BYTES {
            return text;
        }
        if keep == 0 {
            // The context alone is too large: keep what fits of the message, without it.
            line.context = None;
            line.tags = None;
            keep = message.len().min(MAX_LINE_BYTES / 2);
            continue;
        }
        keep = keep.saturating_sub((text.len() - MAX_LINE_BYTES).max(keep / 8));
    }
}

/// Appends `value` as a label value in Loki's (PromQL's) quoted syntax.
pub(crate) fn quote_into(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
}

pub struct LokiSink {
    settings: LokiSettings,
    client: reqwest::Client,
}

/// One stream: its labels (sorted by name) and its entries.
pub type Stream = (Vec<(String, String)>, Vec<proto::EntryAdapter>);

/// A batch grouped into streams (labels sorted by name; entries sorted by time), ready to
/// encode. Entries that are not valid stored JSON are returned apart, with why (they go to
/// the dead-letter file).
pub struct Grouped {
    pub streams: Vec<Stream>,
    pub invalid: Vec<(usize, String)>,
}

impl LokiSink {
    pub fn new(settings: LokiSettings) -> Result<LokiSink, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(LokiSink { settings, client })
    }

    /// Groups `lines` into streams.
    pub fn group(&self, lines: &[Bytes]) -> Grouped {
        // Streams by their entry labels (service, level, namespace, container, node),
        // borrowed from the batch: the label set is built once per stream, not per entry.
        let mut index: HashMap<[&str; 5], usize, foldhash::fast::RandomState> = HashMap::default();
        let mut streams: Vec<Stream> = Vec::new();
        let mut invalid = Vec::new();
        for (i, raw) in lines.iter().enumerate() {
            let view: View = match serde_json::from_slice(raw) {
                Ok(view) => view,
                Err(error) => {
                    invalid.push((i, format!("not a stored entry: {error}")));
                    continue;
                }
            };
            let kubernetes = view
                .context
                .and_then(|c| serde_json::from_str::<ContextView>(c.get()).ok())
                .and_then(|c| c.kubernetes)
                .unwrap_or_default();
            let mut structured_metadata = Vec::with_capacity(2);
            let mut meta = |name: &str, value: Option<&str>| {
                if let Some(value) = value.filter(|v| !v.is_empty()) {
                    structured_metadata.push(proto::LabelPairAdapter {
                        name: name.to_string(),
                        value: value.to_string(),
                    });
                }
            };
            meta("id", Some(&view.id));
            meta("trace_id", view.trace_id.as_deref());
            meta("span_id", view.span_id.as_deref());
            meta("request_id", view.request_id.as_deref());
            meta("user_id", view.user_id.as_deref());
            meta("pod", kubernetes.pod.as_deref());
            let ts = view.timestamp.as_nanos();
            let entry = proto::EntryAdapter {
                timestamp: Some(proto::ProtoTimestamp {
                    seconds: ts.div_euclid(1_000_000_000),
                    nanos: ts.rem_euclid(1_000_000_000) as i32,
                }),
                line: line_of(&view),
                structured_metadata,
            };
            // The key borrows from the line (`raw`), not from the parsed view: a value the
            // parser had to unescape is owned by the view, so it is copied into the stream.
            let key = [
                key_of(Some(&view.service)),
                Some(view.level.as_str()),
                key_of(kubernetes.namespace.as_ref()),
                key_of(kubernetes.container.as_ref()),
                key_of(kubernetes.node.as_ref()),
            ];
            let found = match key {
                [Some(a), Some(b), Some(c), Some(d), Some(e)] => {
                    let key = [a, b, c, d, e];
                    match index.get(&key) {
                        Some(&n) => Some(n),
                        None => {
                            index.insert(key, streams.len());
                            None
                        }
                    }
                }
                _ => None,
            };
            match found {
                Some(n) => streams[n].1.push(entry),
                None => {
                    let mut labels = self.settings.static_labels.clone();
                    for (name, value) in [
                        ("service", Some(view.service.as_ref())),
                        ("level", Some(view.level.as_str())),
                        ("namespace", kubernetes.namespace.as_deref()),
                        ("container", kubernetes.container.as_deref()),
                        ("node", kubernetes.node.as_deref()),
                    ] {
                        if let Some(value) = value.filter(|v| !v.is_empty()) {
                            labels.push((name.to_string(), value.to_string()));
                        }
                    }
                    labels.sort();
                    // An escaped value has no borrowed key: find its stream by labels. (A new
                    // borrowed key is a new stream; no search needed.)
                    let escaped = key.iter().any(Option::is_none);
                    match streams.iter().position(|(l, _)| escaped && *l == labels) {
                        Some(n) => streams[n].1.push(entry),
                        None => streams.push((labels, vec![entry])),
                    }
                }
            }
        }
        for (_, entries) in &mut streams {
            entries.sort_by_key(|e| e.timestamp.as_ref().map(|t| (t.seconds, t.nanos)));
        }
        Grouped { streams, invalid }
    }

    /// The push body: snappy-compressed protobuf, or JSON.
    pub fn encode(&self, grouped: Grouped) -> Vec<u8> {
        match self.settings.format {
            Format::Protobuf => {
                let request = proto::PushRequest {
                    streams: grouped
                        .streams
                        .into_iter()
                        .map(|(labels, entries)| proto::StreamAdapter {
                            labels: label_text(&labels),
                            entries,
                            hash: 0,
                        })
                        .collect(),
                };
                let bytes = prost::Message::encode_to_vec(&request);
                snap::raw::Encoder::new()
                    .compress_vec(&bytes)
                    .unwrap_or_default()
            }
            Format::Json => {
                let streams: Vec<serde_json::Value> = grouped
                    .streams
                    .into_iter()
                    .map(|(labels, entries)| {
                        let labels: serde_json::Map<String, serde_json::Value> =
                            labels.into_iter().map(|(k, v)| (k, v.into())).collect();
                        let values: Vec<serde_json::Value> = entries
                            .into_iter()
                            .map(|e| {
                                let ts = e
                                    .timestamp
                                    .map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
                                let metadata: serde_json::Map<String, serde_json::Value> = e
                                    .structured_metadata
                                    .into_iter()
                                    .map(|p| (p.name, p.value.into()))
                                    .collect();
                                serde_json::json!([ts.to_string(), e.line, metadata])
                            })
                            .collect();
                        serde_json::json!({ "stream": labels, "values": values })
                    })
                    .collect();
                serde_json::to_vec(&serde_json::json!({ "streams": streams })).unwrap_or_default()
            }
        }
    }
}

/// A label value as a stream key borrowed from the batch: `""` when absent, `None` when the
/// parser had to unescape it (so it is not in the line as is).
fn key_of<'a>(value: Option<&Cow<'a, str>>) -> Option<&'a str> {
    match value {
        Some(Cow::Borrowed(s)) => Some(s),
        Some(Cow::Owned(_)) => None,
        None => Some(""),
    }
}

/// A stream's labels as Loki's push API writes them: `{name="value", …}`, sorted by name.
pub fn label_text(labels: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push('=');
        quote_into(&mut out, value);
    }
    out.push('}');
    out
}

impl Sink for LokiSink {
    fn name(&self) -> &'static str {
        "loki"
    }

    async fn send(&mut self, lines: &[Bytes]) -> Outcome {
        let mut grouped = self.group(lines);
        let invalid = std::mem::take(&mut grouped.invalid);
        if grouped.streams.is_empty() {
            return Outcome::Partial {
                retry: Vec::new(),
                rejected: invalid,
            };
        }
        let body = self.encode(grouped);
        let content_type = match self.settings.format {
            Format::Protobuf => "application/x-protobuf",
            Format::Json => "application/json",
        };
        let mut request = self
            .client
            .post(self.settings.push_url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(tenant) = &self.settings.tenant {
            request = request.header("X-Scope-OrgID", tenant);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Retry(format!("Loki unreachable: {error}")),
        };
        let status = response.status();
        if status.is_success() {
            return if invalid.is_empty() {
                Outcome::Delivered
            } else {
                Outcome::Partial {
                    retry: Vec::new(),
                    rejected: invalid,
                }
            };
        }
        let mut text = response.text().await.unwrap_or_default();
        text.truncate(text.floor_char_boundary(500));
        let reason = format!("Loki answered {status}: {}", text.trim());
        // 400: Loki refuses an entry for good. 413: the request is over its size limit;
        // halving the batch (as for a 400) makes it fit, and a single entry still refused is
        // refused for good.
        if status == reqwest::StatusCode::BAD_REQUEST
            || status == reqwest::StatusCode::PAYLOAD_TOO_LARGE
        {
            Outcome::Rejected(reason)
        } else {
            Outcome::Retry(reason)
        }
    }
}
