//! What a message says: JSON and logfmt bodies (known keys lifted, the rest kept as context),
//! NCSA access logs as nginx and Apache write them, and plain text with the level read from
//! its leading words.
//!
//! Bodies are read without building a value tree: JSON is split into keys and raw values, and
//! only the few known keys are parsed, which is what keeps the agent's cost per line low
//! (docs/design.md §10).

use std::borrow::Cow;

use logging_common::{LogLevel, Timestamp};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The fields lifted out of a message body.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub level: Option<LogLevel>,
    /// The message; `None` means the whole body is the message.
    pub message: Option<String>,
    pub timestamp: Option<Timestamp>,
    pub service: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// Everything else: (key, value as JSON text).
    pub context: Vec<(String, String)>,
}

/// Which lifted field a key spells, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    Level,
    Message,
    Time,
    Service,
    TraceId,
    SpanId,
    RequestId,
    CorrelationId,
    UserId,
}

fn known(key: &str) -> Option<Known> {
    Some(match key {
        "level" | "lvl" | "severity" | "loglevel" | "log_level" | "log.level" | "levelname"
        | "LEVEL" | "Level" | "severity_text" => Known::Level,
        "msg" | "message" | "MESSAGE" | "Message" | "@message" => Known::Message,
        "ts" | "time" | "timestamp" | "@timestamp" | "Timestamp" | "datetime" => Known::Time,
        "service" | "service.name" | "service_name" => Known::Service,
        "trace_id" | "traceId" | "traceID" | "trace.id" | "traceid" => Known::TraceId,
        "span_id" | "spanId" | "spanID" | "span.id" | "spanid" => Known::SpanId,
        "request_id" | "requestId" | "requestID" | "request.id" | "req_id" | "reqId"
        | "x_request_id" => Known::RequestId,
        "correlation_id" | "correlationId" | "correlationID" => Known::CorrelationId,
        "user_id" | "userId" | "userID" | "user.id" => Known::UserId,
        _ => return None,
    })
}

impl Parsed {
    /// Stores a lifted value; returns false when the value does not fit (then it stays in
    /// the context).
    fn lift(&mut self, field: Known, text: &str, number: Option<f64>) -> bool {
        match field {
            Known::Level => match number {
                Some(n) if n >= 0.0 && n.fract() == 0.0 => {
                    // Numbers: syslog severities 0-7, or bunyan/pino's 10-60.
                    let level = match n as u64 {
                        n @ 0..=7 => LogLevel::from_syslog_severity(n),
                        10 => Some(LogLevel::Trace),
                        20 => Some(LogLevel::Debug),
                        30 => Some(LogLevel::Info),
                        40 => Some(LogLevel::Warning),
                        50 => Some(LogLevel::Error),
                        60 => Some(LogLevel::Critical),
                        _ => None,
                    };
                    self.level = level;
                    level.is_some()
                }
                _ => {
                    self.level = LogLevel::parse(text);
                    self.level.is_some()
                }
            },
            Known::Message => {
                self.message = Some(text.to_string());
                true
            }
            Known::Time => {
                let ts = match number {
                    Some(n) => Timestamp::from_epoch_number(n).ok(),
                    None => Timestamp::parse(text).ok(),
                };
                self.timestamp = ts;
                ts.is_some()
            }
            Known::Service => set(&mut self.service, text),
            Known::TraceId => set(&mut self.trace_id, text),
            Known::SpanId => set(&mut self.span_id, text),
            Known::RequestId => set(&mut self.request_id, text),
            Known::CorrelationId => set(&mut self.correlation_id, text),
            Known::UserId => set(&mut self.user_id, text),
        }
    }
}

fn set(slot: &mut Option<String>, text: &str) -> bool {
    if text.is_empty() || text.len() > 256 {
        return false;
    }
    *slot = Some(text.to_string());
    true
}

