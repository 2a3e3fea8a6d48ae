//! Reads from Loki (`LOG_QUERY_BACKEND=loki`): LogQL over what the Loki sink writes, through
//! `query_range` (log and metric queries) and `query` (instant metric queries).
//!
//! - The stream selector uses the sink's labels (`service`, `level`); ids are structured
//!   metadata (`| trace_id="…"`); tags are matched in the line's JSON.
//! - `q` becomes word matches on the message (`| json` then `(?i)\bword\b` label regexes, with
//!   a line filter in front so Loki skips lines that cannot match): terms, "phrases", NOT and
//!   OR between terms. Parentheses and `field:value` are refused with a clear error.
//! - Loki holds no correlation id, environment, service version or creation time: entries are
//!   rebuilt from the line, labels and metadata without them, and every listing says so;
//!   filtering on `correlation_id` is refused.
//! - Loki answers bounded ranges: without `start`, the last [`LOOKBACK_HOURS`] hours (within
//!   Loki's default `max_query_length` of 721h), said in the answer.
//! - Analytics counts with `sum by (level, service) (count_over_time(…))` evaluated at the
//!   last nanosecond of each bucket, so each count covers exactly [bucket start, bucket end).
//!   The field's count, min, max and mean are exact (`unwrap`); its percentiles are
//!   `quantile_over_time`, which interpolates between ranks (said in the answer).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    Analytics, Caveat, Cursor, FieldStats, ListRequest, Listed, Listing, OTHER_BACKEND,
    PATTERN_SAMPLE, PERCENTILES, ReadError, levels_from, page_after, sampled_patterns,
};
use crate::index::AnalyticsRequest;
use crate::index::query::{LogFilter, Order};
use crate::sinks::loki::{LokiSettings, quote_into};

const ENGINE: &str = "loki";
/// How far back a query without `start` looks.
pub const LOOKBACK_HOURS: i64 = 720;
const NANOS_PER_SEC: i64 = 1_000_000_000;
/// Entries read beyond a page, for entries sharing the cursor's nanosecond.
const SAME_TIME_SLACK: usize = 64;
const VALUE_LABEL: &str = "analytics_value";

/// Fields an entry has that Loki does not hold.
pub const NOT_IN_LOKI: &str = "correlation_id, environment, service_version and created_at are not sent to Loki and are left out of entries read from it";

pub struct LokiReader {
    settings: LokiSettings,
    client: reqwest::Client,
    range_url: reqwest::Url,
    instant_url: reqwest::Url,
}

