//! Tests for [`super::prepare_checkout`] against local upstream repositories built with git2.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use git2::{Oid, Repository, RepositoryInitOptions, Signature};

use super::{WorkspaceError, prepare_checkout, scrub};

/// A bare upstream repository whose branches are written directly (no work tree).
struct Upstream {
    repo: Repository,
    url: String,
}

impl Upstream {
    fn new(dir: &Path) -> Self {
        let mut opts = RepositoryInitOptions::new();
        opts.bare(true).initial_head("main");
        let repo = Repository::init_opts(dir, &opts).unwrap();
        Self {
            repo,
            url: dir.to_str().unwrap().to_owned(),
        }
    }

    /// Commits `files` (path, Some(content) to write or None to delete) on top of `branch`.
    fn commit(&self, branch: &str, files: &[(&str, Option<&str>)], msg: &str) -> Oid {
        let refname = format!("refs/heads/{branch}");
        let parent = self
            .repo
            .find_reference(&refname)
            .ok()
            .map(|r| r.peel_to_commit().unwrap());
        let base = parent.as_ref().map(|c| c.tree().unwrap());
        let mut builder = self.repo.treebuilder(base.as_ref()).unwrap();
        for (path, content) in files {
            match content {
                Some(text) => {
                    let blob = self.repo.blob(text.as_bytes()).unwrap();
                    builder.insert(path, blob, 0o100644).unwrap();
                }
                None => builder.remove(path).unwrap(),
            }
        }
        let tree = self.repo.find_tree(builder.write().unwrap()).unwrap();
        let sig = Signature::now("t", "t@example.com").unwrap();
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        self.repo
            .commit(Some(&refname), &sig, &sig, msg, &tree, &parents)
            .unwrap()
    }

    fn branch_from(&self, name: &str, oid: Oid) {
        let commit = self.repo.find_commit(oid).unwrap();
        self.repo.branch(name, &commit, true).unwrap();
    }

    fn annotated_tag(&self, name: &str, oid: Oid) {
        let object = self.repo.find_object(oid, None).unwrap();
        let sig = Signature::now("t", "t@example.com").unwrap();
        self.repo
            .tag(name, &object, &sig, "release", false)
            .unwrap();
    }
}

fn read(dest: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dest.join(file)).ok()
}

fn head_name(dest: &Path) -> Option<String> {
    let repo = Repository::open(dest).unwrap();
    let head = repo.head().unwrap();
    if repo.head_detached().unwrap() {
        None
    } else {
        head.name().ok().map(str::to_owned)
    }
}

/// Upstream history: main c1 -> c2 -> c3 (tag v1 on c2), dev = c2 + d1.
struct Fixture {
    _dir: tempfile::TempDir,
    up: Upstream,
    dest: std::path::PathBuf,
    c1: Oid,
    c2: Oid,
    c3: Oid,
    d1: Oid,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::new(&dir.path().join("upstream.git"));
    let c1 = up.commit(
        "main",
        &[("a.txt", Some("one")), (".gitignore", Some("*.log\n"))],
        "c1",
    );
    let c2 = up.commit("main", &[("a.txt", Some("two"))], "c2");
    up.branch_from("dev", c2);
    let d1 = up.commit("dev", &[("dev.txt", Some("dev"))], "d1");
    up.annotated_tag("v1", c2);
    let c3 = up.commit(
        "main",
        &[("a.txt", Some("three")), ("b.txt", Some("b"))],
        "c3",
    );
    let dest = dir.path().join("work").join("deploy-1");
    Fixture {
        _dir: dir,
        up,
        dest,
        c1,
        c2,
        c3,
        d1,
    }
}

#[test]
fn no_ref_checks_out_default_branch_on_a_local_branch() {
    let f = fixture();
    let sha = prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    assert_eq!(sha, f.c3.to_string());
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("three"));
    assert_eq!(head_name(&f.dest).as_deref(), Some("refs/heads/main"));
}

