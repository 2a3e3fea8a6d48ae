//! Where reads are answered (`LOG_QUERY_BACKEND`): the embedded index, Elasticsearch or Loki.
//!
//! The API's listing, search, lookup and analytics go through [`QueryBackend`], which gives
//! the same shapes whichever engine answers, so several aggregator replicas can serve one
//! cluster from the engine the sinks fill. Where an engine cannot answer exactly, the answer
//! carries a [`Caveat`] naming the field and why; nothing is silently approximated.

pub mod elasticsearch;
pub mod loki;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use logging_common::LogLevel;
use serde::Serialize;
use uuid::Uuid;

use crate::index::query::{LogFilter, Order, Page, QueryError, SortPosition};
use crate::index::{AnalyticsRequest, Highlight, LogIndex, PatternCount, patterns};

/// Where an answer is not exact, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Caveat {
    pub field: &'static str,
    pub reason: String,
}

impl Caveat {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Caveat {
        Caveat {
            field,
            reason: reason.into(),
        }
    }
}

/// A position in a listing, as its opaque cursor carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// The embedded index: (timestamp, ingest sequence).
    Sequence(SortPosition),
    /// An external engine: (timestamp, entry id), the sort both engines can reproduce.
    Id { ts: i64, id: Uuid },
}

const CURSOR_VERSION: u8 = 1;
const ID_CURSOR_VERSION: u8 = 2;

impl Cursor {
    /// An opaque, URL-safe text: version, direction, then the position.
    pub fn encode(self, order: Order) -> String {
        let mut bytes = Vec::with_capacity(26);
        let (version, tail): (u8, Vec<u8>) = match self {
            Cursor::Sequence(p) => (
                CURSOR_VERSION,
                [p.ts.to_be_bytes(), p.seq.to_be_bytes()].concat(),
            ),
            Cursor::Id { ts, id } => (
                ID_CURSOR_VERSION,
                [&ts.to_be_bytes()[..], id.as_bytes()].concat(),
            ),
        };
        bytes.push(version);
        bytes.push(if order == Order::Asc { b'a' } else { b'd' });
        bytes.extend_from_slice(&tail);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads a cursor for a listing in `order`; the error is for the `cursor` parameter.
    pub fn decode(text: &str, order: Order) -> Result<Cursor, String> {
        let invalid = || "not a cursor returned by this API".to_string();
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
        if bytes.len() < 10 {
            return Err(invalid());
        }
        let cursor_order = match bytes[1] {
            b'a' => Order::Asc,
            b'd' => Order::Desc,
            _ => return Err(invalid()),
        };
        let ts = i64::from_be_bytes(bytes[2..10].try_into().map_err(|_| invalid())?);
        let cursor = match (bytes[0], bytes.len()) {
            (CURSOR_VERSION, 18) => Cursor::Sequence(SortPosition {
                ts,
                seq: u64::from_be_bytes(bytes[10..18].try_into().map_err(|_| invalid())?),
            }),
            (ID_CURSOR_VERSION, 26) => Cursor::Id {
                ts,
                id: Uuid::from_slice(&bytes[10..26]).map_err(|_| invalid())?,
            },
            _ => return Err(invalid()),
        };
        if cursor_order != order {
            return Err(
                "was returned for the other sort order; keep `order` the same while paging".into(),
            );
        }
        Ok(cursor)
    }
}

const OTHER_BACKEND: &str = "was returned by another query backend (LOG_QUERY_BACKEND changed)";

/// A listing or search.
#[derive(Clone, Debug)]
pub struct ListRequest {
    pub filter: LogFilter,
    pub limit: usize,
    pub order: Order,
    pub after: Option<Cursor>,
    /// Count every match (search's `total`).
    pub with_total: bool,
    pub highlight: bool,
}

/// One entry of a listing: its API JSON and where the query matched.
#[derive(Debug)]
pub struct Listed {
    pub json: Vec<u8>,
    pub highlight: Option<Highlight>,
}

/// A page of a listing.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<Listed>,
    pub next: Option<Cursor>,
    pub total: Option<u64>,
    pub caveats: Vec<Caveat>,
}

