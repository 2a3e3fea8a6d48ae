//! The message broker (seed: "log streaming and event processing"): events for real-time
//! consumers, published with the broker's acknowledgement awaited.
//!
//! - `nats://` (or `tls://`): NATS JetStream. Events go to the subjects `<topic>.<event>`
//!   (`logs.log.ingested`…), kept by the stream `<TOPIC>` (upper case, `.`/`-` as `_`) that
//!   the publisher creates if no stream exists by that name. Each message carries
//!   `Nats-Msg-Id` = the event id, so JetStream drops a copy published again within its
//!   duplicate window.
//! - `amqp://` (or `amqps://`): RabbitMQ with publisher confirms. Events go to the durable
//!   topic exchange `<topic>` with the event name as routing key (bind a queue with `log.#`,
//!   `alert.*` or `#`), persistent, with `message_id` = the event id and `type` = the event.
//!
//! Events (schemas in `docs/events/`): `log.ingested` (a batch of stored entries, from the
//! WAL with a durable cursor, as a sink), `audit.recorded` (from the audit trail, by sequence
//! number with a durable cursor), `alert.fired` and `alert.resolved` (through the alert
//! notification outbox). Each publish is tried `BROKER_RETRY_ATTEMPTS` times,
//! `BROKER_RETRY_DELAY` ms apart; after that the event stays where it came from (the WAL,
//! the audit trail, the outbox) and is tried again with backoff, so none is lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::Instrument;

use crate::db::AuditFilter;
use crate::db::Database;
use crate::sinks::{Outcome, Sink};

/// How long a publish may wait for the broker's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes of one message when the broker does not say (RabbitMQ).
const DEFAULT_MAX_PAYLOAD: usize = 4 << 20;

pub const LOG_INGESTED: &str = "log.ingested";
pub const AUDIT_RECORDED: &str = "audit.recorded";

/// Which broker, from the URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Amqp,
}

/// The broker settings, checked at start-up.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub url: String,
    pub kind: Kind,
    /// Subject prefix (NATS) or exchange (AMQP).
    pub topic: String,
    pub attempts: u32,
    pub delay: Duration,
}

impl BrokerSettings {
    /// From `BROKER_URL`, `BROKER_TOPIC`, `BROKER_RETRY_ATTEMPTS` and `BROKER_RETRY_DELAY`;
    /// the error names the setting.
    pub fn new(
        url: &str,
        topic: &str,
        attempts: u32,
        delay_ms: u64,
    ) -> Result<BrokerSettings, (&'static str, String)> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
        let kind = match scheme {
            "nats" | "tls" => Kind::Nats,
            "amqp" | "amqps" => Kind::Amqp,
            _ => {
                return Err((
                    "BROKER_URL",
                    "expected nats:// or tls:// (NATS JetStream), amqp:// or amqps:// (RabbitMQ)"
                        .into(),
                ));
            }
        };
        reqwest::Url::parse(url).map_err(|e| ("BROKER_URL", e.to_string()))?;
        let valid = !topic.is_empty()
            && topic.len() <= 200
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            && !topic.starts_with('.')
            && !topic.ends_with('.')
            && !topic.contains("..");
        if !valid {
            return Err((
                "BROKER_TOPIC",
                format!(
                    "{topic:?}: letters, digits, '_', '-' and '.' between tokens (a NATS subject prefix and an AMQP exchange name)"
                ),
            ));
        }
        if attempts == 0 {
            return Err(("BROKER_RETRY_ATTEMPTS", "must be at least 1".into()));
        }
        Ok(BrokerSettings {
            url: url.to_string(),
            kind,
            topic: topic.to_string(),
            attempts,
            delay: Duration::from_millis(delay_ms),
        })
    }

    /// The JetStream stream that keeps the events.
    pub fn stream_name(&self) -> String {
        self.topic.to_ascii_uppercase().replace(['.', '-'], "_")
    }

    /// The NATS subject of `event`.
    pub fn subject(&self, event: &str) -> String {
        format!("{}.{event}", self.topic)
    }
}

enum Connection {
    Nats {
        client: async_nats::Client,
        jetstream: async_nats::jetstream::Context,
    },
    Amqp {
        // Kept so the connection lives as long as its channel.
        _connection: lapin::Connection,
        channel: lapin::Channel,
    },
}

