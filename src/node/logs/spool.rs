//! The on-disk log spool of one deployment: JSON-lines segment files named after the first
//! sequence number they hold (`00000000000000000042.jsonl`), in one directory.
//!
//! Invariants:
//! - Segments hold contiguous, increasing sequence numbers; a newer segment starts after the
//!   last entry of the previous one. A batch that does not follow the last written entry
//!   (lines skipped while the disk was behind, or lost to a write error) starts a new segment,
//!   so a gap lies only between segments.
//! - The total size stays near the byte cap: when it is exceeded, whole oldest segments are
//!   deleted (never the one being written) and their lines are counted as dropped.
//! - Every sequence number up to the last one seen is either in a segment or counted as
//!   dropped: on open, `dropped = last_seq - readable lines`.
//! - Every open starts a new segment, so a line torn by a crash is never appended to; unreadable
//!   lines are skipped when reading.
//! - Only the log IO thread ([`super::SpoolWriter`]) calls the methods that write or read
//!   segments after [`Spool::open`].
//! - A spool opened as short-lived (a process that ends with the agent, see
//!   [`super::LogBuffer::open_short_lived`]) whose directory does not exist yet is *young*:
//!   for [`YOUNG`] after its open it holds its batches (at most [`YOUNG_BYTES`]) in memory
//!   instead of making the directory. Anything that reads, marks or flushes it, and the end of
//!   that time, writes them first ([`Spool::settle`]), in order; a deletion while young
//!   touches no disk. Until a job is queued for it, the buffer holds its batches and deletes
//!   it itself ([`Spool::hold`], under the spool's lock), with no trip to the IO thread; the
//!   end of its youth is queued with the first batch. Most workflow tasks live for
//!   milliseconds: their log never costs a directory and a file. An agent killed in that time
//!   loses those lines (the ring held them) with the task itself; lines the conductor already
//!   took keep their numbers there, and the node numbers new ones above them (`LogsBehind`).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::LogEntry;

/// How long a new spool holds its lines in memory before it makes its directory.
pub(super) const YOUNG: Duration = Duration::from_secs(2);

/// The most a young spool holds in memory; a batch beyond it makes the directory at once.
const YOUNG_BYTES: usize = 16 * 1024;

/// One batch a young spool holds back.
#[derive(Debug)]
struct Batch {
    first: u64,
    last: u64,
    buf: Vec<u8>,
    lines: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
    lines: u64,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Spool {
    dir: PathBuf,
    cap_bytes: u64,
    segments: VecDeque<Segment>,
    /// Open handle of the last segment, created lazily on the first append.
    current: Option<File>,
    /// The sequence number the next append is expected to start with.
    next_seq: u64,
    /// Lines not on disk among those up to the last one seen (shared with the buffer, which
    /// counts the lines it skips).
    dropped: Arc<AtomicU64>,
    /// Set after a write error has been traced, so a full disk does not flood the trace.
    write_failed: bool,
    /// Set by [`Spool::delete`]: later appends fail instead of making the directory again.
    deleted: bool,
    /// Until when a spool with no directory yet holds its batches back (see the module docs).
    young_until: Option<Instant>,
    held: Vec<Batch>,
    held_bytes: usize,
}

impl Spool {
    /// Opens (creating) the spool in `dir`; returns it with its last `keep` entries and the
    /// last sequence number it has seen (0 for a new spool).
    pub(super) fn open(
        dir: PathBuf,
        cap_bytes: u64,
        keep: usize,
        young: bool,
    ) -> io::Result<(Self, VecDeque<LogEntry>, u64)> {
        // The directory is made with the first segment: a deployment that never writes a line
        // (most workflow tasks) costs no directory.
        let dirents = match fs::read_dir(&dir) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let made = dirents.is_some();
        let mut segments = Vec::new();
        for dirent in dirents.into_iter().flatten() {
            let path = dirent?.path();
            let first_seq = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(first_seq) = first_seq {
                let bytes = fs::metadata(&path)?.len();
                segments.push(Segment {
                    first_seq,
                    path,
                    bytes,
                    lines: 0,
                });
            }
        }
        segments.sort_by_key(|s| s.first_seq);
        let mut recent = VecDeque::new();
        for seg in &mut segments {
            for entry in read_segment(&seg.path)? {
                seg.lines += 1;
                recent.push_back(entry);
                if recent.len() > keep {
                    recent.pop_front();
                }
            }
        }
        // A segment's name proves that the sequence reached `first_seq - 1`, even when the
        // segment itself holds no readable line.
        let last_seq = segments
            .iter()
            .map(|s| s.first_seq.saturating_sub(1))
            .chain(recent.back().map(|e| e.seq))
            .max()
            .unwrap_or(0);
        let kept: u64 = segments.iter().map(|s| s.lines).sum();
        let dropped = last_seq.saturating_sub(kept);
        // Empty segments would collide with the next segment's name: remove them.
        segments.retain(|s| {
            if s.lines > 0 {
                return true;
            }
            if let Err(error) = fs::remove_file(&s.path) {
                tracing::warn!(%error, path = %s.path.display(), "removing empty log segment failed");
            }
            false
        });
        let spool = Self {
            dir,
            cap_bytes: cap_bytes.max(1),
            segments: segments.into(),
            current: None,
            next_seq: last_seq + 1,
            dropped: Arc::new(AtomicU64::new(dropped)),
            write_failed: false,
            deleted: false,
            young_until: (young && !made).then(|| Instant::now() + YOUNG),
            held: Vec::new(),
            held_bytes: 0,
        };
        Ok((spool, recent, last_seq))
    }

