//! Footprint benchmark: resident memory and CPU of the real `symphony` binary, idle and with
//! many deployments running.
//!
//! Two layouts, each measured idle and then with N deployments (`sleep 100000`) RUNNING:
//! - `symphony dev`: conductor and local node in one process;
//! - a separate `symphony --config conductor.yaml` and `symphony --config node.yaml` (keys as
//!   in the README; the node certificate comes from `symphony cert node`), so the figures split
//!   per process.
//!
//! Memory is `VmRSS` (and the peak `VmHWM`) from `/proc/<pid>/status`; CPU is the process's own
//! `utime + stime` (not its children's: the workloads are not counted) from `/proc/<pid>/stat`
//! over a fixed window, as a percentage of one core. Everything listens on 127.0.0.1 (free
//! ports picked by binding port 0). The binary is `$SYMPHONY_BIN`, else
//! `<CARGO_TARGET_DIR or ./target>/release/symphony`; when it is missing the bench says how to
//! build it and records that it was skipped. Children are stopped with SIGTERM (which stops
//! their workloads), then SIGKILL if they linger; any recorded workload still alive afterwards
//! is killed by process group.
//!
//! The original's idle node figure (0.1-0.2 % CPU on the reference VM) is quoted from
//! `original-symphony.md` section 17, not re-measured. `BENCH_QUICK=1` runs a short smoke
//! version. Results go to stdout and `<CARGO_TARGET_DIR or ./target>/bench/footprint.json`.
//!
//! Before/after: with `SYMPHONY_BIN_BEFORE` set to another build (e.g. of the previous commit),
//! the separate layout also runs with that binary in the same session, and a table gives each
//! process's RSS before, after and the ratio.

mod common;

