//! Writing, listing, fetching and deleting log entries.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::{ADMIN, Db, TestApp, WRITER, entry, expect_problem, messages};

async fn a_single_entry_is_created_and_fetched_with_every_field(db: Db) {
    let app = TestApp::start(db).await;
    let sent = json!({
        "timestamp": logging_common::Timestamp::now().to_rfc3339(),
        "level": "WARN",
        "service": "checkout",
        "message": "payment took 812 ms",
        "context": {"duration_ms": 812, "order": {"id": 7}},
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "user_id": "alice",
        "request_id": "req-1",
        "correlation_id": "corr-1",
        "tags": ["payments", "slow"],
    });
    let response = app.post("/api/logs", &sent).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Realtime read by id: found at once, without waiting for a refresh.
    let got = app.get_json(&format!("/api/logs/{id}")).await;
    assert_eq!(got["id"], id);
    assert_eq!(got["level"], "warning");
    assert_eq!(got["service"], "checkout");
    assert_eq!(
        got["context"],
        json!({"duration_ms": 812, "order": {"id": 7}})
    );
    for key in [
        "trace_id",
        "span_id",
        "user_id",
        "request_id",
        "correlation_id",
        "tags",
    ] {
        assert_eq!(got[key], sent[key], "{key}");
    }
    assert!(got["created_at"].is_string());
    assert_eq!(got["timestamp"], sent["timestamp"]);
    app.stop().await;
}

async fn a_batch_stores_the_valid_entries_and_names_each_rejection_by_index(db: Db) {
    let app = TestApp::start(db).await;
    let body = json!([
        entry("api", "info", "first", 1),
        {"level": "info", "service": "api", "message": "no timestamp"},
        entry("api", "error", "third", 1),
        {"timestamp": 1, "level": "loud", "service": "api", "message": "bad level"},
        "not an object",
    ]);
    let response = app.post("/api/logs?refresh=wait_for", &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    let ids = body["ids"].as_array().unwrap();
    assert!(ids[0].is_string() && ids[2].is_string());
    assert!(ids[1].is_null() && ids[3].is_null() && ids[4].is_null());
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 3);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["error"], "timestamp: is required");
    assert_eq!(rejected[1]["index"], 3);
    assert!(
        rejected[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("level: unknown level \"loud\"")
    );
    assert_eq!(rejected[2]["index"], 4);
    let listed = app.get_json("/api/logs").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    app.stop().await;
}

async fn resending_a_batch_stores_nothing_twice(db: Db) {
    let app = TestApp::start(db).await;
    let batch: Vec<Value> = (0..20)
        .map(|i| {
            let mut e = entry("api", "info", &format!("message {i}"), 5);
            e["id"] = json!(uuid::Uuid::now_v7().to_string());
            e
        })
        .collect();
    let first = app.post("/api/logs?refresh=wait_for", &json!(batch)).await;
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["accepted"], 20);
    // Again right away (some still pending in the WAL) and again after they are searchable.
    for _ in 0..2 {
        let again = app.post("/api/logs?refresh=wait_for", &json!(batch)).await;
        assert_eq!(again.status(), StatusCode::CREATED);
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["accepted"], 0);
        assert_eq!(again["duplicates"], 20);
        assert_eq!(again["ids"], first["ids"], "answered as the first time");
    }
    let listed = app.get_json("/api/logs?limit=100").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 20);
    // Also across a restart, when the dedup filter is rebuilt from the store.
    let mut app = app;
    app.restart(|_| {}).await;
    let again: Value = app
        .post("/api/logs", &json!(batch))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["duplicates"], 20);
    app.stop().await;
}

