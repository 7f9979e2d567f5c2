//! Builds and the projects' counters: the persistent queue is the builds whose status is
//! `pending` or `running`.

use crate::conn::Store;
use crate::error::{bad_column, Result, StoreError};
use ams_core::status::BuildStatus;
use rusqlite::{params, Connection, OptionalExtension, Row, ToSql};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

/// One stage's recorded result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub name: String,
    pub exit_code: Option<i32>,
    pub passed: bool,
    /// Unix seconds.
    pub started_at: f64,
    pub duration_secs: f64,
}

/// A build as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: i64,
    pub project: String,
    pub build_index: i64,
    pub name: String,
    pub hash: String,
    pub git_hash: Option<String>,
    /// The built commit's message (first 4 KiB), once known.
    pub commit_message: Option<String>,
    pub status: BuildStatus,
    pub reason: Option<String>,
    pub trigger: String,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub created_by: String,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub canceled_by: Option<String>,
    pub canceled_at: Option<f64>,
    /// File name of the 7z archive in the project's builds folder.
    pub archive_name: Option<String>,
    pub archive_hash: Option<String>,
    pub archive_hash_kind: Option<String>,
    pub output_deleted_at: Option<f64>,
    pub stages: Vec<StageResult>,
    /// The build this one runs again, when that one ended ERROR (`retry-on-error`).
    #[serde(default)]
    pub retry_of: Option<i64>,
    /// The parameters its trigger gave (`-p NAME=VALUE`); the defaults are not repeated here.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// The totals of its test reports, when it read any (the failed tests are in
    /// [`Store::test_report`]).
    #[serde(default)]
    pub tests: Option<ams_core::junit::TestTotals>,
}

impl BuildRecord {
    /// The typed id commands carry.
    pub fn build_id(&self) -> ams_core::names::BuildId {
        ams_core::names::BuildId(self.id)
    }

    /// A row of `builds` (any query that selects its columns by name), read the one way every
    /// query of builds reads it. Reading many rows of one statement, resolve the columns once
    /// with [`BuildColumns::of`] instead.
    pub(crate) fn from_row(r: &Row) -> rusqlite::Result<BuildRecord> {
        BuildColumns::of(r.as_ref())?.read(r)
    }
}

/// Where a statement has each column of `builds`, found by name once per statement (looking a
/// name up on every row of a page cost more than the query itself).
pub(crate) struct BuildColumns([usize; 26]);

impl BuildColumns {
    const NAMES: [&str; 26] = [
        "id",
        "project",
        "build_index",
        "name",
        "hash",
        "git_hash",
        "commit_message",
        "status",
        "reason",
        "trigger_kind",
        "branch",
        "commit_req",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "canceled_by",
        "canceled_at",
        "archive_name",
        "archive_hash",
        "archive_hash_kind",
        "output_deleted_at",
        "stages",
        "retry_of",
        "params",
        "tests",
    ];

    pub(crate) fn of(st: &rusqlite::Statement) -> rusqlite::Result<BuildColumns> {
        let mut at = [0; 26];
        for (i, name) in Self::NAMES.iter().enumerate() {
            at[i] = st.column_index(name)?;
        }
        Ok(BuildColumns(at))
    }

    pub(crate) fn read(&self, r: &Row) -> rusqlite::Result<BuildRecord> {
        Ok(self.view(r)?.to_record())
    }

