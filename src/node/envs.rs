//! Python environment managers (conda and uv): discovery, listing, provisioning, command wrapping.
//!
//! [`Envs`] owns the node's view of its environments. Provisioning ([`Envs::ensure`]) is async
//! (`tokio::process`) and is meant to run in its own task, so a create that takes minutes never
//! blocks the node's control loop (fixes B11). A spec that failed is remembered per env and not
//! re-run until the spec changes or `force_recreate` is set (fixes B17's endless retries).
//!
//! Invariants:
//! - conda and uv (and `bash` for a uv env's `custom_script`) are the only programs this module
//!   starts, all through `tokio::process`; the env name, python version and packages are passed
//!   as separate arguments (no shell); only `custom_script` goes through `bash -c`, inside the
//!   environment.
//! - uv envs live in `<work_dir>/envs/uv/<name>` and count as existing only once the marker file
//!   is written, which is the last step; a failed create removes the partial env.
//! - Ensures of the same env are serialized; different envs may be provisioned in parallel.
//! - Only envs this node created are ever removed ([`Envs::remove`]): every uv env under
//!   `<work_dir>/envs/uv/`, and the conda envs recorded by an empty file in
//!   `<work_dir>/envs/conda-created/` when a create succeeded. A conda env that existed before
//!   (made by hand, or `base`) is used but never touched.
//! - A missing conda is reported once, by [`discover`]'s notes, never per call in a loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::runner;

/// File written into a uv env as the last provisioning step.
pub const UV_READY_MARKER: &str = ".symphony-env-ready";

/// Longest time one provisioning step (create, install, script) may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Longest time `conda env list --json` may run.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a failed step's output is kept in the error message.
const ERROR_TAIL_CHARS: usize = 2000;

/// Which tool manages an environment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ManagerKind {
    /// A named conda environment (`conda create -n`).
    Conda,
    /// A uv virtual environment under the node's work dir.
    Uv,
}

/// The desired definition of one environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnvDefinition {
    /// Env name: 1..=100 chars of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
    pub name: String,
    /// Python version passed to the manager (`3.11`, `3.12.4`).
    pub python_version: String,
    /// Packages installed with pip (conda) or `uv pip` (uv); may be empty.
    pub packages: Vec<String>,
    /// Shell run with `bash -c` inside the env after the packages are installed.
    pub custom_script: Option<String>,
    /// conda or uv.
    pub manager: ManagerKind,
    /// Remove and re-create even when the env exists or this spec failed before.
    pub force_recreate: bool,
}

/// How to run a command inside an existing environment (see [`wrap_command`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedEnv {
    /// Run through `conda run` of this conda binary.
    Conda {
        /// Path of the conda executable.
        binary: PathBuf,
    },
    /// Run with this venv's `bin` first on `PATH`.
    Uv {
        /// The venv folder (`<work_dir>/envs/uv/<name>`).
        venv: PathBuf,
    },
}

/// The result of looking for the manager binaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// The conda binary, if found.
    pub conda: Option<PathBuf>,
    /// The uv binary, if found.
    pub uv: Option<PathBuf>,
    /// Human-readable notes to log once at startup (e.g. "conda not found ...").
    pub notes: Vec<String>,
}

/// Finds conda (`CONDA_PATH`, else `conda` on `PATH`) and uv (`UV_PATH`, else `uv` on `PATH`)
/// from the process environment. Log the returned notes once.
pub fn discover() -> Discovery {
    discover_from(
        std::env::var_os("CONDA_PATH"),
        std::env::var_os("UV_PATH"),
        std::env::var_os("PATH"),
    )
}

/// [`discover`] with explicit inputs (for tests and callers with their own environment).
pub fn discover_from(
    conda_path: Option<OsString>,
    uv_path: Option<OsString>,
    path: Option<OsString>,
) -> Discovery {
    let mut notes = Vec::new();
    let conda = find_binary("conda", "CONDA_PATH", conda_path, path.as_ref(), &mut notes);
    let uv = find_binary("uv", "UV_PATH", uv_path, path.as_ref(), &mut notes);
    if conda.is_none() {
        notes.push(
            "conda not found (set CONDA_PATH or put conda on PATH): no conda envs on this node"
                .to_owned(),
        );
    }
    if uv.is_none() {
        notes.push(
            "uv not found (set UV_PATH or put uv on PATH): uv envs cannot be created".to_owned(),
        );
    }
    Discovery { conda, uv, notes }
}

