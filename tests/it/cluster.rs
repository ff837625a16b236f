//! Scheduling and lifecycle with real node agents and real processes: placement at once,
//! capacity, groups, delete/stop freeing capacity, crash loops shown as FAILED, spec changes
//! reaching the node, per-viewer logs, a conductor restart, and fencing after a partition.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use symphony::model::CurrentState;

use crate::support::{Cluster, alive, pid_of, sh, until};

#[tokio::test]
async fn a_deployment_is_placed_and_runs_at_once() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("cpu", 2)], false).await;
    let id = c.deploy("sleeper", sh("sleep 1000")).await;
    let d = c.wait_state(&id, "RUNNING").await;
    assert_eq!(d["assigned_node_id"], "n1");
    assert_eq!(d["assignment_reason"], Value::Null);
    let pid = pid_of(&d);
    assert!(alive(pid));
    assert_eq!(d["status"]["restart_count"], 0);
    assert!(d["status"]["generation"].as_u64().unwrap() >= 1);
    // /nodes shows the connection facts and the reservation.
    let (_, nodes) = c.get("/nodes").await;
    let n1 = &nodes["nodes"]["n1"];
    assert_eq!(n1["state"], "online");
    assert!(
        n1["connection"]["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(n1["connection"]["reconnects"], 0);
    assert_eq!(
        n1["assigned_deployments"],
        json!([{"id": id, "name": "sleeper"}])
    );
    c.shutdown().await;
    assert!(!alive(pid), "node shutdown stops its workloads");
}

#[tokio::test]
async fn unplaced_deployments_say_why() {
    let mut c = Cluster::start().await;
    let id = c.deploy("early", sh("sleep 1000")).await;
    c.wait("No Node", |v| {
        v.deployment(&id)
            .is_some_and(|d| d.assignment_reason.as_deref() == Some("No Node"))
    })
    .await;
    c.add_node("cpu-node", &["cpu"], &[("gpu", 0)], false).await;
    // Placed as soon as a node joins.
    c.wait_state(&id, "RUNNING").await;
    let gpu = c
        .deploy(
            "needs-gpu",
            json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"gpu": 1}}),
        )
        .await;
    let group = c
        .deploy(
            "needs-group",
            json!({"config": {"command": ["sleep", "1000"]}, "node_group": "gpu"}),
        )
        .await;
    let env = c
        .deploy(
            "needs-env",
            json!({"config": {"command": ["sleep", "1000"], "env_name": "torch"}}),
        )
        .await;
    for (id, why) in [
        (&gpu, "No Capacity"),
        (&group, "No Group"),
        (&env, "No Env"),
    ] {
        c.wait(why, |v| {
            v.deployment(id)
                .is_some_and(|d| d.assignment_reason.as_deref() == Some(why))
        })
        .await;
        let (_, d) = c.get(&format!("/deployments/{id}")).await;
        assert_eq!(d["current_state"], "PENDING");
        assert_eq!(d["assigned_node_id"], Value::Null);
    }
    // A node of the right group takes the group-bound one, and only that one.
    c.add_node("gpu-node", &["gpu"], &[], false).await;
    let d = c.wait_state(&group, "RUNNING").await;
    assert_eq!(d["assigned_node_id"], "gpu-node");
    c.shutdown().await;
}

