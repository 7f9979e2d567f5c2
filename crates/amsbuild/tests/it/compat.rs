//! The compatibility suite: projects and files written in the described (Python) system's
//! documented formats (`tests/fixtures/compat/`) run through the real host and pass, or fail
//! with an error that names the file, the key and the fix where AMS-Build differs on purpose
//! (every such difference is in docs/coming-from-python.md).

use crate::harness::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DOC: &str = "docs/coming-from-python.md";

fn compat_fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/compat")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A template's pipeline.json with only the image name changed, as the issue's users did.
fn template(name: &str, image: &str) -> String {
    let mut p: Value = serde_json::from_str(&compat_fixture(name)).unwrap();
    p["docker"]["image"] = image.into();
    serde_json::to_string_pretty(&p).unwrap()
}

/// A git repository on branch `main` holding `files`, committed; returns its path and commit.
fn repo(h: &TestHost, files: &[(&str, &str)]) -> (PathBuf, String) {
    let dir = h.tmp.path().join("origin");
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    for (f, text) in files {
        std::fs::write(dir.join(f), text).unwrap();
    }
    git(&dir, &["add", "."]);
    git(&dir, &["commit", "-qm", "first"]);
    let head = git(&dir, &["rev-parse", "HEAD"]);
    (dir, head)
}

fn config_dir(h: &TestHost, project: &str) -> PathBuf {
    h.data.join("projects").join(project).join("master/config")
}

const MINUTE: Duration = Duration::from_secs(60);