/// Resolves `name` from an override variable (a binary, or an install folder holding
/// `bin/<name>` or `condabin/<name>`), else from `PATH`.
fn find_binary(
    name: &str,
    var: &str,
    override_value: Option<OsString>,
    path: Option<&OsString>,
    notes: &mut Vec<String>,
) -> Option<PathBuf> {
    if let Some(value) = override_value.filter(|v| !v.is_empty()) {
        let candidate = PathBuf::from(&value);
        let found = if candidate.is_dir() {
            ["bin", "condabin"]
                .iter()
                .map(|sub| candidate.join(sub).join(name))
                .find(|p| is_executable(p))
        } else if is_executable(&candidate) {
            Some(candidate.clone())
        } else {
            None
        };
        match found {
            Some(p) => return Some(p),
            None => notes.push(format!(
                "{var}={} is not an executable {name}; looking on PATH instead",
                candidate.display()
            )),
        }
    }
    let path = path?;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks an env name: 1..=100 chars of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_env_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 100 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(format!(
            "invalid env name {name:?}: use 1-100 characters of A-Z a-z 0-9 . _ - (not starting with . or -)"
        ));
    }
    Ok(())
}

fn validate_definition(def: &EnvDefinition) -> Result<(), String> {
    validate_env_name(&def.name)?;
    let v = def.python_version.trim();
    if v.is_empty() || v.starts_with('-') || v.chars().any(char::is_whitespace) {
        return Err(format!(
            "env {}: invalid python_version {:?}",
            def.name, def.python_version
        ));
    }
    if let Some(p) = def.packages.iter().find(|p| p.trim().is_empty()) {
        return Err(format!("env {}: empty package name {p:?}", def.name));
    }
    Ok(())
}

/// What a failure is remembered by: the parts of the definition that shape the env.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
struct SpecFingerprint {
    python_version: String,
    packages: Vec<String>,
    custom_script: Option<String>,
}

impl SpecFingerprint {
    fn of(def: &EnvDefinition) -> Self {
        Self {
            python_version: def.python_version.trim().to_owned(),
            packages: def.packages.iter().map(|p| p.trim().to_owned()).collect(),
            custom_script: def.custom_script.clone(),
        }
    }

    /// As stored in a uv env's ready marker and a created conda env's record.
    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whether the fingerprint stored at `path` (if any) is `def`'s: `None` when there is no file.
async fn stored_fingerprint_matches(path: &Path, def: &EnvDefinition) -> Option<bool> {
    let stored = tokio::fs::read_to_string(path).await.ok()?;
    Some(stored == SpecFingerprint::of(def).json())
}

type EnvKey = (ManagerKind, String);

/// The node's environments: discovered managers, failure memory and per-env locks.
#[derive(Debug)]
pub struct Envs {
    work_dir: PathBuf,
    conda: Option<PathBuf>,
    uv: Option<PathBuf>,
    /// Specs that failed, with their error, per env (a cache of outcomes, so a failing spec is
    /// not retried on every start; the node core keeps the problems it reports). Held only
    /// for a lookup or an insert.
    failed: Mutex<HashMap<EnvKey, (SpecFingerprint, String)>>,
    /// One async lock per env so that an ensure and a removal of the same env never overlap
    /// when `Envs` is called concurrently (its tests do; the agent's core runs env jobs one
    /// at a time). The outer lock is held only to fetch or create an env's lock.
    locks: Mutex<HashMap<EnvKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Set while `conda env list` keeps failing, so the warning is logged once per outage.
    list_failing: AtomicBool,
}

impl Envs {
    /// Creates the registry. uv envs go under `<work_dir>/envs/uv/`; `None` binaries mean the
    /// manager is absent on this node.
    pub fn new(work_dir: &Path, conda: Option<PathBuf>, uv: Option<PathBuf>) -> Self {
        Self {
            // uv runs in another working directory: a relative work dir would point elsewhere.
            work_dir: std::path::absolute(work_dir).unwrap_or_else(|_| work_dir.to_path_buf()),
            conda,
            uv,
            failed: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            list_failing: AtomicBool::new(false),
        }
    }

