//! What installing needs: shell completions, the manual page, and the systemd unit (checked
//! by systemd-analyze, and its capability set and NoNewPrivileges tried on a real host).

use crate::harness::*;
use serde_json::json;
use std::process::{Command, Output};
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn completions_for_each_shell_name_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = run(&["completions", shell]);
        assert!(o.status.success(), "{shell}");
        let text = stdout(&o);
        for word in ["serve", "delete-output", "completions", "data-dir"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    // The bash script is one bash can read.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("amsbuild.bash");
    std::fs::write(&file, run(&["completions", "bash"]).stdout).unwrap();
    let o = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_manual_page_covers_the_commands_and_each_has_its_own() {
    let o = run(&["man"]);
    assert!(o.status.success());
    let page = stdout(&o);
    assert!(page.contains(".TH amsbuild 1"), "{page}");
    for cmd in [
        "serve",
        "project",
        "user",
        "token",
        "build",
        "log",
        "cancel",
        "delete\\-output",
    ] {
        assert!(page.contains(cmd), "the page lacks {cmd}");
    }
    assert!(!page.contains("__pack"), "the internal command is hidden");
    let o = run(&["man", "log"]);
    assert!(o.status.success());
    let page = stdout(&o);
    assert!(page.contains(".TH amsbuild-log 1"), "{page}");
    assert!(page.contains("INDEX"), "{page}");
    let o = run(&["man", "user", "add"]);
    assert!(
        stdout(&o).contains("\\-\\-password\\-stdin"),
        "{}",
        stdout(&o)
    );
    let o = run(&["man", "nope"]);
    assert!(!o.status.success());
}

fn unit() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/amsbuild.service"
    ))
    .expect("contrib/amsbuild.service")
}

/// The value of `key=` in the unit (the last one).
fn setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = unit();
    assert_eq!(
        setting(&unit, "Environment").as_deref(),
        Some("AMSBUILD_HOME=/var/lib/amsbuild")
    );
    assert_eq!(
        setting(&unit, "StateDirectory").as_deref(),
        Some("amsbuild")
    );
    assert!(setting(&unit, "ReadWritePaths")
        .unwrap()
        .split_whitespace()
        .any(|p| p == "/var/lib/amsbuild"));
    let exec = "ExecStart=/usr/local/bin/amsbuild serve";
    assert!(unit.contains(exec), "{unit}");
    // systemd-analyze checks that ExecStart's program exists: point it at the test binary.
    let dir = tempfile::tempdir().unwrap();
    let verify = |text: &str| {
        let file = dir.path().join("amsbuild.service");
        std::fs::write(&file, text).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&file)
            .output()
            .expect("systemd-analyze (Debian's systemd; scripts/setup.sh installs it)");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let here = unit.replace(exec, &format!("ExecStart={} serve", bin()));
    let (ok, said) = verify(&here);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // It would say so if the unit had a mistake.
    let (_, said) = verify(&here.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"));
    assert!(said.contains("NoNewPrivilege"), "{said}");
}

/// The unit's CapabilityBoundingSet and NoNewPrivileges, as setpriv options.
fn setpriv_of_unit(extra_cap: Option<&str>) -> Vec<String> {
    let unit = unit();
    let mut caps: Vec<String> = setting(&unit, "CapabilityBoundingSet")
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    caps.extend(extra_cap.map(str::to_string));
    let mut w = vec!["setpriv".to_string()];
    if setting(&unit, "NoNewPrivileges").as_deref() == Some("yes") {
        w.push("--no-new-privs".into());
    }
    w.extend([
        "--inh-caps".into(),
        "-all".into(),
        "--bounding-set".into(),
        format!("-all,{}", caps.join(",")),
    ]);
    w
}

/// The unit leaves CAP_SYS_ADMIN out (see its comments): a host with exactly its capability
/// set and NoNewPrivileges copies master instead of mounting, packs and cleans up what a build
/// left with odd owners and modes, and deletes it. With CAP_SYS_ADMIN it would mount.
#[test]
fn the_units_capabilities_let_builds_run_with_copied_sources() {
    require_docker();
    let unit = unit();
    let caps = setting(&unit, "CapabilityBoundingSet").unwrap();
    assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");
    let stages = json!([stage(
        "s",
        &[
            "cat input.txt",
            "mkdir -p Builds/locked/sub && echo x > Builds/locked/sub/f",
            "echo y > Builds/owned && chown 1234:1234 Builds/owned && chmod 4755 Builds/owned",
            "chmod 000 Builds/locked/sub Builds/locked"
        ]
    )]);
    for (extra, source) in [
        (None, "copy of master (overlay mount failed"),
        (
            Some("+sys_admin"),
            "copy-on-write snapshot of master (overlay)",
        ),
    ] {
        let mut h = TestHost::new();
        h.wrap = setpriv_of_unit(extra);
        h.start();
        h.project("svc", &pipeline(stages.clone()));
        std::fs::write(h.source("svc").join("input.txt"), "from-master\n").unwrap();
        let name = h.build("svc");
        let r = h.wait_status("svc", &name, Duration::from_secs(120));
        let log = h.log("svc", &name);
        assert_eq!(r["status"], "pass", "{extra:?}: {log}");
        assert!(log.contains("from-master"), "{log}");
        assert!(log.contains(source), "{extra:?}: {log}");
        assert!(h.build_dir("svc").join(format!("{name}.7z")).exists());
        let o = h.cli(&["delete-output", "svc", "1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!h.build_dir("svc").join(&name).exists(), "{extra:?}");
    }
}
