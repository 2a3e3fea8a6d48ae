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
            threads: 1,
            memory_bytes: 32 << 20,
            retention_days: 36_500,
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
    let (wal, _) = Wal::open(&dir.path().join("wal"), 1 << 20, 0, Box::new(AdmitAll)).unwrap();
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
        let (wal, _) = Wal::open(&dir.path().join("wal"), 1 << 20, 0, Box::new(AdmitAll)).unwrap();
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