    /// The row's columns, borrowed from SQLite for as long as the row is current.
    pub(crate) fn view<'r>(&self, r: &'r Row) -> rusqlite::Result<RawBuild<'r>> {
        let c = &self.0;
        // A value of the wrong type names its column, as `Row::get` does.
        let named = |i: usize, v: rusqlite::types::ValueRef<'_>, e| match e {
            rusqlite::types::FromSqlError::InvalidType => {
                rusqlite::Error::InvalidColumnType(c[i], Self::NAMES[i].into(), v.data_type())
            }
            other => bad_column(Self::NAMES[i], other.to_string()),
        };
        let text = |i: usize| -> rusqlite::Result<&'r str> {
            let v = r.get_ref(c[i])?;
            v.as_str().map_err(|e| named(i, v, e))
        };
        let opt = |i: usize| -> rusqlite::Result<Option<&'r str>> {
            let v = r.get_ref(c[i])?;
            v.as_str_or_null().map_err(|e| named(i, v, e))
        };
        let status = text(7)?;
        Ok(RawBuild {
            row: BuildRow {
                id: r.get(c[0])?,
                project: text(1)?,
                build_index: r.get(c[2])?,
                name: text(3)?,
                hash: text(4)?,
                git_hash: opt(5)?,
                commit_message: opt(6)?,
                status: BuildStatus::from_str(status).map_err(|e| bad_column("status", e))?,
                reason: opt(8)?,
                trigger: text(9)?,
                branch: opt(10)?,
                commit: opt(11)?,
                created_by: text(12)?,
                created_at: r.get(c[13])?,
                started_at: r.get(c[14])?,
                finished_at: r.get(c[15])?,
                canceled_by: opt(16)?,
                canceled_at: r.get(c[17])?,
                archive_name: opt(18)?,
                archive_hash: opt(19)?,
                archive_hash_kind: opt(20)?,
                output_deleted_at: r.get(c[21])?,
                retry_of: r.get(c[23])?,
            },
            stages: text(22)?,
            params: opt(24)?,
            tests: opt(25)?,
        })
    }
}

/// The plain columns of a build, borrowed: from SQLite's row while a page is read
/// ([`Store::builds_where_fold`]), or from a [`BuildRecord`] ([`BuildRecord::row`]). Its
/// fields are [`BuildRecord`]'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildRow<'r> {
    pub id: i64,
    pub project: &'r str,
    pub build_index: i64,
    pub name: &'r str,
    pub hash: &'r str,
    pub git_hash: Option<&'r str>,
    pub commit_message: Option<&'r str>,
    pub status: BuildStatus,
    pub reason: Option<&'r str>,
    pub trigger: &'r str,
    pub branch: Option<&'r str>,
    pub commit: Option<&'r str>,
    pub created_by: &'r str,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub canceled_by: Option<&'r str>,
    pub canceled_at: Option<f64>,
    pub archive_name: Option<&'r str>,
    pub archive_hash: Option<&'r str>,
    pub archive_hash_kind: Option<&'r str>,
    pub output_deleted_at: Option<f64>,
    pub retry_of: Option<i64>,
}

/// A row of `builds` as SQLite holds it: the plain columns and the JSON columns' text.
#[derive(Debug, Clone, Copy)]
pub struct RawBuild<'r> {
    pub row: BuildRow<'r>,
    stages: &'r str,
    params: Option<&'r str>,
    tests: Option<&'r str>,
}

impl RawBuild<'_> {
    /// The stages, parsed (none if the column does not parse).
    pub fn stages(&self) -> Vec<StageResult> {
        serde_json::from_str(self.stages).unwrap_or_default()
    }

    /// The test totals, parsed.
    pub fn tests(&self) -> Option<ams_core::junit::TestTotals> {
        self.tests.and_then(|t| serde_json::from_str(t).ok())
    }

    /// The row, owned.
    pub fn to_record(&self) -> BuildRecord {
        let b = &self.row;
        let own = |s: Option<&str>| s.map(str::to_owned);
        BuildRecord {
            id: b.id,
            project: b.project.to_owned(),
            build_index: b.build_index,
            name: b.name.to_owned(),
            hash: b.hash.to_owned(),
            git_hash: own(b.git_hash),
            commit_message: own(b.commit_message),
            status: b.status,
            reason: own(b.reason),
            trigger: b.trigger.to_owned(),
            branch: own(b.branch),
            commit: own(b.commit),
            created_by: b.created_by.to_owned(),
            created_at: b.created_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
            canceled_by: own(b.canceled_by),
            canceled_at: b.canceled_at,
            archive_name: own(b.archive_name),
            archive_hash: own(b.archive_hash),
            archive_hash_kind: own(b.archive_hash_kind),
            output_deleted_at: b.output_deleted_at,
            stages: self.stages(),
            retry_of: b.retry_of,
            params: self
                .params
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
            tests: self.tests(),
        }
    }
}

