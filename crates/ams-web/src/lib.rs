//! HTTP for AMS-Build: webhooks, pages, the JSON API and HTTPS. Each area owns a `router()`; [`serve`] runs
//! a router on a listener until shutdown, with the limits an exposed port needs.

pub mod api;
pub mod auth;
pub mod manage;
pub mod pages;
pub mod session;
pub mod tls;
pub mod webhook;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A client has this long to send a request's headers (also the keep-alive idle limit).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves `app` until `shutdown` fires, then lets requests in flight finish (up to 10 s).
/// Slow senders are cut off: the TLS handshake and the headers each within [`HEADER_TIMEOUT`],
/// and the router's own timeout covers the body and the handler. With `tls`, every connection
/// is HTTPS; a client speaking plain HTTP fails the handshake and is dropped.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("http accept: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let svc = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(session::ClientAddr(peer))),
        );
        let stop = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_conn(TokioIo::new(stream), svc, stop).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)) => r,
                        _ = stop.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(s)) => serve_conn(TokioIo::new(s), svc, stop).await,
                        Ok(Err(e)) => tracing::debug!("tls handshake with {peer}: {e}"),
                        Err(_) => tracing::debug!("tls handshake with {peer}: timed out"),
                    }
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(12), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

type Svc = TowerToHyperService<Router>;

async fn serve_conn<I>(io: I, svc: Svc, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}
