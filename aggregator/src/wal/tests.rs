use std::collections::HashMap;
use std::time::Duration;

use logging_common::{LogEntry, LogLevel, Timestamp};

use std::io::Write;

use super::*;

/// Remembers every id it admitted.
#[derive(Default)]
struct SeenIds(HashMap<Uuid, u64>);

impl Admission for SeenIds {
    fn admit(&mut self, ids: &[Uuid], record_lsn: u64) -> Vec<Option<u64>> {
        ids.iter()
            .map(|id| match self.0.get(id) {
                Some(lsn) => Some(*lsn),
                None => {
                    self.0.insert(*id, record_lsn);
                    None
                }
            })
            .collect()
    }

    fn forget(&mut self, ids: &[Uuid]) {
        for id in ids {
            self.0.remove(id);
        }
    }
}

fn entry(n: u64) -> LogEntry {
    let ts = Timestamp::from_nanos(1_795_760_217_000_000_000 + n as i64);
    LogEntry {
        id: Uuid::from_u128(u128::from(n) + 1),
        created_at: Timestamp::from_nanos(1),
        ..LogEntry::new(ts, LogLevel::Info, "svc", format!("message number {n}"))
    }
}

fn open(dir: &Path, segment_bytes: u64) -> (Wal, Recovered) {
    Wal::open(dir, segment_bytes, 0, Box::<SeenIds>::default(), None).unwrap()
}

fn messages(records: &[Arc<Record>]) -> Vec<String> {
    records
        .iter()
        .flat_map(|r| {
            r.lines()
                .map(|l| serde_json::from_slice::<LogEntry>(&l).unwrap().message)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn drain(reader: &mut WalReader) -> Vec<Arc<Record>> {
    let mut all = Vec::new();
    loop {
        let batch = reader
            .next_records(1 << 20, Duration::from_millis(50))
            .unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

#[tokio::test]
async fn appended_batches_reach_a_reader_in_order_with_their_json() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), 1 << 20);
    let mut reader = wal.reader("index").unwrap();
    for i in 0..3 {
        let appended = wal
            .append(Batch::new(&[entry(2 * i), entry(2 * i + 1)]))
            .await
            .unwrap();
        assert_eq!(appended.duplicates, vec![None, None]);
    }
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(messages(&records)[5], "message number 5");
    let line = records[1].lines().nth(1).unwrap();
    let parsed: LogEntry = serde_json::from_slice(&line).unwrap();
    assert_eq!(parsed, entry(3));
    assert_eq!(
        records[1].lsn, records[0].end,
        "LSNs are contiguous byte positions"
    );
}

#[tokio::test]
async fn duplicates_are_not_written_again_and_say_where_the_original_is() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), 1 << 20);
    let first = wal.append(Batch::new(&[entry(1)])).await.unwrap();
    let end_after_first = wal.end_lsn();
    let again = wal
        .append(Batch::new(&[entry(1), entry(2), entry(2)]))
        .await
        .unwrap();
    assert_eq!(again.duplicates[0], Some(first.visible_after));
    assert_eq!(again.duplicates[1], None);
    assert!(
        again.duplicates[2].is_some(),
        "a repeat inside one batch is a duplicate too"
    );
    let only_dups = wal.append(Batch::new(&[entry(1)])).await.unwrap();
    assert_eq!(only_dups.duplicates, vec![Some(first.visible_after)]);
    assert!(wal.end_lsn() > end_after_first);
    let mut reader = wal.reader("index").unwrap();
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    assert_eq!(
        messages(&records),
        vec!["message number 1", "message number 2"]
    );
}

#[tokio::test]
async fn a_reopened_wal_replays_from_the_committed_cursor_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _) = open(dir.path(), 1 << 20);
        let mut reader = wal.reader("index").unwrap();
        for i in 0..4 {
            wal.append(Batch::new(&[entry(i)])).await.unwrap();
        }
        let (reader, records) = tokio::task::spawn_blocking(move || {
            let r = reader.next_records(1, Duration::from_millis(50)).unwrap();
            (reader, r)
        })
        .await
        .unwrap();
        assert_eq!(records.len(), 1);
        reader.commit(records[0].end).unwrap();
    }
    // Simulate a crash in the middle of a write: garbage after the last record.
    let (_, segment) = list_segments(dir.path()).unwrap().pop().unwrap();
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(&[7, 0, 0, 0, 1, 0]).unwrap();
    drop(file);

    let (wal, recovered) = open(dir.path(), 1 << 20);
    assert_eq!(recovered.truncated_bytes, 6);
    assert_eq!(
        recovered.unapplied.len(),
        3,
        "the three entries the index had not applied"
    );
    let mut reader = wal.reader("index").unwrap();
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    assert_eq!(
        messages(&records),
        vec!["message number 1", "message number 2", "message number 3"]
    );
    // Appends continue cleanly after the cut.
    wal.append(Batch::new(&[entry(9)])).await.unwrap();
    let mut reader = wal.reader("other").unwrap();
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    assert_eq!(records.len(), 5);
}

