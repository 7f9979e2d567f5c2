//! SQLite state through sqlx: projects' info, build records and the persistent queue (the
//! builds whose status is pending or running). This is the only crate that contains SQL.

use ams_core::access::Grant;
use ams_core::status::BuildStatus;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", describe(.0))]
    Db(#[source] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if matches!(primary_code(&e), 8 | 10 | 11 | 14 | 26) {
            file_errors::seen();
        }
        StoreError::Db(e)
    }
}

/// SQLite's primary result code of an error (the low byte of the extended code), 0 if none.
fn primary_code(e: &sqlx::Error) -> i32 {
    e.as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i32>().ok())
        .unwrap_or(0)
        & 0xff
}

/// When an error about the database file itself (read-only, I/O, cannot open, damaged) was
/// last seen. A connection opened before it may hold the file in a state that no longer
/// holds (SQLite opens a file it may not write read-only, for good): it is closed when it next
/// goes back to the pool, and its replacement opens the file afresh, so the host takes writes
/// again by itself once the file is writable. Per process: a host has one database.
mod file_errors {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    fn start() -> Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    /// Milliseconds after [`start`], plus one (0: never).
    static LAST: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn seen() {
        let ms = start().elapsed().as_millis() as u64 + 1;
        LAST.fetch_max(ms, Ordering::SeqCst);
    }

    /// Whether a connection of this age was open when the last file error was seen.
    pub(crate) fn predates_last(age: Duration) -> bool {
        match LAST.load(Ordering::SeqCst) {
            0 => false,
            ms => {
                let since = start()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1));
                age >= since
            }
        }
    }
}

/// Every message of an error that says the database cannot be used now (a full disk, a
/// read-only or failing file, a lock held elsewhere) starts with this, whatever the caller
/// puts before it: an edge answers such an error 503 (try again later), not as a refusal.
pub const UNAVAILABLE: &str = "the database is unavailable: ";

/// Whether an error message (as [`StoreError`] displays it, perhaps with context before it)
/// says the database is unavailable rather than that the request was wrong.
pub fn is_unavailable(message: &str) -> bool {
    message.contains(UNAVAILABLE)
}

impl StoreError {
    /// See [`UNAVAILABLE`].
    pub fn is_unavailable(&self) -> bool {
        is_unavailable(&self.to_string())
    }
}

/// An error as a person can act on it: the cause in words, then what to do.
fn describe(e: &sqlx::Error) -> String {
    let Some(db) = e.as_database_error() else {
        return match e {
            sqlx::Error::Io(io) => format!(
                "{UNAVAILABLE}cannot reach the database file ({io}); check the data directory"
            ),
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                format!("{UNAVAILABLE}{e}; try again")
            }
            other => format!("database: {other}"),
        };
    };
    let said = db.message();
    match primary_code(e) {
        13 => format!(
            "{UNAVAILABLE}the disk holding the data directory is full ({said}); free space \
             there and try again"
        ),
        8 => format!(
            "{UNAVAILABLE}the database is read-only ({said}); make the data directory and \
             ams.db writable by the host and try again"
        ),
        10 => format!(
            "{UNAVAILABLE}the database file could not be read or written ({said}); check the \
             disk holding the data directory"
        ),
        5 | 6 => format!(
            "{UNAVAILABLE}the database is locked by another connection or process ({said}); \
             try again"
        ),
        14 => format!(
            "{UNAVAILABLE}the database file cannot be opened ({said}); check that the data \
             directory exists and is writable"
        ),
        11 | 26 => format!(
            "{UNAVAILABLE}the database file is damaged ({said}); restore ams.db from a backup"
        ),
        _ => format!("database: {said}"),
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    pub params: std::collections::BTreeMap<String, String>,
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
    pub params: std::collections::BTreeMap<String, String>,
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

/// A webhook delivery as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: i64,
    /// The sender's id (`X-GitHub-Delivery`, `X-Request-UUID`, `X-Request-Id`).
    pub delivery_id: Option<String>,
    pub project: String,
    pub webhook: String,
    pub received_at: f64,
    pub sender: String,
    pub event: String,
    /// accepted, ignored, ping, refused or duplicate.
    pub verdict: String,
    pub reason: Option<String>,
    /// Names of the builds it queued.
    pub builds: Vec<String>,
    /// Size of the body kept for replay (0: none, or dropped with age).
    #[serde(default)]
    pub body_bytes: i64,
}

/// A delivery to record; `headers` (JSON) and `body` are kept for replay.
#[derive(Debug, Clone, Default)]
pub struct NewDelivery {
    pub delivery_id: Option<String>,
    pub project: String,
    pub webhook: String,
    pub received_at: f64,
    pub sender: String,
    pub event: String,
    pub verdict: ams_core::webhooks::Verdict,
    pub reason: Option<String>,
    pub builds: Vec<String>,
    pub headers: String,
    pub body: Vec<u8>,
}

impl NewDelivery {
    /// The body as stored: only a verdict that keeps one (`Verdict::keeps_body`) stores it,
    /// and an empty body is no body.
    fn kept_body(&self) -> Option<&[u8]> {
        (self.verdict.keeps_body() && !self.body.is_empty()).then_some(self.body.as_slice())
    }
}

/// A user of the web interface and API. The password is stored only as its argon2id hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(skip_serializing)]
    pub password_hash: String,
    /// SERVER ADMIN, or a level on each assigned project.
    pub grant: Grant,
    pub created_at: f64,
    pub password_changed_at: f64,
}

/// An API token as listed (its secret is never stored, only its hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: i64,
    pub user: String,
    pub label: String,
    pub created_at: f64,
    pub last_used: Option<f64>,
}

/// A line of a user's message panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub at: f64,
    /// `ok`, `error`, `info`, or a build's final status.
    pub kind: String,
    pub text: String,
    pub project: Option<String>,
    pub build: Option<String>,
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

/// Messages kept per user; older ones are dropped.
pub const MESSAGES_KEPT: i64 = 100;

/// A user row. `projects` may still be in the described system's shape (a list that takes
/// `level`): [`Grant::from_stored`] reads both.
fn row_to_user(r: &SqliteRow) -> Result<User> {
    let projects: String = r.try_get("projects")?;
    Ok(User {
        name: r.try_get("name")?,
        password_hash: r.try_get("password_hash")?,
        grant: Grant::from_stored(r.try_get("level")?, &projects),
        created_at: r.try_get("created_at")?,
        password_changed_at: r.try_get("password_changed_at")?,
    })
}

/// One try to deliver a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: f64,
    /// The HTTP status, or what went wrong (`timeout`, `connect: …`, `refused: …`).
    pub outcome: String,
    pub millis: u64,
}

/// A notification as recorded. The target is only its host: the URL may carry a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub id: i64,
    pub project: String,
    pub build_name: String,
    pub hook: String,
    pub kind: String,
    pub target_host: String,
    pub event: String,
    /// `sent`, or `failed: …`.
    pub outcome: String,
    pub attempts: Vec<Attempt>,
    pub created_at: f64,
    pub finished_at: f64,
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// Unix seconds.
    pub set_at: f64,
    pub set_by: String,
}

/// A secret as stored: its value sealed (see migration 0012); the store never sees it open.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedSecret {
    pub project: String,
    pub name: String,
    /// Which key sealed it (a hash of the key).
    pub key_id: String,
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub sealed: Vec<u8>,
    pub set_at: f64,
    pub set_by: String,
}

/// What a project may hold: checked in the same transaction as the write.
#[derive(Debug, Clone, Copy)]
pub struct SecretLimits {
    pub max_count: usize,
    /// The most bytes of sealed values (each its value plus `overhead`) together.
    pub max_bytes: usize,
    /// Bytes a sealed value has beyond its value (the tag).
    pub overhead: usize,
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

/// What [`backup`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    /// Builds in the copy.
    pub builds: i64,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Writes a consistent copy of the database at `db` to `dest` while other connections (a
/// running host) go on writing: SQLite's `VACUUM INTO` reads one snapshot, in one read
/// transaction, through the WAL. `dest` is created here, mode 0600, and never overwritten: an
/// existing file is an error. The copy is checked (`PRAGMA integrity_check`) before this
/// returns; a failed copy is removed. The database's schema is left as it is (no migration).
pub async fn backup(db: &Path, dest: &Path) -> Result<BackupInfo> {
    use sqlx::{ConnectOptions, Connection};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !db.is_file() {
        return Err(StoreError::Invalid(format!(
            "{}: no database there; check the data directory (--data-dir or AMSBUILD_HOME)",
            db.display()
        )));
    }
    // Created empty first, which VACUUM INTO accepts: nobody else's file is ever replaced, and
    // the copy is the host user's alone from its first byte.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| {
            StoreError::Invalid(if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} already exists; a backup never overwrites a file: name a new one",
                    dest.display()
                )
            } else {
                format!("cannot create {}: {e}", dest.display())
            })
        })?;
    let made = file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", dest.display())));
    drop(file);
    let copied = async {
        made?;
        let mut conn = SqliteConnectOptions::new()
            .filename(db)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(30))
            .connect()
            .await?;
        let dest_text = dest.to_str().ok_or_else(|| {
            StoreError::Invalid(format!("{}: the path is not UTF-8", dest.display()))
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(dest_text)
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let mut copy = SqliteConnectOptions::new()
            .filename(dest)
            .read_only(true)
            .connect()
            .await?;
        let check: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_all(&mut copy)
            .await?;
        if check != ["ok"] {
            return Err(StoreError::Invalid(format!(
                "the copy failed its integrity check: {}",
                check.join("; ")
            )));
        }
        let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
            .fetch_one(&mut copy)
            .await?;
        copy.close().await?;
        let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        Ok(BackupInfo { builds, bytes })
    }
    .await;
    if copied.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    copied
}

/// One delivery of a batch and the builds it asks for.
#[derive(Debug, Clone)]
pub struct DeliveryBatchItem {
    pub delivery: NewDelivery,
    pub builds: Vec<NewBuild>,
}

/// What became of one delivery of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Recorded as accepted; these builds are pending.
    Accepted(Vec<BuildRecord>),
    /// The same delivery id was accepted before (or earlier in the batch): recorded, nothing built.
    Duplicate,
    /// Recorded with the verdict it came with (refused, ignored…); nothing built.
    Recorded,
}

const BUILD_COLS: usize = 10;
const DELIVERY_COLS: usize = 11;

fn placeholders(rows: usize, cols: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(", "));
    vec![row; rows].join(", ")
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Raised after every write to builds (see [`Store::generation`]).
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A page of builds comes back from SQLite as one JSON text (one row), not one row per build:
/// the driver hands rows over one by one between threads, which dominated the API's time.
const BUILDS_AS_JSON: &str =
    "SELECT COALESCE(json_group_array(json_array(%COLS%)), '[]') FROM (%INNER%)";

