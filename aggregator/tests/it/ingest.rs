//! The agents' mTLS ingest listener: real TLS handshakes, client certificates required.

use std::io::Write;
use std::sync::Arc;

use logging_aggregator::certs;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::{Db, TestApp, entry};

/// A client presenting `cert`/`key` (or no certificate) and trusting `ca`.
fn client(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> reqwest::Client {
    logging_common::tls::install_crypto_provider();
    let config = match identity {
        Some((cert, key)) => logging_common::tls::client_config(ca, cert, key).unwrap(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in logging_common::tls::load_certs(ca).unwrap() {
                roots.add(cert).unwrap();
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

fn ingest_url(app: &TestApp) -> String {
    let port = app.running.as_ref().unwrap().ingest_addr.port();
    format!("https://localhost:{port}/v1/ingest")
}

fn zstd(body: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

async fn an_agent_with_a_certificate_ships_a_zstd_batch(db: Db) {
    let app = TestApp::start(db).await;
    let paths = certs::CertPaths::in_dir(&app.dir.path().join("certs"));
    let agent = client(&paths.ca, Some((&paths.agent, &paths.agent_key)));
    let mut first = entry("web", "info", "GET / 200", 5);
    first["id"] = json!(uuid::Uuid::now_v7().to_string());
    let ndjson = format!(
        "{}\n{{not json\n{}\n\n{}\n",
        first,
        json!({"level": "info", "service": "web", "message": "no timestamp"}),
        entry("web", "error", "upstream timeout", 4),
    );
    let response = agent
        .post(ingest_url(&app))
        .header("content-encoding", "zstd")
        .header("x-batch-id", "batch-1")
        .body(zstd(ndjson.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["duplicates"], 0);
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert!(
        rejected[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("entry: not JSON")
    );
    assert_eq!(rejected[1]["index"], 2);
    assert_eq!(rejected[1]["error"], "timestamp: is required");
    // The agent's identity, from its certificate, is in every entry's context.
    let stored = app
        .get_json(&format!("/api/logs/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["context"]["agent"], "logging-agent");
    // A resent batch is stored once.
    let again: Value = agent
        .post(ingest_url(&app))
        .body(format!("{first}\n"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["duplicates"], 1);
    app.stop().await;
}

async fn clients_without_a_trusted_certificate_are_refused(db: Db) {
    let app = TestApp::start(db).await;
    let paths = certs::CertPaths::in_dir(&app.dir.path().join("certs"));
    let body = format!("{}\n", entry("web", "info", "should never arrive", 1));
    // No client certificate at all.
    let anonymous = client(&paths.ca, None);
    assert!(
        anonymous
            .post(ingest_url(&app))
            .body(body.clone())
            .send()
            .await
            .is_err()
    );
    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let foreign = certs::generate(other.path(), &["localhost".into()], "intruder").unwrap();
    let intruder = client(&paths.ca, Some((&foreign.agent, &foreign.agent_key)));
    assert!(
        intruder
            .post(ingest_url(&app))
            .body(body.clone())
            .send()
            .await
            .is_err()
    );
    // Plain HTTP on the TLS port gets no answer either.
    let port = app.running.as_ref().unwrap().ingest_addr.port();
    assert!(
        reqwest::Client::new()
            .post(format!("http://localhost:{port}/v1/ingest"))
            .body(body)
            .send()
            .await
            .is_err()
    );
    let stats = app.get_json("/api/logs/stats").await;
    assert_eq!(stats["entries"], 0);
    app.stop().await;
}

async fn oversize_and_undecodable_batches_are_refused_with_a_reason(db: Db) {
    let app = TestApp::start_with(db, |c| {
        c.max_log_size = 1024;
        c.max_request_bytes = 64 * 1024;
    })
    .await;
    let paths = certs::CertPaths::in_dir(&app.dir.path().join("certs"));
    let agent = client(&paths.ca, Some((&paths.agent, &paths.agent_key)));
    // Small compressed, huge decompressed: refused without inflating it all.
    let bomb = zstd(&vec![b' '; 10 * 1024 * 1024]);
    let response = agent
        .post(ingest_url(&app))
        .header("content-encoding", "zstd")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let response = agent
        .post(ingest_url(&app))
        .header("content-encoding", "zstd")
        .body(b"definitely not zstd".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = agent
        .post(ingest_url(&app))
        .header("content-encoding", "br")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    app.stop().await;
}

#[test]
fn the_certs_command_writes_a_working_set() {
    let dir = tempfile::tempdir().unwrap();
    let paths = certs::generate(
        dir.path(),
        &["localhost".into(), "logging-aggregator".into()],
        "node-7",
    )
    .unwrap();
    for file in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
    let server =
        logging_common::tls::server_config(&paths.server, &paths.server_key, &paths.ca).unwrap();
    let _ = Arc::new(server);
    let agent = logging_common::tls::load_certs(&paths.agent).unwrap();
    assert_eq!(certs::common_name(&agent[0]).as_deref(), Some("node-7"));
}

on_both_databases!(
    an_agent_with_a_certificate_ships_a_zstd_batch,
    clients_without_a_trusted_certificate_are_refused,
    oversize_and_undecodable_batches_are_refused_with_a_reason,
);
