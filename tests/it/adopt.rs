//! Workloads outlive their agent: `kill -9` of a node agent (a `symphony node` process) and an
//! upgrade in place leave the workloads running under their keepers; the next agent adopts
//! them (same pids, one copy each, logs without a gap) or stops what it must not keep.

use std::collections::BTreeMap;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::{
    Cluster, NodeProcess, alive, log_until, pid_of, pids_with, sh, symphony_bin, until,
};

/// A cluster and node agent `id` run as a `symphony node` process, online.
async fn cluster_with_agent(id: &str) -> (Cluster, NodeProcess, std::path::PathBuf) {
    let c = Cluster::start().await;
    let bin = symphony_bin();
    let node = NodeProcess::start(&c, id, &bin, &[]);
    online(&c, id).await;
    (c, node, bin)
}

async fn online(c: &Cluster, id: &str) {
    let id = id.to_owned();
    c.wait(&format!("{id} online"), |v| {
        v.nodes.get(&id).is_some_and(|n| n.state == "online")
    })
    .await;
}

async fn offline(c: &Cluster, id: &str) {
    let id = id.to_owned();
    c.wait(&format!("{id} not online"), |v| {
        v.nodes.get(&id).is_some_and(|n| n.state != "online")
    })
    .await;
}

/// Waits until deployment `id` is RUNNING with pid `pid`; returns its JSON.
async fn running_with(c: &Cluster, id: &str, pid: u64) -> Value {
    let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
    loop {
        let (_, d) = c.get(&format!("/deployments/{id}")).await;
        if d["status"]["state"] == "RUNNING" && d["status"]["pid"] == pid {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never RUNNING with pid {pid}: {d}"
        );
        let mut rx = c.conductor().core.subscribe();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), rx.changed()).await;
    }
}

/// The numbers `k` of the `tick k` lines, in log order.
fn ticks(entries: &[Value]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|e| e["line"].as_str()?.strip_prefix("tick ")?.parse().ok())
        .collect()
}

#[tokio::test]
async fn kill9_of_the_agent_adopts_its_workloads_and_keeps_their_logs() {
    let (c, mut node, bin) = cluster_with_agent("k9").await;
    let a = c.deploy("a", sh("exec sleep 424201")).await;
    let b = c.deploy("b", sh("exec sleep 424202")).await;
    // Marker 424203 in the script names the logger's process.
    let l = c
        .deploy(
            "logger",
            sh("m=424203; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.002; done"),
        )
        .await;
    let mut pids = BTreeMap::new();
    for id in [&a, &b, &l] {
        pids.insert(id.clone(), pid_of(&c.wait_state(id, "RUNNING").await));
    }
    let before = ticks(&log_until(&c, &l, |e| ticks(e).len() >= 20).await);
    // One agent per work dir: a second one refuses to start.
    let second = std::process::Command::new(&bin)
        .args(["node", "--config"])
        .arg(&node.config)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("another node agent already runs"), "{said}");
    let agent = node.pid();
    node.kill9();
    offline(&c, "k9").await;
    // The workloads did not notice: still the same processes, one each.
    for (id, pid) in &pids {
        assert!(alive(*pid), "{id} (pid {pid}) died with its agent");
    }
    let during = *before.last().unwrap();
    node.restart(&bin, &[]);
    assert_ne!(node.pid(), agent);
    online(&c, "k9").await;
    for (id, pid) in &pids {
        let d = running_with(&c, id, *pid).await;
        assert_eq!(d["status"]["restart_count"], 0, "{d}");
    }
    for marker in ["sleep 424201", "sleep 424202", "m=424203"] {
        assert_eq!(pids_with(marker).len(), 1, "one copy of {marker}");
    }
    // The logger went on writing while its agent was dead; every line reached the conductor.
    let entries = log_until(&c, &l, |e| {
        ticks(e).last().is_some_and(|&t| t > during + 300)
    })
    .await;
    let got = ticks(&entries);
    let last = *got.last().unwrap();
    let mut seen = vec![0u32; usize::try_from(last).unwrap() + 1];
    for &t in &got {
        seen[usize::try_from(t).unwrap()] += 1;
    }
    let missing: Vec<usize> = (1..seen.len()).filter(|&t| seen[t] == 0).collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");
    // At the instant of the kill a batch may have been shipped before its cursor was saved
    // (at least once); never more than that one batch.
    let twice = seen.iter().filter(|&&n| n > 1).count();
    assert!(twice <= 256, "{twice} lines came twice");
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase"
    );
    for id in [&a, &b, &l] {
        c.delete(&format!("/deployments/{id}")).await;
    }
    for marker in ["sleep 424201", "sleep 424202", "m=424203"] {
        until(&format!("{marker} stopped"), || {
            pids_with(marker).is_empty()
        })
        .await;
    }
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_workload_that_exits_while_its_agent_is_down_is_seen_exited_and_restarted_once() {
    let (c, mut node, bin) = cluster_with_agent("k9exit").await;
    let go = c.dir.path().join("go");
    // Exits 3 once `go` exists (and takes it away, so the restarted copy waits again).
    let script = format!(
        "m=424211; while [ ! -e {go} ]; do sleep 0.02; done; rm {go}; exit 3",
        go = go.display()
    );
    let mut spec = sh(&script);
    spec["restart_policy"] = json!({"type": "on-failure", "max_restarts": 5});
    let id = c.deploy("exits", spec).await;
    let pid = pid_of(&c.wait_state(&id, "RUNNING").await);
    node.kill9();
    std::fs::write(&go, "").unwrap();
    until("the workload exited", || !alive(pid)).await;
    node.restart(&bin, &[]);
    online(&c, "k9exit").await;
    c.wait_new_process(&id, pid, "restarted after its exit")
        .await;
    let (_, d) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(
        d["status"]["restart_count"], 1,
        "the policy was applied once: {d}"
    );
    assert_eq!(
        d["status"]["last_exit_code"], 3,
        "the exit code was known: {d}"
    );
    assert_eq!(pids_with("m=424211").len(), 1);
    c.delete(&format!("/deployments/{id}")).await;
    until("stopped", || pids_with("m=424211").is_empty()).await;
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}

