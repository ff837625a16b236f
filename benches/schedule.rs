//! Scheduling benchmark: (a) the pure scheduler's placement rate against a naive
//! re-implementation of the original's algorithm, (b) end-to-end `POST /deployments` to RUNNING
//! latency with a real conductor, a real node agent (both in-process, loopback QUIC) and real
//! processes.
//!
//! (a) 10 000 deployments onto 1 000 nodes (four groups, several capacity classes and sizes,
//! 2 % suspect nodes), one fresh pass per repetition, Spread and Binpack. The baseline is the
//! original's pass (`original-symphony.md` section 9): for each deployment, keep the connected
//! nodes whose `total - used` (with `used` from the last heartbeat, so fixed for the whole pass)
//! covers every request, then pick one uniformly at random; groups are ignored and nothing is
//! reserved. The bench counts the baseline's over-committed placements (a placement that pushes
//! its node past a total) and group violations, and checks that ours has none of either.
//!
//! (b) `symphony::conductor::Conductor` and `symphony::node::agent::run` on 127.0.0.1 with
//! default transport settings and a 1 s heartbeat (what `symphony dev` uses). Deployments
//! (`sleep 1000`) are created one after another; each sample is the time from sending the POST
//! to the published snapshot (the conductor's watch channel) showing RUNNING. Then every
//! deployment is deleted and the bench waits until its process is gone. The original's figure
//! is quoted from `original-symphony.md` section 8, not re-measured.
//!
//! Loopback only, bounded loops. `BENCH_QUICK=1` runs a short smoke version. Results go to
//! stdout (a table) and to `<CARGO_TARGET_DIR or ./target>/bench/schedule.json`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use symphony::scheduler::{self, DeploymentView, NodeState, NodeView, Strategy};
use tokio_util::sync::CancellationToken;

/// Upper bound for any awaited state in part (b).
const DEADLINE: Duration = Duration::from_secs(30);

/// The original's POST -> RUNNING, quoted (original-symphony.md section 8).
const ORIGINAL_POST_TO_RUNNING: &str = "median ~4.6 s, range 0.8-7.8 s (quoted, not re-measured)";

const GROUPS: [&str; 4] = ["gpu-a", "gpu-b", "cpu", "edge"];

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let params = Params {
        nodes: 1_000,
        deployments: 10_000,
        reps: if quick { 2 } else { 7 },
        e2e_deployments: if quick { 30 } else { 200 },
    };
    println!(
        "schedule bench ({}): {} deployments onto {} nodes x {} reps; end to end {} deployments",
        if quick { "quick" } else { "full" },
        params.deployments,
        params.nodes,
        params.reps,
        params.e2e_deployments
    );

    let pure = bench_pure(&params);

    let rt = common::runtime()?;
    let e2e = rt.block_on(bench_e2e(params.e2e_deployments, true, true))?;
    let events_ab = rt.block_on(events_ab(
        if quick { 1 } else { 3 },
        params.e2e_deployments / 2,
    ))?;

    let mut report = common::report(
        "schedule",
        json!({
            "nodes": params.nodes,
            "deployments": params.deployments,
            "repetitions": params.reps,
            "groups": GROUPS,
            "suspect_nodes_every": 50,
            "e2e_deployments": params.e2e_deployments,
            "e2e_command": ["sleep", "1000"],
            "e2e_heartbeat_ms": 1000,
        }),
        json!({ "scheduler": pure, "end_to_end": e2e, "events_ab": events_ab }),
    );
    report["baseline_quoted"] = json!({ "original_post_to_running": ORIGINAL_POST_TO_RUNNING });
    let path = common::write_doc("schedule", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

struct Params {
    nodes: usize,
    deployments: usize,
    reps: usize,
    e2e_deployments: usize,
}

// ---------------------------------------------------------------------------------------------
// (a) the pure scheduler

/// 1 000 nodes: four groups round-robin (every 10th node also in `batch`), cpu 8..64, mem = 4 x
/// cpu, gpu 1..8 on gpu groups only; every 50th node is Suspect.
fn make_nodes(n: usize) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let group = GROUPS[i % 4];
            let mut groups = vec![group.to_owned()];
            if i % 10 == 0 {
                groups.push("batch".to_owned());
            }
            let cpu = [8, 16, 32, 64][(i / 4) % 4];
            let mut caps = BTreeMap::from([("cpu".to_owned(), cpu), ("mem".to_owned(), cpu * 4)]);
            if group.starts_with("gpu") {
                caps.insert("gpu".to_owned(), [1, 2, 4, 8][(i / 16) % 4]);
            }
            NodeView {
                id: format!("node-{i:04}"),
                groups,
                capacities_total: caps,
                conda_envs: BTreeSet::new(),
                state: if i % 50 == 49 {
                    NodeState::Suspect
                } else {
                    NodeState::Online
                },
            }
        })
        .collect()
}

