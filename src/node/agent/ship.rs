//! Log shipping: one low-priority uni stream per connection (`StreamKind::Logs`) carries the
//! new lines of every deployment the node holds, each batch naming its deployment, paced
//! below the path's capacity, resuming after the conductor's last sequence.
//!
//! A workflow task lives for milliseconds and logs two lines; a stream of its own (opened,
//! framed and finished, each a packet of its own and a task on both ends) cost more than the
//! rest of its report. Here lines that arrive together leave together: once idle, the shipper
//! waits [`GATHER`] after the first new line, then writes one batch per deployment with lines,
//! all in one write (usually one packet).
//!
//! Invariants:
//! - The deployments' batches take turns (at most [`LOG_BATCH`] entries and
//!   [`LOG_BATCH_BYTES`] each per write), so one that floods never holds up another's lines;
//!   a write that left lines behind is followed at once by the next (paced), without waiting.
//! - A deployment's batches go out in sequence order; when it stops being shipped (it left the
//!   node, [`ShipCmd::Stop`]), what it logged until then is shipped, then it is forgotten.
//! - A write that fails ends the shipper and closes the connection: the next one starts every
//!   deployment again from the conductor's `LogResume`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures_util::FutureExt;
use symphony_net::{CloseCode, FrameSender, Pacer, Session, StreamKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::WatchStream;

use crate::node::logs::{LogBuffer, LogStream};
use crate::wire;

/// Log entries of one deployment per batch.
const LOG_BATCH: usize = 500;
/// Bytes of one deployment's batch (a write is paced as a whole).
const LOG_BATCH_BYTES: usize = 64 * 1024;
/// Bytes after which a write takes no further deployment's batch.
const WRITE_BYTES: usize = 256 * 1024;
/// How long an idle shipper waits after a new line for more (of any deployment) before it
/// writes: lines of tasks that start and end together leave in one packet.
pub(super) const GATHER: Duration = Duration::from_millis(10);

/// What the driver tells the connection's shipper.
#[derive(Debug)]
pub(super) enum ShipCmd {
    /// Ship `id`'s lines after `resume` (the conductor's last sequence), adding `offset` to
    /// local sequence numbers (replaces an earlier start of the same id).
    Start {
        id: String,
        buffer: LogBuffer,
        resume: u64,
        offset: u64,
    },
    /// `id` left the node: ship what it logged until now, then forget it.
    Stop(String),
}

/// One deployment being shipped.
struct Source {
    buffer: LogBuffer,
    /// The last local sequence shipped.
    after: u64,
    /// Added to local sequence numbers on the wire.
    offset: u64,
    dropped_sent: u64,
    /// Stopped: shipped up to what it holds, then forgotten.
    ending: bool,
}

/// The connection's shipper (see the module docs).
#[derive(Debug)]
pub(super) struct Shipper {
    pub(super) session: Session,
    pub(super) pacer: Pacer,
    pub(super) cmds: mpsc::UnboundedReceiver<ShipCmd>,
}

/// Deployments with lines to ship, in turn order, each once.
#[derive(Default)]
struct Turns {
    order: VecDeque<String>,
    queued: HashSet<String>,
}

impl Turns {
    fn push(&mut self, id: &str) {
        if self.queued.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
        }
    }

    fn pop(&mut self) -> Option<String> {
        let id = self.order.pop_front()?;
        self.queued.remove(&id);
        Some(id)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Shipper {
    /// Ships until the connection ends (the driver drops the command sender) or a write
    /// fails (then the connection is closed).
    pub(super) async fn run(self) {
        let Self {
            session,
            pacer,
            mut cmds,
        } = self;
        let mut sources: HashMap<String, Source> = HashMap::new();
        let mut changes: StreamMap<String, WatchStream<u64>> = StreamMap::new();
        let mut turns = Turns::default();
        let mut stream: Option<FrameSender> = None;
        let mut behind = false;
        loop {
            if turns.is_empty() {
                tokio::select! {
                    cmd = cmds.recv() => match cmd {
                        Some(cmd) => apply(cmd, &mut sources, &mut changes, &mut turns),
                        None => return,
                    },
                    Some((id, _)) = changes.next() => turns.push(&id),
                }
                continue;
            }
            if behind {
                // Lines left from the last write go at once, but what happened meanwhile
                // (starts, stops, new lines of others) still joins: a flood never holds up
                // another deployment.
                loop {
                    match cmds.try_recv() {
                        Ok(cmd) => apply(cmd, &mut sources, &mut changes, &mut turns),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                while let Some(Some((id, _))) = changes.next().now_or_never() {
                    turns.push(&id);
                }
            } else {
                // Idle until now: more lines (of this and other deployments) join the write.
                let until = Instant::now() + GATHER;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        cmd = cmds.recv() => match cmd {
                            Some(cmd) => apply(cmd, &mut sources, &mut changes, &mut turns),
                            None => return,
                        },
                        Some((id, _)) = changes.next() => turns.push(&id),
                    }
                }
            }
            let (batches, left) = take_turns(&mut sources, &mut turns).await;
            behind = left;
            if batches.is_empty() {
                continue;
            }
            let bytes = batches.iter().map(prost::Message::encoded_len).sum();
            pacer.acquire(bytes).await;
            if stream.is_none() {
                match session.open_uni(StreamKind::Logs).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::info!(error = %e, "cannot open the log stream; reconnecting");
                        close(&session);
                        return;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { return };
            if let Err(e) = s.send_all(&batches).await {
                tracing::info!(error = %e, "the log stream failed; reconnecting");
                close(&session);
                return;
            }
        }
    }
}

fn close(session: &Session) {
    super::close_unless_closed(session, CloseCode::ProtocolError, "log stream failed");
}

fn apply(
    cmd: ShipCmd,
    sources: &mut HashMap<String, Source>,
    changes: &mut StreamMap<String, WatchStream<u64>>,
    turns: &mut Turns,
) {
    match cmd {
        ShipCmd::Start {
            id,
            buffer,
            resume,
            offset,
        } => {
            changes.insert(id.clone(), WatchStream::from_changes(buffer.subscribe()));
            turns.push(&id);
            let dropped_sent = buffer.dropped_lines();
            sources.insert(
                id,
                Source {
                    buffer,
                    after: resume.saturating_sub(offset),
                    offset,
                    dropped_sent,
                    ending: false,
                },
            );
        }
        ShipCmd::Stop(id) => {
            changes.remove(&id);
            if let Some(s) = sources.get_mut(&id) {
                s.ending = true;
                turns.push(&id);
            }
        }
    }
}

/// One batch of each deployment whose turn it is (until [`WRITE_BYTES`]), and whether any
/// has lines left for the next write.
async fn take_turns(
    sources: &mut HashMap<String, Source>,
    turns: &mut Turns,
) -> (Vec<wire::LogBatch>, bool) {
    let mut batches = Vec::new();
    let mut bytes = 0;
    let mut left = Vec::new();
    while bytes < WRITE_BYTES {
        let Some(id) = turns.pop() else { break };
        let Some(source) = sources.get_mut(&id) else {
            continue;
        };
        let dropped = source.buffer.dropped_lines();
        if dropped > source.dropped_sent {
            // Lines lost to a full spool are never lost silently.
            source.buffer.push(
                LogStream::System,
                format!(
                    "{} log lines dropped: the node's log spool was full (output faster than the uplink)",
                    dropped - source.dropped_sent
                ),
            );
        }
        // A read that reaches back into the spool runs on the log IO thread.
        let entries = source
            .buffer
            .since_within_async(source.after, LOG_BATCH, LOG_BATCH_BYTES)
            .await;
        let more = entries.len() == LOG_BATCH
            || entries
                .last()
                .is_some_and(|e| e.seq < source.buffer.last_seq());
        let end = source.ending && !more;
        if entries.is_empty() && dropped == source.dropped_sent {
            if end {
                sources.remove(&id);
            }
            continue;
        }
        source.after = entries.last().map_or(source.after, |e| e.seq);
        let batch = wire::LogBatch {
            entries: entries
                .into_iter()
                .map(|e| wire::LogEntry {
                    seq: e.seq + source.offset,
                    timestamp_unix_ms: e.timestamp_ms,
                    stream: e.stream.as_str().to_owned(),
                    line: e.line,
                })
                .collect(),
            dropped: dropped.saturating_sub(source.dropped_sent),
            deployment_id: id.clone(),
        };
        source.dropped_sent = dropped;
        bytes += prost::Message::encoded_len(&batch);
        batches.push(batch);
        if end {
            sources.remove(&id);
        } else if more {
            left.push(id);
        }
    }
    let behind = !left.is_empty() || !turns.is_empty();
    for id in left {
        turns.push(&id);
    }
    (batches, behind)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use symphony_net::{
        CertificateAuthority, Client, ClientConfig, FrameReceiver, PacerConfig, Server,
        TlsMaterial, TransportSettings, Validity,
    };

    use super::*;

    /// A node's session (`.0`) and the conductor's end of it (`.1`), over loopback.
    async fn sessions() -> (Session, Session, Client, Server) {
        let ca = CertificateAuthority::generate(Validity::days(1)).unwrap();
        let cert = ca
            .issue_server(&["127.0.0.1".into()], Validity::days(1))
            .unwrap();
        let tls = |pair: symphony_net::pki::PemPair| TlsMaterial {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: pair.cert_pem,
            key_pem: pair.key_pem,
        };
        let mut server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &tls(cert),
            TransportSettings::default(),
        )
        .unwrap();
        let mut cfg = ClientConfig::new(
            server.local_addr().unwrap().to_string(),
            tls(ca.issue_node("n1", Validity::days(1)).unwrap()),
        );
        cfg.server_name = Some("localhost".into());
        cfg.bind = "127.0.0.1:0".parse().unwrap();
        let client = Client::new(cfg).unwrap();
        let (session, mut control) = client.connect().await.unwrap();
        // The conductor sees a connection once its control stream carries something.
        control.tx.send(&wire::LogHeader::default()).await.unwrap();
        let accepted = server.accept().await.unwrap();
        (session, accepted.session, client, server)
    }

    fn lines(b: &wire::LogBatch) -> Vec<(u64, &str)> {
        b.entries.iter().map(|e| (e.seq, e.line.as_str())).collect()
    }

    async fn next(rx: &mut FrameReceiver) -> wire::LogBatch {
        rx.recv::<wire::LogBatch>().await.unwrap().unwrap()
    }

    /// A shipper on `session`, and where to send it commands.
    fn shipper(session: &Session, pacer: Pacer) -> mpsc::UnboundedSender<ShipCmd> {
        let (cmds, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            Shipper {
                session: session.clone(),
                pacer,
                cmds: rx,
            }
            .run(),
        );
        cmds
    }

    #[tokio::test]
    async fn every_deployment_ships_on_one_stream_and_a_stopped_one_ships_its_last_lines() {
        let (node, conductor, _client, _server) = sessions().await;
        let pacer = Pacer::new(node.connection().clone(), PacerConfig::default());
        tokio::spawn(pacer.clone().run());
        let cmds = shipper(&node, pacer);
        let (a, b) = (LogBuffer::in_memory(100), LogBuffer::in_memory(100));
        a.push(LogStream::Stdout, "a1");
        a.push(LogStream::Stdout, "a2");
        b.push(LogStream::Stderr, "b1");
        for (id, buffer, resume, offset) in [("a", &a, 1, 0), ("b", &b, 0, 10)] {
            cmds.send(ShipCmd::Start {
                id: id.into(),
                buffer: buffer.clone(),
                resume,
                offset,
            })
            .unwrap();
        }
        let (kind, mut rx) = conductor.accept_uni().await.unwrap();
        assert_eq!(kind, StreamKind::Logs);
        // Both, after what the conductor holds, the offset added.
        let mut first = [next(&mut rx).await, next(&mut rx).await];
        first.sort_by(|x, y| x.deployment_id.cmp(&y.deployment_id));
        assert_eq!(first[0].deployment_id, "a");
        assert_eq!(lines(&first[0]), [(2, "a2")]);
        assert_eq!(first[1].deployment_id, "b");
        assert_eq!(lines(&first[1]), [(11, "b1")]);
        // A line logged just before the stop still leaves.
        a.push(LogStream::Stdout, "a3");
        cmds.send(ShipCmd::Stop("a".into())).unwrap();
        let last = next(&mut rx).await;
        assert_eq!(
            (last.deployment_id.as_str(), lines(&last)),
            ("a", vec![(3, "a3")])
        );
        // Forgotten: its later lines are not shipped; the other's are, on the same stream.
        a.push(LogStream::Stdout, "a4");
        b.push(LogStream::Stderr, "b2");
        let later = next(&mut rx).await;
        assert_eq!(
            (later.deployment_id.as_str(), lines(&later)),
            ("b", vec![(12, "b2")])
        );
    }

    #[tokio::test]
    async fn a_flooding_deployment_holds_up_no_other_started_after_it() {
        let (node, conductor, _client, _server) = sessions().await;
        // Slow enough that the flood is still being written when the other one starts (the
        // pacer is not started, so it keeps this rate).
        let rate = 64.0 * 1024.0;
        let pacer = Pacer::new(
            node.connection().clone(),
            PacerConfig {
                initial_rate: rate,
                min_rate: rate,
                max_rate: rate,
                ..PacerConfig::default()
            },
        );
        let cmds = shipper(&node, pacer);
        let flood = LogBuffer::in_memory(20 * LOG_BATCH);
        flood.push_batch(
            LogStream::Stdout,
            (0..10 * LOG_BATCH).map(|i| format!("line {i}")),
        );
        cmds.send(ShipCmd::Start {
            id: "flood".into(),
            buffer: flood,
            resume: 0,
            offset: 0,
        })
        .unwrap();
        let (_, mut rx) = conductor.accept_uni().await.unwrap();
        assert_eq!(next(&mut rx).await.deployment_id, "flood");
        // Started, and its line logged, while the flood is being written.
        let quiet = LogBuffer::in_memory(10);
        cmds.send(ShipCmd::Start {
            id: "quiet".into(),
            buffer: quiet.clone(),
            resume: 0,
            offset: 0,
        })
        .unwrap();
        quiet.push(LogStream::Stdout, "hello");
        let mut flooded = LOG_BATCH;
        let mut flood_batches_before = 0;
        loop {
            let b = next(&mut rx).await;
            if b.deployment_id == "quiet" {
                assert_eq!(lines(&b), [(1, "hello")]);
                break;
            }
            // In order, none twice.
            assert_eq!(b.entries[0].seq, flooded as u64 + 1);
            flooded += b.entries.len();
            flood_batches_before += 1;
        }
        // It went out with the next write or the one after, not after the whole flood.
        assert!(flood_batches_before <= 2, "{flood_batches_before}");
        assert!(flooded < 10 * LOG_BATCH, "the flood was still going");
    }
}
