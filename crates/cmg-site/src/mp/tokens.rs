//! Client tokens at the MP: authenticating a device by its token and certificate, and renewal
//! (`CCM_STS`).

use std::sync::Arc;

use axum::http::StatusCode;
use cmg_proto::ClientTokenClaims;
use cmg_proto::mp::RenewalResponse;
use cmg_token::{ClientTokenRequest, Refusal};
use uuid::Uuid;

use super::api::{ApiError, Caller, Mp, Relayed};
use crate::{format_utc, unix_now};

/// A client token verified on a connection, with what it was verified against.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedClient {
    token: String,
    thumbprint: String,
    state_version: i64,
    claims: Arc<ClientTokenClaims>,
}

const REGISTER_AGAIN: &str =
    "connect to a management point on the internal network to register again";

/// The answer to a refused token, logged in `ClientAuth.log` with the rule that failed.
pub(crate) fn refused(mp: &Mp, refusal: &Refusal, caller: &Caller) -> ApiError {
    mp.site.logs().auth.warn(&format!(
        "Refused a token from {} ({}), certificate {}: {refusal} [rule {}]",
        caller.peer.remote,
        caller.via.describe(),
        caller.thumbprint.as_deref().unwrap_or("none"),
        refusal.rule()
    ));
    let (status, code, action) = match refusal {
        Refusal::Expired { .. } => (StatusCode::UNAUTHORIZED, "Token_Expired", REGISTER_AGAIN),
        Refusal::DeviceBlocked(_) => (
            StatusCode::FORBIDDEN,
            "Device_Blocked",
            "ask the site admin why this device is blocked",
        ),
        Refusal::BulkTokenBlocked(_) => (
            StatusCode::FORBIDDEN,
            "Token_Blocked",
            "ask the site admin for another bulk registration token",
        ),
        Refusal::CertificateMismatch => (
            StatusCode::UNAUTHORIZED,
            "Certificate_Mismatch",
            "present the certificate the token was issued to",
        ),
        Refusal::WrongType { .. } => (
            StatusCode::UNAUTHORIZED,
            "Wrong_Token_Type",
            "use a bulk registration token only to register, and the client token for everything else",
        ),
        _ => (
            StatusCode::UNAUTHORIZED,
            "Invalid_Token",
            "register again to get a valid token",
        ),
    };
    ApiError::new(
        status,
        code,
        format!("{refusal} [rule {}]", refusal.rule()),
        action,
    )
}

fn auth_error(
    mp: &Mp,
    caller: &Caller,
    status: StatusCode,
    code: &str,
    message: String,
    action: &str,
) -> ApiError {
    mp.site.logs().auth.warn(&format!(
        "Refused {} ({}): {message}",
        caller.peer.remote,
        caller.via.describe()
    ));
    ApiError::new(status, code, message, action)
}

/// The device behind an authenticated request.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub client_id: String,
    /// The client token it presented; `None` for a PKI device relayed by a gateway.
    pub token: Option<Arc<ClientTokenClaims>>,
}

/// Authenticates the device behind a request: by its client token and certificate, or — for a
/// PKI certificate a gateway verified — by the device record of that certificate. Then checks
/// the record: registered, not blocked, approved, still on this certificate. On a direct
/// connection a verified token is kept for the connection's next requests.
pub(crate) async fn authenticate(mp: &Mp, caller: &Caller) -> Result<Client, ApiError> {
    let thumbprint = caller
        .thumbprint
        .as_deref()
        .ok_or_else(ApiError::certificate_required)?;
    let pki = matches!(caller.relayed, Some(Relayed::Pki { .. }));
    let Some(token) = caller.bearer.as_deref() else {
        if pki {
            let device = mp
                .site
                .store()
                .device_by_certificate(thumbprint)
                .await?
                .ok_or_else(|| {
                    auth_error(
                        mp,
                        caller,
                        StatusCode::UNAUTHORIZED,
                        "Unknown_Client",
                        "no device is registered with this PKI certificate".into(),
                        "register first",
                    )
                })?;
            check_device(mp, caller, &device, thumbprint)?;
            return Ok(Client {
                client_id: device.client_id,
                token: None,
            });
        }
        return Err(auth_error(
            mp,
            caller,
            StatusCode::UNAUTHORIZED,
            "Invalid_Token",
            "no client token was sent".into(),
            "send the client token as 'Authorization: Bearer <token>'",
        ));
    };
    if matches!(caller.relayed, Some(Relayed::BulkRegistration)) {
        return Err(auth_error(
            mp,
            caller,
            StatusCode::UNAUTHORIZED,
            "Wrong_Token_Type",
            "the gateway did not verify a client token for this request".into(),
            "use the client token",
        ));
    }
    let state = mp.state.borrow().clone();
    let now = unix_now();
    if let Some(hit) = cached(mp, caller, token, thumbprint, state.version, now) {
        return Ok(Client {
            client_id: hit.sub.clone(),
            token: Some(hit),
        });
    }
    let claims = state
        .verifier
        .verify_client(token, thumbprint, now, &state.revocations)
        .map_err(|r| refused(mp, &r, caller))?;
    let device = mp.site.store().device(&claims.sub).await?.ok_or_else(|| {
        auth_error(
            mp,
            caller,
            StatusCode::UNAUTHORIZED,
            "Unknown_Client",
            format!("client {} is not registered on this site", claims.sub),
            REGISTER_AGAIN,
        )
    })?;
    check_device(mp, caller, &device, thumbprint)?;
    let claims = Arc::new(claims);
    let entry = VerifiedClient {
        token: token.to_owned(),
        thumbprint: thumbprint.to_owned(),
        state_version: state.version,
        claims: Arc::clone(&claims),
    };
    if caller.relayed.is_some() {
        let mut shared = mp.relayed_tokens.lock().unwrap_or_else(|p| p.into_inner());
        if shared.len() >= RELAYED_CACHE_ENTRIES {
            shared.clear();
        }
        shared.insert(entry.token.clone(), entry);
    } else {
        *caller
            .peer
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(entry);
    }
    Ok(Client {
        client_id: device.client_id,
        token: Some(claims),
    })
}

