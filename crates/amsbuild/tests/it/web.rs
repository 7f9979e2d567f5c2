//! Browser sessions over real HTTP: login and its cookie, CSRF, logout, expiry, throttling,
//! redirects that stay on the site, and escaping.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

pub struct Web {
    pub h: TestHost,
    pub addr: String,
}

impl Web {
    pub fn new(conf: serde_json::Value) -> Self {
        let mut h = TestHost::with_conf(conf);
        h.project(
            "mine",
            &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
        );
        add_user(&h, "mod", "3", "mine", "correct horse battery");
        add_user(&h, "hook", "2", "mine", "correct horse battery");
        h.start();
        let addr = h.web_addr();
        Web { h, addr }
    }

    pub fn login(
        &self,
        user: &str,
        pw: &str,
        redirect: &str,
        origin: Option<String>,
    ) -> (u16, String) {
        let mut headers = vec![(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let (st, head, _) = http_full(
            &self.addr,
            "POST",
            "/ams-build/login",
            &headers,
            &form(&[
                ("username", user),
                ("password", pw),
                ("page_redirect", redirect),
            ]),
        );
        (st, head)
    }

    pub fn cookie(head: &str) -> String {
        set_cookie(head)
    }

    pub fn get(&self, path: &str, cookie: &str) -> (u16, String, String) {
        let (st, head, body) = http_raw(&self.addr, path, &[("Cookie", cookie.to_string())]);
        (st, head, String::from_utf8_lossy(&body).to_string())
    }

    /// A form POST from our own pages: the cookie, the CSRF token and our Origin.
    pub fn post_form(
        &self,
        path: &str,
        cookie: &str,
        pairs: &[(&str, &str)],
    ) -> (u16, String, String) {
        let csrf = self.csrf(cookie);
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(pairs);
        let (st, head, body) = http_full(
            &self.addr,
            "POST",
            path,
            &[
                ("Cookie", cookie.to_string()),
                ("Content-Type", "application/x-www-form-urlencoded".into()),
                ("Origin", format!("http://{}", self.addr)),
            ],
            &form(&all),
        );
        (st, head, String::from_utf8_lossy(&body).to_string())
    }

    /// Logs in and returns the session cookie.
    pub fn session(&self, user: &str, pw: &str) -> String {
        let (st, head) = self.login(user, pw, "", None);
        assert_eq!(st, 303, "login of {user}: {head}");
        Self::cookie(&head)
    }

    pub fn csrf(&self, cookie: &str) -> String {
        let (_, _, page) = self.get("/ams-build/", cookie);
        let i = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
        page[i..i + 64].to_string()
    }
}

#[test]
fn login_sets_a_safe_cookie_and_logout_really_ends_the_session() {
    let w = Web::new(json!({}));
    let (st, head) = w.login("mod", "correct horse battery", "output/mine/x", None);
    assert_eq!(st, 303, "{head}");
    assert!(
        head.contains("location: /ams-build/output/mine/x"),
        "{head}"
    );
    let set = head.lines().find(|l| l.starts_with("set-cookie:")).unwrap();
    assert!(set.contains("ams_session="));
    assert!(
        set.contains("httponly") && set.contains("samesite=lax") && set.contains("path=/"),
        "{set}"
    );
    let cookie = Web::cookie(&head);
    let id = cookie.split('=').nth(1).unwrap();
    assert_eq!(id.len(), 64, "256 random bits");
    let (st, _, me) = w.get("/ams-build/api/user", &cookie);
    assert_eq!(st, 200);
    assert!(me.contains("\"mod\""));
    // A second login gets a new id; the session store never holds the id itself.
    let (_, head2) = w.login("mod", "correct horse battery", "", None);
    assert_ne!(Web::cookie(&head2), cookie);
    let db = std::fs::read(w.h.data.join("ams.db-wal")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&db).contains(id),
        "session id stored in the clear"
    );

    // Logout needs the CSRF token, then the cookie is dead.
    let cookie2 = Web::cookie(&head2);
    let (st, _, _) = http_full(
        &w.addr,
        "POST",
        "/ams-build/logout",
        &[
            ("Cookie", cookie2.clone()),
            ("Content-Type", "application/x-www-form-urlencoded".into()),
        ],
        &form(&[("csrf", "wrong")]),
    );
    assert_eq!(st, 403);
    let csrf = w.csrf(&cookie2);
    let (st, head, _) = http_full(
        &w.addr,
        "POST",
        "/ams-build/logout",
        &[
            ("Cookie", cookie2.clone()),
            ("Content-Type", "application/x-www-form-urlencoded".into()),
        ],
        &form(&[("csrf", &csrf)]),
    );
    assert_eq!(st, 303);
    assert!(head.contains("max-age=0"));
    assert_eq!(w.get("/ams-build/api/user", &cookie2).0, 401);
}

#[test]
fn state_changes_with_a_cookie_need_the_csrf_token_and_our_origin() {
    let w = Web::new(json!({}));
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    let csrf = w.csrf(&cookie);
    let post = |headers: Vec<(&str, String)>| {
        let mut h = vec![
            ("Cookie", cookie.clone()),
            ("Content-Type", "application/json".to_string()),
        ];
        h.extend(headers);
        http_full(
            &w.addr,
            "POST",
            "/ams-build/api/projects/name/mine/build",
            &h,
            b"{}",
        )
        .0
    };
    assert_eq!(post(vec![]), 403, "no token");
    assert_eq!(
        post(vec![("X-CSRF-Token", "0".repeat(64))]),
        403,
        "wrong token"
    );
    assert_eq!(
        post(vec![
            ("X-CSRF-Token", csrf.clone()),
            ("Origin", "http://evil.example".into())
        ]),
        403
    );
    assert_eq!(
        post(vec![
            ("X-CSRF-Token", csrf.clone()),
            ("Origin", format!("http://{}", w.addr))
        ]),
        202
    );
    // A GET never changes state: there is no GET that triggers.
    assert_eq!(
        w.get("/ams-build/api/projects/name/mine/build", &cookie).0,
        405
    );
}

#[test]
fn logins_are_throttled_generic_and_never_redirect_off_site() {
    let w = Web::new(json!({}));
    // Unknown user and wrong password answer alike.
    let (a, _) = w.login("nobody", "whatever", "", None);
    let (b, _) = w.login("mod", "wrong password", "", None);
    assert_eq!((a, b), (401, 401));
    // WEBHOOK accounts cannot log in.
    assert_eq!(w.login("hook", "correct horse battery", "", None).0, 401);
    // Off-site redirects fall back to the start page.
    for evil in [
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
    ] {
        let (st, head) = w.login("mod", "correct horse battery", evil, None);
        assert_eq!(st, 303);
        assert!(
            head.contains("location: /ams-build/\r\n")
                || head.contains("location: /ams-build/\n")
                || head.lines().any(|l| l.trim() == "location: /ams-build/"),
            "{evil}: {head}"
        );
    }
    // A cross-site login form is refused.
    assert_eq!(
        w.login(
            "mod",
            "correct horse battery",
            "",
            Some("http://evil.example".into())
        )
        .0,
        403
    );
    // After five failures the account is locked, even with the right password.
    for _ in 0..5 {
        assert_eq!(w.login("mod", "wrong again", "", None).0, 401);
    }
    assert_eq!(w.login("mod", "correct horse battery", "", None).0, 429);
}

#[test]
fn logins_are_throttled_per_address_across_accounts() {
    let w = Web::new(json!({}));
    // Twenty failures spread over many names from one address (no name reaches its own limit)…
    for i in 0..20 {
        let (st, _) = w.login(&format!("guess{}", i % 10), "wrong", "", None);
        assert_eq!(st, 401, "failure {i}");
    }
    // …lock the address, even for an account that never failed and the right password, with
    // the same generic page.
    let (st, _) = w.login("mod", "correct horse battery", "", None);
    assert_eq!(st, 429);
    let (_, _, body) = http_full(
        &w.addr,
        "POST",
        "/ams-build/login",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )],
        &form(&[("username", "mod"), ("password", "correct horse battery")]),
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("too many failed logins"), "{body}");
    assert!(
        !body.contains("mod"),
        "the page does not say which limit was hit"
    );
}

