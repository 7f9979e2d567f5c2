//! Test reports: JUnit XML files a build leaves in its output (`"test-reports"` in
//! pipeline.json), reduced to totals and the failed tests.
//!
//! The files come from the build and are hostile: the reader never expands entities other than
//! XML's five predefined ones (quick-xml resolves no DTD), every count and text it keeps is
//! bounded, and a file that is not JUnit XML is reported as such instead of failing the build.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

/// The most failed tests kept per build (the totals always count every one).
pub const MAX_FAILURES: usize = 200;
/// The longest message or output kept per failed test, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// The most report files read per build.
pub const MAX_FILES: usize = 100;
/// The largest report file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// The deepest element nesting accepted.
const MAX_DEPTH: usize = 64;

/// What a build's test reports say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    pub totals: TestTotals,
    /// Failed and errored tests, in the order the reports list them, at most
    /// [`MAX_FAILURES`].
    pub failures: Vec<FailedTest>,
    /// More tests failed than `failures` holds.
    #[serde(default)]
    pub failures_truncated: bool,
    /// Report files that could not be read, with the reason.
    #[serde(default)]
    pub unreadable: Vec<UnreadableReport>,
}

/// Counts over every report file of a build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TestTotals {
    /// Test cases found.
    pub tests: u64,
    pub passed: u64,
    /// Cases with a `<failure>` (an assertion failed).
    pub failed: u64,
    /// Cases with an `<error>` (the test itself broke).
    pub errors: u64,
    pub skipped: u64,
    /// The sum of the cases' `time` attributes, in seconds.
    pub time_secs: f64,
    /// Report files read.
    pub files: u32,
}

impl TestTotals {
    /// Failed or errored cases.
    pub fn failing(&self) -> u64 {
        self.failed + self.errors
    }
}

/// One failed or errored test case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedTest {
    /// The report file, relative to the build output.
    pub file: String,
    /// The enclosing `<testsuite name>`.
    pub suite: String,
    /// The case's `classname`, when given.
    pub class: Option<String>,
    pub name: String,
    /// `failure` or `error`.
    pub kind: String,
    /// The `message` attribute and the element's text, clipped to [`MAX_MESSAGE_BYTES`].
    pub message: String,
    pub time_secs: Option<f64>,
}

/// A report file that matched the patterns but could not be used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnreadableReport {
    pub file: String,
    pub reason: String,
}

impl TestReport {
    /// Adds one report file's content.
    pub fn add_file(&mut self, file: &str, xml: &[u8]) {
        match parse(file, xml) {
            Ok(part) => {
                let t = &mut self.totals;
                t.files += 1;
                t.tests += part.totals.tests;
                t.passed += part.totals.passed;
                t.failed += part.totals.failed;
                t.errors += part.totals.errors;
                t.skipped += part.totals.skipped;
                t.time_secs += part.totals.time_secs;
                for f in part.failures {
                    if self.failures.len() < MAX_FAILURES {
                        self.failures.push(f);
                    } else {
                        self.failures_truncated = true;
                    }
                }
                self.failures_truncated |= part.failures_truncated;
            }
            Err(reason) => self.add_unreadable(file, reason),
        }
    }

    /// Records a file that matched but could not be read.
    pub fn add_unreadable(&mut self, file: &str, reason: String) {
        if self.unreadable.len() < MAX_FILES {
            self.unreadable.push(UnreadableReport {
                file: file.to_string(),
                reason,
            });
        }
    }

    /// Applies `f` to every text the build wrote (names and messages), e.g. to mask secrets.
    pub fn map_text(&mut self, f: impl Fn(&str) -> String) {
        for t in &mut self.failures {
            t.suite = f(&t.suite);
            t.class = t.class.as_deref().map(&f);
            t.name = f(&t.name);
            t.message = f(&t.message);
        }
    }

    /// One line for the build log.
    pub fn summary_line(&self) -> String {
        let t = &self.totals;
        let mut s = format!(
            "test reports: {} tests in {} file(s), {} passed, {} failed, {} errors, {} skipped",
            t.tests, t.files, t.passed, t.failed, t.errors, t.skipped
        );
        if !self.unreadable.is_empty() {
            s.push_str(&format!(
                "; {} file(s) could not be read",
                self.unreadable.len()
            ));
        }
        s
    }
}

/// Clips `s` to at most `max` bytes on a character boundary, marking the cut.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .map(|a| match a.unescape_value() {
            Ok(v) => v.into_owned(),
            Err(_) => String::from_utf8_lossy(&a.value).into_owned(),
        })
}

/// The longest time a case may claim: a year. Longer claims are dropped, so sums stay finite
/// (a report stored with an infinite total would not read back).
const MAX_CASE_SECS: f64 = 365.0 * 24.0 * 3600.0;

