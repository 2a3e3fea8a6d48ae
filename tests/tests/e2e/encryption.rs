//! Encryption at rest: what the aggregator leaves on disk holds no plaintext, a rotated key
//! keeps old data readable, and a missing or wrong key stops the start naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use logging_tests::{ADMIN_TOKEN, AggregatorProcess, http_client};
use serde_json::{Value, json};

/// Words that appear only in what the test writes: in a message, a context value, an audit
/// event's values, and the dead letter of a refused entry.
const MARKERS: [&str; 3] = ["zebracardholder", "okapi-4711-ledger", "quokkaauditnote"];

fn key_file(dir: &Path, name: &str, keys: &[[u8; 32]]) -> PathBuf {
    let text: Vec<String> = keys
        .iter()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

/// A Loki that refuses every push for good (400): each entry goes to the dead-letter file.
async fn refusing_loki() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 1 << 20];
                // One request per connection: read until the body has come, then refuse.
                let mut got = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if got.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                let body = "entry out of order";
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    format!("http://{address}")
}

/// Every file under `dir` but the test's own log of the process's output.
fn stored_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n != "aggregator.log") {
                out.push(path);
            }
        }
    }
    out
}

async fn search(aggregator: &AggregatorProcess, q: &str) -> Value {
    aggregator
        .get_json(&format!("/api/search?q={q}&limit=1"))
        .await
}

