//! The keeper: a small process between the agent and each workload, so that a workload and its
//! output outlive the agent (a crash, an OOM kill, an upgrade), like Nomad's executor or
//! conmon, only lighter.
//!
//! The agent starts `symphony __keeper <dir>` for every process it runs, with a [`Launch`] on
//! the keeper's stdin (never on its command line: `ps` shows that, and the environment may hold
//! secrets). The keeper starts its own session, starts the workload (its child, leader of its
//! own process group), and from then on only does three things, with no threads and no timers:
//! reads the workload's stdout and stderr into the outbox, waits for its exit (a pidfd), and
//! rings the bell. The agent that started it, or a later one, tails the outbox.
//!
//! The run directory of one process (`<work_dir>/run/<deployment id>/`):
//! - `bell`: a FIFO the agent creates. The keeper holds it open read-write, so it never gets
//!   SIGPIPE and its writes never block; it writes a byte after every outbox write. The agent
//!   reads it to wake up, and its end of file means "the keeper is gone".
//! - `keeper.json`: the [`Record`] (0600: the environment may hold secrets): the launch, and
//!   the keeper's and the workload's pid with their start times, so a recycled pid is never
//!   taken for either. Written once before the workload starts and again with its pid.
//! - `out.<offset>`: the outbox, segments named by the byte offset they start at. Records are
//!   `o <ms> <line>\n` (stdout), `e <ms> <line>\n` (stderr) and `x <ms> <exit code>\n` (the
//!   workload exited; its group's remaining members may still write after it). When the
//!   segments exceed the byte cap (nobody reads: the agent is down), whole oldest segments are
//!   deleted, like the spool; the reader sees the gap as lost bytes.
//! - `exit`: the workload's exit code, written (atomically) before the `x` record, so the exit
//!   is known even if the outbox lost it.
//! - `cursor`: written by the agent only: the outbox offset up to which the lines are in the
//!   deployment's log spool, so a restarted agent resumes there (see [`OutboxReader`]).
//!
//! Invariants:
//! - The keeper never writes to a pipe or terminal after its start-up answer (stdout is then
//!   /dev/null), so nothing the agent does can kill it; only a signal can.
//! - The keeper exits only after the workload exited and both of its pipes reached their end
//!   (the agent ends stray group members first), or when the workload could not start.
//! - The file formats are versioned ([`VERSION`]): an upgraded agent reads what an older
//!   keeper writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

mod outbox;

use self::outbox::OutboxWriter;
pub use self::outbox::{Batch, OutboxReader, Rec, segment_path};
use super::logs::LineSplitter;
use super::runner::{self, Group, ProcessSpec, exit_code};
use super::state::write_private;
use crate::seal::{SealError, SealKey};
use crate::spec::DeploymentSpec;

/// The hidden first argument that turns the `symphony` binary into a keeper.
pub const ARG: &str = "__keeper";
/// Version of the run directory's formats.
pub const VERSION: u32 = 1;
/// File names in a run directory.
pub const BELL: &str = "bell";
pub const RECORD: &str = "keeper.json";
pub const EXIT: &str = "exit";
pub const CURSOR: &str = "cursor";

/// What the agent asks a keeper to run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// The deployment.
    pub id: String,
    /// Its generation when the process started.
    pub generation: u64,
    /// The spec the process runs (a restarted agent adopts it only for the same spec).
    pub spec: DeploymentSpec,
    /// Automatic restarts before this start (an adopting agent keeps counting from here).
    pub restart_count: u32,
    /// When the agent asked for the start (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// What to run.
    pub process: ProcessSpec,
    /// Longest line; longer ones are cut.
    pub max_line: usize,
    /// Byte cap of the outbox.
    pub outbox_bytes: u64,
}

impl Launch {
    /// This launch as the keeper gets it and its record keeps it: the git token sealed with
    /// the node's key (the keeper itself never needs the token).
    pub fn sealed(mut self, key: &SealKey) -> Result<Self, SealError> {
        if let Some(git) = &mut self.spec.git {
            key.seal_option(&mut git.token)?;
        }
        Ok(self)
    }
}

/// A process named by its pid and its start time (clock ticks after boot, from
/// `/proc/<pid>/stat`): a pid alone may have been recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
}

impl ProcId {
    /// The live process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = runner::proc_stat(pid)?;
        Some(Self {
            pid,
            start: stat.start,
        })
    }

    /// Whether this very process still runs (same pid, same start time, not a zombie).
    pub fn alive(&self) -> bool {
        runner::proc_stat(self.pid)
            .is_some_and(|s| s.start == self.start && s.state != 'Z' && s.state != 'X')
    }
}

