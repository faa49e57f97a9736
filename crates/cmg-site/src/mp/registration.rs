//! `MP_ClientRegistration`: who may register, which record a device gets, and when it receives
//! its client token.
//!
//! - On the intranet no token is needed; a bulk registration token may be presented anyway.
//!   Through a gateway, the connection point passes on what the gateway verified: a bulk token
//!   (verified again here) or a PKI certificate. A client token never registers anyone.
//! - The same hardware ID with the same certificate is the same device: it keeps its client ID.
//!   With another certificate it is a conflicting record, handled as the site's
//!   `conflicting_records` setting says; a device never silently takes over another's identity
//!   (take-over must be chosen by the admin, and each one is audited).
//! - The device row is durable before the token is returned (grouped commit, DESIGN §9).

use std::hash::{Hash, Hasher};

use axum::http::StatusCode;
use cmg_proto::RegisteredVia;
use cmg_proto::mp::{Approval, RegistrationRequest, RegistrationResponse};
use cmg_store::DeviceRecord;
use cmg_token::ClientTokenRequest;
use uuid::Uuid;

use super::api::{ApiError, Caller, Mp, Relayed};
use super::tokens;
use crate::{ApprovalMode, ConflictHandling, format_utc, unix_now};

/// Who the audit log names for changes a registration makes.
const ACTOR: &str = "MP";

pub(crate) async fn register(
    mp: &Mp,
    caller: &Caller,
    request: RegistrationRequest,
) -> Result<RegistrationResponse, ApiError> {
    let thumbprint = caller
        .thumbprint
        .clone()
        .ok_or_else(ApiError::certificate_required)?;
    validate(&request)?;
    let state = mp.state.borrow().clone();
    let now = unix_now();

    let (registered_via, bulk_token_id) = match (&caller.relayed, caller.bearer.as_deref()) {
        (Some(Relayed::Pki { .. }), _) => (RegisteredVia::Pki, None),
        (Some(Relayed::BulkRegistration) | None, Some(token)) => {
            let claims = state
                .verifier
                .verify_bulk(token, now, &state.revocations)
                .map_err(|r| tokens::refused(mp, &r, caller))?;
            let id = Uuid::parse_str(&claims.unique_id)
                .map_err(|_| ApiError::bad_request("the bulk token's UniqueId is not a GUID"))?;
            (RegisteredVia::BulkRegistration, Some(id))
        }
        (None, None) => (RegisteredVia::InternalNetwork, None),
        (Some(Relayed::BulkRegistration), None) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Invalid_Token",
                "the relayed registration carries no bulk registration token",
                "register with a bulk registration token",
            ));
        }
        (Some(Relayed::Token), _) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Wrong_Token_Type",
                "a client token cannot register a device",
                "register on the intranet or with a bulk registration token",
            ));
        }
    };

    let _serialised = mp.hardware_locks[stripe(&request.hardware_id, mp.hardware_locks.len())]
        .lock()
        .await;
    let store = mp.site.store();
    let known = store.devices_by_hardware_id(&request.hardware_id).await?;
    let (thumbprint, request) = (&thumbprint, &request);
    let update = |client_id: String| async move {
        store
            .update_device_registration(
                &client_id,
                thumbprint,
                &request.hostname,
                &request.os,
                &request.agent_version,
                registered_via.as_str(),
                bulk_token_id,
                ACTOR,
            )
            .await
    };
    let fresh = || {
        new_device(
            request,
            thumbprint,
            registered_via,
            bulk_token_id,
            state.settings.approval,
            now,
        )
    };
    let device = if let Some(same) = known.iter().find(|d| &d.cert_thumbprint == thumbprint) {
        refuse_blocked(mp, same)?;
        update(same.client_id.clone()).await?
    } else if let Some(other) = known.iter().max_by_key(|d| d.registered_at) {
        match state.settings.conflicts {
            ConflictHandling::TakeOver => {
                refuse_blocked(mp, other)?;
                mp.site.logs().registration.warn(&format!("Hardware ID of {} registered with a new certificate {thumbprint} ({}); the new certificate takes over the client ID as the site's conflicting-records setting says; tokens of the old certificate are no longer accepted", other.client_id, caller.via.describe()));
                update(other.client_id.clone()).await?
            }
            ConflictHandling::NewRecord => {
                let device = fresh();
                store
                    .insert_conflicting_device(device.clone(), &other.client_id)
                    .await?;
                mp.site.logs().registration.warn(&format!("Conflicting record: hardware ID of {} registered with another certificate; created {} — review with `cmg admin device conflicts`", other.client_id, device.client_id));
                device
            }
        }
    } else {
        let device = fresh();
        store.insert_device(device.clone()).await?;
        device
    };

    if !device.approved {
        mp.site.logs().registration.info(&format!(
            "Registered {} ({}, {}) via {}; waiting for approval",
            device.client_id,
            request.hostname,
            registered_via.as_str(),
            caller.via.describe()
        ));
        return Ok(RegistrationResponse {
            client_id: device.client_id,
            approval: Approval::Pending,
            client_token: None,
            token_expires: None,
        });
    }
    let token_id = Uuid::new_v4().to_string();
    let bulk = bulk_token_id.map(|id| id.to_string());
    let (token, claims) = mp
        .site
        .issuer()
        .map_err(ApiError::internal)?
        .mint_client(&ClientTokenRequest {
            client_id: &device.client_id,
            cert_thumbprint: thumbprint,
            registered_via,
            bulk_token_id: bulk.as_deref(),
            token_id: &token_id,
            now,
            validity_secs: i64::try_from(state.settings.token_validity_secs).unwrap_or(i64::MAX),
        })
        .map_err(ApiError::internal)?;
    mp.site.logs().registration.info(&format!(
        "Successfully registered {} ({}, {}) via {}; client token valid until {}",
        device.client_id,
        request.hostname,
        registered_via.as_str(),
        caller.via.describe(),
        format_utc(claims.exp)
    ));
    Ok(RegistrationResponse {
        client_id: device.client_id,
        approval: Approval::Approved,
        client_token: Some(token.expose().to_owned()),
        token_expires: Some(claims.exp),
    })
}