fn check_device(
    mp: &Mp,
    caller: &Caller,
    device: &cmg_store::DeviceRecord,
    thumbprint: &str,
) -> Result<(), ApiError> {
    if device.blocked {
        return Err(auth_error(
            mp,
            caller,
            StatusCode::FORBIDDEN,
            "Device_Blocked",
            format!("device {} is blocked", device.client_id),
            "ask the site admin why this device is blocked",
        ));
    }
    if device.cert_thumbprint != thumbprint {
        return Err(auth_error(
            mp,
            caller,
            StatusCode::UNAUTHORIZED,
            "Token_Superseded",
            format!("client {} now uses another certificate", device.client_id),
            REGISTER_AGAIN,
        ));
    }
    if !device.approved {
        return Err(auth_error(
            mp,
            caller,
            StatusCode::FORBIDDEN,
            "Approval_Pending",
            format!("client {} is waiting for approval", device.client_id),
            "ask the site admin to approve the device",
        ));
    }
    Ok(())
}

/// Most relayed tokens remembered; past it the cache starts over (one verification each).
const RELAYED_CACHE_ENTRIES: usize = 50_000;

/// A token verified earlier — on this connection, or (relayed) by any connection point — still
/// good: same certificate, same site configuration version, not expired.
fn cached(
    mp: &Mp,
    caller: &Caller,
    token: &str,
    thumbprint: &str,
    version: i64,
    now: i64,
) -> Option<Arc<ClientTokenClaims>> {
    let fresh = |hit: &VerifiedClient| {
        hit.token == token
            && hit.thumbprint == thumbprint
            && hit.state_version == version
            && now < hit.claims.exp + cmg_token::LEEWAY_SECS
    };
    if caller.relayed.is_some() {
        let shared = mp.relayed_tokens.lock().unwrap_or_else(|p| p.into_inner());
        return shared
            .get(token)
            .filter(|hit| fresh(hit))
            .map(|hit| Arc::clone(&hit.claims));
    }
    let slot = caller
        .peer
        .verified
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let hit = slot.as_ref()?;
    fresh(hit).then(|| Arc::clone(&hit.claims))
}

/// `CCM_STS`: a valid client token, over the certificate it is bound to, buys a new one with a
/// fresh validity and the same binding.
pub(crate) async fn renew(mp: &Mp, caller: &Caller) -> Result<RenewalResponse, ApiError> {
    let claims = authenticate(mp, caller).await?.token.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Invalid_Token",
            "renewal needs the client token to renew",
            "a PKI device needs no token; a token device sends its client token",
        )
    })?;
    let now = unix_now();
    let validity = mp.state.borrow().settings.token_validity_secs;
    let token_id = Uuid::new_v4().to_string();
    let (token, minted) = mp
        .site
        .issuer()
        .map_err(ApiError::internal)?
        .mint_client(&ClientTokenRequest {
            client_id: &claims.sub,
            cert_thumbprint: &claims.cnf.x5t_s256,
            registered_via: claims.registered_via,
            bulk_token_id: claims.bulk_token_id.as_deref(),
            token_id: &token_id,
            now,
            validity_secs: i64::try_from(validity).unwrap_or(i64::MAX),
        })
        .map_err(ApiError::internal)?;
    mp.site.logs().sts.info(&format!(
        "Renewed the client token of {} ({}); the new token expires {}",
        claims.sub,
        caller.via.describe(),
        format_utc(minted.exp)
    ));
    Ok(RenewalResponse {
        client_token: token.expose().to_owned(),
        token_expires: minted.exp,
    })
}
