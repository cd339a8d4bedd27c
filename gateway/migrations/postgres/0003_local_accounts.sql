-- Break-glass local accounts for the console (off unless sso.local_accounts = true).
-- Passwords are stored only as Argon2id PHC strings; roles are space-separated;
-- instants are unix milliseconds, as in every table.
CREATE TABLE local_accounts (
    name                TEXT PRIMARY KEY,
    password_hash       TEXT NOT NULL,
    roles               TEXT NOT NULL,
    enabled             BOOLEAN NOT NULL DEFAULT TRUE,
    created_at_unix_ms  BIGINT NOT NULL,
    updated_at_unix_ms  BIGINT NOT NULL
);
