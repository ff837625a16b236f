//! Supervisor tests with real child processes (`/bin/sh -c`, `sleep`). They wait on the event
//! channel or on log notifications, never on fixed sleeps; every wait is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;
use crate::node::runner::process_alive;
use crate::spec::{HealthCheck, HealthProbe, RestartKind, RestartPolicy};

const WAIT: Duration = Duration::from_secs(20);

fn spec(script: &str, kind: RestartKind) -> DeploymentSpec {
    DeploymentSpec {
        capacity_requests: BTreeMap::new(),
        node_group: None,
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        env_name: None,
        git: None,
        restart_policy: RestartPolicy {
            kind,
            backoff: Duration::from_millis(10),
        },
        max_restarts: 10,
        restart_window: Duration::from_secs(300),
        log_limit_lines: 5000,
        stop_signal: 15,
        stop_timeout: Duration::from_secs(2),
        health_check: None,
        auto_restart: None,
        outlive_agent: true,
    }
}

struct Harness {
    sup: Supervisor,
    rx: mpsc::Receiver<DeploymentStatus>,
    events: Vec<DeploymentStatus>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with(Supervisor::new)
    }

    fn with_hooks(hooks: Hooks) -> Self {
        Self::with(|config| Supervisor::with_hooks(config, hooks))
    }

    fn with(
        make: impl FnOnce(SupervisorConfig) -> (Supervisor, mpsc::Receiver<DeploymentStatus>),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (sup, rx) = make(config(&dir));
        Self {
            sup,
            rx,
            events: Vec::new(),
            dir,
        }
    }

    /// Waits for an event of `id` matching `pred`; records every event seen.
    async fn until(
        &mut self,
        id: &str,
        pred: impl Fn(&DeploymentStatus) -> bool,
    ) -> DeploymentStatus {
        let wait = async {
            loop {
                let event = self.rx.recv().await.expect("event channel closed");
                self.events.push(event.clone());
                if event.id == id && pred(&event) {
                    return event;
                }
            }
        };
        match tokio::time::timeout(WAIT, wait).await {
            Ok(event) => event,
            Err(_) => panic!("timed out waiting on {id}; events: {:#?}", self.events),
        }
    }

    async fn until_state(&mut self, id: &str, state: CurrentState) -> DeploymentStatus {
        self.until(id, |s| s.state == state).await
    }

    /// Distinct consecutive states of `id` seen so far.
    fn states(&self, id: &str) -> Vec<CurrentState> {
        let mut out: Vec<CurrentState> = Vec::new();
        for e in self.events.iter().filter(|e| e.id == id) {
            if out.last() != Some(&e.state) {
                out.push(e.state);
            }
        }
        out
    }

    fn count(&self, id: &str, state: CurrentState) -> usize {
        self.states(id).iter().filter(|s| **s == state).count()
    }

    fn lines(&self, id: &str, stream: LogStream) -> Vec<String> {
        self.sup
            .logs(id)
            .unwrap()
            .since(0, 100_000)
            .into_iter()
            .filter(|e| e.stream == stream)
            .map(|e| e.line)
            .collect()
    }
}

fn config(dir: &tempfile::TempDir) -> SupervisorConfig {
    SupervisorConfig::new(
        dir.path().to_path_buf(),
        std::env::vars().collect(),
        crate::seal::SealKey::load_or_create(&dir.path().join(crate::seal::KEY_FILE)).unwrap(),
    )
}

