//! Reads from Elasticsearch (`LOG_QUERY_BACKEND=elasticsearch`): the indices the
//! Elasticsearch sink writes, through the documented `_search` API.
//!
//! - Filters are `bool` filter clauses on the template's keyword fields; `q` is a
//!   `query_string` on `message` (AND by default, as the embedded index reads it).
//! - Pages sort by `@timestamp` then `id` and continue with `search_after`; the cursor holds
//!   both, so it is stable while entries arrive.
//! - Analytics is one request: a `date_histogram` with level and service terms, service terms
//!   with an error filter, `stats` and `percentiles` of the context field (a runtime field: the
//!   template maps `context` as `flattened`, whose values are keywords), and the newest
//!   matching messages for patterns. Percentiles are Elasticsearch's TDigest estimates and say
//!   so; patterns are exact when every match fits in the sample, and say so when not.
//! - Soft-deleted entries are excluded by id.

use std::collections::HashMap;
use std::time::Duration;

use logging_common::{LogLevel, Timestamp};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    Analytics, Caveat, Cursor, FieldStats, ListRequest, Listed, Listing, OTHER_BACKEND,
    PATTERN_SAMPLE, PERCENTILES, ReadError, levels_from, sampled_patterns,
};
use crate::index::query::{LogFilter, Order};
use crate::index::{AnalyticsRequest, Highlight, api_json};
use crate::sinks::elasticsearch::ElasticsearchSettings;

const ENGINE: &str = "elasticsearch";
/// Services per timeline bucket, and services in the error-rate table.
const BUCKET_SERVICES: usize = 100;
const SERVICES: usize = 1000;
/// Highlight markers: control characters no message is expected to hold.
const PRE: char = '\u{1}';
const POST: char = '\u{2}';
const DATE_FORMAT: &str = "strict_date_optional_time_nanos";

pub struct EsReader {
    settings: ElasticsearchSettings,
    client: reqwest::Client,
    search_url: reqwest::Url,
}

impl EsReader {
    pub fn new(settings: ElasticsearchSettings) -> anyhow::Result<EsReader> {
        let mut search_url = settings
            .base
            .join(&format!("{}/_search", settings.search_target()))?;
        // A cluster without any of our indices yet answers with no hits, not 404.
        search_url
            .query_pairs_mut()
            .append_pair("ignore_unavailable", "true")
            .append_pair("allow_no_indices", "true");
        Ok(EsReader {
            client: settings.client(Duration::from_secs(30))?,
            settings,
            search_url,
        })
    }

