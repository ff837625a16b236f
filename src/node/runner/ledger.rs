//! The ledger of processes this node runs without a keeper (`outlive_agent: false`): one
//! append-only file, `<work_dir>/attached.jsonl`, instead of a run directory and a record file
//! per process. A workflow task lives for milliseconds; making and deleting two files for each
//! was the largest cost of a task on a busy file system (a new inode is dear where many were
//! just deleted: ext4 looks past each of them).
//!
//! Invariants:
//! - A line is written whole by one `write` to a file opened for appending: `{"start": ...}`
//!   once the process runs (its [`Record`], without the environment), `{"end": ...}` once it
//!   is gone (its group killed and reaped). Replaying the lines in order gives the live set;
//!   a torn last line (a crash mid-write) is skipped.
//! - An end names the pid it ends: a start that replaced an older one for the same deployment
//!   is not ended by the older one's end.
//! - The file is rewritten (a new file renamed over it) with only the live records when the
//!   agent starts ([`Ledger::recover`]) and when it grew past [`COMPACT_BYTES`] and four times
//!   what is live.
//! - Only the agent writes it, under one lock; a second agent on the same work directory is
//!   refused earlier (`agent.lock`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::node::keeper::Record;

/// The ledger's file name under the work directory.
pub const FILE: &str = "attached.jsonl";

/// Below this size the ledger is never rewritten while the agent runs.
const COMPACT_BYTES: u64 = 1 << 20;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line<R> {
    /// `R`: the record, owned when read and borrowed when written.
    Start {
        id: String,
        record: R,
    },
    End {
        id: String,
        pid: u32,
    },
}

#[derive(Debug, Default)]
struct Inner {
    file: Option<File>,
    /// Each live deployment's pid and its start line (with its newline).
    live: BTreeMap<String, (u32, Vec<u8>)>,
    /// The file's size as written by this agent.
    bytes: u64,
    /// A write failed part way: the next line starts with a newline of its own.
    torn: bool,
}

/// See the module docs. A start or an end is one `write` of a line to a local file (and,
/// rarely, a rewrite of the few live lines), which costs less than a trip to the blocking
/// pool: the runner calls them on the async workers. [`Ledger::recover`] reads the whole file:
/// it runs once, at the agent's start.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl Ledger {
    /// The ledger under `work_dir` (nothing is read or made until it is used).
    pub fn new(work_dir: &Path) -> Self {
        Self {
            path: work_dir.join(FILE),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The records a previous agent left live, by deployment; the file is rewritten with just
    /// them, so each is ended once in the ledger when [`Ledger::ended`] says so. What could
    /// be read is returned even when the rest cannot be, or the rewrite fails (both logged):
    /// those processes must still be ended.
    pub fn recover(&self) -> BTreeMap<String, Record> {
        let mut inner = self.lock();
        inner.live.clear();
        let mut found = BTreeMap::new();
        match File::open(&self.path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = match line {
                        Ok(line) => line,
                        Err(error) => {
                            tracing::error!(%error, path = %self.path.display(), "reading the ledger of processes without a keeper failed part way");
                            break;
                        }
                    };
                    match serde_json::from_slice::<Line<Record>>(&line) {
                        Ok(Line::Start { id, record }) => {
                            let pid = record.workload.map_or(0, |w| w.pid);
                            // Kept as read, for the rewrite.
                            let mut line = line;
                            line.push(b'\n');
                            inner.live.insert(id.clone(), (pid, line));
                            found.insert(id, record);
                        }
                        Ok(Line::End { id, pid }) => {
                            if inner.live.get(&id).is_some_and(|(p, _)| *p == pid) {
                                inner.live.remove(&id);
                                found.remove(&id);
                            }
                        }
                        // Torn by a crash, or written by another version: skipped.
                        Err(_) => {}
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::error!(%error, path = %self.path.display(), "cannot read the ledger of processes without a keeper");
            }
        }
        // Ends are appended to the old file if it cannot be rewritten.
        if let Err(error) = self.rewrite(&mut inner) {
            tracing::warn!(%error, path = %self.path.display(), "cannot rewrite the ledger of processes without a keeper");
            // Its last line may be torn: the next one starts on a line of its own.
            inner.torn = true;
        }
        found
    }

    /// Writes down a process that now runs for `id`. An error means it is not written: a
    /// later agent could not find it.
    pub fn started(&self, id: &str, record: &Record) -> io::Result<()> {
        let pid = record.workload.map_or(0, |w| w.pid);
        let line = encode(&Line::Start {
            id: id.to_owned(),
            record,
        })?;
        let mut inner = self.lock();
        self.append(&mut inner, &line)?;
        inner.live.insert(id.to_owned(), (pid, line));
        Ok(())
    }

    /// Writes down that the process `pid` of `id` is gone (a no-op when it is not live).
    /// Failures are logged: the worst a lost end causes is a later agent signalling a group
    /// that no longer exists, which it checks first.
    pub fn ended(&self, id: &str, pid: u32) {
        let mut inner = self.lock();
        if inner.live.get(id).is_none_or(|(p, _)| *p != pid) {
            return;
        }
        inner.live.remove(id);
        let result = encode(&Line::<&Record>::End {
            id: id.to_owned(),
            pid,
        })
        .and_then(|line| self.append(&mut inner, &line))
        .and_then(|()| {
            // What is live is summed only once the file is past the size that matters.
            let over = inner.bytes > COMPACT_BYTES
                && inner.bytes
                    > 4 * inner
                        .live
                        .values()
                        .map(|(_, l)| l.len() as u64)
                        .sum::<u64>();
            if over {
                self.rewrite(&mut inner)
            } else {
                Ok(())
            }
        });
        if let Err(error) = result {
            tracing::warn!(%error, path = %self.path.display(), "writing the ledger of processes without a keeper failed");
        }
    }

    /// What it names live for `id`, if anything (a start that was never ended).
    pub fn live(&self, id: &str) -> Option<Record> {
        let inner = self.lock();
        let (_, line) = inner.live.get(id)?;
        match serde_json::from_slice::<Line<Record>>(line) {
            Ok(Line::Start { record, .. }) => Some(record),
            _ => None,
        }
    }

    fn append(&self, inner: &mut Inner, line: &[u8]) -> io::Result<()> {
        if inner.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            inner.bytes = file.metadata()?.len();
            inner.file = Some(file);
        }
        let torn = std::mem::take(&mut inner.torn);
        let Some(file) = inner.file.as_mut() else {
            return Err(io::Error::other("ledger not open"));
        };
        let written = if torn {
            let mut whole = Vec::with_capacity(line.len() + 1);
            whole.push(b'\n');
            whole.extend_from_slice(line);
            file.write_all(&whole).map(|()| whole.len())
        } else {
            file.write_all(line).map(|()| line.len())
        };
        match written {
            Ok(n) => {
                inner.bytes += n as u64;
                Ok(())
            }
            Err(e) => {
                // A part may have been written: the next line starts on a line of its own.
                inner.file = None;
                inner.torn = true;
                Err(e)
            }
        }
    }

    /// Replaces the file with one holding only the live starts.
    fn rewrite(&self, inner: &mut Inner) -> io::Result<()> {
        let mut all = Vec::new();
        for (_, line) in inner.live.values() {
            all.extend_from_slice(line);
        }
        inner.file = None;
        crate::node::state::write_private(&self.path, &all, false)?;
        inner.bytes = all.len() as u64;
        inner.torn = false;
        Ok(())
    }
}

