//! The node agent: the connection to the conductor.
//!
//! It dials out (`symphony-net` client, re-dialling forever), sends Hello with its full
//! inventory after every fresh connection, applies commands by generation through the
//! supervisor, pushes status changes as they happen, ships logs on one low-priority stream per
//! deployment (resuming at the conductor's last sequence), and sends a usage heartbeat about
//! once a second. Processes keep running while the conductor is unreachable. A bad command
//! fails that deployment with a reason; it never closes the connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use symphony_net::{
    Client, ClientConfig, ClientEvent, Control, Session, StreamKind, TlsMaterial, TransportSettings,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::envs::{self, EnvDefinition, Envs, ManagerKind};
use super::logs::LogBuffer;
use super::monitor::{Monitor, UsageSample};
use super::state::{Held, LocalState};
use super::supervisor::{
    DeploymentStatus, Hooks, Prepare, Prepared, RunState, Supervisor, SupervisorConfig,
};
use super::workspace;
use crate::spec::DeploymentSpec;
use crate::wire;

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// `host:port` of the conductor.
    pub conductor_addr: String,
    /// Name expected in the conductor's certificate (default: the host of `conductor_addr`).
    pub server_name: Option<String>,
    pub tls: TlsMaterial,
    pub groups: Vec<String>,
    pub capacities_total: BTreeMap<String, i64>,
    /// Usage heartbeat period.
    pub heartbeat: Duration,
    /// Workspaces, envs, log spools and local state live here.
    pub work_dir: PathBuf,
    pub transport: TransportSettings,
}

/// Log entries per batch on a log stream.
const LOG_BATCH: usize = 500;
/// Bytes per batch on a log stream (a batch is paced as a whole).
const LOG_BATCH_BYTES: usize = 64 * 1024;