impl LokiReader {
    pub fn new(settings: LokiSettings) -> anyhow::Result<LokiReader> {
        Ok(LokiReader {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            range_url: settings.push_url.join("query_range")?,
            instant_url: settings.push_url.join("query")?,
            settings,
        })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &reqwest::Url,
        params: &[(&str, String)],
        text_query: bool,
    ) -> Result<T, ReadError> {
        let mut url = url.clone();
        url.query_pairs_mut()
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        let mut request = self.client.get(url.clone());
        if let Some(tenant) = &self.settings.tenant {
            request = request.header("X-Scope-OrgID", tenant);
        }
        let response = request
            .send()
            .await
            .map_err(|e| engine_error(format!("cannot reach {url}: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| engine_error(format!("the answer was cut: {e}")))?;
        if !status.is_success() {
            let reason = String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                .trim()
                .to_string();
            // Loki says "parse error" when the LogQL cannot be read: only `q` comes from the
            // client as text; any other 400 (too many series, too long a range) is Loki's.
            if status == reqwest::StatusCode::BAD_REQUEST
                && text_query
                && reason.contains("parse error")
            {
                return Err(ReadError::invalid("q", reason));
            }
            return Err(engine_error(format!("answered {status}: {reason}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| engine_error(format!("unreadable answer: {e}")))
    }

    /// Log lines of `query` in [start, end), at most `limit`.
    async fn lines(
        &self,
        query: &str,
        start: i64,
        end: i64,
        limit: usize,
        order: Order,
        text_query: bool,
    ) -> Result<Vec<Stream>, ReadError> {
        let params = [
            ("query", query.to_string()),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("limit", limit.to_string()),
            (
                "direction",
                if order == Order::Asc {
                    "forward"
                } else {
                    "backward"
                }
                .to_string(),
            ),
        ];
        let response: QueryResponse<Vec<Stream>> =
            self.get_json(&self.range_url, &params, text_query).await?;
        Ok(response.data.result)
    }

    /// The one value of an instant metric query at `time` (0 when nothing matched).
    async fn scalar(
        &self,
        query: &str,
        time: i64,
        text_query: bool,
    ) -> Result<Option<f64>, ReadError> {
        let params = [("query", query.to_string()), ("time", time.to_string())];
        let response: QueryResponse<Vec<Sample>> = self
            .get_json(&self.instant_url, &params, text_query)
            .await?;
        Ok(response
            .data
            .result
            .first()
            .and_then(|s| s.value.1.parse::<f64>().ok()))
    }

    /// A page of entries.
    pub async fn list(&self, request: &ListRequest, hidden: &[Uuid]) -> Result<Listing, ReadError> {
        let (start, end, mut caveats) = range_of(&request.filter);
        let query = log_query(&request.filter, hidden)?;
        let text = request.filter.text.is_some();
        let after = match request.after {
            None => None,
            Some(Cursor::Id { ts, id }) => Some((ts, id)),
            Some(Cursor::Sequence(_)) => return Err(ReadError::invalid("cursor", OTHER_BACKEND)),
        };
        let (mut from, mut to) = (start, end);
        match (after, request.order) {
            (Some((ts, _)), Order::Desc) => to = to.min(ts.saturating_add(1)),
            (Some((ts, _)), Order::Asc) => from = from.max(ts),
            (None, _) => {}
        }
        let wanted = request.limit + 1 + if after.is_some() { SAME_TIME_SLACK } else { 0 };
        let mut entries = Vec::new();
        let mut returned = 0;
        if from < to {
            for stream in self
                .lines(&query, from, to, wanted, request.order, text)
                .await?
            {
                for value in &stream.values {
                    returned += 1;
                    let labels = value.labels(&stream.stream);
                    let (ts, id, json, truncated) = rebuild(&labels, &value.0, &value.1)?;
                    if truncated && !caveats.iter().any(|c: &Caveat| c.field == "message") {
                        caveats.push(Caveat::new(
                            "message",
                            "some messages were cut to Loki's line limit (256 KiB) when sent",
                        ));
                    }
                    entries.push((ts, id, json));
                }
            }
        }
        entries.sort_by_key(|(ts, id, _)| (*ts, *id));
        if request.order == Order::Desc {
            entries.reverse();
        }
        let (page, next) = page_after(
            entries,
            request.order,
            after,
            request.limit,
            returned >= wanted,
        );
        caveats.push(Caveat::new("items", NOT_IN_LOKI));
        if text {
            caveats.push(text_caveat());
        }
        let total = if request.with_total && from < to {
            let count = format!("sum(count_over_time({query} [{}]))", range_text(to - from));
            Some(self.scalar(&count, to - 1, text).await?.unwrap_or(0.0) as u64)
        } else {
            request.with_total.then_some(0)
        };
        Ok(Listing {
            entries: page
                .into_iter()
                .map(|(_, _, json)| Listed {
                    json,
                    highlight: None,
                })
                .collect(),
            next,
            total,
            caveats,
        })
    }

    /// The entry with `id`: looked for around its UUIDv7 time first, then over the lookback.
    pub async fn get(&self, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, ReadError> {
        let query = format!("{{service=~\".+\"}} | id=\"{id}\"");
        let now = Timestamp::now().as_nanos();
        let lookback = now - LOOKBACK_HOURS * 3600 * NANOS_PER_SEC;
        let mut windows = vec![(lookback, now + 1)];
        if let Some(ts) = id.get_timestamp() {
            let (secs, nanos) = ts.to_unix();
            let at = secs as i64 * NANOS_PER_SEC + i64::from(nanos);
            windows.insert(0, (at - 3600 * NANOS_PER_SEC, at + 3600 * NANOS_PER_SEC));
        }
        for (start, end) in windows {
            for stream in self
                .lines(&query, start, end, 1, Order::Desc, false)
                .await?
            {
                if let Some(value) = stream.values.first() {
                    let labels = value.labels(&stream.stream);
                    let (ts, _, json, _) = rebuild(&labels, &value.0, &value.1)?;
                    return Ok(Some((Timestamp::from_nanos(ts).day(), json)));
                }
            }
        }
        Ok(None)
    }

    /// Counts by bucket, level and service; the field's distribution; patterns of a sample.
    pub async fn analytics(
        &self,
        request: &AnalyticsRequest,
        hidden: &[Uuid],
    ) -> Result<Analytics, ReadError> {
        let text = request.filter.text.is_some();
        let query = log_query(&request.filter, hidden)?;
        let mut out = Analytics::for_request(request);
        let interval = request.interval_nanos;
        let buckets = out.by_level.len() as i64;
        // Each bucket's count is evaluated at its last nanosecond: Loki's range (t-I, t] is
        // then exactly [bucket start, bucket end).
        let params = [
            (
                "query",
                format!(
                    "sum by (level, service) (count_over_time({query} [{}]))",
                    range_text(interval)
                ),
            ),
            (
                "start",
                (request.start.as_nanos() + interval - 1).to_string(),
            ),
            (
                "end",
                (request.start.as_nanos() + buckets * interval - 1).to_string(),
            ),
            ("step", format!("{}s", interval / NANOS_PER_SEC)),
        ];
        let matrix: QueryResponse<Vec<Series>> =
            self.get_json(&self.range_url, &params, text).await?;
        let start_secs = request.start.as_nanos() as f64 / NANOS_PER_SEC as f64;
        let interval_secs = interval as f64 / NANOS_PER_SEC as f64;
        let mut total = 0u64;
        for series in &matrix.data.result {
            let level = series
                .metric
                .get("level")
                .and_then(|l| l.parse::<LogLevel>().ok())
                .unwrap_or(LogLevel::Info);
            let service = series.metric.get("service").map_or("", String::as_str);
            for (at, value) in &series.values {
                let bucket = ((at - start_secs) / interval_secs).round() as i64 - 1;
                let n = value.parse::<f64>().unwrap_or(0.0) as u64;
                if let Ok(bucket) = usize::try_from(bucket) {
                    out.add(bucket, level, service, n);
                    total += n;
                }
            }
        }
        let span = request.end.as_nanos() - request.start.as_nanos();
        let at = request.end.as_nanos() - 1;
        let mut caveats = Vec::new();
        if let Some(field) = &request.value_field {
            out.field_stats = self.field_stats(&query, field, span, at, text).await?;
            if out.field_stats.count > 0 {
                caveats.push(Caveat::new(
                    "field_stats",
                    "percentiles are Loki's quantile_over_time, which interpolates between ranks; count, min, max and avg are exact",
                ));
            }
        }
        if request.top_patterns > 0 && total > 0 {
            let streams = self
                .lines(
                    &query,
                    request.start.as_nanos(),
                    request.end.as_nanos(),
                    PATTERN_SAMPLE,
                    Order::Desc,
                    text,
                )
                .await?;
            let messages: Vec<String> = streams
                .iter()
                .flat_map(|s| s.values.iter())
                .map(|value| {
                    serde_json::from_str::<LineView>(&value.1)
                        .map(|l| l.message)
                        .unwrap_or_default()
                })
                .collect();
            out.top_patterns =
                sampled_patterns(&messages, request.top_patterns, total, &mut caveats);
        }
        if text {
            caveats.push(text_caveat());
        }
        out.caveats = caveats;
        Ok(out)
    }

    async fn field_stats(
        &self,
        query: &str,
        field: &str,
        span: i64,
        at: i64,
        text: bool,
    ) -> Result<FieldStats, ReadError> {
        if !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ReadError::invalid(
                "field",
                "the Loki backend reads context keys of letters, digits and _ only",
            ));
        }
        let range = range_text(span);
        let values = format!(
            "{query} | json {VALUE_LABEL}=\"context.{field}\" | {VALUE_LABEL}=~\"[-+]?[0-9.]+([eE][-+]?[0-9]+)?\""
        );
        let unwrapped = format!("{values} | unwrap {VALUE_LABEL} | __error__=\"\" [{range}]");
        let mut queries = vec![
            format!("sum(count_over_time({values} [{range}]))"),
            format!("min(min_over_time({unwrapped}))"),
            format!("max(max_over_time({unwrapped}))"),
            format!("sum(sum_over_time({unwrapped}))"),
        ];
        for p in PERCENTILES {
            queries.push(format!(
                "quantile_over_time({}, {unwrapped}) by (analytics_all)",
                p / 100.0
            ));
        }
        let answers =
            futures_util::future::try_join_all(queries.iter().map(|q| self.scalar(q, at, text)))
                .await?;
        let count = answers[0].unwrap_or(0.0) as u64;
        let present = |v: Option<f64>| v.filter(|_| count > 0);
        Ok(FieldStats {
            field: field.to_string(),
            count,
            min: present(answers[1]),
            max: present(answers[2]),
            avg: present(answers[3]).map(|sum| sum / count as f64),
            p50: present(answers[4]),
            p90: present(answers[5]),
            p95: present(answers[6]),
            p99: present(answers[7]),
        })
    }
}

fn engine_error(detail: impl Into<String>) -> ReadError {
    ReadError::Engine {
        engine: ENGINE,
        detail: detail.into(),
    }
}

fn text_caveat() -> Caveat {
    Caveat::new(
        "q",
        "Loki matches words of the message case-insensitively by regular expression, not with the embedded index's tokenizer",
    )
}

#[derive(Deserialize)]
struct QueryResponse<T> {
    data: QueryData<T>,
}

#[derive(Deserialize)]
struct QueryData<T> {
    result: T,
}

#[derive(Deserialize)]
struct Stream {
    #[serde(default)]
    stream: HashMap<String, String>,
    #[serde(default)]
    values: Vec<LogValue>,
}

/// `[timestamp, line]`, or `[timestamp, line, {"structuredMetadata": …}]` from a Loki that
/// categorizes labels instead of merging metadata into the stream's.
#[derive(Deserialize)]
struct LogValue(String, String, #[serde(default)] Option<Categorized>);

#[derive(Deserialize, Default)]
struct Categorized {
    #[serde(rename = "structuredMetadata", default)]
    structured_metadata: HashMap<String, String>,
}

impl LogValue {
    /// The entry's labels: the stream's, and its structured metadata when given apart.
    fn labels<'s>(&self, stream: &'s HashMap<String, String>) -> Cow<'s, HashMap<String, String>> {
        match &self.2 {
            Some(c) if !c.structured_metadata.is_empty() => {
                let mut labels = stream.clone();
                labels.extend(c.structured_metadata.clone());
                Cow::Owned(labels)
            }
            _ => Cow::Borrowed(stream),
        }
    }
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: HashMap<String, String>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

#[derive(Deserialize)]
struct LineView {
    #[serde(default)]
    message: String,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    truncated: bool,
}

/// An entry from a Loki value: (timestamp, id, API JSON, whether the message was cut).
fn rebuild(
    labels: &HashMap<String, String>,
    ts: &str,
    line: &str,
) -> Result<(i64, Uuid, Vec<u8>, bool), ReadError> {
    let ts: i64 = ts
        .parse()
        .map_err(|_| engine_error(format!("timestamp {ts:?} is not nanoseconds")))?;
    let id = labels
        .get("id")
        .and_then(|id| Uuid::try_parse(id).ok())
        .ok_or_else(|| engine_error("an entry has no id in its structured metadata"))?;
    let view: LineView = serde_json::from_str(line)
        .map_err(|e| engine_error(format!("entry {id}: the line is not the sink's JSON: {e}")))?;
    let label = |name: &str| labels.get(name).cloned().map_or(Value::Null, Value::from);
    let mut entry = Map::new();
    entry.insert("id".into(), id.to_string().into());
    entry.insert(
        "timestamp".into(),
        Timestamp::from_nanos(ts).to_rfc3339().into(),
    );
    entry.insert("level".into(), label("level"));
    entry.insert("service".into(), label("service"));
    entry.insert("message".into(), view.message.into());
    entry.insert(
        "context".into(),
        Value::Object(view.context.unwrap_or_default()),
    );
    for name in ["trace_id", "span_id", "user_id", "request_id"] {
        entry.insert(name.into(), label(name));
    }
    entry.insert(
        "tags".into(),
        view.tags
            .unwrap_or_default()
            .into_iter()
            .map(Value::from)
            .collect(),
    );
    let json = serde_json::to_vec(&entry).unwrap_or_default();
    Ok((ts, id, json, view.truncated))
}

/// [start, end) of a filter, with the lookback when it has no start.
fn range_of(filter: &LogFilter) -> (i64, i64, Vec<Caveat>) {
    let end = filter.end.unwrap_or_else(Timestamp::now).as_nanos();
    match filter.start {
        Some(start) => (start.as_nanos(), end, Vec::new()),
        None => (
            end - LOOKBACK_HOURS * 3600 * NANOS_PER_SEC,
            end,
            vec![Caveat::new(
                "start",
                format!(
                    "Loki answers bounded ranges: the last {LOOKBACK_HOURS} hours were searched"
                ),
            )],
        ),
    }
}

/// A LogQL range duration covering `nanos` (milliseconds, rounded up).
fn range_text(nanos: i64) -> String {
    format!("{}ms", (nanos + 999_999) / 1_000_000)
}

fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    quote_into(&mut out, value);
    out
}

/// `regex` with RE2's metacharacters escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The log query for a filter: the stream selector, then the pipeline.
pub fn log_query(filter: &LogFilter, hidden: &[Uuid]) -> Result<String, ReadError> {
    if filter.correlation_id.is_some() {
        return Err(ReadError::invalid(
            "correlation_id",
            "the Loki sink does not send correlation ids, so Loki cannot filter on them; use the embedded or Elasticsearch backend",
        ));
    }
    let mut matchers = Vec::new();
    match filter.services.as_slice() {
        [] => {}
        [one] => matchers.push(format!("service={}", quoted(one))),
        many => {
            let alternatives: Vec<String> = many.iter().map(|s| regex_escape(s)).collect();
            matchers.push(format!("service=~{}", quoted(&alternatives.join("|"))));
        }
    }
    if let Some(level) = filter.level {
        matchers.push(format!("level={}", quoted(level.as_str())));
    }
    if let Some(level) = filter.min_level {
        matchers.push(format!("level=~{}", quoted(&levels_from(level).join("|"))));
    }
    if matchers.is_empty() {
        // Loki needs one matcher that cannot match the empty string.
        matchers.push("service=~\".+\"".into());
    }
    let mut query = format!("{{{}}}", matchers.join(", "));
    for (name, value) in [
        ("trace_id", &filter.trace_id),
        ("request_id", &filter.request_id),
        ("user_id", &filter.user_id),
    ] {
        if let Some(value) = value {
            query.push_str(&format!(" | {name}={}", quoted(value)));
        }
    }
    for tag in &filter.tags {
        let tag_json = serde_json::to_string(tag).unwrap_or_default();
        let pattern = format!("\"tags\":\\[([^\\]]*,)?{}[,\\]]", regex_escape(&tag_json));
        query.push_str(&format!(" |~ {}", quoted(&pattern)));
    }
    for id in hidden {
        query.push_str(&format!(" | id!=\"{id}\""));
    }
    if let Some(text) = filter.text.as_deref().filter(|t| !t.trim().is_empty()) {
        query.push_str(&text_pipeline(text)?);
    }
    Ok(query)
}

/// One clause of `q`: alternatives (OR), negated or not.
struct Clause {
    negated: bool,
    alternatives: Vec<String>,
}

/// Splits `q` into words and "phrases".
fn tokens(text: &str) -> Result<Vec<(String, bool)>, ReadError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let phrase: String = chars.by_ref().take_while(|c| *c != '"').collect();
            out.push((phrase, true));
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                word.push(c);
                chars.next();
            }
            if word.contains(['(', ')']) || word.trim_start_matches('-').contains(':') {
                return Err(ReadError::invalid(
                    "q",
                    format!(
                        "{word:?}: the Loki backend reads terms, \"phrases\", NOT and OR; parentheses and field:value are not supported (quote text to search it literally)"
                    ),
                ));
            }
            out.push((word, false));
        }
    }
    Ok(out)
}

fn clauses(text: &str) -> Result<Vec<Clause>, ReadError> {
    let mut clauses: Vec<Clause> = Vec::new();
    let mut negate = false;
    let mut join = false;
    for (token, quoted) in tokens(text)? {
        if !quoted {
            match token.as_str() {
                "AND" => continue,
                "NOT" => {
                    negate = true;
                    continue;
                }
                "OR" => {
                    join = true;
                    continue;
                }
                _ => {}
            }
        }
        let (term, minus) = match token.strip_prefix('-').filter(|_| !quoted) {
            Some(rest) => (rest.to_string(), true),
            None => (token, false),
        };
        let words: Vec<&str> = term
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            continue;
        }
        let pattern = words
            .iter()
            .map(|w| regex_escape(w))
            .collect::<Vec<_>>()
            .join("\\W+");
        let negated = negate || minus;
        negate = false;
        if join && let Some(last) = clauses.last_mut() {
            if last.negated || negated {
                return Err(ReadError::invalid(
                    "q",
                    "the Loki backend reads OR between plain terms only",
                ));
            }
            last.alternatives.push(pattern);
        } else {
            clauses.push(Clause {
                negated,
                alternatives: vec![pattern],
            });
        }
        join = false;
    }
    Ok(clauses)
}

