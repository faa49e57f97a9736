//! The MP's HTTP surface: routes, the extractors that turn a request into a caller and a typed
//! body, and JSON errors (`{"error", "message", "action"}`, DESIGN §4).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cmg_proto::mp::{
    self, ErrorBody, MpCandidate, MpKind, MpList, RegistrationRequest, StatusAck, StatusBatch,
    relay,
};
use cmg_store::StatusRow;
use serde::de::DeserializeOwned;

use super::conn::Peer;
use super::{registration, tokens};
use crate::{Site, StateWatch, unix_now};

/// Largest request body accepted (inventory reports included).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most messages in one status batch.
const MAX_BATCH_MESSAGES: usize = 1000;

/// Everything the handlers share.
pub(crate) struct Mp {
    pub site: Arc<Site>,
    pub state: StateWatch,
    /// Registrations of one hardware ID are serialised, so that two concurrent attempts by one
    /// device cannot create two records. Striped: a few locks serve every device.
    pub hardware_locks: Vec<tokio::sync::Mutex<()>>,
    /// Client tokens verified on connections from connection points, which carry many devices:
    /// each token is verified once, not once per relayed request (bounded; see `tokens.rs`).
    pub relayed_tokens: std::sync::Mutex<std::collections::HashMap<String, tokens::VerifiedClient>>,
    /// Last-seen times waiting to be written in one transaction (see [`Mp::flush_seen`]).
    seen: std::sync::Mutex<std::collections::HashMap<String, (i64, String)>>,
}

impl Mp {
    /// Notes that a device was seen; written with the others by the next [`Mp::flush_seen`].
    pub fn note_seen(&self, client_id: &str, via: String) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(client_id.to_owned(), (unix_now(), via));
    }

    /// Writes the noted last-seen times in one transaction; kept for the next try on failure.
    pub async fn flush_seen(&self) {
        let batch: Vec<(String, i64, String)> = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.drain().map(|(id, (at, via))| (id, at, via)).collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.site.store().record_devices_seen(&batch).await {
            tracing::warn!("cannot record when devices were last seen: {e}; retrying later");
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (id, at, via) in batch {
                seen.entry(id).or_insert((at, via));
            }
        }
    }

    pub fn new(site: Arc<Site>, state: StateWatch) -> Arc<Mp> {
        let hardware_locks = (0..64).map(|_| tokio::sync::Mutex::new(())).collect();
        Arc::new(Mp {
            site,
            state,
            hardware_locks,
            relayed_tokens: Default::default(),
            seen: Default::default(),
        })
    }
}

pub(crate) fn router(mp: Arc<Mp>, request_timeout: Duration) -> Router {
    Router::new()
        .route(mp::REGISTRATION, post(register))
        .route(mp::TOKEN_RENEWAL, post(renew))
        .route(mp::LOCATION, get(location))
        .route(mp::POLICY, get(policy))
        .route(mp::STATUS, post(status))
        .route(mp::JWKS, get(jwks))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "Not_Found",
                "no such endpoint on this management point",
                "check the URL",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method_Not_Allowed",
                "this endpoint does not take that method",
                "see DESIGN §5.2 for each endpoint's method",
            )
        })
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            time_limit(request, next, request_timeout)
        }))
        .with_state(mp)
}

async fn time_limit(request: Request, next: Next, limit: Duration) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "Request_Timeout",
            "the request took too long to arrive or to answer",
            "retry later",
        )
        .into_response(),
    }
}

/// An error answer. Never carries a token.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: code.into(),
                message: message.into(),
                action: action.into(),
            },
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Bad_Request",
            message,
            "fix the request and send it again",
        )
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("management point error: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal_Error",
            "the management point could not complete the request",
            "retry later; the admin finds the cause in the site's logs",
        )
    }

    pub fn certificate_required() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "Client_Certificate_Required",
            "this endpoint needs a client certificate",
            "connect with the device's certificate",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<cmg_store::StoreError> for ApiError {
    fn from(e: cmg_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<crate::SiteError> for ApiError {
    fn from(e: crate::SiteError) -> Self {
        ApiError::internal(e)
    }
}

/// Where a request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// Straight from the device, on the internal network.
    Intranet,
    /// Relayed by a connection point from the named CMG.
    Gateway(String),
}

impl Via {
    pub fn describe(&self) -> String {
        match self {
            Via::Intranet => "Intranet".into(),
            Via::Gateway(name) => format!("CMG {name}"),
        }
    }
}

/// What a gateway verified about a relayed device (DESIGN §4 "identity passed on").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Relayed {
    Token,
    BulkRegistration,
    Pki { subject: String },
}

/// The device behind a request: its certificate, how it arrived, and its bearer token.
#[derive(Debug)]
pub(crate) struct Caller {
    pub peer: Arc<Peer>,
    /// The device certificate's thumbprint: from TLS, or from a connection point's headers.
    pub thumbprint: Option<String>,
    pub via: Via,
    pub relayed: Option<Relayed>,
    pub bearer: Option<String>,
}

