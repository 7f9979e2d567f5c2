//! `GET /metrics` and the status badges against a running host: real builds move the
//! counters and histograms, webhook deliveries and notification attempts are counted by
//! verdict and outcome, HTTP requests by route template (never the raw path), the metrics
//! token is enforced when set; badges show the latest final status of public projects only,
//! by branch, escaped, and never tell which projects exist.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "a webhook secret for the metrics test";
const TOKEN: &str = "metrics-token-0123456789";

fn sign(body: &[u8]) -> String {
    sign_with(SECRET, body)
}

/// One scrape: the status, the header block (lower-cased) and the text.
fn scrape_with(addr: &str, headers: &[(&str, String)]) -> (u16, String, String) {
    let (st, head, body) = http_raw(addr, "/metrics", headers);
    (st, head, String::from_utf8(body).unwrap())
}

fn scrape(addr: &str) -> String {
    let (st, head, text) = scrape_with(addr, &[]);
    assert_eq!(st, 200, "{head}\n{text}");
    text
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Like [`sample`], absent counting as 0 (a counter no event has touched yet).
fn count(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

/// Scrapes until `series` reaches `want` (events are recorded as they happen, next to the
/// record a test waits for), then returns that scrape.
fn scrape_until(addr: &str, series: &str, want: f64) -> String {
    wait_for(
        &format!("{series} to reach {want}"),
        Duration::from_secs(30),
        || {
            let t = scrape(addr);
            (count(&t, series) >= want).then_some(t)
        },
    )
}

#[test]
fn builds_deliveries_notifications_and_requests_move_the_metrics() {
    require_docker();
    let (rx, received) = body_receiver();
    let mut h = TestHost::with_conf(json!({"notify_allow_private": true}));
    h.project("app", &pipeline(json!([stage("s", &["echo ok"])])));
    h.project("bad", &pipeline(json!([stage("s", &["false"])])));
    std::fs::write(
        h.data.join("projects/app/master/config/webhooks.json"),
        json!({
            "in-webhooks": [{"name": "gh", "authorized-actors": ["octocat"], "secret": SECRET}],
            "out-webhooks": [{"hook-name": "j", "type": "json", "trigger": ["build-complete"],
                              "url": format!("http://{rx}/hook")}]
        })
        .to_string(),
    )
    .unwrap();
    h.start();
    let addr = h.web_addr();

    // Before anything happened: the gauges are there, no build has ended.
    let (st, head, before) = scrape_with(&addr, &[]);
    assert_eq!(st, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(sample(&before, "amsbuild_queue_pending"), Some(0.0));
    assert_eq!(sample(&before, "amsbuild_builds_active"), Some(0.0));
    assert!(
        !before.contains("amsbuild_builds_finished_total{"),
        "{before}"
    );

    let app = h.build("app");
    let bad = h.build("bad");
    assert_eq!(
        h.wait_status("app", &app, Duration::from_secs(120))["status"],
        "pass"
    );
    assert_eq!(
        h.wait_status("bad", &bad, Duration::from_secs(120))["status"],
        "fail"
    );
    let pass = r#"amsbuild_builds_finished_total{project="app",status="pass"}"#;
    let fail = r#"amsbuild_builds_finished_total{project="bad",status="fail"}"#;
    scrape_until(&addr, pass, 1.0);
    let t = scrape_until(&addr, fail, 1.0);
    assert_eq!(count(&t, pass), 1.0, "{t}");
    assert_eq!(count(&t, fail), 1.0, "{t}");
    assert_eq!(
        count(
            &t,
            r#"amsbuild_builds_finished_total{project="app",status="fail"}"#
        ),
        0.0
    );
    // One build and one stage each, of a positive duration, in the buckets as well.
    for p in ["app", "bad"] {
        let n = |s: &str| count(&t, &format!("amsbuild_{s}{{project=\"{p}\"}}"));
        assert_eq!(n("build_duration_seconds_count"), 1.0, "{p}\n{t}");
        assert!(n("build_duration_seconds_sum") > 0.0, "{p}\n{t}");
        assert_eq!(n("stage_duration_seconds_count"), 1.0, "{p}\n{t}");
        let inf = format!("amsbuild_build_duration_seconds_bucket{{project=\"{p}\",le=\"+Inf\"}}");
        assert_eq!(count(&t, &inf), 1.0, "{t}");
    }
    assert_eq!(sample(&t, "amsbuild_queue_pending"), Some(0.0));
    assert_eq!(sample(&t, "amsbuild_builds_active"), Some(0.0));

    // A queued build shows in the pending gauge while the slots are busy.
    h.project("slow", &pipeline(json!([stage("s", &["sleep 30"])])));
    let slow: Vec<String> = (0..3).map(|_| h.build("slow")).collect();
    let t = scrape(&addr);
    assert_eq!(sample(&t, "amsbuild_builds_active"), Some(2.0), "{t}");
    assert_eq!(sample(&t, "amsbuild_queue_pending"), Some(1.0), "{t}");
    for b in &slow {
        assert_eq!(h.req(json!({"cmd": "cancel", "build": b}))["ok"], true);
    }
    let t = scrape_until(
        &addr,
        r#"amsbuild_builds_finished_total{project="slow",status="cancel"}"#,
        3.0,
    );
    assert_eq!(sample(&t, "amsbuild_queue_pending"), Some(0.0), "{t}");

    // The finished build's notification was sent, and its attempt counted.
    wait_for("the notification", Duration::from_secs(30), || {
        (!received.lock().unwrap().is_empty()).then_some(())
    });
    scrape_until(
        &addr,
        r#"amsbuild_notification_attempts_total{outcome="sent"}"#,
        1.0,
    );

    // The project's disk use is measured after its build, off the request path.
    let disk = r#"amsbuild_project_disk_bytes{project="app"}"#;
    let t = wait_for("app's disk use", Duration::from_secs(30), || {
        let t = scrape(&addr);
        (count(&t, disk) > 0.0).then_some(t)
    });
    assert!(count(&t, disk) >= 4096.0, "{t}");
    // The dashboard's projects panel shows the same measure to the project's users.
    add_user(&h, "viewer", "1", "app", "correct horse battery");
    let cookie = web_login(&h.web_addr(), "viewer", "correct horse battery");
    let (_, _, page) = http_raw(&h.web_addr(), "/ams-build/panels", &[("Cookie", cookie)]);
    let page = String::from_utf8_lossy(&page);
    let cell = page
        .split("<td class=\"disk\"")
        .nth(1)
        .and_then(|c| c.split('>').nth(1))
        .and_then(|c| c.split('<').next())
        .unwrap_or_default();
    assert!(
        cell.ends_with(" KiB") || cell.ends_with(" MiB"),
        "{cell:?} in {page}"
    );

    // Webhook deliveries, by verdict: a signed ping, a forged one, one for no such project.
    let hooks = h.webhook_addr();
    let ping = fixture("github_ping.json");
    let send = |project: &str, sig: String| {
        http(
            &hooks,
            "POST",
            &format!("/ams-build/request?name=gh&project={project}"),
            &[
                ("Content-Type", "application/json".into()),
                ("X-GitHub-Event", "ping".into()),
                ("X-GitHub-Delivery", "m-1".into()),
                ("X-Hub-Signature-256", sig),
            ],
            &ping,
        )
        .0
    };
    assert_eq!(send("app", sign(&ping)), 200);
    assert_eq!(send("app", sign(b"something else")), 401);
    assert_eq!(send("no-such-project", sign(&ping)), 404);
    let t = scrape(&addr);
    for (verdict, n) in [("ping", 1.0), ("unauthorized", 1.0), ("invalid", 1.0)] {
        let series = format!("amsbuild_webhook_deliveries_total{{verdict=\"{verdict}\"}}");
        assert_eq!(count(&t, &series), n, "{series}\n{t}");
    }
    assert_eq!(
        count(
            &t,
            r#"amsbuild_webhook_deliveries_total{verdict="accepted"}"#
        ),
        0.0
    );
    // The webhook listener's requests are counted by its route too.
    assert_eq!(
        count(
            &t,
            r#"amsbuild_http_requests_total{route="/ams-build/request",method="POST",status="401"}"#
        ),
        1.0,
        "{t}"
    );

    // HTTP requests by route template and status; the raw paths never become labels.
    let before = scrape(&addr);
    let api = r#"amsbuild_http_requests_total{route="/ams-build/api/projects/name/{name}/{*rest}",method="GET",status="401"}"#;
    let unmatched = r#"amsbuild_http_requests_total{route="unmatched",method="GET",status="404"}"#;
    let healthz = r#"amsbuild_http_requests_total{route="/healthz",method="GET",status="200"}"#;
    for secret in ["zz-first-path", "zz-second-path"] {
        let (st, _) = http(
            &addr,
            "GET",
            &format!("/ams-build/api/projects/name/{secret}/builds"),
            &[],
            b"",
        );
        assert_eq!(st, 401);
        let (st, _, _) = http_raw(&addr, &format!("/nothing/here/{secret}"), &[]);
        assert_eq!(st, 404);
    }
    let healthy = (0..3)
        .filter(|_| http_raw(&addr, "/healthz", &[]).0 == 200)
        .count() as f64;
    let after = scrape(&addr);
    assert_eq!(count(&after, api) - count(&before, api), 2.0, "{after}");
    assert_eq!(
        count(&after, unmatched) - count(&before, unmatched),
        2.0,
        "{after}"
    );
    assert_eq!(
        count(&after, healthz) - count(&before, healthz),
        healthy,
        "{after}"
    );
    assert!(!after.contains("zz-first-path") && !after.contains("zz-second-path"));
    // The scrape before this one was counted under its own route.
    assert!(
        count(
            &after,
            r#"amsbuild_http_requests_total{route="/metrics",method="GET",status="200"}"#
        ) >= 1.0,
        "{after}"
    );
}

#[test]
fn the_metrics_token_is_required_when_set() {
    let mut h = TestHost::with_conf(json!({"metrics_token": TOKEN}));
    h.start();
    let addr = h.web_addr();
    for headers in [
        vec![],
        vec![(
            "Authorization",
            "Bearer metrics-token-012345678".to_string(),
        )],
        vec![("Authorization", format!("Bearer {TOKEN}x"))],
        vec![("Authorization", format!("Basic {TOKEN}"))],
    ] {
        let (st, head, text) = scrape_with(&addr, &headers);
        assert_eq!(st, 401, "{headers:?}: {text}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(!text.contains("amsbuild_"), "{text}");
    }
    let (st, _, text) = scrape_with(&addr, &[("Authorization", format!("Bearer {TOKEN}"))]);
    assert_eq!(st, 200, "{text}");
    assert_eq!(sample(&text, "amsbuild_queue_pending"), Some(0.0), "{text}");
    // The refused scrapes were counted as such.
    assert_eq!(
        count(
            &text,
            r#"amsbuild_http_requests_total{route="/metrics",method="GET",status="401"}"#
        ),
        4.0,
        "{text}"
    );

    // Without a token in web_conf.json, /metrics is open.
    let mut open = TestHost::new();
    open.start();
    let (st, _, text) = scrape_with(&open.web_addr(), &[]);
    assert_eq!(st, 200, "{text}");
}

/// A badge: status, header block and the SVG text.
fn badge(addr: &str, path: &str) -> (u16, String, String) {
    let (st, head, body) = http_raw(addr, &format!("/ams-build/badge/{path}"), &[]);
    (st, head, String::from_utf8(body).unwrap())
}

/// The status word and the fill colour of the badge's right half.
fn shown(svg: &str) -> (String, String) {
    let texts: Vec<&str> = svg
        .split("<text ")
        .skip(1)
        .map(|t| t.split('>').nth(1).unwrap().split('<').next().unwrap())
        .collect();
    let fills: Vec<&str> = svg
        .split("<rect ")
        .skip(1)
        .filter_map(|r| r.split("fill=\"").nth(1))
        .map(|f| f.split('"').next().unwrap())
        .collect();
    (texts[1].to_string(), fills[1].to_string())
}

#[test]
fn badges_show_the_latest_final_status_of_public_projects_only() {
    require_docker();
    let mut h = TestHost::new();
    let passing = pipeline(json!([stage("s", &["true"])]));
    let failing = pipeline(json!([stage("s", &["false"])]));
    h.project("pub", &passing);
    h.private_config("pub", json!({"public-badge": true}));
    h.project("priv", &passing);
    let hostile_project = "o'neil=(1);";
    h.project(
        hostile_project,
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.private_config(hostile_project, json!({"public-badge": true}));
    h.start();
    let addr = h.web_addr();

    // Public, no build ended yet.
    let (st, head, svg) = badge(&addr, "pub.svg");
    assert_eq!(st, 200, "{svg}");
    assert!(svg.contains(">no builds<"), "{svg}");

    let main = h.build_with("pub", json!({"branch": "main"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        h.wait_status("pub", &main, Duration::from_secs(120))["status"],
        "pass"
    );
    let (st, head_pass, svg) = badge(&addr, "pub.svg");
    assert_eq!(st, 200);
    assert_eq!(shown(&svg), ("PASS".into(), "#3c9a1f".into()), "{svg}");
    for h in [&head, &head_pass] {
        assert!(h.contains("cache-control: no-cache"), "{h}");
        assert!(h.contains("content-type: image/svg+xml"), "{h}");
    }

    // A failing build on another branch: the project's badge follows the newest, a branch's
    // badge its own newest, and a running build changes nothing.
    std::fs::write(h.source("pub").join("pipeline.json"), &failing).unwrap();
    let dev = h.build_with("pub", json!({"branch": "dev"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        h.wait_status("pub", &dev, Duration::from_secs(120))["status"],
        "fail"
    );
    std::fs::write(
        h.source("pub").join("pipeline.json"),
        pipeline(json!([stage("s", &["sleep 30"])])),
    )
    .unwrap();
    let running = h.build_with("pub", json!({"branch": "main"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    h.wait_running("pub", &running);
    let (_, _, svg) = badge(&addr, "pub.svg");
    assert_eq!(shown(&svg), ("FAIL".into(), "#d9442e".into()), "{svg}");
    let (_, _, svg) = badge(&addr, "pub.svg?branch=main");
    assert_eq!(shown(&svg), ("PASS".into(), "#3c9a1f".into()), "{svg}");
    assert!(svg.contains(">pub · main<"), "{svg}");
    let (_, _, svg) = badge(&addr, "pub.svg?branch=dev");
    assert_eq!(shown(&svg), ("FAIL".into(), "#d9442e".into()), "{svg}");
    let (st, _, svg) = badge(&addr, "pub.svg?branch=never-built");
    assert_eq!(st, 200);
    assert!(svg.contains(">no builds<"), "{svg}");
    assert_eq!(
        h.req(json!({"cmd": "cancel", "build": running}))["ok"],
        true
    );
    // A build that names no branch built the default one: it counts for that branch's badge.
    h.private_config("pub", json!({"public-badge": true, "branch": "dev"}));
    std::fs::write(h.source("pub").join("pipeline.json"), &passing).unwrap();
    let plain = h.build("pub");
    assert_eq!(
        h.wait_status("pub", &plain, Duration::from_secs(120))["status"],
        "pass"
    );
    let (_, _, svg) = badge(&addr, "pub.svg?branch=dev");
    assert_eq!(shown(&svg), ("PASS".into(), "#3c9a1f".into()), "{svg}");

    // Not public, unknown, or not a badge name: one and the same 404.
    let priv_build = h.build("priv");
    h.wait_status("priv", &priv_build, Duration::from_secs(120));
    let (st, head_priv, body_priv) = badge(&addr, "priv.svg");
    assert_eq!(st, 404);
    assert!(!body_priv.contains("<svg"), "{body_priv}");
    for path in [
        "ghost.svg",
        "priv.svg?branch=main",
        "pub.png",
        "pub",
        "..%2Fpub.svg",
    ] {
        let (st, head, body) = badge(&addr, path);
        assert_eq!(st, 404, "{path}");
        assert_eq!(body, body_priv, "{path}");
        let ct = |h: &str| {
            h.lines()
                .find(|l| l.starts_with("content-type:"))
                .map(str::to_string)
        };
        assert_eq!(ct(&head), ct(&head_priv), "{path}");
        assert!(head.contains("cache-control: no-cache"), "{path}: {head}");
    }
    // A badge needs no login, and a private project's needs more than a login: the rule is
    // the project's public-badge alone.
    h.private_config("priv", json!({"public-badge": true}));
    let (st, _, svg) = badge(&addr, "priv.svg");
    assert_eq!(st, 200);
    assert_eq!(shown(&svg).0, "PASS", "{svg}");

    // Hostile text in the project and branch reaches the picture escaped.
    let branch = "x<svg/onload=alert(1)>&\"'";
    let b = h.build_with(hostile_project, json!({"branch": branch}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    h.wait_status(hostile_project, &b, Duration::from_secs(120));
    let (st, _, svg) = badge(
        &addr,
        &format!("{}.svg?branch={}", urlenc(hostile_project), urlenc(branch)),
    );
    assert_eq!(st, 200, "{svg}");
    assert_eq!(svg.matches("<svg").count(), 1, "{svg}");
    assert!(!svg.contains("<svg/onload"), "{svg}");
    assert!(!svg.contains("o'neil"), "{svg}");
    assert!(
        svg.contains("o&#39;neil=(1); · x&lt;svg/onload=alert(1)&gt;&amp;&quot;&#39;"),
        "{svg}"
    );
    assert_eq!(shown(&svg).0, "DUMMY", "{svg}");
}
