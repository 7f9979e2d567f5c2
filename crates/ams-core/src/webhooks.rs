//! Inbound webhooks: webhooks.json's in-webhooks, webhook_fields.json, and reading pushes out
//! of GitHub, Bitbucket Cloud, Bitbucket Data Center and custom payloads. No IO: the web crate
//! hands in headers and bodies, this module says what they mean.

use crate::error::ConfigError;
use serde::Deserialize;
use serde_json::Value;

/// One in-webhook of webhooks.json.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InWebhook {
    pub name: String,
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    pub authorized_actors: Vec<String>,
    /// The HMAC-SHA256 key the sender signs with.
    #[serde(default)]
    pub secret: Option<String>,
    /// Accept deliveries without a signature (needs saying, and is warned about).
    #[serde(default)]
    pub allow_unsigned: bool,
}

impl InWebhook {
    pub fn actor_allowed(&self, candidates: &[String]) -> bool {
        candidates.iter().any(|c| {
            self.authorized_actors
                .iter()
                .any(|a| a.trim().eq_ignore_ascii_case(c.trim()))
        })
    }
}

/// webhooks.json. Out-webhooks are kept as written for the notifier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebhooksConfig {
    pub in_webhooks: Vec<InWebhook>,
    pub out_webhooks: Vec<Value>,
}

impl WebhooksConfig {
    pub const FILE: &'static str = "webhooks.json";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::json(Self::FILE, &e))?;
        let Value::Object(map) = root else {
            return Err(ConfigError::field(
                Self::FILE,
                "(top level)",
                "expected an object",
            ));
        };
        let mut cfg = WebhooksConfig::default();
        for (k, v) in &map {
            match k.as_str() {
                // The described system's single-object form, accepted as written.
                "in-webhooks" | "in-webhook" => {
                    let items = match v {
                        Value::Array(a) => a.clone(),
                        Value::Null => Vec::new(),
                        other => vec![other.clone()],
                    };
                    for (i, item) in items.into_iter().enumerate() {
                        let path = format!("{k}[{i}]");
                        let w: InWebhook = serde_json::from_value(item)
                            .map_err(|e| ConfigError::field(Self::FILE, &path, e.to_string()))?;
                        if w.name.trim().is_empty() {
                            return Err(ConfigError::field(
                                Self::FILE,
                                format!("{path}.name"),
                                "is empty",
                            ));
                        }
                        let has_secret = w.secret.as_deref().is_some_and(|s| !s.is_empty());
                        if !has_secret && !w.allow_unsigned {
                            return Err(ConfigError::field(
                                Self::FILE,
                                format!("{path}.secret"),
                                "is missing: set the secret the sender signs with, or say \
                                 \"allow-unsigned\": true to accept unsigned deliveries",
                            ));
                        }
                        if cfg.in_webhooks.iter().any(|o| o.name == w.name) {
                            return Err(ConfigError::field(
                                Self::FILE,
                                format!("{path}.name"),
                                format!("`{}` is used twice", w.name),
                            ));
                        }
                        cfg.in_webhooks.push(w);
                    }
                }
                "out-webhooks" | "out-webhook" => match v {
                    Value::Array(a) => cfg.out_webhooks.extend(a.iter().cloned()),
                    Value::Null => {}
                    other => cfg.out_webhooks.push(other.clone()),
                },
                other => {
                    return Err(ConfigError::field(
                        Self::FILE,
                        other,
                        "is not a known key (in-webhooks, out-webhooks)",
                    ))
                }
            }
        }
        Ok(cfg)
    }

    pub fn in_webhook(&self, name: &str) -> Option<&InWebhook> {
        self.in_webhooks.iter().find(|w| w.name == name)
    }
}

/// One step of a path into a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// webhook_fields.json: where a custom sender keeps the four values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookFields {
    pub actor: Vec<Step>,
    pub repository: Vec<Step>,
    pub branch: Vec<Step>,
    pub hash: Vec<Step>,
}

