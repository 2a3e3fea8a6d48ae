//! `GET /api/analytics`: counts over time by level and service, error rate per service, top
//! message patterns, and the distribution of a numeric context field.

use std::time::Instant;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use logging_common::{LogLevel, Timestamp};
use serde::Serialize;
use serde_json::{Map, Value};

use super::params::{Params, log_filter};
use super::{Reader, SharedState, json};
use crate::error::ApiError;
use crate::index::AnalyticsRequest;

const NANOS_PER_SEC: i64 = 1_000_000_000;
const MAX_BUCKETS: i64 = 10_000;
/// Bucket widths chosen automatically, in seconds: the first giving at most 200 buckets.
const NICE_INTERVALS: [i64; 10] = [1, 10, 60, 300, 900, 1800, 3600, 10_800, 21_600, 86_400];

/// Reads `30s`, `5m`, `1h`, `1d` or plain seconds.
fn parse_interval(text: &str) -> Result<i64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: i64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 30s, 5m, 1h or 1d, got {text:?}"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit in {text:?}; use s, m, h or d")),
    };
    if n <= 0 {
        return Err("must be positive".into());
    }
    n.checked_mul(unit)
        .filter(|secs| *secs <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("{text:?} is longer than a century"))
}

#[derive(Serialize)]
struct Bucket {
    start: Timestamp,
    total: u64,
    levels: Map<String, Value>,
    services: Map<String, Value>,
}

#[derive(Serialize)]
struct ServiceRate {
    service: String,
    total: u64,
    errors: u64,
    error_rate: f64,
}

fn level_map(counts: &[u64; 9]) -> Map<String, Value> {
    LogLevel::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(level, n)| (level.as_str().to_string(), Value::from(*n)))
        .collect()
}

