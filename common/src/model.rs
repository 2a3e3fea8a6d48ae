//! The data model of the seed's specification: log entries, audit entries and alerts.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::level::LogLevel;
use crate::timestamp::Timestamp;

/// A log entry as stored and returned (the seed's `LogEntry`).
///
/// Beyond the seed's fields it carries `environment` and `service_version`, which the
/// aggregator's enrichment fills in. `created_at` is when the aggregator received the entry.
/// `user_id` is any identifier string (a UUID is normalised to lowercase hyphenated form):
/// real services log user ids that are not UUIDs, and refusing such a line would lose it.
///
/// Serialised, it leaves out empty fields (the compact form the WAL and the store keep);
/// [`LogEntry::to_api_json`] writes every field, nulls included, as the API returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    pub id: Uuid,
    pub timestamp: Timestamp,
    pub level: LogLevel,
    pub service: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Context::is_empty")]
    pub context: Context,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,
    pub created_at: Timestamp,
}

impl LogEntry {
    /// An entry with the required fields, a fresh UUIDv7 of its timestamp, the current time
    /// as `created_at`, and every optional field empty.
    pub fn new(
        timestamp: Timestamp,
        level: LogLevel,
        service: impl Into<String>,
        message: impl Into<String>,
    ) -> LogEntry {
        LogEntry {
            id: crate::id::new_log_id(timestamp),
            timestamp,
            level,
            service: service.into(),
            message: message.into(),
            context: Context::default(),
            trace_id: None,
            span_id: None,
            user_id: None,
            request_id: None,
            correlation_id: None,
            tags: Vec::new(),
            environment: None,
            service_version: None,
            created_at: Timestamp::now(),
        }
    }

    /// Appends the stored line of the entry (compact JSON, empty fields left out, exactly as
    /// `serde_json` writes the struct) and, with `agent`, `"agent":<name>` first in its
    /// context: the aggregator's own writer, cheaper than serde's and without building a new
    /// context for the agent's name.
    pub fn write_stored(&self, agent: Option<&str>, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, text: &str) {
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, text);
        }
        fn optional(out: &mut Vec<u8>, key: &str, value: &Option<String>) {
            if let Some(value) = value {
                out.push(b',');
                out.extend_from_slice(key.as_bytes());
                string(out, value);
            }
        }
        out.extend_from_slice(b"{\"id\":\"");
        let mut buf = Uuid::encode_buffer();
        out.extend_from_slice(self.id.hyphenated().encode_lower(&mut buf).as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        let mut ts = String::with_capacity(32);
        self.timestamp.write_rfc3339(&mut ts);
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(self.level.as_str().as_bytes());
        out.extend_from_slice(b"\",\"service\":");
        string(out, &self.service);
        out.extend_from_slice(b",\"message\":");
        string(out, &self.message);
        let empty = self.context.is_empty();
        match agent {
            Some(agent) => {
                out.extend_from_slice(b",\"context\":{\"agent\":");
                string(out, agent);
                if !empty {
                    let text = self.context.as_json().trim();
                    out.push(b',');
                    out.extend_from_slice(text[1..].trim_start().as_bytes());
                } else {
                    out.push(b'}');
                }
            }
            None if !empty => {
                out.extend_from_slice(b",\"context\":");
                out.extend_from_slice(self.context.as_json().as_bytes());
            }
            None => {}
        }
        optional(out, "\"trace_id\":", &self.trace_id);
        optional(out, "\"span_id\":", &self.span_id);
        optional(out, "\"user_id\":", &self.user_id);
        optional(out, "\"request_id\":", &self.request_id);
        optional(out, "\"correlation_id\":", &self.correlation_id);
        if !self.tags.is_empty() {
            out.extend_from_slice(b",\"tags\":[");
            for (i, tag) in self.tags.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, tag);
            }
            out.push(b']');
        }
        optional(out, "\"environment\":", &self.environment);
        optional(out, "\"service_version\":", &self.service_version);
        out.extend_from_slice(b",\"created_at\":\"");
        ts.clear();
        self.created_at.write_rfc3339(&mut ts);
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(b"\"}");
    }

    /// The entry with every field of the model, empty ones as `null`, `{}` or `[]`.
    pub fn to_api_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Full<'a> {
            id: &'a Uuid,
            timestamp: &'a Timestamp,
            level: LogLevel,
            service: &'a str,
            message: &'a str,
            context: &'a Context,
            trace_id: &'a Option<String>,
            span_id: &'a Option<String>,
            user_id: &'a Option<String>,
            request_id: &'a Option<String>,
            correlation_id: &'a Option<String>,
            tags: &'a [String],
            environment: &'a Option<String>,
            service_version: &'a Option<String>,
            created_at: &'a Timestamp,
        }
        serde_json::to_vec(&Full {
            id: &self.id,
            timestamp: &self.timestamp,
            level: self.level,
            service: &self.service,
            message: &self.message,
            context: &self.context,
            trace_id: &self.trace_id,
            span_id: &self.span_id,
            user_id: &self.user_id,
            request_id: &self.request_id,
            correlation_id: &self.correlation_id,
            tags: &self.tags,
            environment: &self.environment,
            service_version: &self.service_version,
            created_at: &self.created_at,
        })
        .unwrap_or_default()
    }
}

