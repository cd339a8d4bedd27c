-- The config center (crate config-center). Versions 1001+ so they never clash with the
-- gateway's own migrations on the same database; each migrator ignores the other's rows.

-- Per-environment data keys, only ever stored wrapped (Vault Transit or a local master key).
CREATE TABLE config_data_keys (
    environment        TEXT   NOT NULL,
    key_version        BIGINT NOT NULL,
    wrapper            TEXT   NOT NULL,
    wrapped            TEXT   NOT NULL,
    created_at_unix_ms BIGINT NOT NULL,
    PRIMARY KEY (environment, key_version)
);

-- One row per release of an (environment, application); versions are 1, 2, 3, ... with no
-- gaps, and the primary key keeps two concurrent publishes from taking the same one.
CREATE TABLE config_releases (
    environment        TEXT   NOT NULL,
    application        TEXT   NOT NULL,
    version            BIGINT NOT NULL,
    created_at_unix_ms BIGINT NOT NULL,
    author             TEXT   NOT NULL,
    message            TEXT   NOT NULL DEFAULT '',
    rollback_of        BIGINT,
    PRIMARY KEY (environment, application, version)
);

-- The full snapshot of every release; values sealed under a data key (nonce || ct || tag).
CREATE TABLE config_entries (
    environment      TEXT    NOT NULL,
    application      TEXT    NOT NULL,
    version          BIGINT  NOT NULL,
    key              TEXT    NOT NULL,
    format           TEXT    NOT NULL,
    secret           BOOLEAN NOT NULL,
    data_key_version BIGINT  NOT NULL,
    sealed           BYTEA   NOT NULL,
    PRIMARY KEY (environment, application, version, key),
    FOREIGN KEY (environment, application, version)
        REFERENCES config_releases (environment, application, version)
);
