//! The core's workflows and runs: defining a workflow (versioned), starting, cancelling and
//! retrying runs, admitting queued runs under the water marks, starting ready tasks as
//! deployments, and turning each attempt's end (exit, result, lost node, timeout) into the
//! run's next step. The rules are [`crate::conductor::runs`] (pure); this applies them.
//!
//! A task runs as one deployment (made when it first becomes ready, restart policy `never`);
//! each attempt is a placement with a fresh generation, its spec carrying `SYMPHONY_ATTEMPT`.
//! The scheduler sees a task's deployment as wanted only while its current attempt has not
//! ended, so capacity is held exactly that long, and a copy on a lost node is never placed
//! again without counting as an attempt. Run changes of a batch are written with the task
//! deployments they create or change in one transaction, before anything is placed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Core, CoreError, now_ms, parse_spec};
use crate::conductor::events::{NewEvent, object};
use crate::conductor::runs::{AfterAttempt, Marks, Outcome, Run, RunState, TaskRun, TaskState};
use crate::conductor::store::{DeploymentRecord, RunsWrite, StoreError, WorkflowRecord};
use crate::model::{CurrentState, DesiredState};
use crate::spec::Workflow;
use crate::wire;

/// What the core keeps of one workflow version.
#[derive(Debug, Clone)]
pub(crate) struct WorkflowVersion {
    pub record: WorkflowRecord,
    pub parsed: Arc<Workflow>,
    /// Each task's spec parsed once (as `parse_spec` gives it), in the order of `tasks`: an
    /// attempt's spec is this with its `SYMPHONY_*` variables, not a new parse.
    pub specs: Arc<Vec<Result<crate::spec::DeploymentSpec, String>>>,
    /// The definition as the API shows it (secrets masked), made once.
    pub masked: Arc<Value>,
}

impl WorkflowVersion {
    fn new(record: WorkflowRecord, parsed: Workflow) -> Self {
        let specs = parsed
            .tasks
            .iter()
            .map(|t| parse_spec(&json!({ "spec": t.spec })))
            .collect();
        Self {
            masked: Arc::new(crate::spec::mask_declaration(&record.definition)),
            record,
            parsed: Arc::new(parsed),
            specs: Arc::new(specs),
        }
    }
}

/// A workflow as the API shows it: its newest version, masked, with its runs counted.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkflowInfo {
    pub name: String,
    pub version: u32,
    pub definition: Arc<Value>,
    pub max_running: Option<u32>,
    pub resume_below: Option<u32>,
    pub fail_fast: bool,
    pub tasks: usize,
    pub created_at_ms: i64,
    pub running: usize,
    pub queued: usize,
    /// When its cron schedule starts the next run (Unix ms), if it has one.
    pub next_run_at_ms: Option<i64>,
}

/// The runs' part of the core's state.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    /// Every version of each workflow.
    pub workflows: BTreeMap<String, BTreeMap<u32, WorkflowVersion>>,
    pub runs: BTreeMap<String, Arc<Run>>,
    /// Task deployment id -> (run id, task index).
    pub task_of: std::collections::HashMap<String, (String, usize)>,
    /// Runs in state RUNNING (the ones a flush looks at).
    pub active: BTreeSet<String>,
    /// Admission paused per workflow (the high mark was reached, not yet below the low).
    pub paused: BTreeMap<String, bool>,
    pub next_seq: u64,
    /// Changed since the last write.
    pub dirty: BTreeSet<String>,
    pub create: Vec<DeploymentRecord>,
    pub update: BTreeMap<String, DeploymentRecord>,
    /// Stored workflow versions that did not parse at load, with why.
    pub unreadable: BTreeMap<(String, u32), String>,
    /// Task deployments whose attempt ended since the last write: their assignment goes with
    /// it, even when a retry without backoff wants them running again in the same batch (the
    /// retry is a new placement, with a new generation).
    pub ended: BTreeSet<String>,
    /// The parsed specs of the attempts started since the last write (each is parsed when
    /// its attempt starts: one that does not parse fails then); a stop has none.
    pub parsed: std::collections::HashMap<String, Result<crate::spec::DeploymentSpec, String>>,
    pub events: Vec<NewEvent>,
    /// Finished runs past their workflow's `keep_runs`, and their task deployments, to
    /// delete with the next write.
    pub delete_runs: Vec<String>,
    pub delete_deployments: Vec<String>,
    /// A run was queued since the last admission (admission scans every run, so it runs only
    /// then and when a run ends, not on every batch).
    pub admit_due: bool,
    /// Each scheduled workflow's next fire (from its newest version's `schedule`).
    pub next_fire: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    /// Replies to definitions, sent after the publish that shows them.
    pub defined: Vec<(super::Reply<u32>, Result<u32, CoreError>)>,
    /// Replies to started runs, sent after the flush that admitted them.
    pub replies: Vec<(super::Reply<String>, Result<String, CoreError>)>,
    /// Runs asked for since the last flush, written together at it.
    pub starting: Vec<Starting>,
}

impl Runs {
    /// Whether an API call waits for the end of this batch (a definition, or a run asked for
    /// or admitted).
    pub(super) fn caller_waiting(&self) -> bool {
        !self.defined.is_empty()
            || !self.replies.is_empty()
            || self.starting.iter().any(|s| s.reply.is_some())
    }
}

/// A run asked for and not written yet.
#[derive(Debug)]
pub(crate) struct Starting {
    run: Run,
    event: NewEvent,
    /// The API call's (none for a scheduled run).
    reply: Option<super::Reply<String>>,
}

