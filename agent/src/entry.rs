//! From a whole message to the NDJSON line the aggregator receives: parse, enrich with where
//! it came from, redact, and give it its deterministic id (docs/design.md §3).
//!
//! The line is written directly (no intermediate `LogEntry`): the context is assembled from
//! the raw JSON values the parser kept, which is what keeps the cost per line low.

use std::io::Write;
use std::sync::Arc;

use logging_common::id::deterministic_log_id;
use logging_common::{LogLevel, Timestamp};

use crate::decode::Stream;
use crate::parsers::UserParser;
use crate::redact::{REDACTED, Redactor};
use logging_common::parse::{Parsed, parse};

/// A whole message from a source, ready to become an entry.
#[derive(Debug)]
pub struct Message {
    /// Byte offset (or sequence number, for sockets) where the message starts.
    pub start: u64,
    /// When the runtime wrote it, if the format says.
    pub time: Option<Timestamp>,
    pub stream: Option<Stream>,
    pub body: Vec<u8>,
    /// Cut at `MAX_LOG_SIZE`.
    pub truncated: bool,
}

/// What is known about a source, the same for all its messages.
#[derive(Clone, Debug)]
pub struct SourceMeta {
    /// Identity for deterministic ids: node, then the file fingerprint or socket name.
    pub source_id: Vec<u8>,
    /// The service of entries that do not name one.
    pub service: String,
    /// `context.kubernetes`, as JSON, for pod logs.
    pub kubernetes: Option<String>,
    /// Facts for sources outside Kubernetes (e.g. `"file":"/var/log/x.log"`), as JSON pairs.
    pub extra: Option<String>,
    /// The operator's parser for this source (`AGENT_PARSERS`), tried before the built-in rules.
    pub parser: Option<Arc<UserParser>>,
    /// The keys its lines are sealed with: the socket spool's, with encryption at rest on.
    pub sealed: Option<Arc<logging_common::crypto::Keyring>>,
}

/// A spooled message with its line opened; one that cannot be opened (damaged, or sealed
/// with a key since removed) becomes an error entry saying so, in its place.
fn open_spooled(keyring: &logging_common::crypto::Keyring, message: &Message) -> Message {
    let body = match crate::spool::open_line(Some(keyring), &message.body) {
        Ok(body) => body.into_owned(),
        Err(reason) => {
            tracing::error!(%reason, "a spooled message cannot be decrypted");
            serde_json::to_vec(&serde_json::json!({
                "level": "error",
                "message": format!("a spooled message could not be decrypted: {reason}"),
            }))
            .unwrap_or_default()
        }
    };
    Message {
        start: message.start,
        time: message.time,
        stream: message.stream,
        body,
        truncated: message.truncated,
    }
}

/// Turns messages into entry lines.
pub struct Encoder {
    redactor: Redactor,
    /// The longest entry line (`MAX_LOG_SIZE`): what the aggregator accepts.
    max_entry: usize,
}

