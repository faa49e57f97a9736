//! Reading PFX (PKCS#12, RFC 7292) files: the CMG server authentication certificate as
//! ConfigMgr admins export it — certificate chain and private key in one password-protected file.
//!
//! This module owns the PKCS#12 container format and its password-based cryptography: the
//! integrity MAC (RFC 7292 Appendix B key derivation with SHA-1 or SHA-2, then HMAC), PBES2
//! (RFC 8018: PBKDF2 with HMAC-SHA-1/256/384/512, then AES-128/192/256-CBC), the
//! `data`/`encryptedData` contents and the `keyBag`, `pkcs8ShroudedKeyBag` and `certBag` bags.
//! [`decode`] turns a file into PEM that the rest of cmg uses (see [`crate::tls`]).
//!
//! What it refuses, each with an error that says what to do ([`PfxError`]): a wrong password
//! (checked with the MAC before anything is decrypted), the legacy algorithms of
//! `openssl pkcs12 -legacy` and old Windows exports (RC2, RC4, DES, 3DES), public-key protected
//! files, files without a private key or with several, and files whose certificates do not
//! include the key's. Input is never trusted: no panic on any byte string, iteration counts are
//! bounded, and the password never appears in an error or in `Debug` output.
//!
//! All cryptography is aws-lc-rs; DER/BER is read with `asn1-rs` (through `x509-parser`).

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU32;

