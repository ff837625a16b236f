//! Bench `tunnel`: a mesh service reached through the relay (node -> conductor -> node, the
//! product's code on both nodes and in the conductor) side by side with plain TCP to the same
//! server, on loopback, in one run.
//!
//! Set-up: an in-process conductor and two in-process agents; the binder's node reaches
//! services at 127.0.0.2, the connector's node listens at 127.0.0.3 (`NodeConfig::service_ip`,
//! so two agents share one host). The bench's own server listens on 127.0.0.2:PORT and is the
//! service; a `sleep` deployment on each node binds / connects it.
//!
//! * `throughput_1`: one connection writes `bytes` and waits for the server's acknowledgement.
//! * `throughput_100`: 100 connections at once, `bytes / 100` each.
//! * `rtt`: 1-byte ping-pong on one connection, `pings` times (median and p99).
//!
//! Not measured here (needs the NAT bed and the tbf link): the direct path, the 50 Mbit/s
//! link, control p99 under a tunnel flood, conductor CPU per Gbit (everything shares one
//! process here). Run: `cargo bench --bench tunnel` (`BENCH_QUICK=1` for a smoke run).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const BINDER_IP: [u8; 4] = [127, 0, 0, 2];
const CONNECTOR_IP: [u8; 4] = [127, 0, 0, 3];

fn main() -> ExitCode {
    match common::runtime().and_then(|rt| rt.block_on(run())) {
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

async fn start_node(
    conductor: &Conductor,
    dir: &std::path::Path,
    id: &str,
    ip: [u8; 4],
    cancel: &CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let mut cfg = NodeConfig::local(&conductor.ca, conductor.quic_addr, id, &dir.join(id))?;
    cfg.groups = vec![id.to_owned()];
    cfg.service_ip = ip.into();
    cfg.keeper = symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
    Ok(tokio::spawn(symphony::node::agent::run(
        cfg,
        cancel.clone(),
    )))
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

async fn run() -> Result<()> {
    let quick = common::quick();
    let (bytes, pings) = if quick {
        (16 << 20, 200)
    } else {
        (256 << 20, 2000)
    };
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    let conductor = Conductor::start(cfg).await?;
    let cancel = CancellationToken::new();
    let _b = start_node(&conductor, dir.path(), "b", BINDER_IP, &cancel).await?;
    let _c = start_node(&conductor, dir.path(), "c", CONNECTOR_IP, &cancel).await?;

    let listener = TcpListener::bind(SocketAddr::from((BINDER_IP, 0))).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(serve(listener));
    let api = format!("http://{}", conductor.http_addr);
    let http = reqwest::Client::new();
    let sleep = json!(["sleep", "100000"]);
    deploy(
        &http,
        &api,
        "binder",
        json!({"config": {"command": sleep}, "binds": [{"bench": port}], "node_group": "b"}),
    )
    .await?;
    deploy(
        &http,
        &api,
        "connector",
        json!({"config": {"command": sleep}, "connects": ["bench"], "node_group": "c"}),
    )
    .await?;
    let plain = SocketAddr::from((BINDER_IP, port));
    let relay = SocketAddr::from((CONNECTOR_IP, port));
    // The connector's node listens once the conductor has sent it the route.
    let waited = Instant::now();
    while TcpStream::connect(relay).await.is_err() {
        anyhow::ensure!(
            waited.elapsed() < DEADLINE,
            "the connector's node never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut results = BTreeMap::new();
    let mut rows = Vec::new();
    for (label, conns) in [("throughput_1", 1), ("throughput_100", 100)] {
        let tcp = throughput(plain, bytes, conns).await.context("plain")?;
        let mesh = throughput(relay, bytes, conns).await.context("relay")?;
        results.insert(
            label,
            json!({"plain_tcp_mbit_s": tcp, "relay_mbit_s": mesh, "relay_vs_tcp": mesh / tcp}),
        );
        rows.push(vec![
            label.to_owned(),
            format!("{tcp:.0} Mbit/s"),
            format!("{mesh:.0} Mbit/s"),
            format!("{:.2}", mesh / tcp),
        ]);
    }
    let tcp = rtts(plain, pings).await?;
    let mesh = rtts(relay, pings).await?;
    let (tm, mm) = (
        common::percentile(&tcp, 50.0),
        common::percentile(&mesh, 50.0),
    );
    let (t99, m99) = (
        common::percentile(&tcp, 99.0),
        common::percentile(&mesh, 99.0),
    );
    results.insert("rtt", json!({"plain_tcp_ms": {"p50": tm, "p99": t99}, "relay_ms": {"p50": mm, "p99": m99}, "added_p50_ms": mm - tm}));
    rows.push(vec![
        "rtt p50".into(),
        format!("{} ms", common::ms(tm)),
        format!("{} ms", common::ms(mm)),
        format!("+{} ms", common::ms(mm - tm)),
    ]);
    rows.push(vec![
        "rtt p99".into(),
        format!("{} ms", common::ms(t99)),
        format!("{} ms", common::ms(m99)),
        format!("+{} ms", common::ms(m99 - t99)),
    ]);
    println!(
        "{}",
        common::table(&["", "plain TCP", "relay", "relay/TCP"], &rows)
    );
    let path = common::write_json(
        "tunnel",
        json!({"bytes": bytes, "pings": pings, "link": "loopback"}),
        serde_json::to_value(results)?,
    )?;
    println!("wrote {}", path.display());
    cancel.cancel();
    conductor.shutdown().await;
    Ok(())
}
