//! Receivers that read each body and discard it, answering as the engines do: Loki's push
//! (204), Elasticsearch's `_index_template` and `_bulk` (200 with one item per action, as
//! Elasticsearch answers). Shared by the benchmark programs.

use axum::http::StatusCode;

async fn loki_push(body: axum::body::Bytes) -> StatusCode {
    std::hint::black_box(body.len());
    StatusCode::NO_CONTENT
}

async fn es_template(body: axum::body::Bytes) -> &'static str {
    std::hint::black_box(body.len());
    r#"{"acknowledged":true}"#
}

/// A `_bulk` answer with every item created, of the size Elasticsearch sends.
async fn es_bulk(body: axum::body::Bytes) -> String {
    let actions = newlines(&body) / 2;
    let mut out = String::with_capacity(actions * 200 + 64);
    out.push_str(r#"{"took":5,"errors":false,"items":["#);
    for i in 0..actions {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"create":{"_index":"logs-2026.11.27","_id":"0196f1c2-7a4b-7c3d-9e8f-0123456789ab","_version":1,"result":"created","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":0,"_primary_term":1,"status":201}}"#);
    }
    out.push_str("]}");
    out
}

fn newlines(body: &[u8]) -> usize {
    body.iter().filter(|&&b| b == b'\n').count()
}

/// Serves Loki's push and Elasticsearch's template and bulk APIs on `listener`.
pub fn serve(listener: tokio::net::TcpListener) {
    let app = axum::Router::new()
        .route("/loki/api/v1/push", axum::routing::post(loki_push))
        .route("/_index_template/{name}", axum::routing::put(es_template))
        .route("/_bulk", axum::routing::post(es_bulk))
        // Loki and Elasticsearch take bodies of 100 MB; axum's default limit is 2 MB.
        .layer(axum::extract::DefaultBodyLimit::disable());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}
