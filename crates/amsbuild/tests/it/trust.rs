//! Trust boundaries: attacks a build's own code (or its repository) makes on the host, on
//! master, on other projects and on later builds, each performed for real through a container.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn finished(h: &TestHost, project: &str, extra: Value) -> (Value, String) {
    let b = h.build_with(project, extra);
    let name = b["name"].as_str().unwrap().to_string();
    let r = h.wait_status(project, &name, T);
    let log = h.log(project, &name);
    (r, log)
}

/// A git repository with a pipeline.json and a tracked file, added as project `name`.
fn git_project(h: &TestHost, name: &str, pipeline_json: &str, private: Value) -> String {
    let repo = h.tmp.path().join(format!("repo-{name}"));
    git_repo(
        &repo,
        &[
            ("pipeline.json", pipeline_json),
            ("tracked.txt", "original-content"),
        ],
    );
    add_git_project(h, name, &repo);
    h.private_config(name, private);
    git(&repo, &["rev-parse", "HEAD"])
}

/// A stage poisons everything it can reach of master through its source: git's config (two
/// ways to make the host run a command) and a tracked file rewritten in place with its mtime
/// restored. The next build of the same trusted commit must see none of it, and the host must
/// run nothing. Checked with the default source mode and with `copy`.
#[test]
fn a_build_cannot_poison_master_or_a_later_build() {
    require_docker();
    for mode in ["auto", "copy"] {
        let mut h = TestHost::new();
        let marker = h.tmp.path().join("host-ran-a-command");
        let m = marker.to_str().unwrap();
        let attack = format!(
            "printf '[core]\\n\\tfsmonitor = \"touch {m}-fsmonitor\"\\n[remote \"origin\"]\\n\\tuploadpack = \"touch {m}-uploadpack; git-upload-pack\"\\n' >> .git/config; \
             touch -r tracked.txt /tmp/ref; printf 'POISONED-CONTENT' | dd of=tracked.txt conv=notrunc 2>/dev/null; \
             touch -r /tmp/ref tracked.txt; echo attacked"
        );
        let p = pipeline(json!([
            stage(
                "show",
                &["echo seen=$(cat tracked.txt)", "cp tracked.txt Builds/"]
            ),
            stage("attack", &[attack.as_str()]),
        ]));
        let commit = git_project(&h, "victim", &p, json!({"source-copy": mode}));
        h.start();

        let (r, log) = finished(&h, "victim", json!({"commit": commit, "branch": "main"}));
        assert_eq!(r["status"], "pass", "{mode}: {log}");
        assert!(log.contains("attacked"), "{mode}: {log}");
        if mode == "auto" {
            assert!(
                log.contains("copy-on-write snapshot of master (overlay)"),
                "{log}"
            );
        }

        // The next build of the trusted commit.
        let (r, log) = finished(&h, "victim", json!({"commit": commit, "branch": "main"}));
        assert_eq!(r["status"], "pass", "{mode}: {log}");
        assert!(log.contains("seen=original-content"), "{mode}: {log}");
        assert!(!log.contains("seen=POISONED"), "{mode}: {log}");
        let master = h.source("victim");
        assert_eq!(
            std::fs::read_to_string(master.join("tracked.txt")).unwrap(),
            "original-content"
        );
        let config = std::fs::read_to_string(master.join(".git/config")).unwrap();
        assert!(
            !config.contains("fsmonitor") && !config.contains("uploadpack"),
            "{config}"
        );
        for suffix in ["-fsmonitor", "-uploadpack"] {
            assert!(
                !Path::new(&format!("{m}{suffix}")).exists(),
                "{mode}: the host ran the build's command ({suffix})"
            );
        }
        // The archive of the second build holds the original file.
        let archive = h
            .build_dir("victim")
            .join(format!("{}.7z", r["name"].as_str().unwrap()));
        let o = std::process::Command::new("7z")
            .args(["e", "-so"])
            .arg(&archive)
            .arg("tracked.txt")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "original-content");
        // No overlay stays mounted once builds end.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(h.data.to_str().unwrap()),
            "{mode}: a mount under the data directory stayed"
        );
    }
}

