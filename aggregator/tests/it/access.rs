//! Bearer tokens and roles.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::on_both_databases;
use crate::support::{ADMIN, Db, READER, TestApp, WRITER, entry, expect_problem};

async fn every_role_may_do_exactly_its_share(db: Db) {
    let app = TestApp::start(db).await;
    let ids = app
        .ingest(vec![
            entry("api", "info", "x", 1),
            entry("api", "info", "y", 1),
        ])
        .await;
    let audit_event =
        json!({"actor": {"id": "a"}, "action": "x", "entity_type": "t", "entity_id": "1"});
    let reads = [
        "/api/logs".to_string(),
        format!("/api/logs/{}", ids[1]),
        "/api/logs/stats".into(),
        "/api/search?q=x".into(),
        "/api/analytics".into(),
        "/api/audit".into(),
        "/api/audit/verify".into(),
    ];
    for path in &reads {
        let status = |token| {
            let request = app.request(Method::GET, path, token);
            async move { request.send().await.unwrap().status() }
        };
        assert_eq!(
            status(Some(READER)).await,
            StatusCode::OK,
            "reader GET {path}"
        );
        assert_eq!(
            status(Some(ADMIN)).await,
            StatusCode::OK,
            "admin GET {path}"
        );
        assert_eq!(
            status(Some(WRITER)).await,
            StatusCode::FORBIDDEN,
            "writer GET {path}"
        );
        let response = app.request(Method::GET, path, None).send().await.unwrap();
        let body = expect_problem(response, StatusCode::UNAUTHORIZED).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer <token>")
        );
        let response = app
            .request(Method::GET, path, Some("not-a-real-token"))
            .send()
            .await
            .unwrap();
        expect_problem(response, StatusCode::UNAUTHORIZED).await;
    }
    for (path, body) in [
        ("/api/logs", entry("api", "info", "z", 1)),
        ("/api/audit", audit_event),
    ] {
        let post = |token| app.request(Method::POST, path, token).json(&body).send();
        assert_eq!(
            post(Some(WRITER)).await.unwrap().status(),
            StatusCode::CREATED,
            "writer POST {path}"
        );
        assert_eq!(
            post(Some(ADMIN)).await.unwrap().status(),
            StatusCode::CREATED,
            "admin POST {path}"
        );
        let response = post(Some(READER)).await.unwrap();
        let problem = expect_problem(response, StatusCode::FORBIDDEN).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("reader role may not")
        );
        assert_eq!(post(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let delete = |token| {
        app.request(Method::DELETE, &format!("/api/logs/{}", ids[0]), token)
            .send()
    };
    assert_eq!(
        delete(Some(READER)).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        delete(Some(WRITER)).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        delete(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(delete(Some(ADMIN)).await.unwrap().status(), StatusCode::OK);
    for open in ["/health", "/health/ready", "/metrics", "/api/openapi.json"] {
        let response = app.request(Method::GET, open, None).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{open} needs no token");
    }
    app.stop().await;
}

async fn without_configured_tokens_an_admin_token_is_generated(db: Db) {
    let app = TestApp::start_with(db, |c| c.api_tokens = None).await;
    let token = std::fs::read_to_string(app.dir.path().join("admin-token")).unwrap();
    let token = token.trim();
    assert!(token.len() >= 32);
    let response = app
        .request(Method::GET, "/api/logs", Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .request(Method::GET, "/api/logs", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

async fn access_control_can_be_switched_off(db: Db) {
    let app = TestApp::start_with(db, |c| c.log_access_control_enabled = false).await;
    let response = app
        .request(Method::POST, "/api/logs", None)
        .json(&entry("api", "info", "open", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = app
        .request(Method::GET, "/api/logs", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await;
}

on_both_databases!(
    every_role_may_do_exactly_its_share,
    without_configured_tokens_an_admin_token_is_generated,
    access_control_can_be_switched_off,
);
