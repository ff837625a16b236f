//! Spawning and stopping deployment processes. [`std_command`] is the ONLY place in the node
//! that builds a workload's OS command: every child gets its own process group, an explicit cwd,
//! an explicit full environment, stdin from /dev/null and no shell.
//!
//! A deployment's process runs under a keeper ([`super::keeper`]): [`spawn`] starts one and
//! [`adopt`] takes over one that a previous agent started. Either way a [`RunningProcess`] tails
//! the keeper's outbox into the deployment's log and learns the exit from it.
//!
//! Invariants:
//! - A child is the leader of its own process group (`pgid == pid`); signals go to the group,
//!   so a workload's children are stopped with it.
//! - Stopping is: `stop_signal` to the group, wait up to `stop_timeout`, then SIGKILL to the
//!   group. Group members still alive after the leader exits get the same treatment within the
//!   same deadline, so no orphan survives a stop or a restart.
//! - Exit codes follow the original: the exit status, or minus the signal number.
//! - The children are never killed on drop (`kill_on_drop(false)`): dropping a handle must not
//!   kill a workload by accident; only an explicit stop does. [`RunningProcess::detach`] leaves
//!   the keeper and its workload running for the next agent.
//! - A process's run directory is removed only after its keeper is gone and its output is in
//!   the log; while it exists, a restarted agent finds the process there.

pub mod ledger;

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use self::ledger::Ledger;
use super::keeper::{self, Launch, OutboxReader, ProcId, Rec, Record};
use super::logs::{LogBuffer, LogStream};

/// How long to wait for the keeper (the rest of the output) after the process group is gone.
const PUMP_GRACE: Duration = Duration::from_secs(2);
/// How long a keeper may take to answer whether its workload started.
const KEEPER_ANSWER: Duration = Duration::from_secs(30);
/// Bytes of outbox read per step before the records are passed on.
const READ_BYTES: usize = 256 * 1024;

/// First and longest pause between checks for the rest of a process group once its leader is
/// gone (the kernel offers no event for "group empty" for processes that are not our
/// children): the pause doubles from the first to the longest, never past the deadline.
const GROUP_POLL_FIRST: Duration = Duration::from_millis(5);
const GROUP_POLL_MAX: Duration = Duration::from_millis(100);

/// What to run: program and arguments (no shell), working directory and the full environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessSpec {
    /// `command[0]` is the program (resolved through `PATH`), the rest its arguments.
    pub command: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The complete environment of the child (nothing is inherited implicitly).
    pub env: BTreeMap<String, String>,
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The command list is empty.
    #[error("empty command")]
    EmptyCommand,
    /// The OS refused (program not found, not executable, bad cwd, ...).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program as given.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The child exited before its pid could be read.
    #[error("process exited before its pid was known")]
    NoPid,
    /// The keeper refused or failed (its message, e.g. the workload's spawn error).
    #[error("{0}")]
    Keeper(String),
}

/// Builds the command for `spec`. THE ONE PLACE where the node creates a workload's OS command:
/// own process group, explicit cwd and environment, stdin null, stdout/stderr piped.
pub fn std_command(spec: &ProcessSpec) -> Result<std::process::Command, SpawnError> {
    let (program, args) = spec.command.split_first().ok_or(SpawnError::EmptyCommand)?;
    #[allow(
        clippy::disallowed_methods,
        reason = "runner::std_command is the one place that builds commands"
    )]
    let mut cmd = std::process::Command::new(resolve(program, spec));
    cmd.args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(null_stdin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    Ok(cmd)
}

/// A child's stdin: `/dev/null`, opened once and shared (a `dup` per child, not an `open`).
fn null_stdin() -> Stdio {
    static NULL: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| std::fs::File::open("/dev/null").ok())
        .as_ref()
        .and_then(|f| f.try_clone().ok())
        .map_or_else(Stdio::null, Stdio::from)
}

/// `program` found on the child's own `PATH` (relative entries from its cwd), as `execvp`
/// in the child would find it. Looked up here because std can then start the child with
/// `posix_spawn` (a vfork) rather than a full `fork` of this process, its page tables and
/// threads: it forks whenever the environment sets `PATH` and the program is a bare name.
/// A program not found is left as it is, so that the spawn reports the usual error.
///
/// A search through a `PATH` of absolute entries is remembered for [`FOUND_FOR`]: a workflow
/// starts the same program many times a second, and each search is a `stat` per entry. A
/// program installed ahead of it on `PATH` within that time is found after it.
fn resolve(program: &str, spec: &ProcessSpec) -> std::ffi::OsString {
    if program.contains('/') {
        return program.into();
    }
    let Some(path) = spec.env.get("PATH") else {
        return program.into();
    };
    let absolute = std::env::split_paths(path).all(|p| p.is_absolute());
    let key = (path.clone(), program.to_owned());
    if absolute
        && let Some((found, at)) = lock_found().get(&key)
        && at.elapsed() < FOUND_FOR
    {
        return found.clone().into_os_string();
    }
    match which::which_in(program, Some(path), &spec.cwd) {
        Ok(found) => {
            if absolute {
                let mut cache = lock_found();
                if cache.len() >= FOUND_MAX {
                    cache.clear();
                }
                cache.insert(key, (found.clone(), std::time::Instant::now()));
            }
            found.into_os_string()
        }
        Err(_) => program.into(),
    }
}

/// How long a program found on a `PATH` is taken as found there (see [`resolve`]).
const FOUND_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The most programs remembered at once.
const FOUND_MAX: usize = 256;

/// `(PATH, program)` -> where it was found, and when.
type Found = std::collections::HashMap<(String, String), (PathBuf, std::time::Instant)>;

fn lock_found() -> std::sync::MutexGuard<'static, Found> {
    static FOUND: std::sync::LazyLock<std::sync::Mutex<Found>> =
        std::sync::LazyLock::new(Default::default);
    FOUND
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`std_command`] for tokio, never killed on drop.
pub fn command(spec: &ProcessSpec) -> Result<tokio::process::Command, SpawnError> {
    let mut cmd = tokio::process::Command::from(std_command(spec)?);
    cmd.kill_on_drop(false);
    Ok(cmd)
}

