//! The node core's decisions as tables: a state reached by a list of events, one more event,
//! and the exact effects (and statuses flushed) that must follow.

use serde_json::json;

use super::*;
use crate::node::supervisor::CurrentState;

fn me() -> Identity {
    Identity {
        node_id: "n1".into(),
        groups: vec!["gpu".into()],
        capacities_total: BTreeMap::from([("gpu".to_owned(), 1)]),
        resources: wire::StaticResources::default(),
        instance_id: "i1".into(),
    }
}

fn spec_json(cmd: &str, env: Option<&str>) -> String {
    let mut config = json!({ "command": ["sh", "-c", cmd] });
    if let Some(env) = env {
        config["env_name"] = json!(env);
    }
    json!({ "spec": { "config": config } }).to_string()
}

fn spec(cmd: &str, env: Option<&str>) -> DeploymentSpec {
    parse_spec(&spec_json(cmd, env)).unwrap()
}

/// An Assign; its command id is `generation * 10`.
fn assign_in(id: &str, generation: u64, cmd: &str, env: Option<&str>) -> Event {
    Event::Command(wire::conductor_message::Msg::Assign(wire::Assign {
        deployment_id: id.into(),
        generation,
        name: id.into(),
        desired_running: true,
        specification_json: spec_json(cmd, env),
        command_id: generation * 10,
        log_seq_floor: 100,
        service_env: Default::default(),
    }))
}

fn assign(id: &str, generation: u64, cmd: &str) -> Event {
    assign_in(id, generation, cmd, None)
}

fn bad_assign(id: &str, generation: u64) -> Event {
    Event::Command(wire::conductor_message::Msg::Assign(wire::Assign {
        deployment_id: id.into(),
        generation,
        specification_json: json!({ "spec": { "config": { "command": "not a list" } } })
            .to_string(),
        command_id: generation * 10,
        desired_running: true,
        ..Default::default()
    }))
}

/// An Unassign; its command id is `generation * 10 + 1`.
fn unassign(id: &str, generation: u64) -> Event {
    Event::Command(wire::conductor_message::Msg::Unassign(wire::Unassign {
        deployment_id: id.into(),
        generation,
        command_id: generation * 10 + 1,
    }))
}

fn ok(command_id: u64) -> Effect {
    Effect::Send(result_msg(command_id, true, String::new()))
}

fn refused(command_id: u64, why: &str) -> Effect {
    Effect::Send(result_msg(command_id, false, why.to_owned()))
}

fn apply_in(id: &str, generation: u64, cmd: &str, env: Option<&str>) -> Effect {
    Effect::Apply {
        id: id.into(),
        generation: Generation(generation),
        running: true,
        spec: spec(cmd, env),
    }
}

fn apply(id: &str, generation: u64, cmd: &str) -> Effect {
    apply_in(id, generation, cmd, None)
}

fn held_in(id: &str, generation: u64, cmd: &str, env: Option<&str>, offset: u64) -> Held {
    Held {
        id: id.into(),
        generation: Generation(generation),
        desired_running: true,
        spec: spec(cmd, env),
        log_offset: offset,
    }
}

fn held(id: &str, generation: u64, cmd: &str, offset: u64) -> Held {
    held_in(id, generation, cmd, None, offset)
}

fn running(id: &str, generation: u64, pid: u32) -> DeploymentStatus {
    DeploymentStatus {
        id: id.into(),
        generation,
        state: CurrentState::Running,
        pid: Some(pid),
        restart_count: 0,
        last_exit_code: None,
        reason: None,
        started_at_ms: None,
        stopped_at_ms: None,
        last_log_seq: 5,
        health_failures: 0,
        healthy: None,
        cron_restarts: 0,
        restart_at_ms: None,
        result: None,
    }
}

