//! The clock's builds: each project's `"schedules"` (pipeline-config.json) are checked a second
//! after every minute starts. A schedule fires once per due slot; the slot it fired for is
//! kept in the database, so a restart neither repeats a slot nor runs every slot missed while
//! the host was down (those run once, at start). A schedule seen for the first time starts
//! from now: adding one never fires for the past.

use crate::error::HostError;
use crate::host::{BuildRequest, HostHandle};
use crate::project;
use ams_core::names::{ProjectName, Trigger};
use ams_core::schedule::{due, parse_cron, Schedule};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The actor of scheduled builds.
pub const ACTOR: &str = "schedule";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs until `shutdown`.
pub async fn run(host: HostHandle, shutdown: CancellationToken) {
    loop {
        tick(&host).await;
        let wait = 61 - unix_now().rem_euclid(60) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The projects that have schedules, read off the host loop.
async fn scheduled(host: &HostHandle) -> Vec<(String, Vec<Schedule>)> {
    let data = host.data.clone();
    tokio::task::spawn_blocking(move || {
        project::list(&data)
            .into_iter()
            .filter_map(|name| {
                let c = project::private_config(&data.project(&name)).ok()?;
                (!c.schedules.is_empty()).then_some((name, c.schedules))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// A schedule as the project page shows it.
#[derive(Debug, Clone)]
pub struct ScheduleInfo {
    pub cron: String,
    pub branch: Option<String>,
    /// The next slot (unix seconds), when the expression is valid.
    pub next: Option<i64>,
    pub error: Option<String>,
}

/// The schedules of one project with their next runs; an unreadable pipeline-config.json is
/// the error.
pub async fn overview(host: &HostHandle, name: &str) -> Result<Vec<ScheduleInfo>, String> {
    let data = host.data.clone();
    let name = name.to_string();
    let schedules = tokio::task::spawn_blocking(move || {
        project::private_config(&data.project(&name)).map(|c| c.schedules)
    })
    .await
    .map_err(|e| e.to_string())??;
    let now = unix_now();
    Ok(schedules
        .into_iter()
        .map(|s| match parse_cron(&s.cron) {
            Ok(cron) => ScheduleInfo {
                next: due(&cron, now, now).next,
                cron: s.cron,
                branch: s.branch,
                error: None,
            },
            Err(e) => ScheduleInfo {
                cron: s.cron,
                branch: s.branch,
                next: None,
                error: Some(e),
            },
        })
        .collect())
}

/// Fires every schedule that is due now.
pub async fn tick(host: &HostHandle) {
    for (name, schedules) in scheduled(host).await {
        let Ok(project) = ProjectName::new(&name) else {
            continue;
        };
        for s in schedules {
            let Ok(cron) = parse_cron(&s.cron) else {
                continue;
            };
            let branch = s.branch.clone().unwrap_or_default();
            let now = unix_now();
            let last = match host.store.schedule_slot(&name, &s.cron, &branch).await {
                Ok(Some(last)) => last,
                Ok(None) => {
                    if let Err(e) = host
                        .store
                        .set_schedule_slot(&name, &s.cron, &branch, now)
                        .await
                    {
                        tracing::warn!("project {name}: schedule `{}` not recorded: {e}", s.cron);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!("project {name}: schedule `{}` not checked: {e}", s.cron);
                    continue;
                }
            };
            let d = due(&cron, last, now);
            if !d.fire {
                continue;
            }
            let req = BuildRequest {
                project: project.clone(),
                branch: s.branch.clone(),
                commit: None,
                actor: ACTOR.to_string(),
                trigger: Trigger::Schedule,
                params: Default::default(),
            };
            match host.build(req).await {
                Ok(b) => tracing::info!(
                    "project {name}: schedule `{}` queued build {}",
                    s.cron,
                    b.name
                ),
                // Tried again next minute: the slot is not spent.
                Err(e @ (HostError::ShuttingDown | HostError::Unavailable(_))) => {
                    tracing::warn!("project {name}: schedule `{}` waits: {e}", s.cron);
                    continue;
                }
                // Refused for good (the project's configuration): the slot is spent, so the
                // schedule does not try again every minute.
                Err(e) => tracing::error!(
                    "project {name}: schedule `{}` could not queue a build: {e}",
                    s.cron
                ),
            }
            if let Err(e) = host
                .store
                .set_schedule_slot(&name, &s.cron, &branch, d.last)
                .await
            {
                tracing::warn!("project {name}: schedule `{}` not recorded: {e}", s.cron);
            }
        }
    }
}
