//! Wire types shared by every cmg role: the claims of bulk registration and client tokens
//! (DESIGN §3.2–§3.3) and the constants they are checked against, and the management point's
//! messages ([`mp`], DESIGN §5.2).
//!
//! This crate owns shapes and names only. It must not sign, verify, store or send anything:
//! signing and verification live in `cmg-token`, persistence in `cmg-store`.

use serde::{Deserialize, Serialize};

pub mod mp;
pub mod tunnel;

/// `aud` of every token the site issues.
pub const AUDIENCE: &str = "urn:sccm:service";
/// Prefix of `iss`; the hierarchy GUID (lower case) follows.
pub const ISSUER_PREFIX: &str = "urn:sccm:oauth2:";
/// `SCCMTokenCategory` of a bulk registration token.
pub const PRE_AUTH_CATEGORY: &str = "SCCMPreAuthToken";
/// `Authority` and `License` of a bulk registration token.
pub const SCCM: &str = "SCCM";

/// The issuer string for a hierarchy.
pub fn issuer(hierarchy_id: &str) -> String {
    format!("{ISSUER_PREFIX}{}", hierarchy_id.to_ascii_lowercase())
}

/// The `Type` claim: what a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenType {
    /// Lets any device register once, until it expires or is blocked.
    BulkRegistration,
    /// Issued to one device, bound to its certificate.
    ClientToken,
}

impl TokenType {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::BulkRegistration => "BulkRegistration",
            TokenType::ClientToken => "ClientToken",
        }
    }
}

/// Claims of a bulk registration token, named as ConfigMgr names them (DESIGN §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkTokenClaims {
    #[serde(rename = "SCCMTokenCategory")]
    pub category: String,
    #[serde(rename = "Authority")]
    pub authority: String,
    #[serde(rename = "License")]
    pub license: String,
    #[serde(rename = "Type")]
    pub token_type: TokenType,
    /// Hierarchy GUID, upper case.
    #[serde(rename = "TenantId")]
    pub tenant_id: String,
    /// Tracking GUID, lower case; the only thing the site records about the token.
    #[serde(rename = "UniqueId")]
    pub unique_id: String,
    pub iss: String,
    pub aud: String,
    pub nbf: i64,
    pub exp: i64,
}

/// How a device first proved it may join the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisteredVia {
    InternalNetwork,
    BulkRegistration,
    #[serde(rename = "PKI")]
    Pki,
}

impl RegisteredVia {
    pub fn as_str(self) -> &'static str {
        match self {
            RegisteredVia::InternalNetwork => "InternalNetwork",
            RegisteredVia::BulkRegistration => "BulkRegistration",
            RegisteredVia::Pki => "PKI",
        }
    }
}

/// RFC 8705-style confirmation: the SHA-256 thumbprint of the certificate the token is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// Claims of a client token (DESIGN §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTokenClaims {
    #[serde(rename = "Type")]
    pub token_type: TokenType,
    #[serde(rename = "TenantId")]
    pub tenant_id: String,
    #[serde(rename = "SiteCode")]
    pub site_code: String,
    /// The client ID, `GUID:` + upper-case GUID.
    pub sub: String,
    pub cnf: Confirmation,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Token ID, so a single token can be revoked.
    pub jti: String,
    #[serde(rename = "RegisteredVia")]
    pub registered_via: RegisteredVia,
    #[serde(
        rename = "BulkTokenId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub bulk_token_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_claims_use_the_documented_names() {
        let claims = BulkTokenClaims {
            category: PRE_AUTH_CATEGORY.into(),
            authority: SCCM.into(),
            license: SCCM.into(),
            token_type: TokenType::BulkRegistration,
            tenant_id: "CDCC5E91-0ADF-4A24-82D0-196667F1C081".into(),
            unique_id: "db591e33-06fd-4c5b-82f3-bf673e5bd0a2".into(),
            iss: issuer("CDCC5E91-0ADF-4A24-82D0-196667F1C081"),
            aud: AUDIENCE.into(),
            nbf: 1_580_156_305,
            exp: 1_580_415_505,
        };
        let json = serde_json::to_value(&claims).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for name in [
            "SCCMTokenCategory",
            "Authority",
            "License",
            "Type",
            "TenantId",
            "UniqueId",
            "iss",
            "aud",
            "nbf",
            "exp",
        ] {
            assert!(keys.contains(&name), "missing claim {name}");
        }
        assert_eq!(json["Type"], "BulkRegistration");
        assert_eq!(
            json["iss"],
            "urn:sccm:oauth2:cdcc5e91-0adf-4a24-82d0-196667f1c081"
        );
    }

    #[test]
    fn client_claims_carry_cnf_and_registration_path() {
        let json = serde_json::json!({
            "Type": "ClientToken", "TenantId": "T", "SiteCode": "ABC", "sub": "GUID:X",
            "cnf": {"x5t#S256": "abc"}, "iss": "i", "aud": "a", "iat": 1, "nbf": 1, "exp": 2,
            "jti": "j", "RegisteredVia": "PKI"
        });
        let claims: ClientTokenClaims = serde_json::from_value(json).unwrap();
        assert_eq!(claims.registered_via, RegisteredVia::Pki);
        assert_eq!(claims.cnf.x5t_s256, "abc");
        assert_eq!(claims.bulk_token_id, None);
    }
}
