//! The outbox: the keeper's bounded, append-only record of a workload's output, in segment
//! files named by the byte offset they start at (`out.00000000000000065536`). Offsets run on
//! across segments, so one number (the agent's cursor) says how far a reader got.
//!
//! Invariants:
//! - A record is one line: a kind byte (`o`, `e`, `x`), a space, the time in ms, a space, the
//!   text, `\n`. Texts hold no `\n` (the line splitter removed it).
//! - A new segment starts at the previous one's start plus its length on disk, so a reader's
//!   offset stays exact; after a failed write the writer starts a new segment, and a reader
//!   drops a partial record at the end of a segment that has a successor.
//! - While the segments hold more than the cap, whole oldest segments are deleted (never the
//!   one being written). The agent deletes the segments it has read past; the keeper counts
//!   only the ones still there.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::node::logs::LogStream;

const PREFIX: &str = "out.";

/// Segments are cut at a quarter of the cap (at least 64 KiB), so dropping the oldest one
/// frees a quarter of the space.
fn segment_bytes(cap: u64) -> u64 {
    (cap / 4).max(64 * 1024)
}

pub fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{start:020}"))
}

/// The segments in `dir` by start offset, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut starts: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            d.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    starts.sort_unstable();
    Ok(starts)
}

/// The keeper's side.
pub(super) struct OutboxWriter {
    dir: PathBuf,
    cap: u64,
    /// Where segments are cut.
    segment: u64,
    /// Start offsets of the segments written, oldest first (some may be deleted by the agent).
    written: VecDeque<u64>,
    /// The segment being written: its start, its file (None after a failed write), its length.
    current: (u64, Option<File>, u64),
    buf: Vec<u8>,
}

impl OutboxWriter {
    pub(super) fn create(dir: &Path, cap: u64) -> Self {
        let mut writer = Self {
            dir: dir.to_path_buf(),
            cap: cap.max(1),
            segment: segment_bytes(cap),
            written: VecDeque::new(),
            current: (0, None, 0),
            buf: Vec::new(),
        };
        writer.open_segment(0);
        writer
    }

    fn open_segment(&mut self, start: u64) {
        // Owner-only: workloads print secrets too.
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(segment_path(&self.dir, start))
            .ok();
        if file.is_some() && self.written.back() != Some(&start) {
            self.written.push_back(start);
        }
        self.current = (start, file, 0);
    }

    /// Queues a line record.
    pub(super) fn line(&mut self, kind: u8, at_ms: i64, text: &[u8]) {
        self.buf.push(kind);
        let _ = write!(self.buf, " {at_ms} ");
        self.buf.extend_from_slice(text);
        self.buf.push(b'\n');
    }

    /// Queues the exit record.
    pub(super) fn exit(&mut self, at_ms: i64, code: i32) {
        let _ = writeln!(self.buf, "x {at_ms} {code}");
    }

    /// Writes what is queued (one write); true when something was written.
    pub(super) fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return false;
        }
        let (start, ref file, len) = self.current;
        if file.is_none() || (len > 0 && len + self.buf.len() as u64 > self.segment) {
            // The next segment starts where this one ends as counted: after a failed write
            // that is past what reached the disk, so a reader sees the lost bytes as a gap
            // (and drops the torn record at the end of this one).
            let on_disk = fs::metadata(segment_path(&self.dir, start)).map_or(0, |m| m.len());
            let end = on_disk.max(len);
            if end > 0 {
                self.open_segment(start + end);
                self.trim();
            } else {
                self.open_segment(start);
            }
        }
        let (_, file, len) = &mut self.current;
        let wrote = match file {
            Some(f) => match f.write_all(&self.buf) {
                Ok(()) => {
                    *len += self.buf.len() as u64;
                    true
                }
                Err(_) => {
                    // The disk is full or failing: these lines are lost. They are counted
                    // all the same, and the next write starts a new segment after them.
                    *len += self.buf.len() as u64;
                    *file = None;
                    false
                }
            },
            None => {
                *len += self.buf.len() as u64;
                false
            }
        };
        self.buf.clear();
        wrote
    }

    /// Deletes the oldest segments while those still present exceed the cap.
    fn trim(&mut self) {
        let current = self.current.0;
        let mut sizes: Vec<(u64, u64)> = self
            .written
            .iter()
            .filter_map(|&s| {
                fs::metadata(segment_path(&self.dir, s))
                    .ok()
                    .map(|m| (s, m.len()))
            })
            .collect();
        self.written = sizes.iter().map(|&(s, _)| s).collect();
        let mut total: u64 = sizes.iter().map(|&(_, n)| n).sum();
        while total > self.cap && sizes.first().is_some_and(|&(s, _)| s != current) {
            let (start, bytes) = sizes.remove(0);
            let _ = fs::remove_file(segment_path(&self.dir, start));
            self.written.pop_front();
            total -= bytes;
        }
    }
}

/// One outbox record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// A line of output.
    Line {
        stream: LogStream,
        at_ms: i64,
        text: String,
    },
    /// The workload exited with this code.
    Exit { at_ms: i64, code: i32 },
}

