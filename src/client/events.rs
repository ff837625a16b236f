//! `symphony events`: the conductor's events log, one line each (`<time> <kind> <object>
//! <message>`); with `--follow` it keeps printing new ones and, when the connection drops (a
//! conductor restart), reconnects from the last id it printed, so nothing is missed or repeated.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use futures_util::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use super::{Client, ClientError, Exit, ws_error};

/// The longest wait between two reconnect attempts of `--follow`.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// What `symphony events` shows.
#[derive(Debug, Clone, Default)]
pub struct EventsArgs {
    /// Keep following new events.
    pub follow: bool,
    /// Only this deployment's (id, id prefix or name).
    pub deployment: Option<String>,
    /// Only this node's.
    pub node: Option<String>,
    /// Only this kind, or a family (`deployment`).
    pub kind: Option<String>,
    /// How many past events first.
    pub limit: u32,
    /// One JSON object per line instead of text.
    pub json: bool,
}

/// One event as the API returns it.
pub use crate::conductor::events::Event;

#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(default)]
    events: Vec<Value>,
    #[serde(default)]
    error: Option<String>,
    /// Events after `after` and before `before` that retention dropped.
    #[serde(default)]
    pruned: Option<Pruned>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Pruned {
    after: u64,
    before: u64,
}

/// `<RFC3339 time> <kind> <object> <message>`, a deployment's id shortened.
pub fn format_event(e: &Event) -> String {
    let time = DateTime::from_timestamp_millis(e.at_ms).map_or_else(
        || e.at_ms.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    );
    let object = match e.object.split_once('/') {
        Some(("deployment", id)) => format!("deployment/{}", super::render::short_id(id)),
        _ => e.object.clone(),
    };
    format!("{time} {:<26} {object:<24} {}", e.kind, e.message)
}

/// `symphony events`; runs until Ctrl-C with `follow`.
pub async fn events(
    api: &str,
    args: &EventsArgs,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    events_until(api, args, out, super::ctrl_c()).await
}

/// [`events`] with an explicit stop signal instead of Ctrl-C (for embedding and tests).
pub async fn events_until(
    api: &str,
    args: &EventsArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let object = match (&args.deployment, &args.node) {
        (Some(_), Some(_)) => {
            return Err(ClientError::Usage(
                "give --deployment or --node, not both".into(),
            ));
        }
        (Some(d), None) => Some(format!("deployment/{}", client.resolve_id(d).await?)),
        (None, Some(n)) => Some(format!("node/{n}")),
        (None, None) => None,
    };
    let mut query = vec![("limit", args.limit.clamp(1, 1000).to_string())];
    if let Some(o) = &object {
        query.push(("object", o.clone()));
    }
    if let Some(k) = &args.kind {
        query.push(("kind", k.clone()));
    }
    // Following starts after the newest event of all as of now (read first: whatever comes
    // after it, matching or not, is followed).
    let newest = if args.follow {
        let newest: Vec<Value> = client
            .request(Method::GET, &["events"], &[("limit", "1".into())], None)
            .await?;
        newest.first().and_then(|e| e["id"].as_u64()).unwrap_or(0)
    } else {
        0
    };
    let past: Vec<Value> = client
        .request(Method::GET, &["events"], &query, None)
        .await?;
    let Printed { last, closed } = print(out, &past, args.json)?;
    if !args.follow || closed {
        return Ok(Exit::Ok);
    }
    // The history may have reached past `newest` (events since): go on from what was printed.
    let mut last = last.unwrap_or(0).max(newest);
    let mut stop = std::pin::pin!(stop);
    let mut wait = Duration::from_millis(100);
    loop {
        let mut query = vec![("after", last.to_string())];
        query.extend(object.iter().map(|o| ("object", o.clone())));
        query.extend(args.kind.iter().map(|k| ("kind", k.clone())));
        let url = client.ws_url(&["ws", "events"], &query)?;
        let connected = tokio::select! {
            c = client.ws_connect(&url) => c.map(|ws| (ws, ())),
            () = &mut stop => return Ok(Exit::Ok),
        };
        match connected {
            Ok((mut ws, _)) => {
                let ended = loop {
                    let next = tokio::select! {
                        m = ws.next() => m,
                        () = &mut stop => {
                            let _ = ws.close(None).await;
                            return Ok(Exit::Ok);
                        }
                    };
                    let text = match next {
                        None | Some(Ok(tungstenite::Message::Close(_)) | Err(_)) => break Ok(()),
                        Some(Ok(tungstenite::Message::Text(t))) => t.as_str().to_owned(),
                        Some(Ok(_)) => continue,
                    };
                    let frame: Frame = serde_json::from_str(&text)
                        .map_err(|e| ClientError::Decode(format!("event frame: {e}")))?;
                    if let Some(error) = frame.error {
                        break Err(ClientError::Usage(error));
                    }
                    if let Some(p) = &frame.pruned {
                        // Said, not skipped: the reader knows what it cannot have.
                        let line = if args.json {
                            serde_json::json!({ "pruned": p }).to_string()
                        } else {
                            format!(
                                "# events {}..{} were dropped by retention before they could be shown (conductor.events_keep, events_max_age_sec; some may not have matched the filter)",
                                p.after.saturating_add(1),
                                p.before.saturating_sub(1)
                            )
                        };
                        if writeln!(out, "{line}").is_err() {
                            let _ = ws.close(None).await;
                            return Ok(Exit::Ok);
                        }
                    }
                    // Connected for real: the next drop starts the backoff afresh.
                    wait = Duration::from_millis(100);
                    let printed = print(out, &frame.events, args.json)?;
                    if let Some(id) = printed.last {
                        last = id;
                    }
                    if printed.closed {
                        let _ = ws.close(None).await;
                        return Ok(Exit::Ok);
                    }
                };
                ended?;
            }
            // Not there (yet, or any more): the conductor may be restarting.
            Err(e) => match ws_error(api, e) {
                ClientError::Unreachable { .. } | ClientError::Transport(_) => {}
                other => return Err(other),
            },
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => return Ok(Exit::Ok),
        }
        wait = (wait * 2).min(MAX_RECONNECT_WAIT);
    }
}

/// What [`print`] did.
struct Printed {
    /// The last id printed.
    last: Option<u64>,
    /// The reader went away (`symphony events -f | head`): a normal end.
    closed: bool,
}

/// Prints events.
fn print(out: &mut impl Write, events: &[Value], json: bool) -> Result<Printed, ClientError> {
    let mut last = None;
    for v in events {
        let e: Event = serde_json::from_value(v.clone())
            .map_err(|e| ClientError::Decode(format!("event: {e}")))?;
        let line = if json {
            v.to_string()
        } else {
            format_event(&e)
        };
        match writeln!(out, "{line}") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Ok(Printed { last, closed: true });
            }
            Err(e) => return Err(e.into()),
        }
        last = Some(e.id);
    }
    match out.flush() {
        Ok(()) => Ok(Printed {
            last,
            closed: false,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Printed { last, closed: true }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_has_time_kind_short_object_and_message() {
        let e = Event {
            id: 7,
            at_ms: 0,
            kind: "deployment.exited".into(),
            object: "deployment/0123456789abcdef0123456789abcdef".into(),
            message: "web: exited with code 1".into(),
            fields: serde_json::Value::Null,
        };
        let line = format_event(&e);
        assert!(
            line.starts_with("1970-01-01T00:00:00.000Z deployment.exited"),
            "{line}"
        );
        assert!(line.contains("deployment/01234567 "), "{line}");
        assert!(line.ends_with("web: exited with code 1"), "{line}");
    }
}
