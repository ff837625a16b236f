//! The PKI: a certificate authority, the conductor's server certificate, and one client
//! certificate **per node** whose identity (node id) is inside the certificate.
//!
//! Files live in one folder (the conductor's `cert_path`): `ca.pem`, `ca.key`, `server.pem`,
//! `server.key`. Keys are written 0600. Existing files are reused, never silently regenerated:
//! a CA certificate without its key (or the reverse) is an error, because regenerating would
//! orphan every node certificate already issued.
//!
//! A node's identity is the URI SAN `urn:symphony:node:<id>` of its certificate (the CN carries
//! the same id for humans). It is never the node's address and never a self-asserted field.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration as TimeDuration, OffsetDateTime};

/// Prefix of the URI SAN that carries a node's identity.
pub const NODE_URI_PREFIX: &str = "urn:symphony:node:";

/// Names always present in the server certificate.
pub const DEFAULT_SERVER_NAMES: [&str; 2] = ["localhost", "symphony-conductor"];

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Only one half of a certificate/key pair exists.
    #[error(
        "{present} exists but {missing} is missing; refusing to regenerate (it would invalidate issued certificates)"
    )]
    HalfPair {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// A PEM file could not be parsed.
    #[error("{path}: invalid PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A node id is not acceptable.
    #[error("invalid node id {0:?}: use 1-128 characters of letters, digits, '.', '_' and '-'")]
    InvalidNodeId(String),
    /// A certificate carries no node identity.
    #[error("certificate carries no node identity")]
    NoIdentity,
}

/// Checks a node id: 1..=128 of `[A-Za-z0-9._-]`.
pub fn validate_node_id(id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidNodeId(id.to_owned()))
    }
}

/// Writes a file readable only by its owner (0600), replacing any previous content.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // `mode` only applies on creation; tighten an existing file too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (0600).
    pub key: PathBuf,
}

impl CertFiles {
    /// `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    /// Which of the two exist: `Some(true)` both, `Some(false)` neither, error if only one.
    fn both_exist(&self) -> Result<bool, PkiError> {
        match (self.cert.exists(), self.key.exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            (true, false) => Err(PkiError::HalfPair {
                present: self.cert.clone(),
                missing: self.key.clone(),
            }),
            (false, true) => Err(PkiError::HalfPair {
                present: self.key.clone(),
                missing: self.cert.clone(),
            }),
        }
    }
}

/// A PEM certificate and key in memory.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// Validity window of issued certificates.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one minute ago (clock skew) until `d` from now.
    pub fn lasting(d: std::time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - TimeDuration::minutes(1),
            not_after: now + d,
        }
    }

    /// The end, in milliseconds since the Unix epoch.
    pub fn not_after_ms(&self) -> i64 {
        i64::try_from(self.not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    /// From one minute ago for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - TimeDuration::minutes(1),
            not_after: now + TimeDuration::days(days),
        }
    }
}

/// The certificate authority that signs the server and node certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads `ca.pem`/`ca.key` from `dir`, or creates them (and `dir`) when both are absent.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let files = CertFiles::in_dir(dir, "ca");
        if files.both_exist()? {
            return Self::load(&files);
        }
        let ca = Self::generate(Validity::days(3650))?;
        write_private(&files.key, &ca.issuer.key().serialize_pem())?;
        write_public(&files.cert, &ca.cert_pem)?;
        Ok(ca)
    }

    /// Loads an existing CA.
    pub fn load(files: &CertFiles) -> Result<Self, PkiError> {
        let key_pem = read(&files.key)?;
        let cert_pem = read(&files.cert)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Pem {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { cert_pem, issuer })
    }

    /// Creates a new CA in memory.
    pub fn generate(validity: Validity) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "symphony-ca");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), what both ends trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server certificate for `localhost`, `symphony-conductor` and `extra_names`
    /// (IP addresses become IP SANs).
    pub fn issue_server(
        &self,
        extra_names: &[String],
        validity: Validity,
    ) -> Result<PemPair, PkiError> {
        let mut names: Vec<String> = DEFAULT_SERVER_NAMES
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for n in extra_names {
            if !n.is_empty() && !names.contains(n) {
                names.push(n.clone());
            }
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            extra_names
                .first()
                .map_or("symphony-conductor", String::as_str),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_leaf(params, validity)
    }

    /// Signs a leaf certificate with a fresh key.
    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<PemPair, PkiError> {
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate for one node; its identity is `node_id`.
    pub fn issue_node(&self, node_id: &str, validity: Validity) -> Result<PemPair, PkiError> {
        validate_node_id(node_id)?;
        self.sign_leaf(node_params(node_id)?, validity)
    }

    /// SHA-256 of the CA certificate (DER): what a join token pins.
    pub fn fingerprint(&self) -> Result<[u8; 32], PkiError> {
        fingerprint_pem(&self.cert_pem)
    }

    /// Signs a node's certificate signing request for `node_id`: only the CSR's public key is
    /// taken (its signature is checked, so the requester holds the private key); the identity,
    /// key usages and validity are ours, whatever the CSR asked for.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: Validity,
    ) -> Result<String, PkiError> {
        validate_node_id(node_id)?;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = node_params(node_id)?;
        csr.params.use_authority_key_identifier_extension = true;
        csr.params.not_before = validity.not_before;
        csr.params.not_after = validity.not_after;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// Makes sure `server.pem`/`server.key` exist in `dir` (reused when present).
    pub fn ensure_server_files(
        &self,
        dir: &Path,
        extra_names: &[String],
    ) -> Result<CertFiles, PkiError> {
        let files = CertFiles::in_dir(dir, "server");
        if !files.both_exist()? {
            let pair = self.issue_server(extra_names, Validity::days(3650))?;
            write_private(&files.key, &pair.key_pem)?;
            write_public(&files.cert, &pair.cert_pem)?;
        }
        Ok(files)
    }

    /// Writes `<node_id>.pem`, `<node_id>.key` and `ca.pem` into `out_dir` (reused when present).
    pub fn ensure_node_files(&self, node_id: &str, out_dir: &Path) -> Result<CertFiles, PkiError> {
        validate_node_id(node_id)?;
        std::fs::create_dir_all(out_dir).map_err(|source| PkiError::Io {
            path: out_dir.to_owned(),
            source,
        })?;
        let files = CertFiles::in_dir(out_dir, node_id);
        if !files.both_exist()? {
            let pair = self.issue_node(node_id, Validity::days(365))?;
            write_private(&files.key, &pair.key_pem)?;
            write_public(&files.cert, &pair.cert_pem)?;
        }
        let ca = out_dir.join("ca.pem");
        if !ca.exists() {
            write_public(&ca, &self.cert_pem)?;
        }
        Ok(files)
    }
}

/// A node certificate's fields: identity in the URI SAN (and the CN), client auth only.
fn node_params(node_id: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        format!("{NODE_URI_PREFIX}{node_id}").try_into()?,
    )];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// SHA-256 of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of the first certificate in a PEM text.
