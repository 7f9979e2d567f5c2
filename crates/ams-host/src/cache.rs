//! Caches of pipeline.json (`"caches"`): folders a project's builds keep for later builds.
//!
//! Entries live in `projects/P/caches/SCOPE/KEY/`, one scope per branch. A build gets its own
//! clone of an entry (never the entry itself), so nothing it writes reaches the entry or a
//! concurrent build. It looks in its branch's scope first, then in the default branch's; it
//! saves only into its own branch's scope and only after it passed, so a build of another
//! branch can never change what the default branch's builds restore. An entry is saved whole
//! and once: the build's folder is renamed into place, and when two builds race for one key
//! the first rename wins and the other folder is dropped. The entries of a project are kept
//! under `cache_max_bytes` (web_conf.json) by removing the least recently used.
//!
//! Builds that received secrets keep their entries apart ([`secret_scope`]): what such a build
//! left in a cache (a token a tool wrote into its cache folder, say) is restored only by later
//! builds that receive secrets too, never by a build of a branch that may not have them.

use crate::copy::{copy_tree, CopyKind};
use crate::paths::{BuildDir, ProjectDir};
use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The folder of a branch's entries (named by a hash, so any branch name is one safe folder).
pub fn scope(branch: &str) -> String {
    let h = Sha256::digest(branch.as_bytes());
    format!(
        "b-{}",
        h.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The folder of a branch's entries made by builds that received secrets: restored only by
/// builds that receive them too. (`\0` is never in a branch name, so no branch's plain scope
/// is ever this one.)
pub fn secret_scope(branch: &str) -> String {
    scope(&format!("{branch}\0with secrets"))
}

/// The short hash a key's `{hash:FILE}` stands for.
pub fn file_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn root(pd: &ProjectDir) -> PathBuf {
    pd.root.join("caches")
}

/// The build's own folder for its `i`-th cache.
pub fn build_folder(bd: &BuildDir, i: usize) -> PathBuf {
    bd.root.join(format!("cache-{i}"))
}

fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Fills `dst` (created) with a clone of the entry `key` of the first scope that has it.
/// Returns the scope it came from, or `None` when no scope has the key (`dst` is then empty).
pub fn restore(
    pd: &ProjectDir,
    scopes: &[String],
    key: &str,
    dst: &Path,
) -> io::Result<Option<String>> {
    if dst.exists() {
        std::fs::remove_dir_all(dst)?;
    }
    for s in scopes {
        let entry = root(pd).join(s).join(key);
        if entry.is_dir() {
            match copy_tree(&entry, dst, CopyKind::Clone) {
                Ok(_) => {
                    touch(&entry);
                    return Ok(Some(s.clone()));
                }
                // Removed under us (evicted): start empty.
                Err(_) => {
                    let _ = std::fs::remove_dir_all(dst);
                }
            }
        }
    }
    std::fs::create_dir(dst)?;
    Ok(None)
}

/// What became of a build's cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// It is the entry now.
    Saved,
    /// The scope already had the key (this build restored it, or another saved it first).
    Kept,
}

/// Makes the build's folder `dir` the entry `key` of `scope`, unless the scope has it.
pub fn save(pd: &ProjectDir, scope: &str, key: &str, dir: &Path) -> io::Result<Saved> {
    let scope_dir = root(pd).join(scope);
    let target = scope_dir.join(key);
    if target.exists() {
        return Ok(Saved::Kept);
    }
    crate::paths::create_private_dir(&root(pd))?;
    crate::paths::create_private_dir(&scope_dir)?;
    crate::source::strip_setid(dir)?;
    let tmp = scope_dir.join(format!(".tmp-{}", crate::worker::random_hex(8)));
    std::fs::rename(dir, &tmp)?;
    match std::fs::rename(&tmp, &target) {
        Ok(()) => {
            touch(&target);
            Ok(Saved::Saved)
        }
        Err(_) if target.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(Saved::Kept)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// What a tree takes on disk: the blocks of every file, folder and link in it (so empty files
/// and folders count too), without following links, at most [`crate::copy::MAX_DEPTH`] deep
/// (a deeper tree counts as too big).
pub fn disk_size(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((p, depth)) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total = total.saturating_add(m.blocks().saturating_mul(512).max(512));
        if m.is_dir() {
            if depth >= crate::copy::MAX_DEPTH {
                return u64::MAX;
            }
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    total
}

/// Removes entries of the project until the rest take at most `max_bytes` on disk: the least
/// recently used first, and those of the `protect` scope (the default branch's) only when the
/// others are gone, so that no other branch's caches can push the default branch's out. An
/// entry larger than the whole limit is removed at once. Returns the entries removed
/// (scope/key) with their sizes.
pub fn evict(pd: &ProjectDir, max_bytes: u64, protect: &str) -> Vec<(String, u64)> {
    let mut entries = Vec::new();
    for s in std::fs::read_dir(root(pd)).into_iter().flatten().flatten() {
        for e in std::fs::read_dir(s.path()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(m) = e.metadata() else { continue };
            if name.starts_with(".tmp-") || !m.is_dir() {
                continue;
            }
            let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let size = disk_size(&e.path());
            let protected = s.file_name().to_string_lossy() == protect;
            entries.push(((protected, used), e.path(), size));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut total = 0u64;
    let mut removed = Vec::new();
    for (_, path, size) in entries {
        if total.saturating_add(size) <= max_bytes {
            total += size;
        } else if std::fs::remove_dir_all(&path).is_ok() {
            let rel = path
                .strip_prefix(root(pd))
                .unwrap_or(&path)
                .display()
                .to_string();
            removed.push((rel, size));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::DataDir;

    fn entry(pd: &ProjectDir, scope_name: &str, key: &str, bytes: usize) {
        let d = root(pd).join(scope_name).join(key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), vec![b'x'; bytes]).unwrap();
    }

    #[test]
    fn restore_clones_save_once_and_evict_the_least_recently_used() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path());
        let pd = data.project("p");
        let bd = pd.build("b");
        std::fs::create_dir_all(&bd.root).unwrap();
        let (main, topic) = (scope("main"), scope("topic"));
        entry(&pd, &main, "k", 10);
        // A topic build restores main's entry as its own clone.
        let dst = build_folder(&bd, 0);
        assert_eq!(
            restore(&pd, &[topic.clone(), main.clone()], "k", &dst).unwrap(),
            Some(main.clone())
        );
        std::fs::write(dst.join("f"), b"poison").unwrap();
        assert_eq!(
            std::fs::read(root(&pd).join(&main).join("k/f")).unwrap(),
            vec![b'x'; 10],
            "the entry is never written through"
        );
        // Saved into its own scope, once; a second save of the key is dropped.
        assert_eq!(save(&pd, &topic, "k", &dst).unwrap(), Saved::Saved);
        assert!(!dst.exists());
        let again = build_folder(&bd, 1);
        assert_eq!(restore(&pd, &[scope("x")], "none", &again).unwrap(), None);
        assert!(again.is_dir());
        assert_eq!(save(&pd, &topic, "k", &again).unwrap(), Saved::Kept);
        assert_eq!(
            std::fs::read(root(&pd).join(&main).join("k/f")).unwrap(),
            vec![b'x'; 10]
        );
        // Over the limit, the least recently used go first; the default branch's go last, and
        // one entry too big for the limit takes nothing else with it.
        entry(&pd, &main, "old", 100);
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(root(&pd).join(&main).join("old"))
            .unwrap()
            .set_modified(past)
            .unwrap();
        entry(&pd, &topic, "huge", 64 << 10);
        let k = disk_size(&root(&pd).join(&main).join("k"));
        let old = disk_size(&root(&pd).join(&main).join("old"));
        let removed = evict(&pd, k + old, &main);
        let names: Vec<&str> = removed.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names.len(), 2, "{removed:?}");
        assert!(names.iter().any(|n| n.ends_with("huge")), "{removed:?}");
        assert!(
            names.iter().any(|n| n.ends_with(&format!("{topic}/k"))),
            "{removed:?}"
        );
        assert!(root(&pd).join(&main).join("k").is_dir());
        assert!(root(&pd).join(&main).join("old").is_dir());
        // Folders and empty files count: a tree of folders is not free.
        let t2 = tempfile::tempdir().unwrap();
        for i in 0..100 {
            std::fs::create_dir(t2.path().join(format!("d{i}"))).unwrap();
        }
        assert!(disk_size(t2.path()) >= 100 * 512);
    }
}
