//! The node's process table: one actor task per deployment, driven by the desired state the
//! agent applies, reporting every state change as an event.
//!
//! Who calls it: the agent (apply/remove/status/logs/snapshot/shutdown). The supervisor knows
//! nothing about the network: processes keep running while the conductor is unreachable.
//!
//! Invariants:
//! - The supervisor is the only owner of process state; each deployment's actor is the only
//!   code that starts or stops that deployment's processes.
//! - Generations never go back: an `apply` with an older generation than the one held is
//!   ignored. Equal or newer generations update the desired state; only a spec change (or a
//!   newer generation for a FAILED deployment) restarts the process.
//! - Every state change is published as an event (edge hint) and in [`Supervisor::status`]
//!   (level truth). Events are sent with `try_send`: a full channel drops the event (counted),
//!   never blocks an actor; `status()` stays exact.
//! - Failed prepares and spawns are retried with backoff against the same restart budget as
//!   crashes and health-check failures (the original never retried them, B14).

mod actor;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::keeper::Record;
use super::logs::{DEFAULT_MAX_LINE, DEFAULT_SPOOL_BYTES, LogBuffer, LogStream, SpoolWriter};
use super::runner::{self, Launcher};
use super::workdirs::WorkDirs;
use crate::seal::SealKey;
use crate::spec::{AutoRestart, DeploymentSpec};

/// Capacity of the event channel.
pub const EVENT_CAPACITY: usize = 1024;

/// Runtime state of a deployment on this node: the API's own state type. The supervisor
/// sets only `STARTING` .. `FAILED` (never `PENDING` or `UNKNOWN`, which the conductor uses).
pub use crate::model::CurrentState;

/// What the node reports about one deployment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentStatus {
    /// Deployment id.
    pub id: String,
    /// Generation of the desired state this status belongs to.
    pub generation: u64,
    /// Current state.
    pub state: CurrentState,
    /// Pid of the running process (also its process group id).
    pub pid: Option<u32>,
    /// Automatic restarts (crash, health check, failed prepare/spawn) since the last fresh
    /// start (a spec change or a start from STOPPED/FAILED resets it). Cron restarts excluded.
    pub restart_count: u32,
    /// Exit code of the last process (negative = signal number).
    pub last_exit_code: Option<i32>,
    /// Why the deployment is in its state (exit reason, prepare error, give-up reason).
    pub reason: Option<String>,
    /// When the current or last process started (ms since the Unix epoch).
    pub started_at_ms: Option<i64>,
    /// When the last process ended (ms since the Unix epoch).
    pub stopped_at_ms: Option<i64>,
    /// Sequence number of the last log entry.
    pub last_log_seq: u64,
    /// Times a health check found the process unhealthy (since this actor started).
    pub health_failures: u32,
    /// The health check's last verdict (`None`: no check, or no probe yet); `Some(false)`
    /// stays until a probe of a later process passes.
    pub healthy: Option<bool>,
    /// Scheduled (cron) restarts done (since this actor started).
    pub cron_restarts: u32,
    /// In BACKOFF: when the next start is due (ms since the Unix epoch).
    pub restart_at_ms: Option<i64>,
    /// After an exit: what the process wrote to `$SYMPHONY_OUTPUT` (JSON text, at most
    /// [`crate::spec::MAX_RESULT_BYTES`]), or why it could not be taken.
    #[serde(default)]
    pub result: Option<Result<String, String>>,
}

/// Result of a successful prepare: where and what to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prepared {
    /// Working directory.
    pub cwd: PathBuf,
    /// The command to run (e.g. the spec's command wrapped by an environment manager).
    pub command: Vec<String>,
    /// Extra environment, over the node's and under the spec's.
    pub extra_env: BTreeMap<String, String>,
}