#[tokio::test]
async fn segments_roll_and_are_deleted_once_every_consumer_passed_them() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), 1024 * 1024);
    let mut fast = wal.reader("fast").unwrap();
    let slow = wal.reader("slow").unwrap();
    let big = "x".repeat(300 * 1024);
    for i in 0..8 {
        let mut e = entry(i);
        e.message = big.clone();
        wal.append(Batch::new(&[e])).await.unwrap();
    }
    let segments_before = list_segments(dir.path()).unwrap().len();
    assert!(
        segments_before >= 2,
        "rolled into {segments_before} segments"
    );
    let end = wal.end_lsn();
    let (fast, records) = tokio::task::spawn_blocking(move || {
        let r = drain(&mut fast);
        (fast, r)
    })
    .await
    .unwrap();
    assert_eq!(records.len(), 8);
    fast.commit(end).unwrap();
    assert_eq!(
        list_segments(dir.path()).unwrap().len(),
        segments_before,
        "the slow consumer still needs them"
    );
    let stats = wal.stats();
    let slow_lag = stats.consumers.iter().find(|c| c.name == "slow").unwrap();
    assert_eq!(slow_lag.lag_entries, 8);
    assert_eq!(slow_lag.lag_bytes, end - slow.position());
    slow.commit(end).unwrap();
    assert_eq!(
        list_segments(dir.path()).unwrap().len(),
        1,
        "only the active one is kept"
    );
    assert_eq!(wal.stats().consumers[1].lag_entries, 0);
}

#[tokio::test]
async fn past_the_disk_cap_a_sink_skips_ahead_and_required_consumers_never_do() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), 1024 * 1024);
    wal.set_disk_cap(2 * 1024 * 1024);
    let mut index = wal.reader("index").unwrap();
    let mut sink = wal.optional_reader("loki").unwrap();
    async fn append(wal: &Wal, from: u64, to: u64) {
        let big = "x".repeat(300 * 1024);
        for i in from..to {
            let mut e = entry(i);
            e.message = format!("{i} {big}");
            wal.append(Batch::new(&[e])).await.unwrap();
        }
    }
    append(&wal, 0, 20).await;
    // The index has read nothing yet: nothing may go, whatever the cap.
    let before = list_segments(dir.path()).unwrap().len();
    sink.commit(sink.position()).unwrap();
    assert_eq!(list_segments(dir.path()).unwrap().len(), before);
    // The index catches up; the sink (its engine down) has not moved.
    let end = wal.end_lsn();
    let (index, read) = tokio::task::spawn_blocking(move || {
        let r = drain(&mut index);
        (index, r)
    })
    .await
    .unwrap();
    assert_eq!(read.len(), 20, "the index reads every entry");
    index.commit(end).unwrap();
    let kept: u64 = list_segments(dir.path())
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(kept <= 3 * 1024 * 1024, "{kept} bytes kept");
    let stats = wal.stats();
    let loki = stats.consumers.iter().find(|c| c.name == "loki").unwrap();
    let skipped = loki.overrun_entries;
    assert!(skipped > 0 && skipped < 20, "{loki:?}");
    assert_eq!(loki.lag_entries, 20 - skipped, "{loki:?}");
    let index_lag = stats.consumers.iter().find(|c| c.name == "index").unwrap();
    assert_eq!(index_lag.overrun_entries, 0);
    // The sink goes on from the oldest entry still kept, in order, to the end.
    let (_, rest) = tokio::task::spawn_blocking(move || {
        let r = drain(&mut sink);
        (sink, r)
    })
    .await
    .unwrap();
    let numbers: Vec<u64> = messages(&rest)
        .iter()
        .map(|m| m.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers, (skipped..20).collect::<Vec<_>>());
    // Without a cap, a consumer that does not move keeps everything.
    wal.set_disk_cap(0);
    append(&wal, 20, 30).await;
    let before = list_segments(dir.path()).unwrap().len();
    index.commit(wal.end_lsn()).unwrap();
    assert!(list_segments(dir.path()).unwrap().len() >= before);
}

