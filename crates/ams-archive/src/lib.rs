//! 7z archives of build output, written in-process (no 7z program at run time), and the five
//! archive hashes 7-Zip offers: CRC32, CRC64, SHA1, SHA256 and BLAKE2sp, as upper-case hex.
//!
//! Symbolic links are stored as links (7-Zip's Unix extension), never followed, so an archive can
//! never pull in files from outside the folder being packed.

use ams_core::pipeline::HashKind;
use sevenz_rust2::encoder_options::Lzma2Options;
use sevenz_rust2::{ArchiveEntry, ArchiveWriter, EncoderConfiguration, NtTime};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("7z writer: {0}")]
    SevenZ(String),
    #[error("{0} is nested more than {MAX_DEPTH} folders deep; keep the output shallower")]
    TooDeep(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// 7-Zip marks attributes that carry a Unix mode in their high 16 bits with this flag.
const UNIX_EXTENSION: u32 = 0x8000;
const FILE_ATTRIBUTE_DIRECTORY: u32 = 0x10;
const FILE_ATTRIBUTE_ARCHIVE: u32 = 0x20;

/// A file name as 7z stores it (Unicode): valid UTF-8 as it is; each byte of an invalid
/// sequence as `%XX`, so two different names never become one (a lossy conversion would turn
/// both into U+FFFD and one file would overwrite the other on extraction).
fn entry_name(name: &std::ffi::OsStr) -> String {
    let bytes = name.as_encoded_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut out = String::with_capacity(bytes.len() + 8);
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for b in chunk.invalid() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        }
    }
}

/// The deepest folder nesting packed.
pub const MAX_DEPTH: usize = 256;

/// What was packed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sockets, FIFOs and devices, which are left out.
    pub skipped: u64,
    pub bytes: u64,
}

fn mtime(meta: &fs::Metadata) -> Option<NtTime> {
    meta.modified().ok().and_then(|m| NtTime::try_from(m).ok())
}

fn entry(name: String, meta: &fs::Metadata, is_dir: bool) -> ArchiveEntry {
    let mut e = if is_dir {
        ArchiveEntry::new_directory(&name)
    } else {
        ArchiveEntry::new_file(&name)
    };
    if let Some(t) = mtime(meta) {
        e.last_modified_date = t;
        e.has_last_modified_date = true;
    }
    // Set-user-id and set-group-id bits are never stored.
    let mode = meta.mode() & 0xFFFF & !0o6000;
    e.has_windows_attributes = true;
    e.windows_attributes = UNIX_EXTENSION
        | (mode << 16)
        | if is_dir {
            FILE_ATTRIBUTE_DIRECTORY
        } else {
            FILE_ATTRIBUTE_ARCHIVE
        };
    e
}

/// The bytes packing `dir` would read: the apparent size of every regular file below it, links
/// not followed (a sparse file counts in full, as the packer reads it in full).
pub fn apparent_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                total = total.saturating_add(e.metadata()?.len());
            }
        }
    }
    Ok(total)
}

