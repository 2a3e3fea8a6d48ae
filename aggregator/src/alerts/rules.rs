//! Alert rules: which entries to watch, what to compute over a sliding window, and when that
//! is worth an alert. Rules come from the configuration (`alert_rules`) and from the API; both
//! are validated here, with errors that name the field.

use std::collections::BTreeMap;
use std::fmt;

use logging_common::{AlertSeverity, LogLevel, Timestamp};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

use super::text::TextQuery;

/// The longest window and `for` a rule may ask for.
pub const MAX_WINDOW_SECONDS: u64 = 24 * 3600;

/// A duration in whole seconds, written `300`, `"300s"`, `"5m"`, `"2h"` or `"1d"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub u64);

impl Seconds {
    pub fn nanos(self) -> i64 {
        i64::try_from(self.0)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000_000)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            s if s > 0 && s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            s if s > 0 && s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s > 0 && s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;
        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration: seconds, or a number with s, m, h or d (\"5m\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(Seconds)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                let v = v.trim();
                let (number, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
                    Some(i) => v.split_at(i),
                    None => (v, "s"),
                };
                let n: u64 = number
                    .parse()
                    .map_err(|_| E::custom(format!("{v:?} is not a duration like \"5m\"")))?;
                let factor = match unit {
                    "s" => 1,
                    "m" => 60,
                    "h" => 3600,
                    "d" => 86_400,
                    _ => return Err(E::custom(format!("{v:?}: the unit must be s, m, h or d"))),
                };
                Ok(Seconds(n.saturating_mul(factor)))
            }
        }
        deserializer.deserialize_any(SecondsVisitor)
    }
}

/// What a rule computes over its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// How many entries match.
    Count,
    /// Errors (level error or worse) / all matching entries.
    ErrorRate,
    /// An aggregation of a numeric context field.
    Numeric,
    /// No matching entry for the whole window.
    Absence,
}

/// How a value is compared with the threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    #[default]
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = "==")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
}

impl Comparison {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::AtLeast => value >= threshold,
            Comparison::Below => value < threshold,
            Comparison::AtMost => value <= threshold,
            Comparison::Equal => value == threshold,
            Comparison::NotEqual => value != threshold,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::AtLeast => ">=",
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
            Comparison::Equal => "==",
            Comparison::NotEqual => "!=",
        }
    }
}

/// How a numeric field is summarised over the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Avg,
    Max,
    P95,
    P99,
}

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Avg => "avg",
            Aggregation::Max => "max",
            Aggregation::P95 => "p95",
            Aggregation::P99 => "p99",
        }
    }

    pub fn quantile(self) -> Option<f64> {
        match self {
            Aggregation::P95 => Some(0.95),
            Aggregation::P99 => Some(0.99),
            Aggregation::Avg | Aggregation::Max => None,
        }
    }
}

/// A condition on one context field (`context.<name>`, dots for nesting).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldPredicate {
    pub name: String,
    #[serde(default)]
    pub op: Comparison,
    /// A number (compared numerically) or a string (`==` / `!=` only).
    pub value: Value,
}

/// Which entries a rule looks at. Every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Exactly this level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// This level or more severe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_level: Option<LogLevel>,
    /// Full text over the message: terms, "phrases", OR, NOT / `-term`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<FieldPredicate>,
}

fn default_severity() -> AlertSeverity {
    AlertSeverity::Warning
}

fn yes() -> bool {
    true
}

/// A rule as written by an operator (YAML or JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub kind: RuleKind,
    #[serde(default)]
    pub filter: Filter,
    pub window: Seconds,
    /// Not used by `absence`.
    #[serde(default)]
    pub threshold: f64,
    #[serde(default)]
    pub op: Comparison,
    /// `error_rate`: fewer entries than this in the window never alert.
    #[serde(default)]
    pub min_volume: u64,
    /// `numeric`: the context field (dots for nesting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `numeric`: avg, max, p95 or p99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<Aggregation>,
    /// One alert per distinct value of these: `service`, `level`, `namespace`, `pod`,
    /// `container`, `node`, or `context.<field>`.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// How long the condition must hold before the alert fires.
    #[serde(default, rename = "for")]
    pub for_: Seconds,
    #[serde(default = "default_severity")]
    pub severity: AlertSeverity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// Where a group-by value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupKey {
    Service,
    Level,
    /// A path inside `context` (`kubernetes.namespace` for `namespace`).
    Context(Vec<String>),
}

const KUBERNETES_KEYS: [&str; 4] = ["namespace", "pod", "container", "node"];

