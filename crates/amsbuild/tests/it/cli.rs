//! The command line without builds: data directory creation, configuration errors, names,
//! and what the commands say when no host runs.

use crate::harness::*;
use serde_json::json;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn commands_say_when_no_host_runs() {
    let h = TestHost::new();
    for args in [
        vec!["build", "x"],
        vec!["builds", "x"],
        vec!["cancel", "x"],
        vec!["delete-output", "x"],
        vec!["gc"],
        vec!["gc", "--dry-run"],
        vec!["status"],
    ] {
        let o = h.cli(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            text(&o).contains("no amsbuild host is running"),
            "{args:?}: {}",
            text(&o)
        );
    }
}

#[test]
fn first_start_creates_the_data_directory_and_a_second_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fresh");
    let child = std::process::Command::new(bin())
        .arg("serve")
        .env("AMSBUILD_HOME", &data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the socket", std::time::Duration::from_secs(30), || {
        data.join("amsbuild.sock").exists().then_some(())
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("created the user `admin` (SERVER ADMIN) with the password"),
        "{console}"
    );
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("web_conf.json")).unwrap())
            .unwrap();
    assert_eq!(conf["web_interface_port"], 8080);
    assert_eq!(conf["webhook_port"], 8081);
    assert_eq!(conf["web_root"], "ams-build");
    assert_eq!(conf["max_active_builds"], 2);
    assert!(data.join("ams.db").exists());
    assert!(data.join("projects").is_dir());
    assert!(
        !data.join("amsbuild.sock").exists(),
        "the socket is removed at stop"
    );

    // A second start reuses the directory and keeps an edited configuration.
    let edited = r#"{"max_active_builds": 3, "webhook_ip": "127.0.0.1", "webhook_port": 0, "web_interface_ip": "127.0.0.1", "web_interface_port": 0}"#;
    std::fs::write(data.join("web_conf.json"), edited).unwrap();
    let child = std::process::Command::new(bin())
        .arg("serve")
        .env("AMSBUILD_HOME", &data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the socket", std::time::Duration::from_secs(30), || {
        data.join("amsbuild.sock").exists().then_some(())
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("password"),
        "printed twice"
    );
    let again = std::fs::read_to_string(data.join("web_conf.json")).unwrap();
    assert_eq!(again, edited);
}

