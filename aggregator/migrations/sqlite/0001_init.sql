-- The relational store's first schema (SQLite). Timestamps are nanoseconds since the epoch
-- (BIGINT) and JSON objects are TEXT, so the same queries run on SQLite and PostgreSQL.

CREATE TABLE audit_chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_chain (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE audit_entries (
    seq BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    timestamp_ns BIGINT NOT NULL,
    actor TEXT NOT NULL,
    actor_id TEXT,
    action TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    old_values TEXT,
    new_values TEXT,
    metadata TEXT NOT NULL,
    ip_address TEXT,
    user_agent TEXT,
    trace_id TEXT,
    created_at_ns BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_entries_timestamp ON audit_entries (timestamp_ns);
CREATE INDEX audit_entries_actor ON audit_entries (actor_id);
CREATE INDEX audit_entries_action ON audit_entries (action);
CREATE INDEX audit_entries_entity ON audit_entries (entity_type, entity_id);

-- Audit entries are immutable: not even a direct SQL session may change or remove one.
CREATE TRIGGER audit_entries_no_update BEFORE UPDATE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'audit entries are immutable');
END;
CREATE TRIGGER audit_entries_no_delete BEFORE DELETE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'audit entries are immutable');
END;

-- Soft-deleted log entries: hidden from reads, purged with their day partition.
CREATE TABLE log_deletions (
    id TEXT PRIMARY KEY,
    partition_day BIGINT NOT NULL,
    deleted_at_ns BIGINT NOT NULL,
    deleted_by TEXT NOT NULL
);
CREATE INDEX log_deletions_day ON log_deletions (partition_day);
