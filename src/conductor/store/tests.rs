//! Tests for the conductor store, against real SQLite files in temporary folders.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde_json::json;
use sqlx::{Connection, Row};

use super::*;

fn deployment(id: &str, name: &str, created_at_ms: i64) -> DeploymentRecord {
    DeploymentRecord {
        id: id.to_owned(),
        name: name.to_owned(),
        desired_state: DesiredState::Running,
        kind: "EXEC".to_owned(),
        specification: json!({"config": {"command": ["sleep", "60"], "env_name": null}}),
        created_at_ms,
        updated_at_ms: created_at_ms,
    }
}

fn env(name: &str, created_at_ms: i64) -> CondaEnvRecord {
    CondaEnvRecord {
        name: name.to_owned(),
        python_version: "3.12".to_owned(),
        packages: vec!["numpy".to_owned(), "torch==2.5".to_owned()],
        custom_script: Some("echo hi".to_owned()),
        manager: "uv".to_owned(),
        created_at_ms,
        updated_at_ms: created_at_ms,
    }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        node_id: id.to_owned(),
        groups: vec!["gpu".to_owned(), "lab".to_owned()],
        capacities_total: BTreeMap::from([("cpu".to_owned(), 8000), ("gpu".to_owned(), 2)]),
        first_seen_ms: 100,
        last_seen_ms: 200,
    }
}

fn assignment(deployment_id: &str, node_id: &str, generation: u64) -> AssignmentRecord {
    AssignmentRecord {
        deployment_id: deployment_id.to_owned(),
        node_id: node_id.to_owned(),
        generation: Generation(generation),
    }
}

/// The key a conductor keeps beside its database in `dir`.
fn key_in(dir: &std::path::Path) -> SealKey {
    SealKey::load_or_create(&dir.join(crate::seal::KEY_FILE)).unwrap()
}

async fn file_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn deployment_round_trip_and_order() {
    let (_dir, store) = file_store().await;
    let a = deployment("a", "first", 1_000);
    let b = deployment("b", "second", 3_000);
    let c = deployment("c", "third", 2_000);
    // Same created_at_ms as `b`: the tie is broken by id ascending.
    let d = deployment("0d", "tie", 3_000);
    for rec in [&a, &b, &c, &d] {
        store.insert_deployment(rec, &[], &[]).await.unwrap();
    }
    assert_eq!(store.get_deployment("a").await.unwrap(), Some(a.clone()));
    assert_eq!(store.get_deployment("nope").await.unwrap(), None);
    let ids: Vec<String> = store
        .list_deployments()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["0d", "b", "c", "a"]);

    let mut changed = a.clone();
    changed.name = "renamed".to_owned();
    changed.desired_state = DesiredState::Stopped;
    changed.specification = json!({"replaced": true});
    changed.updated_at_ms = 5_000;
    changed.created_at_ms = 9_999; // ignored by update
    store
        .patch_deployment(&changed, &[], &AssignmentChange::Keep, &[])
        .await
        .unwrap();
    let got = store.get_deployment("a").await.unwrap().unwrap();
    assert_eq!(got.name, "renamed");
    assert_eq!(got.desired_state, DesiredState::Stopped);
    assert_eq!(got.specification, json!({"replaced": true}));
    assert_eq!(got.updated_at_ms, 5_000);
    assert_eq!(got.created_at_ms, 1_000);

    store.delete_deployment("a", &[]).await.unwrap();
    assert_eq!(store.get_deployment("a").await.unwrap(), None);
    assert_eq!(store.list_deployments().await.unwrap().len(), 3);
}

#[tokio::test]
async fn spec_is_stored_as_compact_json_text() {
    let (_dir, store) = file_store().await;
    store
        .insert_deployment(&deployment("a", "x", 1), &[], &[])
        .await
        .unwrap();
    let raw: String = sqlx::query("SELECT specification FROM deployments WHERE id = $1")
        .bind("a")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get("specification");
    assert_eq!(
        raw,
        r#"{"config":{"command":["sleep","60"],"env_name":null}}"#
    );
}

