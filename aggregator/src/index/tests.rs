use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use logging_common::{LogEntry, LogLevel, Timestamp};
use uuid::Uuid;

use super::indexer::{Indexer, IndexerOptions};
use super::query::{LogFilter, Order, Page};
use super::*;
use crate::wal::{Admission, Batch, Wal};

/// Admits everything: these tests are about the index, not dedup.
struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&mut self, ids: &[Uuid], _: u64) -> Vec<Option<u64>> {
        vec![None; ids.len()]
    }
    fn forget(&mut self, _: &[Uuid]) {}
}

fn entry(n: u64, ts: Timestamp) -> LogEntry {
    LogEntry {
        id: Uuid::from_u128(u128::from(n) + 1000),
        ..LogEntry::new(ts, LogLevel::Info, "svc", format!("entry number {n}"))
    }
}

fn options() -> IndexOptions {
    IndexOptions {
        full_text: true,
        compression: true,
        keyring: None,
    }
}

/// Runs an indexer over the WAL until it has committed everything, then stops it.
fn index_everything(index: &Arc<LogIndex>, wal: &Wal) {
    let reader = wal.reader("index").unwrap();
    let indexer = Indexer::new(
        index.clone(),
        reader,
        IndexerOptions {
            refresh: Duration::from_millis(20),
            flush_rows: 4 * super::block::BLOCK_ROWS,
            flush_bytes: 32 << 20,
            retention_days: 36_500,
            write: super::part::WriteOptions {
                level: 3,
                bloom: true,
                threads: 1,
            },
        },
        Arc::new(AtomicBool::new(true)),
    );
    let stop = Arc::new(AtomicBool::new(true));
    stop.store(true, Ordering::Release);
    indexer.run(stop);
}

fn all(index: &LogIndex) -> Vec<String> {
    let page = Page {
        limit: 1000,
        order: Order::Asc,
        after: None,
        with_total: true,
        highlight: false,
    };
    index
        .search(&LogFilter::default(), &page)
        .unwrap()
        .entries
        .iter()
        .map(|e| serde_json::from_slice::<LogEntry>(&e.json).unwrap().message)
        .collect()
}

#[tokio::test]
async fn entries_land_in_the_partition_of_their_day_and_read_back_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(LogIndex::open(&dir.path().join("index"), options()).unwrap());
    let (wal, _) = Wal::open(
        &dir.path().join("wal"),
        1 << 20,
        0,
        Box::new(AdmitAll),
        None,
    )
    .unwrap();
    let day = 86_400 * 1_000_000_000;
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    let entries = vec![
        entry(1, base.saturating_add_nanos(day)),
        entry(2, base),
        entry(3, base.saturating_add_nanos(2 * day)),
        entry(4, base.saturating_add_nanos(1)),
    ];
    wal.append(Batch::new(&entries)).await.unwrap();
    let (i, w) = (index.clone(), Arc::new(wal));
    let w2 = w.clone();
    tokio::task::spawn_blocking(move || index_everything(&i, &w2))
        .await
        .unwrap();
    assert_eq!(
        index.days().into_iter().map(day_name).collect::<Vec<_>>(),
        vec!["2026-11-20", "2026-11-21", "2026-11-22"]
    );
    assert_eq!(
        all(&index),
        vec![
            "entry number 2",
            "entry number 4",
            "entry number 1",
            "entry number 3"
        ]
    );
    assert!(index.searchable_lsn() >= w.end_lsn());
}

