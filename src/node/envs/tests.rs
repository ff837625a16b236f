//! Tests for the env managers: fake conda/uv scripts that record their argv, plus a real uv run
//! when `uv` is installed.

use std::path::{Path, PathBuf};

use super::*;

/// Writes an executable shell script `name` into `dir` that appends its argv to `log` and then
/// runs `body`.
///
/// The executable is created by a child `install`, never through a writable fd of this process:
/// other tests fork concurrently, a forked child inherits such an fd until it execs, and running
/// the script meanwhile fails with ETXTBSY ("text file busy").
fn fake_tool(dir: &Path, name: &str, log: &Path, body: &str) -> PathBuf {
    let path = dir.join(name);
    let source = dir.join(format!("{name}.src"));
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> '{}'\n{body}\nexit 0\n",
        log.display()
    );
    std::fs::write(&source, script).unwrap();
    let status = std::process::Command::new("install")
        .args(["-m", "755"])
        .arg(&source)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "install {}", path.display());
    path
}

const FAKE_CONDA_BODY: &str = r#"case "$*" in
  "env list --json") echo '{"envs": ["/opt/conda", "/opt/conda/envs/myenv"]}' ;;
  "create -y -n badenv"*) echo "solver exploded" >&2; exit 1 ;;
esac"#;

const FAKE_UV_BODY: &str = r#"case "$1" in
  venv) mkdir -p "$4/bin" ;;
  pip) case "$*" in *bad-pkg*) echo "no solution for bad-pkg" >&2; exit 1 ;; esac ;;
esac"#;

struct Fake {
    dir: tempfile::TempDir,
    log: PathBuf,
    envs: Envs,
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("argv.log");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let conda = fake_tool(&bin, "conda", &log, FAKE_CONDA_BODY);
        let uv = fake_tool(&bin, "uv", &log, FAKE_UV_BODY);
        let envs = Envs::new(&dir.path().join("work"), Some(conda), Some(uv));
        Self { dir, log, envs }
    }

    /// The recorded argv lines since the last call (the log is truncated).
    fn take_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        std::fs::write(&self.log, "").unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn conda_binary(&self) -> PathBuf {
        self.dir.path().join("bin").join("conda")
    }
}

fn def(name: &str, python: &str, manager: ManagerKind) -> EnvDefinition {
    EnvDefinition {
        name: name.to_owned(),
        python_version: python.to_owned(),
        packages: Vec::new(),
        custom_script: None,
        manager,
        force_recreate: false,
    }
}

#[test]
fn discovery_uses_override_then_path_and_reports_missing_conda_once() {
    let fake = Fake::new();
    let bin = fake.dir.path().join("bin");
    let d = discover_from(
        Some(fake.conda_binary().into()),
        None,
        Some(bin.clone().into()),
    );
    assert_eq!(d.conda, Some(fake.conda_binary()));
    assert_eq!(d.uv, Some(bin.join("uv")));
    assert!(d.notes.is_empty(), "{:?}", d.notes);

    // CONDA_PATH may name the install folder (bin/conda inside).
    let d = discover_from(Some(fake.dir.path().into()), None, None);
    assert_eq!(d.conda, Some(fake.conda_binary()));

    // Nothing found: one note per manager, no panic.
    let empty = tempfile::tempdir().unwrap();
    let d = discover_from(None, None, Some(empty.path().into()));
    assert_eq!(d.conda, None);
    assert_eq!(d.uv, None);
    assert_eq!(d.notes.len(), 2);
    assert!(d.notes[0].starts_with("conda not found"), "{:?}", d.notes);

    // A bad override is reported and PATH is used instead.
    let d = discover_from(Some("/nonexistent/conda".into()), None, Some(bin.into()));
    assert_eq!(d.conda, Some(fake.conda_binary()));
    assert_eq!(d.notes.len(), 1);
    assert!(
        d.notes[0].contains("CONDA_PATH=/nonexistent/conda"),
        "{:?}",
        d.notes
    );
}

#[test]
fn envs_can_be_shared_between_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Envs>();
}

