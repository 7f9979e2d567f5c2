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
