//! The webhook listener: `POST /{web_root}/request?name={webhook}&project={project}`.
//!
//! The handler verifies, records and queues, and that is all: it answers 202 with the queued
//! build names, 200 for pings and for pushes it ignores, and a 4xx with a short reason for a
//! refusal. A delivery is untrusted until its signature is checked, so the checks run
//! cheapest first and the body is read last: the query, the content type, that the project
//! and its webhook exist, that a signed webhook's delivery carries a signature, that the
//! declared Content-Length is within [`MAX_BODY`] (a missing one is 411, a larger one 413),
//! and a share of [`BODIES_IN_FLIGHT`]; only then is the body read, never past its declared
//! length or the cap. The signature (HMAC-SHA256 over the raw body, compared in constant time)
//! is checked before the body is parsed; a forged or unsigned delivery leaves no trace but a
//! log line. An unknown project and an unknown webhook get the same answer. 202 means the
//! delivery and its builds are committed; when the database cannot take them (a full disk,
//! say) the answer is 503 with the reason, and nothing was recorded.

use ams_core::webhooks::Verdict;
use ams_core::webhooks::{decide, Decision, Sender, WebhookFields, WebhooksConfig};
use ams_host::error::HostError;
use ams_host::host::{build_requests, WebhookOutcome};
use ams_host::metrics::DeliveryVerdict;
use ams_host::settings::ProjectWebhooks;
use ams_host::{timefmt, HostHandle};
use ams_store::NewDelivery;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// GitHub delivers at most 25 MB; a larger declared length gets 413 before anything is read,
/// and a chunked body is cut off (413) once it passes this.
pub const MAX_BODY: usize = 25 * 1024 * 1024;
/// Delivery bodies held in memory at once, over all connections: each delivery reserves its
/// declared length (a chunked one the cap) before its body is read; past this, 503.
pub const BODIES_IN_FLIGHT: usize = 100 * 1024 * 1024;
/// A sender has this long to deliver its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct WebhookState {
    pub host: HostHandle,
}

/// The listener's own state: the host, and the memory its bodies may take (in KiB).
#[derive(Clone)]
struct Listener {
    /// Shared: axum clones the state for every request.
    host: Arc<HostHandle>,
    bodies: Arc<Semaphore>,
}

/// The router for the listener, under `/{web_root}/request`.
pub fn router(state: WebhookState, web_root: &str) -> Router {
    let listener = Listener {
        host: Arc::new(state.host),
        bodies: Arc::new(Semaphore::new(BODIES_IN_FLIGHT / 1024)),
    };
    Router::new()
        .route(&format!("/{web_root}/request"), post(handle))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(listener)
}

fn answer(status: StatusCode, v: Value) -> Response {
    (status, Json(v)).into_response()
}

fn refuse(status: StatusCode, reason: &str) -> Response {
    answer(status, json!({"ok": false, "reason": reason}))
}

/// A refusal sent before the body was read: the connection closes after it, so the unread
/// body is never waited for.
fn refuse_unread(status: StatusCode, reason: &str) -> Response {
    let mut r = refuse(status, reason);
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// How long a request says its body is.
#[derive(Debug, PartialEq, Eq)]
enum Length {
    Declared(u64),
    Chunked,
    Missing,
    Invalid,
}

fn declared_length(h: &HeaderMap) -> Length {
    let chunked = h.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
    });
    if chunked {
        return Length::Chunked;
    }
    match h.get(header::CONTENT_LENGTH) {
        None => Length::Missing,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map_or(Length::Invalid, Length::Declared),
    }
}

/// Why a body was not read whole.
enum Unread {
    TooLarge,
    Broken(axum::Error),
}

