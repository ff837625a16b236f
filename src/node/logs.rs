//! Log capture for deployments: the line splitter, the per-deployment [`LogBuffer`] (ring +
//! sequence numbers + change notification + disk spool) and the pipe pump.
//!
//! Invariants:
//! - Sequence numbers are per deployment, start at 1, are contiguous and strictly increasing,
//!   and are never reused: they survive process restarts (one buffer per deployment) and node
//!   restarts (the counter resumes from the spool on [`LogBuffer::open`]).
//! - A pump always keeps reading: a line longer than the maximum is cut into chunks of at most
//!   that many bytes (at a UTF-8 boundary when possible), so a 100 KB line never blocks the
//!   workload (the original's pump died on lines over 64 KiB, B16).
//! - Bytes are decoded as lossy UTF-8; only the trailing `\n` is removed (`\r` stays).
//! - The ring holds at most `log_limit_lines` entries; the spool holds at most its byte cap,
//!   dropping whole old segments and counting the dropped lines.
//!
//! - The ring is the authority for sequence numbers; the spool follows it. A push never waits
//!   for the disk: it encodes the new entries and queues one write for the node's log IO thread
//!   ([`SpoolWriter`]), in sequence order (queued under the buffer's lock). While the disk is
//!   behind by more than [`MAX_PENDING_BYTES`], batches are not queued but counted as dropped
//!   (the ring still has them); write errors are counted the same way. Reads that need the
//!   spool run on the IO thread too, after the writes queued before them.

mod spool;
mod writer;

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use self::spool::Spool;
pub use self::writer::SpoolWriter;

/// Default maximum length of one captured line, in bytes.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// Bytes an entry counts for beyond its line when batches are cut by size (sequence number,
/// timestamp, stream and framing, roughly).
pub const ENTRY_OVERHEAD: usize = 32;

/// Default byte cap of one deployment's spool.
pub const DEFAULT_SPOOL_BYTES: u64 = 8 * 1024 * 1024;

/// Encoded bytes of one spool that may wait for the IO thread; beyond that, batches are
/// counted as dropped instead of queued (a slow disk must not grow memory without bound).
pub const MAX_PENDING_BYTES: usize = 1024 * 1024;

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogStream {
    /// The workload's stdout.
    Stdout,
    /// The workload's stderr.
    Stderr,
    /// Lifecycle messages of the supervisor.
    System,
    /// Health-check messages.
    SystemHc,
    /// Scheduled (cron) restart messages.
    SystemAr,
}

impl LogStream {
    /// The wire name: `stdout`, `stderr`, `system`, `system-hc`, `system-ar`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::System => "system",
            Self::SystemHc => "system-hc",
            Self::SystemAr => "system-ar",
        }
    }
}

impl std::fmt::Display for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One captured line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogEntry {
    /// Per-deployment sequence number (1, 2, 3, ...).
    pub seq: u64,
    /// Wall-clock time when the line was read, in ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Source stream.
    pub stream: LogStream,
    /// The line without its trailing `\n`.
    pub line: String,
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter cutting lines longer than `max` bytes (at least 4) into chunks.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(4),
        }
    }

    /// Feeds bytes; complete lines and full chunks are appended to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.buf.extend_from_slice(&bytes[..i]);
                    self.cut_chunks(out);
                    out.push(String::from_utf8_lossy(&self.buf).into_owned());
                    self.buf.clear();
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.buf.extend_from_slice(bytes);
                    self.cut_chunks(out);
                    bytes = &[];
                }
            }
        }
    }

    /// End of stream: a pending partial line is emitted.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.buf.is_empty() {
            out.push(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
    }

    /// Emits `max`-byte chunks while more than `max` bytes are pending, so a line of exactly
    /// `max` bytes followed by `\n` stays one line.
    fn cut_chunks(&mut self, out: &mut Vec<String>) {
        while self.buf.len() > self.max {
            let mut cut = self.max;
            // Do not split a multi-byte character: back off to its first byte.
            let mut i = self.max;
            while i > 0 && self.max - i < 4 && self.buf[i] & 0xC0 == 0x80 {
                i -= 1;
            }
            if i > 0 && i < self.max && self.buf[i] & 0xC0 == 0xC0 {
                cut = i;
            }
            out.push(String::from_utf8_lossy(&self.buf[..cut]).into_owned());
            self.buf.drain(..cut);
        }
    }
}

