//! Typed, lenient deserialization for user declarations, and the validation report.
//!
//! A declaration (a deployment spec today; experiments and workflows next) is a set of serde
//! structs whose fields are [`Checked`]: each field is deserialized on its own, so one field of
//! the wrong type is recorded and the others are still read. A `validate` pass then walks the
//! typed value with a [`Report`], turning type mismatches and rule violations (ranges, empty
//! strings, cross-field rules) into [`FieldError`]s, each with its full path. The result is
//! every problem at once, in the shape of FastAPI's 422 `detail` items.
//!
//! Invariants: deserializing into `Checked<T>` never fails (any input gives `Ok` or `Bad`); a
//! mismatch message never quotes the user's string (it may be a secret), only its type.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, Unexpected, Visitor};
use serde_json::Value;

use super::model::{FieldError, MAX_DURATION_SECS};

/// A field deserialized on its own: its typed value, or why it did not fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked<T> {
    /// The value has the expected type.
    Ok(T),
    /// It does not; validation reports this at the field's path.
    Bad(Mismatch),
}

/// An optional field: absent and `null` are both `None`.
pub type Opt<T> = Option<Checked<T>>;

/// For `#[serde(default, deserialize_with = "given")]`: a field that may be left out but,
/// when given, must not be `null` (a `null` is then a mismatch, not absence).
pub fn given<'de, D, T>(d: D) -> Result<Opt<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    Checked::deserialize(d).map(Some)
}

/// Why a value did not deserialize: where below the field, the error kind, a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Path below the field (empty when the field itself has the wrong type).
    pub path: Vec<String>,
    /// FastAPI-style kind: `int_type`, `string_type`, `dict_type`, `missing`, ...
    pub kind: &'static str,
    /// Human-readable message.
    pub msg: String,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_value(Value::deserialize(d)?))
    }
}

impl<T: DeserializeOwned> Checked<T> {
    /// Deserializes `value` into `T`, keeping a mismatch (with its path below `value`) instead
    /// of failing.
    pub fn from_value(value: Value) -> Self {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Self::Ok(v),
            Err(e) => {
                let path = e
                    .path()
                    .iter()
                    .filter_map(|seg| match seg {
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                        serde_path_to_error::Segment::Unknown => None,
                    })
                    .collect();
                Self::Bad(Mismatch::from_serde(path, &e.into_inner().to_string()))
            }
        }
    }
}

impl Mismatch {
    /// Turns a serde error message into a kind and a message in our words. Serde's standard
    /// messages (`invalid type: X, expected Y`, `missing field`, `invalid length`) are stable;
    /// anything else (an untagged enum's `expecting` text, a custom error) is a `value_error`.
    fn from_serde(mut path: Vec<String>, message: &str) -> Self {
        if let Some(rest) = message.strip_prefix("invalid type: ")
            && let Some((got, expected)) = rest.rsplit_once(", expected ")
        {
            return Self {
                path,
                kind: type_kind(expected),
                msg: format!("Input should be {}, got {}", wanted(expected), plain(got)),
            };
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            path.push(field.to_owned());
            return Self {
                path,
                kind: "missing",
                msg: "Field required".to_owned(),
            };
        }
        // Our own `expecting` texts (untagged and custom enums) are whole messages; anything
        // else may quote the input (`invalid value: ...`), so it is not passed on.
        let msg = if message.starts_with("Input should be") {
            message.to_owned()
        } else {
            "Input has an unexpected value or shape".to_owned()
        };
        Self {
            path,
            kind: "value_error",
            msg,
        }
    }
}

/// The error kind for serde's (or our) `expected` text.
fn type_kind(expected: &str) -> &'static str {
    match expected {
        "a valid integer" | "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64"
        | "usize" => "int_type",
        "a valid number" | "f32" | "f64" => "float_type",
        "a string" | "a string, number or boolean" => "string_type",
        "a boolean" => "bool_type",
        "a sequence" => "list_type",
        "a map" | "a dictionary" => "dict_type",
        _ => "value_error",
    }
}

