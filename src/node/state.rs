//! The node's local state (postcard, in its work dir): which deployments it holds, at which
//! generation, with which spec, so a restarted agent comes back knowing what it ran and tells
//! the conductor in its Hello. Two files (see [`LocalState`]), each written atomically (temp
//! file + rename), 0600, with every git token sealed with the node's key
//! (`<work_dir>/secrets.key`, see [`crate::seal`]).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::{DeploymentId, Generation};
use crate::seal::SealKey;
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

/// The layout version written now. Version 2 (before `outlive_agent`) is still read; older
/// layouts fail to decode and the node starts empty.
const VERSION: u32 = 3;

#[derive(Debug, serde::Deserialize)]
struct File<H> {
    _version: u32,
    held: Vec<H>,
}

/// A held deployment as version 2 wrote it: its spec without `outlive_agent` (postcard is not
/// self-describing, so the old layout is spelled out).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HeldV2 {
    id: DeploymentId,
    generation: Generation,
    desired_running: bool,
    spec: SpecV2,
    log_offset: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SpecV2 {
    capacity_requests: std::collections::BTreeMap<String, i64>,
    node_group: Option<String>,
    command: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
    env_name: Option<String>,
    git: Option<crate::spec::GitSource>,
    restart_policy: crate::spec::RestartPolicy,
    max_restarts: u32,
    restart_window: std::time::Duration,
    log_limit_lines: usize,
    stop_signal: i32,
    stop_timeout: std::time::Duration,
    health_check: Option<crate::spec::HealthCheck>,
    auto_restart: Option<crate::spec::AutoRestart>,
}

impl From<HeldV2> for Held {
    fn from(h: HeldV2) -> Self {
        let s = h.spec;
        Self {
            id: h.id,
            generation: h.generation,
            desired_running: h.desired_running,
            spec: DeploymentSpec {
                capacity_requests: s.capacity_requests,
                node_group: s.node_group,
                command: s.command,
                env: s.env,
                env_name: s.env_name,
                git: s.git,
                restart_policy: s.restart_policy,
                max_restarts: s.max_restarts,
                restart_window: s.restart_window,
                log_limit_lines: s.log_limit_lines,
                stop_signal: s.stop_signal,
                stop_timeout: s.stop_timeout,
                health_check: s.health_check,
                auto_restart: s.auto_restart,
                // What every process ran with then.
                outlive_agent: true,
            },
            log_offset: h.log_offset,
        }
    }
}

/// Decodes a state file of the current layout or of version 2.
fn decode(bytes: &[u8]) -> postcard::Result<Vec<Held>> {
    match postcard::take_from_bytes::<u32>(bytes)?.0 {
        2 => Ok(postcard::from_bytes::<File<HeldV2>>(bytes)?
            .held
            .into_iter()
            .map(Held::from)
            .collect()),
        _ => Ok(postcard::from_bytes::<File<Held>>(bytes)?.held),
    }
}

/// [`File`] as written: the same encoding, borrowing what it saves.
#[derive(serde::Serialize)]
struct FileRef<'a> {
    version: u32,
    held: &'a [Arc<Held>],
}

/// Where the node keeps what it holds. [`LocalState`] is the real one; tests put a slow or
/// failing one in its place. Called off the async runtime (it may block on the disk).
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the held deployments; nothing stored is an empty list.
    fn load(&self) -> std::io::Result<Vec<Held>>;
    /// Replaces the held deployments.
    fn save(&self, held: &[Arc<Held>]) -> std::io::Result<()>;
    /// Where it writes, for messages (a path).
    fn describe(&self) -> String;
}

impl StateStore for LocalState {
    fn load(&self) -> std::io::Result<Vec<Held>> {
        LocalState::load(self)
    }

