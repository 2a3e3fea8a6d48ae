//! Loki's query API over the embedded store: the wire forms Grafana's Loki data source and
//! `logcli` use (`query_range`, `query`, `labels`, `label/{name}/values`, `series`,
//! `index/stats`, `index/volume(_range)`, `buildinfo`, `/ready`), every LogQL construct of the
//! subset, and Loki-style errors for what is outside it.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Db, READER, TestApp, WRITER, entry};

/// Four entries: three of `web` in namespace `shop`, one of `api` in `auth`.
async fn fixture(app: &TestApp) {
    let mut declined = entry("web", "error", "payment 4711 declined for alice", 30);
    declined["trace_id"] = json!("abc123def");
    declined["context"] = json!({
        "kubernetes": {"namespace": "shop", "pod": "web-1", "container": "web", "node": "n1"},
        "order_id": 4711, "duration": "250ms", "size": "2KB", "status": 500
    });
    let mut handled = entry("web", "info", "request handled", 20);
    handled["context"] = json!({
        "kubernetes": {"namespace": "shop", "pod": "web-2", "container": "web", "node": "n1"},
        "duration": "20ms", "status": 200
    });
    let mut slow = entry("web", "warning", "slow upstream \u{1b}[31mred\u{1b}[0m", 10);
    slow["context"] = json!({"kubernetes": {"namespace": "shop", "pod": "web-2"}});
    let mut login = entry("api", "info", "user login", 5);
    login["request_id"] = json!("req-5f3a9c2d1e0b");
    login["context"] =
        json!({"kubernetes": {"namespace": "auth"}, "user": "bob", "path": "/login"});
    app.ingest(vec![declined, handled, slow, login]).await;
}

fn form<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn now() -> i64 {
    logging_common::Timestamp::now().as_nanos()
}

/// GET with a reader's token; the status and the body (JSON when it is JSON).
async fn get(app: &TestApp, path: &str, params: &[(&str, String)]) -> (StatusCode, Value) {
    let query = form(params.iter().map(|(k, v)| (*k, v.as_str())));
    let response = app
        .request(Method::GET, &format!("{path}?{query}"), Some(READER))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// A range query over the last ten minutes.
async fn range(app: &TestApp, query: &str, extra: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut params = vec![
        ("query", query.to_string()),
        ("start", (now() - 600_000_000_000).to_string()),
        ("end", (now() + 1_000_000_000).to_string()),
    ];
    params.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    get(app, "/loki/api/v1/query_range", &params).await
}

/// The lines of a streams answer, newest first as asked, across streams.
async fn lines(app: &TestApp, query: &str) -> Vec<String> {
    let (status, body) = range(app, query, &[]).await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    assert_eq!(body["data"]["resultType"], "streams", "{body}");
    let mut all: Vec<(i64, String)> = Vec::new();
    for stream in body["data"]["result"].as_array().unwrap() {
        for value in stream["values"].as_array().unwrap() {
            let ts: i64 = value[0].as_str().unwrap().parse().unwrap();
            all.push((ts, value[1].as_str().unwrap().to_string()));
        }
    }
    all.sort_by_key(|e| std::cmp::Reverse(e.0));
    all.into_iter().map(|(_, line)| line).collect()
}

/// The `message` of each line (lines are JSON).
async fn messages(app: &TestApp, query: &str) -> Vec<String> {
    lines(app, query)
        .await
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|_| panic!("{query}: {l}"));
            v["message"].as_str().unwrap().to_string()
        })
        .collect()
}