fn env_ensure(complete: bool, envs: &[(&str, &str)]) -> Event {
    Event::Command(wire::conductor_message::Msg::EnvEnsure(wire::EnvEnsure {
        complete,
        envs: envs
            .iter()
            .map(|(name, python)| wire::EnvSpec {
                name: (*name).into(),
                manager: "uv".into(),
                python_version: (*python).into(),
                ..Default::default()
            })
            .collect(),
    }))
}

fn uv_def(name: &str, python: &str) -> EnvDefinition {
    EnvDefinition {
        name: name.into(),
        python_version: python.into(),
        packages: Vec::new(),
        custom_script: None,
        manager: ManagerKind::Uv,
        force_recreate: false,
    }
}

fn uv(name: &str) -> (ManagerKind, String) {
    (ManagerKind::Uv, name.into())
}

fn log_resume(last: &[(&str, u64)]) -> Event {
    Event::Command(wire::conductor_message::Msg::LogResume(wire::LogResume {
        last_seq: last.iter().map(|(id, s)| ((*id).to_owned(), *s)).collect(),
    }))
}

fn report(names: &[&str], problems: &[&str]) -> Effect {
    Effect::Send(wire::NodeMessage {
        msg: Some(wire::node_message::Msg::EnvReport(wire::EnvReport {
            env_names: names.iter().map(|n| (*n).to_owned()).collect(),
            problems: problems.iter().map(|p| (*p).to_owned()).collect(),
        })),
    })
}

/// A connected core that went through `events` (their effects are not checked here).
fn core_after(restored: Vec<Held>, events: Vec<Event>) -> NodeCore {
    let mut core = NodeCore::new(me(), restored, Vec::new());
    core.handle(Event::Connected {
        statuses: Vec::new(),
    });
    for e in events {
        core.handle(e);
    }
    core.flush();
    core
}

/// The Hello in a list of effects.
fn hello_of(fx: &[Effect]) -> &wire::Hello {
    match fx {
        [
            Effect::Send(wire::NodeMessage {
                msg: Some(wire::node_message::Msg::Hello(h)),
            }),
        ] => h,
        other => panic!("expected one Hello, got {other:?}"),
    }
}

/// `(id, state, generation)` of each status in a flushed status message, and the removed ids.
type Flushed = (Vec<(String, String, u64)>, Vec<String>);

fn flushed(core: &mut NodeCore) -> Option<Flushed> {
    match core.flush()? {
        Effect::Send(wire::NodeMessage {
            msg: Some(wire::node_message::Msg::Status(s)),
        }) => Some((
            s.deployments
                .into_iter()
                .map(|d| (d.deployment_id, d.state, d.generation))
                .collect(),
            s.removed,
        )),
        other => panic!("expected a status message, got {other:?}"),
    }
}

struct Case {
    name: &'static str,
    restored: Vec<Held>,
    before: Vec<Event>,
    event: Event,
    effects: Vec<Effect>,
    /// What the next flush sends, if anything.
    then: Option<Flushed>,
}

fn removed(ids: &[&str]) -> Option<Flushed> {
    Some((Vec::new(), ids.iter().map(|i| (*i).to_owned()).collect()))
}