#[test]
fn branch_tag_full_sha_and_short_sha_resolve_to_the_right_commits() {
    let f = fixture();
    // Remote branch.
    let sha = prepare_checkout(&f.dest, &f.up.url, Some("dev"), None).unwrap();
    assert_eq!(sha, f.d1.to_string());
    assert_eq!(read(&f.dest, "dev.txt").as_deref(), Some("dev"));
    assert_eq!(head_name(&f.dest).as_deref(), Some("refs/heads/dev"));

    // Annotated tag: peeled to its commit, detached HEAD; dev.txt is gone.
    let sha = prepare_checkout(&f.dest, &f.up.url, Some("v1"), None).unwrap();
    assert_eq!(sha, f.c2.to_string());
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("two"));
    assert_eq!(read(&f.dest, "dev.txt"), None);
    assert_eq!(head_name(&f.dest), None);

    // Full SHA of a commit that is no branch tip (B15).
    let full = f.c1.to_string();
    let sha = prepare_checkout(&f.dest, &f.up.url, Some(&full), None).unwrap();
    assert_eq!(sha, full);
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("one"));

    // Abbreviated SHA.
    let short = &f.c2.to_string()[..8];
    let sha = prepare_checkout(&f.dest, &f.up.url, Some(short), None).unwrap();
    assert_eq!(sha, f.c2.to_string());
    assert_eq!(read(&f.dest, "b.txt"), None);
}

#[test]
fn full_sha_works_on_the_very_first_checkout() {
    let f = fixture();
    let full = f.c1.to_string();
    let sha = prepare_checkout(&f.dest, &f.up.url, Some(&full), None).unwrap();
    assert_eq!(sha, full);
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("one"));
}

#[test]
fn existing_checkout_follows_new_upstream_commits_and_deletions() {
    let f = fixture();
    let first = prepare_checkout(&f.dest, &f.up.url, Some("main"), None).unwrap();
    assert_eq!(first, f.c3.to_string());
    let c4 =
        f.up.commit("main", &[("a.txt", Some("four")), ("b.txt", None)], "c4");
    let second = prepare_checkout(&f.dest, &f.up.url, Some("main"), None).unwrap();
    assert_eq!(second, c4.to_string());
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("four"));
    assert_eq!(
        read(&f.dest, "b.txt"),
        None,
        "file deleted upstream must go"
    );

    // The default branch path also moves.
    let c5 = f.up.commit("main", &[("a.txt", Some("five"))], "c5");
    let third = prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    assert_eq!(third, c5.to_string());
}

#[test]
fn local_changes_and_untracked_files_are_discarded_but_ignored_files_survive() {
    let f = fixture();
    prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    std::fs::write(f.dest.join("a.txt"), "edited").unwrap();
    std::fs::write(f.dest.join("stray.txt"), "x").unwrap();
    std::fs::create_dir_all(f.dest.join("junk/deeper")).unwrap();
    std::fs::write(f.dest.join("junk/deeper/f.txt"), "x").unwrap();
    std::fs::write(f.dest.join("run.log"), "keep").unwrap();

    let sha = prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    assert_eq!(sha, f.c3.to_string());
    assert_eq!(read(&f.dest, "a.txt").as_deref(), Some("three"));
    assert!(!f.dest.join("stray.txt").exists());
    assert!(
        !f.dest.join("junk").exists(),
        "untracked dirs go (clean -fd)"
    );
    assert_eq!(read(&f.dest, "run.log").as_deref(), Some("keep"));
}

#[test]
fn unknown_ref_is_a_typed_error_and_pruned_branches_become_unknown() {
    let f = fixture();
    let err = prepare_checkout(&f.dest, &f.up.url, Some("nope"), None).unwrap_err();
    assert_eq!(err, WorkspaceError::UnknownRef("nope".into()));
    assert_eq!(err.to_string(), "unknown git_ref nope");

    // A hex-looking ref that matches nothing is unknown too.
    let err = prepare_checkout(&f.dest, &f.up.url, Some("deadbeef"), None).unwrap_err();
    assert_eq!(err, WorkspaceError::UnknownRef("deadbeef".into()));

    assert_eq!(
        prepare_checkout(&f.dest, &f.up.url, Some("dev"), None).unwrap(),
        f.d1.to_string()
    );
    f.up.repo
        .find_branch("dev", git2::BranchType::Local)
        .unwrap()
        .delete()
        .unwrap();
    let err = prepare_checkout(&f.dest, &f.up.url, Some("dev"), None).unwrap_err();
    assert_eq!(err, WorkspaceError::UnknownRef("dev".into()));
}

