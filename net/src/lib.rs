//! `symphony-net`: the transport between nodes and the conductor.
//!
//! One QUIC connection per node (quinn + rustls), dialled out by the node, authenticated both
//! ways with certificates from one CA ([`pki`]); the node's identity is its certificate. On the
//! connection: one high-priority control bi-stream, a heartbeat uni stream, and one
//! low-priority uni stream per log source ([`session`]), all carrying length-delimited protobuf
//! frames ([`frame`]). The client re-dials with jittered backoff and survives NAT rebinding and
//! address changes through QUIC path migration ([`client`]); the server verifies identities and
//! yields verified sessions ([`server`]). Close codes are typed ([`close`]).
//!
//! This crate knows frames and identities, never deployments.

#![warn(missing_docs)]

pub mod client;
pub mod close;
pub mod config;
pub mod frame;
pub mod impair;
pub mod pacing;
pub mod pki;
pub mod server;
pub mod session;
pub mod tls;

pub use client::{
    Client, ClientConfig, ClientEvent, ConnectError, PUNCH_TTL, PeerActivity, PeerIncoming,
};
pub use close::CloseCode;
pub use config::{ALPN, PRIORITY_TUNNEL, TransportSettings};
pub use frame::{FrameError, FrameReader, FrameWriter};
pub use pacing::{Pacer, PacerConfig, PacerStats};
pub use pki::{CertFiles, CertificateAuthority, PemPair, PkiError, Validity};
pub use server::{Accepted, Enrollment, NodeIdentity, Server, ServerError};
pub use session::{
    ConnectionFacts, Control, FrameReceiver, FrameSender, Session, SessionError, StreamKind, Tunnel,
};
pub use tls::{ENROLL_ALPN, PEER_ALPN, RevokedSet, TlsError, TlsMaterial};