/// The example project, as its docs describe it (docker args, environment with a variable,
/// stages judged by `exit-line`, a BLAKE2ep hash, prepare-build host commands), passes; the
/// host commands are refused without trust with the key and the fix, and the built-in git
/// update builds the pushed commit.
#[test]
fn the_example_project_passes_unchanged() {
    require_docker();
    let mut h = TestHost::new();
    let (origin, head) = repo(
        &h,
        &[
            (
                "pipeline.json",
                &template("exampleProject/pipeline.json", IMAGE),
            ),
            ("README.txt", "example project\n"),
        ],
    );
    add_git_project(&h, "exampleProject", &origin);
    h.start();
    let name = h.build("exampleProject");
    let r = h.wait_status("exampleProject", &name, MINUTE);
    let log = h.log("exampleProject", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert_eq!(r["git_hash"], head.as_str());
    assert!(
        r["archive_hash"].as_str().is_some_and(|x| x.len() == 64),
        "BLAKE2ep is 7-Zip's BLAKE2sp: {r}"
    );
    assert!(log.contains("building exampleProject_"), "{log}");
    for want in [
        "refused 1 host command(s) of prepare-build.master-dir-commands",
        "\"trust-host-commands\": true",
        DOC,
    ] {
        assert!(log.contains(want), "no `{want}` in the log:\n{log}");
    }
}

/// The blank template passes once its image is set, and its log says which shell ran the
/// stages (the image has no bash: sh).
#[test]
fn the_blank_template_passes() {
    require_docker();
    let mut h = TestHost::new();
    let (origin, _) = repo(
        &h,
        &[(
            "pipeline.json",
            &template("blankProject/pipeline.json", IMAGE),
        )],
    );
    add_git_project(&h, "blank", &origin);
    h.start();
    let name = h.build("blank");
    let r = h.wait_status("blank", &name, MINUTE);
    let log = h.log("blank", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert!(log.contains("Hello World"), "{log}");
    assert!(log.contains("stages run in sh (set -e)"), "{log}");
}

/// Where an image has bash, stages run in it (the described system ran its commands with
/// bash), chosen once per build by the driver.
#[test]
fn stages_run_in_bash_where_the_image_has_it() {
    require_docker();
    // An image with a `bash` that marks what it ran: the test image has no real bash.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY bash /bin/bash\n"),
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("bash"),
        "#!/bin/sh\nexport RAN_BY=bash\nexec sh \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        ctx.path().join("bash"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let image = "ams-compat-bash:latest";
    let o = std::process::Command::new("docker")
        .args(["build", "-q", "-t", image])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut h = TestHost::new();
    let mut p: Value =
        serde_json::from_str(&template("blankProject/pipeline.json", image)).unwrap();
    p["pipeline"][0]["commands"] = json!(["echo shell=${RAN_BY:-sh}"]);
    h.project("bashy", &p.to_string());
    h.start();
    let name = h.build("bashy");
    let r = h.wait_status("bashy", &name, MINUTE);
    let log = h.log("bashy", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert!(log.contains("stages run in bash (set -e)"), "{log}");
    assert!(log.contains("shell=bash"), "{log}");
}

/// The webhook body the described system documents (no `type`, no sender header, no
/// webhook_fields.json) builds the pushed commit, with or without `X-Event-Key`; its
/// secret-less webhooks.json is refused at start with the file, the key and the fix, and builds
/// once the one-line fix (a secret) is made.
#[test]
fn the_documented_webhook_payload_builds() {
    require_docker();
    let mut h = TestHost::new();
    let (origin, head) = repo(
        &h,
        &[(
            "pipeline.json",
            &template("blankProject/pipeline.json", IMAGE),
        )],
    );
    add_git_project(&h, "exampleProject", &origin);
    let cfg = config_dir(&h, "exampleProject");
    std::fs::write(
        cfg.join("webhooks.json"),
        compat_fixture("exampleProject/webhooks.json"),
    )
    .unwrap();
    h.start();
    let log = h.host_log();
    assert!(
        log.contains("webhooks.json: field `in-webhooks[0].secret`: is missing")
            && log.contains("\"allow-unsigned\": true")
            && log.contains(DOC),
        "{log}"
    );
    // Its Discord template's link would double the address here: said with the fix.
    assert!(
        log.contains("`{base_web_address}/{output_log}` doubles the address")
            && log.contains("write {output_log} alone"),
        "{log}"
    );
    h.term();

    // The one-line fix: a secret.
    let mut w: Value =
        serde_json::from_str(&compat_fixture("exampleProject/webhooks.json")).unwrap();
    w["in-webhooks"][0]["secret"] = "a long shared secret".into();
    w["in-webhooks"][1]["allow-unsigned"] = true.into();
    std::fs::write(cfg.join("webhooks.json"), w.to_string()).unwrap();
    h.start();
    let mut body: Value = serde_json::from_str(&compat_fixture("bitbucket_push.json")).unwrap();
    body["push"]["changes"][0]["new"]["target"]["hash"] = head.as_str().into();
    let body = body.to_string().into_bytes();
    let path = "/ams-build/request?name=Webhook-one&project=exampleProject";
    for event_key in [None, Some("repo:push")] {
        let mut headers = vec![
            ("Content-Type", "application/json".to_string()),
            (
                "X-Hub-Signature-256",
                sign_with("a long shared secret", &body),
            ),
        ];
        if let Some(k) = event_key {
            headers.push(("X-Event-Key", k.to_string()));
        }
        let (code, answer) = http(&h.webhook_addr(), "POST", path, &headers, &body);
        assert_eq!(code, 202, "{event_key:?}: {answer}");
        let name = answer["builds"][0].as_str().unwrap().to_string();
        let r = h.wait_status("exampleProject", &name, MINUTE);
        assert_eq!(r["status"], "pass", "{r}");
        assert_eq!(r["git_hash"], head.as_str());
        assert_eq!(r["created_by"], "git actor");
        assert_eq!(r["branch"], "main");
    }
}

/// webhook_fields.json written as the described system's docs write it (a trailing comma) is
/// read: the host says at start where it is not strict JSON and how to fix it, and a custom
/// sender's delivery builds. A file broken beyond that stops nothing but is named with its
/// line and column.
#[test]
fn webhook_fields_as_documented_is_read_with_a_note() {
    require_docker();
    let mut h = TestHost::new();
    let (origin, head) = repo(
        &h,
        &[(
            "pipeline.json",
            &template("blankProject/pipeline.json", IMAGE),
        )],
    );
    add_git_project(&h, "p", &origin);
    let cfg = config_dir(&h, "p");
    std::fs::write(
        cfg.join("webhooks.json"),
        json!({"in-webhooks": [{"name": "w", "authorized-actors": ["git actor"],
                                "allow-unsigned": true}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        cfg.join("webhook_fields.json"),
        compat_fixture("webhook_fields.json"),
    )
    .unwrap();
    h.start();
    let log = h.host_log();
    assert!(
        log.contains("webhook_fields.json: line 6 column 1") && log.contains(DOC),
        "{log}"
    );
    let mut body: Value = serde_json::from_str(&compat_fixture("bitbucket_push.json")).unwrap();
    body["push"]["changes"][0]["new"]["target"]["hash"] = head.as_str().into();
    let body = body.to_string().into_bytes();
    let (code, answer) = http(
        &h.webhook_addr(),
        "POST",
        "/ams-build/request?name=w&project=p",
        &[("Content-Type", "application/json".to_string())],
        &body,
    );
    assert_eq!(code, 202, "{answer}");
    let name = answer["builds"][0].as_str().unwrap().to_string();
    assert_eq!(h.wait_status("p", &name, MINUTE)["status"], "pass");
    h.term();

    std::fs::write(
        cfg.join("webhook_fields.json"),
        "{\n  \"actor\": [\"actor\" \"display_name\"]\n}\n",
    )
    .unwrap();
    h.start();
    let log = h.host_log();
    assert!(log.contains("webhook_fields.json: line 2 column"), "{log}");
    assert!(log.contains("fix the file"), "{log}");
}

/// The described system's web_conf.json starts the host (only the ports changed, to keep
/// parallel tests apart); its documented `user_ssl` spelling is refused with the fix.
#[test]
fn the_described_web_conf_json_starts_the_host() {
    let mut conf: Value = serde_json::from_str(&compat_fixture("web_conf.json")).unwrap();
    for (k, v) in [
        ("webhook_ip", json!("127.0.0.1")),
        ("webhook_port", json!(0)),
        ("web_interface_ip", json!("127.0.0.1")),
        ("web_interface_port", json!(0)),
    ] {
        conf[k] = v;
    }
    let mut h = TestHost::with_conf(conf.clone());
    h.start();
    let (code, _) = http(&h.web_addr(), "GET", "/healthz", &[], b"");
    assert!(code == 200 || code == 503, "{code}");
    h.term();

    conf["user_ssl"] = false.into();
    std::fs::write(h.data.join("web_conf.json"), conf.to_string()).unwrap();
    let o = h.cmd().arg("serve").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("web_conf.json") && err.contains("rename it to \"use_ssl\""),
        "{err}"
    );
}

/// The described system's users.json is imported on the first start: names, levels and
/// projects; every user locked (its passwords cannot be carried over) and listed with how to
/// set a password; its `admin` test account gives way to our SERVER ADMIN, which the start
/// says is no USER; the file is renamed so it is not read again.
#[test]
fn users_json_is_imported_on_first_start() {
    let mut h = TestHost::new();
    std::fs::write(h.data.join("users.json"), compat_fixture("users.json")).unwrap();
    h.start();
    let log = h.host_log();
    for want in [
        "imported user User_0 (MODERATOR on exampleProject, MODERATOR on project_2)",
        "amsbuild user passwd User_0",
        "imported user viewer (USER on exampleProject) [no access_level in the file: imported as USER]",
        "`admin` (the described system's test account, no projects) is not imported",
        "created the user `admin` (SERVER ADMIN)",
        "first-run `admin` was a USER without projects",
        DOC,
    ] {
        assert!(log.contains(want), "no `{want}` in:\n{log}");
    }
    assert!(!h.data.join("users.json").exists());
    assert!(h.data.join("users.json.imported").exists());
    let list = String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string();
    let line = |n: &str| {
        list.lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("no {n} in {list}"))
            .to_string()
    };
    assert!(line("User_0").contains("locked"), "{list}");
    assert!(line("viewer").contains("locked"), "{list}");
    assert!(!line("admin").contains("locked"), "{list}");

    // A locked user cannot log in, whatever it sends; a password unlocks it.
    let login = |pw: &str| {
        let (code, head, _) = http_full(
            &h.web_addr(),
            "POST",
            "/ams-build/login",
            &[
                (
                    "Content-Type",
                    "application/x-www-form-urlencoded".to_string(),
                ),
                ("Origin", format!("http://{}", h.web_addr())),
            ],
            &form(&[("username", "User_0"), ("password", pw)]),
        );
        (code, head.contains("set-cookie:"))
    };
    assert!(!login("").1 && !login("!locked").1);
    set_password(&h, "User_0", "a new long password");
    assert!(login("a new long password").1);
    let list = String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string();
    assert!(!line_of(&list, "User_0").contains("locked"), "{list}");

    // A later users.json is not read at start, and the log says how to import it.
    h.term();
    std::fs::write(h.data.join("users.json"), compat_fixture("users.json")).unwrap();
    h.start();
    assert!(
        h.host_log()
            .contains("read only on the first start, when the database has no users"),
        "{}",
        h.host_log()
    );
    // Importing by hand refuses names that exist here, naming the fix.
    let o = h.cli(&[
        "user",
        "import",
        h.data.join("users.json").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("exists here already") && err.contains("amsbuild user remove"),
        "{err}"
    );
}

fn line_of(text: &str, start: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_default()
        .to_string()
}

/// A bad users.json stops the first start with the file, the entry and the fix, and imports
/// nothing, so the next start tries again.
#[test]
fn a_bad_users_json_stops_the_first_start_with_the_fix() {
    let h = TestHost::new();
    std::fs::write(
        h.data.join("users.json"),
        r#"[{"username": "ok"}, {"username": "bad name", "access_level": 3}]"#,
    )
    .unwrap();
    let o = h.cmd().arg("serve").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("users.json")
            && err.contains("[1].username")
            && err.contains("amsbuild user add"),
        "{err}"
    );
    assert!(h.data.join("users.json").exists());
    let list = String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string();
    assert!(list.trim().is_empty(), "{list}");
}

/// A build that fails after the git update records the commit it was at.
#[test]
fn a_build_failing_after_the_update_keeps_its_git_hash() {
    require_docker();
    let mut h = TestHost::new();
    let (origin, head) = repo(&h, &[("pipeline.json", "{\"docker\": {}}")]);
    add_git_project(&h, "broken", &origin);
    h.start();
    let name = h.build("broken");
    let r = h.wait_status("broken", &name, MINUTE);
    assert_eq!(r["status"], "fail", "{r}");
    assert_eq!(r["git_hash"], head.as_str(), "{r}");
}

/// `get-git-hash`: with trusted master-dir-commands that move master, the build records (and
/// builds) where they left it, as the described system read it; `false` is said in the log.
#[test]
fn get_git_hash_follows_trusted_master_commands() {
    require_docker();
    let mut h = TestHost::new();
    let mut p: Value =
        serde_json::from_str(&template("blankProject/pipeline.json", IMAGE)).unwrap();
    p["prepare-build"]["master-dir-commands"] = json!(["git checkout -q --detach HEAD~1"]);
    let (origin, first) = repo(&h, &[("pipeline.json", &p.to_string())]);
    std::fs::write(origin.join("second.txt"), "2\n").unwrap();
    git(&origin, &["add", "."]);
    git(&origin, &["commit", "-qm", "second"]);
    add_git_project(&h, "moved", &origin);
    h.private_config("moved", json!({"trust-host-commands": true}));
    h.start();
    let name = h.build("moved");
    let r = h.wait_status("moved", &name, MINUTE);
    let log = h.log("moved", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert_eq!(r["git_hash"], first.as_str(), "{log}");
    assert!(
        log.contains("get-git-hash: master-dir-commands moved master"),
        "{log}"
    );
    h.term();

    p["prepare-build"]["get-git-hash"] = false.into();
    p["prepare-build"]["master-dir-commands"] = json!([]);
    std::fs::write(origin.join("pipeline.json"), p.to_string()).unwrap();
    git(&origin, &["commit", "-qam", "third"]);
    let third = git(&origin, &["rev-parse", "HEAD"]);
    h.start();
    let name = h.build("moved");
    let r = h.wait_status("moved", &name, MINUTE);
    let log = h.log("moved", &name);
    assert_eq!(r["git_hash"], third.as_str(), "{log}");
    assert!(
        log.contains("prepare-build.get-git-hash is false") && log.contains(DOC),
        "{log}"
    );
}

/// The API offers the described system's words: `legacy_status` and `trigger_method` on every
/// build, status filters in either word, and under `?compat=python` its shapes (one filtered
/// match is the item, `status` in its words); without it our shapes stay as they were.
#[test]
fn the_api_speaks_the_described_systems_words_when_asked() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "warny",
        &pipeline(json!([stage("ok", &["true"]), stage("bad", &["false"])])),
    );
    h.project(
        "dummy",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.start();
    let token = api_token(&h, "admin");
    let auth = [("Authorization", format!("Bearer {token}"))];
    let warn = h.build("warny");
    assert_eq!(h.wait_status("warny", &warn, MINUTE)["status"], "warn");
    let (code, answer) = http(
        &h.web_addr(),
        "POST",
        "/ams-build/api/projects/name/dummy/build",
        &[
            auth[0].clone(),
            ("Content-Type", "application/json".to_string()),
        ],
        b"{}",
    );
    assert!(code == 200 || code == 202, "{code} {answer}");
    let dummy = answer["build"]["name"]
        .as_str()
        .or(answer["name"].as_str())
        .unwrap_or_else(|| panic!("{answer}"))
        .to_string();
    h.wait_status("dummy", &dummy, MINUTE);

    let get = |path: &str| {
        let (code, v) = http(&h.web_addr(), "GET", path, &auth, b"");
        assert_eq!(code, 200, "{path}: {v}");
        v
    };
    let ours = get("/ams-build/api/projects/name/warny/builds");
    assert_eq!(ours[0]["status"], "warn");
    assert_eq!(ours[0]["legacy_status"], "warning");
    assert_eq!(ours[0]["trigger_method"], "cli");
    let d = get("/ams-build/api/projects/name/dummy/builds");
    assert_eq!(d[0]["status"], "dummy");
    assert_eq!(d[0]["legacy_status"], "DEBUG-DUMMY-BUILD");
    assert_eq!(d[0]["trigger_method"], "www_interface");
    // Filters take either word, and stay lists without the compat query.
    for path in [
        "/ams-build/api/projects/name/warny/builds/status/warning",
        "/ams-build/api/projects/name/warny/builds/status/warn",
        "/ams-build/api/projects/name/warny/builds/legacy_status/warning",
        "/ams-build/api/projects/name/dummy/builds/status/DEBUG-DUMMY-BUILD",
    ] {
        let v = get(path);
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{path}: {v}");
    }
    // The described system's shapes.
    let one = get("/ams-build/api/projects/name/warny/builds/status/warning?compat=python");
    assert!(one.is_object(), "{one}");
    assert_eq!(one["status"], "warning");
    assert_eq!(one["name"], warn.as_str());
    let none = get("/ams-build/api/projects/name/warny/builds/status/pass?compat=python");
    assert_eq!(none, json!([]));
    let all = get("/ams-build/api/projects/name/dummy/builds?compat=python");
    assert!(all.is_array(), "an unfiltered list stays a list: {all}");
    assert_eq!(all[0]["status"], "DEBUG-DUMMY-BUILD");
    let project = get("/ams-build/api/projects/name/warny?compat=python");
    assert_eq!(project["builds"][0]["status"], "warning");
    let (code, v) = http(
        &h.web_addr(),
        "GET",
        "/ams-build/api/projects/name/warny/builds?compat=perl",
        &auth,
        b"",
    );
    assert_eq!(code, 400, "{v}");
}

/// A users.json holding both `admin` and `amsbuild-admin` (SERVER ADMINs, locked as every
/// imported user is) still leaves a first-start admin with a password: once, a crafted file made
/// the start fail after the import, and the next start had no usable account.
#[test]
fn a_users_json_that_takes_both_admin_names_still_gets_an_admin() {
    let mut h = TestHost::new();
    std::fs::write(
        h.data.join("users.json"),
        r#"[{"username": "admin", "access_level": 5, "projects": []},
            {"username": "amsbuild-admin", "access_level": 5, "projects": []}]"#,
    )
    .unwrap();
    h.start();
    let log = h.host_log();
    assert!(
        log.contains("created the user `amsbuild-admin-2` (SERVER ADMIN) with the password"),
        "{log}"
    );
    let list = String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string();
    let line = list
        .lines()
        .find(|l| l.starts_with("amsbuild-admin-2"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(!line.contains("locked"), "{list}");
}
