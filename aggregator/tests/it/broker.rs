//! Broker events against the real NATS (JetStream, 127.0.0.1:4222) and RabbitMQ
//! (127.0.0.1:5672, guest/guest) running on this machine, and a NATS server of the test's
//! own that is killed with SIGKILL and started again. Each event is checked against its
//! published schema in `docs/events/`. Without the services the tests fail when `CI` is set
//! and are skipped otherwise.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use logging_aggregator::config::Config;
use serde_json::{Value, json};

use crate::support::{Db, TestApp, WRITER, entry, ingest_rounds, wait_for_sink};

const NATS: &str = "127.0.0.1:4222";
const RABBITMQ: &str = "127.0.0.1:5672";

/// Whether `address` accepts connections; a missing service fails the test under CI.
async fn service(address: &str, name: &str) -> bool {
    let up = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .is_ok_and(|c| c.is_ok());
    if !up {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not running on {address}, and CI is set"
        );
        eprintln!("{name} is not running on {address}: test skipped");
    }
    up
}

/// Checks `value` against a JSON schema's `type`, `const`, `enum`, `required`, `properties`
/// and `items` (what `docs/events/*.schema.json` use).
fn conforms(value: &Value, schema: &Value, path: &str) {
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let matches = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        assert!(matches, "{path}: {value} is not {types:?}");
    }
    if let Some(constant) = schema.get("const") {
        assert_eq!(value, constant, "{path}");
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        assert!(
            allowed.contains(value),
            "{path}: {value} not in {allowed:?}"
        );
    }
    if let Some(Value::Array(required)) = schema.get("required") {
        for name in required {
            let name = name.as_str().unwrap();
            assert!(
                value.get(name).is_some(),
                "{path}: {name} is missing in {value}"
            );
        }
    }
    if let (Some(Value::Object(properties)), Value::Object(fields)) =
        (schema.get("properties"), value)
    {
        for (name, field) in fields {
            if let Some(sub) = properties.get(name) {
                conforms(field, sub, &format!("{path}.{name}"));
            }
        }
    }
    if let (Some(items), Value::Array(values)) = (schema.get("items"), value) {
        for (i, item) in values.iter().enumerate() {
            conforms(item, items, &format!("{path}[{i}]"));
        }
    }
}

