-- no-transaction
-- The trail's lean indexes, step 1 of 4 (0006–0009). Two of the trail's four B-tree
-- indexes cost Postgres about as much CPU per appended row as the row itself, and the
-- trail takes a row per token issued (docs/benchmarks.md, sixteenth sitting). The time
-- index becomes a BRIN: rows arrive in about time order, so ranges of pages summarise
-- them well, and a time window is found by a bitmap scan of those ranges at a tiny
-- fraction of a B-tree's size and insert cost.
--
-- Each step is one statement outside a transaction, so that the indexes are built and
-- dropped CONCURRENTLY: instances still appending (a rolling upgrade) are not held for
-- the length of a pass over a large trail. Should a build be cut off, Postgres leaves
-- the index invalid; docs/operations/audit.md says how to finish by hand.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_events_at_brin
    ON audit_events USING brin (at_unix_ms);
