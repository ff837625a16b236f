//! The actor of one deployment: owns its process, restart tracker, health monitor and cron
//! timer, reacts to desired-state changes, exits, health failures and timers, and publishes
//! its status after every change.
//!
//! Invariants:
//! - At most one process per deployment: a new one starts only after the previous one and its
//!   process group are gone (`RunningProcess::stop` returned).
//! - Starts happen only from this actor's loop; restarts go through `backoff_until` (a zero
//!   delay starts on the next loop turn), so no start recursion and no start while stopping.
//! - Cron restarts and spec changes do not charge the restart budget; crashes, health failures
//!   and failed prepares/spawns do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{CurrentState, DeploymentStatus, Desired, NextFire, Orphan, Shared, lock};
use crate::node::health;
use crate::node::keeper::Launch;
use crate::node::logs::{LogBuffer, LogStream};
use crate::node::restart::{Budget, Decision, RestartTracker};
use crate::node::runner::{self, ProcessSpec, RunningProcess, describe_exit_opt, signal_or_term};

/// A live process with its health monitor.
struct Running {
    process: RunningProcess,
    /// Dropping it aborts the monitor.
    health: JoinSet<()>,
    verdicts: mpsc::Receiver<health::Verdict>,
    /// Stop settings of the spec the process was started with.
    signal: Signal,
    stop_timeout: Duration,
}

enum ProcEvent {
    Exited(Option<i32>),
    Health(health::Verdict),
}

/// See the module docs.
pub(super) struct Actor {
    id: String,
    shared: Arc<Shared>,
    desired_rx: watch::Receiver<Desired>,
    cur: Desired,
    status: Arc<Mutex<DeploymentStatus>>,
    logs: LogBuffer,
    cancel: CancellationToken,
    tracker: RestartTracker,
    base: Instant,
    proc: Option<Running>,
    backoff_until: Option<Instant>,
    cron: Option<NextFire>,
    cron_at: Option<Instant>,
    /// The process a previous agent left for this deployment, adopted when the actor starts.
    orphan: Option<Orphan>,
}

