//! The alert evaluator: a WAL consumer of its own (`alerts`) that updates every rule's
//! windows as entries become durable, and every `ALERT_CHECK_INTERVAL` reads them and hands
//! the results to the lifecycle manager.
//!
//! Its state (the windows) is written to `DATA_DIR/alerts/windows.json` every few seconds
//! together with the WAL position it reflects; only then is its WAL cursor advanced. After a
//! restart (or a crash) it loads that snapshot and replays the WAL from exactly there, so the
//! windows are what they would have been without the restart: no count is lost or doubled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use logging_common::Timestamp;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::rules::{GroupKey, Rule, RuleKind};
use super::text::Seen;
use super::view::{AlertView, Context, ContextView, read_view};
use super::window::{Series, bucket_nanos};
use super::{RuleRegistry, RuleSet};
use crate::wal::WalReader;

/// The evaluator's WAL consumer name.
pub const ALERTS_CONSUMER: &str = "alerts";
/// Most groups one rule tracks; more are dropped (and counted), so that a `group_by` on a
/// high-cardinality field cannot exhaust memory.
pub const MAX_GROUPS_PER_RULE: usize = 10_000;
/// How often the windows are written down (and the WAL cursor advanced).
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// An absence group unseen this long is forgotten (the service is gone, not silent).
const FORGET_ABSENT_AFTER_NANOS: i64 = 7 * 86_400 * 1_000_000_000;

/// One group's reading at a check.
#[derive(Clone, Debug)]
pub struct GroupResult {
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub holds: bool,
}

/// One rule's reading at a check.
#[derive(Clone, Debug)]
pub struct RuleResult {
    pub rule: Arc<Rule>,
    pub groups: Vec<GroupResult>,
}

/// Every enabled rule, read at one instant.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub at: Timestamp,
    pub rules: Vec<RuleResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RuleState {
    version: i64,
    /// When this version of the rule started watching (ns).
    since: i64,
    groups: Groups,
}

/// A rule's groups by key; hashed with foldhash, which costs a fraction of SipHash on these
/// short keys (looked up once per matching entry and rule).
type Groups = HashMap<String, Series, foldhash::fast::RandomState>;

#[derive(Serialize, Deserialize)]
#[serde(tag = "format")]
enum Snapshot {
    /// Format 1 wrote percentile sketches as maps it could not read back; format 2 writes
    /// pairs. Both read the same way now.
    #[serde(rename = "2", alias = "1")]
    V1 {
        lsn: u64,
        rules: HashMap<Uuid, RuleState>,
    },
}

/// Group keys to forget (an absence alert resolved by hand).
pub type ForgetList = Arc<Mutex<Vec<(Uuid, String)>>>;

pub struct Evaluator {
    reader: WalReader,
    registry: Arc<RuleRegistry>,
    rules: Arc<RuleSet>,
    /// The windows of `rules.rules[i]` in `states[i]`.
    states: Vec<RuleState>,
    /// Windows read from the snapshot, until the rules they belong to are adopted.
    restored: HashMap<Uuid, RuleState>,
    output: tokio::sync::mpsc::Sender<Evaluation>,
    check_every: Duration,
    snapshot_path: PathBuf,
    forget: ForgetList,
    scratch: Scratch,
}

/// Buffers reused from one entry to the next.
#[derive(Default)]
struct Scratch {
    seen: Seen,
    /// The entry's context, as far as rules read it.
    context: Context,
    /// The entry's group key for each key shape, built on first use.
    keys: Vec<String>,
    key_ready: Vec<bool>,
}

/// Appends the value `key` takes for `entry` to `out`.
fn group_value(entry: &AlertView, context: Option<ContextView>, key: &GroupKey, out: &mut String) {
    match key {
        GroupKey::Service => out.push_str(&entry.service),
        GroupKey::Level => out.push_str(entry.level.as_str()),
        GroupKey::Context(path) => match context.and_then(|c| c.get(path)) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(other) => out.push_str(&other.to_string()),
        },
    }
}

