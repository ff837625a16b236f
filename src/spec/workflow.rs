//! Workflow definitions: a DAG of tasks that run to completion (the symphonizer seed's model
//! and the orchestration-spec seeds' YAML; see `experiments-and-workflows.md`). Pure: this
//! reads and validates a whole definition; runs are the conductor's.
//!
//! ```yaml
//! name: sweep
//! max_running: 3          # optional high water mark: runs at once (default: no limit)
//! resume_below: 1         # optional low water mark: queued runs start again below it
//! fail_fast: false        # a failed task cancels the run (default: only its dependents)
//! schedule: {cron: "0 3 * * *", timezone: Europe/Paris}   # optional
//! tasks:
//!   - name: prepare
//!     config: {command: [python, prep.py]}
//!   - name: train
//!     depends_on: [prepare]
//!     for_each: [0.1, 0.01]  # train[0], train[1], each with SYMPHONY_ITEM
//!     retries: 3             # or {max_attempts: 3, backoff_sec: 1, max_backoff_sec: 60}
//!     retry_on: [failure, node_lost, timeout]   # or exit codes: [75, node_lost]; items add up
//!     timeout_sec: 3600
//!     outlive_agent: true    # survive an agent restart (default false: the attempt fails)
//!     config: {command: [python, train.py]}
//!   - name: report
//!     depends_on: [train]    # after every train[i]
//!     config: {command: [python, report.py]}
//! ```
//!
//! A task is a deployment spec (every field of `spec`, checked by the spec's parser; its
//! restart policy is always `never`) plus `name`, `depends_on`, `for_each`, `retries`,
//! `retry_on` and `timeout_sec`. Errors name the task: an unknown dependency, a cycle (with
//! its path), a duplicate name.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::checked::{Checked, Int, Loc, Object, Opt, Report};
use super::model::{FieldError, is_dns_label};
use super::validate::parse_with_services;

/// Most tasks in one workflow, `for_each` expanded.
pub const MAX_TASKS: usize = 10_000;
/// Most attempts of one task.
pub const MAX_ATTEMPTS: i64 = 100;
/// The largest result a task may leave in `$SYMPHONY_OUTPUT`.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Which failed attempts are tried again (while attempts remain).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RetryOn {
    /// Any exit other than 0 (codes and signals) when `exit_codes` is empty; otherwise only
    /// those codes.
    pub failure: bool,
    pub exit_codes: BTreeSet<i32>,
    /// Its node was lost (or revoked) during the attempt.
    pub node_lost: bool,
    /// It ran past `timeout_sec`.
    pub timeout: bool,
}

impl RetryOn {
    /// The default: every kind of failure.
    pub fn any() -> Self {
        RetryOn {
            failure: true,
            exit_codes: BTreeSet::new(),
            node_lost: true,
            timeout: true,
        }
    }
}

/// How a task is tried again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Retries {
    /// Attempts in all (1: no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled each time, with up to 50 % jitter.
    pub backoff_sec: f64,
    pub max_backoff_sec: f64,
    pub retry_on: RetryOn,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_attempts: 1,
            backoff_sec: 1.0,
            max_backoff_sec: 60.0,
            retry_on: RetryOn::any(),
        }
    }
}

/// One task of a workflow, `for_each` expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Unique in the workflow: the declared name, or `name[i]` for an item of `for_each`.
    pub name: String,
    /// The declared name (shared by the items of a `for_each`).
    pub group: String,
    /// The task names (expanded) it waits for.
    pub depends_on: Vec<String>,
    /// The deployment's `spec` (restart policy `never`; an item's `env` has `SYMPHONY_ITEM`).
    pub spec: Value,
    pub retries: Retries,
    pub timeout_sec: Option<f64>,
}

/// A validated workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub max_running: Option<u32>,
    pub resume_below: Option<u32>,
    pub fail_fast: bool,
    /// How many finished runs are kept (the oldest beyond it go, with their task
    /// deployments and logs).
    pub keep_runs: u32,
    /// `(cron, timezone)`.
    pub schedule: Option<(String, String)>,
    /// In a topological order (every task after what it depends on).
    pub tasks: Vec<Task>,
}

/// Finished runs kept per workflow when its definition does not say.
pub const DEFAULT_KEEP_RUNS: u32 = 100;

/// The fields a task has beyond a deployment spec.
const TASK_KEYS: [&str; 6] = [
    "name",
    "depends_on",
    "for_each",
    "retries",
    "retry_on",
    "timeout_sec",
];

