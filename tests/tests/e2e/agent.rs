//! The agent and the aggregator together, as processes: every line written arrives exactly
//! once, whatever happens to the files and to the processes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, http_client};
use serde_json::Value;

const POD: &str = "shop_web-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6";

fn now_rfc3339() -> String {
    logging_common::Timestamp::now().to_rfc3339()
}

/// Appends CRI lines whose bodies are JSON carrying a sequence number.
pub(crate) fn write_cri(path: &Path, from: u64, to: u64) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut text = String::new();
    for seq in from..to {
        text.push_str(&format!(
            "{} stdout F {{\"level\":\"info\",\"msg\":\"request {seq} served\",\"seq\":{seq}}}\n",
            now_rfc3339()
        ));
    }
    file.write_all(text.as_bytes()).unwrap();
}

pub(crate) fn pod_log(root: &Path, container: &str, restart: u32) -> PathBuf {
    let dir = root.join("var/log/pods").join(POD).join(container);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{restart}.log"))
}

/// Every stored entry (newest first pages walked to the end).
async fn all_entries(aggregator: &AggregatorProcess) -> Vec<Value> {
    let client = http_client();
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/api/logs?limit=1000", aggregator.base);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let Ok(response) = client.get(url).bearer_auth(ADMIN_TOKEN).send().await else {
            return out;
        };
        let page: Value = response.json().await.unwrap_or_default();
        out.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// How long nothing new must arrive before "everything arrived" is believed: more than the
/// agent's rescan, batch timeout and retry backoff, so a late duplicate (a batch re-sent
/// after a restart) would be in what the test checks.
const QUIET: Duration = Duration::from_secs(3);