/// A connection to the broker, made on first use and again after a failure.
pub struct Publisher {
    settings: BrokerSettings,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

fn short(text: &str) -> lapin::types::ShortString {
    text.into()
}

impl Publisher {
    pub fn new(settings: BrokerSettings) -> Publisher {
        Publisher {
            settings,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    async fn connect(&self) -> Result<Connection, String> {
        let settings = &self.settings;
        match settings.kind {
            Kind::Nats => {
                let client = async_nats::ConnectOptions::new()
                    .name("logging-aggregator")
                    .connection_timeout(Duration::from_secs(5))
                    .connect(settings.url.as_str())
                    .await
                    .map_err(|e| format!("NATS at {}: {e}", redact(&settings.url)))?;
                let jetstream = async_nats::jetstream::new(client.clone());
                let stream = async_nats::jetstream::stream::Config {
                    name: settings.stream_name(),
                    subjects: vec![format!("{}.>", settings.topic)],
                    ..Default::default()
                };
                if let Err(error) = jetstream.get_or_create_stream(stream).await {
                    // Another stream may already hold these subjects; publishing says so
                    // ("no responders") if none does.
                    tracing::warn!(%error, stream = %settings.stream_name(),
                        "cannot create the JetStream stream for the events");
                }
                Ok(Connection::Nats { client, jetstream })
            }
            Kind::Amqp => {
                let connection = lapin::Connection::connect(
                    &settings.url,
                    lapin::ConnectionProperties::default()
                        .with_connection_name("logging-aggregator".into()),
                )
                .await
                .map_err(|e| format!("RabbitMQ at {}: {e}", redact(&settings.url)))?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| format!("RabbitMQ channel: {e}"))?;
                channel
                    .confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| format!("RabbitMQ confirm.select: {e}"))?;
                channel
                    .exchange_declare(
                        short(&settings.topic),
                        lapin::ExchangeKind::Topic,
                        lapin::options::ExchangeDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .map_err(|e| format!("RabbitMQ exchange {:?}: {e}", settings.topic))?;
                Ok(Connection::Amqp {
                    _connection: connection,
                    channel,
                })
            }
        }
    }

    /// The most bytes one message may have (connecting first: NATS says its limit).
    pub async fn max_payload(&self) -> Result<usize, String> {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            *connection = Some(self.connect().await?);
        }
        Ok(match connection.as_ref() {
            Some(Connection::Nats { client, .. }) => client.server_info().max_payload,
            _ => DEFAULT_MAX_PAYLOAD,
        })
    }

