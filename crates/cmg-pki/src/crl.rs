//! Reading certificate revocation lists and where certificates say to fetch them (DESIGN §4).
//! Verification against CRLs is the gateway's (rustls-webpki); this module only parses.

use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;

use crate::PkiError;

/// The facts about a CRL that the gateway logs and schedules refreshes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The issuing CA's distinguished name.
    pub issuer: String,
    /// How many certificates it revokes.
    pub entries: usize,
    /// Unix seconds.
    pub this_update: i64,
    /// Unix seconds; `None` when the CRL does not say (it never goes stale).
    pub next_update: Option<i64>,
}

impl CrlInfo {
    /// Parses one DER CRL.
    pub fn from_der(der: &[u8]) -> Result<CrlInfo, PkiError> {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| PkiError::InvalidCrl {
            what: "the CRL".into(),
            reason: e.to_string(),
        })?;
        Ok(CrlInfo {
            issuer: crl.issuer().to_string(),
            entries: crl.iter_revoked_certificates().count(),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
        })
    }
}

/// The DER CRLs in a file's contents: PEM (`X509 CRL` blocks, any number) or one DER CRL.
/// `what` names the source in errors.
pub fn crls_from_pem_or_der(bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let invalid = |reason: String| PkiError::InvalidCrl {
        what: what.into(),
        reason,
    };
    if bytes.first() == Some(&0x30) {
        x509_parser::parse_x509_crl(bytes).map_err(|e| invalid(e.to_string()))?;
        return Ok(vec![bytes.to_vec()]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .map(|crl| crl.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    if crls.is_empty() {
        return Err(invalid(
            "neither a DER CRL nor PEM with an 'X509 CRL' block".into(),
        ));
    }
    for crl in &crls {
        x509_parser::parse_x509_crl(crl).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(crls)
}

/// The URIs of a certificate's CRL distribution points (full names only), in order.
pub fn crl_distribution_points(cert_der: &[u8]) -> Result<Vec<String>, PkiError> {
    use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
        PkiError::InvalidCertificate {
            what: "certificate".into(),
            reason: e.to_string(),
        }
    })?;
    let mut urls = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() {
            for point in points.iter() {
                if let Some(DistributionPointName::FullName(names)) = &point.distribution_point {
                    for name in names {
                        if let GeneralName::URI(uri) = name
                            && !urls.iter().any(|u| u == uri)
                        {
                            urls.push((*uri).to_owned());
                        }
                    }
                }
            }
        }
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint,
        IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    use time::{Duration, OffsetDateTime};

    #[test]
    fn crls_and_distribution_points_are_read() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let mut leaf = CertificateParams::new(vec![]).unwrap();
        leaf.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec!["http://127.0.0.1:1/ca.crl".into(), "ldap://x".into()],
        }];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        assert_eq!(
            crl_distribution_points(leaf.der()).unwrap(),
            vec!["http://127.0.0.1:1/ca.crl", "ldap://x"]
        );
        assert!(crl_distribution_points(ca_cert.der()).unwrap().is_empty());

        let now = OffsetDateTime::now_utc();
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::hours(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(7u64),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .unwrap();
        let der = crls_from_pem_or_der(crl.der(), "der").unwrap();
        let pem = crls_from_pem_or_der(crl.pem().unwrap().as_bytes(), "pem").unwrap();
        assert_eq!(der, pem);
        let info = CrlInfo::from_der(&der[0]).unwrap();
        assert_eq!(info.entries, 1);
        assert_eq!(
            info.next_update,
            Some((now + Duration::hours(1)).unix_timestamp())
        );
        assert!(crls_from_pem_or_der(b"junk", "junk").is_err());
        assert!(crls_from_pem_or_der(ca_cert.pem().as_bytes(), "cert").is_err());
    }
}
