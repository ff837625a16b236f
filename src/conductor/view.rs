//! The immutable snapshot of cluster state that the API reads (published by the core on a
//! `watch` channel), and the pure functions that build its parts from the core's state.
//!
//! The JSON shapes are the shared API types of [`crate::model`] (the client reads the same
//! types). They follow the original's JSON (section 6 of the reference) plus our fixes:
//! `current_state` reflects failures, a `status` object, connection facts per node.
//! Nothing here does IO or reads a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use super::store::{CondaEnvRecord, DeploymentRecord, ExperimentRecord};
pub use crate::model::{
    AssignedRef, CoreUsage, CpuDynamic, CpuStatic, CurrentState, Deployment, DesiredState, Gpu,
    MemoryDynamic, MemoryStatic, Node, NodeCertificate, NodeConnection, NodeCpu, NodeMemory,
    RunStatus, StorageMount,
};
use crate::model::{DeploymentId, ExperimentInfo, ExperimentProcess, Generation, NodeId};
use crate::scheduler::{self, Unplaced};
use crate::wire;

/// Everything the API reads.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Newest first.
    pub deployments: Vec<Arc<Deployment>>,
    pub nodes: BTreeMap<String, Node>,
    /// Newest first.
    pub conda_envs: Vec<CondaEnvRecord>,
    /// By namespace and name.
    pub services: Vec<crate::model::ServiceInfo>,
    /// Newest first (declarations left out; the API adds one on `GET /experiments/{name}`).
    pub experiments: Vec<Arc<ExperimentInfo>>,
    /// Workflow runs, newest first.
    pub runs: Vec<Arc<super::runs::Run>>,
    /// Each workflow's newest version, by name.
    pub workflows: Vec<Arc<super::core::WorkflowInfo>>,
}

impl ClusterView {
    pub fn deployment(&self, id: &str) -> Option<&Arc<Deployment>> {
        self.deployments.iter().find(|d| d.id == id)
    }
}

/// What the core knows about one deployment, borrowed for [`deployment`].
#[derive(Debug, Clone, Copy)]
pub struct DeploymentFacts<'a> {
    pub record: &'a DeploymentRecord,
    /// Why its spec is invalid, if it is.
    pub invalid: Option<&'a str>,
    pub assignment: Option<&'a scheduler::Assignment>,
    /// The node's last report, with the node that sent it, only when it is about the current
    /// assignment (the only report that describes what runs now).
    pub reported: Option<(&'a str, &'a wire::DeploymentStatus)>,
    /// Why the scheduler could not place it, if it tried.
    pub unplaced: Option<Unplaced>,
    /// Whether any node is online.
    pub any_online: bool,
    /// Its GPU use, from its node's last heartbeat.
    pub gpus: &'a [&'a wire::DeploymentGpu],
}

/// The API's view of one deployment; `specification` is the masked spec.
pub fn deployment(f: DeploymentFacts<'_>, specification: Arc<Value>) -> Deployment {
    let d = f.record;
    let status = f.reported.map(|(node_id, s)| RunStatus {
        state: CurrentState::from_wire(&s.state),
        pid: s.pid,
        restart_count: s.restart_count,
        last_exit_code: s.last_exit_code,
        reason: (!s.reason.is_empty()).then(|| s.reason.clone()),
        generation: Generation(s.generation),
        started_at_ms: s.started_at_ms,
        stopped_at_ms: s.stopped_at_ms,
        node_id: NodeId::from(node_id),
        gpus: f
            .gpus
            .iter()
            .map(|g| crate::model::GpuUse {
                gpu_index: g.gpu_index,
                memory_bytes: g.memory_bytes,
                util_percent: g.util_percent,
                processes: g.processes,
            })
            .collect(),
    });
    Deployment {
        id: DeploymentId::from(d.id.as_str()),
        name: d.name.clone(),
        desired_state: d.desired_state,
        current_state: Some(current_state(
            f.invalid.is_some(),
            d.desired_state,
            f.assignment.is_some(),
            f.reported.map(|(_, s)| s.state.as_str()),
        )),
        kind: d.kind.clone(),
        specification,
        created_at_ms: d.created_at_ms,
        updated_at_ms: d.updated_at_ms,
        assigned_node_id: f.assignment.map(|a| NodeId::from(a.node_id.as_str())),
        assignment_reason: assignment_reason(&f),
        status,
    }
}

