//! The serde shape of a `specification` as users write it (the original's JSON, loose forms
//! included). Every field is [`Checked`], so one bad field does not hide the others; the
//! rules live in `validate`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

use super::checked::{Checked, Int, LineOrList, Object, Opt, Seconds, unexpected};

/// The whole `specification` object; keys other than `spec` (`api_version`, `metadata`) are
/// ignored.
#[derive(Deserialize)]
pub(super) struct Specification {
    pub spec: Opt<Object<SpecWire>>,
}

/// `specification.spec`. Unknown keys are ignored, as in the original.
#[derive(Deserialize)]
pub(super) struct SpecWire {
    pub config: Opt<Object<ConfigWire>>,
    pub capacity_requests: Opt<BTreeMap<String, Checked<Int>>>,
    pub node_group: Opt<String>,
    pub env: Opt<EnvWire>,
    pub restart_policy: Opt<PolicyWire>,
    pub max_restarts: Opt<Int>,
    pub restart_window_sec: Opt<Seconds>,
    pub log_limit_lines: Opt<Int>,
    pub stop_signal: Opt<SignalWire>,
    pub stop_timeout_sec: Opt<Seconds>,
    pub health_check: Opt<Object<HealthCheckWire>>,
    pub auto_restart: Opt<Object<AutoRestartWire>>,
    pub binds: Opt<Vec<Checked<BindWire>>>,
    pub connects: Opt<Vec<Checked<String>>>,
    pub exposes: Opt<Vec<Checked<String>>>,
    pub outlive_agent: Opt<bool>,
}

/// A `binds` entry: `"name"`, or `{"name": port}` for a fixed port.
pub(super) enum BindWire {
    Name(String),
    Fixed(BTreeMap<String, Checked<Int>>),
}

impl<'de> Deserialize<'de> for BindWire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Name(s)),
            Value::Object(m) => Ok(Self::Fixed(
                m.into_iter()
                    .map(|(k, v)| (k, Checked::from_value(v)))
                    .collect(),
            )),
            _ => Err(de::Error::custom(
                "Input should be a service name or {name: port}",
            )),
        }
    }
}

/// `spec.config`.
#[derive(Deserialize)]
pub(super) struct ConfigWire {
    pub command: Opt<Vec<Checked<String>>>,
    pub env_name: Opt<String>,
    pub git_repo: Opt<String>,
    pub git_ref: Opt<String>,
    pub token: Opt<String>,
    pub env: Opt<EnvWire>,
}

/// An environment mapping: names to scalars (stringified).
pub(super) type EnvWire = BTreeMap<String, Checked<Scalar>>;

/// An environment value: a string, or a number or boolean written as one.
pub(super) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self(s)),
            Value::Number(n) => Ok(Self(n.to_string())),
            Value::Bool(b) => Ok(Self(b.to_string())),
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"a string, number or boolean",
            )),
        }
    }
}

/// `restart_policy`: a policy name, or `{type, backoff_seconds}`.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "Input should be a policy name or an object {type, backoff_seconds}"
)]
pub(super) enum PolicyWire {
    Name(String),
    Object(Object<PolicyObject>),
}

#[derive(Deserialize)]
pub(super) struct PolicyObject {
    #[serde(rename = "type")]
    pub kind: Opt<String>,
    pub backoff_seconds: Opt<Seconds>,
}

/// `stop_signal`: a name (`SIGTERM`, `term`) or a number (`9.0` is not one).
pub(super) enum SignalWire {
    Name(String),
    Number(Checked<Int>),
}

impl<'de> Deserialize<'de> for SignalWire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Name(s)),
            n @ Value::Number(_) => Ok(Self::Number(Checked::from_value(n))),
            _ => Err(de::Error::custom("Input should be a signal name or number")),
        }
    }
}

/// A probe command: one string (split like a shell would, without running one) or a list.
pub(super) type CommandWire = LineOrList;

/// `spec.health_check`; `type` may be left out and is inferred from the fields given.
#[derive(Deserialize)]
pub(super) struct HealthCheckWire {
    #[serde(rename = "type")]
    pub kind: Opt<String>,
    pub command: Opt<CommandWire>,
    pub url: Opt<String>,
    pub host: Opt<String>,
    pub port: Opt<Int>,
    pub initial_delay_seconds: Opt<Seconds>,
    pub period_seconds: Opt<Seconds>,
    pub timeout_seconds: Opt<Seconds>,
    pub failure_threshold: Opt<Int>,
}

/// `spec.auto_restart`.
#[derive(Deserialize)]
pub(super) struct AutoRestartWire {
    pub enabled: Opt<bool>,
    pub cron: Opt<String>,
    pub timezone: Opt<String>,
}
