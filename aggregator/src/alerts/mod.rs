//! Alerting: rules evaluated on the live stream of entries, alerts with a lifecycle
//! (pending → firing → resolved, acknowledged on the way), and notifications that are sent
//! once and retried until the receiver accepts them.
//!
//! ```text
//! WAL ─► evaluator.rs (thread; windows per rule and group; snapshot + WAL replay on restart)
//!          │ every ALERT_CHECK_INTERVAL: the readings
//!          ▼
//!        manager.rs (task; the only writer of alerts: transitions, `for`, cooldown, ack,
//!          │          resolve; alert + notifications written in one transaction)
//!          ▼
//!        notify.rs (task; the outbox: webhook, Slack, Alertmanager, email, SMS; retries)
//! ```

pub mod evaluator;
pub mod manager;
pub mod notify;
pub mod rules;
pub mod text;
pub mod view;
pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logging_common::{Alert, LogLevel, Timestamp};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use rules::Rule;

/// The rules in force, indexed for the evaluator's hot path: most rules name a service, so
/// an entry is only offered to the rules of its service and to those that name none, and
/// of those only to the rules whose filter takes its level.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    pub by_service: HashMap<String, ByLevel>,
    pub any_service: ByLevel,
    /// Every word the rules' queries look for.
    pub vocabulary: text::Vocabulary,
    /// `rules[i]`'s query, compiled against `vocabulary`.
    pub queries: Vec<Option<text::IdQuery>>,
    /// `rules[i]`'s group key shape: rules grouping by the same labels share one, so an
    /// entry's key is built once per shape rather than once per rule.
    pub key_shapes: Vec<usize>,
    pub shape_count: usize,
    /// The top-level context keys any rule reads (predicates, fields, grouping): only these
    /// are parsed out of an entry's context.
    pub context_keys: Vec<String>,
}

/// A rule as the evaluator's hot path first looks at it, before it touches the rule itself:
/// a rule with a query is turned away here when the message lacks a word it requires.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The rule's position in [`RuleSet::rules`].
    pub rule: usize,
    /// Whether the rule has a full-text query.
    pub query: bool,
    /// A word every message the query matches contains.
    pub trigger: Option<u32>,
}

/// Candidates by the level of the entries their filters take (`level` and `min_level`).
#[derive(Debug, Default)]
pub struct ByLevel([Vec<Candidate>; LogLevel::ALL.len()]);

impl ByLevel {
    fn push(&mut self, candidate: Candidate, filter: &rules::Filter) {
        for (level, candidates) in LogLevel::ALL.into_iter().zip(&mut self.0) {
            let takes = filter.level.is_none_or(|l| l == level)
                && filter.min_level.is_none_or(|l| level >= l);
            if takes {
                candidates.push(candidate);
            }
        }
    }

    /// The candidates for an entry of `level`.
    pub fn get(&self, level: LogLevel) -> &[Candidate] {
        self.0
            .get(usize::from(level.rank()))
            .map_or(&[], Vec::as_slice)
    }
}

impl RuleSet {
    pub fn new(rules: Vec<Arc<Rule>>) -> RuleSet {
        let rules: Vec<Arc<Rule>> = rules.into_iter().filter(|r| r.spec.enabled).collect();
        let mut vocabulary = text::Vocabulary::default();
        let queries: Vec<Option<text::IdQuery>> = rules
            .iter()
            .map(|rule| rule.query.as_ref().map(|q| q.compile(&mut vocabulary)))
            .collect();
        let mut by_service: HashMap<String, ByLevel> = HashMap::new();
        let mut any_service = ByLevel::default();
        for (i, (rule, query)) in rules.iter().zip(&queries).enumerate() {
            let candidate = Candidate {
                rule: i,
                query: query.is_some(),
                trigger: query.as_ref().and_then(text::IdQuery::required_word),
            };
            let filter = &rule.spec.filter;
            match &filter.service {
                Some(service) => by_service
                    .entry(service.clone())
                    .or_default()
                    .push(candidate, filter),
                None => any_service.push(candidate, filter),
            }
        }
        let mut shapes: Vec<&[(String, rules::GroupKey)]> = Vec::new();
        let key_shapes = rules
            .iter()
            .map(|rule| {
                let shape = rule.sorted_group_by.as_slice();
                shapes.iter().position(|s| *s == shape).unwrap_or_else(|| {
                    shapes.push(shape);
                    shapes.len() - 1
                })
            })
            .collect();
        let shape_count = shapes.len();
        let mut context_keys: Vec<String> = Vec::new();
        for rule in &rules {
            let grouped = rule.group_by.iter().filter_map(|key| match key {
                rules::GroupKey::Context(path) => Some(path),
                _ => None,
            });
            for path in [&rule.field_path, &rule.predicate_path]
                .into_iter()
                .flatten()
                .chain(grouped)
            {
                if let Some(first) = path.first()
                    && !context_keys.contains(first)
                {
                    context_keys.push(first.clone());
                }
            }
        }
        RuleSet {
            context_keys,
            rules,
            by_service,
            any_service,
            vocabulary,
            queries,
            key_shapes,
            shape_count,
        }
    }
}

