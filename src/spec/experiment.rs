//! Experiment declarations: a named set of processes launched as one unit, the SurrealAI
//! seed's model (see `experiments-and-workflows.md`). Pure: this reads and validates a whole
//! declaration; creating its deployments is the conductor's.
//!
//! ```yaml
//! name: rl-run
//! placement: gang            # optional: spread (default) or gang (all or nothing)
//! processes:
//!   - name: learner
//!     group: trainer         # optional: processes of a group share a node
//!     config: {command: [python, learner.py]}
//!     binds: [replay-server, parameter-server]
//!   - name: agent
//!     replicas: 8            # agent-0 .. agent-7, with SYMPHONY_REPLICA_INDEX / _REPLICAS
//!     on_failure: stop-experiment
//!     config: {command: [python, agent.py]}
//!     connects: [replay-server, parameter-server]
//! ```
//!
//! A process is a deployment spec (every field of `spec`) plus `name`, `group`, `replicas` and
//! `on_failure`. The whole declaration is checked before anything exists: each process's spec
//! (errors at `processes.N...`), names (DNS labels, unique after replicas are expanded), a
//! `connects` that no process of the experiment binds (the seed's "connected but not binded",
//! naming both), a name bound twice, a fixed port used twice, a replicated process that binds
//! (N copies cannot all own one name).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::checked::{Checked, Int, Loc, Object, Opt, Report};
use super::model::{DEFAULT_NAMESPACE, FieldError, Services, is_dns_label};
use super::validate::parse_with_services;

/// Largest `replicas`.
pub const MAX_REPLICAS: i64 = 1000;

/// Most processes in one experiment, replicas expanded.
pub const MAX_PROCESSES: usize = 10_000;

/// Where an experiment's processes may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Each process (or process group) on its own, as capacity allows.
    Spread,
    /// Nothing runs until every process fits.
    Gang,
}

impl Placement {
    /// The declaration's (and the store's) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Spread => "spread",
            Placement::Gang => "gang",
        }
    }

    /// The placement named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [Placement::Spread, Placement::Gang]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

/// What a failed process does to the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Only its own restart policy applies.
    Restart,
    /// The whole experiment is stopped (one dead rank makes the rest useless).
    StopExperiment,
}

impl OnFailure {
    /// The declaration's (and the store's) name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Restart => "restart",
            OnFailure::StopExperiment => "stop-experiment",
        }
    }

    /// The policy named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [OnFailure::Restart, OnFailure::StopExperiment]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

/// A validated experiment, replicas expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    /// With the user prefix, if one was given.
    pub name: String,
    pub placement: Placement,
    pub processes: Vec<Process>,
}

/// One process: a deployment to create.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    /// Unique in the experiment (`agent-3` for a replica).
    pub name: String,
    /// Its position in the declaration's `processes` (shared by a process's replicas).
    pub index: usize,
    pub group: Option<String>,
    pub on_failure: OnFailure,
    /// The deployment's `spec` (a replica's carries `SYMPHONY_REPLICA_INDEX` and
    /// `SYMPHONY_REPLICAS` in its `env`).
    pub spec: Value,
    /// Its `binds` / `connects` / `exposes`.
    pub services: Services,
}

/// A declared process, read as a mapping (its spec part is checked by the spec's parser).
type ProcessWire = Checked<Object<Map<String, Value>>>;

/// The fields a process has beyond a deployment spec.
const PROCESS_KEYS: [&str; 4] = ["name", "group", "replicas", "on_failure"];

#[derive(Debug, serde::Deserialize)]
struct ExperimentWire {
    #[serde(default)]
    name: Opt<String>,
    #[serde(default)]
    placement: Opt<String>,
    #[serde(default)]
    processes: Opt<Vec<ProcessWire>>,
}

/// The experiment name a user launches as: `user-name`, unless the name already starts with
/// the user (the seed's `set_username`).
pub fn with_user(name: &str, user: Option<&str>) -> String {
    match user {
        Some(u) if !u.is_empty() && !name.starts_with(u) => format!("{u}-{name}"),
        _ => name.to_owned(),
    }
}

