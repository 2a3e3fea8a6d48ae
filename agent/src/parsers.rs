//! Parsers an operator defines for what no built-in rule knows (`agent_parsers` in the YAML,
//! `AGENT_PARSERS` as JSON): each selects files by Kubernetes namespace, pod and container (or
//! by path, outside Kubernetes) and reads their lines with a built-in format or a regular
//! expression with named groups. The first parser that selects a file is tried before the
//! built-in rules; a line it does not match goes to the built-in rules as usual.

use std::path::Path;
use std::sync::Arc;

use logging_common::Timestamp;
use logging_common::detect::{detect_level, level_name};
use logging_common::parse::{FORMAT_NAMES, Format, Parsed, parse_as};
use serde::{Deserialize, Serialize};
use time::format_description::{Component, OwnedFormatItem, modifier};

use crate::config::InvalidSetting;
use crate::kubernetes::PodInfo;

/// One parser as configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParserConfig {
    /// Names the parser in errors and in `logging_agent_parser_misses_total`.
    pub name: String,
    /// Globs on the pod's namespace, name and container; every one given must match.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// A glob on the file's path (for files outside `/var/log/pods`).
    pub path: Option<String>,
    /// A built-in format: json, logfmt, access_log (nginx, apache), text.
    pub format: Option<String>,
    /// A regular expression whose named groups are the entry's fields: `level`, `timestamp`,
    /// `message`, the ids (`trace_id`, `request_id`, …), and any other name into `context`.
    pub regex: Option<String>,
    /// How the `timestamp` group is written, strftime-style (`%Y-%m-%d %H:%M:%S,%3f`, `%z`
    /// for an offset, UTC without one, this year without `%Y`); RFC 3339 and epoch numbers
    /// are read when unset.
    pub timestamp_format: Option<String>,
}

/// The parsers, compiled.
#[derive(Debug, Default)]
pub struct Parsers(Vec<Arc<UserParser>>);

#[derive(Debug)]
pub struct UserParser {
    pub name: String,
    namespace: Option<glob::Pattern>,
    pod: Option<glob::Pattern>,
    container: Option<glob::Pattern>,
    path: Option<glob::Pattern>,
    read: Read,
}

#[derive(Debug)]
enum Read {
    Format(Format),
    Regex {
        regex: regex::Regex,
        time: Option<OwnedFormatItem>,
    },
}

