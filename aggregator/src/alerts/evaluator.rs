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
use super::window::{Series, bucket_nanos};
use super::{RuleRegistry, RuleSet};
use crate::wal::WalReader;
use logging_common::LogLevel;
use std::borrow::Cow;

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
    #[serde(rename = "1")]
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

/// What the evaluator reads of a stored entry: four fields and the context keys rules use.
struct AlertView<'a> {
    timestamp: Timestamp,
    level: LogLevel,
    service: Cow<'a, str>,
    message: Cow<'a, str>,
    /// The context's keys that rules read (`None`: the entry has no context).
    context: Option<Value>,
}

/// A borrowed string when the JSON has no escapes, an owned one otherwise.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Why reading a line stopped before its end: everything needed was read.
const READ_ENOUGH: &str = "read enough";

/// Reads a stored line into an [`AlertView`], stopping as soon as the fields it needs are
/// read: stored entries write `timestamp`, `level`, `service`, `message` and `context` first
/// (`LogEntry`'s field order), so the ids, tags and dates after them are never scanned.
/// serde_json insists on reading a map to its end, so the view leaves through `out` and the
/// read stops with an error that says so.
struct ViewReader<'k, 'a> {
    keys: &'k [String],
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
        let mut context = None;
        while let Some(Text(key)) = map.next_key::<Text>()? {
            match key.as_ref() {
                "timestamp" => timestamp = Some(map.next_value()?),
                "level" => level = Some(map.next_value()?),
                "service" => service = Some(map.next_value::<Text>()?.0),
                "message" => message = Some(map.next_value::<Text>()?.0),
                "context" if !self.keys.is_empty() => {
                    context = Some(map.next_value_seed(Subset(self.keys))?);
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            let complete = timestamp.is_some()
                && level.is_some()
                && service.is_some()
                && message.is_some()
                && (context.is_some() || self.keys.is_empty());
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
                    context: context.filter(|c: &Value| c.is_object()),
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

/// The view of a stored line, or `None` if it is not a stored entry.
fn read_view<'a>(line: &'a [u8], keys: &[String]) -> Option<AlertView<'a>> {
    use serde::de::DeserializeSeed;
    let mut out = None;
    let mut deserializer = serde_json::Deserializer::from_slice(line);
    // Err(READ_ENOUGH) is the way out with a view; any other error leaves `out` empty.
    let _ = ViewReader {
        keys,
        out: &mut out,
    }
    .deserialize(&mut deserializer);
    out
}

/// Buffers reused from one entry to the next.
#[derive(Default)]
struct Scratch {
    seen: Seen,
    /// The entry's group key for each key shape, built on first use.
    keys: Vec<String>,
    key_ready: Vec<bool>,
}

/// Appends the value `key` takes for `entry` to `out`.
fn group_value(entry: &AlertView, context: Option<&Value>, key: &GroupKey, out: &mut String) {
    match key {
        GroupKey::Service => out.push_str(&entry.service),
        GroupKey::Level => out.push_str(entry.level.as_str()),
        GroupKey::Context(path) => match context.and_then(|c| context_path(c, path)) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(other) => out.push_str(&other.to_string()),
        },
    }
}

/// A context with only the top-level keys rules read parsed (the rest is skipped, not
/// built into values and dropped again); `null` stays `null`.
struct Subset<'k>(&'k [String]);

impl<'de> serde::de::Visitor<'de> for Subset<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a context object")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = serde_json::Map::new();
        while let Some(Text(key)) = map.next_key::<Text>()? {
            if self.0.iter().any(|k| *k == key) {
                kept.insert(key.into_owned(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(kept))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Subset<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn context_path<'v>(context: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(context, |value, key| value.get(key))
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
        let Ok(bytes) = std::fs::read(&self.snapshot_path) else {
            return;
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
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
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
        let Some(entry) = read_view(line, &rules.context_keys) else {
            return;
        };
        let candidates = rules
            .by_service
            .get(entry.service.as_ref())
            .into_iter()
            .flatten()
            .chain(rules.any_service.iter());
        let mut scanned = false;
        let scratch = &mut self.scratch;
        scratch.keys.resize_with(rules.shape_count, String::new);
        scratch.key_ready.clear();
        scratch.key_ready.resize(rules.shape_count, false);
        for &i in candidates {
            let rule = &rules.rules[i];
            let filter = &rule.spec.filter;
            if filter.level.is_some_and(|l| l != entry.level)
                || filter.min_level.is_some_and(|l| entry.level < l)
            {
                continue;
            }
            if let Some(Some(query)) = rules.queries.get(i) {
                if !scanned {
                    rules.vocabulary.scan(&entry.message, &mut scratch.seen);
                    scanned = true;
                }
                if !query.matches(&scratch.seen) {
                    continue;
                }
            }
            let window = rule.spec.window.nanos();
            let ts = entry.timestamp.as_nanos().min(now);
            if ts <= now - window {
                continue;
            }
            let ctx = entry.context.as_ref().filter(|_| rule.needs_context());
            if let (Some(predicate), Some(path)) = (&filter.field, &rule.predicate_path) {
                let found = ctx.and_then(|c| context_path(c, path));
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
                Some(path) => {
                    match ctx
                        .and_then(|c| context_path(c, path))
                        .and_then(Value::as_f64)
                    {
                        Some(v) => Some((
                            v,
                            rule.spec.aggregation.and_then(|a| a.quantile()).is_some(),
                        )),
                        None => continue,
                    }
                }
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
    fn a_stored_line_is_read_up_to_what_rules_need() {
        let now = Timestamp::parse_rfc3339("2026-11-27T10:00:00Z").unwrap();
        let mut entry = logging_common::LogEntry::new(now, LogLevel::Error, "api", "disk \"full\"");
        entry.context = serde_json::from_str(
            r#"{"duration_ms":12.5,"big":{"deep":[1,2,3]},"kubernetes":{"namespace":"shop"}}"#,
        )
        .unwrap();
        entry.tags = vec!["after-the-context".into()];
        let line = serde_json::to_vec(&entry).unwrap();
        let keys = vec!["duration_ms".to_string(), "kubernetes".to_string()];
        let view = read_view(&line, &keys).expect("a view");
        assert_eq!(view.timestamp, now);
        assert_eq!(view.level, LogLevel::Error);
        assert_eq!(view.service, "api");
        assert_eq!(view.message, "disk \"full\"");
        let context = view.context.unwrap();
        assert_eq!(
            context,
            serde_json::json!({"duration_ms": 12.5, "kubernetes": {"namespace": "shop"}})
        );
        let path = ["kubernetes".to_string(), "namespace".to_string()];
        assert_eq!(context_path(&context, &path), Some(&Value::from("shop")));
        // No rule reads the context: it is not parsed at all.
        assert!(read_view(&line, &[]).unwrap().context.is_none());
        // Fields in another order are read all the same; a line that is not an entry is not.
        let reordered = br#"{"context":{"duration_ms":1},"message":"m","service":"s","level":"info","timestamp":"2026-11-27T10:00:00Z","id":"x"}"#;
        assert_eq!(read_view(reordered, &keys).unwrap().message, "m");
        assert!(read_view(br#"{"message":"m"}"#, &keys).is_none());
        assert!(read_view(b"not json", &keys).is_none());
        assert!(
            read_view(
                br#"{"timestamp":"2026-11-27T10:00:00Z","level":"info","service":"s","message":"m","context":null}"#,
                &keys
            )
            .unwrap()
            .context
            .is_none()
        );
    }
}
