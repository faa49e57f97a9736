//! The site's certificates: generating the site issuing root and the certificates it signs
//! (token signing, management point, connection point; DESIGN §3.1), thumbprints, and writing
//! private key files with owner-only permissions.
//!
//! This crate owns X.509 and key material. It must not sign or verify tokens (`cmg-token`),
//! decide policy, or touch the database. Later it also owns chain and CRL verification for the
//! gateway (DESIGN §4), and reading the CMG server certificate from a PFX (PKCS#12) file
//! ([`pfx`]).

pub mod crl;
pub mod pfx;
pub mod tls;

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

pub use pfx::{PfxContents, PfxError};

/// What went wrong while making or reading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not generate a {0} key pair: {1}")]
    KeyGeneration(KeyAlgorithm, rcgen::Error),
    #[error("could not create the {what} certificate: {source}")]
    Certificate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{what} is not a valid PEM private key: {source}")]
    InvalidKey { what: String, source: rcgen::Error },
    #[error("{what} is not a PKCS#8 private key: {reason}")]
    InvalidKeyFile { what: String, reason: String },
    #[error("{what} is not a valid certificate: {reason}")]
    InvalidCertificate { what: String, reason: String },
    #[error("{what} is not a valid CRL: {reason}")]
    InvalidCrl { what: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Key type of a certificate the site makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (tokens: `ES256`). The default.
    EcdsaP256,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 (tokens: `RS256`, the algorithm ConfigMgr documents).
    Rsa2048,
}

impl KeyAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
        }
    }

    fn generate(self) -> Result<KeyPair, PkiError> {
        match self {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
        }
        .map_err(|e| PkiError::KeyGeneration(self, e))
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "es256" => Ok(KeyAlgorithm::EcdsaP256),
            "rsa-2048" | "rs256" => Ok(KeyAlgorithm::Rsa2048),
            other => Err(format!(
                "unknown key algorithm '{other}': use ecdsa-p256 (default) or rsa-2048"
            )),
        }
    }
}

/// What a certificate issued by the site root is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// "SMS Token Signing Certificate": signs every token.
    TokenSigning,
    /// "SMS Role SSL Certificate" of a management point, for these host names.
    ManagementPoint { hostnames: Vec<String> },
    /// The connection point's client certificate for the tunnel (DESIGN §6).
    ConnectionPoint,
}

impl Role {
    fn label(&self) -> &'static str {
        match self {
            Role::TokenSigning => "Token Signing",
            Role::ManagementPoint { .. } => "Role SSL",
            Role::ConnectionPoint => "Connection Point",
        }
    }
}

/// Site root lifetime; leaves are renewed long before it ends.
const ROOT_VALIDITY: Duration = Duration::days(20 * 365);
/// Lifetime of a certificate issued by the site root.
pub const LEAF_VALIDITY: Duration = Duration::days(2 * 365);
/// Tolerate clocks that run a little behind ours.
const BACKDATE: Duration = Duration::minutes(10);

/// A certificate with its private key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Credential {
    cert_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("thumbprint_sha256", &thumbprint_sha256(&self.cert_der))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Credential {
    fn new(cert: &rcgen::Certificate, key: &KeyPair) -> Self {
        Credential {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// PKCS#8 PEM of the private key. Write it only with [`write_private_file`].
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    pub fn info(&self) -> Result<CertInfo, PkiError> {
        CertInfo::from_der(&self.cert_der)
    }
}

/// The site issuing root ("SMS Issuing") and the key that signs the site's certificates.
pub struct SiteAuthority {
    credential: Credential,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for SiteAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteAuthority")
            .field("credential", &self.credential)
            .finish()
    }
}

impl SiteAuthority {
    /// Makes a new site root for the site `site_code`.
    pub fn generate(site_code: &str) -> Result<Self, PkiError> {
        let key = KeyAlgorithm::EcdsaP256.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("{site_code} SMS Issuing"), site_code);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, ROOT_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Certificate {
                what: "site root",
                source,
            })?;
        let credential = Credential::new(&cert, &key);
        Ok(SiteAuthority {
            credential,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a site root written earlier by [`SiteAuthority::generate`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::InvalidKey {
            what: "the site root key".into(),
            source,
        })?;
        let cert_der = pem_to_der(cert_pem, "the site root certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key).map_err(|e| {
            PkiError::InvalidCertificate {
                what: "the site root".into(),
                reason: e.to_string(),
            }
        })?;
        let credential = Credential {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        };
        Ok(SiteAuthority { credential, issuer })
    }

    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// Issues a certificate for `role` with a fresh key of type `alg`.
    pub fn issue(
        &self,
        site_code: &str,
        role: &Role,
        alg: KeyAlgorithm,
    ) -> Result<Credential, PkiError> {
        let key = alg.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("{site_code} SMS {}", role.label()), site_code);
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);
        match role {
            Role::TokenSigning => {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            }
            Role::ManagementPoint { hostnames } => {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.subject_alt_names = hostnames
                    .iter()
                    .map(|h| san(h))
                    .collect::<Result<_, _>>()
                    .map_err(|source| PkiError::Certificate {
                        what: "management point",
                        source,
                    })?;
            }
            Role::ConnectionPoint => {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let cert =
            params
                .signed_by(&key, &self.issuer)
                .map_err(|source| PkiError::Certificate {
                    what: role.label(),
                    source,
                })?;
        Ok(Credential::new(&cert, &key))
    }
}

/// Lifetime of a device's self-signed certificate; its client token, not the certificate,
/// limits what it may do.
pub const DEVICE_CERT_VALIDITY: Duration = Duration::days(5 * 365);

