//! Loads realistic log entries into a real `logging-aggregator` process through its HTTP API
//! (durability on: every batch is fsync'd before it is acknowledged), then measures queries.
//!
//! ```text
//! cargo build --release -p logging-aggregator
//! cargo bench -p logging-tests --bench aggregator_load            # 5,000,000 entries
//! BENCH_ENTRIES=500000 cargo bench -p logging-tests --bench aggregator_load
//! BENCH_AGGREGATOR_ENV=LOG_PROCESSING_WORKERS=1 cargo bench …   # settings for the aggregator
//! BENCH_SINKS=loki,elasticsearch,nats cargo bench …               # with sinks on
//! ```
//!
//! Prints: ingest rate (acknowledged, and until everything is searchable), the aggregator's
//! CPU time and peak RSS, stored bytes against the raw NDJSON, and p50/p99 latencies of a
//! filtered listing, a rare-term search and a 24-hour analytics query.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[path = "common/discard.rs"]
mod discard;

use logging_tests::load::{self, BATCH, Rng, SERVICES, generate, in_flight};
use logging_tests::{ADMIN_TOKEN, AggregatorProcess, proc};
use serde_json::Value;

/// (busy, total) CPU ticks of the whole machine, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

async fn get(client: &reqwest::Client, url: &str) -> (Duration, Value) {
    let started = Instant::now();
    let response = client
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("query");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let body: Value = response.json().await.expect("JSON");
    (started.elapsed(), body)
}

