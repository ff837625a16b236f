//! The node's endpoint: dials the conductor, keeps a session alive across failures, and moves
//! the connection to a new local socket when the old path stops working.
//!
//! * [`Client::connect`] makes one attempt (handshake + control stream).
//! * [`Client::run`] keeps connecting: jittered exponential backoff (the `backoff` crate,
//!   250 ms .. 30 s) that resets after a healthy period, TLS session resumption on re-dials
//!   (rustls' session cache lives in the reused client config), and one [`ClientEvent`] per new
//!   connection so the layer above can resend its Hello.
//! * Migration: the socket is bound to the unspecified address by default, so a changed pod IP
//!   or NAT mapping migrates implicitly (the server follows the new source address).
//!   [`Client::rebind`] moves to a new local socket explicitly; the path monitor does so by
//!   itself when a specifically bound local address disappears, or when nothing has been
//!   received for two keep-alive periods (a fresh socket gets a fresh NAT mapping).
//! * Direct paths to other nodes (the mesh): the same endpoint, and so the same UDP socket and
//!   NAT mapping the conductor sees, also dials and accepts other nodes ([`Client::punch`],
//!   [`Client::dial_peer`], [`Client::accept_peer`]), authenticated by node certificates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::close::CloseCode;
use crate::config::TransportSettings;
use crate::pki::node_id_from_cert;
use crate::session::{Control, Session, SessionError};
use crate::tls::{TlsError, TlsMaterial, client_crypto, peer_client_crypto, peer_server_crypto};

/// How to reach the conductor.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` (a name or an IP).
    pub server: String,
    /// Name expected in the server certificate; default: the host part of `server`.
    pub server_name: Option<String>,
    /// CA, own certificate and key.
    pub tls: TlsMaterial,
    /// Transport tunables.
    pub settings: TransportSettings,
    /// Local address to bind (default `0.0.0.0:0`).
    pub bind: SocketAddr,
    /// Reconnect backoff: first delay (default 250 ms).
    pub backoff_initial: Duration,
    /// Reconnect backoff: cap (default 30 s).
    pub backoff_max: Duration,
    /// A connection that lived this long resets the backoff (default 10 s).
    pub healthy_after: Duration,
}

impl ClientConfig {
    /// Defaults for everything but the address and TLS material.
    pub fn new(server: impl Into<String>, tls: TlsMaterial) -> Self {
        Self {
            server: server.into(),
            server_name: None,
            tls,
            settings: TransportSettings::default(),
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(10),
        }
    }

    fn host(&self) -> &str {
        let s = self.server.as_str();
        if let Some(rest) = s.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        s.rsplit_once(':').map_or(s, |(h, _)| h)
    }
}

/// Connection attempt failures.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS material was unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address could not be resolved.
    #[error("resolve {0}: {1}")]
    Resolve(String, String),
    /// quinn refused to start the attempt (bad server name...).
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (refused certificate, timeout...).
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    /// The control stream could not be opened.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Socket errors.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A peer's certificate named no node.
    #[error("the peer's certificate names no node")]
    Identity,
}

/// What the reconnect loop reports.
#[derive(Debug)]
// One event per connection: boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ClientEvent {
    /// A new connection is up: send Hello on its control stream.
    Connected {
        /// The connection.
        session: Session,
        /// Its control stream (already open).
        control: Control,
    },
    /// The conductor refused this node (auth or version): it keeps retrying at the slowest
    /// backoff, since only an operator can fix it. Workloads should keep running.
    Refused(CloseCode, String),
    /// Another live connection with this identity took over: no more re-dials.
    Fatal(CloseCode, String),
}

/// The node's endpoint.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    /// A second handle on the socket quinn uses (for the low-TTL punch packet).
    socket: Mutex<std::net::UdpSocket>,
    /// Datagrams received so far on the node's direct connections (set by the node, which
    /// owns them): while they receive, the path monitor does not move the socket (a new NAT
    /// mapping would cut them off), even if the conductor is silent.
    peer_activity: Mutex<Option<Activity>>,
    cfg: ClientConfig,
    /// The TLS material in use: replaced when the node renews its certificate (the next
    /// handshake uses the new one; live connections are untouched).
    tls: Mutex<(TlsMaterial, quinn::ClientConfig)>,
    reconnects: AtomicU64,
}

