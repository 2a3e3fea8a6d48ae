//! Loki's query API over the embedded store, so Grafana's Loki data source and `logcli` read
//! the aggregator with no Loki: `query_range`, `query`, `labels`, `label/{name}/values`,
//! `series`, `index/stats`, `index/volume`, `index/volume_range`, `tail` (WebSocket),
//! `status/buildinfo` and `/ready`. Parameters come from the query string or a form body (Grafana POSTs); answers
//! have Loki's shapes (`resultType` `streams`/`matrix`/`vector`/`scalar`, nanosecond
//! timestamps as strings for lines, seconds for samples) and its errors are plain text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logging_common::Timestamp;

use super::push_json;
use super::{Body, Reader, SharedState};
use crate::error::ApiError;
use crate::index::query::Order;
use crate::logql::eval::{EvalError, MAX_POINTS, Matrix, Steps, Value};
use crate::logql::pipeline::Labels;
use crate::logql::store::{ENTRY_LABELS, Selection, Stats};
use crate::logql::syntax::{self, Expr, LogExpr, MetricExpr};
use crate::logql::{self, Answer, LineOptions, QueryFailure, Stream};

/// Options for metric queries, which return no lines.
const NO_LINES: LineOptions = LineOptions {
    limit: 0,
    order: Order::Desc,
    interval: None,
};

/// Loki's default `limit` of lines.
const DEFAULT_LIMIT: usize = 100;
/// Loki's default `max_entries_limit_per_query`.
const MAX_LIMIT: usize = 5000;
/// Loki's default look-back for labels and series: six hours.
const LABELS_LOOKBACK: i64 = 6 * 3_600_000_000_000;
/// A query's default range: one hour.
const DEFAULT_RANGE: i64 = 3_600_000_000_000;
/// The Loki version whose API this one follows, for clients that choose features by it.
const LOKI_API_VERSION: &str = "2.9.0";

/// A plain-text error, as Loki answers.
struct LokiError(StatusCode, String);

impl IntoResponse for LokiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

fn bad(message: impl Into<String>) -> LokiError {
    LokiError(StatusCode::BAD_REQUEST, message.into())
}

impl From<QueryFailure> for LokiError {
    fn from(failure: QueryFailure) -> LokiError {
        match failure {
            QueryFailure::Parse(e) => bad(e.to_string()),
            QueryFailure::Eval(e) => e.into(),
        }
    }
}