/// Serde's `expected` text in the API's words.
fn wanted(expected: &str) -> &str {
    match expected {
        "a sequence" => "a valid list",
        "a map" | "a dictionary" => "a valid dictionary",
        "a string" => "a valid string",
        "a boolean" => "a valid boolean",
        other => other,
    }
}

/// Serde's description of an unexpected value, without the value itself.
fn plain(got: &str) -> &str {
    let kinds = [
        ("string", "a string"),
        ("integer", "an integer"),
        ("floating point", "a float"),
        ("boolean", "a boolean"),
        ("unit value", "null"),
        ("sequence", "a list"),
        ("map", "an object"),
    ];
    kinds
        .iter()
        .find(|(prefix, _)| got.starts_with(prefix))
        .map_or("another type", |(_, name)| name)
}

/// Serde's view of a JSON value, for `invalid_type` errors.
pub fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) if n.is_f64() => Unexpected::Float(n.as_f64().unwrap_or_default()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Unexpected::Signed(i),
            None => Unexpected::Unsigned(n.as_u64().unwrap_or_default()),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// One string (to be split by the field's own rule) or a list of strings: the loose form of
/// a command line or a package list.
#[derive(Debug, Clone, PartialEq)]
pub enum LineOrList {
    /// One string.
    Line(String),
    /// A list, each item checked on its own.
    List(Vec<Checked<String>>),
}

impl<'de> Deserialize<'de> for LineOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Line(s)),
            Value::Array(items) => Ok(Self::List(
                items.into_iter().map(Checked::from_value).collect(),
            )),
            other => Err(de::Error::invalid_type(unexpected(&other), &"a sequence")),
        }
    }
}

/// A struct that must be written as a mapping. (Serde's derived structs also accept a list
/// of their fields in order; a declaration never means that.)
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        if !value.is_object() {
            return Err(de::Error::invalid_type(unexpected(&value), &"a dictionary"));
        }
        T::deserialize(value).map(Object).map_err(de::Error::custom)
    }
}

/// An integer as written: any JSON integer, unbounded here (ranges are checked by
/// validation). A float (even `2.0`) or a numeric string is not an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int(pub i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a valid integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A number of seconds as written: any JSON number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub f64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a valid number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }
            #[allow(clippy::cast_precision_loss)] // seconds: exact below 2^53
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                Ok(Seconds(v as f64))
            }
            #[allow(clippy::cast_precision_loss)]
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// A path in a request, e.g. `["body", "specification", "spec", "max_restarts"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc(Vec<String>);

impl Loc {
    /// A path from its parts.
    pub fn new(parts: &[&str]) -> Self {
        Self(parts.iter().map(|p| (*p).to_owned()).collect())
    }

    /// The path one level down.
    pub fn at(&self, key: impl fmt::Display) -> Self {
        let mut out = self.0.clone();
        out.push(key.to_string());
        Self(out)
    }
}

/// Collects every problem found while validating, each with its path.
#[derive(Debug, Default)]
pub struct Report {
    /// The problems, in the order found.
    pub errors: Vec<FieldError>,
}

impl Report {
    /// Records a problem at `loc`.
    pub fn err(&mut self, loc: &Loc, kind: &str, msg: impl Into<String>) {
        self.errors.push(FieldError::new(loc.0.clone(), kind, msg));
    }