/// Waits until `count` entries are stored and then nothing more arrives for [`QUIET`] (or
/// fails, showing what arrived).
async fn wait_for_count(aggregator: &AggregatorProcess, count: usize) -> Vec<Value> {
    let mut entries = Vec::new();
    for _ in 0..600 {
        entries = all_entries(aggregator).await;
        if entries.len() >= count {
            let mut settled = std::time::Instant::now();
            while settled.elapsed() < QUIET {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = all_entries(aggregator).await;
                if now.len() != entries.len() {
                    settled = std::time::Instant::now();
                }
                entries = now;
            }
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = sequences(&entries);
    let missing: Vec<u64> = (0..count as u64)
        .filter(|s| !seen.contains_key(s))
        .collect();
    panic!(
        "only {} of {count} entries arrived; missing {}: {:?}…",
        entries.len(),
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The `seq` of every entry, counted.
fn sequences(entries: &[Value]) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for entry in entries {
        if let Some(seq) = entry["context"]["seq"].as_u64() {
            *seen.entry(seq).or_insert(0) += 1;
        }
    }
    seen
}

fn assert_exactly_once(entries: &[Value], total: u64) {
    let seen = sequences(entries);
    let missing: Vec<u64> = (0..total).filter(|s| !seen.contains_key(s)).collect();
    let doubled: Vec<(&u64, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} lines never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(doubled.is_empty(), "lines stored twice: {doubled:?}");
    assert_eq!(seen.len() as u64, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_arrives_once_through_rotation_copytruncate_and_sigkills() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let mut aggregator =
        AggregatorProcess::start(&aggregator_dir, &[("INDEX_REFRESH_INTERVAL_MS", "100")]);
    let paths = format!(
        "{}/var/log/pods/*/*/*.log,{}/app/*.log",
        root.path().display(),
        root.path().display()
    );
    let log = pod_log(root.path(), "nginx", 0);
    write_cri(&log, 0, 300);
    let mut agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str())],
    );
    let entries = wait_for_count(&aggregator, 300).await;
    assert_exactly_once(&entries, 300);

    // The metadata of a kubelet pod log.
    let entry = &entries[0];
    assert_eq!(entry["service"], "web");
    assert_eq!(entry["context"]["stream"], "stdout");
    assert_eq!(
        entry["context"]["agent"], "logging-agent",
        "the aggregator's record of who sent it"
    );
    let k8s = &entry["context"]["kubernetes"];
    assert_eq!(k8s["namespace"], "shop");
    assert_eq!(k8s["pod"], "web-7d4b9c5f6-x2k9p");
    assert_eq!(k8s["pod_uid"], "0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6");
    assert_eq!(k8s["container"], "nginx");
    assert_eq!(k8s["restart_count"], 0);
    assert_eq!(k8s["node"], "node-e2e");

    // Kubelet rotation: the file is renamed away, a new one takes its name; lines written to
    // the old one just before the rename are not lost.
    write_cri(&log, 300, 400);
    std::fs::rename(&log, log.with_extension("log.20261127-100000")).unwrap();
    write_cri(&log, 400, 500);

    // The agent is killed mid-stream and restarted.
    agent.restart();
    write_cri(&log, 500, 600);
    agent.kill();
    write_cri(&log, 600, 700);
    agent.restart();

    // The aggregator is killed too; the agent keeps retrying.
    aggregator.kill();
    write_cri(&log, 700, 800);
    tokio::time::sleep(Duration::from_millis(500)).await;
    aggregator.restart();
    write_cri(&log, 800, 900);
    if std::env::var_os("E2E_DEBUG").is_some() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!("agent log:\n{}", agent.log_text());
    }
    let entries = wait_for_count(&aggregator, 900).await;
    assert_exactly_once(&entries, 900);

    // copytruncate: the content is copied aside and the file emptied in place.
    let app = root.path().join("app/server.log");
    std::fs::create_dir_all(app.parent().unwrap()).unwrap();
    let mut file = std::fs::File::create(&app).unwrap();
    for seq in 900..1000 {
        writeln!(
            file,
            "{{\"level\":\"warn\",\"msg\":\"plain file line\",\"seq\":{seq}}}"
        )
        .unwrap();
    }
    drop(file);
    wait_for_count(&aggregator, 1000).await;
    std::fs::copy(&app, app.with_extension("log.1")).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&app).unwrap();
    file.set_len(0).unwrap();
    drop(file);
    let mut file = std::fs::OpenOptions::new().append(true).open(&app).unwrap();
    for seq in 1000..1100 {
        writeln!(
            file,
            "{{\"level\":\"error\",\"msg\":\"after truncation\",\"seq\":{seq}}}"
        )
        .unwrap();
    }
    drop(file);
    let entries = wait_for_count(&aggregator, 1100).await;
    assert_exactly_once(&entries, 1100);
    let plain = entries
        .iter()
        .find(|e| e["context"]["seq"] == 1050)
        .unwrap();
    assert_eq!(plain["service"], "app");
    assert_eq!(plain["level"], "error");
    assert!(
        plain["context"]["file"]
            .as_str()
            .unwrap()
            .ends_with("app/server.log")
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_and_stack_traces_arrive_joined_and_secrets_redacted() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let aggregator =
        AggregatorProcess::start(&aggregator_dir, &[("INDEX_REFRESH_INTERVAL_MS", "100")]);
    let log = pod_log(root.path(), "api", 2);
    let t = now_rfc3339();
    let mut text = String::new();
    // A long line split by the runtime into CRI pieces, with a stderr line in between.
    text.push_str(&format!("{t} stdout P {{\"msg\":\"a long line \n"));
    text.push_str(&format!("{t} stderr F ERROR something failed\n"));
    text.push_str(&format!(
        "{t} stderr F java.lang.IllegalStateException: cart is empty\n"
    ));
    text.push_str(&format!(
        "{t} stderr F \tat com.example.Shop.checkout(Shop.java:42)\n"
    ));
    text.push_str(&format!(
        "{t} stderr F \tat com.example.Api.handle(Api.java:7)\n"
    ));
    text.push_str(&format!("{t} stdout F joined at last\",\"seq\":1}}\n"));
    text.push_str(&format!(
        "{t} stdout F login user=bob password=hunter2 Authorization: Bearer abc.def.ghi\n"
    ));
    std::fs::write(&log, text).unwrap();
    let docker = root.path().join("docker/x-json.log");
    std::fs::create_dir_all(docker.parent().unwrap()).unwrap();
    let piece = "z".repeat(16 * 1024);
    std::fs::write(
        &docker,
        format!(
            "{{\"log\":\"{piece}\",\"stream\":\"stdout\",\"time\":\"{t}\"}}\n{{\"log\":\"end\\n\",\"stream\":\"stdout\",\"time\":\"{t}\"}}\n"
        ),
    )
    .unwrap();
    let paths = format!(
        "{}/var/log/pods/*/*/*.log,{}/docker/*.log",
        root.path().display(),
        root.path().display()
    );
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str())],
    );
    let entries = wait_for_count(&aggregator, 5).await;
    let messages: Vec<&str> = entries
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.contains(&"a long line joined at last"),
        "{messages:#?}"
    );
    let trace = messages
        .iter()
        .find(|m| m.starts_with("java.lang.IllegalStateException"))
        .unwrap();
    assert!(
        trace.ends_with("(Api.java:7)") && trace.lines().count() == 3,
        "{trace}"
    );
    let error = entries
        .iter()
        .find(|e| e["message"] == "ERROR something failed")
        .unwrap();
    assert_eq!(error["level"], "error");
    assert_eq!(error["context"]["stream"], "stderr");
    assert_eq!(error["context"]["kubernetes"]["restart_count"], 2);
    let secret = entries
        .iter()
        .find(|e| e["message"].as_str().unwrap().starts_with("login"))
        .unwrap();
    assert_eq!(
        secret["message"],
        "login user=bob password=[REDACTED] Authorization: Bearer [REDACTED]"
    );
    assert_eq!(
        secret["context"]["redacted"],
        serde_json::json!(["bearer_token", "secret"])
    );
    let long = entries
        .iter()
        .find(|e| e["message"].as_str().unwrap().starts_with("zzz"))
        .unwrap();
    assert_eq!(long["message"].as_str().unwrap().len(), 16 * 1024 + 3);
    assert_eq!(entries.len(), 5, "nothing else, nothing twice");
    drop(agent);
}

