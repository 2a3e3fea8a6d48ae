//! LogQL over the embedded store: each stored entry seen as a Loki line with labels, and the
//! parts of a query the store's indexes can answer handed to them first.
//!
//! An entry's **labels** are `service_name` and `service` (its service), `level` and
//! `detected_level` (its level), `namespace`, `pod`, `container` and `node` (from
//! `context.kubernetes`) and `environment`, each when not empty; a selector may name any
//! other label, which is read from the entry's top-level `context` (where the Loki push API
//! keeps the labels it does not map), and `app`, `job`, `app_kubernetes_io_name` fall back to
//! the service. Its **line** is JSON: `{"message":…,"trace_id":…,…,"context":{…},"tags":[…]}`
//! (the ids and `context`/`tags` only when present), so `| json` reads every field.
//!
//! **Pushdown.** The selector's `service_name`/`service` and `level`/`detected_level`
//! matchers, the Kubernetes ones, the words of `|=` texts and label filters on those labels
//! become the store's filter; every pushed-down part is a *superset* of what it stands for
//! (the store compares lower-cased words), and every line the store returns still goes through
//! the whole pipeline, so an answer is exact. A word of a `|=` text is pushed down only when no
//! JSON key of the lines in range has a word it could match (a key is text of the line too,
//! but not a value the store's words answer for).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::eval::{EvalError, Series, Source, Steps, grouped};
use super::pipeline::{self, ERROR_DETAILS_LABEL, ERROR_LABEL, Labels, Row};
use super::syntax::{
    Grouping, LabelFilter, LineOp, LogExpr, LogRange, MatchOp, Matcher, NameOrMatcher, RangeOp,
    Stage,
};
use crate::index::LogIndex;
use crate::index::query::{LogFilter, Order, Page, QueryError, SortPosition};
use crate::index::query_language::{Field, Match, Node, Pattern, words};

/// The labels every entry has (when not empty), in the order they are listed.
pub const ENTRY_LABELS: [&str; 9] = [
    "service_name",
    "service",
    "level",
    "detected_level",
    "namespace",
    "pod",
    "container",
    "node",
    "environment",
];

/// Labels that name the service, read from `context` first (where a push kept them).
const SERVICE_ALIASES: [&str; 3] = ["app", "job", "app_kubernetes_io_name"];

/// Keys of the line itself, whose words a line filter may match.
const LINE_KEYS: [&str; 8] = [
    "message",
    "context",
    "tags",
    "trace_id",
    "span_id",
    "request_id",
    "correlation_id",
    "user_id",
];

/// The most buckets a count from the store's per-block counts may take.
const MAX_BUCKETS: i64 = 100_000;

/// Entries read per page of the store.
const PAGE: usize = 2000;

/// The most series one query may make (Loki bounds them too: `max_query_series`).
pub const MAX_SERIES: usize = 10_000;
/// The most samples a metric query may hold (about 16 bytes each).
pub const MAX_SAMPLES: usize = 20_000_000;

/// How long one query may read before it is refused (Loki's default `query_timeout`).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a query read, for the answer's `stats`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub entries_scanned: u64,
    pub bytes_scanned: u64,
}

#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    level: Cow<'a, str>,
    #[serde(borrow)]
    service: Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tags: Option<&'a RawValue>,
    #[serde(borrow, default)]
    trace_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    span_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    request_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    correlation_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    environment: Option<Cow<'a, str>>,
    /// Restored from the archive.
    #[serde(default)]
    archived: bool,
}

#[derive(Deserialize, Default)]
struct Kubernetes<'a> {
    #[serde(borrow, default)]
    namespace: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pod: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    container: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    node: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ContextKubernetes<'a> {
    #[serde(borrow, default)]
    kubernetes: Option<Kubernetes<'a>>,
}

