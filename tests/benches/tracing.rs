//! What exporting traces costs the ingest path: the store issue's CRI data shipped agent →
//! aggregator (mutual TLS, zstd, durability on), once with tracing off (no endpoint) and once
//! with spans exported over OTLP/HTTP at a parent-based ratio of 0.01 (every second) to a
//! local collector that discards them; alternated `BENCH_ROUNDS` times so that drift of the machine falls on
//! both sides alike.
//!
//! ```text
//! cargo build --release -p logging-aggregator -p logging-agent
//! cargo bench -p logging-tests --bench tracing
//! BENCH_LINES=1000000 BENCH_ROUNDS=3 cargo bench -p logging-tests --bench tracing
//! ```
//!
//! Prints, per run and as the median of the rounds, the aggregator's and the agent's CPU
//! seconds per million lines until every line is stored, and the ratio on/off (the tracing
//! issue's bar: ≤ 1.03 for the aggregator's ingest).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use logging_tests::{AgentProcess, AggregatorProcess, proc};

// Only the data is used here, not what the store benchmarks ask of it.
#[allow(dead_code)]
#[path = "common/cri.rs"]
mod cri;
#[path = "common/rounds.rs"]
mod rounds;

/// A collector that takes every export and throws it away, counting the requests.
async fn discarding_collector(exports: Arc<AtomicU64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let exports = exports.clone();
            async move {
                exports.fetch_add(1, Ordering::Relaxed);
                ([("content-type", "application/x-protobuf")], "")
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}")
}

/// CPU seconds per million lines of (aggregator, agent) for one run.
async fn run(
    root: &std::path::Path,
    lines: usize,
    name: &str,
    otel: &[(&str, &str)],
) -> (f64, f64) {
    let dir = root.join(name);
    let mut env = vec![("LOG_LEVEL", "warn")];
    env.extend_from_slice(otel);
    let aggregator = AggregatorProcess::start(&dir.join("aggregator"), &env);
    let paths = format!("{}/var/log/pods/*/*/*.log", root.display());
    env.push(("AGENT_PATHS", paths.as_str()));
    let server_before = proc::cpu_seconds(aggregator.child.id());
    let started = Instant::now();
    let agent = AgentProcess::start(&aggregator, &dir.join("agent"), &env);
    while aggregator.stored_entries().await < lines as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not stored in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let server = proc::cpu_seconds(aggregator.child.id()) - server_before;
    let agent_cpu = proc::cpu_seconds(agent.child.id());
    let millions = lines as f64 / 1e6;
    println!(
        "  {name:<28} {:.1} s wall; aggregator {:.2} CPU-s per million, agent {:.2}",
        started.elapsed().as_secs_f64(),
        server / millions,
        agent_cpu / millions
    );
    drop(agent);
    drop(aggregator);
    let _ = std::fs::remove_dir_all(&dir);
    (server / millions, agent_cpu / millions)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lines = rounds::setting("BENCH_LINES", 1_000_000);
    let rounds = rounds::setting("BENCH_ROUNDS", 3);
    let root = tempfile::tempdir().unwrap();
    let written = rounds::write_pod_log(root.path(), lines);
    let exports = Arc::new(AtomicU64::new(0));
    let endpoint = discarding_collector(exports.clone()).await;
    println!(
        "tracing: {lines} CRI lines ({:.1} MB), {rounds} rounds of off / on (parentbased_traceidratio 0.01)",
        written.bytes as f64 / 1e6
    );
    let on = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        // Exports every second, so that a run of a few seconds exports while it ingests.
        ("OTEL_BSP_SCHEDULE_DELAY", "1000"),
    ];
    let (mut off_runs, mut on_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        off_runs.push(
            run(
                root.path(),
                lines,
                &format!("off (round {})", round + 1),
                &[],
            )
            .await,
        );
        on_runs.push(
            run(
                root.path(),
                lines,
                &format!("on 0.01 (round {})", round + 1),
                &on,
            )
            .await,
        );
    }
    let server_off = rounds::median(off_runs.iter().map(|r| r.0).collect());
    let server_on = rounds::median(on_runs.iter().map(|r| r.0).collect());
    let agent_off = rounds::median(off_runs.iter().map(|r| r.1).collect());
    let agent_on = rounds::median(on_runs.iter().map(|r| r.1).collect());
    println!();
    println!(
        "aggregator ingest, median CPU-s per million: off {server_off:.2}, on {server_on:.2} = {:.3}x (bar: ≤ 1.03x)",
        server_on / server_off
    );
    println!(
        "agent, median CPU-s per million:             off {agent_off:.2}, on {agent_on:.2} = {:.3}x",
        agent_on / agent_off
    );
    println!(
        "the collector took {} exports",
        exports.load(Ordering::Relaxed)
    );
}
