//! The HTTP/WebSocket API (axum), with the original's routes and JSON shapes plus our fixes.
//!
//! Reads come from the core's published snapshot and never wait for the core; writes are
//! validated here (422 in FastAPI's `{"detail":[{"loc","msg","type"}]}` shape, naming the
//! field) and then sent to the core, which persists before it replies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;

mod bodies;
mod events;
mod experiments;
mod proxy;
mod trust;
mod updates;
mod workflows;

pub use proxy::TCP_UPGRADE;

use super::core::{CoreError, CoreHandle, CoreMsg, now_ms};
use super::loghub::{LogHub, LogLine};
use super::store::{CondaEnvRecord, DeploymentRecord, StoreError};
use crate::spec::FieldError;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub core: CoreHandle,
    pub logs: LogHub,
    /// Ends long-lived WebSocket tasks at shutdown.
    pub cancel: tokio_util::sync::CancellationToken,
    /// The WebSocket tasks (axum spawns them detached): shutdown waits on this so that every
    /// socket gets its close frame before the process exits.
    pub sockets: TaskTracker,
    /// Connected nodes' sessions, for tunnels to mesh services.
    pub sessions: super::sessions::Registry,
    /// API tokens and roles.
    pub auth: super::auth::Auth,
}

/// The OpenAPI document (roles per operation are read from it, see `auth`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// WebSocket close codes (RFC 6455, section 7.4.1).
pub mod close_code {
    /// The socket's purpose is fulfilled (e.g. the deployment was deleted).
    pub const NORMAL: u16 = 1000;
    /// The server is going away.
    pub const GOING_AWAY: u16 = 1001;
    /// The request breaks the server's policy (unknown deployment, bad query parameter).
    pub const POLICY: u16 = 1008;
}

/// How long a closing socket waits for the peer's close reply.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Largest error body the JSON error layer rewrites (framework rejections are one line).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Largest accepted `specification` (compact JSON): it travels to the node in one frame.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Most packages in one env definition, and the longest package string.
const MAX_PACKAGES: usize = 1000;
const MAX_PACKAGE_LEN: usize = 512;

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/deployments",
            post(create_deployment).get(list_deployments),
        )
        .route(
            "/deployments/{id}",
            get(get_deployment)
                .patch(patch_deployment)
                .delete(delete_deployment),
        )
        .route(
            "/experiments",
            post(experiments::launch).get(experiments::list),
        )
        .route(
            "/experiments/{name}",
            get(experiments::get)
                .patch(experiments::patch)
                .delete(experiments::delete),
        )
        .route("/deployments/{id}/events", get(events::of_deployment))
        .route("/events", get(events::list))
        .route("/nodes", get(list_nodes))
        .route("/nodes/{id}/events", get(events::of_node))
        .route("/nodes/{id}/revoke", post(trust::revoke_node))
        .route(
            "/tokens",
            post(trust::create_join_token).get(trust::list_join_tokens),
        )
        .route(
            "/tokens/{id}",
            axum::routing::delete(trust::revoke_join_token),
        )
        .route(
            "/api-tokens",
            post(trust::create_api_token).get(trust::list_api_tokens),
        )
        .route(
            "/api-tokens/{id}",
            axum::routing::delete(trust::revoke_api_token),
        )
        .route("/auth/login", post(trust::login))
        .route("/auth/logout", post(trust::logout))
        .route("/auth/whoami", get(trust::whoami))
        .route("/services", get(list_services))
        .route("/services/{namespace}/{name}/", any(proxy::http))
        .route("/services/{namespace}/{name}/{*rest}", any(proxy::http))
        .route("/port-forward/{namespace}/{name}", get(proxy::tcp))
        .route("/conda-envs", post(create_env).get(list_envs))
        .route(
            "/conda-envs/{name}",
            get(get_env).patch(patch_env).delete(delete_env),
        )
        .route("/conda-envs/{name}/rerun", post(rerun_env))
        .route("/workflows", post(workflows::define).get(workflows::list))
        .route("/workflows/{name}", get(workflows::get))
        .route("/workflows/{name}/runs", post(workflows::start))
        .route("/runs", get(workflows::runs))
        .route("/runs/{id}", get(workflows::run))
        .route("/runs/{id}/cancel", post(workflows::cancel))
        .route("/runs/{id}/retry", post(workflows::retry))
        .route("/ws/updates", get(updates::ws))
        .route("/ws/deployments/{id}/logs", get(ws_logs))
        .route("/ws/events", get(events::ws))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/ui", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui/", get(ui))
        .route("/ui/{*path}", get(ui))
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::auth::authorize,
        ))
        .fallback(|| async { ApiError::detail(StatusCode::NOT_FOUND, "Not Found") })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Every error leaves in the documented `{"detail": ...}` shape: handlers and the extractors
