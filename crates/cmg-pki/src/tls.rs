//! TLS server configurations for the site's HTTPS endpoints.
//!
//! Devices present self-signed certificates (DESIGN §4), which no CA vouches for; what matters is
//! that the TLS handshake's CertificateVerify signature proves the device holds the private key,
//! and that the certificate's thumbprint is the one its token is bound to. [`AnyClientCertificate`]
//! therefore accepts any well-formed client certificate and still checks the handshake signature.
//! It does not make a client certificate mandatory, so a server can answer a device without one
//! with a clear HTTP error instead of a failed handshake.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::PkiError;

/// Accepts any parseable X.509 client certificate; proof of possession comes from the handshake.
#[derive(Debug)]
pub struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyClientCertificate {
    pub fn new(provider: &CryptoProvider) -> Self {
        AnyClientCertificate {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        x509_parser::parse_x509_certificate(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn invalid(what: &str, e: &dyn std::fmt::Display) -> PkiError {
    PkiError::InvalidCertificate {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// A certificate chain and its private key, both PEM; `role` names them in errors.
fn chain_and_key(
    cert_pem: &str,
    key_pem: &str,
    role: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&format!("the {role} certificate"), &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        PkiError::InvalidKeyFile {
            what: format!("the {role} key"),
            reason: e.to_string(),
        }
    })?;
    Ok((chain, key))
}

/// Every certificate in the PEM texts, as trust anchors.
fn root_store(pems: &[&str], what: &str) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| invalid(what, &e))?;
            roots.add(cert).map_err(|e| invalid(what, &e))?;
        }
    }
    if roots.is_empty() {
        return Err(invalid(what, &"no CERTIFICATE block found"));
    }
    Ok(roots)
}

/// A server configuration with this certificate chain and key (PEM), asking every client for a
/// certificate without requiring one, speaking HTTP/2 and HTTP/1.1, TLS 1.2 and 1.3.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, PkiError> {
    server_config_min_tls(cert_pem, key_pem, "1.2", &[b"h2", b"http/1.1"])
}

/// The gateway's device-facing configuration (DESIGN §4): like [`server_config`], but with the
/// CMG's minimum TLS version (`"1.2"` or `"1.3"`, from the gateway settings) and the
/// application protocols offered (ALPN). Any other version is refused rather than guessed.
pub fn server_config_min_tls(
    cert_pem: &str,
    key_pem: &str,
    min_tls: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, PkiError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match min_tls {
        "1.2" => rustls::DEFAULT_VERSIONS,
        "1.3" => &[&rustls::version::TLS13],
        other => {
            return Err(invalid(
                "the minimum TLS version",
                &format!("'{other}' is neither \"1.2\" nor \"1.3\""),
            ));
        }
    };
    let (chain, key) = chain_and_key(cert_pem, key_pem, "server")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyClientCertificate::new(&provider));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| invalid("the TLS configuration", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("the server certificate and key", &e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration presenting this certificate chain and key (PEM), trusting only the
/// given root certificates (PEM) for the server: the connection point's side of a tunnel
/// (DESIGN §6).
pub fn client_config(
    cert_pem: &str,
    key_pem: &str,
    roots_pem: &[&str],
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, "client")?;
    let roots = root_store(roots_pem, "a trusted root")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("the TLS configuration", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid("the client certificate and key", &e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The gateway's tunnel port (DESIGN §6): this certificate chain and key (PEM), and a client
/// certificate is *required* and must chain to one of the site roots in `site_root_pem` (with
/// the clientAuth key usage), so only the site's connection points can open a tunnel. HTTP/2
/// only.
pub fn tunnel_server_config(
    cert_pem: &str,
    key_pem: &str,
    site_root_pem: &str,
) -> Result<Arc<ServerConfig>, PkiError> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, "server")?;
    let roots = root_store(&[site_root_pem], "the site root")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| invalid("the site root", &e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("the TLS configuration", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("the server certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
