//! Per-project secrets through real builds in Docker: a stage that prints its secret every way
//! it can (plain, on stderr, base64, hex, URL-encoded, split across writes and across the log's
//! 64 KiB pieces) leaves no trace of it in the live log, the stored log, the log download or
//! the host's own log; builds of branches outside `secret-branches` get nothing; an unknown
//! name fails with the fix; values are write-only and sealed at rest; only ADMINs manage them,
//! forms need CSRF; notifications are masked; a lost key is a clear error.

use crate::harness::*;
use crate::web::{sse, Web};
use serde_json::{json, Value};
use std::time::Duration;

const PW: &str = "correct horse battery";

/// A value that every encoding changes: `/`, `+`, `@`, a space, `&`, quotes and `=`.
const VALUE: &str = "s3cr3t/V@lue+with space&\"q\"=1";

fn b64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() {
                alphabet[((n >> shift) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// The value and every encoding of it the stages print, as a reader would search for them.
fn encodings(v: &str) -> Vec<String> {
    let std = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let url = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let hex: String = v.bytes().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![
        v.to_string(),
        b64(v.as_bytes(), std),
        b64(v.as_bytes(), url),
        hex.clone(),
        hex.to_uppercase(),
        urlenc(v),
        serde_json::to_string(v)
            .unwrap()
            .trim_matches('"')
            .to_string(),
    ];
    for padded in [b64(v.as_bytes(), std), b64(v.as_bytes(), url)] {
        out.push(padded.trim_end_matches('=').to_string());
    }
    out
}

/// Panics when `text` holds the value or any of its encodings.
fn assert_clean(what: &str, text: &str) {
    for e in encodings(VALUE) {
        assert!(
            !text.contains(&e),
            "{what} shows the secret (as {e:?}):\n{}",
            &text[text.find(&e).unwrap().saturating_sub(200)..]
                .chars()
                .take(600)
                .collect::<String>()
        );
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `amsbuild secret set PROJECT NAME` with the value on standard input; the output.
fn set_secret(h: &TestHost, project: &str, name: &str, value: &str) -> std::process::Output {
    use std::io::Write;
    let mut c = h
        .cmd()
        .args(["secret", "set", project, name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(value.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

fn token(h: &TestHost, user: &str) -> String {
    let o = h.cli(&["token", "create", "--user", user]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn api(addr: &str, tok: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    http(
        addr,
        method,
        &format!("/ams-build/api{path}"),
        &[
            ("Authorization", format!("Bearer {tok}")),
            ("Content-Type", "application/json".into()),
        ],
        body,
    )
}

/// The stage that prints the secret in every way; the first command lets the test look at the
/// container while it runs.
fn leaky_stages() -> Value {
    let url_encode = r#"s="$S"; out=""; while [ -n "$s" ]; do r="${s#?}"; c="${s%"$r"}"; s="$r"; case "$c" in [a-zA-Z0-9.~_-]) out="$out$c";; *) out="$out$(printf '%%%02X' "'$c")";; esac; done; echo "url $out""#;
    json!([
        stage("leak", &[
            "touch /root/project/Builds/ready; i=0; while [ ! -e /root/project/Builds/go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done",
            r#"echo "sha $(printf %s "$S" | sha256sum | cut -d' ' -f1)""#,
            r#"echo "plain $S""#,
            r#"echo "stderr $S" >&2"#,
            r#"echo "b64 $(printf %s "$S" | base64)""#,
            r#"echo "b64url $(printf %s "$S" | base64 | tr '+/' '-_' | tr -d '=')""#,
            r#"echo "hex $(printf %s "$S" | xxd -p | tr -d '\n')""#,
            r#"echo "HEX $(printf %s "$S" | xxd -p | tr -d '\n' | tr a-f A-F)""#,
            url_encode,
            // Two writes, the second after the first was read.
            r#"a="${S%????}"; printf 'split %s' "$a"; sleep 0.3; printf '%s\n' "${S#"$a"}""#,
            // A line cut into the log's 64 KiB pieces inside the value, at several places:
            // the first piece ends with the value's first k bytes, the rest comes in a later
            // write.
            r#"for k in 1 4 11 20 28; do head -c $((65536 - k)) /dev/zero | tr '\0' x; printf %s "$S" | head -c $k; sleep 0.3; printf '%s\n' "$(printf %s "$S" | tail -c +$((k + 1)))"; done"#,
            "echo done",
        ]),
        // The secret as the last line of a stage that compares it (the host quotes it).
        json!({"name": "last-line", "commands": [r#"echo "$S""#], "exit-line": "never"}),
    ])
}

/// A stage prints its secret in every way it can; the live log (the command line's follower
/// and the build page's stream), the stored log, the log download, the API's record, the host's
/// own log and the container's labels never show it or an encoding of it, while the stage did
/// get the right value (its SHA-256 is printed) and the engine holds it only in the
/// container's environment.
#[test]
fn a_stage_that_prints_its_secret_every_way_shows_only_masks() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(leaky_stages(), json!({"secrets": ["S"]})),
    );
    h.private_config("app", json!({"secret-branches": ["*"]}));
    let o = set_secret(&h, "app", "S", VALUE);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    add_user(&h, "boss", "4", "app", PW);
    let tok = token(&h, "boss");
    h.start();
    let addr = h.web_addr();
    let w = Web { h, addr };
    let cookie = w.session("boss", PW);

    let name = w.h.build("app");
    // Two live followers from the start: the command line and the build page's stream.
    let follower =
        w.h.cmd()
            .args(["log", &name])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let (addr2, path, c2) = (
        w.addr.clone(),
        format!("/ams-build/build/app/{name}/stream"),
        cookie.clone(),
    );
    let page_stream = std::thread::spawn(move || sse(&addr2, &path, &c2, Duration::from_secs(120)));

    // While the stage waits: the engine has the value in the environment only.
    let out = w.h.build_dir("app").join(&name).join("build");
    wait_for("the stage to start", Duration::from_secs(60), || {
        out.join("ready").exists().then_some(())
    });
    let ids = w.h.containers();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let inspect = |what: &str| {
        let o = std::process::Command::new("docker")
            .args(["inspect", "--format", what, &ids[0]])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert_clean(
        "the container's labels",
        &inspect("{{json .Config.Labels}}"),
    );
    assert!(
        inspect("{{json .Config.Env}}").contains("S=s3cr3t/V@lue"),
        "the stages get the secret in their environment (which docker inspect shows)"
    );
    std::fs::write(out.join("go"), "").unwrap();

    let rec = w.h.wait_status("app", &name, Duration::from_secs(180));
    assert_eq!(rec["status"], "warn", "{rec}");
    let followed = follower.wait_with_output().unwrap();
    let followed = String::from_utf8_lossy(&followed.stdout).to_string();
    let (streamed, end) = page_stream.join().unwrap();
    assert_eq!(end.as_deref(), Some("warn"));
    let stored = w.h.log("app", &name);
    let (st, _, downloaded) = http_raw(
        &w.addr,
        &format!("/ams-build/output/app/{name}"),
        &[("Authorization", format!("Bearer {tok}"))],
    );
    assert_eq!(st, 200);
    let downloaded = String::from_utf8_lossy(&downloaded).to_string();
    let (_, record) = api(&w.addr, &tok, "GET", "/projects/name/app/builds", b"");

    for (what, text) in [
        ("the stored log", &stored),
        ("the command line's live log", &followed),
        ("the build page's live log", &streamed),
        ("the log download", &downloaded),
    ] {
        assert_clean(what, text);
        // The stage ran with the right value, and each print became a mask.
        assert!(
            text.contains(&format!("sha {}", sha256_hex(VALUE))),
            "{what}"
        );
        for masked in [
            "plain ***\n",
            "stderr ***\n",
            "b64 ***",
            "b64url ***\n",
            "hex ***\n",
            "HEX ***\n",
            "url ***\n",
            "split ***\n",
            "last line \"***\"",
            "secrets for the stages, as environment variables (masked in this log): S",
        ] {
            assert!(text.contains(masked), "{what} lacks {masked:?}");
        }
        assert_eq!(
            text.matches("xxxxxxxx***\n").count(),
            5,
            "{what}: each value cut by a 64 KiB piece is one mask"
        );
    }
    assert_eq!(followed, stored, "the follower saw exactly the stored log");
    assert_clean("the API's build list", &record.to_string());
    assert_clean("the host's own log", &w.h.host_log());
}

/// A git project whose secrets go to `main` and `release/*` only.
fn branches_project(h: &TestHost) -> (String, String) {
    let repo = h.tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("pipeline.json"),
        pipeline_with(
            json!([stage("s", &[r#"echo "value ${S:-unset}""#])]),
            json!({"secrets": ["S"]}),
        ),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let on_main = git(&repo, &["rev-parse", "HEAD"]);
    for b in ["feature", "release/1.0"] {
        git(&repo, &["checkout", "-q", "-b", b, "main"]);
        std::fs::write(repo.join(b.replace('/', "-")), b).unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", b]);
    }
    git(&repo, &["checkout", "-q", "feature"]);
    let on_feature = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-q", "main"]);
    let o = h.cli(&["project", "add", "app", "--git", repo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h.private_config(
        "app",
        json!({"secret-branches": ["main", "release/*"], "branch": "main"}),
    );
    (on_main, on_feature)
}

/// Builds of branches outside `secret-branches` get no secret (the stage sees the variable
/// unset) and the log says why in one line: another branch, a commit by itself, and a
/// commit of another branch passed off as `main`'s. Allowed branches get it, masked.
#[test]
fn only_builds_of_the_allowed_branches_get_secrets() {
    require_docker();
    let mut h = TestHost::new();
    let (on_main, on_feature) = branches_project(&h);
    assert!(set_secret(&h, "app", "S", VALUE).status.success());
    h.start();
    let run = |extra: Value| {
        let name = h.build_with("app", extra)["name"]
            .as_str()
            .unwrap()
            .to_string();
        let rec = h.wait_status("app", &name, Duration::from_secs(120));
        assert_eq!(rec["status"], "pass", "{rec}: {}", h.log("app", &name));
        let log = h.log("app", &name);
        assert_clean("a build's log", &log);
        log
    };
    for extra in [
        json!({"branch": "main"}),
        json!({"branch": "release/1.0"}),
        json!({}),
        json!({"branch": "main", "commit": on_main}),
    ] {
        let log = run(extra.clone());
        assert!(log.contains("value ***\n"), "{extra}: {log}");
        assert!(!log.contains("withheld"), "{extra}: {log}");
    }
    for (extra, why) in [
        (
            json!({"branch": "feature"}),
            "branch feature is not in pipeline-config.json's secret-branches [\"main\", \"release/*\"]",
        ),
        (json!({"commit": on_main}), "the build is of no named branch"),
        (
            json!({"branch": "main", "commit": on_feature}),
            "is not on branch main",
        ),
    ] {
        let log = run(extra.clone());
        assert!(log.contains("value unset\n"), "{extra}: {log}");
        let withheld: Vec<&str> = log.lines().filter(|l| l.contains("withheld")).collect();
        assert_eq!(withheld.len(), 1, "{extra}: {log}");
        assert!(
            withheld[0].contains(why) && withheld[0].contains("the stages run without S"),
            "{extra}: {}",
            withheld[0]
        );
    }
    // With no secret-branches at all, nothing gets them.
    h.private_config("app", json!({"branch": "main"}));
    let log = run(json!({"branch": "main"}));
    assert!(log.contains("value unset\n") && log.contains("lists no \"secret-branches\""));
}

/// A pipeline asking for a secret the project does not have fails (FAIL, the project's
/// doing) with a message naming the secret and the command that sets it.
#[test]
fn an_unknown_secret_fails_the_build_with_the_fix() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage("s", &["echo should not run"])]),
            json!({"secrets": ["NOPE"]}),
        ),
    );
    h.private_config("app", json!({"secret-branches": ["*"]}));
    h.start();
    let name = h.build("app");
    let rec = h.wait_status("app", &name, Duration::from_secs(60));
    assert_eq!(rec["status"], "fail", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("no secret named NOPE") && reason.contains("amsbuild secret set app NOPE"),
        "{reason}"
    );
    let log = h.log("app", &name);
    assert!(log.contains("amsbuild secret set app NOPE"), "{log}");
    assert!(!log.contains("should not run\n"), "{log}");
}

/// Short values and bad names are refused with the reason, on the command line, the API and
/// the admin page. Set values never come back: not from `secret list`, any API path or any
/// page (each answer is searched for the value and its encodings, also after a build that
/// used it), and the database file holds them only sealed, under a 0600 key.
#[test]
fn values_are_write_only_and_sealed_at_rest() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage("s", &[r#"echo "got $S""#])]),
            json!({"secrets": ["S"]}),
        ),
    );
    h.private_config("app", json!({"secret-branches": ["*"]}));
    add_user(&h, "boss", "4", "app", PW);
    // The command line refuses a short value with the reason, and a bad name.
    let o = set_secret(&h, "app", "S", "1234567");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("too short to mask safely"), "{err}");
    let o = set_secret(&h, "app", "bad-name", VALUE);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a secret name"));
    assert!(!h.data.join("secrets.key").exists(), "nothing was stored");
    let o = set_secret(&h, "app", "S", &format!("{VALUE}\n"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).contains(VALUE));
    let key = h.data.join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let list = String::from_utf8_lossy(&h.cli(&["secret", "list", "app"]).stdout).to_string();
    assert!(list.starts_with("S ") && list.contains("(cli)"), "{list}");
    assert_clean("secret list", &list);

    let tok = token(&h, "boss");
    h.start();
    let addr = h.web_addr();
    let w = Web { h, addr };
    // The API refuses a short value with the reason; sets, replaces and removes.
    let (st, v) = api(
        &w.addr,
        &tok,
        "PUT",
        "/projects/name/app/secrets/OTHER",
        br#"{"value": "short"}"#,
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("too short to mask"),
        "{v}"
    );
    let (st, v) = api(
        &w.addr,
        &tok,
        "PUT",
        "/projects/name/app/secrets/OTHER",
        b"not json",
    );
    assert_eq!(st, 400, "{v}");
    let body = json!({"value": VALUE}).to_string();
    let (st, v) = api(
        &w.addr,
        &tok,
        "PUT",
        "/projects/name/app/secrets/OTHER",
        body.as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["name"], "OTHER");
    assert_eq!(v["set_by"], "boss");
    assert_clean("the PUT answer", &v.to_string());
    let (st, v) = api(&w.addr, &tok, "GET", "/projects/name/app/secrets", b"");
    assert_eq!(st, 200);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["OTHER", "S"]);
    for s in v.as_array().unwrap() {
        let mut keys: Vec<&String> = s.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["name", "set_at", "set_by"], "names only: {s}");
    }
    let (st, _) = api(
        &w.addr,
        &tok,
        "DELETE",
        "/projects/name/app/secrets/OTHER",
        b"",
    );
    assert_eq!(st, 200);
    let (st, _) = api(
        &w.addr,
        &tok,
        "DELETE",
        "/projects/name/app/secrets/OTHER",
        b"",
    );
    assert_eq!(st, 404);
    // The admin page's form refuses a short value with the reason.
    let cookie = w.session("boss", PW);
    let (st, _, page) = w.post_form(
        "/ams-build/admin/app/secrets",
        &cookie,
        &[("name", "FORM"), ("value", "short")],
    );
    assert_eq!(st, 400);
    assert!(page.contains("too short to mask"), "{page}");

    // A build uses the value, so every page about it could show it.
    let name = w.h.build("app");
    let rec = w.h.wait_status("app", &name, Duration::from_secs(60));
    assert_eq!(rec["status"], "pass", "{rec}");
    assert!(w.h.log("app", &name).contains("got ***\n"));

    // Every API path of the document, and every page.
    let (_, doc) = http(&w.addr, "GET", "/ams-build/api/openapi.json", &[], b"");
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if ops.get("get").is_none() {
            continue;
        }
        let p = path
            .replace("{name}", "app")
            .replace("{list}", "active")
            .replace("{build}", &name);
        let (st, _, body) = http_raw(
            &w.addr,
            &format!("/ams-build/api{p}"),
            &[("Authorization", format!("Bearer {tok}"))],
        );
        assert!(st < 500, "{p}: {st}");
        assert_clean(&format!("GET {p}"), &String::from_utf8_lossy(&body));
    }
    for p in [
        "/ams-build/".to_string(),
        "/ams-build/panels".into(),
        "/ams-build/admin/app".into(),
        "/ams-build/account".into(),
        "/ams-build/users".into(),
        format!("/ams-build/build/app/{name}"),
        format!("/ams-build/build/app/{name}/stages"),
        format!(
            "/ams-build/build/app/{name}/log?before={}",
            w.h.log("app", &name).len()
        ),
        format!("/ams-build/output/app/{name}"),
    ] {
        let (st, _, body) = w.get(&p, &cookie);
        assert_eq!(st, 200, "{p}");
        assert_clean(&p, &body);
    }
    let (_, _, admin) = w.get("/ams-build/admin/app", &cookie);
    assert!(
        admin.contains("<code>S</code>") && admin.contains("Set secret"),
        "{admin}"
    );

    // At rest: the database and its journal hold no trace of the value.
    for f in ["ams.db", "ams.db-wal"] {
        let bytes = std::fs::read(w.h.data.join(f)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert_clean(f, &text);
        assert!(
            !bytes.windows(VALUE.len()).any(|x| x == VALUE.as_bytes()),
            "{f}"
        );
    }
}

/// Only ADMIN (of the project) and SERVER ADMIN set, list and remove secrets, in the API and on
/// the admin page; a user of another project does not see that the project exists; forms
/// need the session's CSRF token and our Origin. Then a build shows that a refused change
/// changed nothing.
#[test]
fn only_admins_manage_secrets_and_forms_need_csrf() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage("s", &[r#"echo "value ${FORM:-unset}""#])]),
            json!({"secrets": ["FORM"]}),
        ),
    );
    h.project("other", &pipeline(json!([stage("s", &["true"])])));
    h.private_config("app", json!({"secret-branches": ["*"]}));
    let mut toks = std::collections::HashMap::new();
    for (user, level, projects) in [
        ("u_user", "1", "app"),
        ("u_mod", "3", "app"),
        ("u_admin", "4", "app"),
        ("u_stranger", "4", "other"),
        ("u_server", "5", ""),
    ] {
        add_user(&h, user, level, projects, PW);
        toks.insert(user, token(&h, user));
    }
    h.start();
    let addr = h.web_addr();
    let w = Web { h, addr };
    let body = json!({"value": VALUE}).to_string();
    for (user, want) in [
        ("u_user", 403),
        ("u_mod", 403),
        ("u_stranger", 404),
        ("u_admin", 200),
        ("u_server", 200),
    ] {
        let t = &toks[user];
        let (st, v) = api(
            &w.addr,
            t,
            "PUT",
            "/projects/name/app/secrets/S",
            body.as_bytes(),
        );
        assert_eq!(st, want, "{user} PUT: {v}");
        let (st, v) = api(&w.addr, t, "GET", "/projects/name/app/secrets", b"");
        assert_eq!(st, want, "{user} GET: {v}");
        let (st, v) = api(&w.addr, t, "DELETE", "/projects/name/app/secrets/S", b"");
        assert_eq!(st, want, "{user} DELETE: {v}");
    }
    let (st, _) = http(
        &w.addr,
        "GET",
        "/ams-build/api/projects/name/app/secrets",
        &[],
        b"",
    );
    assert_eq!(st, 401);

    // Forms: an ADMIN without the CSRF token, or from another origin, changes nothing.
    let admin = w.session("u_admin", PW);
    let post = |cookie: &str, fields: &[(&str, &str)], origin: &str| {
        let (st, _, _) = http_full(
            &w.addr,
            "POST",
            "/ams-build/admin/app/secrets",
            &[
                ("Cookie", cookie.to_string()),
                ("Content-Type", "application/x-www-form-urlencoded".into()),
                ("Origin", origin.to_string()),
            ],
            &form(fields),
        );
        st
    };
    let ours = format!("http://{}", w.addr);
    let csrf = w.csrf(&admin);
    assert_eq!(
        post(&admin, &[("name", "FORM"), ("value", VALUE)], &ours),
        403
    );
    assert_eq!(
        post(
            &admin,
            &[
                ("csrf", "0".repeat(64).as_str()),
                ("name", "FORM"),
                ("value", VALUE)
            ],
            &ours
        ),
        403
    );
    assert_eq!(
        post(
            &admin,
            &[("csrf", csrf.as_str()), ("name", "FORM"), ("value", VALUE)],
            "http://evil.example"
        ),
        403
    );
    // A MODERATOR with a valid token is refused; a USER does not get the page.
    let moderator = w.session("u_mod", PW);
    let (st, _, _) = w.post_form(
        "/ams-build/admin/app/secrets",
        &moderator,
        &[("name", "FORM"), ("value", VALUE)],
    );
    assert_eq!(st, 403);
    let user = w.session("u_user", PW);
    assert_eq!(w.get("/ams-build/admin/app", &user).0, 403);
    let (_, v) = api(
        &w.addr,
        &toks["u_admin"],
        "GET",
        "/projects/name/app/secrets",
        b"",
    );
    assert_eq!(v, json!([]), "no refused request set anything");

    // The ADMIN's form with its token sets, and removes.
    let (st, head, _) = w.post_form(
        "/ams-build/admin/app/secrets",
        &admin,
        &[("name", "FORM"), ("value", VALUE)],
    );
    assert_eq!(st, 303, "{head}");
    let (_, _, page) = w.get("/ams-build/admin/app", &admin);
    assert!(page.contains("<code>FORM</code>"));
    assert_clean("the admin page", &page);
    let remove = |cookie: &str, csrf: Option<&str>| {
        let mut fields = vec![];
        if let Some(c) = csrf {
            fields.push(("csrf", c));
        }
        let (st, _, _) = http_full(
            &w.addr,
            "POST",
            "/ams-build/admin/app/secrets/FORM/remove",
            &[
                ("Cookie", cookie.to_string()),
                ("Content-Type", "application/x-www-form-urlencoded".into()),
                ("Origin", ours.clone()),
            ],
            &form(&fields),
        );
        st
    };
    assert_eq!(remove(&admin, None), 403);
    let mod_csrf = w.csrf(&moderator);
    assert_eq!(remove(&moderator, Some(&mod_csrf)), 403);
    // The secret survived the refused removals: a build of the project gets it.
    let name = w.h.build("app");
    w.h.wait_status("app", &name, Duration::from_secs(60));
    assert!(w.h.log("app", &name).contains("value ***\n"));
    assert_eq!(remove(&admin, Some(&csrf)), 303);
    let (_, v) = api(
        &w.addr,
        &toks["u_admin"],
        "GET",
        "/projects/name/app/secrets",
        b"",
    );
    assert_eq!(v, json!([]));
}

/// Notifications carry no secret: a commit message holding the value (a build's record and
/// its JSON hook both show commit messages) arrives masked, in the record too.
#[test]
fn notifications_and_records_are_masked() {
    require_docker();
    let (hook_addr, got) = body_receiver();
    let mut h = TestHost::with_conf(json!({"notify_allow_private": true}));
    let repo = h.tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("pipeline.json"),
        pipeline_with(json!([stage("s", &["echo hi"])]), json!({"secrets": ["S"]})),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(
        &repo,
        &["commit", "-q", "-m", &format!("deploy with {VALUE} oops")],
    );
    let o = h.cli(&["project", "add", "app", "--git", repo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h.private_config(
        "app",
        json!({"secret-branches": ["main"], "branch": "main"}),
    );
    std::fs::write(
        h.data.join("projects/app/master/config/webhooks.json"),
        json!({"in-webhooks": [], "out-webhooks": [
            {"hook-name": "j", "type": "json", "trigger": ["build-complete"],
             "url": format!("http://{hook_addr}/hook")}]})
        .to_string(),
    )
    .unwrap();
    assert!(set_secret(&h, "app", "S", VALUE).status.success());
    h.start();
    let name = h.build("app");
    let rec = h.wait_status("app", &name, Duration::from_secs(120));
    assert_eq!(rec["status"], "pass", "{rec}");
    let body = wait_for("the JSON hook", Duration::from_secs(60), || {
        got.lock().unwrap().first().cloned()
    });
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["build"]["commit_message"], "deploy with *** oops", "{v}");
    assert_clean("the hook's body", &String::from_utf8_lossy(&body));
    assert_clean(
        "the hook's strings",
        &v["build"]["commit_message"].to_string(),
    );
    let a = h.req(json!({"cmd": "builds", "project": "app", "limit": 1}));
    assert_eq!(
        a["builds"][0]["commit_message"], "deploy with *** oops",
        "{a}"
    );
}

/// A lost key is an error, never an empty value: a build that asks for secrets ends ERROR with
/// the reason, and setting another secret does not make a new key that would orphan the
/// stored ones.
#[test]
fn a_lost_key_fails_builds_clearly() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage("s", &[r#"echo "value ${S:-unset}""#])]),
            json!({"secrets": ["S"]}),
        ),
    );
    h.private_config("app", json!({"secret-branches": ["*"]}));
    assert!(set_secret(&h, "app", "S", VALUE).status.success());
    std::fs::remove_file(h.data.join("secrets.key")).unwrap();
    h.start();
    assert!(
        h.host_log()
            .contains("secrets.key is missing, but the database holds 1 secret"),
        "{}",
        h.host_log()
    );
    let name = h.build("app");
    let rec = h.wait_status("app", &name, Duration::from_secs(60));
    assert_eq!(rec["status"], "error", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("secrets.key is missing"),
        "{rec}"
    );
    assert!(
        !h.log("app", &name).contains("value unset"),
        "the stages never ran"
    );
    let o = set_secret(&h, "app", "OTHER", VALUE);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is missing"));
    assert!(!h.data.join("secrets.key").exists());
}

/// A build with secrets that leaves one in its cache (as tools that store credentials do)
/// does not hand it to a build without secrets, which would otherwise restore the default
/// branch's cache: the two keep their entries apart.
#[test]
fn caches_of_builds_with_secrets_never_reach_builds_without() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage(
                "s",
                &[
                    "cat /root/.cache/dep/state 2>/dev/null || echo state=empty",
                    r#"echo "state=${S:-nosecret}" > /root/.cache/dep/state"#,
                ]
            )]),
            json!({"secrets": ["S"], "caches": [{"key": "dep", "path": "/root/.cache/dep"}]}),
        ),
    );
    h.private_config(
        "app",
        json!({"secret-branches": ["main"], "branch": "main"}),
    );
    assert!(set_secret(&h, "app", "S", VALUE).status.success());
    h.start();
    let run = |extra: Value| {
        let name = h.build_with("app", extra)["name"]
            .as_str()
            .unwrap()
            .to_string();
        let rec = h.wait_status("app", &name, Duration::from_secs(120));
        assert_eq!(rec["status"], "pass", "{rec}");
        let log = h.log("app", &name);
        assert_clean("a build's log", &log);
        log
    };
    let log = run(json!({}));
    assert!(
        log.contains("secrets for the stages") && log.contains("state=empty\n"),
        "{log}"
    );
    // The default branch's entry now holds the value; a branch without secrets does not get it.
    let log = run(json!({"branch": "topic"}));
    assert!(
        log.contains("secrets withheld") && log.contains("state=empty\n"),
        "{log}"
    );
    // The default branch's builds with secrets still restore their own entry.
    let log = run(json!({}));
    assert!(log.contains("state=***\n"), "{log}");
    // And the plain entries never held a value.
    let plain = run(json!({"branch": "topic"}));
    assert!(plain.contains("state=nosecret\n"), "{plain}");
}
