//! Git workspaces: one checkout per deployment, prepared with libgit2 (no `git` binary).
//!
//! [`prepare_checkout`] brings `dest` to exactly the requested commit of `repo` and returns its
//! SHA. The first call creates the repository and fetches the full history (no shallow clone, so a
//! commit SHA works as `git_ref`, fixing B15); later calls re-point `origin`, fetch branches and
//! tags with pruning, then force-check-out the target and delete untracked files (like
//! `git clean -fd`; ignored files survive).
//!
//! Invariants:
//! - The token only ever travels through the libgit2 credential callback (HTTPS user
//!   `x-access-token`). It is never put into a URL, the repository config, a command line or a log
//!   line, and every error message is scrubbed of it before it is returned (fixes B10 for git).
//! - A token is offered only to `https://` remotes, and only once per fetch (a rejected token is an
//!   [`WorkspaceError::AuthFailed`], not a retry loop).
//! - Blocking: callers run this on `spawn_blocking`, at most one call per `dest` at a time (the
//!   caller serializes per deployment).

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, Cred, CredentialType, ErrorCode, FetchOptions, FetchPrune, Oid, ProxyOptions,
    RemoteCallbacks, Repository, ResetType,
};

/// The remote name used for the deployment's repository.
const REMOTE: &str = "origin";

/// Refspecs fetched on every prepare: all branches as remote-tracking refs, and all tags (forced,
/// so a moved tag is followed).
const FETCH_REFSPECS: [&str; 2] = [
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];

/// The HTTPS user name paired with a token (GitHub, GitLab and Gitea accept it).
const TOKEN_USER: &str = "x-access-token";

/// Why a workspace could not be prepared. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkspaceError {
    /// The caller passed an unusable argument (empty repo URL, empty ref).
    #[error("invalid workspace request: {0}")]
    Invalid(String),
    /// The remote asked for credentials and the token was missing or rejected.
    #[error("authentication failed for {repo}{hint}")]
    AuthFailed {
        /// The repository URL (user info redacted).
        repo: String,
        /// Extra context such as " (no token configured)"; may be empty.
        hint: String,
    },
    /// The ref is neither a remote branch, a tag nor a known commit SHA.
    #[error("unknown git_ref {0}")]
    UnknownRef(String),
    /// No ref was given and the remote has no default branch (origin/HEAD, main, master).
    #[error("no default branch found for {0} (origin/HEAD, main and master are missing)")]
    NoDefaultBranch(String),
    /// A libgit2 operation failed.
    #[error("git {op} failed for {repo}: {message}")]
    Git {
        /// The operation (`open`, `init`, `fetch`, `checkout`, ...).
        op: &'static str,
        /// The repository URL (user info redacted).
        repo: String,
        /// libgit2's message.
        message: String,
    },
    /// A file-system operation on the workspace folder failed.
    #[error("workspace io error at {path}: {message}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error text.
        message: String,
    },
}

impl WorkspaceError {
    /// Returns the error with every occurrence of `token` replaced by `***`.
    fn scrubbed(self, token: Option<&str>) -> Self {
        let s = |text: String| scrub(&text, token);
        match self {
            Self::Invalid(m) => Self::Invalid(s(m)),
            Self::AuthFailed { repo, hint } => Self::AuthFailed {
                repo: s(repo),
                hint: s(hint),
            },
            Self::UnknownRef(r) => Self::UnknownRef(s(r)),
            Self::NoDefaultBranch(r) => Self::NoDefaultBranch(s(r)),
            Self::Git { op, repo, message } => Self::Git {
                op,
                repo: s(repo),
                message: s(message),
            },
            Self::Io { path, message } => Self::Io {
                path,
                message: s(message),
            },
        }
    }
}

/// Replaces `token` (when non-empty) by `***` and redacts URL user info (`https://u:p@h` ->
/// `https://***@h`).
fn scrub(text: &str, token: Option<&str>) -> String {
    let mut out = match token {
        Some(t) if !t.is_empty() => text.replace(t, "***"),
        _ => text.to_owned(),
    };
    // Redact user info in any URL-looking substring.
    let mut search_from = 0;
    while let Some(rel) = out[search_from..].find("://") {
        let start = search_from + rel + 3;
        let rest = &out[start..];
        let end_of_authority = rest
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end_of_authority].rfind('@') {
            if &rest[..at] != "***" {
                out.replace_range(start..start + at, "***");
            }
            search_from = start + 3;
        } else {
            search_from = start;
        }
    }
    out
}

