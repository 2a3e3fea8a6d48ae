//! How the store takes a stored line apart, and puts it back together byte for byte.
//!
//! A stored line is the aggregator's own compact JSON:
//! `{"id":"…","timestamp":"…","level":"…","service":"…",<rest>}`. The head (id, timestamp,
//! level, service) goes to columns of its own. The rest is cut into a **template** and its
//! **variables**, as CLP and log-template miners do: every run of letters and digits
//! (Unicode alphanumerics, as search cuts words) that holds an ASCII digit, or is 16 bytes or
//! longer, and every JSON number, is a variable; it is replaced in the template by [`VAR`]
//! and kept apart, filed under the JSON path it sits at (`message`, `context.path`,
//! `context.kubernetes.pod`). Object keys, JSON punctuation, escapes and every other word
//! stay in the template. Lines of a service share a handful of templates, so the template is
//! stored once per block and each row carries only its number; the variables, grouped by
//! path, are what is left to compress, and values of one path look alike.
//!
//! The cut follows search's own word cutting, which is what makes a template answer a query
//! on its own: a word without digits and shorter than 16 bytes can only ever be a template
//! word (see [`is_template_word`]). A line that is not in the canonical form (never written
//! by this aggregator, but the store does not rely on that) is kept whole as a template that
//! starts with [`WHOLE_LINE`].

use std::ops::Range;

use logging_common::{LogLevel, Timestamp};
use uuid::Uuid;

/// A variable's place in a template. JSON text never holds a raw control character.
pub const VAR: u8 = 0x01;
/// First byte of a template that is a whole line (not split into head and rest).
pub const WHOLE_LINE: u8 = 0x02;
/// First byte of a template kept verbatim, without variables: the text held a byte the
/// format reserves (0x00–0x03, never in JSON text).
pub const VERBATIM: u8 = 0x03;
/// Words this long are variables even without a digit (hashes, tokens, base64).
pub const LONG_WORD: usize = 16;

/// Whether a search word can be found in templates alone: no ASCII digit, and short.
pub fn is_template_word(word: &str) -> bool {
    word.len() < LONG_WORD && !word.bytes().any(|b| b.is_ascii_digit())
}

/// The head of a stored line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    pub id: Uuid,
    pub ts: Timestamp,
    pub level: LogLevel,
    /// The service as JSON text, quotes included.
    pub service: &'a [u8],
}

/// Writes the canonical head, up to and including the comma before the rest.
pub fn write_head(out: &mut Vec<u8>, id: &Uuid, ts: Timestamp, level: LogLevel, service: &[u8]) {
    out.extend_from_slice(b"{\"id\":\"");
    let mut buf = Uuid::encode_buffer();
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.extend_from_slice(b"\",\"timestamp\":\"");
    let mut text = String::with_capacity(32);
    ts.write_rfc3339(&mut text);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\",\"level\":\"");
    out.extend_from_slice(level.as_str().as_bytes());
    out.extend_from_slice(b"\",\"service\":");
    out.extend_from_slice(service);
    out.push(b',');
}

