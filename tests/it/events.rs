//! The events log end to end: a deployment's story in order, node events, filters and bad
//! queries, and `symphony events -f` over `/ws/events` across a conductor restart.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use symphony::client::events::{EventsArgs, events_until};

use crate::support::{Cluster, sh};

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["kind"].as_str()).collect()
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["id"].as_u64()).collect()
}

/// `kinds` holds `want` in this order (other kinds may come between).
fn in_order(kinds: &[&str], want: &[&str]) -> bool {
    let mut it = kinds.iter();
    want.iter().all(|w| it.any(|k| k == w))
}

#[tokio::test]
async fn a_crash_loop_tells_its_story_in_order_and_outlives_the_deployment() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let spec = json!({"config": {"command": ["sh", "-c", "exit 3"]},
        "restart_policy": {"type": "on-failure", "backoff_seconds": 0.01}, "max_restarts": 2, "restart_window_sec": 60});
    let id = c.deploy("crasher", spec).await;
    let q = format!("object=deployment/{id}&after=0");
    let story = c
        .wait_events(&q, "crasher FAILED", |e| {
            kinds(e).contains(&"deployment.failed")
        })
        .await;
    let k = kinds(&story);
    let want = [
        "deployment.created",
        "deployment.placed",
        "deployment.started",
        "deployment.exited",
        "deployment.restarting",
        "deployment.started",
        "deployment.exited",
        "deployment.restarting",
        "deployment.started",
        "deployment.exited",
        "deployment.failed",
    ];
    assert!(in_order(&k, &want), "{k:?}");
    let placed = story
        .iter()
        .find(|e| e["kind"] == "deployment.placed")
        .unwrap();
    assert_eq!(placed["fields"]["node"], "n1");
    assert!(
        placed["fields"]["why"].as_str().unwrap().contains("spread"),
        "{placed}"
    );
    let exited = story
        .iter()
        .find(|e| e["kind"] == "deployment.exited")
        .unwrap();
    assert_eq!(exited["fields"]["exit_code"], 3);
    assert!(
        exited["message"].as_str().unwrap().contains("status 3"),
        "{exited}"
    );
    let restarting: Vec<&Value> = story
        .iter()
        .filter(|e| e["kind"] == "deployment.restarting")
        .collect();
    assert_eq!(restarting[0]["fields"]["attempt"], 1);
    assert_eq!(restarting[1]["fields"]["attempt"], 2);
    let started = story
        .iter()
        .find(|e| e["kind"] == "deployment.started")
        .unwrap();
    assert!(started["fields"]["pid"].as_u64().is_some(), "{started}");
    let failed = story.last().unwrap();
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("max_restarts=2"),
        "{failed}"
    );
    let i = ids(&story);
    assert!(i.windows(2).all(|w| w[0] < w[1]), "{i:?}");

    // The per-deployment route and the kind filter agree with the log.
    let (status, mine) = c.get(&format!("/deployments/{id}/events?after=0")).await;
    assert_eq!(status, 200);
    assert_eq!(ids(mine.as_array().unwrap()), i);
    let (_, exits) = c
        .get(&format!(
            "/deployments/{id}/events?after=0&kind=deployment.exited"
        ))
        .await;
    assert_eq!(exits.as_array().unwrap().len(), 3, "{exits}");
    let (_, newest) = c.get(&format!("/deployments/{id}/events?limit=2")).await;
    assert_eq!(ids(newest.as_array().unwrap()), i[i.len() - 2..]);

    // Stop-free delete: the story ends with it and stays readable.
    assert_eq!(c.delete(&format!("/deployments/{id}")).await.0, 204);
    let story = c
        .wait_events(&q, "deleted", |e| {
            kinds(e).last() == Some(&"deployment.deleted")
        })
        .await;
    assert!(story.len() > want.len());

    // The node's side.
    let (_, node) = c.get("/nodes/n1/events?after=0").await;
    let nk = kinds(node.as_array().unwrap());
    assert_eq!(nk.first(), Some(&"node.connected"), "{nk:?}");
    assert_eq!(
        node[0]["fields"]["address"]
            .as_str()
            .map(|a| a.contains("127.0.0.1")),
        Some(true),
        "{node}"
    );
    let (_, family) = c.get("/events?after=0&object=node").await;
    assert_eq!(
        ids(family.as_array().unwrap()),
        ids(node.as_array().unwrap())
    );

    // Bad queries name the parameter.
    for (q, field) in [
        ("after=-1", "after"),
        ("after=x", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("kind=", "kind"),
        ("after=1&after=2", "after"),
    ] {
        let (status, body) = c.get(&format!("/events?{q}")).await;
        assert_eq!(status, 422, "{q}: {body}");
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["query", field]),
            "{q}: {body}"
        );
    }
    c.shutdown().await;
}

