//! The ingest protocols other agents speak, into the aggregator: the store issue's CRI data
//! (`shared/bench/gen_cri.py`'s distribution) sent in requests of 1,000 lines, four in
//! flight, either as Promtail sends it (`BENCH_PROTOCOL=loki`, the default: snappy-compressed
//! protobuf `PushRequest`s to `POST /loki/api/v1/push`, labels from the pod, two streams) or
//! as Fluent Bit's `es` output does (`BENCH_PROTOCOL=bulk`: `POST /_bulk` NDJSON of `create`
//! actions, the raw line in `log`, Fluent Bit's `kubernetes` fields), or as an OpenTelemetry
//! Collector's `otlphttp` exporter does (`BENCH_PROTOCOL=otlp`: `POST /v1/logs` protobuf, the
//! pod as the resource, the line as the body), or as Fluent Bit's `forward` output does
//! (`BENCH_PROTOCOL=forward`: Forward-mode MessagePack on `FORWARD_PORT`, 1,000 records a
//! message, each acknowledged before the connection sends the next).
//!
//! ```text
//! cargo build --release -p logging-aggregator
//! BENCH_LINES=1000000 cargo bench -p logging-tests --bench protocols
//! BENCH_PROTOCOL=bulk BENCH_LINES=1000000 cargo bench -p logging-tests --bench protocols
//! BENCH_PROTOCOL=otlp BENCH_LINES=1000000 cargo bench -p logging-tests --bench protocols
//! BENCH_PROTOCOL=forward BENCH_LINES=1000000 cargo bench -p logging-tests --bench protocols
//! BENCH_AGGREGATOR_ENV=NAME=value,NAME=value cargo bench …   # settings for the aggregator
//! ```
//!
//! Prints the aggregator's CPU seconds per million lines until the entries are at rest (the
//! agent path's figure comes from `BENCH_DATA=cri … --bench agent_throughput`), wall-clock
//! lines per second, and everything under `DATA_DIR` at rest against the raw CRI bytes; then
//! query latencies, with the Loki push the three LogQL queries of the "Speak Loki" issue
//! through `/loki/api/v1/query_range`.

use std::sync::Arc;
use std::time::Instant;

use logging_aggregator::sinks::loki::proto;
use logging_tests::{ADMIN_TOKEN, AggregatorProcess, http_client, proc};
use store::dir_bytes;

#[path = "common/cri.rs"]
mod cri;
#[path = "common/store.rs"]
mod store;

const BATCH: usize = 1000;
const IN_FLIGHT: usize = 4;
const LABELS: &str =
    r#"{namespace="shop", pod="web-7d4b9c5f6-x2k9p", container="web", job="shop/web", app="web"}"#;

/// One CRI line: its time in nanoseconds, its stream, its body.
fn read_cri(line: &str) -> Option<(i64, &str, &str)> {
    let mut parts = line.splitn(4, ' ');
    let stamp = parts.next()?;
    let stream = parts.next()?;
    let _tag = parts.next()?;
    let body = parts.next()?;
    let nanos = logging_common::Timestamp::parse_rfc3339(stamp)
        .ok()?
        .as_nanos();
    Some((nanos, stream, body))
}

/// Fluent Bit's `es` output: a `create` for each record, the line in `log`.
fn bulks(text: &str) -> Vec<Vec<u8>> {
    let lines: Vec<(i64, &str, &str)> = text.lines().filter_map(read_cri).collect();
    lines
        .chunks(BATCH)
        .map(|chunk| {
            let mut body = String::with_capacity(chunk.len() * 400);
            for (nanos, stream, line) in chunk {
                body.push_str("{\"create\":{\"_index\":\"fluent-bit\"}}\n");
                let document = serde_json::json!({
                    "@timestamp": logging_common::Timestamp::from_nanos(*nanos).to_rfc3339(),
                    "log": line,
                    "stream": stream,
                    "kubernetes": {
                        "namespace_name": "shop",
                        "pod_name": "web-7d4b9c5f6-x2k9p",
                        "container_name": "web",
                        "host": "node-1",
                    },
                });
                body.push_str(&document.to_string());
                body.push('\n');
            }
            body.into_bytes()
        })
        .collect()
}

