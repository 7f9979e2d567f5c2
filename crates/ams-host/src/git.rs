//! Git, by running the `git` program (robust with SSH keys and every transport). Every argument
//! is passed without a shell; branch names and commits are checked first so that none can be
//! read as an option.
//!
//! The repository's own configuration is treated as untrusted: git runs with no system or
//! global configuration, with hooks, fsmonitor, credential helpers and other config-driven
//! commands switched off on the command line, with only the usual transports allowed, and a
//! checkout's `.git/config` holding any key outside a short list of inert ones is refused
//! before git reads it (see [`check_repo_config`]).

use ams_core::ssh;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Longest a single git command may take.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Checks a branch name: git's own rules, plus no leading `-`.
pub fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 255
        && !b.starts_with('-')
        && !b.starts_with('/')
        && !b.ends_with('/')
        && !b.ends_with(".lock")
        && !b.ends_with('.')
        && !b.contains("..")
        && !b.contains("@{")
        && !b.contains("//")
        && !b
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
}

/// Checks a commit id: 4 to 64 hex digits.
pub fn valid_commit(c: &str) -> bool {
    (4..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How git (and a trusted host command's git) reaches a project's remote over SSH. The default
/// is ssh's own settings in batch mode, for commands that never connect.
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    /// The project's private key (checked by `project::ssh` before it gets here).
    pub ssh_key: Option<PathBuf>,
    /// The project's own `known_hosts`, where the server's host key is pinned on first use.
    pub known_hosts: Option<PathBuf>,
    /// The project's name, for the messages.
    pub project: String,
}

impl GitAuth {
    /// The `GIT_SSH_COMMAND` git and trusted host commands get (see [`ssh::ssh_command`]).
    pub fn ssh_command(&self) -> Result<String, String> {
        let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().to_string());
        ssh::ssh_command(s(&self.ssh_key).as_deref(), s(&self.known_hosts).as_deref())
    }

    /// Starts watching the project's `known_hosts` for keys pinned on first use, creating the
    /// file (empty, 0600) when it is missing so that ssh appends to a file only we may read.
    pub fn watch(&self) -> PinWatch {
        let before = self.known_hosts.as_ref().map(|p| {
            if !p.exists() {
                if let Err(e) = crate::paths::write_private(p, b"") {
                    tracing::warn!("{}: {e}", p.display());
                }
            }
            std::fs::read_to_string(p).unwrap_or_default()
        });
        PinWatch {
            path: self.known_hosts.clone(),
            before: before.unwrap_or_default(),
            project: self.project.clone(),
        }
    }

    /// Our words for ssh's failure in git's `stderr`, when it is one we know.
    fn explain(&self, stderr: &str) -> Option<String> {
        self.known_hosts.as_ref()?;
        let key = self
            .ssh_key
            .as_ref()
            .map(|k| k.to_string_lossy().to_string());
        ssh::explain_failure(
            stderr,
            ssh::SshContext {
                project: &self.project,
                key: key.as_deref(),
            },
        )
    }
}

/// The project's `known_hosts` as it was before a connection, to tell what ssh pinned since.
#[derive(Debug)]
pub struct PinWatch {
    path: Option<PathBuf>,
    before: String,
    project: String,
}

impl PinWatch {
    /// One line per host key pinned since the watch began, with its fingerprint.
    pub fn first_use_lines(&self) -> Vec<String> {
        let Some(p) = &self.path else {
            return Vec::new();
        };
        let after = std::fs::read_to_string(p).unwrap_or_default();
        ssh::new_pins(&self.before, &after)
            .iter()
            .map(|pin| ssh::first_use_line(&self.project, pin))
            .collect()
    }
}

async fn git(
    dir: &Path,
    args: &[&str],
    auth: &GitAuth,
    cancel: &CancellationToken,
) -> Result<String, String> {
    let mut cmd = Command::new("git");
    // Hard-linking master's files into builds changes their ctime; with ctime trusted, git would
    // re-read every file of master on each update. Size, mtime and inode still catch changes.
    // Automatic gc and maintenance run in the foreground, under the master lock: detached, they
    // would repack .git/objects while the tree is being copied into a build.
    cmd.args(["-c", "core.trustctime=false"]).args([
        "-c",
        "gc.autoDetach=false",
        "-c",
        "maintenance.autoDetach=false",
    ]);
    for c in HARDENING {
        cmd.args(["-c", c]);
    }
    // Its own process group: a Ctrl-C in the host's terminal is the host's to handle (a
    // graceful stop lets this build go on), not git's.
    cmd.args(args)
        .process_group(0)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("SSH_ASKPASS", "true")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROTOCOL_FROM_USER", "0")
        .env_remove("GIT_CONFIG_PARAMETERS")
        .env_remove("GIT_CONFIG_COUNT")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("GIT_SSH_COMMAND", auth.ssh_command()?)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run git: {e}; install git"))?;
    // A cancel or a timeout takes git's whole group: ssh, a remote helper, a gc it runs. The
    // child stays here, unreaped until `wait` below, so the guard (dropped before it) never
    // names a group number that was freed.
    let mut group = crate::group::GroupKill::new(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        use tokio::io::AsyncReadExt;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let read_out = async {
            match stdout {
                Some(mut s) => s.read_to_end(&mut out).await.map(drop),
                None => Ok(()),
            }
        };
        let read_err = async {
            match stderr {
                Some(mut s) => s.read_to_end(&mut err).await.map(drop),
                None => Ok(()),
            }
        };
        let (a, b) = tokio::join!(read_out, read_err);
        a?;
        b?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>(std::process::Output {
            status,
            stdout: out,
            stderr: err,
        })
    };
    let out = tokio::select! {
        r = tokio::time::timeout(GIT_TIMEOUT, run) => match r {
            Ok(r) => r.map_err(|e| format!("git {}: {e}", args.join(" ")))?,
            Err(_) => return Err(format!("git {} timed out after {}s", args.join(" "), GIT_TIMEOUT.as_secs())),
        },
        _ = cancel.cancelled() => return Err("canceled".into()),
    };
    group.reaped();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let mut err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(ours) = auth.explain(&err) {
            return Err(format!("git {} failed: {ours}", args.join(" ")));
        }
        let mut cut = err.len().min(4000);
        while !err.is_char_boundary(cut) {
            cut -= 1;
        }
        err.truncate(cut);
        Err(format!("git {} failed: {err}", args.join(" ")))
    }
}