/// Waits until a log line of `id` satisfies `pred`.
async fn until_line(sup: &Supervisor, id: &str, pred: impl Fn(&LogEntry) -> bool) -> LogEntry {
    let logs = sup.logs(id).unwrap();
    let mut rx = logs.subscribe();
    let wait = async {
        loop {
            if let Some(e) = logs.since(0, 100_000).into_iter().find(|e| pred(e)) {
                return e;
            }
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("timed out waiting for a log line")
}

async fn until_dead(pid: u32) {
    let wait = async {
        while process_alive(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("pid {pid} still alive"));
}

use crate::node::logs::LogEntry;

#[tokio::test]
async fn never_policy_reports_exit_code_and_stays_crashed() {
    let mut h = Harness::new();
    let s = spec("exit 3", RestartKind::Never);
    assert_eq!(
        h.sup.apply("d1", 1, true, s).unwrap(),
        ApplyOutcome::Created
    );
    let st = h.until_state("d1", CurrentState::Crashed).await;
    assert_eq!(st.last_exit_code, Some(3));
    assert_eq!(st.restart_count, 0);
    assert_eq!(st.reason.as_deref(), Some("exit status 3"));
    assert_eq!(
        h.states("d1"),
        [
            CurrentState::Starting,
            CurrentState::Running,
            CurrentState::Crashed
        ]
    );
    assert_eq!(h.sup.status_of("d1").unwrap().state, CurrentState::Crashed);
    let system = h.lines("d1", LogStream::System);
    assert!(system[0].starts_with("started (pid "), "{system:?}");
    assert_eq!(system[1], "exited (code=3, exit status 3)");
}

/// A process's JSON in `$SYMPHONY_OUTPUT` comes with its exit; a result over the limit, not
/// JSON or not a regular file (a FIFO) is refused with the reason; the next start does not see
/// the last one's file.
#[tokio::test]
async fn results_left_in_symphony_output_come_with_the_exit() {
    let mut h = Harness::new();
    h.sup
        .apply(
            "r",
            1,
            true,
            spec(
                r#"printf '{"loss": 0.5}' > "$SYMPHONY_OUTPUT""#,
                RestartKind::Never,
            ),
        )
        .unwrap();
    let st = h.until_state("r", CurrentState::Exited).await;
    assert_eq!(st.result, Some(Ok(r#"{"loss":0.5}"#.to_owned())));
    h.sup
        .apply(
            "r",
            2,
            true,
            spec(
                r#"test ! -e "$SYMPHONY_OUTPUT" && printf 'nope' > "$SYMPHONY_OUTPUT""#,
                RestartKind::Never,
            ),
        )
        .unwrap();
    let st = h
        .until("r", |s| {
            s.generation == 2 && s.state == CurrentState::Exited
        })
        .await;
    assert!(
        st.result
            .as_ref()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("not JSON"))),
        "{st:?}"
    );
    h.sup
        .apply(
            "big",
            1,
            true,
            spec(
                r#"head -c 70000 /dev/zero | tr '\0' 1 > "$SYMPHONY_OUTPUT""#,
                RestartKind::Never,
            ),
        )
        .unwrap();
    let st = h.until_state("big", CurrentState::Exited).await;
    assert!(
        st.result
            .as_ref()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("64 KiB"))),
        "{st:?}"
    );
    // A FIFO left there is refused, never waited on (no writer would ever come).
    h.sup
        .apply(
            "fifo",
            1,
            true,
            spec(r#"mkfifo "$SYMPHONY_OUTPUT""#, RestartKind::Never),
        )
        .unwrap();
    let st = h.until_state("fifo", CurrentState::Exited).await;
    assert!(
        st.result
            .as_ref()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("not a regular file"))),
        "{st:?}"
    );
    h.sup
        .apply("none", 1, true, spec("true", RestartKind::Never))
        .unwrap();
    assert_eq!(
        h.until_state("none", CurrentState::Exited).await.result,
        None
    );
}

#[tokio::test]
async fn on_failure_clean_exit_and_signal_exit() {
    let mut h = Harness::new();
    h.sup
        .apply("ok", 1, true, spec("exit 0", RestartKind::OnFailure))
        .unwrap();
    let st = h.until_state("ok", CurrentState::Exited).await;
    assert_eq!(st.last_exit_code, Some(0));
    h.sup
        .apply("sig", 1, true, spec("kill -TERM $$", RestartKind::Never))
        .unwrap();
    let st = h.until_state("sig", CurrentState::Crashed).await;
    assert_eq!(st.last_exit_code, Some(-15));
    assert_eq!(st.reason.as_deref(), Some("terminated by signal SIGTERM"));
    assert_eq!(h.count("ok", CurrentState::Running), 1);
}

#[tokio::test]
async fn on_failure_backs_off_exponentially_then_fails_with_reason() {
    let mut h = Harness::new();
    let mut s = spec("echo run; exit 3", RestartKind::OnFailure);
    s.max_restarts = 4;
    h.sup.apply("crash", 1, true, s).unwrap();
    let st = h.until_state("crash", CurrentState::Failed).await;
    let reason = st.reason.unwrap();
    assert!(
        reason.starts_with("max_restarts=4 in window=300s exceeded"),
        "{reason}"
    );
    assert!(reason.contains("exit status 3"), "{reason}");
    assert_eq!(st.restart_count, 4);
    assert_eq!(st.last_exit_code, Some(3));
    assert_eq!(h.count("crash", CurrentState::Running), 5);
    assert_eq!(h.count("crash", CurrentState::Backoff), 4);
    assert_eq!(h.lines("crash", LogStream::Stdout), vec!["run"; 5]);
    let delays: Vec<String> = h
        .lines("crash", LogStream::System)
        .into_iter()
        .filter_map(|l| l.strip_prefix("restarting in ").map(str::to_owned))
        .collect();
    assert_eq!(delays, ["0.010s", "0.020s", "0.040s", "0.080s"]);
    assert!(
        h.lines("crash", LogStream::System)
            .last()
            .unwrap()
            .starts_with("gave up: max_restarts=4")
    );
}

#[tokio::test]
async fn always_restarts_clean_exits() {
    let mut h = Harness::new();
    let mut s = spec("exit 0", RestartKind::Always);
    s.max_restarts = 1;
    h.sup.apply("a", 1, true, s).unwrap();
    let st = h.until_state("a", CurrentState::Failed).await;
    assert_eq!(st.last_exit_code, Some(0));
    assert_eq!(h.count("a", CurrentState::Running), 2);
    assert_eq!(
        h.states("a"),
        [
            CurrentState::Starting,
            CurrentState::Running,
            CurrentState::Exited,
            CurrentState::Backoff,
            CurrentState::Starting,
            CurrentState::Running,
            CurrentState::Exited,
            CurrentState::Failed
        ]
    );
}

#[tokio::test]
async fn stop_kills_a_term_ignoring_group_with_its_children() {
    let mut h = Harness::new();
    let mut s = spec(
        "trap '' TERM; sleep 100 & echo $!; wait",
        RestartKind::Always,
    );
    s.stop_timeout = Duration::from_millis(300);
    h.sup.apply("stubborn", 1, true, s.clone()).unwrap();
    let running = h.until_state("stubborn", CurrentState::Running).await;
    let leader = running.pid.unwrap();
    let child: u32 = until_line(&h.sup, "stubborn", |e| e.stream == LogStream::Stdout)
        .await
        .line
        .parse()
        .unwrap();
    assert!(process_alive(child));
    assert_eq!(
        h.sup.apply("stubborn", 1, false, s).unwrap(),
        ApplyOutcome::Updated
    );
    let st = h.until_state("stubborn", CurrentState::Stopped).await;
    assert_eq!(st.last_exit_code, Some(-9));
    assert!(st.pid.is_none());
    until_dead(child).await;
    until_dead(leader).await;
    let system = h.lines("stubborn", LogStream::System);
    assert!(
        system.iter().any(|l| l.starts_with("stop requested")),
        "{system:?}"
    );
    assert!(
        system
            .iter()
            .any(|l| l.contains("SIGKILL after the stop timeout"))
    );
    // Stopped on request: no restart despite the `always` policy.
    assert_eq!(h.count("stubborn", CurrentState::Running), 1);
}

#[tokio::test]
async fn a_huge_line_never_blocks_the_workload() {
    let mut h = Harness::new();
    let s = spec(
        "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo after1; echo after2 >&2; echo after3",
        RestartKind::Never,
    );
    h.sup.apply("big", 1, true, s).unwrap();
    h.until_state("big", CurrentState::Exited).await;
    let out = h.lines("big", LogStream::Stdout);
    let (tail, chunks) = out.split_last().unwrap();
    assert_eq!(tail, "after3");
    let (after1, chunks) = chunks.split_last().unwrap();
    assert_eq!(after1, "after1");
    assert_eq!(chunks.len(), 1_000_000_usize.div_ceil(16 * 1024));
    assert!(chunks.iter().all(|c| c.len() <= 16 * 1024 && !c.is_empty()));
    assert!(chunks.iter().all(|c| c.bytes().all(|b| b == b'x')));
    assert_eq!(chunks.iter().map(String::len).sum::<usize>(), 1_000_000);
    assert_eq!(h.lines("big", LogStream::Stderr), ["after2"]);
}

#[tokio::test]
async fn failing_health_checks_restart_and_share_the_budget() {
    let mut h = Harness::new();
    let mut s = spec("exec sleep 100", RestartKind::Never);
    s.max_restarts = 1;
    s.health_check = Some(HealthCheck {
        probe: HealthProbe::Exec {
            command: vec!["false".into()],
        },
        initial_delay: Duration::ZERO,
        period: Duration::from_millis(20),
        timeout: Duration::from_secs(5),
        failure_threshold: 2,
    });
    h.sup.apply("hc", 1, true, s).unwrap();
    let st = h.until_state("hc", CurrentState::Failed).await;
    let reason = st.reason.unwrap();
    assert!(
        reason.starts_with("max_restarts=1 in window=300s exceeded"),
        "{reason}"
    );
    assert!(reason.contains("health check failed"), "{reason}");
    assert_eq!(h.count("hc", CurrentState::Running), 2);
    assert_eq!(st.restart_count, 1);
    // SIGTERM from the health restart: the process did not exit on its own.
    assert_eq!(st.last_exit_code, Some(-15));
    let hc = h.lines("hc", LogStream::SystemHc);
    let failed = hc
        .iter()
        .filter(|l| l.starts_with("health check failed"))
        .count();
    assert_eq!(failed, 4, "two failures per run: {hc:?}");
}

#[tokio::test]
async fn passing_tcp_health_check_keeps_the_process() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut h = Harness::new();
    let mut s = spec("exec sleep 100", RestartKind::Never);
    s.max_restarts = 0;
    s.health_check = Some(HealthCheck {
        probe: HealthProbe::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        initial_delay: Duration::ZERO,
        period: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        failure_threshold: 1,
    });
    h.sup.apply("tcp", 1, true, s).unwrap();
    h.until_state("tcp", CurrentState::Running).await;
    until_line(&h.sup, "tcp", |e| {
        e.stream == LogStream::SystemHc && e.line == "health check passed"
    })
    .await;
    let st = h.sup.status_of("tcp").unwrap();
    assert_eq!(st.state, CurrentState::Running);
    assert_eq!(st.restart_count, 0);
    assert!(h.sup.remove("tcp").await);
    assert!(h.sup.status().is_empty());
}

