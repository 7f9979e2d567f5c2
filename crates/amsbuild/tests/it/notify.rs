//! Outbound notifications against a local HTTP receiver that plays Discord: its JSON shape and
//! limits, 429 with retry_after, a 500 then success, a hang, a dead target, a refused private
//! target, and signed JSON hooks.

use crate::harness::*;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
    raw: Vec<u8>,
}

/// A receiver on loopback. Behaviour by path: `/ok…` 204, `/rate…` 429 once (retry_after
/// 0.3) then 204, `/flaky…` 500 once then 204, `/hang…` never answers.
struct Receiver {
    addr: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let g = g.clone();
                std::thread::spawn(move || serve(s, g));
            }
        });
        Receiver { addr, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn count(&self, prefix: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    fn first(&self, prefix: &str) -> Received {
        self.got
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.path.starts_with(prefix))
            .cloned()
            .unwrap()
    }
}

fn serve(mut s: TcpStream, got: Arc<Mutex<Vec<Received>>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut raw = vec![0; len];
    let _ = r.read_exact(&mut raw);
    let seen = {
        let mut g = got.lock().unwrap();
        let n = g.iter().filter(|x| x.path == path).count();
        g.push(Received {
            path: path.clone(),
            headers,
            body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
            raw,
        });
        n
    };
    let answer = if path.starts_with("/hang") {
        std::thread::sleep(Duration::from_secs(30));
        return;
    } else if path.starts_with("/rate") && seen == 0 {
        let b =
            r#"{"message": "You are being rate limited.", "retry_after": 0.3, "global": false}"#;
        format!("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len())
    } else if path.starts_with("/flaky") && seen == 0 {
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string()
    } else if path.starts_with("/redirect") {
        "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    } else {
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    };
    let _ = s.write_all(answer.as_bytes());
}

fn discord(name: &str, trigger: &str, url: String, data: Value) -> Value {
    json!({"hook-name": name, "type": "discord", "trigger": trigger, "url": url, "data": data})
}

fn host_with(out: Vec<Value>, conf: Value, dummy: bool) -> TestHost {
    let mut h = TestHost::with_conf(conf);
    let extra = if dummy {
        json!({"dummy-build": true})
    } else {
        json!({})
    };
    h.project(
        "n",
        &pipeline_with(json!([stage("s", &["echo hi"])]), extra),
    );
    std::fs::write(
        h.data.join("projects/n/master/config/webhooks.json"),
        json!({"in-webhooks": [], "out-webhooks": out}).to_string(),
    )
    .unwrap();
    h.start();
    h
}

fn notifications(h: &TestHost, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} notifications"),
        Duration::from_secs(60),
        || {
            let v = h.req(json!({"cmd": "notifications", "project": "n", "limit": 100}));
            let list = v["notifications"].as_array().cloned().unwrap_or_default();
            (list.len() >= n).then_some(list)
        },
    )
}

fn allow() -> Value {
    json!({"notify_allow_private": true, "notify_timeout_secs": 1, "web_address": "ci.example.com"})
}

