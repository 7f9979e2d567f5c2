//! A real browser: headless Chromium driven over WebDriver (Debian's chromium-driver). It logs
//! in, triggers a build, watches the live log reach PASS without a reload, and downloads the 7z.

use crate::harness::*;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver request. chromedriver keeps connections open, so the answer is read by its
/// Content-Length rather than to the end of the stream.
fn wd(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).unwrap();
    (status, serde_json::from_slice(&buf).unwrap_or(Value::Null))
}

struct Driver {
    child: Child,
    addr: String,
    session: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) is installed; run scripts/setup.sh");
        let addr = format!("127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        });
        // No network here: keep Chromium from reaching for Google's services.
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "pageLoadStrategy": "eager",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-background-networking", "--disable-sync",
                         "--disable-component-update", "--disable-default-apps", "--disable-extensions",
                         "--no-proxy-server", "--dns-prefetch-disable"]}}}});
        let (st, v) = wd(&addr, "POST", "/session", &caps.to_string());
        assert_eq!(st, 200, "new session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Driver {
            child,
            addr,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let (st, v) = wd(
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            &body.to_string(),
        );
        assert_eq!(st, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url}));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn try_text(&self, css: &str) -> Option<String> {
        let (st, v) = wd(
            &self.addr,
            "POST",
            &format!("/session/{}/element", self.session),
            &json!({"using": "css selector", "value": css}).to_string(),
        );
        if st != 200 {
            return None;
        }
        let id = v["value"][ELEMENT].as_str()?.to_string();
        // Live panels may replace the element between the two calls: that is "not yet".
        let (st, v) = wd(
            &self.addr,
            "GET",
            &format!("/session/{}/element/{id}/text", self.session),
            "",
        );
        if st != 200 {
            return None;
        }
        v["value"].as_str().map(str::to_string)
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        );
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    fn script_async(&self, js: &str) -> Value {
        self.call("POST", "/execute/async", json!({"script": js, "args": []}))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = wd(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            "",
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_browser_logs_in_triggers_a_build_watches_it_pass_live_and_downloads_the_7z() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "demo",
        &pipeline(json!([stage(
            "s",
            &[
                "echo starting",
                "sleep 3",
                "echo made > Builds/out.txt",
                "echo finished-ok"
            ]
        )])),
    );
    {
        use std::io::Write;
        let mut c = h
            .cmd()
            .args([
                "user",
                "add",
                "carol",
                "--level",
                "3",
                "--projects",
                "demo",
                "--password-stdin",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(b"correct horse battery\n")
            .unwrap();
        assert!(c.wait().unwrap().success());
    }
    h.start();
    let web = format!("http://{}/ams-build", h.web_addr());
    let d = Driver::start();
    d.go(&format!("{web}/login"));
    d.type_into("input[name=username]", "carol");
    d.type_into("input[name=password]", "correct horse battery");
    d.click("button[type=submit]");
    wait_for("the dashboard", Duration::from_secs(30), || {
        d.try_text("#trigger-demo").map(|_| ())
    });
    d.click("#trigger-demo");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if d.try_text("#status")
            .is_some_and(|s| s == "RUNNING" || s == "PENDING")
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let src = d.call("GET", "/source", json!({}));
            let url = d.call("GET", "/url", json!({}));
            panic!(
                "no running build page at {url}:\n{}",
                src.as_str()
                    .unwrap_or("")
                    .chars()
                    .take(3000)
                    .collect::<String>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mark this page: if it were reloaded, the mark would be gone.
    d.script("window.amsMark = 42; return 1;");
    assert!(
        d.try_text("#cancel").is_some(),
        "a running build offers Cancel"
    );
    // The stage shows up while it runs, with its live duration.
    wait_for("the running stage, live", Duration::from_secs(60), || {
        d.try_text("#stage-rows")
            .filter(|t| t.contains("RUNNING"))
            .map(|_| ())
    });
    wait_for("the build to pass, live", Duration::from_secs(90), || {
        d.try_text("#status").filter(|s| s == "PASS").map(|_| ())
    });
    // Without a reload: the record's stages, the buttons of a finished build, the archive
    // link, and the status in the title and the favicon.
    wait_for(
        "the finished build's buttons",
        Duration::from_secs(30),
        || d.try_text("#rebuild").map(|_| ()),
    );
    assert!(
        d.try_text("#cancel").is_none(),
        "a finished build never offers Cancel"
    );
    assert!(d.try_text("#archive").is_some(), "the archive link appears");
    let stages = d.try_text("#stages").unwrap_or_default();
    assert!(
        stages.contains("PASS") && !stages.contains("RUNNING"),
        "{stages}"
    );
    assert_eq!(
        d.script("return document.title.startsWith('[PASS] ');"),
        json!(true),
        "the title shows the status"
    );
    assert_eq!(
        d.script("return document.getElementById('favicon').href.endsWith('/pass.svg');"),
        json!(true),
        "the favicon shows the status"
    );
    assert_eq!(
        d.script("return window.amsMark;"),
        json!(42),
        "the page was reloaded"
    );
    // Log tools: numbered lines with links, stage sections, search.
    assert_eq!(
        d.script("return document.querySelectorAll('#log .line > a.ln[href^=\"#L\"]').length > 3;"),
        json!(true)
    );
    assert_eq!(
        d.script("return document.querySelectorAll('#log details.stage').length;"),
        json!(1),
        "the stage is a section of the log"
    );
    d.type_into("#log-search", "finished-ok");
    wait_for("the search's hits", Duration::from_secs(10), || {
        d.try_text("#log-hits")
            .filter(|t| t.starts_with("2 matching lines"))
            .map(|_| ())
    });
    let log = d.try_text("#log").unwrap();
    assert!(
        log.contains("starting") && log.contains("finished-ok"),
        "{log}"
    );
    // Download the archive through the browser's own session.
    let url = d
        .script("return location.href;")
        .as_str()
        .unwrap()
        .to_string();
    d.go(&url);
    let href = d.script("return document.getElementById('archive').href;");
    let head = d.script_async(&format!(
        "const done = arguments[arguments.length - 1];\
         fetch({href}, {{credentials: 'same-origin'}}).then(r => r.arrayBuffer())\
         .then(b => done(Array.from(new Uint8Array(b).slice(0, 6)))).catch(e => done(String(e)));"
    ));
    assert_eq!(
        head,
        json!([0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c]),
        "not a 7z archive: {head}"
    );

    // The dashboard's message panel tells carol how her build ended.
    let name = url.rsplit('/').next().unwrap().to_string();
    d.go(&format!("{web}/"));
    wait_for(
        "the build's result among the messages",
        Duration::from_secs(30),
        || {
            d.try_text("#messages")
                .filter(|m| m.contains(&format!("Build {name} ended PASS")))
                .map(|_| ())
        },
    );

    // A long log: the page shows the tail, and "load earlier lines" brings the rest, in order.
    let mut big = String::new();
    let mut n = 0;
    while big.len() < 700 * 1024 {
        big.push_str(&format!("line {n:07} <i>not markup</i>\n"));
        n += 1;
    }
    std::fs::write(h.build_dir("demo").join(&name).join("output.txt"), &big).unwrap();
    d.go(&url);
    let shown = d.try_text("#log").unwrap();
    assert!(!shown.contains("line 0000000 ") && shown.contains(&format!("line {:07}", n - 1)));
    let mut clicks = 0;
    while d.try_text("#load-more").is_some() {
        d.click("#load-more");
        clicks += 1;
        let want = clicks;
        wait_for("earlier lines", Duration::from_secs(20), || {
            let gone = d.try_text("#load-more").is_none();
            let before = d.script("var b = document.getElementById('load-more'); return b ? (b.disabled ? 'busy' : 'ready') : 'gone';");
            (gone || before == json!("ready")).then_some(())
        });
        assert!(want < 10, "too many chunks");
    }
    assert!(clicks >= 2, "{clicks}");
    let whole = d.script("return document.getElementById('log').textContent;");
    assert_eq!(
        whole.as_str().unwrap(),
        big,
        "the page holds the whole log, in order"
    );
    assert_eq!(
        d.script("return document.querySelectorAll('#log i').length;"),
        json!(0),
        "log text never becomes markup"
    );

    // A build that prints more than the page keeps live: the oldest lines leave the page, and
    // the page says so.
    std::fs::write(
        h.source("demo").join("pipeline.json"),
        pipeline(json!([stage(
            "s",
            &[
                "sleep 2",
                "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 4000000",
                "echo loud-done"
            ]
        )])),
    )
    .unwrap();
    d.go(&format!("{web}/"));
    wait_for("the dashboard", Duration::from_secs(30), || {
        d.try_text("#trigger-demo").map(|_| ())
    });
    d.click("#trigger-demo");
    wait_for("the loud build's page", Duration::from_secs(30), || {
        d.try_text("#status")
            .filter(|s| s == "RUNNING" || s == "PENDING")
            .map(|_| ())
    });
    wait_for(
        "the loud build to pass, live",
        Duration::from_secs(120),
        || d.try_text("#status").filter(|s| s == "PASS").map(|_| ()),
    );
    let size = d.script("return document.getElementById('log').textContent.length;");
    let size = size.as_u64().unwrap();
    assert!(
        size <= 2 * 1024 * 1024 + 64 * 1024,
        "the page kept {size} characters"
    );
    assert_eq!(
        d.script("return document.getElementById('trimmed').hidden;"),
        json!(false),
        "the page says lines left it"
    );
    assert!(d
        .script("return document.getElementById('log').textContent.includes('loud-done');")
        .as_bool()
        .unwrap());
}

/// The project page's chart and pass rate, and a failed build's "jump to the first error", in
/// a real browser.
#[test]
fn the_project_page_charts_builds_and_a_failed_build_jumps_to_its_first_error() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "proj",
        &pipeline(json!([
            stage("prepare", &["echo preparing", "echo all fine"]),
            stage(
                "test",
                &[
                    "echo running the tests",
                    "echo 'error: boom in test_io'",
                    "exit 3"
                ]
            )
        ])),
    );
    add_user(&h, "carol", "3", "proj", "correct horse battery");
    h.start();
    let failed = h.build("proj");
    assert_eq!(
        h.wait_status("proj", &failed, Duration::from_secs(120))["status"],
        "warn"
    );
    let web = format!("http://{}/ams-build", h.web_addr());
    let d = Driver::start();
    d.go(&format!("{web}/login"));
    d.type_into("input[name=username]", "carol");
    d.type_into("input[name=password]", "correct horse battery");
    d.click("button[type=submit]");
    wait_for("the dashboard", Duration::from_secs(30), || {
        d.try_text("#trigger-proj").map(|_| ())
    });

    d.go(&format!("{web}/build/proj/{failed}"));
    wait_for("the first-error button", Duration::from_secs(30), || {
        d.try_text("#first-error")
            .filter(|t| !t.is_empty())
            .map(|_| ())
    });
    d.click("#first-error");
    let hit = d.try_text(".first-error").unwrap_or_default();
    assert_eq!(
        hit, "error: boom in test_io",
        "the output line, not the command's trace"
    );
    assert_eq!(
        d.script("return location.hash.startsWith('#L');"),
        json!(true),
        "the line is linked"
    );
    // Collapsing the stages hides their lines.
    d.click("#fold-all");
    assert_eq!(
        d.script("return Array.from(document.querySelectorAll('#log details.stage')).every(s => !s.open);"),
        json!(true)
    );

    d.go(&format!("{web}/project/proj"));
    wait_for("the project page", Duration::from_secs(30), || {
        d.try_text("#chart-h").map(|_| ())
    });
    assert_eq!(
        d.script("return document.querySelectorAll('svg.history rect').length;"),
        json!(1),
        "one bar per finished build"
    );
    assert_eq!(
        d.script("return document.querySelector('svg.history rect').getAttribute('class');"),
        json!("bar-warn")
    );
    let page = d.try_text("main").unwrap_or_default();
    assert!(page.contains("Pass rate"), "{page}");
    assert!(page.contains("0 %"), "a WARN build is not a pass: {page}");
}