#[tokio::test]
async fn concurrent_creates_never_overcommit() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 3)], false).await;
    let spec = json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": 1}});
    let posts = (0..12).map(|i| {
        let (http, api, spec) = (c.http.clone(), c.api.clone(), spec.clone());
        async move {
            let r = http
                .post(format!("{api}/deployments"))
                .json(&json!({"name": format!("d{i}"), "specification": {"spec": spec}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });
    futures_util::future::join_all(posts).await;
    let view = c
        .wait("3 running, 9 without capacity", |v| {
            v.deployments
                .iter()
                .filter(|d| d.current_state == Some(CurrentState::Running))
                .count()
                == 3
                && v.deployments
                    .iter()
                    .filter(|d| d.assignment_reason.as_deref() == Some("No Capacity"))
                    .count()
                    == 9
        })
        .await;
    assert_eq!(view.nodes["n1"].total_capacities_used.get("slot"), Some(&3));
    assert_eq!(
        view.deployments
            .iter()
            .filter(|d| d.assigned_node_id.is_some())
            .count(),
        3
    );
    c.shutdown().await;
}

#[tokio::test]
async fn delete_and_stop_free_capacity_and_stop_the_workload() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 1)], false).await;
    let spec = json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": 1}});
    let a = c.deploy("a", spec.clone()).await;
    let pid_a = pid_of(&c.wait_state(&a, "RUNNING").await);
    let b = c.deploy("b", spec).await;
    c.wait("b waits", |v| {
        v.deployment(&b)
            .is_some_and(|d| d.assignment_reason.as_deref() == Some("No Capacity"))
    })
    .await;

    // STOP frees the slot at once: b runs, a's process is gone.
    assert_eq!(
        c.patch(
            &format!("/deployments/{a}"),
            json!({"desired_state": "STOPPED"})
        )
        .await
        .0,
        200
    );
    let pid_b = pid_of(&c.wait_state(&b, "RUNNING").await);
    until("a's process stopped", || !alive(pid_a)).await;
    let (_, da) = c.get(&format!("/deployments/{a}")).await;
    assert_eq!(
        (
            da["current_state"].as_str(),
            da["assigned_node_id"].as_str()
        ),
        (Some("STOPPED"), None)
    );

    // START: a waits for capacity again.
    assert_eq!(
        c.patch(
            &format!("/deployments/{a}"),
            json!({"desired_state": "RUNNING"})
        )
        .await
        .0,
        200
    );
    c.wait("a waits", |v| {
        v.deployment(&a)
            .is_some_and(|d| d.assignment_reason.as_deref() == Some("No Capacity"))
    })
    .await;

    // DELETE b: its workload stops on the node and a takes the slot.
    assert_eq!(c.delete(&format!("/deployments/{b}")).await.0, 204);
    until("b's process stopped", || !alive(pid_b)).await;
    c.wait_state(&a, "RUNNING").await;
    let view = c
        .wait("b gone from the node", |v| {
            v.nodes["n1"].assigned_deployments.len() == 1
        })
        .await;
    assert_eq!(view.nodes["n1"].assigned_deployments[0].id, a);
    assert_eq!(c.get(&format!("/deployments/{b}")).await.0, 404);
    c.shutdown().await;
}

