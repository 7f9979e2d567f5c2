//! Test harness: a host with its own data directory, started as the real binary, driven
//! through its control socket and command line. Waits are conditions with deadlines.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const IMAGE: &str = "ams-busybox:latest";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_amsbuild")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

static DOCKER: Once = Once::new();

/// Makes sure a Docker engine answers and the test image exists. Fails (never skips) otherwise.
pub fn require_docker() {
    DOCKER.call_once(|| {
        let ok = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "the Docker suite needs a running Docker engine: run scripts/test.sh, which starts one"
        );
        let st = Command::new("bash")
            .arg(repo_root().join("scripts/image.sh"))
            .status()
            .expect("run scripts/image.sh");
        assert!(st.success(), "building the test image failed");
    });
}

/// Polls `f` until it returns Some, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(40));
    }
}

/// A pipeline.json with the test image and the given stages.
pub fn pipeline(stages: Value) -> String {
    pipeline_with(stages, json!({}))
}

/// A pipeline.json whose top level is merged with `extra`.
pub fn pipeline_with(stages: Value, extra: Value) -> String {
    let mut p = json!({
        "docker": {"image": IMAGE, "project-dest": "/root/project",
                   "build-output-dest": "/root/project/Builds", "stop-timeout": 2},
        "pipeline": stages,
        "cleanup": {"remove_build_source": true, "7z_build": true, "7z_hash": "sha1"}
    });
    if let (Some(o), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_string_pretty(&p).unwrap()
}

pub fn stage(name: &str, commands: &[&str]) -> Value {
    json!({"name": name, "commands": commands})
}

pub struct TestHost {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    /// Extra environment for the host process.
    pub env: Vec<(String, String)>,
    /// A command that runs the host (`serve` only), such as `setpriv` with its options.
    pub wrap: Vec<String>,
    child: Option<Child>,
}

impl TestHost {
    pub fn new() -> Self {
        Self::with_conf(json!({}))
    }

    /// A data directory whose web_conf.json holds `conf` (the rest defaults).
    pub fn with_conf(conf: Value) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        // Loopback and a port of the system's choosing, so hosts of parallel tests never clash.
        // A stop stops running builds at once unless a test asks for the grace (its own test
        // in docker.rs): a test ending with builds running does not wait for them.
        let mut full = json!({"webhook_ip": "127.0.0.1", "webhook_port": 0,
                              "web_interface_ip": "127.0.0.1", "web_interface_port": 0,
                              "shutdown_grace_secs": 0});
        for (k, v) in conf.as_object().unwrap() {
            full[k] = v.clone();
        }
        std::fs::write(data.join("web_conf.json"), full.to_string()).unwrap();
        TestHost {
            tmp,
            data,
            env: Vec::new(),
            wrap: Vec::new(),
            child: None,
        }
    }

    pub fn cmd(&self) -> Command {
        self.command_via(&[])
    }

    /// The binary with this data directory, run by `wrap` when it is not empty.
    fn command_via(&self, wrap: &[String]) -> Command {
        let mut c = match wrap.split_first() {
            None => Command::new(bin()),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
        };
        c.arg("--data-dir")
            .arg(&self.data)
            .env_remove("AMSBUILD_HOME");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    pub fn host_log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("host.log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("host.log"))
            .unwrap();
        let child = self
            .command_via(&self.wrap)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(
            "the host to answer on its socket",
            Duration::from_secs(30),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!("the host exited at start ({st}):\n{}", self.host_log());
                    }
                }
                self.try_req(&json!({"cmd": "ping"})).ok()
            },
        );
        // Started means every listener is up, and the last one logs last.
        wait_for("the web listener", Duration::from_secs(30), || {
            self.host_log()
                .contains("web interface listening on ")
                .then_some(())
        });
    }

    /// The webhook listener's address, as the host logged it at start.
    pub fn webhook_addr(&self) -> String {
        let log = self.host_log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("webhooks listening on "))
            .unwrap_or_else(|| panic!("no webhook listener in the host log:\n{log}"));
        let rest = line.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().to_string()
    }

    /// The web interface's address, as the host logged it at start.
    pub fn web_addr(&self) -> String {
        let log = self.host_log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("web interface listening on "))
            .unwrap_or_else(|| panic!("no web listener in the host log:\n{log}"));
        let rest = line.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&mut self, sig: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "host did not exit after {sig}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Sends `sig` to the host without waiting for it to exit.
    pub fn send(&self, sig: &str) {
        let pid = self.pid().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Whether the host process has exited (it is reaped then).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait().unwrap()) {
            Some(Some(_)) => {
                self.child = None;
                true
            }
            Some(None) => false,
            None => true,
        }
    }

    pub fn kill(&mut self) {
        self.signal("-KILL");
    }

    pub fn term(&mut self) {
        self.signal("-TERM");
    }

    pub fn try_req(&self, v: &Value) -> Result<Value, String> {
        let mut s =
            UnixStream::connect(self.data.join("amsbuild.sock")).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{v}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))
    }

    pub fn req(&self, v: Value) -> Value {
        self.try_req(&v).unwrap()
    }

    /// `project init NAME`, then its pipeline.json replaced by `pipeline`.
    pub fn project(&self, name: &str, pipeline: &str) {
        let out = self.cli(&["project", "init", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.source(name).join("pipeline.json"), pipeline).unwrap();
    }

    pub fn source(&self, project: &str) -> PathBuf {
        self.data
            .join("projects")
            .join(project)
            .join("master/project_source")
    }

    pub fn private_config(&self, project: &str, v: Value) {
        let p = self
            .data
            .join("projects")
            .join(project)
            .join("master/config/pipeline-config.json");
        std::fs::write(p, v.to_string()).unwrap();
    }

    /// Queues a build and returns its record.
    pub fn build_with(&self, project: &str, extra: Value) -> Value {
        let mut r = json!({"cmd": "build", "project": project, "actor": "tester"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        let a = self.req(r);
        assert_eq!(a["ok"], true, "{a}");
        a["build"].clone()
    }

    pub fn build(&self, project: &str) -> String {
        self.build_with(project, json!({}))["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn record(&self, project: &str, name: &str) -> Value {
        let a = self.req(json!({"cmd": "builds", "project": project, "limit": 1000}));
        a["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no build {name} in {a}"))
    }

    pub fn wait_status(&self, project: &str, name: &str, timeout: Duration) -> Value {
        wait_for(&format!("build {name} to finish"), timeout, || {
            let r = self.record(project, name);
            let s = r["status"].as_str().unwrap_or("");
            (s != "pending" && s != "running").then_some(r)
        })
    }

    pub fn wait_running(&self, project: &str, name: &str) {
        wait_for(
            &format!("build {name} to run its stage"),
            Duration::from_secs(60),
            || (self.log(project, name).contains("==> stage")).then_some(()),
        );
    }

    pub fn build_dir(&self, project: &str) -> PathBuf {
        self.data.join("projects").join(project).join("builds")
    }

    pub fn log(&self, project: &str, name: &str) -> String {
        std::fs::read_to_string(self.build_dir(project).join(name).join("output.txt"))
            .unwrap_or_default()
    }

    pub fn host_id(&self) -> String {
        std::fs::read_to_string(self.data.join("host-id")).unwrap_or_default()
    }

    /// Containers of this host, running or not.
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "ps",
                "-a",
                "-q",
                "--filter",
                &format!("label=io.ams-build.host={}", self.host_id()),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A host killed mid-build leaves its builds' overlay mounts (its next start would sweep
        // them); the test's folder goes away instead, so they are detached here, or they pile
        // up in the machine's mount table and slow every mount after them.
        let root = self.tmp.path().to_string_lossy().to_string();
        if let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") {
            for point in table.lines().filter_map(|l| l.split(' ').nth(4)) {
                if point.starts_with(&format!("{root}/")) {
                    let _ = Command::new("umount").args(["-l", point]).output();
                }
            }
        }
        let id = self.host_id();
        if !id.is_empty() {
            let out = Command::new("docker")
                .args([
                    "ps",
                    "-a",
                    "-q",
                    "--filter",
                    &format!("label=io.ams-build.host={id}"),
                ])
                .output();
            if let Ok(o) = out {
                for c in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", c]).output();
                }
            }
        }
    }
}