/// below already answer so; this catches what the framework answers by itself (405 with its
/// `Allow` header, a body over the size limit, ...), keeping status and headers.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let proxied = resp.extensions().get::<proxy::Proxied>().is_some();
    if !(status.is_client_error() || status.is_server_error()) || is_json || proxied {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        text
    };
    let mut out = ApiError::detail(status, &detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// An API error: a status code and FastAPI's `detail`.
#[derive(Debug)]
/// A status, the `detail` of its body, and more fields beside it (the cause and path of a
/// storage error).
pub struct ApiError(StatusCode, Value, Option<serde_json::Map<String, Value>>);

impl ApiError {
    /// `{"detail": msg, ...extra}` with `status`.
    fn with(status: StatusCode, msg: String, extra: Value) -> Self {
        let extra = match extra {
            Value::Object(m) => Some(m),
            _ => None,
        };
        Self(status, json!(msg), extra)
    }

    /// `{"detail": msg}` with `status`.
    fn detail(status: StatusCode, msg: &str) -> Self {
        Self(status, json!(msg), None)
    }

    fn invalid(errors: Vec<FieldError>) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, json!(errors), None)
    }

    fn field(loc: &[&str], kind: &str, msg: &str) -> Self {
        Self::invalid(vec![FieldError {
            loc: loc.iter().map(|s| (*s).to_owned()).collect(),
            msg: msg.to_owned(),
            kind: kind.to_owned(),
        }])
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "detail": self.1 });
        if let (Some(b), Some(extra)) = (body.as_object_mut(), self.2) {
            b.extend(extra);
        }
        (self.0, Json(body)).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound(m) => Self(StatusCode::NOT_FOUND, json!(m), None),
            CoreError::Conflict(m) => Self(StatusCode::CONFLICT, json!(m), None),
            CoreError::Invalid(errors) => Self::invalid(errors),
            CoreError::Unavailable => Self(
                StatusCode::SERVICE_UNAVAILABLE,
                json!("conductor is shutting down"),
                None,
            ),
            CoreError::NoAnswer(after) => Self::with(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the conductor did not answer within {} s (its database may be slow); the change may still be made: read before trying again",
                    after.as_secs()
                ),
                json!({"cause": "no_answer"}),
            ),
            CoreError::Store(StoreError::Unwritable { cause, path }) => Self::with(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "the conductor's database takes no writes: {cause}; writes are refused until it is fixed, reads go on"
                ),
                json!({"cause": cause.code(), "path": path}),
            ),
            CoreError::Store(StoreError::Busy { path }) => Self::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "the conductor's database is locked by another process; try again".to_owned(),
                json!({"cause": "database_locked", "path": path}),
            ),
            CoreError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Self(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!("internal error"),
                    None,
                )
            }
        }
    }
}

/// A path parameter; one that is not valid UTF-8 after percent-decoding is a 422 naming it
/// (axum's own rejection is a plain-text 400).
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(e) => {
                // The parameter's name, from the route template (`/deployments/{id}` -> id).
                let name = parts
                    .extensions
                    .get::<MatchedPath>()
                    .and_then(|m| m.as_str().rsplit_once('{'))
                    .and_then(|(_, rest)| rest.split_once('}'))
                    .map_or("path", |(name, _)| name)
                    .to_owned();
                Err(ApiError::field(
                    &["path", &name],
                    "string_type",
                    &e.body_text(),
                ))
            }
        }
    }
}

/// A JSON object request body, or a YAML one under `Content-Type: application/yaml` (also
/// `application/x-yaml`, `text/yaml`): not an object -> 422 naming `body`; a body over the
/// size limit -> 413 (both in the `detail` shape).
struct JsonObject(serde_json::Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let yaml = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| {
                let t = t.trim();
                ["application/yaml", "application/x-yaml", "text/yaml"]
                    .iter()
                    .any(|y| t.eq_ignore_ascii_case(y))
            });
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::detail(e.status(), &e.body_text()))?;
        if yaml {
            parse_yaml_body(&body).map(Self)
        } else {
            parse_body(&body).map(Self)
        }
    }
}

/// A YAML body: the same values as JSON (mappings with string keys, sequences, scalars).
fn parse_yaml_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match yaml_value(body)? {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::field(
            &["body"],
            "model_attributes_type",
            "Input should be a valid dictionary or object",
        )),
    }
}

