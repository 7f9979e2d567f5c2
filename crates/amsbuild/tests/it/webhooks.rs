//! The webhook listener over real HTTP, with the senders' own example payloads.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const SECRET: &str = "It's a Secret to Everybody";

fn sign(body: &[u8]) -> String {
    sign_with(SECRET, body)
}

struct Hooked {
    h: TestHost,
    addr: String,
}

impl Hooked {
    fn new(webhooks: Value) -> Self {
        Self::with_conf(webhooks, json!({}))
    }

    fn with_conf(webhooks: Value, conf: Value) -> Self {
        let mut h = TestHost::with_conf(conf);
        h.project(
            "p",
            &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
        );
        std::fs::write(
            h.data.join("projects/p/master/config/webhooks.json"),
            webhooks.to_string(),
        )
        .unwrap();
        h.start();
        let addr = h.webhook_addr();
        Hooked { h, addr }
    }

    fn send(&self, query: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
        http(
            &self.addr,
            "POST",
            &format!("/ams-build/request?{query}"),
            headers,
            body,
        )
    }

    fn github(&self, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
        self.send(
            "name=gh&project=p",
            &[
                ("Content-Type", "application/json".into()),
                ("X-GitHub-Event", event.into()),
                ("X-GitHub-Delivery", delivery.into()),
                ("X-Hub-Signature-256", sign(body)),
            ],
            body,
        )
    }