#[tokio::test]
async fn current_state_name_and_spec_are_plain_data() {
    // Original bug B4: a row whose *value* was "current_state" broke every read path.
    let (_dir, store) = file_store().await;
    let mut named = deployment("current_state", "current_state", 10);
    named.desired_state = DesiredState::Stopped;
    let mut in_spec = deployment("d2", "other", 20);
    in_spec.specification = json!({"current_state": "current_state", "list": ["current_state"]});
    store.insert_deployment(&named, &[], &[]).await.unwrap();
    store.insert_deployment(&in_spec, &[], &[]).await.unwrap();

    assert_eq!(
        store.get_deployment("current_state").await.unwrap(),
        Some(named.clone())
    );
    assert_eq!(
        store.list_deployments().await.unwrap(),
        vec![in_spec.clone(), named.clone()]
    );

    store
        .set_assignment(&assignment("current_state", "current_state", 3))
        .await
        .unwrap();
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("current_state", "current_state", 3)]
    );

    let mut env_named = env("current_state", 1);
    env_named.packages = vec!["current_state".to_owned()];
    env_named.custom_script = Some("current_state".to_owned());
    store.insert_conda_env(&env_named, &[]).await.unwrap();
    assert_eq!(
        store.get_conda_env("current_state").await.unwrap(),
        Some(env_named.clone())
    );

    let mut n = node("current_state");
    n.groups = vec!["current_state".to_owned()];
    n.capacities_total = BTreeMap::from([("current_state".to_owned(), 1)]);
    store.upsert_node(&n, &[]).await.unwrap();
    assert_eq!(store.list_nodes().await.unwrap(), vec![n]);

    let snapshot = store.load_all().await.unwrap();
    assert_eq!(snapshot.deployments.len(), 2);

    named.name = "renamed".to_owned();
    store
        .patch_deployment(&named, &[], &AssignmentChange::Keep, &[])
        .await
        .unwrap();
    store.delete_deployment("current_state", &[]).await.unwrap();
    assert_eq!(store.list_deployments().await.unwrap(), vec![in_spec]);
    assert!(store.list_assignments().await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let (_dir, store) = file_store().await;
    assert!(matches!(
        store
            .patch_deployment(&deployment("x", "x", 1), &[], &AssignmentChange::Keep, &[])
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_deployment("x", &[]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.update_conda_env(&env("e", 1), &[]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_conda_env("e", &[]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_node("n").await,
        Err(StoreError::NotFound)
    ));
    // An assignment must reference an existing deployment.
    assert!(matches!(
        store.set_assignment(&assignment("x", "n1", 1)).await,
        Err(StoreError::NotFound)
    ));
    assert!(store.list_assignments().await.unwrap().is_empty());
    // Clearing an absent assignment is a no-op.
    store.clear_assignment("x").await.unwrap();
}

#[tokio::test]
async fn duplicates_conflict() {
    let (_dir, store) = file_store().await;
    store.insert_conda_env(&env("py", 1), &[]).await.unwrap();
    let mut other = env("py", 2);
    other.python_version = "3.10".to_owned();
    assert!(matches!(
        store.insert_conda_env(&other, &[]).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_conda_env("py").await.unwrap(), Some(env("py", 1)));

    store
        .insert_deployment(&deployment("a", "x", 1), &[], &[])
        .await
        .unwrap();
    assert!(matches!(
        store
            .insert_deployment(&deployment("a", "y", 2), &[], &[])
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.list_deployments().await.unwrap().len(), 1);
}

#[tokio::test]
async fn invalid_enum_values_are_refused() {
    let (_dir, store) = file_store().await;
    // An invalid desired_state cannot be built (`DesiredState`); reading one is refused by
    // `an_unknown_stored_desired_state_is_refused` below.
    let mut d = deployment("a", "x", 1);
    d.kind = "VM".to_owned();
    assert!(matches!(
        store.insert_deployment(&d, &[], &[]).await,
        Err(StoreError::Invalid { field: "kind", .. })
    ));
    let mut e = env("e", 1);
    e.manager = "pip".to_owned();
    assert!(matches!(
        store.insert_conda_env(&e, &[]).await,
        Err(StoreError::Invalid {
            field: "manager",
            ..
        })
    ));
    store
        .insert_deployment(&deployment("a", "x", 1), &[], &[])
        .await
        .unwrap();
    assert!(matches!(
        store.set_assignment(&assignment("a", "n", u64::MAX)).await,
        Err(StoreError::Invalid {
            field: "generation",
            ..
        })
    ));
    assert!(store.list_assignments().await.unwrap().is_empty());
    assert_eq!(store.max_generation().await.unwrap().get(), 0);
    // The schema's CHECK constraints back the Rust-side checks up.
    let raw = sqlx::query(
        "INSERT INTO deployments (id, name, desired_state, kind, specification, \
         created_at_ms, updated_at_ms) VALUES ('b', 'b', 'BAD', 'EXEC', '{}', 1, 1)",
    )
    .execute(&store.pool)
    .await;
    let err = raw.unwrap_err();
    assert!(
        err.as_database_error()
            .is_some_and(|e| e.is_check_violation()),
        "{err:?}"
    );
}

#[test]
fn an_unknown_stored_desired_state_is_refused() {
    assert_eq!(desired_state("STOPPED").unwrap(), DesiredState::Stopped);
    assert!(matches!(
        desired_state("running"),
        Err(StoreError::Invalid {
            field: "desired_state",
            ..
        })
    ));
}

#[tokio::test]
async fn conda_env_round_trip_and_order() {
    let (_dir, store) = file_store().await;
    let old = env("old", 1);
    let mut new = env("new", 2);
    new.custom_script = None;
    new.packages = vec![];
    new.manager = "conda".to_owned();
    store.insert_conda_env(&old, &[]).await.unwrap();
    store.insert_conda_env(&new, &[]).await.unwrap();
    assert_eq!(
        store.list_conda_envs().await.unwrap(),
        vec![new.clone(), old.clone()]
    );
    assert_eq!(store.get_conda_env("new").await.unwrap(), Some(new));

    let mut changed = old.clone();
    changed.packages = vec!["pandas".to_owned()];
    changed.custom_script = None;
    changed.updated_at_ms = 50;
    changed.created_at_ms = 77; // ignored
    store.update_conda_env(&changed, &[]).await.unwrap();
    changed.created_at_ms = 1;
    assert_eq!(store.get_conda_env("old").await.unwrap(), Some(changed));

    store.delete_conda_env("old", &[]).await.unwrap();
    assert_eq!(store.get_conda_env("old").await.unwrap(), None);
    assert_eq!(store.list_conda_envs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn node_upsert_keeps_first_seen() {
    let (_dir, store) = file_store().await;
    let n1 = node("n1");
    let mut n0 = node("n0");
    n0.groups = vec![];
    n0.capacities_total = BTreeMap::new();
    store.upsert_node(&n1, &[]).await.unwrap();
    store.upsert_node(&n0, &[]).await.unwrap();
    assert_eq!(
        store.list_nodes().await.unwrap(),
        vec![n0.clone(), n1.clone()]
    );

    let mut again = n1.clone();
    again.first_seen_ms = 999;
    again.last_seen_ms = 1_000;
    again.groups = vec!["cpu".to_owned()];
    again.capacities_total.insert("mem".to_owned(), 64);
    store.upsert_node(&again, &[]).await.unwrap();
    let stored = store.list_nodes().await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].first_seen_ms, 100);
    assert_eq!(stored[1].last_seen_ms, 1_000);
    assert_eq!(stored[1].groups, vec!["cpu".to_owned()]);
    assert_eq!(stored[1].capacities_total.get("mem"), Some(&64));

    store.delete_node("n0").await.unwrap();
    assert_eq!(store.list_nodes().await.unwrap().len(), 1);
}

#[tokio::test]
async fn assignments_upsert_clear_and_generation() {
    let (_dir, store) = file_store().await;
    for id in ["a", "b"] {
        store
            .insert_deployment(&deployment(id, id, 1), &[], &[])
            .await
            .unwrap();
    }
    assert_eq!(store.max_generation().await.unwrap().get(), 0);
    store
        .set_assignment(&assignment("a", "n1", 1))
        .await
        .unwrap();
    store
        .set_assignment(&assignment("b", "n1", 2))
        .await
        .unwrap();
    // Upsert by deployment: a moves to n2 with a newer generation.
    store
        .set_assignment(&assignment("a", "n2", 3))
        .await
        .unwrap();
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("a", "n2", 3), assignment("b", "n1", 2)]
    );
    assert_eq!(
        store.get_assignment("a").await.unwrap(),
        Some(assignment("a", "n2", 3))
    );
    // set_assignment raises the counter.
    assert_eq!(store.max_generation().await.unwrap().get(), 3);

    store.clear_assignment("a").await.unwrap();
    assert_eq!(store.get_assignment("a").await.unwrap(), None);
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("b", "n1", 2)]
    );
    // Clearing does not lower the counter.
    assert_eq!(store.max_generation().await.unwrap().get(), 3);
}

#[tokio::test]
async fn generation_counter_never_goes_down() {
    let (_dir, store) = file_store().await;
    store.bump_generation(Generation(10)).await.unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 10);
    store.bump_generation(Generation(4)).await.unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 10);
    store.bump_generation(Generation(11)).await.unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 11);
    store
        .apply_placements(&[], &[], Generation(2), &[])
        .await
        .unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 11);
    store
        .insert_deployment(&deployment("a", "a", 1), &[], &[])
        .await
        .unwrap();
    // An assignment with an old generation does not lower the counter either.
    store
        .set_assignment(&assignment("a", "n", 5))
        .await
        .unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 11);
    store.delete_deployment("a", &[]).await.unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 11);
    assert!(matches!(
        store.bump_generation(Generation(u64::MAX)).await,
        Err(StoreError::Invalid { .. })
    ));
    store
        .bump_generation(Generation(i64::MAX as u64))
        .await
        .unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), i64::MAX as u64);
}