#[tokio::test]
async fn a_crash_loop_ends_failed_with_its_reason() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let spec = json!({"config": {"command": ["sh", "-c", "echo boom >&2; exit 3"]},
        "restart_policy": {"type": "on-failure", "backoff_seconds": 0.01}, "max_restarts": 2, "restart_window_sec": 60});
    let id = c.deploy("crasher", spec).await;
    let d = c.wait_state(&id, "FAILED").await;
    assert_eq!(d["status"]["last_exit_code"], 3);
    assert_eq!(d["status"]["restart_count"], 2);
    assert!(
        d["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("max_restarts=2"),
        "{d}"
    );
    // A healthy neighbour is unaffected.
    let ok = c.deploy("fine", sh("sleep 1000")).await;
    c.wait_state(&ok, "RUNNING").await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_spec_change_reaches_the_node_with_a_new_generation() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("v", sh("sleep 1000")).await;
    let d1 = c.wait_state(&id, "RUNNING").await;
    let (pid1, gen1) = (pid_of(&d1), d1["status"]["generation"].as_u64().unwrap());
    assert_eq!(
        c.patch(
            &format!("/deployments/{id}"),
            json!({"specification": {"spec": sh("sleep 2000")}})
        )
        .await
        .0,
        200
    );
    let view = c
        .wait("new generation running", |v| {
            v.deployment(&id)
                .and_then(|d| d.status.as_ref())
                .is_some_and(|s| {
                    s.generation.get() > gen1
                        && s.state == CurrentState::Running
                        && s.pid.is_some_and(|p| u64::from(p) != pid1)
                })
        })
        .await;
    let pid2 = u64::from(
        view.deployment(&id)
            .unwrap()
            .status
            .as_ref()
            .unwrap()
            .pid
            .unwrap(),
    );
    until("old process gone", || !alive(pid1)).await;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid2}/cmdline")).unwrap();
    assert!(cmdline.contains("sleep 2000"), "{cmdline:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn each_log_viewer_gets_its_own_tail_and_filter_and_each_line_once() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let script = "for i in $(seq 1 20); do echo out$i; echo err$i >&2; done; while true; do sleep 0.05; echo tick; done";
    let id = c.deploy("chatty", sh(script)).await;
    c.wait_state(&id, "RUNNING").await;
    let ws = c.api.replace("http", "ws");
    // Wait for the first 40 lines to reach the conductor.
    let url_all = format!("{ws}/ws/deployments/{id}/logs?tail=1000");
    loop {
        let (mut s, _) = tokio_tungstenite::connect_async(&url_all).await.unwrap();
        let first = next_entries(&mut s).await;
        if first.iter().filter(|e| e["stream"] == "stderr").count() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut a, _) = tokio_tungstenite::connect_async(format!(
        "{ws}/ws/deployments/{id}/logs?tail=3&streams=stderr"
    ))
    .await
    .unwrap();
    let (mut b, _) =
        tokio_tungstenite::connect_async(format!("{ws}/ws/deployments/{id}/logs?tail=1000"))
            .await
            .unwrap();
    let a_first = next_entries(&mut a).await;
    let lines: Vec<&str> = a_first
        .iter()
        .map(|e| e["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        vec!["err18", "err19", "err20"],
        "viewer a: its own tail and filter"
    );
    let b_first = next_entries(&mut b).await;
    let streams: BTreeSet<&str> = b_first
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect();
    assert!(
        streams.contains("stdout") && streams.contains("stderr") && streams.contains("system"),
        "{streams:?}"
    );
    // Live lines: b sees new ticks, each sequence number once and in order; a sees none of them.
    let mut seqs: Vec<u64> = b_first.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    while seqs.len() < b_first.len() + 20 {
        for e in next_entries(&mut b).await {
            seqs.push(e["seq"].as_u64().unwrap());
        }
    }
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "strictly increasing, no duplicates: {seqs:?}"
    );
    let quiet = tokio::time::timeout(Duration::from_millis(300), a.next()).await;
    assert!(
        quiet.is_err(),
        "viewer a only wants stderr, and there is none: {quiet:?}"
    );
    // An unknown deployment gets an error frame and a policy close.
    let (mut bad, _) = tokio_tungstenite::connect_async(format!("{ws}/ws/deployments/nope/logs"))
        .await
        .unwrap();
    let frame: Value =
        serde_json::from_str(&bad.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(frame["error"], "Deployment not found");
    c.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_conductor_restart_and_processes_keep_running() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 4)], false).await;
    let id = c
        .deploy(
            "durable",
            json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": 2}}),
        )
        .await;
    let d = c.wait_state(&id, "RUNNING").await;
    let (pid, generation) = (pid_of(&d), d["status"]["generation"].as_u64().unwrap());
    let (status, env) = c
        .post(
            "/conda-envs",
            json!({"name": "e", "python_version": "3.11", "manager": "uv"}),
        )
        .await;
    assert_eq!(status, 201, "{env}");

    c.restart_conductor().await;
    // The node reconnects by itself and reports the same process at the same generation.
    let view = c
        .wait("node back, deployment running", |v| {
            v.nodes.get("n1").is_some_and(|n| n.state == "online")
                && v.deployment(&id)
                    .and_then(|d| d.status.as_ref())
                    .is_some_and(|s| s.state == CurrentState::Running)
        })
        .await;
    let st = view.deployment(&id).unwrap().status.clone().unwrap();
    assert_eq!(
        (u64::from(st.pid.unwrap()), st.generation.get()),
        (pid, generation),
        "same process, same generation"
    );
    assert!(alive(pid));
    assert_eq!(view.nodes["n1"].total_capacities_used.get("slot"), Some(&2));
    assert_eq!(view.conda_envs.len(), 1);
    assert_eq!(
        view.nodes["n1"].connection.as_ref().unwrap().reconnects,
        0,
        "a fresh conductor saw one connection"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_partition_past_the_grace_period_reschedules_and_fences_the_old_copy() {
    let mut c = Cluster::start_with(|cfg| {
        cfg.suspect_after = Duration::from_millis(300);
        cfg.grace = Duration::from_millis(1500);
    })
    .await;
    c.add_node("a", &["g"], &[("slot", 1)], true).await;
    let id = c
        .deploy(
            "singleton",
            json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": 1}}),
        )
        .await;
    let d = c.wait_state(&id, "RUNNING").await;
    assert_eq!(d["assigned_node_id"], "a");
    let (old_pid, old_gen) = (pid_of(&d), d["status"]["generation"].as_u64().unwrap());
    c.add_node("b", &["g"], &[("slot", 1)], false).await;

    // Partition a: its connection dies, it is marked lost, and b takes over at a higher generation.
    c.proxy("a").set_blackhole(true);
    let view = c
        .wait("rescheduled to b", |v| {
            v.deployment(&id).is_some_and(|d| {
                d.assigned_node_id.as_deref() == Some("b")
                    && d.status
                        .as_ref()
                        .is_some_and(|s| s.node_id == "b" && s.state == CurrentState::Running)
            })
        })
        .await;
    let st = view.deployment(&id).unwrap().status.clone().unwrap();
    assert!(
        st.generation.get() > old_gen,
        "{} > {old_gen}",
        st.generation
    );
    let new_pid = u64::from(st.pid.unwrap());
    assert!(alive(old_pid), "a kept running its copy while unreachable");

    // Heal: a reconnects, reports its stale copy, and is told to stop it.
    c.proxy("a").set_blackhole(false);
    until("old copy stopped", || !alive(old_pid)).await;
    c.wait("a online again", |v| {
        v.nodes.get("a").is_some_and(|n| n.state == "online")
    })
    .await;
    assert!(alive(new_pid), "exactly one copy runs: b's");
    let view = c.conductor().core.view();
    let d = view.deployment(&id).unwrap();
    assert_eq!(d.assigned_node_id.as_deref(), Some("b"));
    assert!(view.nodes["a"].assigned_deployments.is_empty());

    // The events log tells it: a went suspect, then lost, then came back; the deployment
    // moved off a, was placed on b, and a's stale copy was fenced.
    let kinds = |e: &[Value]| -> Vec<String> {
        e.iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let node_story = c
        .wait_events("object=node/a&after=0", "a back", |e| {
            kinds(e).iter().any(|k| k == "node.back")
        })
        .await;
    let k = kinds(&node_story);
    let pos = |what: &str| k.iter().position(|x| x == what).unwrap_or(usize::MAX);
    assert!(
        pos("node.suspect") < pos("node.lost") && pos("node.lost") < pos("node.back"),
        "{k:?}"
    );
    let story = c
        .wait_events(&format!("object=deployment/{id}&after=0"), "fenced", |e| {
            kinds(e).iter().any(|k| k == "deployment.fenced")
        })
        .await;
    let evicted = story
        .iter()
        .find(|e| e["kind"] == "deployment.evicted")
        .unwrap();
    assert_eq!(evicted["fields"]["node"], "a");
    let placed: Vec<&Value> = story
        .iter()
        .filter(|e| e["kind"] == "deployment.placed")
        .collect();
    assert_eq!(placed.last().unwrap()["fields"]["node"], "b");
    let fenced = story
        .iter()
        .find(|e| e["kind"] == "deployment.fenced")
        .unwrap();
    assert_eq!(fenced["fields"]["node"], "a");
    assert_eq!(fenced["fields"]["generation"], old_gen);
    c.shutdown().await;
}

#[tokio::test]
async fn a_node_restart_comes_back_with_its_local_state() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("kept", sh("sleep 1000")).await;
    let pid1 = pid_of(&c.wait_state(&id, "RUNNING").await);
    c.stop_node("n1").await;
    assert!(!alive(pid1), "a node's own shutdown stops its workloads");
    c.add_node("n1", &["local"], &[], false).await;
    let view = c.wait_new_process(&id, pid1, "running again on n1").await;
    let d = view.deployment(&id).unwrap();
    assert_eq!(d.assigned_node_id.as_deref(), Some("n1"));
    // Exactly one process for it on this machine.
    let pid2 = u64::from(d.status.as_ref().unwrap().pid.unwrap());
    assert!(alive(pid2));
    c.shutdown().await;
}

/// Reads a log WebSocket (backlog, then live frames) until a line equals `want`.
async fn until_line(url: &str, want: &str) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let found = async {
        loop {
            if next_entries(&mut ws)
                .await
                .iter()
                .any(|e| e["line"] == want)
            {
                return;
            }
        }
    };
    tokio::time::timeout(crate::support::DEADLINE, found)
        .await
        .unwrap_or_else(|_| panic!("the conductor never got the line {want:?}"));
}

