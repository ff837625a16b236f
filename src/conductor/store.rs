//! Durable conductor state (sqlx, SQLite by default): deployments, conda envs, assignments with
//! their generations, node registrations and the generation counter.
//!
//! The store is dumb storage with typed methods; policy (validation of API input, scheduling)
//! lives in the core. Invariants:
//!
//! - rows are always mapped **by column name**, never by probing values, so a deployment named
//!   `current_state` or a spec containing any string is just data (original bug B4);
//! - every query is plain, portable SQL with `$N` placeholders (also valid on PostgreSQL): JSON is
//!   `TEXT`, integers are `BIGINT`, no SQLite-only functions. The only SQLite-specific parts are
//!   the connection options in [`Store::open`] and `BEGIN IMMEDIATE` in `Store::begin_write`;
//! - the generation counter (`counters.generation_high_water`) never goes down, and is always at
//!   least the generation of every assignment ever written through this store, so a generation
//!   handed out after a restart is never reused even if assignments were deleted;
//! - multi-row writes ([`Store::apply_placements`], [`Store::delete_deployment`]) run in one
//!   transaction: the caller persists first, then acts on the cluster;
//! - every write the core makes takes the events that record it ([`super::events`]) and writes
//!   them, with the event counter, in the same transaction;
//! - git tokens (`spec.config.token` of a specification, `processes[i].config.token` of an
//!   experiment declaration) are sealed with the store's [`SealKey`] on every write and opened
//!   on every read, so callers only ever see plaintext and the database never holds one. A
//!   token that does not open (the key file was replaced) is left sealed, with a warning naming
//!   the record and the key; the core then fails that deployment alone, with a reason.

mod migrate;
mod runs;
mod trust;

pub use runs::{RunsWrite, WorkflowRecord};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use migrate::{EVENT_COUNTER, GENERATION_COUNTER};

use super::events::{Event, Filter};
use super::services::Service;
use crate::model::{DesiredState, Generation};
use crate::seal::{SealError, SealKey};
use crate::spec::{OnFailure, Placement, declaration_token_slots, token_slot};

/// File name of the database inside the storage folder given to [`Store::open`].
pub const DB_FILE_NAME: &str = "symphony.db";

/// How long a connection waits for a lock held by another writer before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Pool size for the file-backed store (WAL allows concurrent readers and one writer).
const FILE_POOL_SIZE: u32 = 4;

/// Allowed values of [`DeploymentRecord::kind`].
pub const DEPLOYMENT_KINDS: [&str; 2] = ["EXEC", "DOCKER"];
/// Allowed values of [`CondaEnvRecord::manager`].
pub const ENV_MANAGERS: [&str; 2] = ["conda", "uv"];

/// Errors from store operations.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The record addressed by id or name does not exist (also: an assignment for an unknown
    /// deployment).
    #[error("record not found")]
    NotFound,
    /// A record with the same key already exists.
    #[error("record already exists")]
    Conflict,
    /// A field holds a value the store refuses to write, or a stored value is out of range.
    #[error("invalid value for {field}: {value:?}")]
    Invalid {
        /// The column or field concerned.
        field: &'static str,
        /// The offending value, rendered for the message.
        value: String,
    },
    /// The database was written by a newer binary (its schema version is unknown here).
    #[error("database schema version {found} is newer than the supported {supported}")]
    SchemaTooNew {
        /// Highest version recorded in the database.
        found: i64,
        /// Highest version this binary knows.
        supported: i64,
    },
    /// Any other database error.
    #[error("database error")]
    Db(#[source] sqlx::Error),
    /// A JSON column could not be encoded or decoded.
    #[error("JSON column error")]
    Json(#[source] serde_json::Error),
    /// Filesystem error while preparing the storage folder.
    #[error("storage folder error")]
    Io(#[source] std::io::Error),
    /// A secret could not be sealed.
    #[error("sealing a secret")]
    Seal(#[source] SealError),
    /// The database takes no writes: its disk is full, it is read-only, or the disk failed.
    /// Reads go on; writes work again once the cause is gone.
    #[error("the database at {path} takes no writes: {cause}")]
    Unwritable {
        cause: Unwritable,
        /// The database file (empty until [`StoreError::at`] names it: the core's writes do).
        path: String,
    },
    /// The database stayed locked past the busy timeout (another process or transaction
    /// holds it).
    #[error("the database at {path} is locked by another process")]
    Busy {
        /// The database file (empty until [`StoreError::at`] names it).
        path: String,
    },
}

/// Why the database takes no writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwritable {
    /// No space left on its disk.
    Full,
    /// Its file or disk is read-only.
    ReadOnly,
    /// The disk failed a read or write.
    Io,
}

impl Unwritable {
    /// The machine-readable cause in an API error.
    pub fn code(self) -> &'static str {
        match self {
            Self::Full => "disk_full",
            Self::ReadOnly => "read_only",
            Self::Io => "io_error",
        }
    }
}

impl std::fmt::Display for Unwritable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "its disk is full",
            Self::ReadOnly => "it is read-only",
            Self::Io => "its disk failed (I/O error)",
        })
    }
}

impl StoreError {
    /// Names the database file in an environmental error.
    #[must_use]
    pub fn at(self, db: &Path) -> Self {
        let named = db.display().to_string();
        match self {
            Self::Unwritable { cause, .. } => Self::Unwritable { cause, path: named },
            Self::Busy { .. } => Self::Busy { path: named },
            e => e,
        }
    }

    /// A cause outside the program (the disk, another process): the operator must act.
    pub fn is_environmental(&self) -> bool {
        matches!(self, Self::Unwritable { .. } | Self::Busy { .. })
    }
}

/// A deployment as stored. `current_state` is not stored: it is observed, not desired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Unique id (primary key).
    pub id: String,
    /// Human name; not unique, any string.
    pub name: String,
    /// `RUNNING` or `STOPPED`.
    pub desired_state: DesiredState,
    /// `EXEC` or `DOCKER` (see [`DEPLOYMENT_KINDS`]).
    pub kind: String,
    /// The full specification, stored as compact JSON text.
    pub specification: serde_json::Value,
    /// Creation time, Unix milliseconds; never changed by updates.
    pub created_at_ms: i64,
    /// Last update time, Unix milliseconds.
    pub updated_at_ms: i64,
}