#[test]
fn discord_gets_a_valid_message_within_its_limits_and_the_token_stays_secret() {
    let rx = Receiver::start();
    let long = "y".repeat(5000);
    let data = json!({
        "default": {"content": format!("@everyone {{project}} build {{build_index}}: {{status}} {long}"),
                    "username": "Discord Bot"},
        "embeds": [{"title": "{project} - Build Complete", "description": long, "url": "{output_log}",
                    "color": 65280, "timestamp": "2026-01-01T00:00:00Z",
                    "fields": [{"name": "Status", "value": "{status}", "inline": true},
                               {"name": "Log", "value": "{output_log}"}],
                    "footer": {"text": "{app_name} {app_version}"}}]
    });
    let h = host_with(
        vec![discord(
            "d",
            "build-complete",
            rx.url("/ok/api/webhooks/42/SECRETTOKEN"),
            data,
        )],
        allow(),
        true,
    );
    let name = h.build("n");
    h.wait_status("n", &name, Duration::from_secs(60));
    let list = notifications(&h, 1);
    assert_eq!(list[0]["outcome"], "sent", "{}", list[0]);
    assert_eq!(list[0]["target_host"], rx.addr.as_str());
    let m = rx.first("/ok").body;
    let content = m["content"].as_str().unwrap();
    assert!(
        content.starts_with("@everyone n build 1: DUMMY"),
        "{content}"
    );
    assert!(content.encode_utf16().count() <= 2000 && content.ends_with('…'));
    assert_eq!(
        m["allowed_mentions"],
        json!({"parse": []}),
        "a mention would ping"
    );
    let u = m["username"].as_str().unwrap().to_ascii_lowercase();
    assert!(!u.contains("discord"), "{u}");
    let e = &m["embeds"][0];
    assert_eq!(e["title"], "n - Build Complete");
    assert!(e["description"].as_str().unwrap().encode_utf16().count() <= 4096);
    assert_eq!(e["fields"][0]["value"], "DUMMY");
    let log_link = e["fields"][1]["value"].as_str().unwrap();
    assert_eq!(
        log_link,
        format!("http://ci.example.com:0/ams-build/?page_redirect=output/n/{name}")
    );
    assert_eq!(e["url"], log_link);
    // The token never appears in the host's log or the recorded notification.
    assert!(!h.host_log().contains("SECRETTOKEN"));
    assert!(!list[0].to_string().contains("SECRETTOKEN"));
}