fn seconds(e: &BytesStart<'_>) -> Option<f64> {
    attr(e, b"time")
        .and_then(|t| t.trim().replace(',', "").parse::<f64>().ok())
        .filter(|t| t.is_finite() && (0.0..=MAX_CASE_SECS).contains(t))
}

/// The case being read.
struct Case {
    suite: String,
    class: Option<String>,
    name: String,
    time: Option<f64>,
    outcome: Outcome,
    message: String,
    /// The text of the `<failure>`/`<error>` being read.
    text: String,
}

#[derive(PartialEq, Clone, Copy)]
enum Outcome {
    Passed,
    Skipped,
    Failed,
    Error,
}

impl Outcome {
    fn rank(self) -> u8 {
        match self {
            Outcome::Passed => 0,
            Outcome::Skipped => 1,
            Outcome::Failed => 2,
            Outcome::Error => 3,
        }
    }
}

/// Reads one JUnit XML file (`<testsuites>`, `<testsuite>` or nested suites; the common
/// dialects of pytest, JUnit/Surefire, Go's go-junit-report, Jest and cargo2junit). Counts come
/// from the `<testcase>` elements, not from the suites' own attributes, which tools fill in
/// differently.
pub fn parse(file: &str, xml: &[u8]) -> Result<TestReport, String> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().check_end_names = true;
    let mut buf = Vec::new();
    let mut report = TestReport::default();
    let mut suites: Vec<String> = Vec::new();
    let mut case: Option<Case> = None;
    // Inside <failure>/<error>/<skipped> of the current case: its text is the message.
    let mut in_detail = false;
    let mut depth = 0usize;
    let mut saw_root = false;
    loop {
        let ev = reader.read_event_into(&mut buf).map_err(|e| {
            format!(
                "not well-formed XML at byte {}: {e}",
                reader.error_position()
            )
        })?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                if !empty {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(format!("nested deeper than {MAX_DEPTH} elements"));
                    }
                }
                let name = e.local_name();
                let name = name.as_ref();
                if !saw_root {
                    saw_root = true;
                    if name != b"testsuites" && name != b"testsuite" {
                        return Err(format!(
                            "the root element is <{}>, not <testsuites> or <testsuite>: not a \
                             JUnit XML report",
                            String::from_utf8_lossy(name)
                        ));
                    }
                }
                match name {
                    b"testsuite" if !empty => {
                        suites.push(attr(e, b"name").unwrap_or_default());
                    }
                    b"testcase" => {
                        let c = Case {
                            suite: suites.last().cloned().unwrap_or_default(),
                            class: attr(e, b"classname"),
                            name: attr(e, b"name").unwrap_or_default(),
                            time: seconds(e),
                            outcome: Outcome::Passed,
                            message: String::new(),
                            text: String::new(),
                        };
                        if empty {
                            finish_case(&mut report, file, c);
                        } else {
                            case = Some(c);
                        }
                    }
                    b"failure" | b"error" | b"skipped" => {
                        if let Some(c) = case.as_mut() {
                            let o = match name {
                                b"failure" => Outcome::Failed,
                                b"error" => Outcome::Error,
                                _ => Outcome::Skipped,
                            };
                            c.text.clear();
                            let raised = o.rank() > c.outcome.rank();
                            if raised {
                                c.outcome = o;
                                c.message.clear();
                                if let Some(m) = attr(e, b"message") {
                                    c.message = clip(m, MAX_MESSAGE_BYTES);
                                }
                            }
                            // Only the text of the element that decides the outcome is kept.
                            in_detail = !empty && raised;
                        }
                    }
                    _ => {}
                }
            }
            Event::End(ref e) => {
                depth = depth.saturating_sub(1);
                match e.local_name().as_ref() {
                    b"testsuite" => {
                        suites.pop();
                    }
                    b"testcase" => {
                        if let Some(c) = case.take() {
                            finish_case(&mut report, file, c);
                        }
                        in_detail = false;
                    }
                    b"failure" | b"error" | b"skipped" => {
                        if let Some(c) = case.as_mut() {
                            let text = std::mem::take(&mut c.text);
                            append(&mut c.message, &text);
                        }
                        in_detail = false;
                    }
                    _ => {}
                }
            }
            Event::Text(ref t) if in_detail => {
                if let Some(c) = case.as_mut() {
                    push_text(&mut c.text, &String::from_utf8_lossy(t));
                }
            }
            Event::CData(ref t) if in_detail => {
                if let Some(c) = case.as_mut() {
                    push_text(&mut c.text, &String::from_utf8_lossy(t));
                }
            }
            Event::GeneralRef(ref r) if in_detail => {
                if let Some(c) = case.as_mut() {
                    // Character references and XML's five predefined entities; anything else
                    // (a DTD's entity) is kept as written, never expanded.
                    let name = String::from_utf8_lossy(r).into_owned();
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(ch)) => Some(ch.to_string()),
                        _ => {
                            quick_xml::escape::resolve_predefined_entity(&name).map(str::to_string)
                        }
                    };
                    push_text(&mut c.text, &resolved.unwrap_or(format!("&{name};")));
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !saw_root {
        return Err("holds no XML element: not a JUnit XML report".into());
    }
    report.totals.files = 1;
    Ok(report)
}

