-- OAuth2 clients. Secrets are never stored: only HMAC-SHA256 under the server key of
-- ("client-secret", id, secret). Lists are space-separated tokens (none may hold a space);
-- instants are unix milliseconds, as in every table, so one SQL text serves both backends.
CREATE TABLE oauth_clients (
    id                                  TEXT PRIMARY KEY,
    name                                TEXT NOT NULL,
    grant_types                         TEXT NOT NULL,
    scopes                              TEXT NOT NULL,
    -- the first one is the default audience
    audiences                           TEXT NOT NULL,
    -- NULL: the configured default lifetime
    access_token_lifetime_secs          BIGINT,
    enabled                             BOOLEAN NOT NULL DEFAULT TRUE,
    secret_hash                         BYTEA NOT NULL,
    -- the secret replaced by the last rotation, valid until the instant below
    previous_secret_hash                BYTEA,
    previous_secret_expires_at_unix_ms  BIGINT,
    created_at_unix_ms                  BIGINT NOT NULL,
    updated_at_unix_ms                  BIGINT NOT NULL
);
CREATE INDEX oauth_clients_name ON oauth_clients (name);
