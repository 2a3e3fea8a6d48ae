//! Loads realistic log entries into a real `logging-aggregator` process through its HTTP API
//! (durability on: every batch is fsync'd before it is acknowledged), then measures queries.
//!
//! ```text
//! cargo build --release -p logging-aggregator
//! cargo bench -p logging-tests --bench aggregator_load            # 5,000,000 entries
//! BENCH_ENTRIES=500000 cargo bench -p logging-tests --bench aggregator_load
//! BENCH_AGGREGATOR_ENV=LOG_PROCESSING_WORKERS=1 cargo bench …   # settings for the aggregator
//! ```
//!
//! Prints: ingest rate (acknowledged, and until everything is searchable), the aggregator's
//! CPU time and peak RSS, stored bytes against the raw NDJSON, and p50/p99 latencies of a
//! filtered listing, a rare-term search and a 24-hour analytics query.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use logging_tests::{ADMIN_TOKEN, AggregatorProcess, proc};
use serde_json::Value;

const SERVICES: [&str; 20] = [
    "api-gateway",
    "auth",
    "billing",
    "cart",
    "catalog",
    "checkout",
    "email",
    "inventory",
    "notifications",
    "orders",
    "payments",
    "pricing",
    "recommendations",
    "search",
    "sessions",
    "shipping",
    "tax",
    "users",
    "warehouse",
    "web",
];
const BATCH: usize = 1000;
fn in_flight() -> usize {
    std::env::var("BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// A small deterministic generator (xorshift), so every run loads the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next()));
        }
        s.truncate(len);
        s
    }
}