type TaskWire = Checked<Object<Map<String, Value>>>;

#[derive(Debug, serde::Deserialize)]
struct WorkflowWire {
    #[serde(default)]
    name: Opt<String>,
    #[serde(default)]
    max_running: Opt<Int>,
    #[serde(default)]
    resume_below: Opt<Int>,
    #[serde(default)]
    fail_fast: Opt<bool>,
    #[serde(default)]
    keep_runs: Opt<Int>,
    #[serde(default)]
    schedule: Opt<Map<String, Value>>,
    #[serde(default)]
    tasks: Opt<Vec<TaskWire>>,
}

/// Reads and validates a definition (the request body); errors are located under `body`.
pub fn parse_workflow(def: &Value) -> Result<Workflow, Vec<FieldError>> {
    let root = Loc::new(&["body"]);
    let mut r = Report::default();
    let parsed = Checked::<Object<WorkflowWire>>::from_value(def.clone());
    let workflow = r.checked(&parsed, &root).and_then(|Object(w)| {
        let name = r.required(&w.name, &root.at("name")).cloned();
        if let Some(n) = &name
            && !is_dns_label(n)
        {
            r.err(
                &root.at("name"),
                "value_error",
                format!("{n:?} is not a valid workflow name: use 1-63 of a-z, 0-9 and '-'"),
            );
        }
        let max_running = r
            .opt_int(&w.max_running, &root.at("max_running"), 1, 100_000)
            .and_then(|n| u32::try_from(n).ok());
        let resume_below = r
            .opt_int(&w.resume_below, &root.at("resume_below"), 1, 100_000)
            .and_then(|n| u32::try_from(n).ok());
        match (max_running, resume_below) {
            (None, Some(_)) => r.err(
                &root.at("resume_below"),
                "value_error",
                "resume_below needs max_running (the high water mark it resumes under)",
            ),
            (Some(high), Some(low)) if low > high => r.err(
                &root.at("resume_below"),
                "value_error",
                format!("resume_below ({low}) must not exceed max_running ({high})"),
            ),
            _ => {}
        }
        let fail_fast = r
            .opt(&w.fail_fast, &root.at("fail_fast"))
            .copied()
            .unwrap_or(false);
        let keep_runs = r
            .opt_int(&w.keep_runs, &root.at("keep_runs"), 1, 100_000)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_KEEP_RUNS);
        let schedule = r
            .opt(&w.schedule, &root.at("schedule"))
            .and_then(|s| schedule(&mut r, s, &root.at("schedule")));
        let tasks = tasks(&mut r, &w.tasks, &root.at("tasks"));
        Some(Workflow {
            name: name?,
            max_running,
            resume_below,
            fail_fast,
            keep_runs,
            schedule,
            tasks,
        })
    });
    r.finish(workflow)
}

fn schedule(r: &mut Report, s: &Map<String, Value>, at: &Loc) -> Option<(String, String)> {
    let cron = match s.get("cron") {
        Some(Value::String(c)) => c.clone(),
        _ => {
            r.err(
                &at.at("cron"),
                "missing",
                "a schedule needs a cron expression",
            );
            return None;
        }
    };
    let tz = match s.get("timezone") {
        None | Some(Value::Null) => "UTC".to_owned(),
        Some(Value::String(t)) => t.clone(),
        Some(_) => {
            r.err(
                &at.at("timezone"),
                "string_type",
                "Input should be a valid string",
            );
            return None;
        }
    };
    if let Err(e) = super::cron_schedule(&cron) {
        r.err(&at.at("cron"), "value_error", e);
        return None;
    }
    if tz.parse::<chrono_tz::Tz>().is_err() {
        let msg = format!("{tz:?} is not a time zone name (e.g. UTC, Europe/Paris)");
        r.err(&at.at("timezone"), "value_error", msg);
        return None;
    }
    Some((cron, tz))
}

