//! The audit trail: an append-only, hash-chained table.
//!
//! Entry *n* stores `hash_n = SHA-256(canonical(entry_n) ‖ hash_{n-1})`, where the canonical
//! form is a JSON array of the stored column texts in a fixed order. Verification recomputes
//! the chain from the stored texts, so it never depends on how JSON is re-serialised, and any
//! change to any stored field, or a removed or reordered entry, is found at its position.
//!
//! With encryption at rest, `old_values`, `new_values` and `metadata` are stored as sealed
//! text (`crypto::Keyring::seal_text`, base64); the chain covers the stored texts, so it verifies without the key.
//!
//! Appends take the chain head (`audit_chain`, one row) inside the transaction that inserts
//! the entry: its row lock orders appends across aggregator replicas sharing PostgreSQL.

use logging_common::crypto::{self, Keyring};
use logging_common::validate::AuditEvent;
use logging_common::{AuditEntry, Timestamp};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row, SqlSafeStr};
use uuid::Uuid;

use super::{Database, DbError};
use crate::auth::Caller;

const COLUMNS: &str = "seq, id, timestamp_ns, actor, action, entity_type, entity_id, old_values, \
     new_values, metadata, ip_address, user_agent, trace_id, created_at_ns, prev_hash, hash";

/// SQL built from this module's constant column list and numbered placeholders only; values
/// are always bound, never formatted in.
fn sql(text: String) -> sqlx::SqlStr {
    sqlx::AssertSqlSafe(text).into_sql_str()
}

/// The chain's first `prev_hash`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An audit row as stored: the texts the hash covers.
struct StoredAudit {
    seq: i64,
    id: String,
    timestamp_ns: i64,
    actor: String,
    action: String,
    entity_type: String,
    entity_id: String,
    old_values: Option<String>,
    new_values: Option<String>,
    metadata: String,
    ip_address: Option<String>,
    user_agent: Option<String>,
    trace_id: Option<String>,
    created_at_ns: i64,
    prev_hash: String,
    hash: String,
}

impl StoredAudit {
    fn from_row(row: &AnyRow) -> Result<StoredAudit, sqlx::Error> {
        Ok(StoredAudit {
            seq: row.try_get("seq")?,
            id: row.try_get("id")?,
            timestamp_ns: row.try_get("timestamp_ns")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            entity_type: row.try_get("entity_type")?,
            entity_id: row.try_get("entity_id")?,
            old_values: row.try_get("old_values")?,
            new_values: row.try_get("new_values")?,
            metadata: row.try_get("metadata")?,
            ip_address: row.try_get("ip_address")?,
            user_agent: row.try_get("user_agent")?,
            trace_id: row.try_get("trace_id")?,
            created_at_ns: row.try_get("created_at_ns")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
        })
    }

    /// SHA-256 over the canonical form of every field but `hash`, chained to `prev_hash`.
    fn compute_hash(&self) -> String {
        let canonical = serde_json::json!([
            self.seq,
            self.id,
            self.timestamp_ns,
            self.actor,
            self.action,
            self.entity_type,
            self.entity_id,
            self.old_values,
            self.new_values,
            self.metadata,
            self.ip_address,
            self.user_agent,
            self.trace_id,
            self.created_at_ns,
        ]);
        let mut hasher = Sha256::new();
        hasher.update(canonical.to_string().as_bytes());
        hasher.update(b"\n");
        hasher.update(self.prev_hash.as_bytes());
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn to_entry(&self, keyring: Option<&Keyring>) -> Result<AuditEntry, DbError> {
        let object = |text: &str| -> Result<Map<String, Value>, DbError> {
            let text = open_text(keyring, text)
                .map_err(|e| DbError::Corrupt(format!("audit {}: {e}", self.seq)))?;
            serde_json::from_str(&text)
                .map_err(|e| DbError::Corrupt(format!("audit {}: {e}", self.seq)))
        };
        Ok(AuditEntry {
            id: Uuid::parse_str(&self.id).map_err(|e| DbError::Corrupt(e.to_string()))?,
            timestamp: Timestamp::from_nanos(self.timestamp_ns),
            actor: object(&self.actor)?,
            action: self.action.clone(),
            entity_type: self.entity_type.clone(),
            entity_id: self.entity_id.clone(),
            old_values: self.old_values.as_deref().map(object).transpose()?,
            new_values: self.new_values.as_deref().map(object).transpose()?,
            metadata: object(&self.metadata)?,
            ip_address: self.ip_address.clone(),
            user_agent: self.user_agent.clone(),
            trace_id: self.trace_id.clone(),
            created_at: Timestamp::from_nanos(self.created_at_ns),
            sequence: self.seq,
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
        })
    }
}

/// `text` sealed when there is a keyring. The chain hashes the stored text, so verifying it
/// needs no key.
fn seal_text(keyring: Option<&Keyring>, text: String) -> String {
    match keyring {
        Some(keyring) => keyring.seal_text(text.as_bytes()),
        None => text,
    }
}

/// The plaintext of a stored column text.
fn open_text<'a>(
    keyring: Option<&Keyring>,
    text: &'a str,
) -> Result<std::borrow::Cow<'a, str>, String> {
    match crypto::open_text(keyring, text.as_bytes())? {
        std::borrow::Cow::Borrowed(_) => Ok(std::borrow::Cow::Borrowed(text)),
        std::borrow::Cow::Owned(plain) => String::from_utf8(plain)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| e.to_string()),
    }
}