/// Reads and validates a declaration (the request body); errors are located under `body`.
pub fn parse_experiment(decl: &Value, user: Option<&str>) -> Result<Experiment, Vec<FieldError>> {
    let root = Loc::new(&["body"]);
    let mut r = Report::default();
    let parsed = Checked::<Object<ExperimentWire>>::from_value(decl.clone());
    let experiment = r.checked(&parsed, &root).and_then(|Object(w)| {
        let name = r
            .required(&w.name, &root.at("name"))
            .map(|n| with_user(n, user));
        if let Some(n) = &name
            && !is_dns_label(n)
        {
            r.err(
                &root.at("name"),
                "value_error",
                format!("{n:?} is not a valid experiment name: use 1-63 of a-z, 0-9 and '-'"),
            );
        }
        if name.as_deref() == Some(DEFAULT_NAMESPACE) {
            r.err(
                &root.at("name"),
                "value_error",
                format!("{DEFAULT_NAMESPACE:?} is the namespace of deployments outside experiments; pick another name"),
            );
        }
        let placement = match r
            .opt(&w.placement, &root.at("placement"))
            .map(String::as_str)
        {
            None => Placement::Spread,
            Some(name) => Placement::from_name(name).unwrap_or_else(|| {
                r.err(
                    &root.at("placement"),
                    "value_error",
                    format!("expected spread or gang, got {name:?}"),
                );
                Placement::Spread
            }),
        };
        let mut processes = processes(&mut r, &w.processes, &root.at("processes"));
        if let Some(n) = &name {
            name_processes(n, &mut processes);
        }
        Some(Experiment {
            name: name?,
            placement,
            processes,
        })
    });
    r.finish(experiment)
}

/// Every process, replicas expanded, then the checks across processes.
fn processes(r: &mut Report, field: &Opt<Vec<ProcessWire>>, loc: &Loc) -> Vec<Process> {
    let Some(list) = r.required(field, loc) else {
        return Vec::new();
    };
    if list.is_empty() {
        r.err(
            loc,
            "value_error",
            "an experiment needs at least one process",
        );
    }
    let mut out: Vec<(Loc, Process)> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = loc.at(i);
        if out.len() > MAX_PROCESSES {
            // Nothing past the limit is expanded (each replica is a copy of its spec).
            let msg =
                format!("an experiment has at most {MAX_PROCESSES} processes (replicas counted)");
            r.err(&at, "value_error", msg);
            break;
        }
        if let Some(Object(p)) = r.checked(p, &at) {
            out.extend(process(r, p, &at, i).into_iter().map(|p| (at.clone(), p)));
        }
    }
    if out.len() > MAX_PROCESSES {
        let msg = format!("an experiment has at most {MAX_PROCESSES} processes (replicas counted)");
        r.err(loc, "value_error", msg);
    }
    across(r, &out);
    out.into_iter().map(|(_, p)| p).collect()
}

