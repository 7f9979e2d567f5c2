-- The dashboard's message panel: each user's own messages, kept for the next visit.
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    at REAL NOT NULL,
    -- 'ok', 'error', 'info', or the final status of a build
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    project TEXT,
    build TEXT
);

CREATE INDEX IF NOT EXISTS messages_by_user ON messages (user, id);

-- A build triggered from the web interface or the API tells its user how it ended, whichever
-- path ended it (worker, cancel, supersede, restart recovery), in the same transaction.
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