#[test]
fn a_bad_web_conf_stops_the_start_naming_file_line_and_key() {
    let h = TestHost::new();
    std::fs::write(
        h.data.join("web_conf.json"),
        "{\n  \"web_root\": \"ams-build\",\n  \"max_active_bulds\": 2\n}\n",
    )
    .unwrap();
    let o = h.cli(&["serve"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("web_conf.json"), "{t}");
    assert!(t.contains("line 3"), "{t}");
    assert!(t.contains("max_active_bulds"), "{t}");

    std::fs::write(h.data.join("web_conf.json"), "{\n \"use_ssl\": tru e\n}").unwrap();
    let t = text(&h.cli(&["serve"]));
    assert!(t.contains("web_conf.json: line 2"), "{t}");
}

/// Runs `serve`, which must refuse to start; returns what it said. A host that starts anyway
/// is stopped and the test fails.
fn refused_start(h: &TestHost) -> String {
    let mut child = h
        .cmd()
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_for_exit(&mut child, std::time::Duration::from_secs(20));
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert!(exited && !out.status.success(), "the host started: {t}");
    t
}

fn wait_for_exit(child: &mut std::process::Child, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    false
}

#[test]
fn a_web_root_that_would_lead_off_the_site_stops_the_start() {
    // An empty root made `Location: //evil.example/…` out of a login's page_redirect.
    for (root, says) in [
        ("", "is empty"),
        ("/", "starts or ends with a slash"),
        ("/ams-build", "starts or ends with a slash"),
        ("\\evil.example", "more than one path segment"),
        ("..", "dot segment"),
        ("ams build", "a character other than"),
    ] {
        let h = TestHost::with_conf(json!({ "web_root": root }));
        let t = refused_start(&h);
        assert!(
            t.contains("web_conf.json: field `web_root`: ")
                && t.contains(says)
                && t.contains("such as \"ams-build\""),
            "{root:?}: {t}"
        );
        assert!(!h.data.join("amsbuild.sock").exists(), "{root:?}");
    }
}

#[test]
fn bad_project_names_are_refused() {
    let h = TestHost::new();
    let long = "a".repeat(65);
    for name in ["a/b", "..", "a b", "a\u{1}b", long.as_str(), "../x"] {
        let o = h.cli(&["project", "init", name]);
        assert!(!o.status.success(), "{name:?} accepted");
        assert!(text(&o).contains("project name"), "{}", text(&o));
    }
    assert!(!h.data.join("x").exists());
    let o = h.cli(&["project", "init", &"a".repeat(64)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn project_add_with_a_bad_url_leaves_nothing() {
    let h = TestHost::new();
    let missing = h.tmp.path().join("no-such-repo");
    let o = h.cli(&["project", "add", "p", "--git", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot add project"), "{}", text(&o));
    assert!(!h.data.join("projects/p").exists());
}

#[test]
fn run_refuses_a_malformed_pipeline_with_its_field() {
    let h = TestHost::new();
    let dir = h.tmp.path().join("src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.json"), pipeline(json!([]))).unwrap();
    let o = h.cmd().args(["run", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("field `pipeline`"), "{}", text(&o));
}

#[test]
fn a_dead_docker_engine_ends_the_build_error_not_the_host() {
    // Builds wait for a missing engine for engine_wait_secs, then end ERROR with the reason.
    let mut h = TestHost::with_conf(json!({"engine_wait_secs": 2}));
    let dead = h.tmp.path().join("no-docker.sock");
    h.env
        .push(("DOCKER_HOST".into(), format!("unix://{}", dead.display())));
    h.start();
    h.project("p", &pipeline(json!([stage("s", &["true"])])));
    for _ in 0..2 {
        let name = h.build("p");
        let r = h.wait_status("p", &name, std::time::Duration::from_secs(60));
        assert_eq!(r["status"], "error");
        let reason = r["reason"].as_str().unwrap();
        assert!(
            reason.contains("Docker engine is not reachable"),
            "{reason}"
        );
        assert!(reason.contains("waited 2 s for the engine"), "{reason}");
    }
    let dir = h.tmp.path().join("src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pipeline.json"),
        pipeline(json!([stage("s", &["true"])])),
    )
    .unwrap();
    let o = h.cmd().args(["run", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("Docker engine is not reachable"),
        "{}",
        text(&o)
    );
}

/// `amsbuild builds P | head -1` must not panic when the reader goes away: every command that
/// prints, with its standard output closed, and with its standard error closed too (the
/// errors and notes it writes there).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let mut h = TestHost::new();
    h.project(
        "p",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.start();
    let mut names = Vec::new();
    for _ in 0..3 {
        let n = h.build("p");
        h.wait_status("p", &n, std::time::Duration::from_secs(30));
        names.push(n);
    }
    add_user(&h, "reader", "1", "p", "a long enough password");
    let printing: &[&[&str]] = &[
        &["builds", "p"],
        &["builds", "p", "--json"],
        &["status"],
        &["log", &names[0]],
        &["log", "p", "2"],
        &["deliveries", "p"],
        &["notifications", "p"],
        &["project", "list"],
        &["user", "list"],
        &["token", "list", "--user", "reader"],
        &["secret", "list", "p"],
        &["completions", "bash"],
        &["man"],
        &["--help"],
        &["--version"],
        // Errors go to standard error.
        &["builds", "no-such-project"],
        &["log", "no-such-build"],
    ];
    for args in printing {
        for close_stderr in [false, true] {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            let mut c = h.cmd();
            c.args(*args).stdout(writer);
            let o = if close_stderr {
                let (r2, w2) = std::io::pipe().unwrap();
                drop(r2);
                c.stderr(w2).output().unwrap()
            } else {
                c.stderr(std::process::Stdio::piped()).output().unwrap()
            };
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            // A panic exits 101; a closed pipe is a quiet end (0) or the command's own code.
            assert!(
                matches!(o.status.code(), Some(0..=2)),
                "{args:?} (stderr closed: {close_stderr}): {:?} {err}",
                o.status
            );
        }
    }
}
