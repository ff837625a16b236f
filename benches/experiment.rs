//! Experiment launch benchmark: one `POST /experiments` against the same processes created
//! one `POST /deployments` at a time (what a script does without experiments), side by side in
//! one run, with a real conductor, two real node agents (in-process, loopback QUIC) and real
//! processes.
//!
//! The processes are the seed's RL shape: a learner that binds `replay-server` and
//! `parameter-server` and N agents that connect to both (`sleep 1000` each: this measures
//! launching, not the mesh). Each sample is the time from sending the first request to the
//! published snapshot showing every process RUNNING; then everything is deleted (one
//! `DELETE /experiments/{name}`, or one `DELETE /deployments/{id}` each) and the sample ends
//! when every process is gone. N = 1 is the seed's measured case (2 processes on tmux: 1.6 s,
//! quoted from `experiments-and-workflows.md`, not re-measured); N = 64 a larger job.
//!
//! `BENCH_QUICK=1` runs a short smoke version. Results: stdout (a table) and
//! `<CARGO_TARGET_DIR or ./target>/bench/experiment.json`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use symphony::conductor::view::ClusterView;
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::model::CurrentState;
use symphony::node::agent::NodeConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Upper bound for any awaited state.
const DEADLINE: Duration = Duration::from_secs(60);

