//! Trust routes: join tokens, API tokens, node revocation, and the browser's login.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, ApiState, JsonObject, PathParam};
use crate::conductor::auth::{COOKIE, Principal};
use crate::conductor::core::{CoreMsg, TrustMsg};
use crate::conductor::trust::Role;

/// Longest join token lifetime accepted (a year).
const MAX_TTL_SEC: u64 = 365 * 24 * 3600;

/// Fields of a body that are not in `known`: each a 422 (a typo must not be ignored when it
/// would widen a token).
fn unknown_fields(m: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::field(
            &["body", k],
            "extra_forbidden",
            "Extra inputs are not permitted",
        )),
        None => Ok(()),
    }
}

fn opt_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::field(
            &["body", key],
            "string_type",
            "Input should be a valid string",
        )),
    }
}

fn opt_u64(m: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        // JSON Schema's integers include `3.0`.
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < 9.0e15)
                    .map(|f| f as u64)
            })
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| {
                ApiError::field(
                    &["body", key],
                    "greater_than",
                    "Input should be a positive integer",
                )
            }),
    }
}

/// `POST /tokens`: `{groups?, ttl_sec? (3600), uses?, node_id_prefix? ("node-")}`.
pub(super) async fn create_join_token(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    unknown_fields(&m, &["groups", "ttl_sec", "uses", "node_id_prefix"])?;
    let groups = match m.get("groups") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|g| {
                g.as_str()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().to_owned())
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::field(
                    &["body", "groups"],
                    "list_type",
                    "Input should be a list of non-empty strings",
                )
            })?,
        Some(_) => {
            return Err(ApiError::field(
                &["body", "groups"],
                "list_type",
                "Input should be a list of non-empty strings",
            ));
        }
    };
    let ttl = opt_u64(&m, "ttl_sec")?.unwrap_or(3600);
    if ttl > MAX_TTL_SEC {
        return Err(ApiError::field(
            &["body", "ttl_sec"],
            "less_than_equal",
            &format!("Input should be at most {MAX_TTL_SEC}"),
        ));
    }
    let uses = opt_u64(&m, "uses")?.map(|u| i64::try_from(u).unwrap_or(i64::MAX));
    let prefix = opt_str(&m, "node_id_prefix")?.unwrap_or_else(|| "node-".into());
    if prefix.len() > 100
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(ApiError::field(
            &["body", "node_id_prefix"],
            "value_error",
            "use at most 100 letters, digits, '.', '_' and '-'",
        ));
    }
    let (rec, token) = st
        .core
        .call(|reply| {
            CoreMsg::Trust(TrustMsg::CreateJoinToken {
                groups,
                ttl: Duration::from_secs(ttl),
                uses,
                node_id_prefix: prefix,
                reply,
            })
        })
        .await?;
    let mut out = json!(rec);
    out["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `GET /tokens`: join tokens, never their secrets.
pub(super) async fn list_join_tokens(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let all = st
        .core
        .store()
        .list_join_tokens()
        .await
        .map_err(|e| ApiError::from(crate::conductor::core::CoreError::Store(e)))?;
    Ok(Json(json!(all)))
}

/// `DELETE /tokens/{id}`: revokes a join token (nodes that joined with it stay).
pub(super) async fn revoke_join_token(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<StatusCode, ApiError> {
    st.core
        .call(|r| CoreMsg::Trust(TrustMsg::RevokeJoinToken(id, r)))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api-tokens`: `{name, role}`; the token text is in the reply, once.
pub(super) async fn create_api_token(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    unknown_fields(&m, &["name", "role"])?;
    let name = opt_str(&m, "name")?
        .filter(|n| !n.trim().is_empty() && n.len() <= 100)
        .ok_or_else(|| {
            ApiError::field(
                &["body", "name"],
                "missing",
                "a name of 1-100 characters is required",
            )
        })?;
    let role = opt_str(&m, "role")?
        .and_then(|r| Role::from_name(&r))
        .ok_or_else(|| {
            ApiError::field(
                &["body", "role"],
                "enum",
                "Input should be 'admin', 'operator' or 'viewer'",
            )
        })?;
    let (rec, token) = st
        .core
        .call(|reply| CoreMsg::Trust(TrustMsg::CreateApiToken { name, role, reply }))
        .await?;
    st.auth.forget(&rec.id);
    let mut out = json!(rec);
    out["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `GET /api-tokens`: names, roles and ids, never secrets.
pub(super) async fn list_api_tokens(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let all = st
        .core
        .store()
        .list_api_tokens()
        .await
        .map_err(|e| ApiError::from(crate::conductor::core::CoreError::Store(e)))?;
    Ok(Json(json!(all)))
}

/// `DELETE /api-tokens/{id}`: revoked at once.
pub(super) async fn revoke_api_token(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<StatusCode, ApiError> {
    st.core
        .call(|r| CoreMsg::Trust(TrustMsg::RevokeApiToken(id.clone(), r)))
        .await?;
    st.auth.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /nodes/{id}/revoke`: `{reason?}`.
pub(super) async fn revoke_node(
    State(st): State<ApiState>,
    PathParam(node_id): PathParam,
    JsonObject(m): JsonObject,
) -> Result<StatusCode, ApiError> {
    unknown_fields(&m, &["reason", "revoke_token"])?;
    let reason = opt_str(&m, "reason")?.unwrap_or_else(|| "revoked by an operator".into());
    let revoke_token = match m.get("revoke_token") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::field(
                &["body", "revoke_token"],
                "bool_type",
                "Input should be a valid boolean",
            ));
        }
    };
    st.core
        .call(|reply| {
            CoreMsg::Trust(TrustMsg::RevokeNode {
                node_id,
                reason,
                revoke_token,
                reply,
            })
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /auth/login`: `{token}`; a valid token is set as an HttpOnly, SameSite=Strict cookie
/// (the web UI's way in).
pub(super) async fn login(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    unknown_fields(&m, &["token"])?;
    let token = opt_str(&m, "token")?
        .ok_or_else(|| ApiError::field(&["body", "token"], "missing", "Field required"))?;
    let p = st
        .auth
        .check(&token)
        .await
        .map_err(|why| ApiError::detail(StatusCode::UNAUTHORIZED, why))?;
    let secure = if st.auth.https() { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    let mut r = Json(json!({"name": p.name, "role": p.role})).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// `POST /auth/logout`: clears the cookie.
pub(super) async fn logout() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("symphony_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// `GET /auth/whoami`: the caller's name and role, and whether tokens are required (the UI
/// hides what the role may not do).
pub(super) async fn whoami(
    State(st): State<ApiState>,
    p: Option<axum::Extension<Principal>>,
) -> Json<Value> {
    let (name, role) = p.map_or(("local".to_owned(), Role::Admin), |axum::Extension(p)| {
        (p.name, p.role)
    });
    Json(json!({"name": name, "role": role, "auth_required": st.auth.required()}))
}