impl BuildRecord {
    /// Its plain columns, borrowed.
    pub fn row(&self) -> BuildRow<'_> {
        BuildRow {
            id: self.id,
            project: &self.project,
            build_index: self.build_index,
            name: &self.name,
            hash: &self.hash,
            git_hash: self.git_hash.as_deref(),
            commit_message: self.commit_message.as_deref(),
            status: self.status,
            reason: self.reason.as_deref(),
            trigger: &self.trigger,
            branch: self.branch.as_deref(),
            commit: self.commit.as_deref(),
            created_by: &self.created_by,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            canceled_by: self.canceled_by.as_deref(),
            canceled_at: self.canceled_at,
            archive_name: self.archive_name.as_deref(),
            archive_hash: self.archive_hash.as_deref(),
            archive_hash_kind: self.archive_hash_kind.as_deref(),
            output_deleted_at: self.output_deleted_at,
            retry_of: self.retry_of,
        }
    }
}

/// The described system's project info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectInfo {
    pub name: String,
    pub latest_build_index: i64,
    pub latest_build_key: Option<String>,
    pub last_created_time: Option<f64>,
    pub last_execute_time: Option<f64>,
    pub last_complete_time: Option<f64>,
}

impl ProjectInfo {
    fn from_row(r: &Row) -> rusqlite::Result<ProjectInfo> {
        Ok(ProjectInfo {
            name: r.get("name")?,
            latest_build_index: r.get("latest_build_index")?,
            latest_build_key: r.get("latest_build_key")?,
            last_created_time: r.get("last_created_time")?,
            last_execute_time: r.get("last_execute_time")?,
            last_complete_time: r.get("last_complete_time")?,
        })
    }
}

/// What a trigger knows about a new build.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub project: String,
    pub hash: String,
    pub trigger: String,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub created_by: String,
    pub created_at: f64,
    /// The build this one runs again (see [`BuildRecord::retry_of`]).
    pub retry_of: Option<i64>,
    /// The parameters its trigger gave.
    pub params: BTreeMap<String, String>,
}

/// How a build ended.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub status: Option<BuildStatus>,
    pub reason: Option<String>,
    pub finished_at: f64,
    pub git_hash: Option<String>,
    pub commit_message: Option<String>,
    pub stages: Vec<StageResult>,
    pub archive_name: Option<String>,
    pub archive_hash: Option<String>,
    pub archive_hash_kind: Option<String>,
    /// What its test reports say, when the pipeline names any.
    pub tests: Option<ams_core::junit::TestReport>,
}

/// A final build whose files retention removes, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expired {
    pub build: BuildRecord,
    /// Older than the newest `keep-builds` final builds of its project.
    pub beyond_keep: bool,
    /// Finished more than `max-age-days` ago.
    pub too_old: bool,
}

/// The API's build fields that are plain columns, for filtering in SQL: (field, column).
pub const BUILD_FILTER_COLUMNS: &[(&str, &str)] = &[
    ("name", "name"),
    ("hash", "hash"),
    ("git_hash", "git_hash"),
    ("build_id", "build_index"),
    ("status", "status"),
    ("created_by", "created_by"),
    ("canceled_by", "canceled_by"),
    ("7z_hash", "archive_hash"),
    ("trigger", "trigger_kind"),
    ("branch", "branch"),
    ("commit", "commit_req"),
    ("reason", "reason"),
];