/// Count, extremes, mean and percentiles of a numeric context field.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FieldStats {
    pub field: String,
    pub count: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// The percentiles every answer carries.
pub const PERCENTILES: [f64; 4] = [50.0, 90.0, 95.0, 99.0];

/// Exact percentile by the nearest-rank method. Selects rather than sorts: O(n) per
/// percentile instead of O(n log n) for millions of values.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    let index = rank.clamp(1, values.len()) - 1;
    let (_, value, _) = values.select_nth_unstable_by(index, f64::total_cmp);
    Some(*value)
}

impl FieldStats {
    /// Exact statistics of `values`.
    pub fn of(field: String, mut values: Vec<f64>) -> FieldStats {
        let count = values.len();
        let (min, max, sum) = values.iter().fold(
            (f64::INFINITY, f64::NEG_INFINITY, 0.0),
            |(lo, hi, sum), v| (lo.min(*v), hi.max(*v), sum + v),
        );
        let [p50, p90, p95, p99] = PERCENTILES.map(|p| percentile(&mut values, p));
        FieldStats {
            field,
            count: count as u64,
            min: (count > 0).then_some(min),
            max: (count > 0).then_some(max),
            avg: (count > 0).then(|| sum / count as f64),
            p50,
            p90,
            p95,
            p99,
        }
    }
}

impl FieldStats {
    /// Exact statistics of `values` and of the values `counted` (value, how many; a value
    /// may come more than once).
    pub fn of_counted(
        field: String,
        mut values: Vec<f64>,
        mut counted: Vec<(f64, u64)>,
    ) -> FieldStats {
        let counted_rows: u64 = counted.iter().map(|(_, n)| n).sum();
        if counted_rows <= values.len() as u64 {
            // Mostly single values: the counted ones join them, and percentiles are selected
            // without sorting.
            for (v, n) in counted {
                values.extend(std::iter::repeat_n(v, n as usize));
            }
            return FieldStats::of(field, values);
        }
        // Mostly counted: both sorted, walked together once.
        values.sort_unstable_by(f64::total_cmp);
        counted.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let count = counted_rows + values.len() as u64;
        let sum =
            values.iter().sum::<f64>() + counted.iter().map(|(v, n)| v * *n as f64).sum::<f64>();
        // Nearest rank, as `percentile` does.
        let ranks = PERCENTILES
            .map(|p| ((p / 100.0) * count as f64).ceil().clamp(1.0, count as f64) as u64);
        let mut found = [None; PERCENTILES.len()];
        let (mut min, mut max) = (None, None);
        let (mut i, mut j, mut seen) = (0, 0, 0u64);
        while i < values.len() || j < counted.len() {
            let single = j == counted.len() || (i < values.len() && values[i] <= counted[j].0);
            let (v, n) = if single {
                i += 1;
                (values[i - 1], 1)
            } else {
                j += 1;
                counted[j - 1]
            };
            if n == 0 {
                continue;
            }
            min.get_or_insert(v);
            max = Some(v);
            seen += n;
            for (slot, rank) in found.iter_mut().zip(ranks) {
                if slot.is_none() && seen >= rank {
                    *slot = Some(v);
                }
            }
        }
        let [p50, p90, p95, p99] = found;
        FieldStats {
            field,
            count,
            min,
            max,
            avg: Some(sum / count as f64),
            p50,
            p90,
            p95,
            p99,
        }
    }
}

/// What analytics computes, whichever engine counted.
#[derive(Debug, Default)]
pub struct Analytics {
    /// Per bucket, counts by level rank.
    pub by_level: Vec<[u64; 9]>,
    /// (bucket, service) → count.
    pub by_service: HashMap<(usize, String), u64>,
    /// service → (total, errors).
    pub service_totals: HashMap<String, (u64, u64)>,
    pub field_stats: FieldStats,
    pub top_patterns: Vec<PatternCount>,
    pub caveats: Vec<Caveat>,
}

impl Analytics {
    /// Empty buckets for a request.
    fn for_request(request: &AnalyticsRequest) -> Analytics {
        Analytics {
            by_level: vec![[0; 9]; request.buckets()],
            field_stats: FieldStats {
                field: request.value_field.clone().unwrap_or_default(),
                ..FieldStats::default()
            },
            ..Analytics::default()
        }
    }

