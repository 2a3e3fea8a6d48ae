//! Notifications: the outbox the manager writes to, and the channels that deliver it.
//!
//! Each row of `alert_notifications` is one event (`alert.fired`, `alert.resolved`) for one
//! channel. The dispatcher sends the rows that are due, marks them sent when the receiver
//! accepts (2xx, or the SMTP server's 250), and otherwise retries with exponential backoff
//! (1 s doubling to 5 min, with jitter) for as long as it takes: a receiver that is down gets
//! the notification when it returns. Each carries its notification id (`Idempotency-Key`
//! header, or in the body) so a receiver can drop the rare duplicate after a crash between
//! its answer and our write.
//!
//! Alertmanager expects its clients to repeat firing alerts (it resolves those it stops
//! hearing about): firing alerts are re-posted every minute with `endsAt` four minutes ahead,
//! as Prometheus does.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use logging_common::{AlertStatus, Timestamp};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

use super::AlertRecord;
use super::manager::{Command, RESOLVED};
use crate::config::Config;
use crate::db::{Database, NotificationRow};

const TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX_SECONDS: u64 = 300;
const ALERTMANAGER_RESEND: Duration = Duration::from_secs(60);

/// The channels `ALERT_NOTIFICATION_CHANNELS` can name.
pub const CHANNEL_NAMES: [&str; 5] = ["webhook", "slack", "alertmanager", "email", "sms"];

enum Channel {
    Webhook(String),
    Slack(String),
    Alertmanager(String),
    Email {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
    Sms {
        url: String,
        to: Vec<String>,
        token: Option<String>,
        body: String,
    },
    /// `alert.fired` / `alert.resolved` on the message broker (whenever `BROKER_URL` is set).
    Broker(Arc<crate::broker::Publisher>),
}

/// The configured channels, by name.
pub struct Channels {
    channels: Vec<(String, Channel)>,
    client: reqwest::Client,
    /// Where an alert can be looked at (Alertmanager's `generatorURL`).
    external_url: String,
}

fn required<'a>(value: &'a Option<String>, name: &str, channel: &str) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("ALERT_NOTIFICATION_CHANNELS names {channel}, which needs {name}")
        })
}

fn http_url(value: &str, name: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(value).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("{name}: must be an http:// or https:// URL");
    }
    Ok(value.trim_end_matches('/').to_string())
}

fn mailbox(text: &str, name: &str) -> anyhow::Result<Mailbox> {
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{name}: {text:?} is not an email address ({e})"))
}

fn smtp_transport(
    config: &Config,
    url: &str,
) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let parsed = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("ALERT_SMTP_URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("ALERT_SMTP_URL: no host"))?
        .to_string();
    let implicit_tls = match parsed.scheme() {
        "smtp" => false,
        "smtps" => true,
        other => anyhow::bail!(
            "ALERT_SMTP_URL: {other}:// is not supported; smtp:// (STARTTLS, required) or smtps:// (TLS)"
        ),
    };
    let mut tls = TlsParameters::builder(host.clone());
    if let Some(ca) = &config.alert_smtp_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("ALERT_SMTP_CA: cannot read {}: {e}", ca.display()))?;
        let certificate =
            Certificate::from_pem(&pem).map_err(|e| anyhow::anyhow!("ALERT_SMTP_CA: {e}"))?;
        tls = tls.add_root_certificate(certificate);
    }
    let tls = tls
        .build_rustls()
        .map_err(|e| anyhow::anyhow!("ALERT_SMTP_URL: TLS: {e}"))?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(
            parsed
                .port()
                .unwrap_or(if implicit_tls { 465 } else { 587 }),
        )
        .timeout(Some(TIMEOUT))
        .tls(if implicit_tls {
            Tls::Wrapper(tls)
        } else {
            Tls::Required(tls)
        });
    if !parsed.username().is_empty() {
        let decode = |s: &str| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            decode(parsed.username()),
            decode(parsed.password().unwrap_or("")),
        ));
    }
    Ok(builder.build())
}

