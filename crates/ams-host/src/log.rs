//! Build logs: `output.txt` plus live subscribers.
//!
//! [`BuildLog`] appends to the file and publishes the very same bytes, each chunk tagged with
//! its offset in the file, on a bounded broadcast channel. Past the configured size it writes one
//! visible truncation marker and drops the rest. A subscriber that falls behind loses chunks from
//! the channel, never memory: it catches up by reading the file from its own offset, so memory
//! stays bounded whatever a build prints and however slow a reader is.
//!
//! A build that receives secrets gives its log a masker first ([`BuildLog::set_masker`]): from
//! then on every byte goes through it before the file and the channel see it, so the file, the
//! live stream and every download hold only masked text. Output is masked as a stream (a value
//! cut across pieces is still found); the host's own lines are masked whole.

use ams_core::mask::{MaskStream, Masker};
use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{broadcast, mpsc};

/// Chunks a live subscriber may lag behind before it is told to read the file instead.
const CHANNEL_CAPACITY: usize = 256;

#[derive(Debug, Clone)]
pub enum LogMsg {
    /// Bytes written at this offset of output.txt.
    Chunk { offset: u64, data: Bytes },
    /// The build is over with this status text (lower-case, as in the API).
    End { status: String },
}

/// Live log channels of the running builds, and the pending builds a follower may wait for.
/// A channel (with its ring of [`CHANNEL_CAPACITY`] slots) exists only from the build's start:
/// a long queue costs one id per pending build.
#[derive(Debug, Clone, Default)]
pub struct LogHub {
    inner: Arc<Mutex<HashMap<i64, broadcast::Sender<LogMsg>>>>,
    pending: Arc<Mutex<std::collections::HashSet<i64>>>,
    /// Woken whenever a build starts or ends.
    moved: Arc<tokio::sync::Notify>,
}

