//! Bench `control_under_flood`: control round-trip latency while log sources flood, QUIC
//! (`symphony-net` sessions: control bi-stream at priority 100, one log uni stream per source at
//! priority 0) side by side with the baseline the original used: the same protobuf frames over
//! ONE TLS-over-TCP connection, where a writer task multiplexes control and log frames with
//! strict control priority in its queue (the best case for a single stream, e.g. gRPC on one
//! HTTP/2 stream).
//!
//! The node sends a `NodeMessage::Result` control frame every 2 ms; the conductor echoes it on the
//! control stream; the round trip is measured from just before the node's send call to the echo's
//! arrival (time blocked in the send is included). Flood sources write `LogBatch` frames as fast
//! as they can; the conductor decodes them all. Run: `cargo bench --bench control_under_flood`
//! (`BENCH_QUICK=1` for a smoke run). As root, the same comparison also runs through a
//! 50 Mbit/s `tbf` link between two network namespaces (10.201.0.0/24) that the bench creates and
//! always deletes; otherwise that part is skipped with a printed reason.

mod common;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use prost::Message;
use serde_json::{Value, json};
use symphony::wire::{LogBatch, LogEntry, LogHeader, NodeMessage};
use symphony_net::frame::encode_frame;
use symphony_net::{
    Client, ClientConfig, Control, FrameReader, FrameWriter, Server, StreamKind, TlsMaterial,
    TransportSettings,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use common::{Pki, Summary};

/// Largest frame on any stream (the transport default).
const MAX_FRAME: usize = 1024 * 1024;

/// The baseline's single-stream envelope: one frame type, either a control message or a log frame
/// (what a `oneof` on one gRPC stream carries).
#[derive(Clone, PartialEq, prost::Message)]
struct Mux {
    #[prost(message, optional, tag = "1")]
    control: Option<NodeMessage>,
    #[prost(message, optional, tag = "2")]
    log_header: Option<LogHeader>,
    #[prost(message, optional, tag = "3")]
    log: Option<LogBatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Quic,
    /// QUIC with the node's adaptive log pacing (`symphony_net::Pacer`).
    QuicPaced,
    /// QUIC where the flood is mesh tunnel streams (raw bytes at tunnel priority, taking the
    /// pacer's tokens as the node's tunnels do) instead of log streams.
    QuicTunnel,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::QuicPaced => "quic+paced",
            Self::QuicTunnel => "quic+tunnel",
            Self::Tcp => "tcp+tls",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "quic" => Ok(Self::Quic),
            "quic-paced" | "quic+paced" => Ok(Self::QuicPaced),
            "quic-tunnel" | "quic+tunnel" => Ok(Self::QuicTunnel),
            "tcp" | "tcp+tls" => Ok(Self::Tcp),
            other => bail!("unknown transport {other}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Params {
    round_trips: usize,
    interval: Duration,
    levels: Vec<usize>,
    warmup: Duration,
    entries_per_batch: usize,
    line_len: usize,
}

impl Params {
    fn from_env() -> Self {
        let quick = common::quick();
        Self {
            round_trips: if quick { 250 } else { 1000 },
            interval: Duration::from_millis(2),
            levels: vec![0, 1, 8, 16],
            warmup: Duration::from_millis(if quick { 200 } else { 500 }),
            entries_per_batch: 64,
            line_len: 120,
        }
    }

    fn json(&self) -> Value {
        json!({
            "round_trips": self.round_trips,
            "interval_ms": self.interval.as_secs_f64() * 1e3,
            "flood_levels": self.levels,
            "warmup_ms": self.warmup.as_millis() as u64,
            "log_batch_entries": self.entries_per_batch,
            "log_line_bytes": self.line_len,
            "log_frame_bytes": self.batch().encoded_len() + 4,
            "control_frame_bytes": common::result_msg(1).encoded_len() + 4,
            "quic_settings": "TransportSettings::default() (stream window 256 KiB, send window derived, keep-alive 5 s)",
            "tcp_baseline": "one TLS 1.3 connection (tokio-rustls, TCP_NODELAY), writer task with strict control priority, log queue 4 frames",
        })
    }

    fn batch(&self) -> LogBatch {
        let line: String = std::iter::repeat_n('x', self.line_len).collect();
        LogBatch {
            entries: (0..self.entries_per_batch)
                .map(|i| LogEntry {
                    seq: i as u64,
                    timestamp_unix_ms: 1_764_000_000_000,
                    stream: "stdout".into(),
                    line: line.clone(),
                })
                .collect(),
            dropped: 0,
            ..LogBatch::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conductor side

/// A running conductor: its address, the log bytes it decoded, and its tasks (dropped = stopped).
struct ServerSide {
    addr: SocketAddr,
    drained: Arc<AtomicU64>,
    _tasks: JoinSet<()>,
}

/// QUIC conductor: echoes control frames, drains every log stream (one reader per stream).
async fn quic_server(listen: SocketAddr, tls: &TlsMaterial) -> Result<ServerSide> {
    let mut server = Server::bind(listen, tls, TransportSettings::default())?;
    let addr = server.local_addr()?;
    let drained = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let counter = drained.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        while let Some(acc) = server.accept().await {
            let Control { mut tx, mut rx } = acc.control;
            conns.spawn(async move {
                while let Ok(Some(m)) = rx.recv::<NodeMessage>().await {
                    if tx.send(&m).await.is_err() {
                        break;
                    }
                }
            });
            let session = acc.session;
            {
                let (session, counter) = (session.clone(), counter.clone());
                conns.spawn(async move {
                    let mut readers = JoinSet::new();
                    while let Ok(mut t) = session.accept_tunnel().await {
                        let counter = counter.clone();
                        readers.spawn(async move {
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(Some(n)) = t.recv.read(&mut buf).await {
                                counter.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        });
                    }
                });
            }
            let counter = counter.clone();
            conns.spawn(async move {
                let mut readers = JoinSet::new();
                while let Ok((kind, mut rx)) = session.accept_uni().await {
                    if kind != StreamKind::Log {
                        continue;
                    }
                    let counter = counter.clone();
                    readers.spawn(async move {
                        if !matches!(rx.recv::<LogHeader>().await, Ok(Some(_))) {
                            return;
                        }
                        while let Ok(Some(b)) = rx.recv::<LogBatch>().await {
                            counter.fetch_add(b.encoded_len() as u64 + 4, Ordering::Relaxed);
                        }
                    });
                }
            });
        }
    });
    Ok(ServerSide {
        addr,
        drained,
        _tasks: tasks,
    })
}

/// Baseline conductor: one TLS stream per connection; control frames are echoed (by a writer
/// task), log frames decoded and counted.
async fn tcp_server(listen: SocketAddr, tls: &TlsMaterial) -> Result<ServerSide> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(common::tcp_server_config(tls)?);
    let drained = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let counter = drained.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((sock, _)) = listener.accept().await {
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            conns.spawn(async move {
                let Ok(stream) = acceptor.accept(sock).await else {
                    return;
                };
                let (r, w) = tokio::io::split(stream);
                let (echo_tx, mut echo_rx) = mpsc::unbounded_channel::<NodeMessage>();
                let writer = tokio::spawn(async move {
                    let mut w = FrameWriter::new(w, MAX_FRAME);
                    while let Some(m) = echo_rx.recv().await {
                        let frame = Mux {
                            control: Some(m),
                            ..Mux::default()
                        };
                        if w.send(&frame).await.is_err() || w.get_mut().flush().await.is_err() {
                            break;
                        }
                    }
                });
                let mut r = FrameReader::new(r, MAX_FRAME);
                while let Ok(Some(m)) = r.recv::<Mux>().await {
                    if let Some(c) = m.control {
                        if echo_tx.send(c).is_err() {
                            break;
                        }
                    } else if let Some(b) = m.log {
                        counter.fetch_add(b.encoded_len() as u64 + 4, Ordering::Relaxed);
                    }
                }
                writer.abort();
            });
        }
    });
    Ok(ServerSide {
        addr,
        drained,
        _tasks: tasks,
    })
}

// ---------------------------------------------------------------------------------------------
// Node side

trait Pinger {
    async fn ping(&mut self, seq: u64) -> Result<()>;
}

trait Echoes {
    async fn next_echo(&mut self) -> Result<Option<u64>>;
}

struct QuicPinger(FrameWriter<quinn::SendStream>);
impl Pinger for QuicPinger {
    async fn ping(&mut self, seq: u64) -> Result<()> {
        self.0.send(&common::result_msg(seq)).await?;
        Ok(())
    }
}

struct QuicEchoes(FrameReader<quinn::RecvStream>);
impl Echoes for QuicEchoes {
    async fn next_echo(&mut self) -> Result<Option<u64>> {
        Ok(self
            .0
            .recv::<NodeMessage>()
            .await?
            .as_ref()
            .and_then(common::seq_of))
    }
}

struct TcpPinger(mpsc::UnboundedSender<Bytes>);
impl Pinger for TcpPinger {
    async fn ping(&mut self, seq: u64) -> Result<()> {
        let mut buf = BytesMut::new();
        let frame = Mux {
            control: Some(common::result_msg(seq)),
            ..Mux::default()
        };
        encode_frame(&frame, MAX_FRAME, &mut buf)?;
        self.0
            .send(buf.freeze())
            .map_err(|_| anyhow!("writer gone"))
    }
}

struct TcpEchoes<R>(FrameReader<R>);
impl<R: tokio::io::AsyncRead + Unpin> Echoes for TcpEchoes<R> {
    async fn next_echo(&mut self) -> Result<Option<u64>> {
        Ok(self
            .0
            .recv::<Mux>()
            .await?
            .and_then(|m| m.control)
            .as_ref()
            .and_then(common::seq_of))
    }
}

/// What one measured run produced.
#[derive(Debug, Clone)]
struct RunResult {
    transport: Transport,
    level: usize,
    rtt: Summary,
    sent: usize,
    echoed: usize,
    window_s: f64,
    window_start_us: i64,
    window_end_us: i64,
    log_bytes: Option<u64>,
}

impl RunResult {
    fn mb_s(&self) -> Option<f64> {
        self.log_bytes.map(|b| b as f64 / 1e6 / self.window_s)
    }

    fn json(&self) -> Value {
        json!({
            "transport": self.transport.name(),
            "flood_sources": self.level,
            "rtt": self.rtt.json(),
            "sent": self.sent,
            "echoed": self.echoed,
            "window_s": self.window_s,
            "window_start_unix_us": self.window_start_us,
            "window_end_unix_us": self.window_end_us,
            "log_bytes": self.log_bytes,
            "log_mb_per_s": self.mb_s(),
        })
    }
}

/// Sends `round_trips` pings every `interval` and collects the echoes.
async fn ping_loop(
    p: &Params,
    tx: &mut impl Pinger,
    rx: &mut impl Echoes,
) -> (Vec<Duration>, usize, usize) {
    let sends: RefCell<Vec<Instant>> = RefCell::new(Vec::with_capacity(p.round_trips));
    let recvd: RefCell<Vec<(u64, Instant)>> = RefCell::new(Vec::with_capacity(p.round_trips));
    let sender = async {
        let mut tick = tokio::time::interval(p.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for seq in 0..p.round_trips as u64 {
            tick.tick().await;
            sends.borrow_mut().push(Instant::now());
            if tx.ping(seq).await.is_err() {
                sends.borrow_mut().pop();
                break;
            }
        }
    };
    let receiver = async {
        loop {
            match rx.next_echo().await {
                Ok(Some(seq)) => recvd.borrow_mut().push((seq, Instant::now())),
                _ => break,
            }
            // Count against the target, not against `sends`: the last echo can arrive before
            // the sender's final `ping` call has returned.
            if recvd.borrow().len() >= p.round_trips {
                break;
            }
        }
    };
    let budget = p.interval * p.round_trips as u32 * 4 + Duration::from_secs(10);
    let _ = tokio::time::timeout(budget, async { tokio::join!(sender, receiver) }).await;
    let sends = sends.into_inner();
    let recvd = recvd.into_inner();
    let rtts = recvd
        .iter()
        .filter_map(|(seq, at)| {
            let sent = sends.get(usize::try_from(*seq).ok()?)?;
            Some(at.duration_since(*sent))
        })
        .collect();
    (rtts, sends.len(), recvd.len())
}

/// Waits until the flood is flowing (some MB drained or a deadline), then the warm-up.
async fn wait_flowing(drained: Option<&AtomicU64>, level: usize, warmup: Duration) {
    if level > 0
        && let Some(d) = drained
    {
        let deadline = Instant::now() + Duration::from_secs(3);
        while d.load(Ordering::Relaxed) < 4 << 20 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(warmup).await;
}

async fn measured(
    transport: Transport,
    level: usize,
    p: &Params,
    drained: Option<&AtomicU64>,
    tx: &mut impl Pinger,
    rx: &mut impl Echoes,
) -> RunResult {
    wait_flowing(drained, level, p.warmup).await;
    let b0 = drained.map(|d| d.load(Ordering::Relaxed));
    let (t0, w0) = (Instant::now(), common::unix_us());
    let (rtts, sent, echoed) = ping_loop(p, tx, rx).await;
    let (t1, w1) = (Instant::now(), common::unix_us());
    let b1 = drained.map(|d| d.load(Ordering::Relaxed));
    RunResult {
        transport,
        level,
        rtt: Summary::of(&rtts),
        sent,
        echoed,
        window_s: t1.duration_since(t0).as_secs_f64(),
        window_start_us: w0,
        window_end_us: w1,
        log_bytes: b0.zip(b1).map(|(a, b)| b.saturating_sub(a)),
    }
}

/// QUIC node: connects, starts `level` flood sources, measures.
async fn quic_client(
    addr: SocketAddr,
    bind: SocketAddr,
    tls: TlsMaterial,
    level: usize,
    p: &Params,
    drained: Option<&AtomicU64>,
    transport: Transport,
) -> Result<RunResult> {
    // Tunnel floods take the pacer's tokens, as the node's tunnels do.
    let paced = matches!(transport, Transport::QuicPaced | Transport::QuicTunnel);
    let tunnel_floods = if transport == Transport::QuicTunnel {
        level
    } else {
        0
    };
    let mut cfg = ClientConfig::new(addr.to_string(), tls);
    cfg.server_name = Some("localhost".into());
    cfg.bind = bind;
    let client = Client::new(cfg)?;
    let (session, control) = client.connect().await?;
    let Control { tx, rx } = control;
    let (mut tx, mut rx) = (QuicPinger(tx), QuicEchoes(rx));
    // The conductor only sees the control stream once something is written on it.
    tx.ping(u64::MAX).await?;
    let stop = CancellationToken::new();
    let mut floods = JoinSet::new();
    let batch = p.batch();
    // BENCH_PACER_TARGET_MS tries another queueing-delay target (default: the transport's).
    let mut pacer_cfg = symphony_net::PacerConfig::default();
    if let Some(ms) = std::env::var("BENCH_PACER_TARGET_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        pacer_cfg.target_delay = Duration::from_millis(ms);
    }
    let pacer = paced.then(|| symphony_net::Pacer::new(session.connection().clone(), pacer_cfg));
    // The pacer adapts until the connection closes; it is not one of the floods.
    let pacer_task = pacer.clone().map(|p| tokio::spawn(p.run()));
    let batch_len = batch.encoded_len() + 4;
    for _ in 0..tunnel_floods {
        let mut t = session.open_tunnel().await?;
        let (stop, pacer) = (stop.clone(), pacer.clone());
        floods.spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if let Some(pacer) = &pacer {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = pacer.acquire(chunk.len()) => {}
                    }
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    r = t.send.write_all(&chunk) => if r.is_err() { break },
                }
            }
        });
    }
    for i in 0..level - tunnel_floods {
        let mut log = session.open_uni(StreamKind::Log).await?;
        log.send(&LogHeader {
            deployment_id: format!("dep-{i}"),
        })
        .await?;
        let (stop, batch, pacer) = (stop.clone(), batch.clone(), pacer.clone());
        floods.spawn(async move {
            loop {
                if let Some(pacer) = &pacer {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = pacer.acquire(batch_len) => {}
                    }
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    r = log.send(&batch) => if r.is_err() { break },
                }
            }
        });
    }
    // Skip the echo of the opening ping.
    let _ = rx.next_echo().await?;
    let res = measured(transport, level, p, drained, &mut tx, &mut rx).await;
    stop.cancel();
    while floods.join_next().await.is_some() {}
    if let Some(t) = pacer_task {
        t.abort();
    }
    session.close(symphony_net::CloseCode::Shutdown, "bench done");
    Ok(res)
}