impl Channels {
    /// Builds the channels `ALERT_NOTIFICATION_CHANNELS` names, or says which setting is
    /// missing or wrong.
    pub fn from_config(
        config: &Config,
        broker: Option<Arc<crate::broker::Publisher>>,
    ) -> anyhow::Result<Channels> {
        let mut channels = Vec::new();
        if let Some(publisher) = broker {
            channels.push(("broker".to_string(), Channel::Broker(publisher)));
        }
        for name in &config.alert_notification_channels {
            let name = name.trim().to_ascii_lowercase();
            let channel = match name.as_str() {
                "webhook" => Channel::Webhook(http_url(
                    required(&config.alert_webhook_url, "ALERT_WEBHOOK_URL", &name)?,
                    "ALERT_WEBHOOK_URL",
                )?),
                "slack" => Channel::Slack(http_url(
                    required(
                        &config.alert_slack_webhook_url,
                        "ALERT_SLACK_WEBHOOK_URL",
                        &name,
                    )?,
                    "ALERT_SLACK_WEBHOOK_URL",
                )?),
                "alertmanager" => Channel::Alertmanager(http_url(
                    required(&config.alertmanager_url, "ALERTMANAGER_URL", &name)?,
                    "ALERTMANAGER_URL",
                )?),
                "email" => {
                    let url = required(&config.alert_smtp_url, "ALERT_SMTP_URL", &name)?;
                    let from = mailbox(
                        required(&config.alert_email_from, "ALERT_EMAIL_FROM", &name)?,
                        "ALERT_EMAIL_FROM",
                    )?;
                    if config.alert_email_to.is_empty() {
                        anyhow::bail!(
                            "ALERT_NOTIFICATION_CHANNELS names email, which needs ALERT_EMAIL_TO"
                        );
                    }
                    let to = config
                        .alert_email_to
                        .iter()
                        .map(|t| mailbox(t, "ALERT_EMAIL_TO"))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    Channel::Email {
                        transport: smtp_transport(config, url)?,
                        from,
                        to,
                    }
                }
                "sms" => {
                    let url = http_url(
                        required(&config.alert_sms_url, "ALERT_SMS_URL", &name)?,
                        "ALERT_SMS_URL",
                    )?;
                    if config.alert_sms_to.is_empty() {
                        anyhow::bail!(
                            "ALERT_NOTIFICATION_CHANNELS names sms, which needs ALERT_SMS_TO"
                        );
                    }
                    if !config.alert_sms_body.contains("{message}") {
                        anyhow::bail!("ALERT_SMS_BODY: must contain {{message}}");
                    }
                    Channel::Sms {
                        url,
                        to: config.alert_sms_to.clone(),
                        token: config.alert_sms_token.clone(),
                        body: config.alert_sms_body.clone(),
                    }
                }
                // Always on with BROKER_URL; naming it is allowed, not needed.
                "broker" if channels.iter().any(|(n, _)| n == "broker") => continue,
                "broker" => anyhow::bail!(
                    "ALERT_NOTIFICATION_CHANNELS names broker, which needs BROKER_URL"
                ),
                "" => continue,
                other => anyhow::bail!(
                    "ALERT_NOTIFICATION_CHANNELS: unknown channel {other:?}; one of {}",
                    CHANNEL_NAMES.join(", ")
                ),
            };
            if channels.iter().any(|(n, _)| *n == name) {
                continue;
            }
            channels.push((name, channel));
        }
        let external_url = config.alert_external_url.clone().unwrap_or_else(|| {
            let host = if config.bind_address == "0.0.0.0" {
                "localhost".to_string()
            } else {
                config.bind_address.clone()
            };
            format!("http://{host}:{}", config.service_port)
        });
        Ok(Channels {
            channels,
            client: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the notification HTTP client: {e}"))?,
            external_url: external_url.trim_end_matches('/').to_string(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.channels.iter().map(|(n, _)| n.clone()).collect()
    }

    fn get(&self, name: &str) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    }

    /// One line about an alert, for chat and SMS.
    fn one_line(event: &str, alert: &AlertRecord) -> String {
        let state = if event == RESOLVED {
            "RESOLVED"
        } else {
            "FIRING"
        };
        let group = alert
            .group
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let group = if group.is_empty() {
            String::new()
        } else {
            format!(" [{group}]")
        };
        let trace = alert
            .trace_id
            .as_ref()
            .map_or(String::new(), |id| format!(" (trace {id})"));
        format!(
            "[{state}] {} ({:?}){group}: {} — value {}, threshold {}{trace}",
            alert.rule,
            alert.alert.severity,
            alert.alert.condition,
            alert.alert.current_value,
            alert.alert.threshold
        )
    }

    /// An alert as Alertmanager's `POST /api/v2/alerts` takes it.
    fn alertmanager_alert(&self, alert: &AlertRecord, ends_at: Option<Timestamp>) -> Value {
        let mut labels = serde_json::Map::new();
        labels.insert("alertname".into(), json!(alert.rule));
        labels.insert(
            "severity".into(),
            serde_json::to_value(alert.alert.severity).unwrap_or(Value::Null),
        );
        for (k, v) in &alert.labels {
            labels.insert(k.clone(), json!(v));
        }
        let mut annotations = serde_json::Map::new();
        annotations.insert("description".into(), json!(alert.alert.description));
        annotations.insert("condition".into(), json!(alert.alert.condition));
        annotations.insert("value".into(), json!(alert.alert.current_value.to_string()));
        if let Some(trace_id) = &alert.trace_id {
            annotations.insert("trace_id".into(), json!(trace_id));
        }
        for (k, v) in &alert.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        let mut body = json!({
            "labels": labels,
            "annotations": annotations,
            "startsAt": alert.alert.triggered_at.unwrap_or(alert.alert.created_at).to_rfc3339(),
            "generatorURL": format!("{}/api/alerts/{}", self.external_url, alert.alert.id),
        });
        if let Some(ends) = ends_at {
            body["endsAt"] = json!(ends.to_rfc3339());
        }
        body
    }

    async fn post(
        &self,
        url: &str,
        body: &Value,
        key: &str,
        token: Option<&str>,
    ) -> Result<(), String> {
        let mut request = self
            .client
            .post(url)
            .json(body)
            .header("idempotency-key", key);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
        accepted(url, response).await
    }

    /// Sends one notification; `Ok` once the receiver accepted it.
    async fn send(&self, row: &NotificationRow) -> Result<(), String> {
        let alert: AlertRecord =
            serde_json::from_str(&row.payload).map_err(|e| format!("unreadable payload: {e}"))?;
        let key = row.id.to_string();
        let channel = self
            .get(&row.channel)
            .ok_or_else(|| format!("channel {} is no longer configured", row.channel))?;
        match channel {
            Channel::Webhook(url) => {
                let body = json!({
                    "version": "1",
                    "event": row.event,
                    "notification_id": key,
                    "alert": alert,
                });
                self.post(url, &body, &key, None).await
            }
            Channel::Broker(publisher) => {
                let payload =
                    crate::broker::event_json(&row.event, &key, json!({ "alert": alert }));
                publisher.publish(&row.event, &key, payload).await
            }
            Channel::Slack(url) => {
                let body = json!({ "text": Self::one_line(&row.event, &alert) });
                self.post(url, &body, &key, None).await
            }
            Channel::Alertmanager(url) => {
                let ends = (row.event == RESOLVED)
                    .then(|| alert.alert.resolved_at.unwrap_or_else(Timestamp::now))
                    .or_else(|| Some(firing_ends_at()));
                let body = json!([self.alertmanager_alert(&alert, ends)]);
                self.post(&format!("{url}/api/v2/alerts"), &body, &key, None)
                    .await
            }
            Channel::Email {
                transport,
                from,
                to,
            } => {
                let subject = Self::one_line(&row.event, &alert);
                let text = format!(
                    "{subject}\n\nRule: {}\nDescription: {}\nCondition: {}\nValue: {}\nThreshold: {}\nGroup: {:?}\nSeverity: {:?}\nTriggered at: {}\nResolved at: {}\nAlert: {}/api/alerts/{}\nNotification: {key}\n{}",
                    alert.rule,
                    alert.alert.description,
                    alert.alert.condition,
                    alert.alert.current_value,
                    alert.alert.threshold,
                    alert.group,
                    alert.alert.severity,
                    alert
                        .alert
                        .triggered_at
                        .map_or("-".into(), |t| t.to_rfc3339()),
                    alert
                        .alert
                        .resolved_at
                        .map_or("-".into(), |t| t.to_rfc3339()),
                    self.external_url,
                    alert.alert.id,
                    alert
                        .trace_id
                        .as_ref()
                        .map_or(String::new(), |id| format!("Trace: {id}\n")),
                );
                let mut message = Message::builder()
                    .from(from.clone())
                    .subject(subject)
                    .message_id(Some(format!("<{key}@logging-service>")));
                for recipient in to {
                    message = message.to(recipient.clone());
                }
                let message = message.body(text).map_err(|e| e.to_string())?;
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("SMTP: {e}"))
            }
            Channel::Sms {
                url,
                to,
                token,
                body,
            } => {
                let message = Self::one_line(&row.event, &alert);
                for number in to {
                    let (text, content_type) = render_sms(body, number, &message);
                    let mut request = self
                        .client
                        .post(url)
                        .header("content-type", content_type)
                        .header("idempotency-key", format!("{key}-{number}"))
                        .body(text);
                    if let Some(token) = token {
                        request = request.bearer_auth(token);
                    }
                    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
                    accepted(url, response).await?;
                }
                Ok(())
            }
        }
    }
}

/// The span of one notification attempt, in the trace of the transition that caused it (the
/// alert's `trace_id`/`span_id`, kept in the notification's payload).
fn notification_span(row: &NotificationRow) -> tracing::Span {
    let span = tracing::debug_span!(
        "alert notification",
        otel.kind = "client",
        alert.id = %row.alert_id,
        channel = %row.channel,
        event = %row.event,
        retry = row.attempts,
        error.type = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    #[derive(serde::Deserialize)]
    struct Traced {
        trace_id: Option<String>,
        span_id: Option<String>,
    }
    if let Ok(Traced {
        trace_id: Some(trace),
        span_id: Some(parent),
    }) = serde_json::from_str::<Traced>(&row.payload)
    {
        logging_common::telemetry::continue_trace(&span, &format!("00-{trace}-{parent}-01"), None);
    }
    span
}

async fn accepted(url: &str, response: reqwest::Response) -> Result<(), String> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    Err(format!("{url} answered {status}: {body}"))
}

/// Fills the SMS body template: JSON-escaped when it is JSON, form-encoded otherwise.
fn render_sms(template: &str, to: &str, message: &str) -> (String, &'static str) {
    if template.trim_start().starts_with('{') {
        let escape = |s: &str| {
            let quoted = serde_json::to_string(s).unwrap_or_default();
            quoted[1..quoted.len() - 1].to_string()
        };
        (
            template
                .replace("{to}", &escape(to))
                .replace("{message}", &escape(message)),
            "application/json",
        )
    } else {
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        (
            template
                .replace("{to}", &encode(to))
                .replace("{message}", &encode(message)),
            "application/x-www-form-urlencoded",
        )
    }
}

fn firing_ends_at() -> Timestamp {
    Timestamp::now().saturating_add_nanos(4 * ALERTMANAGER_RESEND.as_nanos() as i64)
}

/// The wait before attempt `attempts + 1`.
fn backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    let base = 1u64
        .checked_shl(exponent)
        .unwrap_or(u64::MAX)
        .min(BACKOFF_MAX_SECONDS);
    crate::sinks::jitter(Duration::from_secs(base))
}