/// How keepers are started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// `<program> __keeper <dir>`: the `symphony` binary. Workloads outlive the agent.
    Program(PathBuf),
    /// In a thread of this process (unit tests): the same keeper, but it ends with the agent.
    Thread,
}

impl Launcher {
    /// `symphony-keeper` next to this process's binary (small: little memory per keeper),
    /// else this binary itself (`symphony __keeper` does the same). Resolved now: after an
    /// upgrade replaced the files, the path names the new binary, which is what new keepers
    /// should run.
    pub fn current_exe() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("symphony"));
        let small = exe.with_file_name("symphony-keeper");
        Self::Program(if small.is_file() { small } else { exe })
    }
}

/// Creates a fresh run directory with its bell. A previous process's files are removed, and
/// first whatever they name that still runs is killed: a start never leaves a copy behind.
fn fresh_run_dir(dir: &Path) -> io::Result<()> {
    if let Some(record) = Record::load(dir) {
        kill_recorded(&record);
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)?;
    nix::unistd::mkfifo(
        &dir.join(keeper::BELL),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )?;
    Ok(())
}

/// Starts `launch` under a keeper in `dir` and returns the running process, tailing its output
/// into `logs`.
pub async fn spawn(
    launcher: &Launcher,
    dir: &Path,
    launch: Launch,
    logs: &LogBuffer,
) -> Result<RunningProcess, SpawnError> {
    if launch.process.command.is_empty() {
        return Err(SpawnError::EmptyCommand);
    }
    let keeper_err =
        |what: &str, e: &dyn std::fmt::Display| SpawnError::Keeper(format!("keeper: {what}: {e}"));
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || fresh_run_dir(&owned))
        .await
        .map_err(|e| keeper_err("preparing the run directory", &e))?
        .map_err(|e| keeper_err(&format!("preparing {}", dir.display()), &e))?;
    // Open before the keeper starts, so that the keeper's end always shows as a hang-up.
    let bell = open_bell(dir).map_err(|e| keeper_err("opening the bell", &e))?;
    let (answer, keeper) = match launcher {
        Launcher::Program(program) => {
            let (answer, child) = start_keeper_process(program, dir, &launch).await?;
            (answer, KeeperHandle::Child(child))
        }
        Launcher::Thread => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let owned = dir.to_path_buf();
            let launch = launch.clone();
            let (done_tx, done) = tokio::sync::oneshot::channel();
            let thread = std::thread::spawn(move || {
                let _ = keeper::serve(&owned, &launch, |r| {
                    let _ = tx.send(r);
                });
                let _ = done_tx.send(());
            });
            let answer = rx
                .await
                .unwrap_or_else(|_| Err("keeper: the keeper thread ended".into()));
            (answer, KeeperHandle::Thread(thread, Some(done)))
        }
    };
    let record = match answer {
        Ok(pid) => tokio::task::spawn_blocking({
            let dir = dir.to_path_buf();
            move || Record::load(&dir)
        })
        .await
        .ok()
        .flatten()
        .filter(|r| r.workload.is_some_and(|w| w.pid == pid))
        .ok_or_else(|| format!("keeper: no record in {}", dir.display())),
        Err(e) => Err(e),
    };
    match record {
        Ok(record) => Ok(RunningProcess::attach(dir, record, 0, bell, keeper, logs)),
        Err(e) => {
            // Whatever the keeper started (if it got that far) must not outlive this failure:
            // the next start would not know it.
            abandon(dir, keeper).await;
            Err(SpawnError::Keeper(e))
        }
    }
}

/// Starts `launch` as this agent's own child, without a keeper (`outlive_agent: false`): one
/// blocking step (the spawn, and its record in the node's [`Ledger`]) and no `exec` but the
/// workload's. Its output is pumped straight into `logs`. The record, marked attached, lets a
/// later agent end what is left of it when this one dies first; nothing adopts it.
pub async fn spawn_attached(
    ledger: &Arc<Ledger>,
    launch: Launch,
    logs: &LogBuffer,
) -> Result<RunningProcess, SpawnError> {
    if launch.process.command.is_empty() {
        return Err(SpawnError::EmptyCommand);
    }
    // One the ledger still names for this deployment (it never ends twice at once) is ended
    // first: rarely, and it may scan `/proc`, so off the workers.
    if let Some(old) = ledger.live(&launch.id) {
        let (owned, id) = (Arc::clone(ledger), launch.id.clone());
        let _ = tokio::task::spawn_blocking(move || {
            kill_recorded(&old);
            owned.ended(&id, old.workload.map_or(0, |w| w.pid));
        })
        .await;
    }
    // On the calling worker, as tokio's own spawn is: a `posix_spawn`, a read of the child's
    // stat and a line appended to the ledger cost less than a trip to the blocking pool.
    let (mut child, record) = start_attached(ledger, launch)?;
    let out = child.stdout.take();
    let err = child.stderr.take();
    let (tx, exit) = watch::channel(ExitSeen::Running);
    let max_line = record.launch.max_line;
    let tail = tokio::spawn(watch_attached(child, out, err, logs.clone(), max_line, tx));
    Ok(RunningProcess {
        pid: record.workload.map_or(0, |w| w.pid),
        dir: PathBuf::new(),
        record,
        keeper: KeeperHandle::Attached(Arc::clone(ledger)),
        exit,
        tail: Some(tail),
    })
}

