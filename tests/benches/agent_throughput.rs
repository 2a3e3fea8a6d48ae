//! The agent's cost per line, end to end: pre-written CRI files of realistic JSON lines,
//! agent → aggregator over mutual TLS with zstd, the aggregator storing with durability on.
//!
//! ```text
//! cargo build --release -p logging-aggregator -p logging-agent
//! cargo bench -p logging-tests --bench agent_throughput
//! BENCH_LINES=200000 cargo bench -p logging-tests --bench agent_throughput
//! BENCH_DATA=cri cargo bench -p logging-tests --bench agent_throughput     # the store issue's data
//! BENCH_DATA=plain cargo bench -p logging-tests --bench agent_throughput   # plain-text bodies
//! ```
//!
//! Prints, for the agent process alone: lines/s, MB/s, CPU seconds per GB shipped and lines
//! per CPU-second, peak RSS, the compression ratio on the wire; for the aggregator it ships
//! to: CPU seconds per million lines until the entries are at rest, everything under
//! `DATA_DIR` at rest against the raw CRI bytes, peak RSS, and the store issue's queries;
//! then the agent's RSS with 1,000 files tailed at once, and its idle CPU with 100 files
//! and no new lines. `BENCH_DATA=cri` ships the store issue's data (`shared/bench/gen_cri.py`'s
//! distribution, one pod) instead of ten pods of mixed lines, `BENCH_DATA=plain` ten pods of
//! plain-text lines in common layouts (what the level detector reads); `BENCH_SKIP_AGENT_EXTRAS=1`
//! stops after the first part.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, http_client, proc};
use serde_json::Value;
use store::{dir_bytes, percentiles};

#[path = "common/cri.rs"]
mod cri;
#[path = "common/store.rs"]
mod store;

/// What the store's queries ask, and which entry is rare (for `BENCH_DATA=cri`).
struct Questions {
    rare: String,
    hour: (String, String),
}

/// What the pod logs' bodies are.
#[derive(Clone, Copy, PartialEq)]
enum Bodies {
    /// JSON, as Go/Java/Node services log them.
    Json,
    /// Plain text in the layouts of common software (Log4j, klog, nginx, Python, Go, PostgreSQL,
    /// sentences with no level): what the plain-text level detector reads.
    Plain,
}

/// Plain-text bodies; `{n}` becomes a number that varies with the line.
const PLAIN_BODIES: [&str; 10] = [
    "{t} INFO  [http-nio-8080-exec-{n}] c.e.shop.OrderController - order {n} placed in 12 ms",
    "I1127 10:00:00.123456       1 controller.go:{n}] Successfully synced key default/web-{n}",
    "{t} [error] 31#31: *{n} open() \"/usr/share/nginx/html/favicon.ico\" failed (2: No such file or directory)",
    "{t} - worker - WARNING - retry {n} of 5 for job sync-users after timeout",
    "GET /api/v1/items/{n} completed with status 200 in 3.2 ms, 0 errors",
    "{t} UTC [{n}] LOG:  checkpoint complete: wrote {n} buffers (0.1%)",
    "time={t} level=info msg=\"cache refreshed\" entries={n}",
    "[{t}] [INFO] plugin/reload: Running configuration SHA512 = {n}",
    "user {n} signed in from 10.0.0.7 via password",
    "{t} ERROR 1 --- [main] o.s.boot.SpringApplication : Application run failed for {n}",
];

/// Writes `lines` CRI lines (~183 bytes each for JSON bodies) spread over `files` pod logs.
/// Returns the bytes written.
fn write_pod_logs(root: &Path, files: usize, lines: usize) -> u64 {
    write_pod_bodies(root, files, lines, Bodies::Json)
}

