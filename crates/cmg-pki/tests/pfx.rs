//! PFX (PKCS#12) files made by the real tools admins use — the `openssl pkcs12 -export` CLI and
//! Python's `cryptography` (both OpenSSL underneath, as Windows' AES256-SHA256 export is the
//! same PBES2/PBKDF2/AES format) — decode to the chain and key they were made from; wrong
//! passwords, legacy algorithms, missing or extra keys and damaged files are refused with the
//! right error and never a panic.

use std::path::PathBuf;
use std::process::Command;

use cmg_pki::pfx::{self, PfxContents, PfxError};
use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const OPENSSL: &str = "/usr/bin/openssl";
const PASSWORD: &str = "Pässw0rd with spaces";

/// A leaf, its intermediate CA and the root, as PEM and DER, and the leaf's key.
struct Chain {
    dir: tempfile::TempDir,
    leaf_pem: String,
    intermediate_pem: String,
    root_pem: String,
    key_pem: String,
    ders: Vec<Vec<u8>>,
    key_der: Vec<u8>,
}

impl Chain {
    fn new(alg: KeyAlgorithm) -> Chain {
        let ca = |name: &str| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca("Contoso Test Root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);

        let intermediate_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let intermediate_params = ca("Contoso Test Issuing CA");
        let intermediate = intermediate_params
            .signed_by(&intermediate_key, &root_issuer)
            .unwrap();
        let intermediate_issuer = Issuer::new(intermediate_params, intermediate_key);

        let leaf_key = match alg {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
        }
        .unwrap();
        let mut params =
            CertificateParams::new(vec!["granitefalls.contoso.com".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "granitefalls.contoso.com");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&leaf_key, &intermediate_issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let chain = Chain {
            dir,
            leaf_pem: leaf.pem(),
            intermediate_pem: intermediate.pem(),
            root_pem: root.pem(),
            key_pem: leaf_key.serialize_pem(),
            ders: vec![
                leaf.der().to_vec(),
                intermediate.der().to_vec(),
                root.der().to_vec(),
            ],
            key_der: leaf_key.serialize_der(),
        };
        chain.write_files();
        chain
    }

    /// A site-root-issued certificate made with cmg-pki alone: a two-certificate chain.
    fn from_site(alg: KeyAlgorithm) -> Chain {
        let root = SiteAuthority::generate("PFX").unwrap();
        let leaf = root
            .issue(
                "PFX",
                &Role::ManagementPoint {
                    hostnames: vec!["mp.contoso.com".into()],
                },
                alg,
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain {
            dir,
            leaf_pem: leaf.cert_pem().to_owned(),
            intermediate_pem: String::new(),
            root_pem: root.credential().cert_pem().to_owned(),
            key_pem: leaf.key_pem().to_owned(),
            ders: vec![
                leaf.cert_der().to_vec(),
                root.credential().cert_der().to_vec(),
            ],
            key_der: cmg_pki::key_pem_to_pkcs8(leaf.key_pem(), "the key").unwrap(),
        };
        chain.write_files();
        chain
    }

    fn write_files(&self) {
        std::fs::write(self.path("leaf.pem"), &self.leaf_pem).unwrap();
        std::fs::write(self.path("key.pem"), &self.key_pem).unwrap();
        // The CA certificates root first: decoding must still put the intermediate next.
        std::fs::write(
            self.path("cas.pem"),
            format!("{}{}", self.root_pem, self.intermediate_pem),
        )
        .unwrap();
        std::fs::write(self.path("password"), PASSWORD).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `openssl pkcs12 -export` of leaf, key and CAs with `extra` options; the file's bytes.
    fn openssl(&self, password: &str, extra: &[&str]) -> Vec<u8> {
        let out = self.path("openssl.pfx");
        let _ = std::fs::remove_file(&out);
        let status = Command::new(OPENSSL)
            .args(["pkcs12", "-export", "-in"])
            .arg(self.path("leaf.pem"))
            .arg("-inkey")
            .arg(self.path("key.pem"))
            .arg("-certfile")
            .arg(self.path("cas.pem"))
            .arg("-out")
            .arg(&out)
            .arg("-passout")
            .arg(format!("pass:{password}"))
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "openssl pkcs12 -export {extra:?} failed");
        std::fs::read(out).unwrap()
    }

    /// Python `cryptography`: `serialize_key_and_certificates` with the encryption that
    /// `encryption` (a Python expression over `pw`) builds; `key`/`cert` False leave them out.
    fn python(&self, encryption: &str, key: bool, cert: bool) -> Vec<u8> {
        let out = self.path("python.pfx");
        let script = format!(
            r#"
import sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12, PrivateFormat
from cryptography.hazmat.primitives.serialization.pkcs12 import PBES
d = sys.argv[1]
pw = open(d + "/password", "rb").read()
key = serialization.load_pem_private_key(open(d + "/key.pem", "rb").read(), None)
leaf = x509.load_pem_x509_certificate(open(d + "/leaf.pem", "rb").read())
cas = x509.load_pem_x509_certificates(open(d + "/cas.pem", "rb").read())
data = pkcs12.serialize_key_and_certificates(
    b"cmg", key if {key} else None, leaf if {cert} else None, cas, {encryption})
open(d + "/python.pfx", "wb").write(data)
"#,
            key = if key { "True" } else { "False" },
            cert = if cert { "True" } else { "False" },
        );
        let output = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "python: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read(out).unwrap()
    }

    /// The decoded file holds exactly this chain, leaf first then issuers, and this key.
    fn check(&self, contents: &PfxContents) {
        assert_eq!(contents.chain_der(), self.ders.as_slice(), "chain order");
        assert_eq!(contents.leaf_der(), self.ders[0].as_slice());
        let pem_ders: Vec<Vec<u8>> =
            CertificateDer::pem_slice_iter(contents.chain_pem().as_bytes())
                .map(|c| c.unwrap().to_vec())
                .collect();
        assert_eq!(pem_ders, self.ders, "the PEM holds the same certificates");
        assert_eq!(contents.key_pkcs8_der(), self.key_der.as_slice());
        check_key_matches_leaf(contents);
    }
}

/// The key PEM is PKCS#8, builds a rustls signing key whose public key is the leaf's, and the
/// pair makes a server configuration.
fn check_key_matches_leaf(contents: &PfxContents) {
    assert!(
        contents
            .key_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----\n")
    );
    let key = PrivatePkcs8KeyDer::from_pem_slice(contents.key_pem().as_bytes()).unwrap();
    assert_eq!(key.secret_pkcs8_der(), contents.key_pkcs8_der());
    let signing =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(key)).unwrap();
    let spki = signing.public_key().expect("public key");
    let (_, leaf) = x509_parser::parse_x509_certificate(contents.leaf_der()).unwrap();
    assert_eq!(spki.as_ref(), leaf.public_key().raw);
    cmg_pki::tls::server_config(contents.chain_pem(), contents.key_pem()).unwrap();
}

fn decode(bytes: &[u8], password: &str) -> PfxContents {
    pfx::decode(bytes, password).unwrap_or_else(|e| panic!("decode failed: {e}"))
}

fn refused(bytes: &[u8], password: &str) -> PfxError {
    match pfx::decode(bytes, password) {
        Ok(c) => panic!("decoded although it should not: {c:?}"),
        Err(e) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(PASSWORD), "the password leaked: {text}");
            assert!(!text.contains("wrong-pass"), "the password leaked: {text}");
            e
        }
    }
}

