CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT,
    project TEXT NOT NULL,
    webhook TEXT NOT NULL,
    received_at REAL NOT NULL,
    sender TEXT NOT NULL,
    event TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT,
    builds TEXT NOT NULL DEFAULT '[]',
    headers TEXT NOT NULL DEFAULT '{}',
    body BLOB
);

CREATE UNIQUE INDEX IF NOT EXISTS deliveries_accepted_once
    ON deliveries (project, delivery_id)
    WHERE verdict = 'accepted' AND delivery_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_by_project ON deliveries (project, id);