const BUILD_JSON_ARRAY: &str = "id, project, build_index, name, hash, git_hash, commit_message, status, reason, trigger_kind, branch, commit_req, created_by, created_at, started_at, finished_at, canceled_by, canceled_at, archive_name, archive_hash, archive_hash_kind, output_deleted_at, stages, retry_of, params, tests";

/// One build as [`BUILDS_AS_JSON`] spells it: the values of [`BUILD_JSON_ARRAY`] in order.
#[derive(Deserialize)]
struct BuildJsonRow(
    i64,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    String,
    f64,
    Option<f64>,
    Option<f64>,
    Option<String>,
    Option<f64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// A build's stored parameters (a JSON object, or NULL for none).
fn params_of(text: Option<&str>) -> std::collections::BTreeMap<String, String> {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

fn builds_from_json(text: &str) -> Result<Vec<BuildRecord>> {
    let rows: Vec<BuildJsonRow> =
        serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("build rows: {e}")))?;
    rows.into_iter()
        .map(|r| {
            Ok(BuildRecord {
                id: r.0,
                project: r.1,
                build_index: r.2,
                name: r.3,
                hash: r.4,
                git_hash: r.5,
                commit_message: r.6,
                status: BuildStatus::from_str(&r.7).map_err(StoreError::Invalid)?,
                reason: r.8,
                trigger: r.9,
                branch: r.10,
                commit: r.11,
                created_by: r.12,
                created_at: r.13,
                started_at: r.14,
                finished_at: r.15,
                canceled_by: r.16,
                canceled_at: r.17,
                archive_name: r.18,
                archive_hash: r.19,
                archive_hash_kind: r.20,
                output_deleted_at: r.21,
                stages: serde_json::from_str(&r.22).unwrap_or_default(),
                retry_of: r.23,
                params: params_of(r.24.as_deref()),
                tests: r.25.as_deref().and_then(|t| serde_json::from_str(t).ok()),
            })
        })
        .collect()
}

fn row_to_build(r: &SqliteRow) -> Result<BuildRecord> {
    let status: String = r.try_get("status")?;
    let stages: String = r.try_get("stages")?;
    Ok(BuildRecord {
        id: r.try_get("id")?,
        project: r.try_get("project")?,
        build_index: r.try_get("build_index")?,
        name: r.try_get("name")?,
        hash: r.try_get("hash")?,
        git_hash: r.try_get("git_hash")?,
        commit_message: r.try_get("commit_message")?,
        status: BuildStatus::from_str(&status).map_err(StoreError::Invalid)?,
        reason: r.try_get("reason")?,
        trigger: r.try_get("trigger_kind")?,
        branch: r.try_get("branch")?,
        commit: r.try_get("commit_req")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        canceled_by: r.try_get("canceled_by")?,
        canceled_at: r.try_get("canceled_at")?,
        archive_name: r.try_get("archive_name")?,
        archive_hash: r.try_get("archive_hash")?,
        archive_hash_kind: r.try_get("archive_hash_kind")?,
        output_deleted_at: r.try_get("output_deleted_at")?,
        stages: serde_json::from_str(&stages).unwrap_or_default(),
        retry_of: r.try_get("retry_of")?,
        params: params_of(r.try_get::<Option<String>, _>("params")?.as_deref()),
        tests: r
            .try_get::<Option<String>, _>("tests")?
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
    })
}

/// Raises the generation when the write method holding it returns (after its commit).
struct Touch<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Touch<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether a connection going back to the pool may be used again. One still inside a
/// transaction is closed (SQLite rolls back what it held), and so is one that was open when an
/// error about the file itself was seen (see [`file_errors`]). A fresh connection is opened
/// when one is needed.
///
/// SQLite itself ends the transaction on some errors (a full disk, an I/O error) in a
/// statement or in COMMIT; sqlx's transaction count then stays raised, because the ROLLBACK
/// it sends fails ("no transaction is active"). Reused, such a connection would turn the next
/// BEGIN into a SAVEPOINT whose rollback (ROLLBACK TO) leaves a transaction open, and every
/// later "commit" into the RELEASE of a nested savepoint: writes acknowledged, never stored,
/// and the write lock held for good.
async fn clean(conn: &mut sqlx::SqliteConnection, age: Duration) -> bool {
    use sqlx::Connection;
    // The ROLLBACK a dropped transaction queued runs before the ping returns.
    if conn.ping().await.is_err() {
        return false;
    }
    if conn.is_in_transaction() {
        tracing::warn!("closed a database connection an error left inside a transaction");
        return false;
    }
    if file_errors::predates_last(age) {
        tracing::info!("reopening a database connection after an error about the file");
        return false;
    }
    true
}