/// Adds a piece of an element's text, within the bound.
fn push_text(buf: &mut String, piece: &str) {
    if buf.len() < MAX_MESSAGE_BYTES {
        buf.push_str(piece);
    }
}

/// Adds `text` to a failure message, separated from what is there, within the bound.
fn append(message: &mut String, text: &str) {
    let text = text.trim();
    if text.is_empty() || message.len() >= MAX_MESSAGE_BYTES {
        return;
    }
    if !message.is_empty() {
        message.push('\n');
    }
    message.push_str(text);
    let m = std::mem::take(message);
    *message = clip(m, MAX_MESSAGE_BYTES);
}

fn finish_case(report: &mut TestReport, file: &str, c: Case) {
    let t = &mut report.totals;
    t.tests += 1;
    t.time_secs += c.time.unwrap_or(0.0);
    let kind = match c.outcome {
        Outcome::Passed => {
            t.passed += 1;
            return;
        }
        Outcome::Skipped => {
            t.skipped += 1;
            return;
        }
        Outcome::Failed => {
            t.failed += 1;
            "failure"
        }
        Outcome::Error => {
            t.errors += 1;
            "error"
        }
    };
    if report.failures.len() >= MAX_FAILURES {
        report.failures_truncated = true;
        return;
    }
    report.failures.push(FailedTest {
        file: file.to_string(),
        suite: clip(c.suite, 512),
        class: c.class.map(|s| clip(s, 512)),
        name: clip(c.name, 1024),
        kind: kind.into(),
        message: c.message,
        time_secs: c.time,
    });
}

/// Checks one `"test-reports"` pattern: a glob relative to the build output, e.g.
/// `"junit*.xml"` or `"reports/**/*.xml"`. Returns the reason it is refused.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("is empty; give a pattern such as \"junit*.xml\"".into());
    }
    if p.starts_with('/') {
        return Err(
            "must be relative to the build output (docker.build-output-dest), e.g. \
             \"reports/*.xml\", not an absolute path"
                .into(),
        );
    }
    if p.split('/').any(|s| s == ".." || s == ".") {
        return Err("must not hold `.` or `..` segments; patterns match inside the output".into());
    }
    glob::Pattern::new(p)
        .map(|_| ())
        .map_err(|e| format!("is not a valid glob pattern: {e}"))
}

/// A build's (already checked) patterns. `*` does not cross `/`; `**` (a whole segment) does,
/// and also matches no folder at all.
#[derive(Debug, Clone)]
pub struct Matcher(Vec<glob::Pattern>);

impl Matcher {
    /// Whether a path relative to the output (with `/` between its parts) matches a pattern.
    pub fn is_match(&self, path: &str) -> bool {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.0.iter().any(|p| p.matches_with(path, opts))
    }
}