#[tokio::test]
async fn a_replay_from_an_older_cursor_indexes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    {
        let index = Arc::new(LogIndex::open(&dir.path().join("index"), options()).unwrap());
        let (wal, _) = Wal::open(
            &dir.path().join("wal"),
            1 << 20,
            0,
            Box::new(AdmitAll),
            None,
        )
        .unwrap();
        for n in 0..10 {
            wal.append(Batch::new(&[entry(n, base.saturating_add_nanos(n as i64))]))
                .await
                .unwrap();
        }
        let wal = Arc::new(wal);
        let (i, w) = (index.clone(), wal.clone());
        tokio::task::spawn_blocking(move || index_everything(&i, &w))
            .await
            .unwrap();
        assert_eq!(all(&index).len(), 10);
    }
    // The cursor is lost (as if the process died between the index commit and the cursor
    // write): the indexer replays the whole WAL, and every partition skips what it has.
    std::fs::remove_file(dir.path().join("wal/cursors/index")).unwrap();
    let index = Arc::new(LogIndex::open(&dir.path().join("index"), options()).unwrap());
    let (wal, recovered) = Wal::open(
        &dir.path().join("wal"),
        1 << 20,
        index.committed_lsn(),
        Box::new(AdmitAll),
        None,
    )
    .unwrap();
    assert_eq!(recovered.records, 10);
    wal.append(Batch::new(&[entry(99, base.saturating_add_nanos(99))]))
        .await
        .unwrap();
    let wal = Arc::new(wal);
    let (i, w) = (index.clone(), wal.clone());
    tokio::task::spawn_blocking(move || index_everything(&i, &w))
        .await
        .unwrap();
    let messages = all(&index);
    assert_eq!(messages.len(), 11, "{messages:?}");
    assert_eq!(messages[10], "entry number 99");
}

/// A store under `dir` that took `rounds` batches of `per_round` entries, each indexed (and
/// so flushed to a part of its own) before the next.
async fn flushed_in_rounds(
    dir: &std::path::Path,
    base: Timestamp,
    rounds: u64,
    per_round: u64,
) -> (Arc<LogIndex>, Arc<Wal>) {
    let index = Arc::new(LogIndex::open(&dir.join("index"), options()).unwrap());
    let (wal, _) = Wal::open(&dir.join("wal"), 1 << 20, 0, Box::new(AdmitAll), None).unwrap();
    let wal = Arc::new(wal);
    for round in 0..rounds {
        let batch: Vec<LogEntry> = (0..per_round)
            .map(|n| {
                let n = round * per_round + n;
                entry(n, base.saturating_add_nanos(n as i64))
            })
            .collect();
        wal.append(Batch::new(&batch)).await.unwrap();
        let (i, w) = (index.clone(), wal.clone());
        tokio::task::spawn_blocking(move || index_everything(&i, &w))
            .await
            .unwrap();
    }
    (index, wal)
}

fn search_q(index: &LogIndex, q: &str) -> (u64, Vec<String>) {
    let filter = LogFilter {
        parsed: Some(super::query_language::parse(q).unwrap()),
        text: Some(q.to_string()),
        ..LogFilter::default()
    };
    let page = Page {
        limit: 1000,
        order: Order::Asc,
        after: None,
        with_total: true,
        highlight: true,
    };
    let found = index.search(&filter, &page).unwrap();
    (
        found.total.unwrap(),
        found
            .entries
            .iter()
            .map(|e| serde_json::from_slice::<LogEntry>(&e.json).unwrap().message)
            .collect(),
    )
}

fn rich_entry(n: u64, ts: Timestamp) -> LogEntry {
    let mut e = entry(n, ts);
    e.message = format!("payment {} declined by issuer", 4000 + n);
    e.context = serde_json::from_value(serde_json::json!({
        "order_id": 100 + n,
        "user": format!("user-{n}"),
        "kubernetes": {"namespace": if n.is_multiple_of(2) { "shop" } else { "billing" }, "pod": format!("web-{n}x")},
        "note": "retrying after error",
    }))
    .unwrap();
    e.trace_id = Some(format!("{:032x}", 0xabcdef_u128 + u128::from(n)));
    e.user_id = Some(if n == 3 {
        "alice".into()
    } else {
        format!("u{n}")
    });
    e.tags = vec![format!("t{}", n % 3), "prod".into()];
    e
}

/// Everything the store can be asked, the same in memory and once flushed to parts and
/// read back after a restart.
#[tokio::test]
async fn search_finds_any_field_in_memory_and_on_disk_alike() {
    search_cases(None).await;
}