fn rfc3339(ms: u64) -> String {
    logging_common::Timestamp::from_nanos(ms as i64 * 1_000_000).to_rfc3339()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // reqwest is built without a crypto provider of its own (see `http_client`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let total: usize = std::env::var("BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "aggregator_load: {total} entries, batches of {BATCH}, {} requests in flight, {cores} cores",
        in_flight()
    );
    let generated_at = Instant::now();
    let data = generate(total, 24 * 3600 * 1000 - 60_000);
    println!(
        "generated {} bodies, {:.1} MB of NDJSON entries ({:.0} bytes an entry) in {:.1} s",
        data.bodies.len(),
        data.raw_ndjson_bytes as f64 / 1e6,
        data.raw_ndjson_bytes as f64 / total as f64,
        generated_at.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir_in(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .expect("bench dir");
    // Extra settings for the aggregator under test: BENCH_AGGREGATOR_ENV="NAME=value,NAME=value".
    let extra = std::env::var("BENCH_AGGREGATOR_ENV").unwrap_or_default();
    let mut env: Vec<(&str, &str)> = vec![("LOG_LEVEL", "warn")];
    env.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
    // BENCH_SINKS: sinks on — Loki and Elasticsearch pushing to a local receiver that reads,
    // discards and answers as they do; `nats` publishing log.ingested to the local NATS.
    let sinks = std::env::var("BENCH_SINKS").unwrap_or_default();
    let receiver = (sinks.contains("loki") || sinks.contains("elasticsearch")).then(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        discard::serve(tokio::net::TcpListener::from_std(listener).unwrap());
        url
    });
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    for name in sinks.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match (name, &receiver) {
            ("loki", Some(url)) => env.push(("LOKI_URL", url.as_str())),
            ("elasticsearch", Some(url)) => env.push(("ELASTICSEARCH_URL", url.as_str())),
            ("nats", _) => {
                env.push(("BROKER_URL", "nats://127.0.0.1:4222"));
                env.push(("BROKER_TOPIC", topic.as_str()));
            }
            _ => panic!("BENCH_SINKS: unknown sink {name:?} (loki, elasticsearch, nats)"),
        }
    }
    let aggregator = AggregatorProcess::start(dir.path(), &env);
    let pid = aggregator.child.id();
    let base = aggregator.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight())
        .build()
        .unwrap();

    let cpu_before = proc::cpu_seconds(pid);
    let own_cpu_before = proc::cpu_seconds(std::process::id());
    let machine_before = machine_ticks();
    let started = Instant::now();
    let (senders, retries) = load::send_all(&client, &base, Arc::new(data.bodies));
    let mut peak_rss_kb = 0;
    let mut peak_anon_kb = 0;
    while senders.iter().any(|s| !s.is_finished()) {
        peak_rss_kb = peak_rss_kb.max(proc::status_kib(pid, "VmRSS:"));
        peak_anon_kb = peak_anon_kb.max(proc::status_kib(pid, "RssAnon:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in senders {
        s.await.unwrap();
    }
    let acknowledged_in = started.elapsed();
    // Sustained: until the store has indexed and committed everything.
    loop {
        let (_, stats) = get(&client, &format!("{base}/api/logs/stats")).await;
        let index_lag = stats["wal"]["consumers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "index"))
            .and_then(|c| c["lag_entries"].as_u64());
        if index_lag == Some(0) && stats["entries"].as_u64() == Some(total as u64) {
            break;
        }
        peak_rss_kb = peak_rss_kb.max(proc::status_kib(pid, "VmRSS:"));
        peak_anon_kb = peak_anon_kb.max(proc::status_kib(pid, "RssAnon:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let searchable_in = started.elapsed();
    if !sinks.is_empty() {
        loop {
            let (_, stats) = get(&client, &format!("{base}/api/logs/stats")).await;
            let all = stats["sinks"].as_array().cloned().unwrap_or_default();
            let done = all.iter().all(|sink| {
                sink["lag_entries"].as_u64() == Some(0)
                    && sink["delivered"].as_u64() == Some(total as u64)
            });
            if done && !all.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "sinks on ({sinks}): every entry delivered to each {:.1} s after the first was sent ({:.0} entries/s)",
            started.elapsed().as_secs_f64(),
            total as f64 / started.elapsed().as_secs_f64()
        );
        if sinks.contains("nats") {
            // The events stream holds every entry: the shared NATS keeps nothing of the run.
            let stream = topic.to_ascii_uppercase().replace('-', "_");
            let nats = async_nats::connect("127.0.0.1:4222").await.unwrap();
            let _ = async_nats::jetstream::new(nats)
                .delete_stream(&stream)
                .await;
        }
    }
    // What the time went on, from the aggregator's own metrics.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let refresh_count = metric("logging_aggregator_index_refresh_seconds_count");
    let refresh_sum = metric("logging_aggregator_index_refresh_seconds_sum");
    let commits = metric("logging_aggregator_wal_group_commit_seconds_count");
    let commit_sum = metric("logging_aggregator_wal_group_commit_seconds_sum");
    println!(
        "index refreshes: {refresh_count:.0}, {:.0} ms each on average ({:.1} s in all); WAL group commits: {commits:.0}, {:.1} ms each, {:.0} entries each",
        1000.0 * refresh_sum / refresh_count.max(1.0),
        refresh_sum,
        1000.0 * commit_sum / commits.max(1.0),
        total as f64 / commits.max(1.0)
    );
    let phase = |p: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("logging_aggregator_indexer_phase_seconds_sum")
                    && l.contains(&format!("phase=\"{p}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!(
        "indexer thread: {:.1} s waiting for the WAL, {:.1} s adding documents, {:.1} s in refreshes",
        phase("wait"),
        phase("apply"),
        phase("refresh")
    );
    let cpu_used = proc::cpu_seconds(pid) - cpu_before;
    let own_cpu = proc::cpu_seconds(std::process::id()) - own_cpu_before;
    let (busy, all) = machine_ticks();
    let machine_busy = (busy - machine_before.0) as f64 / (all - machine_before.1).max(1) as f64;
    peak_rss_kb = peak_rss_kb.max(proc::status_kib(pid, "VmHWM:"));
    // Stored bytes once background merges have settled (they leave old files behind until
    // they finish): the smallest size seen over a quiet period.
    let mut index_bytes = u64::MAX;
    let mut quiet = 0;
    while quiet < 10 {
        let (_, stats) = get(&client, &format!("{base}/api/logs/stats")).await;
        let bytes = stats["stored_bytes"].as_u64().unwrap_or(0);
        if bytes < index_bytes {
            index_bytes = bytes;
            quiet = 0;
        } else {
            quiet += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wal_bytes = dir_bytes(&dir.path().join("wal"));
    let db_bytes =
        dir_bytes(dir.path()).saturating_sub(dir_bytes(&dir.path().join("index")) + wal_bytes);

    println!(
        "ingest (acknowledged, fsync'd): {:>10.0} entries/s  ({:.1} s, {} retries after 429)",
        total as f64 / acknowledged_in.as_secs_f64(),
        acknowledged_in.as_secs_f64(),
        retries.load(Ordering::Relaxed)
    );
    println!(
        "ingest (all searchable):        {:>10.0} entries/s  ({:.1} s)",
        total as f64 / searchable_in.as_secs_f64(),
        searchable_in.as_secs_f64()
    );
    println!(
        "aggregator CPU:                 {:>10.1} s  ({:.2} CPU-s per million entries)",
        cpu_used,
        cpu_used / (total as f64 / 1e6)
    );
    println!(
        "aggregator peak RSS:            {:>10.0} MiB, of which {:.0} MiB private memory (RssAnon) and the rest mapped index files the kernel can drop",
        peak_rss_kb as f64 / 1024.0,
        peak_anon_kb as f64 / 1024.0
    );
    println!(
        "load generator CPU:             {:>10.1} s; the machine was {:.0}% busy during the load",
        own_cpu,
        machine_busy * 100.0
    );
    println!(
        "stored (index):                 {:>10.1} MB = {:.1}% of {:.1} MB raw NDJSON",
        index_bytes as f64 / 1e6,
        100.0 * index_bytes as f64 / data.raw_ndjson_bytes as f64,
        data.raw_ndjson_bytes as f64 / 1e6
    );
    println!(
        "  + WAL after catch-up:         {:>10.1} MB, relational store {:.1} MB",
        wal_bytes as f64 / 1e6,
        db_bytes as f64 / 1e6
    );

    // Query latencies, one query at a time.
    let mut rng = Rng(42);
    let start_ms = data.end_ms - data.span_ms;
    let mut samples = Vec::new();
    let mut hits = 0;
    for _ in 0..200 {
        let service = SERVICES[rng.below(SERVICES.len() as u64) as usize];
        let level = ["info", "warning", "error"][rng.below(3) as usize];
        let from = start_ms + rng.below(data.span_ms - 3_600_000);
        let url = format!(
            "{base}/api/logs?service={service}&level={level}&start={}&end={}",
            rfc3339(from),
            rfc3339(from + 3_600_000)
        );
        let (took, body) = get(&client, &url).await;
        hits += body["items"].as_array().map_or(0, |a| a.len());
        samples.push(took);
    }
    let (p50, p99) = percentiles(samples);
    println!();
    println!(
        "GET /api/logs service+level+1h:  p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   ({:.0} entries a page on average)",
        hits as f64 / 200.0
    );

    let rare_terms = (total / 500_000).max(1);
    let mut samples = Vec::new();
    for i in 0..100 {
        let (took, body) = get(
            &client,
            &format!("{base}/api/search?q=xylophone{}", i % rare_terms),
        )
        .await;
        assert_eq!(
            body["total"].as_u64(),
            Some(if total > 250_000 { 1 } else { 0 }),
            "rare term found exactly once"
        );
        samples.push(took);
    }
    let (p50, p99) = percentiles(samples);
    println!("GET /api/search rare term:       p50 {p50:>7.1} ms   p99 {p99:>7.1} ms");

    let mut samples = Vec::new();
    for _ in 0..20 {
        let (took, body) = get(
            &client,
            &format!(
                "{base}/api/analytics?start={}&end={}",
                rfc3339(data.end_ms - 24 * 3_600_000),
                rfc3339(data.end_ms + 1)
            ),
        )
        .await;
        assert_eq!(body["total"].as_u64(), Some(total as u64));
        samples.push(took);
    }
    let (p50, p99) = percentiles(samples);
    println!("GET /api/analytics 24 h:         p50 {p50:>7.1} ms   p99 {p99:>7.1} ms");
    let mut samples = Vec::new();
    for _ in 0..20 {
        let (took, _) = get(
            &client,
            &format!("{base}/api/search?q=payment%20AND%20declined&min_level=error"),
        )
        .await;
        samples.push(took);
    }
    let (p50, p99) = percentiles(samples);
    println!("GET /api/search common terms:    p50 {p50:>7.1} ms   p99 {p99:>7.1} ms");
    println!(
        "aggregator peak RSS (whole run): {:>9.0} MiB",
        proc::status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    if std::env::var_os("BENCH_KEEP").is_some() {
        drop(aggregator);
        println!("data kept in {}", dir.keep().display());
    }
}
