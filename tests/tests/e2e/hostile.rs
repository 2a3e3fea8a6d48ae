//! The real aggregator and agent against hostile clients and careless operators: every case
//! here once crashed a process, exhausted it, or leaked what it should not. Each test checks
//! that the process stays up, that its memory stays bounded, and that nothing acknowledged is
//! lost.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, http_client, proc};
use serde_json::{Value, json};

fn now() -> String {
    logging_common::Timestamp::now().to_rfc3339()
}

fn entry(service: &str, message: &str) -> Value {
    json!({"timestamp": now(), "level": "info", "service": service, "message": message})
}

async fn get(aggregator: &AggregatorProcess, path: &str) -> (u16, Value) {
    let response = http_client()
        .get(format!("{}{path}", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the aggregator answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(aggregator: &AggregatorProcess, path: &str, body: Vec<u8>) -> reqwest::Response {
    http_client()
        .post(format!("{}{path}", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the aggregator answers")
}

/// A client of the ingest listener with the development agent certificate.
fn ingest_client(aggregator: &AggregatorProcess) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = aggregator.certs_dir();
    let tls = logging_common::tls::client_config(
        &certs.join("ca.pem"),
        &certs.join("agent.pem"),
        &certs.join("agent-key.pem"),
    )
    .expect("agent TLS");
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .expect("client")
}

fn ingest_url(aggregator: &AggregatorProcess) -> String {
    format!("https://localhost:{}/v1/ingest", aggregator.ingest_port)
}

fn alive(aggregator: &mut AggregatorProcess) {
    assert!(
        aggregator.child.try_wait().expect("status").is_none(),
        "the aggregator died; log:\n{}",
        aggregator.log_text()
    );
}

fn peak_rss_mib(aggregator: &AggregatorProcess) -> u64 {
    proc::status_kib(aggregator.child.id(), "VmHWM:") / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_queries_are_refused_and_the_process_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = AggregatorProcess::start(dir.path(), &[]);
    let created = post(
        &aggregator,
        "/api/logs?refresh=wait_for",
        serde_json::to_vec(&entry("api", "payment declined")).unwrap(),
    )
    .await;
    assert_eq!(created.status(), 201);
    let nested = format!("{}a{}", "(".repeat(800), ")".repeat(800));
    let nots = format!("{}a", "NOT ".repeat(2000));
    for q in [
        nested.as_str(),
        nots.as_str(),
        "-".repeat(5000).as_str(),
        "id:*",
        "--",
    ] {
        let q: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
        for endpoint in ["/api/search", "/api/analytics"] {
            let (status, problem) = get(&aggregator, &format!("{endpoint}?q={q}")).await;
            assert_eq!(status, 400, "{endpoint}: {problem}");
            assert_eq!(problem["errors"][0]["field"], "q", "{problem}");
        }
    }
    alive(&mut aggregator);
    let (status, found) = get(&aggregator, "/api/search?q=declined").await;
    assert_eq!((status, found["total"].clone()), (200, json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_body_of_countless_entries_costs_neither_memory_nor_a_huge_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = AggregatorProcess::start(dir.path(), &[]);
    let before = peak_rss_mib(&aggregator);

    // A 3 MB array of a million empty objects: refused before its entries are read.
    let mut array = b"[".to_vec();
    array.extend(std::iter::repeat_n(&b"{},"[..], 999_999).flatten());
    array.extend_from_slice(b"{}]");
    let response = post(&aggregator, "/api/logs", array).await;
    assert_eq!(response.status(), 413);
    assert!(response.text().await.unwrap().contains("MAX_BATCH_ENTRIES"));

    // 1 KB of zstd that decompresses to four million lines: refused the same way.
    let lines = b"{}\n".repeat(4_000_000);
    let frame = zstd_compress(&lines);
    assert!(frame.len() < 2048, "{} bytes", frame.len());
    let response = ingest_client(&aggregator)
        .post(ingest_url(&aggregator))
        .header("content-encoding", "zstd")
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // Within the limit, every entry bad: a 400 listing the first hundred, counting all.
    let mut bad = b"[".to_vec();
    bad.extend(std::iter::repeat_n(&b"{},"[..], 9_999).flatten());
    bad.extend_from_slice(b"{}]");
    let response = post(&aggregator, "/api/logs", bad).await;
    assert_eq!(response.status(), 400);
    let body = response.bytes().await.unwrap();
    assert!(body.len() < 64 * 1024, "an answer of {} bytes", body.len());
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("10000 were rejected"),
        "{problem}"
    );
    // The same batch on /v1/ingest: the same rule.
    let lines = b"{}\n".repeat(10_000);
    let response = ingest_client(&aggregator)
        .post(ingest_url(&aggregator))
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // One good entry among the bad ones: stored, the rest counted.
    let mut mixed: Vec<Value> = (0..5_000).map(|_| json!({})).collect();
    mixed.push(entry("api", "the good one"));
    let response = post(
        &aggregator,
        "/api/logs",
        serde_json::to_vec(&mixed).unwrap(),
    )
    .await;
    assert_eq!(response.status(), 201);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["rejected_count"], 5_000);
    assert_eq!(answer["rejected"].as_array().unwrap().len(), 100);

    alive(&mut aggregator);
    let peak = peak_rss_mib(&aggregator);
    assert!(
        peak < before + 300,
        "peak RSS grew from {before} to {peak} MiB"
    );
}

fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = zstd_encoder();
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd_encoder() -> zstd::stream::write::Encoder<'static, Vec<u8>> {
    zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap()
}

/// Starts the aggregator with an open-files limit of `files` (soft and hard).
fn start_with_files_limit(dir: &Path, files: u64, env: &[(&str, &str)]) -> AggregatorProcess {
    AggregatorProcess::start_with(dir, env, move |command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: files,
                    rlim_max: files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_cannot_lock_out_health_or_the_agents() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = start_with_files_limit(dir.path(), 1024, &[("HTTP_HEADER_TIMEOUT", "2")]);
    // 1,100 connections that never finish a request: idle, headers trickled, kept alive.
    let mut held = Vec::new();
    for i in 0..1100 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", aggregator.port)) else {
            continue;
        };
        match i % 3 {
            0 => {}
            1 => {
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            }
            _ => {
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
            }
        }
        held.push(s);
    }
    // The agents' listener has its own limit: it still takes a batch.
    let response = ingest_client(&aggregator)
        .post(ingest_url(&aggregator))
        .body(serde_json::to_vec(&entry("ingest", "still open")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // The operator port refuses what is over its limit, and closes what idles: /health
    // answers again once the idle connections are gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alive(&mut aggregator);
        let health = http_client()
            .get(format!("{}/health", aggregator.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if matches!(&health, Ok(r) if r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health never came back: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every idle connection was closed by the server, not left open.
    let mut closed = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
            }
        }
    }
    assert_eq!(closed, held.len());
    alive(&mut aggregator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_names_the_agent_whatever_the_body_claims() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = AggregatorProcess::start(dir.path(), &[]);
    let mut spoofed = entry("spoof", "from the ingest port");
    spoofed["context"] = json!({"agent": "node-of-someone-else"});
    let response = ingest_client(&aggregator)
        .post(ingest_url(&aggregator))
        .body(serde_json::to_vec(&spoofed).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut api = entry("spoof", "from the API");
    api["context"] = json!({"agent": "node-9"});
    let response = post(
        &aggregator,
        "/api/logs?refresh=wait_for",
        serde_json::to_vec(&api).unwrap(),
    )
    .await;
    assert_eq!(response.status(), 201);
    let (_, page) = get(&aggregator, "/api/logs?service=spoof&order=asc").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    assert_eq!(items[0]["context"]["agent"], "logging-agent");
    assert_eq!(items[0]["context"]["claimed_agent"], "node-of-someone-else");
    assert!(items[1]["context"].get("agent").is_none(), "{}", items[1]);
    assert_eq!(items[1]["context"]["claimed_agent"], "node-9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_services_cannot_grow_metrics_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = AggregatorProcess::start(dir.path(), &[("METRICS_MAX_SERVICES", "50")]);
    for round in 0..5 {
        let batch: Vec<Value> = (0..2000)
            .map(|i| entry(&format!("svc-{round}-{i}"), "x"))
            .collect();
        let response = post(
            &aggregator,
            "/api/logs",
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        assert_eq!(response.status(), 201);
    }
    let text = http_client()
        .get(format!("{}/metrics", aggregator.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let services: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("logging_aggregator_ingested_entries_total{"))
        .filter_map(|l| l.split("service=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(services.len(), 51, "{services:?}");
    assert!(services.contains("other"));
    let counted: f64 = text
        .lines()
        .filter(|l| l.starts_with("logging_aggregator_ingested_entries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 10_000.0, "every entry is still counted");
}

async fn deletion_ip(aggregator: &AggregatorProcess, message: &str) -> String {
    let response = post(
        aggregator,
        "/api/logs?refresh=wait_for",
        serde_json::to_vec(&entry("audit", message)).unwrap(),
    )
    .await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deleted = http_client()
        .delete(format!("{}/api/logs/{id}", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let (_, trail) = get(
        aggregator,
        &format!("/api/audit?action=log.deleted&entity_id={id}"),
    )
    .await;
    trail["items"][0]["ip_address"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = AggregatorProcess::start(dir.path(), &[]);
    assert_eq!(deletion_ip(&aggregator, "one").await, "127.0.0.1");
    aggregator.set_env("TRUSTED_PROXIES", "127.0.0.0/8");
    aggregator.restart();
    assert_eq!(deletion_ip(&aggregator, "two").await, "6.6.6.6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_the_data_directory_are_the_aggregators_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let aggregator = AggregatorProcess::start(&data, &[]);
    let response = post(
        &aggregator,
        "/api/logs?refresh=wait_for",
        serde_json::to_vec(&entry("modes", "private")).unwrap(),
    )
    .await;
    assert_eq!(response.status(), 201);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let mut checked = 0;
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        for item in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = item.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "aggregator.log") {
                assert_eq!(
                    mode(&path) & 0o077,
                    0,
                    "{} is open to others",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(data.join("logging.db").exists());
    assert!(checked > 5, "{checked} files checked");
}

/// Mounts a tmpfs of `mib` MiB at `at`; `false` where this process may not mount.
fn mount_tmpfs(at: &Path, mib: u64) -> bool {
    std::fs::create_dir_all(at).unwrap();
    std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0700"),
            "tmpfs",
        ])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

fn remount(at: &Path, mib: u64) {
    let ok = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={mib}m")])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "remount {}", at.display());
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_retry_after_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("small");
    if !mount_tmpfs(&data, 24) {
        eprintln!("skipped: this process may not mount a tmpfs (run the tests as root)");
        return;
    }
    let _unmount = Unmount(data.clone());
    let mut aggregator = AggregatorProcess::start(
        &data,
        &[("WAL_SEGMENT_BYTES", "1048576"), ("WAL_MAX_BYTES", "0")],
    );
    let mut acknowledged: Vec<String> = Vec::new();
    let mut refused = 0;
    let padding = "p".repeat(2000);
    for round in 0..400 {
        let batch: Vec<Value> = (0..50)
            .map(|i| entry("disk", &format!("round {round} entry {i} {padding}")))
            .collect();
        let response = post(
            &aggregator,
            "/api/logs",
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        match response.status().as_u16() {
            201 => {
                let answer: Value = response.json().await.unwrap();
                acknowledged.extend(
                    answer["ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|id| id.as_str().unwrap().to_string()),
                );
            }
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                let problem: Value = response.json().await.unwrap();
                assert!(
                    problem["detail"].as_str().unwrap().contains("full"),
                    "{problem}"
                );
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            429 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!(
                "a write answered {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
    assert!(refused > 0, "the disk never filled");
    alive(&mut aggregator);
    // While full: an acknowledged entry is found, or the answer names the store; never 404.
    for id in acknowledged.iter().rev().take(3) {
        let (status, body) = get(&aggregator, &format!("/api/logs/{id}")).await;
        assert!(status == 200 || status == 503, "{status}: {body}");
    }
    // Room again: every acknowledged entry is there, and writes are taken.
    remount(&data, 256);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = post(
            &aggregator,
            "/api/logs",
            serde_json::to_vec(&entry("disk", "after")).unwrap(),
        )
        .await;
        if response.status() == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "writes never resumed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    aggregator.restart();
    // Every acknowledged entry is there: walk the listing (one lookup by id per entry would
    // take minutes), then look a few up by id.
    let mut stored = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored.len() < acknowledged.len() && Instant::now() < deadline {
        stored.clear();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/logs?service=disk&limit=1000&cursor={c}"),
                None => "/api/logs?service=disk&limit=1000".to_string(),
            };
            let (_, page) = get(&aggregator, &path).await;
            for item in page["items"].as_array().into_iter().flatten() {
                stored.insert(item["id"].as_str().unwrap_or_default().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        if stored.len() < acknowledged.len() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries were lost",
        lost.len()
    );
    for id in acknowledged.iter().step_by(1000) {
        let (status, _) = get(&aggregator, &format!("/api/logs/{id}")).await;
        assert_eq!(status, 200, "{id}");
    }
}

fn pod_dir(root: &Path, pod: &str) -> std::path::PathBuf {
    let dir = root.join(format!(
        "pods/shop_{pod}_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6/app"
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_ships_neither_files_linked_from_outside_nor_loses_long_lines() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = AggregatorProcess::start(&dir.path().join("aggregator"), &[]);
    let logs = dir.path().join("var/log");
    let secret = dir.path().join("etc/shadow");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, "root:$6$supersecrethash:19000:0:99999:7:::\n").unwrap();
    // A log replaced by a link to the secret, and a whole pod directory linked outside.
    std::os::unix::fs::symlink(&secret, pod_dir(&logs, "evil-1").join("0.log")).unwrap();
    let outside = dir.path().join("elsewhere/app");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("0.log"),
        "2026-11-27T03:00:00Z stdout F linked-dir-secret\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.parent().unwrap(),
        logs.join("pods/shop_evil-2_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f7"),
    )
    .unwrap();
    // A real pod writing lines of 1.05 MB, 1.5 MB and 5 MB between short ones.
    let mut text = String::new();
    let ts = logging_common::Timestamp::now().to_rfc3339();
    for (i, size) in [1_050_000usize, 1_500_000, 5_000_000].iter().enumerate() {
        text.push_str(&format!("{ts} stdout F before-{i}\n"));
        text.push_str(&format!("{ts} stdout F long-{i} {}\n", "z".repeat(*size)));
    }
    text.push_str(&format!("{ts} stdout F the-last-line\n"));
    std::fs::write(pod_dir(&logs, "web-1").join("0.log"), text).unwrap();

    let agent = AgentProcess::start(
        &aggregator,
        &dir.path().join("agent"),
        &[("AGENT_PATHS", &format!("{}/pods/*/*/*.log", logs.display()))],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let items = loop {
        let (_, page) = get(&aggregator, "/api/logs?service=web&limit=100&order=asc").await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= 7 {
            break items;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 7 entries arrived; agent log:\n{}",
            items.len(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Batches go out concurrently, so arrival order is not file order: find each by text.
    let find = |prefix: &str| {
        items
            .iter()
            .find(|e| e["message"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "{prefix} did not arrive: {:?}",
                    items
                        .iter()
                        .map(|e| (
                            e["message"]
                                .as_str()
                                .unwrap()
                                .chars()
                                .take(30)
                                .collect::<String>(),
                            e["context"].clone()
                        ))
                        .collect::<Vec<_>>()
                )
            })
            .clone()
    };
    assert_eq!(items.len(), 7);
    for i in 0..3 {
        assert_eq!(
            find(&format!("before-{i}"))["context"].get("truncated"),
            None
        );
        let long = find(&format!("long-{i} zzz"));
        assert_eq!(long["context"]["truncated"], true, "long-{i}");
        let size = serde_json::to_vec(&long).unwrap().len();
        assert!(size <= 1_048_576 + 4096, "long-{i} is {size} bytes");
        assert!(size > 1_000_000, "long-{i} keeps what fits: {size} bytes");
    }
    find("the-last-line");
    // Nothing from outside the roots, and the refusals are counted.
    for needle in ["supersecrethash", "linked-dir-secret"] {
        let (_, found) = get(&aggregator, &format!("/api/search?q={needle}")).await;
        assert_eq!(found["total"], 0, "{needle} was shipped");
    }
    assert!(agent.metric("logging_agent_paths_refused_total").await >= 2.0);
}