impl GroupKey {
    fn parse(text: &str) -> Result<GroupKey, String> {
        match text {
            "service" => Ok(GroupKey::Service),
            "level" => Ok(GroupKey::Level),
            k if KUBERNETES_KEYS.contains(&k) => {
                Ok(GroupKey::Context(vec!["kubernetes".into(), k.to_string()]))
            }
            other => match other.strip_prefix("context.") {
                Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => Ok(
                    GroupKey::Context(path.split('.').map(String::from).collect()),
                ),
                _ => Err(format!(
                    "{other:?}: group by service, level, namespace, pod, container, node or context.<field>"
                )),
            },
        }
    }
}

/// A rule as the evaluator uses it: validated, its query compiled.
#[derive(Clone, Debug)]
pub struct Rule {
    pub id: Uuid,
    pub spec: RuleSpec,
    /// Changes whenever the rule does; window state kept for another version is dropped.
    pub version: i64,
    /// `config` (from the configuration file, read-only through the API) or `api`.
    pub source: RuleSource,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub query: Option<TextQuery>,
    pub group_by: Vec<GroupKey>,
    /// `group_by` with its names, sorted by name (the order of a group's key).
    pub sorted_group_by: Vec<(String, GroupKey)>,
    pub field_path: Option<Vec<String>>,
    pub predicate_path: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    Config,
    Api,
}

impl RuleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleSource::Config => "config",
            RuleSource::Api => "api",
        }
    }
}

/// A rule field that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> RuleError {
    RuleError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn path_of(text: &str) -> Vec<String> {
    text.split('.').map(String::from).collect()
}

impl RuleSpec {
    /// Checks every field; the first problem found is returned, naming its field.
    pub fn validate(&self) -> Result<(), RuleError> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if name.len() > 200 || name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                "at most 200 characters, no control characters",
            ));
        }
        if self.window.0 == 0 || self.window.0 > MAX_WINDOW_SECONDS {
            return Err(invalid("window", "must be between 1s and 1d"));
        }
        if self.for_.0 > MAX_WINDOW_SECONDS {
            return Err(invalid("for", "must be at most 1d"));
        }
        if !self.threshold.is_finite() {
            return Err(invalid("threshold", "must be a finite number"));
        }
        if let (Some(_), Some(_)) = (self.filter.level, self.filter.min_level) {
            return Err(invalid(
                "filter.min_level",
                "give either level or min_level, not both",
            ));
        }
        if let Some(query) = &self.filter.query {
            TextQuery::parse(query).map_err(|e| invalid("filter.query", e))?;
        }
        if let Some(predicate) = &self.filter.field {
            if predicate.name.is_empty() || predicate.name.split('.').any(str::is_empty) {
                return Err(invalid(
                    "filter.field.name",
                    "a context field, dots for nesting",
                ));
            }
            match &predicate.value {
                Value::Number(_) => {}
                Value::String(_)
                    if matches!(predicate.op, Comparison::Equal | Comparison::NotEqual) => {}
                Value::String(_) => {
                    return Err(invalid(
                        "filter.field.op",
                        "strings compare with == or != only",
                    ));
                }
                _ => return Err(invalid("filter.field.value", "a number or a string")),
            }
        }
        match self.kind {
            RuleKind::Numeric => {
                let Some(field) = &self.field else {
                    return Err(invalid(
                        "field",
                        "a numeric rule needs the context field to aggregate",
                    ));
                };
                if field.is_empty() || field.split('.').any(str::is_empty) {
                    return Err(invalid("field", "a context field, dots for nesting"));
                }
                if self.aggregation.is_none() {
                    return Err(invalid("aggregation", "one of avg, max, p95, p99"));
                }
            }
            RuleKind::ErrorRate => {
                if !(0.0..=1.0).contains(&self.threshold) {
                    return Err(invalid(
                        "threshold",
                        "an error rate is a fraction between 0 and 1 (0.05 = 5%)",
                    ));
                }
            }
            RuleKind::Count | RuleKind::Absence => {}
        }
        if self.kind != RuleKind::Numeric && (self.field.is_some() || self.aggregation.is_some()) {
            return Err(invalid("field", "only numeric rules aggregate a field"));
        }
        if self.kind != RuleKind::ErrorRate && self.min_volume != 0 {
            return Err(invalid(
                "min_volume",
                "only error_rate rules have a minimum volume",
            ));
        }
        for (i, key) in self.group_by.iter().enumerate() {
            GroupKey::parse(key).map_err(|e| invalid(&format!("group_by[{i}]"), e))?;
        }
        for (key, _) in self.labels.iter().chain(self.annotations.iter()) {
            let valid = !key.is_empty()
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !key.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(invalid(
                    "labels",
                    format!("{key:?}: label and annotation names are [a-zA-Z_][a-zA-Z0-9_]*"),
                ));
            }
        }
        Ok(())
    }

    /// The rule's condition in one line, e.g. `count(service="checkout", level>=error) over
    /// 5m > 10`.
    pub fn condition(&self) -> String {
        let mut filter = Vec::new();
        if let Some(service) = &self.filter.service {
            filter.push(format!("service={service:?}"));
        }
        if let Some(level) = self.filter.level {
            filter.push(format!("level={}", level.as_str()));
        }
        if let Some(level) = self.filter.min_level {
            filter.push(format!("level>={}", level.as_str()));
        }
        if let Some(query) = &self.filter.query {
            filter.push(format!("query={query:?}"));
        }
        if let Some(p) = &self.filter.field {
            filter.push(format!("{}{}{}", p.name, p.op.symbol(), p.value));
        }
        let filter = filter.join(", ");
        let by = if self.group_by.is_empty() {
            String::new()
        } else {
            format!(" by ({})", self.group_by.join(", "))
        };
        let window = self.window;
        match self.kind {
            RuleKind::Count => format!(
                "count({filter}) over {window}{by} {} {}",
                self.op.symbol(),
                self.threshold
            ),
            RuleKind::ErrorRate => format!(
                "error_rate({filter}) over {window}{by} {} {} (at least {} entries)",
                self.op.symbol(),
                self.threshold,
                self.min_volume
            ),
            RuleKind::Numeric => format!(
                "{}({}{}{filter}) over {window}{by} {} {}",
                self.aggregation.map_or("?", Aggregation::name),
                self.field.as_deref().unwrap_or("?"),
                if filter.is_empty() { "" } else { " | " },
                self.op.symbol(),
                self.threshold
            ),
            RuleKind::Absence => format!("absent({filter}) for {window}{by}"),
        }
    }
}

