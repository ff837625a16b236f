//! Control latency under a log flood through a narrow link, with and without adaptive log
//! pacing. The link is the userspace impairment proxy's bottleneck (rate + bounded queue, like
//! `tbf rate 50mbit latency 50ms`), so this runs without root.
//!
//! `cargo bench --bench pacing` (BENCH_QUICK=1 for a short run). Prints a table and writes
//! `target/bench/pacing.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use symphony_net::impair::UdpProxy;
use symphony_net::{
    CertificateAuthority, Client, ClientConfig, Pacer, PacerConfig, Server, StreamKind,
    TlsMaterial, TransportSettings, Validity,
};
use tokio::time::Instant;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

struct Row {
    case: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    goodput_mbit: f64,
    pings: usize,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn run_case(
    case: &'static str,
    flood: bool,
    paced: bool,
    rate_bps: u64,
    pings: usize,
) -> Row {
    let ca = CertificateAuthority::generate(Validity::days(1)).unwrap();
    let server_pair = ca.issue_server(&[], Validity::days(1)).unwrap();
    let node_pair = ca.issue_node("bench", Validity::days(1)).unwrap();
    let settings = TransportSettings::default();
    let srv_tls = TlsMaterial {
        ca_pem: ca.cert_pem().into(),
        cert_pem: server_pair.cert_pem,
        key_pem: server_pair.key_pem,
    };
    let mut server =
        Server::bind("127.0.0.1:0".parse().unwrap(), &srv_tls, settings.clone()).unwrap();
    let proxy = UdpProxy::start(server.local_addr().unwrap()).await.unwrap();
    proxy.set_rate(rate_bps / 8, Duration::from_millis(50));
    let node_tls = TlsMaterial {
        ca_pem: ca.cert_pem().into(),
        cert_pem: node_pair.cert_pem,
        key_pem: node_pair.key_pem,
    };
    let mut cfg = ClientConfig::new(proxy.addr().to_string(), node_tls);
    cfg.server_name = Some("localhost".into());
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    let client = Client::new(cfg).unwrap();
    let (session, mut control) = client.connect().await.unwrap();
    control
        .tx
        .send(&Msg {
            seq: 0,
            payload: vec![],
        })
        .await
        .unwrap();
    let mut acc = server.accept().await.unwrap();
    let _: Msg = acc.control.rx.recv().await.unwrap().unwrap();

    // Conductor side: echo control, drain logs.
    let drained = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (sess, drained) = (acc.session.clone(), drained.clone());
        tasks.spawn(async move {
            let mut readers = tokio::task::JoinSet::new();
            while let Ok((_, mut rx)) = sess.accept_uni().await {
                let drained = drained.clone();
                readers.spawn(async move {
                    while let Ok(Some(m)) = rx.recv::<Msg>().await {
                        drained.fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        });
    }
    let mut ctl = acc.control;
    tasks.spawn(async move {
        while let Ok(Some(m)) = ctl.rx.recv::<Msg>().await {
            if ctl.tx.send(&m).await.is_err() {
                break;
            }
        }
    });
    // Node side: 8 flooding log streams.
    let pacer = Pacer::new(session.connection().clone(), PacerConfig::default());
    if paced {
        tasks.spawn(pacer.clone().run());
    }
    if flood {
        for _ in 0..8 {
            let mut tx = session.open_uni(StreamKind::Log).await.unwrap();
            let pacer = paced.then(|| pacer.clone());
            tasks.spawn(async move {
                let chunk = Msg {
                    seq: 0,
                    payload: vec![b'x'; 16 * 1024],
                };
                loop {
                    if let Some(p) = &pacer {
                        p.acquire(16 * 1024).await;
                    }
                    if tx.send(&chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
        // Let the flood (and the pacer) settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let start_bytes = drained.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut rtts = Vec::with_capacity(pings);
    for seq in 1..=pings as u64 {
        let t = Instant::now();
        control
            .tx
            .send(&Msg {
                seq,
                payload: vec![0; 64],
            })
            .await
            .unwrap();
        let echo: Msg = control.rx.recv().await.unwrap().unwrap();
        assert_eq!(echo.seq, seq);
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let goodput_mbit = (drained.load(Ordering::Relaxed) - start_bytes) as f64 * 8.0 / secs / 1e6;
    rtts.sort_by(f64::total_cmp);
    tasks.abort_all();
    session.close(symphony_net::CloseCode::Shutdown, "done");
    Row {
        case,
        p50_ms: pct(&rtts, 0.5),
        p99_ms: pct(&rtts, 0.99),
        max_ms: *rtts.last().unwrap_or(&f64::NAN),
        goodput_mbit,
        pings,
    }
}

fn main() {
    let quick = common::quick();
    let pings = if quick { 100 } else { 500 };
    let rate = 50_000_000;
    let rt = common::runtime().unwrap();
    let rows = rt.block_on(async {
        vec![
            run_case("idle (no flood)", false, false, rate, pings).await,
            run_case("8 log streams, unpaced", true, false, rate, pings).await,
            run_case("8 log streams, paced", true, true, rate, pings).await,
        ]
    });
    println!(
        "control round trip through a 50 Mbit/s bottleneck (userspace, 50 ms queue), {pings} pings every 10 ms"
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>14}",
        "case", "p50 ms", "p99 ms", "max ms", "logs Mbit/s"
    );
    for r in &rows {
        println!(
            "{:<26} {:>9.2} {:>9.2} {:>9.2} {:>14.1}",
            r.case, r.p50_ms, r.p99_ms, r.max_ms, r.goodput_mbit
        );
    }
    if rows[2].p99_ms > 0.0 {
        println!(
            "p99 unpaced / paced: {:.1}x",
            rows[1].p99_ms / rows[2].p99_ms
        );
    }
    let results = rows
        .iter()
        .map(|r| serde_json::json!({"case": r.case, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms, "logs_mbit_s": r.goodput_mbit, "pings": r.pings}))
        .collect::<Vec<_>>();
    let parameters = serde_json::json!({"rate_bit_s": rate, "queue_ms": 50, "log_streams": 8, "pings": pings, "interval_ms": 10});
    if let Err(e) = common::write_json("pacing", parameters, results.into()) {
        eprintln!("pacing: {e:#}");
    }
}
