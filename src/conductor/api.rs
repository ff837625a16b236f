//! The HTTP/WebSocket API (axum), with the original's routes and JSON shapes plus our fixes.
//!
//! Reads come from the core's published snapshot and never wait for the core; writes are
//! validated here (422 in FastAPI's `{"detail":[{"loc","msg","type"}]}` shape, naming the
//! field) and then sent to the core, which persists before it replies.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::core::{CoreError, CoreHandle, CoreMsg, DeploymentPatch, EnvPatch, now_ms};
use super::loghub::{LogHub, LogLine};
use super::store::{CondaEnvRecord, DeploymentRecord};
use crate::model::DesiredState;
use crate::spec::FieldError;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub core: CoreHandle,
    pub logs: LogHub,
    /// Ends long-lived WebSocket tasks at shutdown.
    pub cancel: tokio_util::sync::CancellationToken,
}

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
        .route("/nodes", get(list_nodes))
        .route("/conda-envs", post(create_env).get(list_envs))
        .route(
            "/conda-envs/{name}",
            get(get_env).patch(patch_env).delete(delete_env),
        )
        .route("/conda-envs/{name}/rerun", post(rerun_env))
        .route("/ws/updates", get(ws_updates))
        .route("/ws/deployments/{id}/logs", get(ws_logs))
        .route("/openapi.json", get(openapi))
        .route("/ui", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui/", get(ui))
        .route("/ui/{*path}", get(ui))
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .with_state(state)
}

/// An API error: a status code and FastAPI's `detail`.
#[derive(Debug)]
pub struct ApiError(StatusCode, Value);

impl ApiError {
    fn invalid(errors: Vec<FieldError>) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, json!(errors))
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
        (self.0, Json(json!({ "detail": self.1 }))).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound(m) => Self(StatusCode::NOT_FOUND, json!(m)),
            CoreError::Conflict(m) => Self(StatusCode::CONFLICT, json!(m)),
            CoreError::Unavailable => Self(
                StatusCode::SERVICE_UNAVAILABLE,
                json!("conductor is shutting down"),
            ),
            CoreError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Self(StatusCode::INTERNAL_SERVER_ERROR, json!("internal error"))
            }
        }
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

/// Reads an optional string field with length bounds; `null` counts as absent.
fn opt_str(
    m: &serde_json::Map<String, Value>,
    key: &str,
    min: usize,
    max: usize,
    errs: &mut Vec<FieldError>,
) -> Option<String> {
    let loc = vec!["body".to_owned(), key.to_owned()];
    match m.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n < min {
                errs.push(FieldError {
                    loc,
                    msg: format!("String should have at least {min} character"),
                    kind: "string_too_short".into(),
                });
                None
            } else if n > max {
                errs.push(FieldError {
                    loc,
                    msg: format!("String should have at most {max} characters"),
                    kind: "string_too_long".into(),
                });
                None
            } else {
                Some(s.clone())
            }
        }
        Some(_) => {
            errs.push(FieldError {
                loc,
                msg: "Input should be a valid string".into(),
                kind: "string_type".into(),
            });
            None
        }
    }
}