/// Settings given on every git command line, which win over any file: no hooks, no fsmonitor,
/// no credential helper, no external diff or pager, the standard pack programs, and only the
/// usual transports (`ext::` and the like, which run commands, are refused).
const HARDENING: &[&str] = &[
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.sshCommand=ssh -o BatchMode=yes",
    "core.askPass=true",
    "core.editor=true",
    "core.pager=cat",
    "core.alternateRefsCommand=",
    "credential.helper=",
    "diff.external=",
    "remote.origin.uploadpack=git-upload-pack",
    "remote.origin.receivepack=git-receive-pack",
    "protocol.allow=never",
    "protocol.https.allow=always",
    "protocol.http.allow=always",
    "protocol.ssh.allow=always",
    "protocol.git.allow=always",
    "protocol.file.allow=always",
];

/// Keys a checkout's `.git/config` may hold (git writes these itself). Anything else, such as
/// `core.fsmonitor`, `core.sshCommand`, `remote.*.uploadpack`, `filter.*` or `include.path`,
/// could make the host run a command, so such a config is refused.
fn inert_config_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    let parts: Vec<&str> = k.split('.').collect();
    let (section, name) = (parts[0], parts[parts.len() - 1]);
    match (section, parts.len()) {
        ("core", 2) => matches!(
            name,
            "repositoryformatversion"
                | "filemode"
                | "bare"
                | "logallrefupdates"
                | "ignorecase"
                | "precomposeunicode"
                | "symlinks"
                | "autocrlf"
                | "eol"
                | "safecrlf"
                | "trustctime"
                | "checkstat"
                | "untrackedcache"
                | "compression"
                | "loosecompression"
                | "bigfilethreshold"
        ),
        ("extensions", 2) => matches!(name, "objectformat" | "refstorage"),
        ("remote", n) if n >= 3 => matches!(
            name,
            "url" | "fetch" | "pushurl" | "tagopt" | "prune" | "mirror" | "skipdefaultupdate"
        ),
        ("branch", n) if n >= 3 => matches!(name, "remote" | "merge" | "rebase"),
        // Exact keys only: `gc.recentObjectsHook`, `fetch.bundleURI` and the like run
        // commands or reach out, so no section is allowed as a whole.
        ("gc", 2) => matches!(
            name,
            "auto" | "autodetach" | "autopacklimit" | "pruneexpire"
        ),
        ("pack", 2) => matches!(name, "threads" | "windowmemory"),
        ("fetch", 2) => matches!(name, "prune" | "prunetags"),
        ("maintenance", 2) => matches!(name, "auto" | "autodetach"),
        ("init", 2) => name == "defaultbranch",
        ("user", 2) => matches!(name, "name" | "email"),
        _ => false,
    }
}

