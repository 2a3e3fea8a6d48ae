//! A log pipeline run on one line: line filters, parsers, label filters and formatting, as
//! Loki runs them (a parsed label that would replace a stream label is added with the suffix
//! `_extracted`; a parser that cannot read the line sets `__error__` and keeps the line).

use std::collections::BTreeMap;

use super::syntax::{
    Function, LabelFilter, LabelFormat, LineFilter, LineOp, NameOrMatcher, Operand, PathStep,
    PatternPart, Stage, Template, TemplatePart, ValueKind, parse_bytes, parse_duration,
};

/// Labels by name.
pub type Labels = BTreeMap<String, String>;

/// The label a stage sets when it cannot read a line, and its detail.
pub const ERROR_LABEL: &str = "__error__";
pub const ERROR_DETAILS_LABEL: &str = "__error_details__";

/// Deepest JSON a parser follows: lines are stored entries (already bounded), this is a
/// second fence.
const MAX_JSON_DEPTH: usize = 64;

/// A line on its way through a pipeline.
#[derive(Debug, Clone)]
pub struct Row {
    pub ts: i64,
    pub line: String,
    pub labels: Labels,
    /// The stream's own label names: a parsed label of the same name gets `_extracted`.
    /// Taken when a pipeline with a parser starts (most lines never meet one).
    stream: Vec<String>,
}

impl Row {
    pub fn new(ts: i64, line: String, labels: Labels) -> Row {
        Row {
            ts,
            line,
            labels,
            stream: Vec::new(),
        }
    }

    fn set_parsed(&mut self, name: &str, value: String) {
        let name = sanitize(name);
        if name.is_empty() {
            return;
        }
        if self.stream.contains(&name) {
            self.labels.insert(format!("{name}_extracted"), value);
        } else {
            self.labels.insert(name, value);
        }
    }

