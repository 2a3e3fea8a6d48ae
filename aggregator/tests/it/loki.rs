//! The Loki sink against a local HTTP server that answers as Loki's distributor does: it
//! decodes the snappy protobuf with its own copy of Loki's `push.proto` (not the sink's),
//! keeps entries per stream dropping exact duplicates as Loki does, and can answer 429, 400
//! or go away entirely. With `TEST_LOKI_URL` set, `a_real_loki_stores_what_the_sink_sends`
//! runs against that server too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use logging_aggregator::config::Config;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::support::{
    Db, LocalServer, TestApp, assert_delivered, assert_failing, entry, ingest_rounds, sink_report,
    wait_for_sink,
};

/// Loki's `pkg/push/push.proto`, as the test's own prost definitions.
mod push {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPair>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// One stored entry as the fake Loki keeps it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub labels: String,
    pub ns: i64,
    pub line: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct LokiState {
    pub stored: Vec<Stored>,
    /// (labels, ns, line) already held: Loki ignores an identical entry.
    seen: HashSet<(String, i64, String)>,
    /// Entries in pushes answered 204, repeats included: what the sink sent and Loki took,
    /// so a test can tell "stored once" from "sent twice and deduplicated".
    pub accepted: usize,
    requests: usize,
    /// Requests still to be answered 429.
    throttle: usize,
    pub tenants: HashSet<String>,
    /// Per request: was each stream's entries sorted by time?
    unsorted_streams: usize,
}

pub type Shared = Arc<Mutex<LokiState>>;

/// A stream's label text (`{a="x", b="y"}`) as a map.
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .expect("labels in braces");
    let mut out = BTreeMap::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").expect("name=\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("closing quote");
            match c {
                '\\' => value.push(chars.next().expect("escaped").1),
                '"' => break i,
                c => value.push(c),
            }
        };
        out.insert(name.trim().to_string(), value);
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    out
}