#[tokio::test]
async fn a_reader_far_behind_reads_back_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), 1024 * 1024);
    for i in 0..50 {
        wal.append(Batch::new(&[entry(i)])).await.unwrap();
    }
    drop(wal);
    let (wal, recovered) = open(dir.path(), 1024 * 1024);
    assert_eq!(recovered.records, 50);
    let mut reader = wal.reader("index").unwrap();
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    assert_eq!(records.len(), 50);
    assert_eq!(messages(&records)[49], "message number 49");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_entry_survives_losing_what_was_not_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    {
        // Small segments, so acknowledgements also cross segment rolls.
        let (wal, _) = open(dir.path(), 1 << 20);
        let wal = Arc::new(wal);
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8u64 {
            let wal = wal.clone();
            tasks.spawn(async move {
                let mut ids = Vec::new();
                for i in 0..200u64 {
                    let batch = Batch::new(&[entry(task * 1000 + i)]);
                    let id = batch.ids[0];
                    wal.append(batch).await.unwrap();
                    ids.push(id);
                }
                ids
            });
        }
        while let Some(ids) = tasks.join_next().await {
            acknowledged.extend(ids.unwrap());
        }
    }
    // Power loss: whatever was written after a file's last sync is gone.
    segment::durable::lose_unsynced(dir.path());
    let (wal, recovered) = open(dir.path(), 1 << 20);
    assert_eq!(
        recovered.truncated_bytes, 0,
        "nothing unsynced was acknowledged"
    );
    let mut reader = wal.reader("check").unwrap();
    let records = tokio::task::spawn_blocking(move || drain(&mut reader))
        .await
        .unwrap();
    let stored: std::collections::HashSet<Uuid> = records
        .iter()
        .flat_map(|r| r.lines().filter_map(|l| id_of_line(&l)).collect::<Vec<_>>())
        .collect();
    let lost: Vec<&Uuid> = acknowledged
        .iter()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries were lost",
        lost.len()
    );
    assert_eq!(acknowledged.len(), 1600);
}

#[tokio::test]
async fn sealed_records_hold_no_plaintext_and_need_their_key_to_open() {
    use logging_common::crypto::Keyring;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keyring::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let keyring = Some(Arc::new(keys));
    let open_sealed = |keyring: Option<Arc<Keyring>>| {
        Wal::open(dir.path(), 1 << 20, 0, Box::<SeenIds>::default(), keyring)
    };
    let (wal, _) = open_sealed(keyring.clone()).unwrap();
    let appended = wal.append(Batch::new(&[entry(1), entry(2)])).await.unwrap();
    let mut reader = wal.reader("index").unwrap();
    assert_eq!(
        messages(&drain(&mut reader)),
        ["message number 1", "message number 2"]
    );
    drop(reader);
    drop(wal);
    let on_disk: Vec<u8> = list_segments(dir.path())
        .unwrap()
        .iter()
        .flat_map(|(_, path)| std::fs::read(path).unwrap())
        .collect();
    assert!(on_disk.len() as u64 >= appended.visible_after);
    assert!(!on_disk.windows(7).any(|w| w == b"message"));

    // Reopened with the key, the records read back from disk (not from memory).
    let (wal, recovered) = open_sealed(keyring).unwrap();
    assert_eq!(recovered.records, 1);
    assert_eq!(recovered.truncated_bytes, 0);
    let mut reader = wal.reader("index").unwrap();
    assert_eq!(messages(&drain(&mut reader)).len(), 2);
    drop(reader);
    drop(wal);
    // Without it, the WAL is refused naming the segment, and nothing is cut off.
    let error = open_sealed(None)
        .err()
        .expect("opened without the key")
        .to_string();
    assert!(
        error.contains(".wal") && error.contains("no encryption key is set"),
        "{error}"
    );
    assert_eq!(
        list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|(_, p)| std::fs::metadata(p).unwrap().len())
            .sum::<u64>(),
        on_disk.len() as u64
    );
}
