//! Trust: join tokens (how a pod becomes a node), API tokens and roles (who may call the API),
//! and what the conductor knows of each node's certificate (allowed groups, expiry,
//! revocation).
//!
//! Secrets are random 256-bit strings; only their SHA-256 is stored, so a stolen database
//! reveals no usable token. A join token also carries the SHA-256 of the conductor's CA
//! certificate: the node checks the server against it before it sends the secret.
//!
//! Token formats (base32, lower case, no padding):
//! - join: `SYM1.<CA SHA-256>.<token id>.<secret>`
//! - API:  `SYMA1.<token id>.<secret>`

use std::collections::BTreeSet;

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

/// Random bytes in a token id.
const ID_BYTES: usize = 10;
/// Random bytes in a token secret.
const SECRET_BYTES: usize = 32;

/// What an API caller may do. Ordered: each role may do everything the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: every GET, logs, events, metrics.
    Viewer,
    /// Deployments, experiments, envs, services; no tokens, no revocation.
    Operator,
    /// Everything: tokens, node revocation.
    Admin,
}

impl Role {
    /// All roles, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name used in the API, the store and the OpenAPI document.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SHA-256 of a secret, hex: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    data_encoding::HEXLOWER
        .encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Whether `secret` hashes to `stored` (compared in constant time).
pub fn secret_matches(secret: &str, stored: &str) -> bool {
    let a = hash_secret(secret);
    a.len() == stored.len()
        && a.bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn random_b32(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::Rng::fill(&mut rand::rng(), bytes.as_mut_slice());
    BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
}

fn decode_b32(s: &str) -> Option<Vec<u8>> {
    BASE32_NOPAD.decode(s.to_ascii_uppercase().as_bytes()).ok()
}

/// A fresh token id and secret.
pub fn new_id_and_secret() -> (String, String) {
    (random_b32(ID_BYTES), random_b32(SECRET_BYTES))
}

/// A join token as the node holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the conductor's CA certificate.
    pub ca_pin: [u8; 32],
    /// The token's id (public: listed, revoked by).
    pub id: String,
    /// The secret (never stored by the conductor).
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// `SYM1.<pin>.<id>.<secret>`.
    pub fn encode(&self) -> String {
        format!(
            "SYM1.{}.{}.{}",
            BASE32_NOPAD.encode(&self.ca_pin).to_ascii_lowercase(),
            self.id,
            self.secret
        )
    }

    /// Parses a join token; the error says what is wrong without repeating the secret.
    pub fn parse(s: &str) -> Result<JoinToken, String> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [version, pin, id, secret] = parts.as_slice() else {
            return Err(
                "a join token has four dot-separated parts: SYM1.<ca>.<id>.<secret>".into(),
            );
        };
        if *version != "SYM1" {
            return Err(format!(
                "unknown join token version {version:?} (expected SYM1)"
            ));
        }
        let pin: [u8; 32] = decode_b32(pin)
            .and_then(|b| b.try_into().ok())
            .ok_or("the join token's CA hash is not 32 bytes of base32")?;
        if decode_b32(id).is_none() || decode_b32(secret).is_none() || secret.is_empty() {
            return Err("the join token's id or secret is not base32".into());
        }
        Ok(JoinToken {
            ca_pin: pin,
            id: (*id).to_owned(),
            secret: (*secret).to_owned(),
        })
    }
}

/// An API token as a client holds it: `SYMA1.<id>.<secret>`.
pub fn encode_api_token(id: &str, secret: &str) -> String {
    format!("SYMA1.{id}.{secret}")
}

/// Splits an API token into id and secret (`None`: not one).
pub fn parse_api_token(s: &str) -> Option<(&str, &str)> {
    let rest = s.trim().strip_prefix("SYMA1.")?;
    let (id, secret) = rest.split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// A join token as stored (secret hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret (hex); never leaves the conductor.
    #[serde(skip_serializing)]
    pub secret_hash: String,
    /// Groups a node joining with it may claim (empty: none).
    pub groups: Vec<String>,
    /// New node ids are this prefix and a unique suffix (unless the node names itself).
    pub node_id_prefix: String,
    /// How many nodes may join with it (`None`: any number until it expires).
    pub max_uses: Option<i64>,
    /// How many did.
    pub uses: i64,
    /// Unix ms after which it refuses.
    pub expires_at_ms: i64,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms it was revoked at, if it was.
    pub revoked_at_ms: Option<i64>,
}

