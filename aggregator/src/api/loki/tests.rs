use super::*;
use proptest::prelude::*;

fn push_entry(nanos: i64, line: &str, metadata: &[(&str, &str)]) -> PushEntry {
    PushEntry {
        nanos,
        line: line.into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const T: i64 = 1_764_590_400_123_456_789;

fn entry_json(
    labels: &[(String, String)],
    tenant: Option<&str>,
    entry: &PushEntry,
) -> serde_json::Value {
    serde_json::from_str(&StreamFacts::new(labels, tenant).entry(entry)).unwrap()
}

#[test]
fn labels_metadata_and_the_line_map_onto_the_entry() {
    let stream = labels(&[
        ("job", "shop/web"),
        ("app", "web"),
        ("namespace", "shop"),
        ("pod", "web-1"),
        ("container", "app"),
        ("host", "node-7"),
        ("filename", "/var/log/pods/x/app/0.log"),
        ("level", "warn"),
    ]);
    let e = entry_json(
        &stream,
        Some("team-a"),
        &push_entry(
            T,
            r#"{"msg":"slow checkout","duration_ms":812,"user_id":"alice"}"#,
            &[("trace_id", "4bf92f3577b34da6"), ("region", "eu")],
        ),
    );
    assert_eq!(e["service"], "web", "app comes before job");
    assert_eq!(e["level"], "warning");
    assert_eq!(e["message"], "slow checkout");
    assert_eq!(e["timestamp"], "2025-12-01T12:00:00.123456789Z");
    assert_eq!(e["trace_id"], "4bf92f3577b34da6");
    assert_eq!(e["user_id"], "alice");
    let context = &e["context"];
    assert_eq!(context["duration_ms"], 812);
    assert_eq!(context["region"], "eu");
    assert_eq!(context["job"], "shop/web");
    assert_eq!(context["filename"], "/var/log/pods/x/app/0.log");
    assert_eq!(context["tenant"], "team-a");
    assert_eq!(
        context["kubernetes"],
        serde_json::json!({"namespace": "shop", "pod": "web-1", "container": "app", "node": "node-7"})
    );
    assert!(context.get("level").is_none() && context.get("app").is_none());
}

#[test]
fn the_level_comes_from_labels_then_metadata_then_the_line() {
    let level = |stream: &[(&str, &str)], meta: &[(&str, &str)], line: &str| {
        entry_json(&labels(stream), None, &push_entry(T, line, meta))["level"].clone()
    };
    assert_eq!(level(&[("detected_level", "ERROR")], &[], "x"), "error");
    assert_eq!(level(&[], &[("severity", "critical")], "x"), "critical");
    assert_eq!(level(&[], &[], "level=warn msg=slow"), "warning");
    assert_eq!(
        level(
            &[],
            &[],
            "2026-11-30 19:04:29,071 - WARN  [main] - following"
        ),
        "warning"
    );
    assert_eq!(
        level(&[], &[], "Traceback (most recent call last):"),
        "error"
    );
    assert_eq!(level(&[], &[], "all good"), "info");
    // No service label: the line's, else Loki's own name for none.
    let service = |stream: &[(&str, &str)], line: &str| {
        entry_json(&labels(stream), None, &push_entry(T, line, &[]))["service"].clone()
    };
    assert_eq!(
        service(&[], r#"{"service":"billing","msg":"x"}"#),
        "billing"
    );
    assert_eq!(
        service(&[("service_name", "api")], r#"{"service":"billing"}"#),
        "api"
    );
    assert_eq!(service(&[], "plain"), "unknown_service");
}

#[test]
fn the_id_depends_on_tenant_labels_time_and_line_only() {
    let id = |stream: &[(&str, &str)],
              tenant: Option<&str>,
              nanos: i64,
              line: &str,
              meta: &[(&str, &str)]| {
        entry_json(&labels(stream), tenant, &push_entry(nanos, line, meta))["id"].clone()
    };
    let base = id(&[("app", "web"), ("env", "prod")], None, T, "hello", &[]);
    // Label order and metadata do not matter; Loki keys identical entries the same way.
    assert_eq!(
        base,
        id(
            &[("env", "prod"), ("app", "web")],
            None,
            T,
            "hello",
            &[("x", "1")]
        )
    );
    for other in [
        id(&[("app", "web"), ("env", "dev")], None, T, "hello", &[]),
        id(
            &[("app", "web"), ("env", "prod")],
            Some("t"),
            T,
            "hello",
            &[],
        ),
        id(
            &[("app", "web"), ("env", "prod")],
            None,
            T + 1,
            "hello",
            &[],
        ),
        id(&[("app", "web"), ("env", "prod")], None, T, "hello!", &[]),
    ] {
        assert_ne!(base, other);
    }
}

#[test]
fn label_strings_are_read_as_prometheus_writes_them() {
    assert_eq!(
        parse_labels(r#"{app="web", msg="say \"hi\"\n", path="C:\\x"}"#).unwrap(),
        labels(&[("app", "web"), ("msg", "say \"hi\"\n"), ("path", "C:\\x")])
    );
    assert_eq!(parse_labels("{}").unwrap(), labels(&[]));
    assert_eq!(
        parse_labels(r#"{ a = "1" , b="2", }"#).unwrap(),
        labels(&[("a", "1"), ("b", "2")])
    );
    for bad in [
        r#"app="web""#,
        r#"{app=web}"#,
        r#"{app="web}"#,
        r#"{1a="x"}"#,
        r#"{a="1" b="2"}"#,
    ] {
        assert!(parse_labels(bad).is_err(), "{bad}");
    }
}

fn headers(content_type: &str, encoding: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    if let Some(encoding) = encoding {
        headers.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
    }
    headers
}

#[test]
fn json_pushes_with_metadata_numbers_and_gzip_decode() {
    let body = br#"{"streams":[{"stream":{"app":"web"},"values":[["1764590400000000001","one"],[1764590400000000002,"two",{"trace_id":"abc"}]]}]}"#;
    let streams = decode(&headers("application/json", None), body, 1 << 20).unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].shown, r#"{app="web"}"#);
    let entries = &streams[0].entries;
    assert_eq!(
        (entries[0].nanos, entries[0].line.as_str()),
        (1_764_590_400_000_000_001, "one")
    );
    assert_eq!(entries[1].metadata, labels(&[("trace_id", "abc")]));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, body).unwrap();
    let zipped = gz.finish().unwrap();
    let streams = decode(&headers("application/json", Some("gzip")), &zipped, 1 << 20).unwrap();
    assert_eq!(streams[0].entries.len(), 2);
    // A gzip bomb stops at the limit.
    let big = format!(
        r#"{{"streams":[{{"stream":{{}},"values":[["1","{}"]]}}]}}"#,
        "a".repeat(100_000)
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, big.as_bytes()).unwrap();
    let error = decode(
        &headers("application/json", Some("gzip")),
        &gz.finish().unwrap(),
        1000,
    )
    .err()
    .unwrap();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);

    for (bad, says) in [
        (
            &br#"{"streams":[{"stream":{},"values":[["soon","x"]]}]}"#[..],
            "not unix nanoseconds",
        ),
        (
            br#"{"streams":[{"stream":{},"values":[["1"]]}]}"#,
            "invalid length 1",
        ),
        (
            br#"{"streams":[{"stream":{},"values":[["1","x",{},4]]}]}"#,
            "invalid length",
        ),
        (br#"{"streams":"#, "not a valid push request"),
    ] {
        let error = decode(&headers("application/json", None), bad, 1 << 20)
            .err()
            .unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.detail.contains(says), "{}", error.detail);
    }
}

#[test]
fn protobuf_pushes_decode_with_structured_metadata_and_refuse_bombs() {
    let request = proto::PushRequest {
        streams: vec![proto::StreamAdapter {
            labels: r#"{app="web", namespace="shop"}"#.into(),
            entries: vec![proto::EntryAdapter {
                timestamp: Some(proto::ProtoTimestamp {
                    seconds: 1_764_590_400,
                    nanos: 5,
                }),
                line: "hello".into(),
                structured_metadata: vec![proto::LabelPairAdapter {
                    name: "trace_id".into(),
                    value: "abc".into(),
                }],
            }],
            hash: 0,
        }],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&prost::Message::encode_to_vec(&request))
        .unwrap();
    let streams = decode(&headers("application/x-protobuf", None), &body, 1 << 20).unwrap();
    assert_eq!(
        streams[0].labels,
        labels(&[("app", "web"), ("namespace", "shop")])
    );
    assert_eq!(streams[0].entries[0].nanos, 1_764_590_400_000_000_005);
    assert_eq!(
        streams[0].entries[0].metadata,
        labels(&[("trace_id", "abc")])
    );

    let error = decode(&headers("application/x-protobuf", None), &body, 10)
        .err()
        .unwrap();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    let error = decode(
        &headers("application/x-protobuf", None),
        b"not snappy",
        1 << 20,
    )
    .err()
    .unwrap();
    assert_eq!(error.status, StatusCode::BAD_REQUEST);
    let error = decode(&headers("text/csv", None), &body, 1 << 20)
        .err()
        .unwrap();
    assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_body_is_decoded_or_refused_without_panicking(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        json in any::<bool>(),
    ) {
        let content_type = if json { "application/json" } else { "application/x-protobuf" };
        let _ = decode(&headers(content_type, None), &body, 4096);
    }

    #[test]
    fn any_label_text_is_read_or_refused_without_panicking(text in "\\PC{0,60}") {
        let _ = parse_labels(&text);
    }

    #[test]
    fn any_line_and_labels_make_an_entry_the_ingest_path_accepts(
        line in "\\PC{0,200}",
        name in "[a-z_]{1,12}",
        value in "\\PC{0,20}",
    ) {
        let stream = vec![(name, value)];
        let raw = StreamFacts::new(&stream, Some("t")).entry(&push_entry(T, &line, &[("k", "v")]));
        let entry = logging_common::validate::validate_log_entry(
            &raw,
            logging_common::validate::EntryLimits { max_entry_bytes: 1 << 20 },
            Timestamp::from_nanos(T),
        );
        prop_assert!(entry.is_ok(), "{raw}: {entry:?}");
    }
}

#[test]
fn errors_are_plain_text_with_retry_after_under_backpressure() {
    let response = plain_error(ApiError::backpressure("the store is behind", 1));
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
}