    /// The dropped-lines counter (lines not on disk: deleted for the byte cap, skipped, or
    /// lost to a write error), shared with the buffer.
    pub(super) fn dropped_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Appends `lines` encoded entries (`buf`: JSON lines) with sequence numbers `first` to
    /// `last`, after everything already spooled. Errors are traced once and count the lines
    /// as dropped: the ring still has them.
    pub(super) fn append(&mut self, first: u64, last: u64, buf: Vec<u8>, lines: u64) {
        if let Err(buf) = self.hold(first, last, buf, lines) {
            self.settle();
            self.append_now(first, last, &buf, lines);
        }
    }

    /// Holds the batch in memory while young and within [`YOUNG_BYTES`]; else gives it back.
    pub(super) fn hold(
        &mut self,
        first: u64,
        last: u64,
        buf: Vec<u8>,
        lines: u64,
    ) -> Result<(), Vec<u8>> {
        match self.young_until {
            Some(until) if Instant::now() < until && self.held_bytes + buf.len() <= YOUNG_BYTES => {
                self.held_bytes += buf.len();
                self.held.push(Batch {
                    first,
                    last,
                    buf,
                    lines,
                });
                Ok(())
            }
            _ => Err(buf),
        }
    }

    /// Whether it is young (holds its lines back, with no directory yet).
    pub(super) fn young_until(&self) -> Option<Instant> {
        self.young_until
    }

    /// Ends its youth: the batches it held back are written, in order.
    pub(super) fn settle(&mut self) {
        if self.young_until.take().is_none() {
            return;
        }
        self.held_bytes = 0;
        for b in std::mem::take(&mut self.held) {
            self.append_now(b.first, b.last, &b.buf, b.lines);
        }
    }

