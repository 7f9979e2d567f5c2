//! Retention: removes the folders, logs and archives of finished builds that a project's
//! retention no longer keeps, and marks their records deleted (as `delete-output` does), so
//! the lists still show them.
//!
//! A run ([`Gc::run`]) happens beside the loop, never in it: it reads the projects' private
//! configs on a blocking thread, asks the store which final builds are beyond the newest
//! `keep-builds` or older than `max-age-days`, and hands them to the loop as one
//! [`Command::Prune`] per project. The loop refuses any build it still holds as pending or
//! running, and passes the rest to a task that removes their files on a blocking thread: the
//! same path as `delete-output`, and the same set of builds being removed, so the two never
//! work on one build at once. A build's record is final only once its worker has archived it
//! and reported, so nothing else writes to a final build's files; a follower that has its log
//! open reads it to its end. One run at a time; the host runs one shortly after its start and
//! then hourly, and `amsbuild gc` one at once.

use crate::error::HostError;
use crate::host::Command;
use crate::paths::{BuildDir, DataDir};
use crate::{project, timefmt};
use ams_core::retention::Policy;
use ams_store::{BuildRecord, Store};
use serde::Serialize;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The first automatic run, after the host's start.
pub const FIRST_RUN: Duration = Duration::from_secs(300);
/// Between automatic runs.
pub const EVERY: Duration = Duration::from_secs(3600);

/// A walk of a build's tree stops this deep (a build chooses its tree).
const MAX_DEPTH: usize = 256;

/// One build's files as retention removed them (or would).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedBuild {
    pub name: String,
    pub status: String,
    pub finished_at: Option<f64>,
    /// Why retention no longer keeps it.
    pub why: String,
    /// Bytes on disk its removal frees (or would free).
    pub bytes: u64,
    /// Why its files could not be removed; its record is then left as it was.
    pub error: Option<String>,
}

/// A project's part of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectReport {
    pub project: String,
    pub policy: Policy,
    pub builds: Vec<RemovedBuild>,
    /// Bytes freed (or that would be), over the builds without an error.
    pub bytes: u64,
    /// Why the project was left alone (its private config cannot be read, say).
    pub error: Option<String>,
}

/// What a run did, or would do.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// The projects that have a retention (or whose settings could not be read).
    pub projects: Vec<ProjectReport>,
    /// Bytes freed (or that would be) in all.
    pub bytes: u64,
}

/// A build the loop handed to removal, or refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Pruned {
    pub id: i64,
    /// Bytes freed, or why not.
    pub result: Result<u64, String>,
}

/// Runs retention; shared by the handle (for `amsbuild gc`) and the hourly task.
pub struct Gc {
    store: Store,
    data: DataDir,
    /// web_conf.json's defaults.
    defaults: Policy,
    tx: mpsc::Sender<Command>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Gc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gc")
    }
}

fn why(e: &ams_store::Expired, policy: &Policy) -> String {
    let mut parts = Vec::new();
    if let (true, Some(n)) = (e.beyond_keep, policy.keep_builds) {
        parts.push(format!("beyond the newest {n}"));
    }
    if let (true, Some(d)) = (e.too_old, policy.max_age_days) {
        parts.push(format!("finished more than {d} days ago"));
    }
    parts.join("; ")
}

impl Gc {
    pub(crate) fn new(
        store: Store,
        data: DataDir,
        defaults: Policy,
        tx: mpsc::Sender<Command>,
    ) -> Self {
        Gc {
            store,
            data,
            defaults,
            tx,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Each project's retention, read on a blocking thread (the private configs are files).
    async fn policies(&self) -> Result<Vec<(String, Result<Policy, String>)>, HostError> {
        let (data, defaults) = (self.data.clone(), self.defaults);
        tokio::task::spawn_blocking(move || {
            project::list(&data)
                .into_iter()
                .map(|name| {
                    let policy = project::private_config(&data.project(&name))
                        .map(|c| Policy::resolve(&c.retention, defaults));
                    (name, policy)
                })
                .collect()
        })
        .await
        .map_err(|e| HostError::Internal(format!("cannot read the projects' settings: {e}")))
    }

    /// One run: removes what retention no longer keeps, or with `dry_run` only says what that
    /// is. Runs one at a time.
    pub async fn run(&self, dry_run: bool) -> Result<Report, HostError> {
        let _one = self.one_at_a_time.lock().await;
        let mut report = Report {
            dry_run,
            ..Default::default()
        };
        let now = timefmt::now();
        for (project, policy) in self.policies().await? {
            let mut pr = ProjectReport {
                project: project.clone(),
                policy: Policy::default(),
                builds: Vec::new(),
                bytes: 0,
                error: None,
            };
            match policy {
                Err(e) => {
                    pr.error = Some(format!("{e}; its builds are kept until it is fixed"));
                    report.projects.push(pr);
                    continue;
                }
                Ok(p) if p.keeps_all() => continue,
                Ok(p) => pr.policy = p,
            }
            let expired = match self
                .store
                .retention_candidates(
                    &project,
                    pr.policy.keep_builds,
                    pr.policy.finished_before(now),
                )
                .await
            {
                Ok(e) => e,
                Err(e) => {
                    pr.error = Some(e.to_string());
                    report.projects.push(pr);
                    continue;
                }
            };
            let results = if expired.is_empty() {
                HashMap::new()
            } else if dry_run {
                self.measure(&project, &expired).await?
            } else {
                let builds = expired.iter().map(|e| e.build.clone()).collect();
                self.prune(builds).await?
            };
            for e in &expired {
                let r = results
                    .get(&e.build.id)
                    .cloned()
                    .unwrap_or_else(|| Err("not handled".into()));
                pr.builds.push(RemovedBuild {
                    name: e.build.name.clone(),
                    status: e.build.status.as_str().to_string(),
                    finished_at: e.build.finished_at,
                    why: why(e, &pr.policy),
                    bytes: *r.as_ref().unwrap_or(&0),
                    error: r.err(),
                });
            }
            pr.bytes = pr.builds.iter().map(|b| b.bytes).sum();
            report.bytes += pr.bytes;
            if !dry_run {
                let done = pr.builds.iter().filter(|b| b.error.is_none()).count();
                if done > 0 {
                    tracing::info!(
                        "retention ({}): removed the output of {done} build(s) of {project}, {} bytes freed",
                        pr.policy.describe(),
                        pr.bytes
                    );
                }
                for b in pr.builds.iter().filter(|b| b.error.is_some()) {
                    tracing::warn!(
                        "retention: kept {project}/{}: {}",
                        b.name,
                        b.error.as_deref().unwrap_or_default()
                    );
                }
            }
            report.projects.push(pr);
        }
        Ok(report)
    }

    /// What removing these builds' files would free, on a blocking thread.
    async fn measure(
        &self,
        project: &str,
        expired: &[ams_store::Expired],
    ) -> Result<HashMap<i64, Result<u64, String>>, HostError> {
        let pd = self.data.project(project);
        let dirs: Vec<(i64, BuildDir)> = expired
            .iter()
            .map(|e| (e.build.id, pd.build(&e.build.name)))
            .collect();
        tokio::task::spawn_blocking(move || {
            dirs.into_iter()
                .map(|(id, bd)| (id, Ok(usage(&bd))))
                .collect()
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))
    }

    /// Hands builds to the loop for removal and waits for the outcome.
    async fn prune(
        &self,
        builds: Vec<BuildRecord>,
    ) -> Result<HashMap<i64, Result<u64, String>>, HostError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Prune { builds, reply })
            .await
            .map_err(|_| HostError::ShuttingDown)?;
        let pruned = rx.await.map_err(|_| HostError::ShuttingDown)??;
        Ok(pruned.into_iter().map(|p| (p.id, p.result)).collect())
    }
}

