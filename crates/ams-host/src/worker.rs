//! One build, from its queue slot to its final record: prepare (git update of master, copy into
//! the build folder, trusted host commands), execute (the stages in one container through the
//! Executor), clean up (7z, hash, source removal). Every failure becomes a FAIL with a reason
//! written to the build's log; nothing here panics on input or touches the queue.

use crate::copy::{copy_tree, CopyKind};
use crate::git::{self, GitAuth};
use crate::log::{BuildLog, LogMsg};
use crate::paths::DataDir;
use crate::project;
use crate::source::{BuildSource, OverlaySupport, SourceKind};
use crate::timefmt;
use ams_core::docker_args::{self, DockerOptions};
use ams_core::pipeline::{self, Pipeline};
use ams_core::private_config::PrivateConfig;
use ams_core::protocol::{self, AfterStage, Event, Splitter};
use ams_core::status::BuildStatus;
use ams_core::vars;
use ams_core::webconf::WebConf;
use ams_docker::{BindMount, ContainerSpec, Executor, RunEnd};
use ams_store::{BuildRecord, Finish, StageResult};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Why a build is being stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Cancel {
        by: String,
    },
    Timeout {
        secs: u64,
    },
    Shutdown,
    /// Something the build needs failed on the host (its log could not be written).
    HostFault {
        why: String,
    },
}

/// Tells a running build to stop, and why. The first reason wins.
#[derive(Debug, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl StopSignal {
    pub fn stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// What every worker shares.
pub struct WorkerContext {
    pub data: DataDir,
    pub conf: Arc<WebConf>,
    /// The engines builds run on (the host's pool).
    pub engines: Vec<Arc<crate::host::Engine>>,
    pub host_id: String,
    /// One lock per project around the update and copy of master, holding what the last
    /// update of master fetched.
    pub master_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Fetched>>>>>,
    /// A program that packs and hashes in a child process (`amsbuild __pack`), so the LZMA
    /// encoder's large buffers never stay in the host's heap. `None`: pack in-process.
    pub packer: Option<PathBuf>,
    /// Whether overlay mounts work here (learnt at the first build).
    pub overlay: Arc<OverlaySupport>,
    /// The database, for the projects' sealed secrets (builds are recorded by the loop).
    pub store: ams_store::Store,
}

/// Master as the last update of a branch's head left it. A build of that branch's head queued
/// before that fetch started needs no fetch of its own: what the remote had when the build was
/// queued is in it (or something newer, as a fetch of its own would have given). Anything else
/// that moves master (an update to a given commit, another branch, master-dir-commands, a
/// failed update) forgets it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub branch: Option<String>,
    /// When the fetch started (seconds since the epoch, as `created_at`).
    pub started_at: f64,
    pub hash: String,
    pub message: Option<String>,
}

impl WorkerContext {
    fn master_lock(&self, project: &str) -> Arc<tokio::sync::Mutex<Option<Fetched>>> {
        let mut m = self.master_locks.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(project.to_string()).or_default().clone()
    }
}

/// What the stages of one execution need.
pub struct ExecRequest<'a> {
    pub pipeline: &'a Pipeline,
    pub vars: &'a BTreeMap<&'static str, String>,
    pub private: &'a PrivateConfig,
    pub conf: &'a WebConf,
    pub container_name: String,
    pub labels: HashMap<String, String>,
    pub source_dir: PathBuf,
    pub output_dir: PathBuf,
    pub ci_dir: PathBuf,
    /// The build's cache folders and where each is mounted.
    pub caches: Vec<(PathBuf, String)>,
    pub deadline: Instant,
    pub timeout_secs: u64,
    /// The secrets the stages receive as environment variables (name, value). The log masks
    /// their values already.
    pub secrets: &'a [(String, String)],
    /// The build's parameters, resolved (given values over pipeline.json's defaults).
    pub params: &'a [(String, String)],
}

/// A cache of the build: its resolved key, the scope it saves into, its folder.
struct CacheUse {
    key: String,
    scope: String,
    /// The default branch's scope, whose entries are evicted last.
    default_scope: String,
    dir: PathBuf,
    path: String,
}

/// How an execution ended.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub status: BuildStatus,
    pub reason: Option<String>,
    pub stages: Vec<StageResult>,
    /// False when the engine failed while the container may still exist (it may still be
    /// writing to the build's folders).
    pub container_gone: bool,
    /// The build's engine did not answer before its container existed, in a pool with other
    /// engines: the build may go back to the queue for another one.
    pub requeue: bool,
}

impl ExecOutcome {
    /// Ended before its stages for a cause in the project (its pipeline.json, say): FAIL.
    fn fail(reason: impl Into<String>) -> Self {
        ExecOutcome {
            container_gone: true,
            requeue: false,
            status: BuildStatus::Fail,
            reason: Some(reason.into()),
            stages: Vec::new(),
        }
    }

    /// Ended before its stages for a cause outside the project (the engine, the host's
    /// disk): ERROR.
    fn error(reason: impl Into<String>) -> Self {
        ExecOutcome {
            status: BuildStatus::Error,
            ..ExecOutcome::fail(reason)
        }
    }
}

/// Why a build could not get to its stages, and on whose side the cause is: the project's
/// (FAIL) or the host's and its engine's (ERROR).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: BuildStatus,
    pub reason: String,
}

impl Failure {
    fn project(reason: impl Into<String>) -> Self {
        Failure {
            status: BuildStatus::Fail,
            reason: reason.into(),
        }
    }

    fn host(reason: impl Into<String>) -> Self {
        Failure {
            status: BuildStatus::Error,
            reason: reason.into(),
        }
    }
}

/// The outcome of a build stopped early, or `None` when it was not stopped.
pub fn stopped_outcome(stop: &StopSignal) -> Option<(BuildStatus, String)> {
    stop.reason().map(|r| match r {
        StopReason::Cancel { by } => (BuildStatus::Cancel, format!("canceled by {by}")),
        StopReason::Timeout { secs } => (
            BuildStatus::Fail,
            format!("timed out after {secs} s (build timeout)"),
        ),
        StopReason::Shutdown => (
            BuildStatus::Error,
            "interrupted by host restart".to_string(),
        ),
        StopReason::HostFault { why } => (BuildStatus::Error, why),
    })
}

fn expand(field: &str, s: &str, values: &BTreeMap<&'static str, String>) -> Result<String, String> {
    vars::expand(s, values)
        .map_err(|v| format!("pipeline.json: field `{field}`: variable `{{{v}}}` has no value"))
}

/// Container options from docker.args plus the host's default limits.
pub fn container_options(
    args: &str,
    private: &PrivateConfig,
    conf: &WebConf,
) -> Result<DockerOptions, String> {
    let trusted = private.trusted_docker_keys();
    let mut o = docker_args::parse(args, &trusted)
        .map_err(|e| format!("pipeline.json: field `docker.args`: {e}"))?;
    let limits = docker_args::Limits {
        memory: conf.memory_bytes(),
        nano_cpus: (conf.container_cpus * 1e9) as i64,
        pids: conf.container_pids_limit,
    };
    docker_args::apply_limits(&mut o, limits, &trusted)
        .map_err(|e| format!("pipeline.json: field `docker.args`: {e}"))?;
    Ok(o)
}