/// 10 000 deployments, 95 % desired RUNNING: 18 % GPU jobs (gpu 1-2, cpu 2-8, group gpu-a,
/// gpu-b or any), the rest CPU jobs (cpu 1-3, mem 1-16, group cpu, edge, batch or any).
fn make_deployments(n: usize, rng: &mut StdRng) -> Vec<DeploymentView> {
    (0..n)
        .map(|i| {
            let gpu_job = rng.random_range(0..100) < 18;
            let (group, requests) = if gpu_job {
                let group = ["gpu-a", "gpu-b", ""][rng.random_range(0..3)];
                let gpu = if rng.random_range(0..10) == 0 { 2 } else { 1 };
                let req = BTreeMap::from([
                    ("gpu".to_owned(), gpu),
                    ("cpu".to_owned(), rng.random_range(2..=8)),
                ]);
                (group, req)
            } else {
                let group = ["cpu", "edge", "batch", ""][rng.random_range(0..4)];
                let req = BTreeMap::from([
                    ("cpu".to_owned(), rng.random_range(1..=3)),
                    ("mem".to_owned(), rng.random_range(1..=16)),
                ]);
                (group, req)
            };
            DeploymentView {
                id: format!("dep-{i:05}"),
                created_at_ms: 1_700_000_000_000 + i as u64,
                desired_running: rng.random_range(0..100) < 95,
                node_group: (!group.is_empty()).then(|| group.to_owned()),
                capacity_requests: requests,
                env_name: None,
                assignment: None,
                colocate: None,
                gang: None,
            }
        })
        .collect()
}

/// The original's pass, re-implemented naively: no reservation (every check sees the same
/// heartbeat `used`, here all zero: a fresh pass), groups ignored, uniform random choice.
/// STOPPED deployments are placed too, as the original did (section 9, B19).
fn naive_plan(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    used: &BTreeMap<String, BTreeMap<String, i64>>,
    rng: &mut StdRng,
) -> Vec<(usize, usize)> {
    let connected: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].state == NodeState::Online)
        .collect();
    let mut out = Vec::with_capacity(deployments.len());
    let mut eligible = Vec::with_capacity(connected.len());
    for (d, dep) in deployments.iter().enumerate() {
        eligible.clear();
        for &i in &connected {
            let node = &nodes[i];
            let node_used = used.get(&node.id);
            let fits = dep.capacity_requests.iter().all(|(class, &req)| {
                let total = node.capacities_total.get(class).copied().unwrap_or(0);
                let u = node_used.and_then(|m| m.get(class)).copied().unwrap_or(0);
                total - u >= req
            });
            if fits {
                eligible.push(i);
            }
        }
        if !eligible.is_empty() {
            out.push((d, eligible[rng.random_range(0..eligible.len())]));
        }
    }
    out
}

/// Replays placements (in order) per node; counts those that push a class past its total and
/// those on a node outside the requested group.
fn audit(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    placements: &[(usize, usize)],
) -> (usize, usize) {
    let mut held: Vec<BTreeMap<&str, i64>> = vec![BTreeMap::new(); nodes.len()];
    let (mut over, mut wrong_group) = (0, 0);
    for &(d, n) in placements {
        let (dep, node) = (&deployments[d], &nodes[n]);
        let mut exceeded = false;
        for (class, &req) in &dep.capacity_requests {
            let h = held[n].entry(class.as_str()).or_insert(0);
            *h += req.max(0);
            if *h > node.capacities_total.get(class).copied().unwrap_or(0) {
                exceeded = true;
            }
        }
        over += usize::from(exceeded);
        if let Some(g) = dep.node_group.as_deref().filter(|g| !g.is_empty())
            && !node.groups.iter().any(|x| x == g)
        {
            wrong_group += 1;
        }
    }
    (over, wrong_group)
}

/// `reps` fresh passes: their times (s) and the last plan.
fn timed_plans(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    strategy: Strategy,
    reps: usize,
) -> (Vec<f64>, Option<scheduler::Plan>) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let plan = scheduler::plan(nodes, deployments, scheduler::Generation(1), strategy);
        times.push(t.elapsed().as_secs_f64());
        last = Some(plan);
    }
    (times, last)
}

