//! Folders in and out of a container through the Engine API's archive endpoint, for engines
//! that cannot bind-mount the host's folders: [`tar_stream`] makes a streamed tar of host
//! folders (modes and symbolic links kept, no link followed), and [`extract`] writes a tar the
//! engine sends back into one folder, refusing every entry that would land outside it.

use bytes::Bytes;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Bytes handed to the engine at a time.
const CHUNK: usize = 64 << 10;
/// The deepest path taken from a container's tar.
const MAX_DEPTH: usize = 256;

/// A `Write` that sends what it is given, in chunks, to an async channel (from a blocking
/// thread). The receiver going away is an error, which ends the tar.
struct ChanWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChanWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading"))
    }
}

impl Write for ChanWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Writes `dirs` (host folder, path inside the tar without a leading `/`) as one tar into
/// `out`: every entry with its mode, owner and times, symbolic links as links (never followed),
/// fifos and devices as such. A socket in a folder fails it.
pub fn write_tar(dirs: &[(PathBuf, String)], out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    for (dir, inside) in dirs {
        b.append_dir_all(inside.trim_start_matches('/'), dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    }
    b.into_inner()?.flush()
}

/// Streams `dirs` as a tar (see [`write_tar`]), made on a blocking thread as the engine reads
/// it: at most a few chunks are in memory whatever the folders hold. A failure ends the stream
/// with the error.
pub fn tar_stream(dirs: Vec<(PathBuf, String)>) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChanWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        if let Err(e) = write_tar(&dirs, &mut w) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// What [`extract`] wrote and what it refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
    /// The entries not written, each with why (at most 20 kept).
    pub refused: Vec<String>,
    pub refused_total: u64,
}

impl Extracted {
    fn refuse(&mut self, name: &str, why: &str) {
        self.refused_total += 1;
        if self.refused.len() < 20 {
            self.refused.push(format!("{name}: {why}"));
        }
    }
}

/// Why extraction stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("the output is larger than archive_max_bytes ({0} bytes)")]
    TooLarge(u64),
    #[error("cannot read the output's tar: {0}")]
    Io(#[from] io::Error),
}

/// A reader that fails past a byte budget (the tar's headers and padding included).
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(format!(
                "the output's tar passed {} bytes",
                self.limit
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The entry's path below the archived folder, as checked components: the first component
/// (the folder's own name, as the engine writes it) is dropped; an absolute path, `..`, or a
/// path deeper than [`MAX_DEPTH`] is refused.
fn checked_path(raw: &[u8]) -> Result<Vec<String>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("an absolute path");
    }
    let mut parts = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("a `..` component"),
            c => parts.push(String::from_utf8_lossy(c).into_owned()),
        }
        if c.contains(&0) {
            return Err("a NUL byte");
        }
    }
    if parts.len() > MAX_DEPTH + 1 {
        return Err("too deep");
    }
    if !parts.is_empty() {
        parts.remove(0);
    }
    Ok(parts)
}

/// Makes sure every folder on the way to `parts`' last component is a real folder inside
/// `dest` (creating missing ones), never a link or a file. Returns the entry's full path.
fn parent_chain(dest: &Path, parts: &[String]) -> Result<PathBuf, &'static str> {
    let mut cur = dest.to_path_buf();
    let Some((last, dirs)) = parts.split_last() else {
        return Err("the folder itself");
    };
    for d in dirs {
        cur.push(d);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => return Err("its path goes through a link or a file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|_| "cannot create its folder")?;
            }
            Err(_) => return Err("cannot inspect its folder"),
        }
    }
    cur.push(last);
    Ok(cur)
}

/// Removes what is at `path` (a link itself, never what it points to) unless it is a folder.
fn clear(path: &Path) -> Result<(), &'static str> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Err("a folder is in its place"),
        Ok(_) => fs::remove_file(path).map_err(|_| "cannot replace what is in its place"),
        Err(_) => Ok(()),
    }
}

