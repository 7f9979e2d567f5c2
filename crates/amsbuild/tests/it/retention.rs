//! Retention and backup against a running host: `amsbuild gc [--dry-run]` with real builds
//! (the newest N kept, the rest's folders and archives removed and their records marked, a
//! running or pending build never touched), per-project settings over web_conf.json's
//! defaults, and `amsbuild backup` while builds are being written.

use crate::harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What `amsbuild gc` printed: the build names it listed per project, the total bytes, and
/// the whole text.
struct Gc {
    out: String,
    ok: bool,
    /// (project, build) in the order printed.
    listed: Vec<(String, String)>,
    bytes: u64,
}

impl Gc {
    fn names(&self, project: &str) -> Vec<String> {
        self.listed
            .iter()
            .filter(|(p, _)| p == project)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

fn gc(h: &TestHost, dry_run: bool) -> Gc {
    let mut args = vec!["gc"];
    if dry_run {
        args.push("--dry-run");
    }
    let o = h.cli(&args);
    let out = text(&o);
    let mut listed = Vec::new();
    let mut project = String::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        if let Some(rest) = line.strip_prefix("  ") {
            let name = rest.split_whitespace().next().unwrap().to_string();
            listed.push((project.clone(), name));
        } else if let Some((p, _)) = line.split_once([' ', ':']) {
            project = p.to_string();
        }
    }
    let last = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let bytes = last
        .rsplit_once('(')
        .and_then(|(_, b)| b.strip_suffix(" bytes)"))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    Gc {
        out,
        ok: o.status.success(),
        listed,
        bytes,
    }
}

fn archive(h: &TestHost, project: &str, name: &str) -> std::path::PathBuf {
    h.build_dir(project).join(format!("{name}.7z"))
}

fn deleted(h: &TestHost, project: &str, name: &str) -> bool {
    let r = h.record(project, name);
    r["output_deleted_at"].as_f64().is_some()
}

/// A user with every right and an API token for it (before the host starts).
fn api_token(h: &TestHost) -> String {
    add_user(h, "root", "5", "", "a long password");
    let o = h.cli(&["token", "create", "--user", "root"]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn api_builds(h: &TestHost, token: &str, project: &str) -> Vec<Value> {
    let (st, v) = http(
        &h.web_addr(),
        "GET",
        &format!("/ams-build/api/projects/name/{project}/builds?per_page=100"),
        &[("Authorization", format!("Bearer {token}"))],
        b"",
    );
    assert_eq!(st, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn api_build(builds: &[Value], name: &str) -> Value {
    builds
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no build {name} in the API's list"))
}

#[test]
fn gc_keeps_the_newest_builds_removes_the_rest_and_never_a_live_build() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 1}));
    let token = api_token(&h);
    h.start();
    let output = pipeline(json!([stage(
        "out",
        &[
            "echo result > Builds/result.txt",
            "dd if=/dev/urandom of=Builds/noise.bin bs=1024 count=64"
        ]
    )]));
    h.project("ret", &output);
    let mut done = Vec::new();
    for _ in 0..4 {
        let name = h.build("ret");
        let r = h.wait_status("ret", &name, T);
        assert_eq!(r["status"], "pass", "{}", h.log("ret", &name));
        assert!(h.build_dir("ret").join(&name).join("output.txt").exists());
        assert!(archive(&h, "ret", &name).exists());
        done.push(name);
    }
    // Then one build that runs until it is let go, and one pending behind it (one slot).
    std::fs::write(
        h.source("ret").join("pipeline.json"),
        pipeline(json!([stage(
            "wait",
            &[
                "while [ ! -f Builds/go ]; do sleep 0.1; done",
                "echo released"
            ]
        )])),
    )
    .unwrap();
    let running = h.build("ret");
    h.wait_running("ret", &running);
    let pending = h.build("ret");
    assert_eq!(h.record("ret", &pending)["status"], "pending");
    h.private_config("ret", json!({"retention": {"keep-builds": 2}}));

    // The dry run lists the two oldest, removes nothing, and says how much they hold.
    let dry = gc(&h, true);
    assert!(dry.ok, "{}", dry.out);
    assert_eq!(dry.names("ret"), done[..2].to_vec(), "{}", dry.out);
    assert!(
        dry.out
            .contains("ret (keep-builds 2): would remove 2 build(s)"),
        "{}",
        dry.out
    );
    assert!(dry.out.contains("beyond the newest 2"), "{}", dry.out);
    assert!(dry.bytes >= 2 * 65536, "{}", dry.out);
    for name in &done {
        assert!(h.build_dir("ret").join(name).exists(), "{name}");
        assert!(archive(&h, "ret", name).exists(), "{name}");
        assert!(!deleted(&h, "ret", name), "{name}");
    }

    let run = gc(&h, false);
    assert!(run.ok, "{}", run.out);
    assert_eq!(run.names("ret"), done[..2].to_vec(), "{}", run.out);
    assert!(
        run.out.contains("ret (keep-builds 2): removed 2 build(s)"),
        "{}",
        run.out
    );
    assert_eq!(run.bytes, dry.bytes, "the dry run said what the run frees");
    for name in &done[..2] {
        assert!(!h.build_dir("ret").join(name).exists(), "{name}");
        assert!(!archive(&h, "ret", name).exists(), "{name}");
    }
    for name in &done[2..] {
        assert!(h.build_dir("ret").join(name).join("output.txt").exists());
        assert!(archive(&h, "ret", name).exists(), "{name}");
    }
    // The records stay, marked deleted: in `builds --json` and in the API.
    let o = h.cli(&["builds", "ret", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.len(), 6);
    for b in &list {
        let name = b["name"].as_str().unwrap();
        let gone = done[..2].iter().any(|d| d == name);
        assert_eq!(b["output_deleted_at"].as_f64().is_some(), gone, "{b}");
        assert_eq!(
            b["archive_name"].is_null(),
            gone || name == running || name == pending
        );
    }
    let o = h.cli(&["builds", "ret"]);
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    for name in &done {
        let line = table.lines().find(|l| l.contains(name.as_str())).unwrap();
        let gone = done[..2].contains(name);
        assert_eq!(line.ends_with("[output deleted]"), gone, "{line}");
    }
    let api = api_builds(&h, &token, "ret");
    for name in &done[..2] {
        let b = api_build(&api, name);
        assert!(b["output_deleted_at_iso"].is_string(), "{b}");
        assert!(b["7z_link"].is_null(), "{b}");
    }
    for name in &done[2..] {
        let b = api_build(&api, name);
        assert!(b["output_deleted_at_iso"].is_null(), "{b}");
        assert!(b["7z_link"].is_string(), "{b}");
    }
    // The running and the pending build were never touched, and end as they would have.
    assert!(h.log("ret", &running).contains("==> stage"));
    for name in [&running, &pending] {
        assert!(!deleted(&h, "ret", name), "{name}");
    }
    assert_eq!(h.record("ret", &pending)["status"], "pending");
    std::fs::write(h.build_dir("ret").join(&running).join("build/go"), "").unwrap();
    assert_eq!(h.wait_status("ret", &running, T)["status"], "pass");
    assert!(h.log("ret", &running).contains("released"));
    h.wait_running("ret", &pending);
    std::fs::write(h.build_dir("ret").join(&pending).join("build/go"), "").unwrap();
    assert_eq!(h.wait_status("ret", &pending, T)["status"], "pass");

    // Now those two are the newest: the next run takes the two kept before, and never lists
    // the ones already deleted again.
    let run = gc(&h, false);
    assert!(run.ok, "{}", run.out);
    assert_eq!(run.names("ret"), done[2..].to_vec(), "{}", run.out);
    for name in &done[2..] {
        assert!(!h.build_dir("ret").join(name).exists(), "{name}");
        assert!(deleted(&h, "ret", name), "{name}");
    }
    for name in [&running, &pending] {
        assert!(archive(&h, "ret", name).exists(), "{name}");
        assert!(!deleted(&h, "ret", name), "{name}");
    }
    let again = gc(&h, true);
    assert!(
        again.out.contains("ret (keep-builds 2): nothing to remove"),
        "{}",
        again.out
    );
    assert_eq!(again.bytes, 0);
}

#[test]
fn a_project_overrides_the_web_conf_default_and_old_builds_go_by_age() {
    let mut h = TestHost::with_conf(json!({"retention_keep_builds": 1}));
    h.start();
    let dummy = pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true}));
    let mut names: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for p in ["dflt", "own", "aged", "none", "broken"] {
        h.project(p, &dummy);
        for _ in 0..3 {
            let n = h.build(p);
            assert_eq!(h.wait_status(p, &n, T)["status"], "dummy");
            assert!(h.build_dir(p).join(&n).join("output.txt").exists());
            names.entry(p).or_default().push(n);
        }
    }
    // dflt has no retention of its own: web_conf's keep 1. own keeps 3. aged keeps any
    // number but not for long (0.00002 days, under 2 s). none turns retention off. broken's
    // config is wrong: it is left alone and said so.
    h.private_config("own", json!({"retention": {"keep-builds": 3}}));
    h.private_config(
        "aged",
        json!({"retention": {"keep-builds": null, "max-age-days": 0.00002}}),
    );
    h.private_config("none", json!({"retention": {"keep-builds": null}}));
    h.private_config("broken", json!({"retention": {"keep-builds": 0}}));

    let dry = wait_for("the aged builds to be old enough", T, || {
        let g = gc(&h, true);
        (g.names("aged").len() == 3).then_some(g)
    });
    assert_eq!(
        dry.names("dflt"),
        names["dflt"][..2].to_vec(),
        "{}",
        dry.out
    );
    assert!(
        dry.out.contains("own (keep-builds 3): nothing to remove"),
        "{}",
        dry.out
    );
    assert!(
        dry.out.contains("finished more than 0.00002 days ago"),
        "{}",
        dry.out
    );
    assert!(
        !dry.out.lines().any(|l| l.starts_with("none")),
        "{}",
        dry.out
    );
    assert!(
        dry.out.contains("broken: left alone: ")
            && dry
                .out
                .contains("field `retention.keep-builds`: must be a whole number"),
        "{}",
        dry.out
    );
    assert!(!dry.ok, "a project left alone is an error");

    let run = gc(&h, false);
    assert_eq!(
        run.names("dflt"),
        names["dflt"][..2].to_vec(),
        "{}",
        run.out
    );
    assert_eq!(run.names("aged"), names["aged"], "{}", run.out);
    for (p, gone) in [
        ("dflt", 2),
        ("own", 0),
        ("aged", 3),
        ("none", 0),
        ("broken", 0),
    ] {
        for (i, n) in names[p].iter().enumerate() {
            let removed = i < gone;
            assert_eq!(!h.build_dir(p).join(n).exists(), removed, "{p}/{n}");
            assert_eq!(deleted(&h, p, n), removed, "{p}/{n}");
        }
    }
}

