//! The Docker suite: real builds in real containers through the Docker Engine API.

use crate::harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn one_build(h: &TestHost, project: &str, pipeline_json: &str) -> (Value, String) {
    h.project(project, pipeline_json);
    let name = h.build(project);
    let r = h.wait_status(project, &name, T);
    let log = h.log(project, &name);
    (r, log)
}

/// `fail-fast` stops at the first failed stage, by exit code or by `exit-line` (the host's
/// verdict), and ends FAIL; a stage with `allow-failure` is passed over and makes it WARN.
/// Without `fail-fast` every stage runs, as before.
#[test]
fn fail_fast_stops_at_the_first_failure_unless_it_is_allowed() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let ff = json!({"fail-fast": true});
    let after = stage("after", &["echo after-ran"]);
    let (r, log) = one_build(
        &h,
        "by-code",
        &pipeline_with(
            json!([stage("ok", &["true"]), stage("bad", &["exit 3"]), after]),
            ff.clone(),
        ),
    );
    assert_eq!(r["status"], "fail", "{log}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("fail-fast: stage `bad` failed; the 1 later"),
        "{r}"
    );
    assert_eq!(r["stages"].as_array().unwrap().len(), 2, "{r}");
    assert!(!log.contains("after-ran"), "{log}");

    // exit-line decides on the host: a stage that exits 0 with the wrong last line stops the
    // build, one with the right line goes on.
    let (r, log) = one_build(
        &h,
        "by-line",
        &pipeline_with(
            json!([
                {"name": "right", "commands": ["echo ok"], "exit-line": "ok"},
                {"name": "wrong", "commands": ["echo nope"], "exit-line": "ok"},
                after
            ]),
            ff.clone(),
        ),
    );
    assert_eq!(r["status"], "fail", "{log}");
    assert_eq!(r["stages"][0]["passed"], true, "{r}");
    assert_eq!(r["stages"].as_array().unwrap().len(), 2, "{r}");
    assert!(!log.contains("after-ran"), "{log}");

    let (r, log) = one_build(
        &h,
        "allowed",
        &pipeline_with(
            json!([
                {"name": "flaky", "commands": ["exit 1"], "allow-failure": true},
                {"name": "flaky-line", "commands": ["echo no"], "exit-line": "yes", "allow-failure": true},
                after
            ]),
            ff.clone(),
        ),
    );
    assert_eq!(r["status"], "warn", "{log}");
    assert!(log.contains("after-ran"), "{log}");

    let (r, log) = one_build(
        &h,
        "all-pass",
        &pipeline_with(
            json!([{"name": "l", "commands": ["echo y"], "exit-line": "y"}, after]),
            ff,
        ),
    );
    assert_eq!(r["status"], "pass", "{log}");

    let (r, log) = one_build(
        &h,
        "default",
        &pipeline(json!([stage("bad", &["exit 3"]), after])),
    );
    assert_eq!(
        r["status"], "warn",
        "without fail-fast every stage runs: {log}"
    );
    assert!(log.contains("after-ran"), "{log}");
}

/// `exit-line` compares the last line the commands printed; the host's own `+ command` trace
/// lines never count (the described system's rule).
#[test]
fn exit_line_ignores_trace_lines() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, log) = one_build(
        &h,
        "trace",
        &pipeline(json!([
            {"name": "s", "commands": ["echo exit code 0", "touch x"], "exit-line": "exit code 0"}
        ])),
    );
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains("+ touch x"),
        "the trace is still logged: {log}"
    );
    assert!(
        !log.contains("\u{1e}") && !log.contains("trace + "),
        "no raw marker in the log: {log}"
    );
}