/// A stored entry (the API's JSON) as a Loki line with its labels; `extra` names labels read
/// from `context`.
pub fn entry_row(ts: i64, json: &[u8], extra: &[String]) -> Option<Row> {
    let stored: Stored = serde_json::from_slice(json).ok()?;
    let mut labels = Labels::new();
    let mut put = |name: &str, value: &str| {
        if !value.is_empty() {
            labels.insert(name.to_string(), value.to_string());
        }
    };
    put("service_name", &stored.service);
    put("service", &stored.service);
    put("level", &stored.level);
    put("detected_level", &stored.level);
    if let Some(environment) = &stored.environment {
        put("environment", environment);
    }
    if stored.archived {
        put("archived", "true");
    }
    let context = stored.context.filter(|c| c.get().trim() != "null");
    if let Some(context) = context {
        let kubernetes = serde_json::from_str::<ContextKubernetes>(context.get())
            .ok()
            .and_then(|c| c.kubernetes)
            .unwrap_or_default();
        for (name, value) in [
            ("namespace", &kubernetes.namespace),
            ("pod", &kubernetes.pod),
            ("container", &kubernetes.container),
            ("node", &kubernetes.node),
        ] {
            if let Some(value) = value {
                put(name, value);
            }
        }
        if !extra.is_empty()
            && let Ok(map) = serde_json::from_str::<HashMap<Cow<str>, &RawValue>>(context.get())
        {
            for name in extra {
                let value = map.get(name.as_str()).and_then(|raw| scalar_text(raw));
                match value {
                    Some(value) => put(name, &value),
                    None if SERVICE_ALIASES.contains(&name.as_str()) => put(name, &stored.service),
                    None => {}
                }
            }
        }
    }
    if context.is_none() {
        for name in extra {
            if SERVICE_ALIASES.contains(&name.as_str()) {
                put(name, &stored.service);
            }
        }
    }

    let mut line = String::with_capacity(json.len());
    line.push_str("{\"message\":");
    line.push_str(stored.message.get());
    for (key, value) in [
        ("trace_id", stored.trace_id),
        ("span_id", stored.span_id),
        ("request_id", stored.request_id),
        ("correlation_id", stored.correlation_id),
        ("user_id", stored.user_id),
    ] {
        if let Some(value) = value.filter(|v| v.get() != "null") {
            line.push_str(",\"");
            line.push_str(key);
            line.push_str("\":");
            line.push_str(value.get());
        }
    }
    if let Some(context) = context {
        line.push_str(",\"context\":");
        line.push_str(context.get());
    }
    if let Some(tags) = stored
        .tags
        .filter(|t| !matches!(t.get().trim(), "[]" | "null"))
    {
        line.push_str(",\"tags\":");
        line.push_str(tags.get());
    }
    line.push('}');
    Some(Row::new(ts, line, labels))
}

/// A JSON string or number's text.
fn scalar_text(raw: &RawValue) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A log query's lines in a time range, read from the store.
pub struct Selection<'a> {
    index: &'a LogIndex,
    log: &'a LogExpr,
    filter: LogFilter,
    extra: Vec<String>,
    /// Whether the store's filter is exactly the query (nothing left to check per line).
    exact: bool,
    deadline: Instant,
    pub stats: Stats,
}

