//! 7z archives of build output, written in-process (no 7z program at run time), and the five
//! archive hashes 7-Zip offers: CRC32, CRC64, SHA1, SHA256 and BLAKE2sp, as upper-case hex.
//!
//! Symbolic links are stored as links (7-Zip's Unix extension), never followed, so an archive can
//! never pull in files from outside the folder being packed.

use ams_core::pipeline::HashKind;
use sevenz_rust2::encoder_options::Lzma2Options;
use sevenz_rust2::{
    prepare_block, ArchiveEntry, ArchiveWriter, EncoderConfiguration, NtTime, PreparedBlock,
    SourceReader,
};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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
/// sequence as `%XX` (a lossy conversion would turn every such name into U+FFFD). That can
/// still meet a real name spelled with `%XX` (`z%FF.txt` beside the bytes `z\xFF.txt`): `walk`
/// keeps the names of one folder distinct by suffixing a repeat with `~N`.
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
    /// Names that read the same as another of their folder once stored, stored with `~N`.
    pub renamed: u64,
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

/// How `pack_dir` lays out an archive. The defaults are what the host uses.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Threads compressing solid blocks at once (each holds its own LZMA encoder, about 10×
    /// its dictionary in memory).
    pub threads: usize,
    /// The most uncompressed bytes a solid block takes. Extracting one file decompresses its
    /// block up to that file, so this bounds the work of a single-file download; a file larger
    /// than this is a block of its own.
    pub block_bytes: u64,
    /// The most files a solid block takes (bounds the same work for many tiny files).
    pub block_files: usize,
    /// The largest LZMA dictionary; a smaller block gets a smaller one.
    pub dict_bytes: u32,
    /// Files are grouped by extension (then path) inside the solid blocks, as 7-Zip does, so
    /// similar contents sit together.
    pub sort_by_type: bool,
}

/// Solid blocks hold at most this many uncompressed bytes (see ARCHITECTURE.md, "Archives").
pub const SOLID_BLOCK_BYTES: u64 = 16 << 20;
/// Solid blocks hold at most this many files.
pub const SOLID_BLOCK_FILES: usize = 4096;

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            threads: 2,
            block_bytes: SOLID_BLOCK_BYTES,
            block_files: SOLID_BLOCK_FILES,
            dict_bytes: 8 << 20,
            sort_by_type: true,
        }
    }
}

/// Packs the contents of `dir` into a new 7z file at `dest` (LZMA2, solid blocks of at most
/// [`SOLID_BLOCK_BYTES`], compressed on two threads). Paths inside the archive are relative to
/// `dir`. The archive is written to a temporary name and renamed when complete, so a crash never
/// leaves a truncated archive under the final name.
pub fn pack_dir(dir: &Path, dest: &Path) -> Result<PackSummary, ArchiveError> {
    pack_dir_with(dir, dest, &PackOptions::default())
}

