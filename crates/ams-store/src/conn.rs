//! The connections behind [`Store`]: one writer thread that owns the only connection that
//! writes, and a few reader connections used on tokio's blocking threads.
//!
//! Every SQL function of the store is a plain `fn(&Connection, …) -> Result<T>`; the async
//! methods of [`Store`] are thin wrappers that hand such a function to [`Store::read`] or
//! [`Store::write`]. Several functions called inside one write job compose in one
//! transaction.
//!
//! **The writer.** Write jobs go over a channel to a dedicated thread, which takes every job
//! already waiting (up to [`GROUP_MAX`]) into one `BEGIN IMMEDIATE … COMMIT` (group commit).
//! Each job runs inside its own `SAVEPOINT`: a job that fails is rolled back to it alone, and
//! the others' writes stay. A job is answered only after the COMMIT that holds it succeeded
//! ("acknowledged means stored"); a failed COMMIT fails every job it held. When SQLite ends
//! the whole transaction itself (a full disk or an I/O error in a statement), every job of the
//! group so far is answered with that error: none of them is stored. The writer keeps its
//! savepoints' journal in memory (`temp_store = MEMORY`): as a temporary file it cost a
//! `pwrite` per page a job touched, 15 % of the host's CPU under a webhook burst. A thread of
//! its own checkpoints the write-ahead log beside the writer (see [`checkpointer`]).
//!
//! **The readers.** At most `readers` connections, each used by one task at a time, each with
//! its prepared statements cached; they are `query_only`. Long reads run on tokio's blocking
//! threads ([`Store::read`]); point lookups and short pages run on the calling thread when a
//! connection is free at once ([`Store::read_now`]). Plans never depend on bound values
//! (QPSG), so a cached statement is compiled once.
//!
//! **Connections are reopened** after an error about the file itself (see
//! [`file_errors`]), and a connection found inside a transaction when its work is done is
//! closed, never reused; the next use opens a fresh one.

use crate::error::{file_errors, Result, StoreError};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The most write jobs one transaction holds.
pub(crate) const GROUP_MAX: usize = 64;

/// Prepared statements kept per connection.
const STATEMENTS_CACHED: usize = 64;

/// A connection and when it was opened (see [`file_errors::predates_last`]).
pub(crate) struct Opened {
    pub(crate) conn: Connection,
    at: Instant,
}

impl Opened {
    /// Whether it may be used again: outside any transaction, and opened after the last
    /// error about the file.
    fn reusable(&self) -> bool {
        if !self.conn.is_autocommit() {
            tracing::warn!("closed a database connection an error left inside a transaction");
            return false;
        }
        if file_errors::predates_last(self.at.elapsed()) {
            tracing::info!("reopening a database connection after an error about the file");
            return false;
        }
        true
    }
}

/// Opens a connection with the store's settings: WAL, `synchronous=NORMAL`, foreign keys,
/// a 10 s busy timeout, the log cut back to 64 MiB when it restarts. A reader is also
/// `query_only`.
pub(crate) fn open(path: &Path, read_only: bool, reader: bool) -> Result<Opened> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
         PRAGMA journal_size_limit = 67108864; PRAGMA wal_autocheckpoint = 10000;",
    )?;
    if reader {
        conn.execute_batch("PRAGMA query_only = ON;")?;
    } else {
        // The writer's savepoint journals in memory (bounded: one job's pages). Not on the
        // readers: there it would also keep every sort in memory, however large.
        conn.execute_batch("PRAGMA temp_store = MEMORY;")?;
    }
    // Plans that do not depend on the values bound. Without this SQLite marks a statement to
    // be compiled again whenever a new value is bound to a parameter that might change its
    // plan (a `LIMIT ?`, a `project = ?` before an `ORDER BY`), and rusqlite clears the
    // bindings of every statement it puts back in its cache: the cached statements were
    // parsed and planned anew on each use (12 % of the host's CPU under the API's build list).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
    Ok(Opened {
        conn,
        at: Instant::now(),
    })
}

