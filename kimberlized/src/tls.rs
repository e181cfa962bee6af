//! Mutual TLS for the daemon and its clients (rustls, ring): PEM files in,
//! a server that refuses any client without a certificate from the trusted
//! CA at the handshake, a client that refuses any daemon whose certificate
//! does not chain to its CA and name the address it dialled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

/// What went wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read or held none.
    #[error("reading certificates from {0}: {1}")]
    ReadCerts(PathBuf, String),
    /// A private key file could not be read or held none.
    #[error("reading the private key from {0}: {1}")]
    ReadKey(PathBuf, String),
    /// The CA file held a certificate that cannot be a trust anchor.
    #[error("the CA certificate in {0} cannot be used: {1}")]
    BadCa(PathBuf, String),
    /// rustls refused the configuration (a key that does not match its
    /// certificate, ...).
    #[error("setting up TLS: {0}")]
    Config(String),
    /// The name the client expects in the daemon's certificate.
    #[error("{0:?} is not a valid server name (a DNS name or an IP address)")]
    ServerName(String),
}

/// Every certificate in the PEM file `path`, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e: String| TlsError::ReadCerts(path.to_path_buf(), e);
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::ReadKey(path.to_path_buf(), e.to_string()))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::BadCa(ca.to_path_buf(), e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a side's certificate chain, its key and the CA it trusts are.
#[derive(Debug, Clone)]
pub struct Identity {
    /// PEM: this side's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
    /// PEM: the CA certificate(s) the other side's certificate must chain to.
    pub ca: PathBuf,
}

/// The daemon's TLS: its certificate, and client certificates required
/// and checked against `id.ca` during the handshake (a client without one,
/// or with one from another CA, never gets to send a request).
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&id.cert)?, load_key(&id.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The client's TLS: the daemon's certificate must chain to `id.ca` (and
/// name the server name dialled); this side presents `id.cert`.
pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(load_certs(&id.cert)?, load_key(&id.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// `name` (a DNS name or an IP address) as the name the daemon's
/// certificate must carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.trim_end_matches('.').to_string())
        .map_err(|_| TlsError::ServerName(name.to_string()))
}

/// A certificate's SHA-256 fingerprint in hex: how the daemon names the
/// device a client certificate identifies.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    kimberley_formats::digest::hex(&Sha256::digest(cert.as_ref()))
}