#[tokio::test]
async fn delete_deployment_removes_its_assignment_only() {
    let (_dir, store) = file_store().await;
    for id in ["a", "b"] {
        store
            .insert_deployment(&deployment(id, id, 1), &[], &[])
            .await
            .unwrap();
    }
    store
        .apply_placements(
            &[assignment("a", "n1", 7), assignment("b", "n1", 8)],
            &[],
            Generation(0),
            &[],
        )
        .await
        .unwrap();
    store.delete_deployment("a", &[]).await.unwrap();
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("b", "n1", 8)]
    );
    assert_eq!(store.max_generation().await.unwrap().get(), 8);
}

#[tokio::test]
async fn apply_placements_sets_clears_and_bumps() {
    let (_dir, store) = file_store().await;
    for id in ["a", "b", "c"] {
        store
            .insert_deployment(&deployment(id, id, 1), &[], &[])
            .await
            .unwrap();
    }
    store
        .set_assignment(&assignment("a", "n1", 1))
        .await
        .unwrap();
    store
        .set_assignment(&assignment("b", "n1", 2))
        .await
        .unwrap();
    store
        .apply_placements(
            &[assignment("c", "n2", 4), assignment("b", "n2", 5)],
            &["a".to_owned(), "missing".to_owned()],
            Generation(20),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("b", "n2", 5), assignment("c", "n2", 4)]
    );
    assert_eq!(store.max_generation().await.unwrap().get(), 20);
    // A set generation above the high-water mark raises the counter to it.
    store
        .apply_placements(&[assignment("a", "n3", 30)], &[], Generation(21), &[])
        .await
        .unwrap();
    assert_eq!(store.max_generation().await.unwrap().get(), 30);
    // Clear before set: an id in both ends up assigned.
    store
        .apply_placements(
            &[assignment("a", "n4", 31)],
            &["a".to_owned()],
            Generation(0),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_assignment("a").await.unwrap(),
        Some(assignment("a", "n4", 31))
    );
}

#[tokio::test]
async fn apply_placements_is_atomic() {
    let (_dir, store) = file_store().await;
    for id in ["a", "b"] {
        store
            .insert_deployment(&deployment(id, id, 1), &[], &[])
            .await
            .unwrap();
    }
    store
        .set_assignment(&assignment("a", "n1", 1))
        .await
        .unwrap();
    let before = store.list_assignments().await.unwrap();

    // The last set references a missing deployment: the clear of `a`, the set of `b` and the
    // counter bump before it must all be rolled back.
    let result = store
        .apply_placements(
            &[assignment("b", "n2", 2), assignment("ghost", "n2", 3)],
            &["a".to_owned()],
            Generation(50),
            &[],
        )
        .await;
    assert!(matches!(result, Err(StoreError::NotFound)), "{result:?}");
    assert_eq!(store.list_assignments().await.unwrap(), before);
    assert_eq!(store.max_generation().await.unwrap().get(), 1);

    // An out-of-range generation is refused before anything is written.
    let result = store
        .apply_placements(
            &[assignment("b", "n2", u64::MAX)],
            &["a".to_owned()],
            Generation(0),
            &[],
        )
        .await;
    assert!(matches!(result, Err(StoreError::Invalid { .. })));
    assert_eq!(store.list_assignments().await.unwrap(), before);

    // The store still works after a rolled-back transaction.
    store
        .apply_placements(
            &[assignment("b", "n2", 2)],
            &["a".to_owned()],
            Generation(0),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store.list_assignments().await.unwrap(),
        vec![assignment("b", "n2", 2)]
    );
}

