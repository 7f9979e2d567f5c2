//! `amsbuild log`, `cancel` and `delete-output` name a build the same way, through one
//! resolver: its full name (`PROJECT/NAME` too), or `PROJECT INDEX`.

use crate::harness::*;
use serde_json::json;
use std::process::Output;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn echo(word: &str) -> String {
    pipeline(json!([stage("s", &[&format!("echo {word}-$((20+1))")])]))
}

#[test]
fn log_cancel_and_delete_output_take_a_name_or_a_project_and_index() {
    require_docker();
    let mut h = TestHost::new();
    h.start();
    // Both projects have a build 1: an index only means something with its project.
    h.project("alpha", &echo("alpha-one"));
    h.project("beta", &echo("beta-one"));
    let a1 = h.build("alpha");
    let b1 = h.build("beta");
    h.wait_status("alpha", &a1, T);
    h.wait_status("beta", &b1, T);
    std::fs::write(h.source("alpha").join("pipeline.json"), echo("alpha-two")).unwrap();
    let a2 = h.build("alpha");
    assert_eq!(h.wait_status("alpha", &a2, T)["status"], "pass");

    // log: by project and index, by full name, by PROJECT/NAME; each the right build's log.
    for (args, want, not) in [
        (vec!["log", "alpha", "2"], "alpha-two-21", "alpha-one"),
        (vec!["log", "alpha", "1"], "alpha-one-21", "alpha-two"),
        (vec!["log", "beta", "1"], "beta-one-21", "alpha"),
        (vec!["log", a1.as_str()], "alpha-one-21", "alpha-two"),
        (
            vec!["log", &format!("alpha/{a2}")],
            "alpha-two-21",
            "alpha-one",
        ),
    ] {
        let o = h.cli(&args);
        assert!(o.status.success(), "{args:?}: {}", err(&o));
        assert!(out(&o).contains(want), "{args:?}: {}", out(&o));
        assert!(!out(&o).contains(not), "{args:?}: {}", out(&o));
        assert!(err(&o).contains(": PASS"), "{args:?}: {}", err(&o));
    }
    let o = h.cli(&["log", "alpha", "2"]);
    assert!(
        err(&o).contains(&format!("build {a2}: PASS")),
        "{}",
        err(&o)
    );

    // References that name nothing, for each of the three commands, say why.
    for cmd in ["log", "cancel", "delete-output"] {
        let o = h.cli(&[cmd, "alpha", "3"]);
        assert!(!o.status.success(), "{cmd}");
        assert!(
            err(&o).contains("project `alpha` has no build 3"),
            "{cmd}: {}",
            err(&o)
        );
        let o = h.cli(&[cmd, "gamma", "1"]);
        assert!(!o.status.success(), "{cmd}");
        assert!(
            err(&o).contains("no project named `gamma`"),
            "{cmd}: {}",
            err(&o)
        );
        let o = h.cli(&[cmd, "no_such_build"]);
        assert!(!o.status.success(), "{cmd}");
        assert!(
            err(&o).contains("no build named `no_such_build`"),
            "{cmd}: {}",
            err(&o)
        );
        // An index is a positive number; clap refuses anything else before the host is asked.
        for bad in ["0", "x", "-1"] {
            let o = h.cli(&[cmd, "alpha", bad]);
            assert_eq!(o.status.code(), Some(2), "{cmd} alpha {bad}: {}", err(&o));
        }
    }

    // delete-output by project and index: alpha's build 1, not beta's.
    let o = h.cli(&["delete-output", "alpha", "1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o).trim(), format!("deleted the output of {a1}"));
    assert!(!h.record("alpha", &a1)["output_deleted_at"].is_null());
    assert!(!h.build_dir("alpha").join(&a1).exists());
    assert!(h.record("beta", &b1)["output_deleted_at"].is_null());
    assert!(h.build_dir("beta").join(&b1).exists());
    assert!(h.record("alpha", &a2)["output_deleted_at"].is_null());
    // And by full name.
    let o = h.cli(&["delete-output", &b1]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(!h.record("beta", &b1)["output_deleted_at"].is_null());

    // cancel by project and index; `log` of it then ends with its status, not PASS.
    std::fs::write(
        h.source("beta").join("pipeline.json"),
        pipeline(json!([stage("s", &["sleep 600"])])),
    )
    .unwrap();
    let b2 = h.build("beta");
    h.wait_running("beta", &b2);
    let o = h.cli(&["cancel", "beta", "2"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o).trim(), format!("cancel requested for {b2}"));
    assert_eq!(h.wait_status("beta", &b2, T)["status"], "cancel");
    let o = h.cli(&["log", "beta", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains(&format!("build {b2}: CANCEL")),
        "{}",
        err(&o)
    );
    assert_eq!(h.record("alpha", &a2)["status"], "pass");
}
