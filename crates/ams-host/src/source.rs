//! A build's own copy of the source, which nothing the build writes can carry back to master,
//! to another build or to a later one.
//!
//! The preferred way is copy-on-write through overlayfs: the lower layer is a hard-link snapshot
//! of master (one `link(2)` per file, taken under the project's lock), the upper layer and the
//! work folder belong to the build, and the merged view is mounted at
//! `builds/NAME/project_source` with `nodev,nosuid`. The container only ever sees the merged
//! view, so a write into a tracked file copies it up into the build's upper layer; the snapshot's
//! inodes, which master shares, are never opened for writing. When the host cannot mount (not
//! root, no overlayfs, a data directory path overlayfs cannot name), the source is cloned
//! instead: a reflink per file where the filesystem has them, a byte copy where it does not.
//!
//! Reading files of a checkout goes through [`read_checkout_file`], which never follows a link.

use crate::copy::{copy_tree, CopyKind, CopyStats};
use ams_core::private_config::SourceCopy;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether overlay mounts work on this host: unknown until the first try.
#[derive(Debug, Default)]
pub struct OverlaySupport(AtomicU8);

const UNKNOWN: u8 = 0;
const WORKS: u8 = 1;
const FAILS: u8 = 2;

impl OverlaySupport {
    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// How a build's source was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A snapshot of master under an overlay mount.
    Overlay,
    /// A clone (reflinks or bytes); the reason overlay was not used, if it was wanted.
    Clone { why: Option<String> },
}

/// The build's source folders. Dropping it unmounts the overlay (the layers stay on disk until
/// [`BuildSource::release`] or the build folder's removal).
#[derive(Debug)]
pub struct BuildSource {
    /// Where the container's project folder comes from (the merged view or the clone).
    pub dir: PathBuf,
    layers: PathBuf,
    mounted: bool,
    pub kind: SourceKind,
    pub stats: CopyStats,
}

/// The folder holding the overlay layers of the build whose source is `dir`.
fn layers_of(dir: &Path) -> PathBuf {
    let parent = dir.parent().unwrap_or(Path::new("."));
    parent.join(".ams-layers")
}

/// Characters overlayfs' mount options cannot carry in a path.
fn overlay_nameable(p: &Path) -> bool {
    let s = p.as_os_str().as_encoded_bytes();
    !s.iter().any(|b| matches!(b, b',' | b':' | b'\\' | b'\n'))
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    use rustix::mount::{mount, MountFlags};
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let opts = std::ffi::CString::new(opts).map_err(|_| io::ErrorKind::InvalidInput)?;
    mount(
        "ams-build",
        target,
        "overlay",
        MountFlags::NODEV | MountFlags::NOSUID,
        Some(opts.as_c_str()),
    )
    .map_err(io::Error::from)
}

fn unmount(target: &Path) -> io::Result<()> {
    use rustix::mount::{unmount, UnmountFlags};
    match unmount(target, UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()), // not mounted
        Err(e) => Err(e.into()),
    }
}

/// Unmounts `dir` if an overlay is still mounted there (a build folder reused after a crash).
pub fn unmount_stale(dir: &Path) -> io::Result<()> {
    unmount(dir)
}

/// Makes `dst` (which must not exist) the build's own copy of `master`, as `mode` asks.
/// Runs blocking filesystem work: call it from a blocking thread.
pub fn prepare(
    master: &Path,
    dst: &Path,
    mode: SourceCopy,
    support: &OverlaySupport,
) -> io::Result<BuildSource> {
    let layers = layers_of(dst);
    let want_overlay = matches!(mode, SourceCopy::Auto | SourceCopy::Overlay);
    let mut why = None;
    if want_overlay {
        if support.get() == FAILS {
            why = Some("overlay mounts failed earlier on this host".to_string());
        } else if !overlay_nameable(dst) || !overlay_nameable(&layers) {
            why = Some(format!(
                "the data directory path {} has a character overlayfs options cannot carry (, : \\)",
                dst.display()
            ));
        } else {
            match try_overlay(master, dst, &layers) {
                Ok(stats) => {
                    support.set(WORKS);
                    return Ok(BuildSource {
                        dir: dst.to_path_buf(),
                        layers,
                        mounted: true,
                        kind: SourceKind::Overlay,
                        stats,
                    });
                }
                Err(e) => {
                    let _ = unmount(dst);
                    let _ = fs::remove_dir_all(&layers);
                    let _ = fs::remove_dir(dst);
                    if support.get() == UNKNOWN {
                        support.set(FAILS);
                    }
                    why = Some(format!("overlay mount failed: {e}"));
                }
            }
        }
        if mode == SourceCopy::Overlay {
            return Err(io::Error::other(format!(
                "source-copy is \"overlay\" but {}; set \"source-copy\": \"auto\" to fall back to a copy",
                why.unwrap_or_default()
            )));
        }
    }
    let stats = copy_tree(master, dst, CopyKind::Clone)?;
    Ok(BuildSource {
        dir: dst.to_path_buf(),
        layers,
        mounted: false,
        kind: SourceKind::Clone { why },
        stats,
    })
}

