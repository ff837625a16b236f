//! The events log over HTTP: `GET /events`, `GET /deployments/{id}/events`,
//! `GET /nodes/{id}/events`, and `/ws/events`, which replays from `after` and then follows
//! live, each event exactly once (see [`crate::conductor::events`] for why that holds).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{
    ApiError, ApiState, PathParam, SHUTTING_DOWN, close, close_code, query_params, refuse_with,
};
use crate::conductor::events::{DEFAULT_LIMIT, Event, Filter, MAX_LIMIT, object};
use crate::spec::{FieldError, Loc, Report};

/// `after`, `object`, `kind` and `limit` from the query string (`object` only where the
/// route does not fix it).
fn filter(uri: &Uri, fixed_object: Option<String>) -> Result<Filter, Vec<FieldError>> {
    let known: &[&str] = if fixed_object.is_some() {
        &["after", "kind", "limit"]
    } else {
        &["after", "object", "kind", "limit"]
    };
    let params = query_params(uri, known)?;
    let mut r = Report::default();
    let mut number = |key: &str, min: u64, max: u64| -> Option<u64> {
        let v = params.get(key)?;
        match v.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                let msg = format!("expected an integer from {min} to {max}, got {v:?}");
                r.err(&Loc::new(&["query", key]), "value_error", msg);
                None
            }
        }
    };
    let after = number("after", 0, i64::MAX.unsigned_abs());
    let limit = number("limit", 1, u64::from(MAX_LIMIT));
    let f = Filter {
        after,
        object: fixed_object.or_else(|| params.get("object").cloned()),
        kind: params.get("kind").cloned(),
        limit: limit.map_or(DEFAULT_LIMIT, |l| u32::try_from(l).unwrap_or(MAX_LIMIT)),
    };
    for (key, value) in [("object", &f.object), ("kind", &f.kind)] {
        if value.as_deref().is_some_and(str::is_empty) {
            r.err(
                &Loc::new(&["query", key]),
                "value_error",
                "must not be empty (leave it out for all)",
            );
        }
    }
    r.finish(Some(f))
}

async fn read(st: &ApiState, f: Result<Filter, Vec<FieldError>>) -> Result<Response, ApiError> {
    let f = f.map_err(ApiError::invalid)?;
    let events = st.core.events().read(&f).await.map_err(|e| {
        tracing::error!(error = %e, "events read failed");
        ApiError::detail(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    Ok(Json(events).into_response())
}

/// `GET /events`.
pub(super) async fn list(State(st): State<ApiState>, uri: Uri) -> Result<Response, ApiError> {
    read(&st, filter(&uri, None)).await
}

/// `GET /deployments/{id}/events` (a deleted deployment's too: its story outlives it).
pub(super) async fn of_deployment(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
    uri: Uri,
) -> Result<Response, ApiError> {
    read(&st, filter(&uri, Some(object("deployment", &id)))).await
}

/// `GET /nodes/{id}/events`.
pub(super) async fn of_node(
    State(st): State<ApiState>,
    PathParam(id): PathParam,
    uri: Uri,
) -> Result<Response, ApiError> {
    read(&st, filter(&uri, Some(object("node", &id)))).await
}

/// `/ws/events?after=ID&object=&kind=`: the stored events after `ID` (none without it), then
/// live ones, in frames `{"events": [...]}`. When retention dropped events after `ID`, a first
/// frame says which: `{"events": [], "pruned": {"after": ID, "before": OLDEST}}`.
pub(super) async fn ws(State(st): State<ApiState>, uri: Uri, ws: WebSocketUpgrade) -> Response {
    let f = filter(&uri, None);
    let token = st.sockets.token();
    ws.on_upgrade(move |socket| async move {
        let _tracked = token;
        match f {
            Ok(f) => follow(socket, st, f).await,
            Err(errors) => {
                let reason = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.loc.last().map_or("", String::as_str), e.msg))
                    .collect::<Vec<_>>()
                    .join("; ");
                let frame = json!({"events": [], "error": reason});
                refuse_with(socket, &frame, &reason).await;
            }
        }
    })
}

async fn send(socket: &mut WebSocket, events: &[&Event]) -> bool {
    #[derive(serde::Serialize)]
    struct Frame<'a> {
        events: &'a [&'a Event],
    }
    let text = serde_json::to_string(&Frame { events }).unwrap_or_default();
    socket.send(Message::Text(text.into())).await.is_ok()
}

