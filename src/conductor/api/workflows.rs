//! `/workflows` and `/runs`: define a workflow (YAML or JSON; each definition is a new
//! version), start runs with parameters, list and show them (every task with its attempts,
//! node, exit code, times and result), cancel a run, retry a failed one from its failed part.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState, JsonObject, MAX_SPEC_BYTES, PathParam, query_int, query_params};
use crate::conductor::core::CoreMsg;
use crate::conductor::runs::Run;
use crate::spec::{Loc, Report, parse_workflow};

/// Most parameters of one run, and the longest key and value.
const MAX_PARAMS: usize = 100;
const MAX_PARAM_LEN: usize = 4096;

fn not_found(what: &'static str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, json!(what), None)
}

/// A run's summary: its counts instead of its tasks.
fn summary(r: &Run) -> Value {
    let (done, total, running, failed) = r.progress();
    json!({
        "id": r.id, "workflow": r.workflow, "version": r.version, "state": r.state,
        "params": r.params, "queued_at_ms": r.queued_at_ms, "started_at_ms": r.started_at_ms,
        "finished_at_ms": r.finished_at_ms, "reason": r.reason,
        "tasks": {"done": done, "total": total, "running": running, "failed": failed},
    })
}

/// A run in full.
fn detail(r: &Run) -> Value {
    let mut v = summary(r);
    v["progress"] = v["tasks"].take();
    v["tasks"] = r
        .tasks
        .iter()
        .map(|t| {
            json!({
                "name": t.name, "group": t.group, "state": t.state,
                "depends_on": t.depends_on.iter().map(|&d| r.tasks[d].name.clone()).collect::<Vec<_>>(),
                "deployment_id": t.deployment_id, "attempts": t.attempts,
                "retry_at_ms": t.retry_at_ms, "result": t.result, "reason": t.reason,
                "max_attempts": t.retries.max_attempts,
            })
        })
        .collect();
    v
}

fn run_json(st: &ApiState, id: &str) -> Result<Json<Value>, ApiError> {
    let view = st.core.view();
    let r = view
        .runs
        .iter()
        .find(|r| r.id == id)
        .ok_or(not_found("Run not found"))?;
    Ok(Json(detail(r)))
}

fn workflow_json(st: &ApiState, name: &str) -> Result<Json<Value>, ApiError> {
    let view = st.core.view();
    let w = view
        .workflows
        .iter()
        .find(|w| w.name == name)
        .ok_or(not_found("Workflow not found"))?;
    Ok(Json(json!(w)))
}

/// `POST /workflows`: a definition (YAML or JSON); a new version when the name exists.
pub(super) async fn define(
    State(st): State<ApiState>,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    let definition = Value::Object(m);
    let workflow = parse_workflow(&definition).map_err(ApiError::invalid)?;
    // Each task's spec travels to its node in one frame, like a deployment's.
    let mut r = Report::default();
    for (i, t) in workflow.tasks.iter().enumerate() {
        let size = serde_json::to_vec(&json!({ "spec": t.spec })).map_or(usize::MAX, |b| b.len());
        if size > MAX_SPEC_BYTES {
            let at = Loc::new(&["body", "tasks"]).at(i);
            r.err(
                &at,
                "value_error",
                format!("the task's spec is {size} bytes; at most {MAX_SPEC_BYTES}"),
            );
        }
    }
    r.finish(Some(())).map_err(ApiError::invalid)?;
    let name = workflow.name.clone();
    st.core
        .call(|r| CoreMsg::DefineWorkflow(definition, Box::new(workflow), r))
        .await?;
    Ok((StatusCode::CREATED, workflow_json(&st, &name)?).into_response())
}

/// `GET /workflows`: each workflow's newest version, by name.
pub(super) async fn list(State(st): State<ApiState>) -> Json<Value> {
    Json(json!(st.core.view().workflows))
}

/// `GET /workflows/{name}`: its newest version, with the definition (secrets masked).
pub(super) async fn get(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    workflow_json(&st, &name)
}

/// `POST /workflows/{name}/runs` with `{"params": {"k": "v"}}` (optional): queues a run.
pub(super) async fn start(
    State(st): State<ApiState>,
    PathParam(name): PathParam,
    JsonObject(m): JsonObject,
) -> Result<Response, ApiError> {
    let mut r = Report::default();
    let mut params = BTreeMap::new();
    let at = Loc::new(&["body", "params"]);
    for (k, _) in m.iter().filter(|(k, _)| k.as_str() != "params") {
        r.err(
            &Loc::new(&["body"]).at(k),
            "extra_forbidden",
            "Extra inputs are not permitted (a run takes `params`)",
        );
    }
    match m.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            if p.len() > MAX_PARAMS {
                r.err(
                    &at,
                    "value_error",
                    format!("at most {MAX_PARAMS} parameters"),
                );
            }
            for (k, v) in p {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => v.to_string(),
                    _ => {
                        r.err(
                            &at.at(k),
                            "string_type",
                            "a parameter is a string, a number or a boolean",
                        );
                        continue;
                    }
                };
                if text.contains('\0') || k.contains('\0') {
                    r.err(
                        &at.at(k),
                        "value_error",
                        "a parameter cannot hold a NUL character (it goes into the environment)",
                    );
                    continue;
                }
                if k.is_empty() || k.len() > 100 || text.len() > MAX_PARAM_LEN {
                    r.err(
                        &at.at(k),
                        "value_error",
                        format!("a key of 1-100 characters and a value of at most {MAX_PARAM_LEN}"),
                    );
                    continue;
                }
                params.insert(k.clone(), text);
            }
        }
        Some(_) => r.err(&at, "dict_type", "Input should be an object of parameters"),
    }
    r.finish(Some(())).map_err(ApiError::invalid)?;
    let id = st
        .core
        .call(|r| CoreMsg::StartRun(name.clone(), params, r))
        .await?;
    Ok((StatusCode::CREATED, run_json(&st, &id)?).into_response())
}

/// `GET /runs?workflow=NAME&limit=N`: newest first, summaries.
pub(super) async fn runs(State(st): State<ApiState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = query_params(&uri, &["workflow", "limit"]).map_err(ApiError::invalid)?;
    let limit = query_int(&params, "limit", 100).map_err(ApiError::invalid)?;
    let limit = usize::try_from(limit.clamp(1, 10_000)).unwrap_or(100);
    let view = st.core.view();
    let list: Vec<Value> = view
        .runs
        .iter()
        .filter(|r| params.get("workflow").is_none_or(|w| *w == r.workflow))
        .take(limit)
        .map(|r| summary(r))
        .collect();
    Ok(Json(Value::Array(list)))
}

/// `GET /runs/{id}`: every task with its attempts and result.
pub(super) async fn run(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    run_json(&st, &id)
}

/// `POST /runs/{id}/cancel`: waiting tasks never run, running attempts are stopped.
pub(super) async fn cancel(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    st.core.call(|r| CoreMsg::CancelRun(id.clone(), r)).await?;
    run_json(&st, &id)
}

/// `POST /runs/{id}/retry`: a FAILED or CANCELLED run queues again from its failed tasks.
pub(super) async fn retry(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    st.core.call(|r| CoreMsg::RetryRun(id.clone(), r)).await?;
    run_json(&st, &id)
}
