//! The conductor's endpoint: accepts connections, verifies the client certificate against the
//! CA during the handshake, reads the node identity from it, and yields one
//! [`Accepted`] per connection once the node has opened its control stream.
//!
//! Handshakes run concurrently (one task each), so a slow or hostile peer never delays others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::close::CloseCode;
use crate::config::TransportSettings;
use crate::pki::node_id_from_cert;
use crate::session::{Control, Session};
use crate::tls::{TlsError, TlsMaterial, server_crypto};

/// Who is on the other end, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    /// The node id in the certificate.
    pub node_id: String,
}

/// A connection that passed the handshake and opened its control stream.
#[derive(Debug)]
pub struct Accepted {
    /// The verified identity.
    pub identity: NodeIdentity,
    /// The connection.
    pub session: Session,
    /// Its control stream.
    pub control: Control,
}

/// Server setup failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS material was unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of the endpoint's handshakes.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Handshakes that failed (bad certificate, wrong CA, timeout...).
    pub handshake_failures: AtomicU64,
    /// Connections that never opened a control stream in time.
    pub control_timeouts: AtomicU64,
    /// Handshakes that resumed an earlier TLS session (a node re-dialling after a drop).
    pub resumed_handshakes: Arc<AtomicU64>,
}

/// The listening endpoint.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    accepted: mpsc::Receiver<Accepted>,
    stats: Arc<ServerStats>,
    _tasks: JoinSet<()>,
}

impl Server {
    /// Binds `listen` and starts accepting.
    pub fn bind(
        listen: SocketAddr,
        tls: &TlsMaterial,
        settings: TransportSettings,
    ) -> Result<Self, ServerError> {
        let stats = Arc::new(ServerStats::default());
        let mut config =
            quinn::ServerConfig::with_crypto(server_crypto(tls, stats.resumed_handshakes.clone())?);
        config.transport_config(settings.transport_config());
        config.migration(true);
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let (tx, accepted) = mpsc::channel(64);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(endpoint.clone(), tx, settings, stats.clone()));
        Ok(Self {
            endpoint,
            accepted,
            stats,
            _tasks: tasks,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next verified connection; `None` once the endpoint is closed.
    pub async fn accept(&mut self) -> Option<Accepted> {
        self.accepted.recv().await
    }

    /// Counters of the endpoint's handshakes.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Closes every connection with [`CloseCode::Shutdown`] and waits (bounded) for the peers
    /// to be told.
    pub async fn shutdown(&self, wait: Duration) {
        self.endpoint
            .close(CloseCode::Shutdown.varint(), b"conductor shutting down");
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }

    /// The underlying endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<Accepted>,
    settings: TransportSettings,
    stats: Arc<ServerStats>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                handshakes.spawn(handshake(incoming, tx.clone(), settings.clone(), stats.clone()));
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
    handshakes.shutdown().await;
}

async fn handshake(
    incoming: quinn::Incoming,
    tx: mpsc::Sender<Accepted>,
    settings: TransportSettings,
    stats: Arc<ServerStats>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(settings.idle_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, error = %e, "handshake refused");
            return;
        }
        Err(_) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, "handshake timed out");
            return;
        }
    };
    let node_id = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().and_then(|leaf| node_id_from_cert(leaf).ok()));
    let Some(node_id) = node_id else {
        stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%remote, "certificate carries no node identity");
        conn.close(
            CloseCode::AuthFailed.varint(),
            b"certificate carries no node identity",
        );
        return;
    };
    let session = Session::new(conn, settings.clone());
    let control = match session.accept_control(settings.idle_timeout).await {
        Ok(c) => c,
        Err(e) => {
            stats.control_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, %node_id, error = %e, "no control stream");
            session.close(CloseCode::ProtocolError, "no control stream");
            return;
        }
    };
    let accepted = Accepted {
        identity: NodeIdentity { node_id },
        session,
        control,
    };
    if let Err(mpsc::error::SendError(a)) = tx.send(accepted).await {
        a.session
            .close(CloseCode::Shutdown, "conductor shutting down");
    }
}