use common::procs::{SplitCluster, free_tcp_port, free_udp_port, spawn, wait_json};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The original's idle node CPU, quoted (original-symphony.md section 17).
const ORIGINAL_IDLE_NODE_CPU: &str = "0.1-0.2 % of one core (quoted, not re-measured)";

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let p = Params {
        window: Duration::from_secs(if quick { 2 } else { 10 }),
        settle: Duration::from_secs(if quick { 1 } else { 2 }),
        deployments: if quick { 20 } else { 100 },
    };
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let bin = std::env::var_os("SYMPHONY_BIN")
        .map_or_else(|| target.join("release").join("symphony"), PathBuf::from);
    let mut report = common::report(
        "footprint",
        json!({
            "binary": bin.display().to_string(),
            "window_s": p.window.as_secs_f64(),
            "settle_s": p.settle.as_secs_f64(),
            "deployments": p.deployments,
            "workload": ["sleep", "100000"],
            "node_heartbeat_s": 1,
            "cpu": "own utime+stime over the window, % of one core",
        }),
        Value::Null,
    );
    report["baseline_quoted"] = json!({ "original_idle_node_cpu": ORIGINAL_IDLE_NODE_CPU });
    if !bin.is_file() {
        println!(
            "footprint bench: no binary at {}.\n  Build it first: cargo build --release --bin symphony\n  (or point SYMPHONY_BIN at one). Skipped.",
            bin.display()
        );
        report["skipped"] = json!(format!("binary not found at {}", bin.display()));
        let path = common::write_doc("footprint", &report)?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    println!(
        "footprint bench ({}): {} deployments, {:?} windows, binary {}",
        if quick { "quick" } else { "full" },
        p.deployments,
        p.window,
        bin.display()
    );
    let ticks = common::clock_ticks();
    let rt = common::runtime()?;
    let before_bin = std::env::var_os("SYMPHONY_BIN_BEFORE").map(PathBuf::from);
    let before = match &before_bin {
        Some(b) if b.is_file() => {
            report["params"]["binary_before"] = json!(b.display().to_string());
            Some(rt.block_on(split_layout(b, "before", &p, ticks))?)
        }
        Some(b) => anyhow::bail!("SYMPHONY_BIN_BEFORE: no binary at {}", b.display()),
        None => None,
    };
    let dev = rt.block_on(dev_layout(&bin, &p, ticks))?;
    let split = rt.block_on(split_layout(&bin, "split", &p, ticks))?;

    println!(
        "\n{:<7} {:<16} {:<12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "layout",
        "process",
        "state",
        "RSS MiB",
        "anon MiB",
        "USS MiB",
        "peak MiB",
        "CPU %",
        "threads"
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1024.0;
    for m in before.iter().flatten().chain(&dev).chain(&split) {
        println!(
            "{:<7} {:<16} {:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8}",
            m["layout"].as_str().unwrap_or(""),
            m["process"].as_str().unwrap_or(""),
            m["state"].as_str().unwrap_or(""),
            mib(&m["rss_kib"]),
            mib(&m["rss_anon_kib"]),
            mib(&m["private_kib"]),
            mib(&m["hwm_kib"]),
            m["cpu_percent"].as_f64().unwrap_or(f64::NAN),
            m["threads"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "(CPU % = own utime+stime over the window, % of one core; 1 tick = {:.2} % here)",
        100.0 / ticks / p.window.as_secs_f64()
    );
    println!("original, idle node: {ORIGINAL_IDLE_NODE_CPU}");
    if let Some(before) = &before {
        let rows = compare(before, &split);
        println!(
            "\nbefore/after (separate layout, RSS):\n{:<10} {:<12} {:>10} {:>10} {:>7}",
            "process", "state", "before MiB", "after MiB", "ratio"
        );
        for r in &rows {
            println!(
                "{:<10} {:<12} {:>10.1} {:>10.1} {:>7.2}",
                r["process"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["before_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                r["after_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                r["ratio"].as_f64().unwrap_or(f64::NAN),
            );
        }
        report["comparison"] = json!(rows);
    }
    report["results"] = json!(
        before
            .into_iter()
            .flatten()
            .chain(dev)
            .chain(split)
            .collect::<Vec<_>>()
    );
    let path = common::write_doc("footprint", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// One row per (process, state) measured by both binaries: RSS before, after, after/before.
fn compare(before: &[Value], after: &[Value]) -> Vec<Value> {
    after
        .iter()
        .filter_map(|a| {
            let b = before
                .iter()
                .find(|b| b["process"] == a["process"] && b["state"] == a["state"])?;
            let (bk, ak) = (b["rss_kib"].as_f64()?, a["rss_kib"].as_f64()?);
            Some(json!({
                "process": a["process"],
                "state": a["state"],
                "before_kib": bk,
                "after_kib": ak,
                "ratio": ak / bk,
            }))
        })
        .collect()
}

struct Params {
    window: Duration,
    settle: Duration,
    deployments: usize,
}

/// utime + stime of `pid`, in clock ticks (an error when the process is gone).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    common::try_proc_cpu_ticks(&pid.to_string())
        .ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}/stat"))
}

/// A `kB` field of `/proc/<pid>/smaps_rollup`.
fn smaps_rollup_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Memory only this process maps (USS: private clean + private dirty): RSS without the
/// pages of shared libraries that other processes map too.
fn private_kib(pid: u32) -> Option<u64> {
    Some(smaps_rollup_field(pid, "Private_Clean")? + smaps_rollup_field(pid, "Private_Dirty")?)
}

/// Measures every named process over the same window; one row per process.
async fn measure(
    layout: &str,
    state: &str,
    procs: &[(&str, u32)],
    window: Duration,
    ticks: f64,
) -> anyhow::Result<Vec<Value>> {
    let mut before = Vec::new();
    for &(_, pid) in procs {
        before.push(cpu_ticks(pid)?);
    }
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (&(name, pid), b) in procs.iter().zip(before) {
        let used = cpu_ticks(pid)?.saturating_sub(b) as f64 / ticks;
        let id = pid.to_string();
        out.push(json!({
                "layout": layout,
                "process": name,
                "state": state,
                "rss_kib": common::proc_status_field(&id, "VmRSS"),
                "hwm_kib": common::proc_status_field(&id, "VmHWM"),
                "rss_anon_kib": common::proc_status_field(&id, "RssAnon"),
                "rss_file_kib": common::proc_status_field(&id, "RssFile"),
                "pss_kib": smaps_rollup_field(pid, "Pss"),
                "private_kib": private_kib(pid),
                "threads": common::proc_status_field(&id, "Threads"),
                "cpu_seconds": used,
                "window_s": secs,
                "cpu_percent": used / secs * 100.0,
        }));
    }
    Ok(out)
}

/// The keepers (`symphony __keeper <dir>`, one per workload) of the node whose files are
/// under `dir`.
fn keepers(dir: &Path) -> Vec<u32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let needle = format!("\0__keeper\0{}", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// One row for all the keepers over the window: their count, their memory per keeper (mean
/// and largest RSS, mean PSS and private), and their CPU together.
async fn measure_keepers(
    layout: &str,
    state: &str,
    pids: &[u32],
    window: Duration,
    ticks: f64,
) -> anyhow::Result<Value> {
    let before: Vec<u64> = pids.iter().filter_map(|&p| cpu_ticks(p).ok()).collect();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    let after: Vec<u64> = pids.iter().filter_map(|&p| cpu_ticks(p).ok()).collect();
    let used = after
        .iter()
        .sum::<u64>()
        .saturating_sub(before.iter().sum()) as f64
        / ticks;
    let field = |key: &str| -> Vec<f64> {
        pids.iter()
            .filter_map(|p| common::proc_status_field(&p.to_string(), key))
            .map(|v| v as f64)
            .collect()
    };
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let rss = field("VmRSS");
    let pss: Vec<f64> = pids
        .iter()
        .filter_map(|&p| smaps_rollup_field(p, "Pss"))
        .map(|v| v as f64)
        .collect();
    let private: Vec<f64> = pids
        .iter()
        .filter_map(|&p| private_kib(p))
        .map(|v| v as f64)
        .collect();
    Ok(json!({
        "layout": layout,
        "process": format!("keeper (each of {})", pids.len()),
        "state": state,
        "keepers": pids.len(),
        "rss_kib": mean(&rss),
        "rss_max_kib": rss.iter().copied().fold(f64::NAN, f64::max),
        "rss_anon_kib": mean(&field("RssAnon")),
        "pss_kib": mean(&pss),
        "private_kib": mean(&private),
        "hwm_kib": field("VmHWM").iter().copied().fold(f64::NAN, f64::max),
        "threads": 1,
        "cpu_seconds": used,
        "window_s": secs,
        "cpu_percent": used / secs * 100.0,
    }))
}

/// Creates `n` `sleep 100000` deployments and waits until all are RUNNING; returns their pids.
async fn load(http: &reqwest::Client, api: &str, n: usize) -> anyhow::Result<Vec<u32>> {
    for i in 0..n {
        let body = json!({"name": format!("idle-{i}"), "specification": {"spec": {"config": {"command": ["sleep", "100000"]}}}});
        let r = http
            .post(format!("{api}/deployments"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status().as_u16() == 201, "POST: {}", r.status());
    }
    let v = wait_json(
        http,
        &format!("{api}/deployments?limit=500"),
        "all deployments RUNNING",
        |v| {
            v.as_array()
                .is_some_and(|a| a.len() == n && a.iter().all(|d| d["current_state"] == "RUNNING"))
        },
    )
    .await?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["status"]["pid"].as_u64())
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default())
}

/// Kills (by process group) any recorded workload that outlived its node.
async fn reap(pids: &[u32]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| c.starts_with("sleep\x00100000"))
    };
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = 0;
    for &p in pids {
        if alive(p)
            && let Ok(p) = i32::try_from(p)
        {
            let _ = kill(Pid::from_raw(-p), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

async fn dev_layout(bin: &Path, p: &Params, ticks: f64) -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let (http_port, quic_port) = (free_tcp_port()?, free_udp_port()?);
    let http_arg = format!("127.0.0.1:{http_port}");
    let quic_arg = format!("127.0.0.1:{quic_port}");
    let child = spawn(
        bin,
        &[
            "dev",
            "--http",
            &http_arg,
            "--quic",
            &quic_arg,
            "--storage",
            "./storage",
        ],
        dir.path(),
        "dev.log",
    )?;
    let api = format!("http://{http_arg}");
    let http = reqwest::Client::new();
    wait_json(
        &http,
        &format!("{api}/nodes"),
        "the local node online",
        |v| v["nodes"]["local"]["state"] == "online",
    )
    .await?;
    let pid = child.pid();
    tokio::time::sleep(p.settle).await;
    let mut rows = measure("dev", "idle", &[("conductor+node", pid)], p.window, ticks).await?;
    let pids = load(&http, &api, p.deployments).await?;
    tokio::time::sleep(p.settle).await;
    let state = format!("{} running", p.deployments);
    rows.extend(measure("dev", &state, &[("conductor+node", pid)], p.window, ticks).await?);
    drop(child);
    let reaped = reap(&pids).await;
    if reaped > 0 {
        println!("dev: killed {reaped} workloads that outlived the node");
    }
    Ok(rows)
}

/// The separate layout with `bin`; rows are labelled `layout`.
async fn split_layout(
    bin: &Path,
    layout: &str,
    p: &Params,
    ticks: f64,
) -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let SplitCluster {
        conductor,
        node,
        api,
        http,
    } = SplitCluster::start(bin, d, 1.0).await?;
    let (cpid, npid) = (conductor.pid(), node.pid());
    tokio::time::sleep(p.settle).await;
    let both = [("conductor", cpid), ("node", npid)];
    let mut rows = measure(layout, "idle", &both, p.window, ticks).await?;
    let pids = load(&http, &api, p.deployments).await?;
    tokio::time::sleep(p.settle).await;
    let state = format!("{} running", p.deployments);
    let keeper_pids = keepers(d);
    let (node_rows, keeper_row) = tokio::join!(
        measure(layout, &state, &both, p.window, ticks),
        measure_keepers(layout, &state, &keeper_pids, p.window, ticks),
    );
    rows.extend(node_rows?);
    // A build from before keepers has none.
    if !keeper_pids.is_empty() {
        rows.push(keeper_row?);
    }
    // The node first (it stops its workloads), then the conductor.
    drop(node);
    drop(conductor);
    let reaped = reap(&pids).await;
    if reaped > 0 {
        println!("{layout}: killed {reaped} workloads that outlived the node");
    }
    Ok(rows)
}
