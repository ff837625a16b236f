//! Default working directories (`<work_dir>/deployments/<id>`), made for a start and, once
//! the deployment is removed and the directory is empty, kept where they are as spares for the
//! next one instead of deleted.
//!
//! A workflow task is a deployment of its own that lives for milliseconds. Making a directory
//! and deleting it again for each was the largest single cost of a task on a busy file system
//! (ext4 looks past every inode deleted recently to allocate a new one; `benches/dag.rs`): a
//! spare is renamed to the new deployment's name instead, which allocates nothing, in one
//! rename within one directory.
//!
//! Invariants:
//! - Only an empty spare is given out; one that holds files stays where it is and stops
//!   being a spare (they may be the user's, or written by a process that escaped its group's
//!   end and still has it as its working directory).
//! - At most [`MAX_SPARES`] spares are kept; beyond that an empty directory is deleted.
//! - A spare given out is renamed to the deployment's path (never over anything there)
//!   before anything runs there, with the mode a new directory would get; a deployment whose
//!   own directory is a spare gets it back, and it stops being one.
//! - An agent started with what it holds ([`WorkDirs::with_held`]) takes the empty directories
//!   of the deployments it does not hold as spares, and those a version before this one kept
//!   in `<work_dir>/spare-dirs`.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The most spares kept.
pub const MAX_SPARES: usize = 256;

/// The mode a working directory is made with (and a spare given out is set back to).
const DIR_MODE: u32 = 0o755;

/// Where an earlier version kept its spares (still given out).
const OLD_SPARES: &str = "spare-dirs";

/// See the module docs. Its methods are a few syscalls in the node's own directory (a read
/// of one empty directory, a rename, a `chmod` only when its mode changed; none for a
/// release), under one lock: the supervisor calls them on its workers, as it does the spawn.
#[derive(Debug)]
pub struct WorkDirs {
    work_dir: PathBuf,
    dirs: Mutex<Dirs>,
    /// The deployments held when the agent started; `None`: the directories found are not
    /// looked at (only the old spares are).
    held: Option<HashSet<String>>,
}

#[derive(Debug, Default)]
struct Dirs {
    /// Released (or found at the start), not given out since; `None` until first listed.
    spares: Option<Vec<PathBuf>>,
    /// Given out and not released since: only these become spares.
    made: HashSet<PathBuf>,
}

impl WorkDirs {
    /// The directories under `work_dir`; spares are only those a deployment leaves from now
    /// on (and an earlier version's).
    pub fn new(work_dir: &Path) -> Self {
        Self {
            work_dir: work_dir.to_path_buf(),
            dirs: Mutex::default(),
            held: None,
        }
    }

    /// [`WorkDirs::new`] for an agent that holds `held`: the empty directories of the others
    /// are spares too (found on first use).
    pub fn with_held(work_dir: &Path, held: HashSet<String>) -> Self {
        Self {
            held: Some(held),
            ..Self::new(work_dir)
        }
    }