use aws_lc_rs::cipher::{
    AES_128, AES_192, AES_256, DecryptionContext, PaddedBlockDecryptingKey, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::{digest, hmac, pbkdf2, signature};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x509_parser::asn1_rs::{Any, Class, FromBer, Oid, Tag};

/// How to make a file cmg accepts, appended to refusals of algorithms.
const REEXPORT_HINT: &str = "re-export it with AES: in Windows' Certificate Export Wizard choose \"Encryption: AES256-SHA256\"; with OpenSSL 3 run `openssl pkcs12 -export -in server.crt -inkey server.key -certfile ca.crt -out server.pfx` without `-legacy` (to convert an existing file: `openssl pkcs12 -legacy -in old.pfx -nodes -out all.pem`, then `openssl pkcs12 -export -in all.pem -out server.pfx`)";

/// Highest PBKDF2 / MAC iteration count accepted; more would only let a crafted file hang cmg.
pub const MAX_ITERATIONS: u64 = 10_000_000;

/// How deeply bags may nest (`safeContentsBag` in `safeContentsBag` …) and constructed strings.
const MAX_DEPTH: usize = 8;

/// Why a PFX file could not be read. The messages say what was wrong and what to do; none of
/// them contains the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PfxError {
    /// The bytes are not a well-formed PFX file (damaged, truncated, or another format).
    #[error(
        "this is not a valid PFX (PKCS#12) file: {part} {reason}; export the certificate with its private key again as a .pfx file"
    )]
    Malformed {
        /// The part of the file where reading stopped.
        part: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The integrity check (MAC) failed: the password is not the one the file was exported with.
    #[error(
        "wrong password for the PFX file (its integrity check failed); give the password it was exported with"
    )]
    WrongPassword,
    /// Decryption failed in a file without an integrity MAC, or after the MAC matched.
    #[error(
        "cannot decrypt the {what} in the PFX file: the password is wrong or the file is damaged"
    )]
    DecryptionFailed {
        /// What could not be decrypted: "certificates" or "private key".
        what: &'static str,
    },
    /// A legacy algorithm that cmg refuses (RC2, RC4, DES, 3DES, MD5).
    #[error(
        "the PFX file is protected with {algorithm}, a legacy algorithm cmg does not accept; {REEXPORT_HINT}"
    )]
    LegacyAlgorithm {
        /// The algorithm's name, e.g. `pbeWithSHAAnd3-KeyTripleDES-CBC`.
        algorithm: &'static str,
    },
    /// An algorithm that is neither supported nor known to be legacy.
    #[error(
        "the PFX file uses the {what} {algorithm}, which cmg does not support; {REEXPORT_HINT}"
    )]
    UnsupportedAlgorithm {
        /// Its role: "encryption algorithm", "MAC algorithm", "key derivation function", …
        what: &'static str,
        /// Its name or dotted object identifier.
        algorithm: String,
    },
    /// Public-key integrity or privacy mode (signedData / envelopedData) instead of a password.
    #[error(
        "the PFX file is protected with a certificate ({mode}) instead of a password; export it with a password"
    )]
    PublicKeyMode {
        /// `signedData` or `envelopedData`.
        mode: &'static str,
    },
    /// An iteration count above [`MAX_ITERATIONS`].
    #[error(
        "the PFX file asks for {iterations} iterations of its {what}, more than cmg accepts ({MAX_ITERATIONS}); export it again with the default settings"
    )]
    TooManyIterations {
        /// "MAC" or "key derivation".
        what: &'static str,
        /// The count in the file.
        iterations: u64,
    },
    /// No private key in the file.
    #[error(
        "the PFX file has no private key; export the certificate together with its private key (Windows: \"Yes, export the private key\"; OpenSSL: `openssl pkcs12 -export -inkey server.key …`)"
    )]
    NoPrivateKey,
    /// More than one private key in the file.
    #[error(
        "the PFX file holds {count} different private keys; cmg needs exactly one: export only the CMG server certificate with its key (and its CA certificates)"
    )]
    SeveralPrivateKeys {
        /// How many different keys the file holds.
        count: usize,
    },
    /// A private key but no certificate at all.
    #[error(
        "the PFX file has a private key but no certificate; export the certificate with its key"
    )]
    NoCertificate,
    /// Certificates, but none of them is for the private key.
    #[error(
        "none of the {count} certificate(s) in the PFX file belongs to its private key; export the server certificate together with its own key"
    )]
    NoMatchingCertificate {
        /// How many certificates the file holds.
        count: usize,
    },
    /// Several different certificates for the private key and nothing saying which one to use.
    #[error(
        "{count} different certificates in the PFX file belong to its private key and it does not say which one is meant; export only the current server certificate"
    )]
    SeveralMatchingCertificates {
        /// How many certificates use the key.
        count: usize,
    },
    /// The private key is not one cmg (rustls with aws-lc-rs) can use.
    #[error("the private key in the PFX file cannot be used: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate bag holds something that is not an X.509 certificate.
    #[error("certificate {index} in the PFX file is not a valid X.509 certificate: {reason}")]
    InvalidCertificate {
        /// 1-based position among the file's certificates.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// What a PFX file holds: the certificate chain (leaf first) and its private key (PKCS#8).
/// `Debug` never shows the key.
#[derive(Clone)]
pub struct PfxContents {
    chain_der: Vec<Vec<u8>>,
    chain_pem: String,
    key_der: Vec<u8>,
    key_pem: String,
}

impl fmt::Debug for PfxContents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let thumbprints: Vec<String> = self
            .chain_der
            .iter()
            .map(|c| crate::thumbprint_sha256(c))
            .collect();
        f.debug_struct("PfxContents")
            .field("chain_sha256", &thumbprints)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PfxContents {
    /// The certificates as `CERTIFICATE` PEM blocks: the one for the private key first, then
    /// its issuer, that one's issuer and so on, then any other certificate in file order.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The DER of each certificate, in the order of [`PfxContents::chain_pem`]. Never empty.
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }

    /// The DER of the leaf: the certificate whose public key is the private key's.
    pub fn leaf_der(&self) -> &[u8] {
        self.chain_der
            .first()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The private key as a PKCS#8 `PRIVATE KEY` PEM block. Write it only with
    /// [`crate::write_private_file`].
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key as PKCS#8 DER (a version 0 `PrivateKeyInfo` without attributes).
    pub fn key_pkcs8_der(&self) -> &[u8] {
        &self.key_der
    }
}

/// Reads a PFX (PKCS#12) file protected with `password` (use `""` for a file exported without
/// one).
///
/// The MAC is checked first, so a wrong password gives [`PfxError::WrongPassword`] without
/// anything being decrypted. The file must hold exactly one private key (in a `keyBag` or a
/// PBES2/AES `pkcs8ShroudedKeyBag`) and a certificate whose public key is that key's.
pub fn decode(der: &[u8], password: &str) -> Result<PfxContents, PfxError> {
    let (pfx, rest) = parse_one(der, "the file")?;
    if !rest.is_empty() {
        return Err(malformed(
            "the file",
            format!("has {} extra bytes after its end", rest.len()),
        ));
    }
    let mut pfx = Seq::of(&pfx, "the PFX structure")?;
    let version = uint(&pfx.next()?, "the PFX version")?;
    if version != 3 {
        return Err(malformed(
            "the PFX version",
            format!("is {version}; only version 3 exists"),
        ));
    }
    let auth_safe = pfx.next()?;
    let mac_data = pfx.next_optional()?;

    let (content_type, content) = content_info(&auth_safe, "the authenticated safe")?;
    let auth_safe = match content_type {
        OID_DATA => data_content(content, "the authenticated safe")?,
        OID_SIGNED_DATA => return Err(PfxError::PublicKeyMode { mode: "signedData" }),
        other => {
            return Err(malformed(
                "the authenticated safe",
                format!("has content type {}", oid_name(other)),
            ));
        }
    };

    // Without a MAC (`openssl pkcs12 -nomac`) a wrong password shows only when decrypting.
    if let Some(mac_data) = mac_data {
        verify_mac(&mac_data, &auth_safe, password)?;
    }

    let mut found = Found::default();
    let (safes, rest) = parse_one(&auth_safe, "the authenticated safe")?;
    if !rest.is_empty() {
        return Err(malformed(
            "the authenticated safe",
            "has trailing bytes".into(),
        ));
    }
    let mut safes = Seq::of(&safes, "the authenticated safe")?;
    while let Some(safe) = safes.next_optional()? {
        let (content_type, content) = content_info(&safe, "a content of the file")?;
        match content_type {
            OID_DATA => {
                let contents = data_content(content, "a data content")?;
                read_safe_contents(&contents, password, &mut found, 0)?;
            }
            OID_ENCRYPTED_DATA => {
                let content = content.ok_or_else(|| {
                    malformed("an encrypted content", "has no encrypted data".into())
                })?;
                let contents = encrypted_data(&content, password)?;
                read_safe_contents(&contents, password, &mut found, 0)?;
            }
            OID_ENVELOPED_DATA => {
                return Err(PfxError::PublicKeyMode {
                    mode: "envelopedData",
                });
            }
            other => {
                return Err(malformed(
                    "a content of the file",
                    format!("has the unknown content type {}", oid_name(other)),
                ));
            }
        }
    }
    assemble(found)
}

// ---------------------------------------------------------------------------------------------
// Object identifiers (DER content octets).

const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
const OID_ENVELOPED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const OID_ENCRYPTED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x06];