/// The seed's launch of 2 processes on tmux, quoted.
const SEED_TWO_PROCESSES: &str = "1.6 s (SurrealAI symphony 0.10 on tmux, quoted)";

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let reps = if quick { 2 } else { 7 };
    let sizes: &[usize] = if quick { &[1, 8] } else { &[1, 64] };
    println!(
        "experiment bench ({}): learner + N agents, N in {sizes:?}, {reps} reps each",
        if quick { "quick" } else { "full" }
    );
    let rt = common::runtime()?;
    let results = rt.block_on(run(sizes, reps))?;
    let mut report = common::report(
        "experiment",
        json!({"agents": sizes, "repetitions": reps, "nodes": 2, "command": ["sleep", "1000"]}),
        results,
    );
    report["baseline_quoted"] = json!({ "seed_two_processes_tmux": SEED_TWO_PROCESSES });
    let path = common::write_doc("experiment", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

struct Bed {
    conductor: Conductor,
    api: String,
    http: reqwest::Client,
    rx: watch::Receiver<Arc<ClusterView>>,
    cancel: CancellationToken,
    nodes: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

async fn bed() -> anyhow::Result<Bed> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    let conductor = Conductor::start(cfg).await?;
    let cancel = CancellationToken::new();
    let mut nodes = Vec::new();
    for (i, ip) in [[127, 0, 0, 2], [127, 0, 0, 3]].into_iter().enumerate() {
        let id = format!("bench-{i}");
        let mut n = NodeConfig::local(
            &conductor.ca,
            conductor.quic_addr,
            &id,
            &dir.path().join(&id),
        )?;
        n.keeper = symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
        n.capacities_total = BTreeMap::from([("cpu".to_owned(), 1000)]);
        n.service_ip = std::net::Ipv4Addr::from(ip).into();
        nodes.push(tokio::spawn(symphony::node::agent::run(n, cancel.clone())));
    }
    let mut rx = conductor.core.subscribe();
    tokio::time::timeout(
        DEADLINE,
        rx.wait_for(|v| v.nodes.values().filter(|n| n.state == "online").count() == 2),
    )
    .await??;
    Ok(Bed {
        api: format!("http://{}", conductor.http_addr),
        conductor,
        http: reqwest::Client::new(),
        rx,
        cancel,
        nodes,
        _dir: dir,
    })
}

/// The learner and `agents` agents, as process declarations.
fn processes(agents: usize) -> Vec<Value> {
    let mut out = vec![
        json!({"name": "learner", "binds": ["replay-server", "parameter-server"],
        "config": {"command": ["sleep", "1000"]}}),
    ];
    out.extend((0..agents).map(|i| {
        json!({"name": format!("agent-{i}"), "connects": ["replay-server", "parameter-server"],
               "config": {"command": ["sleep", "1000"]}})
    }));
    out
}

/// Waits until exactly `n` deployments exist and all are RUNNING; returns their pids.
async fn all_running(bed: &mut Bed, n: usize) -> anyhow::Result<Vec<u32>> {
    let view = tokio::time::timeout(
        DEADLINE,
        bed.rx.wait_for(|v| {
            v.deployments.len() == n
                && v.deployments
                    .iter()
                    .all(|d| d.current_state == Some(CurrentState::Running))
        }),
    )
    .await??
    .clone();
    Ok(view
        .deployments
        .iter()
        .filter_map(|d| d.status.as_ref().and_then(|s| s.pid))
        .collect())
}

async fn gone(pids: &[u32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while pids.iter().any(|&p| common::pid_alive(p)) {
        anyhow::ensure!(Instant::now() < deadline, "processes outlived their delete");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One launch as an experiment: (to all RUNNING, to all gone after the delete), ms.
async fn as_experiment(bed: &mut Bed, agents: usize) -> anyhow::Result<(f64, f64)> {
    let decl = json!({"name": "rl", "processes": processes(agents)});
    let t = Instant::now();
    let resp = bed
        .http
        .post(format!("{}/experiments", bed.api))
        .json(&decl)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 201,
        "launch: {}",
        resp.text().await?
    );
    let pids = all_running(bed, agents + 1).await?;
    let up = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let resp = bed
        .http
        .delete(format!("{}/experiments/rl", bed.api))
        .send()
        .await?;
    anyhow::ensure!(resp.status().as_u16() == 204, "delete: {}", resp.status());
    gone(&pids).await?;
    Ok((up, t.elapsed().as_secs_f64() * 1e3))
}

/// The same processes as separate deployments, created and deleted one request at a time.
async fn one_by_one(bed: &mut Bed, agents: usize) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let mut ids = Vec::new();
    for p in processes(agents) {
        let mut spec = p.clone();
        let name = spec
            .as_object_mut()
            .and_then(|m| m.remove("name"))
            .unwrap_or_default();
        let body = json!({"name": name, "specification": {"spec": spec}});
        let resp = bed
            .http
            .post(format!("{}/deployments", bed.api))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().as_u16() == 201,
            "POST: {}",
            resp.text().await?
        );
        let created: Value = resp.json().await?;
        ids.push(created["id"].as_str().unwrap_or_default().to_owned());
    }
    let pids = all_running(bed, agents + 1).await?;
    let up = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    // Connectors first: the binder's service must outlive nobody's declaration.
    for id in ids.iter().rev() {
        let resp = bed
            .http
            .delete(format!("{}/deployments/{id}", bed.api))
            .send()
            .await?;
        anyhow::ensure!(resp.status().as_u16() == 204, "DELETE: {}", resp.status());
    }
    gone(&pids).await?;
    Ok((up, t.elapsed().as_secs_f64() * 1e3))
}

async fn run(sizes: &[usize], reps: usize) -> anyhow::Result<Value> {
    let mut bed = bed().await?;
    let mut results = serde_json::Map::new();
    let mut rows = Vec::new();
    let outcome = async {
        for &agents in sizes {
            let (mut exp_up, mut exp_down, mut one_up, mut one_down) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            // Alternated, so drift on a noisy machine hits both alike.
            for _ in 0..reps {
                let (u, d) = as_experiment(&mut bed, agents).await?;
                exp_up.push(u);
                exp_down.push(d);
                let (u, d) = one_by_one(&mut bed, agents).await?;
                one_up.push(u);
                one_down.push(d);
            }
            let med = |v: &Vec<f64>| {
                let mut s = v.clone();
                s.sort_by(f64::total_cmp);
                common::percentile(&s, 50.0)
            };
            let (eu, ed, ou, od) = (med(&exp_up), med(&exp_down), med(&one_up), med(&one_down));
            rows.push(vec![
                format!("{}", agents + 1),
                common::ms(eu),
                common::ms(ou),
                format!("{:.2}x", ou / eu),
                common::ms(ed),
                common::ms(od),
                format!("{:.2}x", od / ed),
            ]);
            results.insert(
                format!("processes_{}", agents + 1),
                json!({
                    "experiment_launch_to_running_ms": common::sample_json(exp_up, true),
                    "one_by_one_to_running_ms": common::sample_json(one_up, true),
                    "experiment_delete_to_gone_ms": common::sample_json(exp_down, true),
                    "one_by_one_delete_to_gone_ms": common::sample_json(one_down, true),
                    "launch_ratio_one_by_one_over_experiment": ou / eu,
                    "delete_ratio_one_by_one_over_experiment": od / ed,
                }),
            );
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    bed.cancel.cancel();
    for n in bed.nodes.drain(..) {
        let _ = tokio::time::timeout(DEADLINE, n).await;
    }
    bed.conductor.shutdown().await;
    outcome?;
    println!("\nmedians, ms (ratio: one by one / experiment; > 1 means the experiment is faster)");
    println!(
        "{}",
        common::table(
            &[
                "processes",
                "experiment -> RUNNING",
                "one by one -> RUNNING",
                "ratio",
                "experiment delete -> gone",
                "one by one delete -> gone",
                "ratio",
            ],
            &rows,
        )
    );
    println!("seed, 2 processes: {SEED_TWO_PROCESSES}");
    Ok(Value::Object(results))
}
