//! Transport settings shared by both ends, and the reasoning behind each number.
//!
//! Flow control is where a log flood can starve control, so the windows are sized together:
//!
//! * quinn charges the connection-wide `send_window` when the application *writes*, not when
//!   bytes reach the wire. Flooding log streams could fill it with queued bytes and make a control
//!   write wait for ACKs. Each log stream can hold at most its peer's stream credit
//!   (`stream_receive_window`, roughly twice that counting read-but-unacked bytes), and the
//!   conductor caps the number of concurrent uni streams (`max_uni_streams`); tunnel bi-streams
//!   are capped the same way (`max_tunnels` each way: a node may both open tunnels and accept
//!   them). So `send_window = 2 x (max_uni_streams + 2 x max_tunnels) x stream_receive_window
//!   + control_headroom` can never be filled by logs and tunnels: control always finds window.
//! * The connection `receive_window` stays unlimited (quinn's default): a log stream the conductor
//!   is slow to read must never hold back the control stream's credit.
//! * Keep-alive 5 s keeps UDP NAT mappings (often 30 s, some 5 s) fresh from the node's side;
//!   idle timeout 20 s tolerates about three lost PINGs. Both ends set both explicitly.

use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol id spoken on every Symphony connection.
pub const ALPN: &[u8] = b"symphony/1";

/// Priority of the control stream (highest).
pub const PRIORITY_CONTROL: i32 = 100;
/// Priority of the heartbeat stream.
pub const PRIORITY_HEARTBEAT: i32 = 50;
/// Priority of tunnel streams (mesh service connections): below heartbeats, above logs.
pub const PRIORITY_TUNNEL: i32 = 25;
/// Priority of log streams (lowest).
pub const PRIORITY_LOG: i32 = 0;

/// Tunables of one QUIC connection. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// PING interval when otherwise idle (default 5 s).
    pub keep_alive: Duration,
    /// Connection dies after this long without any packet from the peer (default 20 s).
    pub idle_timeout: Duration,
    /// Per-stream receive credit (default 256 KiB).
    pub stream_receive_window: u32,
    /// Concurrent uni streams the peer may open: heartbeat + one per active log source
    /// (default 512; idle log streams are closed by the node).
    pub max_uni_streams: u32,
    /// Concurrent tunnel bi-streams the peer may open (default 256), besides control.
    pub max_tunnels: u32,
    /// Send-window headroom reserved beyond what log streams can hold (default 8 MiB).
    pub control_headroom: u64,
    /// Largest frame accepted on any stream (default 1 MiB).
    pub max_frame_size: usize,
    /// How often a server session checks for a changed peer address (default 1 s).
    pub path_poll_interval: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            stream_receive_window: 256 * 1024,
            max_uni_streams: 512,
            max_tunnels: 256,
            control_headroom: 8 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            path_poll_interval: Duration::from_secs(1),
        }
    }
}

impl TransportSettings {
    /// The connection-wide send window derived from the other settings (see module docs).
    pub fn send_window(&self) -> u64 {
        2 * (u64::from(self.max_uni_streams) + 2 * u64::from(self.max_tunnels))
            * u64::from(self.stream_receive_window)
            + self.control_headroom
    }

    /// Builds the quinn transport config for either end.
    pub fn transport_config(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        // An idle timeout that does not fit a VarInt is impossible with sane settings; fall back to none.
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window));
        t.send_window(self.send_window());
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(self.max_uni_streams));
        // The control stream plus the tunnels.
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_tunnels.saturating_add(1)));
        Arc::new(t)
    }
}