#[tokio::test]
async fn kill9_during_a_stop_and_during_a_start_never_leaves_two_copies() {
    let (c, mut node, bin) = cluster_with_agent("k9stop").await;
    // A workload that takes its time to stop: SIGTERM starts a 1.4 s shutdown.
    let mut spec =
        sh("m=424221; trap 'sleep 1.424221; exit 0' TERM; while true; do sleep 0.05; done");
    spec["stop_timeout"] = json!(20);
    let slow = c.deploy("slow-stop", spec).await;
    let pid = pid_of(&c.wait_state(&slow, "RUNNING").await);
    let (code, _) = c
        .patch(
            &format!("/deployments/{slow}"),
            json!({"desired_state": "STOPPED"}),
        )
        .await;
    assert_eq!(code, 200);
    until("the stop began", || !pids_with("sleep 1.424221").is_empty()).await;
    node.kill9();
    // During a start: the agent dies right after the conductor hands it a new deployment.
    let fast = c.deploy("fresh", sh("exec sleep 424222")).await;
    node.restart(&bin, &[]);
    online(&c, "k9stop").await;
    c.wait_state(&slow, "STOPPED").await;
    until("the stopped workload is gone", || !alive(pid)).await;
    assert!(
        pids_with("m=424221").is_empty(),
        "no copy of the stopped one"
    );
    c.wait_state(&fast, "RUNNING").await;
    assert_eq!(
        pids_with("sleep 424222").len(),
        1,
        "one copy of the started one"
    );
    node.kill9();
    node.restart(&bin, &[]);
    online(&c, "k9stop").await;
    c.wait_state(&fast, "RUNNING").await;
    assert_eq!(pids_with("sleep 424222").len(), 1, "still one copy");
    c.delete(&format!("/deployments/{fast}")).await;
    until("deleted", || pids_with("sleep 424222").is_empty()).await;
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_in_place_keeps_the_workloads_and_a_plain_sigterm_stops_them() {
    let c = Cluster::start().await;
    // The agent runs from a copy of the binary, which the upgrade replaces by a new file.
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("symphony");
    std::fs::copy(symphony_bin(), &bin).unwrap();
    let mut node = NodeProcess::start(&c, "upg", &bin, &["--keep-workloads"]);
    online(&c, "upg").await;
    let id = c.deploy("kept", sh("exec sleep 424231")).await;
    let pid = pid_of(&c.wait_state(&id, "RUNNING").await);
    node.signal_and_wait(Signal::SIGTERM).await;
    assert!(alive(pid), "the workload outlived the agent");
    // The next `online` must be the new agent's connection, not the old one's.
    offline(&c, "upg").await;
    let new = bin_dir.path().join("symphony.new");
    std::fs::copy(symphony_bin(), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    node.restart(&bin, &[]);
    online(&c, "upg").await;
    running_with(&c, &id, pid).await;
    assert_eq!(pids_with("sleep 424231"), vec![u32::try_from(pid).unwrap()]);
    // SIGUSR2 is the same upgrade intent without the flag.
    node.signal_and_wait(Signal::SIGUSR2).await;
    assert!(alive(pid));
    offline(&c, "upg").await;
    node.restart(&bin, &[]);
    online(&c, "upg").await;
    running_with(&c, &id, pid).await;
    // A plain SIGTERM (no --keep-workloads) stops them, as before.
    node.signal_and_wait(Signal::SIGTERM).await;
    assert!(!alive(pid), "a plain SIGTERM stops the workloads");
    assert!(pids_with("sleep 424231").is_empty());
    c.shutdown().await;
}

#[tokio::test]
async fn kill9_during_an_env_provisioning_leaves_no_step_behind() {
    if crate::node::which("uv").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "uv must be installed in CI (.ci/run installs it)"
        );
        eprintln!("skipped: uv is not on PATH (pip install uv)");
        return;
    }
    let (c, mut node, bin) = cluster_with_agent("k9env").await;
    // The env's script takes long the first time only, so the agent can be killed in it.
    let once = c.dir.path().join("slow-once");
    let script = format!(
        "if [ ! -e {o} ]; then touch {o}; sleep 424.241; fi",
        o = once.display()
    );
    let (status, env) = c
        .post(
            "/conda-envs",
            json!({"name": "slowenv", "python_version": "3.11", "manager": "uv", "custom_script": script}),
        )
        .await;
    assert_eq!(status, 201, "{env}");
    let id = c
        .deploy(
            "in-env",
            json!({"config": {"command": ["sleep", "424243"], "env_name": "slowenv"}}),
        )
        .await;
    // Killed once the step is recorded: the agent writes the record right after the spawn,
    // and a kill in that instant (microseconds) would leave a step nobody knows of.
    let steps = c.dir.path().join("nodes/k9env/work/env-steps");
    until("the provisioning step runs, recorded", || {
        !pids_with("sleep 424.241").is_empty()
            && std::fs::read_dir(&steps).is_ok_and(|mut d| d.next().is_some())
    })
    .await;
    node.kill9();
    assert!(
        !pids_with("sleep 424.241").is_empty(),
        "the step outlived its agent"
    );
    node.restart(&bin, &[]);
    // The new agent kills the step it finds and provisions the env again from the start.
    until("the left step is killed", || {
        pids_with("sleep 424.241").is_empty()
    })
    .await;
    c.wait_state(&id, "RUNNING").await;
    assert_eq!(pids_with("sleep 424243").len(), 1);
    c.delete(&format!("/deployments/{id}")).await;
    until("deleted", || pids_with("sleep 424243").is_empty()).await;
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}