/// Runs a statement of the writer's transaction control through the statement cache: parsed
/// once, not for every job.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Answers a write job once its group's fate is known: `None` when its COMMIT succeeded (it
/// gets its own result), else the error that ended the group.
type Answer = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// A write job that ran: its error, if it failed (a copy; the answer holds the original), and
/// how to answer it.
struct Done {
    failed: Option<StoreError>,
    answer: Answer,
}

/// A write job: given the writer's connection (or why there is none), it runs and says how
/// it went.
type Job = Box<dyn FnOnce(std::result::Result<&Connection, StoreError>) -> Done + Send>;

enum Msg {
    /// `grouped`: inside the group's transaction; else on its own, outside any transaction
    /// (a checkpoint, a pragma).
    Write { grouped: bool, job: Job },
    /// Ends the thread after the jobs before it, answering once the connection is closed.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    read_only: bool,
    conn: Option<Opened>,
    /// Inside `BEGIN IMMEDIATE` with these jobs' answers waiting for the COMMIT.
    group: Option<Vec<Answer>>,
    /// Raised after each COMMIT of a group.
    commits: Arc<AtomicU64>,
    /// Told of each COMMIT (see [`checkpointer`]), and joined when the writer closes.
    checkpoints: Option<(mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
    /// Raised by [`checkpointer`] when the writer should finish its checkpoint.
    finish: Arc<AtomicBool>,
    /// The last finishing checkpoint failed (logged once until one succeeds).
    finish_failing: bool,
}

/// The write-ahead log's file beside the database `db` (`ams.db-wal`).
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The write-ahead log's size past which [`checkpointer`] checkpoints it whole and truncates
/// it (the `journal_size_limit` it is cut back to on a restart).
const WAL_TRUNCATE_BYTES: u64 = 64 << 20;

/// When [`checkpointer`] runs and when it asks the writer to finish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checkpoints {
    /// How often it copies the write-ahead log back while commits go on (100 ms).
    pub every: Duration,
    /// Past this many pages in the log, the writer finishes a checkpoint itself after the
    /// checkpointer did most of it (see [`Writer::finish_checkpoint`]; 4,096 pages, 16 MiB).
    pub restart_frames: i64,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            every: Duration::from_millis(100),
            restart_frames: 4096,
        }
    }
}