/// The observed state shown for a deployment: `FAILED` for an invalid spec, `STOPPED` for a
/// stopped one that no node holds, else what its node reports (`BACKOFF` shown as
/// `CRASHED`), and `PENDING` before any report.
pub fn current_state(
    invalid: bool,
    desired: DesiredState,
    assigned: bool,
    reported: Option<&str>,
) -> CurrentState {
    if invalid {
        CurrentState::Failed
    } else if desired == DesiredState::Stopped && !assigned {
        CurrentState::Stopped
    } else {
        match reported.map(CurrentState::from_wire) {
            Some(CurrentState::Backoff) => CurrentState::Crashed,
            Some(s) => s,
            None => CurrentState::Pending,
        }
    }
}

/// Why a deployment is not placed; `None` when it is, or when it is stopped.
fn assignment_reason(f: &DeploymentFacts<'_>) -> Option<String> {
    if let Some(why) = f.invalid {
        Some(format!("Invalid Spec: {why}"))
    } else if f.assignment.is_some() || f.record.desired_state == DesiredState::Stopped {
        None
    } else if !f.any_online {
        Some("No Node".to_owned())
    } else {
        Some(
            f.unplaced
                .map_or_else(|| "Pending".to_owned(), |u| u.to_string()),
        )
    }
}

/// What the core knows about one node, borrowed for [`node`].
#[derive(Debug, Clone, Copy)]
pub struct NodeFacts<'a> {
    pub id: &'a str,
    pub state: scheduler::NodeState,
    pub groups: &'a [String],
    pub capacities_total: &'a BTreeMap<String, i64>,
    /// Reserved by the conductor's own assignments.
    pub reserved: Option<&'a BTreeMap<String, i64>>,
    pub last_heartbeat_ms: Option<i64>,
    /// What it reported in its Hello.
    pub resources: Option<&'a wire::StaticResources>,
    /// Its latest heartbeat.
    pub usage: Option<&'a wire::Heartbeat>,
    /// The envs it has.
    pub env_names: &'a BTreeSet<String>,
    /// The envs the conductor defines.
    pub defined_envs: &'a BTreeSet<String>,
    pub env_problems: &'a [String],
}

/// The API's view of one node; `assigned` and `connection` come from the caller.
pub fn node(
    f: NodeFacts<'_>,
    assigned: Vec<AssignedRef>,
    connection: Option<NodeConnection>,
) -> Node {
    let state = f.state.as_str();
    let no_resources = wire::StaticResources::default();
    let res = f.resources.unwrap_or(&no_resources);
    let hb = f.usage;
    Node {
        node_id: NodeId::from(f.id),
        state: state.to_owned(),
        groups: f.groups.to_vec(),
        capacities_total: f.capacities_total.clone(),
        total_capacities_used: f.reserved.cloned().unwrap_or_default(),
        last_heartbeat: f.last_heartbeat_ms.and_then(|ms| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        }),
        dynamic_timestamp_unix_ms: hb.map(|h| h.timestamp_unix_ms),
        cpu: NodeCpu {
            static_: CpuStatic {
                logical_cores: res.logical_cores,
                max_millicores_total: u64::from(res.logical_cores) * 1000,
            },
            dynamic: hb.map(|h| CpuDynamic {
                per_core: h
                    .per_core
                    .iter()
                    .map(|c| CoreUsage {
                        core_id: c.core_id,
                        used_percent: c.used_percent,
                    })
                    .collect(),
                total_percent: h.cpu_total_percent,
            }),
        },
        memory: NodeMemory {
            static_: MemoryStatic {
                total_bytes: res.memory_total_bytes,
            },
            dynamic: hb.map(|h| MemoryDynamic {
                available_bytes: h.mem_available_bytes,
                buffers_bytes: h.mem_buffers_bytes,
                cached_bytes: h.mem_cached_bytes,
                free_bytes: h.mem_free_bytes,
                used_bytes: h.mem_used_bytes,
                used_percent: h.mem_used_percent,
            }),
        },
        storage_mounts: hb
            .map_or(&res.storage, |h| &h.storage)
            .iter()
            .map(storage_mount)
            .collect(),
        gpus: hb.map_or(&res.gpus, |h| &h.gpus).iter().map(gpu).collect(),
        assigned_deployments: assigned,
        conda_envs: f.env_names.iter().cloned().collect(),
        // What the scheduler uses: an online node takes any deployment whose group, env and
        // capacity fit (the original's "has every env" notion misled).
        schedulable: f.state == scheduler::NodeState::Online,
        missing_conda_envs: f.defined_envs.difference(f.env_names).cloned().collect(),
        env_problems: f.env_problems.to_vec(),
        problems: hb.map(|h| h.problems.clone()).unwrap_or_default(),
        connection,
        certificate: None,
    }
}