/// Every task, `for_each` expanded, then the checks across tasks (names, dependencies,
/// cycles); returned in a topological order.
fn tasks(r: &mut Report, field: &Opt<Vec<TaskWire>>, loc: &Loc) -> Vec<Task> {
    let Some(list) = r.required(field, loc) else {
        return Vec::new();
    };
    if list.is_empty() {
        r.err(loc, "value_error", "a workflow needs at least one task");
    }
    // (where it was declared, its declared dependencies, its expansion)
    let mut declared: Vec<(Loc, Vec<String>, Vec<Task>)> = Vec::new();
    let mut count = 0usize;
    for (i, t) in list.iter().enumerate() {
        let at = loc.at(i);
        if let Some(Object(t)) = r.checked(t, &at)
            && let Some((deps, expanded)) = task(r, t, &at)
        {
            count += expanded.len();
            if count > MAX_TASKS {
                let msg = format!("a workflow has at most {MAX_TASKS} tasks (for_each counted)");
                r.err(loc, "value_error", msg);
                return Vec::new();
            }
            declared.push((at, deps, expanded));
        }
    }
    // Names: unique among declared names.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (at, _, expanded) in &declared {
        let Some(first) = expanded.first() else {
            continue;
        };
        if groups.contains_key(&first.group) {
            let msg = format!("two tasks are named {:?}", first.group);
            r.err(&at.at("name"), "value_error", msg);
            continue;
        }
        groups.insert(
            first.group.clone(),
            expanded.iter().map(|t| t.name.clone()).collect(),
        );
    }
    // Dependencies: declared names, expanded to every item.
    let mut out = Vec::new();
    for (at, deps, expanded) in declared {
        let mut names = Vec::new();
        for (j, d) in deps.iter().enumerate() {
            match groups.get(d) {
                // A name given twice is one dependency (its results arrive once).
                Some(items) => {
                    for item in items {
                        if !names.contains(item) {
                            names.push(item.clone());
                        }
                    }
                }
                None => {
                    let task = expanded.first().map_or("", |t| t.group.as_str());
                    let msg = format!("task {task:?} depends on {d:?}, which is not a task here");
                    r.err(&at.at("depends_on").at(j), "value_error", msg);
                }
            }
        }
        for mut t in expanded {
            t.depends_on.clone_from(&names);
            out.push(t);
        }
    }
    match topological(&out) {
        Ok(order) => order,
        Err(cycle) => {
            let msg = format!(
                "the tasks depend on each other in a cycle: {}",
                cycle.join(" -> ")
            );
            r.err(loc, "value_error", msg);
            Vec::new()
        }
    }
}

