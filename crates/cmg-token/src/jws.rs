//! The JWS compact serialisation (RFC 7515 §7.1): `b64(header).b64(payload).b64(signature)`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::keys::SigningKey;
use crate::{MintError, Token};

/// The protected header we write: `typ`, `alg`, `x5t` (SHA-1) and `kid` (SHA-256 thumbprint).
#[derive(Serialize)]
struct HeaderOut<'a> {
    typ: &'static str,
    alg: &'static str,
    x5t: &'a str,
    kid: &'a str,
}

/// The header fields we read. Anything else in a header is ignored, but `crit` is refused
/// because RFC 7515 §4.1.11 says a verifier that does not understand it must reject the token.
#[derive(Deserialize)]
pub(crate) struct HeaderIn {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub x5t: Option<String>,
    #[serde(default)]
    pub crit: Option<serde_json::Value>,
}

pub(crate) fn sign<T: Serialize>(key: &SigningKey, claims: &T) -> Result<Token, MintError> {
    let header = HeaderOut {
        typ: "JWT",
        alg: key.algorithm().as_str(),
        x5t: key.x5t(),
        kid: key.kid(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| MintError::Signing(e.to_string()))?;
    let payload = serde_json::to_vec(claims).map_err(|e| MintError::Signing(e.to_string()))?;
    let mut out = String::with_capacity(64 + (header.len() + payload.len()) * 4 / 3 + 350);
    URL_SAFE_NO_PAD.encode_string(&header, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
    let signature = key.sign(out.as_bytes())?;
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&signature, &mut out);
    Ok(Token(out))
}

/// The three parts of a compact JWS, split but not yet trusted.
pub(crate) struct Parts<'a> {
    pub signing_input: &'a str,
    pub header: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
}

pub(crate) fn split(token: &str) -> Option<Parts<'_>> {
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (header, payload) = signing_input.split_once('.')?;
    if payload.contains('.') {
        return None;
    }
    Some(Parts {
        signing_input,
        header,
        payload,
        signature,
    })
}

pub(crate) fn b64(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part).ok()
}
