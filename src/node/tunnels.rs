//! Mesh tunnels on a node. For each service whose binder runs on another node, the agent
//! listens on `127.0.0.1:PORT` and carries every accepted TCP connection as a tunnel stream:
//! straight to the binder's node when this node holds a direct connection with it
//! ([`super::peers`]), else to the conductor, which splices it onto a tunnel to the binder's
//! node. There the agent connects to the service on `127.0.0.1:PORT`. A binder on this node
//! listens on the port itself.
//!
//! Invariants: the agent connects only to ports the conductor named as bound here (a tunnel
//! naming another port is refused); a connection made before its binder is up is held for at
//! most [`HOLD`] (retrying the local connect), then reset; every tunnel ends with its TCP
//! connection and the other way round.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use symphony_net::{Pacer, Session, Tunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::peers::PeerMap;
use crate::wire;

/// The current connection to the conductor and its pacer.
type Link = (Session, Pacer);

/// How long a connection waits for its service (or for the conductor) before it is reset.
use crate::model::TUNNEL_HOLD as HOLD;

/// The node's listeners and the ports it may connect to for the conductor.
#[derive(Debug)]
pub struct Tunnels {
    /// Where services are listened for and connected to (127.0.0.1 but in tests).
    ip: IpAddr,
    /// The current connection and its pacer (tunnel bytes this node sends take its tokens,
    /// like log bytes, so a tunnel flood does not fill the uplink's queue ahead of control).
    session: watch::Sender<Option<Link>>,
    /// Port -> (namespace, name) and its listener task.
    listeners: BTreeMap<u16, ((String, String), JoinHandle<()>)>,
    /// Ports whose binder runs here (tunnels from the conductor may connect to these only).
    local: Arc<Mutex<BTreeSet<u16>>>,
    /// Where to reach each remote service directly: port -> the binder's node, and the
    /// direct connections.
    direct: Direct,
}

/// What a listener needs to go direct.
#[derive(Debug, Clone)]
struct Direct {
    binders: Arc<Mutex<BTreeMap<u16, String>>>,
    peers: PeerMap,
}

impl Tunnels {
    /// No listeners yet; services are reached at `ip`; direct connections are in `peers`.
    pub fn new(ip: IpAddr, peers: PeerMap) -> Self {
        Self {
            ip,
            session: watch::channel(None).0,
            listeners: BTreeMap::new(),
            local: Arc::default(),
            direct: Direct {
                binders: Arc::default(),
                peers,
            },
        }
    }

    /// The ports bound on this node (shared: tunnels from peers check them too).
    pub fn local_ports(&self) -> Arc<Mutex<BTreeSet<u16>>> {
        self.local.clone()
    }
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        for (_, task) in self.listeners.values() {
            task.abort();
        }
    }
}

impl Tunnels {
    /// A connection to the conductor is up (`None`: it is gone). Returns the task that
    /// serves the conductor's tunnels on it (it ends with the connection).
    pub fn connected(&self, link: Option<Link>) -> Option<impl Future<Output = ()> + use<>> {
        self.session.send_replace(link.clone());
        let (local, ip) = (self.local.clone(), self.ip);
        link.map(|link| serve_incoming(link, local, ip))
    }