/// Runs the stages of a pipeline in one container and reports each stage into the log.
pub async fn execute(
    executor: &dyn Executor,
    req: ExecRequest<'_>,
    log: &mut BuildLog,
    stop: &StopSignal,
) -> ExecOutcome {
    let p = req.pipeline;
    let v = req.vars;
    let nonce = random_hex(16);
    let prepared = (|| -> Result<_, String> {
        let image = expand("docker.image", &p.docker.image, v)?;
        let args = expand("docker.args", &p.docker.args, v)?;
        let project_dest = expand("docker.project-dest", &p.docker.project_dest, v)?;
        let output_dest = expand("docker.build-output-dest", &p.docker.build_output_dest, v)?;
        let mut env = vec!["CI=true".to_string()];
        for (k, val) in &p.environment {
            env.push(format!(
                "{k}={}",
                expand(&format!("environment.{k}"), val, v)?
            ));
        }
        for (k, val) in req.params {
            env.push(format!("{k}={val}"));
        }
        // Only in the container's environment: never in a label, a script or a mount.
        for (k, val) in req.secrets {
            env.push(format!("{k}={val}"));
        }
        let mut scripts = Vec::new();
        for (i, s) in p.stages.iter().enumerate() {
            let cmds = s
                .commands
                .iter()
                .enumerate()
                .map(|(j, c)| expand(&format!("pipeline[{i}].commands[{j}]"), c, v))
                .collect::<Result<Vec<_>, _>>()?;
            scripts.push(protocol::stage_script(&cmds, &nonce));
        }
        let options = container_options(&args, req.private, req.conf)?;
        Ok((image, project_dest, output_dest, env, scripts, options))
    })();
    let (image, project_dest, output_dest, env, scripts, options) = match prepared {
        Ok(x) => x,
        Err(e) => {
            log.line(&e);
            return ExecOutcome::fail(e);
        }
    };

    if !req.conf.registry_allowed(&image) {
        let msg = format!(
            "pipeline.json: field `docker.image`: `{image}` comes from registry `{}`, which \
             web_conf.json's allowed_registries does not list; use an image from {} or ask the \
             operator to add the registry",
            ams_core::docker_args::image_registry(&image),
            req.conf
                .allowed_registries
                .as_deref()
                .unwrap_or_default()
                .join(", ")
        );
        log.line(&msg);
        return ExecOutcome::fail(msg);
    }
    log.line(&format!("image {image}"));
    // Pull progress is kept (distinct messages, at most 50) and written once the pull ends.
    let progress_lines: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let progress = |msg: String| {
        let mut g = progress_lines.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() < 50 && g.last() != Some(&msg) {
            g.push(msg);
        }
    };
    // An engine that does not answer is waited for (up to engine_wait_secs), not a failure.
    let wait_until = Instant::now() + Duration::from_secs(req.conf.engine_wait_secs);
    // In a pool of engines a build is not held by one that is down: others may take it.
    let in_pool = req.conf.engines.as_ref().is_some_and(|e| e.len() > 1);
    let mut waiting = false;
    let ensured = loop {
        let r = tokio::select! {
            r = executor.ensure_image(&image, &progress) => r,
            _ = stop.token().cancelled() => return stopped(stop, Vec::new(), log),
            _ = tokio::time::sleep_until(req.deadline.into()) => {
                stop.stop(StopReason::Timeout { secs: req.timeout_secs });
                return stopped(stop, Vec::new(), log);
            }
        };
        match r {
            Err(ams_docker::ExecError::Unreachable(e)) if in_pool => {
                let msg = format!(
                    "the engine did not answer before the build's container existed ({e}); the \
                     build goes back to the queue for another engine"
                );
                log.line(&msg);
                return ExecOutcome {
                    requeue: true,
                    ..ExecOutcome::error(msg)
                };
            }
            Err(ams_docker::ExecError::Unreachable(e)) if Instant::now() < wait_until => {
                if !waiting {
                    log.line(&format!(
                        "the Docker engine is not answering ({e}); waiting for it up to {} s",
                        req.conf.engine_wait_secs
                    ));
                    waiting = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.token().cancelled() => return stopped(stop, Vec::new(), log),
                    _ = tokio::time::sleep_until(req.deadline.into()) => {
                        stop.stop(StopReason::Timeout { secs: req.timeout_secs });
                        return stopped(stop, Vec::new(), log);
                    }
                }
            }
            Err(ams_docker::ExecError::Unreachable(e)) => {
                break Err(ams_docker::ExecError::Unreachable(format!(
                    "{e}; waited {} s for the engine (engine_wait_secs in web_conf.json)",
                    req.conf.engine_wait_secs
                )))
            }
            other => {
                if waiting {
                    log.line("the Docker engine answers again");
                }
                break other;
            }
        }
    };
    for line in progress_lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
    {
        log.line(&format!("pull: {line}"));
    }
    if let Err(e) = ensured {
        let msg = e.to_string();
        log.line(&msg);
        return ExecOutcome::error(msg);
    }

    // Stage scripts and the driver live in a folder of their own, mounted read-only.
    let plan: Vec<AfterStage> = p
        .stages
        .iter()
        .map(|s| match (p.fail_fast && !s.allow_failure, &s.exit_line) {
            (false, _) => AfterStage::GoOn,
            (true, None) => AfterStage::StopOnFailure,
            (true, Some(_)) => AfterStage::AskHost,
        })
        .collect();
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&req.ci_dir)?;
        for (i, s) in scripts.iter().enumerate() {
            std::fs::write(req.ci_dir.join(format!("stage-{i}.sh")), s)?;
        }
        std::fs::write(
            req.ci_dir.join("driver.sh"),
            protocol::driver_script("/.ams-ci", &nonce, &plan),
        )
    })();
    if let Err(e) = written {
        let msg = format!(
            "cannot write stage scripts to {}: {e}",
            req.ci_dir.display()
        );
        log.line(&msg);
        return ExecOutcome::error(msg);
    }

    let memory_limit = options.memory.unwrap_or(0);
    // pipeline.json sets the grace between SIGTERM and SIGKILL; a repository cannot make a
    // cancel or a timeout wait longer than STOP_TIMEOUT_MAX.
    let stop_timeout = p.docker.stop_timeout_secs.min(STOP_TIMEOUT_MAX);
    if stop_timeout < p.docker.stop_timeout_secs {
        log.line(&format!(
            "docker.stop-timeout {} s is more than the host allows; {STOP_TIMEOUT_MAX} s is used",
            p.docker.stop_timeout_secs
        ));
    }
    let path_str = |p: &Path| p.to_string_lossy().to_string();
    // An engine on this machine bind-mounts the build's folders; one elsewhere gets them
    // through the archive endpoint, and the output comes back the same way after the run.
    let shares = executor.shares_files();
    if !shares && !options.binds.is_empty() {
        // On another machine the path names that machine's folder (or its engine's socket).
        let msg = format!(
            "docker.args mounts a folder of the host's machine ({}), which an engine on another \
             machine cannot give the container; ask for a label only engines on this machine \
             have (docker.labels, and `labels` of the engine in web_conf.json), or use a named \
             volume",
            options.binds.join(", ")
        );
        log.line(&msg);
        return ExecOutcome::fail(msg);
    }
    let (mounts, copy_in, copy_out) = if shares {
        let mounts = vec![
            BindMount {
                host: path_str(&req.source_dir),
                container: project_dest.clone(),
                read_only: false,
            },
            BindMount {
                host: path_str(&req.output_dir),
                container: output_dest,
                read_only: false,
            },
            BindMount {
                host: path_str(&req.ci_dir),
                container: "/.ams-ci".into(),
                read_only: true,
            },
        ]
        .into_iter()
        .chain(req.caches.iter().map(|(host, container)| BindMount {
            host: path_str(host),
            container: container.clone(),
            read_only: false,
        }))
        .collect();
        (mounts, Vec::new(), Vec::new())
    } else {
        let _ = std::fs::create_dir_all(&req.output_dir);
        let copy_out = |container: &str, host: &Path, max_bytes: u64| ams_docker::CopyOut {
            container: container.to_string(),
            host: host.to_path_buf(),
            max_bytes,
            replace: true,
            report: Default::default(),
        };
        // Caches go in with the source and come back after the run into the build's own copy
        // of each entry, which is saved (or not) exactly as on this machine.
        let copy_in = [
            (req.source_dir.clone(), project_dest.clone()),
            (req.output_dir.clone(), output_dest.clone()),
            (req.ci_dir.clone(), "/.ams-ci".to_string()),
        ]
        .into_iter()
        .chain(req.caches.iter().cloned())
        .collect();
        let outs = std::iter::once(copy_out(
            &output_dest,
            &req.output_dir,
            req.conf.archive_max_bytes,
        ))
        .chain(
            req.caches
                .iter()
                .map(|(host, container)| copy_out(container, host, req.conf.cache_max_bytes)),
        )
        .collect();
        (Vec::new(), copy_in, outs)
    };
    let copy_reports: Vec<_> = copy_out
        .iter()
        .map(|c| (c.container.clone(), c.host.clone(), c.report.clone()))
        .collect();
    let spec = ContainerSpec {
        name: req.container_name.clone(),
        image,
        labels: req.labels.clone(),
        env,
        cmd: vec!["/bin/sh".into(), "/.ams-ci/driver.sh".into()],
        workdir: Some(project_dest),
        mounts,
        options,
        stop_timeout_secs: stop_timeout,
        copy_in,
        copy_out,
    };

    log.line(&format!("container {}", req.container_name));
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let run = executor.run(spec, tx, stop.token().clone());
    tokio::pin!(run);
    let deadline = tokio::time::sleep_until(req.deadline.into());
    tokio::pin!(deadline);

    let mut splitter = Splitter::new(&nonce);
    let mut stages: Vec<StageResult> = Vec::new();
    let mut current: Option<(usize, Instant, f64)> = None;
    let mut events = Vec::new();
    let mut run_result = None;
    let mut rx_open = true;
    let handle = |events: &mut Vec<Event>,
                  log: &mut BuildLog,
                  stages: &mut Vec<StageResult>,
                  current: &mut Option<(usize, Instant, f64)>| {
        let mut pending: Vec<u8> = Vec::new();
        for ev in events.drain(..) {
            // The build can read its nonce, so markers are taken only in the driver's order:
            // each stage begins once, after the one before it ended, and ends once. Anything
            // else is dropped, so a build cannot make the host write or keep more than a
            // line and a result per stage.
            let in_order = match &ev {
                Event::Output(_) => true,
                Event::Begin(i) => current.is_none() && *i == stages.len() && *i < p.stages.len(),
                Event::End { stage, .. } => matches!(current, Some((c, _, _)) if c == stage),
            };
            if !in_order {
                continue;
            }
            match ev {
                Event::Output(b) => pending.extend_from_slice(&b),
                Event::Begin(i) => {
                    log.write(&pending);
                    pending.clear();
                    let name = p.stages.get(i).map(|s| s.name.as_str()).unwrap_or("?");
                    log.line(&format!("==> stage {}/{}: {name}", i + 1, p.stages.len()));
                    *current = Some((i, Instant::now(), timefmt::now()));
                }
                Event::End {
                    stage,
                    code,
                    last_line,
                } => {
                    log.write(&pending);
                    pending.clear();
                    let Some(def) = p.stages.get(stage) else {
                        continue;
                    };
                    let (started, started_at) = match current.take() {
                        Some((i, t, at)) if i == stage => (t, at),
                        _ => (Instant::now(), timefmt::now()),
                    };
                    let passed = protocol::stage_passed(code, &last_line, def.exit_line.as_deref());
                    let secs = started.elapsed().as_secs_f64();
                    let how = match &def.exit_line {
                        Some(want) => {
                            // Masked before it is quoted: quoting escapes characters, and an
                            // escaped value would no longer be found in the line.
                            let shown = log.mask_text(&last_line);
                            format!(", last line {shown:?}, exit-line {want:?}")
                        }
                        None => String::new(),
                    };
                    log.line(&format!(
                        "<== stage {}/{}: {} exit code {code}{how}: {} in {secs:.2} s",
                        stage + 1,
                        p.stages.len(),
                        def.name,
                        if passed { "PASS" } else { "FAIL" }
                    ));
                    if plan.get(stage) == Some(&AfterStage::AskHost) {
                        // Written whole, then renamed: the driver never reads half a verdict.
                        let v = if passed { "go\n" } else { "stop\n" };
                        let tmp = req.ci_dir.join(format!(".verdict-{stage}"));
                        let done = std::fs::write(&tmp, v).and_then(|_| {
                            std::fs::rename(&tmp, req.ci_dir.join(format!("verdict-{stage}")))
                        });
                        if let Err(e) = done {
                            stop.stop(StopReason::HostFault {
                                why: format!("cannot give the stage driver its verdict: {e}"),
                            });
                        }
                    }
                    stages.push(StageResult {
                        name: def.name.clone(),
                        exit_code: Some(code),
                        passed,
                        started_at,
                        duration_secs: secs,
                    });
                }
            }
        }
        log.write(&pending);
    };
    loop {
        tokio::select! {
            r = &mut run, if run_result.is_none() => run_result = Some(r),
            chunk = rx.recv(), if rx_open => match chunk {
                Some(c) => {
                    splitter.feed(&c, &mut events);
                    handle(&mut events, log, &mut stages, &mut current);
                    if let Some(e) = log.failed() {
                        if !stop.token().is_cancelled() {
                            stop.stop(StopReason::HostFault {
                                why: format!("the build log could not be written ({e})"),
                            });
                        }
                    }
                }
                None => rx_open = false,
            },
            _ = &mut deadline, if !stop.token().is_cancelled() => {
                stop.stop(StopReason::Timeout { secs: req.timeout_secs });
            }
        }
        if run_result.is_some() && !rx_open {
            break;
        }
    }
    splitter.finish(&mut events);
    handle(&mut events, log, &mut stages, &mut current);

    let end = match run_result {
        Some(Ok(end)) => end,
        Some(Err(e)) => {
            let msg = e.to_string();
            log.line(&msg);
            // Settings the engine refuses are the project's; any other engine failure is not.
            let status = if matches!(e, ams_docker::ExecError::Refused(_)) {
                BuildStatus::Fail
            } else {
                BuildStatus::Error
            };
            return ExecOutcome {
                container_gone: false,
                requeue: false,
                status,
                reason: Some(msg),
                stages,
            };
        }
        None => RunEnd::Exited(-1),
    };
    let mut reports = copy_reports
        .into_iter()
        .map(|(container, host, r)| {
            let taken = r.lock().unwrap_or_else(|e| e.into_inner()).take();
            (container, host, taken)
        })
        .collect::<Vec<_>>()
        .into_iter();
    let copied = reports.next().and_then(|(_, _, r)| r);
    // The caches' copies: one that did not come back whole is dropped, so it is never saved.
    for (container, host, r) in reports {
        match r {
            Some(Ok(x)) => log.line(&format!(
                "cache {container} read back from the engine: {} file(s), {} bytes",
                x.files, x.bytes
            )),
            Some(Err(e)) => {
                let e = if e.contains("archive_max_bytes") {
                    format!(
                        "it holds more than cache_max_bytes ({} bytes) in web_conf.json",
                        req.conf.cache_max_bytes
                    )
                } else {
                    e
                };
                log.line(&format!(
                    "cache {container} could not be read back from the engine ({e}); it is not \
                     saved"
                ));
                let _ = std::fs::remove_dir_all(&host);
            }
            None => {
                let _ = std::fs::remove_dir_all(&host);
            }
        }
    }
    match copied {
        Some(Ok(x)) => {
            log.line(&format!(
                "output read back from the engine: {} file(s), {} bytes",
                x.files, x.bytes
            ));
            if x.refused_total > 0 {
                log.line(&format!(
                    "{} entr(ies) of the output were not written (they would leave the output \
                     folder or are not files, folders or links): {}",
                    x.refused_total,
                    x.refused.join("; ")
                ));
            }
        }
        Some(Err(e)) => {
            let msg = format!("the build's output could not be read back from the engine: {e}");
            log.line(&msg);
            if stop.reason().is_some() {
                // Canceled or timed out while it came back: that is the build's end.
                return stopped(stop, stages, log);
            }
            let status = if e.contains("archive_max_bytes") {
                BuildStatus::Fail
            } else {
                BuildStatus::Error
            };
            return ExecOutcome {
                container_gone: true,
                requeue: false,
                status,
                reason: Some(msg),
                stages,
            };
        }
        None => {}
    }
    if let Some((i, t, at)) = current.take() {
        // The stage was cut off (stopped, or the container died).
        let def = &p.stages[i.min(p.stages.len() - 1)];
        stages.push(StageResult {
            name: def.name.clone(),
            exit_code: None,
            passed: false,
            started_at: at,
            duration_secs: t.elapsed().as_secs_f64(),
        });
    }
    let oom = matches!(end, RunEnd::OutOfMemory(_));
    if oom {
        log.line(&format!(
            "the engine reports that the container ran out of memory (limit {} MiB); \
             a process of the build was killed",
            memory_limit >> 20
        ));
    }
    match end {
        RunEnd::Stopped(_) if stop.reason().is_some() => stopped(stop, stages, log),
        RunEnd::Exited(0)
            if p.fail_fast && stages.len() < p.stages.len() && stopped_fast(p, &stages) =>
        {
            let failed = stages.last().map(|s| s.name.as_str()).unwrap_or("?");
            let msg = format!(
                "fail-fast: stage `{failed}` failed; the {} later stage(s) did not run",
                p.stages.len() - stages.len()
            );
            log.line(&msg);
            ExecOutcome {
                container_gone: true,
                requeue: false,
                status: BuildStatus::Fail,
                reason: Some(msg),
                stages,
            }
        }
        RunEnd::Exited(code) | RunEnd::Stopped(code) | RunEnd::OutOfMemory(code) => {
            let mut passed: Vec<bool> = stages.iter().map(|s| s.passed).collect();
            let mut reason = None;
            if p.fail_fast && stages.len() == p.stages.len() {
                return ExecOutcome {
                    container_gone: true,
                    requeue: false,
                    status: fail_fast_status(p, &stages),
                    reason,
                    stages,
                };
            }
            if stages.len() < p.stages.len() {
                let why = if oom {
                    format!(" (out of memory: the limit is {} MiB)", memory_limit >> 20)
                } else if (129..=159).contains(&code) {
                    format!(" (killed by signal {} from outside the build)", code - 128)
                } else {
                    String::new()
                };
                let msg = format!(
                    "the container ended with code {code} after {} of {} stages{why}",
                    stages.len(),
                    p.stages.len(),
                );
                log.line(&msg);
                reason = Some(msg);
                passed.resize(p.stages.len(), false);
            }
            ExecOutcome {
                container_gone: true,
                requeue: false,
                status: BuildStatus::from_stage_results(&passed),
                reason,
                stages,
            }
        }
    }
}

