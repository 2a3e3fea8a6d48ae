//! No acknowledged entry is lost when the aggregator is killed with SIGKILL, and nothing is
//! stored twice when clients resend what they were not sure about.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use logging_tests::{ADMIN_TOKEN, AggregatorProcess};
use serde_json::{Value, json};

fn batch(tag: &str, n: usize, size: usize) -> Vec<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    (0..n)
        .map(|i| {
            let level = ["info", "warning", "error"][i % 3];
            json!({
                "id": uuid::Uuid::now_v7().to_string(),
                "timestamp": now,
                "level": level,
                "service": format!("svc-{}", i % 4),
                "message": format!("{tag} entry {i} {}", "x".repeat(size)),
                "context": {"i": i, "tag": tag},
            })
        })
        .collect()
}

async fn post(client: &reqwest::Client, base: &str, body: &[Value]) -> reqwest::Result<Value> {
    client
        .post(format!("{base}/api/logs"))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
}

/// Pages through every entry and returns the ids, asserting none appears twice.
async fn all_ids(client: &reqwest::Client, base: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/logs?limit=1000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client
            .get(url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for item in page["items"].as_array().unwrap() {
            let id = item["id"].as_str().unwrap().to_string();
            assert!(ids.insert(id.clone()), "{id} stored twice");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
}

/// Waits until the store has caught up with the WAL after a restart.
async fn wait_caught_up(client: &reqwest::Client, base: &str) {
    for _ in 0..600 {
        let stats: Value = client
            .get(format!("{base}/api/logs/stats"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let lag = stats["wal"]["consumers"][0]["lag_entries"]
            .as_u64()
            .unwrap_or(1);
        if lag == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the index did not catch up with the WAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_acknowledged_writes_loses_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    // A long refresh interval: at the kill, acknowledged entries are in the WAL only.
    let mut aggregator =
        AggregatorProcess::start(dir.path(), &[("INDEX_REFRESH_INTERVAL_MS", "60000")]);
    let client = logging_tests::http_client();
    let mut acknowledged = HashSet::new();
    let mut sent = Vec::new();
    for round in 0..20 {
        let body = batch(&format!("round-{round}"), 50, 100);
        let answer = post(&client, &aggregator.base, &body).await.unwrap();
        assert_eq!(answer["accepted"], 50);
        for id in answer["ids"].as_array().unwrap() {
            acknowledged.insert(id.as_str().unwrap().to_string());
        }
        sent.push(body);
    }
    aggregator.kill();
    aggregator.set_env("INDEX_REFRESH_INTERVAL_MS", "100");
    aggregator.restart();
    wait_caught_up(&client, &aggregator.base).await;
    let stored = all_ids(&client, &aggregator.base).await;
    let lost = acknowledged.difference(&stored).count();
    let extra = stored.difference(&acknowledged).count();
    assert_eq!(
        (lost, extra),
        (0, 0),
        "every acknowledged entry, and nothing else"
    );

    // Clients that did not hear the answer resend: nothing is stored twice.
    for body in &sent {
        let answer = post(&client, &aggregator.base, body).await.unwrap();
        assert_eq!(answer["duplicates"], 50);
    }
    aggregator.kill();
    aggregator.restart();
    wait_caught_up(&client, &aggregator.base).await;
    assert_eq!(
        all_ids(&client, &aggregator.base).await.len(),
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_concurrent_load_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator =
        AggregatorProcess::start(dir.path(), &[("INDEX_REFRESH_INTERVAL_MS", "200")]);
    let client = logging_tests::http_client();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, base, stop) = (client.clone(), aggregator.base.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut round = 0;
            while !stop.load(Ordering::Acquire) {
                let body = batch(&format!("writer-{w}-{round}"), 100, 150);
                match post(&client, &base, &body).await {
                    Ok(answer) => acknowledged.extend(
                        answer["ids"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string()),
                    ),
                    // The process died mid-request: this batch was never acknowledged.
                    Err(_) => break,
                }
                round += 1;
            }
            acknowledged
        }));
    }
    // Let the writers run, refreshes and segment writes interleaving, then kill mid-stream.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    aggregator.kill();
    stop.store(true, Ordering::Release);
    let mut acknowledged = HashSet::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(
        acknowledged.len() >= 400,
        "the writers got going ({} acknowledged)",
        acknowledged.len()
    );
    aggregator.restart();
    wait_caught_up(&client, &aggregator.base).await;
    let stored = all_ids(&client, &aggregator.base).await;
    let lost: Vec<&String> = acknowledged.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_commits_the_index_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator =
        AggregatorProcess::start(dir.path(), &[("INDEX_REFRESH_INTERVAL_MS", "60000")]);
    let client = logging_tests::http_client();
    let answer = post(&client, &aggregator.base, &batch("before-term", 30, 10))
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 30);
    let pid = aggregator.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let exit = aggregator.child.wait().unwrap();
        (exit, aggregator)
    })
    .await
    .unwrap();
    let (exit, aggregator) = exit;
    assert!(exit.success(), "exit status {exit}");
    let log = aggregator.log_text();
    assert!(
        log.contains("indexer stopped with everything flushed"),
        "{log}"
    );
    // The index holds everything: nothing is left for the WAL to replay.
    let cursor = std::fs::read_to_string(dir.path().join("wal/cursors/index")).unwrap();
    let wal_end: u64 = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        .map(|e| {
            let start: u64 = e
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".wal")
                .parse()
                .unwrap();
            start + e.metadata().unwrap().len()
        })
        .max()
        .unwrap();
    assert!(
        cursor.contains(&format!("\"lsn\":{wal_end}")),
        "cursor {cursor} vs end {wal_end}"
    );
}