impl LogHub {
    /// Notes a queued build, whose followers wait for it to start.
    pub fn queued(&self, id: i64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    /// The channel of a running build, created on first use (when the build starts).
    pub fn sender(&self, id: i64) -> broadcast::Sender<LogMsg> {
        let tx = {
            let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(id)
                .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                .clone()
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.moved.notify_waiters();
        tx
    }

    fn is_pending(&self, id: i64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// How many channels exist (running builds with a live log).
    pub fn channels(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Subscribes to a build, waiting while it is pending; `None` when it is finished or
    /// unknown.
    pub async fn subscribe_when_started(&self, id: i64) -> Option<broadcast::Receiver<LogMsg>> {
        loop {
            // Made before the checks, so a start between them still wakes it.
            let moved = self.moved.notified();
            if let Some(rx) = self.subscribe(id) {
                return Some(rx);
            }
            if !self.is_pending(id) {
                return None;
            }
            moved.await;
        }
    }

    /// Subscribes to a live build; `None` when the build is finished or unknown.
    pub fn subscribe(&self, id: i64) -> Option<broadcast::Receiver<LogMsg>> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&id).map(|s| s.subscribe())
    }

    /// Ends a build's channel: subscribers get `End`, then the channel is dropped.
    pub fn end(&self, id: i64, status: &str) {
        let s = {
            let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            m.remove(&id)
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.moved.notify_waiters();
        if let Some(s) = s {
            let _ = s.send(LogMsg::End {
                status: status.to_string(),
            });
        }
    }
}

/// The writer side of one build's log.
#[derive(Debug)]
pub struct BuildLog {
    file: Option<std::fs::File>,
    path: Option<PathBuf>,
    offset: u64,
    limit: u64,
    truncated: bool,
    tx: Option<broadcast::Sender<LogMsg>>,
    echo: bool,
    /// The first error writing the file (a full disk); nothing more is written after it.
    failed: Option<String>,
    /// The build's secrets, hidden from everything written from now on.
    mask: Option<MaskStream>,
}

impl BuildLog {
    /// Opens (appending to) the log file at `path`. Writes go straight to the file (the page
    /// cache), unbuffered, so the file always holds every byte already published: a follower
    /// can always fill a gap from it.
    pub fn open(
        path: &Path,
        limit: u64,
        tx: Option<broadcast::Sender<LogMsg>>,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let offset = f.metadata()?.len();
        Ok(BuildLog {
            file: Some(f),
            path: Some(path.to_path_buf()),
            offset,
            limit,
            truncated: false,
            tx,
            echo: false,
            failed: None,
            mask: None,
        })
    }

    /// A log that only prints to standard output (for `amsbuild run`).
    pub fn stdout(limit: u64) -> Self {
        BuildLog {
            file: None,
            path: None,
            offset: 0,
            limit,
            truncated: false,
            tx: None,
            echo: true,
            failed: None,
            mask: None,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Why the log file could not be written, if it could not.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// After a failed write, tries once more to append a marker line (space may have come
    /// back); returns whether it landed.
    pub fn mark_failure(&mut self) -> bool {
        let (Some(why), Some(f)) = (self.failed.clone(), self.file.as_mut()) else {
            return false;
        };
        let line = format!(
            "\n[amsbuild] the log could not be written from byte {} on ({why}); the build failed\n",
            self.offset
        );
        f.write_all(line.as_bytes()).is_ok()
    }

    fn put(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.failed.is_some() {
            return;
        }
        if let Some(f) = &mut self.file {
            if let Err(e) = f.write_all(data) {
                // Said once, not once per chunk: a full disk would otherwise flood the host's
                // own output. The worker ends the build.
                let path = self.path.as_deref().unwrap_or(Path::new("?"));
                tracing::error!("cannot write the build log {}: {e}", path.display());
                self.failed = Some(e.to_string());
                if let Some(tx) = &self.tx {
                    let line = format!(
                        "\n[amsbuild] the log could not be written ({e}); the build fails\n"
                    );
                    let _ = tx.send(LogMsg::Chunk {
                        offset: self.offset,
                        data: Bytes::from(line),
                    });
                }
                return;
            }
        }
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(LogMsg::Chunk {
                offset: self.offset,
                data: Bytes::copy_from_slice(data),
            });
        }
        self.offset += data.len() as u64;
    }

    /// Masks everything written from now on with `m` (the values of the build's secrets).
    pub fn set_masker(&mut self, m: Arc<Masker>) {
        self.flush_mask();
        self.mask = Some(MaskStream::new(m));
    }

    /// Whether a masker is set.
    pub fn masking(&self) -> bool {
        self.mask.is_some()
    }

    /// `text` with the build's secrets hidden (for text that leaves the host another way
    /// than through this log, such as the build's reason).
    pub fn mask_text(&self, text: &str) -> String {
        match &self.mask {
            Some(m) => m.masker().mask_str(text),
            None => text.to_string(),
        }
    }

    /// Gives out what the masker holds back (before a line of our own, and at the end).
    fn flush_mask(&mut self) {
        if let Some(mut m) = self.mask.take() {
            let mut out = Vec::new();
            m.flush(&mut out);
            self.write_unmasked(&out);
            self.mask = Some(m);
        }
    }

    /// Appends build output, honouring the size limit.
    pub fn write(&mut self, data: &[u8]) {
        if self.truncated {
            return;
        }
        match self.mask.take() {
            Some(mut m) => {
                let mut out = Vec::with_capacity(data.len());
                m.push(data, &mut out);
                self.mask = Some(m);
                self.write_unmasked(&out);
            }
            None => self.write_unmasked(data),
        }
    }

    fn write_unmasked(&mut self, data: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.limit.saturating_sub(self.offset) as usize;
        if data.len() <= room {
            self.put(data);
        } else {
            self.put(&data[..room]);
            self.truncated = true;
            let marker = format!(
                "\n[amsbuild] log truncated: it reached log_max_bytes ({} bytes, web_conf.json); \
                 further output is dropped, the build goes on\n",
                self.limit
            );
            self.put(marker.as_bytes());
        }
    }

    /// Writes a line of AMS-Build's own (banners, results); never dropped by the size limit.
    /// Output the masker still holds goes first, and the line is masked too.
    pub fn line(&mut self, text: &str) {
        self.flush_mask();
        let text = self.mask_text(text);
        let mut s = String::with_capacity(text.len() + 12);
        s.push_str("[amsbuild] ");
        s.push_str(&text);
        s.push('\n');
        self.put(s.as_bytes());
    }
}

impl Drop for BuildLog {
    /// Nothing the masker holds back is lost when the log ends without a last line.
    fn drop(&mut self) {
        self.flush_mask();
    }
}

/// Appends `chunk` to `carry` and takes out the longest prefix that is whole UTF-8, so that a
/// character split across chunks is never mangled (invalid bytes become U+FFFD).
pub fn take_utf8(carry: &mut Vec<u8>, chunk: &[u8]) -> String {
    carry.extend_from_slice(chunk);
    let cut = match std::str::from_utf8(carry) {
        Ok(_) => carry.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => carry.len(),
    };
    let text = String::from_utf8_lossy(&carry[..cut]).to_string();
    carry.drain(..cut);
    text
}

/// The reader went away.
#[derive(Debug)]
pub struct Gone;

/// Reads `path` from `offset` up to `end` (or its end), sending each piece to `out`.
/// Returns the new offset.
pub async fn read_range(
    path: &Path,
    offset: u64,
    end: Option<u64>,
    out: &mpsc::Sender<Bytes>,
) -> Result<u64, Gone> {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Ok(offset);
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Ok(offset);
    }
    let mut pos = offset;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let want = match end {
            Some(e) if e <= pos => break,
            Some(e) => ((e - pos) as usize).min(buf.len()),
            None => buf.len(),
        };
        let n = match f.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pos += n as u64;
        out.send(Bytes::copy_from_slice(&buf[..n]))
            .await
            .map_err(|_| Gone)?;
    }
    Ok(pos)
}

/// Follows a build's log from its first byte to its end: what is in the file, then the live
/// channel, catching up from the file whenever the channel skipped. Sends each piece to `out`
/// (bounded: a slow reader slows only itself) and returns the final status text, or `None` when
/// the build had no live channel (it was already finished).
pub async fn follow(
    hub: &LogHub,
    id: i64,
    path: &Path,
    out: &mpsc::Sender<Bytes>,
) -> Result<Option<String>, Gone> {
    follow_from(hub, id, path, 0, out).await
}

/// [`follow`] from byte `offset` of the log (a page that already shows the start).
pub async fn follow_from(
    hub: &LogHub,
    id: i64,
    path: &Path,
    offset: u64,
    out: &mpsc::Sender<Bytes>,
) -> Result<Option<String>, Gone> {
    let Some(mut rx) = hub.subscribe_when_started(id).await else {
        read_range(path, offset, None, out).await?;
        return Ok(None);
    };
    let mut pos = read_range(path, offset, None, out).await?;
    loop {
        match rx.recv().await {
            Ok(LogMsg::Chunk { offset, data }) => {
                let end = offset + data.len() as u64;
                if end <= pos {
                    continue;
                }
                if offset > pos {
                    // A gap the channel never carried to us: read it from the file.
                    pos = read_range(path, pos, Some(offset), out).await?;
                }
                if pos >= offset && pos < end {
                    let skip = (pos - offset) as usize;
                    out.send(data.slice(skip..)).await.map_err(|_| Gone)?;
                    pos = end;
                }
            }
            Ok(LogMsg::End { status }) => {
                read_range(path, pos, None, out).await?;
                return Ok(Some(status));
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                pos = read_range(path, pos, None, out).await?;
            }
            Err(broadcast::error::RecvError::Closed) => {
                read_range(path, pos, None, out).await?;
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ams_core::mask::Masker;

    #[tokio::test]
    async fn a_pending_build_has_no_channel_and_its_followers_wait_for_the_start() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("output.txt");
        let hub = LogHub::default();
        hub.queued(7);
        assert_eq!(hub.channels(), 0, "no channel while pending");
        let (tx, mut rx) = mpsc::channel(16);
        let (h2, p2) = (hub.clone(), path.clone());
        let follower = tokio::spawn(async move { follow(&h2, 7, &p2, &tx).await });
        // One thread: the follower runs until it parks, waiting for the start.
        tokio::task::yield_now().await;
        assert!(
            !follower.is_finished(),
            "it waits while the build is pending"
        );
        let sender = hub.sender(7);
        assert_eq!(hub.channels(), 1);
        // The start woke it: it subscribes and waits for output.
        tokio::task::yield_now().await;
        let mut log = BuildLog::open(&path, 1 << 20, Some(sender)).unwrap();
        log.write(b"hello\n");
        hub.end(7, "pass");
        let status = follower.await.unwrap().unwrap();
        assert_eq!(status.as_deref(), Some("pass"));
        let mut got = Vec::new();
        while let Ok(b) = rx.try_recv() {
            got.extend_from_slice(&b);
        }
        assert_eq!(got, b"hello\n");
        assert_eq!(hub.channels(), 0);
    }

    #[test]
    fn utf8_split_across_chunks_survives() {
        let text = "héllo ✓";
        let bytes = text.as_bytes();
        let mut carry = Vec::new();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&take_utf8(&mut carry, std::slice::from_ref(b)));
        }
        assert_eq!(out, text);
        assert!(carry.is_empty());
    }

    #[tokio::test]
    async fn a_masked_log_never_holds_the_value_in_its_file_or_channel() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.txt");
        let hub = LogHub::default();
        let mut rx = hub.sender(3).subscribe();
        let mut log = BuildLog::open(&p, 1 << 20, Some(hub.sender(3))).unwrap();
        let secret = "p4ss-w0rd-value";
        log.set_masker(Masker::new(&[secret]).unwrap().unwrap());
        // Cut at every position across two writes, and once across a line of our own.
        for i in 0..=secret.len() {
            log.write(&secret.as_bytes()[..i]);
            log.write(&secret.as_bytes()[i..]);
            log.write(b"\n");
        }
        log.write(b"p4ss-w0");
        log.line(&format!("our own line mentions {secret}"));
        log.write(b"rd-value\n");
        log.write(b"tail p4ss-w0rd-val");
        drop(log);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(secret), "{text}");
        // One per cut, and the one in our own line.
        assert_eq!(text.matches("***\n").count(), secret.len() + 2, "{text}");
        assert!(
            text.contains("[amsbuild] our own line mentions ***\n"),
            "{text}"
        );
        assert!(
            text.ends_with("tail p4ss-w0rd-val"),
            "held bytes are written at the end"
        );
        let mut live = Vec::new();
        while let Ok(LogMsg::Chunk { data, .. }) = rx.try_recv() {
            live.extend_from_slice(&data);
        }
        assert_eq!(String::from_utf8(live).unwrap(), text);
    }