/// The free-form `context` object of a log entry, kept as the JSON text it arrived as.
///
/// Keeping the text (instead of a parsed tree) is what makes ingest cheap: the aggregator
/// stores and returns it verbatim and only ever scans it for numeric fields.
#[derive(Clone)]
pub struct Context(Box<RawValue>);

impl Context {
    /// Wraps JSON text that must be an object, without the whitespace between its tokens.
    ///
    /// The text is stored inside an entry's NDJSON line: a context sent pretty-printed
    /// would otherwise cut the line in pieces, and the entry would be lost to every reader.
    pub fn from_object_json(json: Box<RawValue>) -> Result<Context, &'static str> {
        if !json.get().trim_start().starts_with('{') {
            return Err("expected a JSON object");
        }
        match compact_json(json.get()) {
            Some(compact) => RawValue::from_string(compact)
                .map(Context)
                .map_err(|_| "expected a JSON object"),
            None => Ok(Context(json)),
        }
    }

    /// Builds a context from a parsed object.
    pub fn from_map(map: &Map<String, Value>) -> Context {
        let text = serde_json::to_string(map).unwrap_or_else(|_| "{}".to_string());
        Context(RawValue::from_string(text).unwrap_or_else(|_| empty_object()))
    }

    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    pub fn is_empty(&self) -> bool {
        let text = self.0.get().trim();
        text.len() <= 2 || text[1..text.len() - 1].trim().is_empty()
    }

    /// Parses the object (for the rare paths that must change or inspect it).
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }

    /// The top-level keys whose values are numbers, with those values, without building a
    /// tree of the rest: what the embedded store indexes for percentiles and alert rules.
    pub fn numeric_fields(&self) -> Vec<(String, f64)> {
        numeric_fields(self.0.get())
    }
}

/// `text` (valid JSON) without whitespace outside its strings, or `None` if it has none.
/// Strings keep theirs (inside a JSON string, a line break is always written `\n`), and
/// only ASCII bytes are dropped, so what is left is still UTF-8.
fn compact_json(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // A string is kept whole: jump from quote to quote, over escapes.
                let mut j = i + 1;
                i = loop {
                    let rest = bytes.get(j..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(k) if bytes[j + k] == b'\\' => j += k + 2,
                        Some(k) => break j + k + 1,
                        None => break bytes.len(),
                    }
                };
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                let compact = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
                compact.extend_from_slice(&bytes[copied..i]);
                i += 1;
                copied = i;
            }
            _ => i += 1,
        }
    }
    let mut compact = out?;
    compact.extend_from_slice(&bytes[copied.min(bytes.len())..]);
    String::from_utf8(compact).ok()
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_string()).expect("\"{}\" is valid JSON")
}

