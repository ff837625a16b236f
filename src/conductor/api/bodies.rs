//! Request bodies, typed: the serde shape of each write (every field [`Checked`], so every
//! problem is reported at once) and one validation function per body that turns it into what
//! the core takes, or a 422's `detail` list. Same pattern as the deployment spec
//! (`crate::spec`), which `specification` is handed to.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{MAX_PACKAGE_LEN, MAX_PACKAGES, MAX_SPEC_BYTES};
use crate::conductor::core::{DeploymentPatch, EnvPatch};
use crate::model::DesiredState;
use crate::spec::{FieldError, LineOrList, Loc, Opt, Report, given};

/// `POST /deployments`. On create, a given `null` is a mismatch, not absence.
#[derive(Deserialize)]
struct NewDeploymentWire {
    #[serde(default, deserialize_with = "given")]
    name: Opt<String>,
    #[serde(default, deserialize_with = "given")]
    desired_state: Opt<String>,
    #[serde(default, deserialize_with = "given")]
    kind: Opt<String>,
    #[serde(default, deserialize_with = "given")]
    specification: Opt<Value>,
}

/// A valid `POST /deployments` body.
pub(super) struct NewDeployment {
    pub name: String,
    pub desired_state: DesiredState,
    pub kind: String,
    /// As given (the core stores the user's document; `crate::spec::parse` accepted it).
    pub specification: Value,
}

/// `PATCH /deployments/{id}`: `null` means "leave as is".
#[derive(Deserialize)]
struct DeploymentPatchWire {
    name: Opt<String>,
    desired_state: Opt<String>,
    specification: Option<Value>,
}

/// `POST /conda-envs`.
#[derive(Deserialize)]
struct NewEnvWire {
    name: Opt<String>,
    python_version: Opt<String>,
    custom_script: Opt<Option<String>>,
    #[serde(default, deserialize_with = "given")]
    manager: Opt<String>,
    #[serde(default, deserialize_with = "given")]
    packages: Opt<Packages>,
}

/// A valid `POST /conda-envs` body.
pub(super) struct NewEnv {
    pub name: String,
    pub python_version: String,
    pub custom_script: Option<String>,
    pub manager: String,
    pub packages: Vec<String>,
}

/// `PATCH /conda-envs/{name}`: a `null` `custom_script` clears it.
#[derive(Deserialize)]
struct EnvPatchWire {
    python_version: Option<Value>,
    packages: Opt<Packages>,
    #[serde(default, deserialize_with = "given")]
    custom_script: Opt<Option<String>>,
}

/// Packages: a list of strings, or one string separated by commas or newlines.
type Packages = LineOrList;

/// Deserializes a body object into its wire shape; only fails on a shape serde itself
/// refuses (never for these all-`Checked` structs, but reported rather than assumed).
fn wire<T: serde::de::DeserializeOwned>(body: Map<String, Value>) -> Result<T, Vec<FieldError>> {
    serde_json::from_value(Value::Object(body)).map_err(|e| {
        vec![FieldError::new(
            vec!["body".to_owned()],
            "value_error",
            e.to_string(),
        )]
    })
}

fn body() -> Loc {
    Loc::new(&["body"])
}

pub(super) fn new_deployment(m: Map<String, Value>) -> Result<NewDeployment, Vec<FieldError>> {
    let w: NewDeploymentWire = wire(m)?;
    let mut r = Report::default();
    let at = body().at("name");
    let name = r
        .required(&w.name, &at)
        .and_then(|s| r.text_len(s, &at, 1, 200));
    let desired = r
        .one_of(
            &w.desired_state,
            &body().at("desired_state"),
            &DesiredState::NAMES,
        )
        .and_then(DesiredState::from_name)
        .unwrap_or_default();
    let at = body().at("kind");
    let kind = r
        .one_of(&w.kind, &at, &["EXEC", "DOCKER"])
        .unwrap_or("EXEC");
    if kind == "DOCKER" {
        let msg = "DOCKER deployments are not supported yet; use EXEC";
        r.err(&at, "value_error", msg);
    }
    let spec = match r.opt(&w.specification, &body().at("specification")) {
        Some(spec) => spec.clone(),
        None => json!({}),
    };
    specification(&mut r, &spec);
    let out = name.map(|name| NewDeployment {
        name,
        desired_state: desired,
        kind: kind.to_owned(),
        specification: spec,
    });
    r.finish(out)
}

pub(super) fn deployment_patch(m: Map<String, Value>) -> Result<DeploymentPatch, Vec<FieldError>> {
    let w: DeploymentPatchWire = wire(m)?;
    let mut r = Report::default();
    let at = body().at("name");
    let name = r.opt(&w.name, &at).and_then(|s| r.text_len(s, &at, 1, 200));
    let at = body().at("desired_state");
    let desired_state = r
        .one_of(&w.desired_state, &at, &DesiredState::NAMES)
        .and_then(DesiredState::from_name);
    let spec = w.specification.filter(|s| !s.is_null());
    if let Some(s) = &spec {
        // A masked token sent back by a client that round-trips a GET is restored by the core.
        specification(&mut r, s);
    }
    r.finish(Some(DeploymentPatch {
        name,
        desired_state,
        specification: spec,
    }))
}

/// The size limit, then the spec's own validation.
fn specification(r: &mut Report, spec: &Value) {
    let size = spec.to_string().len();
    if size > MAX_SPEC_BYTES {
        let msg = format!("specification is {size} bytes; the limit is {MAX_SPEC_BYTES}");
        r.err(&body().at("specification"), "too_long", msg);
    } else if let Err(e) = crate::spec::parse(spec) {
        r.errors.extend(e);
    }
}