#[test]
fn retries_honour_429_and_5xx_and_give_up_on_a_hang() {
    let rx = Receiver::start();
    let h = host_with(
        vec![
            discord("rate", "build-complete", rx.url("/rate/1/t"), json!({})),
            discord("flaky", "build-complete", rx.url("/flaky/1/t"), json!({})),
            discord("hang", "build-complete", rx.url("/hang/1/t"), json!({})),
            discord(
                "redirect",
                "build-complete",
                rx.url("/redirect/1/t"),
                json!({}),
            ),
        ],
        allow(),
        true,
    );
    let t0 = std::time::Instant::now();
    let name = h.build("n");
    let r = h.wait_status("n", &name, Duration::from_secs(60));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the build waited for its notifications"
    );
    assert_eq!(r["status"], "dummy");
    let list = notifications(&h, 4);
    let by = |hook: &str| list.iter().find(|n| n["hook"] == hook).cloned().unwrap();
    let rate = by("rate");
    assert_eq!(rate["outcome"], "sent", "{rate}");
    let tries: Vec<&str> = rate["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(tries, vec!["429", "204"]);
    let flaky = by("flaky");
    assert_eq!(flaky["outcome"], "sent");
    assert_eq!(flaky["attempts"].as_array().unwrap().len(), 2);
    let hang = by("hang");
    assert!(
        hang["outcome"]
            .as_str()
            .unwrap()
            .starts_with("failed after 4 attempts: timeout"),
        "{hang}"
    );
    let redirect = by("redirect");
    assert!(
        redirect["outcome"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed"),
        "{redirect}"
    );
    assert_eq!(rx.count("/rate"), 2);
}

#[test]
fn a_private_target_is_refused_unless_allowed_and_a_dead_one_does_not_hold_the_build() {
    let rx = Receiver::start();
    let h = host_with(
        vec![discord(
            "private",
            "build-complete",
            rx.url("/ok/x"),
            json!({}),
        )],
        json!({}),
        true,
    );
    let name = h.build("n");
    h.wait_status("n", &name, Duration::from_secs(60));
    let list = notifications(&h, 1);
    assert!(
        list[0]["outcome"].as_str().unwrap().contains("refused"),
        "{}",
        list[0]
    );
    assert!(list[0]["outcome"]
        .as_str()
        .unwrap()
        .contains("notify_allow_private"));
    assert_eq!(rx.count("/ok"), 0, "the request was sent anyway");

    // A dead Discord URL: the real build still passes on time, the failure is recorded.
    require_docker();
    let h = host_with(
        vec![discord(
            "dead",
            "build-complete",
            "http://127.0.0.1:9/api/webhooks/1/t".into(),
            json!({}),
        )],
        allow(),
        false,
    );
    let t0 = std::time::Instant::now();
    let name = h.build("n");
    let r = h.wait_status("n", &name, Duration::from_secs(60));
    assert_eq!(r["status"], "pass");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let list = notifications(&h, 1);
    assert!(
        list[0]["outcome"].as_str().unwrap().starts_with("failed"),
        "{}",
        list[0]
    );
}

#[test]
fn triggers_and_signed_json_hooks() {
    let rx = Receiver::start();
    let h = host_with(
        vec![
            json!({"hook-name": "j", "type": "json", "trigger": ["build-started", "build-complete"],
                   "url": rx.url("/ok/json"), "secret": "k"}),
            discord("failed", "build-failed", rx.url("/ok/failed"), json!({})),
            discord("fixed", "build-fixed", rx.url("/ok/fixed"), json!({})),
            discord("error", "build-error", rx.url("/ok/error"), json!({})),
        ],
        allow(),
        false,
    );
    require_docker();
    let src = h.source("n").join("pipeline.json");
    std::fs::write(&src, pipeline(json!([stage("s", &["exit 1"])]))).unwrap();
    let a = h.build("n");
    h.wait_status("n", &a, Duration::from_secs(60));
    std::fs::write(&src, pipeline(json!([stage("s", &["true"])]))).unwrap();
    let b = h.build("n");
    h.wait_status("n", &b, Duration::from_secs(60));
    // An image the engine cannot find: ERROR, the host's side, not a failed build.
    let missing =
        pipeline(json!([stage("s", &["true"])])).replace(IMAGE, "ams-no-such-image:never");
    std::fs::write(&src, missing).unwrap();
    let c = h.build("n");
    assert_eq!(
        h.wait_status("n", &c, Duration::from_secs(60))["status"],
        "error"
    );
    std::fs::write(&src, pipeline(json!([stage("s", &["true"])]))).unwrap();
    let d = h.build("n");
    h.wait_status("n", &d, Duration::from_secs(60));
    // started + complete for the four builds, failed for the first, fixed for the second,
    // error for the third; the pass after the error is no fix (the branch's last result was a
    // pass).
    let list = notifications(&h, 11);
    let hooks: Vec<(String, String)> = list
        .iter()
        .map(|n| {
            (
                n["hook"].as_str().unwrap().to_string(),
                n["build_name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(hooks.contains(&("failed".into(), a.clone())));
    assert!(!hooks.contains(&("failed".into(), b.clone())));
    assert!(hooks.contains(&("fixed".into(), b.clone())));
    assert!(!hooks.contains(&("fixed".into(), a.clone())));
    assert!(hooks.contains(&("error".into(), c.clone())), "{hooks:?}");
    assert!(!hooks.contains(&("failed".into(), c.clone())), "{hooks:?}");
    assert!(!hooks.contains(&("fixed".into(), d.clone())), "{hooks:?}");
    assert_eq!(hooks.iter().filter(|(h, _)| h == "error").count(), 1);
    assert_eq!(hooks.iter().filter(|(h, _)| h == "j").count(), 8);
    // The JSON hook's body is signed with its secret.
    let got = rx.got.lock().unwrap().clone();
    let j = got
        .iter()
        .find(|r| r.path == "/ok/json" && r.body["event"] == "build-complete")
        .unwrap();
    let sig = j
        .headers
        .iter()
        .find(|(k, _)| k == "x-ams-signature-256")
        .map(|x| x.1.clone())
        .unwrap();
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k").unwrap();
    m.update(&j.raw);
    let want = format!(
        "sha256={}",
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(sig, want);
    assert!(j.body["build"]["name"].is_string());
}

#[test]
fn an_unknown_variable_is_reported_when_the_config_is_loaded() {
    let h = host_with(
        vec![discord(
            "bad",
            "build-complete",
            "https://discord.com/api/webhooks/1/t".into(),
            json!({"default": {"content": "{stauts}"}}),
        )],
        json!({}),
        true,
    );
    let log = h.host_log();
    assert!(
        log.contains("out-webhooks[0].data.default.content"),
        "{log}"
    );
    assert!(log.contains("stauts"));
}

/// `commit-status` reports each build on its commit in the shape each forge documents: GitHub
/// (bearer token, `pending` then the final state) and Bitbucket Cloud (an app password as
/// basic auth, retried after a 500), in order, and recorded like notifications.
#[test]
fn commit_statuses_reach_the_forge_in_order_and_retry() {
    require_docker();
    let rx = Receiver::start();
    let mut h = TestHost::with_conf(allow());
    h.project(
        "gh",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.project("bb", &pipeline(json!([stage("s", &["exit 1"])])));
    let configs = [
        (
            "gh",
            json!({"type": "github", "token": "gh-token", "repo": "o/r", "api": rx.url("/ok/gh")}),
        ),
        (
            "bb",
            json!({"type": "bitbucket", "token": "app-pw", "username": "u", "repo": "w/s",
                   "api": rx.url("/flaky/bb"), "context": "ci/ams"}),
        ),
    ];
    for (p, c) in configs {
        std::fs::write(
            h.data
                .join(format!("projects/{p}/master/config/pipeline-config.json")),
            json!({"commit-status": c}).to_string(),
        )
        .unwrap();
    }
    h.start();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    for p in ["gh", "bb"] {
        let b = h.build_with(p, json!({"commit": sha}));
        h.wait_status(p, b["name"].as_str().unwrap(), Duration::from_secs(60));
    }
    wait_for("four statuses sent", Duration::from_secs(30), || {
        let n = ["gh", "bb"]
            .iter()
            .flat_map(|p| {
                h.req(json!({"cmd": "notifications", "project": p, "limit": 100}))["notifications"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|n| n["hook"] == "commit-status" && n["outcome"] == "sent")
            .count();
        (n == 4).then_some(())
    });
    let got = rx.got.lock().unwrap().clone();
    let header = |r: &Received, k: &str| {
        r.headers
            .iter()
            .find(|(h, _)| h == k)
            .map(|x| x.1.clone())
            .unwrap_or_default()
    };
    let gh: Vec<&Received> = got
        .iter()
        .filter(|r| r.path == format!("/ok/gh/repos/o/r/statuses/{sha}"))
        .collect();
    let states: Vec<&str> = gh
        .iter()
        .map(|r| r.body["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "success"]);
    assert_eq!(header(gh[0], "authorization"), "Bearer gh-token");
    assert_eq!(header(gh[0], "accept"), "application/vnd.github+json");
    assert_eq!(gh[1].body["context"], "ams-build");
    assert!(
        gh[1].body["target_url"]
            .as_str()
            .unwrap()
            .contains("?page_redirect=output/gh/"),
        "{}",
        gh[1].body
    );
    let bb: Vec<&Received> = got
        .iter()
        .filter(|r| r.path == format!("/flaky/bb/2.0/repositories/w/s/commit/{sha}/statuses/build"))
        .collect();
    let states: Vec<&str> = bb
        .iter()
        .map(|r| r.body["state"].as_str().unwrap())
        .collect();
    // The first answer is a 500: INPROGRESS is sent again, and FAILED only after it.
    assert_eq!(states, ["INPROGRESS", "INPROGRESS", "FAILED"]);
    assert_eq!(header(bb[0], "authorization"), "Basic dTphcHAtcHc=");
    assert_eq!(bb[2].body["key"], "ci/ams");
    assert!(bb[2].body["description"]
        .as_str()
        .unwrap()
        .starts_with("FAIL"));
}
