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

/// Connects with TLS as `config` says, sends a request and reads: the TLS alert the server
/// answered with, if it refused.
async fn refusal(app: &TestApp, config: rustls::ClientConfig) -> Option<rustls::AlertDescription> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = app.running.as_ref().unwrap().ingest_addr.port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let error = match connector.connect(name, tcp).await {
        // With TLS 1.3 a refused client certificate shows on the first read, not in connect.
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"POST /v1/ingest HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
                .await;
            let mut buf = [0u8; 256];
            match tls.read(&mut buf).await {
                Ok(n) => panic!(
                    "the server answered: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        other => panic!("not a TLS refusal: {error} ({other:?})"),
    }
}

async fn clients_without_a_trusted_certificate_are_refused(db: Db) {
    let app = TestApp::start(db).await;
    let paths = certs::CertPaths::in_dir(&app.dir.path().join("certs"));
    let body = format!("{}\n", entry("web", "info", "should never arrive", 1));
    let trusting = |identity: Option<(&std::path::Path, &std::path::Path)>| {
        logging_common::tls::install_crypto_provider();
        match identity {
            Some((cert, key)) => logging_common::tls::client_config(&paths.ca, cert, key).unwrap(),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in logging_common::tls::load_certs(&paths.ca).unwrap() {
                    roots.add(cert).unwrap();
                }
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
        }
    };
    let agent = client(&paths.ca, Some((&paths.agent, &paths.agent_key)));
    let still_serves = || async {
        let response = agent
            .post(ingest_url(&app))
            .body(format!("{}\n", entry("web", "info", "a real agent", 1)))
            .send()
            .await
            .expect("the listener still serves agents");
        assert_eq!(response.status(), StatusCode::OK);
    };
    // No client certificate at all: the server asks for one and refuses without it.
    assert_eq!(
        refusal(&app, trusting(None)).await,
        Some(rustls::AlertDescription::CertificateRequired)
    );
    still_serves().await;
    // A certificate from another CA: refused with an alert (rustls says unknown CA, bad
    // certificate or, checking the signature against what it trusts, decrypt error).
    let other = tempfile::tempdir().unwrap();
    let foreign = certs::generate(other.path(), &["localhost".into()], "intruder").unwrap();
    let alert = refusal(&app, trusting(Some((&foreign.agent, &foreign.agent_key)))).await;
    assert!(
        matches!(
            alert,
            Some(
                rustls::AlertDescription::UnknownCA
                    | rustls::AlertDescription::BadCertificate
                    | rustls::AlertDescription::DecryptError
            )
        ),
        "{alert:?}"
    );
    still_serves().await;
    // Plain HTTP on the TLS port: no HTTP answer, only the end of the connection (or an alert).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = app.running.as_ref().unwrap().ingest_addr.port();
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(
            format!(
                "POST /v1/ingest HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "a TLS port answered plain text: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    still_serves().await;
    let mut stats = Value::Null;
    for _ in 0..100 {
        stats = app.get_json("/api/logs/stats").await;
        if stats["entries"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stats["entries"], 3, "only the real agent's entries");
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