/// A writer the test can read while `events_until` holds it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn ids(&self) -> Vec<u64> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }
}

#[tokio::test]
async fn following_events_survives_a_conductor_restart_without_gaps_or_repeats() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let a = c.deploy("before", sh("sleep 1000")).await;
    c.wait_state(&a, "RUNNING").await;

    let out = Shared::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = {
        let api = c.api.clone();
        let mut out = out.clone();
        tokio::spawn(async move {
            let args = EventsArgs {
                follow: true,
                limit: 1000,
                json: true,
                ..EventsArgs::default()
            };
            events_until(&api, &args, &mut out, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    // It printed the history so far.
    let past = c
        .wait_events("after=0&limit=1000", "a started", |e| {
            kinds(e).contains(&"deployment.started")
        })
        .await;
    let before = ids(&past);
    crate::support::until("history printed", || out.ids().len() >= before.len()).await;

    c.restart_conductor().await;
    // What a restarted conductor finds is not news: only the node's connection is.
    let high = *before.last().unwrap();
    let resumed = c
        .wait_events(&format!("after={high}"), "n1 connected again", |e| {
            kinds(e).contains(&"node.connected")
        })
        .await;
    assert_eq!(kinds(&resumed), ["node.connected"], "{resumed:?}");
    // Events while it reconnects, and after.
    let b = c.deploy("after", sh("sleep 1000")).await;
    c.wait_state(&b, "RUNNING").await;
    assert_eq!(c.delete(&format!("/deployments/{a}")).await.0, 204);
    let all = c
        .wait_events("after=0&limit=1000", "b started, a deleted", |e| {
            kinds(e).contains(&"deployment.deleted")
                && e.iter().any(|e| {
                    e["kind"] == "deployment.started" && e["object"] == format!("deployment/{b}")
                })
        })
        .await;
    let all = ids(&all);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    assert!(
        all.len() > before.len() && all[..before.len()] == before[..],
        "ids after the restart continue the old ones: {all:?}"
    );
    // Nothing the restart merely found was told later either: `a` did not start again, the
    // node did not come "back" or get lost.
    let (_, since) = c.get(&format!("/events?after={high}&limit=1000")).await;
    let since = since.as_array().unwrap();
    for e in since {
        let k = e["kind"].as_str().unwrap();
        assert!(
            !matches!(
                k,
                "node.back" | "node.lost" | "node.suspect" | "deployment.fenced"
            ),
            "{e}"
        );
        if e["object"] == format!("deployment/{a}") {
            assert!(
                matches!(
                    k,
                    "deployment.deleted" | "deployment.exited" | "deployment.stopped"
                ),
                "{e}"
            );
        }
    }
    crate::support::until("the follower caught up", || out.ids().len() >= all.len()).await;
    stop_tx.send(()).unwrap();
    follower.await.unwrap().unwrap();
    // Every event once, in order (later ones, e.g. a node's, may follow).
    let printed = out.ids();
    let (_, end) = c.get("/events?after=0&limit=1000").await;
    let end = ids(end.as_array().unwrap());
    assert!(
        printed.len() >= all.len() && end.starts_with(&printed),
        "{printed:?} vs {end:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn stopping_and_changing_a_spec_tell_how_the_old_process_ended() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("web", sh("sleep 1000")).await;
    c.wait_state(&id, "RUNNING").await;
    let q = format!("object=deployment/{id}&after=0");
    let count = |e: &[Value], k: &str| kinds(e).iter().filter(|x| **x == k).count();

    // A spec change that keeps the request: the same node, a new generation, a new process.
    let (status, _) = c
        .patch(
            &format!("/deployments/{id}"),
            json!({"specification": {"spec": {"config": {"command": ["sh", "-c", "sleep 999"]}}}}),
        )
        .await;
    assert_eq!(status, 200);
    let story = c
        .wait_events(&q, "the new process started", |e| {
            count(e, "deployment.started") == 2
        })
        .await;
    let k = kinds(&story);
    assert!(
        in_order(
            &k,
            &[
                "deployment.created",
                "deployment.placed",
                "deployment.started",
                "deployment.updated",
                "deployment.placed",
                "deployment.started",
            ]
        ),
        "{k:?}"
    );
    // Nothing that did not happen (counters carried over from the old generation).
    for never in [
        "deployment.unhealthy",
        "deployment.scheduled_restart",
        "deployment.failed",
    ] {
        assert_eq!(count(&story, never), 0, "{never}: {k:?}");
    }

    // A stop: the node's reports while its copy stops still tell the story.
    let (status, _) = c
        .patch(
            &format!("/deployments/{id}"),
            json!({"desired_state": "STOPPED"}),
        )
        .await;
    assert_eq!(status, 200);
    let story = c
        .wait_events(&q, "stopped", |e| kinds(e).contains(&"deployment.stopped"))
        .await;
    let k = kinds(&story);
    assert!(
        in_order(
            &k,
            &[
                "deployment.updated",
                "deployment.exited",
                "deployment.stopped"
            ]
        ),
        "{k:?}"
    );
    let updated = story
        .iter()
        .rev()
        .find(|e| e["kind"] == "deployment.updated")
        .unwrap();
    assert_eq!(updated["fields"]["released_from"], "n1", "{updated}");
    let exited = story
        .iter()
        .rev()
        .find(|e| e["kind"] == "deployment.exited")
        .unwrap();
    assert_eq!(exited["fields"]["signal"], 15, "{exited}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_replay_from_before_what_retention_kept_says_what_is_gone() {
    use futures_util::StreamExt;
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("web", sh("sleep 1000")).await;
    c.wait_state(&id, "RUNNING").await;
    let all = c
        .wait_events("after=0", "web started", |e| {
            kinds(e).contains(&"deployment.started")
        })
        .await;
    let newest = *ids(&all).last().unwrap();
    // Retention keeps the newest 2 (the store beside the running conductor, as its pruner does).
    let store = c.open_store().await;
    store.prune_events(2, 0).await.unwrap();
    store.close().await;
    let ws = c.api.replace("http", "ws");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{ws}/ws/events?after=0"))
        .await
        .unwrap();
    let first: Value =
        serde_json::from_str(&socket.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(
        first["pruned"],
        json!({"after": 0, "before": newest - 1}),
        "{first}"
    );
    let second: Value =
        serde_json::from_str(&socket.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(
        ids(second["events"].as_array().unwrap()),
        [newest - 1, newest]
    );
    // From inside what was kept: no such frame.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws}/ws/events?after={}", newest - 2))
            .await
            .unwrap();
    let first: Value =
        serde_json::from_str(&socket.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert!(first.get("pruned").is_none(), "{first}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_failing_health_check_and_its_recovery_are_events() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let mark = c.dir.path().join("healthy");
    let mut spec = sh("sleep 1000");
    spec["health_check"] = json!({"type": "exec",
        "command": ["sh", "-c", format!("test -f {}", mark.display())],
        "period_seconds": 0.05, "initial_delay_seconds": 0, "failure_threshold": 2});
    spec["restart_policy"] = json!({"type": "always", "backoff_seconds": 0.05});
    let id = c.deploy("sick", spec).await;
    let q = format!("object=deployment/{id}&after=0");
    let story = c
        .wait_events(&q, "unhealthy", |e| {
            kinds(e).contains(&"deployment.unhealthy")
        })
        .await;
    let unhealthy = story
        .iter()
        .find(|e| e["kind"] == "deployment.unhealthy")
        .unwrap();
    assert!(
        unhealthy["message"]
            .as_str()
            .unwrap()
            .contains("health check failed"),
        "{unhealthy}"
    );
    assert!(
        !kinds(&story).contains(&"deployment.recovered"),
        "{story:?}"
    );
    // Now the check passes: the next process is healthy again.
    std::fs::write(&mark, b"").unwrap();
    let story = c
        .wait_events(&q, "recovered", |e| {
            kinds(e).contains(&"deployment.recovered")
        })
        .await;
    let k = kinds(&story);
    assert!(
        in_order(
            &k,
            &[
                "deployment.unhealthy",
                "deployment.restarting",
                "deployment.started",
                "deployment.recovered"
            ]
        ),
        "{k:?}"
    );
    assert_eq!(
        k.iter().filter(|x| **x == "deployment.recovered").count(),
        1,
        "{k:?}"
    );
    c.shutdown().await;
}
