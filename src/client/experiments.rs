//! Client commands for experiments, with the SurrealAI seed's verbs: `exp launch FILE`, `ls`,
//! `p [EXP]`, `d EXP...`, `db PATTERN...`, `exp stop|start EXP`; and resolving `logs` targets
//! such as `EXP/PROC`, `GROUP/PROC` or a process name alone.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, ClientError, Exit, print_json, read_spec_file, render};
use crate::model::{DesiredState, ExperimentInfo, ExperimentProcess};
use crate::time::now_ms;

async fn list(client: &Client) -> Result<Vec<ExperimentInfo>, ClientError> {
    let raw = client
        .request(Method::GET, &["experiments"], &[], None)
        .await?;
    serde_json::from_value(raw).map_err(|e| ClientError::Decode(e.to_string()))
}

/// `symphony exp launch FILE [--force] [--user U]`: prints the experiment's name.
pub async fn launch(
    api: &str,
    file: &Path,
    force: bool,
    user: Option<&str>,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let decl = read_spec_file(file).await?;
    let client = Client::new(api)?;
    let mut query = vec![("force", force.to_string())];
    if let Some(u) = user.filter(|u| !u.is_empty()) {
        query.push(("user", u.to_owned()));
    }
    let created: ExperimentInfo = client
        .request(Method::POST, &["experiments"], &query, Some(&decl))
        .await
        .and_then(|v: Value| {
            serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
        })?;
    writeln!(
        out,
        "{} launched: {} processes{}",
        created.name,
        created.processes.len(),
        if created.services.is_empty() {
            String::new()
        } else {
            format!(", services {}", created.services.join(", "))
        }
    )?;
    Ok(Exit::Ok)
}

/// `symphony ls`: one row per experiment.
pub async fn ls(api: &str, json_out: bool, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let list = list(&client).await?;
    if json_out {
        print_json(out, &json!(list))?;
        return Ok(Exit::Ok);
    }
    out.write_all(render_ls(&list, now_ms()).as_bytes())?;
    Ok(Exit::Ok)
}

/// The `ls` table.
pub fn render_ls(list: &[ExperimentInfo], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            let ready = e.processes.iter().filter(|p| p.ready).count();
            vec![
                e.name.clone(),
                e.state.clone(),
                format!("{ready}/{}", e.processes.len()),
                e.placement.clone(),
                render::format_age(now_ms.saturating_sub(e.created_at_ms) / 1000),
                e.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    render::render_table(
        &["NAME", "STATE", "READY", "PLACEMENT", "AGE", "REASON"],
        &rows,
    )
}

/// `symphony p [EXP]`: the processes of one experiment, or of all (then with their
/// experiment's name).
pub async fn processes(
    api: &str,
    experiment: Option<&str>,
    json_out: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let mut list = list(&client).await?;
    if let Some(name) = experiment {
        list.retain(|e| e.name == name);
        if list.is_empty() {
            return Err(ClientError::Usage(format!("no experiment named '{name}'")));
        }
    }
    if json_out {
        print_json(out, &json!(list))?;
        return Ok(Exit::Ok);
    }
    out.write_all(render_processes(&list, experiment.is_none(), now_ms()).as_bytes())?;
    Ok(Exit::Ok)
}

/// `running: 23.2h`: a process's state and how long it has been in it.
pub fn state_cell(p: &ExperimentProcess, now_ms: i64) -> String {
    let state = p.current_state.as_str().to_lowercase();
    match p.since_ms {
        Some(since) => format!(
            "{state}: {}",
            render::format_duration(now_ms.saturating_sub(since))
        ),
        None => state,
    }
}

/// The `p` table: Group, Name, Ready, Restarts, State (with its age), Node.
pub fn render_processes(list: &[ExperimentInfo], with_experiment: bool, now_ms: i64) -> String {
    let mut rows = Vec::new();
    for e in list {
        for p in &e.processes {
            let node = match (&p.node_id, &p.reason) {
                (Some(n), _) => n.clone(),
                (None, Some(r)) => format!("({r})"),
                (None, None) => "-".to_owned(),
            };
            let mut row = vec![
                p.group.clone().unwrap_or_else(|| "-".to_owned()),
                p.name.clone(),
                if p.ready { "1/1" } else { "0/1" }.to_owned(),
                p.restarts.to_string(),
                state_cell(p, now_ms),
                node,
            ];
            if with_experiment {
                row.insert(0, e.name.clone());
            }
            rows.push(row);
        }
    }
    let mut headers = vec!["GROUP", "NAME", "READY", "RESTARTS", "STATE", "NODE"];
    if with_experiment {
        headers.insert(0, "EXPERIMENT");
    }
    render::render_table(&headers, &rows)
}

/// `symphony exp stop|start EXP`: every process.
pub async fn set_state(
    api: &str,
    name: &str,
    desired: DesiredState,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let _: Value = client
        .request(
            Method::PATCH,
            &["experiments", name],
            &[],
            Some(&json!({ "desired_state": desired })),
        )
        .await?;
    writeln!(out, "{name}")?;
    Ok(Exit::Ok)
}

/// How `d` and `db` confirm.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteOptions {
    /// Do not ask.
    pub yes: bool,
    /// Only print what would be deleted.
    pub dry_run: bool,
}