#[test]
fn openssl_default_export_decodes_for_ecdsa_and_rsa() {
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let chain = Chain::new(alg);
        // OpenSSL 3's default: PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC; SHA-256 MAC.
        let file = chain.openssl(PASSWORD, &[]);
        let contents = decode(&file, PASSWORD);
        chain.check(&contents);
        assert!(
            !format!("{contents:?}").contains("PRIVATE"),
            "Debug shows no key"
        );
    }
}

#[test]
fn openssl_aes128_with_a_sha1_mac_decodes() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let file = chain.openssl(
        PASSWORD,
        &[
            "-keypbe",
            "AES-128-CBC",
            "-certpbe",
            "AES-128-CBC",
            "-macalg",
            "sha1",
        ],
    );
    chain.check(&decode(&file, PASSWORD));
}

#[test]
fn openssl_aes192_sha512_mac_and_many_iterations_decode() {
    let chain = Chain::new(KeyAlgorithm::Rsa2048);
    let file = chain.openssl(
        PASSWORD,
        &[
            "-keypbe",
            "AES-192-CBC",
            "-certpbe",
            "AES-192-CBC",
            "-macalg",
            "sha512",
            "-iter",
            "20000",
        ],
    );
    chain.check(&decode(&file, PASSWORD));
}

#[test]
fn unencrypted_bags_and_windows_key_attributes_decode() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    // keyBag (plain PKCS#8) and certificates in a plain data content.
    let file = chain.openssl(PASSWORD, &["-keypbe", "NONE", "-certpbe", "NONE"]);
    chain.check(&decode(&file, PASSWORD));
    // `-keysig` adds the key usage attribute Windows puts in the PKCS#8 key.
    let file = chain.openssl(PASSWORD, &["-keysig"]);
    chain.check(&decode(&file, PASSWORD));
}

