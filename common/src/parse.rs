//! What a message says: JSON and logfmt bodies (known keys lifted, the rest kept as context),
//! NCSA access logs as nginx and Apache write them, and plain text with the level read by the
//! detector ([`crate::detect`]). The agent parses every container line with it; the aggregator
//! does the same for lines that arrive through other protocols without a level.
//!
//! Bodies are read without building a value tree: JSON is split into keys and raw values, and
//! only the few known keys are parsed, which is what keeps the agent's cost per line low
//! (docs/design.md §10).

use std::borrow::Cow;

use crate::detect::{detect_level, level_name};
use crate::{LogLevel, Timestamp};
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
    /// The level came from a severity number, which a spelled-out level replaces.
    level_from_number: bool,
}

/// Which lifted field a key spells, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    Level,
    /// OpenTelemetry's `severity_number` (1-24): used when no level is spelled out.
    SeverityNumber,
    Message,
    /// Serilog's message template (`@mt`): rendered into the message when there is no `@m`.
    Template,
    Time,
    Service,
    TraceId,
    SpanId,
    RequestId,
    CorrelationId,
    UserId,
}

/// The keys that name a level, compared without regard to case: the common ones, OpenTelemetry's,
/// Serilog CLEF's `@l`, ECS's `log.level`, Python's `levelname`.
const LEVEL_KEYS: [&str; 11] = [
    "level",
    "lvl",
    "severity",
    "loglevel",
    "log_level",
    "log.level",
    "levelname",
    "severity_text",
    "severitytext",
    "@l",
    "@level",
];

fn known(key: &str) -> Option<Known> {
    Some(match key {
        "msg" | "message" | "MESSAGE" | "Message" | "@message" | "@m" => Known::Message,
        "@mt" => Known::Template,
        "ts" | "time" | "timestamp" | "@timestamp" | "Timestamp" | "datetime" | "@t" => Known::Time,
        "service" | "service.name" | "service_name" => Known::Service,
        "trace_id" | "traceId" | "traceID" | "trace.id" | "traceid" => Known::TraceId,
        "span_id" | "spanId" | "spanID" | "span.id" | "spanid" => Known::SpanId,
        "request_id" | "requestId" | "requestID" | "request.id" | "req_id" | "reqId"
        | "x_request_id" => Known::RequestId,
        "correlation_id" | "correlationId" | "correlationID" => Known::CorrelationId,
        "user_id" | "userId" | "userID" | "user.id" => Known::UserId,
        _ if key.len() <= 15 && LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) => {
            Known::Level
        }
        _ if key.eq_ignore_ascii_case("severity_number")
            || key.eq_ignore_ascii_case("severitynumber") =>
        {
            Known::SeverityNumber
        }
        _ => return None,
    })
}

/// A level spelled as text, also with slog's offset (`ERROR+2`, `DEBUG-4`).
fn level_text(text: &str) -> Option<LogLevel> {
    level_name(text).or_else(|| {
        let base = text.trim_end_matches(|c: char| c.is_ascii_digit());
        let base = base.strip_suffix(['+', '-'])?;
        (base.len() < text.len() - 1)
            .then(|| level_name(base))
            .flatten()
    })
}

/// A numeric level: syslog severities 0-7, or bunyan/pino's 10-60.
fn level_number(n: f64) -> Option<LogLevel> {
    if n < 0.0 || n.fract() != 0.0 {
        return None;
    }
    match n as u64 {
        n @ 0..=7 => LogLevel::from_syslog_severity(n),
        10 => Some(LogLevel::Trace),
        20 => Some(LogLevel::Debug),
        30 => Some(LogLevel::Info),
        40 => Some(LogLevel::Warning),
        50 => Some(LogLevel::Error),
        60 => Some(LogLevel::Critical),
        _ => None,
    }
}

/// OpenTelemetry's severity number: 1-4 trace, 5-8 debug, 9-12 info, 13-16 warn, 17-20 error,
/// 21-24 fatal.
pub fn severity_number(n: f64) -> Option<LogLevel> {
    if n.fract() != 0.0 {
        return None;
    }
    Some(match n as i64 {
        1..=4 => LogLevel::Trace,
        5..=8 => LogLevel::Debug,
        9..=12 => LogLevel::Info,
        13..=16 => LogLevel::Warning,
        17..=20 => LogLevel::Error,
        21..=24 => LogLevel::Critical,
        _ => return None,
    })
}