/// [`spawn_attached`]'s blocking step.
fn start_attached(
    ledger: &Ledger,
    mut launch: Launch,
) -> Result<(tokio::process::Child, Record), SpawnError> {
    let before = boot_ticks();
    let child = command(&launch.process)?
        .spawn()
        .map_err(|source| SpawnError::Spawn {
            program: launch.process.command.first().cloned().unwrap_or_default(),
            source,
        })?;
    let after = boot_ticks();
    // The ledger's line leaves out the environment (the node's own and the spec's, often most
    // of the line): a later agent only ends this process, and never runs it again.
    launch.process.env.clear();
    let pid = child.id().ok_or(SpawnError::NoPid)?;
    // Its identity is its start time as `/proc/<pid>/stat` gives it: the kernel stamps it at
    // the fork, between the two clock reads, so when both fall in one tick that is it (no
    // read of `/proc`); a spawn across a tick reads it. It leads its own group in this
    // agent's session (`process_group(0)`, no `setsid`).
    let start = match (before, after) {
        (Some(b), Some(a)) if a == b => Some(b),
        _ => proc_stat(pid).map(|s| s.start),
    };
    let group = i32::try_from(pid)
        .ok()
        .zip(nix::unistd::getsid(None).ok())
        .map(|(pgid, sid)| Group {
            pgid,
            session: sid.as_raw(),
        });
    let record = Record {
        version: keeper::VERSION,
        launch,
        keeper: agent_id(),
        workload: Some(ProcId {
            pid,
            start: start.unwrap_or(0),
        }),
        group,
        attached: true,
    };
    if let Err(e) = ledger.started(&record.launch.id, &record) {
        // Without the record a later agent could not find it: better not to run it.
        if let Some(g) = group {
            signal_group(Pid::from_raw(g.pgid), Signal::SIGKILL);
        }
        // Reaped by tokio once it is gone.
        drop(child);
        return Err(SpawnError::Keeper(format!(
            "cannot write {}: {e}",
            ledger::FILE
        )));
    }
    Ok((child, record))
}

/// Now on `CLOCK_BOOTTIME`, in the clock ticks (`CLK_TCK`) of a process's start time in
/// `/proc/<pid>/stat` (which the kernel takes from the same clock at the fork).
fn boot_ticks() -> Option<u64> {
    static NS_PER_TICK: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let per_tick = (*NS_PER_TICK.get_or_init(|| {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        1_000_000_000u64.checked_div(u64::try_from(hz).ok()?)
    }))?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let ns = u64::try_from(now.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec()).ok()?)?;
    ns.checked_div(per_tick)
}

/// This agent as a process (read once: it names the keeper of every attached record).
fn agent_id() -> ProcId {
    static ME: std::sync::OnceLock<ProcId> = std::sync::OnceLock::new();
    *ME.get_or_init(|| {
        let me = std::process::id();
        ProcId::of(me).unwrap_or(ProcId { pid: me, start: 0 })
    })
}

/// Pumps an attached process's output into `logs` and reports its exit on `exit`; ends once
/// it exited and both pipes reached their end (a member it left in its group may hold them:
/// the stop that follows an exit ends those).
async fn watch_attached(
    mut child: tokio::process::Child,
    out: Option<tokio::process::ChildStdout>,
    err: Option<tokio::process::ChildStderr>,
    logs: LogBuffer,
    max_line: usize,
    exit: watch::Sender<ExitSeen>,
) {
    let waited = async {
        let code = child.wait().await.ok().map(exit_code);
        exit.send_replace(code.map_or(ExitSeen::Unknown, ExitSeen::Code));
    };
    let out = async {
        if let Some(r) = out {
            super::logs::pump(r, LogStream::Stdout, logs.clone(), max_line).await;
        }
    };
    let err = async {
        if let Some(r) = err {
            super::logs::pump(r, LogStream::Stderr, logs.clone(), max_line).await;
        }
    };
    tokio::join!(out, err, waited);
}

/// Ends a keeper whose start failed, and what it may have started.
async fn abandon(dir: &Path, keeper: KeeperHandle) {
    let dir = dir.to_path_buf();
    let keeper_pid = match &keeper {
        KeeperHandle::Child(child) => child.id(),
        KeeperHandle::Thread(..) | KeeperHandle::Adopted | KeeperHandle::Attached(_) => None,
    };
    let _ = tokio::task::spawn_blocking(move || {
        // A keeper process's session holds all it started; a keeper thread's workload is found
        // through the record.
        match keeper_pid.and_then(|p| i32::try_from(p).ok()) {
            Some(pid) => kill_session(pid),
            None => {
                if let Some(record) = Record::load(&dir) {
                    kill_recorded(&record);
                }
            }
        }
    })
    .await;
    if let KeeperHandle::Child(mut child) = keeper {
        let _ = child.start_kill();
        let _ = timeout(PUMP_GRACE, child.wait()).await;
    }
}

/// Starts `symphony __keeper <dir>`, hands it the launch and reads its answer.
async fn start_keeper_process(
    program: &Path,
    dir: &Path,
    launch: &Launch,
) -> Result<(Result<u32, String>, tokio::process::Child), SpawnError> {
    #[allow(
        clippy::disallowed_methods,
        reason = "the keeper is the node's own binary; the workload's command is built by std_command"
    )]
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(keeper::ARG)
        .arg(dir)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let json = serde_json::to_vec(launch).map_err(|e| SpawnError::Keeper(e.to_string()))?;
    let mut stdin = child.stdin.take().ok_or(SpawnError::NoPid)?;
    let stdout = child.stdout.take().ok_or(SpawnError::NoPid)?;
    let talk = async move {
        stdin.write_all(&json).await?;
        drop(stdin);
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
        Ok::<_, io::Error>(line)
    };
    let line = match timeout(KEEPER_ANSWER, talk).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return Ok((Err(format!("keeper: {e}")), child)),
        Err(_) => return Ok((Err("keeper: no answer in time".into()), child)),
    };
    #[derive(serde::Deserialize)]
    struct Answer {
        pid: Option<u32>,
        error: Option<String>,
    }
    let answer = match serde_json::from_str::<Answer>(&line) {
        Ok(Answer { pid: Some(pid), .. }) => Ok(pid),
        Ok(Answer {
            error: Some(error), ..
        }) => Err(error),
        _ => Err(format!("keeper: unexpected answer {:?}", line.trim())),
    };
    Ok((answer, child))
}