#[test]
fn a_non_repository_destination_is_replaced() {
    let f = fixture();
    std::fs::create_dir_all(&f.dest).unwrap();
    std::fs::write(f.dest.join("leftover"), "x").unwrap();
    let sha = prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    assert_eq!(sha, f.c3.to_string());
    assert!(!f.dest.join("leftover").exists());
}

#[test]
fn switching_the_repository_url_repoints_origin() {
    let f = fixture();
    prepare_checkout(&f.dest, &f.up.url, None, None).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let other = Upstream::new(&dir2.path().join("other.git"));
    let o1 = other.commit("main", &[("o.txt", Some("other"))], "o1");
    let sha = prepare_checkout(&f.dest, &other.url, None, None).unwrap();
    assert_eq!(sha, o1.to_string());
    assert_eq!(read(&f.dest, "o.txt").as_deref(), Some("other"));
    assert_eq!(read(&f.dest, "a.txt"), None);
}

#[test]
fn empty_inputs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        prepare_checkout(dir.path(), "  ", None, None),
        Err(WorkspaceError::Invalid(_))
    ));
    assert!(matches!(
        prepare_checkout(dir.path(), "/x", Some(""), None),
        Err(WorkspaceError::Invalid(_))
    ));
}

#[test]
fn token_never_appears_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("ws");
    let err = prepare_checkout(
        &dest,
        "https://127.0.0.1:1/x.git",
        Some("main"),
        Some("SECRET-123"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("SECRET-123"), "{text}");
    assert!(!format!("{err:?}").contains("SECRET-123"));
    assert!(
        matches!(err, WorkspaceError::Git { op: "fetch", .. }),
        "{err:?}"
    );

    // A token smuggled into the URL is redacted as well.
    let err = prepare_checkout(
        &dest,
        "https://x-access-token:SECRET-123@127.0.0.1:1/x.git",
        None,
        Some("SECRET-123"),
    )
    .unwrap_err();
    assert!(!err.to_string().contains("SECRET-123"), "{err}");
    assert!(
        err.to_string().contains("https://***@127.0.0.1:1/x.git"),
        "{err}"
    );
}

#[test]
fn scrub_removes_token_and_url_user_info() {
    assert_eq!(
        scrub("bad tok SECRET there", Some("SECRET")),
        "bad tok *** there"
    );
    assert_eq!(
        scrub("see https://u:p@host/x and http://h/y", None),
        "see https://***@host/x and http://h/y"
    );
    assert_eq!(scrub("nothing", Some("")), "nothing");
}

/// A one-shot HTTP server answering every request with 401 + Basic challenge.
fn unauthorized_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.git", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        // libgit2 may reconnect after the challenge; serve a few connections.
        listener.set_nonblocking(false).unwrap();
        for _ in 0..3 {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\n\
                  Content-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (url, handle)
}

#[test]
fn auth_challenge_is_reported_as_auth_failure_without_the_token() {
    let (url, _server) = unauthorized_server();
    let dir = tempfile::tempdir().unwrap();
    let err = prepare_checkout(&dir.path().join("ws"), &url, None, Some("SECRET-123")).unwrap_err();
    assert_eq!(
        err,
        WorkspaceError::AuthFailed {
            repo: url.clone(),
            hint: " (a token is only sent to https:// remotes)".into()
        }
    );
    assert_eq!(
        err.to_string(),
        format!("authentication failed for {url} (a token is only sent to https:// remotes)")
    );
}