/// Runs before every spawn (workspace checkout, environment setup). An `Err` is logged on the
/// `system` stream and retried with backoff, charged to the restart budget.
pub trait Prepare: Send + Sync {
    /// Prepares deployment `id` for a start of `spec`; may log progress to `logs`.
    fn prepare<'a>(
        &'a self,
        id: &'a str,
        spec: &'a DeploymentSpec,
        logs: &'a LogBuffer,
    ) -> BoxFuture<'a, Result<Prepared, String>>;

    /// Deployment `id` was removed: what [`Prepare::prepare`] made for it may go. Runs on the
    /// calling worker: a few syscalls in the node's own directory at most, nothing that waits.
    fn release(&self, _id: &str) {}
}

/// The default prepare: cwd `work_dir/deployments/<id>` (made, see [`WorkDirs`]), command
/// unchanged.
#[derive(Debug, Clone)]
pub struct DefaultPrepare {
    dirs: Arc<WorkDirs>,
}

impl DefaultPrepare {
    /// Working directories under the node's work directory.
    pub fn new(work_dir: &std::path::Path) -> Self {
        Self {
            dirs: Arc::new(WorkDirs::new(work_dir)),
        }
    }
}

impl Prepare for DefaultPrepare {
    fn prepare<'a>(
        &'a self,
        id: &'a str,
        spec: &'a DeploymentSpec,
        _logs: &'a LogBuffer,
    ) -> BoxFuture<'a, Result<Prepared, String>> {
        Box::pin(async move {
            let cwd = self.dirs.make_for_start(id)?;
            Ok(Prepared {
                cwd,
                command: spec.command.clone(),
                extra_env: BTreeMap::new(),
            })
        })
    }

    fn release(&self, id: &str) {
        self.dirs.release(id);
    }
}

/// "Next fire time strictly after `now`", for one cron schedule.
pub type NextFire = Arc<dyn Fn(DateTime<Utc>) -> Option<DateTime<Utc>> + Send + Sync>;

/// Compiles a spec's `auto_restart` into a [`NextFire`], or says why it cannot (the integrator
/// wires this to `spec::cron_schedule` and `spec::next_fire`).
pub type CronPlanner = Arc<dyn Fn(&AutoRestart) -> Result<NextFire, String> + Send + Sync>;

/// Plain settings of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// Root of the node's files: `deployments/<id>` (default cwd), `logs/<id>` (spools).
    pub work_dir: PathBuf,
    /// The node's environment; every process gets it, overridden by prepare and spec env.
    pub node_env: BTreeMap<String, String>,
    /// Longest captured log line in bytes (longer lines are split).
    pub max_line_bytes: usize,
    /// Byte cap of each deployment's log spool, and of its keeper's outbox.
    pub spool_bytes: u64,
    /// How keepers are started.
    pub launcher: Launcher,
    /// Seals the git token in each keeper's record (`keeper.json`).
    pub secrets: SealKey,
}

impl SupervisorConfig {
    /// Settings with default line and spool limits; keepers run this binary (in unit tests:
    /// threads).
    pub fn new(work_dir: PathBuf, node_env: BTreeMap<String, String>, secrets: SealKey) -> Self {
        Self {
            work_dir,
            node_env,
            secrets,
            max_line_bytes: DEFAULT_MAX_LINE,
            spool_bytes: DEFAULT_SPOOL_BYTES,
            #[cfg(not(test))]
            launcher: Launcher::current_exe(),
            #[cfg(test)]
            launcher: Launcher::Thread,
        }
    }

    /// The run directory of a deployment's process (see [`super::keeper`]).
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.work_dir.join("run").join(id)
    }

    /// Where a process of deployment `id` may leave its result (`$SYMPHONY_OUTPUT`).
    pub fn output_file(&self, id: &str) -> PathBuf {
        self.work_dir.join("outputs").join(format!("{id}.json"))
    }
}

/// A process a previous agent started, found in its run directory, not adopted yet.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    dir: PathBuf,
    record: Record,
}

/// Pluggable behaviour: prepare hook and cron support.
#[derive(Clone)]
pub struct Hooks {
    /// Called before every spawn.
    pub prepare: Arc<dyn Prepare>,
    /// Cron support for `auto_restart`; `None` disables scheduled restarts (logged).
    pub cron: Option<CronPlanner>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("cron", &self.cron.is_some())
            .finish_non_exhaustive()
    }
}