fn opt_enum(
    m: &serde_json::Map<String, Value>,
    key: &str,
    allowed: &[&str],
    errs: &mut Vec<FieldError>,
) -> Option<String> {
    let v = opt_str(m, key, 0, 64, errs)?;
    if allowed.contains(&v.as_str()) {
        Some(v)
    } else {
        errs.push(FieldError {
            loc: vec!["body".into(), key.into()],
            msg: format!(
                "Input should be {}",
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            kind: "enum".into(),
        });
        None
    }
}

fn validate_spec(spec: &Value, errs: &mut Vec<FieldError>) {
    let size = spec.to_string().len();
    if size > MAX_SPEC_BYTES {
        errs.push(FieldError {
            loc: vec!["body".into(), "specification".into()],
            msg: format!("specification is {size} bytes; the limit is {MAX_SPEC_BYTES}"),
            kind: "too_long".into(),
        });
        return;
    }
    if let Err(mut e) = crate::spec::parse(spec) {
        errs.append(&mut e);
    }
}

fn deployment_json(state: &ApiState, id: &str) -> Result<Json<Value>, ApiError> {
    let view = state.core.view();
    let d = view.deployment(id).ok_or(ApiError(
        StatusCode::NOT_FOUND,
        json!("Deployment not found"),
    ))?;
    Ok(Json(json!(d)))
}

async fn create_deployment(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let m = parse_body(&body)?;
    let mut errs = Vec::new();
    let name = opt_str(&m, "name", 1, 200, &mut errs);
    if !m.contains_key("name") {
        errs.push(FieldError {
            loc: vec!["body".into(), "name".into()],
            msg: "Field required".into(),
            kind: "missing".into(),
        });
    }
    let desired = opt_enum(&m, "desired_state", &DesiredState::NAMES, &mut errs)
        .and_then(|s| DesiredState::from_name(&s))
        .unwrap_or_default();
    let kind =
        opt_enum(&m, "kind", &["EXEC", "DOCKER"], &mut errs).unwrap_or_else(|| "EXEC".into());
    if kind == "DOCKER" {
        errs.push(FieldError {
            loc: vec!["body".into(), "kind".into()],
            msg: "DOCKER deployments are not supported yet; use EXEC".into(),
            kind: "value_error".into(),
        });
    }
    let spec = m.get("specification").cloned().unwrap_or_else(|| json!({}));
    validate_spec(&spec, &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    let now = now_ms();
    let rec = DeploymentRecord {
        id: uuid::Uuid::new_v4().simple().to_string(),
        name: name.unwrap_or_default(),
        desired_state: desired,
        kind,
        specification: spec,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let id = rec.id.clone();
    st.core.call(|r| CoreMsg::CreateDeployment(rec, r)).await?;
    Ok((StatusCode::CREATED, deployment_json(&st, &id)?).into_response())
}

#[derive(Debug, serde::Deserialize)]
struct Page {
    limit: Option<String>,
    offset: Option<String>,
}

fn page(p: &Page) -> Result<(usize, usize), ApiError> {
    let int = |key: &str, v: &Option<String>, default: i64| -> Result<i64, ApiError> {
        match v {
            None => Ok(default),
            Some(s) => s.trim().parse::<i64>().map_err(|_| {
                ApiError::field(
                    &["query", key],
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                )
            }),
        }
    };
    let limit = int("limit", &p.limit, 100)?.clamp(1, 500);
    let offset = int("offset", &p.offset, 0)?.max(0);
    Ok((
        usize::try_from(limit).unwrap_or(100),
        usize::try_from(offset).unwrap_or(0),
    ))
}

async fn list_deployments(
    State(st): State<ApiState>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = page(&p)?;
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
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    deployment_json(&st, &id)
}

async fn patch_deployment(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let m = parse_body(&body)?;
    let mut errs = Vec::new();
    let name = opt_str(&m, "name", 1, 200, &mut errs);
    let desired = opt_enum(&m, "desired_state", &DesiredState::NAMES, &mut errs)
        .and_then(|s| DesiredState::from_name(&s));
    let spec = match m.get("specification") {
        None | Some(Value::Null) => None,
        Some(s) => Some(s.clone()),
    };
    if let Some(s) = spec.as_ref() {
        // A masked token sent back by a client that round-trips a GET is restored by the core.
        validate_spec(s, &mut errs);
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    let patch = DeploymentPatch {
        name,
        desired_state: desired,
        specification: spec,
    };
    st.core
        .call(|r| CoreMsg::PatchDeployment(id.clone(), patch, r))
        .await?;
    deployment_json(&st, &id)
}

async fn delete_deployment(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.core.call(|r| CoreMsg::DeleteDeployment(id, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(State(st): State<ApiState>) -> Json<Value> {
    Json(json!({ "nodes": st.core.view().nodes }))
}

fn packages(v: Option<&Value>, errs: &mut Vec<FieldError>) -> Option<Vec<String>> {
    let loc = |i: Option<usize>| {
        let mut l = vec!["body".to_owned(), "packages".to_owned()];
        l.extend(i.map(|i| i.to_string()));
        l
    };
    let items: Vec<(Option<usize>, &str)> = match v {
        None | Some(Value::Null) => return None,
        Some(Value::String(s)) => s.split([',', '\n']).map(|p| (None, p)).collect(),
        Some(Value::Array(a)) => {
            let mut items = Vec::new();
            for (i, p) in a.iter().enumerate() {
                match p.as_str() {
                    Some(s) => items.push((Some(i), s)),
                    None => errs.push(FieldError {
                        loc: loc(Some(i)),
                        msg: "Input should be a valid string".into(),
                        kind: "string_type".into(),
                    }),
                }
            }
            items
        }
        Some(_) => {
            errs.push(FieldError {
                loc: loc(None),
                msg: "Input should be a valid list".into(),
                kind: "list_type".into(),
            });
            return None;
        }
    };
    let mut out = Vec::new();
    for (i, p) in items {
        let p = p.trim();
        if p.len() > MAX_PACKAGE_LEN {
            errs.push(FieldError {
                loc: loc(i),
                msg: format!("a package spec is at most {MAX_PACKAGE_LEN} characters"),
                kind: "string_too_long".into(),
            });
        } else if !p.is_empty() {
            out.push(p.to_owned());
        }
    }
    if out.len() > MAX_PACKAGES {
        errs.push(FieldError {
            loc: loc(None),
            msg: format!("at most {MAX_PACKAGES} packages"),
            kind: "too_long".into(),
        });
    }
    Some(out)
}

async fn create_env(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let m = parse_body(&body)?;
    let mut errs = Vec::new();
    for key in ["name", "python_version"] {
        if m.get(key).is_none_or(Value::is_null) {
            errs.push(FieldError {
                loc: vec!["body".into(), key.into()],
                msg: "Field required".into(),
                kind: "missing".into(),
            });
        }
    }
    let name = opt_str(&m, "name", 1, 200, &mut errs);
    let python = opt_str(&m, "python_version", 1, 20, &mut errs);
    let script = opt_str(&m, "custom_script", 0, 2000, &mut errs)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let manager =
        opt_enum(&m, "manager", &["conda", "uv"], &mut errs).unwrap_or_else(|| "conda".into());
    let pkgs = packages(m.get("packages"), &mut errs).unwrap_or_default();
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    let now = now_ms();
    let rec = CondaEnvRecord {
        name: name.unwrap_or_default(),
        python_version: python.unwrap_or_default(),
        packages: pkgs,
        custom_script: script,
        manager,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let out = json!(rec);
    st.core.call(|r| CoreMsg::CreateEnv(rec, r)).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_envs(
    State(st): State<ApiState>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = page(&p)?;
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
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let view = st.core.view();
    let env = view.conda_envs.iter().find(|e| e.name == name);
    env.map(|e| Json(json!(e))).ok_or(ApiError(
        StatusCode::NOT_FOUND,
        json!("Conda env not found"),
    ))
}

async fn patch_env(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let m = parse_body(&body)?;
    let mut errs = Vec::new();
    if m.get("python_version").is_some_and(|v| !v.is_null()) {
        errs.push(FieldError {
            loc: vec!["body".into(), "python_version".into()],
            msg: "python_version cannot be changed; create a new env".into(),
            kind: "value_error".into(),
        });
    }
    let pkgs = packages(m.get("packages"), &mut errs);
    let script = if m.contains_key("custom_script") {
        Some(
            opt_str(&m, "custom_script", 0, 2000, &mut errs)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        )
    } else {
        None
    };
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    st.core
        .call(|r| {
            CoreMsg::PatchEnv(
                name.clone(),
                EnvPatch {
                    packages: pkgs,
                    custom_script: script,
                },
                r,
            )
        })
        .await?;
    get_env(State(st), Path(name)).await
}

async fn delete_env(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.core.call(|r| CoreMsg::DeleteEnv(name, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rerun_env(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    st.core.call(|r| CoreMsg::RerunEnv(name, r)).await?;
    Ok((StatusCode::ACCEPTED, Json(Value::Null)).into_response())
}

fn snapshot_frame(view: &super::view::ClusterView) -> String {
    json!({
        "type": "snapshot",
        "deployments": view.deployments.iter().take(500).collect::<Vec<_>>(),
        "nodes": view.nodes,
    })
    .to_string()
}

async fn ws_updates(State(st): State<ApiState>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| updates(socket, st))
}

/// Pushes a snapshot at once and then on every change (at most 4 per second).
async fn updates(mut socket: WebSocket, st: ApiState) {
    let mut rx = st.core.subscribe();
    loop {
        let frame = snapshot_frame(&rx.borrow_and_update());
        if socket.send(Message::Text(frame.into())).await.is_err() {
            return;
        }
        // Wait for a change; client messages (pings, text) are read and ignored.
        loop {
            tokio::select! {
                () = st.cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return } else { break },
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Debug, serde::Deserialize)]
struct LogQuery {
    tail: Option<String>,
    streams: Option<String>,
}

async fn ws_logs(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let tail = q
        .tail
        .as_deref()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .unwrap_or(200)
        .max(0);
    let streams: BTreeSet<String> = q
        .streams
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    ws.on_upgrade(move |socket| logs(socket, st, id, usize::try_from(tail).unwrap_or(0), streams))
}

/// One viewer: its own backlog (`tail`), its own filter (`streams`), each line exactly once.
async fn logs(
    mut socket: WebSocket,
    st: ApiState,
    id: String,
    tail: usize,
    streams: BTreeSet<String>,
) {
    if st.core.view().deployment(&id).is_none() {
        let frame = json!({"deployment_id": id, "entries": [], "error": "Deployment not found"});
        let _ = socket.send(Message::Text(frame.to_string().into())).await;
        let _ = socket
            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                code: 1008,
                reason: "Deployment not found".into(),
            })))
            .await;
        return;
    }
    let wanted = |l: &LogLine| streams.is_empty() || streams.contains(&l.stream);
    let Some(sub) = st.logs.subscribe(&id) else {
        return;
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
            () = st.cancel.cancelled() => return,
            r = live.recv() => match r {
                Ok(l) => batch.push(l),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // A slow viewer: catch up from the ring instead of losing lines.
                    let Some(sub) = st.logs.subscribe(&id) else { return };
                    live = sub.live;
                    batch.extend(sub.backlog.into_iter().filter(|l| l.seq > last_seq));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
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

const INDEX_HTML: &str = include_str!("ui/index.html");

/// Serves only embedded assets: the path is never joined to a folder (the original served
/// `/etc/passwd` here). Unknown paths get the SPA's index.
async fn ui(path: Option<Path<String>>) -> Response {
    let _ = path;
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

/// The OpenAPI 3.1 document (`openapi.json` next to this file), with this build's version.
/// `tests/it/api.rs` checks it against the router and real responses.
async fn openapi() -> Response {
    match serde_json::from_str::<Value>(include_str!("openapi.json")) {
        Ok(mut doc) => {
            doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
            Json(doc).into_response()
        }
        Err(e) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!(format!("embedded OpenAPI document is invalid: {e}")),
        )
        .into_response(),
    }
}
