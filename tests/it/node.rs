//! Node features end to end through the conductor: a git checkout as the working directory
//! (branch, tag, commit), and a uv environment defined over the API, used by a deployment, and
//! removed from the node when it is deleted.

use std::path::Path;

use serde_json::json;

use crate::support::{Cluster, alive, pid_of, until};

/// A repository with `main` (v1), a tag `t1` on it, a branch `dev` (v2) and a later `main` (v3).
pub(crate) fn make_repo(dir: &Path) -> (String, String) {
    let repo = git2::Repository::init(dir).unwrap();
    let sig = git2::Signature::now("t", "t@example.invalid").unwrap();
    let commit = |msg: &str,
                  content: &str,
                  parent: Option<&git2::Commit<'_>>,
                  refname: Option<&str>|
     -> git2::Oid {
        std::fs::write(dir.join("VERSION"), content).unwrap();
        let mut idx = repo.index().unwrap();
        idx.add_path(Path::new("VERSION")).unwrap();
        idx.write().unwrap();
        let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
        let parents: Vec<&git2::Commit<'_>> = parent.into_iter().collect();
        repo.commit(refname, &sig, &sig, msg, &tree, &parents)
            .unwrap()
    };
    let c1 = commit("v1", "v1", None, Some("HEAD"));
    let c1c = repo.find_commit(c1).unwrap();
    repo.tag_lightweight("t1", c1c.as_object(), false).unwrap();
    let c2 = commit("v2", "v2", Some(&c1c), None);
    repo.branch("dev", &repo.find_commit(c2).unwrap(), false)
        .unwrap();
    let c3 = commit("v3", "v3", Some(&c1c), Some("HEAD"));
    (c1.to_string(), c3.to_string())
}