impl<'a> Selection<'a> {
    /// Lines of `log` with timestamps in `[start, end]` (nanoseconds).
    pub fn new(
        index: &'a LogIndex,
        log: &'a LogExpr,
        start: i64,
        end: i64,
        deadline: Instant,
    ) -> Result<Selection<'a>, QueryError> {
        let extra: Vec<String> = log
            .selector
            .iter()
            .map(|m| m.name.clone())
            .filter(|n| !ENTRY_LABELS.contains(&n.as_str()))
            .collect();
        let (filter, exact) = pushdown(index, log, start, end)?;
        Ok(Selection {
            index,
            log,
            filter,
            extra,
            exact,
            deadline,
            stats: Stats::default(),
        })
    }

    /// Whether the store alone answers which lines match (no stage, only pushed-down matchers).
    pub fn exact(&self) -> bool {
        self.exact
    }

    /// The store's filter for this selection.
    pub fn filter(&self) -> &LogFilter {
        &self.filter
    }

    /// Calls `visit` with each line that passes the selector and the pipeline, in `order`,
    /// until it breaks.
    pub fn for_each(
        &mut self,
        order: Order,
        visit: impl FnMut(Row) -> ControlFlow<()>,
    ) -> Result<(), EvalError> {
        self.for_each_in(order, None, visit)
    }

    /// The same over the entries written at WAL sequences in `seqs` (a tail's new arrivals),
    /// oldest first.
    pub fn for_each_written(
        &mut self,
        seqs: std::ops::Range<u64>,
        visit: impl FnMut(Row) -> ControlFlow<()>,
    ) -> Result<(), EvalError> {
        self.for_each_in(Order::Asc, Some(seqs), visit)
    }

    fn for_each_in(
        &mut self,
        order: Order,
        seqs: Option<std::ops::Range<u64>>,
        mut visit: impl FnMut(Row) -> ControlFlow<()>,
    ) -> Result<(), EvalError> {
        let mut after: Option<SortPosition> = None;
        loop {
            if Instant::now() > self.deadline {
                return Err(EvalError::Invalid(format!(
                    "the query read for longer than {} s (query timeout); narrow the time range or the selector",
                    QUERY_TIMEOUT.as_secs()
                )));
            }
            let page = Page {
                limit: PAGE,
                order,
                after,
                with_total: false,
                highlight: false,
            };
            let found = match &seqs {
                None => self.index.search(&self.filter, &page),
                Some(seqs) => self.index.search_written(&self.filter, &page, seqs.clone()),
            };
            let found = found.map_err(|e| match e {
                QueryError::Invalid { field, reason } => {
                    EvalError::Invalid(format!("{field}: {reason}"))
                }
                QueryError::Index(e) => EvalError::Store(e.to_string()),
            })?;
            for entry in found.entries {
                self.stats.entries_scanned += 1;
                self.stats.bytes_scanned += entry.json.len() as u64;
                let Some(mut row) = entry_row(entry.position.ts, &entry.json, &self.extra) else {
                    continue;
                };
                if !self
                    .log
                    .selector
                    .iter()
                    .all(|m| m.matches(label(&row, &m.name)))
                {
                    continue;
                }
                if !pipeline::run(&self.log.stages, &mut row) {
                    continue;
                }
                if visit(row).is_break() {
                    return Ok(());
                }
            }
            match found.next {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }
}

fn label<'r>(row: &'r Row, name: &str) -> &'r str {
    row.labels.get(name).map_or("", String::as_str)
}