impl Parsers {
    /// Compiles the configured parsers; the error names the parser and what is wrong.
    pub fn new(configs: &[ParserConfig]) -> Result<Parsers, InvalidSetting> {
        configs
            .iter()
            .enumerate()
            .map(|(i, config)| UserParser::new(i, config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map(Parsers)
    }

    /// The parser for a file, if one selects it.
    pub fn select(&self, path: &Path, pod: Option<&PodInfo>) -> Option<Arc<UserParser>> {
        self.0.iter().find(|p| p.selects(path, pod)).cloned()
    }
}

impl UserParser {
    fn new(index: usize, config: &ParserConfig) -> Result<UserParser, InvalidSetting> {
        let name = if config.name.is_empty() {
            format!("#{}", index + 1)
        } else {
            config.name.clone()
        };
        let invalid = |reason: String| InvalidSetting {
            name: "AGENT_PARSERS",
            reason: format!("parser {name:?}: {reason}"),
        };
        let glob = |field: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(glob::Pattern::new)
                .transpose()
                .map_err(|e| invalid(format!("{field}: {e}")))
        };
        let read = match (&config.format, &config.regex) {
            (Some(format), None) => Read::Format(Format::from_name(format).ok_or_else(|| {
                invalid(format!(
                    "format: unknown format {format:?}; expected one of {FORMAT_NAMES}"
                ))
            })?),
            (None, Some(regex)) => {
                let regex = regex::Regex::new(regex).map_err(|e| invalid(format!("regex: {e}")))?;
                if regex.capture_names().flatten().next().is_none() {
                    return Err(invalid(
                        "regex: has no named group; name at least one, e.g. (?P<level>\\w+)".into(),
                    ));
                }
                let time = config
                    .timestamp_format
                    .as_deref()
                    .map(strftime)
                    .transpose()
                    .map_err(|e| invalid(format!("timestamp_format: {e}")))?;
                Read::Regex { regex, time }
            }
            _ => return Err(invalid("give either format or regex".into())),
        };
        if config.timestamp_format.is_some() && config.regex.is_none() {
            return Err(invalid(
                "timestamp_format: only a regex's timestamp group uses it".into(),
            ));
        }
        Ok(UserParser {
            namespace: glob("namespace", &config.namespace)?,
            pod: glob("pod", &config.pod)?,
            container: glob("container", &config.container)?,
            path: glob("path", &config.path)?,
            name,
            read,
        })
    }

    fn selects(&self, path: &Path, pod: Option<&PodInfo>) -> bool {
        let matches = |pattern: &Option<glob::Pattern>, value: Option<&str>| match pattern {
            None => true,
            Some(pattern) => value.is_some_and(|v| pattern.matches(v)),
        };
        matches(&self.path, path.to_str())
            && matches(&self.namespace, pod.map(|p| p.namespace.as_str()))
            && matches(&self.pod, pod.map(|p| p.pod.as_str()))
            && matches(&self.container, pod.map(|p| p.container.as_str()))
    }

    /// The body's fields, or `None` when the body is not in this parser's format.
    pub fn parse(&self, body: &str) -> Option<Parsed> {
        let (regex, time) = match &self.read {
            Read::Format(format) => return parse_as(*format, body),
            Read::Regex { regex, time } => (regex, time),
        };
        let captures = regex.captures(body)?;
        let mut message = None;
        let mut level = None;
        let mut timestamp = None;
        let mut pairs = Vec::new();
        for (name, value) in regex
            .capture_names()
            .zip(captures.iter())
            .filter_map(|(name, value)| Some((name?, value?.as_str())))
        {
            match name {
                "message" => message = Some(value),
                "level" if level_name(value).is_some() => level = level_name(value),
                "timestamp" => match parse_time(time.as_ref(), value) {
                    Some(ts) => timestamp = Some(ts),
                    None => pairs.push((name, value)),
                },
                _ => pairs.push((name, value)),
            }
        }
        let mut parsed = Parsed::from_pairs(pairs);
        parsed.level = level
            .or(parsed.level)
            .or_else(|| detect_level(message.unwrap_or(body)));
        parsed.timestamp = timestamp.or(parsed.timestamp);
        parsed.message = message.map(str::to_string);
        Some(parsed)
    }
}

/// A strftime-style format as the `time` crate reads it, with chrono's fractional seconds
/// (`%f`, `%3f`, `%6f`, `%9f`, and `%.f`, `%.3f`… with their dot) added.
fn strftime(format: &str) -> Result<OwnedFormatItem, String> {
    let mut items = Vec::new();
    let mut rest = format;
    let mut literal = String::new();
    while let Some(i) = rest.find('%') {
        let spec = &rest[i + 1..];
        let fraction = spec.strip_prefix('.').map_or((false, spec), |s| (true, s));
        let digits = fraction.1.starts_with(['3', '6', '9']) as usize;
        if fraction.1[digits..].starts_with('f') {
            literal.push_str(&rest[..i]);
            if fraction.0 {
                literal.push('.');
            }
            push_strftime(&mut items, &literal)?;
            literal.clear();
            items.push(OwnedFormatItem::Component(Component::Subsecond(
                modifier::Subsecond::default(),
            )));
            rest = &fraction.1[digits + 1..];
        } else {
            // Any other specifier (or `%%`) is the time crate's to read.
            let end = i + 1 + spec.chars().next().map_or(0, char::len_utf8);
            literal.push_str(&rest[..end]);
            rest = &rest[end..];
        }
    }
    literal.push_str(rest);
    push_strftime(&mut items, &literal)?;
    Ok(OwnedFormatItem::Compound(items.into_boxed_slice()))
}

fn push_strftime(items: &mut Vec<OwnedFormatItem>, part: &str) -> Result<(), String> {
    if !part.is_empty() {
        let item = time::format_description::parse_strftime_owned(part)
            .map_err(|e| format!("{part:?}: {e}"))?;
        items.push(item);
    }
    Ok(())
}

fn parse_time(format: Option<&OwnedFormatItem>, text: &str) -> Option<Timestamp> {
    let Some(format) = format else {
        return Timestamp::parse(text).ok();
    };
    let mut parsed = time::parsing::Parsed::new();
    let rest = parsed.parse_item(text.as_bytes(), format).ok()?;
    if !rest.is_empty() {
        return None;
    }
    if parsed.year().is_none() && parsed.unix_timestamp_nanos().is_none() {
        parsed = parsed.with_year(time::OffsetDateTime::now_utc().year())?;
    }
    let nanos = if parsed.offset_hour().is_some() || parsed.unix_timestamp_nanos().is_some() {
        time::OffsetDateTime::try_from(parsed)
            .ok()?
            .unix_timestamp_nanos()
    } else {
        time::UtcDateTime::try_from(parsed)
            .ok()?
            .unix_timestamp_nanos()
    };
    i64::try_from(nanos).ok().map(Timestamp::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use logging_common::LogLevel;

    fn parser(config: ParserConfig) -> UserParser {
        UserParser::new(0, &config).unwrap()
    }

    fn pod(namespace: &str, pod: &str, container: &str) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: "uid".into(),
            container: container.into(),
            restart_count: 0,
        }
    }