/// Brings `dest` to the commit named by `git_ref` (or the remote's default branch) of `repo` and
/// returns the resolved commit SHA (hex).
///
/// `git_ref` is tried as a remote branch (`origin/<ref>`: a local branch of that name is reset to
/// it and checked out), then a tag, then a full or abbreviated commit SHA. `token`, if given, is
/// offered to HTTPS remotes as `x-access-token:<token>` through the credential callback only.
/// Blocking; run it on `spawn_blocking`.
pub fn prepare_checkout(
    dest: &Path,
    repo: &str,
    git_ref: Option<&str>,
    token: Option<&str>,
) -> Result<String, WorkspaceError> {
    prepare(dest, repo, git_ref, token).map_err(|e| e.scrubbed(token))
}

fn prepare(
    dest: &Path,
    repo: &str,
    git_ref: Option<&str>,
    token: Option<&str>,
) -> Result<String, WorkspaceError> {
    let repo = repo.trim();
    if repo.is_empty() {
        return Err(WorkspaceError::Invalid(
            "the repository URL is empty".into(),
        ));
    }
    let git_ref = match git_ref.map(str::trim) {
        Some("") => return Err(WorkspaceError::Invalid("git_ref is empty".into())),
        other => other,
    };
    let shown = scrub(repo, token);
    let git_err = |op: &'static str| {
        let shown = shown.clone();
        move |e: git2::Error| WorkspaceError::Git {
            op,
            repo: shown,
            message: e.message().to_owned(),
        }
    };

    let repository = open_or_init(dest, &shown)?;
    match repository.find_remote(REMOTE) {
        Ok(_) => repository
            .remote_set_url(REMOTE, repo)
            .map_err(git_err("remote set-url"))?,
        Err(e) if e.code() == ErrorCode::NotFound => {
            repository
                .remote(REMOTE, repo)
                .map_err(git_err("remote add"))?;
        }
        Err(e) => return Err(git_err("remote lookup")(e)),
    }

    let default_branch = fetch(&repository, repo, &shown, token)?;
    let target = resolve_target(&repository, git_ref, default_branch.as_deref(), &shown)?;
    checkout(&repository, &target).map_err(git_err("checkout"))?;
    Ok(target.oid.to_string())
}

/// Opens the repository at `dest`, or (re)creates it when absent or unusable.
fn open_or_init(dest: &Path, shown: &str) -> Result<Repository, WorkspaceError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| WorkspaceError::Io {
            path,
            message: e.to_string(),
        }
    };
    if dest.join(".git").exists() {
        match Repository::open(dest) {
            Ok(r) if !r.is_bare() => return Ok(r),
            Ok(_) => {
                tracing::warn!(path = %dest.display(), "workspace is a bare repository; recreating")
            }
            Err(e) => {
                tracing::warn!(path = %dest.display(), error = %e.message(), "workspace repository unusable; recreating")
            }
        }
    }
    if dest.symlink_metadata().is_ok() {
        if dest.is_dir() {
            fs::remove_dir_all(dest).map_err(io_err(dest))?;
        } else {
            fs::remove_file(dest).map_err(io_err(dest))?;
        }
    }
    fs::create_dir_all(dest).map_err(io_err(dest))?;
    Repository::init(dest).map_err(|e| WorkspaceError::Git {
        op: "init",
        repo: shown.to_owned(),
        message: e.message().to_owned(),
    })
}

/// Fetches branches and tags (with pruning) from `origin`. Returns the remote's default branch
/// (`refs/heads/...`) when the remote advertised one.
fn fetch(
    repository: &Repository,
    url: &str,
    shown: &str,
    token: Option<&str>,
) -> Result<Option<String>, WorkspaceError> {
    let mut remote = repository
        .find_remote(REMOTE)
        .map_err(|e| WorkspaceError::Git {
            op: "remote lookup",
            repo: shown.to_owned(),
            message: e.message().to_owned(),
        })?;
    let offer_token = token
        .filter(|t| !t.is_empty())
        .filter(|_| url.to_ascii_lowercase().starts_with("https://"));
    let asked = Cell::new(0u32);
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(|_url, _user, allowed| {
        asked.set(asked.get() + 1);
        match offer_token {
            Some(t)
                if asked.get() == 1 && allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
            {
                Cred::userpass_plaintext(TOKEN_USER, t)
            }
            _ => Err(git2::Error::from_str("no usable credentials")),
        }
    });
    let mut proxy = ProxyOptions::new();
    proxy.auto();
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .proxy_options(proxy)
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::All);
    let fetched = remote.fetch(&FETCH_REFSPECS, Some(&mut options), None);
    drop(options);
    if let Err(e) = fetched {
        if asked.get() > 0 || e.code() == ErrorCode::Auth {
            let hint = if offer_token.is_some() {
                String::new()
            } else if token.is_some_and(|t| !t.is_empty()) {
                " (a token is only sent to https:// remotes)".to_owned()
            } else {
                " (no token configured)".to_owned()
            };
            return Err(WorkspaceError::AuthFailed {
                repo: shown.to_owned(),
                hint,
            });
        }
        return Err(WorkspaceError::Git {
            op: "fetch",
            repo: shown.to_owned(),
            message: e.message().to_owned(),
        });
    }
    Ok(remote
        .default_branch()
        .ok()
        .and_then(|b| b.as_str().ok().map(str::to_owned)))
}