impl WebhookFields {
    pub const FILE: &'static str = "webhook_fields.json";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::json(Self::FILE, &e))?;
        let path = |k: &str| -> Result<Vec<Step>, ConfigError> {
            let Some(Value::Array(items)) = root.get(k) else {
                return Err(ConfigError::field(
                    Self::FILE,
                    k,
                    "is missing; give a list of keys and indexes, e.g. [\"push\", \"changes\", 0]",
                ));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Value::String(s) => Ok(Step::Key(s.clone())),
                    Value::Number(n) if n.as_u64().is_some() => {
                        Ok(Step::Index(n.as_u64().unwrap_or(0) as usize))
                    }
                    _ => Err(ConfigError::field(
                        Self::FILE,
                        format!("{k}[{i}]"),
                        "expected a key (string) or an index (whole number)",
                    )),
                })
                .collect()
        };
        Ok(WebhookFields {
            actor: path("actor")?,
            repository: path("repository")?,
            branch: path("branch")?,
            hash: path("hash")?,
        })
    }
}

/// Follows a path into a JSON value and returns the string (or number) found there.
pub fn extract(v: &Value, path: &[Step]) -> Option<String> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Step::Key(k) => cur.get(k)?,
            Step::Index(i) => cur.get(*i)?,
        };
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Who sent a delivery, told apart by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    GitHub,
    BitbucketCloud,
    BitbucketServer,
    Custom,
}

impl Sender {
    pub fn name(self) -> &'static str {
        match self {
            Sender::GitHub => "github",
            Sender::BitbucketCloud => "bitbucket-cloud",
            Sender::BitbucketServer => "bitbucket-server",
            Sender::Custom => "custom",
        }
    }

    /// From the event headers: `X-GitHub-Event`, then `X-Event-Key`.
    pub fn detect(github_event: Option<&str>, event_key: Option<&str>) -> Sender {
        if github_event.is_some() {
            Sender::GitHub
        } else {
            match event_key {
                Some("repo:refs_changed") | Some("diagnostics:ping") => Sender::BitbucketServer,
                Some(k) if k.starts_with("pr:") || k.starts_with("mirror:") => {
                    Sender::BitbucketServer
                }
                Some(_) => Sender::BitbucketCloud,
                None => Sender::Custom,
            }
        }
    }
}

/// One branch head to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The names the actor goes by (login, display name, …), first one preferred.
    pub actors: Vec<String>,
    /// Repository names (short and full), first one preferred.
    pub repositories: Vec<String>,
    pub branch: String,
    pub commit: String,
}

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    Ping,
    /// Acknowledged, nothing to do, with the reason.
    Ignore(String),
    Pushes(Vec<Push>),
}

fn s(v: &Value, ptr: &str) -> Option<String> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
}

