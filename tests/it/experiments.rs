//! Experiments end to end: the SurrealAI seed's RL example (a learner binding two services,
//! agents connecting to both through the `SYMPH_*` variables only) across two nodes, watched
//! and removed with the `symphony` CLI; gang placement that waits for a node; process groups
//! on one node; `on_failure: stop-experiment`; and every bad declaration refused with a 422
//! naming the field.

use serde_json::{Value, json};

use crate::rl_example::{AGENT, LEARNER};
use crate::support::{Cluster, alive, free_port_range, locs, symphony_bin, until};

/// The seed's RL example as YAML: a learner (group `trainer`, with an evaluator beside it)
/// and `agents` agents, gang-placed.
fn rl_yaml(agents: usize) -> String {
    let indent = |s: &str| s.replace('\n', "\n        ");
    format!(
        "name: rl
placement: gang
processes:
  - name: learner
    group: trainer
    capacity_requests: {{slot: 2}}
    binds: [replay-server, parameter-server]
    config:
      command:
      - python3
      - -c
      - |
        {learner}
  - name: evaluator
    group: trainer
    restart_policy: never
    connects: [parameter-server]
    config:
      command: [python3, -c, \"import os; print(os.environ['SYMPH_PARAMETER_SERVER_ADDR'])\"]
  - name: agent
    replicas: {agents}
    capacity_requests: {{slot: 1}}
    restart_policy: never
    connects: [replay-server, parameter-server]
    config:
      command:
      - python3
      - -c
      - |
        {agent}
",
        learner = indent(LEARNER),
        agent = indent(AGENT),
    )
}

/// Runs the `symphony` CLI against the cluster; returns (exit code, stdout, stderr).
/// (The conductor runs on this test's runtime: the CLI is awaited, never blocked on.)
async fn cli(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(symphony_bin())
        .args(args)
        .env("SYMPHONY_API", &c.api)
        .env_remove("SYMPHONY_USER")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn experiment(c: &Cluster, name: &str) -> Value {
    let (status, e) = c.get(&format!("/experiments/{name}")).await;
    assert_eq!(status, 200, "{e}");
    e
}

/// Waits until the experiment's state is `state`.
async fn wait_experiment(c: &Cluster, name: &str, state: &str) -> Value {
    c.wait(&format!("experiment {name} {state}"), |v| {
        v.experiments
            .iter()
            .any(|e| e.name == name && e.state == state)
    })
    .await;
    experiment(c, name).await
}

fn process<'a>(e: &'a Value, name: &str) -> &'a Value {
    e["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no process {name} in {e}"))
}