fn schema(event: &str) -> Value {
    let path = format!(
        "{}/../docs/events/{event}.schema.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// What a consumer received, by event name.
#[derive(Default, Debug)]
struct Received {
    events: HashMap<String, Vec<Value>>,
    /// The broker-side message id of each message (`Nats-Msg-Id`, AMQP `message_id`).
    message_ids: Vec<String>,
}

impl Received {
    fn add(&mut self, body: &[u8], message_id: String) {
        let value: Value = serde_json::from_slice(body).expect("events are JSON");
        let event = value["event"].as_str().expect("event").to_string();
        conforms(&value, &schema(&event), &event);
        assert_eq!(value["event_id"], message_id.as_str(), "{value}");
        self.message_ids.push(message_id);
        self.events.entry(event).or_default().push(value);
    }

    fn ingested_ids(&self) -> Vec<String> {
        self.events
            .get("log.ingested")
            .into_iter()
            .flatten()
            .flat_map(|e| {
                assert_eq!(
                    e["count"].as_u64().unwrap() as usize,
                    e["entries"].as_array().unwrap().len()
                );
                e["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.events.get(event).map_or(0, Vec::len)
    }
}

fn broker(config: &mut Config, url: &str, topic: &str) {
    config.broker_url = Some(url.to_string());
    config.broker_topic = topic.to_string();
    config.broker_retry_attempts = 2;
    config.broker_retry_delay = 100;
    config.alert_check_interval = 1;
    config.alert_rules = Vec::new();
}

/// Ingests entries, records an audit entry and makes an alert fire and resolve: every kind
/// of event. Returns the ingested ids, the audit id and the alert id.
async fn produce_every_event(app: &TestApp) -> (Vec<String>, String, String) {
    let rule = json!({"name": "pay-errors", "kind": "count", "window": "2s", "threshold": 0,
        "filter": {"service": "pay", "min_level": "error"}, "severity": "warning"});
    let response = app.post("/api/alerts/rules", &rule).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let mut ids = ingest_rounds(app, "web", "request", 3, 20).await;
    ids.extend(
        app.ingest(vec![entry("pay", "error", "card declined", 0)])
            .await,
    );
    let response = app
        .request(reqwest::Method::POST, "/api/audit", Some(WRITER))
        .json(&json!({
            "actor": {"id": "alice", "type": "user"},
            "action": "refund",
            "entity_type": "order",
            "entity_id": "o-1",
        }))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let audit_id = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();
    let mut alert_id = String::new();
    for _ in 0..400 {
        let page = app
            .get_json("/api/alerts?rule=pay-errors&status=resolved")
            .await;
        if let Some(id) = page["items"][0]["id"].as_str() {
            alert_id = id.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!alert_id.is_empty(), "the alert never resolved");
    (ids, audit_id, alert_id)
}

/// Checks that `received` holds every event `produce_every_event` made, each once.
fn assert_every_event(received: &Received, ids: &[String], audit_id: &str, alert_id: &str) {
    let ingested = received.ingested_ids();
    assert_eq!(ingested.len(), ids.len(), "each entry in one event");
    assert_eq!(
        ingested.into_iter().collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>()
    );
    // Creating the rule was audited too, before the refund: both, in sequence order.
    let audits = &received.events["audit.recorded"];
    let actions: Vec<&str> = audits
        .iter()
        .map(|a| a["audit"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["alert_rule.created", "refund"], "{audits:?}");
    assert_eq!(audits[1]["audit"]["id"], audit_id);
    assert_eq!(audits[1]["event_id"], audit_id);
    assert_eq!(
        audits[1]["audit"]["sequence"],
        audits[0]["audit"]["sequence"].as_i64().unwrap() + 1
    );
    let fired = &received.events["alert.fired"];
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["alert"]["id"], alert_id);
    assert_eq!(fired[0]["alert"]["status"], "firing");
    let resolved = &received.events["alert.resolved"];
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert_eq!(resolved[0]["alert"]["id"], alert_id);
    assert_eq!(resolved[0]["alert"]["status"], "resolved");
    let unique: HashSet<&String> = received.message_ids.iter().collect();
    assert_eq!(unique.len(), received.message_ids.len(), "no event twice");
}

/// Every message of a JetStream stream, in order.
async fn stream_contents(jetstream: &async_nats::jetstream::Context, name: &str) -> Received {
    let mut stream = jetstream.get_stream(name).await.expect("the events stream");
    let state = stream.info().await.unwrap().state.clone();
    let mut received = Received::default();
    for sequence in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        let message = stream.get_raw_message(sequence).await.unwrap();
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert!(
            message.subject.ends_with(&format!(
                ".{}",
                serde_json::from_slice::<Value>(&message.payload).unwrap()["event"]
                    .as_str()
                    .unwrap()
            )),
            "{}",
            message.subject
        );
        received.add(&message.payload, id);
    }
    received
}

/// Waits until `check` passes on the stream's contents.
async fn wait_for_stream(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
    seconds: u64,
    done: impl Fn(&Received) -> bool,
) -> Received {
    for _ in 0..seconds * 4 {
        if jetstream.get_stream(name).await.is_ok() {
            let received = stream_contents(jetstream, name).await;
            if done(&received) {
                return received;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stream_contents(jetstream, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_nats_jetstream_once_with_its_schema() {
    if !service(NATS, "NATS").await {
        return;
    }
    let topic = format!("test-{}", uuid::Uuid::new_v4().simple());
    let stream = topic.to_ascii_uppercase().replace('-', "_");
    let client = async_nats::connect(NATS).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    // A plain subscriber sees the events live, as a real-time consumer would.
    let mut live = client.subscribe(format!("{topic}.>")).await.unwrap();
    let app =
        TestApp::start_with(Db::Sqlite, |c| broker(c, &format!("nats://{NATS}"), &topic)).await;
    let (ids, audit_id, alert_id) = produce_every_event(&app).await;
    let received = wait_for_stream(&jetstream, &stream, 30, |r| {
        r.ingested_ids().len() >= ids.len()
            && r.count("alert.resolved") >= 1
            && r.count("audit.recorded") >= 2
    })
    .await;
    assert_every_event(&received, &ids, &audit_id, &alert_id);
    let mut live_count = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), live.next()).await
    {
        assert!(message.subject.starts_with(&topic));
        live_count += 1;
    }
    assert_eq!(
        live_count,
        received.message_ids.len(),
        "the live subscriber saw each"
    );
    let sink = wait_for_sink(&app, "broker", |s| s["delivered"] == ids.len()).await;
    assert_eq!(sink["delivered"], ids.len(), "{sink}");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("logging_aggregator_broker_events_total{event=\"audit.recorded\"} 2"),
        "{metrics}"
    );
    app.stop().await;
    jetstream.delete_stream(&stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_rabbitmq_with_publisher_confirms() {
    use lapin::options::{
        BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    if !service(RABBITMQ, "RabbitMQ").await {
        return;
    }
    let url = format!("amqp://guest:guest@{RABBITMQ}/%2f");
    let topic = format!("test-{}", uuid::Uuid::new_v4().simple());
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // As a consumer does: the exchange (as the publisher declares it) and a queue bound to all.
    channel
        .exchange_declare(
            topic.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            topic.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let app = TestApp::start_with(Db::Sqlite, |c| broker(c, &url, &topic)).await;
    let (ids, audit_id, alert_id) = produce_every_event(&app).await;
    let mut received = Received::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.ingested_ids().len() < ids.len()
        || received.count("alert.resolved") < 1
        || received.count("audit.recorded") < 2
    {
        assert!(std::time::Instant::now() < deadline, "{received:?}");
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        else {
            continue;
        };
        let delivery = delivery.unwrap();
        let properties = &delivery.properties;
        assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        let kind = properties.kind().as_ref().unwrap().as_str().to_string();
        assert_eq!(delivery.routing_key.as_str(), kind, "routing key = event");
        let id = properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_string();
        received.add(&delivery.data, id);
    }
    // Nothing more arrives: no event twice.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
        let extra = extra.unwrap();
        received.add(
            &extra.data,
            extra.properties.message_id().as_ref().unwrap().to_string(),
        );
    }
    assert_every_event(&received, &ids, &audit_id, &alert_id);
    app.stop().await;
    channel
        .exchange_delete(topic.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

/// A NATS server of the test's own, with JetStream storing in `dir`.
struct OwnNats {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnNats {
    fn start(port: u16, dir: &std::path::Path) -> OwnNats {
        let mut nats = OwnNats {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not start on {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_gets_every_event_once() {
    if std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed, and CI is set"
        );
        eprintln!("nats-server is not installed: test skipped");
        return;
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let store = tempfile::tempdir().unwrap();
    let mut nats = OwnNats::start(port, store.path());
    let url = format!("nats://127.0.0.1:{port}");
    let app = TestApp::start_with(Db::Sqlite, |c| broker(c, &url, "logs")).await;
    let mut ids = ingest_rounds(&app, "web", "before", 1, 50).await;
    let client = async_nats::connect(&url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let count = ids.len();
    wait_for_stream(&jetstream, "LOGS", 20, |r| r.ingested_ids().len() >= count).await;

    nats.kill();
    // Ingest goes on while the broker is gone; the sink says it is failing.
    ids.extend(ingest_rounds(&app, "web", "during", 5, 40).await);
    let audit = app
        .request(reqwest::Method::POST, "/api/audit", Some(WRITER))
        .json(&json!({"actor": {"id": "bob"}, "action": "export", "entity_type": "report", "entity_id": "r-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(audit.status(), 201);
    let sink = wait_for_sink(&app, "broker", |s| s["status"] == "failing").await;
    assert_eq!(sink["status"], "failing", "{sink}");
    assert!(sink["lag_entries"].as_u64().unwrap() >= 200, "{sink}");
    let ready = app.get_json("/health/ready").await;
    assert_eq!(ready["status"], "degraded", "{ready}");

    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.spawn();
    let total = ids.len();
    let received = wait_for_stream(&jetstream, "LOGS", 90, |r| {
        r.ingested_ids().len() >= total && r.count("audit.recorded") >= 1
    })
    .await;
    let ingested = received.ingested_ids();
    assert_eq!(ingested.len(), total, "each entry once");
    assert_eq!(
        ingested.into_iter().collect::<HashSet<_>>(),
        ids.into_iter().collect::<HashSet<_>>()
    );
    assert_eq!(received.count("audit.recorded"), 1);
    app.stop().await;
}
