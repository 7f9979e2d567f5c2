//! Hostile text in every user-controlled field reaches the pages escaped: log lines, commit
//! messages, branch, actor, user, project, token label and message text. Only http(s) URLs
//! become links. And a log too long to show whole: the tail first, earlier lines on demand.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

const PW: &str = "correct horse battery";
/// Markup that would run if it reached a page unescaped.
const PAYLOADS: &[&str] = &[
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "\"><svg/onload=alert(3)>",
    "'><iframe src=javascript:alert(4)>",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// No payload appears raw, and no link leads anywhere but http(s) or our own paths.
fn assert_clean(what: &str, body: &str) {
    for p in PAYLOADS {
        assert!(!body.contains(p), "{what}: raw payload {p:?} in\n{body}");
    }
    for bad in ["<script>", "<img", "<iframe"] {
        assert!(!body.contains(bad), "{what}: {bad:?} in\n{body}");
    }
    // The only SVG is the project page's own chart.
    for (i, _) in body.match_indices("<svg") {
        assert!(
            body[i..].starts_with("<svg viewBox=\"0 0 800 160\""),
            "{what}: an <svg> that is not the chart: {}",
            &body[i..body.len().min(i + 60)]
        );
    }
    for (i, _) in body.match_indices("href=\"") {
        let target = &body[i + 6..];
        assert!(
            target.starts_with('/')
                || target.starts_with('#')
                || target.starts_with("https://")
                || target.starts_with("http://"),
            "{what}: link to {}",
            &target[..target.len().min(40)]
        );
    }
}

#[test]
fn hostile_text_in_every_field_is_escaped_on_every_page() {
    require_docker();
    let mut h = TestHost::new();
    // A repository whose branch name and commit message carry markup.
    let branch = "x\"><svg/onload=alert(3)>";
    let message = format!(
        "fix {} and {}\n\njavascript:alert(5) https://ok.example/commit",
        PAYLOADS[0], PAYLOADS[1]
    );
    let src = h.tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    let cmds = [
        format!("printf '%s\\n' '{}'", PAYLOADS[1]),
        format!("printf '\\033[31m%s\\033[0m\\n' '{}'", PAYLOADS[2]),
        "echo 'see https://ok.example/log and javascript:alert(6)'".to_string(),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    std::fs::write(
        src.join("pipeline.json"),
        pipeline(json!([stage("s", &cmds)])),
    )
    .unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "first"]);
    git(&src, &["checkout", "-q", "-b", branch]);
    git(&src, &["commit", "-q", "--allow-empty", "-m", &message]);
    // A project and users whose names carry what names may carry.
    let project = "p'x=alert(7);";
    let out = h.cli(&["project", "add", project, "--git", src.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actor = "u'onclick=alert(8)";
    add_user(&h, actor, "3", project, PW);
    add_user(&h, "root", "5", "", PW);
    h.start();
    let addr = h.web_addr();
    let web = crate::web::Web { h, addr };

    // The hostile user triggers the hostile branch from the form.
    let cookie = web.session(actor, PW);
    let action = format!("/ams-build/projects/{}/build", urlenc(project));
    let (st, head, body) = web.post_form(&action, &cookie, &[("branch", branch), ("commit", "")]);
    assert_eq!(st, 303, "{head}{body}");
    let loc = head.lines().find(|l| l.starts_with("location:")).unwrap()["location:".len()..]
        .trim()
        .to_string();
    let name = loc.rsplit('/').next().unwrap().to_string();
    let rec = web.h.wait_status(project, &name, Duration::from_secs(120));
    assert_eq!(rec["status"], "pass", "{}", web.h.log(project, &name));
    // A token with a hostile label.
    let (st, _, page) = web.post_form(
        "/ams-build/account/tokens",
        &cookie,
        &[("label", PAYLOADS[3]), ("current", PW)],
    );
    assert_eq!(st, 200);
    assert_clean("new token page", &page);

    let build_path = format!("/ams-build/build/{}/{name}", urlenc(project));
    let (st, _, page) = web.get(&build_path, &cookie);
    assert_eq!(st, 200);
    assert_clean("build page", &page);
    // Each field is there, escaped.
    assert!(page.contains(&esc(branch)), "branch");
    assert!(page.contains(&esc(actor)), "actor");
    assert!(page.contains(&esc(PAYLOADS[0])), "commit message");
    assert!(page.contains(&esc(PAYLOADS[1])), "log line");
    assert!(page.contains(&esc(project)), "project");
    assert!(
        page.contains("<span class=\"c1\">"),
        "ANSI colours become classes"
    );
    // http(s) URLs become links; javascript: does not.
    assert!(
        page.contains("<a href=\"https://ok.example/log\""),
        "{page}"
    );
    assert!(page.contains("<a href=\"https://ok.example/commit\""));
    assert!(page.contains("javascript:alert(6)") && !page.contains("href=\"javascript"));
    let csp = http_raw(&web.addr, &build_path, &[("Cookie", cookie.clone())]).1;
    assert!(csp.contains("content-security-policy: default-src 'none'; script-src 'self'"));

    for path in [
        "/ams-build/".to_string(),
        "/ams-build/panels".to_string(),
        format!("{build_path}/stages"),
        "/ams-build/account".to_string(),
        format!("/ams-build/project/{}", urlenc(project)),
        format!(
            "/ams-build/project/{}?branch={}&actor={}",
            urlenc(project),
            urlenc(branch),
            urlenc(actor)
        ),
        "/ams-build/projects".to_string(),
    ] {
        let (st, _, page) = web.get(&path, &cookie);
        assert_eq!(st, 200, "{path}");
        assert_clean(&path, &page);
    }
    let (_, _, dash) = web.get("/ams-build/", &cookie);
    assert!(dash.contains(&esc(branch)) && dash.contains(&esc(actor)));
    assert!(dash.contains(&format!("Build {} ended PASS", esc(&name))));
    assert!(
        dash.contains(&esc(&format!("fix {}", PAYLOADS[0]))),
        "commit line"
    );
    // The admin pages show the hostile user and project.
    let root = web.session("root", PW);
    for path in [
        "/ams-build/users".to_string(),
        format!("/ams-build/admin/{}", urlenc(project)),
        "/ams-build/".to_string(),
    ] {
        let (st, _, page) = web.get(&path, &root);
        assert_eq!(st, 200, "{path}");
        assert_clean(&path, &page);
        assert!(
            page.contains(&esc(project)) || page.contains(&esc(actor)),
            "{path}"
        );
    }
    // The refused-action page echoes the hostile branch escaped.
    let (st, _, page) = web.post_form(&action, &cookie, &[("branch", "<b>..</b>"), ("commit", "")]);
    assert_eq!(st, 400);
    assert!(
        !page.contains("<b>..</b>") && page.contains("&lt;b&gt;"),
        "{page}"
    );
}

#[test]
fn a_long_log_shows_its_tail_and_loads_earlier_lines_on_demand() {
    let w = crate::web::Web::new(json!({}));
    let name = w.h.build("mine");
    w.h.wait_status("mine", &name, Duration::from_secs(60));
    // A 3 MB log with numbered lines and multi-byte characters.
    let mut log = String::new();
    let mut n = 0;
    while log.len() < 3 << 20 {
        log.push_str(&format!(
            "line {n:07} ünïcödé <b>{}</b>\n",
            "x".repeat(n % 50)
        ));
        n += 1;
    }
    std::fs::write(w.h.build_dir("mine").join(&name).join("output.txt"), &log).unwrap();
    let cookie = w.session("mod", PW);
    let (st, _, page) = w.get(&format!("/ams-build/build/mine/{name}"), &cookie);
    assert_eq!(st, 200);
    assert!(
        page.len() < 600 * 1024,
        "the page holds the tail only: {}",
        page.len()
    );
    assert!(
        page.contains(&format!("line {:07}", n - 1)),
        "the last line"
    );
    assert!(!page.contains("line 0000000 "), "not the first");
    let i = page.find("data-before=\"").expect("a load-more button") + 13;
    let mut before: u64 = page[i..].split('"').next().unwrap().parse().unwrap();
    // The tail starts at a line start.
    assert_eq!(log.as_bytes()[before as usize - 1], b'\n');
    let mut got = log[before as usize..].to_string();
    let mut rounds = 0;
    while before > 0 {
        let (st, head, body) = http_raw(
            &w.addr,
            &format!("/ams-build/build/mine/{name}/log?before={before}"),
            &[("Cookie", cookie.clone())],
        );
        assert_eq!(st, 200);
        assert!(head.contains("content-type: text/plain"));
        assert!(head.contains("x-content-type-options: nosniff"));
        let start: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("x-log-start:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(start < before);
        let chunk = String::from_utf8(body).expect("whole characters");
        assert!(
            chunk.is_empty() || chunk.starts_with("line "),
            "whole lines"
        );
        got.insert_str(0, &chunk);
        before = start;
        rounds += 1;
        assert!(rounds < 100);
    }
    assert_eq!(got, log, "the chunks put together are the whole log");
    assert!(rounds >= 10, "{rounds} chunks of at most 256 KiB");
    // Bad offsets and other users are refused.
    let (st, _, _) = http_raw(
        &w.addr,
        &format!("/ams-build/build/mine/{name}/log?before=99999999999"),
        &[("Cookie", cookie.clone())],
    );
    assert_eq!(st, 400);
    let (st, _, _) = http_raw(
        &w.addr,
        &format!("/ams-build/build/mine/{name}/log?before=10"),
        &[],
    );
    assert_eq!(st, 401);
}