fn try_overlay(master: &Path, dst: &Path, layers: &Path) -> io::Result<CopyStats> {
    if layers.exists() {
        let _ = unmount(dst);
        fs::remove_dir_all(layers)?;
    }
    fs::create_dir(layers)?;
    let (lower, upper, work) = (
        layers.join("lower"),
        layers.join("upper"),
        layers.join("work"),
    );
    let stats = copy_tree(master, &lower, CopyKind::HardLink)?;
    fs::create_dir(&upper)?;
    fs::create_dir(&work)?;
    // The merged root takes the lower root's mode; the upper root should match it.
    let perm = fs::metadata(&lower)?.permissions();
    fs::set_permissions(&upper, perm)?;
    fs::create_dir(dst)?;
    mount_overlay(&lower, &upper, &work, dst)?;
    Ok(stats)
}

impl BuildSource {
    /// Unmounts the overlay. With `keep`, the build's changes are folded into its own snapshot
    /// and left at `dir` as plain folders; without, the source is removed.
    pub fn release(mut self, keep: bool) -> io::Result<()> {
        if self.mounted {
            unmount(&self.dir)?;
            self.mounted = false;
        }
        if !self.layers.exists() {
            return if keep {
                Ok(())
            } else {
                remove_if_present(&self.dir)
            };
        }
        if keep {
            let (lower, upper) = (self.layers.join("lower"), self.layers.join("upper"));
            merge_upper(&upper, &lower, 0)?;
            fs::remove_dir(&self.dir)?;
            fs::rename(&lower, &self.dir)?;
        } else {
            remove_if_present(&self.dir)?;
        }
        remove_if_present(&self.layers)
    }
}

impl Drop for BuildSource {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.dir) {
                tracing::error!("cannot unmount {}: {e}", self.dir.display());
            }
        }
    }
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(
        rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut buf),
        Ok(1) if buf[0] == b'y'
    )
}

/// Applies an overlay's upper layer to its lower one, as the merged view showed it: whiteouts
/// delete, opaque folders replace, everything else is renamed over the lower entry. Entries
/// are only ever renamed or unlinked, never written through, so inodes the lower layer shares
/// with master keep their content; no link in either layer is followed.
fn merge_upper(upper: &Path, lower: &Path, depth: usize) -> io::Result<()> {
    if depth > crate::copy::MAX_DEPTH {
        return Err(crate::copy::too_deep(upper));
    }
    for entry in fs::read_dir(upper)? {
        let entry = entry?;
        let up = entry.path();
        let lo = lower.join(entry.file_name());
        let um = fs::symlink_metadata(&up)?;
        if is_whiteout(&um) {
            remove_if_present(&lo)?;
            continue;
        }
        let lower_is_dir = fs::symlink_metadata(&lo)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if um.is_dir() && lower_is_dir && !is_opaque(&up) {
            merge_upper(&up, &lo, depth + 1)?;
            fs::set_permissions(&lo, without_setid(um.permissions()))?;
        } else {
            remove_if_present(&lo)?;
            fs::rename(&up, &lo)?;
            // The build's own inode (overlay copies up before any write): drop set-id bits.
            if um.is_file() || um.is_dir() {
                fs::set_permissions(&lo, without_setid(um.permissions()))?;
            }
            if um.is_dir() {
                strip_setid(&lo)?;
            }
        }
    }
    Ok(())
}

fn without_setid(p: fs::Permissions) -> fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    fs::Permissions::from_mode(p.mode() & 0o1777)
}