/// Sends the stored events after `last` (page by page) and returns the new `last`; `None`
/// when the socket or the store failed.
async fn replay(socket: &mut WebSocket, st: &ApiState, f: &Filter, mut last: u64) -> Option<u64> {
    loop {
        let page = Filter {
            after: Some(last),
            limit: MAX_LIMIT,
            ..f.clone()
        };
        let events = match st.core.events().read(&page).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "events replay failed");
                return None;
            }
        };
        let Some(end) = events.last().map(|e| e.id) else {
            return Some(last);
        };
        if !send(socket, &events.iter().collect::<Vec<_>>()).await {
            return None;
        }
        last = end;
        if events.len() < MAX_LIMIT as usize {
            return Some(last);
        }
    }
}

/// The id of the newest stored event (0 for none).
async fn newest(st: &ApiState) -> Option<u64> {
    let f = Filter {
        limit: 1,
        ..Filter::default()
    };
    match st.core.events().read(&f).await {
        Ok(events) => Some(events.last().map_or(0, |e| e.id)),
        Err(e) => {
            tracing::warn!(error = %e, "events read failed");
            None
        }
    }
}

async fn follow(mut socket: WebSocket, st: ApiState, f: Filter) {
    // Subscribe before reading the store: whatever commits meanwhile is in one or the other,
    // and ids at or below `last` are skipped.
    let mut live = st.core.events().subscribe();
    if let Some(after) = f.after
        && let Ok(Some(oldest)) = st.core.events().oldest().await
        && oldest > after.saturating_add(1)
    {
        // Retention dropped some of what was asked for: say so rather than skip it silently.
        let frame = json!({"events": [], "pruned": {"after": after, "before": oldest}});
        if socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    let start = match f.after {
        Some(after) => replay(&mut socket, &st, &f, after).await,
        // Only what comes next: start at the newest event now.
        None => newest(&st).await,
    };
    let Some(mut last) = start else {
        return close(socket, close_code::GOING_AWAY, "events unavailable").await;
    };
    loop {
        let mut batch: Vec<Arc<Event>> = Vec::new();
        let mut lagged = false;
        tokio::select! {
            biased;
            () = st.cancel.cancelled() => {
                return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
            }
            r = live.recv() => match r {
                Ok(e) => batch.push(e),
                Err(RecvError::Lagged(_)) => lagged = true,
                Err(RecvError::Closed) => {
                    return close(socket, close_code::GOING_AWAY, SHUTTING_DOWN).await;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => continue,
            },
        }
        while !lagged && batch.len() < MAX_LIMIT as usize {
            match live.try_recv() {
                Ok(e) => batch.push(e),
                Err(TryRecvError::Lagged(_)) => {
                    lagged = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let fresh: Vec<&Event> = batch
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| e.id > last)
            .collect();
        if let Some(end) = fresh.last().map(|e| e.id) {
            last = end;
            let wanted: Vec<&Event> = fresh.into_iter().filter(|e| f.matches(e)).collect();
            if !wanted.is_empty() && !send(&mut socket, &wanted).await {
                return;
            }
        }
        if lagged {
            // Too slow for the live feed: events fell out of it; the rest comes from the store.
            live = st.core.events().subscribe();
            match replay(&mut socket, &st, &f, last).await {
                Some(l) => last = l,
                None => {
                    return close(socket, close_code::GOING_AWAY, "events unavailable").await;
                }
            }
        }
    }
}
