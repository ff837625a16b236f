//! Bench `fan_in`: N simulated nodes, each its own QUIC endpoint (own UDP socket) with its own
//! certificate, connected to one conductor and heartbeating once a second on a heartbeat uni
//! stream (the `symphony-net` layout), on loopback.
//!
//! Two processes keep the conductor's figures clean: this process is the conductor; the nodes run
//! in a child copy of this binary (`--fanin-nodes`), which also generates the CA and every
//! certificate up front (not measured) and hands the conductor its material in a temp folder.
//! The conductor's CPU comes from `/proc/self/stat` (utime + stime over a steady window), its
//! resident memory from `/proc/self/status` (VmRSS after connect minus VmRSS before binding,
//! divided by N). Heartbeat processing latency = conductor receive time minus the node's send
//! timestamp carried in the frame (same machine clock), after the frame is decoded.
//! Run: `cargo bench --bench fan_in` (N = 100, 1000; `BENCH_FANIN_MAX=5000` adds 5000;
//! `BENCH_QUICK=1` runs N = 100 with a short window; `BENCH_SCRAPE_ONLY=1` runs only the
//! `/metrics` part, for 100, 1 000 and 5 000 nodes).

mod common;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use prost::Message;
use serde_json::{Value, json};
use symphony::wire::{
    CommandResult, CoreUsage, Gpu, Heartbeat, NodeMessage, StorageMount, node_message,
};
use symphony_net::{Client, ClientConfig, Server, StreamKind, TlsMaterial, TransportSettings};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The heartbeat as sent, plus the node's send time in microseconds (the wire `Heartbeat`
/// only carries milliseconds, too coarse for loopback latency).
#[derive(Clone, PartialEq, prost::Message)]
struct TimedHeartbeat {
    #[prost(message, optional, tag = "1")]
    heartbeat: Option<Heartbeat>,
    #[prost(int64, tag = "2")]
    sent_unix_us: i64,
}

#[derive(Debug, Clone)]
struct Params {
    sizes: Vec<usize>,
    heartbeat: Duration,
    connect_concurrency: usize,
    settle: Duration,
    window: Duration,
}

impl Params {
    fn from_env() -> Self {
        let quick = common::quick();
        let mut sizes = if quick { vec![100] } else { vec![100, 1000] };
        let max: usize = std::env::var("BENCH_FANIN_MAX")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if max >= 5000 && !quick {
            sizes.push(5000);
        }
        if std::env::var_os("BENCH_SCRAPE_ONLY").is_some() {
            sizes.clear();
        }
        Self {
            sizes,
            heartbeat: Duration::from_secs(1),
            connect_concurrency: 100,
            settle: Duration::from_secs(if quick { 1 } else { 2 }),
            window: Duration::from_secs(if quick { 3 } else { 10 }),
        }
    }

    fn json(&self) -> Value {
        json!({
            "nodes": self.sizes,
            "heartbeat_interval_ms": self.heartbeat.as_millis() as u64,
            "heartbeat_frame_bytes": heartbeat_frame(0).encoded_len() + 4,
            "connect_concurrency": self.connect_concurrency,
            "settle_s": self.settle.as_secs_f64(),
            "window_s": self.window.as_secs_f64(),
            "settings": "TransportSettings::default() on both ends (keep-alive 5 s, idle 20 s)",
        })
    }
}