impl Rule {
    /// Compiles a validated spec.
    pub fn new(
        id: Uuid,
        spec: RuleSpec,
        source: RuleSource,
        created_at: Timestamp,
        updated_at: Timestamp,
    ) -> Result<Rule, RuleError> {
        spec.validate()?;
        let query = spec
            .filter
            .query
            .as_deref()
            .map(TextQuery::parse)
            .transpose()
            .map_err(|e| invalid("filter.query", e))?;
        let group_by = spec
            .group_by
            .iter()
            .map(|k| GroupKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("group_by", e))?;
        let mut sorted_group_by: Vec<(String, GroupKey)> = spec
            .group_by
            .iter()
            .cloned()
            .zip(group_by.iter().cloned())
            .collect();
        sorted_group_by.sort_by(|a, b| a.0.cmp(&b.0));
        sorted_group_by.dedup_by(|a, b| a.0 == b.0);
        Ok(Rule {
            id,
            sorted_group_by,
            version: updated_at.as_nanos(),
            field_path: spec.field.as_deref().map(path_of),
            predicate_path: spec.filter.field.as_ref().map(|p| path_of(&p.name)),
            spec,
            source,
            created_at,
            updated_at,
            query,
            group_by,
        })
    }

    /// Whether the rule needs the entry's context parsed (grouping, predicates, fields).
    pub fn needs_context(&self) -> bool {
        self.field_path.is_some()
            || self.predicate_path.is_some()
            || self
                .group_by
                .iter()
                .any(|k| matches!(k, GroupKey::Context(_)))
    }

    /// The API's view of the rule.
    pub fn to_json(&self) -> Value {
        let mut value = serde_json::to_value(&self.spec).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.insert("id".into(), Value::String(self.id.to_string()));
            map.insert("source".into(), Value::String(self.source.as_str().into()));
            map.insert("condition".into(), Value::String(self.spec.condition()));
            map.insert(
                "created_at".into(),
                Value::String(self.created_at.to_rfc3339()),
            );
            map.insert(
                "updated_at".into(),
                Value::String(self.updated_at.to_rfc3339()),
            );
        }
        value
    }
}

