//! The binary reads a YAML configuration file, and the environment overrides it.

use logging_tests::AggregatorProcess;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_file_configures_the_binary_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("aggregator.yaml");
    std::fs::write(
        &file,
        "service_name: from-yaml\nenvironment: staging\nlog_retention_days: 7\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let aggregator = AggregatorProcess::start(
        dir.path(),
        &[
            ("CONFIG_FILE", file.as_str()),
            ("ENVIRONMENT", "production"),
        ],
    );
    let client = logging_tests::http_client();
    let health: Value = client
        .get(format!("{}/health", aggregator.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["service"], "from-yaml");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ten_days_ago = now - 10 * 86_400;
    let body = serde_json::json!([
        {"timestamp": now, "level": "info", "service": "s", "message": "fresh"},
        {"timestamp": ten_days_ago, "level": "info", "service": "s", "message": "too old for 7 days"},
    ]);
    let answer: Value = client
        .post(format!("{}/api/logs?refresh=wait_for", aggregator.base))
        .bearer_auth(logging_tests::ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert!(
        answer["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("LOG_RETENTION_DAYS = 7")
    );
    let id = answer["ids"][0].as_str().unwrap();
    let entry: Value = client
        .get(format!("{}/api/logs/{id}", aggregator.base))
        .bearer_auth(logging_tests::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        entry["environment"], "production",
        "the environment overrides the file"
    );
}

#[test]
fn a_bad_setting_stops_the_binary_with_a_message_naming_it() {
    let output = std::process::Command::new(logging_tests::binary("logging-aggregator"))
        .env_clear()
        .env("SERVICE_PORT", "eighty")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SERVICE_PORT: expected a number, got \"eighty\""),
        "{stderr}"
    );
    let output = std::process::Command::new(logging_tests::binary("logging-aggregator"))
        .env_clear()
        .env("ELASTICSEARCH_URL", "http://es:9200")
        .env("ELASTICSEARCH_INDEX", "Logs")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ELASTICSEARCH_INDEX: \"Logs\" must be lower case"),
        "{stderr}"
    );
    // A setting only a subsystem checks (an alert channel without its address) is refused
    // before anything is opened: no WAL, no store, no database in DATA_DIR.
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(logging_tests::binary("logging-aggregator"))
        .env_clear()
        .env("DATA_DIR", dir.path().join("data"))
        .env("ALERT_NOTIFICATION_CHANNELS", "webhook")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ALERT_WEBHOOK_URL"), "{stderr}");
    assert!(!dir.path().join("data/wal").exists(), "the WAL was opened");
    assert!(
        !dir.path().join("data/logging.db").exists(),
        "the database was opened"
    );
    let output = std::process::Command::new(logging_tests::binary("logging-aggregator"))
        .env_clear()
        .env("LOKI_URL", "http://loki:3100")
        .env("LOKI_LABELS", "cluster=prod,service=x")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LOKI_LABELS: \"service\" is set from each entry"),
        "{stderr}"
    );
    // The OpenTelemetry variables are checked too, by both binaries, before anything runs.
    for binary in ["logging-aggregator", "logging-agent"] {
        for (variable, value, says) in [
            (
                "OTEL_TRACES_SAMPLER_ARG",
                "1.5",
                "OTEL_TRACES_SAMPLER_ARG: \"1.5\" is not a ratio between 0 and 1",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "thrift",
                "OTEL_EXPORTER_OTLP_PROTOCOL: \"thrift\" is not a protocol",
            ),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "not a url",
                "OTEL_EXPORTER_OTLP_ENDPOINT: invalid endpoint",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut command = std::process::Command::new(logging_tests::binary(binary));
            command
                .env_clear()
                .env("DATA_DIR", dir.path())
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
                .env("OTEL_TRACES_SAMPLER", "traceidratio")
                .env(variable, value);
            if binary == "logging-agent" {
                command
                    .env("AGENT_DATA_DIR", dir.path())
                    .env("AGGREGATOR_URL", "https://127.0.0.1:9")
                    .env("TLS_CA", dir.path().join("ca.pem"))
                    .env("TLS_CERT", dir.path().join("agent.pem"))
                    .env("TLS_KEY", dir.path().join("agent-key.pem"));
            }
            let output = command.output().unwrap();
            assert_eq!(output.status.code(), Some(2), "{binary} {variable}={value}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains(says),
                "{binary} {variable}={value}: {stderr}"
            );
        }
    }
}