    fn set_error(&mut self, kind: &str, details: String) {
        if self.labels.contains_key(ERROR_LABEL) {
            return;
        }
        self.labels.insert(ERROR_LABEL.into(), kind.into());
        self.labels.insert(ERROR_DETAILS_LABEL.into(), details);
    }

    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A label name as Loki makes it from a key: anything but letters, digits and `_` becomes `_`.
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Runs `stages` on `row`; `false` when a stage drops the line.
pub fn run(stages: &[Stage], row: &mut Row) -> bool {
    let parses = stages.iter().any(|stage| {
        matches!(
            stage,
            Stage::Json(_)
                | Stage::Logfmt { .. }
                | Stage::Regexp(_)
                | Stage::Pattern(_)
                | Stage::Unpack
        )
    });
    if parses && row.stream.is_empty() {
        row.stream = row.labels.keys().cloned().collect();
    }
    stages.iter().all(|stage| run_stage(stage, row))
}

fn run_stage(stage: &Stage, row: &mut Row) -> bool {
    match stage {
        Stage::Line(filter) => line_passes(filter, &row.line),
        Stage::Json(params) => {
            json(params, row);
            true
        }
        Stage::Logfmt {
            strict,
            keep_empty,
            params,
        } => {
            logfmt(*strict, *keep_empty, params, row);
            true
        }
        Stage::Regexp(regex) => {
            let line = std::mem::take(&mut row.line);
            if let Some(captures) = regex.captures(&line) {
                for name in regex.capture_names().flatten() {
                    if let Some(m) = captures.name(name) {
                        row.set_parsed(name, m.as_str().to_string());
                    }
                }
            }
            row.line = line;
            true
        }
        Stage::Pattern(parts) => {
            let line = std::mem::take(&mut row.line);
            if let Some(found) = pattern_match(parts, &line) {
                for (name, value) in found {
                    row.set_parsed(name, value.to_string());
                }
            }
            row.line = line;
            true
        }
        Stage::Unpack => {
            unpack(row);
            true
        }
        Stage::Labels(filter) => label_filter(filter, row),
        Stage::LineFormat(template) => {
            match render(template, row) {
                Some(line) => row.line = line,
                None => row.set_error("TemplateFormatErr", too_long()),
            }
            true
        }
        Stage::LabelFormat(assignments) => {
            for (name, format) in assignments {
                match format {
                    LabelFormat::Rename(from) => {
                        if let Some(value) = row.labels.remove(from) {
                            row.labels.insert(name.clone(), value);
                        }
                    }
                    LabelFormat::Template(template) => match render(template, row) {
                        Some(value) => {
                            row.labels.insert(name.clone(), value);
                        }
                        None => row.set_error("TemplateFormatErr", too_long()),
                    },
                }
            }
            true
        }
        Stage::Drop(names) => {
            row.labels.retain(|name, value| {
                !names.iter().any(|n| match n {
                    NameOrMatcher::Name(dropped) => dropped == name,
                    NameOrMatcher::Matcher(m) => m.name == *name && m.matches(value),
                })
            });
            true
        }
        Stage::Keep(names) => {
            row.labels.retain(|name, value| {
                names.iter().any(|n| match n {
                    NameOrMatcher::Name(kept) => kept == name,
                    NameOrMatcher::Matcher(m) => m.name == *name && m.matches(value),
                })
            });
            true
        }
        Stage::Decolorize => {
            row.line = decolorize(&row.line);
            true
        }
    }
}

/// Whether a line passes a line filter.
pub fn line_passes(filter: &LineFilter, line: &str) -> bool {
    match filter.op {
        LineOp::Contains => filter.texts.iter().any(|t| line.contains(t.as_str())),
        LineOp::NotContains => !filter.texts.iter().any(|t| line.contains(t.as_str())),
        LineOp::Matches => filter.regexes.iter().any(|r| r.is_match(line)),
        LineOp::NotMatches => !filter.regexes.iter().any(|r| r.is_match(line)),
    }
}

/// Runs a label filter; `false` drops the line.
pub fn label_filter(filter: &LabelFilter, row: &mut Row) -> bool {
    match filter {
        LabelFilter::And(a, b) => label_filter(a, row) && label_filter(b, row),
        LabelFilter::Or(a, b) => label_filter(a, row) || label_filter(b, row),
        LabelFilter::Text(m) => m.matches(row.label(&m.name)),
        LabelFilter::Compare {
            name,
            op,
            kind,
            value,
        } => {
            let Some(text) = row.labels.get(name) else {
                return false;
            };
            match convert(text, *kind) {
                Some(v) => op.holds(v, *value),
                None => {
                    let details = format!("cannot read {name}={text:?} as a {}", kind_name(*kind));
                    row.set_error("LabelFilterErr", details);
                    true
                }
            }
        }
    }
}

fn kind_name(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::Number => "number",
        ValueKind::Duration => "duration",
        ValueKind::Bytes => "byte size",
    }
}

/// A label's value as a number: itself, a duration in seconds, or bytes.
pub fn convert(text: &str, kind: ValueKind) -> Option<f64> {
    let text = text.trim();
    match kind {
        ValueKind::Number => text.parse::<f64>().ok().filter(|v| !v.is_nan()),
        ValueKind::Duration => parse_duration(text)
            .map(|ns| ns as f64 / 1e9)
            .or_else(|| text.parse::<f64>().ok()),
        ValueKind::Bytes => parse_bytes(text),
    }
}

fn json(params: &[(String, Vec<PathStep>)], row: &mut Row) {
    let value: serde_json::Value = match serde_json::from_str(&row.line) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => {
            row.set_error("JSONParserErr", "the line is not a JSON object".into());
            return;
        }
        Err(e) => {
            row.set_error("JSONParserErr", e.to_string());
            return;
        }
    };
    if params.is_empty() {
        flatten(&value, &mut String::new(), row, 0);
        return;
    }
    for (name, path) in params {
        let mut at = Some(&value);
        for step in path {
            at = match (step, at) {
                (PathStep::Key(k), Some(serde_json::Value::Object(o))) => o.get(k),
                (PathStep::Index(i), Some(serde_json::Value::Array(a))) => a.get(*i),
                _ => None,
            };
        }
        let text = match at {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        row.set_parsed(name, text);
    }
}

