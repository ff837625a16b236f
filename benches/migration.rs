//! Bench `migration`: what a node's control messages (one every 2 ms) suffer when its path
//! changes mid-connection, on loopback.
//!
//! * `nat-rebind`: the node reaches the conductor through `symphony_net::impair::UdpProxy`,
//!   which switches to a new upstream source port (`UdpProxy::rebind`); replies to the old port
//!   are lost. QUIC path migration should carry the connection over.
//! * `local-rebind`: the node moves its own endpoint to a new local port (`Client::rebind`).
//! * Baseline `tcp+tls`: the same frames over one TLS-over-TCP connection through a userspace TCP
//!   proxy that "rebinds" by resetting both sides (RST, the fastest possible failure signal); the
//!   node reconnects at once (TCP + TLS 1.3 handshake, resumption on) and carries on. Frames
//!   written into the dead connection are lost; frames produced while reconnecting wait in the
//!   node's queue.
//!
//! * `re-dial`: how long a node's reconnect takes (QUIC handshake + control stream) with a
//!   full handshake (a new endpoint, no session ticket) and with TLS resumption (the same
//!   endpoint re-dialling after its connection closed), side by side.
//!
//! Measured at the conductor: messages lost (sent but never received), duplicates, the longest
//! gap between consecutive received messages, and for QUIC when the conductor saw the new address;
//! for the baseline the outage (event to the first message received on the new connection).
//! Run: `cargo bench --bench migration` (`BENCH_QUICK=1` for a smoke run).

mod common;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use symphony::wire::NodeMessage;
use symphony_net::impair::UdpProxy;
use symphony_net::{
    Client, ClientConfig, ClientEvent, Control, FrameReader, FrameWriter, Server, TlsMaterial,
    TransportSettings,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use common::Pki;

const MAX_FRAME: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    NatRebind,
    LocalRebind,
    TcpBaseline,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::NatRebind => "quic nat-rebind",
            Self::LocalRebind => "quic local-rebind",
            Self::TcpBaseline => "tcp+tls proxy reset",
        }
    }
}

#[derive(Debug, Clone)]
struct Params {
    trials: usize,
    messages: u64,
    event_at: u64,
    interval: Duration,
}

impl Params {
    fn from_env() -> Self {
        if common::quick() {
            Self {
                trials: 2,
                messages: 500,
                event_at: 200,
                interval: Duration::from_millis(2),
            }
        } else {
            Self {
                trials: 5,
                messages: 1000,
                event_at: 400,
                interval: Duration::from_millis(2),
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "trials_per_scenario": self.trials,
            "messages_per_trial": self.messages,
            "event_at_message": self.event_at,
            "interval_ms": self.interval.as_secs_f64() * 1e3,
            "quic_settings": "TransportSettings::default(); node uses Client::run (reconnect loop + path monitor)",
            "tcp_baseline": "TLS 1.3 over TCP via a userspace proxy; event = proxy resets both sides (SO_LINGER 0); node reconnects immediately",
        })
    }
}

/// One trial's outcome.
#[derive(Debug, Clone, Default)]
struct Trial {
    sent: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    longest_gap_ms: f64,
    /// The gap that spans the event (last message before it to the first after it).
    event_gap_ms: f64,
    /// p99 of the gaps outside the event (the 2 ms cadence plus scheduling noise).
    steady_gap_p99_ms: f64,
    /// QUIC: event to the conductor seeing the new peer address.
    path_seen_ms: Option<f64>,
    /// Baseline: event to the first message received on the new connection.
    outage_ms: Option<f64>,
    reconnects: u64,
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "sent": self.sent, "received": self.received, "lost": self.lost,
            "duplicates": self.duplicates, "longest_gap_ms": self.longest_gap_ms,
            "event_gap_ms": self.event_gap_ms,
            "steady_gap_p99_ms": self.steady_gap_p99_ms, "path_seen_ms": self.path_seen_ms,
            "outage_ms": self.outage_ms, "reconnects": self.reconnects,
        })
    }
}

