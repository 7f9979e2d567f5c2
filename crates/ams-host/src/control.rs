//! The local control socket: how `amsbuild build`, `builds`, `cancel`, `delete-output`, `gc`
//! and `status` reach a running host without touching its files.
//!
//! A Unix socket `amsbuild.sock` in the data directory, mode 0600, so only the host's own user
//! (and root) can use it. One JSON object per line in each direction: a request, then one
//! answer, or for `follow` a stream of `{"log": …}` lines closed by `{"ok": true, "status": …}`.

use crate::host::{BuildRef, BuildRequest, HostHandle};
use crate::log;
use ams_store::BuildRecord;
use bytes::Bytes;
use serde_json::{json, Value};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const MAX_REQUEST: u64 = 64 * 1024;

/// Binds the socket, refusing to start a second host on the same data directory.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "another amsbuild host is already running with this data directory (its socket \
                 {} answers); stop it first",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// Serves the socket until `shutdown` fires.
pub async fn serve(handle: HostHandle, listener: UnixListener, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    let h = handle.clone();
                    let stop = shutdown.clone();
                    conns.spawn(async move {
                        tokio::select! {
                            _ = connection(h, stream) => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                }
                Err(e) => tracing::warn!("control socket: {e}"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    conns.abort_all();
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

async fn connection(h: HostHandle, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST);
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let req: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            let _ = send(&mut w, &err(format!("bad request: {e}"))).await;
            return;
        }
    };
    let cmd = str_field(&req, "cmd").unwrap_or_default();
    let actor = str_field(&req, "actor").unwrap_or_else(|| "cli".into());
    let answer = match cmd.as_str() {
        "ping" => json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
        "build" => {
            let Some(project) = str_field(&req, "project") else {
                let _ = send(&mut w, &err("`project` is required")).await;
                return;
            };
            let trigger = match str_field(&req, "trigger") {
                None => ams_core::names::Trigger::Cli,
                Some(t) => match ams_core::names::Trigger::parse(&t) {
                    Some(t) => t,
                    None => {
                        let _ = send(
                            &mut w,
                            &err(format!(
                                "`{t}` is not a trigger; use cli, web, api, webhook or schedule"
                            )),
                        )
                        .await;
                        return;
                    }
                },
            };
            let project = match ams_core::names::ProjectName::new(&project) {
                Ok(p) => p,
                Err(e) => {
                    let _ = send(&mut w, &err(e)).await;
                    return;
                }
            };
            let r = BuildRequest {
                project,
                branch: str_field(&req, "branch"),
                commit: str_field(&req, "commit"),
                actor,
                trigger,
                // `{"params": {"NAME": "value"}}`; a value that is not a string is refused.
                params: match req.get("params") {
                    None | Some(Value::Null) => Default::default(),
                    Some(v) => match serde_json::from_value(v.clone()) {
                        Ok(p) => p,
                        Err(_) => {
                            let _ = send(
                                &mut w,
                                &err("params: give an object of NAME: \"value\" strings"),
                            )
                            .await;
                            return;
                        }
                    },
                },
            };
            match h.build(r).await {
                Ok(b) => json!({"ok": true, "build": b}),
                Err(e) => err(e.detail()),
            }
        }
        "builds" => match list_args(&h, &req, 20, 1000) {
            Ok((p, limit)) => listed("builds", h.store.builds_of(&p, limit, 0).await),
            Err(e) => e,
        },
        "deliveries" => match list_args(&h, &req, 50, 10_000) {
            Ok((p, limit)) => listed("deliveries", h.store.deliveries_of(&p, limit).await),
            Err(e) => e,
        },
        "notifications" => match list_args(&h, &req, 50, 10_000) {
            Ok((p, limit)) => listed("notifications", h.store.notifications_of(&p, limit).await),
            Err(e) => e,
        },
        "replay" => {
            let id = req.get("id").and_then(Value::as_i64).unwrap_or(0);
            match replay(&h, id, &actor).await {
                Ok(v) => v,
                Err(e) => err(e),
            }
        }
        "cancel" => match by_ref(&h, &req).await {
            Ok(b) => match h.cancel(b.build_id(), &actor).await {
                Ok(b) => json!({"ok": true, "build": b}),
                Err(e) => err(e.detail()),
            },
            Err(e) => err(e),
        },
        "rebuild" => match by_ref(&h, &req).await {
            Ok(b) => match h.rebuild(&b, &actor, ams_core::names::Trigger::Cli).await {
                Ok(b) => json!({"ok": true, "build": b}),
                Err(e) => err(e.detail()),
            },
            Err(e) => err(e),
        },
        "delete-output" => match by_ref(&h, &req).await {
            Ok(b) => match h.delete_output(b.build_id(), &actor).await {
                Ok(()) => json!({"ok": true, "build": b}),
                Err(e) => err(e.detail()),
            },
            Err(e) => err(e),
        },
        "gc" => {
            let dry_run = req.get("dry_run").and_then(Value::as_bool).unwrap_or(false);
            if !dry_run {
                tracing::info!("retention run asked for by {actor}");
            }
            match h.gc(dry_run).await {
                Ok(r) => json!({"ok": true, "report": r}),
                Err(e) => err(e.detail()),
            }
        }
        "status" => match h.snapshot().await {
            Ok(s) => json!({"ok": true, "active": s.active, "pending": s.pending}),
            Err(e) => err(e.detail()),
        },
        "engines" => json!({"ok": true, "engines": *h.engines.borrow()}),
        "follow" => {
            follow(&h, &req, &mut w).await;
            return;
        }
        other => err(format!("unknown command `{other}`")),
    };
    let _ = send(&mut w, &answer).await;
}

/// The project and limit of a list request; an error answer when the project is unknown.
fn list_args(h: &HostHandle, req: &Value, default: i64, max: i64) -> Result<(String, i64), Value> {
    let project = str_field(req, "project").unwrap_or_default();
    let limit = req
        .get("limit")
        .and_then(Value::as_i64)
        .unwrap_or(default)
        .clamp(1, max);
    if crate::project::exists(&h.data, &project) {
        Ok((project, limit))
    } else {
        Err(err(format!("no project named `{project}`")))
    }
}

/// The answer to a list request.
fn listed<T: serde::Serialize>(key: &str, r: Result<Vec<T>, ams_store::StoreError>) -> Value {
    match r {
        Ok(items) => json!({"ok": true, key: items}),
        Err(e) => err(e.to_string()),
    }
}

/// Replays a recorded delivery: its body and headers go through the webhook's current filters
/// again and, if they still ask for builds, queue them, recorded as a new delivery.
pub async fn replay(h: &HostHandle, id: i64, actor: &str) -> Result<Value, String> {
    use ams_core::webhooks::{decide, Decision, Sender};
    let (d, headers, body) = h
        .store
        .delivery_payload(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no delivery {id}"))?;
    if body.is_empty() {
        return Err(format!(
            "delivery {id} kept no body to replay ({})",
            d.verdict
        ));
    }
    let (cfg, fields) = crate::project::webhooks(&h.data.project(&d.project))?;
    let hook = cfg.in_webhook(&d.webhook).ok_or_else(|| {
        format!(
            "project {} has no webhook `{}` any more",
            d.project, d.webhook
        )
    })?;
    let hv: Value = serde_json::from_str(&headers).unwrap_or(Value::Null);
    let sender = Sender::detect(
        hv.get("x-github-event").and_then(Value::as_str),
        hv.get("x-event-key").and_then(Value::as_str),
    );
    let parsed: Value =
        serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let pushes = match decide(hook, sender, &d.event, &parsed, fields.as_ref()) {
        Decision::Build(p) => p,
        Decision::Ping => return Ok(json!({"ok": true, "builds": [], "ping": true})),
        Decision::Ignore(r) => return Ok(json!({"ok": true, "builds": [], "ignored": r})),
        Decision::Refuse(_, r) => return Err(r),
    };
    let delivery = ams_store::NewDelivery {
        delivery_id: None,
        project: d.project.clone(),
        webhook: d.webhook.clone(),
        received_at: crate::timefmt::now(),
        sender: d.sender.clone(),
        event: d.event.clone(),
        verdict: ams_core::webhooks::Verdict::Accepted,
        reason: Some(format!("replay of delivery {id} by {actor}")),
        headers,
        body,
        ..Default::default()
    };
    let project = ams_core::names::ProjectName::new(&d.project)?;
    match h
        .webhook(delivery, crate::host::build_requests(&project, pushes))
        .await
        .map_err(|e| e.detail())?
    {
        crate::host::WebhookOutcome::Queued(names) => Ok(json!({"ok": true, "builds": names})),
        crate::host::WebhookOutcome::Duplicate => Ok(json!({"ok": true, "builds": []})),
    }
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

/// The build a request names (see [`BuildRef::from_fields`]), resolved by the one resolver that
/// `log`, `cancel` and `delete-output` share. The socket's user is the operator, who may act on
/// every project.
async fn by_ref(h: &HostHandle, req: &Value) -> Result<BuildRecord, String> {
    let r = BuildRef::from_fields(req)?;
    if let Some(b) = h
        .resolve_ref(&r, |_| true)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(b);
    }
    Err(match &r {
        BuildRef::Index { project, .. }
        | BuildRef::Name {
            project: Some(project),
            ..
        } if !crate::project::exists(&h.data, project) => {
            format!("no project named `{project}`")
        }
        BuildRef::Index { project, index } => format!(
            "project `{project}` has no build {index} (`amsbuild builds {project}` lists them)"
        ),
        BuildRef::Name { .. } => format!("no build named `{r}`"),
    })
}

async fn follow(h: &HostHandle, req: &Value, w: &mut (impl AsyncWriteExt + Unpin)) {
    let b = match by_ref(h, req).await {
        Ok(b) => b,
        Err(e) => {
            let _ = send(w, &err(e)).await;
            return;
        }
    };
    let path = h.data.project(&b.project).build(&b.name).log();
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let hub = h.hub.clone();
    let id = b.id;
    let reader = tokio::spawn(async move { log::follow(&hub, id, &path, &tx).await });
    // Carry partial UTF-8 sequences over chunk boundaries.
    let mut carry: Vec<u8> = Vec::new();
    while let Some(chunk) = rx.recv().await {
        let text = log::take_utf8(&mut carry, &chunk);
        if send(w, &json!({ "log": text })).await.is_err() {
            return;
        }
    }
    if !carry.is_empty() {
        let _ = send(w, &json!({"log": String::from_utf8_lossy(&carry)})).await;
    }
    let status = match reader.await {
        Ok(Ok(Some(s))) => s,
        _ => match h.store.build_by_id(id).await {
            Ok(Some(b)) => b.status.as_str().to_string(),
            _ => "unknown".into(),
        },
    };
    let _ = send(w, &json!({"ok": true, "status": status, "build": b.name})).await;
}

/// Client side: sends one request and returns the one answer.
pub async fn request(socket: &Path, req: &Value) -> Result<Value, String> {
    let stream = connect(socket).await?;
    let (r, mut w) = stream.into_split();
    send(&mut w, req).await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad answer from host: {e}"))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v)
    } else {
        Err(str_field(&v, "error").unwrap_or_else(|| "the host refused".into()))
    }
}

/// Client side: a request about one build (`cancel`, `delete-output`), naming it as `build`
/// says, and its answer.
pub async fn request_on(
    socket: &Path,
    cmd: &str,
    build: &BuildRef,
    actor: &str,
) -> Result<Value, String> {
    let mut req = build.to_fields();
    req.insert("cmd".into(), cmd.into());
    req.insert("actor".into(), actor.into());
    request(socket, &Value::Object(req)).await
}

/// Client side: follows a build's log, calling `out` with each piece of text.
/// Returns the build's name and its final status.
pub async fn follow_log(
    socket: &Path,
    build: &BuildRef,
    out: &mut dyn FnMut(&str),
) -> Result<(String, String), String> {
    let stream = connect(socket).await?;
    let (r, mut w) = stream.into_split();
    let mut req = build.to_fields();
    req.insert("cmd".into(), "follow".into());
    send(&mut w, &Value::Object(req))
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if let Some(text) = v.get("log").and_then(Value::as_str) {
            out(text);
        } else if let Some(s) = str_field(&v, "status") {
            return Ok((
                str_field(&v, "build").unwrap_or_else(|| build.to_string()),
                s,
            ));
        } else if let Some(e) = str_field(&v, "error") {
            return Err(e);
        }
    }
    Err("the host closed the connection before the build ended".into())
}

async fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).await.map_err(|_| {
        format!(
            "no amsbuild host is running for this data directory (nothing answers on {}); \
             start one with `amsbuild serve`",
            socket.display()
        )
    })
}