fn flatten(value: &serde_json::Value, prefix: &mut String, row: &mut Row, depth: usize) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    if depth > MAX_JSON_DEPTH {
        return;
    }
    for (key, value) in map {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('_');
        }
        prefix.push_str(key);
        match value {
            serde_json::Value::Object(_) => flatten(value, prefix, row, depth + 1),
            // Arrays are left out, as Loki's parser does; `| json name="a[0]"` reaches them.
            serde_json::Value::Array(_) => {}
            serde_json::Value::Null => row.set_parsed(prefix, String::new()),
            serde_json::Value::String(s) => row.set_parsed(prefix, s.clone()),
            other => row.set_parsed(prefix, other.to_string()),
        }
        prefix.truncate(len);
    }
}

fn logfmt(strict: bool, keep_empty: bool, params: &[(String, String)], row: &mut Row) {
    let line = std::mem::take(&mut row.line);
    let pairs = match logfmt_pairs(&line) {
        Ok(pairs) => pairs,
        Err((pairs, error)) => {
            if strict {
                row.set_error("LogfmtParserErr", error);
                row.line = line;
                return;
            }
            pairs
        }
    };
    if params.is_empty() {
        for (key, value) in pairs {
            if value.is_empty() && !keep_empty {
                continue;
            }
            row.set_parsed(key, value);
        }
    } else {
        for (name, key) in params {
            if let Some((_, value)) = pairs.iter().rev().find(|(k, _)| *k == key.as_str()) {
                row.set_parsed(name, value.clone());
            }
        }
    }
    row.line = line;
}

type Pairs<'a> = Vec<(&'a str, String)>;

/// `key=value key2="quoted value" flag` pairs; on malformed input, what was read and why not.
fn logfmt_pairs(line: &str) -> Result<Pairs<'_>, (Pairs<'_>, String)> {
    let bytes = line.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            if bytes[i] == b'"' {
                return Err((pairs, format!("unexpected '\"' at {i}")));
            }
            i += 1;
        }
        if start == i {
            if i < bytes.len() && bytes[i] == b'=' {
                return Err((pairs, format!("unexpected '=' at {i}")));
            }
            continue;
        }
        let key = &line[start..i];
        if i >= bytes.len() || bytes[i] != b'=' {
            pairs.push((key, String::new()));
            continue;
        }
        i += 1;
        if i < bytes.len() && bytes[i] == b'"' {
            let mut value = String::new();
            i += 1;
            let mut closed = false;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if i + 1 < bytes.len() => {
                        let c = bytes[i + 1];
                        value.push(match c {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            _ => c as char,
                        });
                        i += 2;
                    }
                    b'"' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    _ => {
                        let ch_len = utf8_len(bytes[i]);
                        value.push_str(&line[i..(i + ch_len).min(line.len())]);
                        i += ch_len;
                    }
                }
            }
            if !closed {
                return Err((pairs, format!("unterminated quoted value for {key}")));
            }
            pairs.push((key, value));
        } else {
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            pairs.push((key, line[start..i].to_string()));
        }
    }
    Ok(pairs)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0.. => 4,
        0xe0.. => 3,
        0xc0.. => 2,
        _ => 1,
    }
}

/// The captures of a `| pattern`, or `None` when the line does not follow it.
pub fn pattern_match<'a>(
    parts: &'a [PatternPart],
    line: &'a str,
) -> Option<Vec<(&'a str, &'a str)>> {
    let mut out = Vec::new();
    let mut rest = line;
    let mut i = 0;
    while i < parts.len() {
        match &parts[i] {
            PatternPart::Literal(text) => {
                rest = rest.strip_prefix(text.as_str())?;
                i += 1;
            }
            PatternPart::Capture(name) => {
                let (value, after) = match parts.get(i + 1) {
                    Some(PatternPart::Literal(next)) => {
                        let at = rest.find(next.as_str())?;
                        (&rest[..at], &rest[at..])
                    }
                    _ => (rest, ""),
                };
                if let Some(name) = name {
                    out.push((name.as_str(), value));
                }
                rest = after;
                i += 1;
            }
        }
    }
    Some(out)
}