    /// The default working directory of deployment `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.work_dir.join("deployments").join(id)
    }

    fn lock(&self) -> MutexGuard<'_, Dirs> {
        self.dirs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The spares, found on disk the first time.
    fn listed<'a>(&self, spares: &'a mut Option<Vec<PathBuf>>) -> &'a mut Vec<PathBuf> {
        spares.get_or_insert_with(|| {
            let dirs = |dir: PathBuf| {
                std::fs::read_dir(dir)
                    .map(|entries| {
                        entries
                            .filter_map(Result::ok)
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            };
            let mut found: Vec<PathBuf> = dirs(self.work_dir.join(OLD_SPARES))
                .iter()
                .map(std::fs::DirEntry::path)
                .collect();
            if let Some(held) = &self.held {
                found.extend(
                    dirs(self.work_dir.join("deployments"))
                        .iter()
                        .filter(|e| e.file_name().to_str().is_some_and(|n| !held.contains(n)))
                        .map(std::fs::DirEntry::path)
                        .filter(|p| empty_mode(p).is_some()),
                );
            }
            found.truncate(MAX_SPARES);
            found
        })
    }

    /// Makes the default working directory of `id` (a spare when there is one) and returns
    /// it; one that exists is kept as it is. Under the lock throughout: a spare checked empty
    /// is renamed before anyone else can take it or its name.
    pub fn make(&self, id: &str) -> io::Result<PathBuf> {
        let path = self.path(id);
        let mut guard = self.lock();
        let dirs = &mut *guard;
        // Its own, given out before (a restart): kept as it is, no spare looked at.
        if !(dirs.made.contains(&path) && path.is_dir()) {
            self.make_locked(&path, dirs)?;
            dirs.made.insert(path.clone());
        }
        Ok(path)
    }

    fn make_locked(&self, path: &Path, dirs: &mut Dirs) -> io::Result<()> {
        let spares = self.listed(&mut dirs.spares);
        // One that is not empty (it held files when it was released, or a process that escaped
        // its group's end still had it as its working directory and wrote there) is left
        // where it is, and no longer a spare.
        let spare = loop {
            match spares.pop() {
                Some(s) => {
                    if let Some(mode) = empty_mode(&s) {
                        break Some((s, mode));
                    }
                }
                None => break None,
            }
        };
        if let Some((spare, mode)) = spare {
            match rename_new(&spare, path) {
                // As made new (the last user may have changed it).
                Ok(()) if mode != DIR_MODE => {
                    return std::fs::set_permissions(
                        path,
                        std::fs::Permissions::from_mode(DIR_MODE),
                    );
                }
                Ok(()) => return Ok(()),
                // Ours is there already (a spare too, maybe this very one).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    spares.push(spare);
                    return existing(path, spares);
                }
                // Gone (someone removed it), or no `deployments` yet: a new one instead.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if spare.is_dir() {
                        spares.push(spare);
                    }
                }
                // Still there: kept for later.
                Err(_) => spares.push(spare),
            }
        }
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => existing(path, spares),
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(path),
            made => made,
        }
    }

    /// [`WorkDirs::make`], with the error as a start failure says it. On the calling thread:
    /// a rename or a `mkdir` in the node's own directory costs less than a trip to the
    /// blocking pool.
    pub fn make_for_start(&self, id: &str) -> Result<PathBuf, String> {
        self.make(id)
            .map_err(|e| format!("cannot create {}: {e}", self.path(id).display()))
    }

    /// The deployment `id` is gone: the default working directory given to it is a spare,
    /// where it is (deleted instead when there are enough spares and it is empty). One never
    /// given out (a git checkout runs elsewhere; a deployment that never started) is not.
    /// No syscall: whether it is empty (one that holds files stays, and is never given out)
    /// and still there is looked at when it would be given out.
    pub fn release(&self, id: &str) {
        let path = self.path(id);
        let mut guard = self.lock();
        let dirs = &mut *guard;
        if !dirs.made.remove(&path) {
            return;
        }
        let spares = self.listed(&mut dirs.spares);
        if spares.len() >= MAX_SPARES {
            drop(guard);
            // Fails, as it should, when it holds files.
            let _ = std::fs::remove_dir(&path);
            return;
        }
        spares.push(path);
    }
}

/// `path` is there already: kept as it is, and no longer a spare if it was one.
fn existing(path: &Path, spares: &mut Vec<PathBuf>) -> io::Result<()> {
    if !path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        ));
    }
    spares.retain(|s| s != path);
    Ok(())
}

/// Renames `from` to `to`, which must not exist (`AlreadyExists` if it does, whatever it is).
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)
}

