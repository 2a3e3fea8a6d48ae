//! Traces of the pipeline, exported over OTLP to a collector of our own that decodes the real
//! `ExportTraceServiceRequest` protobuf (the OpenTelemetry proto definitions): over HTTP, and
//! over gRPC (HTTP/2).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::agent::write_cri;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, http_client};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};

/// One exported span with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// What the collector was sent: spans, the requests' headers, and alert webhooks.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    headers: Arc<Mutex<Vec<HashMap<String, String>>>>,
    webhooks: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    fn take(&self, body: &[u8], headers: HashMap<String, String>) -> bool {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return false;
        };
        let mut spans = self.spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        self.headers.lock().unwrap().push(headers);
        true
    }

    /// OTLP/JSON (`http/json`): ids as hex, enums as numbers, attributes as typed values; kept
    /// as the protobuf spans the other checks read.
    fn take_json(&self, body: &[u8], headers: HashMap<String, String>) -> bool {
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        let Some(resources) = request["resourceSpans"].as_array() else {
            return false;
        };
        let unhex = |v: &Value| -> Vec<u8> {
            let text = v.as_str().unwrap_or_default();
            (0..text.len() / 2)
                .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
                .collect()
        };
        let mut spans = self.spans.lock().unwrap();
        for resource in resources {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|kv| kv["key"] == "service.name")
                .and_then(|kv| kv["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|kv| opentelemetry_proto::tonic::common::v1::KeyValue {
                            key: kv["key"].as_str().unwrap_or_default().to_string(),
                            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                                value: Some(match &kv["value"] {
                                    v if v["stringValue"].is_string() => AnyValue::StringValue(
                                        v["stringValue"].as_str().unwrap_or_default().into(),
                                    ),
                                    // 64-bit integers travel as strings in OTLP/JSON.
                                    v => AnyValue::StringValue(match &v["intValue"] {
                                        Value::String(n) => n.clone(),
                                        other => other.to_string(),
                                    }),
                                }),
                            }),
                            ..Default::default()
                        })
                        .collect();
                    spans.push(Received {
                        service: service.clone(),
                        span: Span {
                            name: span["name"].as_str().unwrap_or_default().to_string(),
                            trace_id: unhex(&span["traceId"]),
                            span_id: unhex(&span["spanId"]),
                            parent_span_id: unhex(&span["parentSpanId"]),
                            kind: span["kind"].as_i64().unwrap_or(0) as i32,
                            attributes,
                            ..Default::default()
                        },
                    });
                }
            }
        }
        self.headers.lock().unwrap().push(headers);
        true
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until `found` picks something out of the spans received.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&[Received]) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(value) = found(&self.spans()) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} among the spans received: {:#?}",
                self.spans()
                    .iter()
                    .map(|r| (&r.service, &r.span.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An OTLP/HTTP collector (`POST /v1/traces`) that also takes alert webhooks (`/hook`).
    async fn serve_http(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let traces = self.clone();
        let hooks = self.clone();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                    let collector = traces.clone();
                    async move {
                        let headers: HashMap<String, String> = headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), v.to_str().unwrap_or_default().to_string())
                            })
                            .collect();
                        let json = headers
                            .get("content-type")
                            .is_some_and(|t: &String| t.starts_with("application/json"));
                        let taken = if json {
                            collector.take_json(&body, headers)
                        } else {
                            collector.take(&body, headers)
                        };
                        match (taken, json) {
                            (true, true) => (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/json")],
                                "{}",
                            ),
                            (true, false) => (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                "",
                            ),
                            (false, _) => (
                                axum::http::StatusCode::BAD_REQUEST,
                                [("content-type", "text/plain")],
                                "",
                            ),
                        }
                    }
                }),
            )
            .route(
                "/hook",
                axum::routing::post(move |body: axum::Json<Value>| {
                    let collector = hooks.clone();
                    async move {
                        collector.webhooks.lock().unwrap().push(body.0);
                        axum::http::StatusCode::OK
                    }
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{address}")
    }

    /// An OTLP/gRPC collector: `TraceService/Export` over cleartext HTTP/2, answering with an
    /// empty `ExportTraceServiceResponse` and `grpc-status: 0` in the trailers.
    async fn serve_grpc(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let collector = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let collector = collector.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let collector = collector.clone();
                            async move {
                                let path = request.uri().path().to_string();
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                // A gRPC message: compressed flag, 4-byte length, protobuf.
                                let taken = path
                                    == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                                    && body.len() >= 5
                                    && body[0] == 0
                                    && collector.take(&body[5..], HashMap::new());
                                let response = hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(GrpcReply {
                                        status: if taken { "0" } else { "3" },
                                        step: 0,
                                    })
                                    .unwrap();
                                Ok::<_, Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        format!("http://{address}")
    }
}

/// A unary gRPC answer: one empty message, then the status in the trailers.
struct GrpcReply {
    status: &'static str,
    step: u8,
}

impl http_body::Body for GrpcReply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.step += 1;
        Poll::Ready(match self.step {
            1 => Some(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])))),
            2 => {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", self.status.parse().unwrap());
                Some(Ok(Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
}

fn text(value: &AnyValue) -> String {
    match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A span's attribute as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find<'a>(spans: &'a [Received], service: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|r| r.service == service && r.span.name == name)
        .map(|r| &r.span)
        .collect()
}

/// A container log under `root` and the agent's path pattern for it.
fn pod_log(root: &Path) -> (std::path::PathBuf, String) {
    let pattern = format!("{}/var/log/pods/*/*/*.log", root.display());
    (crate::agent::pod_log(root, "nginx", 0), pattern)
}

async fn wait_stored(aggregator: &AggregatorProcess, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while aggregator.stored_entries().await < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} entries stored; log:\n{}",
            aggregator.stored_entries().await,
            aggregator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_joins_the_agents_batch_the_ingest_and_the_alert_it_fired() {
    let collector = Collector::default();
    let endpoint = collector.serve_http().await;
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("config.yaml");
    std::fs::write(
        &config,
        serde_json::to_vec(&json!({
            "alert_rules": [{"name": "checkout errors", "kind": "count", "window": "5m",
                "threshold": 0, "filter": {"service": "checkout", "level": "error"}}],
            "alert_check_interval": 1,
            "alert_notification_channels": ["webhook"],
            "alert_webhook_url": format!("{endpoint}/hook"),
        }))
        .unwrap(),
    )
    .unwrap();
    let config = config.display().to_string();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=s3cret"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut env = otel.to_vec();
    // A Loki sink that is not there, and NATS JetStream (on this machine and in CI) on a
    // topic of this run's own: their delivery attempts and publishes are spans too.
    let dead_loki = format!("http://127.0.0.1:{}", logging_tests::free_port());
    let topic = format!("tracing_e2e_{}", std::process::id());
    let nats = nats_running().await;
    if nats {
        env.extend([
            ("BROKER_URL", "nats://127.0.0.1:4222"),
            ("BROKER_TOPIC", topic.as_str()),
        ]);
    }
    env.extend([
        ("LOKI_URL", dead_loki.as_str()),
        ("CONFIG_FILE", config.as_str()),
        ("INDEX_REFRESH_INTERVAL_MS", "100"),
        ("LOG_LEVEL", "info,logging_aggregator=debug"),
    ]);
    let aggregator = AggregatorProcess::start(&root.path().join("aggregator"), &env);
    let (log, paths) = pod_log(root.path());
    write_cri(&log, 0, 50);
    let mut env = otel.to_vec();
    env.extend([
        ("AGENT_PATHS", paths.as_str()),
        ("LOG_LEVEL", "info,logging_agent=debug"),
    ]);
    let mut agent = AgentProcess::start(&aggregator, &root.path().join("agent"), &env);
    wait_stored(&aggregator, 50).await;

    // The agent's batch: cut → compress → send → acknowledge, with what it covers.
    let (batch, send) = collector
        .wait_for("agent batch with its send", |spans| {
            let batch = find(spans, "logging-agent", "ship batch")
                .into_iter()
                .find(|b| attr(b, "entries").is_some_and(|n| n != "0"))?
                .clone();
            let children: Vec<&Span> = spans
                .iter()
                .map(|r| &r.span)
                .filter(|s| s.parent_span_id == batch.span_id)
                .collect();
            let send = children.iter().find(|s| s.name == "send")?;
            children.iter().find(|s| s.name == "compress")?;
            children.iter().find(|s| s.name == "acknowledge")?;
            Some((batch.clone(), (*send).clone()))
        })
        .await;
    assert!(
        attr(&batch, "log.positions").is_some_and(|p| p.contains("0.log@")),
        "the files and offsets a batch covers: {batch:?}"
    );
    assert_eq!(
        attr(&send, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&send, "retry").as_deref(), Some("0"));

    // The aggregator's ingest continues the agent's trace through `traceparent`.
    let ingest = collector
        .wait_for("aggregator ingest under the agent's send", |spans| {
            find(spans, "logging-aggregator", "POST /v1/ingest")
                .into_iter()
                .find(|s| s.parent_span_id == send.span_id)
                .cloned()
        })
        .await;
    assert_eq!(ingest.trace_id, batch.trace_id, "one trace, agent to store");
    assert_eq!(attr(&ingest, "http.route").as_deref(), Some("/v1/ingest"));
    assert_eq!(
        attr(&ingest, "http.response.status_code").as_deref(),
        Some("200")
    );
    let (validate, append) = collector
        .wait_for("validate and WAL append under the ingest", |spans| {
            let under = |name: &str| {
                spans
                    .iter()
                    .map(|r| &r.span)
                    .find(|s| s.parent_span_id == ingest.span_id && s.name == name)
                    .cloned()
            };
            Some((under("validate")?, under("wal append")?))
        })
        .await;
    assert!(attr(&validate, "entries").is_some_and(|n| n != "0"));
    assert_eq!(attr(&validate, "rejected").as_deref(), Some("0"));
    assert!(
        attr(&append, "wal.group.requests").is_some_and(|n| n.parse::<u64>().unwrap() >= 1),
        "the group commit it waited for: {append:?}"
    );
    collector
        .wait_for("an index refresh", |spans| {
            find(spans, "logging-aggregator", "index refresh")
                .into_iter()
                .find(|s| attr(s, "entries").is_some_and(|n| n != "0"))
                .cloned()
        })
        .await;
    let retried = collector
        .wait_for("a second attempt of the Loki sink", |spans| {
            find(spans, "logging-aggregator", "sink send")
                .into_iter()
                .find(|s| attr(s, "retry").as_deref() == Some("1"))
                .cloned()
        })
        .await;
    assert_eq!(attr(&retried, "sink").as_deref(), Some("loki"));
    assert_eq!(attr(&retried, "outcome").as_deref(), Some("retry"));
    if nats {
        broker_publishes_are_traced(&collector, &topic).await;
    }
    assert!(
        collector
            .headers
            .lock()
            .unwrap()
            .iter()
            .all(|h| h.get("x-collector-token").map(String::as_str) == Some("s3cret")),
        "OTEL_EXPORTER_OTLP_HEADERS on every export"
    );

    // Their own JSON logs carry the trace: an event inside a traced span names it.
    let trace = hex(&batch.trace_id);
    let aggregator_lines: Vec<Value> = aggregator
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        aggregator_lines
            .iter()
            .any(|l| l["message"] == "ingested a batch"
                && l["trace_id"] == trace.as_str()
                && l["span_id"] == hex(&ingest.span_id).as_str()),
        "the ingest's log line names its trace and span:\n{}",
        aggregator.log_text()
    );
    assert!(
        agent.log_text().lines().any(|l| {
            let line: Value = serde_json::from_str(l).unwrap_or_default();
            line["message"] == "the aggregator acknowledged a batch"
                && line["trace_id"].as_str().is_some_and(|t| t.len() == 32)
        }),
        "the agent's log line names its trace:\n{}",
        agent.log_text()
    );

    // An error entry fires the alert: the evaluation that fired it, its transition and the
    // notification attempt are one trace, and the notification carries its id.
    let response = http_client()
        .post(format!("{}/api/logs", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!([{"timestamp": logging_common::Timestamp::now().to_rfc3339(),
            "level": "error", "service": "checkout", "message": "payment declined"}]),
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let deadline = Instant::now() + Duration::from_secs(30);
    let hook = loop {
        if let Some(hook) = collector.webhooks.lock().unwrap().first().cloned() {
            break hook;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook; log:\n{}",
            aggregator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let alert_trace = hook["alert"]["trace_id"]
        .as_str()
        .expect("the notification names the evaluation's trace")
        .to_string();
    let (evaluation, transition, notification) = collector
        .wait_for(
            "the alert's evaluation, transition and notification",
            |spans| {
                let in_trace = |name: &str| {
                    spans
                        .iter()
                        .map(|r| &r.span)
                        .find(|s| s.name == name && hex(&s.trace_id) == alert_trace)
                        .cloned()
                };
                Some((
                    in_trace("alert evaluation")?,
                    in_trace("alert transition")?,
                    in_trace("alert notification")?,
                ))
            },
        )
        .await;
    assert_eq!(transition.parent_span_id, evaluation.span_id);
    assert_eq!(notification.parent_span_id, transition.span_id);
    assert_eq!(
        attr(&transition, "alert.rule").as_deref(),
        Some("checkout errors")
    );
    assert_eq!(attr(&transition, "event").as_deref(), Some("alert.fired"));
    assert_eq!(attr(&notification, "channel").as_deref(), Some("webhook"));
    assert_eq!(attr(&notification, "retry").as_deref(), Some("0"));
    assert!(
        aggregator
            .metric("logging_aggregator_trace_spans_exported_total")
            .await
            > 0.0
    );
    agent.kill();
}

/// Whether NATS runs on this machine; a test that needs it skips without it, unless `CI` is set.
async fn nats_running() -> bool {
    let up = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect("127.0.0.1:4222"),
    )
    .await
    .is_ok_and(|c| c.is_ok());
    if !up {
        assert!(
            std::env::var_os("CI").is_none(),
            "NATS is not running on 127.0.0.1:4222, and CI is set"
        );
        eprintln!("NATS is not running on 127.0.0.1:4222: the broker's spans are not checked");
    }
    up
}

/// The broker sink's `log.ingested` publishes appear under its delivery attempts; the run's
/// stream is removed afterwards.
async fn broker_publishes_are_traced(collector: &Collector, topic: &str) {
    let (publish, delivered) = collector
        .wait_for(
            "a log.ingested publish under the broker sink's send",
            |spans| {
                let publish = find(spans, "logging-aggregator", "broker publish")
                    .into_iter()
                    .find(|s| attr(s, "event").as_deref() == Some("log.ingested"))?
                    .clone();
                let send = spans
                    .iter()
                    .map(|r| &r.span)
                    .find(|s| s.span_id == publish.parent_span_id && s.name == "sink send")?
                    .clone();
                Some((publish, send))
            },
        )
        .await;
    assert_eq!(attr(&publish, "messaging.system").as_deref(), Some("nats"));
    assert_eq!(attr(&publish, "retry").as_deref(), Some("0"));
    assert_eq!(attr(&delivered, "sink").as_deref(), Some("broker"));
    assert_eq!(attr(&delivered, "outcome").as_deref(), Some("delivered"));
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(topic.to_uppercase())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_continues_a_callers_trace_and_names_the_service() {
    let collector = Collector::default();
    let endpoint = collector.serve_grpc().await;
    let root = tempfile::tempdir().unwrap();
    let aggregator = AggregatorProcess::start(
        root.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "logs-eu-1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // A caller's sampled trace is followed whatever the ratio.
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = http_client()
        .get(format!("{}/api/search?q=anything", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = collector
        .wait_for("the API request in the caller's trace", |spans| {
            find(spans, "logs-eu-1", "GET /api/search")
                .into_iter()
                .find(|s| hex(&s.trace_id) == caller_trace)
                .cloned()
        })
        .await;
    assert_eq!(hex(&request.parent_span_id), caller_span);
    assert_eq!(attr(&request, "query.kind").as_deref(), Some("search"));
    assert_eq!(attr(&request, "http.route").as_deref(), Some("/api/search"));
    assert_eq!(
        attr(&request, "http.request.method").as_deref(),
        Some("GET")
    );
    // kind SERVER = 2 in the protobuf's enum.
    assert_eq!(request.kind, 2);

    // A write continues the caller's trace down to the WAL, whatever the ratio.
    let response = http_client()
        .post(format!("{}/api/logs", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(
            &json!([{"timestamp": logging_common::Timestamp::now().to_rfc3339(),
            "level": "info", "service": "checkout", "message": "order placed"}]),
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let ingest = collector
        .wait_for("the write's WAL append in the caller's trace", |spans| {
            spans
                .iter()
                .map(|r| &r.span)
                .find(|s| s.name == "wal append" && hex(&s.trace_id) == caller_trace)
                .cloned()
        })
        .await;
    assert_eq!(attr(&ingest, "entries").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_export_carries_the_same_spans() {
    let collector = Collector::default();
    let endpoint = collector.serve_http().await;
    let root = tempfile::tempdir().unwrap();
    let aggregator = AggregatorProcess::start(
        root.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let response = http_client()
        .get(format!("{}/api/analytics", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .header(
            "traceparent",
            format!("00-{caller_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = collector
        .wait_for("the API request, sent as OTLP/JSON", |spans| {
            find(spans, "logging-aggregator", "GET /api/analytics")
                .into_iter()
                .find(|s| hex(&s.trace_id) == caller_trace)
                .cloned()
        })
        .await;
    assert_eq!(hex(&request.parent_span_id), "b7ad6b7169203331");
    assert_eq!(attr(&request, "query.kind").as_deref(), Some("analytics"));
    assert_eq!(
        attr(&request, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        collector.headers.lock().unwrap().iter().all(|h| h
            .get("content-type")
            .is_some_and(|t| t.starts_with("application/json"))),
        "every export was JSON"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_ratio_zero_exports_nothing() {
    let collector = Collector::default();
    let endpoint = collector.serve_http().await;
    let root = tempfile::tempdir().unwrap();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    let mut aggregator = AggregatorProcess::start(&root.path().join("aggregator"), &otel);
    let (log, paths) = pod_log(root.path());
    write_cri(&log, 0, 100);
    let mut env = otel.to_vec();
    env.push(("AGENT_PATHS", paths.as_str()));
    let mut agent = AgentProcess::start(&aggregator, &root.path().join("agent"), &env);
    wait_stored(&aggregator, 100).await;
    let response = http_client()
        .get(format!("{}/api/logs?limit=5", aggregator.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A graceful stop exports whatever is queued: with ratio 0 that is nothing.
    logging_tests::terminate(&mut agent.child);
    logging_tests::terminate(&mut aggregator.child);
    assert!(
        collector.spans().is_empty(),
        "ratio 0 exported {:?}",
        collector
            .spans()
            .iter()
            .map(|r| &r.span.name)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_spans_never_lines() {
    let dead = format!("http://127.0.0.1:{}", logging_tests::free_port());
    let root = tempfile::tempdir().unwrap();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", dead.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "1000"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
    ];
    let aggregator = AggregatorProcess::start(&root.path().join("aggregator"), &otel);
    let (log, paths) = pod_log(root.path());
    let mut env = otel.to_vec();
    env.push(("AGENT_PATHS", paths.as_str()));
    let mut agent = AgentProcess::start(&aggregator, &root.path().join("agent"), &env);
    for round in 0..5 {
        write_cri(&log, round * 200, (round + 1) * 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_stored(&aggregator, 1000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while aggregator
        .metric("logging_aggregator_trace_spans_dropped_total")
        .await
        == 0.0
        || agent
            .metric("logging_agent_trace_spans_dropped_total")
            .await
            == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "dropped spans are counted; log:\n{}",
            aggregator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        aggregator
            .log_text()
            .contains("cannot export spans to the OTLP collector"),
        "said once in the log"
    );
    agent.kill();
}