/// The seed's four patterns (error rate, response time, memory usage, disk usage), active
/// unless the configuration gives `alert_rules` of its own.
pub fn default_rules() -> Vec<RuleSpec> {
    let rule = |name: &str, description: &str, kind, window, threshold, severity| RuleSpec {
        name: name.into(),
        description: description.into(),
        kind,
        filter: Filter::default(),
        window: Seconds(window),
        threshold,
        op: Comparison::Above,
        min_volume: 0,
        field: None,
        aggregation: None,
        group_by: vec!["service".into()],
        for_: Seconds(120),
        severity,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        enabled: true,
    };
    vec![
        RuleSpec {
            min_volume: 50,
            ..rule(
                "error_rate",
                "More than 5% of a service's entries are errors",
                RuleKind::ErrorRate,
                300,
                0.05,
                AlertSeverity::Critical,
            )
        },
        RuleSpec {
            field: Some("duration_ms".into()),
            aggregation: Some(Aggregation::P95),
            ..rule(
                "response_time",
                "A service's p95 response time (context.duration_ms) is above 1 s",
                RuleKind::Numeric,
                300,
                1000.0,
                AlertSeverity::Warning,
            )
        },
        RuleSpec {
            field: Some("memory_usage_percent".into()),
            aggregation: Some(Aggregation::Max),
            ..rule(
                "memory_usage",
                "A service reports memory usage (context.memory_usage_percent) above 90%",
                RuleKind::Numeric,
                300,
                90.0,
                AlertSeverity::Critical,
            )
        },
        RuleSpec {
            field: Some("disk_usage_percent".into()),
            aggregation: Some(Aggregation::Max),
            ..rule(
                "disk_usage",
                "A service reports disk usage (context.disk_usage_percent) above 85%",
                RuleKind::Numeric,
                600,
                85.0,
                AlertSeverity::Warning,
            )
        },
    ]
}

/// Reads a rule from JSON, naming the field on error.
pub fn parse_spec(json: &[u8]) -> Result<RuleSpec, RuleError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let spec: RuleSpec = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        RuleError {
            field: if path == "." { "body".into() } else { path },
            reason: e.inner().to_string(),
        }
    })?;
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<RuleSpec, RuleError> {
        parse_spec(json.as_bytes())
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        for (text, seconds) in [
            ("300", 300),
            ("\"90s\"", 90),
            ("\"5m\"", 300),
            ("\"2h\"", 7200),
        ] {
            let s: Seconds = serde_json::from_str(text).unwrap();
            assert_eq!(s.0, seconds, "{text}");
        }
        assert_eq!(Seconds(300).to_string(), "5m");
        assert_eq!(Seconds(90).to_string(), "90s");
        assert!(serde_json::from_str::<Seconds>("\"5w\"").is_err());
        assert!(serde_json::from_str::<Seconds>("-1").is_err());
    }

    #[test]
    fn every_mistake_names_its_field() {
        let cases = [
            (r#"{"kind":"count","window":"5m"}"#, "name"),
            (r#"{"name":"x","kind":"count"}"#, "window"),
            (r#"{"name":"x","kind":"sum","window":"5m"}"#, "kind"),
            (
                r#"{"name":"x","kind":"count","window":"5m","treshold":3}"#,
                "treshold",
            ),
            (r#"{"name":"x","kind":"count","window":0}"#, "window"),
            (
                r#"{"name":"x","kind":"numeric","window":"5m","aggregation":"p95"}"#,
                "field",
            ),
            (
                r#"{"name":"x","kind":"numeric","window":"5m","field":"d"}"#,
                "aggregation",
            ),
            (
                r#"{"name":"x","kind":"error_rate","window":"5m","threshold":5}"#,
                "threshold",
            ),
            (
                r#"{"name":"x","kind":"count","window":"5m","group_by":["pod_ip"]}"#,
                "group_by[0]",
            ),
            (
                r#"{"name":"x","kind":"count","window":"5m","filter":{"query":"\"open"}}"#,
                "filter.query",
            ),
            (
                r#"{"name":"x","kind":"count","window":"5m","filter":{"level":"loud"}}"#,
                "filter.level",
            ),
            (
                r#"{"name":"x","kind":"count","window":"5m","severity":"huge"}"#,
                "severity",
            ),
            (
                r#"{"name":"x","kind":"count","window":"5m","min_volume":3}"#,
                "min_volume",
            ),
        ];
        for (json, field) in cases {
            let error = spec(json).expect_err(json);
            assert!(
                error.field.contains(field) || error.reason.contains(field),
                "{json}: {error}"
            );
        }
    }

    #[test]
    fn the_default_rules_are_valid_and_describe_themselves() {
        let rules = default_rules();
        assert_eq!(rules.len(), 4);
        for rule in &rules {
            rule.validate().unwrap();
        }
        assert_eq!(
            rules[1].condition(),
            "p95(duration_ms) over 5m by (service) > 1000"
        );
        let count = spec(
            r#"{"name":"checkout errors","kind":"count","window":"5m","threshold":10,
                "filter":{"service":"checkout","min_level":"error"}}"#,
        )
        .unwrap();
        assert_eq!(
            count.condition(),
            "count(service=\"checkout\", level>=error) over 5m > 10"
        );
    }
}
