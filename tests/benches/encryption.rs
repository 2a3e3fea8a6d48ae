//! What encryption at rest costs: the store issue's CRI data shipped agent → aggregator
//! (mutual TLS, zstd, durability on) once with `LOG_ENCRYPTION_ENABLED=false` and once with it
//! on, alternated `BENCH_ROUNDS` times so that drift of the machine falls on both sides alike;
//! after each ingest, at rest, the store's queries.
//!
//! ```text
//! cargo build --release -p logging-aggregator -p logging-agent
//! cargo bench -p logging-tests --bench encryption
//! BENCH_LINES=1000000 BENCH_ROUNDS=3 BENCH_SAMPLES=30 cargo bench -p logging-tests --bench encryption
//! ```
//!
//! Prints per run, and as medians with the ratio on/off: the aggregator's CPU seconds per
//! million lines until everything is at rest, disk at rest, and p50 of four queries (the data
//! at rest issue's bars: ingest ≤ 1.10×, queries ≤ 1.2×).

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "common/cri.rs"]
mod cri;
#[path = "common/rounds.rs"]
mod rounds;
#[path = "common/store.rs"]
mod store;

use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, http_client, proc};
use serde_json::Value;

/// One run's figures: CPU-s per million, disk % of raw, and the queries' p50 in ms.
struct Figures {
    cpu: f64,
    disk: f64,
    queries: Vec<f64>,
}

const QUERY_NAMES: [&str; 4] = [
    "level=error, newest 100",
    "a request id that occurs once",
    "a common term, newest 100",
    "count per minute by level, 1 h",
];

async fn run(
    root: &Path,
    written: &cri::Written,
    lines: usize,
    name: &str,
    env: &[(&str, &str)],
) -> Figures {
    let dir = root.join(name);
    let mut env = env.to_vec();
    env.push(("LOG_LEVEL", "warn"));
    let data_dir = dir.join("aggregator");
    let aggregator = AggregatorProcess::start(&data_dir, &env);
    let paths = format!("{}/var/log/pods/*/*/*.log", root.display());
    env.push(("AGENT_PATHS", paths.as_str()));
    let cpu_before = proc::cpu_seconds(aggregator.child.id());
    let started = Instant::now();
    let agent = AgentProcess::start(&aggregator, &dir.join("agent"), &env);
    while aggregator.stored_entries().await < lines as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not stored in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(agent);
    let client = http_client();
    store::wait_at_rest(&client, &aggregator.base).await;
    let cpu = (proc::cpu_seconds(aggregator.child.id()) - cpu_before) / (lines as f64 / 1e6);
    let disk = 100.0 * store::dir_bytes(&data_dir) as f64 / written.bytes as f64;
    let (start, end) = &written.hour;
    let paths = [
        "/api/logs?level=error&limit=100".to_string(),
        format!("/api/search?q={}", written.rare_request_id),
        "/api/search?q=timeout&limit=100".to_string(),
        format!("/api/analytics?start={start}&end={end}&interval=1m"),
    ];
    let mut queries = Vec::new();
    for path in &paths {
        let url = format!("{}{path}", aggregator.base);
        let mut samples = Vec::new();
        for _ in 0..rounds::setting("BENCH_SAMPLES", 30) {
            let asked = Instant::now();
            let response = client
                .get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "{url}");
            let _: Value = response.json().await.unwrap();
            samples.push(asked.elapsed());
        }
        queries.push(store::percentiles(samples).0);
    }
    println!(
        "  {name:<22} aggregator {cpu:.2} CPU-s per million; at rest {disk:.1}% of raw; p50 {}",
        queries
            .iter()
            .map(|q| format!("{q:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    drop(aggregator);
    let _ = std::fs::remove_dir_all(&dir);
    Figures { cpu, disk, queries }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lines = rounds::setting("BENCH_LINES", 1_000_000);
    let rounds = rounds::setting("BENCH_ROUNDS", 3);
    let root = tempfile::tempdir().unwrap();
    let written = rounds::write_pod_log(root.path(), lines);
    println!(
        "encryption at rest: {lines} CRI lines ({:.1} MB), {rounds} rounds of off / on; query p50 in ms: {}",
        written.bytes as f64 / 1e6,
        QUERY_NAMES.join(" / ")
    );
    let on = [
        ("LOG_ENCRYPTION_ENABLED", "true"),
        (
            "LOG_ENCRYPTION_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ),
    ];
    let (mut off_runs, mut on_runs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        off_runs.push(
            run(
                root.path(),
                &written,
                lines,
                &format!("off (round {round})"),
                &[],
            )
            .await,
        );
        on_runs.push(
            run(
                root.path(),
                &written,
                lines,
                &format!("on (round {round})"),
                &on,
            )
            .await,
        );
    }
    let summary = |runs: &[Figures]| {
        (
            rounds::median(runs.iter().map(|f| f.cpu).collect()),
            rounds::median(runs.iter().map(|f| f.disk).collect()),
            (0..QUERY_NAMES.len())
                .map(|q| rounds::median(runs.iter().map(|f| f.queries[q]).collect()))
                .collect::<Vec<f64>>(),
        )
    };
    let (off_cpu, off_disk, off_queries) = summary(&off_runs);
    let (on_cpu, on_disk, on_queries) = summary(&on_runs);
    println!("medians (off → on):");
    println!(
        "  ingest, aggregator CPU-s per million: {off_cpu:.2} → {on_cpu:.2} ({:.2}×; bar ≤ 1.10×)",
        on_cpu / off_cpu
    );
    println!("  disk at rest, % of raw: {off_disk:.1} → {on_disk:.1}");
    for (q, name) in QUERY_NAMES.iter().enumerate() {
        println!(
            "  {name:<32} p50 {:.1} → {:.1} ms ({:.2}×; bar ≤ 1.2×)",
            off_queries[q],
            on_queries[q],
            on_queries[q] / off_queries[q]
        );
    }
}
