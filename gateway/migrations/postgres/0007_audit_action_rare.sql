-- no-transaction
-- The trail's lean indexes, step 2 of 4 (see 0006). The action index leaves out
-- `token.issue`, nearly every row under load and never a selective filter; the other
-- actions (logins, revocations, key and config changes) stay found by it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_events_action_rare
    ON audit_events (action, at_unix_ms) WHERE action <> 'token.issue';