/// What `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A new deployment was created.
    Created,
    /// The desired state changed.
    Updated,
    /// Same generation, desired state and spec as held: nothing to do.
    Unchanged,
    /// Older than the generation held: ignored.
    Stale {
        /// The generation held.
        held: u64,
    },
}

/// Errors of supervisor commands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// The id cannot name a directory safely.
    #[error("invalid deployment id {0:?}")]
    InvalidId(String),
    /// The supervisor is shutting down or shut down.
    #[error("supervisor is shut down")]
    ShutDown,
}

/// The desired state of one deployment as last applied.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    generation: u64,
    running: bool,
    spec: DeploymentSpec,
}

struct Slot {
    desired: watch::Sender<Desired>,
    /// Written only by the deployment's actor, read by `status()`: the level truth behind the
    /// events (which may be dropped). Not the node core's: it is the process's runtime state,
    /// and a lock held for a copy never waits on IO.
    status: Arc<Mutex<DeploymentStatus>>,
    logs: LogBuffer,
    cancel: CancellationToken,
    done: oneshot::Receiver<()>,
}

/// What every actor shares.
struct Shared {
    config: SupervisorConfig,
    hooks: Hooks,
    events: mpsc::Sender<DeploymentStatus>,
    dropped_events: AtomicU64,
    /// The log IO thread every deployment's spool is written on.
    spool_io: SpoolWriter,
    /// Processes found by [`Supervisor::recover`], each waiting for its deployment's actor
    /// (which adopts it) or for its removal (which stops it).
    orphans: Mutex<BTreeMap<String, Orphan>>,
    /// Set before an upgrade's shutdown: actors leave their processes to the keepers.
    detach: std::sync::atomic::AtomicBool,
    /// The processes run without a keeper (`outlive_agent: false`).
    ledger: Arc<runner::ledger::Ledger>,
}