/// The files under `dir` (recursively) holding `needle`.
fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn git_tokens_are_sealed_at_rest_and_a_restarted_conductor_and_agent_open_them() {
    const TOKEN: &str = "tok-AT-REST-5f3a9c1e";
    let (mut c, mut node, bin) = cluster_with_agent("sealed").await;
    let repo = c.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    crate::node::make_repo(&repo);
    let spec = json!({"config": {"command": ["sh", "-c", "exec sleep 424251"],
        "git_repo": repo.display().to_string(), "token": TOKEN}});
    let id = c.deploy("private", spec).await;
    let pid = pid_of(&c.wait_state(&id, "RUNNING").await);
    let (_, one) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(one["specification"]["spec"]["config"]["token"], "********");

    // The node got the real token: its state file, opened with its key, holds it.
    let work = c.dir.path().join("nodes/sealed/work");
    let key_file = work.join(symphony::seal::KEY_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = symphony::seal::SealKey::load_or_create(&key_file).unwrap();
    let state = symphony::node::state::LocalState::new(work.join("state.bin"), key.clone());
    until("the node's state holds the deployment", || {
        state.load().unwrap().len() == 1
    })
    .await;
    let held = state.load().unwrap();
    let token = |spec: &symphony::spec::DeploymentSpec| spec.git.as_ref().unwrap().token.clone();
    assert_eq!(token(&held[0].spec).as_deref(), Some(TOKEN));
    // The keeper's record holds it sealed.
    let mut record = symphony::node::keeper::Record::load(&work.join("run").join(&id)).unwrap();
    let sealed = token(&record.launch.spec).unwrap();
    assert!(symphony::seal::is_sealed(&sealed), "{sealed}");
    record.open_secrets(&key);
    assert_eq!(token(&record.launch.spec).as_deref(), Some(TOKEN));
    // No file of the conductor or the node holds it in clear (database, WAL, state, records).
    assert_eq!(
        files_holding(c.dir.path(), TOKEN),
        Vec::<std::path::PathBuf>::new()
    );

    // A restarted conductor opens it again (the deployment stays as it is), and a restarted
    // agent opens its state and the keeper's record alike: the same process is adopted, not
    // restarted for a spec that looks changed.
    node.kill9();
    offline(&c, "sealed").await;
    c.restart_conductor().await;
    node.restart(&bin, &[]);
    online(&c, "sealed").await;
    let d = running_with(&c, &id, pid).await;
    assert_eq!(d["status"]["restart_count"], 0, "{d}");
    assert_eq!(pids_with("sleep 424251").len(), 1);
    let stored = c
        .open_store()
        .await
        .get_deployment(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.specification["spec"]["config"]["token"], TOKEN);
    assert_eq!(
        files_holding(c.dir.path(), TOKEN),
        Vec::<std::path::PathBuf>::new()
    );
    c.delete(&format!("/deployments/{id}")).await;
    until("deleted", || pids_with("sleep 424251").is_empty()).await;
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}

/// A workflow task runs without a keeper (`outlive_agent: false`): `kill -9` of its agent
/// leaves the process behind, and the next agent ends it rather than adopting it. The
/// attempt fails with that reason and the retry runs once to completion.
#[tokio::test]
async fn a_task_attempt_ends_with_its_agent_and_its_retry_runs_once() {
    let (c, mut node, bin) = cluster_with_agent("tasks").await;
    let def = json!({"name": "agentdeath", "tasks": [{"name": "t",
        "retries": {"max_attempts": 3, "backoff_sec": 0.05},
        "config": {"command": ["sh", "-c", "test \"$SYMPHONY_ATTEMPT\" -gt 1 || exec sleep 424261"]}}]});
    let (status, body) = c.post("/workflows", def).await;
    assert_eq!(status, 201, "{body}");
    let (status, run) = c.post("/workflows/agentdeath/runs", json!({})).await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    until("attempt 1 running", || pids_with("sleep 424261").len() == 1).await;
    let first = pids_with("sleep 424261")[0];
    // The agent wrote down that it holds the task (before that, a restarted agent knows
    // nothing of it: it ends the process and the conductor's resent Assign starts the same
    // attempt afresh).
    let state = c.dir.path().join("nodes/tasks/work/state.attached.bin");
    let dep = format!("t0-{id}");
    until("the task in the node's local state", || {
        std::fs::read(&state).is_ok_and(|b| b.windows(dep.len()).any(|w| w == dep.as_bytes()))
    })
    .await;

    node.kill9();
    // No keeper holds it: it is orphaned, still running, until an agent ends it.
    assert!(alive(u64::from(first)));
    node.restart(&bin, &[]);
    c.wait("the run ends", |v| {
        v.runs.iter().any(|r| r.id == id && r.state.is_done())
    })
    .await;
    let (_, run) = c.get(&format!("/runs/{id}")).await;
    assert_eq!(run["state"], "SUCCEEDED", "{run}");
    let attempts = run["tasks"][0]["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"]["failed"]["exit_code"], Value::Null);
    let reason = attempts[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("outlive_agent: false"), "{reason}");
    assert_eq!(attempts[1]["outcome"], "succeeded", "{attempts:?}");
    assert!(!alive(u64::from(first)), "the left process was ended");
    assert!(pids_with("sleep 424261").is_empty());
    node.signal_and_wait(Signal::SIGTERM).await;
    c.shutdown().await;
}