#[tokio::test]
async fn cron_restarts_do_not_charge_the_budget() {
    let planner: CronPlanner = Arc::new(|auto: &AutoRestart| {
        if auto.cron == "bad" {
            return Err("bad cron".to_owned());
        }
        let next: NextFire = Arc::new(|now| Some(now + chrono::Duration::milliseconds(150)));
        Ok(next)
    });
    let work = tempfile::tempdir().unwrap();
    let mut h = Harness::with_hooks(Hooks {
        prepare: Arc::new(DefaultPrepare::new(work.path())),
        cron: Some(planner),
    });
    let mut s = spec("exec sleep 100", RestartKind::Never);
    s.max_restarts = 0;
    s.auto_restart = Some(AutoRestart {
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
    });
    h.sup.apply("cron", 1, true, s.clone()).unwrap();
    let first = h.until_state("cron", CurrentState::Running).await.pid;
    let second = h
        .until("cron", |e| {
            e.state == CurrentState::Running && e.pid != first
        })
        .await;
    assert_eq!(second.restart_count, 0);
    until_dead(first.unwrap()).await;
    let ar = h.lines("cron", LogStream::SystemAr);
    assert_eq!(
        ar.first().map(String::as_str),
        Some("scheduled restart triggered")
    );

    let mut bad = s;
    bad.auto_restart = Some(AutoRestart {
        cron: "bad".into(),
        timezone: "UTC".into(),
    });
    h.sup.apply("bad", 1, true, bad).unwrap();
    h.until_state("bad", CurrentState::Running).await;
    assert_eq!(
        h.lines("bad", LogStream::SystemAr),
        ["auto restart disabled due to invalid config: bad cron"]
    );
    h.sup.shutdown().await;
}