/// TTL of the hole-punch packet: it leaves the node's own NAT (creating the mapping the peer
/// will answer through) and dies at the next router, before it can reach the peer's NAT and
/// spoil the mapping that NAT is about to make (see `round2.md`, the mesh).
pub const PUNCH_TTL: i32 = 2;

/// Counts the datagrams received on a node's direct connections (see
/// [`Client::set_peer_activity`]).
pub type PeerActivity = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A [`PeerActivity`] that `Client` can hold and print.
#[derive(Clone)]
struct Activity(PeerActivity);

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerActivity")
    }
}

/// An incoming direct connection from another node, not yet handshaken.
#[derive(Debug)]
pub struct PeerIncoming {
    incoming: quinn::Incoming,
    settings: TransportSettings,
}

impl PeerIncoming {
    /// Where it comes from.
    pub fn remote(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Turns it away without a handshake (the peer is told).
    pub fn refuse(self) {
        self.incoming.refuse();
    }

    /// Drops it without a word (for sources nobody expects: scanners get no answer).
    pub fn ignore(self) {
        self.incoming.ignore();
    }

    /// Completes the handshake (the dialer's certificate is checked against the CA) within
    /// `timeout`; returns the dialer's node id and the session.
    pub async fn handshake(self, timeout: Duration) -> Result<(String, Session), ConnectError> {
        let connecting = self.incoming.accept()?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ConnectError::Handshake(quinn::ConnectionError::TimedOut))??;
        let id = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| {
                chain
                    .first()
                    .and_then(|c| node_id_from_cert(c.as_ref()).ok())
            });
        match id {
            Some(id) => Ok((id, Session::new(conn, self.settings))),
            None => {
                conn.close(CloseCode::AuthFailed.varint(), b"no node identity");
                Err(ConnectError::Identity)
            }
        }
    }
}