fn names(v: &Value, ptrs: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in ptrs {
        if let Some(x) = s(v, p) {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    out
}

fn is_zero_hash(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b == b'0')
}

/// Reads what a delivery asks for. `event` is the event header's value.
pub fn intent(
    sender: Sender,
    event: &str,
    body: &Value,
    fields: Option<&WebhookFields>,
) -> Result<Intent, String> {
    match sender {
        Sender::GitHub => match event {
            "ping" => Ok(Intent::Ping),
            "push" => {
                let r = s(body, "/ref").ok_or("push without `ref`")?;
                let after = s(body, "/after").unwrap_or_default();
                if body.get("deleted").and_then(Value::as_bool) == Some(true)
                    || is_zero_hash(&after)
                {
                    return Ok(Intent::Ignore(format!("{r} was deleted")));
                }
                let Some(branch) = r.strip_prefix("refs/heads/") else {
                    return Ok(Intent::Ignore(format!("{r} is not a branch")));
                };
                if after.is_empty() {
                    return Err("push without `after`".into());
                }
                Ok(Intent::Pushes(vec![Push {
                    actors: names(body, &["/pusher/name", "/sender/login"]),
                    repositories: names(body, &["/repository/name", "/repository/full_name"]),
                    branch: branch.to_string(),
                    commit: after,
                }]))
            }
            other => Ok(Intent::Ignore(format!(
                "GitHub event `{other}` does not build"
            ))),
        },
        Sender::BitbucketCloud => {
            if event != "repo:push" {
                return Ok(Intent::Ignore(format!(
                    "Bitbucket event `{event}` does not build"
                )));
            }
            let actors = names(
                body,
                &["/actor/display_name", "/actor/nickname", "/actor/username"],
            );
            let repositories = names(body, &["/repository/name", "/repository/full_name"]);
            let changes = body
                .pointer("/push/changes")
                .and_then(Value::as_array)
                .ok_or("repo:push without push.changes")?;
            let mut pushes = Vec::new();
            for c in changes {
                let new = match c.get("new") {
                    Some(n) if !n.is_null() => n,
                    _ => continue, // a deletion
                };
                if new.get("type").and_then(Value::as_str) != Some("branch") {
                    continue; // a tag
                }
                let (Some(branch), Some(commit)) = (s(new, "/name"), s(new, "/target/hash")) else {
                    continue;
                };
                pushes.push(Push {
                    actors: actors.clone(),
                    repositories: repositories.clone(),
                    branch,
                    commit,
                });
            }
            if pushes.is_empty() {
                Ok(Intent::Ignore(
                    "no branch head in this push (tags or deletions only)".into(),
                ))
            } else {
                Ok(Intent::Pushes(pushes))
            }
        }
        Sender::BitbucketServer => match event {
            "diagnostics:ping" => Ok(Intent::Ping),
            "repo:refs_changed" => {
                let actors = names(body, &["/actor/name", "/actor/slug", "/actor/displayName"]);
                let repositories = names(body, &["/repository/slug", "/repository/name"]);
                let changes = body
                    .get("changes")
                    .and_then(Value::as_array)
                    .ok_or("repo:refs_changed without changes")?;
                let mut pushes = Vec::new();
                for c in changes {
                    if c.get("type").and_then(Value::as_str) == Some("DELETE") {
                        continue;
                    }
                    let id = s(c, "/ref/id")
                        .or_else(|| s(c, "/refId"))
                        .unwrap_or_default();
                    let Some(branch) = id.strip_prefix("refs/heads/") else {
                        continue;
                    };
                    let Some(commit) = s(c, "/toHash").filter(|h| !is_zero_hash(h)) else {
                        continue;
                    };
                    pushes.push(Push {
                        actors: actors.clone(),
                        repositories: repositories.clone(),
                        branch: branch.to_string(),
                        commit,
                    });
                }
                if pushes.is_empty() {
                    Ok(Intent::Ignore(
                        "no branch head in this push (tags or deletions only)".into(),
                    ))
                } else {
                    Ok(Intent::Pushes(pushes))
                }
            }
            other => Ok(Intent::Ignore(format!(
                "Bitbucket event `{other}` does not build"
            ))),
        },
        Sender::Custom => {
            let f = fields.ok_or(
                "unknown sender: no X-GitHub-Event or X-Event-Key header, and the project has no \
                 webhook_fields.json",
            )?;
            let get = |p: &[Step], what: &str| {
                extract(body, p).ok_or_else(|| format!("no {what} where webhook_fields.json says"))
            };
            Ok(Intent::Pushes(vec![Push {
                actors: vec![get(&f.actor, "actor")?],
                repositories: vec![get(&f.repository, "repository")?],
                branch: get(&f.branch, "branch")?
                    .trim_start_matches("refs/heads/")
                    .to_string(),
                commit: get(&f.hash, "hash")?,
            }]))
        }
    }
}

/// What to do with an authentic delivery, after the webhook's filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ping,
    /// Acknowledge, build nothing.
    Ignore(String),
    /// Refuse: the HTTP status and the reason.
    Refuse(u16, String),
    /// Build these branch heads.
    Build(Vec<Push>),
}

