//! What each sink sustains alone, from stored entries as the WAL holds them:
//! - Loki: grouped into streams, encoded as snappy protobuf (and as JSON), pushed to a local
//!   receiver that reads each body and answers 204 as Loki does;
//! - Elasticsearch: `_bulk` NDJSON to a local receiver that answers one item per action, as
//!   Elasticsearch does, which the sink reads;
//! - the broker: `log.ingested` events published to the NATS JetStream on 127.0.0.1:4222
//!   (a stream of its own, deleted afterwards), each acknowledged.
//!
//! ```text
//! cargo bench -p logging-tests --bench sinks                 # 500,000 entries
//! BENCH_ENTRIES=1000000 cargo bench -p logging-tests --bench sinks
//! ```

use std::time::Instant;

use bytes::Bytes;
#[path = "common/discard.rs"]
mod discard;

use logging_aggregator::broker::{BrokerSettings, BrokerSink};
use logging_aggregator::sinks::elasticsearch::{ElasticsearchSettings, ElasticsearchSink};
use logging_aggregator::sinks::loki::{LokiSettings, LokiSink};
use logging_aggregator::sinks::{BATCH_ENTRIES, Outcome, Sink};
use logging_tests::load::stored_lines;
use logging_tests::proc;

/// Sends every line through `sink`, a batch at a time as the sink runner does; entries/s.
async fn send_all(sink: &mut impl Sink, lines: &[Bytes]) -> f64 {
    let started = Instant::now();
    for batch in lines.chunks(BATCH_ENTRIES) {
        match sink.send(batch).await {
            Outcome::Delivered => {}
            other => panic!("{}: {other:?}", sink.name()),
        }
    }
    lines.len() as f64 / started.elapsed().as_secs_f64()
}

async fn elasticsearch(lines: &[Bytes], url: &str) {
    let settings = ElasticsearchSettings::new(url, "logs", false, None, None, None, None).unwrap();
    let mut sink = ElasticsearchSink::new(settings).unwrap();
    let pid = std::process::id();
    let cpu = proc::cpu_seconds(pid);
    let started = Instant::now();
    let mut bytes = 0;
    for batch in lines.chunks(BATCH_ENTRIES) {
        bytes += sink.bulk(batch).body.len();
    }
    let encode_wall = started.elapsed().as_secs_f64();
    let encode_cpu = proc::cpu_seconds(pid) - cpu;
    let raw: usize = lines.iter().map(|l| l.len() + 1).sum();
    let sent = send_all(&mut sink, lines).await;
    println!(
        "elasticsearch   : encode {:>8.0} entries/s ({:>8.0} per CPU-s), encode+send+read items {:>8.0} entries/s; body {:.1}% of the stored JSON",
        lines.len() as f64 / encode_wall,
        lines.len() as f64 / encode_cpu.max(0.01),
        sent,
        100.0 * bytes as f64 / raw as f64
    );
}

async fn broker(lines: &[Bytes]) {
    if std::net::TcpStream::connect("127.0.0.1:4222").is_err() {
        println!("broker (NATS)   : no NATS on 127.0.0.1:4222, not measured");
        return;
    }
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let settings = BrokerSettings::new("nats://127.0.0.1:4222", &topic, 3, 100).unwrap();
    let stream = settings.stream_name();
    let mut sink = BrokerSink::new(settings);
    let sent = send_all(&mut sink, lines).await;
    println!(
        "broker (NATS)   : encode+publish+ack {sent:>8.0} entries/s (log.ingested, JetStream file storage)"
    );
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await;
}

async fn run(format: &str, lines: &[Bytes], url: &str) {
    let settings =
        LokiSettings::new(url, Some("bench"), &["cluster=bench".into()], format).expect("settings");
    let mut sink = LokiSink::new(settings).unwrap();
    let pid = std::process::id();

    // Encoding alone.
    let cpu = proc::cpu_seconds(pid);
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut grouping = 0.0;
    for batch in lines.chunks(BATCH_ENTRIES) {
        let t = Instant::now();
        let grouped = sink.group(batch);
        grouping += t.elapsed().as_secs_f64();
        bytes += sink.encode(grouped).len();
    }
    let encode_wall = started.elapsed().as_secs_f64();
    let encode_cpu = proc::cpu_seconds(pid) - cpu;
    let raw: usize = lines.iter().map(|l| l.len() + 1).sum();

    // Encoding and sending, one request at a time as the sink does.
    let sent = send_all(&mut sink, lines).await;
    println!(
        "loki {format:<8}: encode {:>8.0} entries/s ({:>8.0} per CPU-s; {:.0}% of it parsing and grouping), encode+send {:>8.0} entries/s; body {:.1}% of the stored JSON",
        lines.len() as f64 / encode_wall,
        lines.len() as f64 / encode_cpu.max(0.01),
        100.0 * grouping / encode_wall,
        sent,
        100.0 * bytes as f64 / raw as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let total: usize = std::env::var("BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let lines = stored_lines(total);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    discard::serve(listener);
    println!(
        "Sinks alone: {total} stored entries, {} per request (bar: ≥ 150,000 entries/s each)",
        BATCH_ENTRIES
    );
    run("protobuf", &lines, &url).await;
    run("json", &lines, &url).await;
    elasticsearch(&lines, &url).await;
    broker(&lines).await;
}
