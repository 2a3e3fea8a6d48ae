//! `LOG_QUERY_BACKEND`: a second aggregator replica, sharing the first one's PostgreSQL,
//! answers listings, searches, lookups and analytics from the engine the first one's sinks
//! filled, with the same answers as the first one's embedded index.
//!
//! Elasticsearch is the fake of `elasticsearch.rs`, which here also answers `_search` by
//! evaluating the query DSL the reader sends (bool filters, `ids`, `query_string` words,
//! sort and `search_after`, `track_total_hits`, `date_histogram`/`terms`/`filter`/`stats`/
//! `percentiles` aggregations over the runtime field). With `TEST_ELASTICSEARCH_URL` set, the
//! same comparison runs against that server.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode as AxumStatus;
use logging_common::Timestamp;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::elasticsearch::{FakeEs, Shared, elasticsearch};
use crate::loki::Stored;
use crate::support::{ADMIN, Db, TestApp, assert_delivered, postgres_or_skip};

// --- the fake's `_search` ---

fn doc_ts(doc: &Value) -> i64 {
    doc["@timestamp"]
        .as_str()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        .map_or(0, Timestamp::as_nanos)
}

fn parse_ts(value: &Value) -> i64 {
    Timestamp::parse_rfc3339(value.as_str().expect("a date string"))
        .expect("an RFC 3339 date")
        .as_nanos()
}

/// A field's values: a string, or each string of an array.
fn values(doc: &Value, field: &str) -> Vec<String> {
    match &doc[field] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// `query_string` as the reader sends it: words ANDed, `NOT word` and `-word` excluded.
fn query_string(query: &str, doc: &Value) -> bool {
    let message = words(doc["message"].as_str().unwrap_or_default());
    let mut negate = false;
    for token in query.split_whitespace() {
        match token {
            "AND" => continue,
            "NOT" => {
                negate = true;
                continue;
            }
            _ => {}
        }
        let (token, minus) = match token.strip_prefix('-') {
            Some(rest) => (rest, true),
            None => (token, false),
        };
        let present = words(token).iter().all(|w| message.contains(w));
        if present == (negate || minus) {
            return false;
        }
        negate = false;
    }
    true
}

fn matches(query: &Value, id: &str, doc: &Value) -> bool {
    let (kind, spec) = query
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("a query clause");
    let all = |clauses: &Value, want: bool| {
        clauses
            .as_array()
            .is_none_or(|cs| cs.iter().all(|c| matches(c, id, doc) == want))
    };
    match kind.as_str() {
        "bool" => {
            all(&spec["filter"], true) && all(&spec["must"], true) && all(&spec["must_not"], false)
        }
        "match_all" => true,
        "ids" => spec["values"]
            .as_array()
            .expect("ids")
            .iter()
            .any(|v| v == id),
        "term" | "terms" => {
            let (field, wanted) = spec.as_object().unwrap().iter().next().unwrap();
            let wanted: Vec<String> = match wanted {
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
                one => vec![one.as_str().unwrap().to_string()],
            };
            values(doc, field).iter().any(|v| wanted.contains(v))
        }
        "range" => {
            let bounds = &spec["@timestamp"];
            assert_eq!(bounds["format"], "strict_date_optional_time_nanos");
            let ts = doc_ts(doc);
            bounds.get("gte").is_none_or(|v| ts >= parse_ts(v))
                && bounds.get("lt").is_none_or(|v| ts < parse_ts(v))
        }
        "query_string" => {
            assert_eq!(spec["default_field"], "message");
            assert_eq!(spec["default_operator"], "AND");
            query_string(spec["query"].as_str().unwrap(), doc)
        }
        other => panic!("the fake does not know the {other} query"),
    }
}

/// The numeric runtime field the reader defines: the context key, when a number.
fn runtime_value(body: &Value, doc: &Value) -> Option<f64> {
    let field =
        body["runtime_mappings"]["analytics_value"]["script"]["params"]["field"].as_str()?;
    doc["context"][field].as_f64()
}

fn terms_buckets(
    docs: &[&(String, Value)],
    field: &str,
    size: usize,
    sub: &Value,
    body: &Value,
) -> Value {
    let mut counts: HashMap<String, Vec<&(String, Value)>> = HashMap::new();
    for d in docs {
        for v in values(&d.1, field) {
            counts.entry(v).or_default().push(d);
        }
    }
    let mut ranked: Vec<(String, Vec<&(String, Value)>)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let other: usize = ranked.iter().skip(size).map(|(_, d)| d.len()).sum();
    let buckets: Vec<Value> = ranked
        .into_iter()
        .take(size)
        .map(|(key, group)| {
            let mut bucket = json!({"key": key, "doc_count": group.len()});
            add_aggs(&mut bucket, sub, &group, body);
            bucket
        })
        .collect();
    json!({"doc_count_error_upper_bound": 0, "sum_other_doc_count": other, "buckets": buckets})
}

fn add_aggs(out: &mut Value, aggs: &Value, docs: &[&(String, Value)], body: &Value) {
    let Some(aggs) = aggs.as_object() else {
        return;
    };
    for (name, spec) in aggs {
        let sub = spec.get("aggs").cloned().unwrap_or(Value::Null);
        let result = if let Some(h) = spec.get("date_histogram") {
            assert_eq!(h["field"], "@timestamp");
            let secs: i64 = h["fixed_interval"]
                .as_str()
                .unwrap()
                .trim_end_matches('s')
                .parse()
                .unwrap();
            let mut groups: std::collections::BTreeMap<i64, Vec<&(String, Value)>> =
                Default::default();
            for d in docs {
                let ms = doc_ts(&d.1).div_euclid(1_000_000);
                groups
                    .entry(ms.div_euclid(secs * 1000) * secs * 1000)
                    .or_default()
                    .push(d);
            }
            let buckets: Vec<Value> = groups
                .into_iter()
                .map(|(key, group)| {
                    let mut bucket = json!({
                        "key_as_string": Timestamp::from_nanos(key * 1_000_000).to_rfc3339(),
                        "key": key,
                        "doc_count": group.len(),
                    });
                    add_aggs(&mut bucket, &sub, &group, body);
                    bucket
                })
                .collect();
            json!({ "buckets": buckets })
        } else if let Some(t) = spec.get("terms") {
            terms_buckets(
                docs,
                t["field"].as_str().unwrap(),
                t["size"].as_u64().unwrap_or(10) as usize,
                &sub,
                body,
            )
        } else if let Some(f) = spec.get("filter") {
            let group: Vec<&(String, Value)> = docs
                .iter()
                .copied()
                .filter(|d| matches(f, &d.0, &d.1))
                .collect();
            let mut result = json!({"doc_count": group.len()});
            add_aggs(&mut result, &sub, &group, body);
            result
        } else if let Some(s) = spec.get("stats") {
            assert_eq!(s["field"], "analytics_value");
            let v: Vec<f64> = docs
                .iter()
                .filter_map(|d| runtime_value(body, &d.1))
                .collect();
            let n = v.len();
            let sum: f64 = v.iter().sum();
            if n == 0 {
                json!({"count": 0, "min": null, "max": null, "avg": null, "sum": 0.0})
            } else {
                json!({
                    "count": n,
                    "min": v.iter().copied().fold(f64::INFINITY, f64::min),
                    "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "avg": sum / n as f64,
                    "sum": sum,
                })
            }
        } else if let Some(p) = spec.get("percentiles") {
            assert_eq!(p["keyed"], false);
            let mut v: Vec<f64> = docs
                .iter()
                .filter_map(|d| runtime_value(body, &d.1))
                .collect();
            v.sort_by(f64::total_cmp);
            let values: Vec<Value> = p["percents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pct| {
                    let pct = pct.as_f64().unwrap();
                    // Linear interpolation between ranks, as TDigest does on few values.
                    let value = (!v.is_empty()).then(|| {
                        let rank = pct / 100.0 * (v.len() - 1) as f64;
                        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                        v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
                    });
                    json!({"key": pct, "value": value})
                })
                .collect();
            json!({ "values": values })
        } else {
            panic!("the fake does not know the aggregation {spec}");
        };
        out[name] = result;
    }
}