/// The store's filter for a log query: a superset of its lines (see the module's header), and
/// whether it is exactly them.
fn pushdown(
    index: &LogIndex,
    log: &LogExpr,
    start: i64,
    end: i64,
) -> Result<(LogFilter, bool), QueryError> {
    let mut filter = LogFilter {
        start: Some(Timestamp::from_nanos(start)),
        end: Some(Timestamp::from_nanos(end.saturating_add(1))),
        ..LogFilter::default()
    };
    // Dropping the error labels changes nothing before a parser could set them (Grafana's
    // Logs Volume query ends in `| drop __error__`).
    let exact = log.stages.iter().all(|stage| match stage {
        Stage::Drop(names) => names.iter().all(|n| {
            matches!(n, NameOrMatcher::Name(name) if name == ERROR_LABEL || name == ERROR_DETAILS_LABEL)
        }),
        _ => false,
    });
    let mut exact = exact;
    let mut nodes: Vec<Node> = Vec::new();
    for m in &log.selector {
        exact &= push_matcher(m, &mut filter, &mut nodes);
    }
    let full_text = index.full_text();
    let mut key_words: Option<HashSet<Box<str>>> = None;
    for stage in &log.stages {
        match stage {
            Stage::Line(line) if line.op == LineOp::Contains && line.texts.len() == 1 => {
                if !full_text {
                    continue;
                }
                if key_words.is_none() {
                    let mut keys = index.key_words(start, end.saturating_add(1))?;
                    keys.extend(
                        LINE_KEYS
                            .iter()
                            .flat_map(|k| words(k))
                            .map(String::into_boxed_str),
                    );
                    key_words = Some(keys);
                }
                let keys = key_words.as_ref().expect("filled above");
                nodes.extend(text_terms(&line.texts[0], keys));
            }
            Stage::Line(_) | Stage::Json(_) | Stage::Logfmt { .. } | Stage::Regexp(_) => {}
            Stage::Pattern(_) | Stage::Unpack | Stage::Decolorize | Stage::LineFormat(_) => {}
            Stage::Labels(label_filter) => {
                // Parsers never replace a stream label (theirs get `_extracted`), so a filter
                // on one sees the stream's value until a stage renames or drops labels.
                for m in conjuncts(label_filter) {
                    if ENTRY_LABELS.contains(&m.name.as_str()) {
                        push_matcher(m, &mut filter, &mut nodes);
                    }
                }
            }
            Stage::LabelFormat(_) | Stage::Drop(_) | Stage::Keep(_) => break,
        }
    }
    if !nodes.is_empty() && full_text {
        filter.text = Some("(LogQL)".into());
        filter.parsed = Some(if nodes.len() == 1 {
            nodes.pop().expect("one")
        } else {
            Node::And(nodes)
        });
    } else if !nodes.is_empty() {
        exact = false;
    }
    Ok((filter, exact))
}

/// The string matchers a label filter requires (those joined by `and` at its top).
fn conjuncts(filter: &LabelFilter) -> Vec<&Matcher> {
    match filter {
        LabelFilter::And(a, b) => {
            let mut out = conjuncts(a);
            out.extend(conjuncts(b));
            out
        }
        LabelFilter::Text(m) => vec![m],
        _ => Vec::new(),
    }
}

/// Adds what the store can check of a matcher; `true` when that is exactly the matcher.
fn push_matcher(m: &Matcher, filter: &mut LogFilter, nodes: &mut Vec<Node>) -> bool {
    match (m.name.as_str(), m.op) {
        ("service_name" | "service", MatchOp::Eq) => {
            if filter.services.is_empty() || filter.services.contains(&m.value) {
                filter.services = vec![m.value.clone()];
            } else {
                // Two different services: nothing matches; keep a filter that says so.
                filter.services = vec![format!("{}\u{0}", m.value)];
            }
            true
        }
        ("service_name" | "service", MatchOp::Re) if filter.services.is_empty() => {
            match literal_alternatives(&m.value) {
                Some(services) => {
                    filter.services = services;
                    true
                }
                None => false,
            }
        }
        ("level" | "detected_level", MatchOp::Eq) => {
            match LogLevel::parse(&m.value).filter(|l| l.as_str() == m.value) {
                Some(level) if filter.level.is_none_or(|l| l == level) => {
                    filter.level = Some(level);
                    true
                }
                _ => false,
            }
        }
        ("namespace" | "pod" | "container" | "node", MatchOp::Eq) => {
            let ws: Vec<String> = words(&m.value).collect();
            if !ws.is_empty() {
                nodes.push(Node::Match(Match {
                    field: Field::Context(format!("kubernetes.{}", m.name)),
                    raw: m.value.clone(),
                    pattern: Pattern::Words(ws),
                }));
            }
            false
        }
        ("environment", MatchOp::Eq) if !m.value.is_empty() => {
            nodes.push(Node::Match(Match {
                field: Field::Environment,
                raw: m.value.clone(),
                pattern: Pattern::Words(words(&m.value).collect()),
            }));
            false
        }
        _ => false,
    }
}