fn unpack(row: &mut Row) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&row.line)
    else {
        row.set_error(
            "JSONParserErr",
            "the line is not a packed JSON object".into(),
        );
        return;
    };
    for (key, value) in map {
        let serde_json::Value::String(text) = value else {
            continue;
        };
        if key == "_entry" {
            row.line = text;
        } else {
            row.set_parsed(&key, text);
        }
    }
}

/// The longest text a template may render: a short query repeating a long label must not
/// make a line of gigabytes.
pub const MAX_RENDERED: usize = 1 << 20;

fn too_long() -> String {
    format!("the template renders more than {MAX_RENDERED} bytes")
}

/// Renders a template against a row's labels and line; `None` past [`MAX_RENDERED`].
pub fn render(template: &Template, row: &Row) -> Option<String> {
    let mut out = String::new();
    for part in &template.0 {
        match part {
            TemplatePart::Text(t) => out.push_str(t),
            TemplatePart::Action(operand, pipes) => {
                let mut value = operand_value(operand, row)?;
                for (function, args) in pipes {
                    value = apply(*function, args, value)?;
                }
                out.push_str(&value);
            }
        }
        if out.len() > MAX_RENDERED {
            return None;
        }
    }
    Some(out)
}

fn operand_value(operand: &Operand, row: &Row) -> Option<String> {
    match operand {
        Operand::Label(name) => Some(row.label(name).to_string()),
        Operand::Line => Some(row.line.clone()),
        Operand::Text(t) => Some(t.clone()),
        Operand::Call(function, args, value) => apply(*function, args, operand_value(value, row)?),
    }
}

/// A template function's result; `None` where it would pass [`MAX_RENDERED`].
fn apply(function: Function, args: &[String], value: String) -> Option<String> {
    if function == Function::Replace {
        let (old, new) = (
            args.first().map_or("", String::as_str),
            args.get(1).map_or("", String::as_str),
        );
        let times = if old.is_empty() {
            value.chars().count() + 1
        } else {
            value.matches(old).count()
        };
        if value.len().saturating_add(times.saturating_mul(new.len())) > MAX_RENDERED {
            return None;
        }
    }
    let out = applied(function, args, value);
    (out.len() <= MAX_RENDERED).then_some(out)
}

fn applied(function: Function, args: &[String], value: String) -> String {
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    let number = |i: usize| arg(i).parse::<f64>().map_or(0, |n| n as i64);
    match function {
        Function::Lower => value.to_lowercase(),
        Function::Upper => value.to_uppercase(),
        Function::Title => {
            let mut out = String::with_capacity(value.len());
            let mut start = true;
            for c in value.chars() {
                if start {
                    out.extend(c.to_uppercase());
                } else {
                    out.push(c);
                }
                start = !c.is_alphanumeric();
            }
            out
        }
        Function::TrimSpace => value.trim().to_string(),
        Function::Trim => value.trim_matches(|c| arg(0).contains(c)).to_string(),
        Function::TrimPrefix => value.strip_prefix(arg(0)).unwrap_or(&value).to_string(),
        Function::TrimSuffix => value.strip_suffix(arg(0)).unwrap_or(&value).to_string(),
        Function::Replace => value.replace(arg(0), arg(1)),
        Function::Default => {
            if value.is_empty() {
                arg(0).to_string()
            } else {
                value
            }
        }
        Function::Substr => {
            let chars: Vec<char> = value.chars().collect();
            let len = chars.len() as i64;
            let (start, end) = (number(0), number(1));
            let start = start.clamp(0, len);
            let end = if end < 0 || end > len { len } else { end };
            if start >= end {
                String::new()
            } else {
                chars[start as usize..end as usize].iter().collect()
            }
        }
        Function::Trunc => {
            let n = number(0);
            let chars: Vec<char> = value.chars().collect();
            let len = chars.len() as i64;
            if n >= 0 {
                chars[..n.min(len) as usize].iter().collect()
            } else {
                chars[(len + n).max(0) as usize..].iter().collect()
            }
        }
    }
}

