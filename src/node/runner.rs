//! Spawning and stopping deployment processes. [`command`] is the ONLY place in the node that
//! builds an OS command: every child gets its own process group, an explicit cwd, an explicit
//! full environment, stdin from /dev/null and no shell.
//!
//! Invariants:
//! - A child is the leader of its own process group (`pgid == pid`); signals go to the group,
//!   so a workload's children are stopped with it.
//! - Stopping is: `stop_signal` to the group, wait up to `stop_timeout`, then SIGKILL to the
//!   group. Group members still alive after the leader exits get the same treatment within the
//!   same deadline, so no orphan survives a stop or a restart.
//! - Exit codes follow the original: the exit status, or minus the signal number.
//! - The children are never killed on drop (`kill_on_drop(false)`): dropping a handle must not
//!   kill a workload by accident; only an explicit stop does.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout, timeout_at};

use super::logs::{LogBuffer, LogStream, pump};

/// How long to wait for the output pumps after the process group is gone.
const PUMP_GRACE: Duration = Duration::from_secs(2);

/// First and longest pause between checks for the rest of a process group once its leader is
/// gone (the kernel offers no event for "group empty" for processes that are not our
/// children): the pause doubles from the first to the longest, never past the deadline.
const GROUP_POLL_FIRST: Duration = Duration::from_millis(5);
const GROUP_POLL_MAX: Duration = Duration::from_millis(100);

/// What to run: program and arguments (no shell), working directory and the full environment.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Builds the command for `spec`. THE ONE PLACE where the node creates OS commands: own process
/// group, explicit cwd and environment, stdin null, stdout/stderr piped, no kill on drop.
pub fn command(spec: &ProcessSpec) -> Result<tokio::process::Command, SpawnError> {
    let (program, args) = spec.command.split_first().ok_or(SpawnError::EmptyCommand)?;
    #[allow(
        clippy::disallowed_methods,
        reason = "runner::command is the one place that builds commands"
    )]
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    Ok(cmd)
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

/// The signal for a number, SIGTERM when the number is not a valid signal.
pub fn signal_or_term(number: i32) -> Signal {
    Signal::try_from(number).unwrap_or(Signal::SIGTERM)
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Exit code of the group leader (negative = signal).
    pub code: i32,
    /// True when SIGKILL was needed (the leader or other members outlived the timeout).
    pub killed: bool,
}

/// A running deployment process and the tasks pumping its output into its log.
#[derive(Debug)]
pub struct RunningProcess {
    child: Child,
    pid: u32,
    exit: Option<i32>,
    pumps: JoinSet<()>,
}

/// Spawns `spec`, pumping stdout and stderr into `logs` with lines of at most `max_line` bytes.
pub fn spawn(
    spec: &ProcessSpec,
    logs: &LogBuffer,
    max_line: usize,
) -> Result<RunningProcess, SpawnError> {
    let mut cmd = command(spec)?;
    let mut child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        program: spec.command.first().cloned().unwrap_or_default(),
        source,
    })?;
    let Some(pid) = child.id() else {
        return Err(SpawnError::NoPid);
    };
    let mut pumps = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        pumps.spawn(pump(out, LogStream::Stdout, logs.clone(), max_line));
    }
    if let Some(err) = child.stderr.take() {
        pumps.spawn(pump(err, LogStream::Stderr, logs.clone(), max_line));
    }
    Ok(RunningProcess {
        child,
        pid,
        exit: None,
        pumps,
    })
}

impl RunningProcess {
    /// The leader's pid (also the process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    /// Waits for the group leader to exit; returns its exit code. Cancel-safe, and returns at
    /// once when the exit is already known.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.exit {
            return code;
        }
        let code = match self.child.wait().await {
            Ok(status) => exit_code(status),
            Err(error) => {
                // Practically impossible after a successful spawn; make sure nothing survives.
                tracing::error!(%error, pid = self.pid, "waiting for child failed");
                signal_group(self.pgid(), Signal::SIGKILL);
                -(Signal::SIGKILL as i32)
            }
        };
        self.exit = Some(code);
        code
    }

    /// Stops the process group: `signal`, then SIGKILL after `stop_timeout`. Also used after
    /// the leader exited on its own, to end the members it left behind. Waits for the output
    /// pumps so every line is in the log when this returns.
    pub async fn stop(&mut self, signal: Signal, stop_timeout: Duration) -> StopReport {
        let deadline = Instant::now() + stop_timeout;
        let pgid = self.pgid();
        let mut killed = false;
        if self.exit.is_none() {
            signal_group(pgid, signal);
            if timeout_at(deadline, self.wait()).await.is_err() {
                signal_group(pgid, Signal::SIGKILL);
                killed = true;
            }
        } else if group_alive(pgid).await {
            signal_group(pgid, signal);
        }
        let code = self.wait().await;
        // The leader is gone; wait for the rest of the group within the same deadline.
        let mut pause = GROUP_POLL_FIRST;
        while group_alive(pgid).await {
            let now = Instant::now();
            if now >= deadline {
                signal_group(pgid, Signal::SIGKILL);
                killed = true;
                break;
            }
            sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(GROUP_POLL_MAX);
        }
        let pumps = async { while self.pumps.join_next().await.is_some() {} };
        if timeout(PUMP_GRACE, pumps).await.is_err() {
            // A process that left the group still holds a pipe; stop reading it.
            self.pumps.abort_all();
        }
        StopReport { code, killed }
    }
}