/// A YAML document as a JSON value, read within a budget: a small body may not expand
/// (aliases) much further.
fn yaml_value(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::field(&["body"], "yaml_invalid", &format!("not UTF-8: {e}")))?;
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_total_scalar_bytes: 4 * 1024 * 1024,
            max_nodes: 100_000,
            max_events: 200_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 10_000,
        },
    };
    serde_saphyr::from_str_with_options::<Value>(text, options)
        .map_err(|e| ApiError::field(&["body"], "yaml_invalid", &format!("YAML error: {e}")))
}

/// The query string's parameters among `known` (others are ignored, as FastAPI does). A
/// repeated one is a 422 naming it: which of the values was meant is a guess.
fn query_params<'k>(
    uri: &Uri,
    known: &[&'k str],
) -> Result<BTreeMap<&'k str, String>, Vec<FieldError>> {
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|Query(p)| p)
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut errs = Vec::new();
    for (key, value) in pairs {
        let Some(k) = known.iter().find(|k| **k == key) else {
            continue;
        };
        if out.insert(*k, value).is_some() && !errs.iter().any(|e: &FieldError| e.loc[1] == key) {
            errs.push(FieldError {
                loc: vec!["query".into(), key],
                msg: "Parameter given more than once; give it once".into(),
                kind: "duplicate_parameter".into(),
            });
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

/// An optional integer query parameter; one beyond the 64-bit range saturates (every
/// integer is valid, and callers clamp anyway).
fn query_int(
    params: &BTreeMap<&str, String>,
    key: &str,
    default: i64,
) -> Result<i64, Vec<FieldError>> {
    use std::num::IntErrorKind;
    let Some(s) = params.get(key) else {
        return Ok(default);
    };
    match s.trim().parse::<i64>() {
        Ok(n) => Ok(n),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => Ok(i64::MAX),
        Err(e) if *e.kind() == IntErrorKind::NegOverflow => Ok(i64::MIN),
        Err(_) => Err(vec![FieldError {
            loc: vec!["query".into(), key.into()],
            msg: "Input should be a valid integer, unable to parse string as an integer".into(),
            kind: "int_parsing".into(),
        }]),
    }
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::field(
            &["body"],
            "model_attributes_type",
            "Input should be a valid dictionary or object",
        )),
        Err(e) => Err(ApiError::field(
            &["body"],
            "json_invalid",
            &format!("JSON decode error: {e}"),
        )),
    }
}

fn deployment_json(state: &ApiState, id: &str) -> Result<Json<Value>, ApiError> {
    let view = state.core.view();
    let d = view.deployment(id).ok_or(ApiError(
        StatusCode::NOT_FOUND,
        json!("Deployment not found"),
        None,
    ))?;
    Ok(Json(json!(d)))
}

