//! Runs the real binaries as processes, for the end-to-end tests and the benchmark programs.

pub mod load;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The token every process started here accepts as admin.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// A built binary of this workspace, next to the test executable's `deps` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo nextest run --workspace` (or cargo build first)",
        path.display()
    );
    path
}

/// An HTTP client. The workspace builds reqwest without a built-in crypto provider (one
/// provider, ring, for everything), so it must be installed before any client is made.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// SIGTERM and wait: the process stops gracefully.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// An aggregator process on its own data directory.
pub struct AggregatorProcess {
    pub child: Child,
    pub port: u16,
    pub ingest_port: u16,
    pub base: String,
    data_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    log: PathBuf,
    adjust: Adjust,
}

/// A change to the aggregator's command before it starts (e.g. resource limits).
type Adjust = std::sync::Arc<dyn Fn(&mut Command) + Send + Sync>;

impl AggregatorProcess {
    /// Starts `logging-aggregator` on `data_dir` and waits until it is ready. `extra_env` adds
    /// or overrides variables; an empty value unsets one.
    pub fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> AggregatorProcess {
        AggregatorProcess::start_with(data_dir, extra_env, |_| {})
    }

    /// As [`AggregatorProcess::start`], with `adjust` applied to the command at every start.
    pub fn start_with(
        data_dir: &Path,
        extra_env: &[(&str, &str)],
        adjust: impl Fn(&mut Command) + Send + Sync + 'static,
    ) -> AggregatorProcess {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let adjust: Adjust = std::sync::Arc::new(adjust);
        let port = free_port();
        let ingest_port = free_port();
        let mut process = AggregatorProcess {
            child: spawn(
                data_dir,
                port,
                ingest_port,
                extra_env,
                &data_dir.join("aggregator.log"),
                &*adjust,
            ),
            port,
            ingest_port,
            base: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_path_buf(),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: data_dir.join("aggregator.log"),
            adjust,
        };
        process.wait_ready();
        process
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the aggregator exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "the aggregator did not start listening; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of a metric's samples (over all label sets) on the aggregator's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let request = http_client()
            .get(format!("{}/metrics", self.base))
            .bearer_auth(ADMIN_TOKEN);
        metric_sum(request, name).await
    }

    /// A GET on the operator API as admin, answered with JSON.
    pub async fn get_json(&self, path_and_query: &str) -> serde_json::Value {
        http_client()
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the aggregator answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// SIGTERM and wait: a graceful stop (the store writes what it holds in memory).
    pub fn stop_gracefully(&mut self) {
        terminate(&mut self.child);
    }

    /// The entries the store holds (`/api/logs/stats`), 0 while it does not answer.
    pub async fn stored_entries(&self) -> u64 {
        let Ok(response) = http_client()
            .get(format!("{}/api/logs/stats", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
        else {
            return 0;
        };
        let stats: serde_json::Value = response.json().await.unwrap_or_default();
        stats["entries"].as_u64().unwrap_or(0)
    }

    /// The development certificates it generated, for an agent.
    pub fn certs_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }

    /// SIGKILL: no shutdown code runs, no buffer is flushed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Changes (or adds) a variable for the next restart.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.extra_env.retain(|(k, _)| k != name);
        self.extra_env.push((name.to_string(), value.to_string()));
    }

    /// Starts again on the same data directory and settings.
    pub fn restart(&mut self) {
        self.kill();
        let env: Vec<(&str, &str)> = self
            .extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.port = free_port();
        self.base = format!("http://127.0.0.1:{}", self.port);
        self.child = spawn(
            &self.data_dir,
            self.port,
            self.ingest_port,
            &env,
            &self.log,
            &*self.adjust,
        );
        self.wait_ready();
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(
    data_dir: &Path,
    port: u16,
    ingest_port: u16,
    extra_env: &[(&str, &str)],
    log: &Path,
    adjust: &(dyn Fn(&mut Command) + Send + Sync),
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = Command::new(binary("logging-aggregator"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATA_DIR", data_dir)
        .env("SERVICE_PORT", port.to_string())
        .env("INGEST_PORT", ingest_port.to_string())
        .env("PROMETHEUS_PORT", "0")
        .env("OTLP_GRPC_PORT", "0")
        .env("FORWARD_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("API_TOKENS", format!("admin:{ADMIN_TOKEN}"))
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    for (k, v) in extra_env {
        // An empty value unsets a variable the helper would set (e.g. API_TOKENS).
        if v.is_empty() {
            command.env_remove(k);
        } else {
            command.env(k, v);
        }
    }
    adjust(&mut command);
    command.spawn().expect("start logging-aggregator")
}

/// The sum of a metric's samples in the Prometheus text `request` answers (0 if it fails).
async fn metric_sum(request: reqwest::RequestBuilder, name: &str) -> f64 {
    let Ok(response) = request.send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An agent process.
pub struct AgentProcess {
    pub child: Child,
    pub metrics_port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `logging-agent` shipping to `aggregator`, with `data_dir` for its checkpoints.
    pub fn start(
        aggregator: &AggregatorProcess,
        data_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> AgentProcess {
        let certs = aggregator.certs_dir();
        let mut env: Vec<(String, String)> = vec![
            (
                "AGGREGATOR_URL".into(),
                format!("https://localhost:{}", aggregator.ingest_port),
            ),
            ("TLS_CA".into(), certs.join("ca.pem").display().to_string()),
            (
                "TLS_CERT".into(),
                certs.join("agent.pem").display().to_string(),
            ),
            (
                "TLS_KEY".into(),
                certs.join("agent-key.pem").display().to_string(),
            ),
            ("AGENT_DATA_DIR".into(), data_dir.display().to_string()),
            ("NODE_NAME".into(), "node-e2e".into()),
            ("LOG_BATCH_TIMEOUT".into(), "0.2".into()),
            ("LOG_FORMAT".into(), "json".into()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        std::fs::create_dir_all(data_dir).expect("agent data dir");
        let metrics_port = free_port();
        let log = data_dir.join("agent.log");
        let agent = AgentProcess {
            child: spawn_agent(&env, metrics_port, &log),
            metrics_port,
            env,
            log,
        };
        agent.wait_ready();
        agent
    }

    /// SIGKILL, then start again with the same settings and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.metrics_port = free_port();
        self.child = spawn_agent(&self.env, self.metrics_port, &self.log);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let exited = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if exited {
                panic!("the agent exited; log:\n{}", self.log_text());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the agent did not start; log:\n{}", self.log_text());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of a metric's samples (over all label sets) on the agent's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        metric_sum(http_client().get(url), name).await
    }

    /// Resident memory, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        proc::status_kib(self.child.id(), "VmRSS:")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_agent(env: &[(String, String)], metrics_port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = Command::new(binary("logging-agent"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AGENT_METRICS_PORT", metrics_port.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("start logging-agent")
}

/// Figures about a running process, from /proc.
pub mod proc {
    /// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `VmHWM:`, `RssAnon:`…); 0 if absent.
    pub fn status_kib(pid: u32, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(pid: u32) -> f64 {
        stat_cpu_seconds(&format!("/proc/{pid}/stat"))
    }

    /// CPU seconds (user + system) in a `stat` file: a process's or one thread's
    /// (`/proc/<pid>/task/<tid>/stat`).
    pub fn stat_cpu_seconds(path: &str) -> f64 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let fields: Vec<&str> = text
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks as f64 / 100.0
    }
}