/// The same with encryption at rest: sealed parts answer exactly as plaintext ones, and
/// cannot be opened without their key.
#[tokio::test]
async fn sealed_parts_answer_alike_and_need_their_key() {
    let keys =
        logging_common::crypto::Keyring::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let dir = search_cases(Some(Arc::new(keys.unwrap()))).await;
    let error = match LogIndex::open(&dir.path().join("index"), options()) {
        Ok(_) => panic!("sealed parts opened without the key"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains(".part") && error.contains("no encryption key is set"),
        "{error}"
    );
}

async fn search_cases(keyring: Option<Arc<logging_common::crypto::Keyring>>) -> tempfile::TempDir {
    let sealed = keyring.is_some();
    let options = || IndexOptions {
        keyring: keyring.clone(),
        ..options()
    };
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    let entries: Vec<LogEntry> = (0..40)
        .map(|n| rich_entry(n, base.saturating_add_nanos(n as i64 * 1_000_000)))
        .collect();
    let index = Arc::new(LogIndex::open(&dir.path().join("index"), options()).unwrap());
    let (wal, _) = Wal::open(
        &dir.path().join("wal"),
        1 << 20,
        0,
        Box::new(AdmitAll),
        None,
    )
    .unwrap();
    wal.append(Batch::new(&entries)).await.unwrap();
    let wal = Arc::new(wal);
    let trace = format!("{:032x}", 0xabcdef_u128 + 5);
    let trace_field = format!("trace_id:{trace}");
    let cases: Vec<(&str, u64)> = vec![
        ("declined", 40),
        ("4007", 1),
        ("payment 4007 declined", 1),
        ("\"4007 declined\"", 1),
        ("\"declined 4007\"", 0),
        ("user-7", 1),
        ("context.user:\"user-7\"", 1),
        ("context.order_id:107", 1),
        ("context.order_id:4007", 0),
        ("kubernetes.namespace:shop", 20),
        ("shop", 20),
        ("web-7x", 1),
        ("user_id:alice", 1),
        ("alice", 1),
        (trace_field.as_str(), 1),
        (trace.as_str(), 1),
        ("tags:t1", 13),
        ("prod -t1", 27),
        ("svc", 40),
        ("service:svc", 40),
        ("service:other", 0),
        ("*eclin*", 40),
        ("declin*", 40),
        ("*4007", 1),
        ("*400*", 10),
        ("error", 40),
        ("level:info", 40),
        ("level:error", 0),
        ("NOT shop", 20),
        ("(shop OR alice) 4003", 1),
        ("nothing-like-this", 0),
    ];
    let check = |index: &LogIndex, when: &str| {
        for (q, want) in &cases {
            let (total, messages) = search_q(index, q);
            assert_eq!(total, *want, "{when}: q={q}");
            assert_eq!(messages.len() as u64, *want, "{when}: q={q}");
        }
        // An entry is found by its whole id, too.
        let id = Uuid::from_u128(1000 + 9).to_string();
        assert_eq!(search_q(index, &id).0, 1, "{when}: by id");
        assert_eq!(search_q(index, &format!("id:{id}")).0, 1, "{when}: id:");
    };
    // In memory: searchable as soon as the indexer has read it (nothing flushed yet).
    {
        let reader = wal.reader("index").unwrap();
        let mut indexer = Indexer::new(
            index.clone(),
            reader,
            IndexerOptions {
                refresh: Duration::from_millis(20),
                flush_rows: usize::MAX,
                flush_bytes: u64::MAX,
                retention_days: 36_500,
                write: super::part::WriteOptions {
                    level: 3,
                    bloom: true,
                    threads: 1,
                },
            },
            Arc::new(AtomicBool::new(true)),
        );
        let records = indexer.read_for_test();
        assert!(records > 0);
        assert_eq!(index.partition(base.day()).unwrap().parts().len(), 0);
        check(&index, "in memory");
        indexer.finish_for_test();
    }
    // Flushed to a part, and read back by a new process.
    drop(index);
    let index = LogIndex::open(&dir.path().join("index"), options()).unwrap();
    let parts = index.partition(base.day()).unwrap().parts();
    assert_eq!(parts.len(), 1);
    let on_disk = std::fs::read(&parts[0].path).unwrap();
    assert_eq!(on_disk.starts_with(logging_common::crypto::MAGIC), sealed);
    if sealed {
        assert!(!on_disk.windows(8).any(|w| w == b"declined"));
    }
    check(&index, "on disk");
    // Highlights point at the words, whichever part of the message they are in.
    let filter = LogFilter {
        parsed: Some(super::query_language::parse("declined 4007").unwrap()),
        text: Some("declined 4007".into()),
        ..LogFilter::default()
    };
    let page = Page {
        limit: 10,
        order: Order::Desc,
        after: None,
        with_total: true,
        highlight: true,
    };
    let found = index.search(&filter, &page).unwrap();
    let highlight = found.entries[0].highlight.as_ref().unwrap();
    let marked: Vec<&str> = highlight
        .ranges
        .iter()
        .map(|[s, e]| &highlight.fragment[*s..*e])
        .collect();
    assert_eq!(marked, vec!["4007", "declined"]);
    dir
}

/// A damaged part is refused by name; a half-written one (never renamed) is not seen; a
/// merge interrupted before it removed its inputs leaves no entry twice.
#[tokio::test]
async fn damaged_half_written_and_half_merged_parts_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    // Three flushes: three parts.
    let (index, _wal) = flushed_in_rounds(dir.path(), base, 3, 10).await;
    let partition = index.partition(base.day()).unwrap();
    let parts = partition.parts();
    assert_eq!(parts.len(), 3);
    let day_dir = partition.dir.clone();
    drop(partition);
    drop(index);
    // A merge that wrote its result and died before removing its inputs: the merged part
    // covers the first two.
    let merged = {
        let (blocks, _) = super::indexer::rebuild(&parts[..2]).unwrap();
        let refs: Vec<&super::block::Block> = blocks.iter().collect();
        super::part::write(
            &day_dir,
            base.day(),
            parts[0].lsn_from,
            parts[1].lsn_to,
            &refs,
            super::part::WriteOptions {
                level: 3,
                bloom: true,
                threads: 1,
            },
            None,
        )
        .unwrap()
    };
    // And a flush that died before its rename.
    std::fs::write(
        day_dir.join("00000000000000000099-00000000000000000100.part.tmp"),
        b"half",
    )
    .unwrap();
    drop(parts);
    let index = LogIndex::open(&dir.path().join("index"), options()).unwrap();
    assert_eq!(all(&index).len(), 30, "every entry once");
    assert_eq!(index.partition(base.day()).unwrap().parts().len(), 2);
    assert!(
        !day_dir
            .join("00000000000000000099-00000000000000000100.part.tmp")
            .exists()
    );
    drop(index);
    // A flipped bit in a frame: the read fails naming the file, it does not misread.
    let mut bytes = std::fs::read(&merged).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&merged, &bytes).unwrap();
    let index = LogIndex::open(&dir.path().join("index"), options()).unwrap();
    let page = Page {
        limit: 1000,
        order: Order::Asc,
        after: None,
        with_total: true,
        highlight: false,
    };
    let error = index.search(&LogFilter::default(), &page).unwrap_err();
    assert!(
        error.to_string().contains(&merged.display().to_string()),
        "{error}"
    );
    // A damaged footer: the part is refused when the store opens, naming it.
    let mut bytes = std::fs::read(&merged).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x01;
    std::fs::write(&merged, &bytes).unwrap();
    let error = match LogIndex::open(&dir.path().join("index"), options()) {
        Err(error) => error,
        Ok(_) => panic!("a damaged footer was accepted"),
    };
    assert!(error.to_string().contains("footer"), "{error}");
}

