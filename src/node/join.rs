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

    fn commit_marker(&self) -> PathBuf {
        self.cert.with_extension("commit")
    }

    fn pending(&self) -> (PathBuf, PathBuf) {
        (
            self.key.with_extension("key.new"),
            self.cert.with_extension("pem.new"),
        )
    }

    /// Replaces the certificate and key together: both are written beside (the key 0600) and
    /// synced, a commit marker is synced, then both are renamed into place and the marker
    /// removed. A crash before the marker leaves the old pair ([`IdentityFiles::recover`]
    /// drops the new files); after it, recovery finishes the renames. Never a new key with an
    /// old certificate.
    pub fn write(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let dir = self
            .cert
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (key_new, cert_new) = self.pending();
        pki::write_private(&key_new, key_pem)?;
        sync(&key_new)?;
        std::fs::write(&cert_new, cert_pem)
            .with_context(|| format!("writing {}", cert_new.display()))?;
        sync(&cert_new)?;
        let marker = self.commit_marker();
        std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
        sync(&marker)?;
        sync(&dir)?;
        self.recover()
    }

    /// Finishes or drops a replacement a crash interrupted (see [`IdentityFiles::write`]).
    pub fn recover(&self) -> anyhow::Result<()> {
        let (key_new, cert_new) = self.pending();
        let marker = self.commit_marker();
        if marker.exists() {
            for (from, to) in [(&key_new, &self.key), (&cert_new, &self.cert)] {
                if from.exists() {
                    std::fs::rename(from, to)
                        .with_context(|| format!("replacing {}", to.display()))?;
                }
            }
            std::fs::remove_file(&marker)
                .with_context(|| format!("removing {}", marker.display()))?;
        } else {
            for f in [&key_new, &cert_new] {
                if f.exists() {
                    std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
                }
            }
        }
        if let Some(dir) = self.cert.parent()
            && dir.exists()
        {
            sync(dir)?;
        }
        Ok(())
    }

    /// The TLS material in the files.
    pub fn material(&self) -> anyhow::Result<TlsMaterial> {
        Ok(TlsMaterial::from_files(&self.ca, &self.cert, &self.key)?)
    }
}

/// Flushes a file (or a folder's entries) to disk.
fn sync(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
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
    files.recover()?;
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
pub async fn renew_expired(
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> IdentityFiles {
        IdentityFiles::in_work_dir(dir)
    }

    #[test]
    fn a_replacement_is_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        f.write("cert-1", "key-1").unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            (read(&f.cert), read(&f.key)),
            ("cert-1".into(), "key-1".into())
        );
        // A crash before the commit marker: the new files are dropped, the old pair stays.
        let (key_new, cert_new) = f.pending();
        std::fs::write(&key_new, "key-2").unwrap();
        std::fs::write(&cert_new, "cert-2").unwrap();
        f.recover().unwrap();
        assert_eq!(
            (read(&f.cert), read(&f.key)),
            ("cert-1".into(), "key-1".into())
        );
        assert!(!key_new.exists() && !cert_new.exists());
        // A crash after the marker and the key's rename: recovery finishes with the cert.
        std::fs::write(&cert_new, "cert-3").unwrap();
        std::fs::write(&f.key, "key-3").unwrap();
        std::fs::write(f.commit_marker(), "").unwrap();
        f.recover().unwrap();
        assert_eq!(
            (read(&f.cert), read(&f.key)),
            ("cert-3".into(), "key-3".into())
        );
        assert!(!f.commit_marker().exists());
        use std::os::unix::fs::PermissionsExt;
        f.write("cert-4", "key-4").unwrap();
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
