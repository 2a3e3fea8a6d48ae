//! Turning what a client sent into a valid [`LogEntry`], or saying exactly what is wrong.
//!
//! Every field is read on its own, so one bad field gives one clear message naming it, and the
//! other fields of the entry (and the other entries of a batch) are unaffected. Top-level keys
//! that are not part of the model are kept: they move into `context` (keys already in
//! `context` win), so nothing a sender wrote is silently dropped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::id::new_log_id;
use crate::level::LogLevel;
use crate::model::{Context, LogEntry};
use crate::timestamp::Timestamp;

/// Longest accepted `service`, correlation id, tag or similar identifier, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 256;
/// Most tags on one entry.
pub const MAX_TAGS: usize = 64;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Longest field name or reason an error repeats back: a reason may quote the client's
/// value, and an answer must not grow with what the client sent.
pub const MAX_ERROR_TEXT: usize = 256;

/// `text` cut to [`MAX_ERROR_TEXT`] bytes (at a character boundary), marked with `…`.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        text.truncate(text.floor_char_boundary(MAX_ERROR_TEXT));
        text.push('…');
    }
    text
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: bounded(field.into()),
            reason: bounded(reason.into()),
        }
    }
}

/// Everything wrong with one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryError {
    pub errors: Vec<FieldError>,
    /// True when the entry was refused for its size alone (HTTP 413 for a single entry).
    pub too_large: bool,
}

impl EntryError {
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> EntryError {
        EntryError {
            errors: vec![FieldError::new(field, reason)],
            too_large: false,
        }
    }
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for EntryError {}

/// Limits applied while validating.
#[derive(Clone, Copy, Debug)]
pub struct EntryLimits {
    /// `MAX_LOG_SIZE`: the largest entry accepted, in bytes of its JSON.
    pub max_entry_bytes: usize,
}

/// A JSON object read as its keys and the unparsed text of each value.
struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject<'a>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key.0, value));
                }
                Ok(RawObject(fields))
            }
        }
        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// A key that borrows from the input unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// serde_json's message without its " at line L column C" suffix, which would point into the
/// single value being read rather than into the request.
fn clean(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn read<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<T, String> {
    serde_json::from_str(raw.get()).map_err(|e| clean(&e))
}

/// Reads an optional identifier: a string or an integer (kept as its text), or null.
fn read_identifier(raw: &RawValue) -> Result<Option<String>, String> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    let value = if text.starts_with('"') {
        read::<String>(raw)?
    } else if text.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        text.to_string()
    } else {
        return Err("expected a string".to_string());
    };
    if value.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!("longer than {MAX_IDENTIFIER_BYTES} bytes"));
    }
    Ok(Some(value))
}

/// A UUID in canonical lowercase hyphenated form; other identifiers unchanged.
pub fn normalize_identifier(value: String) -> String {
    match Uuid::try_parse(&value) {
        Ok(uuid) => uuid.hyphenated().to_string(),
        Err(_) => value,
    }
}

fn read_tags(raw: &RawValue) -> Result<Vec<String>, String> {
    if raw.get() == "null" {
        return Ok(Vec::new());
    }
    let tags: Vec<String> = read(raw).map_err(|_| "expected an array of strings".to_string())?;
    if tags.len() > MAX_TAGS {
        return Err(format!("more than {MAX_TAGS} tags"));
    }
    if let Some(long) = tags.iter().find(|t| t.len() > MAX_IDENTIFIER_BYTES) {
        return Err(format!(
            "tag {:?}… is longer than {MAX_IDENTIFIER_BYTES} bytes",
            &long[..long.floor_char_boundary(32)]
        ));
    }
    Ok(tags)
}