/// Small parts (idle flushes) are merged into one, and nothing is lost or doubled.
#[tokio::test]
async fn small_parts_are_merged_without_losing_or_doubling_entries() {
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    let (index, wal) =
        flushed_in_rounds(dir.path(), base, super::indexer::MERGE_PARTS as u64 + 1, 5).await;
    let partition = index.partition(base.day()).unwrap();
    assert_eq!(partition.parts().len(), super::indexer::MERGE_PARTS + 1);
    let (i, w) = (index.clone(), wal.clone());
    tokio::task::spawn_blocking(move || {
        let reader = w.reader("index").unwrap();
        let mut indexer = Indexer::new(
            i,
            reader,
            IndexerOptions {
                refresh: Duration::from_millis(20),
                flush_rows: 1000,
                flush_bytes: 1 << 30,
                retention_days: 36_500,
                write: super::part::WriteOptions {
                    level: 3,
                    bloom: true,
                    threads: 1,
                },
            },
            Arc::new(AtomicBool::new(true)),
        );
        indexer.merge_for_test();
    })
    .await
    .unwrap();
    assert_eq!(partition.parts().len(), 1);
    let messages = all(&index);
    assert_eq!(messages.len(), 25);
    let unique: std::collections::HashSet<&String> = messages.iter().collect();
    assert_eq!(unique.len(), 25);
}

