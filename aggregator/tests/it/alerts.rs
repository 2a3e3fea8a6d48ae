//! Alerting end to end, in-process: rules over real HTTP, entries through the real ingest
//! path, and notifications to real receivers — an HTTP server in the test for webhooks,
//! Slack, SMS and Alertmanager, and an SMTP server speaking STARTTLS for email.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path as AxumPath, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use logging_aggregator::config::Config;
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::on_both_databases;
use crate::support::{ADMIN, Db, READER, TestApp, entry, expect_problem};

/// What a receiver was sent: (path, body, idempotency key).
type Received = Arc<Mutex<Vec<(String, Value, String)>>>;

/// An HTTP receiver for webhooks, Slack, SMS and Alertmanager; `up = false` answers 503.
struct Receiver {
    url: String,
    received: Received,
    up: Arc<AtomicBool>,
}

async fn receive(
    State((received, up)): State<(Received, Arc<AtomicBool>)>,
    AxumPath(path): AxumPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> AxumStatus {
    if !up.load(Ordering::Acquire) {
        return AxumStatus::SERVICE_UNAVAILABLE;
    }
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    received.lock().push((format!("/{path}"), value, key));
    AxumStatus::OK
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Receiver::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Receiver {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received: Received = Arc::default();
        let up = Arc::new(AtomicBool::new(true));
        let router = axum::Router::new()
            .route("/{*path}", axum::routing::post(receive))
            .with_state((received.clone(), up.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Receiver { url, received, up }
    }

    fn bodies(&self, path: &str) -> Vec<Value> {
        self.received
            .lock()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, b, _)| b.clone())
            .collect()
    }

    async fn wait_for(&self, path: &str, count: usize) -> Vec<Value> {
        for _ in 0..300 {
            let bodies = self.bodies(path);
            if bodies.len() >= count {
                return bodies;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} received {:?}, expected {count}", self.bodies(path));
    }
}

/// Alerting settings for tests: one-second checks, no default rules, no cooldown.
fn alerting(config: &mut Config, receiver: &str, channels: &[&str]) {
    config.alert_check_interval = 1;
    config.alert_cooldown = 0;
    config.alert_rules = Vec::new();
    config.alert_notification_channels = channels.iter().map(|c| c.to_string()).collect();
    config.alert_webhook_url = Some(format!("{receiver}/webhook"));
    config.alert_slack_webhook_url = Some(format!("{receiver}/slack"));
    config.alertmanager_url = Some(format!("{receiver}/am"));
    config.alert_sms_url = Some(format!("{receiver}/sms"));
    config.alert_sms_to = vec!["+15550100".into()];
}

async fn create_rule(app: &TestApp, rule: Value) -> Value {
    let response = app.post("/api/alerts/rules", &rule).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn evaluations(app: &TestApp) -> u64 {
    let text = app.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("logging_aggregator_alert_evaluations_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until an alert with `status` exists for `rule`, returning it.
async fn wait_for_alert(app: &TestApp, rule: &str, status: &str) -> Value {
    for _ in 0..400 {
        let page = app
            .get_json(&format!("/api/alerts?rule={rule}&status={status}"))
            .await;
        if let Some(alert) = page["items"].as_array().and_then(|a| a.first()) {
            return alert.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let metrics = app.metrics().await;
    let alerting: Vec<&str> = metrics.lines().filter(|l| l.contains("alert")).collect();
    panic!(
        "no {status} alert for {rule}: {}\n{alerting:#?}",
        app.get_json("/api/alerts").await
    );
}

/// Waits until every channel accepted the alert's firing notification; returns the alert.
async fn wait_until_notified(app: &TestApp, id: &str) -> Value {
    let mut alert = Value::Null;
    for _ in 0..300 {
        alert = app.get_json(&format!("/api/alerts/{id}")).await;
        if alert["notification_sent"] == true {
            return alert;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("notification_sent never became true: {alert}");
}

fn ts(value: &Value) -> i64 {
    logging_common::Timestamp::parse_rfc3339(value.as_str().expect("a timestamp"))
        .expect("RFC 3339")
        .as_nanos()
}

async fn a_count_rule_fires_notifies_every_channel_and_resolves(db: Db) {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(db, |c| {
        alerting(
            c,
            &receiver.url,
            &["webhook", "slack", "alertmanager", "sms"],
        )
    })
    .await;
    let rule = create_rule(
        &app,
        json!({
            "name": "checkout-errors",
            "description": "Checkout is failing",
            "kind": "count",
            "filter": {"service": "checkout", "min_level": "error"},
            "window": "5s",
            "threshold": 3,
            "group_by": ["service"],
            "severity": "critical",
            "labels": {"team": "payments"},
            "annotations": {"runbook": "https://runbooks.example/checkout"}
        }),
    )
    .await;
    assert_eq!(
        rule["condition"],
        "count(service=\"checkout\", level>=error) over 5s by (service) > 3"
    );
    // Three errors do not cross the threshold; other services and levels do not count.
    app.ingest(vec![
        entry("checkout", "error", "card declined", 0),
        entry("checkout", "error", "card declined", 0),
        entry("checkout", "error", "card declined", 0),
        entry("checkout", "info", "ok", 0),
        entry("search", "error", "timeout", 0),
    ])
    .await;
    settle(&app).await;
    assert_eq!(
        app.get_json("/api/alerts").await["items"],
        json!([]),
        "nothing fires below the threshold"
    );
    // The fourth crosses it: firing within two evaluations.
    app.ingest(vec![entry(
        "checkout",
        "critical",
        "card processor down",
        0,
    )])
    .await;
    let crossed = evaluations(&app).await;
    let alert = loop {
        let page = app.get_json("/api/alerts?status=firing").await;
        if let Some(alert) = page["items"].as_array().and_then(|a| a.first()) {
            break alert.clone();
        }
        let rounds = evaluations(&app).await - crossed;
        assert!(rounds <= 2, "not firing after {rounds} evaluations");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(alert["name"], "checkout-errors");
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["current_value"], 4.0);
    assert_eq!(alert["threshold"], 3.0);
    assert_eq!(alert["group"], json!({"service": "checkout"}));
    assert_eq!(alert["labels"]["team"], "payments");
    assert_eq!(alert["description"], "Checkout is failing");
    assert!(alert["triggered_at"].is_string());
    assert!(alert["resolved_at"].is_null());
    let id = alert["id"].as_str().unwrap().to_string();

    // Every channel got it, in its own format.
    let webhook = receiver.wait_for("/webhook", 1).await;
    assert_eq!(webhook[0]["event"], "alert.fired");
    assert_eq!(webhook[0]["version"], "1");
    assert_eq!(webhook[0]["alert"]["id"], id.as_str());
    assert_eq!(webhook[0]["alert"]["status"], "firing");
    let slack = receiver.wait_for("/slack", 1).await;
    let text = slack[0]["text"].as_str().unwrap();
    assert!(text.starts_with("[FIRING] checkout-errors"), "{text}");
    assert!(text.contains("service=checkout"), "{text}");
    let am = receiver.wait_for("/am/api/v2/alerts", 1).await;
    let am_alert = &am[0][0];
    assert_eq!(am_alert["labels"]["alertname"], "checkout-errors");
    assert_eq!(am_alert["labels"]["severity"], "critical");
    assert_eq!(am_alert["labels"]["service"], "checkout");
    assert_eq!(am_alert["labels"]["team"], "payments");
    assert_eq!(
        am_alert["annotations"]["runbook"],
        "https://runbooks.example/checkout"
    );
    assert!(am_alert["annotations"]["summary"].is_string());
    assert_eq!(am_alert["startsAt"], alert["triggered_at"]);
    assert!(ts(&am_alert["endsAt"]) > ts(&alert["triggered_at"]));
    assert!(
        am_alert["generatorURL"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/api/alerts/{id}"))
    );
    let sms = receiver.wait_for("/sms", 1).await;
    assert_eq!(sms[0]["to"], "+15550100");
    assert!(
        sms[0]["message"]
            .as_str()
            .unwrap()
            .contains("checkout-errors")
    );

    // Accepted by every receiver: notification_sent becomes true.
    let sent = wait_until_notified(&app, &id).await;
    let notifications = sent["notifications"].as_array().unwrap();
    assert_eq!(notifications.len(), 4);
    assert!(
        notifications
            .iter()
            .all(|n| n["status"] == "sent" && n["attempts"] == 1)
    );

    // The window moves on: resolved, and every channel is told.
    let resolved = wait_for_alert(&app, "checkout-errors", "resolved").await;
    assert_eq!(resolved["id"], id.as_str());
    assert_eq!(resolved["resolution"], "cleared");
    assert!(ts(&resolved["resolved_at"]) > ts(&resolved["triggered_at"]));
    let webhook = receiver.wait_for("/webhook", 2).await;
    assert_eq!(webhook[1]["event"], "alert.resolved");
    let am = receiver.wait_for("/am/api/v2/alerts", 2).await;
    let last = am.last().unwrap();
    assert_eq!(last[0]["endsAt"], resolved["resolved_at"]);
    // Nothing was sent twice.
    let keys: Vec<String> = receiver
        .received
        .lock()
        .iter()
        .map(|(_, _, k)| k.clone())
        .collect();
    let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "{keys:?}");
    app.stop().await;
}

async fn rules_are_managed_through_the_api_with_clear_errors(db: Db) {
    let app = TestApp::start_with(db, |c| {
        c.alert_check_interval = 1;
        // The default rule set, from the configuration.
    })
    .await;
    let rules = app.get_json("/api/alerts/rules").await;
    let names: Vec<&str> = rules["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["error_rate", "response_time", "memory_usage", "disk_usage"]
    );
    let default = &rules["items"][0];
    assert_eq!(default["source"], "config");
    // Configuration rules are changed in the configuration only.
    let id = default["id"].as_str().unwrap();
    let response = app
        .request(
            Method::DELETE,
            &format!("/api/alerts/rules/{id}"),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, StatusCode::CONFLICT).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("configuration")
    );

    // Mistakes are answered field by field.
    for (rule, field) in [
        (json!({"kind": "count", "window": "5m"}), "name"),
        (
            json!({"name": "x", "kind": "count", "window": "5m", "treshold": 1}),
            "treshold",
        ),
        (
            json!({"name": "x", "kind": "numeric", "window": "5m", "field": "d"}),
            "aggregation",
        ),
        (
            json!({"name": "x", "kind": "count", "window": "5w"}),
            "window",
        ),
        (
            json!({"name": "x", "kind": "count", "window": "5m", "group_by": ["ip"]}),
            "group_by[0]",
        ),
    ] {
        let response = app.post("/api/alerts/rules", &rule).await;
        let problem = expect_problem(response, StatusCode::BAD_REQUEST).await;
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{rule}: {problem}"
        );
    }
    let rule = json!({"name": "slow-search", "kind": "numeric", "field": "duration_ms",
        "aggregation": "p99", "window": "5m", "threshold": 800, "filter": {"service": "search"}});
    let created = create_rule(&app, rule.clone()).await;
    assert_eq!(created["source"], "api");
    assert_eq!(created["window"], "5m");
    assert_eq!(created["for"], "0s");
    let response = app.post("/api/alerts/rules", &rule).await;
    expect_problem(response, StatusCode::CONFLICT).await;
    // Readers read; only admins change.
    let response = app
        .request(Method::POST, "/api/alerts/rules", Some(READER))
        .json(&rule)
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::FORBIDDEN).await;
    let id = created["id"].as_str().unwrap();
    let fetched = app
        .request(
            Method::GET,
            &format!("/api/alerts/rules/{id}"),
            Some(READER),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    let mut changed = rule.clone();
    changed["threshold"] = json!(1200);
    let response = app
        .request(Method::PUT, &format!("/api/alerts/rules/{id}"), Some(ADMIN))
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["threshold"], 1200.0);
    assert_eq!(updated["created_at"], created["created_at"]);
    let response = app
        .request(
            Method::DELETE,
            &format!("/api/alerts/rules/{id}"),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .request(Method::GET, &format!("/api/alerts/rules/{id}"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::NOT_FOUND).await;
    // Each change is in the audit trail, with who made it.
    let audit = app.get_json("/api/audit?entity_type=alert_rule").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "alert_rule.deleted",
            "alert_rule.updated",
            "alert_rule.created"
        ]
    );
    assert_eq!(audit["items"][1]["old_values"]["threshold"], 800.0);
    assert_eq!(audit["items"][1]["new_values"]["threshold"], 1200.0);
    // Unknown alerts and bad ids.
    let response = app
        .request(
            Method::POST,
            &format!("/api/alerts/{}/ack", uuid::Uuid::now_v7()),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::NOT_FOUND).await;
    let response = app
        .request(Method::GET, "/api/alerts?status=burning", Some(ADMIN))
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

on_both_databases!(
    a_count_rule_fires_notifies_every_channel_and_resolves,
    rules_are_managed_through_the_api_with_clear_errors,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_and_the_cooldown_hold() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Db::Sqlite, |c| {
        alerting(c, &receiver.url, &["webhook"]);
        c.alert_cooldown = 4;
    })
    .await;
    create_rule(
        &app,
        json!({"name": "payments-failing", "kind": "count", "window": "2s", "for": "3s",
               "filter": {"service": "payments", "query": "declined OR refused"}}),
    )
    .await;
    // The condition holds for as long as matching lines keep coming.
    let mut first = Value::Null;
    for _ in 0..80 {
        app.ingest(vec![
            entry("payments", "warning", "card declined", 0),
            entry("payments", "warning", "all good", 0),
        ])
        .await;
        let page = app.get_json("/api/alerts?rule=payments-failing").await;
        if let Some(alert) = page["items"].as_array().and_then(|a| a.first()) {
            if alert["status"] == "pending" {
                assert!(
                    receiver.bodies("/webhook").is_empty(),
                    "a pending alert notifies nobody"
                );
            }
            if alert["status"] == "firing" {
                first = alert.clone();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(first["status"], "firing", "never fired");
    let held = ts(&first["triggered_at"]) - ts(&first["pending_since"]);
    assert!(held >= 3_000_000_000, "fired after {held} ns, before `for`");
    // Silence: it resolves. Then the condition returns at once, but the cooldown holds it.
    let resolved = wait_for_alert(&app, "payments-failing", "resolved").await;
    let mut second = Value::Null;
    for _ in 0..80 {
        app.ingest(vec![entry("payments", "warning", "connection refused", 0)])
            .await;
        let page = app
            .get_json("/api/alerts?rule=payments-failing&status=active")
            .await;
        if let Some(alert) = page["items"].as_array().and_then(|a| a.first()) {
            second = alert.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        second.is_object(),
        "the condition held again but nothing started"
    );
    assert_ne!(second["id"], first["id"]);
    let quiet = ts(&second["pending_since"]) - ts(&resolved["resolved_at"]);
    assert!(
        quiet >= 4_000_000_000,
        "started again {quiet} ns after resolving"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absence_fires_when_a_service_goes_silent_and_resolves_when_it_speaks() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Db::Sqlite, |c| alerting(c, &receiver.url, &["webhook"])).await;
    create_rule(
        &app,
        json!({"name": "billing-silent", "kind": "absence", "window": "2s",
               "filter": {"service": "billing"}, "severity": "warning"}),
    )
    .await;
    for _ in 0..6 {
        app.ingest(vec![entry("billing", "info", "invoice sent", 0)])
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        app.get_json("/api/alerts").await["items"]
            .as_array()
            .unwrap()
            .is_empty(),
        "not silent yet"
    );
    let alert = wait_for_alert(&app, "billing-silent", "firing").await;
    assert!(alert["current_value"].as_f64().unwrap() >= 2.0, "{alert}");
    assert_eq!(alert["threshold"], 2.0);
    assert!(alert["condition"].as_str().unwrap().starts_with("absent("));
    app.ingest(vec![entry("billing", "info", "invoice sent", 0)])
        .await;
    let resolved = wait_for_alert(&app, "billing-silent", "resolved").await;
    assert_eq!(resolved["id"], alert["id"]);
    let events: Vec<Value> = receiver
        .wait_for("/webhook", 2)
        .await
        .iter()
        .map(|b| b["event"].clone())
        .collect();
    assert_eq!(events, vec![json!("alert.fired"), json!("alert.resolved")]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_and_numeric_rules_read_their_windows_per_group() {
    let app = TestApp::start_with(Db::Sqlite, |c| alerting(c, "http://127.0.0.1:9", &[])).await;
    create_rule(
        &app,
        json!({"name": "errors", "kind": "error_rate", "window": "1m", "threshold": 0.2,
               "min_volume": 10, "group_by": ["service"]}),
    )
    .await;
    create_rule(
        &app,
        json!({"name": "latency", "kind": "numeric", "field": "duration_ms",
               "aggregation": "p95", "window": "1m", "threshold": 500,
               "filter": {"field": {"name": "route", "op": "==", "value": "/pay"}},
               "group_by": ["context.route"]}),
    )
    .await;
    let mut entries = Vec::new();
    // "quiet": every entry an error, but too few to count.
    for _ in 0..9 {
        entries.push(entry("quiet", "error", "boom", 0));
    }
    // "busy": 40 entries, half errors.
    for i in 0..40 {
        entries.push(entry(
            "busy",
            if i % 2 == 0 { "error" } else { "info" },
            "x",
            0,
        ));
    }
    // Durations 10..1000 ms on /pay; /other is filtered out.
    for i in 1..=100 {
        let mut e = entry("api", "info", "served", 0);
        e["context"] = json!({"route": "/pay", "duration_ms": i * 10});
        entries.push(e);
        let mut e = entry("api", "info", "served", 0);
        e["context"] = json!({"route": "/other", "duration_ms": 100_000});
        entries.push(e);
    }
    app.ingest(entries).await;
    let errors = wait_for_alert(&app, "errors", "firing").await;
    assert_eq!(errors["group"], json!({"service": "busy"}));
    assert_eq!(errors["current_value"], 0.5);
    let latency = wait_for_alert(&app, "latency", "firing").await;
    assert_eq!(latency["group"], json!({"context.route": "/pay"}));
    let p95 = latency["current_value"].as_f64().unwrap();
    assert!((p95 - 950.0).abs() / 950.0 < 0.02, "p95 = {p95}");
    settle(&app).await;
    let firing = app.get_json("/api/alerts?status=firing").await;
    assert_eq!(firing["items"].as_array().unwrap().len(), 2, "{firing}");
    app.stop().await;
}

/// Waits for two evaluation rounds: the evaluator reads the WAL as entries become durable,
/// so what ingest acknowledged before is in the windows the second round reads; what should
/// have fired by then has (a fixed sleep could end before a slow round). Its cursor is only
/// persisted with its snapshots, so its lag is no sign of what it has read.
async fn settle(app: &TestApp) {
    wait_rounds(app, 2).await;
}

/// Waits until the evaluator has finished `rounds` more evaluation rounds.
async fn wait_rounds(app: &TestApp, rounds: u64) {
    let start = evaluations(app).await;
    for _ in 0..600 {
        if evaluations(app).await >= start + rounds {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the evaluator did not finish {rounds} rounds");
}

async fn alerts_of(app: &TestApp, rule: &str) -> Vec<Value> {
    app.get_json(&format!("/api/alerts?rule={rule}")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

fn timed(service: &str, level: &str, duration_ms: u64) -> Value {
    let mut e = entry(service, level, "served", 0);
    e["context"] = json!({ "duration_ms": duration_ms });
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_an_alert_fires_sends_nothing_twice_and_loses_nothing() {
    let receiver = Receiver::start().await;
    let configure = |c: &mut Config| alerting(c, &receiver.url, &["webhook"]);
    let mut app = TestApp::start_with(Db::Sqlite, configure).await;
    // One rule of every kind; each crosses its threshold after the restart only if the
    // windows it had before were kept.
    for rule in [
        json!({"name": "orders-errors", "kind": "count", "window": "1m", "threshold": 2,
               "filter": {"service": "orders", "min_level": "error"}}),
        json!({"name": "pay-rate", "kind": "error_rate", "window": "1m", "threshold": 0.5,
               "op": ">=", "min_volume": 4, "filter": {"service": "pay"}}),
        json!({"name": "mean", "kind": "numeric", "field": "duration_ms", "aggregation": "avg",
               "window": "1m", "threshold": 550, "op": "==", "filter": {"service": "avg"}}),
        // p95 < 500: only the values after the restart are below it; the one before keeps
        // p95 at 1000. Percentile windows are what could not be read back before.
        json!({"name": "tail", "kind": "numeric", "field": "duration_ms", "aggregation": "p95",
               "window": "1m", "threshold": 500, "op": "<", "filter": {"service": "p95"}}),
        json!({"name": "heartbeat", "kind": "absence", "window": "8s",
               "filter": {"service": "heartbeat"}, "group_by": ["service"]}),
    ] {
        create_rule(&app, rule).await;
    }
    app.ingest(vec![
        entry("orders", "error", "db down", 0),
        entry("orders", "error", "db down", 0),
        entry("pay", "error", "declined", 0),
        entry("pay", "error", "declined", 0),
        timed("avg", "info", 1000),
        timed("p95", "info", 1000),
        entry("heartbeat", "info", "alive", 0),
    ])
    .await;
    wait_rounds(&app, 2).await;
    for rule in ["orders-errors", "pay-rate", "mean", "tail", "heartbeat"] {
        assert!(
            alerts_of(&app, rule).await.is_empty(),
            "{rule} fired too early"
        );
    }
    app.restart(configure).await;
    // After the restart: one more of each.
    app.ingest(vec![
        entry("orders", "error", "db down", 0),
        entry("pay", "info", "paid", 0),
        entry("pay", "info", "paid", 0),
        timed("avg", "info", 100),
        timed("p95", "info", 100),
    ])
    .await;
    let alert = wait_for_alert(&app, "orders-errors", "firing").await;
    assert_eq!(alert["current_value"], 3.0);
    assert_eq!(
        wait_for_alert(&app, "pay-rate", "firing").await["current_value"],
        0.5
    );
    assert_eq!(
        wait_for_alert(&app, "mean", "firing").await["current_value"],
        550.0
    );
    // The heartbeat was seen before the restart, and not since.
    wait_for_alert(&app, "heartbeat", "firing").await;
    wait_rounds(&app, 2).await;
    assert!(
        alerts_of(&app, "tail").await.is_empty(),
        "p95 forgot the value from before the restart"
    );
    receiver.wait_for("/webhook", 4).await;
    // Restart while they fire: the same alerts go on, nobody is told twice.
    let told = receiver.bodies("/webhook").len();
    app.restart(configure).await;
    wait_rounds(&app, 3).await;
    let again = alerts_of(&app, "orders-errors").await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["id"], alert["id"]);
    assert_eq!(again[0]["status"], "firing");
    assert_eq!(receiver.bodies("/webhook").len(), told);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_gets_the_notification_when_it_returns() {
    // Reserve a port, and let nothing listen on it yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{address}");
    let app = TestApp::start_with(Db::Sqlite, |c| alerting(c, &url, &["webhook"])).await;
    create_rule(
        &app,
        json!({"name": "any-error", "kind": "count", "window": "1m", "threshold": 0,
               "filter": {"min_level": "error"}}),
    )
    .await;
    app.ingest(vec![entry("api", "error", "boom", 0)]).await;
    let alert = wait_for_alert(&app, "any-error", "firing").await;
    let id = alert["id"].as_str().unwrap();
    let mut pending = Value::Null;
    for _ in 0..200 {
        pending = app.get_json(&format!("/api/alerts/{id}")).await;
        if pending["notifications"][0]["attempts"]
            .as_i64()
            .unwrap_or(0)
            >= 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let notification = &pending["notifications"][0];
    assert_eq!(notification["status"], "pending", "{pending}");
    assert!(
        notification["last_error"]
            .as_str()
            .unwrap()
            .contains(&address.to_string())
    );
    assert_eq!(pending["notification_sent"], false);
    // The receiver comes up; the retry delivers.
    let receiver = Receiver::serve(tokio::net::TcpListener::bind(address).await.unwrap());
    let bodies = receiver.wait_for("/webhook", 1).await;
    assert_eq!(bodies[0]["alert"]["id"], id);
    let delivered = wait_until_notified(&app, id).await;
    assert_eq!(delivered["notifications"][0]["status"], "sent");
    assert!(delivered["notifications"][0]["attempts"].as_i64().unwrap() >= 2);
    // The failures are counted.
    let metrics = app.metrics().await;
    assert!(
        metrics
            .contains("logging_aggregator_alert_notification_failures_total{channel=\"webhook\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "logging_aggregator_alerts_active{rule=\"any-error\",severity=\"warning\"} 1"
        )
    );
    receiver.up.store(true, Ordering::Release);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_acknowledge_and_resolve_by_hand() {
    let app = TestApp::start_with(Db::Sqlite, |c| {
        alerting(c, "http://127.0.0.1:9", &[]);
        c.alert_cooldown = 3600;
    })
    .await;
    create_rule(
        &app,
        json!({"name": "disk", "kind": "numeric", "field": "disk_usage_percent",
               "aggregation": "max", "window": "1m", "threshold": 90, "group_by": ["node"],
               "severity": "critical"}),
    )
    .await;
    let mut e = entry("node-exporter", "warning", "disk filling", 0);
    e["context"] = json!({"disk_usage_percent": 97, "kubernetes": {"node": "node-a"}});
    app.ingest(vec![e]).await;
    let alert = wait_for_alert(&app, "disk", "firing").await;
    assert_eq!(alert["group"], json!({"node": "node-a"}));
    assert_eq!(alert["current_value"], 97.0);
    assert_eq!(alert["notification_sent"], false, "no channel configured");
    let id = alert["id"].as_str().unwrap();
    let ack = app
        .request(Method::POST, &format!("/api/alerts/{id}/ack"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), StatusCode::OK);
    let ack: Value = ack.json().await.unwrap();
    assert_eq!(ack["status"], "acknowledged");
    assert!(ack["acknowledged_by"].is_string());
    let reader = app
        .request(
            Method::POST,
            &format!("/api/alerts/{id}/resolve"),
            Some(READER),
        )
        .send()
        .await
        .unwrap();
    expect_problem(reader, StatusCode::FORBIDDEN).await;
    let resolved = app
        .request(
            Method::POST,
            &format!("/api/alerts/{id}/resolve"),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), StatusCode::OK);
    let resolved: Value = resolved.json().await.unwrap();
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["resolution"], "manual");
    let again = app
        .request(
            Method::POST,
            &format!("/api/alerts/{id}/resolve"),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    expect_problem(again, StatusCode::CONFLICT).await;
    // The condition still holds, but the cooldown keeps it quiet; the history is kept.
    wait_rounds(&app, 3).await;
    let all = app.get_json("/api/alerts").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
    let filtered = app
        .get_json("/api/alerts?status=resolved&severity=critical&rule=disk&limit=1")
        .await;
    assert_eq!(filtered["items"][0]["id"], id);
    assert!(filtered["next_cursor"].is_null());
    let audit = app.get_json("/api/audit?entity_type=alert").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["alert.resolved", "alert.acknowledged"]);
    app.stop().await;
}

/// A minimal SMTP server that insists on STARTTLS, and keeps every message it accepts.
async fn smtp_server(tls: tokio_rustls::TlsAcceptor) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = messages.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tls = tls.clone();
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut plain = BufReader::new(stream);
                plain
                    .get_mut()
                    .write_all(b"220 test ESMTP\r\n")
                    .await
                    .unwrap();
                let mut line = String::new();
                loop {
                    line.clear();
                    if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let command = line.trim_end().to_ascii_uppercase();
                    if command.starts_with("EHLO") {
                        plain
                            .get_mut()
                            .write_all(b"250-test\r\n250 STARTTLS\r\n")
                            .await
                            .unwrap();
                    } else if command == "STARTTLS" {
                        plain
                            .get_mut()
                            .write_all(b"220 go ahead\r\n")
                            .await
                            .unwrap();
                        break;
                    } else {
                        plain
                            .get_mut()
                            .write_all(b"530 must issue STARTTLS first\r\n")
                            .await
                            .unwrap();
                    }
                }
                let secure = tls.accept(plain.into_inner()).await.unwrap();
                let mut secure = BufReader::new(secure);
                let mut data = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if secure.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if in_data {
                        if line == ".\r\n" {
                            in_data = false;
                            kept.lock().push(std::mem::take(&mut data));
                            secure.get_mut().write_all(b"250 queued\r\n").await.unwrap();
                        } else {
                            data.push_str(&line);
                        }
                        continue;
                    }
                    let command = line.trim_end().to_ascii_uppercase();
                    let reply: &[u8] = if command.starts_with("EHLO") {
                        b"250 test\r\n"
                    } else if command.starts_with("MAIL FROM") || command.starts_with("RCPT TO") {
                        b"250 ok\r\n"
                    } else if command == "DATA" {
                        in_data = true;
                        b"354 end with .\r\n"
                    } else if command == "QUIT" {
                        let _ = secure.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    secure.get_mut().write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_out_over_smtp_with_starttls() {
    logging_common::tls::install_crypto_provider();
    let certs_dir = tempfile::tempdir().unwrap();
    let certs =
        logging_aggregator::certs::generate(certs_dir.path(), &["localhost".to_string()], "unused")
            .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            logging_common::tls::load_certs(&certs.server).unwrap(),
            logging_common::tls::load_key(&certs.server_key).unwrap(),
        )
        .unwrap();
    let (port, messages) = smtp_server(tokio_rustls::TlsAcceptor::from(Arc::new(server))).await;
    let app = TestApp::start_with(Db::Sqlite, |c| {
        alerting(c, "http://127.0.0.1:9", &["email"]);
        c.alert_smtp_url = Some(format!("smtp://localhost:{port}"));
        c.alert_smtp_ca = Some(certs.ca.clone());
        c.alert_email_from = Some("Logging Service <alerts@example.com>".into());
        c.alert_email_to = vec!["oncall@example.com".into(), "lead@example.com".into()];
    })
    .await;
    create_rule(
        &app,
        json!({"name": "auth-failures", "kind": "count", "window": "1m", "threshold": 0,
               "filter": {"service": "auth", "query": "\"invalid password\""},
               "severity": "critical"}),
    )
    .await;
    app.ingest(vec![entry(
        "auth",
        "warning",
        "Invalid password for alice",
        0,
    )])
    .await;
    let alert = wait_for_alert(&app, "auth-failures", "firing").await;
    let mut mail = String::new();
    for _ in 0..200 {
        if let Some(m) = messages.lock().first() {
            mail = m.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(mail.contains("Subject: [FIRING] auth-failures"), "{mail}");
    assert!(
        mail.contains("To: oncall@example.com, lead@example.com"),
        "{mail}"
    );
    assert!(
        mail.contains("From: \"Logging Service\" <alerts@example.com>")
            || mail.contains("From: Logging Service <alerts@example.com>"),
        "{mail}"
    );
    assert!(mail.contains(alert["id"].as_str().unwrap()), "{mail}");
    let id = alert["id"].as_str().unwrap();
    wait_until_notified(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_without_its_settings_stops_the_start_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::test_config(dir.path().to_path_buf());
    config.alert_notification_channels = vec!["email".into()];
    let error = logging_aggregator::app::start(config)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("ALERT_SMTP_URL"), "{error}");
    let mut config = crate::support::test_config(dir.path().to_path_buf());
    config.alert_notification_channels = vec!["pager".into()];
    let error = logging_aggregator::app::start(config)
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("ALERT_NOTIFICATION_CHANNELS"),
        "{error}"
    );
}
