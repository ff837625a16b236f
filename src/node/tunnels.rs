//! Mesh tunnels on a node. For each service whose binder runs on another node, the agent
//! listens on `127.0.0.1:PORT` and carries every accepted TCP connection as a tunnel stream to
//! the conductor, which splices it onto a tunnel to the binder's node; there the agent connects
//! to the service on `127.0.0.1:PORT`. A binder on this node listens on the port itself.
//!
//! Invariants: the agent connects only to ports the conductor named as bound here (a tunnel
//! naming another port is refused); a connection made before its binder is up is held for at
//! most [`HOLD`] (retrying the local connect), then reset; every tunnel ends with its TCP
//! connection and the other way round.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use symphony_net::{Session, Tunnel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire;

/// How long a connection waits for its service (or for the conductor) before it is reset.
use crate::model::TUNNEL_HOLD as HOLD;

/// The node's listeners and the ports it may connect to for the conductor.
#[derive(Debug)]
pub struct Tunnels {
    session: watch::Sender<Option<Session>>,
    /// Port -> (namespace, name) and its listener task.
    listeners: BTreeMap<u16, ((String, String), JoinHandle<()>)>,
    /// Ports whose binder runs here (tunnels from the conductor may connect to these only).
    local: Arc<Mutex<BTreeSet<u16>>>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            session: watch::channel(None).0,
            listeners: BTreeMap::new(),
            local: Arc::default(),
        }
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
    pub fn connected(&self, session: Option<Session>) -> Option<impl Future<Output = ()> + use<>> {
        self.session.send_replace(session.clone());
        let local = self.local.clone();
        session.map(|s| serve_incoming(s, local))
    }

    /// Replaces the set of services to make reachable.
    pub fn set_routes(&mut self, routes: Vec<wire::ServiceRoute>) {
        let mut local = BTreeSet::new();
        let mut remote = BTreeMap::new();
        for r in routes {
            let Ok(port) = u16::try_from(r.port) else {
                continue;
            };
            if r.local {
                local.insert(port);
            } else {
                remote.insert(port, (r.namespace, r.name));
            }
        }
        if let Ok(mut l) = self.local.lock() {
            *l = local;
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
            let task = tokio::spawn(listen(port, service.clone(), self.session.subscribe()));
            self.listeners.insert(port, (service, task));
        }
    }
}

/// Listens on `127.0.0.1:port` for a service bound elsewhere.
async fn listen(port: u16, service: (String, String), session: watch::Receiver<Option<Session>>) {
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(port, service = %service.1, error = %e, "cannot listen for a mesh service");
            return;
        }
    };
    tracing::info!(port, service = %service.1, "listening for a mesh service bound elsewhere");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (service, mut session) = (service.clone(), session.clone());
        tokio::spawn(async move {
            let s = match tokio::time::timeout(HOLD, session.wait_for(Option::is_some)).await {
                Ok(Ok(current)) => current.clone(),
                _ => None,
            };
            let Some(s) = s else { return };
            let open = wire::TunnelOpen {
                namespace: service.0,
                name: service.1,
                port: 0,
            };
            let Ok(mut t) = s.open_tunnel().await else {
                tracing::info!(port, "no tunnel to the conductor");
                return;
            };
            if t.send_header(&open).await.is_ok() {
                splice(tcp, t).await;
            }
        });
    }
}

/// Serves the conductor's tunnels to services bound here until the connection ends.
async fn serve_incoming(session: Session, local: Arc<Mutex<BTreeSet<u16>>>) {
    while let Ok(mut t) = session.accept_tunnel().await {
        let local = local.clone();
        tokio::spawn(async move {
            let Ok(Some(open)) = t.header::<wire::TunnelOpen>().await else {
                return;
            };
            let port = u16::try_from(open.port)
                .ok()
                .filter(|p| local.lock().is_ok_and(|l| l.contains(p)));
            let Some(port) = port else {
                tracing::warn!(port = open.port, service = %open.name, "refusing a tunnel to a port not bound here");
                return;
            };
            if let Some(tcp) = connect_held(port).await {
                splice(tcp, t).await;
            }
        });
    }
}

/// Connects to `127.0.0.1:port`, retrying while nothing listens yet, for at most [`HOLD`].
async fn connect_held(port: u16) -> Option<TcpStream> {
    let deadline = tokio::time::Instant::now() + HOLD;
    let mut pause = Duration::from_millis(20);
    loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
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

/// Copies both ways until both sides are done (a half-close is passed on).
async fn splice(mut tcp: TcpStream, t: Tunnel) {
    let _ = tcp.set_nodelay(true);
    let mut quic = t.into_io();
    if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut quic).await {
        tracing::debug!(error = %e, "tunnel ended");
    }
}
