//! Alert rules, alerts (current and history) and the notification outbox.
//!
//! An alert's state change and the notifications it causes are written in one transaction, so
//! after a crash either both exist or neither: a notification is never lost between the two,
//! and one already sent is never sent again.

use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use super::{Database, DbError};

/// A rule as stored.
#[derive(Clone, Debug)]
pub struct StoredRule {
    pub id: Uuid,
    pub name: String,
    pub source: String,
    /// The rule's JSON.
    pub spec: String,
    pub created_at_ns: i64,
    pub updated_at_ns: i64,
}

/// An alert as stored: the columns reads filter on, and the whole record as JSON.
#[derive(Clone, Debug)]
pub struct AlertRow {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub group_key: String,
    pub rule_name: String,
    pub status: String,
    pub severity: String,
    pub created_at_ns: i64,
    pub updated_at_ns: i64,
    pub resolved_at_ns: Option<i64>,
    pub doc: String,
}

/// A notification to send.
#[derive(Clone, Debug)]
pub struct NewNotification {
    pub id: Uuid,
    pub alert_id: Uuid,
    pub event: String,
    pub channel: String,
    pub payload: String,
    pub created_at_ns: i64,
}

/// A notification and how its delivery went.
#[derive(Clone, Debug)]
pub struct NotificationRow {
    pub id: Uuid,
    pub alert_id: Uuid,
    pub event: String,
    pub channel: String,
    /// `pending` (not yet accepted) or `sent`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_ns: i64,
    pub last_error: Option<String>,
    pub created_at_ns: i64,
    pub sent_at_ns: Option<i64>,
    pub payload: String,
}

/// Filters of `GET /api/alerts`; newest first.
#[derive(Clone, Debug, Default)]
pub struct AlertFilter {
    pub statuses: Vec<String>,
    pub severity: Option<String>,
    pub rule: Option<String>,
    /// Continue after this (created_at_ns, id).
    pub after: Option<(i64, String)>,
    pub limit: usize,
}

pub struct AlertPage {
    pub docs: Vec<String>,
    pub next: Option<(i64, String)>,
}

fn uuid(row: &AnyRow, column: &str) -> Result<Uuid, DbError> {
    let text: String = row.try_get(column)?;
    Uuid::parse_str(&text).map_err(|e| DbError::Corrupt(format!("{column}: {e}")))
}

fn rule_from(row: &AnyRow) -> Result<StoredRule, DbError> {
    Ok(StoredRule {
        id: uuid(row, "id")?,
        name: row.try_get("name")?,
        source: row.try_get("source")?,
        spec: row.try_get("spec")?,
        created_at_ns: row.try_get("created_at_ns")?,
        updated_at_ns: row.try_get("updated_at_ns")?,
    })
}

fn notification_from(row: &AnyRow) -> Result<NotificationRow, DbError> {
    Ok(NotificationRow {
        id: uuid(row, "id")?,
        alert_id: uuid(row, "alert_id")?,
        event: row.try_get("event")?,
        channel: row.try_get("channel")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_ns: row.try_get("next_attempt_ns")?,
        last_error: row.try_get("last_error")?,
        created_at_ns: row.try_get("created_at_ns")?,
        sent_at_ns: row.try_get("sent_at_ns")?,
        payload: row.try_get("payload")?,
    })
}

const NOTIFICATION_COLUMNS: &str = "id, alert_id, event, channel, status, attempts, \
     next_attempt_ns, last_error, created_at_ns, sent_at_ns, payload";

fn sql(text: String) -> sqlx::SqlStr {
    use sqlx::SqlSafeStr;
    // Built from this module's constant column lists and numbered placeholders only.
    sqlx::AssertSqlSafe(text).into_sql_str()
}

/// Whether an error is a broken unique constraint (a rule name taken).
pub fn is_unique_violation(error: &DbError) -> bool {
    matches!(error, DbError::Sqlx(sqlx::Error::Database(e)) if e.is_unique_violation())
}

