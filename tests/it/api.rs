//! The HTTP API: shapes, validation (422 naming the field), 404/409, clamping, secrets, the UI
//! route, OpenAPI and WebSockets.

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{Cluster, locs, sh};

#[tokio::test]
async fn bad_input_gets_422_naming_the_field() {
    let c = Cluster::start().await;
    let cmd = json!({"config": {"command": ["true"]}});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"specification": {"spec": cmd}}), "body.name"),
        (
            json!({"name": "", "specification": {"spec": cmd}}),
            "body.name",
        ),
        (
            json!({"name": "x".repeat(201), "specification": {"spec": cmd}}),
            "body.name",
        ),
        (
            json!({"name": 5, "specification": {"spec": cmd}}),
            "body.name",
        ),
        (
            json!({"name": "a", "desired_state": "running", "specification": {"spec": cmd}}),
            "body.desired_state",
        ),
        (
            json!({"name": "a", "kind": "VM", "specification": {"spec": cmd}}),
            "body.kind",
        ),
        (
            json!({"name": "a", "kind": "DOCKER", "specification": {"spec": cmd}}),
            "body.kind",
        ),
        (
            json!({"name": "a", "specification": {}}),
            "body.specification.spec",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": "echo hi"}}}}),
            "body.specification.spec.config.command",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": []}}}}),
            "body.specification.spec.config.command",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "capacity_requests": {"gpu": 1.5}}}}),
            "body.specification.spec.capacity_requests.gpu",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "capacity_requests": {"gpu": "2"}}}}),
            "body.specification.spec.capacity_requests.gpu",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "restart_policy": "sometimes"}}}),
            "body.specification.spec.restart_policy",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "auto_restart": {"enabled": true, "cron": "61 * * * *", "timezone": "UTC"}}}}),
            "body.specification.spec.auto_restart.cron",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "auto_restart": {"enabled": true, "cron": "0 * * * *", "timezone": "Mars/Base"}}}}),
            "body.specification.spec.auto_restart.timezone",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "auto_restart": {"enabled": "true", "cron": "0 * * * *", "timezone": "UTC"}}}}),
            "body.specification.spec.auto_restart.enabled",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "health_check": {"type": "http", "url": "ftp://x"}}}}),
            "body.specification.spec.health_check.url",
        ),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}, "stop_signal": "SIGFOO"}}}),
            "body.specification.spec.stop_signal",
        ),
        (json!([1, 2]), "body"),
        (
            json!({"name": "a", "specification": {"spec": {"config": {"command": ["x"]}}, "blob": "x".repeat(300 * 1024)}}),
            "body.specification",
        ),
    ];
    for (body, loc) in cases {
        let (status, resp) = c.post("/deployments", body.clone()).await;
        assert_eq!(status, 422, "{body} -> {resp}");
        assert!(
            locs(&resp).iter().any(|l| l == loc),
            "{body}: expected {loc} in {resp}"
        );
        for e in resp["detail"].as_array().unwrap() {
            assert!(
                e["msg"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
                "{e}"
            );
        }
    }
    // Malformed JSON.
    let resp = c
        .http
        .post(format!("{}/deployments", c.api))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["detail"][0]["type"], "json_invalid");
    // Nothing was stored by any of those.
    let (_, list) = c.get("/deployments").await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    // Bad PATCH input too, and the record is unchanged.
    let id = c.deploy("ok", sh("sleep 100")).await;
    let (status, resp) = c
        .patch(
            &format!("/deployments/{id}"),
            json!({"specification": {"spec": {"config": {"command": 7}}}}),
        )
        .await;
    assert_eq!(status, 422);
    assert!(locs(&resp).contains(&"body.specification.spec.config.command".to_owned()));
    let (status, resp) = c
        .patch(
            &format!("/deployments/{id}"),
            json!({"desired_state": "PAUSED"}),
        )
        .await;
    assert_eq!(status, 422, "{resp}");
    let (_, d) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(
        d["specification"]["spec"]["config"]["command"],
        json!(["sh", "-c", "sleep 100"])
    );
    c.shutdown().await;
}

