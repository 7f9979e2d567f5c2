//! The server image: the repository's Dockerfile, with its runtime stage built offline (no
//! registry here) from local layers, runs `amsbuild serve` against the host's engine through
//! the mounted socket, answers `/healthz`, and runs a build whose folders the host's engine
//! bind-mounts by their paths, since the data directory has the same path on both sides.

use crate::harness::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const SOCKET: &str = "/var/run/docker.sock";

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The Dockerfile's instructions, continuation lines joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part.trim());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// The runtime stage (after the last FROM) made buildable offline: the base image becomes
/// `scratch` plus `rootfs/`, the package install is left to that rootfs, and the binary comes
/// from the context instead of the builder stage. Every other instruction (ENV, EXPOSE,
/// ENTRYPOINT, CMD) is the Dockerfile's own.
fn offline_runtime_stage(dockerfile: &str) -> String {
    let all = instructions(dockerfile);
    let last_from = all
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM");
    assert!(
        all[last_from].starts_with("FROM debian:bookworm-slim"),
        "runtime base: {}",
        all[last_from]
    );
    let mut out = vec!["FROM scratch".to_string(), "COPY rootfs/ /".to_string()];
    let mut binary = false;
    for i in &all[last_from + 1..] {
        if i.starts_with("RUN apt-get update") {
            for pkg in ["ca-certificates", "git", "tini"] {
                assert!(i.contains(pkg), "the runtime installs {pkg}: {i}");
            }
            continue;
        }
        if let Some(rest) = i.strip_prefix("COPY --from=builder ") {
            let dest = rest.split_whitespace().last().unwrap();
            out.push(format!("COPY amsbuild {dest}"));
            binary = true;
            continue;
        }
        assert!(
            !i.starts_with("RUN ") && !i.starts_with("COPY "),
            "the offline build cannot run: {i}"
        );
        out.push(i.clone());
    }
    assert!(
        binary,
        "the runtime stage copies the binary from the builder"
    );
    out.join("\n") + "\n"
}

/// Copies `file` (following links) to the same path under `root`.
fn copy_into(root: &Path, file: &Path, to: Option<&str>) {
    let dest = root.join(to.unwrap_or(file.to_str().unwrap()).trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(file, &dest).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// The shared libraries `bin` loads, as ldd lists them.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let out = ok("ldd", Command::new("ldd").arg(bin).output().unwrap());
    out.lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Stands in for what the runtime stage's apt-get installs, from this machine: the C
/// libraries, tini (Debian's static build), the CA bundle, and busybox as /bin/sh. git is left
/// out, so the test's project is not a git one.
fn rootfs(ctx: &Path, bin: &Path) {
    let root = ctx.join("rootfs");
    for lib in libraries(bin) {
        copy_into(&root, &lib, None);
    }
    copy_into(
        &root,
        Path::new("/usr/bin/tini-static"),
        Some("/usr/bin/tini"),
    );
    copy_into(&root, Path::new("/etc/ssl/certs/ca-certificates.crt"), None);
    copy_into(&root, Path::new("/bin/busybox"), None);
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    for d in ["tmp", "root", "var/lib/amsbuild"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// Removes the container and the image, whatever the test did.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

#[test]
fn the_server_image_serves_and_builds_through_the_mounted_socket() {
    require_docker();
    assert!(
        Path::new(SOCKET).exists(),
        "{SOCKET} is missing: the image test mounts the engine's socket"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile")).expect("Dockerfile");
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), offline_runtime_stage(&dockerfile)).unwrap();
    // The test binary without its debug information (it is most of its size).
    ok(
        "strip",
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(ctx.join("amsbuild"))
            .arg(bin())
            .output()
            .unwrap(),
    );
    rootfs(&ctx, Path::new(bin()));
    let tag = format!("amsbuild-it-server:{}", std::process::id());
    let guard = Cleanup {
        container: format!("amsbuild-it-server-{}", std::process::id()),
        image: tag.clone(),
    };
    let o = Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    ok("docker build of the offline server image", o);

    // The entrypoint runs amsbuild with the arguments given.
    let v = ok("--version", docker(&["run", "--rm", &tag, "--version"]));
    assert_eq!(v.trim(), format!("amsbuild {}", env!("CARGO_PKG_VERSION")));

    // The data directory at the same path on both sides, the engine's socket mounted, the
    // host's network (so the test reaches it on loopback, on ports the system picks).
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("web_conf.json"),
        json!({"webhook_ip": "127.0.0.1", "webhook_port": 0,
               "web_interface_ip": "127.0.0.1", "web_interface_port": 0})
        .to_string(),
    )
    .unwrap();
    let d = data.to_str().unwrap();
    ok(
        "docker run",
        docker(&[
            "run",
            "-d",
            "--name",
            &guard.container,
            "--network",
            "host",
            "-v",
            &format!("{SOCKET}:{SOCKET}"),
            "-v",
            &format!("{d}:{d}"),
            "-e",
            &format!("AMSBUILD_HOME={d}"),
            &tag,
        ]),
    );
    let logs = || {
        let o = docker(&["logs", &guard.container]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let addr = wait_for("the server's web listener", Duration::from_secs(60), || {
        let l = logs();
        let line = l
            .lines()
            .find(|l| l.contains("web interface listening on "))?;
        let rest = line.split("://").nth(1)?;
        Some(rest.split('/').next()?.to_string())
    });
    assert!(logs().contains("created the user `admin`"), "{}", logs());
    // /healthz: the database and, through the mounted socket, the engine answer.
    let health = wait_for("/healthz to answer 200", Duration::from_secs(60), || {
        let (code, v) = http(&addr, "GET", "/healthz", &[], b"");
        (code == 200).then_some(v)
    });
    assert_eq!(health["engine"], "ok", "{health}");
    assert_eq!(health["database"], "ok", "{health}");

    // A build: the host's engine mounts builds/NAME's folders by their paths.
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", guard.container.as_str(), "amsbuild"];
        a.extend_from_slice(args);
        docker(&a)
    };
    ok("project init", exec(&["project", "init", "demo"]));
    let source = data.join("projects/demo/master/project_source");
    std::fs::write(source.join("input.txt"), "from-master\n").unwrap();
    std::fs::write(
        source.join("pipeline.json"),
        pipeline(json!([stage(
            "s",
            &[
                "cat input.txt",
                "echo out > Builds/result.txt",
                "test -f /.ams-ci/driver.sh"
            ]
        )])),
    )
    .unwrap();
    let o = exec(&["build", "demo", "--wait"]);
    let log = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "the build failed:\n{log}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        logs()
    );
    assert!(log.contains("from-master"), "{log}");
    // An unprivileged container cannot mount: the source is a copy (README says so).
    assert!(
        log.contains("copy of master (overlay mount failed"),
        "{log}"
    );
    let builds = data.join("projects/demo/builds");
    let archives: Vec<_> = std::fs::read_dir(&builds)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "7z"))
        .collect();
    assert_eq!(archives.len(), 1, "one archive in {}", builds.display());

    // docker stop sends SIGTERM through tini; the server stops cleanly.
    ok(
        "docker stop",
        docker(&["stop", "-t", "60", &guard.container]),
    );
    let code = ok(
        "inspect",
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &guard.container]),
    );
    assert_eq!(code.trim(), "0", "{}", logs());
    assert!(
        logs().contains("stopped; pending builds stay queued"),
        "{}",
        logs()
    );
}