/// A Loki receiver for the sink (JSON push): every entry id it was sent, in order of
/// arrival; `up = false` answers 503 as a Loki that is restarting does.
#[derive(Clone, Default)]
struct LokiReceiver {
    received: Arc<std::sync::Mutex<Vec<String>>>,
    up: Arc<AtomicBool>,
}

async fn loki_push(
    axum::extract::State(loki): axum::extract::State<LokiReceiver>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    if !loki.up.load(Ordering::Acquire) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let push: Value = serde_json::from_slice(&body).unwrap();
    let mut received = loki.received.lock().unwrap();
    for stream in push["streams"].as_array().unwrap() {
        for value in stream["values"].as_array().unwrap() {
            received.push(value[2]["id"].as_str().unwrap().to_string());
        }
    }
    axum::http::StatusCode::NO_CONTENT
}

/// Posts five batches of 200 entries tagged `tag`; returns the acknowledged ids.
async fn post_batches(client: &reqwest::Client, base: &str, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..5 {
        let ack = post(client, base, &batch(&format!("{tag}-{i}"), 200, 100))
            .await
            .unwrap();
        ids.extend(
            ack["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loki_sink_resumes_after_sigkill_with_nothing_lost_or_sent_twice() {
    let loki = LokiReceiver::default();
    loki.up.store(true, Ordering::Release);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/loki/api/v1/push", axum::routing::post(loki_push))
        .with_state(loki.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = AggregatorProcess::start(
        dir.path(),
        &[("LOKI_URL", url.as_str()), ("LOKI_FORMAT", "json")],
    );
    let client = logging_tests::http_client();
    let mut sent = HashSet::new();
    let received = |n: usize| {
        let loki = loki.clone();
        async move {
            for _ in 0..600 {
                if loki.received.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!(
                "Loki received {} of {n}",
                loki.received.lock().unwrap().len()
            );
        }
    };
    sent.extend(post_batches(&client, &aggregator.base, "up").await);
    received(1000).await;
    // Loki goes away; entries are acknowledged meanwhile and wait in the WAL.
    loki.up.store(false, Ordering::Release);
    sent.extend(post_batches(&client, &aggregator.base, "down").await);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(loki.received.lock().unwrap().len(), 1000);
    // SIGKILL with 1,000 entries undelivered, then Loki returns.
    aggregator.kill();
    loki.up.store(true, Ordering::Release);
    aggregator.restart();
    received(2000).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let got = loki.received.lock().unwrap().clone();
    assert_eq!(got.len(), 2000, "nothing sent twice");
    assert_eq!(
        got.into_iter().collect::<HashSet<_>>(),
        sent,
        "nothing lost"
    );
}
