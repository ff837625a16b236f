//! The web UI in a real browser: headless Chromium driven through chromedriver (WebDriver).
//!
//! Without `chromedriver`/`chromium` the tests say they are skipped, except under `CI=true`
//! (`.ci/run` installs both), where a missing browser is a failure. Screenshots of each page
//! go to `target/ui-shots/`.

use fantoccini::Locator;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::support::{Cluster, sh};

/// Types `value` into the input `name` of `form`, in place of what it held.
async fn fill(form: &fantoccini::elements::Element, name: &str, value: &str) {
    let input = form
        .find(Locator::Css(&format!("input[name={name}]")))
        .await
        .unwrap();
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

/// Presses the form's submit button.
async fn submit(form: &fantoccini::elements::Element) {
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The table's rows as `{id, name, current, desired}`.
const ROWS: &str = "return [...document.querySelectorAll('#deployments tbody tr')].map(tr => ({
    id: tr.dataset.id,
    name: tr.querySelector('[data-col=name]').textContent,
    current: tr.querySelector('[data-col=current]').textContent,
    desired: tr.querySelector('[data-col=desired]').textContent,
    hidden: tr.hidden}));";

fn row<'a>(rows: &'a Value, name: &str) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| r["name"] == name)
}

/// Create through the form and watch it run without a reload; a bad field shows the API's
/// 422 on that field; stop and start from the row; delete with its confirmation; a name that
/// is markup is shown as text and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_page_creates_runs_stops_and_deletes_live() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    b.client
        .goto(&format!("{}/ui/", c.api))
        .await
        .expect("the UI loads");
    let form = b.el("#create").await;
    fill(&form, "name", "from-the-form").await;
    fill(&form, "command", "sleep 1000").await;
    submit(&form).await;
    let rows = b
        .until("the new deployment RUNNING in the table", ROWS, |v| {
            row(v, "from-the-form").is_some_and(|r| r["current"] == "RUNNING")
        })
        .await;
    let id = row(&rows, "from-the-form").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, d) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(d["current_state"], "RUNNING", "{d}");
    b.screenshot("deployments").await;

    // A command the API refuses: its 422 lands on the command field.
    fill(&form, "name", "bad").await;
    fill(&form, "command", "[1, 2]").await;
    submit(&form).await;
    b.until(
        "the 422 on the command field",
        "return document.querySelector('[data-error-for=\"spec.config.command\"]').textContent;",
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await;

    // Stop, then start again, from the row.
    let toggle = format!("tr[data-id=\"{id}\"] button.toggle");
    b.el(&toggle).await.click().await.unwrap();
    b.until("stopped", ROWS, |v| {
        row(v, "from-the-form")
            .is_some_and(|r| r["desired"] == "STOPPED" && r["current"] == "STOPPED")
    })
    .await;
    // The state filter hides what does not match, and shows it again.
    let pick = "const s = document.getElementById('filter-state'); s.value = arguments[0]; s.dispatchEvent(new Event('change'));";
    b.client
        .execute(pick, vec![json!("RUNNING")])
        .await
        .unwrap();
    b.until("hidden by the filter", ROWS, |v| {
        row(v, "from-the-form").is_some_and(|r| r["hidden"] == true)
    })
    .await;
    b.client.execute(pick, vec![json!("")]).await.unwrap();
    b.until("shown again", ROWS, |v| {
        row(v, "from-the-form").is_some_and(|r| r["hidden"] == false)
    })
    .await;
    b.el(&toggle).await.click().await.unwrap();
    b.until("RUNNING again", ROWS, |v| {
        row(v, "from-the-form")
            .is_some_and(|r| r["desired"] == "RUNNING" && r["current"] == "RUNNING")
    })
    .await;

    // Markup in a name is text: no element made, no script run.
    let evil = "<img src=x onerror=alert(1)>";
    c.deploy(evil, sh("sleep 1000")).await;
    b.until("the markup-named row", ROWS, |v| row(v, evil).is_some())
        .await;
    let imgs = b
        .client
        .execute(
            "return document.querySelectorAll('#deployments img').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(imgs, json!(0));
    assert!(
        b.client.get_alert_text().await.is_err(),
        "no alert may be open"
    );

    // The whole body written as YAML in the page's editor.
    b.client
        .execute(
            "document.querySelector('#create-raw').closest('details').open = true; const f = document.getElementById('create-raw'); f.querySelector('select[name=format]').value = 'yaml'; f.querySelector('textarea').value = arguments[0];",
            vec![json!("name: from-yaml\nspecification:\n  spec:\n    config:\n      command: [sleep, \"1000\"]\n")],
        )
        .await
        .unwrap();
    b.el("#create-raw button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    b.until("the YAML's deployment RUNNING", ROWS, |v| {
        row(v, "from-yaml").is_some_and(|r| r["current"] == "RUNNING")
    })
    .await;

    // Delete asks to confirm, then the row goes.
    let del = format!("tr[data-id=\"{id}\"] button.delete");
    for _ in 0..2 {
        b.el(&del).await.click().await.unwrap();
    }
    b.until("the row gone", ROWS, |v| row(v, "from-the-form").is_none())
        .await;
    let (status, _) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(status, 404);
    b.close().await;
    c.shutdown().await;
}