fn run_event(kind: &'static str, run: &Run, message: String, fields: Value) -> NewEvent {
    let mut f = json!({"workflow": run.workflow, "version": run.version});
    if let (Some(f), Value::Object(extra)) = (f.as_object_mut(), fields) {
        f.extend(extra);
    }
    NewEvent::new(kind, object("run", &run.id), message, f)
}

fn task_states(run: &Run) -> Vec<TaskState> {
    run.tasks.iter().map(|t| t.state).collect()
}

/// The events of tasks that were waiting (for their dependencies, or a retry) in `before` and
/// now never run: `task.upstream_failed` or `task.cancelled`, with the reason.
fn never_ran_events(run: &Run, before: &[TaskState]) -> Vec<NewEvent> {
    run.tasks
        .iter()
        .zip(before)
        .filter(|(_, b)| matches!(b, TaskState::Waiting | TaskState::Retrying))
        .filter_map(|(t, _)| {
            let kind = match t.state {
                TaskState::UpstreamFailed => "task.upstream_failed",
                TaskState::Cancelled => "task.cancelled",
                _ => return None,
            };
            let why = t.reason.as_deref().unwrap_or("no reason");
            Some(run_event(
                kind,
                run,
                format!("task {} will not run: {why}", t.name),
                json!({"task": t.name, "attempt": t.attempts.len(), "reason": t.reason}),
            ))
        })
        .collect()
}

/// The fields of the event that ends task `t`'s last attempt: its outcome, where it ran and
/// how it ended (the task's deployment tells none of this itself).
fn attempt_end_fields(t: &TaskRun, outcome: Outcome) -> Value {
    let last = t.attempts.last();
    json!({"task": t.name, "attempt": t.attempts.len(), "outcome": outcome,
           "node": last.and_then(|a| a.node_id.clone()),
           "generation": last.and_then(|a| a.generation),
           "exit_code": last.and_then(|a| a.exit_code),
           "deployment": t.deployment_id})
}

/// An attempt's spec: the task's declared `spec` with `env` added, and the same parsed,
/// made from the task's parsed spec (`parsed`) without a new parse. `None` for the parsed
/// form when it must be parsed after all (the task's did not parse, or a value the parse
/// refuses).
fn attempt_spec(
    declared: &Value,
    parsed: Option<&Result<crate::spec::DeploymentSpec, String>>,
    env: Vec<(String, String)>,
) -> (Value, Option<Result<crate::spec::DeploymentSpec, String>>) {
    let mut spec = declared.clone();
    let Value::Object(m) = &mut spec else {
        return (spec, None);
    };
    let mut typed = parsed.cloned();
    for (k, v) in env {
        crate::spec::add_env(m, &k, &v);
        // What the parse gives: the variable in its env, over the task's own.
        match &mut typed {
            Some(Ok(t)) if !v.contains('\0') => {
                t.env.insert(k, v);
            }
            _ => typed = None,
        }
    }
    (spec, typed)
}

/// The deployment id of task `i` of run `run` (stable; the task first, so that short ids
/// tell a run's tasks apart).
fn task_deployment_id(run: &str, i: usize) -> String {
    format!("t{i}-{run}")
}

impl Core {
    /// Loads workflows and runs at start: indexes, and the admission state.
    pub(super) async fn load_runs(&mut self) -> Result<(), StoreError> {
        for record in self.store.list_workflows().await? {
            match crate::spec::parse_workflow(&record.definition) {
                Ok(w) => {
                    self.runs
                        .workflows
                        .entry(record.name.clone())
                        .or_default()
                        .insert(record.version, WorkflowVersion::new(record, w));
                }
                Err(e) => {
                    tracing::error!(workflow = %record.name, version = record.version, errors = ?e, "a stored workflow no longer parses; its runs' tasks fail when they would start");
                    let why = e
                        .iter()
                        .map(|f| format!("{}: {}", f.loc.join("."), f.msg))
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.runs
                        .unreadable
                        .insert((record.name.clone(), record.version), why);
                }
            }
        }
        for mut run in self.store.list_runs().await? {
            self.runs.next_seq = self.runs.next_seq.max(run.seq + 1);
            for i in 0..run.tasks.len() {
                let Some(d) = run.tasks[i].deployment_id.clone() else {
                    continue;
                };
                // A placement the run was not written with (see `task_placed`).
                if let Some(a) = self.assignments.get(&d) {
                    run.placed(i, &a.node_id, a.generation.get(), now_ms());
                }
                self.runs.task_of.insert(d, (run.id.clone(), i));
            }
            if run.state == RunState::Running {
                self.runs.active.insert(run.id.clone());
            }
            self.runs.runs.insert(run.id.clone(), Arc::new(run));
        }
        self.runs.next_seq = self.runs.next_seq.max(1);
        // Runs are queued only while their workflow's admission is paused (admission takes
        // them at once otherwise): the pause is where it was, so a restart does not admit
        // more runs before the count falls below `resume_below`.
        for r in self.runs.runs.values() {
            if r.state == RunState::Queued {
                self.runs.paused.insert(r.workflow.clone(), true);
            }
        }
        self.runs.admit_due = true;
        let names: Vec<String> = self.runs.workflows.keys().cloned().collect();
        for w in names {
            self.plan_fire(&w, chrono::Utc::now());
        }
        Ok(())
    }

