//! Join tokens, API tokens and node trust records (secrets only as hashes).

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::{Store, StoreError, db_err, finish, found, int, json, text};
use crate::conductor::events::Event;
use crate::conductor::trust::{ApiTokenRecord, JoinTokenRecord, NodeTrust, Role};

const SELECT_JOIN: &str = "SELECT id, secret_hash, groups_json, node_id_prefix, max_uses, uses, \
     expires_at_ms, created_at_ms, revoked_at_ms FROM join_tokens";
const SELECT_API: &str =
    "SELECT id, name, role, secret_hash, created_at_ms, revoked_at_ms FROM api_tokens";
const SELECT_TRUST: &str = "SELECT node_id, token_id, groups_json, not_after_ms, enrolled_at_ms, \
     renewed_at_ms, revoked_at_ms, revoke_reason FROM node_trust";

impl Store {
    /// Stores a new join token.
    pub async fn insert_join_token(
        &self,
        t: &JoinTokenRecord,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let groups = serde_json::to_string(&t.groups).map_err(StoreError::Json)?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, groups_json, node_id_prefix, max_uses, \
             uses, expires_at_ms, created_at_ms, revoked_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(groups)
        .bind(&t.node_id_prefix)
        .bind(t.max_uses)
        .bind(t.uses)
        .bind(t.expires_at_ms)
        .bind(t.created_at_ms)
        .bind(t.revoked_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish(tx, events).await
    }

    /// One join token.
    pub async fn get_join_token(&self, id: &str) -> Result<JoinTokenRecord, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_JOIN} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound)?;
        join_from_row(&row)
    }

    /// Every join token, newest first.
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_JOIN} ORDER BY created_at_ms DESC, id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(join_from_row)
        .collect()
    }

    /// Marks a join token revoked; [`StoreError::NotFound`] if there is none.
    pub async fn revoke_join_token(
        &self,
        id: &str,
        at_ms: i64,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE join_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $1) WHERE id = $2",
        )
        .bind(at_ms)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        found(done.rows_affected())?;
        finish(tx, events).await
    }

    /// Records a node's enrollment with join token `token_id`, counting one use; refused with
    /// [`StoreError::Conflict`] if the token was used up meanwhile or the node id is taken.
    pub async fn record_enrollment(
        &self,
        token_id: &str,
        n: &NodeTrust,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let used = sqlx::query(
            "UPDATE join_tokens SET uses = uses + 1 WHERE id = $1 AND revoked_at_ms IS NULL \
             AND (max_uses IS NULL OR uses < max_uses)",
        )
        .bind(token_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if used.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        sqlx::query("DELETE FROM node_trust WHERE node_id = $1")
            .bind(&n.node_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_trust(&mut tx, n).await?;
        finish(tx, events).await
    }

    /// Writes a node's trust record (a renewal, a revocation), replacing the old one.
    pub async fn put_node_trust(&self, n: &NodeTrust, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM node_trust WHERE node_id = $1")
            .bind(&n.node_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_trust(&mut tx, n).await?;
        finish(tx, events).await
    }

    /// Every node's trust record.
    pub async fn list_node_trust(&self) -> Result<Vec<NodeTrust>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_TRUST} ORDER BY node_id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(trust_from_row)
        .collect()
    }

    /// Stores a new API token; [`StoreError::Conflict`] if the name is taken.
    pub async fn insert_api_token(
        &self,
        t: &ApiTokenRecord,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_hash, created_at_ms, revoked_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(t.role.name())
        .bind(&t.secret_hash)
        .bind(t.created_at_ms)
        .bind(t.revoked_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish(tx, events).await
    }

    /// One API token.
    pub async fn get_api_token(&self, id: &str) -> Result<ApiTokenRecord, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_API} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound)?;
        api_from_row(&row)
    }

    /// Every API token, by name.
    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_API} ORDER BY name")))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(api_from_row)
            .collect()
    }

    /// Whether any API token that is not revoked exists.
    pub async fn has_api_tokens(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE revoked_at_ms IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(int(&row, "n")? > 0)
    }

    /// Marks an API token revoked; [`StoreError::NotFound`] if there is none.
    pub async fn revoke_api_token(
        &self,
        id: &str,
        at_ms: i64,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $1) WHERE id = $2",
        )
        .bind(at_ms)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        found(done.rows_affected())?;
        finish(tx, events).await
    }
}

async fn insert_trust(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    n: &NodeTrust,
) -> Result<(), StoreError> {
    let groups = n
        .groups
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(StoreError::Json)?;
    sqlx::query(
        "INSERT INTO node_trust (node_id, token_id, groups_json, not_after_ms, enrolled_at_ms, \
         renewed_at_ms, revoked_at_ms, revoke_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&n.node_id)
    .bind(&n.token_id)
    .bind(groups)
    .bind(n.not_after_ms)
    .bind(n.enrolled_at_ms)
    .bind(n.renewed_at_ms)
    .bind(n.revoked_at_ms)
    .bind(&n.revoke_reason)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

fn opt_int(row: &SqliteRow, column: &'static str) -> Result<Option<i64>, StoreError> {
    row.try_get::<Option<i64>, _>(column).map_err(db_err)
}

fn opt_text(row: &SqliteRow, column: &'static str) -> Result<Option<String>, StoreError> {
    row.try_get::<Option<String>, _>(column).map_err(db_err)
}

fn join_from_row(row: &SqliteRow) -> Result<JoinTokenRecord, StoreError> {
    Ok(JoinTokenRecord {
        id: text(row, "id")?,
        secret_hash: text(row, "secret_hash")?,
        groups: json(row, "groups_json")?,
        node_id_prefix: text(row, "node_id_prefix")?,
        max_uses: opt_int(row, "max_uses")?,
        uses: int(row, "uses")?,
        expires_at_ms: int(row, "expires_at_ms")?,
        created_at_ms: int(row, "created_at_ms")?,
        revoked_at_ms: opt_int(row, "revoked_at_ms")?,
    })
}

fn api_from_row(row: &SqliteRow) -> Result<ApiTokenRecord, StoreError> {
    let role = text(row, "role")?;
    Ok(ApiTokenRecord {
        id: text(row, "id")?,
        name: text(row, "name")?,
        role: Role::from_name(&role).ok_or(StoreError::Invalid {
            field: "role",
            value: role,
        })?,
        secret_hash: text(row, "secret_hash")?,
        created_at_ms: int(row, "created_at_ms")?,
        revoked_at_ms: opt_int(row, "revoked_at_ms")?,
    })
}

fn trust_from_row(row: &SqliteRow) -> Result<NodeTrust, StoreError> {
    let groups = opt_text(row, "groups_json")?
        .map(|g| serde_json::from_str(&g))
        .transpose()
        .map_err(StoreError::Json)?;
    Ok(NodeTrust {
        node_id: text(row, "node_id")?,
        token_id: opt_text(row, "token_id")?,
        groups,
        not_after_ms: opt_int(row, "not_after_ms")?,
        enrolled_at_ms: int(row, "enrolled_at_ms")?,
        renewed_at_ms: opt_int(row, "renewed_at_ms")?,
        revoked_at_ms: opt_int(row, "revoked_at_ms")?,
        revoke_reason: opt_text(row, "revoke_reason")?,
    })
}