    /// Creates the registry from a [`Discovery`].
    pub fn from_discovery(work_dir: &Path, discovery: &Discovery) -> Self {
        Self::new(work_dir, discovery.conda.clone(), discovery.uv.clone())
    }

    /// The folder of the uv env `name` (it may not exist).
    pub fn uv_env_dir(&self, name: &str) -> PathBuf {
        self.work_dir.join("envs").join("uv").join(name)
    }

    /// Where a created conda env is recorded (an empty file per env).
    fn conda_created_dir(&self) -> PathBuf {
        self.work_dir.join("envs").join("conda-created")
    }

    fn env_lock(&self, key: &EnvKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(key.clone()).or_default())
    }

    /// The envs this node created (and so may remove), sorted: every uv env folder (complete
    /// or not) and every recorded conda env.
    pub async fn created(&self) -> Vec<(ManagerKind, String)> {
        let mut found = BTreeSet::new();
        for (kind, dir) in [
            (ManagerKind::Uv, self.work_dir.join("envs").join("uv")),
            (ManagerKind::Conda, self.conda_created_dir()),
        ] {
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                continue;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                if let Some(name) = entry.file_name().to_str()
                    && validate_env_name(name).is_ok()
                {
                    found.insert((kind, name.to_owned()));
                }
            }
        }
        found.into_iter().collect()
    }

    /// Removes an env this node created, if `still_unwanted()` holds once the env's lock is
    /// held (so a concurrent ensure of the same env wins). `Ok(true)`: removed; `Ok(false)`:
    /// not created here, or wanted again.
    pub async fn remove(
        &self,
        kind: ManagerKind,
        name: &str,
        still_unwanted: impl FnOnce() -> bool,
    ) -> Result<bool, String> {
        validate_env_name(name)?;
        let key = (kind, name.to_owned());
        let lock = self.env_lock(&key);
        let _guard = lock.lock().await;
        if !still_unwanted() {
            return Ok(false);
        }
        self.forget_failure(&key);
        match kind {
            ManagerKind::Uv => {
                let venv = self.uv_env_dir(name);
                if !tokio::fs::try_exists(&venv).await.unwrap_or(false) {
                    return Ok(false);
                }
                remove_dir_if_present(&venv)
                    .await
                    .map_err(|e| format!("env {name}: cannot remove {}: {e}", venv.display()))?;
            }
            ManagerKind::Conda => {
                let record = self.conda_created_dir().join(name);
                if !tokio::fs::try_exists(&record).await.unwrap_or(false) {
                    return Ok(false);
                }
                let binary = self.conda.clone().ok_or_else(|| {
                    format!("env {name}: conda is not installed on this node, cannot remove it")
                })?;
                // The only processes this module starts: conda and uv, via tokio::process.
                let mut cmd = tokio::process::Command::new(&binary);
                cmd.args(["env", "remove", "-y", "-n", name]);
                self.run_step(cmd, STEP_TIMEOUT, "conda env remove")
                    .await
                    .map_err(|e| format!("env {name}: {e}"))?;
                match tokio::fs::remove_file(&record).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!(
                            "env {name}: cannot remove {}: {e}",
                            record.display()
                        ));
                    }
                    _ => {}
                }
            }
        }
        tracing::info!(env = name, manager = ?kind, "env removed: no longer defined");
        Ok(true)
    }

    /// Records that this node created the conda env `name`.
    /// The record holds the definition's fingerprint, like a uv env's ready marker.
    async fn record_conda_created(&self, def: &EnvDefinition) -> Result<(), String> {
        let name = def.name.as_str();
        let dir = self.conda_created_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("env {name}: cannot create {}: {e}", dir.display()))?;
        tokio::fs::write(dir.join(name), SpecFingerprint::of(def).json())
            .await
            .map_err(|e| format!("env {name}: cannot record it in {}: {e}", dir.display()))
    }

    /// Names of the existing envs of `kind`, sorted. conda: the named envs from
    /// `conda env list --json` (the root prefix is reported as `base`); uv: the completed envs
    /// under `<work_dir>/envs/uv/`. A missing manager or a failing listing gives an empty list.
    pub async fn list_envs(&self, kind: ManagerKind) -> Vec<String> {
        match kind {
            ManagerKind::Conda => self.list_conda().await.unwrap_or_default(),
            ManagerKind::Uv => self.list_uv().await,
        }
    }

    /// The union of conda and uv env names, sorted and deduplicated.
    pub async fn list_all_envs(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self
            .list_envs(ManagerKind::Conda)
            .await
            .into_iter()
            .collect();
        all.extend(self.list_envs(ManagerKind::Uv).await);
        all.into_iter().collect()
    }

    /// `None` when conda is absent or the listing failed (logged once per outage).
    async fn list_conda(&self) -> Option<Vec<String>> {
        let binary = self.conda.as_ref()?;
        // The only processes this module starts: conda and uv, via tokio::process.
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(["env", "list", "--json"]);
        match self.run_step(cmd, LIST_TIMEOUT, "conda env list").await {
            Ok(stdout) => match parse_conda_env_list(&stdout) {
                Ok(names) => {
                    self.list_failing.store(false, Ordering::Relaxed);
                    Some(names)
                }
                Err(e) => {
                    self.note_list_failure(&e);
                    None
                }
            },
            Err(e) => {
                self.note_list_failure(&e);
                None
            }
        }
    }

    fn note_list_failure(&self, error: &str) {
        if !self.list_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error,
                "conda env list failed; reporting no conda envs until it works"
            );
        }
    }

    async fn list_uv(&self) -> Vec<String> {
        let root = self.work_dir.join("envs").join("uv");
        let Ok(mut entries) = tokio::fs::read_dir(&root).await else {
            return Vec::new();
        };
        let mut names = BTreeSet::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_env_name(&name).is_ok()
                && tokio::fs::try_exists(entry.path().join(UV_READY_MARKER))
                    .await
                    .unwrap_or(false)
            {
                names.insert(name);
            }
        }
        names.into_iter().collect()
    }

    /// Finds the env `name` for running a command: a completed uv env first, else a conda env.
    pub async fn resolve(&self, name: &str) -> Result<ResolvedEnv, String> {
        validate_env_name(name)?;
        let venv = self.uv_env_dir(name);
        if tokio::fs::try_exists(venv.join(UV_READY_MARKER))
            .await
            .unwrap_or(false)
        {
            return Ok(ResolvedEnv::Uv { venv });
        }
        if let Some(binary) = &self.conda
            && self
                .list_conda()
                .await
                .is_some_and(|names| names.iter().any(|n| n == name))
        {
            return Ok(ResolvedEnv::Conda {
                binary: binary.clone(),
            });
        }
        Err(format!("env {name} is not available on this node"))
    }

    /// Makes sure the env described by `def` exists, creating it if needed.
    ///
    /// An existing env is left alone unless `force_recreate`. A spec that already failed for this
    /// env is not run again (the earlier error is returned) until the spec changes or
    /// `force_recreate` is set. Run this in its own task: it can take minutes.
    pub async fn ensure(&self, def: &EnvDefinition) -> Result<(), String> {
        validate_definition(def)?;
        let key = (def.manager, def.name.clone());
        let fingerprint = SpecFingerprint::of(def);
        let lock = self.env_lock(&key);
        let _guard = lock.lock().await;

        if def.force_recreate {
            self.forget_failure(&key);
        } else if let Some(previous) = self.previous_failure(&key, &fingerprint) {
            return Err(format!(
                "env {}: skipped, the same spec failed before: {previous}",
                def.name
            ));
        }
        let result = match def.manager {
            ManagerKind::Conda => self.ensure_conda(def).await,
            ManagerKind::Uv => self.ensure_uv(def).await,
        };
        match &result {
            Ok(()) => self.forget_failure(&key),
            Err(e) => {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.insert(key, (fingerprint, e.clone()));
            }
        }
        result
    }

    fn previous_failure(&self, key: &EnvKey, fingerprint: &SpecFingerprint) -> Option<String> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed
            .get(key)
            .filter(|(fp, _)| fp == fingerprint)
            .map(|(_, e)| e.clone())
    }

    fn forget_failure(&self, key: &EnvKey) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.remove(key);
    }

    async fn ensure_conda(&self, def: &EnvDefinition) -> Result<(), String> {
        let Some(binary) = self.conda.clone() else {
            return Err(format!(
                "env {}: conda is not installed on this node (set CONDA_PATH or put conda on PATH)",
                def.name
            ));
        };
        let name = def.name.as_str();
        let existing = self
            .list_conda()
            .await
            .ok_or_else(|| format!("env {name}: conda env list failed"))?;
        let exists = existing.iter().any(|n| n == name);
        if exists && !def.force_recreate {
            let record = self.conda_created_dir().join(name);
            match stored_fingerprint_matches(&record, def).await {
                // Not created here (by hand, or `base`): used as it is, never touched.
                None => return Ok(()),
                Some(true) => return Ok(()),
                // Created here from another definition (deleted and defined again): redo it.
                Some(false) => {
                    tracing::info!(env = name, "conda env was created from another definition");
                }
            }
        }
        let conda = |args: &[&str]| {
            // The only processes this module starts: conda and uv, via tokio::process.
            let mut cmd = tokio::process::Command::new(&binary);
            cmd.args(args);
            cmd
        };
        if exists {
            tracing::info!(env = name, "removing conda env for force_recreate");
            self.run_step(
                conda(&["env", "remove", "-y", "-n", name]),
                STEP_TIMEOUT,
                "conda env remove",
            )
            .await
            .map_err(|e| format!("env {name}: {e}"))?;
        }
        tracing::info!(env = name, python = %def.python_version, "creating conda env");
        let python = format!("python={}", def.python_version.trim());
        let mut created = self
            .run_step(
                conda(&["create", "-y", "-n", name, &python]),
                STEP_TIMEOUT,
                "conda create",
            )
            .await
            .map(drop);
        if created.is_ok() && !def.packages.is_empty() {
            let mut cmd = conda(&["run", "-n", name, "python", "-m", "pip", "install"]);
            cmd.args(def.packages.iter().map(|p| p.trim()));
            created = self
                .run_step(cmd, STEP_TIMEOUT, "pip install")
                .await
                .map(drop);
        }
        if created.is_ok()
            && let Some(script) = &def.custom_script
        {
            let cmd = conda(&["run", "-n", name, "bash", "-c", script]);
            created = self
                .run_step(cmd, STEP_TIMEOUT, "custom_script")
                .await
                .map(drop);
        }
        if let Err(e) = created {
            tracing::warn!(env = name, error = %e, "conda env creation failed; removing it");
            if let Err(cleanup) = self
                .run_step(
                    conda(&["env", "remove", "-y", "-n", name]),
                    STEP_TIMEOUT,
                    "conda env remove",
                )
                .await
            {
                tracing::debug!(env = name, error = %cleanup, "cleanup of the failed env failed");
            }
            return Err(format!("env {name}: {e}"));
        }
        if let Err(e) = self.record_conda_created(def).await {
            // The env works; it only will not be removed when the conductor drops it.
            tracing::warn!(env = name, error = %e, "could not record the created conda env");
        }
        tracing::info!(env = name, "conda env ready");
        Ok(())
    }

    async fn ensure_uv(&self, def: &EnvDefinition) -> Result<(), String> {
        let Some(binary) = self.uv.clone() else {
            return Err(format!(
                "env {}: uv is not installed on this node (set UV_PATH or put uv on PATH)",
                def.name
            ));
        };
        let name = def.name.as_str();
        let venv = self.uv_env_dir(name);
        let marker = venv.join(UV_READY_MARKER);
        // An env from another definition (deleted and defined again) is made anew.
        if !def.force_recreate && stored_fingerprint_matches(&marker, def).await == Some(true) {
            return Ok(());
        }
        remove_dir_if_present(&venv)
            .await
            .map_err(|e| format!("env {name}: cannot remove {}: {e}", venv.display()))?;
        let parent = self.work_dir.join("envs").join("uv");
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(|e| format!("env {name}: cannot create {}: {e}", parent.display()))?;

        tracing::info!(env = name, python = %def.python_version, "creating uv env");
        let result = self.create_uv(&binary, def, &venv, &parent).await;
        if let Err(e) = result {
            tracing::warn!(env = name, error = %e, "uv env creation failed; removing it");
            if let Err(cleanup) = remove_dir_if_present(&venv).await {
                tracing::debug!(env = name, error = %cleanup, "cleanup of the failed env failed");
            }
            return Err(format!("env {name}: {e}"));
        }
        tracing::info!(env = name, "uv env ready");
        Ok(())
    }

    async fn create_uv(
        &self,
        binary: &Path,
        def: &EnvDefinition,
        venv: &Path,
        cwd: &Path,
    ) -> Result<(), String> {
        let uv = |args: &[&std::ffi::OsStr]| {
            // The only processes this module starts: conda and uv, via tokio::process.
            let mut cmd = tokio::process::Command::new(binary);
            cmd.args(args).current_dir(cwd).env("UV_NO_PROJECT", "1");
            cmd
        };
        self.run_step(
            uv(&[
                "venv".as_ref(),
                "--python".as_ref(),
                def.python_version.trim().as_ref(),
                venv.as_os_str(),
            ]),
            STEP_TIMEOUT,
            "uv venv",
        )
        .await?;
        let python = venv.join("bin").join("python");
        if !def.packages.is_empty() {
            let mut cmd = uv(&[
                "pip".as_ref(),
                "install".as_ref(),
                "--python".as_ref(),
                python.as_os_str(),
            ]);
            cmd.args(def.packages.iter().map(|p| p.trim()));
            self.run_step(cmd, STEP_TIMEOUT, "uv pip install").await?;
        }
        if let Some(script) = &def.custom_script {
            let (_, env) = wrap_command(
                &def.name,
                &ResolvedEnv::Uv {
                    venv: venv.to_path_buf(),
                },
                &[],
            );
            // The one non-manager process: `bash` inside the env (tokio::process), with the venv's
            // bin first on PATH and VIRTUAL_ENV set.
            let mut cmd = tokio::process::Command::new("bash");
            cmd.arg("-c").arg(script).current_dir(cwd).envs(env);
            self.run_step(cmd, STEP_TIMEOUT, "custom_script").await?;
        }
        tokio::fs::write(venv.join(UV_READY_MARKER), SpecFingerprint::of(def).json())
            .await
            .map_err(|e| format!("cannot write the ready marker: {e}"))
    }
}

