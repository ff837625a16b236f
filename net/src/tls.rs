//! rustls configurations for both ends: TLS 1.3 only, ALPN `symphony/1`, client certificates
//! required and verified against the CA, the server verified by name against the same CA.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ALPN;

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input.
        what: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("quic crypto: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// PEM material of one end: the CA to trust, and its own certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// CA certificate(s) to trust.
    pub ca_pem: String,
    /// Own certificate chain.
    pub cert_pem: String,
    /// Own private key.
    pub key_pem: String,
}

impl TlsMaterial {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| TlsError::Pem {
                what: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Pem {
                what: "ca".into(),
                reason: e.to_string(),
            })?;
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "ca".into(),
                reason: "no certificate found".into(),
            });
        }
        Ok(Arc::new(roots))
    }

    fn roots_der(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        CertificateDer::pem_slice_iter(self.ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "ca".into(),
                reason: e.to_string(),
            })
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "certificate".into(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate".into(),
                reason: "no certificate found".into(),
            });
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "key".into(),
            reason: e.to_string(),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS 1.3 session store (rustls' in-memory cache of 256 sessions), counting
/// the sessions that a returning client resumed.
///
/// With rustls' default `ticketer` (none), TLS 1.3 tickets are stateful: a ticket is a key
/// into this store, and a client that resumes presents it, which `take`s the session out.
#[derive(Debug)]
struct CountingSessionStore {
    inner: Arc<dyn rustls::server::StoresServerSessions>,
    resumed: Arc<AtomicU64>,
}

impl rustls::server::StoresServerSessions for CountingSessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let found = self.inner.take(key);
        if found.is_some() {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// ALPN of enrollment connections: server-authenticated only, one join request each.
pub const ENROLL_ALPN: &[u8] = b"symphony-enroll/1";

/// Node ids whose certificates are refused (revoked), shared by the conductor's certificate
/// verifier and whoever revokes.
pub type RevokedSet = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

/// The conductor's QUIC crypto. On ALPN `symphony/1` a client certificate issued by the CA is
/// required (the server refuses a connection without one once the handshake is done), and one
/// naming a revoked node is refused in the handshake; on [`ENROLL_ALPN`] a node without a
/// certificate may ask to join. The chain sent includes the CA certificate, so an enrolling
/// node can check it against the hash its token pins. `resumed` counts handshakes that resumed
/// an earlier session (a reconnecting node skips the certificate exchange; its identity comes
/// from the resumed session).
pub fn server_crypto(
    m: &TlsMaterial,
    resumed: Arc<AtomicU64>,
    revoked: RevokedSet,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = provider();
    let inner =
        rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots()?, provider.clone())
            .allow_unauthenticated()
            .build()?;
    let verifier = Arc::new(RevocationCheck { inner, revoked });
    let mut chain = m.chain()?;
    chain.extend(m.roots_der()?);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, m.key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec(), ENROLL_ALPN.to_vec()];
    tls.session_storage = Arc::new(CountingSessionStore {
        inner: rustls::server::ServerSessionMemoryCache::new(256),
        resumed,
    });
    // Resumption (1-RTT, tickets) is on by default; 0-RTT stays off: with client certificates
    // it would skip re-verification and replay is possible.
    Ok(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(
        tls,
    )?))
}

/// A node's QUIC crypto: trusts only the CA, presents the node certificate.
pub fn client_crypto(
    m: &TlsMaterial,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(m.roots()?)
        .with_client_auth_cert(m.chain()?, m.key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
        tls,
    )?))
}

/// ALPN of direct node-to-node connections (the mesh's direct path).
pub const PEER_ALPN: &[u8] = b"symphony-peer/1";

/// A node's crypto for direct connections it accepts: presents its node certificate and
/// requires the dialer's, issued by the same CA. Which node may connect is checked after the
/// handshake (the identity must be one the conductor told this node to expect).
pub fn peer_server_crypto(
    m: &TlsMaterial,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots()?, provider.clone())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain()?, m.key()?)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Ok(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(
        tls,
    )?))
}

/// A node's crypto for dialling another node: presents its node certificate, and accepts only
/// a node certificate of the CA whose identity is `expected` (node certificates name a node in
/// a URI SAN, not a DNS name, so rustls' name check cannot apply).
pub fn peer_client_crypto(
    m: &TlsMaterial,
    expected: &str,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
    let provider = provider();
    let verifier = ServerVerifier {
        expect: Expect::Node {
            roots: m.roots()?,
            id: expected.to_owned(),
        },
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(m.chain()?, m.key()?)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    // Every dial checks the peer's certificate: a resumed session would skip the verifier
    // (and peers share one server name).
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
        tls,
    )?))
}

/// Who a server this end dials must be.
#[derive(Debug)]
enum Expect {
    /// Another node: its chain leads to the CA (for client-auth use, as node certificates
    /// are issued) and its certificate names `id`.
    Node {
        roots: Arc<rustls::RootCertStore>,
        id: String,
    },
    /// The conductor, seen by a node without a certificate yet: the chain it sends includes
    /// a CA certificate whose SHA-256 is the pin, and its server certificate chains to it.
    /// No name check: a pod may reach the conductor by an address its certificate does not
    /// list; the pinned CA issues server certificates to the conductor only (node
    /// certificates are for client auth and fail the usage check).
    PinnedCa([u8; 32]),
}

/// Verifies a server's certificate by [`Expect`] (rustls' own verifier checks DNS names,
/// which node certificates and pinned conductors do not use).
#[derive(Debug)]
struct ServerVerifier {
    expect: Expect,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let invalid = |e: webpki::Error| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(invalid)?;
        let algs = self.provider.signature_verification_algorithms.all;
        match &self.expect {
            Expect::Node { roots, id } => {
                cert.verify_for_usage(
                    algs,
                    &roots.roots,
                    intermediates,
                    now,
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map_err(invalid)?;
                match crate::pki::node_id_from_cert(end_entity.as_ref()) {
                    Ok(found) if found == *id => {}
                    _ => {
                        return Err(rustls::Error::InvalidCertificate(
                            rustls::CertificateError::NotValidForName,
                        ));
                    }
                }
            }
            Expect::PinnedCa(pin) => {
                let Some(ca) = intermediates
                    .iter()
                    .find(|c| crate::pki::fingerprint_der(c.as_ref()) == *pin)
                else {
                    return Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ApplicationVerificationFailure,
                    ));
                };
                let anchor = webpki::anchor_from_trusted_cert(ca).map_err(invalid)?;
                cert.verify_for_usage(
                    algs,
                    &[anchor],
                    &[],
                    now,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                )
                .map_err(invalid)?;
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client-certificate verifier of the conductor: the CA's chain check, then a refusal of
/// certificates whose node is revoked.
#[derive(Debug)]
struct RevocationCheck {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: RevokedSet,
}

impl rustls::server::danger::ClientCertVerifier for RevocationCheck {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let revoked = crate::pki::node_id_from_cert(end_entity.as_ref())
            .is_ok_and(|id| self.revoked.read().map_or(true, |set| set.contains(&id)));
        if revoked {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An enrolling node's crypto: no client certificate; the server's chain must include a CA
/// certificate whose SHA-256 is `pin`, and the server certificate must chain to it and name
/// `server_name`. Nothing is sent before this check passes (it runs in the handshake).
pub fn enroll_client_crypto(
    pin: [u8; 32],
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
    let provider = provider();
    let verifier = ServerVerifier {
        expect: Expect::PinnedCa(pin),
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
        tls,
    )?))
}
