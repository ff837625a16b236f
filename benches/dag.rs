//! Workflows against the seed's own library and the machine: N diamond runs (A -> B, C -> D)
//! whose tasks are `true`, on one node, beside two baselines in the same run:
//!
//! - raw: a plain loop spawning `true` and waiting for it (the machine's spawn rate);
//! - seed: `symphonizer` 0.1.2 (PyPI, installed into a venv under target/bench) running the
//!   same diamond N times under its `Perform` (water marks 100/50), each node spawning `true`
//!   as a subprocess;
//! - ours: a conductor and a node agent in this process, the workflow defined once and N runs
//!   started over the HTTP API (up to 32 requests in flight, as a client launching a sweep
//!   would) with `max_running: 100, resume_below: 50`; each task is a placement and a process
//!   (the agent's child: tasks run without a keeper by default), its end reported and
//!   recorded durably.
//!
//! Reported: tasks/s and DAGs/s, our ratio to each baseline, and orchestration CPU per task
//! (ours: this process, i.e. conductor + node agent, less the HTTP client's thread, which
//! posts the runs and is reported apart; the seed: its interpreter; the tasks themselves
//! excluded from both).
//! A second case: the same diamonds with tasks that sleep 50 ms, for orchestration CPU per
//! run while tasks wait (the seed busy-waits). `BENCH_QUICK=1`: N = 100.
//! Results go to target/bench/dag.json. `DAG_OURS_ONLY=1` runs only our side of the first case
//! (`DAG_OURS_ONLY=sleep`: of the second), for a profiler, with no baselines and no report.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use tokio_util::sync::CancellationToken;

const SEED: &str = r#"
import asyncio, resource, sys, time
from symphonizer.composition import Composition, DAGNote
from symphonizer.node_runner import NodeRunner
from symphonizer.perform import Perform

N = int(sys.argv[1]); CMD = sys.argv[2:]

class Spawn:
    async def __call__(self, **kwargs):
        p = await asyncio.create_subprocess_exec(*CMD)
        await p.wait()
        return p.returncode

class Diamond(Composition):
    def configure_node_runner(self, node):
        return NodeRunner(node_executor=Spawn())

async def main():
    done = asyncio.Event(); count = [0]
    def finished(*args):
        count[0] += 1
        if count[0] == N: done.set()
    perform = Perform()
    a, b, c, d = (DAGNote(x) for x in "abcd")
    t = time.perf_counter()
    for _ in range(N):
        await perform.add(Diamond({b: {a}, c: {a}, d: {b, c}}, schedule_done_cb=finished))
    await done.wait()
    wall = time.perf_counter() - t
    s = resource.getrusage(resource.RUSAGE_SELF); ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(wall, s.ru_utime + s.ru_stime, ch.ru_utime + ch.ru_stime)

asyncio.run(main())
"#;