/// Runs the node until `cancel`; then stops every workload and closes the connection.
pub async fn run(cfg: NodeConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    check_identity(&cfg)?;
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating work dir {}", cfg.work_dir.display()))?;
    let state = LocalState::new(cfg.work_dir.join("state.bin"));
    let held = state.load().context("reading local state")?;

    let discovery = envs::discover();
    for note in &discovery.notes {
        tracing::info!("{note}");
    }
    let envs = Arc::new(Envs::from_discovery(&cfg.work_dir, &discovery));
    let hooks = Hooks {
        prepare: Arc::new(AgentPrepare {
            work_dir: cfg.work_dir.clone(),
            envs: envs.clone(),
        }),
        cron: Some(Arc::new(|ar: &crate::spec::AutoRestart| {
            let schedule = crate::spec::cron_schedule(&ar.cron)?;
            let tz: chrono_tz::Tz = ar
                .timezone
                .parse()
                .map_err(|_| format!("unknown time zone {}", ar.timezone))?;
            Ok(
                Arc::new(move |now| crate::spec::next_fire(&schedule, tz, now))
                    as super::supervisor::NextFire,
            )
        })),
    };
    let node_env: BTreeMap<String, String> = std::env::vars().collect();
    let (sup, mut events) =
        Supervisor::with_hooks(SupervisorConfig::new(cfg.work_dir.clone(), node_env), hooks);
    // Come back knowing what we ran.
    for h in &held {
        if let Err(e) = sup.apply(&h.id, h.generation, h.desired_running, h.spec.clone()) {
            tracing::warn!(id = %h.id, error = %e, "could not restore deployment from local state");
        }
    }
    tracing::info!(restored = held.len(), node_id = %cfg.node_id, "node agent started");

    // Usage sampling, about once per heartbeat period, off the async workers.
    let mut monitor = Monitor::new();
    let static_info = monitor.static_info();
    let (usage_tx, usage_rx) = watch::channel::<Option<UsageSample>>(None);
    let mut tasks = JoinSet::new();
    {
        let (period, cancel) = (cfg.heartbeat, cancel.clone());
        tasks.spawn(async move {
            let monitor = Arc::new(Mutex::new(monitor));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let m = monitor.clone();
                let sample =
                    tokio::task::spawn_blocking(move || m.lock().ok().map(|mut m| m.sample()))
                        .await;
                if let Ok(Some(s)) = sample {
                    usage_tx.send_replace(Some(s));
                }
            }
        });
    }

    // Status changes go to whichever connection is current (the next Hello resends all).
    let outbound: Arc<Mutex<Option<mpsc::Sender<wire::NodeMessage>>>> = Arc::new(Mutex::new(None));
    let log_offsets: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(
        held.iter().map(|h| (h.id.clone(), h.log_offset)).collect(),
    ));
    {
        let (outbound, offsets) = (outbound.clone(), log_offsets.clone());
        tasks.spawn(async move {
            while let Some(st) = events.recv().await {
                let tx = outbound.lock().ok().and_then(|o| o.clone());
                if let Some(tx) = tx {
                    let offset = offsets
                        .lock()
                        .ok()
                        .and_then(|o| o.get(&st.id).copied())
                        .unwrap_or(0);
                    let msg = status_msg(vec![to_wire(&st, offset)], vec![]);
                    let _ = tx.send(msg).await;
                }
            }
        });
    }

    let mut ccfg = ClientConfig::new(cfg.conductor_addr.clone(), cfg.tls.clone());
    ccfg.server_name = cfg.server_name.clone();
    ccfg.settings = cfg.transport.clone();
    let client = Arc::new(Client::new(ccfg).context("creating the QUIC endpoint")?);
    let (mut conns, conn_task) = client.clone().run(cancel.child_token());
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        sup: sup.clone(),
        state,
        envs,
        static_info,
        usage: usage_rx,
        outbound,
        invalid: Mutex::new(HashMap::new()),
        log_offsets,
        instance_id: uuid::Uuid::new_v4().simple().to_string(),
    });
    let mut fatal = None;
    loop {
        let ev = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            ev = conns.recv() => ev,
        };
        match ev {
            Some(ClientEvent::Connected { session, control }) => {
                let conn_cancel = cancel.child_token();
                agent
                    .clone()
                    .connection(session, control, conn_cancel)
                    .await;
            }
            Some(ClientEvent::Fatal(code, why)) => {
                tracing::error!(%code, %why, "conductor closed this node's connection for good; not reconnecting");
                fatal = Some(format!(
                    "the conductor closed the connection: {code} ({why})"
                ));
                break;
            }
            None => break,
        }
    }
    tracing::info!("node shutting down: stopping workloads");
    sup.shutdown().await;
    conn_task.abort();
    tasks.shutdown().await;
    match fatal {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

fn check_identity(cfg: &NodeConfig) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cfg.tls.cert_pem.as_bytes())
        .context("node certificate is not valid PEM")?;
    let id = symphony_net::pki::node_id_from_cert(&der)
        .context("node certificate carries no node identity")?;
    if id != cfg.node_id {
        anyhow::bail!(
            "node.node_id is {:?} but the certificate was issued for {:?}; issue a certificate for this node (symphony cert node {})",
            cfg.node_id,
            id,
            cfg.node_id
        );
    }
    Ok(())
}

struct Agent {
    cfg: NodeConfig,
    sup: Supervisor,
    state: LocalState,
    envs: Arc<Envs>,
    static_info: super::monitor::StaticResources,
    usage: watch::Receiver<Option<UsageSample>>,
    outbound: Arc<Mutex<Option<mpsc::Sender<wire::NodeMessage>>>>,
    /// Deployments whose spec could not be parsed here: reported FAILED with the reason.
    invalid: Mutex<HashMap<String, wire::DeploymentStatus>>,
    /// Per deployment: added to local log sequence numbers on the wire. Set from the
    /// conductor's `log_seq_floor` when this node starts holding a deployment, so numbering
    /// continues above what the conductor already has (another node, or a removed copy).
    log_offsets: Arc<Mutex<HashMap<String, u64>>>,
    /// Random per agent process: tells the conductor a restart from a reconnect.
    instance_id: String,
}

impl Agent {
    fn log_offset(&self, id: &str) -> u64 {
        self.log_offsets
            .lock()
            .ok()
            .and_then(|o| o.get(id).copied())
            .unwrap_or(0)
    }

    fn inventory(&self) -> Vec<wire::DeploymentStatus> {
        let mut inv: Vec<wire::DeploymentStatus> = self
            .sup
            .status()
            .iter()
            .map(|s| to_wire(s, self.log_offset(&s.id)))
            .collect();
        if let Ok(bad) = self.invalid.lock() {
            inv.extend(bad.values().cloned());
        }
        inv
    }