/// Splits a stored line into its head and the rest, if the head is exactly what
/// [`write_head`] writes for it (so that putting it back gives the same bytes).
pub fn split_line(line: &[u8]) -> Option<(Head<'_>, &[u8])> {
    let rest = line.strip_prefix(b"{\"id\":\"")?;
    let id = Uuid::try_parse_ascii(rest.get(..36)?).ok()?;
    let rest = rest.get(36..)?.strip_prefix(b"\",\"timestamp\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    let ts = Timestamp::parse_rfc3339(std::str::from_utf8(&rest[..end]).ok()?).ok()?;
    let rest = rest[end..].strip_prefix(b"\",\"level\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    let level = LogLevel::parse(std::str::from_utf8(&rest[..end]).ok()?)?;
    let rest = rest[end..].strip_prefix(b"\",\"service\":")?;
    let service_len = json_string_len(rest)?;
    let (service, rest) = rest.split_at(service_len);
    let rest = rest.strip_prefix(b",")?;
    let head = Head {
        id,
        ts,
        level,
        service,
    };
    // Only a head that comes back byte for byte is taken apart.
    let mut canonical = Vec::with_capacity(line.len() - rest.len());
    write_head(&mut canonical, &head.id, head.ts, head.level, head.service);
    (canonical.as_slice() == &line[..line.len() - rest.len()]).then_some((head, rest))
}

/// The length of the JSON string at the start of `text` (quotes included).
fn json_string_len(text: &[u8]) -> Option<usize> {
    if text.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// A JSON path, as keys joined with dots (`context.kubernetes.pod`).
pub type Path = String;

/// Cuts texts into templates and variables. Reused from line to line: it numbers the paths
/// it meets, so a variable carries a number rather than a copy of its path.
#[derive(Default)]
pub struct Cutter {
    /// The current path's number.
    current: u32,
    /// The path number of each open container, and whether it is an object.
    stack: Vec<(u32, bool)>,
    ids: std::collections::HashMap<String, u32, foldhash::fast::RandomState>,
    names: Vec<String>,
    /// The path under a container's path for a key: (parent number, key bytes) -> number,
    /// so a line's keys are looked up as they stand, without building their paths.
    children: std::collections::HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    key: Vec<u8>,
}

/// One variable of a cut text: its bytes in the text, and its path's number
/// ([`Cutter::path`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variable {
    pub range: Range<usize>,
    pub path: u32,
    /// A JSON number (the whole value), not a word inside a string.
    pub number: bool,
}

/// Where the scanner is, between tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Value,
    Key,
    /// After a key: its colon.
    Colon,
    /// After a value: a comma or the end of the container.
    Next,
}

impl Cutter {
    /// How many paths it has numbered.
    pub fn paths(&self) -> usize {
        self.names.len()
    }

    /// The path of number `id`.
    pub fn path(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }

    fn intern(&mut self, path: String) -> u32 {
        if let Some(&id) = self.ids.get(path.as_str()) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(path.clone());
        self.ids.insert(path, id);
        id
    }

    /// The number of the path of `key` inside the container whose path is `parent`.
    fn child(&mut self, parent: u32, key: &[u8]) -> u32 {
        self.key.clear();
        self.key.extend_from_slice(&parent.to_le_bytes());
        self.key.extend_from_slice(key);
        if let Some(&id) = self.children.get(self.key.as_slice()) {
            return id;
        }
        let mut path = self.path(parent).to_owned();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&String::from_utf8_lossy(key));
        let id = self.intern(path);
        self.children.insert(self.key.as_slice().into(), id);
        id
    }

    /// Cuts `text` (JSON members, or a whole line): appends its template to `template` and
    /// its variables, in order, to `vars`. `top_level_members` says the text is the members
    /// of an object without its opening brace (the rest of a line: `"a":1,"b":2}`).
    ///
    /// Any bytes are accepted; what is not JSON is kept in the template as it is. Putting the
    /// variables back into the template always gives `text` again.
    pub fn cut(
        &mut self,
        text: &[u8],
        top_level_members: bool,
        template: &mut Vec<u8>,
        vars: &mut Vec<Variable>,
    ) {
        self.stack.clear();
        // The whole text's path, "", is the first one numbered.
        const ROOT: u32 = 0;
        if self.names.is_empty() {
            self.intern(String::new());
        }
        self.current = ROOT;
        if text.iter().any(|&b| b <= VERBATIM) {
            template.push(VERBATIM);
            template.extend_from_slice(text);
            return;
        }
        let mut expect = Expect::Value;
        if top_level_members {
            self.stack.push((ROOT, true));
            expect = Expect::Key;
        }
        let mut i = 0;
        let mut copied = 0;
        let flush = |template: &mut Vec<u8>, copied: &mut usize, upto: usize| {
            template.extend_from_slice(&text[*copied..upto]);
            *copied = upto;
        };
        while i < text.len() {
            let b = text[i];
            match b {
                b'"' => {
                    let end = string_end(text, i);
                    if expect == Expect::Key {
                        // A key: never cut; it names the path of the value that follows.
                        let parent = self.stack.last().map_or(ROOT, |(id, _)| *id);
                        let key = &text[i + 1..end.saturating_sub(1).max(i + 1)];
                        self.current = self.child(parent, key);
                        expect = Expect::Colon;
                    } else {
                        // A string value: its words with digits (or long) are variables.
                        let mut j = i + 1;
                        let close = end.saturating_sub(1).max(j);
                        while j < close {
                            if text[j] == b'\\' {
                                j += escape_len(text, j).max(1);
                                continue;
                            }
                            let (run_end, digit) = word_at(text, j, close);
                            if run_end > j {
                                if digit || run_end - j >= LONG_WORD {
                                    flush(template, &mut copied, j);
                                    template.push(VAR);
                                    copied = run_end;
                                    vars.push(Variable {
                                        range: j..run_end,
                                        path: self.current,
                                        number: false,
                                    });
                                }
                                j = run_end;
                            } else {
                                j += utf8_len(text[j]);
                            }
                        }
                        expect = Expect::Next;
                    }
                    i = end;
                }
                b'-' | b'0'..=b'9' if expect == Expect::Value => {
                    // A number: one variable, whole.
                    let mut j = i + 1;
                    while j < text.len()
                        && matches!(text[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                    {
                        j += 1;
                    }
                    flush(template, &mut copied, i);
                    template.push(VAR);
                    copied = j;
                    vars.push(Variable {
                        range: i..j,
                        path: self.current,
                        number: true,
                    });
                    expect = Expect::Next;
                    i = j;
                }
                b'{' | b'[' => {
                    self.stack.push((self.current, b == b'{'));
                    expect = if b == b'{' {
                        Expect::Key
                    } else {
                        Expect::Value
                    };
                    i += 1;
                }
                b'}' | b']' => {
                    if let Some((id, _)) = self.stack.pop() {
                        self.current = id;
                    }
                    expect = Expect::Next;
                    i += 1;
                }
                b':' => {
                    expect = Expect::Value;
                    i += 1;
                }
                b',' => {
                    expect = match self.stack.last() {
                        Some((_, true)) => Expect::Key,
                        _ => Expect::Value,
                    };
                    i += 1;
                }
                _ => {
                    // true, false, null, whitespace, or anything that is not JSON.
                    if expect == Expect::Value && b.is_ascii_alphabetic() {
                        while i < text.len() && text[i].is_ascii_alphabetic() {
                            i += 1;
                        }
                        expect = Expect::Next;
                    } else {
                        i += 1;
                    }
                }
            }
        }
        flush(template, &mut copied, text.len());
    }
}

/// Where the string starting at `start` (a quote) ends: just past its closing quote, or the
/// end of the text.
fn string_end(text: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while let Some(k) = memchr::memchr2(b'"', b'\\', text.get(i..).unwrap_or_default()) {
        let at = i + k;
        if text[at] == b'"' {
            return at + 1;
        }
        i = at + escape_len(text, at).max(1);
    }
    text.len()
}

/// Bytes of the escape sequence at `i` (a backslash): 6 for `\uXXXX`, else 2.
fn escape_len(text: &[u8], i: usize) -> usize {
    match text.get(i + 1) {
        Some(b'u') => 6.min(text.len() - i),
        Some(_) => 2,
        None => 1,
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

/// The end of the run of alphanumeric characters starting at `i` (before `end`), and
/// whether it holds an ASCII digit. `i` itself when no such character starts there.
fn word_at(text: &[u8], i: usize, end: usize) -> (usize, bool) {
    let mut j = i;
    let mut digit = false;
    while j < end {
        let b = text[j];
        if b.is_ascii_alphanumeric() {
            digit |= b.is_ascii_digit();
            j += 1;
        } else if b < 0x80 {
            break;
        } else {
            let len = utf8_len(b).min(end - j);
            match std::str::from_utf8(&text[j..j + len])
                .ok()
                .and_then(|s| s.chars().next())
            {
                Some(c) if c.is_alphanumeric() => j += len,
                _ => break,
            }
        }
    }
    (j, digit)
}

/// Puts variables back into a template: appends the text to `out`. `var(i)` gives the
/// `i`-th variable. Returns false if the template asks for a variable `var` does not have.
pub fn fill<'v>(
    template: &[u8],
    mut var: impl FnMut(usize) -> Option<&'v [u8]>,
    out: &mut Vec<u8>,
) -> bool {
    if let Some(verbatim) = template.strip_prefix(&[VERBATIM]) {
        out.extend_from_slice(verbatim);
        return true;
    }
    let mut n = 0;
    let mut rest = template;
    while let Some(at) = memchr::memchr(VAR, rest) {
        out.extend_from_slice(&rest[..at]);
        let Some(value) = var(n) else {
            return false;
        };
        out.extend_from_slice(value);
        n += 1;
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    true
}

/// One JSON value in a template, as search sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value {
    pub path: Path,
    /// A number (not a string).
    pub number: bool,
    pub pieces: Vec<Piece>,
}

/// A part of a value: text (JSON escapes decoded) or a variable (its number in the template).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Piece {
    Text(String),
    Var(usize),
}

/// The values of a template, in order, with their paths. Keys are not values. Built once per
/// template and query; what search matches against.
pub fn values(template: &[u8]) -> Vec<Value> {
    let (text, top_level) = match template.strip_prefix(&[WHOLE_LINE]) {
        Some(line) => (line, false),
        None => (template, true),
    };
    if let Some(verbatim) = text.strip_prefix(&[VERBATIM]) {
        // Not JSON the store could read: searched as one text.
        return vec![Value {
            path: String::new(),
            number: false,
            pieces: vec![Piece::Text(String::from_utf8_lossy(verbatim).into_owned())],
        }];
    }
    let mut out = Vec::new();
    let mut path = String::new();
    let mut stack: Vec<(usize, bool)> = Vec::new();
    let mut expect = Expect::Value;
    if top_level {
        stack.push((0, true));
        expect = Expect::Key;
    }
    let mut var = 0;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        match b {
            b'"' => {
                let end = string_end(text, i);
                let inner = &text[i + 1..end.saturating_sub(1).max(i + 1)];
                if expect == Expect::Key {
                    let base = stack.last().map_or(0, |(len, _)| *len);
                    path.truncate(base);
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&String::from_utf8_lossy(inner));
                    // A key holds no variables; count any (a template written by something
                    // else) so the numbering of the others stays right.
                    var += memchr::memchr_iter(VAR, inner).count();
                    expect = Expect::Colon;
                } else {
                    let pieces = decode_pieces(inner, &mut var);
                    out.push(Value {
                        path: path.clone(),
                        number: false,
                        pieces,
                    });
                    expect = Expect::Next;
                }
                i = end;
            }
            VAR => {
                out.push(Value {
                    path: path.clone(),
                    number: expect == Expect::Value,
                    pieces: vec![Piece::Var(var)],
                });
                var += 1;
                expect = Expect::Next;
                i += 1;
            }
            b'{' | b'[' => {
                stack.push((path.len(), b == b'{'));
                expect = if b == b'{' {
                    Expect::Key
                } else {
                    Expect::Value
                };
                i += 1;
            }
            b'}' | b']' => {
                if let Some((len, _)) = stack.pop() {
                    path.truncate(len);
                }
                expect = Expect::Next;
                i += 1;
            }
            b':' => {
                expect = Expect::Value;
                i += 1;
            }
            b',' => {
                expect = match stack.last() {
                    Some((_, true)) => Expect::Key,
                    _ => Expect::Value,
                };
                i += 1;
            }
            _ => {
                if expect == Expect::Value && b.is_ascii_alphabetic() {
                    let start = i;
                    while i < text.len() && text[i].is_ascii_alphabetic() {
                        i += 1;
                    }
                    // true / false / null: values too (a search for `true` may want them).
                    out.push(Value {
                        path: path.clone(),
                        number: false,
                        pieces: vec![Piece::Text(
                            String::from_utf8_lossy(&text[start..i]).into_owned(),
                        )],
                    });
                    expect = Expect::Next;
                } else {
                    i += 1;
                }
            }
        }
    }
    out
}

