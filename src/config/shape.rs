//! The config file's shape, as serde reads it: every key optional (null means absent), leaf
//! values in small newtypes that accept only their YAML kind and say what they got otherwise
//! (`expected a string, got 5 (quote it: "5")`). Ranges, formats and required keys are checked
//! afterwards, all at once, by `read::validate`.

use std::collections::BTreeMap;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::Value;

/// The whole file.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct File {
    pub mode: Option<Str>,
    pub logging: Option<LoggingFile>,
    pub conductor: Option<ConductorFile>,
    pub node: Option<NodeFile>,
}

/// `logging`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct LoggingFile {
    pub level: Option<Str>,
    pub json: Option<Flag>,
}

/// `conductor`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ConductorFile {
    pub listen: Option<Str>,
    pub server: Option<Str>,
    pub tls: Option<ConductorTlsFile>,
    pub http_listen: Option<Str>,
    pub storage_dir: Option<Str>,
    pub node_grace_sec: Option<Secs>,
    pub suspect_after_sec: Option<Secs>,
    pub scheduling: Option<Str>,
    pub service_ports: Option<Str>,
    pub direct_paths: Option<Flag>,
    pub events_keep: Option<Count>,
    pub events_max_age_sec: Option<Secs>,
    pub api_auth: Option<Flag>,
    pub api_tls: Option<ApiTlsFile>,
    pub node_cert_ttl_sec: Option<Secs>,
    pub renew_grace_sec: Option<Secs>,
}

/// `conductor.tls`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ConductorTlsFile {
    pub cert_path: Option<Str>,
}

/// `conductor.api_tls`: HTTPS for the API.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ApiTlsFile {
    pub cert_file: Option<Str>,
    pub key_file: Option<Str>,
}

/// `node`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct NodeFile {
    pub node_id: Option<Str>,
    pub conductor_addr: Option<Str>,
    pub server_name: Option<Str>,
    pub groups: Option<Vec<Str>>,
    pub capacities_total: Option<BTreeMap<String, Count>>,
    pub heartbeat_sec: Option<Secs>,
    pub tls: Option<NodeTlsFile>,
    pub work_dir: Option<Str>,
    pub keep_alive_sec: Option<Secs>,
    pub idle_timeout_sec: Option<Secs>,
}

/// `node.tls`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct NodeTlsFile {
    pub ca_file: Option<Str>,
    pub cert_file: Option<Str>,
    pub key_file: Option<Str>,
}

/// The keys a mapping at `parent` (a dotted key, `""` for the top) knows, for hints.
pub(super) fn known_keys(parent: &str) -> &'static [&'static str] {
    match parent {
        "" => fields::<File>(),
        "logging" => fields::<LoggingFile>(),
        "conductor" => fields::<ConductorFile>(),
        "conductor.tls" => fields::<ConductorTlsFile>(),
        "node" => fields::<NodeFile>(),
        "node.tls" => fields::<NodeTlsFile>(),
        _ => &[],
    }
}

/// The field names serde derived for struct `T` (what it passes to `deserialize_struct`).
fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut out: &'static [&'static str] = &[];
    let _probed = T::deserialize(Probe(&mut out));
    out
}

/// A short description of a value for messages: scalars verbatim, containers by kind.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_owned(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
        scalar => scalar.to_string(),
    }
}

/// Reads any value and converts it with `pick`, whose error says what was expected.
fn leaf<'de, D: Deserializer<'de>, T>(
    d: D,
    pick: impl FnOnce(Value) -> Result<T, String>,
) -> Result<T, D::Error> {
    pick(Value::deserialize(d)?).map_err(de::Error::custom)
}

/// A string. Numbers and booleans are refused with a hint to quote them, so that
/// `node_id: 123` or `groups: [gpu, 7]` is reported rather than silently converted.
#[derive(Debug)]
pub(super) struct Str(pub String);

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v {
            Value::String(s) => Ok(Self(s)),
            Value::Number(_) | Value::Bool(_) => {
                Err(format!("expected a string, got {v} (quote it: \"{v}\")"))
            }
            _ => Err(format!("expected a string, got {}", describe(&v))),
        })
    }
}

/// A number of seconds, integer or not (its sign and size are checked by `validate`).
#[derive(Debug)]
pub(super) struct Secs(pub f64);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v.as_f64() {
            Some(secs) => Ok(Self(secs)),
            None => Err(format!(
                "expected a number of seconds greater than 0, got {}",
                describe(&v)
            )),
        })
    }
}

/// An integer that fits an `i64` (its sign is checked by `validate`).
#[derive(Debug)]
pub(super) struct Count(pub i64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v.as_i64() {
            Some(n) => Ok(Self(n)),
            None => Err(format!(
                "expected a non-negative integer, got {}",
                describe(&v)
            )),
        })
    }
}

/// `true` or `false`.
#[derive(Debug)]
pub(super) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v {
            Value::Bool(b) => Ok(Self(b)),
            _ => Err(format!("expected true or false, got {}", describe(&v))),
        })
    }
}
