//! Tests for the client commands: pure helpers (prefix resolution, 422 formatting) and an
//! end-to-end run of every command against a small axum mock conductor serving canned JSON and
//! a logs WebSocket.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::render::{NODES_HEADERS, render_table};
use super::*;

const ID_WEB: &str = "aaaa1111-0000-0000-0000-000000000001";
const ID_BATCH: &str = "aaaa2222-0000-0000-0000-000000000002";
const ID_GPU: &str = "bbbb3333-0000-0000-0000-000000000003";
const ID_NEW: &str = "cccc4444-0000-0000-0000-000000000004";

// ---------------------------------------------------------------- pure helpers

#[test]
fn prefix_resolution() {
    let ids = [ID_WEB, ID_BATCH, ID_GPU];
    assert_eq!(resolve_prefix("aaaa1", ids).unwrap(), ID_WEB);
    assert_eq!(resolve_prefix("b", ids).unwrap(), ID_GPU);
    assert_eq!(resolve_prefix(ID_BATCH, ids).unwrap(), ID_BATCH);

    match resolve_prefix("aaaa", ids).unwrap_err() {
        ClientError::AmbiguousId { prefix, candidates } => {
            assert_eq!(prefix, "aaaa");
            assert_eq!(candidates, [ID_WEB, ID_BATCH]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = resolve_prefix("aaaa", ids).unwrap_err();
    assert_eq!(err.exit(), Exit::Usage);

    let err = resolve_prefix("zz", ids).unwrap_err();
    assert!(matches!(err, ClientError::NoSuchDeployment(ref p) if p == "zz"));
    assert_eq!(err.exit(), Exit::Failure);

    assert_eq!(resolve_prefix("", ids).unwrap_err().exit(), Exit::Usage);
    assert!(matches!(
        resolve_prefix("a", std::iter::empty()),
        Err(ClientError::NoSuchDeployment(_))
    ));
}

#[test]
fn exact_match_wins_over_longer_ids_and_duplicates_collapse() {
    let ids = ["abc", "abcd", "abcd"];
    assert_eq!(resolve_prefix("abc", ids).unwrap(), "abc");
    assert_eq!(resolve_prefix("abcd", ids).unwrap(), "abcd");
    assert_eq!(resolve_prefix("abcd", ["abcde", "abcde"]).unwrap(), "abcde");
}

#[test]
fn ambiguous_candidates_are_capped_and_sorted() {
    let ids: Vec<String> = (0..9).rev().map(|i| format!("x{i}")).collect();
    match resolve_prefix("x", ids.iter().map(String::as_str)).unwrap_err() {
        ClientError::AmbiguousId { candidates, .. } => {
            assert_eq!(candidates, ["x0", "x1", "x2", "x3", "x4"]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn names_resolve_too_and_ids_win_over_names() {
    let ds = [
        (ID_WEB, Some("web")),
        (ID_BATCH, Some("batch")),
        (ID_GPU, Some("tick")),
        (ID_NEW, Some("tick")),
        ("abcd0000", Some("bbbb")),
        ("eeee0000", Some("aaaa1")),
    ];
    // A unique name.
    assert_eq!(resolve_deployment("web", ds).unwrap(), ID_WEB);
    assert_eq!(resolve_deployment("batch", ds).unwrap(), ID_BATCH);
    // A unique id prefix wins over a name equal to it ("bbbb" names abcd0000, "aaaa1" names
    // eeee0000).
    assert_eq!(resolve_deployment("bbbb", ds).unwrap(), ID_GPU);
    assert_eq!(resolve_deployment("aaaa1", ds).unwrap(), ID_WEB);
    // An exact id wins over everything.
    assert_eq!(resolve_deployment(ID_NEW, ds).unwrap(), ID_NEW);

    // Two deployments named "tick": ambiguous, both listed with id and name, exit 2.
    let err = resolve_deployment("tick", ds).unwrap_err();
    match &err {
        ClientError::AmbiguousId { prefix, candidates } => {
            assert_eq!(prefix, "tick");
            assert_eq!(
                candidates,
                &[format!("{ID_GPU} (tick)"), format!("{ID_NEW} (tick)")]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.exit(), Exit::Usage);
    let mut stderr = Vec::new();
    assert_eq!(finish(Err(err), &mut stderr), Exit::Usage);
    assert_eq!(
        text(stderr),
        format!(
            "error: 'tick' is ambiguous; it matches: {ID_GPU} (tick), {ID_NEW} (tick); give the id\n"
        )
    );

    // An ambiguous prefix that is also a unique name: the name.
    let ds = [("a1", Some("x")), ("a2", Some("y")), ("b1", Some("a"))];
    assert_eq!(resolve_deployment("a", ds).unwrap(), "b1");
    // An ambiguous prefix that is also an ambiguous name: every candidate.
    let ds = [("a1", Some("a")), ("a2", None), ("b1", Some("a"))];
    match resolve_deployment("a", ds).unwrap_err() {
        ClientError::AmbiguousId { candidates, .. } => {
            assert_eq!(candidates, ["a1 (a)", "a2", "b1 (a)"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = resolve_deployment("nope", ds).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no deployment has the id, id prefix or name 'nope'"
    );
    assert_eq!(err.exit(), Exit::Failure);
}

#[test]
fn validation_items_format_as_field_path() {
    let item = json!({"loc": ["body", "specification", "spec", "config", "command", 0],
                      "msg": "must be a string", "type": "x"});
    assert_eq!(
        format_validation_item(&item),
        "specification.spec.config.command.0: must be a string"
    );
    assert_eq!(
        format_validation_item(&json!({"loc": ["query", "limit"], "msg": "bad"})),
        "query.limit: bad"
    );
    assert_eq!(
        format_validation_item(&json!({"loc": [], "msg": "whole"})),
        "whole"
    );
    assert_eq!(format_validation_item(&json!({"msg": "no loc"})), "no loc");
}

#[test]
fn api_errors_from_odd_bodies() {
    let e = api_error(
        StatusCode::NOT_FOUND,
        r#"{"detail":"Deployment not found"}"#,
    );
    assert_eq!(e.to_string(), "Deployment not found (HTTP 404)");
    let e = api_error(StatusCode::INTERNAL_SERVER_ERROR, "");
    assert_eq!(e.to_string(), "Internal Server Error (HTTP 500)");
    let e = api_error(StatusCode::BAD_GATEWAY, "<html>gateway</html>");
    assert_eq!(e.to_string(), "<html>gateway</html> (HTTP 502)");
    // A 422 whose detail is a string is not a field list.
    let e = api_error(StatusCode::UNPROCESSABLE_ENTITY, r#"{"detail":"nope"}"#);
    assert!(matches!(e, ClientError::Api { status: 422, .. }));
}

#[test]
fn finish_prints_validation_lines_plainly_and_maps_exits() {
    let mut err = Vec::new();
    let exit = finish(
        Err(ClientError::Validation(vec![
            "a.b: x".into(),
            "c: y".into(),
        ])),
        &mut err,
    );
    assert_eq!(exit, Exit::Failure);
    assert_eq!(String::from_utf8(err).unwrap(), "a.b: x\nc: y\n");

    let mut err = Vec::new();
    let exit = finish(Err(ClientError::Usage("bad flag".into())), &mut err);
    assert_eq!((exit, exit.code()), (Exit::Usage, 2));
    assert_eq!(String::from_utf8(err).unwrap(), "error: bad flag\n");

    let mut err = Vec::new();
    assert_eq!(finish(Ok(Exit::Ok), &mut err).code(), 0);
    assert!(err.is_empty());
}

#[tokio::test]
async fn bad_base_urls_are_usage_errors() {
    // (https is supported: an unreachable one is a transport error, not a usage error.)
    for api in ["not a url", "ftp://x", "mailto:a@b"] {
        let err = ps(api, false, false, &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.exit(), Exit::Usage, "{api}: {err}");
    }
}

// ---------------------------------------------------------------- mock conductor

#[derive(Default)]
struct Recorded {
    posted: Vec<Value>,
    patched: Vec<(String, Value)>,
    deleted: Vec<String>,
    list_queries: Vec<HashMap<String, String>>,
    ws_queries: Vec<(String, HashMap<String, String>)>,
}

#[derive(Clone)]
struct Mock {
    rec: Arc<Mutex<Recorded>>,
    created_at_ms: i64,
}

impl Mock {
    fn deployments(&self) -> Vec<Value> {
        let c = self.created_at_ms;
        vec![
            json!({"id": ID_WEB, "name": "web", "desired_state": "RUNNING", "current_state": "RUNNING",
                   "kind": "EXEC", "specification": {}, "created_at_ms": c, "updated_at_ms": c,
                   "assigned_node_id": "node-a", "assignment_reason": null,
                   "status": {"state": "RUNNING", "pid": 42, "restart_count": 2, "last_exit_code": null,
                              "reason": null, "generation": 1, "started_at_ms": c, "stopped_at_ms": null}}),
            json!({"id": ID_BATCH, "name": "batch", "desired_state": "STOPPED", "current_state": "STOPPED",
                   "kind": "EXEC", "specification": {}, "created_at_ms": c, "updated_at_ms": c,
                   "assigned_node_id": null, "assignment_reason": null, "status": null}),
            json!({"id": ID_GPU, "name": "gpu-job", "desired_state": "RUNNING", "current_state": null,
                   "kind": "EXEC", "specification": {}, "created_at_ms": c, "updated_at_ms": c,
                   "assigned_node_id": null, "assignment_reason": "No Capacity", "status": null}),
        ]
    }

    fn find(&self, id: &str) -> Option<Value> {
        self.deployments().into_iter().find(|d| d["id"] == id)
    }
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"detail": "Deployment not found"})),
    )
        .into_response()
}

async fn list(State(m): State<Mock>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let offset: usize = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    m.rec.lock().unwrap().list_queries.push(q);
    let all = m.deployments();
    Json(Value::Array(all.into_iter().skip(offset).collect()))
}

async fn create(State(m): State<Mock>, Json(body): Json<Value>) -> Response {
    m.rec.lock().unwrap().posted.push(body.clone());
    if body["name"] == "bad" {
        let detail = json!([
            {"loc": ["body", "specification", "spec", "config", "command"], "msg": "Field required", "type": "missing"},
            {"loc": ["body", "name"], "msg": "String should have at most 200 characters", "type": "string_too_long"}
        ]);
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": detail})),
        )
            .into_response();
    }
    let created = json!({"id": ID_NEW, "name": body["name"], "desired_state": body["desired_state"],
                         "current_state": null, "kind": body["kind"], "specification": body["specification"],
                         "created_at_ms": 1, "updated_at_ms": 1, "assigned_node_id": null,
                         "assignment_reason": null, "status": null});
    (StatusCode::CREATED, Json(created)).into_response()
}

async fn patch_one(
    State(m): State<Mock>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Some(mut d) = m.find(&id) else {
        return not_found();
    };
    m.rec.lock().unwrap().patched.push((id, body.clone()));
    if let Some(s) = body.get("desired_state") {
        d["desired_state"] = s.clone();
    }
    Json(d).into_response()
}

async fn delete_one(State(m): State<Mock>, Path(id): Path<String>) -> Response {
    if m.find(&id).is_none() {
        return not_found();
    }
    m.rec.lock().unwrap().deleted.push(id);
    StatusCode::NO_CONTENT.into_response()
}

const GIB: u64 = 1024 * 1024 * 1024;

async fn get_nodes() -> Json<Value> {
    Json(json!({"nodes": {
        "node-b": {"node_id": "node-b", "groups": [], "capacities_total": {}, "total_capacities_used": {},
                   "last_heartbeat": "2024-01-01T00:00:00Z", "state": "lost", "cpu": null, "memory": null,
                   "gpus": [], "connection": null, "assigned_deployments": [], "conda_envs": []},
        "node-a": {"node_id": "node-a", "groups": ["gpu", "lab"],
                   "capacities_total": {"GPU": 2, "CPU": 8}, "total_capacities_used": {"GPU": 1},
                   "last_heartbeat": "2024-01-01T00:00:00Z", "state": "online",
                   "cpu": {"static": {"logical_cores": 8}, "dynamic": {"total_percent": 12.34, "per_core": []}},
                   "memory": {"static": {"total_bytes": 16 * GIB},
                              "dynamic": {"used_bytes": 4 * GIB, "available_bytes": 12 * GIB}},
                   "gpus": [{"index": 0}, {"index": 1}],
                   "connection": {"remote_addr": "10.0.0.5:4433", "connected_since_ms": 1, "rtt_ms": 1.3,
                                  "path_changes": 0, "reconnects": 1},
                   "assigned_deployments": [{"id": ID_WEB, "name": "web"}], "conda_envs": []}
    }}))
}

async fn ws_logs(
    State(m): State<Mock>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    m.rec.lock().unwrap().ws_queries.push((id.clone(), q));
    ws.on_upgrade(move |socket| serve_logs(socket, id))
}

fn frame(id: &str, entries: &[(u64, i64, &str, &str)]) -> Message {
    let entries: Vec<Value> = entries
        .iter()
        .map(|(seq, ts, stream, line)| {
            json!({"seq": seq, "timestamp_unix_ms": ts, "stream": stream, "line": line})
        })
        .collect();
    Message::Text(
        json!({"deployment_id": id, "entries": entries})
            .to_string()
            .into(),
    )
}

async fn serve_logs(mut socket: WebSocket, id: String) {
    match id.as_str() {
        ID_WEB => {
            let backlog = frame(
                &id,
                &[
                    (1, 1_700_000_000_000, "stdout", "hello"),
                    (2, 1_700_000_000_500, "stderr", "warn"),
                ],
            );
            let live = frame(&id, &[(3, 1_700_000_001_000, "system", "restarted")]);
            for m in [backlog, live] {
                if socket.send(m).await.is_err() {
                    return;
                }
            }
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "".into(),
                })))
                .await;
        }
        ID_GPU => {
            let err =
                json!({"deployment_id": id, "entries": [], "error": "Deployment not assigned"});
            let _ = socket.send(Message::Text(err.to_string().into())).await;
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1008,
                    reason: "not assigned".into(),
                })))
                .await;
        }
        // Silent deployment: no frame at all, hold the socket until the client leaves.
        _ => while let Some(Ok(_)) = socket.recv().await {},
    }
}

