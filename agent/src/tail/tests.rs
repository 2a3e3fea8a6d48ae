use std::io::Write;

use super::*;

fn meta(_: &Path, id: FileId) -> SourceMeta {
    SourceMeta {
        source_id: format!("{}:{}:{}", id.dev, id.ino, id.head).into_bytes(),
        service: "svc".into(),
        kubernetes: None,
        extra: None,
        parser: None,
        sealed: None,
    }
}

/// Reads everything there is and returns the whole messages as (start, stream, body, truncated).
fn read_all(tailed: &mut Tailed) -> Vec<(u64, Option<Stream>, String, bool)> {
    let mut out = Vec::new();
    let mut sink = |_: &SourceMeta, m: Message| {
        out.push((
            m.start,
            m.stream,
            String::from_utf8(m.body).unwrap(),
            m.truncated,
        ));
    };
    while tailed.read(1 << 20, &meta, &mut sink).unwrap() > 0 {}
    tailed.flush_held(Duration::ZERO, &mut sink);
    out
}

fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

#[test]
fn cri_pieces_are_joined_per_stream_and_offsets_point_at_message_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let lines = [
        "2026-11-27T06:00:00.000000001Z stdout P hello ",
        "2026-11-27T06:00:00.000000002Z stderr F err line",
        "2026-11-27T06:00:00.000000003Z stdout P big ",
        "2026-11-27T06:00:00.000000004Z stdout F world",
        "2026-11-27T06:00:00.000000005Z stdout F {\"msg\":\"json\"}",
    ];
    append(&path, &(lines.join("\n") + "\n"));
    let mut tailed = Tailed::open(&path, 1 << 20, &|_| None).unwrap();
    let got = read_all(&mut tailed);
    assert_eq!(got.len(), 3, "{got:?}");
    let stdout: Vec<_> = got.iter().filter(|m| m.1 == Some(Stream::Stdout)).collect();
    assert_eq!(stdout[0].2, "hello big world");
    assert_eq!(stdout[0].0, 0, "starts at its first piece");
    assert_eq!(stdout[1].2, "{\"msg\":\"json\"}");
    let stderr = got.iter().find(|m| m.1 == Some(Stream::Stderr)).unwrap();
    assert_eq!(stderr.2, "err line");
    assert_eq!(stderr.0, lines[0].len() as u64 + 1);
    assert_eq!(tailed.safe_offset(), tailed.offset);
}

#[test]
fn the_safe_offset_waits_for_an_unfinished_message_of_either_stream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    append(
        &path,
        "2026-11-27T06:00:00Z stdout P part one \n2026-11-27T06:00:01Z stderr F {\"msg\":\"other\"}\n",
    );
    let mut tailed = Tailed::open(&path, 1 << 20, &|_| None).unwrap();
    let got = read_all(&mut tailed);
    assert_eq!(got.len(), 1, "only the stderr message is whole");
    assert_eq!(
        tailed.safe_offset(),
        0,
        "the stdout piece at 0 is not finished"
    );
    append(&path, "2026-11-27T06:00:02Z stdout F and two\n");
    let got = read_all(&mut tailed);
    assert_eq!(got[0].2, "part one and two");
    assert_eq!(tailed.safe_offset(), tailed.offset);
}

#[test]
fn docker_16k_pieces_and_plain_stack_traces_are_joined() {
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("docker.log");
    let piece = "x".repeat(16 * 1024);
    append(
        &docker,
        &format!(
            "{{\"log\":\"{piece}\",\"stream\":\"stdout\",\"time\":\"2026-11-27T06:00:00Z\"}}\n"
        ),
    );
    append(
        &docker,
        "{\"log\":\"tail\\n\",\"stream\":\"stdout\",\"time\":\"2026-11-27T06:00:00Z\"}\n",
    );
    let mut tailed = Tailed::open(&docker, 1 << 20, &|_| None).unwrap();
    let got = read_all(&mut tailed);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2.len(), 16 * 1024 + 4);

    let plain = dir.path().join("app.log");
    append(
        &plain,
        "ERROR failed\njava.lang.RuntimeException: x\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)\nINFO next\n",
    );
    let mut tailed = Tailed::open(&plain, 1 << 20, &|_| None).unwrap();
    let got = read_all(&mut tailed);
    let bodies: Vec<&str> = got.iter().map(|m| m.2.as_str()).collect();
    assert_eq!(
        bodies,
        vec![
            "ERROR failed",
            "java.lang.RuntimeException: x\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)",
            "INFO next"
        ]
    );
}