/// The builds a query selects (through a cached statement).
pub(crate) fn query(c: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<BuildRecord>> {
    let mut st = c.prepare_cached(sql)?;
    let columns = BuildColumns::of(&st)?;
    let rows = st.query_map(args, |r| columns.read(r))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The one build a query selects, if any.
pub(crate) fn query_one(
    c: &Connection,
    sql: &str,
    args: &[&dyn ToSql],
) -> Result<Option<BuildRecord>> {
    let mut st = c.prepare_cached(sql)?;
    Ok(st.query_row(args, BuildRecord::from_row).optional()?)
}

/// Allocates the project's next build index, names the build and records it as pending, in
/// the caller's transaction. A name `name_of` refuses comes back as the inner error, and
/// nothing is written for it (the index is not used up).
pub(crate) fn create(
    c: &Connection,
    nb: &NewBuild,
    name_of: impl FnOnce(i64) -> std::result::Result<String, String>,
) -> Result<std::result::Result<BuildRecord, String>> {
    let index: i64 = c
        .prepare_cached(
            "SELECT COALESCE((SELECT latest_build_index FROM projects WHERE name = ?), 0) + 1",
        )?
        .query_row([&nb.project], |r| r.get(0))?;
    let name = match name_of(index) {
        Ok(name) => name,
        Err(e) => return Ok(Err(e)),
    };
    c.prepare_cached(
        "INSERT INTO projects (name, latest_build_index, latest_build_key, last_created_time) \
         VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET \
         latest_build_index = excluded.latest_build_index, \
         latest_build_key = excluded.latest_build_key, \
         last_created_time = excluded.last_created_time",
    )?
    .execute(params![nb.project, index, name, nb.created_at])?;
    let params = (!nb.params.is_empty())
        .then(|| serde_json::to_string(&nb.params).ok())
        .flatten();
    let record = c
        .prepare_cached(
            "INSERT INTO builds (project, build_index, name, hash, status, trigger_kind, branch, \
             commit_req, created_by, created_at, retry_of, params) \
             VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )?
        .query_row(
            params![
                nb.project,
                index,
                name,
                nb.hash,
                nb.trigger,
                nb.branch,
                nb.commit,
                nb.created_by,
                nb.created_at,
                nb.retry_of,
                params
            ],
            BuildRecord::from_row,
        )?;
    Ok(Ok(record))
}

/// Records the final state of a live build; `None` when it was not live (already final).
fn finish(c: &Connection, id: i64, f: &Finish, status: BuildStatus) -> Result<Option<String>> {
    let tests = f
        .tests
        .as_ref()
        .and_then(|t| serde_json::to_string(&t.totals).ok());
    let project: Option<String> = c
        .prepare_cached(
            "UPDATE builds SET status = ?, reason = ?, finished_at = ?, \
             git_hash = COALESCE(?, git_hash), commit_message = COALESCE(?, commit_message), \
             stages = ?, archive_name = ?, archive_hash = ?, \
             archive_hash_kind = ?, tests = ? WHERE id = ? AND status IN ('pending', 'running') \
             RETURNING project",
        )?
        .query_row(
            params![
                status.as_str(),
                f.reason,
                f.finished_at,
                f.git_hash,
                f.commit_message,
                serde_json::to_string(&f.stages).unwrap_or_else(|_| "[]".into()),
                f.archive_name,
                f.archive_hash,
                f.archive_hash_kind,
                tests,
                id
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(project) = project else {
        return Ok(None);
    };
    if let Some(report) = &f.tests {
        c.prepare_cached("INSERT OR REPLACE INTO test_reports (build_id, report) VALUES (?, ?)")?
            .execute(params![
                id,
                serde_json::to_string(report).unwrap_or_else(|_| "{}".into())
            ])?;
    }
    c.prepare_cached("UPDATE projects SET last_complete_time = ? WHERE name = ?")?
        .execute(params![f.finished_at, project])?;
    Ok(Some(project))
}

/// The newest ended build of `project`: any (`None`), of a branch (`Some(Some(b))`), or
/// of no branch and no commit (`Some(None)`), the last two through the branch index.
fn newest_final(
    c: &Connection,
    project: &str,
    branch: Option<Option<&str>>,
) -> Result<Option<BuildRecord>> {
    const FINAL: &str = "AND status NOT IN ('pending', 'running') ORDER BY id DESC LIMIT 1";
    match branch {
        None => query_one(
            c,
            &format!("SELECT * FROM builds WHERE project = ? {FINAL}"),
            &[&project],
        ),
        Some(Some(b)) => query_one(
            c,
            &format!(
                "SELECT * FROM builds INDEXED BY builds_by_branch WHERE project = ? \
                 AND branch = ? {FINAL}"
            ),
            &[&project, &b],
        ),
        Some(None) => query_one(
            c,
            &format!(
                "SELECT * FROM builds INDEXED BY builds_by_branch WHERE project = ? \
                 AND branch IS NULL AND commit_req IS NULL {FINAL}"
            ),
            &[&project],
        ),
    }
}

/// The newest build of each branch of a project: bound to the project and the count.
pub(crate) const LATEST_PER_BRANCH: &str = "SELECT * FROM builds WHERE id IN \
     (SELECT MAX(id) FROM builds WHERE project = ? GROUP BY branch) \
     ORDER BY id DESC LIMIT ?";

/// A page of `project`'s builds whose `filters` columns equal values, newest first, each row
/// handed to `f` as SQLite holds it.
fn filtered_fold(
    c: &Connection,
    project: &str,
    filters: &[(String, String)],
    limit: i64,
    offset: i64,
    mut f: impl FnMut(&RawBuild<'_>),
) -> Result<()> {
    let sql = filtered_sql(filters)?;
    let mut args: Vec<&dyn ToSql> = vec![&project];
    for (_, v) in filters {
        args.push(v);
        args.push(v);
    }
    args.push(&limit);
    args.push(&offset);
    let mut st = c.prepare_cached(&sql)?;
    let columns = BuildColumns::of(&st)?;
    let mut rows = st.query(args.as_slice())?;
    while let Some(r) = rows.next()? {
        f(&columns.view(r)?);
    }
    Ok(())
}

/// A page of a project's builds whose `filters` columns equal values: bound to the project,
/// each filter's value twice, the count and the offset.
pub(crate) fn filtered_sql(filters: &[(String, String)]) -> Result<String> {
    let mut sql = String::from("SELECT * FROM builds WHERE project = ?");
    for (col, _) in filters {
        if !BUILD_FILTER_COLUMNS.iter().any(|(_, c)| c == col) {
            return Err(StoreError::Invalid(format!("cannot filter on `{col}`")));
        }
        sql.push_str(&format!(
            " AND ({col} = ? OR (? = 'null' AND {col} IS NULL))"
        ));
    }
    sql.push_str(" ORDER BY id DESC LIMIT ? OFFSET ?");
    Ok(sql)
}

impl Store {
    /// Records a new pending build. `name_of(index)` names it once its index is allocated; the
    /// index and the name are allocated in one transaction.
    pub async fn create_build(
        &self,
        nb: &NewBuild,
        name_of: impl FnOnce(i64) -> std::result::Result<String, String> + Send + 'static,
    ) -> Result<BuildRecord> {
        let _touch = self.touch();
        let nb = nb.clone();
        self.write(move |c| create(c, &nb, name_of)?.map_err(StoreError::Invalid))
            .await
    }

    pub async fn build_by_id(&self, id: i64) -> Result<Option<BuildRecord>> {
        self.read_now(move |c| query_one(c, "SELECT * FROM builds WHERE id = ?", &[&id]))
            .await
    }

    /// The build of `project` named `name` (names are unique per project).
    pub async fn build_by_name(&self, project: &str, name: &str) -> Result<Option<BuildRecord>> {
        let (project, name) = (project.to_owned(), name.to_owned());
        self.read_now(move |c| {
            query_one(
                c,
                "SELECT * FROM builds WHERE project = ? AND name = ?",
                &[&project, &name],
            )
        })
        .await
    }

    /// The build of `project` with index `index` (1 for its first build; unique per project).
    pub async fn build_by_index(&self, project: &str, index: i64) -> Result<Option<BuildRecord>> {
        let project = project.to_owned();
        self.read_now(move |c| {
            query_one(
                c,
                "SELECT * FROM builds WHERE project = ? AND build_index = ?",
                &[&project, &index],
            )
        })
        .await
    }

    /// The newest build of `project` (of its `branch` when given) that has ended, whatever
    /// its status: an index lookup, however many builds or unknown branch names are asked for.
    /// With `default_branch`, builds that named no branch and no commit (they built the
    /// default branch's head) count as builds of `branch` too.
    pub async fn latest_final_build(
        &self,
        project: &str,
        branch: Option<&str>,
        default_branch: bool,
    ) -> Result<Option<BuildRecord>> {
        let (project, branch) = (project.to_owned(), branch.map(str::to_owned));
        self.read(move |c| match branch.as_deref() {
            None => newest_final(c, &project, None),
            Some(b) => {
                let named = newest_final(c, &project, Some(Some(b)))?;
                let plain = if default_branch {
                    newest_final(c, &project, Some(None))?
                } else {
                    None
                };
                Ok(named.into_iter().chain(plain).max_by_key(|b| b.id))
            }
        })
        .await
    }

    /// Every build named `name`, in any project (at most 16), oldest first: a name alone may
    /// be ambiguous, so the caller picks among the projects it may act on.
    pub async fn builds_named(&self, name: &str) -> Result<Vec<BuildRecord>> {
        let name = name.to_owned();
        self.read_now(move |c| {
            query(
                c,
                "SELECT * FROM builds WHERE name = ? ORDER BY id LIMIT 16",
                &[&name],
            )
        })
        .await
    }

    /// The project's builds, newest first.
    pub async fn builds_of(
        &self,
        project: &str,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<BuildRecord>> {
        self.builds_where(project, &[], limit, offset).await
    }

    /// The project's builds whose columns equal the given values, newest first. `filters` pairs
    /// a column from [`BUILD_FILTER_COLUMNS`] with a value; the value `null` also matches NULL.
    pub async fn builds_where(
        &self,
        project: &str,
        filters: &[(&str, &str)],
        limit: i64,
        offset: i64,
    ) -> Result<Vec<BuildRecord>> {
        self.builds_where_fold(project, filters, limit, offset, Vec::new(), |out, b| {
            out.push(b.to_record())
        })
        .await
    }

    /// [`Store::builds_where`]'s page, handed row by row to `f` while SQLite holds it, with
    /// `acc`: nothing is copied out of SQLite that `f` does not copy (the API writes its JSON
    /// straight from the rows).
    pub async fn builds_where_fold<A, F>(
        &self,
        project: &str,
        filters: &[(&str, &str)],
        limit: i64,
        offset: i64,
        acc: A,
        mut f: F,
    ) -> Result<A>
    where
        A: Send + 'static,
        F: FnMut(&mut A, &RawBuild<'_>) + Send + 'static,
    {
        let project = project.to_owned();
        let filters: Vec<(String, String)> = filters
            .iter()
            .map(|(c, v)| (c.to_string(), v.to_string()))
            .collect();
        // A page near the start walks few rows; a filter or a far offset may walk them all.
        let short = filters.is_empty() && limit.saturating_add(offset) <= 1000;
        let job = move |c: &Connection| {
            let mut acc = acc;
            filtered_fold(c, &project, &filters, limit, offset, |b| f(&mut acc, b))?;
            Ok(acc)
        };
        if short {
            self.read_now(job).await
        } else {
            self.read(job).await
        }
    }

    /// The newest build of each branch of `project` (builds that named no branch count as one
    /// branch), newest first, at most `limit`.
    pub async fn latest_per_branch(&self, project: &str, limit: i64) -> Result<Vec<BuildRecord>> {
        let project = project.to_owned();
        self.read_now(move |c| query(c, LATEST_PER_BRANCH, &[&project, &limit]))
            .await
    }

    /// Each project's newest build: project → (build id, name, status), in one query.
    pub async fn latest_builds(&self) -> Result<HashMap<String, (i64, String, String)>> {
        self.read_now(|c| {
            // Through projects.latest_build_key: one index lookup per project, however many
            // builds there are.
            let mut st = c.prepare_cached(
                "SELECT b.project, b.id, b.name, b.status FROM projects p \
                 JOIN builds b ON b.project = p.name AND b.name = p.latest_build_key",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get("project")?,
                    (r.get("id")?, r.get("name")?, r.get("status")?),
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Pending and running builds in queue order: the persistent queue.
    pub async fn unfinished(&self) -> Result<Vec<BuildRecord>> {
        self.read(|c| {
            query(
                c,
                "SELECT * FROM builds WHERE status IN ('pending', 'running') ORDER BY id",
                &[],
            )
        })
        .await
    }

    /// Puts a running build back to pending (its engine failed before its container existed;
    /// it waits for another). Returns false when it was not running.
    pub async fn mark_pending_again(&self, id: i64) -> Result<bool> {
        let _touch = self.touch();
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE builds SET status = 'pending', started_at = NULL \
                     WHERE id = ? AND status = 'running'",
                )?
                .execute(params![id])?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn mark_running(&self, id: i64, at: f64) -> Result<()> {
        let _touch = self.touch();
        self.write(move |c| {
            let project: String = c
                .prepare_cached(
                    "UPDATE builds SET status = 'running', started_at = ? WHERE id = ? \
                     RETURNING project",
                )?
                .query_row(params![at, id], |r| r.get(0))?;
            c.prepare_cached("UPDATE projects SET last_execute_time = ? WHERE name = ?")?
                .execute(params![at, project])?;
            Ok(())
        })
        .await
    }

    pub async fn set_git_hash(&self, id: i64, git_hash: &str) -> Result<()> {
        let _touch = self.touch();
        let git_hash = git_hash.to_owned();
        self.write(move |c| {
            c.prepare_cached("UPDATE builds SET git_hash = ? WHERE id = ?")?
                .execute(params![git_hash, id])?;
            Ok(())
        })
        .await
    }

    /// Records the final state of a build. Only a live build can be finished, so a late report
    /// never overwrites a result (for example a cancel recorded first).
    pub async fn finish(&self, id: i64, f: &Finish) -> Result<bool> {
        let _touch = self.touch();
        let status = f.status.unwrap_or(BuildStatus::Fail);
        if !status.is_final() {
            return Err(StoreError::Invalid(format!(
                "{status} is not a final status"
            )));
        }
        let f = f.clone();
        self.write(move |c| Ok(finish(c, id, &f, status)?.is_some()))
            .await
    }

    /// The test report of a build, when it read any.
    pub async fn test_report(&self, build_id: i64) -> Result<Option<ams_core::junit::TestReport>> {
        self.read_now(move |c| {
            let text: Option<String> = c
                .prepare_cached("SELECT report FROM test_reports WHERE build_id = ?")?
                .query_row([build_id], |r| r.get(0))
                .optional()?;
            Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
        })
        .await
    }

    /// Records who canceled a build and when (the status is set by [`Store::finish`]).
    pub async fn set_canceled(&self, id: i64, by: &str, at: f64) -> Result<()> {
        let _touch = self.touch();
        let by = by.to_owned();
        self.write(move |c| {
            c.prepare_cached("UPDATE builds SET canceled_by = ?, canceled_at = ? WHERE id = ?")?
                .execute(params![by, at, id])?;
            Ok(())
        })
        .await
    }

    /// The final builds of `project` whose files retention removes, oldest first: those
    /// beyond the newest `keep` final builds (by id, the build order) and those that finished
    /// before `finished_before` (Unix seconds). Pending and running builds are never among
    /// them and do not count towards `keep`; builds whose output is already deleted count
    /// towards `keep` but are not listed again.
    pub async fn retention_candidates(
        &self,
        project: &str,
        keep: Option<u32>,
        finished_before: Option<f64>,
    ) -> Result<Vec<Expired>> {
        if keep.is_none() && finished_before.is_none() {
            return Ok(Vec::new());
        }
        let project = project.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT *, COALESCE(?2 IS NOT NULL AND newer >= ?2, 0) AS beyond_keep, \
                        COALESCE(?3 IS NOT NULL AND finished_at < ?3, 0) AS too_old \
                 FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY id DESC) - 1 AS newer FROM builds \
                       WHERE project = ?1 AND status NOT IN ('pending', 'running')) \
                 WHERE output_deleted_at IS NULL AND (beyond_keep OR too_old) \
                 ORDER BY id",
            )?;
            let columns = BuildColumns::of(&st)?;
            let rows = st.query_map(
                params![project, keep.map(i64::from), finished_before],
                |r| {
                    Ok(Expired {
                        build: columns.read(r)?,
                        beyond_keep: r.get("beyond_keep")?,
                        too_old: r.get("too_old")?,
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Marks the outputs of final builds deleted, in one transaction (a pending or running
    /// build is never marked). Returns how many were marked.
    pub async fn mark_outputs_deleted(&self, ids: &[i64], at: f64) -> Result<u64> {
        let _touch = self.touch();
        let ids = ids.to_vec();
        self.write(move |c| {
            let mut st = c.prepare_cached(
                "UPDATE builds SET output_deleted_at = ?, archive_name = NULL \
                 WHERE id = ? AND status NOT IN ('pending', 'running') \
                 AND output_deleted_at IS NULL",
            )?;
            let mut n = 0;
            for id in ids {
                n += st.execute(params![at, id])? as u64;
            }
            Ok(n)
        })
        .await
    }

    pub async fn mark_output_deleted(&self, id: i64, at: f64) -> Result<()> {
        let _touch = self.touch();
        self.write(move |c| {
            c.prepare_cached(
                "UPDATE builds SET output_deleted_at = ?, archive_name = NULL WHERE id = ?",
            )?
            .execute(params![at, id])?;
            Ok(())
        })
        .await
    }

    pub async fn project_info(&self, name: &str) -> Result<Option<ProjectInfo>> {
        let name = name.to_owned();
        self.read_now(move |c| {
            Ok(c.prepare_cached("SELECT * FROM projects WHERE name = ?")?
                .query_row([&name], ProjectInfo::from_row)
                .optional()?)
        })
        .await
    }

    /// Ends pending builds as SKIP, each with its reason, in one transaction. The write is
    /// queued at the call, so the caller may go on and await the result later (see
    /// [`Store::write_queued`]); it still comes before the caller's later writes.
    pub fn skip_builds(
        &self,
        skipped: &[(i64, String)],
        at: f64,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let skipped = skipped.to_vec();
        self.write_queued(move |c| {
            let mut st = c.prepare_cached(
                "UPDATE builds SET status = 'skip', reason = ?, finished_at = ? \
                 WHERE id = ? AND status = 'pending'",
            )?;
            for (id, reason) in skipped {
                st.execute(params![reason, at, id])?;
            }
            Ok(())
        })
    }

    /// How many times build `id`'s work has run: 1, plus one for each build it retries
    /// (following `retry_of` back to the first).
    pub async fn attempts(&self, id: i64) -> Result<i64> {
        self.read_now(move |c| {
            Ok(c.prepare_cached(
                "WITH RECURSIVE chain(id, retry_of, n) AS ( \
                   SELECT id, retry_of, 1 FROM builds WHERE id = ? \
                   UNION ALL \
                   SELECT b.id, b.retry_of, chain.n + 1 FROM builds b \
                     JOIN chain ON b.id = chain.retry_of WHERE chain.n < 1000) \
                 SELECT COALESCE(MAX(n), 0) FROM chain",
            )?
            .query_row([id], |r| r.get(0))?)
        })
        .await
    }

    /// The status of the newest finished PASS/FAIL/WARN build of the same project and branch
    /// before build `b` (for build-fixed).
    pub async fn previous_status(&self, b: &BuildRecord) -> Result<Option<BuildStatus>> {
        let (project, branch, id) = (b.project.clone(), b.branch.clone(), b.id);
        self.read(move |c| {
            let s: Option<String> = c
                .prepare_cached(
                    "SELECT status FROM builds WHERE project = ? AND branch IS ? AND id < ? \
                     AND status IN ('pass', 'fail', 'warn') ORDER BY id DESC LIMIT 1",
                )?
                .query_row(params![project, branch, id], |r| r.get(0))
                .optional()?;
            Ok(s.and_then(|s| BuildStatus::from_str(&s).ok()))
        })
        .await
    }
}