async fn start_mock() -> (String, Mock) {
    let mock = Mock {
        rec: Arc::new(Mutex::new(Recorded::default())),
        created_at_ms: chrono::Utc::now().timestamp_millis() - 185_000,
    };
    let app = Router::new()
        .route("/deployments", get(list).post(create))
        .route(
            "/deployments/{id}",
            axum::routing::patch(patch_one).delete(delete_one),
        )
        .route("/nodes", get(get_nodes))
        .route("/ws/deployments/{id}/logs", get(ws_logs))
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), mock)
}

fn text(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap()
}

/// An address where nothing listens (bound, then released).
async fn dead_api() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

// ---------------------------------------------------------------- commands end to end

#[tokio::test]
async fn ps_prints_a_table_in_server_order() {
    let (api, mock) = start_mock().await;
    let mut out = Vec::new();
    assert_eq!(ps(&api, false, false, &mut out).await.unwrap(), Exit::Ok);
    let out = text(out);
    let expected = render_table(
        &render::PS_HEADERS,
        &[
            vec!["aaaa1111", "web", "RUNNING", "RUNNING", "node-a", "2", "3m"],
            vec!["aaaa2222", "batch", "STOPPED", "STOPPED", "-", "-", "3m"],
            vec![
                "bbbb3333",
                "gpu-job",
                "RUNNING",
                "-",
                "(No Capacity)",
                "-",
                "3m",
            ],
        ]
        .into_iter()
        .map(|r| r.into_iter().map(str::to_owned).collect())
        .collect::<Vec<Vec<String>>>(),
    );
    assert_eq!(out, expected);
    assert!(out.starts_with("ID        NAME     DESIRED  CURRENT  NODE"));

    // Paged: first page at offset 0, then an empty page at offset 3 ends the listing.
    let rec = mock.rec.lock().unwrap();
    let offsets: Vec<&str> = rec
        .list_queries
        .iter()
        .map(|q| q["offset"].as_str())
        .collect();
    assert_eq!(offsets, ["0", "3"]);
    assert!(rec.list_queries.iter().all(|q| q["limit"] == "500"));
}