    /// Stores a new version of a workflow (its definition already checked).
    pub(super) async fn define_workflow(
        &mut self,
        definition: Value,
        parsed: Workflow,
    ) -> Result<u32, CoreError> {
        let name = parsed.name.clone();
        let newest = self
            .runs
            .workflows
            .get(&name)
            .and_then(|v| v.iter().next_back());
        if let Some((version, w)) = newest
            && w.record.definition == definition
        {
            // The same definition again (`symphony run FILE` twice): no new version.
            return Ok(*version);
        }
        let version = newest.map_or(0, |(v, _)| *v) + 1;
        let record = WorkflowRecord {
            name: name.clone(),
            version,
            definition,
            created_at_ms: now_ms(),
        };
        let ev = NewEvent::new(
            "workflow.defined",
            object("workflow", &name),
            format!(
                "workflow {name} version {version} defined ({} tasks)",
                parsed.tasks.len()
            ),
            json!({"version": version, "tasks": parsed.tasks.len()}),
        );
        self.persist(vec![ev], async |s, ev| s.insert_workflow(&record, ev).await)
            .await?;
        let marks = |w: &Workflow| (w.max_running, w.resume_below);
        let versions = self.runs.workflows.entry(name.clone()).or_default();
        let before = versions.values().next_back().map(|v| marks(&v.parsed));
        if before.is_some_and(|b| b != marks(&parsed)) {
            // New water marks: a pause the old ones made is judged again by the new ones.
            self.runs.paused.remove(&name);
        }
        versions.insert(version, WorkflowVersion::new(record, parsed));
        // New water marks may start queued runs now.
        self.runs.admit_due = true;
        self.plan_fire(&name, chrono::Utc::now());
        self.changed = true;
        Ok(version)
    }

    /// Queues a run of `workflow`'s newest version: it is written with the others asked for
    /// in this batch, in one transaction, at the batch's flush; `reply` (none for a scheduled
    /// run) is answered once it is written (or why not).
    pub(super) fn start_run(
        &mut self,
        workflow: &str,
        params: BTreeMap<String, String>,
        reply: Option<super::Reply<String>>,
    ) {
        let Some((version, w)) = self
            .runs
            .workflows
            .get(workflow)
            .and_then(|v| v.iter().next_back())
            .map(|(v, w)| (*v, w.parsed.clone()))
        else {
            let e = CoreError::NotFound("Workflow not found");
            match reply {
                Some(reply) => self.runs.replies.push((reply, Err(e))),
                None => tracing::warn!(workflow, error = %e, "a scheduled run could not start"),
            }
            return;
        };
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let run = Run::new(
            id.clone(),
            &w,
            version,
            self.runs.next_seq,
            params,
            now_ms(),
        );
        self.runs.next_seq += 1;
        let mut event = run_event(
            "run.queued",
            &run,
            format!("run {id} of {workflow} (version {version}) queued"),
            json!({"params": run.params}),
        );
        // Written at the flush, after the call is handled: who asked is named now.
        self.attribute(&mut event);
        self.runs.starting.push(Starting { run, event, reply });
    }

    /// Writes the runs asked for since the last flush, in one transaction (each alone when
    /// that fails, so that each gets its own answer); those written join the runs.
    pub(super) async fn write_starting(&mut self) {
        let starting = std::mem::take(&mut self.runs.starting);
        if starting.is_empty() {
            return;
        }
        let write = RunsWrite {
            runs: starting.iter().map(|s| &s.run).collect(),
            ..RunsWrite::default()
        };
        let events = starting.iter().map(|s| s.event.clone()).collect();
        let together = self
            .persist(events, async |s, ev| s.write_runs(&write, ev).await)
            .await;
        drop(write);
        let written: Vec<Result<(), StoreError>> = match together {
            Ok(()) => starting.iter().map(|_| Ok(())).collect(),
            Err(e) if starting.len() == 1 => vec![Err(e)],
            Err(_) => {
                let mut each = Vec::with_capacity(starting.len());
                for s in &starting {
                    let write = RunsWrite {
                        runs: vec![&s.run],
                        ..RunsWrite::default()
                    };
                    each.push(
                        self.persist(vec![s.event.clone()], async |st, ev| {
                            st.write_runs(&write, ev).await
                        })
                        .await,
                    );
                }
                each
            }
        };
        for (s, r) in starting.into_iter().zip(written) {
            let (id, workflow) = (s.run.id.clone(), s.run.workflow.clone());
            let r = match r {
                Ok(()) => {
                    self.runs.runs.insert(id.clone(), Arc::new(s.run));
                    self.runs.admit_due = true;
                    self.changed = true;
                    Ok(id)
                }
                Err(e) => Err(CoreError::from(e)),
            };
            match s.reply {
                Some(reply) => self.runs.replies.push((reply, r)),
                None => match r {
                    Ok(id) => tracing::info!(%workflow, run = %id, "scheduled run started"),
                    Err(e) => {
                        tracing::warn!(%workflow, error = %e, "a scheduled run could not start");
                    }
                },
            }
        }
    }

    /// Cancels a run: queued or waiting tasks at once, running attempts stopped.
    pub(super) fn cancel_run(&mut self, id: &str) -> Result<(), CoreError> {
        let Some(run) = self.runs.runs.get_mut(id) else {
            return Err(CoreError::NotFound("Run not found"));
        };
        if run.state.is_done() {
            return Err(CoreError::Conflict(format!(
                "run {id} already ended ({})",
                run.state.as_str()
            )));
        }
        let run = Arc::make_mut(run);
        let before = task_states(run);
        let running = run.cancel_rest("cancelled on request");
        let events = never_ran_events(run, &before);
        self.runs.events.extend(events);
        if run.state == RunState::Queued {
            run.state = RunState::Running;
        }
        run.reason = Some("cancelled on request".into());
        self.runs.active.insert(id.to_owned());
        self.runs.dirty.insert(id.to_owned());
        for i in running {
            self.end_attempt(
                id,
                i,
                Outcome::Cancelled,
                Some("cancelled on request".into()),
                None,
            );
        }
        self.changed = true;
        self.needs_schedule = true;
        Ok(())
    }

