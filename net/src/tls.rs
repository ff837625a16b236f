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

/// The conductor's QUIC crypto: requires a client certificate issued by the CA. `resumed`
/// counts handshakes that resumed an earlier session (a reconnecting node skips the
/// certificate exchange; its identity comes from the resumed session).
pub fn server_crypto(
    m: &TlsMaterial,
    resumed: Arc<AtomicU64>,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots()?, provider.clone())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain()?, m.key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
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
