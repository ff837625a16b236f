//! The log hub: a bounded ring of recent lines per deployment and a live fan-out to viewers.
//!
//! Node sessions append here directly (log bytes never pass through the core). Entries carry
//! the node's sequence numbers; anything at or below the highest sequence held is a duplicate
//! (a resend after reconnect) and is dropped, so every viewer sees each line exactly once.
//! Viewers subscribe first and read the backlog second, then skip live entries they already
//! saw, so nothing falls in the gap between the two.
//!
//! Rings exist only for known deployments ([`LogHub::ensure`] on create and at start,
//! [`LogHub::remove`] on delete): lines for anything else are dropped. Each ring is bounded
//! in lines and in bytes.
//!
//! A ring takes lines only from the node of its deployment's latest placement
//! ([`LogHub::placed`], set by the core when it makes the `Assign`, before sending it): a
//! fenced or foreign copy cannot write into, or push the sequence of, another's log, and the
//! node keeps that right after the placement ends (a finished task's last lines are still
//! on their way) until the deployment is placed elsewhere or deleted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

/// Lines kept per deployment on the conductor.
pub const RING_LINES: usize = 10_000;
/// Bytes kept per deployment on the conductor.
pub const RING_BYTES: usize = 8 * 1024 * 1024;
/// Live lines buffered per viewer before it must catch up from the ring.
const LIVE_BUFFER: usize = 1024;

/// One log line as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// Node-assigned sequence number (per deployment, strictly increasing).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_unix_ms: i64,
    /// stdout, stderr, system, system-hc or system-ar.
    pub stream: String,
    /// The text, without its newline.
    pub line: String,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<Arc<LogLine>>,
    bytes: usize,
    last_seq: u64,
    /// The node of the latest placement: the only one whose lines are taken.
    writer: Option<String>,
    /// Created when the first viewer subscribes.
    live: Option<broadcast::Sender<Arc<LogLine>>>,
}

/// Shared log store; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LogHub {
    rings: Arc<Mutex<HashMap<String, Ring>>>,
}

/// A viewer's starting point: the backlog and the live feed after it.
#[derive(Debug)]
pub struct Subscription {
    /// Lines already held (filtered and tailed by the caller).
    pub backlog: Vec<Arc<LogLine>>,
    /// Live lines; may repeat the end of the backlog, skip `seq <= last backlog seq`.
    pub live: broadcast::Receiver<Arc<LogLine>>,
}

impl LogHub {
    /// Makes room for a deployment's lines.
    pub fn ensure(&self, deployment_id: &str) {
        if let Ok(mut rings) = self.rings.lock() {
            rings.entry(deployment_id.to_owned()).or_default();
        }
    }

    /// The deployment is placed on `node_id`: from now on its lines are taken from that node
    /// only. Returns the highest sequence held (the new copy numbers its lines above it).
    pub fn placed(&self, deployment_id: &str, node_id: &str) -> u64 {
        let Ok(mut rings) = self.rings.lock() else {
            return 0;
        };
        let Some(ring) = rings.get_mut(deployment_id) else {
            return 0;
        };
        if ring.writer.as_deref() != Some(node_id) {
            ring.writer = Some(node_id.to_owned());
        }
        ring.last_seq
    }

    /// Appends lines node `from` sent for a deployment; returns how many were new, or `None`
    /// when they are refused: the deployment is unknown or its latest placement is not on
    /// that node.
    pub fn append(
        &self,
        from: &str,
        deployment_id: &str,
        lines: impl IntoIterator<Item = LogLine>,
    ) -> Option<usize> {
        let mut rings = self.rings.lock().ok()?;
        let ring = rings.get_mut(deployment_id)?;
        if ring.writer.as_deref() != Some(from) {
            return None;
        }
        let mut added = 0;
        for line in lines {
            if line.seq <= ring.last_seq {
                continue;
            }
            ring.last_seq = line.seq;
            let line = Arc::new(line);
            ring.bytes += line.line.len();
            ring.lines.push_back(line.clone());
            while ring.lines.len() > RING_LINES || ring.bytes > RING_BYTES {
                match ring.lines.pop_front() {
                    Some(old) => ring.bytes -= old.line.len(),
                    None => break,
                }
            }
            if let Some(live) = &ring.live {
                let _ = live.send(line);
            }
            added += 1;
        }
        Some(added)
    }

