//! A node's identity when it joins with a token: `symphony node --join TOKEN --conductor
//! HOST:PORT` (or `SYMPHONY_JOIN_TOKEN` and `SYMPHONY_CONDUCTOR`).
//!
//! The node makes its own key pair (the private key never leaves it; 0600), dials the
//! conductor on ALPN `symphony-enroll/1` trusting only the CA whose hash the token pins (so the
//! secret goes nowhere else), and sends a CSR with the token. The signed certificate, the CA
//! and what the conductor decided (node id, groups) are kept in `<work_dir>/identity/`; a
//! restarted node uses them and does not need the token again. A node whose certificate
//! expired while it was away renews it with its key (within the conductor's grace window).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use symphony_net::{TlsMaterial, TransportSettings, pki};

use crate::conductor::trust::JoinToken;
use crate::time::now_ms;
use crate::wire;

/// The name every conductor certificate carries: an enrolled node checks the conductor by its
/// CA, whatever address it dials.
pub const SERVER_NAME: &str = "symphony-conductor";

/// Where an enrolled node keeps its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// The node certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, 0600).
    pub key: PathBuf,
    /// The conductor's CA (PEM).
    pub ca: PathBuf,
    /// What the conductor decided ([`Enrolled`]).
    pub record: PathBuf,
}

impl IdentityFiles {
    /// The files under `<work_dir>/identity/`.
    pub fn in_work_dir(work_dir: &Path) -> Self {
        let dir = work_dir.join("identity");
        Self {
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
            ca: dir.join("ca.pem"),
            record: dir.join("node.json"),
        }
    }

    /// Writes a new certificate and key, each written beside and then renamed into place (the
    /// key 0600), so a reader never sees half a file.
    pub fn write(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        if let Some(dir) = self.cert.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let key_tmp = self.key.with_extension("key.new");
        pki::write_private(&key_tmp, key_pem)?;
        let cert_tmp = self.cert.with_extension("pem.new");
        std::fs::write(&cert_tmp, cert_pem)
            .with_context(|| format!("writing {}", cert_tmp.display()))?;
        std::fs::rename(&key_tmp, &self.key)
            .with_context(|| format!("replacing {}", self.key.display()))?;
        std::fs::rename(&cert_tmp, &self.cert)
            .with_context(|| format!("replacing {}", self.cert.display()))?;
        Ok(())
    }

    /// The TLS material in the files.
    pub fn material(&self) -> anyhow::Result<TlsMaterial> {
        Ok(TlsMaterial::from_files(&self.ca, &self.cert, &self.key)?)
    }
}

/// What the conductor decided at enrollment, kept beside the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The node id the certificate names.
    pub node_id: String,
    /// The groups the token allowed (what the node claims unless told otherwise).
    pub groups: Vec<String>,
    /// The conductor it joined (`host:port`).
    pub conductor: String,
}

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The join token (needed only the first time).
    pub token: Option<String>,
    /// `host:port` of the conductor's QUIC listener.
    pub conductor: String,
    /// The id to ask for (else the conductor picks: the token's prefix and a suffix).
    pub node_id: Option<String>,
    /// Groups to ask for (else all the token allows).
    pub groups: Vec<String>,
}

/// The node's identity: enrolled now, loaded from an earlier enrollment, or renewed after it
/// expired. Returns the record and the TLS material to connect with.
pub async fn identity(
    files: &IdentityFiles,
    req: &JoinRequest,
    settings: &TransportSettings,
) -> anyhow::Result<(Enrolled, TlsMaterial)> {
    if files.cert.exists() && files.record.exists() {
        let text = std::fs::read_to_string(&files.record)
            .with_context(|| format!("reading {}", files.record.display()))?;
        let rec: Enrolled = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a node identity record", files.record.display()))?;
        let tls = files.material()?;
        let facts = pki::node_cert_facts(&tls.cert_pem, &tls.ca_pem)
            .context("the node certificate does not belong to the stored CA")?;
        if facts.not_after_ms <= now_ms() {
            tracing::info!(node_id = %rec.node_id, "certificate expired; renewing it with the node's key");
            let tls = renew_expired(files, &tls, &req.conductor, settings).await?;
            return Ok((rec, tls));
        }
        return Ok((rec, tls));
    }
    let token = req.token.as_deref().context(
        "this node has no identity yet: give a join token (--join or SYMPHONY_JOIN_TOKEN)",
    )?;
    let token = JoinToken::parse(token).map_err(|e| anyhow::anyhow!("join token: {e}"))?;
    let (key_pem, csr_pem) = pki::new_key_and_csr()?;
    let request = wire::EnrollRequest {
        how: Some(wire::enroll_request::How::Join(wire::JoinWithToken {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            csr_pem,
            node_id: req.node_id.clone().unwrap_or_default(),
            groups: req.groups.clone(),
        })),
    };
    let reply: wire::EnrollReply =
        symphony_net::client::enroll(&req.conductor, token.ca_pin, &request, settings)
            .await
            .with_context(|| format!("joining the conductor at {}", req.conductor))?;
    if !reply.error.is_empty() {
        anyhow::bail!("the conductor refused to enroll this node: {}", reply.error);
    }
    if pki::fingerprint_pem(&reply.ca_pem)? != token.ca_pin {
        anyhow::bail!("the conductor sent a CA other than the one the join token pins");
    }
    if let Some(dir) = files.ca.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&files.ca, &reply.ca_pem)
        .with_context(|| format!("writing {}", files.ca.display()))?;
    files.write(&reply.cert_pem, &key_pem)?;
    let rec = Enrolled {
        node_id: reply.node_id,
        groups: reply.groups,
        conductor: req.conductor.clone(),
    };
    std::fs::write(&files.record, serde_json::to_string_pretty(&rec)?)
        .with_context(|| format!("writing {}", files.record.display()))?;
    tracing::info!(node_id = %rec.node_id, groups = ?rec.groups, "enrolled");
    Ok((rec, files.material()?))
}

/// Renews an expired certificate over the enrollment ALPN: the old certificate and a CSR
/// signed by the same key (which proves the node holds it).
async fn renew_expired(
    files: &IdentityFiles,
    tls: &TlsMaterial,
    conductor: &str,
    settings: &TransportSettings,
) -> anyhow::Result<TlsMaterial> {
    let pin = pki::fingerprint_pem(&tls.ca_pem)?;
    let request = wire::EnrollRequest {
        how: Some(wire::enroll_request::How::RenewExpired(
            wire::RenewExpired {
                cert_pem: tls.cert_pem.clone(),
                csr_pem: pki::csr_for_key_pem(&tls.key_pem)?,
            },
        )),
    };
    let reply: wire::EnrollReply = symphony_net::client::enroll(conductor, pin, &request, settings)
        .await
        .with_context(|| format!("renewing at the conductor {conductor}"))?;
    if !reply.error.is_empty() {
        anyhow::bail!(
            "the conductor refused to renew this node's certificate: {}",
            reply.error
        );
    }
    files.write(&reply.cert_pem, &tls.key_pem)?;
    files.material()
}
