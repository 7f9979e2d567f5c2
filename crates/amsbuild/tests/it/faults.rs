//! Faults of the machine under a running host: the data directory's disk fills up, or the
//! database's files turn unwritable, while webhooks, CLI builds and logins go on; then the
//! fault goes away. Meanwhile every answer comes quickly and names the cause; afterwards the
//! host takes writes again by itself; and after a crash and restart whatever it acknowledged
//! (202, "queued") is in the database, with no build number used twice.

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "fault secret";
const PASSWORD: &str = "correct horse battery";

/// No answer may take this long: the database's busy timeout is 10 s, and a connection left
/// holding the write lock showed as answers that waited that long and then failed.
const ANSWER_WITHIN: Duration = Duration::from_secs(8);

fn sign(body: &[u8]) -> String {
    sign_with(SECRET, body)
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (the fault tests need e2fsprogs and mount)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {} (the fault tests run as root, with loop devices)",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small ext4 file system in an image file, loop-mounted; unmounted when dropped.
struct SmallDisk {
    at: PathBuf,
}

impl SmallDisk {
    fn mount(image: &Path, at: &Path, mib: u64) -> SmallDisk {
        std::fs::File::create(image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let image = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", "-m", "0", image]);
        std::fs::create_dir_all(at).unwrap();
        run("mount", &["-o", "loop", image, at.to_str().unwrap()]);
        SmallDisk {
            at: at.to_path_buf(),
        }
    }
}

/// Fills the file system holding `dir` to the last block with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for size in [1 << 20, 64 << 10, 4 << 10, 1 << 10, 64, 1] {
        while f.write_all(&chunk[..size]).is_ok() {}
    }
    path
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the host may still hold files there.
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// One request on the host's control socket, as `amsbuild build` sends it.
fn control(socket: &Path, v: &Value) -> Result<Value, String> {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{v}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))
}

/// The phases of the trial: answers are filed under the phase they were asked in.
const BEFORE: u8 = 0;
const FAULT: u8 = 1;
const UNDONE: u8 = 2;

