//! Every rule of DESIGN §3.4, each in its own test, plus interoperability with independent JWT
//! implementations (the `jsonwebtoken` crate and Python's PyJWT) through the JWKS document.

use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use cmg_proto::RegisteredVia;
use cmg_token::{ClientTokenRequest, Refusal, Revocations, SigningKey, TokenIssuer, TokenVerifier};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

const HIERARCHY: &str = "cdcc5e91-0adf-4a24-82d0-196667f1c081";
const NOW: i64 = 1_800_000_000;
const BULK_ID: &str = "db591e33-06fd-4c5b-82f3-bf673e5bd0a2";
const DEVICE_CERT: &str = "device-cert-thumbprint-sha256";

struct Site {
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    key_pem: String,
    alg: jsonwebtoken::Algorithm,
}

fn site(alg: KeyAlgorithm) -> Site {
    let root = SiteAuthority::generate("ABC").unwrap();
    let cred = root.issue("ABC", &Role::TokenSigning, alg).unwrap();
    let pkcs8 = cmg_pki::key_pem_to_pkcs8(cred.key_pem(), "test key").unwrap();
    let key = SigningKey::new(cred.cert_der(), &pkcs8).unwrap();
    let verifier = TokenVerifier::new(HIERARCHY, [key.verification_key().clone()]);
    let jwt_alg = match alg {
        KeyAlgorithm::EcdsaP256 => jsonwebtoken::Algorithm::ES256,
        KeyAlgorithm::Rsa2048 => jsonwebtoken::Algorithm::RS256,
    };
    Site {
        issuer: TokenIssuer::new(key, HIERARCHY, "ABC"),
        verifier,
        key_pem: cred.key_pem().to_owned(),
        alg: jwt_alg,
    }
}

fn es256() -> Site {
    site(KeyAlgorithm::EcdsaP256)
}

impl Site {
    fn bulk(&self) -> String {
        self.issuer
            .mint_bulk(BULK_ID, NOW, 4320 * 60)
            .unwrap()
            .0
            .expose()
            .to_owned()
    }

    fn client(&self) -> String {
        let req = ClientTokenRequest {
            client_id: "GUID:0C2D1D3A-0000-4000-8000-000000000001",
            cert_thumbprint: DEVICE_CERT,
            registered_via: RegisteredVia::BulkRegistration,
            bulk_token_id: Some(BULK_ID),
            token_id: "jti-1",
            now: NOW,
            validity_secs: 90 * 86400,
        };
        self.issuer.mint_client(&req).unwrap().0.expose().to_owned()
    }