/// Takes over the process a previous agent started in `dir` (its keeper may have exited since:
/// then the process is seen exiting at once, with its code when the keeper recorded it).
/// A process run without a keeper (an attached record) is never adopted: an error.
pub fn adopt(dir: &Path, record: Record, logs: &LogBuffer) -> io::Result<RunningProcess> {
    if record.attached {
        return Err(io::Error::other(
            "the previous agent ran it as its own child (outlive_agent: false)",
        ));
    }
    let cursor = read_cursor(dir);
    let bell = open_bell(dir)?;
    Ok(RunningProcess::attach(
        dir,
        record,
        cursor,
        bell,
        KeeperHandle::Adopted,
        logs,
    ))
}

/// Gives up a process a previous agent left that cannot be adopted: ends what its record names
/// (written down in `ledger` for one run without a keeper) and removes its run directory
/// (`dir`; empty for none).
pub async fn discard(dir: &Path, record: Record, ledger: &Arc<Ledger>) {
    let ledger = Arc::clone(ledger);
    let _ = tokio::task::spawn_blocking(move || {
        kill_recorded(&record);
        if record.attached {
            ledger.ended(&record.launch.id, record.workload.map_or(0, |w| w.pid));
        }
    })
    .await;
    // A record from the ledger has no run directory (an earlier version's attached record
    // was in one).
    if !dir.as_os_str().is_empty() {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }
}

fn open_bell(dir: &Path) -> io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new().open_receiver(dir.join(keeper::BELL))
}

fn read_cursor(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(keeper::CURSOR))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The exit code of a status: the code, or minus the signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0))
}

/// A human description of an exit code: `completed`, `exit status 3`,
/// `terminated by signal SIGKILL`.
pub fn describe_exit(code: i32) -> String {
    match code {
        0 => "completed".to_owned(),
        c if c > 0 => format!("exit status {c}"),
        c => match Signal::try_from(-c) {
            Ok(sig) => format!("terminated by signal {}", sig.as_str()),
            Err(_) => format!("terminated by signal {}", -c),
        },
    }
}

/// [`describe_exit`], or why the code is not known.
pub fn describe_exit_opt(code: Option<i32>) -> String {
    code.map_or_else(|| "exit status unknown (adopted)".to_owned(), describe_exit)
}

/// A process group as the node knows it: its id and the session it was started in. A process
/// belongs to it only when both match. A group cannot span sessions, and a session id is not
/// reused while the session has members, so a recycled id never passes for ours, not even
/// when the group's leader is gone and another group took its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub pgid: i32,
    pub session: i32,
}

impl Group {
    /// The group `leader` leads now (a process just started in a group of its own).
    pub fn led_by(leader: u32) -> Option<Self> {
        let stat = proc_stat(leader)?;
        (i32::try_from(leader).ok()? == stat.pgrp).then_some(Self {
            pgid: stat.pgrp,
            session: stat.session,
        })
    }

    fn is_member(&self, stat: &Stat) -> bool {
        stat.pgrp == self.pgid
            && stat.session == self.session
            && stat.state != 'Z'
            && stat.state != 'X'
    }

    /// Whether the group still has a live member (zombies count as gone: they hold nothing
    /// and whoever adopted them reaps them). Blocking: may read `/proc`.
    pub fn alive(&self) -> bool {
        if self.surely_gone() {
            return false;
        }
        // Usually the leader is there: one read.
        if let Ok(leader) = u32::try_from(self.pgid)
            && proc_stat(leader).is_some_and(|s| self.is_member(&s))
        {
            return true;
        }
        // Without /proc, trust killpg.
        scan_proc(|_, s| self.is_member(s)).is_none_or(|found| !found.is_empty())
    }

    /// Whether the group has no member at all (or is not one to look at: never this
    /// process's own group, which an env step's id reused by a new agent's job could name).
    /// One `killpg(pgid, 0)`: never blocks.
    fn surely_gone(&self) -> bool {
        self.pgid <= 1
            || self.pgid == nix::unistd::getpgrp().as_raw()
            || killpg(Pid::from_raw(self.pgid), None).is_err()
    }

    /// Sends `signal` to the group if it is still ours, checked just before. Blocking.
    pub fn signal(&self, signal: Signal) {
        if self.alive() {
            signal_group(Pid::from_raw(self.pgid), signal);
        }
    }
}

/// Pids of the processes whose stat passes `keep`; `None` without `/proc`.
fn scan_proc(keep: impl Fn(u32, &Stat) -> bool) -> Option<Vec<u32>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| proc_stat(pid).is_some_and(|s| keep(pid, &s)))
            .collect(),
    )
}

