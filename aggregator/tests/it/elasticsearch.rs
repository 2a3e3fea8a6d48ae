//! The Elasticsearch sink against a local HTTP server that answers as Elasticsearch does:
//! `_index_template` stores the template, `_bulk` reads the NDJSON pairs, `create` answers 409
//! for an id the index holds, and the answer is 200 with per-item statuses even when items
//! fail (429 for a busy node, 400 `document_parsing_exception` for a document the mapping
//! refuses). It can lose an answer after storing, go away entirely, and serve over TLS with
//! its own CA. With `TEST_ELASTICSEARCH_URL` set, `a_real_elasticsearch_stores_what_the_sink_sends`
//! runs against that server too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use logging_aggregator::config::Config;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::support::{
    Db, LocalServer, TestApp, assert_delivered, assert_failing, entry, ingest_rounds, sink_report,
    wait_for_sink,
};

#[derive(Default)]
pub struct EsState {
    /// Template name → body, in the order installed.
    templates: Vec<(String, Value)>,
    /// (index, id) → document.
    pub docs: HashMap<(String, String), Value>,
    /// What happened, in order: "template" or "bulk:<items>".
    events: Vec<String>,
    /// `create` actions for an id already held (answered 409).
    conflicts: usize,
    authorizations: HashSet<String>,
    content_types: HashSet<String>,
    /// Bulk requests still to be processed and then answered 502, as when a proxy loses
    /// the answer.
    lose_answers: usize,
    /// Items whose message contains "busy" are answered 429 in the first this many requests.
    busy_requests: usize,
    bulk_requests: usize,
    /// `_bulk` requests are read and never answered, as by a node that hangs.
    hang: bool,
}

pub type Shared = Arc<Mutex<EsState>>;

fn record_headers(state: &mut EsState, headers: &HeaderMap) {
    if let Some(value) = headers.get("authorization") {
        state
            .authorizations
            .insert(value.to_str().unwrap_or_default().to_string());
    }
}

