//! What the alert evaluator reads of a stored entry line: its timestamp, level, service and
//! message, and the context keys that rules use.
//!
//! Reading the line is most of the evaluator's work per entry, so it has two readers:
//! - [`compact_view`] reads the form the aggregator itself writes (`serde_json`'s compact
//!   output of a `LogEntry`: no whitespace, the fields in the struct's order) by finding
//!   string ends with `memchr`, and stops as soon as it has what it needs;
//! - anything it does not recognise (whitespace, fields out of order, a number for a level…)
//!   is read by [`serde_view`], the general reader. Both give the same view of a line.

use std::borrow::Cow;

use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::Value;

/// What the evaluator reads of a stored entry.
#[derive(Debug, PartialEq)]
pub struct AlertView<'a> {
    pub timestamp: Timestamp,
    pub level: LogLevel,
    pub service: Cow<'a, str>,
    pub message: Cow<'a, str>,
}

/// Some of an entry's context: the values of the top-level keys rules read (`keys[i]`), in
/// the line's order; empty when the entry has no context or none of those keys. The readers
/// fill it in place, so that its buffer serves entry after entry.
#[derive(Debug, Default, PartialEq)]
pub struct Context(Vec<(usize, Value)>);

impl Context {
    /// The context as read with `keys`.
    pub fn with<'c>(&'c self, keys: &'c [String]) -> ContextView<'c> {
        ContextView {
            keys,
            values: &self.0,
        }
    }
}

/// A [`Context`] with the keys it was read with.
#[derive(Clone, Copy)]
pub struct ContextView<'c> {
    keys: &'c [String],
    values: &'c [(usize, Value)],
}

impl<'c> ContextView<'c> {
    /// The value at `path` (a top-level key, then keys into nested objects).
    pub fn get(&self, path: &[String]) -> Option<&'c Value> {
        let (first, rest) = path.split_first()?;
        // A key written twice counts with its last value, as in a parsed JSON object.
        let (_, value) = self
            .values
            .iter()
            .rev()
            .find(|(key, _)| self.keys.get(*key) == Some(first))?;
        rest.iter().try_fold(value, |value, key| value.get(key))
    }
}

/// The view of a stored line, or `None` if it is not a stored entry; the context's values
/// go to `context`.
pub fn read_view<'a>(
    line: &'a [u8],
    keys: &[String],
    context: &mut Context,
) -> Option<AlertView<'a>> {
    compact_view(line, keys, context).or_else(|| serde_view(line, keys, context))
}

/// The reader of the aggregator's own compact lines. `None` means "not in the form I know":
/// the caller then asks [`serde_view`], so this reader never has to be complete, only right
/// about what it accepts.
pub fn compact_view<'a>(
    line: &'a [u8],
    keys: &[String],
    context: &mut Context,
) -> Option<AlertView<'a>> {
    context.0.clear();
    let mut cursor = Compact {
        bytes: line,
        pos: 0,
    };
    cursor.eat(b'{')?;
    let (mut timestamp, mut level, mut service, mut message) = (None, None, None, None);
    let mut context_read = keys.is_empty();
    loop {
        let key = cursor.plain_string()?;
        cursor.eat(b':')?;
        match key {
            b"timestamp" => {
                let text = std::str::from_utf8(cursor.plain_string()?).ok()?;
                timestamp = Some(Timestamp::parse_rfc3339(text).ok()?);
            }
            b"level" => level = Some(LogLevel::parse(&cursor.string()?)?),
            b"service" => service = Some(cursor.string()?),
            b"message" => message = Some(cursor.string()?),
            b"context" if !context_read => {
                cursor.context(keys, context)?;
                context_read = true;
            }
            _ => cursor.skip_value()?,
        }
        let fields = timestamp.is_some() && level.is_some() && service.is_some();
        let complete = fields && message.is_some();
        if complete && context_read {
            break;
        }
        match cursor.next()? {
            b',' => {}
            // The end of an entry without a context.
            b'}' if complete => break,
            _ => return None,
        }
    }
    Some(AlertView {
        timestamp: timestamp?,
        level: level?,
        service: service?,
        message: message?,
    })
}