/// A conda (or uv) environment definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CondaEnvRecord {
    /// Unique name (primary key).
    pub name: String,
    /// Python version, e.g. `3.12`.
    pub python_version: String,
    /// Package specs, in order.
    pub packages: Vec<String>,
    /// Optional script run after the packages are installed.
    pub custom_script: Option<String>,
    /// `conda` or `uv` (see [`ENV_MANAGERS`]).
    pub manager: String,
    /// Creation time, Unix milliseconds; never changed by updates.
    pub created_at_ms: i64,
    /// Last update time, Unix milliseconds.
    pub updated_at_ms: i64,
}

/// Placement of one deployment on one node, fenced by a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The deployment (must exist).
    pub deployment_id: String,
    /// The node it is placed on.
    pub node_id: String,
    /// Generation of this placement; at most `i64::MAX`.
    pub generation: Generation,
}

/// A node registration (static facts only; live usage is not durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node id (primary key).
    pub node_id: String,
    /// Groups (labels) the node belongs to.
    pub groups: Vec<String>,
    /// Total virtual capacity per class.
    pub capacities_total: BTreeMap<String, i64>,
    /// When the node was first registered, Unix milliseconds; kept by upserts.
    pub first_seen_ms: i64,
    /// When the node was last seen, Unix milliseconds.
    pub last_seen_ms: i64,
}

/// An experiment: its declaration as launched and its processes, each a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    /// Unique name (primary key); also the namespace of its services.
    pub name: String,
    /// The declaration as it was launched (JSON).
    pub declaration: serde_json::Value,
    pub placement: Placement,
    /// Launch time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Set when a failed process stopped the whole experiment (`on_failure:
    /// stop-experiment`); cleared when it is started again.
    pub failed_reason: Option<String>,
    /// In declaration order (replicas expanded).
    pub processes: Vec<ProcessRecord>,
}

/// One process of an experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Unique in its experiment.
    pub name: String,
    /// Its process group (members share a node).
    pub group: Option<String>,
    pub on_failure: OnFailure,
    /// The deployment that runs it (must exist).
    pub deployment_id: String,
}

/// Everything the store holds, read in one transaction (for the core's start-up).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreSnapshot {
    /// As [`Store::list_deployments`].
    pub deployments: Vec<DeploymentRecord>,
    /// As [`Store::list_conda_envs`].
    pub conda_envs: Vec<CondaEnvRecord>,
    /// As [`Store::list_assignments`].
    pub assignments: Vec<AssignmentRecord>,
    /// As [`Store::list_nodes`].
    pub nodes: Vec<NodeRecord>,
    /// As [`Store::max_generation`].
    pub max_generation: Generation,
    /// As [`Store::list_services`].
    pub services: Vec<Service>,
    /// As [`Store::list_experiments`].
    pub experiments: Vec<ExperimentRecord>,
    /// The highest event id ever written.
    pub event_high_water: u64,
}

/// What [`Store::patch_deployment`] does to the deployment's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    /// Leave it.
    Keep,
    /// Remove it.
    Clear,
    /// Replace it (raising the generation counter to its generation).
    Set(AssignmentRecord),
}

/// Handle to the durable store; cheap to clone (it wraps a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    /// Reads.
    pool: SqlitePool,
    /// Writes: one connection, so its page cache stays valid from one write to the next (a
    /// write on another connection makes a connection read again every page it touches).
    writer: SqlitePool,
    /// The database file (`None` in memory), named in environmental errors.
    path: Option<Arc<Path>>,
    /// Seals the secrets this store writes and opens those it reads.
    key: SealKey,
}

// === SQL ===

const SELECT_DEPLOYMENTS: &str = "SELECT id, name, desired_state, kind, specification, \
     created_at_ms, updated_at_ms FROM deployments ORDER BY created_at_ms DESC, id ASC";
const SELECT_DEPLOYMENT: &str = "SELECT id, name, desired_state, kind, specification, \
     created_at_ms, updated_at_ms FROM deployments WHERE id = $1";
const SELECT_CONDA_ENVS: &str = "SELECT name, python_version, packages, custom_script, manager, \
     created_at_ms, updated_at_ms FROM conda_envs ORDER BY created_at_ms DESC, name ASC";
const SELECT_CONDA_ENV: &str = "SELECT name, python_version, packages, custom_script, manager, \
     created_at_ms, updated_at_ms FROM conda_envs WHERE name = $1";
const SELECT_SERVICES: &str = "SELECT namespace, name, deployment_id, port, exposed \
     FROM services ORDER BY namespace, name";
const SELECT_EXPERIMENTS: &str = "SELECT name, declaration, placement, created_at_ms, \
     failed_reason FROM experiments ORDER BY created_at_ms DESC, name ASC";
const SELECT_PROCESSES: &str = "SELECT deployment_id, experiment, process, process_group, \
     on_failure FROM experiment_processes ORDER BY experiment, position";
const INSERT_SERVICE: &str = "INSERT INTO services (namespace, name, deployment_id, port, \
     exposed) VALUES ($1, $2, $3, $4, $5)";
const SELECT_ASSIGNMENTS: &str =
    "SELECT deployment_id, node_id, generation FROM assignments ORDER BY deployment_id ASC";
const SELECT_ASSIGNMENT: &str =
    "SELECT deployment_id, node_id, generation FROM assignments WHERE deployment_id = $1";
const SELECT_NODES: &str = "SELECT node_id, groups_json, capacities_total, first_seen_ms, \
     last_seen_ms FROM nodes ORDER BY node_id ASC";
/// Reads a counter row (the generation's or the events').
const SELECT_COUNTER: &str = "SELECT value FROM counters WHERE name = $1";
/// Portable "raise to at least" (no two-argument MAX/GREATEST, which differ between databases);
/// raises any counter row, the generation's or the events'.
const BUMP_COUNTER: &str = "UPDATE counters SET value = CASE WHEN value < $1 THEN $1 \
     ELSE value END WHERE name = $2";