/// Reads a body, refusing it as soon as it passes `cap` bytes (so at most one more frame is
/// ever read).
async fn read_capped(body: Body, cap: usize) -> Result<Vec<u8>, Unread> {
    let mut out = Vec::new();
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(Unread::Broken)?;
        if out.len() + frame.len() > cap {
            return Err(Unread::TooLarge);
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Checks `sha256=<hex>` against HMAC-SHA256(secret, body), in constant time.
pub fn signature_valid(secret: &[u8], body: &[u8], header_value: &str) -> Result<(), &'static str> {
    let Some(hex) = header_value.trim().strip_prefix("sha256=") else {
        return Err("only sha256 signatures are accepted");
    };
    let Some(sig) = decode_hex(hex) else {
        return Err("the signature is not hex");
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).map_err(|_| "bad secret")?;
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| "the signature does not match")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A project's webhook configuration; `None` when the project or file does not exist or is
/// broken (logged), and the caller must not tell which. Cached by the files' stamps: a
/// delivery costs two `stat`s here, not a read and a parse.
fn load(host: &HostHandle, project: &str) -> Option<Arc<ProjectWebhooks>> {
    // The cache refuses a name that cannot be a project as it does a project without webhooks.
    match host.webhooks(project) {
        Ok(x) => Some(x),
        Err(e) => {
            if !e.ends_with(ams_host::project::NO_WEBHOOKS) {
                tracing::error!("project {project}: {e}");
            }
            None
        }
    }
}

const KEPT_HEADERS: &[&str] = &[
    "content-type",
    "user-agent",
    "x-github-event",
    "x-github-delivery",
    "x-github-hook-id",
    "x-hub-signature-256",
    "x-hub-signature",
    "x-event-key",
    "x-request-uuid",
    "x-request-id",
    "x-hook-uuid",
];

async fn handle(
    State(st): State<Listener>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (verdict, reply) = receive(&st, &q, &headers, body).await;
    st.host.metrics.webhook_delivery(verdict);
    reply
}

/// Handles one delivery: the answer, and the verdict it is counted under.
async fn receive(
    st: &Listener,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> (DeliveryVerdict, Response) {
    use DeliveryVerdict::{Invalid, Recorded, Unauthorized, Unavailable};
    // Everything up to the read is decided from the request line and headers.
    let (Some(name), Some(project)) = (q.get("name"), q.get("project")) else {
        return (
            Invalid,
            refuse_unread(
                StatusCode::BAD_REQUEST,
                "the query must name the webhook and the project: ?name=…&project=…",
            ),
        );
    };
    let ct = header(headers, "content-type").unwrap_or("");
    if !ct
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return (
            Invalid,
            refuse_unread(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the payload as application/json (set the webhook's content type)",
            ),
        );
    }
    let unknown = || {
        (
            Invalid,
            refuse_unread(StatusCode::NOT_FOUND, "unknown webhook"),
        )
    };
    let Some(loaded) = load(&st.host, project) else {
        return unknown();
    };
    let (cfg, fields) = &*loaded;
    let Some(hook) = cfg.in_webhook(name) else {
        return unknown();
    };
    let secret = hook.secret.as_deref().filter(|s| !s.is_empty());
    let sig = header(headers, "x-hub-signature-256").or_else(|| header(headers, "x-hub-signature"));
    if secret.is_some() && sig.is_none() {
        tracing::warn!("webhook {name} of project {project}: refused an unsigned delivery");
        return (
            Unauthorized,
            refuse_unread(StatusCode::UNAUTHORIZED, "the delivery is not signed"),
        );
    }
    let cap = match declared_length(headers) {
        Length::Declared(n) if n > MAX_BODY as u64 => {
            return (
                Invalid,
                refuse_unread(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is {n} bytes; a delivery may have at most {MAX_BODY} bytes"),
                ),
            )
        }
        Length::Declared(n) => n as usize,
        Length::Chunked => MAX_BODY,
        Length::Missing => {
            return (
                Invalid,
                refuse_unread(
                    StatusCode::LENGTH_REQUIRED,
                    "send the delivery with a Content-Length header",
                ),
            )
        }
        Length::Invalid => {
            return (
                Invalid,
                refuse_unread(
                    StatusCode::BAD_REQUEST,
                    "the Content-Length header is not a number",
                ),
            )
        }
    };
    let kib = u32::try_from(cap.div_ceil(1024)).unwrap_or(u32::MAX);
    let Ok(_memory) = st.bodies.clone().try_acquire_many_owned(kib) else {
        return (
            Unavailable,
            refuse_unread(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many deliveries are being received at once; send this one again later",
            ),
        );
    };
    let body = match read_capped(body, cap).await {
        Ok(b) => b,
        Err(Unread::TooLarge) => {
            return (
                Invalid,
                refuse_unread(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is over {MAX_BODY} bytes, the most a delivery may have"),
                ),
            )
        }
        Err(Unread::Broken(e)) => {
            return (
                Invalid,
                refuse_unread(
                    StatusCode::BAD_REQUEST,
                    &format!("the body could not be read: {e}"),
                ),
            )
        }
    };

    if let Some(secret) = secret {
        let verdict = match sig {
            None => Err("the delivery is not signed"),
            Some(v) => signature_valid(secret.as_bytes(), &body, v),
        };
        if let Err(why) = verdict {
            tracing::warn!("webhook {name} of project {project}: refused a delivery: {why}");
            return (Unauthorized, refuse(StatusCode::UNAUTHORIZED, why));
        }
    }

    let github_event = header(headers, "x-github-event");
    let event_key = header(headers, "x-event-key");
    let sender = Sender::detect(github_event, event_key);
    let event = github_event.or(event_key).unwrap_or("push").to_string();
    let delivery_id = header(headers, "x-github-delivery")
        .or_else(|| header(headers, "x-request-uuid"))
        .or_else(|| header(headers, "x-request-id"))
        .map(|s| s.chars().take(200).collect::<String>());
    let kept: serde_json::Map<String, Value> = KEPT_HEADERS
        .iter()
        .filter_map(|h| header(headers, h).map(|v| (h.to_string(), Value::String(v.to_string()))))
        .collect();
    let mut delivery = NewDelivery {
        delivery_id,
        project: project.clone(),
        webhook: name.clone(),
        received_at: timefmt::now(),
        sender: sender.name().into(),
        event: event.clone(),
        headers: Value::Object(kept).to_string(),
        body,
        ..Default::default()
    };
    // Records a delivery that queues nothing; Err(503) when the database cannot take it.
    let record = |mut d: NewDelivery, verdict: Verdict, reason: Option<String>| {
        let store = st.host.store.clone();
        d.verdict = verdict;
        d.reason = reason;
        async move {
            match store.record_delivery(&d).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!("cannot record a webhook delivery: {e}");
                    let why = format!("cannot record the delivery: {e}");
                    Err(refuse(StatusCode::SERVICE_UNAVAILABLE, &why))
                }
            }
        }
    };

    // A refusal is answered as such whether or not its record could be written; an answer
    // that says ok is sent only once the delivery is recorded.
    let parsed: Value = match serde_json::from_slice(&delivery.body) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("the body is not JSON: {e}");
            let _ = record(delivery, Verdict::Refused, Some(reason.clone())).await;
            return (
                Recorded(Verdict::Refused),
                refuse(StatusCode::BAD_REQUEST, &reason),
            );
        }
    };
    let pushes = match decide(hook, sender, &event, &parsed, fields.as_ref()) {
        Decision::Ping => {
            if let Err(r) = record(delivery, Verdict::Ping, None).await {
                return (Unavailable, r);
            }
            return (
                Recorded(Verdict::Ping),
                answer(StatusCode::OK, json!({"ok": true, "ping": true})),
            );
        }
        Decision::Ignore(reason) => {
            if let Err(r) = record(delivery, Verdict::Ignored, Some(reason.clone())).await {
                return (Unavailable, r);
            }
            return (
                Recorded(Verdict::Ignored),
                answer(
                    StatusCode::OK,
                    json!({"ok": true, "builds": [], "ignored": reason}),
                ),
            );
        }
        Decision::Refuse(code, reason) => {
            let _ = record(delivery, Verdict::Refused, Some(reason.clone())).await;
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
            return (Recorded(Verdict::Refused), refuse(code, &reason));
        }
        Decision::Build(p) => p,
    };
    // `load` found the project, so its name is valid.
    let Ok(project) = ams_core::names::ProjectName::new(project) else {
        return (Invalid, refuse(StatusCode::NOT_FOUND, "no such webhook"));
    };
    let requests = build_requests(&project, pushes);
    delivery.verdict = Verdict::Accepted;
    match st.host.webhook(delivery, requests).await {
        Ok(WebhookOutcome::Queued(names)) => (
            Recorded(Verdict::Accepted),
            answer(StatusCode::ACCEPTED, json!({"ok": true, "builds": names})),
        ),
        Ok(WebhookOutcome::Duplicate) => (
            Recorded(Verdict::Duplicate),
            answer(
                StatusCode::OK,
                json!({"ok": true, "builds": [], "duplicate": true}),
            ),
        ),
        // A delivery that builds nothing is well-formed but unprocessable (the host records
        // it as refused); the rest as `HostError` decides.
        Err(HostError::Invalid(e)) => (
            Recorded(Verdict::Refused),
            refuse(StatusCode::UNPROCESSABLE_ENTITY, &e),
        ),
        Err(e) => (
            Unavailable,
            refuse(
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &e.to_string(),
            ),
        ),
    }
}