impl Shared {
    fn emit(&self, status: DeploymentStatus) {
        if self.events.try_send(status).is_err() {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Table {
    slots: BTreeMap<String, Slot>,
    tasks: JoinSet<()>,
    shut_down: bool,
}

/// The process table of this node. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
    /// The slots by id. Held only to look up, insert or take out a slot (never across an
    /// await); the node core decides what to apply and remove, the table only records which
    /// actors exist, so the driver and background stops can reach them.
    table: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ids become directory names: no separators, no dot names, not empty, printable.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Supervisor {
    /// A supervisor with the default prepare and no cron support.
    pub fn new(config: SupervisorConfig) -> (Self, mpsc::Receiver<DeploymentStatus>) {
        let hooks = Hooks {
            prepare: Arc::new(DefaultPrepare::new(&config.work_dir)),
            cron: None,
        };
        Self::with_hooks(config, hooks)
    }

    /// A supervisor with the given hooks. Returns the receiver of state-change events.
    pub fn with_hooks(
        config: SupervisorConfig,
        hooks: Hooks,
    ) -> (Self, mpsc::Receiver<DeploymentStatus>) {
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let ledger = Arc::new(runner::ledger::Ledger::new(&config.work_dir));
        let shared = Arc::new(Shared {
            ledger,
            config,
            hooks,
            events: tx,
            dropped_events: AtomicU64::new(0),
            spool_io: SpoolWriter::new(),
            orphans: Mutex::new(BTreeMap::new()),
            detach: std::sync::atomic::AtomicBool::new(false),
        });
        let table = Table {
            slots: BTreeMap::new(),
            tasks: JoinSet::new(),
            shut_down: false,
        };
        let sup = Self {
            shared,
            table: Arc::new(Mutex::new(table)),
        };
        (sup, rx)
    }

    /// Sets the desired state of a deployment (see the module invariants for generations).
    /// Must be called inside a tokio runtime (it may start the deployment's actor).
    pub fn apply(
        &self,
        id: &str,
        generation: u64,
        desired_running: bool,
        spec: DeploymentSpec,
    ) -> Result<ApplyOutcome, SupervisorError> {
        if !valid_id(id) {
            return Err(SupervisorError::InvalidId(id.to_owned()));
        }
        let desired = Desired {
            generation,
            running: desired_running,
            spec,
        };
        let mut table = lock(&self.table);
        if table.shut_down {
            return Err(SupervisorError::ShutDown);
        }
        while let Some(result) = table.tasks.try_join_next() {
            if let Err(error) = result {
                tracing::error!(%error, "deployment actor failed");
            }
        }
        if let Some(slot) = table.slots.get(id) {
            let held = slot.desired.borrow().generation;
            if generation < held {
                return Ok(ApplyOutcome::Stale { held });
            }
            if *slot.desired.borrow() == desired {
                return Ok(ApplyOutcome::Unchanged);
            }
            slot.desired.send_replace(desired);
            return Ok(ApplyOutcome::Updated);
        }
        let slot = self.start_actor(&mut table, id, desired);
        table.slots.insert(id.to_owned(), slot);
        Ok(ApplyOutcome::Created)
    }

    /// The log of `id`: its spool, or (when the spool cannot be used) a ring in memory.
    /// `short_lived`: its process ends with the agent (see [`LogBuffer::open_short_lived`]).
    fn open_logs(&self, id: &str, limit: usize, short_lived: bool) -> LogBuffer {
        let config = &self.shared.config;
        let spool_dir = config.work_dir.join("logs").join(id);
        let open = if short_lived {
            LogBuffer::open_short_lived
        } else {
            LogBuffer::open
        };
        match open(
            spool_dir.clone(),
            limit,
            config.spool_bytes,
            &self.shared.spool_io,
        ) {
            Ok(logs) => logs,
            Err(e) => {
                let logs = LogBuffer::in_memory(limit);
                logs.push(
                    LogStream::System,
                    format!("log spool {} unavailable: {e}", spool_dir.display()),
                );
                logs
            }
        }
    }

    fn start_actor(&self, table: &mut Table, id: &str, desired: Desired) -> Slot {
        let logs = self.open_logs(
            id,
            desired.spec.log_limit_lines,
            !desired.spec.outlive_agent,
        );
        let orphan = lock(&self.shared.orphans).remove(id);
        let status = Arc::new(Mutex::new(DeploymentStatus {
            id: id.to_owned(),
            generation: desired.generation,
            state: if desired.running {
                CurrentState::Starting
            } else {
                CurrentState::Stopped
            },
            pid: None,
            restart_count: 0,
            last_exit_code: None,
            reason: None,
            started_at_ms: None,
            stopped_at_ms: None,
            last_log_seq: logs.last_seq(),
            health_failures: 0,
            healthy: None,
            cron_restarts: 0,
            restart_at_ms: None,
            result: None,
        }));
        let (desired_tx, desired_rx) = watch::channel(desired);
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = oneshot::channel();
        let actor = actor::Actor::new(
            id.to_owned(),
            Arc::clone(&self.shared),
            desired_rx,
            Arc::clone(&status),
            logs.clone(),
            cancel.clone(),
            orphan,
        );
        table.tasks.spawn(async move {
            actor.run().await;
            let _ = done_tx.send(());
        });
        Slot {
            desired: desired_tx,
            status,
            logs,
            cancel,
            done: done_rx,
        }
    }

    /// Stops the deployment (signal, timeout, SIGKILL), forgets it and deletes its log spool,
    /// its result file and its default working directory when it is empty (one that holds
    /// files stays: they may be the user's). Returns false when the id is unknown.
    pub async fn remove(&self, id: &str) -> bool {
        let Some(slot) = lock(&self.table).slots.remove(id) else {
            // Found after a restart and never applied: stop it all the same.
            let orphan = lock(&self.shared.orphans).remove(id);
            if let Some(orphan) = orphan {
                let logs = self.stop_orphan(id, orphan).await;
                logs.delete_spool().await;
                self.tidy(id);
                return true;
            }
            return false;
        };
        slot.cancel.cancel();
        let _ = slot.done.await;
        slot.logs.delete_spool().await;
        self.tidy(id);
        true
    }

    /// What a removed deployment leaves besides its spool: a workflow's every task attempt is
    /// a deployment of its own, so without this a node gathers a directory and a file per
    /// attempt, forever.
    /// On the calling thread: an unlink, a directory read and a rename in the node's own
    /// directory cost less than a trip to the blocking pool.
    fn tidy(&self, id: &str) {
        let _ = std::fs::remove_file(self.shared.config.output_file(id));
        // Its working directory goes only when empty (see `WorkDirs`).
        self.shared.hooks.prepare.release(id);
    }

    /// The status of every deployment, by id.
    pub fn status(&self) -> Vec<DeploymentStatus> {
        lock(&self.table)
            .slots
            .values()
            .map(snapshot_status)
            .collect()
    }

    /// The status of one deployment.
    #[cfg(test)]
    pub fn status_of(&self, id: &str) -> Option<DeploymentStatus> {
        lock(&self.table).slots.get(id).map(snapshot_status)
    }

    /// The log buffer of a deployment.
    pub fn logs(&self, id: &str) -> Option<LogBuffer> {
        lock(&self.table).slots.get(id).map(|s| s.logs.clone())
    }

    /// `(id, generation, desired_running, spec)` of every deployment (the node core keeps
    /// its own copy of what it applied; tests compare).
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<(String, u64, bool, DeploymentSpec)> {
        lock(&self.table)
            .slots
            .iter()
            .map(|(id, slot)| {
                let d = slot.desired.borrow();
                (id.clone(), d.generation, d.running, d.spec.clone())
            })
            .collect()
    }

    /// Events dropped because the event channel was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped_events.load(Ordering::Relaxed)
    }

    /// Stops every deployment in parallel (each with its signal and timeout) and ends all
    /// actors. Log spools are kept (sequence numbers resume on the next start). Later
    /// `apply` calls fail with [`SupervisorError::ShutDown`].
    pub async fn shutdown(&self) {
        let orphans = std::mem::take(&mut *lock(&self.shared.orphans));
        futures_util::future::join_all(
            orphans
                .into_iter()
                .map(|(id, orphan)| async move { self.stop_orphan(&id, orphan).await }),
        )
        .await;
        self.end_actors().await;
    }

    /// Ends every actor but leaves the processes running under their keepers, for the next
    /// agent to adopt (an upgrade in place). The lines read so far are in the spools.
    pub async fn detach(&self) {
        self.shared.detach.store(true, Ordering::SeqCst);
        self.end_actors().await;
    }

    async fn end_actors(&self) {
        let (dones, logs, mut tasks) = {
            let mut table = lock(&self.table);
            table.shut_down = true;
            let slots = std::mem::take(&mut table.slots);
            let (dones, logs): (Vec<_>, Vec<_>) = slots
                .into_values()
                .map(|slot| {
                    slot.cancel.cancel();
                    (slot.done, slot.logs)
                })
                .unzip();
            (dones, logs, std::mem::take(&mut table.tasks))
        };
        futures_util::future::join_all(dones).await;
        while let Some(result) = tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "deployment actor failed");
            }
        }
        // The last lines reach the disk before the node goes (sequence numbers resume there).
        futures_util::future::join_all(logs.iter().map(LogBuffer::flush)).await;
    }
}

