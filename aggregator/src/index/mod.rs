//! The embedded log store: day partitions of columnar blocks, written by the [`indexer`] from
//! the WAL and read by the API. `docs/storage.md` describes the format and why it was chosen.
//!
//! A day partition (`index/YYYY-MM-DD/`) holds **parts** (immutable files of blocks, see
//! [`part`]) and, in memory, the entries not yet flushed to one: full blocks, and the block
//! being filled. Everything a read needs is in those: a row is searchable as soon as the
//! indexer has added it to the block being filled. Partitioning by day makes retention a
//! directory removal and time filters a choice of directories; within a day, block
//! summaries (time range, levels, services) and Bloom filters decide which blocks are read.
//!
//! Exactly once: a part records the WAL range `[from, to)` it covers; on replay a partition
//! skips every record before the end of its last part, and the WAL cursor never passes the
//! oldest entry still only in memory.

pub mod archived;
pub mod block;
pub mod bloom;
pub mod indexer;
pub mod part;
pub mod patterns;
pub mod query;
pub mod query_language;
pub mod scan;
pub mod template;

use std::borrow::Cow;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logging_common::Timestamp;
use logging_common::crypto::Keyring;
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_64;

use block::{Block, BlockBuilder, BlockError, Summary};
use part::Part;
use query::{LogFilter, Order, Page, QueryError, SortPosition};
use scan::{Compiled, TemplateSet, View};

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// The dedup filter's hash of an entry id.
pub fn id_hash(id: &Uuid) -> u64 {
    xxh3_64(id.as_bytes())
}

/// A full block held in memory until its partition is flushed.
pub struct MemBlock {
    pub block: Block,
    pub slots: Vec<Vec<u32>>,
    pub summary: Summary,
}

/// What a day partition holds, swapped as a whole when a flush or merge changes it.
struct State {
    parts: Vec<Arc<Part>>,
    sealed: Vec<Arc<MemBlock>>,
    /// The block being filled; written by the indexer alone.
    open: Arc<RwLock<BlockBuilder>>,
}

/// One day of entries.
pub struct Partition {
    pub day: i64,
    pub dir: PathBuf,
    /// The store's keys: its parts are sealed with them.
    pub keyring: Option<Arc<Keyring>>,
    state: RwLock<State>,
    /// Rows added to it since the start: with [`LogIndex::generation`], what tells a cached
    /// answer over this day that it is stale.
    pub changes: AtomicU64,
}

/// A consistent view of a partition: what a read scans.
struct Snapshot {
    parts: Vec<Arc<Part>>,
    sealed: Vec<Arc<MemBlock>>,
}

impl Partition {
    /// The WAL position its parts cover up to (0 if none).
    pub fn committed_lsn(&self) -> u64 {
        self.state
            .read()
            .parts
            .iter()
            .map(|p| p.lsn_to)
            .max()
            .unwrap_or(0)
    }

    /// Runs `read` on a consistent view: the block being filled is read under its lock,
    /// taken while the partition's state is, so no row is seen twice or missed across a
    /// seal or a flush.
    fn with_snapshot<T>(&self, read: impl FnOnce(&Snapshot, &BlockBuilder) -> T) -> T {
        let state = self.state.read();
        let open = state.open.clone();
        let guard = open.read();
        let snapshot = Snapshot {
            parts: state.parts.clone(),
            sealed: state.sealed.clone(),
        };
        drop(state);
        read(&snapshot, &guard)
    }

    /// Whether it holds nothing, in parts or in memory.
    pub fn is_empty(&self) -> bool {
        self.state.read().parts.is_empty() && self.memtable_rows() == 0
    }

    /// Adds parts (restored from the archive), in WAL order with the others.
    pub fn add_parts(&self, parts: Vec<Arc<Part>>) {
        let mut state = self.state.write();
        state.parts.extend(parts);
        state.parts.sort_by_key(|p| p.lsn_from);
    }

    /// Removes the parts `remove` picks, and their files; returns how many.
    pub fn remove_parts(&self, remove: impl Fn(&Part) -> bool) -> Result<usize, IndexError> {
        let gone: Vec<Arc<Part>> = {
            let mut state = self.state.write();
            let (gone, kept) = std::mem::take(&mut state.parts)
                .into_iter()
                .partition(|p| remove(p));
            state.parts = kept;
            gone
        };
        for part in &gone {
            // Readers still holding the part keep its file open until they finish.
            std::fs::remove_file(&part.path)?;
        }
        if !gone.is_empty() {
            crate::wal::sync_dir(&self.dir)?;
        }
        Ok(gone.len())
    }

    /// Rows in memory, not yet in a part.
    pub fn memtable_rows(&self) -> usize {
        let state = self.state.read();
        state.sealed.iter().map(|b| b.block.rows()).sum::<usize>() + state.open.read().rows()
    }

    pub fn parts(&self) -> Vec<Arc<Part>> {
        self.state.read().parts.clone()
    }

    /// Bytes the entries not yet flushed take in memory.
    pub fn memory_bytes(&self) -> u64 {
        let state = self.state.read();
        state
            .sealed
            .iter()
            .map(|b| b.block.memory_bytes())
            .sum::<u64>()
            + state.open.read().block.memory_bytes()
    }
}

/// A day number as the partition's directory name (`2026-11-27`).
pub fn day_name(day: i64) -> String {
    let mut s = Timestamp::from_nanos(day.saturating_mul(NANOS_PER_DAY)).to_rfc3339();
    s.truncate(10);
    s
}

pub fn parse_day_name(name: &str) -> Option<i64> {
    if name.len() != 10 {
        return None;
    }
    Timestamp::parse_rfc3339(&format!("{name}T00:00:00Z"))
        .ok()
        .map(|t| t.day())
}

/// One entry of a result, as stored.
#[derive(Debug)]
pub struct FoundEntry {
    pub position: SortPosition,
    /// The entry's JSON, as the API returns it.
    pub json: Vec<u8>,
    pub highlight: Option<Highlight>,
}

/// Where the query matched in the message.
#[derive(Debug, Serialize)]
pub struct Highlight {
    /// A fragment of the message around the best match.
    pub fragment: String,
    /// Byte ranges within `fragment` that matched.
    pub ranges: Vec<[usize; 2]>,
}

