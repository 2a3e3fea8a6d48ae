//! Collectors that read columns only: the page of a sorted listing, analytics and stats.
//! None of them opens a stored document; the page's documents are fetched afterwards.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::{Column, DynamicColumn, NumericalType, StrColumn};
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader};

use super::query::{Order, SortPosition};

fn sort_key(order: Order, position: SortPosition) -> u128 {
    match order {
        Order::Desc => position.key(),
        // Ascending: the smallest positions must win the "keep the largest" heap.
        Order::Asc => !position.key(),
    }
}

/// A document with its place in the sort.
#[derive(Clone, Copy, Debug)]
pub struct Hit {
    pub position: SortPosition,
    pub address: DocAddress,
    key: u128,
}

/// The first `limit` documents in (timestamp, sequence) order, strictly after `after`.
pub struct PageCollector {
    pub limit: usize,
    pub order: Order,
    pub after: Option<SortPosition>,
}

pub struct PageSegmentCollector {
    segment: SegmentOrdinal,
    ts: Column<i64>,
    seq: Column<u64>,
    limit: usize,
    order: Order,
    after_key: Option<u128>,
    heap: BinaryHeap<Reverse<(u128, DocId)>>,
}

impl Collector for PageCollector {
    type Fruit = Vec<Hit>;
    type Child = PageSegmentCollector;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<PageSegmentCollector> {
        Ok(PageSegmentCollector {
            segment,
            ts: reader.fast_fields().i64("ts")?,
            seq: reader.fast_fields().u64("seq")?,
            limit: self.limit,
            order: self.order,
            after_key: self.after.map(|a| sort_key(self.order, a)),
            heap: BinaryHeap::with_capacity(self.limit + 1),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<Hit>>) -> tantivy::Result<Vec<Hit>> {
        let mut all: Vec<Hit> = fruits.into_iter().flatten().collect();
        all.sort_unstable_by_key(|hit| Reverse(hit.key));
        all.truncate(self.limit);
        Ok(all)
    }
}

impl SegmentCollector for PageSegmentCollector {
    type Fruit = Vec<Hit>;

    fn collect(&mut self, doc: DocId, _score: Score) {
        let (Some(ts), Some(seq)) = (self.ts.first(doc), self.seq.first(doc)) else {
            return;
        };
        let key = sort_key(self.order, SortPosition { ts, seq });
        // "After" in the sort means a smaller key.
        if self.after_key.is_some_and(|after| key >= after) {
            return;
        }
        if self.heap.len() < self.limit {
            self.heap.push(Reverse((key, doc)));
        } else if self.heap.peek().is_some_and(|Reverse((min, _))| key > *min) {
            self.heap.pop();
            self.heap.push(Reverse((key, doc)));
        }
    }

    fn harvest(self) -> Vec<Hit> {
        let order = self.order;
        let segment = self.segment;
        self.heap
            .into_iter()
            .map(|Reverse((key, doc))| {
                let raw = match order {
                    Order::Desc => key,
                    Order::Asc => !key,
                };
                Hit {
                    position: SortPosition {
                        ts: ((raw >> 64) as u64 ^ (1 << 63)) as i64,
                        seq: raw as u64,
                    },
                    address: DocAddress::new(segment, doc),
                    key,
                }
            })
            .collect()
    }
}

/// Counts, error rates, patterns and a numeric field's values over matching documents.
pub struct AnalyticsCollector {
    pub start: i64,
    pub interval: i64,
    pub buckets: usize,
    /// Path of a numeric context field in the `num` JSON column (`num.duration_ms`).
    pub value_field: Option<String>,
}

/// Per-bucket counts by level rank.
pub type LevelCounts = [u64; 9];

#[derive(Default, Debug)]
pub struct AnalyticsFruit {
    pub by_level: Vec<LevelCounts>,
    /// (bucket, service) → count.
    pub by_service: HashMap<(usize, String), u64>,
    /// service → (total, errors).
    pub service_totals: HashMap<String, (u64, u64)>,
    /// pattern hash → (count, an example document).
    pub patterns: PatternCounts<DocAddress>,
    pub values: Vec<f64>,
}

pub struct AnalyticsSegmentCollector {
    segment: SegmentOrdinal,
    start: i64,
    interval: i64,
    ts: Column<i64>,
    level: Column<u64>,
    service: Option<StrColumn>,
    services: usize,
    pattern: Column<u64>,
    values: Vec<Column<f64>>,
    by_level: Vec<LevelCounts>,
    by_service: BucketCounts,
    /// service ordinal → (total, errors).
    totals: Vec<(u64, u64)>,
    patterns: PatternCounts<DocId>,
    collected_values: Vec<f64>,
    // Scratch space for reading a block of documents' columns at once.
    ts_buf: Vec<Option<i64>>,
    level_buf: Vec<Option<u64>>,
    service_buf: Vec<Option<u64>>,
    pattern_buf: Vec<Option<u64>>,
}

/// Counts per (bucket, service ordinal): a dense array when it is small enough, a map when
/// many buckets times many services would make the array huge and mostly empty.
enum BucketCounts {
    Dense { services: usize, counts: Vec<u64> },
    Sparse(HashMap<(usize, u64), u64>),
}

/// Cells above which the per-bucket service counts are kept in a map.
const DENSE_CELLS: usize = 1 << 20;

impl BucketCounts {
    fn new(buckets: usize, services: usize) -> BucketCounts {
        match buckets.checked_mul(services) {
            Some(cells) if cells <= DENSE_CELLS => BucketCounts::Dense {
                services,
                counts: vec![0; cells],
            },
            _ => BucketCounts::Sparse(HashMap::new()),
        }
    }

    fn add(&mut self, bucket: usize, ord: usize) {
        match self {
            BucketCounts::Dense { services, counts } => counts[bucket * *services + ord] += 1,
            BucketCounts::Sparse(map) => *map.entry((bucket, ord as u64)).or_default() += 1,
        }
    }

    /// (bucket, service ordinal, count) of every non-zero cell.
    fn cells(&self) -> Vec<(usize, usize, u64)> {
        match self {
            BucketCounts::Dense { services, counts } => counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (i / services, i % services, *n))
                .collect(),
            BucketCounts::Sparse(map) => {
                map.iter().map(|(&(b, o), &n)| (b, o as usize, n)).collect()
            }
        }
    }
}

/// pattern hash → (count, an example), hashed by the pattern hash itself.
pub type PatternCounts<T> = HashMap<u64, (u64, T), BuildHasherDefault<PrehashedHasher>>;

/// A hasher for keys that are already hashes (the pattern column holds xxh3 values).
#[derive(Default)]
pub struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, value: u64) {
        // Spread a 32-bit pattern hash over the whole word.
        self.0 = value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Opens every column at `path`, whatever numeric type the segment stored, as f64.
fn numeric_columns(reader: &SegmentReader, path: &str) -> tantivy::Result<Vec<Column<f64>>> {
    let mut columns = Vec::new();
    for handle in reader.fast_fields().dynamic_column_handles(path)? {
        let column = handle.open()?;
        if let Some(DynamicColumn::F64(column)) = column.coerce_numerical(NumericalType::F64) {
            columns.push(column);
        }
    }
    Ok(columns)
}

impl Collector for AnalyticsCollector {
    type Fruit = AnalyticsFruit;
    type Child = AnalyticsSegmentCollector;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<AnalyticsSegmentCollector> {
        let fast = reader.fast_fields();
        let values = match &self.value_field {
            Some(path) => numeric_columns(reader, path)?,
            None => Vec::new(),
        };
        let service = fast.str("service")?;
        let services = service.as_ref().map_or(0, |s| s.num_terms());
        Ok(AnalyticsSegmentCollector {
            segment,
            start: self.start,
            interval: self.interval,
            ts: fast.i64("ts")?,
            level: fast.u64("level")?,
            service,
            services,
            pattern: fast.u64("pattern")?,
            values,
            by_level: vec![[0; 9]; self.buckets],
            by_service: BucketCounts::new(self.buckets, services),
            totals: vec![(0, 0); services],
            patterns: HashMap::default(),
            collected_values: Vec::new(),
            ts_buf: Vec::new(),
            level_buf: Vec::new(),
            service_buf: Vec::new(),
            pattern_buf: Vec::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<AnalyticsFruit>) -> tantivy::Result<AnalyticsFruit> {
        let mut merged = AnalyticsFruit {
            by_level: vec![[0; 9]; self.buckets],
            ..Default::default()
        };
        for fruit in fruits {
            merged.absorb(fruit);
        }
        Ok(merged)
    }
}

impl AnalyticsFruit {
    /// Adds another partition's or segment's results to these.
    pub fn absorb(&mut self, other: AnalyticsFruit) {
        if self.by_level.len() < other.by_level.len() {
            self.by_level.resize(other.by_level.len(), [0; 9]);
        }
        for (mine, theirs) in self.by_level.iter_mut().zip(&other.by_level) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
        for (key, n) in other.by_service {
            *self.by_service.entry(key).or_default() += n;
        }
        for (service, (total, errors)) in other.service_totals {
            let entry = self.service_totals.entry(service).or_default();
            entry.0 += total;
            entry.1 += errors;
        }
        for (pattern, (n, example)) in other.patterns {
            self.patterns.entry(pattern).or_insert((0, example)).0 += n;
        }
        self.values.extend(other.values);
    }
}

impl AnalyticsSegmentCollector {
    fn count(
        &mut self,
        doc: DocId,
        ts: i64,
        level: u64,
        service: Option<u64>,
        pattern: Option<u64>,
    ) {
        let Some(offset) = ts.checked_sub(self.start).filter(|o| *o >= 0) else {
            return;
        };
        let bucket = (offset / self.interval) as usize;
        if bucket >= self.by_level.len() {
            return;
        }
        let level = level.min(8) as usize;
        self.by_level[bucket][level] += 1;
        if let Some(ord) = service.map(|o| o as usize).filter(|o| *o < self.services) {
            self.by_service.add(bucket, ord);
            let totals = &mut self.totals[ord];
            totals.0 += 1;
            totals.1 += u64::from(level >= 5);
        }
        if let Some(pattern) = pattern {
            self.patterns.entry(pattern).or_insert((0, doc)).0 += 1;
        }
        for column in &self.values {
            if let Some(v) = column.first(doc) {
                self.collected_values.push(v);
                break;
            }
        }
    }
}

impl SegmentCollector for AnalyticsSegmentCollector {
    type Fruit = AnalyticsFruit;

    fn collect(&mut self, doc: DocId, _score: Score) {
        let Some(ts) = self.ts.first(doc) else { return };
        let level = self.level.first(doc).unwrap_or(0);
        let service = self.service.as_ref().and_then(|s| s.ords().first(doc));
        let pattern = self.pattern.first(doc);
        self.count(doc, ts, level, service, pattern);
    }

    /// Reads each column for the whole block at once, which the column codecs do much
    /// faster than one document at a time.
    fn collect_block(&mut self, docs: &[DocId]) {
        let n = docs.len();
        let mut ts = std::mem::take(&mut self.ts_buf);
        let mut level = std::mem::take(&mut self.level_buf);
        let mut service = std::mem::take(&mut self.service_buf);
        let mut pattern = std::mem::take(&mut self.pattern_buf);
        ts.resize(n, None);
        level.resize(n, None);
        service.resize(n, None);
        pattern.resize(n, None);
        self.ts.first_vals(docs, &mut ts);
        self.level.first_vals(docs, &mut level);
        match &self.service {
            Some(column) => column.ords().first_vals(docs, &mut service),
            None => service.fill(None),
        }
        self.pattern.first_vals(docs, &mut pattern);
        for i in 0..n {
            if let Some(t) = ts[i] {
                self.count(docs[i], t, level[i].unwrap_or(0), service[i], pattern[i]);
            }
        }
        self.ts_buf = ts;
        self.level_buf = level;
        self.service_buf = service;
        self.pattern_buf = pattern;
    }

    fn harvest(self) -> AnalyticsFruit {
        let names: Vec<String> = (0..self.services)
            .map(|ord| {
                let mut name = String::new();
                if let Some(column) = &self.service {
                    let _ = column.ord_to_str(ord as u64, &mut name);
                }
                name
            })
            .collect();
        let by_service = self
            .by_service
            .cells()
            .into_iter()
            .map(|(bucket, ord, n)| ((bucket, names[ord].clone()), n))
            .collect();
        let service_totals = self
            .totals
            .iter()
            .enumerate()
            .filter(|(_, (total, _))| *total > 0)
            .map(|(ord, &totals)| (names[ord].clone(), totals))
            .collect();
        let segment = self.segment;
        AnalyticsFruit {
            by_level: self.by_level,
            by_service,
            service_totals,
            patterns: self
                .patterns
                .into_iter()
                .map(|(p, (n, doc))| (p, (n, DocAddress::new(segment, doc))))
                .collect(),
            values: self.collected_values,
        }
    }
}

/// Entry count, raw bytes and per-service counts of everything matching.
pub struct StatsCollector;

#[derive(Default, Debug)]
pub struct StatsFruit {
    pub entries: u64,
    pub raw_bytes: u64,
    pub by_service: HashMap<String, u64>,
}

impl StatsFruit {
    pub fn absorb(&mut self, other: StatsFruit) {
        self.entries += other.entries;
        self.raw_bytes += other.raw_bytes;
        for (service, n) in other.by_service {
            *self.by_service.entry(service).or_default() += n;
        }
    }
}

pub struct StatsSegmentCollector {
    raw_len: Column<u64>,
    service: Option<StrColumn>,
    entries: u64,
    raw_bytes: u64,
    by_ord: HashMap<u64, u64>,
}

impl Collector for StatsCollector {
    type Fruit = StatsFruit;
    type Child = StatsSegmentCollector;

    fn for_segment(
        &self,
        _segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<StatsSegmentCollector> {
        Ok(StatsSegmentCollector {
            raw_len: reader.fast_fields().u64("raw_len")?,
            service: reader.fast_fields().str("service")?,
            entries: 0,
            raw_bytes: 0,
            by_ord: HashMap::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<StatsFruit>) -> tantivy::Result<StatsFruit> {
        let mut merged = StatsFruit::default();
        for fruit in fruits {
            merged.absorb(fruit);
        }
        Ok(merged)
    }
}

impl SegmentCollector for StatsSegmentCollector {
    type Fruit = StatsFruit;

    fn collect(&mut self, doc: DocId, _score: Score) {
        self.entries += 1;
        self.raw_bytes += self.raw_len.first(doc).unwrap_or(0);
        if let Some(ord) = self.service.as_ref().and_then(|s| s.term_ords(doc).next()) {
            *self.by_ord.entry(ord).or_default() += 1;
        }
    }

    fn harvest(self) -> StatsFruit {
        let mut by_service = HashMap::new();
        for (ord, n) in self.by_ord {
            let mut name = String::new();
            if let Some(column) = &self.service {
                let _ = column.ord_to_str(ord, &mut name);
            }
            *by_service.entry(name).or_default() += n;
        }
        StatsFruit {
            entries: self.entries,
            raw_bytes: self.raw_bytes,
            by_service,
        }
    }
}
