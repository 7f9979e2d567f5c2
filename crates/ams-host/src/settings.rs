//! What the host loop needs of a project to queue its builds — the build-name format from
//! master's pipeline.json and `only-build-latest` from the private config — read and parsed
//! outside the loop, by the client that sends the command, and cached by the files' stamps
//! (device, inode, size, modification and change times), so a request costs two `stat`s
//! when nothing changed.
//! A project's webhook configuration is cached the same way for the webhook listener, which
//! otherwise read and parsed it for every delivery.

use crate::paths::DataDir;
use crate::project;
use crate::source::read_checkout_file;
use crate::worker::PIPELINE_MAX_BYTES;
use ams_core::pipeline::{self, DEFAULT_NAME_FORMAT};
use ams_core::private_config::PrivateConfig;
use ams_core::webhooks::{WebhookFields, WebhooksConfig};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A project's settings that decide how its builds are queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// The build-name-format of master's pipeline.json, or the default when that file cannot
    /// be read (the build then fails with the real error when it runs).
    pub name_format: String,
    /// A newer build of a branch supersedes older pending ones.
    pub only_latest: bool,
    /// How many times a build that ended ERROR is queued again.
    pub retry_on_error: u32,
    /// The parameters master's pipeline.json declares, with their defaults.
    pub parameters: Vec<(String, Option<String>)>,
    /// The engine labels master's pipeline.json asks for (`docker.labels`).
    pub labels: Vec<String>,
}

/// A file's identity and change times: device, inode, size, modification and change time.
/// The change time catches a repair that only touches the mode or owner.
type Stamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

/// A value read from a file modified or changed this recently is not kept: on a filesystem
/// whose clock ticks coarsely, a rewrite of the same size within the same tick would keep the
/// stamp. The change time counts too, since a copy may set the modification time back.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// The stamp of `p` and whether it is too recent to trust (see [`ByStamps::racy`]). `follow`:
/// through a link, as the private config files are read; without it, the link itself, for a
/// file of the checkout, which is never read through one (and whose links a pusher chooses).
fn stamp(p: &Path, follow: bool, racy: std::time::Duration) -> (Stamp, bool) {
    let m = if follow {
        std::fs::metadata(p)
    } else {
        std::fs::symlink_metadata(p)
    };
    match m {
        Ok(m) => {
            let now = std::time::SystemTime::now();
            let changed = std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(m.ctime()).unwrap_or(0),
                    u32::try_from(m.ctime_nsec()).unwrap_or(0),
                );
            let latest = m.modified().map_or(changed, |t| t.max(changed));
            let recent = now.duration_since(latest).map_or(true, |age| age < racy);
            (
                Some((
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )),
                recent,
            )
        }
        Err(_) => (None, false),
    }
}

/// A value and the stamps of the files it was read from.
type Kept<T, const N: usize> = ([Stamp; N], Arc<T>);

/// Values read from `N` files of each project, kept while none of the files' stamps changes.
/// A read that fails is not kept: it is tried again, and its error given again, next time.
struct ByStamps<T, const N: usize> {
    map: Mutex<HashMap<String, Kept<T, N>>>,
    /// [`RACY`], shorter in tests.
    racy: std::time::Duration,
}

impl<T, const N: usize> Default for ByStamps<T, N> {
    fn default() -> Self {
        ByStamps {
            map: Mutex::default(),
            racy: RACY,
        }
    }
}

impl<T, const N: usize> ByStamps<T, N> {
    /// The value for `project`, read by `read` when a file in `files` (each with whether it is
    /// read through a link) changed since it was kept. The stamps are taken before the read,
    /// so a file changed during it is read again.
    fn get(
        &self,
        project: &str,
        files: [(PathBuf, bool); N],
        read: impl FnOnce() -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        let taken = files.map(|(p, follow)| stamp(&p, follow, self.racy));
        let racy = taken.iter().any(|(_, racy)| *racy);
        let stamps = taken.map(|(s, _)| s);
        if let Some((s, v)) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(project)
        {
            if *s == stamps {
                return Ok(v.clone());
            }
        }
        let v = Arc::new(read()?);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if racy {
            map.remove(project);
        } else {
            map.insert(project.to_string(), (stamps, v.clone()));
        }
        Ok(v)
    }
}