/// With tokens on, the UI asks for one, signs in (cookie), and shows the live table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_signs_in_with_a_token() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start_with(|cfg| cfg.api_auth = Some(true)).await;
    c.add_node("n1", &[], &[], false).await;
    let token = c
        .api_token("browser", symphony::conductor::trust::Role::Operator)
        .await;
    b.client.goto(&format!("{}/ui/", c.api)).await.unwrap();
    let login = b.el("#login").await;
    fill(&login, "token", &token).await;
    submit(&login).await;
    b.until(
        "the deployments page after sign-in",
        "return !!document.querySelector('#deployments') && document.getElementById('who').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("browser")),
    )
    .await;
    b.screenshot("login-then-deployments").await;
    // An operator sees no tokens page and no revoke buttons (an admin does: see below).
    let hidden = b
        .client
        .execute(
            "return document.getElementById('nav-tokens').hidden;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(true));
    b.client.goto(&format!("{}/ui/nodes", c.api)).await.unwrap();
    b.el("article[data-id=n1] [data-fact=state]").await;
    let revokes = b
        .client
        .execute(
            "return document.querySelectorAll('button.revoke').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(revokes, json!(0));
    b.close().await;
    c.shutdown().await;
}

/// A deployment's page: its state, live log lines, its events; the events page follows the
/// cluster live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployments_page_shows_live_logs_and_events() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[], false).await;
    let id = c
        .deploy(
            "ticker",
            sh("i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"),
        )
        .await;
    c.wait_state(&id, "RUNNING").await;
    b.client
        .goto(&format!("{}/ui/deployments/{id}", c.api))
        .await
        .unwrap();
    let lines = b
        .until(
            "log lines arriving",
            "return [...document.querySelectorAll('#logs .line')].map(d => d.textContent);",
            |v| v.as_array().is_some_and(|a| a.len() >= 3),
        )
        .await;
    let all: Vec<&str> = lines
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(all.iter().any(|l| l.contains("[stdout] tick 1")), "{all:?}");
    assert!(
        all.iter().any(|l| l.contains("[system] started")),
        "{all:?}"
    );
    // More arrive while the page is open (live, not a reload).
    let seen = lines.as_array().unwrap().len();
    b.until(
        "more lines",
        "return document.querySelectorAll('#logs .line').length;",
        |v| v.as_u64().is_some_and(|n| n as usize > seen),
    )
    .await;
    b.until(
        "the started event",
        "return [...document.querySelectorAll('#events li')].map(li => li.dataset.kind);",
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().any(|k| k == "deployment.started"))
        },
    )
    .await;
    let state = b
        .client
        .execute(
            "return document.querySelector('[data-fact=current]').textContent;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(state, json!("RUNNING"));
    b.screenshot("deployment").await;

    // The events page: a deployment made now shows up without a reload.
    b.client
        .goto(&format!("{}/ui/events", c.api))
        .await
        .unwrap();
    b.until(
        "the timeline",
        "return document.querySelectorAll('#timeline li').length;",
        |v| v.as_u64().is_some_and(|n| n > 0),
    )
    .await;
    c.deploy("late", sh("sleep 1000")).await;
    b.until(
        "the new deployment's event",
        "return [...document.querySelectorAll('#timeline li')].map(li => li.textContent);",
        |v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|t| t.as_str().is_some_and(|t| t.contains("late created")))
            })
        },
    )
    .await;
    b.screenshot("events").await;
    b.close().await;
    c.shutdown().await;
}