/// Logs in with every `(user, password)` at once, from `src`: each connection sends its whole
/// request but the last byte, then all the last bytes go together. Returns each answer's
/// status and page, in order.
fn logins_at_once(addr: &str, src: &str, creds: &[(String, String)]) -> Vec<(u16, String)> {
    use std::io::{Read, Write};
    let start = std::sync::Arc::new(std::sync::Barrier::new(creds.len()));
    let threads: Vec<_> = creds
        .iter()
        .map(|(user, pw)| {
            let body = form(&[("username", user), ("password", pw)]);
            let mut req = format!(
                "POST /ams-build/login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            let (addr, src, start) = (addr.to_string(), src.to_string(), start.clone());
            std::thread::spawn(move || {
                let mut s = connect_from(&src, &addr);
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let (head, last) = req.split_at(req.len() - 1);
                s.write_all(head).unwrap();
                start.wait();
                s.write_all(last).unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                let text = String::from_utf8_lossy(&out).to_string();
                let status = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                (status, text)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn count(answers: &[(u16, String)], status: u16) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

#[test]
fn concurrent_guesses_for_one_account_get_only_the_throttles_checks() {
    let w = Web::new(json!({}));
    // Forty guesses at once: the five the account allows are checked, the rest refused unchecked.
    let guesses: Vec<_> = (0..40)
        .map(|i| ("mod".to_string(), format!("wrong guess {i}")))
        .collect();
    let answers = logins_at_once(&w.addr, "127.0.0.1", &guesses);
    assert_eq!(
        (count(&answers, 401), count(&answers, 429)),
        (5, 35),
        "checked and refused: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .all(|(_, page)| page.contains("too many failed logins")));
    // The right password, sent now within the window, does not log in, from any address.
    for src in ["127.0.0.1", "127.0.0.2"] {
        let right = [("mod".to_string(), "correct horse battery".to_string())];
        let (st, page) = logins_at_once(&w.addr, src, &right).remove(0);
        assert_eq!(st, 429, "from {src}: {page}");
        assert!(page.contains("too many failed logins"), "{page}");
        assert!(!page.to_ascii_lowercase().contains("set-cookie"), "{page}");
    }
}

#[test]
fn concurrent_guesses_from_one_address_get_only_the_throttles_checks() {
    let w = Web::new(json!({}));
    // Forty guesses at once over forty names (no name reaches its own limit): the address's
    // twenty are checked.
    let guesses: Vec<_> = (0..40)
        .map(|i| (format!("guess{i}"), "wrong".to_string()))
        .collect();
    let answers = logins_at_once(&w.addr, "127.0.0.1", &guesses);
    assert_eq!(
        (count(&answers, 401), count(&answers, 429)),
        (20, 20),
        "checked and refused: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    // That address is locked even for the right password of an account that never failed…
    let right = [("mod".to_string(), "correct horse battery".to_string())];
    let (st, page) = logins_at_once(&w.addr, "127.0.0.1", &right).remove(0);
    assert_eq!(st, 429, "{page}");
    assert!(page.contains("too many failed logins"), "{page}");
    // …while another address logs in.
    let (st, page) = logins_at_once(&w.addr, "127.0.0.2", &right).remove(0);
    assert_eq!(st, 303, "{page}");
}

#[test]
fn the_dashboard_pages_builds_and_stays_small_with_many_projects() {
    let w = Web::new(json!({}));
    let mut names = Vec::new();
    for _ in 0..45 {
        names.push(w.h.build("mine"));
    }
    for n in &names {
        w.h.wait_status("mine", n, Duration::from_secs(60));
    }
    // 51 projects in all, as the benchmark's dashboard has.
    let mut projects = String::from("mine");
    for i in 0..50 {
        let p = format!("project-{i:02}");
        w.h.project(
            &p,
            &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
        );
        projects.push_str(&format!(",{p}"));
    }
    assert!(w
        .h
        .cli(&["user", "set", "mod", "--projects", &projects])
        .status
        .success());
    let cookie = w.session("mod", "correct horse battery");
    let (_, _, dash) = w.get("/ams-build/", &cookie);
    assert!(dash.len() <= 100 * 1024, "{} bytes", dash.len());
    assert!(dash.contains("project-49"), "every project is listed");
    // A SERVER ADMIN's view of the same, with whatever it adds per project, stays as small.
    cli_with_stdin(
        &w.h,
        &["user", "add", "root", "--level", "5", "--password-stdin"],
        "correct horse battery\n",
    );
    let root = w.session("root", "correct horse battery");
    let (_, _, all) = w.get("/ams-build/", &root);
    assert!(all.len() <= 100 * 1024, "{} bytes", all.len());
    assert!(all.contains("project-49") && all.contains("Builds of mine"));
    // The most recently built project is shown, newest first, 20 per page.
    assert!(dash.contains("Builds of mine"));
    assert!(dash.contains(&format!("/ams-build/build/mine/{}\"", names[44])));
    assert!(!dash.contains(&format!("/ams-build/build/mine/{}\"", names[24])));
    assert!(dash.contains("/ams-build/?project=mine&amp;page=2\">older"));
    let (_, _, last) = w.get("/ams-build/?project=mine&page=3", &cookie);
    assert!(last.contains(&format!("/ams-build/build/mine/{}\"", names[0])));
    assert!(last.contains("page=2\">← newer") && !last.contains("older →"));
    // The live refresh asks for the same view.
    assert!(last.contains("data-src=\"/ams-build/panels?project=mine&amp;page=3\""));
    let (_, _, panel) = w.get("/ams-build/panels?project=mine&page=3", &cookie);
    assert!(panel.contains(&format!("/ams-build/build/mine/{}\"", names[0])));
    // Another project's (empty) builds on request.
    let (_, _, other) = w.get("/ams-build/?project=project-07", &cookie);
    assert!(other.contains("Builds of project-07") && !other.contains("older →"));
}

#[test]
fn sessions_expire_at_their_limit_and_when_the_password_changes() {
    // Idle expiry is checked with exact clocks in ams-store's tests; here the absolute limit,
    // which no amount of use extends.
    let w = Web::new(json!({"session_idle_secs": 2, "session_max_secs": 2}));
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    assert_eq!(w.get("/ams-build/api/user", &cookie).0, 200);
    let t0 = std::time::Instant::now();
    wait_for(
        "the session to reach its limit",
        Duration::from_secs(15),
        || (w.get("/ams-build/api/user", &cookie).0 == 401).then_some(()),
    );
    assert!(t0.elapsed() >= Duration::from_secs(1), "expired too early");

    let w = Web::new(json!({}));
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    assert_eq!(w.get("/ams-build/api/user", &cookie).0, 200);
    set_password(&w.h, "mod", "a brand new password");
    assert_eq!(
        w.get("/ams-build/api/user", &cookie).0,
        401,
        "the old session survived a password change"
    );
}

#[test]
fn pages_escape_what_users_control_and_set_a_strict_csp() {
    let w = Web::new(json!({}));
    // Markup in a user name is refused at creation.
    let o = w.h.cli(&[
        "user",
        "add",
        "x<script>",
        "--level",
        "3",
        "--password-stdin",
    ]);
    assert!(!o.status.success());
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    let (st, head, page) = w.get("/ams-build/", &cookie);
    assert_eq!(st, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    // Scripts only from our own files, never inline.
    assert!(
        page.matches("<script").count() == page.matches("<script src=\"/ams-build/static/").count(),
        "{page}"
    );
    assert!(
        head.contains("script-src 'self'") && !head.contains("unsafe-inline"),
        "{head}"
    );
    let (_, _, login) = w.get("/ams-build/login?page_redirect=%22%3E%3Cscript%3E", "");
    assert!(!login.contains("<script>"), "{login}");
}

/// Reads server-sent events from `path` until an `end` event or the deadline; returns the
/// `log` data in order and the end status.
pub fn sse(addr: &str, path: &str, cookie: &str, timeout: Duration) -> (String, Option<String>) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let (mut log, mut event, mut data) = (String::new(), String::new(), Vec::<String>::new());
    let deadline = std::time::Instant::now() + timeout;
    let mut line = String::new();
    while std::time::Instant::now() < deadline {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        // Chunked framing lines (sizes) are not SSE fields; skip them.
        if let Some(v) = l
            .strip_prefix("event: ")
            .or_else(|| l.strip_prefix("event:"))
        {
            event = v.to_string();
        } else if let Some(v) = l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")) {
            data.push(v.to_string());
        } else if l.is_empty() && !event.is_empty() {
            let d = data.join("\n");
            if event == "log" {
                log.push_str(&d);
            } else if event == "end" {
                return (log, Some(d));
            }
            event.clear();
            data.clear();
        }
    }
    (log, None)
}

#[test]
fn the_dashboard_triggers_and_the_build_page_streams_the_log_live() {
    require_docker();
    let w = Web::new(json!({}));
    std::fs::write(
        w.h.source("mine").join("pipeline.json"),
        pipeline(json!([stage(
            "s",
            &[
                "echo first-line",
                "sleep 2",
                "printf '\\033[32mgreen <b>&</b>\\033[0m\\n'",
                "echo second-line"
            ]
        )])),
    )
    .unwrap();
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    let csrf = w.csrf(&cookie);
    let (st, _, dash) = w.get("/ams-build/", &cookie);
    assert_eq!(st, 200);
    assert!(
        dash.contains("id=\"trigger-mine\""),
        "a moderator sees the build form"
    );
    assert!(dash.contains("data-events=\"/ams-build/events\""));
    // Trigger from the form: a 303 to the new build's page.
    let (st, head, _) = http_full(
        &w.addr,
        "POST",
        "/ams-build/projects/mine/build",
        &[
            ("Cookie", cookie.clone()),
            ("Content-Type", "application/x-www-form-urlencoded".into()),
        ],
        &form(&[("csrf", &csrf), ("branch", ""), ("commit", "")]),
    );
    assert_eq!(st, 303, "{head}");
    let loc = head.lines().find(|l| l.starts_with("location:")).unwrap()["location:".len()..]
        .trim()
        .to_string();
    let name = loc.rsplit('/').next().unwrap().to_string();
    let (st, _, page) = w.get(&loc, &cookie);
    assert_eq!(st, 200);
    assert!(page.contains("id=\"status\""));
    // Follow the log live from its first line to the end.
    let (log, end) = sse(
        &w.addr,
        &format!("/ams-build/build/mine/{name}/stream?from=0"),
        &cookie,
        Duration::from_secs(60),
    );
    assert_eq!(end.as_deref(), Some("pass"), "{log}");
    let a = log.find("first-line").expect("first line streamed");
    let b = log.find("second-line").expect("second line streamed");
    assert!(a < b);
    // The finished page escapes the log and renders colours as classes.
    let (_, _, page) = w.get(&loc, &cookie);
    assert!(
        page.contains("<span class=\"c2\">green &lt;b&gt;&amp;&lt;/b&gt;</span>"),
        "{page}"
    );
    assert!(!page.contains("<b>&</b>"));
}

#[test]
fn webhook_actors_and_log_lines_with_markup_are_escaped_everywhere() {
    let w = Web::new(json!({}));
    std::fs::write(
        w.h.data.join("projects/mine/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "c", "authorized-actors": ["<img src=x onerror=alert(1)>"], "allow-unsigned": true}]}).to_string(),
    )
    .unwrap();
    std::fs::write(
        w.h.data
            .join("projects/mine/master/config/webhook_fields.json"),
        r#"{"actor": ["a"], "repository": ["r"], "branch": ["b"], "hash": ["h"]}"#,
    )
    .unwrap();
    let hook = w.h.webhook_addr();
    let body = br#"{"a": "<img src=x onerror=alert(1)>", "r": "r", "b": "main", "h": "abcdef12"}"#;
    let (st, v) = http(
        &hook,
        "POST",
        "/ams-build/request?name=c&project=mine",
        &[("Content-Type", "application/json".into())],
        body,
    );
    assert_eq!(st, 202, "{v}");
    let name = v["builds"][0].as_str().unwrap().to_string();
    w.h.wait_status("mine", &name, Duration::from_secs(60));
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let cookie = Web::cookie(&head);
    for path in [
        "/ams-build/".to_string(),
        "/ams-build/panels".to_string(),
        format!("/ams-build/build/mine/{name}"),
    ] {
        let (st, head, page) = w.get(&path, &cookie);
        assert_eq!(st, 200, "{path}");
        assert!(
            !page.contains("<img src=x"),
            "{path} renders markup from a webhook"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{head}"
        );
    }
    let (_, _, page) = w.get("/ams-build/", &cookie);
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
}

#[test]
fn the_deliveries_page_is_for_admins() {
    let w = Web::new(json!({}));
    add_user(&w.h, "boss", "4", "mine", "correct horse battery");
    let (_, head) = w.login("boss", "correct horse battery", "", None);
    let boss = Web::cookie(&head);
    let (st, _, page) = w.get("/ams-build/admin/mine", &boss);
    assert_eq!(st, 200);
    assert!(page.contains("Webhook deliveries") && page.contains("Notifications"));
    let (_, _, dash) = w.get("/ams-build/", &boss);
    assert!(dash.contains("/ams-build/admin/mine"));
    let (_, head) = w.login("mod", "correct horse battery", "", None);
    let moderator = Web::cookie(&head);
    assert_eq!(w.get("/ams-build/admin/mine", &moderator).0, 403);
    assert_eq!(w.get("/ams-build/admin/nope", &boss).0, 404);
    let (_, _, dash) = w.get("/ams-build/", &moderator);
    assert!(!dash.contains("/ams-build/admin/mine"));
}

/// The `location` of a redirect's header block.
fn location(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("location:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// A notification's link (`/ams-build/?page_redirect=output/…`) leads to its target through the
/// login, and straight there with a session; a target off the site is dropped.
#[test]
fn notification_links_survive_the_login() {
    let w = Web::new(json!({}));
    let target = "output/mine/mine_1";
    let (st, head, _) = w.get(&format!("/ams-build/?page_redirect={target}"), "");
    assert_eq!(st, 303, "{head}");
    assert_eq!(
        location(&head),
        format!("/ams-build/login?page_redirect={target}")
    );
    let (st, head) = w.login("mod", "correct horse battery", target, None);
    assert_eq!(st, 303, "{head}");
    assert_eq!(location(&head), format!("/ams-build/{target}"));
    let cookie = Web::cookie(&head);
    let (st, head, _) = w.get(&format!("/ams-build/?page_redirect={target}"), &cookie);
    assert_eq!(st, 303, "{head}");
    assert_eq!(location(&head), format!("/ams-build/{target}"));
    for evil in ["//evil.example/x", "https://evil.example/", "..%2F..%2Fetc"] {
        let (st, head, _) = w.get(&format!("/ams-build/?page_redirect={evil}"), "");
        assert_eq!(st, 303, "{head}");
        assert_eq!(location(&head), "/ams-build/login", "{evil}");
        let (st, _, page) = w.get(&format!("/ams-build/?page_redirect={evil}"), &cookie);
        assert_eq!(st, 200, "{evil}: the dashboard itself");
        assert!(page.contains("Signed in as"), "{evil}");
    }
}

/// The dashboard's build form takes parameters as `NAME=value` pairs, declared ones only.
#[test]
fn the_build_form_takes_declared_parameters() {
    let w = Web::new(json!({}));
    std::fs::write(
        w.h.source("mine").join("pipeline.json"),
        pipeline_with(
            json!([stage("s", &["true"])]),
            json!({"dummy-build": true, "parameters": {"X": {}, "Y": {"default": "d"}}}),
        ),
    )
    .unwrap();
    let cookie = w.session("mod", "correct horse battery");
    let (st, head, _) = w.post_form(
        "/ams-build/projects/mine/build",
        &cookie,
        &[("params", "X=1  Y=two")],
    );
    assert_eq!(st, 303, "{head}");
    let b =
        w.h.req(json!({"cmd": "builds", "project": "mine", "limit": 1}))["builds"][0].clone();
    assert_eq!(b["params"], json!({"X": "1", "Y": "two"}), "{b}");
    for (params, why) in [("Z=1", "not declared"), ("novalue", "not NAME=value")] {
        let (st, _, page) = w.post_form(
            "/ams-build/projects/mine/build",
            &cookie,
            &[("params", params)],
        );
        assert_eq!(st, 400, "{params}: {page}");
        assert!(page.contains(why), "{params}: {page}");
    }
}

/// The project page: the history chart and pass rate, the latest build per branch, the
/// schedules with their next run, the webhooks without their secrets, and the build list with
/// its filters.
#[test]
fn the_project_page_shows_history_schedules_webhooks_and_filtered_builds() {
    let w = Web::new(json!({}));
    w.h.private_config(
        "mine",
        json!({"schedules": [{"cron": "0 3 * * *", "branch": "main"}, {"cron": "@weekly"}]}),
    );
    std::fs::write(
        w.h.data.join("projects/mine/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh-push", "branch": "main", "authorized-actors": ["a"],
                                 "secret": "hook-secret-do-not-show"}]})
        .to_string(),
    )
    .unwrap();
    let names: Vec<String> = (0..22).map(|_| w.h.build("mine")).collect();
    for n in &names {
        w.h.wait_status("mine", n, Duration::from_secs(60));
    }
    let cookie = w.session("mod", "correct horse battery");
    let (st, _, page) = w.get("/ams-build/project/mine", &cookie);
    assert_eq!(st, 200, "{page}");
    // One bar per build, all of the pass family (dummy builds), and the pass rate.
    assert_eq!(
        page.matches("<rect class=\"bar-pass\"").count(),
        22,
        "{page}"
    );
    assert!(page.contains("<b>100 %</b>"), "{page}");
    for n in &names[2..] {
        assert!(
            page.contains(&format!("/ams-build/build/mine/{n}\"")),
            "{n}"
        );
    }
    // Schedules with their next run (UTC on the server; the browser shows local time).
    assert!(page.contains("<code>0 3 * * *</code>"), "{page}");
    assert!(
        page.contains(" 03:00:00 UTC</time>"),
        "the next 03:00 run: {page}"
    );
    assert!(page.contains("<code>@weekly</code>"));
    // Webhooks by name, how they are checked, never the secret.
    assert!(page.contains("<code>gh-push</code>"));
    assert!(page.contains("signature (HMAC-SHA256)"));
    assert!(!page.contains("hook-secret-do-not-show"));
    // Filters.
    let (_, _, failed) = w.get("/ams-build/project/mine?status=fail", &cookie);
    assert!(failed.contains("No builds."), "{failed}");
    assert!(failed.contains("<option value=\"fail\" selected>"));
    let (_, _, mine) = w.get("/ams-build/project/mine?actor=tester", &cookie);
    assert_eq!(mine.matches("class=\"build-list\"").count(), 1);
    for n in &names[2..] {
        assert!(mine.contains(&format!("title=\"{n}\"")), "{n}");
    }
    // The pager keeps the filters (escaped once, so the browser reads `actor` and `page`).
    assert!(
        mine.contains("/ams-build/project/mine?actor=tester&amp;page=2#builds\">older"),
        "{mine}"
    );
    let (_, _, older) = w.get("/ams-build/project/mine?actor=tester&page=2", &cookie);
    assert!(older.contains(&format!("title=\"{}\"", names[0])));
    // A page number past any end is an empty page, not a crash (it once overflowed).
    for path in [
        "/ams-build/project/mine?page=9223372036854775807",
        "/ams-build/?project=mine&page=9223372036854775807",
    ] {
        let (st, _, p) = w.get(path, &cookie);
        assert_eq!(st, 200, "{path}");
        assert!(p.contains("No builds."), "{path}");
    }
    let (st, _, p) = w.get(
        "/ams-build/api/projects/name/mine/builds?page=461168601842738791&per_page=9223372036854775807",
        &cookie,
    );
    assert_eq!((st, p.trim()), (200, "[]"), "the API's pages too");
    let (_, _, nobody) = w.get("/ams-build/project/mine?actor=nobody", &cookie);
    assert!(nobody.contains("No builds."));
    // A project that is not there, or not visible, is the same 404.
    assert_eq!(w.get("/ams-build/project/nope", &cookie).0, 404);
    // An address the interface does not serve is the styled page too, not an empty answer;
    // the API's stay JSON.
    for path in [
        "/ams-build/nonesuch",
        "/elsewhere/x",
        "/ams-build/project/mine/extra",
    ] {
        let (st, head, page) = w.get(path, &cookie);
        assert_eq!(st, 404, "{path}");
        assert!(
            head.to_ascii_lowercase().contains("text/html"),
            "{path}: {head}"
        );
        assert!(page.contains("<h1>Not found</h1>"), "{path}: {page}");
        assert!(page.contains("/ams-build/static/app.css"), "{path}: {page}");
    }
    let (st, head, body) = w.get("/ams-build/api/nonesuch", &cookie);
    assert_eq!(st, 404);
    assert!(head.contains("application/json"), "{head}");
    assert!(body.contains("\"error\""), "{body}");
    // The projects page lists it.
    let (_, _, list) = w.get("/ams-build/projects", &cookie);
    assert!(list.contains("/ams-build/project/mine\""));
}