#[tokio::test]
async fn unknown_ids_are_404_and_duplicates_409() {
    let c = Cluster::start().await;
    let missing = "0123456789abcdef0123456789abcdef";
    for (status, body) in [
        c.get(&format!("/deployments/{missing}")).await,
        c.patch(&format!("/deployments/{missing}"), json!({"name": "x"}))
            .await,
        c.delete(&format!("/deployments/{missing}")).await,
    ] {
        assert_eq!(status, 404);
        assert_eq!(body, json!({"detail": "Deployment not found"}));
    }
    let env = json!({"name": "torch", "python_version": "3.11", "packages": "numpy, torch"});
    let (status, created) = c.post("/conda-envs", env.clone()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["packages"], json!(["numpy", "torch"]));
    assert_eq!(
        c.post("/conda-envs", env).await,
        (
            409,
            json!({"detail": "Conda env with that name already exists"})
        )
    );
    assert_eq!(
        c.patch("/conda-envs/nope", json!({"packages": ["a"]}))
            .await
            .0,
        404
    );
    assert_eq!(c.delete("/conda-envs/nope").await.0, 404);
    assert_eq!(c.post("/conda-envs/nope/rerun", json!(null)).await.0, 404);
    assert_eq!(
        c.post("/conda-envs/torch/rerun", json!(null)).await,
        (202, Value::Null)
    );
    let (status, resp) = c
        .patch("/conda-envs/torch", json!({"python_version": "3.12"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(locs(&resp), vec!["body.python_version"]);
    let (status, patched) = c
        .patch(
            "/conda-envs/torch",
            json!({"packages": ["jax"], "custom_script": "echo hi"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            patched["packages"].clone(),
            patched["custom_script"].clone()
        ),
        (json!(["jax"]), json!("echo hi"))
    );
    let (status, resp) = c.post("/conda-envs", json!({"name": "x"})).await;
    assert_eq!(status, 422);
    assert_eq!(locs(&resp), vec!["body.python_version"]);
    assert_eq!(c.delete("/conda-envs/torch").await.0, 204);
    assert_eq!(c.get("/conda-envs").await.1, json!([]));
    c.shutdown().await;
}

#[tokio::test]
async fn list_paging_is_clamped_and_ordered_newest_first() {
    let c = Cluster::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(c.deploy(&format!("d{i}"), sh("true")).await);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await; // distinct created_at_ms
    }
    let names = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&c.get("/deployments").await.1),
        vec!["d4", "d3", "d2", "d1", "d0"]
    );
    assert_eq!(
        names(&c.get("/deployments?limit=0").await.1),
        vec!["d4"],
        "limit clamps to >= 1"
    );
    assert_eq!(
        names(&c.get("/deployments?limit=2&offset=1").await.1),
        vec!["d3", "d2"]
    );
    assert_eq!(
        names(&c.get("/deployments?offset=-4&limit=1").await.1),
        vec!["d4"],
        "negative offset -> 0"
    );
    assert_eq!(names(&c.get("/deployments?limit=100000").await.1).len(), 5);
    let (status, body) = c.get("/deployments?limit=abc").await;
    assert_eq!(status, 422);
    assert_eq!(locs(&body), vec!["query.limit"]);
    // GET one is the same enriched record as the list item.
    let (_, list) = c.get("/deployments").await;
    let (_, one) = c.get(&format!("/deployments/{}", ids[4])).await;
    assert_eq!(list[0], one);
    for key in [
        "current_state",
        "assigned_node_id",
        "assignment_reason",
        "status",
    ] {
        assert!(one.get(key).is_some(), "{key} missing from {one}");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_deployment_named_current_state_breaks_nothing() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c.deploy("current_state", sh("sleep 100")).await;
    c.wait_state(&id, "RUNNING").await;
    let (status, list) = c.get("/deployments").await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["name"], "current_state");
    assert_eq!(
        c.patch(&format!("/deployments/{id}"), json!({"name": "renamed"}))
            .await
            .0,
        200
    );
    assert_eq!(c.delete(&format!("/deployments/{id}")).await.0, 204);
    c.shutdown().await;
}

#[tokio::test]
async fn secrets_never_leave_the_conductor() {
    let c = Cluster::start().await;
    let spec = json!({"config": {"command": ["true"], "git_repo": "https://example.invalid/r.git", "token": "SECRET-TOKEN-123"}});
    let id = c.deploy("private", spec).await;
    let (_, one) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(one["specification"]["spec"]["config"]["token"], "********");
    let (_, list) = c.get("/deployments").await;
    assert!(!list.to_string().contains("SECRET-TOKEN-123"));
    // The updates socket carries the same masked record.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/updates", c.api.replace("http", "ws")))
            .await
            .unwrap();
    let frame = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(frame.contains(&id) && !frame.contains("SECRET-TOKEN-123"));
    // A client that sends the masked spec back (round trip) keeps the real token.
    let mut spec = one["specification"].clone();
    spec["spec"]["config"]["command"] = json!(["false"]);
    assert_eq!(
        c.patch(
            &format!("/deployments/{id}"),
            json!({"specification": spec})
        )
        .await
        .0,
        200
    );
    let store = c.open_store().await;
    let stored = store.get_deployment(&id).await.unwrap().unwrap();
    assert_eq!(
        stored.specification["spec"]["config"]["token"],
        "SECRET-TOKEN-123"
    );
    assert_eq!(
        stored.specification["spec"]["config"]["command"],
        json!(["false"])
    );
    // A workflow's task token: masked in its definition, its run and the task's deployment.
    let (status, body) = c
        .post(
            "/workflows",
            json!({"name": "private", "tasks": [{"name": "t", "config": {"command": ["true"],
                "git_repo": "https://example.invalid/r.git", "token": "SECRET-TOKEN-123"}}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["definition"]["tasks"][0]["config"]["token"],
        "********"
    );
    let (_, run) = c.post("/workflows/private/runs", json!({})).await;
    c.wait("the task's deployment made", |v| {
        v.deployments.iter().any(|d| d.name.starts_with("private/"))
    })
    .await;
    for path in [
        "/workflows".to_owned(),
        "/workflows/private".to_owned(),
        format!("/runs/{}", run["id"].as_str().unwrap()),
        "/deployments".to_owned(),
        "/events?after=0&limit=1000".to_owned(),
    ] {
        let (_, body) = c.get(&path).await;
        assert!(
            !body.to_string().contains("SECRET-TOKEN-123"),
            "{path}: {body}"
        );
    }
    c.shutdown().await;
}

#[tokio::test]
async fn the_ui_route_serves_only_its_own_assets() {
    let c = Cluster::start().await;
    for path in [
        "/ui/%2Fetc%2Fpasswd",
        "/ui/..%2F..%2F..%2Fetc%2Fpasswd",
        "/ui/../../etc/passwd",
        "/ui/%2Fproc%2Fself%2Fenviron",
    ] {
        let resp = c
            .http
            .get(format!("{}{}", c.api, path))
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        assert!(!text.contains("root:"), "{path} leaked a file");
        assert!(!text.contains("PATH="), "{path} leaked the environment");
    }
    let ca_key = c.cfg.cert_dir.join("ca.key");
    let url = format!(
        "{}/ui/{}",
        c.api,
        ca_key.display().to_string().replace('/', "%2F")
    );
    let text = c.http.get(url).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    let index = c.text("/ui/").await;
    assert!(index.contains("<title>Symphony</title>"));
    c.shutdown().await;
}

/// Validates `value` against `schema` (a schema object of `doc`, whose `#/components/...`
/// references resolve against `doc`); returns the errors, one line each.
fn schema_errors(doc: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut root = doc.clone();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["allOf"] = json!([schema]);
    let validator = jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("the document's schema does not compile: {e}"));
    validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Follows a `$ref` of `doc` (one level).
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling reference {r}")),
        None => v,
    }
}

/// Every operation of the OpenAPI document is exercised against the real API: the status must
/// be one the document lists for that operation, and the body must match its schema; the
/// request bodies used must match the documented request schemas too.
#[tokio::test]
async fn openapi_matches_the_router_and_real_responses() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 4)], false).await;
    let (status, doc) = c.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let kept = c.deploy("kept", sh("echo hello; sleep 1000")).await;
    c.wait_state(&kept, "RUNNING").await;
    let doomed = c.deploy("doomed", sh("sleep 1000")).await;
    let spec = json!({"spec": {"config": {"command": ["sleep", "1000"], "env_name": "e1",
        "git_ref": null, "env": {"A": "1"}}, "capacity_requests": {"slot": 1},
        "restart_policy": {"type": "on-failure", "backoff_seconds": 2}, "stop_signal": "SIGINT",
        "health_check": {"type": "tcp", "host": "127.0.0.1", "port": 9}, "auto_restart":
        {"enabled": true, "cron": "0 3 * * *", "timezone": "Europe/Paris"},
        "binds": ["web", {"tb": 7777}], "connects": ["web"], "exposes": ["tb"]}});
    let rl = json!({"name": "rl", "placement": "gang", "processes": [
        {"name": "learner", "group": "t", "config": {"command": ["sleep", "1000"], "token": "s3cret",
         "git_repo": null}, "binds": ["replay"]},
        {"name": "agent", "replicas": 2, "on_failure": "stop-experiment",
         "config": {"command": ["sleep", "1000"]}, "connects": ["replay"]}]});
    // A workflow with a run that fails (for retry) and one that waits (for cancel).
    let wf = json!({"name": "wf", "max_running": 1, "tasks": [
        {"name": "a", "config": {"command": ["sh", "-c", "exit 3"], "token": "s3cret"}},
        {"name": "b", "depends_on": ["a"], "config": {"command": ["true"]}}]});
    let (status, body) = c.post("/workflows", wf.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (_, failed) = c.post("/workflows/wf/runs", json!({})).await;
    let failed = failed["id"].as_str().unwrap().to_owned();
    c.wait("the run failed", |v| {
        v.runs
            .iter()
            .any(|r| r.id == failed && r.state.as_str() == "FAILED")
    })
    .await;
    let (_, waiting) = c
        .post("/workflows/wf/runs", json!({"params": {"k": 1}}))
        .await;
    let waiting = waiting["id"].as_str().unwrap().to_owned();
    // (method, path, body): documented operations first with good input, then error cases.
    let calls: Vec<(&str, String, Option<Value>)> = vec![
        ("post", "/workflows".into(), Some(wf.clone())),
        (
            "post",
            "/workflows".into(),
            Some(json!({"name": "empty", "tasks": []})),
        ),
        ("get", "/workflows".into(), None),
        ("get", "/workflows/wf".into(), None),
        ("get", "/workflows/nope".into(), None),
        (
            "post",
            "/workflows/wf/runs".into(),
            Some(json!({"params": {"lr": 0.1, "name": "x"}})),
        ),
        ("post", "/workflows/nope/runs".into(), Some(json!({}))),
        (
            "post",
            "/workflows/wf/runs".into(),
            Some(json!({"params": [1]})),
        ),
        ("get", "/runs?workflow=wf&limit=10".into(), None),
        ("get", "/runs?limit=x".into(), None),
        ("get", format!("/runs/{failed}"), None),
        ("get", "/runs/nope".into(), None),
        ("post", format!("/runs/{waiting}/cancel"), None),
        ("post", format!("/runs/{waiting}/cancel"), None),
        ("post", "/runs/nope/cancel".into(), None),
        ("post", format!("/runs/{failed}/retry"), None),
        ("post", format!("/runs/{failed}/retry"), None),
        ("post", "/runs/nope/retry".into(), None),
        (
            "post",
            "/conda-envs".into(),
            Some(json!({"name": "e1", "python_version": "3.11", "packages": "six, requests"})),
        ),
        (
            "post",
            "/conda-envs".into(),
            Some(json!({"name": "e1", "python_version": "3.11"})),
        ),
        (
            "post",
            "/conda-envs".into(),
            Some(json!({"name": "", "python_version": 3})),
        ),
        ("get", "/conda-envs?limit=5".into(), None),
        ("get", "/conda-envs?limit=x".into(), None),
        ("get", "/conda-envs/e1".into(), None),
        ("get", "/conda-envs/nope".into(), None),
        (
            "patch",
            "/conda-envs/e1".into(),
            Some(json!({"packages": ["six"], "custom_script": null})),
        ),
        (
            "patch",
            "/conda-envs/nope".into(),
            Some(json!({"packages": ["six"]})),
        ),
        (
            "patch",
            "/conda-envs/e1".into(),
            Some(json!({"custom_script": 5})),
        ),
        ("post", "/conda-envs/e1/rerun".into(), None),
        ("post", "/conda-envs/nope/rerun".into(), None),
        (
            "post",
            "/deployments".into(),
            Some(
                json!({"name": "full", "desired_state": "STOPPED", "kind": "EXEC", "specification": spec}),
            ),
        ),
        (
            "post",
            "/deployments".into(),
            Some(
                json!({"name": "bad", "specification": {"spec": {"config": {"command": "sleep"}}}}),
            ),
        ),
        ("get", "/deployments?limit=2&offset=0".into(), None),
        ("get", "/deployments?offset=x".into(), None),
        ("get", format!("/deployments/{kept}"), None),
        ("get", "/deployments/nope".into(), None),
        (
            "patch",
            format!("/deployments/{kept}"),
            Some(json!({"name": "renamed", "desired_state": null})),
        ),
        (
            "patch",
            "/deployments/nope".into(),
            Some(json!({"name": "x"})),
        ),
        (
            "patch",
            format!("/deployments/{kept}"),
            Some(json!({"desired_state": "PAUSED"})),
        ),
        ("delete", format!("/deployments/{doomed}"), None),
        ("delete", "/deployments/nope".into(), None),
        ("post", "/experiments".into(), Some(rl.clone())),
        ("post", "/experiments".into(), Some(rl.clone())),
        (
            "post",
            "/experiments".into(),
            Some(json!({"name": "x", "processes": "nope"})),
        ),
        ("get", "/experiments".into(), None),
        ("get", "/experiments/rl".into(), None),
        ("get", "/experiments/nope".into(), None),
        (
            "patch",
            "/experiments/rl".into(),
            Some(json!({"desired_state": "STOPPED"})),
        ),
        (
            "patch",
            "/experiments/rl".into(),
            Some(json!({"desired_state": "PAUSED"})),
        ),
        (
            "patch",
            "/experiments/nope".into(),
            Some(json!({"desired_state": "RUNNING"})),
        ),
        ("delete", "/experiments/rl".into(), None),
        ("delete", "/experiments/nope".into(), None),
        ("get", "/nodes".into(), None),
        ("get", "/services".into(), None),
        ("get", "/services/default/nope/".into(), None),
        ("get", "/services/default/nope/a".into(), None),
        ("get", "/port-forward/default/web".into(), None),
        ("delete", "/conda-envs/e1".into(), None),
        ("delete", "/conda-envs/e1".into(), None),
        ("get", "/metrics".into(), None),
        ("get", "/events?after=0&limit=1000".into(), None),
        (
            "get",
            "/events?kind=deployment&object=deployment".into(),
            None,
        ),
        ("get", "/events?limit=0".into(), None),
        ("get", format!("/deployments/{kept}/events?after=0"), None),
        ("get", "/nodes/n1/events?kind=node.connected".into(), None),
        ("get", "/openapi.json".into(), None),
        (
            "post",
            "/tokens".into(),
            Some(json!({"groups": ["gpu"], "ttl_sec": 60, "uses": 1, "node_id_prefix": "p-"})),
        ),
        ("post", "/tokens".into(), Some(json!({"ttl_sec": 0}))),
        ("post", "/tokens".into(), Some(json!({"groupz": []}))),
        ("get", "/tokens".into(), None),
        ("delete", "/tokens/nope".into(), None),
        (
            "post",
            "/api-tokens".into(),
            Some(json!({"name": "ci", "role": "viewer"})),
        ),
        (
            "post",
            "/api-tokens".into(),
            Some(json!({"name": "ci", "role": "viewer"})),
        ),
        (
            "post",
            "/api-tokens".into(),
            Some(json!({"name": "x", "role": "root"})),
        ),
        ("get", "/api-tokens".into(), None),
        ("delete", "/api-tokens/nope".into(), None),
        (
            "post",
            "/nodes/nope/revoke".into(),
            Some(json!({"reason": "x"})),
        ),
        (
            "post",
            "/auth/login".into(),
            Some(json!({"token": "SYMA1.a.b"})),
        ),
        ("post", "/auth/login".into(), Some(json!({}))),
        ("post", "/auth/logout".into(), None),
        ("get", "/auth/whoami".into(), None),
    ];
    let mut covered = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for (method, path, body) in calls {
        let route = path.split('?').next().unwrap();
        let template = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|t| {
                let (a, b): (Vec<&str>, Vec<&str>) =
                    (t.split('/').collect(), route.split('/').collect());
                a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.starts_with('{') || x == y)
            })
            .unwrap_or_else(|| panic!("{route} is not in the document"))
            .clone();
        let op = &doc["paths"][&template][method];
        assert!(op.is_object(), "{method} {template} is not documented");
        if let Some(b) = &body {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            let errs = schema_errors(&doc, schema, b);
            // Bad input must be refused by the schema too, good input accepted.
            let (status, resp) = c
                .request(
                    method.to_uppercase().parse().unwrap(),
                    &path,
                    Some(b.clone()),
                )
                .await;
            if status == 422 {
                if errs.is_empty() {
                    problems.push(format!(
                        "{method} {path}: the API refused {b}, the schema accepts it"
                    ));
                }
            } else if !errs.is_empty() {
                problems.push(format!("{method} {path}: the schema refuses {b}: {errs:?}"));
            }
            check(&doc, op, method, &path, status, &resp, &mut problems);
        } else {
            let (status, resp) = c
                .request(method.to_uppercase().parse().unwrap(), &path, None)
                .await;
            check(&doc, op, method, &path, status, &resp, &mut problems);
        }
        covered.insert((template, method));
    }
    // Every documented operation but the WebSockets (tested below) was exercised.
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "patch", "delete", "put"] {
            if item.get(method).is_some()
                && !template.starts_with("/ws/")
                && !covered.contains(&(template.clone(), method))
            {
                problems.push(format!(
                    "{method} {template} is documented but not exercised"
                ));
            }
        }
    }

    // WebSocket frames match their documented schemas.
    let ws = c.api.replace("http", "ws");
    let (mut updates, _) = tokio_tungstenite::connect_async(format!("{ws}/ws/updates"))
        .await
        .unwrap();
    let frame: Value =
        serde_json::from_str(&updates.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    let schema = json!({"$ref": "#/components/schemas/UpdateFrame"});
    problems.extend(schema_errors(&doc, &schema, &frame));
    // Delta frames: a snapshot, then a delta once something changes.
    let (mut deltas, _) = tokio_tungstenite::connect_async(format!("{ws}/ws/updates?frames=delta"))
        .await
        .unwrap();
    let frame: Value =
        serde_json::from_str(&deltas.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    problems.extend(schema_errors(&doc, &schema, &frame));
    let (status, _) = c
        .patch(
            &format!("/deployments/{kept}"),
            json!({"name": "kept-renamed"}),
        )
        .await;
    assert_eq!(status, 200);
    let frame: Value =
        serde_json::from_str(&deltas.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(frame["type"], "delta", "{frame}");
    let schema = json!({"$ref": "#/components/schemas/DeltaFrame"});
    problems.extend(schema_errors(&doc, &schema, &frame));
    let (mut logs, _) =
        tokio_tungstenite::connect_async(format!("{ws}/ws/deployments/{kept}/logs?tail=10"))
            .await
            .unwrap();
    let frame: Value =
        serde_json::from_str(&logs.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert!(!frame["entries"].as_array().unwrap().is_empty(), "{frame}");
    let schema = json!({"$ref": "#/components/schemas/LogFrame"});
    problems.extend(schema_errors(&doc, &schema, &frame));
    let (mut events, _) = tokio_tungstenite::connect_async(format!("{ws}/ws/events?after=0"))
        .await
        .unwrap();
    let frame: Value =
        serde_json::from_str(&events.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert!(!frame["events"].as_array().unwrap().is_empty(), "{frame}");
    let schema = json!({"$ref": "#/components/schemas/EventFrame"});
    problems.extend(schema_errors(&doc, &schema, &frame));

    assert!(problems.is_empty(), "{problems:#?}");
    c.shutdown().await;
}

/// The status must be documented for the operation, and the body must match its schema.
fn check(
    doc: &Value,
    op: &Value,
    method: &str,
    path: &str,
    status: u16,
    body: &Value,
    problems: &mut Vec<String>,
) {
    let Some(resp) = op["responses"].get(status.to_string()) else {
        problems.push(format!(
            "{method} {path}: status {status} is not documented ({body})"
        ));
        return;
    };
    let resp = deref(doc, resp);
    let media = resp["content"]
        .get("application/json")
        .or_else(|| resp["content"].get("text/plain"));
    match media.and_then(|m| m.get("schema")) {
        Some(schema) => {
            for e in schema_errors(doc, schema, body) {
                problems.push(format!("{method} {path} -> {status}: {e}"));
            }
        }
        None if status == 204 => {}
        None => problems.push(format!("{method} {path}: no schema for {status}")),
    }
}

#[tokio::test]
async fn updates_socket_pushes_changes() {
    let c = Cluster::start().await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/updates", c.api.replace("http", "ws")))
            .await
            .unwrap();
    let first: Value =
        serde_json::from_str(&ws.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(first["type"], "snapshot");
    assert_eq!(first["deployments"], json!([]));
    let id = c.deploy("pushed", sh("true")).await;
    loop {
        let frame: Value =
            serde_json::from_str(&ws.next().await.unwrap().unwrap().into_text().unwrap()).unwrap();
        if frame["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == id.as_str())
        {
            break;
        }
    }
    ws.close(None).await.unwrap();
    c.shutdown().await;
}

/// Every error is JSON in the documented `detail` shape with a documented status: query, path
/// and body rejections, `null` where the document has no null, unknown paths and methods, a
/// body over the limit, a plain GET on a WebSocket route.
#[tokio::test]
async fn every_error_is_json_in_the_detail_shape() {
    let c = Cluster::start().await;
    let (_, doc) = c.get("/openapi.json").await;
    let invalid = json!({"$ref": "#/components/schemas/HTTPValidationError"});
    let detail = json!({"$ref": "#/components/schemas/Detail"});
    let big = json!({"name": "x", "specification": {"pad": "x".repeat(3 * 1024 * 1024)}});
    // (method, path, body, status, schema, the named field for 422s)
    type Case<'a> = (&'a str, &'a str, Option<Value>, u16, &'a Value, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "GET",
            "/deployments?offset=1&offset=2",
            None,
            422,
            &invalid,
            "query.offset",
        ),
        (
            "GET",
            "/conda-envs?limit=1&limit=x&limit=3",
            None,
            422,
            &invalid,
            "query.limit",
        ),
        ("GET", "/deployments/%FF", None, 422, &invalid, "path.id"),
        (
            "DELETE",
            "/conda-envs/%FF%FE",
            None,
            422,
            &invalid,
            "path.name",
        ),
        (
            "POST",
            "/conda-envs",
            Some(json!({"name": "e", "python_version": "3.11", "packages": null})),
            422,
            &invalid,
            "body.packages",
        ),
        (
            "POST",
            "/conda-envs",
            Some(json!({"name": "e", "python_version": "3.11", "manager": null})),
            422,
            &invalid,
            "body.manager",
        ),
        (
            "POST",
            "/deployments",
            Some(json!({"name": null, "specification": {"spec": sh("true")}})),
            422,
            &invalid,
            "body.name",
        ),
        (
            "POST",
            "/deployments",
            Some(
                json!({"name": "x", "desired_state": null, "specification": {"spec": sh("true")}}),
            ),
            422,
            &invalid,
            "body.desired_state",
        ),
        ("POST", "/deployments", Some(big.clone()), 413, &detail, ""),
        ("PATCH", "/conda-envs/e", Some(big), 413, &detail, ""),
        ("GET", "/no/such/path", None, 404, &detail, ""),
        ("PUT", "/deployments", None, 405, &detail, ""),
        ("GET", "/ws/updates", None, 400, &detail, ""),
    ];
    for (method, path, body, status, schema, field) in cases {
        let mut req = c
            .http
            .request(method.parse().unwrap(), format!("{}{path}", c.api));
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            resp.headers()[reqwest::header::CONTENT_TYPE],
            "application/json",
            "{method} {path}"
        );
        if status == 405 {
            let allow = resp.headers()[reqwest::header::ALLOW].to_str().unwrap();
            assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
        }
        let text = resp.text().await.unwrap();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        let errs = schema_errors(&doc, schema, &v);
        assert!(errs.is_empty(), "{method} {path}: {v} {errs:?}");
        if status == 422 {
            assert_eq!(locs(&v), [field], "{method} {path}");
        }
        // The status is documented for the operation (fallbacks have none).
        let route = path.split('?').next().unwrap();
        if let Some(op) = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(t, _)| {
                let (a, b): (Vec<&str>, Vec<&str>) =
                    (t.split('/').collect(), route.split('/').collect());
                a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.starts_with('{') || x == y)
            })
            .and_then(|(_, item)| item.get(method.to_lowercase()))
        {
            assert!(
                op["responses"].get(status.to_string()).is_some(),
                "{method} {path}: {status} is not documented"
            );
        }
    }
    c.shutdown().await;
}

/// A deployment written as YAML (`Content-Type: application/yaml`) is the same deployment as
/// its JSON; bad YAML is a 422 naming the body and the place; a YAML list is not an object.
#[tokio::test]
async fn deployments_are_created_and_patched_from_yaml() {
    let c = Cluster::start().await;
    let send = |method: reqwest::Method, path: String, text: &'static str| {
        let req = c
            .http
            .request(method, format!("{}{path}", c.api))
            .header("content-type", "application/yaml")
            .body(text);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let yaml = "name: from-yaml\ndesired_state: STOPPED\nspecification:\n  spec:\n    config:\n      command: [sleep, \"1000\"]\n      env: {A: \"1\"}\n    capacity_requests:\n      slot: 2\n";
    let (status, created) = send(reqwest::Method::POST, "/deployments".into(), yaml).await;
    assert_eq!(status, 201, "{created}");
    let spec = &created["specification"]["spec"];
    assert_eq!(spec["config"]["command"], json!(["sleep", "1000"]));
    assert_eq!(spec["config"]["env"], json!({"A": "1"}));
    assert_eq!(spec["capacity_requests"], json!({"slot": 2}));
    assert_eq!(created["desired_state"], "STOPPED");
    let id = created["id"].as_str().unwrap().to_owned();

    let (status, patched) = send(
        reqwest::Method::PATCH,
        format!("/deployments/{id}"),
        "name: renamed # a comment\n",
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["name"], "renamed");
    assert_eq!(
        patched["specification"]["spec"]["capacity_requests"]["slot"],
        2
    );

    // Bad YAML: 422 on the body, saying where.
    let (status, body) = send(
        reqwest::Method::POST,
        "/deployments".into(),
        "name: x\nspecification: {spec: [\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(locs(&body), ["body"], "{body}");
    assert_eq!(body["detail"][0]["type"], "yaml_invalid", "{body}");
    assert!(
        body["detail"][0]["msg"].as_str().unwrap().contains("line"),
        "{body}"
    );
    // Aliases that would expand past the budget: a 422, not a pause or a 500.
    let laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
    let (status, body) = send(reqwest::Method::POST, "/deployments".into(), laughs).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(locs(&body), ["body"], "{body}");
    // A list is not a body; the spec's own rules apply as for JSON.
    let (status, body) = send(reqwest::Method::POST, "/deployments".into(), "- a\n").await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = send(
        reqwest::Method::POST,
        "/deployments".into(),
        "name: y\nspecification:\n  spec:\n    config:\n      command: [sleep, 1000]\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(locs(&body).iter().any(|l| l.contains("command")), "{body}");
    c.shutdown().await;
}