async fn remove_dir_if_present(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Envs {
    /// Where running provisioning steps are recorded (see [`kill_left_steps`]).
    fn steps_dir(&self) -> PathBuf {
        self.work_dir.join("env-steps")
    }

    /// Runs one provisioning step to completion and returns its stdout; a non-zero exit, a
    /// spawn failure or a timeout is an error carrying the tail of the output.
    ///
    /// The step leads its own process group and is recorded in `<work_dir>/env-steps/<pid>`
    /// while it runs: if the agent dies meanwhile, the next one kills the group before it
    /// provisions again, so two installs never write one env at once. A timeout kills the
    /// whole group.
    async fn run_step(
        &self,
        mut cmd: tokio::process::Command,
        timeout: Duration,
        what: &str,
    ) -> Result<String, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PIP_NO_INPUT", "1")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{what} could not start: {e}"))?;
        let mut guard = StepGuard {
            group: child.id().and_then(runner::Group::led_by),
            record: None,
        };
        if let Some(group) = guard.group {
            // Written at once, on this thread (a few bytes): the sooner it is on disk, the
            // smaller the window in which a dying agent leaves a step nobody knows of.
            let path = self.steps_dir().join(group.pgid.to_string());
            let written = std::fs::create_dir_all(self.steps_dir()).and_then(|()| {
                let bytes = serde_json::to_vec(&group).map_err(std::io::Error::other)?;
                std::fs::write(&path, bytes)
            });
            match written {
                Ok(()) => guard.record = Some(path),
                Err(error) => tracing::warn!(%error, "could not record a provisioning step"),
            }
        }
        let result = tokio::time::timeout(timeout, child.wait_with_output()).await;
        guard.finish(result.is_err()).await;
        let output = match result {
            Err(_) => return Err(format!("{what} timed out after {}s", timeout.as_secs())),
            Ok(Err(e)) => return Err(format!("{what} failed: {e}")),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let combined = format!("{}\n{}", stdout.trim_end(), stderr.trim_end());
        let combined = combined.trim();
        let tail: String = {
            let count = combined.chars().count();
            combined
                .chars()
                .skip(count.saturating_sub(ERROR_TAIL_CHARS))
                .collect()
        };
        Err(format!("{what} failed ({}): {tail}", output.status))
    }
}