/// One declared process: its own fields, its spec, its replicas.
fn process(r: &mut Report, p: &Map<String, Value>, at: &Loc, index: usize) -> Vec<Process> {
    let text = |r: &mut Report, key: &str| -> Option<String> {
        match p.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if is_dns_label(s) => Some(s.clone()),
            Some(Value::String(s)) => {
                let msg = format!("{s:?} is not a valid {key}: use 1-63 of a-z, 0-9 and '-'");
                r.err(&at.at(key), "value_error", msg);
                None
            }
            Some(_) => {
                r.err(&at.at(key), "string_type", "Input should be a valid string");
                None
            }
        }
    };
    let name = text(r, "name");
    if p.get("name").is_none_or(Value::is_null) {
        r.err(&at.at("name"), "missing", "Field required");
    }
    let group = text(r, "group");
    let replicas = match p.get("replicas") {
        None | Some(Value::Null) => None,
        Some(v) => match Checked::<Int>::from_value(v.clone()) {
            Checked::Ok(n) => r.int_in(n, &at.at("replicas"), 1, MAX_REPLICAS),
            Checked::Bad(_) => {
                r.err(
                    &at.at("replicas"),
                    "int_type",
                    "Input should be a valid integer",
                );
                None
            }
        },
    };
    let on_failure = match p.get("on_failure") {
        None | Some(Value::Null) => Some(OnFailure::Restart),
        Some(Value::String(s)) => OnFailure::from_name(s),
        Some(_) => None,
    }
    .unwrap_or_else(|| {
        r.err(
            &at.at("on_failure"),
            "value_error",
            "expected restart or stop-experiment",
        );
        OnFailure::Restart
    });
    let spec: Map<String, Value> = p
        .iter()
        .filter(|(k, _)| !PROCESS_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let services = match parse_with_services(&serde_json::json!({ "spec": spec })) {
        Ok((_, services)) => Some(services),
        Err(errors) => {
            spec_errors_at(r, at, errors);
            None
        }
    };
    let (Some(name), Some(services)) = (name, services) else {
        return Vec::new();
    };
    let Some(n) = replicas else {
        return vec![Process {
            name,
            index,
            group,
            on_failure,
            spec: Value::Object(spec),
            services,
        }];
    };
    if !services.binds.is_empty() {
        r.err(
            &at.at("replicas"),
            "value_error",
            format!("process {name:?} binds services, so it cannot have replicas (each name has one binder)"),
        );
        return Vec::new();
    }
    (0..n)
        .map(|i| {
            let mut spec = spec.clone();
            add_env(&mut spec, "SYMPHONY_REPLICA_INDEX", &i.to_string());
            add_env(&mut spec, "SYMPHONY_REPLICAS", &n.to_string());
            Process {
                name: format!("{name}-{i}"),
                index,
                group: group.clone(),
                on_failure,
                spec: Value::Object(spec),
                services: services.clone(),
            }
        })
        .collect()
}

/// A spec's errors (`body.specification.spec.X`) reported where the spec sits in a
/// declaration (`AT.X`: a process's or a task's place).
pub(super) fn spec_errors_at(r: &mut Report, at: &Loc, errors: Vec<FieldError>) {
    for e in errors {
        let mut loc = at.clone();
        for part in e.loc.iter().skip(3) {
            loc = loc.at(part);
        }
        r.err(&loc, &e.kind, e.msg);
    }
}

/// Adds a variable to a process's environment: to `env` if that is a mapping, else to
/// `config.env` if that is one (a spec's `env` wins over `config.env`, so a new `env` would
/// hide the user's), else to a new `env`.
pub fn add_env(spec: &mut Map<String, Value>, key: &str, value: &str) {
    let in_config = !spec.get("env").is_some_and(Value::is_object)
        && spec
            .get("config")
            .and_then(|c| c.get("env"))
            .is_some_and(Value::is_object);
    let env = if in_config {
        spec.get_mut("config").and_then(|c| c.get_mut("env"))
    } else {
        // Absent or `null` (YAML `env:` with nothing after it): a new mapping.
        let env = spec
            .entry("env")
            .or_insert_with(|| Value::Object(Map::new()));
        if env.is_null() {
            *env = Value::Object(Map::new());
        }
        Some(env)
    };
    if let Some(Value::Object(env)) = env {
        env.insert(key.to_owned(), Value::String(value.to_owned()));
    }
}

/// Every process knows its experiment and name (`SYMPHONY_EXPERIMENT`, `SYMPHONY_PROCESS`).
fn name_processes(experiment: &str, processes: &mut [Process]) {
    for p in processes {
        if let Value::Object(spec) = &mut p.spec {
            add_env(spec, "SYMPHONY_EXPERIMENT", experiment);
            add_env(spec, "SYMPHONY_PROCESS", &p.name);
        }
    }
}

