//! The host loop: the one owner of the pending and active lists.
//!
//! Clients (the control socket today, the web interface and webhooks later) hold a cheap
//! [`HostHandle`] and send [`Command`]s; the loop handles them one at a time, starts workers when
//! slots are free, and records what they report. State changes of the queue happen nowhere
//! else. Every worker is tracked, and shutdown waits for them.

use crate::error::HostError;
use crate::log::LogHub;
use crate::metrics::Metrics;
use crate::paths::DataDir;
use crate::settings::{QueueSettings, SettingsCache};
use crate::timefmt;
use crate::worker::{self, StopReason, StopSignal, WorkerContext};
use ams_core::names::{validate_build_name, BuildId, ProjectName, Trigger};
use ams_core::pipeline::DEFAULT_NAME_FORMAT;
use ams_core::queue::{Queue, Queued};
use ams_core::status::BuildStatus;
use ams_core::vars;
use ams_core::webconf::WebConf;
use ams_docker::Executor;
use ams_store::{BuildRecord, Finish, NewBuild, NewDelivery, Store};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// A request to queue a build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub project: ProjectName,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub actor: String,
    pub trigger: Trigger,
    /// Parameters (`-p NAME=VALUE`), each declared in pipeline.json's `parameters`.
    pub params: BTreeMap<String, String>,
}

/// Build requests for the pushes a webhook accepted: the exact commit, the actor as creator.
pub fn build_requests(
    project: &ProjectName,
    pushes: Vec<ams_core::webhooks::Push>,
) -> Vec<BuildRequest> {
    pushes
        .into_iter()
        .map(|p| BuildRequest {
            project: project.clone(),
            branch: Some(p.branch),
            commit: Some(p.commit),
            actor: p
                .actors
                .into_iter()
                .next()
                .unwrap_or_else(|| "webhook".into()),
            trigger: Trigger::Webhook,
            params: BTreeMap::new(),
        })
        .collect()
}

/// What a build did, for listeners such as the notifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Started,
    Finished,
}

/// Hears about builds starting and finishing. Called from the host loop, so an implementation
/// must return at once (hand the event to its own bounded queue) and never fail a build.
pub trait BuildEvents: Send + Sync + 'static {
    fn event(&self, build_id: i64, kind: EventKind);
}

/// The live lists, for status views: published by the loop after every change and read
/// without a round trip through it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueSnapshot {
    pub active: Vec<BuildRecord>,
    /// The first [`SNAPSHOT_PENDING`] pending builds, in queue order.
    pub pending: Vec<BuildRecord>,
    /// How many builds are pending in all.
    pub pending_total: usize,
    /// A stop has begun: running builds may finish, queued ones wait for the next start.
    pub stopping: bool,
}

/// What the host last learnt of the Docker engine (checked every few seconds).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineState {
    /// `None` until the first check has answered.
    pub up: Option<bool>,
    /// Why it is down.
    pub error: Option<String>,
}

/// One Docker engine of the pool, as the host uses it.
pub struct Engine {
    pub name: String,
    pub slots: usize,
    pub labels: Vec<String>,
    /// Where it is, as web_conf.json gives it (empty: `DOCKER_HOST` or the local socket).
    pub host: String,
    pub executor: Arc<dyn Executor>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({})", self.name)
    }
}

/// What the host knows of one engine: from its pings (state, version, last error) and from the
/// loop (slots in use).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineHealth {
    pub name: String,
    pub host: String,
    /// `None` until the first ping has answered.
    pub up: Option<bool>,
    pub version: Option<String>,
    /// The last failure of a ping, kept after the engine answers again.
    pub last_error: Option<String>,
    pub slots: usize,
    pub in_use: usize,
    pub labels: Vec<String>,
    /// Whether builds on it get their folders through the archive endpoint.
    pub remote: bool,
}

/// At most this many pending builds are listed in a snapshot.
pub const SNAPSHOT_PENDING: usize = 500;

pub type Reply<T> = oneshot::Sender<Result<T, HostError>>;

/// Why a build reference did not resolve to one build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("build name `{name}` is used by several projects ({}); name the project too", projects.join(", "))]
    Ambiguous { name: String, projects: Vec<String> },
    #[error("cannot look the build up: {0}")]
    Store(String),
}

/// How an operator names a build: `amsbuild log`, `cancel` and `delete-output` take the same
/// words, and the control socket carries them as the same fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildRef {
    /// The build's full name, with its project when given (`PROJECT/NAME`); a name alone must
    /// then be used by one project only.
    Name {
        project: Option<String>,
        name: String,
    },
    /// A project and the build's index in it (1 for its first build).
    Index { project: String, index: i64 },
}

impl BuildRef {
    /// From the command line's words: `BUILD` or `PROJECT/BUILD`, or `PROJECT INDEX`.
    pub fn from_args(first: &str, index: Option<i64>) -> BuildRef {
        match (index, first.split_once('/')) {
            (Some(index), _) => BuildRef::Index {
                project: first.to_string(),
                index,
            },
            (None, Some((p, n))) => BuildRef::Name {
                project: Some(p.to_string()),
                name: n.to_string(),
            },
            (None, None) => BuildRef::Name {
                project: None,
                name: first.to_string(),
            },
        }
    }

    /// The fields of a control request that name this build.
    pub fn to_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        match self {
            BuildRef::Name { project, name } => {
                m.insert("build".into(), name.clone().into());
                if let Some(p) = project {
                    m.insert("project".into(), p.clone().into());
                }
            }
            BuildRef::Index { project, index } => {
                m.insert("project".into(), project.clone().into());
                m.insert("index".into(), (*index).into());
            }
        }
        m
    }

    /// From a control request: `build` (a name, `PROJECT/NAME`, or a name with `project`), or
    /// `project` and `index`.
    pub fn from_fields(req: &serde_json::Value) -> Result<BuildRef, String> {
        let s = |k: &str| req.get(k).and_then(serde_json::Value::as_str);
        match (req.get("index"), s("build"), s("project")) {
            (Some(i), None, Some(project)) => match i.as_i64() {
                Some(index) if index >= 1 => Ok(BuildRef::Index {
                    project: project.to_string(),
                    index,
                }),
                _ => Err(format!(
                    "`{i}` is not a build index: give 1 for a project's first build, 2 for the next…"
                )),
            },
            (Some(_), Some(_), _) => Err("give `build` or `index`, not both".into()),
            (Some(_), None, None) => Err("`index` needs `project`".into()),
            (None, Some(name), Some(project)) => Ok(BuildRef::Name {
                project: Some(project.to_string()),
                name: name.to_string(),
            }),
            (None, Some(name), None) => Ok(BuildRef::from_args(name, None)),
            (None, None, _) => Err("`build` is required".into()),
        }
    }
}

impl std::fmt::Display for BuildRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildRef::Name {
                project: Some(p),
                name,
            } => write!(f, "{p}/{name}"),
            BuildRef::Name {
                project: None,
                name,
            } => f.write_str(name),
            BuildRef::Index { project, index } => write!(f, "{project} {index}"),
        }
    }
}

/// What became of a webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Builds were queued (their names).
    Queued(Vec<String>),
    /// The same delivery id was accepted before: nothing was built.
    Duplicate,
}

/// A build request with its project's settings, or why it cannot build.
pub type CheckedRequest = (BuildRequest, Result<Arc<QueueSettings>, HostError>);

/// Everything the loop handles.
#[derive(Debug)]
pub enum Command {
    /// A checked request and its project's settings (read by the sender, never by the loop).
    Build(BuildRequest, Arc<QueueSettings>, Reply<BuildRecord>),
    Cancel {
        build: BuildId,
        by: String,
        reply: Reply<BuildRecord>,
    },
    DeleteOutput {
        build: BuildId,
        by: String,
        reply: Reply<()>,
    },
    /// Retention: remove these final builds' files and mark their outputs deleted (see
    /// [`crate::retention`]). Builds the loop holds as pending or running are refused.
    Prune {
        builds: Vec<BuildRecord>,
        reply: Reply<Vec<crate::retention::Pruned>>,
    },
    Complete {
        id: i64,
        finish: Box<Finish>,
        /// The engine failed under the build (its container may be left).
        engine_failed: bool,
        /// Its engine did not answer before its container existed: it may be queued again.
        requeue: bool,
    },
    /// A verified webhook delivery: queue its builds unless its id was accepted before, and
    /// record it. Serial in the loop, so two copies of one delivery cannot both build.
    Webhook {
        delivery: Box<NewDelivery>,
        /// Each request with its project's settings, or why it cannot build.
        requests: Vec<CheckedRequest>,
        reply: Reply<WebhookOutcome>,
    },
    /// Whether build `of`, which ended ERROR, is queued again: with the project's settings
    /// (read by the sender) when it is, `None` when not. Every ERROR build sends one.
    Retry {
        of: i64,
        settings: Option<Arc<QueueSettings>>,
    },
    /// An engine's monitor saw it start or stop answering.
    EngineHealth {
        engine: usize,
        up: bool,
    },
    /// Start no more builds; answer once none runs (see [`HostHandle::drain`]).
    Drain(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone, Debug)]