#[tokio::test]
async fn ps_json_prints_the_raw_array() {
    let (api, _mock) = start_mock().await;
    let mut out = Vec::new();
    ps(&api, true, false, &mut out).await.unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0]["id"], ID_WEB);
    assert_eq!(arr[0]["status"]["pid"], 42);
}

#[tokio::test]
async fn nodes_prints_a_sorted_table() {
    let (api, _mock) = start_mock().await;
    let mut out = Vec::new();
    assert_eq!(nodes(&api, false, &mut out).await.unwrap(), Exit::Ok);
    let rows: Vec<Vec<String>> = [
        [
            "node-a",
            "online",
            "gpu,lab",
            "CPU 0/8, GPU 1/2",
            "12.3",
            "4.0/16.0 GiB",
            "2",
            "1.3ms",
            "10.0.0.5:4433",
        ],
        ["node-b", "lost", "-", "-", "-", "-", "0", "-", "-"],
    ]
    .iter()
    .map(|r| r.iter().map(|c| (*c).to_owned()).collect())
    .collect();
    assert_eq!(text(out), render_table(&NODES_HEADERS, &rows));

    let mut out = Vec::new();
    nodes(&api, true, &mut out).await.unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["nodes"].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn deploy_from_flags_prints_the_new_id() {
    let (api, mock) = start_mock().await;
    let args = DeployArgs {
        name: Some("web2".into()),
        command: vec!["sleep".into(), "5".into()],
        ..DeployArgs::default()
    };
    let mut out = Vec::new();
    assert_eq!(deploy(&api, &args, &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(text(out), format!("{ID_NEW}\n"));
    let rec = mock.rec.lock().unwrap();
    assert_eq!(rec.posted.len(), 1);
    assert_eq!(
        rec.posted[0],
        json!({"name": "web2", "desired_state": "RUNNING", "kind": "EXEC",
               "specification": {"spec": {"config": {"command": ["sleep", "5"]}}}})
    );
}

#[tokio::test]
async fn deploy_from_yaml_file_with_json_output() {
    let (api, mock) = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.yaml");
    std::fs::write(&path, "spec:\n  config:\n    command: [echo, hi]\n").unwrap();
    let args = DeployArgs {
        file: Some(path),
        name: Some("svc".into()),
        desired_stopped: true,
        json: true,
        ..DeployArgs::default()
    };
    let mut out = Vec::new();
    deploy(&api, &args, &mut out).await.unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["id"], ID_NEW);
    assert_eq!(v["desired_state"], "STOPPED");
    let rec = mock.rec.lock().unwrap();
    assert_eq!(
        rec.posted[0]["specification"]["spec"]["config"]["command"],
        json!(["echo", "hi"])
    );
}

#[tokio::test]
async fn deploy_reports_422_fields_and_exits_1() {
    let (api, _mock) = start_mock().await;
    let args = DeployArgs {
        name: Some("bad".into()),
        command: vec!["x".into()],
        ..DeployArgs::default()
    };
    let mut out = Vec::new();
    let err = deploy(&api, &args, &mut out).await.unwrap_err();
    assert!(out.is_empty());
    let mut stderr = Vec::new();
    assert_eq!(finish(Err(err), &mut stderr), Exit::Failure);
    assert_eq!(
        text(stderr),
        "specification.spec.config.command: Field required\n\
         name: String should have at most 200 characters\n"
    );
}

#[tokio::test]
async fn deploy_missing_file_is_a_clear_error() {
    let (api, mock) = start_mock().await;
    let args = DeployArgs {
        file: Some("/nonexistent/spec.json".into()),
        name: Some("x".into()),
        ..DeployArgs::default()
    };
    let err = deploy(&api, &args, &mut Vec::new()).await.unwrap_err();
    assert!(matches!(err, ClientError::SpecFile { .. }), "{err:?}");
    assert!(err.to_string().starts_with("/nonexistent/spec.json: "));
    assert!(mock.rec.lock().unwrap().posted.is_empty());
}

#[tokio::test]
async fn stop_start_rm_resolve_prefixes() {
    let (api, mock) = start_mock().await;

    let mut out = Vec::new();
    assert_eq!(stop(&api, "aaaa1", &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(start(&api, "bbbb", &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(rm(&api, ID_BATCH, &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(text(out), format!("{ID_WEB}\n{ID_GPU}\n{ID_BATCH}\n"));

    let err = start(&api, "aaaa", &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.exit(), Exit::Usage);
    assert!(err.to_string().contains(ID_WEB) && err.to_string().contains(ID_BATCH));

    let err = rm(&api, "zzz", &mut Vec::new()).await.unwrap_err();
    assert!(matches!(err, ClientError::NoSuchDeployment(_)));
    assert_eq!(err.exit(), Exit::Failure);

    // A full-length id is not resolved locally: the server's 404 comes through.
    let unknown = "dddd0000-0000-0000-0000-000000000000";
    let err = rm(&api, unknown, &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.to_string(), "Deployment not found (HTTP 404)");

    let rec = mock.rec.lock().unwrap();
    assert_eq!(
        rec.patched,
        [
            (ID_WEB.to_owned(), json!({"desired_state": "STOPPED"})),
            (ID_GPU.to_owned(), json!({"desired_state": "RUNNING"})),
        ]
    );
    assert_eq!(rec.deleted, [ID_BATCH]);
}

#[tokio::test]
async fn every_id_argument_takes_a_name() {
    let (api, mock) = start_mock().await;
    let mut out = Vec::new();
    assert_eq!(stop(&api, "web", &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(start(&api, "gpu-job", &mut out).await.unwrap(), Exit::Ok);
    assert_eq!(rm(&api, "batch", &mut out).await.unwrap(), Exit::Ok);
    let args = LogsArgs {
        id: "web".into(),
        follow: false,
        ..LogsArgs::default()
    };
    logs_until(&api, &args, &mut Vec::new(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(text(out), format!("{ID_WEB}\n{ID_GPU}\n{ID_BATCH}\n"));
    let rec = mock.rec.lock().unwrap();
    assert_eq!(
        rec.patched,
        [
            (ID_WEB.to_owned(), json!({"desired_state": "STOPPED"})),
            (ID_GPU.to_owned(), json!({"desired_state": "RUNNING"})),
        ]
    );
    assert_eq!(rec.deleted, [ID_BATCH]);
    assert_eq!(rec.ws_queries[0].0, ID_WEB);
}

#[tokio::test]
async fn logs_without_follow_prints_only_the_backlog() {
    let (api, mock) = start_mock().await;
    let args = LogsArgs {
        id: "aaaa1".into(),
        follow: false,
        tail: Some(50),
        streams: vec!["stdout,stderr".into(), "system".into()],
    };
    let mut out = Vec::new();
    let exit = logs_until(&api, &args, &mut out, std::future::pending())
        .await
        .unwrap();
    assert_eq!(exit, Exit::Ok);
    assert_eq!(
        text(out),
        "2023-11-14T22:13:20.000Z [stdout] hello\n\
         2023-11-14T22:13:20.500Z [stderr] warn\n"
    );
    let rec = mock.rec.lock().unwrap();
    assert_eq!(rec.ws_queries.len(), 1);
    let (id, q) = &rec.ws_queries[0];
    assert_eq!(id, ID_WEB);
    assert_eq!(q["tail"], "50");
    assert_eq!(q["streams"], "stdout,stderr,system");
}

#[tokio::test]
async fn logs_follow_prints_until_the_server_closes() {
    let (api, mock) = start_mock().await;
    let args = LogsArgs {
        id: ID_WEB.into(),
        follow: true,
        ..LogsArgs::default()
    };
    let mut out = Vec::new();
    logs_until(&api, &args, &mut out, std::future::pending())
        .await
        .unwrap();
    let out = text(out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2], "2023-11-14T22:13:21.000Z [system] restarted");
    // No query parameters when none were asked for.
    assert!(mock.rec.lock().unwrap().ws_queries[0].1.is_empty());
}

#[tokio::test]
async fn logs_error_frame_is_an_error() {
    let (api, _mock) = start_mock().await;
    let args = LogsArgs {
        id: "bbbb".into(),
        follow: true,
        ..LogsArgs::default()
    };
    let mut out = Vec::new();
    let err = logs_until(&api, &args, &mut out, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "log stream: Deployment not assigned");
    assert_eq!(err.exit(), Exit::Failure);
    assert!(out.is_empty());
}

#[tokio::test]
async fn logs_of_a_silent_deployment_end_quietly() {
    let (api, _mock) = start_mock().await;
    // Without follow: the backlog wait runs out.
    let args = LogsArgs {
        id: ID_BATCH.into(),
        ..LogsArgs::default()
    };
    let mut out = Vec::new();
    let exit = logs_inner(
        &api,
        &args,
        &mut out,
        std::future::pending(),
        Duration::from_millis(50),
    )
    .await
    .unwrap();
    assert_eq!(exit, Exit::Ok);
    assert!(out.is_empty());

    // With follow: only the stop signal ends it.
    let args = LogsArgs {
        follow: true,
        ..args
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tx.send(()).unwrap();
    let exit = logs_until(&api, &args, &mut out, async {
        let _ = rx.await;
    })
    .await
    .unwrap();
    assert_eq!(exit, Exit::Ok);
    assert!(out.is_empty());
}

#[tokio::test]
async fn unreachable_conductor_has_a_clear_message() {
    let api = dead_api().await;
    let expected = format!("cannot reach the conductor at {api}: is `symphony dev` running?");
    let err = ps(&api, false, false, &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.to_string(), expected);
    assert_eq!(err.exit(), Exit::Failure);
    let err = nodes(&api, false, &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.to_string(), expected);
    // A full id skips the listing, so this reaches the WebSocket connect.
    let args = LogsArgs {
        id: ID_WEB.into(),
        ..LogsArgs::default()
    };
    let err = logs_until(&api, &args, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), expected);
}