/// `keeper.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub version: u32,
    pub launch: Launch,
    pub keeper: ProcId,
    /// `None` until the workload started.
    pub workload: Option<ProcId>,
    /// The workload's process group and session, read when it started.
    #[serde(default)]
    pub group: Option<Group>,
    /// No keeper: the agent named in `keeper` ran the workload as its own child
    /// (`outlive_agent: false`). A later agent ends what is left of it, never adopts it.
    #[serde(default)]
    pub attached: bool,
}

impl Record {
    /// The workload's process group: as recorded, else led by the workload in the keeper's
    /// session (which the keeper process starts).
    pub fn group(&self) -> Option<Group> {
        self.group.or_else(|| {
            Some(Group {
                pgid: i32::try_from(self.workload?.pid).ok()?,
                session: i32::try_from(self.keeper.pid).ok()?,
            })
        })
    }

    /// The keeper a record names, read even when the rest of it cannot be (another version
    /// wrote it).
    pub fn keeper_of(dir: &Path) -> Option<ProcId> {
        #[derive(serde::Deserialize)]
        struct Keeper {
            keeper: ProcId,
        }
        let bytes = fs::read(dir.join(RECORD)).ok()?;
        serde_json::from_slice::<Keeper>(&bytes)
            .ok()
            .map(|k| k.keeper)
    }

    /// Opens the git token sealed in the launch. One that does not open (another key sealed
    /// it) is dropped, with a warning: the launch then differs from the spec held, so the
    /// process is restarted with that spec rather than adopted.
    pub fn open_secrets(&mut self, key: &SealKey) {
        if let Err(e) = super::state::open_token(key, &mut self.launch.spec) {
            tracing::warn!(deployment = %self.launch.id, error = %e, "the git token in a keeper's record does not open; it is dropped");
            if let Some(git) = &mut self.launch.spec.git {
                git.token = None;
            }
        }
    }