/// `a|b|c` of plain names, as a list.
fn literal_alternatives(pattern: &str) -> Option<Vec<String>> {
    let names: Vec<String> = pattern.split('|').map(str::to_string).collect();
    names
        .iter()
        .all(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '/'))
        })
        .then_some(names)
}

/// The store's terms for a `|=` text: each word of it, compared as a whole word where the
/// text goes on around it, as the end or start of a word at the text's edges, and as a
/// fragment when the text is one word; a word a JSON key could hold is left to the pipeline.
fn text_terms(text: &str, key_words: &HashSet<Box<str>>) -> Vec<Node> {
    let mut out = Vec::new();
    let mut pieces = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                pieces.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        pieces.push((s, text.len()));
    }
    for (s, e) in pieces {
        let word = text[s..e].to_lowercase();
        let at_start = s == 0;
        let at_end = e == text.len();
        let pattern = match (at_start, at_end) {
            (false, false) => Pattern::Words(vec![word.clone()]),
            (true, false) => Pattern::Suffix(word.clone()),
            (false, true) => Pattern::Prefix(word.clone()),
            (true, true) => Pattern::Contains(word.clone()),
        };
        let key_could_hold = key_words.iter().any(|k| match &pattern {
            Pattern::Words(_) => **k == *word,
            Pattern::Suffix(w) => k.ends_with(w.as_str()),
            Pattern::Prefix(w) => k.starts_with(w.as_str()),
            Pattern::Contains(w) => k.contains(w.as_str()),
        });
        if key_could_hold {
            continue;
        }
        out.push(Node::Match(Match {
            field: Field::Anywhere,
            raw: word,
            pattern,
        }));
    }
    out
}

/// Samples of metric queries from the store.
pub struct IndexSource<'a> {
    pub index: &'a LogIndex,
    pub deadline: Instant,
    pub stats: Stats,
}

impl Source for IndexSource<'_> {
    fn samples(
        &mut self,
        range: &LogRange,
        op: RangeOp,
        from: i64,
        to: i64,
        steps: &Steps,
        group: Option<&Grouping>,
    ) -> Result<Vec<Series>, EvalError> {
        let mut selection = Selection::new(self.index, &range.log, from, to, self.deadline)
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        if let Some(group) = group
            && let Some(series) = self.counted(&selection, range, op, from, to, steps, group)?
        {
            return Ok(series);
        }
        let mut by_labels: HashMap<Labels, Vec<(i64, f64)>> = HashMap::new();
        let mut samples = 0usize;
        let mut over: Option<String> = None;
        selection.for_each(Order::Asc, |mut row| {
            let value = match &range.unwrap {
                None => match op {
                    RangeOp::BytesOverTime | RangeOp::BytesRate => row.line.len() as f64,
                    _ => 1.0,
                },
                Some(unwrap) => {
                    let value = row
                        .labels
                        .get(&unwrap.label)
                        .and_then(|text| pipeline::convert(text, unwrap.kind));
                    let value = match value {
                        Some(v) => v,
                        None => {
                            if !row.labels.contains_key(ERROR_LABEL) {
                                let shown =
                                    row.labels.get(&unwrap.label).cloned().unwrap_or_default();
                                row.labels
                                    .insert(ERROR_LABEL.into(), "SampleExtractionErr".into());
                                row.labels.insert(
                                    ERROR_DETAILS_LABEL.into(),
                                    format!("cannot unwrap {}={shown:?} as a number", unwrap.label),
                                );
                            }
                            0.0
                        }
                    };
                    if !unwrap
                        .filters
                        .iter()
                        .all(|f| pipeline::label_filter(f, &mut row))
                    {
                        return ControlFlow::Continue(());
                    }
                    row.labels.remove(&unwrap.label);
                    value
                }
            };
            let labels = match group {
                Some(g) => grouped(&row.labels, g),
                None => row.labels,
            };
            if !by_labels.contains_key(&labels) && by_labels.len() >= MAX_SERIES {
                over = Some(format!(
                    "maximum of series ({MAX_SERIES}) reached for a single query; aggregate with sum by (…) or narrow the selector"
                ));
                return ControlFlow::Break(());
            }
            samples += 1;
            if samples > MAX_SAMPLES {
                over = Some(format!(
                    "the query would hold more than {MAX_SAMPLES} samples; narrow the time range or the selector"
                ));
                return ControlFlow::Break(());
            }
            by_labels.entry(labels).or_default().push((row.ts, value));
            ControlFlow::Continue(())
        })?;
        if let Some(reason) = over {
            return Err(EvalError::Invalid(reason));
        }
        self.stats.entries_scanned += selection.stats.entries_scanned;
        self.stats.bytes_scanned += selection.stats.bytes_scanned;
        Ok(by_labels
            .into_iter()
            .map(|(labels, samples)| Series { labels, samples })
            .collect())
    }
}