/// Writes the tar `reader` holds (the engine's answer to `GET /containers/{id}/archive` of one
/// folder) into `dest`, an existing folder. Only folders, regular files, symbolic links (made
/// as links, their target untouched and never followed) and hard links to an entry already
/// written are taken; an entry with an absolute path, a `..`, a path through a link or a file,
/// a device or a fifo is refused and named in the answer. Modes are kept without set-id and
/// sticky bits. More than `max_bytes` of file content, or a tar much larger than that, stops
/// it with [`ExtractError::TooLarge`].
pub fn extract(reader: impl Read, dest: &Path, max_bytes: u64) -> Result<Extracted, ExtractError> {
    let limit = max_bytes
        .saturating_add(max_bytes / 8)
        .saturating_add(64 << 20);
    let bounded = Bounded {
        inner: reader,
        left: limit,
        limit,
    };
    let mut archive = tar::Archive::new(bounded);
    let mut out = Extracted::default();
    // Folder modes are set at the end, so a read-only folder still takes its entries.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let parts = match checked_path(&raw) {
            Ok(p) => p,
            Err(why) => {
                out.refuse(&name, why);
                continue;
            }
        };
        let kind = entry.header().entry_type();
        if parts.is_empty() {
            continue; // the archived folder itself: dest stands for it
        }
        let path = match parent_chain(dest, &parts) {
            Ok(p) => p,
            Err(why) => {
                out.refuse(&name, why);
                continue;
            }
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let done: Result<(), &'static str> = match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_dir() => {
                    dir_modes.push((path.clone(), mode));
                    Ok(())
                }
                Ok(_) => clear(&path).and_then(|_| {
                    fs::create_dir(&path).map_err(|_| "cannot create the folder")?;
                    dir_modes.push((path.clone(), mode));
                    Ok(())
                }),
                Err(_) => fs::create_dir(&path)
                    .map_err(|_| "cannot create the folder")
                    .map(|_| dir_modes.push((path.clone(), mode))),
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().unwrap_or(0);
                if out.bytes.saturating_add(size) > max_bytes {
                    return Err(ExtractError::TooLarge(max_bytes));
                }
                match clear(&path).and_then(|_| {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|_| "cannot create the file")
                }) {
                    Err(why) => Err(why),
                    Ok(mut f) => {
                        // A failed read (the engine stopped sending, the connection dropped)
                        // or write (the disk is full) ends the whole copy: the output is not
                        // whole, which a refused entry would hide.
                        let n = io::copy(&mut (&mut entry).take(size), &mut f)?;
                        if n < size {
                            return Err(ExtractError::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("the tar ends inside {name}"),
                            )));
                        }
                        out.bytes += n;
                        out.files += 1;
                        f.set_permissions(fs::Permissions::from_mode(mode))
                            .map_err(|_| "cannot set its mode")
                    }
                }
            }
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(target) => {
                    let target = PathBuf::from(String::from_utf8_lossy(&target).into_owned());
                    clear(&path).and_then(|_| {
                        std::os::unix::fs::symlink(&target, &path)
                            .map_err(|_| "cannot create the link")
                    })
                }
                None => Err("a link without a target"),
            },
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                match checked_path(&target) {
                    Err(why) => Err(why),
                    Ok(tparts) => parent_chain(dest, &tparts).and_then(|tpath| {
                        match fs::symlink_metadata(&tpath) {
                            Ok(m) if m.file_type().is_file() => clear(&path).and_then(|_| {
                                fs::hard_link(&tpath, &path)
                                    .map_err(|_| "cannot create the hard link")
                            }),
                            _ => Err("a hard link to something that is not a file written before"),
                        }
                    }),
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => Ok(()),
            _ => Err("a device, fifo or other special file"),
        };
        if let Err(why) = done {
            out.refuse(&name, why);
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        // Never through a link: the folder was checked to be one when it was made.
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir()) {
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o700));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar entry written by hand, so hostile names are possible.
    fn raw_entry(tar: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
        let mut h = tar::Header::new_old();
        {
            let bytes = h.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        tar.extend(std::iter::repeat_n(0u8, pad));
    }

    #[test]
    fn a_hostile_tar_writes_nothing_outside_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let outside = root.path().join("outside");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let out_s = outside.to_str().unwrap();
        let mut t = Vec::new();
        raw_entry(&mut t, "output/", tar::EntryType::Directory, "", b"");
        raw_entry(&mut t, "/abs", tar::EntryType::Regular, "", b"x");
        raw_entry(
            &mut t,
            "output/../../outside/dots",
            tar::EntryType::Regular,
            "",
            b"x",
        );
        raw_entry(&mut t, "output/esc", tar::EntryType::Symlink, out_s, b"");
        raw_entry(
            &mut t,
            "output/esc/through",
            tar::EntryType::Regular,
            "",
            b"x",
        );
        raw_entry(
            &mut t,
            "output/esc",
            tar::EntryType::Regular,
            "",
            b"replaced",
        );
        raw_entry(&mut t, "output/dev", tar::EntryType::Char, "", b"");
        raw_entry(
            &mut t,
            "output/hl",
            tar::EntryType::Link,
            "output/nothing",
            b"",
        );
        raw_entry(
            &mut t,
            "output/ok.txt",
            tar::EntryType::Regular,
            "",
            b"fine",
        );
        t.extend(std::iter::repeat_n(0u8, 1024));
        let got = extract(&t[..], &dest, 1 << 20).unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{got:?}");
        assert!(!root.path().join("abs").exists() && !Path::new("/abs").exists());
        assert_eq!(fs::read(dest.join("ok.txt")).unwrap(), b"fine");
        // The link was replaced by the later file, written in the folder, not through it.
        assert_eq!(fs::read(dest.join("esc")).unwrap(), b"replaced");
        assert!(!dest.join("dev").exists() && !dest.join("hl").exists());
        let why = got.refused.join("\n");
        for part in ["absolute", "`..`", "link or a file", "device", "hard link"] {
            assert!(why.contains(part), "{part}: {why}");
        }
        assert_eq!(got.refused_total, 5, "{why}");
    }

    #[test]
    fn a_tar_round_trip_keeps_bytes_modes_and_links() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        fs::create_dir_all(src.join("sub/deep")).unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o751)).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(src.join("sub/deep/big.bin"), &big).unwrap();
        std::os::unix::fs::symlink("sub/deep/big.bin", src.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.join("abs-link")).unwrap();
        let mut t = Vec::new();
        write_tar(&[(src.clone(), "output".into())], &mut t).unwrap();
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let got = extract(&t[..], &dest, 1 << 30).unwrap();
        assert!(got.refused.is_empty(), "{got:?}");
        assert_eq!(fs::read(dest.join("sub/deep/big.bin")).unwrap(), big);
        let m = fs::metadata(dest.join("run.sh")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o751);
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("sub/deep/big.bin")
        );
        assert_eq!(
            fs::read_link(dest.join("abs-link")).unwrap(),
            Path::new("/etc/hostname")
        );
        // Over the budget: stopped.
        let dest2 = root.path().join("dest2");
        fs::create_dir(&dest2).unwrap();
        assert!(matches!(
            extract(&t[..], &dest2, 1000),
            Err(ExtractError::TooLarge(1000))
        ));
    }

    #[test]
    fn set_id_bits_are_dropped() {
        let root = tempfile::tempdir().unwrap();
        let mut t = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.set_path("output/suid").unwrap();
        h.set_size(1);
        h.set_mode(0o4755);
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.push(b'x');
        t.extend(std::iter::repeat_n(0u8, 511 + 1024));
        extract(&t[..], root.path(), 100).unwrap();
        let m = fs::metadata(root.path().join("suid")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
    }
}