/// With `fail-fast`: whether the last stage that ran failed without allowing failure, so the
/// driver stopped there.
fn stopped_fast(p: &Pipeline, stages: &[StageResult]) -> bool {
    match stages.last() {
        Some(s) => !s.passed && !p.stages[stages.len() - 1].allow_failure,
        None => false,
    }
}

/// With `fail-fast`, once every stage ran: FAIL when a stage that does not allow failure
/// failed, WARN when only stages that allow it failed, else PASS.
fn fail_fast_status(p: &Pipeline, stages: &[StageResult]) -> BuildStatus {
    let failed = |allowed: bool| {
        stages
            .iter()
            .zip(&p.stages)
            .any(|(r, d)| !r.passed && d.allow_failure == allowed)
    };
    if failed(false) {
        BuildStatus::Fail
    } else if failed(true) {
        BuildStatus::Warn
    } else {
        BuildStatus::Pass
    }
}

fn stopped(stop: &StopSignal, stages: Vec<StageResult>, log: &mut BuildLog) -> ExecOutcome {
    let (status, reason) = stopped_outcome(stop).unwrap_or((BuildStatus::Fail, "stopped".into()));
    log.line(&reason);
    ExecOutcome {
        container_gone: true,
        requeue: false,
        status,
        reason: Some(reason),
        stages,
    }
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Values of the pipeline variables for a build.
pub fn build_vars(
    data: &DataDir,
    b: &BuildRecord,
    git_hash: &str,
) -> BTreeMap<&'static str, String> {
    let pd = data.project(&b.project);
    let bd = pd.build(&b.name);
    let s = |p: PathBuf| p.to_string_lossy().to_string();
    let mut m = BTreeMap::new();
    m.insert("project", b.project.clone());
    m.insert("build_name", b.name.clone());
    m.insert("build_hash", b.hash.clone());
    m.insert("build_index", b.build_index.to_string());
    m.insert("git_hash", git_hash.to_string());
    m.insert("actor", b.created_by.clone());
    m.insert("created", timefmt::compact(b.created_at));
    m.insert("project_dir", s(pd.root.clone()));
    m.insert("build_dir", s(bd.root.clone()));
    m.insert("master_source_dir", s(pd.master_source()));
    m.insert("build_source_dir", s(bd.source()));
    m.insert("master_build_name", "master".to_string());
    m
}

