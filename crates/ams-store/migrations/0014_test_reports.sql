-- Test reports (`"test-reports"` in pipeline.json): the totals on the build for lists, as a JSON
-- object; NULL when the build read no report.
ALTER TABLE builds ADD COLUMN tests TEXT;
-- The whole reduced report (totals, failed tests with their messages, unreadable files) per build.
CREATE TABLE test_reports (
    build_id INTEGER PRIMARY KEY REFERENCES builds(id) ON DELETE CASCADE,
    report TEXT NOT NULL
);
