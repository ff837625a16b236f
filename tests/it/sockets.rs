//! WebSockets end with a close frame that says why (never a dropped connection, 1006):
//! 1000 when the deployment is deleted, 1001 when the conductor stops, 1008 on a refusal.

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Cluster, DEADLINE, sh};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(c: &Cluster, path: &str) -> Socket {
    let url = format!("{}{path}", c.api.replace("http", "ws"));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text frame, as JSON.
async fn next_json(ws: &mut Socket) -> Value {
    let msg = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("a frame in time")
        .expect("the socket is open")
        .unwrap();
    serde_json::from_str(msg.to_text().unwrap()).unwrap()
}

/// Reads until the close frame and returns its code and reason; text frames before it are
/// returned too.
async fn until_close(ws: &mut Socket) -> (Vec<Value>, u16, String) {
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("the close frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(Some(f)))) => {
                return (frames, u16::from(f.code), f.reason.as_str().to_owned());
            }
            Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the socket failed before a close frame: {e}"),
            None => panic!("the socket ended without a close frame"),
        }
    }
}

#[tokio::test]
async fn deleting_a_deployment_closes_its_log_viewers_with_1000() {
    let c = Cluster::start().await;
    // No node: the deployment stays pending, its log ring exists from creation.
    let id = c.deploy("viewed", sh("true")).await;
    let mut a = connect(&c, &format!("/ws/deployments/{id}/logs")).await;
    let mut b = connect(
        &c,
        &format!("/ws/deployments/{id}/logs?tail=0&streams=stderr"),
    )
    .await;
    assert_eq!(next_json(&mut a).await["deployment_id"], id.as_str());
    assert_eq!(next_json(&mut b).await["deployment_id"], id.as_str());

    let (status, _) = c.delete(&format!("/deployments/{id}")).await;
    assert_eq!(status, 204);
    for ws in [&mut a, &mut b] {
        let (frames, code, reason) = until_close(ws).await;
        assert!(frames.is_empty(), "{frames:?}");
        assert_eq!((code, reason.as_str()), (1000, "deployment deleted"));
    }
    c.shutdown().await;
}

#[tokio::test]
async fn stopping_the_conductor_closes_every_socket_with_1001() {
    let c = Cluster::start().await;
    let id = c.deploy("viewed", sh("true")).await;
    let mut updates = connect(&c, "/ws/updates").await;
    let mut logs = connect(&c, &format!("/ws/deployments/{id}/logs")).await;
    assert_eq!(next_json(&mut updates).await["type"], "snapshot");
    assert_eq!(next_json(&mut logs).await["deployment_id"], id.as_str());

    // The sockets are read while the conductor stops (it waits for their close replies).
    let stop = tokio::spawn(c.shutdown());
    for ws in [&mut updates, &mut logs] {
        let (_, code, reason) = until_close(ws).await;
        assert_eq!((code, reason.as_str()), (1001, "conductor shutting down"));
    }
    stop.await.unwrap();
}

#[tokio::test]
async fn refused_log_sockets_close_with_1008_and_say_why() {
    let c = Cluster::start().await;
    let id = c.deploy("viewed", sh("true")).await;
    let cases = [
        (
            "/ws/deployments/nope/logs".to_owned(),
            "Deployment not found",
        ),
        (
            format!("/ws/deployments/{id}/logs?tail=x"),
            "tail: expected a non-negative integer, got \"x\"",
        ),
        (
            format!("/ws/deployments/{id}/logs?tail=-1"),
            "tail: expected a non-negative integer, got \"-1\"",
        ),
        (
            format!("/ws/deployments/{id}/logs?tail=1&tail=2"),
            "tail: Parameter given more than once; give it once",
        ),
    ];
    for (path, why) in cases {
        let mut ws = connect(&c, &path).await;
        let (frames, code, reason) = until_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1008, why), "{path}");
        // The error frame first, for clients that only read frames (`symphony logs`).
        assert_eq!(frames.len(), 1, "{path}: {frames:?}");
        assert_eq!(frames[0]["error"], why, "{path}");
        assert_eq!(frames[0]["entries"], serde_json::json!([]), "{path}");
    }
    c.shutdown().await;
}