    #[test]
    fn a_regex_parser_lifts_level_time_message_ids_and_context() {
        let p = parser(ParserConfig {
            name: "billing".into(),
            regex: Some(
                r"^(?P<timestamp>\S+ \S+) \[(?P<thread>[^\]]+)\] <(?P<level>\w+)> (?P<trace_id>[0-9a-f]+) took=(?P<took>\d+) (?P<message>.*)$".into(),
            ),
            timestamp_format: Some("%Y-%m-%d %H:%M:%S,%3f".into()),
            ..Default::default()
        });
        let parsed = p
            .parse(
                "2026-12-01 12:00:00,250 [worker-3] <Severe> 4bf92f35 took=812 invoice 77 failed",
            )
            .unwrap();
        // java.util.logging's name for an error.
        assert_eq!(parsed.level, Some(LogLevel::Error));
        assert_eq!(parsed.message.as_deref(), Some("invoice 77 failed"));
        assert_eq!(
            parsed.timestamp.unwrap().to_rfc3339(),
            "2026-12-01T12:00:00.250Z"
        );
        assert_eq!(parsed.trace_id.as_deref(), Some("4bf92f35"));
        assert_eq!(
            parsed.context,
            vec![
                ("thread".to_string(), "\"worker-3\"".to_string()),
                ("took".to_string(), "812".to_string()),
            ]
        );
        let parsed = p
            .parse("2026-12-01 12:00:00,250 [main] <WARN> ab took=1 slow")
            .unwrap();
        assert_eq!(parsed.level, Some(LogLevel::Warning));
        // A level the table does not know stays in the context; the message's own words
        // decide the level.
        let parsed = p
            .parse("2026-12-01 12:00:00,250 [main] <LOUD> ab took=1 FATAL: disk gone")
            .unwrap();
        assert_eq!(parsed.level, Some(LogLevel::Critical));
        assert!(
            parsed
                .context
                .contains(&("level".to_string(), "\"LOUD\"".to_string()))
        );
        // A line the regex does not match is left to the built-in rules.
        assert!(p.parse("ERROR something else").is_none());
    }

    #[test]
    fn timestamp_formats_read_offsets_missing_years_and_epochs() {
        let at = |format: &str, text: &str| {
            parse_time(Some(&strftime(format).unwrap()), text).map(|t| t.to_rfc3339())
        };
        assert_eq!(
            at("%d/%b/%Y:%H:%M:%S %z", "01/Dec/2026:12:00:00 +0100").as_deref(),
            Some("2026-12-01T11:00:00Z")
        );
        assert_eq!(
            at("%Y-%m-%dT%H:%M:%S%.6f", "2026-12-01T12:00:00.123456").as_deref(),
            Some("2026-12-01T12:00:00.123456Z")
        );
        let year = time::OffsetDateTime::now_utc().year();
        assert_eq!(
            at("%b %e %H:%M:%S", "Dec  1 12:00:00"),
            Some(format!("{year}-12-01T12:00:00Z"))
        );
        assert_eq!(
            at("%s", "1764590400").as_deref(),
            Some("2025-12-01T12:00:00Z")
        );
        assert_eq!(at("%Y-%m-%d", "yesterday"), None);
        // Without a format, RFC 3339 and epoch numbers.
        assert!(parse_time(None, "2026-12-01T12:00:00Z").is_some());
    }

