//! The audit trail: recording, reading, idempotency, immutability and the hash chain.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::on_both_databases;
use crate::support::{ADMIN, Db, READER, TestApp, WRITER, expect_problem};

fn event(action: &str, actor: &str, entity: &str) -> Value {
    json!({
        "actor": {"id": actor, "type": "user"},
        "action": action,
        "entity_type": "order",
        "entity_id": entity,
        "old_values": {"status": "new"},
        "new_values": {"status": "paid"},
        "metadata": {"source": "checkout"},
        "ip_address": "203.0.113.7",
        "user_agent": "shop/2.1",
        "trace_id": "trace-9",
    })
}

async fn record(app: &TestApp, body: &Value) -> Value {
    let response = app
        .request(Method::POST, "/api/audit", Some(WRITER))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn audit_events_are_recorded_with_every_field_and_read_back(db: Db) {
    let app = TestApp::start(db).await;
    let created = record(&app, &event("order.updated", "alice", "A-1")).await;
    for key in [
        "actor",
        "action",
        "entity_type",
        "entity_id",
        "old_values",
        "new_values",
        "metadata",
        "ip_address",
        "user_agent",
        "trace_id",
    ] {
        assert_eq!(
            created[key],
            event("order.updated", "alice", "A-1")[key],
            "{key}"
        );
    }
    assert_eq!(created["sequence"], 1);
    assert_eq!(created["prev_hash"], "0".repeat(64));
    assert_eq!(created["hash"].as_str().unwrap().len(), 64);
    let id = created["id"].as_str().unwrap();
    let fetched = app.get_json(&format!("/api/audit/{id}")).await;
    assert_eq!(fetched, created);
    app.stop().await;
}

async fn the_same_audit_id_is_stored_once(db: Db) {
    let app = TestApp::start(db).await;
    let mut body = event("user.login", "bob", "U-1");
    body["id"] = json!(uuid::Uuid::new_v4().to_string());
    let first = record(&app, &body).await;
    let second = record(&app, &body).await;
    assert_eq!(first, second);
    let list = app.get_json("/api/audit").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    app.stop().await;
}

async fn audit_listing_filters_and_pages(db: Db) {
    let app = TestApp::start(db).await;
    for i in 0..5 {
        record(&app, &event("order.updated", "alice", &format!("A-{i}"))).await;
    }
    record(&app, &event("user.login", "bob", "U-1")).await;
    let mut login = event("user.logout", "carol", "U-2");
    login["actor"] = json!({"user_id": "carol"});
    record(&app, &login).await;
    let count = |v: &Value| v["items"].as_array().unwrap().len();
    assert_eq!(count(&app.get_json("/api/audit?actor=alice").await), 5);
    assert_eq!(count(&app.get_json("/api/audit?user=carol").await), 1);
    assert_eq!(
        count(&app.get_json("/api/audit?action=user.login").await),
        1
    );
    assert_eq!(
        count(
            &app.get_json("/api/audit?entity_type=order&entity_id=A-3")
                .await
        ),
        1
    );
    assert_eq!(count(&app.get_json("/api/audit?trace_id=trace-9").await), 7);
    let future = logging_common::Timestamp::now()
        .saturating_add_nanos(3_600_000_000_000)
        .to_rfc3339();
    assert_eq!(
        count(&app.get_json(&format!("/api/audit?start={future}")).await),
        0
    );
    // Newest first, in pages.
    let page = app.get_json("/api/audit?limit=3").await;
    let seqs: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![7, 6, 5]);
    let next = page["next_cursor"].as_str().unwrap();
    let page = app
        .get_json(&format!("/api/audit?limit=3&cursor={next}"))
        .await;
    let seqs: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 3, 2]);
    let page = app.get_json("/api/audit?order=asc&limit=2").await;
    assert_eq!(page["items"][0]["sequence"], 1);
    app.stop().await;
}

async fn audit_entries_cannot_be_changed_through_any_endpoint(db: Db) {
    let app = TestApp::start(db).await;
    let created = record(&app, &event("user.login", "bob", "U-1")).await;
    let id = created["id"].as_str().unwrap();
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let response = app
            .request(method.clone(), &format!("/api/audit/{id}"), Some(ADMIN))
            .json(&json!({"action": "forged"}))
            .send()
            .await
            .unwrap();
        expect_problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
    }
    let response = app
        .request(Method::DELETE, "/api/audit", Some(ADMIN))
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
    assert_eq!(app.get_json(&format!("/api/audit/{id}")).await, created);
    app.stop().await;
}

