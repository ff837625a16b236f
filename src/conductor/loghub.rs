//! The log hub: a bounded ring of recent lines per deployment and a live fan-out to viewers.
//!
//! Node sessions append here directly (log bytes never pass through the core). Entries carry
//! the node's sequence numbers; anything at or below the highest sequence held is a duplicate
//! (a resend after reconnect) and is dropped, so every viewer sees each line exactly once.
//! Viewers subscribe first and read the backlog second, then skip live entries they already
//! saw, so nothing falls in the gap between the two.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

/// Lines kept per deployment on the conductor.
pub const RING_LINES: usize = 10_000;

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

#[derive(Debug)]
struct Ring {
    lines: VecDeque<Arc<LogLine>>,
    last_seq: u64,
    live: broadcast::Sender<Arc<LogLine>>,
}

impl Ring {
    fn new() -> Self {
        Self {
            lines: VecDeque::new(),
            last_seq: 0,
            live: broadcast::channel(4096).0,
        }
    }
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
    /// Appends lines for a deployment; returns how many were new.
    pub fn append(&self, deployment_id: &str, lines: impl IntoIterator<Item = LogLine>) -> usize {
        let Ok(mut rings) = self.rings.lock() else {
            return 0;
        };
        let ring = rings
            .entry(deployment_id.to_owned())
            .or_insert_with(Ring::new);
        let mut added = 0;
        for line in lines {
            if line.seq <= ring.last_seq {
                continue;
            }
            ring.last_seq = line.seq;
            let line = Arc::new(line);
            if ring.lines.len() >= RING_LINES {
                ring.lines.pop_front();
            }
            ring.lines.push_back(line.clone());
            let _ = ring.live.send(line);
            added += 1;
        }
        added
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

    /// Subscribes to a deployment's lines.
    pub fn subscribe(&self, deployment_id: &str) -> Option<Subscription> {
        let mut rings = self.rings.lock().ok()?;
        let ring = rings
            .entry(deployment_id.to_owned())
            .or_insert_with(Ring::new);
        let live = ring.live.subscribe();
        Some(Subscription {
            backlog: ring.lines.iter().cloned().collect(),
            live,
        })
    }

    /// Forgets a deployment's lines (after DELETE).
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
        assert_eq!(hub.append("d", (1..=3).map(line)), 3);
        assert_eq!(hub.append("d", (2..=5).map(line)), 2, "2 and 3 were resent");
        assert_eq!(
            hub.last_seqs(["d".to_owned(), "x".to_owned()]).get("d"),
            Some(&5)
        );
        hub.append("d", (6..=(RING_LINES as u64 + 10)).map(line));
        let sub = hub.subscribe("d").unwrap();
        assert_eq!(sub.backlog.len(), RING_LINES);
        assert_eq!(sub.backlog.last().unwrap().seq, RING_LINES as u64 + 10);
    }

    #[test]
    fn subscribers_get_live_lines_after_the_backlog() {
        let hub = LogHub::default();
        hub.append("d", (1..=2).map(line));
        let mut sub = hub.subscribe("d").unwrap();
        assert_eq!(sub.backlog.len(), 2);
        hub.append("d", [line(3)]);
        assert_eq!(sub.live.try_recv().unwrap().seq, 3);
    }
}