/// A `project init` project (no git to restore master): a build that rewrites a file in place
/// with its mtime kept, or replaces it, changes neither master nor the next build, concurrent
/// builds included.
#[test]
fn a_build_cannot_poison_a_project_without_git() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 2}));
    let p = pipeline(json!([stage(
        "s",
        &[
            "echo seen=$(cat tracked.txt)",
            "touch -r tracked.txt /tmp/ref; printf 'POISONED' | dd of=tracked.txt conv=notrunc 2>/dev/null; touch -r /tmp/ref tracked.txt",
            "echo evil > new-file.txt; rm -f pipeline.json"
        ]
    )]));
    h.project("plain", &p);
    std::fs::write(h.source("plain").join("tracked.txt"), "original").unwrap();
    h.start();
    let first = h.build("plain");
    let second = h.build("plain");
    for n in [&first, &second] {
        let r = h.wait_status("plain", n, T);
        assert_eq!(r["status"], "pass", "{}", h.log("plain", n));
    }
    let (r, log) = finished(&h, "plain", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("seen=original\n"), "{log}");
    let master = h.source("plain");
    assert_eq!(
        std::fs::read_to_string(master.join("tracked.txt")).unwrap(),
        "original"
    );
    assert!(master.join("pipeline.json").exists());
    assert!(!master.join("new-file.txt").exists());
}

/// A master checkout whose `.git/config` already carries a command (poisoned by an older
/// version, or by hand) is refused before git reads it; the host runs nothing.
#[test]
fn a_poisoned_master_config_is_refused_and_runs_nothing() {
    require_docker();
    let mut h = TestHost::new();
    let p = pipeline(json!([stage("s", &["echo ran"])]));
    git_project(&h, "p", &p, json!({}));
    let marker = h.tmp.path().join("fsmonitor-ran");
    let config = h.source("p").join(".git/config");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[core]\n\tfsmonitor = \"touch {}\"\n",
        marker.display()
    ));
    std::fs::write(&config, text).unwrap();
    h.start();
    let (r, log) = finished(&h, "p", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(log.contains("core.fsmonitor"), "{log}");
    assert!(log.contains("re-add the project"), "{log}");
    assert!(!marker.exists(), "the host ran the config's command");
}

