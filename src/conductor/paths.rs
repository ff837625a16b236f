//! Direct paths between nodes (the mesh): which pairs of nodes should talk directly, and the
//! hole punch the conductor runs for each pair. Pure: the core sends what it returns.
//!
//! A pair is wanted while a deployment placed on one node declares `connects` to a service
//! whose binder is placed on the other. For a wanted pair whose nodes are both connected, the
//! conductor sends `Punch { dial: false }` to both; each sends one low-TTL packet to the other's
//! reflexive address (opening its own NAT) and answers PUNCHED. Only once both have does the
//! node with the lower id get `Punch { dial: true }` and start the QUIC handshake: a real
//! packet that reached the other NAT before that NAT's own outbound would make it map the
//! other side to another port, and the punch would then never heal (see `round2.md`).
//!
//! UP makes the pair direct. DOWN, or no answer within [`PUNCH_TIMEOUT_MS`], leaves it on the
//! relay and tries again after a backoff (5 s doubling to 5 min: NATs that refuse once
//! usually refuse again, and an attempt costs a few packets). A pair that was direct and went
//! down tries again after the first step.
//!
//! Invariants: reports are matched by nonce, so a late answer to an old attempt changes
//! nothing; a pair's state only exists while it is wanted; only the lower id dials.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::wire;

/// How long an attempt may take from the first Punch to UP.
pub const PUNCH_TIMEOUT_MS: i64 = 15_000;
/// The first retry delay after a failed attempt.
const RETRY_FIRST_MS: i64 = 5_000;
/// The longest retry delay.
const RETRY_MAX_MS: i64 = 300_000;

/// A pair of nodes, lower id first (the lower id dials).
pub type PairKey = (String, String);

