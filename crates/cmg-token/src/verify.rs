//! Verification by the rules of DESIGN §3.4.
//!
//! The order of checks is deliberate: structure, then the header's algorithm against an
//! allow-list, then the key named by `kid` (or `x5t`) and *its* algorithm, then the signature.
//! Only a token whose signature verified has its payload read, so no claim from an unsigned or
//! forged token can influence anything.

use std::collections::{HashMap, HashSet};

use cmg_proto::{AUDIENCE, BulkTokenClaims, ClientTokenClaims, TokenType};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::LEEWAY_SECS;
use crate::jws::{self, HeaderIn};
use crate::keys::VerificationKey;

/// Why a token was refused. Each variant is one rule; [`Refusal::rule`] names it for logs and
/// responses. No variant carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is not a compact JWS (three base64url parts separated by dots)")]
    Malformed,
    #[error("the token header is not valid JSON with an 'alg'")]
    BadHeader,
    #[error("the token uses algorithm '{0}', which is never accepted (only ES256 and RS256)")]
    AlgorithmNotAllowed(String),
    #[error("the token header has a 'crit' parameter, which this site does not support")]
    CriticalHeader,
    #[error("the token names no signing key (no 'kid' or 'x5t')")]
    MissingKeyId,
    #[error("the token was signed with key '{0}', which this site does not know or has retired")]
    UnknownKey(String),
    #[error("the token says '{found}' but key '{kid}' signs only with {expected}")]
    AlgorithmMismatch {
        kid: String,
        expected: &'static str,
        found: String,
    },
    #[error("the token signature does not verify")]
    BadSignature,
    #[error("the token payload is not valid JSON claims: {0}")]
    BadClaims(String),
    #[error("the token was issued by '{0}', not by this site's hierarchy")]
    WrongIssuer(String),
    #[error("the token is for audience '{0}', not '{AUDIENCE}'")]
    WrongAudience(String),
    #[error("the token belongs to tenant '{0}', not this hierarchy")]
    WrongTenant(String),
    #[error("a {expected} is required here, but this token is a {found}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
    #[error("the token expired at {exp} (Unix time)")]
    Expired { exp: i64 },
    #[error("the token is not valid before {nbf} (Unix time)")]
    NotYetValid { nbf: i64 },
    #[error("the token is bound to another certificate than the one presented")]
    CertificateMismatch,
    #[error("bulk registration token {0} is blocked")]
    BulkTokenBlocked(String),
    #[error("device {0} is blocked")]
    DeviceBlocked(String),
    #[error("token {0} was revoked")]
    TokenRevoked(String),
}

impl Refusal {
    /// A stable name for the rule that failed, for logs and the `error` detail of responses.
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::BadHeader => "bad_header",
            Refusal::AlgorithmNotAllowed(_) => "alg_not_allowed",
            Refusal::CriticalHeader => "crit_header",
            Refusal::MissingKeyId => "missing_kid",
            Refusal::UnknownKey(_) => "unknown_kid",
            Refusal::AlgorithmMismatch { .. } => "alg_mismatch",
            Refusal::BadSignature => "bad_signature",
            Refusal::BadClaims(_) => "bad_claims",
            Refusal::WrongIssuer(_) => "wrong_iss",
            Refusal::WrongAudience(_) => "wrong_aud",
            Refusal::WrongTenant(_) => "wrong_tenant",
            Refusal::WrongType { .. } => "wrong_type",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::CertificateMismatch => "cnf_mismatch",
            Refusal::BulkTokenBlocked(_) => "bulk_token_blocked",
            Refusal::DeviceBlocked(_) => "device_blocked",
            Refusal::TokenRevoked(_) => "token_revoked",
        }
    }
}

/// What the site has blocked or revoked; checked on every verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    /// `UniqueId`s (lower case) of blocked bulk registration tokens.
    pub bulk_tokens: HashSet<String>,
    /// Client IDs of blocked devices.
    pub devices: HashSet<String>,
    /// `jti`s of revoked client tokens.
    pub token_ids: HashSet<String>,
}

/// A token that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    Bulk(BulkTokenClaims),
    Client(ClientTokenClaims),
}

/// Checks tokens for one hierarchy against its published keys.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    by_kid: HashMap<String, VerificationKey>,
    kid_by_x5t: HashMap<String, String>,
    issuer: String,
    tenant_id: String,
}

/// The claims every token shares, read before the kind-specific ones.
#[derive(Deserialize)]
struct Common {
    #[serde(rename = "Type")]
    token_type: Option<String>,
    #[serde(rename = "TenantId")]
    tenant_id: Option<String>,
    iss: Option<String>,
    aud: Option<String>,
    nbf: Option<i64>,
    exp: Option<i64>,
}

impl TokenVerifier {
    pub fn new(hierarchy_id: &str, keys: impl IntoIterator<Item = VerificationKey>) -> Self {
        let by_kid: HashMap<String, VerificationKey> =
            keys.into_iter().map(|k| (k.kid().to_owned(), k)).collect();
        let kid_by_x5t = by_kid
            .values()
            .map(|k| (k.x5t().to_owned(), k.kid().to_owned()))
            .collect();
        TokenVerifier {
            by_kid,
            kid_by_x5t,
            issuer: cmg_proto::issuer(hierarchy_id),
            tenant_id: hierarchy_id.to_ascii_uppercase(),
        }
    }