/// What `/nodes` says of a node's certificate.
pub fn certificate(t: &crate::conductor::trust::NodeTrust, now_ms: i64) -> NodeCertificate {
    let (state, reason) = t.state(now_ms);
    NodeCertificate {
        state: state.to_owned(),
        reason,
        not_after_ms: t.not_after_ms,
        allowed_groups: t.groups.as_ref().map(|g| g.iter().cloned().collect()),
        token_id: t.token_id.clone(),
    }
}

fn storage_mount(m: &wire::StorageMount) -> StorageMount {
    StorageMount {
        available_bytes: m.available_bytes,
        fs_type: m.fs_type.clone(),
        mount_point: m.mount_point.clone(),
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
        used_percent: m.used_percent,
    }
}

fn gpu(g: &wire::Gpu) -> Gpu {
    Gpu {
        index: g.index,
        mem_free_bytes: g.mem_free_bytes,
        mem_total_bytes: g.mem_total_bytes,
        mem_used_bytes: g.mem_used_bytes,
        mem_util_percent: g.mem_util_percent,
        name: g.name.clone(),
        power_w: g.power_w,
        temperature_c: g.temperature_c,
        util_percent: g.util_percent,
    }
}

/// The API's view of an experiment, from its processes' deployment views (`find` looks one
/// up by id) and the names of the services of its namespace.
pub fn experiment<'a>(
    e: &ExperimentRecord,
    find: impl Fn(&str) -> Option<&'a Deployment>,
    services: Vec<String>,
) -> ExperimentInfo {
    let processes: Vec<ExperimentProcess> = e
        .processes
        .iter()
        .map(|p| {
            let d = find(&p.deployment_id);
            let status = d.and_then(|d| d.status.as_ref());
            let current = d
                .and_then(|d| d.current_state)
                .unwrap_or(CurrentState::Pending);
            let since_ms = status.and_then(|s| match s.state {
                CurrentState::Running | CurrentState::Starting => s.started_at_ms,
                _ => s.stopped_at_ms.or(s.started_at_ms),
            });
            ExperimentProcess {
                name: p.name.clone(),
                group: p.group.clone(),
                on_failure: p.on_failure.as_str().to_owned(),
                deployment_id: p.deployment_id.clone(),
                desired_state: d.map_or(DesiredState::Running, |d| d.desired_state),
                current_state: current,
                ready: current == CurrentState::Running,
                restarts: status.map_or(0, |s| s.restart_count),
                last_exit_code: status.and_then(|s| s.last_exit_code),
                since_ms,
                node_id: d.and_then(|d| d.assigned_node_id.as_ref().map(ToString::to_string)),
                reason: d
                    .and_then(|d| d.assignment_reason.clone())
                    .or_else(|| status.and_then(|s| s.reason.clone())),
            }
        })
        .collect();
    let (state, reason) = experiment_state(e.failed_reason.as_deref(), &processes);
    ExperimentInfo {
        name: e.name.clone(),
        placement: e.placement.as_str().to_owned(),
        state: state.to_owned(),
        reason,
        created_at_ms: e.created_at_ms,
        processes,
        services,
        declaration: None,
    }
}