#[test]
fn deployment_commands() {
    let cases = vec![
        Case {
            name: "a new deployment is applied, acknowledged and persisted",
            restored: vec![],
            before: vec![],
            event: assign("d1", 1, "a"),
            effects: vec![
                apply("d1", 1, "a"),
                ok(10),
                Effect::Persist(vec![held("d1", 1, "a", 100).into()]),
            ],
            then: None,
        },
        Case {
            name: "a duplicate Assign changes nothing and writes nothing",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: assign("d1", 1, "a"),
            effects: vec![ok(10)],
            then: None,
        },
        Case {
            name: "a newer generation with another spec is applied, the log offset kept",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: assign("d1", 2, "b"),
            effects: vec![
                apply("d1", 2, "b"),
                ok(20),
                Effect::Persist(vec![held("d1", 2, "b", 100).into()]),
            ],
            then: None,
        },
        Case {
            name: "an older generation after a newer one is refused",
            restored: vec![],
            before: vec![assign("d1", 2, "b")],
            event: assign("d1", 1, "a"),
            effects: vec![refused(10, "stale generation 1 (holding 2)")],
            then: None,
        },
        Case {
            name: "an older generation with a bad spec leaves the newer copy alone",
            restored: vec![],
            before: vec![assign("d1", 2, "b")],
            event: bad_assign("d1", 1),
            effects: vec![refused(10, "stale generation 1 (holding 2)")],
            then: None,
        },
        Case {
            name: "a bad spec fails the deployment and stops the copy held",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: bad_assign("d1", 2),
            effects: vec![
                Effect::Remove("d1".into()),
                refused(
                    20,
                    "body.specification.spec.config.command: Input should be a valid list, got a string",
                ),
                Effect::Persist(vec![]),
            ],
            then: Some((vec![("d1".into(), "FAILED".into(), 2)], vec![])),
        },
        Case {
            name: "an Assign for a deployment being removed waits for the stop",
            restored: vec![],
            before: vec![assign("d1", 1, "a"), unassign("d1", 1)],
            event: assign("d1", 2, "b"),
            effects: vec![Effect::Send(result_msg(
                20,
                true,
                "applied once the previous copy has stopped".into(),
            ))],
            then: None,
        },
        Case {
            name: "the waiting Assign is applied once the stop is done, above the conductor's log floor",
            restored: vec![],
            before: vec![
                assign("d1", 1, "a"),
                unassign("d1", 1),
                assign("d1", 2, "b"),
            ],
            event: Event::Removed("d1".into()),
            effects: vec![
                apply("d1", 2, "b"),
                Effect::Persist(vec![held("d1", 2, "b", 100).into()]),
            ],
            then: None,
        },
        Case {
            name: "an Assign older than the copy stopping is refused, not queued",
            restored: vec![],
            before: vec![assign("d1", 3, "a"), unassign("d1", 3)],
            event: assign("d1", 2, "b"),
            effects: vec![refused(20, "stale generation 2 (stopping 3)")],
            then: None,
        },
        Case {
            name: "an Unassign cancels the Assign waiting for the stop",
            restored: vec![],
            before: vec![
                assign("d1", 1, "a"),
                unassign("d1", 1),
                assign("d1", 2, "b"),
                unassign("d1", 2),
            ],
            event: Event::Removed("d1".into()),
            effects: vec![],
            then: removed(&["d1"]),
        },
        Case {
            name: "of two Assigns waiting, the newer is applied",
            restored: vec![],
            before: vec![
                assign("d1", 1, "a"),
                unassign("d1", 1),
                assign("d1", 3, "c"),
                assign("d1", 2, "b"),
            ],
            event: Event::Removed("d1".into()),
            effects: vec![
                apply("d1", 3, "c"),
                Effect::Persist(vec![held("d1", 3, "c", 100).into()]),
            ],
            then: None,
        },
        Case {
            name: "an Unassign stops the deployment and drops it from the state file; it is reported removed once gone",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: unassign("d1", 1),
            effects: vec![Effect::Remove("d1".into()), ok(11), Effect::Persist(vec![])],
            then: None,
        },
        Case {
            name: "the stop done: removal reported (the state file left it out when the stop began)",
            restored: vec![],
            before: vec![assign("d1", 1, "a"), unassign("d1", 1)],
            event: Event::Removed("d1".into()),
            effects: vec![],
            then: removed(&["d1"]),
        },
        Case {
            name: "an Unassign of an older generation is ignored",
            restored: vec![],
            before: vec![assign("d1", 3, "a")],
            event: unassign("d1", 2),
            effects: vec![ok(21)],
            then: None,
        },
        Case {
            name: "an Unassign of a deployment not held is answered removed",
            restored: vec![],
            before: vec![],
            event: unassign("ghost", 4),
            effects: vec![ok(41)],
            then: removed(&["ghost"]),
        },
        Case {
            name: "an Unassign of a deployment whose spec was bad clears its FAILED report",
            restored: vec![],
            before: vec![bad_assign("d1", 1)],
            event: unassign("d1", 1),
            effects: vec![ok(11)],
            then: removed(&["d1"]),
        },
        Case {
            name: "a restored deployment is applied once the conductor confirms it, with its own log offset",
            restored: vec![held("d1", 4, "a", 7)],
            before: vec![],
            event: assign("d1", 4, "a"),
            effects: vec![
                apply("d1", 4, "a"),
                ok(40),
                Effect::Persist(vec![held("d1", 4, "a", 7).into()]),
            ],
            then: None,
        },
        Case {
            name: "a restored deployment the conductor unassigns is stopped, never started (its keeper may still run it)",
            restored: vec![held("d1", 4, "a", 7)],
            before: vec![],
            event: unassign("d1", 4),
            effects: vec![Effect::Remove("d1".into()), ok(41), Effect::Persist(vec![])],
            then: None,
        },
        Case {
            name: "... and reported removed once its stop is done",
            restored: vec![held("d1", 4, "a", 7)],
            before: vec![unassign("d1", 4)],
            event: Event::Removed("d1".into()),
            effects: vec![],
            then: removed(&["d1"]),
        },
        Case {
            name: "an Assign of a restored deployment that is stopping waits for the stop",
            restored: vec![held("d1", 4, "a", 7)],
            before: vec![unassign("d1", 4)],
            event: assign("d1", 6, "b"),
            effects: vec![Effect::Send(result_msg(
                60,
                true,
                "applied once the previous copy has stopped".into(),
            ))],
            then: None,
        },
        Case {
            name: "a restored deployment moved meanwhile comes back at a newer generation",
            restored: vec![held("d1", 4, "a", 7)],
            before: vec![],
            event: assign("d1", 6, "b"),
            effects: vec![
                apply("d1", 6, "b"),
                ok(60),
                Effect::Persist(vec![held("d1", 6, "b", 7).into()]),
            ],
            then: None,
        },
        Case {
            name: "an id that cannot name a folder is refused",
            restored: vec![],
            before: vec![],
            event: assign("../x", 1, "a"),
            effects: vec![refused(10, "invalid deployment id \"../x\"")],
            then: None,
        },
        Case {
            name: "lines the conductor holds above this node's numbering raise the offset, persisted",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: Event::LogsBehind {
                id: "d1".into(),
                offset: 150,
            },
            effects: vec![Effect::Persist(vec![held("d1", 1, "a", 150).into()])],
            then: None,
        },
        Case {
            name: "the log offset never goes down",
            restored: vec![],
            before: vec![assign("d1", 1, "a")],
            event: Event::LogsBehind {
                id: "d1".into(),
                offset: 50,
            },
            effects: vec![],
            then: None,
        },
        Case {
            name: "a status of a deployment already gone is not sent",
            restored: vec![],
            before: vec![
                assign("d1", 1, "a"),
                unassign("d1", 1),
                Event::Removed("d1".into()),
            ],
            event: Event::Status(running("d1", 1, 42)),
            effects: vec![],
            then: None,
        },
        Case {
            name: "a status of a deployment stopping is still sent",
            restored: vec![],
            before: vec![assign("d1", 1, "a"), unassign("d1", 1)],
            event: Event::Status(running("d1", 1, 42)),
            effects: vec![],
            then: Some((vec![("d1".into(), "RUNNING".into(), 1)], vec![])),
        },
    ];
    run(cases);
}

