//! `/ws/updates`: the cluster's live state.
//!
//! Two kinds of frames. The original's, kept as its default: a `snapshot` (the newest 500
//! deployments and every node) at once and after every change. With `?frames=delta` (what the
//! web UI asks for), the first frame is a snapshot of every deployment, and each later one is a
//! `delta`: the deployments and nodes that changed or went, and the order of deployments when
//! it changed. A page with 1 000 deployments then receives and renders only what moved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::Uri;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{ApiState, SHUTTING_DOWN, close, close_code, query_params, refuse_with};
use crate::conductor::view::ClusterView;

/// What one snapshot carries in the original's frames.
const SNAPSHOT_CAP: usize = 500;
/// At most 4 frames a second.
const PACE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frames {
    Snapshot,
    Delta,
}

fn frames(uri: &Uri) -> Result<Frames, String> {
    let params = query_params(uri, &["frames"]).map_err(|errs| {
        errs.iter()
            .map(|e| format!("{}: {}", e.loc.last().map_or("", String::as_str), e.msg))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    match params.get("frames").map(String::as_str) {
        None | Some("snapshot") => Ok(Frames::Snapshot),
        Some("delta") => Ok(Frames::Delta),
        Some(other) => Err(format!(
            "frames: expected \"snapshot\" or \"delta\", got {other:?}"
        )),
    }
}

fn snapshot(view: &ClusterView, cap: usize) -> String {
    json!({
        "type": "snapshot",
        "deployments": view.deployments.iter().take(cap).collect::<Vec<_>>(),
        "nodes": view.nodes,
    })
    .to_string()
}

/// The delta from `old` to `new`, or `None` when nothing a page shows changed.
fn delta(old: &ClusterView, new: &ClusterView) -> Option<String> {
    let before: HashMap<&str, _> = old.deployments.iter().map(|d| (d.id.as_str(), d)).collect();
    let upserts: Vec<_> = new
        .deployments
        .iter()
        .filter(|d| {
            before
                .get(d.id.as_str())
                .is_none_or(|b| !Arc::ptr_eq(b, d) && ***b != ***d)
        })
        .collect();
    let same_order = old.deployments.len() == new.deployments.len()
        && old
            .deployments
            .iter()
            .zip(&new.deployments)
            .all(|(a, b)| a.id == b.id);
    let mut removed: Vec<&str> = Vec::new();
    if !same_order {
        let now: std::collections::HashSet<&str> =
            new.deployments.iter().map(|d| d.id.as_str()).collect();
        removed = before
            .keys()
            .filter(|id| !now.contains(*id))
            .copied()
            .collect();
    }
    let mut nodes = Map::new();
    for (id, n) in &new.nodes {
        if old.nodes.get(id) != Some(n) {
            nodes.insert(id.clone(), serde_json::to_value(n).unwrap_or(Value::Null));
        }
    }
    let gone: Vec<&String> = old
        .nodes
        .keys()
        .filter(|id| !new.nodes.contains_key(*id))
        .collect();
    if upserts.is_empty() && same_order && nodes.is_empty() && gone.is_empty() {
        return None;
    }
    let mut frame = json!({
        "type": "delta",
        "deployments": upserts,
        "removed_deployments": removed,
        "nodes": nodes,
        "removed_nodes": gone,
    });
    if !same_order {
        frame["order"] = new.deployments.iter().map(|d| d.id.as_str()).collect();
    }
    Some(frame.to_string())
}

pub(super) async fn ws(State(st): State<ApiState>, uri: Uri, ws: WebSocketUpgrade) -> Response {
    let kind = frames(&uri);
    let token = st.sockets.token();
    ws.on_upgrade(move |socket| async move {
        let _tracked = token;
        match kind {
            Ok(kind) => follow(socket, st, kind).await,
            Err(reason) => {
                let frame = json!({"type": "error", "error": reason});
                refuse_with(socket, &frame, &reason).await;
            }
        }
    })
}

/// Pushes a frame at once and then on every change (at most 4 per second); at shutdown it
/// closes with 1001.
async fn follow(mut socket: WebSocket, st: ApiState, kind: Frames) {
    let mut rx = st.core.subscribe();
    let mut sent: Option<Arc<ClusterView>> = None;
    loop {
        let view = rx.borrow_and_update().clone();
        let frame = match (kind, &sent) {
            (Frames::Snapshot, _) => Some(snapshot(&view, SNAPSHOT_CAP)),
            (Frames::Delta, None) => Some(snapshot(&view, usize::MAX)),
            (Frames::Delta, Some(old)) => delta(old, &view),
        };
        if let Some(frame) = frame {
            if socket.send(Message::Text(frame.into())).await.is_err() {
                return;
            }
            sent = Some(view);
        }
        // Wait for a change; client messages (pings, text) are read and ignored.
        loop {
            tokio::select! {
                biased;
                () = st.cancel.cancelled() => {
                    return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
                }
                changed = rx.changed() => if changed.is_err() {
                    // The core is gone: the conductor is stopping.
                    return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
                } else {
                    break;
                },
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
            }
        }
        tokio::select! {
            biased;
            () = st.cancel.cancelled() => {
                return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
            }
            () = tokio::time::sleep(PACE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Deployment, DesiredState, Node};

    fn dep(id: &str, name: &str, created: i64) -> Arc<Deployment> {
        Arc::new(Deployment {
            id: id.into(),
            name: name.into(),
            desired_state: DesiredState::Running,
            created_at_ms: created,
            ..Deployment::default()
        })
    }

    fn parse(frame: Option<String>) -> Value {
        serde_json::from_str(&frame.unwrap_or_default()).unwrap_or(Value::Null)
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let a = dep("a", "a", 2);
        let b = dep("b", "b", 1);
        let mut old = ClusterView {
            deployments: vec![a.clone(), b.clone()],
            ..ClusterView::default()
        };
        old.nodes.insert("n1".into(), Node::default());
        // Rebuilt but equal: nothing to send.
        let mut same = old.clone();
        same.deployments = vec![dep("a", "a", 2), dep("b", "b", 1)];
        assert_eq!(delta(&old, &same), None);

        // One renamed: only it, and no order.
        let mut renamed = old.clone();
        renamed.deployments = vec![a.clone(), dep("b", "b2", 1)];
        let f = parse(delta(&old, &renamed));
        assert_eq!(f["type"], "delta");
        assert_eq!(f["deployments"].as_array().map(Vec::len), Some(1));
        assert_eq!(f["deployments"][0]["name"], "b2");
        assert!(f.get("order").is_none(), "{f}");
        assert_eq!(f["nodes"], json!({}));

        // One created and one deleted: the new one, the removed id and the order.
        let mut moved = old.clone();
        moved.deployments = vec![dep("c", "c", 3), a];
        moved.nodes.clear();
        moved.nodes.insert("n2".into(), Node::default());
        let f = parse(delta(&old, &moved));
        assert_eq!(f["deployments"][0]["id"], "c");
        assert_eq!(f["removed_deployments"], json!(["b"]));
        assert_eq!(f["order"], json!(["c", "a"]));
        assert_eq!(f["removed_nodes"], json!(["n1"]));
        assert!(f["nodes"].get("n2").is_some(), "{f}");

        // One deleted and one created, the count unchanged: still a removal and an order.
        let mut swapped = old.clone();
        swapped.deployments = vec![dep("c", "c", 3), b];
        let f = parse(delta(&old, &swapped));
        assert_eq!(f["removed_deployments"], json!(["a"]), "{f}");
        assert_eq!(f["order"], json!(["c", "b"]), "{f}");
    }

    #[test]
    fn the_frames_parameter_is_checked() {
        let uri = |q: &str| q.parse::<Uri>().unwrap_or_default();
        assert_eq!(frames(&uri("/ws/updates")), Ok(Frames::Snapshot));
        assert_eq!(frames(&uri("/ws/updates?frames=delta")), Ok(Frames::Delta));
        assert!(
            frames(&uri("/ws/updates?frames=diff"))
                .is_err_and(|e| e.contains("frames") && e.contains("diff"))
        );
    }
}
