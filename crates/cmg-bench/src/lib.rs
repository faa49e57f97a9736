//! Benchmarks of cmg's hot paths (criterion, under `benches/`) and the fixtures they share.
//! Speed and memory goals are checked here, never by timed tests.
//!
//! This crate must not be a dependency of any role: it exists to measure them.

use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use cmg_proto::RegisteredVia;
use cmg_token::{ClientTokenRequest, SigningKey, Token, TokenIssuer, TokenVerifier};

/// A hierarchy's issuer and verifier over one freshly made token signing key.
pub struct TokenFixture {
    pub issuer: TokenIssuer,
    pub verifier: TokenVerifier,
}

/// The certificate thumbprint the fixture's client tokens are bound to.
pub const DEVICE_THUMBPRINT: &str = "f4k3-d3v1c3-c3rt1f1c4t3-thumbpr1nt-sha256-b64u";

impl TokenFixture {
    /// Panics on failure: benchmark set-up.
    pub fn new(alg: KeyAlgorithm) -> Self {
        let root = SiteAuthority::generate("BEN").expect("site root");
        let cred = root
            .issue("BEN", &Role::TokenSigning, alg)
            .expect("token signing cert");
        let pkcs8 = cmg_pki::key_pem_to_pkcs8(cred.key_pem(), "bench key").expect("pkcs8");
        let key = SigningKey::new(cred.cert_der(), &pkcs8).expect("signing key");
        let hierarchy = uuid::Uuid::new_v4().to_string();
        let verifier = TokenVerifier::new(&hierarchy, [key.verification_key().clone()]);
        TokenFixture {
            issuer: TokenIssuer::new(key, &hierarchy, "BEN"),
            verifier,
        }
    }

    /// A 90-day client token minted at `now`.
    pub fn client_token(&self, now: i64) -> Token {
        let req = ClientTokenRequest {
            client_id: "GUID:6D3C2B1A-0000-4000-8000-000000000001",
            cert_thumbprint: DEVICE_THUMBPRINT,
            registered_via: RegisteredVia::BulkRegistration,
            bulk_token_id: Some("2f0c6a57-8d8b-4c1e-9d47-0c6d9b0d1e11"),
            token_id: "bench-jti",
            now,
            validity_secs: 90 * 86_400,
        };
        self.issuer.mint_client(&req).expect("mint").0
    }
}