#[test]
fn log_shipping() {
    let cases = vec![
        Case {
            name: "LogResume ships every held deployment after the conductor's last sequence",
            restored: vec![],
            before: vec![assign("d1", 1, "a"), assign("d2", 1, "b")],
            event: log_resume(&[("d1", 150)]),
            effects: vec![
                Effect::Ship {
                    id: "d1".into(),
                    resume: 150,
                    offset: 100,
                },
                Effect::Ship {
                    id: "d2".into(),
                    resume: 0,
                    offset: 100,
                },
            ],
            then: None,
        },
        Case {
            name: "an Assign after LogResume ships at once; a re-sent one does not ship twice",
            restored: vec![],
            before: vec![log_resume(&[]), assign("d1", 1, "a")],
            event: assign("d1", 2, "b"),
            effects: vec![
                apply("d1", 2, "b"),
                ok(20),
                Effect::Persist(vec![held("d1", 2, "b", 100).into()]),
            ],
            then: None,
        },
        Case {
            name: "a removal stops the shipper before the stop",
            restored: vec![],
            before: vec![log_resume(&[]), assign("d1", 1, "a")],
            event: unassign("d1", 1),
            effects: vec![
                Effect::StopShip("d1".into()),
                Effect::Remove("d1".into()),
                ok(11),
                Effect::Persist(vec![]),
            ],
            then: None,
        },
        Case {
            name: "after a reconnect, shippers start again only on the new LogResume",
            restored: vec![],
            before: vec![
                log_resume(&[]),
                assign("d1", 1, "a"),
                Event::Disconnected,
                Event::Connected { statuses: vec![] },
            ],
            event: log_resume(&[("d1", 120)]),
            effects: vec![Effect::Ship {
                id: "d1".into(),
                resume: 120,
                offset: 100,
            }],
            then: None,
        },
    ];
    run(cases);
}