/// Sends `signal` to the group; a group that no longer exists is not an error.
fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(%error, pgid = pgid.as_raw(), ?signal, "killpg failed"),
    }
}

/// Whether the group has a member that is not a zombie. Zombies count as gone: they hold no
/// resources and are reaped by whoever adopted them (an init that does not reap would
/// otherwise turn every stop into a SIGKILL at the deadline).
///
/// `killpg(pgid, 0)` answers "no member at all" with one syscall, which is the usual case
/// right after the leader exits. Only when some member exists is `/proc` scanned for a live
/// one, on the blocking pool: the scan reads a file per process and must not hold an async
/// worker.
async fn group_alive(pgid: Pid) -> bool {
    if killpg(pgid, None).is_err() {
        return false;
    }
    let raw = pgid.as_raw();
    // Without /proc (or if the scan cannot run), trust killpg.
    tokio::task::spawn_blocking(move || group_has_live_member(raw).unwrap_or(true))
        .await
        .unwrap_or(true)
}

fn group_has_live_member(pgid: i32) -> io::Result<bool> {
    for dirent in std::fs::read_dir("/proc")? {
        let path = dirent?.path();
        let is_pid = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(path.join("stat"))
            && let Some((state, group)) = parse_stat(&stat)
            && group == pgid
            && state != 'Z'
            && state != 'X'
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// State and process group from `/proc/<pid>/stat` (`pid (comm) state ppid pgrp ...`).
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` names a live (non-zombie) process.
#[cfg(test)]
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => parse_stat(&stat).is_some_and(|(state, _)| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
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

    fn sh(script: &str) -> ProcessSpec {
        ProcessSpec {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: std::env::vars().collect(),
        }
    }

    #[tokio::test]
    async fn exit_codes_env_and_cwd() {
        let logs = LogBuffer::in_memory(100);
        let mut spec = sh("echo \"$FOO\"; pwd; exit 7");
        spec.env.insert("FOO".into(), "bar".into());
        let dir = tempfile::tempdir().unwrap();
        spec.cwd = dir.path().to_path_buf();
        let mut p = spawn(&spec, &logs, 1024).unwrap();
        assert_eq!(p.wait().await, 7);
        let report = p.stop(Signal::SIGTERM, Duration::from_secs(1)).await;
        assert_eq!(
            report,
            StopReport {
                code: 7,
                killed: false
            }
        );
        let lines: Vec<String> = logs.since(0, 10).into_iter().map(|e| e.line).collect();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines, vec!["bar".to_owned(), cwd.display().to_string()]);

        let mut p = spawn(&sh("kill -9 $$"), &logs, 1024).unwrap();
        assert_eq!(p.wait().await, -9);
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
            spawn(&spec, &logs, 10),
            Err(SpawnError::EmptyCommand)
        ));
        spec.command = vec!["/nonexistent/program".into()];
        let err = spawn(&spec, &logs, 10).unwrap_err();
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
        let mut p = spawn(&sh("sleep 100 & echo $!"), &logs, 1024).unwrap();
        assert_eq!(p.wait().await, 0);
        let member = first_line_pid(&logs).await;
        assert!(process_alive(member));
        let report = p.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
        assert_eq!(
            report,
            StopReport {
                code: 0,
                killed: false
            }
        );
        assert!(!process_alive(member));

        // The member ignores it: SIGKILL at the deadline, reported.
        let logs = LogBuffer::in_memory(10);
        let mut p = spawn(&sh("trap '' TERM; sleep 100 & echo $!"), &logs, 1024).unwrap();
        assert_eq!(p.wait().await, 0);
        let member = first_line_pid(&logs).await;
        let report = p.stop(Signal::SIGTERM, Duration::from_millis(300)).await;
        assert_eq!(
            report,
            StopReport {
                code: 0,
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
        assert_eq!(parse_stat("42 (a) b) S 1 42 42 0"), Some(('S', 42)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