/// A page of results.
#[derive(Debug)]
pub struct Found {
    pub entries: Vec<FoundEntry>,
    /// Where the next page starts, if there is one.
    pub next: Option<SortPosition>,
    /// Every match, when asked for.
    pub total: Option<u64>,
}

/// An analytics question.
#[derive(Clone, Debug)]
pub struct AnalyticsRequest {
    pub filter: LogFilter,
    pub start: Timestamp,
    pub end: Timestamp,
    pub interval_nanos: i64,
    pub value_field: Option<String>,
    pub top_patterns: usize,
}

impl AnalyticsRequest {
    /// How many `interval_nanos` buckets [start, end] spans.
    pub fn buckets(&self) -> usize {
        let span = i128::from(self.end.as_nanos()) - i128::from(self.start.as_nanos());
        usize::try_from(span.div_euclid(i128::from(self.interval_nanos)) + 1).unwrap_or(usize::MAX)
    }
}

/// Counts per level, by level rank.
pub type LevelCounts = [u64; 9];

/// What analytics counts.
#[derive(Debug, Default)]
pub struct AnalyticsFruit {
    pub by_level: Vec<LevelCounts>,
    /// (bucket, service) → count.
    pub by_service: HashMap<(usize, String), u64>,
    /// service → (total, errors).
    pub service_totals: HashMap<String, (u64, u64)>,
    pub values: Vec<f64>,
    /// More values, counted: f64 bits → how many.
    pub counted: HashMap<u64, u64, foldhash::fast::FixedState>,
}

/// A top message pattern.
#[derive(Debug, Serialize)]
pub struct PatternCount {
    pub pattern: String,
    pub count: u64,
    pub example: String,
}

/// Per-partition numbers for stats.
#[derive(Debug, Serialize)]
pub struct PartitionStats {
    pub day: String,
    pub entries: u64,
    /// Parts on disk, plus one for the entries still in memory.
    pub segments: usize,
    /// On disk, plus what the entries not yet flushed to a part take in memory.
    pub stored_bytes: u64,
    /// Entries searchable but not yet flushed to a part (kept in memory, replayed from the
    /// WAL after a crash).
    pub unflushed_entries: u64,
}

/// Totals over the whole store.
#[derive(Debug, Default)]
pub struct StatsTotals {
    pub entries: u64,
    pub raw_bytes: u64,
    pub by_service: HashMap<String, u64>,
}

#[derive(Debug)]
pub struct IndexStats {
    pub totals: StatsTotals,
    pub stored_bytes: u64,
    pub partitions: Vec<PartitionStats>,
}

/// How the store is set up.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    pub full_text: bool,
    pub compression: bool,
    /// Seals the parts it writes and opens sealed ones (encryption at rest).
    pub keyring: Option<Arc<Keyring>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(
        "{0} holds a store of the previous format (tantivy), which this version does not read; \
         move the directory out of DATA_DIR/index to start (its entries stay in it, and in any \
         engine the sinks fed)"
    )]
    OldFormat(String),
    #[error("embedded index I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<BlockError> for QueryError {
    fn from(error: BlockError) -> QueryError {
        QueryError::Index(IndexError::Block(error))
    }
}

/// The embedded store.
pub struct LogIndex {
    root: PathBuf,
    options: IndexOptions,
    partitions: RwLock<BTreeMap<i64, Arc<Partition>>>,
    /// Soft-deleted ids, by the day partition that holds them.
    hidden: RwLock<HashMap<i64, Vec<Uuid>>>,
    searchable: watch::Sender<u64>,
    /// What the archive asks the indexer to change ([`archived`]).
    archive_changes: parking_lot::Mutex<Vec<archived::ChangeRequest>>,
    /// With archiving on, the days the archive holds (retention waits for them).
    archived_days: RwLock<Option<std::collections::BTreeSet<i64>>>,
    /// Bumped by every change that is not rows added to a partition: a day created, dropped,
    /// restored or archived, an entry hidden.
    epoch: AtomicU64,
}

/// Which blocks of a partition a read looks at, in the order it looks.
enum Source {
    Sealed(usize),
    Part(usize, usize),
}