#[tokio::test]
async fn a_node_that_lost_its_log_spool_numbers_new_lines_above_the_conductors() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c
        .deploy(
            "spooled",
            sh("for i in $(seq 1 30); do echo run$$-$i; done; sleep 1000"),
        )
        .await;
    let url = format!(
        "{}/ws/deployments/{id}/logs?tail=1000",
        c.api.replace("http", "ws")
    );
    let first = pid_of(&c.wait_state(&id, "RUNNING").await);
    until_line(&url, &format!("run{first}-30")).await;
    c.stop_node("n1").await;
    // The node loses its spool (a lost disk, or writes still queued when it was killed): its
    // numbering restarts below what the conductor already holds.
    std::fs::remove_dir_all(c.node_work_dir("n1").join("logs").join(&id)).unwrap();
    c.add_node("n1", &["local"], &[], false).await;
    let view = c.wait_new_process(&id, first, "running again on n1").await;
    let second = view
        .deployment(&id)
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .pid
        .unwrap();
    // The second run's lines are new lines, not taken for resends of the first run's.
    until_line(&url, &format!("run{second}-30")).await;
    // And the raised numbering is kept in the node's local state for its next start.
    c.stop_node("n1").await;
    let work_dir = c.node_work_dir("n1");
    let key =
        symphony::seal::SealKey::load_or_create(&work_dir.join(symphony::seal::KEY_FILE)).unwrap();
    let held = symphony::node::state::LocalState::new(work_dir.join("state.bin"), key)
        .load()
        .unwrap();
    assert_eq!(held.len(), 1);
    assert!(
        held[0].log_offset > 0,
        "log offset kept: {}",
        held[0].log_offset
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_identity_supersedes_the_older_connection_without_harm() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("d", sh("sleep 1000")).await;
    c.wait_state(&id, "RUNNING").await;
    let first = c.nodes.remove("n1").unwrap();
    // A second agent with the same certificate (another work dir) connects.
    let before = c.conductor().core.view().nodes["n1"]
        .connection
        .clone()
        .unwrap();
    c.add_node_in("n1", "second", &["local"], &[]).await;
    // The older agent is told it was superseded and stops (it does not fight back).
    let res = tokio::time::timeout(crate::support::DEADLINE, first.task)
        .await
        .unwrap()
        .unwrap();
    let err = res.expect_err("a superseded agent exits with an error");
    assert!(err.to_string().contains("superseded"), "{err}");
    let view = c
        .wait("n1 online on the new connection", |v| {
            v.nodes.get("n1").is_some_and(|n| {
                n.state == "online"
                    && n.connection
                        .as_ref()
                        .is_some_and(|k| k.remote_addr != before.remote_addr)
            })
        })
        .await;
    assert_eq!(view.nodes.len(), 1);
    // /nodes keeps answering (the original returned 500 after a duplicate).
    let (status, nodes) = c.get("/nodes").await;
    assert_eq!(status, 200);
    assert_eq!(nodes["nodes"]["n1"]["groups"], json!(["local"]));
    c.shutdown().await;
}

