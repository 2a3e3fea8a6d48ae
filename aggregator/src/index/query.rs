//! What a read asks for: [`LogFilter`] and [`Page`], the same for every engine that answers.

use logging_common::{LogLevel, Timestamp};

/// Which entries a read is about. Every set field must match.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    /// Any of these services.
    pub services: Vec<String>,
    /// Exactly this level.
    pub level: Option<LogLevel>,
    /// This level or more severe.
    pub min_level: Option<LogLevel>,
    /// From this instant, inclusive.
    pub start: Option<Timestamp>,
    /// Up to this instant, exclusive.
    pub end: Option<Timestamp>,
    pub trace_id: Option<String>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// All of these tags.
    pub tags: Vec<String>,
    /// Full-text query in the query language (terms, "phrases", AND/OR/NOT, field:value).
    pub text: Option<String>,
    /// `text`, parsed (and so bounded): see [`super::query_language`].
    pub parsed: Option<super::query_language::Node>,
}

/// Sort direction, by (timestamp, ingest sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// A position in the sort: the (timestamp, sequence) of the last entry of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SortPosition {
    pub ts: i64,
    pub seq: u64,
}

impl SortPosition {
    /// One number that sorts like (ts, seq), for heaps and comparisons.
    pub fn key(self) -> u128 {
        (u128::from((self.ts as u64) ^ (1 << 63)) << 64) | u128::from(self.seq)
    }

    /// The position a [`SortPosition::key`] stands for.
    pub fn from_key(key: u128) -> SortPosition {
        SortPosition {
            ts: (((key >> 64) as u64) ^ (1 << 63)) as i64,
            seq: key as u64,
        }
    }
}

/// Which page of results.
#[derive(Clone, Debug)]
pub struct Page {
    pub limit: usize,
    pub order: Order,
    /// Continue after this position (from a cursor).
    pub after: Option<SortPosition>,
    /// Count every match (search's `total`).
    pub with_total: bool,
    /// Add highlighted fragments of the message.
    pub highlight: bool,
}

/// Why a query cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the embedded index failed: {0}")]
    Index(#[from] super::IndexError),
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> QueryError {
        QueryError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_keys_order_like_timestamp_then_sequence() {
        let k = |ts, seq| SortPosition { ts, seq }.key();
        assert!(k(-5, 9) < k(0, 0));
        assert!(k(0, 0) < k(0, 1));
        assert!(k(0, u64::MAX) < k(1, 0));
        assert!(k(i64::MIN, 0) < k(i64::MAX, 0));
        for (ts, seq) in [(-5, 9), (0, 0), (i64::MIN, u64::MAX), (i64::MAX, 1)] {
            let p = SortPosition { ts, seq };
            assert_eq!(SortPosition::from_key(p.key()), p);
        }
    }
}
