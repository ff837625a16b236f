//! Direct connections with other nodes: the mesh's direct path.
//!
//! The conductor names the peers this node may hold a direct connection with (with its
//! routes) and runs the hole punch (see `conductor::paths`): on `Punch { dial: false }` this
//! node sends one low-TTL packet to the peer's reflexive address from its QUIC socket and
//! answers PUNCHED; on `Punch { dial: true }` it dials the peer from the same endpoint (so
//! the same NAT mapping), expecting the peer's node certificate. The other side accepts the
//! handshake only from a node the conductor named. A live connection carries tunnel streams
//! both ways exactly like the conductor's: the tunnels look here first ([`PeerMap`]).
//!
//! Invariants: at most one live connection per peer (a newer one replaces it); every live
//! connection is with a named peer (others are refused, or closed when the conductor stops
//! naming them); each connection's end is reported (DOWN), so the conductor falls back to
//! the relay. Direct connections outlive the connection to the conductor: tunnels between
//! nodes keep working while the conductor is away.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use symphony_net::{Client, CloseCode, Pacer, PacerConfig, Session};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::wire;
use crate::wire::peer_path::State;

/// How long a direct handshake may take (both ways) before the relay is kept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a live connection reports its RTT.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Direct handshakes served at once (each costs a key exchange and a signature).
const MAX_HANDSHAKES: usize = 16;

/// One live direct connection.
#[derive(Debug, Clone)]
struct Direct {
    session: Session,
    pacer: Pacer,
    /// The attempt it answers (reports carry it; a new Punch for a live peer updates it).
    nonce: Arc<AtomicU64>,
}

/// The live direct connections by peer node id, shared with the tunnels.
#[derive(Debug, Clone, Default)]
pub struct PeerMap(Arc<Mutex<HashMap<String, Direct>>>);

impl PeerMap {
    /// The live connection with `node` and its pacer, if there is one.
    pub fn get(&self, node: &str) -> Option<(Session, Pacer)> {
        let map = self.0.lock().ok()?;
        map.get(node)
            .filter(|d| !d.session.is_closed())
            .map(|d| (d.session.clone(), d.pacer.clone()))
    }

    /// Datagrams received so far on the live connections.
    fn received(&self) -> u64 {
        self.0.lock().map_or(0, |map| {
            map.values()
                .map(|d| d.session.connection().stats().udp_rx.datagrams)
                .sum()
        })
    }

    fn entry(&self, node: &str) -> Option<Direct> {
        let map = self.0.lock().ok()?;
        map.get(node).filter(|d| !d.session.is_closed()).cloned()
    }
}

/// What the connection tasks share.
#[derive(Debug)]
struct Inner {
    client: Arc<Client>,
    live: PeerMap,
    /// Peers the conductor named.
    allowed: Mutex<BTreeSet<String>>,
    /// The latest attempt per peer and the peer's address (an accepted connection answers
    /// it, and must come from that address).
    pending: Mutex<HashMap<String, (u64, SocketAddr)>>,
    /// Peers being dialled now (one dial per peer at a time), with the latest attempt's
    /// nonce (the dial's outcome answers that one).
    dialing: Mutex<HashMap<String, u64>>,
    handshakes: Arc<tokio::sync::Semaphore>,
    reports: mpsc::UnboundedSender<wire::PeerPath>,
    /// Ports bound on this node, and where services listen (for tunnels from peers).
    local: Arc<Mutex<BTreeSet<u16>>>,
    ip: IpAddr,
    cancel: CancellationToken,
}

/// The node's direct connections.
#[derive(Debug)]
pub struct Peers {
    inner: Arc<Inner>,
}

