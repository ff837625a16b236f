//! One actor per node connection: reads Hello, hands the session to the core, then relays
//! control messages both ways, heartbeats to the core, and log batches straight into the log
//! hub (never through the core, so a log flood cannot delay scheduling).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use symphony_net::{
    Accepted, CloseCode, Enrollment, FrameError, FrameReceiver, Server, Session, StreamKind, Tunnel,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::{CoreHandle, CoreMsg, NodeConnected, TrustMsg};
use super::loghub::{LogHub, LogLine};
use crate::wire;

/// How long a node may take to send Hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Enrollments handled at once (more wait; each is a handshake, a store read and, when the
/// token is good, a signature and a store write).
const MAX_ENROLLING: usize = 64;
/// A node may ask for a new certificate at most this often.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// The live session of each connected node (with its epoch), for opening tunnels.
pub type Registry = Arc<Mutex<HashMap<String, (u64, Session)>>>;

/// Accepts node connections until `cancel`, then closes them all with `Shutdown`.
pub async fn serve(
    mut server: Server,
    core: CoreHandle,
    logs: LogHub,
    registry: Registry,
    cancel: CancellationToken,
) {
    let mut sessions = JoinSet::new();
    let mut enrollments = server.take_enrollments();
    let enrolling = Arc::new(tokio::sync::Semaphore::new(MAX_ENROLLING));
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            e = async { match enrollments.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => match e {
                Some(e) => {
                    sessions.spawn(enroll(e, core.clone(), enrolling.clone()));
                }
                None => enrollments = None,
            },
            acc = server.accept() => match acc {
                Some(acc) => {
                    let (core, logs, registry) = (core.clone(), logs.clone(), registry.clone());
                    sessions.spawn(node_session(acc, core, logs, registry, cancel.child_token()));
                }
                None => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    server.shutdown(Duration::from_secs(2)).await;
    sessions.shutdown().await;
}

/// Answers one node asking to join: its request goes to the core, which checks the token and
/// signs; the reply goes back, and the connection ends once the node has read it.
async fn enroll(e: Enrollment, core: CoreHandle, enrolling: Arc<tokio::sync::Semaphore>) {
    let Ok(_permit) = enrolling.acquire_owned().await else {
        return;
    };
    let Enrollment {
        remote,
        mut tx,
        mut rx,
        connection,
    } = e;
    let request = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv::<wire::EnrollRequest>()).await
    {
        Ok(Ok(Some(r))) => r,
        _ => {
            connection.close(
                CloseCode::ProtocolError.varint(),
                b"expected a join request",
            );
            return;
        }
    };
    let reply = match join_token(&core, &request).await {
        Err(why) => wire::EnrollReply {
            error: why.into(),
            ..wire::EnrollReply::default()
        },
        Ok(token) => {
            let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
            core.send(CoreMsg::Trust(TrustMsg::Enroll {
                request,
                token,
                remote,
                reply: reply_tx,
            }))
            .await;
            reply_rx.await.unwrap_or_else(|_| wire::EnrollReply {
                error: "conductor shutting down".into(),
                ..wire::EnrollReply::default()
            })
        }
    };
    if reply.error.is_empty() {
        tracing::info!(%remote, node_id = %reply.node_id, "node enrolled");
    } else {
        tracing::info!(%remote, error = %reply.error, "enrollment refused");
    }
    if tx.send(&reply).await.is_ok() {
        let _ = tx.get_mut().finish();
        // The node closes once it has the reply; closing first could drop it.
        let _ = tokio::time::timeout(HELLO_TIMEOUT, connection.closed()).await;
    }
    connection.close(CloseCode::Shutdown.varint(), b"done");
}

/// The join token a request names, its secret checked here (an unknown token or a wrong
/// secret costs one store read in this task and none of the core's time); `Ok(None)` for a
/// request that names no token (a renewal after expiry).
async fn join_token(
    core: &CoreHandle,
    request: &wire::EnrollRequest,
) -> Result<Option<Box<super::trust::JoinTokenRecord>>, &'static str> {
    let Some(wire::enroll_request::How::Join(j)) = &request.how else {
        return Ok(None);
    };
    match core.store().get_join_token(&j.token_id).await {
        Ok(t) if super::trust::secret_matches(&j.secret, &t.secret_hash) => Ok(Some(Box::new(t))),
        Ok(_) | Err(super::store::StoreError::NotFound) => Err("unknown join token"),
        Err(e) => {
            tracing::error!(error = %e, "store failure reading a join token");
            Err("conductor store unavailable")
        }
    }
}