/// Every rule (enabled or not), shared by the API, the evaluator and the manager.
#[derive(Default)]
pub struct RuleRegistry {
    all: RwLock<Vec<Arc<Rule>>>,
    active: RwLock<Arc<RuleSet>>,
    version: AtomicU64,
}

impl RuleRegistry {
    pub fn replace(&self, rules: Vec<Arc<Rule>>) {
        *self.active.write() = Arc::new(RuleSet::new(rules.clone()));
        *self.all.write() = rules;
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// The enabled rules, indexed.
    pub fn current(&self) -> Arc<RuleSet> {
        self.active.read().clone()
    }

    pub fn all(&self) -> Vec<Arc<Rule>> {
        self.all.read().clone()
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Rule>> {
        self.all.read().iter().find(|r| r.id == id).cloned()
    }

    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// Why an alert stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The condition no longer holds.
    Cleared,
    /// An operator resolved it (`POST /api/alerts/{id}/resolve`).
    Manual,
    /// Its rule was deleted or disabled.
    RuleRemoved,
}

/// An alert as stored and served: the seed's `Alert`, and what an operator needs besides.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AlertRecord {
    #[serde(flatten)]
    pub alert: Alert,
    pub rule_id: Uuid,
    /// The rule's name (also `name`).
    pub rule: String,
    /// The group this alert is about (`{"service": "checkout"}`; empty without group_by).
    pub group: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// When the condition started to hold.
    pub pending_since: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    /// The last time the condition was evaluated for this alert.
    pub evaluated_at: Timestamp,
    /// The group's key, as the evaluator names it.
    pub group_key: String,
    /// The trace of the evaluation (or command) that made its last notified transition, when
    /// traces are exported and it was sampled: notifications carry it, so an alert leads to
    /// the trace that fired it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// That transition's span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

impl AlertRecord {
    /// Whether the alert still needs attention.
    pub fn is_open(&self) -> bool {
        self.alert.status != logging_common::AlertStatus::Resolved
    }
}

/// What the API holds of alerting.
pub struct Alerting {
    pub registry: Arc<RuleRegistry>,
    pub commands: tokio::sync::mpsc::Sender<manager::Command>,
    /// The configured notification channels, by name.
    pub channels: Vec<String>,
}

fn stored(rule: &Rule) -> crate::db::StoredRule {
    crate::db::StoredRule {
        id: rule.id,
        name: rule.spec.name.clone(),
        source: rule.source.as_str().into(),
        spec: serde_json::to_string(&rule.spec).unwrap_or_default(),
        created_at_ns: rule.created_at.as_nanos(),
        updated_at_ns: rule.updated_at.as_nanos(),
    }
}

/// Turns a stored rule back into a rule; `None` (logged) if it no longer validates.
pub fn from_stored(row: &crate::db::StoredRule) -> Option<Rule> {
    let source = match row.source.as_str() {
        "config" => rules::RuleSource::Config,
        _ => rules::RuleSource::Api,
    };
    let spec = match rules::parse_spec(row.spec.as_bytes()) {
        Ok(spec) => spec,
        Err(error) => {
            tracing::error!(rule = %row.name, %error, "a stored alert rule is invalid; it is not evaluated");
            return None;
        }
    };
    Rule::new(
        row.id,
        spec,
        source,
        Timestamp::from_nanos(row.created_at_ns),
        Timestamp::from_nanos(row.updated_at_ns),
    )
    .ok()
}

/// Brings the stored rules in line with the configuration's (which win over a rule of the
/// same name made through the API), and returns every rule.
pub async fn load_rules(
    db: &crate::db::Database,
    configured: &[rules::RuleSpec],
) -> anyhow::Result<Vec<Arc<Rule>>> {
    let existing = db.alert_rules().await?;
    let now = Timestamp::now();
    for spec in configured {
        let name = spec.name.trim();
        match existing.iter().find(|r| r.name == name) {
            Some(row) => {
                let same = rules::parse_spec(row.spec.as_bytes()).is_ok_and(|s| s == *spec)
                    && row.source == "config";
                if !same {
                    if row.source != "config" {
                        tracing::warn!(
                            rule = name,
                            "the configuration's rule replaces the one of the same name made through the API"
                        );
                    }
                    let rule = Rule::new(
                        row.id,
                        spec.clone(),
                        rules::RuleSource::Config,
                        Timestamp::from_nanos(row.created_at_ns),
                        now,
                    )
                    .map_err(|e| anyhow::anyhow!("ALERT_RULES: {name}: {e}"))?;
                    db.update_alert_rule(&stored(&rule)).await?;
                }
            }
            None => {
                let rule = Rule::new(
                    Uuid::now_v7(),
                    spec.clone(),
                    rules::RuleSource::Config,
                    now,
                    now,
                )
                .map_err(|e| anyhow::anyhow!("ALERT_RULES: {name}: {e}"))?;
                db.insert_alert_rule(&stored(&rule)).await?;
            }
        }
    }
    for row in &existing {
        let still_configured = configured.iter().any(|s| s.name.trim() == row.name);
        if row.source == "config" && !still_configured {
            db.delete_alert_rule(row.id).await?;
        }
    }
    Ok(db
        .alert_rules()
        .await?
        .iter()
        .filter_map(from_stored)
        .map(Arc::new)
        .collect())
}

impl Alerting {
    /// Re-reads the rules from the store into the registry, after a change.
    pub async fn reload(&self, db: &crate::db::Database) -> Result<(), crate::db::DbError> {
        let rules = db
            .alert_rules()
            .await?
            .iter()
            .filter_map(from_stored)
            .map(Arc::new)
            .collect();
        self.registry.replace(rules);
        Ok(())
    }

    pub fn stored(rule: &Rule) -> crate::db::StoredRule {
        stored(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(spec: serde_json::Value) -> Arc<Rule> {
        let spec = rules::parse_spec(&serde_json::to_vec(&spec).unwrap()).unwrap();
        let now = Timestamp::now();
        Arc::new(Rule::new(Uuid::now_v7(), spec, rules::RuleSource::Config, now, now).unwrap())
    }

    #[test]
    fn an_entry_is_offered_to_the_rules_of_its_service_and_level_only() {
        let count = |name: &str, filter: serde_json::Value| {
            rule(
                serde_json::json!({"name": name, "kind": "count", "window": "1m",
                "threshold": 1, "filter": filter}),
            )
        };
        let set = RuleSet::new(vec![
            count(
                "api-errors",
                serde_json::json!({"service": "api", "min_level": "error"}),
            ),
            count("warnings", serde_json::json!({"level": "warning"})),
            count(
                "api-payments",
                serde_json::json!({"service": "api", "query": "payment -declined"}),
            ),
            count(
                "either",
                serde_json::json!({"query": "refunded OR declined"}),
            ),
            rule(
                serde_json::json!({"name": "off", "kind": "count", "window": "1m",
                "threshold": 1, "enabled": false}),
            ),
        ]);
        let offered = |service: &str, level: LogLevel| -> Vec<(&str, Option<u32>)> {
            let own = set
                .by_service
                .get(service)
                .map_or(&[][..], |l| l.get(level));
            own.iter()
                .chain(set.any_service.get(level))
                .map(|c| (set.rules[c.rule].spec.name.as_str(), c.trigger))
                .collect()
        };
        let payment = set.vocabulary.id_of("payment");
        assert!(payment.is_some());
        assert_eq!(
            offered("api", LogLevel::Error),
            [
                ("api-errors", None),
                ("api-payments", payment),
                ("either", None)
            ]
        );
        assert_eq!(
            offered("api", LogLevel::Critical),
            [
                ("api-errors", None),
                ("api-payments", payment),
                ("either", None)
            ]
        );
        assert_eq!(
            offered("api", LogLevel::Warning),
            [
                ("api-payments", payment),
                ("warnings", None),
                ("either", None)
            ]
        );
        assert_eq!(
            offered("web", LogLevel::Warning),
            [("warnings", None), ("either", None)]
        );
        assert_eq!(offered("web", LogLevel::Info), [("either", None)]);
    }
}
