//! Building the `POST /deployments` body for `symphony deploy`, from a spec file or from flags.
//!
//! Pure: the caller reads the file; this module parses text and assembles JSON. A spec file is
//! either a full request body (recognised by a top-level `specification` key: `{name?,
//! desired_state?, kind?, specification}`) or just a specification (`{spec: {...}}`), in which case
//! the name must come from `--name`. Flags always win over the file: `--name` replaces the name,
//! `--stopped` forces `desired_state: STOPPED`, and `--env`/`--capacity`/`--restart` are merged
//! into `specification.spec`. Content validation is the conductor's job; this module only checks
//! what it must touch.

use serde_json::{Map, Value, json};

use super::{ClientError, DeployArgs};
use crate::model::DesiredState;

/// How a spec file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    /// JSON.
    Json,
    /// YAML (parsed with serde-saphyr).
    Yaml,
}

impl SpecFormat {
    /// Picks the format from a file extension: `.json` is JSON, `.yaml`/`.yml` is YAML, and
    /// anything else is `None` (the caller then tries JSON, then YAML).
    pub fn from_path(path: &std::path::Path) -> Option<SpecFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(SpecFormat::Json),
            "yaml" | "yml" => Some(SpecFormat::Yaml),
            _ => None,
        }
    }
}

/// Parses spec file text. `None` tries JSON first and falls back to YAML.
///
/// The document must be a mapping.
pub fn parse_spec_text(text: &str, format: Option<SpecFormat>) -> Result<Value, String> {
    let value = match format {
        Some(SpecFormat::Json) => serde_json::from_str::<Value>(text).map_err(|e| e.to_string())?,
        Some(SpecFormat::Yaml) => {
            serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string())?
        }
        None => match serde_json::from_str::<Value>(text) {
            Ok(v) => v,
            Err(_) => serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string())?,
        },
    };
    if value.is_object() {
        Ok(value)
    } else {
        Err("the file must contain a mapping (a full deployment body or a specification)".into())
    }
}

/// Builds the request body from the parsed spec file (if any) and the flags.
///
/// Errors are [`ClientError::Usage`]: both or neither of file and command, a missing name, a
/// malformed `KEY=VALUE` flag.
pub fn deploy_body(args: &DeployArgs, file: Option<Value>) -> Result<Value, ClientError> {
    let usage = |m: &str| ClientError::Usage(m.to_owned());
    let mut body = match (file, args.command.is_empty()) {
        (Some(_), false) => {
            return Err(usage(
                "give either a spec file (-f) or a command (-- cmd ...), not both",
            ));
        }
        (None, true) => {
            return Err(usage(
                "nothing to deploy: give a spec file (-f FILE) or a command (--name N -- cmd args...)",
            ));
        }
        (None, false) => json!({
            "specification": {"spec": {"config": {"command": args.command}}}
        }),
        (Some(Value::Object(doc)), true) if doc.contains_key("specification") => Value::Object(doc),
        (Some(doc), true) => json!({ "specification": doc }),
    };
    let Some(obj) = body.as_object_mut() else {
        return Err(usage("the spec file must contain a mapping"));
    };
    if let Some(name) = &args.name {
        obj.insert("name".into(), Value::String(name.clone()));
    }
    match obj.get("name") {
        Some(Value::String(n)) if !n.trim().is_empty() => {}
        Some(Value::String(_)) | None => {
            return Err(usage("a deployment needs a name: pass --name NAME"));
        }
        Some(_) => return Err(usage("the deployment name must be a string")),
    }
    if args.desired_stopped {
        obj.insert("desired_state".into(), json!(DesiredState::Stopped));
    } else {
        obj.entry("desired_state")
            .or_insert_with(|| json!(DesiredState::Running));
    }
    obj.entry("kind").or_insert_with(|| json!("EXEC"));
    merge_extras(obj, args)?;
    Ok(body)
}