/// Where the first `"` or `\` is. Most strings of an entry are short (keys, levels, names):
/// a plain loop finds their end sooner than setting up a vector search does.
fn quote_or_escape(bytes: &[u8]) -> Option<usize> {
    let head = bytes.len().min(16);
    match bytes[..head].iter().position(|&b| b == b'"' || b == b'\\') {
        Some(i) => Some(i),
        None => memchr::memchr2(b'"', b'\\', &bytes[head..]).map(|i| head + i),
    }
}

/// A cursor over compact JSON.
struct Compact<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Compact<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// Moves past the string at the cursor; returns where its text starts and ends (quotes
    /// excluded) and whether it holds escapes.
    fn string_span(&mut self) -> Option<(usize, usize, bool)> {
        self.eat(b'"')?;
        let start = self.pos;
        let mut escaped = false;
        loop {
            let at = self.pos + quote_or_escape(self.bytes.get(self.pos..)?)?;
            if self.bytes[at] == b'"' {
                self.pos = at + 1;
                return Some((start, at, escaped));
            }
            // `\"` and `\\` must not end or start anything; `\uXXXX` continues with hex.
            escaped = true;
            self.pos = at + 2;
        }
    }

    /// A string without escapes, as bytes (keys, timestamps).
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        match self.string_span()? {
            (start, end, false) => Some(&self.bytes[start..end]),
            _ => None,
        }
    }

    /// A string: borrowed from the line, or unescaped into an owned one.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let (start, end, escaped) = self.string_span()?;
        if escaped {
            serde_json::from_slice(&self.bytes[start - 1..=end])
                .ok()
                .map(Cow::Owned)
        } else {
            std::str::from_utf8(&self.bytes[start..end])
                .ok()
                .map(Cow::Borrowed)
        }
    }

    /// Moves past one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string_span().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string_span()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                // A number, `true`, `false` or `null`: up to the delimiter after it.
                let rest = &self.bytes[self.pos..];
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']'))
                    .unwrap_or(rest.len());
                if len == 0 {
                    return None;
                }
                self.pos += len;
                Some(())
            }
        }
    }

    /// Reads the context's keys that are in `keys` into `out`, skipping the others.
    fn context(&mut self, keys: &[String], out: &mut Context) -> Option<()> {
        if self.peek()? != b'{' {
            // `null` (or anything else that is not an object): no context.
            return self.skip_value();
        }
        self.pos += 1;
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            // A key with escapes is left to the general reader.
            let key = self.plain_string()?;
            self.eat(b':')?;
            let start = self.pos;
            self.skip_value()?;
            if let Some(i) = keys.iter().position(|k| k.as_bytes() == key) {
                let value = serde_json::from_slice(&self.bytes[start..self.pos]).ok()?;
                out.0.push((i, value));
            }
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }
}

/// A borrowed string when the JSON has no escapes, an owned one otherwise.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Why reading a line stopped before its end: everything needed was read.
const READ_ENOUGH: &str = "read enough";

/// The general reader: any JSON object with the fields, in any order and spacing. It stops
/// as soon as the fields it needs are read; serde_json insists on reading a map to its end,
/// so the view leaves through `out` and the read stops with an error that says so.
pub fn serde_view<'a>(
    line: &'a [u8],
    keys: &[String],
    context: &mut Context,
) -> Option<AlertView<'a>> {
    use serde::de::DeserializeSeed;
    context.0.clear();
    let mut out = None;
    let mut deserializer = serde_json::Deserializer::from_slice(line);
    // Err(READ_ENOUGH) is the way out with a view; any other error leaves `out` empty.
    let _ = ViewReader {
        keys,
        context,
        out: &mut out,
    }
    .deserialize(&mut deserializer);
    out
}

struct ViewReader<'k, 'a> {
    keys: &'k [String],
    context: &'k mut Context,
    out: &'k mut Option<AlertView<'a>>,
}

