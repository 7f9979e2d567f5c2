//! SSH remotes against a real sshd on a private loopback port, run as the test's own user (its
//! own host key, config and authorized_keys in a temporary folder): `project add --ssh-key`,
//! the host key pinned on first use with its fingerprint in the log, `project ssh-hostkey`, a
//! changed host key refused, keys the host cannot use named with the fix, a trusted host
//! command's `git pull` given the key, and the described system's `prepare-build` SSH section.

use crate::harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A new ed25519 key pair at `path` (and `path.pub`), with `passphrase` ("" for none).
fn keygen(path: &Path, passphrase: &str) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-C", "ams-test", "-N"])
        .arg(passphrase)
        .arg("-f")
        .arg(path));
}

/// The SHA256 fingerprint of a public key file, as ssh-keygen computes it.
fn fingerprint(pub_file: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(pub_file));
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint in {out}"))
        .to_string()
}

fn user() -> String {
    run(Command::new("id").arg("-un"))
}

/// An sshd of our own on a loopback port, serving the test user's account with only the keys
/// in `authorized_keys`.
struct Sshd {
    dir: PathBuf,
    port: u16,
    host_key: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = Sshd {
            dir: dir.to_path_buf(),
            port: 0,
            host_key: dir.join("host_key_1"),
            child: None,
        };
        keygen(&s.host_key, "");
        std::fs::write(dir.join("authorized_keys"), "").unwrap();
        s.spawn();
        s
    }

    fn binary() -> PathBuf {
        ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("the SSH tests need sshd: run scripts/setup.sh (it installs openssh-server)")
    }

    /// Starts sshd with the current host key, on the port it had or on a free one.
    fn spawn(&mut self) {
        // As root, sshd needs its privilege separation folder (the service would make it).
        if user() == "root" {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let conf = self.dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 PidFile none\n",
                self.host_key.display(),
                self.dir.join("authorized_keys").display()
            ),
        )
        .unwrap();
        for _ in 0..5 {
            let port = if self.port != 0 {
                self.port
            } else {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let log = std::fs::File::create(self.dir.join("sshd.log")).unwrap();
            let mut child = Command::new(Self::binary())
                .args(["-D", "-e", "-f"])
                .arg(&conf)
                .args(["-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            // Ready when the port accepts; an sshd that exited (the port was taken meanwhile)
            // is tried again on another port.
            let up = wait_for("sshd to accept connections", T, || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false);
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| true)
            });
            if up {
                self.port = port;
                self.child = Some(child);
                return;
            }
            let log = std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
            assert!(
                self.port == 0,
                "sshd did not start again on its port:\n{log}"
            );
        }
        panic!("sshd did not start");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts sshd on the same port with a new host key (a server whose key was replaced, or
    /// someone in the middle); returns the new key's fingerprint.
    fn restart_with_new_host_key(&mut self) -> String {
        self.stop();
        self.host_key = self.dir.join("host_key_2");
        keygen(&self.host_key, "");
        self.spawn();
        self.host_fingerprint()
    }

    fn host_fingerprint(&self) -> String {
        fingerprint(&self.host_key.with_extension("pub"))
    }

    fn authorize(&self, pub_file: &Path) {
        let mut keys = std::fs::read_to_string(self.dir.join("authorized_keys")).unwrap();
        keys.push_str(&std::fs::read_to_string(pub_file).unwrap());
        std::fs::write(self.dir.join("authorized_keys"), keys).unwrap();
    }

    /// The ssh URL of a repository at `path` on this server.
    fn url(&self, path: &Path) -> String {
        format!("ssh://{}@127.0.0.1:{}{}", user(), self.port, path.display())
    }

    /// How ssh names this server in known_hosts.
    fn host(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test host, an sshd and a bare repository on it whose `main` holds `pipeline_json`, with a
/// key the server accepts (`key`, no passphrase). Returns the work tree used to push.
struct Fixture {
    h: TestHost,
    sshd: Sshd,
    key: PathBuf,
    bare: PathBuf,
    work: PathBuf,
}

impl Fixture {
    fn new(pipeline_json: &str) -> Fixture {
        let h = TestHost::new();
        let base = h.tmp.path().to_path_buf();
        let sshd = Sshd::start(&base.join("sshd"));
        let keys = base.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let key = keys.join("id_test");
        keygen(&key, "");
        sshd.authorize(&key.with_extension("pub"));
        let work = base.join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("pipeline.json"), pipeline_json).unwrap();
        std::fs::write(work.join("version.txt"), "one").unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "one"]);
        let bare = base.join("served/repo.git");
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        git(
            &base,
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Fixture {
            h,
            sshd,
            key,
            bare,
            work,
        }
    }

    /// A new commit on the served `main`; returns its id.
    fn push(&self, version: &str) -> String {
        std::fs::write(self.work.join("version.txt"), version).unwrap();
        git(&self.work, &["commit", "-q", "-am", version]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn add(&self, name: &str, key: &Path) -> std::process::Output {
        self.h.cli(&[
            "project",
            "add",
            name,
            "--git",
            &self.sshd.url(&self.bare),
            "--branch",
            "main",
            "--ssh-key",
            key.to_str().unwrap(),
        ])
    }

    fn config(&self, project: &str) -> PathBuf {
        self.h
            .data
            .join("projects")
            .join(project)
            .join("master/config")
    }

    fn build(&self, project: &str) -> (Value, String) {
        let name = self.h.build(project);
        let r = self.h.wait_status(project, &name, T);
        (r, self.h.log(project, &name))
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn show_pipeline() -> String {
    pipeline(json!([stage("show", &["echo version=$(cat version.txt)"])]))
}

/// `project add --ssh-key` copies the key (0600) and names it before the clone, which uses it
/// and pins the server's key in the project's own known_hosts with a line showing the
/// fingerprint; builds fetch over SSH with the key; `ssh-hostkey` shows the pin and `--reset`
/// forgets it, after which the next build pins again and says so in its log.
#[test]
fn a_project_added_with_a_key_clones_builds_and_pins_the_host_key_on_first_use() {
    require_docker();
    let mut f = Fixture::new(&show_pipeline());
    let fp = f.sshd.host_fingerprint();
    let o = f.add("viassh", &f.key);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "ssh: pinned the host key of {} on first use: ssh-ed25519 {fp}",
            f.sshd.host()
        )),
        "{out}"
    );
    let config = f.config("viassh");
    let copy = config.join("id_test");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&f.key).unwrap()
    );
    assert_eq!(mode(&copy), 0o600);
    let private: Value = serde_json::from_str(
        &std::fs::read_to_string(config.join("pipeline-config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(private["ssh-key"], "id_test");
    assert_eq!(mode(&config.join("known_hosts")), 0o600);
    assert_eq!(
        std::fs::read_to_string(f.h.source("viassh").join("version.txt")).unwrap(),
        "one"
    );

    // A build fetches the new commit over SSH with the key.
    f.h.start();
    let c2 = f.push("two");
    let (r, log) = f.build("viassh");
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains(&format!("git_hash {c2}")) && log.contains("version=two"),
        "{log}"
    );
    assert!(
        !log.contains("pinned the host key"),
        "pinned at add already: {log}"
    );

    let shown = text(&f.h.cli(&["project", "ssh-hostkey", "viassh"]));
    assert_eq!(shown.trim(), format!("{} ssh-ed25519 {fp}", f.sshd.host()));
    let o = f.h.cli(&["project", "ssh-hostkey", "viassh", "--reset"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("removed {} ssh-ed25519 {fp}", f.sshd.host())),
        "{out}"
    );
    let shown = text(&f.h.cli(&["project", "ssh-hostkey", "viassh"]));
    assert!(
        shown.contains("no host key is pinned for project viassh"),
        "{shown}"
    );

    // The next connection pins again: the build's log and the host's log show the fingerprint.
    let c3 = f.push("three");
    let (r, log) = f.build("viassh");
    assert_eq!(r["status"], "pass", "{log}");
    assert!(log.contains(&format!("git_hash {c3}")), "{log}");
    let line = format!(
        "ssh: pinned the host key of {} on first use: ssh-ed25519 {fp}",
        f.sshd.host()
    );
    assert!(log.contains(&line), "{log}");
    assert!(f.h.host_log().contains(&line), "{}", f.h.host_log());
    let shown = text(&f.h.cli(&["project", "ssh-hostkey", "viassh"]));
    assert_eq!(shown.trim(), format!("{} ssh-ed25519 {fp}", f.sshd.host()));
    assert!(!text(&f.h.cli(&["project", "ssh-hostkey", "nosuch"])).contains(&fp));
}

/// A server whose host key differs from the pinned one is refused, with a message naming the
/// new fingerprint and the reset command; the pin stays. After the reset the new key is pinned.
#[test]
fn a_changed_host_key_is_refused_until_the_pin_is_reset() {
    require_docker();
    let mut f = Fixture::new(&show_pipeline());
    let old = f.sshd.host_fingerprint();
    let o = f.add("moved", &f.key);
    assert!(o.status.success(), "{}", text(&o));
    let new = f.sshd.restart_with_new_host_key();
    assert_ne!(old, new);
    f.h.start();
    f.push("two");
    let (r, log) = f.build("moved");
    assert_eq!(r["status"], "error", "{log}");
    let reason = r["reason"].as_str().unwrap_or_default().to_string();
    for text in [&log, &reason] {
        assert!(
            text.contains(&format!(
                "the SSH host key of {} has changed",
                f.sshd.host()
            )) && text.contains(&format!("({new})"))
                && text.contains("amsbuild project ssh-hostkey moved --reset"),
            "{text}"
        );
    }
    let shown = text(&f.h.cli(&["project", "ssh-hostkey", "moved"]));
    assert!(shown.contains(&old) && !shown.contains(&new), "{shown}");

    let o = f.h.cli(&["project", "ssh-hostkey", "moved", "--reset"]);
    assert!(o.status.success(), "{}", text(&o));
    // No container needed to see the fetch succeed: the log says which commit it checked out.
    let c3 = f.push("three");
    let name = f.h.build("moved");
    let log = wait_for("the build to check out the new commit", T, || {
        let log = f.h.log("moved", &name);
        log.contains(&format!("git_hash {c3}")).then_some(log)
    });
    assert!(log.contains(&format!("ssh-ed25519 {new}")), "{log}");
    f.h.wait_status("moved", &name, T);
}

/// Keys the host cannot use are refused with our own words, naming the file and the fix, not
/// ssh's bare "Permission denied": at `project add` (a passphrase, a public key) and at each
/// build (a key made readable by others, a key replaced by one with a passphrase).
#[test]
fn keys_the_host_cannot_use_are_named_with_the_fix() {
    let mut f = Fixture::new(&show_pipeline());
    let locked = f.key.with_file_name("id_locked");
    keygen(&locked, "a passphrase");
    f.sshd.authorize(&locked.with_extension("pub"));
    let o = f.add("locked", &locked);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "the SSH key {} is protected by a passphrase, which the host cannot type",
            locked.display()
        )) && out.contains("ssh-keygen -p -N ''"),
        "{out}"
    );
    assert!(!f.h.data.join("projects/locked").exists());
    let o = f.add("public", &f.key.with_extension("pub"));
    assert!(text(&o).contains("holds a public key"), "{}", text(&o));

    let o = f.add("keyed", &f.key);
    assert!(o.status.success(), "{}", text(&o));
    f.h.start();
    let copy = f.config("keyed").join("id_test");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (r, log) = f.build("keyed");
    assert_eq!(r["status"], "fail", "{log}");
    for t in [&log, r["reason"].as_str().unwrap_or_default()] {
        assert!(
            t.contains(&format!("the SSH key {} has mode 0644", copy.display()))
                && t.contains("chmod 600")
                && t.contains("ssh-key `id_test` of pipeline-config.json")
                && !t.contains("Permission denied"),
            "{t}"
        );
    }

    std::fs::copy(&locked, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (r, log) = f.build("keyed");
    assert_eq!(r["status"], "fail", "{log}");
    assert!(log.contains("is protected by a passphrase"), "{log}");
    assert!(!log.contains("Permission denied"), "{log}");
}