/// Warnings to print at start: webhooks that accept unsigned deliveries, broken configs, a
/// webhook_fields.json that is not strict JSON (read as the described system's docs wrote it).
pub fn startup_warnings(host: &HostHandle) -> Vec<String> {
    let mut out = Vec::new();
    for project in ams_host::project::list(&host.data) {
        let dir = host.data.project(&project).config();
        let Ok(text) = std::fs::read_to_string(dir.join(WebhooksConfig::FILE)) else {
            continue;
        };
        match WebhooksConfig::parse(&text) {
            Ok(cfg) => {
                for w in cfg
                    .in_webhooks
                    .iter()
                    .filter(|w| w.secret.as_deref().unwrap_or("").is_empty())
                {
                    out.push(format!(
                        "project {project}: webhook `{}` accepts unsigned deliveries (allow-unsigned); \
                         anyone who can reach the webhook port can start its builds (see {})",
                        w.name,
                        ams_core::compat::COMPAT_DOC
                    ));
                }
            }
            Err(e) => out.push(format!("project {project}: {e}")),
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(WebhookFields::FILE)) {
            match WebhookFields::parse_with_notes(&text) {
                Ok((_, notes)) => {
                    out.extend(notes.into_iter().map(|n| format!("project {project}: {n}")))
                }
                Err(e) => out.push(format!("project {project}: {e}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        let secret = b"It's a Secret to Everybody";
        assert!(signature_valid(
            secret,
            b"Hello, World!",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        )
        .is_ok());
        assert!(signature_valid(
            secret,
            b"Hello World!",
            "sha256=a4771c39fbe90f317c7824e83ddef3caae9cb3d976c214ace1f2937e133263c9"
        )
        .is_ok());
        assert!(signature_valid(
            secret,
            b"Hello, World?",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        )
        .is_err());
        assert_eq!(
            signature_valid(secret, b"x", "sha1=0123").unwrap_err(),
            "only sha256 signatures are accepted"
        );
        assert!(signature_valid(secret, b"x", "sha256=zz").is_err());
    }
}