#[tokio::test]
async fn everything_survives_reopen_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("state").join("conductor");
    let d = deployment("current_state", "current_state", 5);
    let e = env("py312", 6);
    let n = node("n1");
    {
        let store = Store::open(&nested, key_in(&nested)).await.unwrap();
        store.insert_deployment(&d, &[], &[]).await.unwrap();
        store
            .insert_deployment(&deployment("gone", "gone", 1), &[], &[])
            .await
            .unwrap();
        store.insert_conda_env(&e, &[]).await.unwrap();
        store
            .upsert_node(&n, &[event(1, "node.connected", "node/n1", 10)])
            .await
            .unwrap();
        store
            .apply_placements(
                &[assignment("current_state", "n1", 7)],
                &[],
                Generation(0),
                &[],
            )
            .await
            .unwrap();
        store
            .set_assignment(&assignment("gone", "n1", 9))
            .await
            .unwrap();
        // Deleting the highest-generation assignment must not lose the counter.
        store.delete_deployment("gone", &[]).await.unwrap();
        store.close().await;
    }
    assert!(nested.join(DB_FILE_NAME).is_file());
    for _ in 0..2 {
        let store = Store::open(&nested, key_in(&nested)).await.unwrap();
        let snapshot = store.load_all().await.unwrap();
        assert_eq!(
            snapshot,
            StoreSnapshot {
                deployments: vec![d.clone()],
                conda_envs: vec![e.clone()],
                assignments: vec![assignment("current_state", "n1", 7)],
                nodes: vec![n.clone()],
                max_generation: Generation(9),
                services: Vec::new(),
                experiments: Vec::new(),
                event_high_water: 1,
            }
        );
        let versions: Vec<i64> = sqlx::query("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<i64, _>("version"))
            .collect();
        assert_eq!(versions, (1..=Store::schema_version()).collect::<Vec<_>>());
        let counters: i64 = sqlx::query("SELECT COUNT(*) AS n FROM counters")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get("n");
        assert_eq!(counters, 2, "the generation's and the events'");
        store.close().await;
    }
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
        sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, 0)")
            .bind(Store::schema_version() + 1)
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
    }
    let err = Store::open(dir.path(), key_in(dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported }
            if found == Store::schema_version() + 1 && supported == Store::schema_version()),
        "{err:?}"
    );
}

#[tokio::test]
async fn file_uses_wal_normal_sync_foreign_keys_and_memory_temp_store() {
    async fn pragma(conn: &mut sqlx::SqliteConnection, query: &'static str) -> i64 {
        sqlx::query(query).fetch_one(conn).await.unwrap().get(0)
    }
    let (dir, store) = file_store().await;
    let mut conn = store.pool.acquire().await.unwrap();
    assert_eq!(
        pragma(&mut conn, "PRAGMA synchronous").await,
        1,
        "synchronous=NORMAL"
    );
    assert_eq!(pragma(&mut conn, "PRAGMA foreign_keys").await, 1);
    drop(conn);
    // The writer too, and its statement journals stay in memory (2 = MEMORY).
    let mut conn = store.writer.acquire().await.unwrap();
    assert_eq!(
        pragma(&mut conn, "PRAGMA temp_store").await,
        2,
        "temp_store=MEMORY"
    );
    assert_eq!(
        pragma(&mut conn, "PRAGMA wal_autocheckpoint").await,
        i64::from(WAL_CHECKPOINT_PAGES)
    );
    drop(conn);
    store.close().await;

    // WAL is a property of the file: a plain connection without our options sees it too.
    let options = SqliteConnectOptions::new().filename(dir.path().join(DB_FILE_NAME));
    let mut plain = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut plain)
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode.to_lowercase(), "wal");
    plain.close().await.unwrap();
}

#[tokio::test]
async fn memory_store_works_and_is_private() {
    let store = Store::open_memory().await.unwrap();
    store
        .insert_deployment(&deployment("a", "a", 1), &[], &[])
        .await
        .unwrap();
    store
        .set_assignment(&assignment("a", "n", 4))
        .await
        .unwrap();
    let clone = store.clone();
    assert_eq!(clone.list_deployments().await.unwrap().len(), 1);
    assert_eq!(clone.max_generation().await.unwrap().get(), 4);
    let other = Store::open_memory().await.unwrap();
    assert!(other.list_deployments().await.unwrap().is_empty());
}

#[tokio::test]
async fn open_fails_cleanly_when_dir_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, SealKey::generate().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
}

fn service(name: &str, deployment_id: &str, port: u16) -> crate::conductor::services::Service {
    crate::conductor::services::Service {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        deployment_id: deployment_id.to_owned(),
        port,
        exposed: port.is_multiple_of(2),
    }
}

#[tokio::test]
async fn services_are_replaced_per_deployment_and_leave_with_it() {
    let (_dir, store) = file_store().await;
    for id in ["a", "b"] {
        store
            .insert_deployment(&deployment(id, id, 1), &[], &[])
            .await
            .unwrap();
    }
    let a = [service("x", "a", 7000), service("y", "a", 7001)];
    store.set_services("a", &a).await.unwrap();
    store
        .set_services("b", &[service("z", "b", 7002)])
        .await
        .unwrap();
    // A port (or a name) of another deployment is refused, and nothing of that write stays.
    let clash = store.set_services("b", &[service("w", "b", 7000)]).await;
    assert!(matches!(clash, Err(StoreError::Conflict)), "{clash:?}");
    let names = |list: Vec<crate::conductor::services::Service>| -> Vec<(String, u16)> {
        list.into_iter().map(|s| (s.name, s.port)).collect()
    };
    assert_eq!(
        names(store.list_services().await.unwrap()),
        [("x".into(), 7000), ("y".into(), 7001), ("z".into(), 7002)]
    );
    // Replacing drops what is no longer bound; deleting the deployment drops the rest.
    store.set_services("a", &a[1..]).await.unwrap();
    store.delete_deployment("b", &[]).await.unwrap();
    let left = store.load_all().await.unwrap().services;
    assert_eq!(left, [service("y", "a", 7001)]);
}

