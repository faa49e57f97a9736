//! PKI client certificates (DESIGN §4, first row): a device whose certificate chains to a
//! trusted CA of this CMG and is not revoked needs no token.
//!
//! The TLS handshake accepts any certificate (token clients present self-signed ones) and proves
//! key possession; the chain and CRL decision is made here, once per connection, with
//! rustls-webpki. Pure functions: the CRLs come from [`crate::crl`].

use std::sync::Arc;

use hyper::StatusCode;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::error::Denial;

/// The trusted CAs of the settings in force, parsed once per settings version.
#[derive(Debug)]
pub(crate) struct TrustStore {
    /// Self-signed CAs, and listed intermediates whose issuer is not listed (a chain may end at
    /// a trusted intermediate).
    anchors: Vec<TrustAnchor<'static>>,
    /// Listed intermediates whose issuer is listed too: used for path building only, so their
    /// own revocation can be checked against their issuer's CRL.
    intermediates: Vec<CertificateDer<'static>>,
    /// CRL distribution points of the trusted CAs.
    pub cdp_urls: Vec<String>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
}

struct Parsed {
    der: CertificateDer<'static>,
    subject: Vec<u8>,
    issuer: Vec<u8>,
}

impl TrustStore {
    /// Builds the store from PEM texts; unusable certificates are skipped and described. `None`
    /// when no CA is usable (then no device is a PKI device).
    pub fn new(pems: &[String]) -> (Option<TrustStore>, Vec<String>) {
        use rustls::pki_types::pem::PemObject;
        let mut problems = Vec::new();
        let mut parsed = Vec::new();
        for (i, pem) in pems.iter().enumerate() {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = match cert {
                    Ok(der) => der,
                    Err(e) => {
                        problems.push(format!("trusted CA {i} is not PEM: {e}"));
                        continue;
                    }
                };
                match cert_names(&der) {
                    Some((subject, issuer)) => parsed.push(Parsed {
                        der,
                        subject,
                        issuer,
                    }),
                    None => problems.push(format!("trusted CA {i} is not an X.509 certificate")),
                }
            }
        }
        let mut anchors = Vec::new();
        let mut intermediates = Vec::new();
        let mut cdp_urls = Vec::new();
        for p in &parsed {
            let issuer_listed =
                p.issuer != p.subject && parsed.iter().any(|other| other.subject == p.issuer);
            if let Ok(urls) = cmg_pki::crl::crl_distribution_points(&p.der) {
                for url in urls {
                    if !cdp_urls.contains(&url) {
                        cdp_urls.push(url);
                    }
                }
            }
            if issuer_listed {
                intermediates.push(p.der.clone());
                continue;
            }
            match webpki::anchor_from_trusted_cert(&p.der) {
                Ok(anchor) => anchors.push(anchor.to_owned()),
                Err(e) => problems.push(format!(
                    "trusted CA {} cannot be a trust anchor: {e}",
                    describe(&p.der)
                )),
            }
        }
        if anchors.is_empty() {
            return (None, problems);
        }
        let algorithms = rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        (
            Some(TrustStore {
                anchors,
                intermediates,
                cdp_urls,
                algorithms,
            }),
            problems,
        )
    }

    /// How many trust anchors and intermediates.
    pub fn counts(&self) -> (usize, usize) {
        (self.anchors.len(), self.intermediates.len())
    }
}

fn cert_names(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    cmg_pki::subject_and_issuer_der(der).ok()
}

fn describe(der: &[u8]) -> String {
    cmg_pki::CertInfo::from_der(der).map_or_else(|_| "?".to_owned(), |i| i.subject)
}

/// What the chain and CRL check decided about a connection's client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Chains to a trusted CA and is not revoked (or CRLs are off): a PKI device.
    Trusted { subject: String },
    /// Does not chain to a trusted CA (or no CA is trusted): the token rules apply.
    NotTrusted { reason: String },
    /// Chains to a trusted CA and a CRL revokes it (or a CA in its chain).
    Revoked { reason: String },
    /// Chains to a trusted CA, the CRL check is on, and no usable CRL tells its status.
    Unknown { reason: String },
}