/// The actor's identifier used by the `actor` filter: its `id`, `user_id`, `name`, `email`
/// or `service`, whichever comes first.
fn actor_id(actor: &Map<String, Value>) -> Option<String> {
    ["id", "user_id", "name", "email", "service", "token_id"]
        .iter()
        .find_map(|k| match actor.get(*k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
}

/// The actor recorded when an operator deletes a log entry.
pub fn deletion_actor(caller: &Caller) -> Map<String, Value> {
    let mut actor = Map::new();
    actor.insert("type".into(), "api_token".into());
    actor.insert("role".into(), caller.role.as_str().into());
    actor.insert("token_id".into(), caller.token_id.clone().into());
    actor
}

/// Filters of `GET /api/audit`.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub trace_id: Option<String>,
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
    /// Entries after this sequence number in the listing order.
    pub after_seq: Option<i64>,
    pub ascending: bool,
    pub limit: usize,
}

pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// The sequence number to continue after, if there are more.
    pub next_seq: Option<i64>,
}

/// The result of checking the chain.
#[derive(Debug, serde::Serialize)]
pub struct ChainReport {
    pub valid: bool,
    pub entries_checked: u64,
    pub head_hash: String,
    /// The first entry whose stored hash or link does not match, if any.
    pub first_invalid_sequence: Option<i64>,
    pub reason: Option<String>,
}

impl Database {
    /// Appends an audit event, or returns the existing entry if one with the same id exists
    /// (`false` then), so a client can retry safely.
    pub async fn record_audit(&self, event: AuditEvent) -> Result<(AuditEntry, bool), DbError> {
        let _serial = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let result = append(&mut tx, event, self.keyring.as_deref()).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// Soft-deletes a log entry and records who did it, in one transaction.
    pub async fn delete_log_entry(
        &self,
        id: Uuid,
        day: i64,
        caller: &Caller,
        event: AuditEvent,
    ) -> Result<AuditEntry, DbError> {
        let _serial = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO log_deletions (id, partition_day, deleted_at_ns, deleted_by) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id.to_string())
        .bind(day)
        .bind(Timestamp::now().as_nanos())
        .bind(caller.token_id.clone())
        .execute(&mut *tx)
        .await?;
        let (entry, _) = append(&mut tx, event, self.keyring.as_deref()).await?;
        tx.commit().await?;
        Ok(entry)
    }