async fn every_filter_selects_exactly_its_entries(db: Db) {
    let app = TestApp::start(db).await;
    let mut entries = vec![
        entry("api", "debug", "a", 7200),
        entry("api", "error", "b", 3000),
        entry("web", "warning", "c", 1800),
        entry("web", "critical", "d", 600),
        entry("db", "info", "e", 60),
    ];
    entries[1]["trace_id"] = json!("trace-1");
    entries[1]["tags"] = json!(["payments", "eu"]);
    entries[2]["request_id"] = json!("req-9");
    entries[2]["tags"] = json!(["payments"]);
    entries[3]["correlation_id"] = json!("corr-3");
    entries[4]["user_id"] = json!("0E7B3C3A-1B2C-4D5E-8F90-A1B2C3D4E5F6");
    app.ingest(entries).await;
    let messages = |body: Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect()
    };
    let an_hour_ago = logging_common::Timestamp::now()
        .saturating_add_nanos(-3600 * 1_000_000_000)
        .to_rfc3339();
    for (query, want) in [
        ("service=api", vec!["b", "a"]),
        ("service=api,db", vec!["e", "b", "a"]),
        ("service=api&service=web", vec!["d", "c", "b", "a"]),
        ("level=error", vec!["b"]),
        ("level=err", vec!["b"]),
        ("min_level=warning", vec!["d", "c", "b"]),
        ("min_level=error&service=web", vec!["d"]),
        (
            &format!("start={an_hour_ago}") as &str,
            vec!["e", "d", "c", "b"],
        ),
        (&format!("end={an_hour_ago}"), vec!["a"]),
        ("trace_id=trace-1", vec!["b"]),
        ("request_id=req-9", vec!["c"]),
        ("correlation_id=corr-3", vec!["d"]),
        ("user_id=0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6", vec!["e"]),
        ("user_id=0E7B3C3A-1B2C-4D5E-8F90-A1B2C3D4E5F6", vec!["e"]),
        ("tag=payments", vec!["c", "b"]),
        ("tag=payments&tag=eu", vec!["b"]),
        ("order=asc&service=web", vec!["c", "d"]),
        ("service=nobody", vec![]),
    ] {
        let got = messages(app.get_json(&format!("/api/logs?{query}")).await);
        assert_eq!(got, want, "{query}");
    }
    app.stop().await;
}

async fn cursor_pagination_visits_every_entry_once_while_inserts_continue(db: Db) {
    let app = TestApp::start(db).await;
    // 25 entries, several sharing a timestamp, so the sequence breaks ties.
    let ts = logging_common::Timestamp::now().saturating_add_nanos(-600 * 1_000_000_000);
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            json!({
                "timestamp": ts.saturating_add_nanos((i / 5) * 1_000_000).to_rfc3339(),
                "level": "info", "service": "pager", "message": format!("page entry {i}"),
            })
        })
        .collect();
    let ids = app.ingest(batch).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/logs?service=pager&limit=7&cursor={c}"),
            None => "/api/logs?service=pager&limit=7".to_string(),
        };
        let page = app.get_json(&path).await;
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string()),
        );
        // Newer entries arriving mid-walk must not shift the pages.
        app.ingest(vec![entry("pager", "info", "arrived during paging", 0)])
            .await;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no entry twice");
    let expected: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        unique, expected,
        "every original entry once, none of the newer ones"
    );
    // Within a shared timestamp, newest-first means the later-ingested first.
    let first_page = app
        .get_json(&format!(
            "/api/logs?service=pager&order=asc&limit=5&end={}",
            ts.saturating_add_nanos(1).to_rfc3339()
        ))
        .await;
    let in_order = messages(&first_page);
    assert_eq!(
        in_order,
        vec![
            "page entry 0",
            "page entry 1",
            "page entry 2",
            "page entry 3",
            "page entry 4"
        ]
    );
    app.stop().await;
}