/// A device's self-signed client authentication certificate (DESIGN §4, §7), with a new key.
pub fn self_signed_device(common_name: &str, alg: KeyAlgorithm) -> Result<Credential, PkiError> {
    let key = alg.generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, DEVICE_CERT_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Certificate {
            what: "device",
            source,
        })?;
    Ok(Credential::new(&cert, &key))
}

fn name(common_name: &str, site_code: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(
        DnType::OrganizationalUnitName,
        format!("cmg site {site_code}"),
    );
    dn
}

fn san(host: &str) -> Result<rcgen::SanType, rcgen::Error> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
        Err(_) => Ok(rcgen::SanType::DnsName(host.try_into()?)),
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

/// Decodes the first `CERTIFICATE` block of a PEM text.
pub fn pem_to_der(pem: &str, what: &str) -> Result<Vec<u8>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::InvalidCertificate {
            what: what.into(),
            reason: e.to_string(),
        })
}

/// Decodes a PKCS#8 `PRIVATE KEY` PEM block (as [`Credential::key_pem`] writes it) to DER.
pub fn key_pem_to_pkcs8(pem: &str, what: &str) -> Result<Vec<u8>, PkiError> {
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(|k| k.secret_pkcs8_der().to_vec())
        .map_err(|e| PkiError::InvalidKeyFile {
            what: what.into(),
            reason: e.to_string(),
        })
}

/// Base64url (unpadded) SHA-256 of a certificate's DER: the token `kid` and `cnf` value.
pub fn thumbprint_sha256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// Base64url (unpadded) SHA-1 of a certificate's DER: the JWS `x5t` header.
pub fn thumbprint_sha1(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        der,
    ))
}

/// The DNS names a certificate is for: its subject alternative names, else its common name.
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, PkiError> {
    let invalid = |reason: String| PkiError::InvalidCertificate {
        what: "certificate".into(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| invalid(e.to_string()))?;
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .map_err(|e| invalid(e.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
    }
    Ok(names)
}

/// Whether a certificate name covers `host`: equal (ignoring case), or a wildcard `*.example.com`
/// covering exactly one more label (`cmg.example.com`, not `a.b.example.com`).
pub fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Counts the self-signed (root) and other (intermediate) CA certificates in PEM texts.
pub fn count_roots(pems: &[String]) -> Result<(usize, usize), PkiError> {
    let mut counts = (0, 0);
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| PkiError::InvalidCertificate {
                what: "a trusted CA".into(),
                reason: e.to_string(),
            })?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|e| {
                PkiError::InvalidCertificate {
                    what: "a trusted CA".into(),
                    reason: e.to_string(),
                }
            })?;
            if parsed.subject() == parsed.issuer() {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
    }
    Ok(counts)
}

/// The raw DER of a certificate's subject and issuer names (as chain building compares them).
pub fn subject_and_issuer_der(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::InvalidCertificate {
            what: "certificate".into(),
            reason: e.to_string(),
        })?;
    Ok((
        cert.subject().as_raw().to_vec(),
        cert.issuer().as_raw().to_vec(),
    ))
}

/// The facts about a certificate that the site records and shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::InvalidCertificate {
                what: "certificate".into(),
                reason: e.to_string(),
            })?;
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// Writes a secret (a private key, a token) so that only the owner can read it: the file is
/// created with mode 0600 under a temporary name, synced, then renamed into place, so a crash
/// never leaves a half-written or world-readable key behind.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let fail = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(fail)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_issues_role_certificates_that_chain_to_it() {
        let root = SiteAuthority::generate("ABC").unwrap();
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
            let leaf = root.issue("ABC", &Role::TokenSigning, alg).unwrap();
            let (_, parsed) = x509_parser::parse_x509_certificate(leaf.cert_der()).unwrap();
            let (_, ca) =
                x509_parser::parse_x509_certificate(root.credential().cert_der()).unwrap();
            assert_eq!(parsed.issuer(), ca.subject());
            parsed.verify_signature(Some(ca.public_key())).unwrap();
            assert!(leaf.key_pem().contains("PRIVATE KEY"));
            assert!(
                !format!("{leaf:?}").contains("PRIVATE"),
                "Debug must not show the key"
            );
        }
    }

    #[test]
    fn a_loaded_root_keeps_issuing_under_the_same_name() {
        let root = SiteAuthority::generate("XYZ").unwrap();
        let loaded =
            SiteAuthority::load(root.credential().cert_pem(), root.credential().key_pem()).unwrap();
        let mp = loaded
            .issue(
                "XYZ",
                &Role::ManagementPoint {
                    hostnames: vec!["127.0.0.1".into()],
                },
                KeyAlgorithm::EcdsaP256,
            )
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(mp.cert_der()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(root.credential().cert_der()).unwrap();
        parsed.verify_signature(Some(ca.public_key())).unwrap();
        assert!(
            CertInfo::from_der(mp.cert_der())
                .unwrap()
                .subject
                .contains("XYZ SMS Role SSL")
        );
    }

    #[test]
    fn thumbprints_are_unpadded_base64url_of_the_digest() {
        assert_eq!(
            thumbprint_sha256(b"abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
        assert_eq!(thumbprint_sha1(b"abc"), "qZk-NkcGgWq6PiVxeFDCbJzQ2J0");
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        assert!(name_matches("*.contoso.com", "cmg.contoso.com"));
        assert!(name_matches("cmg.contoso.com", "CMG.contoso.com"));
        assert!(!name_matches("*.contoso.com", "a.b.contoso.com"));
        assert!(!name_matches("*.contoso.com", "contoso.com"));
        assert!(!name_matches("cmg.contoso.com", "other.contoso.com"));
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_private_file(&path, b"secret").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert!(!path.with_extension("tmp").exists());
    }
}