    pub async fn audit_entry(&self, id: Uuid) -> Result<Option<AuditEntry>, DbError> {
        let row = sqlx::query(sql(format!(
            "SELECT {COLUMNS} FROM audit_entries WHERE id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| StoredAudit::from_row(&r)?.to_entry(self.keyring.as_deref()))
            .transpose()
    }

    pub async fn audit_entries(&self, filter: &AuditFilter) -> Result<AuditPage, DbError> {
        let mut sql = format!("SELECT {COLUMNS} FROM audit_entries WHERE 1 = 1");
        let mut texts: Vec<String> = Vec::new();
        let mut numbers: Vec<i64> = Vec::new();
        // Texts bind first, then numbers, so placeholders are numbered in bind order.
        for (column, value) in [
            ("actor_id", &filter.actor),
            ("action", &filter.action),
            ("entity_type", &filter.entity_type),
            ("entity_id", &filter.entity_id),
            ("trace_id", &filter.trace_id),
        ] {
            if let Some(value) = value {
                texts.push(value.clone());
                sql.push_str(&format!(" AND {column} = ${}", texts.len()));
            }
        }
        let mut n = texts.len();
        let mut number_clause = |sql: &mut String, clause: &str, value: i64| {
            n += 1;
            numbers.push(value);
            sql.push_str(&clause.replace("$?", &format!("${n}")));
        };
        if let Some(start) = filter.start {
            number_clause(&mut sql, " AND timestamp_ns >= $?", start.as_nanos());
        }
        if let Some(end) = filter.end {
            number_clause(&mut sql, " AND timestamp_ns < $?", end.as_nanos());
        }
        if let Some(after) = filter.after_seq {
            let clause = if filter.ascending {
                " AND seq > $?"
            } else {
                " AND seq < $?"
            };
            number_clause(&mut sql, clause, after);
        }
        let limit = filter.limit.max(1);
        sql.push_str(if filter.ascending {
            " ORDER BY seq ASC"
        } else {
            " ORDER BY seq DESC"
        });
        sql.push_str(&format!(" LIMIT {}", limit + 1));
        let mut query = sqlx::query(self::sql(sql));
        for text in texts {
            query = query.bind(text);
        }
        for number in numbers {
            query = query.bind(number);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut entries = rows
            .iter()
            .map(|r| StoredAudit::from_row(r)?.to_entry(self.keyring.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        let next_seq = (entries.len() > limit).then(|| entries[limit - 1].sequence);
        entries.truncate(limit);
        Ok(AuditPage { entries, next_seq })
    }

    /// Recomputes the whole chain from the stored rows.
    pub async fn verify_audit_chain(&self) -> Result<ChainReport, DbError> {
        let mut prev = GENESIS.to_string();
        let mut expected_seq = 1i64;
        let mut checked = 0u64;
        let mut after = 0i64;
        let fail = |seq: i64, checked: u64, prev: &str, reason: &str| ChainReport {
            valid: false,
            entries_checked: checked,
            head_hash: prev.to_string(),
            first_invalid_sequence: Some(seq),
            reason: Some(reason.to_string()),
        };
        loop {
            let rows = sqlx::query(sql(format!(
                "SELECT {COLUMNS} FROM audit_entries WHERE seq > $1 ORDER BY seq ASC LIMIT 1000"
            )))
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let stored = StoredAudit::from_row(row)?;
                if stored.seq != expected_seq {
                    return Ok(fail(expected_seq, checked, &prev, "an entry is missing"));
                }
                if stored.prev_hash != prev {
                    return Ok(fail(
                        stored.seq,
                        checked,
                        &prev,
                        "prev_hash does not link to the entry before",
                    ));
                }
                if stored.compute_hash() != stored.hash {
                    return Ok(fail(
                        stored.seq,
                        checked,
                        &prev,
                        "the stored fields do not match the hash",
                    ));
                }
                prev = stored.hash.clone();
                after = stored.seq;
                expected_seq += 1;
                checked += 1;
            }
        }
        let head: (i64, String) = {
            let row = sqlx::query("SELECT seq, hash FROM audit_chain WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
            (row.try_get("seq")?, row.try_get("hash")?)
        };
        if head.0 != after || head.1 != prev {
            return Ok(fail(
                after + 1,
                checked,
                &prev,
                "entries at the end of the chain are missing",
            ));
        }
        Ok(ChainReport {
            valid: true,
            entries_checked: checked,
            head_hash: prev,
            first_invalid_sequence: None,
            reason: None,
        })
    }
}

/// Appends one entry inside the caller's transaction.
async fn append(
    conn: &mut AnyConnection,
    event: AuditEvent,
    keyring: Option<&Keyring>,
) -> Result<(AuditEntry, bool), DbError> {
    let id = event
        .id
        .unwrap_or_else(|| logging_common::id::new_log_id(Timestamp::now()));
    let existing = sqlx::query(sql(format!(
        "SELECT {COLUMNS} FROM audit_entries WHERE id = $1"
    )))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = existing {
        return Ok((StoredAudit::from_row(&row)?.to_entry(keyring)?, false));
    }
    // Taking the head row first locks it until commit.
    let head = sqlx::query("UPDATE audit_chain SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
        .fetch_one(&mut *conn)
        .await?;
    let seq: i64 = head.try_get("seq")?;
    let prev_hash: String = head.try_get("hash")?;
    let now = Timestamp::now();
    let to_text = |m: &Map<String, Value>| serde_json::to_string(m).unwrap_or_else(|_| "{}".into());
    let mut stored = StoredAudit {
        seq,
        id: id.to_string(),
        timestamp_ns: event.timestamp.unwrap_or(now).as_nanos(),
        actor: to_text(&event.actor),
        action: event.action,
        entity_type: event.entity_type,
        entity_id: event.entity_id,
        old_values: event
            .old_values
            .as_ref()
            .map(|v| seal_text(keyring, to_text(v))),
        new_values: event
            .new_values
            .as_ref()
            .map(|v| seal_text(keyring, to_text(v))),
        metadata: seal_text(keyring, to_text(&event.metadata)),
        ip_address: event.ip_address,
        user_agent: event.user_agent,
        trace_id: event.trace_id,
        created_at_ns: now.as_nanos(),
        prev_hash,
        hash: String::new(),
    };
    stored.hash = stored.compute_hash();
    sqlx::query(sql(format!(
        "INSERT INTO audit_entries ({COLUMNS}, actor_id) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    )))
    .bind(stored.seq)
    .bind(stored.id.clone())
    .bind(stored.timestamp_ns)
    .bind(stored.actor.clone())
    .bind(stored.action.clone())
    .bind(stored.entity_type.clone())
    .bind(stored.entity_id.clone())
    .bind(stored.old_values.clone())
    .bind(stored.new_values.clone())
    .bind(stored.metadata.clone())
    .bind(stored.ip_address.clone())
    .bind(stored.user_agent.clone())
    .bind(stored.trace_id.clone())
    .bind(stored.created_at_ns)
    .bind(stored.prev_hash.clone())
    .bind(stored.hash.clone())
    .bind(actor_id(&event.actor))
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_chain SET hash = $1 WHERE id = 1")
        .bind(stored.hash.clone())
        .execute(&mut *conn)
        .await?;
    Ok((stored.to_entry(keyring)?, true))
}