/// Packs the contents of `dir` into a new 7z file at `dest` (LZMA2). Paths inside the archive are
/// relative to `dir`. The archive is written to a temporary name and renamed when complete, so a
/// crash never leaves a truncated archive under the final name.
pub fn pack_dir(dir: &Path, dest: &Path) -> Result<PackSummary, ArchiveError> {
    let tmp = dest.with_extension("7z.partial");
    let result = (|| {
        // Archives hold a build's output: readable by the host's user alone.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?
        };
        let mut w = ArchiveWriter::new(file).map_err(|e| ArchiveError::SevenZ(e.to_string()))?;
        w.set_content_methods(vec![EncoderConfiguration::from(Lzma2Options::from_level(
            5,
        ))]);
        let mut summary = PackSummary::default();
        walk(dir, "", &mut w, &mut summary, 0)?;
        w.finish().map_err(io_err(&tmp))?;
        Ok(summary)
    })();
    match result {
        Ok(s) => {
            fs::rename(&tmp, dest).map_err(io_err(dest))?;
            Ok(s)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn walk(
    dir: &Path,
    prefix: &str,
    w: &mut ArchiveWriter<File>,
    summary: &mut PackSummary,
    depth: usize,
) -> Result<(), ArchiveError> {
    if depth > MAX_DEPTH {
        return Err(ArchiveError::TooDeep(dir.to_path_buf()));
    }
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(dir))?;
    names.sort_by_key(|e| e.file_name());
    for de in names {
        let path = de.path();
        let name = format!("{prefix}{}", entry_name(&de.file_name()));
        // symlink_metadata: a link is described, never followed.
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let ft = meta.file_type();
        let sz = |e: sevenz_rust2::Error| ArchiveError::SevenZ(format!("{name}: {e}"));
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err(&path))?;
            let bytes = target.as_os_str().as_encoded_bytes().to_vec();
            let e = entry(name.clone(), &meta, false);
            w.push_archive_entry(e, Some(io::Cursor::new(bytes)))
                .map_err(sz)?;
            summary.symlinks += 1;
        } else if ft.is_dir() {
            w.push_archive_entry::<&[u8]>(entry(name.clone(), &meta, true), None)
                .map_err(sz)?;
            summary.dirs += 1;
            walk(&path, &format!("{name}/"), w, summary, depth + 1)?;
        } else if ft.is_file() {
            // Opened without following a link and without blocking on a FIFO, then checked
            // again: whatever replaced the entry since it was listed, only a regular file is
            // ever read.
            let f = {
                use std::os::unix::fs::OpenOptionsExt;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                    .open(&path)
                    .map_err(io_err(&path))?
            };
            if !f.metadata().map_err(io_err(&path))?.is_file() {
                summary.skipped += 1;
                continue;
            }
            w.push_archive_entry(entry(name.clone(), &meta, false), Some(f))
                .map_err(sz)?;
            summary.files += 1;
            summary.bytes += meta.len();
        } else {
            summary.skipped += 1;
        }
    }
    Ok(())
}

/// Hashes a file with one of 7-Zip's hash methods; upper-case hex as 7-Zip prints it.
pub fn hash_file(path: &Path, kind: HashKind) -> Result<String, ArchiveError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Hasher::new(kind);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Incremental hasher over any of the five methods.
pub enum Hasher {
    Crc32(crc32fast::Hasher),
    Crc64(crc64fast::Digest),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Blake2sp(Box<blake2s_simd::blake2sp::State>),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    pub fn new(kind: HashKind) -> Self {
        use sha1::Digest;
        match kind {
            HashKind::Crc32 => Hasher::Crc32(crc32fast::Hasher::new()),
            HashKind::Crc64 => Hasher::Crc64(crc64fast::Digest::new()),
            HashKind::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashKind::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashKind::Blake2sp => Hasher::Blake2sp(Box::new(blake2s_simd::blake2sp::State::new())),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        use sha1::Digest;
        match self {
            Hasher::Crc32(h) => h.update(data),
            Hasher::Crc64(h) => h.write(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake2sp(h) => {
                h.update(data);
            }
        }
    }

    pub fn finish(self) -> String {
        use sha1::Digest;
        let bytes: Vec<u8> = match self {
            Hasher::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            Hasher::Crc64(h) => h.sum64().to_be_bytes().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Blake2sp(h) => h.finalize().as_bytes().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02X}")).collect()
    }
}

/// One entry of an archive, as [`list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArchivedFile {
    /// The path inside the archive, `/`-separated.
    pub path: String,
    /// `file`, `dir` or `link`.
    pub kind: &'static str,
    /// Bytes of a file (a link's target length for a link, 0 for a folder).
    pub size: u64,
    /// The Unix permission bits, when stored.
    pub mode: Option<u32>,
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

fn unix_mode(e: &ArchiveEntry) -> Option<u32> {
    (e.has_windows_attributes && e.windows_attributes & UNIX_EXTENSION != 0)
        .then_some(e.windows_attributes >> 16)
}

fn kind_of(e: &ArchiveEntry) -> &'static str {
    if e.is_directory() {
        "dir"
    } else if unix_mode(e).is_some_and(|m| m & S_IFMT == S_IFLNK) {
        "link"
    } else {
        "file"
    }
}

fn read_err(path: &Path) -> impl FnOnce(sevenz_rust2::Error) -> ArchiveError + '_ {
    move |e| match e {
        sevenz_rust2::Error::Io(source, _) => ArchiveError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => ArchiveError::SevenZ(format!("{}: {other}", path.display())),
    }
}

