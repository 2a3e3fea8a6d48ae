//! The Elasticsearch sink: the documented REST API (`_index_template`, `_bulk`) over the
//! project's own reqwest client, not the `elasticsearch` crate (alpha-only, and a second HTTP
//! stack; see BENCHMARKS.md for what it would cost).
//!
//! - Each entry is a `create` with `_id` = the entry id, so a batch sent again after a lost
//!   answer stores nothing twice: Elasticsearch answers 409 for an id it holds, which counts
//!   as stored.
//! - `_bulk` answers 200 even when items fail, so every item's status is read: 2xx and 409
//!   are stored, 429 and 5xx items are sent again (alone, with backoff), other 4xx (mapping
//!   errors) go to the dead-letter file with Elasticsearch's reason.
//! - Before the first batch the sink installs an index template with explicit mappings:
//!   keyword service, level and ids, text message, `date_nanos` timestamps (entries carry
//!   nanoseconds), `flattened` context (arbitrary keys never add fields or conflict), and
//!   `dynamic: false` so no other field is mapped by guess.
//! - Documents go to daily indices `<index>-YYYY.MM.DD` by the entry's UTC date, or to the
//!   data stream `<index>`. The document is the stored entry with `@timestamp` added (the
//!   field data streams and Kibana expect).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Outcome, Sink};

/// How the sink authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    Basic {
        username: String,
        password: String,
    },
    /// The encoded API key, as Elasticsearch and Kibana hand it out (`base64(id:key)`).
    ApiKey(String),
}

/// The sink's settings, checked at start-up.
#[derive(Clone, Debug)]
pub struct ElasticsearchSettings {
    /// The cluster's base URL.
    pub base: reqwest::Url,
    /// Daily indices are `<index>-YYYY.MM.DD`; the data stream is `<index>`.
    pub index: String,
    pub data_stream: bool,
    pub auth: Option<Auth>,
    /// A CA (PEM) to trust besides the system's.
    pub ca_cert: Option<PathBuf>,
}

impl ElasticsearchSettings {
    /// Checks the settings; the error names the setting.
    pub fn new(
        url: &str,
        index: &str,
        data_stream: bool,
        username: Option<&str>,
        password: Option<&str>,
        api_key: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<ElasticsearchSettings, (&'static str, String)> {
        let mut base =
            reqwest::Url::parse(url).map_err(|e| ("ELASTICSEARCH_URL", e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err((
                "ELASTICSEARCH_URL",
                "expected an http:// or https:// URL".into(),
            ));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        check_index_name(index).map_err(|reason| ("ELASTICSEARCH_INDEX", reason))?;
        let username = username.filter(|u| !u.is_empty());
        let api_key = api_key.filter(|k| !k.is_empty());
        let auth = match (username, api_key) {
            (Some(_), Some(_)) => {
                return Err((
                    "ELASTICSEARCH_API_KEY",
                    "set an API key or a username and password, not both".into(),
                ));
            }
            (Some(username), None) => Some(Auth::Basic {
                username: username.to_string(),
                password: password.unwrap_or_default().to_string(),
            }),
            (None, Some(key)) => Some(Auth::ApiKey(key.to_string())),
            (None, None) if password.is_some_and(|p| !p.is_empty()) => {
                return Err((
                    "ELASTICSEARCH_USERNAME",
                    "ELASTICSEARCH_PASSWORD is set without a username".into(),
                ));
            }
            (None, None) => None,
        };
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                (
                    "ELASTICSEARCH_CA_CERT",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            reqwest::Certificate::from_pem(&pem).map_err(|e| {
                (
                    "ELASTICSEARCH_CA_CERT",
                    format!("{} is not a PEM certificate: {e}", path.display()),
                )
            })?;
        }
        Ok(ElasticsearchSettings {
            base,
            index: index.to_string(),
            data_stream,
            auth,
            ca_cert: ca_cert.map(PathBuf::from),
        })
    }

    /// An HTTP client trusting the configured CA besides the system's.
    pub fn client(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder().timeout(timeout);
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path)?;
            builder = builder.tls_certs_merge([reqwest::Certificate::from_pem(&pem)?]);
        }
        Ok(builder.build()?)
    }

    /// Adds the configured credentials to a request.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(Auth::Basic { username, password }) => {
                request.basic_auth(username, Some(password))
            }
            Some(Auth::ApiKey(key)) => {
                request.header(reqwest::header::AUTHORIZATION, format!("ApiKey {key}"))
            }
            None => request,
        }
    }

    /// What searches name: every daily index, or the data stream.
    pub fn search_target(&self) -> String {
        if self.data_stream {
            self.index.clone()
        } else {
            format!("{}-*", self.index)
        }
    }

    /// The index template's name.
    pub fn template_name(&self) -> String {
        format!("logging-service-{}", self.index)
    }

    /// The index template: which indices it covers and their mappings.
    pub fn template(&self) -> serde_json::Value {
        let keyword = serde_json::json!({ "type": "keyword" });
        let date = serde_json::json!({ "type": "date_nanos" });
        let mut properties = serde_json::Map::new();
        for field in ["@timestamp", "timestamp", "created_at"] {
            properties.insert(field.into(), date.clone());
        }
        for field in [
            "id",
            "service",
            "level",
            "trace_id",
            "span_id",
            "user_id",
            "request_id",
            "correlation_id",
            "environment",
            "service_version",
            "tags",
        ] {
            properties.insert(field.into(), keyword.clone());
        }
        properties.insert("message".into(), serde_json::json!({ "type": "text" }));
        properties.insert(
            "context".into(),
            serde_json::json!({ "type": "flattened", "depth_limit": 64 }),
        );
        let mut template = serde_json::json!({
            "index_patterns": [self.search_target()],
            // Above the built-in `logs-*-*` template (100), which would otherwise win for a
            // data stream named like it.
            "priority": 200,
            "template": {
                "mappings": { "dynamic": false, "properties": properties },
            },
            "_meta": { "managed_by": "logging-service" },
        });
        if self.data_stream {
            template["data_stream"] = serde_json::json!({});
        }
        template
    }
}