/// Starts the binary on `data` expecting it to refuse; returns what it printed.
fn refused_start(data: &Path, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(logging_tests::binary("logging-aggregator"));
    command
        .env_clear()
        .env("DATA_DIR", data)
        .env("SERVICE_PORT", logging_tests::free_port().to_string())
        .env("INGEST_PORT", logging_tests::free_port().to_string())
        .env("PROMETHEUS_PORT", "0")
        .env("OTLP_GRPC_PORT", "0")
        .env("FORWARD_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("API_TOKENS", format!("admin:{ADMIN_TOKEN}"));
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    assert!(!output.status.success(), "it started");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_at_rest_holds_no_plaintext_and_a_rotated_key_still_reads_it() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let (old, new) = ([7u8; 32], [42u8; 32]);
    let old_keys = key_file(root.path(), "old.keys", &[old]);
    let loki = refusing_loki().await;
    let old_keys_text = old_keys.display().to_string();
    let mut aggregator = AggregatorProcess::start(
        &data,
        &[
            ("LOG_ENCRYPTION_ENABLED", "true"),
            ("LOG_ENCRYPTION_KEY_FILE", &old_keys_text),
            ("LOKI_URL", &loki),
            ("LOKI_FORMAT", "json"),
        ],
    );

    let now = logging_common::Timestamp::now();
    let entries: Vec<Value> = (0..200)
        .map(|i| {
            json!({"timestamp": now.to_rfc3339(), "level": "error", "service": "billing",
                "message": format!("charge {i} refused for {}", MARKERS[0]),
                "context": {"ledger": MARKERS[1], "attempt": i}})
        })
        .collect();
    let response = http_client()
        .post(format!("{}/api/logs", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&entries)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let response = http_client()
        .post(format!("{}/api/audit", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"actor": {"id": "ops"}, "action": "ledger.corrected",
            "entity_type": "ledger", "entity_id": "7",
            "old_values": {"note": MARKERS[2]}, "new_values": {"note": "fixed"},
            "metadata": {"why": MARKERS[2]}}),
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    // Searchable, and every entry refused by the sink is in its dead-letter file.
    let dead_letter = data.join("sinks/loki/dead-letter.ndjson");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = search(&aggregator, MARKERS[0]).await;
        let letters = aggregator
            .metric("logging_aggregator_sink_dead_letters_total")
            .await;
        if found["total"] == 200 && letters >= 200.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "found {found}, {letters} dead letters; log:\n{}",
            aggregator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A graceful stop writes what the store holds in memory as parts.
    aggregator.stop_gracefully();
    let files = stored_files(&data);
    let parts: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "part"))
        .collect();
    assert!(!parts.is_empty(), "no part written: {files:?}");
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        for marker in MARKERS {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{} holds {marker} in plaintext",
                path.display()
            );
        }
    }
    for part in parts {
        assert!(std::fs::read(part).unwrap().starts_with(b"LSSEAL1\0"));
    }

    // The operator reads the dead letters with the key.
    let output = Command::new(logging_tests::binary("logging-aggregator"))
        .args(["decrypt", &dead_letter.display().to_string()])
        .env_clear()
        .env("LOG_ENCRYPTION_ENABLED", "true")
        .env("LOG_ENCRYPTION_KEY_FILE", &old_keys)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let letters: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 200);
    assert!(
        letters[0]["entry"]["message"]
            .as_str()
            .unwrap()
            .contains(MARKERS[0])
    );
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("entry out of order")
    );

    // Rotation: the new key first, the old one kept for reading.
    let rotated = key_file(root.path(), "rotated.keys", &[new, old]);
    aggregator.set_env("LOG_ENCRYPTION_KEY_FILE", &rotated.display().to_string());
    aggregator.set_env("LOKI_URL", "");
    aggregator.restart();
    let found = search(&aggregator, MARKERS[1]).await;
    assert_eq!(found["total"], 200, "{found}");
    let audit = aggregator
        .get_json("/api/audit?action=ledger.corrected")
        .await;
    let entry = &audit["items"][0];
    assert_eq!(entry["old_values"]["note"], MARKERS[2], "{audit}");
    assert_eq!(entry["metadata"]["why"], MARKERS[2]);
    let verify = aggregator.get_json("/api/audit/verify").await;
    assert_eq!(verify["valid"], true, "{verify}");
    aggregator.stop_gracefully();

    // Without the old key the old parts cannot be read: the start stops naming one.
    let new_only = key_file(root.path(), "new.keys", &[new]);
    let new_only = new_only.display().to_string();
    let printed = refused_start(
        &data,
        &[
            ("LOG_ENCRYPTION_ENABLED", "true"),
            ("LOG_ENCRYPTION_KEY_FILE", &new_only),
        ],
    );
    assert!(
        printed.contains(".part") && printed.contains("not among the keys given"),
        "{printed}"
    );
    // Encryption turned off with sealed data: refused too, naming the file.
    let printed = refused_start(&data, &[]);
    assert!(
        printed.contains(".part") && printed.contains("no encryption key is set"),
        "{printed}"
    );
    // A key that is not 32 bytes is refused before anything is opened.
    let printed = refused_start(
        &data,
        &[
            ("LOG_ENCRYPTION_ENABLED", "true"),
            ("LOG_ENCRYPTION_KEY", "c2hvcnQ="),
        ],
    );
    assert!(
        printed.contains("LOG_ENCRYPTION_KEY: key 1 is 5 bytes"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_spool_and_checkpoints_hold_no_plaintext_and_need_the_key() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let keys = key_file(root.path(), "agent.keys", &[[9u8; 32]]);
    let mut aggregator = AggregatorProcess::start(
        &root.path().join("aggregator"),
        &[("INDEX_REFRESH_INTERVAL_MS", "100")],
    );
    let socket = root.path().join("agent.sock");
    let agent_dir = root.path().join("agent");
    let paths = format!("{}/nothing/*.log", root.path().display());
    let (socket_text, keys_text) = (socket.display().to_string(), keys.display().to_string());
    let agent = logging_tests::AgentProcess::start(
        &aggregator,
        &agent_dir,
        &[
            ("AGENT_PATHS", &paths),
            ("AGENT_SOCKET", &socket_text),
            ("AGENT_ENCRYPTION_KEY_FILE", &keys_text),
        ],
    );
    // With the aggregator away, what the socket receives waits in the spool, sealed.
    aggregator.kill();
    let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    for n in 0..20 {
        writeln!(
            unix,
            "{}",
            json!({"level": "warn", "service": "vault", "message": format!("{} {n}", MARKERS[0])})
        )
        .unwrap();
    }
    drop(unix);
    let spool = agent_dir.join("spool");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_files(&spool)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum::<u64>()
        < 20 * 100
    {
        assert!(Instant::now() < deadline, "nothing spooled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_files = || {
        stored_files(&agent_dir)
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n != "agent.log"))
            .collect::<Vec<_>>()
    };
    for path in agent_files() {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes
                .windows(MARKERS[0].len())
                .any(|w| w == MARKERS[0].as_bytes()),
            "{} holds a message in plaintext",
            path.display()
        );
    }
    // Back, the aggregator receives every message once, readable.
    aggregator.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = search(&aggregator, MARKERS[0]).await;
        if found["total"] == 20 {
            assert_eq!(found["items"][0]["service"], "vault", "{found}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "found {found}; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checkpoints = agent_dir.join("checkpoints.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !checkpoints.exists() {
        assert!(Instant::now() < deadline, "no checkpoints written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read(&checkpoints)
            .unwrap()
            .starts_with(b"LSSEAL1\0")
    );
    drop(agent);

    // Without the key, the agent refuses to start rather than send everything again.
    let output = Command::new(logging_tests::binary("logging-agent"))
        .env_clear()
        .env("AGENT_DATA_DIR", &agent_dir)
        .env(
            "AGGREGATOR_URL",
            format!("http://127.0.0.1:{}", aggregator.ingest_port),
        )
        .env("AGENT_PATHS", &paths)
        .env("AGENT_METRICS_PORT", "0")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{printed}");
    assert!(
        printed.contains("checkpoints.json") && printed.contains("no encryption key is set"),
        "{printed}"
    );
}
