//! Projects on disk: the described system's skeleton, `project add` (clone, with a key) and
//! `project init`, loading a project's private configuration, and its SSH keys and pinned host
//! keys.

use crate::git::{self, GitAuth};
use crate::paths::{create_private_dir, write_private, DataDir, ProjectDir};
use ams_core::names::validate_project_name;
use ams_core::private_config::{KeyChoice, PrivateConfig};
use ams_core::ssh::{self, KeyProblem};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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

fn private_config_text(branch: Option<&str>, ssh_key: Option<&str>) -> String {
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
    if let Some(k) = ssh_key {
        v["ssh-key"] = serde_json::Value::String(k.to_string());
    }
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

fn skeleton(p: &ProjectDir, branch: Option<&str>, key: Option<&NewKey>) -> std::io::Result<()> {
    fs::create_dir_all(p.master_build())?;
    // The private config holds secrets: the host's user alone reads it.
    create_private_dir(&p.config())?;
    fs::create_dir_all(p.builds())?;
    if let Some(k) = key {
        write_private(&p.config().join(&k.name), &k.bytes)?;
    }
    write_private(
        &p.config().join(PrivateConfig::FILE),
        private_config_text(branch, key.map(|k| k.name.as_str())).as_bytes(),
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
        skeleton(&p, None, None)?;
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

/// A private key given to `project add --ssh-key FILE`: its file name and its bytes, checked.
struct NewKey {
    name: String,
    bytes: Vec<u8>,
}

impl NewKey {
    /// Reads and checks the key at `path`: a private key without a passphrase, whose file name
    /// can be its name in `master/config/`. The original's mode is not checked: the copy is
    /// 0600.
    fn read(path: &Path) -> Result<NewKey, String> {
        let shown = path.display().to_string();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        ams_core::private_config::check_key_name(&name)
            .map_err(|e| format!("--ssh-key {shown}: the file's name {e}"))?;
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("--ssh-key {shown}: there is no such file"),
            _ => KeyProblem::Unreadable(e.to_string()).message(&shown),
        })?;
        if !meta.is_file() {
            return Err(KeyProblem::NotAKey("it is not a regular file".into()).message(&shown));
        }
        let bytes = read_capped(path).map_err(|e| KeyProblem::Unreadable(e).message(&shown))?;
        ssh::check_private_key(&bytes).map_err(|p| p.message(&shown))?;
        Ok(NewKey { name, bytes })
    }
}

/// At most one byte more than [`ssh::MAX_KEY_BYTES`] of a file (so a bigger one is told apart).
fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| {
            f.take(ssh::MAX_KEY_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// `amsbuild project add NAME --git URL [--branch BR] [--ssh-key FILE]`: the skeleton plus a
/// clone of the source. With a key, it is copied into `master/config/` (0600) and named by
/// `ssh-key` before the clone, which uses it. Returns the project and the lines to show (a
/// host key pinned on first use). Nothing is left behind when the clone fails.
pub async fn add(
    data: &DataDir,
    name: &str,
    url: &str,
    branch: Option<&str>,
    ssh_key: Option<&Path>,
) -> Result<(ProjectDir, Vec<String>), String> {
    let key = ssh_key.map(NewKey::read).transpose()?;
    let p = check_new(data, name)?;
    let result = async {
        skeleton(&p, branch, key.as_ref()).map_err(|e| e.to_string())?;
        let private = private_config(&p)?;
        let auth = ssh(&p, name, &private)?.git;
        let watch = auth.watch();
        let cloned = git::clone(url, &p.master_source(), branch, &auth).await;
        let pinned = watch.first_use_lines();
        cloned.map(|()| pinned)
    }
    .await;
    match result {
        Ok(lines) => Ok((p, lines)),
        Err(e) => {
            let _ = fs::remove_dir_all(&p.root);
            Err(format!("cannot add project `{name}`: {e}"))
        }
    }
}

/// The SSH settings of a project's preparation: git's (also master-dir-commands') and
/// build-dir-commands', from [`PrivateConfig::ssh_keys`], each key file checked.
#[derive(Debug, Clone)]
pub struct ProjectSsh {
    pub git: GitAuth,
    pub build_commands: GitAuth,
    /// What the operator should know (logged at start and in each build's log).
    pub notes: Vec<String>,
}

/// Resolves and checks a project's SSH keys. A key that is there but unusable (unreadable, too
/// open, protected by a passphrase, not a private key) is an error with the fix, as is a key
/// named by `ssh-key` that is missing; a key named only by the described system's
/// `prepare-build` section that is missing is a note, and git runs without it (its blank
/// template names one).
pub fn ssh(p: &ProjectDir, name: &str, private: &PrivateConfig) -> Result<ProjectSsh, String> {
    let keys = private.ssh_keys();
    let config = p.config();
    let mut notes = keys.notes;
    let mut resolve = |choice: &Option<KeyChoice>, uses: &str| -> Result<Option<PathBuf>, String> {
        let Some(c) = choice else {
            return Ok(None);
        };
        let path = config.join(&c.file);
        let shown = path.display().to_string();
        match check_key_file(&path) {
            Ok(()) => {
                if c.from_described_section() {
                    notes.push(format!(
                        "{}: {} (the described system's SSH setup) gives the key {shown} to \
                         {uses}; \"ssh-key\": \"{}\" says the same for all of git and the host \
                         commands",
                        PrivateConfig::FILE,
                        c.field,
                        c.file
                    ));
                }
                Ok(Some(path))
            }
            Err(KeyProblem::Missing) if c.from_described_section() => {
                notes.push(format!(
                    "{}: {} (the described system's SSH setup) names the key `{}`, which is not \
                     in {}: {uses} run without a key. Fix: copy the key to {shown} (chmod 600), \
                     or remove the \"prepare-build\" section if the remote needs no key (see \
                     docs/coming-from-python.md)",
                    PrivateConfig::FILE,
                    c.field,
                    c.file,
                    config.display()
                ));
                Ok(None)
            }
            Err(e) => Err(format!(
                "{} `{}` of {}: {}",
                c.field,
                c.file,
                PrivateConfig::FILE,
                e.message(&shown)
            )),
        }
    };
    let master = resolve(&keys.master, "git and master-dir-commands")?;
    let build = resolve(&keys.build, "build-dir-commands")?;
    let auth = |key| GitAuth {
        ssh_key: key,
        known_hosts: Some(config.join(ssh::KNOWN_HOSTS)),
        project: name.to_string(),
    };
    Ok(ProjectSsh {
        git: auth(master),
        build_commands: auth(build),
        notes,
    })
}

/// Checks a private key file where the host will give it to ssh: there, a regular file, only
/// the host's user may read it, readable, and a private key without a passphrase.
pub fn check_key_file(path: &Path) -> Result<(), KeyProblem> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KeyProblem::Missing,
        _ => KeyProblem::Unreadable(e.to_string()),
    })?;
    if !meta.is_file() {
        return Err(KeyProblem::NotAKey("it is not a regular file".into()));
    }
    let mode = meta.permissions().mode();
    if ssh::too_open(mode) {
        return Err(KeyProblem::TooOpen(mode));
    }
    let bytes = read_capped(path).map_err(KeyProblem::Unreadable)?;
    ssh::check_private_key(&bytes)
}

