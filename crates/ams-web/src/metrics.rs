//! `GET /metrics`: the host's metrics ([`ams_host::metrics::Metrics`]) in the Prometheus text
//! format, and [`track`], the middleware that counts every answered request by its route
//! template, method and status.
//!
//! Without `metrics_token` in web_conf.json the endpoint is open, like `/healthz`; with it, a
//! request must carry `Authorization: Bearer <token>` (compared in constant time, as SHA-256
//! digests so the length does not show either), else 401.

use crate::api::ApiState;
use ams_host::metrics::Metrics;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// `GET /metrics`, on the web interface's listener beside `/healthz`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Whether `headers` carry `Authorization: Bearer <token>`. Constant time in the token: both
/// sides are hashed first, and the digests compared without an early exit.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let (a, b) = (
        Sha256::digest(sent.as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    let differ = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    differ == 0 && !sent.is_empty()
}

async fn metrics(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(token) = st.conf.metrics_token.as_deref() {
        if !bearer_matches(&headers, token) {
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (header::WWW_AUTHENTICATE, "Bearer"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                "send the metrics token: Authorization: Bearer <metrics_token>\n",
            )
                .into_response();
        }
    }
    (
        [
            (header::CONTENT_TYPE, ams_host::metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        st.host.metrics.encode(),
    )
        .into_response()
}

/// Counts the answered request under the route template that matched (never the path the
/// client sent), its method and its status. Applied as the outermost layer of every
/// listener's router, so answers of the edge's own limits (408, 503) are counted too.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let res = next.run(req).await;
    m.http_request(route.as_deref(), method.as_str(), res.status().as_u16());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let t = "0123456789abcdef";
        assert!(bearer_matches(&with("Bearer 0123456789abcdef"), t));
        assert!(!bearer_matches(&with("Bearer 0123456789abcdeF"), t));
        assert!(!bearer_matches(&with("Bearer 0123456789abcde"), t));
        assert!(!bearer_matches(&with("Basic 0123456789abcdef"), t));
        assert!(!bearer_matches(&with("Bearer "), t));
        assert!(!bearer_matches(&HeaderMap::new(), t));
    }
}
