//! Inbound webhooks: webhooks.json's in-webhooks, webhook_fields.json, and reading pushes out
//! of GitHub, Bitbucket Cloud, Bitbucket Data Center and custom payloads. No IO: the web crate
//! hands in headers and bodies, this module says what they mean.
//!
//! A delivery's body is whatever its sender wrote (up to the listener's body limit), so reading
//! it is total and bounded: at most [`MAX_PUSHES`] branch heads are taken from one delivery,
//! names longer than [`MAX_NAME`] are not taken for names, and a branch or commit past its
//! limit refuses the delivery with the reason. What comes out is never more than a constant
//! times what came in.

use crate::error::{clip, ConfigError};
use serde::Deserialize;
use serde_json::Value;

/// What became of a webhook delivery, as the delivery log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Verdict {
    /// Verified and decided: its builds were queued.
    #[default]
    Accepted,
    /// Verified but not for building (a tag, a deletion, a filtered branch).
    Ignored,
    /// The sender's test delivery.
    Ping,
    /// Not processable (no matching webhook, unauthorized actor, bad body).
    Refused,
    /// A redelivery of an accepted delivery id: nothing built.
    Duplicate,
}

impl Verdict {
    /// The word stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Ignored => "ignored",
            Verdict::Ping => "ping",
            Verdict::Refused => "refused",
            Verdict::Duplicate => "duplicate",
        }
    }

    /// Whether a delivery with this verdict keeps its body (for replay, until
    /// `delivery_body_max_age_days`): accepted and refused ones, which an admin may want to run
    /// again once the webhook's settings are fixed. A ping, an ignored event and a duplicate
    /// keep none: they are most of a busy sender's deliveries and nothing replays them usefully.
    pub fn keeps_body(self) -> bool {
        matches!(self, Verdict::Accepted | Verdict::Refused)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most branch heads built from one delivery; a delivery naming more is refused.
pub const MAX_PUSHES: usize = 100;
/// Longest actor or repository name taken from a delivery, in bytes; a longer one is ignored
/// (and so matches no authorized actor and no repository).
pub const MAX_NAME: usize = 256;
/// Longest branch name taken from a delivery, in bytes (the host's own limit).
pub const MAX_BRANCH: usize = 255;
/// Longest commit id taken from a delivery: a SHA-256 commit in hex.
pub const MAX_COMMIT: usize = 64;
/// Most steps in a webhook_fields.json path.
pub const MAX_PATH_STEPS: usize = 32;
/// Longest key in a webhook_fields.json path, in bytes.
pub const MAX_KEY: usize = 256;

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
                                format!(
                                    "is missing: set \"secret\" to the key the sender signs \
                                     with, or say \"allow-unsigned\": true to accept unsigned \
                                     deliveries (the described system had no secret; see {})",
                                    crate::compat::COMPAT_DOC
                                ),
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

/// The keys of webhook_fields.json, each with the described system's default path (Bitbucket
/// Cloud's push body), taken when the file leaves the key out.
const FIELD_DEFAULTS: [(&str, &[DefaultStep]); 4] = [
    (
        "actor",
        &[DefaultStep::K("actor"), DefaultStep::K("display_name")],
    ),
    (
        "repository",
        &[DefaultStep::K("repository"), DefaultStep::K("name")],
    ),
    (
        "branch",
        &[
            DefaultStep::K("push"),
            DefaultStep::K("changes"),
            DefaultStep::I(0),
            DefaultStep::K("new"),
            DefaultStep::K("name"),
        ],
    ),
    (
        "hash",
        &[
            DefaultStep::K("push"),
            DefaultStep::K("changes"),
            DefaultStep::I(0),
            DefaultStep::K("new"),
            DefaultStep::K("target"),
            DefaultStep::K("hash"),
        ],
    ),
];

/// A step of a default path, written as a constant.
#[derive(Clone, Copy)]
enum DefaultStep {
    K(&'static str),
    I(usize),
}

impl WebhookFields {
    pub const FILE: &'static str = "webhook_fields.json";

    /// The described system's paths, for Bitbucket Cloud's push body: what it used for every
    /// key a project's file leaves out.
    pub fn described_defaults() -> Self {
        let path = |i: usize| {
            FIELD_DEFAULTS[i]
                .1
                .iter()
                .map(|s| match s {
                    DefaultStep::K(k) => Step::Key((*k).to_string()),
                    DefaultStep::I(n) => Step::Index(*n),
                })
                .collect()
        };
        WebhookFields {
            actor: path(0),
            repository: path(1),
            branch: path(2),
            hash: path(3),
        }
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_notes(text).map(|(f, _)| f)
    }

    /// Parses the file, and says what it accepted that strict JSON would not: the described
    /// system's documented example carries a trailing comma, so a file written from it is read
    /// as JSON with comments and trailing commas (and single-quoted strings), with a note that
    /// names the line and column and the fix. A key left out takes the described system's
    /// default path (Bitbucket Cloud's); `test`, a key of that system's defaults, is accepted
    /// and unused.
    pub fn parse_with_notes(text: &str) -> Result<(Self, Vec<String>), ConfigError> {
        let mut notes = Vec::new();
        let root: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(strict) => match lenient_json(text) {
                Some(v) => {
                    notes.push(format!(
                        "{}: line {} column {}: {}; read it as JSON with comments and trailing \
                         commas, as the described system's example is written; fix: remove the \
                         comments and the comma before a closing `}}` or `]` (see \
                         docs/coming-from-python.md)",
                        Self::FILE,
                        strict.line(),
                        strict.column(),
                        ConfigError::json(Self::FILE, &strict).message
                    ));
                    v
                }
                None => {
                    let mut e = ConfigError::json(Self::FILE, &strict);
                    e.message.push_str(
                        "; fix the file so it is one JSON object such as {\"actor\": [\"actor\", \
                         \"display_name\"]} (see docs/webhooks.md#webhook_fieldsjson)",
                    );
                    return Err(e);
                }
            },
        };
        let Value::Object(map) = &root else {
            return Err(ConfigError::field(
                Self::FILE,
                "(top level)",
                "expected an object of paths, e.g. {\"actor\": [\"actor\", \"display_name\"]}",
            ));
        };
        for k in map.keys() {
            if k != "test" && !FIELD_DEFAULTS.iter().any(|(d, _)| d == k) {
                return Err(ConfigError::field(
                    Self::FILE,
                    k.as_str(),
                    "is not a known key: give actor, repository, branch and hash (a key left \
                     out takes the Bitbucket Cloud path)",
                ));
            }
        }
        let defaults = Self::described_defaults();
        let path = |k: &str, default: &[Step]| -> Result<Vec<Step>, ConfigError> {
            let items = match root.get(k) {
                None => return Ok(default.to_vec()),
                Some(Value::Array(items)) => items,
                Some(_) => {
                    return Err(ConfigError::field(
                        Self::FILE,
                        k,
                        "is not a list; give a list of keys and indexes, e.g. \
                         [\"push\", \"changes\", 0]",
                    ))
                }
            };
            if items.len() > MAX_PATH_STEPS {
                return Err(ConfigError::field(
                    Self::FILE,
                    k,
                    format!(
                        "has {} steps, over the limit of {MAX_PATH_STEPS}; give the path to the \
                         value in the sender's body",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Value::String(s) if s.len() > MAX_KEY => Err(ConfigError::field(
                        Self::FILE,
                        format!("{k}[{i}]"),
                        format!(
                            "is {} bytes long, over the limit of {MAX_KEY}; give the key as \
                             the sender's body spells it",
                            s.len()
                        ),
                    )),
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
        let fields = WebhookFields {
            actor: path("actor", &defaults.actor)?,
            repository: path("repository", &defaults.repository)?,
            branch: path("branch", &defaults.branch)?,
            hash: path("hash", &defaults.hash)?,
        };
        Ok((fields, notes))
    }
}

/// JSON as people write it by hand: comments (`//`, `/* */`), trailing commas and single-quoted
/// strings; nothing looser (no missing commas, bare words or special numbers).
fn lenient_json(text: &str) -> Option<Value> {
    let opts = jsonc_parser::ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_single_quoted_strings: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    jsonc_parser::parse_to_serde_value::<Value>(text, &opts).ok()
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

/// The names found at these places, each at most [`MAX_NAME`] bytes, without repeats.
fn names(v: &Value, ptrs: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in ptrs {
        let found = v.pointer(p).and_then(Value::as_str);
        if let Some(x) = found.filter(|x| !x.is_empty() && x.len() <= MAX_NAME) {
            if !out.iter().any(|o| o == x) {
                out.push(x.to_string());
            }
        }
    }
    out
}

/// Adds a branch head to `pushes`, refusing a branch or commit past its limit, and a delivery
/// that names more than [`MAX_PUSHES`] heads.
fn take(
    pushes: &mut Vec<Push>,
    actors: &[String],
    repositories: &[String],
    branch: &str,
    commit: String,
) -> Result<(), String> {
    if branch.len() > MAX_BRANCH {
        return Err(format!(
            "branch `{}` is {} bytes long, over the limit of {MAX_BRANCH}",
            clip(branch, 64),
            branch.len()
        ));
    }
    if commit.len() > MAX_COMMIT {
        return Err(format!(
            "commit `{}` is {} bytes long; a commit id is at most {MAX_COMMIT} hex digits",
            clip(&commit, 64),
            commit.len()
        ));
    }
    if pushes.len() == MAX_PUSHES {
        return Err(format!(
            "the delivery names more than {MAX_PUSHES} branch heads; AMS-Build builds at most \
             {MAX_PUSHES} from one delivery: push fewer branches at once"
        ));
    }
    pushes.push(Push {
        actors: actors.to_vec(),
        repositories: repositories.to_vec(),
        branch: branch.to_string(),
        commit,
    });
    Ok(())
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
                    return Ok(Intent::Ignore(format!("{} was deleted", clip(&r, 256))));
                }
                let Some(branch) = r.strip_prefix("refs/heads/") else {
                    return Ok(Intent::Ignore(format!("{} is not a branch", clip(&r, 256))));
                };
                if after.is_empty() {
                    return Err("push without `after`".into());
                }
                let mut pushes = Vec::new();
                take(
                    &mut pushes,
                    &names(body, &["/pusher/name", "/sender/login"]),
                    &names(body, &["/repository/name", "/repository/full_name"]),
                    branch,
                    after,
                )?;
                Ok(Intent::Pushes(pushes))
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
            bitbucket_cloud_push(body)
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
                    crate::work::add(1);
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
                    take(&mut pushes, &actors, &repositories, branch, commit)?;
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
        // Without webhook_fields.json, the described system read every delivery as a
        // Bitbucket Cloud push (its documented payload), with or without the event header.
        Sender::Custom if fields.is_none() => {
            if body.pointer("/push/changes").is_some_and(Value::is_array) {
                return bitbucket_cloud_push(body);
            }
            Err(
                "unknown sender: no X-GitHub-Event or X-Event-Key header, no Bitbucket push \
                 (push.changes) in the body, and the project has no webhook_fields.json saying \
                 where the actor, repository, branch and hash are"
                    .into(),
            )
        }
        Sender::Custom => {
            let f = fields.ok_or("no webhook_fields.json")?;
            let get = |p: &[Step], what: &str| {
                extract(body, p).ok_or_else(|| format!("no {what} where webhook_fields.json says"))
            };
            let name = |p: &[Step], what: &str| {
                let v = get(p, what)?;
                if v.len() > MAX_NAME {
                    return Err(format!(
                        "the {what} where webhook_fields.json says is {} bytes long, over the \
                         limit of {MAX_NAME}",
                        v.len()
                    ));
                }
                Ok(v)
            };
            let actors = [name(&f.actor, "actor")?];
            let repositories = [name(&f.repository, "repository")?];
            let branch = get(&f.branch, "branch")?;
            let mut pushes = Vec::new();
            take(
                &mut pushes,
                &actors,
                &repositories,
                branch.trim_start_matches("refs/heads/"),
                get(&f.hash, "hash")?,
            )?;
            Ok(Intent::Pushes(pushes))
        }
    }
}

/// A Bitbucket Cloud push (`repo:push`): every branch head of `push.changes`. A change whose
/// `new` has a `name` is a branch unless its `type` says otherwise (the described system's
/// documented payload has no `type`); deletions and tags build nothing.
fn bitbucket_cloud_push(body: &Value) -> Result<Intent, String> {
    let actors = names(
        body,
        &["/actor/display_name", "/actor/nickname", "/actor/username"],
    );
    // `repository` as a plain string: the described system's first documented payload.
    let repositories = names(
        body,
        &["/repository/name", "/repository/full_name", "/repository"],
    );
    let changes = body
        .pointer("/push/changes")
        .and_then(Value::as_array)
        .ok_or("repo:push without push.changes")?;
    let mut pushes = Vec::new();
    for c in changes {
        crate::work::add(1);
        let new = match c.get("new") {
            Some(n) if !n.is_null() => n,
            _ => continue, // a deletion
        };
        match new.get("type") {
            None | Some(Value::Null) => {}
            Some(t) if t.as_str() == Some("branch") => {}
            Some(_) => continue, // a tag
        }
        let (Some(branch), Some(commit)) = (s(new, "/name"), s(new, "/target/hash")) else {
            continue;
        };
        take(&mut pushes, &actors, &repositories, &branch, commit)?;
    }
    if pushes.is_empty() {
        Ok(Intent::Ignore(
            "no branch head in this push (tags or deletions only)".into(),
        ))
    } else {
        Ok(Intent::Pushes(pushes))
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

    /// The Bitbucket payload the described system documents: no `type`, maybe no header.
    fn documented_payload() -> Value {
        serde_json::json!({"actor": {"display_name": "Git Actor"},
            "repository": {"name": "MyRepo"},
            "push": {"changes": [{"new": {"name": "main", "target": {"hash": "c9bffcd6"}}}]}})
    }

    #[test]
    fn the_documented_bitbucket_payload_builds_with_or_without_its_header() {
        for (sender, event) in [
            (Sender::Custom, "push"),
            (Sender::BitbucketCloud, "repo:push"),
        ] {
            let Ok(Intent::Pushes(p)) = intent(sender, event, &documented_payload(), None) else {
                panic!("{sender:?}: not a push");
            };
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].branch, "main");
            assert_eq!(p[0].commit, "c9bffcd6");
            assert_eq!(p[0].actors, vec!["Git Actor".to_string()]);
            assert_eq!(p[0].repositories, vec!["MyRepo".to_string()]);
        }
        // A `type` other than branch is still a tag, and a repository given as a plain string
        // (the described system's first documented shape) is a repository name.
        let mut tag = documented_payload();
        tag["push"]["changes"][0]["new"]["type"] = "tag".into();
        assert!(matches!(
            intent(Sender::Custom, "push", &tag, None),
            Ok(Intent::Ignore(_))
        ));
        let mut plain = documented_payload();
        plain["repository"] = "MyRepo".into();
        let Ok(Intent::Pushes(p)) = intent(Sender::Custom, "push", &plain, None) else {
            panic!()
        };
        assert_eq!(p[0].repositories, vec!["MyRepo".to_string()]);
        // A body that is no Bitbucket push, from an unknown sender, still needs the file.
        let e = intent(Sender::Custom, "push", &serde_json::json!({"x": 1}), None).unwrap_err();
        assert!(e.contains("webhook_fields.json"), "{e}");
    }

    #[test]
    fn webhook_fields_as_the_described_docs_write_it_is_read_with_a_note() {
        // The documented example: a trailing comma, which strict JSON refuses.
        let text = "{\n  \"actor\": [\"actor\", \"display_name\"],\n  \"repository\": [\"repository\", \"name\"],\n  \"branch\": [\"push\", \"changes\", 0, \"new\", \"name\"],\n  \"hash\": [\"push\", \"changes\", 0, \"new\", \"target\", \"hash\"],\n}\n";
        assert!(serde_json::from_str::<Value>(text).is_err());
        let (f, notes) = WebhookFields::parse_with_notes(text).unwrap();
        assert_eq!(f, WebhookFields::described_defaults());
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("webhook_fields.json: line 6 column 1"),
            "{}",
            notes[0]
        );
        assert!(notes[0].contains("fix: remove"), "{}", notes[0]);
        // Strict JSON gives no note.
        let (_, notes) =
            WebhookFields::parse_with_notes(r#"{"actor": ["a"], "test": ["test"]}"#).unwrap();
        assert!(notes.is_empty());
        // Anything looser than comments and trailing commas is refused with the position.
        let e = WebhookFields::parse("{\n  \"actor\": [\"a\"] \"hash\": [\"h\"]\n}").unwrap_err();
        assert_eq!(e.position, Some((2, 18)), "{e}");
        assert!(e.message.contains("fix the file"), "{e}");
        assert!(
            e.to_string()
                .starts_with("webhook_fields.json: line 2 column 18"),
            "{e}"
        );
    }

    #[test]
    fn webhook_fields_keys_left_out_take_the_described_defaults() {
        let f = WebhookFields::parse(r#"{"actor": ["sender", "login"]}"#).unwrap();
        let d = WebhookFields::described_defaults();
        assert_eq!(
            f.actor,
            vec![Step::Key("sender".into()), Step::Key("login".into())]
        );
        assert_eq!(
            (f.repository, f.branch, f.hash),
            (d.repository, d.branch, d.hash)
        );
        let e = WebhookFields::parse(r#"{"acter": ["sender", "login"]}"#).unwrap_err();
        assert_eq!(e.field, "acter");
        let e = WebhookFields::parse(r#"{"actor": "sender.login"}"#).unwrap_err();
        assert_eq!(e.field, "actor");
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

    fn hook() -> InWebhook {
        InWebhook {
            name: "w".into(),
            repository: None,
            branch: None,
            authorized_actors: vec!["alice".into()],
            secret: Some("s".into()),
            allow_unsigned: false,
        }
    }

    /// A Bitbucket Cloud push of `n` branch heads by an actor whose display name is
    /// `name_len` bytes long.
    fn cloud_push(n: usize, name_len: usize) -> Value {
        let changes: Vec<Value> = (0..n)
            .map(|i| {
                serde_json::json!({"new": {"type": "branch", "name": format!("b{i}"),
                                                "target": {"hash": "abc1"}}})
            })
            .collect();
        serde_json::json!({"actor": {"display_name": "x".repeat(name_len), "nickname": "alice"},
            "repository": {"name": "r"}, "push": {"changes": changes}})
    }

    #[test]
    fn a_long_name_is_not_copied_into_every_push() {
        // Found by `output_is_linear_in_the_body` (47 heads, a display name of 6559 bytes:
        // 308 874 bytes out of a 9652-byte body): each branch head got its own copy of the
        // actor's names, so one long name and many small changes (a 25 MiB delivery: 12 MiB of
        // name, 200 000 changes) asked for terabytes.
        let body = cloud_push(MAX_PUSHES, 100_000);
        let Ok(Intent::Pushes(p)) = intent(Sender::BitbucketCloud, "repo:push", &body, None) else {
            panic!()
        };
        assert_eq!(p.len(), MAX_PUSHES);
        assert!(p.iter().all(|p| p.actors == ["alice"]));
        let e = intent(
            Sender::BitbucketCloud,
            "repo:push",
            &cloud_push(MAX_PUSHES + 1, 1),
            None,
        )
        .unwrap_err();
        assert!(e.contains("more than 100 branch heads"), "{e}");
        // Refused, not cut short: nothing of it is built.
        assert!(matches!(
            decide(
                &hook(),
                Sender::BitbucketCloud,
                "repo:push",
                &cloud_push(1000, 1),
                None
            ),
            Decision::Refuse(400, _)
        ));
    }

    #[test]
    fn long_branches_and_commits_are_refused_with_the_reason() {
        let push = |r: &str, after: &str| serde_json::json!({"ref": r, "after": after, "pusher": {"name": "alice"}});
        let e = intent(
            Sender::GitHub,
            "push",
            &push(&format!("refs/heads/{}", "b".repeat(256)), "abc1"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("over the limit of 255"), "{e}");
        let e = intent(
            Sender::GitHub,
            "push",
            &push("refs/heads/main", &"a".repeat(65)),
            None,
        )
        .unwrap_err();
        assert!(e.contains("at most 64 hex digits"), "{e}");
        assert!(intent(
            Sender::GitHub,
            "push",
            &push(&format!("refs/heads/{}", "b".repeat(255)), &"a".repeat(64)),
            None
        )
        .is_ok());
        let Ok(Intent::Ignore(why)) = intent(
            Sender::GitHub,
            "push",
            &push(&format!("refs/tags/{}", "t".repeat(100_000)), "abc1"),
            None,
        ) else {
            panic!()
        };
        assert!(why.len() < 300, "{}", why.len());
    }

    #[test]
    fn webhook_fields_paths_are_capped() {
        let fields = |actor: &str| {
            format!(r#"{{"actor": {actor}, "repository": ["r"], "branch": ["b"], "hash": ["h"]}}"#)
        };
        let long: Vec<Value> = (0..=MAX_PATH_STEPS)
            .map(|i| Value::from(i as u64))
            .collect();
        let e = WebhookFields::parse(&fields(&Value::from(long).to_string())).unwrap_err();
        assert_eq!(e.field, "actor");
        assert!(e.message.contains("33 steps, over the limit of 32"), "{e}");
        let e = WebhookFields::parse(&fields(&format!("[\"{}\"]", "k".repeat(MAX_KEY + 1))))
            .unwrap_err();
        assert_eq!(e.field, "actor[0]");
        let ok: Vec<Value> = (0..MAX_PATH_STEPS)
            .map(|_| Value::from("k".repeat(MAX_KEY)))
            .collect();
        assert!(WebhookFields::parse(&fields(&Value::from(ok).to_string())).is_ok());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::json;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                prop_oneof![
                    "[a-z/0]{0,12}",
                    Just("refs/heads/main".to_string()),
                    Just("branch".to_string()),
                    Just("DELETE".to_string()),
                    any::<String>()
                ]
                .prop_map(Value::String),
            ];
            let key = prop::sample::select(vec![
                "ref",
                "after",
                "deleted",
                "pusher",
                "name",
                "sender",
                "login",
                "repository",
                "full_name",
                "actor",
                "display_name",
                "push",
                "changes",
                "new",
                "type",
                "target",
                "hash",
                "refId",
                "toHash",
                "slug",
                "x",
            ]);
            leaf.prop_recursive(5, 48, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(key.clone().prop_map(str::to_string), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn sender() -> impl Strategy<Value = (Sender, &'static str)> {
            prop::sample::select(vec![
                (Sender::GitHub, "push"),
                (Sender::GitHub, "ping"),
                (Sender::GitHub, "issues"),
                (Sender::BitbucketCloud, "repo:push"),
                (Sender::BitbucketCloud, "pullrequest:created"),
                (Sender::BitbucketServer, "repo:refs_changed"),
                (Sender::BitbucketServer, "diagnostics:ping"),
                (Sender::Custom, "push"),
            ])
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                prop::sample::select(vec![
                    "push", "changes", "new", "name", "target", "hash", "x"
                ])
                .prop_map(|k| Step::Key(k.to_string())),
                (0usize..3).prop_map(Step::Index),
                Just(Step::Index(usize::MAX)),
            ]
        }

        fn fields() -> impl Strategy<Value = WebhookFields> {
            let path = || prop::collection::vec(step(), 0..5);
            (path(), path(), path(), path()).prop_map(|(actor, repository, branch, hash)| {
                WebhookFields {
                    actor,
                    repository,
                    branch,
                    hash,
                }
            })
        }

        /// One entry of a push's list of changes, and the branch head it names, if any.
        #[derive(Debug, Clone)]
        enum Change {
            Head(String, String),
            Tag(String),
            Deleted(String),
            ZeroHash(String),
        }

        fn change() -> impl Strategy<Value = Change> {
            let name = "[a-z][a-z0-9/_-]{0,10}";
            let hash = "[0-9a-f]{4,64}".prop_filter("not all zeros", |h| !is_zero_hash(h));
            prop_oneof![
                4 => (name, hash).prop_map(|(n, h)| Change::Head(n, h)),
                1 => name.prop_map(Change::Tag),
                1 => name.prop_map(Change::Deleted),
                1 => name.prop_map(Change::ZeroHash),
            ]
        }

        fn cloud(changes: &[Change]) -> Value {
            let items: Vec<Value> = changes
                .iter()
                .map(|c| match c {
                    Change::Head(n, h) => {
                        json!({"new": {"type": "branch", "name": n, "target": {"hash": h}}})
                    }
                    Change::Tag(n) => {
                        json!({"new": {"type": "tag", "name": n, "target": {"hash": "abc1"}}})
                    }
                    Change::Deleted(n) => {
                        json!({"old": {"type": "branch", "name": n}, "new": null})
                    }
                    Change::ZeroHash(n) => json!({"new": {"type": "branch", "name": n}}),
                })
                .collect();
            json!({"actor": {"display_name": "Alice", "nickname": "alice"},
                   "repository": {"name": "r", "full_name": "o/r"}, "push": {"changes": items}})
        }

        fn server(changes: &[Change]) -> Value {
            let zero = "0".repeat(40);
            let items: Vec<Value> = changes.iter().map(|c| match c {
                Change::Head(n, h) => json!({"ref": {"id": format!("refs/heads/{n}")}, "toHash": h, "type": "UPDATE"}),
                Change::Tag(n) => json!({"refId": format!("refs/tags/{n}"), "toHash": "abc1", "type": "ADD"}),
                Change::Deleted(n) => json!({"ref": {"id": format!("refs/heads/{n}")}, "toHash": "abc1", "type": "DELETE"}),
                Change::ZeroHash(n) => json!({"refId": format!("refs/heads/{n}"), "toHash": zero, "type": "UPDATE"}),
            }).collect();
            json!({"actor": {"name": "alice", "displayName": "Alice"},
                   "repository": {"slug": "r", "name": "R"}, "changes": items})
        }

        /// Every byte of what came out: a measure of the memory a delivery costs.
        fn out_bytes(i: &Intent) -> usize {
            match i {
                Intent::Pushes(p) => p
                    .iter()
                    .map(|p| {
                        p.actors
                            .iter()
                            .chain(&p.repositories)
                            .map(String::len)
                            .sum::<usize>()
                            + p.branch.len()
                            + p.commit.len()
                    })
                    .sum(),
                Intent::Ignore(r) => r.len(),
                Intent::Ping => 0,
            }
        }

        proptest! {
            #![proptest_config(crate::work::cases(256))]

            /// Any body from any sender: no panic, and a decision whatever the webhook.
            #[test]
            fn any_body_is_total(body in json(), (sender, event) in sender(), f in prop::option::of(fields()), branch in prop::option::of("[a-z]{1,3}")) {
                let _ = intent(sender, event, &body, f.as_ref());
                let mut h = hook();
                h.branch = branch;
                let _ = decide(&h, sender, event, &body, f.as_ref());
            }

            /// Bitbucket pushes give exactly their branch heads, in order (tags, deletions and
            /// zero hashes left out), up to the cap and refused past it; with work in
            /// proportion to the changes.
            #[test]
            fn bitbucket_heads_follow_a_model(changes in prop::collection::vec(change(), 0..12), copies in prop_oneof![3 => Just(1usize), 1 => 1usize..20]) {
                let changes: Vec<Change> = changes.iter().cycle().take(changes.len() * copies).cloned().collect();
                let heads: Vec<(String, String)> = changes.iter().filter_map(|c| match c {
                    Change::Head(n, h) => Some((n.clone(), h.clone())),
                    _ => None,
                }).collect();
                for (sender, event, body) in [
                    (Sender::BitbucketCloud, "repo:push", cloud(&changes)),
                    (Sender::BitbucketServer, "repo:refs_changed", server(&changes)),
                ] {
                    let (got, work) = crate::work::count(|| intent(sender, event, &body, None));
                    prop_assert!(work <= changes.len() as u64);
                    match got {
                        Ok(Intent::Pushes(p)) => {
                            let got: Vec<(String, String)> = p.iter().map(|p| (p.branch.clone(), p.commit.clone())).collect();
                            prop_assert_eq!(&got, &heads);
                            prop_assert!(p.iter().all(|p| p.actors.contains(&"alice".to_string())));
                        }
                        Ok(Intent::Ignore(_)) => prop_assert!(heads.is_empty()),
                        Ok(Intent::Ping) => prop_assert!(false, "a push is no ping"),
                        Err(e) => {
                            prop_assert!(heads.len() > MAX_PUSHES, "{}", e);
                            prop_assert!(e.contains("more than 100 branch heads"), "{}", e);
                        }
                    }
                }
            }

            /// A custom sender's values are found where webhook_fields.json's paths lead.
            #[test]
            fn custom_paths_lead_to_their_values(f in fields(), branch in "[a-z]{1,8}", hash in "[0-9a-f]{4,40}") {
                // Build a body with each value at the end of its path (a later path may
                // overwrite an earlier one's place; then the later value is expected there).
                let mut body = Value::Null;
                let paths = [(&f.actor, "alice".to_string()), (&f.repository, "r".to_string()),
                             (&f.branch, format!("refs/heads/{branch}")), (&f.hash, hash.clone())];
                for (path, v) in &paths {
                    place(&mut body, path, Value::String(v.clone()));
                }
                let found: Vec<Option<String>> = paths.iter().map(|(p, _)| extract(&body, p)).collect();
                match intent(Sender::Custom, "push", &body, Some(&f)) {
                    Ok(Intent::Pushes(p)) => {
                        prop_assert_eq!(p.len(), 1);
                        prop_assert_eq!(Some(p[0].actors[0].clone()), found[0].clone());
                        prop_assert_eq!(Some(p[0].repositories[0].clone()), found[1].clone());
                        prop_assert_eq!(Some(p[0].commit.clone()), found[3].clone());
                    }
                    other => prop_assert!(found.iter().any(Option::is_none), "{:?} with {:?}", other, found),
                }
            }

            /// Whatever a body holds, what is read out of it is at most a constant times its
            /// size: no string of it is copied once per branch head.
            #[test]
            fn output_is_linear_in_the_body(n in 1usize..150, name_len in prop_oneof![1usize..300, 300usize..20_000], (sender, event) in sender()) {
                let mut body = cloud_push(n, name_len);
                if sender == Sender::BitbucketServer {
                    let changes: Vec<Change> = (0..n).map(|i| Change::Head(format!("b{i}"), "abc1".into())).collect();
                    body = server(&changes);
                    body["actor"]["displayName"] = Value::from("x".repeat(name_len));
                }
                if sender == Sender::GitHub {
                    body = json!({"ref": "refs/heads/main", "after": "abc1",
                                  "pusher": {"name": "x".repeat(name_len)}, "sender": {"login": "alice"}});
                }
                let f = WebhookFields::parse(r#"{"actor": ["actor", "display_name"], "repository": ["repository", "name"],
                    "branch": ["push", "changes", 0, "new", "name"], "hash": ["push", "changes", 0, "new", "target", "hash"]}"#).unwrap();
                let size = body.to_string().len();
                if let Ok(i) = intent(sender, event, &body, Some(&f)) {
                    prop_assert!(out_bytes(&i) <= 32 * size, "{} bytes out of {}", out_bytes(&i), size);
                    if let Intent::Pushes(p) = &i {
                        prop_assert!(p.len() <= MAX_PUSHES);
                        for p in p {
                            prop_assert!(p.actors.iter().chain(&p.repositories).all(|n| n.len() <= MAX_NAME));
                            prop_assert!(p.branch.len() <= MAX_BRANCH && p.commit.len() <= MAX_COMMIT);
                        }
                    }
                }
            }

            /// webhook_fields.json: any text is total, and any parsed path stays in its caps.
            #[test]
            fn webhook_fields_parse_is_total(t in prop_oneof![json().prop_map(|v| v.to_string()), any::<String>()], steps in prop::collection::vec(prop_oneof![any::<u64>().prop_map(Value::from), "[a-z]{0,300}".prop_map(Value::from), Just(Value::from(-1)), Just(Value::from(1.5))], 0..40)) {
                let _ = WebhookFields::parse(&t);
                let p = Value::from(steps).to_string();
                let text = format!(r#"{{"actor": {p}, "repository": {p}, "branch": {p}, "hash": {p}}}"#);
                match WebhookFields::parse(&text) {
                    Ok(f) => {
                        prop_assert!(f.actor.len() <= MAX_PATH_STEPS);
                        prop_assert!(f.actor.iter().all(|s| !matches!(s, Step::Key(k) if k.len() > MAX_KEY)));
                    }
                    Err(e) => {
                        prop_assert_eq!(e.file.as_str(), "webhook_fields.json");
                        prop_assert!(e.field.starts_with("actor"), "{}", e);
                    }
                }
            }
        }

        /// Puts `v` at the end of `path` in `body`, making objects and lists on the way.
        fn place(body: &mut Value, path: &[Step], v: Value) {
            let mut cur = body;
            for s in path {
                cur = match s {
                    Step::Key(k) => {
                        if !cur.is_object() {
                            *cur = json!({});
                        }
                        cur.as_object_mut()
                            .unwrap()
                            .entry(k.clone())
                            .or_insert(Value::Null)
                    }
                    Step::Index(i) => {
                        if *i > 8 {
                            return; // no such list is sent; extract finds nothing there
                        }
                        if !cur.is_array() {
                            *cur = json!([]);
                        }
                        let a = cur.as_array_mut().unwrap();
                        while a.len() <= *i {
                            a.push(Value::Null);
                        }
                        &mut a[*i]
                    }
                };
            }
            *cur = v;
        }
    }
}