impl Evaluator {
    pub fn new(
        reader: WalReader,
        registry: Arc<RuleRegistry>,
        output: tokio::sync::mpsc::Sender<Evaluation>,
        check_every: Duration,
        data_dir: &Path,
        forget: ForgetList,
    ) -> Evaluator {
        let rules = registry.current();
        Evaluator {
            reader,
            registry,
            rules,
            states: Vec::new(),
            restored: HashMap::new(),
            output,
            check_every,
            snapshot_path: data_dir.join("windows.json"),
            forget,
            scratch: Scratch::default(),
        }
    }

    /// Loads the last snapshot and moves the WAL reader to the position it reflects.
    fn restore(&mut self) {
        let keyring = self.reader.keyring();
        let bytes = match logging_common::crypto::read_file(&self.snapshot_path, keyring.as_deref())
        {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => {
                tracing::warn!(%error, "alert windows: unreadable snapshot; starting with empty windows");
                return;
            }
        };
        match serde_json::from_slice::<Snapshot>(&bytes) {
            Ok(Snapshot::V1 { lsn, rules }) => {
                if lsn != self.reader.position() {
                    tracing::info!(
                        snapshot = lsn,
                        cursor = self.reader.position(),
                        "alert windows: replaying the WAL from the snapshot's position"
                    );
                }
                self.reader.seek(lsn);
                self.restored = rules;
            }
            Err(error) => tracing::warn!(
                file = %self.snapshot_path.display(), %error,
                "alert windows: unreadable snapshot; starting with empty windows"
            ),
        }
    }

    /// Takes the registry's current rules: keeps the state of rules that still exist at the
    /// same version and starts the others. `run` calls it whenever the rules change.
    pub fn adopt_rules(&mut self, now: i64) {
        let mut previous = std::mem::take(&mut self.restored);
        for (rule, state) in self.rules.rules.iter().zip(self.states.drain(..)) {
            previous.insert(rule.id, state);
        }
        self.rules = self.registry.current();
        self.states = self
            .rules
            .rules
            .iter()
            .map(|rule| match previous.remove(&rule.id) {
                Some(state) if state.version == rule.version => state,
                _ => RuleState {
                    version: rule.version,
                    since: now,
                    groups: Groups::default(),
                },
            })
            .collect();
    }