    /// Reads `dir/keeper.json`; `None` when it is missing or unreadable (a sealed token stays
    /// sealed: see [`Record::open_secrets`]).
    pub fn load(dir: &Path) -> Option<Self> {
        let bytes = fs::read(dir.join(RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// The exit code in `dir/exit`, if the keeper wrote one.
pub fn read_exit(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join(EXIT)).ok()?.trim().parse().ok()
}

/// `symphony __keeper <dir>`: reads the launch from stdin, answers on stdout with one JSON
/// line (`{"pid":N}` or `{"error":"..."}`), then keeps the workload until it is done.
pub fn main(dir: &Path) -> ExitCode {
    // A session of its own: the agent's terminal, its process group and its end do not reach
    // the keeper.
    let _ = nix::unistd::setsid();
    let mut input = Vec::new();
    if io::stdin().read_to_end(&mut input).is_err() || input.is_empty() {
        // The agent went away before it said what to run: nothing was started.
        return ExitCode::FAILURE;
    }
    let launch = match serde_json::from_slice::<Launch>(&input) {
        Ok(launch) => launch,
        Err(e) => {
            let line = serde_json::json!({
                "error": format!("keeper: cannot read what to run ({e}); is this keeper from the same build as the agent?")
            });
            let _ = writeln!(io::stdout(), "{line}");
            return ExitCode::FAILURE;
        }
    };
    let answer = |result: Result<u32, String>| {
        let line = match result {
            Ok(pid) => serde_json::json!({ "pid": pid }),
            Err(error) => serde_json::json!({ "error": error }),
        };
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        // From now on nothing may write to the agent's pipe: it may be gone.
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null.as_fd());
            let _ = nix::unistd::dup2_stderr(null.as_fd());
        }
    };
    match serve(dir, &launch, answer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// The keeper's work, in the keeper process or (tests) in a thread of the agent: starts
/// `launch.process`, tells `ready` its pid or why it could not start, then copies its output
/// into the outbox until it exited and its pipes ended.
pub fn serve(
    dir: &Path,
    launch: &Launch,
    ready: impl FnOnce(Result<u32, String>),
) -> io::Result<()> {
    let bell = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(dir.join(BELL))
    {
        Ok(bell) => bell,
        Err(e) => {
            ready(Err(format!("keeper: cannot open the bell: {e}")));
            return Err(e);
        }
    };
    let me = ProcId::of(std::process::id()).unwrap_or(ProcId {
        pid: std::process::id(),
        start: 0,
    });
    let mut record = Record {
        version: VERSION,
        launch: launch.clone(),
        keeper: me,
        workload: None,
        group: None,
        attached: false,
    };
    let record_path = dir.join(RECORD);
    let save = |record: &Record| -> io::Result<()> {
        let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        write_private(&record_path, &bytes, false)
    };
    if let Err(e) = save(&record) {
        ready(Err(format!(
            "keeper: cannot write {}: {e}",
            record_path.display()
        )));
        return Err(e);
    }
    let mut child = match runner::std_command(&launch.process).and_then(|mut cmd| {
        cmd.spawn().map_err(|source| runner::SpawnError::Spawn {
            program: launch.process.command.first().cloned().unwrap_or_default(),
            source,
        })
    }) {
        Ok(child) => child,
        Err(e) => {
            let _ = fs::remove_file(&record_path);
            ready(Err(e.to_string()));
            return Ok(());
        }
    };
    let pid = child.id();
    record.workload = Some(ProcId::of(pid).unwrap_or(ProcId { pid, start: 0 }));
    record.group = Group::led_by(pid);
    // Without the pid on disk a later agent could not find the workload: better not to run it.
    if let Err(e) = save(&record) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        ready(Err(format!(
            "keeper: cannot write {}: {e}",
            record_path.display()
        )));
        return Err(e);
    }
    ready(Ok(pid));

    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    let mut outbox = OutboxWriter::create(dir, launch.outbox_bytes);
    let mut out = Pipe::new(child.stdout.take(), b'o', launch.max_line);
    let mut err = Pipe::new(child.stderr.take(), b'e', launch.max_line);
    let mut exited = false;
    let mut buf = vec![0u8; 64 * 1024];
    while !(exited && out.done() && err.done()) {
        let (out_ready, err_ready, exit_ready) = {
            let mut fds = Vec::with_capacity(3);
            let mut at = [None; 3];
            for (slot, fd) in [out.fd(), err.fd()].into_iter().enumerate() {
                if let Some(fd) = fd {
                    at[slot] = Some(fds.len());
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
            }
            if !exited && let Some(fd) = &pidfd {
                at[2] = Some(fds.len());
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            // Without a pidfd (a kernel before 5.3) the exit is looked for once a second.
            let timeout = if !exited && pidfd.is_none() {
                PollTimeout::from(1000u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let hit = |slot: Option<usize>| {
                slot.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            };
            (
                hit(at[0]),
                hit(at[1]),
                hit(at[2]) || (!exited && pidfd.is_none()),
            )
        };
        let now = crate::time::now_ms();
        if out_ready {
            out.read(&mut buf, now, &mut outbox);
        }
        if err_ready {
            err.read(&mut buf, now, &mut outbox);
        }
        if exit_ready && let Some(status) = child.try_wait()? {
            let code = exit_code(status);
            let _ = write_private(&dir.join(EXIT), code.to_string().as_bytes(), false);
            outbox.exit(now, code);
            exited = true;
        }
        if outbox.flush() {
            // A full bell is still a rung bell.
            let _ = (&bell).write(b"!");
        }
    }
    Ok(())
}

/// One of the workload's output pipes and its line splitter.
struct Pipe<R> {
    reader: Option<R>,
    kind: u8,
    splitter: LineSplitter,
    lines: Vec<String>,
}

impl<R: Read + AsFd> Pipe<R> {
    fn new(reader: Option<R>, kind: u8, max_line: usize) -> Self {
        Self {
            reader,
            kind,
            splitter: LineSplitter::new(max_line),
            lines: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        self.reader.is_none()
    }

    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.reader.as_ref().map(AsFd::as_fd)
    }

    /// Reads what the pipe has (it is readable: this does not block); at its end, the last
    /// partial line is kept too and the pipe is closed.
    fn read(&mut self, buf: &mut [u8], now: i64, outbox: &mut OutboxWriter) {
        let Some(reader) = &mut self.reader else {
            return;
        };
        match reader.read(buf) {
            Ok(n) if n > 0 => self.splitter.feed(&buf[..n], &mut self.lines),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The end, or an error that would repeat: the pipe is done.
            Ok(_) | Err(_) => {
                self.splitter.finish(&mut self.lines);
                self.reader = None;
            }
        }
        for line in self.lines.drain(..) {
            outbox.line(self.kind, now, line.as_bytes());
        }
    }
}