/// pipeline.json committed as a link to another project's pipeline.json (with its secrets in
/// the environment) is refused; so is one over the size cap.
#[test]
fn a_linked_or_huge_pipeline_json_is_refused() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "other",
        &pipeline_with(
            json!([stage("s", &["echo hi"])]),
            json!({"environment": {"DEPLOY_TOKEN": "other-project-secret-value"}}),
        ),
    );
    let repo = h.tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::os::unix::fs::symlink(
        "../../../other/master/project_source/pipeline.json",
        repo.join("pipeline.json"),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "link"]);
    let o = h.cli(&["project", "add", "thief", "--git", repo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h.start();
    let (r, log) = finished(&h, "thief", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(log.contains("pipeline.json is a symbolic link"), "{log}");
    assert!(!log.contains("other-project-secret-value"), "{log}");

    let big = format!(
        "{}{}",
        pipeline(json!([stage("s", &["echo hi"])])),
        " ".repeat(1 << 20)
    );
    h.project("big", &big);
    let (r, log) = finished(&h, "big", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(
        log.contains("pipeline.json is larger than 1048576 bytes"),
        "{log}"
    );
}

/// docker.args without the operator's trust cannot mount a named volume, join a network or
/// raise the host's limits; the same args pass once pipeline-config.json trusts them.
#[test]
fn docker_args_cannot_reach_engine_objects_or_raise_limits() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"container_memory": "256m"}));
    let volume = format!("ams-test-victim-{}", std::process::id());
    let o = std::process::Command::new("docker")
        .args(["volume", "create", &volume])
        .output()
        .unwrap();
    assert!(o.status.success());
    let attacks = [
        format!("-v {volume}:/stolen"),
        "--network ams-test-othernet".to_string(),
        "--memory 100g".to_string(),
        "--pids-limit 10000000".to_string(),
        "--shm-size 1g".to_string(),
        // Rounded to 0, which the engine reads as "no limit".
        "--memory 0.5".to_string(),
        "--cpus 0.0000000001".to_string(),
    ];
    for (i, args) in attacks.iter().enumerate() {
        let p = pipeline_with(
            json!([stage(
                "s",
                &["echo escaped > /stolen/x || true", "echo ran"]
            )]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "args": args}}),
        );
        h.project(&format!("a{i}"), &p);
    }
    h.start();
    for (i, args) in attacks.iter().enumerate() {
        let (r, log) = finished(&h, &format!("a{i}"), json!({}));
        assert_eq!(r["status"], "fail", "{args}: {log}");
        assert!(log.contains("docker.args"), "{args}: {log}");
        assert!(!log.contains("\nran"), "{args}: {log}");
    }
    // Lowering a limit needs no trust.
    let p = pipeline_with(
        json!([stage("s", &["echo lowered"])]),
        json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                          "build-output-dest": "/root/project/Builds", "args": "--memory 128m --pids-limit 50"}}),
    );
    h.project("low", &p);
    let (r, log) = finished(&h, "low", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    // With the operator's trust the volume is mounted.
    h.private_config("a0", json!({"allow-docker-args": ["-v"]}));
    let (r, log) = finished(&h, "a0", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    let _ = std::process::Command::new("docker")
        .args(["volume", "rm", "-f", &volume])
        .output();
}

/// With `allowed_registries`, an image from any other registry is refused before the engine
/// is asked to pull it (the engine would otherwise connect wherever the name points).
#[test]
fn images_from_registries_not_allowed_are_refused() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"allowed_registries": ["docker.io"]}));
    let p = pipeline_with(
        json!([stage("s", &["echo hi"])]),
        json!({"docker": {"image": "127.0.0.1:9/probe:latest", "project-dest": "/root/project",
                          "build-output-dest": "/root/project/Builds"}}),
    );
    h.project("ssrf", &p);
    h.project(
        "ok",
        &pipeline(json!([stage("s", &["echo allowed-image"])])),
    );
    h.start();
    let (r, log) = finished(&h, "ssrf", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(log.contains("allowed_registries"), "{log}");
    assert!(!log.contains("pull:"), "{log}");
    let (r, log) = finished(&h, "ok", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
}

/// A build reference is resolved once, at the edge, within the projects the caller may see:
/// a MODERATOR of project `1` whose builds are named `{project}{build_index}` asks to delete
/// the output of its build `11`; the number must not be taken for the id of project `b`'s
/// build 11. And a project whose name format produces another project's names never stops
/// that project from building.
#[test]
fn build_references_never_cross_projects() {
    let mut h = TestHost::new();
    let dummy = |format: &str| {
        pipeline_with(
            json!([stage("s", &["true"])]),
            json!({"dummy-build": true, "build-name-format": format}),
        )
    };
    h.project("1", &dummy("{project}{build_index}"));
    h.project("11", &dummy("{project}{build_index}"));
    h.project("b", &dummy("{project}_{build_hash}_build_{build_index}"));
    add_user(&h, "mod1", "3", "1", "a long password");
    let token = api_token(&h, "mod1");
    h.start();

    // Project `11` takes the name `111` first; project `1` reaches its own build 11 later.
    let first = h.build("11");
    assert_eq!(first, "111");
    let mine = h.build("1");
    assert_eq!(mine, "11");
    h.wait_status("1", &mine, T);
    let mut b_builds = Vec::new();
    for _ in 0..12 {
        let b = h.build_with("b", json!({}));
        b_builds.push((
            b["id"].as_i64().unwrap(),
            b["name"].as_str().unwrap().to_string(),
        ));
    }
    for i in 2..=11 {
        let n = h.build("1");
        assert_eq!(
            n,
            format!("1{i}"),
            "project 1 builds on under names another project used"
        );
    }
    h.wait_status("1", "111", T);
    h.wait_status("11", "111", T);
    let (victim_id, victim) = b_builds
        .iter()
        .find(|(id, _)| *id == 11)
        .cloned()
        .expect("project b has the build with id 11");
    let r = h.wait_status("b", &victim, T);
    assert!(r["output_deleted_at"].is_null());

    let auth = vec![
        ("Authorization", format!("Bearer {token}")),
        ("Content-Type", "application/json".to_string()),
    ];
    let addr = h.web_addr();
    let (code, body) = http(
        &addr,
        "POST",
        "/ams-build/api/builds/11/delete-output",
        &auth,
        b"{}",
    );
    assert_eq!(code, 200, "{body}");
    // Project 1's build 11 lost its output; project b's build with id 11 kept it.
    let r = h.record("b", &victim);
    assert!(r["output_deleted_at"].is_null(), "{r}");
    assert_eq!(r["id"].as_i64(), Some(victim_id));
    assert!(h.build_dir("b").join(&victim).join("output.txt").exists());
    let r = h.record("1", "11");
    assert!(!r["output_deleted_at"].is_null(), "{r}");

    // `111` is a build of project 1 and of project 11: the moderator sees only project 1's.
    let (code, body) = http(
        &addr,
        "POST",
        "/ams-build/api/builds/111/delete-output",
        &auth,
        b"{}",
    );
    assert_eq!(
        code,
        200,
        "{body} {} {}",
        h.record("1", "111"),
        h.record("11", "111")
    );
    assert!(h.record("11", "111")["output_deleted_at"].is_null());
    // Another project's build by its project-qualified path: not found, like a missing one.
    let (code, _) = http(
        &addr,
        "POST",
        "/ams-build/api/projects/name/b/builds/11/cancel",
        &auth,
        b"{}",
    );
    assert_eq!(code, 404);
    // The operator's CLI names the project when a name is ambiguous.
    let o = h.cli(&["delete-output", "111"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("several projects"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = h.cli(&["delete-output", "11/111"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!h.record("11", "111")["output_deleted_at"].is_null());
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Everything the host writes into the data directory is the host user's alone; a data
/// directory other users can enter is reported at start with the fix.
#[test]
fn the_data_directory_and_its_files_are_private() {
    require_docker();
    let mut h = TestHost::new();
    std::fs::remove_dir_all(&h.data).unwrap();
    // A data directory the host creates itself (through the CLI), then configured.
    h.project(
        "p",
        &pipeline(json!([stage("s", &["echo private > Builds/out.txt"])])),
    );
    std::fs::write(
        h.data.join("web_conf.json"),
        json!({"webhook_ip": "127.0.0.1", "webhook_port": 0,
               "web_interface_ip": "127.0.0.1", "web_interface_port": 0})
        .to_string(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        h.data.join("web_conf.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    h.start();
    let name = h.build("p");
    let r = h.wait_status("p", &name, T);
    assert_eq!(r["status"], "pass", "{}", h.log("p", &name));
    assert_eq!(mode(&h.data), 0o700);
    let config = h.data.join("projects/p/master/config");
    assert_eq!(mode(&config), 0o700);
    let mut files = vec![
        h.data.join("ams.db"),
        h.data.join("host-id"),
        config.join("pipeline-config.json"),
        config.join("webhooks.json"),
        h.build_dir("p").join(&name).join("output.txt"),
        h.build_dir("p").join(format!("{name}.7z")),
    ];
    for extra in ["ams.db-wal", "ams.db-shm"] {
        if h.data.join(extra).exists() {
            files.push(h.data.join(extra));
        }
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert!(!h.host_log().contains("other users"), "{}", h.host_log());

    h.term();
    std::fs::set_permissions(&h.data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        config.join("webhooks.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    h.start();
    let log = h.host_log();
    for p in [h.data.clone(), config.join("webhooks.json")] {
        let want = format!("{} is mode", p.display());
        assert!(
            log.contains(&want),
            "no warning about {}: {log}",
            p.display()
        );
    }
    assert!(log.contains("chmod go-rwx"), "{log}");
}

/// What a build leaves on the host is inert: no set-user-id files in a kept source, a kept
/// output or an archive, and a tree nested deeper than the host walks fails that build only.
#[test]
fn leftovers_of_a_build_are_inert_and_deep_trees_fail_cleanly() {
    require_docker();
    let mut h = TestHost::new();
    let keep =
        json!({"cleanup": {"remove_build_source": false, "7z_build": false, "7z_hash": null}});
    h.project(
        "setid",
        &pipeline_with(
            json!([stage(
                "s",
                &[
                    "cp /bin/busybox suid && chmod 4755 suid",
                    "cp /bin/busybox Builds/suid2 && chmod 6755 Builds/suid2"
                ]
            )]),
            keep.clone(),
        ),
    );
    h.project(
        "setid7z",
        &pipeline(json!([stage(
            "s",
            &["cp /bin/busybox Builds/suid3 && chmod 4755 Builds/suid3"]
        )])),
    );
    let deep = "d/".repeat(300);
    let mk = format!("mkdir -p {deep} && echo deep");
    h.project(
        "deep",
        &pipeline_with(json!([stage("s", &[mk.as_str()])]), keep),
    );
    h.start();
    let (r, log) = finished(&h, "setid", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    let dir = h.build_dir("setid").join(r["name"].as_str().unwrap());
    for f in [dir.join("project_source/suid"), dir.join("build/suid2")] {
        assert_eq!(mode(&f) & 0o6000, 0, "{} keeps a set-id bit", f.display());
        assert_eq!(mode(&f) & 0o777, 0o755);
    }
    let (r, log) = finished(&h, "setid7z", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    let archive = h
        .build_dir("setid7z")
        .join(format!("{}.7z", r["name"].as_str().unwrap()));
    let o = std::process::Command::new("7z")
        .args(["l", "-slt"])
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains("suid3"), "{listing}");
    assert!(!listing.contains("rws"), "{listing}");

    // 300 folders deep in the source the build keeps: refused when folded, the host lives on.
    let (r, log) = finished(&h, "deep", json!({}));
    assert!(log.contains("nested more than 256 folders deep"), "{log}");
    assert_ne!(r["status"], "running");
    let (r, log) = finished(&h, "setid7z", json!({}));
    assert_eq!(r["status"], "pass", "the host still builds: {log}");
}

/// Packing is part of the build: a sparse file larger than archive_max_bytes is refused at
/// once, and packing counts against the build's timeout and stops on cancel.
#[test]
fn packing_is_bounded_by_size_timeout_and_cancel() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"archive_max_bytes": 1u64 << 40}));
    let sparse = |gb: u64| {
        format!(
            "dd of=Builds/huge bs=1048576 count=0 seek={} 2>/dev/null",
            gb << 10
        )
    };
    let (a, b) = (sparse(4096), sparse(200));
    h.project("huge", &pipeline(json!([stage("s", &[a.as_str()])])));
    h.project(
        "slow",
        &pipeline_with(json!([stage("s", &[b.as_str()])]), json!({"timeout": 6})),
    );
    h.project("cancel", &pipeline(json!([stage("s", &[b.as_str()])])));
    h.start();
    // 4 TiB of holes: over the limit, refused without reading.
    let (r, log) = finished(&h, "huge", json!({}));
    assert!(log.contains("archive_max_bytes"), "{log}");
    assert!(r["archive_name"].is_null(), "{r}");
    // 200 GiB of holes: packing would take hours; the build's 6 s timeout ends it.
    let (r, log) = finished(&h, "slow", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(log.contains("timed out after 6 s"), "{log}");
    assert!(log.contains("packing stopped"), "{log}");
    // Cancel while packing.
    let b = h.build_with("cancel", json!({}));
    let name = b["name"].as_str().unwrap().to_string();
    wait_for("packing to start", T, || {
        h.log("cancel", &name)
            .contains("archiving the build output")
            .then_some(())
    });
    let a = h.req(json!({"cmd": "cancel", "build": name, "actor": "tester"}));
    assert_eq!(a["ok"], true, "{a}");
    let r = h.wait_status("cancel", &name, Duration::from_secs(30));
    assert_eq!(r["status"], "cancel", "{}", h.log("cancel", &name));
}

/// One project's build cannot reach another's over the network: builds share a bridge with
/// inter-container traffic off. A build serving a secret on a port is not reachable from a
/// concurrent build of another project that knows its address.
#[test]
fn builds_of_different_projects_cannot_reach_each_other() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"max_active_builds": 2}));
    h.project(
        "vic",
        &pipeline(json!([stage(
            "serve",
            &[
                "echo VICTIM-IP=$(ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)",
                "echo SECRET-OF-VICTIM | timeout 20 nc -l -p 5555 || true"
            ]
        )])),
    );
    h.start();
    let vic = h.build("vic");
    let ip = wait_for("the victim's address", T, || {
        let log = h.log("vic", &vic);
        log.lines()
            .find_map(|l| l.strip_prefix("VICTIM-IP="))
            .filter(|ip| !ip.is_empty())
            .map(str::to_string)
    });
    let probe = format!(
        "for i in 1 2 3 4 5 6; do nc -w 2 {ip} 5555 </dev/null && break; sleep 0.5; done; echo probed"
    );
    h.project("att", &pipeline(json!([stage("probe", &[probe.as_str()])])));
    let (r, log) = finished(&h, "att", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains("probed"), "{log}");
    assert!(
        !log.contains("SECRET-OF-VICTIM"),
        "the build reached another project's: {log}"
    );
    h.wait_status("vic", &vic, T);
}

/// A build joins a bridge that keeps containers apart: the engine's default bridge when it
/// does (dockerd `--icc=false`, as scripts/setup.sh starts it), else `ams-build`. The build
/// names its gateway, which tells the networks apart.
#[test]
fn a_build_joins_the_default_bridge_only_when_it_keeps_containers_apart() {
    require_docker();
    let inspect = |net: &str| -> Vec<String> {
        let o = std::process::Command::new("docker")
            .args(["network", "inspect", net, "--format"])
            .arg(
                "{{(index .IPAM.Config 0).Gateway}} {{.Driver}} {{.EnableIPv6}} \
                 {{index .Options \"com.docker.network.bridge.enable_icc\"}} \
                 {{index .Options \"com.docker.network.bridge.name\"}}",
            )
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        out.split_whitespace().map(str::to_string).collect()
    };
    let default = inspect("bridge");
    // As the executor decides: an IPv4 bridge named docker0 that keeps containers apart.
    let usable = default
        .get(1..5)
        .is_some_and(|f| f == ["bridge", "false", "false", "docker0"]);
    if usable {
        // No build uses `ams-build` on this engine: gone, so that the trusted build below
        // must make it anew.
        let rm = std::process::Command::new("docker")
            .args(["network", "rm", "ams-build"])
            .output()
            .unwrap();
        assert!(
            inspect("ams-build").is_empty(),
            "ams-build is still there: {}",
            String::from_utf8_lossy(&rm.stderr)
        );
    }
    let mut h = TestHost::new();
    let gateway = ["echo GATEWAY=$(ip route | awk '/^default/ {print $3}')"];
    h.project("gw", &pipeline(json!([stage("s", &gateway)])));
    let trusted = |args: &str| {
        pipeline_with(
            json!([stage("s", &gateway)]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "args": args}}),
        )
    };
    h.project("named", &trusted("--network ams-build"));
    h.private_config(
        "named",
        json!({"allow-docker-args": ["--network ams-build"]}),
    );
    h.project("raw", &trusted("--cap-add NET_RAW"));
    h.private_config("raw", json!({"allow-docker-args": ["--cap-add"]}));
    h.start();
    let gateway_of = |project: &str| {
        let (r, log) = finished(&h, project, json!({}));
        assert_eq!(r["status"], "pass", "{log}");
        let gw = log
            .lines()
            .find_map(|l| l.strip_prefix("GATEWAY="))
            .unwrap_or_default()
            .to_string();
        (gw, log)
    };
    // Named by trusted docker.args, `ams-build` is made (and checked) as for the default.
    let (named, log) = gateway_of("named");
    let ours = inspect("ams-build");
    assert_eq!(
        ours.get(1..4),
        Some(&["bridge", "false", "false"].map(String::from)[..]),
        "{ours:?}"
    );
    assert_eq!(Some(&named), ours.first(), "{log}");
    if usable {
        // Removed while the host runs (as `docker network prune` would): made anew.
        let rm = std::process::Command::new("docker")
            .args(["network", "rm", "ams-build"])
            .output()
            .unwrap();
        assert!(rm.status.success(), "{rm:?}");
    }
    // A build that keeps raw sockets never shares the default bridge with other containers.
    let (raw, log) = gateway_of("raw");
    let ours = inspect("ams-build");
    assert_eq!(Some(&raw), ours.first(), "{log}");
    let (joined, log) = gateway_of("gw");
    let expected = if usable { &default[0] } else { &ours[0] };
    assert_eq!(&joined, expected, "bridge: {default:?}\n{log}");
}

/// A build cannot forge link-layer packets: with a raw socket it could send ARP replies that
/// take over the traffic of another container on its bridge (inter-container traffic off
/// filters IP, not ARP). Builds have no CAP_NET_RAW.
#[test]
fn a_build_cannot_forge_arp_on_its_bridge() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "arp",
        &pipeline(json!([stage(
            "s",
            &[
                "gw=$(ip route | awk '/^default/ {print $3}')",
                // Duplicate address detection: a request from 0.0.0.0, harmless if it went out.
                "if arping -D -c 1 -w 1 -I eth0 \"$gw\"; then echo SENT; else echo REFUSED; fi",
                "grep CapEff /proc/self/status"
            ]
        )])),
    );
    h.start();
    let (r, log) = finished(&h, "arp", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    // Lines of their own: the trace of the command holds both words.
    let said = |w: &str| log.lines().any(|l| l.trim() == w);
    assert!(said("REFUSED") && !said("SENT"), "a build sent ARP: {log}");
    assert!(log.contains("Operation not permitted"), "{log}");
}

/// A repository cannot make a cancel or a timeout wait for an hour: docker.stop-timeout is
/// capped by the host.
#[test]
fn a_long_stop_timeout_is_capped() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "slowstop",
        &pipeline_with(
            json!([stage("s", &["echo ok"])]),
            json!({"docker": {"image": IMAGE, "project-dest": "/root/project",
                              "build-output-dest": "/root/project/Builds", "stop-timeout": 3600}}),
        ),
    );
    h.start();
    let (r, log) = finished(&h, "slowstop", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains("docker.stop-timeout 3600 s is more than the host allows; 60 s is used"),
        "{log}"
    );
}