fn snapshot_status(slot: &Slot) -> DeploymentStatus {
    let mut status = lock(&slot.status).clone();
    status.last_log_seq = slot.logs.last_seq();
    status
}

impl Supervisor {
    /// Finds the processes a previous agent left (kill -9, crash, upgrade) in the run
    /// directories. Those of deployments in `wanted` (held in the local state, with their
    /// desired running state) that should run wait for their actor, which adopts them. The
    /// others (not held any more, or desired stopped) are stopped now, before anything is
    /// started, so a deployment never runs twice. Returns the ids kept for adoption.
    pub async fn recover(&self, wanted: &BTreeMap<String, bool>) -> Vec<String> {
        let run = self.shared.config.work_dir.join("run");
        let key = self.shared.config.secrets.clone();
        let ledger = Arc::clone(&self.shared.ledger);
        let found = tokio::task::spawn_blocking(move || {
            let mut found = scan_run_dirs(&run, &key);
            // Those run without a keeper are in the ledger (never adopted: ended by their
            // actor or stopped here). One for a deployment that also has a run directory
            // (it cannot run twice) is stopped.
            let attached = ledger.recover();
            for (id, record) in attached {
                // No run directory of its own.
                found.push((id, PathBuf::new(), Some(record)));
            }
            found
        })
        .await
        .unwrap_or_default();
        let mut kept = Vec::new();
        let mut stops = Vec::new();
        for (id, dir, record) in found {
            let twice = lock(&self.shared.orphans).contains_key(&id);
            match record {
                Some(record) if wanted.get(&id) == Some(&true) && !twice => {
                    kept.push(id.clone());
                    lock(&self.shared.orphans).insert(id, Orphan { dir, record });
                }
                Some(record) => stops.push((id, Orphan { dir, record })),
                None => {
                    // No workload was started there (or it cannot be found: see scan_run_dirs).
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                }
            }
        }
        for (id, _) in &stops {
            tracing::info!(deployment = %id, "stopping a process left by the previous agent: not held any more or desired stopped");
        }
        // Those from run directories first, then those from the ledger: one deployment may
        // have one of each (an earlier version's), and two stops of one id at once would
        // share its log spool.
        let (from_ledger, from_dirs): (Vec<_>, Vec<_>) = stops
            .into_iter()
            .partition(|(_, orphan)| orphan.dir.as_os_str().is_empty());
        for stops in [from_dirs, from_ledger] {
            futures_util::future::join_all(
                stops
                    .into_iter()
                    .map(|(id, orphan)| async move { self.stop_orphan(&id, orphan).await }),
            )
            .await;
        }
        kept
    }

