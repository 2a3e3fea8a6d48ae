-- Secrets of this installation (both engines), shared by every replica on the same database.
-- `token_id_key`: the key of the keyed hash that names API tokens in the audit trail.

CREATE TABLE installation_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
