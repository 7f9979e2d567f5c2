-- The last slot each schedule of pipeline-config.json fired for (or was first seen at), in
-- unix seconds: a schedule fires once per slot, and once for slots missed while the host was
-- down. `branch` is '' for the project's default branch.
CREATE TABLE IF NOT EXISTS schedule_runs (
    project TEXT NOT NULL,
    cron TEXT NOT NULL,
    branch TEXT NOT NULL DEFAULT '',
    last_slot INTEGER NOT NULL,
    PRIMARY KEY (project, cron, branch)
);
