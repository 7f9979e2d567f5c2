//! Outbound notifications: Discord and signed JSON webhooks when builds start and finish.
//!
//! The host loop hands each event to [`Notifier`], which only queues it (bounded; a full queue
//! drops the event with a warning), so a slow or broken receiver never delays the loop or a
//! build. A worker sends at most [`CONCURRENCY`] notifications at once, each request with a
//! timeout of at most 10 s, no redirects, and an SSRF guard that refuses internal addresses
//! unless web_conf.json allows them. 429 answers are retried after `retry_after`, 5xx answers
//! and network errors with backoff, a bounded number of times. Every attempt is recorded; a
//! target is only ever shown or logged by its host, since webhook URLs carry tokens.
//!
//! Every string of a message is masked with the project's secrets before it is sent (a
//! build's reason or commit message could carry one); when they cannot be read, nothing is
//! sent and the notification says why.

use ams_core::commit_status as cs;
use ams_core::notify::{self, BuildEvent, HookType, OutWebhook};
use ams_core::webconf::WebConf;
use ams_host::host::{BuildEvents, EventKind};
use ams_host::metrics::{AttemptOutcome, Metrics};
use ams_host::{timefmt, DataDir};
use ams_store::{Attempt, BuildRecord, Notification, Store};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Notifications sent at once.
pub const CONCURRENCY: usize = 4;
/// Events waiting to be sent; past this they are dropped with a warning.
pub const QUEUE: usize = 1024;
/// Tries per notification.
pub const MAX_ATTEMPTS: u32 = 4;
/// Longest wait a 429 may ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The host's side: queues events, never blocks.
#[derive(Debug)]
pub struct Notifier {
    tx: mpsc::Sender<(i64, EventKind)>,
}

impl BuildEvents for Notifier {
    fn event(&self, build_id: i64, kind: EventKind) {
        if self.tx.try_send((build_id, kind)).is_err() {
            tracing::warn!(
                "notification queue full: dropped the {kind:?} notification of build {build_id}"
            );
        }
    }
}

#[derive(Clone)]
struct Ctx {
    data: DataDir,
    conf: Arc<WebConf>,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Starts the notifier's worker. When `shutdown` fires it sends what is queued by then and
/// ends once those jobs have ended (the caller bounds that wait): fire it after the host has
/// stopped, so that the last builds' events are among them. Each attempt is counted in
/// `metrics` by its outcome.
pub fn start(
    data: DataDir,
    conf: Arc<WebConf>,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Arc<Notifier>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(i64, EventKind)>(QUEUE);
    let ctx = Ctx {
        data,
        conf,
        store,
        metrics,
    };
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let mut jobs = JoinSet::new();
        // A build's events go out in order (a late "started" must never follow "finished"
        // to a forge): each job of a build waits for the one before it to end.
        let mut started: HashMap<i64, oneshot::Receiver<()>> = HashMap::new();
        let mut closed = false;
        loop {
            tokio::select! {
                // After the stop, what was queued by then still comes, then `None`.
                ev = rx.recv() => {
                    let Some((id, kind)) = ev else { break };
                    let Ok(permit) = slots.clone().acquire_owned().await else { break };
                    let ctx = ctx.clone();
                    let before = started.remove(&id);
                    let (done, after) = oneshot::channel::<()>();
                    if kind == EventKind::Started {
                        started.insert(id, after);
                    }
                    jobs.spawn(async move {
                        let _permit = permit;
                        if let Some(b) = before {
                            let _ = b.await;
                        }
                        handle(&ctx, id, kind).await;
                        drop(done);
                    });
                }
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                _ = shutdown.cancelled(), if !closed => {
                    rx.close();
                    closed = true;
                }
            }
        }
        while jobs.join_next().await.is_some() {}
    });
    (Arc::new(Notifier { tx }), task)
}

