//! pipeline-config.json: the project's private, trusted settings. It lives in
//! `master/config/`, never in the repository, so only the host's operator can change it.

use crate::docker_args::trust_key;
use crate::error::ConfigError;
use crate::retention::RetentionConf;
use serde::Deserialize;

/// How a build gets its own copy of `master/project_source`. Whatever the mode, nothing a
/// build writes reaches master or another build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceCopy {
    /// Copy-on-write through overlayfs when the host can mount it, else a copy. `hardlink`, the
    /// old name of the default, means this too: plain hard links let a build change master.
    #[default]
    #[serde(alias = "hardlink")]
    Auto,
    /// Copy-on-write through overlayfs; a build fails when the host cannot mount it.
    Overlay,
    /// A clone of every file: reflinks where the filesystem has them, else a byte copy.
    Copy,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct PrivateConfig {
    /// Run prepare-build commands of pipeline.json on the host.
    pub trust_host_commands: bool,
    /// docker.args flags that break isolation but are allowed for this project,
    /// written as in docker.args: `"--privileged"`, `"--network host"`, `"-v"`.
    pub allow_docker_args: Vec<String>,
    /// A newer queued build of the same branch supersedes an older pending one (SKIP).
    pub only_build_latest: bool,
    /// Name of an SSH private key file in `master/config/` used for git.
    pub ssh_key: Option<String>,
    /// Default branch to build when a trigger names none.
    pub branch: Option<String>,
    /// How the source is copied into each build.
    pub source_copy: SourceCopy,
    /// A build that ends ERROR (a failure outside the project) is queued again, up to this
    /// many times, for the same commit.
    pub retry_on_error: u32,
    /// Builds queued by the clock (cron expressions in UTC).
    pub schedules: Vec<crate::schedule::Schedule>,
    /// Branches whose builds receive the secrets pipeline.json asks for (`*` for any
    /// characters). Empty: no build receives any.
    pub secret_branches: Vec<String>,
    /// Report each build's state on its commit at the forge.
    pub commit_status: Option<crate::commit_status::CommitStatusConfig>,
    /// Which finished builds keep their files (over web_conf.json's defaults).
    pub retention: RetentionConf,
    /// Anyone, without logging in, may fetch the status badge of the project's latest final
    /// build (`/{web_root}/badge/{project}.svg`). Off, the badge answers 404 like an unknown
    /// project. Nothing else of the project becomes public.
    pub public_badge: bool,
}

