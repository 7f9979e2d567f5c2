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
    /// The described system's SSH setup (`prepare-build.*.ssh`), read as [`PrivateConfig::ssh_keys`]
    /// says.
    pub prepare_build: PrepareBuildSsh,
}

/// The described system's `"prepare-build"` section of pipeline-config.json: for each list of
/// host commands of pipeline.json, whether an SSH key is loaded while it runs, and which.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct PrepareBuildSsh {
    pub master_dir_commands: Option<SshSection>,
    pub build_dir_commands: Option<SshSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SshSection {
    pub ssh: Option<SshUse>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SshUse {
    #[serde(rename = "use")]
    pub enabled: bool,
    /// The key's file name; the described system's default is `id_rsa`.
    pub name: Option<String>,
}

/// Which key file (a name in `master/config/`) each part of a build's preparation uses, and
/// where the name came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SshKeys {
    /// For git (clone, fetch, the update of master) and `master-dir-commands`.
    pub master: Option<KeyChoice>,
    /// For `build-dir-commands`.
    pub build: Option<KeyChoice>,
    /// What the operator should know: a section of the described system's that is not used.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChoice {
    /// The file's name in `master/config/`.
    pub file: String,
    /// The field that named it: `ssh-key` or `prepare-build.….ssh`.
    pub field: String,
}

impl KeyChoice {
    /// Named by the described system's section, whose key may simply not have been copied over
    /// (its blank template names one): a missing file is then a warning, not an error.
    pub fn from_described_section(&self) -> bool {
        self.field.starts_with("prepare-build")
    }
}

/// The described system's key name when its section names none.
pub const DESCRIBED_DEFAULT_KEY: &str = "id_rsa";

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
            check_key_name(k).map_err(|m| ConfigError::field(Self::FILE, "ssh-key", m))?;
        }
        for (field, sec) in cfg.prepare_build.sections() {
            if let Some(n) = sec
                .and_then(|s| s.ssh.as_ref())
                .and_then(|u| u.name.as_ref())
            {
                check_key_name(n).map_err(|m| {
                    ConfigError::field(Self::FILE, format!("prepare-build.{field}.ssh.name"), m)
                })?;
            }
        }
        Ok(cfg)
    }

    /// The SSH keys of the build's preparation. `ssh-key` is the key of every git operation and
    /// of both lists of host commands. Without it, the described system's
    /// `prepare-build.master-dir-commands.ssh` (`"use": true`) names the key of git (whose
    /// update replaces that system's `git pull` in master) and of master-dir-commands, and
    /// `prepare-build.build-dir-commands.ssh` the key of build-dir-commands; `"name"` defaults
    /// to `id_rsa`, the file is looked for in `master/config/`. With both, `ssh-key` wins and a
    /// section naming another file gets a note.
    pub fn ssh_keys(&self) -> SshKeys {
        let mut keys = SshKeys::default();
        let mut described = |field: &str, sec: Option<&SshSection>| -> Option<KeyChoice> {
            let u = sec?.ssh.as_ref().filter(|u| u.enabled)?;
            let file = u
                .name
                .clone()
                .unwrap_or_else(|| DESCRIBED_DEFAULT_KEY.into());
            let field = format!("prepare-build.{field}.ssh");
            match &self.ssh_key {
                Some(k) if *k != file => {
                    keys.notes.push(format!(
                        "{}: {field} names the key `{file}`, but \"ssh-key\" names `{k}`, which \
                         is used for all of git and the host commands; remove the \
                         \"prepare-build\" section (or make both name the same file)",
                        Self::FILE
                    ));
                    None
                }
                Some(_) => None,
                None => Some(KeyChoice { file, field }),
            }
        };
        let pb = &self.prepare_build;
        let master = described("master-dir-commands", pb.master_dir_commands.as_ref());
        let build = described("build-dir-commands", pb.build_dir_commands.as_ref());
        let own = self.ssh_key.as_ref().map(|k| KeyChoice {
            file: k.clone(),
            field: "ssh-key".into(),
        });
        keys.master = own.clone().or(master);
        keys.build = own.or(build);
        keys
    }

    /// The trusted docker flags as keys comparable with the docker args parser.
    pub fn trusted_docker_keys(&self) -> Vec<String> {
        self.allow_docker_args
            .iter()
            .map(|s| trust_key(s))
            .collect()
    }
}