/// One value from sqlite3, which reads the file on its own.
fn sqlite(file: &Path, sql: &str) -> String {
    let o = std::process::Command::new("sqlite3")
        .arg("-readonly")
        .arg(file)
        .arg(sql)
        .output()
        .expect("sqlite3 (scripts/setup.sh installs it)");
    assert!(o.status.success(), "sqlite3 {sql}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The backup is one consistent snapshot, checked by sqlite3 itself.
fn check_backup(file: &Path, must_hold: &[String]) -> i64 {
    assert_eq!(
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(sqlite(file, "PRAGMA integrity_check"), "ok");
    let count: i64 = sqlite(file, "SELECT count(*) FROM builds WHERE project = 'bk'")
        .parse()
        .unwrap();
    // Indexes are allocated with their build in one transaction: a torn copy would disagree.
    let latest: i64 = sqlite(
        file,
        "SELECT latest_build_index FROM projects WHERE name = 'bk'",
    )
    .parse()
    .unwrap();
    assert_eq!(latest, count, "{}", file.display());
    for n in must_hold {
        assert_eq!(
            sqlite(
                file,
                &format!("SELECT count(*) FROM builds WHERE name = '{n}'")
            ),
            "1",
            "{n}"
        );
    }
    // The store opens it too and lists the builds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt.block_on(async {
        // A copy of the copy: opening it with the store makes it a WAL database.
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::copy(file, &copy).unwrap();
        let s = ams_store::Store::open(&copy).await.unwrap();
        let n = s.builds_of("bk", 100_000, 0).await.unwrap().len();
        s.close().await;
        n
    });
    assert_eq!(listed as i64, count);
    count
}

/// Sets the flag when dropped, also while a panic unwinds.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn backup_copies_a_consistent_database_while_builds_are_written_and_never_overwrites() {
    let mut h = TestHost::new();
    let none = h.cli(&["backup", h.tmp.path().join("early.db").to_str().unwrap()]);
    assert!(!none.status.success());
    assert!(text(&none).contains("no database there"), "{}", text(&none));
    h.start();
    h.project(
        "bk",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    let first: Vec<String> = (0..10).map(|_| h.build("bk")).collect();
    let files: Vec<std::path::PathBuf> = (0..3)
        .map(|i| h.tmp.path().join(format!("backup-{i}.db")))
        .collect();
    let stop = AtomicBool::new(false);
    let queued = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // However the scope ends, the writer stops, so the scope can end.
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(SeqCst) {
                match h.try_req(&json!({"cmd": "build", "project": "bk", "actor": "t"})) {
                    Ok(a) if a["ok"] == true => queued.fetch_add(1, SeqCst),
                    _ => break,
                };
            }
        });
        wait_for("the writer to queue builds", T, || {
            (queued.load(SeqCst) > 0).then_some(())
        });
        for f in &files {
            let o = h.cli(&["backup", f.to_str().unwrap()]);
            assert!(o.status.success(), "{}", text(&o));
            let out = text(&o);
            for what in [
                "web_conf.json",
                "master/config",
                "pipeline-config.json",
                "projects",
            ] {
                assert!(out.contains(what), "{what}: {out}");
            }
        }
    });
    let queued = queued.load(SeqCst);
    assert!(queued > 0, "builds were queued during the backups");
    let mut counts = Vec::new();
    for f in &files {
        counts.push(check_backup(f, &first));
    }
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");

    // An existing file is never overwritten.
    let before = std::fs::read(&files[0]).unwrap();
    let o = h.cli(&["backup", files[0].to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    assert_eq!(std::fs::read(&files[0]).unwrap(), before);

    // Without a host it works the same, and holds every build.
    h.term();
    let last = h.tmp.path().join("stopped.db");
    let o = h.cli(&["backup", last.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(check_backup(&last, &first), 10 + queued as i64);
}