/// Loads and validates a project's out-webhooks; errors name the file and field.
pub fn out_webhooks(data: &DataDir, project: &str) -> Result<Vec<OutWebhook>, String> {
    let (cfg, _) = ams_host::project::webhooks(&data.project(project))?;
    notify::parse_out_webhooks(&cfg.out_webhooks).map_err(|e| e.to_string())
}

/// Problems to report at start: out-webhooks that do not load.
pub fn startup_problems(data: &DataDir) -> Vec<String> {
    ams_host::project::list(data)
        .into_iter()
        .filter(|p| data.project(p).config().join("webhooks.json").exists())
        .filter_map(|p| {
            out_webhooks(data, &p)
                .err()
                .map(|e| format!("project {p}: {e}"))
        })
        .collect()
}

/// Warnings to print at start: out-webhook templates written for the described system that
/// would double an address here (`{base_web_address}/{output_log}`).
pub fn startup_warnings(data: &DataDir) -> Vec<String> {
    ams_host::project::list(data)
        .into_iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(data.project(&p).config().join("webhooks.json"))
                .unwrap_or_default();
            ams_core::notify::doubled_links(&text)
                .into_iter()
                .map(move |w| format!("project {p}: {w}"))
        })
        .collect()
}

const QUOTES: &[&str] = &[
    "It works on my container.",
    "Green is my favourite colour.",
    "Have you tried turning it off and on again?",
    "Compiling… the universe takes a while.",
    "Ship it!",
];

fn link(base: &str, path: &str) -> String {
    let enc: String = path
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{base}?page_redirect={enc}")
}

/// The variables of a build for message templates. Links go through the login page.
pub fn variables(conf: &WebConf, b: &BuildRecord) -> BTreeMap<&'static str, String> {
    use rand::Rng;
    let base = conf.base_web_address();
    let mut m = BTreeMap::new();
    m.insert("app_name", "AMS-Build".to_string());
    m.insert("app_version", env!("CARGO_PKG_VERSION").to_string());
    m.insert(
        "quote",
        QUOTES[rand::rng().random_range(0..QUOTES.len())].to_string(),
    );
    m.insert("base_web_address", base.clone());
    m.insert("project", b.project.clone());
    m.insert("build_name", b.name.clone());
    m.insert("build_index", b.build_index.to_string());
    m.insert("build_hash", b.hash.clone());
    m.insert("git_hash", b.git_hash.clone().unwrap_or_default());
    m.insert("7z_hash", b.archive_hash.clone().unwrap_or_default());
    // The described system's words (webhook, www_interface), as the API's trigger_method.
    m.insert(
        "trigger_method",
        ams_core::names::Trigger::parse(&b.trigger)
            .map(ams_core::compat::trigger_method)
            .unwrap_or(&b.trigger)
            .to_string(),
    );
    m.insert("actor", b.created_by.clone());
    m.insert("created", timefmt::legacy(b.created_at));
    m.insert("status", b.status.to_string());
    m.insert(
        "legacy_status",
        ams_core::compat::legacy_status(b.status).to_string(),
    );
    m.insert("canceled_by", b.canceled_by.clone().unwrap_or_default());
    m.insert(
        "7z_link",
        if b.archive_name.is_some() {
            link(&base, &format!("dl/{}/{}", b.project, b.name))
        } else {
            String::new()
        },
    );
    m.insert(
        "output_log",
        link(&base, &format!("output/{}/{}", b.project, b.name)),
    );
    m
}

