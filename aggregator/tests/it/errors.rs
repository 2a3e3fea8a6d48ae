//! Bad input gets a clear problem+json answer naming the field, and never a 500 or a crash.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::{ADMIN, Db, TestApp, entry, expect_problem};

async fn post_raw(app: &TestApp, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    app.request(Method::POST, path, Some(ADMIN))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.request(Method::GET, path, Some(ADMIN))
        .send()
        .await
        .unwrap()
}

fn first_field(body: &Value) -> &str {
    body["errors"][0]["field"].as_str().unwrap_or("")
}

async fn malformed_bodies_and_fields_are_named(db: Db) {
    let app = TestApp::start(db).await;
    let body = expect_problem(
        post_raw(&app, "/api/logs", "{\"level\": ").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(first_field(&body), "body");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("body: invalid JSON"),
        "{body}"
    );
    let body = expect_problem(
        post_raw(&app, "/api/logs", "42").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(first_field(&body), "body");
    let body = expect_problem(
        post_raw(&app, "/api/logs", "[]").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(body["detail"], "body: the array has no entries");

    let mut missing = entry("api", "info", "m", 1);
    missing.as_object_mut().unwrap().remove("level");
    let body = expect_problem(
        app.post("/api/logs", &missing).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        body["errors"],
        json!([{"field": "level", "reason": "is required"}])
    );

    let mut wrong = entry("api", "info", "m", 1);
    wrong["service"] = json!(["api"]);
    wrong["tags"] = json!("one");
    let body = expect_problem(app.post("/api/logs", &wrong).await, StatusCode::BAD_REQUEST).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["service", "tags"]);

    let old = entry("api", "info", "m", 40 * 86_400);
    let body = expect_problem(app.post("/api/logs", &old).await, StatusCode::BAD_REQUEST).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("older than the retention period")
    );
    let future = entry("api", "info", "m", -3 * 86_400);
    let body = expect_problem(
        app.post("/api/logs", &future).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("in the future"));

    // Every entry of a batch invalid: nothing stored, each problem by index.
    let body = expect_problem(
        app.post("/api/logs", &json!([missing, {"timestamp": "x"}]))
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(first_field(&body), "[0].level");
    assert!(
        body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["field"] == "[1].timestamp")
    );
    app.stop().await;
}

