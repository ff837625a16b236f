//! The node core: every decision of the node agent, and nothing else.
//!
//! [`NodeCore`] owns all of the agent's decision state: the deployments it holds (with the
//! generation, desired state, spec and log offset of each), those restored from local state and
//! not yet confirmed, those with a spec this node cannot run, those being stopped (with the
//! `Assign` that waits for each), the envs the conductor defines, the env jobs queued, the env
//! problems, the statuses not yet sent, and what the current connection has been told. It does
//! no IO and never waits: the driver (`agent.rs`) feeds it [`Event`]s — conductor commands,
//! supervisor status changes, results of background jobs, connection up and down — and carries
//! out the [`Effect`]s it returns, in order. Background work (stopping a deployment, making or
//! removing an env, listing envs) reports back as an event; nothing else changes this state.
//!
//! Invariants:
//! - One id, one process table slot: an `Assign` for a deployment being stopped waits for the
//!   stop to finish (only the newest one waiting is kept; an `Unassign` cancels those at or
//!   below its generation).
//! - Generations never go back: an `Assign` older than the generation held is refused and
//!   changes nothing (not even when its spec is bad).
//! - A deployment restored from local state is reported in Hello but applied only when the
//!   conductor confirms it with an `Assign`; an `Unassign` drops it.
//! - Env jobs run one at a time, in the order they were asked for; a job is checked again
//!   against the current state when it starts (an env deleted meanwhile is not made, an env
//!   defined again or used by a deployment here is not removed). An env a deployment here uses
//!   (held, restored or stopping) is never removed: it is kept with a problem that names the
//!   deployment, and removed once that deployment is gone.
//! - Statuses are coalesced: the latest per deployment, sent by [`NodeCore::flush`]; a
//!   connection starts with a Hello carrying the whole inventory, which replaces them.
//!
//! The core takes no clock: none of its decisions depends on time yet (restart backoff, cron
//! and health timers belong to the supervisor's per-deployment actors).

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::convert::{result_msg, status_msg, to_wire};
use super::envs::{EnvDefinition, ManagerKind};
use super::state::Held;
use super::supervisor::{self, DeploymentStatus};
use crate::model::{CurrentState, DeploymentId, Generation};
use crate::spec::DeploymentSpec;
use crate::wire;

/// What the node says about itself in every Hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub node_id: String,
    pub groups: Vec<String>,
    pub capacities_total: BTreeMap<String, i64>,
    pub resources: wire::StaticResources,
    /// Random per agent process: tells the conductor a restart from a reconnect.
    pub instance_id: String,
}

/// Something that happened, fed to [`NodeCore::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is up; `statuses` is the supervisor's process table as of now.
    Connected { statuses: Vec<DeploymentStatus> },
    /// The current connection is gone.
    Disconnected,
    /// A command from the conductor on the current connection.
    Command(wire::conductor_message::Msg),
    /// A deployment's state changed in the supervisor.
    Status(DeploymentStatus),
    /// The supervisor dropped status events: here is everything it holds.
    Resync(Vec<DeploymentStatus>),
    /// A deployment's stop (from [`Effect::Remove`]) finished; its slot is free.
    Removed(DeploymentId),
    /// An env job (from [`Effect::Env`]) finished.
    EnvDone(EnvOutcome),
    /// The conductor holds more of a deployment's lines than this node has (its spool lost
    /// its tail: a hard kill with writes still queued, or a lost disk): from now on its local
    /// sequence numbers are shifted by at least `offset`, so new lines number above what the
    /// conductor holds instead of being taken for resends.
    LogsBehind { id: DeploymentId, offset: u64 },
}

/// Slow env work, one job at a time (see [`Effect::Env`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvJob {
    /// Make the env (or check it is made) as defined.
    Ensure(EnvDefinition),
    /// List the envs this node created: the first half of a removal pass.
    ListCreated,
    /// Remove an env this node created.
    Remove(ManagerKind, String),
    /// List every env (and those created here) to report them to the conductor.
    Report,
}