#[test]
fn envs() {
    let in_use = "env e1: no longer defined, kept while deployment d1 here uses it";
    let cases = vec![
        Case {
            name: "an env set: each env made, one job at a time, then a report",
            restored: vec![],
            before: vec![],
            event: env_ensure(true, &[("e1", "3.11"), ("e2", "3.12")]),
            effects: vec![Effect::Env(EnvJob::Ensure(uv_def("e1", "3.11")))],
            then: None,
        },
        Case {
            name: "the next job starts when one is done; a failure becomes a problem",
            restored: vec![],
            before: vec![env_ensure(false, &[("e1", "3.11"), ("e2", "3.12")])],
            event: Event::EnvDone(EnvOutcome::Ensured {
                kind: ManagerKind::Uv,
                name: "e1".into(),
                result: Err("no python 3.11".into()),
            }),
            effects: vec![Effect::Env(EnvJob::Ensure(uv_def("e2", "3.12")))],
            then: None,
        },
        Case {
            name: "the report carries the problems",
            restored: vec![],
            before: vec![
                env_ensure(false, &[("e1", "3.11")]),
                Event::EnvDone(EnvOutcome::Ensured {
                    kind: ManagerKind::Uv,
                    name: "e1".into(),
                    result: Err("no python 3.11".into()),
                }),
            ],
            event: Event::EnvDone(EnvOutcome::Listed {
                names: vec!["base".into()],
                created: vec![],
            }),
            effects: vec![report(&["base"], &["env e1: no python 3.11"])],
            then: None,
        },
        Case {
            name: "an env deleted before its turn is not made",
            restored: vec![],
            before: vec![env_ensure(true, &[("e1", "3.11"), ("e2", "3.12")])],
            event: env_ensure(true, &[("e1", "3.11")]),
            effects: vec![],
            then: None,
        },
        Case {
            name: "an env deleted while it was being made is removed next",
            restored: vec![],
            before: vec![env_ensure(true, &[("e1", "3.11")]), env_ensure(true, &[])],
            event: Event::EnvDone(EnvOutcome::Ensured {
                kind: ManagerKind::Uv,
                name: "e1".into(),
                result: Ok(()),
            }),
            effects: vec![Effect::Env(EnvJob::Remove(ManagerKind::Uv, "e1".into()))],
            then: None,
        },
        Case {
            name: "an env defined again with another definition is made again, after the first",
            restored: vec![],
            before: vec![
                env_ensure(true, &[("e1", "3.11")]),
                env_ensure(true, &[("e1", "3.12")]),
            ],
            event: Event::EnvDone(EnvOutcome::Ensured {
                kind: ManagerKind::Uv,
                name: "e1".into(),
                result: Ok(()),
            }),
            effects: vec![Effect::Env(EnvJob::Ensure(uv_def("e1", "3.12")))],
            then: None,
        },
        Case {
            name: "a removal pass removes unwanted envs created here, keeps those in use",
            restored: vec![],
            before: vec![
                assign_in("d1", 1, "a", Some("e1")),
                env_ensure(true, &[("e3", "3.11")]),
                Event::EnvDone(EnvOutcome::Ensured {
                    kind: ManagerKind::Uv,
                    name: "e3".into(),
                    result: Ok(()),
                }),
            ],
            event: Event::EnvDone(EnvOutcome::Created(vec![uv("e1"), uv("e2"), uv("e3")])),
            effects: vec![Effect::Env(EnvJob::Remove(ManagerKind::Uv, "e2".into()))],
            then: None,
        },
        Case {
            name: "an env deleted while a deployment using it stops is removed once it is gone",
            restored: vec![],
            before: vec![
                assign_in("d1", 1, "a", Some("e1")),
                unassign("d1", 1),
                env_ensure(true, &[]),
                Event::EnvDone(EnvOutcome::Created(vec![uv("e1")])),
                Event::EnvDone(EnvOutcome::Listed {
                    names: vec!["e1".into()],
                    created: vec![uv("e1")],
                }),
            ],
            event: Event::Removed("d1".into()),
            effects: vec![Effect::Env(EnvJob::ListCreated)],
            then: removed(&["d1"]),
        },
        Case {
            name: "an env kept for a restored deployment is removed once the conductor drops it",
            restored: vec![held_in("d1", 1, "a", Some("e1"), 0)],
            before: vec![
                env_ensure(true, &[]),
                Event::EnvDone(EnvOutcome::Created(vec![uv("e1")])),
                Event::EnvDone(EnvOutcome::Listed {
                    names: vec![],
                    created: vec![uv("e1")],
                }),
            ],
            event: unassign("d1", 1),
            effects: vec![Effect::Remove("d1".into()), ok(11), Effect::Persist(vec![])],
            then: None,
        },
        Case {
            name: "... once its stop is done",
            restored: vec![held_in("d1", 1, "a", Some("e1"), 0)],
            before: vec![
                env_ensure(true, &[]),
                Event::EnvDone(EnvOutcome::Created(vec![uv("e1")])),
                Event::EnvDone(EnvOutcome::Listed {
                    names: vec![],
                    created: vec![uv("e1")],
                }),
                unassign("d1", 1),
            ],
            event: Event::Removed("d1".into()),
            effects: vec![Effect::Env(EnvJob::ListCreated)],
            then: removed(&["d1"]),
        },
        Case {
            name: "a removal that became unsafe before its turn is skipped and the env kept",
            restored: vec![],
            before: vec![
                env_ensure(true, &[]),
                Event::EnvDone(EnvOutcome::Created(vec![uv("e1"), uv("e2")])),
                assign_in("d1", 1, "a", Some("e2")),
            ],
            event: Event::EnvDone(EnvOutcome::Removed {
                kind: ManagerKind::Uv,
                name: "e1".into(),
                result: Ok(true),
            }),
            effects: vec![Effect::Env(EnvJob::Report)],
            then: None,
        },
        Case {
            name: "Unassign during env provisioning: the deployment stops, the env job goes on",
            restored: vec![],
            before: vec![
                env_ensure(true, &[("e1", "3.11")]),
                assign_in("d1", 1, "a", Some("e1")),
            ],
            event: unassign("d1", 1),
            effects: vec![Effect::Remove("d1".into()), ok(11), Effect::Persist(vec![])],
            then: None,
        },
        Case {
            name: "the report leaves out envs on their way out",
            restored: vec![],
            before: vec![
                assign_in("d1", 1, "a", Some("e1")),
                env_ensure(true, &[("e2", "3.11")]),
                Event::EnvDone(EnvOutcome::Ensured {
                    kind: ManagerKind::Uv,
                    name: "e2".into(),
                    result: Ok(()),
                }),
                Event::EnvDone(EnvOutcome::Created(vec![uv("e1"), uv("e2")])),
            ],
            event: Event::EnvDone(EnvOutcome::Listed {
                names: vec!["base".into(), "e1".into(), "e2".into()],
                created: vec![uv("e1"), uv("e2")],
            }),
            effects: vec![report(&["base", "e2"], &[in_use])],
            then: None,
        },
    ];
    run(cases);
}

