//! What the connection point serves on a tunnel: the gateway's settings long poll, health, and
//! device requests relayed to a management point.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmg_log::ComponentLog;
use cmg_proto::mp::{ErrorBody, GATEWAY_URL_MAP, relay as relay_headers};
use cmg_proto::tunnel::{self, GatewaySettings};
use cmg_site::cmg::CmgDefinition;
use cmg_site::mp::InProcessMp;
use cmg_site::{Site, SiteState, StateWatch};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use tokio::sync::watch;

use crate::mp_client::{MpCallError, MpClient};

/// Largest device request body relayed (the MP's own limit).
const MAX_BODY: usize = cmg_site::mp::MAX_BODY_BYTES;
/// Largest MP answer relayed (policy with every setting is a few KiB).
pub(crate) const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Headers passed from the gateway to the MP; everything else is dropped.
const FORWARDED: [header::HeaderName; 7] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::HeaderName::from_static(relay_headers::IDENTITY),
    header::HeaderName::from_static(relay_headers::CLIENT_THUMBPRINT),
    header::HeaderName::from_static(relay_headers::PKI_SUBJECT),
    header::HeaderName::from_static(relay_headers::GATEWAY),
];

pub(crate) struct Relay {
    site: Arc<Site>,
    state: StateWatch,
    cmg: String,
    mp_client: MpClient,
    /// Management points of this process, called without the TLS hop.
    in_process: Vec<InProcessMp>,
    log: ComponentLog,
    verbose: bool,
    /// Rotates the fallback order over management points.
    next: AtomicUsize,
    /// Requests and bytes per endpoint since the last report to the site.
    pub traffic: Mutex<HashMap<String, Counts>>,
    /// Set when the CMG passed its critical outbound data threshold with "stop at critical" on.
    pub stopped: AtomicBool,
    /// Turns true when the connection point stops: a waiting settings long poll then answers at
    /// once, so that the tunnels' drain does not wait for it.
    stopping: watch::Receiver<bool>,
}

/// What was relayed for one endpoint: requests, bytes in, bytes out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

type Reply = Response<Full<Bytes>>;

impl Relay {
    pub fn new(
        site: Arc<Site>,
        state: StateWatch,
        options: &crate::ConnectorOptions,
        mp_client: MpClient,
        log: ComponentLog,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Relay {
            site,
            state,
            cmg: options.cmg.clone(),
            mp_client,
            in_process: options.in_process.clone(),
            log,
            verbose: options.verbose,
            next: AtomicUsize::new(0),
            traffic: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
            stopping,
        }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_owned();
        if path == tunnel::SETTINGS {
            return self.settings(request.uri().query()).await;
        }
        if path == tunnel::HEALTH {
            return reply(StatusCode::OK, Bytes::from_static(b"{}"));
        }
        match tunnel::split_proxy_path(&path) {
            Some((role, endpoint)) if GATEWAY_URL_MAP.contains(&endpoint) => {
                let endpoint = endpoint.to_owned();
                self.forward(role, &endpoint, request).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "CMGConnector_Url_Not_Allowed",
                "this URL is not on the site's published URL map",
                "check the URL",
            ),
        }
    }

