-- Cutoffs of a client's access tokens (disable, delete, revoke-tokens): every token
-- issued to client_id with an `iat` before first_iat (Unix seconds) is refused by every
-- instance. A row is kept until keep_until_unix_ms, when no token it refuses can still
-- be valid; instances delete it then.
CREATE TABLE token_cutoffs (
    client_id           TEXT PRIMARY KEY,
    first_iat           BIGINT NOT NULL,
    keep_until_unix_ms  BIGINT NOT NULL
);