impl From<EvalError> for LokiError {
    fn from(error: EvalError) -> LokiError {
        match error {
            EvalError::Invalid(m) => bad(m),
            EvalError::Store(m) => LokiError(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

/// A request's parameters: the query string, then a form body (Grafana POSTs forms).
pub struct Params(Vec<(String, String)>);

impl FromRequest<SharedState> for Params {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Params, ApiError> {
        let query = request.uri().query().map(str::to_string);
        let headers = request.headers().clone();
        let Body(body) = Body::from_request(request, state).await?;
        Ok(Params::read(query.as_deref(), &headers, &body))
    }
}

impl Params {
    fn read(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Params {
        let mut pairs: Vec<(String, String)> = query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form {
            pairs.extend(
                form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())),
            );
        }
        Params(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn time(&self, name: &str, default: i64) -> Result<i64, LokiError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => parse_time(text).ok_or_else(|| {
                bad(format!(
                    "invalid {name} parameter: cannot parse {text:?} as a timestamp"
                ))
            }),
        }
    }

    /// `start` and `end` (or `since` before `end`), defaulting to the `lookback` before now.
    fn range(&self, lookback: i64) -> Result<(i64, i64), LokiError> {
        let end = self.time("end", Timestamp::now().as_nanos())?;
        let since = match self.get("since") {
            Some(text) => syntax::parse_duration(text).ok_or_else(|| {
                bad(format!(
                    "invalid since parameter: {text:?} is not a duration"
                ))
            })?,
            None => lookback,
        };
        let start = self.time("start", end - since)?;
        if end < start {
            return Err(bad("the end timestamp must not be before the start time"));
        }
        Ok((start, end))
    }

    fn duration(&self, name: &str) -> Result<Option<i64>, LokiError> {
        let Some(text) = self.get(name) else {
            return Ok(None);
        };
        let nanos = match text.parse::<f64>() {
            Ok(seconds) => Some((seconds * 1e9) as i64),
            Err(_) => syntax::parse_duration(text),
        };
        match nanos {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(bad(format!(
                "invalid {name} parameter: {text:?} is not a positive duration (e.g. 30s, or 30 for seconds)"
            ))),
        }
    }

    /// `step` for a range of `[start, end]`: as given, else Loki's default (a 250th of the
    /// range, at least a second); at most 11,000 points.
    fn step(&self, start: i64, end: i64) -> Result<i64, LokiError> {
        let step = match self.duration("step")? {
            Some(step) => step,
            None => ((end - start) / 250 / 1_000_000_000).max(1) * 1_000_000_000,
        };
        if (end - start) / step > MAX_POINTS {
            return Err(bad(
                "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
            ));
        }
        Ok(step)
    }

    fn query(&self) -> Result<Expr, LokiError> {
        let text = self
            .get("query")
            .ok_or_else(|| bad("the query parameter is missing"))?;
        syntax::parse(text).map_err(|e| bad(e.to_string()))
    }
}

/// A timestamp as Loki reads one: RFC 3339, Unix seconds with a fraction, or an integer
/// (seconds when it has at most 10 digits, else nanoseconds).
pub fn parse_time(text: &str) -> Option<i64> {
    if text.contains('.')
        && let Ok(seconds) = text.parse::<f64>()
    {
        let whole = seconds.trunc();
        let fraction = ((seconds - whole) * 1e3).round() / 1e3;
        return Some(whole as i64 * 1_000_000_000 + (fraction * 1e9) as i64);
    }
    match text.parse::<i64>() {
        Ok(n) if text.trim_start_matches('-').len() <= 10 => n.checked_mul(1_000_000_000),
        Ok(n) => Some(n),
        Err(_) => Timestamp::parse_rfc3339(text).ok().map(Timestamp::as_nanos),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LokiError> + Send + 'static,
) -> Result<T, LokiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        LokiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the query task failed: {e}"),
        )
    })?
}

fn json_ok(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `GET|POST /loki/api/v1/query_range`.
pub async fn query_range(
    State(state): State<SharedState>,
    _reader: Reader,
    params: Params,
) -> Response {
    answer(async move {
        let expr = params.query()?;
        record_query_kind(&expr);
        let (start, end) = params.range(DEFAULT_RANGE)?;
        let limit = limit(&params)?;
        let order = direction(&params)?;
        let step = params.step(start, end)?;
        let interval = params.duration("interval")?;
        let index = state.index.clone();
        let started = Instant::now();
        blocking(move || {
            let mut stats = Stats::default();
            let steps = Steps { start, end, step };
            let answer = logql::query_range(
                &index,
                &expr,
                steps,
                LineOptions {
                    limit,
                    order,
                    interval,
                },
                &mut stats,
            )?;
            Ok(render(&answer, &steps, false, &stats, started))
        })
        .await
    })
    .await
}

/// Names the LogQL query's kind on the request's trace span.
fn record_query_kind(expr: &Expr) {
    let kind = if matches!(expr, Expr::Log(_)) {
        "logql_log"
    } else {
        "logql_metric"
    };
    tracing::Span::current().record("query.kind", kind);
}

/// `GET|POST /loki/api/v1/query`: a metric query at one instant.
pub async fn query_instant(
    State(state): State<SharedState>,
    _reader: Reader,
    params: Params,
) -> Response {
    answer(async move {
        let expr = params.query()?;
        record_query_kind(&expr);
        let time = params.time("time", Timestamp::now().as_nanos())?;
        if matches!(expr, Expr::Log(_)) {
            return Err(bad(
                "log queries are not supported as an instant query type, please change your query to a range query type",
            ));
        }
        let limit = limit(&params)?;
        let order = direction(&params)?;
        let index = state.index.clone();
        let started = Instant::now();
        blocking(move || {
            let mut stats = Stats::default();
            let steps = Steps {
                start: time,
                end: time,
                step: 1,
            };
            let answer = logql::query_range(&index, &expr, steps, LineOptions { limit, order, interval: None }, &mut stats)?;
            Ok(render(&answer, &steps, true, &stats, started))
        })
        .await
    })
    .await
}

async fn answer(work: impl Future<Output = Result<String, LokiError>>) -> Response {
    match work.await {
        Ok(body) => json_ok(body),
        Err(error) => error.into_response(),
    }
}

fn limit(params: &Params) -> Result<usize, LokiError> {
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text.parse::<usize>().map_err(|_| {
            bad(format!(
                "invalid limit parameter: {text:?} is not a whole number"
            ))
        })?,
    };
    if limit > MAX_LIMIT {
        return Err(bad(format!(
            "max entries limit per query exceeded, limit > max_entries_limit ({limit} > {MAX_LIMIT})"
        )));
    }
    Ok(limit)
}