/// One entry as a client would send it: ~200 bytes of message, a JSON context, some ids.
fn entry(rng: &mut Rng, n: usize, ts_ms: u64, out: &mut String) {
    let service = SERVICES[rng.below(SERVICES.len() as u64) as usize];
    let level = match rng.below(100) {
        0..=9 => "debug",
        10..=79 => "info",
        80..=91 => "warning",
        92..=98 => "error",
        _ => "critical",
    };
    let duration = (rng.below(2000) as f64) / 10.0 + (rng.below(100) as f64);
    let status = [200, 200, 200, 201, 204, 301, 400, 404, 500, 503][rng.below(10) as usize];
    // Twelve templates with variable parts, as real services log: ~200 bytes each.
    let mut message = match rng.below(12) {
        0 => format!(
            "GET /api/v1/{service}/items/{} returned {status} in {duration:.1} ms (upstream={service}-svc, cache=miss, bytes={}, client=10.{}.{}.{})",
            rng.below(100_000),
            rng.below(50_000),
            rng.below(256),
            rng.below(256),
            rng.below(256)
        ),
        1 => format!(
            "user {} logged in from 10.{}.{}.{} using Mozilla/5.0 (X11; Linux x86_64) session {} mfa=true region=eu-west-1",
            rng.below(1_000_000),
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.hex(16)
        ),
        2 => format!(
            "payment {} failed: card declined by issuer (code {}); the order stays pending and the customer will be notified by email after {} s",
            rng.hex(12),
            rng.below(60),
            rng.below(30)
        ),
        3 => format!(
            "cache miss for key session:{} after {} ms; falling back to the primary database, which answered in {duration:.1} ms with {} rows",
            rng.hex(16),
            rng.below(50),
            rng.below(100)
        ),
        4 => format!(
            "db query took {duration:.2} ms: SELECT id, status, total, created_at FROM orders WHERE customer_id = {} AND status IN ('new', 'paid') ORDER BY created_at DESC LIMIT 50",
            rng.below(10_000_000)
        ),
        5 => format!(
            "worker {} processed job {}-{} from queue {service}.events in {duration:.1} ms (attempt {}, {} messages left, lag {} ms)",
            rng.below(64),
            rng.hex(8),
            rng.hex(4),
            rng.below(3) + 1,
            rng.below(10_000),
            rng.below(5_000)
        ),
        6 => format!(
            "retrying upstream call to {service}.svc.cluster.local:8080/internal/health attempt {} of 5 after connection reset by peer; backing off for {} ms",
            rng.below(5) + 1,
            rng.below(2_000)
        ),
        7 => format!(
            "order {} moved from {} to {} by {} after review; inventory reserved in warehouse {} and shipping label requested from the carrier",
            rng.below(100_000_000),
            ["new", "paid", "packed"][rng.below(3) as usize],
            ["shipped", "cancelled", "refunded"][rng.below(3) as usize],
            ["system", "operator", "customer"][rng.below(3) as usize],
            rng.below(40)
        ),
        8 => format!(
            "token for client {} expired {} s ago; issuing a new access token with scope orders:read orders:write valid for 3600 s (refresh token rotated)",
            rng.hex(10),
            rng.below(600)
        ),
        9 => format!(
            "health check of dependency redis-{} answered in {duration:.1} ms; pool has {} idle and {} active connections of 64, {} waiters queued",
            rng.below(6),
            rng.below(64),
            rng.below(64),
            rng.below(10)
        ),
        10 => format!(
            "rendered template emails/order_confirmation.html for order {} in {duration:.1} ms and queued the message to {} recipients via the smtp relay",
            rng.below(100_000_000),
            rng.below(4) + 1
        ),
        _ => format!(
            "garbage collection paused the process for {duration:.1} ms; heap {} MiB of {} MiB in use, {} objects freed in generation {}",
            rng.below(2_000),
            2_048,
            rng.below(5_000_000),
            rng.below(3)
        ),
    };
    // One entry in 500,000 carries a rare word, for the rare-term search.
    if n % 500_000 == 250_000 {
        message.push_str(&format!(" xylophone{}", n / 500_000));
    }
    out.push_str(&format!(
        r#"{{"timestamp":{ts_ms},"level":"{level}","service":"{service}","message":"{message}","context":{{"duration_ms":{duration:.1},"status":{status},"method":"GET","host":"node-{}","pod":"{service}-7d4b9c5f6-{}","region":"eu-west-1"}}"#,
        rng.below(12),
        rng.hex(5),
    ));
    if rng.below(2) == 0 {
        out.push_str(&format!(
            r#","trace_id":"{}","span_id":"{}""#,
            rng.hex(32),
            rng.hex(16)
        ));
    }
    if rng.below(2) == 0 {
        out.push_str(&format!(r#","request_id":"req-{}""#, rng.hex(12)));
    }
    if rng.below(3) == 0 {
        out.push_str(&format!(r#","user_id":"user-{}""#, rng.below(1_000_000)));
    }
    out.push('}');
}

struct Bodies {
    bodies: Vec<Vec<u8>>,
    raw_ndjson_bytes: u64,
    span_ms: u64,
    end_ms: u64,
}

fn generate(total: usize) -> Bodies {
    let end_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Spread over the last 24 hours, in arrival order with a little jitter, as a cluster's
    // logs arrive.
    let span_ms = 24 * 3600 * 1000 - 60_000;
    let start_ms = end_ms - span_ms;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bodies = Vec::with_capacity(total / BATCH + 1);
    let mut raw = 0u64;
    let mut n = 0;
    while n < total {
        let mut body = String::with_capacity(BATCH * 520);
        body.push('[');
        for i in 0..BATCH.min(total - n) {
            if i > 0 {
                body.push(',');
            }
            let before = body.len();
            let ts = start_ms + (n as u64 * span_ms) / total as u64 + rng.below(2000);
            entry(&mut rng, n, ts.min(end_ms), &mut body);
            raw += (body.len() - before + 1) as u64;
            n += 1;
        }
        body.push(']');
        bodies.push(body.into_bytes());
    }
    Bodies {
        bodies,
        raw_ndjson_bytes: raw,
        span_ms,
        end_ms,
    }
}

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
    let data = generate(total);
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
    let aggregator = AggregatorProcess::start(dir.path(), &env);
    let pid = aggregator.child.id();
    let base = aggregator.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight())
        .build()
        .unwrap();

    let bodies = Arc::new(data.bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let cpu_before = proc::cpu_seconds(pid);
    let own_cpu_before = proc::cpu_seconds(std::process::id());
    let machine_before = machine_ticks();
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..in_flight() {
        let (client, bodies, next, retries, url) = (
            client.clone(),
            bodies.clone(),
            next.clone(),
            retries.clone(),
            format!("{base}/api/logs"),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return };
                loop {
                    let response = client
                        .post(&url)
                        .bearer_auth(ADMIN_TOKEN)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("POST");
                    match response.status().as_u16() {
                        201 => break,
                        429 | 503 => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => panic!(
                            "POST answered {other}: {}",
                            response.text().await.unwrap_or_default()
                        ),
                    }
                }
            }
        }));
    }
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
        if stats["wal"]["consumers"][0]["lag_entries"].as_u64() == Some(0)
            && stats["entries"].as_u64() == Some(total as u64)
        {
            break;
        }
        peak_rss_kb = peak_rss_kb.max(proc::status_kib(pid, "VmRSS:"));
        peak_anon_kb = peak_anon_kb.max(proc::status_kib(pid, "RssAnon:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let searchable_in = started.elapsed();
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
