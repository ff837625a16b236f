use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde_json::{Value, json};

use super::*;

/// Wraps a `spec` object into a whole `specification`.
fn wrap(spec: Value) -> Value {
    json!({ "api_version": "v1", "metadata": { "x": 1 }, "spec": spec })
}

/// A minimal valid spec with `extra` keys merged in.
fn with(extra: Value) -> Value {
    let mut spec = json!({ "config": { "command": ["python", "-m", "app"] } });
    for (k, v) in extra.as_object().unwrap() {
        spec.as_object_mut().unwrap().insert(k.clone(), v.clone());
    }
    wrap(spec)
}

fn ok(specification: Value) -> DeploymentSpec {
    match parse(&specification) {
        Ok(s) => s,
        Err(e) => panic!("expected Ok for {specification}, got {e:#?}"),
    }
}

/// `(loc after "spec" joined by '.', type)` of every error, in order.
fn errs(specification: Value) -> Vec<(String, String)> {
    match parse(&specification) {
        Ok(s) => panic!("expected errors for {specification}, got {s:#?}"),
        Err(errors) => errors
            .into_iter()
            .map(|e| {
                assert_eq!(e.loc[..2], ["body", "specification"], "{e:?}");
                (e.loc[2..].join("."), e.kind)
            })
            .collect(),
    }
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(l, k)| ((*l).to_owned(), (*k).to_owned()))
        .collect()
}