/// Copies the write-ahead log back into the database from a connection of its own, at most
/// every [`Checkpoints::every`] while the writer commits and once after its last commit; ends
/// when the writer drops its sender. SQLite's own checkpoint runs inside the COMMIT that
/// crosses its threshold, and so held up every write waiting behind it (the p99 of a webhook
/// burst); here it runs beside the writer, which SQLite's write-ahead log allows.
///
/// Under steady writes this checkpoint never copies the whole log: the writer adds pages while
/// it runs. The log only starts over from its beginning after a checkpoint that left no page
/// behind, so it grew until the writer's own checkpoint (SQLite's, at 10,000 pages) did the
/// whole job, writing back and syncing 40 MB inside one COMMIT (10 to 17 ms). So when a run
/// here finds more than [`Checkpoints::restart_frames`] pages in the log, it raises `finish`,
/// and the writer, after its next commit, checkpoints the pages added since (two syncs of a
/// fraction of the log), after which its next transaction starts the log over. SQLite's
/// checkpoint stays as a backstop.
fn checkpointer(path: PathBuf, rx: mpsc::Receiver<()>, finish: Arc<AtomicBool>, tune: Checkpoints) {
    let mut conn: Option<Opened> = None;
    let mut last: Option<Instant> = None;
    let mut failing = false;
    let wal = wal_path(&path);
    while rx.recv().is_ok() {
        if let Some(wait) = last.and_then(|t| tune.every.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        while rx.try_recv().is_ok() {}
        let done = connection(&mut conn, &path, false).and_then(|c| {
            let log: i64 = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
            if log > tune.restart_frames {
                finish.store(true, Ordering::Relaxed);
            }
            // Readers that never let the log restart make it grow; past the limit it is
            // checkpointed whole and cut back here, where no other checkpoint competes.
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_TRUNCATE_BYTES) {
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            }
            Ok(())
        });
        match done {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!("a checkpoint of the write-ahead log failed: {e}");
                }
                failing = true;
                conn = None;
            }
        }
        last = Some(Instant::now());
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Close(done) => {
                        self.commit();
                        self.conn = None;
                        if let Some((tx, thread)) = self.checkpoints.take() {
                            drop(tx);
                            let _ = thread.join();
                        }
                        let _ = done.send(());
                        return;
                    }
                    Msg::Write { grouped: true, job } => self.grouped(job),
                    Msg::Write {
                        grouped: false,
                        job,
                    } => {
                        self.commit();
                        self.alone(job);
                    }
                }
                taken += 1;
                if taken < GROUP_MAX {
                    next = rx.try_recv().ok();
                }
            }
            self.commit();
        }
        self.commit();
    }

    /// The connection, opened now if there is none.
    fn connection(&mut self) -> Result<&Connection> {
        connection(&mut self.conn, &self.path, self.read_only)
    }

    /// Closes the connection if it may not be used again (see [`Opened::reusable`]).
    fn check(&mut self) {
        if self.conn.as_ref().is_some_and(|o| !o.reusable()) {
            self.conn = None;
        }
    }

    /// Runs a job outside any transaction and answers it at once.
    fn alone(&mut self, job: Job) {
        let done = run(job, self.connection());
        (done.answer)(None);
        self.check();
    }

    /// Runs a job inside the group's transaction (beginning one if needed), in a savepoint.
    fn grouped(&mut self, job: Job) {
        let conn = match connection(&mut self.conn, &self.path, self.read_only) {
            Ok(c) => c,
            Err(e) => return (run(job, Err(e)).answer)(None),
        };
        if self.group.is_none() {
            if let Err(e) = exec_cached(conn, "BEGIN IMMEDIATE") {
                (run(job, Err(e.into())).answer)(None);
                return self.check();
            }
            self.group = Some(Vec::new());
        }
        if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
            let e = StoreError::from(e);
            self.abandon(&e);
            (run(job, Err(e)).answer)(None);
            return self.check();
        }
        let done = run(job, Ok(conn));
        if conn.is_autocommit() {
            // SQLite ended the whole transaction itself (a full disk, an I/O error): the
            // jobs before this one are not stored either.
            let e = done
                .failed
                .unwrap_or_else(|| StoreError::Invalid("the transaction ended early".into()));
            self.fail_group(&e);
            (done.answer)(None);
            return self.check();
        }
        let ended = match &done.failed {
            None => exec_cached(conn, "RELEASE job"),
            Some(_) => conn.execute_batch("ROLLBACK TO job; RELEASE job"),
        };
        match ended {
            Ok(()) if done.failed.is_some() => (done.answer)(None),
            Ok(()) => self.group.get_or_insert_with(Vec::new).push(done.answer),
            Err(e) => {
                let e = StoreError::from(e);
                self.abandon(&e);
                (done.answer)(Some(e));
                self.check();
            }
        }
    }

    /// Rolls the group's transaction back and fails its jobs with `e`.
    fn abandon(&mut self, e: &StoreError) {
        if let Some(o) = &self.conn {
            if !o.conn.is_autocommit() {
                let _ = o.conn.execute_batch("ROLLBACK");
            }
        }
        self.fail_group(e);
    }

    fn fail_group(&mut self, e: &StoreError) {
        for answer in self.group.take().unwrap_or_default() {
            answer(Some(e.copy()));
        }
    }

    /// Copies the pages [`checkpointer`] left in the log (asked through `finish`), after the
    /// answers of a commit went out: nothing is added meanwhile, so unless a reader is mid-read
    /// or the checkpointer itself runs (SQLite then answers "busy" at once, without waiting,
    /// and the checkpointer asks again after its next run), the log is copied whole and the
    /// next transaction starts it over. Its two syncs hold up the writes queued meanwhile.
    fn finish_checkpoint(&mut self) {
        if !self.finish.swap(false, Ordering::Relaxed) {
            return;
        }
        let Some(o) = &self.conn else {
            return;
        };
        match o
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(StoreError::from)
        {
            Ok(()) => self.finish_failing = false,
            Err(e) => {
                if !self.finish_failing {
                    tracing::warn!("a checkpoint of the write-ahead log failed: {e}");
                }
                self.finish_failing = true;
                self.check();
            }
        }
    }

    /// Commits the group's transaction, if one is open, and answers its jobs.
    fn commit(&mut self) {
        let Some(answers) = self.group.take() else {
            return;
        };
        let committed = match &self.conn {
            Some(o) => exec_cached(&o.conn, "COMMIT").map_err(StoreError::from),
            None => Err(StoreError::closed()),
        };
        match committed {
            Ok(()) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                answers.into_iter().for_each(|a| a(None));
                self.finish_checkpoint();
                if let Some((tx, _)) = &self.checkpoints {
                    let _ = tx.try_send(());
                }
            }
            Err(e) => {
                self.group = Some(answers);
                self.abandon(&e);
            }
        }
        self.check();
    }
}