async fn delete_hides_the_entry_at_once_and_records_who_did_it(db: Db) {
    let app = TestApp::start(db).await;
    let ids = app
        .ingest(vec![
            entry("api", "error", "secret leaked", 10),
            entry("api", "info", "keep me", 10),
        ])
        .await;
    let response = app
        .request(
            Method::DELETE,
            &format!("/api/logs/{}", ids[0]),
            Some(ADMIN),
        )
        .header("user-agent", "ops-cli/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let deleted: Value = response.json().await.unwrap();
    let gone = app
        .request(Method::GET, &format!("/api/logs/{}", ids[0]), Some(ADMIN))
        .send()
        .await
        .unwrap();
    expect_problem(gone, StatusCode::NOT_FOUND).await;
    let listed = app.get_json("/api/logs").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let searched = app.get_json("/api/search?q=secret").await;
    assert_eq!(searched["total"], 0);
    let stats = app.get_json("/api/logs/stats").await;
    assert_eq!(stats["entries"], 1);
    // The audit trail names the entry and the caller.
    let audit = app
        .get_json(&format!(
            "/api/audit/{}",
            deleted["audit_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(audit["action"], "log.deleted");
    assert_eq!(audit["entity_type"], "log_entry");
    assert_eq!(audit["entity_id"], ids[0]);
    assert_eq!(audit["actor"]["role"], "admin");
    assert_eq!(audit["actor"]["token_id"].as_str().unwrap().len(), 12);
    assert_eq!(audit["user_agent"], "ops-cli/1.0");
    assert_eq!(audit["ip_address"], "127.0.0.1");
    assert_eq!(audit["metadata"]["service"], "api");
    // Deleting again: it is gone.
    let again = app
        .request(
            Method::DELETE,
            &format!("/api/logs/{}", ids[0]),
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    expect_problem(again, StatusCode::NOT_FOUND).await;
    // Still hidden after a restart, and a re-sent copy does not bring it back.
    let mut app = app;
    app.restart(|_| {}).await;
    let gone = app
        .request(Method::GET, &format!("/api/logs/{}", ids[0]), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let mut resent = entry("api", "error", "secret leaked", 10);
    resent["id"] = json!(ids[0]);
    let response: Value = app
        .post("/api/logs?refresh=wait_for", &resent)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(response["id"], ids[0]);
    assert_eq!(
        app.get_json("/api/logs").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    app.stop().await;
}

async fn entries_survive_a_restart_and_stay_in_order(db: Db) {
    let mut app = TestApp::start(db).await;
    let ids = app
        .ingest(
            (0..50)
                .map(|i| entry("api", "info", &format!("before restart {i}"), 100 - i))
                .collect(),
        )
        .await;
    app.restart(|_| {}).await;
    let listed = app.get_json("/api/logs?limit=1000&order=asc").await;
    let got: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    app.stop().await;
}

async fn environment_is_added_when_the_entry_names_none(db: Db) {
    let app = TestApp::start_with(db, |c| c.environment = Some("staging".into())).await;
    let mut named = entry("api", "info", "named", 1);
    named["environment"] = json!("prod");
    let ids = app
        .ingest(vec![entry("api", "info", "plain", 1), named])
        .await;
    assert_eq!(
        app.get_json(&format!("/api/logs/{}", ids[0])).await["environment"],
        "staging"
    );
    assert_eq!(
        app.get_json(&format!("/api/logs/{}", ids[1])).await["environment"],
        "prod"
    );
    assert!(
        app.get_json(&format!("/api/logs/{}", ids[0])).await["trace_id"].is_null(),
        "no invented correlation ids"
    );
    app.stop().await;
}

async fn a_writer_can_wait_until_its_entries_are_searchable(db: Db) {
    let app = TestApp::start_with(db, |c| c.index_refresh_interval_ms = 300).await;
    let response = app
        .request(Method::POST, "/api/logs?refresh=wait_for", Some(WRITER))
        .json(&entry("api", "info", "visible right after the answer", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let found = app.get_json("/api/search?q=%22right%20after%22").await;
    assert_eq!(found["total"], 1);
    app.stop().await;
}

/// A context sent pretty-printed used to cut its entry's stored line in pieces: the entry
/// was acknowledged, then lost to the index, the sinks and the alert rules.
async fn a_pretty_printed_context_is_stored_whole(db: Db) {
    let app = TestApp::start(db).await;
    let pretty = format!(
        "[{},\n{{\"timestamp\": {:?}, \"level\": \"warn\", \"service\": \"api\",\n \"message\": \"pretty\",\n \"context\": {{\n   \"path\": \"/a b\\n\",\n   \"duration_ms\": 12.5\n }}\n}},\n{}]",
        entry("api", "info", "before", 2),
        logging_common::Timestamp::now().to_rfc3339(),
        entry("api", "info", "after", 0),
    );
    let response = app
        .request(Method::POST, "/api/logs?refresh=wait_for", Some(ADMIN))
        .header("content-type", "application/json")
        .body(pretty)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let listed = app.get_json("/api/logs?service=api&order=asc").await;
    assert_eq!(messages(&listed), ["before", "pretty", "after"]);
    assert_eq!(
        listed["items"][1]["context"],
        json!({"path": "/a b\n", "duration_ms": 12.5})
    );
    app.stop().await;
}

on_both_databases!(
    a_pretty_printed_context_is_stored_whole,
    a_single_entry_is_created_and_fetched_with_every_field,
    a_batch_stores_the_valid_entries_and_names_each_rejection_by_index,
    resending_a_batch_stores_nothing_twice,
    every_filter_selects_exactly_its_entries,
    cursor_pagination_visits_every_entry_once_while_inserts_continue,
    delete_hides_the_entry_at_once_and_records_who_did_it,
    entries_survive_a_restart_and_stay_in_order,
    environment_is_added_when_the_entry_names_none,
    a_writer_can_wait_until_its_entries_are_searchable,
);
