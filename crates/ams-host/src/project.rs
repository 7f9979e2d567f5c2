//! Projects on disk: the described system's skeleton, `project add` (clone) and `project init`,
//! and loading a project's private configuration.

use crate::git::{self, GitAuth};
use crate::paths::{create_private_dir, write_private, DataDir, ProjectDir};
use ams_core::names::validate_project_name;
use ams_core::private_config::PrivateConfig;
use std::fs;

/// The pipeline.json written by `project init`: a runnable example to edit.
pub const TEMPLATE_PIPELINE: &str = r#"{
  "build-name-format": "{project}_{build_hash}_build_{build_index}",
  "docker": {
    "image": "busybox:latest",
    "args": "--memory 512m --pids-limit 256",
    "project-dest": "/root/project",
    "build-output-dest": "/root/project/Builds",
    "stop-timeout": 10
  },
  "environment": { "MODE": "release" },
  "pipeline": [
    { "name": "build", "commands": ["echo building {project} build {build_index}", "echo ok > Builds/result.txt"] }
  ],
  "cleanup": { "remove_build_source": true, "7z_build": true, "7z_hash": "sha1" }
}
"#;

const TEMPLATE_WEBHOOKS: &str = "{\n  \"in-webhooks\": [],\n  \"out-webhooks\": []\n}\n";

fn private_config_text(branch: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "trust-host-commands": false,
        "allow-docker-args": [],
        "only-build-latest": false,
        "source-copy": "auto",
        "public-badge": false
    });
    if let Some(b) = branch {
        v["branch"] = serde_json::Value::String(b.to_string());
    }
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

fn skeleton(p: &ProjectDir, branch: Option<&str>) -> std::io::Result<()> {
    fs::create_dir_all(p.master_build())?;
    // The private config holds secrets: the host's user alone reads it.
    create_private_dir(&p.config())?;
    fs::create_dir_all(p.builds())?;
    write_private(
        &p.config().join(PrivateConfig::FILE),
        private_config_text(branch).as_bytes(),
    )?;
    write_private(
        &p.config().join("webhooks.json"),
        TEMPLATE_WEBHOOKS.as_bytes(),
    )
}

fn check_new(data: &DataDir, name: &str) -> Result<ProjectDir, String> {
    validate_project_name(name).map_err(|e| format!("{e}: `{name}`"))?;
    let p = data.project(name);
    if p.root.exists() {
        return Err(format!(
            "project `{name}` already exists at {}",
            p.root.display()
        ));
    }
    data.create()
        .map_err(|e| format!("{}: {e}", data.projects().display()))?;
    Ok(p)
}

/// `amsbuild project init NAME`: the blank skeleton with an example pipeline.json.
pub fn init(data: &DataDir, name: &str) -> Result<ProjectDir, String> {
    let p = check_new(data, name)?;
    let r = (|| -> std::io::Result<()> {
        skeleton(&p, None)?;
        fs::create_dir_all(p.master_source())?;
        fs::write(p.master_source().join("pipeline.json"), TEMPLATE_PIPELINE)?;
        Ok(())
    })();
    r.map_err(|e| {
        let _ = fs::remove_dir_all(&p.root);
        format!("cannot create project `{name}`: {e}")
    })?;
    Ok(p)
}

/// `amsbuild project add NAME --git URL [--branch BR]`: the skeleton plus a clone of the source.
/// Nothing is left behind when the clone fails.
pub async fn add(
    data: &DataDir,
    name: &str,
    url: &str,
    branch: Option<&str>,
) -> Result<ProjectDir, String> {
    let p = check_new(data, name)?;
    let result = async {
        skeleton(&p, branch).map_err(|e| e.to_string())?;
        git::clone(url, &p.master_source(), branch, &GitAuth::default()).await
    }
    .await;
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&p.root);
        return Err(format!("cannot add project `{name}`: {e}"));
    }
    Ok(p)
}

/// Names of the projects in the data directory, sorted.
pub fn list(data: &DataDir) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(data.projects())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("master").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_project_name(n).is_ok())
        .collect();
    names.sort();
    names
}

/// Whether `name` is a valid, existing project.
pub fn exists(data: &DataDir, name: &str) -> bool {
    validate_project_name(name).is_ok() && data.project(name).master().is_dir()
}

/// Loads master/config/pipeline-config.json; a missing file means the defaults.
pub fn private_config(p: &ProjectDir) -> Result<PrivateConfig, String> {
    let path = p.config().join(PrivateConfig::FILE);
    match fs::read_to_string(&path) {
        Ok(text) => PrivateConfig::parse(&text).map_err(|e| {
            let mut e = e;
            e.file = path.display().to_string();
            e.to_string()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PrivateConfig::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The error text of [`webhooks`] when the project has no webhooks.json.
pub const NO_WEBHOOKS: &str = "the project has no webhooks.json";

/// Loads a project's webhooks.json and, if present, webhook_fields.json. Errors name the file.
pub fn webhooks(
    p: &ProjectDir,
) -> Result<
    (
        ams_core::webhooks::WebhooksConfig,
        Option<ams_core::webhooks::WebhookFields>,
    ),
    String,
> {
    use ams_core::webhooks::{WebhookFields, WebhooksConfig};
    let dir = p.config();
    let path = dir.join(WebhooksConfig::FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {NO_WEBHOOKS}", path.display()))
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let cfg = WebhooksConfig::parse(&text).map_err(|mut e| {
        e.file = path.display().to_string();
        e.to_string()
    })?;
    let fpath = dir.join(WebhookFields::FILE);
    let fields = match fs::read_to_string(&fpath) {
        Ok(t) => Some(WebhookFields::parse(&t).map_err(|mut e| {
            e.file = fpath.display().to_string();
            e.to_string()
        })?),
        Err(_) => None,
    };
    Ok((cfg, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_the_documented_layout() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path());
        let p = init(&d, "demo").unwrap();
        for sub in [
            "master/project_source/pipeline.json",
            "master/build",
            "master/config/pipeline-config.json",
            "master/config/webhooks.json",
            "builds",
        ] {
            assert!(p.root.join(sub).exists(), "{sub}");
        }
        ams_core::pipeline::parse(TEMPLATE_PIPELINE).unwrap();
        assert_eq!(
            private_config(&p).unwrap(),
            PrivateConfig {
                allow_docker_args: vec![],
                ..Default::default()
            }
        );
        assert!(init(&d, "demo").unwrap_err().contains("already exists"));
        assert!(init(&d, "../evil").is_err());
        assert!(!t.path().join("evil").exists());
        assert_eq!(list(&d), vec!["demo".to_string()]);
    }
}
