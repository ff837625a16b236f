//! The core's experiments: launching one (all its deployments and services in one store
//! transaction), stopping, starting and deleting it as a unit, and `on_failure:
//! stop-experiment`. Placement as a unit is the scheduler's (`colocate` and `gang`).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{Core, CoreError, Launch, Planned, narrate, now_ms, parse_spec};
use crate::conductor::services::{DEFAULT_NAMESPACE, ServiceTable};
use crate::conductor::store::{DeploymentRecord, ExperimentRecord, ProcessRecord, StoreError};
use crate::model::{CurrentState, DesiredState};
use crate::spec::{Loc, OnFailure, Placement, Report};

/// Where a process's deployment belongs, and its scheduling unit (computed once per change of
/// the experiments, not per scheduling pass).
#[derive(Debug)]
pub(super) struct Member {
    experiment: String,
    /// Its position in the experiment's processes.
    index: usize,
    /// `experiment/group` for a process of a group.
    pub(super) colocate: Option<String>,
    /// The experiment's name when it is placed as a gang.
    pub(super) gang: Option<String>,
}

impl Core {
    /// Rebuilds what is derived from the experiments (after they change): the deployment ->
    /// process index and the masked declarations.
    pub(super) fn reindex(&mut self) {
        self.declarations = self
            .experiments
            .values()
            .map(|e| {
                let masked = masked_declaration(&e.declaration);
                (e.name.clone(), std::sync::Arc::new(masked))
            })
            .collect();
        self.members = self
            .experiments
            .values()
            .flat_map(|e| {
                let gang = (e.placement == Placement::Gang).then(|| e.name.clone());
                e.processes.iter().enumerate().map(move |(index, p)| {
                    let member = Member {
                        experiment: e.name.clone(),
                        index,
                        colocate: p.group.as_ref().map(|g| format!("{}/{g}", e.name)),
                        gang: gang.clone(),
                    };
                    (p.deployment_id.clone(), member)
                })
            })
            .collect();
    }

    /// The experiment and process a deployment runs, if it is one's.
    pub(super) fn process_of(&self, id: &str) -> Option<(&ExperimentRecord, &ProcessRecord)> {
        let m = self.members.get(id)?;
        let e = self.experiments.get(&m.experiment)?;
        Some((e, e.processes.get(m.index)?))
    }

    /// The services namespace of a deployment: its experiment's name, or `default`.
    pub(super) fn namespace_of(&self, id: &str) -> &str {
        self.members
            .get(id)
            .map_or(DEFAULT_NAMESPACE, |m| m.experiment.as_str())
    }

