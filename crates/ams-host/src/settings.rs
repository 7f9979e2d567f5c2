//! What the host loop needs of a project to queue its builds — the build-name format from
//! master's pipeline.json and `only-build-latest` from the private config — read and parsed
//! outside the loop, by the client that sends the command, and cached by the files' stamps
//! (inode, size, modification time), so a request costs two `stat`s when nothing changed.

use crate::paths::DataDir;
use crate::project;
use crate::source::read_checkout_file;
use crate::worker::PIPELINE_MAX_BYTES;
use ams_core::pipeline::{self, DEFAULT_NAME_FORMAT};
use ams_core::private_config::PrivateConfig;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
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

type Stamp = Option<(u64, u64, i64, i64)>;

/// Both files' stamps and the settings read from them.
type Entry = ([Stamp; 2], Arc<QueueSettings>);

fn stamp(p: &Path) -> Stamp {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The cache; cheap to share.
#[derive(Debug, Default)]
pub struct SettingsCache {
    map: Mutex<HashMap<String, Entry>>,
}

impl SettingsCache {
    /// The settings of `project`, or why it cannot take builds. Small file-system work (three
    /// `stat`s, and a read of the two files when one changed): never from the host loop.
    pub fn get(&self, data: &DataDir, name: &str) -> Result<Arc<QueueSettings>, String> {
        if !project::exists(data, name) {
            return Err(format!("no project named `{name}`"));
        }
        let pd = data.project(name);
        let (pipeline_path, config_path) = (
            pd.master_source().join("pipeline.json"),
            pd.config().join(PrivateConfig::FILE),
        );
        let stamps = [stamp(&pipeline_path), stamp(&config_path)];
        if let Some((s, v)) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if *s == stamps {
                return Ok(v.clone());
            }
        }
        let parsed = read_checkout_file(&pd.master_source(), "pipeline.json", PIPELINE_MAX_BYTES)
            .ok()
            .and_then(|t| String::from_utf8(t).ok())
            .and_then(|t| pipeline::parse(&t).ok());
        let (name_format, parameters, labels) = match parsed {
            Some(p) => (p.build_name_format, p.parameters, p.docker.labels),
            None => (DEFAULT_NAME_FORMAT.to_string(), Vec::new(), Vec::new()),
        };
        let private = project::private_config(&pd).ok();
        let v = Arc::new(QueueSettings {
            name_format,
            only_latest: private.as_ref().is_some_and(|c| c.only_build_latest),
            retry_on_error: private.as_ref().map_or(0, |c| c.retry_on_error),
            parameters,
            labels,
        });
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (stamps, v.clone()));
        Ok(v)
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
        let cache = SettingsCache::default();
        let first = cache.get(&data, "p").unwrap();
        assert!(!first.only_latest);
        assert!(
            Arc::ptr_eq(&first, &cache.get(&data, "p").unwrap()),
            "cached"
        );
        std::fs::write(
            pd.master_source().join("pipeline.json"),
            r#"{"build-name-format": "{project}-{build_index}",
                "docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}]}"#,
        )
        .unwrap();
        std::fs::write(
            pd.config().join(PrivateConfig::FILE),
            r#"{"only-build-latest": true}"#,
        )
        .unwrap();
        let second = cache.get(&data, "p").unwrap();
        assert_eq!(second.name_format, "{project}-{build_index}");
        assert!(second.only_latest);
        assert!(cache.get(&data, "nope").unwrap_err().contains("no project"));
    }
}
