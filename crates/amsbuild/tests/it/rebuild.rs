//! Rebuild: a finished build's commit built again, from the CLI and the API, by MODERATOR and
//! above; never a build that has not finished.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

#[test]
fn a_rebuild_builds_the_same_commit_again_from_the_cli_and_the_api() {
    require_docker();
    let mut h = TestHost::new();
    let repo = h.tmp.path().join("repo");
    let first = git_repo(
        &repo,
        &[
            (
                "pipeline.json",
                &pipeline(json!([stage("s", &["cat version"])])),
            ),
            ("version", "first-commit"),
        ],
    );
    add_git_project(&h, "app", &repo);
    add_user(&h, "mod", "3", "app", "a long password");
    add_user(&h, "user", "1", "app", "a long password");
    let (mod_token, user_token) = (api_token(&h, "mod"), api_token(&h, "user"));
    h.start();

    let b1 = h.build_with("app", json!({"branch": "main"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(h.wait_status("app", &b1, T)["status"], "pass");
    // The branch moves on; a rebuild still builds the first build's commit.
    std::fs::write(repo.join("version"), "second-commit").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);

    let o = h.cli(&["rebuild", "app", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b2 = h.req(json!({"cmd": "builds", "project": "app", "limit": 10}))["builds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["build_index"] == 2)
        .cloned()
        .expect("the rebuild is build 2");
    let r2 = h.wait_status("app", b2["name"].as_str().unwrap(), T);
    assert_eq!(r2["git_hash"], first.as_str(), "{r2}");
    assert_eq!(r2["branch"], "main");
    assert_eq!(r2["trigger"], "cli");
    assert!(h
        .log("app", r2["name"].as_str().unwrap())
        .contains("first-commit"));

    let addr = h.web_addr();
    let path = format!("/ams-build/api/projects/name/app/builds/{b1}/rebuild");
    let auth = |t: &str| vec![("Authorization", format!("Bearer {t}"))];
    let (st, v) = http(&addr, "POST", &path, &auth(&user_token), b"");
    assert_eq!(st, 403, "a USER may not rebuild: {v}");
    let (st, v) = http(&addr, "POST", &path, &auth(&mod_token), b"");
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["build"]["trigger"], "api", "{v}");
    assert_eq!(v["build"]["created_by"], "mod", "{v}");
    let r3 = h.wait_status("app", v["build"]["name"].as_str().unwrap(), T);
    assert_eq!(r3["git_hash"], first.as_str());

    // A build that has not finished is not rebuilt.
    std::fs::write(
        repo.join("pipeline.json"),
        pipeline(json!([stage("s", &["sleep 30"])])),
    )
    .unwrap();
    git(&repo, &["commit", "-q", "-am", "slow"]);
    let slow = h.build_with("app", json!({"branch": "main"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    h.wait_running("app", &slow);
    let (st, v) = http(
        &addr,
        "POST",
        &format!("/ams-build/api/projects/name/app/builds/{slow}/rebuild"),
        &auth(&mod_token),
        b"",
    );
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("has not finished"),
        "{v}"
    );
    let o = h.cli(&["rebuild", &slow]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has not finished"));
    assert_eq!(h.req(json!({"cmd": "cancel", "build": slow}))["ok"], true);
}

/// Parameters declared in pipeline.json reach the stages from the CLI and the API, defaults
/// fill in, undeclared ones are refused, a missing required one fails the build with the fix,
/// and a rebuild keeps them.
#[test]
fn parameters_reach_the_stages_and_a_rebuild_keeps_them() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage("s", &["echo \"mode=$MODE target=$TARGET\""])]),
            json!({"parameters": {"MODE": {"default": "fast"}, "TARGET": {}}}),
        ),
    );
    add_user(&h, "mod", "3", "app", "a long password");
    let mod_token = api_token(&h, "mod");
    h.start();

    let o = h.cli(&["build", "app", "-p", "TARGET=x", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mode=fast target=x"));

    let o = h.cli(&["build", "app", "-p", "NOPE=1"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("`NOPE` is not declared"), "{e}");

    let missing = h.build("app");
    let r = h.wait_status("app", &missing, T);
    assert_eq!(r["status"], "fail", "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("-p TARGET=VALUE"),
        "{r}"
    );

    let (st, v) = http(
        &h.web_addr(),
        "POST",
        "/ams-build/api/projects/name/app/build",
        &[
            ("Authorization", format!("Bearer {mod_token}")),
            ("Content-Type", "application/json".into()),
        ],
        br#"{"params": {"TARGET": "y", "MODE": "slow"}}"#,
    );
    assert_eq!(st, 202, "{v}");
    let name = v["build"]["name"].as_str().unwrap().to_string();
    h.wait_status("app", &name, T);
    assert!(h.log("app", &name).contains("mode=slow target=y"));
    let (st, v) = http(
        &h.web_addr(),
        "POST",
        "/ams-build/api/projects/name/app/build",
        &[
            ("Authorization", format!("Bearer {mod_token}")),
            ("Content-Type", "application/json".into()),
        ],
        br#"{"params": {"TARGET": 3}}"#,
    );
    assert_eq!(st, 400, "a value is a string: {v}");

    let o = h.cli(&["rebuild", &name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = h.req(json!({"cmd": "builds", "project": "app", "limit": 1}))["builds"][0].clone();
    let again = again["name"].as_str().unwrap();
    h.wait_status("app", again, T);
    assert!(
        h.log("app", again).contains("mode=slow target=y"),
        "{}",
        h.log("app", again)
    );
}