/// Baseline node: one TLS stream; a writer task serves the control queue first, then the log
/// queue (4 frames, shared by all sources).
async fn tcp_client(
    addr: SocketAddr,
    bind: SocketAddr,
    tls: TlsMaterial,
    level: usize,
    p: &Params,
    drained: Option<&AtomicU64>,
) -> Result<RunResult> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(bind)?;
    let sock = socket.connect(addr).await?;
    sock.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(common::tcp_client_config(&tls)?);
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let stream = connector.connect(name, sock).await?;
    let (r, w) = tokio::io::split(stream);
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Bytes>();
    let (log_tx, mut log_rx) = mpsc::channel::<Bytes>(4);
    let writer = tokio::spawn(async move {
        let mut w = w;
        loop {
            let frame = tokio::select! {
                biased;
                Some(f) = ctl_rx.recv() => f,
                Some(f) = log_rx.recv() => f,
                else => break,
            };
            if w.write_all(&frame).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
    });
    let mut tx = TcpPinger(ctl_tx);
    let mut rx = TcpEchoes(FrameReader::new(r, MAX_FRAME));
    tx.ping(u64::MAX).await?;
    let stop = CancellationToken::new();
    let mut floods = JoinSet::new();
    let batch = p.batch();
    for i in 0..level {
        let (stop, batch, log_tx) = (stop.clone(), batch.clone(), log_tx.clone());
        floods.spawn(async move {
            let mut buf = BytesMut::new();
            let header = Mux {
                log_header: Some(LogHeader {
                    deployment_id: format!("dep-{i}"),
                }),
                ..Mux::default()
            };
            if encode_frame(&header, MAX_FRAME, &mut buf).is_err()
                || log_tx.send(buf.split().freeze()).await.is_err()
            {
                return;
            }
            let frame = Mux {
                log: Some(batch),
                ..Mux::default()
            };
            loop {
                // Each source encodes its own frames, as each QUIC source does.
                if encode_frame(&frame, MAX_FRAME, &mut buf).is_err() {
                    break;
                }
                let bytes = buf.split().freeze();
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    r = log_tx.send(bytes) => if r.is_err() { break },
                }
            }
        });
    }
    drop(log_tx);
    let _ = rx.next_echo().await?;
    let res = measured(Transport::Tcp, level, p, drained, &mut tx, &mut rx).await;
    stop.cancel();
    while floods.join_next().await.is_some() {}
    writer.abort();
    Ok(res)
}