/// How a list of prepare-build host commands runs.
struct HostRun<'a> {
    values: &'a BTreeMap<&'static str, String>,
    /// pipeline-config.json's `trust-host-commands`.
    trusted: bool,
    /// The list's SSH settings, given to its git as `GIT_SSH_COMMAND`: the project's key for
    /// the list and its known_hosts (a host key pinned on first use is logged).
    ssh: &'a GitAuth,
}

/// Runs trusted host commands one by one in `dir`, streaming their output into the log.
async fn host_commands(
    what: &str,
    commands: &[String],
    dir: &Path,
    run: &HostRun<'_>,
    log: &mut BuildLog,
    stop: &StopSignal,
) -> Result<bool, String> {
    if commands.is_empty() {
        return Ok(false);
    }
    if !run.trusted {
        log.line(&format!(
            "refused {} host command(s) of prepare-build.{what}: the project's private \
             config/pipeline-config.json does not set \"trust-host-commands\": true; the built-in \
             git update prepared the source instead (see {})",
            commands.len(),
            ams_core::compat::COMPAT_DOC
        ));
        return Ok(false);
    }
    let ssh_command = run.ssh.ssh_command()?;
    let watch = run.ssh.watch();
    let result = run_host_commands(what, commands, dir, run.values, &ssh_command, log, stop).await;
    for l in watch.first_use_lines() {
        tracing::info!("project {}: {l}", run.ssh.project);
        log.line(&l);
    }
    result.map(|()| true)
}

async fn run_host_commands(
    what: &str,
    commands: &[String],
    dir: &Path,
    values: &BTreeMap<&'static str, String>,
    ssh_command: &str,
    log: &mut BuildLog,
    stop: &StopSignal,
) -> Result<(), String> {
    for (i, c) in commands.iter().enumerate() {
        let cmd = expand(&format!("prepare-build.{what}[{i}]"), c, values)?;
        log.line(&format!("host $ {cmd}"));
        // Its own process group, as git's (see `git::git`).
        let mut child = tokio::process::Command::new("sh")
            .process_group(0)
            .arg("-c")
            .arg(format!("exec 2>&1\n{cmd}"))
            .env("GIT_SSH_COMMAND", ssh_command)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run host command: {e}"))?;
        // Dropped first on any way out (a stop here, or the build's future dropped at any
        // await): the command's whole group goes, so what it started goes too.
        let mut group = crate::group::GroupKill::new(child.id());
        let mut out = child.stdout.take().ok_or("no stdout")?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            use tokio::io::AsyncReadExt;
            tokio::select! {
                n = out.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => log.write(&buf[..n]),
                },
                _ = stop.token().cancelled() => return Err("stopped".into()),
            }
        }
        let status = tokio::select! {
            s = child.wait() => s.map_err(|e| format!("host command: {e}"))?,
            _ = stop.token().cancelled() => return Err("stopped".into()),
        };
        group.reaped();
        if !status.success() {
            return Err(format!("prepare-build.{what}[{i}] failed with {status}"));
        }
    }
    Ok(())
}

/// The largest pipeline.json the host reads: the parser's own cap.
pub const PIPELINE_MAX_BYTES: u64 = pipeline::MAX_BYTES as u64;

/// The longest grace a build's container gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT_MAX: u64 = 60;

/// Everything before the stages: the private config, the git update, pipeline.json, the copy.
struct Prepared {
    pipeline: Pipeline,
    private: PrivateConfig,
    git_hash: Option<String>,
    commit_message: Option<String>,
    /// Taken by the caller, which releases it when the build ends.
    source: Option<BuildSource>,
    /// The secrets the stages receive (name, value); empty when withheld or asked for none.
    secrets: Vec<(String, String)>,
    caches: Vec<CacheUse>,
}

/// What preparation learnt before it could fail: a build that fails after the git update
/// still records the commit it was at.
#[derive(Default)]
struct Seen {
    git_hash: Option<String>,
    commit_message: Option<String>,
}