pub fn fingerprint_pem(pem: &str) -> Result<[u8; 32], PkiError> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        PkiError::Pem {
            path: PathBuf::from("<certificate>"),
            reason: e.to_string(),
        }
    })?;
    Ok(fingerprint_der(&der))
}

/// A fresh key pair and a CSR for it (the identity in it is ignored by the signer): the
/// private key PEM stays with the caller.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    csr_for_key(&key).map(|csr| (key.serialize_pem(), csr))
}

/// A CSR signed by the key in `key_pem` (proves possession of that key).
pub fn csr_for_key_pem(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
        path: PathBuf::from("<key>"),
        reason: e.to_string(),
    })?;
    csr_for_key(&key)
}

fn csr_for_key(key: &KeyPair) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "symphony-node");
    params.distinguished_name = dn;
    Ok(params.serialize_request(key)?.pem()?)
}

/// What the conductor needs to know of a certificate a node presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The node id in it.
    pub node_id: String,
    /// End of validity, ms since the epoch.
    pub not_after_ms: i64,
    /// The subject public key (raw bits).
    pub public_key: Vec<u8>,
}

/// Reads a node certificate's identity, expiry and public key, checking that `ca_pem`'s key
/// signed it (expiry is not checked: the caller decides what an expired certificate may do).
pub fn node_cert_facts(cert_pem: &str, ca_pem: &str) -> Result<CertFacts, PkiError> {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::*;
    let pem_err = |reason: String| PkiError::Pem {
        path: PathBuf::from("<certificate>"),
        reason,
    };
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| pem_err(e.to_string()))?;
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| pem_err(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| pem_err(e.to_string()))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| pem_err(e.to_string()))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| pem_err("not signed by this conductor's CA".into()))?;
    Ok(CertFacts {
        node_id: node_id_from_cert(&der)?,
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// The public key (raw bits) of a CSR whose signature is valid.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use rcgen::PublicKeyData;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    Ok(csr.public_key.der_bytes().to_vec())
}

/// The end of a DER certificate's validity, in seconds since the Unix epoch.
pub fn not_after_unix(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Extracts the node id from a DER certificate (URI SAN `urn:symphony:node:<id>`).
pub fn node_id_from_cert(der: &[u8]) -> Result<String, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PkiError::NoIdentity)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::NoIdentity)?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
        {
            validate_node_id(id)?;
            return Ok(id.to_owned());
        }
    }
    Err(PkiError::NoIdentity)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let b = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn half_pair_is_an_error_not_a_regeneration() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let before = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::HalfPair { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            before
        );
    }

    #[test]
    fn server_and_node_files_are_reused_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let s1 = ca
            .ensure_server_files(dir.path(), &["10.1.2.3".into()])
            .unwrap();
        let pem1 = std::fs::read_to_string(&s1.cert).unwrap();
        let s2 = ca.ensure_server_files(dir.path(), &[]).unwrap();
        assert_eq!(pem1, std::fs::read_to_string(&s2.cert).unwrap());
        let out = dir.path().join("nodes");
        let n = ca.ensure_node_files("gpu-7", &out).unwrap();
        for key in [&s1.key, &n.key] {
            assert_eq!(
                std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(out.join("ca.pem").exists());
    }

    #[test]
    fn node_identity_is_in_the_certificate() {
        let ca = CertificateAuthority::generate(Validity::days(1)).unwrap();
        let pair = ca.issue_node("node-42", Validity::days(1)).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
        assert_eq!(node_id_from_cert(&der).unwrap(), "node-42");
        // The server certificate carries no node identity.
        let server = ca.issue_server(&[], Validity::days(1)).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap();
        assert!(matches!(node_id_from_cert(&der), Err(PkiError::NoIdentity)));
    }

    #[test]
    fn node_ids_are_validated() {
        for bad in ["", "a b", "../x", "x/y", &"a".repeat(129)] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "node-1", "gpu_pod.3", &"a".repeat(128)] {
            assert!(validate_node_id(good).is_ok(), "{good:?}");
        }
    }

    use rustls::pki_types::pem::PemObject;
}