/// A partition of the first version's format is refused by name, not silently skipped.
#[test]
fn a_partition_of_the_previous_format_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("index/2026-11-27");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("meta.json"), "{}").unwrap();
    let error = match LogIndex::open(&dir.path().join("index"), options()) {
        Err(error) => error.to_string(),
        Ok(_) => panic!("opened"),
    };
    assert!(
        error.contains("2026-11-27") && error.contains("previous format"),
        "{error}"
    );
}

/// The stored line of `entry`.
fn stored(entry: &LogEntry) -> Vec<u8> {
    let mut line = Vec::new();
    entry.write_stored(None, &mut line);
    line
}

/// A part keeps each template once for all its blocks; blocks whose columns are in different
/// orders, and a block with more paths than columns, read back through the one dictionary
/// line for line, and a query over the part finds exactly the rows it should in each.
#[test]
fn a_part_keeps_each_template_once_and_every_block_reads_back_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::from_nanos(1_764_000_000_000_000_000);
    let at = |n: u64| Timestamp::from_nanos(base.as_nanos() + n as i64 * 1_000_000);
    let mut blocks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
    for n in 0..200u64 {
        // Block 0: order numbers first, then users; block 1: the other way round.
        let mut e = entry(n, at(n));
        if n % 2 == 0 {
            e.context = serde_json::from_value(serde_json::json!({"order": 4000 + n})).unwrap();
        } else {
            e.user_id = Some(format!("alice-{n}"));
        }
        blocks[0].push(stored(&e));
        let mut e = entry(1000 + n, at(1000 + n));
        if n % 2 == 1 {
            e.context = serde_json::from_value(serde_json::json!({"order": 5000 + n})).unwrap();
        } else {
            e.user_id = Some(format!("alice-{}", 1000 + n));
        }
        blocks[1].push(stored(&e));
    }
    // Block 2: more distinct paths than a block has columns.
    for n in 0..super::block::MAX_COLUMNS as u64 + 40 {
        let mut e = entry(2000 + n, at(2000 + n));
        let mut map = serde_json::Map::new();
        map.insert(format!("k{n}"), serde_json::json!(format!("v{n}x")));
        e.context = serde_json::from_value(serde_json::Value::Object(map)).unwrap();
        e.user_id = Some(format!("alice-{}", 2000 + n));
        blocks[2].push(stored(&e));
    }
    let built: Vec<super::block::Block> = blocks
        .iter()
        .enumerate()
        .map(|(b, lines)| {
            let mut builder = super::block::BlockBuilder::default();
            for (i, line) in lines.iter().enumerate() {
                builder.push(line, (b * 10_000 + i) as u64).unwrap();
            }
            builder.take()
        })
        .collect();
    assert_ne!(
        built[0].paths, built[1].paths,
        "the two blocks number their columns differently"
    );
    assert!(
        built[2]
            .paths
            .iter()
            .any(|p| p == super::block::OTHER_PATHS)
    );
    let distinct: std::collections::HashSet<&[u8]> = built
        .iter()
        .flat_map(|b| b.templates.iter().map(|t| &t[..]))
        .collect();
    let shared = built[0]
        .templates
        .iter()
        .filter(|t| built[1].templates.contains(t))
        .count();
    assert!(shared >= 2, "the blocks share templates");
    let refs: Vec<&super::block::Block> = built.iter().collect();
    let path = super::part::write(
        dir.path(),
        base.day(),
        0,
        30_000,
        &refs,
        super::part::WriteOptions {
            level: 3,
            bloom: true,
            threads: 2,
        },
        None,
    )
    .unwrap();
    let part = Arc::new(super::part::Part::open(&path, None).unwrap());
    assert_eq!(part.templates().unwrap().infos.len(), distinct.len());
    for (b, lines) in blocks.iter().enumerate() {
        let view = super::scan::View::disk(&part, b);
        let rows: Vec<usize> = (0..view.rows()).collect();
        assert_eq!(&view.lines(&rows).unwrap(), lines, "block {b} reads back");
        // A few rows alone: from the start of the columns, or from their end when the rows
        // are nearer to it; both find the same variables.
        let n = rows.len();
        for few in [
            vec![0, 1],
            vec![n / 3, n / 2],
            vec![n / 2 + 1, n - 7, n - 1],
            vec![n - 1],
            vec![3, n - 2],
        ] {
            let expected: Vec<Vec<u8>> = few.iter().map(|r| lines[*r].clone()).collect();
            assert_eq!(
                view.lines(&few).unwrap(),
                expected,
                "block {b} rows {few:?}"
            );
        }
    }
    // Terms decided by the variables and by the templates, in every block of the part.
    for (q, expected) in [
        ("alice-1010", vec![(1, 10)]),
        ("alice-11", vec![(0, 11)]),
        ("alice-1011", vec![]),
        ("user_id:alice-2007", vec![(2, 7)]),
        ("context.order:4010", vec![(0, 10)]),
        ("context.order:5011", vec![(1, 11)]),
        ("v530x", vec![(2, 530)]),
        ("context.k12:v12x", vec![(2, 12)]),
    ] {
        let filter = LogFilter {
            parsed: Some(super::query_language::parse(q).unwrap()),
            text: Some(q.to_string()),
            ..LogFilter::default()
        };
        let query = super::scan::Compiled::new(&filter);
        let mut found = Vec::new();
        for b in 0..part.blocks.len() {
            let view = super::scan::View::disk(&part, b);
            super::scan::scan(
                &view,
                &query,
                &std::collections::HashSet::new(),
                None,
                false,
                |row, _| {
                    found.push((b, row));
                    true
                },
            )
            .unwrap();
        }
        assert_eq!(found, expected, "{q}");
    }
}

