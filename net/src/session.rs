//! One live connection between a node and the conductor, and its streams.
//!
//! Stream layout: the node opens one bi-directional **control** stream right after the
//! handshake (priority 100 on both ends); uni streams begin with one byte naming their
//! [`StreamKind`]: one **heartbeat** stream (priority 50) and one **log** stream per log source
//! (priority 0). Every stream carries length-delimited protobuf frames ([`crate::frame`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::close::CloseCode;
use crate::config::{
    PRIORITY_CONTROL, PRIORITY_HEARTBEAT, PRIORITY_LOG, PRIORITY_TUNNEL, TransportSettings,
};
use crate::frame::{FrameError, FrameReader, FrameWriter};

/// What a uni stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Usage heartbeats (latest wins).
    Heartbeat,
    /// One log source's entries (a header naming it, then its batches).
    Log,
    /// Batches of every log source of the peer, each naming its own.
    Logs,
}

impl StreamKind {
    fn tag(self) -> u8 {
        match self {
            Self::Heartbeat => 1,
            Self::Log => 2,
            Self::Logs => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Self::Heartbeat),
            2 => Some(Self::Log),
            3 => Some(Self::Logs),
            _ => None,
        }
    }

    fn priority(self) -> i32 {
        match self {
            Self::Heartbeat => PRIORITY_HEARTBEAT,
            Self::Log | Self::Logs => PRIORITY_LOG,
        }
    }
}

/// Session-level failures.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream write failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A uni stream did not start with a known kind.
    #[error("unknown stream kind {0}")]
    UnknownKind(u8),
    /// A stream failed while reading its header.
    #[error("stream read: {0}")]
    Read(#[from] std::io::Error),
    /// The control stream did not arrive in time.
    #[error("no control stream within {0:?}")]
    ControlTimeout(Duration),
}

/// Sending half of a stream, framed.
pub type FrameSender = FrameWriter<quinn::SendStream>;
/// Receiving half of a stream, framed.
pub type FrameReceiver = FrameReader<quinn::RecvStream>;

/// The control stream: ordered, high priority, both directions.
#[derive(Debug)]
pub struct Control {
    /// Outgoing frames.
    pub tx: FrameSender,
    /// Incoming frames.
    pub rx: FrameReceiver,
}

/// A tunnel: a bi-stream after the control stream, carrying one TCP connection of a mesh
/// service. The application frames a header first ([`Tunnel::header`]) and then copies raw
/// bytes both ways.
#[derive(Debug)]
pub struct Tunnel {
    /// Outgoing bytes.
    pub send: quinn::SendStream,
    /// Incoming bytes.
    pub recv: quinn::RecvStream,
    max_frame_size: usize,
}

impl Tunnel {
    /// Sends the header frame.
    pub async fn send_header<M: prost::Message>(&mut self, header: &M) -> Result<(), FrameError> {
        let mut w = FrameWriter::new(&mut self.send, self.max_frame_size);
        w.send(header).await
    }

    /// Both directions as one byte stream (shutting it down finishes the send side), for a
    /// protocol spoken over the tunnel (the conductor's HTTP proxy).
    pub fn into_io(self) -> tokio::io::Join<quinn::RecvStream, quinn::SendStream> {
        tokio::io::join(self.recv, self.send)
    }

    /// Ends the tunnel abruptly: the peer sees a reset, never a clean end of stream (which
    /// could pass a cut-off transfer for a complete one).
    pub fn reset(mut self) {
        abort(&mut self.recv, &mut self.send);
    }