async fn node_session(
    acc: Accepted,
    core: CoreHandle,
    logs: LogHub,
    registry: Registry,
    cancel: CancellationToken,
) {
    let Accepted {
        identity,
        session,
        mut control,
    } = acc;
    let node_id = identity.node_id;
    let hello =
        match tokio::time::timeout(HELLO_TIMEOUT, control.rx.recv::<wire::NodeMessage>()).await {
            Ok(Ok(Some(wire::NodeMessage {
                msg: Some(wire::node_message::Msg::Hello(h)),
            }))) => h,
            _ => {
                tracing::info!(%node_id, "no hello; closing");
                session.close(CloseCode::ProtocolError, "expected hello");
                return;
            }
        };
    if hello.protocol_version != wire::ProtocolVersion::Current as u32 {
        session.close(CloseCode::VersionMismatch, "unsupported protocol version");
        return;
    }
    if !hello.node_id.is_empty() && hello.node_id != node_id {
        tracing::warn!(%node_id, claimed = %hello.node_id, "hello names another node than the certificate");
        session.close(
            CloseCode::AuthFailed,
            "node id does not match the certificate",
        );
        return;
    }
    let epoch = core.next_epoch();
    let ack = wire::ConductorMessage {
        msg: Some(wire::conductor_message::Msg::HelloAck(wire::HelloAck {
            session_epoch: epoch,
        })),
    };
    if control.tx.send(&ack).await.is_err() {
        return;
    }
    // Commands are small and the core never waits on this queue (it closes a node that stops
    // reading), so it is sized for a full resync of a large node after Hello.
    let (tx, mut rx) = mpsc::channel::<wire::ConductorMessage>(65_536);
    if let Ok(mut r) = registry.lock()
        && r.get(&node_id).is_none_or(|(e, _)| *e < epoch)
    {
        r.insert(node_id.clone(), (epoch, session.clone()));
    }
    let commands = tx.clone();
    core.send(CoreMsg::NodeConnected(Box::new(NodeConnected {
        node_id: node_id.clone(),
        epoch,
        hello,
        tx,
        session: session.clone(),
    })))
    .await;

    let mut tasks = JoinSet::new();
    tasks.spawn(session.clone().watch_path());
    // Conductor -> node.
    {
        let (mut ctl_tx, session) = (control.tx, session.clone());
        tasks.spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Err(e) = ctl_tx.send(&m).await {
                    // A command that cannot be sent must not leave the node deaf: close, so it
                    // reconnects and resynchronises.
                    tracing::warn!(error = %e, "command write failed; closing the node's connection");
                    if !session.is_closed() {
                        session.close(CloseCode::ProtocolError, "command write failed");
                    }
                    break;
                }
            }
        });
    }
    // Node -> conductor control.
    {
        let (core, session, node_id) = (core.clone(), session.clone(), node_id.clone());
        let mut ctl_rx = control.rx;
        tasks.spawn(async move {
            let mut last_renew: Option<tokio::time::Instant> = None;
            loop {
                match ctl_rx.recv::<wire::NodeMessage>().await {
                    Ok(Some(wire::NodeMessage {
                        msg: Some(wire::node_message::Msg::Renew(r)),
                    })) => {
                        if last_renew.is_some_and(|t| t.elapsed() < MIN_RENEW_INTERVAL) {
                            let _ = commands.try_send(wire::ConductorMessage {
                                msg: Some(wire::conductor_message::Msg::Renewed(
                                    wire::RenewReply {
                                        error: "renewal asked too soon after the last one".into(),
                                        ..wire::RenewReply::default()
                                    },
                                )),
                            });
                            continue;
                        }
                        last_renew = Some(tokio::time::Instant::now());
                        // Answered off this loop: control messages keep flowing meanwhile.
                        let (core, node_id, commands) =
                            (core.clone(), node_id.clone(), commands.clone());
                        tokio::spawn(async move {
                            let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                            core.send(CoreMsg::Trust(TrustMsg::Renew {
                                node_id,
                                csr_pem: r.csr_pem,
                                reply: reply_tx,
                            }))
                            .await;
                            if let Ok(reply) = reply_rx.await {
                                let _ = commands
                                    .send(wire::ConductorMessage {
                                        msg: Some(wire::conductor_message::Msg::Renewed(reply)),
                                    })
                                    .await;
                            }
                        });
                    }
                    Ok(Some(wire::NodeMessage { msg: Some(msg) })) => {
                        core.send(CoreMsg::NodeMessage {
                            node_id: node_id.clone(),
                            epoch,
                            msg,
                        })
                        .await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        tracing::warn!(%node_id, len, max, "control frame too large");
                        session.close(CloseCode::FrameTooLarge, "control frame too large");
                        break;
                    }
                    Err(FrameError::Decode(e)) => {
                        tracing::warn!(%node_id, error = %e, "malformed control frame");
                        session.close(CloseCode::ProtocolError, "malformed control frame");
                        break;
                    }
                    Err(_) => break,
                }
            }
        });
    }
    // Uni streams: heartbeats and logs. Each stream is read in its own task (a slow or bad
    // stream never holds up the others).
    {
        let (core, session, node_id, logs) =
            (core.clone(), session.clone(), node_id.clone(), logs.clone());
        tasks.spawn(async move {
            let mut streams = JoinSet::new();
            loop {
                tokio::select! {
                    incoming = session.accept_uni_stream() => {
                        let Ok(incoming) = incoming else { break };
                        let (core, node_id, logs) = (core.clone(), node_id.clone(), logs.clone());
                        streams.spawn(async move {
                            match incoming.kind().await {
                                Ok((StreamKind::Heartbeat, rx)) => heartbeats(rx, core, node_id, epoch).await,
                                Ok((kind @ (StreamKind::Log | StreamKind::Logs), rx)) => log_stream(rx, core, logs, node_id, kind).await,
                                Err(e) => tracing::info!(%node_id, error = %e, "refused a stream"),
                            }
                        });
                    }
                    Some(_) = streams.join_next(), if !streams.is_empty() => {}
                }
            }
            streams.shutdown().await;
        });
    }
    // Tunnels the node opens: each relayed to the binder's node.
    {
        let (core, session, registry) = (core.clone(), session.clone(), registry.clone());
        let node_id = node_id.clone();
        tasks.spawn(async move {
            let mut relays = JoinSet::new();
            loop {
                tokio::select! {
                    t = session.accept_tunnel() => {
                        let Ok(t) = t else { break };
                        relays.spawn(relay(t, node_id.clone(), core.clone(), registry.clone()));
                    }
                    Some(_) = relays.join_next(), if !relays.is_empty() => {}
                }
            }
            relays.shutdown().await;
        });
    }
    tokio::select! {
        () = cancel.cancelled() => session.close(CloseCode::Shutdown, "conductor shutting down"),
        _ = session.closed() => {}
    }
    if let Ok(mut r) = registry.lock()
        && r.get(&node_id).is_some_and(|(e, _)| *e == epoch)
    {
        r.remove(&node_id);
    }
    core.send(CoreMsg::NodeDisconnected { node_id, epoch })
        .await;
    tasks.shutdown().await;
}