/// Parses a message body: JSON object, logfmt, access log, or plain text.
pub fn parse(body: &str) -> Parsed {
    let trimmed = body.trim_start();
    if trimmed.starts_with('{')
        && let Some(parsed) = parse_json(trimmed)
    {
        return parsed;
    }
    if let Some(parsed) = parse_access_log(body) {
        return parsed;
    }
    if let Some(parsed) = parse_logfmt(body) {
        return parsed;
    }
    Parsed {
        level: detect_level(body),
        ..Parsed::default()
    }
}

/// A JSON object as keys and raw values, borrowing from the input where it can.
struct RawPairs<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawPairs<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawPairs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPairs<'a>, A::Error> {
                let mut pairs = Vec::with_capacity(16);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    pairs.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(RawPairs(pairs))
            }
        }
        deserializer.deserialize_map(V(std::marker::PhantomData))
    }
}

fn parse_json(body: &str) -> Option<Parsed> {
    let pairs: RawPairs<'_> = serde_json::from_str(body).ok()?;
    let mut parsed = Parsed::default();
    for (key, raw) in pairs.0 {
        let text = raw.get();
        if let Some(field) = known(&key) {
            let lifted = if text.starts_with('"') {
                serde_json::from_str::<Cow<'_, str>>(text)
                    .map(|s| parsed.lift(field, &s, None))
                    .unwrap_or(false)
            } else if let Ok(n) = text.parse::<f64>() {
                parsed.lift(field, text, Some(n))
            } else {
                false
            };
            if lifted {
                continue;
            }
        }
        parsed.context.push((key.into_owned(), text.to_string()));
    }
    Some(parsed)
}

/// `key=value key2="quoted value"`: logfmt when at least two pairs make up the line.
fn parse_logfmt(body: &str) -> Option<Parsed> {
    let mut pairs = Vec::new();
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && bytes[i] != b' ' && bytes[i] != b'"' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' || i == key_start {
            return None;
        }
        let key = &body[key_start..i];
        i += 1;
        let value: Cow<'_, str> = if i < bytes.len() && bytes[i] == b'"' {
            i += 1;
            let mut value = String::new();
            let mut closed = false;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if i + 1 < bytes.len() => {
                        // The escaped character may be any UTF-8 character, not one byte.
                        let ch = body[i + 1..].chars().next()?;
                        value.push(ch);
                        i += 1 + ch.len_utf8();
                    }
                    b'"' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    _ => {
                        let ch = body[i..].chars().next()?;
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            if !closed {
                return None;
            }
            Cow::Owned(value)
        } else {
            let start = i;
            while i < bytes.len() && bytes[i] != b' ' {
                i += 1;
            }
            Cow::Borrowed(&body[start..i])
        };
        pairs.push((key, value));
    }
    if pairs.len() < 2 {
        return None;
    }
    let mut parsed = Parsed::default();
    for (key, value) in pairs {
        let number = value.parse::<f64>().ok().filter(|n| n.is_finite());
        if let Some(field) = known(key)
            && parsed.lift(field, &value, None)
        {
            continue;
        }
        let json = match number {
            Some(_) if !value.starts_with('+') && !value.starts_with('.') => value.to_string(),
            _ => serde_json::to_string(&value).unwrap_or_default(),
        };
        parsed.context.push((key.to_string(), json));
    }
    Some(parsed)
}

