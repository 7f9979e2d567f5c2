//! Copies a tree: master/project_source into a build's snapshot or clone, master/build into a
//! build's output folder.
//!
//! `HardLink` links every regular file (one `link(2)` per file instead of reading and writing
//! its bytes): only for snapshots that nothing writes through (the lower layer of an overlay).
//! `Clone` gives every file its own inode: a reflink where the filesystem has them, a byte copy
//! where it does not. Both recreate directories and recreate symbolic links as links without
//! following them, so neither ever reads outside the tree.

/// How files are reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The same inode (a snapshot that is never written through).
    HardLink,
    /// A new inode with the same bytes (reflink or copy).
    Clone,
}
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    /// Files that got their own inode (cloned, or copied because linking failed).
    pub copied: u64,
}

/// Copies the tree at `src` to `dst` (which must not exist).
pub fn copy_tree(src: &Path, dst: &Path, mode: CopyKind) -> io::Result<CopyStats> {
    let mut stats = CopyStats::default();
    fs::create_dir(dst)?;
    walk(src, dst, mode, &mut stats, 0)?;
    Ok(stats)
}

/// The deepest folder nesting the host walks (a repository could nest folders until a
/// recursive walk overflows its stack).
pub const MAX_DEPTH: usize = 256;

/// The error for a tree nested deeper than [`MAX_DEPTH`].
pub fn too_deep(at: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is nested more than {MAX_DEPTH} folders deep; keep the tree shallower",
        at.display()
    ))
}

fn walk(
    src: &Path,
    dst: &Path,
    mode: CopyKind,
    st: &mut CopyStats,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(too_deep(src));
    }
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            symlink(fs::read_link(&from)?, &to)?;
            st.links += 1;
        } else if ft.is_dir() {
            fs::create_dir(&to)?;
            let perm = fs::symlink_metadata(&from)?.permissions();
            walk(&from, &to, mode, st, depth + 1)?;
            fs::set_permissions(&to, perm)?;
            st.dirs += 1;
        } else if ft.is_file() {
            st.files += 1;
            let linked = mode == CopyKind::HardLink && fs::hard_link(&from, &to).is_ok();
            if !linked {
                reflink_copy::reflink_or_copy(&from, &to)?;
                st.copied += 1;
            }
        }
        // Sockets, FIFOs and devices are not copied.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn hardlinks_files_and_keeps_links_as_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f.txt"), b"x").unwrap();
        symlink("/etc", src.join("out")).unwrap();
        let dst = t.path().join("dst");
        let st = copy_tree(&src, &dst, CopyKind::HardLink).unwrap();
        assert_eq!((st.files, st.dirs, st.links, st.copied), (1, 2, 1, 0));
        let a = fs::metadata(src.join("a/b/f.txt")).unwrap();
        let b = fs::metadata(dst.join("a/b/f.txt")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(fs::read_link(dst.join("out")).unwrap(), Path::new("/etc"));
    }

    #[test]
    fn copy_mode_writes_new_inodes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), b"x").unwrap();
        let dst = t.path().join("dst");
        copy_tree(&src, &dst, CopyKind::Clone).unwrap();
        let a = fs::metadata(src.join("f")).unwrap();
        let b = fs::metadata(dst.join("f")).unwrap();
        assert_ne!(a.ino(), b.ino());
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"x");
    }
}
