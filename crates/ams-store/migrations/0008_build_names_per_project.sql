-- Build names are unique per project, not across projects: one project's name format could
-- otherwise claim another project's future names and stop it from building. SQLite cannot
-- drop a column's UNIQUE, so the table is rebuilt with the same columns and ids.
CREATE TABLE builds_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL REFERENCES projects(name),
    build_index INTEGER NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    git_hash TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    trigger_kind TEXT NOT NULL,
    branch TEXT,
    commit_req TEXT,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    canceled_by TEXT,
    canceled_at REAL,
    archive_name TEXT,
    archive_hash TEXT,
    archive_hash_kind TEXT,
    output_deleted_at REAL,
    stages TEXT NOT NULL DEFAULT '[]',
    commit_message TEXT,
    UNIQUE (project, build_index),
    UNIQUE (project, name)
);

INSERT INTO builds_new (id, project, build_index, name, hash, git_hash, status, reason,
    trigger_kind, branch, commit_req, created_by, created_at, started_at, finished_at,
    canceled_by, canceled_at, archive_name, archive_hash, archive_hash_kind, output_deleted_at,
    stages, commit_message)
SELECT id, project, build_index, name, hash, git_hash, status, reason,
    trigger_kind, branch, commit_req, created_by, created_at, started_at, finished_at,
    canceled_by, canceled_at, archive_name, archive_hash, archive_hash_kind, output_deleted_at,
    stages, commit_message
FROM builds;

-- Ids are never reused: carry the old table's sequence over.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'builds_new', seq FROM sqlite_sequence WHERE name = 'builds'
  AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'builds_new');
UPDATE sqlite_sequence
SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'builds'), 0))
WHERE name = 'builds_new';

DROP TABLE builds;
ALTER TABLE builds_new RENAME TO builds;

CREATE INDEX IF NOT EXISTS builds_by_project ON builds (project, id);
CREATE INDEX IF NOT EXISTS builds_live ON builds (status) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS builds_by_name ON builds (name);

CREATE TRIGGER IF NOT EXISTS build_result_message
AFTER UPDATE OF status ON builds
WHEN old.status IN ('pending', 'running')
 AND new.status NOT IN ('pending', 'running')
 AND new.trigger_kind IN ('web', 'api')
BEGIN
    INSERT INTO messages (user, at, kind, text, project, build)
    SELECT new.created_by, COALESCE(new.finished_at, 0), new.status,
           'Build ' || new.name || ' ended ' || upper(new.status)
                    || COALESCE(': ' || new.reason, ''),
           new.project, new.name
    WHERE EXISTS (SELECT 1 FROM users WHERE name = new.created_by);
    DELETE FROM messages WHERE user = new.created_by AND id <= (
        SELECT id FROM messages WHERE user = new.created_by ORDER BY id DESC LIMIT 1 OFFSET 100);
END;