#[test]
fn an_empty_password_and_a_file_without_mac_decode() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let file = chain.openssl("", &[]);
    chain.check(&decode(&file, ""));
    assert!(matches!(
        refused(&file, "wrong-pass"),
        PfxError::WrongPassword
    ));

    let file = chain.openssl(PASSWORD, &["-nomac"]);
    chain.check(&decode(&file, PASSWORD));
    // Without a MAC the wrong password shows when decrypting.
    assert!(matches!(
        refused(&file, "wrong-pass"),
        PfxError::DecryptionFailed { .. }
    ));
}

#[test]
fn python_cryptography_best_available_encryption_decodes() {
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let chain = Chain::new(alg);
        let file = chain.python("serialization.BestAvailableEncryption(pw)", true, true);
        chain.check(&decode(&file, PASSWORD));
    }
    // Explicit PBES2 with SHA-256/AES-256 and a SHA-512 MAC (128-byte block in the MAC KDF).
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let file = chain.python(
        "PrivateFormat.PKCS12.encryption_builder().kdf_rounds(5000)\
         .key_cert_algorithm(PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA512()).build(pw)",
        true,
        true,
    );
    chain.check(&decode(&file, PASSWORD));
}

#[test]
fn a_site_issued_certificate_round_trips() {
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let chain = Chain::from_site(alg);
        chain.check(&decode(&chain.openssl(PASSWORD, &[]), PASSWORD));
    }
}

#[test]
fn a_wrong_password_is_refused_before_decrypting() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let file = chain.openssl(PASSWORD, &[]);
    let err = refused(&file, "wrong-pass");
    assert!(matches!(err, PfxError::WrongPassword), "{err:?}");
    assert!(err.to_string().contains("wrong password"), "{err}");
    // Close is not enough: a missing character, another case.
    assert!(matches!(
        refused(&file, &PASSWORD[..PASSWORD.len() - 1]),
        PfxError::WrongPassword
    ));
    assert!(matches!(refused(&file, ""), PfxError::WrongPassword));
}

