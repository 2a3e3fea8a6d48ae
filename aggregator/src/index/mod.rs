//! The embedded log store: a tantivy full-text index per UTC day.
//!
//! Partitioning by day is what makes retention cheap (a whole directory is dropped) and time
//! filters fast (a query for the last hour opens one partition). The [`indexer`] thread feeds
//! it from the WAL; this module answers reads: listings and searches sorted by (timestamp,
//! ingest sequence) with cursors, lookups by id, analytics and stats.
//!
//! Reads are near-real-time: a partition's reader is reloaded after each commit, and
//! [`LogIndex::searchable_lsn`] says up to which WAL position everything is visible.

pub mod collect;
pub mod indexer;
pub mod patterns;
pub mod query;
pub mod query_language;
pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use logging_common::Timestamp;
use parking_lot::RwLock;
use serde::Serialize;
use tantivy::collector::{Count, DocSetCollector};
use tantivy::query::{Query, QueryParser, TermQuery};
use tantivy::schema::{IndexRecordOption, Schema, Value};
use tantivy::store::{Compressor, ZstdCompressor};
use tantivy::tokenizer::TokenizerManager;
use tantivy::{
    DocAddress, Executor, Index, IndexReader, IndexSettings, ReloadPolicy, Searcher,
    TantivyDocument, Term,
};
use tokio::sync::watch;
use uuid::Uuid;

use collect::{
    AnalyticsCollector, AnalyticsFruit, Hit, PageCollector, PatternCounts, StatsCollector,
    StatsFruit,
};
use query::{LogFilter, Order, Page, QueryError, SortPosition};
use schema::{Fields, id_hash};

use crate::wal::id_of_line;

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// One day of entries.
pub struct Partition {
    pub day: i64,
    pub dir: PathBuf,
    pub index: Index,
    pub reader: IndexReader,
}

impl Partition {
    /// The WAL position this partition's last commit covered (0 if none).
    pub fn committed_lsn(&self) -> u64 {
        self.index
            .load_metas()
            .ok()
            .and_then(|m| m.payload)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }
}

/// A day number as the partition's directory name (`2026-11-27`).
pub fn day_name(day: i64) -> String {
    let mut s = Timestamp::from_nanos(day.saturating_mul(NANOS_PER_DAY)).to_rfc3339();
    s.truncate(10);
    s
}

fn parse_day_name(name: &str) -> Option<i64> {
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
    pub segments: usize,
    pub stored_bytes: u64,
}

#[derive(Debug)]
pub struct IndexStats {
    pub totals: StatsFruit,
    pub stored_bytes: u64,
    pub partitions: Vec<PartitionStats>,
}

/// The embedded store.
pub struct LogIndex {
    root: PathBuf,
    schema: Schema,
    fields: Fields,
    settings: IndexSettings,
    parser: Option<QueryParser>,
    partitions: RwLock<BTreeMap<i64, Arc<Partition>>>,
    /// Runs a query's segments in parallel; shared by every partition.
    executor: Executor,
    /// Soft-deleted ids, by the day partition that holds them.
    hidden: RwLock<HashMap<i64, Vec<Uuid>>>,
    searchable: watch::Sender<u64>,
}

/// How the store is set up.
#[derive(Clone, Copy, Debug)]
pub struct IndexOptions {
    pub full_text: bool,
    pub compression: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("embedded index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("embedded index I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl LogIndex {
    /// Opens every day partition under `root`.
    pub fn open(root: &Path, options: IndexOptions) -> Result<LogIndex, IndexError> {
        std::fs::create_dir_all(root)?;
        let (schema, fields) = schema::build(options.full_text);
        let settings = IndexSettings {
            docstore_compression: if options.compression {
                Compressor::Zstd(ZstdCompressor {
                    compression_level: Some(3),
                })
            } else {
                Compressor::None
            },
            docstore_blocksize: 128 * 1024,
            ..IndexSettings::default()
        };
        let parser = options.full_text.then(|| {
            let mut parser = QueryParser::new(
                schema.clone(),
                vec![fields.message],
                TokenizerManager::default(),
            );
            parser.set_conjunction_by_default();
            parser
        });
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let executor = Executor::multi_thread(threads, "search-")?;
        let mut partitions = BTreeMap::new();
        let mut max_lsn = 0;
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(day) = parse_day_name(&name) else {
                continue;
            };
            let mut index = Index::open_in_dir(entry.path())?;
            index.set_executor(executor.clone());
            let partition = Partition {
                day,
                dir: entry.path(),
                reader: reader_for(&index)?,
                index,
            };
            max_lsn = max_lsn.max(partition.committed_lsn());
            partitions.insert(day, Arc::new(partition));
        }
        let (searchable, _) = watch::channel(max_lsn);
        Ok(LogIndex {
            root: root.to_path_buf(),
            schema,
            fields,
            settings,
            parser,
            partitions: RwLock::new(partitions),
            executor,
            hidden: RwLock::new(HashMap::new()),
            searchable,
        })
    }

    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    pub fn full_text(&self) -> bool {
        self.parser.is_some()
    }

    /// The highest WAL position any partition has committed.
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
        let mut index = match Index::open_in_dir(&dir) {
            Ok(index) => index,
            Err(_) => Index::builder()
                .schema(self.schema.clone())
                .settings(self.settings.clone())
                .create_in_dir(&dir)?,
        };
        index.set_executor(self.executor.clone());
        let partition = Arc::new(Partition {
            day,
            dir,
            reader: reader_for(&index)?,
            index,
        });
        self.partitions.write().insert(day, partition.clone());
        Ok(partition)
    }