async fn heartbeats(mut rx: FrameReceiver, core: CoreHandle, node_id: String, epoch: u64) {
    while let Ok(Some(hb)) = rx.recv::<wire::Heartbeat>().await {
        core.send(CoreMsg::Heartbeat {
            node_id: node_id.clone(),
            epoch,
            hb,
        })
        .await;
    }
}

/// Deployments whose refusal one log stream reports (once each), at most.
const REFUSALS_REPORTED: usize = 1024;

/// Appends one batch of `id`'s lines from node `from` to the hub; false when the hub refuses
/// them (the deployment's latest placement is not on that node, or it is gone).
fn append_batch(
    logs: &LogHub,
    metrics: &super::metrics::Metrics,
    from: &str,
    id: &str,
    batch: wire::LogBatch,
) -> bool {
    let (lines, bytes) = (
        batch.entries.len() as u64,
        batch.entries.iter().map(|e| e.line.len() as u64).sum(),
    );
    let taken = logs.append(
        from,
        id,
        batch.entries.into_iter().map(|e| LogLine {
            seq: e.seq,
            timestamp_unix_ms: e.timestamp_unix_ms,
            stream: e.stream,
            line: e.line,
        }),
    );
    if taken.is_some() {
        metrics.log_lines.inc_by(lines);
        metrics.log_bytes.inc_by(bytes);
        metrics.log_lines_dropped.inc_by(batch.dropped);
    }
    taken.is_some()
}