/// Every marked word of the query in the message, as Elasticsearch's highlighter does.
fn highlight(message: &str, query: &str, pre: &str, post: &str) -> String {
    let wanted = words(query);
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if wanted.contains(&word.to_lowercase()) {
            out.push_str(pre);
            out.push_str(word);
            out.push_str(post);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

pub async fn es_search(
    State(state): State<Shared>,
    Path(target): Path<String>,
    body: axum::body::Bytes,
) -> (AxumStatus, String) {
    let body: Value = serde_json::from_slice(&body).expect("a JSON search body");
    // Lucene refuses a query ending in an operator, as Elasticsearch reports it.
    let text = body["query"]["bool"]["must"][0]["query_string"]["query"].as_str();
    if let Some(text) = text.filter(|t| t.trim_end().ends_with("AND")) {
        let reason = format!("Failed to parse query [{text}]");
        return (
            AxumStatus::BAD_REQUEST,
            json!({"error": {"root_cause": [{"type": "query_shard_exception", "reason": reason}],
                "type": "search_phase_execution_exception", "reason": "all shards failed"},
                "status": 400})
            .to_string(),
        );
    }
    let state = state.lock();
    let in_target = |index: &str| match target.strip_suffix('*') {
        Some(prefix) => index.starts_with(prefix),
        None => index == target,
    };
    let mut docs: Vec<(String, Value)> = state
        .docs
        .iter()
        .filter(|((index, id), doc)| in_target(index) && matches(&body["query"], id, doc))
        .map(|((_, id), doc)| (id.clone(), doc.clone()))
        .collect();
    drop(state);
    let descending = body["sort"][0]["@timestamp"]["order"] != "asc";
    docs.sort_by(|a, b| (doc_ts(&a.1), &a.0).cmp(&(doc_ts(&b.1), &b.0)));
    if descending {
        docs.reverse();
    }
    let all: Vec<&(String, Value)> = docs.iter().collect();
    let mut response = json!({
        "took": 2,
        "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"max_score": null, "hits": []},
    });
    if body["track_total_hits"] == true {
        response["hits"]["total"] = json!({"value": docs.len(), "relation": "eq"});
    } else {
        response["hits"]["total"] = json!({"value": docs.len().min(10_000), "relation": "gte"});
    }
    if let Some(aggs) = body.get("aggs") {
        let mut out = json!({});
        add_aggs(&mut out, aggs, &all, &body);
        response["aggregations"] = out;
    }
    let after = body.get("search_after").map(|a| {
        assert_eq!(
            body["sort"][0]["@timestamp"]["format"], "strict_date_optional_time_nanos",
            "search_after carries the formatted date"
        );
        (parse_ts(&a[0]), a[1].as_str().unwrap().to_string())
    });
    let size = body["size"].as_u64().unwrap_or(10) as usize;
    let source_fields: Option<Vec<String>> = body["_source"]
        .as_array()
        .map(|f| f.iter().map(|v| v.as_str().unwrap().to_string()).collect());
    let text = body["query"]["bool"]["must"][0]["query_string"]["query"]
        .as_str()
        .map(String::from);
    let hits: Vec<Value> = docs
        .iter()
        .filter(|(id, doc)| match &after {
            None => true,
            Some(at) if descending => (doc_ts(doc), id.clone()) < *at,
            Some(at) => (doc_ts(doc), id.clone()) > *at,
        })
        .take(size)
        .map(|(id, doc)| {
            let source = match &source_fields {
                Some(fields) => {
                    let kept: Map<String, Value> = fields
                        .iter()
                        .filter_map(|f| doc.get(f).map(|v| (f.clone(), v.clone())))
                        .collect();
                    Value::Object(kept)
                }
                None => doc.clone(),
            };
            let mut hit = json!({
                "_index": "logs-x",
                "_id": id,
                "_score": null,
                "_source": source,
                "sort": [Timestamp::from_nanos(doc_ts(doc)).to_rfc3339(), id],
            });
            if let (Some(h), Some(q)) = (body.get("highlight"), &text) {
                let spec = &h["fields"]["message"];
                hit["highlight"] = json!({"message": [highlight(
                    doc["message"].as_str().unwrap_or_default(),
                    q,
                    spec["pre_tags"][0].as_str().unwrap(),
                    spec["post_tags"][0].as_str().unwrap(),
                )]});
            }
            hit
        })
        .collect();
    response["hits"]["hits"] = Value::Array(hits);
    (AxumStatus::OK, response.to_string())
}

// --- the fake Loki's queries: the LogQL the reader writes, evaluated ---

/// A quoted LogQL string at the start of `text`: its value and the rest.
fn quoted_string(text: &str) -> (String, &str) {
    let rest = text.strip_prefix('"').expect("a quoted string");
    let mut value = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, escaped) = chars.next().expect("an escaped character");
                value.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    other => other,
                });
            }
            '"' => return (value, &rest[i + 1..]),
            c => value.push(c),
        }
    }
    panic!("unterminated string in {text}");
}

