//! The core's side of trust: join tokens and enrollment, certificate renewal, node
//! revocation, API tokens. Every change is persisted with its event before anyone is told.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use symphony_net::pki::{self, Validity};
use symphony_net::{CertificateAuthority, CloseCode, RevokedSet};
use tokio::sync::oneshot;

use super::{Core, CoreError, Reply, narrate};
use crate::conductor::events::{NewEvent, object};
use crate::conductor::store::StoreError;
use crate::conductor::trust::{self, ApiTokenRecord, JoinToken, JoinTokenRecord, NodeTrust, Role};
use crate::time::{millis, now_ms};
use crate::wire;

/// Characters of the random suffix of a node id picked at enrollment.
const SUFFIX_LEN: usize = 8;

/// The conductor's trust state: the CA that signs, the revoked set the TLS verifier reads,
/// and each node's record.
pub struct TrustState {
    ca: Arc<CertificateAuthority>,
    ca_pem: String,
    ca_pin: [u8; 32],
    revoked: RevokedSet,
    pub(super) nodes: BTreeMap<String, NodeTrust>,
    cert_ttl: Duration,
    renew_grace: Duration,
}

impl std::fmt::Debug for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustState")
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl TrustState {
    /// From the CA, the set the verifier reads (filled here from `nodes`), and the stored
    /// records.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        revoked: RevokedSet,
        nodes: Vec<NodeTrust>,
        cert_ttl: Duration,
        renew_grace: Duration,
    ) -> Result<Self, pki::PkiError> {
        let ca_pem = ca.cert_pem().to_owned();
        let ca_pin = ca.fingerprint()?;
        if let Ok(mut set) = revoked.write() {
            set.extend(
                nodes
                    .iter()
                    .filter(|n| n.revoked_at_ms.is_some())
                    .map(|n| n.node_id.clone()),
            );
        }
        Ok(Self {
            ca,
            ca_pem,
            ca_pin,
            revoked,
            nodes: nodes.into_iter().map(|n| (n.node_id.clone(), n)).collect(),
            cert_ttl,
            renew_grace,
        })
    }

    /// The node's record, or a fresh one for a node with a certificate made by hand (`symphony
    /// cert node`: no token, any group).
    fn record(&self, node_id: &str, now_ms: i64) -> NodeTrust {
        self.nodes
            .get(node_id)
            .cloned()
            .unwrap_or_else(|| NodeTrust {
                node_id: node_id.to_owned(),
                token_id: None,
                groups: None,
                not_after_ms: None,
                enrolled_at_ms: now_ms,
                renewed_at_ms: None,
                revoked_at_ms: None,
                revoke_reason: None,
            })
    }

    /// Whether the node is revoked.
    pub fn is_revoked(&self, node_id: &str) -> bool {
        self.nodes
            .get(node_id)
            .is_some_and(|n| n.revoked_at_ms.is_some())
    }

    fn sign(&self, csr_pem: &str, node_id: &str) -> Result<(String, i64), String> {
        let validity = Validity::lasting(self.cert_ttl);
        let cert = self
            .ca
            .sign_node_csr(csr_pem, node_id, validity)
            .map_err(|e| format!("bad certificate request: {e}"))?;
        Ok((cert, validity.not_after_ms()))
    }
}

/// A trust request for the core.
#[derive(Debug)]
pub enum TrustMsg {
    /// Create a join token; the reply carries the token text (shown once).
    CreateJoinToken {
        groups: Vec<String>,
        ttl: Duration,
        uses: Option<i64>,
        node_id_prefix: String,
        reply: Reply<(JoinTokenRecord, String)>,
    },
    RevokeJoinToken(String, Reply<()>),
    /// Create an API token; the reply carries the token text (shown once).
    CreateApiToken {
        name: String,
        role: Role,
        reply: Reply<(ApiTokenRecord, String)>,
    },
    RevokeApiToken(String, Reply<()>),
    RevokeNode {
        node_id: String,
        reason: String,
        /// Also revoke the join token it enrolled with (a pod that still has the token in its
        /// environment could otherwise join again under a new id).
        revoke_token: bool,
        reply: Reply<()>,
    },
    /// A node asking to join (or to renew an expired certificate) on the enrollment ALPN.
    Enroll {
        request: wire::EnrollRequest,
        /// The join token the request names, read (and its secret checked) by the session
        /// task, so junk never reaches the core; `None` for a renewal after expiry.
        token: Option<Box<JoinTokenRecord>>,
        remote: std::net::SocketAddr,
        reply: oneshot::Sender<wire::EnrollReply>,
    },
    /// A connected node asking for a fresh certificate over its control stream.
    Renew {
        node_id: String,
        csr_pem: String,
        reply: oneshot::Sender<wire::RenewReply>,
    },
}

