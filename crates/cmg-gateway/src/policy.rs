//! The rules of DESIGN §4 and §5.1 as pure functions: which URLs a device may reach, and who it
//! is. Everything here is decided from the CMG's settings (received over a tunnel), the device's
//! certificate thumbprint and its `Authorization` header; nothing does I/O.

use std::collections::HashSet;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cmg_proto::mp;
use cmg_proto::tunnel::{GatewaySettings, PROXY_PREFIXES};
use cmg_token::{Refusal, Revocations, TokenVerifier, VerificationKey};
use hyper::StatusCode;
use hyper::header::HeaderValue;

use crate::error::Denial;

/// The settings in force, with everything derived from them built once.
#[derive(Debug)]
pub(crate) struct Active {
    pub settings: GatewaySettings,
    pub verifier: TokenVerifier,
    pub revocations: Revocations,
    pub url_map: HashSet<String>,
    pub management_points: HashSet<i64>,
    /// Keys of the JWKS that could not be used, described for the log.
    pub key_problems: Vec<String>,
    /// How many verification keys were usable.
    pub key_count: usize,
    /// The trusted CAs for PKI client certificates; `None` when none is usable.
    pub trust: Option<crate::pki::TrustStore>,
}

impl Active {
    pub fn new(settings: GatewaySettings) -> Active {
        let (keys, mut key_problems) = verification_keys(&settings.jwks);
        let (trust, trust_problems) = crate::pki::TrustStore::new(&settings.trusted_cas);
        key_problems.extend(trust_problems);
        let key_count = keys.len();
        let verifier = TokenVerifier::new(&settings.hierarchy_id, keys);
        let revocations = Revocations {
            bulk_tokens: settings
                .blocked_bulk_tokens
                .iter()
                .map(|id| id.to_ascii_lowercase())
                .collect(),
            devices: settings.blocked_devices.iter().cloned().collect(),
            token_ids: HashSet::new(),
        };
        Active {
            url_map: settings.url_map.iter().cloned().collect(),
            management_points: settings.management_points.iter().copied().collect(),
            verifier,
            revocations,
            key_problems,
            key_count,
            trust,
            settings,
        }
    }
}

/// The token verification keys of a JWKS document: each key's `x5c[0]` is the (standard base64)
/// DER of a token signing certificate. Unusable keys are skipped and described.
pub(crate) fn verification_keys(jwks: &serde_json::Value) -> (Vec<VerificationKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    let Some(list) = jwks.get("keys").and_then(|k| k.as_array()) else {
        problems.push("the JWKS has no 'keys' array; no token can be verified".to_owned());
        return (keys, problems);
    };
    for (i, jwk) in list.iter().enumerate() {
        let kid = jwk.get("kid").and_then(|k| k.as_str()).unwrap_or("?");
        let Some(x5c) = jwk
            .get("x5c")
            .and_then(|c| c.as_array())
            .and_then(|c| c.first())
            .and_then(|c| c.as_str())
        else {
            problems.push(format!("key {i} ({kid}) has no x5c certificate"));
            continue;
        };
        let der = match STANDARD.decode(x5c) {
            Ok(der) => der,
            Err(e) => {
                problems.push(format!("key {i} ({kid}): x5c is not base64: {e}"));
                continue;
            }
        };
        match VerificationKey::from_certificate(&der) {
            Ok(key) => keys.push(key),
            Err(e) => problems.push(format!("key {i} ({kid}): {e}")),
        }
    }
    (keys, problems)
}

/// Where a device request goes (DESIGN §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/CCM_Proxy_MutualAuth/ServiceMetadata`: answered by the gateway.
    Metadata,
    /// `/CCM_Proxy_MutualAuth/<role ID>/<endpoint>`; `endpoint` keeps its leading `/`.
    Relay { role_id: i64, endpoint: &'a str },
}

/// Parses a request path; `None` for anything that is not a gateway route.
pub(crate) fn parse_route(path: &str) -> Option<Route<'_>> {
    let rest = PROXY_PREFIXES
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))?;
    if rest == "ServiceMetadata" {
        return Some(Route::Metadata);
    }
    let slash = rest.find('/')?;
    let (id, endpoint) = rest.split_at(slash);
    if id.is_empty() || id.len() > 19 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let role_id = id.parse().ok()?;
    if endpoint.len() < 2 {
        return None;
    }
    Some(Route::Relay { role_id, endpoint })
}