/// The permission bits of `dir` when it is a directory (not a link to one) with nothing in it.
fn empty_mode(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .ok()?;
    let mode = opened.metadata().ok()?.permissions().mode() & 0o7777;
    let mut entries = nix::dir::Dir::from_fd(opened.into()).ok()?;
    let empty = entries
        .iter()
        .all(|e| e.is_ok_and(|e| matches!(e.file_name().to_bytes(), b"." | b"..")));
    empty.then_some(mode)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn inode(p: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
    }

    fn entries(p: &Path) -> usize {
        std::fs::read_dir(p).unwrap().count()
    }

    #[test]
    fn an_empty_directory_is_used_again_in_place_and_one_with_files_stays() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(dir.path());
        let a = dirs.make("a").unwrap();
        assert_eq!(a, dir.path().join("deployments").join("a"));
        assert!(a.is_dir());
        std::fs::write(a.join("keep"), "mine").unwrap();
        dirs.release("a");
        assert!(a.join("keep").exists(), "a directory with files stays");

        // An empty one is the next deployment's, renamed, with the mode of a new one.
        let b = dirs.make("b").unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o700)).unwrap();
        let was = inode(&b);
        dirs.release("b");
        assert!(b.is_dir(), "a spare stays where it is");
        let c = dirs.make("c").unwrap();
        assert_eq!(inode(&c), was, "the spare was renamed into place");
        assert!(!b.exists());
        let mode = std::fs::metadata(&c).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(entries(&c), 0);
        assert!(
            a.join("keep").exists(),
            "the one with files was never given out"
        );

        // A deployment whose own directory is a spare gets it back, and it is no longer one.
        dirs.release("c");
        assert_eq!(inode(&dirs.make("c").unwrap()), was);
        let d = dirs.make("d").unwrap();
        assert_ne!(inode(&d), was, "a new one: c's is c's again");
        assert!(c.is_dir());

        // A spare written to after its release (a process that escaped its group's end) is
        // not given out.
        dirs.release("d");
        std::fs::write(d.join("stray"), "late").unwrap();
        let e = dirs.make("e").unwrap();
        assert_eq!(entries(&e), 0, "a new one, empty");
        assert!(d.join("stray").exists(), "the written one is left alone");

        // One its process replaced with a link to an empty directory elsewhere is not given
        // out (nor is the directory it points to renamed or changed).
        dirs.release("e");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::remove_dir(&e).unwrap();
        std::os::unix::fs::symlink(&outside, &e).unwrap();
        let f = dirs.make("f").unwrap();
        assert!(!f.is_symlink() && f.is_dir(), "a new one");
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(e.is_symlink());
    }

    #[test]
    fn a_new_agent_takes_the_empty_directories_of_what_it_does_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let first = WorkDirs::new(dir.path());
        let held = first.make("held").unwrap();
        let gone = first.make("gone").unwrap();
        first.release("gone");
        // As an earlier version kept its spares.
        let old = dir.path().join(OLD_SPARES).join("7");
        std::fs::create_dir_all(&old).unwrap();
        let (held_ino, gone_ino, old_ino) = (inode(&held), inode(&gone), inode(&old));

        // Without what it holds, a new agent takes only the old spares.
        let plain = WorkDirs::new(dir.path());
        let x = plain.make("x").unwrap();
        assert_eq!(inode(&x), old_ino);
        assert!(gone.is_dir() && held.is_dir());

        // With it: the empty directory of one it does not hold, never a held one's.
        let held_now = HashSet::from(["held".to_owned(), "x".to_owned()]);
        let agent = WorkDirs::with_held(dir.path(), held_now);
        assert_eq!(inode(&agent.make("z").unwrap()), gone_ino);
        let w = inode(&agent.make("w").unwrap());
        assert!(![held_ino, gone_ino, old_ino].contains(&w), "a new one");
        assert_eq!(inode(&agent.make("held").unwrap()), held_ino);
        assert_eq!(inode(&agent.make("x").unwrap()), old_ino);
    }

    #[test]
    fn only_a_directory_given_out_becomes_a_spare_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(dir.path());
        let s = dirs.make("s").unwrap();
        let s_ino = inode(&s);
        // Never given out (a git checkout, a deployment that never started): no spare.
        dirs.release("x");
        dirs.release("s");
        // Released twice: still one spare.
        dirs.release("s");
        let x = dirs.make("x").unwrap();
        assert_eq!(inode(&x), s_ino);
        let y = dirs.make("y").unwrap();
        assert_ne!(inode(&y), s_ino, "x's directory went to y while x runs");
        assert!(x.is_dir());
        let z = dirs.make("z").unwrap();
        assert!(![inode(&x), inode(&y)].contains(&inode(&z)));
    }

    #[test]
    fn spares_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(dir.path());
        let ids: Vec<String> = (0..MAX_SPARES + 3).map(|i| format!("t{i}")).collect();
        for id in &ids {
            dirs.make(id).unwrap();
        }
        for id in &ids {
            dirs.release(id);
        }
        // At most MAX_SPARES are kept (in place); the others are deleted.
        assert_eq!(entries(&dir.path().join("deployments")), MAX_SPARES);
        // And each is given out once.
        let again: HashSet<u64> = (0..MAX_SPARES)
            .map(|i| inode(&dirs.make(&format!("n{i}")).unwrap()))
            .collect();
        assert_eq!(again.len(), MAX_SPARES);
        assert_eq!(entries(&dir.path().join("deployments")), MAX_SPARES);
    }
}