/// Merges `--env`, `--capacity`, `--restart`, `--env-name` and `--group` into
/// `specification.spec`.
fn merge_extras(body: &mut Map<String, Value>, args: &DeployArgs) -> Result<(), ClientError> {
    let extra = &args.extra;
    if extra.env.is_empty()
        && extra.capacity.is_empty()
        && extra.restart.is_none()
        && extra.env_name.is_none()
        && extra.group.is_none()
    {
        return Ok(());
    }
    let spec = child_object(body, "specification")?;
    let spec = child_object(spec, "spec")?;
    if let Some(name) = &extra.env_name {
        let config = child_object(spec, "config")?;
        config.insert("env_name".into(), Value::String(name.clone()));
    }
    if let Some(group) = &extra.group {
        spec.insert("node_group".into(), Value::String(group.clone()));
    }
    if !extra.env.is_empty() {
        let env = child_object(spec, "env")?;
        for kv in &extra.env {
            let (k, v) = split_kv(kv, "--env")?;
            env.insert(k.to_owned(), Value::String(v.to_owned()));
        }
    }
    if !extra.capacity.is_empty() {
        let caps = child_object(spec, "capacity_requests")?;
        for kv in &extra.capacity {
            let (k, v) = split_kv(kv, "--capacity")?;
            let amount: u64 = v.trim().parse().map_err(|_| {
                ClientError::Usage(format!(
                    "--capacity {kv}: the amount must be a non-negative integer"
                ))
            })?;
            caps.insert(k.to_owned(), json!(amount));
        }
    }
    if let Some(policy) = &extra.restart {
        spec.insert("restart_policy".into(), Value::String(policy.clone()));
    }
    Ok(())
}

/// Returns `map[key]` as an object, creating it when absent.
fn child_object<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Map<String, Value>, ClientError> {
    map.entry(key)
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| ClientError::Usage(format!("`{key}` in the spec must be a mapping")))
}