    /// The JWKS document (RFC 7517 §5) of every key this verifier accepts, sorted by `kid`.
    pub fn jwks(&self) -> Value {
        let mut keys: Vec<&VerificationKey> = self.by_kid.values().collect();
        keys.sort_by(|a, b| a.kid().cmp(b.kid()));
        json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    /// Verifies a bulk registration token: only registration accepts it.
    pub fn verify_bulk(
        &self,
        token: &str,
        now: i64,
        revoked: &Revocations,
    ) -> Result<BulkTokenClaims, Refusal> {
        let payload = self.verify_common(token, now, TokenType::BulkRegistration)?;
        let claims: BulkTokenClaims =
            serde_json::from_value(payload).map_err(|e| Refusal::BadClaims(e.to_string()))?;
        if revoked
            .bulk_tokens
            .contains(&claims.unique_id.to_ascii_lowercase())
        {
            return Err(Refusal::BulkTokenBlocked(claims.unique_id));
        }
        Ok(claims)
    }

    /// Verifies a client token presented over TLS with the certificate whose SHA-256
    /// thumbprint (base64url) is `cert_thumbprint`.
    pub fn verify_client(
        &self,
        token: &str,
        cert_thumbprint: &str,
        now: i64,
        revoked: &Revocations,
    ) -> Result<ClientTokenClaims, Refusal> {
        let payload = self.verify_common(token, now, TokenType::ClientToken)?;
        let claims: ClientTokenClaims =
            serde_json::from_value(payload).map_err(|e| Refusal::BadClaims(e.to_string()))?;
        if !constant_time_eq(claims.cnf.x5t_s256.as_bytes(), cert_thumbprint.as_bytes()) {
            return Err(Refusal::CertificateMismatch);
        }
        if revoked.devices.contains(&claims.sub) {
            return Err(Refusal::DeviceBlocked(claims.sub));
        }
        if revoked.token_ids.contains(&claims.jti) {
            return Err(Refusal::TokenRevoked(claims.jti));
        }
        Ok(claims)
    }

    /// Signature, issuer, audience, tenant, type and time window: the rules every token obeys.
    fn verify_common(&self, token: &str, now: i64, expected: TokenType) -> Result<Value, Refusal> {
        let parts = jws::split(token).ok_or(Refusal::Malformed)?;
        let header_json = jws::b64(parts.header).ok_or(Refusal::Malformed)?;
        let header: HeaderIn =
            serde_json::from_slice(&header_json).map_err(|_| Refusal::BadHeader)?;
        if !matches!(header.alg.as_str(), "ES256" | "RS256") {
            return Err(Refusal::AlgorithmNotAllowed(sanitize(&header.alg)));
        }
        if header.crit.is_some() {
            return Err(Refusal::CriticalHeader);
        }
        let key = self.key_for(&header)?;
        if header.alg != key.algorithm().as_str() {
            return Err(Refusal::AlgorithmMismatch {
                kid: key.kid().to_owned(),
                expected: key.algorithm().as_str(),
                found: sanitize(&header.alg),
            });
        }
        let signature = jws::b64(parts.signature).ok_or(Refusal::Malformed)?;
        if !key.verify(parts.signing_input.as_bytes(), &signature) {
            return Err(Refusal::BadSignature);
        }
        let payload_json = jws::b64(parts.payload).ok_or(Refusal::Malformed)?;
        let payload: Value =
            serde_json::from_slice(&payload_json).map_err(|e| Refusal::BadClaims(e.to_string()))?;
        let common =
            Common::deserialize(&payload).map_err(|e| Refusal::BadClaims(e.to_string()))?;
        let missing = |name: &str| Refusal::BadClaims(format!("missing claim '{name}'"));
        let iss = common.iss.ok_or_else(|| missing("iss"))?;
        if iss != self.issuer {
            return Err(Refusal::WrongIssuer(sanitize(&iss)));
        }
        let aud = common.aud.ok_or_else(|| missing("aud"))?;
        if aud != AUDIENCE {
            return Err(Refusal::WrongAudience(sanitize(&aud)));
        }
        let tenant = common.tenant_id.ok_or_else(|| missing("TenantId"))?;
        if !tenant.eq_ignore_ascii_case(&self.tenant_id) {
            return Err(Refusal::WrongTenant(sanitize(&tenant)));
        }
        let token_type = common.token_type.ok_or_else(|| missing("Type"))?;
        if token_type != expected.as_str() {
            return Err(Refusal::WrongType {
                expected: expected.as_str(),
                found: sanitize(&token_type),
            });
        }
        let nbf = common.nbf.ok_or_else(|| missing("nbf"))?;
        let exp = common.exp.ok_or_else(|| missing("exp"))?;
        if now.saturating_add(LEEWAY_SECS) < nbf {
            return Err(Refusal::NotYetValid { nbf });
        }
        if now.saturating_sub(LEEWAY_SECS) >= exp {
            return Err(Refusal::Expired { exp });
        }
        Ok(payload)
    }

    fn key_for(&self, header: &HeaderIn) -> Result<&VerificationKey, Refusal> {
        let kid = match (&header.kid, &header.x5t) {
            (Some(kid), _) => kid,
            // ConfigMgr's own tokens carry only x5t; accept it as the key name too.
            (None, Some(x5t)) => self
                .kid_by_x5t
                .get(x5t)
                .ok_or_else(|| Refusal::UnknownKey(sanitize(x5t)))?,
            (None, None) => return Err(Refusal::MissingKeyId),
        };
        self.by_kid
            .get(kid)
            .ok_or_else(|| Refusal::UnknownKey(sanitize(kid)))
    }
}

/// Values from an untrusted token end up in messages: keep them short and printable.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