async fn prepare(
    ctx: &WorkerContext,
    b: &BuildRecord,
    log: &mut BuildLog,
    stop: &StopSignal,
    seen: &mut Seen,
) -> Result<Prepared, Failure> {
    let prep_started = Instant::now();
    let pd = ctx.data.project(&b.project);
    let bd = pd.build(&b.name);
    if !project::exists(&ctx.data, &b.project) {
        return Err(Failure::project(format!(
            "project `{}` no longer exists",
            b.project
        )));
    }
    let private = project::private_config(&pd).map_err(Failure::project)?;
    let ssh = project::ssh(&pd, &b.project, &private).map_err(Failure::project)?;
    for n in &ssh.notes {
        log.line(n);
    }
    let auth = ssh.git.clone();
    let lock = ctx.master_lock(&b.project);
    let mut fetched = lock.lock().await;
    let src = pd.master_source();
    let (git_hash, commit_message) = if src.join(".git").exists() {
        let branch = b.branch.clone().or_else(|| private.branch.clone());
        log.line(&format!(
            "updating master: {}",
            match (&b.commit, &branch) {
                (Some(c), _) => format!("commit {c}"),
                (None, Some(br)) => format!("head of branch {br}"),
                (None, None) => "head of the default branch".to_string(),
            }
        ));
        let fresh = fetched
            .as_ref()
            .filter(|f| b.commit.is_none() && f.branch == branch && f.started_at > b.created_at)
            .cloned();
        if let Some(f) = fresh {
            log.line(&format!(
                "master was fetched at {}, after this build was queued: no fetch needed",
                timefmt::iso(f.started_at)
            ));
            log.line(&format!("git_hash {}", f.hash));
            (Some(f.hash), f.message)
        } else {
            *fetched = None;
            let started_at = timefmt::now();
            let watch = auth.watch();
            let h = git::update(
                &src,
                branch.as_deref(),
                b.commit.as_deref(),
                &auth,
                stop.token(),
            )
            .await;
            for l in watch.first_use_lines() {
                tracing::info!("project {}: {l}", b.project);
                log.line(&l);
            }
            let h = h.map_err(|e| match e {
                git::UpdateError::Remote(e) => Failure::host(e),
                git::UpdateError::Refused(e) => Failure::project(e),
            })?;
            log.line(&format!("git_hash {h}"));
            let message = git::message(&src, &h, stop.token()).await;
            if b.commit.is_none() {
                *fetched = Some(Fetched {
                    branch,
                    started_at,
                    hash: h.clone(),
                    message: message.clone(),
                });
            }
            (Some(h), message)
        }
    } else {
        log.line("master/project_source is not a git checkout: building it as it is");
        (None, None)
    };
    seen.git_hash = git_hash.clone();
    seen.commit_message = commit_message.clone();
    let text = crate::source::read_checkout_file(&src, "pipeline.json", PIPELINE_MAX_BYTES)
        .map_err(|e| Failure::project(format!("master/project_source/{e}")))?;
    let text = String::from_utf8(text)
        .map_err(|_| Failure::project("pipeline.json is not UTF-8 text; save it as UTF-8"))?;
    let pipeline = pipeline::parse(&text).map_err(|e| Failure::project(e.to_string()))?;
    for w in &pipeline.warnings {
        log.line(w);
    }
    let secrets = build_secrets(
        ctx,
        b,
        &pipeline,
        &private,
        SecretSource {
            dir: &src,
            git_hash: git_hash.as_deref(),
            auth: &auth,
        },
        log,
        stop,
    )
    .await?;
    let mut values = build_vars(&ctx.data, b, git_hash.as_deref().unwrap_or(""));
    if !pipeline.prepare.master_dir_commands.is_empty() {
        // They may move master or change its files, even when they fail.
        *fetched = None;
    }
    let ran_in_master = host_commands(
        "master-dir-commands",
        &pipeline.prepare.master_dir_commands,
        &src,
        &HostRun {
            values: &values,
            trusted: private.trust_host_commands,
            ssh: &ssh.git,
        },
        log,
        stop,
    )
    .await
    .map_err(Failure::project)?;
    let mut git_hash = git_hash;
    let mut commit_message = commit_message;
    if let Some(h) = &git_hash {
        if !pipeline.prepare.get_git_hash {
            log.line(&format!(
                "prepare-build.get-git-hash is false: the described system then left \
                 {{git_hash}} empty; AMS-Build always knows the commit it builds and records \
                 {h} (see {})",
                ams_core::compat::COMPAT_DOC
            ));
        } else if ran_in_master {
            // get-git-hash: the commit master is at after its commands, as the described
            // system read it; that is the source the build copies.
            match git::head(&src, stop.token()).await {
                Some(now) if now != *h => {
                    log.line(&format!(
                        "get-git-hash: master-dir-commands moved master from {h} to {now}; \
                         building and recording {now}"
                    ));
                    commit_message = git::message(&src, &now, stop.token()).await;
                    values.insert("git_hash", now.clone());
                    git_hash = Some(now);
                    seen.git_hash = git_hash.clone();
                    seen.commit_message = commit_message.clone();
                }
                Some(_) => {}
                None => log.line(
                    "get-git-hash: cannot read master's commit after master-dir-commands; \
                     recording the commit of the update",
                ),
            }
        }
    }

    // The build's own source: nothing it writes reaches master or another build.
    let started = Instant::now();
    let (from_src, to_src) = (src.clone(), bd.source());
    let (from_out, to_out) = (pd.master_build(), bd.output());
    let mode = private.source_copy;
    let ctx_overlay = ctx.overlay.clone();
    let source = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let _ = crate::source::unmount_stale(&to_src);
        for p in [&to_src, &to_out] {
            if p.exists() {
                std::fs::remove_dir_all(p)?;
            }
        }
        let source = crate::source::prepare(&from_src, &to_src, mode, &ctx_overlay)?;
        if from_out.is_dir() {
            copy_tree(&from_out, &to_out, CopyKind::Clone)?;
        } else {
            std::fs::create_dir_all(&to_out)?;
        }
        Ok(source)
    })
    .await
    .map_err(|e| Failure::host(format!("copy task: {e}")))?
    .map_err(|e| Failure::host(format!("cannot prepare the build's source: {e}")))?;
    let st = source.stats;
    log.line(&format!(
        "source for builds/{}: {} ({} files{}) in {:.3} s",
        b.name,
        match &source.kind {
            SourceKind::Overlay => "copy-on-write snapshot of master (overlay)".to_string(),
            SourceKind::Clone { why: None } => "copy of master".to_string(),
            SourceKind::Clone { why: Some(w) } => format!("copy of master ({w})"),
        },
        st.files,
        if st.links > 0 {
            format!(", {} links", st.links)
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    ));
    drop(fetched);
    log.line(&format!(
        "source prepared in {:.3} s",
        prep_started.elapsed().as_secs_f64()
    ));

    if let Err(e) = host_commands(
        "build-dir-commands",
        &pipeline.prepare.build_dir_commands,
        &bd.source(),
        &HostRun {
            values: &values,
            trusted: private.trust_host_commands,
            ssh: &ssh.build_commands,
        },
        log,
        stop,
    )
    .await
    {
        if let Err(r) = release_source(source, !pipeline.cleanup.remove_build_source).await {
            log.line(&format!("could not release the build source: {r}"));
        }
        return Err(Failure::project(e));
    }
    let caches = restore_caches(
        ctx,
        b,
        &pipeline,
        &private,
        &values,
        !secrets.is_empty(),
        log,
    )
    .await;
    Ok(Prepared {
        pipeline,
        private,
        git_hash,
        commit_message,
        source: Some(source),
        secrets,
        caches,
    })
}

/// Where a build's commit can be checked against its branch.
struct SecretSource<'a> {
    dir: &'a Path,
    git_hash: Option<&'a str>,
    auth: &'a GitAuth,
}

/// The branch a build is of, for `secret-branches`: the one it names; else, when it names no
/// commit either, the project's `branch` (the build is of that branch's head). A commit asked
/// for without a branch, or the remote's default branch, is of no named branch.
fn secret_branch(b: &BuildRecord, private: &PrivateConfig) -> Option<String> {
    match (&b.branch, &b.commit) {
        (Some(br), _) => Some(br.clone()),
        (None, None) => private.branch.clone(),
        (None, Some(_)) => None,
    }
}

