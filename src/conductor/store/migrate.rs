//! Embedded schema migrations for the conductor store.
//!
//! Migrations are plain, portable SQL (it also runs on PostgreSQL): `TEXT`, `BIGINT`, JSON kept
//! as `TEXT`, `CHECK` constraints on enum columns and no SQLite-only functions. Each migration
//! is a numbered list of single statements. The table `schema_version` holds one row per
//! applied migration. Invariants:
//!
//! - applying is idempotent: a migration whose version row exists is never run again;
//! - all pending migrations and their version rows are written in one transaction, so a crash
//!   leaves the schema either wholly before or wholly after;
//! - a database that records a version newer than this binary knows is refused
//!   ([`StoreError::SchemaTooNew`]) rather than silently used.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{StoreError, db_err};
use crate::time::now_ms;

/// Name of the counter row (in `counters`) holding the generation high-water mark.
pub(super) const GENERATION_COUNTER: &str = "generation_high_water";
/// Name of the counter row holding the highest event id ever written.
pub(super) const EVENT_COUNTER: &str = "event_high_water";

/// One schema step: its version and the statements that produce it.
struct Migration {
    version: i64,
    statements: &'static [&'static str],
}

/// Creates the version table itself; runs before anything else and is harmless to repeat.
const CREATE_SCHEMA_VERSION: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT PRIMARY KEY,
    applied_at_ms BIGINT NOT NULL
)";

/// All migrations, in ascending version order.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        statements: &[
            "CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            desired_state TEXT NOT NULL CHECK (desired_state IN ('RUNNING', 'STOPPED')),
            kind TEXT NOT NULL CHECK (kind IN ('EXEC', 'DOCKER')),
            specification TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL
        )",
            "CREATE INDEX deployments_name_idx ON deployments (name)",
            "CREATE INDEX deployments_created_idx ON deployments (created_at_ms)",
            "CREATE TABLE conda_envs (
            name TEXT PRIMARY KEY,
            python_version TEXT NOT NULL,
            packages TEXT NOT NULL,
            custom_script TEXT,
            manager TEXT NOT NULL CHECK (manager IN ('conda', 'uv')),
            created_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL
        )",
            "CREATE TABLE assignments (
            deployment_id TEXT PRIMARY KEY
                REFERENCES deployments (id) ON DELETE CASCADE,
            node_id TEXT NOT NULL,
            generation BIGINT NOT NULL CHECK (generation >= 0)
        )",
            "CREATE INDEX assignments_node_idx ON assignments (node_id)",
            "CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            groups_json TEXT NOT NULL,
            capacities_total TEXT NOT NULL,
            first_seen_ms BIGINT NOT NULL,
            last_seen_ms BIGINT NOT NULL
        )",
            "CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )",
            "INSERT INTO counters (name, value) VALUES ('generation_high_water', 0)",
        ],
    },
    Migration {
        version: 2,
        statements: &[
            // One row per bound service; a port is unique cluster-wide.
            "CREATE TABLE services (
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
            port BIGINT NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
            exposed BIGINT NOT NULL CHECK (exposed IN (0, 1)),
            PRIMARY KEY (namespace, name)
        )",
            "CREATE INDEX services_deployment_idx ON services (deployment_id)",
        ],
    },
    Migration {
        version: 3,
        statements: &[
            // An experiment: its declaration as launched (the seed's "experiment folder").
            "CREATE TABLE experiments (
            name TEXT PRIMARY KEY,
            declaration TEXT NOT NULL,
            placement TEXT NOT NULL CHECK (placement IN ('spread', 'gang')),
            created_at_ms BIGINT NOT NULL,
            failed_reason TEXT
        )",
            // Its processes: one deployment each, leaving with the deployment or the experiment.
            "CREATE TABLE experiment_processes (
            deployment_id TEXT PRIMARY KEY REFERENCES deployments (id) ON DELETE CASCADE,
            experiment TEXT NOT NULL REFERENCES experiments (name) ON DELETE CASCADE,
            process TEXT NOT NULL,
            process_group TEXT,
            on_failure TEXT NOT NULL CHECK (on_failure IN ('restart', 'stop-experiment')),
            position BIGINT NOT NULL,
            UNIQUE (experiment, process)
        )",
        ],
    },
    Migration {
        version: 4,
        statements: &[
            // The events log. Ids come from the core (see `conductor::events`); pruning raises
            // the counter to the newest id first, so pruning every row never lets one be reused.
            "CREATE TABLE events (
            id BIGINT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            object TEXT NOT NULL,
            message TEXT NOT NULL,
            fields TEXT NOT NULL
        )",
            "CREATE INDEX events_object_idx ON events (object, id)",
            "CREATE INDEX events_kind_idx ON events (kind, id)",
            "CREATE INDEX events_at_idx ON events (at_ms)",
            "INSERT INTO counters (name, value) VALUES ('event_high_water', 0)",
        ],
    },
    Migration {
        version: 5,
        statements: &[
            // Trust. Secrets are never stored, only their SHA-256 (hex).
            "CREATE TABLE join_tokens (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            groups_json TEXT NOT NULL,
            node_id_prefix TEXT NOT NULL,
            max_uses BIGINT,
            uses BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            revoked_at_ms BIGINT
        )",
            "CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
            secret_hash TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            revoked_at_ms BIGINT
        )",
            // What the conductor knows of each node's certificate: the groups its join token
            // allowed (NULL: any, a certificate made with `symphony cert node`), the newest
            // certificate's end, and whether the node is revoked.
            "CREATE TABLE node_trust (
            node_id TEXT PRIMARY KEY,
            token_id TEXT,
            groups_json TEXT,
            not_after_ms BIGINT,
            enrolled_at_ms BIGINT NOT NULL,
            renewed_at_ms BIGINT,
            revoked_at_ms BIGINT,
            revoke_reason TEXT
        )",
        ],
    },
    Migration {
        version: 6,
        statements: &[
            // Workflows: every version of each definition (tokens sealed), and runs as one
            // JSON document each (their tasks, attempts and results).
            "CREATE TABLE workflows (
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            definition TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            PRIMARY KEY (name, version)
        )",
            "CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            seq BIGINT NOT NULL,
            state TEXT NOT NULL,
            doc TEXT NOT NULL,
            updated_at_ms BIGINT NOT NULL
        )",
            "CREATE INDEX runs_workflow_idx ON runs (workflow, seq)",
        ],
    },
];

/// The newest schema version this binary knows.
pub(super) fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Brings the schema up to [`latest_version`]; a no-op when it already is.
///
/// Runs in one write transaction (`BEGIN IMMEDIATE` on SQLite, so two processes opening the
/// same file serialise here instead of failing on a lock upgrade).
pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    sqlx::query(CREATE_SCHEMA_VERSION)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    let rows = sqlx::query("SELECT version FROM schema_version")
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
    let mut applied = BTreeSet::new();
    for row in &rows {
        applied.insert(row.try_get::<i64, _>("version").map_err(db_err)?);
    }
    let supported = latest_version();
    if let Some(&found) = applied.iter().next_back()
        && found > supported
    {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for statement in migration.statements {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, $2)")
            .bind(migration.version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tracing::info!(version = migration.version, "applied store migration");
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}
