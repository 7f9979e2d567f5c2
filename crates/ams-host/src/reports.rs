//! Reads the JUnit XML test reports a build left in its output (`"test-reports"` in
//! pipeline.json) before the output is packed.
//!
//! The output is the build's: links are never followed (a report that is a link is listed as
//! unreadable), FIFOs and devices are never opened, and the walk, the number of files and each
//! file's size are bounded.

use ams_core::junit::{self, TestReport};
use std::fs;
use std::io::Read;
use std::path::Path;

/// The most entries looked at while searching the output for reports.
const MAX_ENTRIES: usize = 200_000;
/// The deepest folder searched.
const MAX_DEPTH: usize = 64;

/// Finds the files of `out` that match `patterns` and reads them. `None` when the pipeline
/// names no patterns; otherwise a report, possibly of zero files.
pub fn collect(out: &Path, patterns: &[String]) -> Option<TestReport> {
    if patterns.is_empty() {
        return None;
    }
    let mut report = TestReport::default();
    let set = match junit::matcher(patterns) {
        Ok(s) => s,
        Err(e) => {
            report.add_unreadable("", format!("the patterns do not compile: {e}"));
            return Some(report);
        }
    };
    let mut found: Vec<String> = Vec::new();
    let mut links: Vec<String> = Vec::new();
    let mut seen = 0usize;
    let mut stack = vec![(out.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_ENTRIES {
                report.add_unreadable(
                    "",
                    format!(
                        "the output holds more than {MAX_ENTRIES} entries; searched no further"
                    ),
                );
                stack.clear();
                break;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            // file_type() of a directory entry describes the link itself, never its target.
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if depth < MAX_DEPTH {
                    stack.push((e.path(), format!("{rel}/"), depth + 1));
                }
            } else if set.is_match(&rel) {
                if ft.is_file() {
                    found.push(rel);
                } else if ft.is_symlink() {
                    links.push(rel);
                }
            }
        }
    }
    found.sort();
    links.sort();
    for l in links {
        report.add_unreadable(
            &l,
            "is a symbolic link; reports are read only as regular files of the output".into(),
        );
    }
    if found.len() > junit::MAX_FILES {
        report.add_unreadable(
            "",
            format!(
                "{} files matched; only the first {} (by name) were read",
                found.len(),
                junit::MAX_FILES
            ),
        );
        found.truncate(junit::MAX_FILES);
    }
    for rel in found {
        match read_bounded(&out.join(&rel)) {
            Ok(bytes) => report.add_file(&rel, &bytes),
            Err(e) => report.add_unreadable(&rel, e),
        }
    }
    Some(report)
}

/// Reads a regular file without following a link or blocking on a FIFO, at most
/// [`junit::MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot be opened: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > junit::MAX_FILE_BYTES {
        return Err(format!(
            "is {} bytes, over the limit of {} for a report",
            meta.len(),
            junit::MAX_FILE_BYTES
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(junit::MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_files_are_read_and_links_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        fs::create_dir_all(out.join("reports/unit")).unwrap();
        let ok = r#"<testsuite name="s"><testcase name="a"/><testcase name="b"><failure message="no"/></testcase></testsuite>"#;
        fs::write(out.join("junit-1.xml"), ok).unwrap();
        fs::write(out.join("reports/unit/r.xml"), ok).unwrap();
        fs::write(out.join("reports/notes.txt"), "x").unwrap();
        // A report that points at a host file is refused, not read.
        std::os::unix::fs::symlink("/etc/passwd", out.join("junit-2.xml")).unwrap();
        let r = collect(out, &["junit*.xml".into(), "reports/**/*.xml".into()]).unwrap();
        assert_eq!(r.totals.files, 2);
        assert_eq!(r.totals.tests, 4);
        assert_eq!(r.totals.failed, 2);
        assert_eq!(r.failures[0].file, "junit-1.xml");
        assert_eq!(r.failures[1].file, "reports/unit/r.xml");
        assert_eq!(r.unreadable.len(), 1);
        assert_eq!(r.unreadable[0].file, "junit-2.xml");
        assert!(r.unreadable[0].reason.contains("symbolic link"));
        assert!(collect(out, &[]).is_none());
        let none = collect(out, &["nothing*.xml".into()]).unwrap();
        assert_eq!(none.totals.files, 0);
    }
}
