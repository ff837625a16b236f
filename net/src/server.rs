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
use crate::session::{FrameReceiver, FrameSender};
use crate::tls::{ENROLL_ALPN, RevokedSet, TlsError, TlsMaterial, server_crypto};

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

/// A node asking to join (ALPN `symphony-enroll/1`): its first bi-stream carries one request
/// and one reply; the connection has no verified identity.
#[derive(Debug)]
pub struct Enrollment {
    /// Where it came from.
    pub remote: SocketAddr,
    /// The reply goes here.
    pub tx: FrameSender,
    /// The request comes from here.
    pub rx: FrameReceiver,
    /// The connection (closed by the caller once the reply is sent).
    pub connection: quinn::Connection,
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
    enrollments: Option<mpsc::Receiver<Enrollment>>,
    stats: Arc<ServerStats>,
    _tasks: JoinSet<()>,
}

impl Server {
    /// Binds `listen` and starts accepting (no node is revoked).
    pub fn bind(
        listen: SocketAddr,
        tls: &TlsMaterial,
        settings: TransportSettings,
    ) -> Result<Self, ServerError> {
        Self::bind_revoking(listen, tls, settings, RevokedSet::default())
    }

    /// Binds `listen` and starts accepting; certificates of nodes in `revoked` are refused.
    pub fn bind_revoking(
        listen: SocketAddr,
        tls: &TlsMaterial,
        settings: TransportSettings,
        revoked: RevokedSet,
    ) -> Result<Self, ServerError> {
        let stats = Arc::new(ServerStats::default());
        let mut config = quinn::ServerConfig::with_crypto(server_crypto(
            tls,
            stats.resumed_handshakes.clone(),
            revoked.clone(),
        )?);
        config.transport_config(settings.transport_config());
        config.migration(true);
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let (tx, accepted) = mpsc::channel(64);
        let (enroll_tx, enrollments) = mpsc::channel(256);
        let mut tasks = JoinSet::new();
        let ctx = Ctx {
            tx,
            enroll_tx,
            settings,
            stats: stats.clone(),
            revoked,
        };
        tasks.spawn(accept_loop(endpoint.clone(), ctx));
        Ok(Self {
            endpoint,
            accepted,
            enrollments: Some(enrollments),
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

    /// The nodes asking to join, in arrival order (once: later calls get `None`). Until it is
    /// taken, enrollment connections wait in a bounded queue.
    pub fn take_enrollments(&mut self) -> Option<mpsc::Receiver<Enrollment>> {
        self.enrollments.take()
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

/// What every handshake task needs.
#[derive(Debug, Clone)]
struct Ctx {
    tx: mpsc::Sender<Accepted>,
    enroll_tx: mpsc::Sender<Enrollment>,
    settings: TransportSettings,
    stats: Arc<ServerStats>,
    revoked: RevokedSet,
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Ctx) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                handshakes.spawn(handshake(incoming, ctx.clone()));
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
    handshakes.shutdown().await;
}

async fn handshake(incoming: quinn::Incoming, ctx: Ctx) {
    let Ctx {
        tx,
        enroll_tx,
        settings,
        stats,
        revoked,
    } = ctx;
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
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(ENROLL_ALPN) {
        let control = match Session::new(conn.clone(), settings.clone())
            .accept_control(settings.idle_timeout)
            .await
        {
            Ok(c) => c,
            Err(_) => {
                conn.close(CloseCode::ProtocolError.varint(), b"no enrollment request");
                return;
            }
        };
        let e = Enrollment {
            remote,
            tx: control.tx,
            rx: control.rx,
            connection: conn,
        };
        if let Err(mpsc::error::SendError(e)) = enroll_tx.send(e).await {
            e.connection
                .close(CloseCode::Shutdown.varint(), b"conductor shutting down");
        }
        return;
    }
    let leaf = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned());
    let node_id = leaf.as_ref().and_then(|l| node_id_from_cert(l).ok());
    let Some(node_id) = node_id else {
        stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%remote, "certificate carries no node identity");
        conn.close(
            CloseCode::AuthFailed.varint(),
            b"certificate carries no node identity",
        );
        return;
    };
    // A resumed TLS session skips the certificate verifier (and rustls hands out new tickets
    // carrying the old chain): check expiry and revocation here too.
    let expired = leaf
        .as_ref()
        .and_then(|l| crate::pki::not_after_unix(l))
        .is_some_and(|t| t <= time::OffsetDateTime::now_utc().unix_timestamp());
    if expired {
        stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%remote, %node_id, "expired certificate refused (resumed session)");
        conn.close(CloseCode::AuthFailed.varint(), b"node certificate expired");
        return;
    }
    if revoked.read().map_or(true, |set| set.contains(&node_id)) {
        stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%remote, %node_id, "revoked node refused");
        conn.close(CloseCode::Revoked.varint(), b"node certificate revoked");
        return;
    }
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