/// Turns the conductor's receive log into a trial.
fn analyse(
    sent: u64,
    recv: &[(u64, Instant, u64)],
    event: Instant,
    path_seen: Option<Instant>,
    reconnects: u64,
) -> Trial {
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for (seq, _, _) in recv {
        if !seen.insert(*seq) {
            dups += 1;
        }
    }
    let mut gaps = Vec::new();
    let mut longest = Duration::ZERO;
    let mut event_gap = Duration::ZERO;
    for w in recv.windows(2) {
        let g = w[1].1.duration_since(w[0].1);
        longest = longest.max(g);
        // Gaps that do not span the event describe the steady state.
        if w[0].1 <= event && w[1].1 >= event {
            event_gap = g;
        } else {
            gaps.push(g);
        }
    }
    let first_conn = recv.first().map_or(0, |r| r.2);
    let outage = recv
        .iter()
        .find(|(_, at, conn)| *conn != first_conn && *at >= event)
        .map(|(_, at, _)| at.duration_since(event).as_secs_f64() * 1e3);
    Trial {
        sent,
        received: seen.len() as u64,
        lost: sent.saturating_sub(seen.len() as u64),
        duplicates: dups,
        longest_gap_ms: longest.as_secs_f64() * 1e3,
        event_gap_ms: event_gap.as_secs_f64() * 1e3,
        steady_gap_p99_ms: common::Summary::of(&gaps).p99_ms,
        path_seen_ms: path_seen.map(|t| t.saturating_duration_since(event).as_secs_f64() * 1e3),
        outage_ms: outage,
        reconnects,
    }
}

/// Collects `(seq, at, connection number)` until `sent` distinct messages arrived or the grace
/// period after the last send ran out.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant, u64)>,
    sent: u64,
    grace: Duration,
) -> Vec<(u64, Instant, u64)> {
    let mut out = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + grace;
    while (distinct.len() as u64) < sent {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => {
                distinct.insert(r.0);
                out.push(r);
            }
            _ => break,
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// QUIC

async fn quic_trial(scenario: Scenario, p: &Params, pki: &Pki, n: usize) -> Result<Trial> {
    let mut server = Server::bind(
        "127.0.0.1:0".parse()?,
        &pki.server_tls(),
        TransportSettings::default(),
    )?;
    let server_addr = server.local_addr()?;
    let proxy = if scenario == Scenario::NatRebind {
        Some(UdpProxy::start(server_addr).await?)
    } else {
        None
    };
    let target = proxy.as_ref().map_or(server_addr, UdpProxy::addr);
    let mut cfg = ClientConfig::new(target.to_string(), pki.node_tls(&format!("mig-{n}"))?);
    cfg.server_name = Some("localhost".into());
    cfg.bind = "127.0.0.1:0".parse()?;
    let client = Arc::new(Client::new(cfg)?);
    let cancel = CancellationToken::new();
    let (mut events, _task) = client.clone().run(cancel.clone());
    let Some(ClientEvent::Connected { session, control }) = events.recv().await else {
        return Err(anyhow!("node did not connect"));
    };
    let Control { mut tx, rx: _rx } = control;
    tx.send(&common::result_msg(u64::MAX)).await?;
    let acc = server
        .accept()
        .await
        .ok_or_else(|| anyhow!("no connection"))?;
    let Control { rx: mut srv_rx, .. } = acc.control;
    let (log_tx, mut log_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        while let Ok(Some(m)) = srv_rx.recv::<NodeMessage>().await {
            if let Some(seq) = common::seq_of(&m).filter(|s| *s != u64::MAX) {
                let _ = log_tx.send((seq, Instant::now(), 0));
            }
        }
    });
    // The conductor notices a migration by polling; poll every millisecond here.
    let (seen_tx, seen_rx) = watch::channel(None::<Instant>);
    let srv_session = acc.session.clone();
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if srv_session.observe_path() {
                seen_tx.send_replace(Some(Instant::now()));
                return;
            }
        }
    });

    let mut tick = tokio::time::interval(p.interval);
    let mut event = Instant::now();
    let mut sent = 0;
    for seq in 0..p.messages {
        tick.tick().await;
        if seq == p.event_at {
            event = Instant::now();
            match (&proxy, scenario) {
                (Some(proxy), Scenario::NatRebind) => {
                    proxy.rebind().await?;
                }
                _ => client.rebind("127.0.0.1:0".parse()?)?,
            }
        }
        if tx.send(&common::result_msg(seq)).await.is_err() {
            break;
        }
        sent += 1;
    }
    let recv = collect(&mut log_rx, sent, Duration::from_secs(3)).await;
    let path_seen = *seen_rx.borrow();
    let trial = analyse(sent, &recv, event, path_seen, client.reconnects());
    cancel.cancel();
    session.close(symphony_net::CloseCode::Shutdown, "bench done");
    Ok(trial)
}