    #[test]
    fn a_format_parser_reads_only_its_format() {
        let p = parser(ParserConfig {
            name: "gw".into(),
            format: Some("logfmt".into()),
            ..Default::default()
        });
        let parsed = p.parse("level=warn msg=slow path=/x").unwrap();
        assert_eq!(parsed.level, Some(LogLevel::Warning));
        assert!(p.parse("{\"level\":\"warn\"}").is_none());
        let text = parser(ParserConfig {
            format: Some("text".into()),
            ..Default::default()
        });
        // As text, a logfmt-looking line is not split into fields.
        let parsed = text.parse("ERROR a=1 b=2").unwrap();
        assert_eq!(parsed.level, Some(LogLevel::Error));
        assert!(parsed.context.is_empty());
    }

    #[test]
    fn parsers_select_files_by_namespace_pod_container_and_path() {
        let parsers = Parsers::new(&[
            ParserConfig {
                name: "shop-api".into(),
                namespace: Some("shop".into()),
                pod: Some("api-*".into()),
                container: Some("app".into()),
                format: Some("json".into()),
                ..Default::default()
            },
            ParserConfig {
                name: "legacy".into(),
                path: Some("/var/log/legacy/*.log".into()),
                format: Some("text".into()),
                ..Default::default()
            },
        ])
        .unwrap();
        let file = Path::new("/var/log/pods/x/app/0.log");
        let name =
            |path: &Path, pod: Option<&PodInfo>| parsers.select(path, pod).map(|p| p.name.clone());
        assert_eq!(
            name(file, Some(&pod("shop", "api-7d4b9c5f6-x2k9p", "app"))),
            Some("shop-api".into())
        );
        assert_eq!(
            name(file, Some(&pod("shop", "web-7d4b9c5f6-x2k9p", "app"))),
            None
        );
        assert_eq!(name(file, Some(&pod("shop", "api-1", "sidecar"))), None);
        assert_eq!(name(file, None), None);
        assert_eq!(
            name(Path::new("/var/log/legacy/app.log"), None),
            Some("legacy".into())
        );
    }

    #[test]
    fn a_bad_parser_is_refused_naming_it_and_the_field() {
        let refused = |config: ParserConfig| Parsers::new(&[config]).unwrap_err().to_string();
        let error = refused(ParserConfig {
            name: "billing".into(),
            regex: Some("(?P<level>[".into()),
            ..Default::default()
        });
        assert!(
            error.starts_with("AGENT_PARSERS: parser \"billing\": regex:"),
            "{error}"
        );
        let error = refused(ParserConfig {
            name: "x".into(),
            format: Some("xml".into()),
            ..Default::default()
        });
        assert!(
            error.contains("parser \"x\": format: unknown format \"xml\""),
            "{error}"
        );
        let error = refused(ParserConfig {
            name: "t".into(),
            regex: Some("(?P<timestamp>.*)".into()),
            timestamp_format: Some("%Y-%Q".into()),
            ..Default::default()
        });
        assert!(error.contains("parser \"t\": timestamp_format:"), "{error}");
        let error = refused(ParserConfig {
            name: "both".into(),
            regex: Some("(?P<level>x)".into()),
            format: Some("json".into()),
            ..Default::default()
        });
        assert!(error.contains("give either format or regex"), "{error}");
        let error = refused(ParserConfig {
            name: "g".into(),
            pod: Some("[".into()),
            format: Some("json".into()),
            ..Default::default()
        });
        assert!(error.contains("parser \"g\": pod:"), "{error}");
        let error = refused(ParserConfig {
            regex: Some("plain".into()),
            ..Default::default()
        });
        assert!(
            error.contains("parser \"#1\": regex: has no named group"),
            "{error}"
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_timestamp_format_and_text_is_read_without_panicking(
                format in "[%a-zA-Z0-9 :.,+-]{0,24}",
                text in "\\PC{0,40}",
            ) {
                if let Ok(format) = strftime(&format) {
                    let _ = parse_time(Some(&format), &text);
                }
            }
        }
    }
}