#[test]
fn a_bad_agent_setting_stops_it_with_a_message_naming_it() {
    for (variable, value, says) in [
        (
            "AGGREGATOR_URL",
            "ftp://aggregator",
            "AGGREGATOR_URL: expected an https:// URL",
        ),
        ("LOG_BATCH_SIZE", "0", "LOG_BATCH_SIZE: must be at least 1"),
        (
            "MAX_LOG_SIZE",
            "10",
            "MAX_LOG_SIZE: must be at least 64 bytes",
        ),
        (
            "AGENT_REDACT_PATTERNS",
            "([unclosed",
            "AGENT_REDACT_PATTERNS",
        ),
        (
            "LOG_FORMAT",
            "xml",
            "LOG_FORMAT: expected auto, json or text",
        ),
        (
            "AGENT_PARSERS",
            r#"[{"name":"billing","regex":"(?P<level>["}]"#,
            "AGENT_PARSERS: parser \"billing\": regex:",
        ),
        (
            "AGENT_PARSERS",
            r#"[{"name":"gw","format":"xml"}]"#,
            "AGENT_PARSERS: parser \"gw\": format: unknown format \"xml\"",
        ),
        (
            "AGENT_METRICS_PORT",
            "ninety",
            "AGENT_METRICS_PORT: expected a number",
        ),
    ] {
        let output = std::process::Command::new(logging_tests::binary("logging-agent"))
            .env_clear()
            .env("AGGREGATOR_URL", "http://127.0.0.1:9")
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{variable}={value}: {stderr}");
    }
}

/// `logging-aggregator certs --out DIR`, as an operator runs it: it prints the files it
/// wrote, and they make a working mutual-TLS pair (an aggregator serving with them accepts
/// the agent certificate, which names the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certs_subcommand_writes_a_working_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = std::process::Command::new(logging_tests::binary("logging-aggregator"))
        .env_clear()
        .args(["certs", "--out"])
        .arg(&out)
        .args(["--agent-name", "node-7", "--server-name", "localhost"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(printed.len(), 5, "{printed:?}");
    for name in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        let path = out.join(name);
        assert!(printed.contains(&path.display().to_string()), "{name}");
        assert!(std::fs::metadata(&path).unwrap().len() > 100);
    }
    let cert = |n: &str| out.join(n).display().to_string();
    let aggregator = logging_tests::AggregatorProcess::start(
        &dir.path().join("data"),
        &[
            ("TLS_CERT", &cert("server.pem")),
            ("TLS_KEY", &cert("server-key.pem")),
            ("TLS_CLIENT_CA", &cert("ca.pem")),
        ],
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = logging_common::tls::client_config(
        &out.join("ca.pem"),
        &out.join("agent.pem"),
        &out.join("agent-key.pem"),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let entry = serde_json::json!({
        "timestamp": logging_common::Timestamp::now().to_rfc3339(),
        "level": "info", "service": "certs", "message": "over the generated pair",
    });
    let answer: Value = client
        .post(format!(
            "https://localhost:{}/v1/ingest",
            aggregator.ingest_port
        ))
        .body(entry.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    let mut agent = Value::Null;
    for _ in 0..100 {
        let page: Value = logging_tests::http_client()
            .get(format!("{}/api/logs?service=certs", aggregator.base))
            .bearer_auth(logging_tests::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        agent = page["items"][0]["context"]["agent"].clone();
        if !agent.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(agent, "node-7", "the certificate's name is the agent's");
}