    /// Launches an experiment: checks what only the cluster knows (env names, node groups,
    /// ports), then writes it, its deployments and their services in one transaction.
    pub(super) async fn launch(&mut self, launch: Launch) -> Result<(), CoreError> {
        let Launch {
            experiment,
            declaration,
            force,
        } = launch;
        let name = experiment.name.clone();
        let old = self.experiments.get(&name).cloned();
        if old.is_some() && !force {
            return Err(CoreError::Conflict(format!(
                "experiment {name} already exists; launch with force to replace it"
            )));
        }
        self.check_cluster_fields(&experiment)?;
        let now = now_ms();
        let records: Vec<DeploymentRecord> = experiment
            .processes
            .iter()
            .map(|p| DeploymentRecord {
                id: uuid::Uuid::new_v4().simple().to_string(),
                name: format!("{name}/{}", p.name),
                desired_state: DesiredState::Running,
                kind: "EXEC".to_owned(),
                specification: json!({ "spec": p.spec }),
                created_at_ms: now,
                updated_at_ms: now,
            })
            .collect();
        // Ports are planned against the cluster without the experiment being replaced, and
        // each process against those planned before it.
        let mut table: ServiceTable = self.services.clone();
        for p in old.iter().flat_map(|o| &o.processes) {
            table.remove(&p.deployment_id);
        }
        let mut plans: Vec<Planned> = Vec::with_capacity(records.len());
        let mut errors = Vec::new();
        for (p, rec) in experiment.processes.iter().zip(&records) {
            match table.plan(&name, &rec.id, &p.services, false) {
                Ok(binds) => {
                    table.set(&rec.id, binds.clone());
                    plans.push((binds, p.services.connects.clone()));
                }
                Err(errs) => errors.extend(errs.into_iter().map(|mut e| {
                    // `body.specification.spec.X` -> `body.processes.N.X`
                    let rest: Vec<String> = e.loc.split_off(3.min(e.loc.len()));
                    e.loc = [
                        "body".to_owned(),
                        "processes".to_owned(),
                        p.index.to_string(),
                    ]
                    .into_iter()
                    .chain(rest)
                    .collect();
                    e
                })),
            }
        }
        if !errors.is_empty() {
            return Err(CoreError::Invalid(errors));
        }
        let record = ExperimentRecord {
            name: name.clone(),
            declaration,
            placement: experiment.placement,
            created_at_ms: now,
            failed_reason: None,
            processes: experiment
                .processes
                .iter()
                .zip(&records)
                .map(|(p, rec)| ProcessRecord {
                    name: p.name.clone(),
                    group: p.group.clone(),
                    on_failure: p.on_failure,
                    deployment_id: rec.id.clone(),
                })
                .collect(),
        };
        let services: Vec<_> = plans.iter().flat_map(|(b, _)| b.iter().cloned()).collect();
        let mut events = vec![narrate::experiment(
            "experiment.launched",
            &name,
            format!(
                "experiment {name} launched: {} processes ({}){}",
                record.processes.len(),
                record.placement.as_str(),
                if old.is_some() {
                    ", replacing the previous one"
                } else {
                    ""
                }
            ),
            json!({"processes": record.processes.len(), "placement": record.placement.as_str(),
                "replaced": old.is_some()}),
        )];
        events.extend(old.iter().flat_map(|o| &o.processes).map(|p| {
            narrate::deployment(
                "deployment.deleted",
                &p.deployment_id,
                format!(
                    "{} deleted (its experiment {name} was launched again)",
                    p.name
                ),
                json!({"name": p.name, "experiment": name}),
            )
        }));
        events.extend(record.processes.iter().map(|p| {
            narrate::deployment(
                "deployment.created",
                &p.deployment_id,
                format!("{} created (process of experiment {name})", p.name),
                json!({"name": p.name, "experiment": name, "desired_state": "RUNNING"}),
            )
        }));
        self.persist(events, async |s, ev| {
            s.launch_experiment(&record, &records, &services, force, ev)
                .await
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict => CoreError::Conflict(format!(
                "experiment {name} already exists, or one of its ports was taken meanwhile"
            )),
            e => e.into(),
        })?;
        // Written: now memory follows.
        for p in old.iter().flat_map(|o| &o.processes) {
            if self.deployments.contains_key(&p.deployment_id) {
                self.forget(&p.deployment_id);
            }
        }
        for (rec, plan) in records.into_iter().zip(plans) {
            self.set_services(&rec.id, plan);
            self.wake(&rec.id);
            self.specs
                .insert(rec.id.clone(), parse_spec(&rec.specification));
            self.logs.ensure(&rec.id);
            self.awaiting_running
                .insert(rec.id.clone(), rec.created_at_ms);
            self.deployments.insert(rec.id.clone(), rec);
        }
        tracing::info!(experiment = %name, processes = record.processes.len(), replaced = old.is_some(), "experiment launched");
        self.experiments.insert(name, record);
        self.reindex();
        Ok(())
    }

    /// A process's `env_name` must be a defined env and its `node_group` a group some known
    /// node has (a typo would otherwise leave it pending for ever).
    fn check_cluster_fields(&self, e: &crate::spec::Experiment) -> Result<(), CoreError> {
        let groups: BTreeSet<&str> = self
            .nodes
            .values()
            .flat_map(|n| n.groups.iter().map(String::as_str))
            .collect();
        let mut r = Report::default();
        let mut seen = BTreeSet::new();
        for p in &e.processes {
            // Replicas share their declaration: one error each.
            if !seen.insert(p.index) {
                continue;
            }
            let Ok(spec) = parse_spec(&json!({ "spec": p.spec })) else {
                continue;
            };
            let at = Loc::new(&["body", "processes"]).at(p.index);
            if let Some(env) = &spec.env_name
                && !self.envs.contains_key(env)
            {
                let msg = format!("env {env:?} is not defined (see GET /conda-envs)");
                r.err(&at.at("config").at("env_name"), "value_error", msg);
            }
            if let Some(g) = spec.node_group.as_deref().filter(|g| !g.is_empty())
                && !groups.contains(g)
            {
                let msg = format!("no known node has the group {g:?}");
                r.err(&at.at("node_group"), "value_error", msg);
            }
        }
        r.finish(Some(())).map_err(CoreError::Invalid)
    }