/// A heartbeat the size of a real one: 16 cores, 2 mounts, 1 GPU.
fn heartbeat_frame(seq: u64) -> TimedHeartbeat {
    TimedHeartbeat {
        heartbeat: Some(Heartbeat {
            problems: Vec::new(),
            seq,
            timestamp_unix_ms: common::unix_us() / 1000,
            cpu_total_percent: 37.5,
            per_core: (0..16)
                .map(|i| CoreUsage {
                    core_id: i,
                    used_percent: 40.0,
                })
                .collect(),
            mem_used_bytes: 12 << 30,
            mem_available_bytes: 52 << 30,
            mem_used_percent: 18.75,
            mem_free_bytes: 40 << 30,
            mem_buffers_bytes: 1 << 30,
            mem_cached_bytes: 10 << 30,
            storage: ["/", "/data"]
                .iter()
                .map(|m| StorageMount {
                    mount_point: (*m).into(),
                    fs_type: "ext4".into(),
                    total_bytes: 1 << 40,
                    used_bytes: 1 << 39,
                    available_bytes: 1 << 39,
                    used_percent: 50.0,
                })
                .collect(),
            gpus: vec![Gpu {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                mem_total_bytes: 80 << 30,
                util_percent: 90.0,
                mem_util_percent: 60.0,
                mem_used_bytes: 48 << 30,
                mem_free_bytes: 32 << 30,
                temperature_c: 61.0,
                power_w: 550.0,
            }],
            deployment_gpus: Vec::new(),
        }),
        sent_unix_us: common::unix_us(),
    }
}