const OID_KEY_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x01,
];
const OID_SHROUDED_KEY_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x02,
];
const OID_CERT_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
];
const OID_SAFE_CONTENTS_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x06,
];
const OID_X509_CERTIFICATE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01];
const OID_LOCAL_KEY_ID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x15];

const OID_PBES2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0d];
const OID_PBKDF2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0c];
const OID_PBMAC1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0e];

const OID_HMAC_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x07];
const OID_HMAC_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x08];
const OID_HMAC_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x09];
const OID_HMAC_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x0a];
const OID_HMAC_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x0b];

const OID_SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const OID_SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const OID_SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
const OID_MD5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x05];
const OID_MD2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x02];

const OID_AES128_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x02];
const OID_AES192_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x16];
const OID_AES256_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2a];

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Legacy encryption algorithms (PKCS#12 PBE, PBES1, and PBES2 schemes other than AES), by name.
const LEGACY: &[(&[u8], &str)] = &[
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x01],
        "pbeWithSHAAnd128BitRC4",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x02],
        "pbeWithSHAAnd40BitRC4",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x03],
        "pbeWithSHAAnd3-KeyTripleDES-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x04],
        "pbeWithSHAAnd2-KeyTripleDES-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x05],
        "pbeWithSHAAnd128BitRC2-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x01, 0x06],
        "pbeWithSHAAnd40BitRC2-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x01],
        "pbeWithMD2AndDES-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x03],
        "pbeWithMD5AndDES-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x04],
        "pbeWithMD2AndRC2-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x06],
        "pbeWithMD5AndRC2-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0a],
        "pbeWithSHA1AndDES-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0b],
        "pbeWithSHA1AndRC2-CBC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x03, 0x07],
        "des-ede3-cbc (3DES)",
    ),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x03, 0x02], "rc2-cbc"),
    (&[0x2b, 0x0e, 0x03, 0x02, 0x07], "des-cbc"),
    (OID_MD5, "MD5"),
    (OID_MD2, "MD2"),
];

fn legacy_name(oid: &[u8]) -> Option<&'static str> {
    LEGACY
        .iter()
        .find(|(known, _)| *known == oid)
        .map(|(_, name)| *name)
}

/// A name for an object identifier in an error: a known name, else the dotted form.
fn oid_name(oid: &[u8]) -> String {
    if let Some(name) = legacy_name(oid) {
        return name.to_owned();
    }
    let known: &[(&[u8], &str)] = &[
        (OID_PBMAC1, "PBMAC1"),
        (OID_SIGNED_DATA, "signedData"),
        (OID_ENVELOPED_DATA, "envelopedData"),
        (OID_ENCRYPTED_DATA, "encryptedData"),
        (OID_DATA, "data"),
    ];
    if let Some((_, name)) = known.iter().find(|(k, _)| *k == oid) {
        return (*name).to_owned();
    }
    Oid::new(Cow::Borrowed(oid))
        .to_id_string()
        .chars()
        .take(80)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// BER/DER reading, panic-free on any input.

fn malformed(part: &'static str, reason: String) -> PfxError {
    PfxError::Malformed { part, reason }
}

/// One object at the start of `bytes`, and what follows it.
fn parse_one<'a>(bytes: &'a [u8], part: &'static str) -> Result<(Any<'a>, &'a [u8]), PfxError> {
    match Any::from_ber(bytes) {
        Ok((rest, any)) => Ok((any, rest)),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(malformed(
            part,
            "is cut short (truncated or damaged)".into(),
        )),
        Err(e) => Err(malformed(part, format!("cannot be decoded ({e})"))),
    }
}

fn is(any: &Any<'_>, class: Class, tag: Tag) -> bool {
    any.header.class() == class && any.header.tag() == tag
}

/// The elements of a SEQUENCE (or SET), read one by one.
struct Seq<'a> {
    rest: &'a [u8],
    part: &'static str,
}

impl<'a> Seq<'a> {
    fn of(any: &Any<'a>, part: &'static str) -> Result<Self, PfxError> {
        Self::tagged(any, Tag::Sequence, part)
    }

    fn set(any: &Any<'a>, part: &'static str) -> Result<Self, PfxError> {
        Self::tagged(any, Tag::Set, part)
    }

    fn tagged(any: &Any<'a>, tag: Tag, part: &'static str) -> Result<Self, PfxError> {
        if !is(any, Class::Universal, tag) || !any.header.is_constructed() {
            return Err(malformed(
                part,
                format!(
                    "is not a {}",
                    if tag == Tag::Set { "SET" } else { "SEQUENCE" }
                ),
            ));
        }
        Ok(Seq {
            rest: any.data,
            part,
        })
    }

    fn next(&mut self) -> Result<Any<'a>, PfxError> {
        self.next_optional()?
            .ok_or_else(|| malformed(self.part, "has too few fields".into()))
    }

    fn next_optional(&mut self) -> Result<Option<Any<'a>>, PfxError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (any, rest) = parse_one(self.rest, self.part)?;
        self.rest = rest;
        Ok(Some(any))
    }

    /// The next element if it is context-specific `[n]`.
    fn next_context(&mut self, n: u32) -> Result<Option<Any<'a>>, PfxError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (any, rest) = parse_one(self.rest, self.part)?;
        if is(&any, Class::ContextSpecific, Tag(n)) {
            self.rest = rest;
            Ok(Some(any))
        } else {
            Ok(None)
        }
    }
}