/// The secrets the stages receive: the values of pipeline.json's `secrets`, when the build is
/// of a branch that pipeline-config.json's `secret-branches` allows (and a commit it names is
/// on that branch); otherwise none, said in one line of the log. A name the project has no
/// secret of fails the build (FAIL: the project's pipeline.json) either way; a key that
/// cannot open them is the host's failure (ERROR). Given secrets set the log's masker before
/// anything else is written.
async fn build_secrets(
    ctx: &WorkerContext,
    b: &BuildRecord,
    p: &Pipeline,
    private: &PrivateConfig,
    src: SecretSource<'_>,
    log: &mut BuildLog,
    stop: &StopSignal,
) -> Result<Vec<(String, String)>, Failure> {
    let names = &p.secrets;
    if names.is_empty() || p.dummy_build {
        return Ok(Vec::new());
    }
    let stored = ctx
        .store
        .secrets_of(&b.project)
        .await
        .map_err(|e| Failure::host(format!("cannot read the project's secrets: {e}")))?;
    if let Some(n) = names.iter().find(|n| !stored.iter().any(|s| &s.name == *n)) {
        return Err(Failure::project(crate::secrets::unknown(&b.project, n)));
    }
    let branch = secret_branch(b, private);
    let listed = || {
        private
            .secret_branches
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let withheld = match &branch {
        _ if private.secret_branches.is_empty() => Some(
            "pipeline-config.json lists no \"secret-branches\" (add the branches whose builds \
             may have them)"
                .to_string(),
        ),
        Some(br) if !ams_core::secrets::branch_allowed(&private.secret_branches, Some(br)) => {
            Some(format!(
                "branch {br} is not in pipeline-config.json's secret-branches [{}]",
                listed()
            ))
        }
        None if !ams_core::secrets::branch_allowed(&private.secret_branches, None) => {
            Some(format!(
                "the build is of no named branch (a commit by itself, or the remote's default \
             branch), and pipeline-config.json's secret-branches [{}] does not hold \"*\"",
                listed()
            ))
        }
        _ => None,
    };
    // A commit named beside the branch must be on it: else any commit could be built with
    // the secrets of a trusted branch.
    let withheld = match (withheld, &b.commit, &branch) {
        (None, Some(c), Some(br)) => match src.git_hash {
            None => Some(format!(
                "commit {c} cannot be checked against branch {br}: master is not a git checkout"
            )),
            Some(h) => match git::commit_on_branch(src.dir, h, br, src.auth, stop.token()).await {
                Ok(true) => None,
                Ok(false) => Some(format!("commit {c} is not on branch {br}")),
                Err(e) => Some(format!(
                    "cannot tell whether commit {c} is on branch {br} ({e})"
                )),
            },
        },
        (w, _, _) => w,
    };
    if let Some(why) = withheld {
        log.line(&format!(
            "secrets withheld: {why}; the stages run without {}",
            names.join(", ")
        ));
        return Ok(Vec::new());
    }
    let values = crate::secrets::open_for_build(&ctx.data, &ctx.store, &b.project, names)
        .await
        .map_err(Failure::host)?;
    let masker = crate::secrets::masker(values.iter().map(|(_, v)| v.clone()).collect())
        .await
        .map_err(Failure::host)?;
    if let Some(m) = masker {
        log.set_masker(m);
    }
    log.line(&format!(
        "secrets for the stages, as environment variables (masked in this log): {}",
        names.join(", ")
    ));
    Ok(values)
}

/// Most bytes of checkout files one build's cache keys may hash (`{hash:FILE}`).
const CACHE_HASH_BUDGET: u64 = 256 << 20;

/// The build's caches: each key resolved, its folder filled from the newest entry of the
/// build's scope or, failing that, of the default branch's. A build of its branch's head
/// (or of a commit a forge pushed to that branch) uses its branch's scope; a build of a commit
/// named by hand is not known to be on any branch, so it saves into a scope of its own. A
/// cache that cannot be prepared starts empty (the build runs without it) and says why. The
/// file reads, hashes and copies run on a blocking thread.
/// A build with secrets uses the scopes of builds with secrets, one without them the others:
/// nothing a build with secrets left in a cache reaches a build that may not have them.
async fn restore_caches(
    ctx: &WorkerContext,
    b: &BuildRecord,
    pipeline: &Pipeline,
    private: &PrivateConfig,
    values: &BTreeMap<&'static str, String>,
    with_secrets: bool,
    log: &mut BuildLog,
) -> Vec<CacheUse> {
    if pipeline.caches.is_empty() {
        return Vec::new();
    }
    let pd = ctx.data.project(&b.project);
    let bd = pd.build(&b.name);
    let default = private.branch.clone().unwrap_or_default();
    let own = if b.commit.is_some() && b.trigger != ams_core::names::Trigger::Webhook.as_str() {
        COMMIT_SCOPE.to_string()
    } else {
        b.branch.clone().unwrap_or_else(|| default.clone())
    };
    let scope = if with_secrets {
        crate::cache::secret_scope
    } else {
        crate::cache::scope
    };
    let mut scopes = vec![scope(&own)];
    if own != default {
        scopes.push(scope(&default));
    }
    let (caches, values) = (pipeline.caches.clone(), values.clone());
    let default_label = default.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut out = Vec::new();
        let mut hashed: HashMap<String, String> = HashMap::new();
        let mut budget = CACHE_HASH_BUDGET;
        let src = bd.source();
        for (i, c) in caches.iter().enumerate() {
            let path = match vars::expand(&c.path, &values) {
                Ok(p) => p,
                Err(v) => {
                    lines.push(format!(
                        "cache {}: not used: variable `{{{v}}}` has no value",
                        c.path
                    ));
                    continue;
                }
            };
            let key = c.resolve_key(
                |file| {
                    if let Some(h) = hashed.get(file) {
                        return Ok(h.clone());
                    }
                    let h = match crate::source::read_checkout_file(&src, file, budget) {
                        Ok(bytes) => {
                            budget -= bytes.len() as u64;
                            crate::cache::file_hash(&bytes)
                        }
                        Err(crate::source::CheckoutReadError::Missing { .. }) => "none".into(),
                        Err(crate::source::CheckoutReadError::TooLarge { .. }) => {
                            return Err(format!(
                                "the files of {{hash:…}} hold more than {} MiB in all",
                                CACHE_HASH_BUDGET >> 20
                            ))
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    hashed.insert(file.to_string(), h.clone());
                    Ok(h)
                },
                &values,
            );
            let key = match key {
                Ok(k) => k,
                Err(e) => {
                    lines.push(format!("cache {path}: not used: key: {e}"));
                    continue;
                }
            };
            let dir = crate::cache::build_folder(&bd, i);
            match crate::cache::restore(&pd, &scopes, &key, &dir) {
                Ok(from) => {
                    lines.push(format!(
                        "cache {key} at {path}: {}",
                        match from {
                            Some(s) if s == scopes[0] => "restored".to_string(),
                            Some(_) =>
                                format!("restored from the default branch ({default_label})"),
                            None => "none yet; it starts empty".to_string(),
                        }
                    ));
                    out.push(CacheUse {
                        key,
                        scope: scopes[0].clone(),
                        default_scope: scope(&default_label),
                        dir,
                        path,
                    });
                }
                Err(e) => lines.push(format!("cache {key}: not used: {e}")),
            }
        }
        (out, lines)
    })
    .await;
    let (out, lines) = done.unwrap_or_default();
    for l in lines {
        log.line(&l);
    }
    out
}

/// The scope of builds of a commit named by hand (not known to be on a branch).
const COMMIT_SCOPE: &str = "@commits";

/// After the build: a passing build's caches become entries of its branch (unless they are
/// there already); every cache folder leaves the build's folder.
async fn save_caches(
    ctx: &WorkerContext,
    b: &BuildRecord,
    caches: Vec<CacheUse>,
    passed: bool,
    log: &mut BuildLog,
) {
    if caches.is_empty() {
        return;
    }
    let pd = ctx.data.project(&b.project);
    let max = ctx.conf.cache_max_bytes;
    let protect = caches[0].default_scope.clone();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for c in &caches {
            if passed {
                lines.push(match crate::cache::save(&pd, &c.scope, &c.key, &c.dir) {
                    Ok(crate::cache::Saved::Saved) => format!("cache {}: saved", c.key),
                    Ok(crate::cache::Saved::Kept) => {
                        format!("cache {}: kept (the entry exists)", c.key)
                    }
                    Err(e) => format!("cache {}: not saved: {e}", c.key),
                });
            }
            let _ = std::fs::remove_dir_all(&c.dir);
        }
        if !passed {
            lines.push("caches not saved: the build did not pass".to_string());
        }
        for (entry, size) in crate::cache::evict(&pd, max, &protect) {
            lines.push(format!(
                "cache entry {entry} removed ({size} bytes): the project's caches are over \
                 cache_max_bytes in web_conf.json"
            ));
        }
        lines
    })
    .await
    .unwrap_or_default();
    for l in lines {
        log.line(&l);
    }
}