fn refused(why: impl Into<String>) -> wire::EnrollReply {
    wire::EnrollReply {
        error: why.into(),
        ..wire::EnrollReply::default()
    }
}

impl Core {
    pub(super) async fn trust_msg(&mut self, msg: TrustMsg) {
        match msg {
            TrustMsg::CreateJoinToken {
                groups,
                ttl,
                uses,
                node_id_prefix,
                reply,
            } => {
                let r = self
                    .create_join_token(groups, ttl, uses, node_id_prefix)
                    .await;
                let _ = reply.send(r);
            }
            TrustMsg::RevokeJoinToken(id, reply) => {
                let ev = token_event("token.revoked", &id, format!("join token {id} revoked"));
                let r = self
                    .persist(vec![ev], async |s, ev| {
                        s.revoke_join_token(&id, now_ms(), ev).await
                    })
                    .await
                    .map_err(not_found("join token not found"));
                let _ = reply.send(r);
            }
            TrustMsg::CreateApiToken { name, role, reply } => {
                let r = self.create_api_token(name, role).await;
                let _ = reply.send(r);
            }
            TrustMsg::RevokeApiToken(id, reply) => {
                let ev = NewEvent::new(
                    "api_token.revoked",
                    object("api_token", &id),
                    format!("API token {id} revoked"),
                    json!({}),
                );
                let r = self
                    .persist(vec![ev], async |s, ev| {
                        s.revoke_api_token(&id, now_ms(), ev).await
                    })
                    .await
                    .map_err(not_found("API token not found"));
                let _ = reply.send(r);
            }
            TrustMsg::RevokeNode {
                node_id,
                reason,
                revoke_token,
                reply,
            } => {
                let r = self.revoke_node(&node_id, reason, revoke_token).await;
                self.answer(reply, r, true);
            }
            TrustMsg::Enroll {
                request,
                token,
                remote,
                reply,
            } => {
                let r = match (request.how, token) {
                    (Some(wire::enroll_request::How::Join(j)), Some(t)) => {
                        self.join(j, *t, remote).await
                    }
                    (Some(wire::enroll_request::How::Join(_)), None) => {
                        refused("unknown join token")
                    }
                    (Some(wire::enroll_request::How::RenewExpired(r)), _) => {
                        self.renew_expired(r).await
                    }
                    (None, _) => refused("empty enrollment request"),
                };
                let _ = reply.send(r);
            }
            TrustMsg::Renew {
                node_id,
                csr_pem,
                reply,
            } => {
                let r = match self.renew(&node_id, &csr_pem, "renewed").await {
                    Ok((cert_pem, not_after_ms)) => wire::RenewReply {
                        cert_pem,
                        not_after_ms,
                        error: String::new(),
                    },
                    Err(error) => wire::RenewReply {
                        error,
                        ..wire::RenewReply::default()
                    },
                };
                let _ = reply.send(r);
            }
        }
    }

    async fn create_join_token(
        &mut self,
        groups: Vec<String>,
        ttl: Duration,
        uses: Option<i64>,
        node_id_prefix: String,
    ) -> Result<(JoinTokenRecord, String), CoreError> {
        let (id, secret) = trust::new_id_and_secret();
        let now = now_ms();
        let rec = JoinTokenRecord {
            id: id.clone(),
            secret_hash: trust::hash_secret(&secret),
            groups,
            node_id_prefix,
            max_uses: uses,
            uses: 0,
            expires_at_ms: now.saturating_add(i64::try_from(millis(ttl)).unwrap_or(i64::MAX)),
            created_at_ms: now,
            revoked_at_ms: None,
        };
        let ev = NewEvent::new(
            "token.created",
            object("token", &id),
            format!("join token {id} created"),
            json!({"groups": rec.groups, "uses": uses, "expires_at_ms": rec.expires_at_ms,
                   "node_id_prefix": rec.node_id_prefix}),
        );
        self.persist(vec![ev], async |s, ev| s.insert_join_token(&rec, ev).await)
            .await?;
        let text = JoinToken {
            ca_pin: self.trust.ca_pin,
            id,
            secret,
        }
        .encode();
        Ok((rec, text))
    }