impl Store {
    /// Starts a write transaction that holds the write lock from its first statement (waiting
    /// for it up to the busy timeout), so that it never fails half-way on a lock upgrade. A
    /// transaction never nests: sqlx refuses a custom BEGIN inside another.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A counter raised after each committed write to builds. Read it before a query, and the
    /// data the query sees is at least that new: response caches key on it.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn touch(&self) -> Touch<'_> {
        Touch(&self.generation)
    }

    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, 4, false).await
    }

    /// [`Store::open`] with at most `connections` connections, read-only if asked (tests).
    async fn open_with(path: &Path, connections: u32, read_only: bool) -> Result<Store> {
        // Created by us with mode 0600 first: SQLite gives its WAL and SHM files the database
        // file's mode, so none of the three is ever readable by other users.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::Invalid(format!("{}: {e}", path.display()))),
            }
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // A write-ahead log that grew under load is cut back to 64 MiB when it restarts.
            .pragma("journal_size_limit", "67108864")
            .read_only(read_only);
        let pool = SqlitePoolOptions::new()
            .max_connections(connections)
            .min_connections(1)
            .idle_timeout(None)
            .after_release(|conn, meta| Box::pin(async move { Ok(clean(conn, meta.age).await) }))
            .connect_with(opts)
            .await?;
        let store = Store {
            pool,
            generation: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the schema migrations this binary knows and the database has not seen yet,
    /// tracked in SQLite's `user_version`.
    async fn migrate(&self) -> Result<()> {
        const MIGRATIONS: &[&str] = &[
            include_str!("../migrations/0001_builds.sql"),
            include_str!("../migrations/0002_deliveries.sql"),
            include_str!("../migrations/0003_notifications.sql"),
            include_str!("../migrations/0004_users.sql"),
            include_str!("../migrations/0005_messages.sql"),
            include_str!("../migrations/0006_commit_message.sql"),
            include_str!("../migrations/0007_project_levels.sql"),
            include_str!("../migrations/0008_build_names_per_project.sql"),
            include_str!("../migrations/0009_retry_of.sql"),
            include_str!("../migrations/0010_schedule_runs.sql"),
            include_str!("../migrations/0011_builds_by_branch.sql"),
            include_str!("../migrations/0012_secrets.sql"),
            include_str!("../migrations/0013_build_params.sql"),
            include_str!("../migrations/0014_test_reports.sql"),
            include_str!("../migrations/0018_delivery_bodies.sql"),
        ];
        // Read first: a database already up to date opens without a write (read-only too).
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&self.pool)
            .await?;
        if version as usize == MIGRATIONS.len() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Invalid(format!(
                "the database has schema version {version}, newer than this amsbuild knows ({}); \
                 use a newer amsbuild",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a new pending build. `name_of(index)` names it once its index is allocated; the
    /// index and the name are allocated in one transaction.
    pub async fn create_build(
        &self,
        nb: &NewBuild,
        name_of: impl FnOnce(i64) -> std::result::Result<String, String>,
    ) -> Result<BuildRecord> {
        let _touch = self.touch();
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO projects (name) VALUES (?) ON CONFLICT(name) DO NOTHING")
            .bind(&nb.project)
            .execute(&mut *tx)
            .await?;
        let index: i64 = sqlx::query_scalar(
            "UPDATE projects SET latest_build_index = latest_build_index + 1 WHERE name = ? \
             RETURNING latest_build_index",
        )
        .bind(&nb.project)
        .fetch_one(&mut *tx)
        .await?;
        let name = name_of(index).map_err(StoreError::Invalid)?;
        let row = sqlx::query(
            "INSERT INTO builds (project, build_index, name, hash, status, trigger_kind, branch, \
             commit_req, created_by, created_at, retry_of, params) \
             VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(&nb.project)
        .bind(index)
        .bind(&name)
        .bind(&nb.hash)
        .bind(&nb.trigger)
        .bind(&nb.branch)
        .bind(&nb.commit)
        .bind(&nb.created_by)
        .bind(nb.created_at)
        .bind(nb.retry_of)
        .bind(if nb.params.is_empty() {
            None
        } else {
            serde_json::to_string(&nb.params).ok()
        })
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE projects SET latest_build_key = ?, last_created_time = ? WHERE name = ?",
        )
        .bind(&name)
        .bind(nb.created_at)
        .bind(&nb.project)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        row_to_build(&row)
    }

    pub async fn build_by_id(&self, id: i64) -> Result<Option<BuildRecord>> {
        let row = sqlx::query("SELECT * FROM builds WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_build).transpose()
    }

    /// The build of `project` named `name` (names are unique per project).
    pub async fn build_by_name(&self, project: &str, name: &str) -> Result<Option<BuildRecord>> {
        let row = sqlx::query("SELECT * FROM builds WHERE project = ? AND name = ?")
            .bind(project)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_build).transpose()
    }

    /// The build of `project` with index `index` (1 for its first build; unique per project).
    pub async fn build_by_index(&self, project: &str, index: i64) -> Result<Option<BuildRecord>> {
        let row = sqlx::query("SELECT * FROM builds WHERE project = ? AND build_index = ?")
            .bind(project)
            .bind(index)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_build).transpose()
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
        let found = match branch {
            None => self.newest_final(project, None).await?,
            Some(b) => {
                let named = self.newest_final(project, Some(Some(b))).await?;
                let plain = if default_branch {
                    self.newest_final(project, Some(None)).await?
                } else {
                    None
                };
                named.into_iter().chain(plain).max_by_key(|b| b.id)
            }
        };
        Ok(found)
    }

    /// The newest ended build of `project`: any (`None`), of a branch (`Some(Some(b))`), or
    /// of no branch and no commit (`Some(None)`), the last two through the branch index.
    async fn newest_final(
        &self,
        project: &str,
        branch: Option<Option<&str>>,
    ) -> Result<Option<BuildRecord>> {
        let which = match branch {
            None => "WHERE project = ?",
            Some(Some(_)) => "INDEXED BY builds_by_branch WHERE project = ? AND branch = ?",
            Some(None) => {
                "INDEXED BY builds_by_branch WHERE project = ? AND branch IS NULL \
                 AND commit_req IS NULL"
            }
        };
        let sql = format!(
            "SELECT * FROM builds {which} AND status NOT IN ('pending', 'running') \
             ORDER BY id DESC LIMIT 1"
        );
        let mut q = sqlx::query(&sql).bind(project);
        if let Some(Some(b)) = branch {
            q = q.bind(b);
        }
        let row = q.fetch_optional(&self.pool).await?;
        row.as_ref().map(row_to_build).transpose()
    }

    /// Every build named `name`, in any project (at most 16), oldest first: a name alone may
    /// be ambiguous, so the caller picks among the projects it may act on.
    pub async fn builds_named(&self, name: &str) -> Result<Vec<BuildRecord>> {
        let rows = sqlx::query("SELECT * FROM builds WHERE name = ? ORDER BY id LIMIT 16")
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_build).collect()
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
        let mut inner = String::from("SELECT * FROM builds WHERE project = ?");
        for (col, _) in filters {
            if !BUILD_FILTER_COLUMNS.iter().any(|(_, c)| c == col) {
                return Err(StoreError::Invalid(format!("cannot filter on `{col}`")));
            }
            inner.push_str(&format!(
                " AND ({col} = ? OR (? = 'null' AND {col} IS NULL))"
            ));
        }
        inner.push_str(" ORDER BY id DESC LIMIT ? OFFSET ?");
        let sql = BUILDS_AS_JSON
            .replace("%COLS%", BUILD_JSON_ARRAY)
            .replace("%INNER%", &inner);
        let mut q = sqlx::query_scalar::<_, String>(&sql).bind(project);
        for (_, v) in filters {
            q = q.bind(*v).bind(*v);
        }
        let text = q.bind(limit).bind(offset).fetch_one(&self.pool).await?;
        builds_from_json(&text)
    }

    /// The newest build of each branch of `project` (builds that named no branch count as one
    /// branch), newest first, at most `limit`.
    pub async fn latest_per_branch(&self, project: &str, limit: i64) -> Result<Vec<BuildRecord>> {
        let inner =
            "SELECT * FROM builds WHERE id IN (SELECT MAX(id) FROM builds WHERE project = ? \
                     GROUP BY branch) ORDER BY id DESC LIMIT ?";
        let sql = BUILDS_AS_JSON
            .replace("%COLS%", BUILD_JSON_ARRAY)
            .replace("%INNER%", inner);
        let text = sqlx::query_scalar::<_, String>(&sql)
            .bind(project)
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        builds_from_json(&text)
    }

    /// Each project's newest build: project → (build id, name, status), in one query.
    pub async fn latest_builds(&self) -> Result<HashMap<String, (i64, String, String)>> {
        let rows = sqlx::query(
            // Through projects.latest_build_key: one index lookup per project, however many
            // builds there are.
            "SELECT b.project, b.id, b.name, b.status FROM projects p \
             JOIN builds b ON b.project = p.name AND b.name = p.latest_build_key",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("project")?,
                    (r.try_get("id")?, r.try_get("name")?, r.try_get("status")?),
                ))
            })
            .collect()
    }

    /// Pending and running builds in queue order: the persistent queue.
    pub async fn unfinished(&self) -> Result<Vec<BuildRecord>> {
        let rows =
            sqlx::query("SELECT * FROM builds WHERE status IN ('pending', 'running') ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(row_to_build).collect()
    }

    pub async fn mark_running(&self, id: i64, at: f64) -> Result<()> {
        let _touch = self.touch();
        let mut tx = self.begin().await?;
        let project: String = sqlx::query_scalar(
            "UPDATE builds SET status = 'running', started_at = ? WHERE id = ? RETURNING project",
        )
        .bind(at)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE projects SET last_execute_time = ? WHERE name = ?")
            .bind(at)
            .bind(project)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_git_hash(&self, id: i64, git_hash: &str) -> Result<()> {
        let _touch = self.touch();
        sqlx::query("UPDATE builds SET git_hash = ? WHERE id = ?")
            .bind(git_hash)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
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
        let mut tx = self.begin().await?;
        let project: Option<String> = sqlx::query_scalar(
            "UPDATE builds SET status = ?, reason = ?, finished_at = ?, \
             git_hash = COALESCE(?, git_hash), commit_message = COALESCE(?, commit_message), \
             stages = ?, archive_name = ?, archive_hash = ?, \
             archive_hash_kind = ?, tests = ? WHERE id = ? AND status IN ('pending', 'running') \
             RETURNING project",
        )
        .bind(status.as_str())
        .bind(&f.reason)
        .bind(f.finished_at)
        .bind(&f.git_hash)
        .bind(&f.commit_message)
        .bind(serde_json::to_string(&f.stages).unwrap_or_else(|_| "[]".into()))
        .bind(&f.archive_name)
        .bind(&f.archive_hash)
        .bind(&f.archive_hash_kind)
        .bind(
            f.tests
                .as_ref()
                .and_then(|t| serde_json::to_string(&t.totals).ok()),
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let (Some(_), Some(report)) = (&project, &f.tests) {
            sqlx::query("INSERT OR REPLACE INTO test_reports (build_id, report) VALUES (?, ?)")
                .bind(id)
                .bind(serde_json::to_string(report).unwrap_or_else(|_| "{}".into()))
                .execute(&mut *tx)
                .await?;
        }
        if let Some(project) = &project {
            sqlx::query("UPDATE projects SET last_complete_time = ? WHERE name = ?")
                .bind(f.finished_at)
                .bind(project)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(project.is_some())
    }

    /// The test report of a build, when it read any.
    pub async fn test_report(&self, build_id: i64) -> Result<Option<ams_core::junit::TestReport>> {
        let text: Option<String> =
            sqlx::query_scalar("SELECT report FROM test_reports WHERE build_id = ?")
                .bind(build_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Records who canceled a build and when (the status is set by [`Store::finish`]).
    pub async fn set_canceled(&self, id: i64, by: &str, at: f64) -> Result<()> {
        let _touch = self.touch();
        sqlx::query("UPDATE builds SET canceled_by = ?, canceled_at = ? WHERE id = ?")
            .bind(by)
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
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
        let rows = sqlx::query(
            "SELECT *, COALESCE(?2 IS NOT NULL AND newer >= ?2, 0) AS beyond_keep, \
                    COALESCE(?3 IS NOT NULL AND finished_at < ?3, 0) AS too_old \
             FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY id DESC) - 1 AS newer FROM builds \
                   WHERE project = ?1 AND status NOT IN ('pending', 'running')) \
             WHERE output_deleted_at IS NULL AND (beyond_keep OR too_old) \
             ORDER BY id",
        )
        .bind(project)
        .bind(keep.map(i64::from))
        .bind(finished_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Expired {
                    build: row_to_build(r)?,
                    beyond_keep: r.try_get("beyond_keep")?,
                    too_old: r.try_get("too_old")?,
                })
            })
            .collect()
    }

    /// Marks the outputs of final builds deleted, in one transaction (a pending or running
    /// build is never marked). Returns how many were marked.
    pub async fn mark_outputs_deleted(&self, ids: &[i64], at: f64) -> Result<u64> {
        let _touch = self.touch();
        let mut tx = self.begin().await?;
        let mut n = 0;
        for id in ids {
            n += sqlx::query(
                "UPDATE builds SET output_deleted_at = ?, archive_name = NULL \
                 WHERE id = ? AND status NOT IN ('pending', 'running') \
                 AND output_deleted_at IS NULL",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    pub async fn mark_output_deleted(&self, id: i64, at: f64) -> Result<()> {
        let _touch = self.touch();
        sqlx::query("UPDATE builds SET output_deleted_at = ?, archive_name = NULL WHERE id = ?")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn project_info(&self, name: &str) -> Result<Option<ProjectInfo>> {
        let row = sqlx::query("SELECT * FROM projects WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| -> Result<ProjectInfo> {
            Ok(ProjectInfo {
                name: r.try_get("name")?,
                latest_build_index: r.try_get("latest_build_index")?,
                latest_build_key: r.try_get("latest_build_key")?,
                last_created_time: r.try_get("last_created_time")?,
                last_execute_time: r.try_get("last_execute_time")?,
                last_complete_time: r.try_get("last_complete_time")?,
            })
        })
        .transpose()
    }

    /// Records a batch of webhook deliveries and creates their builds, all in one transaction
    /// with a handful of statements whatever the batch size (group commit): duplicates by
    /// delivery id are detected against the database and within the batch, build indexes are
    /// allocated per project, and `name_of(build, index)` names each build.
    pub async fn accept_deliveries(
        &self,
        items: Vec<DeliveryBatchItem>,
        mut name_of: impl FnMut(&NewBuild, i64) -> std::result::Result<String, String>,
    ) -> Result<Vec<DeliveryOutcome>> {
        let _touch = self.touch();
        let mut tx = self.begin().await?;
        // Duplicates: ids accepted before (looked up through the (project, delivery_id)
        // index, one query per project), then repeats inside the batch.
        let mut by_project: HashMap<&str, Vec<&str>> = HashMap::new();
        for i in items
            .iter()
            .filter(|i| i.delivery.verdict == ams_core::webhooks::Verdict::Accepted)
        {
            if let Some(id) = i.delivery.delivery_id.as_deref() {
                by_project
                    .entry(i.delivery.project.as_str())
                    .or_default()
                    .push(id);
            }
        }
        let mut seen: std::collections::HashSet<(String, String)> = Default::default();
        for (project, ids) in by_project {
            for chunk in ids.chunks(500) {
                let sql = format!(
                    "SELECT delivery_id FROM deliveries WHERE project = ? AND delivery_id IN ({}) \
                     AND verdict = 'accepted'",
                    vec!["?"; chunk.len()].join(", ")
                );
                let mut q = sqlx::query_scalar::<_, String>(&sql).bind(project);
                for id in chunk {
                    q = q.bind(*id);
                }
                for id in q.fetch_all(&mut *tx).await? {
                    seen.insert((project.to_string(), id));
                }
            }
        }
        let mut outcomes = Vec::with_capacity(items.len());
        let mut deliveries: Vec<NewDelivery> = Vec::with_capacity(items.len());
        let mut wanted: Vec<(usize, NewBuild)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let mut d = item.delivery;
            if d.verdict == ams_core::webhooks::Verdict::Accepted {
                if let Some(id) = &d.delivery_id {
                    if !seen.insert((d.project.clone(), id.clone())) {
                        d.verdict = ams_core::webhooks::Verdict::Duplicate;
                        d.reason = Some("this delivery id was accepted before".into());
                        d.body.clear();
                        outcomes.push(DeliveryOutcome::Duplicate);
                        deliveries.push(d);
                        continue;
                    }
                }
                outcomes.push(DeliveryOutcome::Accepted(Vec::new()));
                wanted.extend(item.builds.into_iter().map(|b| (i, b)));
            } else {
                outcomes.push(DeliveryOutcome::Recorded);
            }
            deliveries.push(d);
        }

        // Allocate indexes per project, then name the builds.
        let mut next: HashMap<String, i64> = HashMap::new();
        for (_, b) in &wanted {
            if !next.contains_key(&b.project) {
                let latest: i64 = sqlx::query_scalar(
                    "INSERT INTO projects (name) VALUES (?) ON CONFLICT(name) DO UPDATE SET \
                     name = excluded.name RETURNING latest_build_index",
                )
                .bind(&b.project)
                .fetch_one(&mut *tx)
                .await?;
                next.insert(b.project.clone(), latest);
            }
        }
        let mut rows: Vec<(usize, NewBuild, i64, String)> = Vec::with_capacity(wanted.len());
        let mut last: HashMap<String, (i64, String, f64)> = HashMap::new();
        for (i, b) in wanted {
            let Some(n) = next.get_mut(&b.project) else {
                continue;
            };
            let index = *n + 1;
            let name = match name_of(&b, index) {
                Ok(name) => name,
                Err(e) => {
                    let d = &mut deliveries[i];
                    d.reason = Some(e);
                    continue;
                }
            };
            *n = index;
            last.insert(b.project.clone(), (index, name.clone(), b.created_at));
            rows.push((i, b, index, name));
        }
        let mut created: HashMap<String, BuildRecord> = HashMap::new();
        for chunk in rows.chunks(50) {
            let sql = format!(
                "INSERT INTO builds (project, build_index, name, hash, status, trigger_kind, \
                 branch, commit_req, created_by, created_at) VALUES {} RETURNING *",
                placeholders(chunk.len(), BUILD_COLS)
            );
            let mut q = sqlx::query(&sql);
            for (_, b, index, name) in chunk {
                q = q
                    .bind(&b.project)
                    .bind(*index)
                    .bind(name)
                    .bind(&b.hash)
                    .bind("pending")
                    .bind(&b.trigger)
                    .bind(&b.branch)
                    .bind(&b.commit)
                    .bind(&b.created_by)
                    .bind(b.created_at);
            }
            for r in q.fetch_all(&mut *tx).await? {
                let rec = row_to_build(&r)?;
                created.insert(rec.name.clone(), rec);
            }
        }
        for (project, (index, key, at)) in &last {
            sqlx::query(
                "UPDATE projects SET latest_build_index = ?, latest_build_key = ?, \
                 last_created_time = ? WHERE name = ?",
            )
            .bind(index)
            .bind(key)
            .bind(at)
            .bind(project)
            .execute(&mut *tx)
            .await?;
        }
        for (i, _, _, name) in &rows {
            if let Some(rec) = created.remove(name) {
                deliveries[*i].builds.push(rec.name.clone());
                if let DeliveryOutcome::Accepted(list) = &mut outcomes[*i] {
                    list.push(rec);
                }
            }
        }
        for chunk in deliveries.chunks(50) {
            let sql = format!(
                "INSERT INTO deliveries (delivery_id, project, webhook, received_at, sender, \
                 event, verdict, reason, builds, headers, body) VALUES {}",
                placeholders(chunk.len(), DELIVERY_COLS)
            );
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q
                    .bind(&d.delivery_id)
                    .bind(&d.project)
                    .bind(&d.webhook)
                    .bind(d.received_at)
                    .bind(&d.sender)
                    .bind(&d.event)
                    .bind(d.verdict.as_str())
                    .bind(&d.reason)
                    .bind(serde_json::to_string(&d.builds).unwrap_or_else(|_| "[]".into()))
                    .bind(&d.headers)
                    .bind(d.kept_body());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Ends pending builds as SKIP, each with its reason, in one statement.
    pub async fn skip_builds(&self, skipped: &[(i64, String)], at: f64) -> Result<()> {
        let _touch = self.touch();
        let mut tx = self.begin().await?;
        for chunk in skipped.chunks(200) {
            let sql = format!(
                "UPDATE builds SET status = 'skip', reason = v.column2, finished_at = ? \
                 FROM (VALUES {}) AS v WHERE builds.id = v.column1 AND builds.status = 'pending'",
                placeholders(chunk.len(), 2)
            );
            let mut q = sqlx::query(&sql).bind(at);
            for (id, reason) in chunk {
                q = q.bind(id).bind(reason);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether a delivery with this id was already accepted for the project.
    pub async fn delivery_accepted(&self, project: &str, delivery_id: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE project = ? AND delivery_id = ? \
             AND verdict = 'accepted'",
        )
        .bind(project)
        .bind(delivery_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    pub async fn record_delivery(&self, d: &NewDelivery) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO deliveries (delivery_id, project, webhook, received_at, sender, event, \
             verdict, reason, builds, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING id",
        )
        .bind(&d.delivery_id)
        .bind(&d.project)
        .bind(&d.webhook)
        .bind(d.received_at)
        .bind(&d.sender)
        .bind(&d.event)
        .bind(d.verdict.as_str())
        .bind(&d.reason)
        .bind(serde_json::to_string(&d.builds).unwrap_or_else(|_| "[]".into()))
        .bind(&d.headers)
        .bind(d.kept_body())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn record_notification(&self, n: &Notification) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO notifications (project, build_name, hook, kind, target_host, event, \
             outcome, attempts, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING id",
        )
        .bind(&n.project)
        .bind(&n.build_name)
        .bind(&n.hook)
        .bind(&n.kind)
        .bind(&n.target_host)
        .bind(&n.event)
        .bind(&n.outcome)
        .bind(serde_json::to_string(&n.attempts).unwrap_or_else(|_| "[]".into()))
        .bind(n.created_at)
        .bind(n.finished_at)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// A project's notifications, newest first.
    pub async fn notifications_of(&self, project: &str, limit: i64) -> Result<Vec<Notification>> {
        let rows =
            sqlx::query("SELECT * FROM notifications WHERE project = ? ORDER BY id DESC LIMIT ?")
                .bind(project)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let attempts: String = r.try_get("attempts")?;
                Ok(Notification {
                    id: r.try_get("id")?,
                    project: r.try_get("project")?,
                    build_name: r.try_get("build_name")?,
                    hook: r.try_get("hook")?,
                    kind: r.try_get("kind")?,
                    target_host: r.try_get("target_host")?,
                    event: r.try_get("event")?,
                    outcome: r.try_get("outcome")?,
                    attempts: serde_json::from_str(&attempts).unwrap_or_default(),
                    created_at: r.try_get("created_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect()
    }

    /// The status of the newest finished PASS/FAIL/WARN build of the same project and branch
    /// before build `id` (for build-fixed).
    /// The slot a schedule last fired for (or was first seen at), unix seconds.
    pub async fn schedule_slot(
        &self,
        project: &str,
        cron: &str,
        branch: &str,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT last_slot FROM schedule_runs WHERE project = ? AND cron = ? AND branch = ?",
        )
        .bind(project)
        .bind(cron)
        .bind(branch)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Remembers the slot a schedule fired for (or was first seen at).
    pub async fn set_schedule_slot(
        &self,
        project: &str,
        cron: &str,
        branch: &str,
        slot: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO schedule_runs (project, cron, branch, last_slot) VALUES (?, ?, ?, ?) \
             ON CONFLICT(project, cron, branch) DO UPDATE SET last_slot = excluded.last_slot",
        )
        .bind(project)
        .bind(cron)
        .bind(branch)
        .bind(slot)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many times build `id`'s work has run: 1, plus one for each build it retries
    /// (following `retry_of` back to the first).
    pub async fn attempts(&self, id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "WITH RECURSIVE chain(id, retry_of, n) AS ( \
               SELECT id, retry_of, 1 FROM builds WHERE id = ? \
               UNION ALL \
               SELECT b.id, b.retry_of, chain.n + 1 FROM builds b \
                 JOIN chain ON b.id = chain.retry_of WHERE chain.n < 1000) \
             SELECT COALESCE(MAX(n), 0) FROM chain",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn previous_status(&self, b: &BuildRecord) -> Result<Option<BuildStatus>> {
        let s: Option<String> = sqlx::query_scalar(
            "SELECT status FROM builds WHERE project = ? AND branch IS ? AND id < ? \
             AND status IN ('pass', 'fail', 'warn') ORDER BY id DESC LIMIT 1",
        )
        .bind(&b.project)
        .bind(&b.branch)
        .bind(b.id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(s.and_then(|s| BuildStatus::from_str(&s).ok()))
    }

    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Creates a user; fails when the name is taken.
    pub async fn create_user(&self, u: &User) -> Result<()> {
        let (level, projects) = u.grant.to_stored();
        sqlx::query(
            "INSERT INTO users (name, password_hash, level, projects, created_at, \
             password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&u.name)
        .bind(&u.password_hash)
        .bind(level as i64)
        .bind(projects)
        .bind(u.created_at)
        .bind(u.password_changed_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Invalid(format!("user `{}` already exists", u.name))
            }
            other => StoreError::Db(other),
        })?;
        Ok(())
    }

    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT * FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_user).transpose()
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_user).collect()
    }

    /// Sets a new password hash, ends every session of the user and revokes its API tokens:
    /// whoever knew the old password may have made one.
    pub async fn set_password(&self, name: &str, hash: &str, at: f64) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE name = ?",
        )
        .bind(hash)
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        for sql in [
            "DELETE FROM sessions WHERE user = ?",
            "DELETE FROM api_tokens WHERE user = ?",
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The stored grant of a user, as its raw columns (for compare-and-set).
    async fn raw_grant(&self, name: &str) -> Result<Option<(i64, String)>> {
        Ok(
            sqlx::query_as("SELECT level, projects FROM users WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Changes a user's grant to `f(current)`, where `current` is read in the same
    /// compare-and-set: two managers changing the same user at once each see the other's
    /// change, so neither undoes an entry it may not touch. `Ok(None)` when there is no such
    /// user; `f`'s refusal comes back as [`StoreError::Invalid`].
    pub async fn update_grant(
        &self,
        name: &str,
        f: impl Fn(&Grant) -> std::result::Result<Grant, String>,
    ) -> Result<Option<Grant>> {
        for _ in 0..16 {
            let Some((level, projects)) = self.raw_grant(name).await? else {
                return Ok(None);
            };
            let new = f(&Grant::from_stored(level, &projects)).map_err(StoreError::Invalid)?;
            let (new_level, new_projects) = new.to_stored();
            let n = sqlx::query(
                "UPDATE users SET level = ?, projects = ? \
                 WHERE name = ? AND level = ? AND projects = ?",
            )
            .bind(new_level as i64)
            .bind(new_projects)
            .bind(name)
            .bind(level)
            .bind(&projects)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n == 1 {
                return Ok(Some(new));
            }
        }
        Err(StoreError::Invalid(format!(
            "the user `{name}` keeps changing; try again"
        )))
    }

    /// Removes a user with its sessions and tokens when `allowed(current grant)` says so, in
    /// the same compare-and-set as [`Store::update_grant`]. `Ok(false)` when there is no such
    /// user; the refusal comes back as [`StoreError::Invalid`].
    pub async fn remove_user_if(
        &self,
        name: &str,
        allowed: impl Fn(&Grant) -> std::result::Result<(), String>,
    ) -> Result<bool> {
        for _ in 0..16 {
            let Some((level, projects)) = self.raw_grant(name).await? else {
                return Ok(false);
            };
            allowed(&Grant::from_stored(level, &projects)).map_err(StoreError::Invalid)?;
            let mut tx = self.begin().await?;
            let n = sqlx::query("DELETE FROM users WHERE name = ? AND level = ? AND projects = ?")
                .bind(name)
                .bind(level)
                .bind(&projects)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 1 {
                for sql in [
                    "DELETE FROM sessions WHERE user = ?",
                    "DELETE FROM api_tokens WHERE user = ?",
                ] {
                    sqlx::query(sql).bind(name).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                return Ok(true);
            }
        }
        Err(StoreError::Invalid(format!(
            "the user `{name}` keeps changing; try again"
        )))
    }

    /// Removes a user with its sessions and tokens.
    pub async fn remove_user(&self, name: &str) -> Result<bool> {
        self.remove_user_if(name, |_| Ok(())).await
    }

    /// Opens a session for a user whose password was just checked against `password_hash`.
    /// The insert happens only if that is still the user's password, in the same statement:
    /// a password changed while the check ran (which ends every session) leaves nothing
    /// behind. Returns whether the session was made.
    pub async fn create_session(
        &self,
        id_hash: &str,
        user: &str,
        csrf: &str,
        at: f64,
        password_hash: &str,
    ) -> Result<bool> {
        let n = sqlx::query(
            "INSERT INTO sessions (id_hash, user, csrf, created_at, last_seen) \
             SELECT ?, ?, ?, ?, ? WHERE EXISTS \
             (SELECT 1 FROM users WHERE name = ? AND password_hash = ?)",
        )
        .bind(id_hash)
        .bind(user)
        .bind(csrf)
        .bind(at)
        .bind(at)
        .bind(user)
        .bind(password_hash)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// A live session: ends it (and answers `None`) when idle or too old, else marks it used.
    /// Returns the user and the session's CSRF token.
    pub async fn session(
        &self,
        id_hash: &str,
        now: f64,
        idle_secs: f64,
        max_secs: f64,
    ) -> Result<Option<(User, String)>> {
        let row = sqlx::query(
            "SELECT u.*, s.csrf AS s_csrf, s.created_at AS s_created, s.last_seen AS s_last \
             FROM sessions s JOIN users u ON u.name = s.user WHERE s.id_hash = ?",
        )
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let created: f64 = r.try_get("s_created")?;
        let last: f64 = r.try_get("s_last")?;
        if now - last > idle_secs || now - created > max_secs {
            self.end_session(id_hash).await?;
            return Ok(None);
        }
        // Use is recorded coarsely (a quarter of the idle limit, at most 30 s), so browsing and
        // live streams do not write on every request; idle expiry is late by that much at most.
        if now - last >= (idle_secs / 4.0).min(30.0) {
            sqlx::query("UPDATE sessions SET last_seen = ? WHERE id_hash = ?")
                .bind(now)
                .bind(id_hash)
                .execute(&self.pool)
                .await?;
        }
        let csrf: String = r.try_get("s_csrf")?;
        Ok(Some((row_to_user(&r)?, csrf)))
    }

    pub async fn end_session(&self, id_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = ?")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores a new API token by its hash.
    /// Stores an API token. With `password_hash` (a token made on the web after checking
    /// the current password), only if that is still the user's password, in the same
    /// statement, so a password change racing the check revokes it too. `None` when the
    /// password changed meanwhile.
    pub async fn create_token(
        &self,
        user: &str,
        label: &str,
        token_hash: &str,
        at: f64,
        password_hash: Option<&str>,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "INSERT INTO api_tokens (token_hash, user, label, created_at) \
             SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM users WHERE name = ? \
             AND (? IS NULL OR password_hash = ?)) RETURNING id",
        )
        .bind(token_hash)
        .bind(user)
        .bind(label)
        .bind(at)
        .bind(user)
        .bind(password_hash)
        .bind(password_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The user a token hash belongs to, noting its use.
    /// The user of an API token. One read per request; `last_used` is written at most once a
    /// minute per token, so a busy script does not turn every request into a write.
    pub async fn token_user(&self, token_hash: &str, at: f64) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.*, t.id AS token_id, t.last_used AS token_last_used FROM api_tokens t \
             JOIN users u ON u.name = t.user WHERE t.token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let last: Option<f64> = r.try_get("token_last_used")?;
        if last.is_none_or(|l| at - l >= 60.0) {
            let id: i64 = r.try_get("token_id")?;
            sqlx::query("UPDATE api_tokens SET last_used = ? WHERE id = ?")
                .bind(at)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(row_to_user(&r)?))
    }

    pub async fn tokens_of(&self, user: &str) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT * FROM api_tokens WHERE user = ? ORDER BY id")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiToken {
                    id: r.try_get("id")?,
                    user: r.try_get("user")?,
                    label: r.try_get("label")?,
                    created_at: r.try_get("created_at")?,
                    last_used: r.try_get("last_used")?,
                })
            })
            .collect()
    }

    pub async fn revoke_token(&self, user: &str, id: i64) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM api_tokens WHERE user = ? AND id = ?")
                .bind(user)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    /// Adds a message to a user's panel (and drops the oldest beyond [`MESSAGES_KEPT`]).
    pub async fn add_message(
        &self,
        user: &str,
        kind: &str,
        text: &str,
        project: Option<&str>,
        build: Option<&str>,
        at: f64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO messages (user, at, kind, text, project, build) \
             SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM users WHERE name = ?)",
        )
        .bind(user)
        .bind(at)
        .bind(kind)
        .bind(text)
        .bind(project)
        .bind(build)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM messages WHERE user = ? AND id <= (SELECT id FROM messages \
             WHERE user = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
        )
        .bind(user)
        .bind(user)
        .bind(MESSAGES_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A user's messages, newest first.
    pub async fn messages_of(&self, user: &str, limit: i64) -> Result<Vec<Message>> {
        let rows = sqlx::query("SELECT * FROM messages WHERE user = ? ORDER BY id DESC LIMIT ?")
            .bind(user)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Message {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    text: r.try_get("text")?,
                    project: r.try_get("project")?,
                    build: r.try_get("build")?,
                })
            })
            .collect()
    }

    /// Empties a user's message panel.
    pub async fn clear_messages(&self, user: &str) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM messages WHERE user = ?")
            .bind(user)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// A recorded delivery with the headers (JSON) and body kept for replay.
    pub async fn delivery_payload(&self, id: i64) -> Result<Option<(Delivery, String, Vec<u8>)>> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let builds: String = r.try_get("builds")?;
        let d = Delivery {
            id: r.try_get("id")?,
            delivery_id: r.try_get("delivery_id")?,
            project: r.try_get("project")?,
            webhook: r.try_get("webhook")?,
            received_at: r.try_get("received_at")?,
            sender: r.try_get("sender")?,
            event: r.try_get("event")?,
            verdict: r.try_get("verdict")?,
            reason: r.try_get("reason")?,
            builds: serde_json::from_str(&builds).unwrap_or_default(),
            body_bytes: 0,
        };
        let headers: String = r.try_get("headers")?;
        let body: Option<Vec<u8>> = r.try_get("body")?;
        let body = body.unwrap_or_default();
        Ok(Some((
            Delivery {
                body_bytes: body.len() as i64,
                ..d
            },
            headers,
            body,
        )))
    }

    /// A project's deliveries, newest first.
    pub async fn deliveries_of(&self, project: &str, limit: i64) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "SELECT id, delivery_id, project, webhook, received_at, sender, event, verdict, \
             reason, builds, coalesce(length(body), 0) AS body_bytes FROM deliveries \
             WHERE project = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(project)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let builds: String = r.try_get("builds")?;
                Ok(Delivery {
                    id: r.try_get("id")?,
                    delivery_id: r.try_get("delivery_id")?,
                    project: r.try_get("project")?,
                    webhook: r.try_get("webhook")?,
                    received_at: r.try_get("received_at")?,
                    sender: r.try_get("sender")?,
                    event: r.try_get("event")?,
                    verdict: r.try_get("verdict")?,
                    reason: r.try_get("reason")?,
                    builds: serde_json::from_str(&builds).unwrap_or_default(),
                    body_bytes: r.try_get("body_bytes")?,
                })
            })
            .collect()
    }

    /// Drops the bodies of deliveries received before `before` (seconds since the epoch), a
    /// thousand rows a statement so that no write waits long behind it. Returns how many.
    pub async fn drop_delivery_bodies(&self, before: f64) -> Result<u64> {
        let mut dropped = 0;
        loop {
            let n = sqlx::query(
                "UPDATE deliveries SET body = NULL WHERE id IN (SELECT id FROM deliveries \
                 INDEXED BY deliveries_with_body WHERE body IS NOT NULL AND received_at < ? \
                 LIMIT 1000)",
            )
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected();
            dropped += n;
            if n < 1000 {
                return Ok(dropped);
            }
        }
    }

    /// Copies the write-ahead log into the database (never waiting); when the log holds more
    /// than `max_frames` pages, checkpoints it whole and truncates the file. Returns the log's
    /// pages before.
    pub async fn checkpoint(&self, max_frames: i64) -> Result<i64> {
        let (_, log, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.pool)
            .await?;
        if log > max_frames {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        Ok(log)
    }

    /// Stores a secret (replacing one of the same name) if the project stays within `limits`,
    /// counted in the same transaction; otherwise `Invalid` with the reason.
    pub async fn put_secret(&self, s: &SealedSecret, limits: SecretLimits) -> Result<()> {
        let mut tx = self.begin().await?;
        let (count, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(length(sealed)), 0) FROM secrets \
             WHERE project = ? AND name != ?",
        )
        .bind(&s.project)
        .bind(&s.name)
        .fetch_one(&mut *tx)
        .await?;
        if count as usize >= limits.max_count {
            return Err(StoreError::Invalid(format!(
                "project `{}` holds {count} secrets, the most a project may; remove one first",
                s.project
            )));
        }
        let value_bytes = |sealed: usize, n: usize| sealed.saturating_sub(n * limits.overhead);
        let total = value_bytes(bytes as usize, count as usize) + value_bytes(s.sealed.len(), 1);
        let max = limits.max_bytes;
        if total > max {
            return Err(StoreError::Invalid(format!(
                "the secrets of project `{}` would hold {total} bytes of values together, over \
                 the limit of {max}; remove or shorten some first",
                s.project
            )));
        }
        sqlx::query(
            "INSERT INTO secrets (project, name, key_id, nonce, sealed, set_at, set_by) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(project, name) DO UPDATE SET \
             key_id = excluded.key_id, nonce = excluded.nonce, sealed = excluded.sealed, \
             set_at = excluded.set_at, set_by = excluded.set_by",
        )
        .bind(&s.project)
        .bind(&s.name)
        .bind(&s.key_id)
        .bind(&s.nonce)
        .bind(&s.sealed)
        .bind(s.set_at)
        .bind(&s.set_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A project's secrets, by name: names, when and by whom, never values.
    pub async fn secrets_of(&self, project: &str) -> Result<Vec<SecretInfo>> {
        let rows =
            sqlx::query("SELECT name, set_at, set_by FROM secrets WHERE project = ? ORDER BY name")
                .bind(project)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(SecretInfo {
                    name: r.try_get("name")?,
                    set_at: r.try_get("set_at")?,
                    set_by: r.try_get("set_by")?,
                })
            })
            .collect()
    }

    /// A project's secrets as stored (sealed), by name.
    pub async fn sealed_secrets(&self, project: &str) -> Result<Vec<SealedSecret>> {
        let rows = sqlx::query("SELECT * FROM secrets WHERE project = ? ORDER BY name")
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SealedSecret {
                    project: r.try_get("project")?,
                    name: r.try_get("name")?,
                    key_id: r.try_get("key_id")?,
                    nonce: r.try_get("nonce")?,
                    sealed: r.try_get("sealed")?,
                    set_at: r.try_get("set_at")?,
                    set_by: r.try_get("set_by")?,
                })
            })
            .collect()
    }

    /// Removes a secret; whether it existed.
    pub async fn remove_secret(&self, project: &str, name: &str) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM secrets WHERE project = ? AND name = ?")
                .bind(project)
                .bind(name)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    /// How many secrets are stored, in every project.
    pub async fn secret_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM secrets")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nb(project: &str) -> NewBuild {
        NewBuild {
            project: project.into(),
            hash: "h".repeat(40),
            trigger: "cli".into(),
            branch: Some("main".into()),
            commit: None,
            created_by: "alice".into(),
            created_at: 1000.0,
            retry_of: None,
            params: Default::default(),
        }
    }

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            password_hash: "x".into(),
            grant: Grant::uniform(4, &["p".into()]),
            created_at: 1.0,
            password_changed_at: 1.0,
        }
    }

    #[tokio::test]
    async fn secrets_are_listed_by_name_and_kept_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let limits = SecretLimits {
            max_count: 2,
            max_bytes: 40,
            overhead: 16,
        };
        let sealed = |name: &str, len: usize| SealedSecret {
            project: "p".into(),
            name: name.into(),
            key_id: "k".into(),
            nonce: vec![1; 24],
            sealed: vec![7; len + 16],
            set_at: 5.0,
            set_by: "alice".into(),
        };
        s.put_secret(&sealed("A", 10), limits).await.unwrap();
        s.put_secret(&sealed("B", 30), limits).await.unwrap();
        // Replacing counts the new value, not the old one.
        s.put_secret(&sealed("B", 30), limits).await.unwrap();
        let e = s.put_secret(&sealed("C", 1), limits).await.unwrap_err();
        assert!(e.to_string().contains("holds 2 secrets"), "{e}");
        let e = s.put_secret(&sealed("B", 31), limits).await.unwrap_err();
        assert!(e.to_string().contains("41 bytes"), "{e}");
        let list = s.secrets_of("p").await.unwrap();
        assert_eq!(
            list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(list[0].set_by, "alice");
        assert!(s.secrets_of("q").await.unwrap().is_empty());
        assert_eq!(s.sealed_secrets("p").await.unwrap()[1], sealed("B", 30));
        assert_eq!(s.secret_count().await.unwrap(), 2);
        assert!(s.remove_secret("p", "A").await.unwrap());
        assert!(!s.remove_secret("p", "A").await.unwrap());
        assert_eq!(s.secret_count().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn attempts_follow_the_retry_chain_and_survive_in_lists() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let name = |i: i64| Ok(format!("p_{i}"));
        let first = s.create_build(&nb("p"), name).await.unwrap();
        let second = s
            .create_build(
                &NewBuild {
                    retry_of: Some(first.id),
                    ..nb("p")
                },
                name,
            )
            .await
            .unwrap();
        let third = s
            .create_build(
                &NewBuild {
                    retry_of: Some(second.id),
                    ..nb("p")
                },
                name,
            )
            .await
            .unwrap();
        assert_eq!(s.attempts(first.id).await.unwrap(), 1);
        assert_eq!(s.attempts(second.id).await.unwrap(), 2);
        assert_eq!(s.attempts(third.id).await.unwrap(), 3);
        assert_eq!(third.retry_of, Some(second.id));
        let listed = s.builds_of("p", 10, 0).await.unwrap();
        assert_eq!(
            listed[0].retry_of,
            Some(second.id),
            "the JSON list path keeps it"
        );
        assert_eq!(listed[2].retry_of, None);
    }

    #[tokio::test]
    async fn build_names_are_unique_per_project_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        // Project `1` names its builds `{project}{build_index}`; project `b` uses `b…`, but a
        // name format may produce anything: another project's name never blocks a build.
        let a = s.create_build(&nb("a"), |_| Ok("11".into())).await.unwrap();
        let b = s.create_build(&nb("b"), |_| Ok("11".into())).await.unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(s.build_by_name("a", "11").await.unwrap().unwrap().id, a.id);
        assert_eq!(s.build_by_name("b", "11").await.unwrap().unwrap().id, b.id);
        let both: Vec<i64> = s
            .builds_named("11")
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(both, vec![a.id, b.id]);
        // Within one project a name is still unique.
        assert!(s.create_build(&nb("a"), |_| Ok("11".into())).await.is_err());
        let latest = s.latest_builds().await.unwrap();
        assert_eq!(latest["a"].0, a.id);
        assert_eq!(latest["b"].0, b.id);
    }

    #[tokio::test]
    async fn the_latest_final_build_skips_live_ones_and_follows_the_branch() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let make = |branch: &str| {
            let mut b = nb("p");
            b.branch = Some(branch.into());
            b
        };
        let end = |status| Finish {
            status: Some(status),
            finished_at: 2000.0,
            ..Default::default()
        };
        assert!(s
            .latest_final_build("p", None, false)
            .await
            .unwrap()
            .is_none());
        let main_pass = s
            .create_build(&make("main"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        s.finish(main_pass.id, &end(BuildStatus::Pass))
            .await
            .unwrap();
        let dev_fail = s
            .create_build(&make("dev"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        s.finish(dev_fail.id, &end(BuildStatus::Fail))
            .await
            .unwrap();
        // Newer but still pending or running: not what a badge shows.
        let pending = s
            .create_build(&make("main"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let running = s
            .create_build(&make("dev"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        s.mark_running(running.id, 1500.0).await.unwrap();
        let id = |b: Option<BuildRecord>| b.map(|b| b.id);
        assert_eq!(
            id(s.latest_final_build("p", None, false).await.unwrap()),
            Some(dev_fail.id)
        );
        assert_eq!(
            id(s.latest_final_build("p", Some("main"), false)
                .await
                .unwrap()),
            Some(main_pass.id)
        );
        assert_eq!(
            id(s.latest_final_build("p", Some("dev"), false).await.unwrap()),
            Some(dev_fail.id)
        );
        assert_eq!(
            id(s.latest_final_build("p", Some("nope"), false)
                .await
                .unwrap()),
            None
        );
        assert_eq!(
            id(s.latest_final_build("q", None, false).await.unwrap()),
            None
        );
        s.finish(pending.id, &end(BuildStatus::Warn)).await.unwrap();
        assert_eq!(
            id(s.latest_final_build("p", Some("main"), false)
                .await
                .unwrap()),
            Some(pending.id)
        );
    }

    #[tokio::test]
    async fn builds_of_web_and_api_users_leave_a_message_however_they_end() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        s.create_user(&user("alice")).await.unwrap();
        let mut web = nb("p");
        web.trigger = "web".into();
        let a = s
            .create_build(&web, |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let b = s
            .create_build(&web, |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let cli = s
            .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let mut stranger = web.clone();
        stranger.created_by = "nobody".into();
        let d = s
            .create_build(&stranger, |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let fin = Finish {
            status: Some(BuildStatus::Fail),
            reason: Some("stage `s` failed".into()),
            finished_at: 5.0,
            ..Default::default()
        };
        s.finish(a.id, &fin).await.unwrap();
        s.skip_builds(&[(b.id, "superseded".into())], 6.0)
            .await
            .unwrap();
        s.finish(cli.id, &fin).await.unwrap();
        s.finish(d.id, &fin).await.unwrap();
        let m = s.messages_of("alice", 10).await.unwrap();
        let texts: Vec<_> = m.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "Build p_2 ended SKIP: superseded",
                "Build p_1 ended FAIL: stage `s` failed"
            ],
            "CLI builds and unknown users leave nothing"
        );
        assert_eq!(m[1].kind, "fail");
        assert_eq!(m[1].build.as_deref(), Some("p_1"));
        // Kept bounded, newest kept.
        for i in 0..(MESSAGES_KEPT + 10) {
            s.add_message("alice", "ok", &format!("m{i}"), None, None, 7.0)
                .await
                .unwrap();
        }
        let m = s.messages_of("alice", 1000).await.unwrap();
        assert_eq!(m.len() as i64, MESSAGES_KEPT);
        assert_eq!(m[0].text, format!("m{}", MESSAGES_KEPT + 9));
        // Messages to unknown users are dropped; removing a user removes theirs.
        s.add_message("ghost", "ok", "x", None, None, 7.0)
            .await
            .unwrap();
        assert!(s.messages_of("ghost", 10).await.unwrap().is_empty());
        assert_eq!(
            s.clear_messages("alice").await.unwrap() as i64,
            MESSAGES_KEPT
        );
        s.add_message("alice", "ok", "again", None, None, 8.0)
            .await
            .unwrap();
        assert!(s.remove_user("alice").await.unwrap());
        assert!(s.messages_of("alice", 10).await.unwrap().is_empty());
    }

    /// The retention rule: the newest N final builds are kept, older final ones and those
    /// finished before the limit are listed, pending and running builds never (nor do they
    /// count towards N), and builds whose output is already deleted are not listed again.
    #[tokio::test]
    async fn retention_lists_only_final_builds_beyond_the_newest_or_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let new = |p: &'static str| {
            let s = s.clone();
            async move {
                s.create_build(&nb(p), |i| Ok(format!("{p}_{i}")))
                    .await
                    .unwrap()
                    .id
            }
        };
        let done = |at: f64| Finish {
            status: Some(BuildStatus::Pass),
            finished_at: at,
            ..Default::default()
        };
        let b1 = new("p").await;
        s.finish(b1, &done(100.0)).await.unwrap();
        let b2 = new("p").await;
        s.finish(b2, &done(200.0)).await.unwrap();
        s.mark_output_deleted(b2, 300.0).await.unwrap();
        let b3 = new("p").await;
        s.mark_running(b3, 150.0).await.unwrap();
        let b4 = new("p").await;
        s.finish(b4, &done(1000.0)).await.unwrap();
        let b5 = new("p").await; // pending
        let b6 = new("p").await;
        s.finish(b6, &done(1100.0)).await.unwrap();
        let q1 = new("q").await;
        s.finish(q1, &done(1.0)).await.unwrap();

        let listed = |keep: Option<u32>, before: Option<f64>| {
            let s = s.clone();
            async move {
                s.retention_candidates("p", keep, before)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.build.id, e.beyond_keep, e.too_old))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(listed(None, None).await, vec![]);
        // keep 2: b6 and b4 are the newest final builds, although b5 (pending) is newer than
        // b4; b2 counts but is deleted already; b3 and b5 are never listed.
        assert_eq!(listed(Some(2), None).await, vec![(b1, true, false)]);
        assert_eq!(
            listed(Some(1), None).await,
            vec![(b1, true, false), (b4, true, false)]
        );
        assert_eq!(listed(Some(10), None).await, vec![]);
        // Finished before 500: b1 only (b2 is deleted already, b3 is running).
        assert_eq!(listed(None, Some(500.0)).await, vec![(b1, false, true)]);
        assert_eq!(
            listed(None, Some(1050.0)).await,
            vec![(b1, false, true), (b4, false, true)]
        );
        assert_eq!(listed(Some(3), Some(150.0)).await, vec![(b1, true, true)]);
        // Even keeping none and taking every age, the live builds are never listed.
        let all: Vec<i64> = listed(Some(0), Some(f64::MAX))
            .await
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(all, vec![b1, b4, b6]);
        assert!(!all.contains(&b3) && !all.contains(&b5) && !all.contains(&q1));

        // Marking skips live builds and builds already marked.
        assert_eq!(
            s.mark_outputs_deleted(&[b1, b2, b3, b5], 400.0)
                .await
                .unwrap(),
            1
        );
        for (id, deleted) in [(b1, Some(400.0)), (b2, Some(300.0)), (b3, None), (b5, None)] {
            let b = s.build_by_id(id).await.unwrap().unwrap();
            assert_eq!(b.output_deleted_at, deleted, "build {id}");
        }
        assert_eq!(listed(Some(1), None).await, vec![(b4, true, false)]);
    }

    /// A backup is a complete, checked copy, mode 0600, taken while another connection
    /// writes; it never replaces a file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_is_a_checked_private_copy_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ams.db");
        let s = Store::open(&db).await.unwrap();
        for _ in 0..20 {
            s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
                .await
                .unwrap();
        }
        // A writer keeps going during the copies.
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
                        .await
                        .unwrap();
                }
            })
        };
        let mut counts = Vec::new();
        for n in 0..3 {
            let dest = dir.path().join(format!("copy{n}.db"));
            let info = backup(&db, &dest).await.unwrap();
            assert!(info.builds >= 20, "{info:?}");
            assert_eq!(
                std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
                0o600
            );
            // Each copy is one snapshot: the project's counter matches its builds.
            let c = Store::open(&dest).await.unwrap();
            let builds = c.builds_of("p", 10_000, 0).await.unwrap();
            assert_eq!(builds.len() as i64, info.builds);
            let latest = c.project_info("p").await.unwrap().unwrap();
            assert_eq!(latest.latest_build_index, info.builds);
            c.close().await;
            counts.push(info.builds);
        }
        writer.await.unwrap();
        let dest = dir.path().join("copy0.db");
        let before = std::fs::read(&dest).unwrap();
        let e = backup(&db, &dest).await.unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            before,
            "the file was left as it was"
        );
        let e = backup(&dir.path().join("none.db"), &dir.path().join("x.db"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no database there"), "{e}");
        assert!(!dir.path().join("x.db").exists());
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    }

    #[tokio::test]
    async fn builds_get_increasing_indexes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ams.db");
        let s = Store::open(&db).await.unwrap();
        let a = s
            .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let b = s
            .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let c = s
            .create_build(&nb("q"), |i| Ok(format!("q_{i}")))
            .await
            .unwrap();
        assert_eq!((a.build_index, b.build_index, c.build_index), (1, 2, 1));
        assert_eq!(a.status, BuildStatus::Pending);
        s.mark_running(a.id, 1001.0).await.unwrap();
        let stages = vec![StageResult {
            name: "s".into(),
            exit_code: Some(0),
            passed: true,
            started_at: 1001.0,
            duration_secs: 0.5,
        }];
        let done = Finish {
            status: Some(BuildStatus::Pass),
            finished_at: 1002.0,
            stages: stages.clone(),
            ..Default::default()
        };
        assert!(s.finish(a.id, &done).await.unwrap());
        assert!(
            !s.finish(a.id, &done).await.unwrap(),
            "a final build is not finished twice"
        );
        s.close().await;

        let s = Store::open(&db).await.unwrap();
        let a2 = s.build_by_name("p", "p_1").await.unwrap().unwrap();
        assert_eq!(a2.status, BuildStatus::Pass);
        assert_eq!(a2.stages, stages);
        let live: Vec<_> = s
            .unfinished()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(live, vec!["p_2", "q_1"]);
        let info = s.project_info("p").await.unwrap().unwrap();
        assert_eq!(info.latest_build_index, 2);
        assert_eq!(info.latest_build_key.as_deref(), Some("p_2"));
        assert_eq!(info.last_complete_time, Some(1002.0));
        assert_eq!(s.builds_of("p", 10, 0).await.unwrap()[0].name, "p_2");
    }

    /// Pings, ignored deliveries and duplicates keep no body, through either write path; the
    /// others keep theirs until `drop_delivery_bodies` passes their time.
    #[tokio::test]
    async fn delivery_bodies_are_kept_only_where_replay_needs_them_and_only_so_long() {
        use ams_core::webhooks::Verdict;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let d = |id: &str, verdict: Verdict, at: f64| NewDelivery {
            delivery_id: Some(id.into()),
            project: "p".into(),
            webhook: "w".into(),
            received_at: at,
            verdict,
            body: format!("{{\"id\": \"{id}\"}}").into_bytes(),
            ..Default::default()
        };
        let batch = [
            d("old", Verdict::Accepted, 100.0),
            d("ping", Verdict::Ping, 100.0),
            d("ignored", Verdict::Ignored, 100.0),
            d("new", Verdict::Accepted, 300.0),
            d("old", Verdict::Accepted, 300.0),
        ];
        s.accept_deliveries(
            batch
                .into_iter()
                .map(|delivery| DeliveryBatchItem {
                    delivery,
                    builds: vec![],
                })
                .collect(),
            |_, i| Ok(format!("p_{i}")),
        )
        .await
        .unwrap();
        s.record_delivery(&d("refused", Verdict::Refused, 100.0))
            .await
            .unwrap();
        s.record_delivery(&d("ping2", Verdict::Ping, 300.0))
            .await
            .unwrap();
        let kept = |s: &Store| {
            let s = s.clone();
            async move {
                let mut v: Vec<(String, String, i64)> = s
                    .deliveries_of("p", 10)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|d| (d.delivery_id.unwrap(), d.verdict, d.body_bytes))
                    .collect();
                v.reverse();
                v
            }
        };
        let with = |id: &str, v: &str, n: i64| (id.to_string(), v.to_string(), n);
        assert_eq!(
            kept(&s).await,
            vec![
                with("old", "accepted", 13),
                with("ping", "ping", 0),
                with("ignored", "ignored", 0),
                with("new", "accepted", 13),
                with("old", "duplicate", 0),
                with("refused", "refused", 17),
                with("ping2", "ping", 0),
            ]
        );
        assert_eq!(s.drop_delivery_bodies(200.0).await.unwrap(), 2);
        assert_eq!(s.drop_delivery_bodies(200.0).await.unwrap(), 0);
        let after = kept(&s).await;
        assert_eq!(after[0], with("old", "accepted", 0));
        assert_eq!(after[3], with("new", "accepted", 13));
        assert_eq!(after[5], with("refused", "refused", 0));
        let (_, _, body) = s.delivery_payload(1).await.unwrap().unwrap();
        assert!(body.is_empty());
        // The log is checkpointed on demand (all of it when it holds more than the limit).
        s.checkpoint(0).await.unwrap();
        assert_eq!(s.checkpoint(0).await.unwrap(), 0, "the log was truncated");
    }

    #[tokio::test]
    async fn a_delivery_batch_is_deduplicated_and_indexed_in_one_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        let item = |id: &str, n: usize| DeliveryBatchItem {
            delivery: NewDelivery {
                delivery_id: Some(id.into()),
                project: "p".into(),
                webhook: "w".into(),
                verdict: ams_core::webhooks::Verdict::Accepted,
                ..Default::default()
            },
            builds: vec![nb("p"); n],
        };
        let out = s
            .accept_deliveries(vec![item("a", 1), item("b", 2), item("a", 1)], |_, i| {
                Ok(format!("p_{i}"))
            })
            .await
            .unwrap();
        let names = |o: &DeliveryOutcome| match o {
            DeliveryOutcome::Accepted(b) => b.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
            _ => vec![],
        };
        assert_eq!(names(&out[0]), vec!["p_2"]);
        assert_eq!(names(&out[1]), vec!["p_3", "p_4"]);
        assert_eq!(out[2], DeliveryOutcome::Duplicate);
        let again = s
            .accept_deliveries(vec![item("b", 1)], |_, i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        assert_eq!(again[0], DeliveryOutcome::Duplicate);
        assert_eq!(
            s.project_info("p")
                .await
                .unwrap()
                .unwrap()
                .latest_build_index,
            4
        );
        let d = s.deliveries_of("p", 10).await.unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[3].builds, vec!["p_2".to_string()]);
        s.skip_builds(&[(3, "superseded".into())], 5.0)
            .await
            .unwrap();
        let b = s.build_by_name("p", "p_3").await.unwrap().unwrap();
        assert_eq!(b.status, BuildStatus::Skip);
        assert_eq!(b.reason.as_deref(), Some("superseded"));
    }

    #[tokio::test]
    async fn sessions_end_when_idle_or_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let u = User {
            name: "u".into(),
            password_hash: "h".into(),
            grant: Grant::uniform(3, &[]),
            created_at: 0.0,
            password_changed_at: 0.0,
        };
        s.create_user(&u).await.unwrap();
        assert!(s.create_session("a", "u", "c", 1000.0, "h").await.unwrap());
        // Checked against a password that is no longer the user's: nothing is made.
        assert!(!s
            .create_session("x", "u", "c", 1000.0, "old")
            .await
            .unwrap());
        assert!(s
            .create_token("u", "t", "tx", 1000.0, Some("old"))
            .await
            .unwrap()
            .is_none());
        // Used within the idle limit: alive, and the use counts.
        assert!(s
            .session("a", 1050.0, 100.0, 500.0)
            .await
            .unwrap()
            .is_some());
        assert!(s
            .session("a", 1140.0, 100.0, 500.0)
            .await
            .unwrap()
            .is_some());
        // Idle too long: gone, for good.
        assert!(s
            .session("a", 1241.0, 100.0, 500.0)
            .await
            .unwrap()
            .is_none());
        assert!(s.session("a", 1242.0, 1e9, 1e9).await.unwrap().is_none());
        // Used all the time, but past the absolute limit: gone.
        s.create_session("b", "u", "c", 1000.0, "h").await.unwrap();
        for t in [1090.0, 1180.0, 1270.0, 1360.0, 1450.0] {
            assert!(s.session("b", t, 100.0, 500.0).await.unwrap().is_some());
        }
        assert!(s
            .session("b", 1501.0, 100.0, 500.0)
            .await
            .unwrap()
            .is_none());
        // A password change ends every session of the user and revokes its tokens.
        s.create_session("c", "u", "c", 1000.0, "h").await.unwrap();
        s.create_token("u", "ci", "th", 1000.0, Some("h"))
            .await
            .unwrap()
            .unwrap();
        assert!(s.token_user("th", 1000.5).await.unwrap().is_some());
        s.set_password("u", "h2", 1001.0).await.unwrap();
        assert!(s
            .session("c", 1002.0, 100.0, 500.0)
            .await
            .unwrap()
            .is_none());
        assert!(s.token_user("th", 1002.0).await.unwrap().is_none());
        assert!(s.tokens_of("u").await.unwrap().is_empty());
    }

    /// A database of schema 6 with users in the described system's shape (one level, a list
    /// of projects) is converted by migration 0007 to per-project levels.
    #[tokio::test]
    async fn migration_7_gives_each_listed_project_the_old_level() {
        use ams_core::access::Level;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ams.db");
        {
            let pool = SqlitePool::connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
            for sql in [
                include_str!("../migrations/0001_builds.sql"),
                include_str!("../migrations/0002_deliveries.sql"),
                include_str!("../migrations/0003_notifications.sql"),
                include_str!("../migrations/0004_users.sql"),
                include_str!("../migrations/0005_messages.sql"),
                include_str!("../migrations/0006_commit_message.sql"),
                "PRAGMA user_version = 6",
            ] {
                sqlx::raw_sql(sql).execute(&pool).await.unwrap();
            }
            for (name, level, projects) in [
                ("mod", 3, r#"["app","lib"]"#),
                ("hook", 2, r#"["app"]"#),
                ("root", 5, r#"["app"]"#),
                ("lonely", 1, "[]"),
                ("broken", 4, "not json"),
            ] {
                sqlx::query(
                    "INSERT INTO users (name, password_hash, level, projects, created_at, \
                     password_changed_at) VALUES (?, 'h', ?, ?, 0, 0)",
                )
                .bind(name)
                .bind(level)
                .bind(projects)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let s = Store::open(&path).await.unwrap();
        let grant = |name: &'static str| {
            let s = &s;
            async move { s.user(name).await.unwrap().unwrap().grant }
        };
        assert_eq!(
            grant("mod").await.projects,
            [
                ("app".to_string(), Level::Moderator),
                ("lib".to_string(), Level::Moderator)
            ]
            .into()
        );
        assert_eq!(
            grant("hook").await.projects,
            [("app".to_string(), Level::Webhook)].into()
        );
        assert_eq!(grant("root").await, Grant::server_admin());
        assert_eq!(grant("lonely").await, Grant::default());
        assert!(!grant("broken").await.can_log_in());
        // The rows themselves are in the new shape.
        let raw: (i64, String) =
            sqlx::query_as("SELECT level, projects FROM users WHERE name = 'mod'")
                .fetch_one(&s.pool)
                .await
                .unwrap();
        assert_eq!(raw, (0, r#"{"app":3,"lib":3}"#.to_string()));
        // A row still in the old shape (written by another tool) reads the old way.
        sqlx::query("UPDATE users SET level = 1, projects = '[\"lib\"]' WHERE name = 'lonely'")
            .execute(&s.pool)
            .await
            .unwrap();
        assert_eq!(
            grant("lonely").await.projects,
            [("lib".to_string(), Level::User)].into()
        );
    }

    /// Grant changes are compare-and-set: a change computed from a stale read is recomputed.
    #[tokio::test]
    async fn grant_changes_never_undo_a_concurrent_change() {
        use ams_core::access::Level;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        let mut u = user("u");
        u.grant = Grant::uniform(1, &["a".into(), "b".into()]);
        s.create_user(&u).await.unwrap();
        // The first attempt's read goes stale: another manager raises `b` in between.
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let got = s
            .update_grant("u", |g| {
                if tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    let s = s.clone();
                    std::thread::scope(|t| {
                        t.spawn(|| {
                            tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .unwrap()
                                .block_on(s.update_grant("u", |g| {
                                    let mut g = g.clone();
                                    g.projects.insert("b".into(), Level::Moderator);
                                    Ok(g)
                                }))
                                .unwrap();
                        });
                    });
                }
                let mut g = g.clone();
                g.projects.insert("a".into(), Level::Moderator);
                Ok(g)
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tries.into_inner(), 2, "recomputed once");
        assert_eq!(got, Grant::uniform(3, &["a".into(), "b".into()]));
        assert_eq!(s.user("u").await.unwrap().unwrap().grant, got);
        // A refusal changes nothing; an unknown user is None.
        assert!(matches!(
            s.update_grant("u", |_| Err("no".into())).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(s
            .update_grant("ghost", |g| Ok(g.clone()))
            .await
            .unwrap()
            .is_none());
        assert!(s.remove_user_if("u", |_| Err("no".into())).await.is_err());
        assert!(s.user("u").await.unwrap().is_some());
        assert!(s.remove_user_if("u", |_| Ok(())).await.unwrap());
        assert!(!s.remove_user("u").await.unwrap());
    }

    #[tokio::test]
    async fn a_failed_naming_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
        assert!(s
            .create_build(&nb("p"), |_| Err("bad".into()))
            .await
            .is_err());
        let a = s
            .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
        assert_eq!(a.build_index, 1);
    }
}

#[cfg(test)]
mod fault_tests {
    //! Writes that fail on a full disk or a read-only database: each fails whole, says why,
    //! and leaves its connection clean, so that every write acknowledged after it is stored.

    use super::*;

    /// The time of the last file error is per process (a host has one database), and a
    /// read-only error in one test would make the pool reopen another test's connection (and
    /// drop its page limit): these tests take turns.
    static ONE_AT_A_TIME: std::sync::LazyLock<tokio::sync::Mutex<()>> =
        std::sync::LazyLock::new(Default::default);

    fn nb(project: &str) -> NewBuild {
        NewBuild {
            project: project.into(),
            hash: "h".repeat(40),
            trigger: "cli".into(),
            branch: None,
            commit: None,
            created_by: "alice".into(),
            created_at: 1000.0,
            retry_of: None,
            params: Default::default(),
        }
    }

    fn delivery(id: &str, body: usize) -> DeliveryBatchItem {
        DeliveryBatchItem {
            delivery: NewDelivery {
                delivery_id: Some(id.into()),
                project: "p".into(),
                webhook: "gh".into(),
                verdict: ams_core::webhooks::Verdict::Accepted,
                body: vec![b'x'; body],
                ..Default::default()
            },
            builds: vec![nb("p")],
        }
    }

    fn name(i: i64) -> std::result::Result<String, String> {
        Ok(format!("p_{i}"))
    }

    /// Connections go back to the pool in the background: wait for them, or the next use
    /// opens another.
    async fn settle(s: &Store) {
        while s.pool.num_idle() < s.pool.size() as usize {
            tokio::task::yield_now().await;
        }
    }

    /// SQLite answers SQLITE_FULL, as on a full disk, once the database would grow past the
    /// `max_page_count` of the connection at work; every connection the pool may hold gets it
    /// here. The pool reopens a connection after an error about the file, and the new one
    /// starts without the limit: limit again before each write that must meet it.
    async fn limit_pages(s: &Store, pages: i64) {
        settle(s).await;
        let mut held = Vec::new();
        for _ in 0..s.pool.options().get_max_connections() {
            let mut c = s.pool.acquire().await.unwrap();
            sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
                .execute(&mut *c)
                .await
                .unwrap();
            held.push(c);
        }
        drop(held);
        settle(s).await;
    }

    /// The build indexes of project `p` as stored, oldest first, read after a reopen.
    async fn stored_after_reopen(s: Store, db: &Path) -> Vec<i64> {
        s.close().await;
        let s = Store::open(db).await.unwrap();
        s.builds_of("p", 100, 0)
            .await
            .unwrap()
            .iter()
            .rev()
            .map(|b| b.build_index)
            .collect()
    }

    #[tokio::test]
    async fn writes_after_a_full_disk_are_stored_and_numbers_never_reused() {
        let _turn = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ams.db");
        // One connection, so that every write below runs on the one that failed.
        let s = Store::open_with(&db, 1, false).await.unwrap();
        let mut acknowledged = vec![s.create_build(&nb("p"), name).await.unwrap().build_index];
        limit_pages(&s, 1).await;
        // SQLite rolls these transactions back itself (SQLITE_FULL in a one-row INSERT).
        let mut big = nb("p");
        big.hash = "h".repeat(256 * 1024);
        let e = s.create_build(&big, name).await.map(|_| ()).unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(
            e.to_string()
                .contains("the disk holding the data directory is full"),
            "{e}"
        );
        limit_pages(&s, 1).await;
        let e = s
            .accept_deliveries(vec![delivery("big", 256 * 1024)], |_, i| name(i))
            .await
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        limit_pages(&s, 1 << 30).await;
        // A write refused for its own reason (its transaction rolled back by us), then good ones.
        let e = s.create_build(&nb("p"), |_| Err("no".into())).await;
        assert!(!e.unwrap_err().is_unavailable());
        for i in 0..3 {
            let out = s
                .accept_deliveries(vec![delivery(&format!("d{i}"), 10)], |_, i| name(i))
                .await
                .unwrap();
            let DeliveryOutcome::Accepted(b) = &out[0] else {
                panic!("delivery d{i} was not accepted")
            };
            acknowledged.push(b[0].build_index);
            acknowledged.push(s.create_build(&nb("p"), name).await.unwrap().build_index);
        }
        let stored = stored_after_reopen(s, &db).await;
        assert_eq!(stored, acknowledged, "acknowledged builds were lost");
    }

    #[tokio::test]
    async fn a_read_only_database_refuses_writes_clearly_and_still_reads() {
        let _turn = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ams.db");
        let s = Store::open(&db).await.unwrap();
        let first = s.create_build(&nb("p"), name).await.unwrap();
        s.close().await;
        let ro = Store::open_with(&db, 1, true).await.unwrap();
        for _ in 0..2 {
            let e = ro
                .create_build(&nb("p"), name)
                .await
                .map(|_| ())
                .unwrap_err();
            assert!(e.is_unavailable(), "{e}");
            assert!(e.to_string().contains("read-only"), "{e}");
            let e = ro
                .accept_deliveries(vec![delivery("d", 10)], |_, i| name(i))
                .await
                .unwrap_err();
            assert!(e.is_unavailable(), "{e}");
            assert_eq!(ro.build_by_id(first.id).await.unwrap(), Some(first.clone()));
        }
        let s = Store::open(&db).await.unwrap();
        let next = s.create_build(&nb("p"), name).await.unwrap();
        assert_eq!(next.build_index, 2);
        assert_eq!(stored_after_reopen(s, &db).await, vec![1, 2]);
    }
}