/// The pieces of a string value's inner text (between its quotes).
fn decode_pieces(inner: &[u8], var: &mut usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut text: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < inner.len() {
        match inner[i] {
            VAR => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(String::from_utf8_lossy(&text).into_owned()));
                    text.clear();
                }
                pieces.push(Piece::Var(*var));
                *var += 1;
                i += 1;
            }
            b'\\' => {
                let len = escape_len(inner, i);
                unescape(&inner[i..i + len.max(1)], &mut text);
                i += len.max(1);
            }
            b => {
                text.push(b);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(String::from_utf8_lossy(&text).into_owned()));
    }
    pieces
}

/// Appends what one JSON escape sequence stands for. A lone surrogate becomes U+FFFD.
fn unescape(escape: &[u8], out: &mut Vec<u8>) {
    let c = match escape.get(1) {
        Some(b'n') => '\n',
        Some(b't') => '\t',
        Some(b'r') => '\r',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'u') => std::str::from_utf8(&escape[2..])
            .ok()
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .and_then(char::from_u32)
            .unwrap_or('\u{fffd}'),
        Some(&other) => other as char,
        None => '\\',
    };
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Decodes a JSON string's inner text (escapes resolved).
pub fn unescape_str(inner: &[u8]) -> String {
    let mut var = 0;
    let mut out = String::new();
    for piece in decode_pieces(inner, &mut var) {
        if let Piece::Text(t) = piece {
            out.push_str(&t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(text: &str, members: bool) -> (String, Vec<(String, String)>) {
        let mut template = Vec::new();
        let mut vars = Vec::new();
        let mut cutter = Cutter::default();
        cutter.cut(text.as_bytes(), members, &mut template, &mut vars);
        let named = vars
            .iter()
            .map(|v| {
                (
                    cutter.path(v.path).to_string(),
                    text[v.range.clone()].to_string(),
                )
            })
            .collect();
        (
            String::from_utf8(template).unwrap().replace('\u{1}', "·"),
            named,
        )
    }

    #[test]
    fn a_line_splits_into_head_and_rest_and_back() {
        let line = br#"{"id":"01a21af2-0b80-7a74-a3ba-88d4f077a5ad","timestamp":"2026-11-27T03:00:00.000000654Z","level":"info","service":"web\"x","message":"hi"}"#;
        let (head, rest) = split_line(line).unwrap();
        assert_eq!(head.service, br#""web\"x""#);
        assert_eq!(head.level, LogLevel::Info);
        assert_eq!(rest, br#""message":"hi"}"#);
        let mut back = Vec::new();
        write_head(&mut back, &head.id, head.ts, head.level, head.service);
        back.extend_from_slice(rest);
        assert_eq!(back, line);
        // A head not in the canonical form is not taken apart.
        assert!(split_line(br#"{"id":"01a21af2-0b80-7a74-a3ba-88d4f077a5ad","timestamp":"2026-11-27T03:00:00.000000654000Z","level":"info","service":"w","m":1}"#).is_none());
        assert!(split_line(br#"{"level":"info"}"#).is_none());
    }

    #[test]
    fn words_with_digits_and_numbers_become_variables_under_their_path() {
        let (template, vars) = cut(
            r#""message":"user 4711 logged in from 10.0.0.7","context":{"path":"/api/v1/users","status":200,"k":{"pod":"web-7d4b9c5f6-x2k9p"},"ok":true},"tags":["a1","b"]}"#,
            true,
        );
        assert_eq!(
            template,
            r#""message":"user · logged in from ·.·.·.·","context":{"path":"/api/·/users","status":·,"k":{"pod":"web-·-·"},"ok":true},"tags":["·","b"]}"#
        );
        let want: Vec<(String, String)> = [
            ("message", "4711"),
            ("message", "10"),
            ("message", "0"),
            ("message", "0"),
            ("message", "7"),
            ("context.path", "v1"),
            ("context.status", "200"),
            ("context.k.pod", "7d4b9c5f6"),
            ("context.k.pod", "x2k9p"),
            ("tags", "a1"),
        ]
        .iter()
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect();
        assert_eq!(vars, want);
    }

    #[test]
    fn keys_escapes_and_long_words() {
        let (template, vars) = cut(
            r#""a1":"x\n9 \u00e9t\u00e9 caf\u00e9","b":-12.5e3,"c":"abcdefghijklmnopq short"}"#,
            true,
        );
        // Keys keep their digits; escapes stay literal; a number is one variable; a long
        // word is a variable without digits.
        assert_eq!(
            template,
            r#""a1":"x\n· \u00e9t\u00e9 caf\u00e9","b":·,"c":"· short"}"#
        );
        assert_eq!(
            vars,
            vec![
                ("a1".to_string(), "9".to_string()),
                ("b".to_string(), "-12.5e3".to_string()),
                ("c".to_string(), "abcdefghijklmnopq".to_string()),
            ]
        );
    }

    #[test]
    fn template_values_decode_their_text_and_number_their_variables() {
        let mut template = Vec::new();
        let mut vars = Vec::new();
        let text = r#""message":"card\ndeclined 42","context":{"n":7,"s":"x"},"flag":true}"#;
        Cutter::default().cut(text.as_bytes(), true, &mut template, &mut vars);
        let values = values(&template);
        assert_eq!(
            values,
            vec![
                Value {
                    path: "message".into(),
                    number: false,
                    pieces: vec![Piece::Text("card\ndeclined ".into()), Piece::Var(0)]
                },
                Value {
                    path: "context.n".into(),
                    number: true,
                    pieces: vec![Piece::Var(1)]
                },
                Value {
                    path: "context.s".into(),
                    number: false,
                    pieces: vec![Piece::Text("x".into())]
                },
                Value {
                    path: "flag".into(),
                    number: false,
                    pieces: vec![Piece::Text("true".into())]
                },
            ]
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn round_trip(text: &[u8], members: bool) -> Result<(), TestCaseError> {
            let mut template = Vec::new();
            let mut vars = Vec::new();
            Cutter::default().cut(text, members, &mut template, &mut vars);
            let mut back = Vec::new();
            prop_assert!(fill(
                &template,
                |i| vars.get(i).map(|v| &text[v.range.clone()]),
                &mut back
            ));
            prop_assert_eq!(&back, text);
            // Every variable is a whole word with a digit or a long one, or a number.
            for v in &vars {
                prop_assert!(!v.range.is_empty());
            }
            let _ = values(&template);
            Ok(())
        }

        /// JSON of any shape, as the rest of a stored line.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                "\\PC{0,30}".prop_map(serde_json::Value::from),
                "[a-z0-9 ./:-]{0,30}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 40, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..5)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map("[a-z0-9_]{1,8}", inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn any_bytes_round_trip(text in proptest::collection::vec(any::<u8>(), 0..300), members in any::<bool>()) {
                round_trip(&text, members)?;
            }

            #[test]
            fn json_round_trips_and_its_string_values_read_back(value in json()) {
                let text = serde_json::to_string(&serde_json::json!({"message": value.clone(), "x": 1})).unwrap();
                let members = &text.as_bytes()[1..];
                round_trip(members, true)?;
                let mut template = Vec::new();
                let mut vars = Vec::new();
                Cutter::default().cut(members, true, &mut template, &mut vars);
                // Each string value read back from the template equals the original.
                let strings: Vec<String> = values(&template)
                    .into_iter()
                    .filter(|v| !v.number && v.path.starts_with("message"))
                    .map(|v| v.pieces.iter().map(|p| match p {
                        Piece::Text(t) => t.clone(),
                        Piece::Var(i) => String::from_utf8_lossy(&members[vars[*i].range.clone()]).into_owned(),
                    }).collect())
                    .collect();
                let mut expected = Vec::new();
                collect_leaves(&value, &mut expected);
                prop_assert_eq!(strings, expected);
            }
        }

        /// The string (and true/false/null) leaves of a value, in order, as text.
        fn collect_leaves(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::String(s) => out.push(s.clone()),
                serde_json::Value::Bool(b) => out.push(b.to_string()),
                serde_json::Value::Null => out.push("null".into()),
                serde_json::Value::Array(a) => a.iter().for_each(|v| collect_leaves(v, out)),
                serde_json::Value::Object(o) => o.values().for_each(|v| collect_leaves(v, out)),
                serde_json::Value::Number(_) => {}
            }
        }
    }
}
