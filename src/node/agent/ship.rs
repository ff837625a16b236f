//! Log shipping: one low-priority uni stream per deployment with new lines, paced below the
//! path's capacity, resuming after the conductor's last sequence.
//!
//! A shipper opens its stream lazily and finishes it after [`IDLE_CLOSE`] without lines, so
//! only deployments that are actually logging hold one of the connection's uni streams.

use std::time::Duration;

use symphony_net::{Pacer, Session, StreamKind};
use tokio_util::sync::CancellationToken;

use crate::node::logs::{LogBuffer, LogStream};
use crate::wire;

/// Log entries per batch on a log stream.
const LOG_BATCH: usize = 500;
/// Bytes per batch on a log stream (a batch is paced as a whole).
const LOG_BATCH_BYTES: usize = 64 * 1024;
/// A stream with no new lines for this long is finished (reopened on the next line).
pub(super) const IDLE_CLOSE: Duration = Duration::from_secs(30);

/// What one shipper needs.
#[derive(Debug)]
pub(super) struct Shipper {
    pub(super) session: Session,
    pub(super) id: String,
    pub(super) buffer: LogBuffer,
    /// Highest wire sequence the conductor already holds.
    pub(super) resume: u64,
    /// Added to local sequence numbers on the wire.
    pub(super) offset: u64,
    pub(super) pacer: Pacer,
    /// Fired when the deployment leaves this node.
    pub(super) cancel: CancellationToken,
}

impl Shipper {
    /// Ships until cancelled or the connection fails.
    pub(super) async fn run(self) {
        let Self {
            session,
            id,
            buffer,
            resume,
            offset,
            pacer,
            cancel,
        } = self;
        let mut after = resume.saturating_sub(offset);
        let mut notify = buffer.subscribe();
        let mut dropped_sent = buffer.dropped_lines();
        let mut stream = None;
        loop {
            let dropped = buffer.dropped_lines();
            if dropped > dropped_sent {
                // Lines lost to a full spool are never lost silently.
                buffer.push(
                    LogStream::System,
                    format!(
                        "{} log lines dropped: the node's log spool was full (output faster than the uplink)",
                        dropped - dropped_sent
                    ),
                );
            }
            // A read that reaches back into the spool runs on the log IO thread.
            let entries = buffer
                .since_within_async(after, LOG_BATCH, LOG_BATCH_BYTES)
                .await;
            if entries.is_empty() {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    r = notify.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(IDLE_CLOSE), if stream.is_some() => {
                        if let Some(mut s) = stream.take() {
                            let _ = symphony_net::FrameSender::get_mut(&mut s).finish();
                        }
                    }
                }
                continue;
            }
            let last = entries.last().map_or(after, |e| e.seq);
            let batch = wire::LogBatch {
                entries: entries
                    .into_iter()
                    .map(|e| wire::LogEntry {
                        seq: e.seq + offset,
                        timestamp_unix_ms: e.timestamp_ms,
                        stream: e.stream.as_str().to_owned(),
                        line: e.line,
                    })
                    .collect(),
                dropped: dropped.saturating_sub(dropped_sent),
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = pacer.acquire(prost::Message::encoded_len(&batch)) => {}
            }
            if stream.is_none() {
                let opened = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    s = session.open_uni(StreamKind::Log) => s,
                };
                let Ok(mut s) = opened else { return };
                if s.send(&wire::LogHeader {
                    deployment_id: id.clone(),
                })
                .await
                .is_err()
                {
                    return;
                }
                stream = Some(s);
            }
            let Some(s) = stream.as_mut() else { return };
            if s.send(&batch).await.is_err() {
                return;
            }
            after = last;
            dropped_sent = dropped;
        }
    }
}