    /// Replaces the set of services to make reachable.
    pub fn set_routes(&mut self, routes: Vec<wire::ServiceRoute>) {
        let mut local = BTreeSet::new();
        let mut remote = BTreeMap::new();
        let mut binders = BTreeMap::new();
        for r in routes {
            let Ok(port) = u16::try_from(r.port) else {
                continue;
            };
            if r.local {
                local.insert(port);
            } else {
                if !r.node_id.is_empty() {
                    binders.insert(port, r.node_id);
                }
                remote.insert(port, (r.namespace, r.name));
            }
        }
        if let Ok(mut l) = self.local.lock() {
            *l = local;
        }
        if let Ok(mut b) = self.direct.binders.lock() {
            *b = binders;
        }
        self.listeners.retain(|port, (service, task)| {
            let keep = remote.get(port) == Some(service) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, service) in remote {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            let task = tokio::spawn(listen(
                addr,
                service.clone(),
                self.session.subscribe(),
                self.direct.clone(),
            ));
            self.listeners.insert(port, (service, task));
        }
    }
}

/// How long opening a tunnel on a direct connection may take before the relay takes over.
const DIRECT_OPEN: Duration = Duration::from_secs(2);

/// Connections one listener carries at once; more are refused (reset) at once.
const MAX_CONNECTIONS: usize = 1024;

/// Listens on `addr` (`127.0.0.1:PORT`) for a service bound elsewhere. The port may still be
/// held for a moment (a binder that just moved away, the listener it replaces): binding is
/// retried until it works or the route is withdrawn.
async fn listen(
    addr: SocketAddr,
    service: (String, String),
    session: watch::Receiver<Option<Link>>,
    direct: Direct,
) {
    let port = addr.port();
    let mut pause = Duration::from_millis(20);
    let mut warned = false;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                if !warned {
                    tracing::warn!(port, service = %service.1, error = %e, "cannot listen for a mesh service yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    };
    tracing::info!(port, service = %service.1, "listening for a mesh service bound elsewhere");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::debug!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(tcp);
            continue;
        };
        let (service, session, direct) = (service.clone(), session.clone(), direct.clone());
        tokio::spawn(async move {
            let _slot = slot;
            outgoing(tcp, service, port, session, direct).await;
        });
    }
}

/// Carries one accepted connection straight to the binder's node if a direct connection with
/// it is up, else to the conductor (waiting at most [`HOLD`] for a connection and a tunnel);
/// reset if it cannot.
async fn outgoing(
    tcp: TcpStream,
    (namespace, name): (String, String),
    port: u16,
    mut session: watch::Receiver<Option<Link>>,
    direct: Direct,
) {
    let binder = direct
        .binders
        .lock()
        .ok()
        .and_then(|b| b.get(&port).cloned());
    if let Some((s, pacer)) = binder.and_then(|b| direct.peers.get(&b)) {
        let open = wire::TunnelOpen {
            namespace: namespace.clone(),
            name: name.clone(),
            port: u32::from(port),
        };
        match tokio::time::timeout(DIRECT_OPEN, open_with(&s, &open)).await {
            Ok(Some(t)) => return splice(tcp, t, pacer).await,
            // The direct connection is failing: the relay takes this one.
            _ => tracing::debug!(port, "direct tunnel failed; relaying"),
        }
    }
    let tunnel = tokio::time::timeout(HOLD, async {
        let (s, pacer) = session.wait_for(Option::is_some).await.ok()?.clone()?;
        let open = wire::TunnelOpen {
            namespace,
            name,
            port: 0,
        };
        Some((open_with(&s, &open).await?, pacer))
    })
    .await;
    match tunnel {
        Ok(Some((t, pacer))) => splice(tcp, t, pacer).await,
        _ => {
            tracing::info!("no tunnel to the conductor; resetting the connection");
            refuse(tcp);
        }
    }
}

/// Opens a tunnel on `s` and sends its header.
async fn open_with(s: &Session, open: &wire::TunnelOpen) -> Option<Tunnel> {
    let mut t = s.open_tunnel().await.ok()?;
    match t.send_header(open).await {
        Ok(()) => Some(t),
        Err(_) => {
            t.reset();
            None
        }
    }
}

/// Serves tunnels to services bound here (from the conductor, or from a peer over a direct
/// connection) until the connection ends.
pub(super) async fn serve_incoming(
    (session, pacer): Link,
    local: Arc<Mutex<BTreeSet<u16>>>,
    ip: IpAddr,
) {
    while let Ok(mut t) = session.accept_tunnel().await {
        let (local, pacer) = (local.clone(), pacer.clone());
        tokio::spawn(async move {
            let Ok(Ok(Some(open))) =
                tokio::time::timeout(HOLD, t.header::<wire::TunnelOpen>()).await
            else {
                t.reset();
                return;
            };
            let port = u16::try_from(open.port)
                .ok()
                .filter(|p| local.lock().is_ok_and(|l| l.contains(p)));
            let Some(port) = port else {
                tracing::warn!(port = open.port, service = %open.name, "refusing a tunnel to a port not bound here");
                t.reset();
                return;
            };
            match connect_held(SocketAddr::new(ip, port)).await {
                Some(tcp) => splice(tcp, t, pacer).await,
                None => t.reset(),
            }
        });
    }
}

/// Connects to `addr`, retrying while nothing listens yet, for at most [`HOLD`].
async fn connect_held(addr: SocketAddr) -> Option<TcpStream> {
    let port = addr.port();
    let deadline = tokio::time::Instant::now() + HOLD;
    let mut pause = Duration::from_millis(20);
    loop {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Some(tcp),
            Err(e) if tokio::time::Instant::now() + pause >= deadline => {
                tracing::info!(port, error = %e, "mesh service not reachable; resetting");
                return None;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Closes a TCP connection with a reset (not a clean end), so its peer knows it failed.
fn refuse(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
}

/// Copies both ways until both sides are done (a half-close is passed on); what goes to the
/// conductor takes the pacer's tokens first. A failure on either side resets the other.
async fn splice(mut tcp: TcpStream, t: Tunnel, pacer: Pacer) {
    let _ = tcp.set_nodelay(true);
    let Tunnel {
        mut send, mut recv, ..
    } = t;
    let (mut from_tcp, mut to_tcp) = tcp.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_tcp.read(&mut buf).await?;
            if n == 0 {
                return send.finish().map_err(std::io::Error::other);
            }
            pacer.acquire(n).await;
            send.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match recv.read(&mut buf).await.map_err(std::io::Error::other)? {
                Some(n) => to_tcp.write_all(&buf[..n]).await?,
                None => return to_tcp.shutdown().await,
            }
        }
    };
    if let Err(e) = tokio::try_join!(up, down) {
        tracing::debug!(error = %e, "tunnel ended abruptly");
        let code = symphony_net::CloseCode::TunnelReset.varint();
        let _ = send.reset(code);
        let _ = recv.stop(code);
        refuse(tcp);
    }
}