/// What to check out: the commit, and the local branch to point at it (for remote branches).
struct Target {
    oid: Oid,
    branch: Option<String>,
}

fn resolve_target(
    repository: &Repository,
    git_ref: Option<&str>,
    default_branch: Option<&str>,
    shown: &str,
) -> Result<Target, WorkspaceError> {
    let commit_of = |refname: &str| -> Option<Oid> {
        let reference = repository.find_reference(refname).ok()?;
        let commit = reference.peel_to_commit().ok()?;
        Some(commit.id())
    };
    let Some(r) = git_ref else {
        return default_target(repository, default_branch, shown, &commit_of);
    };
    if let Some(oid) = commit_of(&format!("refs/remotes/{REMOTE}/{r}")) {
        return Ok(Target {
            oid,
            branch: Some(r.to_owned()),
        });
    }
    if let Some(oid) = commit_of(&format!("refs/tags/{r}")) {
        return Ok(Target { oid, branch: None });
    }
    let looks_like_sha = (4..=64).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_hexdigit());
    if looks_like_sha
        && let Ok(commit) = repository
            .revparse_single(r)
            .and_then(|object| object.peel_to_commit())
    {
        return Ok(Target {
            oid: commit.id(),
            branch: None,
        });
    }
    Err(WorkspaceError::UnknownRef(r.to_owned()))
}

/// The remote's default branch: the advertised HEAD, else `origin/HEAD`, else main, else master.
fn default_target(
    repository: &Repository,
    default_branch: Option<&str>,
    shown: &str,
    commit_of: &dyn Fn(&str) -> Option<Oid>,
) -> Result<Target, WorkspaceError> {
    let origin_head = format!("refs/remotes/{REMOTE}/HEAD");
    if let Some(name) = default_branch.and_then(|b| b.strip_prefix("refs/heads/")) {
        let tracking = format!("refs/remotes/{REMOTE}/{name}");
        if let Some(oid) = commit_of(&tracking) {
            // Keep origin/HEAD in step with the remote (libgit2's fetch does not update it).
            if let Err(e) = repository.reference_symbolic(
                &origin_head,
                &tracking,
                true,
                "symphony: origin/HEAD",
            ) {
                tracing::debug!(error = %e.message(), "could not update origin/HEAD");
            }
            return Ok(Target {
                oid,
                branch: Some(name.to_owned()),
            });
        }
    }
    if let Ok(reference) = repository.find_reference(&origin_head)
        && let Ok(Some(target)) = reference.symbolic_target()
        && let Some(name) = target.strip_prefix(&format!("refs/remotes/{REMOTE}/"))
        && let Some(oid) = commit_of(target)
    {
        return Ok(Target {
            oid,
            branch: Some(name.to_owned()),
        });
    }
    for name in ["main", "master"] {
        if let Some(oid) = commit_of(&format!("refs/remotes/{REMOTE}/{name}")) {
            return Ok(Target {
                oid,
                branch: Some(name.to_owned()),
            });
        }
    }
    Err(WorkspaceError::NoDefaultBranch(shown.to_owned()))
}

/// Force-checks-out `target`, removes untracked files, and points HEAD at it (a local branch for
/// remote branches, detached otherwise).
fn checkout(repository: &Repository, target: &Target) -> Result<(), git2::Error> {
    let commit = repository.find_commit(target.oid)?;
    let forced = || {
        let mut builder = CheckoutBuilder::new();
        builder.force().remove_untracked(true);
        builder
    };
    // Update the work tree while HEAD still names the old commit (the checkout baseline), then
    // move HEAD; a branch that is the current HEAD cannot be force-moved, so detach first.
    repository.checkout_tree(commit.as_object(), Some(&mut forced()))?;
    repository.set_head_detached(target.oid)?;
    if let Some(branch) = &target.branch {
        repository.branch(branch, &commit, true)?;
        repository.set_head(&format!("refs/heads/{branch}"))?;
    }
    repository.reset(commit.as_object(), ResetType::Hard, Some(&mut forced()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
