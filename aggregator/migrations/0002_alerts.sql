-- Alerting (both engines): rules, alerts with their history, and the notification outbox.
-- Timestamps are nanoseconds since the epoch; `spec` and `doc` are JSON text.

CREATE TABLE alert_rules (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at_ns BIGINT NOT NULL,
    updated_at_ns BIGINT NOT NULL
);

CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    group_key TEXT NOT NULL,
    rule_name TEXT NOT NULL,
    status TEXT NOT NULL,
    severity TEXT NOT NULL,
    created_at_ns BIGINT NOT NULL,
    updated_at_ns BIGINT NOT NULL,
    resolved_at_ns BIGINT,
    doc TEXT NOT NULL
);
CREATE INDEX alerts_status ON alerts (status);
CREATE INDEX alerts_rule_group ON alerts (rule_id, group_key);
CREATE INDEX alerts_created ON alerts (created_at_ns);

-- One row per alert event (fired, resolved) and channel; sent once, retried until then.
CREATE TABLE alert_notifications (
    id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL,
    event TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_ns BIGINT NOT NULL,
    last_error TEXT,
    created_at_ns BIGINT NOT NULL,
    sent_at_ns BIGINT,
    payload TEXT NOT NULL
);
CREATE INDEX alert_notifications_due ON alert_notifications (status, next_attempt_ns);
CREATE INDEX alert_notifications_alert ON alert_notifications (alert_id);