/// [`pack_dir`] with other options (benchmarks, tests).
pub fn pack_dir_with(
    dir: &Path,
    dest: &Path,
    opts: &PackOptions,
) -> Result<PackSummary, ArchiveError> {
    let tmp = dest.with_extension("7z.partial");
    let result = (|| {
        // Listed first, then read: the walk describes every entry without following links.
        let mut items = Vec::new();
        let mut summary = PackSummary::default();
        walk(dir, "", &mut items, &mut summary, 0)?;
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
        if items.is_empty() {
            // No entries: the signature header alone. The writer would build an LZMA encoder
            // (tens of megabytes of tables) to compress an empty header.
            use std::io::Write;
            let mut file = file;
            file.write_all(&empty_archive()).map_err(io_err(&tmp))?;
            return Ok(summary);
        }
        let mut w = ArchiveWriter::new(file).map_err(|e| ArchiveError::SevenZ(e.to_string()))?;
        write_items(&mut w, items, opts, &mut summary)?;
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

/// A 7z archive with no entries: the 32-byte signature header (signature, format version 0.4,
/// the CRC of the rest) pointing at an empty next header.
fn empty_archive() -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..8].copy_from_slice(b"7z\xbc\xaf\x27\x1c\x00\x04");
    // Next header offset, size (both 0) and CRC (0): the 20 bytes after the start header CRC.
    let crc = crc32fast::hash(&a[12..32]);
    a[8..12].copy_from_slice(&crc.to_le_bytes());
    a
}

/// Whether `dir` has no entries (or cannot be read: packing it then reports why).
pub fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// One entry found by the walk.
struct Item {
    entry: ArchiveEntry,
    data: Data,
}

enum Data {
    /// A directory or an empty file: no stream.
    None,
    /// A symbolic link's target.
    Link(Vec<u8>),
    /// A regular file as listed (its size then), opened only when its block is compressed.
    File(PathBuf, u64),
}

impl Item {
    fn len(&self) -> u64 {
        match &self.data {
            Data::None => 0,
            Data::Link(b) => b.len() as u64,
            Data::File(_, n) => *n,
        }
    }
}

fn walk(
    dir: &Path,
    prefix: &str,
    items: &mut Vec<Item>,
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
    let mut seen = std::collections::HashSet::new();
    for de in names {
        let path = de.path();
        let mut base = entry_name(&de.file_name());
        // Two names of one folder that read the same in the archive: the later one is renamed,
        // so neither overwrites the other on extraction and each downloads on its own.
        if !seen.insert(base.clone()) {
            let mut n = 1;
            while !seen.insert(format!("{base}~{n}")) {
                n += 1;
            }
            base = format!("{base}~{n}");
            summary.renamed += 1;
        }
        let name = format!("{prefix}{base}");
        // symlink_metadata: a link is described, never followed.
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err(&path))?;
            let bytes = target.as_os_str().as_encoded_bytes().to_vec();
            items.push(Item {
                entry: entry(name, &meta, false),
                data: Data::Link(bytes),
            });
            summary.symlinks += 1;
        } else if ft.is_dir() {
            items.push(Item {
                entry: entry(name.clone(), &meta, true),
                data: Data::None,
            });
            summary.dirs += 1;
            walk(&path, &format!("{name}/"), items, summary, depth + 1)?;
        } else if ft.is_file() {
            let data = match meta.len() {
                0 => Data::None,
                n => Data::File(path, n),
            };
            items.push(Item {
                entry: entry(name, &meta, false),
                data,
            });
            summary.files += 1;
        } else {
            summary.skipped += 1;
        }
    }
    Ok(())
}

/// What the readers of all blocks found while reading.
#[derive(Default)]
struct ReadTally {
    bytes: AtomicU64,
    /// Listed as regular files, found to be something else when opened: stored empty.
    replaced: AtomicU64,
    /// The first read error, with its file.
    error: Mutex<Option<ArchiveError>>,
}

/// A block's source: a link's target, or a file opened when the compressor reaches it.
enum Source {
    Bytes(io::Cursor<Vec<u8>>),
    File {
        path: PathBuf,
        file: Option<File>,
        done: bool,
        tally: Arc<ReadTally>,
    },
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (path, slot, done, tally) = match self {
            Source::Bytes(c) => return c.read(buf),
            Source::File {
                path,
                file,
                done,
                tally,
            } => (path, file, done, tally),
        };
        if *done {
            return Ok(0);
        }
        let fail = |e: io::Error| {
            let msg = format!("{}: {e}", path.display());
            tally
                .error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(ArchiveError::Io {
                    path: path.clone(),
                    source: io::Error::new(e.kind(), e.to_string()),
                });
            io::Error::new(e.kind(), msg)
        };
        if slot.is_none() {
            // Opened without following a link and without blocking on a FIFO, then checked
            // again: whatever replaced the entry since it was listed, only a regular file is
            // ever read (anything else is stored empty).
            use std::os::unix::fs::OpenOptionsExt;
            let f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&*path)
                .map_err(fail)?;
            if !f.metadata().map_err(fail)?.is_file() {
                tally.replaced.fetch_add(1, Ordering::Relaxed);
                *done = true;
                return Ok(0);
            }
            *slot = Some(f);
        }
        let n = slot.as_mut().map_or(Ok(0), |f| f.read(buf)).map_err(fail)?;
        if n == 0 {
            // Closed at its end: a block of thousands of files holds one open at a time.
            *slot = None;
            *done = true;
        }
        tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn lzma2(opts: &PackOptions, block_len: u64, threads: u32) -> EncoderConfiguration {
    // A dictionary larger than the block holds nothing more: the smallest power of two that
    // covers it (at least 64 KiB), at most the configured size.
    let dict = block_len
        .clamp(64 << 10, u64::from(opts.dict_bytes))
        .next_power_of_two()
        .min(u64::from(opts.dict_bytes)) as u32;
    let mut o = if threads > 1 {
        Lzma2Options::from_level_mt(5, threads, u64::from(dict).max(4 << 20))
    } else {
        Lzma2Options::from_level(5)
    };
    o.set_dictionary_size(dict);
    EncoderConfiguration::from(o)
}

/// A run of entries compressed as one solid block.
struct Block {
    items: Vec<Item>,
    len: u64,
}