async fn handle(ctx: &Ctx, id: i64, kind: EventKind) {
    let b = match ctx.store.build_by_id(id).await {
        Ok(Some(b)) => b,
        _ => return,
    };
    commit_status(ctx, &b, kind).await;
    // A project without webhooks.json has no out-webhooks: nothing to send, nothing to say.
    if !ctx
        .data
        .project(&b.project)
        .config()
        .join("webhooks.json")
        .exists()
    {
        return;
    }
    let hooks = match out_webhooks(&ctx.data, &b.project) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("project {}: notifications not sent: {e}", b.project);
            return;
        }
    };
    if hooks.is_empty() {
        return;
    }
    let event = match kind {
        EventKind::Started => BuildEvent::Started,
        EventKind::Finished => BuildEvent::Finished {
            status: b.status,
            previous: ctx.store.previous_status(&b).await.ok().flatten(),
        },
    };
    let mut values = variables(&ctx.conf, &b);
    let masker = ams_host::secrets::project_masker(&ctx.data, &ctx.store, &b.project).await;
    // Masked before a message is made and cut to its limits: a cut through a value would
    // leave its beginning unmasked.
    if let Ok(Some(m)) = &masker {
        values.values_mut().for_each(|v| *v = m.mask_str(v));
    }
    for hook in hooks {
        let Some(trigger) = hook.triggers.iter().copied().find(|t| t.fires(event)) else {
            continue;
        };
        let body = match hook.kind {
            HookType::Discord => notify::discord_message(&hook.data, &values),
            HookType::Json => json!({
                "event": trigger.name(),
                "build": b,
                "status": b.status.as_str(),
                "links": {"output_log": values["output_log"], "7z_link": values["7z_link"]},
            }),
        };
        let created_at = timefmt::now();
        let (outcome, attempts) = match &masker {
            Ok(m) => {
                let mut body = body;
                if let Some(m) = m {
                    mask_json(&mut body, m);
                }
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                deliver(&ctx.conf, &ctx.metrics, &hook, bytes).await
            }
            Err(e) => (
                format!(
                    "failed: not sent: the project's secrets could not be read to mask the \
                     message ({e})"
                ),
                Vec::new(),
            ),
        };
        let host = notify::url_host(&hook.url);
        if outcome != "sent" {
            tracing::warn!(
                "notification `{}` of build {} to {host}: {outcome}",
                hook.name,
                b.name
            );
        }
        let n = Notification {
            id: 0,
            project: b.project.clone(),
            build_name: b.name.clone(),
            hook: hook.name.clone(),
            kind: match hook.kind {
                HookType::Discord => "discord".into(),
                HookType::Json => "json".into(),
            },
            target_host: host,
            event: trigger.name().into(),
            outcome,
            attempts,
            created_at,
            finished_at: timefmt::now(),
        };
        if let Err(e) = ctx.store.record_notification(&n).await {
            tracing::error!("cannot record a notification: {e}");
        }
    }
}

/// Hides the secrets in every string of a message (keys are the hook's own).
pub fn mask_json(v: &mut Value, m: &Arc<ams_core::mask::Masker>) {
    match v {
        Value::String(s) => *s = m.mask_str(s),
        Value::Array(items) => items.iter_mut().for_each(|i| mask_json(i, m)),
        Value::Object(map) => map.values_mut().for_each(|i| mask_json(i, m)),
        _ => {}
    }
}