/// `symphony d EXP...`: deletes the named experiments.
pub async fn delete(
    api: &str,
    names: &[String],
    opts: DeleteOptions,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    if names.is_empty() {
        return Err(ClientError::Usage("name at least one experiment".into()));
    }
    let client = Client::new(api)?;
    let known: Vec<String> = list(&client).await?.into_iter().map(|e| e.name).collect();
    if let Some(missing) = names.iter().find(|n| !known.contains(n)) {
        return Err(ClientError::Usage(format!(
            "no experiment named '{missing}'"
        )));
    }
    delete_these(&client, names, opts, out).await
}

/// `symphony db PATTERN...`: deletes every experiment whose name matches a glob pattern
/// (`rl-*`, `sweep-?`).
pub async fn delete_batch(
    api: &str,
    patterns: &[String],
    opts: DeleteOptions,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let globs = patterns
        .iter()
        .map(|p| {
            glob::Pattern::new(p).map_err(|e| ClientError::Usage(format!("bad pattern '{p}': {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if globs.is_empty() {
        return Err(ClientError::Usage("give at least one pattern".into()));
    }
    let client = Client::new(api)?;
    let names: Vec<String> = list(&client)
        .await?
        .into_iter()
        .map(|e| e.name)
        .filter(|n| globs.iter().any(|g| g.matches(n)))
        .collect();
    if names.is_empty() {
        writeln!(out, "no experiment matches")?;
        return Ok(Exit::Ok);
    }
    delete_these(&client, &names, opts, out).await
}

async fn delete_these(
    client: &Client,
    names: &[String],
    opts: DeleteOptions,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    if opts.dry_run {
        for n in names {
            writeln!(out, "would delete {n}")?;
        }
        return Ok(Exit::Ok);
    }
    // Asks on a terminal unless --yes; a script (no terminal) has said what it wants.
    let stdin = std::io::stdin();
    if !opts.yes && stdin.is_terminal() {
        write!(out, "delete {}? [y/N] ", names.join(", "))?;
        out.flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            writeln!(out, "nothing deleted")?;
            return Ok(Exit::Failure);
        }
    }
    for n in names {
        client
            .request_empty(Method::DELETE, &["experiments", n])
            .await?;
        writeln!(out, "deleted {n}")?;
    }
    Ok(Exit::Ok)
}

/// The deployment a `logs` target names among the experiments' processes: `EXP/PROC`,
/// `GROUP/PROC` (when unique), or `PROC` (when unique).
pub fn resolve_process(input: &str, list: &[ExperimentInfo]) -> Result<String, ClientError> {
    let mut hits: Vec<(&ExperimentInfo, &ExperimentProcess)> = Vec::new();
    for e in list {
        for p in &e.processes {
            let matches = match input.split_once('/') {
                Some((a, b)) => p.name == b && (e.name == a || p.group.as_deref() == Some(a)),
                None => p.name == input,
            };
            if matches {
                hits.push((e, p));
            }
        }
    }
    // `EXP/PROC` is exact even when a group of another experiment has the same name.
    if hits.len() > 1
        && let Some((a, _)) = input.split_once('/')
        && hits.iter().any(|(e, _)| e.name == a)
    {
        hits.retain(|(e, _)| e.name == a);
    }
    match hits.as_slice() {
        [(_, p)] => Ok(p.deployment_id.clone()),
        [] => Err(ClientError::NoSuchDeployment(input.to_owned())),
        many => Err(ClientError::AmbiguousId {
            prefix: input.to_owned(),
            candidates: many
                .iter()
                .take(5)
                .map(|(e, p)| match &p.group {
                    Some(g) => format!("{}/{} (group {g})", e.name, p.name),
                    None => format!("{}/{}", e.name, p.name),
                })
                .collect(),
        }),
    }
}

/// [`resolve_process`] against the conductor's experiments.
pub(super) async fn resolve_logs_target(
    client: &Client,
    input: &str,
) -> Result<String, ClientError> {
    resolve_process(input, &list(client).await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::CurrentState;

    fn exp(name: &str, procs: &[(&str, Option<&str>)]) -> ExperimentInfo {
        ExperimentInfo {
            name: name.to_owned(),
            placement: "spread".to_owned(),
            state: "running".to_owned(),
            processes: procs
                .iter()
                .map(|(p, g)| ExperimentProcess {
                    name: (*p).to_owned(),
                    group: g.map(str::to_owned),
                    deployment_id: format!("{name}.{p}"),
                    current_state: CurrentState::Running,
                    ready: true,
                    since_ms: Some(1_000),
                    node_id: Some("n1".to_owned()),
                    ..ExperimentProcess::default()
                })
                .collect(),
            ..ExperimentInfo::default()
        }
    }

    #[test]
    fn logs_targets_resolve_by_experiment_group_or_unique_name() {
        let list = [
            exp("rl", &[("learner", Some("trainer")), ("agent-0", None)]),
            exp(
                "sweep",
                &[("learner", Some("trainer")), ("eval", Some("x"))],
            ),
        ];
        assert_eq!(resolve_process("rl/learner", &list).unwrap(), "rl.learner");
        assert_eq!(resolve_process("agent-0", &list).unwrap(), "rl.agent-0");
        assert_eq!(resolve_process("x/eval", &list).unwrap(), "sweep.eval");
        assert!(matches!(
            resolve_process("learner", &list),
            Err(ClientError::AmbiguousId { .. })
        ));
        assert!(matches!(
            resolve_process("trainer/learner", &list),
            Err(ClientError::AmbiguousId { .. })
        ));
        assert!(matches!(
            resolve_process("nope", &list),
            Err(ClientError::NoSuchDeployment(_))
        ));
    }

    #[test]
    fn the_process_table_has_the_seed_columns_and_state_ages() {
        let list = [exp(
            "rl",
            &[("learner", Some("trainer")), ("agent-0", None)],
        )];
        let now = 1_000 + 83_520_000; // 23.2 h later
        let table = render_processes(&list, false, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for (i, h) in ["GROUP", "NAME", "READY", "RESTARTS", "STATE", "NODE"]
            .iter()
            .enumerate()
        {
            assert_eq!(lines[0].split_whitespace().nth(i), Some(*h), "{table}");
        }
        assert!(
            lines[1].contains("trainer") && lines[1].contains("running: 23.2h"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("- ") && lines[2].contains("1/1"),
            "{table}"
        );
        let all = render_processes(&list, true, now);
        assert!(all.starts_with("EXPERIMENT"), "{all}");
    }
}