fn hello() -> NodeMessage {
    NodeMessage {
        msg: Some(node_message::Msg::Result(CommandResult {
            command_id: 0,
            ok: true,
            message: "hello".into(),
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings (this process = the conductor)

/// System-wide UDP `RcvbufErrors` (datagrams dropped because a socket buffer was full).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Conductor (this process)

struct Conductor {
    accepted: Arc<AtomicU64>,
    heartbeats: Arc<AtomicU64>,
    recording: Arc<AtomicBool>,
    latencies_us: Arc<Mutex<Vec<i64>>>,
    first_accept: Arc<Mutex<Option<Instant>>>,
    last_accept: Arc<Mutex<Option<Instant>>>,
    _tasks: JoinSet<()>,
}

fn start_conductor(mut server: Server) -> Conductor {
    let accepted = Arc::new(AtomicU64::new(0));
    let heartbeats = Arc::new(AtomicU64::new(0));
    let recording = Arc::new(AtomicBool::new(false));
    let latencies_us = Arc::new(Mutex::new(Vec::new()));
    let first_accept = Arc::new(Mutex::new(None));
    let last_accept = Arc::new(Mutex::new(None));
    let mut tasks = JoinSet::new();
    {
        let (accepted, heartbeats, recording, latencies_us, first_accept, last_accept) = (
            accepted.clone(),
            heartbeats.clone(),
            recording.clone(),
            latencies_us.clone(),
            first_accept.clone(),
            last_accept.clone(),
        );
        tasks.spawn(async move {
            let mut nodes = JoinSet::new();
            while let Some(acc) = server.accept().await {
                let now = Instant::now();
                if let Ok(mut f) = first_accept.lock() {
                    f.get_or_insert(now);
                }
                if let Ok(mut l) = last_accept.lock() {
                    *l = Some(now);
                }
                accepted.fetch_add(1, Ordering::Relaxed);
                let mut control = acc.control;
                nodes.spawn(async move {
                    while let Ok(Some(_)) = control.rx.recv::<NodeMessage>().await {}
                });
                let (session, heartbeats, recording, latencies_us) = (
                    acc.session,
                    heartbeats.clone(),
                    recording.clone(),
                    latencies_us.clone(),
                );
                nodes.spawn(async move {
                    while let Ok((kind, mut rx)) = session.accept_uni().await {
                        if kind != StreamKind::Heartbeat {
                            continue;
                        }
                        while let Ok(Some(hb)) = rx.recv::<TimedHeartbeat>().await {
                            let lat = common::unix_us() - hb.sent_unix_us;
                            heartbeats.fetch_add(1, Ordering::Relaxed);
                            if recording.load(Ordering::Relaxed)
                                && let Ok(mut v) = latencies_us.lock()
                            {
                                v.push(lat);
                            }
                        }
                    }
                });
            }
        });
    }
    Conductor {
        accepted,
        heartbeats,
        recording,
        latencies_us,
        first_accept,
        last_accept,
        _tasks: tasks,
    }
}

#[derive(Debug, Clone)]
struct SizeResult {
    nodes: usize,
    cert_gen_s: f64,
    connect_all_s: f64,
    node_connect_failures: u64,
    node_connect_p50_ms: f64,
    node_connect_p99_ms: f64,
    udp_rcvbuf_errors: u64,
    accept_span_s: f64,
    cpu_percent: f64,
    rss_before_mib: f64,
    rss_after_mib: f64,
    rss_per_node_kib: f64,
    heartbeats_in_window: u64,
    latency: common::Summary,
}

impl SizeResult {
    fn json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "cert_generation_s (not measured, node process)": self.cert_gen_s,
            "connect_all_s": self.connect_all_s,
            "node_connect_failures": self.node_connect_failures,
            "node_connect_p50_ms": self.node_connect_p50_ms,
            "node_connect_p99_ms": self.node_connect_p99_ms,
            "udp_rcvbuf_errors_during_connect (system-wide)": self.udp_rcvbuf_errors,
            "conductor_accept_span_s": self.accept_span_s,
            "conductor_cpu_percent_of_one_core": self.cpu_percent,
            "conductor_rss_before_mib": self.rss_before_mib,
            "conductor_rss_after_mib": self.rss_after_mib,
            "conductor_rss_per_node_kib": self.rss_per_node_kib,
            "heartbeats_in_window": self.heartbeats_in_window,
            "heartbeat_latency": self.latency.json(),
        })
    }
}

/// Reads lines from the node process until one starts with `word`; returns the rest.
fn expect_line(
    lines: &std::sync::mpsc::Receiver<String>,
    word: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .map_err(|_| anyhow!("node process: no `{word}` line within {timeout:?}"))?;
        if let Some(rest) = line.strip_prefix(word) {
            return Ok(rest.trim().to_owned());
        }
    }
}

fn run_size(rt: &tokio::runtime::Runtime, p: &Params, n: usize, tck: f64) -> Result<SizeResult> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("--fanin-nodes")
        .arg(dir.path())
        .arg(n.to_string())
        .arg(p.heartbeat.as_millis().to_string())
        .arg(p.connect_concurrency.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (line_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<SizeResult> {
        let cert_gen_s: f64 = expect_line(&lines, "pki", Duration::from_secs(300))?.parse()?;
        let d = dir.path();
        let tls = TlsMaterial::from_files(
            &d.join("ca.pem"),
            &d.join("server.pem"),
            &d.join("server.key"),
        )?;
        let rss_before = common::proc_status_field("self", "VmRSS").unwrap_or(0);
        let (conductor, addr) = rt.block_on(async {
            let server = Server::bind("127.0.0.1:0".parse()?, &tls, TransportSettings::default())?;
            let addr = server.local_addr()?;
            anyhow::Ok((start_conductor(server), addr))
        })?;
        let drops0 = udp_rcvbuf_errors();
        writeln!(stdin, "addr {addr}")?;
        stdin.flush()?;
        let connected = expect_line(&lines, "connected", Duration::from_secs(600))?;
        let mut it = connected.split_whitespace();
        let connect_all_s: f64 = it.next().unwrap_or("nan").parse()?;
        let failures: u64 = it.next().unwrap_or("0").parse()?;
        let node_p50: f64 = it.next().unwrap_or("nan").parse()?;
        let node_p99: f64 = it.next().unwrap_or("nan").parse()?;
        let drops = udp_rcvbuf_errors().saturating_sub(drops0);
        // Wait until the conductor holds every connection that came up (bounded).
        let want = n as u64 - failures;
        let deadline = Instant::now() + Duration::from_secs(30);
        while conductor.accepted.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let span = {
            let f = conductor
                .first_accept
                .lock()
                .map_err(|_| anyhow!("poisoned"))?;
            let l = conductor
                .last_accept
                .lock()
                .map_err(|_| anyhow!("poisoned"))?;
            f.zip(*l)
                .map_or(f64::NAN, |(f, l)| l.duration_since(f).as_secs_f64())
        };
        std::thread::sleep(p.settle);
        let (cpu0, hb0, t0) = (
            common::proc_cpu_ticks("self"),
            conductor.heartbeats.load(Ordering::Relaxed),
            Instant::now(),
        );
        conductor.recording.store(true, Ordering::Relaxed);
        std::thread::sleep(p.window);
        conductor.recording.store(false, Ordering::Relaxed);
        let (cpu1, hb1, t1) = (
            common::proc_cpu_ticks("self"),
            conductor.heartbeats.load(Ordering::Relaxed),
            Instant::now(),
        );
        let rss_after = common::proc_status_field("self", "VmRSS").unwrap_or(0);
        let lat: Vec<Duration> = conductor
            .latencies_us
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .iter()
            .map(|us| Duration::from_micros(u64::try_from(*us).unwrap_or(0)))
            .collect();
        writeln!(stdin, "stop")?;
        stdin.flush()?;
        let _ = expect_line(&lines, "stopped", Duration::from_secs(30));
        rt.block_on(async { drop(conductor) });
        let accepted = n as u64 - failures;
        Ok(SizeResult {
            nodes: n,
            cert_gen_s,
            connect_all_s,
            node_connect_failures: failures,
            node_connect_p50_ms: node_p50,
            node_connect_p99_ms: node_p99,
            udp_rcvbuf_errors: drops,
            accept_span_s: span,
            cpu_percent: (cpu1 - cpu0) as f64 / tck / t1.duration_since(t0).as_secs_f64() * 100.0,
            rss_before_mib: rss_before as f64 / 1024.0,
            rss_after_mib: rss_after as f64 / 1024.0,
            rss_per_node_kib: rss_after.saturating_sub(rss_before) as f64 / accepted.max(1) as f64,
            heartbeats_in_window: hb1 - hb0,
            latency: common::Summary::of(&lat),
        })
    })();
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    result
}

// ---------------------------------------------------------------------------------------------
// Nodes (child process)

/// `--fanin-nodes <dir> <n> <heartbeat ms> <concurrency>`.
fn nodes_child(args: &[String]) -> Result<()> {
    let [dir, n, hb_ms, conc, ..] = args else {
        bail!("usage: --fanin-nodes <dir> <n> <heartbeat ms> <concurrency>")
    };
    let dir = std::path::PathBuf::from(dir);
    let n: usize = n.parse()?;
    let heartbeat = Duration::from_millis(hb_ms.parse()?);
    let conc: usize = conc.parse()?;

    let t = Instant::now();
    let pki = common::Pki::new(&[])?;
    let nodes: Vec<TlsMaterial> = (0..n)
        .map(|i| pki.node_tls(&format!("fan-{i}")))
        .collect::<Result<_>>()?;
    let server = pki.server_tls();
    std::fs::write(dir.join("ca.pem"), &server.ca_pem)?;
    std::fs::write(dir.join("server.pem"), &server.cert_pem)?;
    std::fs::write(dir.join("server.key"), &server.key_pem)?;
    println!("pki {:.3}", t.elapsed().as_secs_f64());

    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("addr ")
        .ok_or_else(|| anyhow!("expected addr, got {line:?}"))?
        .parse()?;

    let rt = common::runtime()?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(conc.max(1)));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<Duration>>();
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        for tls in nodes {
            let (cancel, permits, done_tx) = (cancel.clone(), permits.clone(), done_tx.clone());
            tasks.spawn(async move {
                let up = async {
                    let t = Instant::now();
                    let _permit = permits.acquire().await?;
                    let mut cfg = ClientConfig::new(addr.to_string(), tls);
                    cfg.server_name = Some("localhost".into());
                    cfg.bind = "127.0.0.1:0".parse()?;
                    let client = Client::new(cfg)?;
                    let (session, mut control) = client.connect().await?;
                    control.tx.send(&hello()).await?;
                    let hb = session.open_uni(StreamKind::Heartbeat).await?;
                    anyhow::Ok((client, session, control, hb, t.elapsed()))
                };
                let (client, session, _control, mut hb) = match up.await {
                    Ok((client, session, control, hb, took)) => {
                        let _ = done_tx.send(Some(took));
                        (client, session, control, hb)
                    }
                    Err(e) => {
                        eprintln!("node connect failed: {e:#}");
                        let _ = done_tx.send(None);
                        return;
                    }
                };
                let mut tick = tokio::time::interval(heartbeat);
                let mut seq = 0;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = tick.tick() => {
                            seq += 1;
                            if hb.send(&heartbeat_frame(seq)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                session.close(symphony_net::CloseCode::Shutdown, "bench done");
                drop(client);
            });
        }
        drop(done_tx);
        let (mut took, mut failed) = (Vec::new(), 0u64);
        while let Some(up) = done_rx.recv().await {
            match up {
                Some(t) => took.push(t),
                None => failed += 1,
            }
            if took.len() as u64 + failed == n as u64 {
                break;
            }
        }
        let per_node = common::Summary::of(&took);
        // Per-node time includes waiting for a connect permit.
        println!(
            "connected {:.3} {failed} {:.3} {:.3}",
            start.elapsed().as_secs_f64(),
            per_node.p50_ms,
            per_node.p99_ms
        );
        // Wait for "stop" (or stdin closing).
        let _ = tokio::task::spawn_blocking(|| {
            let mut l = String::new();
            while std::io::stdin().read_line(&mut l).is_ok_and(|n| n > 0) {
                if l.trim() == "stop" {
                    break;
                }
                l.clear();
            }
        })
        .await;
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
        // Let the CONNECTION_CLOSE frames leave.
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("stopped");
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let res = match args.first().map(String::as_str) {
        Some("--fanin-nodes") => nodes_child(&args[1..]),
        _ => real_main(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fan_in: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let p = Params::from_env();
    let tck = common::clock_ticks();
    let rt = common::runtime()?;
    let mut results = Vec::new();
    for &n in &p.sizes {
        let r = run_size(&rt, &p, n, tck).with_context(|| format!("{n} nodes"))?;
        eprintln!(
            "  N={n}: connect {:.2} s, cpu {:.1}%, rss/node {:.1} KiB, hb p50 {} p99 {} ms, failures {}",
            r.connect_all_s,
            r.cpu_percent,
            r.rss_per_node_kib,
            common::ms(r.latency.p50_ms),
            common::ms(r.latency.p99_ms),
            r.node_connect_failures
        );
        results.push(r);
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.nodes.to_string(),
                format!("{:.2}", r.connect_all_s),
                format!("{:.0}", r.nodes as f64 / r.connect_all_s),
                r.node_connect_failures.to_string(),
                r.udp_rcvbuf_errors.to_string(),
                format!("{:.1}", r.cpu_percent),
                format!("{:.1}", r.rss_after_mib),
                format!("{:.1}", r.rss_per_node_kib),
                r.heartbeats_in_window.to_string(),
                common::ms(r.latency.p50_ms),
                common::ms(r.latency.p99_ms),
                common::ms(r.latency.max_ms),
            ]
        })
        .collect();
    let table = common::table(
        &[
            "nodes",
            "connect s",
            "conn/s",
            "failed",
            "udp drops",
            "cpu %",
            "rss MiB",
            "KiB/node",
            "heartbeats",
            "hb p50 ms",
            "hb p99 ms",
            "hb max ms",
        ],
        &rows,
    );
    println!(
        "\nfan-in on loopback (conductor = this process; cpu % of one core over a {} s window; heartbeat every {} s)\n{table}\n",
        p.window.as_secs(),
        p.heartbeat.as_secs()
    );
    let scrape = scrape_cost(
        if common::quick() && std::env::var_os("BENCH_SCRAPE_ONLY").is_none() {
            &[(100, false), (1000, false)]
        } else {
            &[(100, false), (1000, false), (5000, false), (5000, true)]
        },
    )?;
    let path = common::write_json(
        "fan_in",
        p.json(),
        json!({
            "sizes": results.iter().map(SizeResult::json).collect::<Vec<_>>(),
            "metrics_scrape": scrape,
        }),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The conductor's `/metrics` for a fleet of `n` nodes, each with the heartbeat above (16
/// cores, 2 mounts, 1 GPU) and 3 capacity classes: time to render the exposition (median of 5)
/// and its size, beside `GET /nodes` (the JSON a poller would fetch instead) for the same view.
fn scrape_cost(sizes: &[(usize, bool)]) -> Result<Value> {
    use std::collections::{BTreeMap, BTreeSet};
    use symphony::conductor::metrics::{Metrics, render};
    use symphony::conductor::view::{self, ClusterView, NodeFacts};

    let heartbeat = heartbeat_frame(0).heartbeat.unwrap_or_default();
    let caps = BTreeMap::from([
        ("cpu".to_owned(), 16),
        ("gpu".to_owned(), 1),
        ("mem".to_owned(), 64),
    ]);
    let reserved = BTreeMap::from([("cpu".to_owned(), 4), ("gpu".to_owned(), 1)]);
    let groups = vec!["gpu".to_owned()];
    let none = BTreeSet::new();
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for &(n, gpu_deployments) in sizes {
        let mut v = ClusterView::default();
        let metrics = Metrics::default();
        for i in 0..n {
            let id = format!("node-{i:05}");
            let facts = NodeFacts {
                id: &id,
                state: symphony::scheduler::NodeState::Online,
                groups: &groups,
                capacities_total: &caps,
                reserved: Some(&reserved),
                last_heartbeat_ms: Some(heartbeat.timestamp_unix_ms),
                resources: None,
                usage: Some(&heartbeat),
                env_names: &none,
                defined_envs: &none,
                env_problems: &[],
            };
            let conn = view::NodeConnection {
                remote_addr: "203.0.113.7:40000".into(),
                rtt_ms: 31.0,
                ..view::NodeConnection::default()
            };
            v.nodes
                .insert(id.clone(), view::node(facts, Vec::new(), Some(conn)));
            // Every node has a control-RTT histogram (and, in the second 5 000 row, runs one
            // deployment on its GPU: two more series per node).
            metrics.observe_rtt(&id, std::time::Duration::from_millis(31));
            if !gpu_deployments {
                continue;
            }
            v.deployments.push(Arc::new(symphony::model::Deployment {
                id: format!("{i:032x}").into(),
                name: format!("train-{i}"),
                status: Some(symphony::model::RunStatus {
                    node_id: id.as_str().into(),
                    gpus: vec![symphony::model::GpuUse {
                        gpu_index: 0,
                        memory_bytes: 40 << 30,
                        util_percent: Some(87.0),
                        processes: 1,
                    }],
                    ..symphony::model::RunStatus::default()
                }),
                ..symphony::model::Deployment::default()
            }));
        }
        let v = Arc::new(v);
        let (mut scrape, mut nodes_json) = (Vec::new(), Vec::new());
        let (mut scrape_bytes, mut json_bytes) = (0, 0);
        for _ in 0..5 {
            let t = Instant::now();
            let text = render(&metrics, &v).map_err(|e| anyhow!("render: {e}"))?;
            scrape.push(t.elapsed().as_secs_f64() * 1e3);
            scrape_bytes = text.len();
            let t = Instant::now();
            let body = serde_json::to_vec(&json!({ "nodes": v.nodes }))?;
            nodes_json.push(t.elapsed().as_secs_f64() * 1e3);
            json_bytes = body.len();
        }
        scrape.sort_by(f64::total_cmp);
        nodes_json.sort_by(f64::total_cmp);
        let (sm, jm) = (scrape[2], nodes_json[2]);
        rows.push(vec![
            if gpu_deployments {
                format!("{n} + {n} GPU deployments")
            } else {
                n.to_string()
            },
            common::ms(sm),
            format!("{:.2}", scrape_bytes as f64 / 1e6),
            common::ms(jm),
            format!("{:.2}", json_bytes as f64 / 1e6),
            format!("{:.2}x", jm / sm),
        ]);
        out.push(json!({
            "nodes": n,
            "gpu_deployments": if gpu_deployments { n } else { 0 },
            "render_ms_median": sm,
            "render_ms": scrape,
            "exposition_bytes": scrape_bytes,
            "nodes_json_ms_median": jm,
            "nodes_json_bytes": json_bytes,
        }));
    }
    println!(
        "/metrics for a fleet (render only, median of 5), beside GET /nodes' JSON for the same view\n{}\n",
        common::table(
            &[
                "nodes",
                "metrics ms",
                "metrics MB",
                "/nodes ms",
                "/nodes MB",
                "ratio"
            ],
            &rows
        )
    );
    Ok(json!(out))
}
