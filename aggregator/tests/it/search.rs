//! Full-text search, analytics and stats.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::{Db, TestApp, entry, messages};

async fn seed(app: &TestApp) {
    let mut entries = vec![
        entry(
            "checkout",
            "error",
            "payment gateway timeout after 3000 ms",
            500,
        ),
        entry("checkout", "info", "payment accepted for order 17", 400),
        entry("checkout", "info", "payment accepted for order 18", 300),
        entry("auth", "warning", "token expired for user 5", 200),
        entry("auth", "error", "database connection refused", 100),
        entry("search", "debug", "gateway cache warmed", 50),
    ];
    for (i, e) in entries.iter_mut().enumerate() {
        e["context"] = json!({"duration_ms": (i as f64 + 1.0) * 100.0});
    }
    entries[3]["trace_id"] = json!("t-42");
    app.ingest(entries).await;
}

async fn search_supports_terms_phrases_boolean_operators_and_filters(db: Db) {
    let app = TestApp::start(db).await;
    seed(&app).await;
    for (q, total) in [
        ("payment", 3),
        ("payment accepted", 2),
        ("\"gateway timeout\"", 1),
        ("\"timeout gateway\"", 0),
        ("gateway OR refused", 3),
        ("payment AND NOT accepted", 1),
        ("payment -accepted", 1),
        ("NOT payment", 3),
        ("service:auth", 2),
        ("PAYMENT", 3),
    ] {
        let body = app
            .get_json(&format!("/api/search?q={}", urlencode(q)))
            .await;
        assert_eq!(body["total"], total, "q={q}: {body}");
        assert_eq!(
            body["items"].as_array().unwrap().len(),
            total as usize,
            "q={q}"
        );
    }
    let body = app
        .get_json("/api/search?q=payment&service=checkout&min_level=error")
        .await;
    assert_eq!(
        messages(&body),
        vec!["payment gateway timeout after 3000 ms"]
    );
    // The total is exact even when the page is smaller.
    let body = app.get_json("/api/search?q=payment&limit=1").await;
    assert_eq!(body["total"], 3);
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    let next = body["next_cursor"].as_str().unwrap();
    let body = app
        .get_json(&format!("/api/search?q=payment&limit=5&cursor={next}"))
        .await;
    assert_eq!(body["items"].as_array().unwrap().len(), 2);
    // Highlights point at the matching words.
    let body = app.get_json("/api/search?q=refused").await;
    let highlight = &body["items"][0]["highlight"];
    let fragment = highlight["fragment"].as_str().unwrap();
    let range = &highlight["ranges"][0];
    let (s, e) = (
        range[0].as_u64().unwrap() as usize,
        range[1].as_u64().unwrap() as usize,
    );
    assert_eq!(&fragment[s..e], "refused");
    let body = app.get_json("/api/search?q=refused&highlight=false").await;
    assert!(body["items"][0].get("highlight").is_none());
    app.stop().await;
}

async fn a_malformed_query_is_a_400_naming_q(db: Db) {
    let app = TestApp::start(db).await;
    seed(&app).await;
    for q in ["\"unclosed", "nosuchfield:x", "(a OR"] {
        let response = app
            .request(
                reqwest::Method::GET,
                &format!("/api/search?q={}", urlencode(q)),
                Some(crate::support::ADMIN),
            )
            .send()
            .await
            .unwrap();
        let body = crate::support::expect_problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(body["errors"][0]["field"], "q", "{q}: {body}");
    }
    app.stop().await;
}