    /// Publishes once, connecting first if needed; `Ok` when the broker acknowledged.
    async fn try_publish(&self, event: &str, id: &str, payload: Bytes) -> Result<(), String> {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            *connection = Some(self.connect().await?);
        }
        let result = match connection.as_ref() {
            Some(Connection::Nats { jetstream, .. }) => {
                let publish = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(id);
                match jetstream
                    .send_publish(self.settings.subject(event), publish)
                    .await
                {
                    Ok(ack) => match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(error)) => Err(format!("JetStream did not store it: {error}")),
                        Err(_) => Err("JetStream did not acknowledge in time".to_string()),
                    },
                    Err(error) => Err(format!("NATS publish: {error}")),
                }
            }
            Some(Connection::Amqp { channel, .. }) => {
                let properties = lapin::BasicProperties::default()
                    .with_message_id(short(id))
                    .with_type(short(event))
                    .with_content_type(short("application/json"))
                    .with_delivery_mode(2);
                let confirm = channel
                    .basic_publish(
                        short(&self.settings.topic),
                        short(event),
                        lapin::options::BasicPublishOptions::default(),
                        &payload,
                        properties,
                    )
                    .await;
                match confirm {
                    Ok(confirm) => match tokio::time::timeout(ACK_TIMEOUT, confirm).await {
                        Ok(Ok(confirmation)) if confirmation.is_ack() => Ok(()),
                        Ok(Ok(_)) => Err("RabbitMQ refused the message (nack)".to_string()),
                        Ok(Err(error)) => Err(format!("RabbitMQ: {error}")),
                        Err(_) => Err("RabbitMQ did not confirm in time".to_string()),
                    },
                    Err(error) => Err(format!("RabbitMQ publish: {error}")),
                }
            }
            None => Err("not connected".to_string()),
        };
        if result.is_err() {
            // Start afresh next time: the connection or channel may be gone.
            if let Some(Connection::Amqp { .. }) = connection.as_ref() {
                *connection = None;
            }
        }
        result
    }

    /// Publishes `payload` as `event`, up to `BROKER_RETRY_ATTEMPTS` times.
    pub async fn publish(&self, event: &str, id: &str, payload: Bytes) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 1..=self.settings.attempts {
            let publishing = tracing::debug_span!(
                "broker publish",
                otel.kind = "producer",
                messaging.system = match self.settings.kind {
                    Kind::Nats => "nats",
                    Kind::Amqp => "rabbitmq",
                },
                event,
                id,
                bytes = payload.len(),
                retry = attempt - 1,
                error.type = tracing::field::Empty,
            );
            let published = self
                .try_publish(event, id, payload.clone())
                .instrument(publishing.clone())
                .await;
            if let Err(error) = &published {
                publishing.record("error.type", error.as_str());
            }
            drop(publishing);
            match published {
                Ok(()) => {
                    metrics::counter!("logging_aggregator_broker_events_total", "event" => event.to_string())
                        .increment(1);
                    return Ok(());
                }
                Err(error) => last = error,
            }
            if attempt < self.settings.attempts {
                tokio::time::sleep(self.settings.delay).await;
            }
        }
        metrics::counter!("logging_aggregator_broker_errors_total", "event" => event.to_string())
            .increment(1);
        Err(last)
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The envelope every event shares, around `body` (a JSON object's members).
fn envelope(event: &str, id: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 160);
    out.extend_from_slice(b"{\"schema\":\"logging-service/");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"/v1\",\"event\":\"");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\",\"event_id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"published_at\":\"");
    out.extend_from_slice(logging_common::Timestamp::now().to_rfc3339().as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(body);
    out.push(b'}');
    out
}

/// An event as JSON: the envelope plus `fields`.
pub fn event_json(event: &str, id: &str, fields: Value) -> Bytes {
    let body = match fields {
        Value::Object(map) => {
            let text = serde_json::to_string(&map).unwrap_or_else(|_| "{}".into());
            text[1..text.len() - 1].to_string()
        }
        _ => String::new(),
    };
    Bytes::from(envelope(event, id, body.as_bytes()))
}

/// `log.ingested`: batches of stored entries, fed from the WAL like a sink.
pub struct BrokerSink {
    publisher: Publisher,
}

impl BrokerSink {
    pub fn new(settings: BrokerSettings) -> BrokerSink {
        BrokerSink {
            publisher: Publisher::new(settings),
        }
    }
}

/// A deterministic id for a chunk of entries, so the same chunk published again is
/// recognised (JetStream drops it; AMQP consumers can).
fn chunk_id(lines: &[Bytes]) -> String {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for line in lines {
        // The id is at the start of every stored entry; hashing the first 64 bytes covers it.
        hasher.update(&line[..line.len().min(64)]);
    }
    format!("{:032x}", hasher.digest128())
}