impl FromRequestParts<Arc<Mp>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, mp: &Arc<Mp>) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<Arc<Peer>>()
            .cloned()
            .ok_or_else(|| ApiError::internal("request without connection information"))?;
        let headers = &parts.headers;
        let bearer = bearer_token(headers)?;
        let from_connector = peer
            .thumbprint
            .as_ref()
            .is_some_and(|t| mp.state.borrow().connection_points.contains(t));
        if !from_connector {
            // Relay headers from anyone but a connection point are ignored, never believed.
            return Ok(Caller {
                thumbprint: peer.thumbprint.clone(),
                peer,
                via: Via::Intranet,
                relayed: None,
                bearer,
            });
        }
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let gateway = text(relay::GATEWAY)
            .ok_or_else(|| ApiError::bad_request("a relayed request must name its gateway"))?;
        let relayed = match text(relay::IDENTITY).as_deref() {
            Some("Token") => Relayed::Token,
            Some("BulkRegistration") => Relayed::BulkRegistration,
            Some("PKI") => Relayed::Pki {
                subject: text(relay::PKI_SUBJECT).unwrap_or_default(),
            },
            _ => {
                return Err(ApiError::bad_request(
                    "a relayed request must carry the identity the gateway verified",
                ));
            }
        };
        let thumbprint = text(relay::CLIENT_THUMBPRINT).ok_or_else(|| {
            ApiError::bad_request("a relayed request must carry the device certificate thumbprint")
        })?;
        Ok(Caller {
            peer,
            thumbprint: Some(thumbprint),
            via: Via::Gateway(gateway),
            relayed: Some(relayed),
            bearer,
        })
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::bad_request("the Authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Invalid_Token",
            "the Authorization header is not 'Bearer <token>'",
            "send the client token as a bearer token",
        )),
    }
}

/// A JSON body: `application/json`, at most [`MAX_BODY_BYTES`], no unknown fields.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported_Media_Type",
                "the body must be JSON",
                "send Content-Type: application/json",
            ));
        }
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Payload_Too_Large",
                    format!("the body is larger than {MAX_BODY_BYTES} bytes, or was cut off"),
                    "send a smaller request",
                )
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid: {e}")))
    }
}

async fn register(
    State(mp): State<Arc<Mp>>,
    caller: Caller,
    JsonBody(request): JsonBody<RegistrationRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(
        registration::register(&mp, &caller, request).await?,
    ))
}

async fn renew(State(mp): State<Arc<Mp>>, caller: Caller) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(tokens::renew(&mp, &caller).await?))
}

async fn location(
    State(mp): State<Arc<Mp>>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    if caller.thumbprint.is_none() {
        return Err(ApiError::certificate_required());
    }
    if !query.is_some_and(|q| q.eq_ignore_ascii_case("MPLIST")) {
        return Err(ApiError::bad_request(
            "only the MPLIST location request is supported: ?MPLIST",
        ));
    }
    let state = mp.state.borrow().clone();
    let site_code = mp.site.record().site_code.clone();
    let mut list: Vec<MpCandidate> = state
        .management_points
        .iter()
        .map(|m| MpCandidate {
            url: m.url.clone(),
            kind: MpKind::Intranet,
            site_code: site_code.clone(),
            ssl: true,
        })
        .collect();
    if state.settings.enable_cmg {
        for cmg in &state.cmgs {
            let host = crate::cmg::public_host(cmg);
            for m in state
                .management_points
                .iter()
                .filter(|m| m.allow_cmg_traffic)
            {
                list.push(MpCandidate {
                    url: format!("https://{host}/CCM_Proxy_MutualAuth/{}", m.role_id),
                    kind: MpKind::Internet,
                    site_code: site_code.clone(),
                    ssl: true,
                });
            }
        }
    }
    Ok(axum::Json(MpList {
        management_points: list,
    }))
}

async fn policy(State(mp): State<Arc<Mp>>, caller: Caller) -> Result<impl IntoResponse, ApiError> {
    let client = tokens::authenticate(&mp, &caller).await?;
    mp.note_seen(&client.client_id, caller.via.describe());
    Ok(axum::Json(mp.state.borrow().settings.client_policy()))
}

async fn status(
    State(mp): State<Arc<Mp>>,
    caller: Caller,
    JsonBody(batch): JsonBody<StatusBatch>,
) -> Result<impl IntoResponse, ApiError> {
    let client = tokens::authenticate(&mp, &caller).await?;
    if batch.messages.len() > MAX_BATCH_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BATCH_MESSAGES} messages per batch"
        )));
    }
    let rows = batch
        .messages
        .iter()
        .map(|m| {
            if m.id.is_empty() || m.id.len() > 64 {
                return Err(ApiError::bad_request(
                    "every message needs an id of 1 to 64 characters",
                ));
            }
            Ok(StatusRow {
                message_id: m.id.clone(),
                kind: m.kind.as_str().to_owned(),
                sent_at: m.time,
                body: m.body.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (accepted, duplicates) = mp
        .site
        .store()
        .store_status_messages(&client.client_id, &rows, unix_now(), &caller.via.describe())
        .await?;
    Ok(axum::Json(StatusAck {
        accepted,
        duplicates,
    }))
}

async fn jwks(State(mp): State<Arc<Mp>>) -> impl IntoResponse {
    axum::Json(mp.state.borrow().verifier.jwks())
}