async fn oversize_entries_and_bodies_get_413(db: Db) {
    let app = TestApp::start_with(db, |c| {
        c.max_log_size = 2048;
        c.max_request_bytes = 64 * 1024;
    })
    .await;
    let big = entry("api", "info", &"x".repeat(4000), 1);
    let body = expect_problem(
        app.post("/api/logs", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(first_field(&body), "entry");
    assert!(body["detail"].as_str().unwrap().contains("MAX_LOG_SIZE"));
    // In a batch the oversize entry is rejected alone.
    let response = app
        .post("/api/logs", &json!([big, entry("api", "info", "small", 1)]))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"][0]["index"], 0);
    // A body over MAX_REQUEST_BYTES is refused before it is read whole.
    let huge = format!(
        "[{}]",
        vec![entry("api", "info", &"y".repeat(1000), 1).to_string(); 100].join(",")
    );
    let body = expect_problem(
        post_raw(&app, "/api/logs", huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("MAX_REQUEST_BYTES")
    );
    app.stop().await;
}

async fn bad_ids_cursors_ranges_and_parameters_are_400_or_404(db: Db) {
    let app = TestApp::start(db).await;
    let body = expect_problem(
        get(&app, "/api/logs/not-a-uuid").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(first_field(&body), "id");
    let unknown = uuid::Uuid::now_v7();
    expect_problem(
        get(&app, &format!("/api/logs/{unknown}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let response = app
        .request(Method::DELETE, &format!("/api/logs/{unknown}"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::NOT_FOUND).await;
    for (path, field) in [
        ("/api/logs?cursor=bogus", "cursor"),
        ("/api/logs?cursor=AWQAAAAAAAAA", "cursor"),
        ("/api/logs?start=yesterday", "start"),
        (
            "/api/logs?start=2026-11-27T10:00:00Z&end=2026-11-27T09:00:00Z",
            "start",
        ),
        ("/api/logs?level=verbose", "level"),
        ("/api/logs?limit=100000", "limit"),
        ("/api/logs?order=sideways", "order"),
        ("/api/logs?servce=api", "servce"),
        ("/api/logs?q=text", "q"),
        ("/api/search?highlight=maybe", "highlight"),
        ("/api/analytics?interval=5w", "interval"),
        (
            "/api/analytics?interval=1s&start=2026-01-01T00:00:00Z&end=2026-11-01T00:00:00Z",
            "interval",
        ),
        ("/api/audit?cursor=zz", "cursor"),
        ("/api/audit?start=never", "start"),
        ("/api/logs?refresh=now", "refresh"),
    ] {
        let body = expect_problem(get(&app, path).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(first_field(&body), field, "{path}: {body}");
    }
    // A cursor from the other sort order.
    app.ingest(vec![
        entry("api", "info", "a", 3),
        entry("api", "info", "b", 2),
    ])
    .await;
    let page = app.get_json("/api/logs?limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let body = expect_problem(
        get(&app, &format!("/api/logs?order=asc&cursor={cursor}")).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(first_field(&body), "cursor");
    let response = get(&app, "/api/nothing-here").await;
    expect_problem(response, StatusCode::NOT_FOUND).await;
    // Extremes that could overflow arithmetic: answered, never a 500.
    use base64::Engine;
    let mut extreme = vec![1u8, b'd'];
    extreme.extend_from_slice(&i64::MAX.to_be_bytes());
    extreme.extend_from_slice(&u64::MAX.to_be_bytes());
    let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&extreme);
    assert_eq!(
        get(&app, &format!("/api/logs?cursor={cursor}"))
            .await
            .status(),
        StatusCode::OK
    );
    for path in [
        "/api/analytics?start=1677-09-22T00:00:00Z&end=2262-04-10T00:00:00Z",
        "/api/analytics?interval=99999999999999999d",
        "/api/logs?start=1677-09-22T00:00:00Z&end=2262-04-10T00:00:00Z",
    ] {
        let status = get(&app, path).await.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
            "{path}: {status}"
        );
    }
    app.stop().await;
}

async fn hostile_bodies_never_crash_or_500(db: Db) {
    let app = TestApp::start(db).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        "{{\"timestamp\":1,\"level\":\"info\",\"service\":\"s\",\"message\":\"m\",\"context\":{}{}}}",
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    );
    let mut bodies: Vec<Vec<u8>> = vec![
        deep.clone().into_bytes(),
        deep_object.into_bytes(),
        b"\xff\xfe\x00garbage".to_vec(),
        b"{\"timestamp\":1e999,\"level\":\"info\",\"service\":\"s\",\"message\":\"m\"}".to_vec(),
        b"{\"timestamp\":-99999999999999999999,\"level\":\"info\",\"service\":\"s\",\"message\":\"m\"}".to_vec(),
        b"{\"timestamp\":\"2026-11-27T25:61:00Z\",\"level\":99,\"service\":\"\",\"message\":null}".to_vec(),
        b"{\"timestamp\":1,\"level\":\"info\",\"service\":\"\\ud800\",\"message\":\"\\u0000\"}".to_vec(),
        b"[{},{},null,[],\"x\",1.5]".to_vec(),
        b"{\"id\":\"00000000-0000-0000-0000-000000000000\",\"timestamp\":0,\"level\":0,\"service\":\"s\",\"message\":\"m\"}".to_vec(),
        Vec::new(),
        // The other agents' protocols: a Loki push and a bulk request nested deep.
        format!(
            "{{\"streams\":[{{\"stream\":{{}},\"values\":[[\"1\",\"x\",{deep}]]}}]}}"
        )
        .into_bytes(),
        format!("{{\"create\":{{\"_index\":\"x\"}}}}\n{{\"message\":\"m\",\"kubernetes\":{{\"pod\":{deep}}},\"x\":{deep}}}\n{{\"index\":{deep}}}\n{{}}\n")
            .into_bytes(),
    ];
    // And a few thousand bytes of pseudo-random noise shaped like JSON.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..50 {
        let alphabet = b"{}[]\":,0123456789.eE+-truefalsnl\\u ab";
        let len = (seed % 300) as usize;
        let mut body = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            body.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        bodies.push(body);
    }
    for body in bodies {
        for path in ["/api/logs", "/api/audit", "/loki/api/v1/push", "/_bulk"] {
            let response = post_raw(&app, path, body.clone()).await;
            assert!(
                response.status().is_client_error() || response.status().is_success(),
                "{path} answered {} to {:?}",
                response.status(),
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
        }
    }
    let health = get(&app, "/health/ready").await;
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await;
}

on_both_databases!(
    malformed_bodies_and_fields_are_named,
    oversize_entries_and_bodies_get_413,
    bad_ids_cursors_ranges_and_parameters_are_400_or_404,
    hostile_bodies_never_crash_or_500,
);