fn oid<'a>(any: &Any<'a>, part: &'static str) -> Result<&'a [u8], PfxError> {
    if is(any, Class::Universal, Tag::Oid) && any.header.is_primitive() && !any.data.is_empty() {
        Ok(any.data)
    } else {
        Err(malformed(part, "is not an object identifier".into()))
    }
}

/// A non-negative INTEGER that fits in 64 bits.
fn uint(any: &Any<'_>, part: &'static str) -> Result<u64, PfxError> {
    if !is(any, Class::Universal, Tag::Integer) || any.header.is_constructed() {
        return Err(malformed(part, "is not an INTEGER".into()));
    }
    match any.data.first() {
        None => return Err(malformed(part, "is an empty INTEGER".into())),
        Some(b) if b & 0x80 != 0 => return Err(malformed(part, "is negative".into())),
        Some(_) => {}
    }
    let digits: &[u8] = {
        let start = any
            .data
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(any.data.len());
        any.data.get(start..).unwrap_or_default()
    };
    if digits.len() > 8 {
        return Err(malformed(part, "is too large".into()));
    }
    Ok(digits.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
}

/// The octets of an OCTET STRING (or of an implicitly tagged one, `class`/`tag`), joining the
/// segments of a constructed (BER) string.
fn octets_tagged<'a>(
    any: &Any<'a>,
    class: Class,
    tag: Tag,
    part: &'static str,
) -> Result<Cow<'a, [u8]>, PfxError> {
    if !is(any, class, tag) {
        return Err(malformed(part, "is not an OCTET STRING".into()));
    }
    if any.header.is_primitive() {
        return Ok(Cow::Borrowed(any.data));
    }
    let mut out = Vec::new();
    join_segments(any.data, part, &mut out, 0)?;
    Ok(Cow::Owned(out))
}

fn join_segments(
    mut bytes: &[u8],
    part: &'static str,
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<(), PfxError> {
    if depth > MAX_DEPTH {
        return Err(malformed(part, "nests too deeply".into()));
    }
    while !bytes.is_empty() {
        let (segment, rest) = parse_one(bytes, part)?;
        if !is(&segment, Class::Universal, Tag::OctetString) {
            return Err(malformed(
                part,
                "has a segment that is not an OCTET STRING".into(),
            ));
        }
        if segment.header.is_primitive() {
            out.extend_from_slice(segment.data);
        } else {
            join_segments(segment.data, part, out, depth + 1)?;
        }
        bytes = rest;
    }
    Ok(())
}

fn octets<'a>(any: &Any<'a>, part: &'static str) -> Result<Cow<'a, [u8]>, PfxError> {
    octets_tagged(any, Class::Universal, Tag::OctetString, part)
}

/// The single object inside an EXPLICIT `[n]` tag.
fn explicit<'a>(any: &Any<'a>, n: u32, part: &'static str) -> Result<Any<'a>, PfxError> {
    if !is(any, Class::ContextSpecific, Tag(n)) || !any.header.is_constructed() {
        return Err(malformed(part, format!("has no [{n}] field")));
    }
    let (inner, _) = parse_one(any.data, part)?;
    Ok(inner)
}

/// An AlgorithmIdentifier: its OID and parameters (absent, or NULL, or anything).
fn algorithm<'a>(
    any: &Any<'a>,
    part: &'static str,
) -> Result<(&'a [u8], Option<Any<'a>>), PfxError> {
    let mut seq = Seq::of(any, part)?;
    let id = oid(&seq.next()?, part)?;
    let params = seq
        .next_optional()?
        .filter(|p| !is(p, Class::Universal, Tag::Null));
    Ok((id, params))
}

/// A ContentInfo: content type and the `[0]` content, if any.
fn content_info<'a>(
    any: &Any<'a>,
    part: &'static str,
) -> Result<(&'a [u8], Option<Any<'a>>), PfxError> {
    let mut seq = Seq::of(any, part)?;
    let content_type = oid(&seq.next()?, part)?;
    let content = match seq.next_context(0)? {
        Some(wrapper) => Some(explicit(&wrapper, 0, part)?),
        None => None,
    };
    Ok((content_type, content))
}

/// The octets of a `data` content.
fn data_content<'a>(
    content: Option<Any<'a>>,
    part: &'static str,
) -> Result<Cow<'a, [u8]>, PfxError> {
    let content = content.ok_or_else(|| malformed(part, "has no content".into()))?;
    octets(&content, part)
}

/// DER: tag, length, content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        let significant = bytes.get(start..).unwrap_or_default();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

// ---------------------------------------------------------------------------------------------
// The integrity MAC (RFC 7292 §4 and Appendix B).

/// Digest of the MAC: (digest, HMAC, block size `v` in bytes).
fn mac_algorithm(
    id: &[u8],
) -> Result<(&'static digest::Algorithm, hmac::Algorithm, usize), PfxError> {
    match id {
        OID_SHA1 => Ok((
            &digest::SHA1_FOR_LEGACY_USE_ONLY,
            hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            64,
        )),
        OID_SHA224 => Ok((&digest::SHA224, hmac::HMAC_SHA224, 64)),
        OID_SHA256 => Ok((&digest::SHA256, hmac::HMAC_SHA256, 64)),
        OID_SHA384 => Ok((&digest::SHA384, hmac::HMAC_SHA384, 128)),
        OID_SHA512 => Ok((&digest::SHA512, hmac::HMAC_SHA512, 128)),
        other => match legacy_name(other) {
            Some(algorithm) => Err(PfxError::LegacyAlgorithm { algorithm }),
            None => Err(PfxError::UnsupportedAlgorithm {
                what: "MAC algorithm",
                algorithm: oid_name(other),
            }),
        },
    }
}