/// A plan's placements as (deployment index, node index).
fn pairs(
    plan: &scheduler::Plan,
    dep_index: &BTreeMap<&str, usize>,
    index: &BTreeMap<&str, usize>,
) -> Vec<(usize, usize)> {
    plan.placements
        .iter()
        .filter_map(|pl| {
            Some((
                *dep_index.get(pl.deployment_id.as_str())?,
                *index.get(pl.node_id.as_str())?,
            ))
        })
        .collect()
}

/// Gangs with some but not all desired-RUNNING members placed, and colocate groups placed on
/// more than one node.
fn audit_units(deployments: &[DeploymentView], placements: &[(usize, usize)]) -> (usize, usize) {
    let placed: BTreeMap<usize, usize> = placements.iter().copied().collect();
    let mut gangs: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut groups: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for (i, d) in deployments
        .iter()
        .enumerate()
        .filter(|(_, d)| d.desired_running)
    {
        if let Some(g) = &d.gang {
            let e = gangs.entry(g).or_default();
            e.0 += 1;
            e.1 += usize::from(placed.contains_key(&i));
        }
        if let (Some(c), Some(node)) = (&d.colocate, placed.get(&i)) {
            groups.entry(c).or_default().insert(*node);
        }
    }
    (
        gangs.values().filter(|(n, p)| *p > 0 && p < n).count(),
        groups.values().filter(|nodes| nodes.len() > 1).count(),
    )
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn bench_pure(p: &Params) -> Value {
    let nodes = make_nodes(p.nodes);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let deployments = make_deployments(p.deployments, &mut rng);
    let index: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let dep_index: BTreeMap<&str, usize> = deployments
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();

    // Supply (online nodes) and demand (desired-RUNNING requests) per class, for the reader.
    let mut supply: BTreeMap<&str, i64> = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.state == NodeState::Online) {
        for (class, &v) in &n.capacities_total {
            *supply.entry(class.as_str()).or_default() += v;
        }
    }
    let mut demand: BTreeMap<&str, i64> = BTreeMap::new();
    for d in deployments.iter().filter(|d| d.desired_running) {
        for (class, &v) in &d.capacity_requests {
            *demand.entry(class.as_str()).or_default() += v;
        }
    }
    println!("\nonline supply {supply:?}; desired-RUNNING demand {demand:?}");

    let mut rows = Vec::new();
    let mut results = serde_json::Map::new();
    results.insert("supply_online".to_owned(), json!(supply));
    results.insert("demand_desired_running".to_owned(), json!(demand));
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let (times, last) = timed_plans(&nodes, &deployments, strategy, p.reps);
        let Some(plan) = last else { continue };
        let placements = pairs(&plan, &dep_index, &index);
        let (over, wrong) = audit(&nodes, &deployments, &placements);
        let med = median(times.clone());
        let placed = plan.placements.len();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (_, why) in &plan.unplaced {
            *reasons.entry(why.to_string()).or_default() += 1;
        }
        rows.push((
            format!("symphony {strategy}"),
            med,
            placed,
            over,
            wrong,
            plan.unplaced.len(),
        ));
        results.insert(
            strategy.to_string(),
            json!({
                "median_s": med,
                "times_s": times,
                "placed": placed,
                "placements_per_s": placed as f64 / med,
                "deployments_per_s": p.deployments as f64 / med,
                "unplaced": plan.unplaced.len(),
                "unplaced_reasons": reasons,
                "over_committed": over,
                "wrong_group": wrong,
            }),
        );
    }

    // The same deployments as experiments: gangs of 100 (placed whole or not at all), each
    // with a process group of 4 that must share a node.
    let units: Vec<DeploymentView> = deployments
        .iter()
        .enumerate()
        .map(|(i, d)| DeploymentView {
            gang: Some(format!("exp-{}", i / 100)),
            colocate: (i % 100 < 4).then(|| format!("exp-{}/g", i / 100)),
            ..d.clone()
        })
        .collect();
    let (times, last) = timed_plans(&nodes, &units, Strategy::Spread, p.reps);
    if let Some(plan) = last {
        let placements = pairs(&plan, &dep_index, &index);
        let (over, wrong) = audit(&nodes, &units, &placements);
        let (split_gangs, split_groups) = audit_units(&units, &placements);
        let med = median(times.clone());
        rows.push((
            "symphony gangs".to_owned(),
            med,
            plan.placements.len(),
            over,
            wrong,
            plan.unplaced.len(),
        ));
        println!(
            "\nas 100 gangs of 100 (a group of 4 in each): {split_gangs} gangs placed in part, \
             {split_groups} groups split across nodes"
        );
        results.insert(
            "spread_gangs".to_owned(),
            json!({
                "median_s": med,
                "times_s": times,
                "placed": plan.placements.len(),
                "unplaced": plan.unplaced.len(),
                "over_committed": over,
                "wrong_group": wrong,
                "gangs_placed_in_part": split_gangs,
                "groups_split": split_groups,
                "time_vs_spread": med / results
                    .get("spread")
                    .and_then(|r| r["median_s"].as_f64())
                    .unwrap_or(f64::NAN),
            }),
        );
    }

    let used = BTreeMap::new();
    let mut times = Vec::new();
    let mut last = Vec::new();
    for r in 0..p.reps {
        let mut rng = StdRng::seed_from_u64(r as u64);
        let t = Instant::now();
        let placements = naive_plan(&nodes, &deployments, &used, &mut rng);
        times.push(t.elapsed().as_secs_f64());
        last = placements;
    }
    let (over, wrong) = audit(&nodes, &deployments, &last);
    let med = median(times.clone());
    let stopped_placed = last
        .iter()
        .filter(|&&(d, _)| !deployments[d].desired_running)
        .count();
    rows.push((
        "naive (original)".to_owned(),
        med,
        last.len(),
        over,
        wrong,
        p.deployments - last.len(),
    ));
    results.insert(
        "naive_original".to_owned(),
        json!({
            "median_s": med,
            "times_s": times,
            "placed": last.len(),
            "placements_per_s": last.len() as f64 / med,
            "deployments_per_s": p.deployments as f64 / med,
            "over_committed": over,
            "wrong_group": wrong,
            "stopped_but_placed": stopped_placed,
        }),
    );

    println!("\n(a) scheduler alone: one pass, median of {} reps", p.reps);
    println!(
        "{:<18} {:>10} {:>8} {:>14} {:>11} {:>11} {:>9} {:>11}",
        "algorithm",
        "median ms",
        "placed",
        "placements/s",
        "vs naive",
        "overcommit",
        "wrong grp",
        "unplaced"
    );
    for (name, med_s, placed, over, wrong, unplaced) in &rows {
        println!(
            "{:<18} {:>10.1} {:>8} {:>14.0} {:>10.2}x {:>11} {:>9} {:>11}",
            name,
            med_s * 1e3,
            placed,
            *placed as f64 / med_s,
            med / med_s,
            over,
            wrong,
            unplaced
        );
    }
    println!("(vs naive = naive median time / this median time; > 1 means faster than naive)");
    for s in ["spread", "binpack"] {
        if let Some(r) = results.get_mut(s) {
            let ratio = med / r["median_s"].as_f64().unwrap_or(f64::NAN);
            r["speed_vs_naive"] = json!(ratio);
        }
    }
    Value::Object(results)
}