/// A trusted host command's `git pull` over SSH gets the project's key and known_hosts through
/// GIT_SSH_COMMAND. The key is named the described system's way here (its `prepare-build`
/// section), which gives it to the built-in update of master as well.
#[test]
fn a_trusted_host_command_pulls_over_ssh_with_the_key() {
    require_docker();
    let p = pipeline_with(
        json!([stage("show", &["echo version=$(cat version.txt)"])]),
        json!({"prepare-build": {"master-dir-commands": [
            "git pull --ff-only origin main",
            "echo pulled=$(git rev-parse HEAD)"
        ]}}),
    );
    let mut f = Fixture::new(&p);
    let o = f.add("pulls", &f.key);
    assert!(o.status.success(), "{}", text(&o));
    f.h.private_config(
        "pulls",
        json!({"trust-host-commands": true,
               "prepare-build": {"master-dir-commands": {"ssh": {"use": true, "name": "id_test"}}}}),
    );
    f.h.start();
    let c2 = f.push("two");
    let (r, log) = f.build("pulls");
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains(
            "prepare-build.master-dir-commands.ssh (the described system's SSH setup) \
                      gives the key"
        ) && log.contains(&format!("git_hash {c2}"))
            && log.contains(&format!("pulled={c2}")),
        "{log}"
    );
    // The pull itself fetches: a commit pushed after the built-in update, while the first host
    // command waits, is what the build gets.
    let go = f.h.tmp.path().join("go");
    let gate = pipeline_with(
        json!([stage("show", &["echo version=$(cat version.txt)"])]),
        json!({"prepare-build": {"master-dir-commands": [
            format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
            "git pull --ff-only origin main".to_string(),
            "echo pulled=$(git rev-parse HEAD)".to_string()
        ]}}),
    );
    std::fs::write(f.work.join("pipeline.json"), gate).unwrap();
    git(&f.work, &["commit", "-q", "-am", "gate"]);
    git(&f.work, &["push", "-q", "origin", "main"]);
    let name = f.h.build("pulls");
    wait_for("the host command to wait", T, || {
        f.h.log("pulls", &name)
            .contains("host $ while")
            .then_some(())
    });
    let c4 = f.push("four");
    std::fs::write(&go, "").unwrap();
    let r = f.h.wait_status("pulls", &name, T);
    let log = f.h.log("pulls", &name);
    assert_eq!(r["status"], "pass", "{log}");
    assert!(
        log.contains(&format!("pulled={c4}")) && log.contains("version=four"),
        "{log}"
    );
}