#[tokio::test]
async fn generations_older_ignored_newer_replace() {
    let mut h = Harness::new();
    let a = spec("exec sleep 100", RestartKind::Never);
    let b = spec("exec sleep 200", RestartKind::Never);
    h.sup.apply("g", 2, true, a.clone()).unwrap();
    let pid1 = h.until_state("g", CurrentState::Running).await.pid.unwrap();
    assert_eq!(
        h.sup.apply("g", 1, true, b.clone()).unwrap(),
        ApplyOutcome::Stale { held: 2 }
    );
    assert_eq!(
        h.sup.apply("g", 2, true, a).unwrap(),
        ApplyOutcome::Unchanged
    );
    assert_eq!(
        h.sup.apply("g", 3, true, b.clone()).unwrap(),
        ApplyOutcome::Updated
    );
    let st = h
        .until("g", |e| {
            e.state == CurrentState::Running && e.pid != Some(pid1)
        })
        .await;
    assert_eq!(st.generation, 3);
    until_dead(pid1).await;
    let seen = h.events.len();
    // A newer generation with the same spec does not restart.
    assert_eq!(
        h.sup.apply("g", 4, true, b.clone()).unwrap(),
        ApplyOutcome::Updated
    );
    h.until("g", |e| e.generation == 4).await;
    assert_eq!(
        h.sup.apply("g", 4, false, b).unwrap(),
        ApplyOutcome::Updated
    );
    h.until_state("g", CurrentState::Stopped).await;
    let later: Vec<CurrentState> = h.events[seen..].iter().map(|e| e.state).collect();
    assert_eq!(
        later,
        [
            CurrentState::Running,
            CurrentState::Stopping,
            CurrentState::Stopping,
            CurrentState::Stopped
        ],
        "generation bump, stop requested, exit recorded, stopped"
    );
    let snap = h.sup.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!((snap[0].1, snap[0].2), (4, false));
    assert!(matches!(
        h.sup
            .apply("../x", 1, true, spec("true", RestartKind::Never)),
        Err(SupervisorError::InvalidId(_))
    ));
}

/// Fails the first `fail` prepares.
struct FlakyPrepare {
    calls: AtomicU32,
    fail: u32,
    work_dir: std::path::PathBuf,
}

impl Prepare for FlakyPrepare {
    fn prepare<'a>(
        &'a self,
        _id: &'a str,
        spec: &'a DeploymentSpec,
        logs: &'a LogBuffer,
    ) -> BoxFuture<'a, Result<Prepared, String>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            logs.push(LogStream::System, format!("preparing #{n}"));
            if n <= self.fail {
                return Err(format!("boom {n}"));
            }
            Ok(Prepared {
                cwd: self.work_dir.clone(),
                command: spec.command.clone(),
                extra_env: BTreeMap::from([("EXTRA".to_owned(), "x".to_owned())]),
            })
        })
    }
}

