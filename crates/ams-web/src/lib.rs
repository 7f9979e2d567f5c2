//! HTTP for AMS-Build. Today: the webhook listener. Each area owns a `router()`; [`serve`] runs
//! a router on a listener until shutdown.

pub mod webhook;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `app` until `shutdown` fires, then lets requests in flight finish.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!("http server: {e}");
    }
}
