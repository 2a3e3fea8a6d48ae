//! The alert lifecycle, and the only writer of alerts: takes the evaluator's readings and
//! the operators' acknowledgements and resolutions, and moves each alert along
//!
//! ```text
//! (condition holds) ─► pending ─(held for `for`)─► firing ─(ack)─► acknowledged
//!        ▲                 │ (cleared: forgotten)     │ (cleared, resolve, rule gone)
//!        └── after ALERT_COOLDOWN ◄──── resolved ◄────┘
//! ```
//!
//! A transition and the notifications it causes are written in one transaction before
//! anything is sent. On start the open alerts and the last resolutions are read back, so a
//! restart in the middle of a firing alert neither fires it again nor forgets it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use logging_common::{Alert, AlertSeverity, AlertStatus, Timestamp};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::Instrument;
use uuid::Uuid;

use super::evaluator::{Evaluation, ForgetList, GroupResult};
use super::rules::{Rule, RuleKind};
use super::{AlertRecord, Resolution, RuleRegistry};
use crate::db::{AlertRow, Database, DbError, NewNotification};

pub const FIRED: &str = "alert.fired";
pub const RESOLVED: &str = "alert.resolved";

/// What the API and the dispatcher ask of the manager.
pub enum Command {
    Acknowledge {
        id: Uuid,
        by: String,
        reply: oneshot::Sender<Result<AlertRecord, CommandError>>,
    },
    Resolve {
        id: Uuid,
        by: String,
        reply: oneshot::Sender<Result<AlertRecord, CommandError>>,
    },
    /// Every channel accepted the notification of `event` for this alert.
    Delivered { alert_id: Uuid, event: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no alert with id {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Conflict(String),
    #[error("the relational store failed: {0}")]
    Db(#[from] DbError),
}

type Key = (Uuid, String);

pub struct Manager {
    db: Arc<Database>,
    registry: Arc<RuleRegistry>,
    open: HashMap<Key, AlertRecord>,
    last_resolved: HashMap<Key, i64>,
    cooldown_ns: i64,
    channels: Vec<String>,
    wake_dispatcher: Arc<Notify>,
    forget: ForgetList,
    gauges: HashSet<(String, &'static str)>,
    round: Round,
    /// The current round's span, once it changed something; and its transitions so far.
    round_span: Option<(tracing::Span, usize)>,
}

fn severity_name(severity: AlertSeverity) -> &'static str {
    match severity {
        AlertSeverity::Info => "info",
        AlertSeverity::Warning => "warning",
        AlertSeverity::Critical => "critical",
    }
}

fn status_name(status: AlertStatus) -> &'static str {
    match status {
        AlertStatus::Pending => "pending",
        AlertStatus::Firing => "firing",
        AlertStatus::Acknowledged => "acknowledged",
        AlertStatus::Resolved => "resolved",
    }
}

/// The row an alert is stored as.
pub fn row_of(record: &AlertRecord) -> AlertRow {
    AlertRow {
        id: record.alert.id,
        rule_id: record.rule_id,
        group_key: record.group_key.clone(),
        rule_name: record.rule.clone(),
        status: status_name(record.alert.status).into(),
        severity: severity_name(record.alert.severity).into(),
        created_at_ns: record.alert.created_at.as_nanos(),
        updated_at_ns: record.alert.updated_at.as_nanos(),
        resolved_at_ns: record.alert.resolved_at.map(Timestamp::as_nanos),
        doc: serde_json::to_string(record).unwrap_or_default(),
    }
}

/// `1234.5` → `1234.5`, `0.0612` → `6.12%` for rates.
pub fn format_value(rule_kind: RuleKind, value: f64) -> String {
    match rule_kind {
        RuleKind::ErrorRate => format!("{:.2}%", value * 100.0),
        RuleKind::Absence => format!("silent for {value:.0}s"),
        _ if value.fract() == 0.0 && value.abs() < 1e15 => format!("{value:.0}"),
        _ => format!("{value:.2}"),
    }
}

fn new_record(rule: &Rule, group: &GroupResult, now: Timestamp) -> AlertRecord {
    let spec = &rule.spec;
    let group_text = group
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut annotations = spec.annotations.clone();
    annotations.entry("summary".into()).or_insert_with(|| {
        let of = if group_text.is_empty() {
            String::new()
        } else {
            format!(" ({group_text})")
        };
        format!("{}{of}: {}", spec.name, spec.condition())
    });
    let mut labels = group.labels.clone();
    for (k, v) in &spec.labels {
        labels.insert(k.clone(), v.clone());
    }
    let threshold = match spec.kind {
        RuleKind::Absence => spec.window.0 as f64,
        _ => spec.threshold,
    };
    AlertRecord {
        alert: Alert {
            id: Uuid::now_v7(),
            name: spec.name.clone(),
            description: if spec.description.is_empty() {
                spec.condition()
            } else {
                spec.description.clone()
            },
            severity: spec.severity,
            status: AlertStatus::Pending,
            condition: spec.condition(),
            threshold,
            current_value: group.value,
            triggered_at: None,
            resolved_at: None,
            notification_sent: false,
            created_at: now,
            updated_at: now,
        },
        rule_id: rule.id,
        rule: spec.name.clone(),
        group: group.labels.clone(),
        labels,
        annotations,
        pending_since: now,
        acknowledged_at: None,
        acknowledged_by: None,
        resolution: None,
        resolved_by: None,
        evaluated_at: now,
        group_key: group.key.clone(),
        trace_id: None,
        span_id: None,
    }
}

/// What a round of changes to alerts is, for its trace span; the span is made only once the
/// round changes something, so quiet evaluation rounds leave no trace.
#[derive(Clone, Copy)]
enum Round {
    Evaluation { rules: usize },
    Command(&'static str),
}

impl Manager {
    /// Reads the open alerts and the last resolutions back from the store.
    pub async fn load(
        db: Arc<Database>,
        registry: Arc<RuleRegistry>,
        cooldown_seconds: u64,
        channels: Vec<String>,
        wake_dispatcher: Arc<Notify>,
        forget: ForgetList,
    ) -> Result<Manager, DbError> {
        let mut open = HashMap::new();
        for doc in db.open_alerts().await? {
            match serde_json::from_str::<AlertRecord>(&doc) {
                Ok(record) => {
                    open.insert((record.rule_id, record.group_key.clone()), record);
                }
                Err(error) => tracing::error!(%error, "an unreadable alert is ignored"),
            }
        }
        let last_resolved = db
            .last_resolutions()
            .await?
            .into_iter()
            .map(|(rule, group, at)| ((rule, group), at))
            .collect();
        let mut manager = Manager {
            db,
            registry,
            open,
            last_resolved,
            cooldown_ns: i64::try_from(cooldown_seconds)
                .unwrap_or(i64::MAX / 1_000_000_000)
                .saturating_mul(1_000_000_000),
            channels,
            wake_dispatcher,
            forget,
            gauges: HashSet::new(),
            round: Round::Command("start"),
            round_span: None,
        };
        manager.update_gauges();
        Ok(manager)
    }

    pub async fn run(
        mut self,
        mut evaluations: mpsc::Receiver<Evaluation>,
        mut commands: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                evaluation = evaluations.recv() => match evaluation {
                    Some(evaluation) => self.apply(evaluation).await,
                    None => return,
                },
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                // (The wait's output, a watch guard, must not live across the other arms.)
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }

    /// The span of the current round, made at its first change.
    fn round_span(&mut self) -> tracing::Span {
        let round = self.round;
        let (span, transitions) = self.round_span.get_or_insert_with(|| {
            let span = match round {
                Round::Evaluation { rules } => tracing::debug_span!(
                    parent: None,
                    "alert evaluation",
                    alert.rules = rules,
                    alert.transitions = tracing::field::Empty,
                ),
                Round::Command(command) => tracing::debug_span!(
                    parent: None,
                    "alert command",
                    command,
                    alert.transitions = tracing::field::Empty,
                ),
            };
            (span, 0)
        });
        *transitions += 1;
        span.record("alert.transitions", *transitions);
        span.clone()
    }

    /// Starts a round of changes of the kind `round`.
    fn begin_round(&mut self, round: Round) {
        self.round = round;
        self.round_span = None;
    }

    /// Writes an alert and the notifications of `event` (none when `event` is `None`); a
    /// notified transition records its trace on the alert, which the notifications carry.
    async fn save(&mut self, record: &mut AlertRecord, event: Option<&str>) -> Result<(), DbError> {
        let round = self.round_span();
        let transition = tracing::debug_span!(
            parent: &round,
            "alert transition",
            alert.id = %record.alert.id,
            alert.rule = %record.rule,
            alert.status = status_name(record.alert.status),
            alert.value = record.alert.current_value,
            event = event.unwrap_or("update"),
            notifications = if event.is_some() { self.channels.len() } else { 0 },
        );
        if event.is_some() {
            let ids = logging_common::telemetry::sampled_ids(&transition);
            record.trace_id = ids.as_ref().map(|(trace, _)| trace.clone());
            record.span_id = ids.map(|(_, span)| span);
        }
        let record = &*record;
        let payload = serde_json::to_string(record).unwrap_or_default();
        let notifications: Vec<NewNotification> = match event {
            Some(event) => self
                .channels
                .iter()
                .map(|channel| NewNotification {
                    id: Uuid::now_v7(),
                    alert_id: record.alert.id,
                    event: event.to_string(),
                    channel: channel.clone(),
                    payload: payload.clone(),
                    created_at_ns: record.alert.updated_at.as_nanos(),
                })
                .collect(),
            None => Vec::new(),
        };
        self.db
            .save_alert(&row_of(record), &notifications)
            .instrument(transition)
            .await?;
        if !notifications.is_empty() {
            self.wake_dispatcher.notify_one();
        }
        Ok(())
    }

    fn fire(record: &mut AlertRecord, now: Timestamp) {
        record.alert.status = AlertStatus::Firing;
        record.alert.triggered_at = Some(now);
        record.alert.updated_at = now;
        metrics::counter!("logging_aggregator_alerts_fired_total",
            "rule" => record.rule.clone(), "severity" => severity_name(record.alert.severity))
        .increment(1);
        tracing::warn!(alert = %record.alert.id, rule = %record.rule, group = ?record.group,
            value = record.alert.current_value, "alert firing");
    }

    async fn resolve(
        &mut self,
        key: &Key,
        now: Timestamp,
        resolution: Resolution,
        by: Option<String>,
    ) -> Result<Option<AlertRecord>, DbError> {
        let Some(mut record) = self.open.remove(key) else {
            return Ok(None);
        };
        if record.alert.status == AlertStatus::Pending {
            // It never fired: nobody was told, nothing to resolve.
            self.db.delete_pending_alert(record.alert.id).await?;
            return Ok(None);
        }
        record.alert.status = AlertStatus::Resolved;
        record.alert.resolved_at = Some(now);
        record.alert.updated_at = now;
        record.resolution = Some(resolution);
        record.resolved_by = by;
        if let Err(error) = self.save(&mut record, Some(RESOLVED)).await {
            self.open.insert(key.clone(), record);
            return Err(error);
        }
        self.last_resolved.insert(key.clone(), now.as_nanos());
        tracing::info!(alert = %record.alert.id, rule = %record.rule, ?resolution, "alert resolved");
        Ok(Some(record))
    }

    /// One round of readings.
    pub async fn apply(&mut self, evaluation: Evaluation) {
        let now = evaluation.at;
        self.begin_round(Round::Evaluation {
            rules: evaluation.rules.len(),
        });
        metrics::counter!("logging_aggregator_alert_evaluations_total").increment(1);
        let mut seen: HashSet<Key> = HashSet::new();
        let mut evaluated: HashSet<Uuid> = HashSet::new();
        for result in &evaluation.rules {
            let rule = &result.rule;
            evaluated.insert(rule.id);
            for group in &result.groups {
                let key = (rule.id, group.key.clone());
                seen.insert(key.clone());
                if let Err(error) = self.reading(rule, group, key, now).await {
                    tracing::error!(%error, rule = %rule.spec.name, "cannot record an alert");
                }
            }
        }
        // Open alerts without a reading: their group is gone (nothing in the window any
        // more), or their rule is.
        let orphans: Vec<Key> = self
            .open
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in orphans {
            let resolution = if evaluated.contains(&key.0) {
                if let Some(record) = self.open.get_mut(&key) {
                    record.alert.current_value = 0.0;
                }
                Resolution::Cleared
            } else {
                Resolution::RuleRemoved
            };
            if let Err(error) = self.resolve(&key, now, resolution, None).await {
                tracing::error!(%error, "cannot resolve an alert");
            }
        }
        self.update_gauges();
        // The round's span (if it changed anything) ends here.
        self.round_span = None;
    }

    async fn reading(
        &mut self,
        rule: &Rule,
        group: &GroupResult,
        key: Key,
        now: Timestamp,
    ) -> Result<(), DbError> {
        let for_ns = rule.spec.for_.nanos();
        if !group.holds {
            if let Some(record) = self.open.get_mut(&key) {
                record.alert.current_value = group.value;
                record.evaluated_at = now;
            }
            self.resolve(&key, now, Resolution::Cleared, None).await?;
            return Ok(());
        }
        match self.open.get(&key).cloned() {
            None => {
                let cooling = self
                    .last_resolved
                    .get(&key)
                    .is_some_and(|at| now.as_nanos() - at < self.cooldown_ns);
                if cooling {
                    return Ok(());
                }
                let mut record = new_record(rule, group, now);
                let event = if for_ns == 0 {
                    Self::fire(&mut record, now);
                    Some(FIRED)
                } else {
                    None
                };
                self.save(&mut record, event).await?;
                self.open.insert(key, record);
            }
            Some(mut record) => {
                let changed = record.alert.current_value != group.value;
                record.alert.current_value = group.value;
                record.evaluated_at = now;
                let mut event = None;
                if record.alert.status == AlertStatus::Pending
                    && now.as_nanos() - record.pending_since.as_nanos() >= for_ns
                {
                    Self::fire(&mut record, now);
                    event = Some(FIRED);
                }
                if changed || event.is_some() {
                    record.alert.updated_at = now;
                    self.save(&mut record, event).await?;
                }
                self.open.insert(key, record);
            }
        }
        Ok(())
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Acknowledge { id, by, reply } => {
                self.begin_round(Round::Command("acknowledge"));
                let _ = reply.send(self.acknowledge(id, by).await);
            }
            Command::Resolve { id, by, reply } => {
                self.begin_round(Round::Command("resolve"));
                let _ = reply.send(self.resolve_by_hand(id, by).await);
            }
            Command::Delivered { alert_id, event } => {
                if event == FIRED
                    && let Err(error) = self.mark_delivered(alert_id).await
                {
                    tracing::error!(%error, "cannot record a delivered notification");
                }
            }
        }
        self.round_span = None;
    }

    fn key_of(&self, id: Uuid) -> Option<Key> {
        self.open
            .iter()
            .find(|(_, r)| r.alert.id == id)
            .map(|(k, _)| k.clone())
    }

    async fn closed(&self, id: Uuid) -> CommandError {
        match self.db.alert_doc(id).await {
            Ok(Some(_)) => CommandError::Conflict(format!("alert {id} is already resolved")),
            Ok(None) => CommandError::NotFound(id),
            Err(error) => CommandError::Db(error),
        }
    }

    async fn acknowledge(&mut self, id: Uuid, by: String) -> Result<AlertRecord, CommandError> {
        let Some(key) = self.key_of(id) else {
            return Err(self.closed(id).await);
        };
        let now = Timestamp::now();
        let record = self.open.get_mut(&key).ok_or(CommandError::NotFound(id))?;
        match record.alert.status {
            AlertStatus::Firing => {}
            AlertStatus::Acknowledged => return Ok(record.clone()),
            AlertStatus::Pending => {
                return Err(CommandError::Conflict(format!(
                    "alert {id} is pending (its condition has not held for `for` yet); there is nothing to acknowledge"
                )));
            }
            AlertStatus::Resolved => {
                return Err(CommandError::Conflict(format!(
                    "alert {id} is already resolved"
                )));
            }
        }
        record.alert.status = AlertStatus::Acknowledged;
        record.acknowledged_at = Some(now);
        record.acknowledged_by = Some(by);
        record.alert.updated_at = now;
        let mut record = record.clone();
        self.save(&mut record, None).await?;
        self.update_gauges();
        Ok(record)
    }

    async fn resolve_by_hand(&mut self, id: Uuid, by: String) -> Result<AlertRecord, CommandError> {
        let Some(key) = self.key_of(id) else {
            return Err(self.closed(id).await);
        };
        if self
            .open
            .get(&key)
            .is_some_and(|r| r.alert.status == AlertStatus::Pending)
        {
            return Err(CommandError::Conflict(format!(
                "alert {id} is pending; it resolves by itself when its condition clears"
            )));
        }
        let absence = self
            .registry
            .get(key.0)
            .is_some_and(|r| r.spec.kind == RuleKind::Absence);
        let record = self
            .resolve(&key, Timestamp::now(), Resolution::Manual, Some(by))
            .await?
            .ok_or(CommandError::NotFound(id))?;
        if absence {
            // Start that group's silence over rather than find it silent again at once.
            self.forget.lock().push(key);
        }
        self.update_gauges();
        Ok(record)
    }

    async fn mark_delivered(&mut self, id: Uuid) -> Result<(), DbError> {
        let mut record = match self.key_of(id) {
            Some(key) => match self.open.get(&key) {
                Some(record) => record.clone(),
                None => return Ok(()),
            },
            None => match self.db.alert_doc(id).await? {
                Some(doc) => match serde_json::from_str::<AlertRecord>(&doc) {
                    Ok(record) => record,
                    Err(_) => return Ok(()),
                },
                None => return Ok(()),
            },
        };
        if record.alert.notification_sent {
            return Ok(());
        }
        record.alert.notification_sent = true;
        self.db.save_alert(&row_of(&record), &[]).await?;
        if let Some(key) = self.key_of(id) {
            self.open.insert(key, record);
        }
        Ok(())
    }

    /// `logging_aggregator_alerts_active{rule,severity}`: firing and acknowledged alerts.
    fn update_gauges(&mut self) {
        let mut counts: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for record in self.open.values() {
            if matches!(
                record.alert.status,
                AlertStatus::Firing | AlertStatus::Acknowledged
            ) {
                *counts
                    .entry((record.rule.clone(), severity_name(record.alert.severity)))
                    .or_insert(0) += 1;
            }
        }
        for stale in self.gauges.iter().filter(|k| !counts.contains_key(*k)) {
            metrics::gauge!("logging_aggregator_alerts_active", "rule" => stale.0.clone(), "severity" => stale.1)
                .set(0.0);
        }
        for ((rule, severity), n) in &counts {
            metrics::gauge!("logging_aggregator_alerts_active", "rule" => rule.clone(), "severity" => *severity)
                .set(*n as f64);
        }
        self.gauges = counts.into_keys().collect();
    }
}
