//! Default working directories (`<work_dir>/deployments/<id>`), made for a start and, once
//! the deployment is removed and the directory is empty, kept as spares
//! (`<work_dir>/spare-dirs/<n>`) for the next one instead of deleted.
//!
//! A workflow task is a deployment of its own that lives for milliseconds. Making a directory
//! and deleting it again for each was the largest single cost of a task on a busy file system
//! (ext4 looks past every inode deleted recently to allocate a new one; `benches/dag.rs`): a
//! spare is renamed into place instead, which allocates nothing.
//!
//! Invariants:
//! - Only an empty directory becomes a spare, and only an empty spare is given out; one that
//!   holds files stays where it is (they may be the user's, or written by a process that
//!   escaped its group's end and still has it as its working directory).
//! - At most [`MAX_SPARES`] spares are kept; beyond that an empty directory is deleted.
//! - A spare given out is renamed to the deployment's path before anything runs there, with
//!   the mode a new directory would get.
//! - The spares are found again when the agent starts (they are plain directories).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The most spares kept.
pub const MAX_SPARES: usize = 256;

/// The spares' folder under the work directory.
const SPARES: &str = "spare-dirs";

/// See the module docs. Its methods are a few syscalls in the node's own directory (a
/// `read_dir` of one empty directory, a rename, a `chmod`): the supervisor calls them on its
/// workers, as it does the spawn.
#[derive(Debug)]
pub struct WorkDirs {
    work_dir: PathBuf,
    spares: Mutex<Option<Vec<PathBuf>>>,
    next: AtomicU64,
}

impl WorkDirs {
    /// The directories under `work_dir` (the spares there are listed on first use).
    pub fn new(work_dir: &Path) -> Self {
        Self {
            work_dir: work_dir.to_path_buf(),
            spares: Mutex::new(None),
            next: AtomicU64::new(0),
        }
    }

    /// The default working directory of deployment `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.work_dir.join("deployments").join(id)
    }

    fn spares(&self) -> MutexGuard<'_, Option<Vec<PathBuf>>> {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The spares, listed from disk the first time.
    fn listed<'a>(&self, guard: &'a mut Option<Vec<PathBuf>>) -> &'a mut Vec<PathBuf> {
        guard.get_or_insert_with(|| {
            let dir = self.work_dir.join(SPARES);
            let found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            // New names follow the ones found.
            let high = found
                .iter()
                .filter_map(|p| p.file_name()?.to_str()?.parse::<u64>().ok())
                .max()
                .map_or(0, |n| n + 1);
            self.next.fetch_max(high, Ordering::Relaxed);
            found
        })
    }

    /// Makes the default working directory of `id` (a spare when there is one) and returns
    /// it; one that exists is kept as it is.
    pub fn make(&self, id: &str) -> io::Result<PathBuf> {
        let path = self.path(id);
        if path.is_dir() {
            return Ok(path);
        }
        let spare = {
            let mut guard = self.spares();
            self.listed(&mut guard).pop()
        };
        // One that is not empty (a process that escaped its group's end still had it as its
        // working directory and wrote there) is left where it is, and not used again.
        if let Some(spare) = spare.filter(|s| is_empty(s)) {
            match rename_into(&spare, &path) {
                Ok(()) => {
                    // As made new (the last user may have changed it).
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
                    return Ok(path);
                }
                // Gone (someone removed it): a new one instead.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Still there: kept for later.
                Err(_) => {
                    let mut guard = self.spares();
                    self.listed(&mut guard).push(spare);
                }
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)?;
        Ok(path)
    }

    /// [`WorkDirs::make`], with the error as a start failure says it. On the calling thread:
    /// a rename or a `mkdir` in the node's own directory costs less than a trip to the
    /// blocking pool.
    pub fn make_for_start(&self, id: &str) -> Result<PathBuf, String> {
        self.make(id)
            .map_err(|e| format!("cannot create {}: {e}", self.path(id).display()))
    }

    /// The deployment `id` is gone: its default working directory becomes a spare when it is
    /// empty (deleted when there are enough spares); one that holds files stays.
    pub fn release(&self, id: &str) {
        let path = self.path(id);
        if !is_empty(&path) {
            return;
        }
        let mut guard = self.spares();
        let spares = self.listed(&mut guard);
        if spares.len() >= MAX_SPARES {
            drop(guard);
            let _ = std::fs::remove_dir(&path);
            return;
        }
        let root = self.work_dir.join(SPARES);
        let spare = root.join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        let moved = rename_into(&path, &spare);
        match moved {
            Ok(()) => spares.push(spare),
            Err(_) => {
                drop(guard);
                let _ = std::fs::remove_dir(&path);
            }
        }
    }
}

/// Renames `from` to `to`, making `to`'s parent first when it is missing (tried after the
/// rename, which finds it there nearly always).
fn rename_into(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match to.parent() {
            Some(parent) if !parent.is_dir() => {
                std::fs::create_dir_all(parent)?;
                std::fs::rename(from, to)
            }
            _ => Err(e),
        },
        done => done,
    }
}

/// Whether `dir` is a directory with nothing in it.
fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_directory_is_used_again_one_with_files_stays_and_spares_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(dir.path());
        let a = dirs.make("a").unwrap();
        assert_eq!(a, dir.path().join("deployments").join("a"));
        assert!(a.is_dir());
        std::fs::write(a.join("keep"), "mine").unwrap();
        dirs.release("a");
        assert!(a.join("keep").exists(), "a directory with files stays");

        let b = dirs.make("b").unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o700)).unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let was = inode(&b);
        dirs.release("b");
        assert!(!b.exists());
        // A new agent finds the spare, and the next deployment gets it, as new.
        let dirs = WorkDirs::new(dir.path());
        let c = dirs.make("c").unwrap();
        assert_eq!(inode(&c), was, "the spare was renamed into place");
        let mode = std::fs::metadata(&c).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read_dir(&c).unwrap().count(), 0);

        // A spare written to after its release (a process that escaped its group's end) is
        // not given out.
        dirs.release("c");
        let spare = std::fs::read_dir(dir.path().join(SPARES))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(spare.join("stray"), "late").unwrap();
        let d = dirs.make("d").unwrap();
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "a new one, empty"
        );
        assert!(
            spare.join("stray").exists(),
            "the written one is left alone"
        );
        dirs.release("d");

        // At most MAX_SPARES are kept; the others are deleted.
        let ids: Vec<String> = (0..MAX_SPARES + 3).map(|i| format!("t{i}")).collect();
        for id in &ids {
            dirs.make(id).unwrap();
        }
        for id in &ids {
            dirs.release(id);
            assert!(!dirs.path(id).exists());
        }
        // The one left alone is not counted as a spare (it is on disk, never given out).
        let spares = std::fs::read_dir(dir.path().join(SPARES)).unwrap().count();
        assert_eq!(spares, MAX_SPARES + 1);
    }
}