    /// The highest sequence held per deployment (sent to a node after Hello so it resumes there).
    pub fn last_seqs(&self, ids: impl IntoIterator<Item = String>) -> HashMap<String, u64> {
        let Ok(rings) = self.rings.lock() else {
            return HashMap::new();
        };
        ids.into_iter()
            .filter_map(|id| rings.get(&id).map(|r| (id, r.last_seq)))
            .collect()
    }

    /// Subscribes to a known deployment's lines.
    pub fn subscribe(&self, deployment_id: &str) -> Option<Subscription> {
        let mut rings = self.rings.lock().ok()?;
        let ring = rings.get_mut(deployment_id)?;
        let live = ring
            .live
            .get_or_insert_with(|| broadcast::channel(LIVE_BUFFER).0)
            .subscribe();
        Some(Subscription {
            backlog: ring.lines.iter().cloned().collect(),
            live,
        })
    }

    /// Forgets a deployment's lines (after DELETE); later lines for it are dropped.
    pub fn remove(&self, deployment_id: &str) {
        if let Ok(mut rings) = self.rings.lock() {
            rings.remove(deployment_id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn line(seq: u64) -> LogLine {
        LogLine {
            seq,
            timestamp_unix_ms: 0,
            stream: "stdout".into(),
            line: format!("l{seq}"),
        }
    }

    #[test]
    fn duplicates_are_dropped_and_the_ring_is_bounded() {
        let hub = LogHub::default();
        hub.ensure("d");
        hub.placed("d", "n1");
        assert_eq!(hub.append("n1", "d", (1..=3).map(line)), Some(3));
        assert_eq!(
            hub.append("n1", "d", (2..=5).map(line)),
            Some(2),
            "2 and 3 were resent"
        );
        assert_eq!(
            hub.last_seqs(["d".to_owned(), "x".to_owned()]).get("d"),
            Some(&5)
        );
        hub.append("n1", "d", (6..=(RING_LINES as u64 + 10)).map(line));
        let sub = hub.subscribe("d").unwrap();
        assert_eq!(sub.backlog.len(), RING_LINES);
        assert_eq!(sub.backlog.last().unwrap().seq, RING_LINES as u64 + 10);
    }

    #[test]
    fn rings_are_bounded_in_bytes_too() {
        let hub = LogHub::default();
        hub.ensure("d");
        hub.placed("d", "n1");
        let big = |seq| LogLine {
            seq,
            timestamp_unix_ms: 0,
            stream: "stdout".into(),
            line: "x".repeat(1024 * 1024),
        };
        hub.append("n1", "d", (1..=20).map(big));
        let sub = hub.subscribe("d").unwrap();
        assert_eq!(sub.backlog.len(), RING_BYTES / (1024 * 1024));
        assert_eq!(sub.backlog.last().unwrap().seq, 20);
    }

    #[test]
    fn unknown_and_removed_deployments_keep_nothing() {
        let hub = LogHub::default();
        assert_eq!(hub.append("n1", "ghost", [line(1)]), None);
        assert!(hub.subscribe("ghost").is_none());
        hub.ensure("d");
        hub.placed("d", "n1");
        hub.remove("d");
        assert_eq!(
            hub.append("n1", "d", [line(1)]),
            None,
            "late lines after a delete do not resurrect it"
        );
        assert!(hub.subscribe("d").is_none(), "the hub forgot it");
    }

    #[test]
    fn subscribers_get_live_lines_after_the_backlog() {
        let hub = LogHub::default();
        hub.ensure("d");
        hub.placed("d", "n1");
        hub.append("n1", "d", (1..=2).map(line));
        let mut sub = hub.subscribe("d").unwrap();
        assert_eq!(sub.backlog.len(), 2);
        hub.append("n1", "d", [line(3)]);
        assert_eq!(sub.live.try_recv().unwrap().seq, 3);
    }

    #[test]
    fn only_the_node_of_the_latest_placement_writes_a_log() {
        let hub = LogHub::default();
        hub.ensure("d");
        assert_eq!(hub.append("n1", "d", [line(1)]), None, "not placed yet");
        assert_eq!(hub.placed("d", "n1"), 0);
        assert_eq!(hub.append("n1", "d", [line(1)]), Some(1));
        assert_eq!(
            hub.append("n2", "d", [line(2)]),
            None,
            "another node's copy"
        );
        // Placed elsewhere: the new node numbers above what is held; the old one is fenced.
        assert_eq!(hub.placed("d", "n2"), 1);
        assert_eq!(hub.append("n1", "d", [line(9)]), None);
        assert_eq!(hub.append("n2", "d", [line(2)]), Some(1));
        assert_eq!(hub.last_seqs(["d".to_owned()]).get("d"), Some(&2));
    }
}