fn run(cases: Vec<Case>) {
    for case in cases {
        let mut core = core_after(case.restored, case.before);
        let effects = core.handle(case.event);
        assert_eq!(effects, case.effects, "{}", case.name);
        assert_eq!(flushed(&mut core), case.then, "{}: flushed", case.name);
    }
}

#[test]
fn hello_carries_the_inventory_and_replaces_unsent_statuses() {
    let mut core = NodeCore::new(me(), vec![held("r1", 4, "a", 7)], vec!["base".into()]);
    core.handle(bad_assign("bad", 2));
    core.handle(Event::Command(wire::conductor_message::Msg::Assign(
        wire::Assign {
            deployment_id: "d1".into(),
            generation: 3,
            desired_running: true,
            specification_json: spec_json("a", None),
            ..Default::default()
        },
    )));
    // "gone" is still in the process table (its stop has begun) but no longer held.
    let fx = core.handle(Event::Connected {
        statuses: vec![running("d1", 3, 42), running("gone", 1, 43)],
    });
    let hello = hello_of(&fx);
    assert_eq!(hello.node_id, "n1");
    assert_eq!(hello.env_names, vec!["base".to_owned()]);
    assert_eq!(hello.agent_instance_id, "i1");
    let inv: Vec<(&str, &str, u64, u64)> = hello
        .inventory
        .iter()
        .map(|d| {
            (
                d.deployment_id.as_str(),
                d.state.as_str(),
                d.generation,
                d.last_log_seq,
            )
        })
        .collect();
    assert_eq!(
        inv,
        vec![
            ("d1", "RUNNING", 3, 5),
            ("bad", "FAILED", 2, 0),
            ("r1", "STOPPED", 4, 7),
        ]
    );
    // The FAILED status queued before the connection is in the Hello, not sent again.
    assert_eq!(flushed(&mut core), None);
}

