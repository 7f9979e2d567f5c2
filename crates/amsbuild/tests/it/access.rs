//! The access matrix of the web interface: each level × each page, form, download and live
//! stream × own and other project, through real sessions; and live streams end with their
//! session. (The API's matrix is in `api.rs`.)

use crate::harness::*;
use crate::web::{sse, Web};
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const PW: &str = "correct horse battery";

/// Opens a GET and returns the status line's code, leaving the body unread.
fn status_of(addr: &str, path: &str, cookie: &str) -> (u16, std::net::TcpStream) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let code = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, s)
}

#[test]
fn the_access_matrix_of_pages_downloads_and_live_streams() {
    require_docker();
    let mut h = TestHost::new();
    for p in ["mine", "other"] {
        let hello = format!("echo hello-from-{p}");
        h.project(
            p,
            &pipeline(json!([stage("s", &[&hello, "echo made > Builds/out.txt"])])),
        );
    }
    for (name, level, projects) in [
        ("u_none", "0", "mine"),
        ("u_user", "1", "mine"),
        ("u_webhook", "2", "mine"),
        ("u_mod", "3", "mine"),
        ("u_admin", "4", "mine"),
        ("u_server", "5", ""),
    ] {
        add_user(&h, name, level, projects, PW);
    }
    h.start();
    let builds: Vec<(String, String)> = ["mine", "other"]
        .iter()
        .map(|p| (p.to_string(), h.build(p)))
        .collect();
    for (p, b) in &builds {
        let r = h.wait_status(p, b, Duration::from_secs(120));
        assert_eq!(r["status"], "pass", "{}", h.log(p, b));
        assert!(r["archive_name"].is_string(), "{r}");
    }
    let addr = h.web_addr();
    let w = Web { h, addr };

    // NO AUTH and WEBHOOK accounts never get a session.
    for u in ["u_none", "u_webhook"] {
        assert_eq!(w.login(u, PW, "", None).0, 401, "{u}");
    }

    // Without a session: pages send to the login page, everything else is 401.
    let (p, b) = &builds[0];
    for path in [
        "/ams-build/".to_string(),
        format!("/ams-build/build/{p}/{b}"),
        format!("/ams-build/admin/{p}"),
        "/ams-build/users".to_string(),
        "/ams-build/account".to_string(),
    ] {
        let (st, head, _) = w.get(&path, "");
        assert_eq!(st, 303, "{path}");
        assert!(
            head.contains("location: /ams-build/login"),
            "{path}: {head}"
        );
    }
    for path in [
        "/ams-build/panels".to_string(),
        "/ams-build/events".to_string(),
        format!("/ams-build/build/{p}/{b}/stages"),
        format!("/ams-build/build/{p}/{b}/stream"),
        format!("/ams-build/build/{p}/{b}/log?before=1"),
        format!("/ams-build/output/{p}/{b}"),
        format!("/ams-build/dl/{p}/{b}"),
    ] {
        assert_eq!(w.get(&path, "").0, 401, "{path}");
    }

    // (user, level)
    let rows = [("u_user", 1), ("u_mod", 3), ("u_admin", 4), ("u_server", 5)];
    for (who, level) in rows {
        let cookie = w.session(who, PW);
        let (st, _, dash) = w.get("/ams-build/", &cookie);
        assert_eq!(st, 200, "{who}");
        assert_eq!(
            status_of(&w.addr, "/ams-build/events", &cookie).0,
            200,
            "{who} events"
        );
        assert_eq!(w.get("/ams-build/account", &cookie).0, 200, "{who}");
        assert_eq!(
            w.get("/ams-build/users", &cookie).0,
            if level >= 4 { 200 } else { 403 },
            "{who} users page"
        );
        // Project creation: SERVER ADMIN reaches the name check, the others are refused.
        assert_eq!(
            w.post_form(
                "/ams-build/projects",
                &cookie,
                &[("name", "../x"), ("git", "")]
            )
            .0,
            if level == 5 { 400 } else { 403 },
            "{who} create project"
        );
        for (p, b) in &builds {
            let own = p == "mine";
            let see = own || level == 5;
            let op = see && level >= 3;
            let admin = see && level >= 4;
            let ctx = format!("{who} on {p}");
            let hidden = |code: u16| if see { code } else { 404 };
            let (_, _, builds_panel) = w.get(&format!("/ams-build/?project={p}"), &cookie);
            assert_eq!(
                builds_panel.contains(&format!("/ams-build/build/{p}/{b}\"")),
                see,
                "{ctx}: the dashboard lists the build"
            );
            assert_eq!(
                dash.contains(&format!("/ams-build/?project={p}\"")),
                see,
                "{ctx}: the projects panel"
            );
            assert_eq!(
                dash.contains(&format!("id=\"trigger-{p}\"")),
                op,
                "{ctx}: form"
            );
            let (st, _, page) = w.get(&format!("/ams-build/project/{p}"), &cookie);
            assert_eq!(st, hidden(200), "{ctx}: project page");
            assert_eq!(
                page.contains(&format!("/ams-build/build/{p}/{b}\"")),
                see,
                "{ctx}"
            );
            assert_eq!(page.contains(&format!("id=\"trigger-{p}\"")), op, "{ctx}");
            assert_eq!(
                page.contains(&format!("/ams-build/admin/{p}\"")),
                admin,
                "{ctx}: administration link"
            );
            let (_, _, list) = w.get("/ams-build/projects", &cookie);
            assert_eq!(
                list.contains(&format!("/ams-build/project/{p}\"")),
                see,
                "{ctx}: the projects page"
            );
            let (st, _, page) = w.get(&format!("/ams-build/build/{p}/{b}"), &cookie);
            assert_eq!(st, hidden(200), "{ctx}: build page");
            if see {
                assert!(page.contains(&format!("hello-from-{p}")), "{ctx}");
                assert_eq!(page.contains("Delete output"), op, "{ctx}: delete button");
            } else {
                assert!(!page.contains(&format!("hello-from-{p}")), "{ctx}");
            }
            assert_eq!(
                w.get(&format!("/ams-build/build/{p}/{b}/stages"), &cookie)
                    .0,
                hidden(200),
                "{ctx}: stages"
            );
            // The live log stream.
            let path = format!("/ams-build/build/{p}/{b}/stream?from=0");
            if see {
                let (log, end) = sse(&w.addr, &path, &cookie, Duration::from_secs(30));
                assert_eq!(end.as_deref(), Some("pass"), "{ctx}: stream");
                assert!(log.contains(&format!("hello-from-{p}")), "{ctx}");
            } else {
                assert_eq!(w.get(&path, &cookie).0, 404, "{ctx}: stream");
            }
            assert_eq!(
                w.get(&format!("/ams-build/build/{p}/{b}/log?before=1"), &cookie)
                    .0,
                hidden(200),
                "{ctx}: earlier log lines"
            );
            // Downloads.
            let (st, head, body) = http_raw(
                &w.addr,
                &format!("/ams-build/output/{p}/{b}"),
                &[("Cookie", cookie.clone())],
            );
            assert_eq!(st, hidden(200), "{ctx}: log download");
            if see {
                assert!(head.contains("content-type: text/plain"));
                assert!(String::from_utf8_lossy(&body).contains(&format!("hello-from-{p}")));
            }
            let (st, head, body) = http_raw(
                &w.addr,
                &format!("/ams-build/dl/{p}/{b}"),
                &[("Cookie", cookie.clone())],
            );
            assert_eq!(st, hidden(200), "{ctx}: 7z download");
            if see {
                assert!(head.contains("content-disposition: attachment"), "{head}");
                assert!(body.starts_with(b"7z\xbc\xaf\x27\x1c"), "{ctx}: a 7z");
            }
            assert_eq!(
                w.get(&format!("/ams-build/admin/{p}"), &cookie).0,
                if !see {
                    404
                } else if admin {
                    200
                } else {
                    403
                },
                "{ctx}: admin page"
            );
            // Forms: refused with 403 when seen but not allowed, 404 when not seen.
            let refused = if see { 403 } else { 404 };
            let (st, _, _) = w.post_form(
                &format!("/ams-build/projects/{p}/build"),
                &cookie,
                &[("branch", ""), ("commit", "")],
            );
            assert_eq!(st, if op { 303 } else { refused }, "{ctx}: trigger");
            // Cancel of a finished build: allowed users reach the host, which says no.
            let (st, _, _) = w.post_form(&format!("/ams-build/build/{p}/{b}/cancel"), &cookie, &[]);
            assert_eq!(st, if op { 409 } else { refused }, "{ctx}: cancel");
            if !op {
                let (st, _, _) = w.post_form(
                    &format!("/ams-build/build/{p}/{b}/delete-output"),
                    &cookie,
                    &[],
                );
                assert_eq!(st, refused, "{ctx}: delete output");
            }
        }
    }
    // Deleting output, by one who may: the 7z is gone for everyone.
    let cookie = w.session("u_mod", PW);
    let (p, b) = &builds[0];
    let (st, _, _) = w.post_form(
        &format!("/ams-build/build/{p}/{b}/delete-output"),
        &cookie,
        &[],
    );
    assert_eq!(st, 303);
    assert_eq!(w.get(&format!("/ams-build/dl/{p}/{b}"), &cookie).0, 404);
}

#[test]
fn live_streams_end_with_their_session() {
    let w = Web::new(json!({}));
    let cookie = w.session("mod", PW);
    let (st, mut events) = status_of(&w.addr, "/ams-build/events", &cookie);
    assert_eq!(st, 200);
    let other = w.session("mod", PW);
    let (_, mut alive) = status_of(&w.addr, "/ams-build/events", &other);
    let (st, _, _) = w.post_form("/ams-build/logout", &cookie, &[]);
    assert_eq!(st, 303);
    // A change wakes the stream; it finds the session gone and ends.
    w.h.build("mine");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    let mut events_seen = String::new();
    // The end is the connection's close or the body's last chunk.
    while !events_seen.ends_with("0\r\n\r\n") {
        match events.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => events_seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the event stream outlived its session: {events_seen}"
        );
    }
    // A stream whose session lives on keeps going: the change reaches it.
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains("event: change") {
        if let Ok(n) = alive.read(&mut buf) {
            assert!(n > 0, "the live session's stream closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(Instant::now() < deadline, "no change event: {seen}");
    }
    assert!(!seen.ends_with("0\r\n\r\n"));
}