/// Sends what is due, forever.
pub struct Dispatcher {
    pub db: Arc<Database>,
    pub channels: Arc<Channels>,
    pub wake: Arc<Notify>,
    pub commands: mpsc::Sender<Command>,
}

impl Dispatcher {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let alertmanager = self
            .channels
            .channels
            .iter()
            .any(|(_, c)| matches!(c, Channel::Alertmanager(_)));
        let mut next_resend = tokio::time::Instant::now() + ALERTMANAGER_RESEND;
        loop {
            if let Err(error) = self.round().await {
                tracing::error!(%error, "cannot read the notification outbox");
            }
            if alertmanager && tokio::time::Instant::now() >= next_resend {
                next_resend = tokio::time::Instant::now() + ALERTMANAGER_RESEND;
                self.resend_firing().await;
            }
            let wait = match self.db.next_notification_due().await {
                Ok(Some(due)) => {
                    let ns = (due - Timestamp::now().as_nanos()).max(0) as u64;
                    Duration::from_nanos(ns).min(Duration::from_secs(5))
                }
                _ => Duration::from_secs(5),
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Sends every due notification, concurrently, and records each outcome.
    async fn round(&self) -> Result<(), crate::db::DbError> {
        loop {
            let due = self
                .db
                .due_notifications(Timestamp::now().as_nanos(), 64)
                .await?;
            if due.is_empty() {
                return Ok(());
            }
            let mut sends = tokio::task::JoinSet::new();
            for row in due {
                let channels = self.channels.clone();
                let span = notification_span(&row);
                sends.spawn(
                    async move {
                        let result = channels.send(&row).await;
                        if let Err(error) = &result {
                            tracing::Span::current().record("error.type", error.as_str());
                        }
                        (row, result)
                    }
                    .instrument(span),
                );
            }
            let mut delivered = Vec::new();
            let mut failed_any = false;
            while let Some(joined) = sends.join_next().await {
                let Ok((row, result)) = joined else {
                    continue;
                };
                let attempts = row.attempts + 1;
                match result {
                    Ok(()) => {
                        self.db
                            .notification_sent(row.id, attempts, Timestamp::now().as_nanos())
                            .await?;
                        metrics::counter!("logging_aggregator_alert_notifications_total",
                            "channel" => row.channel.clone(), "event" => row.event.clone())
                        .increment(1);
                        delivered.push((row.alert_id, row.event.clone()));
                    }
                    Err(error) => {
                        failed_any = true;
                        let next = Timestamp::now()
                            .saturating_add_nanos(backoff(attempts).as_nanos() as i64);
                        tracing::warn!(channel = %row.channel, alert = %row.alert_id, attempts,
                            %error, "notification not delivered; will retry");
                        metrics::counter!("logging_aggregator_alert_notification_failures_total",
                            "channel" => row.channel.clone())
                        .increment(1);
                        self.db
                            .notification_failed(row.id, attempts, next.as_nanos(), &error)
                            .await?;
                    }
                }
            }
            for (alert_id, event) in delivered {
                let rows = self.db.notifications_of(alert_id).await?;
                let all_sent = rows
                    .iter()
                    .filter(|r| r.event == event)
                    .all(|r| r.status == "sent");
                if all_sent {
                    let _ = self
                        .commands
                        .send(Command::Delivered { alert_id, event })
                        .await;
                }
            }
            // What failed is due later; another round takes what did not fit in this batch.
            let _ = failed_any;
        }
    }

    /// Re-posts the firing alerts to Alertmanager, which forgets those it stops hearing of.
    async fn resend_firing(&self) {
        let Some(url) = self.channels.channels.iter().find_map(|(_, c)| match c {
            Channel::Alertmanager(url) => Some(url.clone()),
            _ => None,
        }) else {
            return;
        };
        let Ok(docs) = self.db.open_alerts().await else {
            return;
        };
        let alerts: Vec<Value> = docs
            .iter()
            .filter_map(|d| serde_json::from_str::<AlertRecord>(d).ok())
            .filter(|a| {
                matches!(
                    a.alert.status,
                    AlertStatus::Firing | AlertStatus::Acknowledged
                )
            })
            .map(|a| self.channels.alertmanager_alert(&a, Some(firing_ends_at())))
            .collect();
        if alerts.is_empty() {
            return;
        }
        let url = format!("{url}/api/v2/alerts");
        if let Err(error) = self
            .channels
            .post(&url, &Value::Array(alerts), "resend", None)
            .await
        {
            tracing::warn!(%error, "cannot refresh the firing alerts in Alertmanager");
            metrics::counter!("logging_aggregator_alert_notification_failures_total",
                "channel" => "alertmanager")
            .increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sms_bodies_are_escaped_for_their_format() {
        let (json, kind) = render_sms(
            r#"{"to":"{to}","text":"{message}"}"#,
            "+4912345",
            "a \"b\"\nc",
        );
        assert_eq!(kind, "application/json");
        let parsed: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["text"], "a \"b\"\nc");
        let (form, kind) = render_sms("To={to}&Body={message}", "+4912345", "a&b c");
        assert_eq!(kind, "application/x-www-form-urlencoded");
        assert_eq!(form, "To=%2B4912345&Body=a%26b+c");
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert!(backoff(1) <= Duration::from_secs_f64(1.2));
        assert!(backoff(4) >= Duration::from_secs_f64(6.4));
        assert!(backoff(50) <= Duration::from_secs(360));
        assert!(backoff(50) >= Duration::from_secs(240));
    }
}
