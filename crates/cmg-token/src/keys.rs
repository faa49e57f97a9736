//! Token signing and verification keys, parsed once from the token signing certificate.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, ParsedPublicKey, RsaKeyPair};
use serde_json::{Value, json};
use x509_parser::public_key::PublicKey;

use crate::MintError;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// The JWS algorithms the site signs with. Nothing else is ever accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Es256,
    Rs256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::Rs256 => "RS256",
        }
    }
}

/// A key or certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the token signing certificate is not valid X.509: {0}")]
    Certificate(String),
    #[error("the token signing certificate has a {0} key; only ECDSA P-256 and RSA are supported")]
    UnsupportedKey(String),
    #[error("the token signing private key was rejected: {0}")]
    PrivateKey(String),
    #[error("the token signing private key does not belong to its certificate")]
    KeyMismatch,
}

fn thumbprints(cert_der: &[u8]) -> (String, String) {
    use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
    (
        URL_SAFE_NO_PAD.encode(digest(&SHA256, cert_der)),
        URL_SAFE_NO_PAD.encode(digest(&SHA1_FOR_LEGACY_USE_ONLY, cert_der)),
    )
}

/// The public half: verifies signatures and describes itself as a JWK.
#[derive(Clone)]
pub struct VerificationKey {
    alg: Algorithm,
    kid: String,
    x5t: String,
    key: ParsedPublicKey,
    jwk: Value,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish()
    }
}

impl VerificationKey {
    /// Reads the public key of a token signing certificate (DER).
    pub fn from_certificate(cert_der: &[u8]) -> Result<Self, KeyError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| KeyError::Certificate(e.to_string()))?;
        let spki = cert.public_key();
        let raw = spki.subject_public_key.data.as_ref();
        let (kid, x5t) = thumbprints(cert_der);
        let parsed = spki
            .parsed()
            .map_err(|e| KeyError::Certificate(e.to_string()))?;
        let (alg, key, mut jwk) = match parsed {
            PublicKey::EC(point) if point.key_size() == 256 && raw.len() == 65 => {
                let key = ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, raw)
                    .map_err(|e| KeyError::Certificate(e.to_string()))?;
                let (x, y) = raw[1..].split_at(32);
                let jwk = json!({
                    "kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
                });
                (Algorithm::Es256, key, jwk)
            }
            PublicKey::RSA(rsa) => {
                let key = ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, raw)
                    .map_err(|e| KeyError::Certificate(e.to_string()))?;
                let jwk = json!({
                    "kty": "RSA",
                    "n": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.modulus)),
                    "e": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.exponent)),
                });
                (Algorithm::Rs256, key, jwk)
            }
            PublicKey::EC(_) => return Err(KeyError::UnsupportedKey("non-P-256 EC".into())),
            _ => return Err(KeyError::UnsupportedKey("non-RSA, non-EC".into())),
        };
        if let Some(obj) = jwk.as_object_mut() {
            obj.insert("use".into(), "sig".into());
            obj.insert("alg".into(), alg.as_str().into());
            obj.insert("kid".into(), kid.clone().into());
            obj.insert("x5t".into(), x5t.clone().into());
            obj.insert("x5c".into(), json!([STANDARD.encode(cert_der)]));
        }
        Ok(VerificationKey {
            alg,
            kid,
            x5t,
            key,
            jwk,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
    /// SHA-256 thumbprint of the certificate, base64url: the JWS `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// SHA-1 thumbprint of the certificate, base64url: the JWS `x5t`.
    pub fn x5t(&self) -> &str {
        &self.x5t
    }
    /// This key as a JWK (RFC 7517), with `kid`, `x5t` and the certificate in `x5c`.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    pub(crate) fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        self.key.verify_sig(message, sig).is_ok()
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    &bytes[first..]
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// The private half: the active token signing key with its certificate's identity.
pub struct SigningKey {
    signer: Signer,
    rng: SystemRandom,
    public: VerificationKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.public.alg)
            .field("kid", &self.public.kid)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SigningKey {
    /// Builds the signer from the certificate (DER) and its PKCS#8 private key (DER), and checks
    /// that the two belong together so a mix-up fails at start-up, not at the first device.
    pub fn new(cert_der: &[u8], pkcs8_der: &[u8]) -> Result<Self, KeyError> {
        let public = VerificationKey::from_certificate(cert_der)?;
        let signer = match public.alg {
            Algorithm::Es256 => Signer::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der)
                    .map_err(|e| KeyError::PrivateKey(e.to_string()))?,
            ),
            Algorithm::Rs256 => Signer::Rsa(
                RsaKeyPair::from_pkcs8(pkcs8_der)
                    .map_err(|e| KeyError::PrivateKey(e.to_string()))?,
            ),
        };
        let key = SigningKey {
            signer,
            rng: SystemRandom::new(),
            public,
        };
        let probe = b"cmg key pairing check";
        let sig = key
            .sign(probe)
            .map_err(|e| KeyError::PrivateKey(e.to_string()))?;
        if !key.public.verify(probe, &sig) {
            return Err(KeyError::KeyMismatch);
        }
        Ok(key)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.public.alg
    }
    pub fn kid(&self) -> &str {
        &self.public.kid
    }
    pub fn x5t(&self) -> &str {
        &self.public.x5t
    }
    pub fn verification_key(&self) -> &VerificationKey {
        &self.public
    }

    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, MintError> {
        match &self.signer {
            Signer::Ec(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| MintError::Signing(e.to_string())),
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
                    .map_err(|e| MintError::Signing(e.to_string()))?;
                Ok(sig)
            }
        }
    }
}