fn experiment(name: &str, ids: &[&str], at: i64) -> ExperimentRecord {
    ExperimentRecord {
        name: name.to_owned(),
        declaration: json!({"name": name, "processes": ids}),
        placement: Placement::Gang,
        created_at_ms: at,
        failed_reason: None,
        processes: ids
            .iter()
            .enumerate()
            .map(|(i, id)| ProcessRecord {
                name: format!("p{i}"),
                group: (i == 0).then(|| "g".to_owned()),
                on_failure: if i == 0 {
                    OnFailure::StopExperiment
                } else {
                    OnFailure::Restart
                },
                deployment_id: (*id).to_owned(),
            })
            .collect(),
    }
}

#[tokio::test]
async fn experiments_are_written_and_removed_whole() {
    let (dir, store) = file_store().await;
    let deps = |ids: &[&str]| -> Vec<DeploymentRecord> {
        ids.iter().map(|id| deployment(id, id, 5)).collect()
    };
    let mut svc = service("s", "e1", 7000);
    svc.namespace = "rl".to_owned();
    let rl = experiment("rl", &["e1", "e2"], 10);
    store
        .launch_experiment(
            &rl,
            &deps(&["e1", "e2"]),
            std::slice::from_ref(&svc),
            false,
            &[],
        )
        .await
        .unwrap();
    store
        .apply_placements(&[assignment("e1", "n1", 3)], &[], Generation(3), &[])
        .await
        .unwrap();
    // The same name again is a conflict and writes nothing (not even its deployments).
    let again = experiment("rl", &["f1"], 11);
    let r = store
        .launch_experiment(&again, &deps(&["f1"]), &[], false, &[])
        .await;
    assert!(matches!(r, Err(StoreError::Conflict)), "{r:?}");
    assert_eq!(store.list_deployments().await.unwrap().len(), 2);
    // A failure half-way (a port taken) leaves nothing either.
    let mut clash = service("t", "x1", 7000);
    clash.namespace = "other".to_owned();
    let r = store
        .launch_experiment(
            &experiment("other", &["x1"], 12),
            &deps(&["x1"]),
            &[clash],
            false,
            &[],
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict)), "{r:?}");
    assert_eq!(
        store.list_experiments().await.unwrap(),
        std::slice::from_ref(&rl)
    );
    store.close().await;
    // It survives a reopen, processes in order.
    let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
    let snap = store.load_all().await.unwrap();
    assert_eq!(snap.experiments, [rl]);
    assert_eq!(snap.services, [svc]);
    // Replacing removes the old deployments with their assignments and services.
    store
        .launch_experiment(&again, &deps(&["f1"]), &[], true, &[])
        .await
        .unwrap();
    let snap = store.load_all().await.unwrap();
    let ids: Vec<String> = snap.deployments.into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["f1"]);
    assert!(snap.assignments.is_empty() && snap.services.is_empty());
    assert_eq!(snap.experiments, [again]);
    store
        .set_experiment_failed("rl", Some("p0 failed"), &[])
        .await
        .unwrap();
    assert_eq!(
        store.list_experiments().await.unwrap()[0]
            .failed_reason
            .as_deref(),
        Some("p0 failed")
    );
    // Stopping sets every process STOPPED and drops their assignments in one go.
    store
        .apply_placements(&[assignment("f1", "n1", 12)], &[], Generation(12), &[])
        .await
        .unwrap();
    store
        .set_experiment_state("rl", DesiredState::Stopped, Some("p0 failed"), 99, &[])
        .await
        .unwrap();
    let snap = store.load_all().await.unwrap();
    assert!(snap.assignments.is_empty());
    assert_eq!(snap.deployments[0].desired_state, DesiredState::Stopped);
    assert_eq!(snap.deployments[0].updated_at_ms, 99);
    store
        .set_experiment_state("rl", DesiredState::Running, None, 100, &[])
        .await
        .unwrap();
    let snap = store.load_all().await.unwrap();
    assert_eq!(snap.deployments[0].desired_state, DesiredState::Running);
    assert_eq!(snap.experiments[0].failed_reason, None);
    assert!(matches!(
        store
            .set_experiment_state("nope", DesiredState::Running, None, 1, &[])
            .await,
        Err(StoreError::NotFound)
    ));
    // Deleting takes the deployments along; an unknown name is not found.
    store.delete_experiment("rl", &[]).await.unwrap();
    assert!(store.load_all().await.unwrap().deployments.is_empty());
    assert!(store.list_experiments().await.unwrap().is_empty());
    assert!(matches!(
        store.delete_experiment("rl", &[]).await,
        Err(StoreError::NotFound)
    ));
}

fn event(id: u64, kind: &str, object: &str, at_ms: i64) -> Event {
    Event {
        id,
        at_ms,
        kind: kind.into(),
        object: object.into(),
        message: format!("{kind} {object}"),
        fields: json!({"n": id}),
    }
}

fn ids(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.id).collect()
}

#[tokio::test]
async fn events_commit_with_their_change_or_not_at_all() {
    let store = Store::open_memory().await.unwrap();
    store
        .insert_deployment(
            &deployment("a", "a", 1),
            &[],
            &[event(1, "deployment.created", "deployment/a", 1)],
        )
        .await
        .unwrap();
    // The same id again: the change fails, and so does its event.
    let dup = store
        .insert_deployment(
            &deployment("a", "a", 2),
            &[],
            &[event(2, "deployment.created", "deployment/a", 2)],
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict)), "{dup:?}");
    // A change that fails half-way (an unknown deployment's assignment) leaves no event.
    let bad = store
        .apply_placements(
            &[assignment("ghost", "n1", 5)],
            &[],
            Generation(5),
            &[event(2, "deployment.placed", "deployment/ghost", 3)],
        )
        .await;
    assert!(matches!(bad, Err(StoreError::NotFound)), "{bad:?}");
    let all = Filter {
        after: Some(0),
        limit: 100,
        ..Filter::default()
    };
    let got = store.list_events(&all).await.unwrap();
    assert_eq!(got, vec![event(1, "deployment.created", "deployment/a", 1)]);
    assert_eq!(store.load_all().await.unwrap().event_high_water, 1);
    // Patch and delete carry theirs.
    store
        .patch_deployment(
            &deployment("a", "b", 1),
            &[],
            &AssignmentChange::Set(assignment("a", "n1", 4)),
            &[event(2, "deployment.updated", "deployment/a", 4)],
        )
        .await
        .unwrap();
    assert_eq!(store.max_generation().await.unwrap(), Generation(4));
    store
        .delete_deployment("a", &[event(3, "deployment.deleted", "deployment/a", 5)])
        .await
        .unwrap();
    assert_eq!(ids(&store.list_events(&all).await.unwrap()), [1, 2, 3]);
}