    /// Adds `n` entries of `service` at `level` to bucket `bucket`.
    fn add(&mut self, bucket: usize, level: LogLevel, service: &str, n: u64) {
        let Some(counts) = self.by_level.get_mut(bucket) else {
            return;
        };
        counts[usize::from(level.rank()).min(8)] += n;
        *self
            .by_service
            .entry((bucket, service.to_string()))
            .or_default() += n;
        let totals = self.service_totals.entry(service.to_string()).or_default();
        totals.0 += n;
        if level.is_error() {
            totals.1 += n;
        }
    }
}

/// Messages read to count patterns, for engines that cannot group by pattern themselves.
pub const PATTERN_SAMPLE: usize = 1000;

/// The `top` most frequent message patterns among `messages`.
pub fn top_patterns<'a>(messages: impl Iterator<Item = &'a str>, top: usize) -> Vec<PatternCount> {
    let mut counts: HashMap<u64, (u64, &str)> = HashMap::new();
    for message in messages {
        counts
            .entry(patterns::pattern_hash(message))
            .or_insert((0, message))
            .0 += 1;
    }
    let mut ranked: Vec<(u64, u64, &str)> =
        counts.into_iter().map(|(p, (n, m))| (p, n, m)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
        .into_iter()
        .take(top)
        .map(|(_, count, example)| PatternCount {
            pattern: patterns::template(example),
            count,
            example: example.to_string(),
        })
        .collect()
}

/// Patterns counted over a sample of the newest matches: exact when the sample holds all
/// `total` of them, said in a caveat when not.
pub fn sampled_patterns(
    messages: &[String],
    top: usize,
    total: u64,
    caveats: &mut Vec<Caveat>,
) -> Vec<PatternCount> {
    if total > messages.len() as u64 {
        caveats.push(Caveat::new(
            "top_patterns",
            format!(
                "counted over the newest {} of {total} matching entries",
                messages.len()
            ),
        ));
    }
    top_patterns(messages.iter().map(String::as_str), top)
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The request cannot be answered as asked: a 400 about `field`.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The engine failed or answered something unreadable: a 502.
    #[error("{engine}: {detail}")]
    Engine {
        engine: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error("the read task failed: {0}")]
    Task(String),
}

impl ReadError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> ReadError {
        ReadError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<QueryError> for ReadError {
    fn from(error: QueryError) -> ReadError {
        match error {
            QueryError::Invalid { field, reason } => ReadError::Invalid { field, reason },
            QueryError::Index(e) => ReadError::Index(e),
        }
    }
}

/// The engine reads go to.
pub enum QueryBackend {
    Embedded,
    Elasticsearch(elasticsearch::EsReader),
    Loki(loki::LokiReader),
}

impl QueryBackend {
    pub fn name(&self) -> &'static str {
        match self {
            QueryBackend::Embedded => "embedded",
            QueryBackend::Elasticsearch(_) => "elasticsearch",
            QueryBackend::Loki(_) => "loki",
        }
    }

    /// A page of entries matching the request.
    pub async fn list(
        &self,
        index: &Arc<LogIndex>,
        request: ListRequest,
    ) -> Result<Listing, ReadError> {
        match self {
            QueryBackend::Embedded => {
                let after = match request.after {
                    None => None,
                    Some(Cursor::Sequence(position)) => Some(position),
                    Some(Cursor::Id { .. }) => {
                        return Err(ReadError::invalid("cursor", OTHER_BACKEND));
                    }
                };
                let page = Page {
                    limit: request.limit,
                    order: request.order,
                    after,
                    with_total: request.with_total,
                    highlight: request.highlight,
                };
                let index = index.clone();
                let found =
                    tokio::task::spawn_blocking(move || index.search(&request.filter, &page))
                        .await
                        .map_err(|e| ReadError::Task(e.to_string()))??;
                Ok(Listing {
                    entries: found
                        .entries
                        .into_iter()
                        .map(|e| Listed {
                            json: e.json,
                            highlight: e.highlight,
                        })
                        .collect(),
                    next: found.next.map(Cursor::Sequence),
                    total: found.total,
                    caveats: Vec::new(),
                })
            }
            QueryBackend::Elasticsearch(es) => es.list(&request, &index.all_hidden()).await,
            QueryBackend::Loki(loki) => loki.list(&request, &index.all_hidden()).await,
        }
    }

    /// The entry with `id`, unless it is absent or deleted: its day and API JSON.
    pub async fn get(
        &self,
        index: &Arc<LogIndex>,
        id: Uuid,
    ) -> Result<Option<(i64, Vec<u8>)>, ReadError> {
        let found = match self {
            QueryBackend::Embedded => {
                let index = index.clone();
                return Ok(tokio::task::spawn_blocking(move || index.get(id))
                    .await
                    .map_err(|e| ReadError::Task(e.to_string()))??);
            }
            QueryBackend::Elasticsearch(es) => es.get(id).await?,
            QueryBackend::Loki(loki) => loki.get(id).await?,
        };
        if index.all_hidden().contains(&id) {
            return Ok(None);
        }
        Ok(found)
    }

    /// Counts over time, error rates, patterns and a field's distribution.
    pub async fn analytics(
        &self,
        index: &Arc<LogIndex>,
        request: AnalyticsRequest,
    ) -> Result<Analytics, ReadError> {
        match self {
            QueryBackend::Embedded => {
                let index = index.clone();
                tokio::task::spawn_blocking(move || {
                    let (fruit, patterns) = index.analytics(&request)?;
                    Ok(Analytics {
                        top_patterns: patterns,
                        ..embedded_analytics(fruit, &request)
                    })
                })
                .await
                .map_err(|e| ReadError::Task(e.to_string()))?
            }
            QueryBackend::Elasticsearch(es) => es.analytics(&request, &index.all_hidden()).await,
            QueryBackend::Loki(loki) => loki.analytics(&request, &index.all_hidden()).await,
        }
    }
}

fn embedded_analytics(
    fruit: crate::index::AnalyticsFruit,
    request: &AnalyticsRequest,
) -> Analytics {
    Analytics {
        by_level: fruit.by_level,
        by_service: fruit.by_service,
        service_totals: fruit.service_totals,
        field_stats: FieldStats::of_counted(
            request.value_field.clone().unwrap_or_default(),
            fruit.values,
            fruit
                .counted
                .into_iter()
                .map(|(bits, n)| (f64::from_bits(bits), n))
                .collect(),
        ),
        top_patterns: Vec::new(),
        caveats: Vec::new(),
    }
}

/// Levels at or above `min`, as stored (`error`, `critical`…).
pub fn levels_from(min: LogLevel) -> Vec<&'static str> {
    LogLevel::ALL
        .iter()
        .filter(|l| l.rank() >= min.rank())
        .map(|l| l.as_str())
        .collect()
}