    /// Copies both ways between `other` and the tunnel until both directions are done (a
    /// half-close is passed on). On an error the tunnel is reset and the error returned, so
    /// the caller can reset `other` too.
    pub async fn splice<S>(self, other: &mut S) -> std::io::Result<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut io = tokio::io::join(self.recv, self.send);
        match tokio::io::copy_bidirectional(other, &mut io).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let (mut recv, mut send) = io.into_inner();
                abort(&mut recv, &mut send);
                Err(e)
            }
        }
    }

    /// Copies both ways between two tunnels (the conductor's relay); an error resets both.
    pub async fn splice_tunnel(self, other: Tunnel) -> std::io::Result<()> {
        let mut a = tokio::io::join(self.recv, self.send);
        let mut b = tokio::io::join(other.recv, other.send);
        match tokio::io::copy_bidirectional(&mut a, &mut b).await {
            Ok(_) => Ok(()),
            Err(e) => {
                for io in [a, b] {
                    let (mut recv, mut send) = io.into_inner();
                    abort(&mut recv, &mut send);
                }
                Err(e)
            }
        }
    }

    /// Reads the header frame (`None`: the stream ended first).
    pub async fn header<M: prost::Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        FrameReader::new(&mut self.recv, self.max_frame_size)
            .recv()
            .await
    }
}

/// Resets a tunnel's two halves with [`CloseCode::TunnelReset`].
fn abort(recv: &mut quinn::RecvStream, send: &mut quinn::SendStream) {
    let code = CloseCode::TunnelReset.varint();
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// A uni stream whose kind has not been read yet.
#[derive(Debug)]
pub struct IncomingUni {
    recv: quinn::RecvStream,
    max_frame_size: usize,
}

impl IncomingUni {
    /// Reads the stream's kind byte. An unknown kind stops the stream (not the connection).
    pub async fn kind(mut self) -> Result<(StreamKind, FrameReceiver), SessionError> {
        let tag = self.recv.read_u8().await?;
        match StreamKind::from_tag(tag) {
            Some(kind) => Ok((kind, FrameReader::new(self.recv, self.max_frame_size))),
            None => {
                let _ = self.recv.stop(CloseCode::ProtocolError.varint());
                Err(SessionError::UnknownKind(tag))
            }
        }
    }
}

/// Facts about a connection that operators see (`/nodes`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionFacts {
    /// The peer's current address (changes on migration).
    pub remote: SocketAddr,
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// How often the peer's address changed on this connection (NAT rebinding, new IP).
    pub path_changes: u64,
    /// How often the client re-dialled before this connection (client side; 0 on the server).
    pub reconnects: u64,
    /// How often the client moved this connection to a new local socket.
    pub local_rebinds: u64,
    /// When the connection was established.
    pub connected_at: SystemTime,
}

#[derive(Debug)]
struct Shared {
    path_changes: AtomicU64,
    reconnects: AtomicU64,
    local_rebinds: AtomicU64,
    connected_at: SystemTime,
    remote: watch::Sender<SocketAddr>,
}

/// One connection. Cheap to clone; all clones refer to the same connection.
#[derive(Debug, Clone)]
pub struct Session {
    conn: quinn::Connection,
    settings: TransportSettings,
    shared: Arc<Shared>,
}

impl Session {
    pub(crate) fn new(conn: quinn::Connection, settings: TransportSettings) -> Self {
        let (remote, _) = watch::channel(conn.remote_address());
        let shared = Arc::new(Shared {
            path_changes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            local_rebinds: AtomicU64::new(0),
            connected_at: SystemTime::now(),
            remote,
        });
        Self {
            conn,
            settings,
            shared,
        }
    }

    /// Opens the control stream (the node does this first).
    pub async fn open_control(&self) -> Result<Control, SessionError> {
        let (send, recv) = self.conn.open_bi().await?;
        Ok(self.control(send, recv))
    }

    /// Accepts the control stream (the conductor), waiting at most `timeout`.
    pub async fn accept_control(&self, timeout: Duration) -> Result<Control, SessionError> {
        match tokio::time::timeout(timeout, self.conn.accept_bi()).await {
            Ok(res) => {
                let (send, recv) = res?;
                Ok(self.control(send, recv))
            }
            Err(_) => Err(SessionError::ControlTimeout(timeout)),
        }
    }

    fn control(&self, send: quinn::SendStream, recv: quinn::RecvStream) -> Control {
        // Priority matters on each sending side, so both ends set it.
        let _ = send.set_priority(PRIORITY_CONTROL);
        Control {
            tx: FrameWriter::new(send, self.settings.max_frame_size),
            rx: FrameReader::new(recv, self.settings.max_frame_size),
        }
    }

