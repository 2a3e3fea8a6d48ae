//! What a read asks for ([`LogFilter`], [`Page`]) and its translation into a tantivy query.

use std::ops::Bound;

use logging_common::{LogLevel, Timestamp};
use tantivy::Term;
use tantivy::query::{
    AllQuery, BooleanQuery, Occur, Query, QueryParser, QueryParserError, RangeQuery, TermQuery,
    TermSetQuery,
};
use tantivy::schema::IndexRecordOption;
use uuid::Uuid;

use super::schema::{Fields, KeyKind, id_hash, key_hash};

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
    Index(#[from] tantivy::TantivyError),
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> QueryError {
        QueryError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

fn term_query(term: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(term, IndexRecordOption::Basic))
}

/// Builds the query for `filter`, limited to entries sorting after `after` in `order`.
///
/// `hidden` are soft-deleted ids to exclude. `parser` reads the full-text part.
pub fn build(
    fields: &Fields,
    parser: Option<&QueryParser>,
    filter: &LogFilter,
    order: Order,
    after: Option<SortPosition>,
    hidden: &[Uuid],
) -> Result<Box<dyn Query>, QueryError> {
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    match filter.services.as_slice() {
        [] => {}
        [one] => clauses.push((
            Occur::Must,
            term_query(Term::from_field_text(fields.service, one)),
        )),
        many => clauses.push((
            Occur::Must,
            Box::new(TermSetQuery::new(
                many.iter()
                    .map(|s| Term::from_field_text(fields.service, s)),
            )),
        )),
    }
    if let Some(level) = filter.level {
        clauses.push((
            Occur::Must,
            term_query(Term::from_field_u64(fields.level, u64::from(level.rank()))),
        ));
    }
    if let Some(level) = filter.min_level {
        clauses.push((
            Occur::Must,
            Box::new(RangeQuery::new(
                Bound::Included(Term::from_field_u64(fields.level, u64::from(level.rank()))),
                Bound::Unbounded,
            )),
        ));
    }
    let mut lower = filter.start.map(|t| t.as_nanos());
    let mut upper_exclusive = filter.end.map(|t| t.as_nanos());
    if let Some(after) = after {
        // The cursor's own timestamp stays included: entries with the same timestamp and a
        // later sequence follow it. The collector applies the exact (ts, seq) bound.
        match order {
            Order::Desc => {
                upper_exclusive = Some(upper_exclusive.map_or(after.ts.saturating_add(1), |u| {
                    u.min(after.ts.saturating_add(1))
                }))
            }
            Order::Asc => lower = Some(lower.map_or(after.ts, |l| l.max(after.ts))),
        }
    }
    if lower.is_some() || upper_exclusive.is_some() {
        let bound = |v: Option<i64>, inclusive: bool| match v {
            None => Bound::Unbounded,
            Some(v) if inclusive => Bound::Included(Term::from_field_i64(fields.ts, v)),
            Some(v) => Bound::Excluded(Term::from_field_i64(fields.ts, v)),
        };
        clauses.push((
            Occur::Must,
            Box::new(RangeQuery::new(
                bound(lower, true),
                bound(upper_exclusive, false),
            )),
        ));
    }
    for (kind, value) in [
        (KeyKind::TraceId, &filter.trace_id),
        (KeyKind::RequestId, &filter.request_id),
        (KeyKind::CorrelationId, &filter.correlation_id),
        (KeyKind::UserId, &filter.user_id),
    ] {
        if let Some(value) = value {
            let key = key_hash(kind, value);
            clauses.push((
                Occur::Must,
                term_query(Term::from_field_u64(fields.keys, key)),
            ));
        }
    }
    for tag in &filter.tags {
        clauses.push((
            Occur::Must,
            term_query(Term::from_field_text(fields.tags, tag)),
        ));
    }
    if let Some(text) = filter.text.as_deref().filter(|t| !t.trim().is_empty()) {
        let Some(parser) = parser else {
            return Err(QueryError::invalid(
                "q",
                "full-text search is off (LOG_INDEXING_ENABLED=false)",
            ));
        };
        // Lenient parsing turns a query of exclusions alone (`NOT debug`) into "everything
        // except"; every other problem is still an error for the client.
        let (parsed, errors) = parser.parse_query_lenient(text);
        if let Some(error) = errors
            .into_iter()
            .find(|e| !matches!(e, QueryParserError::AllButQueryForbidden))
        {
            return Err(QueryError::invalid("q", error.to_string()));
        }
        clauses.push((Occur::Must, anchor_negations(parsed)));
    }
    if !hidden.is_empty() {
        clauses.push((
            Occur::MustNot,
            Box::new(TermSetQuery::new(
                hidden
                    .iter()
                    .map(|id| Term::from_field_u64(fields.id_key, id_hash(id))),
            )),
        ));
    }
    // A query of exclusions alone matches nothing in tantivy: anchor it on every document.
    if !clauses.iter().any(|(occur, _)| *occur == Occur::Must) {
        clauses.push((Occur::Must, Box::new(AllQuery)));
    }
    if clauses.len() == 1 && clauses[0].0 == Occur::Must {
        return Ok(clauses.remove(0).1);
    }
    Ok(Box::new(BooleanQuery::new(clauses)))
}

/// Gives `a AND NOT b` its usual meaning.
///
/// tantivy parses it as `+a +(-b)`, and a group of exclusions alone matches nothing, so the
/// whole query would match nothing. A required group of exclusions is lifted into its parent
/// (`+a -b`); any other one is anchored on every document (`(* -b)`).
pub fn anchor_negations(query: Box<dyn Query>) -> Box<dyn Query> {
    let Some(boolean) = query.downcast_ref::<BooleanQuery>() else {
        return query;
    };
    let only_negative = |q: &dyn Query| {
        q.downcast_ref::<BooleanQuery>().is_some_and(|b| {
            !b.clauses().is_empty() && b.clauses().iter().all(|(o, _)| *o == Occur::MustNot)
        })
    };
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    for (occur, sub) in boolean.clauses() {
        let sub = anchor_negations(sub.box_clone());
        if !only_negative(&*sub) {
            clauses.push((*occur, sub));
            continue;
        }
        let Some(inner) = sub.downcast_ref::<BooleanQuery>() else {
            continue;
        };
        if *occur == Occur::Must {
            clauses.extend(inner.clauses().iter().map(|(o, q)| (*o, q.box_clone())));
        } else {
            let mut anchored: Vec<(Occur, Box<dyn Query>)> =
                vec![(Occur::Must, Box::new(AllQuery))];
            anchored.extend(inner.clauses().iter().map(|(o, q)| (*o, q.box_clone())));
            clauses.push((*occur, Box::new(BooleanQuery::new(anchored))));
        }
    }
    if !clauses.iter().any(|(o, _)| *o != Occur::MustNot) {
        clauses.push((Occur::Must, Box::new(AllQuery)));
    }
    Box::new(BooleanQuery::new(clauses))
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
    }
}