#[derive(Debug)]
struct Inner {
    ring: VecDeque<LogEntry>,
    limit: usize,
    last_seq: u64,
    spool: Option<SpoolLink>,
}

fn lock_spool(spool: &Mutex<Spool>) -> MutexGuard<'_, Spool> {
    spool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A read of the spool after `after`, to run on the log IO thread.
fn spool_read(
    link: &SpoolLink,
    after: u64,
    max: usize,
) -> impl FnOnce() -> io::Result<Vec<LogEntry>> + Send + 'static {
    let spool = Arc::clone(&link.spool);
    move || lock_spool(&spool).read_since(after, max)
}

/// A buffer's spool and the IO thread that writes it. The spool's mutex is taken by jobs on
/// the IO thread, one at a time, and by the buffer while the spool is young and no job was
/// queued for it (then the IO thread has none on it but its settling), so it is hardly ever
/// contended; it is a mutex because they share the spool.
#[derive(Debug, Clone)]
struct SpoolLink {
    spool: Arc<Mutex<Spool>>,
    io: SpoolWriter,
    /// Encoded bytes queued for the IO thread and not written yet.
    pending: Arc<AtomicUsize>,
    /// Lines not on disk (the spool's counter).
    dropped: Arc<AtomicU64>,
    /// Until when the spool was young at its open (none: it never was).
    young_until: Option<Instant>,
    /// A job was queued for the spool: from then on every batch goes through the IO thread,
    /// in order after it.
    queued: Arc<AtomicBool>,
    /// The end of its youth (its settling) is queued.
    settling: Arc<AtomicBool>,
}

impl SpoolLink {
    /// Encodes `entries` and holds them in the young spool or queues their write; skips them
    /// (counted as dropped) while more than [`MAX_PENDING_BYTES`] wait. Called under the
    /// buffer's lock, so writes are queued in sequence order.
    fn append<'a>(&self, entries: impl Iterator<Item = &'a LogEntry>) {
        let mut buf = Vec::new();
        let mut first = None;
        let mut last = 0;
        let mut lines = 0u64;
        for e in entries {
            first.get_or_insert(e.seq);
            last = e.seq;
            if serde_json::to_writer(&mut buf, e).is_ok() {
                buf.push(b'\n');
                lines += 1;
            }
        }
        let Some(first) = first else { return };
        if self.young_until.is_some() && !self.queued.load(Ordering::Acquire) {
            // Held right here: most short tasks' every line (a start and an exit) costs no
            // trip to the IO thread. A spool that settled meanwhile gives the batch back.
            let held = lock_spool(&self.spool).hold(first, last, buf, lines);
            match held {
                Ok(()) => {
                    self.settle_in_time();
                    return;
                }
                Err(back) => buf = back,
            }
        }
        let count = last - first + 1;
        let len = buf.len();
        let pending = self.pending.load(Ordering::Relaxed);
        // One batch over the limit is still written when nothing else waits.
        if pending > 0 && pending + len > MAX_PENDING_BYTES {
            self.dropped.fetch_add(count, Ordering::Relaxed);
            return;
        }
        self.pending.fetch_add(len, Ordering::Relaxed);
        let spool = Arc::clone(&self.spool);
        let waiting = Arc::clone(&self.pending);
        // The IO thread may hold it too, while young.
        self.settle_in_time();
        let queued = self.submit(move || {
            lock_spool(&spool).append(first, last, buf, lines);
            waiting.fetch_sub(len, Ordering::Relaxed);
        });
        if !queued {
            self.pending.fetch_sub(len, Ordering::Relaxed);
            self.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Queues, once, what ends a young spool's youth at its time: it writes what it held.
    fn settle_in_time(&self) {
        if let Some(at) = self.young_until
            && !self.settling.swap(true, Ordering::AcqRel)
        {
            let spool = Arc::clone(&self.spool);
            self.io.submit_at(at, move || lock_spool(&spool).settle());
        }
    }

    /// Queues `job` on the IO thread (see [`SpoolWriter::submit`]).
    fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.queued.store(true, Ordering::Release);
        self.io.submit(job)
    }

    /// Runs `f` on the IO thread and waits for it (see [`SpoolWriter::run`]).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        self.queued.store(true, Ordering::Release);
        self.io.run(f).await
    }

    /// As [`SpoolLink::run`], blocking the calling thread (tests' sync reads).
    #[cfg(test)]
    fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        self.queued.store(true, Ordering::Release);
        self.io.run_blocking(f)
    }
}

