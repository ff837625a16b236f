//! Typed close codes, so the other side knows whether to reconnect.

/// Why a connection was closed by the application. Sent as the QUIC application error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// Orderly shutdown of the peer; reconnect later.
    Shutdown,
    /// A newer connection with the same identity replaced this one.
    Superseded,
    /// The peer's identity was refused (bad or revoked certificate, identity mismatch).
    AuthFailed,
    /// The peer speaks an incompatible protocol version.
    VersionMismatch,
    /// The peer broke the protocol (malformed or unexpected frame).
    ProtocolError,
    /// A frame exceeded the maximum frame size.
    FrameTooLarge,
    /// A tunnel stream ended abruptly (its other side failed); used on streams, not
    /// connections.
    TunnelReset,
    /// The node's certificate was revoked: it must not reconnect (it needs a new join token).
    Revoked,
}

impl CloseCode {
    /// All codes, for tests and tables.
    pub const ALL: [Self; 8] = [
        Self::Shutdown,
        Self::Superseded,
        Self::AuthFailed,
        Self::VersionMismatch,
        Self::ProtocolError,
        Self::FrameTooLarge,
        Self::TunnelReset,
        Self::Revoked,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u32 {
        match self {
            Self::Shutdown => 0,
            Self::Superseded => 1,
            Self::AuthFailed => 2,
            Self::VersionMismatch => 3,
            Self::ProtocolError => 4,
            Self::FrameTooLarge => 5,
            Self::TunnelReset => 6,
            Self::Revoked => 7,
        }
    }

    /// Parses a wire code; unknown codes are `None`.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| u64::from(c.code()) == code)
    }

    /// As a quinn varint.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self.code())
    }

    /// Whether a node should keep trying to connect after being closed with this code.
    /// `Superseded` reaching a live connection means another live process holds this node's
    /// identity: re-dialling would make the two take the connection from each other forever.
    pub fn should_reconnect(self) -> bool {
        !matches!(self, Self::Superseded | Self::Revoked)
    }

    /// Whether retrying soon is pointless: auth and version refusals do not heal until an
    /// operator acts, so the node retries only at its slowest backoff (and keeps its
    /// workloads running meanwhile).
    pub fn retry_slowly(self) -> bool {
        matches!(self, Self::AuthFailed | Self::VersionMismatch)
    }

    /// Extracts the application close code from a connection error, if the peer sent one.
    pub fn from_error(err: &quinn::ConnectionError) -> Option<Self> {
        match err {
            quinn::ConnectionError::ApplicationClosed(close) => {
                Self::from_code(close.error_code.into_inner())
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Shutdown => "shutdown",
            Self::Superseded => "superseded",
            Self::AuthFailed => "auth failed",
            Self::VersionMismatch => "version mismatch",
            Self::ProtocolError => "protocol error",
            Self::FrameTooLarge => "frame too large",
            Self::TunnelReset => "tunnel reset",
            Self::Revoked => "certificate revoked",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for c in CloseCode::ALL {
            assert!(seen.insert(c.code()));
            assert_eq!(CloseCode::from_code(u64::from(c.code())), Some(c));
        }
        assert_eq!(CloseCode::from_code(999), None);
        assert!(CloseCode::Shutdown.should_reconnect());
        assert!(!CloseCode::Superseded.should_reconnect());
        assert!(!CloseCode::Revoked.should_reconnect());
        assert!(CloseCode::AuthFailed.should_reconnect() && CloseCode::AuthFailed.retry_slowly());
        assert!(
            CloseCode::VersionMismatch.should_reconnect()
                && CloseCode::VersionMismatch.retry_slowly()
        );
        assert!(!CloseCode::Shutdown.retry_slowly());
    }
}