/// Runs a whole build and returns its final record, whether its container may have been left
/// on an engine that failed, and whether it may go back to the queue (see
/// [`ExecOutcome::requeue`]). `log_tx` publishes the live log.
pub async fn run_build(
    ctx: &WorkerContext,
    engine: &crate::host::Engine,
    b: &BuildRecord,
    stop: &StopSignal,
    log_tx: broadcast::Sender<LogMsg>,
) -> (Finish, bool, bool) {
    let started = Instant::now();
    let pd = ctx.data.project(&b.project);
    let bd = pd.build(&b.name);
    // Until the build gets to its stages, any end is the host's (its disk, say).
    let mut fin = Finish {
        status: Some(BuildStatus::Error),
        ..Default::default()
    };
    if let Err(e) = std::fs::create_dir_all(&bd.root) {
        fin.reason = Some(format!("cannot create {}: {e}", bd.root.display()));
        fin.finished_at = timefmt::now();
        return (fin, false, false);
    }
    let mut log = match BuildLog::open(&bd.log(), ctx.conf.log_max_bytes, Some(log_tx)) {
        Ok(l) => l,
        Err(e) => {
            fin.reason = Some(format!("cannot write {}: {e}", bd.log().display()));
            fin.finished_at = timefmt::now();
            return (fin, false, false);
        }
    };
    log.line(&format!(
        "AMS-Build {}: build {} of project {} (trigger {}, by {}, queued {})",
        env!("CARGO_PKG_VERSION"),
        b.name,
        b.project,
        b.trigger,
        b.created_by,
        timefmt::iso(b.created_at)
    ));

    // One deadline covers preparation and stages.
    let timeout_secs = ctx.conf.build_timeout_secs;
    let mut seen = Seen::default();
    let prepared = tokio::select! {
        r = prepare(ctx, b, &mut log, stop, &mut seen) => Some(r),
        _ = tokio::time::sleep(Duration::from_secs(timeout_secs)) => {
            stop.stop(StopReason::Timeout { secs: timeout_secs });
            None
        }
        _ = stop.token().cancelled() => None,
    };
    let mut cleanup_pipeline: Option<Pipeline> = None;
    let mut build_source: Option<BuildSource> = None;
    let mut caches: Vec<CacheUse> = Vec::new();
    // Packing counts against the build's timeout too (the pipeline's own, once it is known).
    let mut deadline = started + Duration::from_secs(timeout_secs);
    let mut timeout_total = timeout_secs;
    fin.git_hash = seen.git_hash;
    fin.commit_message = seen.commit_message;
    let outcome = match prepared {
        None => {
            let (s, r) = stopped_outcome(stop).unwrap_or((BuildStatus::Fail, "stopped".into()));
            log.line(&r);
            ExecOutcome {
                container_gone: true,
                requeue: false,
                status: s,
                reason: Some(r),
                stages: Vec::new(),
            }
        }
        Some(Err(e)) => {
            let (status, reason) = match stopped_outcome(stop) {
                Some(x) => x,
                None => (e.status, e.reason),
            };
            log.line(&format!("build failed before its stages: {reason}"));
            ExecOutcome {
                container_gone: true,
                requeue: false,
                status,
                reason: Some(reason),
                stages: Vec::new(),
            }
        }
        Some(Ok(mut prep)) => {
            fin.git_hash = prep.git_hash.clone();
            fin.commit_message = prep.commit_message.clone();
            cleanup_pipeline = Some(prep.pipeline.clone());
            build_source = prep.source.take();
            caches = std::mem::take(&mut prep.caches);
            let p = &prep.pipeline;
            // The parameters against the pipeline at the commit built (it may differ from
            // master's, which the trigger was checked against).
            let params = ams_core::pipeline::resolve_parameters(&p.parameters, &b.params);
            if p.dummy_build {
                log.line("dummy build: no container is run");
                ExecOutcome {
                    container_gone: true,
                    requeue: false,
                    status: BuildStatus::Dummy,
                    reason: None,
                    stages: Vec::new(),
                }
            } else if let Err(e) = &params {
                let msg = format!("pipeline.json: {e}");
                log.line(&msg);
                ExecOutcome::fail(msg)
            } else {
                let params = params.unwrap_or_default();
                if !params.is_empty() {
                    let names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
                    log.line(&format!("parameters: {}", names.join(", ")));
                }
                let timeout = p.timeout_secs.unwrap_or(timeout_secs);
                deadline = started + Duration::from_secs(timeout);
                timeout_total = timeout;
                let values = build_vars(&ctx.data, b, prep.git_hash.as_deref().unwrap_or(""));
                let mut labels = HashMap::new();
                labels.insert(ams_docker::LABEL_HOST.to_string(), ctx.host_id.clone());
                labels.insert(ams_docker::LABEL_BUILD_ID.to_string(), b.id.to_string());
                labels.insert(ams_docker::LABEL_BUILD_NAME.to_string(), b.name.clone());
                labels.insert(ams_docker::LABEL_PROJECT.to_string(), b.project.clone());
                let req = ExecRequest {
                    pipeline: p,
                    vars: &values,
                    private: &prep.private,
                    conf: &ctx.conf,
                    container_name: ams_core::names::sanitize_container_name(&format!(
                        "{}{}",
                        b.project, b.hash
                    )),
                    labels,
                    source_dir: bd.source(),
                    output_dir: bd.output(),
                    ci_dir: bd.ci(),
                    caches: caches
                        .iter()
                        .map(|c| (c.dir.clone(), c.path.clone()))
                        .collect(),
                    deadline: started + Duration::from_secs(timeout),
                    timeout_secs: timeout,
                    secrets: &prep.secrets,
                    params: &params,
                };
                let missing: Vec<&String> = p
                    .docker
                    .labels
                    .iter()
                    .filter(|l| !engine.labels.contains(l))
                    .collect();
                if missing.is_empty() {
                    log.line(&format!("runs on engine {}", engine.name));
                    execute(engine.executor.as_ref(), req, &mut log, stop).await
                } else {
                    let msg = format!(
                        "pipeline.json: field `docker.labels`: this commit asks for {:?}, which \
                         engine {} (chosen by master's pipeline.json when the build was queued) \
                         lacks; build again once master's pipeline.json has the same labels",
                        missing, engine.name
                    );
                    log.line(&msg);
                    ExecOutcome::fail(msg)
                }
            }
        }
    };
    let container_left = !outcome.container_gone;
    let requeue = outcome.requeue;
    fin.status = Some(outcome.status);
    fin.reason = outcome.reason;
    fin.stages = outcome.stages;
    let _ = std::fs::remove_dir_all(bd.ci());
    // Nothing the build leaves on the host runs as its owner.
    let out = bd.output();
    if out.is_dir() {
        match tokio::task::spawn_blocking(move || crate::source::strip_setid(&out)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => log.line(&format!(
                "cleared the set-user-id/set-group-id bits of {n} file(s) in the output"
            )),
            Ok(Err(e)) => log.line(&format!("could not check the output's file modes: {e}")),
            Err(e) => log.line(&format!("could not check the output's file modes: {e}")),
        }
    }
    if let Some(src) = build_source {
        // A container the engine may not have removed could still write into the upper
        // layer while it is folded: keep nothing of it then.
        let keep = outcome.container_gone
            && cleanup_pipeline
                .as_ref()
                .is_some_and(|p| !p.cleanup.remove_build_source);
        if let Err(e) = release_source(src, keep).await {
            log.line(&format!("could not release the build source: {e}"));
        }
    }

    // A build stopped before its cleanup (canceled, timed out) is not reported on or archived:
    // say so once, rather than starting a packer the stop ends at once.
    if let Some((_, why)) =
        stopped_outcome(stop).filter(|_| stop.reason() != Some(StopReason::Shutdown))
    {
        if cleanup_pipeline
            .as_ref()
            .is_some_and(|p| p.cleanup.archive || !p.test_reports.is_empty())
        {
            log.line(&format!(
                "the output is not read or archived: {why}; the output folder is kept"
            ));
        }
    }
    // A build the host failed has no result of the project's to archive.
    if stop.reason().is_none() && outcome.status != BuildStatus::Error {
        if let Some(p) = cleanup_pipeline
            .as_ref()
            .filter(|p| !p.test_reports.is_empty())
        {
            let (out, patterns) = (bd.output(), p.test_reports.clone());
            match tokio::task::spawn_blocking(move || crate::reports::collect(&out, &patterns))
                .await
            {
                Ok(Some(mut report)) => {
                    // Names and messages are the build's text: no secret of it is shown.
                    report.map_text(|t| log.mask_text(t));
                    log.line(&report.summary_line());
                    for u in &report.unreadable {
                        log.line(&format!("test report {}: {}", u.file, u.reason));
                    }
                    fin.tests = Some(report);
                }
                Ok(None) => {}
                Err(e) => log.line(&format!("could not read the test reports: {e}")),
            }
        }
        if let Some(p) = &cleanup_pipeline {
            let limits = PackLimits {
                deadline,
                timeout_secs: timeout_total,
                max_bytes: ctx.conf.archive_max_bytes,
                stop,
            };
            cleanup(
                ctx.packer.as_deref(),
                &bd,
                &b.name,
                p,
                &mut fin,
                &mut log,
                limits,
            )
            .await;
        }
    }
    if let Some(e) = log.failed().map(str::to_string) {
        // A log that could not be written never ends in PASS: say so in the record, and in
        // the log itself if space came back.
        fin.status = Some(BuildStatus::Error);
        let why = format!("the build log could not be written ({e})");
        if fin.reason.as_deref() != Some(why.as_str()) {
            fin.reason = Some(match fin.reason.take() {
                Some(r) => format!("{why}; {r}"),
                None => why,
            });
        }
        log.mark_failure();
    }
    // Saved once the status is final (packing and the log can still fail the build); a
    // container the engine may still run could write on: keep nothing of it then.
    let passed = fin.status == Some(BuildStatus::Pass) && outcome.container_gone;
    save_caches(ctx, b, caches, passed, &mut log).await;
    fin.finished_at = timefmt::now();
    // The record is shown and sent elsewhere (pages, API, notifications): nothing in it
    // shows a secret of this build.
    fin.reason = fin.reason.map(|r| log.mask_text(&r));
    fin.commit_message = fin.commit_message.map(|m| log.mask_text(&m));
    log.line(&format!(
        "build {} finished: {}{} in {:.2} s",
        b.name,
        fin.status.unwrap_or(outcome.status),
        fin.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64()
    ));
    (fin, container_left, requeue)
}