/// A project's webhook configuration: webhooks.json and its optional webhook_fields.json.
pub type ProjectWebhooks = (WebhooksConfig, Option<WebhookFields>);

/// The caches; cheap to share.
#[derive(Default)]
pub struct SettingsCache {
    queue: ByStamps<QueueSettings, 2>,
    webhooks: ByStamps<ProjectWebhooks, 2>,
}

/// Says nothing of what is kept: the webhook configurations hold secrets.
impl std::fmt::Debug for SettingsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsCache").finish_non_exhaustive()
    }
}

impl SettingsCache {
    /// A cache that trusts stamps however recent (tests of the stamps themselves).
    #[cfg(test)]
    fn trusting() -> SettingsCache {
        let mut c = SettingsCache::default();
        c.queue.racy = std::time::Duration::ZERO;
        c.webhooks.racy = std::time::Duration::ZERO;
        c
    }

    /// The settings of `project`, or why it cannot take builds. Small file-system work (three
    /// `stat`s, and a read of the two files when one changed): never from the host loop.
    pub fn get(&self, data: &DataDir, name: &str) -> Result<Arc<QueueSettings>, String> {
        if !project::exists(data, name) {
            return Err(format!("no project named `{name}`"));
        }
        let pd = data.project(name);
        let files = [
            (pd.master_source().join("pipeline.json"), false),
            (pd.config().join(PrivateConfig::FILE), true),
        ];
        self.queue.get(name, files, || {
            let parsed =
                read_checkout_file(&pd.master_source(), "pipeline.json", PIPELINE_MAX_BYTES)
                    .ok()
                    .and_then(|t| String::from_utf8(t).ok())
                    .and_then(|t| pipeline::parse(&t).ok());
            let (name_format, parameters, labels) = match parsed {
                Some(p) => (p.build_name_format, p.parameters, p.docker.labels),
                None => (DEFAULT_NAME_FORMAT.to_string(), Vec::new(), Vec::new()),
            };
            let private = project::private_config(&pd).ok();
            Ok(QueueSettings {
                name_format,
                only_latest: private.as_ref().is_some_and(|c| c.only_build_latest),
                retry_on_error: private.as_ref().map_or(0, |c| c.retry_on_error),
                parameters,
                labels,
            })
        })
    }