fn encode(line: &Line<&Record>) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::node::keeper::{Launch, ProcId};
    use crate::node::runner::ProcessSpec;

    fn record(id: &str, pid: u32) -> Record {
        Record {
            version: crate::node::keeper::VERSION,
            launch: Launch {
                id: id.into(),
                generation: 1,
                spec: crate::spec::parse(
                    &serde_json::json!({"spec": {"config": {"command": ["true"]}}}),
                )
                .unwrap(),
                restart_count: 0,
                started_at_ms: 0,
                process: ProcessSpec {
                    command: vec!["true".into()],
                    cwd: "/".into(),
                    env: BTreeMap::new(),
                },
                max_line: 1024,
                outbox_bytes: 1024,
            },
            keeper: ProcId { pid: 1, start: 1 },
            workload: Some(ProcId { pid, start: 7 }),
            group: None,
            attached: true,
        }
    }

    fn pids(found: &BTreeMap<String, Record>) -> Vec<(&str, u32)> {
        found
            .iter()
            .map(|(id, r)| (id.as_str(), r.workload.map_or(0, |w| w.pid)))
            .collect()
    }

    #[test]
    fn replaying_the_lines_gives_what_is_live_and_the_file_keeps_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        assert!(ledger.recover().is_empty(), "no file: nothing live");
        ledger.started("a", &record("a", 10)).unwrap();
        ledger.started("b", &record("b", 20)).unwrap();
        ledger.ended("a", 10);
        // A new process of b replaces the old one; the old one's late end ends nothing.
        ledger.started("b", &record("b", 21)).unwrap();
        ledger.ended("b", 20);
        ledger.started("c", &record("c", 30)).unwrap();
        assert_eq!(ledger.live("b").unwrap().workload.unwrap().pid, 21);
        assert!(ledger.live("a").is_none());
        drop(ledger);
        // A crash mid-write leaves a torn last line: skipped.
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"end":{"id":"c","p"#).unwrap();
        drop(f);

        let next = Ledger::new(dir.path());
        let found = next.recover();
        assert_eq!(pids(&found), [("b", 21), ("c", 30)]);
        // Rewritten with the live starts alone, and readable again after new lines.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        next.ended("c", 30);
        next.started("d", &record("d", 40)).unwrap();
        drop(next);
        let found = Ledger::new(dir.path()).recover();
        assert_eq!(pids(&found), [("b", 21), ("d", 40)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "it holds sealed launches only, but is private"
        );
    }

    #[test]
    fn what_was_read_is_returned_when_the_rewrite_fails_and_later_lines_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        ledger.started("a", &record("a", 10)).unwrap();
        ledger.started("b", &record("b", 20)).unwrap();
        drop(ledger);
        // A torn last line, and a rewrite that cannot happen (its temporary file is taken).
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"start":{"id":"c""#).unwrap();
        drop(f);
        let tmp = path.with_extension("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let next = Ledger::new(dir.path());
        assert_eq!(pids(&next.recover()), [("a", 10), ("b", 20)]);
        // Appended after the torn line, on a line of its own.
        next.ended("a", 10);
        drop(next);
        std::fs::remove_dir(&tmp).unwrap();
        assert_eq!(pids(&Ledger::new(dir.path()).recover()), [("b", 20)]);
    }

    #[test]
    fn a_long_running_agent_rewrites_it_when_it_grew_past_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        ledger.started("kept", &record("kept", 1)).unwrap();
        let path = dir.path().join(FILE);
        let mut largest = 0;
        for pid in 2..4000 {
            ledger.started("task", &record("task", pid)).unwrap();
            ledger.ended("task", pid);
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        assert!(largest <= COMPACT_BYTES + 4096, "grew to {largest} bytes");
        assert!(
            std::fs::metadata(&path).unwrap().len() < COMPACT_BYTES,
            "rewritten at least once"
        );
        drop(ledger);
        let found = Ledger::new(dir.path()).recover();
        assert_eq!(pids(&found), [("kept", 1)]);
    }
}