fn write_pod_bodies(root: &Path, files: usize, lines: usize, bodies: Bodies) -> u64 {
    let mut bytes = 0;
    let ts = logging_common::Timestamp::now();
    let levels = ["info", "info", "info", "debug", "warn", "error"];
    let paths = [
        "/api/v1/orders",
        "/api/v1/cart",
        "/healthz",
        "/api/v1/users/me",
        "/metrics",
    ];
    for f in 0..files {
        let dir = root.join(format!(
            "var/log/pods/ns{}_app{f}-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-{f:012}/app",
            f % 7
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("0.log")).unwrap());
        let per_file = lines / files + usize::from(f < lines % files);
        for i in 0..per_file {
            let n = f * 1_000_003 + i;
            let t = ts.saturating_add_nanos(i as i64 * 1000).to_rfc3339();
            if bodies == Bodies::Plain {
                let body = PLAIN_BODIES[n % PLAIN_BODIES.len()]
                    .replace("{t}", &t)
                    .replace("{n}", &(n % 10_007).to_string());
                let line = format!("{t} stdout F {body}\n");
                bytes += line.len() as u64;
                file.write_all(line.as_bytes()).unwrap();
                continue;
            }
            let line = format!(
                "{t} stdout F {{\"level\":\"{}\",\"ts\":\"{t}\",\"msg\":\"handled request\",\"path\":\"{}\",\"status\":{},\"duration_ms\":{}.{},\"req_id\":\"{:08x}\"}}\n",
                levels[n % levels.len()],
                paths[n % paths.len()],
                [200, 200, 201, 404, 500][n % 5],
                n % 900,
                n % 10,
                n.wrapping_mul(2_654_435_761) as u32
            );
            bytes += line.len() as u64;
            file.write_all(line.as_bytes()).unwrap();
        }
    }
    bytes
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lines: usize = std::env::var("BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("agent_throughput: {lines} CRI lines in 10 files, {cores} cores");

    // 1. Throughput and cost per line, with the default settings.
    let root = tempfile::tempdir().unwrap();
    let data = std::env::var("BENCH_DATA").unwrap_or_default();
    let cri_data = data == "cri";
    let (bytes, questions) = if cri_data {
        let dir = root
            .path()
            .join("var/log/pods/shop_web-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6/web");
        std::fs::create_dir_all(&dir).unwrap();
        let written = cri::write(&dir.join("0.log"), lines, 42);
        (
            written.bytes,
            Some(Questions {
                rare: written.rare_request_id,
                hour: written.hour,
            }),
        )
    } else if data == "plain" {
        (
            write_pod_bodies(root.path(), 10, lines, Bodies::Plain),
            None,
        )
    } else {
        (write_pod_logs(root.path(), 10, lines), None)
    };
    println!(
        "wrote {:.1} MB ({:.0} bytes a line)",
        bytes as f64 / 1e6,
        bytes as f64 / lines as f64
    );
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let aggregator = AggregatorProcess::start(&aggregator_dir, &[("LOG_LEVEL", "warn")]);
    let paths = format!("{}/var/log/pods/*/*/*.log", root.path().display());
    let runs: [(&str, &[(&str, &str)]); 1] = [(
        "default settings (batches of 1,000 entries / 1 MiB, 8 MiB in flight)",
        &[],
    )];
    for (run, (label, settings)) in runs.iter().enumerate() {
        let mut env = vec![("AGENT_PATHS", paths.as_str()), ("LOG_LEVEL", "warn")];
        env.extend_from_slice(settings);
        let server_cpu_before = proc::cpu_seconds(aggregator.child.id());
        let started = Instant::now();
        let agent =
            AgentProcess::start(&aggregator, &root.path().join(format!("agent{run}")), &env);
        let pid = agent.child.id();
        let mut peak_rss = 0;
        loop {
            peak_rss = peak_rss.max(proc::status_kib(pid, "VmRSS:"));
            let sent = agent.metric("logging_agent_entries_sent_total").await
                + agent.metric("logging_agent_entries_duplicate_total").await;
            if sent as usize >= lines {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "not shipped in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed();
        let agent_cpu = proc::cpu_seconds(pid);
        peak_rss = peak_rss.max(proc::status_kib(pid, "VmHWM:"));
        let wire = agent.metric("logging_agent_sent_bytes_total").await;
        let uncompressed = agent
            .metric("logging_agent_sent_uncompressed_bytes_total")
            .await;
        while aggregator.stored_entries().await < lines as u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!();
        println!("{label}:");
        println!(
            "  shipped and acknowledged in {:.1} s: {:>8.0} lines/s, {:.1} MB/s of log files",
            elapsed.as_secs_f64(),
            lines as f64 / elapsed.as_secs_f64(),
            bytes as f64 / 1e6 / elapsed.as_secs_f64()
        );
        println!(
            "  agent CPU: {agent_cpu:.2} s = {:.0} lines per CPU-second, {:.1} CPU-s per GB of log files",
            lines as f64 / agent_cpu,
            agent_cpu / (bytes as f64 / 1e9)
        );
        println!("  agent peak RSS: {:.1} MiB", peak_rss as f64 / 1024.0);
        println!(
            "  on the wire: {:.1} MB zstd of {:.1} MB entry JSON = {:.1}x ({:.1}x against the log files)",
            wire / 1e6,
            uncompressed / 1e6,
            uncompressed / wire.max(1.0),
            bytes as f64 / wire.max(1.0)
        );
        drop(agent);
        server_figures(
            &aggregator,
            &aggregator_dir,
            server_cpu_before,
            lines,
            bytes,
            questions.as_ref(),
        )
        .await;
    }
    if std::env::var("BENCH_SKIP_AGENT_EXTRAS").is_ok() {
        return;
    }
    println!(
        "(the aggregator, on the same 2 cores, bounds the wall-clock lines/s; lines per agent CPU-second is the agent's own cost)"
    );

    // 2. 1,000 files tailed at once.
    let many = tempfile::tempdir().unwrap();
    write_pod_logs(many.path(), 1000, 100_000);
    let paths = format!("{}/var/log/pods/*/*/*.log", many.path().display());
    let agent = AgentProcess::start(
        &aggregator,
        &many.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str()), ("LOG_LEVEL", "warn")],
    );
    let pid = agent.child.id();
    let mut peak = 0;
    let started = Instant::now();
    loop {
        peak = peak.max(proc::status_kib(pid, "VmRSS:"));
        let sent = agent.metric("logging_agent_entries_sent_total").await
            + agent.metric("logging_agent_entries_duplicate_total").await;
        if sent as usize >= 100_000 || started.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watched = agent.metric("logging_agent_files_watched").await;
    peak = peak.max(proc::status_kib(pid, "VmHWM:"));
    println!();
    println!(
        "1,000 files tailed at once ({watched:.0} watched), 100,000 lines: peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
    drop(agent);

    // 3. Idle: 100 files, no new lines.
    let idle = tempfile::tempdir().unwrap();
    write_pod_logs(idle.path(), 100, 1000);
    let paths = format!("{}/var/log/pods/*/*/*.log", idle.path().display());
    let agent = AgentProcess::start(
        &aggregator,
        &idle.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str()), ("LOG_LEVEL", "warn")],
    );
    let pid = agent.child.id();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = proc::cpu_seconds(pid);
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let idle_cpu = proc::cpu_seconds(pid) - before;
    println!(
        "idle, 100 files, no new lines: {:.2}% of a core over {} s, RSS {:.1} MiB",
        100.0 * idle_cpu / window.as_secs_f64(),
        window.as_secs(),
        proc::status_kib(pid, "VmRSS:") as f64 / 1024.0
    );
    drop(agent);
}

/// The aggregator's side: CPU until the entries are at rest, disk at rest, its queries.
async fn server_figures(
    aggregator: &AggregatorProcess,
    data_dir: &Path,
    cpu_before: f64,
    lines: usize,
    raw_bytes: u64,
    questions: Option<&Questions>,
) {
    let pid = aggregator.child.id();
    let client = http_client();
    store::wait_at_rest(&client, &aggregator.base).await;
    let cpu = proc::cpu_seconds(pid) - cpu_before;
    let disk = dir_bytes(data_dir);
    println!(
        "  aggregator CPU until at rest: {cpu:.1} s = {:.2} CPU-s per million lines ({:.0} lines per CPU-second); peak RSS {:.0} MiB",
        cpu / (lines as f64 / 1e6),
        lines as f64 / cpu,
        proc::status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    println!(
        "  at rest, everything under DATA_DIR: {:.1} MB = {:.1}% of the {:.1} MB of log files",
        disk as f64 / 1e6,
        100.0 * disk as f64 / raw_bytes as f64,
        raw_bytes as f64 / 1e6
    );
    let Some(q) = questions else {
        return;
    };
    let query = |path: String| {
        let client = client.clone();
        let url = format!("{}{path}", aggregator.base);
        async move {
            let mut samples = Vec::new();
            let mut last = Value::Null;
            for _ in 0..20 {
                let started = Instant::now();
                let response = client
                    .get(&url)
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                last = response.json().await.unwrap();
                samples.push(started.elapsed());
            }
            (percentiles(samples), last)
        }
    };
    let ((p50, p99), page) = query("/api/logs?level=error&limit=100".into()).await;
    println!(
        "  level=error, newest 100:              p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   ({} entries)",
        page["items"].as_array().map_or(0, |a| a.len())
    );
    let ((p50, p99), found) = query(format!("/api/search?q={}", q.rare)).await;
    println!(
        "  a request id that occurs once ({}): p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   (total {})",
        q.rare, found["total"]
    );
    let ((p50, p99), analytics) = query(format!(
        "/api/analytics?start={}&end={}&interval=1m",
        q.hour.0, q.hour.1
    ))
    .await;
    println!(
        "  count per minute by level over 1 h:  p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   ({} buckets, {} entries)",
        analytics["timeline"].as_array().map_or(0, |a| a.len()),
        analytics["total"]
    );
}