pub(crate) fn url_not_allowed(what: &str) -> Denial {
    Denial::new(
        StatusCode::NOT_FOUND,
        "CMGService_Url_Not_Allowed",
        format!("{what} is not published through this cloud management gateway"),
        "use https://<CMG>/CCM_Proxy_MutualAuth/<MP role ID>/<endpoint> with an endpoint and \
         management point the site publishes",
    )
}

/// Checks a route against the URL map and the management points that accept CMG traffic.
pub(crate) fn check_route<'a>(active: &Active, path: &'a str) -> Result<Route<'a>, Denial> {
    match parse_route(path) {
        None => Err(url_not_allowed("this URL").with_rule("not_a_gateway_url")),
        Some(Route::Metadata) => Ok(Route::Metadata),
        Some(route @ Route::Relay { role_id, endpoint }) => {
            if !active.url_map.contains(endpoint) {
                Err(url_not_allowed(&format!("endpoint {endpoint}")).with_rule("url_map"))
            } else if !active.management_points.contains(&role_id) {
                Err(url_not_allowed(&format!("management point {role_id}"))
                    .with_rule("management_point"))
            } else {
                Ok(route)
            }
        }
    }
}

/// Who the gateway verified a device to be (DESIGN §4, "identity passed on").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A client token bound to the presented certificate.
    Token { client_id: String },
    /// A bulk registration token, on the registration endpoint only.
    BulkRegistration { unique_id: String },
    /// A client certificate that chains to a trusted CA and is not revoked; no token needed.
    Pki { subject: String },
}

impl Identity {
    /// The `x-cmg-identity` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Token { .. } => "Token",
            Identity::BulkRegistration { .. } => "BulkRegistration",
            Identity::Pki { .. } => "PKI",
        }
    }

    /// For the log: never the token, only who it names.
    pub fn describe(&self) -> String {
        match self {
            Identity::Token { client_id } => format!("client {client_id}"),
            Identity::BulkRegistration { unique_id } => {
                format!("bulk registration token {unique_id}")
            }
            Identity::Pki { subject } => format!("PKI certificate {subject}"),
        }
    }
}

/// A verified token remembered on a connection: the same token over the same certificate under
/// the same settings version is verified once.
#[derive(Debug, Clone)]
pub(crate) struct CachedAuth {
    /// SHA-256 of the token (the token itself is not kept).
    token_hash: String,
    thumbprint: String,
    version: i64,
    exp: i64,
    identity: Identity,
}

const REGISTER_AGAIN: &str =
    "connect to a management point on the internal network to register again";

fn invalid_token(message: impl Into<String>, action: &str) -> Denial {
    Denial::new(
        StatusCode::UNAUTHORIZED,
        "CMGService_Invalid_Token",
        message,
        action,
    )
}

/// The answer to a refused token (DESIGN §4).
pub(crate) fn refusal_denial(refusal: &Refusal, kind: &str) -> Denial {
    let message = format!(
        "the {kind} was refused: {refusal} [rule {}]",
        refusal.rule()
    );
    let denial = match refusal {
        Refusal::Expired { .. } => Denial::new(
            StatusCode::UNAUTHORIZED,
            "CMGService_Token_Expired",
            message,
            REGISTER_AGAIN,
        ),
        Refusal::BulkTokenBlocked(_) => Denial::new(
            StatusCode::FORBIDDEN,
            "CMGService_Token_Blocked",
            message,
            "ask the site admin for another bulk registration token",
        ),
        Refusal::DeviceBlocked(_) => Denial::new(
            StatusCode::FORBIDDEN,
            "CMGService_Token_Blocked",
            message,
            "ask the site admin why this device is blocked",
        ),
        Refusal::CertificateMismatch => {
            invalid_token(message, "present the certificate the token was issued to")
        }
        _ => invalid_token(message, "register again to get a valid token"),
    };
    denial.with_rule(refusal.rule())
}

/// The bearer token of an `Authorization` header, if it is `Bearer <token>`.
pub(crate) fn bearer(header: &HeaderValue) -> Result<&str, Denial> {
    let text = header.to_str().map_err(|_| {
        invalid_token(
            "the Authorization header is not ASCII",
            "send 'Authorization: Bearer <token>'",
        )
        .with_rule("malformed_authorization")
    })?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("Bearer") || token.is_empty() {
        return Err(invalid_token(
            "the Authorization header is not 'Bearer <token>'",
            "send 'Authorization: Bearer <token>'",
        )
        .with_rule("malformed_authorization"));
    }
    Ok(token)
}

