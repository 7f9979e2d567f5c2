//! API errors are JSON everywhere, axum's own rejections included; and the README's API
//! examples, run as written against a real host, keep working.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// A host with a dummy-build project `app` and a SERVER ADMIN token.
fn host_with_token() -> (TestHost, String) {
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&h, "boss", "5", "", "a long password");
    let token = api_token(&h, "boss");
    h.start();
    (h, token)
}

/// Asserts an answer is `status` with a JSON body `{"error": "<not empty>"}`; returns the text.
fn json_error(what: &str, got: &(u16, String, Vec<u8>), status: u16) -> String {
    let (code, head, body) = got;
    let text = String::from_utf8_lossy(body);
    assert_eq!(*code, status, "{what}: {head}\n{text}");
    assert!(
        head.contains("content-type: application/json"),
        "{what}: not JSON: {head}\n{text}"
    );
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    let msg = v["error"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "{what}: no error text: {v}");
    msg
}

#[test]
fn every_api_error_is_json_with_its_status() {
    let (h, token) = host_with_token();
    let addr = h.web_addr();
    let bearer = ("Authorization", format!("Bearer {token}"));
    let auth = std::slice::from_ref(&bearer);
    let json_type = ("Content-Type", "application/json".to_string());
    let req = |method: &str, path: &str, headers: &[(&str, String)], body: &[u8]| {
        http_full(
            &addr,
            method,
            &format!("/ams-build/api{path}"),
            headers,
            body,
        )
    };
    let trigger = "/projects/name/app/build";

    // The trigger's body: optional, but when there is one it is JSON and says so.
    let ok = req("POST", trigger, auth, b"");
    assert_eq!(ok.0, 202, "no body builds the default branch");
    let ok = req("POST", trigger, &[bearer.clone(), json_type.clone()], b"{}");
    assert_eq!(ok.0, 202);
    let m = json_error(
        "a body that is not JSON",
        &req(
            "POST",
            trigger,
            &[bearer.clone(), json_type.clone()],
            b"{nope",
        ),
        400,
    );
    assert!(m.contains("not valid JSON"), "{m}");
    json_error(
        "a JSON body that is not an object",
        &req(
            "POST",
            trigger,
            &[bearer.clone(), json_type.clone()],
            b"[1]",
        ),
        400,
    );
    let m = json_error(
        "a branch that is not a string",
        &req(
            "POST",
            trigger,
            &[bearer.clone(), json_type.clone()],
            br#"{"branch": 5}"#,
        ),
        400,
    );
    assert!(m.contains("branch"), "{m}");
    let m = json_error(
        "a body without Content-Type",
        &req("POST", trigger, auth, br#"{"branch": "dev"}"#),
        415,
    );
    assert!(m.contains("Content-Type: application/json"), "{m}");
    json_error(
        "a body of another type",
        &req(
            "POST",
            trigger,
            &[bearer.clone(), ("Content-Type", "text/plain".into())],
            br#"{"branch": "dev"}"#,
        ),
        415,
    );

    // axum's own rejections of a path parameter that is not a number.
    json_error(
        "a bad path parameter",
        &req("POST", "/deliveries/abc/replay", auth, b""),
        400,
    );
    json_error(
        "a path parameter out of range",
        &req("POST", "/deliveries/99999999999999999999/replay", auth, b""),
        400,
    );

    // Paths and methods the API does not serve.
    for path in ["/nope", "/projects/name/app/nope", "/builds"] {
        json_error(
            &format!("unknown path {path}"),
            &req("GET", path, auth, b""),
            404,
        );
    }
    json_error(
        "an unknown path without a token",
        &req("GET", "/nope", &[], b""),
        404,
    );
    let got = req("DELETE", "/projects", auth, b"");
    json_error("a method the path does not take", &got, 405);
    assert!(got.1.contains("allow: get"), "Allow is kept: {}", got.1);
    json_error(
        "GET of a POST-only path",
        &req("GET", "/builds/x/cancel", auth, b""),
        405,
    );

    // The handlers' own errors, for completeness: 401, 404, 409.
    json_error("no token", &req("GET", "/projects", &[], b""), 401);
    json_error(
        "an unknown project",
        &req("GET", "/projects/name/nope", auth, b""),
        404,
    );
    let name = h.build("app");
    h.wait_status("app", &name, T);
    json_error(
        "cancel of a finished build",
        &req("POST", &format!("/builds/{name}/cancel"), auth, b""),
        409,
    );
}

/// The lines of README.md's API example (the fenced block after "The API listens on") that
/// run curl.
fn readme_curl_examples() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let from = readme
        .find("The API listens on")
        .expect("README.md has the API section");
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("a sh block in the API section") + 6;
    let end = start + rest[start..].find("```").expect("the block's end");
    rest[start..end]
        .lines()
        .filter(|l| l.starts_with("curl "))
        .map(str::to_string)
        .collect()
}