/// Refuses a checkout whose `.git/config` holds a key outside the inert ones, naming the key
/// and the fix. The file is listed by git itself without includes, which runs nothing.
pub async fn check_repo_config(dir: &Path, cancel: &CancellationToken) -> Result<(), String> {
    let config = dir.join(".git").join("config");
    let meta =
        std::fs::symlink_metadata(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file; re-add the project",
            config.display()
        ));
    }
    let file = config.to_string_lossy().to_string();
    let listed = git(
        dir,
        &[
            "config",
            "--file",
            &file,
            "--no-includes",
            "--name-only",
            "--list",
        ],
        &GitAuth::default(),
        cancel,
    )
    .await?;
    if let Some(bad) = listed.lines().find(|k| !inert_config_key(k)) {
        return Err(format!(
            "master/project_source/.git/config sets `{bad}`, which could run a command on the \
             host; the host refuses to use this checkout: remove the key (git config --file \
             {file} --unset-all {bad}) or re-add the project"
        ));
    }
    Ok(())
}

/// Clones `url` into `dest` (which must not exist), optionally at `branch`.
pub async fn clone(
    url: &str,
    dest: &Path,
    branch: Option<&str>,
    auth: &GitAuth,
) -> Result<(), String> {
    if url.starts_with('-') {
        return Err("the git URL may not start with `-`".into());
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    let dest_s = dest.to_string_lossy().to_string();
    let mut args = vec!["clone", "--no-hardlinks"];
    if let Some(b) = branch {
        if !valid_branch(b) {
            return Err(format!("`{b}` is not a valid branch name"));
        }
        args.extend(["--branch", b]);
    }
    args.extend(["--", url, &dest_s]);
    git(parent, &args, auth, &CancellationToken::new())
        .await
        .map(|_| ())
}

/// The URL of the `origin` remote of the checkout at `dir`, if it has one.
pub async fn origin_url(dir: &Path) -> Option<String> {
    let out = git(
        dir,
        &["config", "--get", "remote.origin.url"],
        &GitAuth::default(),
        &CancellationToken::new(),
    )
    .await
    .ok()?;
    let url = out.trim();
    (!url.is_empty()).then(|| url.to_string())
}

/// The commit the checkout at `dir` is at (`get-git-hash` after trusted master-dir-commands),
/// once its repository config is checked again (the commands may have changed it).
pub async fn head(dir: &Path, cancel: &CancellationToken) -> Option<String> {
    check_repo_config(dir, cancel).await.ok()?;
    let out = git(dir, &["rev-parse", "HEAD"], &GitAuth::default(), cancel)
        .await
        .ok()?;
    let h = out.trim().to_string();
    valid_commit(&h).then_some(h)
}

/// The message of `commit` in the checkout at `dir`, cut at 4 KiB (on a character boundary).
pub async fn message(dir: &Path, commit: &str, cancel: &CancellationToken) -> Option<String> {
    if !valid_commit(commit) {
        return None;
    }
    let out = git(
        dir,
        &["log", "-1", "--format=%B", commit, "--"],
        &GitAuth::default(),
        cancel,
    )
    .await
    .ok()?;
    let mut m = out.trim_end().to_string();
    if m.len() > 4096 {
        let mut cut = 4096;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
    }
    Some(m)
}

/// Why an update failed, and on whose side: the remote (a fetch failed: the network, the
/// forge, the credentials) or the request and the checkout (a bad name, a refused repository
/// config, a commit or branch that is not there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    Remote(String),
    Refused(String),
}

impl From<String> for UpdateError {
    fn from(e: String) -> Self {
        UpdateError::Refused(e)
    }
}

impl std::fmt::Display for UpdateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateError::Remote(e) | UpdateError::Refused(e) => f.write_str(e),
        }
    }
}

