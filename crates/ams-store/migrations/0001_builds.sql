CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY NOT NULL,
    latest_build_index INTEGER NOT NULL DEFAULT 0,
    latest_build_key TEXT,
    last_created_time REAL,
    last_execute_time REAL,
    last_complete_time REAL
);

CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL REFERENCES projects(name),
    build_index INTEGER NOT NULL,
    name TEXT NOT NULL UNIQUE,
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
    UNIQUE (project, build_index)
);

CREATE INDEX IF NOT EXISTS builds_by_project ON builds (project, id);
CREATE INDEX IF NOT EXISTS builds_live ON builds (status) WHERE status IN ('pending', 'running');