fn direction(params: &Params) -> Result<Order, LokiError> {
    match params
        .get("direction")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("backward") => Ok(Order::Desc),
        Some("forward") => Ok(Order::Asc),
        Some(other) => Err(bad(format!(
            "invalid direction parameter: {other:?} (forward or backward)"
        ))),
    }
}

/// The answer's JSON, in Loki's shapes.
fn render(
    answer: &Answer,
    steps: &Steps,
    instant: bool,
    stats: &Stats,
    started: Instant,
) -> String {
    let mut out = String::from("{\"status\":\"success\",\"data\":{");
    let mut returned = 0usize;
    match answer {
        Answer::Streams(streams) => {
            out.push_str("\"resultType\":\"streams\",\"result\":[");
            for (i, stream) in streams.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_stream(&mut out, stream);
                returned += stream.entries.len();
            }
            out.push(']');
        }
        Answer::Value(Value::Scalar(values)) => {
            if instant {
                out.push_str("\"resultType\":\"scalar\",\"result\":");
                write_point(
                    &mut out,
                    steps.start,
                    values.first().copied().unwrap_or(f64::NAN),
                );
            } else {
                out.push_str("\"resultType\":\"matrix\",\"result\":[{\"metric\":{},\"values\":[");
                for (k, v) in values.iter().enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    write_point(&mut out, steps.at(k), *v);
                }
                out.push_str("]}]");
            }
        }
        Answer::Value(Value::Vector(matrix)) => {
            if instant {
                out.push_str("\"resultType\":\"vector\",\"result\":[");
                write_vector(&mut out, matrix, steps.start);
                out.push(']');
            } else {
                out.push_str("\"resultType\":\"matrix\",\"result\":[");
                write_matrix(&mut out, matrix, steps);
                out.push(']');
            }
        }
    }
    write_stats(&mut out, stats, returned, started);
    out.push_str("}}");
    out
}

fn write_stats(out: &mut String, stats: &Stats, returned: usize, started: Instant) {
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let _ = write!(
        out,
        ",\"stats\":{{\"summary\":{{\"bytesProcessedPerSecond\":{},\"linesProcessedPerSecond\":{},\"totalBytesProcessed\":{},\"totalLinesProcessed\":{},\"execTime\":{},\"queueTime\":0,\"subqueries\":0,\"totalEntriesReturned\":{},\"splits\":0,\"shards\":0,\"totalPostFilterLines\":{},\"totalStructuredMetadataBytesProcessed\":0}}}}",
        (stats.bytes_scanned as f64 / seconds) as u64,
        (stats.entries_scanned as f64 / seconds) as u64,
        stats.bytes_scanned,
        stats.entries_scanned,
        seconds,
        returned,
        returned,
    );
}

