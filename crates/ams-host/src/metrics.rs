//! The host's metrics, in one registry ([`Metrics`]), exposed by the web interface at
//! `GET /metrics` in the Prometheus text format.
//!
//! Each metric has a typed label set, and every label takes values from a bounded set: a
//! project (one that exists on disk: builds, durations and disk use are recorded only for
//! builds of existing projects), a status, verdict, outcome or method from a fixed list, an
//! HTTP status code, and a route *template* of the router (never the raw path a client sent).
//! So no client can grow the registry by sending odd names, paths or branches.
//!
//! Events are recorded where they happen: the host loop (builds ending, the queue's size),
//! the webhook listener, the notifier and an HTTP middleware. Recording is a few atomic
//! operations and never waits on IO. The disk use of each project is measured by
//! [`watch_disk`], a background task that walks the trees on a blocking thread, periodically
//! and after a project's build ends, never while a scrape waits.

use crate::paths::DataDir;
use ams_core::status::BuildStatus;
use ams_core::webhooks::Verdict;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the build duration buckets, in seconds.
const BUILD_BUCKETS: [f64; 12] = [
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Upper bounds of the stage duration buckets, in seconds.
const STAGE_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// How often every project's disk use is measured again.
pub const DISK_REFRESH: Duration = Duration::from_secs(300);

/// Writes a fixed word as a label value.
fn word(w: &str, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
    e.write_str(w)
}

/// A final build status as a label: `pass`, `fail`, `warn`, `cancel`, `skip`, `dummy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusLabel(pub BuildStatus);

impl EncodeLabelValue for StatusLabel {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        word(self.0.as_str(), e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BuildLabels {
    pub project: String,
    pub status: StatusLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProjectLabels {
    pub project: String,
}

/// What became of a webhook delivery, as the listener answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryVerdict {
    /// Recorded with this verdict (accepted, ignored, ping, refused, duplicate).
    Recorded(Verdict),
    /// A missing or wrong signature (401): never recorded.
    Unauthorized,
    /// Refused before its signature could be checked: unknown webhook or project, no query,
    /// wrong content type, no or too large Content-Length, a body that could not be read.
    Invalid,
    /// The host could not take it now (too many bodies in flight, the database): 503.
    Unavailable,
}

impl EncodeLabelValue for DeliveryVerdict {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        word(
            match self {
                DeliveryVerdict::Recorded(v) => v.as_str(),
                DeliveryVerdict::Unauthorized => "unauthorized",
                DeliveryVerdict::Invalid => "invalid",
                DeliveryVerdict::Unavailable => "unavailable",
            },
            e,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub verdict: DeliveryVerdict,
}

/// How one attempt to send a notification went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Sent,
    /// 429: retried after the time the receiver asked for.
    RateLimited,
    /// A 5xx answer: retried with backoff.
    ServerError,
    /// Any other answer (4xx, a redirect, which is not followed): not retried.
    Rejected,
    /// No answer in time.
    Timeout,
    /// No connection, or the request failed otherwise.
    NetworkError,
    /// Not sent: the URL does not parse, its host does not resolve, or the SSRF guard refused it.
    Refused,
}

impl EncodeLabelValue for AttemptOutcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        word(
            match self {
                AttemptOutcome::Sent => "sent",
                AttemptOutcome::RateLimited => "rate_limited",
                AttemptOutcome::ServerError => "server_error",
                AttemptOutcome::Rejected => "rejected",
                AttemptOutcome::Timeout => "timeout",
                AttemptOutcome::NetworkError => "network_error",
                AttemptOutcome::Refused => "refused",
            },
            e,
        )
    }
}

impl AttemptOutcome {
    /// The outcome of an HTTP answer with this status.
    pub fn of_status(status: u16) -> AttemptOutcome {
        match status {
            200..=299 => AttemptOutcome::Sent,
            429 => AttemptOutcome::RateLimited,
            500..=599 => AttemptOutcome::ServerError,
            _ => AttemptOutcome::Rejected,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AttemptLabels {
    pub outcome: AttemptOutcome,
}

/// An HTTP method as a label: the common ones by name, anything else as `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodLabel {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl MethodLabel {
    pub fn of(method: &str) -> MethodLabel {
        match method {
            "GET" => MethodLabel::Get,
            "HEAD" => MethodLabel::Head,
            "POST" => MethodLabel::Post,
            "PUT" => MethodLabel::Put,
            "DELETE" => MethodLabel::Delete,
            "PATCH" => MethodLabel::Patch,
            "OPTIONS" => MethodLabel::Options,
            _ => MethodLabel::Other,
        }
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        word(
            match self {
                MethodLabel::Get => "GET",
                MethodLabel::Head => "HEAD",
                MethodLabel::Post => "POST",
                MethodLabel::Put => "PUT",
                MethodLabel::Delete => "DELETE",
                MethodLabel::Patch => "PATCH",
                MethodLabel::Options => "OPTIONS",
                MethodLabel::Other => "other",
            },
            e,
        )
    }
}

/// The route label of a request that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template that matched (`/ams-build/api/projects/name/{name}`), or
    /// [`UNMATCHED_ROUTE`]: a value from the router's fixed list, whatever the client sent.
    pub route: Arc<str>,
    pub method: MethodLabel,
    pub status: u16,
}

/// Every metric of the host. Cheap to share (`Arc<Metrics>`); every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    builds_finished: Family<BuildLabels, Counter>,
    build_duration: Family<ProjectLabels, Histogram, fn() -> Histogram>,
    stage_duration: Family<ProjectLabels, Histogram, fn() -> Histogram>,
    queue_pending: Gauge,
    builds_active: Gauge,
    webhook_deliveries: Family<DeliveryLabels, Counter>,
    notification_attempts: Family<AttemptLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    disk_bytes: Family<ProjectLabels, Gauge>,
    engine_slots: Family<EngineLabels, Gauge>,
    engine_in_use: Family<EngineLabels, Gauge>,
    engine_up: Family<EngineLabels, Gauge>,
}

/// The label of the per-engine gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EngineLabels {
    pub engine: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("amsbuild");
        let builds_finished = Family::<BuildLabels, Counter>::default();
        registry.register(
            "builds_finished",
            "Builds that ended, by project and final status",
            builds_finished.clone(),
        );
        let build_duration: Family<ProjectLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BUILD_BUCKETS));
        registry.register_with_unit(
            "build_duration",
            "Time from a build's start to its end, by project",
            Unit::Seconds,
            build_duration.clone(),
        );
        let stage_duration: Family<ProjectLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(STAGE_BUCKETS));
        registry.register_with_unit(
            "stage_duration",
            "Time each stage of a build ran, by project",
            Unit::Seconds,
            stage_duration.clone(),
        );
        let queue_pending = Gauge::default();
        registry.register(
            "queue_pending",
            "Builds waiting in the queue for a slot",
            queue_pending.clone(),
        );
        let builds_active = Gauge::default();
        registry.register(
            "builds_active",
            "Builds holding a slot (preparing, running or packing)",
            builds_active.clone(),
        );
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries received, by verdict",
            webhook_deliveries.clone(),
        );
        let notification_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "notification_attempts",
            "Attempts to send a notification, by outcome",
            notification_attempts.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status code",
            http_requests.clone(),
        );
        let disk_bytes = Family::<ProjectLabels, Gauge>::default();
        registry.register_with_unit(
            "project_disk",
            "Disk space a project's folder takes (master, builds and archives), measured \
             periodically in the background",
            Unit::Bytes,
            disk_bytes.clone(),
        );
        let engine_slots = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "engine_slots",
            "Builds each engine may run at once",
            engine_slots.clone(),
        );
        let engine_in_use = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "engine_builds_active",
            "Builds running on each engine",
            engine_in_use.clone(),
        );
        let engine_up = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "engine_up",
            "1 while the engine answers its pings, else 0",
            engine_up.clone(),
        );
        Metrics {
            engine_slots,
            engine_in_use,
            engine_up,
            registry,
            builds_finished,
            build_duration,
            stage_duration,
            queue_pending,
            builds_active,
            webhook_deliveries,
            notification_attempts,
            http_requests,
            disk_bytes,
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }

    /// A build of `project` ended with `status`. `ran` is the time from its start to its end
    /// when it started (a build canceled or superseded while pending has none), `stages` the
    /// duration of each stage it ran, in seconds.
    pub fn build_finished(
        &self,
        project: &str,
        status: BuildStatus,
        ran: Option<f64>,
        stages: impl IntoIterator<Item = f64>,
    ) {
        self.builds_finished
            .get_or_create(&BuildLabels {
                project: project.to_string(),
                status: StatusLabel(status),
            })
            .inc();
        let labels = ProjectLabels {
            project: project.to_string(),
        };
        if let Some(secs) = ran {
            self.build_duration
                .get_or_create(&labels)
                .observe(secs.max(0.0));
        }
        let mut stages = stages.into_iter().peekable();
        if stages.peek().is_some() {
            let h = self.stage_duration.get_or_create(&labels);
            for secs in stages {
                h.observe(secs.max(0.0));
            }
        }
    }

    /// The queue's size now.
    pub fn queue(&self, pending: usize, active: usize) {
        self.queue_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.builds_active
            .set(i64::try_from(active).unwrap_or(i64::MAX));
    }

    /// One engine's slots, builds on it and whether it answers.
    pub fn engine(&self, name: &str, slots: usize, in_use: usize, up: bool) {
        let l = EngineLabels {
            engine: name.to_string(),
        };
        self.engine_slots
            .get_or_create(&l)
            .set(i64::try_from(slots).unwrap_or(i64::MAX));
        self.engine_in_use
            .get_or_create(&l)
            .set(i64::try_from(in_use).unwrap_or(i64::MAX));
        self.engine_up.get_or_create(&l).set(i64::from(up));
    }

    pub fn webhook_delivery(&self, verdict: DeliveryVerdict) {
        self.webhook_deliveries
            .get_or_create(&DeliveryLabels { verdict })
            .inc();
    }

    pub fn notification_attempt(&self, outcome: AttemptOutcome) {
        self.notification_attempts
            .get_or_create(&AttemptLabels { outcome })
            .inc();
    }

    /// An answered HTTP request. `route` is the template that matched, `None` for none.
    pub fn http_request(&self, route: Option<&str>, method: &str, status: u16) {
        let route: Arc<str> = Arc::from(route.unwrap_or(UNMATCHED_ROUTE));
        self.http_requests
            .get_or_create(&HttpLabels {
                route,
                method: MethodLabel::of(method),
                status,
            })
            .inc();
    }

    fn set_disk(&self, project: &str, bytes: u64) {
        self.disk_bytes
            .get_or_create(&ProjectLabels {
                project: project.to_string(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The project's disk use as last measured, in bytes (`None` before the first walk).
    pub fn disk_of(&self, project: &str) -> Option<u64> {
        self.disk_bytes
            .get(&ProjectLabels {
                project: project.to_string(),
            })
            .map(|g| u64::try_from(g.get()).unwrap_or(0))
    }

    fn forget_disk(&self, project: &str) {
        self.disk_bytes.remove(&ProjectLabels {
            project: project.to_string(),
        });
    }
}

/// Raises its flag when dropped: a walk on a blocking thread stops soon after the task that
/// started it is aborted (at shutdown), rather than holding the runtime's exit.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The shortest time between two walks for projects whose builds ended (see [`watch_disk`]).
const DIRTY_SPACING: Duration = Duration::from_secs(5);

/// Measures the disk use of each project: all of them at once, then every [`DISK_REFRESH`],
/// and a project again when its name arrives on `dirty` (sent, without waiting, when one of its
/// builds ends), at most every [`DIRTY_SPACING`]. The walks run on a blocking thread, one at a
/// time.
pub async fn watch_disk(metrics: Arc<Metrics>, data: DataDir, mut dirty: mpsc::Receiver<String>) {
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(DISK_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_dirty_walk: Option<tokio::time::Instant> = None;
    loop {
        let only: Option<BTreeSet<String>> = tokio::select! {
            _ = tick.tick() => None,
            p = dirty.recv() => match p {
                Some(p) => {
                    // A project's walk costs as much as its builds are many: while builds end
                    // one after another, walk at most every DIRTY_SPACING (the names that came
                    // meanwhile are walked together).
                    if let Some(t) = last_dirty_walk {
                        tokio::time::sleep_until(t + DIRTY_SPACING).await;
                    }
                    last_dirty_walk = Some(tokio::time::Instant::now());
                    let mut set = BTreeSet::from([p]);
                    while let Ok(p) = dirty.try_recv() {
                        set.insert(p);
                    }
                    Some(set)
                }
                None => return,
            },
        };
        let (d, m, halt) = (data.clone(), metrics.clone(), stop.0.clone());
        let all = only.is_none();
        let measured = tokio::task::spawn_blocking(move || {
            let projects = match only {
                Some(set) => set
                    .into_iter()
                    .filter(|p| crate::project::exists(&d, p))
                    .collect(),
                None => crate::project::list(&d),
            };
            for p in &projects {
                match disk_use(&d.project(p).root, &halt) {
                    Some(bytes) => m.set_disk(p, bytes),
                    None => return Vec::new(),
                }
            }
            projects
        })
        .await;
        let Ok(measured) = measured else { continue };
        if stop.0.load(Ordering::Relaxed) {
            return;
        }
        if all {
            // Projects removed since the last full walk leave the registry.
            let now: BTreeSet<String> = measured.into_iter().collect();
            for gone in known.difference(&now) {
                metrics.forget_disk(gone);
            }
            known = now;
        } else {
            known.extend(measured);
        }
    }
}

/// The bytes allocated to the files under `root` (`du -sx`): each inode once, however many
/// links it has; links are not followed, other filesystems (a build's overlay mount) are not
/// entered, and folders nested deeper than [`crate::copy::MAX_DEPTH`] are not counted.
/// Files that vanish during the walk are skipped. `None` when `stop` was raised meanwhile.
pub fn disk_use(root: &Path, stop: &AtomicBool) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return Some(0);
    };
    let dev = top.dev();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut total = top.blocks() * 512;
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() && depth < crate::copy::MAX_DEPTH {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{labels}` in `text`, if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn events_show_up_in_the_text_with_bounded_labels() {
        let m = Metrics::new();
        m.build_finished("app", BuildStatus::Pass, Some(12.0), [1.0, 2.0]);
        m.build_finished("app", BuildStatus::Pass, Some(700.0), []);
        m.build_finished("app", BuildStatus::Cancel, None, []);
        m.build_finished("other", BuildStatus::Skip, None, []);
        m.queue(3, 2);
        m.webhook_delivery(DeliveryVerdict::Recorded(Verdict::Accepted));
        m.webhook_delivery(DeliveryVerdict::Unauthorized);
        m.notification_attempt(AttemptOutcome::of_status(503));
        m.http_request(Some("/x/{name}"), "GET", 200);
        m.http_request(None, "BREW", 404);
        m.set_disk("app", 4096);
        let t = m.encode();
        let has = |series: &str, v: f64| {
            assert_eq!(sample(&t, series), Some(v), "{series} in\n{t}");
        };
        has(
            r#"amsbuild_builds_finished_total{project="app",status="pass"}"#,
            2.0,
        );
        has(
            r#"amsbuild_builds_finished_total{project="app",status="cancel"}"#,
            1.0,
        );
        has(
            r#"amsbuild_build_duration_seconds_count{project="app"}"#,
            2.0,
        );
        has(
            r#"amsbuild_build_duration_seconds_sum{project="app"}"#,
            712.0,
        );
        has(
            r#"amsbuild_build_duration_seconds_bucket{project="app",le="15"}"#,
            1.0,
        );
        has(
            r#"amsbuild_stage_duration_seconds_count{project="app"}"#,
            2.0,
        );
        has("amsbuild_queue_pending", 3.0);
        has("amsbuild_builds_active", 2.0);
        has(
            r#"amsbuild_webhook_deliveries_total{verdict="accepted"}"#,
            1.0,
        );
        has(
            r#"amsbuild_webhook_deliveries_total{verdict="unauthorized"}"#,
            1.0,
        );
        has(
            r#"amsbuild_notification_attempts_total{outcome="server_error"}"#,
            1.0,
        );
        has(
            r#"amsbuild_http_requests_total{route="/x/{name}",method="GET",status="200"}"#,
            1.0,
        );
        has(
            r#"amsbuild_http_requests_total{route="unmatched",method="other",status="404"}"#,
            1.0,
        );
        has(r#"amsbuild_project_disk_bytes{project="app"}"#, 4096.0);
        assert!(
            t.contains("# TYPE amsbuild_build_duration_seconds histogram"),
            "{t}"
        );
        // A build that never started has no duration series.
        assert!(!t.contains(r#"_seconds_count{project="other"}"#), "{t}");
        m.forget_disk("app");
        assert!(!m.encode().contains("amsbuild_project_disk_bytes{"));
    }

    #[test]
    fn disk_use_counts_each_inode_once_and_skips_links() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("p");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let go = AtomicBool::new(false);
        let disk_use = |p: &Path| super::disk_use(p, &go).unwrap();
        let empty = disk_use(&root);
        std::fs::write(root.join("a/b/f"), vec![7u8; 256 * 1024]).unwrap();
        let one = disk_use(&root);
        assert!(one >= empty + 256 * 1024, "{empty} then {one}");
        // A hard link adds nothing; a symbolic link to a big file outside is not followed.
        std::fs::hard_link(root.join("a/b/f"), root.join("a/g")).unwrap();
        std::fs::write(t.path().join("outside"), vec![1u8; 1024 * 1024]).unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("a/l")).unwrap();
        let linked = disk_use(&root);
        assert!(linked < one + 64 * 1024, "{one} then {linked}");
        assert_eq!(disk_use(&t.path().join("missing")), 0);
        assert_eq!(super::disk_use(&root, &AtomicBool::new(true)), None);
    }
}
