//! Turns what the core sees into events (see [`crate::conductor::events`]): pure functions
//! from a before and an after to the events between them.

use serde_json::{Value, json};

use crate::conductor::events::{NewEvent, object};
use crate::model::CurrentState;
use crate::node::runner::describe_exit;
use crate::wire;

/// A deployment's event.
pub(super) fn deployment(kind: &'static str, id: &str, message: String, fields: Value) -> NewEvent {
    NewEvent::new(kind, object("deployment", id), message, fields)
}

/// A node's event.
pub(super) fn node(kind: &'static str, id: &str, message: String, fields: Value) -> NewEvent {
    NewEvent::new(kind, object("node", id), message, fields)
}

/// An env's event.
pub(super) fn env(kind: &'static str, name: &str, message: String, fields: Value) -> NewEvent {
    NewEvent::new(kind, object("env", name), message, fields)
}

/// Whether a task's own events already tell what `e` would about the task's deployment:
/// its process's start and end (a task writes `task.started` when placed, and its end with
/// the exit code).
pub(super) fn told_by_task(e: &NewEvent) -> bool {
    matches!(
        e.kind,
        "deployment.started" | "deployment.exited" | "deployment.stopped"
    )
}

/// Whether a report says a process runs or is about to.
fn was_active(s: &wire::DeploymentStatus) -> bool {
    matches!(
        CurrentState::from_wire(&s.state),
        CurrentState::Running
            | CurrentState::Starting
            | CurrentState::Stopping
            | CurrentState::Backoff
    )
}

/// An experiment's event.
pub(super) fn experiment(
    kind: &'static str,
    name: &str,
    message: String,
    fields: Value,
) -> NewEvent {
    NewEvent::new(kind, object("experiment", name), message, fields)
}