/// Names unique, each service bound once (and each fixed port used once), every `connects`
/// bound by some process.
fn across(r: &mut Report, processes: &[(Loc, Process)]) {
    let mut names = BTreeSet::new();
    let mut binders: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    for (at, p) in processes {
        if !names.insert(p.name.as_str()) {
            let msg = format!("two processes are named {:?}", p.name);
            r.err(&at.at("name"), "value_error", msg);
        }
        for (j, b) in p.services.binds.iter().enumerate() {
            if let Some(other) = binders.insert(&b.name, &p.name) {
                let msg = format!(
                    "service {:?} is bound by process {other:?} already (each name has one binder)",
                    b.name
                );
                r.err(&at.at("binds").at(j), "value_error", msg);
            }
            if let Some(port) = b.port
                && let Some(other) = ports.insert(port, &b.name)
            {
                let msg = format!("port {port} is taken by service {other:?} already");
                r.err(&at.at("binds").at(j), "value_error", msg);
            }
        }
    }
    // A process group shares a node: its members cannot ask for different node groups.
    let mut node_groups: BTreeMap<&str, (&str, Option<&Value>)> = BTreeMap::new();
    for (at, p) in processes {
        let Some(g) = p.group.as_deref() else {
            continue;
        };
        let asked = p
            .spec
            .get("node_group")
            .filter(|v| !v.is_null() && v.as_str() != Some(""));
        match node_groups.get(g) {
            Some((first, theirs)) if *theirs != asked => {
                let msg = format!(
                    "process {:?} asks for another node_group than process {first:?} of its group {g:?} (a group shares one node)",
                    p.name
                );
                r.err(&at.at("node_group"), "value_error", msg);
            }
            Some(_) => {}
            None => {
                node_groups.insert(g, (&p.name, asked));
            }
        }
    }
    for (at, p) in processes {
        for (j, c) in p.services.connects.iter().enumerate() {
            if !binders.contains_key(c.as_str()) {
                let msg = format!(
                    "service {c:?} is connected by process {:?} but not bound by any process of the experiment",
                    p.name
                );
                r.err(&at.at("connects").at(j), "value_error", msg);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The seed's RL example: a learner binding two services, agents connecting to both.
    fn rl(agents: i64) -> Value {
        json!({
            "name": "rl-run",
            "placement": "gang",
            "processes": [
                {"name": "learner", "group": "trainer",
                 "config": {"command": ["python", "learner.py"]},
                 "binds": ["replay-server", {"parameter-server": 7100}],
                 "exposes": ["parameter-server"]},
                {"name": "agent", "replicas": agents, "on_failure": "stop-experiment",
                 "config": {"command": ["python", "agent.py"]},
                 "env": {"SEED": "1"},
                 "connects": ["replay-server", "parameter-server"]},
            ]
        })
    }

    /// `(loc, msg)` of every error, locations joined with dots.
    fn errors(decl: &Value) -> Vec<(String, String)> {
        parse_experiment(decl, None)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.loc.join("."), e.msg))
            .collect()
    }

    #[test]
    fn the_rl_example_expands_its_replicas_with_their_index() {
        let e = parse_experiment(&rl(3), None).unwrap();
        assert_eq!(e.name, "rl-run");
        assert_eq!(e.placement, Placement::Gang);
        let names: Vec<&str> = e.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["learner", "agent-0", "agent-1", "agent-2"]);
        let learner = &e.processes[0];
        assert_eq!(learner.group.as_deref(), Some("trainer"));
        assert_eq!(learner.on_failure, OnFailure::Restart);
        assert_eq!(learner.services.binds[1].port, Some(7100));
        assert_eq!(learner.services.exposes, ["parameter-server"]);
        // The process's own keys are not part of the deployment spec.
        assert!(learner.spec.get("name").is_none() && learner.spec.get("group").is_none());
        assert_eq!(learner.spec["binds"][0], "replay-server");
        let agent = &e.processes[2];
        assert_eq!(agent.on_failure, OnFailure::StopExperiment);
        assert_eq!(
            agent.spec["env"],
            json!({"SEED": "1", "SYMPHONY_REPLICA_INDEX": "1", "SYMPHONY_REPLICAS": "3",
                   "SYMPHONY_EXPERIMENT": "rl-run", "SYMPHONY_PROCESS": "agent-1"})
        );
        assert_eq!((learner.index, agent.index), (0, 1));
        // Variables go where the user's are: `config.env` when that is the mapping given.
        let mut d = rl(1);
        d["processes"][1]["config"]["env"] = d["processes"][1]["env"].take();
        d["processes"][1].as_object_mut().unwrap().remove("env");
        let e = parse_experiment(&d, None).unwrap();
        assert!(e.processes[1].spec.get("env").is_none());
        assert_eq!(e.processes[1].spec["config"]["env"]["SEED"], "1");
        assert_eq!(
            e.processes[1].spec["config"]["env"]["SYMPHONY_REPLICAS"],
            "1"
        );
        assert!(agent.spec.get("replicas").is_none());
        assert_eq!(
            agent.services.connects,
            ["replay-server", "parameter-server"]
        );
    }

    #[test]
    fn a_user_prefixes_the_name_unless_it_is_there_already() {
        assert_eq!(with_user("rl", Some("sarah")), "sarah-rl");
        assert_eq!(with_user("sarah-rl", Some("sarah")), "sarah-rl");
        assert_eq!(with_user("rl", None), "rl");
        let e = parse_experiment(&rl(1), Some("sarah")).unwrap();
        assert_eq!(e.name, "sarah-rl-run");
    }

    #[test]
    fn a_connect_nothing_binds_is_refused_naming_both() {
        let mut d = rl(2);
        d["processes"][1]["connects"] = json!(["replay-server", "nope"]);
        assert_eq!(
            errors(&d),
            [(
                "body.processes.1.connects.1".to_owned(),
                "service \"nope\" is connected by process \"agent-0\" but not bound by any process of the experiment".to_owned()
            ), (
                "body.processes.1.connects.1".to_owned(),
                "service \"nope\" is connected by process \"agent-1\" but not bound by any process of the experiment".to_owned()
            )]
        );
    }

    #[test]
    fn duplicates_are_refused_where_they_stand() {
        // A second process of the same name, binding a name and a port already taken.
        let d = json!({"name": "x", "processes": [
            {"name": "a", "config": {"command": ["true"]}, "binds": [{"s": 7100}]},
            {"name": "a", "config": {"command": ["true"]}, "binds": ["s", {"t": 7100}]},
            {"name": "b-0", "config": {"command": ["true"]}},
            {"name": "b", "replicas": 2, "config": {"command": ["true"]}},
        ]});
        let locs: Vec<String> = errors(&d).into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            locs,
            [
                "body.processes.1.name",
                "body.processes.1.binds.0",
                "body.processes.1.binds.1",
                "body.processes.3.name",
            ]
        );
    }

    #[test]
    fn bad_fields_are_located_in_the_process_and_every_one_is_reported() {
        let d = json!({"name": "Bad_Name", "placement": "all", "processes": [
            {"config": {"command": 5}},
            {"name": "p", "replicas": 0, "group": "G", "on_failure": "panic",
             "config": {"command": ["true"]}, "restart_policy": "sometimes"},
            {"name": "q", "replicas": 2, "config": {"command": ["true"]}, "binds": ["s"]},
            "not a process",
        ]});
        let locs: Vec<String> = errors(&d).into_iter().map(|(l, _)| l).collect();
        for want in [
            "body.name",
            "body.placement",
            "body.processes.0.name",
            "body.processes.0.config.command",
            "body.processes.1.group",
            "body.processes.1.replicas",
            "body.processes.1.on_failure",
            "body.processes.1.restart_policy",
            "body.processes.2.replicas",
            "body.processes.3",
        ] {
            assert!(
                locs.iter().any(|l| l == want),
                "{want} missing from {locs:?}"
            );
        }
        assert_eq!(
            errors(&json!({"name": "x", "processes": []}))[0].0,
            "body.processes"
        );
        assert_eq!(errors(&json!([1]))[0].0, "body");
        let default = json!({"name": "default", "processes": [{"name": "a", "config": {"command": ["true"]}}]});
        assert_eq!(errors(&default)[0].0, "body.name");
        // Members of one process group must agree on the node group.
        let split = json!({"name": "x", "processes": [
            {"name": "a", "group": "g", "node_group": "gpu", "config": {"command": ["true"]}},
            {"name": "b", "group": "g", "config": {"command": ["true"]}},
            {"name": "c", "group": "h", "config": {"command": ["true"]}},
        ]});
        assert_eq!(errors(&split)[0].0, "body.processes.1.node_group");
        // Too many processes once replicas are expanded; the rest is not even expanded.
        let many: Vec<Value> = (0..20)
            .map(|i| json!({"name": format!("p{i}"), "replicas": 1000, "config": {"command": ["true"]}}))
            .collect();
        let errs = errors(&json!({"name": "x", "processes": many}));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].0, "body.processes.11");
        assert_eq!(errs[1].0, "body.processes");
        assert_eq!(errors(&json!({"processes": []}))[0].0, "body.name");
    }
}
