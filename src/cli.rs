//! The command line: `symphony --config FILE` (original-compatible), `conductor`, `node`,
//! `dev` (conductor + local node in one process), `cert`, and the client commands.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::conductor::{Conductor, ConductorConfig};
use crate::config::{self, Mode, Overrides};
use crate::model::DesiredState;
use crate::node::agent::NodeConfig;
use symphony_net::{CertificateAuthority, TlsMaterial, TransportSettings};

/// Symphony: a lightweight orchestrator for machines you do not own.
#[derive(Debug, Parser)]
#[command(name = "symphony", version, about)]
pub struct Cli {
    /// A YAML config (the original's keys); the mode comes from the file unless --mode is given.
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// Overrides the file's `mode`.
    #[arg(long, global = true)]
    pub mode: Option<Mode>,
    /// Overrides `logging.level` (trace, debug, info, warn, error).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// JSON log lines (overrides `logging.json`).
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Node: on SIGTERM or Ctrl-C, exit but leave the workloads running under their keepers,
    /// for the next agent (an upgraded binary) to adopt. Without it they are stopped; SIGUSR2
    /// always exits this way.
    #[arg(long, global = true)]
    pub keep_workloads: bool,
    /// API token for client commands (when the conductor requires one).
    #[arg(long, global = true, env = "SYMPHONY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for an `https://` API, besides the system's.
    #[arg(long, global = true, env = "SYMPHONY_CA")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Conductor and a local node in one process, with no config to write.
    Dev(DevArgs),
    /// Run a conductor (from --config, or defaults).
    Conductor,
    /// Run a node: from --config, or joining with a token (`--join` and `--conductor`, or
    /// `SYMPHONY_JOIN_TOKEN` and `SYMPHONY_CONDUCTOR`); `symphony node revoke ID` revokes one.
    Node(NodeArgs),
    /// Join tokens: how a pod becomes a node.
    #[command(subcommand)]
    Token(TokenCommand),
    /// API tokens and their roles.
    #[command(subcommand)]
    ApiToken(ApiTokenCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Create a deployment from a spec file, or from a name and a command.
    Deploy(DeployArgs),
    /// List deployments.
    Ps(PsArgs),
    /// Show (and follow) a deployment's logs.
    Logs(LogsArgs),
    /// Show (and follow) the events log: what happened, when and why.
    Events(EventsArgs),
    /// List nodes.
    Nodes(ApiArgs),
    /// Set a deployment's desired state to STOPPED.
    Stop(IdArgs),
    /// Set a deployment's desired state to RUNNING.
    Start(IdArgs),
    /// Delete a deployment (stops it on its node).
    Rm(IdArgs),
    /// List mesh services (port, binder, node, connectors).
    Services(ApiArgs),
    /// Forward a local TCP port to a mesh service through the conductor.
    PortForward(PortForwardArgs),
    /// Print (and open) the URL of an exposed mesh service.
    #[command(alias = "vi")]
    Visit(VisitArgs),
    /// Experiments: launch one from a file, list, stop, start, delete.
    #[command(subcommand)]
    Exp(ExpCommand),
    /// List experiments.
    Ls(ApiArgs),
    /// The processes of an experiment (or of all): group, name, ready, restarts, state, node.
    #[command(alias = "process")]
    P(ProcessArgs),
    /// Delete experiments (their processes stop, their services go).
    #[command(alias = "d")]
    Delete(DeleteArgs),
    /// Delete every experiment whose name matches a glob pattern (`rl-*`).
    #[command(alias = "db")]
    DeleteBatch(DeleteArgs),
    /// Workflows: `run FILE [--param k=v] [--wait]` defines the workflow and starts a run;
    /// `run show ID` shows a run's DAG; `run cancel ID` cancels one.
    Run(RunArgs),
    /// List workflow runs, newest first.
    Runs(RunsArgs),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RunArgs {
    #[command(subcommand)]
    pub command: Option<RunCommand>,
    /// The workflow definition (`.yaml`, `.yml` or `.json`).
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    /// A parameter of the run (repeatable): tasks get `SYMPHONY_PARAM_<KEY>` and
    /// `SYMPHONY_PARAMS`.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Follow the run with a progress line until it ends; exit 1 unless it SUCCEEDED.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// A run and its DAG as a tree, with each task's state, attempts, node and exit code.
    Show(RunIdArgs),
    /// Cancel a run: waiting tasks never run, running attempts are stopped.
    Cancel(RunIdArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunIdArgs {
    pub id: String,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    /// Only this workflow's runs.
    #[arg(long)]
    pub workflow: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.trim().is_empty() {
        return Err(format!("expected KEY=VALUE, got {s:?}"));
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

#[derive(Debug, Subcommand)]
pub enum ExpCommand {
    /// Launch an experiment from a YAML or JSON declaration.
    Launch(LaunchArgs),
    /// List experiments (as `symphony ls`).
    Ls(ApiArgs),
    /// Stop every process of an experiment.
    Stop(ExpNameArgs),
    /// Start every process of an experiment again.
    Start(ExpNameArgs),
    /// Delete experiments (as `symphony delete`).
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The declaration (`.yaml`, `.yml` or `.json`).
    pub file: PathBuf,
    /// Replace an experiment of the same name.
    #[arg(long)]
    pub force: bool,
    /// Prefix the experiment's name with `USER-` (unless it starts with it already).
    #[arg(long, env = "SYMPHONY_USER")]
    pub user: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct ExpNameArgs {
    /// The experiment.
    pub name: String,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// Only this experiment.
    pub experiment: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Experiment names (`delete`), or glob patterns (`delete-batch`).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Only print what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct PortForwardArgs {
    /// The service: `name`, or `namespace/name`.
    pub service: String,
    /// Local port on 127.0.0.1 (default: the service's own port).
    pub local_port: Option<u16>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct VisitArgs {
    /// The service: `name`, or `namespace/name`.
    pub service: String,
    /// Only print the URL.
    #[arg(long)]
    pub url_only: bool,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub action: Option<NodeAction>,
    /// Join token (from `symphony token create`); needed only the first time.
    #[arg(long = "join", env = "SYMPHONY_JOIN_TOKEN", hide_env_values = true)]
    pub join: Option<String>,
    /// The conductor's QUIC address, `host:port`.
    #[arg(long, env = "SYMPHONY_CONDUCTOR")]
    pub conductor: Option<String>,
    /// Work dir (workspaces, logs, state, and the identity the node got when it joined).
    #[arg(long, default_value = "./symphony-node", env = "SYMPHONY_WORK_DIR")]
    pub work_dir: PathBuf,
    /// The node id to ask for (default: the token's prefix and a unique suffix).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Groups to claim (default: every group the token allows).
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Capacity classes, e.g. `--capacity gpu=1` (default: cpu = the number of cores).
    #[arg(long = "capacity", value_parser = parse_capacity)]
    pub capacities: Vec<(String, i64)>,
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Revoke a node: its connection closes, its certificate is refused, its work moves.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// Also revoke the join token it enrolled with.
        #[arg(long)]
        revoke_token: bool,
        #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
        api: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token (printed once).
    Create {
        /// Groups nodes joining with it may claim.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Lifetime: seconds, or with a unit (`30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_duration_secs)]
        ttl: u64,
        /// How many nodes may join with it (default: any number until it expires).
        #[arg(long)]
        uses: Option<u64>,
        /// New node ids are this prefix and a unique suffix.
        #[arg(long)]
        node_id_prefix: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
        api: String,
    },
    /// List join tokens (never their secrets).
    Ls(ApiArgs),
    /// Revoke a join token.
    Revoke {
        id: String,
        #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
        api: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token (printed once): through the API (an admin's token), or with
    /// `--storage DIR` straight into the conductor's store on its host (the first admin).
    Create {
        /// `admin`, `operator` or `viewer`.
        #[arg(long)]
        role: String,
        /// A unique name; events record writes under it.
        #[arg(long)]
        name: String,
        /// The conductor's storage folder (bootstrap, on the conductor's host).
        #[arg(long)]
        storage: Option<PathBuf>,
        #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
        api: String,
    },
    /// List API tokens (never their secrets).
    Ls(ApiArgs),
    /// Revoke an API token.
    Revoke {
        id: String,
        #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
        api: String,
    },
}

/// `90`, `90s`, `30m`, `1h`, `7d` -> seconds.
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 3600, 30m, 1h or 7d, got {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: SocketAddr,
    /// QUIC address nodes dial.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub quic: SocketAddr,
    /// Storage folder (database, certificates, the local node's work dir).
    #[arg(long, default_value = "./storage")]
    pub storage: PathBuf,
    /// The local node's id.
    #[arg(long, default_value = "local")]
    pub node_id: String,
    /// The local node's groups.
    #[arg(long, value_delimiter = ',', default_value = "local")]
    pub groups: Vec<String>,
    /// Capacity classes of the local node, e.g. `--capacity cpu=4 --capacity gpu=1`.
    #[arg(long = "capacity", value_parser = parse_capacity)]
    pub capacities: Vec<(String, i64)>,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a node's certificate and key from the conductor's CA.
    Node {
        /// The node's id (what the certificate asserts).
        node_id: String,
        /// The conductor's certificate folder (`conductor.tls.cert_path`).
        #[arg(long)]
        cert_path: PathBuf,
        /// Where to write `<node_id>.pem`, `<node_id>.key` and `ca.pem`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The conductor's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// Deployment id, unique id prefix, or unique name (an id wins over a name).
    pub id: String,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Deployment id, unique id prefix, or unique name (an id wins over a name).
    pub id: String,
    /// Keep following new lines.
    #[arg(short, long)]
    pub follow: bool,
    /// Lines of backlog.
    #[arg(long, default_value_t = 200)]
    pub tail: u32,
    /// Only these streams (stdout, stderr, system, system-hc, system-ar).
    #[arg(long, value_delimiter = ',')]
    pub streams: Vec<String>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Also each deployment's pid and GPU use (memory and utilisation of its own processes).
    #[arg(long, short = 'w')]
    pub wide: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep following new events (reconnecting, without gaps, if the conductor restarts).
    #[arg(short, long)]
    pub follow: bool,
    /// Only this deployment's (id, unique id prefix or name; a deleted one by its full id).
    #[arg(long, short = 'd')]
    pub deployment: Option<String>,
    /// Only this node's.
    #[arg(long, short = 'n')]
    pub node: Option<String>,
    /// Only this kind (deployment.exited), or all of a type (deployment).
    #[arg(long)]
    pub kind: Option<String>,
    /// How many past events first (1-1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// A JSON or YAML file: a full body {name, desired_state, kind, specification} or a specification.
    #[arg(short, long)]
    pub file: Option<PathBuf>,
    /// Deployment name.
    #[arg(long)]
    pub name: Option<String>,
    /// Create it STOPPED.
    #[arg(long)]
    pub stopped: bool,
    /// An environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run in this conda/uv env (defined with POST /conda-envs).
    #[arg(long, value_name = "NAME")]
    pub env_name: Option<String>,
    /// Only on nodes of this group.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Reserve capacity on the node (repeatable), e.g. gpu=1.
    #[arg(long, value_name = "CLASS=N")]
    pub capacity: Vec<String>,
    /// Restart policy: never, on-failure or always.
    #[arg(long, value_name = "POLICY")]
    pub restart: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "SYMPHONY_API")]
    pub api: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// The command, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn parse_capacity(s: &str) -> Result<(String, i64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected CLASS=AMOUNT, got {s:?}"))?;
    let v: i64 = v
        .trim()
        .parse()
        .map_err(|_| format!("capacity {k}: expected an integer, got {v:?}"))?;
    if v < 0 {
        return Err(format!("capacity {k}: must not be negative"));
    }
    Ok((k.trim().to_owned(), v))
}

/// Entry point; returns the process exit code (0 ok, 1 failure, 2 usage).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match runtime(runs_only_a_node(&cli)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("symphony: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("symphony: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

/// Worker threads of a process that runs only a node agent (at most; fewer on fewer cores).
/// The agent is a handful of tasks (session, status, log pumps and shippers, health checks);
/// one worker per core of a large host would only add memory (a stack and a malloc arena
/// each) to a process whose job is to stay small. Blocking work (usage samples, git, group
/// scans, spool IO) runs off the workers anyway.
const NODE_WORKER_THREADS: usize = 2;

/// How long an idle blocking-pool thread of a node-only process waits for more work before it
/// ends. Usage samples every second keep one alive; bursts (many group scans or checkouts at
/// once) do not keep their threads around.
const NODE_BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// The runtime: one worker per core, except for a process that runs only a node agent.
fn runtime(node_only: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if node_only {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        builder
            .worker_threads(cores.min(NODE_WORKER_THREADS))
            .thread_keep_alive(NODE_BLOCKING_KEEP_ALIVE);
    }
    builder.build()
}

/// Whether the command runs only a node agent: `symphony node`, or a config whose mode (after
/// `--mode`) is `node`. A config that cannot be read counts as not a node (the error is
/// reported later, on the usual path).
fn runs_only_a_node(cli: &Cli) -> bool {
    match &cli.command {
        Some(Command::Node(a)) => a.action.is_none(),
        Some(_) => false,
        None => {
            if let Some(mode) = cli.mode {
                return mode == Mode::Node;
            }
            let path = cli.config.clone().or_else(|| {
                let default = PathBuf::from("config.yaml");
                default.exists().then_some(default)
            });
            path.and_then(|p| config::load(&p).ok())
                .is_some_and(|(file, _)| file.mode == Mode::Node)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        mode: cli.mode,
        log_level: cli.log_level.clone(),
        log_json: cli.log_json.then_some(true),
    };
    if let Some(t) = cli.token.clone() {
        crate::client::use_token(t);
    }
    if let Some(ca) = &cli.ca {
        let pem = std::fs::read_to_string(ca).with_context(|| format!("--ca {}", ca.display()))?;
        crate::client::trust_ca(pem);
    }
    match cli.command {
        Some(Command::Node(NodeArgs {
            action:
                Some(NodeAction::Revoke {
                    id,
                    reason,
                    revoke_token,
                    api,
                }),
            ..
        })) => {
            let mut out = std::io::stdout();
            let r = crate::client::trust::node_revoke(
                &api,
                &id,
                reason.as_deref(),
                revoke_token,
                &mut out,
            )
            .await;
            Ok(crate::client::finish(r, &mut std::io::stderr()).into())
        }
        Some(Command::Node(args)) if args.join.is_some() || args.conductor.is_some() => {
            config::init_logging(cli.log_level.as_deref().unwrap_or("info"), cli.log_json)?;
            join_and_run(args, cli.keep_workloads)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Some(Command::ApiToken(ApiTokenCommand::Create {
            role,
            name,
            storage: Some(storage),
            ..
        })) => bootstrap_api_token(&storage, &name, &role).await,
        Some(Command::Dev(args)) => {
            config::init_logging(cli.log_level.as_deref().unwrap_or("info"), cli.log_json)?;
            dev(args).await.map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Cert(CertCommand::Node {
            node_id,
            cert_path,
            out,
        })) => {
            let ca = CertificateAuthority::load(&symphony_net::CertFiles::in_dir(&cert_path, "ca"))
                .with_context(|| format!("loading the CA from {}", cert_path.display()))?;
            let files = ca.ensure_node_files(&node_id, &out)?;
            println!(
                "certificate: {}\nkey:         {}\nca:          {}",
                files.cert.display(),
                files.key.display(),
                out.join("ca.pem").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Conductor) => {
            from_config(
                cli.config.as_deref(),
                Overrides {
                    mode: Some(Mode::Conductor),
                    ..overrides
                },
                false,
            )
            .await
        }
        Some(Command::Node(_)) => {
            from_config(
                cli.config.as_deref(),
                Overrides {
                    mode: Some(Mode::Node),
                    ..overrides
                },
                cli.keep_workloads,
            )
            .await
        }
        Some(cmd) => Ok(client_command(cmd).await),
        None => match cli.config {
            Some(path) => from_config(Some(&path), overrides, cli.keep_workloads).await,
            None if Path::new("config.yaml").exists() => {
                from_config(
                    Some(Path::new("config.yaml")),
                    overrides,
                    cli.keep_workloads,
                )
                .await
            }
            None => {
                eprintln!(
                    "symphony: nothing to do. Try `symphony dev`, or `symphony --config FILE`; see `symphony --help`."
                );
                Ok(ExitCode::from(2))
            }
        },
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

async fn from_config(
    path: Option<&Path>,
    overrides: Overrides,
    keep_workloads: bool,
) -> anyhow::Result<ExitCode> {
    let (mut file, warnings) = match path {
        Some(p) => config::load(p)?,
        None => config::parse_str("", "defaults")?,
    };
    config::apply_overrides(&mut file, &overrides);
    config::init_logging(&file.logging.level, file.logging.json)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    match file.mode {
        Mode::Conductor => {
            let c = file.conductor_config()?;
            let mut cfg = ConductorConfig::local(c.storage_dir.clone());
            cfg.quic_listen = c.listen;
            cfg.http_listen = c.http_listen;
            cfg.cert_dir = c.cert_dir.clone();
            cfg.server_names = c.server.iter().cloned().collect();
            cfg.grace = c.node_grace;
            cfg.suspect_after = c.suspect_after;
            cfg.strategy = match c.scheduling {
                config::Scheduling::Spread => crate::scheduler::Strategy::Spread,
                config::Scheduling::Binpack => crate::scheduler::Strategy::Binpack,
            };
            cfg.service_ports = c.service_ports.clone();
            cfg.direct_paths = c.direct_paths;
            cfg.events = c.events;
            cfg.api_auth = c.api_auth;
            cfg.api_tls.clone_from(&c.api_tls);
            cfg.node_cert_ttl = c.node_cert_ttl;
            cfg.renew_grace = c.renew_grace;
            let conductor = Conductor::start(cfg).await?;
            eprintln!(
                "conductor: API {}://{}  QUIC {}",
                if conductor.https { "https" } else { "http" },
                conductor.http_addr,
                conductor.quic_addr
            );
            shutdown_signal().await;
            conductor.shutdown().await;
        }
        Mode::Node => {
            let n = file.node_config()?;
            let identity = crate::node::join::IdentityFiles {
                cert: n.tls.cert_file.clone(),
                key: n.tls.key_file.clone(),
                ca: n.tls.ca_file.clone(),
                record: n.work_dir.join("identity").join("node.json"),
            };
            // A renewal a crash interrupted is finished (or dropped) before the files are read.
            identity.recover()?;
            let tls = TlsMaterial::from_files(&n.tls.ca_file, &n.tls.cert_file, &n.tls.key_file)?;
            let transport = TransportSettings {
                keep_alive: n.keep_alive,
                idle_timeout: n.idle_timeout,
                ..TransportSettings::default()
            };
            let cfg = NodeConfig {
                node_id: n.node_id.clone(),
                conductor_addr: n.conductor_addr.clone(),
                server_name: n.server_name.clone(),
                tls,
                groups: n.groups.clone(),
                capacities_total: n.capacities_total.clone(),
                heartbeat: n.heartbeat,
                work_dir: n.work_dir.clone(),
                transport,
                keeper: crate::node::runner::Launcher::current_exe(),
                keep_workloads: Arc::new(AtomicBool::new(keep_workloads)),
                service_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                gpu_processes: None,
                identity: Some(identity),
            };
            run_node_until_signal(cfg).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_node_until_signal(cfg: NodeConfig) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let keep = cfg.keep_workloads.clone();
    let mut node = tokio::spawn(crate::node::agent::run(cfg, cancel.clone()));
    let upgrade = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = shutdown_signal() => {
            cancel.cancel();
            node.await.context("node task")?
        }
        () = upgrade => {
            keep.store(true, Ordering::SeqCst);
            cancel.cancel();
            node.await.context("node task")?
        }
        r = &mut node => r.context("node task")?,
    }
}

/// The capacities given, or `cpu` = the number of cores when none were.
fn capacities_or_cores(given: Vec<(String, i64)>) -> BTreeMap<String, i64> {
    if given.is_empty() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        BTreeMap::from([("cpu".to_owned(), i64::try_from(cpus).unwrap_or(1))])
    } else {
        given.into_iter().collect()
    }
}

/// `symphony node --join TOKEN --conductor HOST:PORT`: enrolls (or reuses the identity of an
/// earlier enrollment in the work dir) and runs the node.
async fn join_and_run(args: NodeArgs, keep_workloads: bool) -> anyhow::Result<()> {
    let conductor = args.conductor.clone().context(
        "--conductor (or SYMPHONY_CONDUCTOR) is needed: the conductor's QUIC address, host:port",
    )?;
    let files = crate::node::join::IdentityFiles::in_work_dir(&args.work_dir);
    let transport = TransportSettings::default();
    let request = crate::node::join::JoinRequest {
        token: args.join.clone(),
        conductor: conductor.clone(),
        node_id: args.node_id.clone(),
        groups: args.groups.clone(),
    };
    let (enrolled, tls) = crate::node::join::identity(&files, &request, &transport).await?;
    let capacities = capacities_or_cores(args.capacities);
    let groups = if args.groups.is_empty() {
        enrolled.groups.clone()
    } else {
        args.groups.clone()
    };
    let cfg = NodeConfig {
        node_id: enrolled.node_id.clone(),
        conductor_addr: conductor,
        server_name: Some(crate::node::join::SERVER_NAME.to_owned()),
        tls,
        groups,
        capacities_total: capacities,
        heartbeat: std::time::Duration::from_secs(1),
        work_dir: args.work_dir.clone(),
        transport,
        keeper: crate::node::runner::Launcher::current_exe(),
        keep_workloads: Arc::new(AtomicBool::new(keep_workloads)),
        service_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        gpu_processes: None,
        identity: Some(files),
    };
    run_node_until_signal(cfg).await
}

/// `symphony api-token create --storage DIR`: the first admin token, written straight into the
/// conductor's store on its host (no API call, so no token is needed to make one).
async fn bootstrap_api_token(storage: &Path, name: &str, role: &str) -> anyhow::Result<ExitCode> {
    use crate::conductor::trust;
    let role = trust::Role::from_name(role)
        .with_context(|| format!("--role: expected admin, operator or viewer, got {role:?}"))?;
    let key_path = storage.join("secrets.key");
    let key = crate::seal::SealKey::load_or_create(&key_path)
        .with_context(|| format!("secrets key {}", key_path.display()))?;
    let store = crate::conductor::store::Store::open(storage, key)
        .await
        .with_context(|| format!("opening the store in {}", storage.display()))?;
    let (id, secret) = trust::new_id_and_secret();
    let rec = trust::ApiTokenRecord {
        id: id.clone(),
        name: name.to_owned(),
        role,
        secret_hash: trust::hash_secret(&secret),
        created_at_ms: crate::time::now_ms(),
        revoked_at_ms: None,
    };
    match store.insert_api_token(&rec, &[]).await {
        Ok(()) => {}
        Err(crate::conductor::store::StoreError::Conflict) => {
            anyhow::bail!("an API token named {name:?} exists")
        }
        Err(e) => return Err(e.into()),
    }
    println!("{}", trust::encode_api_token(&id, &secret));
    Ok(ExitCode::SUCCESS)
}

/// `symphony dev`: conductor + one local node, certificates created on first start.
async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let storage = args.storage.clone();
    let mut cfg = ConductorConfig::local(storage.clone());
    cfg.http_listen = args.http;
    cfg.quic_listen = args.quic;
    let conductor = Conductor::start(cfg).await?;
    let capacities = capacities_or_cores(args.capacities);
    let node_dir = storage.join("nodes").join(&args.node_id);
    let mut node_cfg =
        NodeConfig::local(&conductor.ca, conductor.quic_addr, &args.node_id, &node_dir)?;
    node_cfg.groups.clone_from(&args.groups);
    node_cfg.capacities_total.clone_from(&capacities);
    let api = format!("http://{}", conductor.http_addr);
    println!("Symphony is running.");
    println!("  API:   {api}   (OpenAPI: {api}/openapi.json, UI: {api}/ui/)");
    println!(
        "  QUIC:  {}   local node {:?}, groups {:?}, capacities {:?}",
        conductor.quic_addr, args.node_id, args.groups, capacities
    );
    println!("  Try:   curl -s -X POST {api}/deployments -H 'content-type: application/json' \\");
    println!(
        "           -d '{{\"name\":\"hello\",\"specification\":{{\"spec\":{{\"config\":{{\"command\":[\"sh\",\"-c\",\"while true; do date; sleep 1; done\"]}}}}}}}}'"
    );
    println!("         symphony ps   |   symphony logs -f <id>   |   symphony stop <id>");
    println!("  Ctrl-C stops everything (workloads included).");
    let cancel = CancellationToken::new();
    let node = tokio::spawn(crate::node::agent::run(node_cfg, cancel.clone()));
    shutdown_signal().await;
    eprintln!("shutting down: stopping workloads...");
    cancel.cancel();
    match node.await {
        Ok(Err(e)) => tracing::error!(error = %e, "node failed"),
        Err(e) => tracing::error!(error = %e, "node task failed"),
        Ok(Ok(())) => {}
    }
    conductor.shutdown().await;
    Ok(())
}

/// Runs a client command against the HTTP API; prints errors, returns the exit code.
async fn client_command(cmd: Command) -> ExitCode {
    use crate::client;
    let mut out = std::io::stdout();
    let result = match cmd {
        Command::Deploy(a) => {
            let args = client::DeployArgs {
                file: a.file,
                name: a.name,
                command: a.command,
                desired_stopped: a.stopped,
                json: a.json,
                extra: client::DeployExtra {
                    env: a.env,
                    capacity: a.capacity,
                    restart: a.restart,
                    env_name: a.env_name,
                    group: a.group,
                },
            };
            client::deploy(&a.api, &args, &mut out).await
        }
        Command::Ps(a) => client::ps(&a.api.api, a.api.json, a.wide, &mut out).await,
        Command::Nodes(a) => client::nodes(&a.api, a.json, &mut out).await,
        Command::Events(a) => {
            let args = client::events::EventsArgs {
                follow: a.follow,
                deployment: a.deployment,
                node: a.node,
                kind: a.kind,
                limit: a.limit,
                json: a.json,
            };
            client::events::events(&a.api, &args, &mut out).await
        }
        Command::Services(a) => client::mesh::services(&a.api, a.json, &mut out).await,
        Command::PortForward(a) => {
            client::mesh::port_forward(&a.api, &a.service, a.local_port, &mut out).await
        }
        Command::Visit(a) => client::mesh::visit(&a.api, &a.service, a.url_only, &mut out).await,
        Command::Logs(a) => {
            let args = client::LogsArgs {
                id: a.id,
                follow: a.follow,
                tail: Some(a.tail),
                streams: a.streams,
            };
            client::logs(&a.api, &args, &mut out).await
        }
        Command::Stop(a) => client::stop(&a.api, &a.id, &mut out).await,
        Command::Start(a) => client::start(&a.api, &a.id, &mut out).await,
        Command::Rm(a) => client::rm(&a.api, &a.id, &mut out).await,
        Command::Exp(ExpCommand::Launch(a)) => {
            client::experiments::launch(&a.api, &a.file, a.force, a.user.as_deref(), &mut out).await
        }
        Command::Ls(a) | Command::Exp(ExpCommand::Ls(a)) => {
            client::experiments::ls(&a.api, a.json, &mut out).await
        }
        Command::Exp(ExpCommand::Stop(a)) => {
            client::experiments::set_state(&a.api, &a.name, DesiredState::Stopped, &mut out).await
        }
        Command::Exp(ExpCommand::Start(a)) => {
            client::experiments::set_state(&a.api, &a.name, DesiredState::Running, &mut out).await
        }
        Command::P(a) => {
            client::experiments::processes(&a.api, a.experiment.as_deref(), a.json, &mut out).await
        }
        Command::Run(RunArgs {
            command: Some(RunCommand::Show(a)),
            ..
        }) => client::runs::show(&a.api, &a.id, a.json, &mut out).await,
        Command::Run(RunArgs {
            command: Some(RunCommand::Cancel(a)),
            ..
        }) => client::runs::cancel(&a.api, &a.id, &mut out).await,
        Command::Run(RunArgs {
            command: None,
            file: Some(file),
            params,
            wait,
            api,
        }) => client::runs::run_file(&api, &file, &params, wait, &mut out).await,
        Command::Run(_) => Err(client::ClientError::Usage(
            "give a workflow file, or `run show ID` / `run cancel ID`".into(),
        )),
        Command::Runs(a) => {
            client::runs::runs(&a.api, a.workflow.as_deref(), a.json, &mut out).await
        }
        Command::Delete(a) | Command::Exp(ExpCommand::Delete(a)) => {
            let opts = client::experiments::DeleteOptions {
                yes: a.yes,
                dry_run: a.dry_run,
            };
            client::experiments::delete(&a.api, &a.names, opts, &mut out).await
        }
        Command::DeleteBatch(a) => {
            let opts = client::experiments::DeleteOptions {
                yes: a.yes,
                dry_run: a.dry_run,
            };
            client::experiments::delete_batch(&a.api, &a.names, opts, &mut out).await
        }
        Command::Token(TokenCommand::Create {
            groups,
            ttl,
            uses,
            node_id_prefix,
            api,
        }) => {
            client::trust::token_create(
                &api,
                &groups,
                ttl,
                uses,
                node_id_prefix.as_deref(),
                &mut out,
            )
            .await
        }
        Command::Token(TokenCommand::Ls(a)) => {
            client::trust::token_ls(&a.api, a.json, &mut out).await
        }
        Command::Token(TokenCommand::Revoke { id, api }) => {
            client::trust::token_revoke(&api, &id, &mut out).await
        }
        Command::ApiToken(ApiTokenCommand::Create {
            role, name, api, ..
        }) => client::trust::api_token_create(&api, &name, &role, &mut out).await,
        Command::ApiToken(ApiTokenCommand::Ls(a)) => {
            client::trust::api_token_ls(&a.api, a.json, &mut out).await
        }
        Command::ApiToken(ApiTokenCommand::Revoke { id, api }) => {
            client::trust::api_token_revoke(&api, &id, &mut out).await
        }
        Command::Dev(_) | Command::Conductor | Command::Node(_) | Command::Cert(_) => {
            return ExitCode::from(2);
        }
    };
    client::finish(result, &mut std::io::stderr()).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node_only(args: &[&str]) -> bool {
        runs_only_a_node(&Cli::try_parse_from(args).unwrap())
    }

    #[test]
    fn only_node_commands_get_the_node_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.yaml");
        for f in ["ca.pem", "n1.pem", "n1.key"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        std::fs::write(
            &node,
            "mode: node\nnode:\n  node_id: n1\n  conductor_addr: 127.0.0.1:1\n  tls:\n    ca_file: ca.pem\n    cert_file: n1.pem\n    key_file: n1.key\n",
        )
        .unwrap();
        let conductor = dir.path().join("conductor.yaml");
        std::fs::write(&conductor, "mode: conductor\n").unwrap();
        let (node, conductor) = (node.to_str().unwrap(), conductor.to_str().unwrap());

        assert!(node_only(&["symphony", "node"]));
        assert!(node_only(&["symphony", "--config", node]));
        assert!(node_only(&[
            "symphony", "--config", conductor, "--mode", "node"
        ]));
        assert!(!node_only(&["symphony", "--config", conductor]));
        assert!(!node_only(&[
            "symphony",
            "--config",
            node,
            "--mode",
            "conductor"
        ]));
        assert!(!node_only(&["symphony", "dev"]));
        assert!(!node_only(&["symphony", "conductor"]));
        assert!(!node_only(&["symphony", "--config", "/nonexistent/x.yaml"]));
        assert!(!node_only(&["symphony", "ps"]));
    }
}