/// Runs every curl line of README.md's API example as written: `$TOKEN` is a real token,
/// `app` a real git project with a `main` branch, `BUILD` a real build (a running one for
/// `cancel`, a finished one for the others), and localhost:8080 the test host's address.
#[test]
fn the_readme_api_examples_work_as_written() {
    require_docker();
    let examples = readme_curl_examples();
    assert!(
        examples.len() >= 7,
        "README's API examples not found: {examples:?}"
    );
    let mut h = TestHost::new();
    // `app` from git: main passes and keeps an archive; branch `slow` runs until canceled.
    let repo = h.tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("pipeline.json"),
        pipeline(json!([stage(
            "s",
            &[
                "if [ -f slow ]; then sleep 600; fi",
                "echo readme-example > Builds/out.txt",
                "echo built"
            ]
        )])),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    git(&repo, &["checkout", "-q", "-b", "slow"]);
    std::fs::write(repo.join("slow"), "").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "slow"]);
    add_git_project(&h, "app", &repo);
    add_user(&h, "boss", "5", "", "a long password");
    let token = api_token(&h, "boss");
    h.start();
    let addr = h.web_addr();

    let done = h.build_with("app", json!({"branch": "main"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        h.wait_status("app", &done, T)["status"],
        "pass",
        "{}",
        h.log("app", &done)
    );
    let running = h.build_with("app", json!({"branch": "slow"}))["name"]
        .as_str()
        .unwrap()
        .to_string();
    h.wait_running("app", &running);

    let dir = tempfile::tempdir().unwrap();
    for line in &examples {
        let build = if line.contains("/cancel") {
            &running
        } else {
            &done
        };
        let cmd = line
            .replacen("curl ", "curl -sS --fail-with-body ", 1)
            .replace("http://localhost:8080", &format!("http://{addr}"))
            .replace("BUILD", build);
        assert_ne!(&cmd, line, "no address to replace in {line}");
        let o = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .current_dir(dir.path())
            .env("TOKEN", &token)
            .output()
            .expect("run sh and curl");
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "README example failed: {line}\n{}{stdout}",
            String::from_utf8_lossy(&o.stderr)
        );
        // What each kind of example answers.
        if line.contains(" -OJ ") {
            let file = dir.path().join(format!("{done}.7z"));
            let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(bytes.starts_with(b"7z\xbc\xaf\x27\x1c"), "{line}: not a 7z");
        } else if line.contains("/output/") {
            assert!(stdout.contains("built"), "{line}: not the log: {stdout}");
        } else if line.contains("/file/") {
            assert_eq!(
                stdout, "readme-example\n",
                "{line}: one file of the archive"
            );
        } else {
            let v: Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{line}: not JSON ({e}): {stdout}"));
            if line.contains("/builds/status/pass") {
                let list = v.as_array().expect("a list");
                assert!(
                    list.iter().any(|b| b["name"] == done.as_str()),
                    "{line}: {v}"
                );
                for b in list {
                    let mut keys: Vec<&String> = b.as_object().unwrap().keys().collect();
                    keys.sort();
                    assert_eq!(keys, ["name", "status"], "{line}: fields=name,status");
                }
            } else if line.ends_with("/api/projects") {
                assert!(
                    v.as_array().unwrap().iter().any(|p| p["name"] == "app"),
                    "{line}: {v}"
                );
            } else if line.contains("-X POST") && line.ends_with("/build") {
                assert_eq!(v["build"]["branch"], "main", "{line}: {v}");
            } else if line.contains("/cancel") {
                assert_eq!(v["build"]["name"], running.as_str(), "{line}: {v}");
            } else if line.contains("/tests") {
                assert_eq!(v["build"], done.as_str(), "{line}: {v}");
                assert!(v["report"].is_null(), "no test-reports: no report: {v}");
            }
        }
    }
    let r = h.wait_status("app", &running, T);
    assert_eq!(r["status"], "cancel");
    // The reason is the cancel alone: a stopped build is not packed (it once said packing
    // "failed" because of the same cancel).
    assert_eq!(r["reason"], "canceled by boss", "{r}");
    assert!(h
        .log("app", &running)
        .contains("the output is not read or archived: canceled by boss"));
}