impl Peers {
    /// Starts accepting direct connections on `client`'s endpoint (from named peers only).
    /// Reports for the conductor go to `reports`.
    pub fn new(
        client: Arc<Client>,
        live: PeerMap,
        local: Arc<Mutex<BTreeSet<u16>>>,
        ip: IpAddr,
        reports: mpsc::UnboundedSender<wire::PeerPath>,
    ) -> Self {
        let inner = Arc::new(Inner {
            client,
            live,
            allowed: Mutex::default(),
            pending: Mutex::default(),
            dialing: Mutex::default(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            reports,
            local,
            ip,
            cancel: CancellationToken::new(),
        });
        let live = inner.live.clone();
        inner
            .client
            .set_peer_activity(Arc::new(move || live.received()));
        tokio::spawn(accept_loop(inner.clone()));
        Self { inner }
    }

    /// The peers the conductor names now: connections with others are closed.
    pub fn set_allowed(&self, peers: Vec<String>) {
        // Lock order: `allowed`, then `live` (as in `register`), so a connection being
        // registered for a peer removed here cannot slip in after the pruning.
        let Ok(mut allowed) = self.inner.allowed.lock() else {
            return;
        };
        *allowed = peers.into_iter().collect();
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.retain(|peer, _| allowed.contains(peer));
        }
        if let Ok(mut map) = self.inner.live.0.lock() {
            map.retain(|peer, d| {
                let keep = allowed.contains(peer);
                if !keep {
                    d.session.close(CloseCode::Shutdown, "no longer a peer");
                }
                keep
            });
        }
    }

    /// Takes part in attempt `p` (see the module docs).
    pub fn punch(&self, p: wire::Punch) {
        let inner = &self.inner;
        let Ok(addr) = p.peer_addr.parse::<SocketAddr>() else {
            inner.report(
                &p.peer_id,
                p.nonce,
                State::Down,
                0,
                "bad peer address".into(),
            );
            return;
        };
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Some(d) = inner.live.entry(&p.peer_id) {
            // Already connected (e.g. the conductor restarted): this attempt is answered.
            d.nonce.store(p.nonce, Ordering::Relaxed);
            inner.report_up(&p.peer_id, &d);
            return;
        }
        if let Ok(mut pending) = inner.pending.lock() {
            pending.insert(p.peer_id.clone(), (p.nonce, addr));
        }
        if let Err(e) = inner.client.punch(addr) {
            inner.report(&p.peer_id, p.nonce, State::Down, 0, format!("punch: {e}"));
            return;
        }
        if !p.dial {
            inner.report(&p.peer_id, p.nonce, State::Punched, 0, String::new());
            return;
        }
        let first = inner
            .dialing
            .lock()
            .is_ok_and(|mut d| d.insert(p.peer_id.clone(), p.nonce).is_none());
        if !first {
            // A dial of this peer is under way; its outcome answers this attempt.
            return;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let dialled = inner.client.dial_peer(addr, &p.peer_id, DIAL_TIMEOUT).await;
            let nonce = inner
                .dialing
                .lock()
                .ok()
                .and_then(|mut d| d.remove(&p.peer_id))
                .unwrap_or(p.nonce);
            match dialled {
                Ok(session) => register(&inner, p.peer_id, session, nonce),
                Err(e) => {
                    tracing::info!(peer = %p.peer_id, %addr, error = %e, "no direct path; the relay carries on");
                    inner.report(&p.peer_id, nonce, State::Down, 0, e.to_string());
                }
            }
        });
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
        if let Ok(map) = self.inner.live.0.lock() {
            for d in map.values() {
                d.session.close(CloseCode::Shutdown, "node shutting down");
            }
        }
    }
}

impl Inner {
    fn report(&self, peer: &str, nonce: u64, state: State, rtt_us: u64, reason: String) {
        let _ = self.reports.send(wire::PeerPath {
            peer_id: peer.to_owned(),
            nonce,
            state: state as i32,
            rtt_us,
            reason,
        });
    }

    fn report_up(&self, peer: &str, d: &Direct) {
        let rtt = u64::try_from(d.session.connection().rtt().as_micros()).unwrap_or(u64::MAX);
        self.report(
            peer,
            d.nonce.load(Ordering::Relaxed),
            State::Up,
            rtt,
            String::new(),
        );
    }

    fn allowed(&self, peer: &str) -> bool {
        self.allowed.lock().is_ok_and(|a| a.contains(peer))
    }
}