/// Envs: create through the form (a bad field shows the API's 422 on it), then delete with
/// its confirmation. No node runs, so nothing is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_are_created_edited_and_deleted_from_the_page() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let c = Cluster::start().await;
    b.client.goto(&format!("{}/ui/envs", c.api)).await.unwrap();
    let form = b.el("#create-env").await;
    // No python version: the API's 422 lands on that field.
    fill(&form, "name", "torch").await;
    submit(&form).await;
    b.until(
        "the 422 on python_version",
        "return document.querySelector('[data-error-for=python_version]').textContent;",
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await;
    fill(&form, "python_version", "3.11").await;
    fill(&form, "packages", "six, requests").await;
    submit(&form).await;
    let rows =
        "return [...document.querySelectorAll('#envs tbody tr')].map(tr => tr.dataset.name);";
    b.until("the env listed", rows, |v| {
        v.as_array().is_some_and(|a| a.iter().any(|n| n == "torch"))
    })
    .await;
    let (status, env) = c.get("/conda-envs/torch").await;
    assert_eq!(status, 200, "{env}");
    assert_eq!(env["packages"], json!(["six", "requests"]));
    // Edit: the form takes the env's values; a bad package is a 422 on that field; then saved.
    b.el("tr[data-name=torch] button.edit")
        .await
        .click()
        .await
        .unwrap();
    let shown = b
        .until(
            "the form filled for editing",
            "return [document.querySelector('#create-env input[name=packages]').value, document.querySelector('#create-env input[name=name]').disabled];",
            |v| v[0] == "six, requests",
        )
        .await;
    assert_eq!(shown[1], json!(true), "the name is fixed");
    fill(&form, "packages", &format!("six, {}", "x".repeat(600))).await;
    submit(&form).await;
    b.until(
        "the 422 on packages",
        "return document.querySelector('[data-error-for=packages]').textContent;",
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await;
    fill(&form, "packages", "six, requests, idna").await;
    fill(&form, "custom_script", "echo ready").await;
    submit(&form).await;
    b.until(
        "the new packages listed",
        "const tr = document.querySelector('#envs tr[data-name=torch]'); return tr ? tr.children[3].textContent : '';",
        |v| v == "six, requests, idna",
    )
    .await;
    let (_, env) = c.get("/conda-envs/torch").await;
    assert_eq!(env["packages"], json!(["six", "requests", "idna"]), "{env}");
    assert_eq!(env["custom_script"], "echo ready", "{env}");
    b.screenshot("envs").await;
    for _ in 0..2 {
        b.el("tr[data-name=torch] button.delete")
            .await
            .click()
            .await
            .unwrap();
    }
    b.until("the env gone", rows, |v| {
        v.as_array()
            .is_some_and(|a| !a.iter().any(|n| n == "torch"))
    })
    .await;
    let (status, _) = c.get("/conda-envs/torch").await;
    assert_eq!(status, 404);
    b.close().await;
    c.shutdown().await;
}

/// Nodes: reserved vs total capacity beside measured use, a bar per core with real values,
/// and a history chart that grows with the heartbeats (no reload); a deployment's GPU use in
/// the deployments table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_page_shows_capacity_and_live_charts() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.add_node("n1", &["gpu"], &[("slot", 4)], false).await;
    let id = c
        .deploy(
            "holds-a-slot",
            json!({"config": {"command": ["sleep", "1000"]}, "capacity_requests": {"slot": 1}}),
        )
        .await;
    c.wait_state(&id, "RUNNING").await;
    b.client.goto(&format!("{}/ui/nodes", c.api)).await.unwrap();
    let capacity = b
        .until(
            "the node's capacity",
            "const d = document.querySelector('article[data-id=n1] [data-fact=capacity]'); return d ? d.textContent : '';",
            |v| v.as_str().is_some_and(|s| s.contains("slot: 1 / 4 reserved") && s.contains("measured: cpu")),
        )
        .await;
    assert!(!capacity.as_str().unwrap().contains("cpu ?"), "{capacity}");
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    b.until(
        "a bar per core",
        "return document.querySelectorAll('article[data-id=n1] .cores .meter').length;",
        |v| v.as_u64() == Some(cores as u64),
    )
    .await;
    b.until(
        "the CPU history growing",
        "const s = document.querySelector('article[data-id=n1] [data-chart=cpu] svg'); return s ? Number(s.dataset.samples) : 0;",
        |v| v.as_u64().is_some_and(|n| n >= 3),
    )
    .await;
    b.screenshot("nodes").await;

    // A deployment's GPU use (from its node's NVML, a fake here) in the deployments table.
    let fake = std::sync::Arc::new(crate::gpus::FakeNvml::default());
    c.add_node_with_gpus("g1", fake.clone()).await;
    let train = c
        .deploy(
            "trains",
            json!({"config": {"command": ["sleep", "1000"]}, "node_group": "local"}),
        )
        .await;
    let leader = crate::support::pid_of(&c.wait_state(&train, "RUNNING").await);
    *fake.0.lock().unwrap() = vec![symphony::node::monitor::GpuProcess {
        gpu_index: 0,
        pid: u32::try_from(leader).unwrap(),
        memory_bytes: Some(3 << 29),
        sm_util_percent: Some(40),
    }];
    b.client.goto(&format!("{}/ui/", c.api)).await.unwrap();
    b.until(
        "its GPU use in the table",
        &format!("const td = document.querySelector('tr[data-id=\"{train}\"] [data-col=gpu]'); return td ? td.textContent : '';"),
        |v| v == "GPU 0: 1.5 GiB 40%",
    )
    .await;
    b.close().await;
    c.shutdown().await;
}