#[test]
fn an_overlong_line_is_truncated_and_marked_without_being_held_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.log");
    append(&path, &format!("{}\nafter\n", "y".repeat(100_000)));
    let mut tailed = Tailed::open(&path, 1000, &|_| None).unwrap();
    let mut got = Vec::new();
    let mut sink = |_: &SourceMeta, m: Message| got.push((m.body.len(), m.truncated, m.start));
    // Small reads, so the line arrives in pieces as it would from a growing file.
    while tailed.read(4096, &meta, &mut sink).unwrap() > 0 {
        assert!(tailed.line.len() <= 1000, "never held whole");
    }
    tailed.flush_held(Duration::ZERO, &mut sink);
    assert_eq!(got, vec![(1000, true, 0), (5, false, 100_001)]);
}

#[test]
fn an_overlong_cri_line_keeps_its_decoded_prefix_when_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let ts = "2026-11-27T06:16:57.123456789Z";
    append(
        &path,
        &format!(
            "{ts} stdout F short\n{ts} stderr F err\n{ts} stdout F long {}\n{ts} stdout F after\n",
            "z".repeat(50_000)
        ),
    );
    let mut tailed = Tailed::open(&path, 1000, &|_| None).unwrap();
    let mut got = Vec::new();
    let mut sink = |_: &SourceMeta, m: Message| {
        got.push((
            String::from_utf8_lossy(&m.body[..m.body.len().min(7)]).into_owned(),
            m.stream,
            m.truncated,
            m.time.is_some(),
        ))
    };
    while tailed.read(4096, &meta, &mut sink).unwrap() > 0 {}
    tailed.flush_held(Duration::ZERO, &mut sink);
    // Each stream keeps its own order (stderr is held apart, for its own multiline).
    got.retain(|m| m.1 == Some(Stream::Stdout));
    assert_eq!(
        got,
        vec![
            ("short".to_string(), Some(Stream::Stdout), false, true),
            ("long zz".to_string(), Some(Stream::Stdout), true, true),
            ("after".to_string(), Some(Stream::Stdout), false, true),
        ]
    );
}

#[test]
fn copytruncate_starts_again_at_zero_with_a_new_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(
        &path,
        "{\"msg\":\"first generation\"}\n{\"msg\":\"more\"}\n",
    );
    let mut tailed = Tailed::open(&path, 1 << 20, &|_| None).unwrap();
    assert_eq!(read_all(&mut tailed).len(), 2);
    let first_id = tailed.id;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, "{\"msg\":\"second\"}\n");
    assert!(tailed.check_truncation().unwrap());
    let got = read_all(&mut tailed);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 0);
    assert_ne!(tailed.id, first_id);
}

#[test]
fn a_checkpoint_resumes_at_its_offset_only_for_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, "{\"msg\":\"a\"}\n{\"msg\":\"b\"}\n");
    let mut tailed = Tailed::open(&path, 1 << 20, &|_| None).unwrap();
    read_all(&mut tailed);
    let id = tailed.id.unwrap();
    let resumed = Tailed::open(&path, 1 << 20, &move |i| (i == id).then_some(12)).unwrap();
    assert_eq!(resumed.offset, 12);
    let other = FileId {
        head: id.head ^ 1,
        ..id
    };
    let fresh = Tailed::open(&path, 1 << 20, &move |i| (i == other).then_some(12)).unwrap();
    assert_eq!(fresh.offset, 0);
}

#[test]
fn copytruncate_refilled_past_the_old_offset_is_noticed_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, "{\"msg\":\"same first line\"}\n{\"msg\":\"old\"}\n");
    let mut tailed = Tailed::open(&path, 1 << 20, &|_| None).unwrap();
    assert_eq!(read_all(&mut tailed).len(), 2);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    // The same first line again, and more than before: size and head alone would not tell.
    append(
        &path,
        "{\"msg\":\"same first line\"}\n{\"msg\":\"new and longer\"}\n{\"msg\":\"x\"}\n",
    );
    assert!(tailed.check_truncation().unwrap());
    let got = read_all(&mut tailed);
    assert_eq!(got.len(), 3);
    assert!(!tailed.check_truncation().unwrap(), "unchanged now");
}