/// Applies a webhook's filters to what a delivery asks for: the repository (when given) must
/// match, the actor must be authorized (case-insensitive), and pushes to other branches (when
/// a branch is given) are acknowledged and ignored.
pub fn decide(
    hook: &InWebhook,
    sender: Sender,
    event: &str,
    body: &Value,
    fields: Option<&WebhookFields>,
) -> Decision {
    let pushes = match intent(sender, event, body, fields) {
        Ok(Intent::Ping) => return Decision::Ping,
        Ok(Intent::Ignore(r)) => return Decision::Ignore(r),
        Ok(Intent::Pushes(p)) => p,
        Err(r) => return Decision::Refuse(400, r),
    };
    let mut build = Vec::new();
    let mut other_branches = Vec::new();
    for p in pushes {
        if let Some(repo) = &hook.repository {
            if !p.repositories.iter().any(|r| r.eq_ignore_ascii_case(repo)) {
                return Decision::Refuse(
                    403,
                    format!(
                        "repository `{}` is not the webhook's repository",
                        p.repositories.first().map(String::as_str).unwrap_or("?")
                    ),
                );
            }
        }
        if !hook.actor_allowed(&p.actors) {
            return Decision::Refuse(
                403,
                format!(
                    "actor `{}` is not among the webhook's authorized-actors",
                    p.actors.first().map(String::as_str).unwrap_or("?")
                ),
            );
        }
        match &hook.branch {
            Some(b) if *b != p.branch => other_branches.push(p.branch.clone()),
            _ => build.push(p),
        }
    }
    if build.is_empty() {
        Decision::Ignore(format!(
            "branch {} does not match the webhook's branch",
            other_branches.join(", ")
        ))
    } else {
        Decision::Build(build)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_webhooks_json_with_both_forms() {
        let c = WebhooksConfig::parse(
            r#"{"in-webhooks": [{"name": "main", "repository": "r", "branch": "main",
                 "authorized-actors": ["Alice Example"], "secret": "s"}],
                "out-webhooks": [{"hook-name": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(c.in_webhooks[0].branch.as_deref(), Some("main"));
        assert!(c.in_webhooks[0].actor_allowed(&["alice example".into()]));
        assert!(!c.in_webhooks[0].actor_allowed(&["mallory".into()]));
        assert_eq!(c.out_webhooks.len(), 1);
        let legacy = WebhooksConfig::parse(
            r#"{"in-webhook": {"name": "old", "authorized-actors": ["a"], "allow-unsigned": true}}"#,
        )
        .unwrap();
        assert_eq!(legacy.in_webhook("old").unwrap().name, "old");
    }

    #[test]
    fn a_webhook_without_secret_must_say_so() {
        let e =
            WebhooksConfig::parse(r#"{"in-webhooks": [{"name": "w", "authorized-actors": []}]}"#)
                .unwrap_err();
        assert_eq!(e.field, "in-webhooks[0].secret");
        let e = WebhooksConfig::parse(r#"{"in-webhooks": [{"name": "w"}]}"#).unwrap_err();
        assert!(e.message.contains("authorized-actors"), "{e}");
    }

    #[test]
    fn custom_fields_follow_paths() {
        let f = WebhookFields::parse(
            r#"{"actor": ["actor", "display_name"], "repository": ["repository", "name"],
                "branch": ["push", "changes", 0, "new", "name"],
                "hash": ["push", "changes", 0, "new", "target", "hash"]}"#,
        )
        .unwrap();
        let body: Value = serde_json::json!({"actor": {"display_name": "Emma"},
            "repository": {"name": "r"},
            "push": {"changes": [{"new": {"name": "dev", "target": {"hash": "abc123"}}}]}});
        let Intent::Pushes(p) = intent(Sender::Custom, "", &body, Some(&f)).unwrap() else {
            panic!()
        };
        assert_eq!(p[0].branch, "dev");
        assert_eq!(p[0].commit, "abc123");
        assert_eq!(p[0].actors, vec!["Emma".to_string()]);
    }

    #[test]
    fn decisions_apply_the_filters() {
        let hook = |repo: Option<&str>, branch: Option<&str>| InWebhook {
            name: "w".into(),
            repository: repo.map(str::to_string),
            branch: branch.map(str::to_string),
            authorized_actors: vec!["Alice".into()],
            secret: Some("s".into()),
            allow_unsigned: false,
        };
        let body = serde_json::json!({"ref": "refs/heads/main", "after": "abc1",
            "repository": {"name": "r", "full_name": "o/r"}, "pusher": {"name": "alice"}});
        let d = |h: &InWebhook| decide(h, Sender::GitHub, "push", &body, None);
        assert!(matches!(
            d(&hook(Some("o/r"), Some("main"))),
            Decision::Build(_)
        ));
        assert!(matches!(
            d(&hook(Some("x"), None)),
            Decision::Refuse(403, _)
        ));
        assert!(matches!(d(&hook(None, Some("dev"))), Decision::Ignore(_)));
        let mut h = hook(None, None);
        h.authorized_actors = vec!["bob".into()];
        assert!(matches!(d(&h), Decision::Refuse(403, _)));
    }

    #[test]
    fn senders_are_told_apart() {
        assert_eq!(Sender::detect(Some("push"), None), Sender::GitHub);
        assert_eq!(
            Sender::detect(None, Some("repo:push")),
            Sender::BitbucketCloud
        );
        assert_eq!(
            Sender::detect(None, Some("repo:refs_changed")),
            Sender::BitbucketServer
        );
        assert_eq!(
            Sender::detect(None, Some("diagnostics:ping")),
            Sender::BitbucketServer
        );
        assert_eq!(Sender::detect(None, None), Sender::Custom);
    }
}