/// A running provisioning step: its group, and its record in `<work_dir>/env-steps`. Dropped
/// before it finished (the agent shuts down mid-step), it kills the whole group, not only the
/// leader, and takes the record away.
struct StepGuard {
    group: Option<runner::Group>,
    record: Option<PathBuf>,
}

impl StepGuard {
    /// The step is over; `kill` ends what is left of its group (a timeout).
    async fn finish(&mut self, kill: bool) {
        if let Some(group) = self.group.take()
            && kill
        {
            let _ = tokio::task::spawn_blocking(move || group.signal(Signal::SIGKILL)).await;
        }
        if let Some(path) = self.record.take() {
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}

impl Drop for StepGuard {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            group.signal(Signal::SIGKILL);
        }
        if let Some(path) = self.record.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Kills the process groups of provisioning steps a previous agent left running (it died
/// during a provisioning), so that the env is provisioned again from a clean start. A group
/// is recognised by its id and session, so its members are found even when the step's leader
/// is gone, and a recycled id is never taken for it. Returns how many were still running.
pub fn kill_left_steps(work_dir: &Path) -> usize {
    let dir = work_dir.join("env-steps");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.filter_map(Result::ok) {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        // A step recorded by the previous version (its leader only) counts while it lives.
        let step = serde_json::from_slice::<runner::Group>(&bytes)
            .ok()
            .or_else(|| {
                serde_json::from_slice::<super::keeper::ProcId>(&bytes)
                    .ok()
                    .filter(super::keeper::ProcId::alive)
                    .and_then(|leader| runner::Group::led_by(leader.pid))
            });
        if let Some(step) = step
            && step.alive()
        {
            step.signal(Signal::SIGKILL);
            killed += 1;
        }
        let _ = std::fs::remove_file(entry.path());
    }
    killed
}

/// Parses `conda env list --json`: envs under an `envs` folder by basename, the root prefix (the
/// first entry when it is not under `envs`) as `base`. Sorted, deduplicated.
pub fn parse_conda_env_list(json: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct EnvList {
        envs: Vec<PathBuf>,
    }
    let list: EnvList = serde_json::from_str(json)
        .map_err(|e| format!("unexpected `conda env list --json` output: {e}"))?;
    let mut names = BTreeSet::new();
    for (i, path) in list.envs.iter().enumerate() {
        let under_envs = path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|p| p == "envs");
        if under_envs {
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                names.insert(name.to_owned());
            }
        } else if i == 0 {
            names.insert("base".to_owned());
        }
    }
    Ok(names.into_iter().collect())
}

/// Wraps `command` to run inside the env `env_name`. Returns the argv and extra environment
/// variables to set. conda: `conda run --no-capture-output -n NAME ...command`; uv: the command
/// unchanged, with `PATH` = `<venv>/bin:` + this process's `PATH` and `VIRTUAL_ENV` set.
pub fn wrap_command(
    env_name: &str,
    manager: &ResolvedEnv,
    command: &[String],
) -> (Vec<String>, BTreeMap<String, String>) {
    match manager {
        ResolvedEnv::Conda { binary } => {
            let mut argv = vec![
                binary.to_string_lossy().into_owned(),
                "run".to_owned(),
                "--no-capture-output".to_owned(),
                "-n".to_owned(),
                env_name.to_owned(),
            ];
            argv.extend(command.iter().cloned());
            (argv, BTreeMap::new())
        }
        ResolvedEnv::Uv { venv } => {
            let bin = venv.join("bin").to_string_lossy().into_owned();
            let path = match std::env::var("PATH") {
                Ok(p) if !p.is_empty() => format!("{bin}:{p}"),
                _ => bin,
            };
            let env = BTreeMap::from([
                ("PATH".to_owned(), path),
                (
                    "VIRTUAL_ENV".to_owned(),
                    venv.to_string_lossy().into_owned(),
                ),
            ]);
            (command.to_vec(), env)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
