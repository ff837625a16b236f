//! Log throughput benchmark: a workload's stdout to a WebSocket viewer, end to end, and what a
//! log flood does to the control plane.
//!
//! A conductor and one node agent run in-process on 127.0.0.1 (default transport settings, 1 s
//! heartbeat, as `symphony dev`), each on its own tokio runtime (the viewer on a third), as
//! separate processes would be; they still share the machine's cores. Two floods of 64-byte lines, one after the other:
//! `flood-max` is `yes <63 characters>` (as fast as the node reads its pipe), `flood-paced` is a
//! shell loop printing 100 lines then sleeping 10 ms (at most 10 000 lines/s). A viewer on `/ws/deployments/{id}/logs?tail=0`
//! (tokio-tungstenite, in the same process) counts the lines and bytes it receives and the
//! sequence numbers it sees; after a warm-up, the rate over a fixed window is the end-to-end
//! throughput (workload pipe -> node ring -> QUIC log stream -> conductor log hub -> WebSocket).
//! Sequence gaps are lines that were produced but not delivered (a ring overflowed on the way);
//! they are reported, not hidden.
//!
//! Control-plane latency: the time from sending `POST /deployments` (a `sleep 1000`) to the
//! published snapshot showing RUNNING, sampled sequentially while idle, then while each flood
//! runs (each sample is deleted afterwards); p50/p99 of each and the flood/idle ratios. CPU use
//! over each window (this process = conductor + node + viewer, the workload, the whole host)
//! shows how much of the effect is plain CPU contention on a small machine.
//!
//! Loopback only, bounded loops. `BENCH_QUICK=1` runs a short smoke version. Results go to
//! stdout (a table) and to `<CARGO_TARGET_DIR or ./target>/bench/logs.json`.

mod common;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Upper bound for any awaited state.
const DEADLINE: Duration = Duration::from_secs(30);

/// 63 characters; with its newline each line is 64 bytes.
const LINE: &str = "symphony-log-flood-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEF";

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let p = Params {
        warmup: Duration::from_secs(if quick { 1 } else { 2 }),
        window: Duration::from_secs(if quick { 3 } else { 12 }),
        samples: if quick { 8 } else { 30 },
    };
    println!(
        "logs bench ({}): 64-byte lines from `yes`, window {:?} after {:?} warm-up, {} control samples each",
        if quick { "quick" } else { "full" },
        p.window,
        p.warmup,
        p.samples
    );
    let rt = common::runtime()?;
    // The node and the viewer get their own runtimes (threads), as separate processes would:
    // a busy node pump must not delay the conductor's tasks through a shared scheduler.
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("node")
        .enable_all()
        .build()?;
    let viewer_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("viewer")
        .enable_all()
        .build()?;
    let results = rt.block_on(run(&p, node_rt.handle(), viewer_rt.handle()))?;
    let path = common::write_json(
        "logs",
        json!({
            "line_bytes_with_newline": LINE.len() + 1,
            "flood_max": ["yes", LINE],
            "flood_paced": "sh -c: while :; do printf 100 lines; sleep 0.01; done",
            "warmup_s": p.warmup.as_secs_f64(),
            "window_s_min": p.window.as_secs_f64(),
            "control_samples": p.samples,
            "control_sample": "POST /deployments (sleep 1000) -> RUNNING in the conductor's snapshot; then DELETE",
            "viewer": "/ws/deployments/{id}/logs?tail=0, in-process tokio-tungstenite",
        }),
        results,
    )?;
    println!("\nwrote {}", path.display());
    Ok(())
}

struct Params {
    warmup: Duration,
    window: Duration,
    samples: usize,
}

/// What the viewer has seen so far.
#[derive(Default)]
struct Counters {
    stdout_lines: AtomicU64,
    /// stdout bytes including the newline each line had.
    stdout_bytes: AtomicU64,
    /// Entries of any stream.
    entries: AtomicU64,
    /// WebSocket payload bytes.
    wire_bytes: AtomicU64,
    frames: AtomicU64,
    max_seq: AtomicU64,
}

#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    stdout_lines: u64,
    stdout_bytes: u64,
    entries: u64,
    wire_bytes: u64,
    frames: u64,
    max_seq: u64,
}

