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
    let mut h = TestHost::with_conf(json!({"max_active_builds": 2, "engine_wait_secs": 5}));
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
    assert_eq!(
        r["status"], "error",
        "the engine failed, not the project: {r}"
    );
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
    let container = container_of(&h, "victim", &name);
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

/// A socket that forwards to the real engine's, and can be cut (every connection dropped,
/// new ones refused) and restored: an engine that dies and comes back, seen from the host.
struct EngineProxy {
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl EngineProxy {
    fn start(at: &std::path::Path) -> EngineProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let real = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
            .unwrap_or_else(|| "/var/run/docker.sock".into());
        let l = UnixListener::bind(at).unwrap();
        let p = EngineProxy {
            up: Default::default(),
            conns: Default::default(),
        };
        p.up.store(true, Ordering::SeqCst);
        let (up, conns) = (p.up.clone(), p.conns.clone());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                if !up.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(engine) = UnixStream::connect(&real) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(engine.try_clone().unwrap());
                }
                let (mut c1, mut e1) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
                let (mut c2, mut e2) = (client, engine);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut e1);
                    let _ = e1.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut e2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        p
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The container a running build's log names.
fn container_of(h: &TestHost, project: &str, build: &str) -> String {
    h.log(project, build)
        .lines()
        .find_map(|l| l.strip_prefix("[amsbuild] container "))
        .expect("the log names the container")
        .to_string()
}

fn container_exists(name: &str) -> bool {
    let o = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name=^{name}$")])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&o.stdout).trim().is_empty()
}

/// An engine lost in the middle of a build ends that build at once with the reason, and the
/// container it left is removed when the engine answers again.
#[test]
fn an_engine_lost_mid_build_ends_it_and_its_container_goes_when_it_returns() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let proxy = EngineProxy::start(&sock);
    let mut h = TestHost::new();
    h.env
        .push(("DOCKER_HOST".into(), format!("unix://{}", sock.display())));
    h.project(
        "p",
        &pipeline(json!([
            stage("wait", &["sleep 60"]),
            stage("after", &["echo after"])
        ])),
    );
    h.start();
    let name = h.build("p");
    h.wait_running("p", &name);
    let container = container_of(&h, "p", &name);
    proxy.cut();
    let r = h.wait_status("p", &name, Duration::from_secs(60));
    let log = h.log("p", &name);
    assert_eq!(r["status"], "error", "{log}");
    assert!(
        r["archive_name"].is_null()
            && !h
                .data
                .join("projects/p/builds")
                .join(format!("{name}.7z"))
                .exists(),
        "an ERROR build archives nothing: {r}"
    );
    assert!(
        container_exists(&container),
        "the real engine still runs it"
    );
    proxy.restore();
    wait_for(
        "the left container to be removed",
        Duration::from_secs(60),
        || (!container_exists(&container)).then_some(()),
    );
}

/// The host starts without an engine, says so on /healthz and the dashboard, and a build
/// queued meanwhile waits for the engine and runs when it answers.
#[test]
fn builds_wait_for_an_engine_that_is_down_and_run_when_it_comes() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let mut h = TestHost::new();
    h.env
        .push(("DOCKER_HOST".into(), format!("unix://{}", sock.display())));
    h.project("p", &pipeline(json!([stage("s", &["echo engine-came"])])));
    h.start();
    let addr = h.web_addr();
    let body = wait_for(
        "/healthz to say the engine is down",
        Duration::from_secs(30),
        || {
            let (code, body) = http(&addr, "GET", "/healthz", &[], b"");
            (code == 503
                && body["engine"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not answering"))
            .then_some(body)
        },
    );
    assert_eq!(body["database"], "ok", "{body}");
    assert!(h.host_log().contains("not answering"), "{}", h.host_log());
    let name = h.build("p");
    wait_for(
        "the build to wait for the engine",
        Duration::from_secs(60),
        || h.log("p", &name).contains("waiting for it").then_some(()),
    );
    let _proxy = EngineProxy::start(&sock);
    let r = h.wait_status("p", &name, Duration::from_secs(120));
    let log = h.log("p", &name);
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("engine-came"), "{log}");
    wait_for("/healthz to say ok", Duration::from_secs(30), || {
        let (code, body) = http(&addr, "GET", "/healthz", &[], b"");
        (code == 200 && body["status"] == "ok").then_some(())
    });
}

/// A tmpfs of `mb` MiB mounted at `at`, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, mb: u32) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mount a tmpfs (the tests run as root): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A build whose log fills the disk ends FAIL with the reason (never PASS), the host says so
/// once rather than once per write, and builds run again once space is back.
#[test]
fn a_log_that_fills_the_disk_fails_its_build_and_the_host_recovers() {
    require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let _fs = SmallFs::mount(&tmp.path().join("small"), 16);
    let mut h = TestHost::with_conf(json!({"log_max_bytes": 1u64 << 30}));
    // Only the projects live on the small filesystem; the database does not.
    std::fs::create_dir_all(&h.data).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("small"), h.data.join("projects")).unwrap();
    h.project(
        "flood",
        &pipeline(json!([stage(
            "s",
            &["yes 0123456789abcdef | head -c 67108864", "echo done"]
        )])),
    );
    h.project("next", &pipeline(json!([stage("s", &["echo fine"])])));
    h.start();
    let name = h.build("flood");
    let r = h.wait_status("flood", &name, Duration::from_secs(120));
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the build log could not be written"),
        "{r}"
    );
    let said = h.host_log().matches("cannot write the build log").count();
    assert_eq!(said, 1, "{}", h.host_log());
    // Space comes back: the next build runs.
    let o = h.cli(&["delete-output", &format!("flood/{name}")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let n = h.build("next");
    let r = h.wait_status("next", &n, Duration::from_secs(60));
    assert_eq!(r["status"], "pass", "{}", h.log("next", &n));
}

/// A build can read its own stage-marker nonce; forged markers out of the driver's order are
/// dropped, so the host writes and keeps one begin, one end and one result per stage.
#[test]
fn forged_stage_markers_cannot_flood_the_host() {
    require_docker();
    let mut h = TestHost::new();
    let forge = "N=$(grep -o '[0-9a-f]\\{32\\}' /.ams-ci/driver.sh | head -1); \
                 i=0; while [ $i -lt 3000 ]; do \
                 printf '\\n\\036AMS-%s end 0 0\\n\\n\\036AMS-%s begin 5\\n\\n\\036AMS-%s end 9 1\\n' $N $N $N; \
                 i=$((i+1)); done; echo forged";
    h.project(
        "forger",
        &pipeline(json!([
            stage("one", &[forge]),
            stage("two", &["echo real-two"])
        ])),
    );
    h.start();
    let name = h.build("forger");
    let r = h.wait_status("forger", &name, Duration::from_secs(120));
    let log = h.log("forger", &name);
    assert_eq!(r["stages"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(log.matches("<== stage").count(), 2, "{log}");
    assert_eq!(log.matches("==> stage").count(), 2, "{log}");
    assert!(log.contains("real-two"), "{log}");
}