impl Client {
    /// Creates the endpoint (binds the local socket).
    pub fn new(cfg: ClientConfig) -> Result<Self, ConnectError> {
        let socket = bind_udp(cfg.bind)?;
        let handle = socket.try_clone()?;
        // Other nodes may dial this endpoint directly (the mesh); who may is checked by the
        // caller of `accept_peer`.
        let mut server = quinn::ServerConfig::with_crypto(peer_server_crypto(&cfg.tls)?);
        server.transport_config(cfg.settings.transport_config());
        server.migration(true);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )?;
        let mut qc = quinn::ClientConfig::new(client_crypto(&cfg.tls)?);
        qc.transport_config(cfg.settings.transport_config());
        endpoint.set_default_client_config(qc.clone());
        Ok(Self {
            endpoint,
            socket: Mutex::new(handle),
            peer_activity: Mutex::default(),
            tls: Mutex::new((cfg.tls.clone(), qc)),
            cfg,
            reconnects: AtomicU64::new(0),
        })
    }

    /// Uses `tls` (a renewed certificate) for every handshake from now on: with the conductor,
    /// with peers this node dials, and with peers that dial it. Connections already up keep
    /// their keys.
    pub fn set_tls(&self, tls: TlsMaterial) -> Result<(), ConnectError> {
        let mut qc = quinn::ClientConfig::new(client_crypto(&tls)?);
        qc.transport_config(self.cfg.settings.transport_config());
        let mut server = quinn::ServerConfig::with_crypto(peer_server_crypto(&tls)?);
        server.transport_config(self.cfg.settings.transport_config());
        server.migration(true);
        self.endpoint.set_server_config(Some(server));
        if let Ok(mut t) = self.tls.lock() {
            *t = (tls, qc);
        }
        Ok(())
    }

    fn current_tls(&self) -> (TlsMaterial, quinn::ClientConfig) {
        match self.tls.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Sends one small packet with TTL [`PUNCH_TTL`] to `peer` from the endpoint's socket:
    /// it opens this node's NAT towards the peer's reflexive address without reaching it.
    pub fn punch(&self, peer: SocketAddr) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        use std::os::fd::AsRawFd;
        let peer = self.family_of_socket(peer)?;
        let socket = self
            .socket
            .lock()
            .map_err(|_| std::io::Error::other("socket handle poisoned"))?;
        let to = SockaddrStorage::from(peer);
        let ttl: nix::libc::c_int = PUNCH_TTL;
        let cmsgs = match peer.ip() {
            IpAddr::V4(_) => [ControlMessage::Ipv4Ttl(&ttl)],
            // A v4-mapped address travels as IPv4 (the mapped form is only how a dual-stack
            // socket names it); the IPv6 TTL applies to real IPv6.
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => [ControlMessage::Ipv4Ttl(&ttl)],
            IpAddr::V6(_) => [ControlMessage::Ipv6HopLimit(&ttl)],
        };
        // One zero byte: no QUIC endpoint takes it for a packet.
        sendmsg(
            socket.as_raw_fd(),
            &[std::io::IoSlice::new(&[0])],
            &cmsgs,
            MsgFlags::empty(),
            Some(&to),
        )
        .map_err(std::io::Error::from)?;
        Ok(())
    }

    /// Dials another node at `addr` from this endpoint's socket; the handshake succeeds only if
    /// the peer presents a node certificate of the CA for `peer_id`.
    pub async fn dial_peer(
        &self,
        addr: SocketAddr,
        peer_id: &str,
        timeout: Duration,
    ) -> Result<Session, ConnectError> {
        let addr = self.family_of_socket(addr)?;
        let mut qc = quinn::ClientConfig::new(peer_client_crypto(&self.current_tls().0, peer_id)?);
        qc.transport_config(self.cfg.settings.transport_config());
        let connecting = self.endpoint.connect_with(qc, addr, "symphony-peer")?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ConnectError::Handshake(quinn::ConnectionError::TimedOut))??;
        Ok(Session::new(conn, self.cfg.settings.clone()))
    }

    /// `addr` as this endpoint's socket can reach it: an IPv4 address (also one a dual-stack
    /// conductor saw as v4-mapped IPv6) for an IPv4 socket, a v4-mapped one for an IPv6 socket.
    fn family_of_socket(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let local_v4 = self.endpoint.local_addr()?.is_ipv4();
        let ip = addr.ip().to_canonical();
        Ok(match (local_v4, ip) {
            (true, IpAddr::V4(_)) | (false, IpAddr::V6(_)) => SocketAddr::new(ip, addr.port()),
            (false, IpAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port())
            }
            (true, IpAddr::V6(_)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "an IPv6 peer cannot be reached from an IPv4 socket",
                ));
            }
        })
    }

    /// Tells the path monitor how to count the datagrams the node's direct connections
    /// received (see `peer_activity`).
    pub fn set_peer_activity(&self, count: PeerActivity) {
        if let Ok(mut a) = self.peer_activity.lock() {
            *a = Some(Activity(count));
        }
    }

    /// Datagrams received so far on the live direct connections.
    fn peers_rx(&self) -> u64 {
        let count = self.peer_activity.lock().ok().and_then(|a| a.clone());
        count.map_or(0, |f| (f.0)())
    }

    /// The next incoming direct connection from another node (`None` once the endpoint is
    /// closed).
    pub async fn accept_peer(&self) -> Option<PeerIncoming> {
        let incoming = self.endpoint.accept().await?;
        Some(PeerIncoming {
            incoming,
            settings: self.cfg.settings.clone(),
        })
    }

    /// The local socket address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// How many times the loop re-dialled after its first connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Moves every connection of this endpoint to a new local socket bound to `addr`
    /// (no reconnect: QUIC path migration).
    pub fn rebind(&self, addr: SocketAddr) -> std::io::Result<()> {
        let socket = bind_udp(addr)?;
        let handle = socket.try_clone()?;
        self.endpoint.rebind(socket)?;
        if let Ok(mut s) = self.socket.lock() {
            *s = handle;
        }
        Ok(())
    }

    /// One connection attempt: handshake, then open the control stream.
    pub async fn connect(&self) -> Result<(Session, Control), ConnectError> {
        // An IPv4 socket reaches IPv4 addresses only; a (dual-stack) IPv6 one reaches both,
        // IPv6 preferred.
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.cfg.server)
            .await
            .map_err(|e| ConnectError::Resolve(self.cfg.server.clone(), e.to_string()))?
            .filter(|a| a.is_ipv4() || !self.cfg.bind.is_ipv4())
            .collect();
        addrs.sort_by_key(SocketAddr::is_ipv4);
        let addr = addrs.first().copied().ok_or_else(|| {
            ConnectError::Resolve(
                self.cfg.server.clone(),
                "no address of the bound family".into(),
            )
        })?;
        let addr = self.family_of_socket(addr)?;
        let name = self
            .cfg
            .server_name
            .clone()
            .unwrap_or_else(|| self.cfg.host().to_owned());
        let connecting = self
            .endpoint
            .connect_with(self.current_tls().1, addr, &name)?;
        let conn = tokio::time::timeout(self.cfg.settings.idle_timeout, connecting)
            .await
            .map_err(|_| ConnectError::Handshake(quinn::ConnectionError::TimedOut))??;
        let session = Session::new(conn, self.cfg.settings.clone());
        let control = session.open_control().await?;
        Ok((session, control))
    }

    /// Keeps a session alive until `cancel`: yields one event per new connection.
    pub fn run(
        self: Arc<Self>,
        cancel: CancellationToken,
    ) -> (mpsc::Receiver<ClientEvent>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4);
        let handle = tokio::task::spawn(async move { self.reconnect_loop(tx, cancel).await });
        (rx, handle)
    }

    async fn reconnect_loop(&self, tx: mpsc::Sender<ClientEvent>, cancel: CancellationToken) {
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.cfg.backoff_initial)
            .with_max_interval(self.cfg.backoff_max)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            .with_max_elapsed_time(None)
            .build();
        let mut connected_before = false;
        loop {
            let attempt = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                r = self.connect() => r,
            };
            match attempt {
                Ok((session, control)) => {
                    if connected_before {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    session.set_reconnects(self.reconnects());
                    let started = tokio::time::Instant::now();
                    tracing::info!(remote = %session.facts().remote, reconnects = self.reconnects(), "connected to conductor");
                    if tx
                        .send(ClientEvent::Connected {
                            session: session.clone(),
                            control,
                        })
                        .await
                        .is_err()
                    {
                        session.close(CloseCode::Shutdown, "node shutting down");
                        return;
                    }
                    let (code, err) = tokio::select! {
                        biased;
                        () = cancel.cancelled() => {
                            session.close(CloseCode::Shutdown, "node shutting down");
                            return;
                        }
                        c = session.closed() => c,
                        never = self.monitor_path(&session) => match never {},
                    };
                    tracing::info!(error = %err, "connection to conductor lost");
                    match code {
                        Some(code) if !code.should_reconnect() => {
                            let _ = tx.send(ClientEvent::Fatal(code, err.to_string())).await;
                            return;
                        }
                        Some(code) if code.retry_slowly() => {
                            let _ = tx.send(ClientEvent::Refused(code, err.to_string())).await;
                            tokio::select! {
                                biased;
                                () = cancel.cancelled() => return,
                                () = tokio::time::sleep(self.cfg.backoff_max) => {}
                            }
                            continue;
                        }
                        _ => {}
                    }
                    if started.elapsed() >= self.cfg.healthy_after {
                        backoff.reset();
                    }
                }
                Err(e) => tracing::info!(error = %e, server = %self.cfg.server, "connect failed"),
            }
            let delay = backoff.next_backoff().unwrap_or(self.cfg.backoff_max);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Watches the path of a live session; rebinds when the local address disappeared or
    /// nothing arrived for two keep-alive periods. Never returns.
    async fn monitor_path(&self, session: &Session) -> std::convert::Infallible {
        let keep_alive = self.cfg.settings.keep_alive;
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(keep_alive));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rx = session.connection().stats().udp_rx.datagrams;
        let mut last_peers_rx = self.peers_rx();
        let mut last_progress = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let rx = session.connection().stats().udp_rx.datagrams;
            // Direct connections still receiving: the socket and its NAT mapping work, the
            // conductor is what is silent (moving the socket would cut the peers off).
            let peers_rx = self.peers_rx();
            if rx != last_rx || peers_rx != last_peers_rx {
                last_rx = rx;
                last_peers_rx = peers_rx;
                last_progress = tokio::time::Instant::now();
            }
            let bind_ip = self.cfg.bind.ip();
            let address_gone = !bind_ip.is_unspecified()
                && matches!(std::net::UdpSocket::bind((bind_ip, 0)), Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable);
            let stalled = last_progress.elapsed() >= 2 * keep_alive;
            if address_gone || stalled {
                let ip = if address_gone {
                    unspecified_like(bind_ip)
                } else {
                    bind_ip
                };
                match self.rebind(SocketAddr::new(ip, 0)) {
                    Ok(()) => {
                        session.note_local_rebind();
                        tracing::info!(address_gone, stalled, local = ?self.local_addr().ok(), "rebound to a new local socket");
                    }
                    Err(e) => tracing::debug!(error = %e, "rebind failed"),
                }
                last_progress = tokio::time::Instant::now();
            }
        }
    }
}