impl JoinTokenRecord {
    /// Why it cannot be used now, if it cannot.
    pub fn refusal(&self, now_ms: i64) -> Option<&'static str> {
        if self.revoked_at_ms.is_some() {
            Some("join token revoked")
        } else if now_ms >= self.expires_at_ms {
            Some("join token expired")
        } else if self.max_uses.is_some_and(|m| self.uses >= m) {
            Some("join token used up")
        } else {
            None
        }
    }
}

/// An API token as stored (secret hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// Public id.
    pub id: String,
    /// Unique name; events record writes under it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret (hex); never leaves the conductor.
    #[serde(skip_serializing)]
    pub secret_hash: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms it was revoked at, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// What the conductor knows of one node's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTrust {
    /// The node.
    pub node_id: String,
    /// The join token it enrolled with (`None`: a certificate made by `symphony cert node`).
    pub token_id: Option<String>,
    /// Groups it may claim (`None`: any).
    pub groups: Option<BTreeSet<String>>,
    /// End of its newest certificate, Unix ms (`None`: unknown).
    pub not_after_ms: Option<i64>,
    /// Unix ms.
    pub enrolled_at_ms: i64,
    /// Unix ms of the last renewal.
    pub renewed_at_ms: Option<i64>,
    /// Unix ms it was revoked at, if it was.
    pub revoked_at_ms: Option<i64>,
    /// Why.
    pub revoke_reason: Option<String>,
}

impl NodeTrust {
    /// A claimed group its token did not allow, if any.
    pub fn forbidden_group<'a>(&self, claimed: &'a [String]) -> Option<&'a str> {
        let allowed = self.groups.as_ref()?;
        claimed
            .iter()
            .find(|g| !allowed.contains(g.as_str()))
            .map(String::as_str)
    }

    /// `valid`, `expired` or `revoked` at `now_ms` (with the reason for the last two).
    pub fn state(&self, now_ms: i64) -> (&'static str, Option<String>) {
        if self.revoked_at_ms.is_some() {
            let why = self
                .revoke_reason
                .clone()
                .unwrap_or_else(|| "revoked".into());
            return ("revoked", Some(why));
        }
        match self.not_after_ms {
            Some(t) if now_ms >= t => ("expired", Some("certificate expired".into())),
            _ => ("valid", None),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_round_trip_and_bad_ones_are_refused() {
        let (id, secret) = new_id_and_secret();
        let t = JoinToken {
            ca_pin: [7; 32],
            id,
            secret,
        };
        let s = t.encode();
        assert!(s.starts_with("SYM1."));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in [
            "",
            "SYM1.a.b",
            &s.replacen("SYM1", "SYM2", 1),
            &s.replacen("SYM1.", "SYM1.zz", 1),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_hashed_and_compared() {
        let (_, secret) = new_id_and_secret();
        let h = hash_secret(&secret);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&secret));
        assert!(secret_matches(&secret, &h));
        assert!(!secret_matches("other", &h));
        assert_eq!(
            parse_api_token(&encode_api_token("ab", "cd")),
            Some(("ab", "cd"))
        );
        assert_eq!(parse_api_token("Bearer x"), None);
    }

    #[test]
    fn a_join_token_refuses_when_revoked_expired_or_used_up() {
        let t = JoinTokenRecord {
            id: "a".into(),
            secret_hash: String::new(),
            groups: vec![],
            node_id_prefix: "n-".into(),
            max_uses: Some(1),
            uses: 0,
            expires_at_ms: 100,
            created_at_ms: 0,
            revoked_at_ms: None,
        };
        assert_eq!(t.refusal(50), None);
        assert_eq!(t.refusal(100), Some("join token expired"));
        let used = JoinTokenRecord {
            uses: 1,
            ..t.clone()
        };
        assert_eq!(used.refusal(50), Some("join token used up"));
        let revoked = JoinTokenRecord {
            revoked_at_ms: Some(1),
            ..t
        };
        assert_eq!(revoked.refusal(50), Some("join token revoked"));
    }

    #[test]
    fn groups_beyond_the_token_are_found() {
        let n = NodeTrust {
            node_id: "n".into(),
            token_id: Some("t".into()),
            groups: Some(["gpu".to_owned()].into()),
            not_after_ms: Some(10),
            enrolled_at_ms: 0,
            renewed_at_ms: None,
            revoked_at_ms: None,
            revoke_reason: None,
        };
        assert_eq!(n.forbidden_group(&["gpu".into()]), None);
        assert_eq!(
            n.forbidden_group(&["gpu".into(), "a100".into()]),
            Some("a100")
        );
        assert_eq!(n.state(5).0, "valid");
        assert_eq!(n.state(10).0, "expired");
        let any = NodeTrust { groups: None, ..n };
        assert_eq!(any.forbidden_group(&["x".into()]), None);
    }
}
