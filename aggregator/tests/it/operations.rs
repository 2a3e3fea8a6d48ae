//! Health, readiness, metrics, the OpenAPI document, retention and the documented settings.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::on_both_databases;
use crate::support::{ADMIN, Db, TestApp, entry, expect_problem, messages};

async fn health_and_readiness_report_each_dependency(db: Db) {
    let app = TestApp::start_with(db, |c| c.service_name = "logging-test".into()).await;
    let health = app.get_json("/health").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["service"], "logging-test");
    let ready = app.get_json("/health/ready").await;
    assert_eq!(ready["status"], "ready");
    for dependency in ["wal", "index", "database"] {
        assert_eq!(
            ready["checks"][dependency]["status"], "up",
            "{dependency}: {ready}"
        );
    }
    let engine = match db {
        Db::Sqlite => "sqlite",
        Db::Postgres => "postgres",
    };
    assert_eq!(ready["checks"]["database"]["engine"], engine);
    app.stop().await;
}

async fn metrics_follow_prometheus_conventions(db: Db) {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let app = TestApp::start_with(db, |c| c.prometheus_port = port).await;
    app.ingest(vec![
        entry("api", "info", "counted", 1),
        entry("api", "error", "counted too", 1),
        entry("web", "error", "and this", 1),
    ])
    .await;
    let text = app.metrics().await;
    for name in [
        "logging_aggregator_ingested_entries_total",
        "logging_aggregator_indexed_entries_total",
        "logging_aggregator_wal_bytes_total",
        "logging_aggregator_wal_group_commit_seconds_bucket",
        "logging_aggregator_http_requests_total{method=\"POST\",route=\"/api/logs\",status=\"201\"}",
        "logging_aggregator_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    // Stored volume per service and level, for dashboards.
    for line in [
        "logging_aggregator_ingested_entries_total{service=\"api\",level=\"info\"} 1",
        "logging_aggregator_ingested_entries_total{service=\"api\",level=\"error\"} 1",
        "logging_aggregator_ingested_entries_total{service=\"web\",level=\"error\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from /metrics:\n{text}"
        );
    }
    // The same metrics on the dedicated PROMETHEUS_PORT listener.
    let separate = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(separate.status(), StatusCode::OK);
    assert!(
        separate
            .text()
            .await
            .unwrap()
            .contains("logging_aggregator_ingested_entries_total")
    );
    app.stop().await;
    let app = TestApp::start_with(db, |c| c.prometheus_enabled = false).await;
    let response = app
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

/// Every `.route("path", method(..).method(..))` of the router, from its source.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source = include_str!("../../src/api/mod.rs");
    let mut routes = BTreeSet::new();
    // Each `.route(` call, however rustfmt wrapped it, up to its closing parenthesis.
    for call in source.split(".route(").skip(1) {
        let mut depth = 1;
        let end = call
            .char_indices()
            .find(|(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map_or(call.len(), |(i, _)| i);
        let call: String = call[..end].split_whitespace().collect();
        let path = call.split('"').nth(1).unwrap().to_string();
        let handlers = &call[call.find("\",").unwrap() + 2..];
        for method in ["get", "post", "put", "delete", "patch"] {
            if handlers.starts_with(&format!("{method}("))
                || handlers.contains(&format!(".{method}("))
            {
                routes.insert((path.clone(), method.to_string()));
            }
        }
    }
    routes
}

async fn the_openapi_document_describes_every_route_and_only_those(db: Db) {
    let app = TestApp::start(db).await;
    let doc = app.get_json("/api/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let served = routes_in_source();
    assert!(served.len() >= 14, "router parsed: {served:?}");
    assert_eq!(documented, served, "OpenAPI paths vs. router");
    // Every reference resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling $ref {name}"
        );
    }
    // And every documented operation is really served (not the 404/405 fallbacks).
    for (path, method) in documented {
        let path = path.replace("{id}", &uuid::Uuid::now_v7().to_string());
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let response = app
            .request(method.clone(), &path, Some(ADMIN))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let fallback = body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("see /api/openapi.json"));
        assert!(
            !fallback,
            "{method} {path} is documented but not served ({status})"
        );
    }
    app.stop().await;
}