impl Block {
    /// A block larger than the limit holds one file alone; it is encoded straight into the
    /// archive (multithreaded LZMA2 chunks) rather than in memory.
    fn is_big(&self, opts: &PackOptions) -> bool {
        self.len > opts.block_bytes
    }

    fn split(self, tally: &Arc<ReadTally>) -> (Vec<ArchiveEntry>, Vec<SourceReader<Source>>) {
        self.items
            .into_iter()
            .map(|it| {
                let src = match it.data {
                    Data::Link(b) => Source::Bytes(io::Cursor::new(b)),
                    Data::File(path, _) => Source::File {
                        path,
                        file: None,
                        done: false,
                        tally: tally.clone(),
                    },
                    Data::None => Source::Bytes(io::Cursor::new(Vec::new())),
                };
                (it.entry, SourceReader::new(src))
            })
            .unzip()
    }
}

fn extension(name: &str) -> &str {
    let base = name.rsplit('/').next().unwrap_or(name);
    match base.rfind('.') {
        Some(i) if i > 0 => &base[i + 1..],
        _ => "",
    }
}

fn write_items(
    w: &mut ArchiveWriter<File>,
    items: Vec<Item>,
    opts: &PackOptions,
    summary: &mut PackSummary,
) -> Result<(), ArchiveError> {
    let sz = |e: sevenz_rust2::Error| ArchiveError::SevenZ(e.to_string());
    let (mut streams, empty): (Vec<Item>, Vec<Item>) = items
        .into_iter()
        .partition(|i| !matches!(i.data, Data::None));
    // Folders and empty files have no data and belong to no block.
    for it in empty {
        w.push_archive_entry::<&[u8]>(it.entry, None).map_err(sz)?;
    }
    if opts.sort_by_type {
        // Stable: within one extension the walk's order (by path) stays.
        streams.sort_by(|a, b| extension(&a.entry.name).cmp(extension(&b.entry.name)));
    }
    // Blocks of about equal size, as many as the limit needs rounded up to a multiple of the
    // threads, so that the threads finish together (an output of under 1 MiB stays one block).
    let threads = opts.threads.max(1);
    let total: u64 = streams.iter().map(Item::len).sum();
    let target = if total < 1 << 20 {
        opts.block_bytes
    } else {
        let t = threads as u64;
        let n = total.div_ceil(opts.block_bytes.max(1)).div_ceil(t) * t;
        total.div_ceil(n).min(opts.block_bytes)
    };
    let mut blocks: Vec<Block> = Vec::new();
    for it in streams {
        let n = it.len();
        match blocks.last_mut() {
            Some(b)
                if b.len < target
                    && b.len + n <= opts.block_bytes
                    && b.items.len() < opts.block_files.max(1) =>
            {
                b.len += n;
                b.items.push(it);
            }
            _ => blocks.push(Block {
                items: vec![it],
                len: n,
            }),
        }
    }
    let tally = Arc::new(ReadTally::default());
    // Blocks are compressed on `threads` workers and appended in order; a worker runs at most
    // `ahead` blocks past the last one appended, which bounds the compressed bytes held.
    let ahead = threads * 2;
    let total = blocks.len();
    let big: Vec<bool> = blocks.iter().map(|b| b.is_big(opts)).collect();
    let lens: Vec<u64> = blocks.iter().map(|b| b.len).collect();
    let queue: Mutex<Vec<Option<Block>>> = Mutex::new(blocks.into_iter().map(Some).collect());
    let gate = (Mutex::new((0usize, 0usize, false)), Condvar::new()); // (next, appended, stop)
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<PreparedBlock, String>)>();
    let take = |i: usize| {
        queue.lock().unwrap_or_else(|p| p.into_inner())[i]
            .take()
            .expect("each block is taken once")
    };
    let result = std::thread::scope(|s| -> Result<(), ArchiveError> {
        for _ in 0..threads {
            let tx = tx.clone();
            let (gate, take, tally, big) = (&gate, &take, &tally, &big);
            let lens = &lens;
            s.spawn(move || loop {
                let i = {
                    let (m, cv) = gate;
                    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        while g.0 < total && big[g.0] {
                            g.0 += 1;
                        }
                        if g.2 || g.0 >= total {
                            return;
                        }
                        if g.0 < g.1 + ahead {
                            break;
                        }
                        g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    g.0 += 1;
                    g.0 - 1
                };
                let (entries, readers) = take(i).split(tally);
                let methods = Arc::new(vec![lzma2(opts, lens[i], 1)]);
                let r = prepare_block(methods, entries, readers).map_err(|e| e.to_string());
                if tx.send((i, r)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let stop = || {
            let (m, cv) = &gate;
            m.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
            cv.notify_all();
        };
        let mut ready = std::collections::HashMap::new();
        for i in 0..total {
            let step = if big[i] {
                let (entries, readers) = take(i).split(&tally);
                w.set_content_methods(vec![lzma2(opts, lens[i], threads as u32)]);
                w.push_archive_entries(entries, readers)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                let block = loop {
                    if let Some(b) = ready.remove(&i) {
                        break b;
                    }
                    match rx.recv() {
                        Ok((j, b)) => {
                            ready.insert(j, b);
                        }
                        Err(_) => break Err("a compressing thread ended early".to_string()),
                    }
                };
                block.and_then(|b| {
                    w.push_prepared_block(b)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            };
            if let Err(e) = step {
                stop();
                let read_error = tally.error.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(read_error.unwrap_or(ArchiveError::SevenZ(e)));
            }
            let (m, cv) = &gate;
            m.lock().unwrap_or_else(|p| p.into_inner()).1 = i + 1;
            cv.notify_all();
        }
        Ok(())
    });
    result?;
    let replaced = tally.replaced.load(Ordering::Relaxed);
    summary.files -= replaced;
    summary.skipped += replaced;
    summary.bytes = tally.bytes.load(Ordering::Relaxed);
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
/// Opens `archive` and reads its header; `None` for the empty archive (no entries), which the
/// reader does not take.
fn open_archive(archive: &Path) -> Result<Option<(File, sevenz_rust2::Archive)>, ArchiveError> {
    use std::io::Seek;
    let mut f = File::open(archive).map_err(io_err(archive))?;
    let len = f.metadata().map_err(io_err(archive))?.len();
    if len == 32 {
        let mut head = [0u8; 32];
        f.read_exact(&mut head).map_err(io_err(archive))?;
        if head == empty_archive() {
            return Ok(None);
        }
        f.rewind().map_err(io_err(archive))?;
    }
    let a = sevenz_rust2::Archive::read(&mut f, &sevenz_rust2::Password::empty())
        .map_err(read_err(archive))?;
    Ok(Some((f, a)))
}

pub fn list(archive: &Path) -> Result<Vec<ArchivedFile>, ArchiveError> {
    let Some((_, a)) = open_archive(archive)? else {
        return Ok(Vec::new());
    };
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
    let Some((mut f, a)) = open_archive(archive)? else {
        return Err(ExtractError::NotFound(name.to_string()));
    };
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
    fn names_that_meet_once_stored_are_kept_apart() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("z%FF.txt"), b"literal").unwrap();
        fs::write(
            src.join(std::ffi::OsStr::from_bytes(b"z\xff.txt")),
            b"invalid",
        )
        .unwrap();
        let dest = t.path().join("a.7z");
        let s = pack_dir(&src, &dest).unwrap();
        assert_eq!(s.renamed, 1);
        let files = list(&dest).unwrap();
        let mut names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        names.sort();
        assert_eq!(names, ["z%FF.txt", "z%FF.txt~1"]);
        let get = |n: &str| {
            let mut out = Vec::new();
            extract_one(&dest, n, &mut |_| {}, &mut out).unwrap();
            out
        };
        let mut both = vec![get("z%FF.txt"), get("z%FF.txt~1")];
        both.sort();
        assert_eq!(both, [b"invalid".to_vec(), b"literal".to_vec()]);
    }

    /// An empty output is the 32-byte empty archive, which 7-Zip tests and lists as empty
    /// and which our own listing reads.
    #[test]
    fn an_empty_output_is_the_empty_archive() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        fs::create_dir_all(&src).unwrap();
        assert!(is_empty_dir(&src));
        let dest = t.path().join("a.7z");
        let s = pack_dir(&src, &dest).unwrap();
        assert_eq!((s.files, s.bytes), (0, 0));
        assert_eq!(fs::metadata(&dest).unwrap().len(), 32);
        let dest_s = dest.to_str().unwrap();
        assert!(sevenz(&["t", dest_s]).contains("Everything is Ok"));
        assert!(sevenz(&["l", dest_s]).contains("0 files"));
        assert!(list(&dest).unwrap().is_empty());
        let e = extract_one(&dest, "x", &mut |_| {}, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ExtractError::NotFound(_)), "{e}");
        fs::create_dir(src.join("d")).unwrap();
        assert!(!is_empty_dir(&src));
    }

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

    /// Text that compresses like source code: words from a small vocabulary, seeded.
    fn text(seed: u64, len: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "fn ", "let ", "match ", "Some(x)", " => ", "return ", "self.", "impl ", "{\n", "}\n",
            "pub ", "u64",
        ];
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(WORDS[(x >> 33) as usize % WORDS.len()].as_bytes());
        }
        out.truncate(len);
        out
    }

    fn sevenz(args: &[&str]) -> String {
        let o = std::process::Command::new("7z")
            .args(args)
            .output()
            .expect("7z (p7zip-full) is installed");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "7z {args:?}: {out}");
        out
    }

    /// Files share solid blocks; no block holds more than the limits (a file larger than the
    /// byte limit alone); 7-Zip tests and extracts the archive to the same bytes, links stay
    /// links, set-id bits are gone.
    #[test]
    fn solid_blocks_are_bounded_and_extract_to_the_same_tree() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        let mut want = std::collections::BTreeMap::new();
        for d in 0..4 {
            fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
            for f in 0..15 {
                let name = format!("d{d}/f{f}.{}", ["rs", "md", "txt"][f % 3]);
                let data = text(d * 100 + f as u64, 3_000 + 500 * f);
                fs::write(src.join(&name), &data).unwrap();
                want.insert(name, data);
            }
        }
        let big = text(7, 300_000);
        fs::write(src.join("big.bin"), &big).unwrap();
        want.insert("big.bin".to_string(), big);
        fs::write(src.join("empty"), b"").unwrap();
        want.insert("empty".to_string(), Vec::new());
        fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o6755)).unwrap();
        want.insert("suid".to_string(), b"#!/bin/sh\n".to_vec());
        std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).unwrap();

        let opts = PackOptions {
            block_bytes: 64 << 10,
            block_files: 8,
            ..PackOptions::default()
        };
        let dest = t.path().join("out.7z");
        let s = pack_dir_with(&src, &dest, &opts).unwrap();
        assert_eq!((s.files, s.dirs, s.symlinks), (63, 4, 1));
        let bytes: u64 = want.values().map(|v| v.len() as u64).sum();
        assert_eq!(
            s.bytes, bytes,
            "every file read once, the link not followed"
        );

        let a = sevenz_rust2::Archive::open(&dest).unwrap();
        let mut per_block = vec![(0usize, 0u64); a.blocks.len()];
        for (e, b) in a.files.iter().zip(&a.stream_map.file_block_index) {
            if let Some(b) = b {
                per_block[*b].0 += 1;
                per_block[*b].1 += e.size;
            }
            if e.name == "suid" {
                assert_eq!(
                    (e.windows_attributes >> 16) & 0o7777,
                    0o755,
                    "set-id bits dropped"
                );
            }
        }
        assert!(a.blocks.len() >= 7, "{} blocks", a.blocks.len());
        assert!(
            per_block.iter().any(|(n, _)| *n > 1),
            "solid: {per_block:?}"
        );
        for (n, len) in &per_block {
            assert!(*n <= 8, "{per_block:?}");
            assert!(*len <= 64 << 10 || *n == 1, "{per_block:?}");
        }

        let d = dest.to_str().unwrap();
        assert!(sevenz(&["t", d]).contains("Everything is Ok"));
        let x = t.path().join("x");
        sevenz(&["x", d, &format!("-o{}", x.display())]);
        for (name, data) in &want {
            assert_eq!(&fs::read(x.join(name)).unwrap(), data, "{name}");
        }
        // 7-Zip makes an absolute link relative to its output folder when extracting; the
        // stored target is the link's own.
        let link = fs::symlink_metadata(x.join("escape")).unwrap();
        assert!(link.file_type().is_symlink());
        let mut r =
            sevenz_rust2::ArchiveReader::open(&dest, sevenz_rust2::Password::empty()).unwrap();
        assert_eq!(r.read_file("escape").unwrap(), b"/etc/passwd");
    }

    /// By default a tree of many small files is one solid block, compressed together.
    #[test]
    fn small_files_share_one_block_by_default() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("out");
        fs::create_dir_all(&src).unwrap();
        for f in 0..200 {
            fs::write(src.join(format!("f{f:03}.rs")), text(f, 2_000)).unwrap();
        }
        let dest = t.path().join("out.7z");
        pack_dir(&src, &dest).unwrap();
        let a = sevenz_rust2::Archive::open(&dest).unwrap();
        assert_eq!(a.blocks.len(), 1);
        assert_eq!(a.files.len(), 200);
    }

    /// Files are grouped by extension inside the blocks; the walk's order stays within one.
    #[test]
    fn extension_of_a_name() {
        assert_eq!(extension("a/b.rs"), "rs");
        assert_eq!(extension("a.b/c"), "");
        assert_eq!(extension(".hidden"), "");
        assert_eq!(extension("x.tar.gz"), "gz");
    }
}
