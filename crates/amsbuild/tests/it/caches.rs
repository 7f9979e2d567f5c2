//! Caches of pipeline.json through real builds: restored by key, keyed by a file's hash,
//! saved only after a pass, never written through, and a build of another branch cannot
//! change what the default branch's builds restore (cache poisoning).

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Prints what the cache held, then leaves `$1` in it (and fails when `$2` is `fail`).
fn project_pipeline() -> String {
    pipeline_with(
        json!([stage(
            "s",
            &[
                "cat /root/.cache/dep/state 2>/dev/null || echo state=empty",
                "echo \"state=$(cat note)\" > /root/.cache/dep/state",
                "[ \"$(cat mode)\" != fail ]"
            ]
        )]),
        json!({"caches": [{"key": "dep-{hash:deps.txt}", "path": "/root/.cache/dep"}]}),
    )
}

fn run(h: &TestHost, note: &str, mode: &str, extra: Value) -> (Value, String) {
    let src = h.source("c");
    std::fs::write(src.join("note"), note).unwrap();
    std::fs::write(src.join("mode"), mode).unwrap();
    let b = h.build_with("c", extra);
    let name = b["name"].as_str().unwrap().to_string();
    let r = h.wait_status("c", &name, T);
    let log = h.log("c", &name);
    assert!(
        !h.build_dir("c").join(&name).join("cache-0").exists(),
        "the build's cache folder is gone"
    );
    (r, log)
}

#[test]
fn caches_restore_by_key_save_on_pass_and_cannot_be_poisoned_from_a_branch() {
    require_docker();
    let mut h = TestHost::new();
    h.project("c", &project_pipeline());
    std::fs::write(h.source("c").join("deps.txt"), "a==1").unwrap();
    h.start();

    let (r, log) = run(&h, "first", "ok", json!({}));
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains("state=empty") && log.contains("none yet"),
        "{log}"
    );
    assert!(
        log.contains("cache dep-") && log.contains(": saved"),
        "{log}"
    );

    let (_, log) = run(&h, "second", "ok", json!({}));
    assert!(log.contains("state=first"), "restored: {log}");
    assert!(log.contains("kept (the entry exists)"), "saved once: {log}");

    // A build of another branch reads the default branch's entry, and saves into its own.
    let (_, log) = run(&h, "poison", "ok", json!({"branch": "topic"}));
    assert!(
        log.contains("state=first") && log.contains("default branch"),
        "{log}"
    );
    let (_, log) = run(&h, "again", "ok", json!({}));
    assert!(
        log.contains("state=first"),
        "the default branch's entry is untouched: {log}"
    );
    let (_, log) = run(&h, "topic-2", "ok", json!({"branch": "topic"}));
    assert!(
        log.contains("state=poison"),
        "the branch has its own entry: {log}"
    );

    // A new key starts empty; a failed build saves nothing.
    std::fs::write(h.source("c").join("deps.txt"), "a==2").unwrap();
    let (r, log) = run(&h, "broken", "fail", json!({}));
    assert_eq!(r["status"], "fail", "{log}");
    assert!(
        log.contains("state=empty") && log.contains("not saved"),
        "{log}"
    );
    let (_, log) = run(&h, "fixed", "ok", json!({}));
    assert!(
        log.contains("state=empty"),
        "nothing of the failed build: {log}"
    );

    // A branch that saves a new key first still cannot reach the default branch's builds.
    std::fs::write(h.source("c").join("deps.txt"), "a==3").unwrap();
    let (_, log) = run(&h, "poison", "ok", json!({"branch": "topic"}));
    assert!(log.contains(": saved"), "{log}");
    let (_, log) = run(&h, "trusted", "ok", json!({}));
    assert!(
        log.contains("state=empty"),
        "the branch's entry is not the default's: {log}"
    );
    assert!(h.containers().is_empty());
}

/// Past cache_max_bytes the least recently used entries go.
#[test]
fn caches_stay_under_the_projects_limit() {
    require_docker();
    let mut h = TestHost::with_conf(json!({"cache_max_bytes": 1_500_000}));
    h.project(
        "c",
        &pipeline_with(
            json!([stage(
                "s",
                &["head -c 1000000 /dev/zero > /root/.cache/x/blob"]
            )]),
            json!({"caches": [{"key": "k-{hash:v}", "path": "/root/.cache/x"}]}),
        ),
    );
    h.start();
    for v in ["1", "2"] {
        std::fs::write(h.source("c").join("v"), v).unwrap();
        let name = h.build("c");
        let r = h.wait_status("c", &name, T);
        assert_eq!(r["status"], "pass");
        if v == "2" {
            let log = h.log("c", &name);
            assert!(
                log.contains("cache entry") && log.contains("removed"),
                "{log}"
            );
        }
    }
    let entries: usize = std::fs::read_dir(h.data.join("projects/c/caches"))
        .unwrap()
        .flatten()
        .map(|s| std::fs::read_dir(s.path()).unwrap().count())
        .sum();
    assert_eq!(entries, 1, "one entry fits");
}