/// The pair of `a` and `b`, lower id first.
pub fn key(a: &str, b: &str) -> PairKey {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// Where a pair stands.
#[derive(Debug, Clone, PartialEq)]
pub enum PairState {
    /// Tunnels go through the conductor; the next attempt is due at `retry_at_ms`.
    Relay {
        retry_at_ms: i64,
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// An attempt is under way.
    Punching {
        nonce: u64,
        since_ms: i64,
        /// Which side (lower, higher) has sent its low-TTL packet.
        punched: [bool; 2],
    },
    /// A direct connection is up.
    Direct { nonce: u64, rtt_us: u64 },
}

#[derive(Debug, Clone)]
struct Pair {
    state: PairState,
    /// Failed attempts in a row.
    failures: u32,
}

/// Every wanted pair and its state.
#[derive(Debug)]
pub struct Paths {
    pairs: BTreeMap<PairKey, Pair>,
    next_nonce: u64,
}

/// Messages to send: (node, punch).
pub type Punches = Vec<(String, wire::Punch)>;

impl Paths {
    /// No pairs yet; nonces start above `seed` (pass something that grows across restarts,
    /// so an answer to an attempt of an earlier run never matches).
    pub fn new(seed: u64) -> Self {
        Self {
            pairs: BTreeMap::new(),
            next_nonce: seed,
        }
    }

    /// Makes the wanted pairs exactly `wanted`: new ones start on the relay with an attempt
    /// due now; pairs no longer wanted are forgotten.
    pub fn want(&mut self, wanted: BTreeSet<PairKey>, now_ms: i64) {
        self.pairs.retain(|k, _| wanted.contains(k));
        for k in wanted {
            self.pairs.entry(k).or_insert(Pair {
                state: PairState::Relay {
                    retry_at_ms: now_ms,
                    last_error: None,
                },
                failures: 0,
            });
        }
    }

    /// The nodes `node` may hold a direct connection with.
    pub fn peers_of(&self, node: &str) -> Vec<String> {
        self.pairs
            .keys()
            .filter_map(|(a, b)| {
                if a == node {
                    Some(b.clone())
                } else if b == node {
                    Some(a.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    /// The state of the pair of `a` and `b`, if it is wanted.
    pub fn state(&self, a: &str, b: &str) -> Option<&PairState> {
        self.pairs.get(&key(a, b)).map(|p| &p.state)
    }

    /// Starts the attempts that are due (both nodes connected: `addr` gives a connected
    /// node's reflexive address) and gives up on attempts past [`PUNCH_TIMEOUT_MS`].
    pub fn drive(&mut self, now_ms: i64, addr: impl Fn(&str) -> Option<SocketAddr>) -> Punches {
        let mut out = Vec::new();
        for ((a, b), pair) in &mut self.pairs {
            match pair.state {
                PairState::Punching { since_ms, .. } if now_ms - since_ms > PUNCH_TIMEOUT_MS => {
                    fail(pair, now_ms, "no answer in time".into());
                }
                PairState::Relay { retry_at_ms, .. } if retry_at_ms <= now_ms => {
                    let (Some(addr_a), Some(addr_b)) = (addr(a), addr(b)) else {
                        continue;
                    };
                    self.next_nonce += 1;
                    let nonce = self.next_nonce;
                    pair.state = PairState::Punching {
                        nonce,
                        since_ms: now_ms,
                        punched: [false; 2],
                    };
                    out.push((a.clone(), punch(b, addr_b, nonce, false)));
                    out.push((b.clone(), punch(a, addr_a, nonce, false)));
                }
                _ => {}
            }
        }
        out
    }

    /// Takes `from`'s report on its path with `r.peer_id`. Also says whether the pair's path
    /// changed (an RTT refresh of a direct pair does not).
    pub fn report(
        &mut self,
        from: &str,
        r: &wire::PeerPath,
        now_ms: i64,
        addr: impl Fn(&str) -> Option<SocketAddr>,
    ) -> (Punches, bool) {
        let k = key(from, &r.peer_id);
        let Some(pair) = self.pairs.get_mut(&k) else {
            return (Vec::new(), false);
        };
        let before = std::mem::discriminant(&pair.state);
        let punches = take_report(&k, pair, from, r, now_ms, addr);
        (punches, std::mem::discriminant(&pair.state) != before)
    }

    /// `node` lost its connection: an attempt it takes part in cannot finish (a direct
    /// connection it holds may well live on; its next report says).
    pub fn disconnected(&mut self, node: &str, now_ms: i64) {
        for ((a, b), pair) in &mut self.pairs {
            if (a == node || b == node) && matches!(pair.state, PairState::Punching { .. }) {
                fail(pair, now_ms, format!("node {node} disconnected"));
            }
        }
    }
}

/// Applies one report to `pair` (`k`: its key); returns the dial order once both punched.
fn take_report(
    k: &PairKey,
    pair: &mut Pair,
    from: &str,
    r: &wire::PeerPath,
    now_ms: i64,
    addr: impl Fn(&str) -> Option<SocketAddr>,
) -> Punches {
    use wire::peer_path::State;
    let side = usize::from(from != k.0);
    let current = match pair.state {
        PairState::Punching { nonce, .. } | PairState::Direct { nonce, .. } => nonce,
        PairState::Relay { .. } => return Vec::new(),
    };
    if r.nonce != current {
        return Vec::new();
    }
    match State::try_from(r.state).unwrap_or(State::Unspecified) {
        State::Punched => {
            if let PairState::Punching { punched, .. } = &mut pair.state
                && !punched[side]
            {
                punched[side] = true;
                if punched == &[true, true] {
                    // Both NATs are open towards each other: the lower id dials now.
                    if let Some(peer_addr) = addr(&k.1) {
                        return vec![(k.0.clone(), punch(&k.1, peer_addr, current, true))];
                    }
                    fail(pair, now_ms, "the peer disconnected".into());
                }
            }
        }
        State::Up => {
            pair.state = PairState::Direct {
                nonce: current,
                rtt_us: r.rtt_us,
            };
            pair.failures = 0;
        }
        State::Down => {
            if matches!(pair.state, PairState::Direct { .. }) {
                pair.failures = 0;
            }
            fail(pair, now_ms, r.reason.clone());
        }
        State::Unspecified => {}
    }
    Vec::new()
}

fn punch(peer: &str, peer_addr: SocketAddr, nonce: u64, dial: bool) -> wire::Punch {
    wire::Punch {
        peer_id: peer.to_owned(),
        peer_addr: peer_addr.to_string(),
        nonce,
        dial,
    }
}

/// Back to the relay; the next attempt after the backoff.
fn fail(pair: &mut Pair, now_ms: i64, why: String) {
    let delay = RETRY_FIRST_MS
        .saturating_mul(1 << pair.failures.min(16))
        .min(RETRY_MAX_MS);
    pair.failures = pair.failures.saturating_add(1);
    pair.state = PairState::Relay {
        retry_at_ms: now_ms + delay,
        last_error: Some(why),
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use wire::peer_path::State;

    fn addr(node: &str) -> Option<SocketAddr> {
        match node {
            "a" => Some("198.51.100.2:4000".parse().unwrap()),
            "b" => Some("192.0.2.2:5000".parse().unwrap()),
            _ => None,
        }
    }

    fn report(peer: &str, nonce: u64, state: State) -> wire::PeerPath {
        wire::PeerPath {
            peer_id: peer.into(),
            nonce,
            state: state as i32,
            rtt_us: 700,
            reason: "refused".into(),
        }
    }

    fn is_direct(p: &Paths) -> bool {
        matches!(p.state("a", "b"), Some(PairState::Direct { .. }))
    }

    fn wanted(pairs: &[(&str, &str)]) -> BTreeSet<PairKey> {
        pairs.iter().map(|(a, b)| key(a, b)).collect()
    }

    #[test]
    fn both_punch_before_the_lower_id_dials_then_the_pair_is_direct() {
        let mut p = Paths::new(100);
        p.want(wanted(&[("b", "a")]), 0);
        assert_eq!(p.peers_of("a"), vec!["b"]);
        assert_eq!(p.peers_of("b"), vec!["a"]);
        let out = p.drive(0, addr);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(_, m)| !m.dial && m.nonce == 101));
        assert_eq!(out[0].0, "a");
        assert_eq!(out[0].1.peer_addr, "192.0.2.2:5000");
        assert_eq!(out[1].1.peer_addr, "198.51.100.2:4000");
        // Nothing new while the attempt runs.
        assert!(p.drive(1, addr).is_empty());
        // One side punched: nobody dials yet; the same report twice changes nothing.
        assert!(
            p.report("b", &report("a", 101, State::Punched), 2, addr)
                .0
                .is_empty()
        );
        assert!(
            p.report("b", &report("a", 101, State::Punched), 2, addr)
                .0
                .is_empty()
        );
        let (dial, _) = p.report("a", &report("b", 101, State::Punched), 3, addr);
        assert_eq!(dial.len(), 1);
        assert_eq!(dial[0].0, "a", "the lower id dials");
        assert!(dial[0].1.dial);
        assert!(!is_direct(&p));
        p.report("b", &report("a", 101, State::Up), 4, addr);
        assert_eq!(
            p.state("a", "b"),
            Some(&PairState::Direct {
                nonce: 101,
                rtt_us: 700
            })
        );
    }

    #[test]
    fn stale_reports_are_ignored_and_failures_back_off() {
        let mut p = Paths::new(0);
        p.want(wanted(&[("a", "b")]), 0);
        p.drive(0, addr);
        // An answer to another attempt changes nothing.
        p.report("a", &report("b", 99, State::Up), 1, addr);
        assert!(!is_direct(&p));
        p.report("a", &report("b", 1, State::Down), 1_000, addr);
        assert!(matches!(
            p.state("a", "b"),
            Some(PairState::Relay { retry_at_ms: 6_000, last_error: Some(e) }) if e == "refused"
        ));
        assert!(p.drive(5_999, addr).is_empty(), "not before the backoff");
        assert_eq!(p.drive(6_000, addr).len(), 2);
        // No answer at all: the attempt times out, and the next delay doubles.
        assert!(p.drive(6_000 + PUNCH_TIMEOUT_MS, addr).is_empty());
        p.drive(6_001 + PUNCH_TIMEOUT_MS, addr);
        assert!(matches!(
            p.state("a", "b"),
            Some(PairState::Relay { retry_at_ms, .. }) if *retry_at_ms == 6_001 + PUNCH_TIMEOUT_MS + 10_000
        ));
    }

    #[test]
    fn a_direct_pair_that_goes_down_retries_soon_and_unwanted_pairs_are_forgotten() {
        let mut p = Paths::new(0);
        p.want(wanted(&[("a", "b")]), 0);
        p.drive(0, addr);
        p.report("a", &report("b", 1, State::Up), 1, addr);
        assert!(is_direct(&p));
        p.report("b", &report("a", 1, State::Down), 100, addr);
        assert!(matches!(
            p.state("a", "b"),
            Some(PairState::Relay {
                retry_at_ms: 5_100,
                ..
            })
        ));
        p.want(BTreeSet::new(), 200);
        assert_eq!(p.state("a", "b"), None);
        assert!(p.peers_of("a").is_empty());
    }

    #[test]
    fn no_attempt_while_a_node_is_away_and_an_attempt_ends_when_one_leaves() {
        let mut p = Paths::new(0);
        p.want(wanted(&[("a", "z")]), 0);
        assert!(p.drive(0, addr).is_empty(), "z is not connected");
        p.want(wanted(&[("a", "b")]), 0);
        p.drive(0, addr);
        p.disconnected("b", 10);
        assert!(matches!(p.state("a", "b"), Some(PairState::Relay { .. })));
    }
}
