-- The audit trail becomes a hash chain (docs/operations/audit.md). Records written before
-- this migration keep no chain position: the chain starts at the first record written
-- after it, and `legacy_max_id` remembers where the unchained records end, so that a
-- record slipped in later without a position is detected.
ALTER TABLE audit_events ADD COLUMN seq BIGINT;
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash_version INTEGER;
CREATE UNIQUE INDEX audit_events_seq ON audit_events (seq);

-- The last record of the chain; every append locks this one row first, so instances
-- sharing the database append one after another and the chain never forks.
CREATE TABLE audit_chain_head (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    seq           BIGINT NOT NULL,
    hash          TEXT NOT NULL,
    legacy_max_id BIGINT NOT NULL
);
INSERT INTO audit_chain_head (id, seq, hash, legacy_max_id)
SELECT 1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
       COALESCE(MAX(id), 0)
FROM audit_events;
