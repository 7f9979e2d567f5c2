//! The engine as a dependency that fails: a hung engine (one that accepts connections and never
//! answers, as a stopped `dockerd` does) fails the builds that need it within bounded time,
//! while the host starts at once and every other project's commands are answered.

use crate::harness::*;
use serde_json::json;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Accepts connections and never answers them, for as long as the test runs.
fn black_hole() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

#[test]
fn a_hung_engine_fails_its_builds_in_bounded_time_and_blocks_nothing_else() {
    let addr = black_hole();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 2}));
    h.env.push(("DOCKER_HOST".into(), format!("tcp://{addr}")));
    h.project("needs-engine", &pipeline(json!([stage("s", &["echo hi"])])));
    h.project(
        "dummy",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    // The start does not wait for the engine (it would hang on the leftover-container sweep).
    let t0 = Instant::now();
    h.start();
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the host took {:?} to start with a hung engine",
        t0.elapsed()
    );
    let stuck = h.build("needs-engine");
    wait_for("the build to start", Duration::from_secs(10), || {
        (h.record("needs-engine", &stuck)["status"] == "running").then_some(())
    });
    // While that build waits on the engine, other commands are answered and other builds run.
    for _ in 0..3 {
        let name = h.build("dummy");
        let r = h.wait_status("dummy", &name, Duration::from_secs(10));
        assert_eq!(r["status"], "dummy");
    }
    let s = h.req(json!({"cmd": "status"}));
    assert_eq!(s["ok"], true, "{s}");
    // The engine-bound build ends with the reason, bounded by the engine call timeout.
    let r = h.wait_status("needs-engine", &stuck, Duration::from_secs(90));
    assert_eq!(r["status"], "fail");
    let log = h.log("needs-engine", &stuck);
    assert!(log.contains("did not answer"), "{log}");
}

/// A build whose container runs out of memory, or is killed from outside, ends with that
/// reason, from the engine's own report.
#[test]
fn out_of_memory_and_outside_kills_are_named() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "oom",
        &pipeline_with(
            json!([
                stage("eat", &["dd if=/dev/zero of=/dev/null bs=96M count=1"]),
                stage("after", &["echo after"])
            ]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "args": "--memory 24m"}}),
        ),
    );
    h.project(
        "victim",
        &pipeline(json!([
            stage("wait", &["sleep 60"]),
            stage("after", &["echo after"])
        ])),
    );
    h.start();
    let name = h.build("oom");
    let r = h.wait_status("oom", &name, Duration::from_secs(120));
    let log = h.log("oom", &name);
    assert_ne!(r["status"], "pass", "{log}");
    assert!(log.contains("ran out of memory (limit 24 MiB)"), "{log}");

    let name = h.build("victim");
    h.wait_running("victim", &name);
    let container = h
        .log("victim", &name)
        .lines()
        .find_map(|l| l.strip_prefix("[amsbuild] container "))
        .unwrap()
        .to_string();
    let o = std::process::Command::new("docker")
        .args(["kill", &container])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = h.wait_status("victim", &name, Duration::from_secs(30));
    let log = h.log("victim", &name);
    assert_eq!(r["status"], "fail", "{log}");
    assert!(
        log.contains("killed by signal 9 from outside the build"),
        "{log}"
    );
}