async fn put_template(
    State(state): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (AxumStatus, String) {
    let mut state = state.lock();
    record_headers(&mut state, &headers);
    let Ok(template) = serde_json::from_slice::<Value>(&body) else {
        return (AxumStatus::BAD_REQUEST, "not JSON".into());
    };
    state.events.push("template".into());
    state.templates.retain(|(n, _)| *n != name);
    state.templates.push((name, template));
    (AxumStatus::OK, r#"{"acknowledged":true}"#.into())
}

fn item(index: &str, id: &str, status: u16, error: Option<Value>) -> Value {
    let mut result = json!({"_index": index, "_id": id, "status": status});
    match error {
        Some(error) => result["error"] = error,
        None => {
            result["_version"] = json!(1);
            result["result"] = json!("created");
            result["_shards"] = json!({"total": 2, "successful": 1, "failed": 0});
            result["_seq_no"] = json!(0);
            result["_primary_term"] = json!(1);
        }
    }
    json!({ "create": result })
}

async fn bulk(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (AxumStatus, String) {
    let hang = {
        let mut state = state.lock();
        if state.hang {
            state.events.push("hung".into());
        }
        state.hang
    };
    if hang {
        std::future::pending::<()>().await;
    }
    let mut state = state.lock();
    record_headers(&mut state, &headers);
    if let Some(value) = headers.get("content-type") {
        state
            .content_types
            .insert(value.to_str().unwrap_or_default().to_string());
    }
    state.bulk_requests += 1;
    let text = String::from_utf8(body.to_vec()).expect("UTF-8 NDJSON");
    assert!(text.ends_with('\n'), "_bulk bodies end with a newline");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() % 2, 0, "action and document pairs");
    let mut items = Vec::new();
    let mut errors = false;
    for pair in lines.chunks(2) {
        let action: Value = serde_json::from_str(pair[0]).expect("action JSON");
        let create = action
            .get("create")
            .unwrap_or_else(|| panic!("only create actions: {action}"));
        let index = create["_index"].as_str().expect("_index").to_string();
        let id = create["_id"].as_str().expect("_id").to_string();
        let doc: Value = serde_json::from_str(pair[1]).expect("document JSON");
        let message = doc["message"].as_str().unwrap_or_default();
        if message.contains("busy") && state.bulk_requests <= state.busy_requests {
            errors = true;
            items.push(item(&index, &id, 429, Some(json!({
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1000, max_coordinating_and_primary_bytes=0]",
            }))));
            continue;
        }
        if message.contains("mapping-bomb") || doc.get("@timestamp").is_none() {
            errors = true;
            items.push(item(&index, &id, 400, Some(json!({
                "type": "document_parsing_exception",
                "reason": format!("[1:52] failed to parse field [context] of type [flattened] in document with id '{id}'. Preview of field's value: 'too deep'"),
                "caused_by": {"type": "illegal_argument_exception", "reason": "the provided [flattened] field [context] exceeds the maximum depth limit of [64]"},
            }))));
            continue;
        }
        let key = (index.clone(), id.clone());
        if state.docs.contains_key(&key) {
            errors = true;
            state.conflicts += 1;
            items.push(item(&index, &id, 409, Some(json!({
                "type": "version_conflict_engine_exception",
                "reason": format!("[{id}]: version conflict, document already exists (current version [1])"),
                "index_uuid": "aAsFqTI0Tc2W0LCWgPNrOA",
                "shard": "0",
                "index": index,
            }))));
            continue;
        }
        state.docs.insert(key, doc);
        items.push(item(&index, &id, 201, None));
    }
    state.events.push(format!("bulk:{}", items.len()));
    if state.lose_answers > 0 {
        state.lose_answers -= 1;
        return (AxumStatus::BAD_GATEWAY, "upstream connect error".into());
    }
    (
        AxumStatus::OK,
        json!({"took": 3, "errors": errors, "items": items}).to_string(),
    )
}

fn router(state: Shared) -> axum::Router {
    axum::Router::new()
        .route("/_index_template/{name}", axum::routing::put(put_template))
        .route("/_bulk", axum::routing::post(bulk))
        .route(
            "/{target}/_search",
            axum::routing::post(crate::query_backends::es_search),
        )
        .with_state(state)
}

pub struct FakeEs {
    pub url: String,
    pub state: Shared,
    /// Plain HTTP, which the test can take away; `None` over TLS.
    server: Option<LocalServer>,
}

impl FakeEs {
    pub async fn start() -> FakeEs {
        let state = Shared::default();
        let server = LocalServer::start(router(state.clone())).await;
        FakeEs {
            url: server.url.clone(),
            state,
            server: Some(server),
        }
    }

    /// Over TLS with a certificate from a CA of its own; returns the CA's PEM file too.
    async fn start_tls(dir: &std::path::Path) -> (FakeEs, std::path::PathBuf) {
        use rustls_pki_types::pem::PemObject;
        let paths = logging_aggregator::certs::generate(
            dir,
            &["127.0.0.1".to_string(), "localhost".to_string()],
            "unused",
        )
        .unwrap();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&paths.server)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&paths.server_key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let state = Shared::default();
        let server = logging_aggregator::listeners::serve(
            "fake-elasticsearch",
            listener,
            logging_aggregator::ingest::listener::TlsHandshake::new(Arc::new(config)),
            router(state.clone()),
            logging_aggregator::listeners::Limits::of(&Default::default()),
            stopped,
        );
        tokio::spawn(async move {
            let _stop = stop;
            let _ = server.await;
        });
        (
            FakeEs {
                url: format!("https://localhost:{}", address.port()),
                state,
                server: None,
            },
            paths.ca,
        )
    }

    pub fn server(&mut self) -> &mut LocalServer {
        self.server.as_mut().expect("plain HTTP")
    }

    fn ids(&self) -> HashSet<String> {
        self.state
            .lock()
            .docs
            .keys()
            .map(|(_, id)| id.clone())
            .collect()
    }

    pub async fn wait_for(&self, count: usize, seconds: u64) {
        for _ in 0..seconds * 20 {
            if self.state.lock().docs.len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "Elasticsearch holds {} documents, expected {count}",
            self.state.lock().docs.len()
        );
    }
}

pub fn elasticsearch(config: &mut Config, url: &str) {
    config.elasticsearch_url = Some(url.to_string());
    config.alert_rules = Vec::new();
}