fn flaky(fail: u32) -> Hooks {
    Hooks {
        prepare: Arc::new(FlakyPrepare {
            calls: AtomicU32::new(0),
            fail,
            work_dir: std::env::temp_dir(),
        }),
        cron: None,
    }
}

#[tokio::test]
async fn prepare_failures_are_retried_with_backoff() {
    let mut h = Harness::with_hooks(flaky(2));
    let mut s = spec("echo $EXTRA-$MINE; exec sleep 100", RestartKind::Never);
    s.env.insert("MINE".into(), "y".into());
    h.sup.apply("p", 1, true, s).unwrap();
    let st = h.until_state("p", CurrentState::Running).await;
    assert_eq!(st.restart_count, 2);
    assert_eq!(h.count("p", CurrentState::Backoff), 2);
    let system = h.lines("p", LogStream::System);
    assert!(
        system.contains(&"prepare failed: boom 1".to_owned()),
        "{system:?}"
    );
    assert!(
        system.contains(&"prepare failed: boom 2".to_owned()),
        "{system:?}"
    );
    let out = until_line(&h.sup, "p", |e| e.stream == LogStream::Stdout).await;
    assert_eq!(out.line, "x-y");
    h.sup.shutdown().await;
    assert!(matches!(
        h.sup.apply("p2", 1, true, spec("true", RestartKind::Never)),
        Err(SupervisorError::ShutDown)
    ));
}

#[tokio::test]
async fn prepare_and_spawn_failures_fail_after_the_budget() {
    let mut h = Harness::with_hooks(flaky(u32::MAX));
    let mut s = spec("true", RestartKind::Always);
    s.max_restarts = 2;
    h.sup.apply("p", 1, true, s).unwrap();
    let st = h.until_state("p", CurrentState::Failed).await;
    let reason = st.reason.unwrap();
    assert!(
        reason.starts_with("max_restarts=2 in window=300s exceeded"),
        "{reason}"
    );
    assert!(reason.contains("prepare failed: boom 3"), "{reason}");
    assert_eq!(h.count("p", CurrentState::Running), 0);

    let mut h = Harness::new();
    let mut s = spec("true", RestartKind::Never);
    s.command = vec!["/nonexistent/program".into()];
    s.max_restarts = 1;
    h.sup.apply("s", 1, true, s).unwrap();
    let st = h.until_state("s", CurrentState::Failed).await;
    let reason = st.reason.unwrap();
    assert!(reason.contains("spawn failed"), "{reason}");
    assert!(reason.contains("/nonexistent/program"), "{reason}");
    assert_eq!(h.count("s", CurrentState::Backoff), 1);
}

#[tokio::test]
async fn log_seq_increases_across_restarts_and_resumes_from_the_spool() {
    let mut h = Harness::new();
    let mut s = spec("echo a; echo b; exit 1", RestartKind::OnFailure);
    s.max_restarts = 2;
    h.sup.apply("seq", 1, true, s.clone()).unwrap();
    let st = h.until_state("seq", CurrentState::Failed).await;
    let entries = h.sup.logs("seq").unwrap().since(0, 1000);
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected);
    assert_eq!(st.last_log_seq, *seqs.last().unwrap());
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.stream == LogStream::Stdout)
            .count(),
        6
    );
    h.sup.shutdown().await;
    let last = h.sup.logs("seq").map_or(0, |l| l.last_seq());
    assert_eq!(last, 0, "the table is empty after shutdown");

    // A new supervisor on the same work dir continues the sequence.
    let (sup, mut rx) = Supervisor::new(config(&h.dir));
    sup.apply("seq", 1, true, spec("echo again", RestartKind::Never))
        .unwrap();
    let resumed_from = sup.logs("seq").unwrap().since(0, 1000);
    assert!(resumed_from.len() >= seqs.len());
    loop {
        let e = rx.recv().await.unwrap();
        if e.state == CurrentState::Exited {
            break;
        }
    }
    let logs = sup.logs("seq").unwrap();
    let fresh = logs.since(*seqs.last().unwrap(), 1000);
    assert!(!fresh.is_empty());
    assert_eq!(fresh[0].seq, seqs.last().unwrap() + 1);
    assert!(fresh.iter().any(|e| e.line == "again"));
    assert!(sup.remove("seq").await);
    assert!(!h.dir.path().join("logs").join("seq").exists());
}

