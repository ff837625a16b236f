//! A userspace UDP impairment proxy for tests and benchmarks: loss, delay, blackhole, and
//! NAT rebinding (a new source port towards the server mid-connection).
//!
//! The kernel here has no `netem`, so delay and loss come from this proxy. It relays between
//! one downstream peer (the node; the latest sender is remembered) and one upstream address
//! (the conductor). Delay is applied FIFO per direction, so it never reorders packets. A rate
//! limit with a bounded queue makes a bottleneck like `tbf` (the queue is where a log flood
//! delays control messages), without root.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Current impairments; change them at any time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    /// Probability in 0..=1 that a packet is dropped (each direction).
    pub loss: f64,
    /// One-way delay added in each direction.
    pub delay: Duration,
    /// Drop everything.
    pub blackhole: bool,
    /// Bottleneck rate in bytes per second in each direction (0 = unlimited), like `tbf`.
    pub rate: u64,
    /// Longest a packet may wait in the bottleneck queue before it is dropped (tail drop),
    /// like `tbf latency`; only with `rate`.
    pub queue_limit: Duration,
}

/// Packet counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Packets relayed.
    pub forwarded: AtomicU64,
    /// Packets dropped (loss or blackhole).
    pub dropped: AtomicU64,
}

/// The running proxy. Dropping it stops it.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    impairment: Arc<Mutex<Impairment>>,
    up: watch::Sender<Arc<UdpSocket>>,
    stats: Arc<ProxyStats>,
    _tasks: JoinSet<()>,
}

impl UdpProxy {
    /// Listens on `127.0.0.1:0` and relays to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let down = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = down.local_addr()?;
        let up_sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let (up, up_rx) = watch::channel(up_sock);
        let impairment = Arc::new(Mutex::new(Impairment::default()));
        let stats = Arc::new(ProxyStats::default());
        let peer: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut tasks = JoinSet::new();

        // Each direction: a receiver that applies loss and stamps a due time, and a FIFO sender.
        let up_link = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let down_link = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let (to_up_tx, to_up_rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let (to_down_tx, to_down_rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();

        {
            let (down, impairment, stats, peer, link) = (
                down.clone(),
                impairment.clone(),
                stats.clone(),
                peer.clone(),
                up_link.clone(),
            );
            tasks.spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = down.recv_from(&mut buf).await {
                    if let Ok(mut p) = peer.lock() {
                        *p = Some(from);
                    }
                    if let Some(due) = admit(&impairment, &stats, &link, n) {
                        let _ = to_up_tx.send((due, buf[..n].to_vec()));
                    }
                }
            });
        }
        {
            let mut up_rx = up_rx.clone();
            tasks.spawn(async move {
                let mut rx = to_up_rx;
                while let Some((due, pkt)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    let sock = up_rx.borrow_and_update().clone();
                    let _ = sock.send_to(&pkt, upstream).await;
                }
            });
        }
        {
            let (impairment, stats, link) = (impairment.clone(), stats.clone(), down_link.clone());
            let mut up_rx = up_rx;
            tasks.spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut sock = up_rx.borrow_and_update().clone();
                loop {
                    tokio::select! {
                        changed = up_rx.changed() => {
                            if changed.is_err() { return; }
                            // The old mapping is gone: packets to the old port are lost.
                            sock = up_rx.borrow_and_update().clone();
                        }
                        r = sock.recv_from(&mut buf) => {
                            let Ok((n, _)) = r else { return };
                            if let Some(due) = admit(&impairment, &stats, &link, n) {
                                let _ = to_down_tx.send((due, buf[..n].to_vec()));
                            }
                        }
                    }
                }
            });
        }
        {
            let down = down.clone();
            tasks.spawn(async move {
                let mut rx = to_down_rx;
                while let Some((due, pkt)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    let to = peer.lock().ok().and_then(|p| *p);
                    if let Some(to) = to {
                        let _ = down.send_to(&pkt, to).await;
                    }
                }
            });
        }
        Ok(Self {
            addr,
            impairment,
            up,
            stats,
            _tasks: tasks,
        })
    }

    /// Where the node should send (the proxy's downstream address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces all impairments.
    pub fn set(&self, imp: Impairment) {
        if let Ok(mut i) = self.impairment.lock() {
            *i = imp;
        }
    }

    /// Sets the loss probability.
    pub fn set_loss(&self, loss: f64) {
        if let Ok(mut i) = self.impairment.lock() {
            i.loss = loss;
        }
    }

    /// Sets the one-way delay.
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut i) = self.impairment.lock() {
            i.delay = delay;
        }
    }

    /// Sets a bottleneck: `rate` bytes/s per direction, packets queued at most `queue_limit`.
    pub fn set_rate(&self, rate: u64, queue_limit: Duration) {
        if let Ok(mut i) = self.impairment.lock() {
            i.rate = rate;
            i.queue_limit = queue_limit;
        }
    }

    /// Drops everything while on.
    pub fn set_blackhole(&self, on: bool) {
        if let Ok(mut i) = self.impairment.lock() {
            i.blackhole = on;
        }
    }

    /// NAT rebinding: later packets reach the server from a new source port, and replies to the
    /// old port are lost. Returns the new upstream-facing address.
    pub async fn rebind(&self) -> std::io::Result<SocketAddr> {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = sock.local_addr()?;
        self.up.send_replace(sock);
        Ok(addr)
    }

    /// The upstream-facing (source) address the server currently sees.
    pub fn source_addr(&self) -> std::io::Result<SocketAddr> {
        self.up.borrow().local_addr()
    }

    /// Counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

fn admit(
    impairment: &Mutex<Impairment>,
    stats: &ProxyStats,
    link: &Mutex<tokio::time::Instant>,
    len: usize,
) -> Option<tokio::time::Instant> {
    let imp = impairment.lock().map(|i| *i).unwrap_or_default();
    if imp.blackhole || (imp.loss > 0.0 && rand::random::<f64>() < imp.loss) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let now = tokio::time::Instant::now();
    let mut due = now;
    if imp.rate > 0 {
        let Ok(mut free_at) = link.lock() else {
            return None;
        };
        let start = (*free_at).max(now);
        if start.duration_since(now) > imp.queue_limit {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *free_at = start + Duration::from_secs_f64(len as f64 / imp.rate as f64);
        due = *free_at;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    Some(due + imp.delay)
}
