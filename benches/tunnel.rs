//! Bench `tunnel`: a mesh service reached through the relay (node -> conductor -> node) and
//! through a direct node-to-node connection (hole punched), side by side with plain TCP to
//! the same kind of server, in one run; the product's code on both nodes and in the conductor.
//!
//! Two links:
//! * loopback: an in-process conductor and two in-process agents; the binder's node reaches
//!   services at 127.0.0.2, the connector's node listens at 127.0.0.3
//!   (`NodeConfig::service_ip`, so two agents share one host).
//! * tbf (root only): the connector's node runs as a real `symphony` process in its own network
//!   namespace behind a 50 Mbit/s `tbf` link (both directions) to this process, which runs the
//!   conductor and the binder's node; the measuring client runs in that namespace too (this
//!   binary with `--measure`). Plain TCP, relay and direct each cross the link once.
//!
//! The bench's own server is the service; a `sleep` deployment on each node binds / connects
//! it. The relay is measured with `conductor.direct_paths` off, the direct path with it on
//! (after `/services` shows `direct`). Rows:
//! * `throughput_1`: one connection writes `bytes` and waits for the server's acknowledgement.
//! * `throughput_100`: 100 connections at once, `bytes / 100` each.
//! * `rtt`: 1-byte ping-pong on one connection, `pings` times (median and p99).
//! * CPU: this process's CPU seconds per Gbit carried (loopback: conductor and both nodes;
//!   the relay's extra over direct is what the conductor's splice costs).
//!
//! Run: `cargo bench --bench tunnel` (`BENCH_QUICK=1` for a smoke run, `BENCH_NO_NETNS=1` to
//! skip the tbf link).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const BINDER_IP: [u8; 4] = [127, 0, 0, 2];
const CONNECTOR_IP: [u8; 4] = [127, 0, 0, 3];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = common::runtime().and_then(|rt| {
        rt.block_on(async {
            if args.first().map(String::as_str) == Some("--measure") {
                measure_child(&args[1..]).await
            } else {
                run().await
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The service: `S` + bytes until EOF -> answers `ok`; `E` -> echoes every byte.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            if mode[0] == b'S' {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"ok").await;
            } else {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
}

/// Sends `bytes` on one connection and waits for the acknowledgement.
async fn push(addr: SocketAddr, bytes: usize) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"S").await?;
    let chunk = vec![7u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    let mut ok = [0u8; 2];
    s.read_exact(&mut ok).await?;
    anyhow::ensure!(&ok == b"ok", "bad acknowledgement");
    Ok(())
}

/// Megabits per second of `conns` connections sending `bytes` in all.
async fn throughput(addr: SocketAddr, bytes: usize, conns: usize) -> Result<f64> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conns {
        set.spawn(push(addr, bytes / conns));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok((bytes * 8) as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// Round trips of one byte, in milliseconds, sorted.
async fn rtts(addr: SocketAddr, pings: usize) -> Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"E").await?;
    let mut out = Vec::with_capacity(pings);
    let mut b = [0u8; 1];
    for _ in 0..pings {
        let t = Instant::now();
        s.write_all(b"x").await?;
        s.read_exact(&mut b).await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// What one path carried.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Measured {
    throughput_1_mbit_s: f64,
    throughput_100_mbit_s: f64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    /// CPU seconds of this process per Gbit carried by the throughput rows (loopback only).
    cpu_s_per_gbit: Option<f64>,
    /// The connector's node's control-connection RTT as the conductor sees it (QUIC's
    /// smoothed RTT, `/nodes`), idle and while this path carried the rows (tbf only).
    #[serde(default)]
    control_rtt: Option<ControlRtt>,
}

/// Control RTT samples in milliseconds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ControlRtt {
    idle_p50_ms: f64,
    loaded_p50_ms: f64,
    loaded_p99_ms: f64,
    samples: usize,
}

/// Samples node `c`'s connection RTT from `/nodes` every 100 ms until `stop`, sorted.
async fn control_rtts(api: String, stop: CancellationToken) -> Vec<f64> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    loop {
        if let Ok(resp) = http.get(format!("{api}/nodes")).send().await
            && let Ok(v) = resp.json::<Value>().await
            && let Some(rtt) = v["nodes"]["c"]["connection"]["rtt_ms"].as_f64()
        {
            out.push(rtt);
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Measures a path to `addr`, waiting (bounded) until something answers there first.
async fn measure(addr: SocketAddr, bytes: usize, pings: usize) -> Result<Measured> {
    let waited = Instant::now();
    while rtts(addr, 1).await.is_err() {
        anyhow::ensure!(waited.elapsed() < DEADLINE, "nothing answers at {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu0 = common::proc_cpu_ticks("self");
    let throughput_1_mbit_s = throughput(addr, bytes, 1).await?;
    let throughput_100_mbit_s = throughput(addr, bytes, 100).await?;
    #[allow(clippy::cast_precision_loss)]
    let cpu = (common::proc_cpu_ticks("self") - cpu0) as f64 / common::clock_ticks();
    let rtt = rtts(addr, pings).await?;
    #[allow(clippy::cast_precision_loss)]
    let gbit = (2 * bytes * 8) as f64 / 1e9;
    Ok(Measured {
        throughput_1_mbit_s,
        throughput_100_mbit_s,
        rtt_p50_ms: common::percentile(&rtt, 50.0),
        rtt_p99_ms: common::percentile(&rtt, 99.0),
        cpu_s_per_gbit: Some(cpu / gbit),
        control_rtt: None,
    })
}

/// `--measure <addr> <bytes> <pings>`: measures from inside the pod namespace, prints JSON.
async fn measure_child(args: &[String]) -> Result<()> {
    let [addr, bytes, pings] = args else {
        bail!("usage: --measure ADDR BYTES PINGS");
    };
    let mut m = measure(addr.parse()?, bytes.parse()?, pings.parse()?).await?;
    m.cpu_s_per_gbit = None;
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

async fn deploy(http: &reqwest::Client, api: &str, name: &str, spec: Value) -> Result<()> {
    let resp = http
        .post(format!("{api}/deployments"))
        .json(&json!({"name": name, "specification": {"spec": spec}}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "POST {name}: {}",
        resp.text().await?
    );
    Ok(())
}

/// A conductor and the binder's node in this process; the connector's node in this process
/// (loopback) or in the pod namespace (tbf).
struct Mesh {
    conductor: Conductor,
    cancel: CancellationToken,
    agents: Vec<tokio::task::JoinHandle<Result<()>>>,
    pod: Option<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(direct: bool, port: u16, tbf: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cfg = ConductorConfig::local(dir.path().join("storage"));
        let host = if tbf { netns::HOST_IP } else { "127.0.0.1" };
        cfg.quic_listen = format!("{host}:0").parse()?;
        cfg.http_listen = "127.0.0.1:0".parse()?;
        cfg.direct_paths = direct;
        let conductor = Conductor::start(cfg).await?;
        let cancel = CancellationToken::new();
        let node = |id: &str, ip: [u8; 4]| -> Result<NodeConfig> {
            let mut cfg =
                NodeConfig::local(&conductor.ca, conductor.quic_addr, id, &dir.path().join(id))?;
            cfg.groups = vec![id.to_owned()];
            cfg.service_ip = ip.into();
            cfg.keeper =
                symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
            Ok(cfg)
        };
        let mut agents = vec![tokio::spawn(symphony::node::agent::run(
            node("b", BINDER_IP)?,
            cancel.clone(),
        ))];
        let pod = if tbf {
            Some(netns::start_node(&conductor, dir.path())?)
        } else {
            agents.push(tokio::spawn(symphony::node::agent::run(
                node("c", CONNECTOR_IP)?,
                cancel.clone(),
            )));
            None
        };
        let api = format!("http://{}", conductor.http_addr);
        let http = reqwest::Client::new();
        let sleep = json!(["sleep", "100000"]);
        let spec = |group: &str, mesh: Value| {
            let mut s = json!({"config": {"command": sleep}, "node_group": group});
            for (k, v) in mesh.as_object().into_iter().flatten() {
                s[k] = v.clone();
            }
            s
        };
        deploy(
            &http,
            &api,
            "binder",
            spec("b", json!({"binds": [{"bench": port}]})),
        )
        .await?;
        deploy(
            &http,
            &api,
            "connector",
            spec("c", json!({"connects": ["bench"]})),
        )
        .await?;
        let want = if direct { "direct" } else { "relay" };
        let waited = Instant::now();
        loop {
            let services: Value = http
                .get(format!("{api}/services"))
                .send()
                .await?
                .json()
                .await?;
            if services[0]["paths"][0]["path"] == want {
                break;
            }
            anyhow::ensure!(
                waited.elapsed() < DEADLINE,
                "the path never became {want}: {services}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            conductor,
            cancel,
            agents,
            pod,
            _dir: dir,
        })
    }

    /// Stops the agents (they stop their workloads) and the conductor.
    async fn stop(mut self) {
        if let Some(mut pod) = self.pod.take() {
            if let Some(pid) = pod.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(DEADLINE, pod.wait()).await.is_err() {
                let _ = pod.kill().await;
            }
        }
        self.cancel.cancel();
        for a in self.agents.drain(..) {
            let _ = tokio::time::timeout(DEADLINE, a).await;
        }
        self.conductor.shutdown().await;
    }
}

/// Measures plain TCP, the relay and the direct path over one link.
async fn link(tbf: bool, bytes: usize, pings: usize) -> Result<BTreeMap<&'static str, Measured>> {
    let service = TcpListener::bind(SocketAddr::from((BINDER_IP, 0))).await?;
    let port = service.local_addr()?.port();
    tokio::spawn(serve(service));
    let plain = if tbf {
        let l = TcpListener::bind(format!("{}:0", netns::HOST_IP)).await?;
        let addr = l.local_addr()?;
        tokio::spawn(serve(l));
        addr
    } else {
        SocketAddr::from((BINDER_IP, port))
    };
    let through = if tbf {
        SocketAddr::from(([127, 0, 0, 1], port))
    } else {
        SocketAddr::from((CONNECTOR_IP, port))
    };
    let run = async |addr: SocketAddr| {
        if tbf {
            netns::measure(addr, bytes, pings).await
        } else {
            measure(addr, bytes, pings).await
        }
    };
    let mut out = BTreeMap::new();
    out.insert("plain", run(plain).await.context("plain TCP")?);
    for (label, direct) in [("relay", false), ("direct", true)] {
        let mesh = Mesh::start(direct, port, tbf).await.context(label)?;
        let api = format!("http://{}", mesh.conductor.http_addr);
        // Two seconds of the idle link first (the conductor publishes RTTs twice a second).
        let stop = CancellationToken::new();
        let idle = tokio::spawn(control_rtts(api.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        let idle = idle.await?;
        let stop = CancellationToken::new();
        let loaded = tokio::spawn(control_rtts(api, stop.clone()));
        let m = run(through).await.context(label);
        stop.cancel();
        let loaded = loaded.await?;
        mesh.stop().await;
        let mut m = m?;
        if tbf && !idle.is_empty() && !loaded.is_empty() {
            m.control_rtt = Some(ControlRtt {
                idle_p50_ms: common::percentile(&idle, 50.0),
                loaded_p50_ms: common::percentile(&loaded, 50.0),
                loaded_p99_ms: common::percentile(&loaded, 99.0),
                samples: loaded.len(),
            });
        }
        out.insert(label, m);
    }
    Ok(out)
}

fn rows(results: &BTreeMap<&'static str, Measured>) -> Vec<Vec<String>> {
    let (p, r, d) = (&results["plain"], &results["relay"], &results["direct"]);
    let mut rows = Vec::new();
    for (label, f) in [
        (
            "throughput_1 Mbit/s",
            (|m: &Measured| m.throughput_1_mbit_s) as fn(&Measured) -> f64,
        ),
        ("throughput_100 Mbit/s", |m| m.throughput_100_mbit_s),
    ] {
        rows.push(vec![
            label.to_owned(),
            format!("{:.0}", f(p)),
            format!("{:.0}", f(r)),
            format!("{:.0}", f(d)),
            format!("{:.2}", f(r) / f(p)),
            format!("{:.2}", f(d) / f(p)),
        ]);
    }
    for (label, f) in [
        (
            "rtt p50 ms",
            (|m: &Measured| m.rtt_p50_ms) as fn(&Measured) -> f64,
        ),
        ("rtt p99 ms", |m| m.rtt_p99_ms),
    ] {
        rows.push(vec![
            label.to_owned(),
            common::ms(f(p)),
            common::ms(f(r)),
            common::ms(f(d)),
            format!("+{}", common::ms(f(r) - f(p))),
            format!("+{}", common::ms(f(d) - f(p))),
        ]);
    }
    if let (Some(rc), Some(dc)) = (&r.control_rtt, &d.control_rtt) {
        rows.push(vec![
            "node control RTT idle p50 / loaded p50 / p99 ms".into(),
            "-".into(),
            format!(
                "{} / {} / {}",
                common::ms(rc.idle_p50_ms),
                common::ms(rc.loaded_p50_ms),
                common::ms(rc.loaded_p99_ms)
            ),
            format!(
                "{} / {} / {}",
                common::ms(dc.idle_p50_ms),
                common::ms(dc.loaded_p50_ms),
                common::ms(dc.loaded_p99_ms)
            ),
            String::new(),
            String::new(),
        ]);
    }
    if let (Some(pc), Some(rc), Some(dc)) = (p.cpu_s_per_gbit, r.cpu_s_per_gbit, d.cpu_s_per_gbit) {
        rows.push(vec![
            "CPU s/Gbit".into(),
            format!("{pc:.2}"),
            format!("{rc:.2}"),
            format!("{dc:.2}"),
            format!("{:.1}x", rc / pc),
            format!("{:.1}x", dc / pc),
        ]);
    }
    rows
}

async fn run() -> Result<()> {
    let quick = common::quick();
    let (bytes, pings) = if quick {
        (16 << 20, 200)
    } else {
        (256 << 20, 2000)
    };
    let headers = [
        "",
        "plain TCP",
        "relay",
        "direct",
        "relay/TCP",
        "direct/TCP",
    ];
    let loopback = link(false, bytes, pings).await.context("loopback")?;
    println!("loopback\n{}", common::table(&headers, &rows(&loopback)));
    let mut results = json!({"loopback": loopback});
    match netns::available() {
        Ok(()) => {
            // The link carries 50 Mbit/s: a smaller transfer takes as long as 1 GiB here.
            let tbf_bytes = if quick { 4 << 20 } else { 64 << 20 };
            let _bed = netns::Bed::up()?;
            let tbf = link(true, tbf_bytes, pings.min(500))
                .await
                .context("tbf link")?;
            println!(
                "tbf {} between this host and the connector's pod\n{}",
                netns::RATE,
                common::table(&headers, &rows(&tbf))
            );
            results["tbf"] = serde_json::to_value(&tbf)?;
            results["tbf_bytes"] = json!(tbf_bytes);
        }
        Err(why) => println!("tbf link: skipped ({why})"),
    }
    let path = common::write_json("tunnel", json!({"bytes": bytes, "pings": pings}), results)?;
    println!("wrote {}", path.display());
    Ok(())
}

mod netns {
    //! The connector's pod: a namespace joined to this host by a veth pair with `tbf` on both
    //! ends. Root only; the namespace is deleted when the [`Bed`] drops, also on failure.
    use super::*;

    pub const HOST_IP: &str = "10.203.0.1";
    const POD_IP: &str = "10.203.0.2";
    pub const RATE: &str = "50mbit";
    const NS: &str = "symbench-tunnel";

    use super::common::sh;

    /// Why the tbf link cannot run here, if it cannot.
    pub fn available() -> Result<(), String> {
        if std::env::var_os("BENCH_NO_NETNS").is_some() {
            return Err("BENCH_NO_NETNS set".into());
        }
        if !common::is_root() {
            return Err("needs root for ip netns + tc".into());
        }
        Ok(())
    }

    /// The namespace and the link; gone on drop.
    pub struct Bed;

    impl Bed {
        pub fn up() -> Result<Self> {
            clean();
            sh(&["ip", "netns", "add", NS])?;
            let bed = Bed;
            sh(&[
                "ip", "link", "add", "stun0", "type", "veth", "peer", "name", "stun1", "netns", NS,
            ])?;
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("{HOST_IP}/24"),
                "dev",
                "stun0",
            ])?;
            sh(&[
                "ip",
                "-n",
                NS,
                "addr",
                "add",
                &format!("{POD_IP}/24"),
                "dev",
                "stun1",
            ])?;
            sh(&["ip", "link", "set", "stun0", "up"])?;
            sh(&["ip", "-n", NS, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", NS, "link", "set", "stun1", "up"])?;
            for pre in [&["tc"][..], &["ip", "netns", "exec", NS, "tc"][..]] {
                let dev = if pre.len() == 1 { "stun0" } else { "stun1" };
                let mut args = pre.to_vec();
                args.extend([
                    "qdisc", "replace", "dev", dev, "root", "tbf", "rate", RATE, "burst", "64kb",
                    "latency", "50ms",
                ]);
                sh(&args)?;
            }
            Ok(bed)
        }
    }

    impl Drop for Bed {
        fn drop(&mut self) {
            clean();
        }
    }

    /// Kills whatever still runs in the namespace (it would keep the namespace, and so the
    /// veth pair, alive), then deletes both.
    fn clean() {
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", NS])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = sh(&["ip", "netns", "del", NS]);
        let _ = sh(&["ip", "link", "del", "stun0"]);
    }

    /// Starts the connector's node (`c`) as a `symphony` process in the pod.
    pub fn start_node(
        conductor: &Conductor,
        dir: &std::path::Path,
    ) -> Result<tokio::process::Child> {
        let d = dir.join("c");
        let files = conductor.ca.ensure_node_files("c", &d)?;
        let yaml = format!(
            "mode: node\nnode:\n  node_id: c\n  conductor_addr: {addr}\n  groups: [c]\n  \
             work_dir: {work}\n  tls: {{ ca_file: {ca}, cert_file: {cert}, key_file: {key} }}\n",
            addr = conductor.quic_addr,
            work = d.join("work").display(),
            ca = d.join("ca.pem").display(),
            cert = files.cert.display(),
            key = files.key.display(),
        );
        let cfg = d.join("node.yaml");
        std::fs::write(&cfg, yaml)?;
        let log = std::fs::File::create(d.join("node.log"))?;
        tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                NS,
                env!("CARGO_BIN_EXE_symphony"),
                "--config",
            ])
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the pod's node")
    }

    /// Runs the measurement from inside the pod.
    pub async fn measure(addr: SocketAddr, bytes: usize, pings: usize) -> Result<Measured> {
        let exe = std::env::current_exe()?;
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", NS])
            .arg(exe)
            .args([
                "--measure",
                &addr.to_string(),
                &bytes.to_string(),
                &pings.to_string(),
            ])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "measuring from the pod: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}