#[tokio::test]
async fn stopped_desired_state_starts_later_and_shutdown_stops_all() {
    let mut h = Harness::new();
    let s = spec("exec sleep 100", RestartKind::Always);
    assert_eq!(
        h.sup.apply("x", 1, false, s.clone()).unwrap(),
        ApplyOutcome::Created
    );
    h.until_state("x", CurrentState::Stopped).await;
    assert_eq!(h.count("x", CurrentState::Running), 0);
    h.sup.apply("x", 1, true, s.clone()).unwrap();
    let x = h.until_state("x", CurrentState::Running).await.pid.unwrap();
    h.sup.apply("y", 1, true, s).unwrap();
    let y = h.until_state("y", CurrentState::Running).await.pid.unwrap();
    let mark = h.events.len();
    h.sup.shutdown().await;
    // Both were stopped in parallel; their events interleave.
    while ["x", "y"].iter().any(|id| {
        !h.events[mark..]
            .iter()
            .any(|e| e.id == *id && e.state == CurrentState::Stopped)
    }) {
        let e = h.rx.recv().await.unwrap();
        h.events.push(e);
    }
    until_dead(x).await;
    until_dead(y).await;
    assert!(h.sup.status().is_empty());
}

/// A run directory as a dead agent would have left it, naming `keeper` and `workload`.
fn left_behind(h: &Harness, id: &str, spec: &DeploymentSpec, keeper: ProcId, workload: ProcId) {
    let dir = h.dir.path().join("run").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    nix::unistd::mkfifo(
        &dir.join(crate::node::keeper::BELL),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let record = Record {
        version: crate::node::keeper::VERSION,
        launch: crate::node::keeper::Launch {
            id: id.into(),
            generation: 1,
            spec: spec.clone(),
            restart_count: 2,
            started_at_ms: 0,
            process: crate::node::runner::ProcessSpec {
                command: spec.command.clone(),
                cwd: h.dir.path().to_path_buf(),
                env: BTreeMap::new(),
            },
            max_line: 1024,
            outbox_bytes: 1 << 20,
        },
        keeper,
        workload: Some(workload),
        group: None,
        attached: false,
    };
    std::fs::write(
        dir.join(crate::node::keeper::RECORD),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
}

use std::os::unix::process::CommandExt;

use crate::node::keeper::ProcId;

/// An unrelated process (`argv`; with `own_group`, leader of its own group), and its pid as a
/// record of a long gone process would name it: same pid, another start time.
fn stranger(argv: &[&str], own_group: bool) -> (std::process::Child, ProcId) {
    #[allow(clippy::disallowed_methods)]
    let mut cmd = std::process::Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if own_group {
        cmd.process_group(0);
    }
    let child = cmd.spawn().unwrap();
    let real = ProcId::of(child.id()).unwrap();
    let recycled = ProcId {
        pid: real.pid,
        start: real.start + 1,
    };
    (child, recycled)
}

#[tokio::test]
async fn a_recycled_pid_is_never_adopted_nor_signalled() {
    let mut h = Harness::new();
    // An unrelated process, leader of its own group, now holds the pids the record names
    // (a different start time: the recorded processes are long gone).
    let (mut stranger, recycled) = stranger(&["sleep", "1000"], true);
    let pid = recycled.pid;
    let wanted_spec = spec("sleep 1000", RestartKind::Always);
    left_behind(&h, "kept", &wanted_spec, recycled, recycled);
    left_behind(&h, "dropped", &wanted_spec, recycled, recycled);
    let wanted = BTreeMap::from([("kept".to_owned(), true)]);
    // "dropped" is stopped at once; its pid names the stranger, who is left alone.
    assert_eq!(h.sup.recover(&wanted).await, vec!["kept".to_owned()]);
    assert!(!h.dir.path().join("run").join("dropped").exists());
    assert!(process_alive(pid), "the stranger was signalled");
    // "kept": the keeper is gone and nothing says how its process ended, so it is not
    // adopted; the restart policy starts a new process and the stranger is untouched.
    h.sup.apply("kept", 1, true, wanted_spec).unwrap();
    let running = h
        .until("kept", |s| {
            s.state == CurrentState::Running && s.pid.is_some_and(|p| p != pid)
        })
        .await;
    assert!(process_alive(pid), "the stranger was signalled");
    let seen: Vec<_> = h
        .events
        .iter()
        .filter(|e| e.id == "kept")
        .map(|e| (e.state, e.pid, e.last_exit_code))
        .collect();
    assert!(
        seen.contains(&(CurrentState::Crashed, None, None)),
        "the unknown exit is reported without a code: {seen:?}"
    );
    assert!(
        running.restart_count >= 3,
        "counting went on from the record"
    );
    let log: Vec<String> = h
        .sup
        .logs("kept")
        .unwrap()
        .tail(20, None)
        .into_iter()
        .map(|e| e.line)
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("exit status unknown (adopted)")),
        "{log:?}"
    );
    h.sup.shutdown().await;
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[tokio::test]
async fn a_group_id_taken_by_another_session_is_never_signalled() {
    let mut h = Harness::new();
    // An unrelated group whose leader is gone: its id P names no process, but the group lives
    // on in its member, in another session. A record that names P for a workload must not
    // reach it.
    #[allow(clippy::disallowed_methods)]
    let out = std::process::Command::new("setsid")
        .args(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $$ $!"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut ids = text.split_whitespace().map(|n| n.parse::<u32>().unwrap());
    let (leader, member) = (ids.next().unwrap(), ids.next().unwrap());
    assert!(!process_alive(leader) && process_alive(member));
    let gone = ProcId {
        pid: 999_999,
        start: 1,
    };
    let workload = ProcId {
        pid: leader,
        start: 1,
    };
    let wanted_spec = spec("sleep 1000", RestartKind::Always);
    left_behind(&h, "kept", &wanted_spec, gone, workload);
    assert_eq!(
        h.sup
            .recover(&BTreeMap::from([("kept".to_owned(), true)]))
            .await,
        vec!["kept".to_owned()]
    );
    h.sup.apply("kept", 1, true, wanted_spec).unwrap();
    h.until("kept", |s| {
        s.state == CurrentState::Running && s.pid.is_some_and(|p| p != leader)
    })
    .await;
    assert!(
        process_alive(member),
        "another session's process was signalled"
    );
    h.sup.shutdown().await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(member).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn a_recycled_session_id_is_never_killed() {
    let h = Harness::new();
    // A stranger leading its own session holds the pid a dead keeper had.
    let (mut stranger, recycled) = stranger(&["setsid", "sleep", "1000"], false);
    let pid = recycled.pid;
    // `setsid` (not a group leader here) makes its own session, then becomes `sleep`.
    let own_session = || {
        crate::node::runner::proc_stat(pid).map(|s| s.session) == Some(i32::try_from(pid).unwrap())
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !own_session() {
        assert!(std::time::Instant::now() < deadline, "setsid never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A keeper that never named its workload, and a record this version cannot read.
    for (id, json) in [
        (
            "starting",
            serde_json::json!({"version": 1, "keeper": recycled, "workload": null, "launch": null}),
        ),
        (
            "unreadable",
            serde_json::json!({"version": 99, "keeper": recycled}),
        ),
    ] {
        let dir = h.dir.path().join("run").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(crate::node::keeper::RECORD),
            serde_json::to_vec(&json).unwrap(),
        )
        .unwrap();
    }
    let wanted = BTreeMap::from([("starting".to_owned(), true)]);
    assert!(h.sup.recover(&wanted).await.is_empty());
    assert!(process_alive(pid), "a stranger's session was killed");
    assert!(!h.dir.path().join("run").join("starting").exists());
    h.sup.shutdown().await;
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

/// `outlive_agent: false`: no keeper; the agent runs the process as its own child, with its
/// output, its exit code and a record (marked attached) while it runs.
#[tokio::test]
async fn a_process_without_a_keeper_is_the_agents_child_with_its_output_and_exit() {
    let mut h = Harness::new();
    let mut s = spec(
        r#"echo out; echo err >&2; printf '{"a": 1}' > "$SYMPHONY_OUTPUT"; exit 3"#,
        RestartKind::Never,
    );
    s.outlive_agent = false;
    h.sup.apply("job", 1, true, s).unwrap();
    let st = h.until_state("job", CurrentState::Crashed).await;
    assert_eq!(st.last_exit_code, Some(3));
    assert_eq!(h.lines("job", LogStream::Stdout), ["out"]);
    assert_eq!(h.lines("job", LogStream::Stderr), ["err"]);
    let system = h.lines("job", LogStream::System);
    assert!(
        system.iter().any(|l| l.starts_with("exited (code=3")),
        "{system:?}"
    );
    assert!(!h.dir.path().join("run").join("job").exists());

    let mut s = spec("exec sleep 1000", RestartKind::Never);
    s.outlive_agent = false;
    h.sup.apply("long", 1, true, s).unwrap();
    let st = h.until_state("long", CurrentState::Running).await;
    let pid = st.pid.unwrap();
    // No run directory: the ledger has it.
    assert!(!h.dir.path().join("run").join("long").exists());
    let record = ledger_live(h.dir.path()).remove("long").unwrap();
    assert!(record.attached);
    assert_eq!(record.keeper.pid, std::process::id());
    assert_eq!(record.workload.map(|w| w.pid), Some(pid));
    assert_eq!(record.group.map(|g| g.pgid), i32::try_from(pid).ok());
    // Its environment is not written down (the first one's `$SYMPHONY_OUTPUT` shows that a
    // process gets one).
    assert!(record.launch.process.env.is_empty());
    let kept = h.dir.path().join("deployments").join("job");
    std::fs::write(kept.join("user-file"), "mine").unwrap();
    assert!(h.sup.remove("long").await);
    assert!(!process_alive(pid));
    assert!(
        ledger_live(h.dir.path()).is_empty(),
        "its end is written down"
    );
    // Its empty working directory stays as a spare: the next deployment's, renamed.
    let spare = h.dir.path().join("deployments").join("long");
    assert_eq!(std::fs::read_dir(&spare).unwrap().count(), 0);
    let mut s = spec("exit 0", RestartKind::Never);
    s.outlive_agent = false;
    h.sup.apply("next", 1, true, s).unwrap();
    h.until_state("next", CurrentState::Exited).await;
    assert!(!spare.exists());
    assert!(h.dir.path().join("deployments").join("next").is_dir());
    let output = h.dir.path().join("outputs").join("job.json");
    assert!(output.exists());
    assert!(h.sup.remove("job").await);
    assert!(
        kept.join("user-file").exists(),
        "a working dir with files stays"
    );
    assert!(!output.exists());
    h.sup.shutdown().await;
}

/// What the node's ledger of processes run without a keeper names live, read from a copy (the
/// supervisor keeps its file open).
fn ledger_live(work_dir: &std::path::Path) -> BTreeMap<String, Record> {
    let copy = tempfile::tempdir().unwrap();
    let file = crate::node::runner::ledger::FILE;
    std::fs::copy(work_dir.join(file), copy.path().join(file)).unwrap();
    crate::node::runner::ledger::Ledger::new(copy.path()).recover()
}

/// What a previous agent ran without a keeper is ended by the next one, never adopted: a
/// wanted one ends as an exit nobody saw (no code; a task's attempt fails), with a reason; an
/// unwanted one is just ended. Written down in the ledger, or (by an earlier version) in a
/// run directory.
#[tokio::test]
async fn a_process_a_previous_agent_ran_without_a_keeper_is_ended_not_adopted() {
    for in_ledger in [true, false] {
        let mut h = Harness::new();
        let gone = ProcId {
            pid: 999_999,
            start: 1,
        };
        let mut wanted_spec = spec("exec sleep 1000", RestartKind::Never);
        wanted_spec.outlive_agent = false;
        let mut children = Vec::new();
        for id in ["task", "dropped"] {
            #[allow(clippy::disallowed_methods)]
            let child = std::process::Command::new("sleep")
                .arg("1000")
                .process_group(0)
                .spawn()
                .unwrap();
            let workload = ProcId::of(child.id()).unwrap();
            left_behind(&h, id, &wanted_spec, gone, workload);
            let dir = h.dir.path().join("run").join(id);
            let mut record = Record::load(&dir).unwrap();
            record.attached = true;
            record.group = crate::node::runner::Group::led_by(child.id());
            if in_ledger {
                std::fs::remove_dir_all(&dir).unwrap();
                crate::node::runner::ledger::Ledger::new(h.dir.path())
                    .started(id, &record)
                    .unwrap();
            } else {
                std::fs::write(
                    dir.join(crate::node::keeper::RECORD),
                    serde_json::to_vec(&record).unwrap(),
                )
                .unwrap();
            }
            children.push(child);
        }
        let wanted = BTreeMap::from([("task".to_owned(), true)]);
        assert_eq!(h.sup.recover(&wanted).await, vec!["task".to_owned()]);
        // The unwanted one is ended at once.
        let status = children[1].wait().unwrap();
        assert!(!status.success());
        assert!(!h.dir.path().join("run").join("dropped").exists());

        h.sup.apply("task", 1, true, wanted_spec).unwrap();
        let st = h.until_state("task", CurrentState::Crashed).await;
        assert_eq!(st.last_exit_code, None);
        let reason = st.reason.unwrap_or_default();
        assert!(reason.contains("outlive_agent: false"), "{reason}");
        let status = children[0].wait().unwrap();
        assert!(!status.success(), "the left process was ended");
        assert_eq!(h.count("task", CurrentState::Running), 0, "never adopted");
        assert!(!h.dir.path().join("run").join("task").exists());
        if in_ledger {
            assert!(
                ledger_live(h.dir.path()).is_empty(),
                "both ended in the ledger"
            );
        }
        h.sup.shutdown().await;
    }
}

/// Live processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            }) && process_alive(*pid)
        })
        .collect()
}

/// A shutdown while processes are starting (with and without keepers) leaves none behind:
/// a start in flight finishes, and its process is stopped with the rest.
#[tokio::test]
async fn a_shutdown_racing_starts_leaves_no_process_behind() {
    for pause_ms in [0, 1, 3, 10] {
        let h = Harness::new();
        for i in 0..16 {
            let mut s = spec("exec sleep 424271", RestartKind::Always);
            s.outlive_agent = i % 2 == 0;
            h.sup.apply(&format!("race{i}"), 1, true, s).unwrap();
        }
        // Some have started, some are starting, some have not begun.
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        h.sup.shutdown().await;
        let left = processes_with("sleep 424271");
        assert!(left.is_empty(), "left behind after {pause_ms} ms: {left:?}");
        assert!(h.sup.status().is_empty());
    }
}