/// Splits `KEY=VALUE`; the key must be non-empty.
fn split_kv<'a>(kv: &'a str, flag: &str) -> Result<(&'a str, &'a str), ClientError> {
    match kv.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v)),
        _ => Err(ClientError::Usage(format!(
            "{flag} {kv}: expected KEY=VALUE"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::client::{DeployExtra, Exit};

    fn args() -> DeployArgs {
        DeployArgs::default()
    }

    #[test]
    fn format_from_extension() {
        use std::path::Path;
        assert_eq!(
            SpecFormat::from_path(Path::new("a.json")),
            Some(SpecFormat::Json)
        );
        assert_eq!(
            SpecFormat::from_path(Path::new("a.YAML")),
            Some(SpecFormat::Yaml)
        );
        assert_eq!(
            SpecFormat::from_path(Path::new("dir/a.yml")),
            Some(SpecFormat::Yaml)
        );
        assert_eq!(SpecFormat::from_path(Path::new("spec")), None);
    }

    #[test]
    fn body_from_flags() {
        let a = DeployArgs {
            name: Some("web".into()),
            command: vec!["python".into(), "-m".into(), "http.server".into()],
            ..args()
        };
        let body = deploy_body(&a, None).unwrap();
        assert_eq!(
            body,
            json!({
                "name": "web",
                "desired_state": "RUNNING",
                "kind": "EXEC",
                "specification": {"spec": {"config": {"command": ["python", "-m", "http.server"]}}}
            })
        );
    }

    #[test]
    fn body_from_flags_with_extras_and_stopped() {
        let a = DeployArgs {
            name: Some("job".into()),
            command: vec!["true".into()],
            desired_stopped: true,
            extra: DeployExtra {
                env: vec!["A=1".into(), "B=x=y".into()],
                capacity: vec!["GPU=2".into()],
                restart: Some("never".into()),
                env_name: Some("torch".into()),
                group: Some("gpu".into()),
            },
            ..args()
        };
        let body = deploy_body(&a, None).unwrap();
        assert_eq!(body["desired_state"], "STOPPED");
        let spec = &body["specification"]["spec"];
        assert_eq!(spec["config"]["env_name"], "torch");
        assert_eq!(spec["node_group"], "gpu");
        assert_eq!(spec["env"], json!({"A": "1", "B": "x=y"}));
        assert_eq!(spec["capacity_requests"], json!({"GPU": 2}));
        assert_eq!(spec["restart_policy"], "never");
        assert_eq!(spec["config"]["command"], json!(["true"]));
    }

    #[test]
    fn flag_errors_are_usage_errors() {
        let cases = [
            DeployArgs {
                command: vec!["x".into()],
                ..args()
            },
            args(),
            DeployArgs {
                name: Some("n".into()),
                command: vec!["x".into()],
                extra: DeployExtra {
                    capacity: vec!["GPU=lots".into()],
                    ..Default::default()
                },
                ..args()
            },
            DeployArgs {
                name: Some("n".into()),
                command: vec!["x".into()],
                extra: DeployExtra {
                    env: vec!["NOEQUALS".into()],
                    ..Default::default()
                },
                ..args()
            },
            DeployArgs {
                name: Some("  ".into()),
                command: vec!["x".into()],
                ..args()
            },
        ];
        for a in cases {
            let err = deploy_body(&a, None).unwrap_err();
            assert_eq!(err.exit(), Exit::Usage, "{a:?} -> {err}");
        }
        let both = DeployArgs {
            name: Some("n".into()),
            command: vec!["x".into()],
            ..args()
        };
        let err = deploy_body(&both, Some(json!({"spec": {}}))).unwrap_err();
        assert_eq!(err.exit(), Exit::Usage);
    }

    const FULL_JSON: &str = r#"{
        "name": "from-file",
        "kind": "DOCKER",
        "specification": {"spec": {"config": {"command": ["sleep", "60"]}}}
    }"#;

    const FULL_YAML: &str = "
name: from-file
kind: DOCKER
specification:
  spec:
    config:
      command: [sleep, '60']
";

    const SPEC_JSON: &str =
        r#"{"spec": {"config": {"command": ["sleep", "60"]}, "max_restarts": 3}}"#;

    const SPEC_YAML: &str = "
spec:
  config:
    command:
      - sleep
      - '60'
  max_restarts: 3
";

    #[test]
    fn full_body_files_json_and_yaml_agree() {
        for (text, fmt) in [
            (FULL_JSON, Some(SpecFormat::Json)),
            (FULL_YAML, Some(SpecFormat::Yaml)),
            (FULL_JSON, None),
            (FULL_YAML, None),
        ] {
            let doc = parse_spec_text(text, fmt).unwrap();
            let body = deploy_body(&args(), Some(doc)).unwrap();
            assert_eq!(
                body,
                json!({
                    "name": "from-file",
                    "desired_state": "RUNNING",
                    "kind": "DOCKER",
                    "specification": {"spec": {"config": {"command": ["sleep", "60"]}}}
                }),
                "{fmt:?}"
            );
        }
    }

    #[test]
    fn full_body_flags_override_the_file() {
        let doc = parse_spec_text(FULL_YAML, Some(SpecFormat::Yaml)).unwrap();
        let a = DeployArgs {
            name: Some("renamed".into()),
            desired_stopped: true,
            ..args()
        };
        let body = deploy_body(&a, Some(doc)).unwrap();
        assert_eq!(body["name"], "renamed");
        assert_eq!(body["desired_state"], "STOPPED");
        assert_eq!(body["kind"], "DOCKER");
    }

    #[test]
    fn spec_only_files_need_a_name_flag() {
        for (text, fmt) in [(SPEC_JSON, SpecFormat::Json), (SPEC_YAML, SpecFormat::Yaml)] {
            let doc = parse_spec_text(text, Some(fmt)).unwrap();
            let err = deploy_body(&args(), Some(doc.clone())).unwrap_err();
            assert_eq!(err.exit(), Exit::Usage);

            let a = DeployArgs {
                name: Some("svc".into()),
                ..args()
            };
            let body = deploy_body(&a, Some(doc)).unwrap();
            assert_eq!(
                body,
                json!({
                    "name": "svc",
                    "desired_state": "RUNNING",
                    "kind": "EXEC",
                    "specification": {
                        "spec": {"config": {"command": ["sleep", "60"]}, "max_restarts": 3}
                    }
                }),
                "{fmt:?}"
            );
        }
    }

    #[test]
    fn bad_spec_text_is_an_error_not_a_panic() {
        assert!(parse_spec_text("[1, 2]", Some(SpecFormat::Json)).is_err());
        assert!(parse_spec_text("{not json", Some(SpecFormat::Json)).is_err());
        assert!(parse_spec_text("- a\n- b\n", Some(SpecFormat::Yaml)).is_err());
        assert!(parse_spec_text("key: [unclosed", Some(SpecFormat::Yaml)).is_err());
        assert!(parse_spec_text("just a string", None).is_err());
    }

    #[test]
    fn extras_must_not_clobber_non_mapping_spec() {
        let a = DeployArgs {
            name: Some("n".into()),
            extra: DeployExtra {
                env: vec!["A=1".into()],
                ..Default::default()
            },
            ..args()
        };
        let err = deploy_body(&a, Some(json!({"spec": "oops"}))).unwrap_err();
        assert_eq!(err.exit(), Exit::Usage);
    }
}