/// The tasks in a topological order (stable: declared order among the ready ones), or a
/// cycle's path.
fn topological(tasks: &[Task]) -> Result<Vec<Task>, Vec<String>> {
    let index: BTreeMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut waiting: Vec<usize> = tasks.iter().map(|t| t.depends_on.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        for d in &t.depends_on {
            if let Some(&j) = index.get(d.as_str()) {
                dependents[j].push(i);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..tasks.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(tasks.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &k in &dependents[i] {
            waiting[k] -= 1;
            if waiting[k] == 0 {
                ready.insert(k);
            }
        }
    }
    if order.len() == tasks.len() {
        return Ok(order.into_iter().map(|i| tasks[i].clone()).collect());
    }
    // A cycle among what is left: walk dependencies from a left task until one repeats.
    let left: BTreeSet<usize> = (0..tasks.len()).filter(|&i| waiting[i] > 0).collect();
    let mut path: Vec<usize> = Vec::new();
    let mut at = left.first().copied().unwrap_or(0);
    loop {
        if let Some(pos) = path.iter().position(|&p| p == at) {
            let mut cycle: Vec<String> = path[pos..]
                .iter()
                .map(|&i| tasks[i].group.clone())
                .collect();
            cycle.dedup();
            cycle.push(tasks[at].group.clone());
            return Err(cycle);
        }
        path.push(at);
        let next = tasks[at]
            .depends_on
            .iter()
            .filter_map(|d| index.get(d.as_str()).copied())
            .find(|j| left.contains(j));
        match next {
            Some(j) => at = j,
            None => return Err(vec![tasks[at].group.clone()]),
        }
    }
}

/// One declared task: its own fields, its spec, its `for_each` items. `None` when it is too
/// broken to expand.
fn task(r: &mut Report, t: &Map<String, Value>, at: &Loc) -> Option<(Vec<String>, Vec<Task>)> {
    let name = match t.get("name") {
        Some(Value::String(s)) if is_dns_label(s) => Some(s.clone()),
        Some(Value::String(s)) => {
            let msg = format!("{s:?} is not a valid task name: use 1-63 of a-z, 0-9 and '-'");
            r.err(&at.at("name"), "value_error", msg);
            None
        }
        None | Some(Value::Null) => {
            r.err(&at.at("name"), "missing", "Field required");
            None
        }
        Some(_) => {
            r.err(
                &at.at("name"),
                "string_type",
                "Input should be a valid string",
            );
            None
        }
    };
    let deps = match t.get("depends_on") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .filter_map(|(j, d)| match d {
                Value::String(s) => Some(s.clone()),
                _ => {
                    r.err(
                        &at.at("depends_on").at(j),
                        "string_type",
                        "Input should be a valid string (a task's name)",
                    );
                    None
                }
            })
            .collect(),
        Some(_) => {
            r.err(
                &at.at("depends_on"),
                "list_type",
                "Input should be a list of task names",
            );
            Vec::new()
        }
    };
    let items = match t.get("for_each") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if !items.is_empty() => Some(items.clone()),
        Some(Value::Array(_)) => {
            r.err(
                &at.at("for_each"),
                "value_error",
                "for_each needs at least one item",
            );
            None
        }
        Some(_) => {
            r.err(&at.at("for_each"), "list_type", "Input should be a list");
            None
        }
    };
    let retries = retries(r, t, at);
    let timeout_sec = match t.get("timeout_sec") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_f64().is_some_and(|s| s > 0.0 && s <= 30.0 * 86_400.0) => {
            n.as_f64()
        }
        Some(_) => {
            r.err(
                &at.at("timeout_sec"),
                "value_error",
                "expected a number of seconds above 0 and at most 30 days",
            );
            None
        }
    };
    let mut spec: Map<String, Value> = t
        .iter()
        .filter(|(k, _)| !TASK_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if spec
        .get("restart_policy")
        .is_some_and(|p| !p.is_null() && p != "never" && p.get("type").is_none_or(|t| t != "never"))
    {
        r.err(
            &at.at("restart_policy"),
            "value_error",
            "a task runs to completion: use retries, not a restart policy",
        );
    }
    spec.insert("restart_policy".into(), Value::String("never".into()));
    // An attempt is retried, so by default it runs without a keeper (see `outlive_agent`).
    spec.entry("outlive_agent").or_insert(Value::Bool(false));
    let spec_ok = match parse_with_services(&serde_json::json!({ "spec": spec })) {
        Ok((_, services)) if services.binds.is_empty() && services.connects.is_empty() => true,
        Ok(_) => {
            r.err(
                &at.at("binds"),
                "value_error",
                "tasks do not bind or connect services (use an experiment)",
            );
            false
        }
        Err(errors) => {
            super::experiment::spec_errors_at(r, at, errors);
            false
        }
    };
    let (Some(name), true, Some(retries)) = (name, spec_ok, retries) else {
        return None;
    };
    let make = |task: String, spec: Map<String, Value>| Task {
        name: task,
        group: name.clone(),
        depends_on: Vec::new(),
        spec: Value::Object(spec),
        retries: retries.clone(),
        timeout_sec,
    };
    let expanded = match items {
        None => vec![make(name.clone(), spec)],
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let mut spec = spec.clone();
                let text = match item {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                super::experiment::add_env(&mut spec, "SYMPHONY_ITEM", &text);
                super::experiment::add_env(&mut spec, "SYMPHONY_ITEM_INDEX", &i.to_string());
                make(format!("{name}[{i}]"), spec)
            })
            .collect(),
    };
    Some((deps, expanded))
}