impl Database {
    pub async fn alert_rules(&self) -> Result<Vec<StoredRule>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, source, spec, created_at_ns, updated_at_ns FROM alert_rules \
             ORDER BY created_at_ns, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from).collect()
    }

    /// Adds a rule; a name already taken is a unique violation ([`is_unique_violation`]).
    pub async fn insert_alert_rule(&self, rule: &StoredRule) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO alert_rules (id, name, source, spec, created_at_ns, updated_at_ns) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(rule.id.to_string())
        .bind(rule.name.clone())
        .bind(rule.source.clone())
        .bind(rule.spec.clone())
        .bind(rule.created_at_ns)
        .bind(rule.updated_at_ns)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a rule; false if there is none with its id.
    pub async fn update_alert_rule(&self, rule: &StoredRule) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE alert_rules SET name = $2, source = $3, spec = $4, updated_at_ns = $5 \
             WHERE id = $1",
        )
        .bind(rule.id.to_string())
        .bind(rule.name.clone())
        .bind(rule.source.clone())
        .bind(rule.spec.clone())
        .bind(rule.updated_at_ns)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn delete_alert_rule(&self, id: Uuid) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM alert_rules WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Writes an alert (new or changed) and the notifications it causes, in one transaction.
    pub async fn save_alert(
        &self,
        alert: &AlertRow,
        notifications: &[NewNotification],
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE alerts SET status = $2, severity = $3, updated_at_ns = $4, \
             resolved_at_ns = $5, doc = $6 WHERE id = $1",
        )
        .bind(alert.id.to_string())
        .bind(alert.status.clone())
        .bind(alert.severity.clone())
        .bind(alert.updated_at_ns)
        .bind(alert.resolved_at_ns)
        .bind(alert.doc.clone())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO alerts (id, rule_id, group_key, rule_name, status, severity, \
                 created_at_ns, updated_at_ns, resolved_at_ns, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(alert.id.to_string())
            .bind(alert.rule_id.to_string())
            .bind(alert.group_key.clone())
            .bind(alert.rule_name.clone())
            .bind(alert.status.clone())
            .bind(alert.severity.clone())
            .bind(alert.created_at_ns)
            .bind(alert.updated_at_ns)
            .bind(alert.resolved_at_ns)
            .bind(alert.doc.clone())
            .execute(&mut *tx)
            .await?;
        }
        for n in notifications {
            sqlx::query(sql(format!(
                "INSERT INTO alert_notifications ({NOTIFICATION_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, 'pending', 0, $5, NULL, $5, NULL, $6)"
            )))
            .bind(n.id.to_string())
            .bind(n.alert_id.to_string())
            .bind(n.event.clone())
            .bind(n.channel.clone())
            .bind(n.created_at_ns)
            .bind(n.payload.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets an alert that never fired (its condition cleared while pending).
    pub async fn delete_pending_alert(&self, id: Uuid) -> Result<(), DbError> {
        sqlx::query("DELETE FROM alerts WHERE id = $1 AND status = 'pending'")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The alerts that are not resolved.
    pub async fn open_alerts(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT doc FROM alerts WHERE status <> 'resolved'")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("doc").map_err(DbError::from))
            .collect()
    }

    /// When each (rule, group) last resolved, for the cooldown.
    pub async fn last_resolutions(&self) -> Result<Vec<(Uuid, String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT rule_id, group_key, MAX(resolved_at_ns) AS at FROM alerts \
             WHERE resolved_at_ns IS NOT NULL GROUP BY rule_id, group_key",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    uuid(r, "rule_id")?,
                    r.try_get("group_key")?,
                    r.try_get("at")?,
                ))
            })
            .collect()
    }

    pub async fn alert_doc(&self, id: Uuid) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT doc FROM alerts WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("doc").map_err(DbError::from))
            .transpose()
    }

    pub async fn list_alerts(&self, filter: &AlertFilter) -> Result<AlertPage, DbError> {
        let mut conditions = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        if !filter.statuses.is_empty() {
            let mut places = Vec::new();
            for status in &filter.statuses {
                binds.push(status.clone());
                places.push(format!("${}", binds.len()));
            }
            conditions.push(format!("status IN ({})", places.join(", ")));
        }
        if let Some(severity) = &filter.severity {
            binds.push(severity.clone());
            conditions.push(format!("severity = ${}", binds.len()));
        }
        if let Some(rule) = &filter.rule {
            binds.push(rule.clone());
            let name = binds.len();
            binds.push(rule.clone());
            conditions.push(format!(
                "(rule_name = ${name} OR rule_id = ${})",
                binds.len()
            ));
        }
        let mut after_ns = None;
        if let Some((created, id)) = &filter.after {
            after_ns = Some(*created);
            binds.push(id.clone());
            conditions.push(format!(
                "(created_at_ns < ${0} OR (created_at_ns = ${0} AND id < ${1}))",
                binds.len() + 1,
                binds.len()
            ));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let text = format!(
            "SELECT id, created_at_ns, doc FROM alerts {clause} \
             ORDER BY created_at_ns DESC, id DESC LIMIT {}",
            filter.limit + 1
        );
        let mut query = sqlx::query(sql(text));
        for value in binds {
            query = query.bind(value);
        }
        if let Some(ns) = after_ns {
            query = query.bind(ns);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut docs = Vec::new();
        let mut next = None;
        for (i, row) in rows.iter().enumerate() {
            if i == filter.limit {
                break;
            }
            docs.push(row.try_get("doc")?);
            if i + 1 == filter.limit && rows.len() > filter.limit {
                next = Some((row.try_get("created_at_ns")?, row.try_get("id")?));
            }
        }
        Ok(AlertPage { docs, next })
    }

    /// Notifications due for a (first or next) attempt.
    pub async fn due_notifications(
        &self,
        now_ns: i64,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, DbError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {NOTIFICATION_COLUMNS} FROM alert_notifications \
             WHERE status = 'pending' AND next_attempt_ns <= $1 \
             ORDER BY next_attempt_ns, created_at_ns LIMIT $2"
        )))
        .bind(now_ns)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(notification_from).collect()
    }

    /// When the next pending notification is due, if any is.
    pub async fn next_notification_due(&self) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "SELECT MIN(next_attempt_ns) AS due FROM alert_notifications WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("due")?)
    }

    pub async fn notification_sent(
        &self,
        id: Uuid,
        attempts: i64,
        now_ns: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE alert_notifications SET status = 'sent', attempts = $2, sent_at_ns = $3, \
             last_error = NULL WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(attempts)
        .bind(now_ns)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn notification_failed(
        &self,
        id: Uuid,
        attempts: i64,
        next_attempt_ns: i64,
        error: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE alert_notifications SET attempts = $2, next_attempt_ns = $3, last_error = $4 \
             WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(attempts)
        .bind(next_attempt_ns)
        .bind(error.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn notifications_of(&self, alert_id: Uuid) -> Result<Vec<NotificationRow>, DbError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {NOTIFICATION_COLUMNS} FROM alert_notifications WHERE alert_id = $1 \
             ORDER BY created_at_ns, channel"
        )))
        .bind(alert_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(notification_from).collect()
    }
}