/// With `retry-on-error: 2`, a build that ends ERROR runs twice more (each retry naming the
/// one before), then stops; a FAIL is never retried.
#[test]
fn error_builds_are_retried_as_configured_and_failures_are_not() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let missing =
        pipeline(json!([stage("x", &["true"])])).replace(IMAGE, "ams-no-such-image:never");
    for (project, p) in [
        ("flaky", missing),
        ("broken", pipeline(json!([stage("x", &["exit 3"])]))),
    ] {
        h.project(project, &p);
        std::fs::write(
            h.data.join(format!(
                "projects/{project}/master/config/pipeline-config.json"
            )),
            r#"{"retry-on-error": 2}"#,
        )
        .unwrap();
    }
    let first = h.build("flaky");
    let chain = wait_for("three attempts, the last out of retries", T, || {
        let list = h.req(json!({"cmd": "builds", "project": "flaky", "limit": 10}))["builds"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let last = list.first()?;
        let done = list.len() == 3
            && list.iter().all(|b| b["status"] == "error")
            && h.log("flaky", last["name"].as_str()?)
                .contains("no retries left");
        done.then_some(list)
    });
    // Newest first: each retry names the build before it; the first names none.
    assert_eq!(chain[2]["name"], first.as_str());
    assert!(chain[2]["retry_of"].is_null());
    assert_eq!(chain[1]["retry_of"], chain[2]["id"]);
    assert_eq!(chain[0]["retry_of"], chain[1]["id"]);
    assert_eq!(chain[0]["created_by"], chain[2]["created_by"]);
    assert!(h
        .log("flaky", &first)
        .contains("queued again (attempt 2 of 3)"));
    // With only-build-latest, a build with a newer one on its branch is not retried (the retry
    // of its older commit would supersede the newer build).
    // Both builds wait in a host command until the newer one is queued, then fail to find
    // their image.
    let go = h.tmp.path().join("go");
    h.project(
        "latest",
        &pipeline_with(
            json!([stage("x", &["true"])]),
            json!({"prepare-build": {"master-dir-commands": [
                format!("while [ ! -e {} ]; do sleep 0.05; done", go.display())
            ]}}),
        )
        .replace(IMAGE, "ams-no-such-image:never"),
    );
    std::fs::write(
        h.data
            .join("projects/latest/master/config/pipeline-config.json"),
        r#"{"retry-on-error": 1, "only-build-latest": true, "trust-host-commands": true}"#,
    )
    .unwrap();
    let older = h.build("latest");
    wait_for("the older build to start", T, || {
        (h.record("latest", &older)["status"] == "running").then_some(())
    });
    let newer = h.build("latest");
    std::fs::write(&go, "").unwrap();
    let list = wait_for("the newer build's retry to end", T, || {
        let list = h.req(json!({"cmd": "builds", "project": "latest", "limit": 10}))["builds"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let done = list.len() == 3
            && list.iter().all(|b| b["status"] == "error")
            && h.log("latest", list[0]["name"].as_str()?)
                .contains("no retries left");
        done.then_some(list)
    });
    assert_eq!(list[0]["retry_of"], list[1]["id"], "{list:?}");
    assert_eq!(list[1]["name"], newer.as_str());
    assert!(
        h.log("latest", &older).contains("not queued again"),
        "{}",
        h.log("latest", &older)
    );

    let failed = h.build("broken");
    assert_eq!(h.wait_status("broken", &failed, T)["status"], "fail");
    let later = h.build("broken");
    h.wait_status("broken", &later, T);
    let list = h.req(json!({"cmd": "builds", "project": "broken", "limit": 10}));
    assert_eq!(
        list["builds"].as_array().unwrap().len(),
        2,
        "a FAIL is not retried: {list}"
    );
    assert!(h.containers().is_empty());
}

#[test]
fn pass_fail_and_warn_follow_the_stages() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, log) = one_build(
        &h,
        "pass",
        &pipeline_with(
            json!([
                stage("one", &["echo first $MODE"]),
                stage("two", &["test -f /.ams-ci/driver.sh", "echo second"])
            ]),
            json!({"environment": {"MODE": "release"}}),
        ),
    );
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("first release"), "{log}");
    let stages = r["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0]["name"], "one");
    assert_eq!(stages[1]["exit_code"], 0);
    assert!(stages[0]["duration_secs"].as_f64().unwrap() >= 0.0);
    assert!(r["started_at"].as_f64().unwrap() >= r["created_at"].as_f64().unwrap());
    assert!(r["finished_at"].as_f64().unwrap() >= r["started_at"].as_f64().unwrap());

    let (r, log) = one_build(
        &h,
        "fail",
        &pipeline(json!([stage("a", &["exit 3"]), stage("b", &["false"])])),
    );
    assert_eq!(r["status"], "fail", "{log}");
    assert_eq!(r["stages"][0]["exit_code"], 3);
    assert!(log.contains("exit code 3"), "{log}");

    let (r, log) = one_build(
        &h,
        "warn",
        &pipeline(json!([
            stage("ok", &["true"]),
            stage("bad", &["echo nope; exit 1"]),
            stage("ok2", &["true"])
        ])),
    );
    assert_eq!(r["status"], "warn", "{log}");
    let passed: Vec<bool> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["passed"].as_bool().unwrap())
        .collect();
    assert_eq!(passed, vec![true, false, true]);

    // exit-line: the described system's rule, the last printed line decides.
    let (r, log) = one_build(
        &h,
        "exitline",
        &pipeline(json!([
            {"name": "by-line", "commands": ["echo done; echo 0; exit 1"], "exit-line": "0"},
            {"name": "by-line-bad", "commands": ["echo 1"], "exit-line": "0"}
        ])),
    );
    assert_eq!(r["status"], "warn", "{log}");
    assert_eq!(r["stages"][0]["passed"], true);
    assert_eq!(r["stages"][1]["passed"], false);
    assert!(h.containers().is_empty(), "containers left behind");
}

#[test]
fn each_stage_gets_a_fresh_shell_and_containers_are_unprivileged() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, log) = one_build(
        &h,
        "iso",
        &pipeline(json!([
            stage("set", &["export LEAK=yes", "cd /tmp"]),
            stage("check", &[
                "test -z \"$LEAK\"",
                "test \"$(pwd)\" = /root/project",
                "grep -q 'NoNewPrivs:\t1' /proc/self/status",
                "test ! -e /var/run/docker.sock",
                "test \"$(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)\" = 4096",
                "echo isolated"
            ]),
        ])),
    );
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("isolated"));
}