pub struct HostConfig {
    pub data: DataDir,
    pub conf: WebConf,
    /// See [`WorkerContext::packer`].
    pub packer: Option<std::path::PathBuf>,
    /// Told when builds start and finish.
    pub events: Option<Arc<dyn BuildEvents>>,
    /// Where the host records what it does (also reachable from the handle).
    pub metrics: Arc<Metrics>,
    /// The database already open in this process (the notifier's), shared so that one set of
    /// connections serves both; `None` opens the data directory's.
    pub store: Option<Store>,
}

impl std::fmt::Debug for dyn BuildEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildEvents")
    }
}

/// A cheap, cloneable handle on the running host.
#[derive(Clone)]
pub struct HostHandle {
    tx: mpsc::Sender<Command>,
    snap: watch::Receiver<Arc<QueueSnapshot>>,
    settings: Arc<SettingsCache>,
    pub store: Store,
    pub hub: LogHub,
    pub data: DataDir,
    /// Ticks whenever the queue or a build's state may have changed (for live views).
    pub changes: tokio::sync::broadcast::Sender<()>,
    /// The engines' state, as a whole: up while any engine answers.
    pub engine: watch::Receiver<EngineState>,
    /// Each engine's state, version, slots in use and last error.
    pub engines: watch::Receiver<Vec<EngineHealth>>,
    gc: Arc<crate::retention::Gc>,
    /// The host's metrics, for the edges that record events and serve them.
    pub metrics: Arc<Metrics>,
    /// Set by [`HostHandle::drain`]: the loop starts no build once it reads it.
    stopping: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for HostHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostHandle")
    }
}