    fn append_now(&mut self, first: u64, last: u64, buf: &[u8], lines: u64) {
        match self.write(first, buf, lines) {
            Ok(()) => self.write_failed = false,
            Err(error) => {
                if !self.write_failed {
                    tracing::warn!(%error, dir = %self.dir.display(), "log spool write failed");
                }
                self.write_failed = true;
                self.current = None;
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
        }
        self.next_seq = last + 1;
    }

    /// Records on disk that the sequence reached `last_seq` although the lines after the last
    /// written one are not spooled (they were skipped): an empty segment named after the next
    /// number, which [`Spool::open`] reads as "reached" so numbers are never reused.
    pub(super) fn mark_reached(&mut self, last_seq: u64) {
        self.settle();
        if self.next_seq > last_seq {
            return;
        }
        let next = last_seq + 1;
        match self.start_segment(next) {
            Ok(()) => self.next_seq = next,
            Err(error) => {
                tracing::warn!(%error, dir = %self.dir.display(), "log spool write failed");
                self.current = None;
            }
        }
    }

    fn start_segment(&mut self, first: u64) -> io::Result<()> {
        if self.deleted {
            return Err(io::Error::new(io::ErrorKind::NotFound, "log spool deleted"));
        }
        if self.segments.is_empty() {
            fs::create_dir_all(&self.dir)?;
        }
        let path = self.dir.join(format!("{first:020}.jsonl"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.current = Some(file);
        self.segments.push_back(Segment {
            first_seq: first,
            path,
            bytes: 0,
            lines: 0,
        });
        Ok(())
    }

    fn write(&mut self, first: u64, buf: &[u8], lines: u64) -> io::Result<()> {
        let segment_cap = (self.cap_bytes / 4).max(1);
        let rotate = self.current.is_none()
            || first != self.next_seq
            || self.segments.back().is_none_or(|s| s.bytes >= segment_cap);
        if rotate {
            self.start_segment(first)?;
        }
        if let (Some(file), Some(seg)) = (self.current.as_mut(), self.segments.back_mut()) {
            file.write_all(buf)?;
            seg.bytes += buf.len() as u64;
            seg.lines += lines;
        }
        self.enforce_cap();
        Ok(())
    }

    fn enforce_cap(&mut self) {
        let mut total: u64 = self.segments.iter().map(|s| s.bytes).sum();
        while total > self.cap_bytes && self.segments.len() > 1 {
            let Some(old) = self.segments.pop_front() else {
                break;
            };
            if let Err(error) = fs::remove_file(&old.path) {
                tracing::warn!(%error, path = %old.path.display(), "removing log segment failed");
            }
            total -= old.bytes;
            // Gaps before the next segment were counted when the lines were skipped.
            self.dropped.fetch_add(old.lines, Ordering::Relaxed);
        }
    }

    /// At most `max` spooled entries with `seq > after`, oldest first.
    pub(super) fn read_since(&mut self, after: u64, max: usize) -> io::Result<Vec<LogEntry>> {
        self.settle();
        // The segment holding `after + 1` is the last one starting at or before it.
        let start = self
            .segments
            .iter()
            .rposition(|s| s.first_seq <= after.saturating_add(1))
            .unwrap_or(0);
        let mut out = Vec::new();
        for seg in self.segments.iter().skip(start) {
            for entry in read_segment(&seg.path)? {
                if entry.seq > after {
                    out.push(entry);
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes the spool directory; later appends fail (and count as dropped).
    pub(super) fn delete(&mut self) {
        self.deleted = true;
        let young = self.young_until.take().is_some();
        self.held.clear();
        self.held_bytes = 0;
        self.current = None;
        self.segments.clear();
        if young {
            // It never made its directory.
            return;
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            // Never written to: it was never made.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, dir = %self.dir.display(), "removing log spool failed");
            }
        }
    }
}

fn read_segment(path: &Path) -> io::Result<Vec<LogEntry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        if let Ok(entry) = serde_json::from_slice::<LogEntry>(&line?) {
            out.push(entry);
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{LogBuffer, LogStream, SpoolWriter};
    use super::{LogEntry, read_segment};

    #[tokio::test]
    async fn seq_resumes_after_reopen_and_since_reads_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d1");
        let io = SpoolWriter::new();
        let logs = LogBuffer::open(path.clone(), 2, 1 << 20, &io).unwrap();
        for i in 0..5 {
            logs.push(LogStream::Stdout, format!("line {i}"));
        }
        // The ring keeps 2; since(0) comes from the spool, after the queued writes.
        let all = logs.since(0, 100);
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(all[0].line, "line 0");
        let async_read = logs.since_within_async(0, 100, usize::MAX).await;
        assert_eq!(async_read, all);
        logs.flush().await;
        drop(logs);

        let logs = LogBuffer::open(path.clone(), 2, 1 << 20, &io).unwrap();
        assert_eq!(logs.last_seq(), 5);
        assert_eq!(
            logs.tail(10, None)
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(logs.push(LogStream::System, "after"), 6);
        assert_eq!(
            logs.since(2, 100).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        logs.delete_spool().await;
        assert!(!path.exists());
    }

    /// A short task's log (a start and an exit line, then its deletion) costs no trip to the
    /// IO thread: with that thread held up, it all still completes. What it held is written
    /// at the end of its youth when it is not deleted.
    #[tokio::test]
    async fn a_young_spool_holds_and_deletes_without_the_io_thread() {
        let dir = tempfile::tempdir().unwrap();
        let io = SpoolWriter::new();
        let (release, held_up) = std::sync::mpsc::channel::<()>();
        let (started, blocked) = tokio::sync::oneshot::channel();
        io.submit(move || {
            let _ = started.send(());
            let _ = held_up.recv();
        });
        blocked.await.unwrap();
        let gone = dir.path().join("gone");
        let logs = LogBuffer::open_short_lived(gone.clone(), 10, 1 << 20, &io).unwrap();
        logs.push(LogStream::System, "started");
        logs.push(LogStream::System, "exited");
        tokio::time::timeout(std::time::Duration::from_secs(30), logs.delete_spool())
            .await
            .expect("deleting a young spool waited for the IO thread");
        let kept = dir.path().join("kept");
        let logs = LogBuffer::open_short_lived(kept.clone(), 10, 1 << 20, &io).unwrap();
        logs.push(LogStream::Stdout, "kept line");
        release.send(()).unwrap();
        assert!(!kept.exists(), "held");
        // Its settling was queued for the end of its youth.
        io.run_later_now().await;
        assert!(!gone.exists());
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        assert_eq!(lines, vec!["kept line".to_owned()]);
        let on_disk: Vec<LogEntry> = std::fs::read_dir(&kept)
            .unwrap()
            .flat_map(|f| read_segment(&f.unwrap().path()).unwrap())
            .collect();
        let lines: Vec<String> = on_disk.into_iter().map(|e| e.line).collect();
        assert_eq!(lines, vec!["kept line".to_owned()]);
    }

    #[tokio::test]
    async fn a_spool_is_made_with_its_first_line_and_never_after_its_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiet");
        let io = SpoolWriter::new();
        let logs = LogBuffer::open_short_lived(path.clone(), 10, 1 << 20, &io).unwrap();
        logs.flush().await;
        assert!(!path.exists(), "no line, no directory");
        // Reopening a spool that was never made is a fresh one.
        drop(logs);
        let logs = LogBuffer::open_short_lived(path.clone(), 10, 1 << 20, &io).unwrap();
        assert_eq!(logs.last_seq(), 0);
        // A young spool holds small batches in memory, and writes at once past its bound.
        logs.push(LogStream::Stdout, "small");
        io.run(|| ()).await.unwrap();
        assert!(!path.exists(), "held in memory");
        logs.push(LogStream::Stdout, "x".repeat(super::YOUNG_BYTES));
        io.run(|| ()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(&path).unwrap().count(),
            1,
            "written at once"
        );
        logs.delete_spool().await;
        let logs = LogBuffer::open_short_lived(path.clone(), 10, 1 << 20, &io).unwrap();
        // Lines of a young spool wait in memory: deleted before its youth ends, it never
        // touched the disk.
        for i in 0..3 {
            logs.push(LogStream::Stdout, format!("line {i}"));
        }
        logs.after_writes(|| {}).await;
        assert!(path.exists(), "what waits for the writes makes them");
        logs.delete_spool().await;
        assert!(!path.exists());
        let logs = LogBuffer::open_short_lived(path.clone(), 10, 1 << 20, &io).unwrap();
        logs.push(LogStream::System, "started");
        logs.push(LogStream::System, "exited");
        // Queued after the pushes: the appends ran, and held their lines.
        logs.delete_spool().await;
        assert!(
            !path.exists(),
            "a spool deleted while young made no directory"
        );

        let logs = LogBuffer::open_short_lived(path.clone(), 10, 1 << 20, &io).unwrap();
        assert_eq!(logs.push(LogStream::Stdout, "first"), 1);
        logs.flush().await;
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 1);
        logs.delete_spool().await;
        assert!(!path.exists());
        // A line after the deletion stays in memory only.
        assert_eq!(logs.push(LogStream::Stdout, "late"), 2);
        logs.flush().await;
        assert!(!path.exists(), "a deleted spool is not made again");
    }

    #[tokio::test]
    async fn cap_drops_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d2");
        let io = SpoolWriter::new();
        // Each entry is ~60 bytes as JSON; a 1000-byte cap keeps a few segments of ~250 bytes.
        let logs = LogBuffer::open(path.clone(), 1000, 1000, &io).unwrap();
        for i in 0..200 {
            logs.push(LogStream::Stderr, format!("entry number {i:04}"));
        }
        logs.flush().await;
        let dropped = logs.dropped_lines();
        assert!(dropped > 150, "dropped {dropped}");
        let on_disk: u64 = std::fs::read_dir(&path)
            .unwrap()
            .map(|d| d.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 1000 + 300, "spool holds {on_disk} bytes");
        drop(logs);
        let logs = LogBuffer::open(path, 1000, 1000, &io).unwrap();
        assert_eq!(logs.dropped_lines(), dropped);
        let kept = logs.since(0, 1000);
        assert_eq!(kept.first().unwrap().seq, dropped + 1);
        assert_eq!(kept.last().unwrap().seq, 200);
        assert_eq!(logs.push(LogStream::Stdout, "x"), 201);
    }
}