/// The result of an [`EnvJob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvOutcome {
    Ensured {
        kind: ManagerKind,
        name: String,
        result: Result<(), String>,
    },
    Created(Vec<(ManagerKind, String)>),
    Removed {
        kind: ManagerKind,
        name: String,
        /// `Ok(false)`: nothing to remove.
        result: Result<bool, String>,
    },
    Listed {
        names: Vec<String>,
        created: Vec<(ManagerKind, String)>,
    },
}

/// Something the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send on the current connection's control stream.
    Send(wire::NodeMessage),
    /// Set the desired state of a deployment in the supervisor.
    Apply {
        id: DeploymentId,
        generation: Generation,
        running: bool,
        spec: DeploymentSpec,
    },
    /// Stop and forget a deployment in the background, then report [`Event::Removed`].
    Remove(DeploymentId),
    /// Start shipping a deployment's logs on the current connection, after `resume` (the
    /// conductor's last sequence), adding `offset` to local sequence numbers.
    Ship {
        id: DeploymentId,
        resume: u64,
        offset: u64,
    },
    /// Stop shipping a deployment's logs.
    StopShip(DeploymentId),
    /// Replace the local state file's contents (off the runtime; the latest wins).
    Persist(Vec<Arc<Held>>),
    /// Run an env job in the background, then report [`Event::EnvDone`].
    Env(EnvJob),
    /// Make these mesh services reachable on 127.0.0.1 (the whole set), and keep direct
    /// connections with these peers only.
    Routes(wire::ServiceRoutes),
    /// Take part in a hole punch with another node.
    Punch(wire::Punch),
}

/// A deployment on its way out: its process is stopping.
#[derive(Debug, Clone, PartialEq)]
struct Leaving {
    /// The generation of the copy stopping: an Assign older than it is stale.
    generation: Generation,
    /// Its env, in use until the process is gone.
    env: Option<String>,
    log_offset: u64,
    /// The newest `Assign` that arrived meanwhile, applied once the slot is free.
    waiting: Option<wire::Assign>,
    /// Report it removed once gone (an `Unassign` asked for it).
    report_removed: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct NodeCore {
    me: Identity,
    /// What the supervisor holds (applied), by id. Shared with the state writer: a change
    /// copies the list of pointers, never the specs.
    held: BTreeMap<DeploymentId, Arc<Held>>,
    /// Restored from local state, reported in Hello, applied once the conductor confirms.
    restored: BTreeMap<DeploymentId, Arc<Held>>,
    /// Deployments whose spec this node cannot run: reported FAILED with the reason.
    invalid: BTreeMap<DeploymentId, wire::DeploymentStatus>,
    /// Deployments being stopped.
    leaving: BTreeMap<DeploymentId, Leaving>,
    /// Latest unsent status per deployment (`None` = removed).
    unsent: BTreeMap<DeploymentId, Option<wire::DeploymentStatus>>,
    /// The local state changed since the last [`Effect::Persist`].
    state_changed: bool,
    connected: bool,
    /// The conductor's last log sequence per deployment (`LogResume`), on this connection.
    resume: Option<BTreeMap<String, u64>>,
    /// Deployments whose logs are shipped on this connection.
    shipping: BTreeSet<DeploymentId>,
    /// The envs the conductor defines, as of the newest `EnvEnsure`.
    env_wanted: BTreeSet<(ManagerKind, String)>,
    /// A complete env set arrived: envs created here that it lacks are on their way out.
    env_set_seen: bool,
    /// Env names as last listed (Hello does not wait for a listing).
    env_names: Vec<String>,
    /// The current problem of each env, reported until resolved.
    env_problems: BTreeMap<String, String>,
    /// Unwanted envs a removal pass kept because a deployment here used them: the pass runs
    /// again once one of them is no longer used.
    envs_kept: BTreeSet<String>,
    env_queue: VecDeque<EnvJob>,
    env_busy: bool,
}

impl NodeCore {
    /// A core holding nothing yet; `restored` comes from local state, `env_names` from a
    /// first listing.
    pub fn new(me: Identity, restored: Vec<Held>, env_names: Vec<String>) -> Self {
        Self {
            me,
            held: BTreeMap::new(),
            restored: restored
                .into_iter()
                .map(|h| (h.id.clone(), Arc::new(h)))
                .collect(),
            invalid: BTreeMap::new(),
            leaving: BTreeMap::new(),
            unsent: BTreeMap::new(),
            state_changed: false,
            connected: false,
            resume: None,
            shipping: BTreeSet::new(),
            env_wanted: BTreeSet::new(),
            env_set_seen: false,
            env_names,
            env_problems: BTreeMap::new(),
            envs_kept: BTreeSet::new(),
            env_queue: VecDeque::new(),
            env_busy: false,
        }
    }