fn iterations(any: Option<&Any<'_>>, what: &'static str) -> Result<NonZeroU32, PfxError> {
    let count = match any {
        Some(any) => uint(any, "an iteration count")?,
        None => 1,
    };
    if count > MAX_ITERATIONS {
        return Err(PfxError::TooManyIterations {
            what,
            iterations: count,
        });
    }
    u32::try_from(count)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| malformed("an iteration count", "is zero".into()))
}

/// The password as the PKCS#12 key derivation wants it: UTF-16BE with a terminating zero.
fn bmp_password(password: &str) -> Vec<u8> {
    password
        .encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_be_bytes)
        .collect()
}

/// RFC 7292 Appendix B.2 with ID 3 (MAC key), producing one hash output (`u` bytes): all a MAC
/// key needs.
fn pkcs12_mac_key(
    alg: &'static digest::Algorithm,
    v: usize,
    password: &[u8],
    salt: &[u8],
    rounds: NonZeroU32,
) -> Vec<u8> {
    let stretch = |input: &[u8]| -> Vec<u8> {
        if input.is_empty() {
            return Vec::new();
        }
        let len = input.len().div_ceil(v) * v;
        input.iter().copied().cycle().take(len).collect()
    };
    let mut ctx = digest::Context::new(alg);
    ctx.update(&vec![3u8; v]);
    ctx.update(&stretch(salt));
    ctx.update(&stretch(password));
    let mut a = ctx.finish();
    for _ in 1..rounds.get() {
        a = digest::digest(alg, a.as_ref());
    }
    a.as_ref().to_vec()
}

fn verify_mac(mac_data: &Any<'_>, auth_safe: &[u8], password: &str) -> Result<(), PfxError> {
    const PART: &str = "the integrity check (MacData)";
    let mut seq = Seq::of(mac_data, PART)?;
    let mut digest_info = Seq::of(&seq.next()?, PART)?;
    let (digest_oid, _) = algorithm(&digest_info.next()?, PART)?;
    let expected = octets(&digest_info.next()?, PART)?;
    let salt = octets(&seq.next()?, PART)?;
    let rounds = iterations(seq.next_optional()?.as_ref(), "MAC")?;
    if digest_oid == OID_PBMAC1 {
        return Err(PfxError::UnsupportedAlgorithm {
            what: "MAC algorithm",
            algorithm: "PBMAC1 (RFC 9579)".into(),
        });
    }
    let (digest_alg, hmac_alg, v) = mac_algorithm(digest_oid)?;
    // OpenSSL and Windows write an empty password as just the terminator; some tools omit even
    // that, so an empty password is tried both ways.
    let mut candidates = vec![bmp_password(password)];
    if password.is_empty() {
        candidates.push(Vec::new());
    }
    for candidate in candidates {
        let key = pkcs12_mac_key(digest_alg, v, &candidate, &salt, rounds);
        let key = hmac::Key::new(hmac_alg, &key);
        if hmac::verify(&key, auth_safe, &expected).is_ok() {
            return Ok(());
        }
    }
    Err(PfxError::WrongPassword)
}

// ---------------------------------------------------------------------------------------------
// Decryption (PBES2 with PBKDF2 and AES-CBC).