/// `amsbuild project ssh-hostkey NAME [--reset]`: the host keys pinned in the project's
/// `known_hosts`, one line each; with `reset`, the file is emptied first (and the lines say
/// what was removed), so the next connection pins the server's key again.
pub fn ssh_hostkey(data: &DataDir, name: &str, reset: bool) -> Result<Vec<String>, String> {
    if !exists(data, name) {
        return Err(format!("no project `{name}`"));
    }
    let path = data.project(name).config().join(ssh::KNOWN_HOSTS);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let pins = ssh::pins(&text);
    let mut out = Vec::new();
    if reset {
        write_private(&path, b"").map_err(|e| format!("{}: {e}", path.display()))?;
        for p in &pins {
            out.push(format!("removed {p}"));
        }
        out.push(format!(
            "{}: emptied; the next connection to the remote pins the server's host key again \
             (the build log and the host log show its fingerprint)",
            path.display()
        ));
    } else if pins.is_empty() {
        out.push(format!(
            "no host key is pinned for project {name} ({}); the first connection to an SSH \
             remote pins the server's key (trust on first use)",
            path.display()
        ));
    } else {
        out.extend(pins.iter().map(ToString::to_string));
    }
    Ok(out)
}

/// Start-up warnings about the projects' SSH settings: the notes of [`ssh`] and its errors.
pub fn ssh_startup_warnings(data: &DataDir) -> Vec<String> {
    let mut out = Vec::new();
    for name in list(data) {
        let p = data.project(&name);
        let Ok(private) = private_config(&p) else {
            continue;
        };
        match ssh(&p, &name, &private) {
            Ok(s) => out.extend(s.notes.into_iter().map(|n| format!("project {name}: {n}"))),
            Err(e) => out.push(format!("project {name}: {e}")),
        }
    }
    out
}

