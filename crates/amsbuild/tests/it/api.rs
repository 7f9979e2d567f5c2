//! The JSON API over real HTTP: the access matrix (each level, own and other project), the
//! described system's shapes and filters, pagination and field selection, tokens.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

struct Api {
    h: TestHost,
    addr: String,
    tokens: std::collections::HashMap<&'static str, String>,
}

impl Api {
    fn new() -> Self {
        let mut h = TestHost::new();
        for p in ["mine", "other"] {
            h.project(
                p,
                &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
            );
        }
        let mut tokens = std::collections::HashMap::new();
        for (name, level, projects) in [
            ("u_user", "1", "mine"),
            ("u_webhook", "2", "mine"),
            ("u_mod", "3", "mine"),
            ("u_admin", "4", "mine"),
            ("u_server", "5", ""),
        ] {
            let o = h
                .cmd()
                .args([
                    "user",
                    "add",
                    name,
                    "--level",
                    level,
                    "--projects",
                    projects,
                    "--password-stdin",
                ])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(b"a long password\n")?;
                    c.wait_with_output()
                })
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let o = h.cli(&["token", "create", "--user", name]);
            assert!(o.status.success());
            tokens.insert(name, String::from_utf8_lossy(&o.stdout).trim().to_string());
        }
        h.start();
        let addr = h.web_addr();
        Api { h, addr, tokens }
    }

    fn call(&self, who: Option<&str>, method: &str, path: &str) -> (u16, Value) {
        let mut headers = vec![("Content-Type", "application/json".to_string())];
        if let Some(w) = who {
            headers.push(("Authorization", format!("Bearer {}", self.tokens[w])));
        }
        let body: &[u8] = if method == "POST" { b"{}" } else { b"" };
        http(
            &self.addr,
            method,
            &format!("/ams-build/api{path}"),
            &headers,
            body,
        )
    }
}

#[test]
fn the_access_matrix_of_the_api() {
    let a = Api::new();
    // (user, sees mine, operates mine, sees other)
    let rows = [
        ("u_user", true, false, false),
        ("u_mod", true, true, false),
        ("u_admin", true, true, false),
        ("u_server", true, true, true),
    ];
    let missing = a.call(Some("u_user"), "GET", "/projects/name/no-such-project");
    assert_eq!(missing.0, 404);
    for (who, see, op, other) in rows {
        let (st, list) = a.call(Some(who), "GET", "/projects");
        assert_eq!(st, 200);
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.contains(&"mine"), see, "{who}");
        assert_eq!(names.contains(&"other"), other, "{who}");
        assert_eq!(
            a.call(Some(who), "GET", "/projects/name/mine").0,
            if see { 200 } else { 404 },
            "{who}"
        );
        let o = a.call(Some(who), "GET", "/projects/name/other");
        if other {
            assert_eq!(o.0, 200, "{who}");
        } else {
            // Indistinguishable from a project that does not exist.
            assert_eq!(o, missing, "{who}");
        }
        let (st, v) = a.call(Some(who), "POST", "/projects/name/mine/build");
        assert_eq!(st, if op { 202 } else { 403 }, "{who}: {v}");
        let (st, _) = a.call(Some(who), "POST", "/projects/name/other/build");
        assert_eq!(st, if other { 202 } else { 404 }, "{who}");
        let (st, _) = a.call(Some(who), "GET", "/projects/name/other/builds");
        assert_eq!(st, if other { 200 } else { 404 }, "{who}");
    }
    // WEBHOOK accounts cannot use the API at all; no token or a bad one is 401.
    assert_eq!(a.call(Some("u_webhook"), "GET", "/projects").0, 403);
    assert_eq!(a.call(None, "GET", "/projects").0, 401);
    let (st, _) = http(
        &a.addr,
        "GET",
        "/ams-build/api/projects",
        &[("Authorization", "Bearer nope".into())],
        b"",
    );
    assert_eq!(st, 401);
    // A user who may view cannot cancel or delete.
    let (_, v) = a.call(Some("u_mod"), "POST", "/projects/name/mine/build");
    let name = v["build"]["name"].as_str().unwrap().to_string();
    a.h.wait_status("mine", &name, Duration::from_secs(60));
    assert_eq!(
        a.call(
            Some("u_user"),
            "POST",
            &format!("/builds/{name}/delete-output")
        )
        .0,
        403
    );
    assert_eq!(
        a.call(
            Some("u_mod"),
            "POST",
            &format!("/builds/{name}/delete-output")
        )
        .0,
        200
    );
}