async fn create_deployment(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    let new = bodies::new_deployment(m).map_err(ApiError::invalid)?;
    let now = now_ms();
    let rec = DeploymentRecord {
        id: uuid::Uuid::new_v4().simple().to_string(),
        name: new.name,
        desired_state: new.desired_state,
        kind: new.kind,
        specification: new.specification,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let id = rec.id.clone();
    st.core.call(|r| CoreMsg::CreateDeployment(rec, r)).await?;
    Ok((StatusCode::CREATED, deployment_json(&st, &id)?).into_response())
}

/// `limit` (default 100, clamped to 1..=500) and `offset` (default 0, negative counts as 0).
fn page(uri: &Uri) -> Result<(usize, usize), ApiError> {
    let params = query_params(uri, &["limit", "offset"]).map_err(ApiError::invalid)?;
    let limit = query_int(&params, "limit", 100).map_err(ApiError::invalid)?;
    let offset = query_int(&params, "offset", 0).map_err(ApiError::invalid)?;
    Ok((
        usize::try_from(limit.clamp(1, 500)).unwrap_or(100),
        usize::try_from(offset.max(0)).unwrap_or(0),
    ))
}

async fn list_deployments(State(st): State<ApiState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = page(&uri)?;
    let view = st.core.view();
    Ok(Json(json!(
        view.deployments
            .iter()
            .skip(offset)
            .take(limit)
            .collect::<Vec<_>>()
    )))
}

async fn get_deployment(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    deployment_json(&st, &id)
}

async fn patch_deployment(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
    JsonObject(m): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let patch = bodies::deployment_patch(m).map_err(ApiError::invalid)?;
    st.core
        .call(|r| CoreMsg::PatchDeployment(id.clone(), patch, r))
        .await?;
    deployment_json(&st, &id)
}

async fn delete_deployment(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<StatusCode, ApiError> {
    st.core.call(|r| CoreMsg::DeleteDeployment(id, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /metrics`: the Prometheus exposition.
async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let view = st.core.view();
    let text = super::metrics::render(st.core.metrics(), &view).map_err(|e| {
        tracing::error!(error = %e, "could not encode the metrics");
        ApiError::detail(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    Ok(([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response())
}

async fn list_services(State(st): State<ApiState>) -> Json<Value> {
    Json(json!(st.core.view().services))
}

async fn list_nodes(State(st): State<ApiState>) -> Json<Value> {
    Json(json!({ "nodes": st.core.view().nodes }))
}

async fn create_env(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    let new = bodies::new_env(m).map_err(ApiError::invalid)?;
    let now = now_ms();
    let rec = CondaEnvRecord {
        name: new.name,
        python_version: new.python_version,
        packages: new.packages,
        custom_script: new.custom_script,
        manager: new.manager,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let out = json!(rec);
    st.core.call(|r| CoreMsg::CreateEnv(rec, r)).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_envs(State(st): State<ApiState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = page(&uri)?;
    Ok(Json(json!(
        st.core
            .view()
            .conda_envs
            .iter()
            .skip(offset)
            .take(limit)
            .collect::<Vec<_>>()
    )))
}

async fn get_env(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    let view = st.core.view();
    let env = view.conda_envs.iter().find(|e| e.name == name);
    env.map(|e| Json(json!(e))).ok_or(ApiError(
        StatusCode::NOT_FOUND,
        json!("Conda env not found"),
        None,
    ))
}

async fn patch_env(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
    JsonObject(m): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let patch = bodies::env_patch(m).map_err(ApiError::invalid)?;
    st.core
        .call(|r| CoreMsg::PatchEnv(name.clone(), patch, r))
        .await?;
    get_env(State(st), PathParam(name)).await
}

async fn delete_env(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<StatusCode, ApiError> {
    st.core.call(|r| CoreMsg::DeleteEnv(name, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rerun_env(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<Response, ApiError> {
    st.core.call(|r| CoreMsg::RerunEnv(name, r)).await?;
    Ok((StatusCode::ACCEPTED, Json(Value::Null)).into_response())
}

/// Close reasons.
const SHUTTING_DOWN: &str = "conductor shutting down";
const DELETED: &str = "deployment deleted";

/// Sends a close frame and waits (bounded) for the peer's reply, so that the peer sees `code`
/// and `reason` instead of a dropped connection (1006).
async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// A log viewer's query: `tail` (backlog lines, default 200) and `streams` (a comma-separated
/// filter; empty = all). A repeated parameter or a `tail` that is not a non-negative integer
/// is refused with the reason.
fn log_query(uri: &Uri) -> Result<(usize, BTreeSet<String>), String> {
    let params = query_params(uri, &["tail", "streams"]).map_err(|errs| {
        errs.iter()
            .map(|e| format!("{}: {}", e.loc.last().map_or("", String::as_str), e.msg))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let tail = match params.get("tail") {
        None => 200,
        Some(t) => t
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("tail: expected a non-negative integer, got {t:?}"))?,
    };
    let streams = params
        .get("streams")
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((tail, streams))
}

async fn ws_logs(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    let query = log_query(&uri);
    let token = st.sockets.token();
    ws.on_upgrade(move |socket| async move {
        let _tracked = token;
        match query {
            Ok((tail, streams)) => logs(socket, st, id, tail, streams).await,
            Err(reason) => refuse(socket, &id, &reason).await,
        }
    })
}

/// A policy refusal: an error frame (what `symphony logs` prints) and a 1008 close.
async fn refuse(socket: WebSocket, id: &str, reason: &str) {
    let frame = json!({"deployment_id": id, "entries": [], "error": reason});
    refuse_with(socket, &frame, reason).await;
}

/// Sends `frame` (an error frame that holds `reason` whole), then a policy close with `reason`
/// cut to what a close frame holds.
async fn refuse_with(mut socket: WebSocket, frame: &Value, reason: &str) {
    if socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .is_ok()
    {
        // A close reason is at most 123 bytes; the error frame above has it whole.
        let end = reason
            .char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .take_while(|end| *end <= 123)
            .last()
            .unwrap_or(0);
        close(socket, close_code::POLICY, &reason[..end]).await;
    }
}

/// One viewer: its own backlog (`tail`), its own filter (`streams`), each line exactly once.
/// Ends with 1000 when the deployment is deleted and 1001 at shutdown.
async fn logs(
    mut socket: WebSocket,
    st: ApiState,
    id: String,
    tail: usize,
    streams: BTreeSet<String>,
) {
    if st.core.view().deployment(&id).is_none() {
        return refuse(socket, &id, "Deployment not found").await;
    }
    let wanted = |l: &LogLine| streams.is_empty() || streams.contains(&l.stream);
    let Some(sub) = st.logs.subscribe(&id) else {
        // Deleted between the look-up and the subscription.
        return close(socket, close_code::NORMAL, DELETED).await;
    };
    let mut live = sub.live;
    let backlog: Vec<&LogLine> = sub
        .backlog
        .iter()
        .map(AsRef::as_ref)
        .filter(|l| wanted(l))
        .collect();
    let start = backlog.len().saturating_sub(tail);
    let mut last_seq = sub.backlog.last().map_or(0, |l| l.seq);
    let frame = log_frame(&id, &backlog[start..]);
    if socket.send(Message::Text(frame.into())).await.is_err() {
        return;
    }
    loop {
        let mut batch: Vec<Arc<LogLine>> = Vec::new();
        tokio::select! {
            biased;
            () = st.cancel.cancelled() => {
                return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
            }
            r = live.recv() => match r {
                Ok(l) => batch.push(l),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // A slow viewer: catch up from the ring instead of losing lines.
                    let Some(sub) = st.logs.subscribe(&id) else {
                        return close(socket, close_code::NORMAL, DELETED).await;
                    };
                    live = sub.live;
                    batch.extend(sub.backlog.into_iter().filter(|l| l.seq > last_seq));
                }
                // The hub dropped the deployment's ring: it was deleted (its last lines were
                // received before this).
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return close(socket, close_code::NORMAL, DELETED).await;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => continue,
            },
        }
        while batch.len() < 1000 {
            match live.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let entries: Vec<&LogLine> = batch
            .iter()
            .map(AsRef::as_ref)
            .filter(|l| l.seq > last_seq)
            .collect();
        let Some(last) = entries.last() else { continue };
        last_seq = last.seq;
        let entries: Vec<&LogLine> = entries.into_iter().filter(|l| wanted(l)).collect();
        if entries.is_empty() {
            continue;
        }
        let frame = log_frame(&id, &entries);
        if socket.send(Message::Text(frame.into())).await.is_err() {
            return;
        }
    }
}

/// One log frame, serialized straight from the hub's lines (no intermediate JSON tree: this
/// runs for every batch of every viewer).
fn log_frame(deployment_id: &str, entries: &[&LogLine]) -> String {
    #[derive(serde::Serialize)]
    struct Frame<'a> {
        deployment_id: &'a str,
        entries: &'a [&'a LogLine],
    }
    serde_json::to_string(&Frame {
        deployment_id,
        entries,
    })
    .unwrap_or_default()
}

/// The web UI's files (plain HTML, CSS and JavaScript modules written here), compiled into
/// the binary.
#[derive(rust_embed::Embed)]
#[folder = "src/conductor/ui/"]
struct UiAssets;

/// What the UI's pages may load: only this origin's files and API (no inline script or
/// style, no other host), and nobody may frame them.
const UI_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Serves only embedded assets: the path is never joined to a folder (the original served
/// any file of the host this way). A path with an extension that is not an asset is a 404;
/// any other path under `/ui/` is a page of the app (its router reads the URL).
async fn ui(path: Option<Path<String>>) -> Response {
    let path = path.map(|Path(p)| p).unwrap_or_default();
    let (name, file) = match UiAssets::get(&path) {
        Some(f) if !path.is_empty() => (path.as_str(), f),
        _ if path
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains('.')) =>
        {
            return ApiError::detail(StatusCode::NOT_FOUND, "Not Found").into_response();
        }
        _ => match UiAssets::get("index.html") {
            Some(f) => ("index.html", f),
            None => return ApiError::detail(StatusCode::NOT_FOUND, "Not Found").into_response(),
        },
    };
    let content_type = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, UI_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        file.data,
    )
        .into_response()
}

/// The OpenAPI 3.1 document (`openapi.json` next to this file), with this build's version.
/// `tests/it/api.rs` checks it against the router and real responses.
async fn openapi() -> Response {
    match serde_json::from_str::<Value>(OPENAPI) {
        Ok(mut doc) => {
            doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
            Json(doc).into_response()
        }
        Err(e) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!(format!("embedded OpenAPI document is invalid: {e}")),
            None,
        )
        .into_response(),
    }
}