async fn push(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (AxumStatus, String) {
    let mut state = state.lock();
    state.requests += 1;
    if let Some(tenant) = headers.get("x-scope-orgid") {
        state
            .tenants
            .insert(tenant.to_str().unwrap_or_default().to_string());
    }
    if state.throttle > 0 {
        state.throttle -= 1;
        return (
            AxumStatus::TOO_MANY_REQUESTS,
            "Ingestion rate limit exceeded".into(),
        );
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let streams: Vec<push::Stream> = if content_type == "application/x-protobuf" {
        let Ok(raw) = snap::raw::Decoder::new().decompress_vec(&body) else {
            return (AxumStatus::BAD_REQUEST, "snappy: corrupt input".into());
        };
        match <push::PushRequest as prost::Message>::decode(raw.as_slice()) {
            Ok(request) => request.streams,
            Err(e) => return (AxumStatus::BAD_REQUEST, e.to_string()),
        }
    } else if content_type == "application/json" {
        let value: Value = serde_json::from_slice(&body).expect("JSON push");
        value["streams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(s["stream"].clone()).unwrap();
                let text = labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                push::Stream {
                    labels: format!("{{{text}}}"),
                    hash: 0,
                    entries: s["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| {
                            let ns: i64 = v[0].as_str().unwrap().parse().unwrap();
                            push::Entry {
                                timestamp: Some(push::Timestamp {
                                    seconds: ns.div_euclid(1_000_000_000),
                                    nanos: ns.rem_euclid(1_000_000_000) as i32,
                                }),
                                line: v[1].as_str().unwrap().to_string(),
                                structured_metadata: v[2]
                                    .as_object()
                                    .unwrap()
                                    .iter()
                                    .map(|(k, v)| push::LabelPair {
                                        name: k.clone(),
                                        value: v.as_str().unwrap().to_string(),
                                    })
                                    .collect(),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    } else {
        return (
            AxumStatus::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type {content_type:?}"),
        );
    };
    // Loki validates the whole request first: one invalid entry fails it with 400.
    for stream in &streams {
        for entry in &stream.entries {
            if entry.line.contains("poison") {
                return (
                    AxumStatus::BAD_REQUEST,
                    format!(
                        "entry for stream '{}' has timestamp too old: 1970-01-01T00:00:00Z",
                        stream.labels
                    ),
                );
            }
        }
    }
    state.accepted += streams.iter().map(|s| s.entries.len()).sum::<usize>();
    for stream in streams {
        let times: Vec<i64> = stream
            .entries
            .iter()
            .map(|e| {
                let t = e.timestamp.clone().unwrap();
                t.seconds * 1_000_000_000 + i64::from(t.nanos)
            })
            .collect();
        if times.windows(2).any(|w| w[0] > w[1]) {
            state.unsorted_streams += 1;
        }
        for (entry, ns) in stream.entries.into_iter().zip(times) {
            let key = (stream.labels.clone(), ns, entry.line.clone());
            if !state.seen.insert(key) {
                continue;
            }
            state.stored.push(Stored {
                labels: stream.labels.clone(),
                ns,
                line: entry.line,
                metadata: entry
                    .structured_metadata
                    .into_iter()
                    .map(|p| (p.name, p.value))
                    .collect(),
            });
        }
    }
    (AxumStatus::NO_CONTENT, String::new())
}

pub struct FakeLoki {
    pub server: LocalServer,
    pub url: String,
    pub state: Shared,
}

impl FakeLoki {
    pub async fn start() -> FakeLoki {
        let state = Shared::default();
        let router = axum::Router::new()
            .route("/loki/api/v1/push", axum::routing::post(push))
            .route(
                "/loki/api/v1/query_range",
                axum::routing::get(crate::query_backends::loki_query_range),
            )
            .route(
                "/loki/api/v1/query",
                axum::routing::get(crate::query_backends::loki_query),
            )
            .with_state(state.clone());
        let server = LocalServer::start(router).await;
        FakeLoki {
            url: server.url.clone(),
            server,
            state,
        }
    }

    fn stored(&self) -> Vec<Stored> {
        self.state.lock().stored.clone()
    }

    async fn wait_for(&self, count: usize, seconds: u64) -> Vec<Stored> {
        for _ in 0..seconds * 20 {
            let stored = self.stored();
            if stored.len() >= count {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "Loki holds {} entries, expected {count}",
            self.stored().len()
        );
    }
}

pub fn loki(config: &mut Config, url: &str) {
    config.loki_url = Some(url.to_string());
    config.loki_tenant_id = Some("team-a".into());
    config.loki_labels = vec!["cluster=test-1".into()];
    config.alert_rules = Vec::new();
}

/// The entries' ids, as the fake Loki stored them (structured metadata `id`).
fn ids(stored: &[Stored]) -> Vec<String> {
    stored.iter().map(|s| s.metadata["id"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reach_loki_as_snappy_protobuf_with_labels_metadata_and_json_lines() {
    let fake = FakeLoki::start().await;
    let app = TestApp::start_with(Db::Sqlite, |c| loki(c, &fake.url)).await;
    let mut first = entry("checkout", "error", "payment declined", 5);
    first["context"] = json!({
        "kubernetes": {"namespace": "shop", "pod": "checkout-7d9f-x2", "container": "app", "node": "node-1"},
        "order_id": 4711,
    });
    first["trace_id"] = json!("4bf92f3577b34da6a3ce929d0e0e4736");
    first["span_id"] = json!("00f067aa0ba902b7");
    first["request_id"] = json!("req-1");
    first["user_id"] = json!("u-9");
    first["tags"] = json!(["payments"]);
    let mut second = entry("checkout", "error", "payment declined again", 9);
    second["context"] = json!({"kubernetes": first["context"]["kubernetes"].clone()});
    let third = entry("search", "info", "quote \" and \\ in a line", 1);
    let mut huge = entry("search", "info", "", 2);
    huge["message"] = json!("x".repeat(300 * 1024));
    let sent = app
        .ingest(vec![first.clone(), second.clone(), third, huge])
        .await;
    let stored = fake.wait_for(4, 20).await;
    assert_eq!(stored.len(), 4);
    assert_eq!(
        ids(&stored).into_iter().collect::<HashSet<_>>(),
        sent.iter().cloned().collect::<HashSet<_>>()
    );
    {
        let state = fake.state.lock();
        assert_eq!(state.tenants, HashSet::from(["team-a".to_string()]));
        assert_eq!(state.unsorted_streams, 0, "entries sorted per stream");
    }

    let by_id: HashMap<String, Stored> = stored
        .iter()
        .map(|s| (s.metadata["id"].clone(), s.clone()))
        .collect();
    let one = &by_id[&sent[0]];
    assert_eq!(
        parse_labels(&one.labels),
        BTreeMap::from(
            [
                ("cluster", "test-1"),
                ("container", "app"),
                ("level", "error"),
                ("namespace", "shop"),
                ("node", "node-1"),
                ("service", "checkout"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        )
    );
    assert_eq!(
        one.metadata,
        BTreeMap::from(
            [
                ("id", sent[0].as_str()),
                ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
                ("span_id", "00f067aa0ba902b7"),
                ("request_id", "req-1"),
                ("user_id", "u-9"),
                ("pod", "checkout-7d9f-x2"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        )
    );
    let line: Value = serde_json::from_str(&one.line).unwrap();
    assert_eq!(line["message"], "payment declined");
    assert_eq!(line["context"]["order_id"], 4711);
    assert_eq!(line["tags"], json!(["payments"]));
    let expected_ns =
        logging_common::Timestamp::parse_rfc3339(first["timestamp"].as_str().unwrap())
            .unwrap()
            .as_nanos();
    assert_eq!(one.ns, expected_ns);

    // The same stream, in time order (the second is older, so it comes first).
    let two = &by_id[&sent[1]];
    assert_eq!(one.labels, two.labels);
    assert_eq!(two.metadata.keys().collect::<Vec<_>>(), ["id", "pod"]);
    let checkout: Vec<&Stored> = stored.iter().filter(|s| s.labels == one.labels).collect();
    assert_eq!(checkout.len(), 2);
    assert_eq!(checkout[0].metadata["id"], sent[1]);

    // No kubernetes context: only service, level and the static label; a bare message.
    let three = &by_id[&sent[2]];
    assert_eq!(
        parse_labels(&three.labels).keys().collect::<Vec<_>>(),
        ["cluster", "level", "service"]
    );
    assert_eq!(three.metadata.keys().collect::<Vec<_>>(), ["id"]);
    let line: Value = serde_json::from_str(&three.line).unwrap();
    assert_eq!(line, json!({"message": "quote \" and \\ in a line"}));

    // Over Loki's 256 KiB line limit: cut to fit and marked.
    let big = &by_id[&sent[3]];
    assert!(big.line.len() <= 256 * 1024, "{}", big.line.len());
    let line: Value = serde_json::from_str(&big.line).unwrap();
    assert_eq!(line["truncated"], true);
    assert!(line["message"].as_str().unwrap().len() > 250 * 1024);

    assert_delivered(&app, "loki", 4).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_fallback_carries_the_same_streams() {
    let fake = FakeLoki::start().await;
    let app = TestApp::start_with(Db::Sqlite, |c| {
        loki(c, &fake.url);
        c.loki_format = "json".into();
    })
    .await;
    let mut one = entry("api", "warning", "slow upstream", 1);
    one["trace_id"] = json!("abc");
    let sent = app.ingest(vec![one]).await;
    let stored = fake.wait_for(1, 20).await;
    assert_eq!(ids(&stored), sent);
    assert_eq!(
        parse_labels(&stored[0].labels)["level"],
        "warning",
        "{:?}",
        stored[0]
    );
    assert_eq!(stored[0].metadata["trace_id"], "abc");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_entry_is_dead_lettered_and_costs_its_neighbours_nothing() {
    let fake = FakeLoki::start().await;
    fake.state.lock().throttle = 2;
    let app = TestApp::start_with(Db::Sqlite, |c| loki(c, &fake.url)).await;
    let mut batch: Vec<Value> = (0..40)
        .map(|i| entry("api", "info", &format!("request {i} served"), 1))
        .collect();
    batch[17] = entry("api", "info", "a poison entry", 1);
    let sent = app.ingest(batch).await;
    // The first two attempts are throttled (429) and retried; then the 400 isolates the
    // one refused entry.
    let stored = fake.wait_for(39, 30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored_ids: HashSet<String> = ids(&fake.stored()).into_iter().collect();
    assert_eq!(stored.len(), 39);
    assert_eq!(stored_ids.len(), 39, "each entry stored once");
    assert_eq!(fake.state.lock().accepted, 39, "and sent once");
    assert!(!stored_ids.contains(&sent[17]));
    let report = sink_report(&app, "loki").await;
    assert_eq!(report["dead_letters"], 1, "{report}");
    assert_eq!(report["delivered"], 39, "{report}");
    assert!(report["errors"].as_u64().unwrap() >= 2, "{report}");
    let dead = std::fs::read_to_string(report["dead_letter_file"].as_str().unwrap()).unwrap();
    let lines: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["sink"], "loki");
    assert_eq!(lines[0]["entry"]["id"], sent[17]);
    assert_eq!(lines[0]["entry"]["message"], "a poison entry");
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("400 Bad Request: entry for stream"),
        "{}",
        lines[0]
    );
    let metrics = app.metrics().await;
    assert!(metrics.contains("logging_aggregator_sink_dead_letters_total{sink=\"loki\"} 1"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loki_gone_for_thirty_seconds_and_a_restart_lose_and_double_nothing() {
    let mut fake = FakeLoki::start().await;
    let mut app = TestApp::start_with(Db::Sqlite, |c| loki(c, &fake.url)).await;
    let mut sent = ingest_rounds(&app, "web", "before", 5, 20).await;
    fake.wait_for(100, 20).await;

    fake.server.go_away().await;
    let gone = std::time::Instant::now();
    // Ingest and queries go on while Loki is away; the sink falls behind and says so.
    sent.extend(ingest_rounds(&app, "web", "during", 10, 50).await);
    let stats = app.get_json("/api/logs/stats").await;
    assert_eq!(stats["services"]["web"], 600, "{stats}");
    assert_failing(&app, "loki", 500, "Loki unreachable").await;
    let ready = app
        .request(reqwest::Method::GET, "/health/ready", None)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "an optional sink down leaves the aggregator ready"
    );
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");

    // A restart while Loki is away: the cursor is where deliveries stopped.
    app.restart(|c| loki(c, &fake.url)).await;
    sent.extend(ingest_rounds(&app, "web", "after restart", 4, 25).await);
    let away = Duration::from_secs(30).saturating_sub(gone.elapsed());
    tokio::time::sleep(away).await;
    fake.server.come_back().await;
    let stored = fake.wait_for(sent.len(), 90).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored_ids = ids(&fake.stored());
    assert_eq!(stored.len(), 700);
    assert_eq!(stored_ids.len(), 700, "nothing stored twice");
    // A graceful restart with Loki away leaves nothing in flight: nothing is sent twice
    // either (Loki's own dedup would hide it).
    assert_eq!(fake.state.lock().accepted, 700, "nothing sent twice");
    assert_eq!(
        stored_ids.into_iter().collect::<HashSet<_>>(),
        sent.into_iter().collect::<HashSet<_>>(),
        "everything arrives"
    );
    let report = wait_for_sink(&app, "loki", |report| {
        report["lag_entries"] == 0 && report["status"] == "up"
    })
    .await;
    assert_eq!(report["lag_entries"], 0, "{report}");
    assert_eq!(report["status"], "up", "{report}");
    app.stop().await;
}

#[tokio::test]
async fn bad_loki_settings_stop_the_start_with_the_setting_named() {
    crate::support::assert_refused(vec![
        (
            Box::new(|c: &mut Config| c.loki_url = Some("loki:3100".into()))
                as Box<dyn Fn(&mut Config)>,
            "LOKI_URL",
        ),
        (
            Box::new(|c: &mut Config| {
                c.loki_url = Some("http://loki:3100".into());
                c.loki_labels = vec!["service=x".into()];
            }),
            "LOKI_LABELS",
        ),
        (
            Box::new(|c: &mut Config| {
                c.loki_url = Some("http://loki:3100".into());
                c.loki_labels = (0..11).map(|i| format!("l{i}=v")).collect();
            }),
            "LOKI_LABELS",
        ),
        (
            Box::new(|c: &mut Config| {
                c.loki_url = Some("http://loki:3100".into());
                c.loki_labels = vec!["bad-name=v".into()];
            }),
            "LOKI_LABELS",
        ),
        (
            Box::new(|c: &mut Config| {
                c.loki_url = Some("http://loki:3100".into());
                c.loki_format = "xml".into();
            }),
            "LOKI_FORMAT",
        ),
    ]);
}

/// Against a real Loki when `TEST_LOKI_URL` is set (e.g. `deploy/compose`'s): what the sink
/// pushes comes back from `query_range` with its labels and metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(real_loki), ignore = "TEST_LOKI_URL is not set")]
async fn a_real_loki_stores_what_the_sink_sends() {
    let url = std::env::var("TEST_LOKI_URL")
        .expect("built with TEST_LOKI_URL set: set it when running the test too");
    let app = TestApp::start_with(Db::Sqlite, |c| {
        loki(c, &url);
        c.loki_tenant_id = None;
    })
    .await;
    let service = format!("sink-test-{}", uuid::Uuid::new_v4().simple());
    let mut one = entry(&service, "error", "real loki round trip", 1);
    one["trace_id"] = json!("trace-1");
    let sent = app.ingest(vec![one]).await;
    let client = reqwest::Client::new();
    let query = format!("{{service=\"{service}\"}}");
    let mut body = Value::Null;
    for _ in 0..120 {
        body = client
            .get(
                reqwest::Url::parse_with_params(
                    &format!("{url}/loki/api/v1/query_range"),
                    &[("query", query.as_str()), ("since", "1h")],
                )
                .unwrap(),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let result = &body["data"]["result"][0];
    assert_eq!(result["stream"]["level"], "error", "{body}");
    assert_eq!(result["stream"]["cluster"], "test-1", "{body}");
    let line: Value = serde_json::from_str(result["values"][0][1].as_str().unwrap()).unwrap();
    assert_eq!(line["message"], "real loki round trip");
    assert!(
        body.to_string().contains(&sent[0]),
        "the id as metadata: {body}"
    );
    app.stop().await;
}

/// `SHUTDOWN_DRAIN_SECONDS`: a replica whose data directory goes with it hands every entry to
/// the sinks before it exits, even when the engine first pushes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_shutdown_delivers_every_entry_before_it_exits() {
    let fake = FakeLoki::start().await;
    // Three 429s: with the sink's backoff, about 3.5 s before the first push is accepted.
    fake.state.lock().throttle = 3;
    let app = TestApp::start_with(Db::Sqlite, |c| {
        loki(c, &fake.url);
        c.shutdown_drain_seconds = 120;
    })
    .await;
    let sent = app
        .ingest(
            (0..50)
                .map(|i| entry("api", "info", &format!("drained {i}"), 1))
                .collect(),
        )
        .await;
    app.stop().await;
    let stored: HashSet<String> = ids(&fake.stored()).into_iter().collect();
    assert_eq!(stored, sent.into_iter().collect::<HashSet<_>>());
    assert!(fake.state.lock().requests > 3, "Loki pushed back first");
}