/// Reads a node's log stream into the hub: the `Logs` kind (batches of all its deployments,
/// each naming its own) or, from nodes before it, a `Log` stream (a header naming one
/// deployment, then its batches). The hub takes a deployment's lines only from the node of
/// its latest placement, recorded before the `Assign` was sent (so a node's first lines
/// never arrive before it); refused ones are dropped and said once per deployment.
async fn log_stream(
    mut rx: FrameReceiver,
    core: CoreHandle,
    logs: LogHub,
    node_id: String,
    kind: StreamKind,
) {
    let named = if kind == StreamKind::Log {
        match rx.recv::<wire::LogHeader>().await {
            Ok(Some(header)) => Some(header.deployment_id),
            _ => return,
        }
    } else {
        None
    };
    let metrics = core.metrics();
    let mut refused = HashSet::new();
    while let Ok(Some(mut batch)) = rx.recv::<wire::LogBatch>().await {
        let id = match &named {
            Some(id) => id.clone(),
            None => std::mem::take(&mut batch.deployment_id),
        };
        if !append_batch(&logs, metrics, &node_id, &id, batch)
            && refused.len() < REFUSALS_REPORTED
            && refused.insert(id.clone())
        {
            tracing::info!(%node_id, deployment = %id, "refusing logs of a deployment not placed on this node");
        }
    }
}

/// Relays one tunnel a node opened to the node that binds its service, copying both ways
/// until both ends are done. Only a node that runs a deployment (and so was given the
/// namespace's routes) may reach its services.
async fn relay(mut from: Tunnel, node_id: String, core: CoreHandle, registry: Registry) {
    let header = tokio::time::timeout(crate::model::TUNNEL_HOLD, from.header::<wire::TunnelOpen>());
    let Ok(Ok(Some(open))) = header.await else {
        from.reset();
        return;
    };
    let runs_any = core
        .subscribe()
        .borrow()
        .nodes
        .get(&node_id)
        .is_some_and(|n| !n.assigned_deployments.is_empty());
    if !runs_any {
        tracing::warn!(%node_id, service = %open.name, "refusing a tunnel from a node that runs no deployment");
        from.reset();
        return;
    }
    let to = match open_to_service(&core, &registry, &open.namespace, &open.name).await {
        Ok(to) => to,
        Err(e) => {
            tracing::info!(service = %open.name, error = %e, "resetting a tunnel");
            from.reset();
            return;
        }
    };
    if let Err(e) = from.splice_tunnel(to).await {
        tracing::debug!(error = %e, "relayed tunnel ended abruptly");
    }
}

/// Opens a tunnel to the service `namespace/name` on its binder's node, waiting at most
/// [`crate::model::TUNNEL_HOLD`] until the service is placed on a connected node.
pub async fn open_to_service(
    core: &CoreHandle,
    registry: &Registry,
    namespace: &str,
    name: &str,
) -> Result<Tunnel, String> {
    let deadline = tokio::time::Instant::now() + crate::model::TUNNEL_HOLD;
    let mut view = core.subscribe();
    let (session, port) = loop {
        let placed = view
            .borrow_and_update()
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .and_then(|s| Some((s.node_id.clone()?, s.port)));
        let target = placed.and_then(|(node, port)| {
            let r = registry.lock().ok()?;
            r.get(&node).map(|(_, s)| (s.clone(), port))
        });
        if let Some(t) = target {
            break t;
        }
        if tokio::time::timeout_at(deadline, view.changed())
            .await
            .is_err()
        {
            return Err(format!("service {name:?} has no reachable binder"));
        }
    };
    let header = wire::TunnelOpen {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port: u32::from(port),
    };
    // The binder's node takes a bounded number of tunnels at once: never wait past the hold.
    let opened = tokio::time::timeout_at(deadline, async {
        let mut to = session.open_tunnel().await.map_err(|e| e.to_string())?;
        match to.send_header(&header).await {
            Ok(()) => Ok(to),
            Err(e) => {
                to.reset();
                Err(e.to_string())
            }
        }
    });
    opened
        .await
        .map_err(|_| format!("the node of service {name:?} takes no more tunnels now"))?
}
