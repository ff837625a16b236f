//! Workflow runs: the state of one run (its tasks, their attempts and results) and the pure
//! rules that move it (which tasks are ready, what a finished attempt means, how a failure
//! propagates), and the high/low water marks that admit queued runs. No IO, no clock (times
//! come in as arguments); the core applies the decisions and persists the run as one document.
//!
//! Unlike the seed's library: a failed task never leaves its run hanging (its dependents are
//! marked `UPSTREAM_FAILED` and the run ends once nothing else can run), queued runs start in
//! FIFO order, and once running runs drop below the low mark the queue refills up to the high
//! mark (not one at a time).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{Retries, Workflow};

/// A run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    /// Waiting under its workflow's water marks.
    Queued,
    Running,
    Succeeded,
    /// Some task failed (the rest finished or never ran).
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "QUEUED",
            RunState::Running => "RUNNING",
            RunState::Succeeded => "SUCCEEDED",
            RunState::Failed => "FAILED",
            RunState::Cancelled => "CANCELLED",
        }
    }
}

/// A task's state in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Its dependencies have not all succeeded yet.
    Waiting,
    /// An attempt is placed or running.
    Running,
    /// An attempt failed; the next starts at `retry_at_ms`.
    Retrying,
    Succeeded,
    /// Its last attempt failed.
    Failed,
    /// A dependency failed: it never runs.
    UpstreamFailed,
    /// The run was cancelled before it finished.
    Cancelled,
}

impl TaskState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::UpstreamFailed
                | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "WAITING",
            TaskState::Running => "RUNNING",
            TaskState::Retrying => "RETRYING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::UpstreamFailed => "UPSTREAM_FAILED",
            TaskState::Cancelled => "CANCELLED",
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// A non-zero exit code, or a signal (negative), or a start that failed (`None`).
    Failed {
        exit_code: Option<i32>,
    },
    /// Its node was lost or revoked while it ran.
    NodeLost,
    /// It ran past `timeout_sec` and was stopped.
    Timeout,
    /// Stopped by a cancel.
    Cancelled,
}

/// One attempt of a task: one placement, with its own generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based (`SYMPHONY_ATTEMPT`).
    pub number: u32,
    pub node_id: Option<String>,
    pub generation: Option<u64>,
    pub started_at_ms: i64,
    /// When it was placed on its node: its `timeout_sec` counts from here, not from while it
    /// waited for a node. Not written for the placement alone: a restarted conductor that
    /// finds it placed (by its assignment) but not written counts from its own start.
    #[serde(default)]
    pub placed_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub outcome: Option<Outcome>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    pub name: String,
    /// The declared name (shared by `for_each` items).
    pub group: String,
    /// Indexes of the tasks it waits for.
    pub depends_on: Vec<usize>,
    pub state: TaskState,
    /// The deployment its attempts run as (made when it first becomes ready).
    pub deployment_id: Option<String>,
    pub attempts: Vec<Attempt>,
    /// When a `Retrying` task's next attempt starts.
    pub retry_at_ms: Option<i64>,
    /// What it wrote to `$SYMPHONY_OUTPUT` (JSON), once it succeeded.
    pub result: Option<Value>,
    /// Why it failed, was cancelled, or never ran.
    pub reason: Option<String>,
    pub retries: Retries,
    pub timeout_sec: Option<f64>,
    /// Attempts made before the run's last retry: its `retries` count from here, so a retried
    /// run gives a task that used them all its full count again.
    #[serde(default)]
    pub attempt_base: u32,
}

/// One run of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    /// FIFO position among its workflow's runs.
    pub seq: u64,
    pub params: BTreeMap<String, String>,
    pub state: RunState,
    pub fail_fast: bool,
    pub queued_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub reason: Option<String>,
    pub tasks: Vec<TaskRun>,
}

/// What the core does after a task's attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterAttempt {
    /// Its dependents may be ready: call [`Run::ready`].
    Succeeded,
    /// The next attempt starts at this time.
    Retry { at_ms: i64 },
    /// It failed for good; these tasks' running attempts must be stopped (`fail_fast`).
    Failed { stop: Vec<usize> },
}