    async fn create_api_token(
        &mut self,
        name: String,
        role: Role,
    ) -> Result<(ApiTokenRecord, String), CoreError> {
        let (id, secret) = trust::new_id_and_secret();
        let rec = ApiTokenRecord {
            id: id.clone(),
            name: name.clone(),
            role,
            secret_hash: trust::hash_secret(&secret),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        let ev = NewEvent::new(
            "api_token.created",
            object("api_token", &id),
            format!("API token {name} ({role}) created"),
            json!({"name": name, "role": role}),
        );
        self.persist(vec![ev], async |s, ev| s.insert_api_token(&rec, ev).await)
            .await
            .map_err(|e| match e {
                StoreError::Conflict => {
                    CoreError::Conflict(format!("an API token named {name:?} exists"))
                }
                e => e.into(),
            })?;
        Ok((rec, trust::encode_api_token(&id, &secret)))
    }

    /// `token` was read and its secret checked by the session task; its use count and
    /// revocation are checked again by the store in the enrollment's transaction.
    async fn join(
        &mut self,
        j: wire::JoinWithToken,
        token: JoinTokenRecord,
        remote: std::net::SocketAddr,
    ) -> wire::EnrollReply {
        let now = now_ms();
        if let Some(why) = token.refusal(now) {
            return refused(why);
        }
        let allowed: BTreeSet<String> = token.groups.iter().cloned().collect();
        let groups: BTreeSet<String> = if j.groups.is_empty() {
            allowed.clone()
        } else {
            j.groups.iter().cloned().collect()
        };
        if let Some(g) = groups.iter().find(|g| !allowed.contains(*g)) {
            return refused(format!("group {g:?} is not allowed by this join token"));
        }
        let node_id = if j.node_id.is_empty() {
            self.fresh_node_id(&token.node_id_prefix)
        } else {
            if let Err(e) = pki::validate_node_id(&j.node_id) {
                return refused(e.to_string());
            }
            if !j.node_id.starts_with(&token.node_id_prefix) {
                return refused(format!(
                    "node id {:?} does not start with this token's prefix {:?}",
                    j.node_id, token.node_id_prefix
                ));
            }
            // The same token may enroll the same id again (a pod made anew from its
            // template), but never take it from a node that is connected.
            let connected = self.nodes.get(&j.node_id).is_some_and(|n| n.conn.is_some());
            let taken = connected
                || match self.trust.nodes.get(&j.node_id) {
                    Some(n) => {
                        n.revoked_at_ms.is_some() || n.token_id.as_deref() != Some(&token.id)
                    }
                    None => self.nodes.contains_key(&j.node_id),
                };
            if taken {
                return refused(format!(
                    "node id {:?} is taken (or revoked); leave it out to get a fresh one",
                    j.node_id
                ));
            }
            j.node_id.clone()
        };
        let (cert_pem, not_after_ms) = match self.trust.sign(&j.csr_pem, &node_id) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let rec = NodeTrust {
            node_id: node_id.clone(),
            token_id: Some(token.id.clone()),
            groups: Some(groups.clone()),
            not_after_ms: Some(not_after_ms),
            enrolled_at_ms: now,
            renewed_at_ms: None,
            revoked_at_ms: None,
            revoke_reason: None,
        };
        let ev = narrate::node(
            "node.enrolled",
            &node_id,
            format!(
                "node {node_id} joined with token {} from {remote}",
                token.id
            ),
            json!({"token": token.id, "groups": groups, "remote": remote.to_string(),
                   "not_after_ms": not_after_ms}),
        );
        let token_id = token.id.clone();
        match self
            .persist(vec![ev], async |s, ev| {
                s.record_enrollment(&token_id, &rec, ev).await
            })
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => return refused("join token used up"),
            Err(e) => {
                tracing::error!(error = %e, "store failure recording an enrollment");
                return refused("conductor store unavailable");
            }
        }
        self.trust.nodes.insert(node_id.clone(), rec);
        self.changed = true;
        wire::EnrollReply {
            node_id,
            cert_pem,
            ca_pem: self.trust.ca_pem.clone(),
            groups: groups.into_iter().collect(),
            not_after_ms,
            error: String::new(),
        }
    }