/// Decrypts `ciphertext` protected with the algorithm `alg` (an AlgorithmIdentifier).
fn decrypt(
    alg: &Any<'_>,
    ciphertext: &[u8],
    password: &str,
    what: &'static str,
) -> Result<Vec<u8>, PfxError> {
    const PART: &str = "an encryption algorithm";
    let (id, params) = algorithm(alg, PART)?;
    if id != OID_PBES2 {
        return Err(match legacy_name(id) {
            Some(algorithm) => PfxError::LegacyAlgorithm { algorithm },
            None => PfxError::UnsupportedAlgorithm {
                what: "encryption algorithm",
                algorithm: oid_name(id),
            },
        });
    }
    let params = params.ok_or_else(|| malformed(PART, "has no PBES2 parameters".into()))?;
    let mut params = Seq::of(&params, PART)?;
    let (kdf, kdf_params) = algorithm(&params.next()?, PART)?;
    let (scheme, iv) = algorithm(&params.next()?, PART)?;

    let (cipher, key_len) = match scheme {
        OID_AES128_CBC => (&AES_128, 16),
        OID_AES192_CBC => (&AES_192, 24),
        OID_AES256_CBC => (&AES_256, 32),
        other => {
            return Err(match legacy_name(other) {
                Some(algorithm) => PfxError::LegacyAlgorithm { algorithm },
                None => PfxError::UnsupportedAlgorithm {
                    what: "encryption algorithm",
                    algorithm: oid_name(other),
                },
            });
        }
    };
    let iv = iv.ok_or_else(|| malformed(PART, "has no AES initialisation vector".into()))?;
    let iv: [u8; 16] = octets(&iv, PART)?.as_ref().try_into().map_err(|_| {
        malformed(
            PART,
            "has an AES initialisation vector that is not 16 bytes".into(),
        )
    })?;

    if kdf != OID_PBKDF2 {
        return Err(PfxError::UnsupportedAlgorithm {
            what: "key derivation function",
            algorithm: oid_name(kdf),
        });
    }
    let kdf_params =
        kdf_params.ok_or_else(|| malformed(PART, "has no PBKDF2 parameters".into()))?;
    let mut kdf_params = Seq::of(&kdf_params, PART)?;
    let salt = kdf_params.next()?;
    if !is(&salt, Class::Universal, Tag::OctetString) {
        return Err(PfxError::UnsupportedAlgorithm {
            what: "key derivation function",
            algorithm: "PBKDF2 with a salt from another source".into(),
        });
    }
    let salt = octets(&salt, PART)?;
    let rounds = iterations(Some(&kdf_params.next()?), "key derivation")?;
    let mut prf = pbkdf2::PBKDF2_HMAC_SHA1;
    while let Some(field) = kdf_params.next_optional()? {
        if is(&field, Class::Universal, Tag::Integer) {
            let key_length = uint(&field, PART)?;
            if usize::try_from(key_length).ok() != Some(key_len) {
                return Err(malformed(
                    PART,
                    format!("asks for a {key_length}-byte key for a {key_len}-byte AES key"),
                ));
            }
        } else {
            let (prf_id, _) = algorithm(&field, PART)?;
            prf = match prf_id {
                OID_HMAC_SHA1 => pbkdf2::PBKDF2_HMAC_SHA1,
                OID_HMAC_SHA256 => pbkdf2::PBKDF2_HMAC_SHA256,
                OID_HMAC_SHA384 => pbkdf2::PBKDF2_HMAC_SHA384,
                OID_HMAC_SHA512 => pbkdf2::PBKDF2_HMAC_SHA512,
                OID_HMAC_SHA224 => {
                    return Err(PfxError::UnsupportedAlgorithm {
                        what: "PBKDF2 pseudo-random function",
                        algorithm: "hmacWithSHA224".into(),
                    });
                }
                other => {
                    return Err(PfxError::UnsupportedAlgorithm {
                        what: "PBKDF2 pseudo-random function",
                        algorithm: oid_name(other),
                    });
                }
            };
        }
    }

    let mut key = vec![0u8; key_len];
    pbkdf2::derive(prf, rounds, &salt, password.as_bytes(), &mut key);
    let failed = || PfxError::DecryptionFailed { what };
    let unbound = UnboundCipherKey::new(cipher, &key).map_err(|_| failed())?;
    key.fill(0);
    let decrypting = PaddedBlockDecryptingKey::cbc_pkcs7(unbound).map_err(|_| failed())?;
    let mut buffer = ciphertext.to_vec();
    let plain_len = decrypting
        .decrypt(&mut buffer, DecryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| failed())?
        .len();
    buffer.truncate(plain_len);
    Ok(buffer)
}

/// An EncryptedData content: its decrypted SafeContents.
fn encrypted_data(content: &Any<'_>, password: &str) -> Result<Vec<u8>, PfxError> {
    const PART: &str = "an encrypted content";
    let mut seq = Seq::of(content, PART)?;
    let _version = uint(&seq.next()?, PART)?;
    let mut info = Seq::of(&seq.next()?, PART)?;
    let content_type = oid(&info.next()?, PART)?;
    if content_type != OID_DATA {
        return Err(malformed(
            PART,
            format!("encrypts content of type {}", oid_name(content_type)),
        ));
    }
    let alg = info.next()?;
    let ciphertext = info
        .next_context(0)?
        .ok_or_else(|| malformed(PART, "has no encrypted content".into()))?;
    let ciphertext = octets_tagged(&ciphertext, Class::ContextSpecific, Tag(0), PART)?;
    decrypt(&alg, &ciphertext, password, "certificates")
}

// ---------------------------------------------------------------------------------------------
// Bags.

