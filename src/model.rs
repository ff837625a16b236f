//! The typed model shared by the conductor and its clients: ids, generations, the desired and
//! observed states of a deployment, and the JSON shapes of the HTTP API.
//!
//! Invariants:
//! - every type here serializes to exactly the JSON the API has always produced: the ids and
//!   [`Generation`] are transparent (a plain string or number), the states are their
//!   upper-case names;
//! - the wire protocol (`proto/`) keeps plain strings; conversion happens at that boundary
//!   ([`CurrentState::from_wire`], [`DesiredState::as_str`]);
//! - a state name this build does not know deserializes as [`CurrentState::Unknown`] instead of
//!   failing, so a newer node or conductor never breaks an older reader.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a string id newtype: transparent in serde, displayed as the bare string, and
/// usable where a `&str` key is looked up (`Borrow<str>`).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id!(
    /// A node's id (its certificate's name), as the API shows it.
    NodeId
);
string_id!(
    /// A deployment's id (32 lower-case hex digits when the conductor made it).
    DeploymentId
);

/// The fencing generation of an assignment: every (re)assignment gets a higher one.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Generation {
    fn from(g: u64) -> Self {
        Self(g)
    }
}

/// What the user wants a deployment to be (`desired_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DesiredState {
    /// Keep it running (the default of a new deployment).
    #[default]
    Running,
    /// Keep it stopped.
    Stopped,
}

impl DesiredState {
    /// Every value, in the order the API documents them.
    pub const ALL: [DesiredState; 2] = [DesiredState::Running, DesiredState::Stopped];
    /// The names of [`Self::ALL`].
    pub const NAMES: [&'static str; 2] = ["RUNNING", "STOPPED"];

    /// The JSON/SQL name (`RUNNING`, `STOPPED`).
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "RUNNING",
            DesiredState::Stopped => "STOPPED",
        }
    }

    /// The state named `name` (exact, upper case), or `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a deployment is observed to be (`current_state`, and `status.state` as the node
/// reported it).
///
/// The node reports the run states (`STARTING` .. `FAILED`); the conductor adds `PENDING`
/// (not placed, or placed but not reported yet), `STOPPED` for a stopped deployment with no
/// node, `FAILED` for an invalid spec, and shows a node's `BACKOFF` as `CRASHED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CurrentState {
    /// Waiting for a node, or for the node's first report.
    Pending,
    /// The process is being started (env, checkout, spawn).
    Starting,
    /// The process runs.
    Running,
    /// A stop was sent; waiting for the process group to exit.
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Exited on its own and will not be restarted.
    Exited,
    /// Died and will be restarted (the API's name for a node's `BACKOFF`).
    Crashed,
    /// Waiting out the restart backoff (as a node reports it).
    Backoff,
    /// Gave up: invalid spec, restart budget spent, or the start failed.
    Failed,
    /// A name this build does not know (a newer peer); shown as `UNKNOWN`.
    #[default]
    #[serde(other)]
    Unknown,
}

impl CurrentState {
    /// Every known value.
    pub const ALL: [CurrentState; 10] = [
        CurrentState::Pending,
        CurrentState::Starting,
        CurrentState::Running,
        CurrentState::Stopping,
        CurrentState::Stopped,
        CurrentState::Exited,
        CurrentState::Crashed,
        CurrentState::Backoff,
        CurrentState::Failed,
        CurrentState::Unknown,
    ];

    /// The JSON name (`RUNNING`, ...), the same as the wire protocol's.
    pub fn as_str(self) -> &'static str {
        match self {
            CurrentState::Pending => "PENDING",
            CurrentState::Starting => "STARTING",
            CurrentState::Running => "RUNNING",
            CurrentState::Stopping => "STOPPING",
            CurrentState::Stopped => "STOPPED",
            CurrentState::Exited => "EXITED",
            CurrentState::Crashed => "CRASHED",
            CurrentState::Backoff => "BACKOFF",
            CurrentState::Failed => "FAILED",
            CurrentState::Unknown => "UNKNOWN",
        }
    }

    /// The state a node reported as `name` on the wire; an unknown name is [`Self::Unknown`].
    pub fn from_wire(name: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .unwrap_or(CurrentState::Unknown)
    }
}

impl fmt::Display for CurrentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn states_serialize_to_the_names_the_api_has_always_used() {
        for s in DesiredState::ALL {
            assert_eq!(json!(s), json!(s.as_str()));
            assert_eq!(DesiredState::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::from_value::<DesiredState>(json!(s)).unwrap(), s);
        }
        assert_eq!(
            DesiredState::NAMES,
            DesiredState::ALL.map(DesiredState::as_str)
        );
        assert_eq!(DesiredState::from_name("running"), None);
        assert_eq!(DesiredState::default(), DesiredState::Running);
        let names: Vec<&str> = CurrentState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "PENDING", "STARTING", "RUNNING", "STOPPING", "STOPPED", "EXITED", "CRASHED",
                "BACKOFF", "FAILED", "UNKNOWN"
            ]
        );
        for s in CurrentState::ALL {
            assert_eq!(json!(s), json!(s.as_str()));
            assert_eq!(CurrentState::from_wire(s.as_str()), s);
            assert_eq!(serde_json::from_value::<CurrentState>(json!(s)).unwrap(), s);
        }
    }

    #[test]
    fn an_unknown_state_name_reads_as_unknown() {
        assert_eq!(CurrentState::from_wire("PAUSED"), CurrentState::Unknown);
        assert_eq!(CurrentState::from_wire("running"), CurrentState::Unknown);
        let s: CurrentState = serde_json::from_value(json!("HIBERNATING")).unwrap();
        assert_eq!(s, CurrentState::Unknown);
        assert!(serde_json::from_value::<DesiredState>(json!("PAUSED")).is_err());
    }

    #[test]
    fn ids_and_generations_are_plain_json_values() {
        let id = DeploymentId::new("abc");
        assert_eq!(json!(id), json!("abc"));
        assert_eq!(id.to_string(), "abc");
        assert_eq!(id, "abc");
        let back: NodeId = serde_json::from_value(json!("n1")).unwrap();
        assert_eq!(back.as_str(), "n1");
        let map: std::collections::BTreeMap<NodeId, u8> = [(back, 1)].into();
        assert_eq!(map.get("n1"), Some(&1));
        assert_eq!(json!(Generation(7)), json!(7));
        assert_eq!(
            serde_json::from_value::<Generation>(json!(9)).unwrap(),
            Generation(9)
        );
        assert_eq!(Generation(3).to_string(), "3");
    }
}
