//! The node's local state (postcard, in its work dir): which deployments it holds, at which
//! generation, with which spec, so a restarted agent comes back knowing what it ran and tells
//! the conductor in its Hello. Written atomically (temp file + rename).

use std::path::PathBuf;

use crate::model::{DeploymentId, Generation};
use crate::spec::DeploymentSpec;

/// One held deployment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub id: DeploymentId,
    pub generation: Generation,
    pub desired_running: bool,
    pub spec: DeploymentSpec,
    /// Added to the supervisor's log sequence numbers on the wire (see `Assign.log_seq_floor`).
    pub log_offset: u64,
}

#[derive(Debug, serde::Deserialize)]
struct File {
    /// Always 2 so far (an older layout fails to decode and the node starts empty).
    _version: u32,
    held: Vec<Held>,
}

/// [`File`] as written: the same encoding, borrowing what it saves.
#[derive(serde::Serialize)]
struct FileRef<'a> {
    version: u32,
    held: &'a [Held],
}

/// Where the node keeps what it holds. [`LocalState`] is the real one; tests put a slow or
/// failing one in its place. Called off the async runtime (it may block on the disk).
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the held deployments; nothing stored is an empty list.
    fn load(&self) -> std::io::Result<Vec<Held>>;
    /// Replaces the held deployments.
    fn save(&self, held: &[Held]) -> std::io::Result<()>;
}

impl StateStore for LocalState {
    fn load(&self) -> std::io::Result<Vec<Held>> {
        LocalState::load(self)
    }

    fn save(&self, held: &[Held]) -> std::io::Result<()> {
        LocalState::save(self, held)
    }
}

/// The state file.
#[derive(Debug, Clone)]
pub struct LocalState {
    path: PathBuf,
}

impl LocalState {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Reads the held deployments; a missing file is an empty list.
    pub fn load(&self) -> std::io::Result<Vec<Held>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => match postcard::from_bytes::<File>(&bytes) {
                Ok(f) => Ok(f.held),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "unreadable local state; starting empty");
                    Ok(Vec::new())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the held deployments.
    pub fn save(&self, held: &[Held]) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(&FileRef { version: 2, held })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Specs hold secrets (git tokens): owner-only, like key files.
        write_private(&self.path, &bytes, true)
    }
}

/// Writes `bytes` to `path` atomically (a temp file beside it, then a rename), readable by the
/// owner only; `durable` also waits for the disk (fsync) before the rename.
pub fn write_private(path: &std::path::Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let st = LocalState::new(dir.path().join("state.bin"));
        assert!(st.load().unwrap().is_empty());
        let held = vec![Held {
            id: "abc".into(),
            generation: Generation(7),
            desired_running: true,
            spec: DeploymentSpec::defaults_for(vec!["sleep".into(), "1".into()]),
            log_offset: 42,
        }];
        st.save(&held).unwrap();
        assert_eq!(st.load().unwrap(), held);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