    /// Signs arbitrary claims with the site's real key through an independent JWT library,
    /// so that only the claim under test is wrong.
    fn forge(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.issuer.key().kid().to_owned());
        let key = match self.alg {
            jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(self.key_pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(self.key_pem.as_bytes()),
        }
        .unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn check_bulk(&self, token: &str) -> Result<(), Refusal> {
        self.verifier
            .verify_bulk(token, NOW, &Revocations::default())
            .map(|_| ())
    }

    fn check_client(&self, token: &str) -> Result<(), Refusal> {
        self.verifier
            .verify_client(token, DEVICE_CERT, NOW, &Revocations::default())
            .map(|_| ())
    }
}

fn bulk_claims() -> Value {
    json!({
        "SCCMTokenCategory": "SCCMPreAuthToken", "Authority": "SCCM", "License": "SCCM",
        "Type": "BulkRegistration", "TenantId": HIERARCHY.to_uppercase(), "UniqueId": BULK_ID,
        "iss": format!("urn:sccm:oauth2:{HIERARCHY}"), "aud": "urn:sccm:service",
        "nbf": NOW, "exp": NOW + 3600,
    })
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn part(token: &str, i: usize) -> &str {
    token.split('.').nth(i).unwrap()
}

#[test]
fn minted_tokens_verify() {
    for s in [site(KeyAlgorithm::EcdsaP256), site(KeyAlgorithm::Rsa2048)] {
        let bulk = s
            .verifier
            .verify_bulk(&s.bulk(), NOW, &Revocations::default())
            .unwrap();
        assert_eq!(bulk.unique_id, BULK_ID);
        assert_eq!(bulk.exp - bulk.nbf, 259_200);
        let client =
            s.verifier
                .verify_client(&s.client(), DEVICE_CERT, NOW, &Revocations::default());
        assert_eq!(
            client.unwrap().registered_via,
            RegisteredVia::BulkRegistration
        );
        // A forged token with correct claims is accepted: the refusals below are about the claim.
        s.check_bulk(&s.forge(&bulk_claims())).unwrap();
    }
}

#[test]
fn refuses_alg_none() {
    let s = es256();
    let header = json!({"typ": "JWT", "alg": "none", "kid": s.issuer.key().kid()});
    let token = format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(bulk_claims().to_string().as_bytes())
    );
    assert_eq!(
        s.check_bulk(&token),
        Err(Refusal::AlgorithmNotAllowed("none".into()))
    );
}

#[test]
fn refuses_hs256_signed_with_the_public_key() {
    let s = es256();
    let public_pem = {
        let cert = json!(s.verifier.jwks())["keys"][0]["x5c"][0]
            .as_str()
            .unwrap()
            .to_owned();
        format!("-----BEGIN CERTIFICATE-----\n{cert}\n-----END CERTIFICATE-----\n")
    };
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(s.issuer.key().kid().to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &bulk_claims(),
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        s.check_bulk(&token),
        Err(Refusal::AlgorithmNotAllowed("HS256".into()))
    );
}

#[test]
fn refuses_unknown_kid() {
    let s = es256();
    let other = es256();
    let token = other.bulk();
    assert!(matches!(s.check_bulk(&token), Err(Refusal::UnknownKey(_))));
}

#[test]
fn refuses_an_algorithm_other_than_the_keys() {
    let s = es256();
    let rsa = site(KeyAlgorithm::Rsa2048);
    // RS256-signed, but naming the ES256 key.
    let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(s.issuer.key().kid().to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &bulk_claims(),
        &EncodingKey::from_rsa_pem(rsa.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        s.check_bulk(&token),
        Err(Refusal::AlgorithmMismatch { .. })
    ));
}

fn with(claim: &str, value: Value) -> Value {
    let mut c = bulk_claims();
    c[claim] = value;
    c
}

#[test]
fn refuses_wrong_issuer() {
    let s = es256();
    let token = s.forge(&with(
        "iss",
        json!("urn:sccm:oauth2:00000000-0000-0000-0000-000000000000"),
    ));
    assert!(matches!(s.check_bulk(&token), Err(Refusal::WrongIssuer(_))));
}

#[test]
fn refuses_wrong_audience() {
    let s = es256();
    let token = s.forge(&with("aud", json!("urn:other:service")));
    assert_eq!(
        s.check_bulk(&token),
        Err(Refusal::WrongAudience("urn:other:service".into()))
    );
}

#[test]
fn refuses_wrong_type() {
    let s = es256();
    let token = s.forge(&with("Type", json!("SomethingElse")));
    assert!(matches!(
        s.check_bulk(&token),
        Err(Refusal::WrongType { .. })
    ));
}

#[test]
fn refuses_wrong_tenant() {
    let s = es256();
    let token = s.forge(&with(
        "TenantId",
        json!("00000000-0000-0000-0000-000000000000"),
    ));
    assert!(matches!(s.check_bulk(&token), Err(Refusal::WrongTenant(_))));
}

#[test]
fn refuses_expired_beyond_leeway_only() {
    let s = es256();
    let mut c = bulk_claims();
    c["nbf"] = json!(NOW - 7200);
    c["exp"] = json!(NOW - 301);
    assert_eq!(
        s.check_bulk(&s.forge(&c)),
        Err(Refusal::Expired { exp: NOW - 301 })
    );
    c["exp"] = json!(NOW - 200);
    s.check_bulk(&s.forge(&c))
        .expect("within the 5-minute leeway");
}

#[test]
fn refuses_not_yet_valid_beyond_leeway_only() {
    let s = es256();
    let mut c = bulk_claims();
    c["nbf"] = json!(NOW + 301);
    c["exp"] = json!(NOW + 7200);
    assert_eq!(
        s.check_bulk(&s.forge(&c)),
        Err(Refusal::NotYetValid { nbf: NOW + 301 })
    );
    c["nbf"] = json!(NOW + 299);
    s.check_bulk(&s.forge(&c))
        .expect("within the 5-minute leeway");
}

#[test]
fn refuses_tampered_header() {
    let s = es256();
    let token = s.bulk();
    let header: Value = serde_json::from_slice(&base64_decode(part(&token, 0))).unwrap();
    let mut tampered = header.clone();
    tampered["typ"] = json!("JOSE");
    let token = format!(
        "{}.{}.{}",
        b64(tampered.to_string().as_bytes()),
        part(&token, 1),
        part(&token, 2)
    );
    assert_eq!(s.check_bulk(&token), Err(Refusal::BadSignature));
}

#[test]
fn refuses_tampered_payload() {
    let s = es256();
    let token = s.bulk();
    let mut claims: Value = serde_json::from_slice(&base64_decode(part(&token, 1))).unwrap();
    claims["exp"] = json!(NOW + 10 * 86400);
    let token = format!(
        "{}.{}.{}",
        part(&token, 0),
        b64(claims.to_string().as_bytes()),
        part(&token, 2)
    );
    assert_eq!(s.check_bulk(&token), Err(Refusal::BadSignature));
}

#[test]
fn refuses_tampered_signature() {
    for s in [site(KeyAlgorithm::EcdsaP256), site(KeyAlgorithm::Rsa2048)] {
        let token = s.bulk();
        let mut sig = base64_decode(part(&token, 2));
        sig[10] ^= 0x01;
        let token = format!("{}.{}.{}", part(&token, 0), part(&token, 1), b64(&sig));
        assert_eq!(s.check_bulk(&token), Err(Refusal::BadSignature));
    }
}

#[test]
fn refuses_a_bulk_token_where_a_client_token_is_required() {
    let s = es256();
    assert_eq!(
        s.check_client(&s.bulk()),
        Err(Refusal::WrongType {
            expected: "ClientToken",
            found: "BulkRegistration".into()
        })
    );
}

#[test]
fn refuses_a_client_token_where_a_bulk_token_is_required() {
    let s = es256();
    assert_eq!(
        s.check_bulk(&s.client()),
        Err(Refusal::WrongType {
            expected: "BulkRegistration",
            found: "ClientToken".into()
        })
    );
}

#[test]
fn refuses_a_client_token_bound_to_another_certificate() {
    let s = es256();
    let r = s.verifier.verify_client(
        &s.client(),
        "another-certificate",
        NOW,
        &Revocations::default(),
    );
    assert_eq!(r, Err(Refusal::CertificateMismatch));
}

#[test]
fn refuses_a_blocked_bulk_token() {
    let s = es256();
    let mut revoked = Revocations::default();
    revoked.bulk_tokens.insert(BULK_ID.to_owned());
    let r = s.verifier.verify_bulk(&s.bulk(), NOW, &revoked);
    assert_eq!(r, Err(Refusal::BulkTokenBlocked(BULK_ID.into())));
}

#[test]
fn refuses_a_blocked_device_and_a_revoked_token_id() {
    let s = es256();
    let mut revoked = Revocations::default();
    revoked
        .devices
        .insert("GUID:0C2D1D3A-0000-4000-8000-000000000001".into());
    let r = s
        .verifier
        .verify_client(&s.client(), DEVICE_CERT, NOW, &revoked);
    assert!(matches!(r, Err(Refusal::DeviceBlocked(_))));
    let mut revoked = Revocations::default();
    revoked.token_ids.insert("jti-1".into());
    let r = s
        .verifier
        .verify_client(&s.client(), DEVICE_CERT, NOW, &revoked);
    assert_eq!(r, Err(Refusal::TokenRevoked("jti-1".into())));
}

#[test]
fn refusals_never_echo_the_token() {
    let s = es256();
    let token = s.bulk();
    let err = s.check_client(&token).unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(part(&token, 2)) && !text.contains(part(&token, 1)));
    }
    let minted = s.issuer.mint_bulk(BULK_ID, NOW, 60).unwrap().0;
    assert!(!format!("{minted:?}").contains(part(minted.expose(), 2)));
}