    fn persist(&self) {
        let held: Vec<Held> = self
            .sup
            .snapshot()
            .into_iter()
            .map(|(id, generation, desired_running, spec)| {
                let log_offset = self.log_offset(&id);
                Held {
                    id,
                    generation,
                    desired_running,
                    spec,
                    log_offset,
                }
            })
            .collect();
        if let Err(e) = self.state.save(&held) {
            tracing::warn!(error = %e, "could not write local state");
        }
    }

    async fn connection(
        self: Arc<Self>,
        session: Session,
        mut control: Control,
        cancel: CancellationToken,
    ) {
        // Route status events to this connection before taking the inventory, so no change
        // falls between the two (they queue until Hello is written).
        let (tx, mut rx) = mpsc::channel::<wire::NodeMessage>(1024);
        if let Ok(mut o) = self.outbound.lock() {
            *o = Some(tx.clone());
        }
        let hello = wire::Hello {
            protocol_version: wire::ProtocolVersion::Current as u32,
            node_id: self.cfg.node_id.clone(),
            groups: self.cfg.groups.clone(),
            capacities_total: self.cfg.capacities_total.clone().into_iter().collect(),
            resources: Some(static_wire(&self.static_info)),
            inventory: self.inventory(),
            env_names: self.envs.list_all_envs().await,
            agent_instance_id: self.instance_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let msg = wire::NodeMessage {
            msg: Some(wire::node_message::Msg::Hello(hello)),
        };
        if control.tx.send(&msg).await.is_err() {
            return;
        }
        let mut tasks = JoinSet::new();
        let mut ctl_tx = control.tx;
        tasks.spawn(async move {
            while let Some(m) = rx.recv().await {
                if ctl_tx.send(&m).await.is_err() {
                    break;
                }
            }
        });
        // Heartbeats on their own stream (never behind log bytes).
        {
            let (session, mut usage, period) =
                (session.clone(), self.usage.clone(), self.cfg.heartbeat);
            tasks.spawn(async move {
                let Ok(mut hb) = session.open_uni(StreamKind::Heartbeat).await else {
                    return;
                };
                let mut seq = 0;
                loop {
                    let sample = usage.borrow_and_update().clone();
                    if let Some(s) = sample {
                        seq += 1;
                        if hb.send(&heartbeat_wire(seq, &s)).await.is_err() {
                            return;
                        }
                    }
                    tokio::select! {
                        r = usage.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(period * 2) => {}
                    }
                }
            });
        }
        // Log streams share one pacer that keeps them below the path's capacity.
        let pacer = symphony_net::Pacer::new(
            session.connection().clone(),
            symphony_net::PacerConfig::default(),
        );
        tasks.spawn(pacer.clone().run());
        let shippers = Arc::new(Mutex::new(Shippers {
            pacer: Some(pacer),
            ..Shippers::default()
        }));
        let mut rx_ctl = control.rx;
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                m = rx_ctl.recv::<wire::ConductorMessage>() => m,
            };
            let msg = match msg {
                Ok(Some(wire::ConductorMessage { msg: Some(m) })) => m,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            };
            self.handle(msg, &tx, &session, &shippers, &mut tasks).await;
        }
        if let Ok(mut o) = self.outbound.lock() {
            *o = None;
        }
        tasks.shutdown().await;
    }

    async fn handle(
        self: &Arc<Self>,
        msg: wire::conductor_message::Msg,
        tx: &mpsc::Sender<wire::NodeMessage>,
        session: &Session,
        shippers: &Arc<Mutex<Shippers>>,
        tasks: &mut JoinSet<()>,
    ) {
        use wire::conductor_message::Msg;
        match msg {
            Msg::HelloAck(ack) => {
                tracing::info!(epoch = ack.session_epoch, "registered with the conductor")
            }
            Msg::LogResume(resume) => {
                let ids: Vec<String> = self.sup.status().into_iter().map(|s| s.id).collect();
                if let Ok(mut s) = shippers.lock() {
                    s.resume = resume.last_seq.into_iter().collect();
                    s.ready = true;
                }
                for id in ids {
                    self.ship(&id, session, shippers, tasks);
                }
            }
            Msg::Assign(a) => {
                let result = self.assign(&a);
                let (ok, message) = match &result {
                    Ok(()) => (true, String::new()),
                    Err(e) => (false, e.clone()),
                };
                if let Err(reason) = result {
                    let st = wire::DeploymentStatus {
                        deployment_id: a.deployment_id.clone(),
                        generation: a.generation,
                        state: "FAILED".into(),
                        reason,
                        desired_running: a.desired_running,
                        ..Default::default()
                    };
                    if let Ok(mut bad) = self.invalid.lock() {
                        bad.insert(a.deployment_id.clone(), st.clone());
                    }
                    let _ = tx.send(status_msg(vec![st], vec![])).await;
                } else {
                    self.ship(&a.deployment_id, session, shippers, tasks);
                }
                let _ = tx.send(result_msg(a.command_id, ok, message)).await;
            }
            Msg::Unassign(u) => {
                let held = self.sup.status_of(&u.deployment_id).map(|s| s.generation);
                let was_invalid = self
                    .invalid
                    .lock()
                    .ok()
                    .and_then(|mut b| b.remove(&u.deployment_id))
                    .is_some();
                let removed = match held {
                    Some(g) if g <= u.generation => {
                        let r = self.sup.remove(&u.deployment_id).await;
                        if let Ok(mut o) = self.log_offsets.lock() {
                            o.remove(&u.deployment_id);
                        }
                        // Its shipper ends with its log buffer; a later Assign starts a new one.
                        if let Ok(mut s) = shippers.lock() {
                            s.started.remove(&u.deployment_id);
                        }
                        self.persist();
                        r
                    }
                    Some(g) => {
                        tracing::info!(id = %u.deployment_id, held = g, asked = u.generation, "ignoring unassign of an older generation");
                        false
                    }
                    None => false,
                };
                if removed || was_invalid || held.is_none() {
                    let _ = tx
                        .send(status_msg(vec![], vec![u.deployment_id.clone()]))
                        .await;
                }
                let _ = tx.send(result_msg(u.command_id, true, String::new())).await;
            }
            Msg::EnvEnsure(e) => {
                // Provisioning can take minutes: never in the receive loop.
                let (envs, tx) = (self.envs.clone(), tx.clone());
                tasks.spawn(async move {
                    let mut failures = Vec::new();
                    for spec in e.envs {
                        let def = EnvDefinition {
                            name: spec.name.clone(),
                            python_version: spec.python_version,
                            packages: spec.packages,
                            custom_script: (!spec.custom_script.is_empty()).then_some(spec.custom_script),
                            manager: if spec.manager == "uv" { ManagerKind::Uv } else { ManagerKind::Conda },
                            force_recreate: spec.force_recreate,
                        };
                        if let Err(err) = envs.ensure(&def).await {
                            tracing::warn!(env = %spec.name, error = %err, "env provisioning failed");
                            failures.push(format!("{}: {err}", spec.name));
                        }
                    }
                    let report = wire::EnvReport { env_names: envs.list_all_envs().await, note: failures.join("; ") };
                    let _ = tx.send(wire::NodeMessage { msg: Some(wire::node_message::Msg::EnvReport(report)) }).await;
                });
            }
        }
    }

    fn assign(&self, a: &wire::Assign) -> Result<(), String> {
        let specification: serde_json::Value = serde_json::from_str(&a.specification_json)
            .map_err(|e| format!("specification is not JSON: {e}"))?;
        let spec: DeploymentSpec = crate::spec::parse(&specification).map_err(|errs| {
            errs.iter()
                .map(|e| format!("{}: {}", e.loc.join("."), e.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        if let Ok(mut bad) = self.invalid.lock() {
            bad.remove(&a.deployment_id);
        }
        let fresh = self.sup.status_of(&a.deployment_id).is_none();
        let outcome = self
            .sup
            .apply(&a.deployment_id, a.generation, a.desired_running, spec)
            .map_err(|e| e.to_string())?;
        if fresh && let Ok(mut o) = self.log_offsets.lock() {
            o.insert(a.deployment_id.clone(), a.log_seq_floor);
        }
        tracing::info!(id = %a.deployment_id, generation = a.generation, ?outcome, "assign applied");
        self.persist();
        Ok(())
    }

    /// Starts the log shipper of a deployment on this connection (once).
    fn ship(
        &self,
        id: &str,
        session: &Session,
        shippers: &Arc<Mutex<Shippers>>,
        tasks: &mut JoinSet<()>,
    ) {
        let (resume, pacer) = {
            let Ok(mut s) = shippers.lock() else { return };
            if !s.ready || !s.started.insert(id.to_owned()) {
                return;
            }
            (s.resume.get(id).copied().unwrap_or(0), s.pacer.clone())
        };
        let Some(buffer) = self.sup.logs(id) else {
            return;
        };
        let (session, id, offsets) = (session.clone(), id.to_owned(), self.log_offsets.clone());
        tasks.spawn(ship_logs(session, id, buffer, resume, offsets, pacer));
    }
}

#[derive(Debug, Default)]
struct Shippers {
    pacer: Option<symphony_net::Pacer>,
    ready: bool,
    resume: HashMap<String, u64>,
    started: HashSet<String>,
}

/// Sends a deployment's log entries after wire sequence `resume`, then new ones as they come.
async fn ship_logs(
    session: Session,
    id: String,
    buffer: LogBuffer,
    resume: u64,
    offsets: Arc<Mutex<HashMap<String, u64>>>,
    pacer: Option<symphony_net::Pacer>,
) {
    let offset = offsets
        .lock()
        .ok()
        .and_then(|o| o.get(&id).copied())
        .unwrap_or(0);
    let mut after = resume.saturating_sub(offset);
    let Ok(mut tx) = session.open_uni(StreamKind::Log).await else {
        return;
    };
    if tx
        .send(&wire::LogHeader {
            deployment_id: id.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let mut notify = buffer.subscribe();
    let mut dropped_sent = buffer.dropped_lines();
    loop {
        let dropped = buffer.dropped_lines();
        if dropped > dropped_sent {
            // Lines lost to a full spool are never lost silently.
            buffer.push(
                super::logs::LogStream::System,
                format!("{} log lines dropped: the node's log spool was full (the uplink is slower than the output)", dropped - dropped_sent),
            );
        }
        let mut entries = buffer.since(after, LOG_BATCH);
        if entries.is_empty() {
            if notify.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut bytes = 0;
        let keep = entries
            .iter()
            .position(|e| {
                bytes += e.line.len() + 32;
                bytes > LOG_BATCH_BYTES
            })
            .map_or(entries.len(), |i| i.max(1));
        entries.truncate(keep);
        if let Some(last) = entries.last() {
            after = last.seq;
        }
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
        dropped_sent = dropped;
        if let Some(p) = &pacer {
            p.acquire(prost::Message::encoded_len(&batch)).await;
        }
        if tx.send(&batch).await.is_err() {
            return;
        }
    }
}

/// Prepares a start: git workspace (when configured) and env wrapping.
struct AgentPrepare {
    work_dir: PathBuf,
    envs: Arc<Envs>,
}

impl Prepare for AgentPrepare {
    fn prepare<'a>(
        &'a self,
        id: &'a str,
        spec: &'a DeploymentSpec,
        logs: &'a LogBuffer,
    ) -> futures_util::future::BoxFuture<'a, Result<Prepared, String>> {
        Box::pin(async move {
            let cwd = if let Some(git) = &spec.git {
                let dest = self.work_dir.join("workspaces").join(id);
                let (d, repo, r, token) = (
                    dest.clone(),
                    git.repo.clone(),
                    git.git_ref.clone(),
                    git.token.clone(),
                );
                let sha = tokio::task::spawn_blocking(move || {
                    workspace::prepare_checkout(&d, &repo, r.as_deref(), token.as_deref())
                })
                .await
                .map_err(|e| format!("git task failed: {e}"))?
                .map_err(|e| format!("git repo prep failed: {e}"))?;
                logs.push(
                    super::logs::LogStream::System,
                    format!("Git repo prepared at {} (commit {sha})", dest.display()),
                );
                dest
            } else {
                let dir = self.work_dir.join("deployments").join(id);
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                dir
            };
            let (command, extra_env) = match &spec.env_name {
                Some(name) => {
                    let resolved = self.envs.resolve(name).await?;
                    envs::wrap_command(name, &resolved, &spec.command)
                }
                None => (spec.command.clone(), BTreeMap::new()),
            };
            Ok(Prepared {
                cwd,
                command,
                extra_env,
            })
        })
    }
}

fn result_msg(command_id: u64, ok: bool, message: String) -> wire::NodeMessage {
    wire::NodeMessage {
        msg: Some(wire::node_message::Msg::Result(wire::CommandResult {
            command_id,
            ok,
            message,
        })),
    }
}

fn status_msg(deployments: Vec<wire::DeploymentStatus>, removed: Vec<String>) -> wire::NodeMessage {
    wire::NodeMessage {
        msg: Some(wire::node_message::Msg::Status(wire::StatusUpdate {
            deployments,
            removed,
        })),
    }
}

/// The wire name of a run state.
pub fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Starting => "STARTING",
        RunState::Running => "RUNNING",
        RunState::Stopping => "STOPPING",
        RunState::Stopped => "STOPPED",
        RunState::Exited => "EXITED",
        RunState::Crashed => "CRASHED",
        RunState::Backoff => "BACKOFF",
        RunState::Failed => "FAILED",
    }
}

fn to_wire(s: &DeploymentStatus, log_offset: u64) -> wire::DeploymentStatus {
    wire::DeploymentStatus {
        deployment_id: s.id.clone(),
        generation: s.generation,
        state: state_name(s.state).to_owned(),
        pid: s.pid,
        restart_count: s.restart_count,
        last_exit_code: s.last_exit_code,
        reason: s.reason.clone().unwrap_or_default(),
        started_at_ms: s.started_at_ms,
        stopped_at_ms: s.stopped_at_ms,
        last_log_seq: s.last_log_seq + log_offset,
        desired_running: matches!(
            s.state,
            RunState::Running | RunState::Starting | RunState::Backoff
        ),
    }
}

fn mount_wire(m: &super::monitor::StorageUsage) -> wire::StorageMount {
    wire::StorageMount {
        mount_point: m.mount_point.clone(),
        fs_type: m.fs_type.clone(),
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
        available_bytes: m.available_bytes,
        used_percent: f64::from(m.percent),
    }
}

fn static_wire(s: &super::monitor::StaticResources) -> wire::StaticResources {
    wire::StaticResources {
        logical_cores: u32::try_from(s.logical_cores).unwrap_or(u32::MAX),
        memory_total_bytes: s.memory_total_bytes,
        storage: s.storage.iter().map(mount_wire).collect(),
        gpus: s
            .gpus
            .iter()
            .map(|g| wire::Gpu {
                index: g.index,
                name: g.name.clone(),
                mem_total_bytes: g.memory_total_bytes,
                ..Default::default()
            })
            .collect(),
        hostname: s.hostname.clone().unwrap_or_default(),
    }
}

fn heartbeat_wire(seq: u64, s: &UsageSample) -> wire::Heartbeat {
    wire::Heartbeat {
        seq,
        timestamp_unix_ms: s.timestamp_ms,
        cpu_total_percent: f64::from(s.cpu.total_percent),
        per_core: s
            .cpu
            .per_core_percent
            .iter()
            .enumerate()
            .map(|(i, p)| wire::CoreUsage {
                core_id: u32::try_from(i).unwrap_or(u32::MAX),
                used_percent: f64::from(*p),
            })
            .collect(),
        mem_used_bytes: s.memory.used_bytes,
        mem_available_bytes: s.memory.available_bytes,
        mem_used_percent: f64::from(s.memory.percent),
        mem_free_bytes: s.memory.free_bytes,
        mem_buffers_bytes: s.memory.buffers_bytes,
        mem_cached_bytes: s.memory.cached_bytes,
        storage: s.storage.iter().map(mount_wire).collect(),
        gpus: s
            .gpus
            .iter()
            .map(|g| wire::Gpu {
                index: g.index,
                name: g.name.clone(),
                mem_total_bytes: g.memory_total_bytes,
                util_percent: g.utilization_gpu_percent.map_or(0.0, f64::from),
                mem_util_percent: g.utilization_memory_percent.map_or(0.0, f64::from),
                mem_used_bytes: g.memory_used_bytes,
                mem_free_bytes: g.memory_free_bytes,
                temperature_c: g.temperature_c.map_or(0.0, f64::from),
                power_w: g.power_w.unwrap_or(0.0),
            })
            .collect(),
    }
}
