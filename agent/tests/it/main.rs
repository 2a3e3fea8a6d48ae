//! The agent's integration tests: its socket inputs over real sockets, into the real spool.
//! (The whole agent with a real aggregator is tested end to end in `tests/`.)

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use logging_agent::checkpoint::Checkpoints;
use logging_agent::sockets;
use logging_agent::spool::Spool;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Every line spooled so far, parsed.
fn spooled(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

async fn wait_for(dir: &std::path::Path, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let lines = spooled(dir);
        if lines.len() >= count {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "only {} of {count} messages spooled: {:?}",
        spooled(dir).len(),
        spooled(dir)
    );
}

#[tokio::test]
async fn syslog_over_udp_and_tcp_with_both_framings_is_spooled_as_entries() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = Arc::new(Checkpoints::load(&dir.path().join("state"), None).unwrap());
    let spool_dir = dir.path().join("spool");
    let spool = Arc::new(Spool::new(&spool_dir, 1 << 30, checkpoints, None).unwrap());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let max = 4096;
    let (_udp, udp_addr) = sockets::udp("127.0.0.1:0", spool.clone(), max, stopped.clone())
        .await
        .unwrap();
    let (_tcp, tcp_addr) = sockets::tcp("127.0.0.1:0", spool.clone(), max, stopped.clone())
        .await
        .unwrap();

    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sender
        .send_to(
            b"<34>1 2026-11-27T06:00:00Z web-1 payments 42 - - card declined",
            udp_addr,
        )
        .unwrap();
    sender
        .send_to(b"<38>Nov 27 06:00:01 web-1 sshd[7]: Accepted key", udp_addr)
        .unwrap();

    let mut tcp = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let framed = "<11>1 2026-11-27T06:00:02Z db-1 postgres - - - deadlock\ndetected";
    tcp.write_all(format!("{} {framed}", framed.len()).as_bytes())
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let mut lines = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    lines
        .write_all(b"<13>Nov 27 06:00:03 host app: first\n<13>Nov 27 06:00:04 host app: second\n")
        .await
        .unwrap();
    lines.shutdown().await.unwrap();
    // Messages far longer than kept, in both framings: each is cut and marked, its rest
    // dropped, and the message after it arrives whole.
    let mut long = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let huge = format!(
        "<11>1 2026-11-27T06:00:05Z db-1 big - - - {}",
        "x".repeat(300_000)
    );
    long.write_all(format!("{} {huge}", huge.len()).as_bytes())
        .await
        .unwrap();
    let after = "<13>1 2026-11-27T06:00:06Z db-1 big - - - after the counted one";
    long.write_all(format!("{} {after}", after.len()).as_bytes())
        .await
        .unwrap();
    long.shutdown().await.unwrap();
    let mut long = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    long.write_all(format!("<13>Nov 27 06:00:07 host big: {}\n", "y".repeat(200_000)).as_bytes())
        .await
        .unwrap();
    long.write_all(b"<13>Nov 27 06:00:08 host big: after the long line\n")
        .await
        .unwrap();
    long.shutdown().await.unwrap();

    let spooled = wait_for(&spool_dir, 9).await;
    assert_eq!(spooled.len(), 9, "no message split in pieces: {spooled:#?}");
    let cut: Vec<&serde_json::Value> = spooled.iter().filter(|e| e["truncated"] == true).collect();
    assert_eq!(cut.len(), 2, "{spooled:#?}");
    for e in cut {
        let msg = e["msg"].as_str().unwrap();
        assert!(msg.len() < max && msg.len() > max / 2, "{}", msg.len());
    }
    let find = |msg: &str| {
        spooled
            .iter()
            .find(|e| e["msg"] == msg)
            .unwrap_or_else(|| panic!("{msg}: {spooled:#?}"))
    };
    let udp = find("card declined");
    assert_eq!(udp["service"], "payments");
    assert_eq!(udp["level"], "critical");
    assert_eq!(udp["hostname"], "web-1");
    assert_eq!(udp["source"], "syslog-udp");
    assert_eq!(find("Accepted key")["service"], "sshd");
    let counted = find("deadlock\ndetected");
    assert_eq!(
        counted["level"], "error",
        "octet counting keeps a newline inside a message"
    );
    assert_eq!(counted["source"], "syslog-tcp");
    find("first");
    find("second");
    find("after the counted one");
    find("after the long line");
}