    #[tokio::test]
    async fn truncates_with_a_visible_marker() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.txt");
        let mut log = BuildLog::open(&p, 4096, None).unwrap();
        for _ in 0..100 {
            log.write(&[b'x'; 100]);
        }
        log.line("stage done");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(log.truncated());
        assert!(text.contains("log truncated"));
        assert!(text.ends_with("[amsbuild] stage done\n"));
        assert!(text.len() < 4096 + 400, "{}", text.len());
    }

    #[tokio::test]
    async fn a_slow_follower_sees_every_byte_in_order() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.txt");
        let hub = LogHub::default();
        let mut log = BuildLog::open(&p, u64::MAX, Some(hub.sender(7))).unwrap();
        log.write(b"before subscribe\n");
        let path = p.clone();
        let hub2 = hub.clone();
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let reader = tokio::spawn(async move { follow(&hub2, 7, &path, &tx).await.unwrap() });
        let collector = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(b) = rx.recv().await {
                got.extend_from_slice(&b);
            }
            got
        });
        let mut want = b"before subscribe\n".to_vec();
        // Far more chunks than the channel holds, so the follower must catch up from the file.
        for i in 0..5000 {
            let line = format!("line {i}\n");
            log.write(line.as_bytes());
            want.extend_from_slice(line.as_bytes());
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        hub.end(7, "pass");
        let status = reader.await.unwrap();
        let got = collector.await.unwrap();
        assert_eq!(status.as_deref(), Some("pass"));
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap()
        );
    }
}
