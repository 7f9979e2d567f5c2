//! A pool of engines: two extra `dockerd`s, each in its own network namespace joined to the
//! host by a veth pair and reached over TCP with mutual TLS (certificates made here by rcgen),
//! with the local test image loaded. Placement by labels and slots, source and output through
//! the archive endpoint, an engine killed mid-build and back, restart cleanup on every engine.

use crate::harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static NEXT: AtomicU32 = AtomicU32::new(1);

/// 10.100.x.x to 10.199.x.x by process id (bench.py uses 10.232).
fn subnet_octet() -> u32 {
    100 + std::process::id() % 100
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn must(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificates of one test: a CA, the engines' server certificates and the host's client
/// certificate.
struct Pki {
    ca: rcgen::Certificate,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "ams test engines CA");
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            ca,
            ca_params: p,
            ca_key,
        }
    }

    /// A certificate signed by the CA for `names` (DNS names or IP addresses), as PEM.
    fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// One extra engine: its namespace, veth pair, folders and `dockerd`. Everything is removed
/// when it drops, whatever the test did.
struct ExtraEngine {
    netns: String,
    veth: String,
    peer: String,
    host_ip: String,
    ip: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ExtraEngine {
    fn new(pki: &Pki) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let e = ExtraEngine {
            netns: format!("amse{tag}"),
            veth: format!("amsh{tag}"),
            peer: format!("amsp{tag}"),
            // The second octet follows the process, so two test runs at once (a helper's
            // beside CI's) never route one subnet to two namespaces.
            host_ip: format!("10.{}.{n}.1", subnet_octet()),
            ip: format!("10.{}.{n}.2", subnet_octet()),
            dir: tempfile::Builder::new().prefix("amse").tempdir().unwrap(),
            child: None,
        };
        must("ip", &["netns", "add", &e.netns]);
        e.link();
        let (cert, key) = pki.issue(&[&e.ip], false);
        let d = e.dir.path();
        std::fs::write(d.join("ca.pem"), pki.ca.pem()).unwrap();
        std::fs::write(d.join("cert.pem"), cert).unwrap();
        std::fs::write(d.join("key.pem"), key).unwrap();
        let mut e = e;
        e.start();
        e.load_image();
        e
    }