/// One stage of a log pipeline.
enum Stage {
    Label {
        name: String,
        op: String,
        value: String,
    },
    Line(regex::Regex),
    Json {
        name: String,
        path: String,
    },
    Unwrap(String),
}

struct LogQuery {
    matchers: Vec<(String, String, String)>,
    stages: Vec<Stage>,
}

fn label_matches(op: &str, actual: &str, value: &str) -> bool {
    let anchored = || regex::Regex::new(&format!("^(?:{value})$")).expect("a label regex");
    match op {
        "=" => actual == value,
        "!=" => actual != value,
        "=~" => anchored().is_match(actual),
        "!~" => !anchored().is_match(actual),
        other => panic!("label operator {other}"),
    }
}

fn parse_log_query(text: &str) -> LogQuery {
    let inner_end = text.find('}').expect("a stream selector");
    let mut selector = text[1..inner_end].trim();
    let mut matchers = Vec::new();
    while !selector.is_empty() {
        let op_at = selector.find(['=', '!']).expect("a matcher");
        let name = selector[..op_at].trim().to_string();
        let op_len = if selector[op_at + 1..].starts_with(['~', '=']) {
            2
        } else {
            1
        };
        let op = selector[op_at..op_at + op_len].to_string();
        let (value, rest) = quoted_string(selector[op_at + op_len..].trim_start());
        matchers.push((name, op, value));
        selector = rest.trim_start().trim_start_matches(',').trim_start();
    }
    let mut rest = text[inner_end + 1..].trim_start();
    let mut stages = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("|~ ") {
            let (value, tail) = quoted_string(after);
            stages.push(Stage::Line(
                regex::Regex::new(&value).expect("a line regex"),
            ));
            rest = tail.trim_start();
        } else if let Some(after) = rest.strip_prefix("| json ") {
            let eq = after.find('=').expect("json name=path");
            let (path, tail) = quoted_string(&after[eq + 1..]);
            stages.push(Stage::Json {
                name: after[..eq].to_string(),
                path,
            });
            rest = tail.trim_start();
        } else if let Some(after) = rest.strip_prefix("| unwrap ") {
            let end = after.find(' ').unwrap_or(after.len());
            stages.push(Stage::Unwrap(after[..end].to_string()));
            rest = after[end..].trim_start();
        } else if let Some(after) = rest.strip_prefix("| ") {
            let op_at = after.find(['=', '!']).expect("a label filter");
            let op_len = if after[op_at + 1..].starts_with(['~', '=']) {
                2
            } else {
                1
            };
            let (value, tail) = quoted_string(&after[op_at + op_len..]);
            stages.push(Stage::Label {
                name: after[..op_at].to_string(),
                op: after[op_at..op_at + op_len].to_string(),
                value,
            });
            rest = tail.trim_start();
        } else {
            panic!("the fake does not read {rest:?}");
        }
    }
    LogQuery { matchers, stages }
}

