use super::*;
use proptest::prelude::*;

fn now() -> Timestamp {
    Timestamp::parse("2026-12-01T12:00:00Z").unwrap()
}

fn entry(document: &str, index: &str, id: Option<&str>) -> Value {
    serde_json::from_str(
        &document_entry(document.as_bytes(), Origin::index(index), id, now()).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_filebeat_document_maps_ecs_fields_and_kubernetes() {
    let e = entry(
        r#"{"@timestamp":"2026-12-01T11:59:00.250Z","message":"payment declined","log":{"level":"warn","file":{"path":"/var/log/x"}},
            "service":{"name":"checkout","version":"1.2"},"trace":{"id":"abc"},"trace.id":"4bf92f35","user.id":"alice",
            "kubernetes":{"namespace":"shop","pod":{"name":"checkout-1","uid":"u-1"},"container":{"name":"app"},"node":{"name":"node-7"},"labels":{"app":"checkout"}},
            "host":{"name":"node-7"}}"#,
        "filebeat-8.17.0",
        None,
    );
    assert_eq!(e["timestamp"], "2026-12-01T11:59:00.250Z");
    assert_eq!(e["message"], "payment declined");
    assert_eq!(e["level"], "warning");
    assert_eq!(e["service"], "checkout");
    assert_eq!(e["trace_id"], "4bf92f35");
    assert_eq!(e["user_id"], "alice");
    let context = &e["context"];
    assert_eq!(
        context["kubernetes"],
        json!({"namespace": "shop", "pod": "checkout-1", "pod_uid": "u-1", "container": "app", "node": "node-7", "labels": {"app": "checkout"}})
    );
    assert_eq!(context["log"], json!({"file": {"path": "/var/log/x"}}));
    assert_eq!(context["service"], json!({"version": "1.2"}));
    assert_eq!(context["host"], json!({"name": "node-7"}));
    assert_eq!(context["_index"], "filebeat-8.17.0");
}

#[test]
fn a_fluent_bit_document_has_its_raw_line_parsed_as_the_agent_would() {
    let e = entry(
        r#"{"@timestamp":"2026-12-01T11:59:00Z","stream":"stderr","log":"{\"level\":\"error\",\"msg\":\"db down\",\"attempt\":3}",
            "kubernetes":{"namespace_name":"shop","pod_name":"api-7d4b9-x2k9p","container_name":"api","host":"node-2","labels":{"app":"api"}}}"#,
        "fluent-bit",
        None,
    );
    assert_eq!(e["message"], "db down");
    assert_eq!(e["level"], "error");
    assert_eq!(e["service"], "api", "the container names the service");
    assert_eq!(e["context"]["attempt"], 3);
    assert_eq!(e["context"]["stream"], "stderr");
    assert_eq!(e["context"]["kubernetes"]["namespace"], "shop");
    assert_eq!(e["context"]["kubernetes"]["node"], "node-2");
    // Plain lines get their level read; with nothing to go on, the index names the service.
    let plain = entry(
        r#"{"log":"2026-12-01 12:00:00 WARN disk 91% full","time":1764590400000}"#,
        "syslog",
        None,
    );
    assert_eq!(plain["level"], "warning");
    assert_eq!(plain["service"], "syslog");
    assert_eq!(plain["timestamp"], "2025-12-01T12:00:00Z");
    // No message at all: the document is the message.
    let bare = entry(r#"{"a":1}"#, "x", None);
    assert_eq!(bare["message"], r#"{"a":1}"#);
    assert_eq!(
        bare["timestamp"], "2026-12-01T12:00:00Z",
        "the time it arrived"
    );
}

#[test]
fn ids_come_from_the_id_or_the_document() {
    let id = |doc: &str, index: &str, id: Option<&str>| entry(doc, index, id)["id"].clone();
    let doc = r#"{"@timestamp":"2026-12-01T11:59:00Z","message":"x"}"#;
    assert_eq!(
        id(doc, "logs", Some("a1")),
        id(
            r#"{"@timestamp":"2026-12-01T11:59:00Z","message":"other"}"#,
            "logs",
            Some("a1")
        )
    );
    assert_ne!(id(doc, "logs", Some("a1")), id(doc, "other", Some("a1")));
    assert_eq!(id(doc, "logs", None), id(doc, "logs", None));
    assert_ne!(
        id(doc, "logs", None),
        id(
            r#"{"@timestamp":"2026-12-01T11:59:00Z","message":"y"}"#,
            "logs",
            None
        )
    );
}

#[test]
fn bad_documents_cost_their_item_and_bad_actions_the_request() {
    let ndjson = concat!(
        "{\"create\":{\"_index\":\"logs\",\"_id\":\"1\"}}\n{\"message\":\"ok\"}\n",
        "{\"index\":{}}\n{not json\n",
        "{\"create\":{\"_id\":7}}\n{\"@timestamp\":\"yesterday\",\"message\":\"x\"}\n",
    );
    let items = read_actions(ndjson.as_bytes(), Some("default"), 100)
        .map_err(|_| ())
        .unwrap();
    assert_eq!(items.len(), 3);
    assert!(items[0].entry.is_ok());
    assert_eq!(items[1].index, "default");
    assert!(
        items[1]
            .entry
            .as_ref()
            .unwrap_err()
            .contains("failed to parse the document")
    );
    assert_eq!(items[2].id.as_deref(), Some("7"));
    assert!(
        items[2]
            .entry
            .as_ref()
            .unwrap_err()
            .contains("[@timestamp]")
    );

    for bad in [
        "{\"delete\":{\"_index\":\"logs\",\"_id\":\"1\"}}\n",
        "{\"create\":{}}\n{\"message\":\"no index\"}\n",
        "{\"create\":{\"_index\":\"x\"}}\n",
        "not json\n{}\n",
    ] {
        let error = read_actions(bad.as_bytes(), None, 100).err().unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let many = "{\"create\":{\"_index\":\"x\"}}\n{\"message\":\"m\"}\n".repeat(3);
    let error = read_actions(many.as_bytes(), None, 2).err().unwrap();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_body_is_read_or_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = read_actions(&body, Some("x"), 100);
    }

    #[test]
    fn any_document_makes_an_entry_the_ingest_path_accepts_or_a_reason(
        message in "\\PC{0,100}",
        key in "[a-z.@_]{1,12}",
        value in "\\PC{0,20}",
    ) {
        let document = json!({"message": message, key: value}).to_string();
        if let Ok(raw) = document_entry(document.as_bytes(), Origin::index("logs"), None, now()) {
            let entry = logging_common::validate::validate_log_entry(
                &raw,
                logging_common::validate::EntryLimits { max_entry_bytes: 1 << 20 },
                now(),
            );
            prop_assert!(entry.is_ok() || message.trim().is_empty(), "{raw}: {entry:?}");
        }
    }
}
