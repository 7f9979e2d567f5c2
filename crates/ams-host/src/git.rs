//! Git, by running the `git` program (robust with SSH keys and every transport). Every argument
//! is passed without a shell; branch names and commits are checked first so that none can be
//! read as an option.

use std::path::Path;
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

/// Where git may find an SSH key for the remote.
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    pub ssh_key: Option<std::path::PathBuf>,
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
    cmd.args(["-c", "core.trustctime=false"])
        .args([
            "-c",
            "gc.autoDetach=false",
            "-c",
            "maintenance.autoDetach=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(key) = &auth.ssh_key {
        cmd.env(
            "GIT_SSH_COMMAND",
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
                ams_core::protocol::shell_quote(&key.to_string_lossy())
            ),
        );
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run git: {e}; install git"))?;
    let out = tokio::select! {
        r = tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output()) => match r {
            Ok(r) => r.map_err(|e| format!("git {}: {e}", args.join(" ")))?,
            Err(_) => return Err(format!("git {} timed out after {}s", args.join(" "), GIT_TIMEOUT.as_secs())),
        },
        _ = cancel.cancelled() => return Err("canceled".into()),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let mut err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        err.truncate(4000);
        Err(format!("git {} failed: {err}", args.join(" ")))
    }
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

/// Brings the checkout at `dir` to the requested commit (or the head of `branch`, or of the
/// remote's default branch), discarding local changes and untracked files. Returns the commit.
pub async fn update(
    dir: &Path,
    branch: Option<&str>,
    commit: Option<&str>,
    auth: &GitAuth,
    cancel: &CancellationToken,
) -> Result<String, String> {
    if let Some(b) = branch {
        if !valid_branch(b) {
            return Err(format!("`{b}` is not a valid branch name"));
        }
    }
    if let Some(c) = commit {
        if !valid_commit(c) {
            return Err(format!("`{c}` is not a commit id (4 to 64 hex digits)"));
        }
    }
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
                .await?;
                if git(dir, &["cat-file", "-e", &present(c)], auth, cancel)
                    .await
                    .is_err()
                {
                    git(dir, &["fetch", "--quiet", "origin", c], auth, cancel).await?;
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
                .await?;
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
                .await?;
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
    git(dir, &["rev-parse", "HEAD"], auth, cancel).await
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
    fn commits() {
        assert!(valid_commit("deadbeef"));
        assert!(!valid_commit("-deadbeef"));
        assert!(!valid_commit("main"));
    }
}