/// Accepts direct handshakes from named peers until the node shuts down.
async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            () = inner.cancel.cancelled() => return,
            i = inner.client.accept_peer() => match i {
                Some(i) => i,
                None => return,
            },
        };
        // Only from an address a punch named (the peer's reflexive address), and a bounded
        // number at once: anyone can send an Initial to this socket.
        let from = incoming.remote();
        let from_ip = from.ip().to_canonical();
        let expected = inner
            .pending
            .lock()
            .is_ok_and(|p| p.values().any(|(_, a)| a.ip() == from_ip));
        if !expected {
            // Peers are expected from the address the conductor saw them at (a NAT that
            // picks another public IP per destination defeats this; the relay carries on).
            tracing::debug!(%from, "ignoring a direct handshake from an address no punch named");
            incoming.ignore();
            continue;
        }
        let Ok(slot) = inner.handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match incoming.handshake(DIAL_TIMEOUT).await {
                Ok((peer, session)) if inner.allowed(&peer) => {
                    let nonce = inner
                        .pending
                        .lock()
                        .ok()
                        .and_then(|p| p.get(&peer).map(|(n, _)| *n))
                        .unwrap_or(0);
                    register(&inner, peer, session, nonce);
                }
                Ok((peer, session)) => {
                    tracing::warn!(%peer, %from, "refusing a direct connection from a node the conductor did not name");
                    session.close(CloseCode::AuthFailed, "not a peer of this node");
                }
                Err(e) => tracing::info!(%from, error = %e, "a direct handshake failed"),
            }
        });
    }
}

/// Makes `session` the live connection with `peer` and serves it until it ends.
fn register(inner: &Arc<Inner>, peer: String, session: Session, nonce: u64) {
    if inner.cancel.is_cancelled() {
        session.close(CloseCode::Shutdown, "node shutting down");
        return;
    }
    let pacer = Pacer::new(session.connection().clone(), PacerConfig::default());
    let direct = Direct {
        session: session.clone(),
        pacer: pacer.clone(),
        nonce: Arc::new(AtomicU64::new(nonce)),
    };
    {
        // Lock order: `allowed`, then `live` (as in `set_allowed`).
        let allowed = inner.allowed.lock().is_ok_and(|a| {
            a.contains(&peer)
                && inner.live.0.lock().is_ok_and(|mut map| {
                    if let Some(old) = map.insert(peer.clone(), direct.clone()) {
                        old.session
                            .close(CloseCode::Superseded, "a newer direct connection");
                    }
                    true
                })
        });
        if !allowed {
            session.close(CloseCode::Shutdown, "not a peer");
            return;
        }
    }
    tracing::info!(%peer, remote = %session.facts().remote, "direct path up");
    inner.report_up(&peer, &direct);
    let inner = inner.clone();
    tokio::spawn(async move {
        let serve = super::tunnels::serve_incoming(
            (session.clone(), pacer.clone()),
            inner.local.clone(),
            inner.ip,
        );
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.tick().await;
        let reporting = async {
            loop {
                tick.tick().await;
                inner.report_up(&peer, &direct);
            }
        };
        let why: String = tokio::select! {
            (_, err) = session.closed() => err.to_string(),
            () = serve => "its tunnel streams failed".into(),
            () = pacer.clone().run() => "its pacer ended".into(),
            never = reporting => match never {},
        };
        session.close(CloseCode::Shutdown, "direct path ended");
        let stable = session.connection().stable_id();
        let current = inner.live.0.lock().is_ok_and(|mut map| {
            let ours = map
                .get(&peer)
                .is_some_and(|d| d.session.connection().stable_id() == stable);
            if ours {
                map.remove(&peer);
            }
            ours
        });
        if !current {
            // Replaced by a newer connection, or dropped because the peer is no longer
            // named: nothing to tell the conductor.
            return;
        }
        tracing::info!(%peer, reason = %why, "direct path down; the relay carries new tunnels");
        inner.report(
            &peer,
            direct.nonce.load(Ordering::Relaxed),
            State::Down,
            0,
            format!("direct connection closed: {why}"),
        );
    });
}