#[test]
fn shapes_filters_pages_and_fields() {
    let a = Api::new();
    let mut names = Vec::new();
    for _ in 0..3 {
        let (st, v) = a.call(Some("u_mod"), "POST", "/projects/name/mine/build");
        assert_eq!(st, 202, "{v}");
        names.push(v["build"]["name"].as_str().unwrap().to_string());
    }
    for n in &names {
        a.h.wait_status("mine", n, Duration::from_secs(60));
    }
    let (st, p) = a.call(Some("u_user"), "GET", "/projects/name/mine");
    assert_eq!(st, 200);
    assert_eq!(p["name"], "mine");
    assert_eq!(p["project_info"]["ProjectName"], "mine");
    assert_eq!(p["project_info"]["latest_build_index"], 3);
    let b = &p["builds"][0];
    assert_eq!(b["name"], names[2].as_str());
    for k in [
        "hash",
        "git_hash",
        "build_id",
        "status",
        "created_by",
        "created_at",
        "canceled_by",
        "canceled_at",
        "7z_link",
        "7z_hash",
        "output_log",
    ] {
        assert!(b.get(k).is_some(), "missing {k}");
    }
    assert_eq!(b["created_by"], "u_mod");
    assert_eq!(b["output_log"], format!("output/mine/{}", names[2]));
    assert!(b["created_at"].as_str().unwrap().contains(" @ "));
    // The list written straight from the rows is the list made from the records.
    let (st, list) = a.call(Some("u_user"), "GET", "/projects/name/mine/builds");
    assert_eq!(st, 200);
    assert_eq!(list, p["builds"]);
    assert!(p["tasks"]["active"].is_array() && p["tasks"]["pending"].is_array());
    let (_, t) = a.call(Some("u_user"), "GET", "/tasks");
    assert!(t["active"].is_array() && t["pending"].is_array());
    assert!(a
        .call(Some("u_user"), "GET", "/tasks/queued/project/mine")
        .1
        .is_array());

    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/status/dummy",
    );
    assert_eq!(f.as_array().unwrap().len(), 3);
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/status/pass",
    );
    assert!(f.as_array().unwrap().is_empty());
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/created_by/u_mod/status/dummy",
    );
    assert_eq!(f.as_array().unwrap().len(), 3);
    let (_, page) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds?per_page=1&page=2&fields=name,status",
    );
    let page = page.as_array().unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["name"], names[1].as_str());
    assert_eq!(
        page[0].as_object().unwrap().len(),
        2,
        "only the named fields"
    );
    // Filters on a column and on a JSON-only field, with null and pagination, agree.
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/canceled_by/null/status/dummy?per_page=2&page=1",
    );
    let f = f.as_array().unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f[0]["name"], names[2].as_str(), "newest first");
    let out = format!("output/mine/{}", names[0]);
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        &format!("/projects/name/mine/builds/output_log/{out}/status/dummy"),
    );
    assert_eq!(
        f.as_array().unwrap().len(),
        0,
        "a slash in a value splits it"
    );
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/status/dummy/created_at_iso/nonesuch",
    );
    assert!(f.as_array().unwrap().is_empty());
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        &format!(
            "/projects/name/mine/builds/status/dummy/name/{}/project/mine",
            names[1]
        ),
    );
    assert_eq!(
        f.as_array().unwrap().len(),
        1,
        "column and JSON filters together"
    );
    let (_, f) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds/project/mine?per_page=1&page=3",
    );
    let f = f.as_array().unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0]["name"],
        names[0].as_str(),
        "JSON-filtered pages cut right"
    );
    let (st, _) = a.call(Some("u_user"), "GET", "/projects/name/mine/builds/status");
    assert_eq!(st, 400, "an odd number of segments");
    let (_, info) = a.call(Some("u_user"), "GET", "/projects/name/mine/project_info");
    assert_eq!(info["latest_build_key"], names[2].as_str());
    let (_, me) = a.call(Some("u_admin"), "GET", "/user");
    assert_eq!(me["name"], "u_admin");
    assert_eq!(me["level_name"], "ADMIN");

    // A list read twice is the same; a new build shows at once (the response cache follows
    // the data).
    let first = a
        .call(Some("u_user"), "GET", "/projects/name/mine/builds")
        .1;
    assert_eq!(
        first,
        a.call(Some("u_user"), "GET", "/projects/name/mine/builds")
            .1
    );
    let newer = a.h.build("mine");
    let (_, again) = a.call(Some("u_user"), "GET", "/projects/name/mine/builds");
    assert_eq!(again[0]["name"], newer.as_str(), "{again}");
    a.h.wait_status("mine", &newer, Duration::from_secs(60));
    let (_, done) = a.call(Some("u_user"), "GET", "/projects/name/mine/builds");
    assert_eq!(done[0]["status"], "dummy", "{}", done[0]);
    let (_, older) = a.call(
        Some("u_user"),
        "GET",
        "/projects/name/mine/builds?page=2&per_page=1",
    );
    assert_eq!(older[0]["name"], names[2].as_str());
    // A revoked token stops working.
    let o = a.h.cli(&["token", "revoke", "--user", "u_user", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(a.call(Some("u_user"), "GET", "/projects").0, 401);
}

#[test]
fn user_commands_keep_passwords_hashed_and_refuse_bad_input() {
    let h = TestHost::new();
    h.cli(&["project", "init", "p"]);
    let add = |args: &[&str], pw: &str| {
        let mut c = h
            .cmd()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(pw.as_bytes()).unwrap();
        }
        c.wait_with_output().unwrap()
    };
    let ok = add(
        &[
            "user",
            "add",
            "alice",
            "--level",
            "3",
            "--projects",
            "p",
            "--password-stdin",
        ],
        "a secret password\n",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!add(
        &["user", "add", "bob", "--level", "3", "--password-stdin"],
        "short\n"
    )
    .status
    .success());
    assert!(!add(
        &["user", "add", "carol", "--level", "9", "--password-stdin"],
        "a secret password\n"
    )
    .status
    .success());
    assert!(!add(
        &[
            "user",
            "add",
            "dave",
            "--level",
            "1",
            "--projects",
            "nope",
            "--password-stdin"
        ],
        "a secret password\n"
    )
    .status
    .success());
    assert!(!add(
        &["user", "add", "alice", "--level", "1", "--password-stdin"],
        "a secret password\n"
    )
    .status
    .success());
    for f in ["ams.db", "ams.db-wal"] {
        let db = std::fs::read(h.data.join(f)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&db).contains("a secret password"),
            "password stored in the clear in {f}"
        );
    }
    let list = String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string();
    assert!(
        list.contains("alice") && list.contains("MODERATOR"),
        "{list}"
    );
    assert!(h
        .cli(&["user", "set", "alice", "--level", "4"])
        .status
        .success());
    assert!(String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).contains("ADMIN"));
    assert!(add(
        &["user", "passwd", "alice", "--password-stdin"],
        "another long one\n"
    )
    .status
    .success());
    assert!(h.cli(&["user", "remove", "alice"]).status.success());
    assert!(!h.cli(&["user", "remove", "alice"]).status.success());
}