impl<'a> serde::de::Visitor<'a> for ViewReader<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a stored entry")
    }

    fn visit_map<A: serde::de::MapAccess<'a>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let (mut timestamp, mut level, mut service, mut message) = (None, None, None, None);
        let mut context_read = self.keys.is_empty();
        while let Some(Text(key)) = map.next_key::<Text>()? {
            match key.as_ref() {
                "timestamp" => timestamp = Some(map.next_value()?),
                "level" => level = Some(map.next_value()?),
                "service" => service = Some(map.next_value::<Text>()?.0),
                "message" => message = Some(map.next_value::<Text>()?.0),
                "context" if !context_read => {
                    map.next_value_seed(Subset(self.keys, &mut *self.context))?;
                    context_read = true;
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            let complete = timestamp.is_some()
                && level.is_some()
                && service.is_some()
                && message.is_some()
                && context_read;
            if complete {
                break;
            }
        }
        match (timestamp, level, service, message) {
            (Some(timestamp), Some(level), Some(service), Some(message)) => {
                *self.out = Some(AlertView {
                    timestamp,
                    level,
                    service,
                    message,
                });
                Err(A::Error::custom(READ_ENOUGH))
            }
            _ => Err(A::Error::custom("not a stored entry")),
        }
    }
}

impl<'a> serde::de::DeserializeSeed<'a> for ViewReader<'_, 'a> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// A context with only the top-level keys rules read parsed (the rest is skipped, not
/// built into values and dropped again); anything but an object is no context.
struct Subset<'k>(&'k [String], &'k mut Context);