/// Elasticsearch's rules for index (and data stream) names.
fn check_index_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("must be 1 to 200 bytes (the date suffix needs the rest of 255)".into());
    }
    if name != name.to_lowercase() {
        return Err(format!("{name:?} must be lower case"));
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Err(format!("{name:?} contains {c:?}, which index names cannot"));
    }
    if name.starts_with(['-', '_', '+', '.']) {
        return Err(format!("{name:?} cannot start with '-', '_', '+' or '.'"));
    }
    Ok(())
}

/// What the sink reads of a stored entry: the id and the timestamp, as written.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(borrow)]
    timestamp: &'a RawValue,
}

/// A `_bulk` request body and which batch entries it carries, in order.
pub struct Bulk {
    pub body: Vec<u8>,
    /// `sent[n]` is the batch index of the n-th action.
    pub sent: Vec<usize>,
    /// Entries that are not valid stored JSON, with why.
    pub invalid: Vec<(usize, String)>,
}

#[derive(Deserialize)]
struct BulkSummary {
    errors: bool,
}

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<std::collections::HashMap<String, ItemResult>>,
}

#[derive(Deserialize)]
struct ItemResult {
    status: u16,
    #[serde(default)]
    error: Option<ItemError>,
}

#[derive(Deserialize)]
struct ItemError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    reason: String,
}

pub struct ElasticsearchSink {
    settings: ElasticsearchSettings,
    client: reqwest::Client,
    bulk_url: reqwest::Url,
    template_installed: bool,
    /// The last day number and its index name (most entries of a batch share a day).
    day: Option<(i64, String)>,
}

impl ElasticsearchSink {
    pub fn new(settings: ElasticsearchSettings) -> anyhow::Result<ElasticsearchSink> {
        let bulk_url = settings.base.join("_bulk")?;
        Ok(ElasticsearchSink {
            client: settings.client(Duration::from_secs(60))?,
            bulk_url,
            settings,
            template_installed: false,
            day: None,
        })
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        self.settings.authorize(request)
    }

    /// The index an entry stamped `ns` goes to.
    fn index_for(&mut self, ns: i64) -> &str {
        if self.settings.data_stream {
            return &self.settings.index;
        }
        let day = ns.div_euclid(86_400 * 1_000_000_000);
        if self.day.as_ref().is_none_or(|(d, _)| *d != day) {
            let date = time::OffsetDateTime::from_unix_timestamp(day * 86_400)
                .map(|t| t.date())
                .unwrap_or(time::Date::MIN);
            let name = format!(
                "{}-{:04}.{:02}.{:02}",
                self.settings.index,
                date.year(),
                u8::from(date.month()),
                date.day()
            );
            self.day = Some((day, name));
        }
        self.day.as_ref().map_or("", |(_, name)| name)
    }

