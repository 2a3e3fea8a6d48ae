//! Starts a whole aggregator in-process for each test, against SQLite or a fresh PostgreSQL
//! database, and gives the test a client that speaks its API.

use std::path::PathBuf;
use std::time::Duration;

use logging_aggregator::app::{self, Running};
use logging_aggregator::config::Config;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

pub const ADMIN: &str = "admin-token-for-tests";
pub const READER: &str = "reader-token-for-tests";
pub const WRITER: &str = "writer-token-for-tests";

/// Which relational store a test runs against.
#[derive(Clone, Copy, Debug)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs each listed async test function once per database: `name_sqlite`, `name_postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::support::postgres_or_skip() {
                        super::$name(db).await
                    }
                }
            )*
        }
    };
}

/// The server the PostgreSQL tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `Some(Db::Postgres)` if PostgreSQL is reachable; with `CI` set its absence fails the test
/// instead of skipping it.
pub fn postgres_or_skip() -> Option<Db> {
    let url = postgres_admin_url();
    let reachable = std::net::TcpStream::connect_timeout(
        &host_port(&url)
            .parse()
            .expect("TEST_DATABASE_URL host:port"),
        Duration::from_secs(2),
    )
    .is_ok();
    if reachable {
        return Some(Db::Postgres);
    }
    if std::env::var_os("CI").is_some() {
        panic!("PostgreSQL is not reachable at {url}, and CI is set: start it (see .ci/run)");
    }
    eprintln!("skipping: PostgreSQL is not reachable at {url}");
    None
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A fresh, empty PostgreSQL database for one test, dropped when the test ends.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::Connection;
        let admin = postgres_admin_url();
        let name = format!("lt_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = postgres_admin_url();
        let name = self.name.clone();
        // Best effort, on a thread of its own: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// A configuration for tests: ephemeral ports, fast refresh, known tokens.
pub fn test_config(data_dir: PathBuf) -> Config {
    Config {
        data_dir,
        service_port: 0,
        ingest_port: 0,
        prometheus_port: 0,
        otlp_grpc_port: 0,
        forward_port: 0,
        bind_address: "127.0.0.1".into(),
        index_refresh_interval_ms: 50,
        index_writer_memory_mb: 32,
        log_processing_workers: 1,
        api_tokens: Some(format!("admin:{ADMIN},reader:{READER},writer:{WRITER}")),
        ..Config::default()
    }
}

/// One running aggregator and what a test needs to talk to it.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub db: Db,
    pub pg: Option<PgDatabase>,
}

impl TestApp {
    pub async fn start(db: Db) -> TestApp {
        TestApp::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: Db, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(PgDatabase::create().await),
        };
        let mut config = test_config(dir.path().to_path_buf());
        config.database_url = pg.as_ref().map(|p| p.url.clone());
        adjust(&mut config);
        let running = app::start(config).await.expect("aggregator starts");
        TestApp {
            base: format!("http://{}", running.api_addr),
            client: reqwest::Client::new(),
            running: Some(running),
            dir,
            db,
            pg,
        }
    }

    /// Stops gracefully and starts again on the same data (and database).
    pub async fn restart(&mut self, adjust: impl FnOnce(&mut Config)) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        let mut config = test_config(self.dir.path().to_path_buf());
        config.database_url = self.pg.as_ref().map(|p| p.url.clone());
        adjust(&mut config);
        let running = app::start(config).await.expect("aggregator restarts");
        self.base = format!("http://{}", running.api_addr);
        self.running = Some(running);
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut request = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// GET as admin, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .request(Method::GET, path, Some(ADMIN))
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// POST JSON as admin.
    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path, Some(ADMIN))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// POSTs entries with `refresh=wait_for` and returns the ids.
    pub async fn ingest(&self, entries: Vec<Value>) -> Vec<String> {
        let response = self
            .post("/api/logs?refresh=wait_for", &Value::Array(entries))
            .await;
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["rejected"], serde_json::json!([]), "{body}");
        body["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|id| id.as_str().expect("id").to_string())
            .collect()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("text")
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// A log entry with the required fields, at `seconds_ago` before now.
///
/// An entry up to an hour old never falls on yesterday: just after midnight UTC it is set at
/// midnight instead, so a test's recent entries share one day partition whatever the time.
pub fn entry(service: &str, level: &str, message: &str, seconds_ago: i64) -> Value {
    let now = logging_common::Timestamp::now();
    let mut ts = now.saturating_add_nanos(-seconds_ago * 1_000_000_000);
    let midnight = now.day() * 86_400 * 1_000_000_000;
    if (0..=3600).contains(&seconds_ago) && ts.as_nanos() < midnight {
        ts = logging_common::Timestamp::from_nanos(midnight);
    }
    serde_json::json!({
        "timestamp": ts.to_rfc3339(),
        "level": level,
        "service": service,
        "message": message,
    })
}

/// The messages of a listing's items, in order.
pub fn messages(body: &Value) -> Vec<&str> {
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["message"].as_str().expect("message"))
        .collect()
}