impl Counters {
    fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            stdout_lines: self.stdout_lines.load(Ordering::Relaxed),
            stdout_bytes: self.stdout_bytes.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            max_seq: self.max_seq.load(Ordering::Relaxed),
        }
    }
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(borrow, default)]
    entries: Vec<Entry<'a>>,
}

#[derive(serde::Deserialize)]
struct Entry<'a> {
    seq: u64,
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    line: Cow<'a, str>,
}

/// Reads frames until the socket closes or `stop` fires, counting into `c`.
async fn viewer(url: String, c: Arc<Counters>, stop: CancellationToken) -> anyhow::Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let Some(msg) = msg else { break };
        let Message::Text(text) = msg? else { continue };
        let frame: Frame<'_> = serde_json::from_str(text.as_str())?;
        let (mut lines, mut bytes, mut max) = (0u64, 0u64, 0u64);
        for e in &frame.entries {
            if e.stream == "stdout" {
                lines += 1;
                bytes += e.line.len() as u64 + 1;
            }
            max = max.max(e.seq);
        }
        c.stdout_lines.fetch_add(lines, Ordering::Relaxed);
        c.stdout_bytes.fetch_add(bytes, Ordering::Relaxed);
        c.entries
            .fetch_add(frame.entries.len() as u64, Ordering::Relaxed);
        c.wire_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        c.frames.fetch_add(1, Ordering::Relaxed);
        c.max_seq.fetch_max(max, Ordering::Relaxed);
    }
    let _ = ws.close(None).await;
    Ok(())
}

struct Env {
    api: String,
    http: reqwest::Client,
    rx: watch::Receiver<Arc<symphony::conductor::view::ClusterView>>,
}

impl Env {
    async fn create(&self, name: &str, command: &[&str]) -> anyhow::Result<String> {
        let body =
            json!({"name": name, "specification": {"spec": {"config": {"command": command}}}});
        let resp = self
            .http
            .post(format!("{}/deployments", self.api))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(resp.status().as_u16() == 201, "POST: {}", resp.status());
        let v: Value = resp.json().await?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no id in {v}"))
    }

    /// Waits for RUNNING; returns the pid and when the node started the process (unix ms).
    async fn running(&mut self, id: &str) -> anyhow::Result<(Option<u32>, Option<i64>)> {
        let view = tokio::time::timeout(
            DEADLINE,
            self.rx.wait_for(|v| {
                v.deployment(id).is_some_and(|d| {
                    d.current_state == Some(symphony::model::CurrentState::Running)
                })
            }),
        )
        .await??
        .clone();
        let status = view.deployment(id).and_then(|d| d.status.as_ref());
        Ok((
            status.and_then(|s| s.pid),
            status.and_then(|s| s.started_at_ms),
        ))
    }

    async fn delete(&self, id: &str) -> anyhow::Result<()> {
        let r = self
            .http
            .delete(format!("{}/deployments/{id}", self.api))
            .send()
            .await?;
        anyhow::ensure!(r.status().as_u16() == 204, "DELETE: {}", r.status());
        Ok(())
    }

    /// `n` sequential POST -> RUNNING samples; each deployment is deleted afterwards.
    async fn control_samples(&mut self, tag: &str, n: usize) -> anyhow::Result<Samples> {
        let mut out = Samples::default();
        for i in 0..n {
            let (t, sent_ms) = (Instant::now(), unix_ms());
            let id = self
                .create(&format!("{tag}-{i}"), &["sleep", "1000"])
                .await?;
            out.post_to_201.push(t.elapsed().as_secs_f64() * 1e3);
            let (_, started) = self.running(&id).await?;
            let (total, seen_ms) = (t.elapsed().as_secs_f64() * 1e3, unix_ms());
            out.total.push(total);
            if let Some(started) = started {
                out.to_started.push((started - sent_ms) as f64);
                out.started_to_seen.push((seen_ms - started) as f64);
            }
            self.delete(&id).await?;
        }
        Ok(out)
    }
}

/// Control-plane samples (ms): the total, and its two legs split at the moment the node
/// started the process (wall clock, 1 ms resolution; same host, so the same clock).
#[derive(Default)]
struct Samples {
    /// POST sent -> RUNNING in the conductor's snapshot.
    total: Vec<f64>,
    /// POST sent -> 201 received (API, core, store, scheduling).
    post_to_201: Vec<f64>,
    /// POST sent -> process started on the node (the above, then Assign over QUIC, spawn).
    to_started: Vec<f64>,
    /// Process started -> RUNNING in the snapshot (status over QUIC, core, publish).
    started_to_seen: Vec<f64>,
}