/// Where a read is served from: the ring (already copied) or the spool.
enum Source {
    Ring(Vec<LogEntry>),
    Spool(SpoolLink),
}

/// The log of one deployment: a ring of recent entries, the sequence counter, a watch of the
/// last sequence number for subscribers, and an optional disk spool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<watch::Sender<u64>>,
}

impl LogBuffer {
    /// A buffer without a spool (tests, or when the spool directory cannot be used).
    pub fn in_memory(limit: usize) -> Self {
        Self::from_inner(Inner {
            ring: VecDeque::new(),
            limit: limit.max(1),
            last_seq: 0,
            spool: None,
        })
    }

    /// A buffer spooled under `dir` (made with its first line) with at most `spool_bytes` on
    /// disk, written by `io`. An existing spool is loaded (on the calling thread): the
    /// sequence counter resumes after its last entry and the ring is filled with its last
    /// `limit` entries.
    pub fn open(
        dir: PathBuf,
        limit: usize,
        spool_bytes: u64,
        io: &SpoolWriter,
    ) -> io::Result<Self> {
        Self::open_with(dir, limit, spool_bytes, io, false)
    }

    /// As [`LogBuffer::open`], for a deployment whose process ends with the agent
    /// (`outlive_agent: false`): a new spool is *young* (see `spool.rs`), its first lines held
    /// in memory. Never for a process under a keeper: after an agent crash its keeper sends
    /// its output again from the saved cursor, and lines numbered from a lost young spool
    /// could take numbers the conductor already holds.
    pub fn open_short_lived(
        dir: PathBuf,
        limit: usize,
        spool_bytes: u64,
        io: &SpoolWriter,
    ) -> io::Result<Self> {
        Self::open_with(dir, limit, spool_bytes, io, true)
    }

    fn open_with(
        dir: PathBuf,
        limit: usize,
        spool_bytes: u64,
        io: &SpoolWriter,
        young: bool,
    ) -> io::Result<Self> {
        let limit = limit.max(1);
        let (spool, recent, last_seq) = Spool::open(dir, spool_bytes, limit, young)?;
        let link = SpoolLink {
            dropped: spool.dropped_counter(),
            young_until: spool.young_until(),
            spool: Arc::new(Mutex::new(spool)),
            io: io.clone(),
            pending: Arc::new(AtomicUsize::new(0)),
            queued: Arc::new(AtomicBool::new(false)),
            settling: Arc::new(AtomicBool::new(false)),
        };
        Ok(Self::from_inner(Inner {
            ring: recent,
            limit,
            last_seq,
            spool: Some(link),
        }))
    }