/// Keeps the entries of a sorted page past `after` and says where the next page starts.
///
/// `entries` hold (timestamp, id, entry) sorted in `order`; `more` says the engine may hold
/// further entries past the last one.
pub fn page_after<T>(
    entries: Vec<(i64, Uuid, T)>,
    order: Order,
    after: Option<(i64, Uuid)>,
    limit: usize,
    more: bool,
) -> (Vec<(i64, Uuid, T)>, Option<Cursor>) {
    let mut kept: Vec<(i64, Uuid, T)> = entries
        .into_iter()
        .filter(|(ts, id, _)| match (after, order) {
            (None, _) => true,
            (Some(at), Order::Desc) => (*ts, *id) < at,
            (Some(at), Order::Asc) => (*ts, *id) > at,
        })
        .collect();
    let next = if kept.len() > limit || (more && !kept.is_empty()) {
        kept.truncate(limit);
        kept.last()
            .map(|(ts, id, _)| Cursor::Id { ts: *ts, id: *id })
    } else {
        None
    };
    (kept, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Statistics of single and counted values, whichever way they are combined, are
        /// those of every value listed one by one.
        #[test]
        fn counted_values_give_the_statistics_of_the_values_listed(
            values in proptest::collection::vec(0u16..50, 0..40),
            counted in proptest::collection::vec((0u16..50, 0u64..30), 0..20),
        ) {
            let values: Vec<f64> = values.into_iter().map(|v| f64::from(v) / 4.0).collect();
            let counted: Vec<(f64, u64)> = counted.into_iter().map(|(v, n)| (f64::from(v) / 4.0, n)).collect();
            let mut listed = values.clone();
            for (v, n) in &counted {
                listed.extend(std::iter::repeat_n(*v, *n as usize));
            }
            let got = FieldStats::of_counted("f".into(), values, counted);
            let want = FieldStats::of("f".into(), listed);
            proptest::prop_assert_eq!(
                (got.count, got.min, got.max, got.p50, got.p90, got.p95, got.p99),
                (want.count, want.min, want.max, want.p50, want.p90, want.p95, want.p99)
            );
            let close = match (got.avg, want.avg) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                (a, b) => a == b,
            };
            proptest::prop_assert!(close, "{:?} against {:?}", got.avg, want.avg);
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let position = Cursor::Sequence(SortPosition { ts: -5, seq: 77 });
        let text = position.encode(Order::Desc);
        assert_eq!(Cursor::decode(&text, Order::Desc), Ok(position));
        assert!(
            Cursor::decode(&text, Order::Asc)
                .unwrap_err()
                .contains("other sort order")
        );
        assert!(Cursor::decode("garbage!", Order::Desc).is_err());
        assert!(Cursor::decode(&text[..text.len() - 2], Order::Desc).is_err());
        let id = Cursor::Id {
            ts: 1_700_000_000_123_456_789,
            id: Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_0001),
        };
        assert_eq!(Cursor::decode(&id.encode(Order::Asc), Order::Asc), Ok(id));
    }

    #[test]
    fn pages_skip_up_to_the_cursor_and_say_where_the_next_starts() {
        let u = Uuid::from_u128;
        let entries = vec![
            (5, u(2), "a"),
            (5, u(1), "b"),
            (4, u(9), "c"),
            (3, u(1), "d"),
        ];
        let (page, next) = page_after(entries.clone(), Order::Desc, Some((5, u(2))), 2, false);
        assert_eq!(page.iter().map(|e| e.2).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(next, Some(Cursor::Id { ts: 4, id: u(9) }));
        let (page, next) = page_after(entries, Order::Desc, Some((4, u(9))), 2, false);
        assert_eq!(page.iter().map(|e| e.2).collect::<Vec<_>>(), ["d"]);
        assert_eq!(next, None);
    }

    #[test]
    fn exact_percentiles_and_patterns() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut values, 50.0), Some(50.0));
        assert_eq!(percentile(&mut values, 99.0), Some(99.0));
        assert_eq!(percentile(&mut [], 50.0), None);
        let stats = FieldStats::of("d".into(), vec![3.0, 1.0, 2.0]);
        assert_eq!(
            (stats.min, stats.max, stats.avg),
            (Some(1.0), Some(3.0), Some(2.0))
        );
        let top = top_patterns(["user 1 in", "user 2 in", "disk full"].into_iter(), 1);
        assert_eq!((top[0].pattern.as_str(), top[0].count), ("user <*> in", 2));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn any_text_is_a_cursor_or_refused(text in "[A-Za-z0-9_-]{0,40}|.{0,40}") {
                let _ = Cursor::decode(&text, Order::Asc);
                let _ = Cursor::decode(&text, Order::Desc);
            }

            #[test]
            fn cursors_round_trip_in_their_own_order_only(ts in any::<i64>(), seq in any::<u64>(), id in any::<u128>(), asc in any::<bool>()) {
                let order = if asc { Order::Asc } else { Order::Desc };
                let other = if asc { Order::Desc } else { Order::Asc };
                for cursor in [
                    Cursor::Sequence(SortPosition { ts, seq }),
                    Cursor::Id { ts, id: Uuid::from_u128(id) },
                ] {
                    let text = cursor.encode(order);
                    prop_assert_eq!(Cursor::decode(&text, order), Ok(cursor));
                    prop_assert!(Cursor::decode(&text, other).is_err());
                }
            }
        }
    }
}
