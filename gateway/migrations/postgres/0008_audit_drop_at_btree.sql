-- no-transaction
-- The trail's lean indexes, step 3 of 4 (see 0006): the B-tree on time, replaced by
-- audit_events_at_brin.
DROP INDEX CONCURRENTLY IF EXISTS audit_events_at;
