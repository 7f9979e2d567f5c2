//! Folders in and out of a container through the Engine API's archive endpoint, for engines
//! that cannot bind-mount the host's folders: [`tar_stream`] makes a streamed tar of host
//! folders (modes and symbolic links kept, no link followed), and [`extract`] writes a tar the
//! engine sends back into one folder, refusing every entry that would land outside it.

use bytes::Bytes;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
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
    /// Why entries were not written: each reason once, with how many and the first of them
    /// (its name cut to 200 characters).
    pub refused: Vec<String>,
    pub refused_total: u64,
    /// (reason, count, first name) behind `refused`.
    reasons: Vec<(&'static str, u64, String)>,
}

impl Extracted {
    fn refuse(&mut self, raw: &[u8], why: &'static str) {
        self.refused_total += 1;
        match self.reasons.iter_mut().find(|(w, _, _)| *w == why) {
            Some((_, n, _)) => *n += 1,
            None => self.reasons.push((why, 1, shown(raw))),
        }
        self.refused = self
            .reasons
            .iter()
            .map(|(why, n, first)| match n {
                1 => format!("{first}: {why}"),
                n => format!("{first} and {} more: {why}", n - 1),
            })
            .collect();
    }
}

/// An entry's name as the log shows it: at most 200 characters, control characters escaped,
/// bytes that are not UTF-8 replaced.
fn shown(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(200).is_some() {
        out.push('…');
    }
    out
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

/// The most bytes of one GNU long name or long link, or of one PAX extended header, that are
/// read into memory: a path is at most 4,096 bytes on Linux, and PAX headers also carry a
/// file's extended attributes. A larger one (only a hostile engine sends it) ends the copy.
const MAX_EXTENSION: u64 = 1 << 20;

/// The entry's path below the archived folder, as checked components (bytes kept as they
/// are, never made UTF-8): the first component (the folder's own name, as the engine writes
/// it) is dropped; an absolute path, `..`, a NUL byte or a path deeper than [`MAX_DEPTH`] is
/// refused.
fn checked_path(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("an absolute path");
    }
    let mut parts = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("a `..` component"),
            c if c.contains(&0) => return Err("a NUL byte"),
            c => parts.push(OsStr::from_bytes(c).to_os_string()),
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
fn parent_chain(dest: &Path, parts: &[OsString]) -> Result<PathBuf, &'static str> {
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

/// A name as a GNU long name or long link entry holds it: without its closing NULs.
fn without_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn bad_tar(msg: String) -> ExtractError {
    ExtractError::Io(io::Error::new(io::ErrorKind::InvalidData, msg))
}

/// Writes the tar `reader` holds (the engine's answer to `GET /containers/{id}/archive` of one
/// folder) into `dest`, an existing folder. Only folders, regular files, symbolic links (made
/// as links, their target untouched and never followed) and hard links to an entry already
/// written are taken; an entry with an absolute path, a `..`, a path through a link or a file,
/// a device or a fifo is refused and named in the answer. Names are taken byte for byte (GNU
/// long names and PAX paths included). Modes are kept without set-id and sticky bits. More
/// than `max_bytes` of file content, or a tar much larger than that, stops it with
/// [`ExtractError::TooLarge`]; a long name or PAX header over [`MAX_EXTENSION`], a GNU sparse
/// entry's map or a read that fails stops it with [`ExtractError::Io`]. At most a few
/// MiB are held in memory whatever the tar holds.
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
    // Raw entries: the tar crate would read a long name or PAX header of any size into
    // memory; they are read here, bounded, and applied to the entry they describe.
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    for entry in archive.entries()?.raw(true) {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size()?;
        let slot = match kind {
            tar::EntryType::GNULongName => Some(&mut long_name),
            tar::EntryType::GNULongLink => Some(&mut long_link),
            tar::EntryType::XHeader => Some(&mut pax),
            _ => None,
        };
        if let Some(slot) = slot {
            if size > MAX_EXTENSION {
                return Err(bad_tar(format!(
                    "it holds a long name or PAX header of {size} bytes (at most {MAX_EXTENSION} \
                     are read)"
                )));
            }
            let mut v = Vec::with_capacity(size as usize);
            (&mut entry).take(size).read_to_end(&mut v)?;
            if (v.len() as u64) < size {
                return Err(bad_tar("it ends inside a long name or PAX header".into()));
            }
            *slot = Some(v);
            continue;
        }
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        if kind == tar::EntryType::GNUSparse {
            // Its map follows the header, outside the entry's size: the rest cannot be read.
            return Err(bad_tar(
                "it holds a GNU sparse entry, which the Engine API never sends".into(),
            ));
        }
        let mut raw = entry.path_bytes().into_owned();
        let mut link = entry.link_name_bytes().map(|l| l.into_owned());
        if let Some(n) = long_name.take() {
            raw = without_nul(n);
        }
        if let Some(l) = long_link.take() {
            link = Some(without_nul(l));
        }
        if let Some(p) = pax.take() {
            for ext in tar::PaxExtensions::new(&p) {
                let ext = ext.map_err(|_| bad_tar("it holds a malformed PAX header".into()))?;
                match ext.key_bytes() {
                    b"path" => raw = ext.value_bytes().to_vec(),
                    b"linkpath" => link = Some(ext.value_bytes().to_vec()),
                    b"size" => {
                        let pax_size = ext.value().ok().and_then(|v| v.parse::<u64>().ok());
                        if pax_size != Some(size) {
                            if pax_size.is_some_and(|s| s > max_bytes) {
                                return Err(ExtractError::TooLarge(max_bytes));
                            }
                            return Err(bad_tar(format!(
                                "{} has a PAX size other than its header's (a file of 8 GiB \
                                 or more is not read back)",
                                shown(&raw)
                            )));
                        }
                    }
                    _ => {}
                }
            }
        }
        let parts = match checked_path(&raw) {
            Ok(p) => p,
            Err(why) => {
                out.refuse(&raw, why);
                continue;
            }
        };
        if parts.is_empty() {
            continue; // the archived folder itself: dest stands for it
        }
        let path = match parent_chain(dest, &parts) {
            Ok(p) => p,
            Err(why) => {
                out.refuse(&raw, why);
                continue;
            }
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let done: Result<(), &'static str> = match kind {
            tar::EntryType::Directory => {
                let made = match fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_dir() => Ok(()),
                    Ok(_) => clear(&path).and_then(|_| {
                        fs::create_dir(&path).map_err(|_| "cannot create the folder")
                    }),
                    Err(_) => fs::create_dir(&path).map_err(|_| "cannot create the folder"),
                };
                // The owner's bits stay, so the host can always write into it and remove it.
                made.and_then(|_| {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700))
                        .map_err(|_| "cannot set its mode")
                })
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
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
                            return Err(bad_tar(format!("it ends inside {}", shown(&raw))));
                        }
                        out.bytes += n;
                        out.files += 1;
                        f.set_permissions(fs::Permissions::from_mode(mode))
                            .map_err(|_| "cannot set its mode")
                    }
                }
            }
            tar::EntryType::Symlink => match link {
                Some(target) if !target.is_empty() => clear(&path).and_then(|_| {
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                        .map_err(|_| "cannot create the link")
                }),
                _ => Err("a link without a target"),
            },
            tar::EntryType::Link => match checked_path(&link.unwrap_or_default()) {
                Err(why) => Err(why),
                Ok(tparts) => parent_chain(dest, &tparts).and_then(|tpath| {
                    match fs::symlink_metadata(&tpath) {
                        Ok(m) if m.file_type().is_file() => clear(&path).and_then(|_| {
                            fs::hard_link(&tpath, &path).map_err(|_| "cannot create the hard link")
                        }),
                        _ => Err("a hard link to something that is not a file written before"),
                    }
                }),
            },
            _ => Err("a device, fifo or other special file"),
        };
        if let Err(why) = done {
            out.refuse(&raw, why);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
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

    /// A header of `kind` for `name` (bytes) that claims `size` bytes of data.
    fn header(name: &[u8], kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        v
    }

    /// A reader of `head` and then `tail_byte` for ever, counting what was read.
    struct Endless {
        head: Vec<u8>,
        at: usize,
        tail_byte: u8,
        read: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = if self.at < self.head.len() {
                let n = buf.len().min(self.head.len() - self.at);
                buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
                self.at += n;
                n
            } else {
                buf.fill(self.tail_byte);
                buf.len()
            };
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    /// A hostile engine's long name or PAX header claiming gigabytes is refused at its header:
    /// the tar crate alone would read all of it (up to archive_max_bytes) into memory.
    #[test]
    fn a_huge_long_name_or_pax_header_is_not_read_into_memory() {
        for kind in [
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
            tar::EntryType::XHeader,
        ] {
            let root = tempfile::tempdir().unwrap();
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let src = Endless {
                head: header(b"././@LongLink", kind, 300 << 20),
                at: 0,
                tail_byte: b'a',
                read: read.clone(),
            };
            let got = extract(src, root.path(), 8 << 30);
            assert!(
                matches!(&got, Err(ExtractError::Io(e)) if e.to_string().contains("long name or PAX")),
                "{kind:?}: {got:?}"
            );
            assert!(read.get() < 1 << 20, "{kind:?}: read {} bytes", read.get());
        }
    }

    /// Names that are not UTF-8 are kept byte for byte (two of them once became the same
    /// name with U+FFFD, and the second replaced the first), whether in the header, in a GNU
    /// long name or in a PAX path.
    #[test]
    fn names_are_kept_byte_for_byte() {
        let root = tempfile::tempdir().unwrap();
        let mut t = Vec::new();
        t.extend(header(b"out/", tar::EntryType::Directory, 0));
        for (name, data) in [(&b"out/a\xff"[..], b"one"), (b"out/a\xfe", b"two")] {
            t.extend(header(name, tar::EntryType::Regular, 3));
            t.extend(padded(data));
        }
        t.extend(header(b"out/a\xef\xbf\xbd", tar::EntryType::Regular, 5));
        t.extend(padded(b"three"));
        let long: Vec<u8> = [&b"out/"[..], &[b'l'; 150], b"\xfa"].concat();
        t.extend(header(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            long.len() as u64 + 1,
        ));
        t.extend(padded(&[&long[..], b"\0"].concat()));
        t.extend(header(b"cut", tar::EntryType::Regular, 4));
        t.extend(padded(b"four"));
        let pax_path: Vec<u8> = [&b"out/"[..], &[b'p'; 120], "é".as_bytes()].concat();
        let record = {
            let body = [&b" path="[..], &pax_path, b"\n"].concat();
            let mut n = body.len() + 1;
            while n.to_string().len() + body.len() != n {
                n += 1;
            }
            [n.to_string().as_bytes(), &body].concat()
        };
        t.extend(header(b"pax", tar::EntryType::XHeader, record.len() as u64));
        t.extend(padded(&record));
        t.extend(header(b"cut2", tar::EntryType::Regular, 4));
        t.extend(padded(b"five"));
        t.extend(std::iter::repeat_n(0u8, 1024));
        let got = extract(&t[..], root.path(), 1 << 20).unwrap();
        assert_eq!(got.refused_total, 0, "{got:?}");
        let read = |n: &[u8]| fs::read(root.path().join(OsStr::from_bytes(n))).unwrap();
        assert_eq!(read(b"a\xff"), b"one");
        assert_eq!(read(b"a\xfe"), b"two");
        assert_eq!(read("a\u{fffd}".as_bytes()), b"three");
        assert_eq!(read(&long[4..]), b"four");
        assert_eq!(read(&pax_path[4..]), b"five");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 5);
    }

    /// A stream that fails inside a file (an engine gone mid-copy) fails the copy; it was a
    /// refused entry once, and the output passed as whole. A GNU sparse entry stops it too.
    #[test]
    fn a_read_failing_mid_file_or_a_sparse_entry_stops_the_copy() {
        struct Failing(Vec<u8>, usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 >= self.0.len() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "went quiet"));
                }
                let n = buf.len().min(self.0.len() - self.1);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let root = tempfile::tempdir().unwrap();
        let mut t = header(b"out/f", tar::EntryType::Regular, 100_000);
        t.extend(vec![b'x'; 5000]);
        let got = extract(Failing(t, 0), root.path(), 1 << 20);
        assert!(
            matches!(&got, Err(ExtractError::Io(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{got:?}"
        );
        let mut t = header(b"out/s", tar::EntryType::GNUSparse, 0);
        t.extend(std::iter::repeat_n(0u8, 1024));
        let got = extract(&t[..], root.path(), 1 << 20);
        assert!(
            matches!(&got, Err(ExtractError::Io(e)) if e.to_string().contains("sparse")),
            "{got:?}"
        );
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
