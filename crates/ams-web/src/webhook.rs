//! The webhook listener: `POST /{web_root}/request?name={webhook}&project={project}`.
//!
//! The handler verifies, records and queues, and that is all: it answers 202 with the queued
//! build names, 200 for pings and for pushes it ignores, and a 4xx with a short reason for a
//! refusal. The signature (HMAC-SHA256 over the raw body, compared in constant time) is checked
//! before the body is parsed; a forged or unsigned delivery leaves no trace but a log line.
//! An unknown project and an unknown webhook get the same answer.

use ams_core::names::validate_project_name;
use ams_core::webhooks::{decide, Decision, Sender, WebhookFields, WebhooksConfig};
use ams_host::host::{build_requests, WebhookOutcome};
use ams_host::{timefmt, HostHandle};
use ams_store::NewDelivery;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// GitHub delivers at most 25 MB; larger bodies get 413 before anything is read or parsed.
pub const MAX_BODY: usize = 25 * 1024 * 1024;
/// A sender has this long to deliver its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct WebhookState {
    pub host: HostHandle,
}

/// The router for the listener, under `/{web_root}/request`.
pub fn router(state: WebhookState, web_root: &str) -> Router {
    Router::new()
        .route(&format!("/{web_root}/request"), post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

fn answer(status: StatusCode, v: Value) -> Response {
    (status, Json(v)).into_response()
}

fn refuse(status: StatusCode, reason: &str) -> Response {
    answer(status, json!({"ok": false, "reason": reason}))
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

/// Loads a project's webhook configuration; `None` when the project or file does not exist
/// or is broken (logged), and the caller must not tell which.
fn load(host: &HostHandle, project: &str) -> Option<(WebhooksConfig, Option<WebhookFields>)> {
    if validate_project_name(project).is_err() || !ams_host::project::exists(&host.data, project) {
        return None;
    }
    match ams_host::project::webhooks(&host.data.project(project)) {
        Ok(x) => Some(x),
        Err(e) => {
            if !e.contains("No such file") {
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
    State(st): State<WebhookState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (Some(name), Some(project)) = (q.get("name"), q.get("project")) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the query must name the webhook and the project: ?name=…&project=…",
        );
    };
    let ct = header(&headers, "content-type").unwrap_or("");
    if !ct
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the payload as application/json (set the webhook's content type)",
        );
    }
    let unknown = || refuse(StatusCode::NOT_FOUND, "unknown webhook");
    let Some((cfg, fields)) = load(&st.host, project) else {
        return unknown();
    };
    let Some(hook) = cfg.in_webhook(name) else {
        return unknown();
    };

    if let Some(secret) = hook.secret.as_deref().filter(|s| !s.is_empty()) {
        let sig =
            header(&headers, "x-hub-signature-256").or_else(|| header(&headers, "x-hub-signature"));
        let verdict = match sig {
            None => Err("the delivery is not signed"),
            Some(v) => signature_valid(secret.as_bytes(), &body, v),
        };
        if let Err(why) = verdict {
            tracing::warn!("webhook {name} of project {project}: refused a delivery: {why}");
            return refuse(StatusCode::UNAUTHORIZED, why);
        }
    }

    let github_event = header(&headers, "x-github-event");
    let event_key = header(&headers, "x-event-key");
    let sender = Sender::detect(github_event, event_key);
    let event = github_event.or(event_key).unwrap_or("push").to_string();
    let delivery_id = header(&headers, "x-github-delivery")
        .or_else(|| header(&headers, "x-request-uuid"))
        .or_else(|| header(&headers, "x-request-id"))
        .map(|s| s.chars().take(200).collect::<String>());
    let kept: serde_json::Map<String, Value> = KEPT_HEADERS
        .iter()
        .filter_map(|h| header(&headers, h).map(|v| (h.to_string(), Value::String(v.to_string()))))
        .collect();
    let mut delivery = NewDelivery {
        delivery_id,
        project: project.clone(),
        webhook: name.clone(),
        received_at: timefmt::now(),
        sender: sender.name().into(),
        event: event.clone(),
        headers: Value::Object(kept).to_string(),
        body: body.to_vec(),
        ..Default::default()
    };
    let record = |mut d: NewDelivery, verdict: &str, reason: Option<String>| {
        let store = st.host.store.clone();
        d.verdict = verdict.into();
        d.reason = reason;
        async move {
            if let Err(e) = store.record_delivery(&d).await {
                tracing::error!("cannot record a webhook delivery: {e}");
            }
        }
    };

    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("the body is not JSON: {e}");
            record(delivery, "refused", Some(reason.clone())).await;
            return refuse(StatusCode::BAD_REQUEST, &reason);
        }
    };
    let pushes = match decide(hook, sender, &event, &parsed, fields.as_ref()) {
        Decision::Ping => {
            record(delivery, "ping", None).await;
            return answer(StatusCode::OK, json!({"ok": true, "ping": true}));
        }
        Decision::Ignore(reason) => {
            record(delivery, "ignored", Some(reason.clone())).await;
            return answer(
                StatusCode::OK,
                json!({"ok": true, "builds": [], "ignored": reason}),
            );
        }
        Decision::Refuse(code, reason) => {
            record(delivery, "refused", Some(reason.clone())).await;
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
            return refuse(code, &reason);
        }
        Decision::Build(p) => p,
    };
    let requests = build_requests(project, pushes);
    delivery.verdict = "accepted".into();
    match st.host.webhook(delivery, requests).await {
        Ok(WebhookOutcome::Queued(names)) => {
            answer(StatusCode::ACCEPTED, json!({"ok": true, "builds": names}))
        }
        Ok(WebhookOutcome::Duplicate) => answer(
            StatusCode::OK,
            json!({"ok": true, "builds": [], "duplicate": true}),
        ),
        Err(e) if e.contains("shutting down") => refuse(StatusCode::SERVICE_UNAVAILABLE, &e),
        Err(e) => refuse(StatusCode::UNPROCESSABLE_ENTITY, &e),
    }
}

/// Warnings to print at start: webhooks that accept unsigned deliveries, broken configs.
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
                         anyone who can reach the webhook port can start its builds",
                        w.name
                    ));
                }
            }
            Err(e) => out.push(format!("project {project}: {e}")),
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