// ---------------------------------------------------------------------------------------------
// (b) end to end

/// POST -> RUNNING with the events log off (`conductor.events_keep: 0`) and on, alternated
/// `rounds` times with `count` deployments each; pooled medians and their ratio.
async fn events_ab(rounds: usize, count: usize) -> anyhow::Result<Value> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (events, into) in [(false, &mut off), (true, &mut on)] {
            let r = bench_e2e(count, events, false).await?;
            let samples = r["post_to_running"]["samples_ms"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
                .unwrap_or_default();
            into.extend(samples);
        }
    }
    let (off, on) = (
        common::sample_json(off, false),
        common::sample_json(on, false),
    );
    let ratio =
        on["p50_ms"].as_f64().unwrap_or(f64::NAN) / off["p50_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nevents log A/B, POST -> RUNNING, {rounds} x {count} each, alternated: off p50 {:.2} ms p90 {:.2} ms; on p50 {:.2} ms p90 {:.2} ms; on/off {ratio:.3}",
        off["p50_ms"].as_f64().unwrap_or(f64::NAN),
        off["p90_ms"].as_f64().unwrap_or(f64::NAN),
        on["p50_ms"].as_f64().unwrap_or(f64::NAN),
        on["p90_ms"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(
        json!({"rounds": rounds, "per_round": count, "events_off": off, "events_on": on, "p50_ratio_on_off": ratio}),
    )
}

/// One end-to-end run; `events`: the events log on (the default) or off; `print`: the table.
async fn bench_e2e(count: usize, events: bool, print: bool) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    if !events {
        cfg.events.keep = 0;
    }
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    let conductor = Conductor::start(cfg).await?;
    let mut node_cfg = NodeConfig::local(
        &conductor.ca,
        conductor.quic_addr,
        "bench-node",
        &dir.path().join("node"),
    )?;
    node_cfg.groups = vec!["local".into()];
    node_cfg.capacities_total = BTreeMap::from([("cpu".to_owned(), 2)]);
    node_cfg.keeper =
        symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
    let cancel = CancellationToken::new();
    let node = tokio::spawn(symphony::node::agent::run(node_cfg, cancel.clone()));
    let mut rx = conductor.core.subscribe();
    tokio::time::timeout(
        DEADLINE,
        rx.wait_for(|v| {
            v.nodes
                .get("bench-node")
                .is_some_and(|n| n.state == "online")
        }),
    )
    .await??;

    let api = format!("http://{}", conductor.http_addr);
    let http = reqwest::Client::new();
    let mut post_ms = Vec::new();
    let mut running_ms = Vec::new();
    let mut ids = Vec::new();
    let mut pids = Vec::new();
    let result = async {
        for i in 0..count {
            let body = json!({
                "name": format!("e2e-{i}"),
                "specification": {"spec": {"config": {"command": ["sleep", "1000"]}}},
            });
            let t = Instant::now();
            let resp = http
                .post(format!("{api}/deployments"))
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(resp.status().as_u16() == 201, "POST: {}", resp.status());
            let created: Value = resp.json().await?;
            post_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let id = created["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no id in {created}"))?
                .to_owned();
            ids.push(id.clone());
            let view = tokio::time::timeout(
                DEADLINE,
                rx.wait_for(|v| {
                    v.deployment(&id).is_some_and(|d| {
                        d.current_state == Some(symphony::model::CurrentState::Running)
                    })
                }),
            )
            .await??
            .clone();
            running_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if let Some(pid) = view
                .deployment(&id)
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.pid)
            {
                pids.push(u64::from(pid));
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;

    // Clean up whatever was created, even after an error.
    let mut delete_ms = Vec::new();
    for id in &ids {
        let t = Instant::now();
        if let Ok(r) = http.delete(format!("{api}/deployments/{id}")).send().await
            && r.status().as_u16() == 204
        {
            delete_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let t = Instant::now();
    let deadline = t + DEADLINE;
    while pids.iter().any(|&p| common::pid_alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_gone_ms = t.elapsed().as_secs_f64() * 1e3;
    let leftover = pids.iter().filter(|&&p| common::pid_alive(p)).count();
    cancel.cancel();
    let _ = tokio::time::timeout(DEADLINE, node).await;
    conductor.shutdown().await;
    result?;

    let post = common::sample_json(post_ms, false);
    let running = common::sample_json(running_ms, !print);
    let delete = common::sample_json(delete_ms, false);
    if !print {
        return Ok(json!({"post_to_running": running}));
    }
    println!("\n(b) end to end, conductor + 1 node in-process, {count} x `sleep 1000`, sequential");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, s) in [
        ("POST -> 201", &post),
        ("POST -> RUNNING (watch)", &running),
        ("DELETE -> 204", &delete),
    ] {
        println!(
            "{:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            name,
            s["p50_ms"].as_f64().unwrap_or(f64::NAN),
            s["p90_ms"].as_f64().unwrap_or(f64::NAN),
            s["p99_ms"].as_f64().unwrap_or(f64::NAN),
            s["max_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "after the last DELETE, all {} processes gone in {:.0} ms ({} left)",
        pids.len(),
        all_gone_ms,
        leftover
    );
    let p50 = running["p50_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "original POST -> RUNNING: {ORIGINAL_POST_TO_RUNNING}; ratio of medians ~{:.0}x",
        4600.0 / p50
    );
    Ok(json!({
        "post_to_201": post,
        "post_to_running": running,
        "delete_to_204": delete,
        "processes": pids.len(),
        "all_processes_gone_after_last_delete_ms": all_gone_ms,
        "processes_left": leftover,
        "original_median_ms_quoted": 4600.0,
        "median_ratio_vs_original": 4600.0 / p50,
    }))
}