/// Decides who the device behind a relayed request is, or why it is refused: the table of
/// DESIGN §4 for token clients. `cache` is the connection's remembered verification.
pub(crate) fn authorize(
    active: &Active,
    endpoint: &str,
    thumbprint: Option<&str>,
    authorization: Option<&HeaderValue>,
    now: i64,
    cache: &Mutex<Option<CachedAuth>>,
) -> Result<Identity, Denial> {
    let thumbprint = thumbprint.ok_or_else(|| {
        Denial::new(
            StatusCode::FORBIDDEN,
            "CMGService_Client_Certificate_Required",
            "this endpoint needs a client certificate",
            "connect with the device's certificate",
        )
        .with_rule("no_client_certificate")
    })?;
    let Some(header) = authorization else {
        return Err(invalid_token(
            "no token was sent",
            "send the client token (or, to register, a bulk registration token) as \
             'Authorization: Bearer <token>'",
        )
        .with_rule("no_token"));
    };
    let token = bearer(header)?;
    let registration = endpoint == mp::REGISTRATION;
    let token_hash = cmg_pki::thumbprint_sha256(token.as_bytes());
    let version = active.settings.version;

    let cached = {
        let slot = cache.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|c| {
                c.token_hash == token_hash
                    && c.thumbprint == thumbprint
                    && c.version == version
                    && now.saturating_sub(cmg_token::LEEWAY_SECS) < c.exp
            })
            .map(|c| c.identity.clone())
    };
    let identity = match cached {
        Some(identity) => identity,
        None => {
            let (identity, exp) = verify(active, token, thumbprint, registration, now)?;
            *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedAuth {
                token_hash,
                thumbprint: thumbprint.to_owned(),
                version,
                exp,
                identity: identity.clone(),
            });
            identity
        }
    };
    if matches!(identity, Identity::BulkRegistration { .. }) && !registration {
        return Err(bulk_elsewhere());
    }
    Ok(identity)
}

fn bulk_elsewhere() -> Denial {
    invalid_token(
        format!(
            "a bulk registration token is accepted only by {}",
            mp::REGISTRATION
        ),
        "use the client token the device received when it registered",
    )
    .with_rule("wrong_type")
}

