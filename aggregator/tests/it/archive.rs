//! The archive (`ARCHIVE_URL`): a day goes to object storage and is dropped locally, queries
//! over it say so, and a restore brings back the same answers, read-only; against a directory
//! and against a real S3-compatible server (moto, from `TEST_PYTHON`'s environment).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{ADMIN, Db, READER, TestApp, entry};

const MARKER: &str = "pelicanledger";
const DAY: i64 = 86_400;

/// The day `days_ago`, as the archive names it, and its bounds in RFC 3339.
fn day_of(days_ago: i64) -> (String, String, String) {
    let now = logging_common::Timestamp::now();
    let day = now.day() - days_ago;
    let start = logging_common::Timestamp::from_nanos(day * DAY * 1_000_000_000);
    let end = logging_common::Timestamp::from_nanos((day + 1) * DAY * 1_000_000_000);
    (
        start.to_rfc3339()[..10].to_string(),
        start.to_rfc3339(),
        end.to_rfc3339(),
    )
}

/// An entry `n` seconds after noon of the day `days_ago` (clear of midnight whenever the
/// test runs).
fn old_entry(level: &str, message: &str, days_ago: i64, n: i64) -> Value {
    let now = logging_common::Timestamp::now();
    let noon = (now.day() - days_ago) * DAY + DAY / 2;
    let seconds_ago = now.as_nanos() / 1_000_000_000 - (noon + n);
    entry("billing", level, message, seconds_ago)
}

/// What a test compares before archiving and after restoring.
async fn answers(app: &TestApp, start: &str, end: &str) -> (Value, Vec<String>, Value) {
    let found = app
        .get_json(&format!(
            "/api/search?q={MARKER}&limit=1000&start={start}&end={end}"
        ))
        .await;
    let mut ids: Vec<String> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let analytics = app
        .get_json(&format!(
            "/api/analytics?start={start}&end={end}&interval=1h"
        ))
        .await;
    (found["total"].clone(), ids, analytics["levels"].clone())
}

/// Archiving to `url` every second, of days older than one.
fn archiving(url: &str) -> impl FnOnce(&mut logging_aggregator::config::Config) + use<> {
    let url = url.to_string();
    move |config| {
        config.archive_url = Some(url);
        config.archive_after_days = 1;
        config.archive_interval = 1;
    }
}