impl Verdict {
    /// The refusal, for the verdicts that refuse (never falling back to the token).
    pub fn denial(&self) -> Option<Denial> {
        match self {
            Verdict::Trusted { .. } | Verdict::NotTrusted { .. } => None,
            Verdict::Revoked { reason } => Some(
                Denial::new(
                    StatusCode::FORBIDDEN,
                    "CMGService_Certificate_Revoked",
                    format!("the client certificate is revoked: {reason}"),
                    "enroll the device for a new certificate from the CA",
                )
                .with_rule("certificate_revoked"),
            ),
            Verdict::Unknown { reason } => Some(
                Denial::new(
                    StatusCode::FORBIDDEN,
                    "CMGService_Revocation_Unknown",
                    format!(
                        "the revocation status of the client certificate cannot be determined: \
                         {reason}"
                    ),
                    "the admin makes the issuing CA's CRL reachable over HTTP from the gateway \
                     (or lists it in crl_files), or turns the CRL check off for this CMG",
                )
                .with_rule("revocation_unknown"),
            ),
        }
    }
}

/// The chain check alone (no CRL): `Ok(subject)` if `chain[0]` chains to a trusted CA for
/// client authentication, the rest of `chain` (the intermediates the device sent) helping to
/// build the path.
pub(crate) fn chain_check(
    store: &TrustStore,
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<String, String> {
    verify(store, chain, None, now)
        .map(|()| describe(&chain[0]))
        .map_err(|e| e.to_string())
}

fn verify(
    store: &TrustStore,
    chain: &[CertificateDer<'static>],
    revocation: Option<webpki::RevocationOptions<'_>>,
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let Some((leaf, sent)) = chain.split_first() else {
        return Err(webpki::Error::BadDer);
    };
    let end_entity = EndEntityCert::try_from(leaf)?;
    let intermediates: Vec<CertificateDer<'_>> = sent
        .iter()
        .chain(store.intermediates.iter())
        .cloned()
        .collect();
    end_entity
        .verify_for_usage(
            store.algorithms,
            &store.anchors,
            &intermediates,
            now,
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map(|_| ())
}

/// The full decision for a client certificate chain.
///
/// With `crls` `None` (the CMG's CRL check is off) no CRL is consulted. Otherwise `crls` are the
/// usable CRLs (those past their nextUpdate already left out by the caller, so a stale CRL
/// counts as no CRL). The policies are set deliberately (DESIGN §11):
///
/// - **only the end-entity certificate's status is required**: its issuer's CRL must be there,
///   or the verdict is [`Verdict::Unknown`]; intermediates are checked when their issuer's CRL
///   is there (a revoked intermediate revokes the device) and allowed when it is not
///   (`UnknownStatusPolicy::Allow` for the chain);
/// - **stale CRLs are refused** (`ExpirationPolicy::Enforce`), on top of the caller's filter.
pub(crate) fn decide(
    store: &TrustStore,
    chain: &[CertificateDer<'static>],
    crls: Option<&[Arc<CertRevocationList<'static>>]>,
    now: UnixTime,
) -> Verdict {
    let subject = match chain_check(store, chain, now) {
        Ok(subject) => subject,
        Err(reason) => return Verdict::NotTrusted { reason },
    };
    let Some(crls) = crls else {
        return Verdict::Trusted { subject };
    };
    let refs: Vec<&CertRevocationList<'static>> = crls.iter().map(|c| &**c).collect();
    let Ok(builder) = RevocationOptionsBuilder::new(&refs) else {
        return Verdict::Unknown {
            reason: format!("no CRL is available for {subject}'s issuer"),
        };
    };
    let chain_options = builder
        .with_depth(RevocationCheckDepth::Chain)
        .with_status_policy(UnknownStatusPolicy::Allow)
        .with_expiration_policy(ExpirationPolicy::Enforce)
        .build();
    let end_entity_options = builder
        .with_depth(RevocationCheckDepth::EndEntity)
        .with_status_policy(UnknownStatusPolicy::Deny)
        .with_expiration_policy(ExpirationPolicy::Enforce)
        .build();
    for options in [chain_options, end_entity_options] {
        match verify(store, chain, Some(options), now) {
            Ok(()) => {}
            Err(webpki::Error::CertRevoked) => {
                return Verdict::Revoked {
                    reason: format!("a CRL of its CA revokes {subject} (or a CA in its chain)"),
                };
            }
            Err(webpki::Error::UnknownRevocationStatus) => {
                return Verdict::Unknown {
                    reason: format!("no current CRL is available for {subject}'s issuer"),
                };
            }
            Err(e) => {
                return Verdict::Unknown {
                    reason: format!("checking {subject} against the CRLs failed: {e}"),
                };
            }
        }
    }
    Verdict::Trusted { subject }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SerialNumber,
    };
    use rustls::pki_types::pem::PemObject;
    use time::{Duration, OffsetDateTime};

    fn ca(
        cn: &str,
        parent: Option<&(String, Issuer<'static, KeyPair>)>,
    ) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from(77u64));
        let cert = match parent {
            None => params.self_signed(&key).unwrap(),
            Some((_, issuer)) => params.signed_by(&key, issuer).unwrap(),
        };
        (cert.pem(), Issuer::new(params, key))
    }

    fn leaf(issuer: &Issuer<'static, KeyPair>, serial: u64) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("device {serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        CertificateDer::from(params.signed_by(&key, issuer).unwrap().der().to_vec())
    }

    fn crl(
        issuer: &Issuer<'static, KeyPair>,
        revoked: &[u64],
        next_update: OffsetDateTime,
    ) -> Arc<CertRevocationList<'static>> {
        let now = OffsetDateTime::now_utc();
        let der = CertificateRevocationListParams {
            this_update: next_update - Duration::hours(2),
            next_update,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::hours(3),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .unwrap();
        Arc::new(
            webpki::OwnedCertRevocationList::from_der(der.der())
                .unwrap()
                .into(),
        )
    }

    #[test]
    fn the_end_entity_status_is_required_and_stale_crls_do_not_count() {
        let root = ca("Root", None);
        let issuing = ca("Issuing", Some(&root));
        let other = ca("Other", None);
        let (store, problems) = TrustStore::new(std::slice::from_ref(&root.0));
        let store = store.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let now = UnixTime::now();
        let later = OffsetDateTime::now_utc() + Duration::hours(1);
        let issuing_der = CertificateDer::from_pem_slice(issuing.0.as_bytes()).unwrap();
        let good = vec![leaf(&issuing.1, 1), issuing_der.clone()];
        let bad = vec![leaf(&issuing.1, 2), issuing_der.clone()];
        let current = crl(&issuing.1, &[2], later);

        // CRL check off: chained is enough.
        assert!(matches!(
            decide(&store, &bad, None, now),
            Verdict::Trusted { .. }
        ));
        // On: the issuing CA's CRL decides; the root's CRL (for the intermediate) may be absent.
        let crls = [Arc::clone(&current)];
        assert!(matches!(
            decide(&store, &good, Some(&crls), now),
            Verdict::Trusted { .. }
        ));
        assert!(matches!(
            decide(&store, &bad, Some(&crls), now),
            Verdict::Revoked { .. }
        ));
        // The intermediate is checked when its issuer's CRL is there: a revoked intermediate
        // revokes its devices.
        let root_crl = crl(&root.1, &[], later);
        let crls = [Arc::clone(&current), root_crl];
        assert!(matches!(
            decide(&store, &good, Some(&crls), now),
            Verdict::Trusted { .. }
        ));
        let revoking_root_crl = crl(&root.1, &[77], later);
        let revoking = [Arc::clone(&current), revoking_root_crl];
        assert!(matches!(
            decide(&store, &good, Some(&revoking), now),
            Verdict::Revoked { .. }
        ));
        // No CRL for the end entity's issuer, or only a stale one: unknown, never trusted.
        assert!(matches!(
            decide(&store, &good, Some(&[]), now),
            Verdict::Unknown { .. }
        ));
        let stale = crl(
            &issuing.1,
            &[],
            OffsetDateTime::now_utc() - Duration::minutes(1),
        );
        assert!(matches!(
            decide(&store, &good, Some(&[stale]), now),
            Verdict::Unknown { .. }
        ));
        // Another CA, or no intermediate sent: not trusted (the token rules apply).
        let stranger = vec![leaf(&other.1, 3)];
        assert!(matches!(
            decide(&store, &stranger, Some(&crls), now),
            Verdict::NotTrusted { .. }
        ));
        assert!(matches!(
            decide(&store, &good[..1], None, now),
            Verdict::NotTrusted { .. }
        ));
        // Listing the intermediate too lets the device send only its own certificate.
        let (both, _) = TrustStore::new(&[format!("{}{}", root.0, issuing.0)]);
        let both = both.unwrap();
        assert_eq!(both.counts(), (1, 1));
        assert!(matches!(
            decide(&both, &good[..1], None, now),
            Verdict::Trusted { .. }
        ));
        assert!(TrustStore::new(&["junk".into()]).0.is_none());
    }
}