impl PrivateConfig {
    pub const FILE: &'static str = "pipeline-config.json";
    /// The most `retry-on-error` may ask for.
    pub const MAX_RETRIES: u32 = 10;

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: PrivateConfig = serde_json::from_str(text).map_err(|e| {
            let mut ce = ConfigError::json(Self::FILE, &e);
            // A key's own check says `field `PATH`: …` (see `retention`): name the field.
            if let Some((field, message)) = ce
                .message
                .strip_prefix("field `")
                .and_then(|r| r.split_once("`: "))
            {
                (ce.field, ce.message) = (field.to_string(), message.to_string());
            }
            ce
        })?;
        if cfg.retry_on_error > Self::MAX_RETRIES {
            return Err(ConfigError::field(
                Self::FILE,
                "retry-on-error",
                format!(
                    "is {}; at most {} retries are allowed",
                    cfg.retry_on_error,
                    Self::MAX_RETRIES
                ),
            ));
        }
        for (i, e) in cfg.allow_docker_args.iter().enumerate() {
            crate::docker_args::check_trust_entry(e).map_err(|m| {
                ConfigError::field(Self::FILE, format!("allow-docker-args[{i}]"), m)
            })?;
        }
        if let Some(c) = &cfg.commit_status {
            c.check().map_err(|(field, msg)| {
                ConfigError::field(Self::FILE, format!("commit-status.{field}"), msg)
            })?;
        }
        if cfg.schedules.len() > crate::schedule::MAX_SCHEDULES {
            return Err(ConfigError::field(
                Self::FILE,
                "schedules",
                format!(
                    "has {} entries; at most {} are allowed",
                    cfg.schedules.len(),
                    crate::schedule::MAX_SCHEDULES
                ),
            ));
        }
        for (i, s) in cfg.schedules.iter().enumerate() {
            crate::schedule::parse_cron(&s.cron)
                .map_err(|e| ConfigError::field(Self::FILE, format!("schedules[{i}].cron"), e))?;
            if let Some(b) = &s.branch {
                if b.is_empty()
                    || b.len() > 256
                    || b.starts_with('-')
                    || b.chars().any(|c| c.is_control() || c == ' ')
                {
                    return Err(ConfigError::field(
                        Self::FILE,
                        format!("schedules[{i}].branch"),
                        "is not a branch name; write the branch as git names it, e.g. \"main\"",
                    ));
                }
            }
        }
        if cfg.secret_branches.len() > crate::secrets::MAX_BRANCH_PATTERNS {
            return Err(ConfigError::field(
                Self::FILE,
                "secret-branches",
                format!(
                    "has {} entries; at most {} are allowed",
                    cfg.secret_branches.len(),
                    crate::secrets::MAX_BRANCH_PATTERNS
                ),
            ));
        }
        for (i, p) in cfg.secret_branches.iter().enumerate() {
            crate::secrets::validate_branch_pattern(p)
                .map_err(|e| ConfigError::field(Self::FILE, format!("secret-branches[{i}]"), e))?;
        }
        if let Some(k) = &cfg.ssh_key {
            if k.contains('/') || k.contains("..") || k.is_empty() {
                return Err(ConfigError::field(
                    Self::FILE,
                    "ssh-key",
                    "must be the name of a file in master/config/, without a path",
                ));
            }
        }
        Ok(cfg)
    }

    /// The trusted docker flags as keys comparable with the docker args parser.
    pub fn trusted_docker_keys(&self) -> Vec<String> {
        self.allow_docker_args
            .iter()
            .map(|s| trust_key(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c = PrivateConfig::parse(
            r#"{"trust-host-commands": true, "allow-docker-args": ["--network host"],
                "only-build-latest": true, "source-copy": "copy", "public-badge": true}"#,
        )
        .unwrap();
        assert!(c.trust_host_commands && c.only_build_latest && c.public_badge);
        assert_eq!(c.retry_on_error, 0);
        assert_eq!(
            PrivateConfig::parse(r#"{"retry-on-error": 2}"#)
                .unwrap()
                .retry_on_error,
            2
        );
        let e = PrivateConfig::parse(r#"{"retry-on-error": 11}"#).unwrap_err();
        assert!(e.to_string().contains("retry-on-error"), "{e}");
        assert!(PrivateConfig::parse(r#"{"retry-on-error": -1}"#).is_err());
        let e = PrivateConfig::parse(
            r#"{"allow-docker-args": ["--privileged", "--cap-add SYS_ADMIN"]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("allow-docker-args[1]") && e.contains("`--cap-add` alone"),
            "{e}"
        );
        assert!(PrivateConfig::parse(r#"{"allow-docker-args": ["--bogus"]}"#).is_err());
        let net =
            PrivateConfig::parse(r#"{"allow-docker-args": ["--network MyNet", "--pid host"]}"#)
                .unwrap();
        crate::docker_args::parse("--network MyNet --pid host", &net.trusted_docker_keys())
            .expect("a trusted network name keeps its case");
        let sc =
            PrivateConfig::parse(r#"{"schedules": [{"cron": "0 3 * * *", "branch": "main"}]}"#)
                .unwrap();
        assert_eq!(sc.schedules[0].branch.as_deref(), Some("main"));
        let e = PrivateConfig::parse(r#"{"schedules": [{"cron": "0 3 * * *"}, {"cron": "3am"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schedules[1].cron") && e.contains("five fields"),
            "{e}"
        );
        let e = PrivateConfig::parse(r#"{"schedules": [{"cron": "@daily", "branch": "-x"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedules[0].branch"), "{e}");
        assert_eq!(c.trusted_docker_keys(), vec!["network=host".to_string()]);
        assert_eq!(c.source_copy, SourceCopy::Copy);
        let e = PrivateConfig::parse("{\"trust_host_commands\": true}").unwrap_err();
        assert!(e.message.contains("trust_host_commands"), "{e}");
        assert!(PrivateConfig::parse(r#"{"ssh-key": "../id"}"#).is_err());
        let sb = PrivateConfig::parse(r#"{"secret-branches": ["main", "release/*"]}"#).unwrap();
        assert_eq!(sb.secret_branches, vec!["main", "release/*"]);
        let e = PrivateConfig::parse(r#"{"secret-branches": ["main", ""]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret-branches[1]"), "{e}");
        assert!(PrivateConfig::parse(r#"{"secret-branches": "main"}"#).is_err());
        let c = PrivateConfig::parse(r#"{"retention": {"keep-builds": 5, "max-age-days": null}}"#)
            .unwrap();
        assert_eq!(c.retention.keep_builds, crate::retention::Setting::Value(5));
        assert_eq!(c.retention.max_age_days, crate::retention::Setting::Off);
        assert_eq!(
            PrivateConfig::parse("{}").unwrap(),
            PrivateConfig::default()
        );
        assert!(!PrivateConfig::default().public_badge);
        assert!(PrivateConfig::parse(r#"{"public_badge": true}"#).is_err());
    }

    #[test]
    fn a_bad_retention_names_the_file_the_field_and_the_fix() {
        let e = PrivateConfig::parse("{\n  \"retention\": {\"keep-builds\": 0}\n}").unwrap_err();
        assert_eq!(e.field, "retention.keep-builds");
        let s = e.to_string();
        assert!(s.starts_with("pipeline-config.json: line 2 column"), "{s}");
        assert!(
            s.contains("field `retention.keep-builds`: must be a whole number"),
            "{s}"
        );
        let e = PrivateConfig::parse(r#"{"retention": {"max-age-days": -1}}"#).unwrap_err();
        assert_eq!(e.field, "retention.max-age-days");
        assert!(
            e.message.contains("or null to keep builds of any age"),
            "{e}"
        );
        let e = PrivateConfig::parse(r#"{"retention": {"days": 3}}"#).unwrap_err();
        assert!(e.message.contains("unknown field `days`"), "{e}");
    }
}