/// What one read found.
#[derive(Debug, Default)]
pub struct Batch {
    pub recs: Vec<Rec>,
    /// Bytes deleted before they were read (the outbox was over its cap).
    pub lost_bytes: u64,
    /// The offset up to which everything has been read.
    pub cursor: u64,
    /// Start offsets of the segments this read finished with (to delete once the cursor that
    /// passed them is saved).
    pub passed: Vec<u64>,
    /// The read stopped at its byte budget: more may be there now.
    pub more: bool,
}

impl Batch {
    /// Whether the read changed anything (records, a gap, or a cursor that moved over
    /// unreadable records).
    pub fn is_empty(&self, cursor_before: u64) -> bool {
        self.recs.is_empty() && self.lost_bytes == 0 && self.cursor == cursor_before
    }
}

/// The agent's side: reads records from an offset on.
#[derive(Debug)]
pub struct OutboxReader {
    dir: PathBuf,
    /// Offset of the first byte not yet returned as part of a record.
    cursor: u64,
    /// The segment being read: its start and the file, positioned at `cursor + partial.len()`.
    open: Option<(u64, File)>,
    /// Bytes of a record not complete yet.
    partial: Vec<u8>,
    /// A newer segment was seen after the end of the open one: the open one is final, and
    /// once read to its end again (the writer may have appended just before it rotated) the
    /// reader moves on.
    finishing: bool,
    /// Read buffer, kept between reads.
    buf: Vec<u8>,
}

impl OutboxReader {
    /// A reader of `dir`'s outbox from `cursor` on.
    pub fn new(dir: &Path, cursor: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cursor,
            open: None,
            partial: Vec::new(),
            finishing: false,
            buf: vec![0u8; 64 * 1024],
        }
    }

    /// Reads complete records, about `max_bytes` of them at most. Blocking file IO.
    pub fn read(&mut self, max_bytes: usize) -> io::Result<Batch> {
        let mut batch = Batch::default();
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.read_into(&mut buf, max_bytes, &mut batch);
        self.buf = buf;
        result?;
        batch.cursor = self.cursor;
        Ok(batch)
    }

    fn read_into(&mut self, buf: &mut [u8], max_bytes: usize, batch: &mut Batch) -> io::Result<()> {
        let mut taken = 0usize;
        loop {
            if taken >= max_bytes {
                batch.more = true;
                return Ok(());
            }
            let Some((start, file)) = &mut self.open else {
                if !self.open_next(batch)? {
                    return Ok(());
                }
                continue;
            };
            let n = match file.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n > 0 {
                taken += n;
                self.take_records(&buf[..n], &mut batch.recs);
                continue;
            }
            // The end of this segment: go on only if a newer one exists (this one is done),
            // after one more read to its end.
            let start = *start;
            let newer = segments(&self.dir)?.into_iter().find(|&s| s > start);
            match newer {
                Some(_) if !self.finishing => self.finishing = true,
                Some(next) => {
                    self.finishing = false;
                    let reached = self.cursor + self.partial.len() as u64;
                    batch.lost_bytes += next.saturating_sub(reached);
                    batch.passed.push(start);
                    self.partial.clear();
                    self.cursor = next;
                    self.open = None;
                }
                None => return Ok(()),
            }
        }
    }

    /// Opens the segment holding the cursor, or the oldest one after it (the bytes in between
    /// were deleted). False when there is none yet.
    fn open_next(&mut self, batch: &mut Batch) -> io::Result<bool> {
        let starts = match segments(&self.dir) {
            Ok(starts) => starts,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let Some(start) = starts
            .iter()
            .rev()
            .find(|&&s| s <= self.cursor)
            .or_else(|| starts.first())
            .copied()
        else {
            return Ok(false);
        };
        if start > self.cursor {
            batch.lost_bytes += start - self.cursor;
            self.cursor = start;
        }
        let mut file = match File::open(segment_path(&self.dir, start)) {
            Ok(f) => f,
            // Deleted between the listing and the open: look again next time.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.cursor - start))?;
        self.partial.clear();
        self.finishing = false;
        self.open = Some((start, file));
        Ok(true)
    }

    fn take_records(&mut self, mut bytes: &[u8], out: &mut Vec<Rec>) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            // The cursor stays before a partial record: count the whole record now.
            self.cursor += (self.partial.len() + i + 1) as u64;
            let record = if self.partial.is_empty() {
                parse(&bytes[..i])
            } else {
                self.partial.extend_from_slice(&bytes[..i]);
                let r = parse(&self.partial);
                self.partial.clear();
                r
            };
            if let Some(r) = record {
                out.push(r);
            }
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
        // The partial bytes are read but not passed: the cursor stays before them.
    }
}

