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

/// A PostgreSQL server of the test's own (the machine's binaries, run as the `postgres`
/// user), so that crashing it costs the other tests nothing.
struct OwnPostgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    /// `None` where PostgreSQL is not installed (a failure under CI).
    fn create() -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(Result::ok)
                    .map(|v| v.path().join("bin"))
                    .max()
            })
            .filter(|bin| bin.join("initdb").exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL's binaries are not in /usr/lib/postgresql, and CI is set"
            );
            eprintln!("PostgreSQL's binaries are not installed: test skipped");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let postgres = OwnPostgres { bin, dir, port };
        let output = postgres
            .as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(postgres.data())
            .output()
            .unwrap();
        assert!(output.status.success(), "initdb: {output:?}");
        postgres.start();
        Some(postgres)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program run as the `postgres` user (it refuses to run as root).
    fn as_postgres(&self, program: &str) -> std::process::Command {
        let mut command = std::process::Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program));
        command
    }

    fn start(&self) {
        let output = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.path().display()
            ))
            .arg("start")
            .output()
            .unwrap();
        assert!(output.status.success(), "pg_ctl start: {output:?}");
    }

    /// Stops at once, without a checkpoint: on the next start PostgreSQL recovers from its
    /// WAL, as after a crash.
    fn crash(&self) {
        let output = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .unwrap();
        assert!(output.status.success(), "pg_ctl stop: {output:?}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_mid_run_loses_no_acknowledged_audit_entry() {
    let Some(postgres) = OwnPostgres::create() else {
        return;
    };
    let url = postgres.url();
    let app = std::sync::Arc::new(
        TestApp::start_with(Db::Sqlite, |c| {
            c.database_url = Some(url.clone());
            c.database_pool_size = 2;
            c.database_max_overflow = 2;
        })
        .await,
    );
    // Two writers record audit entries without pause; each keeps the ids it was answered
    // 201 for, and counts the refusals.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let felt = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (app, running, felt) = (app.clone(), running.clone(), felt.clone());
            tokio::spawn(async move {
                let (mut acknowledged, mut refused) = (Vec::new(), 0);
                let mut n = 0;
                while running.load(std::sync::atomic::Ordering::Acquire) {
                    n += 1;
                    let response = app
                        .request(Method::POST, "/api/audit", Some(WRITER))
                        .json(&event(
                            "order.paid",
                            &format!("w{writer}"),
                            &format!("o-{n}"),
                        ))
                        .send()
                        .await
                        .unwrap();
                    if response.status() == StatusCode::CREATED {
                        let body: Value = response.json().await.unwrap();
                        acknowledged.push(body["id"].as_str().unwrap().to_string());
                    } else {
                        assert!(response.status().is_server_error(), "{response:?}");
                        refused += 1;
                        felt.fetch_add(1, std::sync::atomic::Ordering::Release);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
                (acknowledged, refused)
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let crash = tokio::task::spawn_blocking(move || {
        postgres.crash();
        // Down until a write has been refused (on a loaded machine the first ones may wait
        // out the pool's timeout), and at least two seconds.
        let down = std::time::Instant::now();
        while down.elapsed() < std::time::Duration::from_secs(2)
            || (felt.load(std::sync::atomic::Ordering::Acquire) == 0
                && down.elapsed() < std::time::Duration::from_secs(60))
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        postgres.start();
        postgres
    });
    let postgres = crash.await.unwrap();
    // Writes succeed again once PostgreSQL is back: the pool reconnects by itself.
    let before = app.get_json("/api/audit/verify").await["entries_checked"].as_u64();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    running.store(false, std::sync::atomic::Ordering::Release);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (ids, refusals) = writer.await.unwrap();
        acknowledged.extend(ids);
        refused += refusals;
    }
    assert!(refused > 0, "the crash was felt: some writes were refused");
    let report = app.get_json("/api/audit/verify").await;
    assert_eq!(report["valid"], true, "{report}");
    assert!(
        report["entries_checked"].as_u64() > before,
        "writes resumed after the restart: {report}"
    );
    // Every acknowledged entry survived the crash.
    for id in &acknowledged {
        let response = app
            .request(Method::GET, &format!("/api/audit/{id}"), Some(ADMIN))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{id} acknowledged, then lost"
        );
    }
    assert!(acknowledged.len() >= 20, "{}", acknowledged.len());
    match std::sync::Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the writers still hold the app"),
    }
    drop(postgres);
}
