//! `LOG_QUERY_BACKEND`: a second aggregator replica, sharing the first one's PostgreSQL,
//! answers listings, searches, lookups and analytics from the engine the first one's sinks
//! filled, with the same answers as the first one's embedded index.
//!
//! Elasticsearch is the fake of `elasticsearch.rs`, which here also answers `_search` by
//! evaluating the query DSL the reader sends (bool filters, `ids`, `query_string` words,
//! sort and `search_after`, `track_total_hits`, `date_histogram`/`terms`/`filter`/`stats`/
//! `percentiles` aggregations over the runtime field). With `TEST_ELASTICSEARCH_URL` set, the
//! same comparison runs against that server.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode as AxumStatus;
use logging_common::Timestamp;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::elasticsearch::{FakeEs, Shared, elasticsearch};
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
    let writer = TestApp::start_with(Db::Postgres, |c| {
        elasticsearch(c, &url);
        c.elasticsearch_index = index.clone();
    })
    .await;
    let now = Timestamp::now();
    let ids = writer.ingest(corpus(now)).await;
    for _ in 0..200 {
        let report = crate::support::sink_report(&writer, "elasticsearch").await;
        if report["delivered"] == 36 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_delivered(&writer, "elasticsearch", 36).await;
    // Deleted on the first replica before the second starts: the second learns it from the
    // shared PostgreSQL.
    let deleted = writer
        .request(
            Method::DELETE,
            &format!("/api/logs/{}", ids[4]),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);

    let database = writer.pg.as_ref().unwrap().url.clone();
    let reader = TestApp::start_with(Db::Sqlite, |c| {
        elasticsearch(c, &url);
        c.elasticsearch_index = index.clone();
        c.database_url = Some(database);
        c.log_query_backend = "elasticsearch".into();
    })
    .await;
    if real.is_some() {
        // A real cluster makes documents searchable after its refresh interval.
        for _ in 0..60 {
            let (_, body) = get(&reader, "/api/search?limit=1").await;
            if body["total"] == 35 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

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
        let (_, embedded) = get(&writer, path).await;
        let (_, external) = get(&reader, path).await;
        assert_same_listing(path, &embedded, &external);
        if path.starts_with("/api/search") {
            assert_eq!(embedded["total"], external["total"], "{path}");
            let first = &external["items"][0]["highlight"];
            assert!(
                first["ranges"].as_array().is_some_and(|r| !r.is_empty()),
                "{path}: {first}"
            );
        }
    }
    let (_, all) = get(&reader, "/api/logs?limit=1000").await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        35,
        "the deleted entry is left out"
    );
    for order in ["desc", "asc"] {
        let paged = pages(&reader, &format!("/api/logs?limit=4&order={order}")).await;
        let (_, whole) = get(&reader, &format!("/api/logs?limit=1000&order={order}")).await;
        assert_eq!(
            &Value::Array(paged),
            &whole["items"],
            "pages of 4 ({order})"
        );
    }
    for id in [&ids[0], &ids[11], &ids[35]] {
        let (_, embedded) = get(&writer, &format!("/api/logs/{id}")).await;
        let (status, external) = get(&reader, &format!("/api/logs/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(embedded, external, "lookup of {id}");
    }
    let (status, _) = get(&reader, &format!("/api/logs/{}", ids[4])).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "deleted on the other replica"
    );

    let analytics =
        format!("/api/analytics?start={start}&end={end}&interval=10m&field=duration_ms");
    let (_, a) = get(&writer, &analytics).await;
    let (_, b) = get(&reader, &analytics).await;
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
    let caveats = b["caveats"].as_array().expect("caveats");
    assert!(
        caveats
            .iter()
            .any(|c| c["field"] == "field_stats"
                && c["reason"].as_str().unwrap().contains("TDigest")),
        "{b}"
    );

    // A cursor of the other backend is refused by name, not misread.
    let (_, page) = get(&writer, "/api/logs?limit=2").await;
    let foreign = page["next_cursor"].as_str().unwrap();
    let (status, problem) = get(&reader, &format!("/api/logs?limit=2&cursor={foreign}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "cursor", "{problem}");

    // A deletion on the replica itself hides the entry from its reads at once.
    let deleted = reader
        .request(
            Method::DELETE,
            &format!("/api/logs/{}", ids[7]),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    let (status, _) = get(&reader, &format!("/api/logs/{}", ids[7])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, all) = get(&reader, "/api/logs?limit=1000").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 34);

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