/// SIGKILL to every process of session `sid`: a keeper's session holds the keeper and every
/// process it started (their groups included), so this ends all of it even when the keeper
/// is gone. Never this process's own session, nor init's. Blocking.
pub fn kill_session(sid: i32) {
    let me = std::process::id();
    let own = proc_stat(me).map(|s| s.session);
    if sid <= 1 || u32::try_from(sid).is_ok_and(|s| s == me) || own == Some(sid) {
        return;
    }
    for pid in scan_proc(|_, s| s.session == sid && s.state != 'Z').unwrap_or_default() {
        if let Ok(raw) = i32::try_from(pid)
            && raw > 1
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
}

/// [`kill_session`] of the session `leader` (a keeper, which starts its own session) led,
/// unless its id names another process now: a pid that names a process with another start
/// time, or one outside its own session, is someone else's, and so is that session. A pid that
/// names nothing may still be the id of our session's remaining members (a session id is not
/// reused while it has members). Blocking.
pub fn kill_session_of(leader: ProcId) {
    let Ok(sid) = i32::try_from(leader.pid) else {
        return;
    };
    if let Some(s) = proc_stat(leader.pid)
        && (s.start != leader.start || s.session != sid)
    {
        return;
    }
    kill_session(sid);
}

/// Ends what a record names: the keeper's session (the keeper and all it started), and the
/// workload's group (when the keeper was a thread of this process). Blocking.
pub fn kill_recorded(record: &Record) {
    kill_session_of(record.keeper);
    if let Some(group) = record.group() {
        group.signal(Signal::SIGKILL);
    }
}

/// The signal for a number, SIGTERM when the number is not a valid signal.
pub fn signal_or_term(number: i32) -> Signal {
    Signal::try_from(number).unwrap_or(Signal::SIGTERM)
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Exit code of the group leader (negative = signal); `None` when it cannot be known (the
    /// keeper of an adopted process was killed).
    pub code: Option<i32>,
    /// True when SIGKILL was needed (the leader or other members outlived the timeout).
    pub killed: bool,
}

/// What the tail learned about the workload's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitSeen {
    Running,
    Code(i32),
    /// The keeper is gone without a recorded exit.
    Unknown,
}

/// Who keeps the process.
#[derive(Debug)]
enum KeeperHandle {
    /// A keeper process this agent started (dropping the handle leaves it running).
    Child(tokio::process::Child),
    /// A keeper thread (tests), and word of its end until the tail takes it.
    Thread(
        std::thread::JoinHandle<()>,
        Option<tokio::sync::oneshot::Receiver<()>>,
    ),
    /// A keeper a previous agent started.
    Adopted,
    /// No keeper: the workload is this agent's child (`outlive_agent: false`), written down
    /// in this ledger.
    Attached(Arc<Ledger>),
}

/// A running deployment process (under its keeper) and the task tailing its output.
#[derive(Debug)]
pub struct RunningProcess {
    pid: u32,
    dir: PathBuf,
    record: Record,
    keeper: KeeperHandle,
    exit: watch::Receiver<ExitSeen>,
    tail: Option<JoinHandle<()>>,
}

impl RunningProcess {
    /// Tails the keeper of `record` through `bell` (opened before a new keeper started, or
    /// just now for an adopted one).
    fn attach(
        dir: &Path,
        record: Record,
        cursor: u64,
        bell: tokio::net::unix::pipe::Receiver,
        mut keeper: KeeperHandle,
        logs: &LogBuffer,
    ) -> Self {
        let pid = record.workload.map_or(0, |w| w.pid);
        let end = match &mut keeper {
            KeeperHandle::Thread(_, done) => done.take().map_or(KeeperEnd::Gone, KeeperEnd::Thread),
            KeeperHandle::Child(_) => KeeperEnd::Bell,
            KeeperHandle::Adopted => KeeperEnd::adopted(record.keeper),
            // Never tailed: `spawn_attached` pumps its pipes.
            KeeperHandle::Attached(_) => KeeperEnd::Gone,
        };
        let (tx, exit) = watch::channel(ExitSeen::Running);
        let tail = tokio::spawn(tail(dir.to_path_buf(), cursor, bell, end, logs.clone(), tx));
        Self {
            pid,
            dir: dir.to_path_buf(),
            record,
            keeper,
            exit,
            tail: Some(tail),
        }
    }

    /// The leader's pid (also the process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it runs under a keeper (else it is this agent's child: `outlive_agent: false`).
    pub fn outlives_agent(&self) -> bool {
        !self.record.attached
    }

    /// What the process was started with.
    pub fn launch(&self) -> &Launch {
        &self.record.launch
    }

    /// Waits for the group leader to exit; returns its exit code, `None` when it cannot be
    /// known. Cancel-safe, and returns at once when the exit is already known.
    pub async fn wait(&mut self) -> Option<i32> {
        match self.exit.wait_for(|e| *e != ExitSeen::Running).await {
            Ok(seen) => match *seen {
                ExitSeen::Code(code) => Some(code),
                ExitSeen::Running | ExitSeen::Unknown => None,
            },
            // The tail ended without a word (aborted): nothing more will be learned.
            Err(_) => None,
        }
    }

    /// Stops the process group: `signal`, then SIGKILL after `stop_timeout`. Also used after
    /// the leader exited on its own, to end the members it left behind. Waits for the keeper
    /// so every line is in the log when this returns, then removes the run directory. Every
    /// wait is bounded: a keeper that cannot report (stopped, stuck on a dead disk) is killed,
    /// and the exit is then unknown.
    pub async fn stop(&mut self, signal: Signal, stop_timeout: Duration) -> StopReport {
        let deadline = Instant::now() + stop_timeout;
        let group = self.record.group();
        let mut killed = false;
        let exited = *self.exit.borrow() != ExitSeen::Running;
        if let Some(g) = group {
            signal_async(g, signal).await;
            if !exited && timeout_at(deadline, self.wait()).await.is_err() {
                signal_async(g, Signal::SIGKILL).await;
                killed = true;
            }
        }
        let code = match timeout(PUMP_GRACE, self.wait()).await {
            Ok(code) => code,
            Err(_) => {
                self.kill_keeper();
                timeout(PUMP_GRACE, self.wait()).await.ok().flatten()
            }
        };
        // The leader is gone; wait for the rest of the group within the same deadline.
        if let Some(g) = group {
            let mut pause = GROUP_POLL_FIRST;
            while group_alive(g).await {
                let now = Instant::now();
                if now >= deadline {
                    signal_async(g, Signal::SIGKILL).await;
                    killed = true;
                    break;
                }
                sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(GROUP_POLL_MAX);
            }
        }
        self.finish_keeper().await;
        StopReport { code, killed }
    }

    /// SIGKILL to the keeper process (never to a keeper thread or an attached process's
    /// keeper: that is this process).
    fn kill_keeper(&self) {
        if !matches!(
            self.keeper,
            KeeperHandle::Thread(..) | KeeperHandle::Attached(_)
        ) {
            kill_process(self.record.keeper);
        }
    }

    /// Waits for the keeper to end (the rest of the output is then in the log); a keeper held
    /// up by a process that left the group is killed after [`PUMP_GRACE`]. Then the run
    /// directory goes.
    async fn finish_keeper(&mut self) {
        if let Some(mut tail) = self.tail.take()
            && timeout(PUMP_GRACE, &mut tail).await.is_err()
        {
            self.kill_keeper();
            if timeout(PUMP_GRACE, &mut tail).await.is_err() {
                tail.abort();
            }
        }
        match std::mem::replace(&mut self.keeper, KeeperHandle::Adopted) {
            KeeperHandle::Child(mut child) => {
                let _ = timeout(PUMP_GRACE, child.wait()).await;
            }
            KeeperHandle::Thread(thread, _) => {
                let join = tokio::task::spawn_blocking(move || thread.join());
                let _ = timeout(PUMP_GRACE, join).await;
            }
            KeeperHandle::Adopted => {}
            // One line appended (see `spawn_attached`).
            KeeperHandle::Attached(ledger) => ledger.ended(&self.record.launch.id, self.pid),
        }
        // One run without a keeper has no run directory: the ledger says it is gone.
        if self.record.attached {
            return;
        }
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        if let Ok(Err(error)) = removed
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %self.dir.display(), "removing a run directory failed");
        }
    }

    /// Leaves the process to its keeper (the agent is being upgraded): stops reading its
    /// output. The lines read so far are in the log and the cursor says where they end, so
    /// the next agent goes on from there.
    pub fn detach(mut self) {
        if let Some(tail) = self.tail.take() {
            tail.abort();
        }
    }
}