/// What packing reported: (files, symlinks, bytes) and the hash as (method, hex).
type Packed = ((u64, u64, u64), Option<(String, String)>);

/// Packs `out` into `archive` and hashes it, in a child process when `packer` is set: the 7z
/// writer's LZMA encoders take tens of megabytes, which the host's heap would keep. An empty
/// output is packed here: its archive is a fixed 32-byte header, with no encoder.
pub async fn pack(
    packer: Option<&Path>,
    out: PathBuf,
    archive: PathBuf,
    hash: Option<ams_core::pipeline::HashKind>,
) -> Result<Packed, String> {
    let packer = packer.filter(|_| !ams_archive::is_empty_dir(&out));
    if let Some(exe) = packer {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("__pack").arg(&out).arg(&archive);
        if let Some(k) = hash {
            cmd.arg(k.name());
        }
        let o = cmd
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run the packer {}: {e}", exe.display()))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .map_err(|e| format!("the packer answered badly: {e}"))?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let hash = match (v["hash_kind"].as_str(), v["hash"].as_str()) {
            (Some(k), Some(h)) => Some((k.to_string(), h.to_string())),
            _ => None,
        };
        return Ok(((n("files"), n("symlinks"), n("bytes")), hash));
    }
    tokio::task::spawn_blocking(move || -> Result<Packed, String> {
        let s = ams_archive::pack_dir(&out, &archive).map_err(|e| e.to_string())?;
        let hash = match hash {
            Some(k) => Some((
                k.name().to_string(),
                ams_archive::hash_file(&archive, k).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        Ok(((s.files, s.symlinks, s.bytes), hash))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// What bounds packing: the build's deadline, its stop signal and the output's size.
struct PackLimits<'a> {
    deadline: Instant,
    timeout_secs: u64,
    max_bytes: u64,
    stop: &'a StopSignal,
}

async fn cleanup(
    packer: Option<&Path>,
    bd: &crate::paths::BuildDir,
    name: &str,
    p: &Pipeline,
    fin: &mut Finish,
    log: &mut BuildLog,
    limits: PackLimits<'_>,
) {
    let c = p.cleanup.clone();
    if c.archive && bd.output().is_dir() {
        let (out, archive) = (bd.output(), bd.archive.clone());
        let started = Instant::now();
        log.line(&format!("archiving the build output to {name}.7z"));
        let size_of = out.clone();
        let size = tokio::task::spawn_blocking(move || ams_archive::apparent_size(&size_of))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let too_big = matches!(size, Ok(n) if n > limits.max_bytes);
        let packed = match size {
            Err(e) => Err(format!("cannot measure the output: {e}")),
            Ok(n) if n > limits.max_bytes => Err(format!(
                "the output holds {n} bytes (sparse files count in full), more than \
                 archive_max_bytes ({}) in web_conf.json allows; write less into the output",
                limits.max_bytes
            )),
            Ok(_) => {
                let stop = limits.stop;
                // The packer is a child process, killed when this future is dropped.
                let run = pack(packer, out.clone(), archive, c.hash);
                tokio::select! {
                    r = run => r,
                    _ = stop.token().cancelled() => Err(stopped_outcome(stop)
                        .map(|(_, r)| format!("packing stopped: {r}"))
                        .unwrap_or_else(|| "packing stopped".into())),
                    _ = tokio::time::sleep_until(limits.deadline.into()) => {
                        stop.stop(StopReason::Timeout { secs: limits.timeout_secs });
                        Err(stopped_outcome(stop)
                            .map(|(_, r)| format!("packing stopped: {r}"))
                            .unwrap_or_else(|| "packing stopped".into()))
                    }
                }
            }
        }
        .and_then(|r| {
            std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            Ok(r)
        });
        if let Some((status, _)) = stopped_outcome(limits.stop) {
            // Canceled or timed out while packing: that decides the status.
            fin.status = Some(status);
        }
        match packed {
            Ok(((files, links, bytes), hash)) => {
                log.line(&format!(
                    "archived build output to {name}.7z ({files} files, {links} links, {bytes} bytes) in {:.2} s",
                    started.elapsed().as_secs_f64()
                ));
                fin.archive_name = Some(format!("{name}.7z"));
                if let Some((kind, h)) = hash {
                    log.line(&format!("7z_hash {kind} {h}"));
                    fin.archive_hash = Some(h);
                    fin.archive_hash_kind = Some(kind);
                }
            }
            Err(e) => {
                let msg =
                    format!("archiving the build output failed: {e}; the output folder is kept");
                log.line(&msg);
                let _ = std::fs::remove_file(bd.archive.with_extension("7z.partial"));
                // An output over the limit is the project's doing; a packer that failed (a
                // full disk, say) is the host's, and the build has no archive to show.
                if !too_big && stopped_outcome(limits.stop).is_none() {
                    fin.status = Some(BuildStatus::Error);
                }
                fin.reason = Some(match fin.reason.take() {
                    Some(r) => format!("{r}; {msg}"),
                    None => msg,
                });
            }
        }
    }
}

/// Unmounts the build's source and keeps it as plain folders or removes it.
async fn release_source(src: BuildSource, keep: bool) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || src.release(keep))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod var_tests {
    use super::*;

    /// Every documented pipeline.json variable has a value in a build, and no other does.
    #[test]
    fn build_vars_give_every_documented_variable() {
        let b: BuildRecord = serde_json::from_value(serde_json::json!({
            "id": 1, "project": "p", "build_index": 2, "name": "p_2", "hash": "h",
            "git_hash": null, "commit_message": null, "status": "pending", "reason": null,
            "trigger": "cli", "branch": null, "commit": null, "created_by": "a",
            "created_at": 1.0, "started_at": null, "finished_at": null, "canceled_by": null,
            "canceled_at": null, "archive_name": null, "archive_hash": null,
            "archive_hash_kind": null, "output_deleted_at": null, "stages": []
        }))
        .unwrap();
        let values = build_vars(&DataDir::new("/d"), &b, "g");
        let mut names: Vec<&str> = values.keys().copied().collect();
        let mut documented = ams_core::vars::PIPELINE_VARS.to_vec();
        names.sort();
        documented.sort();
        assert_eq!(names, documented);
        for name in ams_core::vars::PIPELINE_VARS {
            let out = ams_core::vars::expand(&format!("{{{name}}}"), &values).unwrap();
            assert!(!out.is_empty() && !out.contains('{'), "{name}: {out}");
        }
    }
}
