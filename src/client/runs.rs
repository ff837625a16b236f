//! Client commands for workflows: `run FILE [--param k=v] [--wait]` (defines the workflow, a
//! new version when it changed, starts a run, and with `--wait` follows it with a progress
//! line until it ends), `runs`, `run show ID` (the DAG as a tree with states), `run cancel ID`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, ClientError, Exit, print_json, read_spec_file, render};
use crate::time::now_ms;

/// How often `--wait` reads the run.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `done/total done, N running, N failed`.
fn progress_line(run: &Value) -> String {
    let p = if run["progress"].is_object() {
        &run["progress"]
    } else {
        &run["tasks"]
    };
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let (done, total) = (n("done"), n("total"));
    let width = 20u64;
    let filled = (done * width).checked_div(total).unwrap_or(0);
    let bar: String = (0..width)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    format!(
        "[{bar}] {done}/{total} done, {} running, {} failed  {}",
        n("running"),
        n("failed"),
        text(run, "state")
    )
}

/// `symphony run FILE [--param k=v]... [--wait]`.
pub async fn run_file(
    api: &str,
    file: &Path,
    params: &[(String, String)],
    wait: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let def = read_spec_file(file).await?;
    let client = Client::new(api)?;
    let workflow: Value = client
        .request(Method::POST, &["workflows"], &[], Some(&def))
        .await?;
    let name = text(&workflow, "name");
    let params: BTreeMap<&str, &str> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let run: Value = client
        .request(
            Method::POST,
            &["workflows", &name, "runs"],
            &[],
            Some(&json!({ "params": params })),
        )
        .await?;
    let id = text(&run, "id");
    writeln!(
        out,
        "run {id} of {name} (version {}): {}",
        workflow["version"],
        text(&run, "state")
    )?;
    if !wait {
        return Ok(Exit::Ok);
    }
    follow(&client, &id, out).await
}