#[test]
fn canceling_pending_and_active_builds() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    h.start();
    h.project(
        "c",
        &pipeline(json!([stage(
            "trap",
            &[
                "trap 'echo got TERM' TERM",
                "echo waiting",
                "while true; do sleep 1; done"
            ]
        )])),
    );
    let first = h.build("c");
    let second = h.build("c");
    h.wait_running("c", &first);

    // The pending build leaves the queue at once.
    let a = h.req(json!({"cmd": "cancel", "build": second, "actor": "carol"}));
    assert_eq!(a["ok"], true, "{a}");
    let r = h.record("c", &second);
    assert_eq!(r["status"], "cancel");
    assert_eq!(r["canceled_by"], "carol");
    assert!(r["canceled_at"].as_f64().is_some());

    // The active build's stage traps SIGTERM: it hears it, then is killed after stop-timeout.
    let t0 = Instant::now();
    let a = h.req(json!({"cmd": "cancel", "build": first, "actor": "dave"}));
    assert_eq!(a["ok"], true, "{a}");
    let r = h.wait_status("c", &first, Duration::from_secs(30));
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_eq!(r["status"], "cancel");
    assert_eq!(r["canceled_by"], "dave");
    let log = h.log("c", &first);
    assert!(
        log.contains("got TERM"),
        "the stage never saw SIGTERM:\n{log}"
    );
    assert!(log.contains("canceled by dave"), "{log}");
    assert!(h.containers().is_empty(), "container left behind");
    // A finished build cannot be canceled.
    let a = h.req(json!({"cmd": "cancel", "build": first}));
    assert_eq!(a["ok"], false);
}

#[test]
fn a_hung_build_times_out_with_its_own_reason() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, log) = one_build(
        &h,
        "hang",
        &pipeline_with(
            json!([stage("hang", &["sleep 600"])]),
            json!({"timeout": 2}),
        ),
    );
    assert_eq!(r["status"], "fail", "{log}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("timed out after 2 s"),
        "{r}"
    );
    assert!(h.containers().is_empty());
}

#[test]
fn a_missing_image_ends_error_with_the_pull_error() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let p = pipeline(json!([stage("x", &["true"])])).replace(IMAGE, "ams-no-such-image:never");
    let (r, log) = one_build(&h, "noimg", &p);
    assert_eq!(r["status"], "error", "not the project's tests: {r}");
    assert!(
        r["archive_name"].is_null(),
        "an ERROR build archives nothing: {r}"
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("could not be pulled"),
        "{r}"
    );
    assert!(log.contains("ams-no-such-image:never"), "{log}");
}

#[test]
fn malformed_pipelines_fail_at_once_and_the_next_build_runs() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    h.start();
    let good = pipeline(json!([stage("s", &["echo fine"])]));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "syntax",
            "{\n  \"docker\": {\n    \"image\": \"x\",,\n  }\n}".into(),
            "line 3 column",
        ),
        (
            "wrongtype",
            good.replace(
                "\"commands\": [\n        \"echo fine\"\n      ]",
                "\"commands\": 5",
            ),
            "pipeline[0].commands",
        ),
        (
            "nodocker",
            serde_json::to_string(&json!({"pipeline": [stage("s", &["true"])]})).unwrap(),
            "field `docker`",
        ),
        ("empty", pipeline(json!([])), "field `pipeline`: is empty"),
        (
            "unknownvar",
            pipeline(json!([stage("s", &["echo {no_such_var}"])])),
            "pipeline[0].commands[0]",
        ),
        (
            "badargs",
            pipeline_with(
                json!([stage("s", &["true"])]),
                json!({"docker": {"image": IMAGE, "args": "--privileged", "project-dest": "/p", "build-output-dest": "/o"}}),
            ),
            "--privileged",
        ),
        (
            "unknownflag",
            pipeline_with(
                json!([stage("s", &["true"])]),
                json!({"docker": {"image": IMAGE, "args": "--frobnicate", "project-dest": "/p", "build-output-dest": "/o"}}),
            ),
            "--frobnicate",
        ),
    ];
    let mut names = Vec::new();
    for (project, text, _) in &cases {
        h.project(project, text);
        names.push(h.build(project));
    }
    h.project("after", &good);
    let after = h.build("after");
    for ((project, _, want), name) in cases.iter().zip(&names) {
        let r = h.wait_status(project, name, T);
        let log = h.log(project, name);
        assert_eq!(r["status"], "fail", "{project}: {log}");
        assert!(log.contains("pipeline.json"), "{project}: {log}");
        assert!(log.contains(want), "{project}: want {want:?} in\n{log}");
        assert!(r["stages"].as_array().unwrap().is_empty(), "{project}");
    }
    assert_eq!(h.wait_status("after", &after, T)["status"], "pass");
}

#[test]
fn trusted_docker_args_and_host_commands() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let p = pipeline_with(
        json!([stage(
            "s",
            &["echo net=$(ls /sys/class/net | tr '\\n' ' ')"]
        )]),
        json!({
            "docker": {"image": IMAGE, "args": "-it --rm --network none -e X=1 --memory 64m --cpus 0.5 --pids-limit 50",
                       "project-dest": "/root/project", "build-output-dest": "/root/project/Builds"},
            "prepare-build": {"master-dir-commands": ["touch host-ran.txt"], "build-dir-commands": []}
        }),
    );
    let (r, log) = one_build(&h, "args", &p);
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("net=lo") && !log.contains("eth0"), "{log}");
    assert!(log.contains("refused 1 host command"), "{log}");
    assert!(!h.source("args").join("host-ran.txt").exists());

    h.private_config("args", json!({"trust-host-commands": true}));
    let name = h.build("args");
    let r = h.wait_status("args", &name, T);
    assert_eq!(r["status"], "pass", "{}", h.log("args", &name));
    assert!(h.source("args").join("host-ran.txt").exists());
}