/// Brings the checkout at `dir` to the requested commit (or the head of `branch`, or of the
/// remote's default branch), discarding local changes and untracked files. Returns the commit.
pub async fn update(
    dir: &Path,
    branch: Option<&str>,
    commit: Option<&str>,
    auth: &GitAuth,
    cancel: &CancellationToken,
) -> Result<String, UpdateError> {
    if let Some(b) = branch {
        if !valid_branch(b) {
            return Err(format!("`{b}` is not a valid branch name").into());
        }
    }
    if let Some(c) = commit {
        if !valid_commit(c) {
            return Err(format!("`{c}` is not a commit id (4 to 64 hex digits)").into());
        }
    }
    check_repo_config(dir, cancel).await?;
    let has_origin = git(dir, &["remote"], auth, cancel)
        .await?
        .lines()
        .any(|l| l == "origin");
    let target = match (commit, branch) {
        (Some(c), _) => {
            let present = |c: &str| format!("{c}^{{commit}}");
            if git(dir, &["cat-file", "-e", &present(c)], auth, cancel)
                .await
                .is_err()
                && has_origin
            {
                git(
                    dir,
                    &["fetch", "--prune", "--quiet", "origin"],
                    auth,
                    cancel,
                )
                .await
                .map_err(UpdateError::Remote)?;
                if git(dir, &["cat-file", "-e", &present(c)], auth, cancel)
                    .await
                    .is_err()
                {
                    git(dir, &["fetch", "--quiet", "origin", c], auth, cancel)
                        .await
                        .map_err(UpdateError::Remote)?;
                }
            }
            c.to_string()
        }
        (None, Some(b)) => {
            if has_origin {
                let spec = format!("+refs/heads/{b}:refs/remotes/origin/{b}");
                git(
                    dir,
                    &["fetch", "--prune", "--quiet", "origin", &spec],
                    auth,
                    cancel,
                )
                .await
                .map_err(UpdateError::Remote)?;
                format!("refs/remotes/origin/{b}")
            } else {
                format!("refs/heads/{b}")
            }
        }
        (None, None) => {
            if has_origin {
                git(
                    dir,
                    &["fetch", "--prune", "--quiet", "origin"],
                    auth,
                    cancel,
                )
                .await
                .map_err(UpdateError::Remote)?;
                let _ = git(
                    dir,
                    &["remote", "set-head", "origin", "--auto"],
                    auth,
                    cancel,
                )
                .await;
                "refs/remotes/origin/HEAD".to_string()
            } else {
                "HEAD".to_string()
            }
        }
    };
    git(
        dir,
        &["checkout", "--force", "--quiet", "--detach", &target],
        auth,
        cancel,
    )
    .await?;
    git(dir, &["clean", "-ffdxq"], auth, cancel).await?;
    Ok(git(dir, &["rev-parse", "HEAD"], auth, cancel).await?)
}

/// Whether `commit` (a full id) is on `branch`: the branch's head or an ancestor of it, the
/// head fetched from origin first when the checkout has one. Any doubt is an error.
pub async fn commit_on_branch(
    dir: &Path,
    commit: &str,
    branch: &str,
    auth: &GitAuth,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    if !valid_branch(branch) {
        return Err(format!("`{branch}` is not a valid branch name"));
    }
    if !valid_commit(commit) {
        return Err(format!("`{commit}` is not a commit id"));
    }
    let has_origin = git(dir, &["remote"], auth, cancel)
        .await?
        .lines()
        .any(|l| l == "origin");
    let head = if has_origin {
        let spec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        git(
            dir,
            &["fetch", "--prune", "--quiet", "origin", &spec],
            auth,
            cancel,
        )
        .await?;
        format!("refs/remotes/origin/{branch}")
    } else {
        format!("refs/heads/{branch}")
    };
    let base = git(dir, &["merge-base", commit, &head], auth, cancel).await?;
    Ok(base == commit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for ok in [
            "main",
            "feature/x",
            "release-1.2",
            "$(touch${IFS}/tmp/pwned)",
        ] {
            // `$(…)` is a legal git branch name; it is never given to a shell.
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in [
            "-x",
            "--upload-pack=evil",
            "a..b",
            "a b",
            "a~1",
            "x.lock",
            "",
            "a\nb",
        ] {
            assert!(!valid_branch(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_inert_config_keys_pass() {
        for ok in [
            "core.repositoryformatversion",
            "core.bare",
            "remote.origin.url",
            "remote.origin.fetch",
            "branch.main.merge",
            "gc.auto",
        ] {
            assert!(inert_config_key(ok), "{ok}");
        }
        for bad in [
            "core.fsmonitor",
            "core.hookspath",
            "core.sshCommand",
            "remote.origin.uploadpack",
            "remote.origin.receivepack",
            "filter.lfs.smudge",
            "include.path",
            "includeIf.gitdir:/.path",
            "credential.helper",
            "extensions.worktreeconfig",
            "core.pager",
            "diff.external",
            "gc.recentObjectsHook",
            "fetch.bundleURI",
            "maintenance.strategy",
        ] {
            assert!(!inert_config_key(bad), "{bad}");
        }
    }

    #[test]
    fn commits() {
        assert!(valid_commit("deadbeef"));
        assert!(!valid_commit("-deadbeef"));
        assert!(!valid_commit("main"));
    }
}