#[tokio::test]
async fn events_filter_page_and_prune_without_reusing_ids() {
    let store = Store::open_memory().await.unwrap();
    let mut batch = Vec::new();
    for id in 1..=10_u64 {
        let (kind, object) = match id % 3 {
            0 => ("node.lost", "node/n1"),
            1 => ("deployment.started", "deployment/a"),
            _ => ("deployment.exited", "deployment/ab"),
        };
        batch.push(event(id, kind, object, i64::try_from(id).unwrap() * 100));
    }
    store.append_events(&batch).await.unwrap();
    let read = |after: Option<u64>, object: Option<&str>, kind: Option<&str>, limit: u32| {
        let f = Filter {
            after,
            object: object.map(Into::into),
            kind: kind.map(Into::into),
            limit,
        };
        let store = store.clone();
        async move { ids(&store.list_events(&f).await.unwrap()) }
    };
    assert_eq!(read(Some(0), None, None, 3).await, [1, 2, 3]);
    assert_eq!(read(Some(8), None, None, 100).await, [9, 10]);
    // Without `after`: the newest, still oldest first.
    assert_eq!(read(None, None, None, 3).await, [8, 9, 10]);
    assert_eq!(
        read(Some(0), Some("deployment/a"), None, 100).await,
        [1, 4, 7, 10]
    );
    assert_eq!(
        read(Some(0), Some("deployment"), None, 100).await,
        [1, 2, 4, 5, 7, 8, 10]
    );
    assert_eq!(
        read(Some(0), Some("node"), Some("node"), 100).await,
        [3, 6, 9]
    );
    assert_eq!(
        read(Some(0), None, Some("deployment.exited"), 100).await,
        [2, 5, 8]
    );
    assert!(read(Some(0), Some("deploy"), None, 100).await.is_empty());
    assert!(
        read(Some(0), None, Some("deployment.exit"), 100)
            .await
            .is_empty()
    );
    // A family is not a prefix: `node` is not `nodes/..`.
    store
        .append_events(&[event(11, "nodes.x", "nodes/x", 1100)])
        .await
        .unwrap();
    assert_eq!(read(Some(0), Some("node"), None, 100).await, [3, 6, 9]);

    // Keep the newest 5, and nothing at or before 750 ms.
    assert_eq!(store.prune_events(5, 0).await.unwrap(), 6);
    assert_eq!(read(Some(0), None, None, 100).await, [7, 8, 9, 10, 11]);
    store.prune_events(100, 800).await.unwrap();
    assert_eq!(read(Some(0), None, None, 100).await, [9, 10, 11]);
    store.prune_events(0, 0).await.unwrap();
    assert!(read(Some(0), None, None, 100).await.is_empty());
    // Everything pruned, the counter stays: the next id is never an old one.
    assert_eq!(store.load_all().await.unwrap().event_high_water, 11);
}