/// Builds of a branch head queued before an update of master started share its fetch (a queue
/// of them drains without one fetch each), and a build queued after a push still fetches and
/// builds the push, as does one after master was moved to another commit.
#[test]
fn builds_queued_before_a_fetch_share_it_and_a_later_push_is_fetched() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    let repo = h.tmp.path().join("repo");
    let c1 = git_repo(
        &repo,
        &[
            (
                "pipeline.json",
                &pipeline(json!([stage("show", &["echo version=$(cat version.txt)"])])),
            ),
            ("version.txt", "one"),
        ],
    );
    add_git_project(&h, "g", &repo);
    h.project("blocker", &pipeline(json!([stage("s", &["sleep 600"])])));
    h.start();

    // The one slot is taken while five builds of g are queued.
    let blocker = h.build("blocker");
    h.wait_running("blocker", &blocker);
    let names: Vec<String> = (0..5).map(|_| h.build("g")).collect();
    let a = h.req(json!({"cmd": "cancel", "build": blocker, "actor": "t"}));
    assert_eq!(a["ok"], true, "{a}");
    let shared = "after this build was queued: no fetch needed";
    for (i, n) in names.iter().enumerate() {
        let r = h.wait_status("g", n, T);
        let log = h.log("g", n);
        assert_eq!(r["status"], "pass", "{log}");
        assert_eq!(r["git_hash"], c1.as_str(), "{log}");
        assert!(log.contains("version=one"), "{log}");
        assert_eq!(log.contains(shared), i > 0, "build {i}: {log}");
    }

    // A push after that fetch: the next build fetches it.
    std::fs::write(repo.join("version.txt"), "two").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    let c2 = git(&repo, &["rev-parse", "HEAD"]);
    // A head build now fetches and builds c2.
    let fetches_c2 = || {
        let n = h.build("g");
        let r = h.wait_status("g", &n, T);
        let log = h.log("g", &n);
        assert_eq!(r["git_hash"], c2.as_str(), "{log}");
        assert!(
            log.contains("version=two") && !log.contains(shared),
            "{log}"
        );
    };
    fetches_c2();

    // Master moved to an older commit: the next head build fetches again.
    let b = h.build_with("g", json!({"commit": c1}));
    let old = b["name"].as_str().unwrap().to_string();
    assert_eq!(h.wait_status("g", &old, T)["git_hash"], c1.as_str());
    fetches_c2();
}

#[test]
fn git_sources_build_the_exact_commit_or_branch_head() {
    require_docker();
    let mut h = TestHost::new();
    let repo = h.tmp.path().join("repo");
    let c1 = git_repo(
        &repo,
        &[
            (
                "pipeline.json",
                &pipeline(json!([stage(
                    "show",
                    &["echo version=$(cat version.txt) git={git_hash}"]
                )])),
            ),
            ("version.txt", "one"),
        ],
    );
    std::fs::write(repo.join("version.txt"), "two").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    let c2 = git(&repo, &["rev-parse", "HEAD"]);
    let evil = "$(touch${IFS}/tmp/ams-pwned-by-branch)";
    git(&repo, &["checkout", "-q", "-b", evil]);
    std::fs::write(repo.join("version.txt"), "evil").unwrap();
    git(&repo, &["commit", "-q", "-am", "evil"]);
    git(&repo, &["checkout", "-q", "main"]);
    let _ = std::fs::remove_file("/tmp/ams-pwned-by-branch");

    add_git_project(&h, "g", &repo);
    h.start();

    let b = h.build_with("g", json!({"commit": c1}));
    let name = b["name"].as_str().unwrap();
    let r = h.wait_status("g", name, T);
    let log = h.log("g", name);
    assert_eq!(r["status"], "pass", "{log}");
    assert_eq!(r["git_hash"], c1);
    assert!(log.contains(&format!("version=one git={c1}")), "{log}");

    let name = h.build("g");
    let r = h.wait_status("g", &name, T);
    assert_eq!(r["git_hash"], c2, "{}", h.log("g", &name));
    assert!(h.log("g", &name).contains("version=two"));

    let b = h.build_with("g", json!({"branch": evil}));
    let name = b["name"].as_str().unwrap();
    let r = h.wait_status("g", name, T);
    assert_eq!(r["status"], "pass", "{}", h.log("g", name));
    assert!(h.log("g", name).contains("version=evil"));
    assert!(!std::path::Path::new("/tmp/ams-pwned-by-branch").exists());

    // A bad branch name is refused before anything is queued.
    let a = h.req(json!({"cmd": "build", "project": "g", "branch": "--upload-pack=x"}));
    assert_eq!(a["ok"], false);
}

