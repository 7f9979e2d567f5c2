//! HTTP for AMS-Build: webhooks, pages, the JSON API and HTTPS. Each area owns a `router()`; [`serve`] runs
//! a router on a listener until shutdown, with the limits an exposed port needs.

pub mod api;
pub mod auth;
pub mod badge;
pub mod limits;
pub mod manage;
pub mod metrics;
pub mod ops;
pub mod pages;
pub mod session;
pub mod tls;
pub mod view;
pub mod webhook;

use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::routing::future::RouteFuture;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A client has this long to send a request's headers (also the keep-alive idle limit), and
/// under TLS to finish the handshake.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive whole within this long after its headers; otherwise 408 and
/// the connection is closed.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A handler has this long to answer (with a status and headers: a download or a live stream
/// then runs on); otherwise 503.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; further ones wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections one client address (an IPv6 /64) may hold at once; more are closed on accept,
/// before TLS, so that one address cannot take every slot.
pub const MAX_PER_ADDRESS: usize = 64;
/// Sent data unacknowledged this long (a client that vanished or stopped reading) ends the
/// connection; live streams send a keep-alive every 20 s, so a dead viewer's stream ends too.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Under TLS, every answer tells browsers to use HTTPS only, for a year.
pub const HSTS: &str = "max-age=31536000";

/// Serves `app` until `shutdown` fires, then lets requests in flight finish (up to 10 s).
/// Slow senders are cut off: the TLS handshake and the headers each within [`HEADER_TIMEOUT`],
/// the body within [`BODY_TIMEOUT`], the handler's answer within [`HANDLER_TIMEOUT`], and at
/// most [`MAX_PER_ADDRESS`] of the [`MAX_CONNECTIONS`] connections come from one address. With
/// `tls`, every connection is HTTPS (a client speaking plain HTTP fails the handshake and is
/// dropped) and every answer carries HSTS. Every answer is counted in `metrics` by its route
/// template and status.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<ams_host::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let app = edge(app, tls.is_some(), metrics);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = limits::PerAddress::new(MAX_PER_ADDRESS);
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
                    // Out of file descriptors, say: pause rather than spin on the error.
                    tracing::warn!("http accept: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        // Over its address's cap the connection is closed at once, before any TLS work.
        let Some(slot) = per_address.take(peer.ip()) else {
            tracing::debug!("closed a connection from {peer}: its address holds {MAX_PER_ADDRESS}");
            continue;
        };
        limits::set_send_timeout(&stream, SEND_TIMEOUT);
        let svc = WithPeer {
            app: app.clone(),
            peer,
        };
        let stop = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _slot = slot;
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

/// The layers every listener's router gets once: the body deadline, the handler timeout,
/// under TLS HSTS on every answer (the timeouts' own included), and outermost the request
/// count of [`metrics::track`] (which sees those answers too).
fn edge(app: Router, tls: bool, metrics: Arc<ams_host::metrics::Metrics>) -> Router {
    let app = app
        .layer(axum::middleware::from_fn(|req, next| {
            limits::body_deadline(BODY_TIMEOUT, req, next)
        }))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            HANDLER_TIMEOUT,
        ));
    let app = if tls {
        app.layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        ))
    } else {
        app
    };
    app.layer(axum::middleware::from_fn_with_state(
        metrics,
        metrics::track,
    ))
}

/// The router for one connection: each request carries the client's address.
#[derive(Clone)]
struct WithPeer {
    app: Router,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(session::ClientAddr(self.peer));
        tower_service::Service::call(&mut self.app.clone(), req)
    }
}

async fn serve_conn<I>(io: I, svc: WithPeer, stop: CancellationToken)
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