// ---------------------------------------------------------------------------------------------
// TCP baseline

/// A userspace TCP relay; `reset()` kills every relayed connection with RST on both sides.
struct TcpProxy {
    addr: SocketAddr,
    generation: watch::Sender<u64>,
    _task: JoinSet<()>,
}

impl TcpProxy {
    async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, gen_rx) = watch::channel(0u64);
        let mut task = JoinSet::new();
        task.spawn(async move {
            let mut pipes = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let mut gen_rx = gen_rx.clone();
                gen_rx.borrow_and_update();
                pipes.spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (mut down, mut up) = (down, up);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = gen_rx.changed() => {
                            // Reset, do not close gracefully: what a NAT that lost its state
                            // makes the peers see once they send.
                            let _ = down.set_zero_linger();
                            let _ = up.set_zero_linger();
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            generation,
            _task: task,
        })
    }

    fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Baseline conductor: logs `(seq, at, connection number)` of every frame on every connection.
async fn tcp_conductor(
    tls: &TlsMaterial,
    log: mpsc::UnboundedSender<(u64, Instant, u64)>,
) -> Result<(SocketAddr, JoinSet<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(common::tcp_server_config(tls)?);
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        let mut conn_no = 0u64;
        while let Ok((sock, _)) = listener.accept().await {
            let _ = sock.set_nodelay(true);
            let (acceptor, log) = (acceptor.clone(), log.clone());
            conn_no += 1;
            let this = conn_no;
            conns.spawn(async move {
                let Ok(stream) = acceptor.accept(sock).await else {
                    return;
                };
                let mut r = FrameReader::new(stream, MAX_FRAME);
                while let Ok(Some(m)) = r.recv::<NodeMessage>().await {
                    if let Some(seq) = common::seq_of(&m).filter(|s| *s != u64::MAX) {
                        let _ = log.send((seq, Instant::now(), this));
                    }
                }
            });
        }
    });
    Ok((addr, tasks))
}

/// Baseline node: takes messages from `queue` and writes them to the current connection;
/// when the connection dies (read or write error) it reconnects at once (then 250 ms, 500 ms...)
/// and goes on with the next queued message. Returns how many writes were accepted.
async fn tcp_node(
    target: SocketAddr,
    tls: TlsMaterial,
    mut queue: mpsc::UnboundedReceiver<u64>,
    reconnects: Arc<std::sync::atomic::AtomicU64>,
) -> Result<u64> {
    let connector = tokio_rustls::TlsConnector::from(common::tcp_client_config(&tls)?);
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut written = 0u64;
    let mut first = true;
    'outer: loop {
        let mut delay = Duration::ZERO;
        let stream = loop {
            tokio::time::sleep(delay).await;
            let attempt = async {
                let sock = tokio::net::TcpStream::connect(target).await?;
                sock.set_nodelay(true)?;
                connector.connect(name.clone(), sock).await
            };
            match attempt.await {
                Ok(s) => break s,
                Err(_) => {
                    delay = if delay.is_zero() {
                        Duration::from_millis(250)
                    } else {
                        (delay * 2).min(Duration::from_secs(30))
                    }
                }
            }
        };
        if !first {
            reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        first = false;
        let (mut r, w) = tokio::io::split(stream);
        let mut w = FrameWriter::new(w, MAX_FRAME);
        w.send(&common::result_msg(u64::MAX)).await?;
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                // The conductor never writes: any read result means the connection is gone.
                _ = r.read(&mut byte) => continue 'outer,
                next = queue.recv() => {
                    let Some(seq) = next else { break 'outer };
                    let ok = w.send(&common::result_msg(seq)).await.is_ok() && w.get_mut().flush().await.is_ok();
                    if !ok {
                        continue 'outer;
                    }
                    written += 1;
                }
            }
        }
    }
    Ok(written)
}

