-- Gray releases: a release is 'main' (served to everyone), 'gray' (served only to the
-- instances its selector matches, at most one per environment and application) or
-- 'aborted' (never served again; kept for history).
ALTER TABLE config_releases ADD COLUMN status TEXT NOT NULL DEFAULT 'main';
ALTER TABLE config_releases ADD COLUMN gray_selector TEXT;