/// Asserts a problem+json answer with `status`, returning its body.
pub async fn expect_problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status.as_u16());
    body
}

/// Ingests `rounds` requests of `per` entries of `service` (messages `<label> <round>-<i>`),
/// returning the ids.
pub async fn ingest_rounds(
    app: &TestApp,
    service: &str,
    label: &str,
    rounds: usize,
    per: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for round in 0..rounds {
        ids.extend(
            app.ingest(
                (0..per)
                    .map(|i| entry(service, "info", &format!("{label} {round}-{i}"), 0))
                    .collect(),
            )
            .await,
        );
    }
    ids
}

/// What `/api/logs/stats` says about the sink `name`.
pub async fn sink_report(app: &TestApp, name: &str) -> Value {
    let stats = app.get_json("/api/logs/stats").await;
    stats["sinks"]
        .as_array()
        .and_then(|sinks| sinks.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} sink in {stats}"))
}

/// Waits (up to 10 s) until the sink's report satisfies `done`; returns the last report.
pub async fn wait_for_sink(app: &TestApp, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut report = Value::Null;
    for _ in 0..200 {
        report = sink_report(app, name).await;
        if done(&report) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    report
}

/// A change to the test configuration, and the setting `validate` must name for it.
pub type Refusal = (Box<dyn Fn(&mut Config)>, &'static str);

/// Asserts that each change makes `Config::validate` fail naming its setting.
pub fn assert_refused(cases: Vec<Refusal>) {
    for (adjust, name) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path().to_path_buf());
        adjust(&mut config);
        let error = config.validate().expect_err(name);
        assert_eq!(error.name, name, "{error}");
    }
}

/// A local HTTP server standing in for an engine (Loki, Elasticsearch), which a test can take
/// away (connections refused, as when the engine is down) and bring back on the same address.
pub struct LocalServer {
    pub url: String,
    address: std::net::SocketAddr,
    router: axum::Router,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LocalServer {
    pub async fn start(router: axum::Router) -> LocalServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let mut server = LocalServer {
            url: format!("http://{address}"),
            address,
            router,
            task: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let router = self.router.clone();
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
    }

    pub async fn go_away(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub async fn come_back(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.address)
            .await
            .expect("bind again");
        self.serve(listener);
    }
}

/// Asserts the sink is up, has delivered `count` entries, and says so in `/metrics`.
pub async fn assert_delivered(app: &TestApp, name: &str, count: u64) {
    let report = sink_report(app, name).await;
    assert_eq!(report["status"], "up", "{report}");
    assert_eq!(report["delivered"], count, "{report}");
    let metrics = app.metrics().await;
    let line = format!("logging_aggregator_sink_entries_total{{sink=\"{name}\"}} {count}");
    assert!(metrics.contains(&line), "{line} not in {metrics}");
}

/// Waits until the sink reports `failing` and asserts it is at least `min_lag` entries behind
/// with a last error containing `error`.
pub async fn assert_failing(app: &TestApp, name: &str, min_lag: u64, error: &str) {
    let report = wait_for_sink(app, name, |r| r["status"] == "failing").await;
    assert_eq!(report["status"], "failing", "{report}");
    assert!(
        report["lag_entries"].as_u64().unwrap() >= min_lag,
        "{report}"
    );
    assert!(
        report["last_error"].as_str().unwrap().contains(error),
        "{report}"
    );
}

/// Every stored entry (oldest first), once at least `count` are searchable.
pub async fn stored_entries(app: &TestApp, count: usize) -> Vec<Value> {
    let mut items = Vec::new();
    for _ in 0..200 {
        let page = app.get_json("/api/logs?limit=1000&order=asc").await;
        items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= count {
            return items;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("only {} of {count} entries: {items:#?}", items.len());
}

/// A client of `app`'s mTLS ingest port presenting its development agent certificate, and
/// that port's base URL.
pub fn agent_client(app: &TestApp) -> (reqwest::Client, String) {
    let paths = logging_aggregator::certs::CertPaths::in_dir(&app.dir.path().join("certs"));
    logging_common::tls::install_crypto_provider();
    let config =
        logging_common::tls::client_config(&paths.ca, &paths.agent, &paths.agent_key).unwrap();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap();
    let port = app.running.as_ref().unwrap().ingest_addr.port();
    (client, format!("https://localhost:{port}"))
}

/// Runs a Python `script` with `args` under `TEST_PYTHON` (a Python with the real client
/// libraries, as `.ci/run` makes it) and returns what it printed; a failing script fails the
/// test with its stderr.
pub async fn run_python(script: &str, args: &[&str]) -> Vec<u8> {
    let python = std::env::var("TEST_PYTHON")
        .expect("TEST_PYTHON: a Python with the client libraries installed (.ci/run makes one)");
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}