    /// Stops or starts every process of an experiment, in one store transaction. `failed`:
    /// why a failed process stopped it (recorded, and shown as its reason); starting clears
    /// that.
    pub(super) async fn set_experiment_state(
        &mut self,
        name: &str,
        desired: DesiredState,
        failed: Option<String>,
    ) -> Result<(), CoreError> {
        let Some(e) = self.experiments.get(name) else {
            return Err(CoreError::NotFound("Experiment not found"));
        };
        let ids: Vec<String> = e
            .processes
            .iter()
            .map(|p| p.deployment_id.clone())
            .collect();
        let now = now_ms();
        let ev = narrate::experiment(
            if failed.is_some() {
                "experiment.failed"
            } else {
                "experiment.updated"
            },
            name,
            match &failed {
                Some(why) => format!("experiment {name} stopped: {why}"),
                None => format!("experiment {name}: desired {}", desired.as_str()),
            },
            json!({"desired_state": desired.as_str(), "reason": failed}),
        );
        let mut events = vec![ev];
        for p in &e.processes {
            let Some(d) = self
                .deployments
                .get(&p.deployment_id)
                .filter(|d| d.desired_state != desired)
            else {
                continue;
            };
            events.push(narrate::deployment(
                "deployment.updated",
                &d.id,
                format!(
                    "{}: desired {} -> {} (experiment {name})",
                    p.name,
                    d.desired_state.as_str(),
                    desired.as_str()
                ),
                json!({"name": p.name, "changed": ["desired_state"], "desired_state": desired.as_str(),
                    "experiment": name}),
            ));
        }
        self.persist(events, async |s, ev| {
            s.set_experiment_state(name, desired, failed.as_deref(), now, ev)
                .await
        })
        .await?;
        // Written: memory follows, as `patch` does for one deployment.
        for id in &ids {
            self.wake(id);
            if let Some(d) = self.deployments.get_mut(id)
                && d.desired_state != desired
            {
                d.desired_state = desired;
                d.updated_at_ms = now;
                if desired == DesiredState::Running {
                    self.awaiting_running.insert(id.clone(), now);
                }
            }
            if desired == DesiredState::Stopped {
                self.awaiting_running.remove(id);
                if let Some(a) = self.assignments.remove(id) {
                    self.unassign(&a.node_id, id, a.generation);
                }
                self.reported.remove(id);
            }
        }
        if let Some(e) = self.experiments.get_mut(name) {
            e.failed_reason = failed;
        }
        self.changed = true;
        self.needs_schedule = true;
        Ok(())
    }

    /// A process of a failed experiment was started on its own: the experiment is no longer
    /// stopped by that failure (its state follows its processes again, and `on_failure` acts
    /// again).
    pub(super) async fn process_started(&mut self, id: &str) {
        let running = self
            .deployments
            .get(id)
            .is_some_and(|d| d.desired_state == DesiredState::Running);
        let Some((e, _)) = self.process_of(id) else {
            return;
        };
        if !running || e.failed_reason.is_none() {
            return;
        }
        let name = e.name.clone();
        let ev = narrate::experiment(
            "experiment.updated",
            &name,
            format!(
                "experiment {name}: a process was started again; the failure no longer stops it"
            ),
            json!({"process": id}),
        );
        match self
            .persist(vec![ev], async |s, ev| {
                s.set_experiment_failed(&name, None, ev).await
            })
            .await
        {
            Ok(()) => {
                if let Some(e) = self.experiments.get_mut(&name) {
                    e.failed_reason = None;
                }
            }
            Err(e) => {
                tracing::error!(experiment = %name, error = %e, "could not clear the failure")
            }
        }
    }