    /// The webhook configuration of `project` (see [`project::webhooks`] for the errors; a
    /// project that does not exist, or a name that cannot be one, answers as a project without
    /// webhooks does), read again only when one of its two files changed.
    pub fn webhooks(&self, data: &DataDir, name: &str) -> Result<Arc<ProjectWebhooks>, String> {
        let none = || format!("{name}: {}", project::NO_WEBHOOKS);
        if ams_core::names::validate_project_name(name).is_err() {
            return Err(none());
        }
        let pd = data.project(name);
        let files = [
            (pd.config().join(WebhooksConfig::FILE), true),
            (pd.config().join(WebhookFields::FILE), true),
        ];
        self.webhooks.get(name, files, || {
            if !project::exists(data, name) {
                return Err(none());
            }
            project::webhooks(&pd)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_files() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let pd = project::init(&data, "p").unwrap();
        let (pipeline_file, config_file) = (
            pd.master_source().join("pipeline.json"),
            pd.config().join(PrivateConfig::FILE),
        );
        let cache = SettingsCache::trusting();
        let first = cache.get(&data, "p").unwrap();
        assert!(!first.only_latest);
        assert!(
            Arc::ptr_eq(&first, &cache.get(&data, "p").unwrap()),
            "cached"
        );
        std::fs::write(
            &pipeline_file,
            r#"{"build-name-format": "{project}-{build_index}",
                "docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}]}"#,
        )
        .unwrap();
        std::fs::write(&config_file, r#"{"only-build-latest": true}"#).unwrap();
        let second = cache.get(&data, "p").unwrap();
        assert_eq!(second.name_format, "{project}-{build_index}");
        assert!(second.only_latest);
        assert!(cache.get(&data, "nope").unwrap_err().contains("no project"));
    }

    #[test]
    fn values_read_from_files_changed_just_now_are_not_kept() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let pd = project::init(&data, "p").unwrap();
        let cache = SettingsCache::default();
        for _ in 0..2 {
            // Written again right before each pair of reads, however slow the machine.
            std::fs::write(pd.config().join(PrivateConfig::FILE), "{}").unwrap();
            std::fs::write(pd.config().join(WebhooksConfig::FILE), "{}").unwrap();
            let (a, b) = (
                cache.get(&data, "p").unwrap(),
                cache.get(&data, "p").unwrap(),
            );
            assert!(!Arc::ptr_eq(&a, &b), "settings read again");
            let (a, b) = (
                cache.webhooks(&data, "p").unwrap(),
                cache.webhooks(&data, "p").unwrap(),
            );
            assert!(!Arc::ptr_eq(&a, &b), "webhooks read again");
        }
    }

    #[test]
    fn webhook_configs_are_read_again_only_when_their_files_change() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let pd = project::init(&data, "p").unwrap();
        let cache = SettingsCache::trusting();
        let file = pd.config().join(WebhooksConfig::FILE);
        let hook = |name: &str| {
            format!(
                r#"{{"in-webhooks": [{{"name": "{name}", "secret": "s", "authorized-actors": ["a"]}}]}}"#
            )
        };
        let kept = |name: &str| {
            let a = cache.webhooks(&data, "p").unwrap();
            assert!(a.0.in_webhook(name).is_some(), "{name} expected");
            assert!(
                Arc::ptr_eq(&a, &cache.webhooks(&data, "p").unwrap()),
                "{name} kept"
            );
            a
        };
        assert!(cache.webhooks(&data, "p").unwrap().0.in_webhooks.is_empty());
        std::fs::write(&file, hook("one")).unwrap();
        kept("one");
        assert!(
            !format!("{cache:?}").contains("\"s\""),
            "the cache's Debug shows no secret"
        );
        // Rewritten in place with the same size: the modification time tells.
        std::fs::write(&file, hook("two")).unwrap();
        assert!(kept("two").0.in_webhook("one").is_none());
        // A new file (new inode), then a broken one: its error every time, until it is mended.
        std::fs::write(t.path().join("next"), hook("six")).unwrap();
        std::fs::rename(t.path().join("next"), &file).unwrap();
        kept("six");
        std::fs::write(&file, "{ not json").unwrap();
        for _ in 0..2 {
            let e = cache.webhooks(&data, "p").unwrap_err();
            assert!(e.contains(WebhooksConfig::FILE), "{e}");
        }
        std::fs::write(&file, hook("three")).unwrap();
        kept("three");
        // Through a link: an edit of the file it points to is seen, although the link is not
        // touched.
        let target = t.path().join("hooks.json");
        std::fs::write(&target, hook("four")).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&target, &file).unwrap();
        kept("four");
        std::fs::write(&target, hook("five")).unwrap();
        kept("five");
        // webhook_fields.json is the second file watched.
        std::fs::write(pd.config().join(WebhookFields::FILE), "{}").unwrap();
        assert!(cache.webhooks(&data, "p").unwrap().1.is_some());
        std::fs::remove_file(&file).unwrap();
        let gone = cache.webhooks(&data, "p").unwrap_err();
        assert!(
            gone.ends_with(project::NO_WEBHOOKS),
            "not served from memory: {gone}"
        );
        // No project, or a name that cannot be one: the same answer as no webhooks.
        for name in ["nope", "../p"] {
            let e = cache.webhooks(&data, name).unwrap_err();
            assert!(e.ends_with(project::NO_WEBHOOKS), "{e}");
        }
    }

    #[test]
    fn a_linked_pipeline_json_is_stamped_as_the_link() {
        // pipeline.json is never read through a link, so its stamp must not leave the
        // checkout: an edit of what the link names is not a change.
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let pd = project::init(&data, "p").unwrap();
        let elsewhere = t.path().join("elsewhere.json");
        std::fs::write(&elsewhere, "{}").unwrap();
        let file = pd.master_source().join("pipeline.json");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        let cache = SettingsCache::trusting();
        let first = cache.get(&data, "p").unwrap();
        std::fs::write(&elsewhere, "{\"changed\": true}").unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get(&data, "p").unwrap()));
    }
}