async fn analytics_counts_rates_patterns_and_percentiles(db: Db) {
    let app = TestApp::start(db).await;
    seed(&app).await;
    let body = app.get_json("/api/analytics?interval=1h").await;
    assert_eq!(body["total"], 6);
    assert_eq!(
        body["levels"],
        json!({"debug": 1, "info": 2, "warning": 1, "error": 2})
    );
    let timeline = body["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 24, "a day of hourly buckets");
    let bucket_total: u64 = timeline.iter().map(|b| b["total"].as_u64().unwrap()).sum();
    assert_eq!(bucket_total, 6);
    let with_entries: Vec<&Value> = timeline
        .iter()
        .filter(|b| b["total"].as_u64().unwrap() > 0)
        .collect();
    let services_in_buckets: u64 = with_entries
        .iter()
        .flat_map(|b| b["services"].as_object().unwrap().values())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(services_in_buckets, 6);
    let services = body["services"].as_array().unwrap();
    assert_eq!(
        services[0],
        json!({"service": "checkout", "total": 3, "errors": 1, "error_rate": 1.0 / 3.0})
    );
    assert_eq!(
        services[1],
        json!({"service": "auth", "total": 2, "errors": 1, "error_rate": 0.5})
    );
    let top = body["top_patterns"].as_array().unwrap();
    assert_eq!(top[0]["pattern"], "payment accepted for order <*>");
    assert_eq!(top[0]["count"], 2);
    let stats = &body["field_stats"];
    assert_eq!(stats["field"], "duration_ms");
    assert_eq!(stats["count"], 6);
    assert_eq!(stats["min"], 100.0);
    assert_eq!(stats["max"], 600.0);
    assert_eq!(stats["p50"], 300.0);
    assert_eq!(stats["p99"], 600.0);
    assert_eq!(stats["avg"], 350.0);
    // Filters narrow everything, including the percentiles.
    let body = app
        .get_json("/api/analytics?service=auth&interval=5m")
        .await;
    assert_eq!(body["total"], 2);
    assert_eq!(body["field_stats"]["count"], 2);
    assert_eq!(body["interval_seconds"], 300);
    let body = app.get_json("/api/analytics?field=nonexistent").await;
    assert_eq!(body["field_stats"]["count"], 0);
    assert!(body["field_stats"]["p50"].is_null());
    app.stop().await;
}

async fn stats_report_volume_services_and_lag(db: Db) {
    let app = TestApp::start(db).await;
    seed(&app).await;
    let stats = app.get_json("/api/logs/stats").await;
    assert_eq!(stats["entries"], 6);
    assert_eq!(
        stats["services"],
        json!({"checkout": 3, "auth": 2, "search": 1})
    );
    assert!(stats["raw_bytes"].as_u64().unwrap() > 6 * 200);
    assert!(stats["stored_bytes"].as_u64().unwrap() > 0);
    assert!(stats["ingest_rate_per_second"].as_f64().unwrap() > 0.0);
    let consumers = stats["wal"]["consumers"].as_array().unwrap();
    let names: Vec<&str> = consumers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"index") && names.contains(&"alerts"),
        "{names:?}"
    );
    let index = consumers.iter().find(|c| c["name"] == "index").unwrap();
    assert_eq!(index["lag_entries"], 0);
    assert_eq!(stats["partitions"].as_array().unwrap().len(), 1);
    app.stop().await;
}

pub fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The query cache's counter of `outcome` (hit or miss).
async fn cache_count(app: &TestApp, outcome: &str) -> u64 {
    let label = format!("logging_aggregator_query_cache_requests_total{{outcome=\"{outcome}\"}}");
    app.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&label)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Analytics over a past day is answered from the cache until the day changes: a late entry
/// for it, or a delete, makes the next answer a fresh one.
async fn analytics_over_past_days_is_cached_until_they_change(db: Db) {
    let app = TestApp::start(db).await;
    let now = logging_common::Timestamp::now();
    let day = now.day() - 2;
    let at = |n: i64| {
        let noon = day * 86_400 + 43_200 + n;
        entry(
            "ledger",
            "error",
            &format!("late posting {n}"),
            now.as_nanos() / 1_000_000_000 - noon,
        )
    };
    app.ingest((0..20).map(at).collect()).await;
    let bound = |d: i64| logging_common::Timestamp::from_nanos(d * 86_400_000_000_000).to_rfc3339();
    let path = format!(
        "/api/analytics?start={}&end={}&interval=1h",
        bound(day),
        bound(day + 1)
    );
    let without_took = |mut body: Value| {
        body.as_object_mut().unwrap().remove("took_ms");
        body
    };
    let first = without_took(app.get_json(&path).await);
    assert_eq!(first["total"], 20);
    let hits = cache_count(&app, "hit").await;
    let second = without_took(app.get_json(&path).await);
    assert_eq!(second, first);
    assert_eq!(
        cache_count(&app, "hit").await,
        hits + 1,
        "answered from the cache"
    );
    // A late entry for that day: a fresh answer.
    let ids = app.ingest(vec![at(100)]).await;
    assert_eq!(app.get_json(&path).await["total"], 21);
    assert_eq!(cache_count(&app, "hit").await, hits + 1);
    // A delete: fresh again.
    let deleted = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/logs/{}", ids[0]),
            Some(crate::support::ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    assert_eq!(app.get_json(&path).await["total"], 20);
    assert_eq!(app.get_json(&path).await["total"], 20);
    assert_eq!(cache_count(&app, "hit").await, hits + 2);
    // A range reaching today is never cached.
    let misses = cache_count(&app, "miss").await;
    app.get_json(&format!("/api/analytics?start={}", bound(day)))
        .await;
    app.get_json(&format!("/api/analytics?start={}", bound(day)))
        .await;
    assert_eq!(cache_count(&app, "hit").await, hits + 2);
    assert_eq!(cache_count(&app, "miss").await, misses);
    app.stop().await;
}

on_both_databases!(
    search_supports_terms_phrases_boolean_operators_and_filters,
    a_malformed_query_is_a_400_naming_q,
    analytics_counts_rates_patterns_and_percentiles,
    stats_report_volume_services_and_lag,
    analytics_over_past_days_is_cached_until_they_change,
);