    /// Adopts an orphan only to stop it (its output goes to its spool); returns its log.
    async fn stop_orphan(&self, id: &str, orphan: Orphan) -> LogBuffer {
        let spec = orphan.record.launch.spec.clone();
        let logs = self.open_logs(id, spec.log_limit_lines, false);
        match runner::adopt(&orphan.dir, orphan.record.clone(), &logs) {
            Ok(mut process) => {
                let report = process
                    .stop(runner::signal_or_term(spec.stop_signal), spec.stop_timeout)
                    .await;
                logs.push(
                    LogStream::System,
                    format!(
                        "stopped the process (pid {}) left by the previous agent: {}",
                        process.pid(),
                        runner::describe_exit_opt(report.code)
                    ),
                );
            }
            Err(e) => {
                runner::discard(&orphan.dir, orphan.record, &self.shared.ledger).await;
                logs.push(
                    LogStream::System,
                    format!("killed the process group left by the previous agent ({e})"),
                );
            }
        }
        logs.flush().await;
        logs
    }
}

/// How long a keeper found without its workload's pid is given to write it (it was starting
/// when the agent died).
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The run directories under `run`, each with its record when a workload was started there
/// (its git token opened with `key`). A keeper still starting is waited for; one that never
/// names its workload, or whose record cannot be read in full, is ended with everything in its
/// session.
fn scan_run_dirs(run: &std::path::Path, key: &SealKey) -> Vec<(String, PathBuf, Option<Record>)> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !valid_id(&id) || !dir.is_dir() {
            continue;
        }
        let mut record = Record::load(&dir);
        if record.is_none()
            && let Some(keeper) = Record::keeper_of(&dir)
        {
            // A record this agent cannot read in full (another version wrote it): what its
            // keeper runs cannot be adopted, so it is ended, session and all.
            runner::kill_session_of(keeper);
        }
        let deadline = std::time::Instant::now() + RECORD_WAIT;
        while let Some(r) = &record
            && r.workload.is_none()
            && r.keeper.alive()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
            record = Record::load(&dir);
        }
        if let Some(r) = &record
            && r.workload.is_none()
        {
            // Still starting after the wait: end the keeper and whatever it began.
            runner::kill_session_of(r.keeper);
            record = None;
        }
        if let Some(r) = &mut record {
            r.open_secrets(key);
        }
        found.push((id, dir, record));
    }
    found
}