    async fn search(&self, body: &Value, text_query: bool) -> Result<Vec<u8>, ReadError> {
        let engine = |detail: String| ReadError::Engine {
            engine: ENGINE,
            detail,
        };
        let response = self
            .settings
            .authorize(self.client.post(self.search_url.clone()).json(body))
            .send()
            .await
            .map_err(|e| engine(format!("cannot reach {}: {e}", self.settings.base)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| engine(format!("the answer was cut: {e}")))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let reason = error_reason(&bytes);
        if status == reqwest::StatusCode::BAD_REQUEST && text_query && is_query_error(&bytes) {
            // A query the engine cannot parse is the client's to fix.
            return Err(ReadError::invalid("q", reason));
        }
        Err(engine(format!("answered {status}: {reason}")))
    }

    /// A page of entries.
    pub async fn list(&self, request: &ListRequest, hidden: &[Uuid]) -> Result<Listing, ReadError> {
        let body = list_body(request, hidden)?;
        let bytes = self.search(&body, request.filter.text.is_some()).await?;
        read_listing(&bytes, request)
    }

    /// The entry with `id`: its day and API JSON.
    pub async fn get(&self, id: Uuid) -> Result<Option<(i64, Vec<u8>)>, ReadError> {
        let body = json!({ "size": 1, "query": { "ids": { "values": [id.to_string()] } } });
        let bytes = self.search(&body, false).await?;
        let response: SearchResponse = parse(&bytes)?;
        Ok(response.hits.hits.into_iter().next().map(|hit| {
            let json = entry_json(hit.source.get());
            let day = timestamp_of(&json).map_or(0, Timestamp::day);
            (day, json)
        }))
    }

    /// Counts, error rates, the field's distribution and patterns, in one request.
    pub async fn analytics(
        &self,
        request: &AnalyticsRequest,
        hidden: &[Uuid],
    ) -> Result<Analytics, ReadError> {
        let body = analytics_body(request, hidden)?;
        let bytes = self.search(&body, request.filter.text.is_some()).await?;
        read_analytics(&bytes, request)
    }
}

fn engine_error(detail: impl Into<String>) -> ReadError {
    ReadError::Engine {
        engine: ENGINE,
        detail: detail.into(),
    }
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ReadError> {
    serde_json::from_slice(bytes).map_err(|e| engine_error(format!("unreadable answer: {e}")))
}

/// The reason in an Elasticsearch error body (`error.root_cause[0].reason` or `error.reason`).
fn error_reason(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &value["error"];
    error["root_cause"][0]["reason"]
        .as_str()
        .or_else(|| error["reason"].as_str())
        .or_else(|| error.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

/// Whether a 400 is about the query text (`query_string` syntax), not the request as a whole.
fn is_query_error(body: &[u8]) -> bool {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let kind = value["error"]["root_cause"][0]["type"]
        .as_str()
        .unwrap_or_default();
    matches!(
        kind,
        "query_shard_exception" | "parse_exception" | "query_parsing_exception"
    )
}

/// The `bool` query for a filter: every clause a filter (no scoring), `q` a `query_string`.
pub fn query(filter: &LogFilter, hidden: &[Uuid]) -> Value {
    let mut clauses: Vec<Value> = Vec::new();
    if !filter.services.is_empty() {
        clauses.push(json!({ "terms": { "service": filter.services } }));
    }
    if let Some(level) = filter.level {
        clauses.push(json!({ "term": { "level": level.as_str() } }));
    }
    if let Some(level) = filter.min_level {
        clauses.push(json!({ "terms": { "level": levels_from(level) } }));
    }
    if filter.start.is_some() || filter.end.is_some() {
        let mut range = serde_json::Map::new();
        if let Some(start) = filter.start {
            range.insert("gte".into(), start.to_rfc3339().into());
        }
        if let Some(end) = filter.end {
            range.insert("lt".into(), end.to_rfc3339().into());
        }
        range.insert("format".into(), DATE_FORMAT.into());
        clauses.push(json!({ "range": { "@timestamp": range } }));
    }
    for (field, value) in [
        ("trace_id", &filter.trace_id),
        ("request_id", &filter.request_id),
        ("correlation_id", &filter.correlation_id),
        ("user_id", &filter.user_id),
    ] {
        if let Some(value) = value {
            clauses.push(json!({ "term": { field: value } }));
        }
    }
    for tag in &filter.tags {
        clauses.push(json!({ "term": { "tags": tag } }));
    }
    let mut bool_query = json!({ "filter": clauses });
    if let Some(text) = filter.text.as_deref().filter(|t| !t.trim().is_empty()) {
        bool_query["must"] = json!([{ "query_string": {
            "query": text,
            "default_field": "message",
            "default_operator": "AND",
        } }]);
    }
    if !hidden.is_empty() {
        let ids: Vec<String> = hidden.iter().map(Uuid::to_string).collect();
        bool_query["must_not"] = json!([{ "ids": { "values": ids } }]);
    }
    json!({ "bool": bool_query })
}

fn sort(order: Order) -> Value {
    let order = if order == Order::Asc { "asc" } else { "desc" };
    json!([
        { "@timestamp": { "order": order, "format": DATE_FORMAT } },
        { "id": { "order": order } },
    ])
}

/// The `_search` body of a listing: one entry more than the page, to know whether another
/// page follows.
pub fn list_body(request: &ListRequest, hidden: &[Uuid]) -> Result<Value, ReadError> {
    let mut body = json!({
        "size": request.limit + 1,
        "query": query(&request.filter, hidden),
        "sort": sort(request.order),
        "track_total_hits": request.with_total,
    });
    match request.after {
        None => {}
        Some(Cursor::Id { ts, id }) => {
            body["search_after"] = json!([Timestamp::from_nanos(ts).to_rfc3339(), id.to_string()]);
        }
        Some(Cursor::Sequence(_)) => return Err(ReadError::invalid("cursor", OTHER_BACKEND)),
    }
    if request.highlight && request.filter.text.is_some() {
        body["highlight"] = json!({
            "fields": { "message": {
                "number_of_fragments": 1,
                "fragment_size": 160,
                "pre_tags": [PRE.to_string()],
                "post_tags": [POST.to_string()],
            } },
        });
    }
    Ok(body)
}

#[derive(Deserialize)]
struct SearchResponse<'a> {
    #[serde(borrow)]
    hits: Hits<'a>,
    #[serde(default)]
    aggregations: Option<Value>,
}

#[derive(Deserialize)]
struct Hits<'a> {
    #[serde(default)]
    total: Option<Total>,
    #[serde(borrow, default)]
    hits: Vec<Hit<'a>>,
}

#[derive(Deserialize)]
struct Total {
    value: u64,
    #[serde(default)]
    relation: String,
}

#[derive(Deserialize)]
struct Hit<'a> {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_source", borrow)]
    source: &'a RawValue,
    #[serde(default)]
    sort: Vec<Value>,
    #[serde(default)]
    highlight: HashMap<String, Vec<String>>,
}

/// The stored entry from a document: `@timestamp` (added by the sink) taken off.
fn entry_json(source: &str) -> Vec<u8> {
    const PREFIX: &str = "{\"@timestamp\":\"";
    // The sink writes `@timestamp` first, as a plain string: cut it without re-encoding.
    if let Some(rest) = source.strip_prefix(PREFIX)
        && let Some(end) = rest.find('"')
        && let Some(tail) = rest[end + 1..].strip_prefix(',')
    {
        return api_json(format!("{{{tail}").into_bytes());
    }
    match serde_json::from_str::<serde_json::Map<String, Value>>(source) {
        Ok(mut map) => {
            map.remove("@timestamp");
            api_json(serde_json::to_vec(&map).unwrap_or_default())
        }
        Err(_) => source.as_bytes().to_vec(),
    }
}

fn timestamp_of(json: &[u8]) -> Option<Timestamp> {
    #[derive(Deserialize)]
    struct Head {
        timestamp: Timestamp,
    }
    serde_json::from_slice::<Head>(json)
        .ok()
        .map(|h| h.timestamp)
}

/// A fragment marked with [`PRE`]/[`POST`] as the API's highlight.
fn highlight_of(marked: &str) -> Highlight {
    let mut fragment = String::with_capacity(marked.len());
    let mut ranges = Vec::new();
    let mut open = None;
    for c in marked.chars() {
        match c {
            PRE => open = Some(fragment.len()),
            POST => {
                if let Some(start) = open.take() {
                    ranges.push([start, fragment.len()]);
                }
            }
            c => fragment.push(c),
        }
    }
    Highlight { fragment, ranges }
}

fn read_listing(bytes: &[u8], request: &ListRequest) -> Result<Listing, ReadError> {
    let response: SearchResponse = parse(bytes)?;
    let mut caveats = Vec::new();
    let total = match (&response.hits.total, request.with_total) {
        (Some(total), true) => {
            if total.relation == "gte" {
                caveats.push(Caveat::new(
                    "total",
                    format!("Elasticsearch counted at least {} matches", total.value),
                ));
            }
            Some(total.value)
        }
        _ => None,
    };
    let more = response.hits.hits.len() > request.limit;
    let mut entries = Vec::with_capacity(request.limit);
    let mut next = None;
    for hit in response.hits.hits.into_iter().take(request.limit) {
        let json = entry_json(hit.source.get());
        let ts = hit
            .sort
            .first()
            .and_then(Value::as_str)
            .and_then(|t| Timestamp::parse_rfc3339(t).ok())
            .or_else(|| timestamp_of(&json))
            .ok_or_else(|| engine_error(format!("document {} has no timestamp", hit.id)))?;
        let id = Uuid::try_parse(&hit.id)
            .map_err(|_| engine_error(format!("document id {:?} is not a UUID", hit.id)))?;
        next = Some(Cursor::Id {
            ts: ts.as_nanos(),
            id,
        });
        let highlight = hit
            .highlight
            .get("message")
            .and_then(|f| f.first())
            .map(|f| highlight_of(f));
        entries.push(Listed { json, highlight });
    }
    Ok(Listing {
        entries,
        next: if more { next } else { None },
        total,
        caveats,
    })
}

/// The painless script of the numeric runtime field: the context key's value, if a number.
const FIELD_SCRIPT: &str = "def c = params['_source']['context']; \
     if (c instanceof Map) { def v = c.get(params.field); \
     if (v instanceof Number) { emit(((Number) v).doubleValue()); } }";

/// The `_search` body of analytics.
pub fn analytics_body(request: &AnalyticsRequest, hidden: &[Uuid]) -> Result<Value, ReadError> {
    let mut filter = request.filter.clone();
    filter.start = Some(request.start);
    filter.end = Some(request.end);
    let interval_secs = request.interval_nanos / 1_000_000_000;
    let sample = if request.top_patterns > 0 {
        PATTERN_SAMPLE
    } else {
        0
    };
    let mut aggs = json!({
        "timeline": {
            "date_histogram": {
                "field": "@timestamp",
                "fixed_interval": format!("{interval_secs}s"),
            },
            "aggs": {
                "levels": { "terms": { "field": "level", "size": LogLevel::ALL.len() } },
                "services": { "terms": { "field": "service", "size": BUCKET_SERVICES } },
            },
        },
        "services": {
            "terms": { "field": "service", "size": SERVICES },
            "aggs": { "errors": { "filter": {
                "terms": { "level": levels_from(LogLevel::Error) },
            } } },
        },
    });
    let mut body = json!({
        "size": sample,
        "_source": ["message"],
        "sort": sort(Order::Desc),
        "track_total_hits": true,
        "query": query(&filter, hidden),
    });
    if let Some(field) = &request.value_field {
        body["runtime_mappings"] = json!({ "analytics_value": {
            "type": "double",
            "script": { "source": FIELD_SCRIPT, "params": { "field": field } },
        } });
        aggs["value_stats"] = json!({ "stats": { "field": "analytics_value" } });
        aggs["value_percentiles"] = json!({ "percentiles": {
            "field": "analytics_value",
            "percents": PERCENTILES,
            "keyed": false,
        } });
    }
    body["aggs"] = aggs;
    Ok(body)
}

#[derive(Deserialize, Default)]
struct Terms {
    #[serde(default)]
    buckets: Vec<TermBucket>,
    #[serde(default)]
    sum_other_doc_count: u64,
    #[serde(default)]
    doc_count_error_upper_bound: u64,
}

#[derive(Deserialize)]
struct TermBucket {
    key: Value,
    doc_count: u64,
    #[serde(default)]
    errors: Option<Count>,
}

#[derive(Deserialize)]
struct Count {
    doc_count: u64,
}

#[derive(Deserialize)]
struct DateBucket {
    key: i64,
    #[serde(default)]
    levels: Terms,
    #[serde(default)]
    services: Terms,
}

#[derive(Deserialize, Default)]
struct Timeline {
    #[serde(default)]
    buckets: Vec<DateBucket>,
}

#[derive(Deserialize, Default)]
struct Stats {
    count: u64,
    min: Option<f64>,
    max: Option<f64>,
    avg: Option<f64>,
}

#[derive(Deserialize, Default)]
struct Percentiles {
    #[serde(default)]
    values: Vec<PercentileValue>,
}

#[derive(Deserialize)]
struct PercentileValue {
    key: f64,
    value: Option<f64>,
}

#[derive(Deserialize, Default)]
struct Aggregations {
    #[serde(default)]
    timeline: Timeline,
    #[serde(default)]
    services: Terms,
    #[serde(default)]
    value_stats: Option<Stats>,
    #[serde(default)]
    value_percentiles: Option<Percentiles>,
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn read_analytics(bytes: &[u8], request: &AnalyticsRequest) -> Result<Analytics, ReadError> {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        message: String,
    }
    let response: SearchResponse = parse(bytes)?;
    let aggs: Aggregations = match response.aggregations {
        Some(value) => serde_json::from_value(value)
            .map_err(|e| engine_error(format!("unreadable aggregations: {e}")))?,
        None => Aggregations::default(),
    };
    let mut out = Analytics::for_request(request);
    let mut caveats = Vec::new();
    let mut cut_services = false;
    for bucket in &aggs.timeline.buckets {
        let offset = i128::from(bucket.key) * 1_000_000 - i128::from(request.start.as_nanos());
        let Ok(index) = usize::try_from(offset.div_euclid(i128::from(request.interval_nanos)))
        else {
            continue;
        };
        let Some(counts) = out.by_level.get_mut(index) else {
            continue;
        };
        for level in &bucket.levels.buckets {
            if let Ok(parsed) = key_text(&level.key).parse::<LogLevel>() {
                counts[usize::from(parsed.rank())] += level.doc_count;
            }
        }
        for service in &bucket.services.buckets {
            out.by_service
                .insert((index, key_text(&service.key)), service.doc_count);
        }
        cut_services |= bucket.services.sum_other_doc_count > 0;
    }
    if cut_services {
        caveats.push(Caveat::new(
            "timeline.services",
            format!("only the {BUCKET_SERVICES} busiest services of each bucket are listed"),
        ));
    }
    for service in &aggs.services.buckets {
        out.service_totals.insert(
            key_text(&service.key),
            (
                service.doc_count,
                service.errors.as_ref().map_or(0, |e| e.doc_count),
            ),
        );
    }
    if aggs.services.sum_other_doc_count > 0 || aggs.services.doc_count_error_upper_bound > 0 {
        caveats.push(Caveat::new(
            "services",
            format!("only the {SERVICES} busiest services are listed; Elasticsearch's terms counts may be approximate past them"),
        ));
    }
    if let Some(stats) = aggs.value_stats {
        let percentile = |p: f64| {
            aggs.value_percentiles
                .as_ref()
                .and_then(|ps| ps.values.iter().find(|v| (v.key - p).abs() < 1e-9))
                .and_then(|v| v.value)
        };
        out.field_stats = FieldStats {
            field: request.value_field.clone().unwrap_or_default(),
            count: stats.count,
            min: stats.min,
            max: stats.max,
            avg: stats.avg,
            p50: percentile(50.0),
            p90: percentile(90.0),
            p95: percentile(95.0),
            p99: percentile(99.0),
        };
        if stats.count > 0 {
            caveats.push(Caveat::new(
                "field_stats",
                "percentiles are Elasticsearch's TDigest estimates, not exact ranks; count, min, max and avg are exact",
            ));
        }
    }
    if request.top_patterns > 0 {
        let messages: Vec<String> = response
            .hits
            .hits
            .iter()
            .map(|h| {
                serde_json::from_str::<Message>(h.source.get())
                    .map(|m| m.message)
                    .unwrap_or_default()
            })
            .collect();
        let total = response.hits.total.as_ref().map_or(0, |t| t.value);
        out.top_patterns = sampled_patterns(&messages, request.top_patterns, total, &mut caveats);
    }
    out.caveats = caveats;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_lose_only_the_added_timestamp() {
        let source = r#"{"@timestamp":"2026-11-27T10:00:00.5Z","id":"x","message":"m"}"#;
        let json = entry_json(source);
        assert_eq!(
            serde_json::from_slice::<Value>(&json).unwrap(),
            json!({"id":"x","message":"m"})
        );
        let reordered = r#"{"id":"x","@timestamp":"2026-11-27T10:00:00.5Z"}"#;
        assert_eq!(
            serde_json::from_slice::<Value>(&entry_json(reordered)).unwrap(),
            json!({"id":"x"})
        );
    }

    #[test]
    fn highlights_become_fragment_and_ranges() {
        let h = highlight_of("disk \u{1}full\u{2} on \u{1}sda\u{2}");
        assert_eq!(h.fragment, "disk full on sda");
        assert_eq!(h.ranges, vec![[5, 9], [13, 16]]);
    }

    #[test]
    fn error_reasons_come_from_the_root_cause() {
        let body = br#"{"error":{"root_cause":[{"type":"query_shard_exception","reason":"Failed to parse query [a AND]"}],"type":"search_phase_execution_exception","reason":"all shards failed"},"status":400}"#;
        assert_eq!(error_reason(body), "Failed to parse query [a AND]");
        assert!(is_query_error(body));
        let too_many = br#"{"error":{"root_cause":[{"type":"illegal_argument_exception","reason":"Result window is too large"}],"type":"search_phase_execution_exception","reason":"all shards failed"},"status":400}"#;
        assert!(!is_query_error(too_many), "not the client's query text");
    }
}