/// What the last scan of `projects/` found, so that [`list`] (every dashboard and API request)
/// does not look into every project folder again.
#[derive(Debug, Default)]
pub struct Listing {
    /// `projects/`'s modification time and inode when scanned, if a later change is sure to
    /// show in them; `None` scans again.
    stamp: Option<(SystemTime, u64)>,
    scanned_at: Option<Instant>,
    /// Valid names with a `master/` folder, sorted.
    projects: Vec<String>,
    /// Valid names whose `master/` folder was missing (a project being created by hand).
    incomplete: Vec<String>,
}

/// How long a scan is trusted even when `projects/` has not changed: a `master/` folder
/// removed by hand inside a project shows within this.
const LISTING_TRUSTED: Duration = Duration::from_secs(2);

/// Names of the projects in the data directory, sorted. A project is a folder of `projects/`
/// with a valid name and a `master/` folder.
///
/// The answer comes from the last scan while `projects/` is unchanged (folders added, removed
/// or renamed change its modification time) and the scan is under [`LISTING_TRUSTED`] old;
/// folders that had no `master/` yet are looked at again on every call. A modification time
/// within a second of its scan is not trusted (two changes within the file system's clock tick
/// can share one), so such a scan is repeated on the next call.
pub fn list(data: &DataDir) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = data.projects();
    let stamp = fs::metadata(&dir)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.ino())));
    let Ok(mut l) = data.listing.lock() else {
        return scan(&dir).0;
    };
    let fresh = l.scanned_at.is_some_and(|t| t.elapsed() < LISTING_TRUSTED);
    if fresh && stamp.is_some() && l.stamp == stamp {
        if !l.incomplete.is_empty() {
            let (done, still): (Vec<String>, Vec<String>) = std::mem::take(&mut l.incomplete)
                .into_iter()
                .partition(|n| dir.join(n).join("master").is_dir());
            l.incomplete = still;
            if !done.is_empty() {
                l.projects.extend(done);
                l.projects.sort();
            }
        }
        return l.projects.clone();
    }
    let started = SystemTime::now();
    let (projects, incomplete) = scan(&dir);
    let settled = stamp.filter(|(m, _)| {
        started
            .duration_since(*m)
            .is_ok_and(|age| age >= Duration::from_secs(1))
    });
    *l = Listing {
        stamp: settled,
        scanned_at: Some(Instant::now()),
        projects: projects.clone(),
        incomplete,
    };
    projects
}