impl Samples {
    fn summary(self) -> Value {
        let mut v = common::sample_json(self.total, true);
        v["leg_post_to_201"] = common::sample_json(self.post_to_201, true);
        v["leg_post_to_started"] = common::sample_json(self.to_started, true);
        v["leg_started_to_seen"] = common::sample_json(self.started_to_seen, true);
        v
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn run(
    p: &Params,
    node_rt: &tokio::runtime::Handle,
    viewer_rt: &tokio::runtime::Handle,
) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
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
    let node = node_rt.spawn(symphony::node::agent::run(node_cfg, cancel.clone()));
    let mut env = Env {
        api: format!("http://{}", conductor.http_addr),
        http: reqwest::Client::new(),
        rx: conductor.core.subscribe(),
    };
    let res = measure(p, &mut env, conductor.http_addr, viewer_rt).await;
    cancel.cancel();
    let _ = tokio::time::timeout(DEADLINE, node).await;
    conductor.shutdown().await;
    res
}

/// Host-wide (busy, total) jiffies from the first line of `/proc/stat`.
fn host_jiffies() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU use over a window: this process (conductor + node + viewer), the workload, the host.
struct CpuSnap {
    own: u64,
    workload: u64,
    host: (u64, u64),
}

impl CpuSnap {
    fn take(workload: Option<u32>) -> Self {
        Self {
            own: common::proc_cpu_ticks("self"),
            workload: workload.map_or(0, |p| common::proc_cpu_ticks(&p.to_string())),
            host: host_jiffies(),
        }
    }
}

/// One flood scenario: throughput over the window and control samples taken meanwhile.
async fn flood_phase(
    p: &Params,
    env: &mut Env,
    http_addr: std::net::SocketAddr,
    viewer_rt: &tokio::runtime::Handle,
    name: &str,
    command: &[&str],
) -> anyhow::Result<Value> {
    let flood = env.create(name, command).await?;
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let url = format!("ws://{http_addr}/ws/deployments/{flood}/logs?tail=0");
    let view_task = viewer_rt.spawn(viewer(url, counters.clone(), stop.clone()));
    let (flood_pid, _) = env.running(&flood).await?;
    tokio::time::sleep(p.warmup).await;

    let start = counters.snap();
    let cpu0 = CpuSnap::take(flood_pid);
    let busy = env.control_samples(name, p.samples).await;
    let elapsed = start.at.elapsed();
    if elapsed < p.window {
        tokio::time::sleep(p.window - elapsed).await;
    }
    let end = counters.snap();
    let cpu1 = CpuSnap::take(flood_pid);

    stop.cancel();
    let viewer_result = view_task.await;
    env.delete(&flood).await?;
    if let Some(pid) = flood_pid {
        let deadline = Instant::now() + DEADLINE;
        while common::pid_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let busy = busy?;
    match viewer_result {
        Ok(r) => r?,
        Err(e) => anyhow::bail!("viewer task: {e}"),
    }

    let secs = (end.at - start.at).as_secs_f64();
    let tck = common::clock_ticks();
    let own_cpu = (cpu1.own - cpu0.own) as f64 / tck / secs * 100.0;
    let workload_cpu = cpu1.workload.saturating_sub(cpu0.workload) as f64 / tck / secs * 100.0;
    let host_busy = {
        let (b, t) = (cpu1.host.0 - cpu0.host.0, cpu1.host.1 - cpu0.host.1);
        if t == 0 {
            f64::NAN
        } else {
            b as f64 * 100.0 / t as f64
        }
    };
    let lines = end.stdout_lines - start.stdout_lines;
    let bytes = end.stdout_bytes - start.stdout_bytes;
    let entries = end.entries - start.entries;
    let seq_span = end.max_seq.saturating_sub(start.max_seq);
    let lost = seq_span.saturating_sub(entries);
    let lost_pct = if seq_span > 0 {
        lost as f64 * 100.0 / seq_span as f64
    } else {
        0.0
    };
    let busy_s = busy.summary();
    println!("\n[{name}] workload stdout -> WebSocket viewer ({secs:.1} s window)");
    println!(
        "  delivered {:.0} lines/s, {:.2} MB/s (64-byte lines); {:.2} MB/s of JSON in {} frames",
        lines as f64 / secs,
        bytes as f64 / secs / 1e6,
        (end.wire_bytes - start.wire_bytes) as f64 / secs / 1e6,
        end.frames - start.frames
    );
    println!(
        "  produced (sequence span) {:.0} lines/s; not delivered {lost} of {seq_span} ({lost_pct:.2} %)",
        seq_span as f64 / secs
    );
    println!(
        "  CPU: conductor+node+viewer {own_cpu:.0} % of a core, workload {workload_cpu:.0} %, host busy {host_busy:.0} %"
    );
    Ok(json!({
        "command": command,
        "window_s": secs,
        "stdout_lines": lines,
        "stdout_bytes": bytes,
        "lines_per_s": lines as f64 / secs,
        "mb_per_s": bytes as f64 / secs / 1e6,
        "ws_json_mb_per_s": (end.wire_bytes - start.wire_bytes) as f64 / secs / 1e6,
        "ws_frames": end.frames - start.frames,
        "seq_span": seq_span,
        "produced_lines_per_s": seq_span as f64 / secs,
        "not_delivered": lost,
        "not_delivered_percent": lost_pct,
        "cpu_percent_conductor_node_viewer": own_cpu,
        "cpu_percent_workload": workload_cpu,
        "host_busy_percent": host_busy,
        "control_post_to_running": busy_s,
    }))
}

async fn measure(
    p: &Params,
    env: &mut Env,
    http_addr: std::net::SocketAddr,
    viewer_rt: &tokio::runtime::Handle,
) -> anyhow::Result<Value> {
    tokio::time::timeout(
        DEADLINE,
        env.rx.wait_for(|v| {
            v.nodes
                .get("bench-node")
                .is_some_and(|n| n.state == "online")
        }),
    )
    .await??;

    // Idle control plane first (one unmeasured sample warms the paths).
    env.control_samples("warm", 1).await?;
    let idle = env.control_samples("idle", p.samples).await?.summary();

    let max = flood_phase(p, env, http_addr, viewer_rt, "flood-max", &["yes", LINE]).await?;
    let script = format!(
        "while :; do printf '%s\\n' {}; sleep 0.01; done",
        vec![LINE; 100].join(" ")
    );
    let paced = flood_phase(
        p,
        env,
        http_addr,
        viewer_rt,
        "flood-paced",
        &["sh", "-c", &script],
    )
    .await?;

    let ratio = |s: &Value, k: &str| {
        s["control_post_to_running"][k].as_f64().unwrap_or(f64::NAN)
            / idle[k].as_f64().unwrap_or(f64::NAN)
    };
    println!("\ncontrol plane: POST -> RUNNING of another deployment (sequential samples)");
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}   p50 ms: POST->201 / POST->started / started->seen",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50/idle", "p99/idle"
    );
    let row = |name: &str, s: &Value, r50: f64, r99: f64| {
        println!(
            "{:<26} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}x {:>9.2}x   {:>6.1} / {:>4.0} / {:<4.0}",
            name,
            s["p50_ms"].as_f64().unwrap_or(f64::NAN),
            s["p90_ms"].as_f64().unwrap_or(f64::NAN),
            s["p99_ms"].as_f64().unwrap_or(f64::NAN),
            s["max_ms"].as_f64().unwrap_or(f64::NAN),
            r50,
            r99,
            s["leg_post_to_201"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
            s["leg_post_to_started"]["p50_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            s["leg_started_to_seen"]["p50_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    };
    row("idle", &idle, 1.0, 1.0);
    row(
        "during flood-max (yes)",
        &max["control_post_to_running"],
        ratio(&max, "p50_ms"),
        ratio(&max, "p99_ms"),
    );
    row(
        "during flood-paced",
        &paced["control_post_to_running"],
        ratio(&paced, "p50_ms"),
        ratio(&paced, "p99_ms"),
    );
    Ok(json!({
        "control_idle": idle,
        "flood_max": max,
        "flood_paced": paced,
        "ratio_p50_max": ratio(&max, "p50_ms"),
        "ratio_p99_max": ratio(&max, "p99_ms"),
        "ratio_p50_paced": ratio(&paced, "p50_ms"),
        "ratio_p99_paced": ratio(&paced, "p99_ms"),
    }))
}