/// A UDP socket bound to `addr`; an IPv6 one also takes IPv4 (dual-stack), whatever the
/// host's `bindv6only` says.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// How long an enrolling node waits for the conductor's answer.
const ENROLL_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Dials `server` on ALPN `symphony-enroll/1`, trusting only a CA whose SHA-256 is `pin`
/// (checked in the handshake, before anything is sent), sends `request` and returns the
/// conductor's one reply.
pub async fn enroll<Req, Rep>(
    server: &str,
    pin: [u8; 32],
    request: &Req,
    settings: &TransportSettings,
) -> Result<Rep, ConnectError>
where
    Req: prost::Message,
    Rep: prost::Message + Default,
{
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| ConnectError::Resolve(server.to_owned(), e.to_string()))?
        .next()
        .ok_or_else(|| ConnectError::Resolve(server.to_owned(), "no address".into()))?;
    let bind = if addr.is_ipv4() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    let mut qc = quinn::ClientConfig::new(crate::tls::enroll_client_crypto(pin)?);
    qc.transport_config(settings.transport_config());
    endpoint.set_default_client_config(qc);
    let connecting = endpoint.connect(addr, crate::pki::DEFAULT_SERVER_NAMES[1])?;
    let conn = tokio::time::timeout(settings.idle_timeout, connecting)
        .await
        .map_err(|_| ConnectError::Handshake(quinn::ConnectionError::TimedOut))??;
    let session = Session::new(conn, settings.clone());
    let mut control = session.open_control().await?;
    let reply = async {
        control.tx.send(request).await?;
        control.rx.recv::<Rep>().await
    };
    // The conductor answers joins in turn (one store commit each): a node that arrives with
    // hundreds of others waits longer than a handshake would.
    let reply = tokio::time::timeout(ENROLL_REPLY_TIMEOUT, reply)
        .await
        .map_err(|_| ConnectError::Handshake(quinn::ConnectionError::TimedOut))?
        .map_err(|e| ConnectError::Io(std::io::Error::other(e.to_string())))?;
    session.close(CloseCode::Shutdown, "enrolled");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    reply.ok_or_else(|| {
        ConnectError::Io(std::io::Error::other(
            "the conductor closed the enrollment stream without a reply",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_of_server_address() {
        let tls = TlsMaterial {
            ca_pem: String::new(),
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        for (server, host) in [
            ("localhost:50051", "localhost"),
            ("10.0.0.1:1", "10.0.0.1"),
            ("[::1]:5", "::1"),
            ("name", "name"),
        ] {
            assert_eq!(ClientConfig::new(server, tls.clone()).host(), host);
        }
    }
}