/// A conductor restart: the page shows the banner, reconnects by itself, and is live again
/// (a deployment made after the restart appears without a reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_restart_shows_the_banner_and_recovers() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.deploy("before", json!({"config": {"command": ["true"]}}))
        .await;
    b.client.goto(&format!("{}/ui/", c.api)).await.unwrap();
    b.until("the table", ROWS, |v| row(v, "before").is_some())
        .await;
    c.restart_conductor().await;
    b.until(
        "the page noticed the socket closing",
        "return window.symphonyDisconnects || 0;",
        |v| v.as_u64().is_some_and(|n| n >= 1),
    )
    .await;
    c.deploy("after", json!({"config": {"command": ["true"]}}))
        .await;
    b.until("live again after the restart", ROWS, |v| {
        row(v, "after").is_some() && row(v, "before").is_some()
    })
    .await;
    let hidden = b
        .client
        .execute("return document.getElementById('banner').hidden;", vec![])
        .await
        .unwrap();
    assert_eq!(hidden, json!(true), "the banner goes once reconnected");
    b.close().await;
    c.shutdown().await;
}

/// Scale: 1 000 deployments render once (one snapshot frame), then every later frame is a
/// delta that touches only the rows it names. Prints the browser's own timings (tests assert
/// no timing; `benches/ui.rs` compares them with full snapshots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployments_table_at_scale() {
    const N: usize = 1000;
    let Some(b) = Browser::start().await else {
        return;
    };
    let c = Cluster::start().await;
    let mut ids = Vec::new();
    for i in 0..N {
        let (status, body) = c
            .post(
                "/deployments",
                json!({"name": format!("d{i:04}"), "desired_state": "STOPPED",
                       "specification": {"spec": {"config": {"command": ["true"]}}}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    b.client.goto(&format!("{}/ui/", c.api)).await.unwrap();
    b.until(
        "every row",
        "return document.querySelectorAll('#deployments tbody tr').length;",
        |v| v.as_u64() == Some(N as u64),
    )
    .await;
    let first = b
        .client
        .execute(
            "return [window.symphonyRender, window.symphonyPartial || 0];",
            vec![],
        )
        .await
        .unwrap();
    let (first, partial_before) = (first[0].clone(), first[1].as_f64().unwrap());
    // Twenty updates, each a PATCH of one deployment's name (the page must show each).
    for (k, id) in ids.iter().take(20).enumerate() {
        c.patch(
            &format!("/deployments/{id}"),
            json!({"name": format!("renamed-{k}")}),
        )
        .await;
    }
    b.until("the renames shown", ROWS, |v| {
        row(v, "renamed-19").is_some()
    })
    .await;
    let after = b
        .client
        .execute(
            "return [window.symphonyRender, window.symphonyPartial || 0];",
            vec![],
        )
        .await
        .unwrap();
    let (after, partial_after) = (after[0].clone(), after[1].as_f64().unwrap());
    let updates = after["count"].as_f64().unwrap() - first["count"].as_f64().unwrap();
    let per_update = (after["total_ms"].as_f64().unwrap() - first["total_ms"].as_f64().unwrap())
        / updates.max(1.0);
    eprintln!(
        "UI at {N} deployments: first render done {:.0} ms after navigation (its render {:.1} ms); {updates} updates, {per_update:.2} ms each on average, max {:.1} ms",
        first["first_at_ms"].as_f64().unwrap(),
        first["max_ms"].as_f64().unwrap(),
        after["max_ms"].as_f64().unwrap()
    );
    assert!(updates >= 1.0, "{after}");
    assert_eq!(
        partial_after - partial_before,
        updates,
        "every frame after the first touched only its rows"
    );
    b.close().await;
    c.shutdown().await;
}

/// Experiments (processes by group with their nodes and states) and services (binder and
/// connectors) as launched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_and_services_pages() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let ports = crate::support::free_port_range(8);
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = ports).await;
    c.add_node("n1", &[], &[], false).await;
    let (status, body) = c
        .post(
            "/experiments",
            json!({"name": "rl", "processes": [
                {"name": "learner", "group": "train", "config": {"command": ["sleep", "1000"]},
                 "binds": ["replay"]},
                {"name": "agent", "replicas": 2, "config": {"command": ["sleep", "1000"]},
                 "connects": ["replay"]}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    b.client
        .goto(&format!("{}/ui/experiments", c.api))
        .await
        .unwrap();
    b.until(
        "three processes RUNNING",
        "return [...document.querySelectorAll('article[data-name=rl] tbody tr')].map(tr => tr.children[3].textContent);",
        |v| v.as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|s| s == "RUNNING")),
    )
    .await;
    b.screenshot("experiments").await;
    b.client
        .goto(&format!("{}/ui/services", c.api))
        .await
        .unwrap();
    let row = b
        .until(
            "the replay service",
            "const tr = document.querySelector('tr[data-service=\"rl/replay\"]'); return tr ? [...tr.children].map(td => td.textContent) : null;",
            |v| v.is_array(),
        )
        .await;
    assert_eq!(row[3], "rl/learner", "{row}");
    assert_eq!(row[5], "2", "{row}");
    b.screenshot("services").await;
    b.close().await;
    c.shutdown().await;
}

/// The form's common fields reach the spec (the git token stays secret: masked in the API,
/// never on the page), and the whole spec is edited as JSON on the deployment's page: a bad
/// field lists the API's 422, a good edit runs a new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_is_made_by_the_form_and_edited_as_json_and_yaml() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 4)], false).await;
    b.client.goto(&format!("{}/ui/", c.api)).await.unwrap();
    let form = b.el("#create").await;
    for (name, value) in [
        ("name", "full"),
        ("command", "sleep 1000"),
        ("env", "A=1, B=two"),
        ("capacity", "slot=2"),
        ("token", "s3cret-token"),
        ("cron", "0 3 * * *"),
        ("timezone", "Europe/Paris"),
    ] {
        fill(&form, name, value).await;
    }
    submit(&form).await;
    let rows = b
        .until("the deployment RUNNING", ROWS, |v| {
            row(v, "full").is_some_and(|r| r["current"] == "RUNNING")
        })
        .await;
    let id = row(&rows, "full").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, d) = c.get(&format!("/deployments/{id}")).await;
    let spec = &d["specification"]["spec"];
    assert_eq!(spec["config"]["env"], json!({"A": "1", "B": "two"}), "{d}");
    assert_eq!(spec["capacity_requests"], json!({"slot": 2}), "{d}");
    assert_eq!(spec["auto_restart"]["timezone"], "Europe/Paris", "{d}");
    assert_ne!(spec["config"]["token"], "s3cret-token", "masked: {d}");

    b.client
        .goto(&format!("{}/ui/deployments/{id}", c.api))
        .await
        .unwrap();
    b.until(
        "the spec shown",
        "return document.getElementById('spec').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("capacity_requests")),
    )
    .await;
    let page = b.client.source().await.unwrap();
    assert!(!page.contains("s3cret-token"), "the token reached the page");
    // The editor starts from the deployment as YAML (what a user sees on focus).
    let shown = b
        .client
        .execute(
            "const a = document.querySelector('#edit-spec textarea'); a.focus(); return a.value;",
            vec![],
        )
        .await
        .unwrap();
    let shown = shown.as_str().unwrap_or_default().to_owned();
    assert!(
        shown.starts_with("name: full\nspecification:\n  spec:\n"),
        "{shown}"
    );
    assert!(shown.contains("timezone: Europe/Paris"), "{shown}");
    assert!(!shown.contains("s3cret-token"), "{shown}");
    let edit = |format: &'static str, text: String| {
        let b = &b;
        async move {
            b.client
                .execute(
                    "const f = document.getElementById('edit-spec'); f.querySelector('select[name=format]').value = arguments[0]; f.querySelector('textarea').value = arguments[1];",
                    vec![json!(format), json!(text)],
                )
                .await
                .unwrap();
            b.el("#edit-spec button[type=submit]")
                .await
                .click()
                .await
                .unwrap();
        }
    };
    // The YAML the page showed, edited and saved as YAML: the page's YAML reads back as the
    // same values (the env, capacity and masked token kept), with the new command.
    let yaml = shown.replace(
        "command: [sh, \"-c\", \"sleep 1000\"]",
        "command: [sleep, \"998\"]",
    );
    assert!(
        yaml.contains("\"998\""),
        "the command line was not found in {shown}"
    );
    edit("yaml", yaml).await;
    c.wait(&format!("{id} runs the YAML's command"), |v| {
        v.deployment(&id).is_some_and(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.generation.get() >= 2 && s.state == symphony::model::CurrentState::Running
            })
        })
    })
    .await;
    let (_, d) = c.get(&format!("/deployments/{id}")).await;
    let spec = &d["specification"]["spec"];
    assert_eq!(spec["config"]["command"], json!(["sleep", "998"]), "{d}");
    assert_eq!(spec["config"]["env"], json!({"A": "1", "B": "two"}), "{d}");
    assert_eq!(spec["capacity_requests"], json!({"slot": 2}), "{d}");
    assert!(
        spec["config"]["token"].is_string(),
        "the masked token kept: {d}"
    );
    let as_json = |spec: Value| serde_json::to_string(&json!({"specification": spec})).unwrap();
    edit(
        "json",
        as_json(json!({"spec": {"config": {"command": ["sleep", "1000"]},
                                "restart_policy": {"type": "sometimes"}}})),
    )
    .await;
    b.until(
        "the 422 listed",
        "return [...document.querySelectorAll('#edit-spec li')].map(li => li.textContent);",
        |v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|t| t.as_str().is_some_and(|t| t.contains("restart_policy")))
            })
        },
    )
    .await;
    edit(
        "json",
        as_json(json!({"spec": {"config": {"command": ["sleep", "999"]}}})),
    )
    .await;
    c.wait(&format!("{id} runs its new command"), |v| {
        v.deployment(&id).is_some_and(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.generation.get() >= 3 && s.state == symphony::model::CurrentState::Running
            })
        })
    })
    .await;
    let (_, raw) = c.get("/deployments").await;
    assert!(!raw.to_string().contains("s3cret-token"));
    b.until(
        "the page's spec follows the edit",
        "return document.getElementById('spec').textContent;",
        |v| {
            v.as_str()
                .is_some_and(|s| s.contains("command: [sleep, \"999\"]"))
        },
    )
    .await;
    b.screenshot("deployment-edit").await;
    b.close().await;
    c.shutdown().await;
}