impl PrepareBuildSsh {
    fn sections(&self) -> [(&'static str, Option<&SshSection>); 2] {
        [
            ("master-dir-commands", self.master_dir_commands.as_ref()),
            ("build-dir-commands", self.build_dir_commands.as_ref()),
        ]
    }
}

/// A key's file name in `master/config/`: no path, and not one of the folder's other files.
pub fn check_key_name(k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('/') || k.contains("..") || k.chars().any(char::is_control) {
        return Err("must be the name of a file in master/config/, without a path".into());
    }
    if RESERVED_NAMES.contains(&k) {
        return Err(format!(
            "`{k}` is one of the folder's own files; name the key file differently, e.g. \"id_ed25519\""
        ));
    }
    Ok(())
}

/// The files of `master/config/` that are not keys.
pub const RESERVED_NAMES: &[&str] = &[
    PrivateConfig::FILE,
    "webhooks.json",
    "webhook_fields.json",
    crate::ssh::KNOWN_HOSTS,
];

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

    #[test]
    fn the_described_systems_ssh_section_maps_onto_our_keys() {
        // The described system's blank project template, as it ships.
        let blank = PrivateConfig::parse(
            r#"{"prepare-build": {"master-dir-commands": {"ssh": {"use": true, "name": "id.rsa"}}}}"#,
        )
        .unwrap();
        let k = blank.ssh_keys();
        let m = k.master.unwrap();
        assert_eq!(
            (m.file.as_str(), m.field.as_str()),
            ("id.rsa", "prepare-build.master-dir-commands.ssh")
        );
        assert!(m.from_described_section());
        assert_eq!(k.build, None);
        assert!(k.notes.is_empty());
        // Its documented example: a key for each list, the default name when none is given.
        let both = PrivateConfig::parse(
            r#"{"prepare-build": {"master-dir-commands": {"ssh": {"use": true, "name": "ams.id.rsa"}},
                                  "build-dir-commands": {"ssh": {"use": true}}}}"#,
        )
        .unwrap()
        .ssh_keys();
        assert_eq!(both.master.unwrap().file, "ams.id.rsa");
        assert_eq!(both.build.unwrap().file, DESCRIBED_DEFAULT_KEY);
        let off = PrivateConfig::parse(
            r#"{"prepare-build": {"master-dir-commands": {"ssh": {"use": false}}}}"#,
        )
        .unwrap()
        .ssh_keys();
        assert_eq!(off, SshKeys::default());
        // Our own key wins everywhere; a section naming another file is noted.
        let own = PrivateConfig::parse(
            r#"{"ssh-key": "deploy", "prepare-build": {"master-dir-commands": {"ssh": {"use": true}}}}"#,
        )
        .unwrap()
        .ssh_keys();
        assert_eq!(own.master.as_ref().unwrap().file, "deploy");
        assert_eq!(own.build.as_ref().unwrap().field, "ssh-key");
        assert!(!own.master.unwrap().from_described_section());
        assert_eq!(own.notes.len(), 1);
        assert!(
            own.notes[0].contains("prepare-build.master-dir-commands.ssh")
                && own.notes[0].contains("`id_rsa`")
        );
        // Bad names and unknown keys name the field.
        let e = PrivateConfig::parse(
            r#"{"prepare-build": {"build-dir-commands": {"ssh": {"use": true, "name": "../k"}}}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "prepare-build.build-dir-commands.ssh.name");
        let e = PrivateConfig::parse(
            r#"{"prepare-build": {"master-dir-commands": {"ssh": {"use": true, "key": "k"}}}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field `key`"), "{e}");
        let e = PrivateConfig::parse(r#"{"ssh-key": "webhooks.json"}"#).unwrap_err();
        assert_eq!(e.field, "ssh-key");
    }
}