/// Opens a direct SQL session on the test's database, the way an intruder with database
/// access would.
async fn tamper(app: &TestApp, statements: &[&str]) {
    match app.db {
        Db::Sqlite => {
            let url = format!("sqlite://{}", app.dir.path().join("logging.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            for sql in statements {
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
        Db::Postgres => {
            let url = app.pg.as_ref().unwrap().url.clone();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            for sql in statements {
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn direct_sql_cannot_change_entries(app: &TestApp) -> bool {
    let result = match app.db {
        Db::Sqlite => {
            let url = format!("sqlite://{}", app.dir.path().join("logging.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("UPDATE audit_entries SET action = 'forged'")
                .execute(&mut conn)
                .await
                .err()
        }
        Db::Postgres => {
            let url = app.pg.as_ref().unwrap().url.clone();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query("DELETE FROM audit_entries")
                .execute(&mut conn)
                .await
                .err()
        }
    };
    result.is_some_and(|e| e.to_string().contains("audit entries are immutable"))
}

async fn the_hash_chain_detects_any_change_to_stored_entries(db: Db) {
    let app = TestApp::start(db).await;
    for i in 0..4 {
        record(&app, &event("order.updated", "alice", &format!("A-{i}"))).await;
    }
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["valid"], true);
    assert_eq!(report["entries_checked"], 4);
    // The database itself refuses changes…
    assert!(direct_sql_cannot_change_entries(&app).await);
    // …and if someone removes that guard and edits an entry, verification finds where.
    let drop_guards: &[&str] = match db {
        Db::Sqlite => &[
            "DROP TRIGGER audit_entries_no_update",
            "DROP TRIGGER audit_entries_no_delete",
        ],
        Db::Postgres => &["DROP TRIGGER audit_entries_no_update ON audit_entries"],
    };
    tamper(&app, drop_guards).await;
    tamper(
        &app,
        &["UPDATE audit_entries SET new_values = '{\"status\":\"refunded\"}' WHERE seq = 3"],
    )
    .await;
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_invalid_sequence"], 3);
    assert_eq!(report["reason"], "the stored fields do not match the hash");
    app.stop().await;
}

async fn removing_an_entry_breaks_the_chain(db: Db) {
    let app = TestApp::start(db).await;
    for i in 0..4 {
        record(&app, &event("order.updated", "alice", &format!("A-{i}"))).await;
    }
    let drop_guards: &[&str] = match db {
        Db::Sqlite => &["DROP TRIGGER audit_entries_no_delete"],
        Db::Postgres => &["DROP TRIGGER audit_entries_no_update ON audit_entries"],
    };
    tamper(&app, drop_guards).await;
    // The newest entry removed: the chain head still remembers it.
    tamper(&app, &["DELETE FROM audit_entries WHERE seq = 4"]).await;
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_invalid_sequence"], 4);
    assert_eq!(
        report["reason"],
        "entries at the end of the chain are missing"
    );
    // One from the middle removed.
    tamper(&app, &["DELETE FROM audit_entries WHERE seq = 2"]).await;
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["first_invalid_sequence"], 2);
    assert_eq!(report["reason"], "an entry is missing");
    app.stop().await;
}

async fn concurrent_audit_writes_keep_one_unbroken_chain(db: Db) {
    let app = TestApp::start(db).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = app.client.clone();
        let url = format!("{}/api/audit", app.base);
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(WRITER)
                .json(&event("order.updated", "alice", &format!("C-{i}")))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["entries_checked"], 40);
    app.stop().await;
}

async fn invalid_audit_events_name_their_fields(db: Db) {
    let app = TestApp::start(db).await;
    let response = app
        .request(Method::POST, "/api/audit", Some(WRITER))
        .json(&json!({"actor": "alice", "action": "", "ip_address": "300.1.1.1", "surprise": 1}))
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, StatusCode::BAD_REQUEST).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for field in [
        "actor",
        "action",
        "ip_address",
        "surprise",
        "entity_type",
        "entity_id",
    ] {
        assert!(fields.contains(&field), "{field} in {body}");
    }
    let response = app
        .request(Method::GET, "/api/audit/not-a-uuid", Some(READER))
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::BAD_REQUEST).await;
    let response = app
        .request(
            Method::GET,
            &format!("/api/audit/{}", uuid::Uuid::new_v4()),
            Some(READER),
        )
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

async fn the_audit_trail_can_be_switched_off(db: Db) {
    let app = TestApp::start_with(db, |c| c.audit_log_enabled = false).await;
    let response = app
        .request(Method::GET, "/api/audit", Some(ADMIN))
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, StatusCode::NOT_FOUND).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("AUDIT_LOG_ENABLED")
    );
    app.stop().await;
}

on_both_databases!(
    audit_events_are_recorded_with_every_field_and_read_back,
    the_same_audit_id_is_stored_once,
    audit_listing_filters_and_pages,
    audit_entries_cannot_be_changed_through_any_endpoint,
    the_hash_chain_detects_any_change_to_stored_entries,
    removing_an_entry_breaks_the_chain,
    concurrent_audit_writes_keep_one_unbroken_chain,
    invalid_audit_events_name_their_fields,
    the_audit_trail_can_be_switched_off,
);
