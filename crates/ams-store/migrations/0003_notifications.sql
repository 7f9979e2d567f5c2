CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    build_name TEXT NOT NULL,
    hook TEXT NOT NULL,
    kind TEXT NOT NULL,
    target_host TEXT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    attempts TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    finished_at REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS notifications_by_project ON notifications (project, id);