    fn save(&self, held: &[Arc<Held>]) -> std::io::Result<()> {
        LocalState::save(self, held).map(drop)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// The state files: `state.bin` for the deployments whose processes outlive the agent, written
/// durably (fsync, then a rename) and only when what it says of them changed; and, beside it,
/// `state.attached.bin` for the others, written at every change without waiting for the disk.
/// Those others' processes end with the agent, and with the machine: after a power loss, a
/// file that still names one, no longer does, or cannot be read at all (its rename reached the
/// disk before its data) tells the next agent the same thing (nothing of theirs runs any
/// more), and their ledger is not synced either. A deployment in both (it moved from one to
/// the other) is taken at its higher generation.
#[derive(Debug, Clone)]
pub struct LocalState {
    path: PathBuf,
    attached: PathBuf,
    /// Seals the git tokens of the specs held.
    key: SealKey,
    /// The deployments outliving the agent as the last synced write had them.
    synced: Arc<std::sync::Mutex<Option<Vec<Arc<Held>>>>>,
}

impl LocalState {
    pub fn new(path: PathBuf, key: SealKey) -> Self {
        Self {
            attached: path.with_extension("attached.bin"),
            path,
            key,
            synced: Arc::default(),
        }
    }

    /// Reads the held deployments; missing files are an empty list. A deployment whose token
    /// does not open (another key sealed it) is left out, with a warning: the conductor then
    /// sends it again, token and all, and the process a previous agent left for it is stopped.
    pub fn load(&self) -> std::io::Result<Vec<Held>> {
        let mut held = self.read(&self.path)?;
        for h in self.read(&self.attached)? {
            match held.iter_mut().find(|x| x.id == h.id) {
                Some(x) if x.generation < h.generation => *x = h,
                Some(_) => {}
                None => held.push(h),
            }
        }
        Ok(held)
    }

    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<Held>> {
        match std::fs::read(path) {
            Ok(bytes) => match decode(&bytes) {
                Ok(held) => Ok(held
                    .into_iter()
                    .filter_map(|mut h| match open_token(&self.key, &mut h.spec) {
                        Ok(()) => Some(h),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), deployment = %h.id, error = %e, "a held deployment's git token does not open; it is left out of the local state");
                            None
                        }
                    })
                    .collect()),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable local state; what it held is forgotten");
                    Ok(Vec::new())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the held deployments; says whether it waited for the disk (see the type).
    pub fn save(&self, held: &[Arc<Held>]) -> std::io::Result<bool> {
        let (lasting, attached): (Vec<Arc<Held>>, Vec<Arc<Held>>) =
            held.iter().cloned().partition(|h| h.spec.outlive_agent);
        let mut synced = self
            .synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let durable = synced.as_ref().is_none_or(|s| {
            s.len() != lasting.len()
                || s.iter()
                    .zip(&lasting)
                    .any(|(a, b)| !Arc::ptr_eq(a, b) && a != b)
        });
        // The durable one first: a deployment moving to it is in both until the other is
        // written (the higher generation is taken), one leaving it is in neither for a moment
        // (its process ends with the agent: nothing is lost).
        if durable {
            self.write(&self.path, &lasting, true)?;
            *synced = Some(lasting);
        }
        self.write(&self.attached, &attached, false)?;
        Ok(durable)
    }

    fn write(
        &self,
        path: &std::path::Path,
        held: &[Arc<Held>],
        durable: bool,
    ) -> std::io::Result<()> {
        let held: Cow<'_, [Arc<Held>]> = if held.iter().any(|h| token(&h.spec).is_some()) {
            let mut sealed = held.to_vec();
            for h in &mut sealed {
                if let Some(git) = &mut Arc::make_mut(h).spec.git {
                    self.key
                        .seal_option(&mut git.token)
                        .map_err(std::io::Error::other)?;
                }
            }
            Cow::Owned(sealed)
        } else {
            Cow::Borrowed(held)
        };
        let bytes = postcard::to_allocvec(&FileRef {
            version: VERSION,
            held: &held,
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Specs hold secrets (git tokens, sealed): owner-only, like key files.
        write_private(path, &bytes, durable)
    }
}

fn token(spec: &DeploymentSpec) -> Option<&str> {
    spec.git.as_ref()?.token.as_deref()
}

/// Opens the git token of `spec` in place (a plaintext one, from an older version, is kept).
pub(crate) fn open_token(
    key: &SealKey,
    spec: &mut DeploymentSpec,
) -> Result<(), crate::seal::SealError> {
    match &mut spec.git {
        Some(git) => key.open_option(&mut git.token),
        None => Ok(()),
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

    pub(super) fn arcs(held: &[Held]) -> Vec<Arc<Held>> {
        held.iter().cloned().map(Arc::new).collect()
    }

    fn key(dir: &std::path::Path) -> SealKey {
        SealKey::load_or_create(&dir.join(crate::seal::KEY_FILE)).unwrap()
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let st = LocalState::new(dir.path().join("state.bin"), key(dir.path()));
        assert!(st.load().unwrap().is_empty());
        let held = vec![Held {
            id: "abc".into(),
            generation: Generation(7),
            desired_running: true,
            spec: DeploymentSpec::defaults_for(vec!["sleep".into(), "1".into()]),
            log_offset: 42,
        }];
        st.save(&arcs(&held)).unwrap();
        assert_eq!(st.load().unwrap(), held);
        let mut other = held[0].clone();
        other.spec.outlive_agent = false;
        st.save(&arcs(std::slice::from_ref(&other))).unwrap();
        assert_eq!(st.load().unwrap(), vec![other]);
        st.save(&arcs(&held)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A deployment running `true` at `generation`, outliving the agent or not.
    fn held_as(id: &str, outlive: bool, generation: u64) -> Held {
        let mut spec = DeploymentSpec::defaults_for(vec!["true".into()]);
        spec.outlive_agent = outlive;
        Held {
            id: id.into(),
            generation: Generation(generation),
            desired_running: true,
            spec,
            log_offset: 0,
        }
    }

    #[test]
    fn only_a_change_to_what_outlives_the_agent_waits_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let st = LocalState::new(dir.path().join("state.bin"), key(dir.path()));
        let held = |id: &str, outlive: bool, log_offset: u64| Held {
            log_offset,
            ..held_as(id, outlive, 1)
        };
        let task = held("task", false, 0);
        let service = held("service", true, 0);
        // The first write since the start, whatever it holds.
        assert!(st.save(&arcs(&[])).unwrap());
        // A task comes and goes: nothing that outlives the agent changed.
        assert!(!st.save(&arcs(std::slice::from_ref(&task))).unwrap());
        assert_eq!(st.load().unwrap(), vec![task.clone()]);
        // A service comes, then changes: each is synced.
        assert!(st.save(&arcs(&[task.clone(), service.clone()])).unwrap());
        assert!(
            !st.save(&arcs(&[task.clone(), service.clone()])).unwrap(),
            "the same again"
        );
        let moved = held("service", true, 9);
        assert!(st.save(&arcs(&[task, moved.clone()])).unwrap());
        assert!(!st.save(&arcs(std::slice::from_ref(&moved))).unwrap());
        assert_eq!(st.load().unwrap(), vec![moved]);
        assert!(st.save(&arcs(&[])).unwrap(), "the service went");
        // Another writer for the same file starts over: its first write is synced.
        let again = LocalState::new(dir.path().join("state.bin"), key(dir.path()));
        assert!(again.save(&arcs(&[])).unwrap());
    }

    #[test]
    fn a_torn_attached_file_loses_only_what_ends_with_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let st = LocalState::new(dir.path().join("state.bin"), key(dir.path()));
        let held = held_as;
        // A task at generation 1, then its next generation outlives the agent: in both files
        // until the attached one is written again, the higher generation counts.
        st.save(&arcs(&[held("svc", true, 1), held("x", false, 1)]))
            .unwrap();
        let both = LocalState::new(dir.path().join("state.bin"), key(dir.path()));
        both.write(
            &both.path,
            &arcs(&[held("svc", true, 1), held("x", true, 2)]),
            true,
        )
        .unwrap();
        assert_eq!(
            both.load().unwrap(),
            vec![held("svc", true, 1), held("x", true, 2)]
        );
        // The attached file's rename reached the disk before its data: what outlives the
        // agent is still known.
        std::fs::write(dir.path().join("state.attached.bin"), [0xff; 3]).unwrap();
        assert_eq!(
            st.load().unwrap(),
            vec![held("svc", true, 1), held("x", true, 2)]
        );
        std::fs::write(dir.path().join("state.attached.bin"), b"").unwrap();
        assert_eq!(st.load().unwrap().len(), 2);
    }

    #[test]
    fn a_version_2_file_loads_with_processes_that_outlive_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let spec = DeploymentSpec::defaults_for(vec!["sleep".into(), "1".into()]);
        let v2 = HeldV2 {
            id: "old".into(),
            generation: Generation(3),
            desired_running: true,
            spec: SpecV2 {
                capacity_requests: spec.capacity_requests.clone(),
                node_group: None,
                command: spec.command.clone(),
                env: spec.env.clone(),
                env_name: None,
                git: None,
                restart_policy: spec.restart_policy.clone(),
                max_restarts: spec.max_restarts,
                restart_window: spec.restart_window,
                log_limit_lines: spec.log_limit_lines,
                stop_signal: spec.stop_signal,
                stop_timeout: spec.stop_timeout,
                health_check: None,
                auto_restart: None,
            },
            log_offset: 5,
        };
        let bytes = postcard::to_allocvec(&(2u32, vec![v2])).unwrap();
        write_private(&path, &bytes, false).unwrap();
        let st = LocalState::new(path, key(dir.path()));
        let held = st.load().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].id.as_str(), "old");
        assert_eq!(held[0].log_offset, 5);
        assert_eq!(held[0].spec, spec);
        assert!(held[0].spec.outlive_agent);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod sealed_tests {
    use super::tests::arcs;
    use super::*;
    use crate::spec::GitSource;

    fn held(id: &str, token: Option<&str>) -> Held {
        let mut spec = DeploymentSpec::defaults_for(vec!["sleep".into(), "1".into()]);
        spec.git = Some(GitSource {
            repo: "https://example.invalid/r.git".into(),
            git_ref: None,
            token: token.map(str::to_owned),
        });
        Held {
            id: id.into(),
            generation: Generation(1),
            desired_running: true,
            spec,
            log_offset: 0,
        }
    }

    #[test]
    fn tokens_are_sealed_in_the_file_and_opened_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let key = SealKey::load_or_create(&dir.path().join(crate::seal::KEY_FILE)).unwrap();
        let st = LocalState::new(path.clone(), key.clone());
        let held = vec![held("a", Some("tok-NODE-STATE-7")), held("b", None)];
        st.save(&arcs(&held)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let needle = b"tok-NODE-STATE-7";
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        assert!(
            bytes
                .windows(crate::seal::PREFIX.len())
                .any(|w| w == crate::seal::PREFIX.as_bytes())
        );
        // A reload (a restarted agent, the same key file) gets the token back.
        let again = LocalState::new(
            path.clone(),
            SealKey::load_or_create(&dir.path().join(crate::seal::KEY_FILE)).unwrap(),
        );
        assert_eq!(again.load().unwrap(), held);
        // With another key, the deployment whose token does not open is left out; the rest
        // loads.
        let other = LocalState::new(path, SealKey::generate().unwrap());
        assert_eq!(other.load().unwrap(), vec![held[1].clone()]);
    }

    #[test]
    fn a_state_file_with_tokens_in_clear_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let held = vec![held("a", Some("tok-OLD"))];
        // As an older version wrote it.
        let bytes = postcard::to_allocvec(&FileRef {
            version: VERSION,
            held: &arcs(&held),
        })
        .unwrap();
        write_private(&path, &bytes, false).unwrap();
        let st = LocalState::new(path, SealKey::generate().unwrap());
        assert_eq!(st.load().unwrap(), held);
    }
}