/// An entry through the query: its labels (stream, metadata, extracted) and unwrapped value.
fn run_log_query(
    query: &LogQuery,
    entry: &Stored,
) -> Option<(BTreeMap<String, String>, Option<f64>)> {
    let mut labels = crate::loki::parse_labels(&entry.labels);
    if !query
        .matchers
        .iter()
        .all(|(n, op, v)| label_matches(op, labels.get(n).map_or("", String::as_str), v))
    {
        return None;
    }
    labels.extend(entry.metadata.clone());
    let mut value = None;
    for stage in &query.stages {
        match stage {
            Stage::Line(regex) => {
                if !regex.is_match(&entry.line) {
                    return None;
                }
            }
            Stage::Json { name, path } => {
                let line: Value = serde_json::from_str(&entry.line).ok()?;
                let pointer = format!("/{}", path.replace('.', "/"));
                match line.pointer(&pointer) {
                    Some(Value::String(s)) => {
                        labels.insert(name.clone(), s.clone());
                    }
                    Some(Value::Number(n)) => {
                        labels.insert(name.clone(), n.to_string());
                    }
                    _ => {}
                }
            }
            Stage::Unwrap(name) => match labels.get(name).and_then(|v| v.parse::<f64>().ok()) {
                Some(v) => value = Some(v),
                None => {
                    labels.insert("__error__".into(), "SampleExtractionErr".into());
                }
            },
            Stage::Label {
                name,
                op,
                value: wanted,
            } => {
                let actual = labels.get(name).map_or("", String::as_str);
                if !label_matches(op, actual, wanted) {
                    return None;
                }
            }
        }
    }
    Some((labels, value))
}

fn query_params(query: &str) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A metric query the reader writes: the aggregation, the log query, the range in ns.
struct MetricQuery {
    kind: String,
    quantile: f64,
    log: LogQuery,
    range: i64,
}

fn parse_metric_query(text: &str) -> MetricQuery {
    let shapes = [
        (
            r"^sum by \(level, service\) \(count_over_time\((.*) \[(\d+)ms\]\)\)$",
            "count_by",
        ),
        (r"^sum\(count_over_time\((.*) \[(\d+)ms\]\)\)$", "count"),
        (r"^min\(min_over_time\((.*) \[(\d+)ms\]\)\)$", "min"),
        (r"^max\(max_over_time\((.*) \[(\d+)ms\]\)\)$", "max"),
        (r"^sum\(sum_over_time\((.*) \[(\d+)ms\]\)\)$", "sum"),
        (
            r"^quantile_over_time\(([0-9.]+), (.*) \[(\d+)ms\]\) by \(analytics_all\)$",
            "quantile",
        ),
    ];
    for (shape, kind) in shapes {
        if let Some(c) = regex::Regex::new(shape).unwrap().captures(text) {
            let (quantile, log, range) = if kind == "quantile" {
                (c[1].parse().unwrap(), &c[2], &c[3])
            } else {
                (0.0, &c[1], &c[2])
            };
            return MetricQuery {
                kind: kind.to_string(),
                quantile,
                log: parse_log_query(log),
                range: range.parse::<i64>().unwrap() * 1_000_000,
            };
        }
    }
    panic!("the fake does not read the metric query {text}");
}

