//! The web edge against slow and greedy clients over plain HTTP: more stalled connections from
//! one address than the host serves at once, each with a partial request body. (The same over
//! TLS is in `tls.rs`.)

use crate::harness::*;
use crate::web::Web;
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// More than the host's connection slots (1024).
pub const STALLED: usize = 1100;
/// Connections one address may hold (`ams_web::MAX_PER_ADDRESS`).
pub const PER_ADDRESS: usize = 64;
/// A request body must arrive within this long (`ams_web::BODY_TIMEOUT`).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon another client must be answered while the attack goes on.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// A connection whose client went quiet; its answer (if any) is read without blocking.
pub struct Stalled<S> {
    pub s: S,
    pub got: Vec<u8>,
    pub closed: bool,
}

impl<S: Read> Stalled<S> {
    pub fn new(s: S) -> Self {
        Stalled {
            s,
            got: Vec::new(),
            closed: false,
        }
    }

    /// Takes what has arrived; notes the end of the connection (an EOF or a reset).
    pub fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        while !self.closed {
            match self.s.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
    }
}

/// A login whose headers promise 1000 bytes of body and whose client sends 10, then nothing.
pub fn partial_login(addr: &str) -> Vec<u8> {
    format!(
        "POST /ams-build/login HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nusername=a"
    )
    .into_bytes()
}

/// Polls every connection until `done` holds of them, or fails with `what` at the deadline.
pub fn wait_all<S: Read>(
    conns: &mut [Stalled<S>],
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Stalled<S>]) -> bool,
) {
    wait_for(what, timeout, || {
        conns.iter_mut().for_each(Stalled::poll);
        done(conns).then_some(())
    });
}

#[test]
fn stalled_partial_bodies_from_one_address_leave_the_site_to_everyone_else() {
    let w = Web::new(json!({}));
    let request = partial_login(&w.addr);
    let started = Instant::now();
    let mut stalled: Vec<Stalled<TcpStream>> = (0..STALLED)
        .map(|_| {
            let mut s = TcpStream::connect(&w.addr).unwrap();
            // The host may close it before the write; that is the point.
            let _ = s.write_all(&request);
            s.set_nonblocking(true).unwrap();
            Stalled::new(s)
        })
        .collect();

    // Another client is answered at once: the login page, a login, and the API.
    let t = Instant::now();
    let (st, head, page) = http_from(
        "127.0.0.2",
        &w.addr,
        "GET",
        "/ams-build/login",
        &[],
        b"",
        PROMPTLY,
    );
    assert_eq!(st, 200, "the login page during the attack: {head}");
    assert!(String::from_utf8_lossy(&page).contains("password"));
    assert!(
        !head.contains("strict-transport-security"),
        "no HSTS over plain HTTP"
    );
    let (st, head, _) = http_from(
        "127.0.0.2",
        &w.addr,
        "POST",
        "/ams-build/login",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )],
        &form(&[("username", "mod"), ("password", "correct horse battery")]),
        PROMPTLY,
    );
    assert_eq!(st, 303, "a login during the attack: {head}");
    let cookie = set_cookie(&head);
    let (st, _, me) = http_from(
        "127.0.0.2",
        &w.addr,
        "GET",
        "/ams-build/api/user",
        &[("Cookie", cookie)],
        b"",
        PROMPTLY,
    );
    assert_eq!(st, 200, "the API during the attack");
    assert!(String::from_utf8_lossy(&me).contains("\"mod\""));
    assert!(t.elapsed() < PROMPTLY, "answered in {:?}", t.elapsed());
    assert!(
        started.elapsed() < BODY_TIMEOUT,
        "answered only after the body timeout could free slots"
    );

    // The address's connections over its cap were closed at once, unanswered; the rest wait.
    wait_all(
        &mut stalled,
        "the connections over the address's cap to be closed",
        PROMPTLY,
        |c| c.iter().filter(|s| s.closed).count() >= STALLED - PER_ADDRESS,
    );
    let open = stalled.iter().filter(|s| !s.closed).count();
    assert!(
        started.elapsed() < BODY_TIMEOUT,
        "too slow to tell the cap from the body timeout"
    );
    assert_eq!(open, PER_ADDRESS, "connections the address holds");
    assert!(stalled
        .iter()
        .filter(|s| s.closed)
        .all(|s| s.got.is_empty()));

    // The body timeout ends the ones held: 408, then the connection closes.
    wait_all(
        &mut stalled,
        "the body timeout to end the stalled requests",
        BODY_TIMEOUT + Duration::from_secs(15),
        |c| c.iter().all(|s| s.closed),
    );
    let timed_out = stalled
        .iter()
        .filter(|s| s.got.starts_with(b"HTTP/1.1 408"))
        .count();
    assert_eq!(timed_out, PER_ADDRESS, "each held request is answered 408");
    assert!(
        started.elapsed() >= BODY_TIMEOUT,
        "ended before the body timeout"
    );

    // The address got its slots back.
    let (st, _, _) = http_from(
        "127.0.0.1",
        &w.addr,
        "GET",
        "/ams-build/login",
        &[],
        b"",
        PROMPTLY,
    );
    assert_eq!(st, 200);
}

#[test]
fn a_body_that_trickles_in_is_cut_at_the_body_timeout() {
    let w = Web::new(json!({}));
    let mut s = TcpStream::connect(&w.addr).unwrap();
    s.write_all(&partial_login(&w.addr)).unwrap();
    let sent = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // One byte a second keeps the connection busy but never finishes the body.
    let mut got = Vec::new();
    let deadline = sent + BODY_TIMEOUT + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "the trickle was never cut");
        let _ = s.write_all(b"x");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(
        sent.elapsed() >= BODY_TIMEOUT - Duration::from_secs(1),
        "cut after {:?}",
        sent.elapsed()
    );
}