#[test]
fn conda_env_list_parsing() {
    let names =
        parse_conda_env_list(r#"{"envs": ["/opt/conda", "/opt/conda/envs/myenv", "/x/envs/a"]}"#)
            .unwrap();
    assert_eq!(names, ["a", "base", "myenv"]);
    // A prefix env outside an `envs` folder cannot be used by name: skipped.
    let names = parse_conda_env_list(r#"{"envs": ["/opt/conda/envs/b", "/elsewhere/p"]}"#).unwrap();
    assert_eq!(names, ["b"]);
    assert!(parse_conda_env_list("not json").is_err());
    assert!(parse_conda_env_list(r#"{"other": 1}"#).is_err());
}

#[tokio::test]
async fn conda_list_and_existing_env_is_left_alone() {
    let fake = Fake::new();
    assert_eq!(
        fake.envs.list_envs(ManagerKind::Conda).await,
        ["base", "myenv"]
    );
    assert_eq!(fake.take_lines(), ["env list --json"]);

    fake.envs
        .ensure(&def("myenv", "3.11", ManagerKind::Conda))
        .await
        .unwrap();
    assert_eq!(fake.take_lines(), ["env list --json"]);
}

#[tokio::test]
async fn conda_create_installs_packages_then_runs_script_in_the_env() {
    let fake = Fake::new();
    let mut d = def("newenv", "3.11", ManagerKind::Conda);
    d.packages = vec!["six".into(), "requests==2.32.3".into()];
    d.custom_script = Some("echo hi && touch x".into());
    fake.envs.ensure(&d).await.unwrap();
    assert_eq!(
        fake.take_lines(),
        [
            "env list --json",
            "create -y -n newenv python=3.11",
            "run -n newenv python -m pip install six requests==2.32.3",
            "run -n newenv bash -c echo hi && touch x",
        ]
    );
}

#[tokio::test]
async fn conda_force_recreate_removes_first() {
    let fake = Fake::new();
    let mut d = def("myenv", "3.10", ManagerKind::Conda);
    d.force_recreate = true;
    fake.envs.ensure(&d).await.unwrap();
    assert_eq!(
        fake.take_lines(),
        [
            "env list --json",
            "env remove -y -n myenv",
            "create -y -n myenv python=3.10",
        ]
    );
}

#[tokio::test]
async fn conda_failed_spec_is_cleaned_up_and_not_retried_until_it_changes() {
    let fake = Fake::new();
    let d = def("badenv", "3.11", ManagerKind::Conda);
    let err = fake.envs.ensure(&d).await.unwrap_err();
    assert!(err.contains("solver exploded"), "{err}");
    assert!(err.starts_with("env badenv: conda create failed"), "{err}");
    assert_eq!(
        fake.take_lines(),
        [
            "env list --json",
            "create -y -n badenv python=3.11",
            "env remove -y -n badenv",
        ]
    );

    // Same spec again: nothing runs (B17).
    let err = fake.envs.ensure(&d).await.unwrap_err();
    assert!(err.contains("same spec failed before"), "{err}");
    assert!(err.contains("solver exploded"), "{err}");
    assert!(fake.take_lines().is_empty());

    // A changed spec runs again.
    let changed = def("badenv", "3.12", ManagerKind::Conda);
    fake.envs.ensure(&changed).await.unwrap_err();
    assert_eq!(fake.take_lines()[1], "create -y -n badenv python=3.12");

    // force_recreate always runs, even for the remembered spec.
    let mut forced = d.clone();
    forced.force_recreate = true;
    fake.envs.ensure(&forced).await.unwrap_err();
    assert_eq!(fake.take_lines().len(), 3);
}

#[tokio::test]
async fn missing_conda_and_bad_definitions_are_errors_without_running_anything() {
    let dir = tempfile::tempdir().unwrap();
    let envs = Envs::new(dir.path(), None, None);
    assert!(envs.list_envs(ManagerKind::Conda).await.is_empty());
    assert!(envs.list_all_envs().await.is_empty());
    let err = envs
        .ensure(&def("x", "3.11", ManagerKind::Conda))
        .await
        .unwrap_err();
    assert!(err.contains("conda is not installed"), "{err}");
    let err = envs
        .ensure(&def("x", "3.11", ManagerKind::Uv))
        .await
        .unwrap_err();
    assert!(err.contains("uv is not installed"), "{err}");

    let fake = Fake::new();
    for bad in ["", "-n", ".hidden", "a/b", "a b", &"x".repeat(101)] {
        let err = fake
            .envs
            .ensure(&def(bad, "3.11", ManagerKind::Conda))
            .await
            .unwrap_err();
        assert!(err.starts_with("invalid env name"), "{err}");
    }
    for bad in ["", " ", "--python", "3.11 x"] {
        let err = fake
            .envs
            .ensure(&def("ok", bad, ManagerKind::Uv))
            .await
            .unwrap_err();
        assert!(err.contains("invalid python_version"), "{err}");
    }
    let mut d = def("ok", "3.11", ManagerKind::Uv);
    d.packages = vec!["six".into(), " ".into()];
    assert!(
        fake.envs
            .ensure(&d)
            .await
            .unwrap_err()
            .contains("empty package name")
    );
    assert!(fake.take_lines().is_empty());
}

#[tokio::test]
async fn failing_conda_listing_reports_no_envs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let conda = fake_tool(dir.path(), "conda", &log, "echo broken >&2; exit 3");
    let envs = Envs::new(dir.path(), Some(conda), None);
    assert!(envs.list_envs(ManagerKind::Conda).await.is_empty());
    assert!(envs.list_envs(ManagerKind::Conda).await.is_empty());
    let err = envs
        .ensure(&def("e", "3.11", ManagerKind::Conda))
        .await
        .unwrap_err();
    assert_eq!(err, "env e: conda env list failed");
}

#[tokio::test]
async fn fake_uv_creates_marker_last_and_serializes_same_env() {
    let fake = Fake::new();
    let mut d = def("uvenv", "3.11", ManagerKind::Uv);
    d.packages = vec!["six".into()];
    d.custom_script = Some("echo \"$VIRTUAL_ENV\" > \"$VIRTUAL_ENV/script.txt\"".into());
    let (a, b) = tokio::join!(fake.envs.ensure(&d), fake.envs.ensure(&d));
    a.unwrap();
    b.unwrap();
    let venv = fake.envs.uv_env_dir("uvenv");
    assert_eq!(
        fake.take_lines(),
        [
            format!("venv --python 3.11 {}", venv.display()),
            format!("pip install --python {}/bin/python six", venv.display()),
        ],
        "the second concurrent ensure must see the finished env"
    );
    assert_eq!(
        std::fs::read_to_string(venv.join("script.txt"))
            .unwrap()
            .trim(),
        venv.to_str().unwrap()
    );
    assert!(venv.join(UV_READY_MARKER).exists());

    // A folder without the marker is not an env.
    std::fs::create_dir_all(fake.envs.uv_env_dir("partial")).unwrap();
    assert_eq!(fake.envs.list_envs(ManagerKind::Uv).await, ["uvenv"]);
    assert_eq!(fake.envs.list_all_envs().await, ["base", "myenv", "uvenv"]);
    assert_eq!(
        fake.envs.resolve("uvenv").await.unwrap(),
        ResolvedEnv::Uv { venv: venv.clone() }
    );
    assert_eq!(
        fake.envs.resolve("myenv").await.unwrap(),
        ResolvedEnv::Conda {
            binary: fake.conda_binary()
        }
    );
    assert!(fake.envs.resolve("partial").await.is_err());

    // force_recreate starts from an empty folder.
    fake.take_lines();
    let mut forced = d.clone();
    forced.force_recreate = true;
    forced.custom_script = None;
    fake.envs.ensure(&forced).await.unwrap();
    assert_eq!(fake.take_lines().len(), 2);
    assert!(!venv.join("script.txt").exists());
}

#[tokio::test]
async fn fake_uv_failure_removes_partial_env_and_is_remembered() {
    let fake = Fake::new();
    let mut d = def("broken", "3.11", ManagerKind::Uv);
    d.packages = vec!["bad-pkg".into()];
    let err = fake.envs.ensure(&d).await.unwrap_err();
    assert!(err.contains("uv pip install failed"), "{err}");
    assert!(err.contains("no solution for bad-pkg"), "{err}");
    assert!(!fake.envs.uv_env_dir("broken").exists());
    assert_eq!(fake.take_lines().len(), 2);
    assert!(fake.envs.list_envs(ManagerKind::Uv).await.is_empty());
    assert!(fake.envs.ensure(&d).await.is_err());
    assert!(fake.take_lines().is_empty());
}

#[test]
fn wrap_command_for_conda_and_uv() {
    let cmd: Vec<String> = vec!["python".into(), "app.py".into()];
    let (argv, env) = wrap_command(
        "myenv",
        &ResolvedEnv::Conda {
            binary: "/opt/conda/bin/conda".into(),
        },
        &cmd,
    );
    assert_eq!(
        argv,
        [
            "/opt/conda/bin/conda",
            "run",
            "--no-capture-output",
            "-n",
            "myenv",
            "python",
            "app.py"
        ]
    );
    assert!(env.is_empty());

    let (argv, env) = wrap_command(
        "u",
        &ResolvedEnv::Uv {
            venv: "/w/envs/uv/u".into(),
        },
        &cmd,
    );
    assert_eq!(argv, cmd);
    assert_eq!(env.len(), 2);
    assert!(
        env["PATH"].starts_with("/w/envs/uv/u/bin:"),
        "{}",
        env["PATH"]
    );
    assert_eq!(env["VIRTUAL_ENV"], "/w/envs/uv/u");
}

/// The current python's `major.minor`, which uv can find without downloading.
fn local_python_version() -> Option<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test]
async fn real_uv_env_runs_a_command_with_its_package() {
    let discovery = discover();
    let (Some(uv), Some(python)) = (discovery.uv.clone(), local_python_version()) else {
        println!("skipped: uv or python3 not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let envs = Envs::new(dir.path(), None, Some(uv));
    let mut d = def("t-six", &python, ManagerKind::Uv);
    d.packages = vec!["six".into()];
    d.custom_script = Some("python -c 'import six' && touch \"$VIRTUAL_ENV/script-ok\"".into());
    envs.ensure(&d).await.unwrap();
    let venv = envs.uv_env_dir("t-six");
    assert!(venv.join("script-ok").exists());
    assert_eq!(envs.list_envs(ManagerKind::Uv).await, ["t-six"]);

    let resolved = envs.resolve("t-six").await.unwrap();
    let command: Vec<String> = vec![
        "python".into(),
        "-c".into(),
        "import six, sys; print(sys.prefix)".into(),
    ];
    let (argv, env) = wrap_command("t-six", &resolved, &command);
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(prefix.canonicalize().unwrap(), venv.canonicalize().unwrap());
}

#[tokio::test]
async fn only_envs_created_here_are_removed_and_a_wanted_env_is_kept() {
    let fake = Fake::new();
    // `myenv` existed before (the fake lists it): used, never recorded, never removed.
    fake.envs
        .ensure(&def("myenv", "3.11", ManagerKind::Conda))
        .await
        .unwrap();
    fake.envs
        .ensure(&def("made", "3.11", ManagerKind::Conda))
        .await
        .unwrap();
    fake.envs
        .ensure(&def("uvenv", "3.11", ManagerKind::Uv))
        .await
        .unwrap();
    // A failed create leaves no record either.
    fake.envs
        .ensure(&def("badenv", "3.11", ManagerKind::Conda))
        .await
        .unwrap_err();
    assert_eq!(
        fake.envs.created().await,
        [
            (ManagerKind::Conda, "made".to_owned()),
            (ManagerKind::Uv, "uvenv".to_owned())
        ]
    );
    fake.take_lines();

    assert!(
        !fake
            .envs
            .remove(ManagerKind::Conda, "myenv", || true)
            .await
            .unwrap(),
        "not created here: left alone"
    );
    assert!(
        !fake
            .envs
            .remove(ManagerKind::Conda, "made", || false)
            .await
            .unwrap(),
        "wanted again by the time the lock was held: kept"
    );
    assert!(fake.take_lines().is_empty(), "no conda call so far");

    assert!(
        fake.envs
            .remove(ManagerKind::Conda, "made", || true)
            .await
            .unwrap()
    );
    assert_eq!(fake.take_lines(), ["env remove -y -n made"]);
    assert!(
        fake.envs
            .remove(ManagerKind::Uv, "uvenv", || true)
            .await
            .unwrap()
    );
    assert!(!fake.envs.uv_env_dir("uvenv").exists());
    assert!(fake.envs.created().await.is_empty());
    // Removing again is a no-op, and a bad name is an error before anything runs.
    assert!(
        !fake
            .envs
            .remove(ManagerKind::Conda, "made", || true)
            .await
            .unwrap()
    );
    assert!(
        fake.envs
            .remove(ManagerKind::Uv, "../x", || true)
            .await
            .is_err()
    );
    assert!(fake.take_lines().is_empty());
}

#[tokio::test]
async fn an_env_defined_again_differently_is_made_anew_but_a_foreign_one_is_not() {
    let fake = Fake::new();
    let venv = fake.envs.uv_env_dir("uvenv");
    fake.envs
        .ensure(&def("uvenv", "3.11", ManagerKind::Uv))
        .await
        .unwrap();
    fake.take_lines();
    // The same definition again: nothing runs.
    fake.envs
        .ensure(&def("uvenv", "3.11", ManagerKind::Uv))
        .await
        .unwrap();
    assert!(fake.take_lines().is_empty());
    // Deleted and defined again with another python: made anew, without force_recreate.
    fake.envs
        .ensure(&def("uvenv", "3.12", ManagerKind::Uv))
        .await
        .unwrap();
    assert_eq!(
        fake.take_lines(),
        [format!("venv --python 3.12 {}", venv.display())]
    );

    // `myenv` was not created here: whatever its definition says, it is left as it is.
    fake.envs
        .ensure(&def("myenv", "3.9", ManagerKind::Conda))
        .await
        .unwrap();
    assert_eq!(fake.take_lines(), ["env list --json"]);
}

#[tokio::test]
async fn a_conda_env_created_here_from_another_definition_is_removed_and_created_again() {
    let fake = Fake::new();
    // The fake lists `myenv`; pretend this node created it from a 3.10 definition.
    let old = def("myenv", "3.10", ManagerKind::Conda);
    fake.envs.record_conda_created(&old).await.unwrap();
    fake.envs.ensure(&old).await.unwrap();
    assert_eq!(fake.take_lines(), ["env list --json"], "same definition");
    fake.envs
        .ensure(&def("myenv", "3.11", ManagerKind::Conda))
        .await
        .unwrap();
    assert_eq!(
        fake.take_lines(),
        [
            "env list --json",
            "env remove -y -n myenv",
            "create -y -n myenv python=3.11",
        ]
    );
}

#[tokio::test]
async fn a_relative_work_dir_still_puts_uv_envs_in_it() {
    // uv runs in the envs folder; with a relative work dir its venv path used to point below
    // that folder, and writing the ready marker failed (`symphony dev` uses ./storage).
    let fake = Fake::new();
    let uv = fake.dir.path().join("bin").join("uv");
    let rel = std::path::PathBuf::from("target").join(format!(
        "test-relative-work-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let envs = Envs::new(&rel, None, Some(uv));
    let result = envs.ensure(&def("relenv", "3.11", ManagerKind::Uv)).await;
    let marker = rel.join("envs/uv/relenv").join(UV_READY_MARKER);
    let made = marker.exists();
    let _ = std::fs::remove_dir_all(&rel);
    result.unwrap();
    assert!(made, "{} missing", marker.display());
    assert!(envs.uv_env_dir("relenv").is_absolute());
}