#[test]
fn key_rotation_keeps_old_tokens_valid_until_the_old_key_retires() {
    let old = es256();
    let new = site(KeyAlgorithm::Rsa2048);
    let old_key = old.issuer.key().verification_key().clone();
    let new_key = new.issuer.key().verification_key().clone();
    let both = TokenVerifier::new(HIERARCHY, [old_key, new_key.clone()]);
    let none = Revocations::default();
    both.verify_bulk(&old.bulk(), NOW, &none)
        .expect("old key still verifies");
    both.verify_bulk(&new.bulk(), NOW, &none)
        .expect("new key verifies");
    assert_eq!(both.jwks()["keys"].as_array().unwrap().len(), 2);
    let retired = TokenVerifier::new(HIERARCHY, [new_key]);
    assert!(matches!(
        retired.verify_bulk(&old.bulk(), NOW, &none),
        Err(Refusal::UnknownKey(_))
    ));
}

#[test]
fn configmgr_style_x5t_only_header_finds_the_key() {
    let s = es256();
    let mut header = Header::new(s.alg);
    header.x5t = Some(s.issuer.key().x5t().to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &bulk_claims(),
        &EncodingKey::from_ec_pem(s.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    s.check_bulk(&token).unwrap();
}

#[test]
fn the_documented_example_token_is_refused_cleanly() {
    // From the product documentation: another hierarchy's (and truncated-signature) token.
    let doc = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6Ik9Tbzh2Tmd5VldRUjlDYVh5T2lacHFlMDlXNCJ9.eyJTQ0NNVG9rZW5DYXRlZ29yeSI6IlNDQ01QcmVBdXRoVG9rZW4ifQ.ZUJkxCX6lxHUZhMH_WhYXFm";
    let s = es256();
    assert!(matches!(s.check_bulk(doc), Err(Refusal::UnknownKey(_))));
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// Independent implementation #1: the `jsonwebtoken` crate, keys taken only from our JWKS.
#[test]
fn jsonwebtoken_crate_verifies_our_tokens_from_the_jwks() {
    for s in [site(KeyAlgorithm::EcdsaP256), site(KeyAlgorithm::Rsa2048)] {
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(s.verifier.jwks()).unwrap();
        let jwk = jwks.find(s.issuer.key().kid()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(s.alg);
        validation.set_audience(&["urn:sccm:service"]);
        validation.set_issuer(&[format!("urn:sccm:oauth2:{HIERARCHY}")]);
        // Our test clock is fixed in the future; the library uses the real clock.
        validation.validate_nbf = false;
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Value>(s.bulk(), &key, &validation).unwrap();
        assert_eq!(data.claims["UniqueId"], BULK_ID);
        let data = jsonwebtoken::decode::<Value>(s.client(), &key, &validation).unwrap();
        assert_eq!(data.claims["cnf"]["x5t#S256"], DEVICE_CERT);
    }
}

/// Independent implementation #2: Python's PyJWT (Debian's python3-jwt), keys only from JWKS.
#[test]
fn pyjwt_verifies_our_tokens_from_the_jwks() {
    let python = std::env::var("CMG_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let script = r#"
import json, sys, jwt
jwks, token, alg, iss = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
kid = jwt.get_unverified_header(token)["kid"]
key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
claims = jwt.decode(token, key.key, algorithms=[alg], audience="urn:sccm:service", issuer=iss,
                    options={"verify_exp": False, "verify_nbf": False})
print(claims["UniqueId"])
"#;
    for s in [site(KeyAlgorithm::EcdsaP256), site(KeyAlgorithm::Rsa2048)] {
        let alg = format!("{:?}", s.alg);
        let out = std::process::Command::new(&python)
            .args([
                "-c",
                script,
                &s.verifier.jwks().to_string(),
                &s.bulk(),
                &alg,
            ])
            .arg(format!("urn:sccm:oauth2:{HIERARCHY}"))
            .output()
            .expect("python3 with PyJWT (Debian package python3-jwt) is needed for this test");
        assert!(
            out.status.success(),
            "PyJWT refused our {alg} token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), BULK_ID);
    }
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::from),
            prop_oneof![Just("ES256"), Just("RS256"), Just("none"), Just("HS256")]
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("alg".to_string()),
                        Just("kid".to_string()),
                        Just("Type".to_string()),
                        Just("exp".to_string()),
                        Just("cnf".to_string()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let s = es256_cached();
            let text = String::from_utf8_lossy(&bytes);
            prop_assert!(s.verifier.verify_bulk(&text, NOW, &Revocations::default()).is_err());
            prop_assert!(s.verifier.verify_client(&text, DEVICE_CERT, NOW, &Revocations::default()).is_err());
        }

        #[test]
        fn arbitrary_json(header in json_value(), payload in json_value(), sig in prop::collection::vec(any::<u8>(), 0..80)) {
            let s = es256_cached();
            let token = format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(payload.to_string().as_bytes()), b64(&sig));
            prop_assert!(s.verifier.verify_bulk(&token, NOW, &Revocations::default()).is_err());
            prop_assert!(s.verifier.verify_client(&token, DEVICE_CERT, NOW, &Revocations::default()).is_err());
        }

        #[test]
        fn arbitrary_claims_with_a_real_signature(payload in json_value()) {
            // Signed by the real key, so the claims parser itself is exercised.
            let s = es256_cached();
            let token = s.forge(&payload);
            // No generated value is a complete, valid claim set.
            prop_assert!(s.verifier.verify_bulk(&token, NOW, &Revocations::default()).is_err());
            prop_assert!(s.verifier.verify_client(&token, DEVICE_CERT, NOW, &Revocations::default()).is_err());
        }
    }

    fn es256_cached() -> &'static Site {
        static SITE: std::sync::OnceLock<Site> = std::sync::OnceLock::new();
        SITE.get_or_init(es256)
    }
}