fn sevenz(args: &[&str]) -> String {
    let o = Command::new("7z")
        .args(args)
        .output()
        .expect("7z (p7zip-full) is installed");
    assert!(
        o.status.success(),
        "7z {args:?}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn archives_pass_7z_t_and_hashes_match_7zip() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    for kind in ["crc32", "crc64", "sha1", "sha256", "blake2sp", "BLAKE2ep"] {
        let project = format!("z{}", kind.to_lowercase());
        let p = pipeline_with(
            json!([stage(
                "out",
                &[
                    "mkdir -p Builds/sub",
                    "echo hello > Builds/a.txt",
                    "head -c 200000 /dev/urandom > Builds/sub/r.bin",
                    "ln -s /etc/passwd Builds/escape",
                ]
            )]),
            json!({"cleanup": {"remove_build_source": true, "7z_build": true, "7z_hash": kind}}),
        );
        let (r, log) = one_build(&h, &project, &p);
        assert_eq!(r["status"], "pass", "{log}");
        let name = r["name"].as_str().unwrap();
        let archive = h.build_dir(&project).join(format!("{name}.7z"));
        assert_eq!(r["archive_name"], format!("{name}.7z"));
        assert!(
            !h.build_dir(&project).join(name).join("build").exists(),
            "output folder kept"
        );
        assert!(
            !h.build_dir(&project)
                .join(name)
                .join("project_source")
                .exists(),
            "source kept"
        );
        let a = archive.to_str().unwrap();
        assert!(sevenz(&["t", a]).contains("Everything is Ok"));
        // An independent implementation: p7zip's own hash of the archive file.
        let method = match kind {
            "crc32" => "CRC32",
            "crc64" => "CRC64",
            "sha1" => "SHA1",
            "sha256" => "SHA256",
            _ => "BLAKE2sp",
        };
        let out = sevenz(&["h", &format!("-scrc{method}"), a]);
        let want = out
            .lines()
            .find(|l| l.contains("for data"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap()
            .to_uppercase();
        assert_eq!(r["archive_hash"].as_str().unwrap(), want, "{kind}");
        // The link is stored as a link, never followed.
        let x = h.tmp.path().join(format!("x-{kind}"));
        sevenz(&["x", &format!("-o{}", x.display()), a]);
        assert_eq!(std::fs::read_to_string(x.join("a.txt")).unwrap(), "hello\n");
        assert_eq!(
            std::fs::metadata(x.join("sub/r.bin")).unwrap().len(),
            200000
        );
        let link = std::fs::symlink_metadata(x.join("escape")).unwrap();
        assert!(link.file_type().is_symlink(), "{kind}: link was followed");
    }
}

#[test]
fn delete_output_removes_folder_log_and_archive_and_refuses_active_builds() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, _) = one_build(
        &h,
        "del",
        &pipeline(json!([stage("s", &["echo x > Builds/f"])])),
    );
    let name = r["name"].as_str().unwrap().to_string();
    assert!(h.build_dir("del").join(format!("{name}.7z")).exists());
    let o = h.cli(&["delete-output", &name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!h.build_dir("del").join(&name).exists());
    assert!(!h.build_dir("del").join(format!("{name}.7z")).exists());
    let r = h.record("del", &name);
    assert!(r["output_deleted_at"].as_f64().is_some());
    assert!(r["archive_name"].is_null());

    std::fs::write(
        h.source("del").join("pipeline.json"),
        pipeline(json!([stage("s", &["sleep 600"])])),
    )
    .unwrap();
    let active = h.build("del");
    h.wait_running("del", &active);
    let a = h.req(json!({"cmd": "delete-output", "build": active}));
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("cancel it"), "{a}");
    assert!(h.build_dir("del").join(&active).exists());
    h.req(json!({"cmd": "cancel", "build": active}));
    h.wait_status("del", &active, T);
}

#[test]
fn a_newer_build_of_the_same_branch_supersedes_a_pending_one() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    h.start();
    h.project("latest", &pipeline(json!([stage("s", &["sleep 1"])])));
    h.private_config("latest", json!({"only-build-latest": true}));
    let a = h.build("latest");
    let b = h.build("latest");
    let c = h.build("latest");
    let rb = h.wait_status("latest", &b, T);
    assert_eq!(rb["status"], "skip");
    assert!(rb["reason"].as_str().unwrap().contains(&c));
    assert_eq!(h.wait_status("latest", &a, T)["status"], "pass");
    assert_eq!(h.wait_status("latest", &c, T)["status"], "pass");
}

fn restart_recovery(kill: bool) {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    h.start();
    h.project(
        "r",
        &pipeline(json!([stage("s", &["echo started", "sleep 600"])])),
    );
    let running = h.build("r");
    h.wait_running("r", &running);
    std::fs::write(
        h.source("r").join("pipeline.json"),
        pipeline(json!([stage("s", &["echo quick"])])),
    )
    .unwrap();
    let pending = h.build("r");
    assert_eq!(h.record("r", &pending)["status"], "pending");
    if kill {
        h.kill();
        assert_eq!(
            h.containers().len(),
            1,
            "the container outlives a SIGKILLed host"
        );
    } else {
        h.term();
    }
    h.start();
    let r = h.wait_status("r", &running, T);
    assert_eq!(r["status"], "error");
    assert_eq!(r["reason"], "interrupted by host restart");
    assert!(h.log("r", &running).contains("interrupted by host restart"));
    let r = h.wait_status("r", &pending, T);
    assert_eq!(r["status"], "pass", "{}", h.log("r", &pending));
    assert!(h.containers().is_empty(), "a container was left behind");
    // No slot leaked: another build still runs.
    let again = h.build("r");
    assert_eq!(h.wait_status("r", &again, T)["status"], "pass");
    let st = h.req(json!({"cmd": "status"}));
    assert!(st["active"].as_array().unwrap().is_empty(), "{st}");
}