impl Parsed {
    /// Stores a lifted value; returns false when the value does not fit (then it stays in
    /// the context). The first key that names a level wins; a severity number only counts
    /// when no key spells one out.
    fn lift(&mut self, field: Known, text: &str, number: Option<f64>) -> bool {
        match field {
            Known::Level => {
                if self.level.is_some() && !self.level_from_number {
                    return false;
                }
                let level = match number {
                    Some(n) => level_number(n),
                    None => level_text(text),
                };
                if level.is_some() {
                    self.level = level;
                    self.level_from_number = false;
                }
                level.is_some()
            }
            Known::SeverityNumber => {
                let level = number
                    .or_else(|| text.parse().ok())
                    .and_then(severity_number);
                if level.is_some() && self.level.is_none() {
                    self.level = level;
                    self.level_from_number = true;
                }
                level.is_some()
            }
            Known::Message => {
                self.message = Some(text.to_string());
                true
            }
            Known::Template => false,
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

impl Parsed {
    /// The fields of text pairs (logfmt's, or a user parser's named groups): known keys
    /// lifted, the rest kept as context, numbers as numbers and everything else as strings.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Parsed {
        let mut parsed = Parsed::default();
        for (key, value) in pairs {
            let number = value.parse::<f64>().ok().filter(|n| n.is_finite());
            let lifted_number = match known(key) {
                Some(Known::Level | Known::SeverityNumber) => number,
                _ => None,
            };
            if let Some(field) = known(key)
                && parsed.lift(field, value, lifted_number)
            {
                continue;
            }
            let json = match number {
                Some(_) if !value.starts_with('+') && !value.starts_with('.') => value.to_string(),
                _ => serde_json::to_string(value).unwrap_or_default(),
            };
            parsed.context.push((key.to_string(), json));
        }
        parsed
    }
}

/// A body format by name, for parsers an operator configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Logfmt,
    /// NCSA common or combined, as nginx and Apache write access logs.
    AccessLog,
    /// Plain text: the level from the detector, the whole body as the message.
    Text,
}

/// The names [`Format::from_name`] takes.
pub const FORMAT_NAMES: &str = "json, logfmt, access_log (or nginx, apache), text";

impl Format {
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name.to_ascii_lowercase().as_str() {
            "json" => Format::Json,
            "logfmt" => Format::Logfmt,
            "access_log" | "nginx" | "apache" => Format::AccessLog,
            "text" | "plain" => Format::Text,
            _ => return None,
        })
    }
}

/// Parses a body as one format only; `None` when it is not in that format.
pub fn parse_as(format: Format, body: &str) -> Option<Parsed> {
    match format {
        Format::Json => parse_json(body.trim_start()),
        Format::Logfmt => parse_logfmt(body, 1),
        Format::AccessLog => parse_access_log(body),
        Format::Text => Some(Parsed {
            level: detect_level(body),
            ..Parsed::default()
        }),
    }
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
    if let Some(parsed) = parse_logfmt(body, 2) {
        return parsed;
    }
    Parsed {
        level: detect_level(body),
        ..Parsed::default()
    }
}

/// A JSON object as keys and raw values, borrowing from the input where it can.
pub struct RawPairs<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

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
    let mut template = None;
    for (key, raw) in &pairs.0 {
        let text = raw.get();
        if let Some(field) = known(key) {
            if field == Known::Template {
                template = serde_json::from_str::<Cow<'_, str>>(text).ok();
            }
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
        parsed.context.push((key.to_string(), text.to_string()));
    }
    if parsed.message.is_none()
        && let Some(template) = template
    {
        parsed.message = Some(render_template(&template, &pairs.0));
    }
    Some(parsed)
}