/// Tokens (what an admin sees): a join token made on the page is shown once and works for a
/// real enrollment, its uses follow; the node is revoked from the nodes page; an API token is
/// made and revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_makes_and_revokes_tokens_and_nodes() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    b.client
        .goto(&format!("{}/ui/tokens", c.api))
        .await
        .unwrap();
    let form = b.el("#create-join-token").await;
    let hidden = b
        .client
        .execute(
            "return document.getElementById('nav-tokens').hidden;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(false), "an admin sees the tokens page");
    fill(&form, "groups", "gpu").await;
    fill(&form, "uses", "1").await;
    submit(&form).await;
    let token = b
        .until(
            "the new join token shown once",
            "const s = document.querySelector('#create-join-token [data-secret] code'); return s ? s.textContent : '';",
            |v| v.as_str().is_some_and(|t| t.starts_with("SYM1.")),
        )
        .await;
    let token = token.as_str().unwrap().to_owned();
    let states = "return [...document.querySelectorAll('#join-tokens tbody tr')].map(tr => tr.querySelector('[data-col=state]').textContent);";
    b.until("listed as active", states, |v| v == &json!(["active"]))
        .await;
    let page = b.client.source().await.unwrap();
    let secret = token.rsplit('.').next().unwrap();
    assert_eq!(
        page.matches(secret).count(),
        1,
        "only the one-time display holds the secret"
    );
    // The token from the page enrolls a node; the page shows it used up.
    let cfg = c.enroll("pod", &token, &["gpu"]).await.unwrap();
    let node_id = cfg.node_id.clone();
    c.run_agent("pod", cfg);
    b.until("used up once the node joined", states, |v| {
        v == &json!(["used up"])
    })
    .await;
    b.screenshot("tokens").await;

    // The node is revoked from its card (asks to confirm first).
    b.client.goto(&format!("{}/ui/nodes", c.api)).await.unwrap();
    let button = format!("article[data-id=\"{node_id}\"] button.revoke");
    for _ in 0..2 {
        b.el(&button).await.click().await.unwrap();
    }
    c.wait("the node revoked", |v| {
        v.nodes.get(&node_id).is_some_and(|n| {
            n.certificate
                .as_ref()
                .is_some_and(|cert| cert.state == "revoked")
        })
    })
    .await;
    b.until(
        "the revoke button gone",
        &format!("const b = document.querySelector('{button}'); return b ? b.hidden : null;"),
        |v| v == &json!(true),
    )
    .await;

    // An API token: made, shown once, revoked.
    b.client
        .goto(&format!("{}/ui/tokens", c.api))
        .await
        .unwrap();
    let form = b.el("#create-api-token").await;
    fill(&form, "name", "ci").await;
    submit(&form).await;
    b.until(
        "the new API token shown once",
        "const s = document.querySelector('#create-api-token [data-secret] code'); return s ? s.textContent : '';",
        |v| v.as_str().is_some_and(|t| t.starts_with("SYMA1.")),
    )
    .await;
    let api_states = "return [...document.querySelectorAll('#api-tokens tbody tr')].map(tr => tr.children[1].textContent + ' ' + tr.children[2].textContent + ' ' + tr.querySelector('[data-col=state]').textContent);";
    b.until("listed", api_states, |v| v == &json!(["ci viewer active"]))
        .await;
    for _ in 0..2 {
        b.el("#api-tokens button.revoke")
            .await
            .click()
            .await
            .unwrap();
    }
    b.until("revoked", api_states, |v| {
        v.as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with("ci viewer revoked"))
    })
    .await;
    let (_, list) = c.get("/api-tokens").await;
    assert!(list[0]["revoked_at_ms"].is_i64(), "{list}");
    b.close().await;
    c.shutdown().await;
}