#[derive(Default)]
struct Seen {
    /// Accepted deliveries (202): their id and the builds they queued.
    deliveries: Vec<(String, Vec<String>)>,
    /// Builds the CLI was told are queued.
    builds: Vec<String>,
    /// (phase, kind) → answers that said ok.
    ok: HashMap<(u8, &'static str), usize>,
    /// (phase, kind) → refusals, with their reasons.
    refused: HashMap<(u8, &'static str), Vec<String>>,
    /// Answers that were neither: the request, then what came back.
    wrong: Vec<String>,
    slowest: Duration,
}

impl Seen {
    fn ok(&self, phase: u8, kind: &'static str) -> usize {
        self.ok.get(&(phase, kind)).copied().unwrap_or(0)
    }

    fn refused(&self, phase: u8, kind: &'static str) -> usize {
        self.refused.get(&(phase, kind)).map_or(0, Vec::len)
    }
}

type Shared = Arc<(Mutex<Seen>, AtomicU8, AtomicBool)>;

/// Runs `step` again and again until the trial stops, filing each answer under its phase:
/// `Ok` for an answer that said ok, `Err` (with the reason) for a refusal that names the
/// fault. Any other answer goes to `wrong` from inside `step`.
fn worker(
    shared: &Shared,
    kind: &'static str,
    mut step: impl FnMut(usize) -> Result<Option<String>, String> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let shared = shared.clone();
    std::thread::spawn(move || {
        let mut n = 0;
        while !shared.2.load(Ordering::SeqCst) {
            let phase = shared.1.load(Ordering::SeqCst);
            let t0 = Instant::now();
            let r = step(n);
            let took = t0.elapsed();
            let mut seen = shared.0.lock().unwrap();
            seen.slowest = seen.slowest.max(took);
            if took > ANSWER_WITHIN {
                seen.wrong
                    .push(format!("{kind} #{n}: answered after {took:?}"));
            }
            match r {
                Ok(_) => *seen.ok.entry((phase, kind)).or_default() += 1,
                Err(why) => seen.refused.entry((phase, kind)).or_default().push(why),
            }
            n += 1;
        }
    })
}

/// A host whose data directory is a small file system of its own, and the traffic against it.
struct Trial {
    /// Unmounted first, then the host's temporary directory goes.
    _disk: SmallDisk,
    h: TestHost,
    shared: Shared,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Trial {
    /// Starts the host and the traffic: three webhook senders, a CLI and a browser logging
    /// in. A refusal is expected only when it says the database is unavailable and contains
    /// one of `causes`.
    fn start(causes: &'static [&'static str]) -> Trial {
        let mut h = TestHost::new();
        // The data directory on its own 24 MiB file system, web_conf.json carried over.
        let conf = std::fs::read(h.data.join("web_conf.json")).unwrap();
        let disk = SmallDisk::mount(&h.tmp.path().join("disk.img"), &h.data, 24);
        std::fs::write(h.data.join("web_conf.json"), conf).unwrap();
        h.project(
            "p",
            &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
        );
        // Few builds run: most are superseded while they wait.
        h.private_config("p", json!({"only-build-latest": true}));
        std::fs::write(
            h.data.join("projects/p/master/config/webhooks.json"),
            json!({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"], "secret": SECRET}]})
                .to_string(),
        )
        .unwrap();
        add_user(&h, "alice", "3", "p", PASSWORD);
        h.start();

        let expected = move |why: &str| {
            why.contains("the database is unavailable") && causes.iter().any(|c| why.contains(c))
        };
        let shared: Shared = Arc::default();
        let body = Arc::new(fixture("github_push_new_branch.json"));
        let mut threads = Vec::new();
        for t in 0..3 {
            let (addr, body, shared2) = (h.webhook_addr(), body.clone(), shared.clone());
            threads.push(worker(&shared, "webhook", move |n| {
                let id = format!("fault-{t}-{n}");
                let (st, _, answer) = http_from(
                    "127.0.0.1",
                    &addr,
                    "POST",
                    "/ams-build/request?name=gh&project=p",
                    &[
                        ("Content-Type", "application/json".into()),
                        ("X-GitHub-Event", "push".into()),
                        ("X-GitHub-Delivery", id.clone()),
                        ("X-Hub-Signature-256", sign(&body)),
                    ],
                    &body,
                    Duration::from_secs(30),
                );
                let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
                let why = v["reason"].as_str().unwrap_or("").to_string();
                let mut seen = shared2.0.lock().unwrap();
                match st {
                    202 => {
                        let builds = v["builds"]
                            .as_array()
                            .map(|b| b.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                            .unwrap_or_default();
                        seen.deliveries.push((id, builds));
                        Ok(None)
                    }
                    503 if expected(&why) => Err(why),
                    _ => {
                        seen.wrong.push(format!("webhook {id}: {st} {v}"));
                        Err(why)
                    }
                }
            }));
        }
        let (socket, shared2) = (h.data.join("amsbuild.sock"), shared.clone());
        threads.push(worker(&shared, "cli", move |n| {
            let a = control(
                &socket,
                &json!({"cmd": "build", "project": "p", "actor": "t"}),
            );
            let mut seen = shared2.0.lock().unwrap();
            match a {
                Ok(a) if a["ok"] == true => {
                    let name = a["build"]["name"].as_str().unwrap().to_string();
                    seen.builds.push(name);
                    Ok(None)
                }
                Ok(a) if expected(a["error"].as_str().unwrap_or("")) => {
                    Err(a["error"].as_str().unwrap().to_string())
                }
                other => {
                    seen.wrong.push(format!("cli build #{n}: {other:?}"));
                    Err(format!("{other:?}"))
                }
            }
        }));
        let (addr, shared2) = (h.web_addr(), shared.clone());
        threads.push(worker(&shared, "login", move |n| {
            let (st, head, page) = http_from(
                "127.0.0.1",
                &addr,
                "POST",
                "/ams-build/login",
                &[(
                    "Content-Type",
                    "application/x-www-form-urlencoded".to_string(),
                )],
                &form(&[("username", "alice"), ("password", PASSWORD)]),
                Duration::from_secs(30),
            );
            let page = String::from_utf8_lossy(&page).to_string();
            match st {
                303 if head.contains("set-cookie: ams_session=") => Ok(None),
                503 if expected(&page) => Err(page),
                _ => {
                    let mut seen = shared2.0.lock().unwrap();
                    seen.wrong.push(format!("login #{n}: {st} {head} {page}"));
                    Err(format!("{st}"))
                }
            }
        }));
        Trial {
            h,
            _disk: disk,
            shared,
            threads,
        }
    }

    fn phase(&self, phase: u8) {
        self.shared.1.store(phase, Ordering::SeqCst);
    }

    /// Waits for `done`, failing at once on a wrong answer.
    fn wait_until(&self, what: &str, secs: u64, done: impl Fn(&Seen) -> bool) {
        wait_for(what, Duration::from_secs(secs), || {
            let seen = self.shared.0.lock().unwrap();
            assert!(seen.wrong.is_empty(), "wrong answers: {:#?}", seen.wrong);
            done(&seen).then_some(())
        })
    }

    /// The whole trial around `fault` (which returns how to undo it): acknowledgements first,
    /// then refusals that name the fault, then acknowledgements again once it is undone; then
    /// a crash, and every acknowledgement checked against the database.
    fn run(mut self, fault: impl FnOnce(&Path) -> Box<dyn FnOnce()>) {
        self.wait_until("acknowledgements before the fault", 60, |s| {
            s.ok(BEFORE, "webhook") >= 5 && s.ok(BEFORE, "cli") >= 3 && s.ok(BEFORE, "login") >= 1
        });
        let undo = fault(&self.h.data);
        self.phase(FAULT);
        self.wait_until("refusals that name the fault", 120, |s| {
            s.refused(FAULT, "webhook") >= 30
                && s.refused(FAULT, "cli") >= 10
                && s.refused(FAULT, "login") >= 2
        });
        undo();
        self.phase(UNDONE);
        self.wait_until("acknowledgements once the fault is gone", 120, |s| {
            s.ok(UNDONE, "webhook") >= 30 && s.ok(UNDONE, "cli") >= 10 && s.ok(UNDONE, "login") >= 2
        });
        self.shared.2.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let seen = std::mem::take(&mut *self.shared.0.lock().unwrap());
        assert!(seen.wrong.is_empty(), "wrong answers: {:#?}", seen.wrong);
        eprintln!(
            "acknowledged {} deliveries and {} CLI builds; refused during the fault: {} \
             webhooks, {} builds, {} logins; slowest answer {:?}",
            seen.deliveries.len(),
            seen.builds.len(),
            seen.refused(FAULT, "webhook"),
            seen.refused(FAULT, "cli"),
            seen.refused(FAULT, "login"),
            seen.slowest
        );
        let h = &mut self.h;

        // The records agree with the queue again: a build they call pending or running is in
        // it (a superseded build whose skip could not be written during the fault is written
        // once the fault is gone, not left "pending" until a restart).
        wait_for(
            "the records to agree with the queue",
            Duration::from_secs(60),
            || {
                let st = h.req(json!({"cmd": "status"}));
                let queued: HashSet<&str> = ["active", "pending"]
                    .iter()
                    .flat_map(|k| st[*k].as_array().unwrap().iter())
                    .map(|b| b["name"].as_str().unwrap())
                    .collect();
                let builds = h.req(json!({"cmd": "builds", "project": "p", "limit": 1000}));
                let stray: Vec<String> = builds["builds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| b["status"] == "pending" || b["status"] == "running")
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .filter(|n| !queued.contains(n.as_str()))
                    .collect();
                stray.is_empty().then_some(())
            },
        );

        // A crash, then the same data directory again.
        h.kill();
        h.start();
        let builds = h.req(json!({"cmd": "builds", "project": "p", "limit": 1000}))["builds"]
            .as_array()
            .unwrap()
            .clone();
        let mut index_of: HashMap<String, i64> = HashMap::new();
        let mut numbers = HashSet::new();
        for b in &builds {
            let (name, index) = (
                b["name"].as_str().unwrap().to_string(),
                b["build_index"].as_i64().unwrap(),
            );
            assert!(numbers.insert(index), "build number {index} used twice");
            assert!(
                index_of.insert(name.clone(), index).is_none(),
                "{name} twice"
            );
        }
        let deliveries = h.req(json!({"cmd": "deliveries", "project": "p", "limit": 10000}))
            ["deliveries"]
            .as_array()
            .unwrap()
            .clone();
        let stored: HashMap<String, &Value> = deliveries
            .iter()
            .filter(|d| d["verdict"] == "accepted")
            .map(|d| (d["delivery_id"].as_str().unwrap().to_string(), d))
            .collect();
        let mut lost = Vec::new();
        for (id, names) in &seen.deliveries {
            match stored.get(id) {
                None => lost.push(format!("delivery {id}")),
                Some(d) => assert_eq!(d["builds"], json!(names), "delivery {id}"),
            }
            lost.extend(
                names
                    .iter()
                    .filter(|n| !index_of.contains_key(*n))
                    .map(|n| format!("build {n} of delivery {id}")),
            );
        }
        lost.extend(
            seen.builds
                .iter()
                .filter(|n| !index_of.contains_key(*n))
                .map(|n| format!("CLI build {n}")),
        );
        assert!(lost.is_empty(), "acknowledged, then lost: {lost:#?}");
        // And numbering goes on after the highest number ever given.
        let next = h.build_with("p", json!({}));
        let highest = numbers.iter().max().copied().unwrap_or(0);
        assert_eq!(next["build_index"].as_i64().unwrap(), highest + 1);
        h.kill();
    }
}

#[test]
fn a_full_disk_loses_nothing_acknowledged_and_the_host_recovers_by_itself() {
    let t = Trial::start(&["the disk holding the data directory is full"]);
    t.run(|data| {
        let filler = fill(data);
        Box::new(move || std::fs::remove_file(filler).unwrap())
    });
}

/// The database and its write-ahead log made immutable (`chattr +i`): from then on every
/// write to them fails (EPERM), as on a file system gone read-only under the host, which the
/// kernel lets nobody do to a mounted file system with files open for writing.
#[test]
fn an_unwritable_database_loses_nothing_acknowledged_and_the_host_recovers_by_itself() {
    let t = Trial::start(&["could not be read or written", "read-only"]);
    t.run(|data| {
        let files = [data.join("ams.db"), data.join("ams.db-wal")];
        let chattr = |flag: &str, files: &[PathBuf]| {
            let mut args = vec![flag];
            args.extend(files.iter().map(|f| f.to_str().unwrap()));
            run("chattr", &args);
        };
        chattr("+i", &files);
        Box::new(move || chattr("-i", &files))
    });
}

/// SQLite opens a database file it may not write read-only, and such a connection stays so:
/// a host started on an unwritable database refuses writes naming the cause, and takes them
/// again by itself once the file is writable, its connections opened afresh.
#[test]
fn a_host_started_on_an_unwritable_database_takes_writes_once_it_is_writable() {
    let mut h = TestHost::new();
    let conf = std::fs::read(h.data.join("web_conf.json")).unwrap();
    let _disk = SmallDisk::mount(&h.tmp.path().join("disk.img"), &h.data, 24);
    std::fs::write(h.data.join("web_conf.json"), conf).unwrap();
    h.project(
        "p",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    h.start();
    let first = h.build("p");
    h.wait_status("p", &first, Duration::from_secs(60));
    h.kill();
    let db = h.data.join("ams.db");
    let db = db.to_str().unwrap();
    run("chattr", &["+i", db]);
    h.start();
    let build = json!({"cmd": "build", "project": "p", "actor": "t"});
    let a = h.req(build.clone());
    let why = a["error"].as_str().unwrap_or("");
    assert!(
        why.contains("the database is unavailable") && why.contains("read-only"),
        "{a}"
    );
    run("chattr", &["-i", db]);
    // A connection idle since before the refusal may refuse once more before it is replaced.
    let queued = wait_for(
        "a build to be queued again",
        Duration::from_secs(30),
        || {
            let a = h.req(build.clone());
            (a["ok"] == true).then(|| a["build"].clone())
        },
    );
    assert_eq!(queued["build_index"], 2, "{queued}");
    h.kill();
    h.start();
    let r = h.record("p", queued["name"].as_str().unwrap());
    assert_eq!(r["build_index"], 2);
    h.kill();
}