impl Store {
    /// Opens (creating if missing) `dir/symphony.db` and brings its schema up to date; `key`
    /// seals the secrets it holds (the conductor keeps it in `dir/secrets.key`). Tokens an
    /// older version stored in clear are sealed now (see [`Store::seal_plaintext_tokens`]).
    ///
    /// Creates `dir` if needed. The connection uses WAL, `synchronous=NORMAL`, foreign keys,
    /// temporary data in memory and a busy timeout.
    pub async fn open(dir: &Path, key: SealKey) -> Result<Store, StoreError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(StoreError::Io)?;
        let options = SqliteConnectOptions::new()
            .filename(dir.join(DB_FILE_NAME))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // A statement that may need undoing alone (a multi-row upsert, an insert that
            // moves b-tree pages) journals the pages it changes; past 64 KiB that journal
            // spilled to a temporary file, created, written and deleted per statement.
            .pragma("temp_store", "memory")
            // A checkpoint copies the log's pages into the file and syncs it: every 4 096
            // pages (16 MiB of log, not SQLite's 1 000) there are fewer of them, and a page
            // written many times meanwhile (a run's document) is copied once.
            .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES.to_string());
        let pool = |size: u32, options: SqliteConnectOptions| {
            SqlitePoolOptions::new()
                .max_connections(size)
                // A COMMIT that fails on a full disk is rolled back by SQLite itself; sqlx's
                // own rollback then fails and the connection still counts a transaction, so
                // every later BEGIN on it fails. An idle connection in a transaction is such a
                // one: closed, never handed out (the pool opens a fresh one).
                .before_acquire(|conn, _| {
                    Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
                })
                .connect_with(options)
        };
        // The writer keeps every shape of its multi-row statements prepared (a batch of up to
        // ROWS_PER_STATEMENT rows is one statement; SQLite's default of 100 had them evicted
        // and parsed again on nearly every flush).
        let writer = pool(
            1,
            options.clone().statement_cache_capacity(WRITER_STATEMENTS),
        )
        .await
        .map_err(db_err)?;
        let readers = pool(FILE_POOL_SIZE, options).await.map_err(db_err)?;
        let mut store = Self::from_pools(readers, writer, key).await?;
        store.path = Some(dir.join(DB_FILE_NAME).into());
        let sealed = store.seal_plaintext_tokens().await?;
        if sealed > 0 {
            tracing::info!(
                records = sealed,
                "sealed the git tokens an older version stored in clear"
            );
        }
        Ok(store)
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Opens a fresh private in-memory database (for tests). It lives as long as the returned
    /// store and its clones; it holds exactly one connection, never recycled.
    pub async fn open_memory() -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(db_err)?;
        let key = SealKey::generate().map_err(StoreError::Seal)?;
        Self::from_pools(pool.clone(), pool, key).await
    }

    async fn from_pools(
        pool: SqlitePool,
        writer: SqlitePool,
        key: SealKey,
    ) -> Result<Store, StoreError> {
        migrate::migrate(&writer).await?;
        Ok(Store {
            pool,
            writer,
            path: None,
            key,
        })
    }

    /// Seals every git token still in clear (rows an older version wrote) in one
    /// transaction; returns the number of rows rewritten. When it rewrote any, the old
    /// plaintext is scrubbed from the files too: a `VACUUM` (no free page keeps a copy) and a
    /// truncating WAL checkpoint (no WAL frame does) follow.
    pub async fn seal_plaintext_tokens(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut rewritten = 0;
        for (select, update, key_column, column, secrets) in [
            (
                "SELECT id, specification FROM deployments",
                "UPDATE deployments SET specification = $1 WHERE id = $2",
                "id",
                "specification",
                Secrets::Specification,
            ),
            (
                "SELECT name, declaration FROM experiments",
                "UPDATE experiments SET declaration = $1 WHERE name = $2",
                "name",
                "declaration",
                Secrets::Declaration,
            ),
        ] {
            let rows = sqlx::query(select)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            for row in &rows {
                let mut value: serde_json::Value = json(row, column)?;
                if !secrets.any_in_clear(&mut value) {
                    continue;
                }
                sqlx::query(update)
                    .bind(secrets.sealed(&self.key, &value)?)
                    .bind(text(row, key_column)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                rewritten += 1;
            }
        }
        tx.commit().await.map_err(db_err)?;
        if rewritten > 0 {
            for sql in ["VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"] {
                sqlx::query(sql)
                    .execute(&self.writer)
                    .await
                    .map_err(db_err)?;
            }
        }
        Ok(rewritten)
    }

    /// The schema version this binary writes (the database is migrated to it on open).
    pub fn schema_version() -> i64 {
        migrate::latest_version()
    }

    /// Closes all connections; later calls on clones fail with [`StoreError::Db`].
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Starts a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`), so a read-then-write never fails on a lock upgrade; a PostgreSQL
    /// backend would use a plain `BEGIN`.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
    }

    // === deployments ===

    /// Inserts a new deployment with the services it binds, in one transaction;
    /// [`StoreError::Conflict`] if the id, a service name or a port exists.
    pub async fn insert_deployment(
        &self,
        d: &DeploymentRecord,
        services: &[Service],
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        insert_deployment_on(&mut tx, d, &self.key).await?;
        for s in services {
            insert_service_on(&mut tx, &d.id, s).await?;
        }
        finish(tx, events).await
    }

    /// In one transaction: replaces every field of an existing deployment except `id` and
    /// `created_at_ms`, replaces the services it binds, and changes its assignment as told;
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn patch_deployment(
        &self,
        d: &DeploymentRecord,
        services: &[Service],
        assignment: &AssignmentChange,
        events: &[Event],
    ) -> Result<(), StoreError> {
        check_deployment(d)?;
        let spec = Secrets::Specification.sealed(&self.key, &d.specification)?;
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE deployments SET name = $1, desired_state = $2, kind = $3, \
             specification = $4, updated_at_ms = $5 WHERE id = $6",
        )
        .bind(&d.name)
        .bind(d.desired_state.as_str())
        .bind(&d.kind)
        .bind(spec)
        .bind(d.updated_at_ms)
        .bind(&d.id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        found(done.rows_affected())?;
        replace_services_on(&mut tx, &d.id, services).await?;
        match assignment {
            AssignmentChange::Keep => {}
            AssignmentChange::Clear => {
                sqlx::query("DELETE FROM assignments WHERE deployment_id = $1")
                    .bind(&d.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
            }
            AssignmentChange::Set(a) => set_assignment_on(&mut tx, a).await?,
        }
        finish(tx, events).await
    }

    /// Deletes a deployment, its assignment and its services in one transaction;
    /// [`StoreError::NotFound`] if it does not exist. The generation counter is not lowered.
    pub async fn delete_deployment(&self, id: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        found(delete_deployment_on(&mut tx, id).await?)?;
        finish(tx, events).await
    }

    /// One deployment by id.
    pub async fn get_deployment(&self, id: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        let row = sqlx::query(SELECT_DEPLOYMENT)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref()
            .map(|r| deployment_from_row(r, &self.key))
            .transpose()
    }

    /// All deployments, newest first (`created_at_ms` descending, then `id` ascending).
    pub async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(SELECT_DEPLOYMENTS)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| deployment_from_row(r, &self.key))
            .collect()
    }

    // === services ===

    /// Replaces the services `deployment_id` binds, in one transaction;
    /// [`StoreError::Conflict`] if a name or port is another deployment's.
    pub async fn set_services(
        &self,
        deployment_id: &str,
        services: &[Service],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        replace_services_on(&mut tx, deployment_id, services).await?;
        tx.commit().await.map_err(db_err)
    }

    /// Every bound service, by namespace and name.
    pub async fn list_services(&self) -> Result<Vec<Service>, StoreError> {
        let rows = sqlx::query(SELECT_SERVICES)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(service_from_row).collect()
    }

    // === experiments ===

    /// Writes an experiment with its deployments and their services in one transaction.
    /// With `replace`, an experiment of the same name goes first (its deployments, their
    /// assignments and services with it); without, an existing name is
    /// [`StoreError::Conflict`].
    pub async fn launch_experiment(
        &self,
        e: &ExperimentRecord,
        deployments: &[DeploymentRecord],
        services: &[Service],
        replace: bool,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        if replace {
            delete_experiment_on(&mut tx, &e.name).await?;
        }
        let placement = e.placement.as_str();
        let declaration = Secrets::Declaration.sealed(&self.key, &e.declaration)?;
        sqlx::query(
            "INSERT INTO experiments (name, declaration, placement, created_at_ms, \
             failed_reason) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&e.name)
        .bind(declaration)
        .bind(placement)
        .bind(e.created_at_ms)
        .bind(&e.failed_reason)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        insert_deployments_on(&mut tx, deployments, &self.key).await?;
        for (position, p) in (0_i64..).zip(&e.processes) {
            sqlx::query(
                "INSERT INTO experiment_processes (deployment_id, experiment, process, \
                 process_group, on_failure, position) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&p.deployment_id)
            .bind(&e.name)
            .bind(&p.name)
            .bind(&p.group)
            .bind(p.on_failure.as_str())
            .bind(position)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        for s in services {
            insert_service_on(&mut tx, &s.deployment_id, s).await?;
        }
        finish(tx, events).await
    }

    /// Deletes an experiment and its deployments (with their assignments and services) in one
    /// transaction; [`StoreError::NotFound`] if it does not exist.
    pub async fn delete_experiment(&self, name: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        found(delete_experiment_on(&mut tx, name).await?)?;
        finish(tx, events).await
    }

    /// Sets every process of an experiment to `desired` and records (or clears) why it
    /// failed, in one transaction; stopped processes lose their assignments (STOPPED is not
    /// placed). [`StoreError::NotFound`] if it does not exist.
    pub async fn set_experiment_state(
        &self,
        name: &str,
        desired: DesiredState,
        failed_reason: Option<&str>,
        at_ms: i64,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE experiments SET failed_reason = $1 WHERE name = $2")
            .bind(failed_reason)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        found(done.rows_affected())?;
        sqlx::query(
            "UPDATE deployments SET desired_state = $2, updated_at_ms = $3 \
             WHERE desired_state <> $2 AND id IN \
             (SELECT deployment_id FROM experiment_processes WHERE experiment = $1)",
        )
        .bind(name)
        .bind(desired.as_str())
        .bind(at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if desired == DesiredState::Stopped {
            sqlx::query(
                "DELETE FROM assignments WHERE deployment_id IN \
                 (SELECT deployment_id FROM experiment_processes WHERE experiment = $1)",
            )
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        finish(tx, events).await
    }

    /// Records (or clears) why a failed process stopped the experiment;
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn set_experiment_failed(
        &self,
        name: &str,
        reason: Option<&str>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE experiments SET failed_reason = $1 WHERE name = $2")
            .bind(reason)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        found(done.rows_affected())?;
        finish(tx, events).await
    }

    /// All experiments, newest first, each with its processes in declaration order.
    pub async fn list_experiments(&self) -> Result<Vec<ExperimentRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        experiments_on(&mut conn, &self.key).await
    }

    // === conda envs ===

    /// Inserts a new env; [`StoreError::Conflict`] if the name exists.
    pub async fn insert_conda_env(
        &self,
        e: &CondaEnvRecord,
        events: &[Event],
    ) -> Result<(), StoreError> {
        check_env(e)?;
        let packages = serde_json::to_string(&e.packages).map_err(StoreError::Json)?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO conda_envs (name, python_version, packages, custom_script, manager, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&e.name)
        .bind(&e.python_version)
        .bind(packages)
        .bind(e.custom_script.as_deref())
        .bind(&e.manager)
        .bind(e.created_at_ms)
        .bind(e.updated_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish(tx, events).await
    }

    /// Replaces every field of an existing env except `name` and `created_at_ms`;
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn update_conda_env(
        &self,
        e: &CondaEnvRecord,
        events: &[Event],
    ) -> Result<(), StoreError> {
        check_env(e)?;
        let packages = serde_json::to_string(&e.packages).map_err(StoreError::Json)?;
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE conda_envs SET python_version = $1, packages = $2, custom_script = $3, \
             manager = $4, updated_at_ms = $5 WHERE name = $6",
        )
        .bind(&e.python_version)
        .bind(packages)
        .bind(e.custom_script.as_deref())
        .bind(&e.manager)
        .bind(e.updated_at_ms)
        .bind(&e.name)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        found(done.rows_affected())?;
        finish(tx, events).await
    }

    /// Deletes an env; [`StoreError::NotFound`] if it does not exist.
    pub async fn delete_conda_env(&self, name: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM conda_envs WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        found(done.rows_affected())?;
        finish(tx, events).await
    }

    /// One env by name.
    pub async fn get_conda_env(&self, name: &str) -> Result<Option<CondaEnvRecord>, StoreError> {
        let row = sqlx::query(SELECT_CONDA_ENV)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(env_from_row).transpose()
    }

    /// All envs, newest first (`created_at_ms` descending, then `name` ascending).
    pub async fn list_conda_envs(&self) -> Result<Vec<CondaEnvRecord>, StoreError> {
        let rows = sqlx::query(SELECT_CONDA_ENVS)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(env_from_row).collect()
    }

    // === assignments and generations ===

    /// Inserts or replaces the assignment of `a.deployment_id`, and raises the generation
    /// counter to at least `a.generation`, in one transaction. [`StoreError::NotFound`] if the
    /// deployment does not exist.
    pub async fn set_assignment(&self, a: &AssignmentRecord) -> Result<(), StoreError> {
        self.apply_placements(std::slice::from_ref(a), &[], Generation::default(), &[])
            .await
    }

    /// Removes the assignment of a deployment; a no-op if it has none.
    pub async fn clear_assignment(&self, deployment_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM assignments WHERE deployment_id = $1")
            .bind(deployment_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// The assignment of one deployment, if any.
    pub async fn get_assignment(
        &self,
        deployment_id: &str,
    ) -> Result<Option<AssignmentRecord>, StoreError> {
        let row = sqlx::query(SELECT_ASSIGNMENT)
            .bind(deployment_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(assignment_from_row).transpose()
    }

    /// All assignments, ordered by deployment id.
    pub async fn list_assignments(&self) -> Result<Vec<AssignmentRecord>, StoreError> {
        let rows = sqlx::query(SELECT_ASSIGNMENTS)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(assignment_from_row).collect()
    }

    /// The highest generation ever issued (survives deletes and restarts; never decreases).
    pub async fn max_generation(&self) -> Result<Generation, StoreError> {
        let row = sqlx::query(SELECT_COUNTER)
            .bind(GENERATION_COUNTER)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        generation_from_row(&row)
    }

    /// Raises the generation counter to `at_least`; a lower value leaves it unchanged.
    pub async fn bump_generation(&self, at_least: Generation) -> Result<(), StoreError> {
        let at_least = generation_to_db(at_least)?;
        sqlx::query(BUMP_COUNTER)
            .bind(at_least)
            .bind(GENERATION_COUNTER)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// The scheduler's atomic write, in ONE transaction: upserts every assignment in `set`,
    /// removes the assignments of the deployments in `clear` (absent ones are ignored), and
    /// raises the generation counter to at least `generation_high_water` and every generation
    /// in `set`. Clears run before sets, so an id in both ends up assigned. On any error
    /// nothing is written. [`StoreError::NotFound`] if a deployment in
    /// `set` does not exist.
    pub async fn apply_placements(
        &self,
        set: &[AssignmentRecord],
        clear: &[String],
        generation_high_water: Generation,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut high = generation_high_water;
        let mut checked = Vec::with_capacity(set.len());
        for a in set {
            high = high.max(a.generation);
            checked.push(generation_to_db(a.generation)?);
        }
        let high = generation_to_db(high)?;

        let mut tx = self.begin_write().await?;
        delete_in_on(&mut tx, "assignments", "deployment_id", clear).await?;
        let set: Vec<_> = set.iter().zip(checked).collect();
        upsert_assignments_on(&mut tx, &set).await?;
        sqlx::query(BUMP_COUNTER)
            .bind(high)
            .bind(GENERATION_COUNTER)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        finish(tx, events).await
    }

    // === nodes ===

    /// Inserts or updates a node registration. On update `first_seen_ms` keeps its stored
    /// value; groups, capacities and `last_seen_ms` are replaced.
    pub async fn upsert_node(&self, n: &NodeRecord, events: &[Event]) -> Result<(), StoreError> {
        let groups = serde_json::to_string(&n.groups).map_err(StoreError::Json)?;
        let capacities = serde_json::to_string(&n.capacities_total).map_err(StoreError::Json)?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO nodes (node_id, groups_json, capacities_total, first_seen_ms, \
             last_seen_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id) DO UPDATE SET \
             groups_json = excluded.groups_json, capacities_total = excluded.capacities_total, \
             last_seen_ms = excluded.last_seen_ms",
        )
        .bind(&n.node_id)
        .bind(groups)
        .bind(capacities)
        .bind(n.first_seen_ms)
        .bind(n.last_seen_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish(tx, events).await
    }

    /// Removes a node registration; [`StoreError::NotFound`] if absent. Its assignments are
    /// left alone (rescheduling them is the core's decision).
    pub async fn delete_node(&self, node_id: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM nodes WHERE node_id = $1")
            .bind(node_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        found(done.rows_affected())
    }

    /// All registered nodes, ordered by node id.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(SELECT_NODES)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(node_from_row).collect()
    }

    // === events ===

    /// Writes observed events (see [`super::events`]) in one transaction.
    pub async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let tx = self.begin_write().await?;
        finish(tx, events).await
    }

    /// Events matching `f`, oldest first: the first `limit` after `f.after`, or without
    /// `after` the newest `limit`.
    pub async fn list_events(&self, f: &Filter) -> Result<Vec<Event>, StoreError> {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT id, at_ms, kind, object, message, fields FROM events WHERE id > ",
        );
        q.push_bind(i64::try_from(f.after.unwrap_or(0)).unwrap_or(i64::MAX));
        // A family (no separator) is a range, so it uses the index and needs no LIKE escaping:
        // `node/` <= object < `node0` ('0' follows '/'), `deployment.` <= kind < `deployment/`.
        for (column, value, sep, next) in
            [("object", &f.object, "/", "0"), ("kind", &f.kind, ".", "/")]
        {
            match value {
                None => {}
                Some(v) if v.contains(sep) => {
                    q.push(format!(" AND {column} = ")).push_bind(v.clone());
                }
                Some(v) => {
                    q.push(format!(" AND {column} >= "))
                        .push_bind(format!("{v}{sep}"))
                        .push(format!(" AND {column} < "))
                        .push_bind(format!("{v}{next}"));
                }
            }
        }
        let newest = f.after.is_none();
        q.push(if newest {
            " ORDER BY id DESC LIMIT "
        } else {
            " ORDER BY id ASC LIMIT "
        })
        .push_bind(i64::from(f.limit.min(super::events::MAX_LIMIT)));
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_err)?;
        let mut out = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    /// The id of the oldest event kept, if any.
    pub async fn oldest_event_id(&self) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query("SELECT MIN(id) AS id FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let id = row.try_get::<Option<i64>, _>("id").map_err(db_err)?;
        Ok(id.and_then(|i| u64::try_from(i).ok()))
    }

    /// Keeps the newest `keep` events and none at or before `before_ms`; the number dropped.
    /// The id counter stays where it is.
    pub async fn prune_events(&self, keep: u64, before_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let high = event_high_water_on(&mut tx).await?;
        // The counter keeps the newest id before rows go (writes do not touch it: the high
        // water is the larger of it and the newest row).
        sqlx::query(BUMP_COUNTER)
            .bind(event_id_to_db(high)?)
            .bind(EVENT_COUNTER)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let below = i64::try_from(high.saturating_sub(keep)).unwrap_or(i64::MAX);
        let by_count = sqlx::query("DELETE FROM events WHERE id <= $1")
            .bind(below)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let by_age = sqlx::query("DELETE FROM events WHERE at_ms <= $1")
            .bind(before_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(by_count.rows_affected() + by_age.rows_affected())
    }

    // === whole state ===

    /// Reads everything in one transaction, so the parts are mutually consistent.
    pub async fn load_all(&self) -> Result<StoreSnapshot, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let deployments = sqlx::query(SELECT_DEPLOYMENTS)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let conda_envs = sqlx::query(SELECT_CONDA_ENVS)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let assignments = sqlx::query(SELECT_ASSIGNMENTS)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let nodes = sqlx::query(SELECT_NODES)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let generation = sqlx::query(SELECT_COUNTER)
            .bind(GENERATION_COUNTER)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        let services = sqlx::query(SELECT_SERVICES)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let experiments = experiments_on(&mut tx, &self.key).await?;
        let event_high_water = event_high_water_on(&mut tx).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(StoreSnapshot {
            deployments: deployments
                .iter()
                .map(|r| deployment_from_row(r, &self.key))
                .collect::<Result<_, _>>()?,
            conda_envs: conda_envs
                .iter()
                .map(env_from_row)
                .collect::<Result<_, _>>()?,
            assignments: assignments
                .iter()
                .map(assignment_from_row)
                .collect::<Result<_, _>>()?,
            nodes: nodes.iter().map(node_from_row).collect::<Result<_, _>>()?,
            max_generation: generation_from_row(&generation)?,
            services: services
                .iter()
                .map(service_from_row)
                .collect::<Result<_, _>>()?,
            experiments,
            event_high_water,
        })
    }
}

// === helpers ===

/// Writes `events` in `tx`, then commits.
async fn finish(
    mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    events: &[Event],
) -> Result<(), StoreError> {
    // One statement per chunk, not per event: each statement is a round trip to the
    // connection's thread. 6 values a row stays far below SQLite's 32 766 variables.
    for chunk in events.chunks(EVENTS_PER_INSERT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for e in chunk {
            let fields = serde_json::to_string(&e.fields).map_err(StoreError::Json)?;
            rows.push((event_id_to_db(e.id)?, e, fields));
        }
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO events (id, at_ms, kind, object, message, fields) ",
        );
        q.push_values(rows, |mut b, (id, e, fields)| {
            b.push_bind(id)
                .push_bind(e.at_ms)
                .push_bind(&e.kind)
                .push_bind(&e.object)
                .push_bind(&e.message)
                .push_bind(fields);
        });
        q.build().execute(&mut *tx).await.map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}

/// Events written by one INSERT.
const EVENTS_PER_INSERT: usize = ROWS_PER_STATEMENT;

/// Rows one multi-row statement takes (at most 7 values a row: far below SQLite's 32 766
/// variables). A statement is a round trip to the connection's thread, so a batch of changes
/// is a few statements, not one per row. Each row count is a statement of its own, kept
/// prepared by the writer: few enough shapes that [`WRITER_STATEMENTS`] holds them all.
const ROWS_PER_STATEMENT: usize = 64;

/// Prepared statements the writer keeps: every row count of its (about ten) multi-row
/// statements, and the fixed ones.
const WRITER_STATEMENTS: usize = 1024;

/// `wal_autocheckpoint`: log pages between checkpoints.
const WAL_CHECKPOINT_PAGES: u32 = 4096;

/// `DELETE FROM {table} WHERE {column} IN (ids)`, a chunk of ids a statement; returns how many
/// rows went.
async fn delete_in_on(
    conn: &mut sqlx::SqliteConnection,
    table: &str,
    column: &str,
    ids: &[String],
) -> Result<u64, StoreError> {
    let mut gone = 0;
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "DELETE FROM {table} WHERE {column} IN ("
        ));
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(id);
        }
        list.push_unseparated(")");
        gone += q
            .build()
            .execute(&mut *conn)
            .await
            .map_err(db_err)?
            .rows_affected();
    }
    Ok(gone)
}

fn event_id_to_db(id: u64) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::Invalid {
        field: "events.id",
        value: id.to_string(),
    })
}

async fn event_high_water_on(conn: &mut sqlx::SqliteConnection) -> Result<u64, StoreError> {
    let row = sqlx::query(SELECT_COUNTER)
        .bind(EVENT_COUNTER)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    let counter = int(&row, "value")?;
    let row = sqlx::query("SELECT MAX(id) AS id FROM events")
        .fetch_one(conn)
        .await
        .map_err(db_err)?;
    let newest = row.try_get::<Option<i64>, _>("id").map_err(db_err)?;
    Ok(u64::try_from(counter.max(newest.unwrap_or(0))).unwrap_or(0))
}

fn event_from_row(row: &SqliteRow) -> Result<Event, StoreError> {
    Ok(Event {
        id: u64::try_from(int(row, "id")?).unwrap_or(0),
        at_ms: int(row, "at_ms")?,
        kind: text(row, "kind")?,
        object: text(row, "object")?,
        message: text(row, "message")?,
        fields: json(row, "fields")?,
    })
}

/// Sets assignments, a chunk a statement (a later row for the same deployment wins, as one
/// at a time would).
async fn upsert_assignments_on(
    conn: &mut sqlx::SqliteConnection,
    set: &[(&AssignmentRecord, i64)],
) -> Result<(), StoreError> {
    for chunk in set.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO assignments (deployment_id, node_id, generation) ",
        );
        q.push_values(chunk, |mut b, (a, generation)| {
            b.push_bind(&a.deployment_id)
                .push_bind(&a.node_id)
                .push_bind(*generation);
        });
        q.push(
            " ON CONFLICT (deployment_id) DO UPDATE SET node_id = excluded.node_id, \
             generation = excluded.generation",
        );
        q.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

/// Sets one assignment and raises the generation counter to its generation.
async fn set_assignment_on(
    conn: &mut sqlx::SqliteConnection,
    a: &AssignmentRecord,
) -> Result<(), StoreError> {
    let generation = generation_to_db(a.generation)?;
    upsert_assignments_on(&mut *conn, &[(a, generation)]).await?;
    sqlx::query(BUMP_COUNTER)
        .bind(generation)
        .bind(GENERATION_COUNTER)
        .execute(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// [`insert_deployment_on`] for many, a chunk a statement.
async fn insert_deployments_on(
    conn: &mut sqlx::SqliteConnection,
    all: &[DeploymentRecord],
    key: &SealKey,
) -> Result<(), StoreError> {
    for chunk in all.chunks(ROWS_PER_STATEMENT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for d in chunk {
            check_deployment(d)?;
            rows.push((d, Secrets::Specification.sealed(key, &d.specification)?));
        }
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO deployments (id, name, desired_state, kind, specification, \
             created_at_ms, updated_at_ms) ",
        );
        q.push_values(rows, |mut b, (d, spec)| {
            b.push_bind(&d.id)
                .push_bind(&d.name)
                .push_bind(d.desired_state.as_str())
                .push_bind(&d.kind)
                .push_bind(spec)
                .push_bind(d.created_at_ms)
                .push_bind(d.updated_at_ms);
        });
        q.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

async fn insert_deployment_on(
    conn: &mut sqlx::SqliteConnection,
    d: &DeploymentRecord,
    key: &SealKey,
) -> Result<(), StoreError> {
    insert_deployments_on(conn, std::slice::from_ref(d), key).await
}

async fn insert_service_on(
    conn: &mut sqlx::SqliteConnection,
    deployment_id: &str,
    s: &Service,
) -> Result<(), StoreError> {
    sqlx::query(INSERT_SERVICE)
        .bind(&s.namespace)
        .bind(&s.name)
        .bind(deployment_id)
        .bind(i64::from(s.port))
        .bind(i64::from(s.exposed))
        .execute(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Replaces the services `deployment_id` binds.
async fn replace_services_on(
    conn: &mut sqlx::SqliteConnection,
    deployment_id: &str,
    services: &[Service],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM services WHERE deployment_id = $1")
        .bind(deployment_id)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    for s in services {
        insert_service_on(&mut *conn, deployment_id, s).await?;
    }
    Ok(())
}

/// Deletes an experiment's deployments (the rest cascades) and the experiment; the number of
/// experiment rows deleted.
async fn delete_experiment_on(
    conn: &mut sqlx::SqliteConnection,
    name: &str,
) -> Result<u64, StoreError> {
    sqlx::query(
        "DELETE FROM deployments WHERE id IN \
         (SELECT deployment_id FROM experiment_processes WHERE experiment = $1)",
    )
    .bind(name)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    let done = sqlx::query("DELETE FROM experiments WHERE name = $1")
        .bind(name)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(done.rows_affected())
}

async fn experiments_on(
    conn: &mut sqlx::SqliteConnection,
    key: &SealKey,
) -> Result<Vec<ExperimentRecord>, StoreError> {
    let rows = sqlx::query(SELECT_EXPERIMENTS)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let placement = text(row, "placement")?;
        let name = text(row, "name")?;
        let mut declaration = json(row, "declaration")?;
        Secrets::Declaration.open(key, &mut declaration, &format!("experiment/{name}"));
        out.push(ExperimentRecord {
            name,
            declaration,
            placement: Placement::from_name(&placement).ok_or(StoreError::Invalid {
                field: "experiments.placement",
                value: placement,
            })?,
            created_at_ms: int(row, "created_at_ms")?,
            failed_reason: row
                .try_get::<Option<String>, _>("failed_reason")
                .map_err(db_err)?,
            processes: Vec::new(),
        });
    }
    let rows = sqlx::query(SELECT_PROCESSES)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    for row in &rows {
        let experiment = text(row, "experiment")?;
        let on_failure = text(row, "on_failure")?;
        let p = ProcessRecord {
            name: text(row, "process")?,
            group: row
                .try_get::<Option<String>, _>("process_group")
                .map_err(db_err)?,
            on_failure: OnFailure::from_name(&on_failure).ok_or(StoreError::Invalid {
                field: "experiment_processes.on_failure",
                value: on_failure,
            })?,
            deployment_id: text(row, "deployment_id")?,
        };
        if let Some(e) = out.iter_mut().find(|e| e.name == experiment) {
            e.processes.push(p);
        }
    }
    Ok(out)
}

/// Maps a sqlx error, turning key violations into the store's meaning: a duplicate key is
/// [`StoreError::Conflict`], a missing referenced row (foreign key) is [`StoreError::NotFound`].
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    if let Some(db) = e.as_database_error() {
        if db.is_unique_violation() {
            return StoreError::Conflict;
        }
        if db.is_foreign_key_violation() {
            return StoreError::NotFound;
        }
        // SQLite's primary result code is the low byte of the (extended) code.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        let unwritable = |cause| StoreError::Unwritable {
            cause,
            path: String::new(),
        };
        match primary {
            Some(13) => return unwritable(Unwritable::Full),
            Some(8) => return unwritable(Unwritable::ReadOnly),
            // An I/O error, or a file it cannot open (its WAL on a full or read-only disk).
            Some(10 | 14) => return unwritable(Unwritable::Io),
            Some(5 | 6) => {
                return StoreError::Busy {
                    path: String::new(),
                };
            }
            _ => {}
        }
    }
    StoreError::Db(e)
}

/// [`delete_deployment_on`] for many, a chunk a statement per table; returns how many
/// deployments went.
async fn delete_deployments_on(
    conn: &mut sqlx::SqliteConnection,
    ids: &[String],
) -> Result<u64, StoreError> {
    delete_in_on(&mut *conn, "assignments", "deployment_id", ids).await?;
    delete_in_on(&mut *conn, "services", "deployment_id", ids).await?;
    delete_in_on(conn, "deployments", "id", ids).await
}

/// Deletes a deployment and what refers to it (its assignment, the services it binds) in
/// one transaction's connection; returns how many deployments went (0 or 1).
async fn delete_deployment_on(
    conn: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<u64, StoreError> {
    delete_deployments_on(conn, &[id.to_owned()]).await
}

fn found(rows_affected: u64) -> Result<(), StoreError> {
    if rows_affected == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

fn check_one_of(field: &'static str, value: &str, allowed: &[&str]) -> Result<(), StoreError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            field,
            value: value.to_owned(),
        })
    }
}

fn check_deployment(d: &DeploymentRecord) -> Result<(), StoreError> {
    check_one_of("kind", &d.kind, &DEPLOYMENT_KINDS)
}

fn check_env(e: &CondaEnvRecord) -> Result<(), StoreError> {
    check_one_of("manager", &e.manager, &ENV_MANAGERS)
}

fn generation_to_db(generation: Generation) -> Result<i64, StoreError> {
    i64::try_from(generation.get()).map_err(|_| StoreError::Invalid {
        field: "generation",
        value: generation.to_string(),
    })
}

fn generation_from_db(generation: i64) -> Result<Generation, StoreError> {
    u64::try_from(generation)
        .map(Generation)
        .map_err(|_| StoreError::Invalid {
            field: "generation",
            value: generation.to_string(),
        })
}

fn desired_state(name: &str) -> Result<DesiredState, StoreError> {
    DesiredState::from_name(name).ok_or_else(|| StoreError::Invalid {
        field: "desired_state",
        value: name.to_owned(),
    })
}

fn text(row: &SqliteRow, column: &'static str) -> Result<String, StoreError> {
    row.try_get::<String, _>(column).map_err(db_err)
}

fn int(row: &SqliteRow, column: &'static str) -> Result<i64, StoreError> {
    row.try_get::<i64, _>(column).map_err(db_err)
}

fn json<T: serde::de::DeserializeOwned>(
    row: &SqliteRow,
    column: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(&text(row, column)?).map_err(StoreError::Json)
}

/// Where a JSON column keeps git tokens.
#[derive(Debug, Clone, Copy)]
enum Secrets {
    /// A deployment's `specification`: `spec.config.token`.
    Specification,
    /// An experiment's `declaration`: `processes[i].config.token`.
    Declaration,
}

impl Secrets {
    /// Calls `f` on every token slot of `value`.
    fn each<E>(
        self,
        value: &mut serde_json::Value,
        f: impl FnMut(&mut serde_json::Value) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Self::Specification => token_slot(value).into_iter().try_for_each(f),
            Self::Declaration => declaration_token_slots(value).try_for_each(f),
        }
    }

    /// `value` as stored: compact JSON, its tokens sealed.
    fn sealed(self, key: &SealKey, value: &serde_json::Value) -> Result<String, StoreError> {
        // A spec without a token in clear (nearly every one) is written as it is, not copied.
        if matches!(self, Self::Specification)
            && value
                .pointer("/spec/config/token")
                .and_then(serde_json::Value::as_str)
                .is_none_or(crate::seal::is_sealed)
        {
            return serde_json::to_string(value).map_err(StoreError::Json);
        }
        let mut value = value.clone();
        self.each(&mut value, |t| key.seal_value(t))
            .map_err(StoreError::Seal)?;
        serde_json::to_string(&value).map_err(StoreError::Json)
    }

    /// Opens the tokens of `value` (read from the store) in place; one that does not open
    /// stays sealed, with a warning naming `object` and the key.
    fn open(self, key: &SealKey, value: &mut serde_json::Value, object: &str) {
        let _ = self.each(value, |t| {
            if let Err(e) = key.open_value(t) {
                tracing::warn!(%object, error = %e, "a stored git token does not open; it stays sealed (a deployment with it fails until its token is sent again)");
            }
            Ok::<(), ()>(())
        });
    }

    /// Whether any token of `value` is a plaintext string.
    fn any_in_clear(self, value: &mut serde_json::Value) -> bool {
        self.each(value, |t| match t.as_str() {
            Some(s) if !crate::seal::is_sealed(s) => Err(()),
            _ => Ok(()),
        })
        .is_err()
    }
}

fn deployment_from_row(row: &SqliteRow, key: &SealKey) -> Result<DeploymentRecord, StoreError> {
    let id = text(row, "id")?;
    let mut specification = json(row, "specification")?;
    Secrets::Specification.open(key, &mut specification, &format!("deployment/{id}"));
    Ok(DeploymentRecord {
        id,
        name: text(row, "name")?,
        desired_state: desired_state(&text(row, "desired_state")?)?,
        kind: text(row, "kind")?,
        specification,
        created_at_ms: int(row, "created_at_ms")?,
        updated_at_ms: int(row, "updated_at_ms")?,
    })
}

fn env_from_row(row: &SqliteRow) -> Result<CondaEnvRecord, StoreError> {
    Ok(CondaEnvRecord {
        name: text(row, "name")?,
        python_version: text(row, "python_version")?,
        packages: json(row, "packages")?,
        custom_script: row
            .try_get::<Option<String>, _>("custom_script")
            .map_err(db_err)?,
        manager: text(row, "manager")?,
        created_at_ms: int(row, "created_at_ms")?,
        updated_at_ms: int(row, "updated_at_ms")?,
    })
}

fn assignment_from_row(row: &SqliteRow) -> Result<AssignmentRecord, StoreError> {
    Ok(AssignmentRecord {
        deployment_id: text(row, "deployment_id")?,
        node_id: text(row, "node_id")?,
        generation: generation_from_db(int(row, "generation")?)?,
    })
}

fn service_from_row(row: &SqliteRow) -> Result<Service, StoreError> {
    let port = int(row, "port")?;
    Ok(Service {
        namespace: text(row, "namespace")?,
        name: text(row, "name")?,
        deployment_id: text(row, "deployment_id")?,
        port: u16::try_from(port).map_err(|_| StoreError::Invalid {
            field: "services.port",
            value: port.to_string(),
        })?,
        exposed: int(row, "exposed")? != 0,
    })
}

fn node_from_row(row: &SqliteRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        node_id: text(row, "node_id")?,
        groups: json(row, "groups_json")?,
        capacities_total: json(row, "capacities_total")?,
        first_seen_ms: int(row, "first_seen_ms")?,
        last_seen_ms: int(row, "last_seen_ms")?,
    })
}

fn generation_from_row(row: &SqliteRow) -> Result<Generation, StoreError> {
    generation_from_db(int(row, "value")?)
}

#[cfg(test)]
mod tests;