    /// Takes one event; returns what to do, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        // Only commands and finished stops change which deployments use an env.
        let users_may_change = matches!(event, Event::Command(_) | Event::Removed(_));
        match event {
            Event::Connected { statuses } => self.connected(statuses, &mut fx),
            Event::Disconnected => {
                self.connected = false;
                self.resume = None;
                self.shipping.clear();
            }
            Event::Command(msg) => self.command(msg, &mut fx),
            Event::Status(st) => self.status(&st),
            Event::Resync(all) => {
                for st in &all {
                    self.status(st);
                }
            }
            Event::Removed(id) => self.removed(&id, &mut fx),
            Event::EnvDone(outcome) => self.env_done(outcome, &mut fx),
            Event::LogsBehind { id, offset } => {
                if let Some(h) = self.held.get_mut(&id)
                    && h.log_offset < offset
                {
                    Arc::make_mut(h).log_offset = offset;
                    self.state_changed = true;
                }
            }
        }
        if users_may_change {
            self.recheck_kept_envs();
        }
        self.next_env_job(&mut fx);
        if std::mem::take(&mut self.state_changed) {
            fx.push(Effect::Persist(self.local_state()));
        }
        fx
    }

    /// The statuses changed since the last flush, as one message (latest per deployment).
    pub fn flush(&mut self) -> Option<Effect> {
        if !self.connected || self.unsent.is_empty() {
            return None;
        }
        let (mut up, mut removed) = (Vec::new(), Vec::new());
        for (id, st) in std::mem::take(&mut self.unsent) {
            match st {
                Some(st) => up.push(st),
                None => removed.push(id.into_string()),
            }
        }
        Some(Effect::Send(status_msg(up, removed)))
    }

    /// Ids of the deployments held, restored or stopping.
    #[cfg(test)]
    pub fn known(&self) -> BTreeSet<&str> {
        self.held
            .keys()
            .chain(self.restored.keys())
            .chain(self.leaving.keys())
            .map(DeploymentId::as_str)
            .collect()
    }

    fn offset(&self, id: &str) -> u64 {
        self.held
            .get(id)
            .map(|h| h.log_offset)
            .or_else(|| self.leaving.get(id).map(|l| l.log_offset))
            .unwrap_or(0)
    }

    fn local_state(&self) -> Vec<Arc<Held>> {
        self.held
            .values()
            .chain(self.restored.values())
            .cloned()
            .collect()
    }