#[test]
fn bad_specs_report_exact_loc_and_type() {
    let cases: Vec<(Value, Vec<(&str, &str)>)> = vec![
        (json!([]), vec![("", "dict_type")]),
        (json!({}), vec![("spec", "missing")]),
        (json!({ "spec": null }), vec![("spec", "missing")]),
        (json!({ "spec": "x" }), vec![("spec", "dict_type")]),
        (
            with(json!({ "outlive_agent": "no" })),
            vec![("spec.outlive_agent", "bool_type")],
        ),
        (wrap(json!({})), vec![("spec.config", "missing")]),
        (
            wrap(json!({ "config": [] })),
            vec![("spec.config", "dict_type")],
        ),
        (
            wrap(json!({ "config": {} })),
            vec![("spec.config.command", "missing")],
        ),
        (
            wrap(json!({ "config": { "command": "python app.py" } })),
            vec![("spec.config.command", "list_type")],
        ),
        (
            wrap(json!({ "config": { "command": [] } })),
            vec![("spec.config.command", "too_short")],
        ),
        (
            wrap(json!({ "config": { "command": ["a", 3, ""] } })),
            vec![
                ("spec.config.command.1", "string_type"),
                ("spec.config.command.2", "string_too_short"),
            ],
        ),
        (
            with(json!({ "capacity_requests": { "GPU": 1.5, "CPU": "2", "A": -1, "B": 2 } })),
            // serde_json maps iterate in key order.
            vec![
                ("spec.capacity_requests.A", "greater_than_equal"),
                ("spec.capacity_requests.CPU", "int_type"),
                ("spec.capacity_requests.GPU", "int_type"),
            ],
        ),
        (
            with(json!({ "capacity_requests": [1] })),
            vec![("spec.capacity_requests", "dict_type")],
        ),
        (
            with(json!({ "node_group": "" })),
            vec![("spec.node_group", "string_too_short")],
        ),
        (
            with(json!({ "node_group": 3 })),
            vec![("spec.node_group", "string_type")],
        ),
        (
            with(json!({ "env": { "A": [1], "B": null, "": "x" } })),
            vec![
                ("spec.env.", "value_error"),
                ("spec.env.A", "string_type"),
                ("spec.env.B", "string_type"),
            ],
        ),
        (
            with(json!({ "env": ["A=1"] })),
            vec![("spec.env", "dict_type")],
        ),
        (
            with(json!({ "restart_policy": "alwayz" })),
            vec![("spec.restart_policy", "enum")],
        ),
        (
            with(json!({ "restart_policy": 1 })),
            vec![("spec.restart_policy", "value_error")],
        ),
        (
            with(json!({ "restart_policy": { "type": "sometimes", "backoff_seconds": "1" } })),
            vec![
                ("spec.restart_policy.type", "enum"),
                ("spec.restart_policy.backoff_seconds", "float_type"),
            ],
        ),
        (
            with(json!({ "restart_policy": { "backoff_seconds": -1 } })),
            vec![("spec.restart_policy.backoff_seconds", "greater_than_equal")],
        ),
        (
            with(json!({ "restart_policy": { "backoff_seconds": 1e300 } })),
            vec![("spec.restart_policy.backoff_seconds", "less_than_equal")],
        ),
        (
            with(json!({ "max_restarts": -1 })),
            vec![("spec.max_restarts", "greater_than_equal")],
        ),
        (
            with(json!({ "max_restarts": 2.5 })),
            vec![("spec.max_restarts", "int_type")],
        ),
        (
            with(json!({ "max_restarts": "3" })),
            vec![("spec.max_restarts", "int_type")],
        ),
        (
            with(json!({ "max_restarts": 18446744073709551615u64 })),
            vec![("spec.max_restarts", "less_than_equal")],
        ),
        (
            with(json!({ "restart_window_sec": 0 })),
            vec![("spec.restart_window_sec", "greater_than")],
        ),
        (
            with(json!({ "log_limit_lines": 0 })),
            vec![("spec.log_limit_lines", "greater_than_equal")],
        ),
        (
            with(json!({ "log_limit_lines": 1_000_001 })),
            vec![("spec.log_limit_lines", "less_than_equal")],
        ),
        (
            with(json!({ "stop_signal": "SIGFOO" })),
            vec![("spec.stop_signal", "value_error")],
        ),
        (
            with(json!({ "stop_signal": 0 })),
            vec![("spec.stop_signal", "greater_than_equal")],
        ),
        (
            with(json!({ "stop_signal": 65 })),
            vec![("spec.stop_signal", "less_than_equal")],
        ),
        (
            with(json!({ "stop_signal": true })),
            vec![("spec.stop_signal", "value_error")],
        ),
        (
            with(json!({ "stop_timeout_sec": -0.5 })),
            vec![("spec.stop_timeout_sec", "greater_than_equal")],
        ),
        (
            wrap(json!({ "config": { "command": ["x"], "git_ref": "main", "env_name": "" } })),
            vec![
                ("spec.config.env_name", "string_too_short"),
                ("spec.config.git_ref", "value_error"),
            ],
        ),
        (
            wrap(json!({ "config": { "command": ["x"], "git_repo": "", "token": 5 } })),
            vec![
                ("spec.config.git_repo", "string_too_short"),
                ("spec.config.token", "string_type"),
            ],
        ),
        (
            with(json!({ "health_check": "false" })),
            vec![("spec.health_check", "dict_type")],
        ),
        (
            with(json!({ "health_check": {} })),
            vec![("spec.health_check.command", "missing")],
        ),
        (
            with(json!({ "health_check": { "command": 5 } })),
            vec![("spec.health_check.command", "list_type")],
        ),
        (
            with(json!({ "health_check": { "type": "grpc" } })),
            vec![("spec.health_check.type", "enum")],
        ),
        (
            with(json!({ "health_check": { "command": "curl 'x", "period_seconds": 0 } })),
            vec![
                ("spec.health_check.command", "value_error"),
                ("spec.health_check.period_seconds", "greater_than"),
            ],
        ),
        (
            with(json!({ "health_check": { "command": [], "failure_threshold": 0 } })),
            vec![
                ("spec.health_check.command", "too_short"),
                ("spec.health_check.failure_threshold", "greater_than_equal"),
            ],
        ),
        (
            with(json!({ "health_check": { "type": "http" } })),
            vec![("spec.health_check.url", "missing")],
        ),
        (
            with(json!({ "health_check": { "type": "HTTP", "url": "ftp://x" } })),
            vec![("spec.health_check.url", "url_scheme")],
        ),
        (
            with(json!({ "health_check": { "url": "http://" } })),
            vec![("spec.health_check.url", "url_scheme")],
        ),
        (
            with(json!({ "health_check": { "type": "tcp", "host": "" } })),
            vec![
                ("spec.health_check.port", "missing"),
                ("spec.health_check.host", "string_too_short"),
            ],
        ),
        (
            with(json!({ "health_check": { "type": "tcp", "port": 70000 } })),
            vec![("spec.health_check.port", "less_than_equal")],
        ),
        (
            with(
                json!({ "auto_restart": { "enabled": "true", "cron": "* * * * *", "timezone": "UTC" } }),
            ),
            vec![("spec.auto_restart.enabled", "bool_type")],
        ),
        (
            with(json!({ "auto_restart": { "enabled": true } })),
            vec![
                ("spec.auto_restart.cron", "missing"),
                ("spec.auto_restart.timezone", "missing"),
            ],
        ),
        (
            with(
                json!({ "auto_restart": { "enabled": true, "cron": "61 * * * *", "timezone": "Mars/Olympus" } }),
            ),
            vec![
                ("spec.auto_restart.timezone", "value_error"),
                ("spec.auto_restart.cron", "value_error"),
            ],
        ),
        (
            with(
                json!({ "auto_restart": { "enabled": true, "cron": "0 0 31 2 *", "timezone": "UTC" } }),
            ),
            vec![("spec.auto_restart.cron", "value_error")],
        ),
        (
            with(json!({ "auto_restart": { "enabled": true, "cron": "", "timezone": "UTC" } })),
            vec![("spec.auto_restart.cron", "string_too_short")],
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(errs(input.clone()), pairs(&expected), "input: {input}");
    }
}

#[test]
fn all_errors_are_collected_not_just_the_first() {
    let input = wrap(json!({
        "config": { "command": "x", "env_name": 1 },
        "max_restarts": "many",
        "stop_signal": "NOPE",
        "auto_restart": { "enabled": "yes" }
    }));
    assert_eq!(
        errs(input),
        pairs(&[
            ("spec.config.command", "list_type"),
            ("spec.config.env_name", "string_type"),
            ("spec.max_restarts", "int_type"),
            ("spec.stop_signal", "value_error"),
            ("spec.auto_restart.enabled", "bool_type"),
        ])
    );
}

#[test]
fn error_loc_is_a_full_fastapi_path() {
    let err = parse(&wrap(json!({ "config": { "command": "x" } }))).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(
        err[0].loc,
        ["body", "specification", "spec", "config", "command"]
    );
    assert_eq!(err[0].kind, "list_type");
    let json = serde_json::to_value(&err[0]).unwrap();
    assert_eq!(json["type"], "list_type");
    assert!(json["msg"].as_str().unwrap().contains("list"));
}

#[test]
fn type_errors_never_quote_the_value() {
    let err = parse(&with(
        json!({ "max_restarts": "hunter2", "node_group": ["s3cret"] }),
    ))
    .unwrap_err();
    assert_eq!(err.len(), 2, "{err:?}");
    for e in &err {
        assert!(
            !e.msg.contains("hunter2") && !e.msg.contains("s3cret"),
            "{e:?}"
        );
    }
    assert_eq!(err[0].msg, "Input should be a valid string, got a list");
    assert_eq!(err[1].msg, "Input should be a valid integer, got a string");
}

#[test]
fn objects_must_be_mappings_not_lists_of_fields() {
    // Serde's derived structs would read a list positionally; a declaration never means that.
    assert_eq!(
        errs(wrap(
            json!({ "config": [["x"], null, null, null, null, null] })
        )),
        pairs(&[("spec.config", "dict_type")])
    );
    assert_eq!(
        errs(with(json!({ "health_check": [null] }))),
        pairs(&[("spec.health_check", "dict_type")])
    );
    assert_eq!(
        errs(with(json!({ "restart_policy": ["always", 1] }))),
        pairs(&[("spec.restart_policy", "value_error")])
    );
}

#[test]
fn checked_keeps_the_path_below_a_field() {
    let c = Checked::<Vec<BTreeMap<String, i64>>>::from_value(json!([{ "a": 1 }, { "b": "x" }]));
    let Checked::Bad(m) = c else {
        panic!("expected a mismatch")
    };
    assert_eq!(
        (m.path, m.kind),
        (vec!["1".to_owned(), "b".to_owned()], "int_type")
    );
    let mut r = Report::default();
    assert_eq!(
        r.checked(&Checked::<bool>::from_value(json!(1)), &Loc::new(&["q"])),
        None
    );
    assert_eq!(r.errors[0].loc, ["q"]);
    assert_eq!(r.errors[0].kind, "bool_type");
}

#[test]
fn minimal_spec_takes_every_default() {
    let spec = ok(with(json!({})));
    assert_eq!(
        spec,
        DeploymentSpec::defaults_for(vec!["python".into(), "-m".into(), "app".into()])
    );
    assert!(spec.capacity_requests.is_empty());
    assert_eq!(spec.restart_policy.kind, RestartKind::OnFailure);
    assert_eq!(spec.restart_policy.backoff, Duration::from_millis(500));
    assert_eq!(spec.max_restarts, 10);
    assert_eq!(spec.restart_window, Duration::from_secs(300));
    assert_eq!(spec.log_limit_lines, 5000);
    assert_eq!(spec.stop_signal, 15);
    assert_eq!(spec.stop_timeout, Duration::from_secs(10));
    assert_eq!(spec.health_check, None);
    assert_eq!(spec.auto_restart, None);
    assert_eq!(spec.git, None);
    assert_eq!(spec.env_name, None);
    assert_eq!(spec.node_group, None);
    assert!(spec.outlive_agent);
}

#[test]
fn nulls_mean_absent_and_unknown_keys_are_ignored() {
    let spec = ok(with(json!({
        "node_group": null, "max_restarts": null, "health_check": null,
        "auto_restart": null, "frobnicate": [1, 2]
    })));
    assert_eq!(spec.max_restarts, 10);
    assert_eq!(spec.node_group, None);
}

#[test]
fn full_spec_is_parsed() {
    let spec = ok(wrap(json!({
        "capacity_requests": { "GPU": 2, "CPU": 0 },
        "node_group": "gpu-box",
        "config": {
            "command": ["python", "train.py"],
            "env_name": "torch",
            "git_repo": "https://example.com/r.git",
            "git_ref": "v1.2",
            "token": "s3cret"
        },
        "restart_policy": { "type": "Always", "backoff_seconds": 2 },
        "max_restarts": 0,
        "restart_window_sec": 60.5,
        "log_limit_lines": 1_000_000,
        "stop_signal": "int",
        "stop_timeout_sec": 0,
        "outlive_agent": false
    })));
    assert_eq!(
        spec.capacity_requests,
        BTreeMap::from([("CPU".into(), 0), ("GPU".into(), 2)])
    );
    assert_eq!(spec.node_group.as_deref(), Some("gpu-box"));
    assert_eq!(spec.command, ["python", "train.py"]);
    assert_eq!(spec.env_name.as_deref(), Some("torch"));
    assert_eq!(
        spec.git,
        Some(GitSource {
            repo: "https://example.com/r.git".into(),
            git_ref: Some("v1.2".into()),
            token: Some("s3cret".into()),
        })
    );
    assert_eq!(
        spec.restart_policy,
        RestartPolicy {
            kind: RestartKind::Always,
            backoff: Duration::from_secs(2)
        }
    );
    assert_eq!(spec.max_restarts, 0);
    assert_eq!(spec.restart_window, Duration::from_millis(60_500));
    assert_eq!(spec.log_limit_lines, 1_000_000);
    assert_eq!(spec.stop_signal, 2);
    assert_eq!(spec.stop_timeout, Duration::ZERO);
    assert!(!spec.outlive_agent);
}

#[test]
fn empty_git_ref_and_token_mean_unset_and_token_alone_is_ignored() {
    let spec = ok(wrap(json!({ "config": {
        "command": ["x"], "git_repo": "/srv/repo", "git_ref": "", "token": ""
    } })));
    assert_eq!(
        spec.git,
        Some(GitSource {
            repo: "/srv/repo".into(),
            git_ref: None,
            token: None
        })
    );
    let spec = ok(wrap(
        json!({ "config": { "command": ["x"], "token": "t" } }),
    ));
    assert_eq!(spec.git, None);
}

#[test]
fn env_precedence_and_stringification() {
    // spec.env wins over config.env when it is a mapping (no merge).
    let spec = ok(wrap(json!({
        "env": { "A": "spec", "N": 3, "F": 1.5, "B": true },
        "config": { "command": ["x"], "env": { "A": "config", "C": "c" } }
    })));
    assert_eq!(
        spec.env,
        BTreeMap::from([
            ("A".into(), "spec".into()),
            ("B".into(), "true".into()),
            ("F".into(), "1.5".into()),
            ("N".into(), "3".into()),
        ])
    );
    // config.env is used when spec.env is absent (or null).
    let spec = ok(wrap(json!({
        "env": null,
        "config": { "command": ["x"], "env": { "A": "config", "B": false } }
    })));
    assert_eq!(
        spec.env,
        BTreeMap::from([("A".into(), "config".into()), ("B".into(), "false".into())])
    );
    // A bad config.env is still reported even when spec.env wins.
    let input = wrap(json!({
        "env": { "A": "1" },
        "config": { "command": ["x"], "env": { "K=V": "x" } }
    }));
    assert_eq!(
        errs(input),
        pairs(&[("spec.config.env.K=V", "value_error")])
    );
}

#[test]
fn restart_policy_forms() {
    let cases = [
        (json!("never"), RestartKind::Never, 500),
        (json!("NEVER"), RestartKind::Never, 500),
        (json!("on-failure"), RestartKind::OnFailure, 500),
        (json!("On_Failure"), RestartKind::OnFailure, 500),
        (json!("always"), RestartKind::Always, 500),
        (
            json!({ "type": "never", "backoff_seconds": 0 }),
            RestartKind::Never,
            0,
        ),
        (
            json!({ "type": "always", "backoff_seconds": 0.25 }),
            RestartKind::Always,
            250,
        ),
        (
            json!({ "backoff_seconds": 3 }),
            RestartKind::OnFailure,
            3000,
        ),
        (json!({ "type": "always" }), RestartKind::Always, 500),
        (json!({}), RestartKind::OnFailure, 500),
    ];
    for (policy, kind, backoff_ms) in cases {
        let spec = ok(with(json!({ "restart_policy": policy.clone() })));
        assert_eq!(
            spec.restart_policy,
            RestartPolicy {
                kind,
                backoff: Duration::from_millis(backoff_ms)
            },
            "policy {policy}"
        );
    }
}

#[test]
fn stop_signals_by_name_and_number() {
    let cases = [
        (json!("SIGTERM"), 15),
        (json!("term"), 15),
        (json!("SIGINT"), 2),
        (json!("INT"), 2),
        (json!("sigkill"), 9),
        (json!("SIGHUP"), 1),
        (json!("QUIT"), 3),
        (json!("SIGUSR1"), nix::sys::signal::Signal::SIGUSR1 as i32),
        (json!("usr2"), nix::sys::signal::Signal::SIGUSR2 as i32),
        (json!(1), 1),
        (json!(64), 64),
    ];
    for (signal, number) in cases {
        assert_eq!(
            ok(with(json!({ "stop_signal": signal.clone() }))).stop_signal,
            number,
            "{signal}"
        );
    }
    assert_eq!(
        errs(with(json!({ "stop_signal": 9.0 }))),
        pairs(&[("spec.stop_signal", "int_type")])
    );
    assert_eq!(
        errs(with(json!({ "stop_signal": "SIGSEGV" }))),
        pairs(&[("spec.stop_signal", "value_error")])
    );
}

#[test]
fn health_check_defaults_apply_to_missing_fields() {
    // Bug B13: missing initial_delay_seconds / period_seconds must take defaults.
    let spec = ok(with(json!({ "health_check": { "command": ["true"] } })));
    assert_eq!(
        spec.health_check,
        Some(HealthCheck {
            probe: HealthProbe::Exec {
                command: vec!["true".into()]
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            failure_threshold: 3,
        })
    );
    // timeout defaults to the period.
    let spec = ok(with(json!({ "health_check": {
        "command": ["true"], "period_seconds": 2.5, "initial_delay_seconds": 1
    } })));
    let hc = spec.health_check.unwrap();
    assert_eq!(hc.period, Duration::from_millis(2500));
    assert_eq!(hc.timeout, Duration::from_millis(2500));
    assert_eq!(hc.initial_delay, Duration::from_secs(1));
    let spec = ok(with(json!({ "health_check": {
        "command": ["true"], "timeout_seconds": 1, "failure_threshold": 1
    } })));
    let hc = spec.health_check.unwrap();
    assert_eq!(
        (hc.period, hc.timeout, hc.failure_threshold),
        (Duration::from_secs(10), Duration::from_secs(1), 1)
    );
}

#[test]
fn health_check_types() {
    let probe = |hc: Value| {
        ok(with(json!({ "health_check": hc })))
            .health_check
            .unwrap()
            .probe
    };
    assert_eq!(
        probe(json!({ "type": "exec", "command": "sh -c 'test -f \"/tmp/a b\"' \\#x" })),
        HealthProbe::Exec {
            command: vec![
                "sh".into(),
                "-c".into(),
                "test -f \"/tmp/a b\"".into(),
                "#x".into()
            ]
        }
    );
    assert_eq!(
        probe(json!({ "type": "http", "url": "https://localhost:8080/healthz" })),
        HealthProbe::Http {
            url: "https://localhost:8080/healthz".into()
        }
    );
    assert_eq!(
        probe(json!({ "url": "HTTP://127.0.0.1/" })),
        HealthProbe::Http {
            url: "HTTP://127.0.0.1/".into()
        }
    );
    assert_eq!(
        probe(json!({ "type": "tcp", "port": 5432 })),
        HealthProbe::Tcp {
            host: "127.0.0.1".into(),
            port: 5432
        }
    );
    assert_eq!(
        probe(json!({ "type": "Tcp", "port": 1, "host": "db.local" })),
        HealthProbe::Tcp {
            host: "db.local".into(),
            port: 1
        }
    );
    assert_eq!(
        probe(json!({ "port": 22 })),
        HealthProbe::Tcp {
            host: "127.0.0.1".into(),
            port: 22
        }
    );
}

/// The words of an exec probe's command given as one string.
fn split(line: &str) -> Result<Vec<String>, Vec<(String, String)>> {
    let input = with(json!({ "health_check": { "command": line } }));
    match parse(&input) {
        Ok(spec) => match spec.health_check.map(|hc| hc.probe) {
            Some(HealthProbe::Exec { command }) => Ok(command),
            other => panic!("expected an exec probe, got {other:?}"),
        },
        Err(_) => Err(errs(input)),
    }
}

#[test]
fn probe_command_strings_follow_posix_quoting() {
    assert_eq!(split("  a  b\tc\n").unwrap(), ["a", "b", "c"]);
    assert_eq!(split("a'b c'd").unwrap(), ["ab cd"]);
    assert_eq!(
        split(r#""a \"q\" \\ \$x \n""#).unwrap(),
        [r#"a "q" \ $x \n"#]
    );
    assert_eq!(split(r"a\ b \'c").unwrap(), ["a b", "'c"]);
    assert_eq!(split("x '' \"\"").unwrap(), ["x", "", ""]);
    assert_eq!(
        split("echo $HOME; rm -rf /").unwrap(),
        ["echo", "$HOME;", "rm", "-rf", "/"]
    );
    // `#` starts a comment only at the start of a word.
    assert_eq!(split("a#b #c d").unwrap(), ["a#b"]);
    let too_short = pairs(&[("spec.health_check.command", "too_short")]);
    assert_eq!(split("").unwrap_err(), too_short);
    assert_eq!(split("# only a comment").unwrap_err(), too_short);
    let bad = pairs(&[("spec.health_check.command", "value_error")]);
    for line in ["'open", "\"open", "end\\"] {
        assert_eq!(split(line).unwrap_err(), bad, "{line:?}");
    }
    // The first word (the program) must not be empty.
    assert_eq!(
        split("'' x").unwrap_err(),
        pairs(&[("spec.health_check.command.0", "string_too_short")])
    );
}

#[test]
fn auto_restart_enabled_disabled_and_valid() {
    let spec = ok(with(json!({ "auto_restart": {
        "enabled": true, "cron": "0 9 * * 1-5", "timezone": "Europe/Paris"
    } })));
    assert_eq!(
        spec.auto_restart,
        Some(AutoRestart {
            cron: "0 9 * * 1-5".into(),
            timezone: "Europe/Paris".into()
        })
    );
    // Disabled (or enabled absent): None, and the rest is not required.
    for ar in [
        json!({ "enabled": false, "cron": "garbage" }),
        json!({ "cron": "* * * * *", "timezone": "UTC" }),
    ] {
        assert_eq!(ok(with(json!({ "auto_restart": ar }))).auto_restart, None);
    }
    // Bug B29: a string "true" is an error, not silently ignored.
    assert_eq!(
        errs(with(json!({ "auto_restart": { "enabled": "true" } }))),
        pairs(&[("spec.auto_restart.enabled", "bool_type")])
    );
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
}

fn upcoming(expr: &str, tz: chrono_tz::Tz, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    let schedule = cron_schedule(expr).unwrap();
    let mut out = Vec::new();
    let mut t = from;
    for _ in 0..n {
        t = next_fire(&schedule, tz, t).unwrap();
        out.push(t);
    }
    out
}

#[test]
fn cron_weekday_zero_and_seven_are_sunday() {
    // 2024-06-02 is a Sunday.
    let from = utc(2024, 5, 29, 12, 0, 0);
    let sunday = utc(2024, 6, 2, 0, 0, 0);
    for expr in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN", "0 0 * * sun"] {
        assert_eq!(upcoming(expr, chrono_tz::UTC, from, 1), [sunday], "{expr}");
    }
    // 1 = Monday (the cron crate alone would read 1 as Sunday).
    assert_eq!(
        upcoming("0 0 * * 1", chrono_tz::UTC, from, 1),
        [utc(2024, 6, 3, 0, 0, 0)]
    );
    // Friday to Sunday via 5-7 wraps 7 onto Sunday.
    let days: Vec<u32> = upcoming("0 0 * * 5-7", chrono_tz::UTC, from, 4)
        .iter()
        .map(|t| t.day())
        .collect();
    assert_eq!(days, [31, 1, 2, 7]);
    // Weekday steps: */2 = Sun, Tue, Thu, Sat.
    let days: Vec<u32> = upcoming("0 0 * * */2", chrono_tz::UTC, from, 4)
        .iter()
        .map(|t| t.day())
        .collect();
    assert_eq!(days, [30, 1, 2, 4]);
}

#[test]
fn cron_every_fifteen_minutes() {
    let got = upcoming(
        "*/15 * * * *",
        chrono_tz::UTC,
        utc(2024, 1, 1, 10, 7, 30),
        5,
    );
    assert_eq!(
        got,
        [
            utc(2024, 1, 1, 10, 15, 0),
            utc(2024, 1, 1, 10, 30, 0),
            utc(2024, 1, 1, 10, 45, 0),
            utc(2024, 1, 1, 11, 0, 0),
            utc(2024, 1, 1, 11, 15, 0),
        ]
    );
    // Strictly after: from exactly a fire time, the next one.
    assert_eq!(
        upcoming(
            "*/15 * * * *",
            chrono_tz::UTC,
            utc(2024, 1, 1, 10, 15, 0),
            1
        ),
        [utc(2024, 1, 1, 10, 30, 0)]
    );
}

#[test]
fn cron_lists_ranges_steps_and_names() {
    let got = upcoming(
        "5,10-12 3-4/1 1 jan-feb *",
        chrono_tz::UTC,
        utc(2024, 1, 1, 0, 0, 0),
        9,
    );
    let hm: Vec<(u32, u32, u32)> = got
        .iter()
        .map(|t| (t.month(), t.hour(), t.minute()))
        .collect();
    assert_eq!(
        hm,
        [
            (1, 3, 5),
            (1, 3, 10),
            (1, 3, 11),
            (1, 3, 12),
            (1, 4, 5),
            (1, 4, 10),
            (1, 4, 11),
            (1, 4, 12),
            (2, 3, 5)
        ]
    );
    // a/n runs to the end of the range.
    let got = upcoming("50/5 0 * * *", chrono_tz::UTC, utc(2024, 1, 1, 0, 0, 0), 3);
    assert_eq!(
        got,
        [
            utc(2024, 1, 1, 0, 50, 0),
            utc(2024, 1, 1, 0, 55, 0),
            utc(2024, 1, 2, 0, 50, 0)
        ]
    );
    assert_eq!(
        upcoming("@daily", chrono_tz::UTC, utc(2024, 1, 1, 5, 0, 0), 1),
        [utc(2024, 1, 2, 0, 0, 0)]
    );
}

#[test]
fn cron_six_fields_have_seconds() {
    let got = upcoming(
        "*/20 * * * * *",
        chrono_tz::UTC,
        utc(2024, 1, 1, 0, 0, 5),
        3,
    );
    assert_eq!(
        got,
        [
            utc(2024, 1, 1, 0, 0, 20),
            utc(2024, 1, 1, 0, 0, 40),
            utc(2024, 1, 1, 0, 1, 0)
        ]
    );
    // Weekday numbering stays standard in the 6-field form too (0 = Sunday).
    assert_eq!(
        upcoming("0 0 0 * * 0", chrono_tz::UTC, utc(2024, 5, 29, 0, 0, 0), 1),
        [utc(2024, 6, 2, 0, 0, 0)]
    );
}

#[test]
fn cron_rejects_bad_expressions() {
    for expr in [
        "",
        "* * * *",
        "* * * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * 32 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "? * * * *",
        "L * * * *",
        "* * * * 1#2",
        "a * * * *",
        "1,,2 * * * *",
        "@reboot",
        "99999999999 * * * *",
    ] {
        assert!(cron_schedule(expr).is_err(), "{expr:?} should be rejected");
    }
}

#[test]
fn cron_keeps_what_standard_cron_accepts_and_the_crate_does_not() {
    // Steps larger than the field, a name before a step, a name-to-number range.
    let from = utc(2024, 1, 1, 0, 30, 0);
    assert_eq!(
        upcoming("*/60 * * * *", chrono_tz::UTC, from, 2),
        [utc(2024, 1, 1, 1, 0, 0), utc(2024, 1, 1, 2, 0, 0)]
    );
    assert_eq!(
        upcoming("0 */24 * * *", chrono_tz::UTC, from, 1),
        [utc(2024, 1, 2, 0, 0, 0)]
    );
    let months: Vec<u32> = upcoming("0 0 1 JAN/3 *", chrono_tz::UTC, from, 4)
        .iter()
        .map(|t| t.month())
        .collect();
    assert_eq!(months, [4, 7, 10, 1]);
    let months: Vec<u32> = upcoming("0 0 1 JAN-3 *", chrono_tz::UTC, from, 3)
        .iter()
        .map(|t| t.month())
        .collect();
    assert_eq!(months, [2, 3, 1]);
    // Errors are one line naming the field.
    let e = cron_schedule("60 * * * *").unwrap_err();
    assert_eq!(e, "minute: 60 is out of range 0-59");
    assert!(cron_schedule("* * * * +1").is_err());
}

#[test]
fn cron_day_of_month_or_day_of_week() {
    // Both restricted: fires when either matches (standard cron), not only when both do.
    // From Wed 2024-05-29: Mon 3 June, the 1st of July, Mon 10 June...
    let days: Vec<(u32, u32)> = upcoming("0 0 1 * 1", chrono_tz::UTC, utc(2024, 5, 29, 0, 0, 0), 6)
        .iter()
        .map(|t| (t.month(), t.day()))
        .collect();
    assert_eq!(days, [(6, 1), (6, 3), (6, 10), (6, 17), (6, 24), (7, 1)]);
    // One of them unrestricted (even with a step): the other one alone decides.
    let days: Vec<u32> = upcoming("0 0 */10 * *", chrono_tz::UTC, utc(2024, 6, 1, 1, 0, 0), 3)
        .iter()
        .map(|t| t.day())
        .collect();
    assert_eq!(days, [11, 21, 1]);
}

#[test]
fn next_fire_is_timezone_aware() {
    let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
    // Winter: CET = UTC+1.
    assert_eq!(
        upcoming("0 9 * * *", paris, utc(2024, 1, 15, 0, 0, 0), 1),
        [utc(2024, 1, 15, 8, 0, 0)]
    );
    // Summer: CEST = UTC+2; after today's 07:00Z, tomorrow's.
    assert_eq!(
        upcoming("0 9 * * *", paris, utc(2024, 7, 15, 7, 0, 0), 1),
        [utc(2024, 7, 16, 7, 0, 0)]
    );
    // Across the spring-forward night, 09:00 local stays 09:00 local.
    assert_eq!(
        upcoming("0 9 * * *", paris, utc(2024, 3, 30, 12, 0, 0), 2),
        [utc(2024, 3, 31, 7, 0, 0), utc(2024, 4, 1, 7, 0, 0)]
    );
    // 02:30 does not exist in Paris on 2024-03-31: skipped that day.
    assert_eq!(
        upcoming("30 2 * * *", paris, utc(2024, 3, 30, 12, 0, 0), 1),
        [utc(2024, 4, 1, 0, 30, 0)]
    );
    // 02:30 happens twice on 2024-10-27: the first occurrence (CEST, 00:30Z) comes first.
    assert_eq!(
        upcoming("30 2 * * *", paris, utc(2024, 10, 26, 12, 0, 0), 1),
        [utc(2024, 10, 27, 0, 30, 0)]
    );
}

#[test]
fn impossible_expression_returns_none_quickly() {
    let schedule = cron_schedule("0 0 31 2 *").unwrap();
    let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
    assert_eq!(next_fire(&schedule, paris, utc(2024, 1, 1, 0, 0, 0)), None);
    assert_eq!(
        next_fire(&schedule, chrono_tz::UTC, utc(1999, 1, 1, 0, 0, 0)),
        None
    );
    // Possible but rare: Feb 29.
    assert_eq!(
        upcoming("0 0 29 2 *", chrono_tz::UTC, utc(2024, 3, 1, 0, 0, 0), 1),
        [utc(2028, 2, 29, 0, 0, 0)]
    );
}

#[test]
fn mask_and_restore_secrets() {
    let original =
        wrap(json!({ "config": { "command": ["x"], "git_repo": "r", "token": "s3cret" } }));
    let mut shown = original.clone();
    mask_secrets(&mut shown);
    assert_eq!(shown["spec"]["config"]["token"], SECRET_MASK);
    assert_eq!(shown["spec"]["config"]["git_repo"], "r");

    // Round-trip: the PATCH carries the mask, the real token comes back.
    let mut patched = shown.clone();
    patched["spec"]["config"]["command"] = json!(["y"]);
    restore_secrets(&mut patched, &original);
    assert_eq!(patched["spec"]["config"]["token"], "s3cret");
    assert_eq!(patched["spec"]["config"]["command"], json!(["y"]));

    // A new token replaces the old one.
    let mut patched = shown.clone();
    patched["spec"]["config"]["token"] = json!("new");
    restore_secrets(&mut patched, &original);
    assert_eq!(patched["spec"]["config"]["token"], "new");

    // Removing the token removes it.
    let mut patched = shown.clone();
    patched["spec"]["config"]
        .as_object_mut()
        .unwrap()
        .remove("token");
    restore_secrets(&mut patched, &original);
    assert!(patched["spec"]["config"].get("token").is_none());

    // A mask with no old token to restore is dropped, never stored as the token.
    let mut patched = shown;
    restore_secrets(
        &mut patched,
        &wrap(json!({ "config": { "command": ["x"] } })),
    );
    assert!(patched["spec"]["config"].get("token").is_none());

    // Nothing to mask: unchanged (null token, no config, not an object).
    for v in [
        wrap(json!({ "config": { "command": ["x"], "token": null } })),
        wrap(json!({})),
        json!({}),
        json!("x"),
    ] {
        let mut m = v.clone();
        mask_secrets(&mut m);
        assert_eq!(m, v);
        restore_secrets(&mut m, &original);
        assert_eq!(m, v);
    }
}

#[test]
fn parse_never_panics_on_odd_json() {
    for v in [
        json!(null),
        json!(1),
        json!({ "spec": { "config": { "command": [null] } } }),
        json!({ "spec": { "config": null, "capacity_requests": { "": 1 } } }),
        json!({ "spec": { "config": { "command": ["a\u{0}b"] }, "env": { "A": "\u{0}" } } }),
        json!({ "spec": { "config": { "command": ["x"] }, "health_check": { "command": [1], "type": 3 } } }),
    ] {
        assert!(parse(&v).is_err(), "{v}");
    }
}

// Formerly `secret_redirect_tests`.

#[test]
fn a_masked_token_is_not_restored_for_another_repository() {
    let old = json!({"spec": {"config": {"command": ["x"], "git_repo": "https://good.example/r.git", "token": "REAL"}}});
    let mut same = json!({"spec": {"config": {"command": ["y"], "git_repo": "https://good.example/r.git", "token": SECRET_MASK}}});
    restore_secrets(&mut same, &old);
    assert_eq!(same["spec"]["config"]["token"], "REAL");
    let mut moved = json!({"spec": {"config": {"command": ["y"], "git_repo": "https://evil.example/x.git", "token": SECRET_MASK}}});
    restore_secrets(&mut moved, &old);
    assert!(moved["spec"]["config"].get("token").is_none(), "{moved}");
}

fn services(specification: Value) -> Services {
    match parse_with_services(&specification) {
        Ok((_, s)) => s,
        Err(e) => panic!("expected Ok for {specification}, got {e:#?}"),
    }
}

#[test]
fn services_take_names_fixed_ports_and_exposes() {
    let s = services(with(json!({
        "binds": ["replay-server", { "tensorboard": 6006 }],
        "connects": ["replay-server", "param-server", "replay-server"],
        "exposes": ["tensorboard"]
    })));
    assert_eq!(
        s.binds,
        [
            Bind {
                name: "replay-server".into(),
                port: None
            },
            Bind {
                name: "tensorboard".into(),
                port: Some(6006)
            },
        ]
    );
    assert_eq!(s.connects, ["replay-server", "param-server"]);
    assert_eq!(s.exposes, ["tensorboard"]);
    assert_eq!(services(with(json!({}))), Services::default());
    // The node's view (`parse`) is the same spec, services or not.
    assert_eq!(ok(with(json!({ "binds": ["a"] }))), ok(with(json!({}))));
}

#[test]
fn bad_services_name_the_entry() {
    let input = with(json!({
        "binds": ["Replay_Server", { "x": 0 }, { "a": 1, "b": 2 }, 7, "ok", "ok", "-a"],
        "connects": ["", "fine"],
        "exposes": ["nobody"]
    }));
    assert_eq!(
        errs(input),
        pairs(&[
            ("spec.binds.0", "value_error"),
            ("spec.binds.1.x", "greater_than_equal"),
            ("spec.binds.2", "value_error"),
            ("spec.binds.3", "value_error"),
            ("spec.binds.5", "value_error"),
            ("spec.binds.6", "value_error"),
            ("spec.connects.0", "value_error"),
            ("spec.exposes.0", "value_error"),
        ])
    );
    assert_eq!(
        errs(with(json!({ "binds": "a" }))),
        pairs(&[("spec.binds", "list_type")])
    );
}

#[test]
fn service_names_and_variables() {
    for good in ["a", "replay-server", "x1", "1x", &"a".repeat(63)] {
        assert!(is_dns_label(good), "{good}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
        assert!(!is_dns_label(bad), "{bad}");
    }
    assert_eq!(service_var_prefix("replay-server"), "SYMPH_REPLAY_SERVER");
}