/// The status of a bodiless call.
async fn status(app: &TestApp, method: Method, path: &str, token: &str) -> StatusCode {
    app.request(method, path, Some(token))
        .send()
        .await
        .unwrap()
        .status()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ingests an old day and today's entries, archives the old day through `url`, and checks the
/// whole cycle: gone locally with a caveat, restored with the same answers, deletes applied,
/// dropped again.
async fn archive_and_restore(url: String) {
    let mut app = TestApp::start(Db::Sqlite).await;
    let mut old: Vec<Value> = (0..300)
        .map(|n| {
            let level = if n % 10 == 0 { "error" } else { "info" };
            old_entry(level, &format!("invoice {n} sent {MARKER}"), 3, n)
        })
        .collect();
    old.push(entry("billing", "warn", "today's line", 10));
    app.ingest(old).await;
    let (day, start, end) = day_of(3);
    let restore_path = format!("/api/archive/{day}/restore");
    let before = answers(&app, &start, &end).await;
    assert_eq!(before.0, 300);

    // Archiving on: the day goes to the archive and leaves the store.
    app.restart(archiving(&url)).await;
    wait_until("the day archived and dropped locally", async || {
        let listed = app.get_json("/api/archive").await;
        let archived = listed["days"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["day"] == day.as_str()));
        let stats = app.get_json("/api/logs/stats").await;
        let local = stats["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["day"] == day.as_str());
        archived && !local
    })
    .await;
    let listed = app.get_json("/api/archive").await;
    let archived = &listed["days"][0];
    assert_eq!(archived["entries"], 300, "{listed}");
    assert_eq!(archived["restored"], false);
    let gone = app
        .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
        .await;
    assert_eq!(gone["total"], 0);
    let caveat = gone["caveats"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        caveat.contains(&day) && caveat.contains("not restored"),
        "{gone}"
    );
    // Today's entries are untouched, and a range without the day has no caveat.
    let today = app.get_json("/api/search?q=today").await;
    assert_eq!(today["total"], 1);
    let (_, today_start, _) = day_of(0);
    let recent = app
        .get_json(&format!("/api/logs?start={today_start}"))
        .await;
    assert!(recent.get("caveats").is_none(), "{recent}");

    // A reader may list, not restore.
    assert_eq!(
        status(&app, Method::POST, &restore_path, READER).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&app, Method::POST, &restore_path, ADMIN).await,
        StatusCode::OK
    );
    let after = answers(&app, &start, &end).await;
    assert_eq!(after, before, "the restored day answers as before");
    let page = app
        .get_json(&format!(
            "/api/search?q={MARKER}&limit=1&start={start}&end={end}"
        ))
        .await;
    assert_eq!(page["items"][0]["archived"], true, "{page}");
    assert!(page.get("caveats").is_none(), "{page}");
    let one = app
        .get_json(&format!(
            "/api/logs/{}",
            page["items"][0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(one["archived"], true, "{one}");
    let listed = app.get_json("/api/archive").await;
    assert_eq!(listed["days"][0]["restored"], true);
    // Loki's query API too: the restored entries' streams carry archived="true".
    let loki = app
        .get_json(&format!(
            "/loki/api/v1/query_range?query=%7Bservice_name%3D%22billing%22%7D&start={}&end={}&limit=5",
            crate::search::urlencode(&start),
            crate::search::urlencode(&end)
        ))
        .await;
    let stream = &loki["data"]["result"][0]["stream"];
    assert_eq!(stream["archived"], "true", "{loki}");
    let audit = app.get_json("/api/audit?action=archive.restored").await;
    assert_eq!(audit["items"][0]["entity_id"], day.as_str(), "{audit}");

    // Deletes apply to a restored day.
    let id = page["items"][0]["id"].as_str().unwrap().to_string();
    assert!(
        status(&app, Method::DELETE, &format!("/api/logs/{id}"), ADMIN)
            .await
            .is_success()
    );
    let fewer = app
        .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
        .await;
    assert_eq!(fewer["total"], 299);

    // Survives a restart as restored; then dropped again on request.
    app.restart(archiving(&url)).await;
    let kept = app
        .get_json(&format!(
            "/api/search?q={MARKER}&limit=1&start={start}&end={end}"
        ))
        .await;
    assert_eq!(kept["total"], 299);
    assert_eq!(kept["items"][0]["archived"], true);
    assert_eq!(
        status(&app, Method::DELETE, &restore_path, ADMIN).await,
        StatusCode::OK
    );
    let gone = app
        .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
        .await;
    assert_eq!(gone["total"], 0);
    assert!(
        gone["caveats"][0]["reason"]
            .as_str()
            .unwrap()
            .contains(&day)
    );
    assert_eq!(
        status(&app, Method::POST, "/api/archive/2001-01-01/restore", ADMIN).await,
        StatusCode::NOT_FOUND
    );

    // Retention applies to a restored day as to any other (the archive keeps it).
    assert_eq!(
        status(&app, Method::POST, &restore_path, ADMIN).await,
        StatusCode::OK
    );
    let archive_then_retention = archiving(&url);
    app.restart(move |config| {
        archive_then_retention(config);
        config.log_retention_days = 2;
    })
    .await;
    wait_until("the restored day dropped by retention", async || {
        let found = app
            .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
            .await;
        found["total"] == 0
    })
    .await;
    let listed = app.get_json("/api/archive").await;
    assert_eq!(listed["days"][0]["restored"], false, "{listed}");
    assert_eq!(listed["days"][0]["entries"], 300);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_archived_to_a_directory_comes_back_with_the_same_answers() {
    let archive = tempfile::tempdir().unwrap();
    archive_and_restore(format!("file://{}", archive.path().display())).await;
    // The bundle: the parts and a manifest that says what they are.
    let (day, _, _) = day_of(3);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(archive.path().join(&day).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["entries"], 300);
    for part in manifest["parts"].as_array().unwrap() {
        let bytes = std::fs::read(
            archive
                .path()
                .join(&day)
                .join(part["name"].as_str().unwrap()),
        )
        .unwrap();
        assert_eq!(bytes.len() as u64, part["bytes"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_keeps_the_day_here_and_lists_no_half_bundle() {
    let archive = tempfile::tempdir().unwrap();
    let (day, start, end) = day_of(2);
    // The manifest cannot be written (a directory stands where it goes): the parts go up,
    // the commit point fails.
    std::fs::create_dir_all(archive.path().join(&day).join("manifest.json")).unwrap();
    let url = format!("file://{}", archive.path().display());
    let app = TestApp::start_with(Db::Sqlite, archiving(&url)).await;
    let old: Vec<Value> = (0..50)
        .map(|n| old_entry("info", &format!("refund {n} {MARKER}"), 2, n))
        .collect();
    app.ingest(old).await;
    wait_until("an archive attempt failed", async || {
        app.metrics().await.lines().any(|l| {
            l.starts_with("logging_aggregator_archive_failures_total") && !l.ends_with(" 0")
        })
    })
    .await;
    let listed = app.get_json("/api/archive").await;
    assert_eq!(listed["days"], json!([]), "a half bundle is listed");
    let found = app
        .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
        .await;
    assert_eq!(found["total"], 50, "the day stays here");
    // The store reachable again: the next round finishes the bundle.
    std::fs::remove_dir(archive.path().join(&day).join("manifest.json")).unwrap();
    wait_until("archived once the store takes the manifest", async || {
        let listed = app.get_json("/api/archive").await;
        listed["days"][0]["entries"] == 50
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_keeps_a_day_for_archive_retention_days() {
    let archive = tempfile::tempdir().unwrap();
    let url = format!("file://{}", archive.path().display());
    let mut app = TestApp::start_with(Db::Sqlite, archiving(&url)).await;
    let old: Vec<Value> = (0..20)
        .map(|n| old_entry("info", &format!("payout {n} {MARKER}"), 4, n))
        .collect();
    app.ingest(old).await;
    let (day, _, _) = day_of(4);
    wait_until("the day archived", async || {
        app.get_json("/api/archive").await["days"][0]["entries"] == 20
    })
    .await;
    // Kept for three days: the four-day-old bundle goes, manifest first.
    let three_days = archiving(&url);
    app.restart(move |config| {
        three_days(config);
        config.archive_retention_days = 3;
    })
    .await;
    wait_until("the day expired from the archive", async || {
        app.get_json("/api/archive").await["days"] == json!([])
    })
    .await;
    let left: Vec<_> = std::fs::read_dir(archive.path().join(&day))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_archive_url_is_refused_naming_it() {
    for (url, after, reason) in [
        (
            "ftp://host/x",
            1,
            "expected s3://bucket/prefix or file:///path",
        ),
        ("s3:///prefix", 1, "names no bucket"),
        ("file://relative", 1, "absolute path"),
        (
            "file:///tmp/archive",
            30,
            "must be less than LOG_RETENTION_DAYS",
        ),
        ("file:///tmp/archive", 5, "more than ARCHIVE_AFTER_DAYS"),
    ] {
        let config = logging_aggregator::config::Config {
            archive_url: Some(url.into()),
            archive_after_days: after,
            archive_retention_days: if after == 5 { 5 } else { 0 },
            ..logging_aggregator::config::Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(reason), "{url}: {error}");
        let name = match after {
            30 => "ARCHIVE_AFTER_DAYS",
            5 => "ARCHIVE_RETENTION_DAYS",
            _ => "ARCHIVE_URL",
        };
        assert!(error.contains(name), "{url}: {error}");
    }
}

/// moto's S3 server, started from the Python environment of `TEST_PYTHON`.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Moto {
    let python = std::env::var("TEST_PYTHON")
        .expect("TEST_PYTHON: a Python with moto[server] installed (.ci/run makes one)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start moto's S3 server");
    let endpoint = format!("http://127.0.0.1:{port}");
    logging_common::tls::install_crypto_provider();
    let server = Moto { child, endpoint };
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    // Creating the bucket is the readiness probe.
    while client
        .put(format!("{}/logs-archive", server.endpoint))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server
}

#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_archived_to_s3_comes_back_with_the_same_answers() {
    let server = moto().await;
    // SAFETY: each test runs in its own process (cargo nextest); nothing else reads the
    // environment while these are set, before the aggregator starts.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", &server.endpoint);
        std::env::set_var("AWS_ACCESS_KEY_ID", "moto");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "moto");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    archive_and_restore("s3://logs-archive/aggregator-a".into()).await;
    // What moto holds: the day's manifest and parts under the prefix.
    let (day, _, _) = day_of(3);
    let listing = reqwest::Client::new()
        .get(format!(
            "{}/logs-archive?list-type=2&prefix=aggregator-a/{day}/",
            server.endpoint
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains("manifest.json") && listing.contains(".part"),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_altered_in_the_archive_is_not_restored() {
    let archive = tempfile::tempdir().unwrap();
    let url = format!("file://{}", archive.path().display());
    let app = TestApp::start_with(Db::Sqlite, archiving(&url)).await;
    let old: Vec<Value> = (0..20)
        .map(|n| old_entry("info", &format!("chargeback {n} {MARKER}"), 2, n))
        .collect();
    app.ingest(old).await;
    let (day, start, end) = day_of(2);
    wait_until("the day archived", async || {
        app.get_json("/api/archive").await["days"][0]["entries"] == 20
    })
    .await;
    // Grown by a byte: refused before it is read.
    let part = std::fs::read_dir(archive.path().join(&day))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&part).unwrap();
    bytes.push(0);
    std::fs::write(&part, &bytes).unwrap();
    let restore = format!("/api/archive/{day}/restore");
    let refused = status(&app, Method::POST, &restore, ADMIN).await;
    assert_eq!(refused, StatusCode::INTERNAL_SERVER_ERROR);
    // Same size, one byte changed: refused by its SHA-256.
    bytes.pop();
    bytes[100] ^= 1;
    std::fs::write(&part, &bytes).unwrap();
    let refused = status(&app, Method::POST, &restore, ADMIN).await;
    assert_eq!(refused, StatusCode::INTERNAL_SERVER_ERROR);
    let found = app
        .get_json(&format!("/api/search?q={MARKER}&start={start}&end={end}"))
        .await;
    assert_eq!(found["total"], 0, "nothing of it was opened");
    app.stop().await;
}