fn write_labels(out: &mut String, labels: &Labels) {
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json(out, k);
        out.push(':');
        push_json(out, v);
    }
    out.push('}');
}

fn write_stream(out: &mut String, stream: &Stream) {
    out.push_str("{\"stream\":");
    write_labels(out, &stream.labels);
    out.push_str(",\"values\":[");
    for (i, (ts, line)) in stream.entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[\"{ts}\",");
        push_json(out, line);
        out.push(']');
    }
    out.push_str("]}");
}

/// `[seconds, "value"]`, as Prometheus writes a sample.
fn write_point(out: &mut String, ts: i64, value: f64) {
    let millis = ts.div_euclid(1_000_000);
    if millis % 1000 == 0 {
        let _ = write!(out, "[{},", millis / 1000);
    } else {
        let _ = write!(
            out,
            "[{}.{:03},",
            millis.div_euclid(1000),
            millis.rem_euclid(1000)
        );
    }
    out.push('"');
    out.push_str(&format_value(value));
    out.push_str("\"]");
}

/// A float as Prometheus formats one: shortest form, `+Inf`, `-Inf`, `NaN`.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{value}")
    }
}

fn write_vector(out: &mut String, matrix: &Matrix, at: i64) {
    let mut first = true;
    for (labels, values) in matrix {
        let Some(Some(v)) = values.first() else {
            continue;
        };
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        out.push_str("{\"metric\":");
        write_labels(out, labels);
        out.push_str(",\"value\":");
        write_point(out, at, *v);
        out.push('}');
    }
}

fn write_matrix(out: &mut String, matrix: &Matrix, steps: &Steps) {
    let mut first = true;
    for (labels, values) in matrix {
        if values.iter().all(Option::is_none) {
            continue;
        }
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        out.push_str("{\"metric\":");
        write_labels(out, labels);
        out.push_str(",\"values\":[");
        let mut first_point = true;
        for (k, v) in values.iter().enumerate() {
            let Some(v) = v else { continue };
            if !std::mem::take(&mut first_point) {
                out.push(',');
            }
            write_point(out, steps.at(k), *v);
        }
        out.push_str("]}");
    }
}

/// The selector of a `query` / `match[]` parameter, or every entry.
fn selector_of(text: Option<&str>) -> Result<LogExpr, LokiError> {
    match text {
        None => Ok(LogExpr {
            selector: Vec::new(),
            stages: Vec::new(),
        }),
        Some(text) => match syntax::parse(text).map_err(|e| bad(e.to_string()))? {
            Expr::Log(log) => Ok(log),
            Expr::Metric(_) => Err(bad(format!("{text:?} is not a stream selector"))),
        },
    }
}