/// The writer's connection in `slot`, opened now if there is none.
fn connection<'a>(
    slot: &'a mut Option<Opened>,
    path: &Path,
    read_only: bool,
) -> Result<&'a Connection> {
    if slot.is_none() {
        *slot = Some(open(path, read_only, false)?);
    }
    match slot {
        Some(o) => Ok(&o.conn),
        None => Err(StoreError::closed()),
    }
}

/// Runs a job; a job that panics is failed (its answer, dropped, tells its caller).
fn run(job: Job, conn: std::result::Result<&Connection, StoreError>) -> Done {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn))) {
        Ok(done) => done,
        Err(_) => {
            tracing::error!("a database write panicked; it was rolled back");
            Done {
                failed: Some(StoreError::Invalid("a database write panicked".into())),
                answer: Box::new(|_| {}),
            }
        }
    }
}

/// Where a queued write's result arrives (see [`Store::write_queued`]).
type Queued<T> = tokio::sync::oneshot::Receiver<Result<T>>;

/// Waits for a queued write's result.
async fn answer<T>(queued: Result<Queued<T>>) -> Result<T> {
    queued?
        .await
        .map_err(|_| StoreError::Invalid("the database write failed (it was rolled back)".into()))?
}

/// The state every clone of a [`Store`] shares.
pub(crate) struct Shared {
    path: PathBuf,
    read_only: bool,
    writer: Mutex<Option<mpsc::Sender<Msg>>>,
    /// One permit per reader connection that may exist.
    readers: Arc<tokio::sync::Semaphore>,
    idle: Mutex<Vec<Opened>>,
    closed: AtomicBool,
    /// Raised after every write to builds (see [`Store::generation`]).
    generation: AtomicU64,
    /// The writer's commits so far.
    commits: Arc<AtomicU64>,
}

/// The store: every method reads through a reader connection or writes through the writer
/// thread. Cloning shares the connections.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("read_only", &self.shared.read_only)
            .finish_non_exhaustive()
    }
}

/// Raises the generation when the write method holding it returns (after its commit).
pub(crate) struct Touch<'a>(&'a AtomicU64);

