//! `POST /loki/api/v1/push`: Loki's wire forms in (snappy protobuf with structured metadata,
//! JSON with gzip), on the operator port with bearer or basic auth and on the mTLS port.

use std::time::Duration;

use logging_aggregator::sinks::loki::proto;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{
    ADMIN, Db, READER, TestApp, WRITER, agent_client, run_python, stored_entries,
};

fn now_nanos() -> i64 {
    logging_common::Timestamp::now().as_nanos()
}

/// A line to push: its time in nanoseconds, the line, its structured metadata.
type Line<'a> = (i64, &'a str, Vec<(&'a str, &'a str)>);

/// A snappy-compressed `PushRequest` of (labels, lines) streams.
fn protobuf(streams: Vec<(&str, Vec<Line<'_>>)>) -> Vec<u8> {
    let request = proto::PushRequest {
        streams: streams
            .into_iter()
            .map(|(labels, entries)| proto::StreamAdapter {
                labels: labels.into(),
                entries: entries
                    .into_iter()
                    .map(|(nanos, line, metadata)| proto::EntryAdapter {
                        timestamp: Some(proto::ProtoTimestamp {
                            seconds: nanos.div_euclid(1_000_000_000),
                            nanos: nanos.rem_euclid(1_000_000_000) as i32,
                        }),
                        line: line.into(),
                        structured_metadata: metadata
                            .into_iter()
                            .map(|(name, value)| proto::LabelPairAdapter {
                                name: name.into(),
                                value: value.into(),
                            })
                            .collect(),
                    })
                    .collect(),
                hash: 0,
            })
            .collect(),
    };
    snap::raw::Encoder::new()
        .compress_vec(&prost::Message::encode_to_vec(&request))
        .unwrap()
}

#[tokio::test]
async fn a_protobuf_push_is_stored_once_with_labels_metadata_and_levels() {
    let app = TestApp::start(Db::Sqlite).await;
    let t = now_nanos();
    let body = protobuf(vec![
        (
            r#"{app="web", namespace="shop", pod="web-1", level="warn"}"#,
            // Out of order within the stream, as Loki accepts.
            vec![
                (
                    t + 2_000,
                    r#"{"msg":"second","duration_ms":12}"#,
                    vec![("trace_id", "4bf92f35")],
                ),
                (t + 1_000, "first", vec![]),
            ],
        ),
        (
            r#"{job="varlogs", filename="/var/log/app.log"}"#,
            vec![
                (
                    t + 3_000,
                    "2026-12-01 12:00:06.123 UTC [77] ERROR:  duplicate key",
                    vec![],
                ),
                (
                    t + 4_000,
                    "fail: Microsoft.AspNetCore.Server.Kestrel[13]",
                    vec![],
                ),
            ],
        ),
    ]);
    let push = |token: &str, tenant: &str| {
        app.request(Method::POST, "/loki/api/v1/push", Some(token))
            .header("content-type", "application/x-protobuf")
            .header("x-scope-orgid", tenant)
            .body(body.clone())
    };
    let response = push(WRITER, "team-a").send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "{:?}",
        response.text().await
    );
    let entries = stored_entries(&app, 4).await;
    let by_message = |m: &str| entries.iter().find(|e| e["message"] == m).unwrap().clone();
    let second = by_message("second");
    assert_eq!(second["service"], "web");
    assert_eq!(second["level"], "warning");
    assert_eq!(second["trace_id"], "4bf92f35");
    assert_eq!(second["context"]["duration_ms"], 12);
    assert_eq!(second["context"]["tenant"], "team-a");
    assert_eq!(
        second["context"]["kubernetes"],
        json!({"namespace": "shop", "pod": "web-1"})
    );
    assert!(
        by_message("first")["timestamp"].as_str().unwrap() < second["timestamp"].as_str().unwrap()
    );
    let postgres = by_message("2026-12-01 12:00:06.123 UTC [77] ERROR:  duplicate key");
    assert_eq!(postgres["service"], "varlogs");
    assert_eq!(postgres["level"], "error");
    assert_eq!(postgres["context"]["filename"], "/var/log/app.log");
    assert_eq!(
        by_message("fail: Microsoft.AspNetCore.Server.Kestrel[13]")["level"],
        "error"
    );

    // Pushed again (a lost answer): nothing twice. Basic auth with the token as password.
    let response = app
        .client
        .post(format!("{}/loki/api/v1/push", app.base))
        .basic_auth("promtail", Some(WRITER))
        .header("content-type", "application/x-protobuf")
        .header("x-scope-orgid", "team-a")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get_json("/api/logs/stats").await["entries"], 4);
    // Another tenant's identical lines are other entries.
    let response = push(ADMIN, "team-b").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    stored_entries(&app, 8).await;

    // A reader may not push; nobody may without a token.
    assert_eq!(
        push(READER, "team-a").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let anonymous = app
        .client
        .post(format!("{}/loki/api/v1/push", app.base))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(
        app.metrics()
            .await
            .contains(r#"logging_aggregator_ingest_entries_total{protocol="loki"} 12"#)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_json_push_with_gzip_stores_the_good_entries_and_names_the_bad_ones() {
    let app = TestApp::start(Db::Sqlite).await;
    let t = now_nanos();
    let body = json!({"streams": [
        {"stream": {"service_name": "checkout", "env": "prod"}, "values": [
            [t.to_string(), "level=error msg=\"payment declined\" order=4711"],
            ["1000", "far too old"],
            [(t + 1).to_string(), "with metadata", {"user_id": "alice", "detected_level": "debug"}],
        ]},
    ]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, body.to_string().as_bytes()).unwrap();
    let response = app
        .request(Method::POST, "/loki/api/v1/push", Some(WRITER))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#"stream {env="prod", service_name="checkout"} entry 1: timestamp:"#),
        "{text}"
    );
    let entries = stored_entries(&app, 2).await;
    let declined = entries
        .iter()
        .find(|e| e["message"] == "payment declined")
        .unwrap();
    assert_eq!(declined["service"], "checkout");
    assert_eq!(declined["level"], "error");
    assert_eq!(declined["context"]["order"], 4711);
    assert_eq!(declined["context"]["env"], "prod");
    let tagged = entries
        .iter()
        .find(|e| e["message"] == "with metadata")
        .unwrap();
    assert_eq!(tagged["user_id"], "alice");
    assert_eq!(tagged["level"], "debug");

    // Malformed bodies are refused whole, in plain text.
    let response = app
        .request(Method::POST, "/loki/api/v1/push", Some(WRITER))
        .header("content-type", "application/json")
        .body(r#"{"streams":[{"stream":{},"values":[["soon","x"]]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("\"soon\" is not unix nanoseconds")
    );
    app.stop().await;
}

#[tokio::test]
async fn the_mtls_port_takes_pushes_from_a_certified_client() {
    let app = TestApp::start(Db::Sqlite).await;
    let (client, ingest) = agent_client(&app);
    let response = client
        .post(format!("{ingest}/loki/api/v1/push"))
        .header("content-type", "application/x-protobuf")
        .body(protobuf(vec![(
            r#"{app="edge"}"#,
            vec![(now_nanos(), "over mTLS", vec![])],
        )]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let entries = stored_entries(&app, 1).await;
    assert_eq!(entries[0]["service"], "edge");
    assert_eq!(entries[0]["context"]["agent"], "logging-agent");
    app.stop().await;
}

/// Python's `logging_loki` handler (python-logging-loki on PyPI, installed by `.ci/run`) ships
/// records as Loki clients do: JSON pushes with basic auth, one stream per record's labels.
#[tokio::test]
#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
async fn pythons_loki_handler_ships_records_that_arrive_with_their_levels() {
    let app = TestApp::start(Db::Sqlite).await;
    let script = r#"
import logging, sys
import logging_loki
handler = logging_loki.LokiHandler(
    url=sys.argv[1] + "/loki/api/v1/push",
    tags={"service_name": "py-shop", "env": "prod"},
    auth=("python", sys.argv[2]),
    version="1",
)
# Raise instead of printing: a refused push must fail the script.
def fail(record):
    raise
handler.handleError = fail
log = logging.getLogger("shop.payments")
log.setLevel(logging.DEBUG)
log.addHandler(handler)
log.info("order 4711 placed")
log.warning("card issuer slow", extra={"tags": {"issuer": "acme"}})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("payment crashed")
"#;
    run_python(script, &[&app.base, WRITER]).await;
    let entries = stored_entries(&app, 3).await;
    let find = |start: &str| {
        entries
            .iter()
            .find(|e| e["message"].as_str().unwrap().starts_with(start))
            .unwrap_or_else(|| panic!("{start}: {entries:#?}"))
    };
    let placed = find("order 4711 placed");
    assert_eq!(placed["service"], "py-shop");
    assert_eq!(placed["level"], "info");
    assert_eq!(placed["context"]["logger"], "shop.payments");
    assert_eq!(placed["context"]["env"], "prod");
    let slow = find("card issuer slow");
    assert_eq!(slow["level"], "warning");
    assert_eq!(slow["context"]["issuer"], "acme");
    let crashed = find("payment crashed");
    assert_eq!(crashed["level"], "error");
    assert!(
        crashed["message"]
            .as_str()
            .unwrap()
            .contains("ZeroDivisionError"),
        "{crashed}"
    );
    app.stop().await;
}