/// Validates one entry as sent by a client and builds the stored form.
///
/// `raw` is the entry's JSON text. Required: `timestamp`, `level`, `service`, `message`.
/// `id` is kept if the client sent one (so retries are idempotent), else a UUIDv7 is made from
/// the timestamp. `created_at` is set to `now`; a client's `created_at` is ignored.
pub fn validate_log_entry(
    text: &str,
    limits: EntryLimits,
    now: Timestamp,
) -> Result<LogEntry, EntryError> {
    if text.len() > limits.max_entry_bytes {
        return Err(EntryError {
            errors: vec![FieldError::new(
                "entry",
                format!(
                    "is {} bytes, more than MAX_LOG_SIZE ({} bytes)",
                    text.len(),
                    limits.max_entry_bytes
                ),
            )],
            too_large: true,
        });
    }
    let object: RawObject<'_> = serde_json::from_str(text).map_err(|e| {
        let problem = match e.is_data() {
            true => "expected a JSON object",
            false => "not JSON",
        };
        EntryError::field("entry", format!("{problem} ({})", clean(&e)))
    })?;

    let mut errors = Vec::new();
    let mut id = None;
    let mut timestamp = None;
    let mut level = None;
    let mut service = None;
    let mut message = None;
    let mut context: Option<Context> = None;
    let mut ids: [Option<String>; 5] = Default::default();
    let mut tags = Vec::new();
    let mut environment = None;
    let mut service_version = None;
    let mut extras: Vec<(Cow<'_, str>, &RawValue)> = Vec::new();

    for (key, value) in object.0 {
        let result: Result<(), String> = match &*key {
            "id" => read::<Option<Uuid>>(value)
                .map_err(|_| "expected a UUID".to_string())
                .map(|v| id = v),
            "timestamp" => read::<Timestamp>(value).map(|v| timestamp = Some(v)),
            "level" => read::<LogLevel>(value).map(|v| level = Some(v)),
            "service" => read::<String>(value).and_then(|v| {
                if v.trim().is_empty() {
                    Err("must not be empty".to_string())
                } else if v.len() > MAX_IDENTIFIER_BYTES {
                    Err(format!("longer than {MAX_IDENTIFIER_BYTES} bytes"))
                } else {
                    service = Some(v);
                    Ok(())
                }
            }),
            "message" => read::<String>(value).map(|v| message = Some(v)),
            "context" => read::<Context>(value).map(|v| context = Some(v)),
            "trace_id" => read_identifier(value).map(|v| ids[0] = v),
            "span_id" => read_identifier(value).map(|v| ids[1] = v),
            "user_id" => read_identifier(value).map(|v| ids[2] = v.map(normalize_identifier)),
            "request_id" => read_identifier(value).map(|v| ids[3] = v),
            "correlation_id" => read_identifier(value).map(|v| ids[4] = v),
            "tags" => read_tags(value).map(|v| tags = v),
            "environment" => read_identifier(value).map(|v| environment = v),
            "service_version" => read_identifier(value).map(|v| service_version = v),
            "created_at" => Ok(()),
            _ => {
                extras.push((key.clone(), value));
                Ok(())
            }
        };
        if let Err(reason) = result {
            errors.push(FieldError::new(key.into_owned(), reason));
        }
    }
    for (field, present) in [
        ("timestamp", timestamp.is_some()),
        ("level", level.is_some()),
        ("service", service.is_some()),
        ("message", message.is_some()),
    ] {
        if !present && !errors.iter().any(|e| e.field == field) {
            errors.push(FieldError::new(field, "is required"));
        }
    }
    let (Some(timestamp), Some(level), Some(service), Some(message), true) =
        (timestamp, level, service, message, errors.is_empty())
    else {
        return Err(EntryError {
            errors,
            too_large: false,
        });
    };

    let mut context = context.unwrap_or_default();
    if !extras.is_empty() {
        let mut map = context.to_map();
        for (key, value) in extras {
            if !map.contains_key(&*key) {
                let value: Value = serde_json::from_str(value.get()).unwrap_or(Value::Null);
                map.insert(key.into_owned(), value);
            }
        }
        context = Context::from_map(&map);
    }
    let [trace_id, span_id, user_id, request_id, correlation_id] = ids;
    Ok(LogEntry {
        id: id.unwrap_or_else(|| new_log_id(timestamp)),
        timestamp,
        level,
        service,
        message,
        context,
        trace_id,
        span_id,
        user_id,
        request_id,
        correlation_id,
        tags,
        environment,
        service_version,
        created_at: now,
    })
}