    /// The `_bulk` NDJSON for `lines`: a `create` action with the entry's id and index, then
    /// the entry with `@timestamp` added.
    pub fn bulk(&mut self, lines: &[Bytes]) -> Bulk {
        let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 160).sum());
        let mut sent = Vec::with_capacity(lines.len());
        let mut invalid = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let head: Head = match serde_json::from_slice(line) {
                Ok(head) => head,
                Err(error) => {
                    invalid.push((i, format!("not a stored entry: {error}")));
                    continue;
                }
            };
            let ns = match serde_json::from_str::<logging_common::Timestamp>(head.timestamp.get()) {
                Ok(ts) => ts.as_nanos(),
                Err(error) => {
                    invalid.push((i, format!("timestamp: {error}")));
                    continue;
                }
            };
            // Ids are UUIDs; anything else would need escaping, and is not a stored entry.
            if !head
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                invalid.push((i, format!("id: {:?} is not a UUID", head.id)));
                continue;
            }
            let index = self.index_for(ns);
            body.extend_from_slice(b"{\"create\":{\"_index\":\"");
            body.extend_from_slice(index.as_bytes());
            body.extend_from_slice(b"\",\"_id\":\"");
            body.extend_from_slice(head.id.as_bytes());
            body.extend_from_slice(b"\"}}\n{\"@timestamp\":");
            body.extend_from_slice(head.timestamp.get().as_bytes());
            // A stored entry is a JSON object with at least an id: `{"…` goes on after `{`.
            body.push(b',');
            body.extend_from_slice(&line[1..]);
            body.push(b'\n');
            sent.push(i);
        }
        Bulk {
            body,
            sent,
            invalid,
        }
    }

    async fn install_template(&mut self) -> Result<(), String> {
        let url = self
            .settings
            .base
            .join(&format!(
                "_index_template/{}",
                self.settings.template_name()
            ))
            .map_err(|e| e.to_string())?;
        let request = self.authorize(self.client.put(url).json(&self.settings.template()));
        let response = request
            .send()
            .await
            .map_err(|e| format!("Elasticsearch unreachable: {e}"))?;
        let status = response.status();
        if status.is_success() {
            tracing::info!(template = %self.settings.template_name(), "Elasticsearch index template installed");
            return Ok(());
        }
        Err(format!(
            "installing the index template: {}",
            answer(status, response).await
        ))
    }
}

/// `Elasticsearch answered <status>: <start of the body>`.
async fn answer(status: reqwest::StatusCode, response: reqwest::Response) -> String {
    let mut text = response.text().await.unwrap_or_default();
    text.truncate(text.floor_char_boundary(500));
    format!("Elasticsearch answered {status}: {}", text.trim())
}

/// What `_bulk`'s per-item answers mean for the batch: the items to send again and those
/// refused for good (with why), besides `invalid` (entries never sent). `sent[n]` is the
/// batch index of the n-th item.
pub fn sort_items(response: &[u8], sent: &[usize], invalid: Vec<(usize, String)>) -> Outcome {
    let unreadable =
        |e: serde_json::Error| Outcome::Retry(format!("an unreadable _bulk answer: {e}"));
    let summary: BulkSummary = match serde_json::from_slice(response) {
        Ok(summary) => summary,
        Err(error) => return unreadable(error),
    };
    let parsed = if summary.errors {
        match serde_json::from_slice::<BulkResponse>(response) {
            Ok(parsed) => parsed,
            Err(error) => return unreadable(error),
        }
    } else {
        BulkResponse { items: Vec::new() }
    };
    if summary.errors && parsed.items.len() != sent.len() {
        return Outcome::Retry(format!(
            "the _bulk answer has {} items for {} actions",
            parsed.items.len(),
            sent.len()
        ));
    }
    let mut retry = Vec::new();
    let mut rejected = invalid;
    for (item, &i) in parsed.items.iter().zip(sent) {
        let Some(result) = item.values().next() else {
            retry.push(i);
            continue;
        };
        match result.status {
            200..=299 | 409 => {}
            429 | 500..=599 => retry.push(i),
            status => {
                let (kind, reason) = result
                    .error
                    .as_ref()
                    .map_or(("", ""), |e| (e.kind.as_str(), e.reason.as_str()));
                rejected.push((
                    i,
                    format!("Elasticsearch refused the entry ({status} {kind}): {reason}"),
                ));
            }
        }
    }
    if retry.is_empty() && rejected.is_empty() {
        Outcome::Delivered
    } else {
        Outcome::Partial { retry, rejected }
    }
}

impl Sink for ElasticsearchSink {
    fn name(&self) -> &'static str {
        "elasticsearch"
    }

    async fn send(&mut self, lines: &[Bytes]) -> Outcome {
        if !self.template_installed {
            if let Err(reason) = self.install_template().await {
                return Outcome::Retry(reason);
            }
            self.template_installed = true;
        }
        let Bulk {
            body,
            sent,
            invalid,
        } = self.bulk(lines);
        if sent.is_empty() {
            return Outcome::Partial {
                retry: Vec::new(),
                rejected: invalid,
            };
        }
        let request = self.authorize(
            self.client
                .post(self.bulk_url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                .body(body),
        );
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Retry(format!("Elasticsearch unreachable: {error}")),
        };
        let status = response.status();
        if !status.is_success() {
            let reason = answer(status, response).await;
            // 400: the request as a whole is refused (halving finds the entry); 413: over
            // `http.max_content_length` (halving makes it fit). Anything else may pass later.
            return if status == reqwest::StatusCode::BAD_REQUEST
                || status == reqwest::StatusCode::PAYLOAD_TOO_LARGE
            {
                Outcome::Rejected(reason)
            } else {
                Outcome::Retry(reason)
            };
        }
        let text = match response.bytes().await {
            Ok(text) => text,
            Err(error) => {
                return Outcome::Retry(format!("reading Elasticsearch's answer: {error}"));
            }
        };
        sort_items(&text, &sent, invalid)
    }
}