/// The matcher of a build's patterns.
pub fn matcher(patterns: &[String]) -> Result<Matcher, String> {
    patterns
        .iter()
        .map(|p| glob::Pattern::new(p).map_err(|e| format!("{p}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Matcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="0.5">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_fail" time="0.2">
  <failure message="assert 1 == 2">def test_fail():
&gt;       assert 1 == 2
E       assert 1 == 2</failure>
</testcase>
<testcase classname="tests.test_b" name="test_skip" time="0"><skipped message="no network"/></testcase>
<testcase classname="tests.test_b" name="test_err" time="0.05"><error message="fixture broke"><![CDATA[Traceback <here>]]></error></testcase>
<testcase classname="tests.test_b" name="test_ok2" time="0.15"></testcase>
</testsuite></testsuites>"#;

    #[test]
    fn pytest_report_counts_cases_and_keeps_failures_in_order() {
        let r = parse("junit.xml", PYTEST.as_bytes()).unwrap();
        assert_eq!(r.totals.tests, 5);
        assert_eq!(r.totals.passed, 2);
        assert_eq!(r.totals.failed, 1);
        assert_eq!(r.totals.errors, 1);
        assert_eq!(r.totals.skipped, 1);
        assert!((r.totals.time_secs - 0.5).abs() < 1e-9);
        assert_eq!(r.failures.len(), 2);
        let f = &r.failures[0];
        assert_eq!(f.name, "test_fail");
        assert_eq!(f.class.as_deref(), Some("tests.test_a"));
        assert_eq!(f.suite, "pytest");
        assert_eq!(f.kind, "failure");
        assert!(f.message.starts_with("assert 1 == 2\n"), "{}", f.message);
        assert!(f.message.contains(">       assert 1 == 2"), "{}", f.message);
        assert_eq!(r.failures[1].kind, "error");
        assert!(r.failures[1].message.contains("Traceback <here>"));
    }

    #[test]
    fn nested_suites_and_a_bare_testsuite_root() {
        let xml = r#"<testsuite name="outer"><testsuite name="inner">
            <testcase name="a"><failure/></testcase></testsuite>
            <testcase name="b"/></testsuite>"#;
        let r = parse("r.xml", xml.as_bytes()).unwrap();
        assert_eq!(
            (r.totals.tests, r.totals.failed, r.totals.passed),
            (2, 1, 1)
        );
        assert_eq!(r.failures[0].suite, "inner");
    }

    #[test]
    fn entities_are_not_expanded_and_bad_files_are_named() {
        // A billion-laughs document: quick-xml resolves no DTD, so nothing is expanded and
        // the reference is refused or kept as text, never multiplied.
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
            <testsuite><testcase name="x"><failure message="&b;">&b;</failure></testcase></testsuite>"#;
        let r = parse("bomb.xml", bomb.as_bytes()).unwrap();
        assert_eq!(r.totals.failed, 1);
        assert!(
            r.failures[0].message.len() < 100,
            "{}",
            r.failures[0].message
        );
        let e = parse("x.xml", b"<html><body/></html>").unwrap_err();
        assert!(e.contains("not a JUnit XML report"), "{e}");
        let e = parse("x.xml", b"<testsuite><testcase></testsuite>").unwrap_err();
        assert!(e.contains("not well-formed"), "{e}");
        assert!(parse("x.xml", b"").unwrap_err().contains("no XML element"));
    }

    #[test]
    fn bounds_hold_against_huge_reports() {
        let mut xml = String::from("<testsuite>");
        for i in 0..(MAX_FAILURES + 50) {
            xml.push_str(&format!(
                "<testcase name=\"t{i}\"><failure message=\"{}\"/></testcase>",
                "m".repeat(10_000)
            ));
        }
        xml.push_str("</testsuite>");
        let mut r = TestReport::default();
        r.add_file("a.xml", xml.as_bytes());
        assert_eq!(r.totals.failed as usize, MAX_FAILURES + 50);
        assert_eq!(r.failures.len(), MAX_FAILURES);
        assert!(r.failures_truncated);
        assert!(r.failures[0].message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        r.add_file("b.xml", b"nonsense");
        assert_eq!(r.unreadable.len(), 1);
        assert_eq!(r.unreadable[0].file, "b.xml");
        let deep = "<testsuite>".repeat(MAX_DEPTH + 1);
        assert!(parse("d.xml", deep.as_bytes())
            .unwrap_err()
            .contains("nested deeper"));
    }

    #[test]
    fn absurd_times_cannot_make_the_report_unstorable() {
        let xml = r#"<testsuite><testcase name="t" time="1e308"/><testcase name="u" time="1e308"><failure message="hidden"/></testcase><testcase name="v" time="NaN"/><testcase name="w" time="-1"/></testsuite>"#;
        let mut r = TestReport::default();
        for _ in 0..3 {
            r.add_file("a.xml", xml.as_bytes());
        }
        assert!(r.totals.time_secs.is_finite());
        assert_eq!(r.totals.failed, 3);
        // It survives the round trip the store makes.
        let text = serde_json::to_string(&r).unwrap();
        let back: TestReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn patterns_stay_inside_the_output() {
        assert!(check_pattern("junit*.xml").is_ok());
        assert!(check_pattern("reports/**/*.xml").is_ok());
        assert!(check_pattern("/etc/*.xml")
            .unwrap_err()
            .contains("relative"));
        assert!(check_pattern("../x.xml").unwrap_err().contains(".."));
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a[.xml").unwrap_err().contains("glob"));
        let m = matcher(&["junit*.xml".into(), "reports/**/*.xml".into()]).unwrap();
        assert!(m.is_match("junit-unit.xml"));
        assert!(!m.is_match("sub/junit-unit.xml"), "* does not cross /");
        assert!(m.is_match("reports/a/b/c.xml"));
        assert!(m.is_match("reports/c.xml"));
    }
}