impl LogIndex {
    /// Opens every day partition under `root`.
    pub fn open(root: &Path, options: IndexOptions) -> Result<LogIndex, IndexError> {
        std::fs::create_dir_all(root)?;
        let mut partitions = BTreeMap::new();
        let mut max_lsn = 0;
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(day) = parse_day_name(&name) else {
                continue;
            };
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if entry.path().join("meta.json").exists() {
                return Err(IndexError::OldFormat(entry.path().display().to_string()));
            }
            let parts = open_parts(&entry.path(), options.keyring.as_deref())?;
            let partition = Partition {
                day,
                dir: entry.path(),
                keyring: options.keyring.clone(),
                state: RwLock::new(State {
                    parts,
                    sealed: Vec::new(),
                    open: Arc::new(RwLock::new(BlockBuilder::default())),
                }),
                changes: AtomicU64::new(0),
            };
            max_lsn = max_lsn.max(partition.committed_lsn());
            partitions.insert(day, Arc::new(partition));
        }
        let (searchable, _) = watch::channel(max_lsn);
        Ok(LogIndex {
            root: root.to_path_buf(),
            options,
            partitions: RwLock::new(partitions),
            hidden: RwLock::new(HashMap::new()),
            searchable,
            archive_changes: parking_lot::Mutex::new(Vec::new()),
            archived_days: RwLock::new(None),
            epoch: AtomicU64::new(0),
        })
    }

    pub fn full_text(&self) -> bool {
        self.options.full_text
    }

    /// The highest WAL position any partition has in a part.
    pub fn committed_lsn(&self) -> u64 {
        self.partitions
            .read()
            .values()
            .map(|p| p.committed_lsn())
            .max()
            .unwrap_or(0)
    }

    /// The partition for `day`, created if it does not exist yet (indexer only).
    pub fn partition_for_write(&self, day: i64) -> Result<Arc<Partition>, IndexError> {
        if let Some(p) = self.partitions.read().get(&day) {
            return Ok(p.clone());
        }
        let dir = self.root.join(day_name(day));
        std::fs::create_dir_all(&dir)?;
        let parts = open_parts(&dir, self.options.keyring.as_deref())?;
        let partition = Arc::new(Partition {
            day,
            dir,
            keyring: self.options.keyring.clone(),
            state: RwLock::new(State {
                parts,
                sealed: Vec::new(),
                open: Arc::new(RwLock::new(BlockBuilder::default())),
            }),
            changes: AtomicU64::new(0),
        });
        self.partitions.write().insert(day, partition.clone());
        self.changed();
        Ok(partition)
    }

    /// Removes a whole day (retention).
    pub fn drop_partition(&self, day: i64) -> Result<(), IndexError> {
        self.changed();
        let removed = self.partitions.write().remove(&day);
        self.hidden.write().remove(&day);
        if let Some(partition) = removed {
            // Readers still holding its files keep them open; the space is freed when they
            // finish.
            std::fs::remove_dir_all(&partition.dir)?;
        }
        Ok(())
    }

    /// The directory of `day`'s partition (whether it exists or not).
    pub fn day_dir(&self, day: i64) -> PathBuf {
        self.root.join(day_name(day))
    }

    pub fn days(&self) -> Vec<i64> {
        self.partitions.read().keys().copied().collect()
    }

    pub fn partition(&self, day: i64) -> Option<Arc<Partition>> {
        self.partitions.read().get(&day).cloned()
    }

    // --- near-real-time visibility ---

    /// Everything before this WAL position is searchable.
    pub fn searchable_lsn(&self) -> u64 {
        *self.searchable.borrow()
    }

    pub fn publish_searchable(&self, lsn: u64) {
        self.searchable.send_replace(lsn);
    }

    /// Waits until the entry written at `lsn` is searchable.
    pub async fn wait_searchable(&self, lsn: u64) {
        let mut rx = self.searchable.subscribe();
        let _ = rx.wait_for(|searchable| *searchable > lsn).await;
    }

    // --- what a cached answer depends on ---

    /// Records a change that is not rows added (see `epoch`).
    pub fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// What answers over `[start, end)` depend on: the same pair later means the same
    /// answer. Both halves only grow, so any change makes a different pair.
    pub fn generation(&self, start: Timestamp, end: Timestamp) -> (u64, u64) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let rows = self
            .partitions_between(Some(start.as_nanos()), Some(end.as_nanos()))
            .iter()
            .map(|p| p.changes.load(Ordering::Acquire))
            .sum();
        (epoch, rows)
    }

    // --- soft deletes ---

    /// Adds the soft-deleted ids of the relational store (at start-up, and periodically when
    /// replicas share the store) to those hidden; returns how many were new. Deletions are
    /// never undone, so this only adds.
    pub fn merge_hidden(&self, deleted: impl IntoIterator<Item = (Uuid, i64)>) -> usize {
        let mut hidden = self.hidden.write();
        let mut known: HashSet<Uuid> = hidden.values().flatten().copied().collect();
        let mut added = 0;
        for (id, day) in deleted {
            if known.insert(id) {
                hidden.entry(day).or_default().push(id);
                added += 1;
            }
        }
        if added > 0 {
            self.changed();
        }
        added
    }

    /// Hides an entry from every read, at once.
    pub fn hide(&self, id: Uuid, day: i64) {
        self.changed();
        let mut hidden = self.hidden.write();
        let ids = hidden.entry(day).or_default();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    /// Every soft-deleted id (for engines that hold entries the index hides).
    pub fn all_hidden(&self) -> Vec<Uuid> {
        self.hidden.read().values().flatten().copied().collect()
    }

    fn hidden_in(&self, day: i64) -> HashSet<Uuid> {
        self.hidden
            .read()
            .get(&day)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    // --- reads ---

    /// Partitions overlapping [start, end), newest first.
    fn partitions_between(
        &self,
        start: Option<i64>,
        end_exclusive: Option<i64>,
    ) -> Vec<Arc<Partition>> {
        let first = start.map_or(i64::MIN, |s| s.div_euclid(NANOS_PER_DAY));
        let last = end_exclusive.map_or(i64::MAX, |e| (e - 1).div_euclid(NANOS_PER_DAY));
        if first > last {
            return Vec::new();
        }
        self.partitions
            .read()
            .range(first..=last)
            .rev()
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Finds the day partition holding `id`, soft-deleted or not.
    pub fn locate(&self, id: Uuid) -> Result<Option<i64>, IndexError> {
        Ok(self.find(id)?.map(|(day, _)| day))
    }

    /// The day and stored line of `id`, soft-deleted or not.
    fn find(&self, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, IndexError> {
        let mut candidates: Vec<Arc<Partition>> =
            self.partitions.read().values().cloned().collect();
        // A UUIDv7 made from the entry's timestamp names its day and its millisecond.
        let millis = (id.get_version_num() == 7).then(|| {
            let b = id.as_bytes();
            i64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
        });
        if let Some(ms) = millis {
            let day = (ms * 1_000_000).div_euclid(NANOS_PER_DAY);
            candidates.sort_by_key(|p| p.day != day);
        }
        let hash = bloom::id_hash(&id);
        for partition in candidates {
            let found = partition.with_snapshot(
                |snapshot, open| -> Result<Option<Vec<u8>>, BlockError> {
                    let open_summary = open.block.summary();
                    let mut views: Vec<View<'_>> = vec![View::memory(
                        &open.block,
                        open.slots(),
                        Cow::Owned(open_summary),
                    )];
                    views.extend(
                        snapshot
                            .sealed
                            .iter()
                            .map(|m| View::memory(&m.block, &m.slots, Cow::Borrowed(&m.summary))),
                    );
                    for part in &snapshot.parts {
                        views.extend((0..part.blocks.len()).map(|b| View::disk(part, b)));
                    }
                    for view in &views {
                        let s = view.summary();
                        let by_time = millis.is_some_and(|ms| {
                            let (lo, hi) = (ms * 1_000_000, ms * 1_000_000 + 999_999);
                            s.ts_min <= hi && s.ts_max >= lo
                        });
                        let by_bloom = || view.bloom_allows(&[hash]);
                        if s.rows == 0 || !(by_time || by_bloom()?) {
                            continue;
                        }
                        if let Some(row) = view.ids()?.iter().position(|i| *i == id) {
                            return Ok(view.lines(&[row])?.pop());
                        }
                    }
                    Ok(None)
                },
            )?;
            if let Some(line) = found {
                return Ok(Some((partition.day, line)));
            }
        }
        Ok(None)
    }

    /// The stored JSON of a visible (not soft-deleted) entry, and its day.
    pub fn get(&self, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, IndexError> {
        let Some((day, line)) = self.find(id)? else {
            return Ok(None);
        };
        if self.hidden_in(day).contains(&id) {
            return Ok(None);
        }
        Ok(Some((day, api_json(line))))
    }

    /// Visits the id hash of every stored entry (to fill the dedup filter at start-up).
    pub fn for_each_id_hash(&self, mut visit: impl FnMut(u64)) -> Result<u64, IndexError> {
        let mut n = 0;
        let partitions: Vec<Arc<Partition>> = self.partitions.read().values().cloned().collect();
        for partition in partitions {
            partition.with_snapshot(|snapshot, open| -> Result<(), BlockError> {
                for id in &open.block.ids {
                    visit(id_hash(id));
                    n += 1;
                }
                for sealed in &snapshot.sealed {
                    for id in &sealed.block.ids {
                        visit(id_hash(id));
                        n += 1;
                    }
                }
                for part in &snapshot.parts {
                    for b in 0..part.blocks.len() {
                        let ts = part.ts(b)?;
                        for id in part.ids(b, &ts)? {
                            visit(id_hash(&id));
                            n += 1;
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(n)
    }

    /// A page of entries matching `filter`, sorted by (timestamp, sequence).
    pub fn search(&self, filter: &LogFilter, page: &Page) -> Result<Found, QueryError> {
        self.search_compiled(filter, page, Compiled::new(filter))
    }

    /// A page of the entries matching `filter` that were written at WAL sequences in `seqs`
    /// (what arrived since a tail last looked), sorted by (timestamp, sequence).
    pub fn search_written(
        &self,
        filter: &LogFilter,
        page: &Page,
        seqs: std::ops::Range<u64>,
    ) -> Result<Found, QueryError> {
        self.search_compiled(filter, page, Compiled::new(filter).written_in(seqs))
    }

    fn search_compiled(
        &self,
        filter: &LogFilter,
        page: &Page,
        query: Compiled,
    ) -> Result<Found, QueryError> {
        if filter.text.is_some() && !self.options.full_text {
            return Err(QueryError::invalid(
                "q",
                "full-text search is off (LOG_INDEXING_ENABLED=false)",
            ));
        }
        let bound = page.after.map(|a| (page.order, a));
        let (lower, upper) = bounds(filter, page);
        let mut partitions = self.partitions_between(lower, upper);
        if page.order == Order::Asc {
            partitions.reverse();
        }
        let wanted = page.limit + 1;
        let mut best = Best::new(wanted, page.order);
        let mut total = 0u64;
        for partition in partitions {
            if best.full() && !page.with_total {
                break;
            }
            let hidden = self.hidden_in(partition.day);
            partition.with_snapshot(|snapshot, open| -> Result<(), QueryError> {
                // The block being filled, first: it holds the newest entries, and its lock is
                // held only while it is read.
                let summary = open.block.summary();
                let view = View::memory(&open.block, open.slots(), Cow::Owned(summary));
                total += collect(&view, &query, &hidden, bound, &mut best)?;
                drop(view);
                let mut sources: Vec<(Source, &Summary)> = snapshot
                    .sealed
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (Source::Sealed(i), &m.summary))
                    .collect();
                for (p, part) in snapshot.parts.iter().enumerate() {
                    sources.extend(
                        part.blocks
                            .iter()
                            .enumerate()
                            .map(|(b, entry)| (Source::Part(p, b), &entry.summary)),
                    );
                }
                // Blocks most likely to fill the page first, so the others can be skipped.
                match page.order {
                    Order::Desc => sources.sort_by_key(|(_, s)| std::cmp::Reverse(s.ts_max)),
                    Order::Asc => sources.sort_by_key(|(_, s)| s.ts_min),
                }
                for (source, summary) in sources {
                    if best.beats_block(summary) {
                        if !page.with_total {
                            continue;
                        }
                        // Only counted: from the block's counts where they answer.
                        if let Source::Part(p, b) = source {
                            let view = View::disk(&snapshot.parts[p], b);
                            if let Some(n) =
                                scan::count_without_rows(&view, &query, &hidden, bound)?
                            {
                                total += n;
                                continue;
                            }
                        }
                    }
                    let view = match source {
                        Source::Sealed(i) => {
                            let m = &snapshot.sealed[i];
                            View::memory(&m.block, &m.slots, Cow::Borrowed(&m.summary))
                        }
                        Source::Part(p, b) => View::disk(&snapshot.parts[p], b),
                    };
                    total += collect(&view, &query, &hidden, bound, &mut best)?;
                }
                Ok(())
            })?;
        }
        let mut rows = best.into_sorted();
        let next = (rows.len() > page.limit).then(|| rows[page.limit - 1].0);
        rows.truncate(page.limit);
        let phrases = if page.highlight {
            query.highlight_words()
        } else {
            Vec::new()
        };
        let entries = rows
            .into_iter()
            .map(|(position, line)| {
                let highlight = if phrases.is_empty() {
                    None
                } else {
                    scan::highlight(&message_of(&line), &phrases, 200)
                        .map(|(fragment, ranges)| Highlight { fragment, ranges })
                };
                FoundEntry {
                    position,
                    json: api_json(line),
                    highlight,
                }
            })
            .collect();
        Ok(Found {
            entries,
            next,
            total: page.with_total.then_some(total),
        })
    }

    /// The lower-cased words of every JSON key of the entries stored in `[start, end)`
    /// (nanoseconds; more is allowed): what a search over whole lines must not expect the
    /// values' words to answer for.
    pub fn key_words(&self, start: i64, end: i64) -> Result<HashSet<Box<str>>, QueryError> {
        let mut out: HashSet<Box<str>> = HashSet::new();
        let mut add = |set: &Arc<TemplateSet>| out.extend(set.key_words().iter().cloned());
        for partition in self.partitions_between(Some(start), Some(end)) {
            partition.with_snapshot(|snapshot, open| -> Result<(), QueryError> {
                let summary = open.block.summary();
                let view = View::memory(&open.block, open.slots(), Cow::Owned(summary));
                add(&view.template_set_arc()?);
                for m in &snapshot.sealed {
                    let view = View::memory(&m.block, &m.slots, Cow::Borrowed(&m.summary));
                    add(&view.template_set_arc()?);
                }
                for part in &snapshot.parts {
                    add(&part.templates()?);
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Counts over time, error rates, top patterns and a numeric field's distribution.
    pub fn analytics(
        &self,
        request: &AnalyticsRequest,
    ) -> Result<(AnalyticsFruit, Vec<PatternCount>), QueryError> {
        if request.filter.text.is_some() && !self.options.full_text {
            return Err(QueryError::invalid(
                "q",
                "full-text search is off (LOG_INDEXING_ENABLED=false)",
            ));
        }
        let mut filter = request.filter.clone();
        filter.start = Some(request.start);
        filter.end = Some(request.end);
        let query = Compiled::new(&filter);
        let buckets = request.buckets();
        let field_path = request.value_field.as_ref().map(|f| format!("context.{f}"));
        let by_level = vec![[0; 9]; buckets];
        let mut counter = Counter {
            query: &query,
            hidden: HashSet::new(),
            request,
            field_path: field_path.as_deref(),
            out: AnalyticsFruit {
                by_level,
                ..Default::default()
            },
            patterns: HashMap::new(),
        };
        for partition in self.partitions_between(
            filter.start.map(|t| t.as_nanos()),
            filter.end.map(|t| t.as_nanos()),
        ) {
            counter.hidden = self.hidden_in(partition.day);
            partition.with_snapshot(|snapshot, open| -> Result<(), QueryError> {
                let summary = open.block.summary();
                counter.memory(&View::memory(
                    &open.block,
                    open.slots(),
                    Cow::Owned(summary),
                ))?;
                for m in &snapshot.sealed {
                    counter.memory(&View::memory(&m.block, &m.slots, Cow::Borrowed(&m.summary)))?;
                }
                for part in &snapshot.parts {
                    counter.part(part)?;
                }
                Ok(())
            })?;
        }
        let Counter { out, patterns, .. } = counter;
        // The top N without sorting every pattern: select, then sort the N.
        let mut top: Vec<(String, u64, String)> = patterns
            .into_iter()
            .map(|(p, (n, example))| (p.into(), n, example))
            .collect();
        let by_count = |a: &(String, u64, String), b: &(String, u64, String)| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        };
        if top.len() > request.top_patterns && request.top_patterns > 0 {
            top.select_nth_unstable_by(request.top_patterns - 1, by_count);
        }
        top.truncate(request.top_patterns);
        top.sort_by(by_count);
        let top = top
            .into_iter()
            .map(|(pattern, count, example)| PatternCount {
                pattern,
                count,
                example,
            })
            .collect();
        Ok((out, top))
    }

    /// Totals over the whole store.
    pub fn stats(&self) -> Result<IndexStats, IndexError> {
        let mut totals = StatsTotals::default();
        let mut partitions = Vec::new();
        let mut stored_bytes = 0;
        let snapshot: Vec<Arc<Partition>> = self.partitions.read().values().cloned().collect();
        for partition in snapshot {
            let hidden = self.hidden_in(partition.day);
            let (entries, segments) =
                partition.with_snapshot(|snapshot, open| -> Result<(u64, usize), BlockError> {
                    let mut entries = 0u64;
                    let mut add = |summary: &Summary| {
                        entries += u64::from(summary.rows);
                        totals.raw_bytes += summary.raw_bytes;
                        for (json, n) in &summary.services {
                            let name = serde_json::from_str::<String>(json)
                                .unwrap_or_else(|_| json.clone());
                            *totals.by_service.entry(name).or_default() += u64::from(*n);
                        }
                    };
                    add(&open.block.summary());
                    for m in &snapshot.sealed {
                        add(&m.summary);
                    }
                    for part in &snapshot.parts {
                        for b in &part.blocks {
                            add(&b.summary);
                        }
                    }
                    // Soft-deleted entries are not counted: find them, and take them off.
                    if !hidden.is_empty() {
                        let mut views: Vec<View<'_>> = vec![View::memory(
                            &open.block,
                            open.slots(),
                            Cow::Owned(open.block.summary()),
                        )];
                        views.extend(
                            snapshot.sealed.iter().map(|m| {
                                View::memory(&m.block, &m.slots, Cow::Borrowed(&m.summary))
                            }),
                        );
                        for part in &snapshot.parts {
                            views.extend((0..part.blocks.len()).map(|b| View::disk(part, b)));
                        }
                        for view in &views {
                            let rows: Vec<usize> = view
                                .ids()?
                                .iter()
                                .enumerate()
                                .filter(|(_, id)| hidden.contains(id))
                                .map(|(i, _)| i)
                                .collect();
                            if rows.is_empty() {
                                continue;
                            }
                            let service = view.service()?;
                            for (row, line) in rows.iter().zip(view.lines(&rows)?) {
                                entries -= 1;
                                totals.raw_bytes =
                                    totals.raw_bytes.saturating_sub(line.len() as u64);
                                let name = view.service_name(service[*row] as usize);
                                if let Some(n) = totals.by_service.get_mut(&name) {
                                    *n = n.saturating_sub(1);
                                }
                            }
                        }
                    }
                    Ok((entries, snapshot.parts.len() + 1))
                })?;
            totals.entries += entries;
            let bytes = dir_size(&partition.dir) + partition.memory_bytes();
            stored_bytes += bytes;
            partitions.push(PartitionStats {
                day: day_name(partition.day),
                entries,
                segments,
                stored_bytes: bytes,
                unflushed_entries: partition.memtable_rows() as u64,
            });
        }
        totals.by_service.retain(|_, n| *n > 0);
        Ok(IndexStats {
            totals,
            stored_bytes,
            partitions,
        })
    }

    /// Bytes on disk of the whole store.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.root)
    }
}

/// Opens the parts of a partition directory: leftovers of an interrupted write (`.tmp`) and
/// of an interrupted merge (a part inside another's range) are removed.
fn open_parts(dir: &Path, keyring: Option<&Keyring>) -> Result<Vec<Arc<Part>>, IndexError> {
    let mut found: Vec<(u64, u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        if let Some((from, to)) = part::parse_file_name(&name) {
            found.push((from, to, entry.path()));
        }
    }
    found.sort_by_key(|(from, to, _)| (*from, std::cmp::Reverse(*to)));
    let restored = archived::read_restored(dir);
    let mut parts: Vec<Arc<Part>> = Vec::new();
    for (from, to, path) in found {
        if parts.iter().any(|p| p.lsn_from <= from && to <= p.lsn_to) {
            tracing::info!(part = %path.display(), "removing a part a finished merge replaced");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let mut part = Part::open(&path, keyring)?;
        part.archived = restored.contains(archived::file_name(&part));
        parts.push(Arc::new(part));
    }
    parts.sort_by_key(|p| p.lsn_from);
    Ok(parts)
}

/// The best `limit` rows seen so far, in a read's order, with their lines.
struct Best {
    limit: usize,
    order: Order,
    /// Max-heap on the sort key turned so that the worst row kept is on top.
    heap: BinaryHeap<(u128, Vec<u8>)>,
}

impl Best {
    fn new(limit: usize, order: Order) -> Best {
        Best {
            limit,
            order,
            heap: BinaryHeap::new(),
        }
    }

    /// The heap's key: larger is worse.
    fn key(&self, position: SortPosition) -> u128 {
        match self.order {
            Order::Asc => position.key(),
            Order::Desc => u128::MAX - position.key(),
        }
    }

    fn full(&self) -> bool {
        self.heap.len() >= self.limit
    }

    fn worst(&self) -> Option<u128> {
        self.heap.peek().map(|(k, _)| *k)
    }

    /// Whether a row at `position` would be kept.
    fn wants(&self, position: SortPosition) -> bool {
        !self.full() || self.worst().is_some_and(|w| self.key(position) < w)
    }

    /// Whether every row of a block is worse than what is kept.
    fn beats_block(&self, summary: &Summary) -> bool {
        if !self.full() {
            return false;
        }
        let best_possible = match self.order {
            Order::Desc => SortPosition {
                ts: summary.ts_max,
                seq: summary.seq_max,
            },
            Order::Asc => SortPosition {
                ts: summary.ts_min,
                seq: summary.seq_min,
            },
        };
        !self.wants(best_possible)
    }

    fn push(&mut self, position: SortPosition, line: Vec<u8>) {
        let key = self.key(position);
        self.heap.push((key, line));
        if self.heap.len() > self.limit {
            self.heap.pop();
        }
    }

    fn into_sorted(self) -> Vec<(SortPosition, Vec<u8>)> {
        let order = self.order;
        let mut rows: Vec<(u128, Vec<u8>)> = self.heap.into_vec();
        rows.sort_by_key(|(k, _)| *k);
        rows.into_iter()
            .map(|(k, line)| {
                let key = match order {
                    Order::Asc => k,
                    Order::Desc => u128::MAX - k,
                };
                (SortPosition::from_key(key), line)
            })
            .collect()
    }
}

/// Scans one block for a page: counts every match, keeps the best rows (with their lines).
fn collect(
    view: &View<'_>,
    query: &Compiled,
    hidden: &HashSet<Uuid>,
    bound: Option<(Order, SortPosition)>,
    best: &mut Best,
) -> Result<u64, QueryError> {
    let mut total = 0u64;
    let mut kept: Vec<(SortPosition, usize)> = Vec::new();
    let mut local = Best::new(best.limit, best.order);
    let mut failed = None;
    // Rows are in arrival order, not sort order: every row of the block is looked at. The
    // sort columns are read only once a row matches (a block the summary rules out costs
    // nothing).
    scan::scan(view, query, hidden, bound, false, |row, _| {
        total += 1;
        let position = match (view.ts(), view.seq()) {
            (Ok(ts), Ok(seq)) => SortPosition {
                ts: ts[row],
                seq: seq[row],
            },
            (Err(error), _) | (_, Err(error)) => {
                failed = Some(error);
                return false;
            }
        };
        if best.wants(position) && local.wants(position) {
            local.push(position, Vec::new());
            kept.push((position, row));
        }
        true
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    if kept.is_empty() {
        return Ok(total);
    }
    // The rows that made this block's own top: their lines, once.
    let cut = local.worst();
    kept.retain(|(p, _)| cut.is_none_or(|w| local.key(*p) <= w));
    kept.sort_by_key(|(_, row)| *row);
    let rows: Vec<usize> = kept.iter().map(|(_, r)| *r).collect();
    let lines = view.lines(&rows)?;
    for ((position, _), line) in kept.into_iter().zip(lines) {
        if best.wants(position) {
            best.push(position, line);
        }
    }
    Ok(total)
}

/// Rows counted per template of one template set (a part's dictionary, or a block's own
/// templates), and the (block, row) where each was first seen.
#[derive(Default)]
struct Tally {
    counts: Vec<u64>,
    first: Vec<(usize, usize)>,
}

impl Tally {
    fn new(templates: usize) -> Tally {
        Tally {
            counts: vec![0; templates],
            first: vec![(usize::MAX, usize::MAX); templates],
        }
    }
}

/// The message of row `row` (of template `t`) of a block, where it is text.
fn example(view: &View<'_>, t: usize, row: usize) -> Result<Option<String>, QueryError> {
    let Some(info) = view.templates()?.get(t) else {
        return Ok(None);
    };
    let Some(message) = info.message() else {
        return Ok(None);
    };
    // A block counted from its counts names no row: the template's first.
    let row = if row == usize::MAX {
        match view.template()?.iter().position(|x| *x as usize == t) {
            Some(row) => row,
            None => return Ok(None),
        }
    } else {
        row
    };
    let at = view.positions_at(row)?;
    Ok(Some(view.value_text(info, message, &at)?))
}

/// The analytics of one view's blocks, then of its parts' templates.
struct Counter<'r> {
    query: &'r Compiled,
    hidden: HashSet<Uuid>,
    request: &'r AnalyticsRequest,
    field_path: Option<&'r str>,
    out: AnalyticsFruit,
    patterns: HashMap<Box<str>, (u64, String)>,
}

impl Counter<'_> {
    /// Counts the blocks of a part, then names its templates' patterns once.
    fn part(&mut self, part: &Arc<Part>) -> Result<(), QueryError> {
        let mut tally = Tally::default();
        let mut set = None;
        for b in 0..part.blocks.len() {
            let view = View::disk(part, b);
            if view.rows() == 0 || self.query.excludes_block(view.summary()) {
                continue;
            }
            let templates = view.template_set_arc()?;
            if tally.counts.len() != templates.infos.len() {
                tally = Tally::new(templates.infos.len());
            }
            self.block(&view, b, &mut tally)?;
            set = Some(templates);
        }
        if let Some(set) = set {
            // Examples of one block share its decoded columns.
            let mut views: HashMap<usize, View<'_>> = HashMap::new();
            self.name_patterns(&set, &tally, |t, b, row| {
                example(
                    views.entry(b).or_insert_with(|| View::disk(part, b)),
                    t,
                    row,
                )
            })?;
        }
        Ok(())
    }

    /// Counts a block in memory and names its patterns.
    fn memory(&mut self, view: &View<'_>) -> Result<(), QueryError> {
        if view.rows() == 0 || self.query.excludes_block(view.summary()) {
            return Ok(());
        }
        let set = view.template_set_arc()?;
        let mut tally = Tally::new(set.infos.len());
        self.block(view, 0, &mut tally)?;
        self.name_patterns(&set, &tally, |t, _, row| example(view, t, row))
    }

    /// Adds the patterns of the counted templates of `set`; an example (of template `t`
    /// at block `b`, row `row`) is read only for a pattern not seen before.
    fn name_patterns(
        &mut self,
        set: &TemplateSet,
        tally: &Tally,
        mut example: impl FnMut(usize, usize, usize) -> Result<Option<String>, QueryError>,
    ) -> Result<(), QueryError> {
        let patterns = set.message_patterns();
        for (t, &count) in tally.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let Some(Some(pattern)) = patterns.get(t) else {
                continue;
            };
            if let Some(entry) = self.patterns.get_mut(pattern) {
                entry.0 += count;
                continue;
            }
            let (block, row) = tally.first[t];
            if let Some(example) = example(t, block, row)? {
                self.patterns.insert(pattern.clone(), (count, example));
            }
        }
        Ok(())
    }

    /// Adds one block's matching rows (block number `b` of its part) to the analytics and
    /// to `tally`.
    fn block(&mut self, view: &View<'_>, b: usize, tally: &mut Tally) -> Result<(), QueryError> {
        if self.block_from_counts(view, b, tally)? {
            return Ok(());
        }
        let out = &mut self.out;
        let start = self.request.start.as_nanos();
        let interval = self.request.interval_nanos;
        let buckets = out.by_level.len();
        let services = view.summary().services.len();
        // Counts by (bucket, service number), dense where that is small, then named once.
        let dense = buckets.saturating_mul(services.max(1)) <= 1 << 16;
        let mut by_service_dense = if dense {
            vec![0u64; buckets * services]
        } else {
            Vec::new()
        };
        let mut by_service: HashMap<(usize, u32), u64> = HashMap::new();
        let mut totals = vec![(0u64, 0u64); services];
        let templates = view.templates()?;
        // The numeric field: per template, the path and place of its one variable, if any.
        let field: Vec<Option<(u32, usize)>> = match self.field_path {
            None => Vec::new(),
            Some(path) => templates
                .iter()
                .map(|info| {
                    let placed = info
                        .values
                        .iter()
                        .find(|p| p.value.number && p.value.path == path)?;
                    let [template::Piece::Var(k)] = placed.value.pieces.as_slice() else {
                        return None;
                    };
                    let k = placed.first as usize + k;
                    let column = *info.slots.get(k)?;
                    let before = info.slots[..k].iter().filter(|c| **c == column).count();
                    Some((column, before))
                })
                .collect(),
        };
        let wants_values = field.iter().any(Option::is_some);
        let ts = view.ts()?;
        let levels = view.levels()?;
        let service = view.service()?;
        let template = view.template()?;
        let error_rank = logging_common::LogLevel::Error.rank();
        let mut failed = None;
        let counts = &mut tally.counts;
        let first = &mut tally.first;
        scan::scan(
            view,
            self.query,
            &self.hidden,
            None,
            wants_values,
            |row, at| {
                let bucket =
                    usize::try_from((ts[row] - start).div_euclid(interval)).unwrap_or(usize::MAX);
                let level = levels[row] as usize;
                let s = service[row];
                if bucket < buckets && level < 9 {
                    out.by_level[bucket][level] += 1;
                    if dense {
                        by_service_dense[bucket * services + s as usize] += 1;
                    } else {
                        *by_service.entry((bucket, s)).or_default() += 1;
                    }
                }
                let total = &mut totals[s as usize];
                total.0 += 1;
                if levels[row] >= error_rank {
                    total.1 += 1;
                }
                let t = template[row] as usize;
                if let Some(n) = counts.get_mut(t) {
                    *n += 1;
                    if first[t].0 == usize::MAX {
                        first[t] = (b, row);
                    }
                }
                if let Some(Some((column, before))) = field.get(t) {
                    match view.column(*column as usize) {
                        Ok(values) => {
                            let position =
                                at.get(*column as usize).copied().unwrap_or(0) as usize + before;
                            if let Some(number) = values
                                .get(position)
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(|v| v.parse::<f64>().ok())
                                .filter(|v| v.is_finite())
                            {
                                out.values.push(number);
                            }
                        }
                        Err(error) => {
                            failed = Some(error);
                            return false;
                        }
                    }
                }
                true
            },
        )?;
        if let Some(error) = failed {
            return Err(error.into());
        }
        for (i, count) in by_service_dense.into_iter().enumerate() {
            if count > 0 {
                by_service.insert((i / services, (i % services) as u32), count);
            }
        }
        for ((bucket, n), count) in by_service {
            *out.by_service
                .entry((bucket, view.service_name(n as usize)))
                .or_default() += count;
        }
        for (n, (total, errors)) in totals.into_iter().enumerate() {
            if total > 0 {
                let entry = out.service_totals.entry(view.service_name(n)).or_default();
                entry.0 += total;
                entry.1 += errors;
            }
        }
        Ok(())
    }
}

impl Counter<'_> {
    /// Adds a block from its counts alone, where they say everything: no terms, no numeric
    /// field, nothing hidden, the block wholly inside the range and inside one bucket, and the
    /// level and service filters keeping all of its rows or none. Whether it did.
    fn block_from_counts(
        &mut self,
        view: &View<'_>,
        b: usize,
        tally: &mut Tally,
    ) -> Result<bool, QueryError> {
        let summary = view.summary();
        if self.query.has_terms()
            || !self.hidden.is_empty()
            || !scan::covers_block(self.query, summary, None)
        {
            return Ok(false);
        }
        let Some(counts) = view.counts()? else {
            return Ok(false);
        };
        let (kept, all) = scan::count_filtered(view, self.query, counts);
        if kept == 0 {
            return Ok(true);
        }
        let start = self.request.start.as_nanos();
        let interval = self.request.interval_nanos;
        let bucket_of = |ts: i64| usize::try_from((ts - start).div_euclid(interval)).ok();
        let (Some(first), Some(last)) = (bucket_of(summary.ts_min), bucket_of(summary.ts_max))
        else {
            return Ok(false);
        };
        if kept != all || last >= self.out.by_level.len() {
            return Ok(false);
        }
        // The numeric field: counted in the block, or absent from it.
        let numbers = match self.field_path {
            None => None,
            Some(path) => match view
                .numbers()?
                .and_then(|numbers| numbers.iter().find(|(p, _)| p == path))
            {
                Some((_, values)) => Some(values),
                None if summary
                    .paths
                    .iter()
                    .any(|p| p == path || p == block::OTHER_PATHS) =>
                {
                    return Ok(false);
                }
                None => None,
            },
        };
        for (v, n) in numbers.into_iter().flatten() {
            *self.out.counted.entry(v.to_bits()).or_default() += u64::from(*n);
        }
        let error_rank = logging_common::LogLevel::Error.rank();
        if first != last {
            // Across buckets: each row's bucket from its timestamp, nothing else read.
            let services = summary.services.len();
            let buckets = last - first + 1;
            let mut by_service = vec![0u64; buckets * services];
            let (ts, levels, service) = (view.ts()?, view.levels()?, view.service()?);
            for ((ts, level), s) in ts.iter().zip(levels).zip(service) {
                let b = bucket_of(*ts).unwrap_or(first).clamp(first, last);
                if let Some(n) = self.out.by_level[b].get_mut(*level as usize) {
                    *n += 1;
                }
                by_service[(b - first) * services + *s as usize] += 1;
            }
            for (i, n) in by_service.into_iter().enumerate() {
                if n > 0 {
                    let name = view.service_name(i % services);
                    *self
                        .out
                        .by_service
                        .entry((first + i / services, name))
                        .or_default() += n;
                }
            }
        }
        for &(s, level, n) in &counts.service_levels {
            let n = u64::from(n);
            let name = view.service_name(s as usize);
            if first == last {
                if let Some(by_level) = self.out.by_level[first].get_mut(level as usize) {
                    *by_level += n;
                }
                *self
                    .out
                    .by_service
                    .entry((first, name.clone()))
                    .or_default() += n;
            }
            let total = self.out.service_totals.entry(name).or_default();
            total.0 += n;
            if level >= error_rank {
                total.1 += n;
            }
        }
        for &(t, n) in &counts.templates {
            let t = t as usize;
            if let Some(count) = tally.counts.get_mut(t) {
                *count += u64::from(n);
                if tally.first[t].0 == usize::MAX {
                    // Some row of block `b`: found when the example is read.
                    tally.first[t] = (b, usize::MAX);
                }
            }
        }
        Ok(true)
    }
}

/// The time bounds a read touches, as nanoseconds: [lower, upper).
fn bounds(filter: &LogFilter, page: &Page) -> (Option<i64>, Option<i64>) {
    let mut lower = filter.start.map(|t| t.as_nanos());
    let mut upper = filter.end.map(|t| t.as_nanos());
    if let Some(after) = page.after {
        match page.order {
            Order::Desc => {
                upper = Some(upper.map_or(after.ts.saturating_add(1), |u| {
                    u.min(after.ts.saturating_add(1))
                }))
            }
            Order::Asc => lower = Some(lower.map_or(after.ts, |l| l.max(after.ts))),
        }
    }
    (lower, upper)
}

/// The stored (compact) form of an entry, expanded to every field as the API returns it.
pub(crate) fn api_json(stored: Vec<u8>) -> Vec<u8> {
    let archived = stored.ends_with(ARCHIVED);
    match serde_json::from_slice::<logging_common::LogEntry>(&stored) {
        Ok(entry) => {
            let mut json = entry.to_api_json();
            if archived {
                mark_archived(&mut json);
            }
            json
        }
        Err(_) => stored,
    }
}

/// How the line of an entry restored from the archive ends.
const ARCHIVED: &[u8] = b",\"archived\":true}";

/// Marks an entry's JSON object as restored from the archive.
pub(crate) fn mark_archived(json: &mut Vec<u8>) {
    if json.last() == Some(&b'}') && !json.ends_with(ARCHIVED) {
        json.pop();
        json.extend_from_slice(ARCHIVED);
    }
}

pub(crate) fn message_of(json: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_slice::<Message>(json)
        .map(|m| m.message)
        .unwrap_or_default()
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests;
