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
//! The spool is written synchronously on push (one `write` per batch read from a pipe), which
//! keeps ordering trivial; pushes never fail because of it (errors are counted and traced).

mod spool;

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use self::spool::Spool;

/// Default maximum length of one captured line, in bytes.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// Bytes an entry counts for beyond its line when batches are cut by size (sequence number,
/// timestamp, stream and framing, roughly).
pub const ENTRY_OVERHEAD: usize = 32;

/// Default byte cap of one deployment's spool.
pub const DEFAULT_SPOOL_BYTES: u64 = 8 * 1024 * 1024;

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
    spool: Option<Spool>,
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

    /// A buffer spooled under `dir` (created if needed) with at most `spool_bytes` on disk.
    /// An existing spool is loaded: the sequence counter resumes after its last entry and the
    /// ring is filled with its last `limit` entries.
    pub fn open(dir: PathBuf, limit: usize, spool_bytes: u64) -> io::Result<Self> {
        let limit = limit.max(1);
        let (spool, recent, last_seq) = Spool::open(dir, spool_bytes, limit)?;
        Ok(Self::from_inner(Inner {
            ring: recent,
            limit,
            last_seq,
            spool: Some(spool),
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

    /// Appends lines in order with one timestamp; returns the last sequence number.
    pub fn push_batch(&self, stream: LogStream, lines: impl IntoIterator<Item = String>) -> u64 {
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        let mut inner = self.lock();
        let first = inner.ring.len();
        for line in lines {
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
    /// in the (otherwise contiguous) sequence numbers.
    pub fn since(&self, after: u64, max: usize) -> Vec<LogEntry> {
        self.since_within(after, max, usize::MAX)
    }

    /// As [`LogBuffer::since`], and also stops before `max_bytes` (each entry counting its
    /// line plus [`ENTRY_OVERHEAD`]), always returning at least one entry when there is one:
    /// the shipper's batches, without copying lines it would not send.
    pub fn since_within(&self, after: u64, max: usize, max_bytes: usize) -> Vec<LogEntry> {
        let mut bytes = 0usize;
        let mut fits = |i: usize, e: &LogEntry| {
            bytes = bytes.saturating_add(e.line.len() + ENTRY_OVERHEAD);
            i == 0 || bytes <= max_bytes
        };
        let inner = self.lock();
        let ring_covers = inner
            .ring
            .front()
            .is_none_or(|front| front.seq <= after.saturating_add(1));
        if !ring_covers && let Some(spool) = &inner.spool {
            match spool.read_since(after, max) {
                Ok(entries) => {
                    return entries
                        .into_iter()
                        .enumerate()
                        .take_while(|(i, e)| fits(*i, e))
                        .map(|(_, e)| e)
                        .collect();
                }
                Err(error) => tracing::warn!(%error, "reading log spool failed"),
            }
        }
        // Sequence numbers increase along the ring: find the start instead of scanning.
        let start = inner.ring.partition_point(|e| e.seq <= after);
        inner
            .ring
            .range(start..)
            .take(max)
            .enumerate()
            .take_while(|(i, e)| fits(*i, e))
            .map(|(_, e)| e.clone())
            .collect()
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

    /// Lines the spool dropped to stay under its byte cap (0 without a spool).
    pub fn dropped_lines(&self) -> u64 {
        self.lock().spool.as_ref().map_or(0, Spool::dropped_lines)
    }

    /// Deletes the spool files (the deployment is forgotten); the buffer keeps its ring.
    pub fn delete_spool(&self) {
        if let Some(spool) = self.lock().spool.take() {
            spool.delete();
        }
    }
}

/// Reads `reader` to its end, pushing lines of at most `max_line` bytes to `logs`.
/// Never stops reading early except on a read error (logged on the `system` stream).
pub async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: LogStream,
    logs: LogBuffer,
    max_line: usize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut splitter = LineSplitter::new(max_line);
    let mut lines = Vec::new();
    loop {
        match reader.read(&mut buf).await {
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

    #[tokio::test]
    async fn pump_reads_everything_including_a_partial_last_line() {
        let logs = LogBuffer::in_memory(100);
        let data: &[u8] = b"one\ntwo\nthree";
        pump(data, LogStream::Stdout, logs.clone(), 16).await;
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        assert_eq!(lines, vec!["one", "two", "three"]);
    }
}