/// The page's YAML says the same values as the JSON it came from: a spec full of strings
/// that YAML reads as something else unless quoted, saved back unchanged from the editor,
/// is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_yaml_editor_round_trips_awkward_values() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let c = Cluster::start().await;
    let mut env = json!({
        "EMPTY": "", "NUM": "123", "EXP": "1e3", "DASH": "-", "DOT": ".5", "NULL": "null",
        "TILDE": "~", "YES": "yes", "Y": "y", "ON": "on", "COLON": "a: b", "HASH": "#x",
        "LEAD": " lead", "TRAIL": "trail ", "UNI": "ünï ✓", "C1": "a\u{85}b\u{80}c\u{9f}",
        "NL": "one\ntwo", "QUOTE": "say \"hi\"", "BACK": "a\\b", "STAR": "*x", "AMP": "&y",
        "BANG": "!z", "PCT": "%p", "AT": "@q", "BT": "`r", "BRACE": "{s}", "BRACK": "[t]",
        "inf": "inf", "nan": ".nan", "k:ey": "v", "#k": "v2", "long": "x".repeat(3000)
    });
    // A key past YAML's 1024-character limit for plain keys.
    env.as_object_mut()
        .unwrap()
        .insert("K".repeat(1100), json!("v"));
    let spec = json!({"config": {"command": ["sleep", "1000", "--", "[a]", "-x"]}, "env": env,
        "capacity_requests": {}, "node_group": null});
    let id = c.deploy("awkward", spec).await;
    let (_, before) = c.get(&format!("/deployments/{id}")).await;
    b.client
        .goto(&format!("{}/ui/deployments/{id}", c.api))
        .await
        .unwrap();
    b.until(
        "the spec shown",
        "return document.getElementById('spec').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("EMPTY")),
    )
    .await;
    b.client
        .execute(
            "const a = document.querySelector('#edit-spec textarea'); a.focus();",
            vec![],
        )
        .await
        .unwrap();
    b.el("#edit-spec button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    let saved = b
        .until(
            "saved or refused",
            "return [...document.querySelectorAll('#edit-spec li')].map(li => li.textContent);",
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
        )
        .await;
    assert_eq!(saved, json!(["saved"]), "the page's own YAML was refused");
    let (_, after) = c.get(&format!("/deployments/{id}")).await;
    assert_eq!(
        after["specification"], before["specification"],
        "the YAML said other values"
    );
    b.close().await;
    c.shutdown().await;
}

