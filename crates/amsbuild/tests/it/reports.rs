//! Test reports and archived files through a real build: JUnit XML the stages leave in the
//! output is read (never through a link), shown on the build page (failed tests first, escaped,
//! secrets masked) and in the API; the archive's files are listed and one file downloads alone,
//! byte for byte, only for users who may see the project.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const SECRET: &str = "hunter2-very-secret-value";

const UNIT: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="unit" tests="4">
<testcase classname="pkg.test_a" name="test_ok" time="0.25"/>
<testcase classname="pkg.test_a" name="test_breaks" time="0.5"><failure message="assert &lt;script&gt;alert(1)&lt;/script&gt; == 2">token was SECRET_HERE in the assertion</failure></testcase>
<testcase classname="pkg.test_b" name="test_fixture" time="0.125"><error message="fixture exploded"/></testcase>
<testcase classname="pkg.test_b" name="test_later" time="0"><skipped/></testcase>
</testsuite></testsuites>"#;

const MORE: &str =
    r#"<testsuite name="integration"><testcase name="it_works" time="1"/></testsuite>"#;

#[test]
fn test_reports_and_single_archived_files_reach_the_page_and_the_api() {
    require_docker();
    let mut h = TestHost::new();
    h.project(
        "app",
        &pipeline_with(
            json!([stage(
                "test",
                &[
                    "mkdir -p Builds/reports/more Builds/data",
                    "sed \"s|SECRET_HERE|$S|\" unit.xml > Builds/junit-unit.xml",
                    "cp more.xml Builds/reports/more/it.xml",
                    "ln -s /etc/passwd Builds/junit-link.xml",
                    "echo not a report > Builds/notes.xml",
                    "seq 1 20000 > Builds/data/nums.txt",
                    "echo hi > 'Builds/we ird #1?.txt'",
                ]
            )]),
            json!({"secrets": ["S"], "test-reports": ["junit*.xml", "reports/**/*.xml"]}),
        ),
    );
    std::fs::write(h.source("app").join("unit.xml"), UNIT).unwrap();
    std::fs::write(h.source("app").join("more.xml"), MORE).unwrap();
    h.private_config("app", json!({"secret-branches": ["*"]}));
    cli_with_stdin(&h, &["secret", "set", "app", "S"], SECRET);
    h.project(
        "other",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&h, "user", "1", "app", "a long password");
    add_user(&h, "stranger", "1", "other", "a long password");
    let (user, stranger) = (api_token(&h, "user"), api_token(&h, "stranger"));
    h.start();

    let name = h.build("app");
    let rec = h.wait_status("app", &name, T);
    // Failed tests do not change the status: the stages decide it.
    assert_eq!(rec["status"], "pass", "{rec}");
    let log = h.log("app", &name);
    assert!(
        log.contains(
            "test reports: 5 tests in 2 file(s), 2 passed, 1 failed, 1 errors, 1 skipped; 1 file(s) could not be read"
        ),
        "{log}"
    );
    assert!(!log.contains(SECRET));

    let addr = h.web_addr();
    let auth = |t: &str| vec![("Authorization", format!("Bearer {t}"))];
    let (st, v) = http(
        &addr,
        "GET",
        "/ams-build/api/projects/name/app/builds",
        &auth(&user),
        b"",
    );
    assert_eq!(st, 200, "{v}");
    let t = &v[0]["tests"];
    assert_eq!(
        (
            &t["tests"],
            &t["passed"],
            &t["failed"],
            &t["errors"],
            &t["skipped"],
            &t["files"]
        ),
        (
            &json!(5),
            &json!(2),
            &json!(1),
            &json!(1),
            &json!(1),
            &json!(2)
        ),
        "{t}"
    );

    // The report: failed tests in order, with messages, the secret masked; the link and the
    // non-JUnit file are named as unreadable, nothing of /etc/passwd is read.
    let tests_path = format!("/ams-build/api/builds/{name}/tests");
    let (st, v) = http(&addr, "GET", &tests_path, &auth(&user), b"");
    assert_eq!(st, 200, "{v}");
    let r = &v["report"];
    let f = r["failures"].as_array().unwrap();
    assert_eq!(f.len(), 2, "{r}");
    assert_eq!(f[0]["name"], "test_breaks");
    assert_eq!(f[0]["class"], "pkg.test_a");
    assert_eq!(f[0]["kind"], "failure");
    let msg = f[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("assert <script>alert(1)</script> == 2\n") && msg.contains("token was ***"),
        "{msg}"
    );
    assert!(!v.to_string().contains(SECRET), "{v}");
    assert_eq!(f[1]["kind"], "error");
    let unreadable: Vec<&str> = r["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["file"].as_str().unwrap())
        .collect();
    assert_eq!(unreadable, vec!["junit-link.xml"], "{r}");
    assert!(!v.to_string().contains("root:x:0"), "{v}");
    let (st, _) = http(&addr, "GET", &tests_path, &auth(&stranger), b"");
    assert_eq!(st, 404, "a user of another project does not see the report");

    // The archive's files, each downloadable alone.
    let (st, v) = http(
        &addr,
        "GET",
        &format!("/ams-build/api/builds/{name}/files"),
        &auth(&user),
        b"",
    );
    assert_eq!(st, 200, "{v}");
    let files = v["files"].as_array().unwrap();
    let entry = |p: &str| files.iter().find(|f| f["path"] == p).cloned();
    let nums: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    let e = entry("data/nums.txt").expect("listed");
    assert_eq!(e["kind"], "file");
    assert_eq!(e["size"], nums.len());
    assert_eq!(entry("junit-link.xml").unwrap()["kind"], "link");
    assert!(entry("junit-link.xml").unwrap().get("link").is_none());
    let weird = entry("we ird #1?.txt").expect("listed");
    let weird_link = weird["link"].as_str().unwrap().to_string();
    assert_eq!(v["total"], files.len());
    let (_, one) = http(
        &addr,
        "GET",
        &format!("/ams-build/api/builds/{name}/files?offset=1&limit=1"),
        &auth(&user),
        b"",
    );
    assert_eq!(one["files"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["files"][0], files[1], "a page of the list");
    assert_eq!(
        weird_link,
        format!("dl/app/{name}/file/we%20ird%20%231%3F.txt")
    );

    let link = e["link"].as_str().unwrap();
    let (st, head, body) = http_raw(&addr, &format!("/ams-build/{link}"), &auth(&user));
    assert_eq!(st, 200, "{head}");
    assert_eq!(body, nums.as_bytes(), "the file comes back byte for byte");
    assert!(
        head.contains("content-disposition: attachment; filename=\"nums.txt\""),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    let (st, _, body) = http_raw(&addr, &format!("/ams-build/{weird_link}"), &auth(&user));
    assert_eq!((st, body.as_slice()), (200, b"hi\n".as_slice()));

    // Only recorded regular files of the archive: no link, folder, traversal or stranger.
    for bad in [
        "junit-link.xml",
        "data",
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "data/../data/nums.txt",
        "/data/nums.txt",
        "nope.txt",
    ] {
        let (st, _, body) = http_raw(
            &addr,
            &format!("/ams-build/dl/app/{name}/file/{bad}"),
            &auth(&user),
        );
        assert_eq!(st, 404, "{bad}");
        assert!(
            !String::from_utf8_lossy(&body).contains("root:x:0"),
            "{bad}"
        );
    }
    let (st, _, _) = http_raw(&addr, &format!("/ams-build/{link}"), &auth(&stranger));
    assert_eq!(st, 404, "a user of another project cannot download");
    let (st, _, _) = http_raw(&addr, &format!("/ams-build/{link}"), &[]);
    assert!(st == 401 || st == 404, "anonymous: {st}");

    // The build page: totals, the failed tests escaped, the file list with its links.
    let (st, head, _) = http_full(
        &addr,
        "POST",
        "/ams-build/login",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )],
        &form(&[("username", "user"), ("password", "a long password")]),
    );
    assert_eq!(st, 303, "{head}");
    let cookie = set_cookie(&head);
    let (st, _, page) = http_raw(
        &addr,
        &format!("/ams-build/build/app/{name}"),
        &[("Cookie", cookie)],
    );
    let page = String::from_utf8_lossy(&page);
    assert_eq!(st, 200);
    assert!(page.contains("<strong>5 tests</strong>"), "{page}");
    assert!(page.contains("Failed tests"));
    assert!(page.contains("pkg.test_a.test_breaks"));
    assert!(page.contains("assert &lt;script&gt;alert(1)&lt;/script&gt; == 2"));
    assert!(!page.contains("<script>alert(1)"), "the message is escaped");
    assert!(!page.contains(SECRET));
    assert!(page.contains(&format!(
        "href=\"/ams-build/dl/app/{name}/file/data/nums.txt\""
    )));
    assert!(page.contains("junit-link.xml</code>: is a symbolic link"));

    // A pipeline without test-reports records none.
    let other = h.build("other");
    let rec = h.wait_status("other", &other, T);
    assert!(rec["tests"].is_null(), "{rec}");
}