/// `host ident user [10/Oct/2000:13:55:36 -0700] "GET /path HTTP/1.1" 200 2326 "referer"
/// "user agent" [request_time]`: NCSA common and combined, as nginx and Apache write them.
fn parse_access_log(body: &str) -> Option<Parsed> {
    let open = body.find(" [")?;
    let mut head = body[..open].splitn(3, ' ');
    let (remote, _ident, user) = (head.next()?, head.next()?, head.next()?);
    let rest = &body[open + 2..];
    let close = rest.find("] \"")?;
    let time = parse_clf_time(&rest[..close])?;
    let rest = &rest[close + 3..];
    let request_end = rest.find('"')?;
    let request = &rest[..request_end];
    let mut after = rest[request_end + 1..].trim_start().splitn(3, ' ');
    let status: u16 = after.next()?.parse().ok()?;
    let bytes = after.next()?;
    let tail = after.next().unwrap_or("");

    let mut parsed = Parsed {
        timestamp: Some(time),
        level: Some(match status {
            500..=599 => LogLevel::Error,
            400..=499 => LogLevel::Warning,
            _ => LogLevel::Info,
        }),
        ..Parsed::default()
    };
    let mut push = |key: &str, value: String| parsed.context.push((key.to_string(), value));
    let string = |s: &str| serde_json::to_string(s).unwrap_or_default();
    push("remote_addr", string(remote));
    if user != "-" {
        push("remote_user", string(user));
    }
    let mut request_parts = request.splitn(3, ' ');
    if let (Some(method), Some(path)) = (request_parts.next(), request_parts.next()) {
        push("method", string(method));
        push("path", string(path));
        if let Some(protocol) = request_parts.next() {
            push("protocol", string(protocol));
        }
    }
    push("status", status.to_string());
    push(
        "bytes",
        bytes.parse::<u64>().map_or("0".into(), |b| b.to_string()),
    );
    // Combined format: "referer" "user agent", then optionally nginx's $request_time.
    let mut quoted = tail.split('"');
    let _ = quoted.next();
    if let Some(referrer) = quoted.next() {
        if referrer != "-" {
            push("referrer", string(referrer));
        }
        let _ = quoted.next();
        if let Some(agent) = quoted.next() {
            push("user_agent", string(agent));
        }
        if let Some(seconds) = quoted
            .next()
            .and_then(|t| t.trim().split(' ').next())
            .and_then(|t| t.parse::<f64>().ok())
        {
            push("request_time", seconds.to_string());
        }
    }
    parsed.message = Some(body.to_string());
    Some(parsed)
}

/// `10/Oct/2000:13:55:36 -0700`.
fn parse_clf_time(text: &str) -> Option<Timestamp> {
    let (date, zone) = text.split_once(' ')?;
    let mut parts = date.splitn(4, ['/', ':']);
    let day = parts.next()?;
    let month = match parts.next()? {
        "Jan" => "01",
        "Feb" => "02",
        "Mar" => "03",
        "Apr" => "04",
        "May" => "05",
        "Jun" => "06",
        "Jul" => "07",
        "Aug" => "08",
        "Sep" => "09",
        "Oct" => "10",
        "Nov" => "11",
        "Dec" => "12",
        _ => return None,
    };
    let year = parts.next()?;
    let clock = parts.next()?;
    Timestamp::parse_rfc3339(&format!("{year}-{month}-{day}T{clock}{zone}")).ok()
}