/// Plain lines of common formats get their level, a stack trace with no stated level is an
/// error, and an operator's parser reads the container it selects (and only that one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_are_read_from_real_world_formats_and_from_an_operators_parser() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let aggregator =
        AggregatorProcess::start(&aggregator_dir, &[("INDEX_REFRESH_INTERVAL_MS", "100")]);
    let t = now_rfc3339();
    let cri = |bodies: &[&str]| {
        bodies
            .iter()
            .map(|b| format!("{t} stdout F {b}\n"))
            .collect::<String>()
    };
    std::fs::write(
        pod_log(root.path(), "app", 0),
        cri(&[
            "2026-11-30 19:04:29,071 - WARN  [QuorumPeer[myid=1]:Follower@96] - Exception when following the leader",
            "[Mon Nov 30 04:47:44 2026] [error] [client 10.0.0.7] File does not exist: /var/www/favicon.ico",
            "03-17 16:13:38.811  1702  2395 W WindowManager: Slow operation",
            "2026-12-01 12:00:06.123 UTC [77] ERROR:  duplicate key value violates unique constraint",
            "fail: Microsoft.AspNetCore.Server.Kestrel[13]",
            "Traceback (most recent call last):",
            "  File \"/app/main.py\", line 3, in <module>",
            "ZeroDivisionError: division by zero",
            "batch done: 0 errors, error_count=0, retrying after error",
            "something went wrong",
            "\tat com.example.Shop.checkout(Shop.java:42)",
        ]),
    )
    .unwrap();
    // The operator's format: `<time> |<LEVEL>| <thread> :: <message>`, only for `legacy`.
    let legacy = "01/12/2026 12:00:00.250 |W| worker-3 :: disk 91% full";
    std::fs::write(
        pod_log(root.path(), "legacy", 0),
        cri(&[legacy, "no match here, ERROR in plain words"]),
    )
    .unwrap();
    std::fs::write(pod_log(root.path(), "other", 0), cri(&[legacy])).unwrap();
    let parsers = serde_json::json!([{
        "name": "legacy-billing",
        "namespace": "shop",
        "container": "legacy",
        "regex": r"^(?P<timestamp>\S+ \S+) \|(?P<level>\w)\| (?P<thread>\S+) :: (?P<message>.*)$",
        "timestamp_format": "%d/%m/%Y %H:%M:%S%.3f",
    }])
    .to_string();
    let paths = format!("{}/var/log/pods/*/*/*.log", root.path().display());
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[
            ("AGENT_PATHS", paths.as_str()),
            ("AGENT_PARSERS", parsers.as_str()),
        ],
    );
    let entries = wait_for_count(&aggregator, 11).await;
    let level_of = |start: &str| {
        let found: Vec<&Value> = entries
            .iter()
            .filter(|e| e["message"].as_str().unwrap().starts_with(start))
            .collect();
        assert_eq!(found.len(), 1, "{start}: {entries:#?}");
        found[0]["level"].as_str().unwrap().to_string()
    };
    assert_eq!(level_of("2026-11-30 19:04:29,071"), "warning");
    assert_eq!(level_of("[Mon Nov 30"), "error");
    assert_eq!(level_of("03-17 16:13:38.811"), "warning");
    assert_eq!(level_of("2026-12-01 12:00:06.123 UTC"), "error");
    assert_eq!(level_of("fail: Microsoft"), "error");
    assert_eq!(level_of("Traceback"), "error");
    assert_eq!(level_of("batch done"), "info");
    assert_eq!(level_of("something went wrong"), "error");
    assert_eq!(level_of("no match here"), "error");
    // The parser's container: fields from the groups, the time from the format.
    let parsed = entries
        .iter()
        .find(|e| e["message"] == "disk 91% full")
        .unwrap();
    assert_eq!(parsed["level"], "warning");
    assert_eq!(parsed["timestamp"], "2026-12-01T12:00:00.250Z");
    assert_eq!(parsed["context"]["thread"], "worker-3");
    assert_eq!(parsed["context"]["kubernetes"]["container"], "legacy");
    // Another container of the same pod keeps the line whole.
    let whole = entries.iter().find(|e| e["message"] == legacy).unwrap();
    assert_eq!(whole["context"]["kubernetes"]["container"], "other");
    assert_eq!(entries.len(), 11, "nothing else, nothing twice");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_aggregator_away_memory_stays_flat_and_everything_arrives_later() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let mut aggregator =
        AggregatorProcess::start(&aggregator_dir, &[("INDEX_REFRESH_INTERVAL_MS", "200")]);
    aggregator.kill();
    let paths = format!("{}/var/log/pods/*/*/*.log", root.path().display());
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[
            ("AGENT_PATHS", paths.as_str()),
            ("AGENT_MAX_IN_FLIGHT_BYTES", "2097152"),
            ("AGENT_BATCH_BYTES", "262144"),
        ],
    );
    let baseline = agent.rss_kib();
    let log = pod_log(root.path(), "web", 0);
    let mut peak = baseline;
    let total = 60_000;
    for chunk in 0..30 {
        write_cri(&log, chunk * 2000, (chunk + 1) * 2000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(agent.rss_kib());
    }
    // 60,000 lines (~10 MB) written and nowhere to send them: the agent read only up to its
    // in-flight limit, so its memory did not follow the file.
    assert!(
        peak < baseline + 16 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB while the aggregator was down"
    );
    aggregator.restart();
    let entries = wait_for_count(&aggregator, total as usize).await;
    assert_exactly_once(&entries, total);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_and_socket_messages_arrive_even_when_sent_while_the_aggregator_is_down() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let mut aggregator =
        AggregatorProcess::start(&aggregator_dir, &[("INDEX_REFRESH_INTERVAL_MS", "100")]);
    let udp_port = logging_tests::free_port();
    let tcp_port = logging_tests::free_port();
    let socket = root.path().join("agent.sock");
    let udp = format!("127.0.0.1:{udp_port}");
    let tcp = format!("127.0.0.1:{tcp_port}");
    let paths = format!("{}/nothing/*.log", root.path().display());
    let socket_path = socket.display().to_string();
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[
            ("AGENT_PATHS", paths.as_str()),
            ("AGENT_SYSLOG_UDP", udp.as_str()),
            ("AGENT_SYSLOG_TCP", tcp.as_str()),
            ("AGENT_SOCKET", socket_path.as_str()),
        ],
    );
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sender
        .send_to(
            b"<11>1 2026-11-27T06:00:00Z web-1 payments - - - card declined",
            &udp,
        )
        .unwrap();
    let mut stream = std::net::TcpStream::connect(&tcp).unwrap();
    stream
        .write_all(b"<38>Nov 27 06:00:01 web-1 sshd[7]: Accepted key\n")
        .unwrap();
    drop(stream);
    let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    unix.write_all(b"{\"level\":\"warn\",\"service\":\"cron\",\"message\":\"job slow\"}\n")
        .unwrap();
    drop(unix);
    let entries = wait_for_count(&aggregator, 3).await;
    let by_message = |m: &str| {
        entries
            .iter()
            .find(|e| e["message"] == m)
            .unwrap_or_else(|| panic!("{m}: {entries:#?}"))
            .clone()
    };
    let udp_entry = by_message("card declined");
    assert_eq!(udp_entry["service"], "payments");
    assert_eq!(udp_entry["level"], "error");
    assert_eq!(udp_entry["context"]["source"], "syslog-udp");
    assert_eq!(udp_entry["context"]["hostname"], "web-1");
    assert_eq!(udp_entry["context"]["node"], "node-e2e");
    assert_eq!(by_message("Accepted key")["service"], "sshd");
    assert_eq!(by_message("job slow")["level"], "warning");

    // With the aggregator gone, socket input is spooled to disk and delivered later.
    aggregator.kill();
    for seq in 0..50 {
        let message = format!("<14>1 - host app - - - queued while down {{\"seq\":{seq}}}");
        sender.send_to(message.as_bytes(), &udp).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    aggregator.restart();
    let entries = wait_for_count(&aggregator, 53).await;
    let queued = entries
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("queued while down")
        })
        .count();
    assert_eq!(queued, 50, "each spooled message once");
    assert_eq!(entries.len(), 53);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_neither_rescans_on_its_own_reads_nor_polls_busily() {
    // Regression: inotify reports the opens of the rescan itself; waking on those made the
    // agent rescan in a loop and burn a core while no line was being written.
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let aggregator = AggregatorProcess::start(&aggregator_dir, &[]);
    for container in 0..20 {
        write_cri(&pod_log(root.path(), &format!("c{container}"), 0), 0, 5);
    }
    let paths = format!("{}/var/log/pods/*/*/*.log", root.path().display());
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str())],
    );
    wait_for_count(&aggregator, 100).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rescans = agent.metric("logging_agent_rescans_total").await;
    let polls = agent.metric("logging_agent_polls_total").await;
    assert!(rescans > 0.0 && polls > 0.0, "the counters are exported");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rescans = agent.metric("logging_agent_rescans_total").await - rescans;
    let polls = agent.metric("logging_agent_polls_total").await - polls;
    // One rescan a second (AGENT_RESCAN_INTERVAL_MS), and polls backing off to one a second
    // once nothing arrives: a handful each in four seconds, where the loop made thousands
    // (and plain 100 ms polling would make 40).
    assert!(rescans <= 8.0, "{rescans} rescans in 4 s of idleness");
    assert!(polls <= 16.0, "{polls} polls in 4 s of idleness");

    // Idle does not mean deaf: a new line is still picked up at once through inotify.
    write_cri(&pod_log(root.path(), "c0", 0), 5, 6);
    wait_for_count(&aggregator, 101).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_laid_out_as_the_daemonset_sees_it_has_each_file_read_once() {
    // kubelet writes /var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log and links
    // /var/log/containers/<pod>_<ns>_<container>-<id>.log to it; the agent globs both.
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    std::fs::create_dir_all(&aggregator_dir).unwrap();
    let aggregator = AggregatorProcess::start(&aggregator_dir, &[]);
    let containers = root.path().join("var/log/containers");
    std::fs::create_dir_all(&containers).unwrap();
    let mut total = 0;
    for (i, container) in ["web", "sidecar"].into_iter().enumerate() {
        let log = pod_log(root.path(), container, 0);
        write_cri(&log, total, total + 50);
        total += 50;
        std::os::unix::fs::symlink(
            &log,
            containers.join(format!("web-7d4b9c5f6-x2k9p_shop_{container}-{i:064x}.log")),
        )
        .unwrap();
    }
    let paths = format!(
        "{0}/var/log/pods/*/*/*.log,{0}/var/log/containers/*.log",
        root.path().display()
    );
    let agent = AgentProcess::start(
        &aggregator,
        &root.path().join("agent"),
        &[("AGENT_PATHS", paths.as_str())],
    );
    write_cri(&pod_log(root.path(), "web", 0), total, total + 10);
    total += 10;
    let entries = wait_for_count(&aggregator, total as usize).await;
    // A few rescans later, still nothing twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let entries = if all_entries(&aggregator).await.len() > entries.len() {
        all_entries(&aggregator).await
    } else {
        entries
    };
    assert_exactly_once(&entries, total);
    // Each entry carries the metadata of the kubelet path, not the symlink's.
    for entry in &entries {
        let kubernetes = &entry["context"]["kubernetes"];
        assert_eq!(kubernetes["namespace"], "shop", "{entry}");
        assert_eq!(kubernetes["pod"], "web-7d4b9c5f6-x2k9p");
        assert_eq!(
            kubernetes["pod_uid"],
            "0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
        );
        assert_eq!(entry["service"], "web");
    }
    let watched = agent.metric("logging_agent_files_watched").await;
    assert_eq!(watched, 2.0, "two files, each tailed once");
    drop(agent);
}