fn main() -> anyhow::Result<()> {
    let n = if common::quick() { 100 } else { 1000 };
    if let Ok(only) = std::env::var("DAG_OURS_ONLY") {
        // For profiling: only our side of one case, no baselines, no report.
        let cmd: &[&str] = if only == "sleep" {
            &["sleep", "0.05"]
        } else {
            &["true"]
        };
        let ours = common::runtime()?.block_on(ours(n, cmd))?;
        println!("ours ({}): {ours}", cmd.join(" "));
        return Ok(());
    }
    println!("dag bench: {n} diamond runs (4 tasks each) of `true`, then of `sleep 0.05`");
    let python = seed_python()?;
    let raw = raw_spawn(n * 4)?;
    println!(
        "raw spawn loop: {:.0} spawns/s",
        raw["spawns_per_s"].as_f64().unwrap_or(0.0)
    );
    let rt = common::runtime()?;
    let mut cases = serde_json::Map::new();
    for (label, cmd) in [
        ("true", vec!["true"]),
        ("sleep_50ms", vec!["sleep", "0.05"]),
    ] {
        let seed = seed_run(&python, n, &cmd)?;
        println!("seed ({label}): {seed}");
        let ours = rt.block_on(ours(n, &cmd))?;
        println!("ours ({label}): {ours}");
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let ratios = json!({
            "dags_per_s_ours_over_seed": f(&ours, "dags_per_s") / f(&seed, "dags_per_s"),
            "tasks_per_s_ours_over_raw_spawn": f(&ours, "tasks_per_s") / f(&raw, "spawns_per_s"),
            "orchestration_cpu_ms_per_task_seed_over_ours":
                f(&seed, "orchestration_cpu_ms_per_task") / f(&ours, "orchestration_cpu_ms_per_task"),
        });
        println!("ratios ({label}): {ratios}");
        cases.insert(
            label.into(),
            json!({"seed": seed, "ours": ours, "ratios": ratios}),
        );
    }
    let report = common::report(
        "dag",
        json!({"runs": n, "tasks_per_run": 4, "water_marks": [100, 50]}),
        json!({"raw": raw, "cases": cases}),
    );
    let path = common::write_doc("dag", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// A venv with symphonizer 0.1.2 (made once under target/bench).
fn seed_python() -> anyhow::Result<std::path::PathBuf> {
    let venv = common::out_dir().join("symphonizer-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        common::sh(&["python3", "-m", "venv", &venv.display().to_string()])?;
        common::sh(&[
            &venv.join("bin/pip").display().to_string(),
            "install",
            "-q",
            "symphonizer==0.1.2",
        ])?;
    }
    Ok(python)
}

/// A plain loop: spawn `true`, wait, `count` times.
fn raw_spawn(count: usize) -> anyhow::Result<Value> {
    let t = Instant::now();
    for _ in 0..count {
        std::process::Command::new("true").status()?;
    }
    let s = t.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    Ok(json!({"spawns": count, "seconds": s, "spawns_per_s": count as f64 / s}))
}

fn seed_run(python: &std::path::Path, n: usize, cmd: &[&str]) -> anyhow::Result<Value> {
    let script = common::out_dir().join("dag_seed.py");
    std::fs::write(&script, SEED)?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(n.to_string())
        .args(cmd)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 3, "seed printed {text:?}");
    #[allow(clippy::cast_precision_loss)]
    let tasks = (n * 4) as f64;
    Ok(json!({
        "seconds": v[0],
        "dags_per_s": n as f64 / v[0],
        "tasks_per_s": tasks / v[0],
        "orchestration_cpu_ms_per_task": v[1] * 1000.0 / tasks,
        "children_cpu_ms_per_task": v[2] * 1000.0 / tasks,
        "cpu_cores_busy": v[1] / v[0],
    }))
}

/// CPU seconds of this process so far.
fn self_cpu() -> f64 {
    let ticks = common::proc_cpu_ticks("self");
    #[allow(clippy::cast_precision_loss)]
    let t = ticks as f64;
    t / common::clock_ticks()
}

/// Run requests in flight at once.
const SUBMITTERS: usize = 32;

async fn ours(n: usize, cmd: &[&str]) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    let conductor = Conductor::start(cfg).await?;
    let mut node = NodeConfig::local(
        &conductor.ca,
        conductor.quic_addr,
        "bench-node",
        &dir.path().join("node"),
    )?;
    node.keeper =
        symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony-keeper").into());
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(symphony::node::agent::run(node, cancel.clone()));
    let mut rx = conductor.core.subscribe();
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|v| {
            v.nodes
                .get("bench-node")
                .is_some_and(|n| n.state == "online")
        }),
    )
    .await??;
    let api = format!("http://{}", conductor.http_addr);
    let task = |name: &str, deps: &[&str]| json!({"name": name, "depends_on": deps, "config": {"command": cmd}});
    // Every run is kept (`keep_runs`), so that the end is every run finished.
    let def = json!({"name": "diamond", "max_running": 100, "resume_below": 50, "keep_runs": n, "tasks": [
        task("a", &[]), task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])]});
    reqwest::Client::new()
        .post(format!("{api}/workflows"))
        .json(&def)
        .send()
        .await?
        .error_for_status()?;
    let cpu0 = self_cpu();
    let t = Instant::now();
    // Started as a client launching a sweep would (up to SUBMITTERS requests in flight), on
    // a thread and runtime of its own: its CPU is the client's, not the conductor's.
    let url = format!("{api}/workflows/diamond/runs");
    let client = std::thread::spawn(move || -> anyhow::Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let http = reqwest::Client::new();
            let mut posts = futures_util::stream::iter(0..n)
                .map(|_| {
                    let post = http.post(&url).json(&json!({}));
                    async move { post.send().await?.error_for_status().map(drop) }
                })
                .buffer_unordered(SUBMITTERS);
            while let Some(posted) = posts.next().await {
                posted?;
            }
            anyhow::Ok(())
        })?;
        drop(rt);
        #[allow(clippy::cast_precision_loss)]
        let ticks = common::proc_cpu_ticks("thread-self") as f64;
        Ok(ticks / common::clock_ticks())
    });
    let client_cpu = tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let done = tokio::time::timeout(
        Duration::from_secs(600),
        rx.wait_for(|v| v.runs.len() == n && v.runs.iter().all(|r| r.state.is_done())),
    )
    .await??
    .clone();
    let wall = t.elapsed().as_secs_f64();
    let cpu = self_cpu() - cpu0 - client_cpu;
    let succeeded = done
        .runs
        .iter()
        .filter(|r| r.state == symphony::conductor::runs::RunState::Succeeded)
        .count();
    cancel.cancel();
    let _ = agent.await;
    conductor.shutdown().await;
    anyhow::ensure!(succeeded == n, "{succeeded} of {n} runs succeeded");
    #[allow(clippy::cast_precision_loss)]
    let tasks = (n * 4) as f64;
    #[allow(clippy::cast_precision_loss)]
    Ok(json!({
        "seconds": wall,
        "dags_per_s": n as f64 / wall,
        "tasks_per_s": tasks / wall,
        "orchestration_cpu_ms_per_task": cpu * 1000.0 / tasks,
        "client_cpu_ms_per_task": client_cpu * 1000.0 / tasks,
        "cpu_cores_busy": cpu / wall,
    }))
}
