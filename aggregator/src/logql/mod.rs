//! LogQL, the query language of Loki, over the embedded store: what Grafana's Loki data
//! source and `logcli` send to `/loki/api/v1/query_range` and `/query`. The subset is listed in
//! `docs/logql.md`; everything outside it is refused by the parser naming the construct.
//!
//! - [`syntax`]: the text into a bounded tree;
//! - [`pipeline`]: a line through its stages (filters, parsers, formatting);
//! - [`store`]: entries as Loki lines and labels, and what the store's indexes answer first;
//! - [`eval`]: metric queries at each step.

pub mod eval;
pub mod pipeline;
pub mod store;
pub mod syntax;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Instant;

use crate::index::LogIndex;
use crate::index::query::Order;
use eval::{EvalError, Steps, Value};
use pipeline::Labels;
use store::{IndexSource, Selection, Stats};
use syntax::{Expr, LogExpr};

/// Lines of one stream, in the order asked.
#[derive(Debug)]
pub struct Stream {
    pub labels: Labels,
    /// (nanoseconds, line).
    pub entries: Vec<(i64, String)>,
}

/// What a query answers.
#[derive(Debug)]
pub enum Answer {
    Streams(Vec<Stream>),
    Value(Value),
}

/// Why a query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryFailure {
    #[error(transparent)]
    Parse(#[from] syntax::ParseError),
    #[error(transparent)]
    Eval(#[from] EvalError),
}

/// How a log query's lines are chosen: the first `limit` in `order` (backward: newest
/// first); with `interval`, a stream keeps no two lines closer than it (nanoseconds).
#[derive(Debug, Clone, Copy)]
pub struct LineOptions {
    pub limit: usize,
    pub order: Order,
    pub interval: Option<i64>,
}

/// A log query's lines in `[start, end]`, grouped into streams.
pub fn select_lines(
    index: &LogIndex,
    log: &LogExpr,
    (start, end): (i64, i64),
    options: LineOptions,
    stats: &mut Stats,
) -> Result<Vec<Stream>, EvalError> {
    let deadline = Instant::now() + store::QUERY_TIMEOUT;
    let mut selection = Selection::new(index, log, start, end, deadline)
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
    let mut streams: BTreeMap<Labels, Vec<(i64, String)>> = BTreeMap::new();
    let mut returned = 0;
    if options.limit > 0 {
        selection.for_each(options.order, |row| {
            let entries = streams.entry(row.labels).or_default();
            if let (Some(interval), Some((last, _))) = (options.interval, entries.last())
                && (row.ts - last).abs() < interval
            {
                return ControlFlow::Continue(());
            }
            entries.push((row.ts, row.line));
            returned += 1;
            if returned >= options.limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
    }
    stats.entries_scanned += selection.stats.entries_scanned;
    stats.bytes_scanned += selection.stats.bytes_scanned;
    Ok(streams
        .into_iter()
        .map(|(labels, entries)| Stream { labels, entries })
        .collect())
}

/// A query over a range: lines for a log query, a value per step for a metric one.
pub fn query_range(
    index: &LogIndex,
    expr: &Expr,
    steps: Steps,
    options: LineOptions,
    stats: &mut Stats,
) -> Result<Answer, QueryFailure> {
    match expr {
        Expr::Log(log) => Ok(Answer::Streams(select_lines(
            index,
            log,
            (steps.start, steps.end),
            options,
            stats,
        )?)),
        Expr::Metric(metric) => {
            let mut source = IndexSource {
                index,
                deadline: Instant::now() + store::QUERY_TIMEOUT,
                stats: Stats::default(),
            };
            let value = eval::evaluate(metric, &steps, &mut source)?;
            stats.entries_scanned += source.stats.entries_scanned;
            stats.bytes_scanned += source.stats.bytes_scanned;
            Ok(Answer::Value(value))
        }
    }
}