#[test]
fn logs_and_archives_are_served_only_to_those_who_may_see_them() {
    let a = Api::new();
    let (_, v) = a.call(Some("u_mod"), "POST", "/projects/name/mine/build");
    let name = v["build"]["name"].as_str().unwrap().to_string();
    a.h.wait_status("mine", &name, Duration::from_secs(60));
    let auth = |w: &str| vec![("Authorization", format!("Bearer {}", a.tokens[w]))];
    let (st, head, body) = http_raw(
        &a.addr,
        &format!("/ams-build/output/mine/{name}"),
        &auth("u_user"),
    );
    assert_eq!(st, 200);
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("dummy build"));
    let (st, head, body) = http_raw(
        &a.addr,
        &format!("/ams-build/dl/mine/{name}"),
        &auth("u_user"),
    );
    assert_eq!(st, 200);
    assert!(head.contains("content-disposition: attachment"), "{head}");
    assert!(body.starts_with(b"7z\xBC\xAF\x27\x1C"), "not a 7z file");
    // No token: 401. A project the user may not see, or a build of another project: 404.
    assert_eq!(
        http_raw(&a.addr, &format!("/ams-build/output/mine/{name}"), &[]).0,
        401
    );
    let (_, v) = a.call(Some("u_server"), "POST", "/projects/name/other/build");
    let theirs = v["build"]["name"].as_str().unwrap().to_string();
    a.h.wait_status("other", &theirs, Duration::from_secs(60));
    assert_eq!(
        http_raw(
            &a.addr,
            &format!("/ams-build/output/other/{theirs}"),
            &auth("u_user")
        )
        .0,
        404
    );
    assert_eq!(
        http_raw(
            &a.addr,
            &format!("/ams-build/output/mine/{theirs}"),
            &auth("u_user")
        )
        .0,
        404
    );
    // Traversal in every form answers 404.
    for path in [
        "/ams-build/output/mine/..%2F..%2F..%2Fweb_conf.json",
        "/ams-build/output/mine/%2e%2e%2f%2e%2e%2fweb_conf.json",
        "/ams-build/output/mine/..%5C..%5Cweb_conf.json",
        "/ams-build/output/mine/../../web_conf.json",
        "/ams-build/output/..%2Fmine/x",
        "/ams-build/dl/mine/name%00.7z",
        "/ams-build/dl/mine/..",
        "/ams-build/output/mine/output.txt",
    ] {
        let (st, _, body) = http_raw(&a.addr, path, &auth("u_server"));
        assert_eq!(st, 404, "{path}");
        assert!(
            !String::from_utf8_lossy(&body).contains("webhook_port"),
            "{path} leaked web_conf.json"
        );
    }
}