/// `logs-YYYY.MM.DD` of an RFC 3339 timestamp.
fn daily_index(prefix: &str, timestamp: &str) -> String {
    format!("{prefix}-{}", timestamp[..10].replace('-', "."))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reach_elasticsearch_over_tls_as_bulk_creates_under_an_index_template() {
    let certs = tempfile::tempdir().unwrap();
    let (fake, ca) = FakeEs::start_tls(certs.path()).await;
    let app = TestApp::start_with(Db::Sqlite, |c| {
        elasticsearch(c, &fake.url);
        c.elasticsearch_api_key =
            Some("VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==".into());
        c.elasticsearch_ca_cert = Some(ca.clone());
    })
    .await;
    let mut first = entry("checkout", "error", "payment declined", 5);
    first["context"] = json!({
        "kubernetes": {"namespace": "shop", "pod": "checkout-7d9f-x2"},
        "order_id": 4711,
        "deeply": {"nested": {"keys": ["never", "mapped"]}},
    });
    first["trace_id"] = json!("4bf92f3577b34da6a3ce929d0e0e4736");
    first["tags"] = json!(["payments"]);
    let two_days_ago = entry("search", "info", "reindexed", 2 * 86_400);
    let third = entry("search", "debug", "quote \" and \\ in a line", 1);
    let sent = app
        .ingest(vec![first.clone(), two_days_ago.clone(), third])
        .await;
    fake.wait_for(3, 20).await;

    {
        let state = fake.state.lock();
        assert_eq!(
            state.events[0], "template",
            "the template comes before any document"
        );
        assert_eq!(state.templates.len(), 1);
        let (name, template) = &state.templates[0];
        assert_eq!(name, "logging-service-logs");
        assert_eq!(template["index_patterns"], json!(["logs-*"]));
        assert!(template.get("data_stream").is_none(), "{template}");
        let mappings = &template["template"]["mappings"];
        assert_eq!(mappings["dynamic"], false);
        let properties = &mappings["properties"];
        for (field, kind) in [
            ("@timestamp", "date_nanos"),
            ("timestamp", "date_nanos"),
            ("service", "keyword"),
            ("level", "keyword"),
            ("id", "keyword"),
            ("trace_id", "keyword"),
            ("request_id", "keyword"),
            ("message", "text"),
            ("context", "flattened"),
        ] {
            assert_eq!(properties[field]["type"], kind, "{field}: {template}");
        }
        assert_eq!(
            state.authorizations,
            HashSet::from([
                "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==".to_string()
            ])
        );
        assert_eq!(
            state.content_types,
            HashSet::from(["application/x-ndjson".to_string()])
        );

        // Each entry under its id, in the daily index of its own date.
        let by_id: HashMap<&str, (&str, &Value)> = state
            .docs
            .iter()
            .map(|((index, id), doc)| (id.as_str(), (index.as_str(), doc)))
            .collect();
        assert_eq!(by_id.len(), 3);
        let (index, doc) = by_id[sent[0].as_str()];
        assert_eq!(
            index,
            daily_index("logs", first["timestamp"].as_str().unwrap())
        );
        assert_eq!(doc["id"], sent[0]);
        assert_eq!(doc["@timestamp"], doc["timestamp"]);
        assert_eq!(doc["message"], "payment declined");
        assert_eq!(doc["service"], "checkout");
        assert_eq!(doc["level"], "error");
        assert_eq!(doc["context"]["order_id"], 4711);
        assert_eq!(doc["context"]["deeply"]["nested"]["keys"][1], "mapped");
        assert_eq!(doc["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(doc["tags"], json!(["payments"]));
        let (index, _) = by_id[sent[1].as_str()];
        assert_eq!(
            index,
            daily_index("logs", two_days_ago["timestamp"].as_str().unwrap())
        );
        assert_ne!(
            index,
            by_id[sent[0].as_str()].0,
            "two days apart, two indices"
        );
        assert_eq!(
            by_id[sent[2].as_str()].1["message"],
            "quote \" and \\ in a line"
        );
    }

    assert_delivered(&app, "elasticsearch", 3).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_item_answers_409_429_and_400_are_each_handled() {
    let fake = FakeEs::start().await;
    {
        let mut state = fake.state.lock();
        // The first request is stored but its answer lost: everything is sent again and
        // Elasticsearch answers 409 for what it holds. "busy" items are refused (429) by the
        // first two requests.
        state.lose_answers = 1;
        state.busy_requests = 2;
    }
    let app = TestApp::start_with(Db::Sqlite, |c| elasticsearch(c, &fake.url)).await;
    let mut batch: Vec<Value> = (0..30)
        .map(|i| entry("api", "info", &format!("request {i} served"), 1))
        .collect();
    batch[4] = entry("api", "info", "node busy one", 1);
    batch[21] = entry("api", "info", "node busy two", 1);
    batch[13] = entry("api", "info", "a mapping-bomb entry", 1);
    let sent = app.ingest(batch).await;
    fake.wait_for(29, 30).await;
    let report = wait_for_sink(&app, "elasticsearch", |report| report["delivered"] == 29).await;
    assert_eq!(report["delivered"], 29, "{report}");
    assert_eq!(report["dead_letters"], 1, "{report}");
    assert_eq!(report["status"], "up", "{report}");
    let ids = fake.ids();
    assert_eq!(ids.len(), 29);
    assert!(!ids.contains(&sent[13]));
    {
        let state = fake.state.lock();
        // 27 already held when the batch came again after the lost answer.
        assert_eq!(state.conflicts, 27);
        // The lost answer, the retry with 409s, then the two 429 items alone.
        assert_eq!(
            state.events,
            ["template", "bulk:30", "bulk:30", "bulk:2"],
            "{:?}",
            state.events
        );
    }
    let dead = std::fs::read_to_string(report["dead_letter_file"].as_str().unwrap()).unwrap();
    let lines: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{dead}");
    assert_eq!(lines[0]["sink"], "elasticsearch");
    assert_eq!(lines[0]["entry"]["id"], sent[13]);
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("400 document_parsing_exception") && reason.contains("failed to parse"),
        "{reason}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("logging_aggregator_sink_dead_letters_total{sink=\"elasticsearch\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_gone_for_thirty_seconds_and_a_restart_lose_and_double_nothing() {
    let mut fake = FakeEs::start().await;
    let url = fake.url.clone();
    let settings = |c: &mut Config| {
        elasticsearch(c, &url);
        c.elasticsearch_index = "app-logs".into();
        c.elasticsearch_data_stream = true;
        c.elasticsearch_username = Some("elastic".into());
        c.elasticsearch_password = Some("s3cret".into());
    };
    let mut app = TestApp::start_with(Db::Sqlite, settings).await;
    let mut sent = ingest_rounds(&app, "web", "before", 5, 20).await;
    fake.wait_for(100, 20).await;

    fake.server().go_away().await;
    let gone = std::time::Instant::now();
    sent.extend(ingest_rounds(&app, "web", "during", 10, 50).await);
    assert_failing(&app, "elasticsearch", 500, "Elasticsearch unreachable").await;
    let ready: Value = app.get_json("/health/ready").await;
    assert_eq!(ready["status"], "degraded", "{ready}");

    app.restart(settings).await;
    sent.extend(ingest_rounds(&app, "web", "after restart", 4, 25).await);
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(gone.elapsed())).await;
    fake.server().come_back().await;
    fake.wait_for(sent.len(), 90).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let state = fake.state.lock();
        assert_eq!(state.docs.len(), 700);
        // No answer was lost, so nothing was sent twice (a re-send would be a 409 here, and
        // the test above counting documents could not see it).
        assert_eq!(state.conflicts, 0, "nothing sent twice");
        assert_eq!(
            state
                .docs
                .keys()
                .map(|(_, id)| id.clone())
                .collect::<HashSet<_>>(),
            sent.iter().cloned().collect::<HashSet<_>>(),
            "everything arrives, each once"
        );
        assert!(
            state.docs.keys().all(|(index, _)| index == "app-logs"),
            "the data stream"
        );
        let (_, template) = state.templates.last().unwrap();
        assert_eq!(template["index_patterns"], json!(["app-logs"]));
        assert_eq!(template["data_stream"], json!({}));
        assert_eq!(
            state.authorizations,
            HashSet::from(["Basic ZWxhc3RpYzpzM2NyZXQ=".to_string()])
        );
    }
    let report = wait_for_sink(&app, "elasticsearch", |report| {
        report["lag_entries"] == 0 && report["status"] == "up"
    })
    .await;
    assert_eq!(report["lag_entries"], 0, "{report}");
    assert_eq!(report["status"], "up", "{report}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_engine_does_not_hold_up_shutdown_and_nothing_is_lost() {
    let mut fake = FakeEs::start().await;
    fake.state.lock().hang = true;
    let url = fake.url.clone();
    let mut app = TestApp::start_with(Db::Sqlite, |c| elasticsearch(c, &url)).await;
    let sent = app.ingest(vec![entry("api", "info", "held", 0)]).await;
    for _ in 0..200 {
        if fake.state.lock().events.iter().any(|e| e == "hung") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.state.lock().events.iter().any(|e| e == "hung"));
    // The sink's HTTP timeout is 60 s; a stop must not wait for it (a pod's grace period is
    // 30 s by default). The bound is a liveness check, far above what the stop takes.
    let running = app.running.take().unwrap();
    tokio::time::timeout(Duration::from_secs(30), running.shutdown())
        .await
        .expect("the stop waited for the hanging request");
    // The batch was not acknowledged, so it is sent again after the restart.
    fake.state.lock().hang = false;
    fake.server().go_away().await;
    fake.server().come_back().await;
    app.restart(|c| elasticsearch(c, &url)).await;
    fake.wait_for(1, 20).await;
    assert_eq!(fake.ids(), sent.into_iter().collect::<HashSet<_>>());
    app.stop().await;
}

#[tokio::test]
async fn bad_elasticsearch_settings_stop_the_start_with_the_setting_named() {
    let url = |c: &mut Config| c.elasticsearch_url = Some("http://es:9200".into());
    crate::support::assert_refused(vec![
        (
            Box::new(|c: &mut Config| c.elasticsearch_url = Some("es:9200".into()))
                as Box<dyn Fn(&mut Config)>,
            "ELASTICSEARCH_URL",
        ),
        (
            Box::new(move |c: &mut Config| {
                url(c);
                c.elasticsearch_index = "Logs".into();
            }),
            "ELASTICSEARCH_INDEX",
        ),
        (
            Box::new(move |c: &mut Config| {
                url(c);
                c.elasticsearch_index = "_logs".into();
            }),
            "ELASTICSEARCH_INDEX",
        ),
        (
            Box::new(move |c: &mut Config| {
                url(c);
                c.elasticsearch_username = Some("elastic".into());
                c.elasticsearch_api_key = Some("a2V5".into());
            }),
            "ELASTICSEARCH_API_KEY",
        ),
        (
            Box::new(move |c: &mut Config| {
                url(c);
                c.elasticsearch_password = Some("s3cret".into());
            }),
            "ELASTICSEARCH_USERNAME",
        ),
        (
            Box::new(move |c: &mut Config| {
                url(c);
                c.elasticsearch_ca_cert = Some("/nonexistent/ca.pem".into());
            }),
            "ELASTICSEARCH_CA_CERT",
        ),
    ]);
}

/// Against a real Elasticsearch when `TEST_ELASTICSEARCH_URL` is set (e.g. `deploy/compose`'s
/// test-backends): the template is accepted (so `flattened` and `date_nanos` are real), and the
/// documents come back from `_search`, the context queryable by its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(real_elasticsearch), ignore = "TEST_ELASTICSEARCH_URL is not set")]
async fn a_real_elasticsearch_stores_what_the_sink_sends() {
    let url = std::env::var("TEST_ELASTICSEARCH_URL")
        .expect("built with TEST_ELASTICSEARCH_URL set: set it when running the test too");
    let index = format!("sink-test-{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::start_with(Db::Sqlite, |c| {
        elasticsearch(c, &url);
        c.elasticsearch_index = index.clone();
    })
    .await;
    let mut one = entry("checkout", "error", "real elasticsearch round trip", 1);
    one["context"] = json!({"kubernetes": {"namespace": "shop"}, "order_id": 4711});
    let mut two = entry("checkout", "info", "second", 1);
    two["context"] = json!({"order_id": "not-a-number-this-time"});
    let sent = app.ingest(vec![one, two]).await;
    let client = reqwest::Client::new();
    let mut body = Value::Null;
    for _ in 0..120 {
        let response = client
            .post(format!("{url}/{index}-*/_search"))
            .json(&json!({"query": {"term": {"context.kubernetes.namespace": "shop"}}}))
            .send()
            .await
            .unwrap();
        body = response.json().await.unwrap();
        if body["hits"]["total"]["value"] == 1 {
            break;
        }
        let _ = client
            .post(format!("{url}/{index}-*/_refresh"))
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(body["hits"]["hits"][0]["_id"], sent[0], "{body}");
    assert_eq!(
        body["hits"]["hits"][0]["_source"]["message"],
        "real elasticsearch round trip"
    );
    // A key that is a number in one entry and text in the next conflicts in no mapping.
    let report = sink_report(&app, "elasticsearch").await;
    assert_eq!(report["delivered"], 2, "{report}");
    assert_eq!(report["dead_letters"], 0, "{report}");
    let _ = client
        .delete(format!("{url}/_index_template/logging-service-{index}"))
        .send()
        .await;
    let _ = client.delete(format!("{url}/{index}-*")).send().await;
    app.stop().await;
}
