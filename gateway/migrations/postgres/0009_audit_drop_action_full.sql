-- no-transaction
-- The trail's lean indexes, step 4 of 4 (see 0006): the action index over every row,
-- replaced by audit_events_action_rare.
DROP INDEX CONCURRENTLY IF EXISTS audit_events_action;