fn verify(
    active: &Active,
    token: &str,
    thumbprint: &str,
    registration: bool,
    now: i64,
) -> Result<(Identity, i64), Denial> {
    let revoked = &active.revocations;
    match active
        .verifier
        .verify_client(token, thumbprint, now, revoked)
    {
        Ok(claims) => Ok((
            Identity::Token {
                client_id: claims.sub,
            },
            claims.exp,
        )),
        Err(Refusal::WrongType { found, .. }) if found == "BulkRegistration" => {
            if !registration {
                return Err(bulk_elsewhere());
            }
            let claims = active
                .verifier
                .verify_bulk(token, now, revoked)
                .map_err(|r| refusal_denial(&r, "bulk registration token"))?;
            Ok((
                Identity::BulkRegistration {
                    unique_id: claims.unique_id,
                },
                claims.exp,
            ))
        }
        Err(refusal) => Err(refusal_denial(&refusal, "client token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
    use cmg_proto::RegisteredVia;
    use cmg_token::{ClientTokenRequest, SigningKey, TokenIssuer};

    const HIERARCHY: &str = "8e1f6d8c-3a5b-4c7d-9e0f-112233445566";
    const NOW: i64 = 1_800_000_000;
    const THUMB: &str = "device-thumbprint";

    fn fixture(alg: KeyAlgorithm) -> (TokenIssuer, GatewaySettings) {
        let root = SiteAuthority::generate("TST").unwrap();
        let cred = root.issue("TST", &Role::TokenSigning, alg).unwrap();
        let pkcs8 = cmg_pki::key_pem_to_pkcs8(cred.key_pem(), "k").unwrap();
        let key = SigningKey::new(cred.cert_der(), &pkcs8).unwrap();
        let jwks = TokenVerifier::new(HIERARCHY, [key.verification_key().clone()]).jwks();
        let settings = GatewaySettings {
            version: 3,
            cmg: "GraniteFalls".into(),
            hierarchy_id: HIERARCHY.into(),
            jwks,
            blocked_bulk_tokens: vec!["BLOCKED-BULK".into()],
            blocked_devices: vec!["GUID:BLOCKED".into()],
            url_map: mp::GATEWAY_URL_MAP.iter().map(|s| s.to_string()).collect(),
            management_points: vec![42],
            trusted_cas: vec![],
            crl_check: true,
            min_tls: "1.2".into(),
        };
        (TokenIssuer::new(key, HIERARCHY, "TST"), settings)
    }

    fn client(issuer: &TokenIssuer, client_id: &str, thumb: &str, issued: i64) -> HeaderValue {
        let (token, _) = issuer
            .mint_client(&ClientTokenRequest {
                client_id,
                cert_thumbprint: thumb,
                registered_via: RegisteredVia::BulkRegistration,
                bulk_token_id: None,
                token_id: "jti",
                now: issued,
                validity_secs: 86_400,
            })
            .unwrap();
        HeaderValue::from_str(&format!("Bearer {}", token.expose())).unwrap()
    }

    fn bulk(issuer: &TokenIssuer, id: &str) -> HeaderValue {
        let (token, _) = issuer.mint_bulk(id, NOW - 60, 3600).unwrap();
        HeaderValue::from_str(&format!("bearer {}", token.expose())).unwrap()
    }

    fn decide(
        active: &Active,
        endpoint: &str,
        thumb: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Result<Identity, Denial> {
        authorize(active, endpoint, thumb, auth, NOW, &Mutex::new(None))
    }

    #[test]
    fn routes_parse_both_prefixes_and_keep_the_endpoint_path() {
        assert_eq!(
            parse_route("/CCM_Proxy_MutualAuth/72186325152220500/SMS_MP/.sms_aut"),
            Some(Route::Relay {
                role_id: 72186325152220500,
                endpoint: "/SMS_MP/.sms_aut"
            })
        );
        assert_eq!(
            parse_route("/CCM_Proxy_ServerAuth/1/CCM_STS"),
            Some(Route::Relay {
                role_id: 1,
                endpoint: "/CCM_STS"
            })
        );
        assert_eq!(
            parse_route("/CCM_Proxy_MutualAuth/ServiceMetadata"),
            Some(Route::Metadata)
        );
        for bad in [
            "/CCM_STS",
            "/CCM_Proxy_MutualAuth/",
            "/CCM_Proxy_MutualAuth/12",
            "/CCM_Proxy_MutualAuth/12/",
            "/CCM_Proxy_MutualAuth/-1/CCM_STS",
            "/CCM_Proxy_MutualAuth/1x/CCM_STS",
            "/CCM_Proxy_MutualAuth/99999999999999999999/CCM_STS",
            "/ccm_proxy_mutualauth/1/CCM_STS",
        ] {
            assert_eq!(parse_route(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_url_map_and_the_mp_list_decide_what_is_relayed() {
        let (_, settings) = fixture(KeyAlgorithm::EcdsaP256);
        let active = Active::new(settings);
        assert!(check_route(&active, "/CCM_Proxy_MutualAuth/42/CCM_STS").is_ok());
        for (path, rule) in [
            ("/CCM_Proxy_MutualAuth/42/CCM_STS/x", "url_map"),
            ("/CCM_Proxy_MutualAuth/42/ccm_sts", "url_map"),
            ("/CCM_Proxy_MutualAuth/42/SMS_MP/../CCM_STS", "url_map"),
            ("/CCM_Proxy_MutualAuth/43/CCM_STS", "management_point"),
            ("/CCM_STS", "not_a_gateway_url"),
        ] {
            let denial = check_route(&active, path).unwrap_err();
            assert_eq!(denial.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(denial.body.error, "CMGService_Url_Not_Allowed");
            assert_eq!(denial.rule, Some(rule), "{path}");
        }
    }

    #[test]
    fn settings_build_a_verifier_from_the_jwks_certificates() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
            let (issuer, settings) = fixture(alg);
            let active = Active::new(settings);
            assert_eq!(active.key_count, 1);
            assert!(active.key_problems.is_empty());
            assert!(active.revocations.bulk_tokens.contains("blocked-bulk"));
            let auth = client(&issuer, "GUID:A", THUMB, NOW);
            assert_eq!(
                decide(&active, "/CCM_STS", Some(THUMB), Some(&auth)).unwrap(),
                Identity::Token {
                    client_id: "GUID:A".into()
                }
            );
        }
        let (keys, problems) = verification_keys(&serde_json::json!({
            "keys": [{"kid": "a"}, {"kid": "b", "x5c": ["!!"]}, {"kid": "c", "x5c": ["AAAA"]}]
        }));
        assert!(keys.is_empty());
        assert_eq!(problems.len(), 3, "{problems:?}");
        let (_, problems) = verification_keys(&serde_json::json!({}));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn the_decision_table_of_design_section_4() {
        let (issuer, settings) = fixture(KeyAlgorithm::EcdsaP256);
        let active = Active::new(settings);
        let token = client(&issuer, "GUID:A", THUMB, NOW);
        let code = |r: Result<Identity, Denial>| {
            let d = r.unwrap_err();
            (d.status.as_u16(), d.body.error, d.rule.unwrap_or(""))
        };
        let reg = mp::REGISTRATION;

        // No certificate: 403, whatever the token.
        assert_eq!(
            code(decide(&active, "/CCM_STS", None, Some(&token))),
            (
                403,
                "CMGService_Client_Certificate_Required".into(),
                "no_client_certificate"
            )
        );
        // No token, or not a Bearer one: 401.
        assert_eq!(
            code(decide(&active, reg, Some(THUMB), None)).1,
            "CMGService_Invalid_Token"
        );
        let basic = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        assert_eq!(
            code(decide(&active, reg, Some(THUMB), Some(&basic))).2,
            "malformed_authorization"
        );
        // Client token over its own certificate: everywhere, registration included.
        for endpoint in [reg, "/CCM_STS", "/SMS_MP/.sms_pol"] {
            assert_eq!(
                decide(&active, endpoint, Some(THUMB), Some(&token))
                    .unwrap()
                    .kind(),
                "Token"
            );
        }
        // Over another certificate: refused.
        assert_eq!(
            code(decide(&active, "/CCM_STS", Some("other"), Some(&token))),
            (401, "CMGService_Invalid_Token".into(), "cnf_mismatch")
        );
        // Expired and blocked.
        let old = client(&issuer, "GUID:A", THUMB, NOW - 3 * 86_400);
        assert_eq!(
            code(decide(&active, "/CCM_STS", Some(THUMB), Some(&old))),
            (401, "CMGService_Token_Expired".into(), "expired")
        );
        let blocked = client(&issuer, "GUID:BLOCKED", THUMB, NOW);
        assert_eq!(
            code(decide(&active, "/CCM_STS", Some(THUMB), Some(&blocked))),
            (403, "CMGService_Token_Blocked".into(), "device_blocked")
        );
        // Bulk tokens register, and do nothing else.
        let b = bulk(&issuer, "8A1B0C2D-0000-4000-8000-000000000001");
        assert_eq!(
            decide(&active, reg, Some(THUMB), Some(&b)).unwrap(),
            Identity::BulkRegistration {
                unique_id: "8a1b0c2d-0000-4000-8000-000000000001".into()
            }
        );
        assert_eq!(
            code(decide(&active, "/CCM_STS", Some(THUMB), Some(&b))),
            (401, "CMGService_Invalid_Token".into(), "wrong_type")
        );
        let blocked_bulk = bulk(&issuer, "blocked-bulk");
        assert_eq!(
            code(decide(&active, reg, Some(THUMB), Some(&blocked_bulk))),
            (403, "CMGService_Token_Blocked".into(), "bulk_token_blocked")
        );
        // Garbage names its rule and never echoes the token.
        let junk = HeaderValue::from_static("Bearer eyJhbGciOiJub25lIn0.e30.");
        let d = decide(&active, reg, Some(THUMB), Some(&junk)).unwrap_err();
        assert_eq!(d.rule, Some("alg_not_allowed"));
        assert!(!d.body.message.contains("eyJ"));
    }

    #[test]
    fn a_connection_verifies_a_token_once_per_settings_version() {
        let (issuer, settings) = fixture(KeyAlgorithm::EcdsaP256);
        let mut active = Active::new(settings.clone());
        let token = client(&issuer, "GUID:A", THUMB, NOW);
        let cache = Mutex::new(None);
        authorize(&active, "/CCM_STS", Some(THUMB), Some(&token), NOW, &cache).unwrap();
        // Same settings: the cache answers even though the verifier now knows no key.
        active.verifier = TokenVerifier::new(HIERARCHY, []);
        authorize(&active, "/CCM_STS", Some(THUMB), Some(&token), NOW, &cache).unwrap();
        // Another certificate, or past expiry: verified again, and refused.
        assert!(authorize(&active, "/CCM_STS", Some("x"), Some(&token), NOW, &cache).is_err());
        authorize(
            &Active::new(settings.clone()),
            "/CCM_STS",
            Some(THUMB),
            Some(&token),
            NOW,
            &cache,
        )
        .unwrap();
        assert!(
            authorize(
                &active,
                "/CCM_STS",
                Some(THUMB),
                Some(&token),
                NOW + 2 * 86_400,
                &cache
            )
            .is_err()
        );
        // A new settings version (a block) is verified afresh.
        let mut blocked = settings;
        blocked.version = 4;
        blocked.blocked_devices = vec!["GUID:A".into()];
        let blocked = Active::new(blocked);
        let d =
            authorize(&blocked, "/CCM_STS", Some(THUMB), Some(&token), NOW, &cache).unwrap_err();
        assert_eq!(d.rule, Some("device_blocked"));
    }
}