#[tokio::test]
async fn the_unix_socket_takes_ndjson_entries_and_raw_lines() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = Arc::new(Checkpoints::load(&dir.path().join("state"), None).unwrap());
    let spool_dir = dir.path().join("spool");
    let spool = Arc::new(Spool::new(&spool_dir, 1 << 30, checkpoints, None).unwrap());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let path = dir.path().join("agent.sock");
    let _unix = sockets::unix(&path, spool, 1 << 20, stopped).await.unwrap();
    let path_for_client = path.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = std::os::unix::net::UnixStream::connect(path_for_client).unwrap();
        client
            .write_all(b"{\"level\":\"warn\",\"service\":\"cron\",\"message\":\"job slow\",\"job\":\"backup\"}\nplain text line\n")
            .unwrap();
    })
    .await
    .unwrap();
    let spooled = wait_for(&spool_dir, 2).await;
    assert_eq!(spooled[0]["service"], "cron");
    assert_eq!(spooled[0]["job"], "backup");
    assert_eq!(spooled[0]["source"], "unix-socket");
    assert_eq!(spooled[1]["msg"], "plain text line");
    assert_eq!(spooled[1]["service"], "socket");
}

/// The README's agent configuration table lists exactly the settings the code reads.
#[test]
fn every_agent_setting_is_documented_in_the_readme_and_nothing_else() {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("### Agent configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Agent configuration section");
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    let read: std::collections::BTreeSet<String> =
        logging_common::config::variable_names::<logging_agent::config::Config>()
            .into_iter()
            .collect();
    assert_eq!(documented, read);
}

/// The README's two examples of `AGENT_PARSERS` load as written and read the lines they are
/// about.
#[test]
fn the_readme_parser_examples_load_and_read_their_lines() {
    use logging_agent::kubernetes::PodInfo;
    use logging_agent::parsers::Parsers;
    use logging_common::LogLevel;

    let readme = include_str!("../../../README.md");
    let section = readme
        .split("### Parsers for your own formats")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a parsers section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a YAML example");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config: logging_agent::config::Config =
        logging_common::config::load(Some(&file), Vec::new()).unwrap();
    let parsers = Parsers::new(&config.agent_parsers).unwrap();
    let pod = PodInfo {
        namespace: "billing".into(),
        pod: "billing-7d4b9c5f6-x2k9p".into(),
        pod_uid: "u".into(),
        container: "app".into(),
        restart_count: 0,
    };
    let parser = parsers
        .select(
            std::path::Path::new("/var/log/pods/x/app/0.log"),
            Some(&pod),
        )
        .expect("the example selects its pod");
    let parsed = parser
        .parse("01/12/2026 12:00:00.250 |W| worker-3 :: disk 91% full")
        .expect("the example's line matches");
    assert_eq!(parsed.level, Some(LogLevel::Warning));
    assert_eq!(parsed.message.as_deref(), Some("disk 91% full"));
    assert_eq!(
        parsed.timestamp.unwrap().to_rfc3339(),
        "2026-12-01T12:00:00.250Z"
    );

    let env = section
        .split("AGENT_PARSERS='")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("an environment example");
    let config: logging_agent::config::Config =
        logging_common::config::load(None, vec![("AGENT_PARSERS".to_string(), env.to_string())])
            .unwrap();
    let parsers = Parsers::new(&config.agent_parsers).unwrap();
    let gateway = PodInfo {
        pod: "gateway-5f6d7-abcde".into(),
        ..pod
    };
    let parser = parsers
        .select(
            std::path::Path::new("/var/log/pods/x/app/0.log"),
            Some(&gateway),
        )
        .unwrap();
    assert_eq!(
        parser.parse("level=error").unwrap().level,
        Some(LogLevel::Error)
    );
    let legacy = parsers
        .select(std::path::Path::new("/var/log/legacy/host.log"), None)
        .unwrap();
    assert_eq!(legacy.name, "legacy-host");
}
