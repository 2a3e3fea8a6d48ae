//! `POST /v1/logs`: OTLP/HTTP from the OpenTelemetry Python SDK (protobuf, as its exporter
//! sends), and the protobuf and JSON wire forms by hand: mapping, partial success naming the
//! refused record, re-exports stored once, errors as `google.rpc.Status`, the mTLS port.

use logging_aggregator::api::otlp::proto;
use prost::Message as _;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Db, TestApp, WRITER, agent_client, run_python, stored_entries};

fn now_nanos() -> u64 {
    logging_common::Timestamp::now().as_nanos() as u64
}

fn text(key: &str, value: &str) -> proto::KeyValue {
    proto::KeyValue {
        key: key.into(),
        value: Some(proto::AnyValue {
            value: Some(proto::Kind::StringValue(value.into())),
        }),
    }
}

fn record(body: proto::Kind, severity: i32, attributes: Vec<proto::KeyValue>) -> proto::LogRecord {
    proto::LogRecord {
        time_unix_nano: now_nanos(),
        severity_number: severity,
        body: Some(proto::AnyValue { value: Some(body) }),
        attributes,
        trace_id: vec![0xab; 16],
        span_id: vec![0xcd; 8],
        ..Default::default()
    }
}

fn export(records: Vec<proto::LogRecord>) -> proto::ExportLogsServiceRequest {
    proto::ExportLogsServiceRequest {
        resource_logs: vec![proto::ResourceLogs {
            resource: Some(proto::Resource {
                attributes: vec![
                    text("service.name", "checkout"),
                    text("service.version", "1.4.2"),
                    text("deployment.environment.name", "prod"),
                    text("k8s.namespace.name", "shop"),
                    text("k8s.pod.name", "checkout-7f9c"),
                    text("host.name", "node-3"),
                ],
                dropped_attributes_count: 0,
            }),
            scope_logs: vec![proto::ScopeLogs {
                scope: Some(proto::InstrumentationScope {
                    name: "shop.payments".into(),
                    version: "2.0".into(),
                    ..Default::default()
                }),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

async fn post(app: &TestApp, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    app.request(Method::POST, "/v1/logs", Some(WRITER))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn protobuf_and_json_exports_are_mapped_stored_once_and_refusals_named() {
    let app = TestApp::start(Db::Sqlite).await;
    let map = proto::Kind::KvlistValue(proto::KeyValueList {
        values: vec![text("msg", "payment declined"), text("order_id", "4711")],
    });
    let request = export(vec![
        record(map, 17, vec![text("user.tier", "gold")]),
        record(proto::Kind::StringValue("cart viewed".into()), 9, vec![]),
        proto::LogRecord {
            time_unix_nano: u64::MAX,
            ..record(
                proto::Kind::StringValue("from the far future".into()),
                9,
                vec![],
            )
        },
    ]);
    let body = request.encode_to_vec();
    let response = post(&app, "application/x-protobuf", body.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    let answer = proto::ExportLogsServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
    let partial = answer.partial_success.expect("one record refused");
    assert_eq!(partial.rejected_log_records, 1);
    assert!(
        partial
            .error_message
            .contains("resource_logs[0].scope_logs[0].log_records[2]: time_unix_nano"),
        "{}",
        partial.error_message
    );
    // The same export again (its answer lost): nothing is stored twice.
    let response = post(&app, "application/x-protobuf", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let entries = stored_entries(&app, 2).await;
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let declined = entries
        .iter()
        .find(|e| e["message"] == "payment declined")
        .unwrap();
    assert_eq!(declined["level"], "error");
    assert_eq!(declined["service"], "checkout");
    assert_eq!(declined["service_version"], "1.4.2");
    assert_eq!(declined["environment"], "prod");
    assert_eq!(declined["trace_id"], "ab".repeat(16));
    assert_eq!(declined["span_id"], "cd".repeat(8));
    assert_eq!(declined["context"]["order_id"], "4711");
    assert_eq!(declined["context"]["user.tier"], "gold");
    assert_eq!(declined["context"]["host.name"], "node-3");
    assert_eq!(declined["context"]["otel.scope.name"], "shop.payments");
    assert_eq!(
        declined["context"]["kubernetes"],
        json!({"namespace": "shop", "pod": "checkout-7f9c"})
    );
    let viewed = entries
        .iter()
        .find(|e| e["message"] == "cart viewed")
        .unwrap();
    assert_eq!(viewed["level"], "info");

    // OTLP/JSON, as the Collector's otlphttp exporter with `encoding: json` sends it.
    let json_export = json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "api"}}]},
        "scopeLogs": [{"scope": {"name": "otel-js"}, "logRecords": [
            {"timeUnixNano": now_nanos().to_string(), "severityText": "WARN",
             "body": {"stringValue": "slow query"}, "traceId": "0102030405060708090a0b0c0d0e0f10",
             "attributes": [{"key": "db.rows", "value": {"intValue": "42"}}]},
            {"observedTimeUnixNano": now_nanos().to_string(), "severityNumber": 21,
             "body": {"stringValue": "{\"msg\":\"disk full\",\"disk\":\"/var\"}"}}
        ]}]
    }]});
    let response = post(
        &app,
        "application/json",
        json_export.to_string().into_bytes(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({}));
    let entries = stored_entries(&app, 4).await;
    let slow = entries
        .iter()
        .find(|e| e["message"] == "slow query")
        .unwrap();
    assert_eq!(
        (slow["service"].as_str(), slow["level"].as_str()),
        (Some("api"), Some("warning"))
    );
    assert_eq!(slow["trace_id"], "0102030405060708090a0b0c0d0e0f10");
    assert_eq!(slow["context"]["db.rows"], 42);
    let full = entries
        .iter()
        .find(|e| e["message"] == "disk full")
        .unwrap();
    assert_eq!(
        (full["level"].as_str(), full["context"]["disk"].as_str()),
        (Some("critical"), Some("/var"))
    );

    // Not an export: 400 with a google.rpc.Status in the request's encoding.
    let response = post(&app, "application/x-protobuf", vec![0xff, 0xff, 0xff]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let status = proto::Status::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(status.code, 3);
    assert!(
        status
            .message
            .contains("not an OTLP ExportLogsServiceRequest"),
        "{}",
        status.message
    );
    let response = post(
        &app,
        "application/json",
        br#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"xyz"}]}]}]}"#.to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let status: Value = response.json().await.unwrap();
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("resourceLogs[0].scopeLogs[0].logRecords[0].traceId"),
        "{status}"
    );
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let response = post(&app, "application/json", deep.into_bytes()).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = app
        .request(Method::POST, "/v1/logs", None)
        .body(vec![])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The mTLS port takes exports from a certified client.
    let (client, ingest) = agent_client(&app);
    let response = client
        .post(format!("{ingest}/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .body(
            export(vec![record(
                proto::Kind::StringValue("over mTLS".into()),
                9,
                vec![],
            )])
            .encode_to_vec(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let entries = stored_entries(&app, 5).await;
    let over = entries
        .iter()
        .find(|e| e["message"] == "over mTLS")
        .unwrap();
    assert_eq!(over["context"]["agent"], "logging-agent");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("logging_aggregator_ingest_entries_total{protocol=\"otlp\"}"),
        "{metrics}"
    );
    app.stop().await;
}

/// The OpenTelemetry Python SDK (opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http
/// on PyPI, installed by `.ci/run`): Python's logging through the SDK's handler, inside a
/// span, exported over OTLP/HTTP protobuf — each batch twice, as after a lost answer.
#[tokio::test]
#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
async fn the_opentelemetry_python_sdk_exports_records_that_arrive_once_with_their_trace() {
    let app = TestApp::start(Db::Sqlite).await;
    let script = r#"
import logging, sys
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

class Twice(LogRecordExporter):
    """Exports each batch again, as an exporter does whose first answer was lost."""
    def __init__(self, inner):
        self.inner = inner
    def export(self, batch):
        first = self.inner.export(batch)
        second = self.inner.export(batch)
        if first != LogRecordExportResult.SUCCESS or second != LogRecordExportResult.SUCCESS:
            raise SystemExit("export failed")
        return second
    def shutdown(self):
        self.inner.shutdown()
    def force_flush(self, timeout_millis=30000):
        return True

resource = Resource.create({"service.name": "py-checkout", "service.version": "3.1.0",
                            "k8s.namespace.name": "shop"})
trace.set_tracer_provider(TracerProvider(resource=resource))
provider = LoggerProvider(resource=resource)
exporter = OTLPLogExporter(endpoint=sys.argv[1] + "/v1/logs",
                           headers={"authorization": "Bearer " + sys.argv[2]})
provider.add_log_record_processor(SimpleLogRecordProcessor(Twice(exporter)))
log = logging.getLogger("shop.payments")
log.setLevel(logging.DEBUG)
log.addHandler(LoggingHandler(level=logging.DEBUG, logger_provider=provider))
with trace.get_tracer("shop").start_as_current_span("checkout") as span:
    log.warning("card issuer slow", extra={"issuer": "acme"})
    log.error("payment declined for order 4711")
    print(format(span.get_span_context().trace_id, "032x"))
provider.shutdown()
"#;
    let output = run_python(script, &[&app.base, WRITER]).await;
    let trace_id = String::from_utf8(output).unwrap().trim().to_string();
    let entries = stored_entries(&app, 2).await;
    assert_eq!(entries.len(), 2, "each record once: {entries:#?}");
    let slow = entries
        .iter()
        .find(|e| e["message"] == "card issuer slow")
        .unwrap();
    assert_eq!(slow["level"], "warning");
    assert_eq!(slow["service"], "py-checkout");
    assert_eq!(slow["service_version"], "3.1.0");
    assert_eq!(slow["context"]["issuer"], "acme");
    assert_eq!(slow["context"]["kubernetes"]["namespace"], "shop");
    assert_eq!(slow["trace_id"], trace_id.as_str());
    let declined = entries
        .iter()
        .find(|e| e["message"] == "payment declined for order 4711")
        .unwrap();
    assert_eq!(declined["level"], "error");
    assert_eq!(declined["trace_id"], trace_id.as_str());
    app.stop().await;
}

/// OTLP over gRPC on `OTLP_GRPC_PORT`, from the OpenTelemetry Python SDK's gRPC exporter
/// (opentelemetry-exporter-otlp-proto-grpc, installed by `.ci/run`): stored once although
/// exported twice; a wrong token fails the export (`UNAUTHENTICATED`) and stores nothing.
#[tokio::test]
#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
async fn the_python_sdks_grpc_exporter_ships_over_http2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = TestApp::start_with(Db::Sqlite, |c| c.otlp_grpc_port = port).await;
    let script = r#"
import logging, sys
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

results = []
class Twice(LogRecordExporter):
    def __init__(self, inner):
        self.inner = inner
    def export(self, batch):
        results.append(self.inner.export(batch))
        results.append(self.inner.export(batch))
        return results[-1]
    def shutdown(self):
        self.inner.shutdown()
    def force_flush(self, timeout_millis=30000):
        return True

def ship(token, message):
    results.clear()
    provider = LoggerProvider(resource=Resource.create({"service.name": "grpc-shop"}))
    exporter = OTLPLogExporter(endpoint="127.0.0.1:" + sys.argv[1], insecure=True, timeout=5,
                               headers={"authorization": "Bearer " + token})
    provider.add_log_record_processor(SimpleLogRecordProcessor(Twice(exporter)))
    log = logging.getLogger("grpc." + token[:4])
    log.propagate = False
    log.addHandler(LoggingHandler(level=logging.DEBUG, logger_provider=provider))
    log.error(message)
    provider.shutdown()
    return list(results)

ok = ship(sys.argv[2], "stock low for sku A-17")
assert ok == [LogRecordExportResult.SUCCESS] * 2, ok
refused = ship("not-a-token", "must not be stored")
assert refused == [LogRecordExportResult.FAILURE] * 2, refused
print("ok")
"#;
    let output = run_python(script, &[&port.to_string(), WRITER]).await;
    assert_eq!(String::from_utf8_lossy(&output).trim(), "ok");
    let entries = stored_entries(&app, 1).await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["message"], "stock low for sku A-17");
    assert_eq!(entries[0]["service"], "grpc-shop");
    assert_eq!(entries[0]["level"], "error");
    app.stop().await;
}