    /// Removes a whole day (retention).
    pub fn drop_partition(&self, day: i64) -> Result<(), IndexError> {
        let removed = self.partitions.write().remove(&day);
        self.hidden.write().remove(&day);
        if let Some(partition) = removed {
            // Readers still holding its files keep them open; the space is freed when they
            // finish.
            std::fs::remove_dir_all(&partition.dir)?;
        }
        Ok(())
    }

    pub fn days(&self) -> Vec<i64> {
        self.partitions.read().keys().copied().collect()
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

    // --- soft deletes ---

    /// Adds the soft-deleted ids of the relational store (at start-up, and periodically when
    /// replicas share the store) to those hidden; returns how many were new. Deletions are
    /// never undone, so this only adds.
    pub fn merge_hidden(&self, deleted: impl IntoIterator<Item = (Uuid, i64)>) -> usize {
        let mut hidden = self.hidden.write();
        let mut known: std::collections::HashSet<Uuid> =
            hidden.values().flatten().copied().collect();
        let mut added = 0;
        for (id, day) in deleted {
            if known.insert(id) {
                hidden.entry(day).or_default().push(id);
                added += 1;
            }
        }
        added
    }

    /// Hides an entry from every read, at once.
    pub fn hide(&self, id: Uuid, day: i64) {
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

    fn hidden_in(&self, day: i64) -> Vec<Uuid> {
        self.hidden.read().get(&day).cloned().unwrap_or_default()
    }

    fn is_hidden(&self, id: Uuid, day: i64) -> bool {
        self.hidden
            .read()
            .get(&day)
            .is_some_and(|ids| ids.contains(&id))
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
        Ok(self.find(id)?.map(|(partition, _, _)| partition.day))
    }

    fn find(&self, id: Uuid) -> Result<Option<(Arc<Partition>, Searcher, DocAddress)>, IndexError> {
        let mut candidates: Vec<Arc<Partition>> =
            self.partitions.read().values().cloned().collect();
        // A UUIDv7 made from the entry's timestamp names its day: look there first.
        if let Some(ts) = id.get_timestamp() {
            let (secs, nanos) = ts.to_unix();
            let day = (secs as i64 * 1_000_000_000 + i64::from(nanos)).div_euclid(NANOS_PER_DAY);
            candidates.sort_by_key(|p| p.day != day);
        }
        let query = TermQuery::new(
            Term::from_field_u64(self.fields.id_key, id_hash(&id)),
            IndexRecordOption::Basic,
        );
        for partition in candidates {
            let searcher = partition.reader.searcher();
            for address in searcher.search(&query, &DocSetCollector)? {
                // The index holds a hash of the id: confirm on the stored entry.
                if id_of_line(&self.stored_json(&searcher, address)?) == Some(id) {
                    return Ok(Some((partition, searcher, address)));
                }
            }
        }
        Ok(None)
    }

    /// The stored JSON of a visible (not soft-deleted) entry, and its day.
    pub fn get(&self, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, IndexError> {
        let Some((partition, searcher, address)) = self.find(id)? else {
            return Ok(None);
        };
        if self.is_hidden(id, partition.day) {
            return Ok(None);
        }
        Ok(Some((
            partition.day,
            api_json(self.stored_json(&searcher, address)?),
        )))
    }

    fn stored_json(&self, searcher: &Searcher, address: DocAddress) -> Result<Vec<u8>, IndexError> {
        let doc: TantivyDocument = searcher.doc(address)?;
        Ok(doc
            .get_first(self.fields.src)
            .and_then(|v| v.as_bytes())
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }

    /// Visits the id hash of every stored entry (to fill the dedup filter at start-up).
    pub fn for_each_id_hash(&self, mut visit: impl FnMut(u64)) -> Result<u64, IndexError> {
        let mut n = 0;
        for partition in self.partitions.read().values() {
            let searcher = partition.reader.searcher();
            for segment in searcher.segment_readers() {
                let inverted = segment.inverted_index(self.fields.id_key)?;
                let mut terms = inverted.terms().stream()?;
                while terms.advance() {
                    if let Ok(bytes) = <[u8; 8]>::try_from(terms.key()) {
                        visit(u64::from_be_bytes(bytes));
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// A page of entries matching `filter`, sorted by (timestamp, sequence).
    pub fn search(&self, filter: &LogFilter, page: &Page) -> Result<Found, QueryError> {
        let (lower, upper) = bounds(filter, page);
        let mut hits: Vec<(Hit, Searcher)> = Vec::new();
        let mut total = 0u64;
        let mut text_queries: HashMap<i64, Box<dyn Query>> = HashMap::new();
        let mut partitions = self.partitions_between(lower, upper);
        if page.order == Order::Asc {
            partitions.reverse();
        }
        let wanted = page.limit + 1;
        for partition in partitions {
            let have_page = hits.len() >= wanted;
            if have_page && !page.with_total {
                break;
            }
            let hidden = self.hidden_in(partition.day);
            let query = query::build(
                &self.fields,
                self.parser.as_ref(),
                &within_day(filter, partition.day),
                page.order,
                page.after,
                &hidden,
            )?;
            let searcher = partition.reader.searcher();
            if have_page {
                // Partitions are disjoint in time: one further along the sort cannot add to
                // the page, only to the count.
                total += searcher.search(&*query, &Count)? as u64;
                continue;
            }
            let collector = PageCollector {
                limit: wanted - hits.len(),
                order: page.order,
                after: page.after,
            };
            let (count, found) = if page.with_total {
                searcher.search(&*query, &(Count, collector))?
            } else {
                (0, searcher.search(&*query, &collector)?)
            };
            total += count as u64;
            if page.highlight
                && !found.is_empty()
                && let (Some(text), Some(parser)) = (&filter.text, &self.parser)
            {
                text_queries.insert(partition.day, parser.parse_query_lenient(text).0);
            }
            hits.extend(found.into_iter().map(|hit| (hit, searcher.clone())));
        }
        let next = (hits.len() > page.limit).then(|| hits[page.limit - 1].0.position);
        hits.truncate(page.limit);
        let mut entries = Vec::with_capacity(hits.len());
        for (hit, searcher) in hits {
            let json = self
                .stored_json(&searcher, hit.address)
                .map_err(|e| match e {
                    IndexError::Tantivy(e) => QueryError::Index(e),
                    IndexError::Io(e) => QueryError::Index(tantivy::TantivyError::from(e)),
                })?;
            let day = hit.position.ts.div_euclid(NANOS_PER_DAY);
            let highlight = match text_queries.get(&day) {
                Some(q) => highlight(&searcher, &**q, self.fields.message, &json)?,
                None => None,
            };
            entries.push(FoundEntry {
                position: hit.position,
                json: api_json(json),
                highlight,
            });
        }
        Ok(Found {
            entries,
            next,
            total: page.with_total.then_some(total),
        })
    }

    /// Counts over time, error rates, top patterns and a numeric field's distribution.
    pub fn analytics(
        &self,
        request: &AnalyticsRequest,
    ) -> Result<(AnalyticsFruit, Vec<PatternCount>), QueryError> {
        let mut filter = request.filter.clone();
        filter.start = Some(request.start);
        filter.end = Some(request.end);
        let buckets = request.buckets();
        let collector = AnalyticsCollector {
            start: request.start.as_nanos(),
            interval: request.interval_nanos,
            buckets,
            value_field: request.value_field.as_ref().map(|f| format!("num.{f}")),
        };
        let mut merged = AnalyticsFruit {
            by_level: vec![[0; 9]; buckets],
            ..Default::default()
        };
        let mut searchers: Vec<Searcher> = Vec::new();
        let mut patterns: PatternCounts<(usize, DocAddress)> = PatternCounts::default();
        for partition in self.partitions_between(
            filter.start.map(|t| t.as_nanos()),
            filter.end.map(|t| t.as_nanos()),
        ) {
            let hidden = self.hidden_in(partition.day);
            let query = query::build(
                &self.fields,
                self.parser.as_ref(),
                &within_day(&filter, partition.day),
                Order::Desc,
                None,
                &hidden,
            )?;
            let searcher = partition.reader.searcher();
            let mut fruit = searcher.search(&*query, &collector)?;
            let which = searchers.len();
            for (pattern, (n, address)) in std::mem::take(&mut fruit.patterns) {
                patterns.entry(pattern).or_insert((0, (which, address))).0 += n;
            }
            searchers.push(searcher);
            merged.absorb(fruit);
        }
        // The top N without sorting every pattern: select, then sort the N.
        let mut top: Vec<(u64, u64, (usize, DocAddress))> = patterns
            .into_iter()
            .map(|(p, (n, at))| (p, n, at))
            .collect();
        let by_count = |a: &(u64, u64, (usize, DocAddress)),
                        b: &(u64, u64, (usize, DocAddress))| {
            b.1.cmp(&a.1).then(a.0.cmp(&b.0))
        };
        if top.len() > request.top_patterns && request.top_patterns > 0 {
            top.select_nth_unstable_by(request.top_patterns - 1, by_count);
        }
        top.truncate(request.top_patterns);
        top.sort_by(by_count);
        let mut out = Vec::with_capacity(top.len());
        for (_, count, (which, address)) in top {
            let json = self.stored_json(&searchers[which], address).map_err(|e| {
                QueryError::Index(tantivy::TantivyError::SystemError(e.to_string()))
            })?;
            let example = message_of(&json);
            out.push(PatternCount {
                pattern: patterns::template(&example),
                count,
                example,
            });
        }
        Ok((merged, out))
    }

    /// Totals over the whole store.
    pub fn stats(&self) -> Result<IndexStats, IndexError> {
        let mut totals = StatsFruit::default();
        let mut partitions = Vec::new();
        let mut stored_bytes = 0;
        let snapshot: Vec<Arc<Partition>> = self.partitions.read().values().cloned().collect();
        for partition in snapshot {
            let hidden = self.hidden_in(partition.day);
            let query = query::build(
                &self.fields,
                None,
                &LogFilter::default(),
                Order::Desc,
                None,
                &hidden,
            )
            .map_err(|e| IndexError::Io(std::io::Error::other(e.to_string())))?;
            let searcher = partition.reader.searcher();
            let fruit = searcher.search(&*query, &StatsCollector)?;
            let bytes = dir_size(&partition.dir);
            stored_bytes += bytes;
            partitions.push(PartitionStats {
                day: day_name(partition.day),
                entries: fruit.entries,
                segments: searcher.segment_readers().len(),
                stored_bytes: bytes,
            });
            totals.absorb(fruit);
        }
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

fn reader_for(index: &Index) -> Result<IndexReader, tantivy::TantivyError> {
    index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
}

/// The filter as it applies to one day's partition: a bound that the whole day satisfies is
/// dropped, so a query over whole days reads no timestamp column to filter.
fn within_day(filter: &LogFilter, day: i64) -> LogFilter {
    let day_start = day.saturating_mul(NANOS_PER_DAY);
    let day_end = day_start.saturating_add(NANOS_PER_DAY);
    let mut filter = filter.clone();
    if filter.start.is_some_and(|s| s.as_nanos() <= day_start) {
        filter.start = None;
    }
    if filter.end.is_some_and(|e| e.as_nanos() >= day_end) {
        filter.end = None;
    }
    filter
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
    match serde_json::from_slice::<logging_common::LogEntry>(&stored) {
        Ok(entry) => entry.to_api_json(),
        Err(_) => stored,
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

fn highlight(
    searcher: &Searcher,
    query: &dyn Query,
    field: tantivy::schema::Field,
    json: &[u8],
) -> Result<Option<Highlight>, QueryError> {
    let mut generator = tantivy::snippet::SnippetGenerator::create(searcher, query, field)?;
    generator.set_max_num_chars(200);
    let snippet = generator.snippet(&message_of(json));
    if snippet.highlighted().is_empty() {
        return Ok(None);
    }
    Ok(Some(Highlight {
        fragment: snippet.fragment().to_string(),
        ranges: snippet
            .highlighted()
            .iter()
            .map(|r| [r.start, r.end])
            .collect(),
    }))
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