    /// Deletes an experiment: its processes stop on their nodes, its services go.
    pub(super) async fn delete_experiment(&mut self, name: &str) -> Result<(), CoreError> {
        let Some(e) = self.experiments.get(name) else {
            return Err(CoreError::NotFound("Experiment not found"));
        };
        let mut events = vec![narrate::experiment(
            "experiment.deleted",
            name,
            format!("experiment {name} deleted"),
            json!({}),
        )];
        events.extend(e.processes.iter().map(|p| {
            narrate::deployment(
                "deployment.deleted",
                &p.deployment_id,
                format!("{} deleted (with its experiment {name})", p.name),
                json!({"name": p.name, "experiment": name}),
            )
        }));
        match self
            .persist(events, async |s, ev| s.delete_experiment(name, ev).await)
            .await
        {
            Ok(()) => {}
            Err(StoreError::NotFound) => return Err(CoreError::NotFound("Experiment not found")),
            Err(e) => return Err(e.into()),
        }
        if let Some(e) = self.experiments.remove(name) {
            for p in &e.processes {
                if self.deployments.contains_key(&p.deployment_id) {
                    self.forget(&p.deployment_id);
                }
            }
        }
        self.reindex();
        tracing::info!(experiment = %name, "experiment deleted");
        Ok(())
    }

    /// After a status is accepted: a process with `on_failure: stop-experiment` that failed
    /// (its restart policy gave up) stops its whole experiment.
    pub(super) async fn on_process_status(&mut self, id: &str, state: &str, reason: &str) {
        let failed = matches!(
            CurrentState::from_wire(state),
            CurrentState::Failed | CurrentState::Crashed
        );
        if !failed {
            return;
        }
        let Some((e, p)) = self.process_of(id) else {
            return;
        };
        if p.on_failure != OnFailure::StopExperiment || e.failed_reason.is_some() {
            return;
        }
        let name = e.name.clone();
        let why = if reason.is_empty() {
            format!(
                "process {} failed; experiment stopped (on_failure: stop-experiment)",
                p.name
            )
        } else {
            format!(
                "process {} failed ({reason}); experiment stopped (on_failure: stop-experiment)",
                p.name
            )
        };
        tracing::info!(experiment = %name, %why, "stopping experiment");
        self.stops_due.insert(name, why);
        self.retry_stops().await;
    }

    /// Stops the experiments a failed process should stop (`on_failure: stop-experiment`);
    /// one whose write fails stays due and is tried again on the next tick.
    pub(super) async fn retry_stops(&mut self) {
        for (name, why) in std::mem::take(&mut self.stops_due) {
            let still = self
                .experiments
                .get(&name)
                .is_some_and(|e| e.failed_reason.is_none());
            if !still {
                continue;
            }
            if let Err(e) = self
                .set_experiment_state(&name, DesiredState::Stopped, Some(why.clone()))
                .await
            {
                tracing::error!(experiment = %name, error = %e, "could not stop the experiment; retrying");
                self.stops_due.insert(name, why);
            }
        }
    }

    /// The experiments as the API shows them (newest first), from the deployments' views.
    pub(super) fn experiment_views(
        &self,
        deployments: &[std::sync::Arc<crate::model::Deployment>],
    ) -> Vec<std::sync::Arc<crate::model::ExperimentInfo>> {
        let by_id: std::collections::HashMap<&str, &crate::model::Deployment> = deployments
            .iter()
            .filter(|d| self.members.contains_key(d.id.as_str()))
            .map(|d| (d.id.as_str(), d.as_ref()))
            .collect();
        let mut by_namespace: std::collections::HashMap<&str, Vec<String>> =
            std::collections::HashMap::new();
        for s in self.services.all() {
            by_namespace
                .entry(s.namespace.as_str())
                .or_default()
                .push(s.name.clone());
        }
        let mut out: Vec<_> = self
            .experiments
            .values()
            .map(|e| {
                let services = by_namespace.remove(e.name.as_str()).unwrap_or_default();
                let mut info =
                    crate::conductor::view::experiment(e, |id| by_id.get(id).copied(), services);
                info.declaration = self.declarations.get(&e.name).cloned();
                std::sync::Arc::new(info)
            })
            .collect();
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        out
    }
}

/// The declaration as the API shows it: every process's git token masked.
pub fn masked_declaration(declaration: &Value) -> Value {
    let mut out = declaration.clone();
    if let Some(Value::Array(processes)) = out.get_mut("processes") {
        for p in processes {
            let mut wrapped = json!({ "spec": p.take() });
            crate::spec::mask_secrets(&mut wrapped);
            *p = wrapped["spec"].take();
        }
    }
    out
}