#[tokio::test]
async fn an_invalid_stored_spec_fails_only_that_deployment() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let good = c.deploy("good", sh("sleep 1000")).await;
    c.wait_state(&good, "RUNNING").await;
    // Written behind the API's back (e.g. by an older version): the conductor must cope.
    c.conductor.take().unwrap().shutdown().await;
    let store = c.open_store().await;
    let bad = symphony::conductor::store::DeploymentRecord {
        id: "badbadbadbadbadbadbadbadbadbad00".into(),
        name: "bad".into(),
        desired_state: symphony::model::DesiredState::Running,
        kind: "EXEC".into(),
        specification: json!({"spec": {"config": {"command": "not a list"}}}),
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    store.insert_deployment(&bad, &[], &[]).await.unwrap();
    store.close().await;
    c.conductor = Some(
        symphony::conductor::Conductor::start(c.cfg.clone())
            .await
            .unwrap(),
    );
    let d = c.wait_state(&bad.id, "FAILED").await;
    assert!(
        d["assignment_reason"].as_str().unwrap().contains("command"),
        "{d}"
    );
    assert_eq!(d["assigned_node_id"], Value::Null);
    let g = c.wait_state(&good, "RUNNING").await;
    assert_eq!(g["assigned_node_id"], "n1");
    c.shutdown().await;
}

