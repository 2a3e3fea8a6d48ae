//! Query-string parameters: read one by one so that each error names its parameter, and an
//! unknown parameter (usually a typo) is an error rather than a silently ignored filter.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use logging_common::validate::normalize_identifier;
use logging_common::{LogLevel, Timestamp};

use crate::error::ApiError;
use crate::index::query::{LogFilter, Order};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The parameters of one request, consumed as they are read.
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    pub fn parse(query: Option<&str>) -> Params {
        let pairs = query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Params { pairs }
    }

    /// The last value of `name`, if given and not empty.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let mut value = None;
        self.pairs.retain(|(k, v)| {
            if k == name {
                if !v.is_empty() {
                    value = Some(v.clone());
                }
                false
            } else {
                true
            }
        });
        value
    }

    /// Every value of `name`, also splitting comma-separated ones.
    pub fn take_all(&mut self, name: &str) -> Vec<String> {
        let mut values = Vec::new();
        self.pairs.retain(|(k, v)| {
            if k == name {
                values.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from),
                );
                false
            } else {
                true
            }
        });
        values
    }

    pub fn take_parsed<T>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(text) => parse(&text)
                .map(Some)
                .map_err(|reason| ApiError::field(name, reason)),
        }
    }

    pub fn take_timestamp(&mut self, name: &'static str) -> Result<Option<Timestamp>, ApiError> {
        self.take_parsed(name, |t| Timestamp::parse(t).map_err(|e| e.to_string()))
    }

    pub fn take_bool(&mut self, name: &'static str, default: bool) -> Result<bool, ApiError> {
        Ok(self
            .take_parsed(name, |t| match t {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(format!("expected true or false, got {t:?}")),
            })?
            .unwrap_or(default))
    }

    pub fn take_limit(&mut self) -> Result<usize, ApiError> {
        Ok(self
            .take_parsed("limit", |t| match t.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(format!(
                    "expected a number from 1 to {MAX_LIMIT}, got {t:?}"
                )),
            })?
            .unwrap_or(DEFAULT_LIMIT))
    }

    pub fn take_order(&mut self, default: Order) -> Result<Order, ApiError> {
        Ok(self
            .take_parsed("order", |t| match t {
                "asc" => Ok(Order::Asc),
                "desc" => Ok(Order::Desc),
                _ => Err(format!("expected asc or desc, got {t:?}")),
            })?
            .unwrap_or(default))
    }

    /// Fails on any parameter nobody read.
    pub fn finish(self, hint: &str) -> Result<(), ApiError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((name, _)) => Err(ApiError::field(
                &name.clone(),
                format!("unknown parameter{hint}"),
            )),
        }
    }
}

fn level(text: &str) -> Result<LogLevel, String> {
    text.parse::<LogLevel>().map_err(|e| e.to_string())
}

/// Reads the filters shared by listing, search and analytics.
pub fn log_filter(params: &mut Params, with_text: bool) -> Result<LogFilter, ApiError> {
    let mut filter = LogFilter {
        services: params.take_all("service"),
        level: params.take_parsed("level", level)?,
        min_level: params.take_parsed("min_level", level)?,
        start: params.take_timestamp("start")?,
        end: params.take_timestamp("end")?,
        trace_id: params.take("trace_id"),
        request_id: params.take("request_id"),
        correlation_id: params.take("correlation_id"),
        user_id: params.take("user_id").map(normalize_identifier),
        tags: params.take_all("tag"),
        text: None,
        parsed: None,
    };
    filter.tags.extend(params.take_all("tags"));
    if with_text && let Some(q) = params.take("q") {
        // Parsed here, whichever engine answers: a query the parser refuses (too deep, too
        // long, malformed) never reaches an engine.
        let parsed = crate::index::query_language::parse(&q)
            .map_err(|e| ApiError::field("q", e.to_string()))?;
        filter.parsed = Some(parsed);
        filter.text = Some(q);
    }
    if let (Some(start), Some(end)) = (filter.start, filter.end)
        && start >= end
    {
        return Err(ApiError::field("start", "must be before end"));
    }
    Ok(filter)
}

const CURSOR_VERSION: u8 = 1;

/// Audit listing cursors: version and sequence number, direction included.
pub fn encode_audit_cursor(ascending: bool, seq: i64) -> String {
    let mut bytes = vec![CURSOR_VERSION, if ascending { b'a' } else { b'd' }];
    bytes.extend_from_slice(&seq.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn decode_audit_cursor(text: &str, ascending: bool) -> Result<i64, ApiError> {
    let invalid = || ApiError::field("cursor", "not a cursor returned by this API");
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    if bytes.len() != 10 || bytes[0] != CURSOR_VERSION {
        return Err(invalid());
    }
    if (bytes[1] == b'a') != ascending || !matches!(bytes[1], b'a' | b'd') {
        return Err(ApiError::field(
            "cursor",
            "was returned for the other sort order; keep `order` the same while paging",
        ));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[2..10]);
    Ok(i64::from_be_bytes(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_cursors_round_trip_and_refuse_tampering() {
        let audit = encode_audit_cursor(false, 12);
        assert_eq!(decode_audit_cursor(&audit, false).unwrap(), 12);
        assert!(decode_audit_cursor(&audit, true).is_err());
        assert!(decode_audit_cursor("AQ", false).is_err());
    }

    #[test]
    fn params_are_consumed_and_leftovers_are_errors() {
        let mut p = Params::parse(Some("service=a,b&service=c&levl=error&limit=5"));
        assert_eq!(p.take_all("service"), vec!["a", "b", "c"]);
        assert_eq!(p.take_limit().unwrap(), 5);
        let err = p.finish("").unwrap_err();
        assert_eq!(err.detail, "levl: unknown parameter");
        let mut p = Params::parse(Some("limit=0"));
        assert!(p.take_limit().is_err());
        let mut p = Params::parse(Some("start=2026-11-27T10:00:00Z&end=2026-11-27T09:00:00Z"));
        assert_eq!(
            log_filter(&mut p, false).unwrap_err().detail,
            "start: must be before end"
        );
    }
}