/// Clears the set-user-id and set-group-id bits of every file and folder below `dir` (links
/// not followed), so nothing a build leaves on the host runs as its owner. Returns how many
/// entries had them.
pub fn strip_setid(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let mut n = 0;
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        if depth > crate::copy::MAX_DEPTH {
            return Err(crate::copy::too_deep(&d));
        }
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            if m.file_type().is_symlink() {
                continue;
            }
            if m.permissions().mode() & 0o6000 != 0 {
                fs::set_permissions(e.path(), without_setid(m.permissions()))?;
                n += 1;
            }
            if m.is_dir() {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    Ok(n)
}

/// Unmounts every mount below `root` (overlays a killed host left behind), deepest first.
pub fn sweep_mounts(root: &Path) -> Vec<PathBuf> {
    let Ok(root) = root.canonicalize() else {
        return Vec::new();
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(&root) && p != &root)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.retain(|p| unmount(p).is_ok());
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| c.is_ascii_digit()) {
            let n = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(n as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Why a file of a checkout could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutReadError {
    #[error("{name} is missing from the source; add it")]
    Missing { name: String },
    #[error("{name} is a symbolic link; the host never follows links in a checkout: commit the file itself")]
    Link { name: String },
    #[error("{name} is not a regular file; commit it as a file")]
    NotAFile { name: String },
    #[error("{name} is larger than {cap} bytes; keep it under that size")]
    TooLarge { name: String, cap: u64 },
    #[error("{name}: {source}")]
    Io { name: String, source: io::Error },
}

/// Reads `root/name` (a relative path such as `pipeline.json` or `web/package-lock.json`)
/// without following a link at any step, refusing anything but a regular file of at most `cap`
/// bytes.
pub fn read_checkout_file(root: &Path, name: &str, cap: u64) -> Result<Vec<u8>, CheckoutReadError> {
    use rustix::fs::{openat, Mode, OFlags};
    let n = || name.to_string();
    let parts: Vec<&str> = name.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(CheckoutReadError::NotAFile { name: n() });
    }
    let classify = |e: rustix::io::Errno| match e {
        rustix::io::Errno::NOENT => CheckoutReadError::Missing { name: n() },
        // O_NOFOLLOW on a link answers ELOOP.
        rustix::io::Errno::LOOP => CheckoutReadError::Link { name: n() },
        rustix::io::Errno::NOTDIR => CheckoutReadError::NotAFile { name: n() },
        e => CheckoutReadError::Io {
            name: n(),
            source: e.into(),
        },
    };
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(classify)?;
    let (last, dirs) = parts.split_last().unwrap_or((&"", &[]));
    for d in dirs {
        dir = openat(&dir, *d, dir_flags, Mode::empty()).map_err(classify)?;
    }
    let fd = openat(
        &dir,
        *last,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(classify)?;
    let mut f = fs::File::from(fd);
    let meta = f.metadata().map_err(|e| CheckoutReadError::Io {
        name: n(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(CheckoutReadError::NotAFile { name: n() });
    }
    if meta.len() > cap {
        return Err(CheckoutReadError::TooLarge { name: n(), cap });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    (&mut f)
        .take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CheckoutReadError::Io {
            name: n(),
            source: e,
        })?;
    if buf.len() as u64 > cap {
        return Err(CheckoutReadError::TooLarge { name: n(), cap });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn checkout_reads_refuse_links_other_files_and_large_files() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::write(root.join("ok.json"), b"{}").unwrap();
        fs::write(root.join("secret"), b"other project's").unwrap();
        symlink(root.join("secret"), root.join("link.json")).unwrap();
        fs::create_dir(root.join("dir.json")).unwrap();
        fs::write(root.join("big.json"), vec![b' '; 2048]).unwrap();
        assert_eq!(read_checkout_file(root, "ok.json", 1024).unwrap(), b"{}");
        let e = read_checkout_file(root, "link.json", 1024).unwrap_err();
        assert!(matches!(e, CheckoutReadError::Link { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(matches!(
            read_checkout_file(root, "dir.json", 1024),
            Err(CheckoutReadError::NotAFile { .. })
        ));
        assert!(matches!(
            read_checkout_file(root, "big.json", 1024),
            Err(CheckoutReadError::TooLarge { .. })
        ));
        assert!(matches!(
            read_checkout_file(root, "none.json", 1024),
            Err(CheckoutReadError::Missing { .. })
        ));
        assert!(read_checkout_file(root, "../x", 1024).is_err());
    }

    #[test]
    fn merging_the_upper_layer_renames_and_never_writes_shared_inodes() {
        let t = tempfile::tempdir().unwrap();
        let (master, lower, upper) = (t.path().join("m"), t.path().join("l"), t.path().join("u"));
        fs::create_dir_all(master.join("d")).unwrap();
        fs::write(master.join("d/tracked"), b"original").unwrap();
        fs::write(master.join("gone"), b"x").unwrap();
        copy_tree(&master, &lower, CopyKind::HardLink).unwrap();
        // The upper layer as overlayfs would leave it: a changed file, a new one, a link.
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::write(upper.join("d/tracked"), b"poisoned").unwrap();
        fs::write(upper.join("new"), b"n").unwrap();
        symlink("/etc/passwd", upper.join("d/l")).unwrap();
        fs::write(upper.join("suid"), b"s").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(upper.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        }
        merge_upper(&upper, &lower, 0).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(lower.join("suid"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o755, "set-id bits are dropped");
        }
        assert_eq!(fs::read(lower.join("d/tracked")).unwrap(), b"poisoned");
        assert_eq!(fs::read(master.join("d/tracked")).unwrap(), b"original");
        assert_eq!(fs::read(lower.join("new")).unwrap(), b"n");
        assert_eq!(
            fs::read_link(lower.join("d/l")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(lower.join("gone").exists());
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/a\040b/c\134d"),
            PathBuf::from("/a b/c\\d")
        );
    }
}