/// Reads the run until it ends, printing its progress when it changes (one line rewritten in
/// place on a terminal); exit 0 only when it SUCCEEDED.
async fn follow(client: &Client, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let run: Value = client
            .request(Method::GET, &["runs", id], &[], None)
            .await?;
        let line = progress_line(&run);
        if line != last {
            if tty {
                write!(out, "\r\x1b[2K{line}")?;
            } else {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            last = line;
        }
        let state = text(&run, "state");
        if matches!(state.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED") {
            if tty {
                writeln!(out)?;
            }
            out.write_all(render_tree(&run).as_bytes())?;
            return Ok(if state == "SUCCEEDED" {
                Exit::Ok
            } else {
                Exit::Failure
            });
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// `symphony runs [--workflow NAME]`: newest first.
pub async fn runs(
    api: &str,
    workflow: Option<&str>,
    json_out: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let mut query = vec![("limit", "1000".to_owned())];
    if let Some(w) = workflow {
        query.push(("workflow", w.to_owned()));
    }
    let list: Vec<Value> = client.request(Method::GET, &["runs"], &query, None).await?;
    if json_out {
        print_json(out, &json!(list))?;
        return Ok(Exit::Ok);
    }
    out.write_all(render_runs(&list, now_ms()).as_bytes())?;
    Ok(Exit::Ok)
}

/// The `runs` table.
pub fn render_runs(list: &[Value], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let t = &r["tasks"];
            vec![
                text(r, "id"),
                format!("{} v{}", text(r, "workflow"), r["version"]),
                text(r, "state"),
                format!("{}/{}", t["done"], t["total"]),
                t["running"].to_string(),
                t["failed"].to_string(),
                render::format_age(
                    now_ms.saturating_sub(r["queued_at_ms"].as_i64().unwrap_or(now_ms)) / 1000,
                ),
                text(r, "reason"),
            ]
        })
        .collect();
    render::render_table(
        &[
            "ID", "WORKFLOW", "STATE", "DONE", "RUNNING", "FAILED", "AGE", "REASON",
        ],
        &rows,
    )
}

/// `symphony run show ID`: the run and its DAG as a tree.
pub async fn show(
    api: &str,
    id: &str,
    json_out: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let run: Value = client
        .request(Method::GET, &["runs", id], &[], None)
        .await?;
    if json_out {
        print_json(out, &run)?;
    } else {
        writeln!(
            out,
            "run {} of {} v{}: {}",
            text(&run, "id"),
            text(&run, "workflow"),
            run["version"],
            progress_line(&run)
        )?;
        out.write_all(render_tree(&run).as_bytes())?;
    }
    Ok(Exit::Ok)
}

/// `symphony run cancel ID`.
pub async fn cancel(api: &str, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let run: Value = client
        .request(Method::POST, &["runs", id, "cancel"], &[], None)
        .await?;
    writeln!(out, "run {id}: {}", text(&run, "state"))?;
    Ok(Exit::Ok)
}

/// The DAG as a tree: each task under the first task it depends on (its other dependencies
/// named), with its state, attempts, node, exit code and time.
pub fn render_tree(run: &Value) -> String {
    let empty = Vec::new();
    let tasks = run["tasks"].as_array().unwrap_or(&empty);
    let index: BTreeMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((t["name"].as_str()?, i)))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    let mut roots = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let parent = t["depends_on"]
            .as_array()
            .and_then(|d| d.first())
            .and_then(Value::as_str)
            .and_then(|p| index.get(p).copied());
        match parent {
            Some(p) => children[p].push(i),
            None => roots.push(i),
        }
    }
    let mut out = String::new();
    let mut stack: Vec<(usize, String, bool)> = roots
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &i)| (i, String::new(), k == 0))
        .collect();
    while let Some((i, prefix, last)) = stack.pop() {
        let t = &tasks[i];
        let attempts = t["attempts"].as_array().unwrap_or(&empty);
        let a = attempts.last();
        let mut facts = vec![text(t, "state")];
        if !attempts.is_empty() {
            facts.push(format!("attempt {}/{}", attempts.len(), t["max_attempts"]));
        }
        if let Some(node) = a.and_then(|a| a["node_id"].as_str()) {
            facts.push(format!("on {node}"));
        }
        if let Some(code) = a.and_then(|a| a["exit_code"].as_i64()) {
            facts.push(format!("exit {code}"));
        }
        if let Some(a) = a
            && let (Some(s), Some(f)) = (a["started_at_ms"].as_i64(), a["finished_at_ms"].as_i64())
        {
            #[allow(clippy::cast_precision_loss)]
            facts.push(format!("{:.1}s", (f - s) as f64 / 1000.0));
        }
        let others: Vec<&str> = t["depends_on"]
            .as_array()
            .map(|d| d.iter().skip(1).filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !others.is_empty() {
            facts.push(format!("(also after {})", others.join(", ")));
        }
        if let Some(reason) = t["reason"].as_str() {
            facts.push(format!("- {reason}"));
        }
        let branch = if roots.contains(&i) {
            ""
        } else if last {
            "└─ "
        } else {
            "├─ "
        };
        out.push_str(&format!(
            "{prefix}{branch}{}  {}\n",
            text(t, "name"),
            facts.join("  ")
        ));
        let child_prefix = if roots.contains(&i) {
            prefix.clone()
        } else if last {
            format!("{prefix}   ")
        } else {
            format!("{prefix}│  ")
        };
        let kids = &children[i];
        for (k, &c) in kids.iter().enumerate().rev() {
            stack.push((c, child_prefix.clone(), k + 1 == kids.len()));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_nests_tasks_under_their_first_dependency() {
        let run = json!({"tasks": [
            {"name": "a", "state": "SUCCEEDED", "depends_on": [], "max_attempts": 1,
             "attempts": [{"node_id": "n1", "exit_code": 0, "started_at_ms": 0, "finished_at_ms": 1500}]},
            {"name": "b", "state": "FAILED", "depends_on": ["a"], "max_attempts": 3, "reason": "exit 1",
             "attempts": [{"exit_code": 1}, {"exit_code": 1}, {"exit_code": 1}]},
            {"name": "c", "state": "SUCCEEDED", "depends_on": ["a"], "max_attempts": 1, "attempts": [{}]},
            {"name": "d", "state": "UPSTREAM_FAILED", "depends_on": ["b", "c"], "max_attempts": 1, "attempts": []},
        ]});
        let tree = render_tree(&run);
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(lines.len(), 4, "{tree}");
        assert!(
            lines[0].starts_with("a  SUCCEEDED  attempt 1/1  on n1  exit 0  1.5s"),
            "{tree}"
        );
        assert!(
            lines[1].starts_with("├─ b  FAILED  attempt 3/3  exit 1"),
            "{tree}"
        );
        assert!(lines[1].ends_with("- exit 1"), "{tree}");
        assert!(
            lines[2].starts_with("│  └─ d  UPSTREAM_FAILED  (also after c)"),
            "{tree}"
        );
        assert!(lines[3].starts_with("└─ c  SUCCEEDED"), "{tree}");
    }

    #[test]
    fn the_progress_line_counts_tasks() {
        let run = json!({"state": "RUNNING",
            "progress": {"done": 1, "total": 4, "running": 2, "failed": 0}});
        assert_eq!(
            progress_line(&run),
            "[#####...............] 1/4 done, 2 running, 0 failed  RUNNING"
        );
    }
}