/// Reads `projects/`: the valid names with a `master/` folder (sorted) and those without.
fn scan(dir: &Path) -> (Vec<String>, Vec<String>) {
    let (mut projects, incomplete): (Vec<String>, Vec<String>) = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_project_name(n).is_ok())
        .partition(|n| dir.join(n).join("master").is_dir());
    projects.sort();
    (projects, incomplete)
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

    /// Sets `projects/`'s modification time to `at`.
    fn stamp_projects(d: &DataDir, at: SystemTime) {
        let f = fs::File::open(d.projects()).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn the_project_list_sees_projects_come_and_go_between_scans() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path());
        d.create().unwrap();
        init(&d, "a").unwrap();
        // A project made by hand: its folder first, `master/` later; and a folder that is
        // not a project name.
        fs::create_dir(d.projects().join("b")).unwrap();
        fs::create_dir_all(d.projects().join("bad name/master")).unwrap();
        stamp_projects(&d, SystemTime::now() - Duration::from_secs(10));
        assert_eq!(list(&d), ["a"]);
        // `master/` inside a project does not change `projects/`: still seen at once.
        fs::create_dir(d.projects().join("b/master")).unwrap();
        assert_eq!(list(&d), ["a", "b"]);
        // A clone of the data directory shares the scan and sees the same.
        assert_eq!(list(&d.clone()), ["a", "b"]);
        // A project created or removed just now changes `projects/`.
        init(&d, "c").unwrap();
        assert_eq!(list(&d), ["a", "b", "c"]);
        fs::remove_dir_all(d.projects().join("a")).unwrap();
        assert_eq!(list(&d), ["b", "c"]);
        // Two changes within one tick of the file system's clock share a modification time:
        // a scan right after a change is not trusted, so the second change shows too.
        let tick = SystemTime::now() - Duration::from_millis(300);
        stamp_projects(&d, tick);
        assert_eq!(list(&d), ["b", "c"]);
        fs::create_dir_all(d.projects().join("e/master")).unwrap();
        stamp_projects(&d, tick);
        assert_eq!(list(&d), ["b", "c", "e"]);
    }

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

    #[test]
    fn key_files_are_checked_before_ssh_sees_them() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path());
        let p = init(&d, "k").unwrap();
        let key = p.config().join("id_ed25519");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(check_key_file(&key), Ok(()));
        assert_eq!(
            check_key_file(&p.config().join("nope")),
            Err(KeyProblem::Missing)
        );
        assert!(matches!(
            check_key_file(&p.config()),
            Err(KeyProblem::NotAKey(_))
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(check_key_file(&key), Err(KeyProblem::TooOpen(0o100640)));

        // `ssh-key` naming an unusable or missing file is an error naming the field and file.
        let cfg = |v: &str| PrivateConfig::parse(v).unwrap();
        let e = ssh(&p, "k", &cfg(r#"{"ssh-key": "id_ed25519"}"#)).unwrap_err();
        assert!(
            e.starts_with("ssh-key `id_ed25519` of pipeline-config.json: ")
                && e.contains("mode 0640"),
            "{e}"
        );
        let e = ssh(&p, "k", &cfg(r#"{"ssh-key": "other"}"#)).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = ssh(&p, "k", &cfg(r#"{"ssh-key": "id_ed25519"}"#)).unwrap();
        assert_eq!(s.git.ssh_key.as_deref(), Some(key.as_path()));
        assert_eq!(s.build_commands.ssh_key.as_deref(), Some(key.as_path()));
        assert_eq!(s.git.known_hosts, Some(p.config().join("known_hosts")));
        assert!(s.notes.is_empty());
        // The described section: a present key is used (and said so), a missing one is a note.
        let described = r#"{"prepare-build": {"master-dir-commands": {"ssh": {"use": true, "name": "id_ed25519"}},
                                              "build-dir-commands": {"ssh": {"use": true}}}}"#;
        let s = ssh(&p, "k", &cfg(described)).unwrap();
        assert_eq!(s.git.ssh_key.as_deref(), Some(key.as_path()));
        assert_eq!(s.build_commands.ssh_key, None);
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        assert!(
            s.notes[0].contains("gives the key")
                && s.notes[0].contains("git and master-dir-commands")
        );
        assert!(
            s.notes[1].contains("names the key `id_rsa`, which is not in")
                && s.notes[1].contains("build-dir-commands run without a key")
        );
    }
}