pub(super) fn new_env(m: Map<String, Value>) -> Result<NewEnv, Vec<FieldError>> {
    let w: NewEnvWire = wire(m)?;
    let mut r = Report::default();
    let at = body().at("name");
    let name = r
        .required(&w.name, &at)
        .and_then(|s| r.text_len(s, &at, 1, 200));
    let at = body().at("python_version");
    let python = r
        .required(&w.python_version, &at)
        .and_then(|s| r.text_len(s, &at, 1, 20));
    let custom_script = script(&mut r, &w.custom_script);
    let manager = r
        .one_of(&w.manager, &body().at("manager"), &["conda", "uv"])
        .unwrap_or("conda");
    let packages = packages(&mut r, &w.packages).unwrap_or_default();
    let out = name.zip(python).map(|(name, python_version)| NewEnv {
        name,
        python_version,
        custom_script: custom_script.flatten(),
        manager: manager.to_owned(),
        packages,
    });
    r.finish(out)
}

pub(super) fn env_patch(m: Map<String, Value>) -> Result<EnvPatch, Vec<FieldError>> {
    let w: EnvPatchWire = wire(m)?;
    let mut r = Report::default();
    if w.python_version.is_some_and(|v| !v.is_null()) {
        let msg = "python_version cannot be changed; create a new env";
        r.err(&body().at("python_version"), "value_error", msg);
    }
    let packages = packages(&mut r, &w.packages);
    let custom_script = script(&mut r, &w.custom_script);
    r.finish(Some(EnvPatch {
        packages,
        custom_script,
    }))
}

/// `custom_script`: `None` when not given; `Some(None)` when given but empty (or `null`).
fn script(r: &mut Report, field: &Opt<Option<String>>) -> Option<Option<String>> {
    let at = body().at("custom_script");
    let given = r.opt(field, &at)?;
    let text = given.as_deref().and_then(|s| r.text_len(s, &at, 0, 2000));
    Some(text.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
}

/// `packages`: trimmed, empty items dropped, each at most [`MAX_PACKAGE_LEN`] characters, at
/// most [`MAX_PACKAGES`] of them.
fn packages(r: &mut Report, field: &Opt<Packages>) -> Option<Vec<String>> {
    let loc = body().at("packages");
    let items: Vec<(Loc, &str)> = match r.opt(field, &loc)? {
        LineOrList::Line(s) => s.split([',', '\n']).map(|p| (loc.clone(), p)).collect(),
        LineOrList::List(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let at = loc.at(i);
                r.checked(p, &at).map(|p| (at, p.as_str()))
            })
            .collect(),
    };
    let mut out = Vec::new();
    for (at, p) in items {
        let p = p.trim();
        if p.chars().count() > MAX_PACKAGE_LEN {
            let msg = format!("a package spec is at most {MAX_PACKAGE_LEN} characters");
            r.err(&at, "string_too_long", msg);
        } else if !p.is_empty() {
            out.push(p.to_owned());
        }
    }
    if out.len() > MAX_PACKAGES {
        r.err(&loc, "too_long", format!("at most {MAX_PACKAGES} packages"));
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn problems(errors: Vec<FieldError>) -> Vec<(String, String)> {
        errors
            .into_iter()
            .map(|e| (e.loc.join("."), e.kind))
            .collect()
    }

    #[test]
    fn every_problem_of_a_body_is_reported_at_once() {
        let body = json!({
            "name": null, "desired_state": null, "kind": 5,
            "specification": { "spec": { "config": { "command": 1 } } }
        });
        let Err(errors) = new_deployment(object(body)) else {
            panic!("accepted")
        };
        assert_eq!(
            problems(errors),
            [
                ("body.name", "string_type"),
                ("body.desired_state", "enum"),
                ("body.kind", "enum"),
                ("body.specification.spec.config.command", "list_type"),
            ]
            .map(|(l, k)| (l.to_owned(), k.to_owned()))
        );
        // Absent is not null: defaults apply, and only the name is required.
        let Err(errors) = new_deployment(object(json!({}))) else {
            panic!("accepted")
        };
        assert_eq!(
            problems(errors),
            [
                ("body.name", "missing"),
                ("body.specification.spec", "missing"),
            ]
            .map(|(l, k)| (l.to_owned(), k.to_owned()))
        );
    }

    #[test]
    fn env_bodies_take_loose_packages_and_null_scripts() {
        let env = new_env(object(json!({
            "name": "torch", "python_version": "3.11",
            "packages": " numpy,\ntorch ,, ", "custom_script": null
        })))
        .unwrap();
        assert_eq!(env.packages, ["numpy", "torch"]);
        assert_eq!((env.manager.as_str(), env.custom_script), ("conda", None));
        let Err(errors) = new_env(object(json!({
            "name": "", "python_version": "3", "packages": ["a", 1], "manager": null
        }))) else {
            panic!("accepted")
        };
        assert_eq!(
            problems(errors),
            [
                ("body.name", "string_too_short"),
                ("body.manager", "enum"),
                ("body.packages.1", "string_type"),
            ]
            .map(|(l, k)| (l.to_owned(), k.to_owned()))
        );
        // PATCH: a null script clears it; an absent one leaves it.
        let patch = env_patch(object(json!({ "custom_script": null }))).unwrap();
        assert_eq!(patch.custom_script, Some(None));
        let patch = env_patch(object(json!({ "packages": "x" }))).unwrap();
        assert_eq!(
            (patch.custom_script, patch.packages),
            (None, Some(vec!["x".to_owned()]))
        );
    }
}