impl Sink for BrokerSink {
    fn name(&self) -> &'static str {
        "broker"
    }

    async fn send(&mut self, lines: &[Bytes]) -> Outcome {
        // Envelope and the entries' separators fit in what is left of the limit.
        let budget = match self.publisher.max_payload().await {
            Ok(limit) => limit.saturating_sub(1024).max(1024),
            Err(error) => return Outcome::Retry(error),
        };
        let mut rejected = Vec::new();
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, line) in lines.iter().enumerate() {
            if line.len() + 1 > budget {
                rejected.push((
                    i,
                    format!(
                        "the entry is {} bytes, over the broker's message limit of {budget}",
                        line.len()
                    ),
                ));
                if start < i {
                    chunks.push((start, i));
                }
                start = i + 1;
                bytes = 0;
                continue;
            }
            if bytes + line.len() + 1 > budget {
                chunks.push((start, i));
                start = i;
                bytes = 0;
            }
            bytes += line.len() + 1;
        }
        if start < lines.len() {
            chunks.push((start, lines.len()));
        }
        for (n, &(from, to)) in chunks.iter().enumerate() {
            let chunk = &lines[from..to];
            let id = chunk_id(chunk);
            let size: usize = chunk.iter().map(|l| l.len() + 1).sum();
            let mut body = Vec::with_capacity(size + 32);
            body.extend_from_slice(format!("\"count\":{},\"entries\":[", chunk.len()).as_bytes());
            for (k, line) in chunk.iter().enumerate() {
                if k > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(line);
            }
            body.push(b']');
            let payload = Bytes::from(envelope(LOG_INGESTED, &id, &body));
            if let Err(error) = self.publisher.publish(LOG_INGESTED, &id, payload).await {
                if n == 0 && rejected.is_empty() {
                    return Outcome::Retry(error);
                }
                tracing::warn!(%error, "the broker took part of a batch; the rest is sent again");
                let retry = chunks[n..].iter().flat_map(|&(a, b)| a..b).collect();
                return Outcome::Partial { retry, rejected };
            }
        }
        if rejected.is_empty() {
            Outcome::Delivered
        } else {
            Outcome::Partial {
                retry: Vec::new(),
                rejected,
            }
        }
    }
}

/// Publishes `audit.recorded` for each audit entry, in sequence order, from a cursor kept in
/// `DATA_DIR/broker/audit.cursor` (written after each acknowledged event). A new cursor
/// starts at the trail's end: subscribers get what is recorded from then on.
pub struct AuditPublisher {
    pub db: Arc<Database>,
    pub publisher: Arc<Publisher>,
    pub cursor_file: PathBuf,
}

impl AuditPublisher {
    pub fn new(db: Arc<Database>, publisher: Arc<Publisher>, data_dir: &Path) -> AuditPublisher {
        AuditPublisher {
            db,
            publisher,
            cursor_file: data_dir.join("broker").join("audit.cursor"),
        }
    }

    async fn last_sequence(&self) -> Result<i64, String> {
        let page = self
            .db
            .audit_entries(&AuditFilter {
                limit: 1,
                ..AuditFilter::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(page.entries.first().map_or(0, |e| e.sequence))
    }

    fn save(&self, sequence: i64) -> std::io::Result<()> {
        let temporary = self.cursor_file.with_extension("tmp");
        std::fs::write(&temporary, sequence.to_string())?;
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, &self.cursor_file)
    }

    /// Where to start: the saved cursor, or the trail's end.
    pub async fn start(&self) -> anyhow::Result<i64> {
        if let Some(dir) = self.cursor_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::read_to_string(&self.cursor_file) {
            Ok(text) => Ok(text.trim().parse()?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let last = self.last_sequence().await.map_err(anyhow::Error::msg)?;
                self.save(last)?;
                Ok(last)
            }
            Err(error) => Err(error.into()),
        }
    }

    pub async fn run(self, mut cursor: i64, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let page = self
                .db
                .audit_entries(&AuditFilter {
                    after_seq: Some(cursor),
                    ascending: true,
                    limit: 200,
                    ..AuditFilter::default()
                })
                .await;
            let mut wait = Duration::from_millis(250);
            match page {
                Ok(page) => {
                    for entry in page.entries {
                        let id = entry.id.to_string();
                        let payload = event_json(AUDIT_RECORDED, &id, json!({ "audit": entry }));
                        // A stop does not wait out an absent broker: the event is published
                        // again (same id) after the restart.
                        let published = tokio::select! {
                            published = self.publisher.publish(AUDIT_RECORDED, &id, payload) => published,
                            _ = stop.wait_for(|s| *s) => return,
                        };
                        match published {
                            Ok(()) => {
                                cursor = entry.sequence;
                                backoff = Duration::from_millis(500);
                                if let Err(error) = self.save(cursor) {
                                    tracing::error!(%error, "cannot save the audit event cursor");
                                }
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot publish audit.recorded; retrying");
                                wait = crate::sinks::jitter(backoff);
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                                break;
                            }
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot read the audit trail for the broker"),
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