/// Reports the build's state on its commit when pipeline-config.json asks (`commit-status`),
/// recorded like a notification (hook `commit-status`).
async fn commit_status(ctx: &Ctx, b: &BuildRecord, kind: EventKind) {
    let pd = ctx.data.project(&b.project);
    let Some(cfg) = ams_host::project::private_config(&pd)
        .ok()
        .and_then(|c| c.commit_status)
    else {
        return;
    };
    let (status, sha) = match kind {
        EventKind::Started => (None, b.commit.clone()),
        EventKind::Finished => (Some(b.status), b.git_hash.clone().or(b.commit.clone())),
    };
    // Before its update a branch build knows no commit yet: its final state still goes out.
    let Some(sha) = sha.filter(|s| ams_host::git::valid_commit(s)) else {
        return;
    };
    let repo = match &cfg.repo {
        Some(r) => Some(r.clone()),
        None => ams_host::git::origin_url(&pd.master_source())
            .await
            .and_then(|u| cs::repo_from_remote(&u, cfg.forge)),
    };
    let state = cs::State::of(status);
    let mut n = Notification {
        id: 0,
        project: b.project.clone(),
        build_name: b.name.clone(),
        hook: "commit-status".into(),
        kind: match cfg.forge {
            cs::Forge::Github => "github".into(),
            cs::Forge::Bitbucket => "bitbucket".into(),
        },
        target_host: String::new(),
        event: format!("commit-status {state:?}").to_lowercase(),
        outcome: String::new(),
        attempts: Vec::new(),
        created_at: timefmt::now(),
        finished_at: 0.0,
    };
    match repo {
        None => {
            n.outcome = "failed: pipeline-config.json: commit-status.repo is missing and the \
                         origin remote is not on the forge; add \"repo\": \"owner/name\""
                .into();
        }
        Some(repo) => {
            let values = variables(&ctx.conf, b);
            let masker = ams_host::secrets::project_masker(&ctx.data, &ctx.store, &b.project).await;
            // An ERROR's reason is about the host (paths, the engine): the forge gets none of it.
            let description = match status {
                None => format!("build {} running", b.name),
                Some(ams_core::status::BuildStatus::Error) => {
                    "ERROR: a failure outside the project; see the build's log".to_string()
                }
                Some(s) => match &b.reason {
                    Some(r) => format!("{s}: {r}"),
                    None => format!("{s}"),
                },
            };
            // The description carries the build's reason: masked before it is cut to length.
            let description = match &masker {
                Ok(Some(m)) => m.mask_str(&description),
                _ => description,
            };
            let (url, body) = cs::request(
                &cfg,
                &repo,
                &sha,
                state,
                &values["output_log"],
                &description,
            );
            n.target_host = notify::url_host(&url);
            let auth = match &cfg.username {
                Some(user) => {
                    use base64::Engine;
                    let pair = format!("{user}:{}", cfg.token);
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(pair)
                    )
                }
                None => format!("Bearer {}", cfg.token),
            };
            let mut headers = vec![("Authorization", auth)];
            if cfg.forge == cs::Forge::Github {
                headers.push(("Accept", "application/vnd.github+json".into()));
            }
            let mut body = body;
            match masker {
                Ok(m) => {
                    if let Some(m) = m {
                        mask_json(&mut body, &m);
                    }
                    let bytes = serde_json::to_vec(&body).unwrap_or_default();
                    let (outcome, attempts) =
                        post(&ctx.conf, &ctx.metrics, &url, &headers, bytes).await;
                    n.outcome = outcome;
                    n.attempts = attempts;
                }
                Err(e) => {
                    n.outcome = format!(
                        "failed: not sent: the project's secrets could not be read to mask \
                         the message ({e})"
                    );
                }
            }
        }
    }
    n.finished_at = timefmt::now();
    if n.outcome != "sent" {
        tracing::warn!(
            "commit status of build {} to {}: {}",
            b.name,
            n.target_host,
            n.outcome
        );
    }
    if let Err(e) = ctx.store.record_notification(&n).await {
        tracing::error!("cannot record a commit status: {e}");
    }
}

fn sign(secret: &str, body: &[u8]) -> String {
    let Ok(mut m) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    m.update(body);
    let bytes = m.finalize().into_bytes();
    format!(
        "sha256={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Resolves the target and applies the SSRF guard. Returns the address to connect to.
async fn resolve(conf: &WebConf, url: &reqwest::Url) -> Result<Option<SocketAddr>, String> {
    let host = url.host_str().ok_or("the URL has no host")?.to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect(),
    };
    let first = *addrs
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    if !conf.notify_allow_private {
        if let Some(bad) = addrs.iter().find(|a| notify::ip_is_internal(a.ip())) {
            return Err(format!(
                "refused: {host} resolves to the internal address {}; set \
                 \"notify_allow_private\": true in web_conf.json to allow it",
                bad.ip()
            ));
        }
    }
    // Connect to the address that was checked, never to a second lookup's answer.
    Ok(if bare.parse::<std::net::IpAddr>().is_ok() {
        None
    } else {
        Some(first)
    })
}

fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect error".into()
    } else {
        // Never the URL: it carries the webhook's token.
        format!("request error: {}", e.without_url())
    }
}