async fn tcp_trial(p: &Params, pki: &Pki, n: usize) -> Result<Trial> {
    let (log_tx, mut log_rx) = mpsc::unbounded_channel();
    let (conductor, _tasks) = tcp_conductor(&pki.server_tls(), log_tx).await?;
    let proxy = TcpProxy::start(conductor).await?;
    let (q_tx, q_rx) = mpsc::unbounded_channel();
    let reconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let node = tokio::spawn(tcp_node(
        proxy.addr,
        pki.node_tls(&format!("tcp-{n}"))?,
        q_rx,
        reconnects.clone(),
    ));
    let mut tick = tokio::time::interval(p.interval);
    let mut event = Instant::now();
    for seq in 0..p.messages {
        tick.tick().await;
        if seq == p.event_at {
            event = Instant::now();
            proxy.reset();
        }
        q_tx.send(seq).map_err(|_| anyhow!("node task ended"))?;
    }
    drop(q_tx);
    // The node ends once its queue is drained; then everything it wrote is on the wire.
    let written = tokio::time::timeout(Duration::from_secs(10), node)
        .await
        .context("node task hung")???;
    let recv = collect(&mut log_rx, written, Duration::from_millis(500)).await;
    let mut t = analyse(
        p.messages,
        &recv,
        event,
        None,
        reconnects.load(std::sync::atomic::Ordering::Relaxed),
    );
    // Lost = written into a connection that died before delivering them.
    t.sent = written;
    t.lost = written.saturating_sub(t.received);
    Ok(t)
}

// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    common::percentile(&v, 50.0)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migration: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let p = Params::from_env();
    let rt = common::runtime()?;
    let pki = Pki::new(&[])?;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut n = 0;
    for scenario in [
        Scenario::NatRebind,
        Scenario::LocalRebind,
        Scenario::TcpBaseline,
    ] {
        let mut trials = Vec::new();
        for _ in 0..p.trials {
            n += 1;
            let t = rt
                .block_on(async {
                    match scenario {
                        Scenario::TcpBaseline => tcp_trial(&p, &pki, n).await,
                        _ => quic_trial(scenario, &p, &pki, n).await,
                    }
                })
                .with_context(|| scenario.name())?;
            eprintln!(
                "  {:<20} lost={} dup={} event gap={:.2} ms longest gap={:.2} ms path seen={} outage={} reconnects={}",
                scenario.name(),
                t.lost,
                t.duplicates,
                t.event_gap_ms,
                t.longest_gap_ms,
                t.path_seen_ms.map_or("-".into(), |v| format!("{v:.1} ms")),
                t.outage_ms.map_or("-".into(), |v| format!("{v:.1} ms")),
                t.reconnects
            );
            trials.push(t);
        }
        let gaps: Vec<f64> = trials.iter().map(|t| t.longest_gap_ms).collect();
        let opt = |f: fn(&Trial) -> Option<f64>| {
            let v: Vec<f64> = trials.iter().filter_map(f).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                common::ms(median(v))
            }
        };
        rows.push(vec![
            scenario.name().to_owned(),
            trials.len().to_string(),
            trials.iter().map(|t| t.sent).sum::<u64>().to_string(),
            trials.iter().map(|t| t.lost).sum::<u64>().to_string(),
            trials.iter().map(|t| t.duplicates).sum::<u64>().to_string(),
            common::ms(median(trials.iter().map(|t| t.event_gap_ms).collect())),
            common::ms(median(gaps.clone())),
            common::ms(gaps.iter().copied().fold(0.0, f64::max)),
            common::ms(median(trials.iter().map(|t| t.steady_gap_p99_ms).collect())),
            opt(|t| t.path_seen_ms),
            opt(|t| t.outage_ms),
            trials.iter().map(|t| t.reconnects).sum::<u64>().to_string(),
        ]);
        results.push(json!({
            "scenario": scenario.name(),
            "trials": trials.iter().map(Trial::json).collect::<Vec<_>>(),
            "lost_total": trials.iter().map(|t| t.lost).sum::<u64>(),
            "longest_gap_ms_median": median(gaps.clone()),
            "longest_gap_ms_max": gaps.iter().copied().fold(0.0, f64::max),
        }));
    }
    let table = common::table(
        &[
            "scenario",
            "trials",
            "sent",
            "lost",
            "dup",
            "event gap",
            "gap med",
            "gap max",
            "steady p99",
            "path seen",
            "outage",
            "reconnects",
        ],
        &rows,
    );
    println!(
        "\nmigration on loopback: control message every {} ms (times in ms, medians over trials; event gap = interval at the conductor spanning the event; gap med/max = longest interval per trial, anywhere)\n{table}\n",
        p.interval.as_millis()
    );
    let redial = rt.block_on(redial_handshakes(
        &pki,
        if common::quick() { 20 } else { 200 },
    ))?;
    let path = common::write_json(
        "migration",
        p.json(),
        json!({ "scenarios": results, "redial": redial }),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Re-dial cost: `n` connects with a full handshake (a fresh `Client`, so no ticket) and `n`
/// with resumption (one `Client` re-dialling), alternating so both see the same machine noise.
async fn redial_handshakes(pki: &Pki, n: usize) -> Result<Value> {
    use std::sync::atomic::Ordering;
    let mut server = Server::bind(
        "127.0.0.1:0".parse()?,
        &pki.server_tls(),
        TransportSettings::default(),
    )?;
    let addr = server.local_addr()?;
    let node = pki.node_tls("redial")?;
    let cfg = || {
        let mut cfg = ClientConfig::new(addr.to_string(), node.clone());
        cfg.server_name = Some("localhost".into());
        cfg.bind = "127.0.0.1:0".parse::<SocketAddr>()?;
        anyhow::Ok(cfg)
    };
    // One connect: handshake, control stream opened and seen by the conductor.
    async fn dial(client: &Client, server: &mut Server) -> Result<Duration> {
        let t0 = Instant::now();
        let (session, mut control) = client.connect().await?;
        control.tx.send(&common::result_msg(0)).await?;
        let acc = server
            .accept()
            .await
            .ok_or_else(|| anyhow!("no connection"))?;
        let took = t0.elapsed();
        acc.session.close(symphony_net::CloseCode::Shutdown, "next");
        session.closed().await;
        Ok(took)
    }
    let resuming = Client::new(cfg()?)?;
    dial(&resuming, &mut server).await?; // the first dial gets the ticket
    let before = server.stats().resumed_handshakes.load(Ordering::Relaxed);
    let (mut full, mut resumed) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        full.push(dial(&Client::new(cfg()?)?, &mut server).await?);
        resumed.push(dial(&resuming, &mut server).await?);
    }
    let resumed_count = server.stats().resumed_handshakes.load(Ordering::Relaxed) - before;
    let (f, r) = (common::Summary::of(&full), common::Summary::of(&resumed));
    let table = common::table(
        &["re-dial", "n", "p50", "p99", "max", "resumed"],
        &[
            vec![
                "full handshake".into(),
                f.n.to_string(),
                common::ms(f.p50_ms),
                common::ms(f.p99_ms),
                common::ms(f.max_ms),
                "-".into(),
            ],
            vec![
                "resumed (same endpoint)".into(),
                r.n.to_string(),
                common::ms(r.p50_ms),
                common::ms(r.p99_ms),
                common::ms(r.max_ms),
                resumed_count.to_string(),
            ],
        ],
    );
    println!(
        "re-dial on loopback: connect to control stream seen by the conductor (ms); full / resumed p50 = {:.2}x\n{table}\n",
        f.p50_ms / r.p50_ms
    );
    Ok(json!({
        "full": f.json(),
        "resumed": r.json(),
        "resumed_handshakes": resumed_count,
        "p50_ratio_full_over_resumed": f.p50_ms / r.p50_ms,
    }))
}