#[tokio::test]
async fn the_rl_example_runs_across_two_nodes_and_goes_with_one_delete() {
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = free_port_range(8)).await;
    c.add_node_with_caps_at("n0", &[("slot", 3)], [127, 0, 0, 3].into())
        .await;
    c.add_node_with_caps_at("n1", &[("slot", 3)], [127, 0, 0, 2].into())
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rl.yaml");
    std::fs::write(&file, rl_yaml(4)).unwrap();

    let (code, out, err) = cli(&c, &["exp", "launch", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("rl launched: 6 processes"), "{out}");
    // Launching the same name again is refused unless forced.
    let (code, _, err) = cli(&c, &["exp", "launch", file.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("already exists") && err.contains("409"),
        "{err}"
    );

    // Every agent completed its round trips (exit 0), whichever node it landed on; the
    // learner still serves.
    let e = c
        .wait("every agent and the evaluator exited", |v| {
            v.experiments.iter().any(|e| {
                e.name == "rl"
                    && e.processes
                        .iter()
                        .filter(|p| p.name != "learner")
                        .all(|p| p.current_state.as_str() == "EXITED")
            })
        })
        .await;
    let rl = e.experiments.iter().find(|e| e.name == "rl").unwrap();
    let mut nodes = std::collections::BTreeSet::new();
    for p in &rl.processes {
        if p.name.starts_with("agent-") {
            assert_eq!(p.last_exit_code, Some(0), "{p:?}");
            nodes.insert(p.node_id.clone().unwrap());
        }
    }
    assert_eq!(nodes.len(), 2, "agents on both nodes: {rl:?}");
    let e = wait_experiment(&c, "rl", "running").await;
    let learner = process(&e, "learner");
    assert_eq!(learner["current_state"], "RUNNING", "{e}");
    // A process group shares a node.
    assert_eq!(
        process(&e, "evaluator")["node_id"],
        learner["node_id"],
        "{e}"
    );
    assert_eq!(
        e["services"],
        json!(["parameter-server", "replay-server"]),
        "{e}"
    );
    assert_eq!(e["declaration"]["name"], "rl");

    // `symphony p` shows them all with the seed's columns; `ls` lists the experiment.
    let (code, out, err) = cli(&c, &["p", "rl"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(
        lines[0].starts_with("GROUP") && lines[0].contains("RESTARTS"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("trainer") && l.contains("learner") && l.contains("running: ")),
        "{out}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("exited: ")).count(),
        5,
        "{out}"
    );
    let (_, out, _) = cli(&c, &["ls"]).await;
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("rl") && l.contains("running")),
        "{out}"
    );
    // Logs by EXP/PROC, and by a process name alone when it is unique.
    for target in ["rl/agent-2", "agent-2"] {
        let (code, out, err) = cli(&c, &["logs", target, "--tail", "10"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("round trip ok 2 of 4"), "{target}: {out}");
    }
    let (code, out, _) = cli(&c, &["logs", "trainer/evaluator"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("127.0.0."), "{out}");

    // A process is not deleted on its own: the experiment is the unit.
    let learner_id = learner["deployment_id"].as_str().unwrap().to_owned();
    let (status, resp) = c.delete(&format!("/deployments/{learner_id}")).await;
    assert_eq!(status, 409, "{resp}");
    let pid = c.wait_state(&learner_id, "RUNNING").await["status"]["pid"]
        .as_u64()
        .unwrap();

    // `d --dry-run` deletes nothing; `d` removes processes and services.
    let (code, out, _) = cli(&c, &["d", "rl", "--dry-run"]).await;
    assert_eq!((code, out.trim()), (0, "would delete rl"));
    assert_eq!(c.get("/experiments").await.1.as_array().unwrap().len(), 1);
    let (code, out, err) = cli(&c, &["d", "rl"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "deleted rl");
    assert_eq!(c.get("/experiments").await.1, json!([]));
    assert_eq!(c.get("/deployments").await.1, json!([]));
    assert_eq!(c.get("/services").await.1, json!([]));
    until("the learner's process is gone", || !alive(pid)).await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_gang_waits_with_its_reason_and_starts_whole_when_a_node_joins() {
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = free_port_range(8)).await;
    c.add_node_with_caps_at("n0", &[("slot", 3)], [127, 0, 0, 3].into())
        .await;
    let (status, e) = c.request(reqwest::Method::POST, "/experiments", None).await;
    assert_eq!(status, 422, "an empty body: {e}");
    let resp = c
        .http
        .post(format!("{}/experiments", c.api))
        .header("content-type", "application/yaml")
        .body(rl_yaml(3))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    // 2 + 3 slots on a node of 3: nothing runs, and the reason names what does not fit.
    let e = wait_experiment(&c, "rl", "pending").await;
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("No Capacity"), "{e}");
    for p in e["processes"].as_array().unwrap() {
        assert!(p["node_id"].is_null(), "{e}");
    }
    assert_eq!(c.get("/deployments").await.1.as_array().unwrap().len(), 5);
    let (_, out, _) = cli(&c, &["p"]).await;
    assert!(
        out.starts_with("EXPERIMENT") && out.contains("Waiting For Gang"),
        "{out}"
    );

    // A node joins: the whole gang is placed in one pass.
    c.add_node_with_caps_at("n1", &[("slot", 3)], [127, 0, 0, 2].into())
        .await;
    c.wait("the gang placed", |v| {
        v.experiments
            .iter()
            .any(|e| e.name == "rl" && e.processes.iter().all(|p| p.node_id.is_some()))
    })
    .await;
    wait_experiment(&c, "rl", "running").await;

    // Stopping the experiment stops every process; starting it brings them back.
    let (status, e) = c
        .patch("/experiments/rl", json!({"desired_state": "STOPPED"}))
        .await;
    assert_eq!(status, 200, "{e}");
    let e = wait_experiment(&c, "rl", "stopped").await;
    assert!(
        e["processes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["current_state"] == "STOPPED"),
        "{e}"
    );
    let (code, _, err) = cli(&c, &["exp", "start", "rl"]).await;
    assert_eq!(code, 0, "{err}");
    wait_experiment(&c, "rl", "running").await;
    // `db` deletes by pattern.
    let (code, out, err) = cli(&c, &["db", "r*", "-y"]).await;
    assert_eq!((code, out.trim()), (0, "deleted rl"), "{err}");
    c.shutdown().await;
}

#[tokio::test]
async fn stop_experiment_on_failure_stops_the_rest() {
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = free_port_range(8)).await;
    c.add_node("n1", &["local"], &[], false).await;
    let decl = json!({"name": "ddp", "processes": [
        {"name": "rank", "replicas": 2, "config": {"command": ["sleep", "1000"], "token": "tok-s3cret"}},
        {"name": "flaky", "on_failure": "stop-experiment", "restart_policy": "never",
         "config": {"command": ["sh", "-c", "exit 7"]}},
        {"name": "bystander", "restart_policy": "never", "config": {"command": ["sh", "-c", "exit 1"]}},
    ]});
    let (status, e) = c.post("/experiments?user=sarah", decl.clone()).await;
    assert_eq!(status, 201, "{e}");
    assert_eq!(e["name"], "sarah-ddp");
    // Secrets are masked in the declaration and in the processes' deployments.
    assert_eq!(
        e["declaration"]["processes"][0]["config"]["token"],
        "********"
    );
    for path in ["/experiments/sarah-ddp", "/experiments", "/deployments"] {
        let body = c.get(path).await.1.to_string();
        assert!(!body.contains("tok-s3cret"), "{path}: {body}");
    }
    let e = wait_experiment(&c, "sarah-ddp", "failed").await;
    let story = c
        .wait_events(
            "object=experiment/sarah-ddp&after=0",
            "launched, failed",
            |e| e.iter().any(|e| e["kind"] == "experiment.failed"),
        )
        .await;
    assert_eq!(story[0]["kind"], "experiment.launched", "{story:?}");
    assert_eq!(story[0]["fields"]["processes"], 4);
    assert!(
        story[1]["message"].as_str().unwrap().contains("flaky"),
        "{story:?}"
    );
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("flaky") && reason.contains("stop-experiment"),
        "{e}"
    );
    for p in e["processes"].as_array().unwrap() {
        assert_eq!(p["desired_state"], "STOPPED", "{e}");
    }
    // All of it is stored: a restarted conductor shows the same experiment and reason.
    c.restart_conductor().await;
    let again = wait_experiment(&c, "sarah-ddp", "failed").await;
    assert_eq!(again["reason"], e["reason"]);
    assert_eq!(again["processes"], e["processes"]);
    assert_eq!(again["declaration"], e["declaration"]);
    // Starting one process on its own lifts the failure: the state follows the processes.
    let rank = process(&again, "rank-0")["deployment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = c
        .patch(
            &format!("/deployments/{rank}"),
            json!({"desired_state": "RUNNING"}),
        )
        .await;
    assert_eq!(status, 200);
    let e = wait_experiment(&c, "sarah-ddp", "running").await;
    assert!(e["reason"].is_null(), "{e}");
    // Launching again with force replaces it; a failing process with the default policy
    // does not stop the others.
    let mut quiet = decl.clone();
    quiet["processes"][1]["on_failure"] = json!("restart");
    let (status, e) = c.post("/experiments?user=sarah&force=true", quiet).await;
    assert_eq!(status, 201, "{e}");
    let view = c
        .wait("flaky crashed, ranks running", |v| {
            v.experiments.iter().any(|e| {
                e.name == "sarah-ddp"
                    && e.processes
                        .iter()
                        .any(|p| p.name == "flaky" && p.current_state.as_str() == "CRASHED")
                    && e.processes
                        .iter()
                        .filter(|p| p.current_state.as_str() == "RUNNING")
                        .count()
                        == 2
            })
        })
        .await;
    let e = view
        .experiments
        .iter()
        .find(|e| e.name == "sarah-ddp")
        .unwrap();
    assert_eq!(e.state, "degraded", "{e:?}");
    // Only the new launch's deployments exist.
    assert_eq!(c.get("/deployments").await.1.as_array().unwrap().len(), 4);
    c.shutdown().await;
}

#[tokio::test]
async fn bad_declarations_are_refused_naming_the_field_and_create_nothing() {
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = free_port_range(8)).await;
    c.add_node("n1", &["gpu"], &[], false).await;
    let p = |name: &str, extra: Value| {
        let mut p = json!({"name": name, "config": {"command": ["true"]}});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let cases = [
        (
            json!({"name": "x", "processes": [p("a", json!({"connects": ["replay"]}))]}),
            "body.processes.0.connects.0",
            "\"replay\" is connected by process \"a\" but not bound",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({})), p("a", json!({}))]}),
            "body.processes.1.name",
            "two processes are named \"a\"",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({"binds": [{"s": 7100}]})),
                                              p("b", json!({"binds": [{"t": 7100}]}))]}),
            "body.processes.1.binds.0",
            "port 7100",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({"config": {"command": ["true"], "env_name": "nope"}}))]}),
            "body.processes.0.config.env_name",
            "env \"nope\" is not defined",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({"node_group": "tpu"}))]}),
            "body.processes.0.node_group",
            "no known node has the group \"tpu\"",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({"replicas": 0}))]}),
            "body.processes.0.replicas",
            "",
        ),
        (
            json!({"name": "x", "processes": [p("a", json!({"env": {"BIG": "x".repeat(300_000)}}))]}),
            "body.processes.0",
            "at most 262144",
        ),
    ];
    for (decl, loc, msg) in cases {
        let (status, resp) = c.post("/experiments", decl.clone()).await;
        assert_eq!(status, 422, "{decl}: {resp}");
        assert_eq!(locs(&resp)[0], loc, "{resp}");
        let msgs: Vec<&str> = resp["detail"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["msg"].as_str())
            .collect();
        assert!(msgs.iter().any(|m| m.contains(msg)), "{msg} not in {resp}");
    }
    // A port another experiment holds is refused at launch, naming the process.
    let ok = json!({"name": "y", "processes": [p("a", json!({"binds": [{"s": 7100}], "node_group": "gpu"}))]});
    assert_eq!(c.post("/experiments", ok).await.0, 201);
    let (status, resp) = c
        .post(
            "/experiments",
            json!({"name": "z", "processes": [p("b", json!({"binds": [{"t": 7100}]}))]}),
        )
        .await;
    assert_eq!(status, 422, "{resp}");
    assert_eq!(locs(&resp)[0], "body.processes.0.binds.0.t", "{resp}");
    // Nothing of the refused ones exists.
    let names: Vec<Value> = c
        .get("/experiments")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, [json!("y")]);
    assert_eq!(c.get("/deployments").await.1.as_array().unwrap().len(), 1);
    c.shutdown().await;
}