#[test]
fn statuses_wait_while_disconnected_and_are_coalesced() {
    let mut core = core_after(vec![], vec![assign("d1", 1, "a")]);
    core.handle(Event::Disconnected);
    core.handle(Event::Status(running("d1", 1, 41)));
    assert_eq!(core.flush(), None, "nothing is sent without a connection");
    core.handle(Event::Connected { statuses: vec![] });
    let mut second = running("d1", 1, 43);
    core.handle(Event::Status(running("d1", 1, 42)));
    second.state = CurrentState::Backoff;
    core.handle(Event::Status(second));
    assert_eq!(
        flushed(&mut core),
        Some((vec![("d1".into(), "BACKOFF".into(), 1)], vec![]))
    );
    assert_eq!(core.flush(), None, "sent once");
}

#[test]
fn a_resync_sends_every_status_held() {
    let mut core = core_after(vec![], vec![assign("d1", 1, "a"), assign("d2", 1, "b")]);
    core.handle(Event::Resync(vec![
        running("d1", 1, 1),
        running("d2", 1, 2),
    ]));
    let (up, gone) = flushed(&mut core).unwrap();
    assert_eq!(up.len(), 2);
    assert!(gone.is_empty());
}

#[test]
fn a_reconnect_in_the_middle_of_a_removal_still_reports_it_once_gone() {
    let mut core = core_after(vec![], vec![assign("d1", 1, "a"), unassign("d1", 1)]);
    core.handle(Event::Disconnected);
    let fx = core.handle(Event::Connected { statuses: vec![] });
    assert!(hello_of(&fx).inventory.is_empty());
    assert_eq!(core.known(), BTreeSet::from(["d1"]), "still stopping");
    // An Assign re-sent on the new connection waits for the stop.
    let fx = core.handle(assign("d1", 2, "b"));
    assert!(!fx.iter().any(|e| matches!(e, Effect::Apply { .. })));
    let fx = core.handle(Event::Removed("d1".into()));
    assert_eq!(
        fx,
        vec![
            apply("d1", 2, "b"),
            Effect::Persist(vec![held("d1", 2, "b", 100).into()])
        ]
    );
}