/// A SIGTERM lets the running build finish: the host keeps serving and queueing meanwhile, no
/// queued build starts though a slot is free, the finished build's notification goes out, and
/// the host stops by itself once none runs; the queue runs after the next start. A second
/// SIGTERM stops a running build at once, and so does the end of the grace.
#[test]
fn a_sigterm_lets_running_builds_finish_and_a_second_one_or_the_grace_stops_them() {
    require_docker();
    let (hook_at, hooked) = body_receiver();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 2, "shutdown_grace_secs": 300,
                                           "notify_allow_private": true}));
    h.project(
        "g",
        &pipeline(json!([stage(
            "s",
            &[
                "while [ ! -f Builds/go ]; do sleep 0.1; done",
                "echo released"
            ]
        )])),
    );
    std::fs::write(
        h.data.join("projects/g/master/config/webhooks.json"),
        json!({"in-webhooks": [], "out-webhooks": [
            {"hook-name": "done", "type": "discord", "trigger": "build-complete",
             "url": format!("http://{hook_at}/done/1/t"),
             "data": {"default": {"content": "{build_name} {status}"}}}
        ]})
        .to_string(),
    )
    .unwrap();
    add_user(&h, "watcher", "3", "g", "correct horse battery");
    h.start();
    let web = h.web_addr();
    let cookie = web_login(&web, "watcher", "correct horse battery");
    let dashboard = || {
        let (st, _, body) = http_raw(&web, "/ams-build/", &[("Cookie", cookie.clone())]);
        assert_eq!(st, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    const STOPPING: &str = "The server is stopping: running builds may finish";
    assert!(!dashboard().contains(STOPPING));
    let running = h.build("g");
    h.wait_running("g", &running);
    h.send("-TERM");
    wait_for("the host to wait for the build", T, || {
        h.host_log()
            .contains("waiting up to 300 s for 1 running build(s) to finish")
            .then_some(())
    });
    // Still serving and queueing; nothing starts, though a slot is free (the answer comes
    // after the loop tried to start what it queued).
    let queued = h.build("g");
    let during = h.build("g");
    assert!(!h.exited(), "{}", h.host_log());
    assert!(
        dashboard().contains(STOPPING),
        "the dashboard says nothing of the stop"
    );
    assert_eq!(h.record("g", &queued)["status"], "pending");
    assert_eq!(h.record("g", &during)["status"], "pending");
    // Let the build go: it passes, and then the host stops by itself, once its notification
    // went out.
    std::fs::write(h.build_dir("g").join(&running).join("build/go"), "").unwrap();
    wait_for("the host to stop once the build ended", T, || {
        h.exited().then_some(())
    });
    assert!(h.host_log().contains("no build runs any more: stopping"));
    let sent: Vec<String> = hooked
        .lock()
        .unwrap()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].contains(&format!("{running} PASS")), "{sent:?}");

    // The next start runs the two queued builds; each is let go at once.
    std::fs::write(
        h.source("g").join("pipeline.json"),
        pipeline(json!([stage("s", &["echo quick"])])),
    )
    .unwrap();
    h.start();
    assert_eq!(h.wait_status("g", &running, T)["status"], "pass");
    assert!(h.log("g", &running).contains("released"));
    for name in [&queued, &during] {
        let r = h.wait_status("g", name, T);
        assert_eq!(r["status"], "pass", "{r}\n{}", h.log("g", name));
    }

    // A second SIGTERM does not wait for the grace.
    std::fs::write(
        h.source("g").join("pipeline.json"),
        pipeline(json!([stage("s", &["echo started", "sleep 600"])])),
    )
    .unwrap();
    let long = h.build("g");
    h.wait_running("g", &long);
    h.send("-TERM");
    wait_for("the host to wait for the build", T, || {
        (h.host_log().matches("waiting up to 300 s").count() == 2).then_some(())
    });
    let t0 = Instant::now();
    h.send("-TERM");
    wait_for("the host to stop", T, || h.exited().then_some(()));
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(h
        .host_log()
        .contains("SIGTERM again: stopping the running builds now"));
    // And the end of the grace stops it too.
    let conf = h.data.join("web_conf.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    c["shutdown_grace_secs"] = json!(2);
    std::fs::write(&conf, c.to_string()).unwrap();
    h.start();
    let r = h.wait_status("g", &long, T);
    assert_eq!(r["status"], "error");
    assert_eq!(r["reason"], "interrupted by host restart");
    let over = h.build("g");
    h.wait_running("g", &over);
    h.send("-TERM");
    wait_for("the host to stop", T, || h.exited().then_some(()));
    assert!(h
        .host_log()
        .contains("shutdown_grace_secs (2 s) is over: stopping the builds still running"));
    h.start();
    let r = h.wait_status("g", &over, T);
    assert_eq!(r["status"], "error");
    assert_eq!(r["reason"], "interrupted by host restart");
    assert!(h.containers().is_empty(), "a container was left behind");
}

/// The processes a trusted host command started, with the ages in their command lines.
fn sleeps(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| c == format!("sleep\0{marker}\0").as_bytes())
                .unwrap_or(false)
        })
        .count()
}