impl Default for Context {
    fn default() -> Context {
        Context(empty_object())
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl PartialEq for Context {
    fn eq(&self, other: &Context) -> bool {
        self.0.get() == other.0.get() || self.to_map() == other.to_map()
    }
}

impl Serialize for Context {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Context {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if raw.get() == "null" {
            return Ok(Context::default());
        }
        Context::from_object_json(raw).map_err(serde::de::Error::custom)
    }
}

/// The numeric top-level values of a JSON object's text, everything else skipped unparsed.
pub fn numeric_fields(object_json: &str) -> Vec<(String, f64)> {
    serde_json::from_str::<NumericFields>(object_json)
        .map(|n| n.0)
        .unwrap_or_default()
}

/// Collects the numeric top-level values of an object, skipping everything else unparsed.
struct NumericFields(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for NumericFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NumericFields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NumericFields, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if let MaybeNumber(Some(n)) = map.next_value()? {
                        out.push((key.into_owned(), n));
                    }
                }
                Ok(NumericFields(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

struct MaybeNumber(Option<f64>);

impl<'de> Deserialize<'de> for MaybeNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MaybeNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(v.is_finite().then_some(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_unit<E>(self) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MaybeNumber, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(MaybeNumber(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MaybeNumber, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(MaybeNumber(None))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// An immutable record of a business or operator event (the seed's `AuditEntry`).
///
/// `sequence`, `prev_hash` and `hash` place it in the tamper-evident chain: each entry's hash
/// covers its own fields and the previous entry's hash, so changing or removing any entry
/// breaks every hash after it (`GET /api/audit/verify`). `entity_id` is any identifier string
/// (UUIDs normalised), for the same reason as `LogEntry::user_id`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub id: Uuid,
    pub timestamp: Timestamp,
    pub actor: Map<String, Value>,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub old_values: Option<Map<String, Value>>,
    pub new_values: Option<Map<String, Value>>,
    pub metadata: Map<String, Value>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub trace_id: Option<String>,
    pub created_at: Timestamp,
    pub sequence: i64,
    pub prev_hash: String,
    pub hash: String,
}

/// How bad an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertSeverity {
    Info,
    Warning,
    Critical,
}

/// Where an alert is in its lifecycle: pending → firing → resolved (acknowledged on the way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Pending,
    /// The seed calls this state `active`; both spellings are read.
    #[serde(alias = "active")]
    Firing,
    Acknowledged,
    Resolved,
}

/// An alert raised by a rule (the seed's `Alert`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub severity: AlertSeverity,
    pub status: AlertStatus,
    pub condition: String,
    pub threshold: f64,
    pub current_value: f64,
    pub triggered_at: Option<Timestamp>,
    pub resolved_at: Option<Timestamp>,
    pub notification_sent: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_context_fields_are_found_without_parsing_the_rest() {
        let raw: Box<RawValue> = serde_json::from_str(
            r#"{"duration_ms": 12.5, "status": 500, "path": "/x", "nested": {"a": 1},
                "list": [1, 2], "ok": true, "none": null, "neg": -3}"#,
        )
        .unwrap();
        let ctx = Context::from_object_json(raw).unwrap();
        assert_eq!(
            ctx.numeric_fields(),
            vec![
                ("duration_ms".to_string(), 12.5),
                ("status".to_string(), 500.0),
                ("neg".to_string(), -3.0)
            ]
        );
    }

    #[test]
    fn a_pretty_printed_context_is_stored_on_one_line() {
        let pretty = "{\n  \"a b\": \"x  y\\n\\\"  \\\\\",\r\n\t\"é\" : [1, {\"c\": null}],\n  \"d\": \"ü \"\n}";
        let ctx: Context = serde_json::from_str(pretty).unwrap();
        assert_eq!(
            ctx.as_json(),
            "{\"a b\":\"x  y\\n\\\"  \\\\\",\"é\":[1,{\"c\":null}],\"d\":\"ü \"}"
        );
        assert_eq!(
            ctx.to_map(),
            serde_json::from_str::<Map<String, Value>>(pretty).unwrap()
        );
        let mut entry = LogEntry::new(Timestamp::from_nanos(1), crate::LogLevel::Info, "s", "m");
        entry.context = ctx;
        let line = serde_json::to_string(&entry).unwrap();
        assert!(!line.contains('\n'), "{line}");
        // Already compact: kept as it came.
        let ctx: Context = serde_json::from_str(r#"{"a":"b c"}"#).unwrap();
        assert_eq!(ctx.as_json(), r#"{"a":"b c"}"#);
    }

    #[test]
    fn context_must_be_an_object_and_null_means_empty() {
        let raw: Box<RawValue> = serde_json::from_str("[1]").unwrap();
        assert!(Context::from_object_json(raw).is_err());
        let ctx: Context = serde_json::from_str("null").unwrap();
        assert!(ctx.is_empty());
        let ctx: Context = serde_json::from_str("{ }").unwrap();
        assert!(ctx.is_empty());
        let ctx: Context = serde_json::from_str(r#"{"a":1}"#).unwrap();
        assert!(!ctx.is_empty());
    }

    #[test]
    fn stored_entries_are_compact_and_api_entries_complete() {
        let entry: LogEntry = serde_json::from_str(
            r#"{"id":"01937b2e-0000-7000-8000-000000000001","timestamp":"2026-11-27T06:00:00Z",
                "level":"info","service":"s","message":"m","created_at":"2026-11-27T06:00:01Z"}"#,
        )
        .unwrap();
        let compact = serde_json::to_string(&entry).unwrap();
        assert!(
            !compact.contains("null") && !compact.contains("tags"),
            "{compact}"
        );
        let full: serde_json::Value = serde_json::from_slice(&entry.to_api_json()).unwrap();
        for key in [
            "context",
            "trace_id",
            "span_id",
            "user_id",
            "request_id",
            "correlation_id",
            "tags",
            "environment",
            "service_version",
            "created_at",
        ] {
            assert!(full.get(key).is_some(), "{key} missing");
        }
        assert_eq!(full["context"], serde_json::json!({}));
        assert_eq!(full["tags"], serde_json::json!([]));
        let back: LogEntry = serde_json::from_str(&compact).unwrap();
        assert_eq!(back, entry);
    }

    fn arbitrary_entry() -> impl proptest::strategy::Strategy<Value = LogEntry> {
        use proptest::prelude::*;
        let text = "(?s).{0,12}";
        let optional = proptest::option::of(text);
        (
            (any::<i64>(), 0usize..LogLevel::ALL.len(), text, text),
            proptest::collection::btree_map(text, (any::<i32>(), text), 0..4),
            (optional.clone(), optional.clone(), optional.clone()),
            (optional.clone(), optional.clone(), optional),
            proptest::collection::vec(text, 0..3),
            any::<u128>(),
        )
            .prop_map(
                |((nanos, level, service, message), context, ids, more, tags, id)| {
                    let mut entry = LogEntry::new(
                        Timestamp::from_nanos(nanos),
                        LogLevel::ALL[level],
                        service,
                        message,
                    );
                    entry.id = Uuid::from_u128(id);
                    let context: Map<String, Value> = context
                        .into_iter()
                        .map(|(k, (n, s))| (k, serde_json::json!({ "n": n, "s": s })))
                        .collect();
                    // Pretty-printed on purpose: the stored line must be compact all the same.
                    entry.context =
                        serde_json::from_str(&serde_json::to_string_pretty(&context).unwrap())
                            .unwrap();
                    (entry.trace_id, entry.span_id, entry.user_id) = ids;
                    (entry.request_id, entry.environment, entry.service_version) = more;
                    entry.correlation_id = entry.trace_id.clone();
                    entry.tags = tags;
                    entry
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn the_stored_writer_writes_what_serde_writes(entry in arbitrary_entry(), agent in "(?s).{0,8}") {
            let mut ours = Vec::new();
            entry.write_stored(None, &mut ours);
            proptest::prop_assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&entry).unwrap()
            );
            // With the agent: the same entry, its context led by the agent's name.
            let mut stamped = Vec::new();
            entry.write_stored(Some(&agent), &mut stamped);
            let line = String::from_utf8(stamped).unwrap();
            proptest::prop_assert!(!line.contains('\n'));
            let back: LogEntry = serde_json::from_str(&line).unwrap();
            let mut context = entry.context.to_map();
            let mut expected = Map::new();
            expected.insert("agent".to_string(), Value::String(agent.clone()));
            expected.append(&mut context);
            proptest::prop_assert_eq!(back.context.to_map(), expected);
            let mut rest = back.clone();
            rest.context = entry.context.clone();
            proptest::prop_assert_eq!(serde_json::to_string(&rest).unwrap(), serde_json::to_string(&entry).unwrap());
        }
    }

    #[test]
    fn alert_status_reads_the_seeds_active_as_firing() {
        let s: AlertStatus = serde_json::from_str("\"active\"").unwrap();
        assert_eq!(s, AlertStatus::Firing);
        assert_eq!(
            serde_json::to_string(&AlertStatus::Firing).unwrap(),
            "\"firing\""
        );
    }
}