/// Tails the outbox of the keeper in `dir` into `logs` from `cursor`, until the keeper is gone
/// and everything it wrote is read; reports the exit on `exit`.
async fn tail(
    dir: PathBuf,
    cursor: u64,
    bell: tokio::net::unix::pipe::Receiver,
    mut end: KeeperEnd,
    logs: LogBuffer,
    exit: watch::Sender<ExitSeen>,
) {
    let mut keeper_gone = matches!(end, KeeperEnd::Gone);
    let mut reader = Some(OutboxReader::new(&dir, cursor));
    let mut last_cursor = cursor;
    let mut read_failed = false;
    loop {
        let Some(mut r) = reader.take() else { break };
        let read = tokio::task::spawn_blocking(move || {
            let batch = r.read(READ_BYTES);
            (r, batch)
        })
        .await;
        let Ok((r, batch)) = read else { break };
        reader = Some(r);
        match batch {
            Ok(batch) => {
                read_failed = false;
                let more = batch.more;
                if !batch.is_empty(last_cursor) {
                    last_cursor = batch.cursor;
                    deliver(&dir, batch, &logs, &exit).await;
                }
                if more {
                    // The read stopped at its budget: read on before waiting (others first).
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            Err(error) if !read_failed => {
                read_failed = true;
                logs.push(
                    LogStream::System,
                    format!("reading the keeper's output failed: {error}"),
                );
            }
            Err(_) => {}
        }
        if keeper_gone {
            break;
        }
        tokio::select! {
            gone = ring_or_gone(&bell) => keeper_gone = gone,
            () = end.ended() => keeper_gone = true,
        }
    }
    if *exit.borrow() == ExitSeen::Running {
        let dir = dir.clone();
        let code = tokio::task::spawn_blocking(move || keeper::read_exit(&dir))
            .await
            .ok()
            .flatten();
        exit.send_replace(code.map_or(ExitSeen::Unknown, ExitSeen::Code));
    }
}

/// How often the tail of an adopted keeper looks whether it still runs (see [`KeeperEnd`]).
const ADOPT_RECHECK: Duration = Duration::from_secs(2);

/// How the tail learns that the keeper is gone besides the bell's end of file. Linux reports
/// no hang-up on a FIFO whose writers all left before the reader opened it. So a new keeper's
/// bell is opened before the keeper starts (its end then always shows); an adopted keeper
/// found dead is not waited for, and one found alive is looked at again every
/// [`ADOPT_RECHECK`] (one small `/proc` read): it may have been exiting while the tail opened
/// the bell, and then only this tells.
enum KeeperEnd {
    /// A keeper thread's word.
    Thread(tokio::sync::oneshot::Receiver<()>),
    /// An adopted keeper, to look at again at this instant.
    Recheck(ProcId, Instant),
    /// The bell's end of file says it.
    Bell,
    /// Gone already.
    Gone,
}

impl KeeperEnd {
    /// For an adopted keeper process, after its bell was opened.
    fn adopted(keeper: ProcId) -> Self {
        if keeper.alive() {
            Self::Recheck(keeper, Instant::now() + ADOPT_RECHECK)
        } else {
            Self::Gone
        }
    }

    /// Returns once the keeper is known gone (never when only the bell can say it).
    async fn ended(&mut self) {
        match self {
            Self::Thread(done) => {
                let _ = done.await;
                *self = Self::Gone;
            }
            Self::Recheck(keeper, at) => loop {
                sleep_until(*at).await;
                if !keeper.alive() {
                    *self = Self::Gone;
                    return;
                }
                *at = Instant::now() + ADOPT_RECHECK;
            },
            Self::Bell => std::future::pending().await,
            Self::Gone => {}
        }
    }
}

/// Waits for the bell and empties it; true when the keeper is gone (end of file).
async fn ring_or_gone(bell: &tokio::net::unix::pipe::Receiver) -> bool {
    let mut scratch = [0u8; 512];
    loop {
        if bell.readable().await.is_err() {
            return true;
        }
        let mut rang = false;
        loop {
            match bell.try_read(&mut scratch) {
                Ok(0) => return true,
                Ok(_) => rang = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        if rang {
            return false;
        }
    }
}

/// Passes a batch of records on: lines to the log (with the keeper's times), the exit to the
/// waiter, and the cursor to disk once the lines are in the spool. Waits for the spool, so a
/// backlog is read no faster than it is written. A batch the spool could not take (a full or
/// failing disk) leaves the cursor where it was: the lines stay in the outbox (bounded), and a
/// restart may show some twice rather than none.
async fn deliver(
    dir: &Path,
    batch: keeper::Batch,
    logs: &LogBuffer,
    exit: &watch::Sender<ExitSeen>,
) {
    if batch.lost_bytes > 0 {
        logs.push(
            LogStream::System,
            format!(
                "{} bytes of output were lost while nobody read them (the keeper's outbox was full)",
                batch.lost_bytes
            ),
        );
    }
    let mut exited = None;
    let dropped_before = logs.dropped_lines();
    logs.push_timed(batch.recs.into_iter().filter_map(|rec| match rec {
        Rec::Line {
            stream,
            at_ms,
            text,
        } => Some((stream, at_ms, text)),
        Rec::Exit { code, .. } => {
            exited = Some(code);
            None
        }
    }));
    if let Some(code) = exited {
        exit.send_replace(ExitSeen::Code(code));
    }
    let (dir, cursor, passed) = (dir.to_path_buf(), batch.cursor, batch.passed);
    let spooled = logs.clone();
    logs.after_writes(move || {
        if spooled.dropped_lines() == dropped_before {
            save_cursor(&dir, cursor, &passed);
        }
    })
    .await;
}

/// Records how far the outbox is in the log, then deletes the segments read past.
fn save_cursor(dir: &Path, cursor: u64, passed: &[u64]) {
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(keeper::CURSOR))
        // Fixed width, in place: one write, never a torn or shorter number.
        .and_then(|f| f.write_all_at(format!("{cursor:020}\n").as_bytes(), 0));
    if written.is_err() {
        // The run directory is gone (the process ended) or the disk is failing: a restart
        // reads from the last cursor that was written.
        return;
    }
    for &start in passed {
        let _ = std::fs::remove_file(keeper::segment_path(dir, start));
    }
}

/// SIGKILL to that very process (same pid and start time), never to anything else: not to a
/// recycled pid, and never to pid 0 or -1, which would name whole groups.
pub fn kill_process(p: ProcId) {
    if let Ok(raw) = i32::try_from(p.pid)
        && raw > 0
        && p.pid != std::process::id()
        && p.alive()
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
}

/// Sends `signal` to the group; a group that no longer exists is not an error.
fn signal_group(pgid: Pid, signal: Signal) {
    // 0 is the caller's own group and 1 is init's: never a workload's (a record without a pid).
    if pgid.as_raw() <= 1 || pgid == nix::unistd::getpgrp() {
        return;
    }
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(%error, pgid = pgid.as_raw(), ?signal, "killpg failed"),
    }
}

/// [`Group::alive`] on the blocking pool (it may scan `/proc`, a file per process).
async fn group_alive(g: Group) -> bool {
    // A group with no member (the usual case once its leader was reaped) needs no /proc.
    if g.surely_gone() {
        return false;
    }
    tokio::task::spawn_blocking(move || g.alive())
        .await
        .unwrap_or(true)
}

/// [`Group::signal`] on the blocking pool (not at all for a group with no member).
async fn signal_async(g: Group, signal: Signal) {
    if g.surely_gone() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || g.signal(signal)).await;
}

/// What the node reads of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
    /// Start time in clock ticks after boot: with the pid, names one process for good.
    pub start: u64,
}