/// Every label set among the entries a selector matches in a range; with `until`, stops once
/// it says so.
fn label_sets(
    state: &SharedState,
    log: &LogExpr,
    start: i64,
    end: i64,
    mut until: impl FnMut(&BTreeMap<Labels, u64>) -> bool,
) -> Result<BTreeMap<Labels, (u64, u64)>, LokiError> {
    let deadline = Instant::now() + crate::logql::store::QUERY_TIMEOUT;
    let mut selection =
        Selection::new(&state.index, log, start, end, deadline).map_err(|e| bad(e.to_string()))?;
    let mut sets: BTreeMap<Labels, (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<Labels, u64> = BTreeMap::new();
    let mut over = false;
    selection.for_each(Order::Desc, |row| {
        let bytes = row.line.len() as u64;
        if !sets.contains_key(&row.labels) && sets.len() >= crate::logql::store::MAX_SERIES {
            over = true;
            return std::ops::ControlFlow::Break(());
        }
        let slot = sets.entry(row.labels.clone()).or_default();
        slot.0 += 1;
        slot.1 += bytes;
        if slot.0 == 1 {
            seen.insert(row.labels, 1);
            if until(&seen) {
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    if over {
        return Err(bad(format!(
            "maximum of series ({}) reached for a single query; narrow the selector or the time range",
            crate::logql::store::MAX_SERIES
        )));
    }
    Ok(sets)
}

fn names_json(names: impl IntoIterator<Item = String>) -> String {
    let names: Vec<String> = names.into_iter().collect();
    format!(
        "{{\"status\":\"success\",\"data\":{}}}",
        serde_json::to_string(&names).unwrap_or_else(|_| "[]".into())
    )
}

/// `GET|POST /loki/api/v1/labels`: the label names of the entries in the range.
pub async fn labels(State(state): State<SharedState>, _reader: Reader, params: Params) -> Response {
    answer(async move {
        let (start, end) = params.range(LABELS_LOOKBACK)?;
        let log = selector_of(params.get("query"))?;
        blocking(move || {
            let sets = label_sets(&state, &log, start, end, |seen| {
                // Every label an entry can have is known: nothing more to learn.
                ENTRY_LABELS
                    .iter()
                    .all(|name| seen.keys().any(|l| l.contains_key(*name)))
            })?;
            let mut names: Vec<String> = sets.keys().flat_map(|l| l.keys().cloned()).collect();
            names.sort();
            names.dedup();
            Ok(names_json(names))
        })
        .await
    })
    .await
}

/// `GET /loki/api/v1/label/{name}/values`.
pub async fn label_values(
    State(state): State<SharedState>,
    _reader: Reader,
    Path(name): Path<String>,
    params: Params,
) -> Response {
    answer(async move {
        let (start, end) = params.range(LABELS_LOOKBACK)?;
        let log = selector_of(params.get("query"))?;
        blocking(move || {
            let sets = label_sets(&state, &log, start, end, |_| false)?;
            let mut values: Vec<String> =
                sets.keys().filter_map(|l| l.get(&name).cloned()).collect();
            values.sort();
            values.dedup();
            Ok(names_json(values))
        })
        .await
    })
    .await
}

/// `GET|POST /loki/api/v1/series`: the label sets of the streams `match[]` selects.
pub async fn series(State(state): State<SharedState>, _reader: Reader, params: Params) -> Response {
    answer(async move {
        let (start, end) = params.range(LABELS_LOOKBACK)?;
        let mut matches: Vec<String> = params
            .all("match[]")
            .into_iter()
            .map(String::from)
            .collect();
        matches.extend(params.all("match").into_iter().map(String::from));
        if matches.is_empty() {
            return Err(bad(
                "at least one match[] parameter (a stream selector) is needed",
            ));
        }
        let selectors = matches
            .iter()
            .map(|m| selector_of(Some(m)))
            .collect::<Result<Vec<_>, _>>()?;
        blocking(move || {
            let mut all: BTreeMap<Labels, ()> = BTreeMap::new();
            for log in &selectors {
                for labels in label_sets(&state, log, start, end, |_| false)?.into_keys() {
                    all.insert(labels, ());
                }
            }
            let mut out = String::from("{\"status\":\"success\",\"data\":[");
            for (i, labels) in all.keys().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_labels(&mut out, labels);
            }
            out.push_str("]}");
            Ok(out)
        })
        .await
    })
    .await
}

/// `GET|POST /loki/api/v1/index/stats`: streams, entries and bytes a selector covers.
pub async fn index_stats(
    State(state): State<SharedState>,
    _reader: Reader,
    params: Params,
) -> Response {
    match async move {
        let (start, end) = params.range(DEFAULT_RANGE)?;
        let log = match params.query()? {
            Expr::Log(log) => LogExpr {
                selector: log.selector,
                stages: Vec::new(),
            },
            Expr::Metric(_) => return Err(bad("index/stats takes a stream selector")),
        };
        blocking(move || {
            let sets = label_sets(&state, &log, start, end, |_| false)?;
            let (entries, bytes) = sets.values().fold((0, 0), |(e, b), (n, s)| (e + n, b + s));
            // Our store has no chunks; each stream's lines are counted as one.
            Ok(format!(
                "{{\"streams\":{},\"chunks\":{},\"entries\":{entries},\"bytes\":{bytes}}}",
                sets.len(),
                sets.len()
            ))
        })
        .await
    }
    .await
    {
        Ok(body) => json_ok(body),
        Err(error) => error.into_response(),
    }
}

/// The volume query for a selector: bytes summed by the target labels (the selector's own
/// label names unless `targetLabels` names others).
fn volume_query(params: &Params, range: i64) -> Result<Expr, LokiError> {
    let log = match params.query()? {
        Expr::Log(log) => log,
        Expr::Metric(_) => return Err(bad("volume takes a stream selector")),
    };
    let mut targets: Vec<String> = params
        .get("targetLabels")
        .map(|t| {
            t.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let by_labels = params.get("aggregateBy") == Some("labels");
    if targets.is_empty() && !by_labels {
        targets = log.selector.iter().map(|m| m.name.clone()).collect();
    }
    if by_labels && targets.is_empty() {
        targets = ENTRY_LABELS.iter().map(|s| s.to_string()).collect();
    }
    targets.sort();
    targets.dedup();
    Ok(Expr::Metric(MetricExpr::Vector {
        op: syntax::VectorOp::Sum,
        parameter: None,
        grouping: Some(syntax::Grouping {
            without: false,
            labels: targets,
        }),
        inner: Box::new(MetricExpr::Range {
            op: syntax::RangeOp::BytesOverTime,
            parameter: None,
            range: Box::new(syntax::LogRange {
                log: LogExpr {
                    selector: log.selector,
                    stages: Vec::new(),
                },
                unwrap: None,
                range,
                offset: 0,
            }),
            grouping: None,
        }),
    }))
}

/// `GET|POST /loki/api/v1/index/volume`: bytes per series (or label) over the range,
/// largest first, at most `limit`.
pub async fn volume(State(state): State<SharedState>, _reader: Reader, params: Params) -> Response {
    answer(async move {
        let (start, end) = params.range(DEFAULT_RANGE)?;
        let expr = volume_query(&params, (end - start).max(1))?;
        let limit = limit(&params)?;
        let index = state.index.clone();
        blocking(move || {
            let steps = Steps {
                start: end,
                end,
                step: 1,
            };
            let mut stats = Stats::default();
            let answer = logql::query_range(&index, &expr, steps, NO_LINES, &mut stats)?;
            let Answer::Value(Value::Vector(matrix)) = answer else {
                return Ok(String::from(
                    "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\",\"result\":[]}}",
                ));
            };
            let mut ranked: Vec<(Labels, f64)> = matrix
                .into_iter()
                .filter_map(|(labels, values)| Some((labels, values.first().copied().flatten()?)))
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            ranked.truncate(limit);
            let mut out = String::from(
                "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\",\"result\":[",
            );
            for (i, (labels, value)) in ranked.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"metric\":");
                write_labels(&mut out, labels);
                out.push_str(",\"value\":");
                write_point(&mut out, end, *value);
                out.push('}');
            }
            out.push_str("]}}");
            Ok(out)
        })
        .await
    })
    .await
}

/// `GET|POST /loki/api/v1/index/volume_range`: the same per `step`.
pub async fn volume_range(
    State(state): State<SharedState>,
    _reader: Reader,
    params: Params,
) -> Response {
    answer(async move {
        let (start, end) = params.range(DEFAULT_RANGE)?;
        let step = params.step(start, end)?;
        let expr = volume_query(&params, step)?;
        let index = state.index.clone();
        let started = Instant::now();
        blocking(move || {
            let steps = Steps { start, end, step };
            let mut stats = Stats::default();
            let answer = logql::query_range(&index, &expr, steps, NO_LINES, &mut stats)?;
            Ok(render(&answer, &steps, false, &stats, started))
        })
        .await
    })
    .await
}

/// `GET /loki/api/v1/status/buildinfo`.
pub async fn buildinfo() -> Response {
    json_ok(format!(
        "{{\"version\":\"{LOKI_API_VERSION}\",\"revision\":\"\",\"branch\":\"\",\"buildUser\":\"\",\"buildDate\":\"\",\"goVersion\":\"\",\"application\":\"logging-aggregator {}\"}}",
        env!("CARGO_PKG_VERSION")
    ))
}

/// `GET /ready`, as Loki answers it: `ready` while the store and its dependencies are (the
/// same checks as `/health/ready`), else 503 naming what is not.
pub async fn ready(State(state): State<SharedState>) -> Response {
    let (ok, checks) = super::health::dependency_checks(&state).await;
    let text = if ok {
        "ready\n".to_string()
    } else {
        format!("not ready: {checks}\n")
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// Tails open at once, as Loki bounds them (`max_concurrent_tail_requests`).
const MAX_TAILS: usize = 32;
/// How often a tail looks for new entries.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// Loki's upper bound on `delay_for`, in seconds.
const MAX_DELAY_FOR: u64 = 5;
/// Entries one tail message carries at most; more are reported as dropped.
const TAIL_BATCH: usize = 1000;

static TAILS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A tail's place among the open ones, given back when it ends.
struct TailSlot;

impl TailSlot {
    fn take() -> Option<TailSlot> {
        use std::sync::atomic::Ordering;
        TAILS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TAILS).then_some(n + 1)
            })
            .ok()
            .map(|_| TailSlot)
    }
}

impl Drop for TailSlot {
    fn drop(&mut self) {
        TAILS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// `GET /loki/api/v1/tail` (WebSocket): the newest `limit` lines since `start` (default an hour
/// ago), then every new line the query matches as it becomes searchable, `delay_for` seconds
/// late (at most 5), in Loki's messages: `{"streams":[…],"dropped_entries":[…]}`.
pub async fn tail(
    State(state): State<SharedState>,
    _reader: Reader,
    upgrade: WebSocketUpgrade,
    params: Params,
) -> Response {
    let setup = (|| {
        let log = match params.query()? {
            Expr::Log(log) => log,
            Expr::Metric(_) => return Err(bad("tail takes a log query, not a metric query")),
        };
        let limit = limit(&params)?;
        let delay_for = match params.get("delay_for") {
            None => 0,
            Some(text) => match text.parse::<u64>() {
                Ok(n) if n <= MAX_DELAY_FOR => n,
                _ => {
                    return Err(bad(format!(
                        "delay_for can't be greater than {MAX_DELAY_FOR} (seconds), nor other than a whole number: {text:?}"
                    )));
                }
            },
        };
        let start = params.time("start", Timestamp::now().as_nanos() - DEFAULT_RANGE)?;
        let slot = TailSlot::take().ok_or_else(|| {
            LokiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("max concurrent tail requests limit exceeded, count > limit ({MAX_TAILS})"),
            )
        })?;
        Ok((log, limit, delay_for, start, slot))
    })();
    let (log, limit, delay_for, start, slot) = match setup {
        Ok(setup) => setup,
        Err(error) => return error.into_response(),
    };
    upgrade.on_upgrade(move |socket| async move {
        let _slot = slot;
        run_tail(state, socket, log, limit, delay_for, start).await;
    })
}

/// One tail message: the streams of `rows`, and the entries past `TAIL_BATCH` as dropped.
fn tail_message(mut rows: Vec<(i64, Labels, String)>) -> String {
    rows.sort_by_key(|(ts, _, _)| *ts);
    let dropped = rows.split_off(rows.len().min(TAIL_BATCH));
    let mut streams: BTreeMap<Labels, Vec<(i64, String)>> = BTreeMap::new();
    for (ts, labels, line) in rows {
        streams.entry(labels).or_default().push((ts, line));
    }
    let mut out = String::from("{\"streams\":[");
    for (i, (labels, entries)) in streams.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_stream(&mut out, &Stream { labels, entries });
    }
    out.push_str("],\"dropped_entries\":");
    if dropped.is_empty() {
        out.push_str("null");
    } else {
        out.push('[');
        for (i, (ts, labels, _)) in dropped.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"labels\":");
            write_labels(&mut out, labels);
            let _ = write!(out, ",\"timestamp\":\"{ts}\"}}");
        }
        out.push(']');
    }
    out.push('}');
    out
}

async fn run_tail(
    state: SharedState,
    mut socket: WebSocket,
    log: LogExpr,
    limit: usize,
    delay_for: u64,
    start: i64,
) {
    let index = state.index.clone();
    let log = std::sync::Arc::new(log);
    // First the newest `limit` lines since `start`, oldest first.
    let mut seen_upto = index.searchable_lsn();
    let first = {
        let (index, log) = (index.clone(), log.clone());
        tokio::task::spawn_blocking(move || -> Result<Vec<(i64, Labels, String)>, EvalError> {
            let mut stats = Stats::default();
            let options = LineOptions {
                limit,
                order: Order::Desc,
                interval: None,
            };
            let streams = logql::select_lines(
                &index,
                &log,
                (start, Timestamp::now().as_nanos()),
                options,
                &mut stats,
            )?;
            Ok(streams
                .into_iter()
                .flat_map(|s| {
                    let labels = s.labels;
                    s.entries
                        .into_iter()
                        .map(move |(ts, line)| (ts, labels.clone(), line))
                })
                .collect())
        })
        .await
    };
    let rows = match first {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            let _ = socket.send(Message::Text(error.to_string().into())).await;
            return;
        }
        Err(_) => return,
    };
    // Lines that became searchable while the first query ran are in its answer and will be
    // in the next looks too: remembered until the looks have passed them, and not sent twice.
    let first_upto = index.searchable_lsn();
    let mut sent: std::collections::HashSet<(i64, Labels, String)> = if first_upto > seen_upto {
        rows.iter().cloned().collect()
    } else {
        Default::default()
    };
    if socket
        .send(Message::Text(tail_message(rows).into()))
        .await
        .is_err()
    {
        return;
    }
    // Then what becomes searchable, `delay_for` late.
    let mut marks: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
    let mut ticker = tokio::time::interval(TAIL_POLL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
        }
        marks.push_back((Instant::now(), index.searchable_lsn()));
        let delay = std::time::Duration::from_secs(delay_for);
        let mut upto = seen_upto;
        while let Some(&(at, lsn)) = marks.front() {
            if at.elapsed() < delay {
                break;
            }
            upto = lsn;
            marks.pop_front();
        }
        if upto <= seen_upto {
            continue;
        }
        let (from, index2, log2) = (seen_upto, index.clone(), log.clone());
        let found = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + crate::logql::store::QUERY_TIMEOUT;
            let mut selection =
                Selection::new(&index2, &log2, i64::MIN + 1, i64::MAX - 1, deadline)
                    .map_err(|e| EvalError::Invalid(e.to_string()))?;
            let mut rows = Vec::new();
            selection.for_each_written(from..upto, |row| {
                rows.push((row.ts, row.labels, row.line));
                std::ops::ControlFlow::Continue(())
            })?;
            Ok::<_, EvalError>(rows)
        })
        .await;
        let rows = match found {
            Ok(Ok(rows)) => rows,
            Ok(Err(error)) => {
                let _ = socket.send(Message::Text(error.to_string().into())).await;
                return;
            }
            Err(_) => return,
        };
        seen_upto = upto;
        let mut rows = rows;
        if !sent.is_empty() {
            rows.retain(|row| !sent.contains(row));
            if seen_upto >= first_upto {
                sent.clear();
            }
        }
        if rows.is_empty() {
            continue;
        }
        if socket
            .send(Message::Text(tail_message(rows).into()))
            .await
            .is_err()
        {
            return;
        }
    }
}