/// The described system's blank project template names a key in `prepare-build` that a copied
/// project does not have: the project builds, and the start-up and the build's log say which
/// file and key, and how to fix it.
#[test]
fn a_project_from_the_described_blank_template_builds_with_a_warning() {
    require_docker();
    let mut h = TestHost::new();
    h.project("blank", &pipeline(json!([stage("s", &["echo blank ok"])])));
    // The template's config/pipeline-config.json, as it ships.
    std::fs::write(
        h.data
            .join("projects/blank/master/config/pipeline-config.json"),
        "{\n  \"prepare-build\": {\n    \"master-dir-commands\": {\n      \"ssh\": {\n        \
         \"use\": true,\n        \"name\": \"id.rsa\"\n      }\n    }\n  }\n}",
    )
    .unwrap();
    h.start();
    let name = h.build("blank");
    let r = h.wait_status("blank", &name, T);
    let log = h.log("blank", &name);
    assert_eq!(r["status"], "pass", "{log}");
    let config = h.data.join("projects/blank/master/config");
    let warning = format!(
        "pipeline-config.json: prepare-build.master-dir-commands.ssh (the described system's SSH \
         setup) names the key `id.rsa`, which is not in {}: git and master-dir-commands run \
         without a key. Fix: copy the key to {} (chmod 600)",
        config.display(),
        config.join("id.rsa").display()
    );
    assert!(log.contains(&warning), "{log}");
    assert!(log.contains("blank ok"), "{log}");
    assert!(
        h.host_log().contains(&format!("project blank: {warning}")),
        "{}",
        h.host_log()
    );
}
