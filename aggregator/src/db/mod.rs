//! The relational store (sqlx): SQLite in the data directory by default, PostgreSQL when
//! `DATABASE_URL` says so. It holds the audit trail, the soft deletes of log entries, and the
//! alert rules, alerts and their notification outbox.
//!
//! One set of queries serves both engines through sqlx's `Any` driver: timestamps are BIGINT
//! nanoseconds, JSON objects are TEXT, placeholders are `$n`. Each engine has its own
//! migrations (`migrations/sqlite`, `migrations/postgres`) for what differs (triggers).

mod alerts;
mod audit;

use std::borrow::Cow;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};
use uuid::Uuid;

pub use alerts::{
    AlertFilter, AlertPage, AlertRow, NewNotification, NotificationRow, StoredRule,
    is_unique_violation,
};
pub use audit::{AuditFilter, AuditPage, ChainReport, deletion_actor};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database holds an unreadable row: {0}")]
    Corrupt(String),
}

/// Which engine is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// The relational store.
pub struct Database {
    pool: AnyPool,
    engine: Engine,
    /// Serialises audit appends within this process (SQLite has one writer anyway; with
    /// PostgreSQL the chain-head row lock serialises replicas too).
    audit_lock: tokio::sync::Mutex<()>,
    /// Seals the audit trail's values (encryption at rest).
    keyring: Option<std::sync::Arc<logging_common::crypto::Keyring>>,
}

fn migrator(engine: Engine) -> Migrator {
    let sql = match engine {
        Engine::Sqlite => include_str!("../../migrations/sqlite/0001_init.sql"),
        Engine::Postgres => include_str!("../../migrations/postgres/0001_init.sql"),
    };
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("init"),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("alerts"),
            MigrationType::Simple,
            include_str!("../../migrations/0002_alerts.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("installation"),
            MigrationType::Simple,
            include_str!("../../migrations/0003_installation.sql").into_sql_str(),
            false,
        ),
    ])
}

impl Database {
    /// Connects, with the pool sized by `DATABASE_POOL_SIZE` (kept open) plus
    /// `DATABASE_MAX_OVERFLOW` (opened under load), and applies pending migrations.
    pub async fn connect(
        url: &str,
        pool_size: u32,
        max_overflow: u32,
    ) -> Result<Database, DbError> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else {
            Engine::Postgres
        };
        let options: AnyConnectOptions = url.parse()?;
        let (min, max) = match engine {
            // One SQLite file has one writer; more connections only add lock waits.
            Engine::Sqlite => (1, (pool_size + max_overflow).clamp(1, 4)),
            Engine::Postgres => (
                pool_size.min(pool_size + max_overflow),
                (pool_size + max_overflow).max(1),
            ),
        };
        let pool = AnyPoolOptions::new()
            .min_connections(min)
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(true)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // WAL mode: readers never block the writer; FULL sync: a committed
                        // audit entry survives power loss; wait rather than fail on a lock.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        migrator(engine).run(&pool).await?;
        Ok(Database {
            pool,
            engine,
            audit_lock: tokio::sync::Mutex::new(()),
            keyring: None,
        })
    }

    /// Seals the audit trail's `old_values`, `new_values` and `metadata` from now on, and
    /// opens sealed ones.
    pub fn with_keyring(
        mut self,
        keyring: Option<std::sync::Arc<logging_common::crypto::Keyring>>,
    ) -> Database {
        self.keyring = keyring;
        self
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// A round trip to the server, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Every soft-deleted log entry, with its day partition.
    pub async fn deletions(&self) -> Result<Vec<(Uuid, i64)>, DbError> {
        let rows = sqlx::query("SELECT id, partition_day FROM log_deletions")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let day: i64 = row.try_get("partition_day")?;
                let id = Uuid::parse_str(&id).map_err(|e| DbError::Corrupt(e.to_string()))?;
                Ok((id, day))
            })
            .collect()
    }

    /// Forgets the soft deletes of partitions that retention removed.
    pub async fn purge_deletions_before(&self, day: i64) -> Result<u64, DbError> {
        let done = sqlx::query("DELETE FROM log_deletions WHERE partition_day < $1")
            .bind(day)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Database {
    /// The key that names API tokens in the audit trail (see [`crate::auth`]): made once, at
    /// random, and kept in the database so that replicas sharing it name a token alike.
    pub async fn token_id_key(&self) -> Result<String, DbError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        sqlx::query(
            "INSERT INTO installation_secrets (name, value) VALUES ('token_id_key', $1) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(fresh)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM installation_secrets WHERE name = 'token_id_key'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<String, _>("value")?)
    }
}
