//! A customer's own PKI, for tests of PKI device authentication at the gateway (DESIGN §4):
//! CAs that are not the site's, client authentication certificates with serial numbers and
//! CRL distribution points, signed CRLs, and a loopback HTTP server for a distribution point.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA of the customer's PKI.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A device certificate with its key.
pub struct Device {
    pub der: Vec<u8>,
    pub serial: u64,
    pub cert_pem: String,
    pub key_pem: String,
    /// Certificate, then the intermediates the device sends, then the key.
    pub identity_pem: String,
}

impl Device {
    /// The certificate and key as a [`cmg_pki::Credential`], for test devices.
    pub fn credential(&self) -> cmg_pki::Credential {
        // cmg-pki makes a `Credential` from PEM only through `SiteAuthority::load`, which takes
        // any certificate with its key.
        cmg_pki::SiteAuthority::load(&self.cert_pem, &self.key_pem)
            .expect("device credential")
            .credential()
            .clone()
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Contoso");
    dn
}

/// A root CA, or an intermediate one under `parent`.
pub fn ca(name: &str, parent: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = parent.is_some();
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
    let cert = match parent {
        None => params.self_signed(&key),
        Some(p) => params.signed_by(&key, &p.issuer),
    }
    .expect("CA certificate");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A client authentication certificate from `ca` with this serial number, naming `cdp` as its
/// CRL distribution point when given; `sent` are the intermediates the device sends in its TLS
/// chain.
pub fn device(ca: &Ca, cn: &str, serial: u64, cdp: Option<&str>, sent: &[&Ca]) -> Device {
    let key = KeyPair::generate().expect("device key");
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(SerialNumber::from(serial));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    if let Some(url) = cdp {
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec![url.to_owned()],
        }];
    }
    let cert = params
        .signed_by(&key, &ca.issuer)
        .expect("device certificate");
    let key_pem = key.serialize_pem();
    let mut identity_pem = cert.pem();
    for ca in sent {
        identity_pem.push_str(&ca.pem);
    }
    identity_pem.push_str(&key_pem);
    Device {
        der: cert.der().to_vec(),
        serial,
        cert_pem: cert.pem(),
        key_pem,
        identity_pem,
    }
}

/// A CRL of `ca` revoking these serial numbers, current for an hour: (PEM, DER).
pub fn crl(ca: &Ca, revoked: &[u64]) -> (String, Vec<u8>) {
    let now = OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::hours(1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: now - Duration::minutes(1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .expect("CRL");
    (crl.pem().expect("CRL PEM"), crl.der().to_vec())
}

/// A CRL distribution point: one CRL over plain HTTP/1.1 at `/pki/issuing.crl` on 127.0.0.1
/// (a free port). Returns its URL and the number of downloads so far.
pub async fn serve_crl(der: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("CRL listener");
    let url = format!(
        "http://{}/pki/issuing.crl",
        listener.local_addr().expect("CRL address")
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (der, counter) = (der.clone(), Arc::clone(&counter));
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    }
                }
                let response = if request.starts_with(b"GET /pki/issuing.crl ") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/pkix-crl\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        der.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&der);
                    r
                } else {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_vec()
                };
                let _ = tcp.write_all(&response).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (url, hits)
}