/// Blocks of a part keep their rows per template, per (service, level) and per value of a
/// numeric field; counts of whole blocks and analytics come from them, and are exactly what
/// reading the rows gives.
#[tokio::test]
async fn counts_kept_per_block_answer_exactly_what_the_rows_say() {
    let dir = tempfile::tempdir().unwrap();
    let base = Timestamp::parse("2026-11-20T12:00:00Z").unwrap();
    let services = ["web", "db", "queue"];
    let entries: Vec<LogEntry> = (0..3000u64)
        .map(|n| {
            let mut e = entry(n, base.saturating_add_nanos(n as i64 * 1_000_000));
            e.service = services[(n % 3) as usize].into();
            e.level = [LogLevel::Info, LogLevel::Error, LogLevel::Warning][(n % 7 % 3) as usize];
            e.message = match n % 4 {
                0 => format!("payment {n} declined by issuer"),
                1 => format!("order {n} shipped"),
                2 => "cache warmed".into(),
                _ => format!("payment {n} accepted"),
            };
            // A numeric field with few values, one with as many values as rows, and one that
            // is sometimes a string.
            e.context = serde_json::from_value(serde_json::json!({
                "duration_ms": (n % 50) as f64 / 2.0,
                "bytes": n * 7,
                "mixed": if n % 5 == 0 { serde_json::json!(format!("v{n}")) } else { serde_json::json!(n % 3) },
            }))
            .unwrap();
            e
        })
        .collect();
    let index = Arc::new(LogIndex::open(&dir.path().join("index"), options()).unwrap());
    let (wal, _) = Wal::open(
        &dir.path().join("wal"),
        1 << 20,
        0,
        Box::new(AdmitAll),
        None,
    )
    .unwrap();
    let wal = Arc::new(wal);
    // Three parts of a thousand entries.
    for chunk in entries.chunks(1000) {
        wal.append(Batch::new(chunk)).await.unwrap();
        let (i, w) = (index.clone(), wal.clone());
        tokio::task::spawn_blocking(move || index_everything(&i, &w))
            .await
            .unwrap();
    }
    let parts = index.partition(base.day()).unwrap().parts();
    assert!(parts.len() >= 2);

    // Whole blocks counted from their counts, against the rows.
    let mut from_counts = 0;
    for (q, level, service) in [
        (None, None, None),
        (Some("declined"), None, None),
        (Some("payment -declined"), None, None),
        (Some("cache OR shipped"), None, None),
        (None, Some(LogLevel::Error), None),
        (None, Some(LogLevel::Warning), Some("db")),
        (Some("declined"), Some(LogLevel::Error), None),
        (Some("4000"), None, None),
        (Some("db"), None, None),
    ] {
        let filter = LogFilter {
            parsed: q.map(|q| super::query_language::parse(q).unwrap()),
            text: q.map(str::to_string),
            level,
            services: service.map(|s| vec![s.to_string()]).unwrap_or_default(),
            ..LogFilter::default()
        };
        let query = super::scan::Compiled::new(&filter);
        let hidden = std::collections::HashSet::new();
        let mut expected = 0u64;
        for part in &parts {
            for b in 0..part.blocks.len() {
                let view = super::scan::View::disk(part, b);
                let mut rows = 0u64;
                super::scan::scan(&view, &query, &hidden, None, false, |_, _| {
                    rows += 1;
                    true
                })
                .unwrap();
                expected += rows;
                let view = super::scan::View::disk(part, b);
                if let Some(n) =
                    super::scan::count_without_rows(&view, &query, &hidden, None).unwrap()
                {
                    assert_eq!(n, rows, "q={q:?} level={level:?} service={service:?}");
                    from_counts += 1;
                }
            }
        }
        // And the store's answer: the first page read, every other block only counted.
        let page = Page {
            limit: 1,
            order: Order::Desc,
            after: None,
            with_total: true,
            highlight: false,
        };
        assert_eq!(
            index.search(&filter, &page).unwrap().total,
            Some(expected),
            "q={q:?} level={level:?} service={service:?}"
        );
    }
    assert!(
        from_counts >= 6 * parts.len(),
        "template terms and filters are answered from the counts ({from_counts} blocks)"
    );

    // Analytics from the counts (no terms) and from the rows (a term every entry matches)
    // say the same, the numeric field's statistics included.
    let analytics = |q: Option<&str>, field: &str, interval_nanos: i64| {
        let request = AnalyticsRequest {
            filter: LogFilter {
                parsed: q.map(|q| super::query_language::parse(q).unwrap()),
                text: q.map(str::to_string),
                ..LogFilter::default()
            },
            start: base,
            end: base.saturating_add_nanos(3_600_000_000_000),
            interval_nanos,
            value_field: Some(field.to_string()),
            top_patterns: 10,
        };
        let (fruit, patterns) = index.analytics(&request).unwrap();
        let mut services: Vec<_> = fruit.service_totals.into_iter().collect();
        services.sort();
        let mut by_service: Vec<_> = fruit.by_service.into_iter().collect();
        by_service.sort();
        let stats = crate::read::FieldStats::of_counted(
            field.into(),
            fruit.values,
            fruit
                .counted
                .into_iter()
                .map(|(v, n)| (f64::from_bits(v), n))
                .collect(),
        );
        let patterns: Vec<(String, u64)> =
            patterns.into_iter().map(|p| (p.pattern, p.count)).collect();
        (fruit.by_level, by_service, services, stats, patterns)
    };
    // Buckets of an hour hold whole blocks; buckets of 0.7 s cut them.
    for (field, interval) in [
        ("duration_ms", 3_600_000_000_000),
        ("bytes", 3_600_000_000_000),
        ("mixed", 3_600_000_000_000),
        ("duration_ms", 700_000_000),
    ] {
        let (levels, by_service, services, stats, patterns) = analytics(None, field, interval);
        let (levels_rows, by_service_rows, services_rows, stats_rows, patterns_rows) =
            analytics(Some("entry OR payment OR order OR cache"), field, interval);
        assert_eq!(levels, levels_rows, "{field}");
        assert_eq!(by_service, by_service_rows, "{field}");
        assert_eq!(services, services_rows, "{field}");
        assert_eq!(patterns, patterns_rows, "{field}");
        assert_eq!(
            (
                stats.count,
                stats.min,
                stats.max,
                stats.p50,
                stats.p90,
                stats.p99
            ),
            (
                stats_rows.count,
                stats_rows.min,
                stats_rows.max,
                stats_rows.p50,
                stats_rows.p90,
                stats_rows.p99
            ),
            "{field}"
        );
        assert!(stats.count > 0, "{field}: {stats:?}");
        assert!(
            (stats.avg.unwrap() - stats_rows.avg.unwrap()).abs() < 1e-9,
            "{field}"
        );
    }
    let (levels, _, _, stats, _) = analytics(None, "duration_ms", 700_000_000);
    assert!(levels.iter().filter(|l| l.iter().sum::<u64>() > 0).count() >= 4);
    assert_eq!(stats.count, 3000);
    assert_eq!((stats.min, stats.max), (Some(0.0), Some(24.5)));
    // The kept value counts: in a block this small every number is counted (few values, and
    // as many values as rows), a field that is sometimes a string is not; they are in a frame
    // of their own, not in the counts.
    let numbers = parts[0].numbers(0).unwrap().unwrap();
    let counted: Vec<&str> = numbers.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(counted, vec!["context.bytes", "context.duration_ms"]);
    assert!(parts[0].counts(0).unwrap().unwrap().numbers.is_empty());
}