/// `retries` (a count of attempts or a mapping) and `retry_on`.
fn retries(r: &mut Report, t: &Map<String, Value>, at: &Loc) -> Option<Retries> {
    let mut out = Retries::default();
    let mut ok = true;
    let attempts = |r: &mut Report, v: &Value, loc: &Loc| -> Option<u32> {
        match Checked::<Int>::from_value(v.clone()) {
            Checked::Ok(n) => r
                .int_in(n, loc, 1, MAX_ATTEMPTS)
                .and_then(|n| u32::try_from(n).ok()),
            Checked::Bad(_) => {
                r.err(
                    loc,
                    "int_type",
                    "Input should be a valid integer (attempts in all)",
                );
                None
            }
        }
    };
    match t.get("retries") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            let loc = at.at("retries");
            for key in m.keys() {
                if !["max_attempts", "backoff_sec", "max_backoff_sec"].contains(&key.as_str()) {
                    let msg = "expected max_attempts, backoff_sec or max_backoff_sec";
                    r.err(&loc.at(key), "extra_forbidden", msg);
                    ok = false;
                }
            }
            if let Some(v) = m.get("max_attempts") {
                match attempts(r, v, &loc.at("max_attempts")) {
                    Some(n) => out.max_attempts = n,
                    None => ok = false,
                }
            }
            for (key, slot) in [
                ("backoff_sec", &mut out.backoff_sec),
                ("max_backoff_sec", &mut out.max_backoff_sec),
            ] {
                match m.get(key) {
                    None | Some(Value::Null) => {}
                    Some(v) => match v.as_f64() {
                        Some(s) if (0.0..=86_400.0).contains(&s) => *slot = s,
                        _ => {
                            let msg = "expected seconds from 0 to 86400";
                            r.err(&loc.at(key), "value_error", msg);
                            ok = false;
                        }
                    },
                }
            }
        }
        Some(v) => match attempts(r, v, &at.at("retries")) {
            Some(n) => out.max_attempts = n,
            None => ok = false,
        },
    }
    match t.get("retry_on") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let items: Vec<Value> = match v {
                Value::Array(list) => list.clone(),
                other => vec![other.clone()],
            };
            let mut on = RetryOn::default();
            // Items add up, in any order: `any` or `failure` takes every failing exit, so exit
            // codes named beside them narrow nothing.
            let mut every_failure = false;
            for (j, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) if s == "any" => {
                        every_failure = true;
                        on.node_lost = true;
                        on.timeout = true;
                    }
                    Value::String(s) if s == "failure" => every_failure = true,
                    Value::String(s) if s == "node_lost" => on.node_lost = true,
                    Value::String(s) if s == "timeout" => on.timeout = true,
                    Value::Number(n) if n.as_i64().is_some_and(|c| (1..=255).contains(&c)) => {
                        on.exit_codes
                            .insert(i32::try_from(n.as_i64().unwrap_or(1)).unwrap_or(1));
                    }
                    _ => {
                        let msg =
                            "expected any, failure, node_lost, timeout or an exit code (1-255)";
                        r.err(&at.at("retry_on").at(j), "value_error", msg);
                        ok = false;
                    }
                }
            }
            if every_failure {
                on.exit_codes.clear();
            }
            on.failure = every_failure || !on.exit_codes.is_empty();
            out.retry_on = on;
        }
    }
    (ok && out.max_backoff_sec >= out.backoff_sec)
        .then_some(out)
        .or_else(|| {
            if ok {
                r.err(
                    &at.at("retries").at("max_backoff_sec"),
                    "value_error",
                    "max_backoff_sec must not be below backoff_sec",
                );
            }
            None
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cmd() -> Value {
        json!({"command": ["true"]})
    }

    fn locs(errors: &[FieldError]) -> Vec<String> {
        errors.iter().map(|e| e.loc.join(".")).collect()
    }

    #[test]
    fn the_diamond_is_ordered_with_its_dependencies_expanded() {
        let w = parse_workflow(&json!({"name": "diamond", "tasks": [
            {"name": "d", "depends_on": ["b", "c"], "config": cmd()},
            {"name": "b", "depends_on": "a", "config": cmd()},
            {"name": "c", "depends_on": ["a"], "config": cmd(), "retries": 3},
            {"name": "a", "config": cmd()},
        ]}))
        .unwrap();
        let order: Vec<&str> = w.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert_eq!(w.tasks[3].depends_on, ["b", "c"]);
        assert_eq!(w.tasks[2].retries.max_attempts, 3);
        assert_eq!(w.tasks[0].retries.max_attempts, 1);
        assert_eq!(w.tasks[0].spec["restart_policy"], "never");
        assert_eq!(w.tasks[0].spec["outlive_agent"], false);
        assert!(!w.fail_fast);
    }

    #[test]
    fn for_each_fans_out_and_dependents_wait_for_every_item() {
        let w = parse_workflow(&json!({"name": "sweep", "tasks": [
            {"name": "train", "for_each": [0.1, "x"], "config": cmd()},
            {"name": "report", "depends_on": ["train", "train"], "config": cmd()},
        ]}))
        .unwrap();
        let names: Vec<&str> = w.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["train[0]", "train[1]", "report"]);
        // Named twice, each item is one dependency.
        assert_eq!(w.tasks[2].depends_on, ["train[0]", "train[1]"]);
        assert_eq!(w.tasks[0].spec["env"]["SYMPHONY_ITEM"], "0.1");
        assert_eq!(w.tasks[1].spec["env"]["SYMPHONY_ITEM"], "x");
        assert_eq!(w.tasks[1].spec["env"]["SYMPHONY_ITEM_INDEX"], "1");
        assert_eq!(w.tasks[1].group, "train");
    }

    #[test]
    fn cycles_unknown_dependencies_and_duplicates_name_the_tasks() {
        let e = parse_workflow(&json!({"name": "w", "tasks": [
            {"name": "a", "depends_on": ["c"], "config": cmd()},
            {"name": "b", "depends_on": ["a"], "config": cmd()},
            {"name": "c", "depends_on": ["b"], "config": cmd()},
            {"name": "z", "config": cmd()},
        ]}))
        .unwrap_err();
        assert_eq!(locs(&e), ["body.tasks"]);
        assert!(e[0].msg.contains("cycle"), "{e:?}");
        for t in ["a", "b", "c"] {
            assert!(e[0].msg.contains(t), "{e:?}");
        }
        assert!(!e[0].msg.contains('z'), "{e:?}");

        let e = parse_workflow(&json!({"name": "w", "tasks": [
            {"name": "a", "depends_on": ["nope"], "config": cmd()},
            {"name": "a", "config": cmd()},
        ]}))
        .unwrap_err();
        assert_eq!(
            locs(&e),
            ["body.tasks.1.name", "body.tasks.0.depends_on.0"],
            "{e:?}"
        );
        assert!(e[1].msg.contains("\"a\"") && e[1].msg.contains("\"nope\""));

        let e = parse_workflow(&json!({"name": "w", "tasks": [
            {"name": "self", "depends_on": ["self"], "config": cmd()}]}))
        .unwrap_err();
        assert!(e[0].msg.contains("self -> self"), "{e:?}");
    }

    #[test]
    fn bad_fields_are_named_under_their_task() {
        let e = parse_workflow(
            &json!({"name": "Bad Name", "max_running": 2, "resume_below": 3,
            "tasks": [
                {"name": "a", "config": {"command": "not a list"}},
                {"name": "b", "config": cmd(), "retries": 0, "retry_on": ["sometimes"],
                 "timeout_sec": -1},
                {"name": "c", "config": cmd(), "restart_policy": "always"},
                {"config": cmd()},
            ]}),
        )
        .unwrap_err();
        let l = locs(&e);
        for want in [
            "body.name",
            "body.resume_below",
            "body.tasks.0.config.command",
            "body.tasks.1.retries",
            "body.tasks.1.retry_on.0",
            "body.tasks.1.timeout_sec",
            "body.tasks.2.restart_policy",
            "body.tasks.3.name",
        ] {
            assert!(l.iter().any(|x| x == want), "{want} missing in {l:?}");
        }
        let e = parse_workflow(&json!({"name": "w", "tasks": []})).unwrap_err();
        assert_eq!(locs(&e), ["body.tasks"]);
        let e = parse_workflow(&json!({"name": "w", "schedule": {"cron": "61 * * * *"},
            "tasks": [{"name": "a", "config": cmd()}]}))
        .unwrap_err();
        assert_eq!(locs(&e), ["body.schedule.cron"]);
    }

    #[test]
    fn retries_and_retry_on_forms() {
        let w = parse_workflow(&json!({"name": "w", "max_running": 3, "resume_below": 1,
            "fail_fast": true, "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Paris"},
            "tasks": [{"name": "a", "config": cmd(),
                "retries": {"max_attempts": 5, "backoff_sec": 0.5, "max_backoff_sec": 4},
                "retry_on": [75, "node_lost"], "timeout_sec": 30}]}))
        .unwrap();
        let t = &w.tasks[0];
        assert_eq!(t.retries.max_attempts, 5);
        assert!((t.retries.backoff_sec - 0.5).abs() < f64::EPSILON);
        assert_eq!(t.retries.retry_on.exit_codes, BTreeSet::from([75]));
        assert!(t.retries.retry_on.node_lost && !t.retries.retry_on.timeout);
        assert_eq!(t.timeout_sec, Some(30.0));
        assert_eq!((w.max_running, w.resume_below), (Some(3), Some(1)));
        assert!(w.fail_fast);
        assert_eq!(
            w.schedule,
            Some(("0 3 * * *".into(), "Europe/Paris".into()))
        );
        // Items add up in any order; `any` or `failure` beside exit codes takes every failure.
        let on = |list: Value| {
            parse_workflow(&json!({"name": "w", "tasks": [
                {"name": "a", "config": cmd(), "retry_on": list}]}))
            .unwrap()
            .tasks[0]
                .retries
                .retry_on
                .clone()
        };
        assert_eq!(on(json!(["any", 75])), RetryOn::any());
        assert_eq!(on(json!([75, "any"])), RetryOn::any());
        let failure = on(json!([75, "failure"]));
        assert_eq!(failure, on(json!(["failure", 75])));
        assert!(failure.failure && failure.exit_codes.is_empty() && !failure.node_lost);
    }
}