impl Drop for Touch<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The schema migrations, in order; the database's `user_version` counts those applied.
pub(crate) const MIGRATIONS: &[&str] = &[
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

/// Applies the migrations the database has not seen yet, in one transaction. A database
/// already up to date is only read (so a read-only one opens).
fn migrate(conn: &Connection) -> Result<()> {
    let version = || -> Result<usize> {
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    };
    if version()? == MIGRATIONS.len() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let applied = (|| {
        let from = version()?;
        if from > MIGRATIONS.len() {
            return Err(StoreError::Invalid(format!(
                "the database has schema version {from}, newer than this amsbuild knows ({}); \
                 use a newer amsbuild",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
            conn.execute_batch(sql)?;
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        }
        Ok(conn.execute_batch("COMMIT")?)
    })();
    if applied.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    applied
}

impl Store {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, 4, false).await
    }

    /// [`Store::open`] with at most `readers` reader connections, read-only if asked (tests).
    pub(crate) async fn open_with(path: &Path, readers: usize, read_only: bool) -> Result<Store> {
        Store::open_tuned(path, readers, read_only, Checkpoints::default()).await
    }

    /// [`Store::open_with`] with the checkpointer's timing given (tests).
    pub(crate) async fn open_tuned(
        path: &Path,
        readers: usize,
        read_only: bool,
        tune: Checkpoints,
    ) -> Result<Store> {
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
        let at = path.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || -> Result<Opened> {
            let o = open(&at, read_only, false)?;
            migrate(&o.conn)?;
            Ok(o)
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("opening the database: {e}")))??;
        let (tx, rx) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let finish = Arc::new(AtomicBool::new(false));
        let checkpoints = if read_only {
            None
        } else {
            let (tx, rx) = mpsc::sync_channel(1);
            let at = path.to_path_buf();
            let finish = finish.clone();
            let thread = std::thread::Builder::new()
                .name("ams-store-ckpt".into())
                .spawn(move || checkpointer(at, rx, finish, tune))
                .map_err(|e| {
                    StoreError::Invalid(format!("cannot start the database checkpointer: {e}"))
                })?;
            Some((tx, thread))
        };
        let writer = Writer {
            path: path.to_path_buf(),
            read_only,
            conn: Some(opened),
            group: None,
            commits: commits.clone(),
            checkpoints,
            finish,
            finish_failing: false,
        };
        std::thread::Builder::new()
            .name("ams-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Invalid(format!("cannot start the database writer: {e}")))?;
        Ok(Store {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                read_only,
                writer: Mutex::new(Some(tx)),
                readers: Arc::new(tokio::sync::Semaphore::new(readers.max(1))),
                idle: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                commits,
            }),
        })
    }

    /// A counter raised after each committed write to builds. Read it before a query, and the
    /// data the query sees is at least that new: response caches key on it.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// How many transactions the writer has committed (one per group of writes, so this
    /// against the writes made says how well group commit groups).
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    pub(crate) fn touch(&self) -> Touch<'_> {
        Touch(&self.shared.generation)
    }

    /// Runs `f` on a reader connection, on a blocking thread.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let permit = self
            .shared
            .readers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::closed())?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = shared.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
            let o = match idle {
                Some(o) => o,
                None => open(&shared.path, shared.read_only, true)?,
            };
            let r = f(&o.conn);
            if !shared.closed.load(Ordering::SeqCst) && o.reusable() {
                if let Ok(mut v) = shared.idle.lock() {
                    v.push(o);
                }
            }
            r
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("a database read failed: {e}")))?
    }

    /// Runs a short read (a point lookup, a page of tens of rows) on the calling thread when a
    /// reader connection is free at once, else as [`Store::read`] does. Handing such a read to
    /// a blocking thread and back costs more than the read: a third of the dashboard's CPU went
    /// to waking those threads. A page that is not in SQLite's or the kernel's cache holds the
    /// calling thread for the time of a disk read, so long reads keep to [`Store::read`].
    pub(crate) async fn read_now<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        if let Ok(permit) = self.shared.readers.clone().try_acquire_owned() {
            let idle = self.shared.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
            if let Some(o) = idle {
                // A panic is this read's error, as on a blocking thread; the connection is
                // dropped, not reused.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&o.conn)))
                    .map_err(|_| StoreError::Invalid("a database read failed".into()))?;
                if !self.shared.closed.load(Ordering::SeqCst) && o.reusable() {
                    if let Ok(mut v) = self.shared.idle.lock() {
                        v.push(o);
                    }
                }
                drop(permit);
                return r;
            }
        }
        self.read(f).await
    }

    /// Runs `f` on the writer's connection inside a transaction (with other writes, each in
    /// its own savepoint); answers after the commit.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.send(true, f).await
    }

    /// Runs `f` on the writer's connection outside any transaction (a checkpoint, a pragma).
    pub(crate) async fn write_alone<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.send(false, f).await
    }

    async fn send<T, F>(&self, grouped: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        answer(self.enqueue(grouped, false, f)).await
    }

    /// Runs `f` as [`Store::write`] does, but puts it in the writer's queue now, before the
    /// returned future is first polled: writes a caller queues later come after it. For a
    /// caller that must not wait for the commit (the host's loop) but keeps the order of its
    /// writes. The write is done whether or not the future is awaited; the generation rises
    /// on the writer thread once its group's COMMIT is through.
    pub(crate) fn write_queued<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        answer(self.enqueue(true, true, f))
    }

    /// Hands a job to the writer thread; its answer comes on the returned receiver after
    /// the commit. With `touch`, the generation rises then too, before the answer.
    fn enqueue<T, F>(&self, grouped: bool, touch: bool, f: F) -> Result<Queued<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answered) = tokio::sync::oneshot::channel();
        let shared = touch.then(|| self.shared.clone());
        let job: Job = Box::new(move |conn| {
            let r = conn.and_then(f);
            Done {
                failed: r.as_ref().err().map(StoreError::copy),
                answer: Box::new(move |ended| {
                    if let Some(s) = shared {
                        s.generation.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = reply.send(match ended {
                        None => r,
                        Some(e) => Err(e),
                    });
                }),
            }
        });
        let sender = self
            .shared
            .writer
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .ok_or_else(StoreError::closed)?;
        sender
            .send(Msg::Write { grouped, job })
            .map_err(|_| StoreError::closed())?;
        Ok(answered)
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    /// The size of the write-ahead log's file (0 when there is none).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(wal_path(&self.shared.path))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Copies the write-ahead log into the database (never waiting); when the log holds more
    /// than `max_frames` pages, checkpoints it whole and truncates the file. Returns the log's
    /// pages before.
    pub async fn checkpoint(&self, max_frames: i64) -> Result<i64> {
        self.write_alone(move |c| {
            // SQLite answers "busy" at once, without waiting, while another checkpoint runs
            // (the checkpointer's, a few milliseconds): asked again then, for up to a second.
            // A busy answer that took long is readers the busy timeout already waited for.
            let once = |sql: &str| -> Result<Option<i64>> {
                for _ in 0..200 {
                    let asked = Instant::now();
                    let (busy, log): (i64, i64) =
                        c.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    if busy == 0 {
                        return Ok(Some(log));
                    }
                    if asked.elapsed() > Duration::from_millis(50) {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None)
            };
            let Some(log) = once("PRAGMA wal_checkpoint(PASSIVE)")? else {
                return Err(StoreError::Invalid(
                    "the write-ahead log stayed busy for a second".into(),
                ));
            };
            if log > max_frames {
                once("PRAGMA wal_checkpoint(TRUNCATE)")?;
            }
            Ok(log)
        })
        .await
    }

    /// Ends the writer thread after the writes already sent (they are answered) and closes
    /// every connection; later calls fail as unavailable.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.readers.close();
        if let Ok(mut idle) = self.shared.idle.lock() {
            idle.clear();
        }
        let sender = self.shared.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(sender) = sender {
            let (done, closed) = tokio::sync::oneshot::channel();
            if sender.send(Msg::Close(done)).is_ok() {
                let _ = closed.await;
            }
        }
    }
}
