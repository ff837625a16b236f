//! The agent's prepare hook: the git workspace (git2) and env wrapping (conda/uv) before every
//! start of a deployment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::node::envs::{self, Envs};
use crate::node::logs::{LogBuffer, LogStream};
use crate::node::supervisor::{Prepare, Prepared};
use crate::node::workdirs::WorkDirs;
use crate::node::workspace;
use crate::spec::DeploymentSpec;

/// Prepares a start: git workspace (when configured) and env wrapping.
pub(super) struct AgentPrepare {
    pub(super) work_dir: PathBuf,
    pub(super) envs: Arc<Envs>,
    /// Default working directories.
    pub(super) dirs: Arc<WorkDirs>,
}

impl Prepare for AgentPrepare {
    fn prepare<'a>(
        &'a self,
        id: &'a str,
        spec: &'a DeploymentSpec,
        logs: &'a LogBuffer,
    ) -> futures_util::future::BoxFuture<'a, Result<Prepared, String>> {
        Box::pin(async move {
            let cwd = if let Some(git) = &spec.git {
                let dest = self.work_dir.join("workspaces").join(id);
                let (d, repo, r, token) = (
                    dest.clone(),
                    git.repo.clone(),
                    git.git_ref.clone(),
                    git.token.clone(),
                );
                let sha = tokio::task::spawn_blocking(move || {
                    workspace::prepare_checkout(&d, &repo, r.as_deref(), token.as_deref())
                })
                .await
                .map_err(|e| format!("git task failed: {e}"))?
                .map_err(|e| format!("git repo prep failed: {e}"))?;
                logs.push(
                    LogStream::System,
                    format!("Git repo prepared at {} (commit {sha})", dest.display()),
                );
                dest
            } else {
                self.dirs.make_for_start(id)?
            };
            let (command, extra_env) = match &spec.env_name {
                Some(name) => {
                    let resolved = self.envs.resolve(name).await?;
                    envs::wrap_command(name, &resolved, &spec.command)
                }
                None => (spec.command.clone(), BTreeMap::new()),
            };
            Ok(Prepared {
                cwd,
                command,
                extra_env,
            })
        })
    }

    fn release(&self, id: &str) {
        self.dirs.release(id);
    }
}