#[derive(Default)]
struct Found {
    /// PKCS#8 DER of each key and its localKeyId.
    keys: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// DER of each certificate and its localKeyId.
    certs: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn read_safe_contents(
    bytes: &[u8],
    password: &str,
    found: &mut Found,
    depth: usize,
) -> Result<(), PfxError> {
    const PART: &str = "a list of bags (SafeContents)";
    if depth > MAX_DEPTH {
        return Err(malformed(PART, "nests too deeply".into()));
    }
    let (contents, _) = parse_one(bytes, PART)?;
    let mut bags = Seq::of(&contents, PART)?;
    while let Some(bag) = bags.next_optional()? {
        read_bag(&bag, password, found, depth)?;
    }
    Ok(())
}

fn read_bag(
    bag: &Any<'_>,
    password: &str,
    found: &mut Found,
    depth: usize,
) -> Result<(), PfxError> {
    const PART: &str = "a bag (SafeBag)";
    let mut seq = Seq::of(bag, PART)?;
    let bag_id = oid(&seq.next()?, PART)?;
    let value = explicit(&seq.next()?, 0, PART)?;
    let local_key_id = match seq.next_optional()? {
        Some(attributes) => local_key_id(&attributes),
        None => None,
    };
    match bag_id {
        OID_KEY_BAG => {
            found.keys.push((normalize_pkcs8(&value)?, local_key_id));
        }
        OID_SHROUDED_KEY_BAG => {
            const PART: &str = "an encrypted private key";
            let mut info = Seq::of(&value, PART)?;
            let alg = info.next()?;
            let ciphertext = octets(&info.next()?, PART)?;
            let mut plain = decrypt(&alg, &ciphertext, password, "private key")?;
            let key = match parse_one(&plain, "the decrypted private key") {
                Ok((key, _)) => normalize_pkcs8(&key),
                Err(_) => Err(PfxError::DecryptionFailed {
                    what: "private key",
                }),
            };
            plain.fill(0);
            found.keys.push((key?, local_key_id));
        }
        OID_CERT_BAG => {
            const PART: &str = "a certificate bag";
            let mut cert_bag = Seq::of(&value, PART)?;
            let cert_type = oid(&cert_bag.next()?, PART)?;
            if cert_type == OID_X509_CERTIFICATE {
                let cert = explicit(&cert_bag.next()?, 0, PART)?;
                let der = octets(&cert, PART)?.into_owned();
                found.certs.push((der, local_key_id));
            }
            // Other certificate types (SDSI) are not for TLS: skipped.
        }
        OID_SAFE_CONTENTS_BAG => {
            let mut bags = Seq::of(&value, "a nested list of bags")?;
            if depth >= MAX_DEPTH {
                return Err(malformed(
                    "a nested list of bags",
                    "nests too deeply".into(),
                ));
            }
            while let Some(bag) = bags.next_optional()? {
                read_bag(&bag, password, found, depth + 1)?;
            }
        }
        // CRLs, secrets and unknown bags are not needed for a server certificate.
        _ => {}
    }
    Ok(())
}

/// The `localKeyId` attribute of a bag, if it has a well-formed one. Other attributes (friendly
/// name, Windows key provider) are ignored.
fn local_key_id(attributes: &Any<'_>) -> Option<Vec<u8>> {
    let mut set = Seq::set(attributes, "bag attributes").ok()?;
    while let Ok(Some(attribute)) = set.next_optional() {
        let mut attribute = Seq::of(&attribute, "a bag attribute").ok()?;
        let id = oid(&attribute.next().ok()?, "a bag attribute").ok()?;
        if id == OID_LOCAL_KEY_ID {
            let mut values = Seq::set(&attribute.next().ok()?, "a bag attribute").ok()?;
            let value = values.next().ok()?;
            return octets(&value, "a bag attribute").ok().map(Cow::into_owned);
        }
    }
    None
}

/// A PrivateKeyInfo re-encoded as version 0 without attributes or public key (Windows adds
/// key usage attributes; aws-lc-rs and other tools want the plain form).
fn normalize_pkcs8(key: &Any<'_>) -> Result<Vec<u8>, PfxError> {
    let invalid = |reason: &str| PfxError::InvalidKey {
        reason: format!("it is not a PKCS#8 private key ({reason})"),
    };
    let mut seq = Seq::of(key, "the private key").map_err(|_| invalid("not a SEQUENCE"))?;
    let version = seq
        .next()
        .and_then(|v| uint(&v, "the private key version"))
        .map_err(|_| invalid("no version"))?;
    if version > 1 {
        return Err(invalid("unknown version"));
    }
    let alg = seq.next().map_err(|_| invalid("no algorithm"))?;
    let (alg_id, alg_params) =
        algorithm(&alg, "the private key algorithm").map_err(|_| invalid("bad algorithm"))?;
    let private = seq
        .next()
        .and_then(|p| octets(&p, "the private key"))
        .map_err(|_| invalid("no key octets"))?;
    let mut alg_content = der(0x06, alg_id);
    if let Some(params) = alg_params {
        if params.header.class() != Class::Universal
            || params.tag() != Tag::Oid
            || params.header.is_constructed()
        {
            return Err(PfxError::InvalidKey {
                reason: "its algorithm parameters are not a named curve (only RSA, ECDSA on a named curve and Ed25519 keys are supported)".into(),
            });
        }
        alg_content.extend(der(0x06, params.data));
    } else if alg_id == OID_RSA {
        alg_content.extend([0x05, 0x00]);
    }
    let mut content = vec![0x02, 0x01, 0x00];
    content.extend(der(0x30, &alg_content));
    content.extend(der(0x04, &private));
    Ok(der(0x30, &content))
}

/// The public key of a PKCS#8 private key, as it appears in a certificate's
/// subjectPublicKeyInfo BIT STRING.
fn public_key(pkcs8: &[u8]) -> Result<Vec<u8>, PfxError> {
    use signature::KeyPair as _;
    let rejected = |e: aws_lc_rs::error::KeyRejected| PfxError::InvalidKey {
        reason: format!("aws-lc-rs refuses it ({e})"),
    };
    let (key, _) = parse_one(pkcs8, "the private key")?;
    let mut seq = Seq::of(&key, "the private key")?;
    let _version = seq.next()?;
    let (alg, _) = algorithm(&seq.next()?, "the private key algorithm")?;
    match alg {
        OID_RSA => signature::RsaKeyPair::from_pkcs8(pkcs8)
            .map(|k| k.public_key().as_ref().to_vec())
            .map_err(rejected),
        OID_EC_PUBLIC_KEY => {
            let mut last = None;
            for curve in [
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &signature::ECDSA_P521_SHA512_ASN1_SIGNING,
            ] {
                match signature::EcdsaKeyPair::from_pkcs8(curve, pkcs8) {
                    Ok(k) => return Ok(k.public_key().as_ref().to_vec()),
                    Err(e) => last = Some(e),
                }
            }
            Err(PfxError::InvalidKey {
                reason: format!(
                    "it is not an ECDSA key on P-256, P-384 or P-521 ({})",
                    last.map(|e| e.to_string()).unwrap_or_default()
                ),
            })
        }
        OID_ED25519 => signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map(|k| k.public_key().as_ref().to_vec())
            .map_err(rejected),
        other => Err(PfxError::InvalidKey {
            reason: format!(
                "its algorithm {} is not RSA, ECDSA or Ed25519",
                oid_name(other)
            ),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Putting the chain together.

struct Cert {
    der: Vec<u8>,
    local_key_id: Option<Vec<u8>>,
    subject: Vec<u8>,
    issuer: Vec<u8>,
    public_key: Vec<u8>,
}

fn assemble(found: Found) -> Result<PfxContents, PfxError> {
    let Found { keys, certs } = found;
    let mut distinct: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for (key, id) in keys {
        if !distinct.iter().any(|(k, _)| *k == key) {
            distinct.push((key, id));
        }
    }
    let (key_der, key_id) = match distinct.len() {
        0 => return Err(PfxError::NoPrivateKey),
        1 => distinct.remove(0),
        count => return Err(PfxError::SeveralPrivateKeys { count }),
    };
    if certs.is_empty() {
        return Err(PfxError::NoCertificate);
    }

    let mut parsed: Vec<Cert> = Vec::new();
    for (index, (der, local_key_id)) in certs.into_iter().enumerate() {
        if parsed.iter().any(|c| c.der == der) {
            continue;
        }
        let (subject, issuer, public_key) = {
            let (rest, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                PfxError::InvalidCertificate {
                    index: index + 1,
                    reason: e.to_string(),
                }
            })?;
            if !rest.is_empty() {
                return Err(PfxError::InvalidCertificate {
                    index: index + 1,
                    reason: "extra bytes after the certificate".into(),
                });
            }
            (
                cert.subject().as_raw().to_vec(),
                cert.issuer().as_raw().to_vec(),
                cert.public_key().subject_public_key.data.to_vec(),
            )
        };
        parsed.push(Cert {
            der,
            local_key_id,
            subject,
            issuer,
            public_key,
        });
    }

    let key_public = public_key(&key_der)?;
    let matching: Vec<usize> = (0..parsed.len())
        .filter(|i| parsed.get(*i).is_some_and(|c| c.public_key == key_public))
        .collect();
    let leaf = match matching.as_slice() {
        [] => {
            return Err(PfxError::NoMatchingCertificate {
                count: parsed.len(),
            });
        }
        [one] => *one,
        several => {
            let by_id: Vec<usize> = several
                .iter()
                .copied()
                .filter(|i| {
                    key_id.is_some() && parsed.get(*i).is_some_and(|c| c.local_key_id == key_id)
                })
                .collect();
            match by_id.as_slice() {
                [one] => *one,
                _ => {
                    return Err(PfxError::SeveralMatchingCertificates {
                        count: several.len(),
                    });
                }
            }
        }
    };

    // Leaf, then issuers as far as the file has them, then the rest in file order.
    let mut order = vec![leaf];
    let mut current = leaf;
    while let Some(cert) = parsed.get(current) {
        if cert.subject == cert.issuer {
            break;
        }
        let next = (0..parsed.len()).find(|i| {
            !order.contains(i) && parsed.get(*i).is_some_and(|c| c.subject == cert.issuer)
        });
        let Some(next) = next else {
            break;
        };
        order.push(next);
        current = next;
    }
    for i in 0..parsed.len() {
        if !order.contains(&i) {
            order.push(i);
        }
    }
    let chain_der: Vec<Vec<u8>> = order
        .into_iter()
        .filter_map(|i| parsed.get(i).map(|c| c.der.clone()))
        .collect();
    let chain_pem = chain_der
        .iter()
        .map(|der| pem("CERTIFICATE", der))
        .collect();
    let key_pem = pem("PRIVATE KEY", &key_der);
    Ok(PfxContents {
        chain_der,
        chain_pem,
        key_der,
        key_pem,
    })
}

/// A PEM block with 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    let mut rest = body.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_the_short_and_long_forms() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 0x02, 1, 2]);
        let long = der(0x04, &[0u8; 200]);
        assert_eq!(long.get(..3), Some(&[0x04, 0x81, 200][..]));
        let longer = der(0x04, &[0u8; 300]);
        assert_eq!(longer.get(..4), Some(&[0x04, 0x82, 0x01, 0x2c][..]));
    }

    #[test]
    fn the_mac_password_is_utf16_with_a_terminator() {
        assert_eq!(bmp_password(""), vec![0, 0]);
        assert_eq!(bmp_password("ab"), vec![0, b'a', 0, b'b', 0, 0]);
        assert_eq!(bmp_password("é"), vec![0, 0xe9, 0, 0]);
    }

    #[test]
    fn integers_are_non_negative_and_bounded() {
        let int = |bytes: &[u8]| {
            let mut encoded = vec![0x02, bytes.len() as u8];
            encoded.extend_from_slice(bytes);
            let (any, _) = parse_one(&encoded, "test").map_err(|e| e.to_string())?;
            uint(&any, "test").map_err(|e| e.to_string())
        };
        assert_eq!(int(&[0x08, 0x00]), Ok(2048));
        assert_eq!(int(&[0x00, 0xff]), Ok(255));
        assert!(int(&[0xff]).is_err());
        assert!(int(&[]).is_err());
        assert!(int(&[1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let text = pem("CERTIFICATE", &[0u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(lines.get(1).map(|l| l.len()), Some(64));
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
    }
}