/// Serilog's message template with the entry's properties in place: `{Name}`, `{@Name}`,
/// `{$Name}`, `{Name:format}` and `{Name,alignment}` become the property's value (strings
/// without their quotes); `{{` and `}}` are braces; a hole with no property stays as written.
fn render_template(template: &str, pairs: &[(Cow<'_, str>, &RawValue)]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let brace = rest.as_bytes()[i];
        rest = &rest[i..];
        if rest.len() > 1 && rest.as_bytes()[1] == brace {
            out.push(brace as char);
            rest = &rest[2..];
            continue;
        }
        let hole = if brace == b'{' { rest.find('}') } else { None };
        let Some(end) = hole else {
            out.push(brace as char);
            rest = &rest[1..];
            continue;
        };
        let name = rest[1..end].trim_start_matches(['@', '$']);
        let name = name.split([':', ',']).next().unwrap_or(name);
        match pairs.iter().find(|(key, _)| key == name) {
            Some((_, raw)) => match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
                Ok(text) => out.push_str(&text),
                Err(_) => out.push_str(raw.get()),
            },
            None => out.push_str(&rest[..=end]),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `key=value key2="quoted value"`: logfmt when the line is made of pairs, at least
/// `min_pairs` of them (two when guessing, so `a=b` alone is not taken for logfmt).
fn parse_logfmt(body: &str, min_pairs: usize) -> Option<Parsed> {
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
    if pairs.len() < min_pairs.max(1) {
        return None;
    }
    Some(Parsed::from_pairs(
        pairs.iter().map(|(key, value)| (*key, value.as_ref())),
    ))
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
    fn json_levels_come_from_every_common_key_and_spelling() {
        let level = |body: &str| parse(body).level;
        assert_eq!(level(r#"{"Severity":"warning"}"#), Some(LogLevel::Warning));
        assert_eq!(level(r#"{"log.level":"ERROR"}"#), Some(LogLevel::Error));
        assert_eq!(
            level(r#"{"levelname":"CRITICAL"}"#),
            Some(LogLevel::Critical)
        );
        assert_eq!(level(r#"{"@l":"Verbose"}"#), Some(LogLevel::Trace));
        assert_eq!(level(r#"{"level":"DEBUG-4"}"#), Some(LogLevel::Debug));
        assert_eq!(level(r#"{"level":"INFO+"}"#), None);
        assert_eq!(level(r#"{"level":"SEVERE"}"#), Some(LogLevel::Error));
        // OpenTelemetry: the text wins over the number, in either order.
        assert_eq!(
            level(r#"{"severity_number":17,"severity_text":"WARN"}"#),
            Some(LogLevel::Warning)
        );
        assert_eq!(
            level(r#"{"severity_text":"WARN","severity_number":17}"#),
            Some(LogLevel::Warning)
        );
        assert_eq!(level(r#"{"severity_number":"9"}"#), Some(LogLevel::Info));
        assert_eq!(level(r#"{"severity_number":25}"#), None);
        // The first key that names a level wins; a second one stays in the context.
        let p = parse(r#"{"level":"error","lvl":"info"}"#);
        assert_eq!(p.level, Some(LogLevel::Error));
        assert_eq!(p.context, vec![("lvl".to_string(), "\"info\"".to_string())]);
        // logfmt takes numbers too.
        assert_eq!(level("level=50 msg=x"), Some(LogLevel::Error));
    }

    #[test]
    fn serilog_templates_are_rendered_when_there_is_no_message() {
        let p = parse(
            r#"{"@t":"2026-12-01T12:00:00Z","@mt":"Payment {OrderId} for {@Customer} took {Elapsed:0.00} ms {{ok}} {Missing}","@l":"Warning","OrderId":4711,"Customer":"alice","Elapsed":12.5}"#,
        );
        assert_eq!(
            p.message.as_deref(),
            Some("Payment 4711 for alice took 12.5 ms {ok} {Missing}")
        );
        assert_eq!(p.level, Some(LogLevel::Warning));
        assert_eq!(p.timestamp.unwrap().to_rfc3339(), "2026-12-01T12:00:00Z");
        // The template stays, for grouping; `@m` wins when both are there.
        assert!(p.context.iter().any(|(k, _)| k == "@mt"));
        let p = parse(r#"{"@m":"rendered","@mt":"template {X}","X":1}"#);
        assert_eq!(p.message.as_deref(), Some("rendered"));
        let p = parse(r#"{"@mt":"unclosed {X and } and {"}"#);
        assert_eq!(p.message.as_deref(), Some("unclosed {X and } and {"));
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
        assert!(parse_logfmt("just a sentence with a=b", 2).is_none());
        assert!(parse_logfmt("level=warn", 2).is_none());
        assert_eq!(
            parse_as(Format::Logfmt, "level=warn").unwrap().level,
            Some(LogLevel::Warning)
        );
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
            fn any_template_renders_without_panicking(template in "[{}a-zA-Z@$:, é]{0,40}") {
                let body = serde_json::json!({"@mt": template, "a": 1, "X": "x"}).to_string();
                prop_assert!(parse(&body).message.is_some());
            }

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