/// An instant query now: its result (a vector), as (labels, value) sorted by labels.
async fn instant(app: &TestApp, query: &str) -> Vec<(Value, f64)> {
    let (status, body) = get(
        app,
        "/loki/api/v1/query",
        &[("query", query.to_string()), ("time", now().to_string())],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    assert_eq!(body["data"]["resultType"], "vector", "{body}");
    let mut out: Vec<(Value, f64)> = body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["value"][0].is_number(), "{s}");
            (
                s["metric"].clone(),
                s["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    out.sort_by_key(|(labels, _)| labels.to_string());
    out
}

async fn refused(app: &TestApp, query: &str) -> String {
    let (status, body) = range(app, query, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    body.as_str()
        .unwrap_or_else(|| panic!("plain text for {query}: {body}"))
        .to_string()
}

#[tokio::test]
async fn log_queries_answer_streams_in_lokis_shape_through_every_stage() {
    let app = TestApp::start(Db::Sqlite).await;
    fixture(&app).await;

    // The shape: streams with their labels, nanosecond strings, lines of JSON, stats.
    let (status, body) = range(&app, r#"{service_name="web", level="error"}"#, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "success");
    let stream = &body["data"]["result"][0];
    assert_eq!(
        stream["stream"],
        json!({"service_name": "web", "service": "web", "level": "error", "detected_level": "error",
               "namespace": "shop", "pod": "web-1", "container": "web", "node": "n1"})
    );
    let line: Value = serde_json::from_str(stream["values"][0][1].as_str().unwrap()).unwrap();
    assert_eq!(line["message"], "payment 4711 declined for alice");
    assert_eq!(line["trace_id"], "abc123def");
    assert_eq!(line["context"]["order_id"], 4711);
    assert!(stream["values"][0][0].as_str().unwrap().len() >= 19);
    assert_eq!(body["data"]["stats"]["summary"]["totalEntriesReturned"], 1);

    // Direction and limit.
    assert_eq!(
        messages(&app, r#"{service_name="web"}"#).await,
        [
            "slow upstream \u{1b}[31mred\u{1b}[0m",
            "request handled",
            "payment 4711 declined for alice"
        ]
    );
    let (_, body) = range(
        &app,
        r#"{service_name="web"}"#,
        &[("direction", "forward"), ("limit", "1")],
    )
    .await;
    let only: Vec<&Value> = body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["values"].as_array().unwrap())
        .collect();
    assert_eq!(only.len(), 1);
    assert!(only[0][1].as_str().unwrap().contains("payment 4711"));

    // Selectors.
    assert_eq!(
        messages(&app, r#"{service=~"web|api", pod!="web-2"}"#).await,
        ["user login", "payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{namespace="auth"}"#).await,
        ["user login"]
    );
    assert_eq!(
        messages(&app, r#"{service_name=~"w.b", level!~"info|warning"}"#).await,
        ["payment 4711 declined for alice"]
    );

    // Line filters: substrings of the whole line (ids and context included), chained, `or`.
    assert_eq!(
        messages(&app, r#"{service_name="web"} |= "4711""#).await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service=~".+"} |= "5f3a9c2d1e0b""#).await,
        ["user login"]
    );
    assert_eq!(
        messages(&app, r#"{service=~".+"} |= "f3a9c2d1e0""#).await,
        ["user login"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} |= "order_id""#).await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} |= "Declined""#).await,
        Vec::<String>::new()
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} |= "declined" or "handled""#).await,
        ["request handled", "payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} != "payment" != "slow""#).await,
        ["request handled"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} |~ "pay.+declined""#).await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} !~ "(?i)REQUEST|slow""#).await,
        ["payment 4711 declined for alice"]
    );

    // Parsers and label filters on strings, numbers, durations and bytes.
    assert_eq!(
        messages(
            &app,
            r#"{service_name="web"} | json | context_status >= 500"#
        )
        .await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(
            &app,
            r#"{service_name="web"} | json | context_duration > 100ms"#
        )
        .await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} | json | context_size > 1KB"#).await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} | json | level="error""#).await,
        ["payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(&app, r#"{service_name="web"} | json | context_status = 200 or context_kubernetes_pod="web-1""#).await,
        ["request handled", "payment 4711 declined for alice"]
    );
    assert_eq!(
        messages(
            &app,
            r#"{service_name="web"} | json code="context.status" | code="200""#
        )
        .await,
        ["request handled"]
    );
    assert_eq!(
        lines(&app, r#"{service_name="web"} | json | context_status > 0 | line_format "method=GET status={{.context_status}} msg=\"{{.message | upper}}\"" | logfmt | status="500""#).await,
        [r#"method=GET status=500 msg="PAYMENT 4711 DECLINED FOR ALICE""#]
    );
    let (_, body) = range(
        &app,
        r#"{service_name="web"} | regexp "payment (?P<order>\\d+)" | order="4711""#,
        &[],
    )
    .await;
    assert_eq!(
        body["data"]["result"][0]["stream"]["order"], "4711",
        "{body}"
    );
    let (_, body) = range(
        &app,
        r#"{service_name="api"} | pattern `{"message":"<msg>",<_>`"#,
        &[],
    )
    .await;
    assert_eq!(
        body["data"]["result"][0]["stream"]["msg"], "user login",
        "{body}"
    );
    let (_, body) = range(&app, r#"{service_name="api"} | unpack"#, &[]).await;
    assert_eq!(
        body["data"]["result"][0]["stream"]["message"], "user login",
        "{body}"
    );

    // Formatting, drop, keep, decolorize.
    let (_, body) = range(&app, r#"{service_name="api"} | json | label_format who=context_user, lvl="{{ .level | upper }}""#, &[]).await;
    let labels = &body["data"]["result"][0]["stream"];
    assert_eq!(
        (labels["who"].as_str(), labels["lvl"].as_str()),
        (Some("bob"), Some("INFO")),
        "{body}"
    );
    assert!(labels.get("context_user").is_none(), "{body}");
    let (_, body) = range(
        &app,
        r#"{service_name="web", level="error"} | drop pod, node, container="web""#,
        &[],
    )
    .await;
    let labels = body["data"]["result"][0]["stream"]
        .as_object()
        .unwrap()
        .clone();
    assert!(
        !labels.contains_key("pod")
            && !labels.contains_key("node")
            && !labels.contains_key("container"),
        "{labels:?}"
    );
    let (_, body) = range(
        &app,
        r#"{service_name="web", level="error"} | keep level, namespace"#,
        &[],
    )
    .await;
    assert_eq!(
        body["data"]["result"][0]["stream"],
        json!({"level": "error", "namespace": "shop"})
    );
    assert_eq!(
        lines(
            &app,
            r#"{service_name="web"} |= "slow" | json | line_format "{{.message}}" | decolorize"#
        )
        .await,
        ["slow upstream red"]
    );
    // A parser that cannot read the line marks it, and a filter can drop those.
    let (_, body) = range(
        &app,
        r#"{service_name="api"} | line_format "not json" | json"#,
        &[],
    )
    .await;
    assert_eq!(
        body["data"]["result"][0]["stream"]["__error__"], "JSONParserErr",
        "{body}"
    );
    assert_eq!(
        lines(
            &app,
            r#"{service_name="api"} | line_format "not json" | json | __error__="""#
        )
        .await,
        Vec::<String>::new()
    );

    // Outside the subset, or not a query: Loki-style 400s in plain text.
    assert!(
        refused(&app, r#"{service_name="web"} | distinct level"#)
            .await
            .contains("not supported")
    );
    assert!(
        refused(
            &app,
            r#"label_replace(rate({a="b"}[1m]), "x", "$1", "a", "(.*)")"#
        )
        .await
        .contains("label_replace is not supported")
    );
    assert!(
        refused(&app, r#"{a=~".*"}"#)
            .await
            .contains("at least one regexp or equality matcher")
    );
    assert!(
        refused(&app, r#"{service_name="web""#)
            .await
            .starts_with("parse error at line 1, col")
    );
    assert!(
        refused(
            &app,
            r#"{service_name="web"} | line_format "{{if .a}}x{{end}}""#
        )
        .await
        .contains("not supported")
    );
    assert!(
        refused(&app, r#"{service_name="web"}"#.repeat(2).as_str())
            .await
            .contains("syntax error")
    );
    let (status, body) = get(
        &app,
        "/loki/api/v1/query",
        &[("query", r#"{service_name="web"}"#.into())],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.as_str()
            .unwrap()
            .contains("log queries are not supported as an instant query")
    );
    let (status, _) = range(&app, r#"{service_name="web"}"#, &[("limit", "5001")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Grafana POSTs a form; basic auth with the token as the password is accepted; none is not.
    let response = app
        .request(Method::POST, "/loki/api/v1/query_range", None)
        .basic_auth("grafana", Some(READER))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form([
            ("query", r#"{service_name="api"}"#),
            ("since", "1h"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["data"]["result"].as_array().unwrap().len(),
        1,
        "{body}"
    );
    let response = app
        .request(
            Method::GET,
            "/loki/api/v1/query_range?query=%7Bservice%3D%22api%22%7D",
            None,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn metric_queries_count_rate_unwrap_aggregate_and_combine() {
    let app = TestApp::start(Db::Sqlite).await;
    fixture(&app).await;

    // Counted from the store's per-block counts, and line by line: the same answer.
    let by_level = vec![
        (json!({"level": "error"}), 1.0),
        (json!({"level": "info"}), 1.0),
        (json!({"level": "warning"}), 1.0),
    ];
    assert_eq!(
        instant(
            &app,
            r#"sum by (level) (count_over_time({service_name="web"}[5m]))"#
        )
        .await,
        by_level
    );
    assert_eq!(
        instant(
            &app,
            r#"sum by (level) (count_over_time({service_name="web"} |= "" [5m]))"#
        )
        .await,
        by_level
    );
    // Grafana's Logs Volume query.
    assert_eq!(
        instant(&app, r#"sum by (level, detected_level) (count_over_time({service_name="web"} | drop __error__ [5m]))"#).await,
        vec![
            (json!({"level": "error", "detected_level": "error"}), 1.0),
            (json!({"level": "info", "detected_level": "info"}), 1.0),
            (json!({"level": "warning", "detected_level": "warning"}), 1.0),
        ]
    );
    assert_eq!(
        instant(
            &app,
            r#"sum by (service) (count_over_time({service=~"web|api"}[5m]))"#
        )
        .await,
        vec![
            (json!({"service": "api"}), 1.0),
            (json!({"service": "web"}), 3.0)
        ]
    );
    assert_eq!(
        instant(
            &app,
            r#"sum by (namespace) (count_over_time({service=~"web|api"}[5m]))"#
        )
        .await,
        vec![
            (json!({"namespace": "auth"}), 1.0),
            (json!({"namespace": "shop"}), 3.0)
        ]
    );
    let rate = instant(&app, r#"sum(rate({service=~"web|api"}[5m]))"#).await;
    assert_eq!(rate.len(), 1);
    assert!((rate[0].1 - 4.0 / 300.0).abs() < 1e-12, "{rate:?}");
    let per_stream = instant(&app, r#"count_over_time({service_name="web"}[5m])"#).await;
    assert_eq!(per_stream.len(), 3, "{per_stream:?}");
    assert_eq!(per_stream.iter().map(|(_, v)| v).sum::<f64>(), 3.0);
    let bytes = instant(&app, r#"sum(bytes_over_time({service_name="api"}[5m]))"#).await;
    let line_bytes = lines(&app, r#"{service_name="api"}"#).await[0].len() as f64;
    assert_eq!(bytes[0].1, line_bytes);

    // Unwrapped values; an unreadable one fails the query the way Loki does, until filtered.
    assert_eq!(
        instant(&app, r#"max_over_time({service_name="web"} | json | context_status != "" | unwrap context_status [5m]) by (service)"#).await,
        vec![(json!({"service": "web"}), 500.0)]
    );
    let (status, body) = get(
        &app,
        "/loki/api/v1/query",
        &[(
            "query",
            r#"sum_over_time({service_name="web"} | json | unwrap context_status [5m])"#.into(),
        )],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.as_str().unwrap().contains("SampleExtractionErr"),
        "{body}"
    );
    assert_eq!(
        instant(&app, r#"sum_over_time({service_name="web"} | json | unwrap context_status | __error__="" [5m]) by (namespace)"#).await,
        vec![(json!({"namespace": "shop"}), 700.0)]
    );
    let median = instant(&app, r#"quantile_over_time(0.5, {service_name="web"} | json | context_duration != "" | unwrap duration(context_duration) [5m]) by (service)"#).await;
    assert!((median[0].1 - 0.135).abs() < 1e-9, "{median:?}");
    assert_eq!(
        instant(&app, r#"avg_over_time({service_name="web"} | json | context_size != "" | unwrap bytes(context_size) [5m]) by (service)"#).await,
        vec![(json!({"service": "web"}), 2000.0)]
    );

    // Vector aggregations and binary operations.
    assert_eq!(
        instant(
            &app,
            r#"topk(1, sum by (namespace) (count_over_time({service=~"web|api"}[5m])))"#
        )
        .await,
        vec![(json!({"namespace": "shop"}), 3.0)]
    );
    assert_eq!(
        instant(
            &app,
            r#"sum(count_over_time({service_name="web"}[5m])) * 2"#
        )
        .await,
        vec![(json!({}), 6.0)]
    );
    assert_eq!(
        instant(
            &app,
            r#"sum(count_over_time({service_name="web"}[5m])) > bool 10"#
        )
        .await,
        vec![(json!({}), 0.0)]
    );
    assert_eq!(
        instant(
            &app,
            r#"sum(count_over_time({service_name="web"}[5m])) > 10"#
        )
        .await,
        vec![]
    );
    assert_eq!(
        instant(&app, r#"sum by (level) (count_over_time({service_name="web"}[5m])) / on (level) sum by (level) (count_over_time({service=~".+"}[5m]))"#).await,
        vec![(json!({"level": "error"}), 1.0), (json!({"level": "info"}), 0.5), (json!({"level": "warning"}), 1.0)]
    );
    assert_eq!(instant(&app, "vector(3) + 1").await, vec![(json!({}), 4.0)]);
    assert_eq!(
        instant(&app, r#"absent_over_time({service_name="nothing"}[1m])"#).await,
        vec![(json!({"service_name": "nothing"}), 1.0)]
    );
    assert_eq!(
        instant(
            &app,
            r#"count_over_time({service_name="web"}[5m] offset 1h)"#
        )
        .await,
        vec![]
    );

    // A range query: one point per step, seconds as numbers, values as strings.
    let (status, body) = range(
        &app,
        r#"sum(count_over_time({service_name="web"}[1m]))"#,
        &[("step", "60")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["resultType"], "matrix");
    let points = body["data"]["result"][0]["values"].as_array().unwrap();
    let total: f64 = points
        .iter()
        .map(|p| p[1].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 3.0, "{body}");
    assert!(points.iter().all(|p| p[0].is_number()));
    let (status, body) = range(
        &app,
        r#"sum(count_over_time({service_name="web"}[1m]))"#,
        &[("step", "0.01")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.as_str().unwrap().contains("maximum resolution"));
    assert!(
        refused(&app, r#"count_over_time({a="b"}[1m]) by (x)"#)
            .await
            .contains("grouping not allowed")
    );
    assert!(
        refused(&app, r#"sum_over_time({a="b"}[1m])"#)
            .await
            .contains("without unwrap")
    );
    app.stop().await;
}

#[tokio::test]
async fn labels_series_stats_volume_and_status_answer_as_loki_does() {
    let app = TestApp::start(Db::Sqlite).await;
    fixture(&app).await;
    let window = [
        ("start", (now() - 600_000_000_000).to_string()),
        ("end", (now() + 1_000_000_000).to_string()),
    ];

    let (status, body) = get(&app, "/loki/api/v1/labels", &window).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": "success", "data": ["container", "detected_level", "level", "namespace", "node", "pod", "service", "service_name"]})
    );
    let (_, body) = get(&app, "/loki/api/v1/label/service_name/values", &window).await;
    assert_eq!(body["data"], json!(["api", "web"]));
    let mut scoped = window.to_vec();
    scoped.push(("query", r#"{service_name="web"}"#.into()));
    let (_, body) = get(&app, "/loki/api/v1/label/pod/values", &scoped).await;
    assert_eq!(body["data"], json!(["web-1", "web-2"]));

    let mut series = window.to_vec();
    series.push(("match[]", r#"{service_name="web", pod="web-2"}"#.into()));
    let (_, body) = get(&app, "/loki/api/v1/series", &series).await;
    assert_eq!(body["status"], "success");
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["pod"] == "web-2")
    );

    let (_, body) = get(&app, "/loki/api/v1/index/stats", &scoped).await;
    assert_eq!(
        (body["streams"].as_u64(), body["entries"].as_u64()),
        (Some(3), Some(3)),
        "{body}"
    );
    assert!(body["bytes"].as_u64().unwrap() > 100);

    let mut volume = window.to_vec();
    volume.push(("query", r#"{service_name=~".+"}"#.into()));
    let (_, body) = get(&app, "/loki/api/v1/index/volume", &volume).await;
    assert_eq!(body["data"]["resultType"], "vector", "{body}");
    let result = body["data"]["result"].as_array().unwrap();
    assert_eq!(
        result[0]["metric"],
        json!({"service_name": "web"}),
        "{body}"
    );
    assert_eq!(
        result[1]["metric"],
        json!({"service_name": "api"}),
        "{body}"
    );
    volume.push(("step", "60".into()));
    volume.push(("targetLabels", "level".into()));
    let (_, body) = get(&app, "/loki/api/v1/index/volume_range", &volume).await;
    assert_eq!(body["data"]["resultType"], "matrix", "{body}");
    assert_eq!(
        body["data"]["result"].as_array().unwrap().len(),
        3,
        "{body}"
    );

    let (_, body) = get(&app, "/loki/api/v1/status/buildinfo", &[]).await;
    assert!(
        body["version"].as_str().unwrap().starts_with("2."),
        "{body}"
    );
    let response = app
        .request(Method::GET, "/ready", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ready\n");
    app.stop().await;
}

#[tokio::test]
async fn pushed_lines_are_read_back_by_their_push_labels() {
    let app = TestApp::start(Db::Sqlite).await;
    let t = now() - 1_000_000_000;
    let body = json!({"streams": [
        {"stream": {"app": "shop", "cluster": "eu-1", "namespace": "prod"}, "values": [
            [t.to_string(), "level=warn msg=\"stock low\" sku=A-17"],
        ]},
    ]});
    let response = app
        .request(Method::POST, "/loki/api/v1/push", Some(WRITER))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Pushed entries become searchable once indexed.
    let mut found = Vec::new();
    for _ in 0..100 {
        found = messages(&app, r#"{cluster="eu-1"}"#).await;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(found, ["stock low"]);
    let (_, body) = range(
        &app,
        r#"{app="shop", cluster=~"eu-.*"} | json | context_sku="A-17""#,
        &[],
    )
    .await;
    let stream = &body["data"]["result"][0]["stream"];
    assert_eq!(
        (stream["app"].as_str(), stream["cluster"].as_str()),
        (Some("shop"), Some("eu-1")),
        "{body}"
    );
    assert_eq!(
        (stream["level"].as_str(), stream["namespace"].as_str()),
        (Some("warning"), Some("prod"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_tail_sends_recent_lines_then_each_new_one_once() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let app = TestApp::start(Db::Sqlite).await;
    fixture(&app).await;
    let query = form([
        ("query", r#"{service_name="web"} != "xyz""#),
        ("limit", "2"),
    ]);
    let url = format!(
        "{}/loki/api/v1/tail?{query}",
        app.base.replacen("http", "ws", 1)
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {READER}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut next = async || -> Value {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("a tail message within 10 s")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            panic!("text frames, not {message:?}")
        };
        serde_json::from_str(&text).unwrap()
    };
    let tail_lines = |message: &Value| -> Vec<String> {
        let mut lines: Vec<(String, String)> = message["streams"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["values"].as_array().unwrap().clone())
            .map(|v| {
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        lines.sort();
        lines
            .into_iter()
            .map(|(_, l)| {
                serde_json::from_str::<Value>(&l).unwrap()["message"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    // The newest two matching lines, oldest first.
    let first = next().await;
    assert_eq!(first["dropped_entries"], Value::Null);
    assert_eq!(
        tail_lines(&first),
        ["request handled", "slow upstream \u{1b}[31mred\u{1b}[0m"]
    );
    // Then what is written after the tail opened, once, whatever its timestamp; the rest of
    // the query still applies.
    app.ingest(vec![
        entry("web", "error", "a late arrival", 3000),
        entry("web", "info", "no match here: xyz", 0),
        entry("api", "error", "another service", 0),
    ])
    .await;
    let second = next().await;
    assert_eq!(tail_lines(&second), ["a late arrival"]);
    app.ingest(vec![entry("web", "info", "a third batch", 0)])
        .await;
    assert_eq!(tail_lines(&next().await), ["a third batch"]);

    // Refusals come before the upgrade, as Loki's: a metric query, delay_for over 5.
    for bad in [
        form([("query", r#"count_over_time({a="b"}[1m])"#)]),
        form([("query", r#"{a="b"}"#), ("delay_for", "6")]),
    ] {
        let response = app
            .request(
                Method::GET,
                &format!("/loki/api/v1/tail?{bad}"),
                Some(READER),
            )
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
    drop(socket);
    app.stop().await;
}