/// `GET /api/analytics`.
pub async fn analytics(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    tracing::Span::current().record("query.kind", "analytics");
    let mut params = Params::parse(query.as_deref());
    let mut filter = log_filter(&mut params, true)?;
    let end = filter.end.unwrap_or_else(Timestamp::now);
    let start = filter
        .start
        .unwrap_or_else(|| end.saturating_add_nanos(-86_400 * NANOS_PER_SEC));
    if start >= end {
        return Err(ApiError::field("start", "must be before end"));
    }
    filter.start = Some(start);
    filter.end = Some(end);
    let span_secs = end
        .as_nanos()
        .saturating_sub(start.as_nanos())
        .div_euclid(NANOS_PER_SEC)
        .max(1);
    let interval_secs = match params.take_parsed("interval", parse_interval)? {
        Some(secs) => secs,
        None => NICE_INTERVALS
            .into_iter()
            .find(|i| span_secs / i <= 200)
            .unwrap_or(86_400),
    };
    if span_secs / interval_secs >= MAX_BUCKETS {
        return Err(ApiError::field(
            "interval",
            format!("gives more than {MAX_BUCKETS} buckets over this range; widen it"),
        ));
    }
    let field = params
        .take("field")
        .unwrap_or_else(|| "duration_ms".to_string());
    if field.is_empty() || field.len() > 128 || field.contains(['\0', '.']) {
        return Err(ApiError::field("field", "expected a top-level context key"));
    }
    let top = params
        .take_parsed("top", |t| match t.parse::<usize>() {
            Ok(n) if n <= 100 => Ok(n),
            _ => Err(format!("expected a number from 0 to 100, got {t:?}")),
        })?
        .unwrap_or(10);
    params.finish("")?;

    // Buckets start on multiples of the interval, as Prometheus and Grafana align them.
    let interval_nanos = interval_secs * NANOS_PER_SEC;
    let aligned_start =
        Timestamp::from_nanos(start.as_nanos().div_euclid(interval_nanos) * interval_nanos);
    let request = AnalyticsRequest {
        filter,
        start: aligned_start,
        end,
        interval_nanos,
        value_field: Some(field.clone()),
        top_patterns: top,
    };
    // Over past days only, and only what the embedded store answers (it tells when an
    // answer goes stale; see `cache`).
    let today = Timestamp::now().day() * 86_400 * NANOS_PER_SEC;
    let cached = (matches!(*state.reads, crate::read::QueryBackend::Embedded)
        && end.as_nanos() <= today)
        .then(|| {
            let key = format!("{request:?}");
            (key, state.index.generation(request.start, end))
        });
    if let Some((key, generation)) = &cached
        && let Some(body) = state.query_cache.get(key, *generation)
    {
        let mut body = (*body).clone();
        body["took_ms"] = Value::from(started.elapsed().as_millis() as u64);
        return Ok(json(StatusCode::OK, &body));
    }
    let fruit = state.reads.analytics(&state.index, request).await?;
    let mut per_bucket_services: Vec<Map<String, Value>> = vec![Map::new(); fruit.by_level.len()];
    for ((bucket, service), n) in &fruit.by_service {
        if let Some(map) = per_bucket_services.get_mut(*bucket) {
            map.insert(service.clone(), Value::from(*n));
        }
    }
    let mut level_totals = [0u64; 9];
    let timeline: Vec<Bucket> = fruit
        .by_level
        .iter()
        .zip(per_bucket_services)
        .enumerate()
        .map(|(i, (levels, services))| {
            for (t, n) in level_totals.iter_mut().zip(levels) {
                *t += n;
            }
            Bucket {
                start: Timestamp::from_nanos(aligned_start.as_nanos() + i as i64 * interval_nanos),
                total: levels.iter().sum(),
                levels: level_map(levels),
                services,
            }
        })
        .collect();
    let mut services: Vec<ServiceRate> = fruit
        .service_totals
        .into_iter()
        .map(|(service, (total, errors))| ServiceRate {
            service,
            total,
            errors,
            error_rate: if total > 0 {
                errors as f64 / total as f64
            } else {
                0.0
            },
        })
        .collect();
    services.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.service.cmp(&b.service))
    });
    let total: u64 = level_totals.iter().sum();
    let mut caveats = fruit.caveats;
    caveats.extend(super::logs::archive_caveats(&state, Some(start), Some(end)));
    metrics::histogram!("logging_aggregator_query_duration_seconds", "kind" => "analytics")
        .record(started.elapsed().as_secs_f64());
    let mut body = serde_json::json!({
            "start": start,
            "end": end,
            "interval_seconds": interval_secs,
            "total": total,
            "levels": level_map(&level_totals),
            "timeline": timeline,
            "services": services,
            "top_patterns": fruit.top_patterns,
            "field_stats": fruit.field_stats,
    });
    if !caveats.is_empty() {
        body["caveats"] = serde_json::json!(caveats);
    }
    if let Some((key, generation)) = cached {
        state
            .query_cache
            .put(key, generation, std::sync::Arc::new(body.clone()));
    }
    body["took_ms"] = Value::from(started.elapsed().as_millis() as u64);
    Ok(json(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("90"), Ok(90));
        assert_eq!(parse_interval("5m"), Ok(300));
        assert_eq!(parse_interval("1d"), Ok(86_400));
        assert!(parse_interval("5w").is_err());
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("99999999999999999d").is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_text_is_an_interval_or_refused(text in ".{0,24}") {
                if let Ok(secs) = parse_interval(&text) {
                    prop_assert!(secs > 0 && secs <= 100 * 365 * 86_400);
                }
            }

            #[test]
            fn written_intervals_read_back(n in 1i64..100_000, unit in 0usize..4) {
                let (suffix, scale) = [("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)][unit];
                let expected = n * scale;
                prop_assume!(expected <= 100 * 365 * 86_400);
                prop_assert_eq!(parse_interval(&format!("{n}{suffix}")), Ok(expected));
            }
        }
    }
}