/// The metric at `t` over (t - range, t]: per group (level, service for `count_by`).
fn evaluate(query: &MetricQuery, stored: &[Stored], t: i64) -> Vec<(Value, f64)> {
    let mut groups: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for entry in stored
        .iter()
        .filter(|e| e.ns > t - query.range && e.ns <= t)
    {
        let Some((labels, value)) = run_log_query(&query.log, entry) else {
            continue;
        };
        let key = if query.kind == "count_by" {
            (labels["level"].clone(), labels["service"].clone())
        } else {
            Default::default()
        };
        let sample = if matches!(query.kind.as_str(), "count_by" | "count") {
            1.0
        } else {
            match value {
                Some(v) => v,
                None => continue,
            }
        };
        groups.entry(key).or_default().push(sample);
    }
    groups
        .into_iter()
        .map(|((level, service), mut v)| {
            let metric = if query.kind == "count_by" {
                json!({"level": level, "service": service})
            } else {
                json!({})
            };
            v.sort_by(f64::total_cmp);
            let result = match query.kind.as_str() {
                "count_by" | "count" | "sum" => v.iter().sum(),
                "min" => v[0],
                "max" => v[v.len() - 1],
                _ => {
                    // Prometheus' quantile: linear interpolation between ranks.
                    let rank = query.quantile * (v.len() - 1) as f64;
                    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
                }
            };
            (metric, result)
        })
        .collect()
}

fn seconds(ns: i64) -> f64 {
    ns as f64 / 1e9
}

/// A query's parameters and what the fake holds; the tenant is recorded.
fn query_request(
    state: &crate::loki::Shared,
    headers: &axum::http::HeaderMap,
    raw: Option<String>,
) -> (HashMap<String, String>, Vec<Stored>) {
    let mut state = state.lock();
    if let Some(tenant) = headers.get("x-scope-orgid") {
        state
            .tenants
            .insert(format!("query:{}", tenant.to_str().unwrap_or_default()));
    }
    (query_params(&raw.unwrap_or_default()), state.stored.clone())
}

pub async fn loki_query_range(
    State(state): State<crate::loki::Shared>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> (AxumStatus, String) {
    let (params, stored) = query_request(&state, &headers, raw);
    let start: i64 = params["start"].parse().unwrap();
    let end: i64 = params["end"].parse().unwrap();
    let query = &params["query"];
    if let Some(step) = params.get("step") {
        let step: i64 = step.trim_end_matches('s').parse::<i64>().unwrap() * 1_000_000_000;
        let metric = parse_metric_query(query);
        let mut series: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
        let mut t = start;
        while t <= end {
            for (labels, value) in evaluate(&metric, &stored, t) {
                series
                    .entry(labels.to_string())
                    .or_insert_with(|| (labels.clone(), Vec::new()))
                    .1
                    .push(json!([seconds(t), value.to_string()]));
            }
            t += step;
        }
        let result: Vec<Value> = series
            .into_values()
            .map(|(metric, values)| json!({"metric": metric, "values": values}))
            .collect();
        return (
            AxumStatus::OK,
            json!({"status": "success", "data": {"resultType": "matrix", "result": result}})
                .to_string(),
        );
    }
    let log = parse_log_query(query);
    let limit: usize = params["limit"].parse().unwrap();
    let mut matched: Vec<(i64, BTreeMap<String, String>, String)> = stored
        .iter()
        .filter(|e| e.ns >= start && e.ns < end)
        .filter_map(|e| run_log_query(&log, e).map(|(labels, _)| (e.ns, labels, e.line.clone())))
        .collect();
    matched.sort_by_key(|(ns, _, _)| *ns);
    if params["direction"] == "backward" {
        matched.reverse();
    }
    matched.truncate(limit);
    // Without the categorize-labels flag Loki merges metadata and parsed labels into the
    // stream's labels: one stream per distinct set.
    let mut streams: BTreeMap<String, (BTreeMap<String, String>, Vec<Value>)> = BTreeMap::new();
    for (ns, labels, line) in matched {
        streams
            .entry(format!("{labels:?}"))
            .or_insert_with(|| (labels.clone(), Vec::new()))
            .1
            .push(json!([ns.to_string(), line]));
    }
    let result: Vec<Value> = streams
        .into_values()
        .map(|(stream, values)| json!({"stream": stream, "values": values}))
        .collect();
    (
        AxumStatus::OK,
        json!({"status": "success", "data": {"resultType": "streams", "result": result, "stats": {}}})
            .to_string(),
    )
}

pub async fn loki_query(
    State(state): State<crate::loki::Shared>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> (AxumStatus, String) {
    let (params, stored) = query_request(&state, &headers, raw);
    let time: i64 = params["time"].parse().unwrap();
    let metric = parse_metric_query(&params["query"]);
    let result: Vec<Value> = evaluate(&metric, &stored, time)
        .into_iter()
        .map(|(labels, value)| json!({"metric": labels, "value": [seconds(time), value.to_string()]}))
        .collect();
    (
        AxumStatus::OK,
        json!({"status": "success", "data": {"resultType": "vector", "result": result}})
            .to_string(),
    )
}

// --- the comparison ---

/// 36 entries over the last hour: three services, six levels, three message patterns, a
/// numeric `duration_ms` in most, tags on some, four traces, two entries at the same instant.
fn corpus(now: Timestamp) -> Vec<Value> {
    let levels = ["info", "debug", "warning", "error", "info", "critical"];
    let services = ["api", "web", "db"];
    (0..36)
        .map(|i: i64| {
            // Entry 11 shares entry 10's instant: ties are broken the same on every page.
            let seconds_ago = 3000 - 60 * if i == 11 { 10 } else { i };
            let at = now.saturating_add_nanos(-seconds_ago * 1_000_000_000);
            let message = match i % 3 {
                0 => format!("disk full on node {i}"),
                1 => format!("request served in {} ms", i * 7),
                _ => format!("user {i} logged in"),
            };
            let mut entry = json!({
                "timestamp": at.to_rfc3339(),
                "level": levels[i as usize % levels.len()],
                "service": services[i as usize % services.len()],
                "message": message,
                "trace_id": format!("trace-{}", i % 4),
            });
            if i % 4 != 3 {
                entry["context"] =
                    json!({"duration_ms": i * 3, "kubernetes": {"namespace": "shop"}});
            } else {
                entry["context"] = json!({"duration_ms": "slow"});
            }
            if i % 5 == 0 {
                entry["tags"] = json!(["payments"]);
            }
            entry
        })
        .collect()
}

async fn get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let response = app
        .request(Method::GET, path, Some(ADMIN))
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn key(item: &Value) -> (i64, String) {
    (
        parse_ts(&item["timestamp"]),
        item["id"].as_str().unwrap().to_string(),
    )
}

/// The same entries, in the same order of time; the replica's ties broken by id.
fn assert_same_listing(path: &str, embedded: &Value, external: &Value) {
    let strip = |items: &Value| -> Vec<Value> {
        items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.as_object_mut().unwrap().remove("highlight");
                i
            })
            .collect()
    };
    let (a, b) = (strip(&embedded["items"]), strip(&external["items"]));
    assert!(!a.is_empty(), "{path}: the comparison needs entries");
    assert_eq!(a.len(), b.len(), "{path}: {embedded}\n{external}");
    let times = |items: &[Value]| items.iter().map(|i| key(i).0).collect::<Vec<_>>();
    assert_eq!(times(&a), times(&b), "{path}: order of time");
    let keys: Vec<(i64, String)> = b.iter().map(key).collect();
    let ascending = path.contains("order=asc");
    assert!(
        keys.windows(2)
            .all(|w| if ascending { w[0] < w[1] } else { w[0] > w[1] }),
        "{path}: sorted by (timestamp, id)"
    );
    let by_id = |items: &[Value]| -> HashMap<String, Value> {
        items
            .iter()
            .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
            .collect()
    };
    assert_eq!(
        by_id(&a),
        by_id(&b),
        "{path}: the same entries, field for field"
    );
}