impl<'de> serde::de::Visitor<'de> for Subset<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a context object")
    }

    // Anything but an object is no context, as in the compact reader.
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Text(key)) = map.next_key::<Text>()? {
            match self.0.iter().position(|k| *k == key) {
                Some(i) => self.1.0.push((i, map.next_value::<Value>()?)),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Subset<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Read<'a> = Option<(AlertView<'a>, Context)>;

    fn compact<'a>(line: &'a [u8], keys: &[String]) -> Read<'a> {
        let mut context = Context::default();
        compact_view(line, keys, &mut context).map(|view| (view, context))
    }

    fn general<'a>(line: &'a [u8], keys: &[String]) -> Read<'a> {
        let mut context = Context::default();
        serde_view(line, keys, &mut context).map(|view| (view, context))
    }

    fn read<'a>(line: &'a [u8], keys: &[String]) -> Read<'a> {
        // Filled with something else before: a reader starts it afresh.
        let mut context = Context(vec![(0, Value::from("stale"))]);
        read_view(line, keys, &mut context).map(|view| (view, context))
    }

    fn keys() -> Vec<String> {
        vec!["duration_ms".to_string(), "kubernetes".to_string()]
    }

    #[test]
    fn a_stored_line_is_read_up_to_what_rules_need() {
        let now = Timestamp::parse_rfc3339("2026-11-27T10:00:00Z").unwrap();
        let mut entry = logging_common::LogEntry::new(now, LogLevel::Error, "api", "disk \"full\"");
        entry.context = serde_json::from_str(
            r#"{"duration_ms":12.5,"big":{"deep":[1,2,3]},"kubernetes":{"namespace":"shop"}}"#,
        )
        .unwrap();
        entry.tags = vec!["after-the-context".into()];
        let line = serde_json::to_vec(&entry).unwrap();
        let keys = keys();
        let (view, context) =
            compact(&line, &keys).expect("the compact reader reads our own lines");
        assert_eq!(view.timestamp, now);
        assert_eq!(view.level, LogLevel::Error);
        assert_eq!(view.service, "api");
        assert_eq!(view.message, "disk \"full\"");
        let found = context.with(&keys);
        assert_eq!(found.get(&["duration_ms".into()]), Some(&Value::from(12.5)));
        let path = ["kubernetes".to_string(), "namespace".to_string()];
        assert_eq!(found.get(&path), Some(&Value::from("shop")));
        assert_eq!(found.get(&["big".into()]), None, "no rule reads it");
        assert_eq!(Some((view, context)), general(&line, &keys));
        // No rule reads the context: it is not parsed at all.
        assert!(read(&line, &[]).unwrap().1.0.is_empty());
    }

    #[test]
    fn other_forms_are_read_by_the_general_reader() {
        let keys = keys();
        // Fields in another order are the compact reader's too; spacing, a numeric level or
        // an epoch timestamp are not, but an entry all the same.
        let reordered = br#"{"context":{"duration_ms":1},"message":"m","service":"s","level":"info","timestamp":"2026-11-27T10:00:00Z","id":"x"}"#;
        assert_eq!(compact(reordered, &keys), general(reordered, &keys));
        for line in [
            reordered.as_slice(),
            br#"{ "timestamp": "2026-11-27T10:00:00Z", "level": "info", "service": "s", "message": "m" }"#,
            br#"{"timestamp":"2026-11-27T10:00:00Z","level":6,"service":"s","message":"m"}"#,
            br#"{"timestamp":1795773600,"level":"info","service":"s","message":"m"}"#,
        ] {
            if line != reordered {
                let text = String::from_utf8_lossy(line);
                assert!(compact(line, &keys).is_none(), "{text}");
            }
            let (view, _) = read(line, &keys).expect("an entry");
            assert_eq!(view.message, "m");
        }
        for line in [
            br#"{"message":"m"}"#.as_slice(),
            b"not json",
            b"",
            b"{",
            br#"{"timestamp":"2026-11-27T10:00:00Z","level":"info","service":"s","message":"m"#,
            br#"{"timestamp":"2026-11-27T10:00:00Z","level":"loud","service":"s","message":"m"}"#,
        ] {
            assert!(
                read(line, &keys).is_none(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// The two readers agree on every line the compact one accepts, and the compact one
    /// accepts every line the aggregator writes.
    #[test]
    fn both_readers_give_the_same_view() {
        let keys = keys();
        let now = Timestamp::parse_rfc3339("2026-11-27T10:00:00.123456789Z").unwrap();
        let contexts = [
            "{}",
            r#"{"duration_ms":12}"#,
            r#"{"duration_ms":-1.5e3,"x":[{"y":"}"}],"kubernetes":{"namespace":"a\"b"}}"#,
            r#"{"a\"b":"c\\","duration_ms":null,"z":true}"#,
            r#"{"kubernetes":"flat","duration_ms":"12","duration_ms":7}"#,
            r#"{"nested":{"duration_ms":1},"tail":[1,[2,[3]]]}"#,
        ];
        let messages = [
            "plain",
            "",
            "quotes \" and \\ backslashes \\\" and a tab\t",
            "ünïcödé ✓ and \u{1F600} and \u{0001}",
            "ends with a backslash \\",
        ];
        let mut lines = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            for context in contexts {
                let mut entry =
                    logging_common::LogEntry::new(now, LogLevel::Warning, "svc \"q\"", *message);
                entry.context = serde_json::from_str(context).unwrap();
                if i % 2 == 0 {
                    entry.tags = vec!["t".into()];
                    entry.trace_id = Some("abc".into());
                }
                lines.push(serde_json::to_vec(&entry).unwrap());
            }
        }
        for line in &lines {
            let text = String::from_utf8_lossy(line);
            // A context key with escapes is the one thing left to the general reader.
            let escaped_key = text.contains(r#"{"a\"b":"#);
            for keys in [&keys[..], &[]] {
                match compact(line, keys) {
                    Some(compact) => assert_eq!(Some(compact), general(line, keys), "{text}"),
                    None => assert!(escaped_key && !keys.is_empty(), "{text}"),
                }
                assert!(read(line, keys).is_some(), "{text}");
            }
        }
        // Cut anywhere, a line never panics either reader, and they agree whenever both
        // give a view.
        for line in &lines {
            for end in 0..line.len() {
                let cut = &line[..end];
                if let (Some(compact), Some(general)) = (compact(cut, &keys), general(cut, &keys)) {
                    assert_eq!(compact, general, "{}", String::from_utf8_lossy(cut));
                }
            }
        }
    }
}