/// The agent against an aggregator that refuses: a batch over the aggregator's limits (413)
/// is halved until it fits and every line arrives; a batch of which nothing can be stored
/// (400: entries older than the retention) goes to the dead-letter file with each entry's
/// reason; the checkpoint moves past both, so nothing is sent again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_are_split_or_dead_lettered_never_lost_or_retried_forever() {
    let root = tempfile::tempdir().unwrap();
    let aggregator_dir = root.path().join("aggregator");
    let aggregator = AggregatorProcess::start(
        &aggregator_dir,
        &[
            ("MAX_REQUEST_BYTES", "65536"),
            ("MAX_LOG_SIZE", "16384"),
            ("LOG_RETENTION_DAYS", "2"),
        ],
    );
    let log = pod_log(root.path(), "splitter", 0);
    // 600 lines of ~300 bytes: one agent batch is ~180 KB, over the aggregator's 64 KiB.
    // Lines the aggregator cannot store: their timestamps are a year old.
    let too_old = |n: usize| {
        format!(
            "{} stdout F {{\"level\":\"info\",\"msg\":\"too old {n}\",\"ts\":\"2025-01-01T00:00:00Z\"}}\n",
            now_rfc3339()
        )
    };
    let mut text = String::new();
    for seq in 0..600 {
        text.push_str(&format!(
            "{} stdout F {{\"level\":\"info\",\"msg\":\"request {seq} served {}\",\"seq\":{seq}}}\n",
            now_rfc3339(),
            "p".repeat(200)
        ));
        // Two among the good ones: rejected in a batch that is otherwise stored.
        if seq == 100 || seq == 400 {
            text.push_str(&too_old(seq));
        }
    }
    std::fs::write(&log, text).unwrap();
    let agent_dir = root.path().join("agent");
    let agent = AgentProcess::start(
        &aggregator,
        &agent_dir,
        &[
            (
                "AGENT_PATHS",
                &format!("{}/var/log/pods/*/*/*.log", root.path().display()),
            ),
            ("MAX_LOG_SIZE", "16384"),
        ],
    );
    let entries = wait_for_count(&aggregator, 600).await;
    assert_exactly_once(&entries, 600);
    // They got there by halving: the aggregator answered 413 first.
    let metrics = http_client()
        .get(format!("{}/metrics", aggregator.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("logging_aggregator_http_requests_total")
                && l.contains("route=\"/v1/ingest\"")
                && l.contains("status=\"413\"")),
        "no batch was refused as too large"
    );
    // Then five alone: a batch of which nothing can be stored.
    let mut more = String::new();
    for n in 0..5 {
        more.push_str(&too_old(1000 + n));
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(more.as_bytes())
        .unwrap();
    let dead = agent_dir.join("dead-letter.ndjson");
    let mut records: Vec<Value> = Vec::new();
    for _ in 0..100 {
        records = std::fs::read_to_string(&dead)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if records.len() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(records.len(), 7, "{records:?}");
    for record in &records {
        assert!(
            record["entry"]["message"]
                .as_str()
                .unwrap()
                .starts_with("too old"),
            "{record}"
        );
        assert!(
            record["reason"].as_str().unwrap().contains("retention"),
            "{record}"
        );
    }
    assert_eq!(
        agent
            .metric("logging_agent_dead_letter_entries_total")
            .await,
        7.0
    );
    assert_eq!(
        agent
            .metric("logging_agent_batches_dead_lettered_total")
            .await,
        1.0
    );
    assert_eq!(
        agent.metric("logging_agent_entries_rejected_total").await,
        2.0
    );
}