/// A cancel kills a host command's whole process group: what it started in a pipe or in the
/// background goes with it, not only its shell.
#[test]
fn a_canceled_host_command_takes_what_it_started_with_it() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    // Ages no other test uses, to find these processes.
    let (a, b) = ("6123", "6124");
    h.project(
        "hc",
        &pipeline_with(
            json!([stage("s", &["true"])]),
            json!({"prepare-build": {
                "master-dir-commands": [format!("sleep {a} & sleep {b} | cat")],
                "build-dir-commands": []}}),
        ),
    );
    h.private_config("hc", json!({"trust-host-commands": true}));
    let name = h.build("hc");
    wait_for("the host command to run", T, || {
        (sleeps(a) == 1 && sleeps(b) == 1).then_some(())
    });
    h.req(json!({"cmd": "cancel", "build": name}));
    assert_eq!(h.wait_status("hc", &name, T)["status"], "cancel");
    wait_for("the host command's processes to end", T, || {
        (sleeps(a) == 0 && sleeps(b) == 0).then_some(())
    });
    // A timeout likewise (the build's future is dropped there, not told to stop): the
    // preparation is bounded by web_conf.json's build_timeout_secs.
    h.term();
    let conf = h.data.join("web_conf.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    c["build_timeout_secs"] = json!(3);
    std::fs::write(&conf, c.to_string()).unwrap();
    h.start();
    let (a, b) = ("6125", "6126");
    std::fs::write(
        h.source("hc").join("pipeline.json"),
        pipeline_with(
            json!([stage("s", &["true"])]),
            json!({"prepare-build": {
                "master-dir-commands": [format!("sleep {a} & sleep {b} | cat")],
                "build-dir-commands": []}}),
        ),
    )
    .unwrap();
    let name = h.build("hc");
    let r = h.wait_status("hc", &name, T);
    assert_eq!(r["status"], "fail", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("timed out"), "{r}");
    wait_for("the timed-out host command's processes to end", T, || {
        (sleeps(a) == 0 && sleeps(b) == 0).then_some(())
    });
}

/// A git update hung on a remote that never answers (ssh waits for its banner) is canceled
/// with its whole process group: git and the ssh it started both end.
#[test]
fn a_canceled_git_update_takes_its_ssh_with_it() {
    require_docker();
    let mut h = TestHost::new();
    let repo = h.tmp.path().join("repo");
    git_repo(
        &repo,
        &[("pipeline.json", &pipeline(json!([stage("s", &["true"])])))],
    );
    add_git_project(&h, "hung", &repo);
    // A listener that takes connections and says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let master = h.data.join("projects/hung/master/project_source");
    git(
        &master,
        &[
            "remote",
            "set-url",
            "origin",
            &format!("ssh://git@127.0.0.1:{port}/repo"),
        ],
    );
    h.start();
    let name = h.build("hung");
    let ssh_running = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c).into_owned();
                        c.starts_with("ssh\0") && c.contains(&format!("\0{port}\0"))
                    })
                    .unwrap_or(false)
            })
            .count()
    };
    wait_for("git's ssh to connect", T, || {
        (ssh_running() == 1).then_some(())
    });
    h.req(json!({"cmd": "cancel", "build": name}));
    assert_eq!(h.wait_status("hung", &name, T)["status"], "cancel");
    wait_for("git's ssh to end", T, || (ssh_running() == 0).then_some(()));
    drop(silent);
}

#[test]
fn restart_after_sigkill_mid_build() {
    restart_recovery(true);
}

#[test]
fn restart_after_sigterm_mid_build() {
    restart_recovery(false);
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn memory_stays_bounded_under_huge_output() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"log_max_bytes": 400_000_000u64}));
    h.start();
    // Warm up: one ordinary build, so the baseline includes everything a build touches.
    let (r, _) = one_build(&h, "warm", &pipeline(json!([stage("s", &["echo hi"])])));
    assert_eq!(r["status"], "pass");
    let before = rss_kb(h.pid(), "VmHWM:");
    let (r, _) = one_build(
        &h,
        "huge",
        &pipeline(json!([
            stage(
                "lines",
                &["head -c 100000000 /dev/zero | tr '\\0' a | fold -w 99"]
            ),
            stage("oneline", &["head -c 50000000 /dev/zero | tr '\\0' b"]),
        ])),
    );
    assert_eq!(r["status"], "pass");
    let after = rss_kb(h.pid(), "VmHWM:");
    let log_len = std::fs::metadata(
        h.build_dir("huge")
            .join(r["name"].as_str().unwrap())
            .join("output.txt"),
    )
    .unwrap()
    .len();
    assert!(
        log_len > 150_000_000,
        "the whole output was logged: {log_len}"
    );
    let grew_mb = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("peak RSS before {before} kB, after {after} kB: +{grew_mb:.1} MB");
    assert!(grew_mb < 6.0, "the host grew by {grew_mb:.1} MB");
}

#[test]
fn the_log_limit_truncates_with_a_marker() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"log_max_bytes": 100_000}));
    h.start();
    let (r, log) = one_build(
        &h,
        "trunc",
        &pipeline(json!([
            stage("s", &["yes line | head -n 100000", "echo tail-marker"]),
            stage("t", &["true"])
        ])),
    );
    assert_eq!(r["status"], "pass");
    assert!(log.contains("log truncated"), "no marker");
    assert!(!log.contains("tail-marker"));
    assert!(log.len() < 102_000, "{}", log.len());
    assert!(
        log.contains("stage 2/2"),
        "AMS-Build's own lines still appear"
    );
}