/// Soft-deletes an entry as admin.
async fn delete(app: &TestApp, id: &str) {
    let response = app
        .request(Method::DELETE, &format!("/api/logs/{id}"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Every page of `path` through the replica, by cursor.
async fn pages(app: &TestApp, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let page_path = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let (status, page) = get(app, &page_path).await;
        assert_eq!(status, StatusCode::OK, "{page_path}: {page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
    panic!("{path}: paging does not end");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Engine {
    Elasticsearch,
    Loki,
}

/// Fields the Loki sink does not send (see `read::loki::NOT_IN_LOKI`).
const NOT_IN_LOKI: [&str; 4] = [
    "correlation_id",
    "environment",
    "service_version",
    "created_at",
];

impl Engine {
    /// An embedded entry as this engine can return it.
    fn comparable_entry(self, mut entry: Value) -> Value {
        if self == Engine::Loki
            && let Some(fields) = entry.as_object_mut()
        {
            for field in NOT_IN_LOKI {
                fields.remove(field);
            }
        }
        entry
    }

    fn comparable(self, listing: &Value) -> Value {
        let mut listing = listing.clone();
        if let Some(items) = listing["items"].as_array_mut() {
            for item in items {
                *item = self.comparable_entry(item.take());
            }
        }
        listing
    }
}

/// Listings, searches, pages, lookups and analytics of the corpus agree between the
/// writer's embedded index and the reader's engine (`ids[4]` deleted on the writer).
async fn assert_same_answers(
    writer: &TestApp,
    reader: &TestApp,
    ids: &[String],
    now: Timestamp,
    engine: Engine,
) {
    let start = now.saturating_add_nanos(-3600 * 1_000_000_000).to_rfc3339();
    let middle = now.saturating_add_nanos(-1800 * 1_000_000_000).to_rfc3339();
    let end = now.saturating_add_nanos(60 * 1_000_000_000).to_rfc3339();
    let listings = [
        "/api/logs?limit=1000".to_string(),
        "/api/logs?limit=1000&order=asc".to_string(),
        "/api/logs?service=api&service=db&limit=1000".to_string(),
        "/api/logs?level=error&limit=1000".to_string(),
        "/api/logs?min_level=warning&limit=1000".to_string(),
        "/api/logs?tag=payments&limit=1000".to_string(),
        "/api/logs?trace_id=trace-2&limit=1000".to_string(),
        format!("/api/logs?start={start}&end={middle}&order=asc&limit=1000"),
        "/api/search?q=disk&limit=1000".to_string(),
        "/api/search?q=in%20NOT%20user%20-disk&limit=1000".to_string(),
        "/api/search?q=user%20logged&service=db&limit=1000".to_string(),
    ];
    for path in &listings {
        let (_, embedded) = get(writer, path).await;
        let (status, external) = get(reader, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {external}");
        assert_same_listing(path, &engine.comparable(&embedded), &external);
        if path.starts_with("/api/search") {
            assert_eq!(embedded["total"], external["total"], "{path}");
            if engine == Engine::Elasticsearch {
                let first = &external["items"][0]["highlight"];
                assert!(
                    first["ranges"].as_array().is_some_and(|r| !r.is_empty()),
                    "{path}: {first}"
                );
            }
        }
    }
    let (_, all) = get(reader, "/api/logs?limit=1000").await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        35,
        "the deleted entry is left out"
    );
    for order in ["desc", "asc"] {
        let paged = pages(reader, &format!("/api/logs?limit=4&order={order}")).await;
        let (_, whole) = get(reader, &format!("/api/logs?limit=1000&order={order}")).await;
        assert_eq!(
            &Value::Array(paged),
            &whole["items"],
            "pages of 4 ({order})"
        );
    }
    for id in [&ids[0], &ids[11], &ids[35]] {
        let (_, embedded) = get(writer, &format!("/api/logs/{id}")).await;
        let (status, external) = get(reader, &format!("/api/logs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{external}");
        assert_eq!(
            engine.comparable_entry(embedded),
            external,
            "lookup of {id}"
        );
    }
    let (status, _) = get(reader, &format!("/api/logs/{}", ids[4])).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "deleted on the other replica"
    );

    let analytics =
        format!("/api/analytics?start={start}&end={end}&interval=10m&field=duration_ms");
    let (_, a) = get(writer, &analytics).await;
    let (_, b) = get(reader, &analytics).await;
    for field in ["total", "levels", "timeline", "services"] {
        assert_eq!(a[field], b[field], "analytics {field}:\n{a}\n{b}");
    }
    assert_eq!(a["total"], 35);
    for stat in ["count", "min", "max", "avg"] {
        assert_eq!(
            a["field_stats"][stat], b["field_stats"][stat],
            "{stat}: {a}\n{b}"
        );
    }
    for p in ["p50", "p90", "p95", "p99"] {
        let v = b["field_stats"][p].as_f64().expect(p);
        assert!(
            v >= a["field_stats"]["min"].as_f64().unwrap()
                && v <= a["field_stats"]["max"].as_f64().unwrap()
        );
    }
    let patterns = |body: &Value| -> Vec<(Value, Value)> {
        body["top_patterns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["pattern"].clone(), p["count"].clone()))
            .collect()
    };
    assert_eq!(patterns(&a), patterns(&b));
    assert!(
        a.get("caveats").is_none(),
        "the embedded index is exact: {a}"
    );
    let estimate = match engine {
        Engine::Elasticsearch => "TDigest",
        Engine::Loki => "interpolates",
    };
    let caveats = b["caveats"].as_array().expect("caveats");
    assert!(
        caveats.iter().any(
            |c| c["field"] == "field_stats" && c["reason"].as_str().unwrap().contains(estimate)
        ),
        "{b}"
    );
}

/// Two replicas sharing one PostgreSQL: the writer stores the corpus (and sends it to the
/// engine through its sink) and deletes `ids[4]`; the reader then starts with
/// `LOG_QUERY_BACKEND` set to the engine. Returns (writer, reader, ids, the corpus's now).
async fn replicas(
    engine: Engine,
    real: bool,
    setup: impl Fn(&mut logging_aggregator::config::Config),
) -> (TestApp, TestApp, Vec<String>, Timestamp) {
    let sink = match engine {
        Engine::Elasticsearch => "elasticsearch",
        Engine::Loki => "loki",
    };
    let writer = TestApp::start_with(Db::Postgres, &setup).await;
    let now = Timestamp::now();
    let ids = writer.ingest(corpus(now)).await;
    for _ in 0..200 {
        let report = crate::support::sink_report(&writer, sink).await;
        if report["delivered"] == 36 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_delivered(&writer, sink, 36).await;
    // Deleted on the first replica before the second starts: the second learns it from the
    // shared PostgreSQL.
    delete(&writer, &ids[4]).await;
    let database = writer.pg.as_ref().unwrap().url.clone();
    let reader = TestApp::start_with(Db::Sqlite, |c| {
        setup(c);
        c.database_url = Some(database);
        c.log_query_backend = sink.into();
    })
    .await;
    if real {
        // A real engine makes entries searchable after its refresh or flush.
        for _ in 0..60 {
            let (_, body) = get(&reader, "/api/search?limit=1").await;
            if body["total"] == 35 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    (writer, reader, ids, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_from_elasticsearch_what_the_embedded_index_answers() {
    let Some(_) = postgres_or_skip() else {
        return;
    };
    let real = std::env::var("TEST_ELASTICSEARCH_URL").ok();
    let mut fake = match real {
        Some(_) => None,
        None => Some(FakeEs::start().await),
    };
    let url = real
        .clone()
        .unwrap_or_else(|| fake.as_ref().unwrap().url.clone());
    let index = format!("replica-{}", uuid::Uuid::new_v4().simple());
    let (writer, reader, ids, now) = replicas(Engine::Elasticsearch, real.is_some(), |c| {
        elasticsearch(c, &url);
        c.elasticsearch_index = index.clone();
    })
    .await;
    assert_same_answers(&writer, &reader, &ids, now, Engine::Elasticsearch).await;

    // A query the engine cannot parse is the client's error, named `q`.
    let (status, problem) = get(&reader, "/api/search?q=disk%20AND").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "q", "{problem}");

    // A cursor of the other backend is refused by name, not misread.
    let (_, page) = get(&writer, "/api/logs?limit=2").await;
    let foreign = page["next_cursor"].as_str().unwrap();
    let (status, problem) = get(&reader, &format!("/api/logs?limit=2&cursor={foreign}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "cursor", "{problem}");

    // A deletion made on the other replica after this one started reaches it too.
    delete(&writer, &ids[9]).await;
    let mut hidden = false;
    for _ in 0..100 {
        if get(&reader, &format!("/api/logs/{}", ids[9])).await.0 == StatusCode::NOT_FOUND {
            hidden = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        hidden,
        "a deletion on the writer reaches the reader's reads"
    );

    // A deletion on the replica itself hides the entry from its reads at once.
    delete(&reader, &ids[7]).await;
    let (status, _) = get(&reader, &format!("/api/logs/{}", ids[7])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, all) = get(&reader, "/api/logs?limit=1000").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 33);

    // The engine gone: a 502 that names it, not an empty page.
    if let Some(fake) = fake.as_mut() {
        fake.server().go_away().await;
        let (status, problem) = get(&reader, "/api/logs").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("elasticsearch"),
            "{problem}"
        );
        fake.server().come_back().await;
    } else {
        let client = reqwest::Client::new();
        let _ = client
            .delete(format!("{url}/_index_template/logging-service-{index}"))
            .send()
            .await;
        let _ = client.delete(format!("{url}/{index}-*")).send().await;
    }
    reader.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_from_loki_what_the_embedded_index_answers() {
    let Some(_) = postgres_or_skip() else {
        return;
    };
    let real = std::env::var("TEST_LOKI_URL").ok();
    let fake = match real {
        Some(_) => None,
        None => Some(crate::loki::FakeLoki::start().await),
    };
    let url = real
        .clone()
        .unwrap_or_else(|| fake.as_ref().unwrap().url.clone());
    // A tenant of its own keeps a real Loki's other streams out of the comparison.
    let tenant = format!("replica-{}", uuid::Uuid::new_v4().simple());
    let (writer, reader, ids, now) = replicas(Engine::Loki, real.is_some(), |c| {
        crate::loki::loki(c, &url);
        c.loki_tenant_id = Some(tenant.clone());
    })
    .await;
    assert_same_answers(&writer, &reader, &ids, now, Engine::Loki).await;

    // What Loki does not hold is said, and a filter on it is refused by name.
    let (_, listing) = get(&reader, "/api/logs?limit=1").await;
    let caveats = listing["caveats"].as_array().expect("caveats");
    assert!(
        caveats
            .iter()
            .any(|c| c["field"] == "items"
                && c["reason"].as_str().unwrap().contains("correlation_id")),
        "{listing}"
    );
    assert!(
        caveats.iter().any(|c| c["field"] == "start"),
        "the lookback is said: {listing}"
    );
    let (status, problem) = get(&reader, "/api/logs?correlation_id=c-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "correlation_id", "{problem}");
    let (status, problem) = get(&reader, "/api/search?q=service:api").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "q", "{problem}");
    if let Some(fake) = &fake {
        assert!(
            fake.state
                .lock()
                .tenants
                .contains(&format!("query:{tenant}")),
            "queries carry X-Scope-OrgID"
        );
    }
    reader.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_backend_without_its_engine_stops_the_start_with_the_setting_named() {
    for (backend, wanted) in [
        ("elasticsearch", "ELASTICSEARCH_URL"),
        ("loki", "LOKI_URL"),
        ("solr", "expected embedded, elasticsearch or loki"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::support::test_config(dir.path().to_path_buf());
        config.log_query_backend = backend.into();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("LOG_QUERY_BACKEND"), "{error}");
        assert!(error.contains(wanted), "{backend}: {error}");
    }
}