/// The line without ANSI colour and cursor escapes.
pub fn decolorize(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            while let Some(&n) = chars.peek() {
                chars.next();
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logql::syntax::{Expr, parse};

    fn stages(query: &str) -> Vec<Stage> {
        match parse(query).unwrap() {
            Expr::Log(log) => log.stages,
            Expr::Metric(_) => panic!("a log query"),
        }
    }

    fn row(line: &str) -> Row {
        let labels: Labels = [("app".to_string(), "web".to_string())].into();
        Row::new(0, line.to_string(), labels)
    }

    #[test]
    fn parsers_name_labels_as_loki_does() {
        let mut r = row(r#"{"app":"x","a":{"b-c":1,"d":[1]},"n":null}"#);
        assert!(run(&stages(r#"{app="web"} | json"#), &mut r));
        assert_eq!(r.labels["app_extracted"], "x");
        assert_eq!(r.labels["a_b_c"], "1");
        assert!(!r.labels.contains_key("a_d"));
        assert_eq!(r.labels["n"], "");

        let mut r = row(r#"level=info msg="a \"quoted\" text" empty= flag"#);
        assert!(run(&stages(r#"{app="web"} | logfmt"#), &mut r));
        assert_eq!(r.labels["msg"], r#"a "quoted" text"#);
        assert!(!r.labels.contains_key("empty"));
        let mut r = row(r#"level=info msg="unterminated"#);
        assert!(run(&stages(r#"{app="web"} | logfmt --strict"#), &mut r));
        assert_eq!(r.labels[ERROR_LABEL], "LogfmtParserErr");

        let mut r = row("GET /api/v1/items 200 12ms");
        assert!(run(
            &stages(r#"{app="web"} | pattern "<method> <path> <status> <_>" | status=200"#),
            &mut r
        ));
        assert_eq!(
            (r.labels["method"].as_str(), r.labels["path"].as_str()),
            ("GET", "/api/v1/items")
        );
        assert!(!run(
            &stages(r#"{app="web"} | pattern "<method> <path> <status> <_>" | status>200"#),
            &mut row("GET / 200 1ms")
        ));
    }

    #[test]
    fn a_filter_on_an_unreadable_number_marks_the_line_and_keeps_it() {
        let mut r = row(r#"{"status":"teapot"}"#);
        assert!(run(&stages(r#"{app="web"} | json | status > 400"#), &mut r));
        assert_eq!(r.labels[ERROR_LABEL], "LabelFilterErr");
        assert!(!run(
            &stages(r#"{app="web"} | json | missing > 400"#),
            &mut row("{}")
        ));
    }

    #[test]
    fn templates_cannot_render_a_line_past_the_bound() {
        let big = "x".repeat(MAX_RENDERED / 2);
        let mut r = row(&big);
        assert!(run(
            &stages(r#"{app="web"} | line_format "{{__line__}}{{__line__}}{{__line__}}""#),
            &mut r
        ));
        assert_eq!(r.labels[ERROR_LABEL], "TemplateFormatErr");
        assert_eq!(r.line.len(), big.len());
        let mut r = row(&"y".repeat(1000));
        let query = format!(
            r#"{{app="web"}} | line_format `{{{{ __line__ | replace "" "{}" }}}}`"#,
            "z".repeat(2000)
        );
        assert!(run(&stages(&query), &mut r));
        assert_eq!(r.labels[ERROR_LABEL], "TemplateFormatErr");
        assert_eq!(decolorize("\u{1b}[1;31mred\u{1b}[0m plain"), "red plain");
    }
}
