-- The newest build of a project's branch in one index lookup: the public status badge
-- (`?branch=`, which anyone may ask about any name) and build-fixed's previous status.
CREATE INDEX IF NOT EXISTS builds_by_branch ON builds (project, branch, id);