/// OTLP/HTTP exports as an OpenTelemetry Collector's `filelog` receiver and `otlphttp`
/// exporter send them: one resource (the pod), one scope, the line as the body.
fn exports(text: &str) -> Vec<Vec<u8>> {
    use logging_aggregator::api::otlp::proto;
    let attribute = |key: &str, value: &str| proto::KeyValue {
        key: key.into(),
        value: Some(proto::AnyValue {
            value: Some(proto::Kind::StringValue(value.into())),
        }),
    };
    let lines: Vec<(i64, &str, &str)> = text.lines().filter_map(read_cri).collect();
    lines
        .chunks(BATCH)
        .map(|chunk| {
            let request = proto::ExportLogsServiceRequest {
                resource_logs: vec![proto::ResourceLogs {
                    resource: Some(proto::Resource {
                        attributes: vec![
                            attribute("service.name", "web"),
                            attribute("k8s.namespace.name", "shop"),
                            attribute("k8s.pod.name", "web-7d4b9c5f6-x2k9p"),
                            attribute("k8s.container.name", "web"),
                        ],
                        dropped_attributes_count: 0,
                    }),
                    scope_logs: vec![proto::ScopeLogs {
                        scope: None,
                        log_records: chunk
                            .iter()
                            .map(|(nanos, stream, body)| proto::LogRecord {
                                time_unix_nano: *nanos as u64,
                                body: Some(proto::AnyValue {
                                    value: Some(proto::Kind::StringValue(body.to_string())),
                                }),
                                attributes: vec![attribute("log.iostream", stream)],
                                ..Default::default()
                            })
                            .collect(),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            prost::Message::encode_to_vec(&request)
        })
        .collect()
}

/// Fluent Bit's `forward` output: Forward-mode messages of 1,000 records with EventTime, the
/// line in `log`, Fluent Bit's `kubernetes` fields, and a chunk id to acknowledge.
fn forwards(text: &str) -> Vec<Vec<u8>> {
    use rmpv::Value;
    let map = |pairs: Vec<(&str, Value)>| {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        )
    };
    let lines: Vec<(i64, &str, &str)> = text.lines().filter_map(read_cri).collect();
    lines
        .chunks(BATCH)
        .enumerate()
        .map(|(i, chunk)| {
            let entries = chunk
                .iter()
                .map(|(nanos, stream, line)| {
                    let mut time = ((nanos / 1_000_000_000) as u32).to_be_bytes().to_vec();
                    time.extend_from_slice(&((nanos % 1_000_000_000) as u32).to_be_bytes());
                    Value::Array(vec![
                        Value::Ext(0, time),
                        map(vec![
                            ("log", Value::from(*line)),
                            ("stream", Value::from(*stream)),
                            (
                                "kubernetes",
                                map(vec![
                                    ("namespace_name", Value::from("shop")),
                                    ("pod_name", Value::from("web-7d4b9c5f6-x2k9p")),
                                    ("container_name", Value::from("web")),
                                    ("host", Value::from("node-1")),
                                ]),
                            ),
                        ]),
                    ])
                })
                .collect();
            let message = Value::Array(vec![
                Value::from("kube.shop.web"),
                Value::Array(entries),
                map(vec![("chunk", Value::from(format!("chunk-{i}")))]),
            ]);
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &message).unwrap();
            out
        })
        .collect()
}

/// Sends the forward messages over `IN_FLIGHT` connections, each waiting for its chunk's ack.
async fn send_forward(port: u16, bodies: Arc<Vec<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (bodies, next) = (bodies.clone(), next.clone());
        senders.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return };
                tcp.write_all(body).await.unwrap();
                let mut answer = Vec::new();
                loop {
                    if rmpv::decode::read_value(&mut &answer[..]).is_ok() {
                        break;
                    }
                    let mut chunk = [0u8; 256];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "chunk {i}: the aggregator closed the connection");
                    answer.extend_from_slice(&chunk[..n]);
                }
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
}

/// The pushes, encoded before the clock starts.
fn pushes(text: &str) -> Vec<Vec<u8>> {
    let lines: Vec<(i64, &str, &str)> = text.lines().filter_map(read_cri).collect();
    lines
        .chunks(BATCH)
        .map(|chunk| {
            let streams = ["stdout", "stderr"]
                .iter()
                .map(|stream| proto::StreamAdapter {
                    labels: format!("{}, stream=\"{stream}\"}}", LABELS.trim_end_matches('}')),
                    entries: chunk
                        .iter()
                        .filter(|(_, s, _)| s == stream)
                        .map(|(nanos, _, body)| proto::EntryAdapter {
                            timestamp: Some(proto::ProtoTimestamp {
                                seconds: nanos.div_euclid(1_000_000_000),
                                nanos: nanos.rem_euclid(1_000_000_000) as i32,
                            }),
                            line: body.to_string(),
                            structured_metadata: Vec::new(),
                        })
                        .collect(),
                    hash: 0,
                })
                .collect();
            let request = proto::PushRequest { streams };
            snap::raw::Encoder::new()
                .compress_vec(&prost::Message::encode_to_vec(&request))
                .unwrap()
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lines: usize = std::env::var("BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("cri.log");
    let written = cri::write(&file, lines, 42);
    let text = std::fs::read_to_string(&file).unwrap();
    let protocol = std::env::var("BENCH_PROTOCOL").unwrap_or_default();
    let bulk = protocol == "bulk";
    let (bodies, path, content_type, ok) = if bulk {
        (bulks(&text), "/_bulk", "application/x-ndjson", 200)
    } else if protocol == "otlp" {
        (exports(&text), "/v1/logs", "application/x-protobuf", 200)
    } else if protocol == "forward" {
        (forwards(&text), "FORWARD_PORT", "application/msgpack", 0)
    } else {
        (
            pushes(&text),
            "/loki/api/v1/push",
            "application/x-protobuf",
            204,
        )
    };
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(bodies);
    drop(text);
    println!(
        "protocols: {lines} CRI lines ({:.1} MB) as {} requests of {BATCH} to {path} ({:.1} MB)",
        written.bytes as f64 / 1e6,
        bodies.len(),
        bodies.iter().map(Vec::len).sum::<usize>() as f64 / 1e6
    );
    let data_dir = root.path().join("aggregator");
    let forward_port = logging_tests::free_port().to_string();
    // Extra settings for the aggregator under test: BENCH_AGGREGATOR_ENV="NAME=value,NAME=value".
    let extra = std::env::var("BENCH_AGGREGATOR_ENV").unwrap_or_default();
    let mut env: Vec<(&str, &str)> = vec![("LOG_LEVEL", "warn"), ("FORWARD_PORT", &forward_port)];
    env.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
    let aggregator = AggregatorProcess::start(&data_dir, &env);
    let pid = aggregator.child.id();
    let cpu_before = proc::cpu_seconds(pid);
    let started = Instant::now();
    if protocol == "forward" {
        send_forward(forward_port.parse().unwrap(), bodies.clone()).await;
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..if protocol == "forward" { 0 } else { IN_FLIGHT } {
        let (bodies, next, url) = (
            bodies.clone(),
            next.clone(),
            format!("{}{path}", aggregator.base),
        );
        senders.push(tokio::spawn(async move {
            let client = http_client();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return };
                loop {
                    let response = client
                        .post(&url)
                        .bearer_auth(ADMIN_TOKEN)
                        .header("content-type", content_type)
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    match response.status().as_u16() {
                        status if status == ok => {
                            if bulk {
                                let answer: serde_json::Value = response.json().await.unwrap();
                                assert_eq!(answer["errors"], false, "push {i}");
                            }
                            break;
                        }
                        429 | 503 => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await
                        }
                        status => panic!("push {i}: {status} {}", response.text().await.unwrap()),
                    }
                }
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = started.elapsed();
    store::wait_at_rest(&http_client(), &aggregator.base).await;
    let cpu = proc::cpu_seconds(pid) - cpu_before;
    let disk = dir_bytes(&data_dir);
    println!(
        "  acknowledged in {:.1} s: {:.0} lines/s",
        acknowledged.as_secs_f64(),
        lines as f64 / acknowledged.as_secs_f64()
    );
    println!(
        "  aggregator CPU until at rest: {cpu:.1} s = {:.2} CPU-s per million lines ({:.0} lines per CPU-second); peak RSS {:.0} MiB",
        cpu / (lines as f64 / 1e6),
        lines as f64 / cpu,
        proc::status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    println!(
        "  at rest, everything under DATA_DIR: {:.1} MB = {:.1}% of the {:.1} MB of CRI lines",
        disk as f64 / 1e6,
        100.0 * disk as f64 / written.bytes as f64,
        written.bytes as f64 / 1e6
    );
    // What was pushed is what a search finds: the request id that occurs once, and the
    // hour's count per minute; after a Loki push, the issue's three LogQL queries too.
    let client = http_client();
    let mut queries = vec![
        (
            format!(
                "the request id that occurs once ({})",
                written.rare_request_id
            ),
            format!("/api/search?q={}", written.rare_request_id),
        ),
        (
            "count per minute by level over 1 h".to_string(),
            format!(
                "/api/analytics?start={}&end={}&interval=1m",
                written.hour.0, written.hour.1
            ),
        ),
    ];
    if protocol.is_empty() || protocol == "loki" {
        let range = |query: String, extra: &str| {
            let query: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
            format!(
                "/loki/api/v1/query_range?query={query}&start={}&end={}{extra}",
                written.hour.0, written.hour.1
            )
        };
        queries.extend([
            (
                format!(
                    "LogQL {{service_name=\"web\"}} |= \"{}\"",
                    written.rare_request_id
                ),
                range(
                    format!(
                        "{{service_name=\"web\"}} |= \"{}\"",
                        written.rare_request_id
                    ),
                    "&limit=100",
                ),
            ),
            (
                "LogQL sum by (level) (count_over_time({service_name=\"web\"}[1m])) over 1 h"
                    .to_string(),
                range(
                    "sum by (level) (count_over_time({service_name=\"web\"}[1m]))".to_string(),
                    "&step=60",
                ),
            ),
            (
                "LogQL {service_name=\"web\"} | json | level=\"error\", newest 100".to_string(),
                range(
                    "{service_name=\"web\"} | json | level=\"error\"".to_string(),
                    "&limit=100",
                ),
            ),
        ]);
    }
    for (what, path) in queries {
        let mut samples = Vec::new();
        let mut last = serde_json::Value::Null;
        for _ in 0..20 {
            let started = Instant::now();
            last = client
                .get(format!("{}{path}", aggregator.base))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            samples.push(started.elapsed());
        }
        let (p50, p99) = store::percentiles(samples);
        let found = if last["data"]["result"].is_array() {
            let result = last["data"]["result"].as_array().unwrap();
            let lines: usize = result
                .iter()
                .map(|s| s["values"].as_array().map_or(0, Vec::len))
                .sum();
            format!("{} series, {lines} lines or points", result.len())
        } else {
            format!("total {}", last["total"])
        };
        println!("  {what}: p50 {p50:.1} ms, p99 {p99:.1} ms ({found})");
    }
}
