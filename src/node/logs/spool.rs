//! The on-disk log spool of one deployment: JSON-lines segment files named after the first
//! sequence number they hold (`00000000000000000042.jsonl`), in one directory.
//!
//! Invariants:
//! - Segments hold contiguous, increasing sequence numbers; a newer segment starts after the
//!   last entry of the previous one.
//! - The total size stays near the byte cap: when it is exceeded, whole oldest segments are
//!   deleted (never the one being written) and their lines are counted as dropped.
//! - Every open starts a new segment, so a line torn by a crash is never appended to; unreadable
//!   lines are skipped when reading.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::LogEntry;

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
    dropped: u64,
    /// Set after a write error has been traced, so a full disk does not flood the trace.
    write_failed: bool,
}

impl Spool {
    /// Opens (creating) the spool in `dir`; returns it with its last `keep` entries and the
    /// last sequence number it has seen (0 for a new spool).
    pub(super) fn open(
        dir: PathBuf,
        cap_bytes: u64,
        keep: usize,
    ) -> io::Result<(Self, VecDeque<LogEntry>, u64)> {
        fs::create_dir_all(&dir)?;
        let mut segments = Vec::new();
        for dirent in fs::read_dir(&dir)? {
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
        let dropped = segments
            .first()
            .map_or(0, |s| s.first_seq.saturating_sub(1));
        // A segment's name proves that the sequence reached `first_seq - 1`, even when the
        // segment itself holds no readable line.
        let last_seq = segments
            .iter()
            .map(|s| s.first_seq.saturating_sub(1))
            .chain(recent.back().map(|e| e.seq))
            .max()
            .unwrap_or(0);
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
            dropped,
            write_failed: false,
        };
        Ok((spool, recent, last_seq))
    }

    /// Lines deleted to respect the byte cap (lines before the first kept segment).
    pub(super) fn dropped_lines(&self) -> u64 {
        self.dropped
    }

    /// Appends entries (contiguous, after everything already spooled). Errors are traced
    /// once and otherwise ignored: the ring still has the lines.
    pub(super) fn append<'a>(&mut self, entries: impl Iterator<Item = &'a LogEntry>) {
        let mut buf = Vec::new();
        let mut first = None;
        let mut lines = 0u64;
        for e in entries {
            first.get_or_insert(e.seq);
            if serde_json::to_writer(&mut buf, e).is_ok() {
                buf.push(b'\n');
                lines += 1;
            }
        }
        let Some(first) = first else { return };
        match self.write(first, &buf, lines) {
            Ok(()) => self.write_failed = false,
            Err(error) => {
                if !self.write_failed {
                    tracing::warn!(%error, dir = %self.dir.display(), "log spool write failed");
                }
                self.write_failed = true;
                self.current = None;
            }
        }
    }

    fn write(&mut self, first: u64, buf: &[u8], lines: u64) -> io::Result<()> {
        let segment_cap = (self.cap_bytes / 4).max(1);
        let rotate =
            self.current.is_none() || self.segments.back().is_none_or(|s| s.bytes >= segment_cap);
        if rotate {
            let path = self.dir.join(format!("{first:020}.jsonl"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            self.current = Some(file);
            self.segments.push_back(Segment {
                first_seq: first,
                path,
                bytes: 0,
                lines: 0,
            });
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
            self.dropped = self
                .segments
                .front()
                .map_or(self.dropped + old.lines, |s| s.first_seq.saturating_sub(1));
        }
    }

    /// At most `max` spooled entries with `seq > after`, oldest first.
    pub(super) fn read_since(&self, after: u64, max: usize) -> io::Result<Vec<LogEntry>> {
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

    /// Removes the spool directory.
    pub(super) fn delete(self) {
        drop(self.current);
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(%error, dir = %self.dir.display(), "removing log spool failed");
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
    use super::super::{LogBuffer, LogStream};

    #[test]
    fn seq_resumes_after_reopen_and_since_reads_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d1");
        let logs = LogBuffer::open(path.clone(), 2, 1 << 20).unwrap();
        for i in 0..5 {
            logs.push(LogStream::Stdout, format!("line {i}"));
        }
        // The ring keeps 2; since(0) comes from the spool.
        let all = logs.since(0, 100);
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(all[0].line, "line 0");
        drop(logs);

        let logs = LogBuffer::open(path.clone(), 2, 1 << 20).unwrap();
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
        logs.delete_spool();
        assert!(!path.exists());
    }

    #[test]
    fn cap_drops_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d2");
        // Each entry is ~60 bytes as JSON; a 1000-byte cap keeps a few segments of ~250 bytes.
        let logs = LogBuffer::open(path.clone(), 1000, 1000).unwrap();
        for i in 0..200 {
            logs.push(LogStream::Stderr, format!("entry number {i:04}"));
        }
        let dropped = logs.dropped_lines();
        assert!(dropped > 150, "dropped {dropped}");
        let on_disk: u64 = std::fs::read_dir(&path)
            .unwrap()
            .map(|d| d.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 1000 + 300, "spool holds {on_disk} bytes");
        drop(logs);
        let logs = LogBuffer::open(path, 1000, 1000).unwrap();
        assert_eq!(logs.dropped_lines(), dropped);
        let kept = logs.since(0, 1000);
        assert_eq!(kept.first().unwrap().seq, dropped + 1);
        assert_eq!(kept.last().unwrap().seq, 200);
        assert_eq!(logs.push(LogStream::Stdout, "x"), 201);
    }
}