    fn builds(&self) -> Vec<Value> {
        self.h
            .req(json!({"cmd": "builds", "project": "p", "limit": 1000}))["builds"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn deliveries(&self) -> Vec<Value> {
        self.h
            .req(json!({"cmd": "deliveries", "project": "p", "limit": 1000}))["deliveries"]
            .as_array()
            .unwrap()
            .clone()
    }
}

fn gh_hook(extra: Value) -> Value {
    let mut w = json!({"name": "gh", "repository": "Hello-World", "branch": "master",
                       "authorized-actors": ["codertocat"], "secret": SECRET});
    for (k, v) in extra.as_object().unwrap() {
        w[k] = v.clone();
    }
    json!({"in-webhooks": [w], "out-webhooks": []})
}

#[test]
fn a_signed_github_push_builds_once_per_delivery() {
    let t = Hooked::new(gh_hook(json!({})));
    let body = fixture("github_push_new_branch.json");
    let (st, v) = t.github("push", "d-1", &body);
    assert_eq!(st, 202, "{v}");
    let names = v["builds"].as_array().unwrap();
    assert_eq!(names.len(), 1);
    let name = names[0].as_str().unwrap();
    let r = t.h.wait_status("p", name, Duration::from_secs(60));
    assert_eq!(r["status"], "dummy");
    assert_eq!(r["trigger"], "webhook");
    assert_eq!(r["created_by"], "Codertocat");
    assert_eq!(r["branch"], "master");
    assert_eq!(r["commit"], "6113728f27ae82c7b1a177c8d03f9e96e0adf246");

    // The same delivery again builds nothing.
    let (st, v) = t.github("push", "d-1", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["duplicate"], true);
    assert_eq!(t.builds().len(), 1);
    let d = t.deliveries();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["verdict"], "duplicate");
    assert_eq!(d[1]["verdict"], "accepted");
    assert_eq!(d[1]["delivery_id"], "d-1");
    assert_eq!(d[1]["builds"][0], name);

    // An admin replays the accepted delivery: it builds again, recorded as a replay.
    let o = t.h.cli(&["replay", &format!("#{}", d[1]["id"])]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let replayed = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_ne!(replayed, name);
    assert_eq!(t.builds().len(), 2);
    let d = t.deliveries();
    assert_eq!(d[0]["verdict"], "accepted");
    assert!(d[0]["reason"]
        .as_str()
        .unwrap()
        .contains("replay of delivery"));
    assert_eq!(d[0]["builds"][0], replayed.as_str());
    // A duplicate kept no body and cannot be replayed.
    let o = t.h.cli(&["replay", &d[1]["id"].to_string()]);
    assert!(!o.status.success());
}

#[test]
fn forged_missing_and_legacy_signatures_are_refused_without_a_trace() {
    let t = Hooked::new(gh_hook(json!({})));
    let body = fixture("github_push_new_branch.json");
    let base = |sig: Option<(&'static str, String)>| {
        let mut h = vec![
            ("Content-Type", "application/json".to_string()),
            ("X-GitHub-Event", "push".to_string()),
            ("X-GitHub-Delivery", "forged".to_string()),
        ];
        if let Some(s) = sig {
            h.push(s);
        }
        h
    };
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    for (headers, payload) in [
        (base(None), body.clone()),
        (
            base(Some(("X-Hub-Signature-256", sign(b"something else")))),
            body.clone(),
        ),
        (base(Some(("X-Hub-Signature-256", sign(&body)))), tampered),
        (
            base(Some((
                "X-Hub-Signature",
                "sha1=0123456789abcdef0123456789abcdef01234567".into(),
            ))),
            body.clone(),
        ),
        (
            base(Some(("X-Hub-Signature-256", "sha256=nothex".into()))),
            body.clone(),
        ),
    ] {
        let (st, v) = t.send("name=gh&project=p", &headers, &payload);
        assert_eq!(st, 401, "{v}");
    }
    assert!(t.builds().is_empty());
    assert!(t.deliveries().is_empty(), "a forged delivery left a record");
}

#[test]
fn repository_actor_and_branch_filters() {
    // Wrong repository and unauthorized actor are refused; another branch is acknowledged.
    let t = Hooked::new(json!({"in-webhooks": [
        {"name": "gh", "repository": "other-repo", "authorized-actors": ["codertocat"], "secret": SECRET},
        {"name": "actor", "authorized-actors": ["alice"], "secret": SECRET},
        {"name": "branch", "branch": "main", "authorized-actors": ["Codertocat"], "secret": SECRET}
    ]}));
    let body = fixture("github_push_new_branch.json");
    let (st, v) = t.github("push", "a", &body);
    assert_eq!(st, 403, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("repository"));
    let hdr = |d: &str| {
        vec![
            ("Content-Type", "application/json".to_string()),
            ("X-GitHub-Event", "push".to_string()),
            ("X-GitHub-Delivery", d.to_string()),
            ("X-Hub-Signature-256", sign(&body)),
        ]
    };
    let (st, v) = t.send("name=actor&project=p", &hdr("b"), &body);
    assert_eq!(st, 403, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("Codertocat"));
    let (st, v) = t.send("name=branch&project=p", &hdr("c"), &body);
    assert_eq!(st, 200, "{v}");
    assert!(v["ignored"].as_str().unwrap().contains("master"));
    assert!(t.builds().is_empty());
    let verdicts: Vec<String> = t
        .deliveries()
        .iter()
        .map(|d| d["verdict"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(verdicts, vec!["ignored", "refused", "refused"]);
}

#[test]
fn pings_tags_deletions_and_other_events_build_nothing() {
    let t = Hooked::new(gh_hook(json!({})));
    let (st, v) = t.github("ping", "p1", &fixture("github_ping.json"));
    assert_eq!((st, v["ping"].clone()), (200, json!(true)), "{v}");
    let (st, v) = t.github("push", "p2", &fixture("github_push_tag_deleted.json"));
    assert_eq!(st, 200, "{v}");
    assert!(v["ignored"].is_string());
    let (st, v) = t.github(
        "pull_request",
        "p3",
        &fixture("github_pull_request_opened.json"),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["ignored"].as_str().unwrap().contains("pull_request"));
    assert!(t.builds().is_empty());
}

/// The delivery log stays bounded: a ping and an ignored delivery are recorded without a body
/// (so there is nothing to replay), and an accepted delivery's body is dropped once it is older
/// than `delivery_body_max_age_days`, its record kept.
#[test]
fn delivery_bodies_are_kept_only_for_replay_and_only_so_long() {
    let age = Duration::from_secs(6);
    let t = Hooked::with_conf(
        gh_hook(json!({})),
        json!({"delivery_body_max_age_days": age.as_secs_f64() / 86_400.0}),
    );
    let (st, v) = t.github("ping", "b-ping", &fixture("github_ping.json"));
    assert_eq!(st, 200, "{v}");
    let (st, v) = t.github("push", "b-tag", &fixture("github_push_tag_deleted.json"));
    assert_eq!(st, 200, "{v}");
    assert!(v["ignored"].is_string(), "{v}");
    let body = fixture("github_push_new_branch.json");
    let sent = std::time::Instant::now();
    let (st, v) = t.github("push", "b-push", &body);
    assert_eq!(st, 202, "{v}");
    let find = |id: &str| {
        t.deliveries()
            .into_iter()
            .find(|d| d["delivery_id"] == id)
            .unwrap_or_else(|| panic!("no delivery {id}"))
    };
    let pushed = find("b-push");
    assert!(
        sent.elapsed() < age,
        "the machine is too slow for this test"
    );
    assert_eq!(pushed["body_bytes"], body.len(), "{pushed}");
    assert_eq!(pushed["verdict"], "accepted");
    for id in ["b-ping", "b-tag"] {
        let d = find(id);
        assert_eq!(d["body_bytes"], 0, "{d}");
        let o = t.h.cli(&["replay", &d["id"].to_string()]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("kept no body"), "{err}");
    }
    // The accepted delivery's body goes once it is older than the age, its record stays.
    let gone = wait_for(
        "the old body to be dropped",
        Duration::from_secs(60),
        || {
            let d = find("b-push");
            (d["body_bytes"] == 0).then_some(d)
        },
    );
    assert!(sent.elapsed() >= age, "dropped before its time");
    assert_eq!(gone["verdict"], "accepted");
    assert_eq!(gone["builds"].as_array().unwrap().len(), 1);
    let o = t.h.cli(&["replay", &gone["id"].to_string()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("kept no body"));
}

#[test]
fn bitbucket_cloud_and_data_center_pushes() {
    let t = Hooked::new(json!({"in-webhooks": [
        {"name": "cloud", "repository": "repo_name", "authorized-actors": ["emma"], "secret": SECRET},
        {"name": "dc", "repository": "test-repo", "branch": "master", "authorized-actors": ["John"], "secret": SECRET}
    ]}));
    let body = fixture("bitbucket_cloud_repo_push.json");
    let (st, v) = t.send(
        "name=cloud&project=p",
        &[
            ("Content-Type", "application/json".into()),
            ("X-Event-Key", "repo:push".into()),
            ("X-Request-UUID", "u-1".into()),
            ("X-Hub-Signature", sign(&body)),
        ],
        &body,
    );
    assert_eq!(st, 202, "{v}");
    let name = v["builds"][0].as_str().unwrap().to_string();
    let r = t.h.wait_status("p", &name, Duration::from_secs(60));
    assert_eq!(r["branch"], "name-of-branch");
    assert_eq!(r["commit"], "709d658dc5b6d6afcd46049c2f332ee3f515a67d");
    assert_eq!(r["created_by"], "Emma");

    let body = fixture("bitbucket_server_refs_changed_update.json");
    let (st, v) = t.send(
        "name=dc&project=p",
        &[
            ("Content-Type", "application/json; charset=UTF-8".into()),
            ("X-Event-Key", "repo:refs_changed".into()),
            ("X-Request-Id", "r-1".into()),
            ("X-Hub-Signature", sign(&body)),
        ],
        &body,
    );
    assert_eq!(st, 202, "{v}");
    let name = v["builds"][0].as_str().unwrap().to_string();
    let r = t.h.wait_status("p", &name, Duration::from_secs(60));
    assert_eq!(r["commit"], "22671f0349857934857983457983475ec39f196b");
    assert_eq!(r["created_by"], "john");

    let ping = br#"{"test": true}"#;
    let (st, _) = t.send(
        "name=dc&project=p",
        &[
            ("Content-Type", "application/json".into()),
            ("X-Event-Key", "diagnostics:ping".into()),
            ("X-Hub-Signature", sign(ping)),
        ],
        ping,
    );
    assert_eq!(st, 200);
}

#[test]
fn malformed_requests_and_unknown_targets() {
    let t = Hooked::new(gh_hook(json!({})));
    let bad = b"{not json";
    let (st, _) = t.github("push", "m1", bad);
    assert_eq!(st, 400);
    let body = fixture("github_push_new_branch.json");
    let (st, _) = t.send(
        "name=gh&project=p",
        &[
            ("Content-Type", "application/x-www-form-urlencoded".into()),
            ("X-GitHub-Event", "push".into()),
            ("X-Hub-Signature-256", sign(&body)),
        ],
        &body,
    );
    assert_eq!(st, 415);
    let (st, _) = t.send(
        "project=p",
        &[("Content-Type", "application/json".into())],
        &body,
    );
    assert_eq!(st, 400);
    // 26 MB: refused with 413 before the body is read.
    let huge = vec![b' '; 26 * 1024 * 1024];
    let (st, _) = t.github("push", "m2", &huge);
    assert_eq!(st, 413);
    // An unknown project and an unknown webhook look the same.
    let hdr = [
        ("Content-Type", "application/json".to_string()),
        ("X-GitHub-Event", "push".to_string()),
        ("X-Hub-Signature-256", sign(&body)),
    ];
    let a = t.send("name=gh&project=nope", &hdr, &body);
    let b = t.send("name=nope&project=p", &hdr, &body);
    let c = t.send("name=gh&project=..%2Fp", &hdr, &body);
    assert_eq!(a.0, 404);
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert!(t.builds().is_empty());
}

#[test]
fn unsigned_webhooks_need_saying_and_are_warned_about() {
    let t = Hooked::new(json!({"in-webhooks": [
        {"name": "open", "authorized-actors": ["codertocat"], "allow-unsigned": true}
    ]}));
    assert!(
        t.h.host_log().contains("accepts unsigned deliveries"),
        "{}",
        t.h.host_log()
    );
    let body = fixture("github_push_new_branch.json");
    let (st, v) = t.send(
        "name=open&project=p",
        &[
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", "push".into()),
        ],
        &body,
    );
    assert_eq!(st, 202, "{v}");
}

#[test]
fn a_custom_sender_uses_webhook_fields_json() {
    let t = Hooked::new(json!({"in-webhooks": [
        {"name": "custom", "authorized-actors": ["bot"], "secret": SECRET}
    ]}));
    std::fs::write(
        t.h.data
            .join("projects/p/master/config/webhook_fields.json"),
        r#"{"actor": ["who"], "repository": ["repo"], "branch": ["where", 0], "hash": ["what"]}"#,
    )
    .unwrap();
    let body = br#"{"who": "Bot", "repo": "r", "where": ["refs/heads/dev"], "what": "abcdef12"}"#;
    let (st, v) = t.send(
        "name=custom&project=p",
        &[
            ("Content-Type", "application/json".into()),
            ("X-Hub-Signature-256", sign(body)),
        ],
        body,
    );
    assert_eq!(st, 202, "{v}");
    let name = v["builds"][0].as_str().unwrap().to_string();
    let r = t.h.wait_status("p", &name, Duration::from_secs(60));
    assert_eq!(
        (r["branch"].clone(), r["commit"].clone()),
        (json!("dev"), json!("abcdef12"))
    );
}

#[test]
fn a_webhook_build_checks_out_the_pushed_commit_and_never_runs_the_branch_name() {
    require_docker();
    let mut h = TestHost::new();
    let repo = h.tmp.path().join("repo");
    let c1 = git_repo(
        &repo,
        &[
            (
                "pipeline.json",
                &pipeline(json!([stage("show", &["echo version=$(cat v.txt)"])])),
            ),
            ("v.txt", "one"),
        ],
    );
    std::fs::write(repo.join("v.txt"), "two").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    let evil = "$(touch${IFS}/tmp/ams-pwned-by-webhook)";
    git(&repo, &["checkout", "-q", "-b", evil]);
    std::fs::write(repo.join("v.txt"), "evil").unwrap();
    git(&repo, &["commit", "-q", "-am", "evil"]);
    let c_evil = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-q", "main"]);
    let _ = std::fs::remove_file("/tmp/ams-pwned-by-webhook");
    let o = h.cli(&["project", "add", "g", "--git", repo.to_str().unwrap()]);
    assert!(o.status.success());
    std::fs::write(
        h.data.join("projects/g/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["alice"], "secret": SECRET}]})
            .to_string(),
    )
    .unwrap();
    h.start();
    let addr = h.webhook_addr();
    for (branch, commit, want) in [
        ("main", &c1, "version=one"),
        (evil, &c_evil, "version=evil"),
    ] {
        let body = json!({"ref": format!("refs/heads/{branch}"), "after": commit,
                          "repository": {"name": "repo"}, "pusher": {"name": "alice"}})
        .to_string();
        let (st, v) = http(
            &addr,
            "POST",
            "/ams-build/request?name=gh&project=g",
            &[
                ("Content-Type", "application/json".into()),
                ("X-GitHub-Event", "push".into()),
                ("X-Hub-Signature-256", sign(body.as_bytes())),
            ],
            body.as_bytes(),
        );
        assert_eq!(st, 202, "{v}");
        let name = v["builds"][0].as_str().unwrap().to_string();
        let r = h.wait_status("g", &name, Duration::from_secs(120));
        let log = h.log("g", &name);
        assert_eq!(r["status"], "pass", "{log}");
        assert_eq!(
            &r["git_hash"],
            &json!(commit),
            "the pushed commit, not the branch head"
        );
        assert!(log.contains(want), "{log}");
    }
    assert!(!std::path::Path::new("/tmp/ams-pwned-by-webhook").exists());
}

fn try_post(
    addr: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Option<(u16, Value)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

type Answer = (String, u16, Vec<String>, Duration);

#[test]
fn a_burst_of_signed_pushes_loses_nothing_across_a_restart() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    // A fixed port, so that senders find the host again after its restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut h = TestHost::with_conf(json!({"webhook_port": port}));
    h.project(
        "p",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.private_config("p", json!({"only-build-latest": true}));
    std::fs::write(
        h.data.join("projects/p/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"], "secret": SECRET}]}).to_string(),
    )
    .unwrap();
    h.start();
    let addr = format!("127.0.0.1:{port}");
    let body = Arc::new(fixture("github_push_new_branch.json"));
    let sig = sign(&body);
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (addr, body, sig, answers, sent) = (
                addr.clone(),
                body.clone(),
                sig.clone(),
                answers.clone(),
                sent.clone(),
            );
            std::thread::spawn(move || {
                for i in 0..250 {
                    let id = format!("burst-{t}-{i}");
                    let headers = [
                        ("Content-Type", "application/json".to_string()),
                        ("X-GitHub-Event", "push".to_string()),
                        ("X-GitHub-Delivery", id.clone()),
                        ("X-Hub-Signature-256", sig.clone()),
                    ];
                    // Like a sender's redelivery: the same id again until it is answered.
                    let deadline = std::time::Instant::now() + Duration::from_secs(120);
                    loop {
                        let t0 = std::time::Instant::now();
                        if let Some((st, v)) = try_post(
                            &addr,
                            "/ams-build/request?name=gh&project=p",
                            &headers,
                            &body,
                        ) {
                            let builds = v["builds"]
                                .as_array()
                                .map(|b| {
                                    b.iter().map(|x| x.as_str().unwrap().to_string()).collect()
                                })
                                .unwrap_or_default();
                            answers
                                .lock()
                                .unwrap()
                                .push((id.clone(), st, builds, t0.elapsed()));
                            break;
                        }
                        assert!(std::time::Instant::now() < deadline, "{id} never answered");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(35));
                }
            })
        })
        .collect();
    wait_for("half of the burst", Duration::from_secs(60), || {
        (sent.load(Ordering::SeqCst) >= 500).then_some(())
    });
    h.kill();
    h.start();
    for t in threads {
        t.join().unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.len(), 1000);
    let slowest = answers.iter().map(|a| a.3).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "slowest answer {slowest:?}"
    );
    let mut accepted = Vec::new();
    for (id, st, builds, _) in &answers {
        match st {
            202 => {
                assert_eq!(builds.len(), 1, "{id}");
                accepted.push((id.clone(), builds[0].clone()));
            }
            // An answer lost in the kill: the redelivery is recognised.
            200 => {}
            other => panic!("{id}: status {other}"),
        }
    }
    assert!(accepted.len() >= 990, "only {} accepted", accepted.len());
    // Every accepted delivery's build reaches a final, recorded state.
    wait_for("the queue to drain", Duration::from_secs(120), || {
        let st = h.req(json!({"cmd": "status"}));
        (st["active"].as_array().unwrap().is_empty()
            && st["pending"].as_array().unwrap().is_empty())
        .then_some(())
    });
    let builds = h.req(json!({"cmd": "builds", "project": "p", "limit": 1000}))["builds"]
        .as_array()
        .unwrap()
        .clone();
    let status: std::collections::HashMap<String, String> = builds
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (id, name) in &accepted {
        let s = status
            .get(name)
            .unwrap_or_else(|| panic!("{id}: build {name} lost"));
        assert!(
            ["dummy", "skip", "error"].contains(&s.as_str()),
            "{id}: {name} is {s}"
        );
    }
    // Each of the 1,000 delivery ids was accepted exactly once.
    let d = h.req(json!({"cmd": "deliveries", "project": "p", "limit": 5000}))["deliveries"]
        .as_array()
        .unwrap()
        .clone();
    let mut once: std::collections::HashMap<String, usize> = Default::default();
    for x in d.iter().filter(|x| x["verdict"] == "accepted") {
        *once
            .entry(x["delivery_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(once.len(), 1000, "accepted ids");
    assert!(once.values().all(|n| *n == 1));
    let peak_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", h.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!(
        "accepted {}, slowest {slowest:?}, peak RSS {peak_kb} kB",
        accepted.len()
    );
    assert!(peak_kb < 64 * 1024, "host peak RSS {peak_kb} kB");
}

#[test]
fn a_slow_sender_is_cut_off() {
    let t = Hooked::new(gh_hook(json!({})));
    let mut s = TcpStream::connect(&t.addr).unwrap();
    s.write_all(b"POST /ams-build/request?name=gh&project=p HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Never finish the headers: the server must close the connection on its own.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    assert!(r.is_ok(), "the connection was still open after 20 s: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    // And the listener still answers others.
    let (st, _) = t.github("ping", "after-slow", &fixture("github_ping.json"));
    assert_eq!(st, 200);
}

/// Sends a request's head only and reads the answer: its status and how long it took (a
/// status of 0 when none came within `within`).
fn head_only(addr: &str, head: &str, within: Duration) -> (u16, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let t0 = std::time::Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, t0.elapsed())
}

#[test]
fn the_listener_refuses_before_it_reads_the_body() {
    let t = Hooked::new(gh_hook(json!({})));
    let sig = sign(b"whatever");
    let post = |query: &str, extra: &str| {
        format!(
            "POST /ams-build/request?{query} HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nX-GitHub-Event: push\r\n{extra}\r\n"
        )
    };
    // Each is answered at once, though not one byte of the body is ever sent: the body
    // deadline (10 s, 408) never comes into it.
    for (query, extra, want) in [
        // An unknown project or webhook, whatever the length it declares.
        (
            "name=nope&project=p",
            format!("X-Hub-Signature-256: {sig}\r\nContent-Length: 10000000000\r\n"),
            404,
        ),
        (
            "name=gh&project=nope",
            format!("X-Hub-Signature-256: {sig}\r\nContent-Length: 10000000000\r\n"),
            404,
        ),
        // A signed webhook's delivery without a signature.
        ("name=gh&project=p", "Content-Length: 1000\r\n".into(), 401),
        // More than the cap declared.
        (
            "name=gh&project=p",
            format!("X-Hub-Signature-256: {sig}\r\nContent-Length: 26214401\r\n"),
            413,
        ),
        // No length declared at all.
        (
            "name=gh&project=p",
            format!("X-Hub-Signature-256: {sig}\r\n"),
            411,
        ),
    ] {
        let (st, took) = head_only(&t.addr, &post(query, &extra), Duration::from_secs(8));
        assert_eq!(st, want, "{query} {extra}");
        assert!(took < Duration::from_secs(5), "{query} {extra}: {took:?}");
    }
    assert!(t.deliveries().is_empty());
}

#[test]
fn a_body_is_never_read_past_its_declared_length_or_the_cap() {
    let t = Hooked::new(gh_hook(json!({})));
    // A body longer than its declared length: only the declared bytes are the delivery (the
    // signature covers exactly them), and what follows is not read as part of it.
    let ping = fixture("github_ping.json");
    let mut s = TcpStream::connect(&t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /ams-build/request?name=gh&project=p HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nX-GitHub-Event: ping\r\nX-GitHub-Delivery: longer\r\n\
         X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        sign(&ping),
        ping.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&ping).unwrap();
    let _ = s.write_all(&vec![b'x'; 1 << 20]);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let d = t.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["verdict"], "ping");

    // A chunked body (no length declared) is taken, and read up to the cap at most.
    let body = fixture("github_push_new_branch.json");
    let chunked = |s: &mut TcpStream, id: &str, sig: &str| {
        let head = format!(
            "POST /ams-build/request?name=gh&project=p HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: {id}\r\n\
             X-Hub-Signature-256: {sig}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
    };
    let mut s = TcpStream::connect(&t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    chunked(&mut s, "chunked", &sign(&body));
    for part in body.chunks(1000) {
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .unwrap();
        s.write_all(part).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");

    // An endless chunked body: 413 once it passes the cap, and the host reads no further
    // (the sender's writes fail soon after, however much it had left to send).
    const CAP: usize = 25 * 1024 * 1024;
    let mut s = TcpStream::connect(&t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    chunked(&mut s, "endless", &sign(b"x"));
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "x".repeat(1 << 16));
        let mut sent = 0usize;
        while sent < 8 * CAP && writer.write_all(chunk.as_bytes()).is_ok() {
            sent += 1 << 16;
        }
        sent
    });
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let sent = sender.join().unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        sent < CAP + 32 * 1024 * 1024,
        "{sent} bytes went out before the host stopped reading"
    );
    assert_eq!(t.deliveries().len(), 2, "the refused bodies left no record");
}

#[test]
fn bodies_in_flight_share_a_bounded_memory() {
    let t = Hooked::new(gh_hook(json!({})));
    // Four deliveries that declare the most a body may have and send it slowly hold all of
    // the 100 MiB the listener gives bodies; the fifth is turned away at once, unread.
    let head = |expect: &str| {
        format!(
            "POST /ams-build/request?name=gh&project=p HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nX-GitHub-Event: push\r\n\
             X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n{expect}\r\n",
            sign(b"x"),
            25 * 1024 * 1024
        )
    };
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&t.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The host asks for the body (100 Continue) once it has reserved room for it.
        s.write_all(head("Expect: 100-continue\r\n").as_bytes())
            .unwrap();
        let mut got = [0u8; 25];
        s.read_exact(&mut got).unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 100 Continue"), "{got}");
        s.write_all(b"{").unwrap();
        slow.push(s);
    }
    let (st, took) = head_only(&t.addr, &head(""), Duration::from_secs(8));
    assert_eq!(st, 503);
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Their room comes back when they end: a small delivery is taken again.
    drop(slow);
    let body = fixture("github_push_new_branch.json");
    wait_for(
        "a delivery to be taken again",
        Duration::from_secs(15),
        || {
            let (st, _) = t.github("push", "after-the-big-ones", &body);
            (st == 202).then_some(())
        },
    );
}