/// The events between two reports of one deployment's generation on `node_id` (`prev`:
/// `None` for the first report of a generation). Starts and exits are found by their
/// timestamps, not by the state, so a start and exit that fell between two reports (the node
/// sends the latest status) still show.
pub(super) fn status(
    name: &str,
    node_id: &str,
    prev: Option<&wire::DeploymentStatus>,
    st: &wire::DeploymentStatus,
) -> Vec<NewEvent> {
    let id = st.deployment_id.as_str();
    let base = |extra: Value| {
        let mut f = json!({"name": name, "node": node_id, "generation": st.generation});
        if let (Some(f), Value::Object(extra)) = (f.as_object_mut(), extra) {
            f.extend(extra);
        }
        f
    };
    let mut out = Vec::new();
    let changed = |f: fn(&wire::DeploymentStatus) -> Option<i64>| {
        f(st).is_some() && prev.is_none_or(|p| f(p) != f(st))
    };
    let started = changed(|s| s.started_at_ms);
    let stopped = changed(|s| s.stopped_at_ms);
    // An exit that belongs to the process before the one that started now comes first.
    let exit_first = stopped && st.stopped_at_ms < st.started_at_ms;
    let exit_event = || {
        let code = st.last_exit_code;
        let how = code.map_or_else(|| "exited (status unknown)".to_owned(), describe_exit);
        deployment(
            "deployment.exited",
            id,
            format!("{name} exited: {how}"),
            base(json!({"exit_code": code, "signal": code.filter(|c| *c < 0).map(|c| -c)})),
        )
    };
    if exit_first {
        out.push(exit_event());
    }
    if started {
        let pid = st.pid;
        out.push(deployment(
            "deployment.started",
            id,
            match pid {
                Some(pid) => format!("{name} started on {node_id} (pid {pid})"),
                None => format!("{name} started on {node_id}"),
            },
            base(json!({"pid": pid})),
        ));
    }
    if stopped && !exit_first {
        out.push(exit_event());
    }
    let count = |f: fn(&wire::DeploymentStatus) -> u32| f(st).saturating_sub(prev.map_or(0, f));
    if count(|s| s.health_failures) > 0 {
        out.push(deployment(
            "deployment.unhealthy",
            id,
            format!("{name}: health check failed: {}", st.reason),
            base(json!({"reason": st.reason, "health_failures": st.health_failures})),
        ));
    }
    if st.healthy == Some(true) && prev.is_some_and(|p| p.healthy == Some(false)) {
        out.push(deployment(
            "deployment.recovered",
            id,
            format!("{name}: health check passes again"),
            base(json!({"health_failures": st.health_failures})),
        ));
    }
    if count(|s| s.cron_restarts) > 0 {
        out.push(deployment(
            "deployment.scheduled_restart",
            id,
            format!("{name}: scheduled restart"),
            base(json!({"cron_restarts": st.cron_restarts})),
        ));
    }
    let state_changed = prev.is_none_or(|p| p.state != st.state)
        || (st.state == CurrentState::Backoff.as_str() && count(|s| s.restart_count) > 0);
    if state_changed {
        match CurrentState::from_wire(&st.state) {
            CurrentState::Backoff => {
                let in_ms = st
                    .restart_at_ms
                    .map(|at| at.saturating_sub(crate::time::now_ms()).max(0));
                let when = in_ms.map_or_else(String::new, |ms| {
                    #[allow(clippy::cast_precision_loss)]
                    let s = ms as f64 / 1000.0;
                    format!(" in {s:.1} s")
                });
                out.push(deployment(
                    "deployment.restarting",
                    id,
                    format!(
                        "{name}: restarting{when} (attempt {}): {}",
                        st.restart_count, st.reason
                    ),
                    base(json!({
                        "attempt": st.restart_count,
                        "in_ms": in_ms,
                        "reason": st.reason,
                    })),
                ));
            }
            CurrentState::Failed => out.push(deployment(
                "deployment.failed",
                id,
                format!("{name} FAILED: {}", st.reason),
                base(json!({"reason": st.reason, "restarts": st.restart_count})),
            )),
            // Only a stop of something that ran or was about to (stopping a FAILED or EXITED
            // deployment changes nothing on its node).
            CurrentState::Stopped if stopped || prev.is_some_and(was_active) => {
                out.push(deployment(
                    "deployment.stopped",
                    id,
                    format!("{name} stopped on {node_id}"),
                    base(json!({})),
                ))
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn st(state: &str) -> wire::DeploymentStatus {
        wire::DeploymentStatus {
            deployment_id: "d1".into(),
            generation: 3,
            state: state.into(),
            ..Default::default()
        }
    }

    fn kinds(events: &[NewEvent]) -> Vec<&str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_crash_and_restart_between_two_reports_still_shows() {
        let mut a = st("RUNNING");
        a.pid = Some(10);
        a.started_at_ms = Some(100);
        let first = status("web", "n1", None, &a);
        assert_eq!(kinds(&first), ["deployment.started"]);
        assert!(first[0].message.contains("pid 10"), "{}", first[0].message);
        assert_eq!(first[0].object, "deployment/d1");
        assert_eq!(first[0].fields["node"], "n1");

        // Crashed at 200 with SIGKILL, restarted at 300: the node only sent the last state.
        let mut b = a.clone();
        b.pid = Some(11);
        b.stopped_at_ms = Some(200);
        b.last_exit_code = Some(-9);
        b.started_at_ms = Some(300);
        b.restart_count = 1;
        let e = status("web", "n1", Some(&a), &b);
        assert_eq!(kinds(&e), ["deployment.exited", "deployment.started"]);
        assert_eq!(e[0].fields["signal"], 9);
        assert!(e[1].message.contains("pid 11"));
        // The same report again says nothing.
        assert!(status("web", "n1", Some(&b), &b).is_empty());
    }

    #[test]
    fn backoff_failure_stop_health_and_cron() {
        let mut run = st("RUNNING");
        run.started_at_ms = Some(100);
        let mut back = run.clone();
        back.state = "BACKOFF".into();
        back.stopped_at_ms = Some(150);
        back.last_exit_code = Some(3);
        back.restart_count = 2;
        back.reason = "exit code 3".into();
        back.restart_at_ms = Some(crate::time::now_ms() + 4_000);
        let e = status("job", "n1", Some(&run), &back);
        assert_eq!(kinds(&e), ["deployment.exited", "deployment.restarting"]);
        assert_eq!(e[0].fields["exit_code"], 3);
        assert_eq!(e[1].fields["attempt"], 2);
        assert!(e[1].message.contains("attempt 2"), "{}", e[1].message);
        assert!(e[1].fields["in_ms"].as_i64().unwrap() > 3_000);

        let mut failed = back.clone();
        failed.state = "FAILED".into();
        failed.reason = "too many restarts".into();
        let e = status("job", "n1", Some(&back), &failed);
        assert_eq!(kinds(&e), ["deployment.failed"]);
        assert!(e[0].message.contains("too many restarts"));

        let mut sick = run.clone();
        sick.health_failures = 1;
        sick.healthy = Some(false);
        sick.state = "BACKOFF".into();
        sick.restart_count = 1;
        let e = status("job", "n1", Some(&run), &sick);
        assert_eq!(kinds(&e), ["deployment.unhealthy", "deployment.restarting"]);
        let mut well = sick.clone();
        well.state = "RUNNING".into();
        well.started_at_ms = Some(500);
        well.healthy = Some(true);
        let e = status("job", "n1", Some(&sick), &well);
        assert_eq!(kinds(&e), ["deployment.started", "deployment.recovered"]);

        let mut cron = run.clone();
        cron.cron_restarts = 1;
        cron.stopped_at_ms = Some(600);
        cron.started_at_ms = Some(700);
        let e = status("job", "n1", Some(&run), &cron);
        assert_eq!(
            kinds(&e),
            [
                "deployment.exited",
                "deployment.started",
                "deployment.scheduled_restart"
            ]
        );

        let mut stopped = run.clone();
        stopped.state = "STOPPED".into();
        stopped.stopped_at_ms = Some(800);
        stopped.last_exit_code = Some(-15);
        let e = status("job", "n1", Some(&run), &stopped);
        assert_eq!(kinds(&e), ["deployment.exited", "deployment.stopped"]);
        // Stopping what had failed already says nothing.
        let mut stopped_failed = failed.clone();
        stopped_failed.state = "STOPPED".into();
        assert!(status("job", "n1", Some(&failed), &stopped_failed).is_empty());
        // A fresh STOPPED generation that never ran says nothing.
        assert!(status("job", "n1", None, &st("STOPPED")).is_empty());
    }
}
