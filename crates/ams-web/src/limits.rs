//! The web edge's limits on slow and greedy clients: connections per client address, the
//! request-body deadline, and the send timeout that ends a dead client's connection.
//!
//! [`crate::serve`] applies them to every listener (pages, API and webhooks alike); the numbers
//! are the constants in the crate root.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as _, Frame, SizeHint};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// The address a client is counted under: IPv4 (also when it arrives IPv4-mapped on an IPv6
/// socket) as is, IPv6 by its /64, the block one machine or one customer usually holds.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Open connections per client address, each held by an [`AddressSlot`].
#[derive(Debug)]
pub struct PerAddress {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count, given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    map: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerAddress {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or None when its address holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = client_key(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            map: self.clone(),
            key,
        })
    }

    /// Connections `ip`'s address holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&client_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.map.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Sent data that stays unacknowledged this long (a client that vanished, or one that stopped
/// reading) makes the kernel end the connection, so the write fails and the response or live
/// stream ends.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn set_send_timeout(stream: &tokio::net::TcpStream, timeout: Duration) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(timeout)) {
        tracing::debug!("TCP_USER_TIMEOUT: {e}");
    }
}

/// Elsewhere the kernel's own retransmission limit ends such connections.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn set_send_timeout(_stream: &tokio::net::TcpStream, _timeout: Duration) {}

/// Middleware: a request's body must arrive whole within `timeout` of its headers. A body that
/// does not is answered 408 and the connection is closed (the unread rest is never waited for).
/// Requests without a body pass untouched.
pub async fn body_deadline(timeout: Duration, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let req = req.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            expired: flag,
        })
    });
    let res = next.run(req).await;
    if expired.load(Ordering::Relaxed) {
        return (
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            "the request body did not arrive in time\n",
        )
            .into_response();
    }
    res
}

/// A body that fails once its deadline passes, and says so through `expired`.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_per_ipv4_and_per_ipv6_64() {
        let m = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let s1 = m.take(a).unwrap();
        let s2 = m
            .take(mapped)
            .expect("an IPv4-mapped address is the IPv4 address");
        assert!(m.take(a).is_none(), "the third from one address");
        assert!(m.take("10.0.0.2".parse().unwrap()).is_some());
        drop(s1);
        let s3 = m.take(a).expect("a closed connection gives its slot back");
        drop((s2, s3));
        assert_eq!(m.held(a), 0);
        assert!(
            m.held.lock().unwrap().is_empty(),
            "no entry outlives its connections"
        );

        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _x = m.take(v6("2001:db8:1:2::1")).unwrap();
        let _y = m.take(v6("2001:db8:1:2:ffff::9")).unwrap();
        assert!(m.take(v6("2001:db8:1:2:abcd::1")).is_none(), "one /64");
        assert!(m.take(v6("2001:db8:1:3::1")).is_some(), "another /64");
    }
}