    fn fresh_node_id(&self, prefix: &str) -> String {
        loop {
            let (id, _) = trust::new_id_and_secret();
            let candidate = format!("{prefix}{}", &id[..SUFFIX_LEN.min(id.len())]);
            if !self.trust.nodes.contains_key(&candidate) && !self.nodes.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    async fn renew_expired(&mut self, r: wire::RenewExpired) -> wire::EnrollReply {
        let facts = match pki::node_cert_facts(&r.cert_pem, &self.trust.ca_pem) {
            Ok(f) => f,
            Err(e) => return refused(format!("certificate refused: {e}")),
        };
        let grace_end = facts
            .not_after_ms
            .saturating_add(i64::try_from(millis(self.trust.renew_grace)).unwrap_or(i64::MAX));
        if now_ms() > grace_end {
            return refused(format!(
                "certificate expired more than {} s ago; join again with a new token",
                self.trust.renew_grace.as_secs()
            ));
        }
        match pki::csr_public_key(&r.csr_pem) {
            Ok(k) if k == facts.public_key => {}
            Ok(_) => return refused("the request is not signed by the certificate's key"),
            Err(e) => return refused(format!("bad certificate request: {e}")),
        }
        match self
            .renew(&facts.node_id, &r.csr_pem, "renewed after expiry")
            .await
        {
            Ok((cert_pem, not_after_ms)) => wire::EnrollReply {
                groups: self
                    .trust
                    .nodes
                    .get(&facts.node_id)
                    .and_then(|n| n.groups.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                node_id: facts.node_id,
                cert_pem,
                ca_pem: self.trust.ca_pem.clone(),
                not_after_ms,
                error: String::new(),
            },
            Err(e) => refused(e),
        }
    }

    /// Signs a fresh certificate for a node that is not revoked and records its new expiry.
    async fn renew(
        &mut self,
        node_id: &str,
        csr_pem: &str,
        how: &str,
    ) -> Result<(String, i64), String> {
        if self.trust.is_revoked(node_id) {
            return Err("node revoked".into());
        }
        let (cert_pem, not_after_ms) = self.trust.sign(csr_pem, node_id)?;
        let now = now_ms();
        let rec = NodeTrust {
            not_after_ms: Some(not_after_ms),
            renewed_at_ms: Some(now),
            ..self.trust.record(node_id, now)
        };
        let ev = narrate::node(
            "node.renewed",
            node_id,
            format!("node {node_id}: certificate {how}"),
            json!({"not_after_ms": not_after_ms}),
        );
        if let Err(e) = self
            .persist(vec![ev], async |s, ev| s.put_node_trust(&rec, ev).await)
            .await
        {
            tracing::error!(error = %e, %node_id, "store failure recording a renewal");
            return Err("conductor store unavailable".into());
        }
        self.trust.nodes.insert(node_id.to_owned(), rec);
        self.changed = true;
        Ok((cert_pem, not_after_ms))
    }

    async fn revoke_node(
        &mut self,
        node_id: &str,
        reason: String,
        revoke_token: bool,
    ) -> Result<(), CoreError> {
        if !self.nodes.contains_key(node_id) && !self.trust.nodes.contains_key(node_id) {
            return Err(CoreError::NotFound("Node not found"));
        }
        let token = self
            .trust
            .nodes
            .get(node_id)
            .and_then(|n| n.token_id.clone())
            .filter(|_| revoke_token);
        if let Some(t) = token {
            let ev = token_event(
                "token.revoked",
                &t,
                format!("join token {t} revoked with node {node_id}"),
            );
            self.persist(vec![ev], async |s, ev| {
                s.revoke_join_token(&t, now_ms(), ev).await
            })
            .await?;
        }
        if self.trust.is_revoked(node_id) {
            return Ok(());
        }
        let now = now_ms();
        let rec = NodeTrust {
            revoked_at_ms: Some(now),
            revoke_reason: Some(reason.clone()),
            ..self.trust.record(node_id, now)
        };
        let ev = narrate::node(
            "node.revoked",
            node_id,
            format!("node {node_id} revoked: {reason}"),
            json!({"reason": reason}),
        );
        self.persist(vec![ev], async |s, ev| s.put_node_trust(&rec, ev).await)
            .await?;
        if let Ok(mut set) = self.trust.revoked.write() {
            set.insert(node_id.to_owned());
        }
        self.trust.nodes.insert(node_id.to_owned(), rec);
        if let Some(n) = self.nodes.get_mut(node_id)
            && let Some(c) = n.conn.take()
        {
            c.session
                .close(CloseCode::Revoked, "node certificate revoked");
        }
        self.needs_schedule = true;
        Ok(())
    }

    /// Why a connecting node's Hello must be refused by its trust record, if it must, with
    /// the close code to tell it.
    pub(super) fn hello_refusal(
        &self,
        node_id: &str,
        groups: &[String],
    ) -> Option<(CloseCode, String)> {
        let n = self.trust.nodes.get(node_id)?;
        if n.revoked_at_ms.is_some() {
            return Some((CloseCode::Revoked, "node certificate revoked".into()));
        }
        n.forbidden_group(groups).map(|g| {
            (
                CloseCode::AuthFailed,
                format!("group {g:?} is not allowed by this node's join token"),
            )
        })
    }
}

fn token_event(kind: &'static str, id: &str, message: String) -> NewEvent {
    NewEvent::new(kind, object("token", id), message, json!({}))
}

fn not_found(what: &'static str) -> impl Fn(StoreError) -> CoreError {
    move |e| match e {
        StoreError::NotFound => CoreError::NotFound(what),
        e => e.into(),
    }
}
