//! Environmental faults: the conductor's disk full, its database locked by another process.
//! Each gives a clear error and loses nothing else.

use serde_json::{Value, json};

use crate::support::{Cluster, sh};

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
pub struct SmallDisk {
    pub path: std::path::PathBuf,
}

impl SmallDisk {
    /// `None` (the test is skipped) where mounting is not allowed, except under `CI=true`.
    pub fn try_mount(at: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: a tmpfs could not be mounted (the fault tests run as root)"
            );
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self {
            path: at.to_path_buf(),
        })
    }

    /// Writes a file until the disk is full.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Another process (here: another connection) holding the database's write lock, and the
/// database file.
async fn hold_write_lock(c: &Cluster) -> (sqlx::SqliteConnection, std::path::PathBuf) {
    use sqlx::Connection;
    let db = c.cfg.storage_dir.join("symphony.db");
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    (other, db)
}

/// `POST /deployments` of a small stopped deployment named `name`.
async fn post_small(c: &Cluster, name: &str) -> (u16, Value) {
    c.post(
        "/deployments",
        json!({"name": name, "desired_state": "STOPPED",
            "specification": {"spec": {"config": {"command": ["true"]}}}}),
    )
    .await
}

/// Events of `kind`, oldest first.
async fn events_of(c: &Cluster, kind: &str) -> Vec<Value> {
    let (status, body) = c.get(&format!("/events?kind={kind}")).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_507_naming_the_database_and_loses_nothing() {
    let outer = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::try_mount(&outer.path().join("small"), "8m") else {
        return;
    };
    let storage = disk.path.join("storage");
    let mut c = Cluster::start_with(|cfg| {
        cfg.cert_dir = storage.join("certs");
        cfg.storage_dir = storage.clone();
    })
    .await;
    c.add_node("n1", &["local"], &[], false).await;
    let kept = c.deploy("kept", sh("sleep 1000")).await;
    c.wait_state(&kept, "RUNNING").await;

    let filler = disk.fill();
    // Writes go on until the database needs a page the disk no longer has (its WAL may have
    // room left): every one is either acknowledged or refused with 507.
    let big = "x".repeat(48 * 1024);
    let mut acknowledged = vec![kept.clone()];
    let mut refused = None;
    for i in 0..400 {
        let (status, body) = c
            .post(
                "/deployments",
                json!({"name": format!("d{i}"), "desired_state": "STOPPED",
                    "specification": {"spec": {"config": {"command": ["true"], "env": {"BIG": big}}}}}),
            )
            .await;
        match status {
            201 => acknowledged.push(body["id"].as_str().unwrap().to_owned()),
            _ => {
                refused = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = refused.expect("a write was refused on the full disk");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["cause"], "disk_full", "{body}");
    let db = storage.join("symphony.db").display().to_string();
    assert_eq!(body["path"], db.as_str(), "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("disk is full"),
        "{body}"
    );

    // Reads go on, with everything acknowledged; the node stays connected and its work runs.
    let (status, list) = c.get("/deployments").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    for id in &acknowledged {
        assert!(
            listed.contains(&id.as_str()),
            "{id} was acknowledged, then lost"
        );
    }
    c.wait_state(&kept, "RUNNING").await;
    let view = c.conductor().core.view();
    assert_eq!(view.nodes["n1"].state, "online");
    assert!(view.nodes["n1"].connection.is_some());

    // Space is back: writes work again, and the episode is in the events.
    std::fs::remove_file(filler).unwrap();
    let again = c.deploy("after", sh("sleep 1000")).await;
    c.wait_state(&again, "RUNNING").await;

    // One event per episode (background writes of events may make a second one while the
    // disk is nearly full).
    let down = events_of(&c, "storage.unwritable").await;
    assert!(!down.is_empty(), "{down:?}");
    assert!(
        down[0]["message"].as_str().unwrap().contains(&db),
        "{down:?}"
    );
    assert!(!events_of(&c, "storage.recovered").await.is_empty());
    c.shutdown().await;
    drop(disk);
}

#[tokio::test]
async fn a_database_locked_by_another_process_gives_503_not_a_hang() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let kept = c.deploy("kept", sh("sleep 1000")).await;
    c.wait_state(&kept, "RUNNING").await;

    // Another process (here: another connection) holds the write lock.
    let (mut other, db) = hold_write_lock(&c).await;
    let (status, body) = post_small(&c, "blocked").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["cause"], "database_locked", "{body}");
    assert_eq!(body["path"], db.display().to_string().as_str(), "{body}");
    // Reads go on meanwhile.
    let (status, _) = c.get(&format!("/deployments/{kept}")).await;
    assert_eq!(status, 200);

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    let after = c.deploy("after", sh("sleep 1000")).await;
    c.wait_state(&after, "RUNNING").await;
    let (_, list) = c.get("/deployments").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(!names.contains(&"blocked"), "a refused write left a record");
    c.shutdown().await;
}

/// A stop, then a start, while the node that ran the deployment cannot hear either: it is not
/// placed on another node while its first copy may still run (found by the chaos test), and
/// it runs again, once, after that node confirmed the stop. With `crash`, the conductor also
/// restarts between the two (what it knew of the pending stop is gone with it).
async fn stop_then_start_while_its_node_is_away(crash: bool) {
    let mut c = Cluster::start_with(|cfg| {
        cfg.suspect_after = std::time::Duration::from_secs(30);
        cfg.grace = std::time::Duration::from_secs(30);
    })
    .await;
    c.add_node("a", &["local"], &[], true).await;
    let marker = format!("away-{}-{crash}", std::process::id());
    let id = c
        .deploy("once", sh(&format!("sleep 100000; : {marker}")))
        .await;
    c.wait_state(&id, "RUNNING").await;
    // Only now a second node, where it could go.
    c.add_node("b", &["local"], &[], false).await;
    c.proxy("a").set_blackhole(true);
    let path = format!("/deployments/{id}");
    let (status, _) = c.patch(&path, json!({"desired_state": "STOPPED"})).await;
    assert_eq!(status, 200);
    if crash {
        c.crash_conductor().await;
        c.wait("b back", |v| {
            v.nodes.get("b").is_some_and(|n| n.state == "online")
        })
        .await;
    }
    let (status, _) = c.patch(&path, json!({"desired_state": "RUNNING"})).await;
    assert_eq!(status, 200);
    // Node b is online and free: a placement there would be at once. Give it a full batch of
    // chances (a publish after a heartbeat from b), then look.
    let v = c.conductor().core.view();
    let seen = v.nodes["b"].dynamic_timestamp_unix_ms;
    c.wait("a heartbeat from b", |v| {
        v.nodes["b"].dynamic_timestamp_unix_ms > seen
    })
    .await;
    let d = c.conductor().core.view().deployment(&id).cloned().unwrap();
    assert_eq!(
        d.assigned_node_id, None,
        "placed while node a may still run it"
    );
    assert_eq!(crate::support::pids_with(&marker).len(), 1);
    // Node a hears again: its copy stops, then the deployment runs once more, in one copy.
    c.proxy("a").set_blackhole(false);
    c.wait("running again", |v| {
        v.deployment(&id)
            .is_some_and(|d| d.current_state == Some(symphony::model::CurrentState::Running))
    })
    .await;
    crate::support::until("one copy", || crate::support::pids_with(&marker).len() == 1).await;
    let (status, _) = c.delete(&path).await;
    assert_eq!(status, 204);
    crate::support::until("no copy", || crate::support::pids_with(&marker).is_empty()).await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_stop_then_a_start_while_its_node_is_away_never_runs_it_twice() {
    stop_then_start_while_its_node_is_away(false).await;
}

#[tokio::test]
async fn after_a_conductor_crash_a_stop_then_a_start_waits_for_the_nodes_hello() {
    stop_then_start_while_its_node_is_away(true).await;
}

/// A core held up in a write (here: by a lock it waits on) answers no API call; the API says
/// so with 503 after its limit instead of hanging, and reads go on.
#[tokio::test]
async fn a_core_held_up_by_a_slow_write_answers_503_in_time() {
    let c =
        Cluster::start_with(|cfg| cfg.answer_within = std::time::Duration::from_millis(500)).await;
    let (mut other, _) = hold_write_lock(&c).await;
    // The core waits on the lock (up to its busy timeout, longer than the API's limit).
    let (status, body) = post_small(&c, "slow").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["cause"], "no_answer", "{body}");
    let (status, _) = c.get("/deployments").await;
    assert_eq!(status, 200, "reads go on");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    let (status, body) = post_small(&c, "after").await;
    assert_eq!(status, 201, "{body}");
    c.shutdown().await;
}