    /// How many problems so far (to tell whether a part added any).
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `value` when it has the right type; otherwise the mismatch is recorded.
    pub fn checked<'a, T>(&mut self, field: &'a Checked<T>, loc: &Loc) -> Option<&'a T> {
        match field {
            Checked::Ok(v) => Some(v),
            Checked::Bad(m) => {
                let mut at = loc.clone();
                at.0.extend(m.path.iter().cloned());
                self.err(&at, m.kind, m.msg.clone());
                None
            }
        }
    }

    /// An optional field's value (`None` when absent, or after recording a mismatch).
    pub fn opt<'a, T>(&mut self, field: &'a Opt<T>, loc: &Loc) -> Option<&'a T> {
        field.as_ref().and_then(|f| self.checked(f, loc))
    }

    /// A required field's value; absence is recorded as `missing`.
    pub fn required<'a, T>(&mut self, field: &'a Opt<T>, loc: &Loc) -> Option<&'a T> {
        if field.is_none() {
            self.err(loc, "missing", "Field required");
        }
        self.opt(field, loc)
    }

    /// A string without NUL bytes (and not empty unless `allow_empty`).
    pub fn text(&mut self, s: &str, loc: &Loc, allow_empty: bool) -> Option<String> {
        if s.contains('\0') {
            self.err(loc, "value_error", "String must not contain NUL bytes");
            None
        } else if s.is_empty() && !allow_empty {
            let msg = "String should have at least 1 character";
            self.err(loc, "string_too_short", msg);
            None
        } else {
            Some(s.to_owned())
        }
    }

    /// A string of `min..=max` characters (no NUL bytes).
    pub fn text_len(&mut self, s: &str, loc: &Loc, min: usize, max: usize) -> Option<String> {
        let n = s.chars().count();
        if n < min {
            let msg = format!("String should have at least {min} character");
            self.err(loc, "string_too_short", msg);
            None
        } else if n > max {
            let msg = format!("String should have at most {max} characters");
            self.err(loc, "string_too_long", msg);
            None
        } else {
            self.text(s, loc, true)
        }
    }

    /// An optional field holding one of `allowed` (any mismatch is an `enum` error).
    pub fn one_of<'a>(
        &mut self,
        field: &Opt<String>,
        loc: &Loc,
        allowed: &[&'a str],
    ) -> Option<&'a str> {
        let value = field.as_ref()?;
        let found = match value {
            Checked::Ok(s) => allowed.iter().find(|a| **a == s).copied(),
            Checked::Bad(_) => None,
        };
        if found.is_none() {
            let names: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
            let msg = format!("Input should be {}", names.join(" or "));
            self.err(loc, "enum", msg);
        }
        found
    }

    /// An optional non-empty string field.
    pub fn opt_text(&mut self, field: &Opt<String>, loc: &Loc) -> Option<String> {
        let s = self.opt(field, loc)?;
        self.text(s, loc, false)
    }

    /// An integer in `min..=max`.
    pub fn int_in(&mut self, n: Int, loc: &Loc, min: i64, max: i64) -> Option<i64> {
        if n.0 < i128::from(min) {
            self.err(
                loc,
                "greater_than_equal",
                format!("Input should be >= {min}"),
            );
            None
        } else if n.0 > i128::from(max) {
            self.err(loc, "less_than_equal", format!("Input should be <= {max}"));
            None
        } else {
            i64::try_from(n.0).ok()
        }
    }

    /// An optional integer field in `min..=max`.
    pub fn opt_int(&mut self, field: &Opt<Int>, loc: &Loc, min: i64, max: i64) -> Option<i64> {
        let n = *self.opt(field, loc)?;
        self.int_in(n, loc, min, max)
    }

    /// An optional number of seconds (at most [`MAX_DURATION_SECS`]); `positive` rejects 0.
    pub fn opt_seconds(
        &mut self,
        field: &Opt<Seconds>,
        loc: &Loc,
        positive: bool,
    ) -> Option<Duration> {
        let secs = self.opt(field, loc)?.0;
        if !secs.is_finite() {
            self.err(loc, "finite_number", "Input should be a finite number");
            return None;
        }
        if positive && secs <= 0.0 {
            self.err(loc, "greater_than", "Input should be > 0");
            return None;
        }
        if secs < 0.0 {
            self.err(loc, "greater_than_equal", "Input should be >= 0");
            return None;
        }
        if secs > MAX_DURATION_SECS {
            let msg = format!("Input should be <= {MAX_DURATION_SECS}");
            self.err(loc, "less_than_equal", msg);
            return None;
        }
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(loc, "value_error", format!("Invalid duration: {e}"));
                None
            }
        }
    }

    /// The outcome: `value` when no problem was recorded, else every problem.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldError>> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => Err(self.errors),
        }
    }
}