/// Whether `needle` appears in any file of `dir` (the database, its WAL, anything).
fn any_file_contains(dir: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

fn with_token(mut d: DeploymentRecord, token: &str) -> DeploymentRecord {
    d.specification = json!({"spec": {"config": {"command": ["true"],
        "git_repo": "https://example.invalid/r.git", "token": token}}});
    d
}

#[tokio::test]
async fn tokens_are_sealed_on_disk_and_plain_to_callers() {
    let (dir, store) = file_store().await;
    let a = with_token(deployment("a", "a", 1), "tok-INSERTED-1");
    store.insert_deployment(&a, &[], &[]).await.unwrap();
    let mut e = experiment("x", &["b"], 2);
    e.declaration = json!({"name": "x", "processes": [
        {"name": "p0", "config": {"command": ["true"], "token": "tok-DECLARED-2"}},
        {"name": "p1", "config": {"command": ["true"]}}]});
    let b = with_token(deployment("b", "b", 2), "tok-LAUNCHED-3");
    store
        .launch_experiment(&e, std::slice::from_ref(&b), &[], false, &[])
        .await
        .unwrap();
    let mut patched = a.clone();
    patched.specification["spec"]["config"]["token"] = json!("tok-PATCHED-4");
    store
        .patch_deployment(&patched, &[], &AssignmentChange::Keep, &[])
        .await
        .unwrap();
    // Callers see plaintext, whichever way they read.
    assert_eq!(
        store.get_deployment("a").await.unwrap(),
        Some(patched.clone())
    );
    let all = store.load_all().await.unwrap();
    assert_eq!(all.deployments, vec![b.clone(), patched.clone()]);
    assert_eq!(all.experiments, vec![e.clone()]);
    assert_eq!(store.list_experiments().await.unwrap(), vec![e.clone()]);
    // The rows hold sealed values.
    let spec: String = sqlx::query("SELECT specification FROM deployments WHERE id = 'a'")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let sealed = spec["spec"]["config"]["token"].as_str().unwrap();
    assert!(crate::seal::is_sealed(sealed), "{sealed}");
    assert_eq!(
        spec["spec"]["config"]["git_repo"],
        "https://example.invalid/r.git"
    );
    // No file in the folder holds any token, before or after a checkpoint.
    for token in [
        "tok-INSERTED-1",
        "tok-DECLARED-2",
        "tok-LAUNCHED-3",
        "tok-PATCHED-4",
    ] {
        assert!(!any_file_contains(dir.path(), token), "{token} on disk");
    }
    store.close().await;
    for token in [
        "tok-INSERTED-1",
        "tok-DECLARED-2",
        "tok-LAUNCHED-3",
        "tok-PATCHED-4",
    ] {
        assert!(!any_file_contains(dir.path(), token), "{token} on disk");
    }
    // The same key (the file beside the database) opens them after a restart.
    let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
    assert_eq!(store.get_deployment("a").await.unwrap(), Some(patched));
    assert_eq!(store.list_experiments().await.unwrap(), vec![e]);
    store.close().await;
}

#[tokio::test]
async fn tokens_an_older_version_left_in_clear_are_sealed_at_open() {
    let (dir, store) = file_store().await;
    store
        .insert_deployment(&deployment("a", "a", 1), &[], &[])
        .await
        .unwrap();
    store
        .launch_experiment(
            &experiment("x", &["b"], 2),
            &[deployment("b", "b", 2)],
            &[],
            false,
            &[],
        )
        .await
        .unwrap();
    // Written behind the store's back, as a version without sealing did.
    let clear = with_token(deployment("a", "a", 1), "tok-OLD-CLEAR-1");
    sqlx::query("UPDATE deployments SET specification = $1 WHERE id = 'a'")
        .bind(serde_json::to_string(&clear.specification).unwrap())
        .execute(&store.pool)
        .await
        .unwrap();
    let declaration = json!({"name": "x", "processes": [
        {"name": "p0", "config": {"command": ["true"], "token": "tok-OLD-CLEAR-2"}}]});
    sqlx::query("UPDATE experiments SET declaration = $1 WHERE name = 'x'")
        .bind(declaration.to_string())
        .execute(&store.pool)
        .await
        .unwrap();
    // Plaintext is still read as it is.
    assert_eq!(
        store.get_deployment("a").await.unwrap(),
        Some(clear.clone())
    );
    store.close().await;
    assert!(any_file_contains(dir.path(), "tok-OLD-CLEAR-1"));

    let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
    for token in ["tok-OLD-CLEAR-1", "tok-OLD-CLEAR-2"] {
        assert!(
            !any_file_contains(dir.path(), token),
            "{token} left on disk"
        );
    }
    assert_eq!(store.get_deployment("a").await.unwrap(), Some(clear));
    assert_eq!(
        store.list_experiments().await.unwrap()[0].declaration,
        declaration
    );
    // Nothing is left to seal.
    assert_eq!(store.seal_plaintext_tokens().await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn a_token_sealed_with_another_key_stays_sealed_and_the_rest_loads() {
    let (dir, store) = file_store().await;
    store
        .insert_deployment(&with_token(deployment("a", "a", 1), "tok-LOST"), &[], &[])
        .await
        .unwrap();
    store
        .insert_deployment(&deployment("b", "b", 2), &[], &[])
        .await
        .unwrap();
    store.close().await;
    let store = Store::open(dir.path(), SealKey::generate().unwrap())
        .await
        .unwrap();
    let all = store.load_all().await.unwrap();
    assert_eq!(all.deployments.len(), 2);
    let a = all.deployments.iter().find(|d| d.id == "a").unwrap();
    let token = a.specification["spec"]["config"]["token"].as_str().unwrap();
    assert!(crate::seal::is_sealed(token), "{token}");
    assert!(all.deployments.contains(&deployment("b", "b", 2)));
    // Written back (a PATCH keeping the token), it stays as it was: the right key still opens
    // it later.
    store
        .patch_deployment(a, &[], &AssignmentChange::Keep, &[])
        .await
        .unwrap();
    store.close().await;
    let store = Store::open(dir.path(), key_in(dir.path())).await.unwrap();
    let a = store.get_deployment("a").await.unwrap().unwrap();
    assert_eq!(a.specification["spec"]["config"]["token"], "tok-LOST");
    store.close().await;
}

/// A database that takes no writes (here opened read-only, as on a read-only disk) refuses
/// them as `Unwritable { ReadOnly }` naming its file, not as an anonymous database error;
/// reads go on.
#[tokio::test]
async fn a_read_only_database_is_unwritable_with_its_cause_and_path() {
    let (dir, store) = file_store().await;
    store
        .insert_deployment(&deployment("a", "first", 1_000), &[], &[])
        .await
        .unwrap();
    let db = dir.path().join(DB_FILE_NAME);
    let options = SqliteConnectOptions::new().filename(&db).read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let read_only = Store {
        writer: pool.clone(),
        pool,
        path: Some(db.clone().into()),
        key: key_in(dir.path()),
    };
    assert_eq!(read_only.list_deployments().await.unwrap().len(), 1);
    let err = read_only
        .insert_deployment(&deployment("b", "second", 2_000), &[], &[])
        .await
        .unwrap_err()
        .at(&db);
    match &err {
        StoreError::Unwritable { cause, path } => {
            assert_eq!(*cause, Unwritable::ReadOnly);
            assert_eq!(path, &db.display().to_string());
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_environmental());
    assert!(err.to_string().contains("read-only"), "{err}");
}

fn run(id: &str, seq: u64, state: crate::conductor::runs::RunState) -> crate::conductor::runs::Run {
    crate::conductor::runs::Run {
        id: id.to_owned(),
        workflow: "w".to_owned(),
        version: 1,
        seq,
        params: BTreeMap::new(),
        state,
        fail_fast: false,
        queued_at_ms: 0,
        started_at_ms: None,
        finished_at_ms: None,
        reason: None,
        tasks: Vec::new(),
    }
}

/// A batch of run changes is a few multi-row statements: more rows than one statement takes,
/// the last change of a deployment wins, and what is cleared or deleted goes, across chunks.
#[tokio::test]
async fn a_batch_of_run_changes_spans_statements_and_the_last_change_wins() {
    use crate::conductor::runs::RunState;
    use runs::RunsWrite;
    let (_dir, store) = file_store().await;
    let n = ROWS_PER_STATEMENT + 44;
    let ids: Vec<String> = (0..n).map(|i| format!("d{i:04}")).collect();
    let runs: Vec<_> = (0..n)
        .map(|i| run(&format!("r{i:04}"), i as u64, RunState::Running))
        .collect();
    let create: Vec<_> = ids.iter().map(|id| deployment(id, id, 1)).collect();
    let w = RunsWrite {
        runs: runs.iter().collect(),
        create,
        ..RunsWrite::default()
    };
    store.write_runs(&w, &[]).await.unwrap();
    let set: Vec<_> = ids.iter().map(|id| assignment(id, "n1", 7)).collect();
    store
        .apply_placements(&set, &[], Generation(7), &[])
        .await
        .unwrap();
    assert_eq!(store.list_assignments().await.unwrap().len(), n);

    // Every deployment stopped, the first one twice (the second change wins); every run done
    // and then the first half deleted with their deployments; the rest's assignments cleared.
    let mut update: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut d = deployment(id, "renamed", 1);
            d.desired_state = DesiredState::Stopped;
            d.updated_at_ms = 5;
            d
        })
        .collect();
    let mut last = deployment(&ids[0], "last", 1);
    last.updated_at_ms = 9;
    update.push(last);
    let done: Vec<_> = (0..n)
        .map(|i| run(&format!("r{i:04}"), i as u64, RunState::Succeeded))
        .collect();
    let half = n / 2;
    let w = RunsWrite {
        runs: done.iter().collect(),
        update,
        clear: ids[half..].to_vec(),
        delete_runs: done[..half].iter().map(|r| r.id.clone()).collect(),
        delete_deployments: ids[1..half].to_vec(),
        ..RunsWrite::default()
    };
    store.write_runs(&w, &[]).await.unwrap();

    let left = store.list_deployments().await.unwrap();
    let mut expect: Vec<&str> = vec![ids[0].as_str()];
    expect.extend(ids[half..].iter().map(String::as_str));
    let mut got: Vec<&str> = left.iter().map(|d| d.id.as_str()).collect();
    got.sort_unstable();
    assert_eq!(got, expect);
    for d in &left {
        if d.id == ids[0] {
            assert_eq!((d.name.as_str(), d.updated_at_ms), ("last", 9));
            assert_eq!(d.desired_state, DesiredState::Running);
        } else {
            assert_eq!((d.name.as_str(), d.updated_at_ms), ("renamed", 5));
            assert_eq!(d.desired_state, DesiredState::Stopped);
        }
    }
    let assigned: Vec<String> = store
        .list_assignments()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.deployment_id)
        .collect();
    assert_eq!(assigned, vec![ids[0].clone()]);
    let stored = store.list_runs().await.unwrap();
    assert_eq!(stored.len(), n - half);
    assert!(stored.iter().all(|r| r.state == RunState::Succeeded));
    assert_eq!(stored[0].id, format!("r{half:04}"));
}

/// A state-only change writes the desired state and update time and leaves the stored name
/// and spec as they are (what the record says of them is not written), across chunks.
#[tokio::test]
async fn a_state_only_change_keeps_the_stored_spec() {
    use runs::RunsWrite;
    let (_dir, store) = file_store().await;
    let n = ROWS_PER_STATEMENT + 3;
    let created: Vec<_> = (0..n)
        .map(|i| deployment(&format!("d{i:03}"), "task", 1))
        .collect();
    let w = RunsWrite {
        create: created.clone(),
        ..RunsWrite::default()
    };
    store.write_runs(&w, &[]).await.unwrap();
    let state_only: Vec<_> = created
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.desired_state = DesiredState::Stopped;
            d.updated_at_ms = 8;
            d.name = "not written".into();
            d.specification = json!({"not": "written"});
            d
        })
        .collect();
    let w = RunsWrite {
        state_only,
        ..RunsWrite::default()
    };
    store.write_runs(&w, &[]).await.unwrap();
    let mut stored = store.list_deployments().await.unwrap();
    stored.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(stored.len(), n);
    for (d, before) in stored.iter().zip(&created) {
        assert_eq!(d.desired_state, DesiredState::Stopped, "{}", d.id);
        assert_eq!(d.updated_at_ms, 8);
        assert_eq!(
            (&d.name, &d.specification),
            (&before.name, &before.specification)
        );
    }
}

