//! Elasticsearch's `_bulk` API and the probes its clients make, driven by the official Python
//! client (its bulk helper refuses a server that is not Elasticsearch-shaped) and by hand.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Db, READER, TestApp, WRITER, agent_client, run_python, stored_entries};

#[tokio::test]
async fn a_bulk_request_answers_per_item_and_a_resent_create_is_a_conflict() {
    let app = TestApp::start(Db::Sqlite).await;
    let now = logging_common::Timestamp::now().to_rfc3339();
    let ndjson = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n",
        json!({"create": {"_index": "logs-shop", "_id": "a-1"}}),
        json!({"@timestamp": now, "message": "order placed", "log.level": "info", "service.name": "shop"}),
        json!({"index": {}}),
        json!({"@timestamp": "not a date", "message": "bad"}),
        json!({"create": {"_id": "a-2"}}),
        json!({"@timestamp": now, "log": "ERROR payment declined", "kubernetes": {"namespace_name": "shop", "container_name": "payments"}}),
    );
    let send = |body: String| {
        app.request(Method::POST, "/logs-default/_bulk", Some(WRITER))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
    };
    let response = send(ndjson.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-elastic-product"], "Elasticsearch");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"], true);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items[0]["create"]["status"], 201);
    assert_eq!(items[0]["create"]["_id"], "a-1");
    assert_eq!(items[0]["create"]["result"], "created");
    assert_eq!(items[1]["index"]["status"], 400);
    assert_eq!(items[1]["index"]["_index"], "logs-default");
    assert_eq!(
        items[1]["index"]["error"]["type"],
        "mapper_parsing_exception"
    );
    assert_eq!(items[2]["create"]["status"], 201);
    let entries = stored_entries(&app, 2).await;
    let declined = entries
        .iter()
        .find(|e| e["message"] == "ERROR payment declined")
        .unwrap();
    assert_eq!(declined["level"], "error");
    assert_eq!(declined["service"], "payments");
    assert_eq!(declined["context"]["kubernetes"]["namespace"], "shop");
    assert_eq!(declined["context"]["_index"], "logs-default");

    // The same request again (a lost answer): the creates conflict, nothing is stored twice.
    let again: Value = send(ndjson).await.unwrap().json().await.unwrap();
    let items = again["items"].as_array().unwrap();
    assert_eq!(items[0]["create"]["status"], 409);
    assert_eq!(
        items[0]["create"]["error"]["type"],
        "version_conflict_engine_exception"
    );
    assert_eq!(items[2]["create"]["status"], 409);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get_json("/api/logs/stats").await["entries"], 2);

    // Update and delete do not exist for log entries: the request is refused whole.
    let response = send(format!(
        "{}\n",
        json!({"delete": {"_index": "x", "_id": "a-1"}})
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A reader may look but not send.
    let response = app
        .request(Method::POST, "/_bulk", Some(READER))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let root: Value = app.get_json("/").await;
    assert_eq!(root["version"]["number"], "8.17.0");
    app.stop().await;
}

#[tokio::test]
async fn templates_and_policies_are_kept_and_given_back() {
    let app = TestApp::start(Db::Sqlite).await;
    let put = |path: &str, body: Value| {
        app.request(Method::PUT, path, Some(WRITER))
            .json(&body)
            .send()
    };
    let response = put(
        "/_index_template/filebeat",
        json!({"index_patterns": ["filebeat-*"]}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let template = app.get_json("/_index_template/filebeat").await;
    assert_eq!(
        template["index_templates"][0]["index_template"]["index_patterns"][0],
        "filebeat-*"
    );
    put("/_ilm/policy/logs", json!({"policy": {"phases": {}}}))
        .await
        .unwrap();
    assert_eq!(
        app.get_json("/_ilm/policy/logs").await["logs"]["policy"],
        json!({"phases": {}})
    );
    let missing = app
        .request(Method::GET, "/_index_template/nope", Some(READER))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "resource_not_found_exception");
    assert_eq!(app.get_json("/_cluster/health").await["status"], "green");
    assert_eq!(
        app.get_json("/_license").await["license"]["status"],
        "active"
    );
    assert_eq!(
        app.get_json("/_nodes/http").await["nodes"]["logging-aggregator"]["version"],
        "8.17.0"
    );
    app.stop().await;
}

/// The official Elasticsearch Python client (`elasticsearch` from PyPI, installed by
/// `.ci/run`): `info()`, then the bulk helper, then the same actions again.
#[tokio::test]
#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
async fn the_official_python_client_bulk_helper_stores_each_document_once() {
    let app = TestApp::start(Db::Sqlite).await;
    let script = r#"
import json, sys
from datetime import datetime, timezone
from elasticsearch import Elasticsearch, helpers
es = Elasticsearch(sys.argv[1], basic_auth=("filebeat", sys.argv[2]))
assert es.info()["version"]["number"].startswith("8.")
now = datetime.now(timezone.utc).isoformat()
actions = [
    {"_op_type": "create", "_index": "logs-py", "_id": f"py-{i}",
     "@timestamp": now, "message": f"order {i} placed", "log.level": "warn" if i == 2 else "info",
     "service": {"name": "py-shop"}, "user": {"id": f"u-{i}"}}
    for i in range(5)
] + [{"_op_type": "create", "_index": "logs-py", "_id": "bad", "@timestamp": "never", "message": "x"}]
ok, errors = helpers.bulk(es, actions, raise_on_error=False)
first = (ok, sorted(e["create"]["status"] for e in errors))
ok, errors = helpers.bulk(es, actions, raise_on_error=False)
second = (ok, sorted(e["create"]["status"] for e in errors))
print(json.dumps({"first": first, "second": second}))
"#;
    let output = run_python(script, &[&app.base, WRITER]).await;
    let result: Value = serde_json::from_slice(&output).unwrap();
    assert_eq!(result["first"], json!([5, [400]]), "{result}");
    assert_eq!(
        result["second"],
        json!([0, [400, 409, 409, 409, 409, 409]]),
        "{result}"
    );
    let entries = stored_entries(&app, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get_json("/api/logs/stats").await["entries"], 5);
    let warned = entries
        .iter()
        .find(|e| e["message"] == "order 2 placed")
        .unwrap();
    assert_eq!(warned["level"], "warning");
    assert_eq!(warned["service"], "py-shop");
    assert_eq!(warned["user_id"], "u-2");
    app.stop().await;
}

#[tokio::test]
async fn the_mtls_port_takes_bulk_requests_from_a_certified_client() {
    let app = TestApp::start(Db::Sqlite).await;
    let (client, ingest) = agent_client(&app);
    let body = format!(
        "{}\n{}\n",
        json!({"create": {}}),
        json!({"message": "over mTLS", "service": "edge"})
    );
    let response: Value = client
        .put(format!("{ingest}/logs-edge/_bulk"))
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["items"][0]["create"]["status"], 201, "{response}");
    let entries = stored_entries(&app, 1).await;
    assert_eq!(entries[0]["service"], "edge");
    assert_eq!(entries[0]["context"]["agent"], "logging-agent");
    app.stop().await;
}