    /// Opens a tunnel stream (tunnel priority: below heartbeats, above logs).
    pub async fn open_tunnel(&self) -> Result<Tunnel, SessionError> {
        let (send, recv) = self.conn.open_bi().await?;
        let _ = send.set_priority(PRIORITY_TUNNEL);
        Ok(Tunnel {
            send,
            recv,
            max_frame_size: self.settings.max_frame_size,
        })
    }

    /// Accepts the peer's next tunnel stream (after the control stream).
    pub async fn accept_tunnel(&self) -> Result<Tunnel, SessionError> {
        let (send, recv) = self.conn.accept_bi().await?;
        let _ = send.set_priority(PRIORITY_TUNNEL);
        Ok(Tunnel {
            send,
            recv,
            max_frame_size: self.settings.max_frame_size,
        })
    }

    /// Opens a uni stream of the given kind, with that kind's priority.
    pub async fn open_uni(&self, kind: StreamKind) -> Result<FrameSender, SessionError> {
        let mut send = self.conn.open_uni().await?;
        let _ = send.set_priority(kind.priority());
        send.write_all(&[kind.tag()]).await?;
        Ok(FrameWriter::new(send, self.settings.max_frame_size))
    }

    /// Accepts the next uni stream and reads its kind. One slow or bad stream holds up the
    /// next accept: servers should prefer [`Session::accept_uni_stream`].
    pub async fn accept_uni(&self) -> Result<(StreamKind, FrameReceiver), SessionError> {
        self.accept_uni_stream().await?.kind().await
    }

    /// Accepts the next uni stream without reading from it; read its kind in its own task.
    pub async fn accept_uni_stream(&self) -> Result<IncomingUni, SessionError> {
        Ok(IncomingUni {
            recv: self.conn.accept_uni().await?,
            max_frame_size: self.settings.max_frame_size,
        })
    }

    /// Current facts about the connection.
    pub fn facts(&self) -> ConnectionFacts {
        ConnectionFacts {
            remote: self.conn.remote_address(),
            rtt: self.conn.rtt(),
            path_changes: self.shared.path_changes.load(Ordering::Relaxed),
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
            local_rebinds: self.shared.local_rebinds.load(Ordering::Relaxed),
            connected_at: self.shared.connected_at,
        }
    }

    /// Watches the peer's address; it changes when the peer migrates.
    pub fn remote_changes(&self) -> watch::Receiver<SocketAddr> {
        self.shared.remote.subscribe()
    }

    pub(crate) fn set_reconnects(&self, n: u64) {
        self.shared.reconnects.store(n, Ordering::Relaxed);
    }

    pub(crate) fn note_local_rebind(&self) {
        self.shared.local_rebinds.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks the peer's address now; counts and announces a change.
    pub fn observe_path(&self) -> bool {
        let now = self.conn.remote_address();
        let changed = self.shared.remote.send_if_modified(|addr| {
            if *addr == now {
                false
            } else {
                *addr = now;
                true
            }
        });
        if changed {
            self.shared.path_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(remote = %now, "peer address changed (migration)");
        }
        changed
    }

    /// Polls the peer's address every `path_poll_interval` until the connection closes
    /// (quinn raises no event for a migration).
    pub async fn watch_path(self) {
        let mut tick = tokio::time::interval(self.settings.path_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.conn.closed() => return,
                _ = tick.tick() => { self.observe_path(); }
            }
        }
    }

    /// Closes the connection with a typed code.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.conn.close(code.varint(), reason.as_bytes());
    }

    /// Waits until the connection is closed; returns the peer's close code if it sent one.
    pub async fn closed(&self) -> (Option<CloseCode>, quinn::ConnectionError) {
        let err = self.conn.closed().await;
        (CloseCode::from_error(&err), err)
    }

    /// Whether the connection is already closed.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// The underlying quinn connection (stats for pacing, datagrams).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The settings this session was made with.
    pub fn settings(&self) -> &TransportSettings {
        &self.settings
    }
}