    /// The long poll: answers as soon as the site's version passes `after`.
    async fn settings(&self, query: Option<&str>) -> Reply {
        let after = query
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("after=")))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(i64::MIN);
        let mut state = self.state.clone();
        let mut stopping = self.stopping.clone();
        let ready = tokio::select! {
            changed = tokio::time::timeout(
                Duration::from_secs(tunnel::LONG_POLL_SECS),
                state.wait_for(|s| s.version > after),
            ) => changed.map(|changed| changed.is_ok()),
            () = crate::stopping(&mut stopping) => Ok(false),
        };
        match ready {
            Ok(true) => {
                let current = self.state.borrow().clone();
                let body = serde_json::to_vec(&self.gateway_settings(&current)).unwrap_or_default();
                reply(StatusCode::OK, Bytes::from(body))
            }
            Ok(false) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "CMGConnector_Unavailable",
                "the connection point is stopping",
                "retry on another tunnel",
            ),
            Err(_) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap_or_default(),
        }
    }

    pub fn cmg(&self) -> &str {
        &self.cmg
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    pub fn state(&self) -> &StateWatch {
        &self.state
    }

    pub fn log(&self) -> &ComponentLog {
        &self.log
    }

    /// This CMG's definition, as the site currently has it.
    pub fn definition(&self, state: &SiteState) -> Option<CmgDefinition> {
        let record = state
            .cmgs
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(&self.cmg))?;
        serde_json::from_str(&record.definition).ok()
    }

    fn gateway_settings(&self, state: &SiteState) -> GatewaySettings {
        let definition = self.definition(state);
        let mut blocked_bulk_tokens: Vec<String> =
            state.revocations.bulk_tokens.iter().cloned().collect();
        blocked_bulk_tokens.sort();
        let mut blocked_devices: Vec<String> = state.revocations.devices.iter().cloned().collect();
        blocked_devices.sort();
        GatewaySettings {
            version: state.version,
            cmg: self.cmg.clone(),
            hierarchy_id: self.site.record().hierarchy_id.to_string(),
            jwks: state.verifier.jwks(),
            blocked_bulk_tokens,
            blocked_devices,
            url_map: GATEWAY_URL_MAP.iter().map(|s| s.to_string()).collect(),
            management_points: state
                .management_points
                .iter()
                .filter(|m| m.allow_cmg_traffic)
                .map(|m| m.role_id)
                .collect(),
            trusted_cas: definition
                .as_ref()
                .map(|d| d.trusted_cas.clone())
                .unwrap_or_default(),
            crl_check: definition.as_ref().is_none_or(|d| d.crl_check),
            min_tls: definition.map_or_else(|| "1.2".into(), |d| d.min_tls),
        }
    }

    /// Sends the request to the MP named by `role`, or — if it cannot be reached — to the next
    /// MP that allows CMG traffic. Only a failure to connect moves on: a request that reached an
    /// MP is never sent twice.
    async fn forward(&self, role: i64, endpoint: &str, request: Request<Incoming>) -> Reply {
        if self.stopped.load(Ordering::Relaxed) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "CMGConnector_Stopped",
                "the CMG reached the critical level of its 14-day outbound data threshold and is stopped",
                "an admin raises the threshold or turns off stop-at-critical (`cmg admin cmg modify`)",
            );
        }
        let state = self.state.borrow().clone();
        let allowed: Vec<&cmg_site::MpRecord> = state
            .management_points
            .iter()
            .filter(|m| m.allow_cmg_traffic)
            .collect();
        let Some(first) = allowed.iter().position(|m| m.role_id == role) else {
            return error(
                StatusCode::NOT_FOUND,
                "CMGConnector_Url_Not_Allowed",
                format!("management point {role} does not accept CMG traffic"),
                "use a management point from the location request",
            );
        };
        let (mut parts, body) = request.into_parts();
        let credential = match credential_length(&parts.headers) {
            Ok(length) => length,
            Err(why) => return bad_credential(why),
        };
        let data = match Limited::new(body, credential + MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "CMGConnector_Payload_Too_Large",
                    format!("the body is larger than {MAX_BODY} bytes"),
                    "send a smaller request",
                );
            }
        };
        let body = match restore_credential(&mut parts.headers, data, credential) {
            Ok(body) => body,
            Err(why) => return bad_credential(why),
        };
        // The MP's own path: the endpoint and the device's query, built once per request.
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{endpoint}?{q}"),
            None => endpoint.to_owned(),
        };
        let Ok(path) = path_and_query.parse::<hyper::Uri>() else {
            return error(
                StatusCode::BAD_REQUEST,
                "CMGConnector_Bad_Request",
                "the request cannot be passed on to the management point",
                "check the URL",
            );
        };
        let rotation = self.next.fetch_add(1, Ordering::Relaxed);
        let others = (0..allowed.len())
            .filter(|i| *i != first)
            .cycle()
            .skip(rotation % allowed.len().max(1))
            .take(allowed.len().saturating_sub(1));
        for index in std::iter::once(first).chain(others) {
            let mp = allowed[index];
            let local = self.in_process.iter().find(|l| l.role_id() == mp.role_id);
            let url = || format!("{}{path_and_query}", mp.url);
            if self.verbose {
                let how = if local.is_some() { " (in process)" } else { "" };
                self.log
                    .info(&format!("Switched to internal URL {}{how}", url()));
            }
            let request = to_mp(&parts, &path, &body);
            let sent = match local {
                Some(local) => Ok(Self::call_in_process(local, request).await),
                None => self.call_over_tls(&mp.url, request).await,
            };
            match sent {
                Ok(reply) => {
                    self.count(
                        endpoint,
                        body.len(),
                        reply.body().size_hint().exact().unwrap_or(0),
                    );
                    return reply;
                }
                Err(e) if e.is_connect() => {
                    self.log.warn(&format!(
                        "Management point {} is unreachable ({e}); trying the next one",
                        mp.role_id
                    ));
                }
                Err(e) => {
                    self.log.warn(&format!(
                        "Request to management point {} failed: {e}",
                        mp.role_id
                    ));
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "CMGConnector_MP_Error",
                        "the management point did not answer",
                        "retry later",
                    );
                }
            }
        }
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "CMGConnector_MP_Unavailable",
            "no management point that accepts CMG traffic can be reached",
            "retry later",
        )
    }

    async fn call_over_tls(
        &self,
        mp_url: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<Reply, MpCallError> {
        let (head, body) = self.mp_client.call(mp_url, request).await?;
        Ok(answer(head.status, &head.headers, body))
    }

    async fn call_in_process(mp: &InProcessMp, request: Request<Full<Bytes>>) -> Reply {
        let (head, body) = mp
            .call(request.map(axum::body::Body::new))
            .await
            .into_parts();
        let body = Limited::new(body, MAX_REPLY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        answer(head.status, &head.headers, body)
    }

    fn count(&self, endpoint: &str, bytes_in: usize, bytes_out: u64) {
        let mut traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        let counts = traffic.entry(endpoint.to_owned()).or_default();
        counts.requests += 1;
        counts.bytes_in += i64::try_from(bytes_in).unwrap_or(i64::MAX);
        counts.bytes_out += i64::try_from(bytes_out).unwrap_or(i64::MAX);
    }
}

/// How many bytes at the front of a relayed request's data are the device's `Authorization`
/// value ([`tunnel::CREDENTIAL_LENGTH`]); 0 when the gateway sent none. The error says why the
/// framing is broken.
fn credential_length(headers: &header::HeaderMap) -> Result<usize, String> {
    let Some(value) = headers.get(tunnel::CREDENTIAL_LENGTH) else {
        return Ok(0);
    };
    match value.to_str().ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(length) if length <= tunnel::MAX_CREDENTIAL_BYTES => Ok(length),
        _ => Err(format!(
            "{} must be a number of bytes up to {}",
            tunnel::CREDENTIAL_LENGTH,
            tunnel::MAX_CREDENTIAL_BYTES
        )),
    }
}