#[test]
fn legacy_algorithms_are_refused_with_a_re_export_hint() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let cases: [(Vec<u8>, &str); 3] = [
        // RC2-40 certificates, 3DES key, SHA-1 MAC: the certificates come first.
        (
            chain.openssl(PASSWORD, &["-legacy"]),
            "pbeWithSHAAnd40BitRC2-CBC",
        ),
        (
            chain.openssl(PASSWORD, &["-legacy", "-certpbe", "NONE"]),
            "pbeWithSHAAnd3-KeyTripleDES-CBC",
        ),
        // PBES2 with 3DES instead of AES.
        (
            chain.openssl(PASSWORD, &["-keypbe", "DES-EDE3-CBC", "-certpbe", "NONE"]),
            "3DES",
        ),
    ];
    for (file, name) in cases {
        let err = refused(&file, PASSWORD);
        assert!(matches!(err, PfxError::LegacyAlgorithm { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(name), "{text}");
        assert!(text.contains("-legacy"), "{text}");
        assert!(text.contains("AES256-SHA256"), "{text}");
    }
    let file = chain.python(
        "PrivateFormat.PKCS12.encryption_builder()\
         .key_cert_algorithm(PBES.PBESv1SHA1And3KeyTripleDESCBC).hmac_hash(hashes.SHA1()).build(pw)",
        true,
        true,
    );
    let err = refused(&file, PASSWORD);
    assert!(
        err.to_string().contains("pbeWithSHAAnd3-KeyTripleDES-CBC"),
        "{err}"
    );
}

#[test]
fn files_without_the_right_key_are_refused() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let status = Command::new(OPENSSL)
        .args(["pkcs12", "-export", "-nokeys", "-in"])
        .arg(chain.path("leaf.pem"))
        .arg("-out")
        .arg(chain.path("nokey.pfx"))
        .args(["-passout", &format!("pass:{PASSWORD}")])
        .status()
        .unwrap();
    assert!(status.success());
    let file = std::fs::read(chain.path("nokey.pfx")).unwrap();
    let err = refused(&file, PASSWORD);
    assert!(matches!(err, PfxError::NoPrivateKey), "{err:?}");
    assert!(err.to_string().contains("export"), "{err}");

    // The key with only the CA certificates.
    let file = chain.python("serialization.BestAvailableEncryption(pw)", true, false);
    assert!(matches!(
        refused(&file, PASSWORD),
        PfxError::NoMatchingCertificate { count: 2 }
    ));
}

/// DER: tag, length, content (for files no tool makes).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A PFX without MAC or encryption holding these key and certificate bags.
fn handmade_pfx(keys: &[&[u8]], certs: &[&[u8]]) -> Vec<u8> {
    const DATA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01,
    ];
    const KEY_BAG: &[u8] = &[
        0x06, 0x0b, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x01,
    ];
    const CERT_BAG: &[u8] = &[
        0x06, 0x0b, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
    ];
    const X509: &[u8] = &[
        0x06, 0x0a, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01,
    ];
    let mut bags = Vec::new();
    for key in keys {
        bags.extend(der(0x30, &cat(&[KEY_BAG, &der(0xa0, key)])));
    }
    for cert in certs {
        let cert_bag = der(0x30, &cat(&[X509, &der(0xa0, &der(0x04, cert))]));
        bags.extend(der(0x30, &cat(&[CERT_BAG, &der(0xa0, &cert_bag)])));
    }
    let safe = der(0x30, &bags);
    let content_info = |octets: &[u8]| der(0x30, &cat(&[DATA, &der(0xa0, &der(0x04, octets))]));
    let auth_safe = der(0x30, &content_info(&safe));
    der(
        0x30,
        &cat(&[&[0x02, 0x01, 0x03], &content_info(&auth_safe)]),
    )
}