async fn next_proc_event(proc: &mut Option<Running>) -> ProcEvent {
    let Some(running) = proc else {
        return std::future::pending().await;
    };
    tokio::select! {
        code = running.process.wait() => ProcEvent::Exited(code),
        Some(verdict) = running.verdicts.recv() => ProcEvent::Health(verdict),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn wall_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Actor {
    pub(super) fn new(
        id: String,
        shared: Arc<Shared>,
        mut desired_rx: watch::Receiver<Desired>,
        status: Arc<Mutex<DeploymentStatus>>,
        logs: LogBuffer,
        cancel: CancellationToken,
        orphan: Option<Orphan>,
    ) -> Self {
        let cur = desired_rx.borrow_and_update().clone();
        Self {
            id,
            shared,
            desired_rx,
            cur,
            status,
            logs,
            cancel,
            tracker: RestartTracker::new(),
            base: Instant::now(),
            proc: None,
            backoff_until: None,
            cron: None,
            cron_at: None,
            orphan,
        }
    }

    pub(super) async fn run(mut self) {
        self.setup_cron();
        let ended = match self.orphan.take() {
            Some(orphan) => self.adopt(orphan).await,
            None => false,
        };
        if !ended && self.proc.is_none() && self.backoff_until.is_none() {
            if self.cur.running {
                self.start().await;
            } else {
                self.update(|s| s.state = CurrentState::Stopped);
            }
        }
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                changed = self.desired_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_desired().await;
                }
                event = next_proc_event(&mut self.proc) => match event {
                    ProcEvent::Exited(code) => self.on_exit(code).await,
                    ProcEvent::Health(health::Verdict::Unhealthy(detail)) => {
                        self.on_unhealthy(detail).await;
                    }
                    ProcEvent::Health(health::Verdict::Healthy) => {
                        self.update(|s| s.healthy = Some(true));
                    }
                },
                () = sleep_until_opt(self.backoff_until) => self.start().await,
                () = sleep_until_opt(self.cron_at) => self.on_cron().await,
            }
        }
        // A process without a keeper cannot outlive the agent: it is stopped like at a shutdown.
        if self.shared.detach.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .proc
                .as_ref()
                .is_none_or(|r| r.process.outlives_agent())
        {
            if let Some(running) = self.proc.take() {
                self.log(
                    LogStream::System,
                    format!(
                        "the agent exits for an upgrade; pid {} keeps running under its keeper",
                        running.process.pid()
                    ),
                );
                running.process.detach();
            }
            return;
        }
        self.stop_running("supervisor shutdown or removal").await;
        self.update(|s| {
            s.state = CurrentState::Stopped;
            s.pid = None;
        });
    }

    /// Takes over the process a previous agent left: same pid, restart count and start time.
    /// It is stopped at once if it does not run the spec wanted now (or should not run).
    /// Returns true when it ended as an exit instead (it ran without a keeper), so that the
    /// restart policy, not a fresh start, decides what follows.
    async fn adopt(&mut self, orphan: Orphan) -> bool {
        let launch = orphan.record.launch.clone();
        let process = match runner::adopt(&orphan.dir, orphan.record.clone(), &self.logs) {
            Ok(process) => process,
            Err(e) => {
                let attached = orphan.record.attached;
                runner::discard(&orphan.dir, orphan.record, &self.shared.ledger).await;
                self.log(
                    LogStream::System,
                    format!("could not adopt the process left by the previous agent ({e}); what it ran was killed"),
                );
                // One that ran what is wanted now ended with the agent: an exit nobody saw
                // (a task's attempt fails; a restart policy may restart it). Otherwise what
                // is wanted now starts as usual.
                let ended = attached
                    && self.cur.running
                    && launch.generation == self.cur.generation
                    && launch.spec == self.cur.spec;
                if ended {
                    self.tracker = RestartTracker::resumed(launch.restart_count);
                    self.ended(
                        None,
                        Some("ended with the agent that ran it (outlive_agent: false)".into()),
                    )
                    .await;
                }
                return ended;
            }
        };
        let pid = process.pid();
        self.tracker = RestartTracker::resumed(launch.restart_count);
        self.tracker.on_start(self.elapsed_ms());
        self.proc = Some(self.running(process, &launch.spec, Some(launch.process.clone())));
        self.log(
            LogStream::System,
            format!("adopted pid {pid}, left running by the previous agent"),
        );
        let restarts = launch.restart_count;
        self.update(|s| {
            s.state = CurrentState::Running;
            s.pid = Some(pid);
            s.restart_count = restarts;
            s.reason = None;
            s.started_at_ms = Some(launch.started_at_ms);
        });
        if !self.cur.running {
            self.stop_running("desired state is stopped").await;
            self.update(|s| s.state = CurrentState::Stopped);
        } else if launch.spec != self.cur.spec {
            self.stop_running("spec changed while the agent was down")
                .await;
            self.tracker = RestartTracker::new();
            self.update(|s| s.restart_count = 0);
            self.backoff_until = Some(Instant::now());
        }
        false
    }

    /// A process with its health monitor (when the spec has a check).
    fn running(
        &self,
        process: RunningProcess,
        spec: &crate::spec::DeploymentSpec,
        process_spec: Option<ProcessSpec>,
    ) -> Running {
        let (verdict_tx, verdicts) = mpsc::channel(2);
        let mut health = JoinSet::new();
        if let (Some(check), Some(process_spec)) = (spec.health_check.clone(), process_spec) {
            health.spawn(health::monitor(
                check,
                process_spec,
                self.logs.clone(),
                verdict_tx,
            ));
        }
        Running {
            process,
            health,
            verdicts,
            signal: signal_or_term(spec.stop_signal),
            stop_timeout: spec.stop_timeout,
        }
    }

    /// Monotonic milliseconds since this actor started (the restart tracker's clock; not
    /// the wall clock, so a clock step cannot reset or stretch a restart window).
    fn elapsed_ms(&self) -> u64 {
        crate::time::millis(self.base.elapsed())
    }

    fn budget(&self) -> Budget {
        Budget::from_spec(&self.cur.spec)
    }

    fn log(&self, stream: LogStream, line: String) {
        tracing::debug!(deployment = %self.id, stream = stream.as_str(), %line, "lifecycle");
        self.logs.push(stream, line);
    }

    fn state(&self) -> CurrentState {
        lock(&self.status).state
    }

    /// Changes the published status and emits it as an event.
    fn update(&self, f: impl FnOnce(&mut DeploymentStatus)) {
        let snapshot = {
            let mut status = lock(&self.status);
            f(&mut status);
            if status.state != CurrentState::Backoff {
                status.restart_at_ms = None;
            }
            status.last_log_seq = self.logs.last_seq();
            status.clone()
        };
        self.shared.emit(snapshot);
    }

    /// Prepares and spawns a process for the current spec.
    async fn start(&mut self) {
        self.backoff_until = None;
        self.update(|s| {
            s.state = CurrentState::Starting;
            s.pid = None;
            s.result = None;
        });
        let spec = self.cur.spec.clone();
        // A clone, so that waiting on it leaves the change for the main loop to handle.
        let mut change = self.desired_rx.clone();
        let prepared = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return,
            _ = change.changed() => {
                // Abandon this prepare; the main loop applies the change first, then (if still
                // wanted) starts again from here.
                self.backoff_until = Some(Instant::now());
                return;
            }
            result = self.shared.hooks.prepare.prepare(&self.id, &spec, &self.logs) => result,
        };
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return self.on_start_failure(format!("prepare failed: {e}")),
        };
        let mut env = self.shared.config.node_env.clone();
        env.extend(prepared.extra_env);
        // Where the process may leave a JSON result; a previous process's is gone first.
        let output = self.shared.config.output_file(&self.id);
        if let Err(e) = clear_output(&output) {
            return self.on_start_failure(format!("prepare failed: {e}"));
        }
        env.insert(
            "SYMPHONY_OUTPUT".into(),
            output.to_string_lossy().into_owned(),
        );
        env.extend(spec.env.clone());
        let process_spec = ProcessSpec {
            command: prepared.command,
            cwd: prepared.cwd,
            env,
        };
        // Its health check runs the same way (a copy only for a deployment that has one).
        let for_health = spec.health_check.is_some().then(|| process_spec.clone());
        let launch = Launch {
            id: self.id.clone(),
            generation: self.cur.generation,
            spec: spec.clone(),
            restart_count: self.tracker.total_restarts(),
            started_at_ms: wall_ms(),
            process: process_spec,
            max_line: self.shared.config.max_line_bytes,
            outbox_bytes: self.shared.config.spool_bytes,
        };
        let started_at = launch.started_at_ms;
        let dir = self.shared.config.run_dir(&self.id);
        // The keeper's record (on disk) gets the git token sealed.
        let launch = match launch.sealed(&self.shared.config.secrets) {
            Ok(launch) => launch,
            Err(e) => return self.on_start_failure(format!("spawn failed: {e}")),
        };
        let spawned = if spec.outlive_agent {
            runner::spawn(&self.shared.config.launcher, &dir, launch, &self.logs).await
        } else {
            runner::spawn_attached(&self.shared.ledger, launch, &self.logs).await
        };
        let process = match spawned {
            Ok(process) => process,
            Err(e) => return self.on_start_failure(format!("spawn failed: {e}")),
        };
        let pid = process.pid();
        self.tracker.on_start(self.elapsed_ms());
        self.proc = Some(self.running(process, &spec, for_health));
        self.log(LogStream::System, format!("started (pid {pid})"));
        self.update(|s| {
            s.state = CurrentState::Running;
            s.pid = Some(pid);
            s.reason = None;
            s.started_at_ms = Some(started_at);
        });
    }

    fn on_start_failure(&mut self, cause: String) {
        self.log(LogStream::System, cause.clone());
        let decision = self.tracker.on_failure(self.elapsed_ms(), &self.budget());
        self.apply_decision(decision, cause);
    }

    async fn on_exit(&mut self, code: Option<i32>) {
        self.ended(code, None).await;
    }

    /// The process ended with `code`; `cause` (else the exit) is the reason reported.
    async fn ended(&mut self, code: Option<i32>, cause: Option<String>) {
        // Ends what the leader left behind in its group and drains the output first, so the
        // exit line comes after the last output line.
        if let Some(mut running) = self.proc.take() {
            running.health.abort_all();
            running
                .process
                .stop(running.signal, running.stop_timeout)
                .await;
        }
        let how = cause.unwrap_or_else(|| describe_exit_opt(code));
        match code {
            Some(code) => self.log(LogStream::System, format!("exited (code={code}, {how})")),
            None => self.log(LogStream::System, format!("exited ({how})")),
        }
        let desired = self.cur.running;
        // An exit nobody saw counts as a failure (the restart policy decides as for a crash).
        let decision = self.tracker.on_exit(
            self.elapsed_ms(),
            code.unwrap_or(-1),
            &self.budget(),
            desired,
        );
        let state = match (desired, code) {
            (false, _) => CurrentState::Stopped,
            (true, Some(0)) => CurrentState::Exited,
            (true, _) => CurrentState::Crashed,
        };
        let result = read_output(&self.shared.config.output_file(&self.id));
        self.update(|s| {
            s.state = state;
            s.pid = None;
            s.last_exit_code = code;
            s.stopped_at_ms = Some(wall_ms());
            s.reason = Some(how.clone());
            s.result = result;
        });
        self.apply_decision(decision, how);
    }

    async fn on_unhealthy(&mut self, detail: String) {
        let cause = format!("health check failed: {detail}");
        self.update(|s| {
            s.health_failures = s.health_failures.saturating_add(1);
            s.healthy = Some(false);
        });
        let decision = self.tracker.on_failure(self.elapsed_ms(), &self.budget());
        self.stop_running("failed health check").await;
        self.apply_decision(decision, cause);
    }

    fn apply_decision(&mut self, decision: Decision, cause: String) {
        match decision {
            Decision::Restart { delay } => {
                self.log(
                    LogStream::System,
                    format!("restarting in {:.3}s", delay.as_secs_f64()),
                );
                self.backoff_until = Some(Instant::now() + delay);
                let restarts = self.tracker.total_restarts();
                let at = wall_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(0));
                self.update(|s| {
                    s.state = CurrentState::Backoff;
                    s.restart_count = restarts;
                    s.reason = Some(cause);
                    s.restart_at_ms = Some(at);
                });
            }
            Decision::GiveUp { reason } => {
                let reason = format!("{reason} (last: {cause})");
                self.log(LogStream::System, format!("gave up: {reason}"));
                self.backoff_until = None;
                self.cron_at = None;
                self.update(|s| {
                    s.state = CurrentState::Failed;
                    s.reason = Some(reason);
                });
            }
            Decision::Stay => {}
        }
    }

    /// Stops the running process, if any (signal, timeout, SIGKILL of the group).
    async fn stop_running(&mut self, why: &str) {
        let Some(mut running) = self.proc.take() else {
            return;
        };
        running.health.abort_all();
        self.log(
            LogStream::System,
            format!(
                "stop requested ({why}): {} to the process group, SIGKILL after {:.3}s",
                running.signal.as_str(),
                running.stop_timeout.as_secs_f64()
            ),
        );
        self.update(|s| s.state = CurrentState::Stopping);
        let report = running
            .process
            .stop(running.signal, running.stop_timeout)
            .await;
        if report.killed {
            self.log(
                LogStream::System,
                "process group killed with SIGKILL after the stop timeout".to_owned(),
            );
        }
        let how = describe_exit_opt(report.code);
        let code = report
            .code
            .map_or_else(String::new, |c| format!("code={c}, "));
        self.log(
            LogStream::System,
            format!("exited ({code}{how} after stop request)"),
        );
        self.update(|s| {
            s.pid = None;
            s.last_exit_code = report.code;
            s.stopped_at_ms = Some(wall_ms());
            s.reason = Some(format!("{how} after stop request ({why})"));
        });
    }

    async fn on_desired(&mut self) {
        let new = self.desired_rx.borrow_and_update().clone();
        let spec_changed = new.spec != self.cur.spec;
        let newer = new.generation > self.cur.generation;
        let was_running = self.cur.running;
        self.cur = new;
        self.logs.set_limit(self.cur.spec.log_limit_lines);
        let generation = self.cur.generation;
        let fresh = spec_changed || !was_running || (newer && self.state() == CurrentState::Failed);
        if lock(&self.status).generation != generation {
            // A new generation that starts a process afresh never reports the last one's end
            // (or result) as its own: its first report says STARTING.
            let ended = matches!(
                self.state(),
                CurrentState::Exited
                    | CurrentState::Crashed
                    | CurrentState::Failed
                    | CurrentState::Stopped
            );
            let restarts = self.cur.running && fresh && ended;
            self.update(|s| {
                s.generation = generation;
                if restarts {
                    s.state = CurrentState::Starting;
                    s.result = None;
                }
            });
        }
        if spec_changed {
            self.setup_cron();
        }
        if !self.cur.running {
            self.backoff_until = None;
            self.cron_at = None;
            self.stop_running("desired state is stopped").await;
            if self.state() != CurrentState::Stopped {
                self.update(|s| {
                    s.state = CurrentState::Stopped;
                    s.reason = Some("stopped on request".to_owned());
                });
            }
            return;
        }
        if !fresh {
            return;
        }
        self.tracker = RestartTracker::new();
        self.update(|s| s.restart_count = 0);
        if spec_changed {
            self.stop_running("spec changed").await;
        }
        if self.cron_at.is_none() {
            self.arm_cron();
        }
        if self.proc.is_none() {
            self.start().await;
        }
    }

    /// Compiles the spec's `auto_restart` (if any) and arms the timer.
    fn setup_cron(&mut self) {
        self.cron = None;
        self.cron_at = None;
        let Some(auto) = &self.cur.spec.auto_restart else {
            return;
        };
        let compiled = match &self.shared.hooks.cron {
            None => Err("no cron support on this node".to_owned()),
            Some(planner) => planner(auto),
        };
        match compiled {
            Ok(next_fire) => {
                self.cron = Some(next_fire);
                self.arm_cron();
            }
            Err(e) => self.log(
                LogStream::SystemAr,
                format!("auto restart disabled due to invalid config: {e}"),
            ),
        }
    }

    fn arm_cron(&mut self) {
        self.cron_at = None;
        if !self.cur.running || self.state() == CurrentState::Failed {
            return;
        }
        let Some(next_fire) = &self.cron else {
            return;
        };
        let now = Utc::now();
        match next_fire(now) {
            Some(at) if at > now => {
                let delay = (at - now).to_std().unwrap_or_default();
                self.cron_at = Some(Instant::now() + delay);
            }
            Some(at) => {
                self.cron = None;
                self.log(
                    LogStream::SystemAr,
                    format!("auto restart disabled: next fire time {at} is not after {now}"),
                );
            }
            None => self.log(
                LogStream::SystemAr,
                "auto restart: no next fire time, schedule ended".to_owned(),
            ),
        }
    }

    async fn on_cron(&mut self) {
        self.cron_at = None;
        match self.state() {
            CurrentState::Running | CurrentState::Exited | CurrentState::Crashed => {
                self.log(
                    LogStream::SystemAr,
                    "scheduled restart triggered".to_owned(),
                );
                self.update(|s| s.cron_restarts = s.cron_restarts.saturating_add(1));
                self.stop_running("scheduled restart").await;
                self.start().await;
            }
            other => self.log(
                LogStream::SystemAr,
                format!("scheduled restart skipped (state {other:?})"),
            ),
        }
        self.arm_cron();
    }
}