#[test]
fn build_wait_follows_the_log_and_exits_by_status() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    h.project(
        "w",
        &pipeline(json!([stage("s", &["echo from-the-container"])])),
    );
    let o = h.cli(&["build", "w", "--wait"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("from-the-container"));
    assert!(out.contains("finished: PASS"));
    std::fs::write(
        h.source("w").join("pipeline.json"),
        pipeline(json!([stage("s", &["exit 1"])])),
    )
    .unwrap();
    let o = h.cli(&["build", "w", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let o = h.cli(&["builds", "w"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("PASS") && out.contains("FAIL"), "{out}");
}

#[test]
fn run_executes_a_local_pipeline_without_a_host() {
    require_docker();
    let h = TestHost::new();
    let dir = h.tmp.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("input.txt"), "local-source").unwrap();
    std::fs::write(
        dir.join("pipeline.json"),
        pipeline(json!([stage(
            "s",
            &["cat input.txt", "echo made > Builds/out.txt"]
        )])),
    )
    .unwrap();
    let o = h.cmd().args(["run", "--dir"]).arg(&dir).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("local-source"));
    std::fs::write(
        dir.join("pipeline.json"),
        pipeline(json!([stage("s", &["exit 4"])])),
    )
    .unwrap();
    let o = h.cmd().args(["run", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn dummy_builds_run_no_container_and_sources_can_be_kept() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    let (r, log) = one_build(
        &h,
        "dummy",
        &pipeline_with(
            json!([stage("s", &["exit 1"])]),
            json!({"dummy-build": true}),
        ),
    );
    assert_eq!(r["status"], "dummy", "{log}");
    assert!(r["stages"].as_array().unwrap().is_empty());
    assert!(!log.contains("[amsbuild] container "), "{log}");

    let (r, log) = one_build(
        &h,
        "keep",
        &pipeline_with(
            json!([stage("s", &["echo made > in-source.txt"])]),
            json!({"cleanup": {"remove_build_source": false, "7z_build": false, "7z_hash": null}}),
        ),
    );
    assert_eq!(r["status"], "pass", "{log}");
    let name = r["name"].as_str().unwrap();
    let dir = h.build_dir("keep").join(name);
    assert_eq!(
        std::fs::read_to_string(dir.join("project_source/in-source.txt")).unwrap(),
        "made\n"
    );
    assert!(dir.join("build").is_dir(), "no 7z: the output folder stays");
    assert!(!h.build_dir("keep").join(format!("{name}.7z")).exists());
    assert!(r["archive_hash"].is_null());
    // The build wrote a new file into its source; master is untouched.
    assert!(!h.source("keep").join("in-source.txt").exists());
}

#[test]
fn a_relative_data_directory_works() {
    require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(tmp.path())
            .env("AMSBUILD_HOME", "rel-data")
            .output()
            .unwrap()
    };
    std::fs::create_dir_all(tmp.path().join("rel-data")).unwrap();
    std::fs::write(
        tmp.path().join("rel-data/web_conf.json"),
        r#"{"webhook_ip": "127.0.0.1", "webhook_port": 0, "web_interface_ip": "127.0.0.1", "web_interface_port": 0}"#,
    )
    .unwrap();
    assert!(run(&["project", "init", "p"]).status.success());
    let src = tmp
        .path()
        .join("rel-data/projects/p/master/project_source/pipeline.json");
    std::fs::write(&src, pipeline(json!([stage("s", &["echo relative-ok"])]))).unwrap();
    let mut host = Command::new(bin())
        .arg("serve")
        .current_dir(tmp.path())
        .env("AMSBUILD_HOME", "rel-data")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the socket", Duration::from_secs(30), || {
        tmp.path()
            .join("rel-data/amsbuild.sock")
            .exists()
            .then_some(())
    });
    let o = run(&["build", "p", "--wait"]);
    let _ = host.kill();
    let _ = host.wait();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("relative-ok"), "{out}");
}

/// `"args": "-é"` once panicked a worker (a string cut inside a character) and jammed the
/// slot: now it fails its own build with the flag named, and the next build runs.
#[test]
fn a_multibyte_docker_arg_fails_its_build_and_the_next_one_runs() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    h.project(
        "bad",
        &pipeline_with(
            json!([stage("s", &["echo never"])]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "args": "-é"}}),
        ),
    );
    h.project("good", &pipeline(json!([stage("s", &["echo fine"])])));
    h.start();
    let bad = h.build("bad");
    let good = h.build("good");
    let r = h.wait_status("bad", &bad, T);
    assert_eq!(r["status"], "fail");
    let log = h.log("bad", &bad);
    assert!(log.contains("`-é`"), "{log}");
    let r = h.wait_status("good", &good, T);
    assert_eq!(r["status"], "pass", "{}", h.log("good", &good));
}

/// A container of a build's name left on the engine (a host that stopped mid-build) is removed
/// and the build's own is made in its place: the engine's name conflict is the sign.
#[test]
fn a_leftover_container_of_the_same_name_is_replaced_by_the_builds() {
    use ams_docker::{ContainerSpec, DockerExecutor, Executor, RunEnd};
    require_docker();
    let name = format!("ams-leftover-{}", std::process::id());
    let made = Command::new("docker")
        .args([
            "create",
            "--name",
            &name,
            "--label",
            "ams-test=leftover",
            IMAGE,
        ])
        .args(["sh", "-c", "echo stale"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (end, out) = rt.block_on(async {
        let ex = DockerExecutor::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let spec = ContainerSpec {
            name: name.clone(),
            image: IMAGE.into(),
            cmd: vec!["sh".into(), "-c".into(), "echo fresh".into()],
            stop_timeout_secs: 2,
            ..Default::default()
        };
        let reading = tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(b) = rx.recv().await {
                out.extend_from_slice(&b);
            }
            out
        });
        let end = ex
            .run(spec, tx, tokio_util::sync::CancellationToken::new())
            .await;
        (end, reading.await.unwrap())
    });
    let out = String::from_utf8_lossy(&out).to_string();
    assert!(matches!(end, Ok(RunEnd::Exited(0))), "{end:?} {out}");
    assert!(out.contains("fresh") && !out.contains("stale"), "{out}");
    // Neither is left.
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name=^{name}$")])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "{left:?}");
}