impl IndexSource<'_> {
    /// Counts per step from the store's per-block counts, for a sum of counts by level, by
    /// service or in total over a selection the store answers exactly, with windows that are
    /// whole steps. `None` where that does not hold.
    #[allow(clippy::too_many_arguments)]
    fn counted(
        &mut self,
        selection: &Selection,
        range: &LogRange,
        op: RangeOp,
        from: i64,
        to: i64,
        steps: &Steps,
        group: &Grouping,
    ) -> Result<Option<Vec<Series>>, EvalError> {
        let by_level = |g: &str| matches!(g, "level" | "detected_level");
        let by_service = |g: &str| matches!(g, "service" | "service_name");
        let labels = &group.labels;
        // Buckets of one step (of the whole range for an instant), ending on the steps.
        let interval = if steps.count() > 1 {
            steps.step
        } else {
            range.range
        };
        let usable = matches!(op, RangeOp::CountOverTime | RangeOp::Rate)
            && range.unwrap.is_none()
            && selection.exact()
            && !group.without
            && (labels.iter().all(|g| by_level(g)) || labels.iter().all(|g| by_service(g)))
            && interval > 0
            && range.range % interval == 0
            && (to - from) / interval < MAX_BUCKETS
            && selection.filter().text.is_none();
        if !usable {
            return Ok(None);
        }
        let request = crate::index::AnalyticsRequest {
            filter: selection.filter().clone(),
            start: Timestamp::from_nanos(from),
            end: Timestamp::from_nanos(to.saturating_add(1)),
            interval_nanos: interval,
            value_field: None,
            top_patterns: 0,
        };
        let (fruit, _) = self
            .index
            .analytics(&request)
            .map_err(|e| EvalError::Store(e.to_string()))?;
        let bucket_end = |bucket: usize| from + (bucket as i64 + 1) * interval - 1;
        let mut series: HashMap<Labels, Vec<(i64, f64)>> = HashMap::new();
        if !labels.is_empty() && labels.iter().all(|g| by_service(g)) {
            for ((bucket, service), n) in fruit.by_service {
                let key: Labels = labels
                    .iter()
                    .map(|g| (g.clone(), service.clone()))
                    .collect();
                series
                    .entry(key)
                    .or_default()
                    .push((bucket_end(bucket), n as f64));
            }
        } else {
            for (bucket, counts) in fruit.by_level.iter().enumerate() {
                for (rank, n) in counts.iter().enumerate() {
                    if *n == 0 {
                        continue;
                    }
                    let level = LogLevel::from_rank(rank as u64).map_or("", |l| l.as_str());
                    let key: Labels = labels
                        .iter()
                        .map(|g| (g.clone(), level.to_string()))
                        .collect();
                    series
                        .entry(key)
                        .or_default()
                        .push((bucket_end(bucket), *n as f64));
                }
            }
        }
        Ok(Some(
            series
                .into_iter()
                .map(|(labels, mut samples)| {
                    samples.sort_by_key(|(ts, _)| *ts);
                    Series { labels, samples }
                })
                .collect(),
        ))
    }
}
