//! Outage benchmark: how many log lines survive a node agent outage.
//!
//! A conductor and a node run as separate processes of the real binary (the separate layout
//! of the footprint bench). One deployment writes numbered lines at a steady 1 000 lines/s.
//! The bench follows its log on the conductor's log socket, kills the node agent with
//! `kill -9`, waits 30 s (3 s with `BENCH_QUICK=1`), starts the agent again and follows the
//! log until it has gone 2 s past the restart. It reports the lines written during the outage
//! (by the time the keeper read them), how many reached the conductor, the numbers missing
//! anywhere in the log, and the lines that came twice. With `SYMPHONY_BIN_BEFORE` set to
//! another build, the same runs with it in the same session, side by side.
//!
//! The binary is `$SYMPHONY_BIN`, else `<CARGO_TARGET_DIR or ./target>/release/symphony`; when
//! it is missing the bench says how to build it. Results go to stdout and
//! `<target>/bench/outage.json`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::procs::{DEADLINE, SplitCluster, spawn, wait_json};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Lines per second the workload writes.
const RATE: u64 = 1000;

/// Writes `line N` at RATE lines/s, on schedule (a late line does not shift the next ones).
const WRITER: &str = r"import sys, time
t0 = time.monotonic()
i = 0
while True:
    i += 1
    sys.stdout.write('line %d\n' % i)
    sys.stdout.flush()
    d = t0 + i / RATE - time.monotonic()
    if d > 0:
        time.sleep(d)
";

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let outage = Duration::from_secs(if quick { 3 } else { 30 });
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let bin = std::env::var_os("SYMPHONY_BIN")
        .map_or_else(|| target.join("release").join("symphony"), PathBuf::from);
    if !bin.exists() {
        println!(
            "outage: skipped, {} is missing (cargo build --release, or set SYMPHONY_BIN)",
            bin.display()
        );
        return Ok(());
    }
    let before = std::env::var_os("SYMPHONY_BIN_BEFORE").map(PathBuf::from);
    let rt = common::runtime()?;
    let mut rows = Vec::new();
    if let Some(before) = &before {
        rows.push(rt.block_on(run("before", before, outage))?);
    }
    rows.push(rt.block_on(run("this", &bin, outage))?);
    println!(
        "\n{:<8} {:>9} {:>14} {:>12} {:>8} {:>8} {:>8}",
        "binary", "outage s", "written during", "reached", "kept %", "missing", "twice"
    );
    for r in &rows {
        println!(
            "{:<8} {:>9.1} {:>14} {:>12} {:>8.1} {:>8} {:>8}",
            r["binary"].as_str().unwrap_or(""),
            r["outage_s"].as_f64().unwrap_or(f64::NAN),
            r["written_during_outage"].as_u64().unwrap_or(0),
            r["reached_from_outage"].as_u64().unwrap_or(0),
            r["kept_percent"].as_f64().unwrap_or(f64::NAN),
            r["missing_anywhere"].as_u64().unwrap_or(0),
            r["twice"].as_u64().unwrap_or(0),
        );
    }
    let report = common::report(
        "outage",
        json!({"binary": bin.display().to_string(), "before": before.map(|b| b.display().to_string()), "outage_s": outage.as_secs_f64(), "rate_lines_per_s": RATE}),
        json!(rows),
    );
    let path = common::write_doc("outage", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// `(number, timestamp_ms)` of every `line N` entry seen, in arrival order.
type Seen = Arc<Mutex<Vec<(u64, i64)>>>;

async fn run(label: &str, bin: &Path, outage: Duration) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut cluster = SplitCluster::start(bin, d, 1.0).await?;
    let script = WRITER.replace("RATE", &RATE.to_string());
    let body = json!({"name": "writer", "specification": {"spec": {"config": {"command": ["python3", "-u", "-c", script]}}}});
    let created: Value = cluster
        .http
        .post(format!("{}/deployments", cluster.api))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no id in {created}"))?
        .to_owned();
    let url = format!("{}/deployments/{id}", cluster.api);
    wait_json(&cluster.http, &url, "the writer RUNNING", |v| {
        v["status"]["state"] == "RUNNING"
    })
    .await?;
    let seen: Seen = Arc::default();
    let follower = tokio::spawn(follow(
        format!(
            "{}/ws/deployments/{id}/logs?tail=10000",
            cluster.api.replace("http", "ws")
        ),
        seen.clone(),
    ));
    let last_ts = |seen: &Seen| seen.lock().ok().and_then(|s| s.last().map(|e| e.1));
    wait_for(|| last_ts(&seen).is_some(), "the first lines").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = common::unix_us() / 1000;
    cluster.node.kill9();
    tokio::time::sleep(outage).await;
    let restarted_at = common::unix_us() / 1000;
    cluster.node = spawn(bin, &["--config", "node.yaml"], d, "node2.log")?;
    cluster.node_online().await?;
    wait_for(
        || last_ts(&seen).is_some_and(|t| t > restarted_at + 2000),
        "lines from after the restart",
    )
    .await?;
    follower.abort();
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut count: BTreeMap<u64, u32> = BTreeMap::new();
    for (n, _) in &seen {
        *count.entry(*n).or_default() += 1;
    }
    let max = count.keys().next_back().copied().unwrap_or(0);
    let missing = (1..=max).filter(|n| !count.contains_key(n)).count();
    let twice: u32 = count.values().map(|c| c - 1).sum();
    // The writer's numbering is its clock: line n was written about n / RATE s after the first.
    let during: std::collections::BTreeSet<u64> = seen
        .iter()
        .filter(|(_, ts)| (killed_at..=restarted_at).contains(ts))
        .map(|(n, _)| *n)
        .collect();
    let outage_s = (restarted_at - killed_at) as f64 / 1000.0;
    let written = (outage_s * RATE as f64).round() as u64;
    let reached = during.len() as u64;
    println!(
        "{label}: outage {outage_s:.1} s, {written} lines written meanwhile, {reached} reached the conductor, {missing} missing anywhere, {twice} twice"
    );
    Ok(json!({
        "binary": label,
        "outage_s": outage_s,
        "written_during_outage": written,
        "reached_from_outage": reached,
        "kept_percent": reached as f64 / written.max(1) as f64 * 100.0,
        "missing_anywhere": missing,
        "twice": twice,
        "lines_seen": seen.len(),
    }))
}

/// Follows the log socket, recording `line N` entries.
async fn follow(url: String, seen: Seen) {
    let mut ws = match tokio_tungstenite::connect_async(&url).await {
        Ok((ws, _)) => ws,
        Err(error) => {
            println!("outage: cannot follow {url}: {error}");
            return;
        }
    };
    while let Some(Ok(msg)) = ws.next().await {
        let Ok(text) = msg.into_text() else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let entries = frame["entries"].as_array().cloned().unwrap_or_default();
        let Ok(mut seen) = seen.lock() else { return };
        for e in entries {
            let n = e["line"]
                .as_str()
                .and_then(|l| l.strip_prefix("line "))
                .and_then(|n| n.parse::<u64>().ok());
            if let (Some(n), Some(ts)) = (n, e["timestamp_unix_ms"].as_i64()) {
                seen.push((n, ts));
            }
        }
    }
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
