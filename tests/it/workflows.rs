//! Workflows end to end: DAGs of tasks on real node agents, with results, retries, failure
//! propagation, water marks, lost nodes and conductor restarts.

use serde_json::{Value, json};

use crate::support::{Cluster, log_until};

/// `sh -c script` as a task's config.
fn sh(script: &str) -> Value {
    json!({"command": ["sh", "-c", script]})
}

async fn define(c: &Cluster, def: Value) {
    let (status, body) = c.post("/workflows", def).await;
    assert_eq!(status, 201, "{body}");
}

async fn start(c: &Cluster, name: &str, params: Value) -> String {
    let (status, body) = c
        .post(
            &format!("/workflows/{name}/runs"),
            json!({"params": params}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Waits until run `id` is in `state`, and returns it as the API shows it.
async fn until_run(c: &Cluster, id: &str, state: &str) -> Value {
    c.wait(&format!("run {id} {state}"), |v| {
        v.runs
            .iter()
            .any(|r| r.id == id && r.state.as_str() == state)
    })
    .await;
    let (status, run) = c.get(&format!("/runs/{id}")).await;
    assert_eq!(status, 200, "{run}");
    run
}

fn task<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no task {name} in {run}"))
}

/// The seed's diamond: A, then B and C (in parallel), then D; results flow from A to D.
#[tokio::test]
async fn the_diamond_runs_in_order_and_results_flow() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let out = r#"printf '%s' "$1" > "$SYMPHONY_OUTPUT""#;
    define(
        &c,
        json!({"name": "diamond", "tasks": [
            {"name": "a", "config": sh(&format!(r#"set -- '{{"n": 1}}'; {out}"#))},
            {"name": "b", "depends_on": ["a"],
             "config": sh(&format!(r#"set -- "{{\"b\": $SYMPHONY_INPUTS}}"; {out}"#))},
            {"name": "c", "depends_on": ["a"],
             "config": sh(&format!(r#"set -- "{{\"c\": \"$SYMPHONY_PARAM_LR\"}}"; {out}"#))},
            {"name": "d", "depends_on": ["b", "c"],
             "config": sh(&format!(r#"set -- "$SYMPHONY_INPUTS"; {out}"#))},
        ]}),
    )
    .await;
    let id = start(&c, "diamond", json!({"lr": 0.1})).await;
    let run = until_run(&c, &id, "SUCCEEDED").await;
    assert_eq!(task(&run, "a")["result"], json!({"n": 1}));
    assert_eq!(task(&run, "b")["result"], json!({"b": {"a": {"n": 1}}}));
    assert_eq!(
        task(&run, "d")["result"],
        json!({"b": {"b": {"a": {"n": 1}}}, "c": {"c": "0.1"}})
    );
    // Order: b and c began after a ended; d after both.
    let t = |name: &str, key: &str| task(&run, name)["attempts"][0][key].as_i64().unwrap();
    assert!(t("b", "started_at_ms") >= t("a", "finished_at_ms"));
    assert!(t("c", "started_at_ms") >= t("a", "finished_at_ms"));
    assert!(t("d", "started_at_ms") >= t("b", "finished_at_ms").max(t("c", "finished_at_ms")));
    assert_eq!(
        run["progress"],
        json!({"done": 4, "total": 4, "running": 0, "failed": 0})
    );
    // Every task ran once, on the node, and its capacity is free again.
    for name in ["a", "b", "c", "d"] {
        let attempts = task(&run, name)["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{name}: {attempts:?}");
        assert_eq!(attempts[0]["node_id"], "n1");
        assert_eq!(attempts[0]["exit_code"], 0);
    }
    let view = c
        .wait("the tasks' copies released", |v| {
            v.nodes
                .get("n1")
                .is_some_and(|n| n.assigned_deployments.is_empty())
        })
        .await;
    assert_eq!(view.runs.len(), 1);
    // Task deployments belong to the run.
    let dep = task(&run, "a")["deployment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = c.delete(&format!("/deployments/{dep}")).await;
    assert_eq!(status, 409, "{body}");
    // Each task's story is two events on the run: started where (node, generation), then
    // its end with the exit code. Its deployment writes no start, exit or placement of its own.
    let story = c
        .wait_events(
            &format!("object=run/{id}&kind=task&after=0"),
            "four tasks succeeded",
            |e| e.iter().filter(|e| e["kind"] == "task.succeeded").count() == 4,
        )
        .await;
    for name in ["a", "b", "c", "d"] {
        let of: Vec<&Value> = story
            .iter()
            .filter(|e| e["fields"]["task"] == name)
            .collect();
        let kinds: Vec<&str> = of.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["task.started", "task.succeeded"],
            "{name}: {story:?}"
        );
        let attempt = &task(&run, name)["attempts"][0];
        for e in &of {
            assert_eq!(e["fields"]["node"], "n1", "{e}");
            assert_eq!(e["fields"]["generation"], attempt["generation"], "{e}");
            assert_eq!(e["fields"]["deployment"], task(&run, name)["deployment_id"]);
        }
        assert_eq!(of[1]["fields"]["exit_code"], 0);
        let dep = task(&run, name)["deployment_id"].as_str().unwrap();
        let (_, own) = c
            .get(&format!("/events?object=deployment/{dep}&after=0"))
            .await;
        let own: Vec<&str> = own
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(
            !own.iter().any(|k| matches!(
                *k,
                "deployment.placed" | "deployment.started" | "deployment.exited"
            )),
            "{name}: {own:?}"
        );
    }
    c.shutdown().await;
}

/// A failure in B marks D UPSTREAM_FAILED (never run) while C finishes; the run is FAILED.
/// Retried from its failed part, B runs again (succeeding now) and then D; A and C do not.
#[tokio::test]
async fn a_failure_propagates_downstream_only_and_a_retry_resumes_there() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let flag = c.node_work_dir("n1").join("b-may-pass");
    define(
        &c,
        json!({"name": "diamond", "tasks": [
            {"name": "a", "config": sh("true")},
            {"name": "b", "depends_on": ["a"],
             "config": sh(&format!("test -e {}", flag.display()))},
            {"name": "c", "depends_on": ["a"], "config": sh("sleep 0.3")},
            {"name": "d", "depends_on": ["b", "c"], "config": sh("true")},
        ]}),
    )
    .await;
    let id = start(&c, "diamond", json!({})).await;
    let run = until_run(&c, &id, "FAILED").await;
    assert_eq!(task(&run, "b")["state"], "FAILED");
    assert_eq!(task(&run, "b")["attempts"][0]["exit_code"], 1);
    assert_eq!(task(&run, "c")["state"], "SUCCEEDED");
    assert_eq!(task(&run, "d")["state"], "UPSTREAM_FAILED");
    assert_eq!(task(&run, "d")["attempts"], json!([]));
    assert_eq!(task(&run, "d")["reason"], "upstream task b failed");
    // d's story is one event: it will not run, and why.
    let d = c
        .wait_events(
            &format!("object=run/{id}&kind=task&after=0"),
            "d's end",
            |e| e.iter().any(|e| e["fields"]["task"] == "d"),
        )
        .await;
    let d: Vec<&Value> = d.iter().filter(|e| e["fields"]["task"] == "d").collect();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["kind"], "task.upstream_failed");
    assert_eq!(d[0]["fields"]["reason"], "upstream task b failed");

    std::fs::write(&flag, "").unwrap();
    let (status, body) = c.post(&format!("/runs/{id}/retry"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let run = until_run(&c, &id, "SUCCEEDED").await;
    assert_eq!(task(&run, "a")["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(task(&run, "c")["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(task(&run, "b")["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(task(&run, "d")["attempts"].as_array().unwrap().len(), 1);
    let (status, _) = c.post(&format!("/runs/{id}/retry"), json!({})).await;
    assert_eq!(status, 409, "a succeeded run is not retried");
    c.shutdown().await;
}

/// A flaky task succeeds on its third attempt, which sees SYMPHONY_ATTEMPT=3; each attempt
/// is its own generation.
#[tokio::test]
async fn a_flaky_task_succeeds_on_its_third_attempt() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    define(
        &c,
        json!({"name": "flaky", "tasks": [{"name": "t",
            "retries": {"max_attempts": 5, "backoff_sec": 0.05},
            "config": sh(r#"echo "{\"attempt\": $SYMPHONY_ATTEMPT}" > "$SYMPHONY_OUTPUT"; test "$SYMPHONY_ATTEMPT" -ge 3"#)}]}),
    )
    .await;
    let id = start(&c, "flaky", json!({})).await;
    let run = until_run(&c, &id, "SUCCEEDED").await;
    let t = task(&run, "t");
    assert_eq!(t["result"], json!({"attempt": 3}));
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    let outcomes: Vec<&Value> = attempts.iter().map(|a| &a["exit_code"]).collect();
    assert_eq!(outcomes, [&json!(1), &json!(1), &json!(0)]);
    let generations: Vec<u64> = attempts
        .iter()
        .map(|a| a["generation"].as_u64().unwrap())
        .collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
    c.shutdown().await;
}

/// A retry without backoff (`backoff_sec: 0`) starts in the flush that ended the attempt
/// before it: a new placement and generation all the same.
#[tokio::test]
async fn a_retry_without_backoff_is_placed_again() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    define(
        &c,
        json!({"name": "eager", "tasks": [{"name": "t",
            "retries": {"max_attempts": 3, "backoff_sec": 0},
            "config": sh(r#"test "$SYMPHONY_ATTEMPT" -ge 2"#)}]}),
    )
    .await;
    let id = start(&c, "eager", json!({})).await;
    let run = until_run(&c, &id, "SUCCEEDED").await;
    let attempts = task(&run, "t")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(attempts[0]["generation"].as_u64() < attempts[1]["generation"].as_u64());
    // A parameter the environment cannot hold is refused, naming it (it would make every
    // attempt's spec invalid).
    let (status, body) = c
        .post("/workflows/eager/runs", json!({"params": {"x": "a\u{0}b"}}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["body", "params", "x"]),
        "{body}"
    );
    c.shutdown().await;
}

/// A task's timeout counts from its placement. One that waits for a node it fits on outlives
/// its timeout meanwhile; a witness placed after it started, with the same timeout, times out
/// (so the conductor checked timeouts past the waiting one's old deadline). Once a node it
/// fits on joins, it runs and succeeds on its first attempt.
#[tokio::test]
async fn a_timeout_counts_from_the_placement_not_the_wait_for_a_node() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["cpu"], &[], false).await;
    define(
        &c,
        json!({"name": "waits", "tasks": [{"name": "t", "timeout_sec": 0.3,
            "node_group": "gpu", "config": sh("true")}]}),
    )
    .await;
    define(
        &c,
        json!({"name": "witness", "tasks": [{"name": "t", "timeout_sec": 0.3,
            "config": sh("sleep 1000")}]}),
    )
    .await;
    let waits = start(&c, "waits", json!({})).await;
    let (_, run) = c.get(&format!("/runs/{waits}")).await;
    let created = task(&run, "t")["attempts"][0]["started_at_ms"]
        .as_i64()
        .unwrap();
    let witness = start(&c, "witness", json!({})).await;
    let w = until_run(&c, &witness, "FAILED").await;
    assert_eq!(task(&w, "t")["attempts"][0]["outcome"], "timeout");
    assert!(
        task(&w, "t")["attempts"][0]["placed_at_ms"]
            .as_i64()
            .unwrap()
            >= created
    );
    let (_, run) = c.get(&format!("/runs/{waits}")).await;
    assert_eq!(run["state"], "RUNNING", "{run}");
    let a = &task(&run, "t")["attempts"][0];
    assert!(
        a["finished_at_ms"].is_null() && a["placed_at_ms"].is_null(),
        "{a}"
    );

    c.add_node("g", &["gpu"], &[], false).await;
    let run = until_run(&c, &waits, "SUCCEEDED").await;
    let attempts = task(&run, "t")["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["node_id"], "g");
    assert!(attempts[0]["placed_at_ms"].as_i64().unwrap() >= created);
    c.shutdown().await;
}

/// The pause under the water marks survives a conductor restart, and a new version's marks
/// apply at once: with max_running 2 and resume_below 1, two runs run and two queue; one
/// cancelled leaves one running (not below 1: still paused), also after a restart; a version
/// with max_running 4 then starts both queued runs.
#[tokio::test]
async fn water_marks_hold_across_a_restart_and_new_marks_apply_at_once() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let def = |high: u32| {
        json!({"name": "marks", "max_running": high, "resume_below": 1,
            "tasks": [{"name": "t", "config": sh("sleep 1000")}]})
    };
    define(&c, def(2)).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(start(&c, "marks", json!({})).await);
    }
    until_run(&c, &ids[1], "RUNNING").await;
    let (status, body) = c.post(&format!("/runs/{}/cancel", ids[0]), json!({})).await;
    assert_eq!(status, 200, "{body}");
    until_run(&c, &ids[0], "CANCELLED").await;
    c.restart_conductor().await;
    // A write waits for a flush: the one after the restart's admission.
    define(
        &c,
        json!({"name": "other", "tasks": [{"name": "t", "config": sh("true")}]}),
    )
    .await;
    let state = |run: &Value| run["state"].as_str().unwrap().to_owned();
    for id in &ids[2..] {
        let (_, run) = c.get(&format!("/runs/{id}")).await;
        assert_eq!(state(&run), "QUEUED", "{run}");
    }
    define(&c, def(4)).await;
    until_run(&c, &ids[2], "RUNNING").await;
    until_run(&c, &ids[3], "RUNNING").await;
    c.shutdown().await;
}

/// A stored workflow version this binary can no longer read (an upgrade that refuses it)
/// fails its runs' tasks with why when they would start: the run ends instead of waiting.
#[tokio::test]
async fn a_run_whose_stored_definition_no_longer_parses_fails_with_why() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let flag = c.node_work_dir("n1").join("a-may-end");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", flag.display());
    define(
        &c,
        json!({"name": "old", "tasks": [
            {"name": "a", "config": sh(&wait)},
            {"name": "b", "depends_on": ["a"], "config": sh("true")}]}),
    )
    .await;
    let id = start(&c, "old", json!({})).await;
    c.wait("a running", |v| {
        v.deployments.iter().any(|d| {
            d.name == format!("old/{id}/a")
                && d.current_state == Some(symphony::model::CurrentState::Running)
        })
    })
    .await;
    c.restart_conductor_after(
        r#"UPDATE workflows SET definition = '{"name": "old", "tasks": "none"}'"#,
    )
    .await;
    std::fs::write(&flag, "").unwrap();
    let run = until_run(&c, &id, "FAILED").await;
    assert_eq!(task(&run, "a")["state"], "SUCCEEDED", "{run}");
    let b = task(&run, "b");
    assert_eq!(b["state"], "FAILED", "{run}");
    let why = b["reason"].as_str().unwrap();
    assert!(
        why.contains("workflow old version 1 cannot be read") && why.contains("tasks"),
        "{why}"
    );
    c.shutdown().await;
}

/// A conductor whose store is older than its node (restored from a backup) gives the task
/// deployment the node holds a new generation; the running attempt goes on as that
/// generation, and its end still ends the task.
#[tokio::test]
async fn a_task_given_a_new_generation_by_a_restored_store_still_ends() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let flag = c.node_work_dir("n1").join("t-may-end");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", flag.display());
    define(
        &c,
        json!({"name": "restored", "tasks": [{"name": "t", "config": sh(&wait)}]}),
    )
    .await;
    let id = start(&c, "restored", json!({})).await;
    let name = format!("restored/{id}/t");
    let view = c
        .wait("t running", |v| {
            v.deployments.iter().any(|d| {
                d.name == name && d.current_state == Some(symphony::model::CurrentState::Running)
            })
        })
        .await;
    let dep = view.deployments.iter().find(|d| d.name == name).unwrap();
    let held = dep.status.as_ref().unwrap().generation.get();
    let dep = dep.id.to_string();
    // The store as a backup had it: one generation behind what the node runs.
    c.restart_conductor_after("UPDATE assignments SET generation = generation - 1")
        .await;
    c.wait("the node runs it at a new generation", |v| {
        v.deployment(&dep)
            .and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.generation.get() > held)
    })
    .await;
    std::fs::write(&flag, "").unwrap();
    let run = until_run(&c, &id, "SUCCEEDED").await;
    let attempts = task(&run, "t")["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(
        attempts[0]["generation"].as_u64().unwrap() > held,
        "{attempts:?}"
    );
    c.shutdown().await;
}

/// Water marks: with max_running 3 and resume_below 1, the fourth run queues, and starts
/// only once running runs drop below 1; queued runs start in FIFO order.
#[tokio::test]
async fn water_marks_queue_runs_until_below_the_low_mark() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let gate = c.node_work_dir("n1").join("gate");
    let gate_s = gate.display().to_string();
    define(
        &c,
        json!({"name": "gated", "max_running": 3, "resume_below": 1, "tasks": [
            {"name": "wait", "config": sh(&format!(
                "while ! test -e {gate_s}-$SYMPHONY_PARAM_K; do sleep 0.05; done"))}]}),
    )
    .await;
    let mut ids = Vec::new();
    for k in 0..5 {
        ids.push(start(&c, "gated", json!({"k": k})).await);
    }
    let state = |v: &symphony::conductor::view::ClusterView, id: &str| {
        v.runs
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.state.as_str())
            .unwrap_or_default()
    };
    c.wait("three running, two queued", |v| {
        (0..3).all(|k| state(v, &ids[k]) == "RUNNING")
            && (3..5).all(|k| state(v, &ids[k]) == "QUEUED")
    })
    .await;
    // Two of three end: one still runs, which is not below 1: the queue waits.
    for (k, id) in ids.iter().enumerate().take(2) {
        std::fs::write(format!("{gate_s}-{k}"), "").unwrap();
        until_run(&c, id, "SUCCEEDED").await;
    }
    let (_, q) = c.get(&format!("/runs/{}", ids[3])).await;
    assert_eq!(q["state"], "QUEUED", "{q}");
    let (_, listed) = c.get("/workflows/gated").await;
    assert_eq!(listed["next_run_at_ms"], Value::Null, "no schedule");
    assert_eq!(
        (listed["running"].as_u64(), listed["queued"].as_u64()),
        (Some(1), Some(2))
    );
    // The last one ends: running drops to 0 (< 1), and both queued start (up to 3), in order.
    std::fs::write(format!("{gate_s}-2"), "").unwrap();
    until_run(&c, &ids[2], "SUCCEEDED").await;
    let r3 = until_run(&c, &ids[3], "RUNNING").await;
    let r4 = until_run(&c, &ids[4], "RUNNING").await;
    assert!(r3["started_at_ms"].as_i64() <= r4["started_at_ms"].as_i64());
    for (k, id) in ids.iter().enumerate().skip(3) {
        std::fs::write(format!("{gate_s}-{k}"), "").unwrap();
        until_run(&c, id, "SUCCEEDED").await;
    }
    c.shutdown().await;
}

/// A node lost mid-task (its machine dies: its copy dies with it): the attempt counts as
/// failed (node_lost), the retry runs on another node with a new generation, and exactly one
/// copy runs to completion; the node that comes back holds nothing and starts nothing.
#[tokio::test]
async fn a_task_on_a_lost_node_is_retried_elsewhere_and_runs_to_completion_once() {
    let mut c = Cluster::start_with(|cfg| {
        cfg.suspect_after = std::time::Duration::from_millis(300);
        cfg.grace = std::time::Duration::from_millis(1500);
    })
    .await;
    c.add_node("a", &["g"], &[("slot", 1)], true).await;
    let marks = c.node_work_dir("a").join("completions");
    std::fs::create_dir_all(&marks).unwrap();
    let gate = c.node_work_dir("a").join("gate");
    // Each copy waits for the gate, then leaves a mark named after its attempt.
    let script = format!(
        "while ! test -e {g}; do sleep 0.05; done; touch {m}/attempt-$SYMPHONY_ATTEMPT",
        g = gate.display(),
        m = marks.display()
    );
    define(
        &c,
        json!({"name": "lost", "tasks": [{"name": "t", "retries": {"max_attempts": 3, "backoff_sec": 0.05},
            "capacity_requests": {"slot": 1}, "config": sh(&script)}]}),
    )
    .await;
    let id = start(&c, "lost", json!({})).await;
    let view = c
        .wait("attempt 1 running on a", |v| {
            v.deployments.iter().any(|d| {
                d.name.starts_with("lost/")
                    && d.assigned_node_id.as_deref() == Some("a")
                    && d.status.as_ref().is_some_and(|s| s.pid.is_some())
            })
        })
        .await;
    let pid = view
        .deployments
        .iter()
        .find(|d| d.name.starts_with("lost/"))
        .and_then(|d| d.status.as_ref()?.pid)
        .unwrap();
    c.add_node("b", &["g"], &[("slot", 1)], false).await;
    // a's machine is gone: unreachable, and its copy dead with it.
    c.proxy("a").set_blackhole(true);
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
    c.wait("attempt 2 placed on b", |v| {
        v.runs.iter().any(|r| {
            r.id == id
                && r.tasks[0].attempts.len() == 2
                && r.tasks[0].attempts[1].node_id.as_deref() == Some("b")
        })
    })
    .await;
    std::fs::write(&gate, "").unwrap();
    let run = until_run(&c, &id, "SUCCEEDED").await;
    let attempts = task(&run, "t")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "node_lost", "{attempts:?}");
    assert!(attempts[1]["generation"].as_u64() > attempts[0]["generation"].as_u64());
    // a comes back: it holds nothing, and no further attempt starts.
    c.proxy("a").set_blackhole(false);
    c.wait("a online and holding nothing", |v| {
        v.nodes
            .get("a")
            .is_some_and(|n| n.state == "online" && n.assigned_deployments.is_empty())
    })
    .await;
    let (_, run) = c.get(&format!("/runs/{id}")).await;
    assert_eq!(task(&run, "t")["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(run["state"], "SUCCEEDED");
    let done: Vec<String> = std::fs::read_dir(&marks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(done, ["attempt-2"], "exactly one copy ran to completion");
    c.shutdown().await;
}

/// A conductor restart mid-run loses nothing: the finished task keeps its result, the
/// running attempt keeps running on its node and is adopted (same generation), a queued run
/// stays queued, and the run then finishes.
#[tokio::test]
async fn a_conductor_restart_mid_run_loses_nothing() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let gate = c.node_work_dir("n1").join("gate");
    define(
        &c,
        json!({"name": "durable", "max_running": 1, "tasks": [
            {"name": "a", "config": sh(r#"echo '{"a": 1}' > "$SYMPHONY_OUTPUT""#)},
            {"name": "b", "depends_on": ["a"], "config": sh(&format!(
                r#"while ! test -e {}; do sleep 0.05; done; echo "$SYMPHONY_INPUTS" > "$SYMPHONY_OUTPUT""#,
                gate.display()))},
        ]}),
    )
    .await;
    let first = start(&c, "durable", json!({})).await;
    let second = start(&c, "durable", json!({})).await;
    let before = c
        .wait("b running", |v| {
            v.deployments.iter().any(|d| {
                d.name == format!("durable/{first}/b")
                    && d.current_state == Some(symphony::model::CurrentState::Running)
            })
        })
        .await;
    let b = before
        .deployments
        .iter()
        .find(|d| d.name == format!("durable/{first}/b"))
        .unwrap()
        .status
        .clone()
        .unwrap();
    c.restart_conductor().await;
    let (_, run) = c.get(&format!("/runs/{first}")).await;
    assert_eq!(run["state"], "RUNNING", "{run}");
    assert_eq!(task(&run, "a")["result"], json!({"a": 1}));
    assert_eq!(task(&run, "b")["state"], "RUNNING");
    // Where b's attempt runs survives the restart (from its assignment: a placement alone
    // does not write the run).
    let attempt = &task(&run, "b")["attempts"][0];
    assert_eq!(attempt["node_id"], "n1", "{run}");
    assert_eq!(attempt["generation"], json!(b.generation), "{run}");
    let (_, queued) = c.get(&format!("/runs/{second}")).await;
    assert_eq!(queued["state"], "QUEUED", "{queued}");
    // The node comes back with b's process: adopted, not started again.
    let after = c
        .wait("b reported again", |v| {
            v.deployments.iter().any(|d| {
                d.name == format!("durable/{first}/b")
                    && d.status.as_ref().is_some_and(|s| s.pid.is_some())
            })
        })
        .await;
    let again = after
        .deployments
        .iter()
        .find(|d| d.name == format!("durable/{first}/b"))
        .unwrap()
        .status
        .clone()
        .unwrap();
    assert_eq!((again.pid, again.generation), (b.pid, b.generation));
    std::fs::write(&gate, "").unwrap();
    let run = until_run(&c, &first, "SUCCEEDED").await;
    assert_eq!(task(&run, "b")["result"], json!({"a": {"a": 1}}));
    assert_eq!(task(&run, "b")["attempts"].as_array().unwrap().len(), 1);
    // The queued run starts once the first ended.
    until_run(&c, &second, "SUCCEEDED").await;
    c.shutdown().await;
}

/// Cancel stops running attempts and skips the rest; fail_fast cancels a run when a task
/// fails; a task past its timeout is stopped and fails (no retry on timeout here). Every
/// transition is an event.
#[tokio::test]
async fn cancel_fail_fast_and_timeouts_end_runs_with_their_reasons() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    define(
        &c,
        json!({"name": "slow", "tasks": [
            {"name": "a", "config": sh("sleep 1000")},
            {"name": "b", "depends_on": ["a"], "config": sh("true")}]}),
    )
    .await;
    let id = start(&c, "slow", json!({})).await;
    c.wait("a running", |v| {
        v.deployments.iter().any(|d| {
            d.name == format!("slow/{id}/a")
                && d.current_state == Some(symphony::model::CurrentState::Running)
        })
    })
    .await;
    let (status, body) = c.post(&format!("/runs/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let run = until_run(&c, &id, "CANCELLED").await;
    assert_eq!(task(&run, "a")["state"], "CANCELLED");
    assert_eq!(task(&run, "a")["attempts"][0]["outcome"], "cancelled");
    assert_eq!(task(&run, "b")["state"], "CANCELLED");
    // b never ran: its one event says so.
    let b = c
        .wait_events(
            &format!("object=run/{id}&kind=task&after=0"),
            "b's end",
            |e| e.iter().any(|e| e["fields"]["task"] == "b"),
        )
        .await;
    let b: Vec<&str> = b
        .iter()
        .filter(|e| e["fields"]["task"] == "b")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(b, ["task.cancelled"]);
    c.wait("a's process stopped", |v| {
        v.nodes
            .get("n1")
            .is_some_and(|n| n.assigned_deployments.is_empty())
    })
    .await;

    define(
        &c,
        json!({"name": "ff", "fail_fast": true, "tasks": [
            {"name": "long", "config": sh("sleep 1000")},
            {"name": "bad", "config": sh("exit 4")},
            {"name": "after", "depends_on": ["long"], "config": sh("true")}]}),
    )
    .await;
    let ff = start(&c, "ff", json!({})).await;
    let run = until_run(&c, &ff, "FAILED").await;
    assert_eq!(task(&run, "bad")["state"], "FAILED");
    assert_eq!(task(&run, "bad")["attempts"][0]["exit_code"], 4);
    assert_eq!(task(&run, "long")["state"], "CANCELLED");
    assert_eq!(task(&run, "after")["state"], "CANCELLED");
    assert!(
        run["reason"].as_str().unwrap().contains("fail_fast"),
        "{run}"
    );
    // The attempt fail_fast stopped ends its story on the run, with where it ran.
    let story = c
        .wait_events(
            &format!("object=run/{ff}&kind=task&after=0"),
            "long's end",
            |e| {
                e.iter()
                    .any(|e| e["kind"] == "task.cancelled" && e["fields"]["task"] == "long")
            },
        )
        .await;
    let long: Vec<&Value> = story
        .iter()
        .filter(|e| e["fields"]["task"] == "long")
        .collect();
    let kinds: Vec<&str> = long.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["task.started", "task.cancelled"], "{story:?}");
    assert_eq!(long[1]["fields"]["node"], "n1");
    assert_eq!(long[1]["fields"]["outcome"], "cancelled");

    define(
        &c,
        json!({"name": "to", "tasks": [{"name": "t", "timeout_sec": 0.5, "retries": 2,
            "retry_on": [7], "config": sh("sleep 1000")}]}),
    )
    .await;
    let to = start(&c, "to", json!({})).await;
    let run = until_run(&c, &to, "FAILED").await;
    let attempts = task(&run, "t")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 1, "a timeout is not in retry_on [7]");
    assert_eq!(attempts[0]["outcome"], "timeout");

    let (_, events) = c.get(&format!("/events?object=run/{id}&limit=100")).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for want in [
        "run.queued",
        "run.started",
        "task.started",
        "task.cancelled",
        "run.cancelled",
    ] {
        assert!(kinds.contains(&want), "{want} missing in {kinds:?}");
    }
    c.shutdown().await;
}

/// A workflow with a cron schedule knows its next run: the next minute boundary for
/// `* * * * *`, in its time zone.
#[tokio::test]
async fn a_scheduled_workflow_plans_its_next_run() {
    let c = Cluster::start().await;
    define(
        &c,
        json!({"name": "nightly", "schedule": {"cron": "* * * * *", "timezone": "Asia/Kolkata"},
            "tasks": [{"name": "t", "config": sh("true")}]}),
    )
    .await;
    let (_, w) = c.get("/workflows/nightly").await;
    let next = w["next_run_at_ms"].as_i64().unwrap();
    let now = symphony::time::now_ms();
    assert!(next > now && next <= now + 60_000, "{w}");
    assert_eq!(next % 60_000, 0, "a minute boundary: {w}");
    c.shutdown().await;
}

/// `keep_runs`: once a run ends, the oldest finished runs beyond it go with their task
/// deployments, in the store too (a restart does not bring them back); the rest stay whole.
#[tokio::test]
async fn finished_runs_beyond_keep_runs_go_with_their_task_deployments() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    define(
        &c,
        json!({"name": "kept", "keep_runs": 2, "tasks": [
            {"name": "a", "config": sh("true")},
            {"name": "b", "depends_on": ["a"], "config": sh("true")}]}),
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = start(&c, "kept", json!({})).await;
        until_run(&c, &id, "SUCCEEDED").await;
        ids.push(id);
    }
    let tasks_of = |v: &symphony::conductor::view::ClusterView, run: &str| {
        v.deployments
            .iter()
            .filter(|d| d.id.as_str().ends_with(&format!("-{run}")))
            .count()
    };
    let v = c
        .wait("two runs kept", |v| {
            v.runs.iter().filter(|r| r.workflow == "kept").count() == 2
        })
        .await;
    let kept: Vec<&str> = v.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(kept.len(), 2);
    for old in &ids[..2] {
        assert!(!kept.contains(&old.as_str()), "{old} should be gone");
        assert_eq!(tasks_of(&v, old), 0, "{old}'s task deployments remain");
        let (status, _) = c.get(&format!("/runs/{old}")).await;
        assert_eq!(status, 404);
    }
    for new in &ids[2..] {
        assert!(kept.contains(&new.as_str()));
        assert_eq!(tasks_of(&v, new), 2, "{new} keeps its tasks");
    }
    c.restart_conductor().await;
    let v = c.conductor().core.view();
    assert_eq!(v.runs.len(), 2, "the store kept the same two");
    assert_eq!(tasks_of(&v, &ids[0]), 0);
    assert_eq!(tasks_of(&v, &ids[3]), 2);
    c.shutdown().await;
}

/// A task's lines reach the conductor, the last ones too: a task lives for milliseconds and
/// its placement ends with it, before its node ships what it logged.
#[tokio::test]
async fn a_short_tasks_log_is_kept_to_its_last_line() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    define(
        &c,
        json!({"name": "talk", "tasks": [
            {"name": "a", "config": sh("echo first; echo last >&2")},
        ]}),
    )
    .await;
    let id = start(&c, "talk", json!({})).await;
    let run = until_run(&c, &id, "SUCCEEDED").await;
    let dep = task(&run, "a")["deployment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let has = |entries: &[Value], stream: &str, line: &str| {
        entries
            .iter()
            .any(|e| e["stream"] == stream && e["line"] == line)
    };
    let entries = log_until(&c, &dep, |e| has(e, "stderr", "last")).await;
    assert!(has(&entries, "stdout", "first"), "{entries:?}");
    c.shutdown().await;
}