#[test]
fn a_reconnect_during_env_provisioning_reports_on_the_new_connection() {
    let mut core = core_after(vec![], vec![env_ensure(true, &[("e1", "3.11")])]);
    core.handle(Event::Disconnected);
    let fx = core.handle(Event::EnvDone(EnvOutcome::Ensured {
        kind: ManagerKind::Uv,
        name: "e1".into(),
        result: Ok(()),
    }));
    assert_eq!(fx, vec![Effect::Env(EnvJob::ListCreated)]);
    core.handle(Event::EnvDone(EnvOutcome::Created(vec![uv("e1")])));
    let fx = core.handle(Event::EnvDone(EnvOutcome::Listed {
        names: vec!["e1".into()],
        created: vec![uv("e1")],
    }));
    assert_eq!(fx, vec![], "no connection: nothing sent");
    let fx = core.handle(Event::Connected { statuses: vec![] });
    assert_eq!(hello_of(&fx).env_names, vec!["e1".to_owned()]);
}

/// An Assign carrying the namespace's service variables.
fn assign_with_services(id: &str, generation: u64, cmd: &str) -> Event {
    Event::Command(wire::conductor_message::Msg::Assign(wire::Assign {
        deployment_id: id.into(),
        generation,
        name: id.into(),
        desired_running: true,
        specification_json: spec_json(cmd, None),
        command_id: generation * 10,
        log_seq_floor: 100,
        service_env: [("SYMPH_DB_PORT".to_owned(), "7000".to_owned())].into(),
    }))
}

#[test]
fn service_variables_apply_to_a_new_generation_and_never_restart_a_held_one() {
    // Held at generation 4 (restored after a restart); the conductor resends the same
    // generation, now with a service bound since: the copy is taken back with the env it
    // started with, and a later resend changes nothing either.
    let mut core = NodeCore::new(me(), vec![held("r1", 4, "a", 7)], vec!["base".into()]);
    core.handle(Event::Connected {
        statuses: vec![running("r1", 4, 10)],
    });
    let fx = core.handle(assign_with_services("r1", 4, "a"));
    let applied: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Apply { spec, .. } => Some(spec.env.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(applied, [BTreeMap::new()], "{fx:?}");
    let fx = core.handle(assign_with_services("r1", 4, "a"));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Apply { .. })),
        "{fx:?}"
    );
    // A new generation starts with the variables (the spec's own env would win).
    let fx = core.handle(assign_with_services("r1", 5, "a"));
    let env = fx.iter().find_map(|e| match e {
        Effect::Apply { spec, .. } => Some(spec.env.clone()),
        _ => None,
    });
    assert_eq!(
        env.and_then(|e| e.get("SYMPH_DB_PORT").cloned()).as_deref(),
        Some("7000"),
        "{fx:?}"
    );
}