/// Removes a result file left by an earlier process (none is fine).
fn clear_output(path: &std::path::Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        // One `mkdir`, which finds it there nearly always (made again if something removed it).
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => std::fs::create_dir_all(dir)?,
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What a process left in its result file: `None` when it wrote none, the JSON text, or why
/// it cannot be taken (over the size limit, not JSON, not a regular file, unreadable). At
/// most 64 KiB of a file in the node's own directory: read on the calling thread, opened
/// without blocking (a FIFO the process left there is refused, never waited on).
fn read_output(path: &std::path::Path) -> Option<Result<String, String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let max = crate::spec::MAX_RESULT_BYTES;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("$SYMPHONY_OUTPUT unreadable: {e}"))),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Some(Err("$SYMPHONY_OUTPUT is not a regular file".to_owned())),
        Err(e) => return Some(Err(format!("$SYMPHONY_OUTPUT unreadable: {e}"))),
    }
    let mut bytes = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    if let Err(e) = file.take(limit).read_to_end(&mut bytes) {
        return Some(Err(format!("$SYMPHONY_OUTPUT unreadable: {e}")));
    }
    if bytes.len() > max {
        return Some(Err(format!(
            "$SYMPHONY_OUTPUT holds over {} KiB; a result is at most that",
            max / 1024
        )));
    }
    Some(match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) => Ok(v.to_string()),
        Err(e) => Err(format!("$SYMPHONY_OUTPUT is not JSON: {e}")),
    })
}