async fn retention_drops_whole_day_partitions(db: Db) {
    let mut app = TestApp::start(db).await;
    app.ingest(vec![
        entry("api", "info", "ten days old", 10 * 86_400),
        entry("api", "info", "fresh", 60),
    ])
    .await;
    assert_eq!(
        app.get_json("/api/logs/stats").await["partitions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    app.restart(|c| c.log_retention_days = 5).await;
    let mut partitions = usize::MAX;
    for _ in 0..100 {
        let stats = app.get_json("/api/logs/stats").await;
        partitions = stats["partitions"].as_array().unwrap().len();
        if partitions == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(partitions, 1, "the old day's partition is gone");
    let listed = app.get_json("/api/logs").await;
    assert_eq!(messages(&listed), vec!["fresh"]);
    let day_dirs = std::fs::read_dir(app.dir.path().join("index"))
        .unwrap()
        .count();
    assert_eq!(day_dirs, 1);
    app.stop().await;
}

on_both_databases!(
    health_and_readiness_report_each_dependency,
    metrics_follow_prometheus_conventions,
    the_openapi_document_describes_every_route_and_only_those,
    retention_drops_whole_day_partitions,
);

/// The README's configuration table lists exactly the settings the code reads.
#[test]
fn every_setting_is_documented_in_the_readme_and_nothing_else() {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("## Aggregator configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Aggregator configuration section");
    let documented: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    let read: BTreeSet<String> =
        logging_common::config::variable_names::<logging_aggregator::config::Config>()
            .into_iter()
            .collect();
    assert_eq!(documented, read, "README configuration table vs. Config");
}

/// A store that cannot keep up (here its day partition's directory is blocked by a file, as
/// a damaged data directory would): readiness says so, a durable entry it has not indexed is
/// a 503 naming the store (never a 404), writes are held back with 429 and `Retry-After`, and
/// once the store can write again everything acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_keep_up_holds_writes_back_and_says_so() {
    let app = TestApp::start_with(Db::Sqlite, |c| {
        c.ingest_max_lag_bytes = 1;
        c.index_refresh_interval_ms = 100;
    })
    .await;
    // Two days ago: a day no partition exists for yet.
    let day = logging_common::Timestamp::now().day() - 2;
    let name = logging_aggregator::index::day_name(day);
    let blocker = app.dir.path().join("index").join(&name);
    std::fs::write(&blocker, b"not a directory").unwrap();
    let at = |n: i64| {
        let mut e = entry("blocked", "info", &format!("entry {n}"), 0);
        e["timestamp"] = serde_json::json!(format!("{name}T12:00:0{n}Z"));
        e
    };
    let ids = app.ingest(vec![at(1)]).await;
    // Durable, not searchable: 503 naming the store.
    let response = app
        .request(Method::GET, &format!("/api/logs/{}", ids[0]), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let problem = expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("write-ahead log"),
        "{problem}"
    );
    // Readiness: the index is down.
    let mut ready = Value::Null;
    for _ in 0..100 {
        let response = app
            .request(Method::GET, "/health/ready", None)
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            ready = response.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["checks"]["index"]["status"], "down", "{ready}");
    // Writes are held back.
    let response = app.post("/api/logs", &at(2)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    expect_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    // The store can write again: everything acknowledged is found, writes are taken.
    std::fs::remove_file(&blocker).unwrap();
    // A liveness bound (the indexer retries with a back-off), generous for a loaded machine.
    let mut found = StatusCode::NOT_FOUND;
    for _ in 0..300 {
        found = app
            .request(Method::GET, &format!("/api/logs/{}", ids[0]), Some(ADMIN))
            .send()
            .await
            .unwrap()
            .status();
        if found == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found, StatusCode::OK);
    app.ingest(vec![at(3)]).await;
    app.stop().await;
}

/// A graceful stop does not wait forever for a store that keeps failing: the indexer gives
/// up after a few attempts, and what it could not index is replayed from the WAL on the next
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_is_not_held_up_by_a_failing_store_and_nothing_is_lost() {
    let mut app = TestApp::start_with(Db::Sqlite, |c| c.index_refresh_interval_ms = 100).await;
    let day = logging_common::Timestamp::now().day() - 2;
    let name = logging_aggregator::index::day_name(day);
    let blocker = app.dir.path().join("index").join(&name);
    std::fs::write(&blocker, b"not a directory").unwrap();
    let mut e = entry("blocked", "info", "kept in the WAL", 0);
    e["timestamp"] = serde_json::json!(format!("{name}T12:00:01Z"));
    let ids = app.ingest(vec![e]).await;
    // A liveness bound, not a timing: before the fix this stop never returned.
    let unblock = blocker.clone();
    tokio::time::timeout(
        Duration::from_secs(120),
        app.restart(move |_| std::fs::remove_file(&unblock).unwrap()),
    )
    .await
    .expect("the stop returns while the store fails");
    let mut found = StatusCode::NOT_FOUND;
    for _ in 0..100 {
        found = app
            .request(Method::GET, &format!("/api/logs/{}", ids[0]), Some(ADMIN))
            .send()
            .await
            .unwrap()
            .status();
        if found == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found, StatusCode::OK);
    app.stop().await;
}

/// `WAL_MAX_BYTES` bounds what the WAL keeps for a sink that is away: past it the sink skips
/// its oldest entries, counted in its report and in `/metrics`, while the embedded index,
/// which is never skipped, keeps every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_wal_max_bytes_a_sink_that_is_away_skips_ahead_and_the_index_keeps_everything() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let app = TestApp::start_with(Db::Sqlite, |c| {
        c.loki_url = Some(format!("http://127.0.0.1:{closed}"));
        c.wal_segment_bytes = 1024 * 1024;
        c.wal_max_bytes = 2 * 1024 * 1024;
        c.alert_rules = Vec::new();
    })
    .await;
    let padding = "x".repeat(1000);
    let mut sent = 0;
    for round in 0..10 {
        let batch: Vec<Value> = (0..500)
            .map(|i| entry("overrun", "info", &format!("{round}-{i} {padding}"), 1))
            .collect();
        sent += app.ingest(batch).await.len();
    }
    let report = crate::support::wait_for_sink(&app, "loki", |r| {
        r["overrun_entries"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert!(report["overrun_entries"].as_u64().unwrap() > 0, "{report}");
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("logging_aggregator_wal_overrun_entries_total{consumer=\"loki\"}")),
        "{metrics}"
    );
    let mut stats = Value::Null;
    for _ in 0..100 {
        stats = app.get_json("/api/logs/stats").await;
        if stats["entries"] == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats["entries"], sent, "the index skips nothing");
    let wal_bytes = stats["wal"]["bytes_on_disk"].as_u64().unwrap();
    assert!(
        wal_bytes <= 4 * 1024 * 1024,
        "the WAL holds {wal_bytes} bytes"
    );
    app.stop().await;
}
