//! Signing and verification of the site's tokens — bulk registration tokens (DESIGN §3.2) and
//! client tokens (§3.3) — by the rules of §3.4, and the JWKS document that publishes the keys.
//!
//! Keys are parsed once, when a [`SigningKey`] or [`VerificationKey`] is built, and then used
//! for every token: nothing on the mint or verify path re-reads PEM or DER. The JWS compact form
//! is produced and checked here directly with aws-lc-rs, so that the algorithm is always the one
//! bound to the key (`kid`) and never the one a token claims for itself.
//!
//! This crate must not read files, talk to the database, or decide *whether* a device may have a
//! token: it is told the hierarchy, the keys and what is revoked, and answers with claims or a
//! [`Refusal`] naming the rule that failed. It never puts a token into an error or `Debug` output.

mod jws;
mod keys;
mod verify;

pub use keys::{Algorithm, KeyError, SigningKey, VerificationKey};
pub use verify::{Refusal, Revocations, TokenVerifier, Verified};

use cmg_proto::{
    AUDIENCE, BulkTokenClaims, ClientTokenClaims, Confirmation, PRE_AUTH_CATEGORY, RegisteredVia,
    SCCM, TokenType,
};
use std::fmt;

/// Leeway allowed on `nbf` and `exp`, in seconds (DESIGN §3.4: at most 5 minutes).
pub const LEEWAY_SECS: i64 = 300;

/// A signed token. It is a bearer secret: `Debug` hides it and it has no `Display`, so it cannot
/// slip into a log line by accident; [`Token::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The compact JWS, for the one place that must hand it over (stdout, an HTTP body).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why minting failed. Only a broken key can cause it.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the token signing key could not sign: {0}")]
    Signing(String),
    #[error("a client token needs a validity of at least one second, got {0} s")]
    BadValidity(i64),
}

/// What the site knows when it issues a client token.
#[derive(Debug, Clone)]
pub struct ClientTokenRequest<'a> {
    /// `GUID:` + upper-case GUID.
    pub client_id: &'a str,
    /// [`cmg_pki`-style] base64url SHA-256 thumbprint of the device's certificate.
    pub cert_thumbprint: &'a str,
    pub registered_via: RegisteredVia,
    pub bulk_token_id: Option<&'a str>,
    /// Token ID (`jti`), unique per token.
    pub token_id: &'a str,
    pub now: i64,
    pub validity_secs: i64,
}

/// Mints the site's tokens with its active signing key.
pub struct TokenIssuer {
    key: SigningKey,
    tenant_id: String,
    issuer: String,
    site_code: String,
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("kid", &self.key.kid())
            .field("tenant_id", &self.tenant_id)
            .finish()
    }
}

impl TokenIssuer {
    pub fn new(key: SigningKey, hierarchy_id: &str, site_code: &str) -> Self {
        TokenIssuer {
            key,
            tenant_id: hierarchy_id.to_ascii_uppercase(),
            issuer: cmg_proto::issuer(hierarchy_id),
            site_code: site_code.to_owned(),
        }
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// A bulk registration token with tracking GUID `unique_id`, valid from `nbf` for
    /// `lifetime_secs`. The caller checks the lifetime against the tool's limits.
    pub fn mint_bulk(
        &self,
        unique_id: &str,
        nbf: i64,
        lifetime_secs: i64,
    ) -> Result<(Token, BulkTokenClaims), MintError> {
        let claims = BulkTokenClaims {
            category: PRE_AUTH_CATEGORY.into(),
            authority: SCCM.into(),
            license: SCCM.into(),
            token_type: TokenType::BulkRegistration,
            tenant_id: self.tenant_id.clone(),
            unique_id: unique_id.to_ascii_lowercase(),
            iss: self.issuer.clone(),
            aud: AUDIENCE.into(),
            nbf,
            exp: nbf + lifetime_secs,
        };
        let token = jws::sign(&self.key, &claims)?;
        Ok((token, claims))
    }

    /// A client token bound to the device certificate named in `req`.
    pub fn mint_client(
        &self,
        req: &ClientTokenRequest<'_>,
    ) -> Result<(Token, ClientTokenClaims), MintError> {
        if req.validity_secs < 1 {
            return Err(MintError::BadValidity(req.validity_secs));
        }
        let claims = ClientTokenClaims {
            token_type: TokenType::ClientToken,
            tenant_id: self.tenant_id.clone(),
            site_code: self.site_code.clone(),
            sub: req.client_id.to_owned(),
            cnf: Confirmation {
                x5t_s256: req.cert_thumbprint.to_owned(),
            },
            iss: self.issuer.clone(),
            aud: AUDIENCE.into(),
            iat: req.now,
            nbf: req.now,
            exp: req.now + req.validity_secs,
            jti: req.token_id.to_owned(),
            registered_via: req.registered_via,
            bulk_token_id: req.bulk_token_id.map(str::to_owned),
        };
        let token = jws::sign(&self.key, &claims)?;
        Ok((token, claims))
    }
}