fn refuse_blocked(mp: &Mp, device: &DeviceRecord) -> Result<(), ApiError> {
    if device.blocked {
        mp.site.logs().registration.warn(&format!(
            "Refused registration of blocked device {}",
            device.client_id
        ));
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Device_Blocked",
            format!("device {} is blocked", device.client_id),
            "ask the site admin why this device is blocked",
        ));
    }
    Ok(())
}

fn new_device(
    request: &RegistrationRequest,
    thumbprint: &str,
    registered_via: RegisteredVia,
    bulk_token_id: Option<Uuid>,
    approval: ApprovalMode,
    now: i64,
) -> DeviceRecord {
    DeviceRecord {
        client_id: format!("GUID:{}", Uuid::new_v4().to_string().to_uppercase()),
        hardware_id: request.hardware_id.clone(),
        cert_thumbprint: thumbprint.to_owned(),
        hostname: request.hostname.clone(),
        os: request.os.clone(),
        agent_version: request.agent_version.clone(),
        registered_via: registered_via.as_str().to_owned(),
        bulk_token_id,
        approved: approval == ApprovalMode::Automatic,
        blocked: false,
        registered_at: now,
        last_seen_at: Some(now),
        last_seen_via: None,
    }
}

fn validate(request: &RegistrationRequest) -> Result<(), ApiError> {
    for (name, value, max) in [
        ("hardware_id", &request.hardware_id, 256),
        ("hostname", &request.hostname, 255),
        ("os", &request.os, 256),
        ("agent_version", &request.agent_version, 64),
    ] {
        if value.trim().is_empty()
            || value.chars().count() > max
            || value.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "{name} must be 1 to {max} printable characters"
            )));
        }
    }
    Ok(())
}

fn stripe(hardware_id: &str, stripes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hardware_id.hash(&mut hasher);
    usize::try_from(hasher.finish() % stripes.max(1) as u64).unwrap_or(0)
}