    /// The veth pair between the host and the namespace, with its addresses.
    fn link(&self) {
        must(
            "ip",
            &[
                "link", "add", &self.veth, "type", "veth", "peer", "name", &self.peer,
            ],
        );
        must("ip", &["link", "set", &self.peer, "netns", &self.netns]);
        must(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.host_ip),
                "dev",
                &self.veth,
            ],
        );
        must("ip", &["link", "set", &self.veth, "up"]);
        let ns = &self.netns;
        must(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", self.ip),
                "dev",
                &self.peer,
            ],
        );
        must("ip", &["-n", ns, "link", "set", &self.peer, "up"]);
        must("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }

    fn sock(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.path().display())
    }

    pub fn tcp(&self) -> String {
        format!("tcp://{}:2376", self.ip)
    }

    fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", self.sock());
        c
    }

    /// Starts `dockerd` in the namespace (never in the host's: it would take over docker0).
    fn start(&mut self) {
        let d = self.dir.path();
        let p = |s: &str| d.join(s).to_string_lossy().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .args(["dockerd", "--host", &self.tcp(), "--host", &self.sock()])
            .args(["--data-root", &p("root"), "--exec-root", &p("exec")])
            .args(["--pidfile", &p("pid"), "--tlsverify"])
            .args(["--tlscacert", &p("ca.pem"), "--tlscert", &p("cert.pem")])
            .args(["--tlskey", &p("key.pem")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(
            "the extra engine to answer",
            Duration::from_secs(90),
            || {
                self.docker()
                    .args(["version", "--format", "{{.Server.Version}}"])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|_| ())
            },
        );
    }

    fn load_image(&self) {
        let mut save = Command::new("docker")
            .args(["save", IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let st = self
            .docker()
            .arg("load")
            .stdin(save.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success() && save.wait().unwrap().success());
    }

    /// Kills `dockerd` at once, as a crash would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Containers of the host `host_id` on this engine.
    fn containers(&self, host_id: &str) -> Vec<String> {
        let out = self
            .docker()
            .args(["ps", "-a", "-q", "--filter"])
            .arg(format!("label=io.ams-build.host={host_id}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// The processes this engine left (its containerd and shims), found by its folder.
    fn leftover_pids(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for ExtraEngine {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            for _ in 0..200 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.leftover_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Mounts the engine left under its folder, deepest first.
        let root = self.dir.path().to_string_lossy().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = run("umount", &["-l", m]);
        }
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// Two extra engines and a host whose pool is `engines` (with `{b1}`/`{b2}` in `host`
/// replaced by their addresses and their TLS files given).
fn pool(engines: Value, extra_conf: Value) -> (ExtraEngine, ExtraEngine, TestHost) {
    require_docker();
    let pki = Pki::new();
    let b1 = ExtraEngine::new(&pki);
    let b2 = ExtraEngine::new(&pki);
    let mut list = engines.as_array().unwrap().clone();
    for e in &mut list {
        let host = e["host"].as_str().unwrap().to_string();
        let addr = match host.as_str() {
            "{b1}" => Some(b1.tcp()),
            "{b2}" => Some(b2.tcp()),
            _ => None,
        };
        if let Some(a) = addr {
            e["host"] = json!(a);
            e["tls"] = json!({"ca": "engines/ca.pem", "cert": "engines/cert.pem",
                              "key": "engines/key.pem"});
        }
    }
    let mut conf = json!({"engines": list, "engine_wait_secs": 0});
    for (k, v) in extra_conf.as_object().unwrap() {
        conf[k] = v.clone();
    }
    let h = TestHost::with_conf(conf);
    let certs = h.data.join("engines");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = pki.issue(&["ams-host"], true);
    std::fs::write(certs.join("ca.pem"), pki.ca.pem()).unwrap();
    std::fs::write(certs.join("cert.pem"), cert).unwrap();
    std::fs::write(certs.join("key.pem"), key).unwrap();
    (b1, b2, h)
}

fn engines_of(h: &TestHost) -> Vec<Value> {
    h.req(json!({"cmd": "engines"}))["engines"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn engine_up(h: &TestHost, name: &str) -> Option<bool> {
    engines_of(h)
        .into_iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["up"].as_bool())
}

/// Which engine a build ran on, from its log.
fn engine_in_log(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("[amsbuild] runs on engine "))
        .map(|s| s.trim().to_string())
}

#[test]
fn builds_are_placed_by_labels_and_source_and_output_travel_byte_for_byte() {
    let (b1, _b2, mut h) = pool(
        json!([
            {"name": "local", "host": "unix:///var/run/docker.sock", "slots": 1},
            {"name": "b1", "host": "{b1}", "slots": 1, "labels": ["big"]},
            {"name": "b2", "host": "{b2}", "slots": 2, "labels": ["linux"]}
        ]),
        json!({}),
    );
    let outside = tempfile::tempdir().unwrap();
    let outside_s = outside.path().to_string_lossy().to_string();
    let escape =
        format!("ln -s {outside_s} Builds/esc && mkdir Builds/d && ln -s {outside_s} Builds/d/l");
    let keep = json!({"remove_build_source": true, "7z_build": false});
    h.project(
        "big",
        &pipeline_with(
            json!([stage(
                "copy",
                &[
                    "cp -a run.sh sub inner outer Builds/",
                    "echo made-in-container > Builds/new.txt",
                    &escape,
                    "echo GATEWAY=$(ip route | awk '/^default/ {print $3}')",
                ]
            )]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "stop-timeout": 2,
                              "labels": ["big"]},
                   "cleanup": keep}),
        ),
    );
    // The source: a binary file, an executable with its own mode, a link inside, a link out.
    let src = h.source("big");
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 256) as u8).collect();
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/blob.bin"), &blob).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o741)).unwrap();
    std::os::unix::fs::symlink("sub/blob.bin", src.join("inner")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("outer")).unwrap();
    let gpu_pipeline = pipeline_with(
        json!([stage("s", &["true"])]),
        json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                          "build-output-dest": "/root/project/Builds", "labels": ["gpu"]}}),
    );
    h.project("gpu", &gpu_pipeline);
    h.project("any", &pipeline(json!([stage("s", &["sleep 3"])])));
    // A cache on a remote engine: in with the source, back after the run, then saved.
    h.project(
        "cached",
        &pipeline_with(
            json!([stage(
                "s",
                &[
                    "echo \"seen: $(cat /root/.cache/dep/seen 2>/dev/null || echo none)\"",
                    "cat note > /root/.cache/dep/seen",
                    "ln -sf /etc/passwd /root/.cache/dep/link"
                ]
            )]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "labels": ["linux"]},
                   "caches": [{"key": "dep", "path": "/root/.cache/dep"}]}),
        ),
    );
    // A trusted bind of a host folder cannot be given on another machine's engine.
    h.project(
        "bind",
        &pipeline_with(
            json!([stage("s", &["ls /hostdir"])]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "labels": ["big"],
                              "args": "-v /tmp:/hostdir"}}),
        ),
    );
    h.private_config("bind", json!({"allow-docker-args": ["-v"]}));
    add_user(&h, "boss", "5", "", "a long password");
    add_user(&h, "dev", "3", "any", "a long password");
    h.start();
    wait_for("both extra engines up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true) && engine_up(&h, "b2") == Some(true)).then_some(())
    });

    // A build whose labels no engine has fails at once, saying why.
    let gpu = h.build("gpu");
    let r = h.wait_status("gpu", &gpu, Duration::from_secs(20));
    assert_eq!(r["status"], "fail", "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(reason.contains("gpu") && reason.contains("b1 [big]"), "{r}");

    // Labels: `big` goes to b1 only; the source arrives and the output comes back intact.
    let name = h.build("big");
    let r = h.wait_status("big", &name, Duration::from_secs(120));
    let log = h.log("big", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert_eq!(engine_in_log(&log).as_deref(), Some("b1"), "{log}");
    // This engine's default bridge lets containers reach each other (dockerd's default), so
    // the build joined the network AMS-Build made there, which does not.
    let gateway = |net: &str| {
        let o = b1
            .docker()
            .args(["network", "inspect", net, "--format"])
            .arg("{{(index .IPAM.Config 0).Gateway}} {{index .Options \"com.docker.network.bridge.enable_icc\"}}")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let (ours, default) = (gateway("ams-build"), gateway("bridge"));
    assert!(
        ours.ends_with(" false") && default.ends_with("true"),
        "{ours} / {default}"
    );
    let joined = log.lines().find_map(|l| l.strip_prefix("GATEWAY="));
    assert_eq!(joined, ours.split(' ').next(), "{log}");
    // Through the archive endpoint, not a bind mount (the test engines share this machine's
    // disk, so a mount would work here and hide a broken copy).
    assert!(log.contains("output read back from the engine: "), "{log}");
    let out = h.build_dir("big").join(&name).join("build");
    assert_eq!(std::fs::read(out.join("sub/blob.bin")).unwrap(), blob);
    let mode = std::fs::metadata(out.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o741);
    assert_eq!(
        std::fs::read_link(out.join("inner")).unwrap(),
        Path::new("sub/blob.bin")
    );
    assert_eq!(
        std::fs::read_link(out.join("outer")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        std::fs::read_to_string(out.join("new.txt")).unwrap(),
        "made-in-container\n"
    );
    // Links the container made are links in the output, and nothing was written through them.
    assert_eq!(
        std::fs::read_link(out.join("esc")).unwrap(),
        PathBuf::from(&outside_s)
    );
    assert!(std::fs::symlink_metadata(out.join("d/l"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(
        b1.containers(&h.host_id()).is_empty(),
        "the container is removed"
    );

    // Slots and load: four unlabelled builds at once fill every slot.
    let names: Vec<String> = (0..4).map(|_| h.build("any")).collect();
    let mut on = Vec::new();
    for n in &names {
        let r = h.wait_status("any", n, Duration::from_secs(120));
        let log = h.log("any", n);
        assert_eq!(r["status"], "pass", "{r}\n{log}");
        on.push(engine_in_log(&log).unwrap_or_default());
    }
    // Empty engines tie (the first listed wins), then the fewest builds per slot.
    assert_eq!(on, ["local", "b1", "b2", "b2"]);
    let text = String::from_utf8(h.cli(&["engines"]).stdout).unwrap();
    assert!(text.contains("b1") && text.contains("up"), "{text}");
    let (_, _, body) = http_raw(&h.web_addr(), "/metrics", &[]);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("amsbuild_engine_slots{engine=\"b2\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("amsbuild_engine_up{engine=\"b1\"} 1"),
        "{body}"
    );
    // The admin page: SERVER ADMIN sees every engine; anyone else gets the 404 of no page.
    let web = h.web_addr();
    let page = |user: &str| {
        let cookie = web_login(&web, user, "a long password");
        let (st, _, body) = http_raw(&web, "/ams-build/engines", &[("Cookie", cookie)]);
        (st, String::from_utf8_lossy(&body).to_string())
    };
    let (st, body) = page("boss");
    assert_eq!(st, 200, "{body}");
    for part in ["b1", "b2", "local", &b1.tcp(), "big", "folders by archive"] {
        assert!(body.contains(part), "{part}: {body}");
    }
    let (st, body) = page("dev");
    assert_eq!(st, 404, "{body}");

    let name = h.build("bind");
    let r = h.wait_status("bind", &name, Duration::from_secs(60));
    assert_eq!(r["status"], "fail", "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("/tmp:/hostdir") && reason.contains("another machine"),
        "{r}"
    );

    let mut logs = Vec::new();
    for note in ["first", "second"] {
        std::fs::write(h.source("cached").join("note"), note).unwrap();
        let name = h.build("cached");
        let r = h.wait_status("cached", &name, Duration::from_secs(120));
        let log = h.log("cached", &name);
        assert_eq!(r["status"], "pass", "{r}\n{log}");
        assert_eq!(engine_in_log(&log).as_deref(), Some("b2"), "{log}");
        logs.push(log);
    }
    assert!(logs[0].contains("seen: none"), "{}", logs[0]);
    assert!(logs[0].contains("cache dep: saved"), "{}", logs[0]);
    // The second build restored what the first one's container wrote on the other engine.
    assert!(logs[1].contains("seen: first"), "{}", logs[1]);
    let caches = h.data.join("projects/cached/caches");
    let entry = std::fs::read_dir(&caches)
        .unwrap()
        .flatten()
        .map(|s| s.path().join("dep"))
        .find(|p| p.is_dir())
        .expect("an entry");
    assert_eq!(
        std::fs::read_to_string(entry.join("seen")).unwrap(),
        "first"
    );
    assert_eq!(
        std::fs::read_link(entry.join("link")).unwrap(),
        Path::new("/etc/passwd")
    );
    h.term();
}

#[test]
fn an_engine_lost_mid_build_errors_retries_elsewhere_comes_back_and_is_swept_at_restart() {
    let (mut b1, b2, mut h) = pool(
        json!([
            {"name": "b1", "host": "{b1}", "slots": 1},
            {"name": "b2", "host": "{b2}", "slots": 1}
        ]),
        json!({}),
    );
    h.project("long", &pipeline(json!([stage("s", &["sleep 25"])])));
    h.private_config("long", json!({"retry-on-error": 1}));
    h.start();
    wait_for("both extra engines up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true) && engine_up(&h, "b2") == Some(true)).then_some(())
    });
    let first = h.build("long");
    h.wait_running("long", &first);
    assert_eq!(engine_in_log(&h.log("long", &first)).as_deref(), Some("b1"));
    b1.kill();
    let t0 = std::time::Instant::now();
    let r = h.wait_status("long", &first, Duration::from_secs(60));
    assert_eq!(r["status"], "error", "{r}\n{}", h.log("long", &first));
    assert!(t0.elapsed() < Duration::from_secs(45), "{:?}", t0.elapsed());
    wait_for("b1 to show down", Duration::from_secs(20), || {
        (engine_up(&h, "b1") == Some(false)).then_some(())
    });
    // retry-on-error queues it again, and it runs on the engine that answers.
    let retry = wait_for("the retry", Duration::from_secs(30), || {
        let a = h.req(json!({"cmd": "builds", "project": "long", "limit": 10}));
        a["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] != first.as_str())
            .cloned()
    });
    let retry = retry["name"].as_str().unwrap().to_string();
    h.wait_running("long", &retry);
    assert_eq!(engine_in_log(&h.log("long", &retry)).as_deref(), Some("b2"));

    // b1 comes back and takes builds again (b2 is busy with the retry).
    b1.start();
    wait_for("b1 to answer again", Duration::from_secs(40), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    let again = h.build("long");
    h.wait_running("long", &again);
    assert_eq!(engine_in_log(&h.log("long", &again)).as_deref(), Some("b1"));

    // A host killed with builds on both engines removes its containers on both at restart.
    let id = h.host_id();
    wait_for(
        "containers on both engines",
        Duration::from_secs(20),
        || (!b1.containers(&id).is_empty() && !b2.containers(&id).is_empty()).then_some(()),
    );
    h.kill();
    h.start();
    wait_for("both engines swept", Duration::from_secs(60), || {
        (b1.containers(&id).is_empty() && b2.containers(&id).is_empty()).then_some(())
    });
    for n in [&retry, &again] {
        let r = h.wait_status("long", n, Duration::from_secs(20));
        assert_eq!(r["status"], "error", "{r}");
    }
    h.term();
}

#[test]
fn an_engine_cut_off_the_network_ends_its_build_error_within_bounded_time() {
    let (b1, _b2, mut h) = pool(
        json!([{"name": "b1", "host": "{b1}", "slots": 1}]),
        json!({}),
    );
    h.project("long", &pipeline(json!([stage("s", &["sleep 120"])])));
    h.start();
    wait_for("b1 up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    let name = h.build("long");
    h.wait_running("long", &name);
    // The veth pair goes: no reset reaches the host, the connection just goes quiet.
    must("ip", &["link", "del", &b1.veth]);
    let t0 = std::time::Instant::now();
    let r = h.wait_status("long", &name, Duration::from_secs(90));
    let log = h.log("long", &name);
    assert_eq!(r["status"], "error", "{r}\n{log}");
    assert!(log.contains("stopped answering"), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    wait_for("b1 to show down", Duration::from_secs(30), || {
        (engine_up(&h, "b1") == Some(false)).then_some(())
    });
    // Back on the network, it answers again and its left container is removed.
    b1.link();
    wait_for("b1 to answer again", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    let id = h.host_id();
    wait_for(
        "the left container removed",
        Duration::from_secs(60),
        || b1.containers(&id).is_empty().then_some(()),
    );
    h.term();
}

/// Mutual TLS trusts the configured CA and nothing else. Here the engine's real CA is one the
/// system trusts (`SSL_CERT_FILE`, which a client using the system's roots reads) and the
/// configured CA is another: the engine must be refused, as one holding a publicly signed
/// certificate for its name would be.
#[test]
fn only_the_configured_ca_is_trusted_not_the_systems() {
    let (_b1, _b2, mut h) = pool(
        json!([{"name": "b1", "host": "{b1}", "slots": 1}]),
        json!({}),
    );
    let configured = h.data.join("engines/ca.pem");
    let system = h.tmp.path().join("system-roots.pem");
    std::fs::copy(&configured, &system).unwrap();
    std::fs::write(&configured, Pki::new().ca.pem()).unwrap();
    h.env
        .push(("SSL_CERT_FILE".into(), system.display().to_string()));
    h.start();
    // A client that also trusted the system's roots connects at once and never gets here.
    wait_for("b1 refused", Duration::from_secs(60), || {
        engines_of(&h)
            .into_iter()
            .find(|e| e["name"] == "b1" && e["up"] == false && !e["last_error"].is_null())
    });
    assert!(
        engines_of(&h).iter().all(|e| e["version"].is_null()),
        "never spoken to"
    );
}

/// A TLS file that cannot serve stops the start with the field, the file and the fix: a
/// missing CA, a certificate file holding no certificate, and (the easy mistake when an
/// engine's files are copied around) the key of another certificate, which would otherwise
/// only show later as an engine that never answers.
#[test]
fn a_wrong_tls_file_stops_the_start_naming_the_field_and_the_fix() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["ams-host"], true);
    let (_, other_key) = pki.issue(&["ams-host"], true);
    let cases: [(&str, &str, &str, &[&str]); 3] = [
        (
            "no CA file",
            "",
            &key,
            &[
                "`engines[0].tls.ca`",
                "cannot read",
                "ca.pem",
                "readable PEM file",
            ],
        ),
        (
            "a key where the certificate goes",
            "cert",
            &key,
            &["`engines[0].tls.cert`", "holds no certificate", "cert.pem"],
        ),
        (
            "the key of another certificate",
            "ok",
            &other_key,
            &[
                "`engines[0].tls.key`",
                "key.pem",
                "is not the key of the certificate",
                "cert.pem",
            ],
        ),
    ];
    for (what, cert_case, key_pem, wanted) in cases {
        let h = TestHost::with_conf(json!({
            "engines": [{"name": "b1", "host": "tcp://127.0.0.1:9", "slots": 1,
                         "tls": {"ca": "engines/ca.pem", "cert": "engines/cert.pem",
                                 "key": "engines/key.pem"}}]
        }));
        let dir = h.data.join("engines");
        std::fs::create_dir_all(&dir).unwrap();
        if !cert_case.is_empty() {
            std::fs::write(dir.join("ca.pem"), pki.ca.pem()).unwrap();
        }
        let cert_pem = if cert_case == "cert" {
            key.clone()
        } else {
            cert.clone()
        };
        std::fs::write(dir.join("cert.pem"), cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), key_pem).unwrap();
        // A host that starts anyway is stopped and the test fails, rather than waiting on it.
        let mut child = h
            .cmd()
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ended = wait_for_opt(Duration::from_secs(30), || child.try_wait().unwrap());
        if ended.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            ended.is_some_and(|s| !s.success()),
            "{what}: the host must not start: {err}"
        );
        for w in wanted {
            assert!(err.contains(w), "{what}: {w:?} missing from: {err}");
        }
        assert!(err.contains("web_conf.json"), "{what}: {err}");
    }
}

/// `f`'s first `Some` within `timeout`, or `None` once it has passed.
fn wait_for_opt<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl ExtraEngine {
    /// Slows what the engine sends to the host to `rate` (tc on its end of the veth).
    fn throttle(&self, rate: &str) {
        must(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                &self.peer,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kb",
                "latency",
                "10s",
            ],
        );
    }

    fn unthrottle(&self) {
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "del",
                "dev",
                &self.peer,
                "root",
            ],
        );
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to its `dockerd`: a stopped one keeps its connections
    /// open and sends nothing, as a hung engine does.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("dockerd runs").id().to_string();
        must("kill", &[sig, &pid]);
    }
}

/// Waits until the host's copy of the build's output holds `file` (a part of it, as it comes
/// back from the engine).
fn wait_output_arriving(h: &TestHost, project: &str, name: &str, file: &str) {
    let path = h.build_dir(project).join(name).join("build").join(file);
    wait_for(
        "the output to start coming back",
        Duration::from_secs(120),
        || {
            std::fs::metadata(&path)
                .ok()
                .filter(|m| m.len() > 0)
                .map(|_| ())
        },
    );
}

/// The output comes back through the archive endpoint after the container ended, outside the
/// run's engine watchdog: an engine that goes quiet then (here its dockerd stopped mid-copy)
/// must not hold the build and its slot for ever, and a cancel while a slow engine sends the
/// output must end the build without waiting for all of it.
#[test]
fn a_quiet_engine_or_a_cancel_while_the_output_comes_back_ends_the_build_in_bounded_time() {
    let (b1, _b2, mut h) = pool(
        json!([{"name": "b1", "host": "{b1}", "slots": 1}]),
        json!({}),
    );
    // 8 MiB that do not compress, sent back at 512 kbit/s: over two minutes.
    h.project(
        "slow",
        &pipeline(json!([stage(
            "s",
            &["dd if=/dev/urandom of=Builds/big bs=1024 count=8192 2>/dev/null"]
        )])),
    );
    h.project("quick", &pipeline(json!([stage("s", &["true"])])));
    h.start();
    wait_for("b1 up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    b1.throttle("512kbit");

    // A cancel while the output comes back: the build ends CANCELED, not two minutes later.
    let name = h.build("slow");
    wait_output_arriving(&h, "slow", &name, "big");
    let a = h.req(json!({"cmd": "cancel", "build": name}));
    assert_eq!(a["ok"], true, "{a}");
    let t0 = std::time::Instant::now();
    let r = h.wait_status("slow", &name, Duration::from_secs(100));
    let log = h.log("slow", &name);
    assert_eq!(r["status"], "cancel", "{r}\n{log}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(log.contains("could not be read back"), "{log}");

    // An engine that stops sending mid-copy: ERROR within bounded time, the engine is taken
    // out of placement, and once it answers again the container is removed and the slot
    // takes builds.
    let name = h.build("slow");
    wait_output_arriving(&h, "slow", &name, "big");
    b1.signal("-STOP");
    let t0 = std::time::Instant::now();
    let r = wait_for_opt(Duration::from_secs(100), || {
        let r = h.record("slow", &name);
        (r["status"] != "pending" && r["status"] != "running").then_some(r)
    });
    b1.signal("-CONT");
    let log = h.log("slow", &name);
    let r = r.unwrap_or_else(|| panic!("the build never ended:\n{log}"));
    assert_eq!(r["status"], "error", "{r}\n{log}");
    assert!(t0.elapsed() < Duration::from_secs(80), "{:?}", t0.elapsed());
    assert!(log.contains("stopped sending"), "{log}");
    b1.unthrottle();
    wait_for("b1 up again", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    let id = h.host_id();
    wait_for(
        "the left container removed",
        Duration::from_secs(60),
        || b1.containers(&id).is_empty().then_some(()),
    );
    let q = h.build("quick");
    let r = h.wait_status("quick", &q, Duration::from_secs(60));
    assert_eq!(r["status"], "pass", "{r}\n{}", h.log("quick", &q));
    h.term();
}

/// What a hostile build can leave in its output on an engine elsewhere, read back through the
/// archive endpoint: names that are not UTF-8 (short, in a GNU long name, beside one that reads
/// the same once made UTF-8), a long UTF-8 name (a PAX path), a newline in a name, hard links,
/// a fifo, a set-uid file, a read-only folder and a tree deeper than the copy takes. Every name
/// comes back byte for byte, nothing else is written, and what is refused is said.
#[test]
fn odd_names_and_special_files_in_a_remote_output_come_back_exactly_or_are_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let (_b1, _b2, mut h) = pool(
        json!([{"name": "b1", "host": "{b1}", "slots": 1}]),
        json!({}),
    );
    let script = r#"set -e
o=Builds
printf one > "$o/a$(printf '\377')"
printf two > "$o/a$(printf '\376')"
printf three > "$o/a$(printf '\357\277\275')"
l=llllllllll; l=$l$l$l$l$l$l$l$l$l$l$l$l$l$l$l
printf four > "$o/$l$(printf '\372')"
printf five > "$o/$l$(printf '\303\251')"
printf six > "$o/$(printf 'nl\nx')"
echo hl > $o/h1 && ln $o/h1 $o/h2
mkfifo $o/fifo
echo s > $o/suid && chmod 4755 $o/suid
mkdir $o/ro && echo r > $o/ro/f && chmod 555 $o/ro
d=$o/deep; i=0; while [ $i -lt 300 ]; do d=$d/d; i=$((i+1)); done
mkdir -p $d && echo bottom > $d/f
"#;
    h.project(
        "odd",
        &pipeline_with(
            json!([stage("s", &["sh make.sh"])]),
            json!({"cleanup": {"remove_build_source": true, "7z_build": false}}),
        ),
    );
    std::fs::write(h.source("odd").join("make.sh"), script).unwrap();
    h.start();
    wait_for("b1 up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    let name = h.build("odd");
    let r = h.wait_status("odd", &name, Duration::from_secs(120));
    let log = h.log("odd", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert!(log.contains("output read back from the engine"), "{log}");
    let out = h.build_dir("odd").join(&name).join("build");
    let read = |n: &[u8]| {
        std::fs::read(out.join(OsStr::from_bytes(n)))
            .unwrap_or_else(|e| panic!("{:?}: {e}\n{log}", String::from_utf8_lossy(n)))
    };
    let l = [b'l'; 150];
    assert_eq!(read(b"a\xff"), b"one");
    assert_eq!(read(b"a\xfe"), b"two");
    assert_eq!(read("a\u{fffd}".as_bytes()), b"three");
    assert_eq!(read(&[&l[..], b"\xfa"].concat()), b"four");
    assert_eq!(read(&[&l[..], "é".as_bytes()].concat()), b"five");
    assert_eq!(read(b"nl\nx"), b"six");
    assert_eq!(read(b"h2"), b"hl\n");
    let ino = |n: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(out.join(n)).unwrap().ino()
    };
    assert_eq!(ino("h1"), ino("h2"), "the hard link stays one file");
    assert!(std::fs::symlink_metadata(out.join("fifo")).is_err());
    let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(
        mode("ro"),
        0o755,
        "the host keeps the right to write and remove"
    );
    assert_eq!(read(b"ro/f"), b"r\n");
    assert!(log.contains("fifo") && log.contains("too deep"), "{log}");
    // Everything that came back is one of these (the deep tree stops where the copy stopped).
    let names: Vec<Vec<u8>> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(names.len(), 11, "{names:?}");
    h.term();
}

/// The source goes to an engine elsewhere in one request, which bollard's two-minute request
/// timeout once cut however well it went (a large source over a slow link ended ERROR and took
/// the engine out of placement). Here it takes over two minutes and the build passes; then an
/// engine that stops answering mid-upload ends its build within the watchdog's time.
#[test]
fn a_source_that_takes_over_two_minutes_to_send_still_runs_and_a_hung_engine_mid_upload_errors() {
    let (b1, _b2, mut h) = pool(
        json!([{"name": "b1", "host": "{b1}", "slots": 1}]),
        json!({}),
    );
    // 4.5 MiB that do not compress, at 256 kbit/s: about 150 s.
    let size = 9 << 19;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blob: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    h.project(
        "big",
        &pipeline(json!([stage(
            "s",
            &[&format!("test \"$(wc -c < blob)\" -eq {size}")]
        )])),
    );
    std::fs::write(h.source("big").join("blob"), &blob).unwrap();
    h.start();
    wait_for("b1 up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true)).then_some(())
    });
    must(
        "tc",
        &[
            "qdisc", "replace", "dev", &b1.veth, "root", "tbf", "rate", "256kbit", "burst", "16kb",
            "latency", "10s",
        ],
    );
    let t0 = std::time::Instant::now();
    let name = h.build("big");
    let r = h.wait_status("big", &name, Duration::from_secs(300));
    let log = h.log("big", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert!(
        t0.elapsed() > Duration::from_secs(125),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(engine_up(&h, "b1"), Some(true));

    // Mid-upload (its container made), the engine hangs: ERROR within the watchdog's time,
    // not the request's two minutes.
    let name = h.build("big");
    let id = h.host_id();
    wait_for("the container made", Duration::from_secs(60), || {
        (!b1.containers(&id).is_empty()).then_some(())
    });
    // The container is listed before the engine's answer to `create` leaves it; stopped in
    // that gap, the engine would hang the create, not the upload. The upload begins only
    // after that answer: 128 KiB sent to the engine (4 s at this rate) say it is under way.
    let sent = || -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/tx_bytes", b1.veth))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = sent();
    wait_for("the upload under way", Duration::from_secs(60), || {
        (sent() > before + (128 << 10)).then_some(())
    });
    b1.signal("-STOP");
    let t0 = std::time::Instant::now();
    let r = wait_for_opt(Duration::from_secs(150), || {
        let r = h.record("big", &name);
        (r["status"] != "pending" && r["status"] != "running").then_some(r)
    });
    b1.signal("-CONT");
    let log = h.log("big", &name);
    let r = r.unwrap_or_else(|| panic!("the build never ended:\n{log}"));
    assert_eq!(r["status"], "error", "{r}\n{log}");
    assert!(log.contains("stopped answering while"), "{log}");
    // The engine's socket buffers take what was in flight first; then three missed pings.
    assert!(t0.elapsed() < Duration::from_secs(90), "{:?}", t0.elapsed());
    let _ = run("tc", &["qdisc", "del", "dev", &b1.veth, "root"]);
    wait_for(
        "the left container removed",
        Duration::from_secs(60),
        || b1.containers(&id).is_empty().then_some(()),
    );
    h.term();
}

/// A build whose engine stops answering before its container exists goes back to the queue
/// and runs on another engine at once, as the same build: it neither waits `engine_wait_secs`
/// for the dead engine nor ends ERROR, and its listeners hear it start once.
#[test]
fn a_build_whose_engine_dies_before_its_container_runs_on_another() {
    let (mut b1, _b2, mut h) = pool(
        json!([
            {"name": "b1", "host": "{b1}", "slots": 1},
            {"name": "b2", "host": "{b2}", "slots": 1}
        ]),
        json!({"engine_wait_secs": 300, "notify_allow_private": true}),
    );
    let (started_at, started) = body_receiver();
    let (finished_at, finished) = body_receiver();
    // The preparation waits for a file (90 s at most, so a failed run leaves no shell behind),
    // and the engine dies while the build holds it.
    let p = pipeline_with(
        json!([stage("s", &["echo ran"])]),
        json!({"prepare-build": {"master-dir-commands": ["i=0; while [ ! -f go ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done"],
                                 "build-dir-commands": []}}),
    );
    h.project("gated", &p);
    h.private_config("gated", json!({"trust-host-commands": true}));
    let hook = |name: &str, trigger: &str, addr: &str| {
        json!({"hook-name": name, "type": "discord", "trigger": trigger,
               "url": format!("http://{addr}/{name}/1/t"), "data": {}})
    };
    std::fs::write(
        h.data.join("projects/gated/master/config/webhooks.json"),
        json!({"in-webhooks": [], "out-webhooks": [
            hook("started", "build-started", &started_at),
            hook("finished", "build-complete", &finished_at),
        ]})
        .to_string(),
    )
    .unwrap();
    h.start();
    wait_for("both extra engines up", Duration::from_secs(60), || {
        (engine_up(&h, "b1") == Some(true) && engine_up(&h, "b2") == Some(true)).then_some(())
    });
    let name = h.build("gated");
    wait_for("the build to be running", Duration::from_secs(30), || {
        (h.record("gated", &name)["status"] == "running").then_some(())
    });
    b1.kill();
    wait_for("b1 to show down", Duration::from_secs(30), || {
        (engine_up(&h, "b1") == Some(false)).then_some(())
    });
    let t0 = std::time::Instant::now();
    std::fs::write(h.source("gated").join("go"), "").unwrap();
    let r = h.wait_status("gated", &name, Duration::from_secs(120));
    let log = h.log("gated", &name);
    assert_eq!(r["status"], "pass", "{r}\n{log}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let first = log.find("runs on engine b1").expect("placed on b1 first");
    let back = log
        .find("goes back to the queue for another engine")
        .expect("queued again");
    let second = log.find("runs on engine b2").expect("then on b2");
    assert!(first < back && back < second, "{log}");
    assert!(log.contains("ran"), "{log}");
    let builds = h.req(json!({"cmd": "builds", "project": "gated", "limit": 10}))["builds"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(builds, 1, "the same build, not a retry");
    // Events leave the notifier's queue in order and the receiver answers at once: a second
    // start would be out before the end.
    wait_for("the build's end announced", Duration::from_secs(30), || {
        (!finished.lock().unwrap().is_empty()).then_some(())
    });
    assert_eq!(
        started.lock().unwrap().len(),
        1,
        "one start announced for a build that went back to the queue once"
    );
}
