//! Workflow definitions (every version) and runs (one JSON document each). A batch of run
//! changes is written with the task deployments it creates or changes in one transaction.

use sqlx::Row;

use super::{
    DeploymentRecord, ROWS_PER_STATEMENT, Secrets, Store, StoreError, db_err,
    delete_deployments_on, delete_in_on, finish, insert_deployments_on, int, json, text,
};
use crate::conductor::events::Event;
use crate::conductor::runs::Run;

/// One version of a workflow definition.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowRecord {
    pub name: String,
    pub version: u32,
    /// As the user sent it (tokens in the clear in memory, sealed at rest).
    pub definition: serde_json::Value,
    pub created_at_ms: i64,
}

/// What one batch of run changes writes.
#[derive(Debug, Default)]
pub struct RunsWrite<'a> {
    pub runs: Vec<&'a Run>,
    pub create: Vec<DeploymentRecord>,
    /// Task deployments whose desired state or spec changed (every field but the id and
    /// creation time is written).
    pub update: Vec<DeploymentRecord>,
    /// Task deployments whose desired state alone changed (their spec is as stored): only the
    /// state and the update time are written, not the spec again.
    pub state_only: Vec<DeploymentRecord>,
    /// Deployments whose assignment ends (their attempt did).
    pub clear: Vec<String>,
    /// Finished runs past their workflow's `keep_runs`, deleted ...
    pub delete_runs: Vec<String>,
    /// ... with their task deployments (and whatever refers to those).
    pub delete_deployments: Vec<String>,
}

impl RunsWrite<'_> {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.create.is_empty()
            && self.update.is_empty()
            && self.state_only.is_empty()
            && self.clear.is_empty()
            && self.delete_runs.is_empty()
            && self.delete_deployments.is_empty()
    }
}

impl Store {
    /// Stores a new version of a workflow; [`StoreError::Conflict`] if that version exists.
    pub async fn insert_workflow(
        &self,
        w: &WorkflowRecord,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let definition = Secrets::Declaration.sealed(&self.key, &w.definition)?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO workflows (name, version, definition, created_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&w.name)
        .bind(i64::from(w.version))
        .bind(definition)
        .bind(w.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish(tx, events).await
    }

    /// Every version of every workflow, by name and version.
    pub async fn list_workflows(&self) -> Result<Vec<WorkflowRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, version, definition, created_at_ms FROM workflows \
             ORDER BY name, version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let name = text(r, "name")?;
                let mut definition = json(r, "definition")?;
                Secrets::Declaration.open(&self.key, &mut definition, &format!("workflow/{name}"));
                Ok(WorkflowRecord {
                    name,
                    version: u32::try_from(int(r, "version")?).unwrap_or(0),
                    definition,
                    created_at_ms: int(r, "created_at_ms")?,
                })
            })
            .collect()
    }

    /// Writes runs (insert or replace) and their task deployments in one transaction: a few
    /// multi-row statements, not one per row (each is a round trip to SQLite's thread).
    pub async fn write_runs(&self, w: &RunsWrite<'_>, events: &[Event]) -> Result<(), StoreError> {
        let now = crate::conductor::core::now_ms();
        let mut docs = Vec::with_capacity(w.runs.len());
        for run in &w.runs {
            docs.push((*run, serde_json::to_string(run).map_err(StoreError::Json)?));
        }
        // One row per deployment (the last change wins, as one at a time would): an UPDATE
        // from a list of values takes an arbitrary one of two rows for the same id.
        let mut seen = std::collections::HashSet::new();
        let mut updates = Vec::with_capacity(w.update.len());
        for d in w.update.iter().rev() {
            if seen.insert(d.id.as_str()) {
                updates.push((
                    d,
                    Secrets::Specification.sealed(&self.key, &d.specification)?,
                ));
            }
        }
        updates.reverse();
        let mut tx = self.begin_write().await?;
        for chunk in docs.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO runs (id, workflow, seq, state, doc, updated_at_ms) ",
            );
            q.push_values(chunk, |mut b, (run, doc)| {
                b.push_bind(&run.id)
                    .push_bind(&run.workflow)
                    .push_bind(i64::try_from(run.seq).unwrap_or(i64::MAX))
                    .push_bind(run.state.as_str())
                    .push_bind(doc)
                    .push_bind(now);
            });
            q.push(
                " ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc, \
                 updated_at_ms = excluded.updated_at_ms",
            );
            q.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        insert_deployments_on(&mut tx, &w.create, &self.key).await?;
        for chunk in updates.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "UPDATE deployments SET name = v.column2, desired_state = v.column3, \
                 specification = v.column4, updated_at_ms = v.column5 FROM (",
            );
            q.push_values(chunk, |mut b, (d, spec)| {
                b.push_bind(&d.id)
                    .push_bind(&d.name)
                    .push_bind(d.desired_state.as_str())
                    .push_bind(spec)
                    .push_bind(d.updated_at_ms);
            });
            q.push(") AS v WHERE deployments.id = v.column1");
            q.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        for chunk in w.state_only.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "UPDATE deployments SET desired_state = v.column2, updated_at_ms = v.column3 \
                 FROM (",
            );
            q.push_values(chunk, |mut b, d| {
                b.push_bind(&d.id)
                    .push_bind(d.desired_state.as_str())
                    .push_bind(d.updated_at_ms);
            });
            q.push(") AS v WHERE deployments.id = v.column1");
            q.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        delete_in_on(&mut tx, "assignments", "deployment_id", &w.clear).await?;
        delete_deployments_on(&mut tx, &w.delete_deployments).await?;
        delete_in_on(&mut tx, "runs", "id", &w.delete_runs).await?;
        finish(tx, events).await
    }

    /// Every run, oldest first.
    pub async fn list_runs(&self) -> Result<Vec<Run>, StoreError> {
        let rows = sqlx::query("SELECT doc FROM runs ORDER BY workflow, seq")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let doc: String = r.try_get("doc").map_err(db_err)?;
                serde_json::from_str(&doc).map_err(StoreError::Json)
            })
            .collect()
    }

    /// Deletes a finished run (its task deployments are deleted by the caller).
    pub async fn delete_run(&self, id: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM runs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        finish(tx, events).await
    }
}