/// Sends one notification with retries. Returns the outcome and every attempt.
async fn deliver(
    conf: &WebConf,
    metrics: &Metrics,
    hook: &OutWebhook,
    body: Vec<u8>,
) -> (String, Vec<Attempt>) {
    let headers = match (hook.kind, &hook.secret) {
        (HookType::Json, Some(s)) => vec![("X-AMS-Signature-256", sign(s, &body))],
        _ => Vec::new(),
    };
    post(conf, metrics, &hook.url, &headers, body).await
}

/// POSTs a JSON body with retries (429 after its `retry_after`, 5xx and network errors with
/// backoff) through the SSRF guard. Returns the outcome and every attempt, each attempt also
/// counted in `metrics` by its outcome.
async fn post(
    conf: &WebConf,
    metrics: &Metrics,
    target: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (String, Vec<Attempt>) {
    let mut attempts = Vec::new();
    let url = match reqwest::Url::parse(target) {
        Ok(u) => u,
        Err(_) => {
            metrics.notification_attempt(AttemptOutcome::Refused);
            return ("failed: the URL does not parse".into(), attempts);
        }
    };
    let pinned = match resolve(conf, &url).await {
        Ok(p) => p,
        Err(e) => {
            metrics.notification_attempt(AttemptOutcome::Refused);
            attempts.push(Attempt {
                at: timefmt::now(),
                outcome: e.clone(),
                millis: 0,
            });
            return (format!("failed: {e}"), attempts);
        }
    };
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(conf.notify_timeout_secs.clamp(1, 10)))
        .user_agent(concat!("AMS-Build/", env!("CARGO_PKG_VERSION")));
    if let (Some(addr), Some(host)) = (pinned, url.host_str()) {
        builder = builder.resolve(host, addr);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            metrics.notification_attempt(AttemptOutcome::NetworkError);
            return (format!("failed: {}", describe(e)), attempts);
        }
    };
    for n in 0..MAX_ATTEMPTS {
        let t0 = Instant::now();
        let mut req = client
            .post(url.clone())
            .header("Content-Type", "application/json")
            .body(body.clone());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let res = req.send().await;
        let millis = t0.elapsed().as_millis() as u64;
        let at = timefmt::now();
        let last = n + 1 == MAX_ATTEMPTS;
        let wait = match res {
            Ok(resp) => {
                let status = resp.status();
                metrics.notification_attempt(AttemptOutcome::of_status(status.as_u16()));
                attempts.push(Attempt {
                    at,
                    outcome: status.as_u16().to_string(),
                    millis,
                });
                if status.is_success() {
                    return ("sent".into(), attempts);
                }
                if status.as_u16() == 429 {
                    let header = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok());
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    let secs = body["retry_after"].as_f64().or(header).unwrap_or(1.0);
                    Duration::from_secs_f64(secs.clamp(0.0, MAX_RETRY_AFTER.as_secs_f64()))
                } else if status.is_server_error() {
                    Duration::from_secs(1 << n)
                } else if status.is_redirection() {
                    return (
                        format!("failed: answered {status}; redirects are not followed"),
                        attempts,
                    );
                } else {
                    return (format!("failed: answered {status}"), attempts);
                }
            }
            Err(e) => {
                metrics.notification_attempt(if e.is_timeout() {
                    AttemptOutcome::Timeout
                } else {
                    AttemptOutcome::NetworkError
                });
                attempts.push(Attempt {
                    at,
                    outcome: describe(e),
                    millis,
                });
                Duration::from_secs(1 << n)
            }
        };
        if last {
            break;
        }
        tokio::time::sleep(wait).await;
    }
    let what = attempts
        .last()
        .map(|a| a.outcome.clone())
        .unwrap_or_default();
    (
        format!("failed after {} attempts: {what}", attempts.len()),
        attempts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_go_through_the_login_page() {
        assert_eq!(
            link("http://h:8080/ams-build/", "output/p/p_1"),
            "http://h:8080/ams-build/?page_redirect=output/p/p_1"
        );
        assert_eq!(link("b/", "dl/a b&c"), "b/?page_redirect=dl/a%20b%26c");
    }

    fn finished_build() -> BuildRecord {
        BuildRecord {
            id: 1,
            project: "p".into(),
            build_index: 3,
            name: "p_3".into(),
            hash: "b".repeat(40),
            git_hash: Some("c".repeat(40)),
            commit_message: None,
            status: ams_core::status::BuildStatus::Pass,
            reason: None,
            trigger: "web".into(),
            branch: Some("main".into()),
            commit: None,
            created_by: "alice".into(),
            created_at: 1_700_000_000.0,
            started_at: Some(1_700_000_001.0),
            finished_at: Some(1_700_000_002.0),
            canceled_by: Some("bob".into()),
            canceled_at: None,
            archive_name: Some("p_3.7z".into()),
            archive_hash: Some("d".repeat(40)),
            archive_hash_kind: Some("SHA1".into()),
            output_deleted_at: None,
            stages: vec![],
            retry_of: None,
            params: Default::default(),
            tests: None,
        }
    }

    /// Every documented variable of webhooks.json has a value, and a Discord message made of
    /// all of them holds those values, not one `{name}` left literally (`{7z_link}` was).
    #[test]
    fn every_documented_variable_expands_in_messages() {
        let values = variables(&WebConf::default(), &finished_build());
        let mut text = String::new();
        for name in notify::NOTIFY_VARS {
            let v = values
                .get(name)
                .unwrap_or_else(|| panic!("{name} has no value"));
            assert!(!v.is_empty(), "{name} is empty for a finished build");
            text.push_str(&format!("<{{{name}}}>"));
        }
        notify::parse_out_webhooks(&[json!({
            "hook-name": "d", "type": "discord", "trigger": ["build-complete"],
            "url": "https://discord.com/api/webhooks/1/x",
            "data": {"default": {"content": text}}
        })])
        .expect("every documented variable is accepted in webhooks.json");
        let msg = notify::discord_message(&json!({"default": {"content": text}}), &values);
        let content = msg["content"].as_str().unwrap();
        for name in notify::NOTIFY_VARS {
            assert!(
                !content.contains(&format!("{{{name}}}")),
                "{{{name}}} was sent literally"
            );
        }
        assert!(
            content.contains(&format!("<{}>", "d".repeat(40))),
            "{content}"
        );
        assert!(content.contains("?page_redirect=dl/p/p_3>"), "{content}");
    }

    #[test]
    fn every_string_of_a_message_is_masked() {
        let m = ams_core::mask::Masker::new(&["s3cret-value"])
            .unwrap()
            .unwrap();
        let mut b = finished_build();
        b.reason = Some("deploy with s3cret-value failed".into());
        b.commit_message = Some("oops: czNjcmV0LXZhbHVl".into());
        let mut body = json!({"build": b, "list": ["x s3cret-value y"], "n": 3});
        mask_json(&mut body, &m);
        let text = body.to_string();
        assert!(
            !text.contains("s3cret-value") && !text.contains("czNjcmV0LXZhbHVl"),
            "{text}"
        );
        assert_eq!(body["build"]["reason"], "deploy with *** failed");
        assert_eq!(body["list"][0], "x *** y");
        assert_eq!(body["n"], 3);
    }

    #[test]
    fn signature_is_hmac_sha256() {
        assert_eq!(
            sign("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