    fn connected(&mut self, statuses: Vec<DeploymentStatus>, fx: &mut Vec<Effect>) {
        self.connected = true;
        self.resume = None;
        self.shipping.clear();
        // Everything up to now is in the inventory.
        self.unsent.clear();
        // Only what this node holds: a copy whose stop has begun is not reported again.
        let mut inventory: Vec<wire::DeploymentStatus> = statuses
            .iter()
            .filter(|s| self.held.contains_key(s.id.as_str()))
            .map(|s| to_wire(s, self.offset(&s.id)))
            .collect();
        inventory.extend(self.invalid.values().cloned());
        inventory.extend(self.restored.values().map(|h| wire::DeploymentStatus {
            deployment_id: h.id.to_string(),
            generation: h.generation.get(),
            state: CurrentState::Stopped.as_str().into(),
            reason: "restored from local state; waiting for the conductor".into(),
            last_log_seq: h.log_offset,
            ..Default::default()
        }));
        let me = &self.me;
        let hello = wire::Hello {
            protocol_version: wire::ProtocolVersion::Current as u32,
            node_id: me.node_id.clone(),
            groups: me.groups.clone(),
            capacities_total: me.capacities_total.clone().into_iter().collect(),
            resources: Some(me.resources.clone()),
            inventory,
            env_names: self.env_names.clone(),
            agent_instance_id: me.instance_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        fx.push(Effect::Send(wire::NodeMessage {
            msg: Some(wire::node_message::Msg::Hello(hello)),
        }));
    }

    fn command(&mut self, msg: wire::conductor_message::Msg, fx: &mut Vec<Effect>) {
        use wire::conductor_message::Msg;
        match msg {
            // The driver renews certificates (it owns the endpoint and the files).
            Msg::Renewed(_) => {}
            Msg::HelloAck(ack) => {
                tracing::info!(epoch = ack.session_epoch, "registered with the conductor");
            }
            Msg::LogResume(r) => {
                self.resume = Some(r.last_seq.into_iter().collect());
                let ids: Vec<DeploymentId> = self.held.keys().cloned().collect();
                for id in ids {
                    self.ship(&id, fx);
                }
            }
            Msg::Assign(a) => {
                let command_id = a.command_id;
                if let Some(l) = self.leaving.get_mut(a.deployment_id.as_str()) {
                    if Generation(a.generation) < l.generation {
                        let why = format!(
                            "stale generation {} (stopping {})",
                            a.generation, l.generation
                        );
                        fx.push(Effect::Send(result_msg(command_id, false, why)));
                        return;
                    }
                    if l.waiting
                        .as_ref()
                        .is_none_or(|w| w.generation <= a.generation)
                    {
                        l.waiting = Some(a);
                    }
                    let why = "applied once the previous copy has stopped".to_owned();
                    fx.push(Effect::Send(result_msg(command_id, true, why)));
                    return;
                }
                let (ok, why) = match self.assign(a, fx) {
                    Ok(()) => (true, String::new()),
                    Err(e) => (false, e),
                };
                fx.push(Effect::Send(result_msg(command_id, ok, why)));
            }
            Msg::Unassign(u) => {
                self.unassign(&u, fx);
                fx.push(Effect::Send(result_msg(u.command_id, true, String::new())));
            }
            Msg::EnvEnsure(e) => self.env_ensure(e),
            Msg::ServiceRoutes(r) => fx.push(Effect::Routes(r)),
            Msg::Punch(p) => fx.push(Effect::Punch(p)),
        }
    }

    fn assign(&mut self, a: wire::Assign, fx: &mut Vec<Effect>) -> Result<(), String> {
        let id = DeploymentId::from(a.deployment_id.as_str());
        let generation = Generation(a.generation);
        if let Some(h) = self.held.get(&id)
            && generation < h.generation
        {
            return Err(format!(
                "stale generation {} (holding {})",
                a.generation, h.generation
            ));
        }
        if !supervisor::valid_id(&id) {
            return Err(format!("invalid deployment id {:?}", id.as_str()));
        }
        // The env of the copy held (or restored) at this very generation, if any.
        let same_generation = self
            .held
            .get(&id)
            .map(|h| (h.generation, &h.spec))
            .or_else(|| self.restored.get(&id).map(|r| (r.generation, &r.spec)))
            .filter(|(g, _)| *g == generation)
            .map(|(_, spec)| spec.env.clone());
        let spec = match parse_spec(&a.specification_json) {
            Ok(mut spec) => {
                match same_generation {
                    // The same generation again (a reconnect, a restarted agent): the process
                    // keeps the variables it started with, so services bound since then do
                    // not restart it.
                    Some(env) => spec.env = env,
                    // The namespace's service variables; the spec's own env wins.
                    None => {
                        for (k, v) in &a.service_env {
                            spec.env.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
                spec
            }
            Err(reason) => {
                // This node cannot run what is asked: FAILED at the new generation, and
                // whatever older generation it still runs is stopped.
                let st = wire::DeploymentStatus {
                    deployment_id: a.deployment_id,
                    generation: a.generation,
                    state: CurrentState::Failed.as_str().into(),
                    reason: format!("invalid spec: {reason}"),
                    ..Default::default()
                };
                self.invalid.insert(id.clone(), st.clone());
                if self.held.contains_key(&id) {
                    self.start_removal(&id, false, fx);
                }
                // A restored copy may still run (its keeper outlived the last agent): stop it.
                if let Some(r) = self.restored.remove(&id) {
                    self.leave(r, false, fx);
                }
                self.unsent.insert(id, Some(st));
                return Err(reason);
            }
        };
        self.invalid.remove(&id);
        let restored = self.restored.remove(&id);
        let log_offset = match (self.held.get(&id), &restored) {
            (Some(h), _) => h.log_offset,
            (None, Some(r)) => r.log_offset,
            (None, None) => a.log_seq_floor,
        };
        let unchanged = self.held.get(&id).is_some_and(|h| {
            h.generation == generation && h.desired_running == a.desired_running && h.spec == spec
        });
        if !unchanged {
            fx.push(Effect::Apply {
                id: id.clone(),
                generation,
                running: a.desired_running,
                spec: spec.clone(),
            });
            self.held.insert(
                id.clone(),
                Arc::new(Held {
                    id: id.clone(),
                    generation,
                    desired_running: a.desired_running,
                    spec,
                    log_offset,
                }),
            );
        }
        // Every reconnect re-sends each Assign: the state file changes only when this did.
        if restored.is_some() || !unchanged {
            self.state_changed = true;
        }
        tracing::info!(%id, %generation, unchanged, "assign applied");
        self.ship(&id, fx);
        Ok(())
    }

    fn unassign(&mut self, u: &wire::Unassign, fx: &mut Vec<Effect>) {
        let id = u.deployment_id.as_str();
        self.invalid.remove(id);
        if let Some(r) = self.restored.remove(id) {
            // Its process may still run under its keeper: it leaves like a held one.
            self.leave(r, true, fx);
            return;
        }
        if let Some(l) = self.leaving.get_mut(id) {
            // Assigns waiting on the stop are cancelled by this Unassign too.
            if l.waiting
                .as_ref()
                .is_some_and(|w| w.generation <= u.generation)
            {
                l.waiting = None;
            }
            l.report_removed = true;
            return;
        }
        match self.held.get(id).map(|h| h.generation) {
            Some(g) if g <= Generation(u.generation) => self.start_removal(id, true, fx),
            Some(g) => {
                tracing::info!(
                    id,
                    held = %g,
                    asked = u.generation,
                    "ignoring unassign of an older generation"
                );
            }
            None => {
                self.unsent.insert(id.into(), None);
            }
        }
    }

    /// Stops and forgets a held deployment in the background; Assigns for the same id that
    /// arrive meanwhile wait for it.
    fn start_removal(&mut self, id: &str, report_removed: bool, fx: &mut Vec<Effect>) {
        if self.shipping.remove(id) {
            fx.push(Effect::StopShip(id.into()));
        }
        if let Some(h) = self.held.remove(id) {
            self.leave(h, report_removed, fx);
        }
    }

    /// Starts the stop of `h` (held, or restored and maybe still running under its keeper).
    fn leave(&mut self, h: Arc<Held>, report_removed: bool, fx: &mut Vec<Effect>) {
        self.leaving.insert(
            h.id.clone(),
            Leaving {
                generation: h.generation,
                env: h.spec.env_name.clone(),
                log_offset: h.log_offset,
                waiting: None,
                report_removed,
            },
        );
        fx.push(Effect::Remove(h.id.clone()));
        // The local state holds what this node should run: not a deployment on its way out.
        self.state_changed = true;
    }

    fn removed(&mut self, id: &str, fx: &mut Vec<Effect>) {
        let Some(l) = self.leaving.remove(id) else {
            return;
        };
        match l.waiting {
            Some(a) => {
                let generation = a.generation;
                if let Err(e) = self.assign(a, fx) {
                    tracing::warn!(id, generation, error = %e, "assign that waited for a stop failed");
                }
            }
            None if l.report_removed => {
                self.unsent.insert(id.into(), None);
            }
            None => {}
        }
    }

    fn status(&mut self, st: &DeploymentStatus) {
        // Late events of a deployment already gone are not news.
        if self.held.contains_key(st.id.as_str()) || self.leaving.contains_key(st.id.as_str()) {
            let wire = to_wire(st, self.offset(&st.id));
            self.unsent.insert(st.id.as_str().into(), Some(wire));
        }
    }

    fn ship(&mut self, id: &str, fx: &mut Vec<Effect>) {
        let Some(resume) = &self.resume else {
            return;
        };
        if !self.held.contains_key(id) || self.shipping.contains(id) {
            return;
        }
        let resume = resume.get(id).copied().unwrap_or(0);
        self.shipping.insert(id.into());
        fx.push(Effect::Ship {
            id: id.into(),
            resume,
            offset: self.offset(id),
        });
    }

    // --- envs ---

    fn env_ensure(&mut self, e: wire::EnvEnsure) {
        if e.complete {
            self.env_wanted.clear();
            self.env_set_seen = true;
        }
        for spec in e.envs {
            let def = EnvDefinition {
                name: spec.name,
                manager: manager_of(&spec.manager),
                python_version: spec.python_version,
                packages: spec.packages,
                custom_script: (!spec.custom_script.is_empty()).then_some(spec.custom_script),
                force_recreate: spec.force_recreate,
            };
            self.env_wanted.insert((def.manager, def.name.clone()));
            self.queue_env(EnvJob::Ensure(def));
        }
        if e.complete {
            self.queue_env(EnvJob::ListCreated);
        }
        self.queue_env(EnvJob::Report);
    }

    /// Queues a job at the end; the same job queued earlier moves there (it would see no
    /// more than this one).
    fn queue_env(&mut self, job: EnvJob) {
        self.env_queue.retain(|queued| *queued != job);
        self.env_queue.push_back(job);
    }

    fn wanted(&self, kind: ManagerKind, name: &str) -> bool {
        self.env_wanted.contains(&(kind, name.to_owned()))
    }

    /// Env names used by the deployments here (held, restored or stopping), each with one
    /// deployment that uses it.
    fn envs_in_use(&self) -> BTreeMap<&str, &str> {
        let held = self
            .held
            .values()
            .chain(self.restored.values())
            .filter_map(|h| Some((h.spec.env_name.as_deref()?, h.id.as_str())));
        let leaving = self
            .leaving
            .iter()
            .filter_map(|(id, l)| Some((l.env.as_deref()?, id.as_str())));
        held.chain(leaving).collect()
    }

    fn set_env_problem(&mut self, name: &str, problem: Option<String>) {
        match problem {
            Some(text) if text.starts_with(&format!("env {name}")) => {
                self.env_problems.insert(name.to_owned(), text)
            }
            Some(text) => self
                .env_problems
                .insert(name.to_owned(), format!("env {name}: {text}")),
            None => self.env_problems.remove(name),
        };
    }

    /// An unwanted env in use is kept, with a problem naming the user; true if so.
    fn keep_if_in_use(&mut self, name: &str) -> bool {
        let Some(user) = self.envs_in_use().get(name).map(|u| (*u).to_owned()) else {
            return false;
        };
        self.set_env_problem(
            name,
            Some(format!(
                "env {name}: no longer defined, kept while deployment {user} here uses it"
            )),
        );
        self.envs_kept.insert(name.to_owned());
        true
    }

    /// Runs the removal pass again once an env it kept is no longer used.
    fn recheck_kept_envs(&mut self) {
        if self.envs_kept.is_empty() {
            return;
        }
        let in_use = self.envs_in_use();
        if self
            .envs_kept
            .iter()
            .all(|n| in_use.contains_key(n.as_str()))
        {
            return;
        }
        self.envs_kept.clear();
        self.queue_env(EnvJob::ListCreated);
        self.queue_env(EnvJob::Report);
    }

    /// Starts the next env job if none runs, checking it against the state as of now.
    fn next_env_job(&mut self, fx: &mut Vec<Effect>) {
        while !self.env_busy
            && let Some(job) = self.env_queue.pop_front()
        {
            let go = match &job {
                // Deleted meanwhile (a later message): not made.
                EnvJob::Ensure(def) => self.wanted(def.manager, &def.name),
                EnvJob::Remove(kind, name) => {
                    !self.wanted(*kind, name) && !self.keep_if_in_use(name)
                }
                EnvJob::ListCreated | EnvJob::Report => true,
            };
            if go {
                self.env_busy = true;
                fx.push(Effect::Env(job));
            }
        }
    }

    fn env_done(&mut self, outcome: EnvOutcome, fx: &mut Vec<Effect>) {
        self.env_busy = false;
        match outcome {
            EnvOutcome::Ensured { kind, name, result } => {
                self.set_env_problem(&name, result.err());
                // Deleted while it was being made: remove it next.
                if !self.wanted(kind, &name) {
                    self.env_queue.push_front(EnvJob::Remove(kind, name));
                }
            }
            EnvOutcome::Created(created) => {
                // Problems of envs gone from the definitions and from this node are over.
                let wanted = &self.env_wanted;
                self.env_problems
                    .retain(|name, _| wanted.iter().chain(&created).any(|(_, n)| n == name));
                let mut removals = Vec::new();
                for (kind, name) in created {
                    if !self.wanted(kind, &name) && !self.keep_if_in_use(&name) {
                        removals.push(EnvJob::Remove(kind, name));
                    }
                }
                for job in removals.into_iter().rev() {
                    self.env_queue.push_front(job);
                }
            }
            EnvOutcome::Removed { name, result, .. } => match result {
                Ok(true) => self.set_env_problem(&name, None),
                Ok(false) => {}
                Err(e) => self.set_env_problem(&name, Some(e)),
            },
            EnvOutcome::Listed { mut names, created } => {
                // Envs created here that the conductor no longer defines are on their way
                // out: nothing new may be placed on them.
                if self.env_set_seen {
                    let leaving: BTreeSet<&str> = created
                        .iter()
                        .filter(|(kind, name)| !self.wanted(*kind, name))
                        .map(|(_, name)| name.as_str())
                        .collect();
                    names.retain(|n| !leaving.contains(n.as_str()));
                }
                self.env_names.clone_from(&names);
                if self.connected {
                    let report = wire::EnvReport {
                        env_names: names,
                        problems: self.env_problems.values().cloned().collect(),
                    };
                    fx.push(Effect::Send(wire::NodeMessage {
                        msg: Some(wire::node_message::Msg::EnvReport(report)),
                    }));
                }
            }
        }
    }
}

/// A spec from an `Assign`, or every reason it is not one.
fn parse_spec(json: &str) -> Result<DeploymentSpec, String> {
    let value = serde_json::from_str::<serde_json::Value>(json)
        .map_err(|e| format!("specification is not JSON: {e}"))?;
    crate::spec::parse_owned(value)
        .map(|(spec, _)| spec)
        .map_err(|errs| {
            errs.iter()
                .map(|e| format!("{}: {}", e.loc.join("."), e.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })
}

/// The manager an env spec names (anything but `uv` is conda, the original's only manager).
fn manager_of(manager: &str) -> ManagerKind {
    if manager == "uv" {
        ManagerKind::Uv
    } else {
        ManagerKind::Conda
    }
}
