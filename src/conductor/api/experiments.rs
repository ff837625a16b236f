//! `/experiments`: launch one from a YAML or JSON declaration, list, show (with the
//! declaration, secrets masked), stop or start all its processes, delete it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState, JsonObject, MAX_SPEC_BYTES, PathParam, query_params};
use crate::conductor::core::{CoreMsg, Launch};
use crate::model::{DesiredState, ExperimentInfo};
use crate::spec::{FieldError, Loc, Report, is_dns_label, parse_experiment};

/// Largest accepted declaration (a thousand replicas of a small process fit many times).
pub const MAX_DECLARATION_BYTES: usize = 1024 * 1024;

/// An experiment's JSON; `declaration` only when asked for.
fn to_json(e: &ExperimentInfo, declaration: bool) -> Value {
    let mut v = json!(e);
    if !declaration && let Some(m) = v.as_object_mut() {
        m.remove("declaration");
    }
    v
}

/// The experiment as the API shows it; `declaration` only when asked for.
fn experiment_json(st: &ApiState, name: &str, declaration: bool) -> Result<Json<Value>, ApiError> {
    let view = st.core.view();
    let e = view
        .experiments
        .iter()
        .find(|e| e.name == name)
        .ok_or(ApiError(
            StatusCode::NOT_FOUND,
            json!("Experiment not found"),
            None,
        ))?;
    Ok(Json(to_json(e, declaration)))
}

/// `force` and `user` from the query string.
fn launch_options(uri: &Uri) -> Result<(bool, Option<String>), Vec<FieldError>> {
    let params = query_params(uri, &["force", "user"])?;
    let mut r = Report::default();
    let force = match params.get("force").map(String::as_str) {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => {
            let at = Loc::new(&["query", "force"]);
            r.err(&at, "bool_parsing", "Input should be a valid boolean");
            false
        }
    };
    let user = params.get("user").filter(|u| !u.is_empty()).cloned();
    if let Some(u) = &user
        && !is_dns_label(u)
    {
        let at = Loc::new(&["query", "user"]);
        let msg = format!("{u:?} is not a valid user prefix: use 1-63 of a-z, 0-9 and '-'");
        r.err(&at, "value_error", msg);
    }
    r.finish(Some((force, user)))
}

/// The declaration: YAML when the content type says so, else JSON.
fn declaration(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if body.len() > MAX_DECLARATION_BYTES {
        return Err(ApiError::detail(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the declaration is larger than {MAX_DECLARATION_BYTES} bytes"),
        ));
    }
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("yaml"));
    if yaml {
        super::yaml_value(body)
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| {
            ApiError::field(
                &["body"],
                "json_invalid",
                &format!("JSON decode error: {e}"),
            )
        })
    }
}

/// `POST /experiments[?force=true][&user=NAME]`.
pub(super) async fn launch(
    State(st): State<ApiState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (force, user) = launch_options(&uri).map_err(ApiError::invalid)?;
    let decl = declaration(&headers, &body)?;
    let experiment = parse_experiment(&decl, user.as_deref()).map_err(ApiError::invalid)?;
    // Each process's spec travels to its node in one frame, like a deployment's.
    let mut r = Report::default();
    let mut seen = std::collections::BTreeSet::new();
    for p in &experiment.processes {
        let size = serde_json::to_vec(&json!({ "spec": p.spec })).map_or(usize::MAX, |b| b.len());
        if size > MAX_SPEC_BYTES && seen.insert(p.index) {
            let at = Loc::new(&["body", "processes"]).at(p.index);
            let msg = format!("the process's spec is {size} bytes; at most {MAX_SPEC_BYTES}");
            r.err(&at, "value_error", msg);
        }
    }
    r.finish(Some(())).map_err(ApiError::invalid)?;
    let name = experiment.name.clone();
    let launch = Launch {
        experiment,
        declaration: decl,
        force,
    };
    st.core
        .call(|r| CoreMsg::LaunchExperiment(Box::new(launch), r))
        .await?;
    Ok((StatusCode::CREATED, experiment_json(&st, &name, true)?).into_response())
}

/// `GET /experiments`: newest first, without declarations.
pub(super) async fn list(State(st): State<ApiState>) -> Json<Value> {
    let view = st.core.view();
    let list: Vec<Value> = view.experiments.iter().map(|e| to_json(e, false)).collect();
    Json(Value::Array(list))
}

/// `GET /experiments/{name}`: with its declaration.
pub(super) async fn get(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    experiment_json(&st, &name, true)
}

/// `PATCH /experiments/{name}` with `{"desired_state": "STOPPED" | "RUNNING"}`: every process.
pub(super) async fn patch(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
    JsonObject(m): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let desired = match m.get("desired_state") {
        Some(Value::String(s)) => DesiredState::from_name(s),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::field(
            &["body", "desired_state"],
            "enum",
            "Input should be 'RUNNING' or 'STOPPED'",
        )
    })?;
    st.core
        .call(|r| CoreMsg::PatchExperiment(name.clone(), desired, r))
        .await?;
    experiment_json(&st, &name, false)
}

/// `DELETE /experiments/{name}`: its processes stop, its services go.
pub(super) async fn delete(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<StatusCode, ApiError> {
    st.core.call(|r| CoreMsg::DeleteExperiment(name, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}