    pub fn run(mut self, stop: Arc<AtomicBool>) {
        self.restore();
        let mut seen_version = self.registry.version();
        self.adopt_rules(Timestamp::now().as_nanos());
        let mut next_check = Instant::now() + self.check_every;
        let mut next_snapshot = Instant::now() + SNAPSHOT_EVERY;
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let wait = next_check
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            let read = self.reader.next_records(8 << 20, wait);
            // After the read: a rule created while the reader waited sees the entries that
            // arrived after it.
            let version = self.registry.version();
            if version != seen_version {
                seen_version = version;
                self.adopt_rules(Timestamp::now().as_nanos());
            }
            match read {
                Ok(records) => {
                    let now = Timestamp::now().as_nanos();
                    for record in records {
                        for line in record.lines() {
                            self.observe(&line, now);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "alert evaluator cannot read the WAL");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + self.check_every;
                let evaluation = self.evaluate(Timestamp::now());
                if self.output.blocking_send(evaluation).is_err() && !stopping {
                    tracing::warn!("the alert manager stopped; evaluations are dropped");
                }
            }
            if stopping || Instant::now() >= next_snapshot {
                next_snapshot = Instant::now() + SNAPSHOT_EVERY;
                if let Err(error) = self.snapshot() {
                    tracing::error!(%error, "cannot write the alert windows");
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes the windows and, once they are durable, advances the WAL cursor past what
    /// they reflect.
    fn snapshot(&self) -> std::io::Result<()> {
        let lsn = self.reader.position();
        let snapshot = Snapshot::V1 {
            lsn,
            rules: self
                .rules
                .rules
                .iter()
                .zip(&self.states)
                .map(|(rule, state)| (rule.id, state.clone()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
        let tmp = self.snapshot_path.with_extension("json.tmp");
        logging_common::crypto::write_file(&tmp, &bytes, self.reader.keyring().as_deref())?;
        std::fs::rename(&tmp, &self.snapshot_path)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.reader.commit(lsn).map_err(std::io::Error::other)
    }

    /// Feeds one stored entry line to every rule it may concern.
    pub fn observe(&mut self, line: &[u8], now: i64) {
        if self.rules.rules.is_empty() {
            return;
        }
        let rules = self.rules.clone();
        let scratch = &mut self.scratch;
        let Some(entry) = read_view(line, &rules.context_keys, &mut scratch.context) else {
            return;
        };
        let context = scratch.context.with(&rules.context_keys);
        let candidates = rules
            .by_service
            .get(entry.service.as_ref())
            .map_or(&[][..], |by_level| by_level.get(entry.level))
            .iter()
            .chain(rules.any_service.get(entry.level));
        let mut scanned = false;
        scratch.keys.resize_with(rules.shape_count, String::new);
        scratch.key_ready.clear();
        scratch.key_ready.resize(rules.shape_count, false);
        for candidate in candidates {
            let i = candidate.rule;
            if candidate.query {
                if !scanned {
                    rules.vocabulary.scan(&entry.message, &mut scratch.seen);
                    scanned = true;
                }
                if candidate
                    .trigger
                    .is_some_and(|word| !scratch.seen.has(word))
                {
                    continue;
                }
                if let Some(Some(query)) = rules.queries.get(i)
                    && !query.matches(&scratch.seen)
                {
                    continue;
                }
            }
            let rule = &rules.rules[i];
            let filter = &rule.spec.filter;
            let window = rule.spec.window.nanos();
            let ts = entry.timestamp.as_nanos().min(now);
            if ts <= now - window {
                continue;
            }
            let ctx = rule.needs_context().then_some(context);
            if let (Some(predicate), Some(path)) = (&filter.field, &rule.predicate_path) {
                let found = ctx.and_then(|c| c.get(path));
                let holds = match (found, &predicate.value) {
                    (Some(Value::Number(a)), Value::Number(b)) => predicate.op.holds(
                        a.as_f64().unwrap_or(f64::NAN),
                        b.as_f64().unwrap_or(f64::NAN),
                    ),
                    (Some(Value::String(a)), Value::String(b)) => match predicate.op {
                        super::rules::Comparison::Equal => a == b,
                        super::rules::Comparison::NotEqual => a != b,
                        _ => false,
                    },
                    (None, Value::String(_)) => predicate.op == super::rules::Comparison::NotEqual,
                    _ => false,
                };
                if !holds {
                    continue;
                }
            }
            let value = match &rule.field_path {
                Some(path) => match ctx.and_then(|c| c.get(path)).and_then(Value::as_f64) {
                    Some(v) => Some((
                        v,
                        rule.spec.aggregation.and_then(|a| a.quantile()).is_some(),
                    )),
                    None => continue,
                },
                None => None,
            };
            let Some(state) = self.states.get_mut(i) else {
                continue;
            };
            let shape = rules.key_shapes[i];
            let key = &mut scratch.keys[shape];
            if !scratch.key_ready[shape] {
                // The group's key: its `name=value` pairs, sorted by name, joined by U+001F.
                key.clear();
                for (n, (name, k)) in rule.sorted_group_by.iter().enumerate() {
                    if n > 0 {
                        key.push('\u{1f}');
                    }
                    key.push_str(name);
                    key.push('=');
                    group_value(&entry, ctx, k, key);
                }
                scratch.key_ready[shape] = true;
            }
            let width = bucket_nanos(window);
            let error = entry.level.is_error();
            if let Some(series) = state.groups.get_mut(key.as_str()) {
                series.observe(ts, width, error, value);
                continue;
            }
            if state.groups.len() >= MAX_GROUPS_PER_RULE {
                metrics::counter!("logging_aggregator_alert_groups_dropped_total").increment(1);
                continue;
            }
            let labels: BTreeMap<String, String> = rule
                .sorted_group_by
                .iter()
                .map(|(name, k)| {
                    let mut value = String::new();
                    group_value(&entry, ctx, k, &mut value);
                    (name.clone(), value)
                })
                .collect();
            state
                .groups
                .entry(key.clone())
                .or_insert_with(|| Series {
                    labels,
                    ..Series::default()
                })
                .observe(ts, width, error, value);
        }
    }

    /// Reads every enabled rule's windows at `at`.
    pub fn evaluate(&mut self, at: Timestamp) -> Evaluation {
        let started = Instant::now();
        let now = at.as_nanos();
        let forget: HashSet<(Uuid, String)> = self.forget.lock().drain(..).collect();
        let mut results = Vec::with_capacity(self.rules.rules.len());
        let mut groups_tracked = 0;
        for (rule, state) in self.rules.rules.iter().zip(self.states.iter_mut()) {
            let spec = &rule.spec;
            let window = spec.window.nanos();
            let width = bucket_nanos(window);
            state
                .groups
                .retain(|key, _| !forget.contains(&(rule.id, key.clone())));
            if spec.kind == RuleKind::Absence && spec.group_by.is_empty() {
                state.groups.entry(String::new()).or_default();
            }
            let mut groups = Vec::new();
            state.groups.retain(|key, series| {
                series.expire(now, window, width);
                if spec.kind == RuleKind::Absence {
                    let last = series.last_seen.unwrap_or(state.since).max(state.since);
                    if now - last > FORGET_ABSENT_AFTER_NANOS && !spec.group_by.is_empty() {
                        return false;
                    }
                } else if series.buckets.is_empty() {
                    return false;
                }
                let summary = series.summary(now, window, width);
                let reading = match spec.kind {
                    RuleKind::Count => {
                        let value = summary.count as f64;
                        Some((value, spec.op.holds(value, spec.threshold)))
                    }
                    RuleKind::ErrorRate => {
                        let value = if summary.count == 0 {
                            0.0
                        } else {
                            summary.errors as f64 / summary.count as f64
                        };
                        let enough = summary.count > 0 && summary.count >= spec.min_volume;
                        Some((value, enough && spec.op.holds(value, spec.threshold)))
                    }
                    RuleKind::Numeric => {
                        let value = match spec.aggregation {
                            Some(super::rules::Aggregation::Avg) => summary.average(),
                            Some(super::rules::Aggregation::Max) => summary.max,
                            Some(a) => a.quantile().and_then(|q| summary.quantile(q)),
                            None => None,
                        };
                        value.map(|v| (v, spec.op.holds(v, spec.threshold)))
                    }
                    RuleKind::Absence => {
                        let last = series.last_seen.unwrap_or(state.since).max(state.since);
                        let silent = (now - last).max(0);
                        let value = silent as f64 / 1e9;
                        Some((value, summary.count == 0 && silent >= window))
                    }
                };
                if let Some((value, holds)) = reading {
                    groups.push(GroupResult {
                        key: key.clone(),
                        labels: series.labels.clone(),
                        value,
                        holds,
                    });
                }
                true
            });
            groups_tracked += state.groups.len();
            results.push(RuleResult {
                rule: rule.clone(),
                groups,
            });
        }
        metrics::gauge!("logging_aggregator_alert_groups").set(groups_tracked as f64);
        metrics::histogram!("logging_aggregator_alert_evaluation_seconds")
            .record(started.elapsed().as_secs_f64());
        Evaluation { at, rules: results }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_with_percentile_sketches_reads_back_whole() {
        let mut series = super::super::window::Series::default();
        for v in [0.0, -3.0, 1.0, 214.0, 1e9] {
            series.observe(1_000, 1_000_000_000, false, Some((v, true)));
        }
        let mut groups = Groups::default();
        groups.insert("g".into(), series.clone());
        let rule = Uuid::new_v4();
        let snapshot = Snapshot::V1 {
            lsn: 42,
            rules: HashMap::from([(
                rule,
                RuleState {
                    version: 1,
                    since: 7,
                    groups,
                },
            )]),
        };
        let bytes = serde_json::to_vec(&snapshot).unwrap();
        let Snapshot::V1 { lsn, rules } = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(lsn, 42);
        assert_eq!(rules[&rule].groups["g"], series);
        // What format 1 wrote (sketch keys as strings) is read too.
        let old = String::from_utf8(bytes)
            .unwrap()
            .replace("\"format\":\"2\"", "\"format\":\"1\"")
            .replace("\"sketch\":[[", "\"sketch\":{\"")
            .replace("],[", ",\"")
            .replace("]]", "}");
        let old = regex::Regex::new(r#""(-?\d+),(\d+)"#)
            .unwrap()
            .replace_all(&old, "\"$1\":$2")
            .into_owned();
        let Snapshot::V1 { rules, .. } = serde_json::from_str(&old).unwrap();
        assert_eq!(rules[&rule].groups["g"].buckets, series.buckets, "{old}");
    }
}