#[test]
fn block_counts_read_back_and_a_damaged_frame_is_refused() {
    let mut counts = super::block::BlockCounts::of([3, 1, 3].into_iter(), &[0, 1, 0], &[2, 5, 2]);
    counts
        .numbers
        .push(("context.d".into(), vec![(0.5, 2), (12.0, 1)]));
    assert_eq!(counts.templates, vec![(1, 1), (3, 2)]);
    assert_eq!(counts.service_levels, vec![(0, 2, 2), (1, 5, 1)]);
    let bytes = counts.to_bytes();
    assert_eq!(
        super::block::BlockCounts::from_bytes(&bytes),
        Some(counts.clone())
    );
    for cut in 0..bytes.len() {
        assert_eq!(super::block::BlockCounts::from_bytes(&bytes[..cut]), None);
    }
    // The value counts' own frame reads back, and a cut one is refused.
    let mut bytes = Vec::new();
    super::block::put_numbers(&counts.numbers, &mut bytes);
    let mut at = 0;
    assert_eq!(
        super::block::get_numbers(&bytes, &mut at).as_ref(),
        Some(&counts.numbers)
    );
    assert_eq!(at, bytes.len());
    for cut in 0..bytes.len() {
        let mut at = 0;
        assert_eq!(super::block::get_numbers(&bytes[..cut], &mut at), None);
    }
}