#[tokio::test]
async fn deployments_run_in_a_git_checkout_at_a_branch_tag_or_commit() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let repo_dir = c.dir.path().join("repo");
    std::fs::create_dir_all(&repo_dir).unwrap();
    let (c1, _c3) = make_repo(&repo_dir);
    let repo = repo_dir.display().to_string();
    for (git_ref, expect) in [
        (Some("dev"), "v2"),
        (Some("t1"), "v1"),
        (Some(c1.as_str()), "v1"),
        (Some(&c1[..10]), "v1"),
        (None, "v3"),
    ] {
        let mut config = json!({"command": ["sh", "-c", "echo version=$(cat VERSION); sleep 1000"], "git_repo": repo});
        if let Some(r) = git_ref {
            config["git_ref"] = json!(r);
        }
        let id = c
            .deploy(
                &format!("git-{}", git_ref.unwrap_or("default")),
                json!({"config": config}),
            )
            .await;
        let d = c.wait_state(&id, "RUNNING").await;
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", pid_of(&d))).unwrap();
        assert!(cwd.ends_with(format!("workspaces/{id}")), "{cwd:?}");
        assert_eq!(
            std::fs::read_to_string(cwd.join("VERSION")).unwrap(),
            expect,
            "ref {git_ref:?}"
        );
        assert_eq!(c.delete(&format!("/deployments/{id}")).await.0, 204);
    }
    // An unknown ref fails the deployment with the reason (after its retries), nothing else.
    let spec = json!({"config": {"command": ["true"], "git_repo": repo, "git_ref": "no-such-ref"},
        "restart_policy": {"type": "on-failure", "backoff_seconds": 0.01}, "max_restarts": 1});
    let id = c.deploy("bad-ref", spec).await;
    let d = c.wait_state(&id, "FAILED").await;
    assert!(
        d["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("no-such-ref"),
        "{d}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_uv_environment_defined_over_the_api_is_used_by_a_deployment_and_removed_when_deleted() {
    if which("uv").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "uv must be installed in CI (.ci/run installs it)"
        );
        eprintln!("skipped: uv is not on PATH (pip install uv)");
        return;
    }
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let python = "3.11";
    let (status, env) = c.post("/conda-envs", json!({"name": "sixenv", "python_version": python, "packages": ["six==1.16.0"], "manager": "uv"})).await;
    assert_eq!(status, 201, "{env}");
    let (status, env) = c
        .post(
            "/conda-envs",
            json!({"name": "spare", "python_version": python, "manager": "uv"}),
        )
        .await;
    assert_eq!(status, 201, "{env}");
    // The node provisions them in the background and reports them; then a deployment can use one.
    c.wait("node reports the envs", |v| {
        let envs = &v.nodes["n1"].conda_envs;
        envs.iter().any(|e| e == "sixenv") && envs.iter().any(|e| e == "spare")
    })
    .await;
    let env_kinds = |e: &[serde_json::Value]| -> Vec<String> {
        e.iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let story = c
        .wait_events("object=env/sixenv&after=0", "sixenv ready on n1", |e| {
            env_kinds(e).iter().any(|k| k == "env.ready")
        })
        .await;
    assert_eq!(env_kinds(&story), ["env.defined", "env.ready"], "{story:?}");
    assert_eq!(story[1]["fields"]["node"], "n1");
    // On SIGTERM it waits for `release` before it exits, so the env is deleted while it still
    // runs; it touches `ready` once the handler is in place.
    let script = "import os, signal, six, sys, time\n\
        def stop(*a):\n    \
            while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n    \
            sys.exit(0)\n\
        signal.signal(signal.SIGTERM, stop)\n\
        print('six', six.__version__, sys.prefix, flush=True)\n\
        open(sys.argv[1], 'w').close()\n\
        time.sleep(1000)";
    let ready = c.dir.path().join("handler-ready");
    let release = c.dir.path().join("release");
    let command = json!(["python", "-c", script, ready, release]);
    let id = c
        .deploy(
            "uses-six",
            json!({"config": {"command": command, "env_name": "sixenv"}, "stop_timeout_sec": 30}),
        )
        .await;
    let d = c.wait_state(&id, "RUNNING").await;
    let pid = pid_of(&d);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("VIRTUAL_ENV=") && environ.contains("sixenv"),
        "not in the venv"
    );

    until("the deployment is ready", || ready.exists()).await;

    // Deleting an env that a deployment should run in is refused, naming the deployment.
    let (status, body) = c.delete("/conda-envs/sixenv").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|m| m.contains(&id)),
        "{body}"
    );
    // Once the deployment is stopped the env can go, and the node removes its copy too (the
    // original left deleted envs on every node, B1): at once if nothing uses it, else when
    // the process that still runs in it has stopped.
    let stop = json!({"desired_state": "STOPPED"});
    assert_eq!(c.patch(&format!("/deployments/{id}"), stop).await.0, 200);
    assert_eq!(c.delete("/conda-envs/sixenv").await.0, 204);
    let uv_dir = c.node_work_dir("n1").join("envs").join("uv");
    let view = c
        .wait("node says it keeps sixenv while the process stops", |v| {
            v.nodes["n1"]
                .env_problems
                .iter()
                .any(|p| p.starts_with("env sixenv: no longer defined, kept"))
        })
        .await;
    assert!(
        view.nodes["n1"].env_problems[0].contains(&id),
        "names the deployment: {:?}",
        view.nodes["n1"].env_problems
    );
    assert!(
        !view.nodes["n1"].conda_envs.iter().any(|e| e == "sixenv"),
        "an env on its way out is not offered to the scheduler"
    );
    assert!(alive(pid), "the env is kept while its process runs");
    assert!(uv_dir.join("sixenv").join("bin").exists());
    std::fs::write(&release, b"").unwrap();
    c.wait(
        "sixenv removed once its process ended, problem cleared",
        |v| v.nodes["n1"].env_problems.is_empty(),
    )
    .await;
    assert!(!alive(pid));
    assert!(!uv_dir.join("sixenv").exists());
    let story = c
        .wait_events("object=env/sixenv&after=0", "sixenv removed from n1", |e| {
            env_kinds(e).iter().any(|k| k == "env.removed")
        })
        .await;
    assert_eq!(
        env_kinds(&story),
        [
            "env.defined",
            "env.ready",
            "env.deleted",
            "env.problem",
            "env.removed"
        ],
        "{story:?}"
    );
    assert!(
        story[3]["message"].as_str().unwrap().contains("kept"),
        "{story:?}"
    );
    assert!(uv_dir.join("spare").exists(), "other envs are kept");

    // A node that was away when an env was deleted removes it when it comes back.
    c.stop_node("n1").await;
    assert_eq!(c.delete("/conda-envs/spare").await.0, 204);
    assert!(uv_dir.join("spare").exists());
    c.add_node("n1", &["local"], &[], false).await;
    c.wait("the returning node removed spare", |v| {
        !v.nodes["n1"].conda_envs.iter().any(|e| e == "spare")
    })
    .await;
    assert!(!uv_dir.join("spare").exists());
    c.shutdown().await;
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

#[tokio::test]
async fn a_scheduled_restart_replaces_the_process_without_counting_as_a_failure() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    // A 6-field (per-second) schedule keeps the test short; 5-field cron works the same way.
    let spec = json!({"config": {"command": ["sleep", "1000"]},
        "auto_restart": {"enabled": true, "cron": "*/2 * * * * *", "timezone": "Europe/Paris"}});
    let id = c.deploy("cron", spec).await;
    let first = pid_of(&c.wait_state(&id, "RUNNING").await);
    let view = c
        .wait_new_process(&id, first, "restarted by its schedule")
        .await;
    let st = view.deployment(&id).unwrap().status.clone().unwrap();
    assert_eq!(
        st.restart_count, 0,
        "scheduled restarts do not spend the restart budget"
    );
    assert!(!crate::support::alive(first));
    c.shutdown().await;
}