    fn from_inner(inner: Inner) -> Self {
        let (tx, _) = watch::channel(inner.last_seq);
        Self {
            inner: Arc::new(Mutex::new(inner)),
            notify: Arc::new(tx),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one line; returns its sequence number.
    pub fn push(&self, stream: LogStream, line: impl Into<String>) -> u64 {
        self.push_batch(stream, std::iter::once(line.into()))
    }

    /// Appends lines in order with one timestamp; returns the last sequence number. Never
    /// waits for the disk (see the module docs).
    pub fn push_batch(&self, stream: LogStream, lines: impl IntoIterator<Item = String>) -> u64 {
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        self.push_timed(lines.into_iter().map(|line| (stream, timestamp_ms, line)))
    }

    /// Appends `(stream, timestamp, line)` entries in order (lines a keeper read, with the
    /// time it read them); returns the last sequence number. Never waits for the disk.
    pub fn push_timed(&self, lines: impl IntoIterator<Item = (LogStream, i64, String)>) -> u64 {
        let mut inner = self.lock();
        let first = inner.ring.len();
        for (stream, timestamp_ms, line) in lines {
            inner.last_seq += 1;
            let entry = LogEntry {
                seq: inner.last_seq,
                timestamp_ms,
                stream,
                line,
            };
            inner.ring.push_back(entry);
        }
        let added = inner.ring.len() - first;
        let Inner {
            ring, spool, limit, ..
        } = &mut *inner;
        if let Some(spool) = spool
            && added > 0
        {
            spool.append(ring.range(first..));
        }
        while ring.len() > *limit {
            ring.pop_front();
        }
        let last = inner.last_seq;
        drop(inner);
        if added > 0 {
            self.notify.send_replace(last);
        }
        last
    }

    /// Runs `job` after the spool writes queued so far are on disk (a young spool's too), on
    /// the log IO thread (without a spool: on the blocking pool), and waits for it. The
    /// keeper's cursor is saved this way, so it never runs ahead of the lines on disk, and a
    /// reader that waits for it never queues more than one batch.
    pub async fn after_writes(&self, job: impl FnOnce() + Send + 'static) {
        let link = self.lock().spool.clone();
        match link {
            Some(link) => {
                let spool = Arc::clone(&link.spool);
                let _ = link
                    .run(move || {
                        lock_spool(&spool).settle();
                        job();
                    })
                    .await;
            }
            None => {
                let _ = tokio::task::spawn_blocking(job).await;
            }
        }
    }

    /// The sequence number of the last entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Notified with the last sequence number after every push.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Changes the ring size (a spec update may change `log_limit_lines`).
    pub fn set_limit(&self, limit: usize) {
        let mut inner = self.lock();
        inner.limit = limit.max(1);
        while inner.ring.len() > inner.limit {
            inner.ring.pop_front();
        }
    }

    /// At most `max` entries with `seq > after`, oldest first. Served from the ring when it
    /// reaches back far enough, else from the spool. Lines dropped from both show as a gap
    /// in the (otherwise contiguous) sequence numbers. Blocks the calling thread while the
    /// spool is read (tests; the node reads with [`LogBuffer::since_within_async`]).
    #[cfg(test)]
    pub fn since(&self, after: u64, max: usize) -> Vec<LogEntry> {
        self.since_within(after, max, usize::MAX)
    }

    /// As [`LogBuffer::since`], and also stops before `max_bytes` (each entry counting its
    /// line plus [`ENTRY_OVERHEAD`]), always returning at least one entry when there is one:
    /// the shipper's batches, without copying lines it would not send. Blocks the calling
    /// thread while the spool is read (tests; the node reads with
    /// [`LogBuffer::since_within_async`]).
    #[cfg(test)]
    pub fn since_within(&self, after: u64, max: usize, max_bytes: usize) -> Vec<LogEntry> {
        match self.source(after, max, max_bytes) {
            Source::Ring(entries) => entries,
            Source::Spool(link) => {
                let read = link.run_blocking(spool_read(&link, after, max));
                self.spool_answer(read.and_then(|r| r), after, max, max_bytes)
            }
        }
    }

    /// As [`LogBuffer::since_within`]; a read of the spool runs on the log IO thread while
    /// this task waits, so no async worker blocks on the disk.
    pub async fn since_within_async(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Vec<LogEntry> {
        match self.source(after, max, max_bytes) {
            Source::Ring(entries) => entries,
            Source::Spool(link) => {
                let read = link.run(spool_read(&link, after, max)).await;
                self.spool_answer(read.and_then(|r| r), after, max, max_bytes)
            }
        }
    }

    /// The ring's answer, or the spool to read when the ring does not reach back to `after`.
    fn source(&self, after: u64, max: usize, max_bytes: usize) -> Source {
        let inner = self.lock();
        let ring_covers = inner
            .ring
            .front()
            .is_none_or(|front| front.seq <= after.saturating_add(1));
        match &inner.spool {
            Some(link) if !ring_covers => Source::Spool(link.clone()),
            _ => Source::Ring(ring_since(&inner.ring, after, max, max_bytes)),
        }
    }

    /// Cuts a spool read to the byte budget; falls back to the ring when the read failed or
    /// found nothing (the lines after `after` were not spooled).
    fn spool_answer(
        &self,
        read: io::Result<Vec<LogEntry>>,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Vec<LogEntry> {
        match read {
            Ok(entries) if !entries.is_empty() => {
                let mut fits = budget(max_bytes);
                entries
                    .into_iter()
                    .enumerate()
                    .take_while(|(i, e)| fits(*i, e))
                    .map(|(_, e)| e)
                    .collect()
            }
            Ok(_) => ring_since(&self.lock().ring, after, max, max_bytes),
            Err(error) => {
                tracing::warn!(%error, "reading log spool failed");
                ring_since(&self.lock().ring, after, max, max_bytes)
            }
        }
    }

    /// The last `n` ring entries of the given streams (all streams when `streams` is `None`),
    /// oldest first.
    #[cfg(test)]
    pub fn tail(&self, n: usize, streams: Option<&[LogStream]>) -> Vec<LogEntry> {
        let inner = self.lock();
        let mut out: Vec<LogEntry> = inner
            .ring
            .iter()
            .rev()
            .filter(|e| streams.is_none_or(|s| s.contains(&e.stream)))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Lines not in the spool although numbered (deleted to stay under its byte cap, skipped
    /// while the disk was behind, lost to a write error); 0 without a spool.
    pub fn dropped_lines(&self) -> u64 {
        self.lock()
            .spool
            .as_ref()
            .map_or(0, |link| link.dropped.load(Ordering::Relaxed))
    }

    /// Waits until every line pushed so far is written (or counted as dropped), and records
    /// on disk how far the sequence went, so a restart never reuses a number.
    pub async fn flush(&self) {
        let (link, last_seq) = {
            let inner = self.lock();
            (inner.spool.clone(), inner.last_seq)
        };
        if let Some(link) = link {
            let spool = Arc::clone(&link.spool);
            let _ = link
                .run(move || lock_spool(&spool).mark_reached(last_seq))
                .await;
        }
    }

    /// Deletes the spool files (the deployment is forgotten) after the writes queued before;
    /// the buffer keeps its ring and stops spooling.
    pub async fn delete_spool(&self) {
        let link = self.lock().spool.take();
        if let Some(link) = link {
            if !link.queued.load(Ordering::Acquire) {
                // No job was queued for it: still young, it has nothing on disk to delete.
                let mut spool = lock_spool(&link.spool);
                if spool.young_until().is_some() {
                    spool.delete();
                    return;
                }
            }
            let spool = Arc::clone(&link.spool);
            let _ = link.run(move || lock_spool(&spool).delete()).await;
        }
    }
}

/// A byte-budget filter for `take_while` over `(index, entry)`: keeps the first entry always,
/// then entries while their lines plus [`ENTRY_OVERHEAD`] fit in `max_bytes`.
fn budget(max_bytes: usize) -> impl FnMut(usize, &LogEntry) -> bool {
    let mut bytes = 0usize;
    move |i, e| {
        bytes = bytes.saturating_add(e.line.len() + ENTRY_OVERHEAD);
        i == 0 || bytes <= max_bytes
    }
}

/// At most `max` ring entries with `seq > after` within `max_bytes` (see [`budget`]).
fn ring_since(
    ring: &VecDeque<LogEntry>,
    after: u64,
    max: usize,
    max_bytes: usize,
) -> Vec<LogEntry> {
    // Sequence numbers increase along the ring: find the start instead of scanning.
    let start = ring.partition_point(|e| e.seq <= after);
    let mut fits = budget(max_bytes);
    ring.range(start..)
        .take(max)
        .enumerate()
        .take_while(|(i, e)| fits(*i, e))
        .map(|(_, e)| e.clone())
        .collect()
}

/// Reads `reader` to its end, pushing lines of at most `max_line` bytes to `logs`.
/// Never stops reading early except on a read error (logged on the `system` stream).
pub async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: LogStream,
    logs: LogBuffer,
    max_line: usize,
) {
    // Read into spare capacity: never zeroed, and never touched past what a read filled (most
    // tasks write a few bytes, if any).
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut splitter = LineSplitter::new(max_line);
    let mut lines = Vec::new();
    loop {
        buf.clear();
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                splitter.feed(&buf[..n], &mut lines);
                if !lines.is_empty() {
                    logs.push_batch(stream, lines.drain(..));
                }
                // A workload that writes as fast as it can keeps this pipe always readable:
                // give the node's other tasks (commands, status, heartbeats) a turn after
                // every chunk, so a log flood cannot starve the control plane on few cores.
                tokio::task::yield_now().await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                logs.push(
                    LogStream::System,
                    format!("log capture error ({stream}): {e}"),
                );
                break;
            }
        }
    }
    splitter.finish(&mut lines);
    if !lines.is_empty() {
        logs.push_batch(stream, lines);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn splits_lines_keeps_cr_and_partial_tail() {
        assert_eq!(
            split(16, &[b"a\r\nb", b"c\n\nlast"]),
            vec!["a\r", "bc", "", "last"]
        );
    }

    #[test]
    fn long_lines_are_chunked_without_empty_tail() {
        assert_eq!(split(4, &[b"abcd\n"]), vec!["abcd"]);
        assert_eq!(split(4, &[b"abcdefgh\nx\n"]), vec!["abcd", "efgh", "x"]);
        assert_eq!(
            split(4, &[b"ab", b"cdefg", b"h", b"ij\n"]),
            vec!["abcd", "efgh", "ij"]
        );
    }

    #[test]
    fn chunks_respect_utf8_boundaries() {
        // "aé" = 61 C3 A9; cutting at 2 would split "é".
        let out = split(4, &["aaaé b\n".as_bytes()]);
        assert_eq!(out, vec!["aaa", "é b"]);
        assert!(out.iter().all(|l| !l.contains('\u{FFFD}')));
        // Invalid bytes are replaced, not dropped.
        assert_eq!(split(16, &[b"a\xffb\n"]), vec!["a\u{FFFD}b"]);
    }

    #[test]
    fn ring_seq_since_and_tail() {
        let logs = LogBuffer::in_memory(3);
        let mut rx = logs.subscribe();
        assert_eq!(logs.push(LogStream::Stdout, "1"), 1);
        assert_eq!(logs.push(LogStream::Stderr, "2"), 2);
        assert_eq!(logs.push(LogStream::System, "3"), 3);
        assert_eq!(
            logs.push_batch(LogStream::Stdout, vec!["4".into(), "5".into()]),
            5
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 5);
        let seqs = |v: Vec<LogEntry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(logs.since(0, 100)), vec![3, 4, 5]);
        assert_eq!(seqs(logs.since(3, 100)), vec![4, 5]);
        assert_eq!(seqs(logs.since(3, 1)), vec![4]);
        // A byte budget cuts the batch, but never below one entry.
        let one = logs.since(0, 100)[0].line.len() + ENTRY_OVERHEAD;
        assert_eq!(seqs(logs.since_within(0, 100, 2 * one)), vec![3, 4]);
        assert_eq!(seqs(logs.since_within(0, 100, 1)), vec![3]);
        assert_eq!(seqs(logs.since_within(5, 100, 1)), Vec::<u64>::new());
        assert_eq!(seqs(logs.tail(2, None)), vec![4, 5]);
        assert_eq!(seqs(logs.tail(5, Some(&[LogStream::System]))), vec![3]);
        logs.set_limit(1);
        assert_eq!(seqs(logs.tail(5, None)), vec![5]);
        assert_eq!(LogStream::SystemHc.as_str(), "system-hc");
        assert_eq!(
            serde_json::to_string(&LogStream::SystemAr).unwrap(),
            "\"system-ar\""
        );
    }

    /// Holds the log IO thread the way a stuck disk write would, until the returned sender
    /// is dropped.
    fn hold_io(io: &SpoolWriter) -> std::sync::mpsc::Sender<()> {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        assert!(io.submit(move || {
            started_tx.send(()).unwrap();
            // Returns when the sender is dropped (also when the test panics).
            let _ = release_rx.recv();
        }));
        started_rx.recv().unwrap();
        release_tx
    }

    #[tokio::test]
    async fn a_slow_spool_write_does_not_block_pushes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow");
        let io = SpoolWriter::new();
        let logs = LogBuffer::open(path.clone(), 100, 1 << 30, &io).unwrap();
        let release = hold_io(&io);
        // The IO thread is stuck: pushes still return (bounded, so a push that waits for the
        // disk fails the test instead of hanging it), the ring has the lines, the disk not.
        let pusher = logs.clone();
        let pushed = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                (
                    pusher.push(LogStream::Stdout, "first"),
                    pusher.push_batch(LogStream::Stderr, vec!["second".into(), "third".into()]),
                )
            }),
        )
        .await
        .expect("a push waited for the held spool write")
        .unwrap();
        assert_eq!(pushed, (1, 3));
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        assert_eq!(lines, ["first", "second", "third"]);
        // A young spool has no directory yet: nothing on disk.
        let on_disk = |path: &std::path::Path| -> u64 {
            std::fs::read_dir(path).map_or(0, |dir| {
                dir.map(|d| d.unwrap().metadata().unwrap().len()).sum()
            })
        };
        assert_eq!(on_disk(&path), 0);
        // Past MAX_PENDING_BYTES waiting, batches are counted as dropped instead of queued.
        let big = "x".repeat(64 * 1024);
        for _ in 0..20 {
            logs.push(LogStream::Stdout, big.clone());
        }
        assert_eq!(logs.last_seq(), 23);
        let dropped = logs.dropped_lines();
        assert!(dropped > 0 && dropped < 20, "dropped {dropped}");
        assert_eq!(logs.since(0, 100).len(), 23, "the ring has every line");

        drop(release);
        logs.flush().await;
        assert!(on_disk(&path) > 0);
        drop(logs);
        // The spool has the lines that were queued, the count of the others, and the number
        // the sequence reached.
        let logs = LogBuffer::open(path, 1, 1 << 30, &io).unwrap();
        assert_eq!(logs.last_seq(), 23);
        assert_eq!(logs.dropped_lines(), dropped);
        let spooled: Vec<u64> = logs.since(0, 100).iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = (1..=23 - dropped).collect();
        assert_eq!(spooled, expected);
        assert_eq!(logs.push(LogStream::System, "next"), 24);
    }

    #[tokio::test]
    async fn pump_reads_everything_including_a_partial_last_line() {
        let logs = LogBuffer::in_memory(100);
        let data: &[u8] = b"one\ntwo\nthree";
        pump(data, LogStream::Stdout, logs.clone(), 16).await;
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        assert_eq!(lines, vec!["one", "two", "three"]);
    }
}