#[test]
fn admins_see_deliveries_and_notifications_and_replay() {
    let a = Api::new();
    std::fs::write(
        a.h.data.join("projects/mine/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"], "allow-unsigned": true}],
               "out-webhooks": [{"hook-name": "local", "type": "json", "trigger": "build-complete",
                                 "url": "http://10.255.255.1/hook/SECRET"}]})
        .to_string(),
    )
    .unwrap();
    let (st, v) = http(
        &a.h.webhook_addr(),
        "POST",
        "/ams-build/request?name=gh&project=mine",
        &[
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", "push".into()),
            ("X-GitHub-Delivery", "x1".into()),
        ],
        &fixture("github_push_new_branch.json"),
    );
    assert_eq!(st, 202, "{v}");
    let build = v["builds"][0].as_str().unwrap().to_string();
    a.h.wait_status("mine", &build, Duration::from_secs(60));
    let (st, d) = a.call(Some("u_admin"), "GET", "/projects/name/mine/deliveries");
    assert_eq!(st, 200);
    let id = d[0]["id"].as_i64().unwrap();
    assert_eq!(d[0]["verdict"], "accepted");
    assert_eq!(
        a.call(Some("u_mod"), "GET", "/projects/name/mine/deliveries")
            .0,
        403
    );
    assert_eq!(
        a.call(Some("u_user"), "GET", "/projects/name/mine/deliveries")
            .0,
        403
    );
    assert_eq!(
        a.call(Some("u_admin"), "GET", "/projects/name/other/deliveries")
            .0,
        404
    );
    assert_eq!(
        a.call(Some("u_server"), "GET", "/projects/name/mine/deliveries")
            .0,
        200
    );
    // The notification to a private address was refused, visible to admins with its host only.
    let n = wait_for("the notification record", Duration::from_secs(30), || {
        let (_, n) = a.call(Some("u_admin"), "GET", "/projects/name/mine/notifications");
        n.as_array().filter(|l| !l.is_empty()).cloned()
    });
    assert!(
        n[0]["outcome"].as_str().unwrap().contains("refused"),
        "{}",
        n[0]
    );
    assert_eq!(n[0]["target_host"], "10.255.255.1");
    assert!(!n[0].to_string().contains("SECRET"));
    // Replay: admins only.
    assert_eq!(
        a.call(Some("u_mod"), "POST", &format!("/deliveries/{id}/replay"))
            .0,
        403
    );
    let (st, r) = a.call(Some("u_admin"), "POST", &format!("/deliveries/{id}/replay"));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["builds"].as_array().unwrap().len(), 1);
    assert_ne!(r["builds"][0], build.as_str());
}