/// Runs: a run started from the page, its DAG by levels with live task states (no reload),
/// each task linking to its logs; a failed run offers a retry of its failed tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_started_and_followed_on_its_dag() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut c = Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let gate = c.node_work_dir("n1").join("gate");
    let wait = format!("while ! test -e {}; do sleep 0.05; done", gate.display());
    let (status, body) = c
        .post(
            "/workflows",
            json!({"name": "diamond", "tasks": [
                {"name": "a", "config": {"command": ["sh", "-c", wait]}},
                {"name": "b", "depends_on": ["a"], "config": {"command": ["sh", "-c", "test \"$SYMPHONY_PARAM_OK\" = yes"]}},
                {"name": "c", "depends_on": ["a"], "config": {"command": ["true"]}},
                {"name": "d", "depends_on": ["b", "c"], "config": {"command": ["true"]}}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    b.client.goto(&format!("{}/ui/runs", c.api)).await.unwrap();
    let row = b.el("#workflows tr[data-name=diamond]").await;
    fill(&row, "params", "ok=no").await;
    b.el("#workflows tr[data-name=diamond] button.start-run")
        .await
        .click()
        .await
        .unwrap();
    let link = b.el("#runs tbody tr a").await;
    link.click().await.unwrap();
    let levels = "return [...document.querySelectorAll('#dag .level')].map(l => [...l.querySelectorAll('.task')].map(t => t.dataset.task + ':' + t.querySelector('.task-state').textContent));";
    b.until("a running at the top of its DAG", levels, |v| {
        v == &json!([["a:RUNNING"], ["b:WAITING", "c:WAITING"], ["d:WAITING"]])
    })
    .await;
    std::fs::write(&gate, "").unwrap();
    b.until("b failed, d never ran, c succeeded", levels, |v| {
        v == &json!([
            ["a:SUCCEEDED"],
            ["b:FAILED", "c:SUCCEEDED"],
            ["d:UPSTREAM_FAILED"]
        ])
    })
    .await;
    let logs = b
        .client
        .execute(
            "return document.querySelector('#dag [data-task=b] a').getAttribute('href');",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        logs.as_str()
            .is_some_and(|h| h.starts_with("/ui/deployments/")),
        "{logs}"
    );
    b.screenshot("run").await;
    b.el("button.retry").await;
    b.close().await;
    c.shutdown().await;
}
