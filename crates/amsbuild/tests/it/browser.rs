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

    /// Signs `user` in through the login form and waits for the dashboard, which lists
    /// `project` (with its build button).
    fn log_in(&self, web: &str, user: &str, password: &str, project: &str) {
        self.go(&format!("{web}/login"));
        self.type_into("input[name=username]", user);
        self.type_into("input[name=password]", password);
        self.click("button[type=submit]");
        wait_for("the dashboard", Duration::from_secs(30), || {
            self.try_text(&format!("#trigger-{project}")).map(|_| ())
        });
    }

    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    fn script_async(&self, js: &str) -> Value {
        self.call("POST", "/execute/async", json!({"script": js, "args": []}))
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            "POST",
            "/goog/cdp/execute",
            json!({"cmd": cmd, "params": params}),
        )
    }

    /// The colour scheme the pages see through `prefers-color-scheme`.
    fn color_scheme(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": value}]}),
        );
    }

    /// A viewport of `width` × `height` CSS pixels. A phone (`mobile`) lays a page out at its
    /// `<meta name="viewport">` width, as a phone's browser does.
    fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// Opens `url` and waits until it has loaded with its stylesheets and fonts, and its
    /// scripts have done their first work: the document has not changed for 300 ms (or has
    /// kept changing for 10 s, as a running build's page may; it is checked as it is then).
    fn open(&self, url: &str) {
        self.go(url);
        wait_for(url, Duration::from_secs(30), || {
            (self.script_async(
                "const done = arguments[arguments.length - 1];\
                 if (document.readyState !== 'complete') { done(false); return; }\
                 document.fonts.ready.then(() => done(true), () => done(true));",
            ) == json!(true))
            .then_some(())
        });
        self.script_async(
            "const done = arguments[arguments.length - 1];\
             const start = performance.now(); let last = start;\
             const seen = new MutationObserver(() => { last = performance.now(); });\
             seen.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});\
             const tick = () => { const now = performance.now();\
               if (now - last >= 300 || now - start >= 10000) { seen.disconnect(); done(true); }\
               else setTimeout(tick, 50); };\
             setTimeout(tick, 50);",
        );
    }

    /// The HTTP status the current page was answered with.
    fn status(&self) -> Value {
        self.script("return performance.getEntriesByType('navigation')[0].responseStatus;")
    }

    /// The width the page is laid out at (its layout viewport, without a scroll bar).
    fn layout_width(&self) -> Value {
        self.script("return document.documentElement.clientWidth;")
    }

    /// axe-core's violations on the current page, one line each: the rule, its impact, its
    /// help text and the selectors of the offending nodes; true for a serious or critical one.
    fn axe_violations(&self, axe: &str) -> Vec<(bool, String)> {
        // Injected through WebDriver, so the pages' `script-src 'self'` does not apply.
        let loaded = self.script(&format!("{axe}\nreturn typeof window.axe;"));
        assert_eq!(loaded, json!("object"), "axe-core did not load");
        let found = self.script_async(
            "const done = arguments[arguments.length - 1];\
             axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map(v => ({\
               id: v.id, impact: v.impact, help: v.help,\
               nodes: v.nodes.map(n => n.target.join(' '))})))).catch(e => done({error: String(e)}));",
        );
        let Some(list) = found.as_array() else {
            panic!("axe-core failed: {found}");
        };
        list.iter()
            .map(|v| {
                let nodes: Vec<&str> = v["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let impact = v["impact"].as_str().unwrap_or("?");
                let line = format!(
                    "axe {} ({impact}): {} — at {}",
                    v["id"].as_str().unwrap_or("?"),
                    v["help"].as_str().unwrap_or("?"),
                    nodes.join(" | ")
                );
                (matches!(impact, "serious" | "critical"), line)
            })
            .collect()
    }

    /// None when the page is no wider than the viewport; else its width and, by selector, the
    /// innermost elements that reach past the right edge (by their box or by content that
    /// overflows it), furthest first.
    fn horizontal_overflow(&self) -> Option<String> {
        let v = self.script(
            "const de = document.documentElement, w = de.clientWidth;\
             if (de.scrollWidth <= w) return null;\
             const path = e => { const p = []; for (; e && e.nodeType === 1 && e !== de; e = e.parentElement) {\
               let s = e.localName; if (e.id) { p.unshift(s + '#' + e.id); break; }\
               if (e.classList.length) s += '.' + Array.from(e.classList).join('.');\
               const same = e.parentElement ? Array.from(e.parentElement.children).filter(c => c.localName === e.localName) : [];\
               if (same.length > 1) s += ':nth-of-type(' + (same.indexOf(e) + 1) + ')';\
               p.unshift(s); } return p.join(' > '); };\
             const right = new Map();\
             for (const e of document.body.querySelectorAll('*')) {\
               const r = e.getBoundingClientRect();\
               let end = r.right;\
               if (getComputedStyle(e).overflowX === 'visible' && e.scrollWidth > e.clientWidth) end = Math.max(end, r.left + e.scrollWidth);\
               if (end > w + 0.5) right.set(e, [end, r.width]); }\
             const wide = Array.from(right).filter(([e]) => !Array.from(e.children).some(c => right.has(c)))\
               .sort((a, b) => b[1][0] - a[1][0]).slice(0, 6)\
               .map(([e, [end, width]]) => path(e) + ' (reaches ' + Math.round(end) + ' px; ' + Math.round(width) + ' px wide)');\
             return {scroll: de.scrollWidth, client: w, wide: wide};",
        );
        if v.is_null() {
            return None;
        }
        Some(format!(
            "{} px wide in a {} px viewport; innermost: {}",
            v["scroll"],
            v["client"],
            v["wide"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }

    /// A PNG of the viewport.
    fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.cdp("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap())
            .unwrap()
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
    add_user(&h, "carol", "3", "demo", "correct horse battery");
    h.start();
    let web = format!("http://{}/ams-build", h.web_addr());
    let d = Driver::start();
    d.log_in(&web, "carol", "correct horse battery", "demo");
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

// Long names and a long commit message, so that wrapping is exercised.
const PROJECT: &str = "payments-service-with-a-deliberately-long-name-to-test-wrapping";
const USER: &str = "alexandra.konstantinopoulou-wolfeschlegelsteinhausen";
const BRANCH: &str = "feature/PAY-4711-make-the-checkout-retry-idempotent-across-all-regions";
const SUBJECT: &str =
    "Make the checkout retry idempotent across every region and currency, so that a \
     customer whose card payment times out half-way is never charged twice (closes PAY-4711)";

const JUNIT_PASS: &str = r#"<testsuite name="unit" tests="3">
<testcase classname="checkout.retry" name="test_first_attempt" time="0.2"/>
<testcase classname="checkout.retry" name="test_timeout_then_success" time="0.4"/>
<testcase classname="checkout.ledger" name="test_single_charge" time="0.1"/>
</testsuite>"#;

const JUNIT_FAIL: &str = r#"<testsuite name="unit" tests="3">
<testcase classname="checkout.retry" name="test_first_attempt" time="0.2"/>
<testcase classname="checkout.retry" name="test_timeout_then_success_in_the_eu_central_region_with_a_euro_card" time="0.4"><failure message="AssertionError: expected exactly one charge for idempotency key c0ffee-4711-eu-central-1, found 2">charges = ledger.charges_for("c0ffee-4711-eu-central-1")
assert len(charges) == 1</failure></testcase>
<testcase classname="checkout.ledger" name="test_single_charge" time="0.1"/>
</testsuite>"#;

/// The pages a person sees, checked by machines: each has a dark theme, axe-core finds no
/// serious or critical accessibility problem in the light or the dark colour scheme, no page
/// scrolls sideways at 1,280 px or on a 390 px phone, and each is photographed (into
/// `docs/screenshots/` with `AMS_SCREENSHOTS=1`, which scripts/screenshots.sh sets).
#[test]
fn the_pages_pass_axe_fit_a_phone_and_a_desktop_and_are_photographed() {
    require_docker();
    let axe_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/axe/axe.min.js");
    let axe = std::fs::read_to_string(&axe_path)
        .unwrap_or_else(|e| panic!("{}: {e}", axe_path.display()));
    let mut h = TestHost::new();

    // A git project with stages, a log, test reports, and builds that pass and fail.
    let repo = h.tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut lint = stage(
        "lint",
        &[
            "echo checking style of 118 files",
            "[ \"$LINT\" = clean ] || { echo 'checkout/retry.py:88: line too long (131 > 100)'; exit 1; }"
        ],
    );
    lint["allow-failure"] = json!(true);
    std::fs::write(
        repo.join("pipeline.json"),
        pipeline_with(
            json!([
                stage(
                    "prepare",
                    &["echo resolving dependencies", "echo resolved 42 packages"]
                ),
                stage(
                    "compile",
                    &[
                        "seq 1 40 | sed 's/^/compiling module checkout_/'",
                        "sleep \"$PAUSE\"",
                        "echo built target/payments"
                    ]
                ),
                lint,
                stage(
                    "test",
                    &[
                        "cp junit-$OUTCOME.xml Builds/junit-unit.xml",
                        "echo running 3 tests",
                        "[ \"$OUTCOME\" = pass ] || { echo 'error: 1 of 3 tests failed: test_timeout_then_success_in_the_eu_central_region_with_a_euro_card' >&2; exit 1; }",
                        "echo all tests passed"
                    ]
                )
            ]),
            json!({"fail-fast": true, "test-reports": ["junit*.xml"],
                   "parameters": {"OUTCOME": {"default": "pass"}, "PAUSE": {"default": "0"},
                                  "LINT": {"default": "clean"}}}),
        ),
    )
    .unwrap();
    std::fs::write(repo.join("junit-pass.xml"), JUNIT_PASS).unwrap();
    std::fs::write(repo.join("junit-fail.xml"), JUNIT_FAIL).unwrap();
    git(&repo, &["add", "."]);
    git(
        &repo,
        &["commit", "-q", "-m", "Import the payments service"],
    );
    add_git_project(&h, PROJECT, &repo);
    h.project(
        "docs-site",
        &pipeline(json!([stage("html", &["echo rendered 31 pages"])])),
    );
    h.project(
        "mobile-app",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(
        &h,
        USER,
        "4",
        &format!("{PROJECT},docs-site,mobile-app"),
        "correct horse battery",
    );
    h.start();

    let t = Duration::from_secs(120);
    let build = |project: &str, extra: Value| -> String {
        let mut extra = extra;
        extra["actor"] = json!(USER);
        let name = h.build_with(project, extra)["name"]
            .as_str()
            .unwrap()
            .to_string();
        h.wait_status(project, &name, t);
        name
    };
    build("mobile-app", json!({}));
    build("docs-site", json!({}));
    // The history of main, for the project page's chart: it passes, fails (F), warns (W, the
    // lint stage failing) and passes again, at different speeds (the digit: seconds of pause).
    for (message, how) in [
        ("Import the checkout client", "1"),
        ("Retry a timed-out payment once", "2"),
        ("Log the idempotency key", "F0"),
        ("Log the idempotency key, without the card number", "1"),
        ("Keep one ledger entry per key", "W3"),
        ("Wrap the long line", "2"),
        ("Bump the HTTP client", "1"),
        ("Time out after 20 s, not 60 s", "F1"),
        ("Time out after 20 s in tests too", "2"),
        ("Name the regions in one place", "3"),
        ("Explain the retry in the README", "W0"),
        ("Check the currency before the retry", "2"),
    ] {
        git(&repo, &["commit", "-q", "--allow-empty", "-m", message]);
        let (outcome, lint, status) = match &how[..1] {
            "F" => ("fail", "clean", "fail"),
            "W" => ("pass", "long", "warn"),
            _ => ("pass", "clean", "pass"),
        };
        let pause = how.trim_start_matches(['F', 'W']);
        let name = build(
            PROJECT,
            json!({"branch": "main",
                   "params": {"OUTCOME": outcome, "LINT": lint, "PAUSE": pause}}),
        );
        assert_eq!(h.record(PROJECT, &name)["status"], status, "{message}");
    }
    // The build the build page shows: a long branch and commit message, failed tests.
    git(&repo, &["checkout", "-q", "-b", BRANCH]);
    let message = format!(
        "{SUBJECT}\n\nThe retry now carries the idempotency key of the first attempt, and the \
         ledger refuses a second charge under one key."
    );
    git(&repo, &["commit", "-q", "--allow-empty", "-m", &message]);
    let failed = build(
        PROJECT,
        json!({"branch": BRANCH, "params": {"OUTCOME": "fail", "PAUSE": "2"}}),
    );
    assert_eq!(h.record(PROJECT, &failed)["status"], "fail");

    let web = format!("http://{}/ams-build", h.web_addr());
    let pages = [
        ("dashboard", format!("{web}/")),
        ("project", format!("{web}/project/{PROJECT}")),
        ("build", format!("{web}/build/{PROJECT}/{failed}")),
        ("account", format!("{web}/account")),
    ];
    let shots = h.tmp.path().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let keep = std::env::var("AMS_SCREENSHOTS").is_ok_and(|v| v == "1");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
    let save = |d: &Driver, file: &str, width: u32| {
        let png = d.screenshot();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{file} is not a PNG");
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
        assert_eq!(w, width, "{file} is {w} px wide");
        std::fs::write(shots.join(file), &png).unwrap();
        if keep {
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(file), &png).unwrap();
        }
    };

    let d = Driver::start();
    d.call("POST", "/timeouts", json!({"script": 120_000}));
    let mut problems = Vec::new();
    // Each page in both colour schemes, on a desktop and on a phone.
    // Moderate and minor findings are reported once per page, and do not fail the test.
    let mut notes = std::collections::BTreeSet::new();
    let check = |d: &Driver,
                 page: &str,
                 url: &str,
                 problems: &mut Vec<String>,
                 notes: &mut std::collections::BTreeSet<String>| {
        let mut backgrounds = Vec::new();
        for dark in [false, true] {
            d.color_scheme(dark);
            let scheme = if dark { "dark" } else { "light" };
            for (width, height, mobile) in [(1280, 800, false), (390, 844, true)] {
                d.viewport(width, height, mobile);
                d.open(url);
                let status = d.status();
                if status != json!(200) {
                    problems.push(format!("{page}: {url} answers {status}"));
                    return;
                }
                assert_eq!(
                    d.script("return matchMedia('(prefers-color-scheme: dark)').matches;"),
                    json!(dark),
                    "the colour scheme is not emulated"
                );
                let at = format!("{page} ({scheme}, {width} px)");
                if !mobile {
                    backgrounds.push(d.script(
                        "const b = getComputedStyle(document.body).backgroundColor;\
                         return b === 'rgba(0, 0, 0, 0)' ? getComputedStyle(document.documentElement).backgroundColor : b;",
                    ));
                }
                let laid_out = d.layout_width();
                if mobile && laid_out != json!(width) {
                    problems.push(format!(
                        "{at}: laid out {laid_out} px wide; a phone needs \
                         <meta name=\"viewport\" content=\"width=device-width\">"
                    ));
                }
                if let Some(o) = d.horizontal_overflow() {
                    problems.push(format!("{at}: scrolls sideways: {o}"));
                }
                for (serious, v) in d.axe_violations(&axe) {
                    if serious {
                        problems.push(format!("{at}: {v}"));
                    } else {
                        notes.insert(format!("{page}: {v}"));
                    }
                }
            }
        }
        if backgrounds[0] == backgrounds[1] {
            problems.push(format!(
                "{page}: the same background ({}) in the light and dark schemes",
                backgrounds[0]
            ));
        }
        d.color_scheme(false);
    };

    // Signed out: the login page.
    check(
        &d,
        "login",
        &format!("{web}/login"),
        &mut problems,
        &mut notes,
    );
    // The checks find what they look for: an image without a text alternative, and a box
    // wider than the window.
    d.viewport(1280, 800, false);
    d.open(&format!("{web}/login"));
    d.script(
        "const i = document.createElement('img'); i.src = 'x.png'; document.body.append(i);\
         const b = document.createElement('div'); b.id = 'too-wide'; b.style.width = '3000px'; b.style.height = '1em';\
         document.body.append(b); return 1;",
    );
    let found = d.axe_violations(&axe);
    assert!(
        found
            .iter()
            .any(|(serious, v)| *serious && v.starts_with("axe image-alt (critical)")),
        "{found:?}"
    );
    let wide = d.horizontal_overflow().expect("a 3,000 px box overflows");
    assert!(wide.contains("div#too-wide (reaches 3"), "{wide}");
    d.viewport(1280, 800, false);
    d.open(&format!("{web}/login"));
    save(&d, "login.png", 1280);
    d.log_in(&web, USER, "correct horse battery", PROJECT);

    for (page, url) in &pages {
        check(&d, page, url, &mut problems, &mut notes);
    }
    // The photographs, light at 1,280 px; the dashboard and the build also dark, and the
    // build on a phone.
    for (page, url) in &pages[..3] {
        d.viewport(1280, 800, false);
        d.open(url);
        save(&d, &format!("{page}.png"), 1280);
        if *page != "project" {
            d.color_scheme(true);
            d.open(url);
            save(&d, &format!("{page}-dark.png"), 1280);
            d.color_scheme(false);
        }
    }
    d.viewport(390, 844, true);
    d.open(&pages[2].1);
    save(&d, "build-phone.png", 390);

    for n in &notes {
        eprintln!("axe, moderate or minor (not failing): {n}");
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in the pages:\n{}",
        problems.len(),
        problems.join("\n")
    );
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
    d.log_in(&web, "carol", "correct horse battery", "proj");

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