/// An experiment's state and reason, derived from its processes (see
/// [`ExperimentInfo::state`]).
fn experiment_state(
    failed_reason: Option<&str>,
    processes: &[ExperimentProcess],
) -> (&'static str, Option<String>) {
    use CurrentState as C;
    let wanted: Vec<&ExperimentProcess> = processes
        .iter()
        .filter(|p| p.desired_state == DesiredState::Running)
        .collect();
    if let Some(why) = failed_reason {
        return ("failed", Some(why.to_owned()));
    }
    if wanted.is_empty() {
        return ("stopped", None);
    }
    let fine = |p: &ExperimentProcess| matches!(p.current_state, C::Running | C::Exited);
    let waiting = Unplaced::WaitingForGang.to_string();
    // What keeps the rest back: each process that is not fine, with its reason (members
    // waiting for their gang only point at the one that does not fit).
    let list: Vec<String> = wanted
        .iter()
        .filter(|p| !fine(p) && p.reason.as_deref() != Some(waiting.as_str()))
        .map(|p| match &p.reason {
            Some(r) => format!("{}: {r}", p.name),
            None => format!("{}: {}", p.name, p.current_state.as_str().to_lowercase()),
        })
        .collect();
    let reason = (!list.is_empty()).then(|| list.join("; "));
    if wanted.iter().all(|p| fine(p)) {
        ("running", None)
    } else if wanted
        .iter()
        .all(|p| matches!(p.current_state, C::Failed | C::Crashed))
    {
        ("failed", reason)
    } else if wanted
        .iter()
        .all(|p| matches!(p.current_state, C::Pending | C::Starting))
    {
        ("pending", reason)
    } else {
        ("degraded", reason)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(desired: DesiredState) -> DeploymentRecord {
        DeploymentRecord {
            id: "d1".to_owned(),
            name: "web".to_owned(),
            desired_state: desired,
            kind: "EXEC".to_owned(),
            specification: json!({"spec": {"config": {"command": ["x"]}}}),
            created_at_ms: 5,
            updated_at_ms: 6,
        }
    }

    #[test]
    fn current_state_rules() {
        use CurrentState as C;
        use DesiredState as D;
        // (invalid, desired, assigned, reported) -> shown
        let cases = [
            (true, D::Running, true, Some("RUNNING"), C::Failed),
            (true, D::Stopped, false, None, C::Failed),
            (false, D::Stopped, false, None, C::Stopped),
            (false, D::Stopped, false, Some("RUNNING"), C::Stopped),
            (false, D::Stopped, true, Some("STOPPING"), C::Stopping),
            (false, D::Running, false, None, C::Pending),
            (false, D::Running, true, None, C::Pending),
            (false, D::Running, true, Some("BACKOFF"), C::Crashed),
            (false, D::Running, true, Some("EXITED"), C::Exited),
            (false, D::Running, true, Some("SOMETHING-NEW"), C::Unknown),
        ];
        for (invalid, desired, assigned, reported, want) in cases {
            assert_eq!(
                current_state(invalid, desired, assigned, reported),
                want,
                "{invalid} {desired} {assigned} {reported:?}"
            );
        }
    }

    #[test]
    fn deployment_view_reasons_and_status() {
        let rec = record(DesiredState::Running);
        let spec = Arc::new(rec.specification.clone());
        let facts = DeploymentFacts {
            record: &rec,
            invalid: None,
            assignment: None,
            reported: None,
            unplaced: None,
            any_online: false,
            gpus: &[],
        };
        let reason = |f: DeploymentFacts<'_>| deployment(f, spec.clone()).assignment_reason;
        assert_eq!(reason(facts).as_deref(), Some("No Node"));
        let online = DeploymentFacts {
            any_online: true,
            ..facts
        };
        assert_eq!(reason(online).as_deref(), Some("Pending"));
        let unplaced = DeploymentFacts {
            unplaced: Some(Unplaced::NoCapacity),
            ..online
        };
        assert_eq!(reason(unplaced).as_deref(), Some("No Capacity"));
        let invalid = DeploymentFacts {
            invalid: Some("spec.config.command: Field required"),
            ..online
        };
        let d = deployment(invalid, spec.clone());
        assert_eq!(
            d.assignment_reason.as_deref(),
            Some("Invalid Spec: spec.config.command: Field required")
        );
        assert_eq!(d.current_state, Some(CurrentState::Failed));
        let stopped_rec = record(DesiredState::Stopped);
        let stopped = DeploymentFacts {
            record: &stopped_rec,
            ..online
        };
        assert_eq!(reason(stopped), None);

        let a = scheduler::Assignment {
            node_id: "n1".to_owned(),
            generation: Generation(7),
        };
        let st = wire::DeploymentStatus {
            deployment_id: "d1".to_owned(),
            generation: 7,
            state: "BACKOFF".to_owned(),
            pid: Some(42),
            restart_count: 2,
            last_exit_code: Some(-9),
            reason: String::new(),
            started_at_ms: Some(10),
            stopped_at_ms: None,
            ..wire::DeploymentStatus::default()
        };
        let placed = DeploymentFacts {
            assignment: Some(&a),
            reported: Some(("n1", &st)),
            ..online
        };
        let d = deployment(placed, spec);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({
                "id": "d1", "name": "web", "desired_state": "RUNNING", "current_state": "CRASHED",
                "kind": "EXEC", "specification": {"spec": {"config": {"command": ["x"]}}},
                "created_at_ms": 5, "updated_at_ms": 6, "assigned_node_id": "n1",
                "assignment_reason": null,
                "status": {"state": "BACKOFF", "pid": 42, "restart_count": 2, "last_exit_code": -9,
                           "reason": null, "generation": 7, "started_at_ms": 10,
                           "stopped_at_ms": null, "node_id": "n1", "gpus": []}
            })
        );
        // The client reads exactly what the conductor writes.
        let back: Deployment = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    fn resources() -> (wire::StaticResources, wire::Heartbeat) {
        let mount = wire::StorageMount {
            mount_point: "/".to_owned(),
            fs_type: "ext4".to_owned(),
            total_bytes: 100,
            used_bytes: 40,
            available_bytes: 60,
            used_percent: 40.1,
        };
        let gpu = wire::Gpu {
            index: 0,
            name: "H200".to_owned(),
            mem_total_bytes: 1 << 40,
            util_percent: 0.1,
            mem_util_percent: 12.5,
            mem_used_bytes: 3,
            mem_free_bytes: 4,
            temperature_c: 41.0,
            power_w: 301.7,
        };
        let res = wire::StaticResources {
            logical_cores: 16,
            memory_total_bytes: 64 << 30,
            storage: vec![mount.clone()],
            gpus: vec![gpu.clone()],
            hostname: "h".to_owned(),
        };
        let hb = wire::Heartbeat {
            problems: vec!["local state not written".to_owned()],
            seq: 1,
            timestamp_unix_ms: 1_700_000_000_000,
            cpu_total_percent: 33.3,
            per_core: vec![
                wire::CoreUsage {
                    core_id: 0,
                    used_percent: 0.1,
                },
                wire::CoreUsage {
                    core_id: 1,
                    used_percent: 99.9,
                },
            ],
            mem_used_bytes: 1,
            mem_available_bytes: 2,
            mem_used_percent: 0.3,
            mem_free_bytes: 3,
            mem_buffers_bytes: 4,
            mem_cached_bytes: 5,
            storage: vec![wire::StorageMount {
                // An empty file system: 0/0 is not a number, written as null.
                used_percent: f64::NAN,
                ..mount
            }],
            gpus: vec![gpu],
            deployment_gpus: Vec::new(),
        };
        (res, hb)
    }

    /// The usage blocks exactly as `Core::publish` built them with `json!` before they were
    /// typed: the typed view must serialize to the same bytes.
    fn legacy_usage(res: &wire::StaticResources, hb: Option<&wire::Heartbeat>) -> Value {
        let gpus = hb.map_or(&res.gpus, |h| &h.gpus);
        json!({
            "cpu": {
                "static": json!({"logical_cores": res.logical_cores, "max_millicores_total": res.logical_cores * 1000}),
                "dynamic": hb.map_or(Value::Null, |h| json!({
                    "total_percent": h.cpu_total_percent,
                    "per_core": h.per_core.iter().map(|c| json!({"core_id": c.core_id, "used_percent": c.used_percent})).collect::<Vec<_>>(),
                })),
            },
            "memory": {
                "static": json!({"total_bytes": res.memory_total_bytes}),
                "dynamic": hb.map_or(Value::Null, |h| json!({
                    "used_bytes": h.mem_used_bytes, "available_bytes": h.mem_available_bytes,
                    "used_percent": h.mem_used_percent, "free_bytes": h.mem_free_bytes,
                    "buffers_bytes": h.mem_buffers_bytes, "cached_bytes": h.mem_cached_bytes,
                })),
            },
            "storage_mounts": hb.map_or(&res.storage, |h| &h.storage).iter().map(|m| json!({
                "mount_point": m.mount_point, "fs_type": m.fs_type, "total_bytes": m.total_bytes,
                "used_bytes": m.used_bytes, "available_bytes": m.available_bytes, "used_percent": m.used_percent,
            })).collect::<Vec<_>>(),
            "gpus": gpus.iter().map(|g| json!({
                "index": g.index, "name": g.name, "mem_total_bytes": g.mem_total_bytes,
                "util_percent": g.util_percent, "mem_util_percent": g.mem_util_percent,
                "mem_used_bytes": g.mem_used_bytes, "mem_free_bytes": g.mem_free_bytes,
                "temperature_c": g.temperature_c, "power_w": g.power_w,
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn node_usage_serializes_to_the_bytes_publish_wrote_before() {
        let (res, hb) = resources();
        let defined: BTreeSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let have: BTreeSet<String> = ["b".to_owned()].into();
        for (resources, usage) in [(Some(&res), Some(&hb)), (Some(&res), None), (None, None)] {
            let facts = NodeFacts {
                id: "n1",
                state: scheduler::NodeState::Suspect,
                groups: &[],
                capacities_total: &BTreeMap::new(),
                reserved: None,
                last_heartbeat_ms: Some(1_700_000_000_123),
                resources,
                usage,
                env_names: &have,
                defined_envs: &defined,
                env_problems: &[],
            };
            let n = node(facts, Vec::new(), None);
            let legacy = legacy_usage(
                resources.unwrap_or(&wire::StaticResources::default()),
                usage,
            );
            // `cpu` and `memory` were structs (static, then dynamic) holding `json!` values.
            for (key, typed) in [
                ("cpu.static", serde_json::to_string(&n.cpu.static_).unwrap()),
                (
                    "cpu.dynamic",
                    serde_json::to_string(&n.cpu.dynamic).unwrap(),
                ),
                (
                    "memory.static",
                    serde_json::to_string(&n.memory.static_).unwrap(),
                ),
                (
                    "memory.dynamic",
                    serde_json::to_string(&n.memory.dynamic).unwrap(),
                ),
                (
                    "storage_mounts",
                    serde_json::to_string(&n.storage_mounts).unwrap(),
                ),
                ("gpus", serde_json::to_string(&n.gpus).unwrap()),
            ] {
                let want = key.split('.').fold(&legacy, |v, k| &v[k]).to_string();
                assert_eq!(typed, want, "{key}");
            }
            assert!(
                serde_json::to_string(&n.cpu)
                    .unwrap()
                    .starts_with(r#"{"static":"#)
            );
            assert_eq!(n.state, "suspect");
            assert!(!n.schedulable);
            assert_eq!(n.missing_conda_envs, ["a"]);
            // The heartbeat's problems, none without one.
            let want: &[&str] = if usage.is_some() {
                &["local state not written"]
            } else {
                &[]
            };
            assert_eq!(n.problems, want);
            assert_eq!(
                n.last_heartbeat.as_deref(),
                Some("2023-11-14T22:13:20.123Z")
            );
        }
    }

    #[test]
    fn the_client_reads_the_node_the_view_writes() {
        let (res, hb) = resources();
        let caps: BTreeMap<String, i64> = [("gpu".to_owned(), 2)].into();
        let facts = NodeFacts {
            id: "n1",
            state: scheduler::NodeState::Online,
            groups: &["g".to_owned()],
            capacities_total: &caps,
            reserved: Some(&caps),
            last_heartbeat_ms: None,
            resources: Some(&res),
            usage: Some(&hb),
            env_names: &BTreeSet::new(),
            defined_envs: &BTreeSet::new(),
            env_problems: &["e: failed".to_owned()],
        };
        let assigned = vec![AssignedRef {
            id: "d1".into(),
            name: "web".to_owned(),
        }];
        let conn = NodeConnection {
            remote_addr: "10.0.0.1:5000".to_owned(),
            connected_since_ms: 1,
            rtt_ms: 0.25,
            path_changes: 1,
            reconnects: 2,
        };
        let n = node(facts, assigned, Some(conn));
        let text = serde_json::to_string(&n).unwrap();
        let back: Node = serde_json::from_str(&text).unwrap();
        // Everything survives except the NaN, which the JSON carries as null and the reader
        // takes as 0.
        let mut want = n.clone();
        want.storage_mounts[0].used_percent = 0.0;
        assert_eq!(back, want);
        let keys: Vec<String> = match serde_json::from_str::<Value>(&text).unwrap() {
            Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("{other}"),
        };
        let mut documented = vec![
            "node_id",
            "state",
            "groups",
            "capacities_total",
            "total_capacities_used",
            "last_heartbeat",
            "dynamic_timestamp_unix_ms",
            "cpu",
            "memory",
            "storage_mounts",
            "gpus",
            "assigned_deployments",
            "conda_envs",
            "schedulable",
            "missing_conda_envs",
            "env_problems",
            "problems",
            "connection",
            "certificate",
        ];
        documented.sort_unstable();
        assert_eq!(keys, documented);
    }

    /// The OpenAPI document lists exactly the states these types can hold.
    #[test]
    fn openapi_state_enums_match_the_types() {
        let doc: Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let schemas = &doc["components"]["schemas"];
        let names = |v: &Value| -> BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        };
        let shown: BTreeSet<String> = CurrentState::ALL
            .iter()
            .filter(|s| **s != CurrentState::Backoff)
            .map(|s| s.as_str().to_owned())
            .collect();
        let current = &schemas["Deployment"]["properties"]["current_state"]["enum"];
        assert_eq!(names(current), shown);
        let reported: BTreeSet<String> = CurrentState::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        assert_eq!(
            names(&schemas["Status"]["properties"]["state"]["enum"]),
            reported
        );
        let desired: BTreeSet<String> = DesiredState::NAMES.map(str::to_owned).into();
        for schema in ["DeploymentCreate", "DeploymentPatch", "Deployment"] {
            let e = &schemas[schema]["properties"]["desired_state"]["enum"];
            assert_eq!(names(e), desired, "{schema}");
        }
    }

    #[test]
    fn experiment_state_follows_its_processes() {
        use CurrentState as C;
        let p =
            |name: &str, desired: DesiredState, state: C, reason: Option<&str>| ExperimentProcess {
                name: name.to_owned(),
                desired_state: desired,
                current_state: state,
                reason: reason.map(str::to_owned),
                ..ExperimentProcess::default()
            };
        let run = DesiredState::Running;
        let stop = DesiredState::Stopped;
        let cases = [
            (
                vec![p("a", run, C::Running, None), p("b", run, C::Exited, None)],
                None,
                "running",
                None,
            ),
            (
                vec![
                    p("a", run, C::Pending, Some("Waiting For Gang")),
                    p("b", run, C::Pending, Some("No Capacity")),
                ],
                None,
                "pending",
                Some("b: No Capacity"),
            ),
            (
                vec![
                    p("a", run, C::Running, None),
                    p("b", run, C::Backoff, Some("exit 3")),
                ],
                None,
                "degraded",
                Some("b: exit 3"),
            ),
            (
                vec![p("a", run, C::Failed, None), p("b", stop, C::Stopped, None)],
                None,
                "failed",
                Some("a: failed"),
            ),
            (vec![p("a", stop, C::Stopped, None)], None, "stopped", None),
            (
                vec![p("a", stop, C::Stopped, None)],
                Some("a failed"),
                "failed",
                Some("a failed"),
            ),
        ];
        for (procs, failed, state, reason) in cases {
            let got = experiment_state(failed, &procs);
            assert_eq!(got, (state, reason.map(str::to_owned)), "{procs:?}");
        }
    }
}