#[tokio::test]
async fn a_token_the_conductors_key_does_not_open_fails_only_that_deployment() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let good = c.deploy("good", sh("sleep 1000")).await;
    let good_pid = pid_of(&c.wait_state(&good, "RUNNING").await);
    let config = |token: &str| {
        json!({"config": {"command": ["sleep", "1000"],
            "git_repo": "https://example.invalid/r.git", "token": token}})
    };
    let private = c.deploy("private", config("tok-LOST-KEY")).await;
    // The key file is replaced (another conductor's, a partial restore): the stored token no
    // longer opens. The conductor still starts, and only that deployment fails, saying why.
    c.conductor.take().unwrap().shutdown().await;
    let key_file = c.cfg.storage_dir.join(symphony::seal::KEY_FILE);
    std::fs::write(&key_file, [7u8; symphony::seal::KEY_LEN]).unwrap();
    c.conductor = Some(
        symphony::conductor::Conductor::start(c.cfg.clone())
            .await
            .unwrap(),
    );
    let d = c.wait_state(&private, "FAILED").await;
    let reason = d["assignment_reason"].as_str().unwrap();
    assert!(
        reason.contains("token") && reason.contains("secrets.key"),
        "{d}"
    );
    let (_, one) = c.get(&format!("/deployments/{private}")).await;
    assert_eq!(one["specification"]["spec"]["config"]["token"], "********");
    let g = c.wait_state(&good, "RUNNING").await;
    assert_eq!(pid_of(&g), good_pid);
    // Sending the token again repairs it.
    assert_eq!(
        c.patch(
            &format!("/deployments/{private}"),
            json!({"specification": {"spec": config("tok-SENT-AGAIN")}})
        )
        .await
        .0,
        200
    );
    c.wait("the repaired deployment valid again", |v| {
        v.deployment(&private).is_some_and(|d| {
            !d.assignment_reason
                .as_deref()
                .is_some_and(|r| r.contains("secrets.key"))
        })
    })
    .await;
    let stored = c.open_store().await.get_deployment(&private).await.unwrap();
    assert_eq!(
        stored.unwrap().specification["spec"]["config"]["token"],
        "tok-SENT-AGAIN"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_patch_that_asks_for_more_capacity_is_placed_again_and_never_overcommits() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 2)], false).await;
    let spec = |n: i64| json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": n}});
    let a = c.deploy("a", spec(1)).await;
    let b = c.deploy("b", spec(1)).await;
    let pid_a = pid_of(&c.wait_state(&a, "RUNNING").await);
    c.wait_state(&b, "RUNNING").await;
    // a now wants 2 slots: with b holding one it cannot fit, so it must wait, not over-commit.
    assert_eq!(
        c.patch(
            &format!("/deployments/{a}"),
            json!({"specification": {"spec": spec(2)}})
        )
        .await
        .0,
        200
    );
    let view = c
        .wait("a waits for capacity", |v| {
            v.deployment(&a)
                .is_some_and(|d| d.assignment_reason.as_deref() == Some("No Capacity"))
        })
        .await;
    assert_eq!(view.nodes["n1"].total_capacities_used.get("slot"), Some(&1));
    until("a's old process stopped", || !alive(pid_a)).await;
    // Once b goes, a fits again.
    assert_eq!(c.delete(&format!("/deployments/{b}")).await.0, 204);
    c.wait_state(&a, "RUNNING").await;
    let view = c.conductor().core.view();
    assert_eq!(view.nodes["n1"].total_capacities_used.get("slot"), Some(&2));
    c.shutdown().await;
}

#[tokio::test]
async fn a_slow_stop_never_holds_up_other_commands() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    // Ignores SIGTERM: its removal takes the whole stop timeout (30 s) before SIGKILL. It says
    // when the trap is set (RUNNING comes at the spawn, before the shell has read its script).
    let ready = c.dir.path().join("stubborn-ready");
    let script = format!(
        "trap '' TERM; touch {}; while true; do sleep 0.1; done",
        ready.display()
    );
    let stubborn = c
        .deploy(
            "stubborn",
            json!({"config": {"command": ["sh", "-c", script]}, "stop_timeout_sec": 30}),
        )
        .await;
    let pid = pid_of(&c.wait_state(&stubborn, "RUNNING").await);
    until("the stubborn process ignores SIGTERM", || ready.exists()).await;
    assert_eq!(c.delete(&format!("/deployments/{stubborn}")).await.0, 204);
    // The node keeps taking commands while that process is still being stopped.
    let next = c.deploy("next", sh("sleep 1000")).await;
    c.wait_state(&next, "RUNNING").await;
    assert!(
        alive(pid),
        "the stubborn process is still inside its stop timeout"
    );
    c.shutdown().await;
}

/// The `entries` of the next frame on a log WebSocket.
async fn next_entries<S>(ws: &mut S) -> Vec<Value>
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    let text = ws.next().await.unwrap().unwrap().into_text().unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone()
}