/// The longest prefix of `text` whose JSON string form (quotes included) takes at most
/// `budget` bytes, as serde_json escapes it.
fn fitting_prefix(text: &str, budget: usize) -> &str {
    let mut used = 2;
    for (i, c) in text.char_indices() {
        let n = match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used + n > budget {
            return &text[..i];
        }
        used += n;
    }
    text
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn write_opt(out: &mut Vec<u8>, key: &str, value: &Option<String>) {
    if let Some(value) = value {
        out.push(b',');
        write_str(out, key);
        out.push(b':');
        write_str(out, value);
    }
}

impl Encoder {
    pub fn new(redactor: Redactor, max_entry: usize) -> Encoder {
        Encoder {
            redactor,
            max_entry,
        }
    }

    /// Appends the entry line for `message` (with its trailing newline) to `out`.
    ///
    /// The line never exceeds `MAX_LOG_SIZE`: one that would is written again with the body
    /// as its message (redacted), cut so that the whole entry fits, its parsed fields left
    /// out and `context.truncated` set; so a long line arrives cut, never refused.
    pub fn encode(&self, meta: &SourceMeta, message: &Message, out: &mut Vec<u8>) {
        let opened;
        let message = match &meta.sealed {
            Some(keyring) => {
                opened = open_spooled(keyring, message);
                &opened
            }
            None => message,
        };
        let start = out.len();
        // One reading of the clock for every attempt: the lines must differ in their message only.
        let now = Timestamp::now();
        self.encode_whole(meta, message, now, out, None);
        if out.len() - start > self.max_entry {
            out.truncate(start);
            let body = String::from_utf8_lossy(&message.body);
            let body = body.trim_end_matches(['\r', '\n']);
            let mut fired = Vec::new();
            let text = self.redactor.redact(body, &mut fired).into_owned();
            // The entry with an empty message says how much room the message has.
            self.encode_whole(meta, message, now, out, Some(("", &fired)));
            let room = (self.max_entry + 2).saturating_sub(out.len() - start);
            out.truncate(start);
            let cut = fitting_prefix(&text, room);
            self.encode_whole(meta, message, now, out, Some((cut, &fired)));
        }
    }

    /// Writes the entry; with `cut` = (message, rules that fired on it), the message is that
    /// text, the body's own fields are left out, and the entry is marked truncated.
    fn encode_whole(
        &self,
        meta: &SourceMeta,
        message: &Message,
        now: Timestamp,
        out: &mut Vec<u8>,
        cut: Option<(&str, &[&'static str])>,
    ) {
        let body = String::from_utf8_lossy(&message.body);
        let body = body.trim_end_matches(['\r', '\n']);
        let parsed = meta.parser.as_ref().and_then(|parser| {
            let parsed = parser.parse(body);
            if parsed.is_none() && cut.is_none() {
                metrics::counter!("logging_agent_parser_misses_total", "parser" => parser.name.clone())
                    .increment(1);
            }
            parsed
        });
        let mut parsed: Parsed = parsed.unwrap_or_else(|| parse(body));
        let mut fired = Vec::new();
        let text = parsed.message.take();
        let text = match cut {
            Some((cut, rules)) => {
                fired.extend_from_slice(rules);
                parsed.context.clear();
                // Only short lifted fields stay: a huge one could not fit in any case.
                for lifted in [
                    &mut parsed.service,
                    &mut parsed.trace_id,
                    &mut parsed.span_id,
                    &mut parsed.request_id,
                    &mut parsed.correlation_id,
                    &mut parsed.user_id,
                ] {
                    if lifted.as_ref().is_some_and(|v| v.len() > 256) {
                        *lifted = None;
                    }
                }
                std::borrow::Cow::Borrowed(cut)
            }
            None => self
                .redactor
                .redact(text.as_deref().unwrap_or(body), &mut fired),
        };
        let timestamp = parsed.timestamp.or(message.time).unwrap_or(now);
        let level = parsed.level.unwrap_or(LogLevel::Info);
        let id = deterministic_log_id(timestamp, &meta.source_id, message.start);

        out.extend_from_slice(b"{\"id\":\"");
        let mut uuid_buf = uuid::Uuid::encode_buffer();
        out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid_buf).as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        let mut ts = String::with_capacity(32);
        timestamp.write_rfc3339(&mut ts);
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(level.as_str().as_bytes());
        out.extend_from_slice(b"\",\"service\":");
        write_str(out, parsed.service.as_deref().unwrap_or(&meta.service));
        out.extend_from_slice(b",\"message\":");
        write_str(out, &text);

        out.extend_from_slice(b",\"context\":{");
        let mut object = ObjectWriter { first: true };
        let field = |object: &mut ObjectWriter, out: &mut Vec<u8>, key: &str| {
            object.separate(out);
            write_str(out, key);
            out.push(b':');
        };
        for (key, value) in &parsed.context {
            field(&mut object, out, key);
            if self.redactor.is_secret_key(key) {
                write_str(out, REDACTED);
                fired.push("secret");
            } else {
                let redacted = self.redactor.redact(value, &mut fired);
                // A rule may have cut into JSON syntax (a card number as a bare number):
                // then the whole value goes.
                let valid = matches!(redacted, std::borrow::Cow::Borrowed(_))
                    || serde_json::from_str::<serde::de::IgnoredAny>(&redacted).is_ok();
                if valid {
                    out.extend_from_slice(redacted.as_bytes());
                } else {
                    write_str(out, REDACTED);
                }
            }
        }
        if let Some(kubernetes) = &meta.kubernetes {
            field(&mut object, out, "kubernetes");
            out.extend_from_slice(kubernetes.as_bytes());
        }
        if let Some(stream) = message.stream {
            field(&mut object, out, "stream");
            write_str(out, stream.as_str());
        }
        if let Some(extra) = &meta.extra {
            object.separate(out);
            out.extend_from_slice(extra.as_bytes());
        }
        if message.truncated || cut.is_some() {
            field(&mut object, out, "truncated");
            out.extend_from_slice(b"true");
        }
        if !fired.is_empty() {
            fired.sort_unstable();
            fired.dedup();
            field(&mut object, out, "redacted");
            let _ = serde_json::to_writer(&mut *out, &fired);
        }
        out.push(b'}');
        write_opt(out, "trace_id", &parsed.trace_id);
        write_opt(out, "span_id", &parsed.span_id);
        write_opt(out, "request_id", &parsed.request_id);
        write_opt(out, "correlation_id", &parsed.correlation_id);
        write_opt(out, "user_id", &parsed.user_id);
        let _ = out.write_all(b"}\n");
    }
}

/// Writes the commas between an object's members.
struct ObjectWriter {
    first: bool,
}

impl ObjectWriter {
    fn separate(&mut self, out: &mut Vec<u8>) {
        if !self.first {
            out.push(b',');
        }
        self.first = false;
    }
}

impl Redactor {
    /// Keys whose values are secrets whatever they look like.
    pub fn is_secret_key(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        matches!(
            key.as_str(),
            "password"
                | "passwd"
                | "pwd"
                | "secret"
                | "client_secret"
                | "token"
                | "access_token"
                | "refresh_token"
                | "api_key"
                | "apikey"
                | "api-key"
                | "private_key"
                | "secret_key"
                | "authorization"
                | "credential"
                | "credentials"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(body: &str, truncated: bool) -> serde_json::Value {
        let encoder = Encoder::new(Redactor::new(&[]).unwrap(), 1 << 20);
        let meta = SourceMeta {
            source_id: b"node-1\0file".to_vec(),
            service: "web".into(),
            kubernetes: Some(r#"{"namespace":"shop","pod":"web-1","node":"node-1"}"#.into()),
            extra: None,
            parser: None,
            sealed: None,
        };
        let message = Message {
            start: 42,
            time: Some(Timestamp::parse("2026-11-27T06:00:00Z").unwrap()),
            stream: Some(Stream::Stderr),
            body: body.as_bytes().to_vec(),
            truncated,
        };
        let mut out = Vec::new();
        encoder.encode(&meta, &message, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn a_json_body_becomes_an_entry_with_lifted_fields_and_metadata() {
        let e = encode(
            r#"{"level":"error","msg":"boom","trace_id":"t1","password":"p","n":1,"card":4111111111111111}"#,
            false,
        );
        assert_eq!(e["context"]["card"], "[REDACTED]");
        assert_eq!(e["level"], "error");
        assert_eq!(e["message"], "boom");
        assert_eq!(e["service"], "web");
        assert_eq!(e["trace_id"], "t1");
        assert_eq!(e["timestamp"], "2026-11-27T06:00:00Z");
        assert_eq!(e["context"]["n"], 1);
        assert_eq!(e["context"]["password"], "[REDACTED]");
        assert_eq!(
            e["context"]["redacted"],
            serde_json::json!(["card_number", "secret"])
        );
        assert_eq!(e["context"]["kubernetes"]["pod"], "web-1");
        assert_eq!(e["context"]["stream"], "stderr");
        assert_eq!(
            encode("plain", false)["id"],
            encode("other text", false)["id"],
            "the id is where it came from"
        );
    }

    #[test]
    fn plain_bodies_keep_their_text_and_truncation_is_marked() {
        let e = encode("WARN disk 91% full\r", true);
        assert_eq!(e["level"], "warning");
        assert_eq!(e["message"], "WARN disk 91% full");
        assert_eq!(e["context"]["truncated"], true);
        let e = encode("{\"service\":\"billing\",\"msg\":\"own service\"}", false);
        assert_eq!(e["service"], "billing");
    }

    #[test]
    fn a_line_too_long_for_one_entry_is_cut_to_fit_whole() {
        let max = 4096;
        let encoder = Encoder::new(Redactor::new(&[]).unwrap(), max);
        let meta = SourceMeta {
            source_id: b"node-1\0file".to_vec(),
            service: "web".into(),
            kubernetes: Some(r#"{"namespace":"shop","pod":"web-1","node":"node-1"}"#.into()),
            extra: None,
            parser: None,
            sealed: None,
        };
        for body in [
            format!(
                r#"{{"level":"error","msg":"big","blob":"{}","trace_id":"t1"}}"#,
                "x".repeat(10_000)
            ),
            // Control characters take six bytes each once escaped.
            "\u{1}".repeat(5_000),
            format!("password=hunter2 {}", "é".repeat(5_000)),
        ] {
            let message = Message {
                start: 7,
                time: None,
                stream: None,
                body: body.clone().into_bytes(),
                truncated: false,
            };
            let mut out = b"earlier line\n".to_vec();
            encoder.encode(&meta, &message, &mut out);
            let line = &out[13..];
            assert!(line.len() <= max, "{} bytes", line.len());
            assert!(
                line.len() > max - 64,
                "the room is used: {} bytes",
                line.len()
            );
            let entry: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(entry["context"]["truncated"], true);
            assert_eq!(entry["context"]["kubernetes"]["pod"], "web-1");
            let text = entry["message"].as_str().unwrap();
            assert!(!text.contains("hunter2"), "redacted before it is cut");
            if body.starts_with('{') {
                assert!(
                    body.starts_with(text),
                    "the message is the start of the body"
                );
                assert_eq!(entry["trace_id"], "t1");
                assert_eq!(entry["level"], "error");
            }
        }
    }
}