/// The pipeline stages for `q`: a cheap case-insensitive line filter per required clause,
/// then word matches on the extracted message.
fn text_pipeline(text: &str) -> Result<String, ReadError> {
    let clauses = clauses(text)?;
    let mut out = String::new();
    for clause in clauses.iter().filter(|c| !c.negated) {
        out.push_str(&format!(
            " |~ {}",
            quoted(&format!("(?i)({})", clause.alternatives.join("|")))
        ));
    }
    out.push_str(" | json analytics_message=\"message\"");
    for clause in &clauses {
        let regex = format!("(?is).*\\b({})\\b.*", clause.alternatives.join("|"));
        let op = if clause.negated { "!~" } else { "=~" };
        out.push_str(&format!(" | analytics_message{op}{}", quoted(&regex)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_a_selector_and_pipeline() {
        let filter = LogFilter {
            services: vec!["api".into(), "web.1".into()],
            min_level: Some(LogLevel::Error),
            trace_id: Some("t\"1".into()),
            tags: vec!["db".into()],
            text: Some("disk -debug \"no space\" OR full".into()),
            ..LogFilter::default()
        };
        let id = Uuid::from_u128(1);
        let query = log_query(&filter, &[id]).unwrap();
        assert_eq!(
            query,
            concat!(
                r#"{service=~"api|web\\.1", level=~"error|critical|alert|emergency"}"#,
                r#" | trace_id="t\"1""#,
                r#" |~ "\"tags\":\\[([^\\]]*,)?\"db\"[,\\]]""#,
                r#" | id!="00000000-0000-0000-0000-000000000001""#,
                r#" |~ "(?i)(disk)" |~ "(?i)(no\\W+space|full)""#,
                r#" | json analytics_message="message""#,
                r#" | analytics_message=~"(?is).*\\b(disk)\\b.*""#,
                r#" | analytics_message!~"(?is).*\\b(debug)\\b.*""#,
                r#" | analytics_message=~"(?is).*\\b(no\\W+space|full)\\b.*""#,
            )
        );
    }

    #[test]
    fn what_loki_cannot_answer_is_refused_by_name() {
        let filter = LogFilter {
            correlation_id: Some("c".into()),
            ..LogFilter::default()
        };
        assert!(matches!(
            log_query(&filter, &[]),
            Err(ReadError::Invalid {
                field: "correlation_id",
                ..
            })
        ));
        for q in ["(a OR b)", "service:api"] {
            let filter = LogFilter {
                text: Some(q.into()),
                ..LogFilter::default()
            };
            assert!(matches!(
                log_query(&filter, &[]),
                Err(ReadError::Invalid { field: "q", .. })
            ));
        }
        assert_eq!(
            log_query(&LogFilter::default(), &[]).unwrap(),
            r#"{service=~".+"}"#
        );
    }

    #[test]
    fn metadata_given_apart_is_read_as_labels() {
        let stream: Stream = serde_json::from_str(
            r#"{"stream":{"service":"api","level":"info"},"values":[
                ["1764237600000000001","{\"message\":\"m\"}",{"structuredMetadata":{"id":"0192d3a0-0000-7000-8000-000000000001"}}],
                ["1764237600000000002","{\"message\":\"n\"}"]]}"#,
        )
        .unwrap();
        let labels = stream.values[0].labels(&stream.stream);
        let (_, id, _, _) = rebuild(&labels, &stream.values[0].0, &stream.values[0].1).unwrap();
        assert_eq!(id.to_string(), "0192d3a0-0000-7000-8000-000000000001");
        assert!(stream.values[1].labels(&stream.stream).get("id").is_none());
    }

    #[test]
    fn entries_are_rebuilt_from_line_labels_and_metadata() {
        let labels: HashMap<String, String> = [
            ("service", "api"),
            ("level", "error"),
            ("id", "0192d3a0-0000-7000-8000-000000000001"),
            ("trace_id", "t1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (ts, _, json, cut) = rebuild(
            &labels,
            "1764237600000000001",
            r#"{"message":"disk full","context":{"n":1},"tags":["db"]}"#,
        )
        .unwrap();
        assert_eq!(ts, 1_764_237_600_000_000_001);
        assert!(!cut);
        let entry: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(entry["timestamp"], "2025-11-27T10:00:00.000000001Z");
        assert_eq!(entry["service"], "api");
        assert_eq!(entry["trace_id"], "t1");
        assert_eq!(entry["span_id"], Value::Null);
        assert_eq!(entry["context"]["n"], 1);
        assert_eq!(entry["tags"][0], "db");
        assert!(entry.get("correlation_id").is_none());
    }
}