/// The level named by a plain message's leading words: `ERROR …`, `[warn] …`,
/// `2026-11-27 10:00:00,123 WARN [main] …`, `E1127 10:00:00.000 1 x.go:12] …` (klog),
/// `ERROR:root:…` (Python).
pub fn detect_level(body: &str) -> Option<LogLevel> {
    let head = &body[..body.floor_char_boundary(body.len().min(80))];
    for (i, word) in head
        .split(|c: char| {
            c.is_whitespace() || matches!(c, '[' | ']' | ':' | '|' | '<' | '>' | '(' | ')' | ',')
        })
        .filter(|w| !w.is_empty())
        .take(6)
        .enumerate()
    {
        if i == 0 {
            // klog: a severity letter and MMDD.
            let b = word.as_bytes();
            if b.len() == 5 && b[1..].iter().all(u8::is_ascii_digit) {
                match b[0] {
                    b'I' => return Some(LogLevel::Info),
                    b'W' => return Some(LogLevel::Warning),
                    b'E' => return Some(LogLevel::Error),
                    b'F' => return Some(LogLevel::Critical),
                    _ => {}
                }
            }
        }
        if word.len() >= 3 && word.len() <= 9 && word.bytes().all(|b| b.is_ascii_alphabetic()) {
            if let Some(level) = LogLevel::parse(word) {
                // Only shouted or bracketed levels count past the first word, so "the
                // request had an error" is not an error line.
                let shouted = word.bytes().all(|b| b.is_ascii_uppercase());
                if i == 0 || shouted || head.contains(&format!("[{word}]")) {
                    return Some(level);
                }
            }
            if word.eq_ignore_ascii_case("severe") {
                return Some(LogLevel::Error);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_lift_the_known_keys_and_keep_the_rest() {
        let p = parse(
            r#"{"ts":"2026-11-27T06:00:00Z","level":"WARN","msg":"slow","traceId":"abc","req_id":7,"user.id":"u1","duration_ms":812,"nested":{"a":1}}"#,
        );
        assert_eq!(p.level, Some(LogLevel::Warning));
        assert_eq!(p.message.as_deref(), Some("slow"));
        assert_eq!(p.timestamp.unwrap().to_rfc3339(), "2026-11-27T06:00:00Z");
        assert_eq!(p.trace_id.as_deref(), Some("abc"));
        assert_eq!(p.request_id.as_deref(), Some("7"));
        assert_eq!(p.user_id.as_deref(), Some("u1"));
        assert_eq!(
            p.context,
            vec![
                ("duration_ms".to_string(), "812".to_string()),
                ("nested".to_string(), r#"{"a":1}"#.to_string())
            ]
        );
        // pino / bunyan numeric levels; unknown level words stay in the context.
        assert_eq!(
            parse(r#"{"level":50,"msg":"x"}"#).level,
            Some(LogLevel::Error)
        );
        let odd = parse(r#"{"level":"loud","msg":"x"}"#);
        assert_eq!(odd.level, None);
        assert_eq!(odd.context[0].0, "level");
    }

    #[test]
    fn logfmt_lines_lift_known_keys_and_type_numbers() {
        let p = parse(
            r#"time=2026-11-27T06:00:00Z level=error msg="connection refused" host=db-1 attempt=3 dur=12ms"#,
        );
        assert_eq!(p.level, Some(LogLevel::Error));
        assert_eq!(p.message.as_deref(), Some("connection refused"));
        assert!(p.timestamp.is_some());
        assert_eq!(
            p.context,
            vec![
                ("host".to_string(), "\"db-1\"".to_string()),
                ("attempt".to_string(), "3".to_string()),
                ("dur".to_string(), "\"12ms\"".to_string()),
            ]
        );
        assert!(parse_logfmt("just a sentence with a=b").is_none());
    }

    #[test]
    fn nginx_and_apache_access_logs_are_understood() {
        let p = parse(
            r#"10.0.0.7 - alice [27/Nov/2026:06:00:00 +0000] "GET /api/v1/items?id=7 HTTP/1.1" 503 1234 "https://shop.example/" "Mozilla/5.0 (X11)" 0.125"#,
        );
        assert_eq!(p.level, Some(LogLevel::Error));
        assert_eq!(p.timestamp.unwrap().to_rfc3339(), "2026-11-27T06:00:00Z");
        let ctx: std::collections::HashMap<_, _> = p.context.into_iter().collect();
        assert_eq!(ctx["method"], "\"GET\"");
        assert_eq!(ctx["path"], "\"/api/v1/items?id=7\"");
        assert_eq!(ctx["status"], "503");
        assert_eq!(ctx["bytes"], "1234");
        assert_eq!(ctx["referrer"], "\"https://shop.example/\"");
        assert_eq!(ctx["user_agent"], "\"Mozilla/5.0 (X11)\"");
        assert_eq!(ctx["request_time"], "0.125");
        assert_eq!(ctx["remote_user"], "\"alice\"");
        let common =
            parse(r#"127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] "GET /a.gif HTTP/1.0" 404 -"#);
        assert_eq!(common.level, Some(LogLevel::Warning));
        assert_eq!(
            common.timestamp.unwrap().to_rfc3339(),
            "2000-10-10T20:55:36Z"
        );
    }

    #[test]
    fn plain_text_levels_come_from_the_leading_words_only() {
        for (line, want) in [
            ("ERROR something broke", Some(LogLevel::Error)),
            ("[warn] disk almost full", Some(LogLevel::Warning)),
            (
                "2026-11-27 10:00:00,123 WARN [main] o.e.Foo - retrying",
                Some(LogLevel::Warning),
            ),
            (
                "E1127 10:00:00.000000       1 main.go:12] failed to sync",
                Some(LogLevel::Error),
            ),
            (
                "I1127 10:00:00.000000       1 main.go:12] synced",
                Some(LogLevel::Info),
            ),
            ("ERROR:root:division by zero", Some(LogLevel::Error)),
            ("debug: cache warmed", Some(LogLevel::Debug)),
            ("the request had an error in it", None),
            ("GET / 200", None),
        ] {
            assert_eq!(detect_level(line), want, "{line}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A bare logfmt value that is text, not a number.
        fn word() -> impl Strategy<Value = String> {
            "[a-zA-Z][a-zA-Z0-9_./:-]{0,19}"
        }

        fn level() -> impl Strategy<Value = LogLevel> {
            prop_oneof![
                Just(LogLevel::Debug),
                Just(LogLevel::Info),
                Just(LogLevel::Warning),
                Just(LogLevel::Error),
                Just(LogLevel::Critical),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_body_parses_without_panicking(body in ".{0,300}") {
                let parsed = parse(&body);
                let _ = detect_level(&body);
                for (key, value) in &parsed.context {
                    // Context values are JSON text, whatever the body was.
                    prop_assert!(serde_json::from_str::<serde_json::Value>(value).is_ok(), "{key}={value}");
                }
            }

            #[test]
            fn json_bodies_give_back_their_message_level_and_fields(
                msg in "[ -~]{0,60}",
                level in level(),
                key in "[a-z]{3,10}",
                value in any::<i64>(),
            ) {
                prop_assume!(!matches!(key.as_str(), "msg" | "message" | "level" | "lvl" | "severity" | "ts" | "time" | "timestamp"));
                let body = serde_json::json!({"msg": msg, "level": level.as_str(), key.clone(): value}).to_string();
                let parsed = parse(&body);
                prop_assert_eq!(parsed.message.as_deref(), Some(msg.as_str()));
                prop_assert_eq!(parsed.level, Some(level));
                let found = parsed.context.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
                prop_assert_eq!(found, Some(value.to_string()));
            }

            #[test]
            fn logfmt_bodies_give_back_their_message_level_and_fields(
                msg in "[ -~&&[^\"\\\\]]{1,40}",
                level in level(),
                key in "[a-z]{3,10}",
                value in word(),
            ) {
                prop_assume!(!matches!(key.as_str(), "msg" | "message" | "level" | "lvl" | "severity" | "ts" | "time" | "timestamp"));
                let body = format!("level={} msg=\"{msg}\" {key}={value}", level.as_str());
                let parsed = parse(&body);
                prop_assert_eq!(parsed.level, Some(level));
                prop_assert_eq!(parsed.message.as_deref(), Some(msg.as_str()));
                let found = parsed.context.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
                prop_assert_eq!(found, Some(serde_json::to_string(&value).unwrap()));
            }

            #[test]
            fn access_log_lines_give_back_method_path_and_status(
                method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
                path in "/[a-z0-9/_.-]{0,30}",
                status in 100u16..600,
                bytes in 0u32..100_000,
            ) {
                let body = format!(
                    "10.0.0.7 - - [27/Nov/2026:06:00:00 +0000] \"{method} {path} HTTP/1.1\" {status} {bytes} \"-\" \"curl/8.0\""
                );
                let parsed = parse(&body);
                let field = |k: &str| parsed.context.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
                prop_assert_eq!(field("method"), Some(format!("\"{method}\"")));
                prop_assert_eq!(field("path"), Some(serde_json::to_string(&path).unwrap()));
                prop_assert_eq!(field("status"), Some(status.to_string()));
                prop_assert!(parsed.level.is_some());
            }
        }
    }
}