/// Runs retention shortly after the start, then hourly, until the host stops.
pub async fn hourly(gc: Arc<Gc>) {
    tokio::time::sleep(FIRST_RUN).await;
    loop {
        if let Err(e) = gc.run(false).await {
            tracing::warn!("retention could not run: {}", e.detail());
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Adds the bytes on disk under `path` (not following links) to `total`. A file with several
/// links counts once all of them were seen here: one whose other links are elsewhere (a
/// build's source snapshot shares master's files) frees nothing.
fn walk(path: &Path, depth: usize, links: &mut HashMap<(u64, u64), u64>, total: &mut u64) {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return;
    };
    let bytes = m.blocks() * 512;
    if m.is_dir() {
        *total += bytes;
        if depth < MAX_DEPTH {
            for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&e.path(), depth + 1, links, total);
            }
        }
    } else if m.nlink() <= 1 {
        *total += bytes;
    } else {
        let seen = links.entry((m.dev(), m.ino())).or_default();
        *seen += 1;
        if *seen == m.nlink() {
            *total += bytes;
        }
    }
}

/// The bytes on disk that removing a build's folder and archive frees. Blocking.
pub fn usage(bd: &BuildDir) -> u64 {
    let (mut links, mut total) = (HashMap::new(), 0);
    walk(&bd.root, 0, &mut links, &mut total);
    walk(&bd.archive, 0, &mut links, &mut total);
    total
}

/// Removes a finished build's folder (its log with it) and its archive; what is missing
/// already is fine. Returns the bytes freed. Blocking: call it off the loop.
pub fn remove_output(bd: &BuildDir) -> std::io::Result<u64> {
    let bytes = usage(bd);
    for r in [
        std::fs::remove_dir_all(&bd.root),
        std::fs::remove_file(&bd.archive),
    ] {
        match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_a_file_once_and_shared_links_not_at_all() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let bd = data.project("p").build("b");
        let master = t.path().join("master.bin");
        std::fs::create_dir_all(bd.root.join("sub")).unwrap();
        std::fs::write(bd.root.join("sub/own.bin"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::write(&master, vec![2u8; 256 * 1024]).unwrap();
        let before = usage(&bd);
        // A link to a file outside (master's) frees nothing; two links inside count once.
        std::fs::hard_link(&master, bd.root.join("shared.bin")).unwrap();
        assert_eq!(usage(&bd), before);
        std::fs::write(bd.root.join("twice.bin"), vec![3u8; 128 * 1024]).unwrap();
        let one = usage(&bd);
        std::fs::hard_link(bd.root.join("twice.bin"), bd.root.join("twice2.bin")).unwrap();
        assert_eq!(usage(&bd), one);
        assert!(one >= before + 128 * 1024, "{one} {before}");
        std::os::unix::fs::symlink("/", bd.root.join("root")).unwrap();
        std::fs::write(&bd.archive, vec![4u8; 32 * 1024]).unwrap();
        let all = usage(&bd);
        assert!(
            all >= one + 32 * 1024 && all < one + 64 * 1024 + 8192,
            "{all} {one}"
        );
        assert_eq!(remove_output(&bd).unwrap(), all);
        assert!(!bd.root.exists() && !bd.archive.exists());
        assert!(master.exists(), "a link's other file is left alone");
        assert_eq!(remove_output(&bd).unwrap(), 0, "removing twice is fine");
    }
}