fn parse(record: &[u8]) -> Option<Rec> {
    let kind = *record.first()?;
    let rest = record.get(2..)?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let at_ms: i64 = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
    let text = &rest[space + 1..];
    match kind {
        b'o' | b'e' => Some(Rec::Line {
            stream: if kind == b'o' {
                LogStream::Stdout
            } else {
                LogStream::Stderr
            },
            at_ms,
            text: String::from_utf8_lossy(text).into_owned(),
        }),
        b'x' => Some(Rec::Exit {
            at_ms,
            code: std::str::from_utf8(text).ok()?.parse().ok()?,
        }),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lines(batch: &Batch) -> Vec<String> {
        batch
            .recs
            .iter()
            .map(|r| match r {
                Rec::Line { stream, text, .. } => format!("{stream}:{text}"),
                Rec::Exit { code, .. } => format!("exit:{code}"),
            })
            .collect()
    }

    #[test]
    fn records_round_trip_across_segments_and_resume_from_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OutboxWriter::create(dir.path(), 4 * 64 * 1024);
        let long = "y".repeat(1000);
        for i in 0..300 {
            w.line(b'o', 5, format!("{i} {long}").as_bytes());
            w.flush();
        }
        w.line(b'e', 6, b"last words");
        w.exit(7, -9);
        w.flush();
        assert!(segments(dir.path()).unwrap().len() > 1, "several segments");
        let mut r = OutboxReader::new(dir.path(), 0);
        let first = r.read(100 * 1024).unwrap();
        assert!(!first.recs.is_empty() && first.recs.len() < 302);
        assert_eq!(first.lost_bytes, 0);
        // A new reader from the first one's cursor continues exactly where it stopped.
        let mut again = OutboxReader::new(dir.path(), first.cursor);
        let rest = again.read(usize::MAX).unwrap();
        let all: Vec<String> = lines(&first).into_iter().chain(lines(&rest)).collect();
        assert_eq!(all.len(), 302);
        assert_eq!(all[0], format!("stdout:0 {long}"));
        assert_eq!(all[299], format!("stdout:299 {long}"));
        assert_eq!(all[300..], ["stderr:last words", "exit:-9"]);
        assert_eq!(rest.recs.last(), Some(&Rec::Exit { at_ms: 7, code: -9 }));
    }

    #[test]
    fn over_the_cap_oldest_segments_go_and_the_reader_counts_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 4 * 64 * 1024;
        let mut w = OutboxWriter::create(dir.path(), cap);
        let line = "z".repeat(1000);
        for i in 0..2000 {
            w.line(b'o', 1, format!("{i:05} {line}").as_bytes());
            w.flush();
        }
        let on_disk: u64 = segments(dir.path())
            .unwrap()
            .iter()
            .map(|&s| fs::metadata(segment_path(dir.path(), s)).unwrap().len())
            .sum();
        assert!(on_disk <= cap + segment_bytes(cap), "{on_disk}");
        let mut r = OutboxReader::new(dir.path(), 0);
        let batch = r.read(usize::MAX).unwrap();
        assert!(batch.lost_bytes > 0);
        let got = lines(&batch);
        // What is left is the newest lines, complete and in order.
        assert_eq!(got.last().unwrap(), &format!("stdout:01999 {line}"));
        let first: usize = got[0][7..12].parse().unwrap();
        assert_eq!(got.len(), 2000 - first);
        assert_eq!(batch.lost_bytes, first as u64 * (line.len() as u64 + 11));
    }

    #[test]
    fn a_partial_record_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 0);
        fs::write(&path, b"o 1 hel").unwrap();
        let mut r = OutboxReader::new(dir.path(), 0);
        let b = r.read(usize::MAX).unwrap();
        assert!(b.recs.is_empty());
        assert_eq!(b.cursor, 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"lo\nx 2 0\n").unwrap();
        let b = r.read(usize::MAX).unwrap();
        assert_eq!(lines(&b), ["stdout:hello", "exit:0"]);
        assert_eq!(b.cursor, 16);
    }

    #[test]
    fn a_reader_racing_the_writer_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        const LINES: u64 = 60_000;
        let writer = std::thread::spawn(move || {
            // A cap never reached (nothing is trimmed), small segments: many rotations for the
            // reader to race.
            let mut w = OutboxWriter::create(&path, 1 << 30);
            w.segment = 4096;
            for i in 0..LINES {
                w.line(b'o', 1, format!("{i:08}").as_bytes());
                w.flush();
            }
            w.exit(1, 0);
            w.flush();
        });
        let mut r = OutboxReader::new(dir.path(), 0);
        let (mut got, mut lost) = (Vec::new(), 0u64);
        'read: loop {
            let batch = r.read(64 * 1024).unwrap();
            lost += batch.lost_bytes;
            for rec in batch.recs {
                match rec {
                    Rec::Line { text, .. } => got.push(text.parse::<u64>().unwrap()),
                    Rec::Exit { .. } => break 'read,
                }
            }
            // As the agent does: segments read past go.
            for start in &batch.passed {
                let _ = fs::remove_file(segment_path(dir.path(), *start));
            }
        }
        writer.join().unwrap();
        assert_eq!(lost, 0, "bytes skipped");
        assert_eq!(
            got,
            (0..LINES).collect::<Vec<_>>(),
            "every line, in order, once"
        );
    }
}
