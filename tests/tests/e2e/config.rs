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
}