async fn run_one(transport: Transport, level: usize, p: &Params, pki: &Pki) -> Result<RunResult> {
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let tls = pki.node_tls(&format!("bench-node-{level}"))?;
    match transport {
        Transport::Quic | Transport::QuicPaced | Transport::QuicTunnel => {
            let srv = quic_server(listen, &pki.server_tls()).await?;
            let drained = Some(&*srv.drained);
            quic_client(srv.addr, listen, tls, level, p, drained, transport).await
        }
        Transport::Tcp => {
            let srv = tcp_server(listen, &pki.server_tls()).await?;
            tcp_client(srv.addr, listen, tls, level, p, Some(&srv.drained)).await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn report(title: &str, p: &Params, results: &[RunResult]) -> (String, Value) {
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for &level in &p.levels {
        let find = |t| {
            results
                .iter()
                .find(|r| r.transport == t && r.level == level)
        };
        let (Some(q), Some(t)) = (find(Transport::Quic), find(Transport::Tcp)) else {
            continue;
        };
        let paced = find(Transport::QuicPaced);
        let ratio = t.rtt.p99_ms / q.rtt.p99_ms;
        let mbs = |r: &RunResult| r.mb_s().map_or("-".into(), |v| format!("{v:.1}"));
        rows.push(vec![
            level.to_string(),
            common::ms(q.rtt.p50_ms),
            common::ms(q.rtt.p99_ms),
            common::ms(q.rtt.max_ms),
            mbs(q),
            common::ms(t.rtt.p50_ms),
            common::ms(t.rtt.p99_ms),
            common::ms(t.rtt.max_ms),
            mbs(t),
            format!("{ratio:.1}x"),
            paced.map_or("-".into(), |r| common::ms(r.rtt.p50_ms)),
            paced.map_or("-".into(), |r| common::ms(r.rtt.p99_ms)),
            paced.map_or("-".into(), mbs),
            format!("{}/{}", q.echoed, t.echoed),
        ]);
        ratios.push(json!({
            "flood_sources": level,
            "baseline_p99_over_quic_p99": ratio,
            "baseline_max_over_quic_max": t.rtt.max_ms / q.rtt.max_ms,
            "baseline_p99_over_paced_p99": paced.map(|r| t.rtt.p99_ms / r.rtt.p99_ms),
        }));
    }
    let table = common::table(
        &[
            "sources",
            "quic p50",
            "quic p99",
            "quic max",
            "quic MB/s",
            "tcp p50",
            "tcp p99",
            "tcp max",
            "tcp MB/s",
            "p99 ratio",
            "paced p50",
            "paced p99",
            "paced MB/s",
            "echoed q/t",
        ],
        &rows,
    );
    (
        format!("{title} (control round trip, ms)\n{table}"),
        json!({
            "runs": results.iter().map(RunResult::json).collect::<Vec<_>>(),
            "ratios": ratios,
        }),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let res = match args.first().map(String::as_str) {
        Some("--netns-server") => netns::server_child(&args[1..]),
        Some("--netns-client") => netns::client_child(&args[1..]),
        _ => real_main(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control_under_flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let p = Params::from_env();
    let rt = common::runtime()?;
    let pki = Pki::new(&[netns::SERVER_IP])?;
    let mut results = Vec::new();
    // BENCH_ONLY_NETNS=1 skips the loopback part (tuning runs on the tbf link).
    let levels = if std::env::var_os("BENCH_ONLY_NETNS").is_some() {
        Vec::new()
    } else {
        p.levels.clone()
    };
    for &level in &levels {
        for transport in [
            Transport::Quic,
            Transport::QuicPaced,
            Transport::QuicTunnel,
            Transport::Tcp,
        ] {
            let r = rt
                .block_on(run_one(transport, level, &p, &pki))
                .with_context(|| format!("{} with {level} sources", transport.name()))?;
            eprintln!(
                "  loopback {:>7} sources={:<2} p50={} p99={} max={} ms  {} MB/s  echoed {}/{}",
                transport.name(),
                level,
                common::ms(r.rtt.p50_ms),
                common::ms(r.rtt.p99_ms),
                common::ms(r.rtt.max_ms),
                r.mb_s().map_or("-".into(), |v| format!("{v:.1}")),
                r.echoed,
                r.sent
            );
            results.push(r);
        }
    }
    drop(rt);
    let (text, loopback) = report("loopback 127.0.0.1", &p, &results);
    println!("\n{text}\n");

    let tbf = match netns::run(&p, &pki) {
        Ok(Some(results)) => {
            let (text, v) = report(
                &format!("tbf {} between two netns", netns::RATE),
                &p,
                &results,
            );
            println!("{text}\n");
            v
        }
        Ok(None) => Value::Null,
        Err(e) => {
            println!("tbf link: failed: {e:#}\n");
            json!({"error": format!("{e:#}")})
        }
    };
    let path = common::write_json(
        "control_under_flood",
        p.json(),
        json!({"loopback": loopback, "tbf": tbf}),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

mod netns {
    //! The rate-limited link: two namespaces joined by a veth pair, `tbf` on the node's egress
    //! (the flood direction) and on the conductor's egress. Root only; the namespaces are always
    //! deleted, also when a step fails.
    use super::*;

    pub const SERVER_IP: &str = "10.201.0.1";
    pub const CLIENT_IP: &str = "10.201.0.2";
    pub const RATE: &str = "50mbit";
    const NS_SERVER: &str = "symbench-srv";
    const NS_CLIENT: &str = "symbench-cli";

    use super::common::sh;

    fn teardown() {
        for ns in [NS_SERVER, NS_CLIENT] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }

    fn setup() -> Result<()> {
        teardown();
        sh(&["ip", "netns", "add", NS_SERVER])?;
        sh(&["ip", "netns", "add", NS_CLIENT])?;
        sh(&[
            "ip", "link", "add", "sb0", "netns", NS_CLIENT, "type", "veth", "peer", "name", "sb1",
            "netns", NS_SERVER,
        ])?;
        sh(&[
            "ip",
            "-n",
            NS_CLIENT,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "sb0",
        ])?;
        sh(&[
            "ip",
            "-n",
            NS_SERVER,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "sb1",
        ])?;
        for (ns, dev) in [(NS_CLIENT, "sb0"), (NS_SERVER, "sb1")] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", RATE, "burst", "64kb", "latency", "50ms",
            ])?;
        }
        Ok(())
    }

    /// Runs every transport and level through the link; `None` (with a printed reason) when
    /// not root or `ip`/`tc` are missing.
    pub fn run(p: &Params, pki: &Pki) -> Result<Option<Vec<RunResult>>> {
        if !common::is_root() {
            println!("tbf link: skipped (needs root for ip netns + tc)\n");
            return Ok(None);
        }
        if std::env::var("BENCH_NO_NETNS").is_ok() {
            println!("tbf link: skipped (BENCH_NO_NETNS set)\n");
            return Ok(None);
        }
        if let Err(e) = setup() {
            teardown();
            println!("tbf link: skipped ({e:#})\n");
            return Ok(None);
        }
        let res = run_all(p, pki);
        teardown();
        res.map(Some)
    }

    fn run_all(p: &Params, pki: &Pki) -> Result<Vec<RunResult>> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, m: &TlsMaterial| -> Result<()> {
            std::fs::write(dir.path().join(format!("{name}.ca")), &m.ca_pem)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), &m.cert_pem)?;
            std::fs::write(dir.path().join(format!("{name}.key")), &m.key_pem)?;
            Ok(())
        };
        write("server", &pki.server_tls())?;
        write("node", &pki.node_tls("tbf-node")?)?;
        let exe = std::env::current_exe()?;
        let exe = exe.to_string_lossy().into_owned();
        let dir_s = dir.path().to_string_lossy().into_owned();
        let mut results = Vec::new();
        // The smoke run keeps the link part short: no flood and the heaviest flood.
        let levels: Vec<usize> = if common::quick() {
            vec![0, 16]
        } else {
            p.levels.clone()
        };
        for &level in &levels {
            for transport in [
                Transport::Quic,
                Transport::QuicPaced,
                Transport::QuicTunnel,
                Transport::Tcp,
            ] {
                let t = match transport {
                    Transport::Quic => "quic",
                    Transport::QuicPaced => "quic-paced",
                    Transport::QuicTunnel => "quic-tunnel",
                    Transport::Tcp => "tcp",
                };
                let r = one(&exe, t, &dir_s, level, p)
                    .with_context(|| format!("tbf {t} with {level} sources"))?;
                eprintln!(
                    "  tbf {:>7} sources={:<2} p50={} p99={} max={} ms  {} MB/s  echoed {}/{}",
                    transport.name(),
                    level,
                    common::ms(r.rtt.p50_ms),
                    common::ms(r.rtt.p99_ms),
                    common::ms(r.rtt.max_ms),
                    r.mb_s().map_or("-".into(), |v| format!("{v:.2}")),
                    r.echoed,
                    r.sent
                );
                results.push(r);
            }
        }
        Ok(results)
    }

    /// One run: the conductor child prints `<unix_us> <drained>` samples every 50 ms; the node
    /// child prints its result as one JSON line; the log rate is taken from the samples that
    /// bracket the node's window.
    fn one(exe: &str, t: &str, dir: &str, level: usize, p: &Params) -> Result<RunResult> {
        use std::io::BufRead;
        let listen = format!("{SERVER_IP}:47400");
        let mut server = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                NS_SERVER,
                exe,
                "--netns-server",
                t,
                &listen,
                dir,
            ])
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        let stdout = server.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let samples = Arc::new(std::sync::Mutex::new(Vec::<(i64, u64)>::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let samples = samples.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "ready" {
                        let _ = ready_tx.send(());
                        continue;
                    }
                    let mut it = line.split_whitespace();
                    if let (Some(Ok(at)), Some(Ok(b))) = (
                        it.next().map(str::parse::<i64>),
                        it.next().map(str::parse::<u64>),
                    ) && let Ok(mut s) = samples.lock()
                    {
                        s.push((at, b));
                    }
                }
            })
        };
        let result = (|| -> Result<RunResult> {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("conductor child did not start")?;
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    NS_CLIENT,
                    exe,
                    "--netns-client",
                    t,
                    &listen,
                    dir,
                    &level.to_string(),
                ])
                .env("BENCH_ROUND_TRIPS", p.round_trips.to_string())
                .output()?;
            if !out.status.success() {
                bail!(
                    "node child: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let v: Value = serde_json::from_slice(&out.stdout).context("node child output")?;
            let get = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let (w0, w1) = (
                v.get("w0").and_then(Value::as_i64).unwrap_or(0),
                v.get("w1").and_then(Value::as_i64).unwrap_or(0),
            );
            // Let the conductor print a sample past the window.
            std::thread::sleep(Duration::from_millis(120));
            let s = samples.lock().map_err(|_| anyhow!("poisoned"))?.clone();
            let at_or_before = |w: i64| s.iter().rev().find(|(at, _)| *at <= w).copied();
            let at_or_after = |w: i64| s.iter().find(|(at, _)| *at >= w).copied();
            let (log_bytes, window_s) = match (at_or_after(w0), at_or_before(w1)) {
                (Some((a0, b0)), Some((a1, b1))) if a1 > a0 => {
                    (Some(b1.saturating_sub(b0)), (a1 - a0) as f64 / 1e6)
                }
                _ => (None, (w1 - w0) as f64 / 1e6),
            };
            Ok(RunResult {
                transport: Transport::parse(t)?,
                level,
                rtt: Summary {
                    n: get("n") as usize,
                    p50_ms: get("p50_ms"),
                    p99_ms: get("p99_ms"),
                    max_ms: get("max_ms"),
                },
                sent: get("sent") as usize,
                echoed: get("echoed") as usize,
                window_s,
                window_start_us: w0,
                window_end_us: w1,
                log_bytes,
            })
        })();
        drop(server.stdin.take());
        let _ = server.kill();
        let _ = server.wait();
        let _ = reader.join();
        result
    }

    fn material(dir: &str, name: &str) -> Result<TlsMaterial> {
        let d = std::path::Path::new(dir);
        Ok(TlsMaterial::from_files(
            &d.join(format!("{name}.ca")),
            &d.join(format!("{name}.pem")),
            &d.join(format!("{name}.key")),
        )?)
    }

    /// `--netns-server <quic|tcp> <listen> <pki dir>`: serves until stdin closes.
    pub fn server_child(args: &[String]) -> Result<()> {
        let [t, listen, dir, ..] = args else {
            bail!("usage: --netns-server <quic|tcp> <listen> <dir>")
        };
        let transport = Transport::parse(t)?;
        let listen: SocketAddr = listen.parse()?;
        let tls = material(dir, "server")?;
        let rt = common::runtime()?;
        rt.block_on(async move {
            let srv = match transport {
                Transport::Quic | Transport::QuicPaced | Transport::QuicTunnel => {
                    quic_server(listen, &tls).await?
                }
                Transport::Tcp => tcp_server(listen, &tls).await?,
            };
            println!("ready");
            let stdin_closed = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
            });
            tokio::pin!(stdin_closed);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = &mut stdin_closed => break,
                    _ = tick.tick() => {
                        println!("{} {}", common::unix_us(), srv.drained.load(Ordering::Relaxed));
                    }
                }
            }
            Ok(())
        })
    }

    /// `--netns-client <quic|tcp> <server> <pki dir> <level>`: one measured run, JSON on stdout.
    pub fn client_child(args: &[String]) -> Result<()> {
        let [t, server, dir, level, ..] = args else {
            bail!("usage: --netns-client <quic|tcp> <server> <dir> <level>")
        };
        let transport = Transport::parse(t)?;
        let server: SocketAddr = server.parse()?;
        let level: usize = level.parse()?;
        let mut p = Params::from_env();
        if let Some(n) = std::env::var("BENCH_ROUND_TRIPS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            p.round_trips = n;
        }
        let tls = material(dir, "node")?;
        let bind: SocketAddr = format!("{CLIENT_IP}:0").parse()?;
        let rt = common::runtime()?;
        let r = rt.block_on(async {
            match transport {
                Transport::Quic | Transport::QuicPaced | Transport::QuicTunnel => {
                    quic_client(server, bind, tls, level, &p, None, transport).await
                }
                Transport::Tcp => tcp_client(server, bind, tls, level, &p, None).await,
            }
        })?;
        println!(
            "{}",
            json!({
                "n": r.rtt.n, "p50_ms": r.rtt.p50_ms, "p99_ms": r.rtt.p99_ms, "max_ms": r.rtt.max_ms,
                "sent": r.sent, "echoed": r.echoed, "w0": r.window_start_us, "w1": r.window_end_us,
            })
        );
        Ok(())
    }
}