/// The stat of process `pid`, if it exists.
pub fn proc_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
/// stime cutime cstime priority nice threads itrealvalue starttime ...`
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` names a live (non-zombie) process.
#[cfg(test)]
pub fn process_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Kills a process group with SIGKILL when dropped (also when the owning future is dropped
/// mid-way, e.g. an aborted health check).
struct KillGroupOnDrop(Option<Pid>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            signal_group(pgid, Signal::SIGKILL);
        }
    }
}

/// Runs `spec` to completion with its output discarded (health-check commands). The whole
/// group is killed when the leader exits, on timeout, and if this future is dropped. Returns
/// the exit code.
pub async fn run_to_exit(spec: &ProcessSpec, limit: Duration) -> Result<i32, String> {
    let mut cmd = command(spec).map_err(|e| e.to_string())?;
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let program = spec.command.first().cloned().unwrap_or_default();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let _group = KillGroupOnDrop(
        child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw),
    );
    match timeout(limit, child.wait()).await {
        Ok(Ok(status)) => Ok(exit_code(status)),
        Ok(Err(e)) => Err(format!("waiting for {program:?} failed: {e}")),
        Err(_) => Err(format!("timed out after {}ms", limit.as_millis())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A launch of `spec` with default limits.
    fn launch(spec: ProcessSpec, max_line: usize) -> Launch {
        Launch {
            id: "t".into(),
            generation: 1,
            spec: crate::spec::DeploymentSpec::defaults_for(spec.command.clone()),
            restart_count: 0,
            started_at_ms: 0,
            process: spec,
            max_line,
            outbox_bytes: 1 << 20,
        }
    }

    /// Starts `spec` under a keeper thread in a fresh run directory.
    async fn try_start(
        spec: ProcessSpec,
        logs: &LogBuffer,
        max_line: usize,
    ) -> (tempfile::TempDir, Result<RunningProcess, SpawnError>) {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let p = spawn(&Launcher::Thread, &run, launch(spec, max_line), logs).await;
        (dir, p)
    }

    async fn start(spec: ProcessSpec, logs: &LogBuffer) -> (tempfile::TempDir, RunningProcess) {
        let (dir, p) = try_start(spec, logs, 1024).await;
        (dir, p.unwrap())
    }

    fn sh(script: &str) -> ProcessSpec {
        ProcessSpec {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: std::env::vars().collect(),
        }
    }

    /// A bare program name is found on the child's PATH (not the agent's), relative entries
    /// from the child's cwd; one found nowhere is left for the spawn to report.
    #[test]
    fn programs_are_found_on_the_childs_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("only-here");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut spec = sh("");
        spec.cwd = dir.path().to_path_buf();
        spec.env.insert("PATH".into(), "/nonexistent:bin".into());
        assert_eq!(resolve("only-here", &spec), tool.as_os_str());
        assert_eq!(resolve("./only-here", &spec), "./only-here");
        assert_eq!(resolve("missing-tool", &spec), "missing-tool");
        // Relative entries are searched again from each cwd (never remembered).
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("bin")).unwrap();
        let there = other.path().join("bin").join("only-here");
        std::fs::copy(&tool, &there).unwrap();
        let elsewhere = ProcessSpec {
            cwd: other.path().to_path_buf(),
            ..spec.clone()
        };
        assert_eq!(resolve("only-here", &elsewhere), there.as_os_str());
        // Absolute entries: found, and found the same again (remembered).
        let mut absolute = spec.clone();
        absolute
            .env
            .insert("PATH".into(), format!("/nonexistent:{}", bin.display()));
        assert_eq!(resolve("only-here", &absolute), tool.as_os_str());
        assert_eq!(resolve("only-here", &absolute), tool.as_os_str());
        let out = std_command(&ProcessSpec {
            command: vec!["only-here".into()],
            ..spec.clone()
        })
        .unwrap()
        .output()
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "found\n");
        let err = std_command(&ProcessSpec {
            command: vec!["missing-tool".into()],
            ..spec
        })
        .unwrap()
        .spawn()
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A child's start time taken from the clock around its spawn (both reads in one tick) is
    /// the one `/proc/<pid>/stat` gives, so a later agent knows the process by it.
    #[test]
    fn a_start_time_from_the_clock_is_the_one_proc_gives() {
        let mut compared = 0;
        for _ in 0..50 {
            let before = boot_ticks();
            let mut child = std_command(&sh("sleep 5")).unwrap().spawn().unwrap();
            let after = boot_ticks();
            assert!(before.is_some() && before <= after);
            let proc = proc_stat(child.id()).map(|s| s.start);
            let _ = child.kill();
            let _ = child.wait();
            if before == after {
                assert_eq!(before, proc);
                compared += 1;
            }
        }
        assert!(compared > 0, "every spawn crossed a clock tick");
    }

    /// A child's stdin is `/dev/null` (it reads nothing and never waits), for every child:
    /// the shared handle is duplicated, not given away.
    #[test]
    fn stdin_is_dev_null_for_every_child() {
        for _ in 0..2 {
            let out = std_command(&sh("readlink /proc/self/fd/0; cat; echo done"))
                .unwrap()
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "/dev/null\ndone\n");
        }
    }

    #[tokio::test]
    async fn exit_codes_env_and_cwd() {
        let logs = LogBuffer::in_memory(100);
        let mut spec = sh("echo \"$FOO\"; pwd; exit 7");
        spec.env.insert("FOO".into(), "bar".into());
        let dir = tempfile::tempdir().unwrap();
        spec.cwd = dir.path().to_path_buf();
        let (_run, mut p) = start(spec, &logs).await;
        assert_eq!(p.wait().await, Some(7));
        let report = p.stop(Signal::SIGTERM, Duration::from_secs(1)).await;
        assert_eq!(
            report,
            StopReport {
                code: Some(7),
                killed: false
            }
        );
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines, vec!["bar".to_owned(), cwd.display().to_string()]);

        let (_run, mut p) = start(sh("kill -9 $$"), &logs).await;
        assert_eq!(p.wait().await, Some(-9));
        assert_eq!(describe_exit(-9), "terminated by signal SIGKILL");
        assert_eq!(describe_exit(0), "completed");
        assert_eq!(describe_exit(3), "exit status 3");
    }

    #[tokio::test]
    async fn spawn_errors_are_values() {
        let logs = LogBuffer::in_memory(10);
        let mut spec = sh("true");
        spec.command = vec![];
        assert!(matches!(
            try_start(spec.clone(), &logs, 10).await.1,
            Err(SpawnError::EmptyCommand)
        ));
        spec.command = vec!["/nonexistent/program".into()];
        let err = try_start(spec, &logs, 10).await.1.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    }

    #[tokio::test]
    async fn run_to_exit_reports_code_and_timeout() {
        assert_eq!(
            run_to_exit(&sh("exit 4"), Duration::from_secs(5)).await,
            Ok(4)
        );
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        let err = run_to_exit(&sh(&script), Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        // The timeout killed the whole group, the backgrounded child included.
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = async {
            while process_alive(child) {
                sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(Duration::from_secs(10), gone).await.unwrap();
    }

    async fn first_line_pid(logs: &LogBuffer) -> u32 {
        let mut rx = logs.subscribe();
        loop {
            if let Some(e) = logs.since(0, 1).first() {
                return e.line.parse().unwrap();
            }
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test]
    async fn stop_ends_members_that_outlive_the_leader() {
        // The member exits on the stop signal: no SIGKILL needed.
        let logs = LogBuffer::in_memory(10);
        let (_run, mut p) = start(sh("sleep 100 & echo $!"), &logs).await;
        assert_eq!(p.wait().await, Some(0));
        let member = first_line_pid(&logs).await;
        assert!(process_alive(member));
        let report = p.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
        assert_eq!(
            report,
            StopReport {
                code: Some(0),
                killed: false
            }
        );
        assert!(!process_alive(member));

        // The member ignores it: SIGKILL at the deadline, reported.
        let logs = LogBuffer::in_memory(10);
        let (_run, mut p) = start(sh("trap '' TERM; sleep 100 & echo $!"), &logs).await;
        assert_eq!(p.wait().await, Some(0));
        let member = first_line_pid(&logs).await;
        let report = p.stop(Signal::SIGTERM, Duration::from_millis(300)).await;
        assert_eq!(
            report,
            StopReport {
                code: Some(0),
                killed: true
            }
        );
        let gone = async {
            while process_alive(member) {
                sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(Duration::from_secs(10), gone).await.unwrap();
    }

    #[test]
    fn parses_proc_stat_with_odd_comm() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                state: 'S',
                pgrp: 42,
                session: 42,
                start: 777
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }
}