/// Takes the device's `Authorization` value off the front of `data` into `headers`, for the MP
/// (which verifies the token again), and returns the body that follows it.
fn restore_credential(
    headers: &mut header::HeaderMap,
    mut data: Bytes,
    length: usize,
) -> Result<Bytes, String> {
    if length == 0 {
        return Ok(data);
    }
    if data.len() < length {
        return Err(format!(
            "the request's data ended {} bytes into a {length}-byte credential",
            data.len()
        ));
    }
    let mut credential = header::HeaderValue::from_maybe_shared(data.split_to(length))
        .map_err(|_| "the credential is not a valid header value".to_owned())?;
    credential.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, credential);
    Ok(data)
}

/// A relayed request whose credential framing is broken: a gateway fault, never the device's.
fn bad_credential(message: String) -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        "CMGConnector_Bad_Request",
        message,
        "update the gateway to the connection point's version",
    )
}

/// The request for the MP: the device's method and body, the MP's own `path`, and only the
/// [`FORWARDED`] headers (everything else the gateway sent is dropped).
fn to_mp(
    parts: &hyper::http::request::Parts,
    path: &hyper::Uri,
    body: &Bytes,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = path.clone();
    let headers = request.headers_mut();
    for name in &FORWARDED {
        for value in parts.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    request
}

/// The MP's answer as relayed back: status, body and the headers a device needs.
fn answer(status: StatusCode, headers: &header::HeaderMap, body: Bytes) -> Reply {
    let mut builder = Response::builder().status(status);
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(v) = headers.get(&name) {
            builder = builder.header(name, v.clone());
        }
    }
    builder.body(Full::new(body)).unwrap_or_default()
}

fn reply(status: StatusCode, body: Bytes) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .unwrap_or_default()
}

fn error(status: StatusCode, code: &str, message: impl Into<String>, action: &str) -> Reply {
    let body = ErrorBody {
        error: code.into(),
        message: message.into(),
        action: action.into(),
    };
    reply(
        status,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(length: &str) -> header::HeaderMap {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            tunnel::CREDENTIAL_LENGTH,
            header::HeaderValue::from_str(length).unwrap(),
        );
        headers
    }

    #[test]
    fn the_credential_at_the_front_of_the_data_becomes_the_authorization_header_again() {
        let mut headers = framed("8");
        let length = credential_length(&headers).unwrap();
        let body = restore_credential(
            &mut headers,
            Bytes::from_static(b"Bearer x{\"body\":1}"),
            length,
        )
        .unwrap();
        assert_eq!(&body[..], b"{\"body\":1}");
        let token = headers.get(header::AUTHORIZATION).unwrap();
        assert_eq!(token, "Bearer x");
        assert!(
            token.is_sensitive(),
            "the token must stay out of debug output"
        );
    }

    #[test]
    fn without_a_credential_the_data_is_the_body() {
        let mut headers = header::HeaderMap::new();
        assert_eq!(credential_length(&headers).unwrap(), 0);
        let body = restore_credential(&mut headers, Bytes::from_static(b"report"), 0).unwrap();
        assert_eq!(&body[..], b"report");
        assert!(headers.get(header::AUTHORIZATION).is_none());
    }

    #[test]
    fn broken_credential_framing_is_refused() {
        let too_long = (tunnel::MAX_CREDENTIAL_BYTES + 1).to_string();
        for length in ["eight", "-1", too_long.as_str()] {
            let why = credential_length(&framed(length)).unwrap_err();
            assert!(why.contains(tunnel::CREDENTIAL_LENGTH), "{length}: {why}");
        }
        let mut headers = header::HeaderMap::new();
        let short = restore_credential(&mut headers, Bytes::from_static(b"Bearer"), 8);
        assert!(short.unwrap_err().contains("ended 6 bytes into"));
        let control = restore_credential(&mut headers, Bytes::from_static(b"Bearer\nx"), 8);
        assert!(control.unwrap_err().contains("not a valid header value"));
        assert!(headers.get(header::AUTHORIZATION).is_none());
    }
}