impl HostHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, HostError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| HostError::ShuttingDown)?;
        rx.await.map_err(|_| HostError::ShuttingDown)?
    }

    pub async fn build(&self, req: BuildRequest) -> Result<BuildRecord, HostError> {
        let settings = self.settings_for(&req).await?;
        self.ask(|r| Command::Build(req, settings, r)).await
    }

    /// Checks a request and reads its project's settings, on the caller's task (the loop never
    /// touches the file system for a request). Mostly the cache's three `stat`s, and a small
    /// read when a file changed, as the webhook listener's own read of webhooks.json: handing
    /// them to a blocking thread cost more than they do (4 % of the host's CPU under a burst
    /// of webhooks, and a thread switch in each delivery's answer).
    async fn settings_for(&self, req: &BuildRequest) -> Result<Arc<QueueSettings>, HostError> {
        check_request(req).map_err(HostError::Invalid)?;
        self.settings
            .get(&self.data, &req.project)
            .map_err(HostError::NotFound)
    }

    /// A project's webhook configuration, read again only when its files changed (see
    /// [`SettingsCache::webhooks`]). A name that cannot be a project answers as a project
    /// without webhooks does.
    pub fn webhooks(&self, project: &str) -> Result<Arc<crate::settings::ProjectWebhooks>, String> {
        self.settings.webhooks(&self.data, project)
    }

    /// Cancels a build. The caller resolved and authorized `build` (see [`HostHandle::resolve`]).
    pub async fn cancel(&self, build: BuildId, by: &str) -> Result<BuildRecord, HostError> {
        let by = by.to_string();
        self.ask(|reply| Command::Cancel { build, by, reply }).await
    }

    /// Queues a finished build again: the same project, branch and commit (the one it checked
    /// out, or else the one it asked for), by `actor` through `trigger`. The caller resolved
    /// and authorized `build`; one still pending or running is refused.
    pub async fn rebuild(
        &self,
        build: &BuildRecord,
        actor: &str,
        trigger: Trigger,
    ) -> Result<BuildRecord, HostError> {
        if !build.status.is_final() {
            return Err(HostError::Conflict(format!(
                "build {} has not finished; cancel it, or wait for it to end",
                build.name
            )));
        }
        let project = ProjectName::new(&build.project).map_err(HostError::Invalid)?;
        self.build(BuildRequest {
            project,
            branch: build.branch.clone(),
            commit: build.git_hash.clone().or(build.commit.clone()),
            actor: actor.to_string(),
            trigger,
            params: build.params.clone(),
        })
        .await
    }

    /// Deletes a finished build's output. The caller resolved and authorized `build`.
    pub async fn delete_output(&self, build: BuildId, by: &str) -> Result<(), HostError> {
        let by = by.to_string();
        self.ask(|reply| Command::DeleteOutput { build, by, reply })
            .await
    }

    /// Runs retention now (see [`crate::retention`]): removes the files of the finished builds
    /// the projects' retention no longer keeps, or with `dry_run` says which and how much.
    pub async fn gc(&self, dry_run: bool) -> Result<crate::retention::Report, HostError> {
        self.gc.run(dry_run).await
    }

    /// Resolves a user's build reference: `project` and the build's name, or the name alone,
    /// which must then name exactly one build among the projects `may` accepts. A number is a
    /// name like any other, never an id.
    pub async fn resolve(
        &self,
        project: Option<&str>,
        name: &str,
        may: impl Fn(&str) -> bool,
    ) -> Result<Option<BuildRecord>, ResolveError> {
        match project {
            Some(p) if may(p) => Ok(self
                .store
                .build_by_name(p, name)
                .await
                .map_err(|e| ResolveError::Store(e.to_string()))?),
            Some(_) => Ok(None),
            None => {
                let mut found: Vec<BuildRecord> = self
                    .store
                    .builds_named(name)
                    .await
                    .map_err(|e| ResolveError::Store(e.to_string()))?
                    .into_iter()
                    .filter(|b| may(&b.project))
                    .collect();
                match found.len() {
                    0 | 1 => Ok(found.pop()),
                    _ => Err(ResolveError::Ambiguous {
                        name: name.to_string(),
                        projects: found.into_iter().map(|b| b.project).collect(),
                    }),
                }
            }
        }
    }

    /// Resolves a [`BuildRef`] among the projects `may` accepts: by name as [`Self::resolve`],
    /// or by the project's build index.
    pub async fn resolve_ref(
        &self,
        r: &BuildRef,
        may: impl Fn(&str) -> bool,
    ) -> Result<Option<BuildRecord>, ResolveError> {
        match r {
            BuildRef::Name { project, name } => self.resolve(project.as_deref(), name, may).await,
            BuildRef::Index { project, index } if may(project) => self
                .store
                .build_by_index(project, *index)
                .await
                .map_err(|e| ResolveError::Store(e.to_string())),
            BuildRef::Index { .. } => Ok(None),
        }
    }

    /// Queues the builds of a verified delivery and records it (see [`Command::Webhook`]).
    pub async fn webhook(
        &self,
        delivery: NewDelivery,
        requests: Vec<BuildRequest>,
    ) -> Result<WebhookOutcome, HostError> {
        let mut checked = Vec::with_capacity(requests.len());
        for r in requests {
            let s = self.settings_for(&r).await;
            checked.push((r, s));
        }
        let requests = checked;
        self.ask(|reply| Command::Webhook {
            delivery: Box::new(delivery),
            requests,
            reply,
        })
        .await
    }

    /// The queue as the loop last published it: no round trip, never waits on the loop.
    pub async fn snapshot(&self) -> Result<Arc<QueueSnapshot>, HostError> {
        Ok(self.snap.borrow().clone())
    }

    /// The first step of a graceful stop: from this call on no queued build starts (builds
    /// still queue); the future it returns ends once no build runs and no retry is being
    /// decided. [`HostHandle::shutdown`] is the second step.
    pub fn drain(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        // The flag at once: the loop checks it before each start, even one it makes before it
        // reads the command (at start-up, or with commands already in its channel).
        self.stopping.send_replace(true);
        let tx = self.tx.clone();
        async move {
            let (done, rx) = oneshot::channel();
            if tx.send(Command::Drain(done)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Stops the host: active builds are stopped and recorded as interrupted, pending builds
    /// stay queued in the database for the next start.
    pub async fn shutdown(&self) {
        // Retries waiting to be queued are queued now (see `Host::consider_retry`).
        self.stopping.send_replace(true);
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Active {
    stop: Arc<StopSignal>,
    project: String,
    started_at: f64,
    /// How it was queued, to queue it again (see [`Host::requeue`]).
    queued: Queued,
}

/// How often a build may go back to the queue because its engine failed before its container
/// existed; after that it ends ERROR as its worker said.
const MAX_REQUEUES: u32 = 3;

/// The host loop and its state.
pub struct Host {
    ctx: Arc<WorkerContext>,
    store: Store,
    /// Whether the host opened the store (and so closes it when it stops); a shared one stays
    /// open for the others (the notifier's last deliveries).
    owns_store: bool,
    /// How often each running build was queued again (see [`Host::requeue`]).
    requeues: HashMap<i64, u32>,
    hub: LogHub,
    queue: Queue,
    active: HashMap<i64, Active>,
    workers: JoinSet<()>,
    /// The records of the pending and active builds, kept for the snapshot.
    live: HashMap<i64, BuildRecord>,
    snap: watch::Sender<Arc<QueueSnapshot>>,
    settings: Arc<SettingsCache>,
    /// Which build each worker task runs, so a worker that dies still ends its build.
    worker_builds: HashMap<tokio::task::Id, i64>,
    tx: mpsc::Sender<Command>,
    rx: mpsc::Receiver<Command>,
    /// A command taken from the channel while batching, handled next.
    deferred: Option<Command>,
    changes: tokio::sync::broadcast::Sender<()>,
    events: Option<Arc<dyn BuildEvents>>,
    /// Builds whose files a task is removing (delete-output or retention): never two at once.
    removing: Arc<Mutex<HashSet<i64>>>,
    metrics: Arc<Metrics>,
    /// Each engine's health and slots in use (see [`EngineHealth`]).
    engine_health: Arc<watch::Sender<Vec<EngineHealth>>>,
    /// Wakes an engine's monitor to ping it now.
    nudges: Vec<Arc<tokio::sync::Notify>>,
    /// Projects whose disk use changed (a build ended), for [`crate::metrics::watch_disk`].
    disk_dirty: mpsc::Sender<String>,
    /// Those waiting for the drain (see [`Command::Drain`]): they hear when no build runs and
    /// no retry is being decided.
    draining: Vec<oneshot::Sender<()>>,
    /// Set once a stop began ([`HostHandle::drain`]): no build starts any more.
    stopping: Arc<watch::Sender<bool>>,
    /// ERROR builds whose retry is being decided off the loop (see [`Host::consider_retry`]).
    retries_pending: usize,
}

/// Takes builds out of [`Host::removing`] when their removal task ends, however it ends.
struct Removing {
    set: Arc<Mutex<HashSet<i64>>>,
    ids: Vec<i64>,
}

impl Drop for Removing {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.ids {
            set.remove(id);
        }
    }
}

/// Checks a request's branch and commit (no IO).
fn check_request(req: &BuildRequest) -> Result<(), String> {
    if let Some(b) = &req.branch {
        if !crate::git::valid_branch(b) {
            return Err(format!("`{b}` is not a valid branch name"));
        }
    }
    if let Some(c) = &req.commit {
        if !crate::git::valid_commit(c) {
            return Err(format!("`{c}` is not a commit id (4 to 64 hex digits)"));
        }
    }
    Ok(())
}

/// Names a build from a format.
fn build_name(
    format: &str,
    project: &str,
    hash: &str,
    index: i64,
    created: f64,
) -> Result<String, String> {
    let mut values = BTreeMap::new();
    values.insert("project", project.to_string());
    values.insert("build_hash", hash.to_string());
    values.insert("build_index", index.to_string());
    values.insert("created", timefmt::compact(created));
    let name = vars::expand(format, &values)
        .or_else(|_| vars::expand(DEFAULT_NAME_FORMAT, &values))
        .map_err(|v| format!("unknown variable {v}"))?;
    validate_build_name(&name).map(|_| name)
}

/// Removes a build's container (by this host's and the build's labels) once the engine
/// answers, retrying every 5 s for an hour.
async fn remove_when_back(ctx: &WorkerContext, engine: usize, build: i64) {
    let Some(engine) = ctx.engines.get(engine) else {
        return;
    };
    let id = build.to_string();
    let labels = [
        (ams_docker::LABEL_HOST, ctx.host_id.as_str()),
        (ams_docker::LABEL_BUILD_ID, id.as_str()),
    ];
    for _ in 0..720 {
        match engine.executor.remove_labelled(&labels).await {
            Ok(names) => {
                for n in names {
                    tracing::warn!(
                        "removed container {n} that build {build} left on a failing engine"
                    );
                }
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(5)).await,
        }
    }
}

/// Pings engine `index` every 10 s (every 2 s while it is down), keeps its version and last
/// error in `health`, tells the loop when it starts or stops answering, and logs each change
/// once (never a line per failed ping).
async fn monitor_engine(
    index: usize,
    executor: Arc<dyn Executor>,
    health: Arc<watch::Sender<Vec<EngineHealth>>>,
    overall: Arc<watch::Sender<EngineState>>,
    tx: mpsc::Sender<Command>,
    changes: tokio::sync::broadcast::Sender<()>,
    nudge: Arc<tokio::sync::Notify>,
) {
    let mut was: Option<bool> = None;
    loop {
        let answer = executor.version().await;
        let up = answer.is_ok();
        let name = health
            .borrow()
            .get(index)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        health.send_modify(|all| {
            if let Some(h) = all.get_mut(index) {
                h.up = Some(up);
                match &answer {
                    Ok(v) => h.version = Some(v.clone()).filter(|v| !v.is_empty()),
                    Err(e) => h.last_error = Some(e.to_string()),
                }
            }
        });
        if was != Some(up) {
            match (&answer, was) {
                (Ok(_), Some(false)) => tracing::warn!("the Docker engine {name} answers again"),
                (Ok(_), _) => tracing::info!("the Docker engine {name} answers"),
                (Err(e), _) => tracing::warn!(
                    "the Docker engine {name} is not answering: {e}; it takes no new builds"
                ),
            }
            let _ = tx.send(Command::EngineHealth { engine: index, up }).await;
            let now = {
                let all = health.borrow();
                let any_up = all.iter().any(|h| h.up == Some(true));
                EngineState {
                    up: Some(any_up),
                    error: (!any_up)
                        .then(|| all.iter().find_map(|h| h.last_error.clone()))
                        .flatten(),
                }
            };
            overall.send_replace(now);
            let _ = changes.send(());
            was = Some(up);
        }
        let pause = if up { 10 } else { 2 };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
            // The loop saw a build fail on this engine and took it out of placement: check
            // now, and tell the loop either way.
            _ = nudge.notified() => was = None,
        }
    }
}

/// Reads or creates the data directory's random id.
fn host_id(data: &DataDir) -> std::io::Result<String> {
    let path = data.host_id_file();
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = worker::random_hex(16);
            crate::paths::write_private(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

impl Host {
    /// Opens the state, recovers from an earlier stop or crash, and returns the loop (to run
    /// with [`Host::run`]) and a handle on it.
    pub async fn start(
        cfg: HostConfig,
        executor: Arc<dyn Executor>,
    ) -> anyhow::Result<(Host, HostHandle)> {
        let engine = Engine {
            name: "local".into(),
            slots: cfg.conf.max_active_builds,
            labels: Vec::new(),
            host: String::new(),
            executor,
        };
        Self::start_pool(cfg, vec![engine]).await
    }

    /// Like [`Host::start`], with a pool of engines (web_conf.json `engines`).
    pub async fn start_pool(
        cfg: HostConfig,
        engines: Vec<Engine>,
    ) -> anyhow::Result<(Host, HostHandle)> {
        anyhow::ensure!(!engines.is_empty(), "no engine to run builds on");
        let engines: Vec<Arc<Engine>> = engines.into_iter().map(Arc::new).collect();
        cfg.data.create()?;
        for w in cfg.data.loose_modes() {
            tracing::warn!("{w}");
        }
        let owns_store = cfg.store.is_none();
        let store = match cfg.store.clone() {
            Some(s) => s,
            None => Store::open(&cfg.data.db()).await?,
        };
        let host_id = host_id(&cfg.data)?;
        let sealed = store.secret_count().await.unwrap_or(0);
        if sealed > 0 && !cfg.data.secrets_key().exists() {
            tracing::error!(
                "{} is missing, but the database holds {sealed} secret(s) sealed with it: builds \
                 that ask for secrets fail until the key file is restored from a backup (or the \
                 secrets are removed and set again)",
                cfg.data.secrets_key().display()
            );
        }
        let (tx, rx) = mpsc::channel(1024);
        let hub = LogHub::default();
        let (changes, _) = tokio::sync::broadcast::channel(16);
        let ctx = Arc::new(WorkerContext {
            data: cfg.data.clone(),
            conf: Arc::new(cfg.conf.clone()),
            engines: engines.clone(),
            host_id,
            master_locks: Mutex::new(HashMap::new()),
            packer: cfg.packer.clone(),
            overlay: Arc::default(),
            store: store.clone(),
        });
        for m in crate::source::sweep_mounts(&cfg.data.projects()) {
            tracing::warn!("unmounted {} left by an interrupted build", m.display());
        }
        let (snap_tx, snap_rx) = watch::channel(Arc::new(QueueSnapshot::default()));
        let settings = Arc::new(SettingsCache::default());
        let (disk_dirty, dirty_rx) = mpsc::channel(64);
        let stopping = Arc::new(watch::Sender::new(false));
        let mut host = Host {
            queue: Queue::with_engines(
                engines
                    .iter()
                    .map(|e| ams_core::queue::EngineSlots::new(&e.name, e.slots, &e.labels))
                    .collect(),
            ),
            engine_health: Arc::new(watch::channel(Vec::new()).0),
            nudges: engines.iter().map(|_| Arc::default()).collect(),
            live: HashMap::new(),
            snap: snap_tx,
            settings: settings.clone(),
            ctx,
            store: store.clone(),
            owns_store,
            requeues: HashMap::new(),
            hub: hub.clone(),
            active: HashMap::new(),
            workers: JoinSet::new(),
            worker_builds: HashMap::new(),
            tx: tx.clone(),
            rx,
            deferred: None,
            changes: changes.clone(),
            events: cfg.events.clone(),
            removing: Arc::default(),
            metrics: cfg.metrics.clone(),
            disk_dirty,
            draining: Vec::new(),
            stopping: stopping.clone(),
            retries_pending: 0,
        };
        host.workers.spawn(crate::metrics::watch_disk(
            cfg.metrics.clone(),
            cfg.data.clone(),
            dirty_rx,
        ));
        host.recover().await?;
        host.publish();
        let (engine_tx, engine_rx) = watch::channel(EngineState::default());
        let engine_tx = Arc::new(engine_tx);
        host.engine_health.send_replace(
            engines
                .iter()
                .map(|e| EngineHealth {
                    name: e.name.clone(),
                    host: e.host.clone(),
                    slots: e.slots,
                    labels: e.labels.clone(),
                    remote: !e.executor.shares_files(),
                    ..Default::default()
                })
                .collect(),
        );
        let engines_rx = host.engine_health.subscribe();
        for (i, e) in engines.iter().enumerate() {
            host.workers.spawn(monitor_engine(
                i,
                e.executor.clone(),
                host.engine_health.clone(),
                engine_tx.clone(),
                tx.clone(),
                changes.clone(),
                host.nudges[i].clone(),
            ));
        }
        let gc = Arc::new(crate::retention::Gc::new(
            store.clone(),
            cfg.data.clone(),
            cfg.conf.retention(),
            tx.clone(),
        ));
        host.workers.spawn(crate::retention::hourly(gc.clone()));
        host.workers.spawn(crate::deliveries::upkeep(
            store.clone(),
            cfg.conf.delivery_body_max_age_days,
        ));
        let handle = HostHandle {
            gc,
            tx,
            snap: snap_rx,
            settings,
            engine: engine_rx,
            engines: engines_rx,
            store,
            hub,
            data: cfg.data,
            changes,
            metrics: cfg.metrics,
            stopping,
        };
        Ok((host, handle))
    }

    /// Ends builds a previous run left running, removes their containers, requeues the pending.
    async fn recover(&mut self) -> anyhow::Result<()> {
        // In the background: the host serves at once whatever the engine does.
        // On every engine of the pool; one that does not answer now is swept when it does.
        for engine in self.ctx.engines.clone() {
            let host_id = self.ctx.host_id.clone();
            self.workers.spawn(async move {
                for attempt in 0..720 {
                    match engine
                        .executor
                        .remove_labelled(&[(ams_docker::LABEL_HOST, &host_id)])
                        .await
                    {
                        Ok(names) => {
                            for n in names {
                                tracing::warn!(
                                    "removed container {n} left by an interrupted build on \
                                     engine {}",
                                    engine.name
                                );
                            }
                            return;
                        }
                        Err(e) => {
                            if attempt == 0 {
                                tracing::error!(
                                    "cannot remove leftover containers on engine {} now: {e}; \
                                     trying again while it does not answer",
                                    engine.name
                                );
                            }
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
            });
        }
        for b in self.store.unfinished().await? {
            match b.status {
                BuildStatus::Running => {
                    let reason = "interrupted by host restart";
                    let bd = self.ctx.data.project(&b.project).build(&b.name);
                    if let Ok(mut log) = crate::log::BuildLog::open(&bd.log(), u64::MAX, None) {
                        log.line(&format!("build {} ended: ERROR ({reason})", b.name));
                    }
                    let _ = std::fs::remove_dir_all(bd.ci());
                    let fin = Finish {
                        status: Some(BuildStatus::Error),
                        reason: Some(reason.into()),
                        finished_at: timefmt::now(),
                        stages: b.stages.clone(),
                        ..Default::default()
                    };
                    self.store.finish(b.id, &fin).await?;
                    self.metrics
                        .build_finished(&b.project, BuildStatus::Error, None, []);
                    tracing::warn!("build {} was interrupted by a host restart: ERROR", b.name);
                }
                _ => {
                    self.hub.queued(b.id);
                    let (only_latest, labels) = self
                        .settings
                        .get(&self.ctx.data, &b.project)
                        .map(|s| (s.only_latest, s.labels.clone()))
                        .unwrap_or_default();
                    let skipped = self.queue.push(Queued {
                        id: b.id,
                        project: b.project.clone(),
                        branch: b.branch.clone(),
                        only_latest,
                        labels,
                    });
                    let name = b.name.clone();
                    self.live.insert(b.id, b);
                    self.skip(skipped, &name).await;
                }
            }
        }
        Ok(())
    }

    /// Publishes the queue as it is now.
    fn publish(&self) {
        let rec = |id: &i64| self.live.get(id).cloned();
        let snap = QueueSnapshot {
            active: self.queue.active().filter_map(|id| rec(&id)).collect(),
            pending: self
                .queue
                .pending()
                .take(SNAPSHOT_PENDING)
                .filter_map(|q| rec(&q.id))
                .collect(),
            pending_total: self.queue.pending().count(),
            stopping: self.is_stopping(),
        };
        self.metrics
            .queue(snap.pending_total, self.queue.active_count());
        let slots = self.queue.engines();
        self.engine_health.send_if_modified(|all| {
            let mut changed = false;
            for (h, e) in all.iter_mut().zip(slots) {
                changed |= h.in_use != e.in_use;
                h.in_use = e.in_use;
            }
            changed
        });
        for h in self.engine_health.borrow().iter() {
            self.metrics
                .engine(&h.name, h.slots, h.in_use, h.up == Some(true));
        }
        self.snap.send_replace(Arc::new(snap));
    }

    async fn skip(&mut self, ids: Vec<i64>, by_name: &str) {
        for id in ids {
            let fin = Finish {
                status: Some(BuildStatus::Skip),
                reason: Some(format!("superseded by {by_name}")),
                finished_at: timefmt::now(),
                ..Default::default()
            };
            self.record_finish(id, &fin).await;
            if let Some(b) = self.live.remove(&id) {
                self.metrics
                    .build_finished(&b.project, BuildStatus::Skip, None, []);
            }
            self.hub.end(id, "skip");
        }
    }

    /// Runs the loop until shutdown.
    pub async fn run(mut self) {
        self.start_ready().await;
        self.publish();
        loop {
            let cmd = match self.deferred.take() {
                Some(c) => c,
                None => tokio::select! {
                    c = self.rx.recv() => match c {
                        Some(c) => c,
                        None => return,
                    },
                    Some(joined) = self.workers.join_next_with_id(), if !self.workers.is_empty() => {
                        self.reap(joined).await;
                        self.answer_drained();
                        continue;
                    }
                },
            };
            match cmd {
                // Answers go out after the snapshot shows their effect: a client that queues a
                // build and then lists the tasks sees it.
                Command::Build(req, settings, reply) => {
                    let r = self.queue_build(req, &settings).await;
                    self.start_ready().await;
                    self.publish();
                    let _ = reply.send(r);
                }
                Command::Cancel { build, by, reply } => {
                    let r = self.cancel(build, &by).await;
                    self.publish();
                    let _ = reply.send(r);
                }
                Command::DeleteOutput { build, by, reply } => {
                    self.delete_output(build, &by, reply).await
                }
                Command::Prune { builds, reply } => self.prune(builds, reply),
                Command::Complete {
                    id,
                    finish,
                    engine_failed,
                    requeue,
                } => {
                    if (engine_failed || requeue) && self.ctx.conf.engines.is_some() {
                        // No new build goes there until its monitor hears it answer again.
                        if let Some(e) = self.queue.engine_of(id) {
                            self.queue.set_healthy(e, false);
                            self.nudges[e].notify_one();
                        }
                    }
                    if !(requeue && self.requeue(id).await) {
                        let mut finish = finish;
                        let exhausted = self.requeues.get(&id).is_some_and(|n| *n > MAX_REQUEUES);
                        if requeue && exhausted {
                            finish.reason =
                                Some(format!(
                                "{}; it was queued again {MAX_REQUEUES} times already, so it ends \
                                 here",
                                finish.reason.as_deref().unwrap_or("its engine did not answer")
                            ));
                        }
                        self.complete(id, &finish).await;
                    }
                    self.start_ready().await;
                }
                Command::Retry { of, settings } => {
                    self.retries_pending = self.retries_pending.saturating_sub(1);
                    if let Some(settings) = settings {
                        self.retry(of, &settings).await;
                    }
                    self.start_ready().await;
                    self.publish();
                }
                Command::Webhook {
                    delivery,
                    requests,
                    reply,
                } => {
                    // Group commit: take every delivery already waiting into one transaction.
                    let mut batch = vec![(*delivery, requests, reply)];
                    while batch.len() < 512 {
                        match self.rx.try_recv() {
                            Ok(Command::Webhook {
                                delivery,
                                requests,
                                reply,
                            }) => batch.push((*delivery, requests, reply)),
                            Ok(other) => {
                                self.deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Answered once the deliveries and their builds are committed; superseding
                    // older builds and starting new ones follow (each its own write), so a
                    // sender does not wait for them.
                    let (answers, superseded) = self.webhook_batch(batch).await;
                    self.publish();
                    for (reply, answer) in answers {
                        let _ = reply.send(answer);
                    }
                    self.skip_superseded(superseded);
                    self.start_ready().await;
                    self.publish();
                }
                Command::EngineHealth { engine, up } => {
                    // Without `engines` in web_conf.json the one engine is waited for by each
                    // build (engine_wait_secs), as before pools: health gates only a pool.
                    if self.ctx.conf.engines.is_some() {
                        self.queue.set_healthy(engine, up);
                        self.start_ready().await;
                    }
                }
                Command::Drain(done) => {
                    self.draining.push(done);
                }
                Command::Shutdown(done) => {
                    self.shutdown().await;
                    let _ = done.send(());
                    return;
                }
            }
            self.answer_drained();
            self.publish();
            let _ = self.changes.send(());
        }
    }

    /// A worker task ended. One that returned has reported its build already; one that
    /// panicked or was aborted has not, so its build is ended here with the reason, its
    /// container removed and its slot freed.
    async fn reap(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (task, err) = match joined {
            Ok((task, ())) => (task, None),
            Err(e) => (e.id(), Some(e)),
        };
        let Some(id) = self.worker_builds.remove(&task) else {
            return;
        };
        let Some(err) = err else {
            return;
        };
        if !self.active.contains_key(&id) {
            return;
        }
        let why = if err.is_panic() {
            let p = err.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            format!("internal error: the build worker panicked ({msg})")
        } else {
            "internal error: the build worker was aborted".to_string()
        };
        tracing::error!("build {id}: {why}");
        if let Ok(Some(b)) = self.store.build_by_id(id).await {
            let bd = self.ctx.data.project(&b.project).build(&b.name);
            if let Ok(mut log) = crate::log::BuildLog::open(&bd.log(), u64::MAX, None) {
                log.line(&format!("build {} ended: ERROR ({why})", b.name));
            }
        }
        let ctx = self.ctx.clone();
        let engine = self.queue.engine_of(id).unwrap_or(0);
        self.workers
            .spawn(async move { remove_when_back(&ctx, engine, id).await });
        let fin = Finish {
            status: Some(BuildStatus::Error),
            reason: Some(why),
            finished_at: timefmt::now(),
            ..Default::default()
        };
        self.complete(id, &fin).await;
        self.start_ready().await;
        self.publish();
        let _ = self.changes.send(());
    }

    async fn queue_build(
        &mut self,
        req: BuildRequest,
        settings: &QueueSettings,
    ) -> Result<BuildRecord, HostError> {
        self.queue_build_of(req, settings, None).await
    }

    /// Queues build `of` again, for the commit it built (or asked for), by its actor and
    /// trigger; the new build names it in `retry_of`.
    async fn retry(&mut self, of: i64, settings: &QueueSettings) {
        let b = match self.store.build_by_id(of).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("cannot retry build {of}: {e}");
                return;
            }
        };
        let Ok(project) = ams_core::names::ProjectName::new(&b.project) else {
            return;
        };
        let req = BuildRequest {
            project,
            branch: b.branch.clone(),
            commit: b.git_hash.clone().or(b.commit.clone()),
            actor: b.created_by.clone(),
            trigger: Trigger::parse(&b.trigger).unwrap_or(Trigger::Cli),
            params: b.params.clone(),
        };
        match self.queue_build_of(req, settings, Some(of)).await {
            Ok(r) => tracing::info!("build {} ended ERROR: queued again as {}", b.name, r.name),
            Err(e) => tracing::error!("cannot queue build {} again: {e}", b.name),
        }
    }

    async fn queue_build_of(
        &mut self,
        req: BuildRequest,
        settings: &QueueSettings,
        retry_of: Option<i64>,
    ) -> Result<BuildRecord, HostError> {
        // Only declared parameters are taken; one that has no default and is not given fails
        // the build when it runs (a webhook or a schedule gives none).
        let declared: Vec<(String, Option<String>)> = settings
            .parameters
            .iter()
            .map(|(k, d)| (k.clone(), Some(d.clone().unwrap_or_default())))
            .collect();
        ams_core::pipeline::resolve_parameters(&declared, &req.params)
            .map_err(HostError::Invalid)?;
        let created = timefmt::now();
        let hash = worker::random_hex(20);
        let nb = NewBuild {
            project: req.project.to_string(),
            hash: hash.clone(),
            trigger: req.trigger.as_str().to_string(),
            branch: req.branch.clone(),
            commit: req.commit.clone(),
            created_by: req.actor.clone(),
            created_at: created,
            retry_of,
            params: req.params.clone(),
        };
        // The store names the build on its writer thread: the closure owns what it reads.
        let (format, project, name_hash) = (
            settings.name_format.clone(),
            nb.project.clone(),
            hash.clone(),
        );
        let record = self
            .store
            .create_build(&nb, move |i| {
                build_name(&format, &project, &name_hash, i, created)
            })
            .await
            .map_err(|e| match e {
                ams_store::StoreError::Invalid(m) if !ams_store::is_unavailable(&m) => {
                    HostError::Invalid(m)
                }
                e => HostError::store(e),
            })?;
        self.hub.queued(record.id);
        let skipped = self.queue.push(Queued {
            id: record.id,
            project: record.project.clone(),
            branch: record.branch.clone(),
            only_latest: settings.only_latest,
            labels: settings.labels.clone(),
        });
        self.live.insert(record.id, record.clone());
        self.skip(skipped, &record.name).await;
        tracing::info!(
            "queued build {} ({} by {})",
            record.name,
            record.trigger,
            record.created_by
        );
        Ok(record)
    }

    /// Records a batch of verified deliveries and queues their builds, in one transaction.
    /// Each sender is answered only after the commit, so an answered delivery is never lost.
    /// Also returns the older builds the new ones supersede (only-build-latest), to be skipped.
    async fn webhook_batch(
        &mut self,
        batch: Vec<(NewDelivery, Vec<CheckedRequest>, Reply<WebhookOutcome>)>,
    ) -> (
        Vec<(Reply<WebhookOutcome>, Result<WebhookOutcome, HostError>)>,
        Vec<(i64, String)>,
    ) {
        let created = timefmt::now();
        let mut settings_of: HashMap<String, Arc<QueueSettings>> = HashMap::new();
        let mut items = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (mut d, requests, reply) in batch {
            let mut builds = Vec::new();
            let mut errors = Vec::new();
            for (r, settings) in requests {
                match settings {
                    Ok(s) => {
                        settings_of.insert(r.project.to_string(), s);
                        builds.push(NewBuild {
                            project: r.project.to_string(),
                            hash: worker::random_hex(20),
                            trigger: r.trigger.as_str().to_string(),
                            branch: r.branch,
                            commit: r.commit,
                            created_by: r.actor,
                            created_at: created,
                            retry_of: None,
                            params: Default::default(),
                        })
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if builds.is_empty() {
                d.verdict = ams_core::webhooks::Verdict::Refused;
                d.reason = Some(if errors.is_empty() {
                    "nothing to build".into()
                } else {
                    errors.join("; ")
                });
            } else {
                d.verdict = ams_core::webhooks::Verdict::Accepted;
                if !errors.is_empty() {
                    d.reason = Some(errors.join("; "));
                }
            }
            replies.push((reply, d.reason.clone()));
            items.push(ams_store::DeliveryBatchItem {
                delivery: d,
                builds,
            });
        }
        let outcomes = self
            .store
            .accept_deliveries(items, {
                let settings_of = settings_of.clone();
                move |b, index| {
                    let f = settings_of
                        .get(&b.project)
                        .map(|s| s.name_format.as_str())
                        .unwrap_or(DEFAULT_NAME_FORMAT);
                    build_name(f, &b.project, &b.hash, index, b.created_at)
                }
            })
            .await;
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("cannot record webhook deliveries: {e}");
                let e = HostError::store(e);
                let answers = replies
                    .into_iter()
                    .map(|(reply, _)| (reply, Err(e.clone())))
                    .collect();
                return (answers, Vec::new());
            }
        };
        let mut answers = Vec::with_capacity(replies.len());
        let mut skipped: Vec<(i64, String)> = Vec::new();
        for ((reply, reason), outcome) in replies.into_iter().zip(outcomes) {
            let answer = match outcome {
                ams_store::DeliveryOutcome::Accepted(records) if !records.is_empty() => {
                    let mut names = Vec::new();
                    for r in records {
                        self.hub.queued(r.id);
                        let s = settings_of.get(&r.project);
                        let latest = s.is_some_and(|s| s.only_latest);
                        let labels = s.map(|s| s.labels.clone()).unwrap_or_default();
                        for id in self.queue.push(Queued {
                            id: r.id,
                            project: r.project.clone(),
                            branch: r.branch.clone(),
                            only_latest: latest,
                            labels,
                        }) {
                            skipped.push((id, format!("superseded by {}", r.name)));
                        }
                        tracing::info!("queued build {} (webhook by {})", r.name, r.created_by);
                        names.push(r.name.clone());
                        self.live.insert(r.id, r);
                    }
                    Ok(WebhookOutcome::Queued(names))
                }
                ams_store::DeliveryOutcome::Duplicate => Ok(WebhookOutcome::Duplicate),
                _ => Err(HostError::Invalid(
                    reason.unwrap_or_else(|| "nothing to build".into()),
                )),
            };
            answers.push((reply, answer));
        }
        (answers, skipped)
    }

    /// Records builds that newer ones superseded (only-build-latest) as skipped.
    fn skip_superseded(&mut self, skipped: Vec<(i64, String)>) {
        if skipped.is_empty() {
            return;
        }
        // The loop does not wait for this commit: it goes on to the next deliveries, whose
        // write comes after this one in the writer's queue (often in the same transaction).
        // Live views hear of the change once it is in the database, where they read it.
        let at = timefmt::now();
        let recorded = self.store.skip_builds(&skipped, at);
        let (changes, store, again) = (self.changes.clone(), self.store.clone(), skipped.clone());
        self.workers.spawn(async move {
            if let Err(e) = recorded.await {
                // They left the queue: while the database cannot take it (a full disk), keep
                // trying, so that they do not stay "pending" in the records (a restart
                // would queue them again, and supersede them again).
                tracing::error!("cannot record superseded builds now, trying again: {e}");
                let mut e = e;
                let mut wait = Duration::from_millis(250);
                while e.is_unavailable() {
                    tokio::time::sleep(wait).await;
                    match store.skip_builds(&again, at).await {
                        Ok(()) => {
                            tracing::info!("recorded {} superseded build(s)", again.len());
                            break;
                        }
                        Err(next) => e = next,
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                if !e.is_unavailable() {
                    tracing::error!("cannot record superseded builds: {e}");
                }
            }
            let _ = changes.send(());
        });
        for (id, _) in skipped {
            if let Some(b) = self.live.remove(&id) {
                self.metrics
                    .build_finished(&b.project, BuildStatus::Skip, None, []);
            }
            self.hub.end(id, "skip");
        }
    }

    async fn start_ready(&mut self) {
        // Checked before each start: a stop may begin while one is being recorded.
        while !self.is_stopping() {
            let Some(next) = self.queue.decide() else {
                break;
            };
            let (q, engine_index) = match next {
                ams_core::queue::Next::Start(q, e) => (q, e),
                ams_core::queue::Next::Impossible(q, why) => {
                    tracing::warn!("build {} cannot run on any engine: {why}", q.id);
                    let fin = Finish {
                        status: Some(BuildStatus::Fail),
                        reason: Some(why),
                        finished_at: timefmt::now(),
                        ..Default::default()
                    };
                    self.complete(q.id, &fin).await;
                    continue;
                }
            };
            let engine = self.ctx.engines[engine_index].clone();
            let now = timefmt::now();
            let record = match self.store.mark_running(q.id, now).await {
                Ok(()) => match self.live.get_mut(&q.id) {
                    Some(r) => {
                        r.status = BuildStatus::Running;
                        r.started_at = Some(now);
                        Some(r.clone())
                    }
                    None => self.store.build_by_id(q.id).await.ok().flatten(),
                },
                Err(e) if e.is_unavailable() => {
                    // It stays pending, first in line, and starts at the loop's next event.
                    tracing::error!("cannot start build {} now: {e}", q.id);
                    self.queue.put_back(q);
                    return;
                }
                Err(e) => {
                    tracing::error!("cannot start build {}: {e}", q.id);
                    None
                }
            };
            let Some(record) = record else {
                self.queue.finish(q.id);
                self.live.remove(&q.id);
                continue;
            };
            let stop = Arc::new(StopSignal::default());
            self.active.insert(
                q.id,
                Active {
                    stop: stop.clone(),
                    project: record.project.clone(),
                    started_at: record.started_at.unwrap_or(now),
                    queued: q.clone(),
                },
            );
            let ctx = self.ctx.clone();
            let tx = self.tx.clone();
            let log_tx = self.hub.sender(q.id);
            // A build queued again after its engine failed before its container existed
            // (`requeue`) starts once for its listeners: a second "started" is noise.
            if let Some(e) = self
                .events
                .as_ref()
                .filter(|_| !self.requeues.contains_key(&q.id))
            {
                e.event(q.id, EventKind::Started);
            }
            let task = self.workers.spawn(async move {
                tracing::info!("build {} started", record.name);
                let (fin, container_left, requeue) =
                    worker::run_build(&ctx, &engine, &record, &stop, log_tx).await;
                let _ = tx
                    .send(Command::Complete {
                        id: record.id,
                        finish: Box::new(fin),
                        engine_failed: container_left,
                        requeue,
                    })
                    .await;
                if container_left {
                    // The engine failed under the build: remove its container once the engine
                    // answers again (for an hour at most; a restart sweeps what is left).
                    remove_when_back(&ctx, engine_index, record.id).await;
                }
            });
            self.worker_builds.insert(task.id(), q.id);
        }
    }

    /// Puts a build whose engine failed before its container existed back in the queue, first
    /// in line, to run on another engine (that one is out of placement until it answers). At
    /// most [`MAX_REQUEUES`] times per build; false when it is not queued again (it ends as its
    /// worker said).
    async fn requeue(&mut self, id: i64) -> bool {
        let n = self.requeues.entry(id).or_default();
        *n += 1;
        if *n > MAX_REQUEUES {
            return false;
        }
        let Some(queued) = self.active.get(&id).map(|a| a.queued.clone()) else {
            return false;
        };
        match self.store.mark_pending_again(id).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                tracing::error!("cannot queue build {id} again: {e}");
                return false;
            }
        }
        self.active.remove(&id);
        self.queue.put_back(queued);
        if let Some(r) = self.live.get_mut(&id) {
            r.status = BuildStatus::Pending;
            r.started_at = None;
        }
        self.hub.queued(id);
        tracing::info!("build {id} queued again: its engine did not answer before it started");
        true
    }

    async fn complete(&mut self, id: i64, fin: &Finish) {
        self.requeues.remove(&id);
        self.queue.finish(id);
        let active = self.active.remove(&id);
        // A build the host's stop interrupted is not retried (docs/pipeline-config.md).
        let interrupted = active
            .as_ref()
            .is_some_and(|a| a.stop.reason() == Some(StopReason::Shutdown));
        let name = self
            .live
            .remove(&id)
            .map(|b| b.name)
            .unwrap_or_else(|| format!("#{id}"));
        self.record_finish(id, fin).await;
        let status = fin.status.unwrap_or(BuildStatus::Fail);
        if let Some(a) = active {
            let ran = fin.finished_at - a.started_at;
            let stages = fin.stages.iter().map(|s| s.duration_secs);
            self.metrics
                .build_finished(&a.project, status, Some(ran), stages);
            // Its folder changed: measured again off the loop (a full queue waits for the
            // next periodic walk).
            let _ = self.disk_dirty.try_send(a.project);
        }
        tracing::info!("build {name} finished: {status}");
        self.hub.end(id, status.as_str());
        if let Some(e) = &self.events {
            e.event(id, EventKind::Finished);
        }
        if status == BuildStatus::Error && !interrupted {
            self.retries_pending += 1;
            self.consider_retry(id);
        }
    }

    /// Off the loop: reads the project's `retry-on-error` and how often this build's work has
    /// run, and asks the loop to queue it again when retries are left (saying so in the ended
    /// build's log).
    fn consider_retry(&self, id: i64) {
        let (tx, store, cache, data, mut stopping) = (
            self.tx.clone(),
            self.store.clone(),
            self.settings.clone(),
            self.ctx.data.clone(),
            self.stopping.subscribe(),
        );
        let decided = tokio::spawn(async move {
            let settings = Self::decide_retry(id, store, cache, data).await;
            if let Some((_, wait)) = &settings {
                // A little longer after each attempt: a failure that is over in a moment does
                // not become a burst of builds and notifications. A stop cuts the wait short,
                // so the retry is queued before the host stops.
                tokio::select! {
                    _ = tokio::time::sleep(*wait) => {}
                    _ = stopping.wait_for(|s| *s) => {}
                }
            }
            settings.map(|(s, _)| s)
        });
        // The loop hears of every decision, a panicked one as "no retry": a stop waits for it.
        tokio::spawn(async move {
            let settings = decided.await.ok().flatten();
            let _ = tx.send(Command::Retry { of: id, settings }).await;
        });
    }

    /// Whether ERROR build `id` runs again, with its settings and the wait before it (the
    /// ended build's log says which).
    async fn decide_retry(
        id: i64,
        store: Store,
        cache: Arc<SettingsCache>,
        data: DataDir,
    ) -> Option<(Arc<QueueSettings>, Duration)> {
        let Ok(Some(b)) = store.build_by_id(id).await else {
            return None;
        };
        let (project, d) = (b.project.clone(), data.clone());
        let read = tokio::task::spawn_blocking(move || cache.get(&d, &project)).await;
        let Ok(Ok(settings)) = read else {
            return None;
        };
        if settings.retry_on_error == 0 {
            return None;
        }
        let Ok(attempts) = store.attempts(id).await else {
            return None;
        };
        let allowed = i64::from(settings.retry_on_error) + 1;
        // With only-build-latest, an older commit never runs after a newer build of its
        // branch: the retry would supersede (SKIP) that build.
        let newer = if settings.only_latest {
            let branch = b.branch.clone().unwrap_or_else(|| "null".into());
            store
                .builds_where(&b.project, &[("branch", branch.as_str())], 1, 0)
                .await
                .ok()
                .and_then(|v| v.into_iter().next())
                .filter(|n| n.id > id)
        } else {
            None
        };
        let line = if let Some(n) = &newer {
            format!(
                "retry-on-error: not queued again: build {} of the same branch is newer \
                 (only-build-latest)",
                n.name
            )
        } else if attempts < allowed {
            format!(
                "retry-on-error: queued again (attempt {} of {allowed})",
                attempts + 1
            )
        } else {
            format!("retry-on-error: no retries left ({attempts} of {allowed} attempts ran)")
        };
        tracing::info!("build {}: {line}", b.name);
        let path = data.project(&b.project).build(&b.name).log();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut log) = crate::log::BuildLog::open(&path, u64::MAX, None) {
                log.line(&line);
            }
        })
        .await;
        (attempts < allowed && newer.is_none()).then(|| {
            (
                settings,
                Duration::from_secs(2 * attempts.clamp(1, 30) as u64),
            )
        })
    }

    /// Records how a build ended. While the database cannot take it (a full disk, say) a
    /// background task keeps trying, so that the record follows once it can: the build is
    /// over either way, and its slot is free.
    async fn record_finish(&mut self, id: i64, fin: &Finish) {
        let e = match self.store.finish(id, fin).await {
            Ok(_) => return,
            Err(e) => e,
        };
        if !e.is_unavailable() {
            // Something in the record itself was refused: store a minimal final record, so
            // the build never stays running.
            tracing::error!("cannot record the end of build {id}: {e}; storing a minimal record");
            let minimal = Finish {
                status: Some(BuildStatus::Error),
                reason: Some(format!("the build's record could not be stored: {e}")),
                finished_at: fin.finished_at,
                ..Default::default()
            };
            if let Err(e) = self.store.finish(id, &minimal).await {
                tracing::error!("cannot record the end of build {id} at all: {e}");
            }
            return;
        }
        tracing::error!("cannot record the end of build {id} now, trying again: {e}");
        let (store, fin) = (self.store.clone(), fin.clone());
        self.workers.spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                tokio::time::sleep(wait).await;
                match store.finish(id, &fin).await {
                    Ok(_) => {
                        tracing::info!("recorded the end of build {id}");
                        return;
                    }
                    Err(e) if !e.is_unavailable() => {
                        tracing::error!("cannot record the end of build {id}: {e}");
                        return;
                    }
                    Err(_) => wait = (wait * 2).min(Duration::from_secs(5)),
                }
            }
        });
    }

    async fn find(&self, build: BuildId) -> Result<BuildRecord, HostError> {
        self.store
            .build_by_id(build.0)
            .await?
            .ok_or_else(|| HostError::NotFound(format!("no build {build}")))
    }

    async fn cancel(&mut self, build: BuildId, by: &str) -> Result<BuildRecord, HostError> {
        let b = self.find(build).await?;
        let now = timefmt::now();
        if self.queue.remove_pending(b.id) {
            self.store.set_canceled(b.id, by, now).await?;
            let fin = Finish {
                status: Some(BuildStatus::Cancel),
                reason: Some(format!("canceled by {by} before it started")),
                finished_at: now,
                ..Default::default()
            };
            self.store.finish(b.id, &fin).await?;
            self.live.remove(&b.id);
            self.metrics
                .build_finished(&b.project, BuildStatus::Cancel, None, []);
            self.hub.end(b.id, "cancel");
        } else if let Some(a) = self.active.get(&b.id) {
            self.store.set_canceled(b.id, by, now).await?;
            a.stop.stop(StopReason::Cancel { by: by.to_string() });
            if let Some(r) = self.live.get_mut(&b.id) {
                r.canceled_by = Some(by.to_string());
                r.canceled_at = Some(now);
            }
        } else {
            return Err(HostError::Conflict(format!(
                "build `{}` is already finished ({})",
                b.name, b.status
            )));
        }
        self.find(b.build_id()).await
    }

    async fn delete_output(&mut self, build: BuildId, by: &str, reply: crate::host::Reply<()>) {
        let b = match self.find(build).await {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !b.status.is_final() {
            let _ = reply.send(Err(HostError::Conflict(format!(
                "build `{}` is {}; cancel it before deleting its output",
                b.name, b.status
            ))));
            return;
        }
        let Some(removing) = self.claim(&[b.id]) else {
            let _ = reply.send(Err(HostError::Conflict(format!(
                "the output of build `{}` is being deleted already",
                b.name
            ))));
            return;
        };
        let bd = self.ctx.data.project(&b.project).build(&b.name);
        let store = self.store.clone();
        let by = by.to_string();
        let dirty = self.disk_dirty.clone();
        self.workers.spawn(async move {
            let _removing = removing;
            let removed =
                tokio::task::spawn_blocking(move || crate::retention::remove_output(&bd)).await;
            let r = match removed {
                Ok(Ok(_)) => store
                    .mark_output_deleted(b.id, timefmt::now())
                    .await
                    .map_err(HostError::store),
                Ok(Err(e)) => Err(HostError::Internal(format!(
                    "cannot delete the output of {}: {e}",
                    b.name
                ))),
                Err(e) => Err(HostError::Internal(e.to_string())),
            };
            if r.is_ok() {
                tracing::info!("output of build {} deleted by {by}", b.name);
                let _ = dirty.try_send(b.project.clone());
            }
            let _ = reply.send(r);
        });
    }

    /// Marks builds as being removed, unless one of them is already: the guard takes them
    /// out again when dropped.
    fn claim(&self, ids: &[i64]) -> Option<Removing> {
        let mut set = self.removing.lock().unwrap_or_else(|e| e.into_inner());
        if ids.iter().any(|id| set.contains(id)) {
            return None;
        }
        set.extend(ids.iter().copied());
        Some(Removing {
            set: self.removing.clone(),
            ids: ids.to_vec(),
        })
    }

    /// Retention's removal of final builds' files ([`Command::Prune`]). No file work here:
    /// the loop only refuses what it still holds as pending or running (or what is being
    /// removed already), and a task removes the rest on a blocking thread, then marks them.
    fn prune(&mut self, builds: Vec<BuildRecord>, reply: Reply<Vec<crate::retention::Pruned>>) {
        use crate::retention::Pruned;
        let mut out = Vec::with_capacity(builds.len());
        let mut go = Vec::with_capacity(builds.len());
        for b in builds {
            let live = self.live.contains_key(&b.id) || self.active.contains_key(&b.id);
            if live || !b.status.is_final() {
                out.push(Pruned {
                    id: b.id,
                    result: Err(format!(
                        "build `{}` is pending or running; retention never touches it",
                        b.name
                    )),
                });
            } else if let Some(claimed) = self.claim(&[b.id]) {
                go.push((b, claimed));
            } else {
                out.push(Pruned {
                    id: b.id,
                    result: Err(format!(
                        "the output of `{}` is being deleted already",
                        b.name
                    )),
                });
            }
        }
        let data = self.ctx.data.clone();
        let store = self.store.clone();
        let dirty = self.disk_dirty.clone();
        self.workers.spawn(async move {
            let ids: Vec<i64> = go.iter().map(|(b, _)| b.id).collect();
            let projects: std::collections::BTreeSet<String> =
                go.iter().map(|(b, _)| b.project.clone()).collect();
            let removed = tokio::task::spawn_blocking(move || {
                go.into_iter()
                    .map(|(b, claimed)| {
                        let bd = data.project(&b.project).build(&b.name);
                        let r = crate::retention::remove_output(&bd)
                            .map_err(|e| format!("cannot remove its files: {e}"));
                        (b.id, r, claimed)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let removed = match removed {
                Ok(r) => r,
                Err(e) => {
                    let why = format!("internal error: {e}");
                    out.extend(ids.into_iter().map(|id| Pruned {
                        id,
                        result: Err(why.clone()),
                    }));
                    let _ = reply.send(Ok(out));
                    return;
                }
            };
            let done: Vec<i64> = removed
                .iter()
                .filter(|(_, r, _)| r.is_ok())
                .map(|(id, _, _)| *id)
                .collect();
            let marked = store.mark_outputs_deleted(&done, timefmt::now()).await;
            // Their projects' disk use is measured again, off the loop.
            for p in projects {
                let _ = dirty.try_send(p);
            }
            for (id, r, _claimed) in removed {
                let result = match (&marked, r) {
                    (Err(e), Ok(_)) => Err(format!(
                        "its files were removed, but its record could not be marked: {e}"
                    )),
                    (_, r) => r,
                };
                out.push(Pruned { id, result });
            }
            let _ = reply.send(Ok(out));
        });
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Tells those waiting for the drain (see [`Command::Drain`]) once no build runs.
    fn answer_drained(&mut self) {
        if self.active.is_empty() && self.retries_pending == 0 {
            for done in self.draining.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn shutdown(&mut self) {
        for a in self.active.values() {
            a.stop.stop(StopReason::Shutdown);
        }
        // Wait for the workers to report; each stops its container within its stop timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Retries decided before the stop come at once (their wait is cut short).
        while !self.active.is_empty() || self.retries_pending > 0 {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Command::Complete { id, finish, .. })) => self.complete(id, &finish).await,
                // Queued for the next start, as the ended build's log says.
                Ok(Some(Command::Retry { of, settings })) => {
                    self.retries_pending = self.retries_pending.saturating_sub(1);
                    if let Some(settings) = settings {
                        self.retry(of, &settings).await;
                    }
                }
                Ok(Some(Command::Build(_, _, r))) => {
                    let _ = r.send(Err(HostError::ShuttingDown));
                }
                Ok(Some(Command::Webhook { reply, .. })) => {
                    let _ = reply.send(Err(HostError::ShuttingDown));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.workers.abort_all();
        while self.workers.join_next().await.is_some() {}
        if self.owns_store {
            self.store.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ams_docker::{ContainerSpec, ExecError, RunEnd};
    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn build_refs_cross_the_control_socket_whole_and_bad_ones_are_refused() {
        use serde_json::{json, Value};
        for r in [
            BuildRef::from_args("app_x_build_1", None),
            BuildRef::from_args("app/3", None),
            BuildRef::from_args("app", Some(3)),
        ] {
            assert_eq!(BuildRef::from_fields(&Value::Object(r.to_fields())), Ok(r));
        }
        assert_eq!(
            BuildRef::from_fields(&json!({"build": "3", "project": "app"})),
            Ok(BuildRef::Name {
                project: Some("app".into()),
                name: "3".into()
            }),
            "a name that is a number stays a name"
        );
        for bad in [
            json!({}),
            json!({"index": 3}),
            json!({"project": "app", "index": 0}),
            json!({"project": "app", "index": "3"}),
            json!({"project": "app", "index": 3, "build": "b"}),
        ] {
            assert!(BuildRef::from_fields(&bad).is_err(), "{bad}");
        }
    }

    /// An engine whose `run` panics for the image `panic`, waits to be stopped for `block`,
    /// fails (an ERROR build) when [`GATE`] is opened for `gate-error`, and otherwise ends at
    /// once.
    struct FakeExecutor;

    /// Opened by the one test whose builds use the image `gate-error`.
    static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();

    impl Executor for FakeExecutor {
        fn ensure_image<'a>(
            &'a self,
            _image: &'a str,
            _progress: &'a (dyn Fn(String) + Send + Sync),
        ) -> BoxFuture<'a, Result<(), ExecError>> {
            Box::pin(async { Ok(()) })
        }

        fn run<'a>(
            &'a self,
            spec: ContainerSpec,
            _output: mpsc::Sender<Bytes>,
            _stop: CancellationToken,
        ) -> BoxFuture<'a, Result<RunEnd, ExecError>> {
            Box::pin(async move {
                if spec.image == "panic" {
                    panic!("the fake engine exploded");
                }
                if spec.image == "block" {
                    _stop.cancelled().await;
                    return Ok(RunEnd::Stopped(143));
                }
                if spec.image == "gate-error" {
                    GATE.notified().await;
                    return Err(ExecError::Docker("the fake engine failed".into()));
                }
                Ok(RunEnd::Exited(0))
            })
        }

        fn remove_labelled<'a>(
            &'a self,
            _labels: &'a [(&'a str, &'a str)],
        ) -> BoxFuture<'a, Result<Vec<String>, ExecError>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn ping(&self) -> BoxFuture<'_, Result<(), ExecError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn request(project: &str) -> BuildRequest {
        BuildRequest {
            project: ProjectName::new(project).unwrap(),
            branch: None,
            commit: None,
            actor: "t".into(),
            trigger: Trigger::Cli,
            params: BTreeMap::new(),
        }
    }

    async fn wait_final(h: &HostHandle, id: i64) -> BuildRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let b = h.store.build_by_id(id).await.unwrap().unwrap();
            if b.status.is_final() {
                return b;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "build {id} stayed {}",
                b.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fake_project(data: &DataDir, name: &str, image: &str) {
        let pd = crate::project::init(data, name).unwrap();
        std::fs::write(
            pd.master_source().join("pipeline.json"),
            format!(
                r#"{{"docker": {{"image": "{image}", "project-dest": "/p", "build-output-dest": "/o"}},
                    "pipeline": [{{"name": "s", "commands": ["true"]}}]}}"#
            ),
        )
        .unwrap();
    }

    /// A host on a fake engine with one slot, and its running loop.
    async fn fake_host(data: &DataDir) -> (HostHandle, tokio::task::JoinHandle<()>) {
        let cfg = HostConfig {
            data: data.clone(),
            conf: WebConf {
                max_active_builds: 1,
                ..Default::default()
            },
            packer: None,
            events: None,
            metrics: Arc::default(),
            store: None,
        };
        let (host, h) = Host::start(cfg, Arc::new(FakeExecutor)).await.unwrap();
        (h, tokio::spawn(host.run()))
    }

    /// A build that ends ERROR during a graceful stop has its retry queued before the drain
    /// ends (its wait cut short), and nothing starts it: it waits, pending, for the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_decided_during_the_drain_is_queued_before_the_drain_ends() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path().join("data"));
        fake_project(&data, "p", "gate-error");
        std::fs::write(
            data.project("p")
                .config()
                .join(ams_core::private_config::PrivateConfig::FILE),
            r#"{"retry-on-error": 1}"#,
        )
        .unwrap();
        let (h, looped) = fake_host(&data).await;
        let first = h.build(request("p")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while h.store.build_by_id(first.id).await.unwrap().unwrap().status != BuildStatus::Running {
            assert!(tokio::time::Instant::now() < deadline, "it never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained = h.drain();
        tokio::pin!(drained);
        // Still running: the drain waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut drained)
                .await
                .is_err()
        );
        GATE.notify_one();
        tokio::time::timeout(Duration::from_secs(30), drained)
            .await
            .expect("the drain ended");
        assert_eq!(wait_final(&h, first.id).await.status, BuildStatus::Error);
        let all = h.store.builds_of("p", 10, 0).await.unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].retry_of, Some(first.id));
        assert_eq!(all[0].status, BuildStatus::Pending, "a retry started");
        h.shutdown().await;
        looped.await.unwrap();
    }

    /// The published snapshot lists at most SNAPSHOT_PENDING pending builds, with the total.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_snapshot_caps_the_pending_list_and_counts_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path().join("data"));
        fake_project(&data, "p", "block");
        let (h, looped) = fake_host(&data).await;
        let n = SNAPSHOT_PENDING + 20;
        for _ in 0..n {
            h.build(request("p")).await.unwrap();
        }
        let snap = h.snapshot().await.unwrap();
        assert_eq!(snap.active.len(), 1);
        assert_eq!(snap.pending.len(), SNAPSHOT_PENDING);
        assert_eq!(snap.pending_total, n - 1);
        // Queue order: the oldest pending first.
        assert!(snap.pending.windows(2).all(|w| w[0].id < w[1].id));
        h.shutdown().await;
        looped.await.unwrap();
    }

    /// The loop's own guard: a Prune naming builds it holds as running or pending (here with
    /// a forged final status) removes nothing and marks nothing; a final build goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prune_never_touches_a_running_or_pending_build() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path().join("data"));
        fake_project(&data, "p", "block");
        fake_project(&data, "done", "fine");
        let (h, looped) = fake_host(&data).await;
        let finished = h.build(request("done")).await.unwrap();
        let finished = wait_final(&h, finished.id).await;
        let running = h.build(request("p")).await.unwrap();
        let pending = h.build(request("p")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !h
            .snapshot()
            .await
            .unwrap()
            .active
            .iter()
            .any(|b| b.id == running.id)
        {
            assert!(tokio::time::Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dirs: Vec<_> = [&running, &pending]
            .iter()
            .map(|b| data.project("p").build(&b.name))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(&d.root).unwrap();
            std::fs::write(d.root.join("keep.txt"), "x").unwrap();
        }
        let forged: Vec<BuildRecord> = [running.clone(), pending.clone(), finished.clone()]
            .into_iter()
            .map(|mut b| {
                b.status = BuildStatus::Pass;
                b
            })
            .collect();
        let (reply, rx) = oneshot::channel();
        h.tx.send(Command::Prune {
            builds: forged,
            reply,
        })
        .await
        .unwrap();
        let out = rx.await.unwrap().unwrap();
        let result = |id: i64| out.iter().find(|p| p.id == id).unwrap().result.clone();
        for b in [&running, &pending] {
            let e = result(b.id).unwrap_err();
            assert!(e.contains("pending or running"), "{e}");
            let rec = h.store.build_by_id(b.id).await.unwrap().unwrap();
            assert_eq!(rec.output_deleted_at, None);
        }
        for d in &dirs {
            assert!(d.root.join("keep.txt").exists(), "{}", d.root.display());
        }
        assert!(result(finished.id).is_ok());
        assert!(!data.project("done").build(&finished.name).root.exists());
        let rec = h.store.build_by_id(finished.id).await.unwrap().unwrap();
        assert!(rec.output_deleted_at.is_some());
        h.shutdown().await;
        looped.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_worker_ends_its_build_and_frees_its_slot() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path().join("data"));
        for (p, image) in [("boom", "panic"), ("next", "fine")] {
            fake_project(&data, p, image);
        }
        let (h, looped) = fake_host(&data).await;
        let boom = h.build(request("boom")).await.unwrap();
        let next = h.build(request("next")).await.unwrap();
        let b = wait_final(&h, boom.id).await;
        assert_eq!(b.status, BuildStatus::Error);
        let reason = b.reason.unwrap_or_default();
        assert!(reason.contains("panicked"), "{reason}");
        assert!(reason.contains("the fake engine exploded"), "{reason}");
        let log = std::fs::read_to_string(data.project("boom").build(&b.name).log()).unwrap();
        assert!(log.contains("panicked"), "{log}");
        // The one slot was freed: the next build ran to its end.
        let n = wait_final(&h, next.id).await;
        assert_ne!(n.status, BuildStatus::Running);
        // And the loop still answers.
        assert!(h.snapshot().await.unwrap().active.is_empty());
        h.shutdown().await;
        looped.await.unwrap();
    }
}