/// A raw HTTP/1.1 request; returns the status and the JSON body (Null if not JSON).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Value) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A raw HTTP/1.1 GET; returns the status, the header block (lower-cased) and the body bytes.
pub fn http_raw(addr: &str, path: &str, headers: &[(&str, String)]) -> (u16, String, Vec<u8>) {
    http_full(addr, "GET", path, headers, b"")
}

/// Any raw HTTP/1.1 request; returns the status, the header block (lower-cased) and the body.
pub fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    payload: &[u8],
) -> (u16, String, Vec<u8>) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(s, addr, method, path, headers, payload)
}

/// A TCP connection to `addr` from the loopback address `src` (any of 127.0.0.0/8), so that a
/// test can be a client the host tells apart from 127.0.0.1.
pub fn connect_from(src: &str, addr: &str) -> std::net::TcpStream {
    let to: std::net::SocketAddr = addr.parse().unwrap();
    let from = std::net::SocketAddr::new(src.parse().unwrap(), 0);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(10))
        .unwrap();
    s.into()
}

/// Any raw HTTP/1.1 request from the loopback address `src`, answered within `within`
/// (a status of 0 when it was not).
pub fn http_from(
    src: &str,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    payload: &[u8],
    within: Duration,
) -> (u16, String, Vec<u8>) {
    let s = connect_from(src, addr);
    s.set_read_timeout(Some(within)).unwrap();
    exchange(s, addr, method, path, headers, payload)
}