/// A state store whose writes block until released (a disk that stalls on fsync).
#[derive(Debug, Default)]
struct StallingDisk {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    started: std::sync::atomic::AtomicUsize,
    /// The ids of the last completed write.
    written: std::sync::Mutex<Option<Vec<String>>>,
}

impl symphony::node::state::StateStore for StallingDisk {
    fn load(&self) -> std::io::Result<Vec<symphony::node::state::Held>> {
        Ok(Vec::new())
    }

    fn save(&self, held: &[std::sync::Arc<symphony::node::state::Held>]) -> std::io::Result<()> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        *self.written.lock().unwrap() = Some(held.iter().map(|h| h.id.to_string()).collect());
        Ok(())
    }

    fn describe(&self) -> String {
        "a stalling disk".into()
    }
}

/// A disk that refuses every write while `full` is set, as a full disk does.
#[derive(Debug, Default)]
struct FullDisk {
    full: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicUsize,
    /// The ids of the last completed write.
    written: std::sync::Mutex<Option<Vec<String>>>,
}

impl symphony::node::state::StateStore for FullDisk {
    fn load(&self) -> std::io::Result<Vec<symphony::node::state::Held>> {
        Ok(Vec::new())
    }

    fn save(&self, held: &[std::sync::Arc<symphony::node::state::Held>]) -> std::io::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        *self.written.lock().unwrap() = Some(held.iter().map(|h| h.id.to_string()).collect());
        Ok(())
    }

    fn describe(&self) -> String {
        "/full/state.bin".into()
    }
}

/// A node whose disk is full says so on `/nodes` (not only in its log), keeps running its
/// work, tries the write again, and clears the problem once the write goes through.
#[tokio::test]
async fn a_full_state_disk_is_a_node_problem_until_a_write_succeeds() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut c = Cluster::start().await;
    let disk = std::sync::Arc::new(FullDisk::default());
    disk.full.store(true, SeqCst);
    c.add_node_with_store("n1", disk.clone()).await;
    let d1 = c.deploy("one", crate::support::sh("sleep 1000")).await;
    c.wait_state(&d1, "RUNNING").await;
    let problems = |v: &symphony::conductor::view::ClusterView| {
        v.nodes
            .get("n1")
            .map(|n| n.problems.clone())
            .unwrap_or_default()
    };
    c.wait("the node reports its full disk", |v| {
        problems(v)
            .iter()
            .any(|p| p.contains("/full/state.bin") && p.contains("No space left"))
    })
    .await;
    let (status, api) = c.get("/nodes").await;
    assert_eq!(status, 200);
    let listed = api["nodes"]["n1"]["problems"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{api}");
    // Tried again, not given up after one failure.
    until("a second attempt", || disk.refused.load(SeqCst) >= 2).await;
    assert_eq!(*disk.written.lock().unwrap(), None);
    // Space is back: the held deployment is written and the problem clears.
    disk.full.store(false, SeqCst);
    c.wait("the problem clears", |v| problems(v).is_empty())
        .await;
    assert_eq!(
        *disk.written.lock().unwrap(),
        Some(vec![d1.clone()]),
        "the state written holds the running deployment"
    );
    c.wait_state(&d1, "RUNNING").await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_stalled_state_disk_delays_neither_commands_nor_heartbeats() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut c = Cluster::start().await;
    let disk = std::sync::Arc::new(StallingDisk::default());
    c.add_node_with_store("n1", disk.clone()).await;

    let d1 = c.deploy("one", crate::support::sh("sleep 1000")).await;
    c.wait_state(&d1, "RUNNING").await;
    until("the first state write has started", || {
        disk.started.load(SeqCst) >= 1
    })
    .await;
    // The write is stuck: commands are still applied and answered ...
    let d2 = c.deploy("two", crate::support::sh("sleep 1000")).await;
    c.wait_state(&d2, "RUNNING").await;
    // ... and heartbeats still arrive.
    let beat = |v: &symphony::conductor::view::ClusterView| {
        v.nodes.get("n1").and_then(|n| n.dynamic_timestamp_unix_ms)
    };
    let first = beat(&c.conductor().core.view());
    c.wait("a heartbeat during the stall", |v| beat(v) > first)
        .await;
    let second = beat(&c.conductor().core.view());
    c.wait("another heartbeat during the stall", |v| beat(v) > second)
        .await;
    assert_eq!(disk.started.load(SeqCst), 1, "one write at a time");
    assert_eq!(*disk.written.lock().unwrap(), None, "still stalled");

    // Released: the newest state is written (the writes in between coalesced).
    *disk.open.lock().unwrap() = true;
    disk.opened.notify_all();
    let mut both = vec![d1.clone(), d2.clone()];
    both.sort();
    until("the newest state is written", || {
        disk.written.lock().unwrap().as_ref() == Some(&both)
    })
    .await;
    assert_eq!(disk.started.load(SeqCst), 2);
    c.shutdown().await;
}
