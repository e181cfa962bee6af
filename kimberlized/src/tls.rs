//! Mutual TLS for the daemon and its clients (rustls, ring): PEM files in,
//! a server that refuses any client without a certificate from the trusted
//! CA (or pinned by its fingerprint) at the handshake, a client that
//! refuses any daemon whose certificate is not pinned and does not chain to
//! its CA and name the address it dialled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
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
    /// Neither a CA nor a pinned certificate: nobody would be trusted.
    #[error("no trust: give a CA certificate or pin at least one certificate")]
    NoTrust,
}

/// A certificate pinned by the SHA-256 digest of its DER encoding.
pub type Pin = [u8; 32];

/// Parses a pin: the SHA-256 fingerprint of a certificate's DER encoding
/// as 64 hex digits, in either case, with or without `:` between bytes
/// (what `openssl x509 -noout -fingerprint -sha256` prints after the `=`,
/// and what [`fingerprint`] returns).
pub fn parse_pin(s: &str) -> Result<Pin, String> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    let bad =
        || format!("{s:?} is not a SHA-256 fingerprint (64 hex digits, ':' allowed between bytes)");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut pin = [0u8; 32];
    for (i, b) in pin.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(pin)
}

fn is_pinned(pins: &[Pin], cert: &CertificateDer<'_>) -> bool {
    let d: [u8; 32] = Sha256::digest(cert.as_ref()).into();
    pins.contains(&d)
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a side's certificate chain and its key are, and whom it trusts:
/// certificates chaining to a CA, certificates pinned by fingerprint, or
/// both (either one suffices). At least one of the two must be given.
#[derive(Debug, Clone)]
pub struct Identity {
    /// PEM: this side's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
    /// PEM: the CA certificate(s) the other side's certificate may chain to.
    pub ca: Option<PathBuf>,
    /// The other side's certificates trusted by fingerprint, whoever
    /// issued them (their issuer, names and validity are not checked;
    /// the handshake still proves the other side holds the key).
    pub pins: Vec<Pin>,
}

/// Client certificates: pinned ones, else those chaining to the CA.
#[derive(Debug)]
struct ClientVerifier {
    ca: Option<Arc<dyn ClientCertVerifier>>,
    pins: Vec<Pin>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // With pins, clients must not drop a self-signed certificate that
        // matches no hinted CA: send no hints then.
        match &self.ca {
            Some(ca) if self.pins.is_empty() => ca.root_hint_subjects(),
            _ => &[],
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if is_pinned(&self.pins, end_entity) {
            return Ok(ClientCertVerified::assertion());
        }
        match &self.ca {
            Some(ca) => ca.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The daemon's certificate: pinned, else chaining to the CA and naming
/// the server name dialled.
#[derive(Debug)]
struct ServerVerifier {
    ca: Option<Arc<WebPkiServerVerifier>>,
    pins: Vec<Pin>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if is_pinned(&self.pins, end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.ca {
            Some(ca) => {
                ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The daemon's TLS: its certificate, and client certificates required
/// and checked during the handshake against `id.pins`, then `id.ca` (a
/// client without one, or with one neither pinned nor from the CA, never
/// gets to send a request).
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let ca: Option<Arc<dyn ClientCertVerifier>> = match &id.ca {
        Some(ca) => Some(
            WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?,
        ),
        None if id.pins.is_empty() => return Err(TlsError::NoTrust),
        None => None,
    };
    let verifier = Arc::new(ClientVerifier {
        ca,
        pins: id.pins.clone(),
        provider: provider(),
    });
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&id.cert)?, load_key(&id.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The client's TLS: the daemon's certificate must be one of `id.pins`,
/// or chain to `id.ca` and name the server name dialled; this side
/// presents `id.cert`.
pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = match &id.ca {
        Some(ca) => Some(
            WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?,
        ),
        None if id.pins.is_empty() => return Err(TlsError::NoTrust),
        None => None,
    };
    let verifier = Arc::new(ServerVerifier {
        ca,
        pins: id.pins.clone(),
        provider: provider(),
    });
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_both_spellings() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&hex), Ok([0xab; 32]));
        assert_eq!(parse_pin(&colons), Ok([0xab; 32]));
        for bad in [
            "",
            "ab",
            &"ab".repeat(33),
            &"zz".repeat(32),
            &"é".repeat(32),
        ] {
            assert!(parse_pin(bad).is_err(), "{bad:?}");
        }
    }
}