impl Run {
    /// A queued run of `w` (its tasks waiting).
    pub fn new(
        id: String,
        w: &Workflow,
        version: u32,
        seq: u64,
        params: BTreeMap<String, String>,
        now_ms: i64,
    ) -> Run {
        let index: BTreeMap<&str, usize> = w
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let tasks = w
            .tasks
            .iter()
            .map(|t| TaskRun {
                name: t.name.clone(),
                group: t.group.clone(),
                depends_on: t
                    .depends_on
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect(),
                state: TaskState::Waiting,
                deployment_id: None,
                attempts: Vec::new(),
                retry_at_ms: None,
                result: None,
                reason: None,
                retries: t.retries.clone(),
                timeout_sec: t.timeout_sec,
                attempt_base: 0,
            })
            .collect();
        Run {
            id,
            workflow: w.name.clone(),
            version,
            seq,
            params,
            state: RunState::Queued,
            fail_fast: w.fail_fast,
            queued_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            reason: None,
            tasks,
        }
    }

    /// Waiting tasks whose dependencies all succeeded (none while the run is not running).
    pub fn ready(&self) -> Vec<usize> {
        if self.state != RunState::Running {
            return Vec::new();
        }
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TaskState::Waiting)
            .filter(|(_, t)| {
                t.depends_on
                    .iter()
                    .all(|&d| self.tasks[d].state == TaskState::Succeeded)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Retrying tasks whose time has come.
    pub fn due_retries(&self, now_ms: i64) -> Vec<usize> {
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                t.state == TaskState::Retrying && t.retry_at_ms.is_some_and(|at| at <= now_ms)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Starts attempt `n + 1` of task `i` (it is `Running` from now on).
    pub fn start_attempt(&mut self, i: usize, now_ms: i64) -> u32 {
        let t = &mut self.tasks[i];
        let number = u32::try_from(t.attempts.len()).unwrap_or(u32::MAX - 1) + 1;
        t.attempts.push(Attempt {
            number,
            node_id: None,
            generation: None,
            started_at_ms: now_ms,
            placed_at_ms: None,
            finished_at_ms: None,
            outcome: None,
            exit_code: None,
            reason: None,
        });
        t.state = TaskState::Running;
        t.retry_at_ms = None;
        number
    }

    /// Records where the current attempt of task `i` was placed, at `now_ms`.
    pub fn placed(&mut self, i: usize, node_id: &str, generation: u64, now_ms: i64) -> bool {
        let Some(a) = self.tasks[i].attempts.last_mut() else {
            return false;
        };
        if a.finished_at_ms.is_some()
            || (a.node_id.as_deref() == Some(node_id) && a.generation == Some(generation))
        {
            return false;
        }
        a.node_id = Some(node_id.to_owned());
        a.generation = Some(generation);
        a.placed_at_ms = Some(now_ms);
        true
    }

    /// Task `i`'s current attempt ended with `outcome`: records it, and decides (retry with
    /// backoff, success, or failure with propagation). `jitter` in [0, 1) spreads retries.
    pub fn finish_attempt(
        &mut self,
        i: usize,
        outcome: Outcome,
        reason: Option<String>,
        result: Option<Value>,
        now_ms: i64,
        jitter: f64,
    ) -> AfterAttempt {
        let t = &mut self.tasks[i];
        // This try's attempts (a retried run starts counting again).
        let attempts = u32::try_from(t.attempts.len())
            .unwrap_or(u32::MAX)
            .saturating_sub(t.attempt_base);
        if let Some(a) = t.attempts.last_mut() {
            a.finished_at_ms = Some(now_ms);
            a.outcome = Some(outcome);
            a.exit_code = match outcome {
                Outcome::Succeeded => Some(0),
                Outcome::Failed { exit_code } => exit_code,
                _ => None,
            };
            a.reason.clone_from(&reason);
        }
        if outcome == Outcome::Succeeded {
            t.state = TaskState::Succeeded;
            t.result = result;
            t.reason = None;
            return AfterAttempt::Succeeded;
        }
        let on = &t.retries.retry_on;
        let retryable = match outcome {
            Outcome::Failed { exit_code } => {
                on.failure
                    && (on.exit_codes.is_empty()
                        || exit_code.is_some_and(|c| on.exit_codes.contains(&c)))
            }
            Outcome::NodeLost => on.node_lost,
            Outcome::Timeout => on.timeout,
            Outcome::Succeeded | Outcome::Cancelled => false,
        };
        t.reason = reason;
        if retryable && attempts < t.retries.max_attempts && self.state == RunState::Running {
            // backoff * 2^(n-1), capped, plus up to 50 % jitter.
            let exp = i32::try_from(attempts.saturating_sub(1).min(30)).unwrap_or(30);
            let base = (t.retries.backoff_sec * 2f64.powi(exp)).min(t.retries.max_backoff_sec);
            let delay = base * (1.0 + 0.5 * jitter.clamp(0.0, 1.0));
            #[allow(clippy::cast_possible_truncation)]
            let at_ms = now_ms.saturating_add((delay * 1000.0) as i64);
            t.state = TaskState::Retrying;
            t.retry_at_ms = Some(at_ms);
            return AfterAttempt::Retry { at_ms };
        }
        t.state = if outcome == Outcome::Cancelled {
            TaskState::Cancelled
        } else {
            TaskState::Failed
        };
        let failed = self.tasks[i].name.clone();
        self.propagate(i, &failed);
        let stop = if self.fail_fast && outcome != Outcome::Cancelled {
            self.reason = Some(format!("task {failed} failed (fail_fast)"));
            self.cancel_rest(&format!("cancelled: task {failed} failed (fail_fast)"))
        } else {
            Vec::new()
        };
        AfterAttempt::Failed { stop }
    }

    /// Marks every task downstream of `i` that has not run `UPSTREAM_FAILED`.
    fn propagate(&mut self, i: usize, failed: &str) {
        let mut bad: BTreeSet<usize> = BTreeSet::from([i]);
        // Tasks are in a topological order: one forward pass reaches every descendant.
        for k in 0..self.tasks.len() {
            if self.tasks[k].depends_on.iter().any(|d| bad.contains(d)) {
                bad.insert(k);
                let t = &mut self.tasks[k];
                if t.state == TaskState::Waiting {
                    t.state = TaskState::UpstreamFailed;
                    t.reason = Some(format!("upstream task {failed} failed"));
                }
            }
        }
    }

    /// Cancels every task not done: waiting and retrying ones at once; returns the running
    /// ones, whose attempts the caller stops (then reports them `Cancelled`).
    pub fn cancel_rest(&mut self, reason: &str) -> Vec<usize> {
        let mut running = Vec::new();
        for (k, t) in self.tasks.iter_mut().enumerate() {
            match t.state {
                TaskState::Waiting | TaskState::Retrying => {
                    t.state = TaskState::Cancelled;
                    t.retry_at_ms = None;
                    t.reason = Some(reason.to_owned());
                }
                TaskState::Running => running.push(k),
                _ => {}
            }
        }
        running
    }

    /// Ends the run once nothing can run any more; returns whether it just ended.
    pub fn settle(&mut self, now_ms: i64) -> bool {
        if self.state.is_done() || self.state == RunState::Queued {
            return false;
        }
        if !self.tasks.iter().all(|t| t.state.is_done()) {
            return false;
        }
        self.state = if self.tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            RunState::Succeeded
        } else if self
            .tasks
            .iter()
            .any(|t| matches!(t.state, TaskState::Failed | TaskState::UpstreamFailed))
        {
            RunState::Failed
        } else {
            RunState::Cancelled
        };
        self.finished_at_ms = Some(now_ms);
        true
    }

    /// What task `i` receives in `$SYMPHONY_INPUTS`: each dependency's result by its
    /// declared name (a list for the items of a `for_each`).
    pub fn inputs(&self, i: usize) -> Value {
        let mut out = serde_json::Map::new();
        for &d in &self.tasks[i].depends_on {
            let t = &self.tasks[d];
            let r = t.result.clone().unwrap_or(Value::Null);
            if t.name == t.group {
                out.insert(t.group.clone(), r);
            } else {
                let slot = out
                    .entry(t.group.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(items) = slot {
                    items.push(r);
                }
            }
        }
        Value::Object(out)
    }

    /// Makes a finished run run again from its failed part: failed, upstream-failed and
    /// cancelled tasks wait again (their attempts kept); succeeded ones keep their results.
    /// `false` when the run is not finished or nothing failed.
    pub fn retry(&mut self, now_ms: i64) -> bool {
        if !matches!(self.state, RunState::Failed | RunState::Cancelled) {
            return false;
        }
        for t in &mut self.tasks {
            if matches!(
                t.state,
                TaskState::Failed | TaskState::UpstreamFailed | TaskState::Cancelled
            ) {
                t.state = TaskState::Waiting;
                t.reason = None;
                t.retry_at_ms = None;
                t.attempt_base = u32::try_from(t.attempts.len()).unwrap_or(u32::MAX);
            }
        }
        self.state = RunState::Queued;
        self.queued_at_ms = now_ms;
        self.finished_at_ms = None;
        self.reason = None;
        true
    }

    /// `(done, total, running, failed)` tasks, for progress.
    pub fn progress(&self) -> (usize, usize, usize, usize) {
        let done = self.tasks.iter().filter(|t| t.state.is_done()).count();
        let running = self
            .tasks
            .iter()
            .filter(|t| matches!(t.state, TaskState::Running | TaskState::Retrying))
            .count();
        let failed = self
            .tasks
            .iter()
            .filter(|t| matches!(t.state, TaskState::Failed | TaskState::UpstreamFailed))
            .count();
        (done, self.tasks.len(), running, failed)
    }
}

/// A workflow's water marks: at `high` running runs new ones queue; once running runs fall
/// below `low` the queue refills up to `high` (FIFO); in between, admission stays paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Marks {
    pub high: Option<u32>,
    pub low: Option<u32>,
}

impl Marks {
    /// How many queued runs to start now, and whether admission is paused after that.
    /// `paused` is the state so far (set when `high` was reached, cleared below `low`).
    pub fn admit(self, running: usize, queued: usize, paused: bool) -> (usize, bool) {
        let Some(high) = self.high.map(|h| h as usize) else {
            return (queued, false);
        };
        let low = self.low.map_or(high, |l| l as usize);
        let paused = if paused {
            running >= low
        } else {
            running >= high
        };
        if paused {
            return (0, true);
        }
        let start = queued.min(high.saturating_sub(running));
        (start, running + start >= high)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::spec::parse_workflow;

    fn diamond(extra: Value) -> Run {
        let mut def = json!({"name": "diamond", "tasks": [
            {"name": "a", "config": {"command": ["true"]}},
            {"name": "b", "depends_on": ["a"], "config": {"command": ["true"]}, "retries": 3,
             "retry_on": [75]},
            {"name": "c", "depends_on": ["a"], "config": {"command": ["true"]}},
            {"name": "d", "depends_on": ["b", "c"], "config": {"command": ["true"]}},
        ]});
        if let (Value::Object(d), Value::Object(e)) = (&mut def, extra) {
            d.extend(e);
        }
        let w = parse_workflow(&def).unwrap();
        let mut r = Run::new("r1".into(), &w, 1, 1, BTreeMap::new(), 0);
        r.state = RunState::Running;
        r
    }

    fn names(r: &Run, idx: &[usize]) -> Vec<String> {
        idx.iter().map(|&i| r.tasks[i].name.clone()).collect()
    }

    fn states(r: &Run) -> Vec<&'static str> {
        r.tasks.iter().map(|t| t.state.as_str()).collect()
    }

    #[test]
    fn the_diamond_runs_in_dependency_order_and_results_flow() {
        let mut r = diamond(json!({}));
        assert_eq!(names(&r, &r.ready()), ["a"]);
        r.start_attempt(0, 1);
        assert!(r.ready().is_empty());
        let after = r.finish_attempt(0, Outcome::Succeeded, None, Some(json!({"n": 1})), 2, 0.0);
        assert_eq!(after, AfterAttempt::Succeeded);
        assert_eq!(names(&r, &r.ready()), ["b", "c"]);
        for i in [1, 2] {
            r.start_attempt(i, 3);
            r.finish_attempt(i, Outcome::Succeeded, None, Some(json!(i)), 4, 0.0);
        }
        assert_eq!(names(&r, &r.ready()), ["d"]);
        assert_eq!(r.inputs(3), json!({"b": 1, "c": 2}));
        assert_eq!(r.inputs(1), json!({"a": {"n": 1}}));
        r.start_attempt(3, 5);
        assert!(!r.settle(5));
        r.finish_attempt(3, Outcome::Succeeded, None, None, 6, 0.0);
        assert!(r.settle(6));
        assert_eq!(r.state, RunState::Succeeded);
        assert_eq!(r.progress(), (4, 4, 0, 0));
    }

    #[test]
    fn a_failure_marks_dependents_upstream_failed_while_other_branches_finish() {
        let mut r = diamond(json!({}));
        r.start_attempt(0, 0);
        r.finish_attempt(0, Outcome::Succeeded, None, None, 1, 0.0);
        r.start_attempt(1, 1);
        r.start_attempt(2, 1);
        // b exits 1 (not in retry_on [75]): failed at once, d never runs; c goes on.
        let after = r.finish_attempt(
            1,
            Outcome::Failed { exit_code: Some(1) },
            Some("exit 1".into()),
            None,
            2,
            0.0,
        );
        assert_eq!(after, AfterAttempt::Failed { stop: vec![] });
        assert_eq!(
            states(&r),
            ["SUCCEEDED", "FAILED", "RUNNING", "UPSTREAM_FAILED"]
        );
        assert!(!r.settle(2), "c still runs");
        r.finish_attempt(2, Outcome::Succeeded, None, None, 3, 0.0);
        assert!(r.settle(3));
        assert_eq!(r.state, RunState::Failed);
        assert_eq!(r.tasks[3].reason.as_deref(), Some("upstream task b failed"));
        // Retried from its failed part: b and d wait again, a and c keep their results.
        assert!(r.retry(4));
        assert_eq!(r.state, RunState::Queued);
        r.state = RunState::Running;
        assert_eq!(names(&r, &r.ready()), ["b"]);
    }

    #[test]
    fn retries_back_off_up_to_max_attempts_and_only_on_what_retry_on_names() {
        let mut r = diamond(json!({}));
        r.start_attempt(0, 0);
        r.finish_attempt(0, Outcome::Succeeded, None, None, 0, 0.0);
        r.start_attempt(1, 0);
        let after = r.finish_attempt(
            1,
            Outcome::Failed {
                exit_code: Some(75),
            },
            None,
            None,
            1000,
            0.0,
        );
        assert_eq!(after, AfterAttempt::Retry { at_ms: 2000 });
        assert!(r.due_retries(1999).is_empty());
        assert_eq!(r.due_retries(2000), [1]);
        assert_eq!(r.start_attempt(1, 2000), 2);
        // Second backoff doubles; jitter adds up to half.
        let after = r.finish_attempt(
            1,
            Outcome::Failed {
                exit_code: Some(75),
            },
            None,
            None,
            3000,
            1.0,
        );
        assert_eq!(after, AfterAttempt::Retry { at_ms: 6000 });
        assert_eq!(r.start_attempt(1, 6000), 3);
        // The third failure is the last attempt.
        let after = r.finish_attempt(
            1,
            Outcome::Failed {
                exit_code: Some(75),
            },
            None,
            None,
            7000,
            0.0,
        );
        assert_eq!(after, AfterAttempt::Failed { stop: vec![] });
        assert_eq!(r.tasks[1].attempts.len(), 3);
        // A lost node is retried by default (c has no retries: it fails).
        r.start_attempt(2, 0);
        let after = r.finish_attempt(2, Outcome::NodeLost, None, None, 1, 0.0);
        assert_eq!(after, AfterAttempt::Failed { stop: vec![] });
    }

    /// A retried run gives a task that used all its attempts its full count again, with the
    /// first backoff; attempt numbers go on.
    #[test]
    fn a_retried_run_gives_each_task_its_retries_again() {
        let mut r = diamond(json!({}));
        r.start_attempt(0, 0);
        r.finish_attempt(0, Outcome::Succeeded, None, None, 0, 0.0);
        let fail = Outcome::Failed {
            exit_code: Some(75),
        };
        for n in 1..=3 {
            r.start_attempt(1, 0);
            r.finish_attempt(1, fail, None, None, 0, 0.0);
            assert_eq!(r.tasks[1].attempts.len(), n);
        }
        r.start_attempt(2, 0);
        r.finish_attempt(2, Outcome::Succeeded, None, None, 0, 0.0);
        assert!(r.settle(0));
        assert_eq!(r.state, RunState::Failed);
        assert!(r.retry(10_000));
        r.state = RunState::Running;
        assert_eq!(r.ready(), [1]);
        assert_eq!(r.start_attempt(1, 10_000), 4);
        let after = r.finish_attempt(1, fail, None, None, 11_000, 0.0);
        assert_eq!(after, AfterAttempt::Retry { at_ms: 12_000 });
        assert_eq!(r.start_attempt(1, 12_000), 5);
        let after = r.finish_attempt(1, fail, None, None, 13_000, 0.0);
        assert_eq!(after, AfterAttempt::Retry { at_ms: 15_000 });
        assert_eq!(r.start_attempt(1, 15_000), 6);
        let after = r.finish_attempt(1, fail, None, None, 16_000, 0.0);
        assert_eq!(after, AfterAttempt::Failed { stop: vec![] });
    }

    #[test]
    fn fail_fast_cancels_the_rest_and_names_the_running_to_stop() {
        let mut r = diamond(json!({"fail_fast": true}));
        r.start_attempt(0, 0);
        r.finish_attempt(0, Outcome::Succeeded, None, None, 0, 0.0);
        r.start_attempt(1, 0);
        r.start_attempt(2, 0);
        let after = r.finish_attempt(2, Outcome::Timeout, None, None, 1, 0.0);
        assert_eq!(after, AfterAttempt::Failed { stop: vec![1] });
        assert_eq!(
            states(&r),
            ["SUCCEEDED", "RUNNING", "FAILED", "UPSTREAM_FAILED"]
        );
        r.finish_attempt(
            1,
            Outcome::Cancelled,
            Some("cancelled".into()),
            None,
            2,
            0.0,
        );
        assert!(r.settle(2));
        assert_eq!(r.state, RunState::Failed);
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|s| s.contains("task c failed"))
        );
    }