#[test]
fn handmade_files_with_several_keys_or_no_certificate_are_refused() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let other = Chain::new(KeyAlgorithm::EcdsaP256);
    let certs: Vec<&[u8]> = chain.ders.iter().map(Vec::as_slice).collect();

    // The hand-made format itself is right: one key and its chain decode.
    chain.check(&decode(&handmade_pfx(&[&chain.key_der], &certs), ""));
    // The same key twice is still one key.
    chain.check(&decode(
        &handmade_pfx(&[&chain.key_der, &chain.key_der], &certs),
        "",
    ));

    let err = refused(&handmade_pfx(&[&chain.key_der, &other.key_der], &certs), "");
    assert!(
        matches!(err, PfxError::SeveralPrivateKeys { count: 2 }),
        "{err:?}"
    );
    assert!(matches!(
        refused(&handmade_pfx(&[&chain.key_der], &[]), ""),
        PfxError::NoCertificate
    ));
    assert!(matches!(
        refused(&handmade_pfx(&[], &certs), ""),
        PfxError::NoPrivateKey
    ));
    assert!(matches!(
        refused(&handmade_pfx(&[&other.key_der], &certs), ""),
        PfxError::NoMatchingCertificate { count: 3 }
    ));
    assert!(matches!(
        refused(&handmade_pfx(&[b"\x30\x03\x02\x01\x00"], &certs), ""),
        PfxError::InvalidKey { .. }
    ));
    assert!(matches!(
        refused(
            &handmade_pfx(&[&chain.key_der], &[b"not a certificate"]),
            ""
        ),
        PfxError::InvalidCertificate { index: 1, .. }
    ));
}

#[test]
fn truncated_damaged_and_foreign_bytes_are_refused_without_panic() {
    let chain = Chain::new(KeyAlgorithm::EcdsaP256);
    let file = chain.openssl(PASSWORD, &[]);
    for len in 0..file.len() {
        let err = refused(&file[..len], PASSWORD);
        assert!(matches!(err, PfxError::Malformed { .. }), "{len}: {err:?}");
    }
    let mut longer = file.clone();
    longer.push(0);
    assert!(matches!(
        refused(&longer, PASSWORD),
        PfxError::Malformed { .. }
    ));

    // Every byte changed in turn: refused, or (where the byte carries no meaning, such as
    // the NULL parameters of the MAC's digest algorithm) still exactly the same contents.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut accepted = Vec::new();
    for i in 0..file.len() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut damaged = file.clone();
        damaged[i] ^= (state as u8) | 1;
        match pfx::decode(&damaged, PASSWORD) {
            Ok(contents) => {
                chain.check(&contents);
                accepted.push(i);
            }
            Err(e) => assert!(!format!("{e} {e:?}").contains(PASSWORD)),
        }
    }
    eprintln!("accepted damaged at {accepted:?} of {}", file.len());
    assert!(accepted.len() <= 4, "{accepted:?}");

    // Random garbage, PEM text, and a file of the wrong kind.
    for len in [1usize, 2, 16, 100, 4000] {
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let _ = refused(&garbage, PASSWORD);
        let mut sequence = vec![0x30, 0x82, (len >> 8) as u8, len as u8];
        sequence.extend(&garbage);
        let _ = refused(&sequence, PASSWORD);
    }
    assert!(matches!(
        refused(chain.leaf_pem.as_bytes(), PASSWORD),
        PfxError::Malformed { .. }
    ));
    assert!(matches!(
        refused(&chain.ders[0], PASSWORD),
        PfxError::Malformed { .. }
    ));
    // Deep nesting does not overflow the stack.
    let mut deep = vec![0x04, 0x00];
    for _ in 0..5000 {
        deep = der(0x30, &deep);
        if deep.len() > 60_000 {
            break;
        }
    }
    let _ = refused(&deep, PASSWORD);
}

#[test]
fn errors_name_the_problem_and_the_fix() {
    assert!(PfxError::NoPrivateKey.to_string().contains("private key"));
    let legacy = PfxError::LegacyAlgorithm {
        algorithm: "pbeWithSHAAnd40BitRC2-CBC",
    }
    .to_string();
    assert!(legacy.contains("openssl pkcs12 -export"), "{legacy}");
    assert!(legacy.contains("without `-legacy`"), "{legacy}");
    assert!(legacy.contains("Encryption: AES256-SHA256"), "{legacy}");
}