    /// Runs a finished run again from its failed tasks (it queues under the water marks).
    pub(super) fn retry_run(&mut self, id: &str) -> Result<(), CoreError> {
        let Some(run) = self.runs.runs.get_mut(id) else {
            return Err(CoreError::NotFound("Run not found"));
        };
        let run = Arc::make_mut(run);
        if !run.retry(now_ms()) {
            return Err(CoreError::Conflict(format!(
                "run {id} is {}: only a FAILED or CANCELLED run is retried",
                run.state.as_str()
            )));
        }
        let ev = run_event(
            "run.retried",
            run,
            format!("run {id} queued again from its failed tasks"),
            json!({}),
        );
        self.runs.events.push(ev);
        self.runs.dirty.insert(id.to_owned());
        self.runs.admit_due = true;
        self.changed = true;
        Ok(())
    }

    /// A task's deployment is the run's: changed or deleted only through it.
    pub(super) fn not_a_task(&self, id: &str) -> Result<(), CoreError> {
        match self.runs.task_of.get(id) {
            Some((run, i)) => {
                let task = self
                    .runs
                    .runs
                    .get(run)
                    .and_then(|r| r.tasks.get(*i))
                    .map_or("?", |t| t.name.as_str());
                Err(CoreError::Conflict(format!(
                    "deployment {id} runs task {task} of run {run}: cancel or retry the run instead"
                )))
            }
            None => Ok(()),
        }
    }

    /// The next fire of `workflow`'s schedule after `after` (none without a schedule).
    fn plan_fire(&mut self, workflow: &str, after: chrono::DateTime<chrono::Utc>) {
        let next = self
            .runs
            .workflows
            .get(workflow)
            .and_then(|v| v.values().next_back())
            .and_then(|w| w.parsed.schedule.clone())
            .and_then(|(cron, tz)| {
                let schedule = crate::spec::cron_schedule(&cron).ok()?;
                let tz = tz.parse::<chrono_tz::Tz>().ok()?;
                crate::spec::next_fire(&schedule, tz, after)
            });
        match next {
            Some(at) => self.runs.next_fire.insert(workflow.to_owned(), at),
            None => self.runs.next_fire.remove(workflow),
        };
    }