#[test]
fn webhooks_and_the_web_interface_can_share_one_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut h = TestHost::with_conf(json!({"webhook_port": port, "web_interface_port": port}));
    h.project(
        "p",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    std::fs::write(
        h.data.join("projects/p/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"], "allow-unsigned": true}]}).to_string(),
    )
    .unwrap();
    h.start();
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(h.web_addr(), addr);
    assert_eq!(h.webhook_addr(), addr);
    let (st, _) = http(
        &addr,
        "POST",
        "/ams-build/request?name=gh&project=p",
        &[
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", "ping".into()),
        ],
        b"{}",
    );
    assert_eq!(st, 200);
    assert_eq!(
        http(&addr, "GET", "/ams-build/api/projects", &[], b"").0,
        401
    );
}

#[test]
fn every_path_of_the_openapi_document_is_served() {
    let a = Api::new();
    std::fs::write(
        a.h.data.join("projects/mine/master/config/webhooks.json"),
        json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"], "allow-unsigned": true}]}).to_string(),
    )
    .unwrap();
    let (st, v) = http(
        &a.h.webhook_addr(),
        "POST",
        "/ams-build/request?name=gh&project=mine",
        &[
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", "push".into()),
        ],
        &fixture("github_push_new_branch.json"),
    );
    assert_eq!(st, 202, "{v}");
    let build = v["builds"][0].as_str().unwrap().to_string();
    a.h.wait_status("mine", &build, Duration::from_secs(60));
    let (_, d) = a.call(Some("u_server"), "GET", "/projects/name/mine/deliveries");
    let id = d[0]["id"].as_i64().unwrap().to_string();
    // A secret for the secret paths (the PUT is sent without a body: 400).
    cli_with_stdin(
        &a.h,
        &["secret", "set", "mine", "TOKEN"],
        "a value long enough",
    );
    let (st, doc) = http(&a.addr, "GET", "/ams-build/api/openapi.json", &[], b"");
    assert_eq!(st, 200, "the document is public");
    let mut ops: Vec<(String, String)> = Vec::new();
    for (path, o) in doc["paths"].as_object().unwrap() {
        for m in o.as_object().unwrap().keys() {
            ops.push((m.to_uppercase(), path.clone()));
        }
    }
    // Deleting last, so the other calls still find the build.
    ops.sort_by_key(|(_, p)| p.ends_with("delete-output"));
    for (method, path) in ops {
        let concrete = path
            .replace("/builds/{name}", &format!("/builds/{build}"))
            .replace("{build}", &build)
            .replace("{name}", "mine")
            .replace("{list}", "active")
            .replace("{secret}", "TOKEN")
            .replace("{id}", &id);
        let (st, v) = a.call(Some("u_server"), &method, &concrete);
        assert!(
            st != 404 && st != 405 && st < 500,
            "{method} {path} -> {st} {v}"
        );
        let documented: Vec<u16> = doc["paths"][&path][method.to_lowercase()]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect();
        assert!(
            documented.contains(&st) || st == 400,
            "{method} {path} answered {st}, documented {documented:?}"
        );
    }
}