/// Reads a free-form JSON object field (`actor`, `metadata`, `old_values`…).
pub fn read_object(raw: &RawValue) -> Result<Map<String, Value>, String> {
    read::<Map<String, Value>>(raw).map_err(|_| "expected a JSON object".to_string())
}

/// An audit event as a client sends it (`POST /api/audit`), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub id: Option<Uuid>,
    /// When the audited event happened; the server's clock when absent.
    pub timestamp: Option<Timestamp>,
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
}

fn read_nonempty(raw: &RawValue) -> Result<String, String> {
    let value = read::<String>(raw)?;
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!("longer than {MAX_IDENTIFIER_BYTES} bytes"));
    }
    Ok(value)
}

fn read_optional_object(raw: &RawValue) -> Result<Option<Map<String, Value>>, String> {
    if raw.get() == "null" {
        return Ok(None);
    }
    read_object(raw).map(Some)
}

/// Validates an audit event. Required: `actor` (an object), `action`, `entity_type`,
/// `entity_id`. Audit records are evidence, so unlike log entries an unknown field is an
/// error rather than something to keep elsewhere.
pub fn validate_audit_event(raw: &RawValue) -> Result<AuditEvent, EntryError> {
    let object: RawObject<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        EntryError::field("body", format!("expected a JSON object ({})", clean(&e)))
    })?;
    let mut errors = Vec::new();
    let mut event = AuditEvent {
        id: None,
        timestamp: None,
        actor: Map::new(),
        action: String::new(),
        entity_type: String::new(),
        entity_id: String::new(),
        old_values: None,
        new_values: None,
        metadata: Map::new(),
        ip_address: None,
        user_agent: None,
        trace_id: None,
    };
    let mut seen = [false; 4];
    for (key, value) in object.0 {
        let result: Result<(), String> = match &*key {
            "id" => read::<Option<Uuid>>(value)
                .map_err(|_| "expected a UUID".to_string())
                .map(|v| event.id = v),
            "timestamp" => read::<Timestamp>(value).map(|v| event.timestamp = Some(v)),
            "actor" => read_object(value).map(|v| {
                seen[0] = true;
                event.actor = v;
            }),
            "action" => read_nonempty(value).map(|v| {
                seen[1] = true;
                event.action = v;
            }),
            "entity_type" => read_nonempty(value).map(|v| {
                seen[2] = true;
                event.entity_type = v;
            }),
            "entity_id" => read_identifier(value).and_then(|v| match v {
                Some(v) if !v.trim().is_empty() => {
                    seen[3] = true;
                    event.entity_id = normalize_identifier(v);
                    Ok(())
                }
                _ => Err("must not be empty".into()),
            }),
            "old_values" => read_optional_object(value).map(|v| event.old_values = v),
            "new_values" => read_optional_object(value).map(|v| event.new_values = v),
            "metadata" => {
                read_optional_object(value).map(|v| event.metadata = v.unwrap_or_default())
            }
            "ip_address" => read_identifier(value).and_then(|v| match v {
                Some(ip) => ip
                    .parse::<std::net::IpAddr>()
                    .map(|ip| event.ip_address = Some(ip.to_string()))
                    .map_err(|_| format!("{ip:?} is not an IP address")),
                None => Ok(()),
            }),
            "user_agent" => read::<Option<String>>(value).map(|v| event.user_agent = v),
            "trace_id" => read_identifier(value).map(|v| event.trace_id = v),
            "created_at" | "sequence" | "prev_hash" | "hash" => {
                Err("is set by the server".to_string())
            }
            _ => Err("unknown field".to_string()),
        };
        if let Err(reason) = result {
            errors.push(FieldError::new(key.into_owned(), reason));
        }
    }
    for (i, field) in ["actor", "action", "entity_type", "entity_id"]
        .into_iter()
        .enumerate()
    {
        if !seen[i] && !errors.iter().any(|e| e.field == field) {
            errors.push(FieldError::new(field, "is required"));
        }
    }
    if errors.is_empty() {
        Ok(event)
    } else {
        Err(EntryError {
            errors,
            too_large: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: EntryLimits = EntryLimits {
        max_entry_bytes: 1024,
    };

    fn validate(json: &str) -> Result<LogEntry, EntryError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        validate_log_entry(raw.get(), LIMITS, Timestamp::from_nanos(42))
    }

    #[test]
    fn a_complete_entry_keeps_every_field() {
        let e = validate(
            r#"{"id":"01937b2e-0000-7000-8000-000000000001","timestamp":"2026-11-27T06:00:00Z",
                "level":"WARN","service":"api","message":"slow","context":{"duration_ms":812},
                "trace_id":"abc","span_id":"def","user_id":"0E7B3C3A-1B2C-4D5E-8F90-A1B2C3D4E5F6",
                "request_id":17,"correlation_id":"c-1","tags":["a","b"],
                "environment":"prod","service_version":"1.2.3","created_at":"1999-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(e.id.to_string(), "01937b2e-0000-7000-8000-000000000001");
        assert_eq!(e.level, LogLevel::Warning);
        assert_eq!(e.context.as_json(), r#"{"duration_ms":812}"#);
        assert_eq!(
            e.user_id.as_deref(),
            Some("0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6")
        );
        assert_eq!(e.request_id.as_deref(), Some("17"));
        assert_eq!(e.tags, vec!["a", "b"]);
        assert_eq!(
            e.created_at,
            Timestamp::from_nanos(42),
            "created_at is the server's"
        );
    }

    #[test]
    fn missing_required_fields_are_each_named() {
        let err = validate(r#"{"service":"api"}"#).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["timestamp", "level", "message"]);
        assert_eq!(
            err.to_string(),
            "timestamp: is required; level: is required; message: is required"
        );
    }

    #[test]
    fn wrong_types_name_the_field_and_the_problem() {
        let err = validate(
            r#"{"timestamp":"noon","level":"loud","service":5,"message":"m","tags":"x","id":"nope"}"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("timestamp: \"noon\" is not an RFC 3339 timestamp"),
            "{text}"
        );
        assert!(text.contains("level: unknown level \"loud\""), "{text}");
        assert!(
            text.contains("service: invalid type: integer `5`, expected a string"),
            "{text}"
        );
        assert!(
            text.contains("tags: expected an array of strings"),
            "{text}"
        );
        assert!(text.contains("id: expected a UUID"), "{text}");
        assert!(
            !text.contains("line 1"),
            "positions inside one value mislead: {text}"
        );
    }

    #[test]
    fn oversize_entries_are_refused_as_too_large() {
        let big = format!(
            r#"{{"timestamp":1,"level":"info","service":"s","message":"{}"}}"#,
            "x".repeat(2000)
        );
        let err = validate(&big).unwrap_err();
        assert!(err.too_large);
        assert!(err.to_string().starts_with("entry: is 20"), "{err}");
    }

    #[test]
    fn unknown_top_level_keys_move_into_context_without_overwriting_it() {
        let e = validate(
            r#"{"timestamp":1,"level":6,"service":"s","message":"m","host":"n1","context":{"host":"keep","x":1}}"#,
        )
        .unwrap();
        let ctx = e.context.to_map();
        assert_eq!(ctx["host"], "keep");
        assert_eq!(ctx["x"], 1);
        let e = validate(r#"{"timestamp":1,"level":6,"service":"s","message":"m","pod":"web-1"}"#)
            .unwrap();
        assert_eq!(e.context.to_map()["pod"], "web-1");
        assert_eq!(e.level, LogLevel::Info);
    }

    #[test]
    fn non_objects_and_empty_services_are_refused() {
        assert_eq!(
            validate("[1,2]").unwrap_err().errors[0].field,
            "entry",
            "an array is not an entry"
        );
        let at = |text: &str| validate_log_entry(text, LIMITS, Timestamp::from_nanos(42));
        let err = at("[1,2]").unwrap_err().to_string();
        assert!(err.starts_with("entry: expected a JSON object ("), "{err}");
        for broken in ["{not json", "{\"a\":", "", "{} {}"] {
            let err = at(broken).unwrap_err().to_string();
            assert!(err.starts_with("entry: not JSON ("), "{broken}: {err}");
        }
        let err =
            validate(r#"{"timestamp":1,"level":"info","service":"  ","message":"m"}"#).unwrap_err();
        assert_eq!(err.to_string(), "service: must not be empty");
        let err =
            validate(r#"{"timestamp":1,"level":"info","service":"s","message":"m","context":[1]}"#)
                .unwrap_err();
        assert_eq!(err.to_string(), "context: expected a JSON object");
    }

    fn audit(json: &str) -> Result<AuditEvent, EntryError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        validate_audit_event(&raw)
    }

    #[test]
    fn audit_events_need_actor_action_and_entity() {
        let e = audit(
            r#"{"actor":{"id":"u1"},"action":"user.login","entity_type":"user",
                "entity_id":"5F0C5B4E-93A1-4B0E-9E55-0C3A4B1A2C3D","ip_address":"10.0.0.1",
                "old_values":null,"new_values":{"a":1},"metadata":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!(e.entity_id, "5f0c5b4e-93a1-4b0e-9e55-0c3a4b1a2c3d");
        assert_eq!(e.new_values.unwrap()["a"], 1);
        let err =
            audit(r#"{"actor":"bob","entity_id":7,"ip_address":"nope","extra":1,"hash":"x"}"#)
                .unwrap_err()
                .to_string();
        for part in [
            "actor: expected a JSON object",
            "ip_address: \"nope\" is not an IP address",
            "extra: unknown field",
            "hash: is set by the server",
            "action: is required",
            "entity_type: is required",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
    }

    #[test]
    fn a_generated_id_is_a_uuidv7_of_the_entry_time() {
        let e = validate(
            r#"{"timestamp":"2026-11-27T06:00:00Z","level":"info","service":"s","message":"m"}"#,
        )
        .unwrap();
        assert_eq!(e.id.get_version_num(), 7);
        let (secs, _) = e.id.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64, e.timestamp.as_nanos() / 1_000_000_000);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn limits() -> EntryLimits {
            EntryLimits {
                max_entry_bytes: 1 << 20,
            }
        }

        /// JSON values of any shape (nesting included), as a client might send them.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("timestamp".to_string()),
                            Just("level".to_string()),
                            Just("service".to_string()),
                            Just("message".to_string()),
                            Just("context".to_string()),
                            Just("trace_id".to_string()),
                            Just("tags".to_string()),
                            Just("id".to_string()),
                            ".{0,12}",
                        ],
                        inner,
                        0..8,
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Whatever a client sends is an entry or a list of field errors, each short.
            #[test]
            fn any_json_is_an_entry_or_bounded_errors(value in json()) {
                let text = serde_json::to_string(&value).unwrap();
                let raw = serde_json::value::RawValue::from_string(text).unwrap();
                match validate_log_entry(raw.get(), limits(), Timestamp::from_nanos(1_800_000_000_000_000_000)) {
                    Ok(entry) => prop_assert!(!entry.service.trim().is_empty()),
                    Err(error) => {
                        prop_assert!(!error.errors.is_empty());
                        for e in &error.errors {
                            prop_assert!(e.field.len() <= MAX_ERROR_TEXT + 3);
                            prop_assert!(e.reason.len() <= MAX_ERROR_TEXT + 3);
                        }
                    }
                }
            }

            /// A well-formed entry is accepted and keeps its fields.
            #[test]
            fn valid_entries_keep_their_fields(
                service in "[a-z][a-z0-9-]{0,20}",
                message in ".{0,100}",
                level in 0usize..9,
            ) {
                let level = crate::LogLevel::ALL[level];
                let text = serde_json::json!({
                    "timestamp": "2026-11-27T06:00:00Z",
                    "level": level.as_str(),
                    "service": service,
                    "message": message,
                }).to_string();
                let raw = serde_json::value::RawValue::from_string(text).unwrap();
                let entry = validate_log_entry(raw.get(), limits(), Timestamp::from_nanos(1_800_000_000_000_000_000)).unwrap();
                prop_assert_eq!(entry.service, service);
                prop_assert_eq!(entry.message, message);
                prop_assert_eq!(entry.level, level);
            }
        }
    }
}
