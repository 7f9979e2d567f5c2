-- A build queued again because the one before ended ERROR (retry-on-error in
-- pipeline-config.json) names that build here.
ALTER TABLE builds ADD COLUMN retry_of INTEGER REFERENCES builds(id) ON DELETE SET NULL;