/// The entries of an archive, in stored order, from its header alone (no content is
/// decompressed).
pub fn list(archive: &Path) -> Result<Vec<ArchivedFile>, ArchiveError> {
    let mut f = File::open(archive).map_err(io_err(archive))?;
    let a = sevenz_rust2::Archive::read(&mut f, &sevenz_rust2::Password::empty())
        .map_err(read_err(archive))?;
    Ok(a.files
        .iter()
        .map(|e| ArchivedFile {
            path: e.name().to_string(),
            kind: kind_of(e),
            size: if e.is_directory() { 0 } else { e.size },
            mode: unix_mode(e).map(|m| m & 0o7777),
        })
        .collect())
}

/// Why one file could not be taken out of an archive.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("the archive holds no file named {0:?}")]
    NotFound(String),
    #[error("{0:?} is a {1}, not a file")]
    NotAFile(String, &'static str),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The writer refused the bytes (a client that went away, say).
    #[error("writing the file out failed: {0}")]
    Write(io::Error),
}

/// Writes the content of the regular file `name` of `archive` to `out`, decompressing only the
/// block that holds it; returns the bytes written. The name is matched exactly against the
/// archive's entries and never touches the file system. Links and folders are refused.
///
/// `found` hears the file's size once the entry is known to be a regular file, before any
/// byte is written (a server can then answer with its headers, or with 404 on an error).
pub fn extract_one(
    archive: &Path,
    name: &str,
    found: &mut dyn FnMut(u64),
    out: &mut dyn io::Write,
) -> Result<u64, ExtractError> {
    let mut f = File::open(archive).map_err(io_err(archive))?;
    let a = sevenz_rust2::Archive::read(&mut f, &sevenz_rust2::Password::empty())
        .map_err(read_err(archive))?;
    let index = a
        .files
        .iter()
        .position(|e| e.name() == name)
        .ok_or_else(|| ExtractError::NotFound(name.to_string()))?;
    let entry = &a.files[index];
    let kind = kind_of(entry);
    if kind != "file" {
        return Err(ExtractError::NotAFile(name.to_string(), kind));
    }
    found(entry.size);
    let Some(block) = a.stream_map.file_block_index[index] else {
        // An empty file has no stream.
        return Ok(0);
    };
    let password = sevenz_rust2::Password::empty();
    let mut written = 0u64;
    let mut write_failed: Option<io::Error> = None;
    let target: *const ArchiveEntry = entry;
    sevenz_rust2::BlockDecoder::new(1, block, &a, &password, &mut f)
        .for_each_entries(&mut |e, r| {
            if std::ptr::eq(e, target) {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    if let Err(err) = out.write_all(&buf[..n]) {
                        write_failed = Some(err);
                        return Ok(false);
                    }
                    written += n as u64;
                }
                Ok(false)
            } else {
                // Earlier files of a solid block are decoded to reach this one.
                io::copy(r, &mut io::sink())?;
                Ok(true)
            }
        })
        .map_err(read_err(archive))?;
    if let Some(e) = write_failed {
        return Err(ExtractError::Write(e));
    }
    out.flush().map_err(ExtractError::Write)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_stay_distinct() {
        use std::os::unix::ffi::OsStrExt;
        let a = entry_name(std::ffi::OsStr::from_bytes(b"a\xff"));
        let b = entry_name(std::ffi::OsStr::from_bytes(b"a\xfe"));
        assert_eq!(a, "a%FF");
        assert_ne!(a, b);
        assert_eq!(entry_name(std::ffi::OsStr::new("caf\u{e9}")), "caf\u{e9}");
    }

    fn hash_bytes(kind: HashKind, data: &[u8]) -> String {
        let mut h = Hasher::new(kind);
        h.update(data);
        h.finish()
    }

    #[test]
    fn reference_values_from_formats_md() {
        let d = b"123456789";
        assert_eq!(hash_bytes(HashKind::Crc32, d), "CBF43926");
        assert_eq!(hash_bytes(HashKind::Crc64, d), "995DC9BBDF1939FA");
        assert_eq!(
            hash_bytes(HashKind::Sha1, d),
            "F7C3BC1D808E04732ADF679965CCC34CA7AE3441"
        );
        assert_eq!(
            hash_bytes(HashKind::Sha256, d),
            "15E2B0D3C33891EBB0F1EF609EC419420C20E320CE94C65FBC8C3312448EB225"
        );
        assert_eq!(
            hash_bytes(HashKind::Blake2sp, d),
            "D6D3157BD4E809982E0EEA22C5AF5CDDF05473F6ECBE353119591E6CDCB7127E"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        for kind in [
            HashKind::Crc32,
            HashKind::Crc64,
            HashKind::Sha1,
            HashKind::Blake2sp,
        ] {
            let mut h = Hasher::new(kind);
            for c in data.chunks(777) {
                h.update(c);
            }
            assert_eq!(h.finish(), hash_bytes(kind, &data));
        }
    }

    #[test]
    fn lists_entries_and_extracts_one_file_exactly() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        fs::create_dir_all(src.join("reports/deep")).unwrap();
        // Several files, so that in a solid block the wanted one is not the first.
        let mut expected = Vec::new();
        for i in 0..20u32 {
            let data: Vec<u8> = (0..(5000 + i * 997)).map(|j| (j * 31 + i) as u8).collect();
            fs::write(src.join(format!("reports/deep/f{i:02}.bin")), &data).unwrap();
            expected.push(data);
        }
        fs::write(src.join("empty.txt"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let dest = t.path().join("a.7z");
        pack_dir(&src, &dest).unwrap();

        let files = list(&dest).unwrap();
        let find = |p: &str| files.iter().find(|f| f.path == p).cloned();
        assert_eq!(find("reports").unwrap().kind, "dir");
        assert_eq!(find("link").unwrap().kind, "link");
        let f13 = find("reports/deep/f13.bin").unwrap();
        assert_eq!((f13.kind, f13.size), ("file", expected[13].len() as u64));
        assert_eq!(find("empty.txt").unwrap().size, 0);

        let mut out = Vec::new();
        let n = extract_one(&dest, "reports/deep/f13.bin", &mut |_| {}, &mut out).unwrap();
        assert_eq!(n as usize, expected[13].len());
        assert_eq!(out, expected[13], "the file comes back byte for byte");
        let mut out = Vec::new();
        assert_eq!(
            extract_one(&dest, "empty.txt", &mut |_| {}, &mut out).unwrap(),
            0
        );
        assert!(matches!(
            extract_one(&dest, "link", &mut |_| {}, &mut Vec::new()),
            Err(ExtractError::NotAFile(_, "link"))
        ));
        assert!(matches!(
            extract_one(&dest, "reports", &mut |_| {}, &mut Vec::new()),
            Err(ExtractError::NotAFile(_, "dir"))
        ));
        for missing in ["../out/empty.txt", "/empty.txt", "nope", "reports/deep/"] {
            assert!(
                matches!(
                    extract_one(&dest, missing, &mut |_| {}, &mut Vec::new()),
                    Err(ExtractError::NotFound(_))
                ),
                "{missing}"
            );
        }
        // A writer that fails (a client gone) stops the extraction with that error.
        struct Broken;
        impl io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(
            extract_one(&dest, "reports/deep/f13.bin", &mut |_| {}, &mut Broken),
            Err(ExtractError::Write(_))
        ));
    }

    #[test]
    fn packs_files_dirs_and_links_without_following() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("a.txt"), b"hello").unwrap();
        fs::write(src.join("sub/b.bin"), vec![1u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).unwrap();
        let dest = t.path().join("out.7z");
        let s = pack_dir(&src, &dest).unwrap();
        assert_eq!((s.files, s.dirs, s.symlinks), (2, 1, 1));
        assert_eq!(s.bytes, 10_005, "the link target was not read");
        assert!(dest.exists());
        assert!(!t.path().join("out.7z.partial").exists());
    }
}