/// The writer keeps every shape of its multi-row statements prepared: batches of each row
/// count of two statements (more shapes than SQLite's default cache of 100) are all still
/// cached after the last one, so a flush parses none again.
#[tokio::test]
async fn the_writer_keeps_every_shape_of_its_multi_row_statements() {
    let (_dir, store) = file_store().await;
    let mut next = 0;
    for rows in 1..=ROWS_PER_STATEMENT {
        let batch: Vec<Event> = (0..rows)
            .map(|_| {
                next += 1;
                event(next, "node.online", "node/n1", 1000)
            })
            .collect();
        store.append_events(&batch).await.unwrap();
    }
    let set: Vec<_> = (0..ROWS_PER_STATEMENT)
        .map(|i| assignment(&format!("d{i}"), "n1", 7))
        .collect();
    let w = runs::RunsWrite {
        create: set
            .iter()
            .map(|a| deployment(&a.deployment_id, "t", 1))
            .collect(),
        ..runs::RunsWrite::default()
    };
    store.write_runs(&w, &[]).await.unwrap();
    for rows in 1..=ROWS_PER_STATEMENT {
        store
            .apply_placements(&set[..rows], &[], Generation(7), &[])
            .await
            .unwrap();
    }
    let conn = store.writer.acquire().await.unwrap();
    assert!(
        conn.cached_statements_size() >= 2 * ROWS_PER_STATEMENT,
        "{} statements cached",
        conn.cached_statements_size()
    );
}