/// One request and its whole answer over any stream (plain TCP or TLS).
pub fn exchange<S: std::io::Read + Write>(
    mut s: S,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    payload: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        payload.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(payload);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = out.get(split + 4..).unwrap_or_default().to_vec();
    if head.contains("transfer-encoding: chunked") {
        // Undo chunked encoding.
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            plain.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = plain;
    }
    (status, head, body)
}

/// Runs the CLI with `input` on its standard input and asserts it succeeds.
pub fn cli_with_stdin(h: &TestHost, args: &[&str], input: &str) {
    let mut c = h
        .cmd()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "amsbuild {args:?}");
}

/// Adds a user through the CLI, the password on stdin.
pub fn add_user(h: &TestHost, name: &str, level: &str, projects: &str, pw: &str) {
    let args = [
        "user",
        "add",
        name,
        "--level",
        level,
        "--projects",
        projects,
        "--password-stdin",
    ];
    cli_with_stdin(h, &args, &format!("{pw}\n"));
}

/// Sets a user's password through the CLI (`user passwd --password-stdin`).
pub fn set_password(h: &TestHost, name: &str, pw: &str) {
    let args = ["user", "passwd", name, "--password-stdin"];
    cli_with_stdin(h, &args, &format!("{pw}\n"));
}

/// Percent-encodes everything but unreserved characters (for paths, queries and forms).
pub fn urlenc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An application/x-www-form-urlencoded body.
pub fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", urlenc(v)))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes()
}

/// The `name=value` of a response's first Set-Cookie.
/// Logs `user` in on the web interface at `addr`; the session cookie (`name=value`).
pub fn web_login(addr: &str, user: &str, pw: &str) -> String {
    let (st, head, _) = http_full(
        addr,
        "POST",
        "/ams-build/login",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )],
        &form(&[("username", user), ("password", pw)]),
    );
    assert_eq!(st, 303, "login of {user}: {head}");
    set_cookie(&head)
}

pub fn set_cookie(head: &str) -> String {
    let line = head
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .expect("a cookie");
    line["set-cookie:".len()..]
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A webhook payload from the repository's own `tests/fixtures/webhooks/`, as stored (the
/// tests sign these exact bytes).
pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/webhooks")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs git in `dir` with a test identity; fails the test when git fails.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args(["-c", "user.email=t@example.com", "-c", "user.name=T"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `sha256=<hex>`: the HMAC-SHA256 signature of `body` under `secret`, as GitHub sends it.
pub fn sign_with(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    let bytes = m.finalize().into_bytes();
    format!(
        "sha256={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// A loopback HTTP receiver that answers every request 204 and keeps each request's body.
pub fn body_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            g.lock().unwrap().push(body);
            let _ = s.write_all(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (addr, got)
}

/// Adds project `name` from the git repository at `repo`, building its `main` branch.
/// A git repository made at `repo` on branch `main` with `files` (name, content) in one first
/// commit, "one"; returns that commit.
pub fn git_repo(repo: &std::path::Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(repo).unwrap();
    git(repo, &["init", "-q", "-b", "main"]);
    for (name, content) in files {
        std::fs::write(repo.join(name), content).unwrap();
    }
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
    git(repo, &["rev-parse", "HEAD"])
}

pub fn add_git_project(h: &TestHost, name: &str, repo: &std::path::Path) {
    let o = h.cli(&[
        "project",
        "add",
        name,
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "main",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A new API token of `user`.
pub fn api_token(h: &TestHost, user: &str) -> String {
    let o = h.cli(&["token", "create", "--user", user]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