    #[test]
    fn for_each_results_arrive_as_a_list() {
        let w = parse_workflow(&json!({"name": "s", "tasks": [
            {"name": "t", "for_each": [1, 2], "config": {"command": ["true"]}},
            {"name": "sum", "depends_on": ["t"], "config": {"command": ["true"]}}]}))
        .unwrap();
        let mut r = Run::new("r".into(), &w, 1, 1, BTreeMap::new(), 0);
        r.state = RunState::Running;
        for i in [0, 1] {
            r.start_attempt(i, 0);
            r.finish_attempt(i, Outcome::Succeeded, None, Some(json!(i * 10)), 0, 0.0);
        }
        assert_eq!(r.inputs(2), json!({"t": [0, 10]}));
    }

    #[test]
    fn water_marks_queue_at_high_and_refill_below_low_in_fifo_order() {
        let m = Marks {
            high: Some(3),
            low: Some(1),
        };
        // (running, queued, paused) -> (start, paused)
        let table = [
            ((0, 5, false), (3, true)),
            ((3, 2, true), (0, true)),
            ((2, 2, true), (0, true)),  // between the marks: still paused
            ((1, 2, true), (0, true)),  // at low: not below it
            ((0, 2, true), (2, false)), // below low: refill up to high (2 queued)
            ((0, 5, true), (3, true)),
            ((1, 0, false), (0, false)),
            ((2, 1, false), (1, true)),
        ];
        for ((running, queued, paused), want) in table {
            assert_eq!(
                m.admit(running, queued, paused),
                want,
                "running {running}, queued {queued}, paused {paused}"
            );
        }
        let none = Marks::default();
        assert_eq!(none.admit(100, 7, false), (7, false));
        let high_only = Marks {
            high: Some(2),
            low: None,
        };
        assert_eq!(high_only.admit(1, 3, true), (1, true));
    }
}
