//! Commit statuses on the forge: `"commit-status"` of pipeline-config.json, and the request
//! each forge documents for a build's state — GitHub's `POST /repos/{owner}/{repo}/statuses/{sha}`
//! and Bitbucket Cloud's `POST /2.0/repositories/{workspace}/{slug}/commit/{sha}/statuses/build`.

use crate::status::BuildStatus;
use serde::Deserialize;
use serde_json::{json, Value};

/// Which forge's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    Github,
    Bitbucket,
}

/// `"commit-status"` of pipeline-config.json.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommitStatusConfig {
    #[serde(rename = "type")]
    pub forge: Forge,
    /// A token with the right to write statuses (GitHub: `repo:status`; Bitbucket: a repository
    /// access token, or an app password with `username`).
    pub token: String,
    /// `owner/name` (GitHub) or `workspace/slug` (Bitbucket); without it, taken from the
    /// project's `origin` remote when that is on github.com or bitbucket.org.
    #[serde(default)]
    pub repo: Option<String>,
    /// The API's base URL, for GitHub Enterprise or a test receiver.
    #[serde(default)]
    pub api: Option<String>,
    /// Bitbucket only: sign in as this user with `token` as its app password.
    #[serde(default)]
    pub username: Option<String>,
    /// The name the status has on the forge.
    #[serde(default)]
    pub context: Option<String>,
}

impl CommitStatusConfig {
    /// Checks the fields a forge needs; the message names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.token.trim().is_empty() {
            return Err((
                "token",
                "is empty; give a token that may write statuses".into(),
            ));
        }
        if let Some(r) = &self.repo {
            if !valid_repo(r) {
                return Err((
                    "repo",
                    format!("`{r}` is not `owner/name`; write it as the forge's URL shows it"),
                ));
            }
        }
        if let Some(a) = &self.api {
            if !(a.starts_with("https://") || a.starts_with("http://")) {
                return Err(("api", format!("`{a}` is not an http(s) URL")));
            }
        }
        if self.username.is_some() && self.forge == Forge::Github {
            return Err((
                "username",
                "is for Bitbucket app passwords; GitHub takes the token alone".into(),
            ));
        }
        Ok(())
    }

    pub fn context(&self) -> &str {
        self.context.as_deref().unwrap_or("ams-build")
    }
}

fn valid_repo(r: &str) -> bool {
    let mut parts = r.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// `owner/name` from a remote URL on github.com or bitbucket.org (https, ssh or scp-like).
pub fn repo_from_remote(url: &str, forge: Forge) -> Option<String> {
    let host = match forge {
        Forge::Github => "github.com",
        Forge::Bitbucket => "bitbucket.org",
    };
    let rest = url
        .split_once(&format!("{host}/"))
        .or_else(|| url.split_once(&format!("{host}:")))?
        .1;
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix(".git").unwrap_or(rest);
    valid_repo(rest).then(|| rest.to_string())
}

/// What the forge is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Success,
    Failure,
    Error,
    Stopped,
}

impl State {
    /// The state of a build that started (`None`) or ended with `status`.
    pub fn of(status: Option<BuildStatus>) -> State {
        match status {
            None | Some(BuildStatus::Pending | BuildStatus::Running) => State::Pending,
            Some(BuildStatus::Pass | BuildStatus::Dummy) => State::Success,
            Some(BuildStatus::Fail | BuildStatus::Warn) => State::Failure,
            Some(BuildStatus::Error) => State::Error,
            Some(BuildStatus::Cancel | BuildStatus::Skip) => State::Stopped,
        }
    }
}

/// A forge's description field is short (GitHub: 140 characters).
fn short(s: &str) -> String {
    if s.chars().count() <= 140 {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(139).collect();
        t.push('…');
        t
    }
}

/// The request for one status: its URL and JSON body.
pub fn request(
    cfg: &CommitStatusConfig,
    repo: &str,
    sha: &str,
    state: State,
    target_url: &str,
    description: &str,
) -> (String, Value) {
    match cfg.forge {
        Forge::Github => {
            let base = cfg.api.as_deref().unwrap_or("https://api.github.com");
            let state = match state {
                State::Pending => "pending",
                State::Success => "success",
                State::Failure => "failure",
                // GitHub has no state for a stopped build.
                State::Error | State::Stopped => "error",
            };
            (
                format!("{}/repos/{repo}/statuses/{sha}", base.trim_end_matches('/')),
                json!({"state": state, "target_url": target_url,
                       "description": short(description), "context": cfg.context()}),
            )
        }
        Forge::Bitbucket => {
            let base = cfg.api.as_deref().unwrap_or("https://api.bitbucket.org");
            let state = match state {
                State::Pending => "INPROGRESS",
                State::Success => "SUCCESSFUL",
                State::Failure | State::Error => "FAILED",
                State::Stopped => "STOPPED",
            };
            (
                format!(
                    "{}/2.0/repositories/{repo}/commit/{sha}/statuses/build",
                    base.trim_end_matches('/')
                ),
                json!({"key": cfg.context(), "state": state, "url": target_url,
                       "name": cfg.context(), "description": short(description)}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(forge: Forge) -> CommitStatusConfig {
        CommitStatusConfig {
            forge,
            token: "t".into(),
            repo: None,
            api: None,
            username: None,
            context: None,
        }
    }

    #[test]
    fn repos_come_from_remotes() {
        for (url, want) in [
            ("https://github.com/o/r.git", Some("o/r")),
            ("git@github.com:o/r.git", Some("o/r")),
            ("ssh://git@github.com/o/r", Some("o/r")),
            ("https://gitlab.com/o/r.git", None),
            ("https://github.com/o/r/x", None),
            ("https://github.com/../r", None),
        ] {
            assert_eq!(
                repo_from_remote(url, Forge::Github).as_deref(),
                want,
                "{url}"
            );
        }
        assert_eq!(
            repo_from_remote("git@bitbucket.org:ws/slug.git", Forge::Bitbucket).as_deref(),
            Some("ws/slug")
        );
    }

    #[test]
    fn requests_have_the_shapes_the_forges_document() {
        let (url, body) = request(
            &cfg(Forge::Github),
            "o/r",
            "abc",
            State::of(Some(BuildStatus::Warn)),
            "https://ci/x",
            "WARN",
        );
        assert_eq!(url, "https://api.github.com/repos/o/r/statuses/abc");
        assert_eq!(body["state"], "failure");
        assert_eq!(body["context"], "ams-build");
        assert_eq!(body["target_url"], "https://ci/x");
        let (url, body) = request(
            &cfg(Forge::Bitbucket),
            "w/s",
            "abc",
            State::of(None),
            "https://ci/x",
            &"d".repeat(500),
        );
        assert_eq!(
            url,
            "https://api.bitbucket.org/2.0/repositories/w/s/commit/abc/statuses/build"
        );
        assert_eq!(body["state"], "INPROGRESS");
        assert_eq!(body["key"], "ams-build");
        assert_eq!(body["description"].as_str().unwrap().chars().count(), 140);
        assert_eq!(State::of(Some(BuildStatus::Error)), State::Error);
        assert_eq!(State::of(Some(BuildStatus::Cancel)), State::Stopped);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = cfg(Forge::Github);
        c.repo = Some("o/r/x".into());
        assert_eq!(c.check().unwrap_err().0, "repo");
        c.repo = None;
        c.username = Some("u".into());
        assert_eq!(c.check().unwrap_err().0, "username");
        let mut c = cfg(Forge::Bitbucket);
        c.api = Some("ftp://x".into());
        assert_eq!(c.check().unwrap_err().0, "api");
    }
}
