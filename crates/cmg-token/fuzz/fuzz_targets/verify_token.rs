//! Any string presented as a bulk or client token: verification refuses it with a rule or
//! accepts it, and never panics (the gateway and the MP run this on every device's header).
#![no_main]

use std::sync::LazyLock;

use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use cmg_token::{Revocations, SigningKey, TokenVerifier};
use libfuzzer_sys::fuzz_target;

const HIERARCHY: &str = "6b1e4f4a-2c3d-4e5f-8a9b-0c1d2e3f4a5b";

/// One ES256 and one RS256 key, as a site after a key rotation publishes them.
static VERIFIER: LazyLock<TokenVerifier> = LazyLock::new(|| {
    let root = SiteAuthority::generate("ABC").expect("root");
    let keys = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048].map(|alg| {
        let cred = root.issue("ABC", &Role::TokenSigning, alg).expect("credential");
        let pkcs8 = cmg_pki::key_pem_to_pkcs8(cred.key_pem(), "key").expect("pkcs8");
        SigningKey::new(cred.cert_der(), &pkcs8)
            .expect("key")
            .verification_key()
            .clone()
    });
    TokenVerifier::new(HIERARCHY, keys)
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let revoked = Revocations::default();
    let now = 1_800_000_000;
    let _ = VERIFIER.verify_bulk(token, now, &revoked);
    let _ = VERIFIER.verify_client(token, "thumbprint", now, &revoked);
});