    /// Starts a run of every workflow whose schedule fired (once per fire; fires missed while
    /// the conductor was down are not made up).
    pub(super) async fn fire_schedules(&mut self) {
        let now = chrono::Utc::now();
        let due: Vec<String> = self
            .runs
            .next_fire
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(w, _)| w.clone())
            .collect();
        for w in due {
            self.plan_fire(&w, now);
            self.start_run(&w, BTreeMap::new(), None);
        }
    }

    /// Whether the scheduler should place deployment `id` (false for a task deployment whose
    /// current attempt ended or has not begun).
    pub(super) fn task_wanted(&self, id: &str) -> Option<bool> {
        let (run, i) = self.runs.task_of.get(id)?;
        let t = self.runs.runs.get(run)?.tasks.get(*i)?;
        Some(
            t.state == TaskState::Running
                && t.attempts
                    .last()
                    .is_some_and(|a| a.finished_at_ms.is_none()),
        )
    }

    /// `task.started` for a placement of task deployment `id` (`None`: not a task's): the
    /// attempt's start, where and as which generation. It stands for the deployment's own
    /// `deployment.placed`, `deployment.started` and `deployment.exited`, which a task
    /// deployment does not write (its end is the task's `task.succeeded`, `task.failed`, ...).
    pub(super) fn task_started_event(
        &self,
        id: &str,
        node_id: &str,
        generation: u64,
    ) -> Option<NewEvent> {
        let (run_id, i) = self.runs.task_of.get(id)?;
        let run = self.runs.runs.get(run_id)?;
        let t = run.tasks.get(*i)?;
        let attempt = t.attempts.len();
        Some(run_event(
            "task.started",
            run,
            format!(
                "task {} attempt {attempt} started on {node_id} (generation {generation})",
                t.name
            ),
            json!({"task": t.name, "attempt": attempt, "deployment": id, "node": node_id,
                   "generation": generation}),
        ))
    }

    /// Whether `id` is a task's deployment.
    pub(super) fn is_task(&self, id: &str) -> bool {
        self.runs.task_of.contains_key(id)
    }

    /// The scheduler placed task deployment `id` at `generation` on `node_id`. The run is not
    /// written for this alone: the placement is durable as the deployment's assignment (written
    /// before the `Assign` is sent), from which [`Core::load_runs`] fills the attempt after a
    /// restart; the run's next change writes it with the rest.
    pub(super) fn task_placed(&mut self, id: &str, node_id: &str, generation: u64) {
        let Some((run_id, i)) = self.runs.task_of.get(id) else {
            return;
        };
        if let Some(run) = self.runs.runs.get_mut(run_id) {
            Arc::make_mut(run).placed(*i, node_id, generation, now_ms());
        }
    }

    /// A report about task deployment `id` (for its current assignment): an attempt that
    /// ended is recorded and decided on.
    pub(super) fn task_status(&mut self, id: &str, st: &wire::DeploymentStatus) {
        let Some((run_id, i)) = self.runs.task_of.get(id).cloned() else {
            return;
        };
        let outcome = match CurrentState::from_wire(&st.state) {
            CurrentState::Exited if !st.result_error.is_empty() => {
                Outcome::Failed { exit_code: Some(0) }
            }
            CurrentState::Exited => Outcome::Succeeded,
            CurrentState::Crashed | CurrentState::Failed => Outcome::Failed {
                exit_code: st.last_exit_code,
            },
            _ => return,
        };
        let Some(run) = self.runs.runs.get(&run_id) else {
            return;
        };
        let Some(a) = run.tasks.get(i).and_then(|t| t.attempts.last()) else {
            return;
        };
        // Only the current attempt's own end counts (a conductor that restarted before it
        // recorded the placement takes the report's generation).
        if a.finished_at_ms.is_some() || a.generation.is_some_and(|g| g != st.generation) {
            return;
        }
        let reason = if st.result_error.is_empty() {
            Some(st.reason.clone()).filter(|r| !r.is_empty())
        } else {
            Some(st.result_error.clone())
        };
        let result = st
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<Value>(r).ok());
        self.end_attempt(&run_id, i, outcome, reason, result);
    }

    /// Records the end of task `i`'s current attempt and decides what follows.
    pub(super) fn end_attempt(
        &mut self,
        run_id: &str,
        i: usize,
        outcome: Outcome,
        reason: Option<String>,
        result: Option<Value>,
    ) {
        let Some(run) = self.runs.runs.get_mut(run_id) else {
            return;
        };
        let run = Arc::make_mut(run);
        let now = now_ms();
        let jitter = f64::from(rand::random::<u16>()) / 65536.0;
        // A failure may end tasks that never ran (propagation, fail_fast): their states before.
        let before = (outcome != Outcome::Succeeded).then(|| task_states(run));
        let after = run.finish_attempt(i, outcome, reason.clone(), result, now, jitter);
        if let Some(before) = before {
            self.runs.events.extend(never_ran_events(run, &before));
        }
        let t = &run.tasks[i];
        let attempt = t.attempts.len();
        let (kind, message) = match &after {
            AfterAttempt::Succeeded => (
                "task.succeeded",
                format!("task {} succeeded (attempt {attempt})", t.name),
            ),
            AfterAttempt::Retry { at_ms } => (
                "task.retrying",
                format!(
                    "task {} attempt {attempt} failed ({}); attempt {} in {:.1}s",
                    t.name,
                    reason.as_deref().unwrap_or("no reason"),
                    attempt + 1,
                    (at_ms - now) as f64 / 1000.0
                ),
            ),
            AfterAttempt::Failed { .. } if outcome == Outcome::Cancelled => (
                "task.cancelled",
                format!("task {} cancelled (attempt {attempt})", t.name),
            ),
            AfterAttempt::Failed { .. } => (
                "task.failed",
                format!(
                    "task {} failed after {attempt} attempt(s): {}",
                    t.name,
                    reason.as_deref().unwrap_or("no reason")
                ),
            ),
        };
        let ev = run_event(kind, run, message, attempt_end_fields(t, outcome));
        self.runs.events.push(ev);
        let mut stopped = vec![i];
        if let AfterAttempt::Failed { stop } = after {
            for k in stop {
                let why = format!("cancelled: task {} failed (fail_fast)", run.tasks[i].name);
                run.finish_attempt(k, Outcome::Cancelled, Some(why), None, now, 0.0);
                let t = &run.tasks[k];
                let ev = run_event(
                    "task.cancelled",
                    run,
                    format!(
                        "task {} cancelled (attempt {}): task {} failed (fail_fast)",
                        t.name,
                        t.attempts.len(),
                        run.tasks[i].name
                    ),
                    attempt_end_fields(t, Outcome::Cancelled),
                );
                self.runs.events.push(ev);
                stopped.push(k);
            }
        }
        // The ended attempts' deployments are not wanted any more (their nodes stop them).
        let ids: Vec<String> = stopped
            .iter()
            .filter_map(|&k| run.tasks[k].deployment_id.clone())
            .collect();
        for id in ids {
            self.set_task_deployment(&id, DesiredState::Stopped, None);
        }
        self.runs.dirty.insert(run_id.to_owned());
        self.changed = true;
        self.needs_schedule = true;
    }

    /// Changes a task deployment's desired state (and spec), written with the next runs write.
    fn set_task_deployment(&mut self, id: &str, desired: DesiredState, spec: Option<Value>) {
        let base = self
            .runs
            .update
            .get(id)
            .cloned()
            .or_else(|| self.deployments.get(id).cloned())
            .or_else(|| self.runs.create.iter().find(|d| d.id == id).cloned());
        let Some(mut rec) = base else {
            return;
        };
        if desired == DesiredState::Stopped {
            self.runs.ended.insert(id.to_owned());
        }
        rec.desired_state = desired;
        if let Some(spec) = spec {
            rec.specification = spec;
        }
        rec.updated_at_ms = now_ms();
        if let Some(pending) = self.runs.create.iter_mut().find(|d| d.id == id) {
            *pending = rec;
        } else {
            self.runs.update.insert(id.to_owned(), rec);
        }
    }

    /// Task deployments whose node was lost with their attempt running: each is an ended
    /// attempt (retried by its policy), never placed again silently.
    pub(super) fn tasks_lost(&mut self, lost: &[(String, String)]) {
        for (id, node_id) in lost {
            let Some((run_id, i)) = self.runs.task_of.get(id).cloned() else {
                continue;
            };
            if self.task_wanted(id) == Some(true) {
                self.end_attempt(
                    &run_id,
                    i,
                    Outcome::NodeLost,
                    Some(format!("node {node_id} was lost during the attempt")),
                    None,
                );
            }
        }
    }

    /// One step of every run (at each flush): admission under the water marks, retries and
    /// timeouts that are due, ready tasks started, runs that ended; then one write.
    pub(super) async fn advance_runs(&mut self, ticked: bool) {
        let now = now_ms();
        if std::mem::take(&mut self.runs.admit_due) {
            self.admit_runs(now);
        }
        let active: Vec<String> = self.runs.active.iter().cloned().collect();
        let mut ended_any = false;
        let mut ended_in = BTreeSet::new();
        for run_id in active {
            if ticked {
                self.timeouts(&run_id, now);
            }
            let (ready, retries) = match self.runs.runs.get(&run_id) {
                Some(r) => (r.ready(), r.due_retries(now)),
                None => continue,
            };
            for i in ready.into_iter().chain(retries) {
                self.start_task(&run_id, i, now);
            }
            if let Some(run) = self.runs.runs.get_mut(&run_id)
                && Arc::make_mut(run).settle(now)
            {
                let (done, total, _, failed) = run.progress();
                let ev = run_event(
                    match run.state {
                        RunState::Succeeded => "run.succeeded",
                        RunState::Cancelled => "run.cancelled",
                        _ => "run.failed",
                    },
                    run,
                    format!(
                        "run {run_id} of {} {} ({done}/{total} tasks done, {failed} failed)",
                        run.workflow,
                        run.state.as_str().to_lowercase()
                    ),
                    json!({"failed": failed}),
                );
                ended_in.insert(run.workflow.clone());
                self.runs.events.push(ev);
                self.runs.active.remove(&run_id);
                self.runs.dirty.insert(run_id.clone());
                ended_any = true;
            }
        }
        for workflow in ended_in {
            self.prune_runs(&workflow);
        }
        if ended_any {
            // Ended runs free slots under the water marks: admit now, not a tick later.
            self.admit_runs(now);
            let active: Vec<String> = self.runs.active.iter().cloned().collect();
            for run_id in active {
                let ready = self.runs.runs.get(&run_id).map(|r| r.ready());
                for i in ready.unwrap_or_default() {
                    self.start_task(&run_id, i, now);
                }
            }
        }
        self.write_runs().await;
    }

    /// Starts queued runs (FIFO per workflow) as the water marks allow.
    fn admit_runs(&mut self, now: i64) {
        let mut queued: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for r in self.runs.runs.values() {
            if r.state == RunState::Queued {
                queued
                    .entry(r.workflow.clone())
                    .or_default()
                    .push((r.seq, r.id.clone()));
            }
        }
        for (workflow, mut list) in queued {
            list.sort();
            let marks = self
                .runs
                .workflows
                .get(&workflow)
                .and_then(|v| v.values().next_back())
                .map_or(Marks::default(), |w| Marks {
                    high: w.parsed.max_running,
                    low: w.parsed.resume_below,
                });
            let running = self
                .runs
                .active
                .iter()
                .filter(|id| {
                    self.runs
                        .runs
                        .get(*id)
                        .is_some_and(|r| r.workflow == workflow)
                })
                .count();
            let paused = self.runs.paused.get(&workflow).copied().unwrap_or(false);
            let (start, paused) = marks.admit(running, list.len(), paused);
            self.runs.paused.insert(workflow.clone(), paused);
            for (_, id) in list.into_iter().take(start) {
                if let Some(run) = self.runs.runs.get_mut(&id) {
                    let run = Arc::make_mut(run);
                    run.state = RunState::Running;
                    run.started_at_ms = Some(now);
                    let ev = run_event(
                        "run.started",
                        run,
                        format!("run {id} of {workflow} started"),
                        json!({"tasks": run.tasks.len()}),
                    );
                    self.runs.events.push(ev);
                    self.runs.active.insert(id.clone());
                    self.runs.dirty.insert(id);
                }
            }
        }
        // Runs that ended elsewhere may leave a paused workflow with nothing queued: its
        // flag is recomputed with its next queued run.
    }

    /// Ends attempts that ran past their task's `timeout_sec`, counted from their placement
    /// (an attempt waiting for a node has not begun to run).
    fn timeouts(&mut self, run_id: &str, now: i64) {
        let Some(run) = self.runs.runs.get(run_id) else {
            return;
        };
        let over: Vec<(usize, f64)> = run
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TaskState::Running)
            .filter_map(|(i, t)| {
                let limit = t.timeout_sec?;
                let a = t.attempts.last()?;
                #[allow(clippy::cast_possible_truncation)]
                let due = a.placed_at_ms?.saturating_add((limit * 1000.0) as i64);
                (a.finished_at_ms.is_none() && now >= due).then_some((i, limit))
            })
            .collect();
        for (i, limit) in over {
            self.end_attempt(
                run_id,
                i,
                Outcome::Timeout,
                Some(format!("ran past its timeout of {limit}s; stopped")),
                None,
            );
        }
    }

    /// Task `i`'s attempt, just started, cannot run: it fails now with `why` (retried by its
    /// policy), rather than leave its run waiting for a placement that never comes.
    fn fail_attempt_now(&mut self, run_id: &str, i: usize, why: String) {
        self.runs.dirty.insert(run_id.to_owned());
        self.changed = true;
        self.end_attempt(
            run_id,
            i,
            Outcome::Failed { exit_code: None },
            Some(why),
            None,
        );
    }

    /// Starts the next attempt of task `i`: its deployment is made (first attempt) or given
    /// the new attempt's spec, desired RUNNING; the scheduler places it.
    fn start_task(&mut self, run_id: &str, i: usize, now: i64) {
        let Some(run) = self.runs.runs.get_mut(run_id) else {
            return;
        };
        let Some((w, specs)) = self
            .runs
            .workflows
            .get(&run.workflow)
            .and_then(|v| v.get(&run.version))
            .map(|w| (w.parsed.clone(), w.specs.clone()))
        else {
            // Its version could not be read at load (a definition this binary refuses): the
            // task fails with why, rather than leave its run waiting forever.
            let key = (run.workflow.clone(), run.version);
            let why = self.runs.unreadable.get(&key).map_or_else(
                || format!("workflow {} version {} is gone", key.0, key.1),
                |e| format!("workflow {} version {} cannot be read: {e}", key.0, key.1),
            );
            Arc::make_mut(run).start_attempt(i, now);
            self.fail_attempt_now(run_id, i, why);
            return;
        };
        let run = Arc::make_mut(run);
        let attempt = run.start_attempt(i, now);
        let inputs = run.inputs(i);
        let task = &run.tasks[i];
        let Some(at) = w.tasks.iter().position(|t| t.name == task.name) else {
            return;
        };
        let declared = &w.tasks[at];
        let mut env: Vec<(String, String)> = vec![
            ("SYMPHONY_WORKFLOW".into(), run.workflow.clone()),
            ("SYMPHONY_RUN_ID".into(), run.id.clone()),
            ("SYMPHONY_TASK".into(), task.name.clone()),
            ("SYMPHONY_ATTEMPT".into(), attempt.to_string()),
            ("SYMPHONY_INPUTS".into(), inputs.to_string()),
            (
                "SYMPHONY_PARAMS".into(),
                serde_json::to_string(&run.params).unwrap_or_default(),
            ),
        ];
        for (k, v) in &run.params {
            let key: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.push((format!("SYMPHONY_PARAM_{key}"), v.clone()));
        }
        let (spec, typed) = attempt_spec(&declared.spec, specs.get(at), env);
        let specification = json!({ "spec": spec });
        // An attempt whose spec does not parse (a parameter the spec refuses) could never be
        // placed: it fails now, with the reason, rather than leave its run waiting forever.
        let typed = typed.unwrap_or_else(|| parse_spec(&specification));
        if let Err(e) = &typed {
            self.fail_attempt_now(run_id, i, format!("the attempt's spec is invalid: {e}"));
            return;
        }
        let id = task_deployment_id(&run.id, i);
        let name = format!("{}/{}/{}", run.workflow, run.id, task.name);
        let first = task.deployment_id.is_none();
        run.tasks[i].deployment_id = Some(id.clone());
        self.runs.dirty.insert(run_id.to_owned());
        self.runs.task_of.insert(id.clone(), (run_id.to_owned(), i));
        self.runs.parsed.insert(id.clone(), typed);
        if first && !self.deployments.contains_key(&id) {
            self.runs.create.push(DeploymentRecord {
                id,
                name,
                desired_state: DesiredState::Running,
                kind: "EXEC".into(),
                specification,
                created_at_ms: now,
                updated_at_ms: now,
            });
        } else {
            self.set_task_deployment(&id, DesiredState::Running, Some(specification));
        }
        self.changed = true;
        self.needs_schedule = true;
    }

    /// Finished runs beyond the workflow's `keep_runs` go, oldest first, with their task
    /// deployments (written with this flush's runs, forgotten once written).
    fn prune_runs(&mut self, workflow: &str) {
        let keep = self
            .runs
            .workflows
            .get(workflow)
            .and_then(|versions| versions.values().next_back())
            .map_or(crate::spec::DEFAULT_KEEP_RUNS, |w| w.parsed.keep_runs);
        // No more runs than that in all: nothing to look for (the common case, at no cost).
        if u64::try_from(self.runs.runs.len()).is_ok_and(|n| n <= u64::from(keep)) {
            return;
        }
        let mut ended: Vec<(i64, u64, String)> = self
            .runs
            .runs
            .values()
            .filter(|r| r.workflow == workflow && r.state.is_done())
            .map(|r| (r.queued_at_ms, r.seq, r.id.clone()))
            .collect();
        let Some(over) = ended
            .len()
            .checked_sub(usize::try_from(keep).unwrap_or(usize::MAX))
            .filter(|n| *n > 0)
        else {
            return;
        };
        ended.sort_unstable();
        for (_, _, id) in ended.into_iter().take(over) {
            let Some(run) = self.runs.runs.remove(&id) else {
                continue;
            };
            for i in 0..run.tasks.len() {
                let dep = task_deployment_id(&id, i);
                self.runs.task_of.remove(&dep);
                self.runs.update.remove(&dep);
                self.runs.ended.remove(&dep);
                // Also one still waiting in `create` (a write failed): deletes follow inserts,
                // in the store and in memory.
                self.runs.delete_deployments.push(dep);
            }
            self.runs.dirty.remove(&id);
            self.runs.delete_runs.push(id);
        }
    }

    /// Writes the batch's run changes and task deployments in one transaction; only then are
    /// the deployments known to the scheduler. A failed write is tried again next flush.
    async fn write_runs(&mut self) {
        if self.runs.dirty.is_empty()
            && self.runs.create.is_empty()
            && self.runs.update.is_empty()
            && self.runs.events.is_empty()
            && self.runs.delete_runs.is_empty()
        {
            return;
        }
        let runs: Vec<Arc<Run>> = self
            .runs
            .dirty
            .iter()
            .filter_map(|id| self.runs.runs.get(id).cloned())
            .collect();
        let create = self.runs.create.clone();
        // Most changes only stop a task: its name and spec are as stored, and only its state is
        // written.
        let (state_only, update): (Vec<DeploymentRecord>, Vec<DeploymentRecord>) =
            self.runs.update.values().cloned().partition(|d| {
                self.deployments
                    .get(&d.id)
                    .is_some_and(|old| old.name == d.name && old.specification == d.specification)
            });
        let events = std::mem::take(&mut self.runs.events);
        // Task deployments whose attempt ended lose their assignment (their nodes stop them).
        let clear: Vec<String> = self
            .runs
            .ended
            .iter()
            .filter(|id| self.assignments.contains_key(*id))
            .cloned()
            .collect();
        let write = RunsWrite {
            runs: runs.iter().map(AsRef::as_ref).collect(),
            create,
            update,
            state_only,
            clear,
            delete_runs: self.runs.delete_runs.clone(),
            delete_deployments: self.runs.delete_deployments.clone(),
        };
        if let Err(e) = self
            .persist(events, async |s, ev| s.write_runs(&write, ev).await)
            .await
        {
            tracing::error!(error = %e, "could not write workflow runs; trying again");
            return;
        }
        self.runs.dirty.clear();
        self.runs.ended.clear();
        let mut parsed = std::mem::take(&mut self.runs.parsed);
        for rec in std::mem::take(&mut self.runs.create) {
            self.wake(&rec.id);
            let spec = parsed
                .remove(&rec.id)
                .unwrap_or_else(|| parse_spec(&rec.specification));
            self.specs.insert(rec.id.clone(), spec);
            self.logs.ensure(&rec.id);
            self.deployments.insert(rec.id.clone(), rec);
        }
        let unchanged: HashSet<&str> = write.state_only.iter().map(|d| d.id.as_str()).collect();
        for (id, rec) in std::mem::take(&mut self.runs.update) {
            self.wake(&id);
            if let Some(spec) = parsed.remove(&id) {
                self.specs.insert(id.clone(), spec);
            } else if !self.specs.contains_key(&id) || !unchanged.contains(id.as_str()) {
                // A stop keeps its spec, parsed already.
                self.specs
                    .insert(id.clone(), parse_spec(&rec.specification));
            }
            self.deployments.insert(id, rec);
        }
        for id in &write.clear {
            self.wake(id);
            if let Some(a) = self.assignments.remove(id) {
                self.unassign(&a.node_id, id, a.generation);
                self.reported.remove(id);
            }
        }
        self.runs.delete_runs.clear();
        for id in std::mem::take(&mut self.runs.delete_deployments) {
            self.forget(&id);
        }
        self.changed = true;
    }

    /// The workflows for the view: each newest version, masked, with its runs counted.
    pub(super) fn workflow_infos(&self) -> Vec<Arc<WorkflowInfo>> {
        let mut running: BTreeMap<&str, usize> = BTreeMap::new();
        let mut queued: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.runs.runs.values() {
            match r.state {
                RunState::Running => *running.entry(&r.workflow).or_default() += 1,
                RunState::Queued => *queued.entry(&r.workflow).or_default() += 1,
                _ => {}
            }
        }
        self.runs
            .workflows
            .iter()
            .filter_map(|(name, versions)| {
                let (version, w) = versions.iter().next_back()?;
                Some(Arc::new(WorkflowInfo {
                    name: name.clone(),
                    version: *version,
                    definition: w.masked.clone(),
                    max_running: w.parsed.max_running,
                    resume_below: w.parsed.resume_below,
                    fail_fast: w.parsed.fail_fast,
                    tasks: w.parsed.tasks.len(),
                    created_at_ms: w.record.created_at_ms,
                    running: running.get(name.as_str()).copied().unwrap_or(0),
                    queued: queued.get(name.as_str()).copied().unwrap_or(0),
                    next_run_at_ms: self.runs.next_fire.get(name).map(|t| t.timestamp_millis()),
                }))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::{attempt_spec, parse_spec};

    /// An attempt's parsed spec, made from its task's parsed spec, is what parsing the
    /// attempt's spec gives: with the task's env in `config`, at the top, in both, or none,
    /// and a variable that overrides the task's own.
    #[test]
    fn an_attempts_parsed_spec_is_what_its_parse_gives() {
        let w = crate::spec::parse_workflow(&json!({"name": "w", "tasks": [
            {"name": "none", "config": {"command": ["true"]}},
            {"name": "config", "config": {"command": ["true"], "env": {"A": "1", "SYMPHONY_TASK": "mine"}}},
            {"name": "top", "config": {"command": ["true"]}, "env": {"B": "2"}},
            {"name": "both", "config": {"command": ["true"], "env": {"C": "3"}}, "env": {"D": "4"}},
            {"name": "item", "config": {"command": ["true"]}, "for_each": ["x", "y"]},
        ]}))
        .unwrap();
        assert_eq!(w.tasks.len(), 6);
        for t in &w.tasks {
            let parsed = parse_spec(&json!({ "spec": t.spec }));
            assert!(parsed.is_ok(), "{}: {parsed:?}", t.name);
            let env = vec![
                ("SYMPHONY_TASK".to_owned(), t.name.clone()),
                (
                    "SYMPHONY_INPUTS".to_owned(),
                    json!({"a": "\u{0}"}).to_string(),
                ),
                ("SYMPHONY_PARAM_X".to_owned(), "é x".to_owned()),
            ];
            let (spec, typed) = attempt_spec(&t.spec, Some(&parsed), env);
            let expected = parse_spec(&json!({ "spec": spec }));
            assert_eq!(typed, Some(expected.clone()), "{}", t.name);
            assert_eq!(
                expected.unwrap().env.get("SYMPHONY_TASK"),
                Some(&t.name),
                "{}",
                t.name
            );
        }
        // A value the parse refuses is left to it.
        let t = &w.tasks[0];
        let parsed = parse_spec(&json!({ "spec": t.spec }));
        let env = vec![("SYMPHONY_PARAM_X".to_owned(), "a\0b".to_owned())];
        let (spec, typed) = attempt_spec(&t.spec, Some(&parsed), env);
        assert_eq!(typed, None);
        assert!(parse_spec(&json!({ "spec": spec })).is_err());
    }
}
